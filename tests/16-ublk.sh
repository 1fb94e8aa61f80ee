#!/usr/bin/env bash
# --via ublk: the daemon's own ublk device /dev/ublkbN.
# Everywhere: without /dev/ublk-control, `attach --via ublk` is refused with the reason
# and leaves nothing behind (no daemon, no record); then the test skips (77), since the
# rest needs the ublk_drv module.
# With the driver: attach --via ublk (and auto picks ublk), ext4 on the device, a backup
# while a file is overwritten in place holds the file's old bytes (preserve before the
# write is applied), an fsynced file survives a daemon kill -9 (the device fails I/O, no
# hang), detach --force deletes the dead daemon's device, re-attach, fsck clean,
# detach removes /dev/ublkbN.
. "$(dirname "$0")/lib.sh"
need_root

truncate -s 256M "$T/disk.img"
if [ ! -e /dev/ublk-control ]; then
  if msg=$(ctl attach "$T/disk.img" --name t16 --via ublk 2>&1); then
    fail "attach --via ublk succeeded without /dev/ublk-control: $msg"
  fi
  printf '%s\n' "$msg" | grep -qF -- "--via ublk needs the ublk_drv module: /dev/ublk-control not found" \
    || fail "unclear refusal: $msg"
  [ -e "$COWSNAP_RUN_DIR/t16.attach.json" ] && fail "a refused attach left a record"
  [ -e "$COWSNAP_RUN_DIR/t16.pid" ] && fail "a refused attach started a daemon"
  [ -e "$COWSNAP_STATE_DIR/t16" ] && fail "a refused attach created disk state"
  log "refused without the driver: $msg"
  skip "no /dev/ublk-control: the ublk_drv module is not loaded on this host (modprobe ublk_drv; Linux 6.3+ for the ioctl-encoded commands)"
fi
need mkfs.ext4 e2fsck sha256sum timeout losetup

log "attach --via auto picks ublk"
dev=$(ctl attach "$T/disk.img" --name t16 | tail -n 1) || fail "attach"
rec=$(cat "$COWSNAP_RUN_DIR/t16.attach.json")
[ "$(json_field "$rec" .via)" = ublk ] || fail "auto did not pick ublk: $rec"
id=$(json_field "$rec" .ublk_id)
[ "$dev" = "/dev/ublkb$id" ] && [ -b "$dev" ] || fail "attach printed $dev, record: $rec"
[ "$(blockdev --getsize64 "$dev")" = $((256 << 20)) ] || fail "$dev has the wrong size"

mkfs.ext4 -q -F "$dev" || fail "mkfs"
mkdir -p "$T/mnt"; mount "$dev" "$T/mnt" || fail "mount"; track_mount "$T/mnt"
head -c 32M /dev/urandom > "$T/old"
old=$(sha256sum < "$T/old" | cut -d' ' -f1)
dd if="$T/old" of="$T/mnt/f" bs=1M conv=fsync status=none || fail "write f"
sync -f "$T/mnt/f"

log "backup while f is overwritten in place"
timeout 300 "$CTL" backup t16 --to "file:$T/bk.img" --quiesce-idle 0s --container ram:64M \
  --rate-limit 16M --json >"$T/bk.json" 2>"$T/bk.err" &
BK=$!
for _ in $(seq 1000); do
  st=$(ctl status t16 --json | jq -r '.daemon.backup.state // "none"')
  case $st in running|complete|failed) break;; esac
  sleep 0.01
done
[ "$st" = running ] || fail "backup did not run ($st): $(cat "$T/bk.err")"
head -c 32M /dev/urandom > "$T/new"
new=$(sha256sum < "$T/new" | cut -d' ' -f1)
dd if="$T/new" of="$T/mnt/f" bs=1M conv=notrunc,fsync status=none || fail "overwrite f"
wait "$BK" || fail "backup: $(cat "$T/bk.err")"
[ "$(tail -n 1 "$T/bk.json" | jq .chunks_preserved)" -gt 0 ] || fail "nothing preserved: $(tail -n 1 "$T/bk.json")"
fs_image_open ext4 "$T/bk.img" "$T/img"
got=$(sha256sum < "$T/img/f" | cut -d' ' -f1)
fs_image_close "$T/img"
[ "$got" = "$old" ] || fail "the backup does not hold f as it was when the backup started"
[ "$(sha256sum < "$T/mnt/f" | cut -d' ' -f1)" = "$new" ] || fail "f does not hold the new bytes"
log "backup holds the old f, the disk the new one"

pid=$(cat "$COWSNAP_RUN_DIR/t16.pid")
log "kill -9 the daemon ($pid)"
kill -9 "$pid"
wait_gone "$pid" 10 || fail "daemon $pid still running"
if timeout 60 sh -c "dd if=/dev/urandom of='$T/mnt/after' bs=1M count=8 oflag=direct status=none && sync -f '$T/mnt/after'" 2>/dev/null; then
  fail "writes to the mount still succeed after the daemon was killed"
fi
[ $? = 124 ] && fail "I/O on the mount hung after the daemon was killed"
umount -l "$T/mnt" || fail "umount -l"
ctl detach --force t16 || fail "detach --force after the kill"
for _ in $(seq 50); do [ -e "/sys/class/ublk-char/ublkc$id" ] || break; sleep 0.1; done
[ -e "/sys/class/ublk-char/ublkc$id" ] && fail "ublk device $id left after detach --force"

log "attach --via ublk again"
dev=$(ctl attach "$T/disk.img" --name t16 --via ublk | tail -n 1) || fail "re-attach"
mount "$dev" "$T/mnt" || fail "mount after re-attach"
[ "$(sha256sum < "$T/mnt/f" | cut -d' ' -f1)" = "$new" ] || fail "the fsynced f changed"
umount "$T/mnt" || fail "umount"
e2fsck -f -n "$dev" >"$T/fsck.out" 2>&1 || fail "fsck: $(cat "$T/fsck.out")"
ctl detach t16 || fail "detach"
[ -e "$dev" ] && fail "$dev left after detach"
[ -e "$COWSNAP_RUN_DIR/t16.ublk" ] && fail "t16.ublk left after detach"
log "PASS"
