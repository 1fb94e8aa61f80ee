#!/usr/bin/env bash
# Backup benchmark, all figures from one run on one machine:
#  1. backup of an idle 1 GiB disk (random data) to a raw image vs `cp` + sync of the same file
#  2. fio 4k randwrite QD32 IOPS over the NBD socket: pass-through, during a cowsnap backup,
#     and during QEMU's own online backup (qemu-storage-daemon blockdev-backup with
#     copy-before-write, ../shared/peers/qemu-backup.sh) of the same file
#  3. daemon memory (VmRSS / VmHWM) for a 16 TiB sparse disk, idle and with a backup running
# Usage: scripts/bench-backup.sh [SIZE_MIB (1024)] [FIO_SECONDS (20)]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${COWSNAP_BIN_DIR:-$ROOT/target/release}; CTL=$BIN/cowsnapctl
PEER=${COWSNAP_QEMU_PEER:-$ROOT/../shared/peers/qemu-backup.sh}
MIB=${1:-1024}; SECS=${2:-20}
W=$(mktemp -d /var/tmp/cowsnap-bench.XXXXXX)
export COWSNAP_RUN_DIR=$W/run COWSNAP_STATE_DIR=$W/state
cleanup() { set +e; for n in bsrc big; do "$CTL" detach "$n" --force >/dev/null 2>&1; done
  mountpoint -q "$W/tmpfs" && umount "$W/tmpfs"; rm -rf "$W"; }
trap cleanup EXIT
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
num() { python3 -c "import sys; print(round(float(sys.argv[1]) $2, 3))" "$1"; }

echo "# $(date -u +%F) $(nproc) vCPU, $(free -g | awk '/Mem/ {print $2}') GiB, kernel $(uname -r); disk $MIB MiB; fio ${SECS}s"
head -c $((MIB << 20)) /dev/urandom >"$W/src.img"
drop; t0=$(now); cp --sparse=never "$W/src.img" "$W/cp.img"; sync "$W/cp.img"; t1=$(now)
CP_S=$(num "$t1 - $t0" "")
rm -f "$W/cp.img"

URI=$("$CTL" attach "$W/src.img" --via none --name bsrc | tail -n1)
drop; t0=$(now); "$CTL" backup bsrc --to "file:$W/img" --quiesce-idle 0s --json >"$W/idle.json"; t1=$(now)
BK_S=$(num "$t1 - $t0" "")
cmp "$W/src.img" "$W/img" || { echo "image differs from the idle disk"; exit 1; }
rm -f "$W/img"

fiojob() { fio --name=load --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=32 \
  --time_based --runtime="$SECS" --output-format=json --output="$1" >/dev/null; }
fiojob "$W/pass.json"
PASS=$(jq '.jobs[0].write.iops' "$W/pass.json")
fiojob "$W/during.json" & FIO=$!
sleep 2; t0=$(now)
"$CTL" backup bsrc --to "file:$W/img" --container ram:64M --quiesce-idle 0s --json >"$W/during-bk.json"
t1=$(now); wait $FIO
DURING=$(jq '.jobs[0].write.iops' "$W/during.json"); DBK_S=$(num "$t1 - $t0" "")
STATUS=$("$CTL" status bsrc --json)
HOLDS=$(echo "$STATUS" | jq '.backup.holds // 0'); THR=$(echo "$STATUS" | jq '.backup.throttled_writes // 0')
"$CTL" detach bsrc >/dev/null
rm -f "$W/img"

PEER_JSON=$(bash "$PEER" "$W/src.img" "$W/q.img" 4k "$SECS" | tail -n1)
PEER_IOPS=$(echo "$PEER_JSON" | jq '.fio_write_iops_whole_run'); PEER_S=$(echo "$PEER_JSON" | jq '.backup_s')
rm -f "$W/q.img"

mkdir -p "$W/tmpfs"; mount -t tmpfs -o size=256M tmpfs "$W/tmpfs"; truncate -s 16T "$W/tmpfs/big.img"
"$CTL" attach "$W/tmpfs/big.img" --via none --name big >/dev/null
PID=$("$CTL" status big --json | jq .pid)
RSS_IDLE=$(awk '/VmRSS/ {print $2}' /proc/$PID/status)
"$CTL" backup big --to "file:$W/tmpfs/big-image.img" --quiesce-idle 0s --json >"$W/big.json" 2>&1 & BK=$!
sleep 5
RSS_BK=$(awk '/VmRSS/ {print $2}' /proc/$PID/status); HWM=$(awk '/VmHWM/ {print $2}' /proc/$PID/status)
kill -INT $BK 2>/dev/null; wait $BK 2>/dev/null || true
"$CTL" detach big --force >/dev/null

r() { python3 -c "import sys; print(f'{float(sys.argv[1])/float(sys.argv[2]):.2f}')" "$1" "$2"; }
cat <<TXT
| figure | cowsnap | peer | ratio | target |
|---|---|---|---|---|
| idle ${MIB} MiB disk → raw image (s) | $BK_S | cp+sync $CP_S | $(r "$CP_S" "$BK_S")× speed | ≥ 0.9× |
| 4k randwrite QD32 IOPS, pass-through | $(printf %.0f "$PASS") | | | |
| 4k randwrite QD32 IOPS during a backup (whole ${SECS}s run) | $(printf %.0f "$DURING") | pass-through $(printf %.0f "$PASS") | $(r "$DURING" "$PASS")× | ≥ 0.5× |
| same, vs QEMU blockdev-backup (copy-before-write) | $(printf %.0f "$DURING") | qemu-storage-daemon $(printf %.0f "$PEER_IOPS") | $(r "$DURING" "$PEER_IOPS")× | ≥ 1.2× |
| backup duration under that load (s) | $DBK_S | qemu $PEER_S | | |
| writes held / throttled during it | $HOLDS / $THR | | | |
| daemon RSS, 16 TiB sparse disk, idle / backup running (KiB) | $RSS_IDLE / $RSS_BK (peak $HWM) | | | |
TXT
