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

# ext_headers_probe SOCKET: send NBD_OPT_EXTENDED_HEADERS (11) in a fixed-newstyle
# handshake; the reply must be ACK (1) or ERR_UNSUP (2^31+1), and the server must still
# answer the next option (NBD_OPT_LIST) and end on NBD_OPT_ABORT.
ext_headers_probe() {
  /usr/bin/python3 - "$1" <<'PY'
import socket, struct, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])
def rd(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: raise SystemExit("FAIL ext_headers_probe: connection closed")
        b += c
    return b
magic, opt_magic, hflags = struct.unpack(">QQH", rd(18))
assert magic == 0x4e42444d41474943 and opt_magic == 0x49484156454F5054, "bad greeting"
s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
def opt(o):
    s.sendall(struct.pack(">QII", 0x49484156454F5054, o, 0))
def reply():
    m, o, t, l = struct.unpack(">QIII", rd(20)); rd(l)
    assert m == 0x3e889045565a9, "bad reply magic"
    return o, t
opt(11)
o, ext = reply()
if o != 11 or ext not in (1, 0x80000001):
    raise SystemExit(f"FAIL ext_headers_probe: option {o} reply type {ext}")
opt(3)  # LIST: negotiation goes on
while True:
    o, t = reply()
    if o != 3: raise SystemExit(f"FAIL ext_headers_probe: reply for option {o} to LIST")
    if t == 1: break
    if t != 2: raise SystemExit(f"FAIL ext_headers_probe: LIST reply type {t}")
opt(2)  # ABORT
print(f"PASS ext_headers_probe: NBD_OPT_EXTENDED_HEADERS answered with {'ACK' if ext == 1 else 'ERR_UNSUP'}; negotiation went on")
PY
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
  nfail=$(grep -cE '^FAIL ' "$W/conf-$eng.out") probed=0
  if [ "$nfail" = 1 ] && grep -q '^FAIL qemu_ext_headers_ack_or_unsup ' "$W/conf-$eng.out" &&
     ! grep -q 'option reply 11 ' "$W/conf-$eng.out"; then
    # This machine's qemu never offers NBD_OPT_EXTENDED_HEADERS (Debian 12 ships qemu
    # 7.2; the option came with 8.2), so the battery's check saw no reply to judge.
    # The property it checks — the server answers the option with ACK or ERR_UNSUP and
    # negotiation goes on — is probed here directly on the wire instead.
    echo "NOTE: qemu $(qemu-img --version | head -n1 | awk '{print $3}') does not offer extended headers; probing NBD_OPT_EXTENDED_HEADERS directly"
    if ext_headers_probe "$W/run/rw-$eng.nbd"; then
      nfail=0 probed=1
    fi
  fi
  # the battery's own verdict, less the one check probed directly above
  if [ -z "$summary" ] || [ "$nfail" != 0 ] ||
     ! [[ "$summary" =~ ^[0-9]+\ passed,\ $probed\ failed ]] ||
     { [ "$rc" != 0 ] && [ "$probed" = 0 ]; }; then
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
