#!/usr/bin/env bash
# Per-object overhead on an object store: one radosgw (scripts/s3-server.sh), one run.
# The same disk (per 1 MiB region ~1/3 zeros, ~1/3 text, ~1/3 random, as
# scripts/bench-repo.sh) backed up in full into a directory repository (1 MiB chunks,
# the reference) and into s3 repositories created with different chunk sizes
# (COWSNAP_REPO_CHUNK_SIZE in the environment of the backup that creates the
# repository), each then restored offline (checked against the disk), then 1 % of the
# disk changed in scattered 4 KiB writes (through the daemon) and backed up
# incrementally. Reported per repository: wall time of each command, S3 requests
# (radosgw's own counter rgw.req) per GiB of disk, chunk objects and bytes stored.
# Then an ext4 file system with a mix of real files (from /usr) backed up in full into
# each s3 repository: how many chunk objects are small (< 64 KiB) and their share of
# the bytes. Page cache dropped before each timed step.
# Usage: scripts/bench-s3-objsize.sh [DISK_MIB (512)] [EXT4_MIB (256)] [CHUNK_SIZES ("256K 1M 4M")]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${COWSNAP_BIN_DIR:-$ROOT/target/release}; CTL=$BIN/cowsnapctl
PY=/usr/bin/python3
MIB=${1:-512}
EXT_MIB=${2:-256}
SIZES=${3:-256K 1M 4M}
[ "$MIB" -ge 16 ] && [ "$MIB" -le 8192 ] || { echo "DISK_MIB must be 16 to 8192"; exit 2; }
[ "$EXT_MIB" -ge 32 ] && [ "$EXT_MIB" -le 4096 ] || { echo "EXT4_MIB must be 32 to 4096"; exit 2; }
W=$(mktemp -d /var/tmp/cowsnap-bench-s3o.XXXXXX)
export COWSNAP_RUN_DIR=$W/run COWSNAP_STATE_DIR=$W/state
export COWSNAP_S3_DIR=$W/s3 COWSNAP_S3_PORT=${COWSNAP_BENCH_S3_PORT:-17495} COWSNAP_S3_MON_PORT=${COWSNAP_BENCH_S3_MON_PORT:-13315}
unset COWSNAP_REPO_CHUNK_SIZE
S3=$ROOT/scripts/s3-server.sh
cleanup() {
  set +e
  "$CTL" detach obj --force >/dev/null 2>&1; "$CTL" detach objext --force >/dev/null 2>&1
  bash "$S3" stop >/dev/null 2>&1; rm -rf "$W"
}
trap cleanup EXIT
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
calc() { $PY -c "print(round($1, ${2:-2}))"; }
reqs() { ceph --admin-daemon "$COWSNAP_S3_DIR/run/client.rgw.cowsnap.asok" perf dump | $PY -c 'import json,sys; print(json.load(sys.stdin)["rgw"]["req"])'; }
# objects BUCKET PREFIX: "count bytes small small_bytes" of the chunk objects (small: < 64 KiB)
objects() { $PY "$ROOT/scripts/s3-chunk-objects.py" "$1" "$2"; }
# dir_objects DIR: the same for a directory repository
dir_objects() {
  find "$1/chunks" -type f -printf '%s\n' | $PY -c 'import sys; s=[int(x) for x in sys.stdin]; m=[x for x in s if x < 65536]; print(len(s), sum(s), len(m), sum(m))'
}

echo "# $(date -u +%F) $(nproc) vCPU (shared), $(free -g | awk '/Mem/ {print $2}') GiB RAM, kernel $(uname -r); disk $MIB MiB, ext4 $EXT_MIB MiB; load $(cut -d' ' -f1-3 /proc/loadavg)"
$PY "$ROOT/scripts/mixed-disk.py" "$W/src.img" "$MIB"
SUM=$(sha256sum "$W/src.img" | cut -d' ' -f1)
# The ext4 disk: files from /usr (documentation, libraries, Python, man pages: small
# text files, binaries, already compressed .gz), in a fixed order, to 60 % full.
mkdir "$W/tree"
$PY - "$W/tree" "$EXT_MIB" <<'PY'
import os, shutil, sys
dst, budget = sys.argv[1], int(sys.argv[2]) * (1 << 20) * 6 // 10
used = 0
for top in ["/usr/share/doc", "/usr/share/man", "/usr/lib/python3", "/usr/lib/x86_64-linux-gnu", "/usr/share", "/usr/bin"]:
    for d, dirs, files in os.walk(top):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(d, f)
            if not os.path.isfile(p) or os.path.islink(p):
                continue
            n = os.path.getsize(p)
            if used + n > budget:
                continue
            q = os.path.join(dst, p.lstrip("/"))
            if os.path.exists(q):
                continue
            os.makedirs(os.path.dirname(q), exist_ok=True)
            try:
                shutil.copyfile(p, q)
            except OSError:
                continue
            used += n
print(f"ext4 tree: {used >> 20} MiB of files", file=sys.stderr)
PY
truncate -s "${EXT_MIB}M" "$W/ext4.img"
mkfs.ext4 -q -F -d "$W/tree" "$W/ext4.img"
rm -rf "$W/tree"

bash "$S3" start >/dev/null
eval "$(bash "$S3" env)"
GIB=$(calc "$MIB / 1024" 4)
NW=$(( (MIB << 20) / 100 / 4096 )) # 4 KiB writes: 1 % of the disk

# change URI SEED: NW 4 KiB writes of random data at random 4 KiB offsets
change() {
  $PY - "$1" "$NW" "$2" <<'PY'
import nbd, random, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
rng = random.Random(int(sys.argv[3]))
blocks = h.get_size() >> 12
for b in rng.sample(range(blocks), int(sys.argv[2])):
    h.pwrite(rng.randbytes(4096), b << 12)
h.flush(); h.shutdown()
PY
}

echo "| repository | chunk | full backup s | backup req/GiB | restore s | restore req/GiB | objects | stored MiB | incremental s | incr req | incr new MiB |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
declare -A EXT
for cfg in dir $SIZES; do
  if [ "$cfg" = dir ]; then
    repo=repo:$W/repo; cs=1M; env_cs=()
  else
    b=c$(echo "$cfg" | tr 'A-Z' 'a-z'); bash "$S3" mb "$b" >/dev/null
    repo=repo:s3://$b/r; cs=$cfg; env_cs=(env "COWSNAP_REPO_CHUNK_SIZE=$cfg")
  fi
  cp "$W/src.img" "$W/d.img"
  URI=$("${env_cs[@]}" "$CTL" attach "$W/d.img" --name obj --via none 2>/dev/null | tail -n1)
  drop; r0=$(reqs); t0=$(now)
  "$CTL" backup obj --to "$repo" --quiesce-idle 0 >/dev/null
  BK=$(calc "$(now) - $t0"); BR=$(( $(reqs) - r0 ))
  if [ "$cfg" = dir ]; then read -r NO NB _ _ < <(dir_objects "$W/repo"); else read -r NO NB _ _ < <(objects "$b" r); fi
  drop; r0=$(reqs); t0=$(now)
  "$CTL" restore "$repo" --to "$W/r.img" >/dev/null
  RS=$(calc "$(now) - $t0"); RR=$(( $(reqs) - r0 ))
  [ "$(sha256sum "$W/r.img" | cut -d' ' -f1)" = "$SUM" ] || { echo "restore from $cfg differs"; exit 1; }
  rm -f "$W/r.img"
  change "$URI" 7
  drop; r0=$(reqs); t0=$(now)
  "$CTL" backup obj --to "$repo" --quiesce-idle 0 --incremental --json >"$W/inc.json"
  IS=$(calc "$(now) - $t0"); IR=$(( $(reqs) - r0 ))
  grep -q "full read" "$W/inc.json" && { echo "incremental into $cfg fell back to a full read"; exit 1; }
  if [ "$cfg" = dir ]; then read -r _ NB2 _ _ < <(dir_objects "$W/repo"); else read -r _ NB2 _ _ < <(objects "$b" r); fi
  "$CTL" detach obj >/dev/null 2>&1
  kind=$([ "$cfg" = dir ] && echo directory || echo s3)
  echo "| $kind | $cs | $BK | $([ "$cfg" = dir ] && echo - || calc "$BR / $GIB" 0) | $RS | $([ "$cfg" = dir ] && echo - || calc "$RR / $GIB" 0) | $NO | $(calc "$NB / 1048576" 1) | $IS | $([ "$cfg" = dir ] && echo - || echo "$IR") | $(calc "($NB2 - $NB) / 1048576" 1) |"
  [ "$cfg" = dir ] && continue
  # the ext4 disk into the same repository, another prefix
  "${env_cs[@]}" "$CTL" attach "$W/ext4.img" --name objext --via none >/dev/null 2>&1
  "$CTL" backup objext --to "repo:s3://$b/ext" --quiesce-idle 0 >/dev/null
  "$CTL" detach objext >/dev/null 2>&1
  EXT[$cfg]=$(objects "$b" ext)
done
echo
echo "ext4 ($EXT_MIB MiB, 60 % files from /usr), chunk objects after one full backup:"
echo "| chunk | objects | stored MiB | objects < 64 KiB | share of objects (= of PUTs and GETs) | their share of bytes |"
echo "|---|---|---|---|---|---|"
for cfg in $SIZES; do
  read -r n by sm smb <<<"${EXT[$cfg]}"
  echo "| $cfg | $n | $(calc "$by / 1048576" 1) | $sm | $(calc "100 * $sm / max($n, 1)" 1) % | $(calc "100 * $smb / max($by, 1)" 1) % |"
done
echo "load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
