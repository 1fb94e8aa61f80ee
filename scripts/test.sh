#!/usr/bin/env bash
# The test command: installs what the tests need, builds, runs unit tests, then every
# end-to-end test in tests/ (tests/NN-*.sh; exit 0 = pass, 77 = skip, else fail).
#   scripts/test.sh            everything
#   scripts/test.sh --unit     cargo tests only
#   scripts/test.sh PATTERN    only end-to-end tests whose file name contains PATTERN
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
ONLY=${1:-}

bash scripts/setup.sh || { echo "setup failed"; exit 1; }
export PATH=$HOME/.cargo/bin:$PATH

echo "== build"
cargo build --release --workspace --bins || { echo "0 passed, 1 failed"; exit 1; }
export COWSNAP_BIN_DIR=$ROOT/target/release

pass=0 fail=0 skip=0 failed=()
if [ -z "$ONLY" ] || [ "$ONLY" = --unit ]; then
  echo "== cargo fmt / clippy"
  if cargo fmt --all -- --check >/dev/null; then pass=$((pass+1)); echo "PASS fmt"; else fail=$((fail+1)); failed+=(fmt); echo "FAIL fmt"; fi
  if cargo clippy --workspace --all-targets -- -D warnings 2>&1 | tail -3; [ "${PIPESTATUS[0]}" = 0 ]; then
    pass=$((pass+1)); echo "PASS clippy"; else fail=$((fail+1)); failed+=(clippy); echo "FAIL clippy"; fi
  echo "== unit tests"
  if cargo test --release --workspace 2>&1 | tee /tmp/cowsnap-unit.log | grep -E '^test result|FAILED|panicked'; [ "${PIPESTATUS[0]}" = 0 ]; then
    pass=$((pass+1)); echo "PASS cargo-test"; else fail=$((fail+1)); failed+=(cargo-test); echo "FAIL cargo-test"; fi
fi
if [ "$ONLY" != --unit ]; then
  for t in tests/[0-9]*.sh; do
    [ -e "$t" ] || continue
    [ -n "$ONLY" ] && [[ "$t" != *"$ONLY"* ]] && continue
    echo "== $t"
    start=$(date +%s)
    timeout 1800 bash "$t"; rc=$?
    dur=$(( $(date +%s) - start ))
    case $rc in
      0) pass=$((pass+1)); echo "PASS $t (${dur}s)";;
      77) skip=$((skip+1)); echo "SKIP $t (${dur}s)";;
      *) fail=$((fail+1)); failed+=("$t"); echo "FAIL $t rc=$rc (${dur}s)";;
    esac
  done
fi
[ ${#failed[@]} -gt 0 ] && echo "failed: ${failed[*]}"
echo "$pass passed, $fail failed, $skip skipped"
[ "$fail" = 0 ]
