#!/usr/bin/env bash
# Live restore through the real daemon. A generation of a 256 MiB disk (random data and a
# zeroed range) is restored with --live (the background fill slowed with the hidden
# COWSNAP_FILL_RATE knob so it takes several seconds):
#  - via fuse: while the fill runs, reads of the device match the generation, writes land
#    (whole and partial chunks), the fill completes, the disk = generation + writes;
#  - via none: writes during the fill, kill -9 of the daemon mid-fill, attach of the same
#    file under the same name resumes the fill (leftovers of the killed daemon are
#    handled), it completes, content = generation + writes; afterwards the disk is a
#    normal disk: detach/attach, writes, and a backup of it restores correctly.
. "$(dirname "$0")/lib.sh"
need nbdcopy sha256sum cmp; [ -x /usr/bin/python3 ] || skip "no /usr/bin/python3"
/usr/bin/python3 -c 'import nbd' 2>/dev/null || skip "python3-libnbd is not installed"
SIZE=$((256 << 20))
RATE=$((24 << 20))   # fill rate while the checks run: ~10 s for the disk
REPO=$T/repo
sha() { sha256sum "$1" | cut -d' ' -f1; }
fill() { json_field "$(ctl status "$1" --json)" "$2"; }
wait_fill() {
  local i st
  for i in $(seq 1200); do
    st=$(ctl status "$1" --json) || fail "status $1"
    [ "$(json_field "$st" .daemon.fill.complete)" = true ] && return 0
    [ "$(json_field "$st" .daemon.fill.error)" != null ] && fail "fill error: $st"
    sleep 0.1
  done
  fail "fill of $1 did not complete: $st"
}

# io.py TARGET EXPECTED SEED: TARGET is a device path or an NBD URI. Reads 40 random
# 1 MiB windows and compares them with EXPECTED, then writes (whole 1 MiB chunks,
# 4 KiB pieces inside chunks, a piece crossing a chunk boundary) to TARGET and to
# EXPECTED alike. Prints the number of mismatches.
cat > "$T/io.py" <<'PY'
import os, random, sys
target, expected, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
mode = sys.argv[4] if len(sys.argv) > 4 else "rw"
R = 1 << 20
rng = random.Random(seed)
if target.startswith("nbd"):
    import nbd
    h = nbd.NBD(); h.connect_uri(target)
    size = h.get_size()
    rd = lambda off, n: h.pread(n, off)
    def wr(off, b): h.pwrite(b, off)
    sync = h.flush
else:
    fd = os.open(target, os.O_RDWR)
    size = os.lseek(fd, 0, os.SEEK_END)
    rd = lambda off, n: os.pread(fd, n, off)
    def wr(off, b): os.pwrite(fd, b, off)
    sync = lambda: os.fsync(fd)
ef = open(expected, "r+b")
bad = 0
for _ in range(40):
    off = rng.randrange(0, size - R) & ~511
    ef.seek(off)
    if rd(off, R) != ef.read(R):
        bad += 1
        print("mismatch at", off, file=sys.stderr)
if "w" in mode:
    writes = []
    for _ in range(6):
        writes.append((rng.randrange(size // R) * R, rng.randbytes(R)))
    for _ in range(6):
        writes.append((rng.randrange(size // 4096) * 4096, rng.randbytes(4096)))
    writes.append((rng.randrange(1, size // R) * R - 8192, rng.randbytes(16384)))
    for off, b in writes:
        wr(off, b)
        ef.seek(off); ef.write(b)
    sync(); ef.flush(); os.fsync(ef.fileno())
    for off, b in writes[-3:]:
        if rd(off, len(b)) != b:
            bad += 1
            print("write not read back at", off, file=sys.stderr)
print(bad)
PY
io() { /usr/bin/python3 "$T/io.py" "$@"; }

log "source disk: 256 MiB random with a zeroed 16 MiB range; full backup"
head -c $SIZE /dev/urandom > "$T/src.img"
dd if=/dev/zero of="$T/src.img" bs=1M seek=64 count=16 conv=notrunc status=none
ctl attach "$T/src.img" --name s31 --via none >/dev/null || fail "attach s31"
timeout 300 "$CTL" backup s31 --to "repo:$REPO" --quiesce-idle 0 >"$T/bk.out" 2>"$T/bk.err" || fail "backup: $(cat "$T/bk.err")"
ctl detach s31 || fail "detach s31"
gen=$(json_field "$(ctl list "repo:$REPO" --json)" '.[0].id')
cp "$T/src.img" "$T/exp_a.img"; cp "$T/src.img" "$T/exp_b.img"

if [ "$(id -u)" = 0 ] && [ -c /dev/fuse ] && command -v nbdfuse >/dev/null && command -v losetup >/dev/null; then
  log "A: restore --live --via fuse, fill limited to $RATE B/s"
  dev=$(COWSNAP_FILL_RATE=$RATE ctl restore "repo:$REPO@$gen" --to "$T/a.img" --live --via fuse --name a31 | tail -n 1) ||
    fail "restore --live --via fuse"
  [ -b "$dev" ] || fail "not a block device: $dev"
  total=$(fill a31 .daemon.fill.total)
  for round in 1 2 3; do
    done_=$(fill a31 .daemon.fill.done)
    [ "$done_" -lt "$total" ] || fail "fill already complete in round $round: raise the disk size or lower RATE"
    bad=$(io "$dev" "$T/exp_a.img" "$round") || fail "io on $dev"
    [ "$bad" = 0 ] || fail "round $round: $bad differences between the device and generation+writes during the fill"
    log "round $round: fill $done_/$total, reads match, writes done"
  done
  wait_fill a31
  cmp "$dev" "$T/exp_a.img" || fail "after the fill the device differs from generation + writes"
  ctl detach a31 || fail "detach a31"
  cmp "$T/a.img" "$T/exp_a.img" || fail "restored file differs from generation + writes"
  log "A: fuse live restore OK"
else
  log "A: skipped (no root/FUSE/nbdfuse here)"
fi

log "B: restore --live --via none, writes during the fill, kill -9 mid-fill"
uri=$(COWSNAP_FILL_RATE=$RATE ctl restore "repo:$REPO@$gen" --to "$T/b.img" --live --via none --name b31 | tail -n 1) ||
  fail "restore --live --via none"
bad=$(io "$uri" "$T/exp_b.img" 11) || fail "io on $uri"
[ "$bad" = 0 ] || fail "$bad differences via NBD during the fill"
log "an incremental backup while the fill runs"
timeout 300 "$CTL" backup b31 --to "repo:$REPO" --incremental --quiesce-idle 0 >"$T/bkf.out" 2>"$T/bkf.err" ||
  fail "backup during the fill: $(cat "$T/bkf.err")"
gf=$(tail -n 1 "$T/bkf.out" | jq -r .generation); cp "$T/exp_b.img" "$T/exp_f.img"
tail -n 1 "$T/bkf.out" | grep -q "full read" && fail "backup during the fill was a full read: $(tail -n 1 "$T/bkf.out")"
st=$(ctl status b31 --json); pid=$(json_field "$st" .daemon.pid)
d1=$(json_field "$st" .daemon.fill.done); total=$(json_field "$st" .daemon.fill.total)
[ "$d1" -lt "$total" ] || fail "fill complete before the kill: $st"
kill -9 "$pid"; wait_gone "$pid" 10 || fail "daemon $pid survived kill -9"
log "killed daemon $pid at fill $d1/$total"
ctl status b31 >/dev/null 2>&1 && fail "status of a killed daemon exits 0"

log "attach the same file under the same name: the fill resumes"
# The rest of the fill takes about 20 s (at least 1 s a 1 MiB chunk), so "not complete
# yet" is still true when status is asked, however late the kill came.
rate=$(( (total - d1) * (1 << 20) / 20 )); [ "$rate" -ge $((1 << 20)) ] || rate=$((1 << 20))
out=$(COWSNAP_FILL_RATE=$rate ctl attach "$T/b.img" --name b31 --via none 2>"$T/att.err") ||
  fail "attach after kill -9: $(cat "$T/att.err")"
uri2=$(printf '%s\n' "$out" | tail -n 1)
[ "$uri2" = "$uri" ] || fail "URI changed: $uri2 vs $uri"
st=$(ctl status b31 --json)
[ "$(json_field "$st" .daemon.fill.complete)" = false ] || fail "fill complete right after the restart: $st"
[ "$(json_field "$st" .daemon.fill.done)" -ge "$d1" ] || fail "the fill started again instead of resuming: $st"
[ "$(json_field "$st" .daemon.restored_from.generation)" = "$gen" ] || fail "restored_from lost: $st"
bad=$(io "$uri" "$T/exp_b.img" 12) || fail "io after restart"
[ "$bad" = 0 ] || fail "$bad differences after the restart"
wait_fill b31
nbdcopy "$uri" "$T/b_now.img" || fail "nbdcopy"
cmp "$T/b_now.img" "$T/exp_b.img" || fail "after the resumed fill the disk differs from generation + writes"

log "after the fill: a normal disk (detach/attach, writes, backup, restore)"
ctl detach b31 || fail "detach b31"
cmp "$T/b.img" "$T/exp_b.img" || fail "file differs after detach"
uri=$(ctl attach "$T/b.img" --name b31 --via none | tail -n 1) || fail "re-attach"
[ "$(fill b31 .daemon.fill.complete)" = true ] || fail "fill not complete after re-attach"
bad=$(io "$uri" "$T/exp_b.img" 13) || fail "io on the plain disk"
[ "$bad" = 0 ] || fail "$bad differences on the plain disk"
timeout 300 "$CTL" backup b31 --to "repo:$REPO" --incremental --quiesce-idle 0 >"$T/bk2.out" 2>"$T/bk2.err" ||
  fail "backup of the restored disk: $(cat "$T/bk2.err")"
tail -n 1 "$T/bk2.out" | jq -c '{generation, notes, bytes_copied}'
g2=$(tail -n 1 "$T/bk2.out" | jq -r .generation)
ctl restore "repo:$REPO@$g2" --to "$T/r2.img" >/dev/null || fail "restore $g2"
cmp "$T/r2.img" "$T/exp_b.img" || fail "backup of the restored disk does not restore to its content"
ctl restore "repo:$REPO@$gf" --to "$T/rf.img" >/dev/null || fail "restore $gf"
cmp "$T/rf.img" "$T/exp_f.img" || fail "the backup taken during the fill does not restore to the disk's content then"
ctl verify "repo:$REPO" >/dev/null || fail "verify"
ctl detach b31 || fail "detach b31"

log "restore --live --wait again under the same name: restored afresh, not taken as resumed; returns complete"
ctl restore "repo:$REPO@$gen" --to "$T/b.img" --live --via none --name b31 --wait >/dev/null 2>"$T/rr.err" || fail "second live restore: $(cat "$T/rr.err")"
grep -q resuming "$T/rr.err" && fail "a completed live restore was taken as interrupted: $(cat "$T/rr.err")"
grep -q 'restore of "b31" complete' "$T/rr.err" || fail "--wait did not say the restore is complete: $(cat "$T/rr.err")"
[ "$(fill b31 .daemon.fill.complete)" = true ] || fail "--wait returned before the fill was complete"
ctl detach b31 || fail "detach b31"
cmp "$T/b.img" "$T/src.img" || fail "the second live restore of the same generation did not restore it"

log "an interrupted restore of $g2: another generation under that name is refused, the same one resumes"
COWSNAP_FILL_RATE=$((4 << 20)) ctl restore "repo:$REPO@$g2" --to "$T/b.img" --live --via none --name b31 >/dev/null 2>&1 || fail "live restore of $g2"
st=$(ctl status b31 --json)
[ "$(json_field "$st" .daemon.fill.complete)" = false ] || fail "fill of $g2 complete at once: $st"
kill -9 "$(json_field "$st" .daemon.pid)"; wait_gone "$(json_field "$st" .daemon.pid)" 10 || fail "kill -9"
ctl restore "repo:$REPO@$gen" --to "$T/b.img" --live --via none --name b31 >/dev/null 2>"$T/rr.err" &&
  fail "a live restore of another generation over a pending one was accepted"
grep -q "$g2" "$T/rr.err" || fail "refusal does not name the pending generation: $(cat "$T/rr.err")"
ctl restore "repo:$REPO@$g2" --to "$T/b.img" --live --via none --name b31 >/dev/null 2>"$T/rr.err" || fail "resume by restore: $(cat "$T/rr.err")"
grep -q resuming "$T/rr.err" || fail "not resumed: $(cat "$T/rr.err")"
wait_fill b31
ctl detach b31 || fail "detach b31"
cmp "$T/b.img" "$T/r2.img" || fail "resumed restore of $g2 differs from the generation"

log "--wait: refused without --live (nothing created); a fill that stops on damage exits non-zero"
ctl restore "repo:$REPO@$gen" --to "$T/w.img" --wait >/dev/null 2>"$T/w.err" && fail "--wait without --live was accepted"
grep -q "needs --live" "$T/w.err" || fail "--wait without --live: unclear refusal: $(cat "$T/w.err")"
[ -e "$T/w.img" ] && fail "a refused restore created its destination"
cp -a "$REPO" "$T/bad-repo"
# every chunk file damaged (a flipped byte at its end): the first batch of the fill fails
find "$T/bad-repo/chunks" -type f | while read -r f; do
  printf '\377' | dd of="$f" bs=1 seek=$(($(stat -c %s "$f") - 1)) conv=notrunc status=none
done
ctl restore "repo:$T/bad-repo@$gen" --to "$T/w.img" --live --via none --name w31 --wait >/dev/null 2>"$T/w.err" &&
  fail "--wait returned success for a fill of damaged chunks"
grep -q 'the restore of "w31" stopped' "$T/w.err" || fail "--wait does not say the fill stopped: $(cat "$T/w.err")"
[ "$(fill w31 .daemon.fill.complete)" = false ] || fail "a failed fill reported complete"
ctl detach w31 || fail "detach w31"
log "PASS"
