#!/usr/bin/env bash
# PostgreSQL with its WAL on a second cowsnap disk (initdb --waldir), backed up under
# pgbench as one consistency group (full, then incremental, a CHECKPOINT as the
# pre-snapshot hook), each group restored live onto two other disks: the server starts
# on the restored pair while the fill runs, pg_amcheck is clean, pgbench's books agree.
#   PG_SCALE (10) PG_SECONDS (40) override the sizes.
. "$(dirname "$0")/lib.sh"
need_root
need_fuse
need mkfs.ext4 e2fsck
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
[ -x "$PGBIN/initdb" ] || skip "PostgreSQL server binaries not installed"
SCALE=${PG_SCALE:-10} SECS=${PG_SECONDS:-40}
chmod 755 "$T"
PGDATAS=()
stop_all_pg() { local d; for d in "${PGDATAS[@]}"; do runuser -u postgres -- "$PGBIN/pg_ctl" -D "$d" -m immediate stop >/dev/null 2>&1; done; }
trap 'rc=$?; stop_all_pg; (exit $rc); cleanup' EXIT
pg() { runuser -u postgres -- "$@"; }
psqlq() { pg "$PGBIN/psql" -h "$T/sock" -p "$1" -d postgres -Atqc "$2"; }
start_pg() { # DATA PORT LOG
  pg "$PGBIN/pg_ctl" -D "$1" -l "$3" -w -t 300 -o "-p $2 -k $T/sock -c listen_addresses= -c fsync=on" start >/dev/null
}
books() {
  psqlq "$1" "select (select sum(abalance) from pgbench_accounts), (select sum(bbalance) from pgbench_branches), (select sum(tbalance) from pgbench_tellers), (select coalesce(sum(delta),0) from pgbench_history)" | tr '|' ' '
}
umnt() { for _ in $(seq 50); do umount "$1" 2>/dev/null && return 0; sleep 0.2; done; umount -l "$1"; }
mkdir -p "$T/sock" "$T/pglog" && chown postgres "$T/sock" "$T/pglog"
PORT=$((20000 + RANDOM % 20000))

log "two disks behind cowsnap: pgdata (1.5 GiB) and pgwal (512 MiB), ext4 on each"
truncate -s 1536M "$T/data.img"; truncate -s 512M "$T/wal.img"
DDEV=$(ctl attach "$T/data.img" --name pgdata --via fuse | tail -n 1) || fail "attach pgdata"
WDEV=$(ctl attach "$T/wal.img" --name pgwal --via fuse | tail -n 1) || fail "attach pgwal"
mkfs.ext4 -q -F "$DDEV" && mkfs.ext4 -q -F "$WDEV" || fail "mkfs"
MD=$T/mdata MW=$T/mwal
mkdir -p "$MD" "$MW"
mount "$DDEV" "$MD" && track_mount "$MD" || fail "mount data"
mount "$WDEV" "$MW" && track_mount "$MW" || fail "mount wal"
mkdir "$MD/data" "$MW/wal"; chown postgres "$MD/data" "$MW/wal"; chmod 700 "$MD/data" "$MW/wal"
pg "$PGBIN/initdb" -D "$MD/data" --waldir "$MW/wal" -A trust >/dev/null || fail "initdb"
[ "$(readlink "$MD/data/pg_wal")" = "$MW/wal" ] || fail "pg_wal is not on the second disk"
PGDATAS+=("$MD/data"); P=$PORT; PORT=$((PORT + 1))
start_pg "$MD/data" "$P" "$T/pglog/pg.log" || fail "start the server: $(cat "$T/pglog/pg.log")"
pg "$PGBIN/pgbench" -h "$T/sock" -p "$P" -i -q -s "$SCALE" postgres >/dev/null 2>&1 || fail "pgbench -i"
log "pgbench -c 4 -j 2 -T $SECS under two group backups (full, then incremental)"
pg "$PGBIN/pgbench" -h "$T/sock" -p "$P" -n -c 4 -j 2 -T "$SECS" postgres >"$T/load.out" 2>&1 &
LOAD=$!; EXTRA_PIDS+=("$LOAD")
sleep 3
HOOK="runuser -u postgres -- $PGBIN/psql -h $T/sock -p $P -d postgres -Atqc CHECKPOINT"
ctl backup pgdata pgwal --to "repo:$T/repo" --pre-snapshot "$HOOK" --json >"$T/g1.json" 2>"$T/g1.err" \
  || fail "group backup: $(cat "$T/g1.err")"
sleep 5
ctl backup pgdata pgwal --to "repo:$T/repo" --incremental --pre-snapshot "$HOOK" --json >"$T/g2.json" 2>"$T/g2.err" \
  || fail "incremental group backup: $(cat "$T/g2.err")"
wait "$LOAD" || fail "pgbench failed during the backups: $(cat "$T/load.out")"
grep -q aborted "$T/load.out" && fail "pgbench aborted transactions"
log "pgbench: $(awk '/^tps/ {print; exit}' "$T/load.out")"
for g in g1 g2; do
  r=$(tail -n 1 "$T/$g.json")
  log "$g: group $(json_field "$r" .group), paused $(json_field "$r" .pause_us) µs; generations $(json_field "$r" '[.disks[].generation] | join(" ")')"
done
ctl list "repo:$T/repo" >"$T/list.out" || fail "list"
sed 's/^/    /' "$T/list.out"

i=0
for g in g1 g2; do
  i=$((i + 1))
  G=$(json_field "$(tail -n 1 "$T/$g.json")" .group)
  RD=$T/r$i-data.img RW=$T/r$i-wal.img
  log "restore --live group $G onto two other disks"
  ctl restore "repo:$T/repo@$G" --to "pgdata=$RD,pgwal=$RW" --live --via fuse --name-prefix "r$i-" --json \
    >"$T/r$i.json" 2>"$T/r$i.err" || fail "restore the group: $(cat "$T/r$i.err")"
  RDD=$(jq -r "select(.name == \"r$i-pgdata\") | .device" "$T/r$i.json" | tail -n 1)
  RWD=$(jq -r "select(.name == \"r$i-pgwal\") | .device" "$T/r$i.json" | tail -n 1)
  [ -b "$RDD" ] && [ -b "$RWD" ] || fail "no devices for the restored group: $(cat "$T/r$i.json")"
  RMD=$T/r$i-mdata RMW=$T/r$i-mwal
  mkdir -p "$RMD" "$RMW"
  mount "$RDD" "$RMD" && track_mount "$RMD" || fail "mount restored data"
  mount "$RWD" "$RMW" && track_mount "$RMW" || fail "mount restored wal"
  # the restored data directory's pg_wal link names the original WAL disk: point it at
  # the restored one, as an admin restoring elsewhere does
  ln -sfn "$RMW/wal" "$RMD/data/pg_wal"
  rm -f "$RMD/data/postmaster.pid"
  RP=$PORT; PORT=$((PORT + 1)); PGDATAS+=("$RMD/data")
  filled=$(ctl status "r$i-pgdata" --json | jq -r '.daemon.fill.complete // .fill.complete')
  start_pg "$RMD/data" "$RP" "$T/pglog/r$i.log" || fail "group $i: the restored server did not start: $(tail -n 20 "$T/pglog/r$i.log")"
  log "group $i: server started on the restored pair (fill complete at mount: $filled)"
  grep -E 'redo|recovery' "$T/pglog/r$i.log" | head -3 | sed 's/^/    /'
  pg "$PGBIN/pg_amcheck" -h "$T/sock" -p "$RP" --install-missing -d postgres >"$T/amcheck.out" 2>&1 \
    || fail "group $i: pg_amcheck: $(cat "$T/amcheck.out")"
  read -r a b t h <<<"$(books "$RP")"
  [ "$a" = "$b" ] && [ "$b" = "$t" ] && [ "$t" = "$h" ] || fail "group $i: books do not balance: $a $b $t $h"
  log "group $i: pg_amcheck clean, books balance ($a)"
  pg "$PGBIN/pg_ctl" -D "$RMD/data" -m fast stop >/dev/null
  umnt "$RMD"; umnt "$RMW"
  for n in "r$i-pgdata" "r$i-pgwal"; do
    for _ in $(seq 600); do [ "$(ctl status "$n" --json | jq -r '.daemon.fill.complete // .fill.complete // false')" = true ] && break; sleep 0.5; done
    ctl detach "$n" >/dev/null || fail "detach $n"
  done
  e2fsck -fn "$RD" >"$T/fsck.out" 2>&1 || fail "group $i: e2fsck data: $(cat "$T/fsck.out")"
  e2fsck -fn "$RW" >"$T/fsck.out" 2>&1 || fail "group $i: e2fsck wal: $(cat "$T/fsck.out")"
done
pg "$PGBIN/pg_ctl" -D "$MD/data" -m fast stop >/dev/null
log "PASS"
