# shellcheck shell=bash
# Common helpers for the end-to-end tests. Source it first:  . "$(dirname "$0")/lib.sh"
#
# Gives each test a private temp dir $T with its own COWSNAP_RUN_DIR / COWSNAP_STATE_DIR,
# and a cleanup trap that unmounts what the test mounted, detaches every disk attached
# under $T (loop devices, nbdfuse mounts), stops the daemons started under $T and removes
# $T — also when the test fails half-way.
#   need CMD...        skip (exit 77) unless every command exists
#   need_root          skip unless root
#   need_fuse          skip unless FUSE works here
#   fail MSG           print MSG and the daemon logs, exit 1
#   track_mount DIR    unmount DIR at cleanup
#   running PID / wait_gone PID [SECONDS]   process state, zombies count as gone
#   ctl ARGS...        run cowsnapctl
#   nbd_write_mib URI OFFSET_MIB SEED / backup_gen NAME ARGS...   see below
#   json_field JSON EXPR   jq -r EXPR on JSON
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${COWSNAP_BIN_DIR:-$ROOT/target/release}
CTL=$BIN/cowsnapctl
NBD=${COWSNAP_NBD_BIN:-$BIN/cowsnap-nbd}
TEST_NAME=$(basename "$0" .sh)
T=$(mktemp -d "${TMPDIR:-/tmp}/cowsnap-$TEST_NAME.XXXXXX")
export COWSNAP_RUN_DIR=$T/run COWSNAP_STATE_DIR=$T/state
export COWSNAP_ATTACH_TIMEOUT=${COWSNAP_ATTACH_TIMEOUT:-30}
MOUNTS=()
EXTRA_PIDS=()

log() { echo "[$(date +%T)] $*"; }
skip() { echo "SKIP: $*"; exit 77; }
dump_logs() {
  local f
  for f in "$COWSNAP_STATE_DIR"/*.log; do
    [ -f "$f" ] || continue
    echo "--- $f (last 20 lines)"; tail -n 20 "$f"
  done
}
fail() { echo "FAIL: $*" >&2; dump_logs >&2; exit 1; }
need() { local c; for c in "$@"; do command -v "$c" >/dev/null 2>&1 || skip "$c is not installed"; done; }
# need_python_nbd: /usr/bin/python3 with libnbd's bindings (lib.sh nbd_write_* use them)
need_python_nbd() {
  [ -x /usr/bin/python3 ] || skip "no /usr/bin/python3"
  /usr/bin/python3 -c 'import nbd' 2>/dev/null || skip "python3-libnbd is not installed"
}
need_root() { [ "$(id -u)" = 0 ] || skip "needs root (mount, losetup)"; }
need_fuse() { [ -c /dev/fuse ] || skip "no /dev/fuse"; need nbdfuse fusermount3 losetup; }
track_mount() { MOUNTS+=("$1"); }
# running PID: alive and not a zombie (an exited daemon may wait a moment to be reaped)
running() { local st; st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1; [ -n "$st" ] && [ "${st#Z}" = "$st" ]; }
# wait_gone PID [SECONDS]: 0 once PID is not running
wait_gone() { local i; for i in $(seq $(( ${2:-10} * 10 ))); do running "$1" || return 0; sleep 0.1; done; return 1; }
ctl() { "$CTL" "$@"; }
# nbd_write_mib URI OFFSET_MIB SEED: write one random 1 MiB region at OFFSET_MIB
# (python3-libnbd), flushed
nbd_write_mib() {
  /usr/bin/python3 -c '
import nbd, random, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
h.pwrite(random.Random(int(sys.argv[3])).randbytes(1 << 20), int(sys.argv[2]) << 20)
h.flush(); h.shutdown()' "$@"
}
# nbd_write_random URI SEED COUNT [FIRST_MIB END_MIB]: COUNT distinct random 1 MiB
# regions (aligned) of random data in FIRST_MIB..END_MIB (default: the whole disk), flushed
nbd_write_random() {
  /usr/bin/python3 - "$@" <<'PY'
import nbd, random, sys
uri, seed, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
R = 1 << 20
h = nbd.NBD(); h.connect_uri(uri)
first = int(sys.argv[4]) if len(sys.argv) > 4 else 0
end = int(sys.argv[5]) if len(sys.argv) > 5 else h.get_size() // R
rng = random.Random(seed)
for i in rng.sample(range(first, end), count):
    h.pwrite(rng.randbytes(R), i * R)
h.flush(); h.shutdown()
PY
}
# need_s3: skip unless Ceph's daemons are installed (scripts/setup.sh)
need_s3() {
  command -v ceph-mon >/dev/null && command -v radosgw >/dev/null || skip "Ceph is not installed (scripts/setup.sh)"
}
# s3_test_store PORT MON_PORT: this test's own S3 store (scripts/s3-server.sh, state in
# $T/s3, on ports of its own); at exit the background job $S3_BGPID (if any) is stopped,
# then the store, then the usual cleanup. Start it with `bash "$S3" start`.
s3_test_store() {
  S3=$ROOT/scripts/s3-server.sh
  export COWSNAP_S3_DIR=$T/s3 COWSNAP_S3_PORT=$1 COWSNAP_S3_MON_PORT=$2
  S3_BGPID=
  trap s3_cleanup EXIT
}
# marker_disk IMG MARKER: a 64 MiB disk image IMG, 16 MiB of random data, then zeros, and
# at 32 MiB a 1 MiB random marker block, also written to the file MARKER
marker_disk() {
  head -c $((64 << 20)) /dev/zero >"$1"
  head -c $((16 << 20)) /dev/urandom | dd of="$1" conv=notrunc status=none
  head -c $((1 << 20)) /dev/urandom >"$2"
  dd if="$2" of="$1" bs=1M seek=32 conv=notrunc status=none
}
# s3_start_bucket BUCKET: start this test's store (after s3_test_store), take its AWS_*
# environment and create BUCKET
s3_start_bucket() {
  local start=$SECONDS
  log "start the S3 store"
  bash "$S3" start || fail "s3-server.sh start"
  log "store up in $((SECONDS - start))s"
  eval "$(bash "$S3" env)" || fail "s3-server.sh env"
  bash "$S3" mb "$1" || fail "create bucket $1"
}
# s3_curl URL_PATH [CURL ARGS...]: a signed S3 request as the store's user (the AWS_*
# of `s3-server.sh env`; the keys go to curl in a config on a pipe); query values must
# be URL-encoded (prefix=a%2Fb). s3_keys BUCKET PREFIX: the keys under PREFIX, one a line
s3_curl() {
  local p=$1; shift
  curl -s -K <(printf 'user = "%s:%s"\n' "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY") \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" --aws-sigv4 "aws:amz:us-east-1:s3" "$@" "$AWS_ENDPOINT_URL/$p"
}
s3_keys() {
  s3_curl "$1?list-type=2&prefix=$(printf %s "$2" | sed 's|/|%2F|g')" | grep -o '<Key>[^<]*</Key>' | sed 's|<Key>||; s|</Key>||'
}
s3_cleanup() {
  local rc=$?
  [ -n "${S3_BGPID:-}" ] && kill "$S3_BGPID" 2>/dev/null && wait "$S3_BGPID" 2>/dev/null
  bash "$S3" stop >/dev/null 2>&1
  (exit "$rc")
  cleanup
}
# fs_image_open FS IMG MNT: IMG on a loop device ($FS_LO), its journal/log replayed
# (mount, umount), checked read-only (e2fsck -fn, xfs_repair -n) and mounted read-only on
# MNT (XFS with nouuid: the live file system of the same UUID may be mounted);
# fs_image_close MNT undoes it
fs_image_open() {
  local fs=$1 img=$2 m=$3 o=
  FS_LO=$(losetup -f --show "$img") || fail "losetup $img"
  mkdir -p "$m"
  [ "$fs" = xfs ] && o=nouuid
  mount ${o:+-o $o} "$FS_LO" "$m" || fail "$fs image $img does not mount (journal replay)"
  umount "$m" || fail "umount"
  case $fs in
    ext4) e2fsck -fn "$FS_LO" >"$T/fsck.out" 2>&1 || fail "ext4 image not clean: $(tail -n 20 "$T/fsck.out")";;
    xfs) xfs_repair -n "$FS_LO" >"$T/fsck.out" 2>&1 || fail "xfs image not clean: $(tail -n 20 "$T/fsck.out")";;
  esac
  mount -o ro${o:+,$o} "$FS_LO" "$m" || fail "mount ro"
  track_mount "$m"
}
fs_image_close() { umount "$1"; losetup -d "$FS_LO"; }
# backup_gen NAME ARGS...: back up (--quiesce-idle 0) and print the new generation; the
# output stays in $T/bk.out and $T/bk.err
backup_gen() {
  timeout 300 "$CTL" backup "$@" --quiesce-idle 0 >"$T/bk.out" 2>"$T/bk.err" || fail "backup $*: $(cat "$T/bk.err")"
  tail -n 1 "$T/bk.out" | jq -r .generation
}
# fs_writer DIR: keeps creating, changing, renaming and deleting files under DIR (with
# fsync, so the changes reach the disk at once) until $T/stop exists; pauses (and says so
# in $T/paused) while $T/pause exists
fs_writer() {
  local i=0 n f
  while [ ! -e "$T/stop" ]; do
    if [ -e "$T/pause" ]; then touch "$T/paused"; sleep 0.02; continue; fi
    rm -f "$T/paused"
    i=$((i + 1)); n=$((i % 64)); f=$1/f$n
    case $((i % 6)) in
      0|1) dd if=/dev/urandom of="$f" bs=4k count=$((RANDOM % 64 + 1)) conv=fsync status=none ;;
      2) [ -e "$f" ] && dd if=/dev/urandom of="$f" bs=4k count=$((RANDOM % 16 + 1)) oflag=append conv=notrunc,fsync status=none ;;
      3) rm -f "$f" ;;
      4) [ -e "$f" ] && mv "$f" "$1/r$n" ;;
      5) mkdir -p "$1/d$n" && dd if=/dev/urandom of="$1/d$n/x" bs=64k count=$((RANDOM % 8 + 1)) conv=fsync status=none ;;
    esac
  done
}
# live_ext4 NAME BIG_MIB: a 512 MiB disk $T/disk.img attached as NAME --via fuse, ext4 on
# it mounted on $M ($T/mnt) with static/ files (20 small, one of BIG_MIB MiB; their
# sha256 in $T/static.sha) and fs_writer running in live/ ($WR)
live_ext4() {
  local dev i
  truncate -s 512M "$T/disk.img"
  dev=$(ctl attach "$T/disk.img" --name "$1" --via fuse | tail -n 1) || fail "attach --via fuse"
  mkfs.ext4 -q -F "$dev" || fail "mkfs.ext4"
  M=$T/mnt; mkdir -p "$M"; mount "$dev" "$M" || fail "mount"; track_mount "$M"
  mkdir -p "$M/static" "$M/live"
  for i in $(seq 20); do head -c $((RANDOM * 16 + i)) /dev/urandom > "$M/static/s$i"; done
  head -c $(($2 << 20)) /dev/urandom > "$M/static/big"
  sync
  (cd "$M" && find static -type f -print0 | sort -z | xargs -0 sha256sum) > "$T/static.sha" || fail "hash"
  fs_writer "$M/live" >"$T/writer.log" 2>&1 &
  WR=$!; EXTRA_PIDS+=("$WR")
  sleep 3
  running "$WR" || fail "the writer loop died: $(cat "$T/writer.log")"
}
# writer_pause: pause fs_writer, sync, and record every file's sha256 under $M in
# $T/expect.sha (rm -f "$T/pause" lets the writer go on)
writer_pause() {
  touch "$T/pause"
  for _ in $(seq 500); do [ -e "$T/paused" ] && break; sleep 0.01; done
  [ -e "$T/paused" ] || fail "the writer did not pause"
  sync
  (cd "$M" && find . -path ./lost+found -prune -o -type f -print0 | sort -z | xargs -0 sha256sum) > "$T/expect.sha"
  log "$(wc -l < "$T/expect.sha") files recorded"
}
# backup_state NAME [TRIES]: wait until NAME's backup runs (or ended); print its state
backup_state() {
  local st
  for _ in $(seq "${2:-1000}"); do
    st=$(ctl status "$1" --json | jq -r '.daemon.backup.state // "none"')
    case $st in running|complete|failed) echo "$st"; return;; esac
    sleep 0.01
  done
  echo "$st"
}
json_field() { printf '%s' "$1" | jq -r "$2"; }
[ -x "$CTL" ] || { echo "FAIL: no cowsnapctl at $CTL (build first, or set COWSNAP_BIN_DIR)"; exit 1; }
[ -x "$NBD" ] || { echo "FAIL: no cowsnap-nbd at $NBD"; exit 1; }
need jq

cleanup() {
  local rc=$? i m f name pid lo
  trap - EXIT
  set +e
  # our own mounts, innermost last-in first-out
  for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do
    m=${MOUNTS[$i]}
    mountpoint -q "$m" 2>/dev/null && { umount "$m" 2>/dev/null || umount -l "$m"; }
  done
  # anything else still mounted from a loop device backed by a file under $T
  while read -r lo f; do
    case $f in "$T"/*)
      findmnt -rn -S "$lo" -o TARGET 2>/dev/null | while read -r m; do umount -l "$m"; done
    esac
  done < <(losetup -n -O NAME,BACK-FILE 2>/dev/null)
  # disks attached under $T
  for f in "$COWSNAP_RUN_DIR"/*.attach.json "$COWSNAP_RUN_DIR"/*.ctl; do
    [ -e "$f" ] || continue
    name=$(basename "$f"); name=${name%.attach.json}; name=${name%.ctl}
    timeout 60 "$CTL" detach --force "$name" >/dev/null 2>&1
  done
  # loop devices whose backing file is under $T
  while read -r lo f; do
    case $f in "$T"/*) losetup -d "$lo" 2>/dev/null;; esac
  done < <(losetup -n -O NAME,BACK-FILE 2>/dev/null)
  # FUSE mounts under $T
  awk '{print $5}' /proc/self/mountinfo | grep -F "$T/" | sort -r | while read -r m; do
    fusermount3 -u -z "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
  done
  # daemons with pid files under $T, and extra processes the test started
  for f in "$COWSNAP_RUN_DIR"/*.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f" 2>/dev/null) && [ -n "$pid" ] && EXTRA_PIDS+=("$pid")
  done
  for pid in "${EXTRA_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${EXTRA_PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
  done
  rm -rf "$T"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p -m 700 "$COWSNAP_RUN_DIR" "$COWSNAP_STATE_DIR"

# fuse_transport NAME: which transport the daemon of NAME serves its FUSE file over
# ("io_uring" or "/dev/fuse", from its start-up log line); fails the test when the
# kernel's switch (/sys/module/fuse/parameters/enable_uring) is on and the daemon did
# not use io_uring, or when it is off and the daemon did.
fuse_transport() {
  local t knob
  t=$(grep -ho "FUSE: $1 served at .* workers, [^)]*)" "$COWSNAP_STATE_DIR/$1.log" 2>/dev/null \
      | tail -n 1 | sed 's/.*workers, //; s/)$//')
  knob=$(cat /sys/module/fuse/parameters/enable_uring 2>/dev/null || echo N)
  case "$knob/$t" in
    Y/io_uring|N/"/dev/fuse") echo "$t" ;;
    *) fail "FUSE transport of $1 is \"$t\" with enable_uring=$knob" ;;
  esac
}

# fuse_uring_served NAME: requests the (stopped) daemon of NAME answered over io_uring
# (its last "requests answered" log line).
fuse_uring_served() {
  grep -ho "requests answered: [0-9]* over io_uring" "$COWSNAP_STATE_DIR/$1.log" 2>/dev/null \
    | tail -n 1 | grep -o '[0-9][0-9]*' || echo 0
}

# vm_test LIMIT MEM MARKER -- CMD...: run CMD as root in the VM of scripts/vm.sh (Debian's
# kernel; the shared directory $T/vm), showing its output and keeping it in $T/vm.out.
# Fails when the VM run took longer than LIMIT seconds, stopped after CMD printed MARKER
# (it had started), or exited 0 without a "[time] PASS" line; skips when no VM came up.
# Returns CMD's exit status otherwise, for the caller to name the failure.
vm_test() {
  local limit=$1 mem=$2 marker=$3 rc start
  shift 4
  mkdir -p "$T/vm"
  start=$(date +%s)
  # a hung VM must not eat CI's time
  timeout -k 10 "$limit" bash "$ROOT/scripts/vm.sh" --memory "$mem" --rwdir "$T/vm" -- "$@" 2>&1 \
    | tee "$T/vm.out"
  rc=${PIPESTATUS[0]}
  log "VM run: exit $rc after $(( $(date +%s) - start )) s"
  [ "$rc" = 124 ] && fail "the VM run did not end within $limit s"
  if [ "$rc" = 125 ]; then
    # the VM did not come up, or did not run the command: nothing was tested. Once the
    # test had started in the VM, stopping early is a failure.
    grep -q "$marker" "$T/vm.out" && fail "the VM stopped in the middle of the test"
    skip "no VM could boot here (see the vm.sh lines above)"
  fi
  [ "$rc" = 0 ] && { grep -q '^\[.*\] PASS' "$T/vm.out" || fail "the VM run ended without PASS"; }
  return "$rc"
}
