#!/usr/bin/env bash
# NBD conformance: the shared battery (nbd-conformance.sh, strict mode) against a
# read-write export and a read-only export of the cowsnap-nbd server, once per I/O
# engine (uring, sync). Exit 0 pass, 77 skip, else fail.
# Env: COWSNAP_NBD_BIN (server binary), COWSNAP_BIN_DIR, COWSNAP_SHARED_DIR (folder
#      holding nbd-conformance.sh; default: the "shared" folder beside the repository).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${COWSNAP_SHARED_DIR:-$ROOT/../shared}
CONF=$SHARED/nbd-conformance.sh
BIN=${COWSNAP_NBD_BIN:-${COWSNAP_BIN_DIR:-$ROOT/target/release}/cowsnap-nbd}
[ -f "$CONF" ] || { echo "SKIP: conformance battery not found at $CONF"; exit 77; }
for t in nbdinfo qemu-io nbdcopy fio; do
  command -v "$t" >/dev/null || { echo "SKIP: $t is not installed"; exit 77; }
done
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import nbd' 2>/dev/null ||
  { echo "SKIP: python3-libnbd is not installed"; exit 77; }
[ -x "$BIN" ] || { echo "FAIL: no server binary at $BIN"; exit 1; }

W=$(mktemp -d /tmp/cowsnap-nbdconf.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
  rm -rf "$W"
}
trap cleanup EXIT

# start NAME ENGINE [--read-only]: serve $W/NAME.img on $W/run/NAME.nbd; 0 when serving
start() {
  local name=$1 eng=$2; shift 2
  "$BIN" --name "$name" --origin "$W/$name.img" --run-dir "$W/run" --io-engine "$eng" "$@" \
    >"$W/$name.log" 2>&1 &
  local pid=$!; PIDS+=("$pid")
  for _ in $(seq 100); do
    [ -S "$W/run/$name.nbd" ] && nbdinfo --can connect "nbd+unix:///$name?socket=$W/run/$name.nbd" 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "server for $name ($eng) did not start:"; cat "$W/$name.log"; return 1
}
stop_all() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
  PIDS=()
}

failed=0 ran=0
for eng in uring sync; do
  echo "== io engine $eng"
  rm -rf "$W/run" "$W"/*.img
  truncate -s 256M "$W/rw-$eng.img" "$W/ro-$eng.img"
  head -c 1M /dev/urandom | dd of="$W/ro-$eng.img" conv=notrunc status=none
  if ! start "rw-$eng" "$eng"; then
    if [ "$eng" = uring ] && grep -q "io_uring" "$W/rw-$eng.log"; then
      echo "SKIP engine uring: io_uring is not available here"; stop_all; continue
    fi
    failed=$((failed+1)); stop_all; continue
  fi
  start "ro-$eng" "$eng" --read-only || { failed=$((failed+1)); stop_all; continue; }
  ro_sum=$(sha256sum <"$W/ro-$eng.img")
  NBDCONF_STRICT=1 NBDCONF_RO_URI="nbd+unix:///ro-$eng?socket=$W/run/ro-$eng.nbd" \
    bash "$CONF" "nbd+unix:///rw-$eng?socket=$W/run/rw-$eng.nbd" >"$W/conf-$eng.out" 2>&1
  rc=$?
  grep -E '^(FAIL|SKIP|WARN) ' "$W/conf-$eng.out"
  summary=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$W/conf-$eng.out" | tail -n1)
  echo "conformance ($eng): ${summary:-no summary}"
  ran=$((ran+1))
  if [ "$rc" != 0 ] || [ -z "$summary" ] || ! [[ "$summary" =~ ^[0-9]+\ passed,\ 0\ failed ]]; then
    failed=$((failed+1)); tail -n 20 "$W/conf-$eng.out"
  fi
  # The read-only export's file must be untouched.
  if [ "$(sha256sum <"$W/ro-$eng.img")" != "$ro_sum" ]; then
    echo "FAIL: the read-only export's file changed ($eng)"; failed=$((failed+1))
  fi
  stop_all
done
[ "$ran" -gt 0 ] || { echo "FAIL: no engine ran"; exit 1; }
[ "$failed" = 0 ] || { echo "FAIL: $failed conformance run(s) failed"; exit 1; }
echo "PASS: NBD conformance, $ran engine(s)"
