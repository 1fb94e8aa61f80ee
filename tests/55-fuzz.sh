#!/usr/bin/env bash
# Fuzzing, short run: builds the cargo-fuzz targets in fuzz/ (Rust nightly) and runs
# each one for COWSNAP_FUZZ_SECS seconds (default 15), starting from the seed corpus
# committed in fuzz/corpus/<target>/. Any crash, panic, leak, timeout or out-of-memory
# fails the test and leaves the input in fuzz/artifacts/<target>/.
# Skips (77) when Rust nightly or cargo-fuzz is absent (scripts/setup.sh installs
# cargo-fuzz when nightly is there).
. "$(dirname "$0")/lib.sh"
export PATH=$HOME/.cargo/bin:$PATH

cargo +nightly --version >/dev/null 2>&1 ||
  skip "Rust nightly is not installed (rustup toolchain install nightly); fuzzing needs it"
cargo +nightly fuzz --version >/dev/null 2>&1 ||
  skip "cargo-fuzz is not installed (cargo +nightly install cargo-fuzz --locked)"

SECS=${COWSNAP_FUZZ_SECS:-15}
cd "$ROOT/fuzz" || fail "no fuzz/ directory"
# The chunk and change-log targets keep their files under TMPDIR: a private one, on
# tmpfs where there is one (they fsync on every input).
FUZZ_TMP=$T/tmp
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
  FUZZ_TMP=$(mktemp -d /dev/shm/cowsnap-fuzz.XXXXXX) || fail "unable to create a directory in /dev/shm"
  trap 'rc=$?; rm -rf "$FUZZ_TMP"; (exit $rc); cleanup' EXIT
fi
mkdir -p "$FUZZ_TMP"
export TMPDIR=$FUZZ_TMP

log "building the fuzz targets (nightly, AddressSanitizer)"
start=$(date +%s)
nice -n 10 cargo +nightly fuzz build -O >"$T/build.log" 2>&1 ||
  { tail -n 30 "$T/build.log"; fail "unable to build the fuzz targets"; }
log "built in $(( $(date +%s) - start ))s"

targets=$(cargo +nightly fuzz list) || fail "unable to list the fuzz targets"
[ -n "$targets" ] || fail "no fuzz targets"
for t in $targets; do
  [ -n "$(ls -A "corpus/$t" 2>/dev/null)" ] || fail "target $t has no seed corpus in fuzz/corpus/$t"
  mkdir -p "$T/corpus/$t"
  extra=()
  # A whole connection ends on a detached server thread, which may still be exiting
  # when the next input starts: the per-input leak check would report its TLS.
  [ "$t" = nbd_session ] && extra=(-detect_leaks=0)
  # New inputs go to the private corpus; the committed seeds are only read.
  if ! cargo +nightly fuzz run -O "$t" "$T/corpus/$t" "corpus/$t" -- \
      -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      "${extra[@]}" >"$T/$t.log" 2>&1; then
    tail -n 40 "$T/$t.log"
    fail "fuzz target $t crashed (input saved under fuzz/artifacts/$t/)"
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$T/$t.log" | tail -n 1)
  [ "${runs:-0}" -gt 0 ] || { tail -n 20 "$T/$t.log"; fail "fuzz target $t ran no inputs"; }
  log "PASS $t: $runs executions in ${SECS}s, no crash"
done
log "all fuzz targets ran without a crash"
