#!/usr/bin/env bash
# A live PostgreSQL disk, backed up online (full + incremental under pgbench) into a
# repository, each generation restored on the fly to another disk, a second server
# started on it while the fill runs: crash recovery, pg_amcheck, pgbench's books.
# The same on ext4 and XFS, plus an application-consistent --freeze variant on ext4.
#   PG_SCALE (20) PG_SECONDS (60) PG_FS ("ext4 xfs") override the sizes.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${COWSNAP_BIN_DIR:-$ROOT/target/release}
CTL=$BIN/cowsnapctl
SCALE=${PG_SCALE:-20} SECS=${PG_SECONDS:-60} FSLIST=${PG_FS:-ext4 xfs}
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
[ -x "$PGBIN/initdb" ] || { echo "SKIP: PostgreSQL server binaries not installed"; exit 77; }
[ -e /dev/fuse ] || { echo "SKIP: no /dev/fuse"; exit 77; }
for c in nbdfuse losetup mkfs.ext4 mkfs.xfs jq; do command -v $c >/dev/null || { echo "SKIP: $c missing"; exit 77; }; done

W=$(mktemp -d /tmp/cowsnap-pg.XXXXXX); chmod 755 "$W"
export COWSNAP_RUN_DIR=$W/run COWSNAP_STATE_DIR=$W/state
PGDATAS=() MOUNTS=() NAMES=()
log() { printf '[pg %s] %s\n' "$(date +%T)" "$*"; }
cleanup() {
  set +e
  for d in "${PGDATAS[@]}"; do runuser -u postgres -- "$PGBIN/pg_ctl" -D "$d" -m immediate stop >/dev/null 2>&1; done
  for m in "${MOUNTS[@]}"; do mountpoint -q "$m" && umount -l "$m"; done
  for n in "${NAMES[@]}"; do "$CTL" detach "$n" --force >/dev/null 2>&1; done
  for l in $(losetup -a 2>/dev/null | grep "$W" | cut -d: -f1); do losetup -d "$l"; done
  grep " $W" /proc/mounts | awk '{print $2}' | sort -r | while read -r m; do fusermount3 -u "$m" 2>/dev/null || umount -l "$m"; done
  pkill -f -- "--run-dir $W/run" 2>/dev/null; pkill -f "$W/run" 2>/dev/null
  sleep 0.5; rm -rf "$W"
}
trap cleanup EXIT
PORT=$((20000 + RANDOM % 20000))

sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a - b }'; }
pg() { runuser -u postgres -- "$@"; }
psqlq() { pg "$PGBIN/psql" -h "$W/sock" -p "$1" -d postgres -Atqc "$2"; }
start_pg() { # DATA PORT LOG
  pg "$PGBIN/pg_ctl" -D "$1" -l "$3" -w -t 300 -o "-p $2 -k $W/sock -c listen_addresses= -c fsync=on" start >/dev/null
}
attach() { # FILE NAME -> device on stdout
  local dev; dev=$("$CTL" attach "$1" --via fuse --name "$2" | tail -n1); NAMES+=("$2"); echo "$dev"; }
books() { # PORT -> "a b t h"
  psqlq "$1" "select (select sum(abalance) from pgbench_accounts), (select sum(bbalance) from pgbench_branches), (select sum(tbalance) from pgbench_tellers), (select coalesce(sum(delta),0) from pgbench_history)" | tr '|' ' '
}
mkdir -p "$W/sock" "$W/pglog" && chown postgres "$W/sock" "$W/pglog"
fails=0
fail() { log "FAIL: $*"; fails=$((fails+1)); }
umnt() { # umount, retrying while the last server processes exit
  for _ in $(seq 50); do umount "$1" 2>/dev/null && return 0; sleep 0.2; done
  fuser -vm "$1" 2>&1 | sed 's/^/    /' >&2 || true; umount "$1"; }

for FS in $FSLIST; do
  log "=== $FS: a 2 GiB disk behind cowsnap, PostgreSQL on it"
  truncate -s 2G "$W/$FS.img"
  DEV=$(attach "$W/$FS.img" "pg-$FS")
  case $FS in ext4) mkfs.ext4 -q -F "$DEV";; xfs) mkfs.xfs -q -f "$DEV";; esac
  M=$W/mnt-$FS; mkdir -p "$M"; mount "$DEV" "$M"; MOUNTS+=("$M")
  mkdir "$M/data"; chown postgres "$M/data"; chmod 700 "$M/data"
  pg "$PGBIN/initdb" -D "$M/data" -A trust >/dev/null
  PGDATAS+=("$M/data"); P=$PORT; PORT=$((PORT+1))
  start_pg "$M/data" "$P" "$W/pglog/pg-$FS.log"
  pg "$PGBIN/pgbench" -h "$W/sock" -p "$P" -i -q -s "$SCALE" postgres >/dev/null 2>&1
  log "pgbench -i -s $SCALE done; baseline run without backup (${SECS}s/3)"
  pg "$PGBIN/pgbench" -h "$W/sock" -p "$P" -n -c 4 -j 2 -T $((SECS / 3)) postgres >"$W/base-$FS.out" 2>&1
  BASE_TPS=$(awk '/^tps/ {print $3; exit}' "$W/base-$FS.out")
  log "pgbench -c 4 -j 2 -T $SECS under two online backups (full, then incremental)"
  pg "$PGBIN/pgbench" -h "$W/sock" -p "$P" -n -c 4 -j 2 -T "$SECS" postgres >"$W/load-$FS.out" 2>&1 &
  LOAD=$!
  sleep 3
  t0=$(date +%s.%N)
  "$CTL" backup "pg-$FS" --to "repo:$W/repo" --quiesce-idle 0s --json >"$W/full-$FS.json"
  tf=$(date +%s.%N)
  sleep 5
  t1=$(date +%s.%N)
  "$CTL" backup "pg-$FS" --to "repo:$W/repo" --incremental --quiesce-idle 0s --json >"$W/incr-$FS.json"
  t2=$(date +%s.%N)
  wait $LOAD || { cat "$W/load-$FS.out"; fail "$FS: pgbench failed during the backups"; }
  LOAD_TPS=$(awk '/^tps/ {print $3; exit}' "$W/load-$FS.out")
  for k in full incr; do
    tail -n1 "$W/$k-$FS.json" | jq -r --arg k "$k" '"\($k): \(.chunks_in_scope) chunks in scope, \(.chunks_preserved) preserved, \(.holds) holds (\(.hold_time_ms) ms), \(.throttled_writes) throttled, \(.bytes_stored) bytes stored, \(.elapsed_ms) ms"' | sed 's/^/    /'
  done
  grep -qE 'number of failed transactions: 0|^number of transactions actually processed' "$W/load-$FS.out" || fail "$FS: pgbench reported failures"
  grep -q 'aborted' "$W/load-$FS.out" && fail "$FS: pgbench aborted transactions"
  log "TPS without backup $BASE_TPS, during backups $LOAD_TPS; full $(sub "$tf" "$t0")s, incremental $(sub "$t2" "$t1")s"
  echo "{\"fs\":\"$FS\",\"tps_base\":$BASE_TPS,\"tps_during\":$LOAD_TPS,\"full_s\":$(sub "$tf" "$t0"),\"incr_s\":$(sub "$t2" "$t1")}" >>"${PG_RESULTS:-$W/results.jsonl}"

  GENS=$("$CTL" list "repo:$W/repo" --json | jq -r --arg d "pg-$FS" '.[] | select(.disk == $d) | .id')
  [ "$(echo "$GENS" | wc -w)" = 2 ] || fail "$FS: expected 2 generations, got: $GENS"
  grep -q incremental <("$CTL" list "repo:$W/repo" --json | jq -r --arg d "pg-$FS" '.[] | select(.disk == $d) | .kind') || fail "$FS: no incremental generation"
  i=0
  for G in $GENS; do
    i=$((i+1)); R=$W/restored-$FS-$i.img; RN=rst-$FS-$i
    log "restore --live generation $G of pg-$FS to $R"
    RDEV=$("$CTL" restore "repo:$W/repo@$G" --to "$R" --live --via fuse --name "$RN" | tail -n1)
    NAMES+=("$RN")
    # XFS refuses a second mount of the same filesystem UUID while the original is mounted.
    RM=$W/rmnt-$FS-$i; mkdir -p "$RM"; MOUNTS+=("$RM")
    case $FS in xfs) mount -o nouuid "$RDEV" "$RM";; *) mount "$RDEV" "$RM";; esac
    FILLED=$("$CTL" status "$RN" --json | jq -r '.fill.complete')
    log "mounted the restored disk (fill complete: $FILLED); starting a second server on it"
    RP=$PORT; PORT=$((PORT+1)); PGDATAS+=("$RM/data"); rm -f "$RM/data/postmaster.pid"
    if start_pg "$RM/data" "$RP" "$W/pglog/pg-r-$FS-$i.log"; then
      grep -E 'redo|recovery|checkpoint record' "$W/pglog/pg-r-$FS-$i.log" | sed 's/^/    /' | head -5
      pg "$PGBIN/pg_amcheck" -h "$W/sock" -p "$RP" --install-missing -d postgres >"$W/amcheck.out" 2>&1 || { cat "$W/amcheck.out"; fail "$FS gen $i: pg_amcheck"; }
      read -r a b t h <<<"$(books "$RP")"
      if [ "$a" = "$b" ] && [ "$b" = "$t" ] && [ "$t" = "$h" ]; then log "books balance: $a"; else fail "$FS gen $i: books do not balance: $a $b $t $h"; fi
      pg "$PGBIN/pg_ctl" -D "$RM/data" -m fast stop >/dev/null
    else
      cat "$W/pglog/pg-r-$FS-$i.log"; fail "$FS gen $i: restored server did not start"
    fi
    umnt "$RM"
    for _ in $(seq 600); do [ "$("$CTL" status "$RN" --json | jq -r '.fill.complete // false')" = true ] && break; sleep 0.5; done
    [ "$("$CTL" status "$RN" --json | jq -r '.fill.complete')" = true ] || fail "$FS gen $i: the fill did not complete"
    "$CTL" detach "$RN"
    case $FS in
      ext4) e2fsck -fn "$R" >"$W/fsck.out" 2>&1 || { cat "$W/fsck.out"; fail "$FS gen $i: e2fsck"; };;
      xfs) xfs_repair -n -f "$R" >"$W/fsck.out" 2>&1 || { cat "$W/fsck.out"; fail "$FS gen $i: xfs_repair"; };;
    esac
    log "generation $i of $FS: fsck of the restored image done"
  done

  if [ "$FS" = ext4 ]; then
    log "=== application-consistent variant: CHECKPOINT, --freeze $M, restore, no redo beyond the checkpoint"
    psqlq "$P" "CHECKPOINT"
    REDO=$(psqlq "$P" "select redo_lsn from pg_control_checkpoint()")
    "$CTL" backup "pg-$FS" --to "repo:$W/repo" --freeze "$M" --json >"$W/freeze.json"
    G=$("$CTL" list "repo:$W/repo" --json | jq -r --arg d "pg-$FS" '[.[] | select(.disk == $d)] | last | .id')
    R=$W/restored-freeze.img; RN=rst-freeze
    RDEV=$("$CTL" restore "repo:$W/repo@$G" --to "$R" --live --via fuse --name "$RN" | tail -n1); NAMES+=("$RN")
    RM=$W/rmnt-freeze; mkdir -p "$RM"; mount "$RDEV" "$RM"; MOUNTS+=("$RM")
    RREDO=$("$PGBIN/pg_controldata" "$RM/data" | awk -F': *' '/REDO location/ {print $2}')
    [ "$RREDO" = "$REDO" ] && log "restored control file: latest checkpoint REDO $RREDO = the CHECKPOINT's" || fail "freeze: REDO $RREDO != $REDO"
    RP=$PORT; PORT=$((PORT+1)); PGDATAS+=("$RM/data"); rm -f "$RM/data/postmaster.pid"
    start_pg "$RM/data" "$RP" "$W/pglog/pg-freeze.log" || { cat "$W/pglog/pg-freeze.log"; fail "freeze: server did not start"; }
    read -r a b t h <<<"$(books "$RP")"; [ "$a" = "$h" ] && [ "$b" = "$t" ] && [ "$a" = "$b" ] || fail "freeze: books $a $b $t $h"
    pg "$PGBIN/pg_ctl" -D "$RM/data" -m fast stop >/dev/null; umnt "$RM"; "$CTL" detach "$RN" --force >/dev/null
  fi
  pg "$PGBIN/pg_ctl" -D "$M/data" -m fast stop >/dev/null
  umnt "$M"; "$CTL" detach "pg-$FS"
done
[ "$fails" = 0 ] && log "all checks passed" || { log "$fails check(s) failed"; exit 1; }
