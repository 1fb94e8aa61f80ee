#!/usr/bin/env bash
# Error paths of cowsnapctl and the daemon: missing device, bad flags, a name attached
# twice, unknown names, a daemon that dies at start, garbage on the control socket (error
# reply, daemon keeps serving), SIGTERM shutdown removing sockets and pid file.
. "$(dirname "$0")/lib.sh"
need /usr/bin/python3 timeout

# expect_fail WHAT PATTERN CMD...: CMD must exit non-zero and print PATTERN (stderr/stdout)
expect_fail() {
  local what=$1 pat=$2 out rc; shift 2
  out=$("$@" 2>&1); rc=$?
  [ "$rc" != 0 ] || fail "$what: exit 0, expected failure; output: $out"
  printf '%s' "$out" | grep -qiF -- "$pat" || fail "$what: message lacks '$pat': $out"
  log "ok: $what (rc=$rc): $(printf '%s' "$out" | head -n 1)"
}

# ctl_raw SOCKET: send stdin lines to the control socket, print the reply lines
CTL_RAW_PY='import socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])
lines = sys.stdin.buffer.read().split(b"\n")
out = b""
for l in lines:
    if not l:
        continue
    s.sendall(l + b"\n")
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        buf += chunk
    out += buf
sys.stdout.write(out.decode())
'
ctl_raw() { /usr/bin/python3 -c "$CTL_RAW_PY" "$1"; }

truncate -s 64M "$T/a.img"

# --- missing device / file
expect_fail "missing device" "/dev/does-not-exist" ctl attach /dev/does-not-exist --via none
expect_fail "directory as origin" "not a block device or a regular file" ctl attach "$T" --via none
expect_fail "daemon: missing origin" "$T/nope.img" "$NBD" --name x --origin "$T/nope.img" --run-dir "$T/run" --state-dir "$T/state"

# --- bad flags
expect_fail "bad --via" "invalid value" ctl attach "$T/a.img" --via bogus
expect_fail "bad --name" "invalid --name" ctl attach "$T/a.img" --name "a/b" --via none
expect_fail "bad --listen" "invalid --listen" ctl attach "$T/a.img" --via none --listen 127.0.0.1:99999
expect_fail "--nbd-device without --via nbd" "needs --via nbd" ctl attach "$T/a.img" --via none --nbd-device /dev/nbd3
expect_fail "bad --chunk-size" "chunk size" ctl attach "$T/a.img" --via none --chunk-size 1000
expect_fail "unknown subcommand" "unrecognized subcommand" ctl explode
expect_fail "daemon: bad --listen" "invalid --listen" "$NBD" --name x --origin "$T/a.img" --run-dir "$T/run" --state-dir "$T/state" --listen nowhere
expect_fail "daemon: missing --origin" "--origin" "$NBD" --name x
expect_fail "backup: bad target" "invalid target" ctl backup a --to /tmp/x.img
expect_fail "backup: bad duration" "invalid duration" ctl backup a --to file:/tmp/x --quiesce-idle 3parsecs
expect_fail "backup: bad size" "invalid size" ctl backup a --to file:/tmp/x --rate-limit 10Q
expect_fail "backup: bad priority" "invalid range" ctl backup a --to file:/tmp/x --priority 10
expect_fail "backup: --incremental to a file" "repository" ctl backup a --to file:/tmp/x --incremental
[ -z "$(ls -A "$T/run")" ] || fail "failed attaches left files in the run dir: $(ls "$T/run")"

# --- unknown names
expect_fail "detach unknown" "no disk named \"ghost\"" ctl detach ghost
expect_fail "status unknown" "no disk named \"ghost\"" ctl status ghost
expect_fail "backup unknown" "not attached" ctl backup ghost --to file:"$T/b.img"
expect_fail "snapshot unknown" "not attached" ctl snapshot ghost
expect_fail "release unknown" "not attached" ctl release ghost
expect_fail "snapshot: bad duration" "invalid duration" ctl snapshot ghost --quiesce-idle 3parsecs

# --- daemon dies at start: the error carries the log's tail
cat > "$T/fake-daemon" <<'SH'
#!/bin/sh
echo "fake daemon: cannot serve anything" >&2
exit 3
SH
chmod +x "$T/fake-daemon"
expect_fail "daemon exits early" "cannot serve anything" env COWSNAP_NBD_BIN="$T/fake-daemon" "$CTL" attach "$T/a.img" --via none
[ ! -e "$COWSNAP_RUN_DIR/a.img.attach.json" ] || fail "attach record left after failed start"

# --- attach twice with the same name
uri=$(ctl attach "$T/a.img" --name dup --via none | tail -n 1) || fail "attach --via none"
case $uri in "nbd+unix:///dup?socket=$COWSNAP_RUN_DIR/dup.nbd") ;; *) fail "unexpected URI $uri";; esac
[ "$(stat -c %a "$COWSNAP_RUN_DIR")" = 700 ] || fail "run dir mode is not 0700"
for s in dup.nbd dup.ctl; do
  [ -S "$COWSNAP_RUN_DIR/$s" ] || fail "$s is not a socket"
  [ "$(stat -c %a "$COWSNAP_RUN_DIR/$s")" = 600 ] || fail "$s mode is not 0600"
done
truncate -s 64M "$T/b.img"
expect_fail "attach twice" "already attached" ctl attach "$T/b.img" --name dup --via none
expect_fail "daemon twice" "already served" "$NBD" --name dup --origin "$T/b.img" --run-dir "$COWSNAP_RUN_DIR" --state-dir "$COWSNAP_STATE_DIR"
[ -S "$COWSNAP_RUN_DIR/dup.ctl" ] || fail "second daemon removed the first one's socket"
expect_fail "same file under another name" "served by another cowsnap daemon" ctl attach "$T/a.img" --name other --via none
expect_fail "same file read-only" "served by another cowsnap daemon" ctl attach "$T/a.img" --name other --via none --read-only

# --- garbage on the control socket
replies=$(printf '%s\n' 'hello' '{"v":1}' '{"v":7,"cmd":"status"}' '{"v":1,"cmd":"explode"}' '[]' '{"v":1,"cmd":"priority","ranges":"x"}' '{"v":1,"cmd":"status"}' |
  ctl_raw "$COWSNAP_RUN_DIR/dup.ctl") || fail "control socket conversation"
[ "$(printf '%s\n' "$replies" | grep -c '"ok":false')" = 6 ] || fail "expected 6 error replies: $replies"
printf '%s\n' "$replies" | tail -n 1 | jq -e '.ok == true and .name == "dup" and .v == 1' >/dev/null ||
  fail "status after garbage: $replies"
log "ok: garbage lines got error replies"
# binary junk and an oversized line
head -c 3000000 /dev/urandom | tr -d '\n' > "$T/junk"; echo >> "$T/junk"
ctl_raw "$COWSNAP_RUN_DIR/dup.ctl" < "$T/junk" | grep -q '"ok":false' || fail "oversized line got no error reply"
st=$(ctl status dup --json) || fail "daemon stopped answering after garbage"
[ "$(json_field "$st" .daemon.name)" = dup ] || fail "status after junk: $st"
r=$(printf '%s\n' '{"v":1,"cmd":"backup_status"}' '{"v":1,"cmd":"flush"}' | ctl_raw "$COWSNAP_RUN_DIR/dup.ctl")
[ "$(printf '%s\n' "$r" | grep -c '"ok":true')" = 2 ] || fail "backup_status/flush: $r"
log "ok: daemon still serves after junk"

# --- read-only and TCP listen are reported
port=$(( 20000 + RANDOM % 20000 ))
ctl attach "$T/b.img" --name ro --via none --read-only --listen "tcp:127.0.0.1:$port" --insecure-tcp >/dev/null || fail "attach --read-only"
st=$(ctl status ro --json)
[ "$(json_field "$st" .daemon.read_only)" = true ] || fail "read_only not reported: $st"
[ "$(json_field "$st" '.daemon.listen[0]')" = "tcp:127.0.0.1:$port" ] || fail "listen not reported: $st"
[ ! -e "$COWSNAP_STATE_DIR/ro" ] || fail "a read-only disk got a state directory: $(ls -R "$COWSNAP_STATE_DIR/ro")"
ss -ltn | grep -q "127.0.0.1:$port " || fail "nothing listens on 127.0.0.1:$port"
ctl detach ro || fail "detach ro"
ss -ltn | grep -q "127.0.0.1:$port " && fail "TCP port still open after detach"

# --- detach: stops the daemon, removes sockets, pid file and record
pid=$(cat "$COWSNAP_RUN_DIR/dup.pid")
ctl detach dup || fail "detach dup"
wait_gone "$pid" 5 || fail "daemon $pid still running after detach"
[ -z "$(ls -A "$COWSNAP_RUN_DIR")" ] || fail "files left after detach: $(ls "$COWSNAP_RUN_DIR")"

# --- the daemon in the foreground: SIGTERM → exit 0, files removed
"$NBD" --name fg --origin "$T/a.img" --run-dir "$COWSNAP_RUN_DIR" --state-dir "$COWSNAP_STATE_DIR" >"$T/fg.log" 2>&1 &
fg=$!; EXTRA_PIDS+=("$fg")
for _ in $(seq 100); do ctl status fg >/dev/null 2>&1 && break; sleep 0.1; done
ctl status fg >/dev/null || fail "foreground daemon did not answer: $(cat "$T/fg.log")"
[ "$(cat "$COWSNAP_RUN_DIR/fg.pid")" = "$fg" ] || fail "pid file does not hold $fg"
kill -TERM "$fg"
wait "$fg"; rc=$?
[ "$rc" = 0 ] || fail "daemon exited $rc on SIGTERM: $(cat "$T/fg.log")"
[ -z "$(ls -A "$COWSNAP_RUN_DIR")" ] || fail "files left after SIGTERM: $(ls "$COWSNAP_RUN_DIR")"
grep -q "origin flushed" "$T/fg.log" || fail "no flush logged at shutdown"

# --- a clean stop is recorded: the next start does not bump the sequence numbers
"$NBD" --name fg --origin "$T/a.img" --run-dir "$COWSNAP_RUN_DIR" --state-dir "$COWSNAP_STATE_DIR" >>"$T/fg.log" 2>&1 &
fg=$!; EXTRA_PIDS+=("$fg")
for _ in $(seq 100); do ctl status fg >/dev/null 2>&1 && break; sleep 0.1; done
st=$(ctl status fg --json) || fail "restarted daemon did not answer: $(cat "$T/fg.log")"
seq=$(json_field "$st" .daemon.tracking.seq_next)
[ "$seq" -lt 4294967296 ] || fail "sequence numbers jumped after a clean stop ($seq): the change log was left dirty"
kill -TERM "$fg"; wait "$fg" || fail "restarted daemon exited non-zero: $(cat "$T/fg.log")"
log "PASS"
