#!/usr/bin/env bash
# Backup under heavy NBD write load, through the daemon (issue 3):
#  A. a 1 GiB random disk (--via none), container ram:8M, fio (nbd engine, 3 jobs,
#     randwrite 4k..256k, iodepth 16) writing through the whole backup. The writers are
#     paused (SIGSTOP, then the daemon's write counter must stand still) while the origin
#     is copied — the copy is the disk at the snapshot instant — and resumed as soon as
#     the backup is "running". The image must equal that copy, throttling and holds must
#     have happened, fio must end without an error, and the disk still reads back writes.
#  B. no pause: python3-libnbd writers stamp every 4 KiB sector (offset, seq, crc) and log
#     submit/ack times; the image is checked sector by sector against "acknowledged
#     before the backup was sent → in the image (or newer)", "submitted after it was
#     running → not in the image" and one common instant; the live disk keeps every write.
. "$(dirname "$0")/lib.sh"
need fio qemu-io cmp /usr/bin/python3
/usr/bin/python3 -c 'import nbd' 2>/dev/null || skip "python3-libnbd is not installed (/usr/bin/python3 -c 'import nbd')"
fio --enghelp=nbd >/dev/null 2>&1 || skip "fio has no nbd engine"

SIZE=$((1 << 30))
writes() { ctl status "$1" --json | jq -r .daemon.stats.writes; }
bstate() { ctl status "$1" --json | jq -r '.daemon.backup.state // "none"'; }

log "A: 1 GiB random disk, fio load, paused copy at the snapshot instant"
head -c $SIZE /dev/urandom > "$T/disk.img" || fail "create the disk"
uri=$(ctl attach "$T/disk.img" --name t21 --via none | tail -n 1) || fail "attach"
FIO_SECS=${T21_FIO_SECS:-25}
fio --name=load --ioengine=nbd --uri="$uri" --rw=randwrite --bsrange=4k-256k --iodepth=16 \
  --numjobs=3 --thread --group_reporting --time_based --runtime="$FIO_SECS" \
  --output-format=json --output="$T/fio.json" >"$T/fio.out" 2>&1 &
FIO=$!; EXTRA_PIDS+=("$FIO")
sleep 3
running "$FIO" || fail "fio stopped early: $(cat "$T/fio.out")"
kill -STOP "$FIO"
prev=-1; cur=$(writes t21)
for _ in $(seq 100); do
  [ "$cur" = "$prev" ] && break
  sleep 0.3; prev=$cur; cur=$(writes t21)
done
[ "$cur" = "$prev" ] || fail "the write counter never stood still with fio stopped"
log "writers paused after $cur writes; copying the origin"
cp --sparse=never "$T/disk.img" "$T/copy.img" || fail "copy the origin"
[ "$(writes t21)" = "$cur" ] || fail "writes arrived while fio was stopped"
t0=$(date +%s.%N)
"$CTL" backup t21 --to "file:$T/image.img" --container ram:8M --quiesce-idle 0s --json \
  >"$T/backup.json" 2>"$T/backup.err" &
BK=$!; EXTRA_PIDS+=("$BK")
st=none
for _ in $(seq 500); do
  st=$(bstate t21); [ "$st" = running ] || [ "$st" = complete ] || [ "$st" = failed ] && break
  sleep 0.01
done
kill -CONT "$FIO"
[ "$st" = running ] || fail "backup did not reach running (state $st): $(cat "$T/backup.err")"
log "backup running, fio resumed"
wait "$BK"; brc=$?
t1=$(date +%s.%N)
running "$FIO" && fio_through=yes || fio_through=no
w_end=$(writes t21)
log "backup exit $brc after $(printf %.1f "$(echo "$t1 - $t0" | bc)") s; fio still running at its end: $fio_through; $((w_end - cur)) writes meanwhile"
[ "$brc" = 0 ] || fail "backup failed: $(cat "$T/backup.err")"
[ "$fio_through" = yes ] || fail "fio ended before the backup did: raise T21_FIO_SECS"
[ $((w_end - cur)) -gt 1000 ] || fail "only $((w_end - cur)) writes during the backup"
wait "$FIO"; frc=$?
[ "$frc" = 0 ] || fail "fio exited $frc: $(tail -n 5 "$T/fio.out")"
# the nbd engine prints "connected" lines into the output file before the JSON
fj=$(sed -n '/^{/,$p' "$T/fio.json")
[ "$(json_field "$fj" '.jobs[0].error')" = 0 ] || fail "fio reports an error: $(json_field "$fj" .jobs[0].error)"
log "fio: $(json_field "$fj" '.jobs[0].write.iops | floor') write IOPS over ${FIO_SECS}s, no error"
[ ! -e "$T/image.img.incomplete" ] || fail "image still marked incomplete"
cmp "$T/copy.img" "$T/image.img" || fail "image differs from the disk at the snapshot instant"
log "image == copy at the snapshot instant"
b=$(ctl status t21 --json | jq .daemon.backup)
log "figures: $(echo "$b" | jq -c '{chunks_preserved, holds, hold_time_ms, throttled_writes, throttle_delay_ms, container_high_water, container_slots}')"
[ "$(json_field "$b" .state)" = complete ] || fail "status: $b"
[ "$(json_field "$b" .holds)" -gt 0 ] || fail "no write was held: $b"
[ "$(json_field "$b" .throttled_writes)" -gt 0 ] || fail "no write was throttled: $b"
hw=$(json_field "$b" .container_high_water); cap=$(json_field "$b" .container_slots)
[ "$cap" = 128 ] || fail "ram:8M should have 128 slots of 64 KiB: $b"
[ $((hw * 4)) -ge $((cap * 3)) ] || fail "container high-water $hw/$cap never reached 75% (the throttle watermark)"
[ "$(ctl status t21 --json | jq .daemon.stats.errors)" = 0 ] || fail "the daemon counted request errors"
qemu-io -f raw "$uri" -c "write -P 0xa5 $((SIZE - (1 << 20))) 1M" -c "read -P 0xa5 $((SIZE - (1 << 20))) 1M" \
  -c "write -P 0x3c 12345678 70000" -c "read -P 0x3c 12345678 70000" >"$T/qio" 2>&1 ||
  fail "write+read after the backup: $(cat "$T/qio")"
grep -q "Pattern verification failed" "$T/qio" && fail "read back differs: $(cat "$T/qio")"
ctl detach t21 || fail "detach"
rm -f "$T/copy.img" "$T/image.img"

log "B: stamped sectors from 4 python3-libnbd writers, no pause"
head -c $SIZE /dev/urandom > "$T/disk.img" || fail "create the disk"
cp "$T/disk.img" "$T/orig.img"
uri=$(ctl attach "$T/disk.img" --name t21b --via none | tail -n 1) || fail "attach"
timeout 300 /usr/bin/python3 "$ROOT/tests/stamp.py" nbd "$uri" "$CTL" t21b "$T/orig.img" "$T/image.img" 4 2 1 ||
  fail "stamped-sector check"
[ ! -e "$T/image.img.incomplete" ] || fail "image still marked incomplete"
ctl detach t21b || fail "detach"
log "PASS"
