#!/usr/bin/env bash
# detach --force of a mounted disk (via fuse): detach goes ahead with a warning naming the
# mount, the daemon exits (and with it the FUSE file), the mount then reports I/O errors instead of hanging,
# and after a lazy unmount nothing is left behind (no daemon, no FUSE mount, no sockets).
. "$(dirname "$0")/lib.sh"
need_root; need_fuse; need mkfs.ext4 timeout

truncate -s 256M "$T/disk.img"
dev=$(ctl attach "$T/disk.img" --name t14 --via fuse | tail -n 1) || fail "attach"
mkfs.ext4 -q -F "$dev" || fail "mkfs"
mkdir -p "$T/mnt"; mount "$dev" "$T/mnt" || fail "mount"; track_mount "$T/mnt"
echo before > "$T/mnt/f"; sync
pid=$(cat "$COWSNAP_RUN_DIR/t14.pid")

out=$(timeout 120 "$CTL" detach --force t14 2>&1) || fail "detach --force failed: $out"
printf '%s\n' "$out" | grep -qF "$T/mnt" || fail "no warning naming the mount: $out"
log "forced: $out"
wait_gone "$pid" 10 || fail "daemon $pid still running: $(ps -o pid,stat,cmd -p "$pid")"
[ ! -e "$COWSNAP_RUN_DIR/t14.ctl" ] || fail "control socket left"
[ ! -e "$COWSNAP_RUN_DIR/t14.attach.json" ] || fail "attach record left"
# the stale mount fails instead of hanging
if timeout 60 sh -c "dd if=/dev/urandom of='$T/mnt/g' bs=1M count=8 oflag=direct status=none && sync -f '$T/mnt/g'" 2>/dev/null; then
  fail "writes to the mount of a force-detached disk still succeed"
fi
[ $? = 124 ] && fail "I/O on the force-detached mount hung"
umount -l "$T/mnt"
for _ in $(seq 100); do grep -qF "$T/" /proc/self/mountinfo || break; sleep 0.1; done
grep -qF "$T/run" /proc/self/mountinfo && fail "FUSE mount left behind"
log "PASS"
