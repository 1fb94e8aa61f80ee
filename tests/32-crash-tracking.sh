#!/usr/bin/env bash
# A crash of the daemon: full backup, writes, kill -9 (no clean shutdown, so no origin
# seal), attach again, more writes, --incremental: what happened to the origin while no
# daemon served it is unknown, so the incremental is a full read (deduplicated) that
# says "no origin seal", and restores to exactly the disk's content; the one after it
# is trusted again (reads only the changed chunks). The same after a crash right after
# writes and after a crash during an incremental backup.
# Tracking that cannot be trusted falls back to a full read and says so: after an attach
# with another tracking chunk size, and after the origin was replaced by one of another
# size.
. "$(dirname "$0")/lib.sh"
need nbdcopy sha256sum; [ -x /usr/bin/python3 ] || skip "no /usr/bin/python3"
/usr/bin/python3 -c 'import nbd' 2>/dev/null || skip "python3-libnbd is not installed"
SIZE=$((256 << 20))
REPO=$T/repo
sha() { sha256sum "$1" | cut -d' ' -f1; }
# nbdw URI SEED COUNT: COUNT random 1 MiB regions plus COUNT 4 KiB writes, random data
nbdw() {
  /usr/bin/python3 - "$@" <<'PY'
import nbd, random, sys
uri, seed, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
R = 1 << 20
h = nbd.NBD(); h.connect_uri(uri)
rng = random.Random(seed)
for i in rng.sample(range(h.get_size() // R), count):
    h.pwrite(rng.randbytes(R), i * R)
for _ in range(count):
    h.pwrite(rng.randbytes(4096), rng.randrange(h.get_size() // 4096) * 4096)
h.flush(); h.shutdown()
PY
}
# backup_check NAME URI FULL_EXPECTED(yes|no): incremental backup, check the note and the
# amount read, restore the generation and compare it with the export's content.
backup_check() {
  local name=$1 uri=$2 want_full=$3 why=${4:-} out g read
  timeout 300 "$CTL" backup "$name" --to "repo:$REPO" --incremental --quiesce-idle 0 >"$T/bk.out" 2>"$T/bk.err" ||
    fail "incremental backup of $name: $(cat "$T/bk.err")"
  out=$(tail -n 1 "$T/bk.out")
  printf '%s\n' "$out" | jq -c '{generation, notes, bytes_copied}'
  g=$(json_field "$out" .generation)
  read=$(json_field "$(ctl list "repo:$REPO" --json)" "[.[] | select(.id == \"$g\")][0].stats.bytes_read")
  if [ "$want_full" = yes ]; then
    printf '%s' "$out" | grep -q "full read" || fail "untrusted tracking did not say \"full read\": $out"
    printf '%s' "$out" | grep -q "full backups only" && fail "misleading note for a repository target: $out"
    [ -z "$why" ] || printf '%s' "$out" | grep -q "$why" || fail "the note does not say \"$why\": $out"
    [ "$read" -ge "$(stat -c %s "$T/d.img")" ] || fail "full read read only $read bytes"
  else
    printf '%s' "$out" | grep -q "full read" && fail "tracking not trusted after the crash: $out"
    [ "$read" -le $((40 << 20)) ] || fail "incremental read $read bytes (expected the changed chunks only)"
    [ "$read" -gt 0 ] || fail "incremental read nothing"
  fi
  nbdcopy "$uri" "$T/now.img" || fail "nbdcopy"
  rm -f "$T/r.img"
  ctl restore "repo:$REPO@$g" --to "$T/r.img" >/dev/null || fail "restore $g"
  [ "$(sha "$T/r.img")" = "$(sha "$T/now.img")" ] || fail "generation $g does not restore to the disk's content"
  log "generation $g: read $read bytes, restores exactly"
}

head -c $SIZE /dev/urandom > "$T/d.img"
uri=$(ctl attach "$T/d.img" --name d32 --via none | tail -n 1) || fail "attach"
timeout 300 "$CTL" backup d32 --to "repo:$REPO" --quiesce-idle 0 >/dev/null 2>"$T/bk.err" || fail "full backup: $(cat "$T/bk.err")"
lin=$(json_field "$(ctl status d32 --json)" .daemon.lineage)

log "writes, then kill -9 of the daemon"
nbdw "$uri" 1 8 || fail "writes 1"
pid=$(json_field "$(ctl status d32 --json)" .daemon.pid)
kill -9 "$pid"; wait_gone "$pid" 10 || fail "daemon survived kill -9"
uri=$(ctl attach "$T/d.img" --name d32 --via none 2>"$T/att.err" | tail -n 1) || fail "attach after kill -9: $(cat "$T/att.err")"
st=$(ctl status d32 --json)
[ "$(json_field "$st" .daemon.lineage)" = "$lin" ] || fail "lineage changed by a restart: $st"
log "tracking after the crash: $(json_field "$st" .daemon.tracking | jq -c .)"
nbdw "$uri" 2 8 || fail "writes 2"
backup_check d32 "$uri" yes "no origin seal"
nbdw "$uri" 9 8 || fail "writes 9"
backup_check d32 "$uri" no

log "a second crash right after writes (no flush of anything but the writes)"
nbdw "$uri" 3 4 || fail "writes 3"
kill -9 "$(json_field "$(ctl status d32 --json)" .daemon.pid)"; sleep 0.5
uri=$(ctl attach "$T/d.img" --name d32 --via none 2>"$T/att.err" | tail -n 1) || fail "attach: $(cat "$T/att.err")"
backup_check d32 "$uri" yes "no origin seal"

log "kill -9 during a (rate-limited) incremental backup, then attach, write, incremental"
nbdw "$uri" 5 6 || fail "writes 5"
timeout 300 "$CTL" backup d32 --to "repo:$REPO" --incremental --quiesce-idle 0 --rate-limit 1M >"$T/bkk.out" 2>"$T/bkk.err" & bp=$!
EXTRA_PIDS+=("$bp")
for _ in $(seq 100); do [ "$(json_field "$(ctl status d32 --json)" .daemon.backup.state)" = running ] && break; sleep 0.05; done
[ "$(json_field "$(ctl status d32 --json)" .daemon.backup.state)" = running ] || fail "backup not running"
ngen=$(json_field "$(ctl list "repo:$REPO" --json)" length)
nbdw "$uri" 6 2 || fail "writes during the backup"
kill -9 "$(json_field "$(ctl status d32 --json)" .daemon.pid)"
wait "$bp" && fail "the backup command succeeded although its daemon was killed"
[ "$(json_field "$(ctl list "repo:$REPO" --json)" length)" = "$ngen" ] || fail "the killed backup published a generation"
uri=$(ctl attach "$T/d.img" --name d32 --via none 2>"$T/att.err" | tail -n 1) || fail "attach: $(cat "$T/att.err")"
nbdw "$uri" 7 2 || fail "writes 7"
backup_check d32 "$uri" yes "no origin seal"
nbdw "$uri" 8 2 || fail "writes 8"
backup_check d32 "$uri" no
ctl verify "repo:$REPO" >/dev/null || fail "verify after the killed backup"

log "attach with another tracking chunk size: untrusted, full read"
ctl detach d32 || fail "detach"
uri=$(ctl attach "$T/d.img" --name d32 --via none --chunk-size 128K | tail -n 1) || fail "attach --chunk-size 128K"
nbdw "$uri" 4 2 || fail "writes 4"
backup_check d32 "$uri" yes "chunk size changed"

log "the origin replaced by one of another size: untrusted, full read"
ctl detach d32 || fail "detach"
head -c $((SIZE + (64 << 20))) /dev/urandom > "$T/d.img"
uri=$(ctl attach "$T/d.img" --name d32 --via none --chunk-size 128K | tail -n 1) || fail "attach the replaced origin"
backup_check d32 "$uri" yes "disk size changed"
ctl verify "repo:$REPO" >/dev/null || fail "verify"
ctl detach d32 || fail "detach"
log "PASS"
