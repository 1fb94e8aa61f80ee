#!/usr/bin/env bash
# Repositories on S3 object storage (repo:s3://BUCKET/PREFIX) against a real radosgw
# (scripts/s3-server.sh: single-node Ceph on loopback, its own state dir and ports): an
# ext4 disk attached through the daemon (which reads the AWS_* variables from the
# environment attach started it in), a full and an incremental backup into the bucket
# with writes between them; list and verify; both generations restore (offline) to
# exactly the content the export had at its snapshot and pass e2fsck (the full backup
# skips ext4's free blocks: the image is made from a zeroed file); wrong credentials
# give a clear error and publish nothing; export and mount are refused (live restore:
# tests/73-s3-live-restore.sh, failures: tests/74-s3-failures.sh, prune: tests/71-s3-prune.sh).
. "$(dirname "$0")/lib.sh"
need_root
need nbdcopy sha256sum mkfs.ext4 e2fsck curl
need_python_nbd
need_s3

s3_test_store "${COWSNAP_TEST_S3_PORT:-17490}" "${COWSNAP_TEST_S3_MON_PORT:-13310}"

sha() { sha256sum "$1" | cut -d' ' -f1; }
bk() { timeout 300 "$CTL" backup "$@" --quiesce-idle 0 >"$T/bk.out" 2>"$T/bk.err" || fail "backup $*: $(cat "$T/bk.err")"; }

s3_start_bucket cowsnap-t70
REPO=repo:s3://cowsnap-t70/hosts/a

log "256 MiB ext4 disk with files, attach --via none"
mkdir -p "$T/src/dir"
for i in 1 2 3; do head -c $((8 << 20)) /dev/urandom > "$T/src/f$i"; done
seq 1 200000 > "$T/src/dir/numbers.txt"
truncate -s 256M "$T/d.img"
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 -d "$T/src" "$T/d.img" || fail "mkfs.ext4"
uri=$(ctl attach "$T/d.img" --name d70 --via none | tail -n 1) || fail "attach"

log "full backup into $REPO"
bk d70 --to "$REPO"
tail -n 1 "$T/bk.out"
nbdcopy "$uri" "$T/e1.img" || fail "nbdcopy e1"
log "writes: 12 regions, then an incremental"
nbd_write_random "$uri" 1 12 140 250 || fail "writes"
bk d70 --to "$REPO" --incremental
tail -n 1 "$T/bk.out"
grep -qi "full read" "$T/bk.out" && fail "the incremental fell back to a full read: $(cat "$T/bk.out")"
nbdcopy "$uri" "$T/e2.img" || fail "nbdcopy e2"

log "list"
L=$(ctl list "$REPO" --json) || fail "list --json"
[ "$(json_field "$L" 'length')" = 2 ] || fail "expected 2 generations: $L"
g1=$(json_field "$L" '.[0].id'); g2=$(json_field "$L" '.[1].id')
[ "$(json_field "$L" '.[0].kind')" = full ] || fail "first is not full: $L"
[ "$(json_field "$L" '.[1].kind')" = incremental ] || fail "second is not incremental: $L"
[ "$(json_field "$L" '.[1].parent')" = "$g1" ] || fail "parent of #2 is not #1"
r1=$(json_field "$L" '.[0].stats.bytes_read'); r2=$(json_field "$L" '.[1].stats.bytes_read')
n2=$(json_field "$L" '.[1].stats.chunks_new')
log "bytes_read full=$r1 incremental=$r2 (new chunks $n2)"
# the full backup reads what ext4 uses (24 MiB of files and its metadata), the
# incremental the 12 written MiB (at most one more repository chunk each)
[ "$r1" -ge $((24 << 20)) ] || fail "full read only $r1 bytes"
[ "$r2" -ge $((12 << 20)) ] && [ "$r2" -le $((24 << 20)) ] || fail "incremental read $r2 bytes for 12 written MiB"
[ "$n2" -ge 12 ] && [ "$n2" -le 24 ] || fail "incremental stored $n2 new chunks for 12 written regions"
ctl list "$REPO" | grep -q "^$g2 " || fail "human list misses $g2"

log "verify"
ctl verify "$REPO" > "$T/verify.out" || fail "verify: $(cat "$T/verify.out")"

log "restore both generations (offline) and compare"
for pair in "$g1 e1" "$g2 e2"; do
  set -- $pair
  rm -f "$T/r.img"
  ctl restore "$REPO@$1" --to "$T/r.img" >/dev/null || fail "restore $1"
  [ "$(sha "$T/r.img")" = "$(sha "$T/$2.img")" ] || fail "restore of $1 differs from the content at its snapshot ($2)"
  e2fsck -fn "$T/r.img" >"$T/fsck.out" 2>&1 || fail "e2fsck of restored $1: $(cat "$T/fsck.out")"
done
[ "$(sha "$T/e1.img")" != "$(sha "$T/e2.img")" ] || fail "the writes changed nothing"

log "wrong credentials: a clear error, nothing published"
out=$(AWS_SECRET_ACCESS_KEY=wrong-secret "$CTL" list "$REPO" 2>&1) && fail "list with a wrong secret succeeded: $out"
echo "$out" | grep -qiE 'SignatureDoesNotMatch|403|Forbidden|denied' || fail "unclear error for a wrong secret: $out"
echo "$out" | grep -q "$AWS_SECRET_ACCESS_KEY" && fail "the error shows the secret"
cp "$T/e2.img" "$T/w.img"
AWS_SECRET_ACCESS_KEY=wrong-secret ctl attach "$T/w.img" --name w70 --via none >/dev/null || fail "attach w70"
"$CTL" backup w70 --to "$REPO" --quiesce-idle 0 >"$T/w.out" 2>&1 && fail "backup with a wrong secret succeeded: $(cat "$T/w.out")"
grep -qiE 'SignatureDoesNotMatch|403|Forbidden|denied' "$T/w.out" || fail "unclear error for the daemon's wrong secret: $(cat "$T/w.out")"
grep -q "$AWS_SECRET_ACCESS_KEY" "$T/w.out" "$COWSNAP_STATE_DIR"/*.log && fail "the secret appears in output or logs"
out=$(env -u AWS_ACCESS_KEY_ID "$CTL" list "$REPO" 2>&1) && fail "list without credentials succeeded"
echo "$out" | grep -q "no credentials" || fail "unclear error without credentials: $out"
L=$(ctl list "$REPO" --json) || fail "list"
[ "$(json_field "$L" 'length')" = 2 ] || fail "a failed backup published something: $L"

log "export and mount are refused clearly (live restore: tests/73-s3-live-restore.sh)"
out=$("$CTL" export "$REPO@$g1" --name x70 --via none 2>&1) && fail "export from s3 succeeded: $out"
echo "$out" | grep -q "not yet supported for s3 repositories" || fail "unclear export refusal: $out"
mkdir -p "$T/m70"
out=$("$CTL" mount "$REPO@$g1" "$T/m70" 2>&1) && fail "mount from s3 succeeded: $out"
echo "$out" | grep -q "not yet supported for s3 repositories" || fail "unclear mount refusal: $out"
mountpoint -q "$T/m70" && fail "a refused mount mounted something"
L=$(ctl list "$REPO" --json) || fail "list"
[ "$(json_field "$L" 'length')" = 2 ] || fail "generations changed: $L"

ctl detach w70 || fail "detach w70"
ctl detach d70 || fail "detach d70"
log "PASS"
