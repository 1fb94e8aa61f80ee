#!/usr/bin/env bash
# Backup of a mounted ext4 (attach --via fuse; backups rate-limited to 64 MiB/s so they
# last a few seconds) while a writer keeps creating, changing,
# renaming and deleting files (with fsync, so the changes reach the disk during the backup).
#  1. --freeze MOUNTPOINT: right before it the writer pauses, everything is synced and the
#     sha256 of every file is recorded; the writer resumes as soon as the backup runs.
#     The image is e2fsck -fn clean as it is, and mounted through a loop device it shows
#     exactly those files with those hashes.
#  2. no freeze, --quiesce-idle 0s, the writer never pauses: a crash-consistent image.
#     Mounted through a loop device (the journal is replayed), unmounted, it is e2fsck -fn
#     clean, and the files nobody touched since mkfs have their hashes.
# Afterwards the live filesystem is still writable and the origin is fsck-clean.
. "$(dirname "$0")/lib.sh"
need_root; need_fuse; need mkfs.ext4 e2fsck sha256sum losetup timeout

live_ext4 t22 64

log "1: pause the writer, record the files, backup --freeze"
writer_pause
t0=$(date +%s)
"$CTL" backup t22 --to "file:$T/frozen.img" --freeze "$M" --container ram:8M --rate-limit 64M --json \
  >"$T/b1.json" 2>"$T/b1.err" &
BK=$!; EXTRA_PIDS+=("$BK")
st=$(backup_state t22)
rm -f "$T/pause"
[ "$st" = running ] || [ "$st" = complete ] || fail "backup did not start ($st): $(cat "$T/b1.err")"
wait "$BK" || fail "backup --freeze failed: $(cat "$T/b1.err")"
log "backup --freeze done in $(( $(date +%s) - t0 )) s: $(tail -n 1 "$T/b1.json" | jq -c '{chunks_preserved, holds, throttled_writes, container_high_water}')"
[ "$(tail -n 1 "$T/b1.json" | jq .chunks_preserved)" -gt 0 ] || fail "no chunk was preserved: the writer did not write during the backup"
sleep 1; running "$WR" || fail "the writer died (frozen filesystem left behind?): $(cat "$T/writer.log")"
timeout 10 sh -c "echo thawed > '$M/thawed' && sync -f '$M/thawed'" || fail "filesystem still frozen"
[ ! -e "$T/frozen.img.incomplete" ] || fail "image marked incomplete"
e2fsck -fn "$T/frozen.img" >"$T/fsck1" 2>&1 || fail "frozen image is not e2fsck clean: $(tail -n 20 "$T/fsck1")"
lo=$(losetup -f --show -r "$T/frozen.img") || fail "losetup"
mkdir -p "$T/m1"; mount -o ro "$lo" "$T/m1" || fail "mount the image"; track_mount "$T/m1"
(cd "$T/m1" && find . -path ./lost+found -prune -o -type f -print0 | sort -z | xargs -0 sha256sum) > "$T/got.sha"
diff "$T/expect.sha" "$T/got.sha" >"$T/diff" || fail "image files differ from the recorded view: $(head -n 20 "$T/diff")"
umount "$T/m1"; losetup -d "$lo"
log "image: e2fsck clean, $(wc -l < "$T/got.sha") files identical to the view at the freeze"

log "2: no freeze, --quiesce-idle 0s, the writer keeps going"
t0=$(date +%s)
timeout 300 "$CTL" backup t22 --to "file:$T/crash.img" --quiesce-idle 0s --container ram:8M --rate-limit 64M --json \
  >"$T/b2.json" 2>"$T/b2.err" || fail "backup without freeze failed: $(cat "$T/b2.err")"
log "backup done in $(( $(date +%s) - t0 )) s: $(tail -n 1 "$T/b2.json" | jq -c '{chunks_preserved, holds, throttled_writes, container_high_water}')"
[ "$(tail -n 1 "$T/b2.json" | jq .chunks_preserved)" -gt 0 ] || fail "no chunk was preserved: the writer did not write during the backup"
running "$WR" || fail "the writer died: $(cat "$T/writer.log")"
lo=$(losetup -f --show "$T/crash.img") || fail "losetup"
mkdir -p "$T/m2"; mount "$lo" "$T/m2" || fail "mount the crash-consistent image (journal replay)"; track_mount "$T/m2"
(cd "$T/m2" && sha256sum -c --quiet "$T/static.sha") || fail "untouched files differ in the image"
umount "$T/m2"; losetup -d "$lo"
e2fsck -fn "$T/crash.img" >"$T/fsck2" 2>&1 || fail "image after journal replay is not e2fsck clean: $(tail -n 20 "$T/fsck2")"
log "image: journal replayed, e2fsck clean, static files intact"

touch "$T/stop"; wait "$WR"
timeout 10 sh -c "echo end > '$M/end' && sync -f '$M/end'" || fail "filesystem not writable at the end"
(cd "$M" && sha256sum -c --quiet "$T/static.sha") || fail "static files changed on the live disk"
umount "$M"
ctl detach t22 || fail "detach"
e2fsck -fn "$T/disk.img" >/dev/null 2>&1 || fail "origin not clean after the backups"
log "PASS"
