#!/usr/bin/env bash
# The daemon serving --via fuse (its own FUSE file + loop device) is killed with SIGKILL
# while ext4 is mounted on the device: the kernel aborts the FUSE connection, so the
# mount gets I/O errors (no hang); after cleaning up by hand (umount -l, losetup -d,
# fusermount3 -u) the disk attaches again, the file that was fsynced before the kill is
# intact, and the filesystem checks clean.
. "$(dirname "$0")/lib.sh"
need_root; need_fuse; need mkfs.ext4 e2fsck sha256sum timeout

truncate -s 512M "$T/disk.img"
dev=$(ctl attach "$T/disk.img" --name t15 --via fuse | tail -n 1) || fail "attach"
rec=$(cat "$COWSNAP_RUN_DIR/t15.attach.json")
[ "$(json_field "$rec" .via)" = fuse ] || fail "attach record: $rec"
[ "$(json_field "$rec" .nbdfuse_pid)" = null ] || fail "an nbdfuse process was started: $rec"
fusedir=$(json_field "$rec" .fuse_mount)
pgrep -f "nbdfuse.*t15" >/dev/null && fail "nbdfuse runs for t15"
transport=$(fuse_transport t15) || exit 1
log "FUSE transport: $transport"
mkfs.ext4 -q -F "$dev" || fail "mkfs"
mkdir -p "$T/mnt"; mount "$dev" "$T/mnt" || fail "mount"; track_mount "$T/mnt"

log "write + fsync 16 MiB, then more without fsync"
head -c 16M /dev/urandom > "$T/src"
want=$(sha256sum < "$T/src" | cut -d' ' -f1)
dd if="$T/src" of="$T/mnt/kept" bs=1M conv=fsync status=none || fail "write kept"
head -c 8M /dev/urandom > "$T/mnt/unsynced"

pid=$(cat "$COWSNAP_RUN_DIR/t15.pid")
log "kill -9 the daemon ($pid)"
kill -9 "$pid"
wait_gone "$pid" 10 || fail "daemon $pid still running"

# The FUSE file is gone with its server: accesses fail, they do not hang.
# (stat may still be answered from the kernel's attribute cache; opening and reading
# always ask the server)
if timeout 30 dd if="$fusedir/disk" of=/dev/null bs=4k count=1 iflag=direct status=none 2>/dev/null; then
  fail "the FUSE file still answers after its daemon was killed"
fi
[ $? = 124 ] && fail "a read of the dead FUSE file hung"
if timeout 60 sh -c "dd if=/dev/urandom of='$T/mnt/after' bs=1M count=8 oflag=direct status=none && sync -f '$T/mnt/after'" 2>/dev/null; then
  fail "writes to the mount still succeed after the daemon was killed"
fi
[ $? = 124 ] && fail "I/O on the mount hung after the daemon was killed"
if timeout 30 dd if="$T/mnt/kept" of=/dev/null bs=1M iflag=direct status=none 2>/dev/null; then
  fail "direct reads through the mount still succeed after the daemon was killed"
fi
log "the mount reports errors"

log "clean up by hand: umount -l, losetup -d, fusermount3 -u"
umount -l "$T/mnt" || fail "umount -l"
losetup -d "$dev" 2>/dev/null || true
fusermount3 -u "$fusedir" 2>/dev/null || fusermount3 -u -z "$fusedir" || fail "unmount $fusedir"
for _ in $(seq 100); do grep -qF "$fusedir" /proc/self/mountinfo || break; sleep 0.1; done
grep -qF "$fusedir" /proc/self/mountinfo && fail "FUSE mount left behind"

log "attach again"
dev=$(ctl attach "$T/disk.img" --name t15 --via fuse | tail -n 1) || fail "re-attach"
mount "$dev" "$T/mnt" || fail "mount after re-attach"   # replays the journal
got=$(sha256sum < "$T/mnt/kept" | cut -d' ' -f1)
[ "$got" = "$want" ] || fail "the fsynced file changed: $got != $want"
umount "$T/mnt" || fail "umount"
e2fsck -f -n "$dev" >"$T/fsck.out" 2>&1 || fail "fsck after the crash: $(cat "$T/fsck.out")"
log "fsynced file intact, fsck clean"
ctl detach t15 || fail "detach"
grep -qF "$fusedir" /proc/self/mountinfo && fail "FUSE mount left after detach"
[ -e "$COWSNAP_RUN_DIR/t15.pid" ] && fail "pid file left after detach"
if [ "$transport" = io_uring ]; then
  n=$(fuse_uring_served t15)
  [ "$n" -gt 0 ] || fail "no request was answered over io_uring"
  log "$n requests answered over io_uring after the re-attach"
fi
log "PASS"
