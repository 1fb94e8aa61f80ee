#!/usr/bin/env bash
# Attach a 1 GiB file through the daemon with --via fuse (the daemon's FUSE file + loop), make ext4,
# mount, write files; detach is refused while mounted (naming the mount point); after
# umount + detach the origin file passes e2fsck -fn and, attached again, holds the same
# files (sha256). status --json shows non-zero I/O counters.
. "$(dirname "$0")/lib.sh"
need_root; need_fuse; need mkfs.ext4 e2fsck sha256sum mountpoint

truncate -s 1G "$T/disk.img"
log "attach --via fuse"
out=$(ctl attach "$T/disk.img" --name t10 --via fuse) || fail "attach failed: $out"
dev=$(printf '%s\n' "$out" | tail -n 1)
[ -b "$dev" ] || fail "attach did not print a block device: $out"
tr=$(fuse_transport t10) || exit 1
log "device $dev, FUSE over $tr"
[ "$(blockdev --getsize64 "$dev")" = $((1 << 30)) ] || fail "$dev has the wrong size"

mkfs.ext4 -q -F "$dev" || fail "mkfs.ext4 on $dev"
mkdir -p "$T/mnt"
mount "$dev" "$T/mnt" || fail "mount $dev"
track_mount "$T/mnt"
log "writing files"
mkdir -p "$T/mnt/dir/sub"
head -c $((48 << 20)) /dev/urandom > "$T/mnt/big.bin"
for i in $(seq 1 200); do echo "file $i $RANDOM" > "$T/mnt/dir/sub/f$i.txt"; done
dd if=/dev/urandom of="$T/mnt/dir/odd.bin" bs=4097 count=333 status=none
sync
(cd "$T/mnt" && find . -type f -print0 | sort -z | xargs -0 sha256sum) > "$T/hashes"
[ "$(wc -l < "$T/hashes")" -ge 202 ] || fail "hash list too short"

log "detach while mounted must be refused"
if msg=$(ctl detach t10 2>&1); then fail "detach succeeded while mounted"; fi
printf '%s\n' "$msg" | grep -qF "$T/mnt" || fail "refusal does not name the mount point: $msg"
log "refused: $msg"
mountpoint -q "$T/mnt" || fail "mount vanished after refused detach"

st=$(ctl status t10 --json) || fail "status --json"
[ "$(json_field "$st" .daemon.stats.writes)" -gt 0 ] || fail "no writes counted: $st"
[ "$(json_field "$st" .daemon.stats.reads)" -gt 0 ] || fail "no reads counted: $st"
[ "$(json_field "$st" .daemon.stats.bytes_written)" -ge $((48 << 20)) ] || fail "bytes_written too small: $st"
[ "$(json_field "$st" .via)" = fuse ] || fail "status via: $st"
[ "$(json_field "$st" .device)" = "$dev" ] || fail "status device: $st"
ctl status | grep -q '^t10 ' || fail "status line missing"

log "umount + detach"
umount "$T/mnt" || fail "umount"
ctl detach t10 || fail "detach after umount"
[ ! -e "$COWSNAP_RUN_DIR/t10.ctl" ] && [ ! -e "$COWSNAP_RUN_DIR/t10.nbd" ] || fail "sockets left behind"
[ ! -e "$COWSNAP_RUN_DIR/t10.attach.json" ] || fail "attach record left behind"
losetup -n -O BACK-FILE | grep -qF "$T/" && fail "loop device left behind"
grep -qF "$T/run" /proc/self/mountinfo && fail "FUSE mount left behind"

log "e2fsck -fn on the origin file"
e2fsck -fn "$T/disk.img" || fail "e2fsck found problems on the origin"

log "attach again, compare hashes"
dev=$(ctl attach "$T/disk.img" --name t10 --via fuse | tail -n 1) || fail "second attach"
mount -o ro "$dev" "$T/mnt" || fail "second mount"
(cd "$T/mnt" && sha256sum --quiet -c "$T/hashes") || fail "hashes differ after re-attach"
umount "$T/mnt"
ctl detach t10 || fail "final detach"
log "PASS"
