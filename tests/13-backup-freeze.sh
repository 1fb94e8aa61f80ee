#!/usr/bin/env bash
# cowsnapctl backup --freeze on a mounted ext4 (via fuse): whatever the outcome, the
# filesystem is thawed afterwards (a write to it completes), the backup succeeds (exit 0,
# a "result" JSON event in state "complete", an e2fsck-clean image), a failing one names the disk and
# the daemon's reason and thaws too, and Ctrl-C cancels one.
. "$(dirname "$0")/lib.sh"
need_root; need_fuse; need mkfs.ext4 e2fsck timeout

truncate -s 512M "$T/disk.img"
dev=$(ctl attach "$T/disk.img" --name t13 --via fuse | tail -n 1) || fail "attach"
mkfs.ext4 -q -F "$dev" || fail "mkfs"
mkdir -p "$T/mnt"; mount "$dev" "$T/mnt" || fail "mount"; track_mount "$T/mnt"
head -c $((16 << 20)) /dev/urandom > "$T/mnt/a.bin"; sync

log "backup --freeze (stdout is not a terminal: JSON events)"
out=$(timeout 300 "$CTL" backup t13 --to "file:$T/image.raw" --freeze "$T/mnt" --container ram:16M 2>"$T/err"); rc=$?
log "backup exit $rc; stderr: $(cat "$T/err")"
timeout 10 sh -c "echo thawed > '$T/mnt/after.txt' && sync -f '$T/mnt/after.txt'" ||
  fail "filesystem still frozen after the backup command (rc=$rc)"
[ "$rc" = 0 ] || fail "backup --freeze failed (exit $rc): $(cat "$T/err")"
printf '%s\n' "$out" | tail -n 1 | jq -e '.event == "result" and .state == "complete"' >/dev/null || fail "no complete event: $out"
e2fsck -fn "$T/image.raw" || fail "backup image is not a clean ext4"
ctl status t13 >/dev/null || fail "daemon stopped answering after the backup"

log "a frozen-then-failed request must also thaw: bad target directory"
timeout 120 "$CTL" backup t13 --to "file:$T/no/such/dir/x.raw" --freeze "$T/mnt" >/dev/null 2>"$T/err2" &&
  fail "backup to a missing directory succeeded"
timeout 10 sh -c "echo again > '$T/mnt/after2.txt' && sync -f '$T/mnt/after2.txt'" || fail "left frozen after a failed backup"
grep -q "backup of t13" "$T/err2" || fail "unclear error: $(cat "$T/err2")"

log "Ctrl-C during a (rate-limited) backup cancels it: exit 130, daemon says failed/canceled"
"$CTL" backup t13 --to "file:$T/image2.raw" --quiesce-idle 0 --rate-limit 4M >"$T/out3" 2>"$T/err3" &
bp=$!; EXTRA_PIDS+=("$bp")
for _ in $(seq 100); do grep -q '"event":"progress"' "$T/out3" 2>/dev/null && break; sleep 0.1; done
kill -INT "$bp"; wait "$bp"; rc3=$?
[ "$rc3" = 130 ] || fail "interrupted backup exited $rc3: $(cat "$T/err3")"
grep -q "cancelled" "$T/err3" || fail "no cancel message: $(cat "$T/err3")"
st=$(ctl status t13 --json)
[ "$(json_field "$st" .daemon.backup.state)" = failed ] || fail "backup not failed after cancel: $st"
timeout 10 sh -c "echo x > '$T/mnt/after3.txt' && sync -f '$T/mnt/after3.txt'" || fail "disk stuck after cancel"

umount "$T/mnt"
ctl detach t13 || fail "detach"
e2fsck -fn "$T/disk.img" >/dev/null || fail "origin not clean after the backups"
log "PASS"
