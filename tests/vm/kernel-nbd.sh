#!/usr/bin/env bash
# The kernel NBD path, run inside the VM by tests/60-kernel-nbd.sh (scripts/vm.sh):
# needs the nbd module and root. Everything lives on tmpfs (/dev/shm): unix sockets
# cannot be created in the VM's shared directories.
#   KNBD_ONLY="attach fs ..."   only these parts (default: all, in order)
# Parts: attach, fs (ext4 + XFS, detach refused while mounted, --freeze backup, restore),
# ro, stamp (cut consistency through /dev/nbdN), flush (FLUSH/FUA reach the origin;
# an fsync'ed write survives kill -9), reconnect (kill -9 + attach, restart, upgrade,
# no daemon coming back), pg (pgbench with a backup and a daemon restart).
export TMPDIR=/dev/shm
exec 2>&1  # one stream: the VM's console keeps them apart and interleaves them badly
. "$(dirname "$0")/../lib.sh"
HERE=$(cd "$(dirname "$0")" && pwd)
need mkfs.ext4 mkfs.xfs e2fsck xfs_repair blockdev losetup python3 sha256sum
ONLY=${KNBD_ONLY:-attach fs ro stamp flush reconnect pg}
want() { [[ " $ONLY " == *" $1 "* ]]; }
PASSED=()
part_done() { PASSED+=("$1"); log "part $1: ok"; }

log "kernel-nbd: running on $(uname -r), $(nproc) CPUs; parts: $ONLY"
modprobe nbd nbds_max=16 2>/dev/null || fail "modprobe nbd failed: this kernel has no nbd module"
modprobe loop 2>/dev/null  # for the flush part's origin; built in on some kernels
[ -b /dev/nbd0 ] || fail "no /dev/nbd0 after modprobe nbd"
# nbd devices in use by nobody else: this VM is ours
st() { ctl status "$1" --json; }
rec() { cat "$COWSNAP_RUN_DIR/$1.attach.json"; }
devsize() { blockdev --getsize64 "$1"; }
mk() { truncate -s "$2" "$T/$1.img" || fail "create $1.img"; }
mnt() { mkdir -p "$2"; mount "$1" "$2" || fail "mount $1 on $2"; track_mount "$2"; }
# conns NAME N: the daemon counts N open connections (within 10 s; it counts a
# connection once its thread has started)
conns() { local i c; for i in $(seq 100); do c=$(st "$1" | jq .daemon.connections); [ "$c" = "$2" ] && return 0; sleep 0.1; done; echo "$c"; return 1; }
# errors the kernel passed up for nbd devices ("Dead connection, failed to find a
# fallback" is not one: the kernel says it before it waits for a reconnect)
nbd_io_errors() { dmesg | grep -cE 'I/O error, dev nbd|Buffer I/O error on dev nbd|EXT4-fs (error|warning).*nbd|XFS \(nbd.*(error|metadata I/O)' ; }

if want attach; then
  log "attach: auto pick, --nbd-device, --connections, size and block size"
  mk a 96M
  dev=$(ctl attach "$T/a.img" --name ka | tail -n 1) || fail "attach (auto)"
  [[ $dev == /dev/nbd* ]] || fail "auto attach with /dev/nbd0 present gave $dev, not /dev/nbdN"
  [ "$(rec ka | jq -r .via)" = nbd ] || fail "auto attach was not via nbd: $(rec ka)"
  [ "$(devsize "$dev")" = $((96 << 20)) ] || fail "$dev reports $(devsize "$dev") bytes, not $((96 << 20))"
  [ "$(blockdev --getss "$dev")" = 512 ] || fail "$dev logical block size $(blockdev --getss "$dev"), not 512"
  n=$(rec ka | jq .nbd_connections); want_n=$(( $(nproc) < 4 ? $(nproc) : 4 ))
  [ "$n" = "$want_n" ] || fail "default connections $n, expected min(4, nproc) = $want_n"
  c=$(conns ka "$n") || fail "daemon sees $c connections, not $n"
  log "  $dev: $(devsize "$dev") bytes, logical block $(blockdev --getss "$dev"), $n connections"
  mk b 64M
  dev2=$(ctl attach "$T/b.img" --name kb --via nbd --nbd-device /dev/nbd7 --connections 3 | tail -n 1) ||
    fail "attach --nbd-device /dev/nbd7"
  [ "$dev2" = /dev/nbd7 ] || fail "--nbd-device /dev/nbd7 gave $dev2"
  c=$(conns kb 3) || fail "--connections 3: daemon sees $c"
  [ "$(devsize /dev/nbd7)" = $((64 << 20)) ] || fail "/dev/nbd7 size $(devsize /dev/nbd7)"
  # a device that is taken cannot be taken twice
  mk c 16M
  ctl attach "$T/c.img" --name kc --via nbd --nbd-device /dev/nbd7 >"$T/out" 2>&1 &&
    fail "a second attach on /dev/nbd7 succeeded: $(cat "$T/out")"
  log "  second attach on /dev/nbd7 refused: $(tail -n 1 "$T/out")"
  [ ! -e "$COWSNAP_RUN_DIR/kc.attach.json" ] && [ ! -e "$COWSNAP_RUN_DIR/kc.pid" ] ||
    fail "the refused attach left files behind"
  ctl attach "$T/c.img" --name kc --via fuse --connections 2 >"$T/out" 2>&1 &&
    fail "--connections with --via fuse was accepted"
  # data written through one device reads back through the origin
  head -c 1M /dev/urandom >"$T/pat"
  dd if="$T/pat" of="$dev" bs=1M seek=5 oflag=direct conv=fsync status=none || fail "write $dev"
  cmp <(dd if="$T/a.img" bs=1M skip=5 count=1 status=none) "$T/pat" || fail "origin does not hold what $dev wrote"
  # a 4096-byte block size when the server's minimum asks for it is not testable here:
  # the daemon announces 1 (any alignment), so the kernel device gets 512
  ctl detach ka || fail "detach ka"
  ctl detach kb || fail "detach kb"
  [ -e /sys/block/nbd7/pid ] && fail "/dev/nbd7 still configured after detach"
  rm -f "$T"/{a,b,c}.img
  part_done attach
fi

# fsck_clean FS DEV WHAT: a read-only check of the unmounted FS on DEV is clean
fsck_clean() {
  case $1 in
    ext4) e2fsck -fn "$2" >"$T/fsck" 2>&1 || fail "e2fsck of $3: $(tail -n 5 "$T/fsck")";;
    xfs) xfs_repair -n "$2" >"$T/fsck" 2>&1 || fail "xfs_repair -n of $3: $(head -n 20 "$T/fsck")";;
    *) fail "fsck_clean: unknown filesystem $1";;
  esac
}
fs_round() { # fs_round NAME FS SIZE MKFS...
  local name=$1 fs=$2 size=$3; shift 3
  local dev m out gen
  mk "$name" "$size"
  dev=$(ctl attach "$T/$name.img" --name "$name" --via nbd | tail -n 1) || fail "attach $name"
  log "  . $fs: attached $dev"
  "$@" "$dev" >"$T/mkfs.out" 2>&1 || fail "$* $dev: $(tail -n 3 "$T/mkfs.out")"
  m=$T/m-$name; mnt "$dev" "$m"
  mkdir "$m/d"
  for i in 1 2 3; do head -c 2M /dev/urandom >"$m/d/f$i"; done
  mkdir "$m/d/many"; for i in $(seq 50); do echo "$i" >"$m/d/many/$i"; done
  sync
  (cd "$m/d" && find . -type f -exec sha256sum {} + | sort -k2) >"$T/$name.sums"
  # detach is refused while mounted, and touches nothing
  out=$(ctl detach "$name" 2>&1) && fail "detach of mounted $name succeeded"
  [[ $out == *"mounted on $m"* ]] || fail "detach refusal does not name the mount point: $out"
  running "$(rec "$name" | jq -r .pid)" || fail "the refused detach stopped the daemon"
  [ -e "/sys/block/${dev#/dev/}/pid" ] || fail "the refused detach removed $dev"
  # application-consistent backup with --freeze while a writer is busy
  log "  . $fs: files written, detach refused"
  ( for i in $(seq 40); do echo "$i" >>"$m/d/busy"; sleep 0.05; done ) &
  local w=$!; EXTRA_PIDS+=("$w")
  ctl backup "$name" --to "repo:$T/repo" --freeze "$m" --json >"$T/bk.json" 2>"$T/bk.err" ||
    fail "backup --freeze of $fs: $(cat "$T/bk.err")"
  wait "$w"
  gen=$(tail -n 1 "$T/bk.json" | jq -r ".generation // .target_generation // empty")
  [ -n "$gen" ] && [ "$gen" != null ] || fail "backup gave no generation: $(tail -n 2 "$T/bk.json")"
  log "  . $fs: backup done"
  umount "$m" || fail "umount $m"
  fsck_clean "$fs" "$dev" "$dev"
  ctl detach "$name" || fail "detach $name after umount"
  log "  . $fs: fsck done, detached"
  ctl restore "repo:$T/repo@$gen" --to "$T/$name.restored" >"$T/rs.out" 2>&1 || fail "restore: $(cat "$T/rs.out")"
  log "  . $fs: restored"
  # the restored image, attached through the kernel path too; mounting it replays the
  # journal of the frozen instant (XFS leaves its log to be recovered after a freeze)
  local rdev
  rdev=$(ctl attach "$T/$name.restored" --name "$name-r" --via nbd | tail -n 1) ||
    fail "attach the restored $fs"
  mkdir -p "$T/r-$name"
  mount "$rdev" "$T/r-$name" || fail "mount the restored $fs ($rdev)"
  track_mount "$T/r-$name"
  (cd "$T/r-$name/d" && find . -type f ! -name busy -exec sha256sum {} + | sort -k2) >"$T/$name.rsums"
  grep -v ' ./busy$' "$T/$name.sums" | cmp - "$T/$name.rsums" || fail "restored $fs files differ from the originals"
  [ -s "$T/r-$name/d/busy" ] || fail "the busy file is empty in the restored $fs"
  umount "$T/r-$name" || fail "umount the restored $fs"
  fsck_clean "$fs" "$rdev" "the restored $fs"
  ctl detach "$name-r" || fail "detach the restored $fs"
  log "  $fs: mkfs, mount, $(wc -l <"$T/$name.sums") files, detach refused while mounted, --freeze backup $gen, fsck clean, restore identical"
  rm -f "$T/$name.img" "$T/$name.restored"
}

if want fs; then
  log "fs: ext4 and XFS on /dev/nbdN"
  fs_round kx4 ext4 96M mkfs.ext4 -q -F
  fs_round kxf xfs 320M mkfs.xfs -q -f
  rm -rf "$T/repo"
  part_done fs
fi

if want ro; then
  log "ro: --read-only"
  head -c 8M /dev/urandom >"$T/ro.img"
  dev=$(ctl attach "$T/ro.img" --name kro --via nbd --read-only | tail -n 1) || fail "attach --read-only"
  [ "$(blockdev --getro "$dev")" = 1 ] || fail "$dev is not read-only for the kernel"
  cmp "$dev" "$T/ro.img" || fail "read-only $dev does not read as the origin"
  sum=$(sha256sum <"$T/ro.img")
  dd if=/dev/zero of="$dev" bs=4k count=1 oflag=direct status=none 2>/dev/null &&
    fail "a write to read-only $dev succeeded"
  [ "$(sha256sum <"$T/ro.img")" = "$sum" ] || fail "the origin changed under a read-only attach"
  ctl detach kro || fail "detach kro"
  rm -f "$T/ro.img"
  part_done ro
fi

if want stamp; then
  log "stamp: stamped sectors through /dev/nbdN during a backup"
  head -c 64M /dev/urandom >"$T/st.img"; cp "$T/st.img" "$T/st.orig"
  dev=$(ctl attach "$T/st.img" --name kst --via nbd --connections 2 | tail -n 1) || fail "attach kst"
  timeout 600 python3 "$HERE/../stamp.py" dev "$dev" "$CTL" kst "$T/st.orig" "$T/st.image" 2 2 1 20 ||
    fail "stamped-sector check through $dev"
  ctl detach kst || fail "detach kst"
  rm -f "$T"/st.*
  part_done stamp
fi

if want flush; then
  log "flush: FLUSH and FUA reach the origin; an fsync'ed write survives kill -9"
  truncate -s 64M "$T/fl.back"
  lo=$(losetup -f --show "$T/fl.back") || fail "losetup"
  lon=${lo#/dev/}
  flushes() { awk '{print $16}' "/sys/block/$lon/stat"; }
  dev=$(ctl attach "$lo" --name kfl --via nbd | tail -n 1) || fail "attach $lo"
  head -c 4M /dev/urandom >"$T/pat"
  f0=$(flushes); d0=$(st kfl | jq .daemon.stats.flushes)
  dd if="$T/pat" of="$dev" bs=1M seek=8 conv=fsync status=none || fail "dd conv=fsync to $dev"
  f1=$(flushes); d1=$(st kfl | jq .daemon.stats.flushes)
  [ "$d1" -gt "$d0" ] || fail "fsync of $dev sent no FLUSH to the daemon ($d0 → $d1)"
  [ "$f1" -gt "$f0" ] || fail "the FLUSH did not reach the origin $lo (its flush count $f0 → $f1)"
  # FUA: O_DIRECT|O_DSYNC writes carry REQ_FUA; the daemon flushes the origin for them
  head -c 64k /dev/urandom >"$T/pat2"
  d1=$(st kfl | jq .daemon.stats.flushes); f1=$(flushes)
  dd if="$T/pat2" of="$dev" bs=64k seek=400 oflag=direct,dsync status=none || fail "dd oflag=dsync"
  f2=$(flushes); d2=$(st kfl | jq .daemon.stats.flushes)
  [ "$f2" -gt "$f1" ] || fail "a FUA write did not flush the origin ($f1 → $f2)"
  log "  origin flushes: fsync $f0 → $(( f1 )), FUA write → $f2 (daemon FLUSH commands $d0 → $d2)"
  # kill -9 right after the fsync: the data is on the origin, not only in a cache above it
  head -c 4M /dev/urandom >"$T/pat3"
  dd if="$T/pat3" of="$dev" bs=1M seek=20 conv=fsync status=none || fail "dd conv=fsync"
  pid=$(rec kfl | jq -r .pid); kill -9 "$pid"; wait_gone "$pid" 10 || fail "daemon survived kill -9"
  cmp <(dd if="$lo" bs=1M skip=8 count=4 iflag=direct status=none) "$T/pat" || fail "fsync'ed data 1 not on the origin after kill -9"
  cmp <(dd if="$lo" bs=64k skip=400 count=1 iflag=direct status=none) "$T/pat2" || fail "FUA data not on the origin after kill -9"
  cmp <(dd if="$lo" bs=1M skip=20 count=4 iflag=direct status=none) "$T/pat3" || fail "fsync'ed data 3 not on the origin after kill -9"
  log "  fsync'ed and FUA data on the origin after kill -9 of the daemon"
  ctl detach --force kfl >/dev/null 2>&1 || fail "detach --force after kill -9"
  [ -e "/sys/block/${dev#/dev/}/pid" ] && fail "$dev still configured after detach --force"
  losetup -d "$lo"; rm -f "$T/fl.back" "$T"/pat*
  part_done flush
fi

if want reconnect; then
  log "reconnect: a mounted ext4 keeps working across kill -9 + attach, restart, upgrade"
  mk rc 128M
  dev=$(ctl attach "$T/rc.img" --name krc --via nbd --connections 2 | tail -n 1) || fail "attach krc"
  mkfs.ext4 -q -F "$dev" || fail "mkfs"
  m=$T/m-rc; mnt "$dev" "$m"; mkdir "$m/w"
  e0=$(nbd_io_errors)
  python3 "$HERE/fsync-writer.py" write "$m/w" "$T/w.log" "$T/w.stop" >"$T/w.out" 2>&1 &
  W=$!; EXTRA_PIDS+=("$W")
  for _ in $(seq 120); do [ "$(wc -l <"$T/w.log" 2>/dev/null || echo 0)" -ge 5 ] && break; sleep 0.5; done
  n0=$(wc -l <"$T/w.log"); [ "$n0" -ge 5 ] || fail "the writer wrote $n0 files in 60 s: $(cat "$T/w.out")"
  pid=$(rec krc | jq -r .pid)
  kill -9 "$pid"; wait_gone "$pid" 10 || fail "daemon survived kill -9"
  log "  daemon $pid killed with the writer at $n0 files"
  sleep 2
  running "$W" || fail "the writer died when the daemon was killed: $(cat "$T/w.out")"
  t0=$(date +%s)
  dev2=$(ctl attach "$T/rc.img" --name krc --via nbd 2>"$T/ra.err" | tail -n 1) ||
    fail "attach after kill -9: $(cat "$T/ra.err")"
  [ "$dev2" = "$dev" ] || fail "attach after kill -9 gave $dev2, not $dev"
  grep -q "reconnecting" "$T/ra.err" || fail "attach did not say it reconnected: $(cat "$T/ra.err")"
  pid2=$(rec krc | jq -r .pid); [ "$pid2" != "$pid" ] && running "$pid2" || fail "no new daemon"
  n1=$(wc -l <"$T/w.log")
  for _ in $(seq 120); do [ "$(wc -l <"$T/w.log")" -gt $((n1 + 5)) ] && break; sleep 0.5; done
  [ "$(wc -l <"$T/w.log")" -gt $((n1 + 5)) ] || fail "the writer did not go on after the reconnect"
  log "  attach after kill -9: $dev reconnected to daemon $pid2; writer going on ($(wc -l <"$T/w.log") files, $(( $(date +%s) - t0 )) s)"
  # restart with a new binary (an upgrade): a copy of the daemon under another path
  mkdir -p "$T/new"; cp "$NBD" "$T/new/cowsnap-nbd"
  COWSNAP_NBD_BIN=$T/new/cowsnap-nbd ctl restart krc >"$T/rs.out" 2>&1 || fail "restart: $(cat "$T/rs.out")"
  pid3=$(rec krc | jq -r .pid)
  [ "$pid3" != "$pid2" ] && running "$pid3" || fail "restart left no new daemon"
  [ "$(readlink "/proc/$pid3/exe")" = "$T/new/cowsnap-nbd" ] || fail "restart did not run the new binary: $(readlink "/proc/$pid3/exe")"
  [ "$(tail -n 1 "$T/rs.out")" = "$dev" ] || fail "restart: $(cat "$T/rs.out")"
  n2=$(wc -l <"$T/w.log")
  for _ in $(seq 120); do [ "$(wc -l <"$T/w.log")" -gt $((n2 + 5)) ] && break; sleep 0.5; done
  [ "$(wc -l <"$T/w.log")" -gt $((n2 + 5)) ] || fail "the writer did not go on after the restart"
  log "  restart (new binary $T/new/cowsnap-nbd): daemon $pid3, writer going on ($(wc -l <"$T/w.log") files)"
  touch "$T/w.stop"; wait "$W" || fail "the writer failed: $(cat "$T/w.out")"
  log "  $(cat "$T/w.out")"
  python3 "$HERE/fsync-writer.py" verify "$m/w" "$T/w.log" || fail "files differ after the reconnects"
  e1=$(nbd_io_errors)
  [ "$e1" = "$e0" ] || fail "the kernel logged I/O errors on nbd: $(dmesg | grep -E 'nbd[0-9]+' | tail -n 5)"
  log "  kernel: $(dmesg | grep -cE 'nbd[0-9]+: Dead connection') \"dead connection\" waits, $(dmesg | grep -c 'reconnected socket') sockets reconnected, no I/O error"
  umount "$m" || fail "umount"
  e2fsck -fn "$dev" >"$T/fsck" 2>&1 || fail "e2fsck after the reconnects: $(tail -n 5 "$T/fsck")"
  ctl detach krc || fail "detach krc"
  rm -f "$T/rc.img"
  # nobody comes back: I/O fails after --reconnect-timeout, detach --force cleans up
  mk nc 16M
  dev=$(ctl attach "$T/nc.img" --name knc --via nbd --connections 1 --reconnect-timeout 3s | tail -n 1) || fail "attach knc"
  pid=$(rec knc | jq -r .pid); kill -9 "$pid"; wait_gone "$pid" 10 || fail "kill -9"
  sleep 1
  t0=$(date +%s.%N)
  dd if="$dev" of=/dev/null bs=4k count=1 skip=1000 iflag=direct status=none 2>"$T/dd.err" &&
    fail "a read with no daemon for longer than the reconnect timeout succeeded"
  dt=$(echo "$(date +%s.%N) - $t0" | bc)
  log "  no daemon: a read failed after $(printf %.1f "$dt") s (--reconnect-timeout 3s): $(head -c 100 "$T/dd.err")"
  # the device is still configured: a later attach reconnects it, and I/O works again
  [ -e "/sys/block/${dev#/dev/}/pid" ] || fail "$dev was released after the timeout"
  ctl attach "$T/nc.img" --name knc --via nbd >/dev/null 2>"$T/ra.err" || fail "attach after the timeout: $(cat "$T/ra.err")"
  dd if="$dev" of=/dev/null bs=4k count=1 skip=1000 iflag=direct status=none || fail "read after the late reconnect failed"
  log "  attach after the timeout reconnected $dev; reads work again"
  ctl detach knc || fail "detach knc"
  rm -f "$T/nc.img"
  part_done reconnect
fi

if want pg; then
  PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
  if [ ! -x "$PGBIN/initdb" ] || ! id postgres >/dev/null 2>&1; then
    fail "PostgreSQL is not installed (scripts/setup.sh installs it)"
  fi
  log "pg: pgbench on ext4 on /dev/nbdN, a backup and a daemon kill -9 + attach while it runs"
  mk pg 256M
  dev=$(ctl attach "$T/pg.img" --name kpg --via nbd | tail -n 1) || fail "attach kpg"
  mkfs.ext4 -q -F "$dev" || fail "mkfs"
  m=$T/m-pg; mnt "$dev" "$m"
  mkdir -p "$m/data" "$T/pgsock"; chown postgres "$m/data" "$T/pgsock"; chmod 700 "$m/data"
  chmod 755 "$T"
  pg() { runuser -u postgres -- "$@"; }
  pg "$PGBIN/initdb" -N -D "$m/data" -A trust >"$T/initdb.out" 2>&1 || fail "initdb: $(tail -n 3 "$T/initdb.out")"
  log "  . initdb done"
  pg "$PGBIN/pg_ctl" -D "$m/data" -l "$T/pgsock/pg.log" -w -t 300 \
    -o "-p 5499 -k $T/pgsock -c listen_addresses= -c fsync=on -c shared_buffers=32MB" start >/dev/null ||
    fail "postgres start: $(tail -n 5 "$T/pgsock/pg.log")"
  PGSTOP() { pg "$PGBIN/pg_ctl" -D "$m/data" -m fast stop >/dev/null 2>&1; }
  log "  . postgres started"
  pg "$PGBIN/pgbench" -h "$T/pgsock" -p 5499 -i -s 1 postgres >"$T/pgi.out" 2>&1 || { PGSTOP; fail "pgbench -i: $(tail -n 3 "$T/pgi.out")"; }
  log "  . pgbench -i done"
  pg "$PGBIN/pgbench" -h "$T/pgsock" -p 5499 -c 2 -T "${KNBD_PG_SECS:-30}" postgres >"$T/pgb.out" 2>&1 &
  PB=$!; EXTRA_PIDS+=("$PB")
  sleep 5
  ctl backup kpg --to "repo:$T/pgrepo" --quiesce-idle 0s --json >"$T/pgbk.json" 2>"$T/pgbk.err" ||
    { PGSTOP; fail "backup under pgbench: $(cat "$T/pgbk.err")"; }
  log "  backup under pgbench: $(tail -n 1 "$T/pgbk.json" | jq -c "{event, elapsed_ms, chunks_preserved, holds}")"
  pid=$(rec kpg | jq -r .pid); kill -9 "$pid"; wait_gone "$pid" 10 || fail "kill -9"
  sleep 2
  ctl attach "$T/pg.img" --name kpg --via nbd >/dev/null 2>"$T/pga.err" || { PGSTOP; fail "attach after kill -9: $(cat "$T/pga.err")"; }
  log "  daemon killed and reattached while pgbench ran"
  log "  . waiting for pgbench"
  wait "$PB"; prc=$?
  [ "$prc" = 0 ] || { PGSTOP; fail "pgbench failed across the daemon kill: $(tail -n 5 "$T/pgb.out")"; }
  log "  pgbench: $(grep -E 'number of transactions actually processed|^tps' "$T/pgb.out" | tr '\n' ' ')"
  grep -q "number of failed transactions: 0" "$T/pgb.out" || grep -qv "failed transactions" "$T/pgb.out" ||
    { PGSTOP; fail "pgbench reported failed transactions"; }
  pg "$PGBIN/psql" -h "$T/pgsock" -p 5499 -d postgres -Atqc \
    "select (select sum(abalance) from pgbench_accounts) = (select sum(delta) from pgbench_history)" >"$T/bal" 2>&1
  [ "$(cat "$T/bal")" = t ] || { PGSTOP; fail "balances do not add up: $(cat "$T/bal")"; }
  PGSTOP
  umount "$m" || fail "umount"
  e2fsck -fn "$dev" >"$T/fsck" 2>&1 || fail "e2fsck: $(tail -n 5 "$T/fsck")"
  ctl detach kpg || fail "detach kpg"
  rm -rf "$T/pg.img" "$T/pgrepo"
  part_done pg
fi
log "PASS (${PASSED[*]})"
