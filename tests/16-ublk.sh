#!/usr/bin/env bash
# --via ublk: the daemon's own ublk device /dev/ublkbN.
# Everywhere: without /dev/ublk-control, `attach --via ublk` is refused with the reason
# and leaves nothing behind (no daemon, no record). Then, on a host without the driver,
# the rest runs against the real driver in a VM (scripts/vm.sh boots Debian's kernel;
# Debian 12's 6.1 kernel leaves ublk out, so scripts/ublk-module.sh builds the kernel's
# own drivers/block/ublk_drv.c for it from the distribution's source; that 6.1 driver
# takes the plain command numbers). Skips only when no VM can boot or the module cannot
# be built here; anything that goes wrong in the VM fails. COWSNAP_VM=0: skip instead.
# With the driver: attach --via ublk (and auto picks ublk), ext4 on the device, a backup
# while a file is overwritten in place holds the file's old bytes (preserve before the
# write is applied), an fsynced file survives a daemon kill -9 (the device fails I/O, no
# hang), detach --force deletes the dead daemon's device, re-attach, fsck clean, fio
# 1 MiB random writes read back verified at queue depth 8, detach removes /dev/ublkbN.
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
  why="no /dev/ublk-control: the ublk_drv module is not loaded on this host (modprobe ublk_drv; Linux 6.0+)"
  [ "${COWSNAP_VM:-1}" = 0 ] && skip "$why"
  log "booting a VM to run the rest against the real driver (scripts/vm.sh)"
  bash "$ROOT/scripts/vm.sh" --install >"$T/install.out" 2>&1 ||
    skip "$why; unable to install the VM's packages: $(tail -n 3 "$T/install.out")"
  kernel=$(bash "$ROOT/scripts/vm.sh" --kernel 2>/dev/null) || skip "$why; no kernel for a VM"
  kver=${kernel##*/vmlinuz-}
  ko=$(bash "$ROOT/scripts/ublk-module.sh" "$kver" 2>"$T/module.out") ||
    skip "$why; unable to build ublk_drv for the VM's kernel $kver: $(tail -n 3 "$T/module.out")"
  mkdir -p "$T/vm"
  cp "$ko" "$T/vm/ublk_drv.ko" || fail "copy $ko"  # the VM sees no /var/cache of the host
  ko=$T/vm/ublk_drv.ko
  vm_test "${UBLK_VM_TIMEOUT:-600}" 2G "ublk-vm: running on" -- \
    env COWSNAP_BIN_DIR="$BIN" TMPDIR=/dev/shm bash -c \
    'modprobe loop 2>/dev/null; insmod "$1" || exit 3; echo "ublk-vm: running on $(uname -r)"; exec bash "$2"' \
    _ "$ko" "$ROOT/tests/16-ublk.sh"
  rc=$?
  [ "$rc" = 3 ] && fail "insmod $ko failed in the VM"
  [ "$rc" = 0 ] || fail "the ublk test in the VM failed (exit $rc)"
  log "PASS (in the VM, the driver of $kver)"
  exit 0
fi
need mkfs.ext4 e2fsck sha256sum timeout losetup fio

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
# the new bytes are made before the backup starts: in a slow VM making them took
# longer than the whole rate-limited backup
head -c 32M /dev/urandom > "$T/new"
new=$(sha256sum < "$T/new" | cut -d' ' -f1)
timeout 300 "$CTL" backup t16 --to "file:$T/bk.img" --quiesce-idle 0s --container ram:64M \
  --rate-limit 4M --json >"$T/bk.json" 2>"$T/bk.err" &
BK=$!
for _ in $(seq 1000); do
  st=$(ctl status t16 --json | jq -r '.daemon.backup.state // "none"')
  case $st in running|complete|failed) break;; esac
  sleep 0.01
done
[ "$st" = running ] || fail "backup did not run ($st): $(cat "$T/bk.err")"
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
log "1 MiB writes and reads at queue depth 8 read back what was written (large reads go to the queue's helpers)"
fio --name=verify --filename="$dev" --rw=randwrite --bs=1M --iodepth=8 --ioengine=libaio \
  --direct=1 --size=64M --verify=crc32c --do_verify=1 --verify_fatal=1 >"$T/fio.out" 2>&1 ||
  fail "fio verify: $(tail -n 5 "$T/fio.out")"
ctl detach t16 || fail "detach"
[ -e "$dev" ] && fail "$dev left after detach"
[ -e "$COWSNAP_RUN_DIR/t16.ublk" ] && fail "t16.ublk left after detach"
log "PASS"
