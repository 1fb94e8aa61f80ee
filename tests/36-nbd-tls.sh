#!/usr/bin/env bash
# NBD over TCP with TLS (NBD_OPT_STARTTLS): certificates made with openssl; libnbd
# (nbdinfo, nbdcopy over nbds://) and qemu-img (tls-creds-x509) read and write the whole
# disk through TLS; plain nbd:// on the port is refused; --tls-verify-peer refuses a
# client without a certificate (or with one from another CA) and serves one with the
# client certificate; --listen tcp: without --tls-creds or --insecure-tcp is refused
# before anything is touched; the unix socket stays plain.
. "$(dirname "$0")/lib.sh"
need openssl nbdinfo nbdcopy qemu-img cmp sha256sum ss

# --- credentials: a CA, a server certificate for 127.0.0.1/localhost, a client
# certificate, and a client certificate from another CA
mk_ca() { # DIR NAME
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$1/ca-key.pem" -out "$1/ca-cert.pem" -days 2 -subj "/CN=$2" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    2>/dev/null
}
mk_cert() { # CA_DIR KEY CERT CN EXTENSIONS
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$2" \
    -out "$T/req.csr" -subj "/CN=$4" 2>/dev/null &&
  printf '%b' "$5" > "$T/ext.cnf" &&
  openssl x509 -req -in "$T/req.csr" -CA "$1/ca-cert.pem" -CAkey "$1/ca-key.pem" \
    -CAcreateserial -out "$3" -days 2 -extfile "$T/ext.cnf" 2>/dev/null
}
mkdir -p "$T/ca" "$T/ca2" "$T/srv" "$T/anon" "$T/cli" "$T/stranger"
mk_ca "$T/ca" "cowsnap test CA" && mk_ca "$T/ca2" "another CA" || fail "unable to make the test CAs"
mk_cert "$T/ca" "$T/srv/server-key.pem" "$T/srv/server-cert.pem" localhost \
  'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' ||
  fail "unable to make the server certificate"
mk_cert "$T/ca" "$T/cli/client-key.pem" "$T/cli/client-cert.pem" client \
  'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' ||
  fail "unable to make the client certificate"
mk_cert "$T/ca2" "$T/stranger/client-key.pem" "$T/stranger/client-cert.pem" stranger \
  'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' ||
  fail "unable to make the other CA's client certificate"
cp "$T/ca/ca-cert.pem" "$T/srv/" && cp "$T/ca/ca-cert.pem" "$T/anon/" &&
  cp "$T/ca/ca-cert.pem" "$T/cli/" && cp "$T/ca/ca-cert.pem" "$T/stranger/" || fail "cp"
chmod 600 "$T"/*/*-key.pem

port=$(( 20000 + RANDOM % 20000 ))
while ss -ltn | grep -q ":$port "; do port=$(( 20000 + RANDOM % 20000 )); done
SIZE=$((64 << 20))
truncate -s $SIZE "$T/o.img"
head -c $SIZE /dev/urandom > "$T/data"

listening() { ss -ltn | grep -q "127.0.0.1:$port "; }

# --- TCP without TLS is refused before anything is touched
log "--listen tcp: without --tls-creds is refused and leaves nothing behind"
out=$(ctl attach "$T/o.img" --name t36 --via none --listen "tcp:127.0.0.1:$port" 2>&1) &&
  fail "attach --listen without --tls-creds succeeded"
grep -q "needs TLS" <<<"$out" || fail "unclear refusal: $out"
[ -z "$(ls -A "$COWSNAP_RUN_DIR")" ] || fail "files left in the run dir: $(ls -A "$COWSNAP_RUN_DIR")"
[ -z "$(ls -A "$COWSNAP_STATE_DIR")" ] || fail "files left in the state dir: $(ls -A "$COWSNAP_STATE_DIR")"
listening && fail "something listens on $port after a refused attach"
pgrep -f "cowsnap-nbd --name t36" >/dev/null && fail "a daemon runs after a refused attach"
out=$("$NBD" --name t36 --origin "$T/o.img" --run-dir "$COWSNAP_RUN_DIR" --state-dir "$COWSNAP_STATE_DIR" \
  --listen "tcp:127.0.0.1:$port" 2>&1) && fail "the daemon served TCP without TLS"
grep -q "needs TLS" <<<"$out" || fail "unclear daemon refusal: $out"
out=$(ctl attach "$T/o.img" --name t36 --via none --listen "tcp:127.0.0.1:$port" --tls-creds "$T/anon" 2>&1) &&
  fail "attach with credentials lacking a server key succeeded"
grep -q "unable to read TLS credentials .*server-cert.pem" <<<"$out" || fail "unclear refusal: $out"
out=$(ctl attach "$T/o.img" --name t36 --via none --tls-creds "$T/srv" 2>&1) &&
  fail "attach --tls-creds without --listen succeeded"
grep -q "TCP listeners" <<<"$out" || fail "unclear refusal: $out"
[ -z "$(ls -A "$COWSNAP_RUN_DIR")" ] || fail "files left after refusals: $(ls -A "$COWSNAP_RUN_DIR")"
[ -z "$(ls -A "$COWSNAP_STATE_DIR")" ] || fail "state left after refusals: $(ls -A "$COWSNAP_STATE_DIR")"

# --- TLS without client certificates
log "attach with --tls-creds"
uri=$(ctl attach "$T/o.img" --name t36 --via none --listen "tcp:127.0.0.1:$port" --tls-creds "$T/srv" | tail -n 1) ||
  fail "attach --tls-creds"
listening || fail "nothing listens on 127.0.0.1:$port"
tls="nbds://127.0.0.1:$port/t36?tls-certificates=$T/anon"
size=$(nbdinfo --size "$tls") || fail "nbdinfo over TLS"
[ "$size" = $SIZE ] || fail "size over TLS: $size"
nbdinfo "$tls" | grep -q "newstyle-fixed with TLS" || fail "nbdinfo does not report TLS: $(nbdinfo "$tls")"
if nbdinfo --size "nbd://127.0.0.1:$port/t36" >"$T/plain.out" 2>&1; then
  fail "plain nbd:// was served on a TLS port"
fi
grep -qi "tls" "$T/plain.out" || fail "plain client refused without a TLS reason: $(cat "$T/plain.out")"
nbdinfo --size "$uri" >/dev/null || fail "the unix socket is not plain NBD any more"

log "nbdcopy the whole disk in and out over TLS"
nbdcopy "$T/data" "$tls" || fail "nbdcopy to nbds://"
nbdcopy "$tls" "$T/back" || fail "nbdcopy from nbds://"
[ "$(sha256sum < "$T/data")" = "$(sha256sum < "$T/back")" ] || fail "nbdcopy over TLS read back other data"

log "qemu-img over TLS"
qobj="tls-creds-x509,id=tls0,endpoint=client,dir=$T/anon"
qimg="driver=nbd,host=127.0.0.1,port=$port,export=t36,tls-creds=tls0"
qemu-img info --object "$qobj" --image-opts "$qimg" >"$T/qinfo" 2>&1 || fail "qemu-img info: $(cat "$T/qinfo")"
grep -q "virtual size: 64 MiB" "$T/qinfo" || fail "qemu-img info: $(cat "$T/qinfo")"
head -c $SIZE /dev/urandom > "$T/data2"
qemu-img convert -n -f raw "$T/data2" --object "$qobj" --target-image-opts "$qimg" ||
  fail "qemu-img convert into the export"
qemu-img convert --object "$qobj" --image-opts "$qimg" -O raw "$T/qback" || fail "qemu-img convert from the export"
[ "$(sha256sum < "$T/data2")" = "$(sha256sum < "$T/qback")" ] || fail "qemu-img over TLS read back other data"
ctl detach t36 || fail "detach"
listening && fail "TCP port still open after detach"
[ "$(sha256sum < "$T/data2")" = "$(sha256sum < "$T/o.img")" ] || fail "the origin does not hold what was written over TLS"

# --- TLS with client certificates
log "--tls-verify-peer: only clients with a certificate of the CA"
ctl attach "$T/o.img" --name v36 --via none --read-only --listen "tcp:127.0.0.1:$port" \
  --tls-creds "$T/srv" --tls-verify-peer >/dev/null || fail "attach --tls-verify-peer"
nbdinfo --size "nbds://127.0.0.1:$port/v36?tls-certificates=$T/anon" >/dev/null 2>&1 &&
  fail "a client without a certificate was served"
nbdinfo --size "nbds://127.0.0.1:$port/v36?tls-certificates=$T/stranger" >/dev/null 2>&1 &&
  fail "a client with another CA's certificate was served"
size=$(nbdinfo --size "nbds://127.0.0.1:$port/v36?tls-certificates=$T/cli") || fail "client with a certificate refused"
[ "$size" = $SIZE ] || fail "size with a client certificate: $size"
nbdcopy "nbds://127.0.0.1:$port/v36?tls-certificates=$T/cli" "$T/back3" || fail "nbdcopy with a client certificate"
[ "$(sha256sum < "$T/data2")" = "$(sha256sum < "$T/back3")" ] || fail "read back other data with a client certificate"
qemu-img info --object "tls-creds-x509,id=tls0,endpoint=client,dir=$T/anon" \
  --image-opts "driver=nbd,host=127.0.0.1,port=$port,export=v36,tls-creds=tls0" >/dev/null 2>&1 &&
  fail "qemu without a client certificate was served"
qemu-img info --object "tls-creds-x509,id=tls0,endpoint=client,dir=$T/cli" \
  --image-opts "driver=nbd,host=127.0.0.1,port=$port,export=v36,tls-creds=tls0" >"$T/qinfo" 2>&1 ||
  fail "qemu with the client certificate: $(cat "$T/qinfo")"
st=$(ctl status v36 --json) || fail "status after refused clients"
ctl detach v36 || fail "detach v36"
log "PASS"
