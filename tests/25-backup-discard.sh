#!/usr/bin/env bash
# Discarded data is not backed up when the origin is a block device (which has no holes
# to ask for). For ext4 and XFS on a 1 GiB loop device as the origin (attach --via
# fuse; loop devices take discards: they punch holes in their backing file):
#  1. ~100 MiB of files kept and 400 MiB written, then a full backup into a repository;
#  2. the 400 MiB deleted and discarded — XFS: `fstrim`; ext4: mounted `-o discard`, so
#     the filesystem discards as it frees — and the origin's backing file shrinks (the
#     discards reached the device);
#  3. an incremental backup (--freeze): the report shows the deleted data excluded as
#     discarded (bytes_excluded_discarded), far less read and stored than was deleted;
#  4. the incremental restored onto a file full of garbage: it mounts, is fsck-clean and
#     every remaining file has its hash.
. "$(dirname "$0")/lib.sh"
need_root; need_fuse; need mkfs.ext4 mkfs.xfs e2fsck xfs_repair sha256sum losetup fstrim jq
MIB=$((1 << 20))

bk() { # NAME JSONOUT ARGS...: a backup, its last JSON line to JSONOUT
  local name=$1 out=$2; shift 2
  timeout 600 "$CTL" backup "$name" --quiesce-idle 0 --json "$@" >"$out.all" 2>"$out.err" \
    || fail "backup $name $*: $(cat "$out.err")"
  tail -n 1 "$out.all" > "$out"
}
field() { jq -r "$2" "$1"; }
mib() { echo $(( $(field "$1" "$2") / MIB )); }

check_img() { # FS IMG: replay the journal/log on a loop device, fsck, compare hashes
  local fs=$1 img=$2 m=$T/chk-mnt
  fs_image_open "$fs" "$img" "$m"
  (cd "$m" && sha256sum -c --quiet "$T/keep.sha") >"$T/sum.out" 2>&1 \
    || fail "$fs: files differ after restore: $(head -n 5 "$T/sum.out")"
  [ ! -e "$m/gone" ] || fail "$fs: the deleted directory is back"
  log "$fs: restored image fsck-clean, $(wc -l < "$T/keep.sha") files intact"
  fs_image_close "$m"
}

run_fs() {
  local fs=$1 name=t25$1 mopt=
  truncate -s 1G "$T/$fs-origin.img"
  local origin; origin=$(losetup -f --show "$T/$fs-origin.img") || fail "losetup origin"
  [ "$(cat "/sys/block/${origin#/dev/}/queue/discard_max_bytes")" -gt 0 ] \
    || skip "loop devices do not take discards here"
  local dev; dev=$(ctl attach "$origin" --name "$name" --via fuse | tail -n 1) || fail "attach $origin"
  case $fs in
    ext4) mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$dev" || fail "mkfs.ext4"
          mopt=discard;;
    xfs) mkfs.xfs -q -f "$dev" || fail "mkfs.xfs";;
  esac
  M=$T/mnt-$fs; mkdir -p "$M"
  mount ${mopt:+-o $mopt} "$dev" "$M" || fail "mount"; track_mount "$M"
  mkdir -p "$M/keep" "$M/gone"
  log "$fs (origin $origin${mopt:+, mounted -o $mopt}): 1. 100 MiB kept, 400 MiB to be deleted; full backup"
  for i in $(seq 10); do head -c $((10 * MIB - i * 4096)) /dev/urandom > "$M/keep/k$i"; done
  for i in $(seq 100); do head -c $((RANDOM % 8192 + 1)) /dev/urandom > "$M/keep/s$i"; done
  for i in $(seq 8); do head -c $((50 * MIB)) /dev/urandom > "$M/gone/g$i"; done
  sync
  (cd "$M" && sha256sum keep/*) > "$T/keep.sha"
  bk "$name" "$T/b1.json" --to "repo:$T/repo-$fs" --freeze "$M"
  log "$fs: $(field "$T/b1.json" '{bytes_copied,bytes_excluded_free,bytes_excluded_discarded,bytes_stored}' | jq -c .)"
  [ "$(mib "$T/b1.json" .bytes_copied)" -ge 500 ] || fail "$fs: the full backup read less than the data: $(cat "$T/b1.json")"

  log "$fs: 2. delete 400 MiB, discard it"
  local before after
  before=$(du -m "$T/$fs-origin.img" | cut -f1)
  rm -rf "$M/gone"; sync
  case $fs in
    # XFS frees an unlinked file's blocks in the background (inode inactivation) and
    # fstrim skips extents not yet free or still busy in the log, so an fstrim right
    # after rm + sync can miss some or all of them: trim again until the space is free
    # or 20 s have passed.
    xfs) for i in $(seq 20); do
           fstrim "$M" || fail "fstrim"
           [ "$(du -m "$T/$fs-origin.img" | cut -f1)" -le $((before - 300)) ] && break
           sleep 1
         done
         log "$fs: fstrim run $i time(s)";;
    ext4) sync; sleep 2; sync;; # -o discard: freed extents are discarded at the journal commit
  esac
  after=$(du -m "$T/$fs-origin.img" | cut -f1)
  log "$fs: origin's backing file allocated: $before MiB before, $after MiB after"
  [ "$after" -le $((before - 300)) ] || fail "$fs: the discards did not reach the origin ($before -> $after MiB)"

  log "$fs: 3. incremental backup"
  bk "$name" "$T/b2.json" --to "repo:$T/repo-$fs" --incremental --freeze "$M"
  log "$fs: $(field "$T/b2.json" '{bytes_in_scope,bytes_copied,bytes_excluded_discarded,bytes_excluded_zero,bytes_stored,notes}' | jq -c .)"
  local disc read stored
  disc=$(mib "$T/b2.json" .bytes_excluded_discarded)
  read=$(mib "$T/b2.json" .bytes_copied)
  stored=$(mib "$T/b2.json" .bytes_stored)
  [ "$disc" -ge 350 ] || fail "$fs: only $disc MiB excluded as discarded (400 MiB deleted)"
  [ "$read" -le 50 ] || fail "$fs: $read MiB read of 400 MiB deleted"
  [ "$stored" -le 50 ] || fail "$fs: $stored MiB stored of 400 MiB deleted"
  field "$T/b2.json" '.notes[]' | grep -q "discarded" || fail "$fs: no note on discarded chunks"
  [ "$(field "$T/b2.json" .bytes_excluded_zero)" = 0 ] || fail "$fs: a block device reported holes"

  log "$fs: 4. restore the incremental onto garbage"
  local gen; gen=$(field "$T/b2.json" .generation)
  head -c 1G /dev/urandom > "$T/r.img"
  ctl restore "repo:$T/repo-$fs@$gen" --to "$T/r.img" >/dev/null || fail "restore"
  check_img "$fs" "$T/r.img"
  rm -f "$T/r.img"

  umount "$M" || fail "umount"
  MOUNTS=("${MOUNTS[@]/$M}")
  ctl detach "$name" >/dev/null || fail "detach"
  losetup -d "$origin" || fail "losetup -d $origin"
  rm -f "$T/$fs-origin.img"
}

for fs in ${T25_FS:-ext4 xfs}; do run_fs "$fs"; done
log "PASS"
