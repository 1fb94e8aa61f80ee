#!/usr/bin/env bash
# Many hosts, one bucket: 16 daemons (separate processes, each attached --via none to a
# small disk file of similar content) back up into one S3 repository at the same time,
# three rounds (full, then two incrementals), while prune --keep-last 2 runs over and over
# in a loop; a 17th backup is killed mid-upload. The repository has a grace period of
# 45 s (COWSNAP_REPO_GC_GRACE at creation). Afterwards: dedup across the 16 disks held,
# every generation left verifies and restores bit-exact, and after the grace period a
# prune removes the killed backup's garbage (its chunks and start probe) and the
# generations pruned meanwhile leave no object behind.
. "$(dirname "$0")/lib.sh"
need_root
need nbdcopy sha256sum curl
need_python_nbd
need_s3

s3_test_store "${COWSNAP_TEST_S3_MANY_PORT:-17540}" "${COWSNAP_TEST_S3_MANY_MON_PORT:-13360}"
N=16
GRACE=45
PRUNE_LOOP=

sha() { sha256sum "$1" | cut -d' ' -f1; }
# s3keys PREFIX: the keys under PREFIX (one request: fewer than 1000 here)
s3keys() {
  local body
  body=$(curl -s -K <(printf 'user = "%s:%s"\n' "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY") \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" --aws-sigv4 "aws:amz:us-east-1:s3" \
    "$AWS_ENDPOINT_URL/$BKT?max-keys=1000&prefix=${1//\//%2F}") || fail "listing $1"
  echo "$body" | grep -q "<ListBucketResult" || fail "listing $1: $body"
  echo "$body" | grep -q "<IsTruncated>true" && fail "listing $1: more than 1000 keys"
  echo "$body" | grep -o '<Key>[^<]*</Key>' | sed 's/<[^>]*>//g'
}
# prune_loop: prune --keep-last 2 over and over until $T/stop-prune exists; each run's
# JSON report to $T/prune.N.json, a failed run's output to $T/prune.failed (before the
# first backup has created the repository, a prune is refused: not counted)
prune_loop() {
  local i=0
  while [ ! -e "$T/stop-prune" ]; do
    if "$CTL" prune "$REPO" --keep-last 2 --json >"$T/prune.json" 2>"$T/prune.err"; then
      i=$((i + 1))
    elif ! grep -q "no cowsnap-repo.json" "$T/prune.err"; then
      cat "$T/prune.json" "$T/prune.err" >>"$T/prune.failed"
    fi
    sleep 0.5
  done
  echo "$i" >"$T/prune.runs"
}
start_prunes() { rm -f "$T/stop-prune"; prune_loop & PRUNE_LOOP=$!; S3_BGPID=$PRUNE_LOOP; }
stop_prunes() {
  touch "$T/stop-prune"; wait "$PRUNE_LOOP"; S3_BGPID=
  [ -e "$T/prune.failed" ] && fail "a prune failed: $(cat "$T/prune.failed")"
  log "$(cat "$T/prune.runs") prune run(s) meanwhile"
}
# round R [--incremental]: every disk's image content saved, then the 16 backups at once
round() {
  local r=$1 i pids=() fails=0
  shift
  for i in $(seq $N); do nbdcopy "${URI[$i]}" "$T/d$i.r$r.img" || fail "nbdcopy d$i"; done
  local t0=$SECONDS
  for i in $(seq $N); do
    timeout 120 "$CTL" backup "h$i" --to "$REPO" --quiesce-idle 0 "$@" >"$T/bk.$i.out" 2>&1 &
    pids+=($!)
  done
  for i in $(seq $N); do wait "${pids[$((i - 1))]}" || { fails=$((fails + 1)); echo "h$i: $(cat "$T/bk.$i.out")"; }; done
  [ "$fails" = 0 ] || fail "$fails of $N concurrent backups failed in round $r"
  log "round $r: $N concurrent backups in $((SECONDS - t0))s"
}

BKT=cowsnap-t75
s3_start_bucket $BKT
REPO=repo:s3://$BKT/p
# read by the first backup, which creates the repository (the daemons inherit it)
export COWSNAP_REPO_GC_GRACE=$GRACE

log "$N disks of 8 MiB: the same random base, 1 MiB of each its own; attach --via none"
head -c $((8 << 20)) /dev/urandom >"$T/base.img"
declare -a URI
for i in $(seq $N); do
  cp "$T/base.img" "$T/h$i.img"
  head -c $((1 << 20)) /dev/urandom | dd of="$T/h$i.img" bs=1M seek=$((i % 8)) conv=notrunc status=none
  URI[$i]=$(ctl attach "$T/h$i.img" --name "h$i" --via none | tail -n 1) || fail "attach h$i"
done

log "round 1: $N full backups at once, prune looping"
start_prunes
round 1
stop_prunes
L=$(ctl list "$REPO" --json) || fail "list"
[ "$(json_field "$L" 'length')" = $N ] || fail "expected $N generations: $L"
nchunks=$(s3keys p/chunks/ | wc -l)
log "round 1 stored $nchunks chunks for $((N * 8)) MiB of disks"
# 7 base chunks + 16 own ones (+ the base chunk each own one replaced may be missing)
[ "$nchunks" -le $((8 + N)) ] || fail "dedup across the disks failed: $nchunks chunks"
cfg=$(curl -s -K <(printf 'user = "%s:%s"\n' "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY") \
  -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" --aws-sigv4 "aws:amz:us-east-1:s3" "$AWS_ENDPOINT_URL/$BKT/p/cowsnap-repo.json")
[ "$(json_field "$cfg" .gc_grace_secs)" = $GRACE ] || fail "grace period not in the config: $cfg"

log "a 17th backup killed mid-upload (96 MiB of its own data)"
head -c $((96 << 20)) /dev/urandom >"$T/k.img"
ctl attach "$T/k.img" --name k72 --via none >/dev/null || fail "attach k72"
s3keys p/chunks/ | sort >"$T/chunks.before-kill"
timeout 120 "$CTL" backup k72 --to "$REPO" --quiesce-idle 0 >"$T/k.out" 2>&1 &
kb=$!
for _ in $(seq 100); do
  [ "$(s3keys p/chunks/ | wc -l)" -ge $((nchunks + 4)) ] && break
  sleep 0.1
done
kill -KILL "$(cat "$COWSNAP_RUN_DIR/k72.pid")" || fail "kill the k72 daemon"
wait "$kb" && fail "the killed backup succeeded"
s3keys p/chunks/ | sort >"$T/chunks.after-kill"
comm -13 "$T/chunks.before-kill" "$T/chunks.after-kill" >"$T/garbage"
[ -s "$T/garbage" ] || fail "the killed backup left no chunk (killed too late or too early)"
log "it left $(wc -l <"$T/garbage") chunk(s)"
ctl list "$REPO" --json | jq -e '[.[]|select(.disk=="k72")]|length==0' >/dev/null || fail "the killed backup published"

for r in 2 3; do
  log "round $r: writes on every disk, $N incrementals at once, prune looping"
  for i in $(seq $N); do nbd_write_random "${URI[$i]}" $((r * 100 + i)) 1 || fail "writes h$i"; done
  start_prunes
  round $r --incremental
  stop_prunes
done

log "prune once more right away: the garbage is younger than the grace period and stays"
out=$(ctl prune "$REPO" --keep-last 2 --json | tail -n 1) || fail "prune: $out"
last_prune_at=$SECONDS # round 1's generations are pruned (tombstoned) by now
[ "$(json_field "$out" .grace_secs)" = $GRACE ] || fail "grace_secs: $out"
while read -r k; do s3keys "$k" | grep -q . || fail "$k went before the grace period"; done <"$T/garbage"

log "verify, and restore every generation bit-exact"
L=$(ctl list "$REPO" --json) || fail "list"
[ "$(json_field "$L" 'length')" = $((2 * N)) ] || fail "expected $((2 * N)) generations: $L"
ctl verify "$REPO" >"$T/verify.out" || fail "verify: $(cat "$T/verify.out")"
for r in 2 3; do
  pids=()
  for i in $(seq $N); do
    id=$(json_field "$L" "[.[]|select(.disk==\"h$i\")][$((r - 2))].id")
    "$CTL" restore "$REPO@$id" --to "$T/r$i.$r.img" >"$T/rs$i.$r.out" 2>&1 &
    pids+=($!)
  done
  for i in $(seq $N); do
    wait "${pids[$((i - 1))]}" || fail "restore of h$i round $r: $(cat "$T/rs$i.$r.out")"
    [ "$(sha "$T/r$i.$r.img")" = "$(sha "$T/d$i.r$r.img")" ] || fail "restore of h$i round $r differs"
    rm -f "$T/r$i.$r.img"
  done
done

wait_s=$((GRACE + 2 - (SECONDS - last_prune_at)))
[ "$wait_s" -gt 0 ] && { log "wait ${wait_s}s for the grace period"; sleep "$wait_s"; }
log "prune after the grace period: the killed backup's garbage goes"
out=$(ctl prune "$REPO" --keep-last 2 --json | tail -n 1) || fail "prune: $out"
[ "$(json_field "$out" .chunks_removed)" -ge "$(wc -l <"$T/garbage")" ] || fail "too few chunks removed: $out"
while read -r k; do s3keys "$k" | grep -q . && fail "garbage chunk $k remains: $out"; done <"$T/garbage"
[ -z "$(s3keys p/writers/)" ] || fail "writer probes remain: $(s3keys p/writers/)"
[ -z "$(s3keys p/gc/)" ] || fail "prune probes remain: $(s3keys p/gc/)"
s3keys p/generations/ | grep -q '\.removed$' && fail "tombstones remain: $(s3keys p/generations/)"
[ "$(s3keys p/generations/ | wc -l)" = $((4 * N)) ] || fail "expected only the kept generations' objects: $(s3keys p/generations/)"
ctl verify "$REPO" >"$T/verify.out" || fail "verify after the sweep: $(cat "$T/verify.out")"

for i in $(seq $N); do ctl detach "h$i" >/dev/null || fail "detach h$i"; done
ctl detach --force k72 >/dev/null 2>&1
log "PASS"
