#!/usr/bin/env bash
# The main job on an embedded default: a 1 GiB demo disk (a file in a temp dir) is
# attached through its cowsnap daemon, formatted ext4, mounted, written to, shown in
# `cowsnapctl status`, unmounted and detached. Everything it creates is removed at the
# end, also when a step fails.  Needs root (mount, losetup) and a built tree
# (cargo build --release), or COWSNAP_BIN_DIR pointing at the binaries.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${COWSNAP_BIN_DIR:-$ROOT/target/release}
CTL=$BIN/cowsnapctl
if [ ! -x "$CTL" ] || [ ! -x "$BIN/cowsnap-nbd" ]; then
  echo "building cowsnap (release)..."
  (cd "$ROOT" && cargo build --release --bins -q)
fi
[ "$(id -u)" = 0 ] || { echo "demo: run as root (it mounts a filesystem and sets up a block device)"; exit 1; }

D=$(mktemp -d /tmp/cowsnap-demo.XXXXXX)
export COWSNAP_RUN_DIR=$D/run COWSNAP_STATE_DIR=$D/state
NAME=demo
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
cleanup() {
  set +e
  mountpoint -q "$D/mnt" 2>/dev/null && umount "$D/mnt"
  [ -e "$COWSNAP_RUN_DIR/$NAME.ctl" ] || [ -e "$COWSNAP_RUN_DIR/$NAME.attach.json" ] &&
    "$CTL" detach --force "$NAME" >/dev/null 2>&1
  rm -rf "$D"
}
trap cleanup EXIT

step "a 1 GiB demo disk: $D/disk.img"
truncate -s 1G "$D/disk.img"

step "cowsnapctl attach $D/disk.img --name $NAME"
DEV=$("$CTL" attach "$D/disk.img" --name "$NAME" | tail -n 1)
echo "block device: $DEV"

step "mkfs.ext4 $DEV and mount it on $D/mnt"
mkfs.ext4 -q -F "$DEV"
mkdir -p "$D/mnt"
mount "$DEV" "$D/mnt"
df -h "$D/mnt" | sed 1d

step "write some files"
mkdir -p "$D/mnt/docs"
for i in $(seq 1 100); do echo "document $i, written $(date -Is)" > "$D/mnt/docs/doc$i.txt"; done
head -c $((64 << 20)) /dev/urandom > "$D/mnt/data.bin"
sync
ls -la "$D/mnt" | sed 1d
sha256sum "$D/mnt/data.bin"

step "cowsnapctl status"
"$CTL" status

step "cowsnapctl detach while mounted (refused)"
"$CTL" detach "$NAME" || true

step "umount, cowsnapctl detach"
umount "$D/mnt"
"$CTL" detach "$NAME"

step "the origin file is a clean ext4 image"
e2fsck -fn "$D/disk.img" 2>&1 | tail -n 1

step "done; removing $D"
