#!/usr/bin/python3
# Stamped-sector writers during `cowsnapctl backup`, then the checks of the image and of
# the live disk. One checker for two ways of writing:
#
#   stamp.py nbd URI CTL NAME ORIGINAL_COPY IMAGE [THREADS] [SECONDS_BEFORE] [SECONDS_AFTER] [MIN_WRITES]
#   stamp.py dev DEV CTL NAME ORIGINAL_COPY IMAGE [THREADS] [SECONDS_BEFORE] [SECONDS_AFTER] [MIN_WRITES]
#
# `nbd`: python3-libnbd connections to the daemon (tests/21-backup-under-load.sh); `dev`:
# O_DIRECT writes to a kernel block device such as /dev/nbdN (tests/vm/kernel-nbd.sh), so
# every acknowledged write has reached the daemon.
#
# With STAMP_PULL=nbdcopy or STAMP_PULL=qemu-img (tests/35-snapshot-pull.sh) the image is
# taken in pull mode instead: `cowsnapctl snapshot` (container STAMP_CONTAINER), then that
# tool copies the snapshot export to IMAGE while the writers go on, then `release`.
# "Running" is then the moment `snapshot` returned (its reply comes after the instant).
#
# Every written 4 KiB sector carries (magic, offset, sequence, writer, crc). Each writer
# thread owns the 1 MiB regions r with r % THREADS == its id and issues one write at a
# time (1..16 sectors), so the writes to one sector are totally ordered. For each sector
# of the image: a valid stamp of this sector or the original bytes; not older than the
# last write acknowledged before the backup was sent; not a write submitted after the
# backup was running; and one instant for all sectors. Then every written sector of the
# live disk must hold its last write.
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
REGION = 256  # sectors per region (1 MiB)
MAGIC = b"COWSTAMP"
READ_STEP = 4 << 20


def stamp(sec, seq, wid):
    hdr = struct.pack("<8sQQQ", MAGIC, sec * SECTOR, seq, wid)
    body = (hdr * 128)[: SECTOR - 8]
    return body + struct.pack("<Q", zlib.crc32(body))


def parse(b):
    """(offset, seq, wid) of a valid stamp; None for non-stamp data; 'bad' for a torn one."""
    if b[:8] != MAGIC:
        return None
    body = b[: SECTOR - 8]
    if struct.unpack("<Q", b[SECTOR - 8:])[0] != zlib.crc32(body):
        return "bad"
    _, off, seq, wid = struct.unpack("<8sQQQ", b[:32])
    return off, seq, wid


class Nbd:
    """Writes and reads through libnbd connections to an NBD URI."""

    def __init__(self, uri):
        import nbd
        self.nbd, self.uri, self.what = nbd, uri, "the live disk"
        h = self.connect()
        self.size = h.get_size()
        h.shutdown()

    def connect(self):
        h = self.nbd.NBD()
        h.connect_uri(self.uri)
        return h

    def writer(self):
        h = self.connect()

        class W:
            def pwrite(self, data, off):
                h.pwrite(data, off)

            def close(self):
                try:
                    h.shutdown()
                except Exception:
                    pass
        return W()

    def chunks(self):
        h = self.connect()
        for base in range(0, self.size, READ_STEP):
            yield base, h.pread(min(READ_STEP, self.size - base), base)
        h.shutdown()


class Dev:
    """Writes and reads a block device with O_DIRECT (page-aligned buffers)."""

    def __init__(self, dev):
        self.dev, self.what = dev, dev
        fd = os.open(dev, os.O_RDONLY)
        self.size = os.lseek(fd, 0, os.SEEK_END)
        os.close(fd)

    def writer(self):
        fd = os.open(self.dev, os.O_RDWR | os.O_DIRECT)
        buf = mmap.mmap(-1, 16 * SECTOR)

        class W:
            def pwrite(self, data, off):
                buf.seek(0)
                buf.write(data)
                n = os.pwrite(fd, memoryview(buf)[: len(data)], off)
                if n != len(data):
                    raise OSError(f"short write {n} of {len(data)}")

            def close(self):
                os.close(fd)
        return W()

    def chunks(self):
        fd = os.open(self.dev, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, READ_STEP)
        for base in range(0, self.size, READ_STEP):
            n = os.preadv(fd, [memoryview(buf)[: min(READ_STEP, self.size - base)]], base)
            yield base, buf[:n]
        os.close(fd)


kind, target, ctl, name, orig_path, img_path = sys.argv[1:7]
nthreads = int(sys.argv[7]) if len(sys.argv) > 7 else 4
before_s = float(sys.argv[8]) if len(sys.argv) > 8 else 2.0
after_s = float(sys.argv[9]) if len(sys.argv) > 9 else 1.0
min_writes = int(sys.argv[10]) if len(sys.argv) > 10 else 100
io = {"nbd": Nbd, "dev": Dev}[kind](target)
size = io.size
nsec = size // SECTOR
nreg = (nsec + REGION - 1) // REGION

stop = threading.Event()
logs = [[] for _ in range(nthreads)]  # (t_submit, t_ack, first_sector, count, seq)
errors = []


def writer(wid):
    rnd = random.Random(1000 + wid)
    w = io.writer()
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
            w.pwrite(buf, first * SECTOR)
            t1 = time.monotonic_ns()
            logs[wid].append((t0, t1, first, k, seq))
    except Exception as e:  # an I/O error (an NBD error reply) is a failure of the test
        errors.append(f"writer {wid}: {e}")
    finally:
        w.close()


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
pull = os.environ.get("STAMP_PULL")
pull_note = ""
t_send = time.monotonic_ns()
if pull:
    sn = subprocess.run(
        [ctl, "snapshot", name, "--container", os.environ.get("STAMP_CONTAINER", "ram:64M"),
         "--quiesce-idle", "0s", "--json"], capture_output=True, text=True)
    t_run = time.monotonic_ns() if sn.returncode == 0 else None
    if t_run is None:
        stop.set()
        sys.exit(f"FAIL: snapshot exited {sn.returncode}: {sn.stderr.strip()}")
    snap_uri = json.loads(sn.stdout)["uri"]
    t_c0 = time.monotonic_ns()
    if pull == "nbdcopy":
        cp = subprocess.run(["nbdcopy", snap_uri, img_path], capture_output=True, text=True)
    else:
        cp = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", "-S", "0",
                             snap_uri, img_path], capture_output=True, text=True)
    t_c1 = time.monotonic_ns()
    writes_copy = sum(1 for lg in logs for (t0, *_r) in lg if t_c0 < t0 < t_c1)
    r = subprocess.run([ctl, "status", name, "--json"], capture_output=True, text=True)
    snap_st = json.loads(r.stdout).get("daemon", {}).get("snapshot") or {}
    rel = subprocess.run([ctl, "release", name], capture_output=True, text=True)
    if cp.returncode != 0:
        stop.set()
        sys.exit(f"FAIL: {pull} exited {cp.returncode}: {cp.stderr.strip()}")
    if rel.returncode != 0:
        stop.set()
        sys.exit(f"FAIL: release exited {rel.returncode}: {rel.stderr.strip()}")
    if snap_st.get("state") != "serving":
        stop.set()
        sys.exit(f"FAIL: the snapshot export is not serving after the copy: {snap_st}")
    fig = snap_st.get("figures", {})
    pull_note = (f"; {pull} took {(t_c1 - t_c0) / 1e6:.0f} ms with {writes_copy} writes meanwhile; "
                 f"container {fig.get('container_high_water')}/{fig.get('container_slots')} slots")
    out = json.dumps({k: fig.get(k) for k in ("chunks_preserved", "holds", "throttled_writes",
                                               "container_high_water", "container_slots")}
                     | {"elapsed_ms": (t_c1 - t_run) // 1000000})

    class Done:
        returncode = 0
    bk, err = Done(), ""
else:
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
    sys.exit("FAIL: write errors: " + "; ".join(errors))
if bk.returncode != 0 or t_run is None:
    sys.exit(f"FAIL: backup exited {bk.returncode} (running seen: {t_run is not None}): {err.strip()}")
last = json.loads(out.strip().splitlines()[-1])
writes_during = sum(1 for lg in logs for (t0, *_r) in lg if t_run < t0)
total = sum(len(lg) for lg in logs)
print(f"{total} writes through {io.what}, {writes_during} submitted after the snapshot instant; "
      f"{'pull' if pull else 'backup'}: {last.get('chunks_preserved')} chunks preserved, {last.get('holds')} holds, "
      f"{last.get('throttled_writes')} throttled, high-water {last.get('container_high_water')}/"
      f"{last.get('container_slots')}, {last.get('elapsed_ms')} ms{pull_note}")
if writes_during < min_writes:
    sys.exit(f"FAIL: {writes_during} writes while the backup ran, fewer than {min_writes}: too few to prove anything")

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
bad = []
for base, data in io.chunks():
    for s in range(base // SECTOR, (base + len(data)) // SECTOR):
        ws = per.get(s)
        if not ws:
            continue
        seq, _, _, wid = ws[-1]
        i = s * SECTOR - base
        if data[i:i + SECTOR] != stamp(s, seq, wid):
            bad.append(f"sector {s}: last acknowledged write (seq {seq}) missing on {io.what}")
    if len(bad) > 20:
        break
if bad:
    sys.exit("FAIL: " + "\n  ".join(bad[:20]))
print(f"{io.what}: all {len(per)} written sectors hold their last write")
