#!/usr/bin/env bash
# The daemon never goes down for a bad request (issue 8), through the real daemon
# (--via none) and a raw-socket client (tests/hostile-nbd-client.py):
# - 4 connections x 16 pipelined 32 MiB READs whose replies are never read,
#   20 connections each sending a 32 MiB WRITE header and no payload,
#   500 idle connections: the daemon's VmRSS and thread count stay under stated bounds,
#   a well-behaved client is served meanwhile, and afterwards the disk reads back right;
# - a handshake that sends one byte every 2 s is dropped within the handshake deadline;
# - backup --container ram:100T / ram:4T (more than MemAvailable) is refused with a
#   clear message, the daemon stays up and serves, a normal backup still works;
# - bad --container / --chunk-size at attach (and at the daemon) are refused in one line.
. "$(dirname "$0")/lib.sh"
need /usr/bin/python3 nbdcopy nbdinfo cmp timeout
HOSTILE=$ROOT/tests/hostile-nbd-client.py
PY=/usr/bin/python3

# Bounds (defaults: 128 MiB of request memory, 64 MiB per connection, 64 connections,
# 16 workers per connection, handshake deadline 10 s).
MAX_RSS_KB=$((320 << 10))
MAX_THREADS=120
MAX_CONNS=64

# bad MSG: record a failed check and go on (so one run shows every case); the test
# fails at the end if any check failed.
BAD=()
bad() { echo "FAIL: $*" >&2; BAD+=("$*"); }

truncate -s 256M "$T/o.img"
head -c $((8 << 20)) /dev/urandom >"$T/data"
uri=$(ctl attach "$T/o.img" --name d53 --via none | tail -n 1) || fail "attach --via none"
SOCK=$COWSNAP_RUN_DIR/d53.nbd
nbdcopy "$T/data" "$uri" || fail "nbdcopy into the export"
PID=$(json_field "$(ctl status d53 --json)" .daemon.pid) || fail "status"
[ -n "$PID" ] && running "$PID" || fail "no daemon pid"

# serves_ok WHAT: the daemon is alive and a normal client reads the data back
serves_ok() {
  running "$PID" || { bad "$1: the daemon is gone"; return 1; }
  rm -f "$T/back"
  timeout 60 nbdcopy "$uri" "$T/back" || { bad "$1: nbdcopy from the export failed"; return 1; }
  cmp -n $((8 << 20)) "$T/data" "$T/back" || bad "$1: the export reads back wrong"
  ctl status d53 >/dev/null || bad "$1: status does not answer"
}

# check_flood WHAT JSON: bounds and the probe
check_flood() {
  local what=$1 r=$2 rss thr
  rss=$(json_field "$r" .peak_rss_kb); thr=$(json_field "$r" .peak_threads)
  log "$what: peak VmRSS $((rss >> 10)) MiB, peak threads $thr, probe $(json_field "$r" .probe)"
  [ "$rss" -le "$MAX_RSS_KB" ] || bad "$what: VmRSS $((rss >> 10)) MiB > $((MAX_RSS_KB >> 10)) MiB"
  [ "$thr" -le "$MAX_THREADS" ] || bad "$what: $thr threads > $MAX_THREADS"
  [ "$(json_field "$r" .probe.ok)" = true ] || bad "$what: a normal client was not served meanwhile: $r"
}

log "flood 1: 4 connections x 16 pipelined 32 MiB reads, replies never read"
r=$(timeout 120 $PY "$HOSTILE" reads "$SOCK" d53 "$PID" 4 16 6 "$T/data") || bad "reads flood client: $r"
check_flood "unread reads" "$r"
serves_ok "after the read flood"

log "flood 2: 20 connections each send a 32 MiB WRITE header without payload"
r=$(timeout 120 $PY "$HOSTILE" writes "$SOCK" d53 "$PID" 20 6 "$T/data") || bad "writes flood client: $r"
check_flood "WRITE headers without payload" "$r"
serves_ok "after the write flood"

log "flood 3: 500 idle connections"
r=$(timeout 180 $PY "$HOSTILE" idle "$SOCK" d53 "$PID" 500 3) || bad "idle flood client: $r"
acc=$(json_field "$r" .accepted); ref=$(json_field "$r" .refused); thr=$(json_field "$r" .peak_threads)
log "idle connections: $acc accepted, $ref refused, peak threads $thr, peak VmRSS $(( $(json_field "$r" .peak_rss_kb) >> 10 )) MiB"
[ "$acc" -le "$MAX_CONNS" ] || bad "$acc connections accepted, the limit is $MAX_CONNS"
[ "$acc" -ge 1 ] || bad "no connection accepted"
[ "$thr" -le "$MAX_THREADS" ] || bad "500 idle connections: $thr threads > $MAX_THREADS"
[ "$(json_field "$r" .peak_rss_kb)" -le "$MAX_RSS_KB" ] || bad "idle connections: VmRSS too high: $r"
grep -q "refused .* NBD connection" "$COWSNAP_STATE_DIR/d53.log" || bad "refused connections are not logged"
sleep 1
serves_ok "after the idle connections"

log "a handshake sending one byte every 2 s is dropped within the deadline (10 s)"
r=$(timeout 60 $PY "$HOSTILE" slow "$SOCK" d53 "$PID" 25) || bad "slow client: $r"
log "slow handshake: $r"
[ "$(json_field "$r" .closed)" = true ] || bad "a slow handshake was kept open for 25 s: $r"
secs=$(json_field "$r" .secs)
$PY -c "import sys; s=float(sys.argv[1]); sys.exit(0 if 8 <= s <= 14 else 1)" "$secs" ||
  bad "the slow handshake was dropped after ${secs}s, expected about 10 s"
serves_ok "after the slow handshake"

log "backup containers larger than the machine has are refused; the daemon stays up"
for c in ram:100T ram:4T; do
  out=$(timeout 120 "$CTL" backup d53 --to "file:$T/b-${c#ram:}.img" --container "$c" 2>&1); rc=$?
  [ "$rc" != 0 ] || bad "backup --container $c succeeded"
  printf '%s' "$out" | grep -q "unable to use container $c" || bad "backup --container $c: unclear message: $out"
  [ ! -e "$T/b-${c#ram:}.img" ] || bad "backup --container $c created its target"
  log "ok: --container $c refused: $(printf '%s' "$out" | tail -n 1)"
  serves_ok "after backup --container $c"
done
ctl backup d53 --to "file:$T/good.img" --container ram:16M >/dev/null 2>&1 || bad "a normal backup after the refusals"
cmp -n $((8 << 20)) "$T/data" "$T/good.img" || bad "the normal backup holds other data"
serves_ok "after the normal backup"
ctl detach d53 || bad "detach"

log "bad --container / --chunk-size at attach: one-line errors, nothing started"
truncate -s 64M "$T/a.img"
# attach_fails WHAT PATTERN ARGS...
attach_fails() {
  local what=$1 pat=$2 out rc; shift 2
  out=$("$CTL" attach "$T/a.img" --name bad53 --via none "$@" 2>&1); rc=$?
  [ "$rc" != 0 ] || { "$CTL" detach bad53 >/dev/null 2>&1; bad "attach $what: exit 0"; return; }
  printf '%s' "$out" | grep -qF -- "$pat" || bad "attach $what: message lacks '$pat': $out"
  [ "$(printf '%s\n' "$out" | wc -l)" = 1 ] || bad "attach $what: not one line: $out"
  [ ! -e "$COWSNAP_RUN_DIR/bad53.ctl" ] && [ ! -e "$COWSNAP_RUN_DIR/bad53.pid" ] ||
    bad "attach $what: a daemon was started"
  log "ok: attach $what: $out"
}
attach_fails "--container bogus" "unable to use container" --container bogus
attach_fails "--container ram:" "unable to use container" --container ram:
attach_fails "--container ram:1K" "smaller than one" --container ram:1K
attach_fails "--container ram:100T" "MemAvailable" --container ram:100T
attach_fails "--container file:dir-missing" "not a directory" --container "file:$T/nodir/c.cow:1G"
attach_fails "--container file too large" "free on the filesystem" --container "file:$T/c.cow:1000T"
attach_fails "--container dev:missing" "unable to use container" --container "dev:$T/nodev"
attach_fails "--chunk-size 3000" "chunk size" --chunk-size 3000
attach_fails "--chunk-size 4M" "chunk size" --chunk-size 4M
attach_fails "--chunk-size 64K --container ram:32K" "smaller than one" --chunk-size 64K --container ram:32K
[ ! -e "$T/c.cow" ] || bad "a refused file container was created"
# the daemon's own argument parsing refuses them too
for args in "--container ram:100T" "--container tape:1G" "--chunk-size 1000"; do
  # shellcheck disable=SC2086
  out=$(timeout 20 "$NBD" --name x53 --origin "$T/a.img" --run-dir "$T/run2" --state-dir "$T/state2" $args 2>&1); rc=$?
  [ "$rc" != 0 ] || bad "cowsnap-nbd $args: exit 0"
  printf '%s' "$out" | grep -q "unable to use" || bad "cowsnap-nbd $args: unclear message: $out"
  log "ok: cowsnap-nbd $args: $(printf '%s' "$out" | tail -n 1)"
done
log "a valid --container and --chunk-size still attach"
uri=$(ctl attach "$T/a.img" --name ok53 --via none --chunk-size 128K --container ram:8M | tail -n 1) ||
  fail "attach with valid --container/--chunk-size"
nbdinfo --size "$uri" >/dev/null || fail "the valid attach does not serve"
ctl detach ok53 || fail "detach ok53"
[ "${#BAD[@]}" = 0 ] || fail "${#BAD[@]} check(s) failed: $(printf '%s; ' "${BAD[@]}")"
log "PASS"
