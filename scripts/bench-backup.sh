#!/usr/bin/env bash
# Backup benchmark, all figures from one run on one machine:
#  1. backup of an idle disk (random data) to a raw image vs `cp` + sync of the same file
#     (page cache dropped before each; three alternating pairs, medians)
#  2. fio 4k randwrite QD32 write IOPS over the NBD socket: pass-through, during a cowsnap
#     backup, and during QEMU's own online backup of the same file (qemu-storage-daemon
#     exporting it over NBD, `blockdev-backup` sync=full with its copy-before-write filter).
#     "During" = fio's IOPS log (250 ms buckets) averaged over the backup's own window, so
#     the time after the backup (pass-through again) does not flatter either side.
#  3. daemon memory (VmRSS / VmHWM) for a 16 TiB sparse disk (on tmpfs: ext4 files stop
#     below 16 TiB), idle and with a backup running.
# Usage: scripts/bench-backup.sh [SIZE_MIB (1024)] [FIO_SECONDS (20)]
# Needs root (drop_caches, tmpfs), fio with the nbd engine, qemu-storage-daemon, jq.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${COWSNAP_BIN_DIR:-$ROOT/target/release}; CTL=$BIN/cowsnapctl
MIB=${1:-1024}; SECS=${2:-20}
for c in fio qemu-storage-daemon jq python3; do
  command -v "$c" >/dev/null || { echo "bench-backup: $c is not installed"; exit 1; }
done
W=$(mktemp -d /var/tmp/cowsnap-bench.XXXXXX)
export COWSNAP_RUN_DIR=$W/run COWSNAP_STATE_DIR=$W/state
QSD_PID=
cleanup() { set +e
  for n in bsrc big; do "$CTL" detach "$n" --force >/dev/null 2>&1; done
  [ -n "$QSD_PID" ] && kill "$QSD_PID" 2>/dev/null
  mountpoint -q "$W/tmpfs" && umount "$W/tmpfs"; rm -rf "$W"; }
trap cleanup EXIT
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
calc() { python3 -c "print(round($1, 3))"; }
# window_iops LOG FIO_START T0 T1: mean write IOPS of fio's 250 ms buckets inside [T0, T1]
window_iops() {
  python3 - "$@" <<'PY'
import sys
log, fs, t0, t1 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
a, b = (t0 - fs) * 1000, (t1 - fs) * 1000
v = [int(l.split(",")[1]) for l in open(log) if l.strip() and a <= int(l.split(",")[0]) - 250 and int(l.split(",")[0]) <= b]
print(round(sum(v) / len(v)) if v else 0)
PY
}
# fio JOB_NAME URI: 4k randwrite QD32 for $SECS s, IOPS log in $W/JOB_NAME_iops.1.log
fiojob() {
  fio --name="$1" --ioengine=nbd --uri="$2" --rw=randwrite --bs=4k --iodepth=32 \
    --time_based --runtime="$SECS" --write_iops_log="$W/$1" --log_avg_msec=250 \
    --output-format=json --output="$W/$1.json" >/dev/null
}
fio_iops() { sed -n '/^{/,$p' "$W/$1.json" | jq '.jobs[0].write.iops | floor'; }

echo "# $(date -u '+%F %H:%M') UTC; $(nproc) vCPU ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem/ {print $2}') GiB RAM, kernel $(uname -r); load average $(cut -d' ' -f1-3 /proc/loadavg) at start"
echo "# disk $MIB MiB on $(df -T "$W" | awk 'NR==2 {print $2}'); fio ${SECS}s per run"
head -c $((MIB << 20)) /dev/urandom >"$W/src.img"

# ---- 1. idle backup vs cp: 3 alternating pairs, medians ----
URI=$("$CTL" attach "$W/src.img" --via none --name bsrc 2>/dev/null | tail -n1)
CPS=(); BKS=()
for _ in 1 2 3; do
  drop; t0=$(now); cp --sparse=never "$W/src.img" "$W/cp.img"; sync "$W/cp.img"; t1=$(now)
  CPS+=("$(calc "$t1 - $t0")"); rm -f "$W/cp.img"
  drop; t0=$(now); "$CTL" backup bsrc --to "file:$W/img" --quiesce-idle 0s --json >"$W/idle.json"; t1=$(now)
  BKS+=("$(calc "$t1 - $t0")")
  cmp "$W/src.img" "$W/img" || { echo "image differs from the idle disk"; exit 1; }
  rm -f "$W/img"
done
median() { printf '%s\n' "$@" | sort -g | sed -n 2p; }
CP_S=$(median "${CPS[@]}"); BK_S=$(median "${BKS[@]}")

# ---- 2a. pass-through ----
fiojob pass "$URI"
PASS=$(fio_iops pass)

# ---- 2b. during a cowsnap backup ----
FS=$(now); fiojob during "$URI" & FIO=$!
sleep 2; t0=$(now)
"$CTL" backup bsrc --to "file:$W/img" --container ram:64M --quiesce-idle 0s --json >"$W/during-bk.json"
t1=$(now); wait $FIO; FE=$(calc "$FS + $SECS")
DURING=$(window_iops "$W/during_iops.1.log" "$FS" "$t0" "$t1")
DBK_S=$(calc "$t1 - $t0"); D_IN=$(python3 -c "print('yes' if $t1 <= $FE else 'no')")
B=$(tail -n1 "$W/during-bk.json")
HOLDS=$(echo "$B" | jq .holds); THR=$(echo "$B" | jq .throttled_writes)
PRES=$(echo "$B" | jq .chunks_preserved); HW="$(echo "$B" | jq .container_high_water)/$(echo "$B" | jq .container_slots)"
"$CTL" detach bsrc >/dev/null 2>&1
rm -f "$W/img"

# ---- 2c. QEMU blockdev-backup (copy-before-write) of the same file, same fio job ----
truncate -s "$(stat -c %s "$W/src.img")" "$W/q.img"
qemu-storage-daemon \
  --blockdev file,node-name=sf,filename="$W/src.img",cache.direct=off --blockdev raw,node-name=src,file=sf \
  --blockdev file,node-name=tf,filename="$W/q.img" --blockdev raw,node-name=tgt,file=tf \
  --nbd-server addr.type=unix,addr.path="$W/q.sock" --export nbd,id=e,node-name=src,writable=on,name= \
  --chardev socket,path="$W/qmp.sock",server=on,wait=off,id=q --monitor chardev=q \
  --pidfile "$W/qsd.pid" --daemonize
QSD_PID=$(cat "$W/qsd.pid")
FS=$(now); fiojob peer "nbd+unix:///?socket=$W/q.sock" & FIO=$!
sleep 2; t0=$(now)
python3 - "$W/qmp.sock" >"$W/qbk.json" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
def msgs():
    while True:
        yield json.loads(f.readline())
m = msgs(); next(m)
def cmd(c, **a):
    f.write(json.dumps({"execute": c, "arguments": a}) + "\n"); f.flush()
    for r in m:
        if "error" in r: sys.exit(f"{c}: {r['error']}")
        if "return" in r: return r["return"]
cmd("qmp_capabilities")
cmd("blockdev-backup", device="src", target="tgt", sync="full", **{"job-id": "b"})
for r in m:
    if r.get("event") == "BLOCK_JOB_COMPLETED":
        print(json.dumps({"error": r["data"].get("error")})); break
PY
t1=$(now); wait $FIO; FE=$(calc "$FS + $SECS")
[ "$(jq -r .error "$W/qbk.json")" = null ] || { echo "qemu backup failed: $(cat "$W/qbk.json")"; exit 1; }
PEER=$(window_iops "$W/peer_iops.1.log" "$FS" "$t0" "$t1")
PEER_S=$(calc "$t1 - $t0"); P_IN=$(python3 -c "print('yes' if $t1 <= $FE else 'no')")
kill "$QSD_PID"; QSD_PID=
rm -f "$W/q.img"

# ---- 3. memory, 16 TiB sparse disk ----
mkdir -p "$W/tmpfs"; mount -t tmpfs -o size=256M tmpfs "$W/tmpfs"; truncate -s 16T "$W/tmpfs/big.img"
"$CTL" attach "$W/tmpfs/big.img" --via none --name big >/dev/null 2>&1
PID=$("$CTL" status big --json | jq .pid)
RSS_IDLE=$(awk '/VmRSS/ {print $2}' "/proc/$PID/status")
t0=$(now)
"$CTL" backup big --to "file:$W/tmpfs/big-image.img" --quiesce-idle 0s --json >"$W/big.json" 2>&1 & BK=$!
for _ in $(seq 500); do [ "$("$CTL" status big --json | jq -r '.daemon.backup.state // ""')" = running ] && break; sleep 0.01; done
START_MS=$(calc "($(now) - $t0) * 1000")
sleep 5
RSS_BK=$(awk '/VmRSS/ {print $2}' "/proc/$PID/status"); HWM=$(awk '/VmHWM/ {print $2}' "/proc/$PID/status")
BMAP=$("$CTL" status big --json | jq .daemon.backup.bitmap_bytes)
kill -INT $BK 2>/dev/null || true; wait $BK 2>/dev/null || true
"$CTL" detach big --force >/dev/null 2>&1

r() { python3 -c "import sys; print(f'{float(sys.argv[1])/float(sys.argv[2]):.2f}')" "$1" "$2"; }
echo "# load average $(cut -d' ' -f1-3 /proc/loadavg) at the end"
cat <<TXT
| figure | cowsnap | peer | ratio | target |
|---|---|---|---|---|
| idle ${MIB} MiB disk → raw image, s (incl. fsync; median of 3: ${BKS[*]}) | $BK_S | cp + sync $CP_S (${CPS[*]}) | $(r "$CP_S" "$BK_S")× cp's speed | ≥ 0.9× |
| 4k randwrite QD32 IOPS, pass-through (whole ${SECS} s) | $PASS | | | |
| same, during a backup (backup window only) | $DURING | pass-through $PASS | $(r "$DURING" "$PASS")× | ≥ 0.5× |
| same, vs QEMU blockdev-backup + copy-before-write | $DURING | qemu-storage-daemon $PEER | $(r "$DURING" "$PEER")× | ≥ 1.2× |
| backup duration under that load, s (ended within fio's run?) | $DBK_S ($D_IN) | qemu $PEER_S ($P_IN) | | |
| cowsnap: chunks preserved / writes held / throttled / container high-water | $PRES / $HOLDS / $THR / $HW | | | |
| daemon RSS, 16 TiB sparse disk: idle / backup running (peak), KiB | $RSS_IDLE / $RSS_BK ($HWM) | | | |
| 16 TiB: chunk-map bitmaps, bytes; time to "running", ms | $BMAP; $START_MS | | | |
TXT
