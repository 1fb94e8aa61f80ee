#!/usr/bin/env bash
# Pull mode (issue 13): `cowsnapctl snapshot` serves a frozen point-in-time image of the
# live disk as the NBD export NAME@snap; other tools read it; `release [--commit]` ends it.
#  a. a 256 MiB random disk (--via none), 4 python3-libnbd writers stamping every 4 KiB
#     sector; snapshot, nbdcopy of the export while the writers go on, release: the copy
#     is the disk at one instant and no acknowledged write is lost (tests/stamp.py,
#     STAMP_PULL=nbdcopy).
#  b. the same with qemu-img convert.
#  c. a mounted ext4 (--via fuse) with a writer: snapshot --freeze, nbdcopy, release
#     --commit (prints GEN), more writes, snapshot --freeze again; only the extents of
#     qemu:dirty-bitmap:GEN (nbdinfo --map, and qemu-img map with x-dirty-bitmap) are
#     read and written onto the first copy, which must then equal a full copy of the
#     second snapshot bit for bit; e2fsck -fn clean. Other bitmap names get no context.
#  d. the export is served on --listen too (nbdcopy over TCP of the idle disk).
#     A snapshot while a backup runs is refused and changes nothing, as are a backup and
#     a detach while a snapshot is exported; release without a snapshot is a clear error;
#     a connected client sees its connection close at release.
#  e. a container that fills: the snapshot fails (reads get an error, the status says
#     why), every write still succeeds, release --commit is refused, release works.
. "$(dirname "$0")/lib.sh"
need nbdcopy nbdinfo qemu-img cmp /usr/bin/python3
/usr/bin/python3 -c 'import nbd' 2>/dev/null || skip "python3-libnbd is not installed (/usr/bin/python3 -c 'import nbd')"

SIZE=$((256 << 20))
sock() { echo "$COWSNAP_RUN_DIR/$1.nbd"; }

for tool in nbdcopy qemu-img; do
  log "$([ $tool = nbdcopy ] && echo a || echo b): stamped sectors, 4 writers, snapshot + $tool + release"
  head -c $SIZE /dev/urandom > "$T/disk.img" || fail "create the disk"
  cp "$T/disk.img" "$T/orig.img"
  uri=$(ctl attach "$T/disk.img" --name t35 --via none | tail -n 1) || fail "attach"
  STAMP_PULL=$tool STAMP_CONTAINER="file:$T/cont.img:256M" timeout 300 /usr/bin/python3 \
    "$ROOT/tests/stamp.py" nbd "$uri" "$CTL" t35 "$T/orig.img" "$T/image.img" 4 2 1 ||
    fail "stamped-sector check with $tool"
  [ -e "$T/cont.img" ] && fail "the file container is still there after release"
  [ "$(ctl status t35 --json | jq -r '.daemon.snapshot // "none"')" = none ] || fail "status still shows a snapshot"
  ctl detach t35 || fail "detach"
  rm -f "$T/disk.img" "$T/orig.img" "$T/image.img"
done

log "c: live ext4, snapshot + nbdcopy, release --commit, dirty-bitmap increment"
need_root; need_fuse; need mkfs.ext4 e2fsck
truncate -s 512M "$T/disk.img"
dev=$(ctl attach "$T/disk.img" --name t35c --via fuse | tail -n 1) || fail "attach --via fuse"
mkfs.ext4 -q -F "$dev" || fail "mkfs.ext4"
M=$T/mnt; mkdir -p "$M"; mount "$dev" "$M" || fail "mount"; track_mount "$M"
mkdir -p "$M/live"; head -c $((32 << 20)) /dev/urandom > "$M/big"; sync
writer() {
  local i=0 n f
  while [ ! -e "$T/stop" ]; do
    i=$((i + 1)); n=$((i % 48)); f=$M/live/f$n
    case $((i % 4)) in
      0|1) dd if=/dev/urandom of="$f" bs=4k count=$((RANDOM % 32 + 1)) conv=fsync status=none ;;
      2) rm -f "$f" ;;
      3) mkdir -p "$M/live/d$n" && dd if=/dev/urandom of="$M/live/d$n/x" bs=64k count=$((RANDOM % 4 + 1)) conv=fsync status=none ;;
    esac
  done
}
writer >"$T/writer.log" 2>&1 &
WR=$!; EXTRA_PIDS+=("$WR")
sleep 2
running "$WR" || fail "the writer died: $(cat "$T/writer.log")"
C="file:$T/cont.img:512M"
U="nbd+unix:///t35c@snap?socket=$(sock t35c)"
out=$(ctl snapshot t35c --freeze "$M" --container "$C" 2>"$T/snap.err") || fail "snapshot 1: $(cat "$T/snap.err")"
[ "$out" = "$U" ] || fail "snapshot printed $out, not $U"
nbdcopy "$U" "$T/copy1.img" || fail "nbdcopy 1"
running "$WR" || fail "the writer died during the copy: $(cat "$T/writer.log")"
GEN=$(ctl release t35c --commit 2>"$T/rel.err") || fail "release --commit: $(cat "$T/rel.err")"
case $GEN in pull-*) ;; *) fail "release --commit printed $GEN" ;; esac
e2fsck -fn "$T/copy1.img" >"$T/fsck1" 2>&1 || fail "copy 1 is not fsck-clean: $(tail "$T/fsck1")"
[ "$(ctl status t35c --json | jq -r .daemon.tracking.relative_to)" = "$GEN" ] || fail "tracking is not relative to $GEN"
log "copy 1 taken and fsck-clean, committed as $GEN; more writes"
head -c $((8 << 20)) /dev/urandom > "$M/new"; sleep 2
touch "$T/stop"; wait "$WR"; sync
ctl snapshot t35c --freeze "$M" --container "$C" --json >"$T/snap2.json" 2>"$T/snap.err" || fail "snapshot 2: $(cat "$T/snap.err")"
[ "$(jq -r .dirty_bitmap "$T/snap2.json")" = "$GEN" ] || fail "snapshot 2 has no dirty bitmap $GEN: $(cat "$T/snap2.json")"
nbdinfo --list "$U" | grep -qF "qemu:dirty-bitmap:$GEN" || fail "nbdinfo --list does not show qemu:dirty-bitmap:$GEN"
nbdinfo --map=qemu:dirty-bitmap:nosuch "$U" >/dev/null 2>&1 && fail "an unknown bitmap name got a context"
nbdinfo --json --map=qemu:dirty-bitmap:$GEN "$U" >"$T/map.json" || fail "nbdinfo --map=qemu:dirty-bitmap:$GEN"
# the same extents through qemu-img map with x-dirty-bitmap (dirty = "data": false there)
qemu-img map --output=json --image-opts \
  "driver=nbd,export=t35c@snap,server.type=unix,server.path=$(sock t35c),x-dirty-bitmap=qemu:dirty-bitmap:$GEN" \
  >"$T/qmap.json" || fail "qemu-img map x-dirty-bitmap"
a=$(jq -c '[.[] | select(.type == 1) | [.offset, .length]]' "$T/map.json")
b=$(jq -c '[.[] | select(.data == false) | [.start, .length]]' "$T/qmap.json")
[ "$a" = "$b" ] || fail "nbdinfo and qemu-img map disagree on the dirty extents: $a vs $b"
dirty=$(jq '[.[] | select(.type == 1) | .length] | add // 0' "$T/map.json")
log "dirty extents: $(jq length <<<"$a") covering $((dirty >> 20)) MiB of 512 MiB"
[ "$dirty" -gt $((8 << 20)) ] || fail "the dirty bitmap misses the 8 MiB file written since $GEN ($dirty bytes)"
[ "$dirty" -lt $((256 << 20)) ] || fail "the dirty bitmap is not an increment: $dirty bytes"
cp "$T/copy1.img" "$T/inc.img"
/usr/bin/python3 - "$U" "$T/inc.img" "$T/map.json" <<'EOF' || fail "apply the dirty extents"
import json, nbd, os, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
fd = os.open(sys.argv[2], os.O_WRONLY)
for e in json.load(open(sys.argv[3])):
    if e["type"] != 1:
        continue
    off, left = e["offset"], e["length"]
    while left:
        n = min(left, 16 << 20)
        os.pwrite(fd, h.pread(n, off), off)
        off += n; left -= n
os.fsync(fd); os.close(fd); h.shutdown()
EOF
nbdcopy "$U" "$T/copy2.img" || fail "nbdcopy 2"
cmp -s "$T/copy1.img" "$T/copy2.img" && fail "the two snapshots are identical: nothing to prove"
cmp "$T/inc.img" "$T/copy2.img" || fail "copy 1 + dirty extents differs from copy 2"
e2fsck -fn "$T/copy2.img" >"$T/fsck2" 2>&1 || fail "copy 2 is not fsck-clean: $(tail "$T/fsck2")"
ctl status t35c | grep -q "snapshot t35c@snap serving" || fail "status does not show the snapshot: $(ctl status t35c)"
ctl release t35c 2>"$T/rel.err" || fail "release: $(cat "$T/rel.err")"
[ "$(ctl status t35c --json | jq -r .daemon.tracking.relative_to)" = "$GEN" ] || fail "release without --commit moved tracking"
log "copy 1 + dirty extents == copy 2, fsck clean"
umount "$M" || fail "umount"
ctl detach t35c || fail "detach"
rm -f "$T"/*.img

log "d: snapshot while a backup runs, release without a snapshot, a client at release"
head -c $SIZE /dev/urandom > "$T/disk.img"
PORT=$((20000 + RANDOM % 20000))
uri=$(ctl attach "$T/disk.img" --name t35d --via none --listen "tcp:127.0.0.1:$PORT" --insecure-tcp | tail -n 1) || fail "attach"
"$CTL" backup t35d --to "file:$T/bk.img" --rate-limit 8M --quiesce-idle 0 --json >"$T/bk.out" 2>&1 &
BK=$!; EXTRA_PIDS+=("$BK")
for _ in $(seq 300); do
  [ "$(ctl status t35d --json | jq -r '.daemon.backup.state // "none"')" = running ] && break; sleep 0.02
done
before=$(ctl status t35d --json | jq -c '.daemon.tracking')
ctl snapshot t35d --quiesce-idle 0 >"$T/s.out" 2>"$T/s.err" && fail "a snapshot was taken while a backup ran"
grep -q "unable to take a snapshot of \"t35d\": .*backup 1 is running" "$T/s.err" || fail "unclear refusal: $(cat "$T/s.err")"
[ "$(ctl status t35d --json | jq -c '.daemon.tracking')" = "$before" ] || fail "the refused snapshot changed tracking"
[ "$(ctl status t35d --json | jq -r '.daemon.snapshot // "none"')" = none ] || fail "the refused snapshot shows in status"
nbdinfo --list "nbd+unix:///?socket=$(sock t35d)" | grep -q "t35d@snap" && fail "the refused snapshot is exported"
kill -INT "$BK"; wait "$BK"
ctl release t35d >"$T/r.out" 2>"$T/r.err" && fail "release without a snapshot succeeded"
grep -q "unable to release a snapshot of \"t35d\": no snapshot is exported" "$T/r.err" || fail "unclear error: $(cat "$T/r.err")"
ctl snapshot t35d --quiesce-idle 0 --container ram:64M >/dev/null 2>"$T/s.err" || fail "snapshot after the backup: $(cat "$T/s.err")"
ctl backup t35d --to "file:$T/bk2.img" --quiesce-idle 0 >/dev/null 2>"$T/b.err" && fail "a backup ran while a snapshot was exported"
grep -q "snapshot \"t35d@snap\" is exported" "$T/b.err" || fail "unclear refusal: $(cat "$T/b.err")"
[ -e "$T/bk2.img" ] || [ -e "$T/bk2.img.incomplete" ] && fail "the refused backup created its target"
[ "$(ctl status t35d --json | jq -r '.daemon.snapshot.tcp_uris[0]')" = "nbd://127.0.0.1:$PORT/t35d@snap" ] ||
  fail "no TCP URI in the status: $(ctl status t35d --json | jq -c .daemon.snapshot.tcp_uris)"
nbdcopy "nbd://127.0.0.1:$PORT/t35d@snap" "$T/tcp.img" || fail "nbdcopy over TCP"
cmp "$T/disk.img" "$T/tcp.img" || fail "the copy over TCP differs from the idle disk"
rm -f "$T/tcp.img"
ctl detach t35d >/dev/null 2>"$T/d.err" && fail "detach went on while a snapshot was exported"
grep -q "snapshot t35d@snap is exported" "$T/d.err" || fail "unclear refusal: $(cat "$T/d.err")"
/usr/bin/python3 - "nbd+unix:///t35d@snap?socket=$(sock t35d)" "$CTL" <<'EOF' || fail "a client at release"
import nbd, subprocess, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1]); h.pread(4096, 0)
r = subprocess.run([sys.argv[2], "release", "t35d"], capture_output=True, text=True)
assert r.returncode == 0, r.stderr
assert "1 connection(s) closed" in r.stderr, r.stderr
try:
    h.pread(4096, 0)
except nbd.Error:
    sys.exit(0)
sys.exit("a read after release succeeded")
EOF
log "refusals clear and without effect; the client's connection closed at release"

log "e: the container fills"
ctl snapshot t35d --quiesce-idle 0 --container ram:1M >/dev/null 2>"$T/s.err" || fail "snapshot: $(cat "$T/s.err")"
for i in 0 1 2 3; do nbd_write_mib "$uri" $((i * 8)) $i || fail "a write failed while the container was full"; done
st=$(ctl status t35d --json | jq .daemon.snapshot)
[ "$(json_field "$st" .state)" = failed ] || fail "the snapshot did not fail: $st"
json_field "$st" .error | grep -q "container is full" || fail "no clear reason: $st"
nbdcopy "nbd+unix:///t35d@snap?socket=$(sock t35d)" "$T/x.img" 2>/dev/null && fail "a failed snapshot was copied without an error"
ctl release t35d --commit >/dev/null 2>"$T/r.err" && fail "release --commit of a failed snapshot succeeded"
grep -q "it failed" "$T/r.err" || fail "unclear refusal: $(cat "$T/r.err")"
ctl release t35d 2>/dev/null || fail "release of the failed snapshot"
[ "$(ctl status t35d --json | jq .daemon.stats.errors)" = 0 ] || fail "a write request failed"
ctl detach t35d || fail "detach"
log "PASS"
