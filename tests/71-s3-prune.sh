#!/usr/bin/env bash
# prune on a repository on S3 object storage (repo:s3://BUCKET/PREFIX) against a real
# radosgw (scripts/s3-server.sh, its own state dir and ports): two raw disks attached
# through the daemon, three backups of one and one of the other; a dry run changes
# nothing; prune --keep-last 1 runs while a backup of the other disk runs; afterwards the
# removed generations' metadata objects are gone (their indexes stay behind tombstones for
# the grace period), the kept ones and the concurrent backup's generation verify and
# restore bit-exact, and no chunk was deleted (the removed generations' chunks stay in
# use behind their tombstones, and every chunk is younger than the default grace period
# of one day).
. "$(dirname "$0")/lib.sh"
need_root
need nbdcopy sha256sum curl
need_python_nbd
need_s3

s3_test_store "${COWSNAP_TEST_S3_PRUNE_PORT:-17495}" "${COWSNAP_TEST_S3_PRUNE_MON_PORT:-13315}"

sha() { sha256sum "$1" | cut -d' ' -f1; }
bk() { timeout 300 "$CTL" backup "$@" --quiesce-idle 0 >"$T/bk.out" 2>"$T/bk.err" || fail "backup $*: $(cat "$T/bk.err")"; }
# s3keys PREFIX: the keys under PREFIX in the bucket (one request: fewer than 1000 here)
s3keys() {
  local body
  body=$(curl -s -K <(printf 'user = "%s:%s"\n' "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY") \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" --aws-sigv4 "aws:amz:us-east-1:s3" \
    "$AWS_ENDPOINT_URL/$BKT?max-keys=1000&prefix=${1//\//%2F}") || fail "listing $1"
  echo "$body" | grep -q "<ListBucketResult" || fail "listing $1: $body"
  echo "$body" | grep -q "<IsTruncated>true" && fail "listing $1: more than 1000 keys"
  echo "$body" | grep -o '<Key>[^<]*</Key>' | sed 's/<[^>]*>//g'
}

BKT=cowsnap-t71
s3_start_bucket $BKT
REPO=repo:s3://$BKT/p

log "two 64 MiB raw disks of random data, attach --via none"
head -c $((64 << 20)) /dev/urandom > "$T/a.img"
head -c $((64 << 20)) /dev/urandom > "$T/b.img"
ua=$(ctl attach "$T/a.img" --name a71 --via none | tail -n 1) || fail "attach a71"
ub=$(ctl attach "$T/b.img" --name b71 --via none | tail -n 1) || fail "attach b71"

log "a71: full, then two incrementals with writes between; b71: full"
bk a71 --to "$REPO"
nbd_write_random "$ua" 1 8 0 64 || fail "writes"
bk a71 --to "$REPO" --incremental
nbd_write_random "$ua" 2 8 0 64 || fail "writes"
bk a71 --to "$REPO" --incremental
nbdcopy "$ua" "$T/a3.img" || fail "nbdcopy a3"
bk b71 --to "$REPO"
L=$(ctl list "$REPO" --json) || fail "list"
[ "$(json_field "$L" 'length')" = 4 ] || fail "expected 4 generations: $L"
a1=$(json_field "$L" '[.[]|select(.disk=="a71")][0].id')
a2=$(json_field "$L" '[.[]|select(.disk=="a71")][1].id')
a3=$(json_field "$L" '[.[]|select(.disk=="a71")][2].id')
b1=$(json_field "$L" '[.[]|select(.disk=="b71")][0].id')
s3keys p/chunks/ | sort > "$T/chunks0"
s3keys p/generations/ | sort > "$T/gens0"
[ "$(wc -l < "$T/gens0")" = 8 ] || fail "expected 8 generation objects: $(cat "$T/gens0")"
[ "$(wc -l < "$T/chunks0")" -ge 80 ] || fail "too few chunks: $(wc -l < "$T/chunks0")"

log "prune --dry-run changes nothing"
out=$(ctl prune "$REPO" --keep-last 1 --dry-run) || fail "dry run: $out"
echo "$out" | grep -q "would remove 2 generation(s), kept 2" || fail "dry run summary: $out"
echo "$out" | grep -q "0 chunk(s) freed" || fail "dry run would free chunks (the removed generations' chunks stay in use behind tombstones for the grace period): $out"
s3keys p/generations/ | sort | cmp -s - "$T/gens0" || fail "the dry run changed generation objects"
s3keys p/chunks/ | sort | cmp -s - "$T/chunks0" || fail "the dry run changed chunks"

log "prune --keep-last 1 while a backup of b71 runs"
nbd_write_random "$ub" 3 16 0 64 || fail "writes b71"
nbdcopy "$ub" "$T/b2.img" || fail "nbdcopy b2"
timeout 300 "$CTL" backup b71 --to "$REPO" --quiesce-idle 0 >"$T/bg.out" 2>"$T/bg.err" &
S3_BGPID=$!
out=$(ctl prune "$REPO" --keep-last 1 --json) || fail "prune: $out"
wait "$S3_BGPID" || fail "the concurrent backup failed: $(cat "$T/bg.err")"
S3_BGPID=
removed=$(json_field "$(echo "$out" | tail -n 1)" '.removed_generations|sort|join(" ")')
[ "$removed" = "$(printf '%s\n' "$a1" "$a2" | sort | tr '\n' ' ' | sed 's/ $//')" ] \
  || [ "$removed" = "$(printf '%s\n' "$a1" "$a2" "$b1" | sort | tr '\n' ' ' | sed 's/ $//')" ] \
  || fail "prune removed $removed, expected $a1 $a2 (and $b1 if the concurrent backup published first)"
[ "$(json_field "$(echo "$out" | tail -n 1)" '.chunks_removed')" = 0 ] || fail "chunks removed on s3: $out"
[ "$(json_field "$(echo "$out" | tail -n 1)" '.chunks_collected')" = true ] || fail "chunks_collected not true: $out"
[ "$(json_field "$(echo "$out" | tail -n 1)" '.grace_secs')" = 86400 ] || fail "grace_secs not the default: $out"

log "removed generations are unpublished (metadata gone, index behind a tombstone), no chunk was deleted"
s3keys p/generations/ | sort > "$T/gens1"
for g in $removed; do
  grep -q "/$g\.json" "$T/gens1" && fail "metadata of removed generation $g remains: $(cat "$T/gens1")"
  grep -q "/$g\.removed" "$T/gens1" || fail "no tombstone for removed generation $g: $(cat "$T/gens1")"
  grep -q "/$g\.idx" "$T/gens1" || fail "the index of $g went before the grace period: $(cat "$T/gens1")"
done
s3keys p/chunks/ | sort > "$T/chunks1"
comm -23 "$T/chunks0" "$T/chunks1" | grep -q . && fail "chunks were deleted: $(comm -23 "$T/chunks0" "$T/chunks1" | head)"
L=$(ctl list "$REPO" --json) || fail "list"
[ "$(json_field "$L" '[.[]|select(.disk=="a71")]|length')" = 1 ] || fail "a71 should keep 1: $L"
[ "$(json_field "$L" '[.[]|select(.disk=="a71")][0].id')" = "$a3" ] || fail "a71 kept the wrong one: $L"
b2=$(json_field "$L" '[.[]|select(.disk=="b71")][-1].id')
[ "$b2" != "$b1" ] || fail "the concurrent backup did not publish: $L"

log "verify, and restore the kept a71 and the concurrent b71 generation bit-exact"
ctl verify "$REPO" > "$T/verify.out" || fail "verify: $(cat "$T/verify.out")"
for pair in "$a3 a3" "$b2 b2"; do
  set -- $pair
  rm -f "$T/r.img"
  ctl restore "$REPO@$1" --to "$T/r.img" >/dev/null || fail "restore $1"
  [ "$(sha "$T/r.img")" = "$(sha "$T/$2.img")" ] || fail "restore of $1 differs from the content at its snapshot ($2)"
done

log "a policy that keeps nothing is refused and changes nothing"
s3keys p/generations/ | sort > "$T/gens2"
out=$("$CTL" prune "$REPO" --keep-last 0 2>&1) && fail "prune keeping nothing succeeded: $out"
s3keys p/generations/ | sort | cmp -s - "$T/gens2" || fail "a refused prune changed generation objects"

ctl detach a71 || fail "detach a71"
ctl detach b71 || fail "detach b71"
log "PASS"
