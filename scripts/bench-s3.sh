#!/usr/bin/env bash
# S3 repository against a directory repository, same run, same machine: an idle disk
# (per 1 MiB region ~1/3 zeros, ~1/3 text, ~1/3 random, as scripts/bench-repo.sh) backed
# up in full into repo:DIR (/var/tmp) and into repo:s3://… on a local radosgw
# (scripts/s3-server.sh: single-node Ceph, BlueStore on a sparse file in /var/tmp), then
# each restored offline (cowsnapctl restore, fsynced) to a file. Page cache dropped
# before each timed step. Wall-clock times of the whole cowsnapctl command.
# Usage: scripts/bench-s3.sh [SIZE_MIB (1024)]
#        scripts/bench-s3.sh --writers N [DISK_MIB (64)]
#   N disks of DISK_MIB, similar (one random base, 1/8 of each its own random data),
#   each attached to its own daemon, backed up in full into one bucket: all N at once,
#   against the same N one after another into another bucket (the peer). Reports the
#   aggregate throughput of each and their ratio, the dedup ratio (disk bytes / chunk
#   bytes in the bucket) and S3 requests per GiB of disk (radosgw's own request counter,
#   its admin socket's perf dump).
set -euo pipefail
if [ "${1:-}" = --writers ]; then
  exec bash "$(dirname "$0")/bench-s3-writers.sh" "${@:2}"
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${COWSNAP_BIN_DIR:-$ROOT/target/release}; CTL=$BIN/cowsnapctl
PY=/usr/bin/python3
MIB=${1:-1024}
W=$(mktemp -d /var/tmp/cowsnap-bench-s3.XXXXXX)
export COWSNAP_RUN_DIR=$W/run COWSNAP_STATE_DIR=$W/state
export COWSNAP_S3_DIR=$W/s3 COWSNAP_S3_PORT=${COWSNAP_BENCH_S3_PORT:-17495} COWSNAP_S3_MON_PORT=${COWSNAP_BENCH_S3_MON_PORT:-13315}
S3=$ROOT/scripts/s3-server.sh
cleanup() { set +e; "$CTL" detach bs3 --force >/dev/null 2>&1; bash "$S3" stop >/dev/null 2>&1; rm -rf "$W"; }
trap cleanup EXIT
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
calc() { $PY -c "print(round($1, ${2:-2}))"; }

echo "# $(date -u +%F) $(nproc) vCPU (shared), $(free -g | awk '/Mem/ {print $2}') GiB RAM, kernel $(uname -r); disk $MIB MiB; load $(cut -d' ' -f1-3 /proc/loadavg)"
$PY "$ROOT/scripts/mixed-disk.py" "$W/src.img" "$MIB"
bash "$S3" start
eval "$(bash "$S3" env)"
bash "$S3" mb bench
"$CTL" attach "$W/src.img" --name bs3 --via none >/dev/null
SUM=$(sha256sum "$W/src.img" | cut -d' ' -f1)

declare -A BK RS
for kind in dir s3; do
  case $kind in dir) repo=repo:$W/repo ;; s3) repo=repo:s3://bench/r ;; esac
  drop; t0=$(now)
  "$CTL" backup bs3 --to "$repo" --quiesce-idle 0 >/dev/null
  BK[$kind]=$(calc "$(now) - $t0")
  drop; t0=$(now)
  "$CTL" restore "$repo" --to "$W/r-$kind.img" >/dev/null
  RS[$kind]=$(calc "$(now) - $t0")
  [ "$(sha256sum "$W/r-$kind.img" | cut -d' ' -f1)" = "$SUM" ] || { echo "restore from $kind differs"; exit 1; }
  rm -f "$W/r-$kind.img"
  echo "$kind: full backup ${BK[$kind]} s ($(calc "$MIB / ${BK[$kind]}" 0) MiB/s), restore ${RS[$kind]} s ($(calc "$MIB / ${RS[$kind]}" 0) MiB/s)"
done
echo "s3/dir time: backup $(calc "${BK[s3]} / ${BK[dir]}") x, restore $(calc "${RS[s3]} / ${RS[dir]}") x"
