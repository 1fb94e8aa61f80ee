#!/usr/bin/env bash
# Kernel NBD with 1 and N connections next to nbdfuse + loop, in one VM (scripts/vm.sh):
# fio on the raw device and pgbench on ext4, each path on the same kind of origin (a
# file on tmpfs). The VM runs under TCG: compare the ratios, not the absolute numbers.
#   scripts/bench-vm.sh [SECONDS]       fio and pgbench runtime per job (default 20)
#   BENCH_PATHS="nbd1 nbd2 nbd4 fuse"   which paths (default all four)
# Builds nothing: run `cargo build --release --workspace --bins` first.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SECS=${1:-20}
if [ "${COWSNAP_BENCH_INNER:-0}" != 1 ]; then
  exec bash scripts/vm.sh --memory 3G -- env COWSNAP_BENCH_INNER=1 BENCH_PATHS="${BENCH_PATHS:-}" \
    bash "$ROOT/scripts/bench-vm.sh" "$SECS"
fi

# --- inside the VM
BIN=${COWSNAP_BIN_DIR:-$ROOT/target/release}
CTL=$BIN/cowsnapctl
W=$(mktemp -d /dev/shm/cowsnap-bench.XXXXXX)
export COWSNAP_RUN_DIR=$W/run COWSNAP_STATE_DIR=$W/state
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
cleanup() {
  set +e
  [ -n "${PGD:-}" ] && runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGD" -m immediate stop >/dev/null 2>&1
  mountpoint -q "$W/m" && umount "$W/m"
  for f in "$W"/run/*.attach.json; do [ -e "$f" ] && "$CTL" detach --force "$(basename "$f" .attach.json)" >/dev/null 2>&1; done
  rm -rf "$W"
}
trap cleanup EXIT
modprobe nbd || { echo "no nbd module"; exit 1; }
modprobe loop 2>/dev/null  # for --via fuse; built in on some kernels
echo "kernel $(uname -r), $(nproc) vCPUs (TCG), fio $(fio --version), ${SECS}s per fio job"

fio_job() { # fio_job DEV NAME RW BS DEPTH JOBS -> "iops MiB/s"
  fio --name="$2" --filename="$1" --direct=1 --ioengine=libaio --rw="$3" --bs="$4" \
    --iodepth="$5" --numjobs="$6" --group_reporting --time_based --runtime="$SECS" \
    --size=256M --output-format=json >"$W/fio.json" 2>"$W/fio.err" || { echo "fio failed: $(cat "$W/fio.err")" >&2; echo "- -"; return; }
  jq -r '.jobs[0] | (if .write.iops > .read.iops then .write else .read end) | "\(.iops | floor) \(.bw / 1024 | floor)"' "$W/fio.json"
}
pgb() { # pgb DEV -> tps
  mkfs.ext4 -q -F "$1" && mkdir -p "$W/m" && mount "$1" "$W/m" || return 1
  PGD=$W/m/data; mkdir -p "$PGD" "$W/sock"; chown postgres "$PGD" "$W/sock"; chmod 700 "$PGD"; chmod 755 "$W"
  runuser -u postgres -- "$PGBIN/initdb" -N -D "$PGD" -A trust >/dev/null 2>&1
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGD" -l "$W/sock/pg.log" -w -t 300 \
    -o "-p 5498 -k $W/sock -c listen_addresses= -c shared_buffers=32MB" start >/dev/null
  runuser -u postgres -- "$PGBIN/pgbench" -h "$W/sock" -p 5498 -i -s 1 postgres >/dev/null 2>&1
  runuser -u postgres -- "$PGBIN/pgbench" -h "$W/sock" -p 5498 -c 2 -T "$SECS" postgres 2>/dev/null |
    awk '/^tps/ {printf "%d", $3}'
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGD" -m fast stop >/dev/null; PGD=""
  umount "$W/m"
}

printf '%-22s %-26s %-26s %-26s %-26s %s\n' path "randread 4k qd16x2" "randwrite 4k qd16x2" "read 1M qd4" "write 1M qd4" "pgbench tps"
run_path() { # run_path LABEL ATTACH_ARGS...
  local label=$1; shift
  truncate -s 512M "$W/disk.img"
  local dev
  dev=$("$CTL" attach "$W/disk.img" --name b "$@" 2>"$W/attach.err" | tail -n 1) || { echo "$label: attach failed: $(cat "$W/attach.err")"; return; }
  dd if=/dev/urandom of="$W/fill" bs=1M count=64 status=none
  for i in 0 1 2 3; do dd if="$W/fill" of="$dev" bs=1M seek=$((i * 64)) oflag=direct status=none; done  # what fio reads
  local rr rw sr sw tps
  rr=$(fio_job "$dev" rr randread 4k 16 2)
  rw=$(fio_job "$dev" rw randwrite 4k 16 2)
  sr=$(fio_job "$dev" sr read 1M 4 1)
  sw=$(fio_job "$dev" sw write 1M 4 1)
  tps=$(pgb "$dev")
  printf '%-22s %-26s %-26s %-26s %-26s %s\n' "$label" "${rr% *} IOPS ${rr#* } MiB/s" "${rw% *} IOPS ${rw#* } MiB/s" \
    "${sr% *} IOPS ${sr#* } MiB/s" "${sw% *} IOPS ${sw#* } MiB/s" "${tps:--}"
  "$CTL" detach b >/dev/null 2>&1 || "$CTL" detach --force b >/dev/null 2>&1
  rm -f "$W/disk.img"
}
for p in ${BENCH_PATHS:-nbd1 nbd2 nbd4 fuse}; do
  case $p in
    nbd[0-9]*) run_path "nbd, ${p#nbd} connection(s)" --via nbd --connections "${p#nbd}";;
    fuse) run_path "fuse (the daemon's FUSE file + loop)" --via fuse;;
    nbdfuse) run_path "fuse (nbdfuse+loop)" --via nbdfuse;;
  esac
done
