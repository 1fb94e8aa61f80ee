#!/usr/bin/env bash
# Consistency groups: one snapshot instant across several disks.
#  A. The protocol, step by step against a real daemon, as a misbehaving coordinator
#     would drive it (tests/group_check.py proto): gone after prepared, silent while
#     paused (the daemon resumes by itself at the pause limit, a held write completes),
#     gone before commit, a stray command while paused, the whole protocol.
#  B. Causal writers (write N to disk A, wait for the acknowledgement, write N to B; 4
#     writers) under full and incremental group backups of A and B: in every restored
#     group each disk is one instant and B never holds a write whose A write is missing.
#     The same check fails for two single-disk backups taken one after the other.
#  C. A daemon killed -9 while the group is being prepared: the command fails naming it,
#     the other disk is not left paused and nothing is published.
#  D. Hooks: a failing and a hanging pre-snapshot hook fail the backup before anything
#     is paused; the post-snapshot hook runs and is recorded.
. "$(dirname "$0")/lib.sh"
need nbdcopy
/usr/bin/python3 -c 'import nbd' 2>/dev/null || skip "python3-libnbd is not installed"
CHECK=$ROOT/tests/group_check.py
SIZE=$((64 << 20))
bstate() { ctl status "$1" --json | jq -r '.daemon.backup.state // "none"'; }
bid() { ctl status "$1" --json | jq -r '.daemon.backup.id // 0'; }
ngens() { find "$1/generations" -name '*.json' 2>/dev/null | wc -l; }

truncate -s $SIZE "$T/a.img" "$T/b.img"
ua=$(ctl attach "$T/a.img" --name ga --via none | tail -n 1) || fail "attach a"
ub=$(ctl attach "$T/b.img" --name gb --via none | tail -n 1) || fail "attach b"

log "A: the protocol step by step"
/usr/bin/python3 "$CHECK" proto "$COWSNAP_RUN_DIR/ga.ctl" "$ua" "$T/repo-proto" \
  || fail "protocol checks"

log "B: causal writers under group backups"
/usr/bin/python3 "$CHECK" write "$ua" "$ub" "$T/stop" "$T/writers.json" 4 &
W=$!; EXTRA_PIDS+=("$W")
sleep 1
running "$W" || fail "the writers stopped early"
ctl backup ga gb --to "repo:$T/repo" --json >"$T/g1.json" 2>"$T/g1.err" || fail "group backup: $(cat "$T/g1.err")"
sleep 0.5
ctl backup ga gb --to "repo:$T/repo" --incremental --json >"$T/g2.json" 2>"$T/g2.err" \
  || fail "incremental group backup: $(cat "$T/g2.err")"
sleep 0.5
# the control: two single-disk backups one after the other
ctl backup ga --to "repo:$T/repo-single" --quiesce-idle 0 --json >"$T/s1.json" 2>&1 || fail "single backup a"
sleep 1
ctl backup gb --to "repo:$T/repo-single" --quiesce-idle 0 --json >"$T/s2.json" 2>&1 || fail "single backup b"
touch "$T/stop"
wait "$W" || fail "the writers failed"
log "writers reached $(cat "$T/writers.json")"
for g in g1 g2; do
  r=$(tail -n 1 "$T/$g.json")
  [ "$(json_field "$r" .ok)" = true ] || fail "$g: $r"
  pause=$(json_field "$r" .pause_us); lim=$(json_field "$r" .pause_limit_ms)
  log "$g: group $(json_field "$r" .group), writes paused for at most $pause µs (limit $lim ms)"
  [ "$pause" -gt 0 ] && [ "$pause" -lt $((lim * 1000)) ] || fail "$g: pause $pause µs not within the limit"
  [ "$(json_field "$r" '.disks | length')" = 2 ] || fail "$g: not two disks: $r"
  for d in ga gb; do
    gen=$(json_field "$r" ".disks[] | select(.name == \"$d\") | .generation")
    [ -n "$gen" ] && [ "$gen" != null ] || fail "$g: no generation for $d"
    jq -e --arg id "$(json_field "$r" .group)" '.group.id == $id and (.group.disks == ["ga","gb"])' \
      "$T/repo/generations/$gen.json" >/dev/null || fail "$g: generation $gen does not carry the group"
    ctl restore "repo:$T/repo@$gen" --to "$T/$g-$d.img" >/dev/null 2>"$T/restore.err" \
      || fail "restore $g $d: $(cat "$T/restore.err")"
  done
  [ "$g" = g2 ] && { jq -e '.disks[] | select(.name == "ga") | .generation' <<<"$r" >/dev/null; \
    kind=$(jq -r .kind "$T/repo/generations/$(json_field "$r" '.disks[0].generation').json"); \
    [ "$kind" = incremental ] || fail "g2 is $kind, not incremental"; }
  /usr/bin/python3 "$CHECK" check "$T/$g-ga.img" "$T/$g-gb.img" 4 || fail "$g is not one instant across the disks"
done
sa=$(tail -n 1 "$T/s1.json" | jq -r .generation); sb=$(tail -n 1 "$T/s2.json" | jq -r .generation)
ctl restore "repo:$T/repo-single@$sa" --to "$T/s-ga.img" >/dev/null 2>&1 || fail "restore single a"
ctl restore "repo:$T/repo-single@$sb" --to "$T/s-gb.img" >/dev/null 2>&1 || fail "restore single b"
/usr/bin/python3 "$CHECK" check "$T/s-ga.img" "$T/s-gb.img" 4; rc=$?
[ "$rc" = 1 ] || fail "the check did not catch two separate single-disk backups (exit $rc)"
log "the same check fails for two single-disk backups one after the other, as it must"

log "B2: a group snapshot (pull mode) under the same writers: nbdcopy of both exports"
rm -f "$T/stop"
/usr/bin/python3 "$CHECK" write "$ua" "$ub" "$T/stop" "$T/writers2.json" 4 &
W=$!; EXTRA_PIDS+=("$W")
sleep 1
ctl snapshot ga gb --json >"$T/snap.json" 2>"$T/snap.err" || fail "group snapshot: $(cat "$T/snap.err")"
sleep 0.5
for d in ga gb; do
  su=$(jq -r --arg d "$d" '.disks[] | select(.name == $d) | .uri' "$T/snap.json")
  [ -n "$su" ] && [ "$su" != null ] || fail "no export for $d: $(cat "$T/snap.json")"
  nbdcopy "$su" "$T/snap-$d.img" || fail "nbdcopy of $d's snapshot"
done
touch "$T/stop"; wait "$W" || fail "the writers failed"
ctl release ga gb >/dev/null 2>&1 || fail "release of the group snapshot"
log "group snapshot: writes paused at most $(jq -r .pause_bound_us "$T/snap.json") µs (coordinator's bound)"
/usr/bin/python3 "$CHECK" check "$T/snap-ga.img" "$T/snap-gb.img" 4 || fail "the group snapshot is not one instant across the disks"
ctl status ga --json | jq -e '.daemon.snapshot == null' >/dev/null || fail "ga still has a snapshot after release"

log "C: a daemon killed while the group is prepared"
pb=$(cat "$COWSNAP_RUN_DIR/gb.pid")
before_a=$(bid ga)
kill -STOP "$pb"
ctl backup ga gb --to "repo:$T/repo3" >"$T/c.out" 2>"$T/c.err" &
BK=$!; EXTRA_PIDS+=("$BK")
for _ in $(seq 200); do
  [ "$(bid ga)" != "$before_a" ] && [ "$(bstate ga)" = quiescing ] && break
  sleep 0.05
done
[ "$(bstate ga)" = quiescing ] || fail "ga never got prepared (state $(bstate ga))"
kill -KILL "$pb"
wait "$BK"; rc=$?
[ "$rc" != 0 ] || fail "the group backup succeeded with a dead daemon"
grep -q "gb" "$T/c.err" || fail "the error does not name the dead disk: $(cat "$T/c.err")"
for _ in $(seq 100); do [ "$(bstate ga)" = failed ] && break; sleep 0.05; done
[ "$(bstate ga)" = failed ] || fail "ga's backup is $(bstate ga), not failed"
t0=$(date +%s%N)
timeout 5 /usr/bin/python3 -c 'import nbd,sys; h=nbd.NBD(); h.connect_uri(sys.argv[1]); h.pwrite(b"x"*4096, 0); h.shutdown()' "$ua" \
  || fail "ga does not take writes after the failed group"
log "ga took a write $(( ($(date +%s%N) - t0) / 1000000 )) ms after; error: $(tail -n 1 "$T/c.err")"
[ "$(ngens "$T/repo3")" = 0 ] || fail "something was published"
timeout 30 "$CTL" detach --force gb >/dev/null 2>&1
ub=$(ctl attach "$T/b.img" --name gb --via none | tail -n 1) || fail "re-attach b"

log "C2: a daemon killed -9 after the instant, while the group copies"
head -c $((32 << 20)) /dev/urandom | dd of="$T/a.img" conv=notrunc status=none
head -c $((32 << 20)) /dev/urandom | dd of="$T/b.img" conv=notrunc status=none
before_a=$(bid ga)
ctl backup ga gb --to "repo:$T/repo3" --rate-limit 4M >"$T/c2.out" 2>"$T/c2.err" &
BK=$!; EXTRA_PIDS+=("$BK")
for _ in $(seq 200); do
  [ "$(bid ga)" != "$before_a" ] && [ "$(bstate ga)" = running ] && [ "$(bstate gb)" = running ] && break
  sleep 0.05
done
[ "$(bstate gb)" = running ] || fail "the group never got running (ga $(bstate ga), gb $(bstate gb))"
kill -KILL "$(cat "$COWSNAP_RUN_DIR/gb.pid")"
wait "$BK"; rc=$?
[ "$rc" != 0 ] || fail "the group backup succeeded although gb's daemon died"
grep -q "gb" "$T/c2.err" || fail "the error does not name gb: $(cat "$T/c2.err")"
for _ in $(seq 100); do [ "$(bstate ga)" = failed ] && break; sleep 0.05; done
[ "$(bstate ga)" = failed ] || fail "ga's backup is $(bstate ga) after gb died"
[ "$(ngens "$T/repo3")" = 0 ] || fail "a generation was published for a group whose daemon died"
log "ga's backup: $(ctl status ga --json | jq -r .daemon.backup.error)"
timeout 30 "$CTL" detach --force gb >/dev/null 2>&1
ub=$(ctl attach "$T/b.img" --name gb --via none | tail -n 1) || fail "re-attach b"

log "D: hooks"
before_a=$(bid ga)
ctl backup ga gb --to "repo:$T/repo4" --pre-snapshot 'echo checkpoint failed; exit 3' >"$T/d.out" 2>"$T/d.err" \
  && fail "a failing pre-snapshot hook did not fail the backup"
grep -q "exited 3" "$T/d.err" && grep -q "nothing was paused" "$T/d.err" || fail "hook failure message: $(cat "$T/d.err")"
[ "$(bid ga)" = "$before_a" ] || fail "a backup was started despite the failing hook"
t0=$(date +%s)
ctl backup ga gb --to "repo:$T/repo4" --pre-snapshot 'sleep 60' --hook-timeout 1s >"$T/d.out" 2>"$T/d.err" \
  && fail "a hanging pre-snapshot hook did not fail the backup"
[ $(( $(date +%s) - t0 )) -lt 10 ] || fail "the hanging hook was not bounded"
grep -q "killed" "$T/d.err" || fail "hanging hook message: $(cat "$T/d.err")"
[ "$(ngens "$T/repo4")" = 0 ] || fail "a generation after failed hooks"
r=$(ctl backup ga gb --to "repo:$T/repo4" --pre-snapshot 'echo pre-ok' --post-snapshot 'echo "post $COWSNAP_RESULT"' --json 2>"$T/d.err" | tail -n 1) \
  || fail "backup with hooks: $(cat "$T/d.err")"
gen=$(json_field "$r" '.disks[0].generation')
jq -e '(.notes | map(select(test("pre-snapshot hook .* exited 0.*pre-ok"))) | length) == 1 and
       (.notes | map(select(test("post-snapshot hook .* exited 0.*post ok"))) | length) == 1' \
  "$T/repo4/generations/$gen.json" >/dev/null || fail "hook notes not in the generation: $(jq .notes "$T/repo4/generations/$gen.json")"
# flags refused before anything happens
ctl backup ga gb --to "file:$T/x.img" 2>"$T/e.err" && fail "a file target for a group was accepted"
ctl backup ga gb --to "repo:$T/repo5" --pause-limit 30s 2>"$T/e.err" && fail "--pause-limit 30s accepted"
ctl backup ga ga --to "repo:$T/repo5" 2>"$T/e.err" && fail "a disk named twice was accepted"
[ ! -e "$T/x.img" ] && [ ! -e "$T/repo5" ] || fail "a refused command left files behind"
log "PASS"
