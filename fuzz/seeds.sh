#!/usr/bin/env bash
# Regenerates the seed corpus in fuzz/corpus/<target>/ (committed; small files).
# Repository and change-log seeds come from the project's own writers: a 2 MiB disk
# attached with the real daemon (--via none), written through NBD, backed up to a
# repository twice (full, incremental); its index files, chunk files and change log
# are copied. Disk: compressible, so the chunk files stay small. Protocol seeds (NBD client bytes, control lines) are written here.
# Needs root, built binaries (COWSNAP_BIN_DIR or target/release) and python3-libnbd.
#   bash fuzz/seeds.sh
. "$(dirname "$0")/../tests/lib.sh"
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import nbd' 2>/dev/null || skip "python3-libnbd is not installed"
C=$ROOT/fuzz/corpus
rm -rf "$C"
mkdir -p "$C"/{nbd_request,handshake,nbd_session,control,index,chunk,changelog}

log "a 2 MiB disk, backed up twice with writes in between"
# Compressible content (small chunk files): text lines, then 4 KiB of random bytes in a
# MiB of zeros, then a zero tail.
/usr/bin/python3 -c '
import os, sys
t = b"".join(b"cowsnap fuzz seed line %06d\n" % i for i in range(40000))[: 1 << 20]
z = bytearray(1 << 20); z[:4096] = os.urandom(4096)
sys.stdout.buffer.write(t + bytes(z) + bytes(65536))' > "$T/d.img"
uri=$(ctl attach "$T/d.img" --name fz --via none --chunk-size 64K | tail -n 1) || fail "attach"
ctl backup fz --to "repo:$T/repo" --quiesce-idle 0 >/dev/null || fail "full backup"
/usr/bin/python3 - "$uri" <<'PY' || fail "writes"
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
h.pwrite(b"\x5a" * 4096, 0); h.pwrite(b"cowsnap" * 100, 300000); h.zero(65536, 131072)
h.flush(); h.shutdown()
PY
cp "$COWSNAP_STATE_DIR"/fz/changelog.bin "$T/cl-marked.bin" 2>/dev/null ||
  cp "$(find "$COWSNAP_STATE_DIR" -name changelog.bin | head -n 1)" "$T/cl-marked.bin" || fail "no change log"
ctl backup fz --to "repo:$T/repo" --incremental --quiesce-idle 0 >/dev/null || fail "incremental backup"
ctl detach fz >/dev/null || fail "detach"
cp "$(find "$COWSNAP_STATE_DIR" -name changelog.bin | head -n 1)" "$T/cl-clean.bin" || fail "no change log"

/usr/bin/python3 - "$C" "$T" <<'PY' || fail "writing seeds"
import glob, os, struct, sys
C, T = sys.argv[1], sys.argv[2]
def put(target, name, data):
    with open(os.path.join(C, target, name), "wb") as f:
        f.write(data)

# Repository files: mode byte + the file (see each target's header comment).
for i, p in enumerate(sorted(glob.glob(T + "/repo/**/*.idx", recursive=True))):
    b = open(p, "rb").read()
    put("index", "index-%d" % i, b"\x00" + b)
    put("index", "index-%d-fixup" % i, b"\x03" + b)
chunks = sorted(glob.glob(T + "/repo/chunks/*/*"), key=os.path.getsize)
for i, p in enumerate(chunks[:3]):
    b = open(p, "rb").read()
    put("chunk", "chunk-%d" % i, b"\x01" + b)
    put("chunk", "chunk-%d-raw-hash" % i, b"\x05" + b)
put("chunk", "store-and-read", b"\x08" + b"some chunk data " * 64)
put("chunk", "raw-chunk", b"\x01" + b"CSCK\x01\x00\x00\x00" + struct.pack("<II", 5, 5) + b"hello")
for n in ("cl-marked", "cl-clean"):
    b = open(T + "/" + n + ".bin", "rb").read()
    put("changelog", n, b"\x00" + b)
    put("changelog", n + "-commit", b"\x03" + b)
    put("changelog", n + "-abort", b"\x05" + b)
put("changelog", "empty", b"\x00")

# NBD client bytes.
IHAVEOPT = 0x49484156454F5054
def opt(o, d=b""):
    return struct.pack(">QII", IHAVEOPT, o, len(d)) + d
def name(n):
    return struct.pack(">I", len(n)) + n
def info(n, infos):
    return name(n) + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)
def meta(n, qs):
    return name(n) + struct.pack(">I", len(qs)) + b"".join(name(q) for q in qs)
def req(cmd, off, ln, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQI", 0x25609513, flags, cmd, cookie, off, ln) + payload
go_disk = (struct.pack(">I", 3) + opt(8) + opt(10, meta(b"disk", [b"base:allocation"]))
           + opt(7, info(b"disk", [1, 2, 3])))
io = (req(1, 0, 512, payload=b"\xab" * 512) + req(0, 0, 512, cookie=2)
      + req(7, 0, 65536, cookie=3) + req(7, 0, 65536, flags=8, cookie=4)
      + req(4, 4096, 4096, cookie=5) + req(6, 8192, 4096, flags=2, cookie=6)
      + req(6, 8192, 4096, flags=16, cookie=7) + req(3, 0, 0, cookie=8)
      + req(5, 0, 65536, cookie=9) + req(0, 65536, 1000, flags=4, cookie=10)
      + req(0, 66000, 4096, cookie=11) + req(2, 0, 0, cookie=12))
hs = {
    "go-structured": go_disk,
    "list-info-export-name": struct.pack(">I", 1) + opt(3) + opt(6, info(b"", [])) + opt(1, b"disk"),
    "meta-tls-abort": struct.pack(">I", 3) + opt(9, meta(b"", [])) + opt(8) + opt(9, meta(b"disk", [b"base:"]))
                      + opt(5) + opt(11) + opt(42, b"x") + opt(2),
    "go-read-only": struct.pack(">I", 3) + opt(7, info(b"ro", [])),
    "bad-options": struct.pack(">I", 3) + opt(7, b"\x00\x00\x10\x00") + opt(10, meta(b"disk", [b"base:allocation"]))
                   + opt(3, b"x") + opt(7, info(b"nope", [])) + opt(6, info(b"disk", [0, 1, 2, 3, 99])),
}
for k, v in hs.items():
    put("handshake", k, v)
put("nbd_session", "structured-io", go_disk + io)
put("nbd_session", "simple-io", struct.pack(">I", 1) + opt(1, b"disk") + b"\x00" * 0 + io)
put("nbd_session", "read-only-writes", struct.pack(">I", 3) + opt(7, info(b"ro", []))
    + req(1, 0, 16, payload=b"x" * 16) + req(4, 0, 512) + req(0, 0, 512) + req(2, 0, 0))
put("nbd_session", "bad-magic", go_disk + b"\x00" * 28)

# nbd_request: view (size u64, tflags u16, structured, base_allocation) + headers.
view = struct.pack(">QHBB", 66536, 0x0ded, 1, 1)
put("nbd_request", "structured-view", view + io)
put("nbd_request", "read-only-view", struct.pack(">QHBB", 1 << 20, 0x0403, 0, 0) + io)
put("nbd_request", "overflow", view + req(0, (1 << 64) - 512, 1024) + req(1, 0, 1 << 31))

# Control lines (requests and replies).
lines = [
    b'{"v":1,"cmd":"status"}', b'{"v":1,"cmd":"flush"}', b'{"v":1,"cmd":"shutdown"}',
    b'{"v":1,"cmd":"backup_status"}', b'{"v":1,"cmd":"cancel"}',
    b'{"v":1,"cmd":"priority","ranges":[[0,1048576],[4096,512]]}',
    b'{"v":1,"cmd":"backup","params":{"to":"repo:/srv/backup","container":"ram:64M",'
    b'"incremental":true,"priority":[[0,65536]],"rate_limit":104857600,'
    b'"quiesce_idle_ms":200,"quiesce_timeout_ms":80000}}',
    b'{"v":1,"cmd":"backup","params":{"to":"file:/tmp/x.img","container":"file:/var/c.cow:1G","rate_limit":null}}',
    b'{"v":2,"cmd":"status"}', b'{"cmd":"status"}', b'[1,2]',
    b'{"v":1,"ok":true,"id":1}', b'{"v":1,"ok":false,"error":"unable to start a backup: one is running"}',
    b'{"v":1,"ok":true,"backup":null}',
]
for i, l in enumerate(lines):
    put("control", "line-%02d" % i, l + b"\n")
PY
log "seeds written to $C: $(find "$C" -type f | wc -l) files, $(du -sh "$C" | cut -f1)"
