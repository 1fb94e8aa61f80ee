#!/usr/bin/env bash
# Operator mistakes are refused or handled, never turned into damage:
#  - --freeze of anything but a mount point of this disk's own device is refused before
#    anything is frozen; the right mount point works; a freeze is bounded (a snapshot
#    step slower than --freeze-timeout: thawed at the bound, backup cancelled, exit != 0);
#  - two concurrent attaches of one name: exactly one wins, and its daemon, sockets and
#    pid file survive the loser (6 rounds);
#  - detach while a backup runs is refused naming the backup; --force cancels it cleanly;
#  - clear one-line errors: failed attach, non-root status (permission denied), 0-byte
#    and 1000-byte origins; the daemon works in / and relative paths are resolved by
#    cowsnapctl (a relative backup target lands in the caller's directory).
# COWSNAP_T54_SECTIONS="freeze race detach errors" (the default) picks sections, so each
# can be shown to fail on its own against an older build.
. "$(dirname "$0")/lib.sh"
need_root; need_fuse; need mkfs.ext4 e2fsck timeout setpriv nbdinfo /usr/bin/python3

# expect_fail WHAT PATTERN CMD...: CMD must exit non-zero and print PATTERN
expect_fail() {
  local what=$1 pat=$2 out rc; shift 2
  out=$("$@" 2>&1); rc=$?
  [ "$rc" != 0 ] || fail "$what: exit 0, expected failure; output: $out"
  printf '%s' "$out" | grep -qiF -- "$pat" || fail "$what: message lacks '$pat': $out"
  log "ok: $what (rc=$rc): $(printf '%s' "$out" | head -n 1)"
  LAST_OUT=$out
}
# writable DIR [SECONDS]: a write to DIR completes within SECONDS (default 10)
writable() { timeout "${2:-10}" sh -c "echo x > '$1/.probe' && sync -f '$1/.probe'"; }
backup_state() { ctl status "$1" --json | jq -r '.daemon.backup.state // "none"'; }

# ---------------------------------------------------------------- --freeze
section_freeze() {
truncate -s 256M "$T/disk.img"
dev=$(ctl attach "$T/disk.img" --name t54 --via fuse | tail -n 1) || fail "attach t54"
mkfs.ext4 -q -F "$dev" || fail "mkfs"
mkdir -p "$T/mnt"; mount "$dev" "$T/mnt" || fail "mount"; track_mount "$T/mnt"
mkdir -p "$T/mnt/sub"
head -c $((8 << 20)) /dev/urandom > "$T/mnt/a.bin"; sync
# another filesystem, not this disk's: a plain loop-mounted ext4 (harmless to freeze,
# so these cases come first: a build without the check fails here, not on /)
truncate -s 64M "$T/other.img"; mkfs.ext4 -q -F "$T/other.img" || fail "mkfs other"
mkdir -p "$T/other"; mount -o loop "$T/other.img" "$T/other" || fail "mount other"; track_mount "$T/other"

expect_fail "--freeze another disk's filesystem" "unable to freeze" \
  timeout 60 "$CTL" backup t54 --to "file:$T/x1.raw" --freeze "$T/other"
printf '%s' "$LAST_OUT" | grep -qF "is mounted on $T/mnt" || fail "refusal does not say where the disk is mounted: $LAST_OUT"
expect_fail "--freeze a subdirectory of the disk's mount" "not a mount point" \
  timeout 60 "$CTL" backup t54 --to "file:$T/x2.raw" --freeze "$T/mnt/sub"
expect_fail "--freeze a directory on the root filesystem" "unable to freeze" \
  timeout 60 "$CTL" backup t54 --to "file:$T/x3.raw" --freeze "$T"
expect_fail "--freeze /" "unable to freeze" \
  timeout 60 "$CTL" backup t54 --to "file:$T/x4.raw" --freeze /
expect_fail "--freeze-timeout over the cap" "at most 10s" \
  timeout 60 "$CTL" backup t54 --to "file:$T/x5.raw" --freeze "$T/mnt" --freeze-timeout 1m
[ "$(backup_state t54)" = none ] || fail "a refused --freeze started a backup: $(backup_state t54)"
for f in x1 x2 x3 x4 x5; do [ ! -e "$T/$f.raw" ] || fail "refused backup created $f.raw"; done
writable "$T/mnt" 5 && writable "$T/other" 5 && writable "$T" 5 || fail "a filesystem was left frozen"

log "--freeze of the disk's own mount point"
out=$(timeout 300 "$CTL" backup t54 --to "file:$T/img1.raw" --freeze "$T/mnt" --container ram:16M 2>"$T/err1") ||
  fail "backup --freeze $T/mnt failed: $(cat "$T/err1")"
printf '%s\n' "$out" | tail -n 1 | jq -e '.event == "result" and .state == "complete"' >/dev/null || fail "no complete event: $out"
fz=$(printf '%s\n' "$out" | head -n 1 | jq -r '.frozen_ms')
[ -n "$fz" ] && [ "$fz" != null ] && [ "$fz" -lt 5000 ] || fail "frozen_ms not reported or over the bound: $out"
log "frozen for $fz ms around the snapshot instant"
e2fsck -fn "$T/img1.raw" >/dev/null || fail "image of the frozen filesystem is not clean"
writable "$T/mnt" 5 || fail "left frozen after the backup"

log "a snapshot step slower than the freeze bound: thawed at the bound, backup cancelled"
# --quiesce-idle 4s keeps the daemon from taking the instant for 4 s after the last write
# (the freeze itself writes), far beyond --freeze-timeout 1s.
t0=$(date +%s%N)
timeout 120 "$CTL" backup t54 --to "file:$T/img2.raw" --freeze "$T/mnt" --freeze-timeout 1s \
  --quiesce-idle 4s >"$T/out2" 2>"$T/err2" &
bp=$!; EXTRA_PIDS+=("$bp")
sleep 0.3
writable "$T/mnt" 20 || fail "filesystem stayed frozen for 20 s"
t1=$(date +%s%N); thawed_ms=$(( (t1 - t0) / 1000000 ))
log "a write issued while frozen completed $thawed_ms ms after the backup command started"
wait "$bp"; rc=$?
t2=$(date +%s%N); ended_ms=$(( (t2 - t0) / 1000000 ))
log "backup exit $rc after $ended_ms ms: $(cat "$T/err2")"
[ "$rc" != 0 ] || fail "backup whose instant came after the thaw exited 0: $(cat "$T/out2")"
grep -q "not reached within 1000 ms" "$T/err2" || fail "unclear bound failure: $(cat "$T/err2")"
grep -q "cancelled" "$T/err2" || fail "backup not reported cancelled: $(cat "$T/err2")"
grep -q '"state":"complete"' "$T/out2" && fail "complete reported for an inconsistent image: $(cat "$T/out2")"
[ "$thawed_ms" -lt 3000 ] || fail "the freeze lasted about $thawed_ms ms, over the 1 s bound"
[ "$ended_ms" -gt "$thawed_ms" ] || fail "backup ended before the thaw?"
[ "$(backup_state t54)" = failed ] || fail "daemon's backup state is $(backup_state t54), expected failed"
[ -e "$T/img2.raw.incomplete" ] || fail "the cancelled image is not marked incomplete"
umount "$T/mnt" || fail "umount"
ctl detach t54 || fail "detach t54"
umount "$T/other"
}

# ---------------------------------------------------------------- attach races
section_race() {
truncate -s 64M "$T/c1.img" "$T/c2.img"
for round in 1 2 3 4 5 6; do
  ctl attach "$T/c1.img" --name race --via none >"$T/r1.out" 2>"$T/r1.err" & p1=$!
  ctl attach "$T/c2.img" --name race --via none >"$T/r2.out" 2>"$T/r2.err" & p2=$!
  wait "$p1"; rc1=$?; wait "$p2"; rc2=$?
  if [ "$rc1" = 0 ] && [ "$rc2" != 0 ]; then win=c1; lose=2
  elif [ "$rc2" = 0 ] && [ "$rc1" != 0 ]; then win=c2; lose=1
  else fail "round $round: exit codes $rc1 and $rc2 (exactly one attach must win): $(cat "$T/r1.err" "$T/r2.err")"
  fi
  sleep 0.5   # let anything the loser might still do happen
  for f in race.ctl race.nbd; do [ -S "$COWSNAP_RUN_DIR/$f" ] || fail "round $round: $f gone after the race"; done
  [ -f "$COWSNAP_RUN_DIR/race.pid" ] || fail "round $round: pid file gone after the race"
  st=$(ctl status race --json) || fail "round $round: winner's daemon does not answer"
  [ "$(json_field "$st" .daemon.origin)" = "$T/$win.img" ] || fail "round $round: serving $(json_field "$st" .daemon.origin), winner was $win"
  [ "$(cat "$COWSNAP_RUN_DIR/race.pid")" = "$(json_field "$st" .daemon.pid)" ] || fail "round $round: pid file is not the winner's"
  n=$(pgrep -fc -- "--name race --origin $T/")
  [ "$n" = 1 ] || fail "round $round: $n daemons for one name"
  [ "$(nbdinfo --size "nbd+unix:///race?socket=$COWSNAP_RUN_DIR/race.nbd")" = 67108864 ] || fail "round $round: winner does not serve NBD"
  [ "$(wc -l < "$T/r$lose.err")" = 1 ] || fail "round $round: loser's error is not one line: $(cat "$T/r$lose.err")"
  ctl detach race >/dev/null 2>&1 || fail "round $round: detach"
  [ -z "$(ls -A "$COWSNAP_RUN_DIR")" ] || fail "round $round: files left after detach: $(ls "$COWSNAP_RUN_DIR")"
  log "round $round: $win won; loser: $(cat "$T/r$lose.err")"
done
}

# ---------------------------------------------------------------- detach during a backup
section_detach() {
head -c $((48 << 20)) /dev/urandom > "$T/d.img"
ctl attach "$T/d.img" --name busy --via none >/dev/null || fail "attach busy"
dpid=$(cat "$COWSNAP_RUN_DIR/busy.pid")
"$CTL" backup busy --to "file:$T/slow.raw" --rate-limit 4M --quiesce-idle 0 >"$T/bout" 2>"$T/berr" &
bk=$!; EXTRA_PIDS+=("$bk")
for _ in $(seq 100); do grep -q '"event":"started"' "$T/bout" 2>/dev/null && break; sleep 0.1; done
grep -q '"event":"started"' "$T/bout" || fail "slow backup did not start: $(cat "$T/berr")"
expect_fail "detach during a backup" "backup #1 to file:$T/slow.raw" ctl detach busy
printf '%s' "$LAST_OUT" | grep -q -- "--force" || fail "refusal does not mention --force: $LAST_OUT"
running "$bk" || fail "the backup died after the refused detach: $(cat "$T/berr")"
running "$dpid" || fail "the daemon died after the refused detach"
[ "$(backup_state busy)" = running ] || fail "backup state after refused detach: $(backup_state busy)"
out=$(timeout 120 "$CTL" detach --force busy 2>&1) || fail "detach --force: $out"
log "detach --force: $(printf '%s' "$out" | tr '\n' ' ')"
printf '%s' "$out" | grep -q "cancelling backup #1" || fail "detach --force did not say it cancels the backup: $out"
wait "$bk"; brc=$?
log "backup command exit $brc: $(cat "$T/berr")"
[ "$brc" != 0 ] || fail "cancelled backup exited 0"
grep -qi "cancel" "$T/berr" || fail "backup command does not report the cancel: $(cat "$T/berr")"
grep -qi "broken pipe" "$T/berr" && fail "backup command was cut off: $(cat "$T/berr")"
[ -e "$T/slow.raw.incomplete" ] || fail "cancelled image not marked incomplete"
wait_gone "$dpid" 10 || fail "daemon still running after detach --force"
[ -z "$(ls -A "$COWSNAP_RUN_DIR")" ] || fail "files left after detach --force: $(ls "$COWSNAP_RUN_DIR")"
}

# ---------------------------------------------------------------- clear errors
section_errors() {
log "0-byte and 1000-byte origins are refused, touching nothing"
: > "$T/empty.img"; truncate -s 1000 "$T/odd.img"
expect_fail "0-byte origin" "empty (0 bytes)" ctl attach "$T/empty.img" --via none
expect_fail "1000-byte origin" "not a multiple of 512" ctl attach "$T/odd.img" --via none
expect_fail "daemon: 1000-byte origin" "not a multiple of 512" \
  "$NBD" --name odd --origin "$T/odd.img" --run-dir "$COWSNAP_RUN_DIR" --state-dir "$COWSNAP_STATE_DIR"
[ -z "$(ls -A "$COWSNAP_RUN_DIR")" ] || fail "refused attaches left files: $(ls "$COWSNAP_RUN_DIR")"
[ "$(stat -c %s "$T/odd.img")" = 1000 ] || fail "odd.img changed"

log "relative paths: the daemon works in /, cowsnapctl resolves paths"
mkdir -p "$T/work"; truncate -s 32M "$T/work/rel.img"
(cd "$T/work" && "$CTL" attach rel.img --name rel --via none >/dev/null) || fail "relative attach"
rpid=$(cat "$COWSNAP_RUN_DIR/rel.pid")
[ "$(readlink "/proc/$rpid/cwd")" = / ] || fail "daemon cwd is $(readlink "/proc/$rpid/cwd"), not /"
[ "$(json_field "$(ctl status rel --json)" .daemon.origin)" = "$T/work/rel.img" ] || fail "origin not absolute"
(cd "$T/work" && "$CTL" backup rel --to file:rel-backup.raw --quiesce-idle 0 >/dev/null 2>"$T/rerr") ||
  fail "relative backup target: $(cat "$T/rerr")"
[ -f "$T/work/rel-backup.raw" ] || fail "relative target did not land in the caller's directory"
[ ! -e /rel-backup.raw ] || fail "relative target landed in /"
r=$(printf '%s\n' '{"v":1,"cmd":"backup","params":{"to":"file:rel-raw.raw"}}' |
  /usr/bin/python3 -c 'import socket,sys
s=socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])
s.sendall(sys.stdin.buffer.read()); print(s.makefile().readline().strip())' "$COWSNAP_RUN_DIR/rel.ctl")
printf '%s' "$r" | jq -e '.ok == false and (.error | test("relative"))' >/dev/null ||
  fail "a relative path over the control socket was not refused: $r"
[ ! -e /rel-raw.raw ] || { rm -f /rel-raw.raw /rel-raw.raw.incomplete; fail "relative control path landed in /"; }

log "a failed attach gives the daemon's reason in one line"
expect_fail "attach of a served file under another name" "served by another cowsnap daemon" \
  ctl attach "$T/work/rel.img" --name rel2 --via none
[ "$(printf '%s\n' "$LAST_OUT" | wc -l)" = 1 ] || fail "failed attach printed more than one line: $LAST_OUT"

log "non-root status: permission denied, not 'daemon not responding'"
nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups env COWSNAP_RUN_DIR="$COWSNAP_RUN_DIR" "$@"; }
uctl=$CTL
if ! nobody "$uctl" --version >/dev/null 2>&1; then
  # the build is not reachable by nobody: a copy it can run (the run dir stays 0700)
  install -d -m 755 "$T/pub"; cp "$CTL" "$T/pub/cowsnapctl"; chmod 711 "$T"; uctl=$T/pub/cowsnapctl
  nobody "$uctl" --version >/dev/null || fail "nobody cannot run cowsnapctl"
fi
expect_fail "status as nobody" "unable to query disk \"rel\": permission denied" nobody "$uctl" status rel
printf '%s' "$LAST_OUT" | grep -q "not responding" && fail "non-root status says not responding: $LAST_OUT"
expect_fail "status of all as nobody" "unable to list the attached disks: permission denied" nobody "$uctl" status
expect_fail "backup as nobody" "unable to back up rel: permission denied" nobody "$uctl" backup rel --to file:/tmp/never.raw
[ ! -e /tmp/never.raw ] || fail "a refused backup created its target"
ctl detach rel >/dev/null 2>&1 || fail "detach rel"
}

for sec in ${COWSNAP_T54_SECTIONS:-freeze race detach errors}; do
  log "=== $sec"
  "section_$sec"
done
log "PASS"
