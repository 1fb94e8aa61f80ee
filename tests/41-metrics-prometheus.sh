#!/usr/bin/env bash
# Metrics scraped by a real Prometheus: a file disk attached --via none, a backup into a
# repository, `cowsnapctl metrics --listen` on a loopback port, and Prometheus (its own
# config, storage and port; not the distribution's service) scraping it every second.
# Checked through Prometheus's HTTP API: cowsnap_up, the write counter after writes
# (equal to what the daemon reports and to the write histogram's count), the last
# successful backup's time (within the backup command's run), the repository's
# generation count (and its refresh after a second backup), the rule file loaded.
# Also: `promtool check metrics` on `--once` output, `promtool check rules` and
# `promtool test rules` on dist/prometheus, the last backup remembered across a daemon
# restart, a stopped daemon shown as cowsnap_up 0 without holding the scrape, 404/405
# answers, and bad flags refused.
. "$(dirname "$0")/lib.sh"
need prometheus promtool curl nbdcopy; [ -x /usr/bin/python3 ] || skip "no /usr/bin/python3"
/usr/bin/python3 -c 'import nbd' 2>/dev/null || skip "python3-libnbd is not installed"
RULES=$ROOT/dist/prometheus/cowsnap-rules.yml

free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# nbdw URI COUNT: COUNT 64 KiB writes, one request each
nbdw() {
  /usr/bin/python3 - "$@" <<'PY'
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
for i in range(int(sys.argv[2])):
    h.pwrite(bytes([i % 251 + 1]) * 65536, i * 65536)
h.flush(); h.shutdown()
PY
}
# promq QUERY: the first result's value ("" when there is none)
promq() {
  curl -sf --max-time 5 "http://127.0.0.1:$PP/api/v1/query" --data-urlencode "query=$1" \
    | jq -r '.data.result[0].value[1] // empty'
}
# wait_promq QUERY WANT [SECONDS]: until QUERY's value is WANT
wait_promq() {
  local v="" i
  for i in $(seq $(( ${3:-30} * 4 ))); do
    v=$(promq "$1"); [ "$v" = "$2" ] && return 0; sleep 0.25
  done
  fail "Prometheus: $1 = ${v:-<none>}, expected $2"
}
once() { "$CTL" metrics --once --repo "repo:$REPO" "$@"; }

log "the rule file: promtool check rules and its unit tests"
promtool check rules "$RULES" >"$T/rules.out" 2>&1 || fail "promtool check rules: $(cat "$T/rules.out")"
(cd "$ROOT/dist/prometheus" && promtool test rules cowsnap-rules.test.yml) >"$T/rt.out" 2>&1 \
  || fail "promtool test rules: $(cat "$T/rt.out")"

log "bad flags are refused (exit 2)"
for bad in "--once --listen 127.0.0.1:1" "" "--once --repo /no/prefix" "--once --repo repo:$T/r@g" \
           "--once --daemon-timeout 0s" "--once --repo-refresh 0s" "--listen nohost"; do
  # shellcheck disable=SC2086
  "$CTL" metrics $bad >/dev/null 2>"$T/bad.err"; rc=$?
  [ "$rc" = 2 ] || fail "metrics $bad: exit $rc, expected 2: $(cat "$T/bad.err")"
done

log "a 64 MiB file disk --via none, a backup into a repository"
REPO=$T/repo
head -c $((64 << 20)) /dev/urandom > "$T/d.img"
uri=$(ctl attach "$T/d.img" --name m41 --via none | tail -n 1) || fail "attach"
t0=$(date +%s)
ctl backup m41 --to "repo:$REPO" --quiesce-idle 0 >"$T/bk.out" 2>&1 || fail "backup: $(cat "$T/bk.out")"
t1=$(date +%s)

log "--once passes promtool check metrics"
once >"$T/once.txt" || fail "metrics --once"
promtool check metrics <"$T/once.txt" >"$T/check.out" 2>&1 || fail "promtool check metrics: $(cat "$T/check.out")"
grep -qx 'cowsnap_up{disk="m41"} 1.0' "$T/once.txt" || fail "no cowsnap_up 1 in --once output: $(head -20 "$T/once.txt")"
grep -q '^cowsnap_repo_generations{repo="'"$REPO"'",disk="m41"} 1.0$' "$T/once.txt" || fail "no generation count in --once output"

log "cowsnapctl metrics --listen and Prometheus on loopback ports"
MP=$(free_port); PP=$(free_port)
"$CTL" metrics --listen "127.0.0.1:$MP" --repo "repo:$REPO" --repo-refresh 1s --daemon-timeout 250ms >"$T/exporter.log" 2>&1 &
EXTRA_PIDS+=($!); EXP=$!
cat >"$T/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["$RULES"]
scrape_configs:
  - job_name: cowsnap
    static_configs: [{targets: ["127.0.0.1:$MP"]}]
EOF
prometheus --config.file="$T/prometheus.yml" --storage.tsdb.path="$T/prom-data" \
  --web.listen-address="127.0.0.1:$PP" >"$T/prometheus.log" 2>&1 &
EXTRA_PIDS+=($!); PROM=$!
for _ in $(seq 120); do curl -sf --max-time 2 "http://127.0.0.1:$PP/-/ready" >/dev/null && break; sleep 0.25; done
curl -sf --max-time 2 "http://127.0.0.1:$PP/-/ready" >/dev/null || fail "Prometheus not ready: $(tail -5 "$T/prometheus.log")"
running "$EXP" || fail "the exporter exited: $(cat "$T/exporter.log")"

log "HTTP: 404 for other paths, 405 for other methods"
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$MP/")
[ "$code" = 404 ] || fail "GET / answered $code"
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$MP/metrics")
[ "$code" = 405 ] || fail "POST /metrics answered $code"

log "Prometheus scrapes: up, the last backup's time, the repository"
wait_promq 'up{job="cowsnap"}' 1
wait_promq 'cowsnap_up{disk="m41"}' 1
ts=$(promq 'cowsnap_last_backup_success_timestamp_seconds{disk="m41"}')
[ -n "$ts" ] && [ "$ts" -ge "$t0" ] && [ "$ts" -le "$t1" ] \
  || fail "last backup success at ${ts:-<none>}, expected within the backup command ($t0..$t1)"
wait_promq "cowsnap_repo_generations{disk=\"m41\",repo=\"$REPO\"}" 1
wait_promq "cowsnap_repo_up{repo=\"$REPO\"}" 1
stored=$(promq "cowsnap_repo_stored_bytes{repo=\"$REPO\"}")
[ "${stored:-0}" -gt $((32 << 20)) ] || fail "repository stores ${stored:-<none>} bytes of a 64 MiB random disk"
wait_promq 'cowsnap_backup_state{disk="m41",state="complete"}' 1

log "writes show in the counter and the histogram"
w0=$(ctl status m41 --json | jq -r '.daemon.stats.writes')
nbdw "$uri" 25 || fail "writes"
want=$((w0 + 25))
[ "$(ctl status m41 --json | jq -r '.daemon.stats.writes')" = "$want" ] || fail "the daemon counts no $want writes"
wait_promq 'cowsnap_writes_total{disk="m41"}' "$want"
wait_promq 'cowsnap_write_duration_seconds_count{disk="m41"}' "$want"
wait_promq 'cowsnap_write_duration_seconds_bucket{disk="m41",le="+Inf"}' "$want"
wait_promq 'cowsnap_written_bytes_total{disk="m41"}' "$(( $(ctl status m41 --json | jq -r '.daemon.stats.bytes_written') ))"
wait_promq 'cowsnap_changelog_dirty_chunks{disk="m41"}' 25

log "a second backup: the generation count follows (repository refresh 1 s)"
ctl backup m41 --to "repo:$REPO" --incremental --quiesce-idle 0 >"$T/bk2.out" 2>&1 || fail "backup 2: $(cat "$T/bk2.out")"
wait_promq "cowsnap_repo_generations{disk=\"m41\",repo=\"$REPO\"}" 2
wait_promq 'cowsnap_changelog_dirty_chunks{disk="m41"}' 0
ts2=$(once | sed -n 's/^cowsnap_last_backup_success_timestamp_seconds{disk="m41"} \([0-9]*\)\.0$/\1/p')
[ -n "$ts2" ] && [ "$ts2" -ge "$ts" ] || fail "second backup's time ${ts2:-<none>} not after $ts"

log "the rules are loaded by Prometheus"
curl -sf --max-time 5 "http://127.0.0.1:$PP/api/v1/rules" >"$T/rules.json" || fail "rules API"
jq -e '[.data.groups[].rules[] | select(.name == "CowsnapNoRecentBackup" and .health == "ok")] | length == 1' \
  "$T/rules.json" >/dev/null || fail "CowsnapNoRecentBackup not loaded and healthy: $(cat "$T/rules.json")"

log "the last backup is remembered across a daemon restart"
ctl restart m41 >"$T/restart.out" 2>&1 || fail "restart: $(cat "$T/restart.out")"
once >"$T/once2.txt" || fail "metrics --once after restart"
grep -qx "cowsnap_last_backup_success_timestamp_seconds{disk=\"m41\"} $ts2.0" "$T/once2.txt" \
  || fail "after a restart: $(grep last_backup "$T/once2.txt")"
grep -qx 'cowsnap_backup_state{disk="m41",state="idle"} 1.0' "$T/once2.txt" || fail "the new daemon ran no backup yet"
grep -qx 'cowsnap_writes_total{disk="m41"} 0' "$T/once2.txt" || fail "the new daemon's counters start at 0"

log "a stopped daemon is cowsnap_up 0 and does not hold the scrape"
pid=$(cat "$COWSNAP_RUN_DIR/m41.pid")
kill -STOP "$pid"
s=$(date +%s%N)
once --daemon-timeout 500ms >"$T/once3.txt"; rc=$?
ms=$(( ($(date +%s%N) - s) / 1000000 ))
kill -CONT "$pid"
[ "$rc" = 0 ] || fail "metrics --once with a stopped daemon: exit $rc"
grep -qx 'cowsnap_up{disk="m41"} 0.0' "$T/once3.txt" || fail "stopped daemon not up 0: $(head "$T/once3.txt")"
grep -q '^cowsnap_repo_generations{' "$T/once3.txt" || fail "the repository figures went missing"
log "scrape with a stopped daemon took ${ms} ms"
[ "$ms" -lt 3000 ] || fail "the scrape took $ms ms with a 500 ms daemon timeout"
# the same through Prometheus while it is stopped
kill -STOP "$pid"
wait_promq 'cowsnap_up{disk="m41"}' 0 20
kill -CONT "$pid"
wait_promq 'cowsnap_up{disk="m41"}' 1 20
wait_promq 'up{job="cowsnap"}' 1

log "detach: the disk leaves the exposition"
ctl detach m41 >/dev/null || fail "detach"
once >"$T/once4.txt" || fail "metrics --once without disks"
grep -q 'disk="m41"' <(grep -v '^cowsnap_repo' "$T/once4.txt") && fail "a detached disk is still exposed"
promtool check metrics <"$T/once4.txt" >"$T/check.out" 2>&1 || fail "promtool check metrics (no disks): $(cat "$T/check.out")"
running "$EXP" || fail "the exporter died: $(cat "$T/exporter.log")"
running "$PROM" || fail "Prometheus died: $(tail -5 "$T/prometheus.log")"
log "PASS"
