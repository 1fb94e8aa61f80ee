#!/usr/bin/env bash
# Live restore straight from an S3 bucket (repo:s3://…, a real radosgw from
# scripts/s3-server.sh on ports of its own): an ext4 disk with files is backed up into the
# bucket, then `restore --live --via fuse` onto a new file with the background fill slowed
# (COWSNAP_FILL_RATE): the restored disk mounts (read-only, no journal replay) at once and
# its files read back with the right hashes while the fill runs (their chunks fetched on
# demand from the bucket); the daemon is stopped, the fill resumes on attach, the daemon is
# killed with SIGKILL mid-fill, attach resumes it again (never from zero), the whole disk
# read through NBD during the resumed fill equals the image, and the filled
# file is bit-exact to the backed-up image and checks clean with e2fsck. The repository's
# pin object exists while the fill is unfinished and is gone once it completes.
. "$(dirname "$0")/lib.sh"
need_root; need_fuse
need nbdcopy sha256sum mkfs.ext4 e2fsck curl cmp
need_s3

s3_test_store "${COWSNAP_TEST_S3_PORT:-17550}" "${COWSNAP_TEST_S3_MON_PORT:-13370}"
sha() { sha256sum "$1" | cut -d' ' -f1; }
st() { ctl status r73 --json; }
fill() { json_field "$(st)" "$1"; }
wait_fill() {
  local i s
  for i in $(seq 900); do
    s=$(st) || fail "status r73"
    [ "$(json_field "$s" .daemon.fill.complete)" = true ] && return 0
    [ "$(json_field "$s" .daemon.fill.error)" != null ] && fail "fill error: $s"
    sleep 0.2
  done
  fail "the fill did not complete: $s"
}
pins() { s3_keys cowsnap-t73 h/pins/ | wc -l; }

s3_start_bucket cowsnap-t73
REPO=repo:s3://cowsnap-t73/h

log "256 MiB ext4 disk with 40 MiB of files; full backup into $REPO"
mkdir -p "$T/src/dir"
for i in 1 2 3 4 5; do head -c $((8 << 20)) /dev/urandom > "$T/src/f$i"; done
seq 1 300000 > "$T/src/dir/numbers.txt"
truncate -s 256M "$T/d.img"
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 -d "$T/src" "$T/d.img" || fail "mkfs.ext4"
ctl attach "$T/d.img" --name d73 --via none >/dev/null || fail "attach d73"
timeout 300 "$CTL" backup d73 --to "$REPO" --quiesce-idle 0 >"$T/bk.out" 2>"$T/bk.err" || fail "backup: $(cat "$T/bk.err")"
ctl detach d73 || fail "detach d73"
gen=$(json_field "$(ctl list "$REPO" --json)" '.[0].id') || fail "list"
log "generation $gen"
[ "$(pins)" = 0 ] || fail "a pin before any live restore"

log "restore --live --via fuse from the bucket, fill limited to 1 MiB/s"
dev=$(COWSNAP_FILL_RATE=$((1 << 20)) ctl restore "$REPO@$gen" --to "$T/r.img" --live --via fuse --name r73 2>"$T/rl.err" | tail -n 1) ||
  fail "restore --live from s3: $(cat "$T/rl.err")"
[ -b "$dev" ] || fail "not a block device: $dev"
total=$(fill .daemon.fill.total)
[ "$(pins)" = 1 ] || fail "no pin object while the fill runs"
mkdir -p "$T/m"
mount -o ro,noload "$dev" "$T/m" || fail "the restored disk does not mount during the fill"
track_mount "$T/m"
for f in f1 f4 dir/numbers.txt; do
  [ "$(sha "$T/m/$f")" = "$(sha "$T/src/$f")" ] || fail "$f read during the fill has the wrong content"
done
d0=$(fill .daemon.fill.done)
log "files f1, f4, dir/numbers.txt read right during the fill (fill $d0/$total)"
[ "$d0" -lt "$total" ] || fail "the fill completed before the reads: lower the rate"
umount "$T/m" || fail "umount"
ctl detach r73 || fail "detach during the fill"

log "attach resumes the fill; kill -9 mid-fill"
uri=$(COWSNAP_FILL_RATE=$((1 << 20)) ctl attach "$T/r.img" --name r73 --via none 2>"$T/a1.err" | tail -n 1) || fail "attach: $(cat "$T/a1.err")"
s=$(st); d1=$(json_field "$s" .daemon.fill.done)
[ "$(json_field "$s" .daemon.fill.complete)" = false ] || fail "complete after the detach: $s"
[ "$d1" -ge "$d0" ] || fail "the fill started again instead of resuming: $d1 < $d0"
[ "$(json_field "$s" .daemon.restored_from.generation)" = "$gen" ] || fail "restored_from lost: $s"
sleep 1
s=$(st); pid=$(json_field "$s" .daemon.pid); d2=$(json_field "$s" .daemon.fill.done)
[ "$(json_field "$s" .daemon.fill.complete)" = false ] || fail "complete before the kill: $s"
kill -9 "$pid"; wait_gone "$pid" 10 || fail "daemon $pid survived kill -9"
log "killed daemon $pid at fill $d2/$total"
[ "$(pins)" = 1 ] || fail "the pin went with the killed daemon"

log "attach again: the fill resumes; the whole disk read through NBD meanwhile"
uri=$(COWSNAP_FILL_RATE=$((1 << 20)) ctl attach "$T/r.img" --name r73 --via none 2>"$T/a2.err" | tail -n 1) ||
  fail "attach after kill -9: $(cat "$T/a2.err")"
s=$(st); d3=$(json_field "$s" .daemon.fill.done)
[ "$d3" -ge "$d2" ] || fail "the fill restarted from zero after kill -9: $d3 < $d2"
[ "$(json_field "$s" .daemon.fill.complete)" = false ] || fail "complete right after the restart: $s"
nbdcopy "$uri" "$T/mid.img" || fail "nbdcopy during the fill"
cmp "$T/mid.img" "$T/d.img" || fail "the disk read during the fill differs from the generation"
wait_fill
ctl detach r73 || fail "detach r73"
cmp "$T/r.img" "$T/d.img" || fail "the restored file differs from the backed-up image"
e2fsck -fn "$T/r.img" >"$T/fsck.out" 2>&1 || fail "e2fsck: $(tail -n 20 "$T/fsck.out")"
[ "$(pins)" = 0 ] || fail "the pin object outlived the completed fill"
log "bit-exact, e2fsck clean, pin removed"
log "PASS"
