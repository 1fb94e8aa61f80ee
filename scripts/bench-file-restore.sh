#!/usr/bin/env bash
# Bytes read from the repository to get one file back, and the cost of `diff`:
#  - a sparse disk of SIZE_GIB (default 100) attached --via fuse, ext4 made with lazy
#    inode tables (the free space stays unwritten), a BIG_MIB (default 256) file, a
#    10 MiB file and 100 small ones, a full backup (1 MiB chunks);
#  - `cowsnapctl mount` of the generation, the export's counters
#    (`status --json` → .daemon.export.stats.{chunks,bytes}_fetched) before and after
#    `cp` of the 10 MiB file, and the chunks its extents lie in (filefrag -e);
#  - the 10 MiB file rewritten, an incremental backup, then the time of `diff`
#    (indexes only) and of `diff --files` (both generations mounted and walked).
# Usage: scripts/bench-file-restore.sh [SIZE_GIB (100)] [BIG_MIB (256)]
# Needs root, FUSE, nbdfuse, mkfs.ext4, filefrag, jq. Prints MEASURE lines.
. "$(dirname "$0")/../tests/lib.sh"
need_root; need_fuse; need mkfs.ext4 filefrag
GIB=${1:-100}; BIG=${2:-256}
REPO=$T/repo
mkdir -p "$T/m" "$T/g"
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }

truncate -s "${GIB}G" "$T/disk.img"
dev=$(ctl attach "$T/disk.img" --name bf --via fuse | tail -n 1) || fail "attach"
mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1,nodiscard "$dev" || fail "mkfs.ext4"
mount -o noinit_itable "$dev" "$T/m" || fail "mount"; track_mount "$T/m"
head -c $((BIG << 20)) /dev/urandom > "$T/m/big.bin"
head -c $((10 << 20)) /dev/urandom > "$T/m/ten.bin"
mkdir "$T/m/d"; for i in $(seq 100); do echo "f $i $RANDOM" > "$T/m/d/f$i"; done
sum=$(sha256sum < "$T/m/ten.bin")
umount "$T/m" || fail "umount"
t=$(now); g1=$(backup_gen bf --to "repo:$REPO") || fail "backup"
log "MEASURE: full backup of the ${GIB} GiB disk (${BIG} MiB + 10 MiB of files): $(since "$t") s, $(ctl list "repo:$REPO" --json | jq -c ".[] | select(.id == \"$g1\") | .stats | {bytes_read, chunks_written, chunks_zero}")"

out=$(ctl mount "repo:$REPO@$g1" "$T/g" --name bfm --via fuse 2>&1) || fail "mount: $out"
st() { ctl status bfm --json | jq ".daemon.export.stats.$1"; }
c0=$(st chunks_fetched); b0=$(st bytes_fetched)
cp "$T/g/ten.bin" "$T/ten.copy" || fail "cp"
c1=$(st chunks_fetched); b1=$(st bytes_fetched)
[ "$(sha256sum < "$T/ten.copy")" = "$sum" ] || fail "the copy differs"
fc=$(filefrag -e "$T/g/ten.bin" | awk -F'[:.]+' '/^ *[0-9]+:/ { for (b = $4; b <= $5; b++) c[int(b * 4096 / 1048576)] = 1 } END { print length(c) }')
log "MEASURE: mount read $b0 bytes ($c0 chunks); cp of the 10 MiB file read $((b1 - b0)) bytes ($((c1 - c0)) chunks); its extents lie in $fc chunks; disk ${GIB} GiB"
ctl umount "$T/g" >/dev/null || fail "umount"

mount -o noinit_itable "$dev" "$T/m" || fail "mount 2"
head -c $((10 << 20)) /dev/urandom > "$T/m/ten.bin"
umount "$T/m" || fail "umount 2"
g2=$(backup_gen bf --to "repo:$REPO" --incremental) || fail "incremental"
t=$(now); out=$(ctl diff "repo:$REPO@$g1" "repo:$REPO@$g2" --json) || fail "diff: $out"
log "MEASURE: diff (indexes, $(stat -c %s "$REPO/generations/$g1.idx") bytes each): $(since "$t") s, $(echo "$out" | jq -c '{changed_bytes, ranges: (.ranges | length)}')"
t=$(now); out=$(ctl diff "repo:$REPO@$g1" "repo:$REPO@$g2" --files --json 2>/dev/null) || fail "diff --files: $out"
log "MEASURE: diff --files: $(since "$t") s, $(echo "$out" | jq -c '[.files.files[] | {path, status}]')"
ctl detach bf >/dev/null || fail "detach"
log "done"
