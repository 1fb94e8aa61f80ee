#!/usr/bin/env bash
# The local index cache of s3 repositories (STATE_DIR/.repo-cache, see repo::cache)
# against a real radosgw (scripts/s3-server.sh, its own state dir and ports): a disk
# attached through the daemon, a full backup, writes, an incremental whose parent index
# comes from the cache (the output says so, and radosgw's own request log shows no GET
# of that index); a cached index with flipped bytes is detected, fetched again, and the
# next incremental succeeds; a removed cache directory is no error; verify reads every
# index from the store; with a small COWSNAP_REPO_CACHE_MAX the cache stays under the
# bound, a nonsense value is a clear error; every generation restores bit-exact to what
# the disk held at its snapshot.
# Run it as: flock /tmp/cowsnap-s3-test.lock bash tests/77-s3-cache.sh
. "$(dirname "$0")/lib.sh"
need_root
need nbdcopy sha256sum curl
need_python_nbd
need_s3

s3_test_store "${COWSNAP_TEST_S3_PORT:-17560}" "${COWSNAP_TEST_S3_MON_PORT:-13380}"

sha() { sha256sum "$1" | cut -d' ' -f1; }
# bk ARGS...: a backup (JSON lines: stdout is no terminal); its result line in $T/bk.json
bk() {
  timeout 300 "$CTL" backup "$@" --quiesce-idle 0 --json >"$T/bk.out" 2>"$T/bk.err" || fail "backup $*: $(cat "$T/bk.err")"
  tail -n 1 "$T/bk.out" >"$T/bk.json"
}
# io FIELD: the backup's repo_io.FIELD
io() { jq -r ".repo_io.$1" "$T/bk.json"; }

BUCKET=cowsnap-t77
s3_start_bucket "$BUCKET"
REPO=repo:s3://$BUCKET/c
CACHE=$COWSNAP_STATE_DIR/.repo-cache
RGWLOG=$COWSNAP_S3_DIR/log/client.rgw.cowsnap.log
# radosgw's access log lines ("GET /BUCKET/KEY HTTP/1.1" 200 ...) are at debug_rgw 1
ceph --admin-daemon "$COWSNAP_S3_DIR/run/client.rgw.cowsnap.asok" config set debug_rgw 1 >/dev/null \
  || fail "unable to set debug_rgw"
# idx_gets GEN: GETs of GEN's index object radosgw served so far
idx_gets() { grep -c "\"GET /$BUCKET/c/generations/$1.idx" "$RGWLOG"; }
# cache_bytes: bytes of cached index files
cache_bytes() { find "$CACHE" -name '*.idx' -printf '%s\n' 2>/dev/null | awk '{s += $1} END {print s + 0}'; }
cached() { find "$CACHE" -name "$1.idx" | grep -q .; }

log "64 MiB disk (16 MiB data), attach --via none"
marker_disk "$T/d.img" "$T/marker"
uri=$(ctl attach "$T/d.img" --name d77 --via none | tail -n 1) || fail "attach"

log "full backup: its index goes into the cache as it is published"
bk d77 --to "$REPO"
g1=$(jq -r .generation "$T/bk.json")
[ "$(io parent_index)" = "" ] && [ "$(io store_requests)" -gt 0 ] || fail "full backup's repo_io: $(cat "$T/bk.json")"
nbdcopy "$uri" "$T/e1.img" || fail "nbdcopy e1"
cached "$g1" || fail "the full backup's index is not in the cache: $(find "$CACHE")"
grep -q "s3://$BUCKET/c" "$CACHE"/*/location || fail "the cache does not name its repository"

log "writes, incremental: the parent index comes from the cache, radosgw serves no GET of it"
nbd_write_random "$uri" 1 6 0 64 || fail "writes"
[ "$(idx_gets "$g1")" = 0 ] || fail "index of $g1 fetched before the incremental"
bk d77 --to "$REPO" --incremental
jq -c .repo_io "$T/bk.json"
grep -qi "full read" "$T/bk.json" && fail "the incremental fell back to a full read"
[ "$(io parent_index)/$(io index_cache_hits)/$(io indexes_fetched)/$(io index_bytes_fetched)" = cache/1/0/0 ] \
  || fail "the incremental did not report its parent index from the cache: $(cat "$T/bk.json")"
[ "$(idx_gets "$g1")" = 0 ] || fail "radosgw served $(idx_gets "$g1") GET(s) of the parent index $g1"
g2=$(ctl list "$REPO" --json | jq -r '.[-1].id')
[ "$g2" != "$g1" ] || fail "no new generation"
nbdcopy "$uri" "$T/e2.img" || fail "nbdcopy e2"

log "flip bytes of the cached index of $g2: detected, fetched from the store, the backup succeeds"
f=$(find "$CACHE" -name "$g2.idx") && [ -n "$f" ] || fail "no cached index of $g2"
printf '\xde\xad\xbe\xef' | dd of="$f" bs=1 seek=4100 conv=notrunc status=none || fail "tamper"
nbd_write_random "$uri" 2 6 0 64 || fail "writes"
bk d77 --to "$REPO" --incremental
jq -c .repo_io "$T/bk.json"
grep -qi "full read" "$T/bk.json" && fail "the incremental fell back to a full read"
[ "$(io parent_index)/$(io index_cache_hits)/$(io indexes_fetched)/$(io index_cache_invalid)" = store/0/1/1 ] \
  || fail "the tampered cache was not detected and refetched: $(cat "$T/bk.json")"
[ "$(io index_bytes_fetched)" -gt 4096 ] || fail "index bytes fetched: $(io index_bytes_fetched)"
[ "$(idx_gets "$g2")" = 1 ] || fail "expected 1 GET of $g2's index, radosgw served $(idx_gets "$g2")"
grep -q "does not match the index hash recorded in generation $g2" "$COWSNAP_STATE_DIR"/d77.log \
  || fail "the daemon did not log the damaged cache file"
tmp_ok=$(od -An -tx1 -j4100 -N4 "$f" | tr -d ' ')
[ "$tmp_ok" != deadbeef ] || fail "the damaged cache file is still there"
g3=$(ctl list "$REPO" --json | jq -r '.[-1].id')
nbdcopy "$uri" "$T/e3.img" || fail "nbdcopy e3"

log "cache directory removed: the next incremental fetches the parent index and fills the cache again"
rm -rf "$CACHE"
nbd_write_random "$uri" 3 6 0 64 || fail "writes"
bk d77 --to "$REPO" --incremental
[ "$(io parent_index)/$(io index_cache_hits)/$(io indexes_fetched)/$(io index_cache_invalid)" = store/0/1/0 ] \
  || fail "without a cache: $(cat "$T/bk.json")"
g4=$(ctl list "$REPO" --json | jq -r '.[-1].id')
nbdcopy "$uri" "$T/e4.img" || fail "nbdcopy e4"
cached "$g3" && cached "$g4" || fail "the cache was not filled again: $(find "$CACHE")"

log "verify reads every index from the store, not from the cache"
before=$(( $(idx_gets "$g1") + $(idx_gets "$g2") + $(idx_gets "$g3") + $(idx_gets "$g4") ))
ctl verify "$REPO" >"$T/verify.out" || fail "verify: $(cat "$T/verify.out")"
after=$(( $(idx_gets "$g1") + $(idx_gets "$g2") + $(idx_gets "$g3") + $(idx_gets "$g4") ))
[ $((after - before)) = 4 ] || fail "verify fetched $((after - before)) indexes from the store, expected 4"

log "a nonsense bound is a clear error"
out=$(COWSNAP_REPO_CACHE_MAX=lots "$CTL" list "$REPO" 2>&1) && fail "COWSNAP_REPO_CACHE_MAX=lots accepted: $out"
echo "$out" | grep -q 'COWSNAP_REPO_CACHE_MAX="lots" is not a size' || fail "unclear error: $out"

log "restore all generations with COWSNAP_REPO_CACHE_MAX=10K (from an empty cache): bit-exact, cache under the bound"
rm -rf "$CACHE"
n=0
for pair in "$g1 e1" "$g2 e2" "$g3 e3" "$g4 e4"; do
  set -- $pair
  rm -f "$T/r.img"
  COWSNAP_REPO_CACHE_MAX=10K ctl restore "$REPO@$1" --to "$T/r.img" >/dev/null || fail "restore $1"
  [ "$(sha "$T/r.img")" = "$(sha "$T/$2.img")" ] || fail "restore of $1 differs from the content at its snapshot ($2)"
  b=$(cache_bytes)
  [ "$b" -le 10240 ] || fail "cache holds $b bytes over the bound of 10240"
  [ "$b" -gt 0 ] || fail "nothing cached"
  n=$((n + 1))
done
[ "$n" = 4 ] || fail "restored $n generations"
[ "$(sha "$T/e1.img")" != "$(sha "$T/e4.img")" ] || fail "the writes changed nothing"
cached "$g4" || fail "the newest restored index is not cached"
cached "$g1" && fail "the oldest index was not evicted (cache $(cache_bytes) bytes)"

log "restore from the cache: the same content, no GET of the index"
gets=$(idx_gets "$g4")
rm -f "$T/r.img"
ctl restore "$REPO@$g4" --to "$T/r.img" >/dev/null || fail "restore $g4 from the cache"
[ "$(sha "$T/r.img")" = "$(sha "$T/e4.img")" ] || fail "restore of $g4 through the cache differs"
[ "$(idx_gets "$g4")" = "$gets" ] || fail "the restore fetched the cached index"

ctl detach d77 || fail "detach d77"
log "PASS"
