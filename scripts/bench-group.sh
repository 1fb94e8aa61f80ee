#!/usr/bin/env bash
# Consistency-group pause benchmark: how long writes stop for one snapshot instant
# across N disks, with writers running on every disk.
#   For N in DISK_COUNTS: N file-backed 256 MiB disks (`--via none`), one fio writer per
#   disk (nbd engine, 4k randwrite, QD8), then RUNS group backups of all N disks into one
#   repository (the first full, the rest incremental). Per backup: the longest pause any
#   daemon reports (`instant_pause_us`: from "no data-changing request in flight" to the
#   installed snapshot, which includes waiting for the other disks) and the
#   coordinator's bound (from sending group_pause to the last group_go reply: no disk
#   is paused outside it) and wall time for the whole command. A one-disk backup of the same disks
#   (`backup NAME` into a repository of its own, no group) is the reference, in the same run.
# Usage: scripts/bench-group.sh [RUNS (5)] [DISK_COUNTS ("2 8")]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${COWSNAP_BIN_DIR:-$ROOT/target/release}; CTL=$BIN/cowsnapctl
RUNS=${1:-5}; COUNTS=${2:-"2 8"}
for c in fio jq python3; do
  command -v "$c" >/dev/null || { echo "bench-group: $c is not installed"; exit 1; }
done
W=$(mktemp -d /var/tmp/cowsnap-bench-group.XXXXXX)
export COWSNAP_RUN_DIR=$W/run COWSNAP_STATE_DIR=$W/state
FIOS=()
cleanup() { set +e
  for p in "${FIOS[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  for f in "$COWSNAP_RUN_DIR"/*.ctl; do [ -e "$f" ] && "$CTL" detach --force "$(basename "$f" .ctl)" >/dev/null 2>&1; done
  rm -rf "$W"; }
trap cleanup EXIT
stats() { python3 -c '
import sys, statistics
v = [float(x) for x in sys.argv[1:]]
print("median %.2f  max %.2f" % (statistics.median(v), max(v)))' "$@"; }

echo "# bench-group: $RUNS runs per size, $(nproc) CPUs, $(uname -r)"
for n in $COUNTS; do
  names=()
  for i in $(seq 1 "$n"); do
    truncate -s 256M "$W/d$n-$i.img"
    uri=$("$CTL" attach "$W/d$n-$i.img" --name "d$n-$i" --via none | tail -n 1)
    names+=("d$n-$i")
    fio --name=w --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=8 \
      --time_based --runtime=3600 --size=256M >/dev/null 2>&1 &
    FIOS+=($!)
  done
  sleep 2
  pauses=(); bounds=(); walls=(); single=()
  for r in $(seq 1 "$RUNS"); do
    inc=(); [ "$r" -gt 1 ] && inc=(--incremental)
    t0=$(date +%s%N)
    out=$("$CTL" backup "${names[@]}" --to "repo:$W/repo$n" "${inc[@]}" --json | tail -n 1)
    t1=$(date +%s%N)
    [ "$(jq -r .ok <<<"$out")" = true ] || { echo "group backup failed: $out"; exit 1; }
    pauses+=("$(jq -r '.pause_us / 1000' <<<"$out")")
    bounds+=("$(jq -r '.pause_bound_us / 1000' <<<"$out")")
    walls+=("$(( (t1 - t0) / 1000000 ))")
    # the reference: one disk alone, same load
    s=$("$CTL" backup "${names[0]}" --to "repo:$W/single$n" "${inc[@]}" --quiesce-idle 0 --json | tail -n 1)
    single+=("$(jq -r '.instant_pause_us / 1000' <<<"$s")")
  done
  echo "N=$n disks, writers on all: group pause ms: $(stats "${pauses[@]}")  (runs: ${pauses[*]})"
  echo "N=$n: pause bound seen by the coordinator ms: $(stats "${bounds[@]}")"
  echo "N=$n: group command wall ms: $(stats "${walls[@]}")"
  echo "N=$n: one-disk backup pause ms (reference): $(stats "${single[@]}")"
  for p in "${FIOS[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null || true
  FIOS=()
  for nm in "${names[@]}"; do "$CTL" detach "$nm" >/dev/null; done
done
