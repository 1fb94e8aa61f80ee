#!/usr/bin/env bash
# `cowsnapctl diff` between two restore points, through the real binaries:
# - for ext4 and XFS: a 512 MiB disk (XFS needs 300 MiB) (attach --via fuse, mkfs, files A, C, D and 30
#   small ones), a full backup; then A is overwritten in part, B added, C deleted, D left
#   alone; an incremental backup. `diff GEN1 GEN2` (index only) gives non-empty ranges
#   whose sum is the changed bytes; `diff --files` names A modified, B added, C deleted,
#   and neither D nor a small file; the human form says the same. Nothing is left behind
#   (mounts, mount records, loop devices, export daemons, mount directories).
# - a GPT disk with ext4 in partition 2: `--files --partition 2` names the same changes
#   (extents shifted by the partition's start); without --partition the two partitions
#   leave the files unknown, with the reason.
# - Ctrl-C (SIGINT) during `diff --files` undoes its mounts and exits 130.
# - a disk of random data (no filesystem): `--files` reports the ranges as unknown with
#   the reason, and exits 0.
# - a disk name as GEN picks its newest generation; two disks of one size are compared
#   with a note; --max-files fails the walk and still undoes the mounts.
# - refusals: generations of different disk sizes; a spec without @GEN.
. "$(dirname "$0")/lib.sh"
need_root; need_fuse; need mkfs.ext4 mkfs.xfs mountpoint sfdisk partx
REPO=$T/repo
mkdir -p "$T/m"

loops() { losetup -n -O NAME 2>/dev/null | wc -l; }
no_leftovers() { # what diff --files sets up is gone
  if mount | grep -qF "$COWSNAP_RUN_DIR/diff-"; then fail "a diff mount is left: $(mount | grep -F "$COWSNAP_RUN_DIR")"; fi
  if ls "$COWSNAP_RUN_DIR" | grep -qE '\.mount\.json$|^diff-|^d[0-9]+[ab]-'; then
    fail "diff left files in the run directory: $(ls "$COWSNAP_RUN_DIR")"
  fi
  [ "$(loops)" = "$1" ] || fail "loop devices before diff: $1, after: $(loops): $(losetup -a)"
}

for fs in ext4 xfs; do
  name=${fs}37
  log "$fs: 512 MiB disk, attach --via fuse, mkfs, files A C D and small ones"
  truncate -s 512M "$T/$fs.img"
  dev=$(ctl attach "$T/$fs.img" --name "$name" --via fuse | tail -n 1) || fail "attach $name"
  if [ "$fs" = ext4 ]; then mkfs.ext4 -q -F "$dev" || fail "mkfs.ext4"; else mkfs.xfs -q -f "$dev" || fail "mkfs.xfs"; fi
  mount "$dev" "$T/m" || fail "mount $fs"; track_mount "$T/m"
  head -c $((4 << 20)) /dev/urandom > "$T/m/A"
  head -c $((2 << 20)) /dev/urandom > "$T/m/C"
  head -c $((3 << 20)) /dev/urandom > "$T/m/D"
  mkdir "$T/m/small"; for i in $(seq 30); do echo "$fs $i $RANDOM" > "$T/m/small/f$i"; done
  sync; umount "$T/m" || fail "umount $fs"
  g1=$(backup_gen "$name" --to "repo:$REPO") || fail "backup $name"

  log "$fs: modify A, add B, delete C, leave D; incremental backup"
  mount "$dev" "$T/m" || fail "mount $fs again"
  dd if=/dev/urandom of="$T/m/A" bs=64K seek=16 count=2 conv=notrunc status=none || fail "modify A"
  head -c $((1 << 20)) /dev/urandom > "$T/m/B"
  rm "$T/m/C"
  sync; umount "$T/m" || fail "umount $fs 2"
  g2=$(backup_gen "$name" --to "repo:$REPO" --incremental) || fail "incremental backup $name"
  log "$fs: generations $g1 $g2"

  log "$fs: diff (ranges from the indexes)"
  out=$(ctl diff "repo:$REPO@$g1" "repo:$REPO@$g2" --json) || fail "diff: $out"
  n=$(json_field "$out" '.ranges | length'); sum=$(json_field "$out" '[.ranges[].length] | add')
  [ "$n" -gt 0 ] || fail "no changed ranges: $out"
  [ "$sum" = "$(json_field "$out" .changed_bytes)" ] || fail "ranges sum $sum != changed_bytes: $out"
  [ "$(json_field "$out" .files)" = null ] || fail "files listed without --files"
  log "$fs: $n ranges, $sum bytes changed"
  same=$(ctl diff "repo:$REPO@$g2" "repo:$REPO@$g2" --json) || fail "diff with itself"
  [ "$(json_field "$same" '.ranges | length')" = 0 ] || fail "a generation differs from itself: $same"

  log "$fs: diff --files"
  before=$(loops)
  out=$(ctl diff "repo:$REPO@$g1" "repo:$REPO@$g2" --files --json) || fail "diff --files: $out"
  no_leftovers "$before"
  echo "$out" | jq -c '.files | {known, from_fs, to_fs, files, shared_chunk_files, metadata_or_free_bytes}'
  [ "$(json_field "$out" .files.known)" = true ] || fail "$fs files unknown: $out"
  [ "$(json_field "$out" .files.to_fs.fstype)" = "$fs" ] || fail "fstype: $out"
  st() { json_field "$out" ".files.files[] | select(.path == \"$1\") | .status"; }
  [ "$(st /A)" = modified ] || fail "$fs: A is not reported modified: $out"
  [ "$(st /B)" = added ] || fail "$fs: B is not reported added: $out"
  [ "$(st /C)" = deleted ] || fail "$fs: C is not reported deleted: $out"
  [ -z "$(st /D)" ] || fail "$fs: D is reported $(st /D) but was not touched: $out"
  others=$(json_field "$out" '[.files.files[].path | select(. != "/A" and . != "/B" and . != "/C")] | join(" ")')
  [ -z "$others" ] || fail "$fs: untouched files reported: $others"
  a_bytes=$(json_field "$out" '.files.files[] | select(.path == "/A") | .changed_bytes')
  [ "$a_bytes" -ge $((128 << 10)) ] || fail "$fs: A's changed bytes $a_bytes < the 128 KiB written"
  cb() { json_field "$out" ".files.files[] | select(.path == \"$1\") | .changed_bytes"; }
  [ "$(cb /B)" = $((1 << 20)) ] && [ "$(cb /C)" = $((2 << 20)) ] || fail "$fs: added/deleted sizes: $out"
  [ "$(json_field "$out" '.files.files | map(.path) | . == sort')" = true ] || fail "files not sorted by path"
  human=$(ctl diff "repo:$REPO@$g1" "repo:$REPO@$g2" --files) || fail "diff --files (human): $human"
  echo "$human"
  echo "$human" | grep -qE '^modified .* /A$' || fail "human form lacks A modified"
  echo "$human" | grep -qE '^deleted .* /C$' || fail "human form lacks C deleted"
  echo "$human" | grep -q "metadata or free space" || fail "human form lacks the metadata line"
  no_leftovers "$before"
  ctl detach "$name" >/dev/null || fail "detach $name"
  eval "g1_$fs=$g1; g2_$fs=$g2"
done

log "GPT disk, ext4 in partition 2: extents are shifted by the partition's start"
truncate -s 256M "$T/g.img"
printf 'label: gpt\nsize=16MiB\nsize=200MiB\n' | sfdisk -q "$T/g.img" || fail "sfdisk"
read -r s2 n2 < <(partx -g -r -o START,SECTORS --nr 2 "$T/g.img")
dev=$(ctl attach "$T/g.img" --name g37 --via fuse | tail -n 1) || fail "attach g37"
part() { losetup -f --show -o $((s2 * 512)) --sizelimit $((n2 * 512)) "$dev"; }
lo=$(part) || fail "losetup p2"
mkfs.ext4 -q -F "$lo" || fail "mkfs p2"
mount "$lo" "$T/m" || fail "mount p2"
head -c $((2 << 20)) /dev/urandom > "$T/m/A"; head -c $((1 << 20)) /dev/urandom > "$T/m/C"
head -c $((1 << 20)) /dev/urandom > "$T/m/D"
sync; umount "$T/m"; losetup -d "$lo"
gp1=$(backup_gen g37 --to "repo:$REPO") || fail "backup g37"
lo=$(part) || fail "losetup p2 again"
mount "$lo" "$T/m" || fail "mount p2 again"
dd if=/dev/urandom of="$T/m/A" bs=64K seek=8 count=1 conv=notrunc status=none || fail "modify A"
head -c $((1 << 20)) /dev/urandom > "$T/m/B"; rm "$T/m/C"
sync; umount "$T/m"; losetup -d "$lo"
gp2=$(backup_gen g37 --to "repo:$REPO" --incremental) || fail "backup g37 2"
before=$(loops)
out=$(ctl diff "repo:$REPO@$gp1" "repo:$REPO@$gp2" --files --partition 2 --json) || fail "diff --files --partition 2: $out"
no_leftovers "$before"
echo "$out" | jq -c '.files | {known, to_fs, files}'
[ "$(json_field "$out" .files.to_fs.partition)" = 2 ] || fail "not partition 2: $out"
got=$(json_field "$out" '[.files.files[] | "\(.path):\(.status)"] | join(" ")')
[ "$got" = "/A:modified /B:added /C:deleted" ] || fail "partition 2 files: $got"
out=$(ctl diff "repo:$REPO@$gp1" "repo:$REPO@$gp2" --files --json) || fail "diff --files of two partitions: $out"
[ "$(json_field "$out" .files.known)" = false ] || fail "two partitions without --partition are known: $out"
json_field "$out" .files.to_fs.unknown | grep -q "2 partitions" || fail "no reason: $out"
ctl detach g37 >/dev/null || fail "detach g37"

log "SIGINT during diff --files undoes its mounts"
before=$(loops)
"$CTL" diff "repo:$REPO@$g1_ext4" "repo:$REPO@$g2_ext4" --files > "$T/int.out" 2>&1 &
pid=$!; EXTRA_PIDS+=("$pid")
for _ in $(seq 600); do
  ls -d "$COWSNAP_RUN_DIR"/diff-*-a.mnt >/dev/null 2>&1 && mountpoint -q "$COWSNAP_RUN_DIR"/diff-*-a.mnt && break
  running "$pid" || break
  sleep 0.02
done
if running "$pid"; then
  kill -INT "$pid"
  wait "$pid"; rc=$?
  log "interrupted diff exited $rc: $(tail -n 1 "$T/int.out")"
  if [ "$rc" = 0 ]; then
    log "the diff ended before the signal was seen"
  else
    [ "$rc" = 130 ] || fail "interrupted diff exited $rc, not 130: $(cat "$T/int.out")"
    grep -q "interrupted" "$T/int.out" || fail "interrupted diff does not say so: $(cat "$T/int.out")"
  fi
else
  wait "$pid"; log "the diff ended before it could be interrupted"
fi
no_leftovers "$before"

log "disk of random data: the ranges are unknown"
head -c $((16 << 20)) /dev/urandom > "$T/r.img"
dev=$(ctl attach "$T/r.img" --name r37 --via fuse | tail -n 1) || fail "attach r37"
gr1=$(backup_gen r37 --to "repo:$REPO") || fail "backup r37"
dd if=/dev/urandom of="$dev" bs=1M seek=5 count=1 oflag=direct conv=notrunc status=none || fail "write r37"
gr2=$(backup_gen r37 --to "repo:$REPO" --incremental) || fail "backup r37 2"
before=$(loops)
out=$(ctl diff "repo:$REPO@$gr1" "repo:$REPO@$gr2" --files --json) || fail "diff --files of random data: $out"
no_leftovers "$before"
[ "$(json_field "$out" .files.known)" = false ] || fail "random data has known files: $out"
why=$(json_field "$out" .files.to_fs.unknown)
log "unknown because: $why"
[ -n "$why" ] && [ "$why" != null ] || fail "no reason given: $out"
[ "$(json_field "$out" '.ranges | length')" -ge 1 ] || fail "no ranges: $out"
[ "$(json_field "$out" '.ranges[0].offset')" = $((5 << 20)) ] || fail "the range is not the 1 MiB written at 5 MiB: $out"
human=$(ctl diff "repo:$REPO@$gr1" "repo:$REPO@$gr2" --files) || fail "human diff of random data"
echo "$human"
echo "$human" | grep -qE '^ +5242880 +1048576 .* unknown$' || fail "human form does not mark the range unknown"
ctl detach r37 >/dev/null || fail "detach r37"

log "a disk name picks its newest generation; different disks are compared with a note"
a=$(ctl diff "repo:$REPO@$g1_ext4" "repo:$REPO@$g2_ext4" --json | jq -c .ranges) || fail "diff by id"
b=$(ctl diff "repo:$REPO@$g1_ext4" "repo:$REPO@ext437" --json | jq -c .ranges) || fail "diff by disk name"
[ "$a" = "$b" ] || fail "the disk name did not pick $g2_ext4: $b"
out=$(ctl diff "repo:$REPO@$g1_ext4" "repo:$REPO@$g1_xfs" --json) || fail "diff of two disks of one size: $out"
json_field "$out" '.notes[]' | grep -q "different disks" || fail "no note about different disks: $out"

log "--max-files bounds the walk; the error undoes the mounts"
before=$(loops)
msg=$(ctl diff "repo:$REPO@$g1_ext4" "repo:$REPO@$g2_ext4" --files --max-files 5 2>&1) && fail "--max-files 5 was not enforced"
echo "$msg" | grep -q "more than 5 entries" || fail "--max-files error unclear: $msg"
no_leftovers "$before"

log "refusals"
msg=$(ctl diff "repo:$REPO@$g1_ext4" "repo:$REPO@$gr1" 2>&1) && fail "diff of different disk sizes succeeded"
echo "$msg" | grep -q "disk sizes differ" || fail "size refusal does not say why: $msg"
msg=$(ctl diff "repo:$REPO" "repo:$REPO@$gr1" 2>&1) && fail "diff without @GEN succeeded"
echo "$msg" | grep -q "repo:DIR@GEN" || fail "spec refusal unclear: $msg"
log "PASS"
