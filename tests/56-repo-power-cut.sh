#!/usr/bin/env bash
# Power cuts under a directory repository. The repository's ext4 (data=writeback: names
# and sizes reach the journal without waiting for the data) sits on a loop device over an
# nbdfuse file served by nbdkit with its cache filter in writeback mode and a rate limit:
# nothing reaches the image file until the kernel flushes, so kill -9 of nbdkit loses
# exactly what was not flushed, like a power cut. After each cut the image is mounted
# directly (journal replay).
# 1. A full backup returns, the power goes at once: the generation verifies and restores
#    bit-exact (its chunks were made durable before its index was published).
# 2. The power goes in the middle of an incremental: nothing is published; the next
#    incremental (same changes) reuses or heals the chunks the cut one had named, verify
#    is clean and the generation restores bit-exact; e2fsck of the repository's file
#    system is clean.
. "$(dirname "$0")/lib.sh"
need_root; need_fuse; need_python_nbd; need nbdkit nbdfuse nbdcopy mkfs.ext4 e2fsck sha256sum
nbdkit --filter=cache --filter=rate null --help >/dev/null 2>&1 || skip "nbdkit has no cache or rate filter"

sha() { sha256sum "$1" | cut -d' ' -f1; }
IMG=$T/repofs.img
R=$T/repo
REPO=$R/r
truncate -s 1G "$IMG"
mkfs.ext4 -q -F "$IMG" || fail "mkfs"
mkdir -p "$R" "$T/fuse"

# power_on: the image behind nbdkit (cache=writeback, 400 Mbit/s) → nbdfuse → loop → ext4
power_on() {
  rm -f "$T/k.sock"
  nbdkit -U "$T/k.sock" -P "$T/k.pid" --filter=cache --filter=rate file "$IMG" \
    cache=writeback rate=400M || fail "nbdkit"
  for _ in $(seq 50); do [ -s "$T/k.pid" ] && break; sleep 0.1; done
  KPID=$(cat "$T/k.pid" 2>/dev/null); [ -n "$KPID" ] || fail "nbdkit wrote no pid file"
  EXTRA_PIDS+=("$KPID")
  nbdfuse "$T/fuse/f" "nbd+unix:///?socket=$T/k.sock" >"$T/fuse.log" 2>&1 &
  FPID=$!; EXTRA_PIDS+=("$FPID"); disown "$FPID"
  for _ in $(seq 100); do [ -f "$T/fuse/f" ] && break; sleep 0.1; done
  [ -f "$T/fuse/f" ] || fail "nbdfuse: $(cat "$T/fuse.log")"
  LO=$(losetup -f --show "$T/fuse/f") || fail "losetup"
  mount -o data=writeback,commit=1 "$LO" "$R" || fail "mount the repository's file system"
}
# power_cut: kill -9 the server holding the unflushed writes, then tear the rest down
power_cut() {
  kill -9 "$KPID" "$FPID"
  wait_gone "$KPID" 10 || fail "nbdkit survived kill -9"
  umount -l "$R" 2>/dev/null
  losetup -d "$LO" 2>/dev/null
  fusermount3 -u -z "$T/fuse" 2>/dev/null
  for _ in $(seq 100); do losetup -j "$T/fuse/f" 2>/dev/null | grep -q . || break; sleep 0.1; done
}
# direct_on: the image itself after the cut (journal replayed at mount)
direct_on() {
  DLO=$(losetup -f --show "$IMG") || fail "losetup $IMG"
  mount "$DLO" "$R" || fail "the repository's file system does not mount after the cut"
}
direct_off() { umount "$R" || fail "umount"; losetup -d "$DLO"; }

log "192 MiB random disk, attach --via none"
head -c $((192 << 20)) /dev/urandom > "$T/d.img"
want1=$(sha "$T/d.img")
uri=$(ctl attach "$T/d.img" --name d56 --via none | tail -n 1) || fail "attach"

log "1. full backup, then the power goes at once"
power_on
g1=$(backup_gen d56 --to "repo:$REPO") || exit 1
[ -n "$g1" ] && [ "$g1" != null ] || fail "no generation: $(cat "$T/bk.out")"
power_cut
direct_on
ctl verify "repo:$REPO" >"$T/v1.out" 2>&1 || fail "generation $g1, published before the cut, does not verify: $(tail -n 20 "$T/v1.out")"
ctl restore "repo:$REPO@$g1" --to "$T/r1.img" >/dev/null || fail "restore $g1"
[ "$(sha "$T/r1.img")" = "$want1" ] || fail "generation $g1 restores other data than the disk held"
rm -f "$T/r1.img"
direct_off
log "   $g1 survived the cut whole"

log "2. 160 MiB changed, the power goes in the middle of the incremental"
nbd_write_random "$uri" 56 160 || fail "writes"
nbdcopy "$uri" "$T/e2.img" || fail "nbdcopy"
power_on
before=$(find "$REPO/chunks" -type f | wc -l)
timeout 300 "$CTL" backup d56 --to "repo:$REPO" --incremental --quiesce-idle 0 >"$T/bk2.out" 2>"$T/bk2.err" & B=$!
EXTRA_PIDS+=("$B")
# the cut 1.5 s after 24 new chunks have their names (the journal commits every second)
for _ in $(seq 600); do
  [ "$(find "$REPO/chunks" -type f ! -name '.tmp-*' | wc -l)" -ge $((before + 24)) ] && break
  running "$B" || break
  sleep 0.05
done
sleep 1.5
running "$B" || fail "the backup ended before the cut: $(cat "$T/bk2.out" "$T/bk2.err")"
named=$(find "$REPO/chunks" -type f ! -name '.tmp-*' | wc -l)
power_cut
wait "$B" && fail "the backup succeeded although its repository lost power: $(cat "$T/bk2.out")"
log "   cut with $((named - before)) new chunk names; the backup failed: $(tail -n 1 "$T/bk2.err")"
direct_on
L=$(ctl list "repo:$REPO" --json) || fail "list"
[ "$(json_field "$L" length)" = 1 ] || fail "a generation was published by the cut backup: $L"
after=$(find "$REPO/chunks" -type f ! -name '.tmp-*' | wc -l)
empty=$(find "$REPO/chunks" -type f ! -name '.tmp-*' -size -17c | wc -l)
log "   after the cut: $((after - before)) new chunk names left, $empty of them shorter than a header"
direct_off

log "   the next incremental over the same changes"
power_on
g2=$(backup_gen d56 --to "repo:$REPO" --incremental) || exit 1
healed=$(tail -n 1 "$T/bk.out" | jq -r '.stats.chunks_healed // 0')
reused=$(tail -n 1 "$T/bk.out" | jq -r '.stats.chunks_reused // 0')
log "   $g2: $reused chunk(s) reused, $healed healed (torn by the cut)"
umount "$R" || fail "umount"
losetup -d "$LO"; fusermount3 -u "$T/fuse"; kill "$KPID"; wait_gone "$KPID" 10
e2fsck -fn "$IMG" >"$T/fsck.out" 2>&1 || fail "the repository's file system is not clean: $(tail -n 20 "$T/fsck.out")"
direct_on
ctl verify "repo:$REPO" >"$T/v2.out" 2>&1 || fail "verify after the healing backup: $(tail -n 20 "$T/v2.out")"
ctl restore "repo:$REPO@$g2" --to "$T/r2.img" >/dev/null || fail "restore $g2"
[ "$(sha "$T/r2.img")" = "$(sha "$T/e2.img")" ] || fail "generation $g2 restores other data than the disk held"
ctl restore "repo:$REPO@$g1" --to "$T/r1.img" >/dev/null || fail "restore $g1 again"
[ "$(sha "$T/r1.img")" = "$want1" ] || fail "generation $g1 changed"
direct_off
log "PASS"
