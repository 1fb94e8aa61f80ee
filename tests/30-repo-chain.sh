#!/usr/bin/env bash
# Repository chain through the real daemon: a 512 MiB random disk (--via none), a full
# backup and two incrementals with writes between them (the second changes ~1% of the
# 1 MiB regions); every generation restores (offline) to exactly the content the export
# had at its snapshot, also twice and one after another; the 1% incremental read < 3% of
# the full; two backups of two disks into one repository at once both succeed; a disk
# restored with --live gets a new lineage and its first incremental is relative to the
# generation it came from, and restores correctly.
. "$(dirname "$0")/lib.sh"
need nbdcopy sha256sum; [ -x /usr/bin/python3 ] || skip "no /usr/bin/python3"
/usr/bin/python3 -c 'import nbd' 2>/dev/null || skip "python3-libnbd is not installed"

sha() { sha256sum "$1" | cut -d' ' -f1; }
REPO=$T/repo
bk() { timeout 300 "$CTL" backup "$@" --quiesce-idle 0 >"$T/bk.out" 2>"$T/bk.err" || fail "backup $*: $(cat "$T/bk.err")"; }
gen_of() { tail -n 1 "$T/bk.out" | jq -r '.generation // .target_generation // empty'; }

log "512 MiB random disk, attach --via none"
head -c $((512 << 20)) /dev/urandom > "$T/d.img"
uri=$(ctl attach "$T/d.img" --name d30 --via none | tail -n 1) || fail "attach"

log "full backup"
bk d30 --to "repo:$REPO"
cat "$T/bk.out" | tail -n 1
nbdcopy "$uri" "$T/e1.img" || fail "nbdcopy e1"
log "writes: 64 random regions + a zeroed 8 MiB range, then incremental #1"
nbd_write_random "$uri" 1 64 || fail "writes 1"
/usr/bin/python3 -c "import nbd,sys; h=nbd.NBD(); h.connect_uri(sys.argv[1]); h.zero(8<<20, 100<<20); h.flush(); h.shutdown()" "$uri" || fail "zero"
bk d30 --to "repo:$REPO" --incremental
nbdcopy "$uri" "$T/e2.img" || fail "nbdcopy e2"
log "writes: 5 of 512 regions (~1%), then incremental #2"
nbd_write_random "$uri" 2 5 || fail "writes 2"
bk d30 --to "repo:$REPO" --incremental
grep -qi "full read" "$T/bk.out" && fail "1% incremental fell back to a full read: $(cat "$T/bk.out")"
nbdcopy "$uri" "$T/e3.img" || fail "nbdcopy e3"

L=$(ctl list "repo:$REPO" --json) || fail "list --json"
[ "$(json_field "$L" 'length')" = 3 ] || fail "expected 3 generations: $L"
g1=$(json_field "$L" '.[0].id'); g2=$(json_field "$L" '.[1].id'); g3=$(json_field "$L" '.[2].id')
[ "$(json_field "$L" '.[0].kind')" = full ] || fail "first is not full: $L"
[ "$(json_field "$L" '.[1].kind')" = incremental ] || fail "second is not incremental: $L"
[ "$(json_field "$L" '.[2].kind')" = incremental ] || fail "third is not incremental: $L"
[ "$(json_field "$L" '.[1].parent')" = "$g1" ] || fail "parent of #2 is not #1"
[ "$(json_field "$L" '.[2].parent')" = "$g2" ] || fail "parent of #3 is not #2"
r1=$(json_field "$L" '.[0].stats.bytes_read'); r3=$(json_field "$L" '.[2].stats.bytes_read')
log "bytes_read full=$r1 1%-incremental=$r3"
[ "$r1" -ge $((512 << 20)) ] || fail "full read only $r1 bytes"
[ "$r3" -gt 0 ] || fail "1% incremental read nothing"
[ $((r3 * 100)) -lt $((r1 * 3)) ] || fail "1% incremental read $r3 bytes, not < 3% of $r1"

log "restore every generation (offline), one after another, and #2 twice"
for pair in "$g1 e1" "$g2 e2" "$g3 e3" "$g2 e2"; do
  set -- $pair
  rm -f "$T/r.img"
  ctl restore "repo:$REPO@$1" --to "$T/r.img" >/dev/null || fail "restore $1"
  [ "$(sha "$T/r.img")" = "$(sha "$T/$2.img")" ] || fail "restore of $1 differs from the content at its snapshot ($2)"
done
log "restore onto an existing file holding other data"
ctl restore "repo:$REPO@$g1" --to "$T/r.img" >/dev/null || fail "restore $g1 over a file"
[ "$(sha "$T/r.img")" = "$(sha "$T/e1.img")" ] || fail "restore over an existing file differs"

log "two disks backed up into one repository at the same time"
head -c $((256 << 20)) /dev/urandom > "$T/o.img"
ctl attach "$T/o.img" --name o30 --via none >/dev/null || fail "attach o30"
nbd_write_random "$uri" 3 16 || fail "writes 3"
timeout 300 "$CTL" backup d30 --to "repo:$REPO" --incremental --quiesce-idle 0 >"$T/p1.out" 2>"$T/p1.err" & p1=$!
timeout 300 "$CTL" backup o30 --to "repo:$REPO" --quiesce-idle 0 >"$T/p2.out" 2>"$T/p2.err" & p2=$!
EXTRA_PIDS+=("$p1" "$p2")
wait "$p1" || fail "concurrent backup of d30: $(cat "$T/p1.err")"
wait "$p2" || fail "concurrent backup of o30: $(cat "$T/p2.err")"
nbdcopy "$uri" "$T/e4.img" || fail "nbdcopy e4"
L=$(ctl list "repo:$REPO" --json)
[ "$(json_field "$L" 'length')" = 5 ] || fail "expected 5 generations: $L"
g4=$(json_field "$L" '[.[] | select(.disk == "d30")] | last | .id')
go=$(json_field "$L" '[.[] | select(.disk == "o30")] | last | .id')
ctl restore "repo:$REPO@$g4" --to "$T/r4.img" >/dev/null || fail "restore $g4"
[ "$(sha "$T/r4.img")" = "$(sha "$T/e4.img")" ] || fail "restore of the concurrent d30 backup differs"
ctl restore "repo:$REPO@$go" --to "$T/ro.img" >/dev/null || fail "restore $go"
[ "$(sha "$T/ro.img")" = "$(sha "$T/o.img")" ] || fail "restore of the concurrent o30 backup differs"
ctl verify "repo:$REPO" >/dev/null || fail "verify after concurrent backups"

log "list, human output"
ctl list "repo:$REPO" > "$T/list.txt" || fail "list"
cat "$T/list.txt"
[ "$(wc -l < "$T/list.txt")" = 6 ] || fail "list: expected a header and 5 lines"
head -n 1 "$T/list.txt" | grep -q GENERATION || fail "list: no header"
for g in "$g1" "$g2" "$g3" "$g4" "$go"; do grep -q "^$g " "$T/list.txt" || fail "list misses $g"; done
grep "^$g1 " "$T/list.txt" | grep -q ' full ' || fail "list: $g1 not shown as full"
grep "^$g3 " "$T/list.txt" | grep -q "$g2\$" || fail "list: $g3 does not show its parent"

log "a disk restored (--live) from #2 gets a new lineage; its first incremental is relative to #2"
lin_d=$(json_field "$(ctl status d30 --json)" .daemon.lineage)
[ -n "$lin_d" ] && [ "$lin_d" != null ] || fail "d30 has no lineage"
ruri=$(ctl restore "repo:$REPO@$g2" --to "$T/live.img" --live --via none --name r30 | tail -n 1) || fail "restore --live"
for _ in $(seq 600); do
  st=$(ctl status r30 --json); [ "$(json_field "$st" .daemon.fill.complete)" = true ] && break; sleep 0.1
done
[ "$(json_field "$st" .daemon.fill.complete)" = true ] || fail "fill incomplete: $st"
lin_r=$(json_field "$st" .daemon.lineage)
[ -n "$lin_r" ] && [ "$lin_r" != null ] && [ "$lin_r" != "$lin_d" ] || fail "restored disk lineage $lin_r vs $lin_d"
[ "$(json_field "$st" .daemon.restored_from.generation)" = "$g2" ] || fail "restored_from: $st"
nbdcopy "$ruri" "$T/rl.img" || fail "nbdcopy restored"
[ "$(sha "$T/rl.img")" = "$(sha "$T/e2.img")" ] || fail "live-restored disk differs from #2"
nbd_write_random "$ruri" 4 3 || fail "writes to the restored disk"
bk r30 --to "repo:$REPO" --incremental
cat "$T/bk.out" | tail -n 1
grep -qi "full read" "$T/bk.out" && fail "first incremental of the restored disk was a full read: $(cat "$T/bk.out")"
nbdcopy "$ruri" "$T/e5.img" || fail "nbdcopy e5"
L=$(ctl list "repo:$REPO" --json)
g5=$(json_field "$L" '[.[] | select(.disk == "r30")] | last | .id')
[ "$(json_field "$L" "[.[] | select(.id == \"$g5\")][0].parent")" = "$g2" ] || fail "parent of the restored disk's incremental is not $g2: $L"
[ "$(json_field "$L" "[.[] | select(.id == \"$g5\")][0].lineage")" = "$lin_r" ] || fail "generation lineage"
r5=$(json_field "$L" "[.[] | select(.id == \"$g5\")][0].stats.bytes_read")
[ $((r5 * 100)) -lt $((r1 * 3)) ] || fail "restored disk's incremental read $r5 bytes"
ctl restore "repo:$REPO@$g5" --to "$T/r5.img" >/dev/null || fail "restore $g5"
[ "$(sha "$T/r5.img")" = "$(sha "$T/e5.img")" ] || fail "restore of the restored disk's incremental differs"

ctl detach r30 || fail "detach r30"; ctl detach o30 || fail "detach o30"; ctl detach d30 || fail "detach d30"
log "PASS"
