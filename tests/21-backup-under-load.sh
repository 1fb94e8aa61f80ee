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
[ $((hw * 4)) -gt $((cap * 3)) ] || fail "container high-water $hw/$cap never passed 75%"
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
cat >"$T/stamp.py" <<'PY'
#!/usr/bin/python3
# Stamped-sector writers against a cowsnap disk during `cowsnapctl backup`, then the
# checks of the image and of the live disk. Used by tests/21-backup-under-load.sh.
#
#   21-stamp-writer.py URI CTL NAME ORIGINAL_COPY IMAGE [THREADS] [SECONDS_BEFORE] [SECONDS_AFTER]
#
# Every written 4 KiB sector carries (magic, offset, sequence, writer, crc). Each writer
# thread owns the 1 MiB regions r with r % THREADS == its id and issues one write at a
# time (1..16 sectors, across chunk edges; sometimes the disk's last sector), so the
# writes to one sector are totally ordered by their sequence numbers. For every write
# the submit and acknowledge times (CLOCK_MONOTONIC) are logged.
# t_send: just before the backup command is started; t_run: once `status` shows the
# backup "running" (after the snapshot instant). For each sector of the image:
#   - a valid stamp of this sector, or the original bytes;
#   - not older than the last write acknowledged before t_send;
#   - not a write submitted after t_run;
#   - one instant for all sectors: max(submit of the writes in the image) <
#     min(ack of the first write after them) — the image is the disk at one point.
# Then every written sector of the live disk must hold its last acknowledged write.
import json
import random
import struct
import subprocess
import sys
import threading
import time
import zlib

import nbd

SECTOR = 4096
REGION = 256  # sectors per region (1 MiB)
MAGIC = b"COWSTAMP"

uri, ctl, name, orig_path, img_path = sys.argv[1:6]
nthreads = int(sys.argv[6]) if len(sys.argv) > 6 else 4
before_s = float(sys.argv[7]) if len(sys.argv) > 7 else 2.0
after_s = float(sys.argv[8]) if len(sys.argv) > 8 else 1.0


def stamp(sec, seq, wid):
    hdr = struct.pack("<8sQQQ", MAGIC, sec * SECTOR, seq, wid)
    body = (hdr * 128)[: SECTOR - 8]
    return body + struct.pack("<Q", zlib.crc32(body))


def parse(b):
    """(offset, seq, wid) of a valid stamp; None for non-stamp data; 'bad' for a torn one."""
    if b[:8] != MAGIC:
        return None
    body = b[: SECTOR - 8]
    if struct.unpack("<Q", b[SECTOR - 8 :])[0] != zlib.crc32(body):
        return "bad"
    _, off, seq, wid = struct.unpack("<8sQQQ", b[:32])
    return off, seq, wid


probe = nbd.NBD()
probe.connect_uri(uri)
size = probe.get_size()
probe.shutdown()
nsec = size // SECTOR
nreg = (nsec + REGION - 1) // REGION

stop = threading.Event()
logs = [[] for _ in range(nthreads)]  # (t_submit, t_ack, first_sector, count, seq)
errors = []


def writer(wid):
    rnd = random.Random(1000 + wid)
    h = nbd.NBD()
    h.connect_uri(uri)
    mine = [r for r in range(nreg) if r % nthreads == wid]
    last_region = (nsec - 1) // REGION
    seq = 0
    try:
        while not stop.is_set():
            seq += 1
            if last_region in mine and rnd.random() < 0.01:
                first, k = nsec - 1, 1
            else:
                r = rnd.choice(mine)
                lo, hi = r * REGION, min((r + 1) * REGION, nsec)
                k = rnd.randint(1, 16)
                first = rnd.randint(lo, max(lo, hi - k))
                k = min(k, hi - first)
            buf = b"".join(stamp(s, seq, wid) for s in range(first, first + k))
            t0 = time.monotonic_ns()
            h.pwrite(buf, first * SECTOR)
            t1 = time.monotonic_ns()
            logs[wid].append((t0, t1, first, k, seq))
    except Exception as e:  # an NBD error reply is a failure of the test
        errors.append(f"writer {wid}: {e}")
    finally:
        try:
            h.shutdown()
        except Exception:
            pass


def backup_state():
    r = subprocess.run([ctl, "status", name, "--json"], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    b = json.loads(r.stdout).get("daemon", {}).get("backup")
    return b and b.get("state")


threads = [threading.Thread(target=writer, args=(w,)) for w in range(nthreads)]
for t in threads:
    t.start()
time.sleep(before_s)
t_send = time.monotonic_ns()
bk = subprocess.Popen(
    [ctl, "backup", name, "--to", "file:" + img_path, "--container", "ram:8M",
     "--quiesce-idle", "0s", "--json"],
    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
t_run = None
while t_run is None:
    st = backup_state()
    if st in ("running", "complete", "failed"):
        t_run = time.monotonic_ns()
    elif bk.poll() is not None:
        break
    else:
        time.sleep(0.01)
out, err = bk.communicate()
time.sleep(after_s)
stop.set()
for t in threads:
    t.join()
if errors:
    sys.exit("FAIL: client errors: " + "; ".join(errors))
if bk.returncode != 0 or t_run is None:
    sys.exit(f"FAIL: backup exited {bk.returncode} (running seen: {t_run is not None}): {err.strip()}")
last = json.loads(out.strip().splitlines()[-1])
writes_during = sum(1 for lg in logs for (t0, t1, *_r) in lg if t_run < t0)
total = sum(len(lg) for lg in logs)
print(f"{total} writes, {writes_during} submitted after the backup was running; backup: "
      f"{last.get('chunks_preserved')} chunks preserved, {last.get('holds')} holds, "
      f"{last.get('throttled_writes')} throttled, high-water {last.get('container_high_water')}/"
      f"{last.get('container_slots')}, {last.get('elapsed_ms')} ms")
if writes_during < 100:
    sys.exit("FAIL: too few writes while the backup ran to prove anything")

# per sector: its writes in order, (seq, t_submit, t_ack, wid)
per = {}
for wid, lg in enumerate(logs):
    for (t0, t1, first, k, seq) in lg:
        for s in range(first, first + k):
            per.setdefault(s, []).append((seq, t0, t1, wid))

problems = []
lo_inst, lo_why = 0, None           # the instant is after every imaged write's submit
hi_inst, hi_why = 1 << 63, None     # and before the ack of the next write of each sector
n_new = n_orig = 0
with open(img_path, "rb") as img, open(orig_path, "rb") as orig:
    for s in range(nsec):
        b = img.read(SECTOR)
        o = orig.read(SECTOR)
        ws = per.get(s, [])
        p = parse(b)
        if p == "bad":
            problems.append(f"sector {s}: torn stamp")
            continue
        if p is None:
            if b != o:
                problems.append(f"sector {s}: neither a stamp nor the original data")
                continue
            idx = -1  # original
            n_orig += 1
        else:
            off, seq, wid = p
            if off != s * SECTOR:
                problems.append(f"sector {s}: holds the stamp of offset {off}")
                continue
            idx = next((i for i, w in enumerate(ws) if w[0] == seq and w[3] == wid), None)
            if idx is None:
                problems.append(f"sector {s}: seq {seq} of writer {wid} was never written here")
                continue
            n_new += 1
        acked_before = [i for i, w in enumerate(ws) if w[2] < t_send]
        if acked_before and idx < acked_before[-1]:
            problems.append(f"sector {s}: image has {'the original' if idx < 0 else 'seq %d' % ws[idx][0]}"
                            f" but seq {ws[acked_before[-1]][0]} was acknowledged before the backup was sent")
        if idx >= 0 and ws[idx][1] > t_run:
            problems.append(f"sector {s}: image has seq {ws[idx][0]}, submitted after the backup was running")
        if idx >= 0 and ws[idx][1] > lo_inst:
            lo_inst, lo_why = ws[idx][1], f"sector {s} seq {ws[idx][0]}"
        if idx + 1 < len(ws) and ws[idx + 1][2] < hi_inst:
            hi_inst, hi_why = ws[idx + 1][2], f"sector {s} seq {ws[idx + 1][0]}"
        if len(problems) > 20:
            break
if not problems and lo_inst >= hi_inst:
    problems.append(f"no single instant: {lo_why} was submitted {(lo_inst - hi_inst) / 1e6:.3f} ms after "
                    f"{hi_why} (a later write, not in the image) was acknowledged")
print(f"image: {n_new} stamped sectors, {n_orig} original; instant window "
      f"{(lo_inst - t_send) / 1e6:.1f} .. {(hi_inst - t_send) / 1e6:.1f} ms after the send "
      f"(running seen at {(t_run - t_send) / 1e6:.1f} ms)")
if problems:
    sys.exit("FAIL: image is not the disk at one instant:\n  " + "\n  ".join(problems[:20]))

# the live disk holds every acknowledged write (all writes are acknowledged by now)
h = nbd.NBD()
h.connect_uri(uri)
bad = []
step = 4 << 20
for base in range(0, size, step):
    n = min(step, size - base)
    data = h.pread(n, base)
    for s in range(base // SECTOR, (base + n) // SECTOR):
        ws = per.get(s)
        if not ws:
            continue
        seq, _, _, wid = ws[-1]
        i = (s * SECTOR - base)
        if data[i:i + SECTOR] != stamp(s, seq, wid):
            bad.append(f"sector {s}: last acknowledged write (seq {seq}) missing on the live disk")
            if len(bad) > 20:
                break
h.shutdown()
if bad:
    sys.exit("FAIL: " + "\n  ".join(bad))
print(f"live disk: all {len(per)} written sectors hold their last write")
PY
timeout 300 /usr/bin/python3 "$T/stamp.py" "$uri" "$CTL" t21b "$T/orig.img" "$T/image.img" 4 2 1 ||
  fail "stamped-sector check"
[ ! -e "$T/image.img.incomplete" ] || fail "image still marked incomplete"
ctl detach t21b || fail "detach"
log "PASS"
