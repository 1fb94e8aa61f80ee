#!/usr/bin/env bash
# pgbench TPS on a cowsnap-attached disk without a backup and during online backups
# (full, then incremental, into a repository), and the backups' durations, in one run.
# Runs tests/40-postgres.sh (which also checks every restore) and prints its figures.
#   scripts/bench-pg.sh [SCALE (20)] [SECONDS (60)]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mktemp /tmp/cowsnap-pg-bench.XXXXXX.jsonl)
trap 'rm -f "$OUT"' EXIT
PG_SCALE=${1:-20} PG_SECONDS=${2:-60} PG_RESULTS=$OUT bash "$ROOT/tests/40-postgres.sh" >&2
echo "| fs | pgbench TPS, no backup | TPS during full + incremental backups | ratio | full backup (s) | incremental (s) |"
echo "|---|---|---|---|---|---|"
jq -r '"| \(.fs) | \(.tps_base | floor) | \(.tps_during | floor) | \((.tps_during / .tps_base * 100 | floor) / 100)× | \(.full_s * 10 | floor / 10) | \(.incr_s * 10 | floor / 10) |"' "$OUT"
