#!/usr/bin/env bash
# --via none: the daemon serves the URI it prints; data written with nbdcopy lands in the
# origin file after detach; both export names ("NAME" and the default "") work; a
# --read-only attach refuses writes; status counts the I/O.
. "$(dirname "$0")/lib.sh"
need nbdcopy nbdinfo cmp

truncate -s 256M "$T/o.img"
head -c $((32 << 20)) /dev/urandom > "$T/data"
uri=$(ctl attach "$T/o.img" --name n12 --via none | tail -n 1) || fail "attach --via none"
[ "$uri" = "nbd+unix:///n12?socket=$COWSNAP_RUN_DIR/n12.nbd" ] || fail "unexpected URI $uri"
size=$(nbdinfo --size "$uri") || fail "nbdinfo on $uri"
[ "$size" = $((256 << 20)) ] || fail "export size $size"
nbdinfo --size "nbd+unix:///?socket=$COWSNAP_RUN_DIR/n12.nbd" >/dev/null || fail "default export \"\" not served"

log "nbdcopy 32 MiB into the export"
nbdcopy "$T/data" "$uri" || fail "nbdcopy to the export"
nbdcopy "$uri" "$T/back" || fail "nbdcopy from the export"
cmp -n $((32 << 20)) "$T/data" "$T/back" || fail "read back differs"
st=$(ctl status n12 --json)
[ "$(json_field "$st" .daemon.stats.bytes_written)" -ge $((32 << 20)) ] || fail "bytes_written: $st"
[ "$(json_field "$st" .daemon.stats.bytes_read)" -ge $((32 << 20)) ] || fail "bytes_read: $st"
ctl detach n12 || fail "detach"
cmp -n $((32 << 20)) "$T/data" "$T/o.img" || fail "origin does not hold the written data"

log "read-only attach refuses writes"
uri=$(ctl attach "$T/o.img" --name r12 --via none --read-only | tail -n 1) || fail "attach --read-only"
[ "$(nbdinfo --can write "$uri"; echo $?)" != 0 ] || fail "read-only export says it can write"
nbdcopy "$T/data" "$uri" 2>/dev/null && fail "write to a read-only export succeeded"
nbdcopy "$uri" "$T/back2" || fail "read from the read-only export"
cmp -n $((32 << 20)) "$T/data" "$T/back2" || fail "read-only export shows other data"
ctl detach r12 || fail "detach r12"
log "PASS"
