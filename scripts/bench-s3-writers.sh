#!/usr/bin/env bash
# Many writers, one bucket (see scripts/bench-s3.sh --writers): N similar disks backed up
# in full at once into repo:s3://many/r, against the same N one after another into
# repo:s3://seq/r (the peer, same store, same run). Page cache dropped before each timed
# step. Wall-clock time of all backups; requests from radosgw's perf counter rgw.req.
# A backup that PUT new chunks soon after its listing of chunks/ waits before its commit
# (rule W3 of repo::gc: 8 s with the default grace period), so small disks one after
# another pay it N times. (A smaller grace period, COWSNAP_REPO_GC_GRACE in the
# environment, shortens the wait but also the time a backup has to publish, G/4: with
# 4 s, backups on this loaded 2-vCPU machine overran it and were unpublished.)
# Ports: COWSNAP_BENCH_S3_PORT / COWSNAP_BENCH_S3_MON_PORT (defaults 17495 / 13315).
# Usage: scripts/bench-s3-writers.sh [N (16)] [DISK_MIB (64)]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${COWSNAP_BIN_DIR:-$ROOT/target/release}; CTL=$BIN/cowsnapctl
PY=/usr/bin/python3
N=${1:-16}
MIB=${2:-64}
[ "$N" -ge 1 ] && [ "$N" -le 64 ] || { echo "N must be 1 to 64"; exit 2; }
[ "$MIB" -ge 8 ] && [ "$MIB" -le 4096 ] || { echo "DISK_MIB must be 8 to 4096"; exit 2; }
W=$(mktemp -d /var/tmp/cowsnap-bench-s3w.XXXXXX)
export COWSNAP_RUN_DIR=$W/run COWSNAP_STATE_DIR=$W/state
export COWSNAP_S3_DIR=$W/s3 COWSNAP_S3_PORT=${COWSNAP_BENCH_S3_PORT:-17495} COWSNAP_S3_MON_PORT=${COWSNAP_BENCH_S3_MON_PORT:-13315}
S3=$ROOT/scripts/s3-server.sh
cleanup() {
  set +e
  for i in $(seq "$N"); do "$CTL" detach "w$i" --force >/dev/null 2>&1; done
  bash "$S3" stop >/dev/null 2>&1; rm -rf "$W"
}
trap cleanup EXIT
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
calc() { $PY -c "print(round($1, ${2:-2}))"; }
reqs() { ceph --admin-daemon "$COWSNAP_S3_DIR/run/client.rgw.cowsnap.asok" perf dump | $PY -c 'import json,sys; print(json.load(sys.stdin)["rgw"]["req"])'; }
# bucket_bytes BUCKET: bytes of the chunk objects in BUCKET (repository prefix r)
bucket_bytes() { $PY "$ROOT/scripts/s3-chunk-objects.py" "$1" r | cut -d' ' -f2; }

echo "# $(date -u +%F) $(nproc) vCPU (shared), $(free -g | awk '/Mem/ {print $2}') GiB RAM, kernel $(uname -r); $N disks of $MIB MiB; grace ${COWSNAP_REPO_GC_GRACE:-1 day}; load $(cut -d' ' -f1-3 /proc/loadavg)"
head -c $((MIB << 20)) /dev/urandom >"$W/base.img"
for i in $(seq "$N"); do
  cp "$W/base.img" "$W/w$i.img"
  own=$((MIB / 8))
  head -c $((own << 20)) /dev/urandom | dd of="$W/w$i.img" bs=1M seek=$(( (i * own) % (MIB - own + 1) )) conv=notrunc status=none
done
bash "$S3" start
eval "$(bash "$S3" env)"
bash "$S3" mb many; bash "$S3" mb seq
for i in $(seq "$N"); do "$CTL" attach "$W/w$i.img" --name "w$i" --via none >/dev/null; done
GIB=$(calc "$N * $MIB / 1024" 4)

declare -A T R
for mode in seq many; do
  repo=repo:s3://$mode/r
  drop; r0=$(reqs); t0=$(now)
  if [ $mode = seq ]; then
    for i in $(seq "$N"); do "$CTL" backup "w$i" --to "$repo" --quiesce-idle 0 >/dev/null; done
  else
    pids=()
    for i in $(seq "$N"); do "$CTL" backup "w$i" --to "$repo" --quiesce-idle 0 >"$W/bk$i.out" 2>&1 & pids+=($!); done
    for p in "${pids[@]}"; do wait "$p" || { echo "a concurrent backup failed"; cat "$W"/bk*.out; exit 1; }; done
  fi
  T[$mode]=$(calc "$(now) - $t0")
  R[$mode]=$(( $(reqs) - r0 ))
  stored=$(bucket_bytes "$mode")
  echo "$mode: $N full backups in ${T[$mode]} s, aggregate $(calc "$N * $MIB / ${T[$mode]}" 1) MiB/s; dedup $(calc "$N * $MIB * 1048576 / $stored") x ($(calc "$stored / 1048576" 0) MiB of chunks for $((N * MIB)) MiB of disks); $(calc "${R[$mode]} / $GIB" 0) requests/GiB"
done
echo "many/seq aggregate throughput: $(calc "${T[seq]} / ${T[many]}") x"
"$CTL" verify repo:s3://many/r >/dev/null && echo "verify many: ok"
