#!/usr/bin/env bash
# Cost against disk size, all figures from one run on one machine: the same 64 MiB of
# random data (16 spots of 4 MiB spread over the disk) on sparse disks of 64 GiB, 4 TiB
# and 16 TiB (all on one tmpfs: ext4 files stop below 16 TiB), attached --via none.
# Per size:
#  - full backup into repo:DIR: wall time of `cowsnapctl backup`, the daemon's elapsed_ms
#  - 16 writes of 64 KiB through NBD, then an incremental: the snapshot instant's
#    writer pause (instant_pause_us, measured by the daemon around the instant)
#  - daemon peak RSS (VmHWM) after both backups; repository index bytes
#  - restore of the incremental to a file: wall time
# Usage: scripts/bench-scale.sh [SIZES (64G 4T 16T)]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${COWSNAP_BIN_DIR:-$ROOT/target/release}; CTL=$BIN/cowsnapctl
PY=/usr/bin/python3
SIZES=${1:-"64G 4T 16T"}
for c in jq; do command -v $c >/dev/null || { echo "bench-scale: $c is not installed"; exit 1; }; done
$PY -c 'import nbd' 2>/dev/null || { echo "bench-scale: python3-libnbd is not installed"; exit 1; }
W=$(mktemp -d /var/tmp/cowsnap-bench-scale.XXXXXX)
export COWSNAP_RUN_DIR=$W/run COWSNAP_STATE_DIR=$W/state
cleanup() { set +e; "$CTL" detach bscale --force >/dev/null 2>&1
  mountpoint -q "$W/t" && umount "$W/t"; rm -rf "$W"; }
trap cleanup EXIT
now() { date +%s.%N; }
calc() { $PY -c "print(round($1, ${2:-2}))"; }
mkdir -p "$W/t"; mount -t tmpfs -o size=6G tmpfs "$W/t"

echo "# $(date -u +'%F %H:%M') UTC, $(nproc) vCPU, $(free -g | awk '/Mem/ {print $2}') GiB RAM, kernel $(uname -r)"
echo "| disk | full backup, s (daemon ms) | instant pause, µs: full / incremental | incremental, s | daemon peak RSS, MiB | index bytes | restore, s |"
echo "|---|---|---|---|---|---|---|"
for S in $SIZES; do
  rm -rf "$W/t"/*; rm -rf "$W/state" "$W/run"
  truncate -s "$S" "$W/t/d.img"
  BYTES=$(stat -c %s "$W/t/d.img")
  $PY - "$W/t/d.img" "$BYTES" <<'PY'
import os, sys
p, n = sys.argv[1], int(sys.argv[2])
with open(p, "r+b") as f:
    for i in range(16):
        off = (n // 16) * i + (n // 64)
        f.seek(off - off % (1 << 20)); f.write(os.urandom(4 << 20))
PY
  uri=$("$CTL" attach "$W/t/d.img" --via none --name bscale 2>"$W/attach.err" | tail -n 1)
  PID=$("$CTL" status bscale --json | jq .pid)
  t0=$(now); "$CTL" backup bscale --to "repo:$W/t/repo" --quiesce-idle 0s --json >"$W/full.json"; t1=$(now)
  FULL_S=$(calc "$t1 - $t0"); FULL_MS=$(jq -s 'map(select(.event=="result"))[0].elapsed_ms' "$W/full.json")
  P1=$(jq -s 'map(select(.event=="result"))[0].instant_pause_us' "$W/full.json")
  $PY - "$uri" "$BYTES" <<'PY'
import nbd, os, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1]); n = int(sys.argv[2])
for i in range(16):
    h.pwrite(os.urandom(65536), ((n // 16) * i + (n // 64) + (1 << 20)) & ~0xffff)
h.flush(); h.shutdown()
PY
  t0=$(now); "$CTL" backup bscale --to "repo:$W/t/repo" --quiesce-idle 0s --json >"$W/inc.json"; t1=$(now)
  INC_S=$(calc "$t1 - $t0"); P2=$(jq -s 'map(select(.event=="result"))[0].instant_pause_us' "$W/inc.json")
  HWM=$(awk '/VmHWM/ {print $2}' "/proc/$PID/status")
  GEN=$(jq -rs 'map(select(.event=="result"))[0].generation' "$W/inc.json")
  IDX=$(find "$W/t/repo" -name "*.idx" -printf "%s+" | sed "s/+$//")
  "$CTL" detach bscale >/dev/null
  rm -f "$W/t/d.img"
  t0=$(now); "$CTL" restore "repo:$W/t/repo@$GEN" --to "$W/t/r.img" >/dev/null; t1=$(now)
  RS=$(calc "$t1 - $t0")
  echo "| $S | $FULL_S ($FULL_MS) | $P1 / $P2 | $INC_S | $(calc "$HWM / 1024" 0) | $IDX | $RS |"
done
echo "# load average $(cut -d' ' -f1-3 /proc/loadavg) at the end"
