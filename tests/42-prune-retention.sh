#!/usr/bin/env bash
# Retention rules through the CLI on real backups. Two small disks (--via none) are backed
# up several times (a 1 MiB region changed before each backup, the export saved after it);
# the generations' creation times are then set in the past (metadata JSON: created_unix
# and created; the metadata carries no checksum) to a timeline over two months, in UTC
# (TZ=UTC, so the periods do not depend on the host's zone):
#
#   d42  g0 2025-10-15 Wed W42   g1 2025-11-03 Mon W45   g2 2025-11-20 Thu W47
#        g3 2025-11-28 Fri W48   g4 2025-12-01 Mon W49   g5 2025-12-03 Wed W49
#        g6 2025-12-08 Mon W50   g7 2025-12-09 08:00     g8 2025-12-09 20:00 Tue W50
#        g9 2025-12-10 Wed W50
#   e42  e0 2025-11-01   e1 2025-11-15   e2 2025-12-05
#
# `--keep-daily 3 --keep-weekly 2 --keep-monthly 2 --disk d42` keeps g9 (daily, weekly,
# monthly), g8 and g6 (daily), g5 (weekly 2025-W49) and g3 (monthly 2025-11), removes
# g0 g1 g2 g4 g7 and leaves e42 alone. Checked: refused commands (a policy keeping
# nothing, an unknown --disk, no rule at all: exit 1, 1, 2) and --dry-run change no file
# of the repository (names and hashes); the dry run announces what the real run then does
# (same generations, same chunks and bytes freed); verify is clean afterwards; every kept
# generation restores bit-exact to the export saved at its backup; `--disk e42 --keep 1`
# (the old flag) prunes only e42.
. "$(dirname "$0")/lib.sh"
need nbdcopy sha256sum cmp; [ -x /usr/bin/python3 ] || skip "no /usr/bin/python3"
/usr/bin/python3 -c 'import nbd' 2>/dev/null || skip "python3-libnbd is not installed"
export TZ=UTC
REPO=$T/repo
# snapshot: every file of the repository with its hash
snapshot() { (cd "$REPO" && find . -type f -print0 | sort -z | xargs -0 sha256sum); }
# set_time GEN 'YYYY-MM-DD HH:MM': move GEN's creation time (metadata written like the
# repository does: temp file, then rename)
set_time() {
  local f=$REPO/generations/$1.json s
  s=$(date -u -d "$2" +%s) || fail "bad date $2"
  jq --argjson s "$s" --arg c "$(date -u -d "@$s" +%Y-%m-%dT%H:%M:%S.000Z)" \
    '.created_unix = $s | .created = $c' "$f" > "$f.new" || fail "edit $f"
  mv "$f.new" "$f"
}
ids() { json_field "$(ctl list "repo:$REPO" --json)" "[.[] | select(.disk == \"$1\") | .id] | join(\" \")"; }

head -c $((16 << 20)) /dev/urandom > "$T/d.img"
head -c $((8 << 20)) /dev/urandom > "$T/e.img"
duri=$(ctl attach "$T/d.img" --name d42 --via none | tail -n 1) || fail "attach d42"
euri=$(ctl attach "$T/e.img" --name e42 --via none | tail -n 1) || fail "attach e42"

log "10 backups of d42, 3 of e42, each export saved"
G=() E=()
for i in $(seq 0 9); do
  nbd_write_mib "$duri" "$i" "$((100 + i))" || fail "write d42 $i"
  if [ "$i" = 0 ]; then g=$(backup_gen d42 --to "repo:$REPO"); else g=$(backup_gen d42 --to "repo:$REPO" --incremental); fi
  [ -n "$g" ] && [ "$g" != null ] || fail "no generation from backup $i: $(cat "$T/bk.out")"
  nbdcopy "$duri" "$T/g$i.img" || fail "nbdcopy g$i"
  G+=("$g")
done
for i in 0 1 2; do
  nbd_write_mib "$euri" "$((i * 2))" "$((200 + i))" || fail "write e42 $i"
  if [ "$i" = 0 ]; then g=$(backup_gen e42 --to "repo:$REPO"); else g=$(backup_gen e42 --to "repo:$REPO" --incremental); fi
  nbdcopy "$euri" "$T/e$i.img" || fail "nbdcopy e$i"
  E+=("$g")
done
ctl detach d42 || fail "detach d42"; ctl detach e42 || fail "detach e42"

log "creation times moved to a timeline over two months"
T_D=("2025-10-15 10:00" "2025-11-03 10:00" "2025-11-20 10:00" "2025-11-28 10:00" "2025-12-01 10:00"
     "2025-12-03 10:00" "2025-12-08 10:00" "2025-12-09 08:00" "2025-12-09 20:00" "2025-12-10 10:00")
for i in $(seq 0 9); do set_time "${G[$i]}" "${T_D[$i]}"; done
set_time "${E[0]}" "2025-11-01 10:00"; set_time "${E[1]}" "2025-11-15 10:00"; set_time "${E[2]}" "2025-12-05 10:00"
ctl verify "repo:$REPO" >/dev/null || fail "verify before prune"
[ "$(ids d42)" = "${G[*]}" ] || fail "list after the time edits: $(ids d42)"
snapshot > "$T/before.sha"

log "refused commands change nothing"
ctl prune "repo:$REPO" --keep-daily 0 >"$T/r.out" 2>"$T/r.err"; rc=$?
[ "$rc" = 1 ] || fail "prune --keep-daily 0 exited $rc: $(cat "$T/r.out" "$T/r.err")"
grep -q "keeps nothing" "$T/r.err" || fail "prune --keep-daily 0 does not say why: $(cat "$T/r.err")"
ctl prune "repo:$REPO" --keep-last 0 --keep-weekly 0 >/dev/null 2>&1; rc=$?
[ "$rc" = 1 ] || fail "prune --keep-last 0 --keep-weekly 0 exited $rc"
ctl prune "repo:$REPO" --disk nosuch --keep-last 1 >/dev/null 2>"$T/r.err"; rc=$?
[ "$rc" = 1 ] || fail "prune --disk nosuch exited $rc"
grep -q "d42, e42" "$T/r.err" || fail "prune --disk nosuch does not list the disks: $(cat "$T/r.err")"
ctl prune "repo:$REPO" >/dev/null 2>&1; rc=$?
[ "$rc" = 2 ] || fail "prune without a rule exited $rc (usage error expected)"
ctl prune "repo:$REPO" --keep 1 --keep-last 2 >/dev/null 2>&1; rc=$?
[ "$rc" = 2 ] || fail "prune --keep with --keep-last exited $rc (usage error expected)"
snapshot | cmp -s - "$T/before.sha" || fail "a refused prune changed the repository: $(snapshot | diff "$T/before.sha" -)"

POLICY=(--keep-daily 3 --keep-weekly 2 --keep-monthly 2 --disk d42)
KEPT="${G[3]} ${G[5]} ${G[6]} ${G[8]} ${G[9]}"
REMOVED="${G[0]} ${G[1]} ${G[2]} ${G[4]} ${G[7]}"

log "dry run: says what would go and why, changes nothing"
D=$(ctl prune "repo:$REPO" "${POLICY[@]}" --dry-run --json) || fail "prune --dry-run --json"
snapshot | cmp -s - "$T/before.sha" || fail "prune --dry-run changed the repository: $(snapshot | diff "$T/before.sha" -)"
[ "$(json_field "$D" .dry_run)" = true ] || fail "dry_run not set: $D"
[ "$(json_field "$D" '.removed_generations | join(" ")')" = "$REMOVED" ] ||
  fail "dry run would remove $(json_field "$D" '.removed_generations | join(" ")'), expected $REMOVED"
[ "$(json_field "$D" '[.generations[] | select(.disk == "d42" and .keep) | .generation] | join(" ")')" = "$KEPT" ] ||
  fail "dry run would keep $(json_field "$D" '[.generations[] | select(.disk == "d42" and .keep) | .generation] | join(" ")'), expected $KEPT"
reasons() { json_field "$D" ".generations[] | select(.generation == \"$1\") | .reasons | join(\", \")"; }
[ "$(reasons "${G[9]}")" = "daily 2025-12-10, weekly 2025-W50, monthly 2025-12" ] || fail "reasons of g9: $(reasons "${G[9]}")"
[ "$(reasons "${G[8]}")" = "daily 2025-12-09" ] || fail "reasons of g8: $(reasons "${G[8]}")"
[ "$(reasons "${G[6]}")" = "daily 2025-12-08" ] || fail "reasons of g6: $(reasons "${G[6]}")"
[ "$(reasons "${G[5]}")" = "weekly 2025-W49" ] || fail "reasons of g5: $(reasons "${G[5]}")"
[ "$(reasons "${G[3]}")" = "monthly 2025-11" ] || fail "reasons of g3: $(reasons "${G[3]}")"
[ "$(reasons "${G[7]}")" = "" ] || fail "reasons of the removed g7: $(reasons "${G[7]}")"
[ "$(reasons "${E[0]}")" = "other disk, not pruned" ] || fail "reasons of e0: $(reasons "${E[0]}")"
[ "$(json_field "$D" '.generations[] | select(.generation == "'"${G[7]}"'") | .created')" = "2025-12-09T08:00:00+00:00" ] ||
  fail "created of g7: $D"
[ "$(json_field "$D" .chunks_removed)" -gt 0 ] || fail "dry run frees no chunk: $D"
ctl prune "repo:$REPO" "${POLICY[@]}" --dry-run >"$T/dry.out" || fail "prune --dry-run"
cat "$T/dry.out"
grep -q "^would remove 5 generation(s), kept 8; $(json_field "$D" .chunks_removed) chunk(s) freed" "$T/dry.out" ||
  fail "dry-run summary: $(tail -n 1 "$T/dry.out")"
grep -q "^remove ${G[7]} d42 2025-12-09T08:00:00+00:00 -$" "$T/dry.out" || fail "no remove line for g7"
grep -q "^keep ${G[5]} d42 2025-12-03T10:00:00+00:00 weekly 2025-W49$" "$T/dry.out" || fail "no keep line for g5"
snapshot | cmp -s - "$T/before.sha" || fail "prune --dry-run (text) changed the repository"

log "prune ${POLICY[*]}"
ctl prune "repo:$REPO" "${POLICY[@]}" >"$T/p.out" || fail "prune"
cat "$T/p.out"
grep -q "^removed 5 generation(s), kept 8; $(json_field "$D" .chunks_removed) chunk(s) freed" "$T/p.out" ||
  fail "prune did not do what the dry run announced: $(tail -n 1 "$T/p.out") vs $(json_field "$D" '[.chunks_removed, .bytes_freed]')"
[ "$(ids d42)" = "$KEPT" ] || fail "d42 kept $(ids d42), expected $KEPT"
[ "$(ids e42)" = "${E[*]}" ] || fail "--disk d42 touched e42: $(ids e42)"
for g in $REMOVED; do [ ! -e "$REPO/generations/$g.json" ] && [ ! -e "$REPO/generations/$g.idx" ] || fail "files of $g left"; done
ctl verify "repo:$REPO" >/dev/null || fail "verify after prune"

log "--disk e42 --keep 1 (the old flag)"
ctl prune "repo:$REPO" --disk e42 --keep 1 >"$T/p2.out" || fail "prune --disk e42 --keep 1"
grep -q "^removed 2 generation(s), kept 6;" "$T/p2.out" || fail "prune --disk e42: $(tail -n 1 "$T/p2.out")"
[ "$(ids e42)" = "${E[2]}" ] || fail "e42 kept $(ids e42), expected ${E[2]}"
[ "$(ids d42)" = "$KEPT" ] || fail "--disk e42 touched d42: $(ids d42)"
ctl verify "repo:$REPO" >/dev/null || fail "verify after the second prune"

log "every kept generation restores bit-exact"
for i in 3 5 6 8 9; do
  ctl restore "repo:$REPO@${G[$i]}" --to "$T/r.img" >/dev/null || fail "restore g$i"
  cmp "$T/r.img" "$T/g$i.img" || fail "restore of g$i differs from the export at its backup"
done
ctl restore "repo:$REPO@${E[2]}" --to "$T/r.img" >/dev/null || fail "restore e2"
cmp "$T/r.img" "$T/e2.img" || fail "restore of e2 differs"
# the same policy again removes nothing more
ctl prune "repo:$REPO" "${POLICY[@]}" >"$T/p3.out" || fail "prune again"
grep -q "^removed 0 generation(s), kept 6; 0 chunk(s) freed" "$T/p3.out" || fail "second run: $(tail -n 1 "$T/p3.out")"
log "PASS"
