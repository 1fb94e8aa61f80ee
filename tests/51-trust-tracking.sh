#!/usr/bin/env bash
# Change tracking follows the origin, not the name. Between two daemons the tracking is
# trusted only when the origin seal (written at a clean detach) proves the origin is the
# same file, unchanged. Each case: attach again, write through NBD, --incremental, then
# restore that generation and compare it by hash with the disk's content.
#   control: clean detach + attach, nothing else → trusted, reads only the changes (also
#     after an attach that was refused before serving)
#   rollback: offline `restore …@OLD --to ORIGIN` while detached → full read, says why
#   another file of the same size attached under the same name → full read, says why
#   the origin written while detached (dd conv=notrunc) → full read, says why (also
#     after a second clean detach/attach before the backup: the reason is kept)
#   kill -9 (no seal) → full read, says why
#   (root with losetup) a loop device as origin: clean detach/attach → trusted; a write
#     to the device while detached (kernel write counters) and a write to its backing
#     file → full read, says why
. "$(dirname "$0")/lib.sh"
need nbdcopy sha256sum dd; [ -x /usr/bin/python3 ] || skip "no /usr/bin/python3"
/usr/bin/python3 -c 'import nbd' 2>/dev/null || skip "python3-libnbd is not installed"
SIZE=$((64 << 20))
REPO=$T/repo
IMG=$T/d.img
sha() { sha256sum "$1" | cut -d' ' -f1; }
# nbdw URI SEED COUNT: COUNT random 4 KiB writes of random data, then flush
nbdw() {
  /usr/bin/python3 - "$@" <<'PY'
import nbd, random, sys
uri, seed, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD(); h.connect_uri(uri)
rng = random.Random(seed)
for _ in range(count):
    h.pwrite(rng.randbytes(4096), rng.randrange(h.get_size() // 4096) * 4096)
h.flush(); h.shutdown()
PY
}
DISK=d51
attach() { ctl attach "$1" --name "$DISK" --via none 2>"$T/att.err" | tail -n 1 || fail "attach $1: $(cat "$T/att.err")"; }
# incr URI trusted|full [WHY]: incremental backup; check the note and the bytes read;
# restore the generation and compare it with the disk's content.
incr() {
  local uri=$1 want=$2 why=${3:-} out g read
  timeout 300 "$CTL" backup "$DISK" --to "repo:$REPO" --incremental --quiesce-idle 0 >"$T/bk.out" 2>"$T/bk.err" ||
    fail "incremental backup: $(cat "$T/bk.err")"
  out=$(tail -n 1 "$T/bk.out")
  printf '%s\n' "$out" | jq -c '{generation, notes}'
  g=$(json_field "$out" .generation)
  read=$(json_field "$(ctl list "repo:$REPO" --json)" "[.[] | select(.id == \"$g\")][0].stats.bytes_read")
  if [ "$want" = full ]; then
    printf '%s' "$out" | grep -q "full read" || fail "tracking trusted although the origin is not proven unchanged: $out"
    printf '%s' "$out" | grep -q -- "$why" || fail "the note does not say \"$why\": $out"
    [ "$read" -ge "$SIZE" ] || fail "full read read only $read bytes"
  else
    printf '%s' "$out" | grep -q "full read" && fail "tracking not trusted after a clean detach/attach: $out"
    [ "$read" -gt 0 ] && [ "$read" -le $((24 << 20)) ] || fail "trusted incremental read $read bytes (expected the changed chunks only)"
  fi
  nbdcopy "$uri" "$T/now.img" || fail "nbdcopy"
  rm -f "$T/r.img"
  ctl restore "repo:$REPO@$g" --to "$T/r.img" >/dev/null || fail "restore $g"
  [ "$(sha "$T/r.img")" = "$(sha "$T/now.img")" ] || fail "generation $g does not restore to the disk's content"
  log "generation $g: read $read bytes, restores to the disk"
  LAST=$g
}

head -c $SIZE /dev/urandom > "$IMG"
uri=$(attach "$IMG")
timeout 300 "$CTL" backup d51 --to "repo:$REPO" --quiesce-idle 0 >/dev/null 2>"$T/bk.err" || fail "full backup: $(cat "$T/bk.err")"
OLD=$(json_field "$(ctl list "repo:$REPO" --json)" '.[-1].id')

log "control: clean detach, attach, writes → trusted and small"
nbdw "$uri" 1 8 || fail "writes"
ctl detach d51 || fail "detach"
log "an attach refused before serving (unusable --listen) wrote nothing: tracking stays trusted"
ctl attach "$IMG" --name d51 --via none --listen tcp:192.0.2.1:10809 --insecure-tcp >/dev/null 2>&1 && fail "attach with an unusable --listen succeeded"
uri=$(attach "$IMG")
nbdw "$uri" 2 8 || fail "writes"
incr "$uri" trusted
log "control again: detach + attach with no write at all → trusted"
ctl detach d51 || fail "detach"
uri=$(attach "$IMG")
nbdw "$uri" 3 2 || fail "writes"
incr "$uri" trusted

log "rollback: detach, offline restore of $OLD onto the origin, attach, incremental"
nbdw "$uri" 4 8 || fail "writes"
incr "$uri" trusted
ctl detach d51 || fail "detach"
ctl restore "repo:$REPO@$OLD" --to "$IMG" >/dev/null 2>"$T/rs.err" || fail "offline restore onto the origin: $(cat "$T/rs.err")"
uri=$(attach "$IMG")
nbdw "$uri" 5 4 || fail "writes"
incr "$uri" full "offline restore of generation $OLD"
grep -q 'origin of disk "d51"' "$T/rs.err" || fail "the restore did not say it resets d51's tracking: $(cat "$T/rs.err")"
nbdw "$uri" 10 2 || fail "writes"
incr "$uri" trusted

log "another file of the same size under the same name"
ctl detach d51 || fail "detach"
head -c $SIZE /dev/urandom > "$T/other.img"
uri=$(attach "$T/other.img")
nbdw "$uri" 6 4 || fail "writes"
incr "$uri" full "another file than the one tracked"
ctl detach d51 || fail "detach"
log "and back to the first file: it is not the one tracked any more either"
uri=$(attach "$IMG")
incr "$uri" full "another file than the one tracked"

log "the origin written while detached (dd conv=notrunc, same size)"
ctl detach d51 || fail "detach"
size_before=$(stat -c %s "$IMG")
head -c $((3 << 20)) /dev/urandom | dd of="$IMG" bs=1M seek=20 conv=notrunc status=none || fail "dd"
[ "$(stat -c %s "$IMG")" = "$size_before" ] || fail "dd changed the size"
uri=$(attach "$IMG")
log "a clean detach/attach before the backup keeps the reason"
ctl detach d51 || fail "detach"
uri=$(attach "$IMG")
nbdw "$uri" 7 4 || fail "writes"
incr "$uri" full "modified while detached"

log "kill -9: no seal, the gap is unknown"
nbdw "$uri" 8 4 || fail "writes"
pid=$(json_field "$(ctl status d51 --json)" .daemon.pid)
[ -f "$COWSNAP_STATE_DIR/d51/origin.seal" ] && fail "an origin seal exists while a daemon serves the origin"
kill -9 "$pid"; wait_gone "$pid" 10 || fail "daemon survived kill -9"
[ -f "$COWSNAP_STATE_DIR/d51/origin.seal" ] && fail "a seal exists after kill -9"
uri=$(attach "$IMG")
incr "$uri" full "no origin seal"
nbdw "$uri" 9 2 || fail "writes"
incr "$uri" trusted
ctl detach d51 || fail "detach"

head -c $SIZE /dev/urandom > "$T/lo.img"
if [ "$(id -u)" = 0 ] && command -v losetup >/dev/null && LO=$(losetup -f --show "$T/lo.img" 2>/dev/null); then
  log "a loop device ($LO) as origin"
  DISK=l51
  uri=$(attach "$LO")
  timeout 300 "$CTL" backup l51 --to "repo:$REPO" --quiesce-idle 0 >/dev/null 2>"$T/bk.err" || fail "full backup of $LO: $(cat "$T/bk.err")"
  nbdw "$uri" 11 4 || fail "writes"
  ctl detach l51 || fail "detach"
  uri=$(attach "$LO")
  nbdw "$uri" 12 4 || fail "writes"
  incr "$uri" trusted
  ctl detach l51 || fail "detach"
  log "a write to $LO while detached"
  head -c 4096 /dev/urandom | dd of="$LO" bs=4096 seek=300 oflag=direct conv=notrunc status=none || fail "dd to $LO"
  uri=$(attach "$LO")
  incr "$uri" full "written while detached"
  ctl detach l51 || fail "detach"
  log "a write to the backing file of $LO while detached"
  head -c 4096 /dev/urandom | dd of="$T/lo.img" bs=4096 seek=400 conv=notrunc status=none || fail "dd to the backing file"
  uri=$(attach "$LO")
  incr "$uri" full "backing file"
  ctl detach l51 || fail "detach"
else
  log "loop device case skipped (needs root and losetup)"
fi
ctl verify "repo:$REPO" >/dev/null || fail "verify"
log "PASS"
