#!/usr/bin/env bash
# Backup throughput against cp, all figures from one run on one machine.
#
# An idle disk of random (incompressible) data, attached with --via none. Each round
# runs, in this order and with the page cache dropped before each step:
#   cp      cp --sparse=never SRC DST && sync DST
#   raw     cowsnapctl backup --to file:IMG --quiesce-idle 0s   (the image is compared)
#   repo    cowsnapctl backup --to repo:DIR --quiesce-idle 0s   (a fresh repository)
# for every build named in BENCH_BINS (space-separated LABEL=DIR pairs, default
# "this=$COWSNAP_BIN_DIR"; each build attaches the disk with its own daemon), so that
# two builds are measured alternately in the same run.
# Wall-clock seconds of the whole command; "cpu" is the daemon's user+system seconds
# during the backup (from /proc/PID/stat), per GiB (for cp: cp's own, /usr/bin/time;
# neither counts the kernel's flusher threads). Ratios are cp's time over the
# backup's time, pair by pair (1.0 = as fast as cp, higher = faster), then
# min/median/max over the rounds.
# Usage: scripts/bench-throughput.sh [SIZE_MIB (1024)] [RUNS (5)]
# Needs root (drop_caches), python3, /usr/bin/time.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MIB=${1:-1024}; RUNS=${2:-5}
BINS=${BENCH_BINS:-this=${COWSNAP_BIN_DIR:-$ROOT/target/release}}
PY=/usr/bin/python3
W=$(mktemp -d /var/tmp/cowsnap-bench-tp.XXXXXX)
export COWSNAP_RUN_DIR=$W/run COWSNAP_STATE_DIR=$W/state
ATTACHED=
cleanup() { set +e
  [ -n "$ATTACHED" ] && "$ATTACHED/cowsnapctl" detach tsrc --force >/dev/null 2>&1
  rm -rf "$W"; }
trap cleanup EXIT
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
# daemon CPU seconds (user + system) of the disk's daemon
cpu() { $PY -c "import os,sys; f=open('/proc/%s/stat'%sys.argv[1]).read().rsplit(')',1)[1].split(); print((int(f[11])+int(f[12]))/os.sysconf('SC_CLK_TCK'))" "$1"; }

echo "# $(date -u '+%F %H:%M') UTC; $(nproc) vCPU, $(free -g | awk '/Mem/ {print $2}') GiB RAM, kernel $(uname -r); load $(cut -d' ' -f1-3 /proc/loadavg) at start"
echo "# disk $MIB MiB of random data on $(df -T "$W" | awk 'NR==2 {print $2}') ($W); $RUNS rounds; builds: $BINS"
head -c $((MIB << 20)) /dev/urandom >"$W/src.img"
RES=$W/results.txt; : >"$RES"

attach() { # attach with build DIR
  "$1/cowsnapctl" attach "$W/src.img" --via none --name tsrc >"$W/attach.log" 2>&1 \
    || { cat "$W/attach.log"; exit 1; }
  ATTACHED=$1
  PID=$(cat "$COWSNAP_RUN_DIR/tsrc.pid")
}
detach() { "$ATTACHED/cowsnapctl" detach tsrc >/dev/null 2>&1; ATTACHED=; }

for r in $(seq 1 "$RUNS"); do
  drop; t0=$(now)
  /usr/bin/time -f "%U %S" -o "$W/cp.time" cp --sparse=never "$W/src.img" "$W/cp.img"; sync "$W/cp.img"
  t1=$(now)
  echo "cp - $r $($PY -c "print($t1 - $t0)") $(awk '{print $1 + $2}' "$W/cp.time")" >>"$RES"
  rm -f "$W/cp.img"
  for b in $BINS; do
    label=${b%%=*}; dir=${b#*=}
    attach "$dir"
    drop; c0=$(cpu "$PID"); t0=$(now)
    "$dir/cowsnapctl" backup tsrc --to "file:$W/img" --quiesce-idle 0s --json >"$W/raw.json"
    t1=$(now); c1=$(cpu "$PID")
    cmp "$W/src.img" "$W/img" || { echo "raw image of $label differs from the idle disk"; exit 1; }
    echo "raw $label $r $($PY -c "print($t1 - $t0)") $($PY -c "print($c1 - $c0)")" >>"$RES"
    rm -f "$W/img"
    rm -rf "$W/repo"
    drop; c0=$(cpu "$PID"); t0=$(now)
    "$dir/cowsnapctl" backup tsrc --to "repo:$W/repo" --quiesce-idle 0s --json >"$W/repo.json"
    t1=$(now); c1=$(cpu "$PID")
    echo "repo $label $r $($PY -c "print($t1 - $t0)") $($PY -c "print($c1 - $c0)")" >>"$RES"
    rm -rf "$W/repo"
    detach
  done
  echo "# round $r done"
done

$PY - "$RES" "$MIB" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
gib = int(sys.argv[2]) / 1024
cp = {int(r[2]): float(r[3]) for r in rows if r[0] == "cp"}
cpcpu = [float(r[4]) / gib for r in rows if r[0] == "cp"]
def mmm(v, fmt="{:.2f}"):
    v = sorted(v)
    return "/".join(fmt.format(x) for x in (v[0], statistics.median(v), v[-1]))
print(f"{'step':<16} {'wall s min/med/max':<22} {'MB/s median':>11} {'cp/step min/med/max':>20} {'daemon cpu s/GiB med':>21}")
print(f"{'cp+sync':<16} {mmm(cp.values()):<22} {int(sys.argv[2]) * 1.048576 / statistics.median(cp.values()):>11.0f} {'':>20} {statistics.median(cpcpu):>21.2f}")
keys = []
for r in rows:
    if r[0] != "cp" and (r[0], r[1]) not in keys:
        keys.append((r[0], r[1]))
for k in keys:
    sel = [r for r in rows if (r[0], r[1]) == k]
    wall = [float(r[3]) for r in sel]
    ratio = [cp[int(r[2])] / float(r[3]) for r in sel]
    cpu = [float(r[4]) / gib for r in sel]
    print(f"{k[0] + ' ' + k[1]:<16} {mmm(wall):<22} {int(sys.argv[2]) * 1.048576 / statistics.median(wall):>11.0f} {mmm(ratio):>20} {statistics.median(cpu):>21.2f}")
PY
