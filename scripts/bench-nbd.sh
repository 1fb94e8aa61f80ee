#!/usr/bin/env bash
# NBD server benchmark: fio (ioengine=nbd) against cowsnap-nbd, nbdkit's file plugin and
# qemu-nbd, all serving the same 1 GiB file over unix sockets, in one run.
# Jobs: 4k randread QD32, 4k randwrite QD32, 1M seq read QD8, 1M seq write QD8.
# All three servers use buffered I/O through the page cache on the same file (cowsnap:
# buffered, nbdkit file: cache=default, qemu-nbd: --cache=writeback --aio=threads); the
# file is filled with random data first and read back into the page cache before every
# job, and jobs are interleaved (job by job, server by server) so background load hits
# all three alike.
#   scripts/bench-nbd.sh            (env: BENCH_SECS=15, BENCH_SIZE_MB=1024, BENCH_JOBS, BENCH_SERVERS, BENCH_ROUNDS=1 (results are means),
#                                    BENCH_IO_ENGINE=auto, COWSNAP_NBD_BIN, COWSNAP_BIN_DIR)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${COWSNAP_NBD_BIN:-${COWSNAP_BIN_DIR:-$ROOT/target/release}/cowsnap-nbd}
SECS=${BENCH_SECS:-15}
SIZE_MB=${BENCH_SIZE_MB:-1024}
ENGINE=${BENCH_IO_ENGINE:-auto}
ROUNDS=${BENCH_ROUNDS:-1}
PY=/usr/bin/python3
for t in fio nbdkit qemu-nbd nbdinfo; do
  command -v "$t" >/dev/null || { echo "missing $t (install fio, nbdkit, qemu-utils, libnbd-bin)"; exit 1; }
done
[ -x "$BIN" ] || { echo "no server binary at $BIN (cargo build --release)"; exit 1; }

W=$(mktemp -d /tmp/cowsnap-bench.XXXXXX)
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT
IMG=$W/disk.img
SOCK=$W/run/bench.nbd
mkdir -p "$W/run"
echo "filling $IMG ($SIZE_MB MiB) with random data"
dd if=/dev/urandom of="$IMG" bs=1M count="$SIZE_MB" status=none
sync

start() {
  rm -f "$SOCK"
  case $1 in
    cowsnap) "$BIN" --name bench --origin "$IMG" --run-dir "$W/run" --io-engine "$ENGINE" >"$W/cowsnap.log" 2>&1 &;;
    nbdkit) nbdkit --foreground --unix "$SOCK" --exportname bench file file="$IMG" cache=default >"$W/nbdkit.log" 2>&1 &;;
    qemu-nbd) qemu-nbd --persistent --socket "$SOCK" --export-name bench -f raw --cache=writeback --aio=threads \
                --discard=unmap --detect-zeroes=off "$IMG" >"$W/qemu.log" 2>&1 &;;
  esac
  PID=$!
  for _ in $(seq 100); do
    [ -S "$SOCK" ] && nbdinfo --can connect "nbd+unix:///bench?socket=$SOCK" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$1 did not start"; cat "$W"/*.log; exit 1
}
stop() { kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null || true; PID=; }

JOBS=(${BENCH_JOBS:-randread:4k:32 randwrite:4k:32 read:1M:8 write:1M:8})
SERVERS=(${BENCH_SERVERS:-cowsnap nbdkit qemu-nbd})
declare -A RES
for round in $(seq "$ROUNDS"); do
  [ "$ROUNDS" -gt 1 ] && echo "round $round/$ROUNDS"
  for j in "${JOBS[@]}"; do
    IFS=: read -r rw bs qd <<<"$j"
    for s in "${SERVERS[@]}"; do
      sync; cat "$IMG" >/dev/null   # same page-cache state for everyone
      start "$s"
      fio --name="$rw" --ioengine=nbd --uri="nbd+unix:///bench?socket=$SOCK" --rw="$rw" --bs="$bs" \
        --iodepth="$qd" --numjobs=1 --time_based --runtime="$SECS" --ramp_time=2 \
        --output-format=json --output="$W/$s-$rw.json" >/dev/null
      stop
      r=$($PY -c '
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]; side = j["read"] if j["read"]["io_bytes"] else j["write"]
print("%.0f %.1f" % (side["iops"], side["bw"] / 1024))' "$W/$s-$rw.json")
      echo "  $rw bs=$bs qd=$qd $s: ${r% *} IOPS, ${r#* } MiB/s"
      RES[$s,$rw]="${RES[$s,$rw]:-} $r"
    done
  done
done
# mean over rounds: "iops mibs"
for k in "${!RES[@]}"; do
  RES[$k]=$($PY -c 'import sys; v = list(map(float, sys.argv[1:])); n = len(v) // 2
print("%.0f %.1f" % (sum(v[0::2]) / n, sum(v[1::2]) / n))' ${RES[$k]})
done

echo
echo "fio ioengine=nbd, ${SECS}s per job, mean of $ROUNDS round(s), $SIZE_MB MiB file, $(nproc) CPUs, cowsnap io engine $ENGINE"
printf '| %-24s | %12s | %12s | %12s | %15s | %17s |\n' job cowsnap nbdkit qemu-nbd cowsnap/nbdkit cowsnap/qemu-nbd
printf '|%s|%s|%s|%s|%s|%s|\n' "--------------------------" "-------------:" "-------------:" "-------------:" "----------------:" "------------------:"
for j in "${JOBS[@]}"; do
  IFS=: read -r rw bs qd <<<"$j"
  if [ "$bs" = 4k ]; then unit=IOPS; f=1; else unit=MiB/s; f=2; fi
  c=$(cut -d' ' -f$f <<<"${RES[cowsnap,$rw]}"); k=$(cut -d' ' -f$f <<<"${RES[nbdkit,$rw]}"); q=$(cut -d' ' -f$f <<<"${RES[qemu-nbd,$rw]}")
  printf '| %-24s | %12s | %12s | %12s | %14sx | %16sx |\n' "$rw $bs QD$qd ($unit)" "$c" "$k" "$q" \
    "$($PY -c "print(f'{$c/$k:.2f}')")" "$($PY -c "print(f'{$c/$q:.2f}')")"
done
