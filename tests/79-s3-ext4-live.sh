#!/usr/bin/env bash
# Full and incremental backups into an S3 bucket (a real radosgw from scripts/s3-server.sh,
# ports of its own) of a mounted ext4 (attach --via fuse) while a writer keeps creating,
# changing, renaming and deleting files with fsync (lib.sh fs_writer), as test 22 does for
# image targets:
#  1. full backup with --freeze MOUNTPOINT: right before it the writer pauses and the sha256
#     of every file is recorded; the writer resumes as soon as the backup runs. Restored
#     from the bucket, the image is e2fsck -fn clean as it is and shows exactly those files.
#  2. incremental, no freeze, --quiesce-idle 0s, the writer never pauses: restored from the
#     bucket, the crash-consistent image mounts (journal replayed), its untouched files have
#     their hashes, and it is e2fsck -fn clean after the replay.
# Both backups must have preserved chunks (the writer wrote while they ran); the
# incremental must not fall back to a full read; verify passes; the live filesystem stays
# writable and the origin is fsck-clean after detach.
. "$(dirname "$0")/lib.sh"
need_root; need_fuse; need mkfs.ext4 e2fsck sha256sum losetup timeout curl
need_s3

s3_test_store "${COWSNAP_TEST_S3_PORT:-17570}" "${COWSNAP_TEST_S3_MON_PORT:-13390}"
s3_start_bucket cowsnap-t79
REPO=repo:s3://cowsnap-t79/live

live_ext4 t79 48
# restored GEN IMG: restore generation GEN from the bucket into IMG
restored() { timeout 300 "$CTL" restore "$REPO@$1" --to "$2" >"$T/restore.out" 2>&1 || fail "restore $1: $(cat "$T/restore.out")"; }
preserved() { tail -n 1 "$1" | jq .chunks_preserved; }

log "1: pause the writer, record the files, full backup --freeze into $REPO"
writer_pause
timeout 300 "$CTL" backup t79 --to "$REPO" --freeze "$M" --container ram:8M --rate-limit 32M --json \
  >"$T/b1.json" 2>"$T/b1.err" &
BK=$!; EXTRA_PIDS+=("$BK")
st=$(backup_state t79 3000)
rm -f "$T/pause"
[ "$st" = running ] || [ "$st" = complete ] || fail "backup did not start ($st): $(cat "$T/b1.err")"
wait "$BK" || fail "backup --freeze failed: $(cat "$T/b1.err")"
g1=$(tail -n 1 "$T/b1.json" | jq -r .generation)
log "full backup $g1: $(tail -n 1 "$T/b1.json" | jq -c '{chunks_preserved, holds, throttled_writes}')"
[ "$(preserved "$T/b1.json")" -gt 0 ] || fail "no chunk was preserved: the writer did not write during the full backup"
sleep 1; running "$WR" || fail "the writer died (frozen filesystem left behind?): $(cat "$T/writer.log")"

log "2: incremental, no freeze, the writer keeps going"
timeout 300 "$CTL" backup t79 --to "$REPO" --incremental --quiesce-idle 0s --container ram:8M --rate-limit 8M --json \
  >"$T/b2.json" 2>"$T/b2.err" || fail "incremental failed: $(cat "$T/b2.err")"
g2=$(tail -n 1 "$T/b2.json" | jq -r .generation)
log "incremental $g2: $(tail -n 1 "$T/b2.json" | jq -c '{chunks_preserved, holds, throttled_writes}')"
grep -qi "full read" "$T/b2.json" "$T/b2.err" && fail "the incremental fell back to a full read: $(cat "$T/b2.err")"
[ "$(preserved "$T/b2.json")" -gt 0 ] || fail "no chunk was preserved: the writer did not write during the incremental"
running "$WR" || fail "the writer died: $(cat "$T/writer.log")"
L=$(ctl list "$REPO" --json) || fail "list"
[ "$(json_field "$L" '.[1].kind')" = incremental ] && [ "$(json_field "$L" '.[1].parent')" = "$g1" ] \
  || fail "the second generation is not an incremental on $g1: $L"

log "verify the bucket"
ctl verify "$REPO" >"$T/verify.out" 2>&1 || fail "verify: $(cat "$T/verify.out")"

log "restore the full backup from the bucket: the view at the freeze"
restored "$g1" "$T/r1.img"
e2fsck -fn "$T/r1.img" >"$T/fsck1" 2>&1 || fail "restored full backup is not e2fsck clean: $(tail -n 20 "$T/fsck1")"
lo=$(losetup -f --show -r "$T/r1.img") || fail "losetup"
mkdir -p "$T/m1"; mount -o ro "$lo" "$T/m1" || fail "mount the restored full backup"; track_mount "$T/m1"
(cd "$T/m1" && find . -path ./lost+found -prune -o -type f -print0 | sort -z | xargs -0 sha256sum) > "$T/got.sha"
umount "$T/m1"; losetup -d "$lo"
diff "$T/expect.sha" "$T/got.sha" >"$T/diff" || fail "restored files differ from the view at the freeze: $(head -n 20 "$T/diff")"
log "full: e2fsck clean, $(wc -l < "$T/got.sha") files identical to the view at the freeze"

log "restore the incremental from the bucket: crash-consistent"
restored "$g2" "$T/r2.img"
lo=$(losetup -f --show "$T/r2.img") || fail "losetup"
mkdir -p "$T/m2"; mount "$lo" "$T/m2" || fail "mount the restored incremental (journal replay)"; track_mount "$T/m2"
(cd "$T/m2" && sha256sum -c --quiet "$T/static.sha") || fail "untouched files differ in the restored incremental"
umount "$T/m2"; losetup -d "$lo"
e2fsck -fn "$T/r2.img" >"$T/fsck2" 2>&1 || fail "restored incremental is not e2fsck clean after the replay: $(tail -n 20 "$T/fsck2")"
log "incremental: journal replayed, e2fsck clean, static files intact"

touch "$T/stop"; wait "$WR"
timeout 10 sh -c "echo end > '$M/end' && sync -f '$M/end'" || fail "filesystem not writable at the end"
(cd "$M" && sha256sum -c --quiet "$T/static.sha") || fail "static files changed on the live disk"
umount "$M"
ctl detach t79 || fail "detach"
e2fsck -fn "$T/disk.img" >/dev/null 2>&1 || fail "origin not clean after the backups"
log "PASS"
