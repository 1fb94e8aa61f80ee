#!/usr/bin/python3
# Stamped-sector writers on a kernel block device (/dev/nbdN) during `cowsnapctl
# backup`, then the checks of the image and of the live device. The checks are those
# of tests/21-backup-under-load.sh (there through libnbd, here through the kernel's
# NBD client with O_DIRECT, so every acknowledged write has reached the daemon).
#
#   stamp-dev.py DEV CTL NAME ORIGINAL_COPY IMAGE [THREADS] [SECONDS_BEFORE] [SECONDS_AFTER]
#
# Every written 4 KiB sector carries (magic, offset, sequence, writer, crc). Each writer
# thread owns the 1 MiB regions r with r % THREADS == its id and issues one write at a
# time (1..16 sectors), so the writes to one sector are totally ordered. For each sector
# of the image: a valid stamp of this sector or the original bytes; not older than the
# last write acknowledged before the backup was sent; not a write submitted after the
# backup was running; and one instant for all sectors. Then every written sector of the
# live device must hold its last write.
import json
import mmap
import os
import random
import struct
import subprocess
import sys
import threading
import time
import zlib

SECTOR = 4096
REGION = 256
MAGIC = b"COWSTAMP"

dev, ctl, name, orig_path, img_path = sys.argv[1:6]
nthreads = int(sys.argv[6]) if len(sys.argv) > 6 else 2
before_s = float(sys.argv[7]) if len(sys.argv) > 7 else 2.0
after_s = float(sys.argv[8]) if len(sys.argv) > 8 else 1.0


def stamp(sec, seq, wid):
    hdr = struct.pack("<8sQQQ", MAGIC, sec * SECTOR, seq, wid)
    body = (hdr * 128)[: SECTOR - 8]
    return body + struct.pack("<Q", zlib.crc32(body))


def parse(b):
    if b[:8] != MAGIC:
        return None
    body = b[: SECTOR - 8]
    if struct.unpack("<Q", b[SECTOR - 8:])[0] != zlib.crc32(body):
        return "bad"
    _, off, seq, wid = struct.unpack("<8sQQQ", b[:32])
    return off, seq, wid


fd0 = os.open(dev, os.O_RDONLY)
size = os.lseek(fd0, 0, os.SEEK_END)
os.close(fd0)
nsec = size // SECTOR
nreg = (nsec + REGION - 1) // REGION
stop = threading.Event()
logs = [[] for _ in range(nthreads)]
errors = []


def writer(wid):
    rnd = random.Random(2000 + wid)
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, 16 * SECTOR)  # page-aligned, as O_DIRECT needs
    mine = [r for r in range(nreg) if r % nthreads == wid]
    seq = 0
    try:
        while not stop.is_set():
            seq += 1
            r = rnd.choice(mine)
            lo, hi = r * REGION, min((r + 1) * REGION, nsec)
            k = rnd.randint(1, 16)
            first = rnd.randint(lo, max(lo, hi - k))
            k = min(k, hi - first)
            buf.seek(0)
            buf.write(b"".join(stamp(s, seq, wid) for s in range(first, first + k)))
            t0 = time.monotonic_ns()
            n = os.pwrite(fd, memoryview(buf)[: k * SECTOR], first * SECTOR)
            t1 = time.monotonic_ns()
            if n != k * SECTOR:
                raise OSError(f"short write {n} of {k * SECTOR}")
            logs[wid].append((t0, t1, first, k, seq))
    except Exception as e:
        errors.append(f"writer {wid}: {e}")
    finally:
        os.close(fd)


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
    sys.exit("FAIL: write errors on the device: " + "; ".join(errors))
if bk.returncode != 0 or t_run is None:
    sys.exit(f"FAIL: backup exited {bk.returncode} (running seen: {t_run is not None}): {err.strip()}")
last = json.loads(out.strip().splitlines()[-1])
writes_during = sum(1 for lg in logs for (t0, *_r) in lg if t_run < t0)
total = sum(len(lg) for lg in logs)
print(f"{total} writes through {dev}, {writes_during} submitted while the backup ran; "
      f"{last.get('chunks_preserved')} chunks preserved, {last.get('holds')} holds, "
      f"{last.get('elapsed_ms')} ms")
if writes_during < 20:
    sys.exit("FAIL: too few writes while the backup ran to prove anything")

per = {}
for wid, lg in enumerate(logs):
    for (t0, t1, first, k, seq) in lg:
        for s in range(first, first + k):
            per.setdefault(s, []).append((seq, t0, t1, wid))

problems = []
lo_inst, lo_why = 0, None
hi_inst, hi_why = 1 << 63, None
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
            idx = -1
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
            problems.append(f"sector {s}: image older than seq {ws[acked_before[-1]][0]}, "
                            "acknowledged before the backup was sent")
        if idx >= 0 and ws[idx][1] > t_run:
            problems.append(f"sector {s}: image has seq {ws[idx][0]}, submitted after the backup was running")
        if idx >= 0 and ws[idx][1] > lo_inst:
            lo_inst, lo_why = ws[idx][1], f"sector {s} seq {ws[idx][0]}"
        if idx + 1 < len(ws) and ws[idx + 1][2] < hi_inst:
            hi_inst, hi_why = ws[idx + 1][2], f"sector {s} seq {ws[idx + 1][0]}"
        if len(problems) > 20:
            break
if not problems and lo_inst >= hi_inst:
    problems.append(f"no single instant: {lo_why} submitted {(lo_inst - hi_inst) / 1e6:.3f} ms after "
                    f"{hi_why} (not in the image) was acknowledged")
print(f"image: {n_new} stamped sectors, {n_orig} original")
if problems:
    sys.exit("FAIL: image is not the device at one instant:\n  " + "\n  ".join(problems[:20]))

fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 4 << 20)
bad = []
for base in range(0, size, 4 << 20):
    n = os.preadv(fd, [memoryview(buf)[: min(4 << 20, size - base)]], base)
    data = buf[:n]
    for s in range(base // SECTOR, (base + n) // SECTOR):
        ws = per.get(s)
        if not ws:
            continue
        seq, _, _, wid = ws[-1]
        i = s * SECTOR - base
        if data[i:i + SECTOR] != stamp(s, seq, wid):
            bad.append(f"sector {s}: last write (seq {seq}) missing on the device")
            if len(bad) > 20:
                break
os.close(fd)
if bad:
    sys.exit("FAIL: " + "\n  ".join(bad))
print(f"live device: all {len(per)} written sectors hold their last write")
