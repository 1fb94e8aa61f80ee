#!/usr/bin/env bash
# Progress of the long commands, and logs fit for the journal. A 384 MiB disk (192 MiB
# of random data, the rest zeros) is backed up into a repository, restored, verified
# (also --repair) and pruned with --json: every stdout line is one JSON object of the
# common schema (event, command; progress: done <= total, unit, done never going back
# within a phase; the last line, and only it, the result), several progress lines come
# from restore and backup, and the restored image is the disk. On a terminal (a pty from
# script(1)) restore and verify draw a bar with a percentage; without one nothing but the
# final line is printed. The daemon's log lines carry <N> syslog prefixes (and no
# timestamp) when JOURNAL_STREAM names its stderr, and not when it names another file.
. "$(dirname "$0")/lib.sh"
need script sha256sum stat; [ -x /usr/bin/python3 ] || skip "no /usr/bin/python3"

REPO=$T/repo
sha() { sha256sum "$1" | cut -d' ' -f1; }

# check_lines FILE COMMAND MIN_PROGRESS: the schema; prints the number of progress lines
check_lines() {
  /usr/bin/python3 - "$@" <<'PY'
import json, sys
path, command, min_progress = sys.argv[1], sys.argv[2], int(sys.argv[3])
lines = open(path).read().splitlines()
def bad(msg):
    sys.exit(f"{path}: {msg}")
if not lines:
    bad("no output")
events, last = [], {}
for n, line in enumerate(lines, 1):
    try:
        ev = json.loads(line)
    except ValueError as e:
        bad(f"line {n} is not JSON ({e}): {line!r}")
    if not isinstance(ev, dict) or "event" not in ev:
        bad(f"line {n} has no event: {line}")
    if ev.get("command") != command:
        bad(f"line {n}: command is {ev.get('command')!r}, not {command!r}")
    if ev["event"] == "progress":
        for k in ("done", "total", "unit", "elapsed_ms"):
            if k not in ev:
                bad(f"line {n}: progress without {k}: {line}")
        if ev["unit"] not in ("bytes", "chunks"):
            bad(f"line {n}: unit {ev['unit']!r}")
        if not 0 <= ev["done"] <= ev["total"]:
            bad(f"line {n}: done {ev['done']} not within total {ev['total']}")
        phase = ev.get("phase")
        if ev["done"] < last.get(phase, 0):
            bad(f"line {n}: done went back from {last[phase]} to {ev['done']}")
        last[phase] = ev["done"]
    events.append(ev["event"])
if events[-1] != "result" or events.count("result") != 1:
    bad(f"the last line, and only it, must be the result: {events}")
if "ok" not in json.loads(lines[-1]):
    bad("the result has no ok")
p = events.count("progress")
if p < min_progress:
    bad(f"{p} progress line(s), expected at least {min_progress}")
print(p)
PY
}

log "384 MiB disk: 192 MiB of random data in the middle, zeros around it"
truncate -s 384M "$T/d.img"
head -c $((192 << 20)) /dev/urandom | dd of="$T/d.img" bs=1M seek=96 conv=notrunc status=none
ctl attach "$T/d.img" --name d43 --via none >/dev/null || fail "attach"

log "backup --json"
timeout 300 "$CTL" backup d43 --to "repo:$REPO" --quiesce-idle 0 --json >"$T/bk.json" 2>"$T/bk.err" \
  || fail "backup: $(cat "$T/bk.err")"
n=$(check_lines "$T/bk.json" backup 1) || fail "backup --json"
[ "$(head -n 1 "$T/bk.json" | jq -r .event)" = started ] || fail "backup: the first line is not started"
[ "$(tail -n 1 "$T/bk.json" | jq -r '"\(.ok) \(.state) \(.unit // "-")"')" = "true complete -" ] \
  || fail "backup result: $(tail -n 1 "$T/bk.json")"
[ "$(grep '"progress"' "$T/bk.json" | tail -n 1 | jq -r .unit)" = bytes ] || [ "$n" = 0 ] || fail "backup progress unit"
gen=$(tail -n 1 "$T/bk.json" | jq -r .generation)
log "  $n progress line(s), generation $gen"
ctl detach d43 >/dev/null || fail "detach"

log "restore --json"
ctl restore "repo:$REPO" --to "$T/r.img" --json >"$T/r.json" 2>"$T/r.err" || fail "restore: $(cat "$T/r.err")"
n=$(check_lines "$T/r.json" restore 2) || fail "restore --json"
log "  $n progress line(s): $(grep '"progress"' "$T/r.json" | jq -c '[.done, .total]' | tr '\n' ' ')"
[ "$(tail -n 1 "$T/r.json" | jq -r '"\(.ok) \(.generation) \(.disk_size)"')" = "true $gen $((384 << 20))" ] \
  || fail "restore result: $(tail -n 1 "$T/r.json")"
[ "$(grep '"progress"' "$T/r.json" | head -n 1 | jq -r '"\(.unit) \(.total)"')" = "bytes $((384 << 20))" ] \
  || fail "restore progress: $(head -n 1 "$T/r.json")"
[ ! -s "$T/r.err" ] || fail "restore --json wrote to stderr: $(cat "$T/r.err")"
[ "$(sha "$T/r.img")" = "$(sha "$T/d.img")" ] || fail "the restored image differs from the disk"

log "verify --json, verify --repair --json, prune --json"
ctl verify "repo:$REPO" --json >"$T/v.json" 2>"$T/v.err" || fail "verify: $(cat "$T/v.err")"
n=$(check_lines "$T/v.json" verify 1) || fail "verify --json"
[ "$(tail -n 1 "$T/v.json" | jq -r '"\(.ok) \(.entries_checked)"')" = "true 384" ] \
  || fail "verify result: $(tail -n 1 "$T/v.json")"
[ "$(grep '"progress"' "$T/v.json" | tail -n 1 | jq -r '"\(.phase) \(.unit) \(.total)"')" = "verify chunks 384" ] \
  || fail "verify progress: $(grep progress "$T/v.json" | tail -n 1)"
ctl verify "repo:$REPO" --repair --json >"$T/vr.json" 2>"$T/vr.err" || fail "verify --repair: $(cat "$T/vr.err")"
check_lines "$T/vr.json" verify 1 >/dev/null || fail "verify --repair --json"
[ "$(tail -n 1 "$T/vr.json" | jq -r '.repair.chunks_repaired | length')" = 0 ] || fail "repair of a healthy repository"
ctl prune "repo:$REPO" --keep 1 --json >"$T/p.json" 2>"$T/p.err" || fail "prune: $(cat "$T/p.err")"
check_lines "$T/p.json" prune 0 >/dev/null || fail "prune --json"
[ "$(jq -r '"\(.ok) \(.kept_generations | length)"' "$T/p.json")" = "true 1" ] || fail "prune result: $(cat "$T/p.json")"

log "a failing restore with --json ends with an error result"
ctl restore "repo:$REPO@nosuchgen" --to "$T/x.img" --json >"$T/x.json" 2>/dev/null && fail "restore of a missing generation succeeded"
[ "$(tail -n 1 "$T/x.json" | jq -r '"\(.event) \(.ok) \(.error | length > 0)"')" = "result false true" ] \
  || fail "no error result: $(cat "$T/x.json")"

log "a bar on a terminal, nothing without one"
script -qec "$CTL restore repo:$REPO --to $T/t.img" /dev/null >"$T/tty.out" 2>&1 </dev/null \
  || fail "restore on a pty: $(cat "$T/tty.out")"
grep -aq '[0-9]%' "$T/tty.out" || fail "no percentage on the terminal: $(head -c 600 "$T/tty.out" | od -c | head)"
grep -aq 'restored generation' "$T/tty.out" || fail "no final line on the terminal"
script -qec "$CTL verify repo:$REPO" /dev/null >"$T/ttyv.out" 2>&1 </dev/null || fail "verify on a pty: $(cat "$T/ttyv.out")"
grep -aq '[0-9]%' "$T/ttyv.out" || fail "no percentage for verify on the terminal"
ctl restore "repo:$REPO" --to "$T/t.img" >"$T/plain.out" 2>"$T/plain.err" || fail "restore without a terminal"
[ ! -s "$T/plain.err" ] || fail "restore drew on a non-terminal stderr: $(head -c 300 "$T/plain.err" | od -c | head)"
[ "$(wc -l <"$T/plain.out")" = 1 ] && grep -q '^restored generation' "$T/plain.out" || fail "restore output: $(cat "$T/plain.out")"
ctl verify "repo:$REPO" >"$T/plainv.out" 2>"$T/plainv.err" || fail "verify without a terminal"
[ ! -s "$T/plainv.err" ] || fail "verify drew on a non-terminal stderr: $(cat "$T/plainv.err")"
script -qec "$CTL restore repo:$REPO --to $T/t.img --json" /dev/null >"$T/ttyj.out" 2>&1 </dev/null || fail "restore --json on a pty"
tr -d '\r' <"$T/ttyj.out" >"$T/ttyj.json"
check_lines "$T/ttyj.json" restore 1 >/dev/null || fail "restore --json on a terminal is not only JSON lines"

log "logs in the journal's format when JOURNAL_STREAM names stderr"
truncate -s 16M "$T/j.img"
daemon_log() { # FILE JOURNAL_STREAM: run the daemon in the foreground, stop it, its stderr in FILE
  JOURNAL_STREAM=$2 RUST_LOG=info "$NBD" --name j43 --origin "$T/j.img" --run-dir "$COWSNAP_RUN_DIR" \
    --state-dir "$COWSNAP_STATE_DIR" 2>>"$1" >/dev/null &
  local pid=$!; EXTRA_PIDS+=("$pid")
  for _ in $(seq 100); do ctl status j43 >/dev/null 2>&1 && break; sleep 0.1; done
  ctl status j43 >/dev/null || fail "daemon did not answer: $(cat "$1")"
  kill -TERM "$pid"; wait "$pid" || fail "daemon exited non-zero: $(cat "$1")"
}
: >"$T/j.err"; js=$(stat -c %d:%i "$T/j.err")
daemon_log "$T/j.err" "$js"
[ -s "$T/j.err" ] || fail "the daemon logged nothing"
grep -qv '^<[0-7]>' "$T/j.err" && fail "a journal line without a priority prefix: $(grep -v '^<[0-7]>' "$T/j.err" | head -n 3)"
grep -q '^<6>' "$T/j.err" || fail "no info line (<6>): $(head -n 3 "$T/j.err")"
grep -q '^<[0-7>]*\[' "$T/j.err" && fail "journal lines still carry a timestamp: $(head -n 3 "$T/j.err")"
log "  $(head -n 1 "$T/j.err")"
: >"$T/j2.err"
daemon_log "$T/j2.err" "$js"
grep -q '^<[0-7]>' "$T/j2.err" && fail "prefixes although JOURNAL_STREAM names another file: $(head -n 3 "$T/j2.err")"
grep -q '^\[20[0-9-]*T' "$T/j2.err" || fail "no timestamped line: $(head -n 3 "$T/j2.err")"
: >"$T/j3.err"; js3=$(stat -c %d:%i "$T/j3.err")
JOURNAL_STREAM=$js3 "$NBD" --name j43 --origin "$T/nonexistent.img" --run-dir "$COWSNAP_RUN_DIR" \
  --state-dir "$COWSNAP_STATE_DIR" 2>>"$T/j3.err" >/dev/null && fail "the daemon started on a missing origin"
grep -q '^<3>cowsnap-nbd: error:' "$T/j3.err" || fail "the start-up error is not at priority 3: $(cat "$T/j3.err")"
log "PASS"
