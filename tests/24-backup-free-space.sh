#!/usr/bin/env bash
# Free space is not backed up, and restored disks are right. For ext4 and XFS on a 1 GiB
# disk (attach --via fuse): 400 MiB of files written and deleted, ~100 MiB of live files.
# XFS free space is read only when the log at the snapshot instant holds nothing to
# replay but the superblock (clean or covered, as --freeze leaves it):
#  0. (XFS) full backup while the writer runs, no freeze: the log holds transactions,
#     so everything is read and the notes say why; the restored image is right.
#  1. full backup into a repository while a writer creates files (write + fsync) and
#     deletes others (XFS: with --freeze, ext4: no freeze): the free space is excluded
#     (bytes_excluded_free), the
#     deleted data is neither read nor stored; restored onto a file full of garbage, the
#     image replays its journal/log, is fsck-clean, every live file and every file the
#     writer had fsynced before the backup started has its hash, and the restored free
#     space holds zeros.
#  2. the same image to a raw dev: target (a loop device full of garbage): fsck-clean,
#     hashes right.
#  3. --all-blocks reads every block.
#  4. fstrim on the live filesystem, then a backup: the trimmed ranges are holes of the
#     origin file and are stored as zeros unread (bytes_excluded_zero).
. "$(dirname "$0")/lib.sh"
need_root; need_fuse; need mkfs.ext4 mkfs.xfs e2fsck xfs_repair sha256sum losetup fstrim jq
/usr/bin/python3 -c 'import sys' 2>/dev/null || skip "no /usr/bin/python3"
MIB=$((1 << 20))

bk() { # NAME JSONOUT ARGS...: a backup, its last JSON line to JSONOUT
  local name=$1 out=$2; shift 2
  timeout 600 "$CTL" backup "$name" --quiesce-idle 0 --json "$@" >"$out.all" 2>"$out.err" \
    || fail "backup $name $*: $(cat "$out.err")"
  tail -n 1 "$out.all" > "$out"
}
field() { jq -r "$2" "$1"; }

# nonzero_mib FILE: MiB of 64 KiB blocks that are not all zeros
nonzero_mib() {
  /usr/bin/python3 - "$1" <<'PY'
import sys
n = 0
z = bytes(65536)
with open(sys.argv[1], 'rb') as f:
    while True:
        b = f.read(65536)
        if not b:
            break
        if b != z[:len(b)]:
            n += 1
print(n * 65536 // (1 << 20))
PY
}

fsck_img() { # FS IMG: replay the journal/log on a loop device, then a read-only check
  local fs=$1 img=$2 m=$T/fsck-mnt
  fs_image_open "$fs" "$img" "$m"
  (cd "$m" && sha256sum -c --quiet "$T/live.sha") >"$T/sum.out" 2>&1 \
    || fail "$fs: live files differ after restore: $(head -n 5 "$T/sum.out")"
  (cd "$m" && sha256sum -c --quiet "$T/pre.sha") >"$T/sum.out" 2>&1 \
    || fail "$fs: files fsynced before the backup differ after restore: $(head -n 5 "$T/sum.out")"
  log "$fs: image fsck-clean; $(wc -l < "$T/live.sha") live and $(wc -l < "$T/pre.sha") writer files intact"
  fs_image_close "$m"
}

writer() { # creates w/NNN (64-256 KiB, fsync) and logs its hash; churns other files
  local i=0 f
  while [ ! -e "$T/stop" ]; do
    i=$((i + 1)); f=w/$(printf %05d $i)
    # fsync only (no sync/syncfs, which would also write the bitmaps in place): the
    # allocation is durable in the journal, the bitmap on disk may still be old
    head -c $(( (RANDOM % 4 + 1) * 65536 )) /dev/urandom \
      | dd of="$M/$f" bs=64k iflag=fullblock conv=fsync status=none || break
    (cd "$M" && sha256sum "$f") >> "$T/w.sha"
    rm -f "$M/churn/c$((i % 40))"
    head -c 131072 /dev/urandom > "$M/churn/c$(((i + 20) % 40))"
  done
}

run_fs() {
  local fs=$1 name=t24$1
  rm -f "$T/stop" "$T/w.sha"; : > "$T/w.sha"
  truncate -s 1G "$T/$fs.img"
  local dev; dev=$(ctl attach "$T/$fs.img" --name "$name" --via fuse | tail -n 1) || fail "attach"
  case $fs in
    ext4) mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$dev" || fail "mkfs.ext4";;
    xfs) mkfs.xfs -q -f "$dev" || fail "mkfs.xfs";;
  esac
  M=$T/mnt-$fs; mkdir -p "$M"; mount "$dev" "$M" || fail "mount"; track_mount "$M"
  mkdir -p "$M/gone" "$M/live" "$M/w" "$M/churn"
  log "$fs: 400 MiB written and deleted, ~100 MiB kept"
  for i in $(seq 8); do head -c $((50 * MIB)) /dev/urandom > "$M/gone/g$i"; done
  sync
  rm -rf "$M/gone"; sync
  for i in $(seq 10); do head -c $((10 * MIB - i * 4096)) /dev/urandom > "$M/live/l$i"; done
  for i in $(seq 200); do head -c $((RANDOM % 8192 + 1)) /dev/urandom > "$M/live/s$i"; done
  sync
  (cd "$M" && sha256sum live/*) > "$T/live.sha"

  local wr freeze=()
  if [ "$fs" = xfs ]; then
    log "$fs: 0. full backup while the writer runs, no freeze: the log is not clean, everything is read"
    writer 2>"$T/writer.err" & wr=$!; EXTRA_PIDS+=("$wr")
    sleep 2
    cp "$T/w.sha" "$T/pre.sha"
    bk "$name" "$T/b0.json" --to "file:$T/nofreeze.img"
    sleep 1; touch "$T/stop"; wait "$wr"; rm -f "$T/stop"
    log "$fs: $(field "$T/b0.json" '{bytes_copied,bytes_excluded_free,notes}' | jq -c .)"
    [ "$(field "$T/b0.json" .bytes_excluded_free)" = 0 ] || fail "xfs: free space excluded with a dirty log"
    field "$T/b0.json" '.notes[]' | grep -q "free space not known (xfs: the log holds transactions" \
      || fail "xfs: the backup does not say why free space was read: $(field "$T/b0.json" .notes)"
    [ $(( $(field "$T/b0.json" .bytes_copied) / MIB )) -ge 400 ] || fail "xfs: only $(field "$T/b0.json" .bytes_copied) bytes read with a dirty log"
    fsck_img "$fs" "$T/nofreeze.img"
    rm -f "$T/nofreeze.img"
    # the writer starts again from w/00001: forget this round's files
    rm -f "$M"/w/*; : > "$T/w.sha"; sync
    freeze=(--freeze "$M")
  fi

  log "$fs: 1. full backup into a repository while the writer runs ${freeze[*]}"
  writer 2>"$T/writer.err" & wr=$!; EXTRA_PIDS+=("$wr")
  sleep 2
  cp "$T/w.sha" "$T/pre.sha"
  bk "$name" "$T/b1.json" --to "repo:$T/repo-$fs" "${freeze[@]}"
  sleep 1; touch "$T/stop"; wait "$wr"
  [ "$(wc -l < "$T/pre.sha")" -gt 0 ] || fail "$fs: the writer wrote nothing before the backup: $(cat "$T/writer.err")"
  log "$fs: $(field "$T/b1.json" '{bytes_in_scope,bytes_copied,bytes_excluded_free,bytes_excluded_zero,bytes_stored,chunks_preserved,notes}' | jq -c .)"
  local free read stored
  free=$(( $(field "$T/b1.json" .bytes_excluded_free) / MIB ))
  read=$(( $(field "$T/b1.json" .bytes_copied) / MIB ))
  stored=$(( $(field "$T/b1.json" .bytes_stored) / MIB ))
  [ "$free" -ge 700 ] || fail "$fs: only $free MiB excluded as free (expected >= 700): $(field "$T/b1.json" .notes)"
  [ "$read" -le 300 ] || fail "$fs: $read MiB read (expected <= 300: live data and metadata)"
  [ "$stored" -le 300 ] || fail "$fs: $stored MiB stored: deleted data went into the repository"
  local gen; gen=$(field "$T/b1.json" .generation)
  head -c 1G /dev/urandom > "$T/r.img"
  ctl restore "repo:$T/repo-$fs@$gen" --to "$T/r.img" >/dev/null || fail "restore"
  local nz; nz=$(nonzero_mib "$T/r.img")
  [ "$nz" -le $((read + 8)) ] || fail "$fs: $nz MiB of the restored image are not zeros, only $read MiB were read"
  fsck_img "$fs" "$T/r.img"

  log "$fs: 2. raw dev: target on a loop device full of garbage"
  head -c 1G /dev/urandom > "$T/t.img"
  local tl; tl=$(losetup -f --show "$T/t.img") || fail "losetup target"
  cp "$T/w.sha" "$T/pre.sha"
  bk "$name" "$T/b2.json" --to "dev:$tl" "${freeze[@]}"
  losetup -d "$tl"
  [ $(( $(field "$T/b2.json" .bytes_excluded_free) / MIB )) -ge 700 ] || fail "$fs: dev: target got free space: $(cat "$T/b2.json")"
  fsck_img "$fs" "$T/t.img"

  log "$fs: 3. --all-blocks: free space is read (only holes of the origin file are not)"
  bk "$name" "$T/b3.json" --to "file:$T/all.img" --all-blocks
  [ "$(field "$T/b3.json" .bytes_excluded_free)" = 0 ] || fail "$fs: --all-blocks excluded free space"
  [ $(( $(field "$T/b3.json" .bytes_copied) + $(field "$T/b3.json" .bytes_excluded_zero) )) = $((1024 * MIB)) ] \
    || fail "$fs: --all-blocks: read + holes is not the disk: $(cat "$T/b3.json")"
  [ $(( $(field "$T/b3.json" .bytes_copied) / MIB )) -ge $(( read + 200 )) ] \
    || fail "$fs: --all-blocks read only $(field "$T/b3.json" .bytes_copied) bytes, the free-space backup $read MiB"
  rm -f "$T/all.img"

  log "$fs: 4. fstrim, then a backup (--all-blocks, to see the trim alone): trimmed ranges are holes, stored unread"
  local before after
  before=$(du -m "$T/$fs.img" | cut -f1)
  fstrim -v "$M" || fail "fstrim"
  sync
  after=$(du -m "$T/$fs.img" | cut -f1)
  log "$fs: origin file allocated: $before MiB before fstrim, $after MiB after"
  [ "$after" -lt "$before" ] || fail "$fs: fstrim freed nothing on the origin file"
  bk "$name" "$T/b4.json" --to "repo:$T/repo-$fs" --all-blocks
  log "$fs: after fstrim, --all-blocks: $(field "$T/b4.json" '{bytes_copied,bytes_excluded_zero}' | jq -c .)"
  [ $(( $(field "$T/b4.json" .bytes_excluded_zero) / MIB )) -ge $(( $(field "$T/b3.json" .bytes_excluded_zero) / MIB + 250 )) ] \
    || fail "$fs: the trimmed space was read: holes $(field "$T/b3.json" .bytes_excluded_zero) before fstrim, $(field "$T/b4.json" .bytes_excluded_zero) after"
  local g4; g4=$(field "$T/b4.json" .generation)
  cp "$T/w.sha" "$T/pre.sha"
  head -c 1G /dev/urandom > "$T/r.img"
  ctl restore "repo:$T/repo-$fs@$g4" --to "$T/r.img" >/dev/null || fail "restore after fstrim"
  fsck_img "$fs" "$T/r.img"

  umount "$M" || fail "umount"
  MOUNTS=("${MOUNTS[@]/$M}")
  ctl detach "$name" >/dev/null || fail "detach"
}

for fs in ${T24_FS:-ext4 xfs}; do run_fs "$fs"; done
log "PASS"
