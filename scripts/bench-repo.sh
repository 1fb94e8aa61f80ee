#!/usr/bin/env bash
# Repository benchmark, all figures from one run on one machine:
#  1. full backup of an idle 1 GiB disk (a mix of zeros, text and random data, 1 MiB
#     regions) into repo:DIR
#  2. incremental backup after 1% of the 1 MiB regions changed, vs the full (target <= 3%)
#  3. offline restore (cowsnapctl restore, fsynced) vs `cp` + sync of the raw image
#  4. repository size after 3 generations (full + 2 incrementals of 1%) vs 3 raw images
# Page cache dropped before each timed step. Wall-clock times are of the whole
# cowsnapctl command (it polls the daemon every 250 ms); "daemon" times are the
# generation's own duration_ms.
# Usage: scripts/bench-repo.sh [SIZE_MIB (1024)]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${COWSNAP_BIN_DIR:-$ROOT/target/release}; CTL=$BIN/cowsnapctl
PY=/usr/bin/python3
MIB=${1:-1024}
W=$(mktemp -d /var/tmp/cowsnap-bench-repo.XXXXXX)
export COWSNAP_RUN_DIR=$W/run COWSNAP_STATE_DIR=$W/state
cleanup() { set +e; "$CTL" detach brepo --force >/dev/null 2>&1; rm -rf "$W"; }
trap cleanup EXIT
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
calc() { $PY -c "print(round($1, ${2:-2}))"; }

echo "# $(date -u +%F) $(nproc) vCPU (shared), $(free -g | awk '/Mem/ {print $2}') GiB RAM, kernel $(uname -r); disk $MIB MiB"

# The disk: per 1 MiB region, ~1/3 zeros, ~1/3 text (words, compressible, not
# repeating), ~1/3 random.
$PY "$ROOT/scripts/mixed-disk.py" "$W/src.img" "$MIB"
SIZE=$(stat -c %s "$W/src.img")

# changed N SEED: change N random 1 MiB regions through the export (random data)
changed() {
  $PY - "$URI" "$1" "$2" <<'PY'
import nbd, random, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
rng = random.Random(int(sys.argv[3]))
for i in rng.sample(range(h.get_size() >> 20), int(sys.argv[2])):
    h.pwrite(rng.randbytes(1 << 20), i << 20)
h.flush(); h.shutdown()
PY
}
backup() { # backup ARGS...: sets S (wall seconds) and G (generation id)
  drop; local t0 t1; t0=$(now)
  "$CTL" backup brepo --to "repo:$W/repo" --quiesce-idle 0s --json "$@" >"$W/bk.json"
  t1=$(now); G=$(tail -n1 "$W/bk.json" | jq -r .generation)
  S=$(calc "$t1 - $t0" 3)
}
gstat() { "$CTL" list "repo:$W/repo" --json | jq -r "[.[] | select(.id == \"$G\")][0].stats.$1"; }

URI=$("$CTL" attach "$W/src.img" --via none --name brepo | tail -n1)
backup; FULL_S=$S; FULL_D=$(gstat duration_ms); FULL_R=$(gstat bytes_read)
NCH=$(( (SIZE >> 20) / 100 )); [ "$NCH" -ge 1 ] || NCH=1
changed "$NCH" 1
backup --incremental; INC_S=$S; INC_D=$(gstat duration_ms); INC_R=$(gstat bytes_read)
grep -q "full read" "$W/bk.json" && { echo "incremental fell back to a full read"; exit 1; }
changed "$NCH" 2
backup --incremental; INC2_S=$S
"$CTL" detach brepo >/dev/null

# restore vs cp (both end with the data on disk: restore fsyncs, cp is followed by sync)
drop; t0=$(now); cp --sparse=never "$W/src.img" "$W/cp.img"; sync "$W/cp.img"; t1=$(now)
CP_S=$(calc "$t1 - $t0" 3)
rm -f "$W/cp.img"
drop; t0=$(now); "$CTL" restore "repo:$W/repo@$G" --to "$W/restored.img" >/dev/null; t1=$(now)
RS_S=$(calc "$t1 - $t0" 3)
cmp "$W/src.img" "$W/restored.img" || { echo "restored image differs from the disk"; exit 1; }
rm -f "$W/restored.img"

REPO_B=$(du -sb "$W/repo" | cut -f1); REPO_A=$(( $(du -sk "$W/repo" | cut -f1) * 1024 ))
RAW3=$((3 * SIZE)); RAW_A=$(( 3 * $(du -sk "$W/src.img" | cut -f1) * 1024 ))
MIBS() { calc "$SIZE / 1048576 / $1" 0; }

cat <<EOF2

| measurement | value |
|---|---|
| full backup, wall (daemon) | ${FULL_S} s (${FULL_D} ms), $(MIBS "$FULL_S") MiB/s, read $((FULL_R >> 20)) MiB |
| incremental, $NCH of $((SIZE >> 20)) regions changed, wall (daemon) | ${INC_S} s (${INC_D} ms), read $((INC_R >> 20)) MiB |
| incremental / full, wall | $(calc "100 * $INC_S / $FULL_S" 1) % |
| incremental / full, daemon | $(calc "100 * $INC_D / max($FULL_D, 1)" 1) % |
| incremental / full, bytes read | $(calc "100 * $INC_R / $FULL_R" 1) % |
| second incremental, wall | ${INC2_S} s |
| restore (fsynced) | ${RS_S} s, $(MIBS "$RS_S") MiB/s |
| cp + sync of the raw image | ${CP_S} s, $(MIBS "$CP_S") MiB/s |
| restore / cp throughput | $(calc "$CP_S / $RS_S" 2) x |
| repository after 3 generations (apparent / allocated) | $((REPO_B >> 20)) MiB / $((REPO_A >> 20)) MiB |
| 3 raw images (apparent / allocated) | $((RAW3 >> 20)) MiB / $((RAW_A >> 20)) MiB |
| repository / 3 raw images (apparent) | $(calc "100 * $REPO_B / $RAW3" 1) % |
EOF2
