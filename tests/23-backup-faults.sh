#!/usr/bin/env bash
# Backup failures end the backup cleanly, name their cause, and never hurt the disk:
#  a. target out of space (file: on a 32 MiB tmpfs, 256 MiB random disk): exit != 0 naming
#     "No space left", the image keeps its .incomplete marker (with the reason), the disk
#     serves writes and reads, and a later backup to a good target is complete and exact.
#  b. target failing / vanishing: dev: target on a loop device over an nbdfuse file served
#     by nbdkit (error filter). First every target write fails with EIO from the middle of
#     the backup, then the nbdfuse process is killed mid-backup (the device's backing
#     goes away). Both: exit != 0 naming the I/O error; the disk is fine.
#  c. container failing: --container dev:FILE on an nbdfuse file whose I/O starts failing
#     mid-backup while a client writes 64 MiB to chunks not yet copied: the backup fails
#     naming the container, every client write succeeds and reads back exactly.
#  d. bad input: --to nonsense, --container ram:0, an unknown container kind, an unknown
#     disk, and a second backup while one runs (busy; the first still completes).
. "$(dirname "$0")/lib.sh"
need_root; need_fuse; need nbdkit nbdcopy qemu-io losetup cmp
nbdkit --filter=error null --help >/dev/null 2>&1 || skip "nbdkit has no error filter"

SIZE=$((256 << 20))
head -c $SIZE /dev/urandom > "$T/disk.img" || fail "create the disk"
uri=$(ctl attach "$T/disk.img" --name t23 --via none | tail -n 1) || fail "attach"
n=0
disk_ok() { # a write and read-back through NBD, then the daemon still answers
  n=$((n + 1))
  local off=$(( (n * 7919 * 65536 + 4096 * n) % (SIZE - (1 << 20)) ))
  qemu-io -f raw "$uri" -c "write -P $((0x40 + n)) $off 1M" -c "read -P $((0x40 + n)) $off 1M" \
    -c "write -P $((0x80 + n)) $((SIZE - 4096)) 4096" -c "read -P $((0x80 + n)) $((SIZE - 4096)) 4096" \
    >"$T/qio" 2>&1 || fail "$1: write+read on the disk failed: $(cat "$T/qio")"
  grep -q "verification failed" "$T/qio" && fail "$1: read back differs: $(cat "$T/qio")"
  [ "$(ctl status t23 --json | jq -r .daemon.backup.state)" != running ] || fail "$1: backup still running"
  [ "$(ctl status t23 --json | jq .daemon.stats.errors)" = 0 ] || fail "$1: a client request failed"
}
bk() { timeout 300 "$CTL" backup t23 --quiesce-idle 0s --json "$@" >"$T/out" 2>"$T/err"; }
last_id() { ctl status t23 --json | jq '.daemon.backup.id // 0'; }
# wait_running ID: until the backup after ID (the last one before it was started) runs
wait_running() {
  local b
  for _ in $(seq 1000); do
    b=$(ctl status t23 --json | jq -c '.daemon.backup // {id: 0}')
    if [ "$(json_field "$b" .id)" -gt "$1" ]; then
      case $(json_field "$b" .state) in running) return 0;; complete|failed) return 1;; esac
    fi
    sleep 0.01
  done
  return 1
}

log "a: target on a 32 MiB tmpfs"
mkdir -p "$T/small"; mount -t tmpfs -o size=32M tmpfs "$T/small" || fail "mount tmpfs"; track_mount "$T/small"
bk --to "file:$T/small/img" && fail "backup to a 32 MiB tmpfs succeeded"
log "exit != 0: $(cat "$T/err")"
grep -q "No space left on device" "$T/err" || fail "error does not name ENOSPC: $(cat "$T/err")"
grep -q "backup of t23" "$T/err" || fail "error does not name the disk: $(cat "$T/err")"
[ -e "$T/small/img.incomplete" ] || fail "failed image has no .incomplete marker"
grep -q "No space left" "$T/small/img.incomplete" || fail "marker does not say why: $(cat "$T/small/img.incomplete")"
[ "$(tail -n 1 "$T/out" | jq -r '"\(.event) \(.ok) \(.state)"')" = "result false failed" ] || fail "no failed result: $(tail -n 1 "$T/out")"
disk_ok "after ENOSPC"
bk --to "file:$T/good.img" || fail "backup to a good target after ENOSPC: $(cat "$T/err")"
[ ! -e "$T/good.img.incomplete" ] || fail "good image marked incomplete"
cmp "$T/disk.img" "$T/good.img" || fail "the later backup differs from the (idle) disk"
rm -f "$T/good.img"; umount "$T/small"

# an nbdkit memory disk with the error filter (errors while $1.trigger exists), as a file via nbdfuse
fuse_file() { # NAME SIZE -> prints the file path
  nbdkit -U "$T/$1.sock" -P "$T/$1.kpid" --filter=error memory "$2" error=EIO error-rate=100% \
    error-file="$T/$1.trigger" || fail "nbdkit for $1"
  EXTRA_PIDS+=("$(cat "$T/$1.kpid")")
  mkdir -p "$T/$1.fuse"
  nbdfuse "$T/$1.fuse/f" "nbd+unix:///?socket=$T/$1.sock" >"$T/$1.fuse.log" 2>&1 &
  FPID=$!; EXTRA_PIDS+=("$FPID")
  for _ in $(seq 100); do [ -f "$T/$1.fuse/f" ] && break; sleep 0.1; done
  [ -f "$T/$1.fuse/f" ] || fail "nbdfuse for $1: $(cat "$T/$1.fuse.log")"
  track_mount "$T/$1.fuse/f"
}

log "b1: dev: target (loop device over nbdkit) failing with EIO mid-backup"
fuse_file tgt 320M
lo=$(losetup -f --show "$T/tgt.fuse/f") || fail "losetup"
id0=$(last_id); bk --to "dev:$lo" --rate-limit 64M & B=$!; EXTRA_PIDS+=("$B")
wait_running "$id0" || fail "backup to $lo did not start: $(cat "$T/err")"
sleep 1; touch "$T/tgt.trigger"
wait "$B" && fail "backup to a failing device succeeded"
log "exit != 0: $(cat "$T/err")"
grep -q "Input/output error" "$T/err" || fail "error does not name EIO: $(cat "$T/err")"
grep -q "target" "$T/err" || fail "error does not name the target: $(cat "$T/err")"
disk_ok "after target EIO"

log "b2: the target vanishes (its nbdfuse is killed) mid-backup"
rm -f "$T/tgt.trigger"
id0=$(last_id); bk --to "dev:$lo" --rate-limit 64M & B=$!; EXTRA_PIDS+=("$B")
wait_running "$id0" || fail "backup to $lo did not start: $(cat "$T/err")"
sleep 1; kill -KILL "$FPID"
wait "$B" && fail "backup to a vanished device succeeded"
log "exit != 0: $(cat "$T/err")"
grep -Eq "Input/output error|not connected|No such device" "$T/err" || fail "unclear error: $(cat "$T/err")"
disk_ok "after the target vanished"
losetup -d "$lo"; umount -l "$T/tgt.fuse/f" 2>/dev/null

log "c: the container fails while clients write to chunks not yet copied"
fuse_file cont 32M
head -c $((64 << 20)) /dev/urandom > "$T/data"
id0=$(last_id); bk --to "file:$T/c.img" --container "dev:$T/cont.fuse/f" --rate-limit 16M & B=$!; EXTRA_PIDS+=("$B")
wait_running "$id0" || fail "backup with a dev: container did not start: $(cat "$T/err")"
# the writes start at 128 MiB: the drainer (16 MiB/s from 0) is far from there
qemu-io -f raw "$uri" -c "write -P 0x11 $((128 << 20)) 64k" >/dev/null || fail "write before the fault"
touch "$T/cont.trigger"
/usr/bin/python3 - "$uri" "$T/data" $((128 << 20)) <<'PY' || fail "client writes failed while the container failed"
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
data = open(sys.argv[2], "rb").read(); base = int(sys.argv[3])
for i in range(0, len(data), 256 << 10):
    h.pwrite(data[i:i + (256 << 10)], base + i)
h.flush(); h.shutdown()
PY
wait "$B" && fail "backup with a failing container succeeded"
log "exit != 0: $(cat "$T/err")"
grep -q "container" "$T/err" || fail "error does not name the container: $(cat "$T/err")"
grep -q "Input/output error" "$T/err" || fail "error does not name EIO: $(cat "$T/err")"
[ -e "$T/c.img.incomplete" ] || fail "image of the failed backup not marked incomplete"
nbdcopy "$uri" "$T/back" || fail "read the disk back"
cmp -i $((128 << 20)):0 -n $((64 << 20)) "$T/back" "$T/data" || fail "client writes during the container failure are not on the disk"
[ "$(ctl status t23 --json | jq .daemon.stats.errors)" = 0 ] || fail "a client request failed"
disk_ok "after the container failed"
rm -f "$T/back" "$T/c.img"
umount -l "$T/cont.fuse/f" 2>/dev/null

log "d: bad input"
bk --to nonsense && fail "--to nonsense accepted"
grep -q "invalid target" "$T/err" || fail "unclear: $(cat "$T/err")"
bk --to "file:$T/x.img" --container ram:0 && fail "--container ram:0 accepted"
grep -q "smaller than one" "$T/err" || fail "unclear: $(cat "$T/err")"
bk --to "file:$T/x.img" --container bogus:1 && fail "--container bogus:1 accepted"
grep -q "unknown kind" "$T/err" || fail "unclear: $(cat "$T/err")"
[ ! -e "$T/x.img" ] || fail "a refused backup created its image"
timeout 30 "$CTL" backup nosuch --to "file:$T/y.img" --quiesce-idle 0s >/dev/null 2>"$T/err" && fail "unknown disk accepted"
grep -q 'disk "nosuch" is not attached' "$T/err" || fail "unclear: $(cat "$T/err")"
id0=$(last_id); "$CTL" backup t23 --to "file:$T/first.img" --quiesce-idle 0s --rate-limit 64M >/dev/null 2>"$T/err1" & B=$!; EXTRA_PIDS+=("$B")
wait_running "$id0" || fail "first backup did not start: $(cat "$T/err1")"
bk --to "file:$T/second.img" && fail "a second backup at once was accepted"
grep -q "still running" "$T/err" || fail "unclear busy message: $(cat "$T/err")"
[ ! -e "$T/second.img" ] && [ ! -e "$T/second.img.incomplete" ] || fail "the refused backup touched its target"
wait "$B" || fail "the first backup failed after the refused second: $(cat "$T/err1")"
cmp "$T/disk.img" "$T/first.img" || fail "first backup differs from the idle disk"
disk_ok "at the end"
ctl detach t23 || fail "detach"
log "PASS"
