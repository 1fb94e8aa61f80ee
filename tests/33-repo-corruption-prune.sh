#!/usr/bin/env bash
# Repository damage and pruning through the CLI: a flipped byte in a stored chunk makes
# `verify` exit != 0 naming the generation and the offset and move the chunk to the
# quarantine, and `restore` refuse naming the offset (other generations still restore);
# the quarantined chunk is reported missing. Once repaired (`verify --repair --from`
# the disk), `prune --keep 1` keeps the newest generation of each disk and verify is
# clean; before that, a generation whose metadata is damaged makes prune refuse
# (nothing deleted) and verify name it. A prune while a backup runs: both succeed, verify is clean, the new generation
# restores exactly.
. "$(dirname "$0")/lib.sh"
need nbdcopy sha256sum cmp; [ -x /usr/bin/python3 ] || skip "no /usr/bin/python3"
/usr/bin/python3 -c 'import nbd' 2>/dev/null || skip "python3-libnbd is not installed"
REPO=$T/repo
sha() { sha256sum "$1" | cut -d' ' -f1; }
chunks() { find "$REPO/chunks" -type f -not -name '.*' | sort; }

head -c $((128 << 20)) /dev/urandom > "$T/d.img"
head -c $((64 << 20)) /dev/urandom > "$T/e.img"
uri=$(ctl attach "$T/d.img" --name d33 --via none | tail -n 1) || fail "attach d33"
euri=$(ctl attach "$T/e.img" --name e33 --via none | tail -n 1) || fail "attach e33"
g1=$(backup_gen d33 --to "repo:$REPO")
ge1=$(backup_gen e33 --to "repo:$REPO")
nbd_write_mib "$uri" 10 1; g2=$(backup_gen d33 --to "repo:$REPO" --incremental)
nbdcopy "$uri" "$T/exp2.img"
nbd_write_mib "$euri" 5 2; ge2=$(backup_gen e33 --to "repo:$REPO" --incremental)
chunks > "$T/before"
nbd_write_mib "$uri" 77 3; g3=$(backup_gen d33 --to "repo:$REPO" --incremental)
nbdcopy "$uri" "$T/exp3.img"
chunks > "$T/after"
new=$(comm -13 "$T/before" "$T/after")
[ "$(printf '%s\n' "$new" | grep -c .)" = 1 ] || fail "expected exactly one new chunk for one changed region: $new"
off=$((77 << 20))
log "generations d33: $g1 $g2 $g3; e33: $ge1 $ge2; chunk of $g3 at offset $off: $new"
ctl verify "repo:$REPO" >/dev/null || fail "verify of an intact repository"

log "flip one byte of that chunk"
pos=$(( $(stat -c %s "$new") - 100 ))
orig=$(od -An -tu1 -j "$pos" -N1 "$new" | tr -d ' ')
printf "$(printf '\\%03o' $(( orig ^ 0x55 )))" | dd of="$new" bs=1 seek="$pos" conv=notrunc status=none
[ "$(od -An -tu1 -j "$pos" -N1 "$new" | tr -d ' ')" != "$orig" ] || fail "byte not flipped"

ctl verify "repo:$REPO" >"$T/v.out" 2>"$T/v.err" && fail "verify of a corrupt repository exits 0"
cat "$T/v.err" "$T/v.out"
grep -q "$g3" "$T/v.err" || fail "verify does not name generation $g3: $(cat "$T/v.err")"
grep -q "offset $off" "$T/v.err" || fail "verify does not name offset $off: $(cat "$T/v.err")"
grep -Eq "$g1|$g2|$ge1|$ge2" "$T/v.err" && fail "verify blames other generations: $(cat "$T/v.err")"
V=$(ctl verify "repo:$REPO" --json); [ $? != 0 ] || fail "verify --json exits 0"
V=$(printf '%s\n' "$V" | tail -n 1) # JSON lines: progress, then the result
[ "$(json_field "$V" .event)" = result ] || fail "verify --json: the last line is no result: $V"
[ "$(json_field "$V" .ok)" = false ] || fail "verify --json ok: $V"
[ "$(json_field "$V" "[.problems[] | select(.generation == \"$g3\" and .offset == $off)] | length")" = 1 ] ||
  fail "verify --json does not list ($g3, $off): $V"
ctl verify "repo:$REPO" --generation "$g2" >/dev/null || fail "verify of an unaffected generation fails"

ctl restore "repo:$REPO@$g3" --to "$T/r3.img" >/dev/null 2>"$T/r.err" && fail "restore of a corrupt generation succeeded"
cat "$T/r.err"
grep -q "$off" "$T/r.err" || fail "restore does not name offset $off: $(cat "$T/r.err")"
ctl restore "repo:$REPO@$g2" --to "$T/r2.img" >/dev/null || fail "restore of an unaffected generation"
cmp "$T/r2.img" "$T/exp2.img" || fail "restore of $g2 differs"

log "the damaged chunk went to quarantine: reported missing from then on"
[ ! -e "$new" ] || fail "damaged chunk still in the store"
[ -f "$REPO/quarantine/$(basename "$new")" ] || fail "damaged chunk not in $REPO/quarantine"
ctl verify "repo:$REPO" 2>"$T/v2.err" >/dev/null && fail "verify with a missing chunk exits 0"
grep -q "offset $off: missing" "$T/v2.err" || fail "missing chunk not reported at $off: $(cat "$T/v2.err")"

log "damaged metadata of $g2: prune refuses and deletes nothing, verify names it"
cp "$REPO/generations/$g2.json" "$T/g2.json"
printf '{"id": "%s", torn' "$g2" >"$REPO/generations/$g2.json"
tree() { (cd "$REPO" && find . -type f -not -name lock -printf '%p %s\n' | sort); }
tree >"$T/tree.before"
ctl prune "repo:$REPO" --keep 1 >/dev/null 2>"$T/p0.err" && fail "prune with unreadable metadata succeeded"
grep -q "generation $g2 cannot be read" "$T/p0.err" || fail "prune does not name $g2: $(cat "$T/p0.err")"
tree | cmp -s - "$T/tree.before" || fail "a refused prune changed the repository"
ctl verify "repo:$REPO" >/dev/null 2>"$T/v3.err" && fail "verify with unreadable metadata exits 0"
grep -q "generation $g2: metadata" "$T/v3.err" || fail "verify does not report $g2's metadata: $(cat "$T/v3.err")"
cp "$T/g2.json" "$REPO/generations/$g2.json"

log "verify --repair from the disk (unchanged there since $g3), prune --keep 1"
ctl verify "repo:$REPO" --repair --from "$T/d.img" >/dev/null 2>&1 || fail "verify --repair"
cmp "$new" "$REPO/quarantine/$(basename "$new")" >/dev/null && fail "repair reinstalled the damaged copy"
ctl verify "repo:$REPO" >/dev/null || fail "verify after the repair"
ctl prune "repo:$REPO" --keep 1 || fail "prune"
L=$(ctl list "repo:$REPO" --json)
[ "$(json_field "$L" '[.[].id] | sort | join(" ")')" = "$(printf '%s\n' "$g3" "$ge2" | sort | tr '\n' ' ' | sed 's/ $//')" ] ||
  fail "prune --keep 1 kept $(json_field "$L" '[.[].id] | join(" ")'), expected $g3 and $ge2"
ctl verify "repo:$REPO" >/dev/null || fail "verify after prune"
ctl restore "repo:$REPO@$g3" --to "$T/r3.img" >/dev/null || fail "restore $g3 after prune"
cmp "$T/r3.img" "$T/exp3.img" || fail "restore of $g3 after prune differs"
nbdcopy "$euri" "$T/expe.img"
ctl restore "repo:$REPO@$ge2" --to "$T/re.img" >/dev/null || fail "restore $ge2 after prune"
cmp "$T/re.img" "$T/expe.img" || fail "restore of $ge2 after prune differs"

log "prune while a (rate-limited) backup runs"
nbd_write_mib "$uri" 3 4; nbd_write_mib "$uri" 100 5
timeout 300 "$CTL" backup d33 --to "repo:$REPO" --quiesce-idle 0 --rate-limit 32M >"$T/b.out" 2>"$T/b.err" & bp=$!
EXTRA_PIDS+=("$bp")
for _ in $(seq 100); do
  [ "$(json_field "$(ctl status d33 --json)" .daemon.backup.state)" = running ] && break; sleep 0.05
done
[ "$(json_field "$(ctl status d33 --json)" .daemon.backup.state)" = running ] || fail "backup not running"
t0=$(date +%s.%N)
ctl prune "repo:$REPO" --keep 1 >"$T/p.out" 2>"$T/p.err" || fail "prune during a backup: $(cat "$T/p.err")"
log "prune: $(cat "$T/p.out") ($(echo "$(date +%s.%N) - $t0" | bc 2>/dev/null || echo ?) s)"
wait "$bp" || fail "backup during prune failed: $(cat "$T/b.err")"
g4=$(tail -n 1 "$T/b.out" | jq -r .generation)
nbdcopy "$uri" "$T/exp4.img"
ctl verify "repo:$REPO" >/dev/null || fail "verify after prune during a backup"
L=$(ctl list "repo:$REPO" --json)
[ "$(json_field "$L" "[.[] | select(.disk == \"d33\")] | last | .id")" = "$g4" ] || fail "newest d33 generation is not $g4: $L"
ctl restore "repo:$REPO@$g4" --to "$T/r4.img" >/dev/null || fail "restore $g4"
cmp "$T/r4.img" "$T/exp4.img" || fail "restore of the backup that ran during prune differs"
ctl prune "repo:$REPO" --keep 1 >/dev/null || fail "second prune"
ctl verify "repo:$REPO" >/dev/null || fail "verify after the second prune"
[ "$(json_field "$(ctl list "repo:$REPO" --json)" 'length')" = 2 ] || fail "expected 2 generations after the second prune"
ctl restore "repo:$REPO@$g4" --to "$T/r4b.img" >/dev/null || fail "restore $g4 after the second prune"
cmp "$T/r4b.img" "$T/exp4.img" || fail "restore of $g4 after the second prune differs"
log "a relative repo:DIR is the caller's, not the daemon's working directory"
mkdir -p "$T/a" "$T/b"; truncate -s 8M "$T/f.img"
(cd "$T/a" && ctl attach "$T/f.img" --name f33 --via none >/dev/null) || fail "attach f33"
(cd "$T/b" && timeout 120 "$CTL" backup f33 --to repo:rel --quiesce-idle 0 >/dev/null 2>"$T/rel.err") || fail "backup to repo:rel: $(cat "$T/rel.err")"
[ -e "$T/b/rel/cowsnap-repo.json" ] || fail "repo:rel not created in the caller's directory"
[ ! -e "$T/a/rel" ] || fail "repo:rel created in the daemon's directory"
(cd "$T/b" && ctl restore repo:rel --to ../f.back >/dev/null) || fail "restore from repo:rel"
cmp "$T/f.back" "$T/f.img" || fail "restore from repo:rel differs"
ctl detach f33 || fail "detach f33"
ctl detach d33 || fail "detach"; ctl detach e33 || fail "detach"
log "PASS"
