#!/usr/bin/env bash
# Pull-mode throughput against a raw-image backup of the same disk, in the same run.
#
# An idle disk of random (incompressible) data, attached with --via none. Each round,
# with the page cache dropped before each step:
#   backup  cowsnapctl backup --to file:IMG --quiesce-idle 0s
#   pull    cowsnapctl snapshot --quiesce-idle 0s; nbdcopy URI IMG2; cowsnapctl release
# Both images are compared with the disk (cmp) in the first round. Wall-clock seconds of
# the whole commands (snapshot and release included in "pull"), MiB/s, and the ratio of
# throughputs pull/backup (1.0 = as fast, higher = pull faster), min/median/max.
# Usage: scripts/bench-pull.sh [SIZE_MIB (1024)] [RUNS (5)]
# Needs root (drop_caches), nbdcopy, python3.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MIB=${1:-1024}; RUNS=${2:-5}
BIN=${COWSNAP_BIN_DIR:-$ROOT/target/release}
CTL=$BIN/cowsnapctl
PY=/usr/bin/python3
W=$(mktemp -d /var/tmp/cowsnap-bench-pull.XXXXXX)
export COWSNAP_RUN_DIR=$W/run COWSNAP_STATE_DIR=$W/state
cleanup() { set +e; "$CTL" detach tpull --force >/dev/null 2>&1; rm -rf "$W"; }
trap cleanup EXIT
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now() { date +%s.%N; }

echo "# $(date -u '+%F %H:%M') UTC; $(nproc) vCPU, $(free -g | awk '/Mem/ {print $2}') GiB RAM, kernel $(uname -r); load $(cut -d' ' -f1-3 /proc/loadavg) at start"
echo "# disk $MIB MiB of random data on $(df -T "$W" | awk 'NR==2 {print $2}'); $RUNS rounds; nbdcopy $(nbdcopy --version | head -n 1 | awk '{print $2}')"
head -c $((MIB << 20)) /dev/urandom >"$W/src.img"
"$CTL" attach "$W/src.img" --via none --name tpull >/dev/null
RES=$W/results.txt; : >"$RES"
for r in $(seq 1 "$RUNS"); do
  drop; t0=$(now)
  "$CTL" backup tpull --to "file:$W/bk.img" --quiesce-idle 0s --json >/dev/null
  t1=$(now)
  drop; t2=$(now)
  uri=$("$CTL" snapshot tpull --quiesce-idle 0s 2>/dev/null)
  nbdcopy "$uri" "$W/pull.img"
  "$CTL" release tpull 2>/dev/null
  t3=$(now)
  if [ "$r" = 1 ]; then
    cmp "$W/src.img" "$W/bk.img" && cmp "$W/src.img" "$W/pull.img" || { echo "image differs" >&2; exit 1; }
  fi
  echo "$r $($PY -c "print($t1 - $t0, $t3 - $t2)")" >>"$RES"
  rm -f "$W/bk.img" "$W/pull.img"
done
$PY - "$RES" "$MIB" <<'PY'
import statistics, sys
rows = [list(map(float, l.split()[1:])) for l in open(sys.argv[1])]
mib = int(sys.argv[2])
def mmm(xs): return "%.2f / %.2f / %.2f" % (min(xs), statistics.median(xs), max(xs))
print("| step | s (min / median / max) | MiB/s (median) |")
print("|---|---|---|")
for i, name in enumerate(["backup --to file: (raw image)", "snapshot + nbdcopy + release"]):
    xs = [r[i] for r in rows]
    print(f"| {name} | {mmm(xs)} | {mib / statistics.median(xs):.0f} |")
ratios = [r[0] / r[1] for r in rows]
print(f"\nthroughput ratio pull/backup (per round): {mmm(ratios)}")
PY
