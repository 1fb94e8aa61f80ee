#!/usr/bin/env bash
# The main job on an embedded default, in a few minutes: a 1 GiB demo disk (a file) is
# attached through its cowsnap daemon, formatted ext4 and mounted; a small workload keeps
# writing to it while cowsnap takes an online full backup and then an incremental one into
# a local repository; the incremental restore point is restored *on the fly* to a second
# disk, which is mounted and checked while it is still filling; the repository is verified.
# Everything it creates is removed at the end, also when a step fails.
# Needs root (mount, losetup). Installs the Debian packages it needs and builds the tree.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "demo: run as root (it mounts filesystems and sets up block devices)"; exit 1; }
bash "$ROOT/scripts/setup.sh"
export PATH=$HOME/.cargo/bin:$PATH
BIN=${COWSNAP_BIN_DIR:-$ROOT/target/release}
if [ -z "${COWSNAP_BIN_DIR:-}" ]; then
  echo "building cowsnap (release)..."
  (cd "$ROOT" && cargo build --release --bins -q)
fi
CTL=$BIN/cowsnapctl

D=$(mktemp -d /tmp/cowsnap-demo.XXXXXX)
export COWSNAP_RUN_DIR=$D/run COWSNAP_STATE_DIR=$D/state
WL=
# Run a backup and print one line about it (cowsnapctl shows a progress bar on a terminal).
backup() {
  "$CTL" backup "$@" --json | jq -r 'select(.event == "result") |
    "   backup \(.state): \(.chunks_copied) chunks copied, \(.chunks_preserved) preserved through the container, \(.holds) writes held \(.hold_time_ms) ms, \(.throttled_writes) throttled; generation \(.generation)"'
}
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
say() { printf '   %s\n' "$*"; }
cleanup() {
  set +e
  [ -n "$WL" ] && kill "$WL" 2>/dev/null && wait "$WL" 2>/dev/null
  for m in "$D/restored-mnt" "$D/mnt"; do mountpoint -q "$m" 2>/dev/null && umount "$m"; done
  for n in restored demo; do
    [ -e "$COWSNAP_RUN_DIR/$n.ctl" ] || [ -e "$COWSNAP_RUN_DIR/$n.attach.json" ] &&
      "$CTL" detach --force "$n" >/dev/null 2>&1
  done
  rm -rf "$D"
}
trap cleanup EXIT

step "1. A 1 GiB demo disk ($D/disk.img), attached behind cowsnap"
truncate -s 1G "$D/disk.img"
DEV=$("$CTL" attach "$D/disk.img" --name demo | tail -n 1)
say "cowsnapctl attach gave us $DEV: from now on the disk is used through it"
mkfs.ext4 -q -F "$DEV"
mkdir -p "$D/mnt"; mount "$DEV" "$D/mnt"
say "ext4 on $DEV, mounted on $D/mnt"

step "2. Some data, and a live workload that keeps writing"
mkdir -p "$D/mnt/docs"
for i in $(seq 1 200); do echo "document $i, written $(date -Is)" >"$D/mnt/docs/doc$i.txt"; done
head -c $((96 << 20)) /dev/urandom >"$D/mnt/photos.bin"
(cd "$D/mnt" && sha256sum docs/*.txt photos.bin) >"$D/manifest"
sync   # the snapshot is crash-consistent: it holds what has reached the disk
# The workload: a journal of numbered, checksummed lines, appended and fsynced.
( n=0; while :; do n=$((n+1)); l="entry $n $(date +%s%N)"
  echo "$l $(echo "$l" | cksum | cut -d' ' -f1)" >>"$D/mnt/journal.log"; sync "$D/mnt/journal.log"
  [ $((n % 50)) = 0 ] && head -c 1M /dev/urandom >"$D/mnt/scratch-$((n % 500)).bin"; done ) &
WL=$!
sleep 2
say "200 documents, a 96 MiB file, and a journal growing by the millisecond"

step "3. Online full backup into the repository $D/repo (the workload keeps running)"
backup demo --to "repo:$D/repo" --quiesce-idle 0s
sleep 2
step "4. More changes, then an incremental backup: only the changed chunks are read"
head -c $((8 << 20)) /dev/urandom >"$D/mnt/new-photo.bin"
(cd "$D/mnt" && sha256sum new-photo.bin) >>"$D/manifest"
backup demo --to "repo:$D/repo" --incremental --freeze "$D/mnt"
say "(--freeze: the filesystem was flushed and frozen for the snapshot instant, then thawed;"
say " without it, the snapshot is crash-consistent: what had reached the disk at that instant)"
"$CTL" status demo
step "5. The repository's restore points"
"$CTL" list "repo:$D/repo"

step "6. Restore the newest restore point ON THE FLY to a second disk"
RDEV=$("$CTL" restore "repo:$D/repo" --to "$D/restored.img" --live --name restored | tail -n 1)
mkdir -p "$D/restored-mnt"; mount "$RDEV" "$D/restored-mnt"
say "the second disk is $RDEV, mounted on $D/restored-mnt while it still fills:"
"$CTL" status restored | sed 's/^/   /'
(cd "$D/restored-mnt" && sha256sum --quiet -c "$D/manifest") && say "every file of the manifest has the right content"
lines=$(wc -l <"$D/restored-mnt/journal.log")
bad=$(awk '{ l=$1" "$2" "$3; cmd="echo \""l"\" | cksum"; cmd | getline c; close(cmd); split(c,a," "); if (a[1] != $4 || $2 != NR) print NR }' "$D/restored-mnt/journal.log" | head -3)
[ -z "$bad" ] && say "the journal holds $lines entries, numbered without a gap and each checksum right: a consistent point in time" \
  || { say "journal damaged at lines: $bad"; exit 1; }

step "7. Stop the workload; wait for the fill; verify the repository"
kill "$WL"; wait "$WL" 2>/dev/null || true; WL=
for _ in $(seq 240); do [ "$("$CTL" status restored --json | jq -r .fill.complete)" = true ] && break; sleep 0.5; done
"$CTL" status restored | sed 's/^/   /'
"$CTL" verify "repo:$D/repo"

step "8. Tear down"
umount "$D/restored-mnt"; "$CTL" detach restored
umount "$D/mnt"; "$CTL" detach demo
e2fsck -fn "$D/restored.img" >/dev/null 2>&1 && say "the restored disk image is a clean ext4 filesystem"
say "done; removing $D"
