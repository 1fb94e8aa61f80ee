#!/usr/bin/env bash
# An encrypted repository on S3 object storage (repo:s3://BUCKET/PREFIX, a real radosgw
# from scripts/s3-server.sh on ports of its own): a disk with a random marker is backed
# up with --key, full then incremental; list, verify and restore (both generations,
# bit-exact) with the key; every object is fetched (curl's SigV4): the marker's bytes
# are in an unencrypted repository's objects (the check can fail) and in none of the
# encrypted one's, and the two share no chunk name; a wrong key and a missing key are refused by backup, list, verify and restore, and
# the generations and the chunk count stay as they were; a key for an unencrypted
# repository is refused. Run under flock /tmp/cowsnap-s3-test.lock like 70 and 71.
. "$(dirname "$0")/lib.sh"
need nbdcopy sha256sum
need_python_nbd
need_s3

s3_test_store "${COWSNAP_TEST_S3_PORT:-17530}" "${COWSNAP_TEST_S3_MON_PORT:-13350}"

sha() { sha256sum "$1" | cut -d' ' -f1; }
K1=$T/k1.key K2=$T/k2.key
refused() {
  local what=$1 want=$2; shift 2
  if "$@" >"$T/ref.out" 2>"$T/ref.err"; then fail "$what succeeded: $(cat "$T/ref.out")"; fi
  grep -qF -- "$want" "$T/ref.err" || fail "$what: expected \"$want\", got: $(cat "$T/ref.err")"
  log "refused ($what): $(tail -n 1 "$T/ref.err")"
}

# s3_get PATH: the bucket's /KEY or ?QUERY on stdout (the secret goes to curl on a pipe)
s3_get() {
  curl -sf -K <(printf 'user = "%s:%s"\n' "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY") \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" --aws-sigv4 "aws:amz:us-east-1:s3" \
    "$AWS_ENDPOINT_URL/cowsnap-t73$1"
}
# s3_fetch PREFIX DIR: every object under PREFIX/ into DIR (flat, by its last name part)
s3_fetch() {
  mkdir -p "$2"
  s3_get "?list-type=2&max-keys=1000&prefix=$1%2F" > "$2.list" || fail "list objects under $1"
  grep -q '<IsTruncated>false' "$2.list" || fail "more than 1000 objects under $1"
  local k n=0
  for k in $(grep -o '<Key>[^<]*</Key>' "$2.list" | sed 's/<[^>]*>//g'); do
    s3_get "/$k" > "$2/$(echo "$k" | tr / _)" || fail "get object $k"
    n=$((n + 1))
  done
  [ "$n" -gt 0 ] || fail "no object under $1"
}
# holds DIR FILE: 0 when a file in DIR contains the 64 bytes at offset 4096 of FILE
holds() {
  /usr/bin/python3 - "$1" "$2" <<'PY'
import os, sys
needle = open(sys.argv[2], "rb").read()[4096:4096 + 64]
for f in os.listdir(sys.argv[1]):
    if needle in open(os.path.join(sys.argv[1], f), "rb").read():
        sys.exit(0)
sys.exit(1)
PY
}

s3_start_bucket cowsnap-t73
ENC=repo:s3://cowsnap-t73/enc PLAIN=repo:s3://cowsnap-t73/plain

ctl key create "$K1" >/dev/null || fail "key create"
ctl key create "$K2" >/dev/null || fail "key create k2"

log "64 MiB disk: 16 MiB random, a 1 MiB random marker at 32 MiB"
marker_disk "$T/d.img" "$T/marker"
uri=$(ctl attach "$T/d.img" --name s3enc73 --via none | tail -n 1) || fail "attach"

log "unencrypted backup (for the chunk names), encrypted full and incremental"
backup_gen s3enc73 --to "$PLAIN" >/dev/null
g1=$(backup_gen s3enc73 --to "$ENC" --key "$K1")
nbdcopy "$uri" "$T/e1.img" || fail "nbdcopy e1"
nbd_write_random "$uri" 73 4 || fail "writes"
g2=$(backup_gen s3enc73 --to "$ENC" --key "$K1" --incremental)
nbdcopy "$uri" "$T/e2.img" || fail "nbdcopy e2"
L=$(ctl list "$ENC" --key "$K1" --json) || fail "list --key"
[ "$(json_field "$L" 'length')" = 2 ] || fail "expected 2 generations: $L"
[ "$(json_field "$L" '.[1].parent')" = "$g1" ] || fail "parent of #2 is not #1: $L"
V=$(ctl verify "$ENC" --key "$K1" --json | tail -n 1) || fail "verify --key: $V"
checked=$(json_field "$V" '.chunks_checked')
[ "$checked" -ge 17 ] || fail "verify checked only $checked chunks"

log "every object fetched: the marker only in the unencrypted repository, no shared chunk name"
s3_fetch plain "$T/o-plain"; s3_fetch enc "$T/o-enc"
holds "$T/o-plain" "$T/marker" || fail "the marker is not in the unencrypted repository's objects (the check cannot fail)"
holds "$T/o-enc" "$T/marker" && fail "the marker's bytes are in the encrypted repository's objects"
comm -12 <(grep -o '<Key>plain/chunks/[^<]*' "$T/o-plain.list" | sed 's|.*/||' | sort) \
  <(grep -o '<Key>enc/chunks/[^<]*' "$T/o-enc.list" | sed 's|.*/||' | sort) > "$T/shared"
[ -s "$T/shared" ] && fail "chunk names shared with the unencrypted repository: $(head -n 3 "$T/shared")"
[ "$(grep -o '<Key>enc/chunks/' "$T/o-enc.list" | wc -l)" -ge 17 ] || fail "too few encrypted chunk objects"

log "restore both generations with the key"
for pair in "$g1 e1" "$g2 e2"; do
  set -- $pair
  rm -f "$T/r.img"
  ctl restore "$ENC@$1" --to "$T/r.img" --key "$K1" >/dev/null || fail "restore $1"
  [ "$(sha "$T/r.img")" = "$(sha "$T/$2.img")" ] || fail "restore of $1 differs ($2)"
done

log "wrong key and missing key are refused; nothing changes"
refused "backup with a wrong key" "wrong key for repository" \
  timeout 120 "$CTL" backup s3enc73 --to "$ENC" --incremental --quiesce-idle 0 --key "$K2"
refused "backup without a key" "is encrypted" \
  timeout 120 "$CTL" backup s3enc73 --to "$ENC" --incremental --quiesce-idle 0
refused "list with a wrong key" "wrong key for repository" ctl list "$ENC" --key "$K2"
refused "list without a key" "is encrypted" ctl list "$ENC"
refused "verify with a wrong key" "wrong key for repository" ctl verify "$ENC" --key "$K2"
refused "restore with a wrong key" "wrong key for repository" ctl restore "$ENC@$g1" --to "$T/no.img" --key "$K2"
refused "restore without a key" "is encrypted" ctl restore "$ENC@$g1" --to "$T/no.img"
refused "a key for an unencrypted repository" "is not encrypted" ctl list "$PLAIN" --key "$K1"
[ -e "$T/no.img" ] && fail "a refused restore created its destination"
L2=$(ctl list "$ENC" --key "$K1" --json) || fail "list after the refusals"
[ "$(json_field "$L2" '[.[].id] | join(" ")')" = "$(json_field "$L" '[.[].id] | join(" ")')" ] || fail "the refusals changed the generations: $L2"
V2=$(ctl verify "$ENC" --key "$K1" --json | tail -n 1) || fail "verify after the refusals: $V2"
[ "$(json_field "$V2" '.chunks_checked')" = "$checked" ] || fail "the refusals changed the chunks"

echo "PASS: 76-s3-encrypt"
