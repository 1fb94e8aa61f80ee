#!/usr/bin/env bash
# Block device benchmark where nbd.ko is absent: fio (libaio, direct) on a loop device
# over one file, reached five ways, in one run:
#   raw      losetup on the image file itself (buffered: the loop writes into the file's
#            page cache, as the servers below do with their origin)
#   fuse     cowsnapctl attach --via fuse: the daemon's own FUSE file + losetup --direct-io=on,
#            requests over plain /dev/fuse (COWSNAP_FUSE_URING=off)
#   fuse-uring  the same over FUSE over io_uring (COWSNAP_FUSE_URING=on; the script sets
#            /sys/module/fuse/parameters/enable_uring to Y for the run and restores it;
#            libfuse's nbdfuse here (3.14) does not speak io_uring, so the others do not
#            change with it)
#   nbdfuse  cowsnapctl attach --via nbdfuse: nbdfuse on the daemon's NBD socket + loop
#   nbdkit   nbdkit file plugin (cache=default) + nbdfuse + losetup --direct-io=on
#   fuse@N, fuse-uring@N   the same as fuse, fuse-uring with N FUSE threads (--fuse-threads)
#   ublk     cowsnapctl attach --via ublk: the daemon's own /dev/ublkbN (needs ublk_drv;
#            on a host without it, run the script in the VM of scripts/vm.sh with the
#            module of scripts/ublk-module.sh, as tests/16-ublk.sh does)
#   ublk@N   the same with N helper threads per queue (--ublk-helpers; 0: none)
# Jobs: 4k randwrite QD32, 4k randread QD32, 4k randwrite QD1, 1M seq write QD8,
# 1M seq read QD8; with BENCH_JOBS naming pgbench_c4 / pgbench_c1: PostgreSQL on ext4 on a
# second image (2 GiB, `pgbench -i -s BENCH_PG_SCALE` once), `pgbench -c 4 -j 2` or
# `-c 1` for BENCH_SECS on each path in turn (TPS). The file is filled with random data and read into the page cache
# first and copied once through the cowsnap device, so every chunk's change-log bit is
# set (the steady state between backups: the first write to a chunk after a backup also
# persists its bit, which raw and nbdkit never do); jobs are interleaved (job by job, path by path) so background load hits all
# four alike. Prints a markdown table with each path's ratio to raw and to nbdkit.
# BENCH_DURING_BACKUP=1: on the cowsnap paths a full backup of the disk (every block, to
# a raw image file, --rate-limit of the disk size / (BENCH_SECS + 15 s), so it outlasts
# the job) runs during each job: writes to chunks not yet copied are preserved first. raw
# and nbdkit have no backup, so the ratios are against the plain devices; a value marked
# "(backup ended early)" was not measured under a backup for the whole job.
#   scripts/bench-device.sh   (env: BENCH_SECS=10, BENCH_SIZE_MB=1024, BENCH_PATHS,
#                              BENCH_JOBS, BENCH_PG_SCALE=20, BENCH_DURING_BACKUP,
#                              COWSNAP_BIN_DIR)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${COWSNAP_BIN_DIR:-$ROOT/target/release}
CTL=$BIN/cowsnapctl
SECS=${BENCH_SECS:-10}
SIZE_MB=${BENCH_SIZE_MB:-1024}
PATHS=${BENCH_PATHS:-"raw fuse fuse-uring nbdfuse nbdkit"}
JOBS=${BENCH_JOBS:-"randwrite4k randread4k randwrite4k_qd1 seqwrite1m seqread1m"}
for t in fio nbdkit nbdfuse losetup fusermount3 jq; do
  command -v "$t" >/dev/null || { echo "missing $t (scripts/setup.sh)"; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "needs root (losetup, mount)"; exit 1; }
[ -x "$CTL" ] || { echo "no cowsnapctl at $CTL (cargo build --release)"; exit 1; }

KNOB=/sys/module/fuse/parameters/enable_uring
KNOB_WAS=
if [[ " $PATHS " == *" fuse-uring "* ]]; then
  [ -w "$KNOB" ] || { echo "fuse-uring: no $KNOB (a kernel with CONFIG_FUSE_IO_URING)"; exit 1; }
  KNOB_WAS=$(cat "$KNOB")
  # on for the whole run (6.14 refuses every io_uring command while it is off, even on
  # connections that negotiated it)
  echo Y > "$KNOB"
fi
W=$(mktemp -d /tmp/cowsnap-benchdev.XXXXXX)
chmod 755 "$W"   # PostgreSQL (user postgres) reaches its data and socket below
export COWSNAP_RUN_DIR=$W/run COWSNAP_STATE_DIR=$W/state COWSNAP_NBD_BIN=$BIN/cowsnap-nbd
IMG=$W/disk.img
PGIMG=$W/pg.img
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
PGPORT=$((20000 + RANDOM % 20000))
DEV= NKPID= NFPID=
pg() { runuser -u postgres -- "$@"; }
pg_stop() { # stop PostgreSQL and unmount, if the job left them
  if mountpoint -q "$W/m"; then
    [ -f "$W/m/data/postmaster.pid" ] && pg "$PGBIN/pg_ctl" -D "$W/m/data" -m immediate stop >/dev/null 2>&1
    for _ in $(seq 50); do umount "$W/m" 2>/dev/null && break; sleep 0.2; done
  fi
}
teardown() {
  set +e
  pg_stop
  case ${CUR:-} in raw|nbdkit) [ -n "$DEV" ] && losetup -d "$DEV" 2>/dev/null ;; esac
  case ${CUR:-} in
    fuse|fuse-uring|nbdfuse|ublk) "$CTL" detach bench >/dev/null 2>&1; "$CTL" detach benchpg >/dev/null 2>&1 ;;
    nbdkit)
      for _ in $(seq 50); do [ -z "$(losetup -j "$W/nk/disk" 2>/dev/null)" ] && break; sleep 0.1; done
      fusermount3 -u "$W/nk" 2>/dev/null || fusermount3 -u -z "$W/nk" 2>/dev/null
      [ -n "$NKPID" ] && kill "$NKPID" 2>/dev/null && wait "$NKPID" 2>/dev/null ;;
  esac
  DEV= NKPID= CUR=
  set -e
}
CUR=
cleanup() {
  teardown; rm -rf "$W"
  if [ -n "$KNOB_WAS" ]; then echo "$KNOB_WAS" > "$KNOB"; fi
}
trap cleanup EXIT

setup() { # PATH [IMAGE (the fio image)]
  # PATH@N (fuse, fuse-uring): the daemon with N FUSE threads (COWSNAP_FUSE_THREADS)
  CUR=${1%@*}
  local img=${2:-$IMG} name=bench th=
  [[ $1 == *@* ]] && th=COWSNAP_FUSE_THREADS=${1#*@}
  [[ $1 == ublk@* ]] && th=COWSNAP_UBLK_HELPERS=${1#*@}
  [ "$img" = "$IMG" ] || name=benchpg
  case $CUR in
    raw) DEV=$(losetup --direct-io=off -f --show "$img") ;;
    fuse|nbdfuse) DEV=$(env $th COWSNAP_FUSE_URING=off "$CTL" attach "$img" --name "$name" --via "$CUR" >/dev/null 2>&1; jq -r .device "$COWSNAP_RUN_DIR/$name.attach.json") ;;
    ublk) DEV=$(env $th "$CTL" attach "$img" --name "$name" --via ublk >/dev/null 2>&1; jq -r .device "$COWSNAP_RUN_DIR/$name.attach.json") ;;
    fuse-uring)
      DEV=$(env $th COWSNAP_FUSE_URING=on "$CTL" attach "$img" --name "$name" --via fuse >/dev/null 2>&1; jq -r .device "$COWSNAP_RUN_DIR/$name.attach.json")
      grep -q "FUSE: $name served at .*io_uring)" "$COWSNAP_STATE_DIR/$name.log" || { echo "fuse-uring: not served over io_uring"; exit 1; } ;;
    nbdkit)
      rm -f "$W/nk.sock"; mkdir -p "$W/nk"
      nbdkit --foreground --unix "$W/nk.sock" file file="$img" cache=default >"$W/nbdkit.log" 2>&1 &
      NKPID=$!
      for _ in $(seq 100); do [ -S "$W/nk.sock" ] && break; sleep 0.05; done
      nbdfuse "$W/nk/disk" "nbd+unix:///?socket=$W/nk.sock" >"$W/nbdfuse.log" 2>&1 &
      for _ in $(seq 100); do [ -e "$W/nk/disk" ] && break; sleep 0.05; done
      DEV=$(losetup --direct-io=on -f --show "$W/nk/disk") ;;
  esac
  [ -b "$DEV" ] || { echo "set-up of $1 failed"; exit 1; }
}

pg_job() { # DEV CLIENTS -> "value TPS"
  local c=$2 j=$(( $2 > 1 ? 2 : 1 )) tps
  mount "$DEV" "$W/m"
  pg "$PGBIN/pg_ctl" -D "$W/m/data" -l "$W/pglog/pg.log" -w -t 300 \
    -o "-p $PGPORT -k $W/sock -c listen_addresses= -c fsync=on" start >/dev/null
  tps=$(pg "$PGBIN/pgbench" -h "$W/sock" -p "$PGPORT" -n -c "$c" -j "$j" -T "$SECS" postgres 2>/dev/null |
    awk '/^tps = / { printf "%d TPS", $3 }')
  pg "$PGBIN/pg_ctl" -D "$W/m/data" -m fast stop >/dev/null
  pg_stop
  echo "${tps:-0 TPS}"
}

job() { # DEV JOB -> "value unit"
  case $2 in
    pgbench_c4) pg_job "$1" 4 ;;
    pgbench_c1) pg_job "$1" 1 ;;
    *) fio_job "$1" "$2" ;;
  esac
}

fio_job() { # DEV JOB -> "value unit"
  local dev=$1 a
  case $2 in
    randwrite4k) a=(--rw=randwrite --bs=4k --iodepth=32) ;;
    randread4k) a=(--rw=randread --bs=4k --iodepth=32) ;;
    randwrite4k_qd1) a=(--rw=randwrite --bs=4k --iodepth=1) ;;
    seqwrite1m) a=(--rw=write --bs=1M --iodepth=8) ;;
    seqread1m) a=(--rw=read --bs=1M --iodepth=8) ;;
  esac
  fio --name=b --filename="$dev" --direct=1 --ioengine=libaio "${a[@]}" --time_based \
    --runtime="$SECS" --ramp_time=1 --size="${SIZE_MB}M" --output-format=json 2>/dev/null |
    jq -r --arg j "$2" '.jobs[0] | if ($j|test("write")) then .write else .read end |
      if ($j|test("1m")) then "\(.bw_bytes / 1048576 | floor) MiB/s" else "\(.iops | floor) IOPS" end'
}

echo "filling $IMG ($SIZE_MB MiB) with random data" >&2
dd if=/dev/urandom of="$IMG" bs=1M count="$SIZE_MB" status=none
setup fuse
dd if="$IMG" of="$DEV" bs=1M oflag=direct status=none
teardown
cat "$IMG" >/dev/null
if [[ " $JOBS " == *" pgbench_"* ]]; then
  [ -x "$PGBIN/initdb" ] || { echo "pgbench jobs need PostgreSQL (scripts/setup.sh)"; exit 1; }
  echo "PostgreSQL on ext4 on $PGIMG (2 GiB), pgbench -i -s ${BENCH_PG_SCALE:-20}" >&2
  mkdir -p "$W/m" "$W/sock" "$W/pglog" && chown postgres "$W/sock" "$W/pglog"
  truncate -s 2G "$PGIMG"
  setup raw "$PGIMG"
  mkfs.ext4 -q -F "$DEV"
  mount "$DEV" "$W/m"
  mkdir "$W/m/data" && chown postgres "$W/m/data" && chmod 700 "$W/m/data"
  pg "$PGBIN/initdb" -D "$W/m/data" -A trust >/dev/null
  pg "$PGBIN/pg_ctl" -D "$W/m/data" -l "$W/pglog/pg.log" -w -t 300 \
    -o "-p $PGPORT -k $W/sock -c listen_addresses=" start >/dev/null
  pg "$PGBIN/pgbench" -h "$W/sock" -p "$PGPORT" -i -q -s "${BENCH_PG_SCALE:-20}" postgres >/dev/null 2>&1
  pg "$PGBIN/pg_ctl" -D "$W/m/data" -m fast stop >/dev/null
  teardown
  # every chunk's change-log bit set, as for the fio image
  setup fuse "$PGIMG"; dd if="$PGIMG" of="$DEV" bs=1M oflag=direct status=none; teardown
  cat "$PGIMG" >/dev/null
fi
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs; $(uname -r)" >&2
declare -A R
for j in $JOBS; do
  img=$IMG; [[ $j == pgbench_* ]] && img=$PGIMG
  for p in $PATHS; do
    setup "$p" "$img"
    BK=
    if [ -n "${BENCH_DURING_BACKUP:-}" ] && [[ $p == fuse* || $p == nbdfuse || $p == ublk* ]]; then
      # a full backup (every block, to a raw image) rate-limited to last the whole job
      name=bench; [ "$img" = "$IMG" ] || name=benchpg
      rm -f "$W/bk.img"
      "$CTL" backup "$name" --to "file:$W/bk.img" --quiesce-idle 0 --all-blocks \
        --rate-limit $(( $(stat -c %s "$img") / (SECS + 15) )) >"$W/bk.out" 2>&1 &
      BK=$!
      for _ in $(seq 100); do
        [ "$("$CTL" status "$name" --json | jq -r '.daemon.backup.state // "none"')" = running ] && break
        sleep 0.05
      done
    fi
    R[$j,$p]=$(job "$DEV" "$j")
    if [ -n "$BK" ]; then
      kill -0 "$BK" 2>/dev/null || R[$j,$p]="${R[$j,$p]} (backup ended early)"
      wait "$BK" || { echo "the backup during $j on $p failed: $(tail -n 3 "$W/bk.out")" >&2; R[$j,$p]="${R[$j,$p]} (backup failed)"; }
    fi
    teardown
    echo "$j $p: ${R[$j,$p]}" >&2
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

num() { echo "${1%% *}"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
# ratio columns: every path to raw, every cowsnap path to nbdkit (those measured)
RC=()
for p in $PATHS; do [ "$p" != raw ] && [[ " $PATHS " == *" raw "* ]] && RC+=("$p/raw"); done
for p in $PATHS; do [[ $p == fuse* || $p == nbdfuse* || $p == ublk* ]] && [[ " $PATHS " == *" nbdkit "* ]] && RC+=("$p/nbdkit"); done
printf '| job |'; for p in $PATHS; do printf ' %s |' "$p"; done
for c in "${RC[@]}"; do printf ' %s |' "${c/\// \/ }"; done; echo
printf '|---|'; for _ in $PATHS "${RC[@]}"; do printf -- '---|'; done; echo
for j in $JOBS; do
  printf '| %s |' "$j"
  for p in $PATHS; do printf ' %s |' "${R[$j,$p]:--}"; done
  for c in "${RC[@]}"; do
    printf ' %s× |' "$(ratio "$(num "${R[$j,${c%/*}]:-0}")" "$(num "${R[$j,${c#*/}]:-0}")")"
  done
  echo
done
