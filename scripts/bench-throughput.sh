#!/usr/bin/env bash
# Backup throughput against cp, all figures from one run on one machine.
#
# An idle disk attached with --via none: random (incompressible) data, or with
# BENCH_DATA=mixed a disk of used files: a third of its MiB random (media, archives), a
# third base64 text (compresses to about 3/4), a third log-like text (compresses well);
# no zeros, so restore writes every byte cp writes. Each round runs, in this order and
# with the page cache dropped before each step:
#   cp       cp --sparse=never SRC DST && sync DST
#   raw      cowsnapctl backup --to file:IMG --quiesce-idle 0s   (the image is compared)
#   repo     cowsnapctl backup --to repo:DIR --quiesce-idle 0s   (a fresh repository)
#   restore  cowsnapctl restore repo:DIR --to FILE               (compared with the disk)
#   live     (BENCH_LIVE=1) cowsnapctl restore repo:DIR --to FILE --live --via none --wait,
#            timed until it returns with the fill complete (compared with the disk; no cpu)
#   cpimg    cp --sparse=never IMG DST && sync DST   (the raw image: restore's peer)
# (BENCH_ATTACH_ARGS: extra attach flags, e.g. "--direct-io off") for every build named in BENCH_BINS (space-separated LABEL=DIR pairs, default
# "this=$COWSNAP_BIN_DIR"; each build attaches the disk with its own daemon), so that
# two builds are measured alternately in the same run; BENCH_ALTERNATE=1 reverses their
# order every other round, so neither always runs first.
# Wall-clock seconds of the whole command; "cpu" is the daemon's user+system seconds
# during the backup (from /proc/PID/stat), per GiB (for cp and restore: the process's
# own, /usr/bin/time; none counts the kernel's flusher threads). Ratios are the peer's
# time over the step's, pair by pair within a round (1.0 = as fast as the peer, higher
# = faster; peer: cp + sync for backups, the cp of the raw image right after it for the
# restore), then min/median/max over the rounds, with the target and whether the
# median meets it.
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
DATA=${BENCH_DATA:-random}
echo "# disk $MIB MiB of $DATA data on $(df -T "$W" | awk 'NR==2 {print $2}') ($W); $RUNS rounds; builds: $BINS"
case $DATA in
  random) head -c $((MIB << 20)) /dev/urandom >"$W/src.img" ;;
  mixed) $PY - "$W/src.img" "$MIB" <<'PY'
import base64, os, random, sys
words = [w.encode() for w in "the of and disk block write read backup restore chunk query table index commit page error warning user session 200 404 GET POST".split()]
with open(sys.argv[1], "wb") as f:
    for i in range(int(sys.argv[2])):
        if i % 3 == 0:
            b = os.urandom(1 << 20)
        elif i % 3 == 1:
            b = base64.b64encode(os.urandom(3 << 18))[: 1 << 20]
        else:
            rnd = random.Random(i)
            lines = []
            n = 0
            while n < 1 << 20:
                l = b"2026-12-07T%02d:%02d:%02d.%06d " % (rnd.randrange(24), rnd.randrange(60), rnd.randrange(60), rnd.randrange(10**6)) \
                    + b" ".join(rnd.choices(words, k=12)) + b" id=%d\n" % rnd.randrange(10**9)
                lines.append(l)
                n += len(l)
            b = b"".join(lines)[: 1 << 20]
        f.write(b)
PY
  ;;
  *) echo "BENCH_DATA: random or mixed, not $DATA"; exit 2 ;;
esac
RES=$W/results.txt; : >"$RES"

attach() { # attach with build DIR
  "$1/cowsnapctl" attach "$W/src.img" --via none --name tsrc ${BENCH_ATTACH_ARGS:-} >"$W/attach.log" 2>&1 \
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
  order=$BINS
  # BENCH_ALTERNATE=1: the builds run in reverse order every other round
  [ "${BENCH_ALTERNATE:-0}" = 1 ] && [ $((r % 2)) = 0 ] && order=$(printf '%s\n' $BINS | tac | tr '\n' ' ')
  for b in $order; do
    label=${b%%=*}; dir=${b#*=}
    attach "$dir"
    drop; c0=$(cpu "$PID"); t0=$(now)
    "$dir/cowsnapctl" backup tsrc --to "file:$W/img" --quiesce-idle 0s --json >"$W/raw.json"
    t1=$(now); c1=$(cpu "$PID")
    cmp "$W/src.img" "$W/img" || { echo "raw image of $label differs from the idle disk"; exit 1; }
    echo "raw $label $r $($PY -c "print($t1 - $t0)") $($PY -c "print($c1 - $c0)")" >>"$RES"
    rm -rf "$W/repo"
    drop; c0=$(cpu "$PID"); t0=$(now)
    "$dir/cowsnapctl" backup tsrc --to "repo:$W/repo" --quiesce-idle 0s --json >"$W/repo.json"
    t1=$(now); c1=$(cpu "$PID")
    echo "repo $label $r $($PY -c "print($t1 - $t0)") $($PY -c "print($c1 - $c0)")" >>"$RES"
    drop; t0=$(now)
    /usr/bin/time -f "%U %S" -o "$W/restore.time" \
      "$dir/cowsnapctl" restore "repo:$W/repo" --to "$W/restored.img" >/dev/null
    t1=$(now)
    cmp "$W/src.img" "$W/restored.img" || { echo "restore of $label differs from the idle disk"; exit 1; }
    echo "restore $label $r $($PY -c "print($t1 - $t0)") $(awk '{print $1 + $2}' "$W/restore.time")" >>"$RES"
    rm -f "$W/restored.img"
    if [ "${BENCH_LIVE:-0}" = 1 ]; then
      # restore --live --wait (via none): from the command's start until it returns, the
      # daemon having reported the background fill complete (its destination flushed;
      # the command asks every 20 ms over the control socket)
      drop; t0=$(now)
      "$dir/cowsnapctl" restore "repo:$W/repo" --to "$W/live.img" --live --via none --name tlive --wait \
        >/dev/null 2>"$W/live.log" || { echo "live fill of $label failed:"; cat "$W/live.log"; exit 1; }
      t1=$(now)
      "$dir/cowsnapctl" detach tlive >/dev/null
      cmp "$W/src.img" "$W/live.img" || { echo "live restore of $label differs from the idle disk"; exit 1; }
      echo "live $label $r $($PY -c "print($t1 - $t0)") 0" >>"$RES"
      rm -f "$W/live.img"
    fi
    drop; t0=$(now)
    /usr/bin/time -f "%U %S" -o "$W/cp.time" cp --sparse=never "$W/img" "$W/cp.img"; sync "$W/cp.img"
    t1=$(now)
    echo "cpimg $label $r $($PY -c "print($t1 - $t0)") $(awk '{print $1 + $2}' "$W/cp.time")" >>"$RES"
    rm -f "$W/cp.img" "$W/img"
    rm -rf "$W/repo"
    detach
  done
  echo "# round $r done; load $(cut -d' ' -f1-3 /proc/loadavg)"
done

$PY - "$RES" "$MIB" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
gib = int(sys.argv[2]) / 1024
mb = int(sys.argv[2]) * 1.048576
cp = {int(r[2]): float(r[3]) for r in rows if r[0] == "cp"}
cpimg = {(r[1], int(r[2])): float(r[3]) for r in rows if r[0] == "cpimg"}
cpcpu = [float(r[4]) / gib for r in rows if r[0] == "cp"]
# step -> (peer name, target ratio)
TARGET = {"raw": ("cp+sync", 0.9), "repo": ("cp+sync", 0.9), "restore": ("cp of the raw image", 1.0),
          "live": ("cp of the raw image", 1.0)}
def mmm(v, fmt="{:.2f}"):
    v = sorted(v)
    return "/".join(fmt.format(x) for x in (v[0], statistics.median(v), v[-1]))
print(f"{'step':<16} {'wall s min/med/max':<22} {'MB/s med':>8} {'peer/step min/med/max':>22} {'cpu s/GiB med':>14}  target")
print(f"{'cp+sync':<16} {mmm(cp.values()):<22} {mb / statistics.median(cp.values()):>8.0f} {'':>22} {statistics.median(cpcpu):>14.2f}")
keys = []
for r in rows:
    if r[0] != "cp" and (r[0], r[1]) not in keys:
        keys.append((r[0], r[1]))
verdicts = []
for k in keys:
    sel = [r for r in rows if (r[0], r[1]) == k]
    wall = [float(r[3]) for r in sel]
    cpu = [float(r[4]) / gib for r in sel]
    if k[0] == "cpimg":
        print(f"{'cp raw image ' + k[1]:<16} {mmm(wall):<22} {mb / statistics.median(wall):>8.0f} {'':>22} {statistics.median(cpu):>14.2f}")
        continue
    peer = cpimg if k[0] in ("restore", "live") else None
    ratio = [(peer[(k[1], int(r[2]))] if peer else cp[int(r[2])]) / float(r[3]) for r in sel]
    name, want = TARGET[k[0]]
    med = statistics.median(ratio)
    ok = "met" if med >= want else "NOT met"
    verdicts.append(f"{k[0]} {k[1]}: {med:.2f}x {name} (target >= {want}x): {ok}")
    print(f"{k[0] + ' ' + k[1]:<16} {mmm(wall):<22} {mb / statistics.median(wall):>8.0f} {mmm(ratio):>22} {statistics.median(cpu):>14.2f}  >= {want}x {name}: {ok}")
print("cpu: the daemon's for backups, the process's own for cp and restore")
for v in verdicts:
    print("#", v)
PY
