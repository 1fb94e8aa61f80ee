#!/usr/bin/env bash
# Destinations that are somebody's live data are refused before anything is opened for
# writing, through every spelling (symlink, hard link, loop device on the file, the disk
# holding a partition, the file behind a mounted loop device), with a one-line reason and
# exit != 0; the protected data is byte-identical afterwards. Cases:
#  - backup A --to file:/dev: A's own origin, B's origin (another attached disk);
#  - --container dev:/file: on an attached origin;
#  - offline restore and restore --live onto an attached origin; restore --live with an
#    invalid --name leaves an existing destination untouched;
#  - the daemon refuses the same requests sent straight to its control socket;
#  - a hung daemon (SIGSTOP) still protects its origin; a dead one's leftovers do not;
#  - partitions (losetup -P), a mounted loop device and its backing file, a second loop
#    device on an origin, an exposed device (--via fuse) when FUSE works;
#  - positive controls: legitimate targets, containers, restores and a sibling partition
#    still work;
#  - an interrupted offline restore (ENOSPC on a small tmpfs, kill -9) leaves
#    DEST.incomplete and the error names the path.
. "$(dirname "$0")/lib.sh"
need_root; need sha256sum losetup partx mkfs.ext4 timeout
[ -x /usr/bin/python3 ] || skip "no /usr/bin/python3"
sha() { sha256sum "$1" | cut -d' ' -f1; }
MB=$((1 << 20))

# refused WHAT EXPECT CMD...: CMD must exit != 0 with EXPECT in its one-line error, and
# every protected file must keep its hash.
declare -A HASH
protect() { HASH[$1]=$(sha "$1"); }
check_hashes() {
  local f
  for f in "${!HASH[@]}"; do
    [ "$(sha "$f")" = "${HASH[$f]}" ] || fail "$1: $f changed"
  done
}
# run CMD...: ctl and shell functions as they are, under a timeout.
run() {
  local cmd=("$@")
  [ "${cmd[0]}" = ctl ] && cmd[0]=$CTL
  if declare -F "${cmd[0]}" >/dev/null; then "${cmd[@]}"; else timeout 120 "${cmd[@]}"; fi
}
refused() {
  local what=$1 want=$2 out rc
  shift 2
  out=$(run "$@" 2>&1); rc=$?
  [ "$rc" != 0 ] || fail "$what: accepted (exit 0): $out"
  [ "$rc" != 124 ] || fail "$what: hung"
  printf '%s\n' "$out" | grep -qF -- "$want" || fail "$what: no '$want' in: $out"
  printf '%s\n' "$out" | grep -q '"state": *"complete"\|complete:' && fail "$what: reported complete: $out"
  check_hashes "$what"
  log "refused ($what): $(printf '%s' "$out" | grep -F -- "$want" | head -n 1)"
}
accepted() {
  local what=$1 out
  shift
  out=$(run "$@" 2>&1) || fail "$what: failed: $out"
  check_hashes "$what"
  log "ok ($what)"
}
# raw_backup NAME PARAMS_JSON: a backup request straight to the daemon's control socket.
raw_backup() {
  /usr/bin/python3 - "$COWSNAP_RUN_DIR/$1.ctl" "$2" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(120); s.connect(sys.argv[1])
s.sendall(json.dumps({"v": 1, "cmd": "backup", "params": json.loads(sys.argv[2])}).encode() + b"\n")
r = json.loads(s.makefile().readline())
if r.get("ok"):
    print("accepted", r); sys.exit(0)
print("cowsnap-nbd:", r.get("error")); sys.exit(1)
PY
}
BK=(backup --quiesce-idle 0 --json)

head -c $((8 * MB)) /dev/urandom > "$T/a.img"
head -c $((8 * MB)) /dev/urandom > "$T/b.img"
ln "$T/b.img" "$T/b-hard.img"
ln -s "$T/b.img" "$T/b-sym.img"
ln -s "$T/a.img" "$T/a-sym.img"
ctl attach "$T/a.img" --name a --via none >/dev/null || fail "attach a"
ctl attach "$T/b.img" --name b --via none >/dev/null || fail "attach b"
protect "$T/a.img"; protect "$T/b.img"

log "backup targets and containers"
refused "backup a to its own origin" 'is the origin of attached disk "a"' \
  ctl "${BK[@]}" a --to "file:$T/a.img"
refused "backup a to its own origin by symlink" 'is the origin of attached disk "a"' \
  ctl "${BK[@]}" a --to "file:$T/a-sym.img"
refused "backup a to b's origin" 'is the origin of attached disk "b"' \
  ctl "${BK[@]}" a --to "file:$T/b.img"
refused "backup a to b's origin as dev:" 'is the origin of attached disk "b"' \
  ctl "${BK[@]}" a --to "dev:$T/b.img"
refused "backup a to a hard link of b's origin" 'is the origin of attached disk "b"' \
  ctl "${BK[@]}" a --to "file:$T/b-hard.img"
refused "backup a to a symlink to b's origin" 'is the origin of attached disk "b"' \
  ctl "${BK[@]}" a --to "dev:$T/b-sym.img"
refused "container dev: on b's origin" 'is the origin of attached disk "b"' \
  ctl "${BK[@]}" a --to "file:$T/out.img" --container "dev:$T/b.img"
refused "container file: on a's origin" 'is the origin of attached disk "a"' \
  ctl "${BK[@]}" a --to "file:$T/out.img" --container "file:$T/a.img:4M"
refused "target = container" 'the container of this backup' \
  ctl "${BK[@]}" a --to "file:$T/same.img" --container "file:$T/same.img:4M"
[ ! -e "$T/out.img" ] && [ ! -e "$T/out.img.incomplete" ] || fail "a refused backup created its target"
[ ! -e "$T/same.img" ] || fail "a refused backup created its container"
log "the daemon refuses on its own (requests straight to the control socket)"
refused "daemon: backup a to b's origin" 'is the origin of attached disk "b"' \
  raw_backup a "{\"to\":\"file:$T/b.img\"}"
refused "daemon: backup a to its own origin" 'is the origin of attached disk "a"' \
  raw_backup a "{\"to\":\"dev:$T/a-sym.img\"}"
refused "daemon: container on b's origin" 'is the origin of attached disk "b"' \
  raw_backup a "{\"to\":\"file:$T/out.img\",\"container\":\"dev:$T/b-hard.img\"}"

log "positive controls: backups"
accepted "backup a to a new file" ctl "${BK[@]}" a --to "file:$T/out.img" --container "file:$T/c.img:4M"
cmp -s "$T/out.img" "$T/a.img" || fail "the image of a differs"
[ ! -e "$T/c.img" ] || fail "container left behind"
accepted "backup a to the repository" ctl "${BK[@]}" a --to "repo:$T/repo"

log "restores"
refused "restore onto b's origin" 'is the origin of attached disk "b"' \
  ctl restore "repo:$T/repo" --to "$T/b-hard.img"
refused "restore onto a's origin" 'is the origin of attached disk "a"' \
  ctl restore "repo:$T/repo" --to "$T/a-sym.img"
refused "live restore onto b's origin" 'is the origin of attached disk "b"' \
  ctl restore "repo:$T/repo" --live --via none --name lr --to "$T/b.img"
head -c $((8 * MB)) /dev/urandom > "$T/victim.img"; protect "$T/victim.img"
refused "live restore with an invalid --name" 'invalid --name' \
  ctl restore "repo:$T/repo" --live --via none --name 'bad name!' --to "$T/victim.img"
accepted "restore to a new file" ctl restore "repo:$T/repo" --to "$T/r.img"
cmp -s "$T/r.img" "$T/a.img" || fail "restored image differs"
[ ! -e "$T/r.img.incomplete" ] || fail "a complete restore left its marker"

log "a hung daemon still protects its origin; a dead one does not block"
bpid=$(cat "$COWSNAP_RUN_DIR/b.pid")
kill -STOP "$bpid"
refused "backup a to a stopped daemon's origin" 'is the origin of attached disk "b"' \
  ctl "${BK[@]}" a --to "file:$T/b.img"
kill -CONT "$bpid"
kill -KILL "$bpid"; wait_gone "$bpid" 10 || fail "b's daemon did not die"
unset 'HASH['"$T/b.img"']'
accepted "backup a onto a dead daemon's former origin" ctl "${BK[@]}" a --to "file:$T/b.img"
cmp -s "$T/b.img" "$T/a.img" || fail "backup onto b.img differs from a"
rm -f "$COWSNAP_RUN_DIR"/b.*

log "partitions, loop devices, mounts"
truncate -s 64M "$T/p.img"
/usr/bin/python3 - "$T/p.img" <<'PY'
import struct, sys
f = open(sys.argv[1], "r+b"); mbr = bytearray(512)
ent = lambda start, n: struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", start, n)
mbr[446:462] = ent(2048, 30720); mbr[462:478] = ent(32768, 30720); mbr[510:512] = b"\x55\xaa"
f.write(mbr)
PY
L=$(losetup -P -f --show "$T/p.img") || fail "losetup -P"
partx -a "$L" 2>/dev/null
for _ in $(seq 50); do [ -b "${L}p2" ] && break; sleep 0.1; done
[ -b "${L}p1" ] && [ -b "${L}p2" ] || fail "no partitions on $L"
head -c $((15 * MB)) /dev/urandom | dd of="${L}p1" bs=1M conv=fsync status=none
ctl attach "${L}p1" --name p1 --via none >/dev/null || fail "attach ${L}p1"
protect "$T/p.img"
refused "backup a to the disk holding an attached partition" "which is the origin of attached disk \"p1\"" \
  ctl "${BK[@]}" a --to "dev:$L"
refused "backup a to the file behind that disk" 'the origin of attached disk "p1"' \
  ctl "${BK[@]}" a --to "file:$T/p.img"
refused "restore onto the disk holding an attached partition" 'the origin of attached disk "p1"' \
  ctl restore "repo:$T/repo" --to "$L"
refused "container on the disk holding an attached partition" 'the origin of attached disk "p1"' \
  ctl "${BK[@]}" a --to "file:$T/out2.img" --container "dev:$L"
# a second loop device on a's origin
L2=$(losetup -f --show "$T/a.img") || fail "losetup a.img"
refused "backup to a loop device on a's origin" 'the origin of attached disk "a"' \
  ctl "${BK[@]}" a --to "dev:$L2"
refused "restore to a loop device on a's origin" 'the origin of attached disk "a"' \
  ctl restore "repo:$T/repo" --to "$L2"
losetup -d "$L2"
# a partition of a disk that is an attached origin
ctl detach p1 >/dev/null || fail "detach p1"
ctl attach "$L" --name whole --via none >/dev/null || fail "attach $L"
refused "backup to a partition of an attached disk" 'which is the origin of attached disk "whole"' \
  ctl "${BK[@]}" a --to "dev:${L}p2"
ctl detach whole >/dev/null || fail "detach whole"
ctl attach "${L}p1" --name p1 --via none >/dev/null || fail "attach ${L}p1 again"
unset 'HASH['"$T/p.img"']'
accepted "backup a to the sibling partition" ctl "${BK[@]}" a --to "dev:${L}p2"
cmp -s -n $((8 * MB)) "${L}p2" "$T/a.img" || fail "backup on the sibling partition differs"
ctl detach p1 >/dev/null || fail "detach p1"

# a mounted loop device and its backing file
truncate -s 32M "$T/m.img"
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$T/m.img" || fail "mkfs"
LM=$(losetup -f --show "$T/m.img") || fail "losetup m.img"
mkdir -p "$T/mnt"; mount "$LM" "$T/mnt" || fail "mount"; track_mount "$T/mnt"
sync; protect "$T/m.img"
refused "backup a to a mounted device" "is mounted on $T/mnt" \
  ctl "${BK[@]}" a --to "dev:$LM"
refused "backup a to the file behind a mounted loop device" "mounted on $T/mnt" \
  ctl "${BK[@]}" a --to "file:$T/m.img"
refused "restore onto the file behind a mounted loop device" "mounted on $T/mnt" \
  ctl restore "repo:$T/repo" --to "$T/m.img"
refused "live restore onto a mounted device" "mounted on $T/mnt" \
  ctl restore "repo:$T/repo" --live --via none --name lm --to "$LM"
umount "$T/mnt"; losetup -d "$LM"; unset 'HASH['"$T/m.img"']'

if [ -c /dev/fuse ] && command -v nbdfuse >/dev/null && command -v fusermount3 >/dev/null; then
  head -c $((8 * MB)) /dev/urandom > "$T/e.img"
  dev=$(ctl attach "$T/e.img" --name e --via fuse | tail -n 1) || fail "attach e via fuse"
  protect "$T/e.img"
  refused "backup a to another disk's exposed device" 'the device of attached disk "e"' \
    ctl "${BK[@]}" a --to "dev:$dev"
  ctl detach e >/dev/null || fail "detach e"
else
  log "no FUSE here: exposed-device case not run"
fi

log "interrupted offline restore"
head -c $((64 * MB)) /dev/urandom > "$T/big.img"
ctl attach "$T/big.img" --name big --via none >/dev/null || fail "attach big"
ctl "${BK[@]}" big --to "repo:$T/repo2" >/dev/null || fail "backup big"
ctl detach big >/dev/null || fail "detach big"
[ ! -e "$COWSNAP_RUN_DIR/big.origin.json" ] || fail "detach left big's origin record"
mkdir -p "$T/small"; mount -t tmpfs -o size=16M tmpfs "$T/small" || fail "mount tmpfs"; track_mount "$T/small"
out=$(ctl restore "repo:$T/repo2" --to "$T/small/r.img" 2>&1) && fail "restore into 16 MiB succeeded: $out"
printf '%s\n' "$out" | grep -qF "$T/small/r.img" || fail "the error does not name the path: $out"
[ -f "$T/small/r.img.incomplete" ] || fail "ENOSPC left no $T/small/r.img.incomplete: $out"
log "ENOSPC: $out"
"$CTL" restore "repo:$T/repo2" --to "$T/k.img" >/dev/null 2>&1 &
rpid=$!
for _ in $(seq 500); do [ -e "$T/k.img.incomplete" ] && break; sleep 0.01; done
if kill -KILL "$rpid" 2>/dev/null; then
  wait "$rpid" 2>/dev/null
  [ -f "$T/k.img.incomplete" ] || fail "a killed restore left no marker"
  log "killed restore: $T/k.img.incomplete is there"
else
  wait "$rpid" || fail "restore to k.img failed"
  log "the restore finished before the kill: kill case not exercised"
fi
out=$(ctl restore "repo:$T/repo2" --to "$T/k.img" 2>&1) || fail "restore over an interrupted one: $out"
[ ! -e "$T/k.img.incomplete" ] || fail "a complete restore kept the marker"
cmp -s "$T/k.img" "$T/big.img" || fail "restore of big differs"
log "PASS"
