#!/usr/bin/env bash
# The repository heals instead of spreading damage (issue 8), through the real binaries.
# Heal: a chunk with a flipped byte is quarantined when verify finds it, and the next full
#   backup of the same data stores it afresh: every generation, the old ones too, then
#   verifies and restores bit-exact. Damage no verify has seen yet is caught by the backup
#   about to reuse the chunk. An incremental whose parent lost a chunk reads everything.
#   `verify --repair --from DISK` heals from the live disk; damage whose data exists
#   nowhere any more is reported as not repairable (exit != 0).
# Pins: a live restore killed mid-fill pins its generation: prune --keep 1 after newer
#   backups keeps it and says so; attaching again resumes and completes the fill with the
#   right content, after which prune removes the generation. `abandon` gives a restore up
#   (refused while its daemon runs); the abandoned destination is refused by attach.
. "$(dirname "$0")/lib.sh"
need nbdcopy cmp; [ -x /usr/bin/python3 ] || skip "no /usr/bin/python3"
/usr/bin/python3 -c 'import nbd' 2>/dev/null || skip "python3-libnbd is not installed"
MIB=$((1 << 20))
REPO=$T/repo
# chunk_of IMG OFFSET_MIB: the chunk file REPO holds for that 1 MiB of IMG (its name is the
# hash of the data: found by backing up just those bytes into a scratch repository)
chunk_of() {
  local p=$T/probe h
  rm -rf "$p.repo"
  dd if="$1" of="$p.img" bs=1M skip="$2" count=1 status=none
  ctl attach "$p.img" --name probe --via none >/dev/null || fail "attach probe"
  timeout 120 "$CTL" backup probe --to "repo:$p.repo" --quiesce-idle 0 >/dev/null 2>&1 || fail "probe backup"
  ctl detach probe >/dev/null || fail "detach probe"
  h=$(find "$p.repo/chunks" -type f -not -name '.*' -printf '%f\n')
  [ ${#h} = 64 ] || fail "probe found not exactly one chunk: $h"
  echo "$REPO/chunks/${h:0:2}/$h"
}
flip() {
  local f=$1 pos orig
  [ -f "$f" ] || fail "no chunk file $f"
  pos=$(( $(stat -c %s "$f") - 100 ))
  orig=$(od -An -tu1 -j "$pos" -N1 "$f" | tr -d ' ')
  printf "$(printf '\\%03o' $(( orig ^ 0x55 )))" | dd of="$f" bs=1 seek="$pos" conv=notrunc status=none
}
restores() { # GEN EXPECTED
  ctl restore "repo:$REPO@$1" --to "$T/r.img" >/dev/null 2>"$T/r.err" || { echo "restore $1: $(cat "$T/r.err")"; return 1; }
  cmp -s "$T/r.img" "$2" || { echo "restore of $1 differs from $2"; return 1; }
}
all_whole() { # EXPECTED-FOR-GEN...: "GEN=FILE" pairs
  local pair
  ctl verify "repo:$REPO" >"$T/v.out" 2>"$T/v.err" || fail "verify after healing: $(cat "$T/v.err" "$T/v.out")"
  for pair in "$@"; do restores "${pair%%=*}" "${pair#*=}" || fail "$(restores "${pair%%=*}" "${pair#*=}")"; done
}

log "heal: 64 MiB random disk, two full backups (every chunk shared)"
head -c $((64 * MIB)) /dev/urandom > "$T/d.img"
uri=$(ctl attach "$T/d.img" --name d52 --via none | tail -n 1) || fail "attach d52"
g1=$(backup_gen d52 --to "repo:$REPO"); g2=$(backup_gen d52 --to "repo:$REPO")
nbdcopy "$uri" "$T/exp12.img"

log "A: verify finds a flipped byte and quarantines the chunk; the next full backup stores it afresh"
c=$(chunk_of "$T/exp12.img" 5); flip "$c"
ctl verify "repo:$REPO" --json >"$T/v.json" 2>"$T/v.err" && fail "verify of a damaged chunk exits 0"
[ "$(tail -n 1 "$T/v.json" | jq -r "[.problems[] | select(.offset == $((5 * MIB)))] | length")" = 2 ] ||
  fail "verify does not name offset $((5 * MIB)) in both generations: $(cat "$T/v.json")"
[ -e "$c" ] && q=present || q=gone
ctl restore "repo:$REPO@$g1" --to "$T/r.img" >/dev/null 2>"$T/rq.err" && fail "restore of a damaged generation exits 0"
nbd_write_mib "$uri" 40 1; g3=$(backup_gen d52 --to "repo:$REPO"); nbdcopy "$uri" "$T/exp3.img"
all_whole "$g1=$T/exp12.img" "$g2=$T/exp12.img" "$g3=$T/exp3.img"
[ "$q" = gone ] || fail "verify left the damaged chunk in the store"
[ -f "$REPO/quarantine/$(basename "$c")" ] || fail "damaged chunk not kept in $REPO/quarantine"
grep -q quarantine "$T/rq.err" || fail "restore error does not say the chunk is quarantined: $(cat "$T/rq.err")"
log "A: $g1 $g2 whole again after $g3"

log "B: damage nobody has seen: the full backup about to reuse the chunk finds and heals it"
c=$(chunk_of "$T/exp3.img" 9); flip "$c"
g4=$(backup_gen d52 --to "repo:$REPO")
grep -q "stored afresh" "$T/bk.out" || fail "backup does not say it healed a chunk: $(tail -n 1 "$T/bk.out")"
all_whole "$g1=$T/exp12.img" "$g3=$T/exp3.img" "$g4=$T/exp3.img"

log "C: an incremental whose parent lost a chunk reads everything"
c=$(chunk_of "$T/exp3.img" 30); flip "$c"
ctl verify "repo:$REPO" >/dev/null 2>&1 && fail "verify exits 0"
nbd_write_mib "$uri" 50 2; g5=$(backup_gen d52 --to "repo:$REPO" --incremental); nbdcopy "$uri" "$T/exp5.img"
grep -q "damaged or missing" "$T/bk.out" || fail "incremental does not say why it read everything: $(tail -n 1 "$T/bk.out")"
all_whole "$g2=$T/exp12.img" "$g4=$T/exp3.img" "$g5=$T/exp5.img"

log "D: verify --repair from the live disk (given by name)"
c=$(chunk_of "$T/exp5.img" 12); flip "$c"
ctl verify "repo:$REPO" --repair --from d52 >"$T/rep.out" 2>"$T/rep.err" || fail "verify --repair: $(cat "$T/rep.err" "$T/rep.out")"
cat "$T/rep.out"
grep -q "repaired chunk $(basename "$c") from .*d.img at offset $((12 * MIB))" "$T/rep.out" || fail "repair does not name its source: $(cat "$T/rep.out")"
for g in "$g1" "$g2" "$g3" "$g4" "$g5"; do
  grep -q "generation $g: whole again" "$T/rep.out" || fail "repair does not report $g whole"
done
all_whole "$g1=$T/exp12.img" "$g5=$T/exp5.img"

log "E: no healthy copy anywhere: reported as not repairable"
c=$(chunk_of "$T/exp5.img" 20); nbd_write_mib "$uri" 20 3; flip "$c"
ctl verify "repo:$REPO" --repair --from "$T/d.img" >"$T/rep.out" 2>"$T/rep.err" && fail "verify --repair with nothing to repair from exits 0"
cat "$T/rep.out"
grep -q "generation $g1: still damaged at offset(s) $((20 * MIB))" "$T/rep.out" || fail "not reported as still damaged: $(cat "$T/rep.out")"
grep -q "not repairable" "$T/rep.out" || fail "summary does not say what is not repairable"
ctl restore "repo:$REPO@$g5" --to "$T/r.img" >/dev/null 2>&1 && fail "restore of a generation still damaged exits 0"
ctl detach d52 || fail "detach d52"

log "pins: a live restore killed mid-fill keeps its generation from prune"
P=$T/prepo
head -c $((64 * MIB)) /dev/urandom > "$T/s.img"
suri=$(ctl attach "$T/s.img" --name s52 --via none | tail -n 1) || fail "attach s52"
gp=$(backup_gen s52 --to "repo:$P"); cp "$T/s.img" "$T/expl.img"
luri=$(COWSNAP_FILL_RATE=$((4 * MIB)) ctl restore "repo:$P@$gp" --to "$T/l.img" --live --via none --name l52 | tail -n 1) ||
  fail "restore --live"
nbd_write_mib "$luri" 33 4
/usr/bin/python3 -c '
import random, sys
f = open(sys.argv[1], "r+b"); f.seek(33 << 20); f.write(random.Random(4).randbytes(1 << 20))' "$T/expl.img"
nbd_write_mib "$suri" 1 5; gq=$(backup_gen s52 --to "repo:$P" --incremental)
log "prune while the fill runs: it does not wait for the fill, and keeps the generation"
timeout 20 "$CTL" prune "repo:$P" --keep 1 >"$T/p.out" 2>"$T/p.err" || fail "prune during the fill: $(cat "$T/p.err")"
cat "$T/p.out"
grep -q "kept $gp: pinned by live restore of l52 to $T/l.img" "$T/p.out" || fail "prune does not say it kept $gp for l52"
st=$(ctl status l52 --json); pid=$(json_field "$st" .daemon.pid)
[ "$(json_field "$st" .daemon.fill.complete)" = false ] || fail "fill complete too early: $st"
kill -9 "$pid"; wait_gone "$pid" 10 || fail "daemon $pid survived kill -9"
log "killed the filling daemon at $(json_field "$st" .daemon.fill.done)/$(json_field "$st" .daemon.fill.total)"
nbd_write_mib "$suri" 2 6; gr=$(backup_gen s52 --to "repo:$P" --incremental)
ctl prune "repo:$P" --keep 1 >"$T/p.out" 2>"$T/p.err" || fail "prune: $(cat "$T/p.err")"
cat "$T/p.out"
grep -q "kept $gp: pinned by live restore of l52 to $T/l.img" "$T/p.out" || fail "prune after the kill does not say it kept $gp for l52"
L=$(ctl list "repo:$P" --json)
[ "$(json_field "$L" '[.[].id] | join(" ")')" = "$gp $gr" ] || fail "after prune: $(json_field "$L" '[.[].id] | join(" ")'), expected $gp $gr"
ctl verify "repo:$P" >/dev/null || fail "verify after prune"

log "attach again: the fill resumes and completes"
ctl attach "$T/l.img" --name l52 --via none >/dev/null 2>"$T/att.err" || fail "attach after kill -9: $(cat "$T/att.err")"
for _ in $(seq 600); do
  st=$(ctl status l52 --json) || fail "status l52"
  [ "$(json_field "$st" .daemon.fill.complete)" = true ] && break
  [ "$(json_field "$st" .daemon.fill.error)" = null ] || fail "fill error: $st"
  sleep 0.1
done
[ "$(json_field "$st" .daemon.fill.complete)" = true ] || fail "fill did not complete: $st"
nbdcopy "$luri" "$T/l_now.img" || fail "nbdcopy"
cmp "$T/l_now.img" "$T/expl.img" || fail "resumed fill: the disk differs from the generation + the acknowledged write"
[ -z "$(ls -A "$P/pins" 2>/dev/null)" ] || fail "pin left after the fill completed: $(ls "$P/pins")"
ctl prune "repo:$P" --keep 1 >"$T/p.out" || fail "prune after the fill"
grep -q pinned "$T/p.out" && fail "prune still reports a pin: $(cat "$T/p.out")"
[ "$(json_field "$(ctl list "repo:$P" --json)" '[.[].id] | join(" ")')" = "$gr" ] || fail "$gp not pruned after the fill completed"
ctl detach l52 || fail "detach l52"
cmp "$T/l.img" "$T/expl.img" || fail "restored file differs after detach"

log "abandon: the generation is unpinned, the half-filled destination is refused"
nbd_write_mib "$suri" 3 7; gs=$(backup_gen s52 --to "repo:$P" --incremental)
COWSNAP_FILL_RATE=$((2 * MIB)) ctl restore "repo:$P@$gr" --to "$T/m.img" --live --via none --name m52 >/dev/null || fail "restore --live m52"
pid=$(json_field "$(ctl status m52 --json)" .daemon.pid)
ctl abandon m52 >/dev/null 2>"$T/ab.err" && fail "abandon while the daemon runs exits 0"
grep -q "is running" "$T/ab.err" || fail "abandon refusal unclear: $(cat "$T/ab.err")"
kill -9 "$pid"; wait_gone "$pid" 10 || fail "daemon $pid survived kill -9"
ctl prune "repo:$P" --keep 1 >"$T/p.out" || fail "prune"
grep -q "kept $gr: pinned by live restore of m52" "$T/p.out" || fail "prune does not keep $gr for m52: $(cat "$T/p.out")"
ctl abandon m52 >"$T/ab.out" || fail "abandon m52"
cat "$T/ab.out"
ctl attach "$T/m.img" --name m52 --via none >/dev/null 2>"$T/att.err" && fail "attach of an abandoned half-filled destination exits 0"
cat "$T/att.err"
ctl prune "repo:$P" --keep 1 >"$T/p.out" || fail "prune after abandon"
[ "$(json_field "$(ctl list "repo:$P" --json)" '[.[].id] | join(" ")')" = "$gs" ] || fail "$gr not pruned after abandon"
ctl detach s52 || fail "detach s52"
log "PASS"
