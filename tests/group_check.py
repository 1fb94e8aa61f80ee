#!/usr/bin/python3
# Consistency-group checks (tests/45-group-consistency.sh).
#
#   group_check.py write URI_A URI_B STOPFILE OUT [WRITERS]
#       Causal writers: writer w owns K sectors in its own 1 MiB region of both disks and
#       writes sequence n = 1, 2, ... to sector n % K of disk A, waits for the
#       acknowledgement, then writes n to the same sector of disk B, and so on until
#       STOPFILE exists. OUT gets the last sequence each writer finished on both disks.
#   group_check.py check IMG_A IMG_B [WRITERS]
#       For each writer: each image must be one instant of its disk (the sectors hold
#       exactly the last K sequences up to some M), and M_B <= M_A <= M_B + 1 (B never
#       holds a write whose A write is missing; and both disks were stopped together, so
#       A is at most the one write ahead that was waiting for B). Exit 0 when all hold,
#       1 when the images are not one instant across the disks (with the reason), 2 when
#       an image is damaged.
#   group_check.py proto CTL_SOCKET NBD_URI REPO_DIR
#       Drives a daemon through the group protocol by hand (as a coordinator that
#       misbehaves would) and checks what it does at each step.
import json
import os
import socket
import struct
import sys
import threading
import time

SECTOR = 4096
K = 8
REGION = 1 << 20
MAGIC = b"CWSGROUP"


def sector_bytes(w, i, n):
    hdr = struct.pack("<8sQQQ", MAGIC, w, i, n)
    return hdr + b"\0" * (SECTOR - len(hdr))


def offset(w, i):
    return w * REGION + i * SECTOR


def writer(uri_a, uri_b, w, stop, res):
    import nbd

    ha = nbd.NBD()
    ha.connect_uri(uri_a)
    hb = nbd.NBD()
    hb.connect_uri(uri_b)
    n = 0
    while not os.path.exists(stop):
        n += 1
        i = n % K
        ha.pwrite(sector_bytes(w, i, n), offset(w, i))
        hb.pwrite(sector_bytes(w, i, n), offset(w, i))
        res[w] = n
    ha.shutdown()
    hb.shutdown()


def cmd_write(uri_a, uri_b, stop, out, writers=4):
    res = {}
    ts = [threading.Thread(target=writer, args=(uri_a, uri_b, w, stop, res)) for w in range(writers)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    with open(out, "w") as f:
        json.dump(res, f)


def instant_of(img, w):
    """The M this writer's sectors show on one image, or raise ValueError."""
    seqs = []
    with open(img, "rb") as f:
        for i in range(K):
            f.seek(offset(w, i))
            b = f.read(SECTOR)
            if b[:8] == MAGIC:
                mw, mi, n = struct.unpack("<QQQ", b[8:32])
                if mw != w or mi != i or n % K != i:
                    raise ValueError(f"writer {w} sector {i}: foreign stamp {mw}/{mi}/{n}")
                seqs.append(n)
            elif b.count(0) == SECTOR:
                seqs.append(0)
            else:
                raise ValueError(f"writer {w} sector {i}: neither a stamp nor zeros")
    m = max(seqs)
    for i, n in enumerate(seqs):
        want = m - ((m - i) % K) if m >= i else 0
        if want < 1:
            want = 0
        if n != want:
            raise ValueError(
                f"writer {w}: sector {i} holds {n}, but an instant at {m} means {want} "
                f"(not one instant of this disk)")
    return m


def cmd_check(img_a, img_b, writers=4):
    bad = []
    written = 0
    for w in range(writers):
        try:
            ma = instant_of(img_a, w)
            mb = instant_of(img_b, w)
        except ValueError as e:
            print(f"damaged: {e}")
            return 2
        written += ma
        if not (mb <= ma <= mb + 1):
            bad.append(f"writer {w}: disk A at {ma}, disk B at {mb}")
        else:
            print(f"writer {w}: A at {ma}, B at {mb}: consistent")
    if written == 0:
        print("damaged: no writer's stamp in the images (the writers did not run?)")
        return 2
    if bad:
        print("not one instant across the disks: " + "; ".join(bad))
        return 1
    return 0


class Ctl:
    def __init__(self, path, timeout=30):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(timeout)
        self.s.connect(path)
        self.f = self.s.makefile("rwb")

    def send(self, cmd, **kw):
        kw.update({"v": 1, "cmd": cmd})
        self.f.write((json.dumps(kw) + "\n").encode())
        self.f.flush()

    def recv(self):
        line = self.f.readline()
        if not line:
            raise EOFError("the daemon closed the connection")
        return json.loads(line)

    def call(self, cmd, **kw):
        self.send(cmd, **kw)
        return self.recv()

    def close(self):
        self.f.close()
        self.s.close()


def gens(repo):
    d = os.path.join(repo, "generations")
    return sorted(f for f in os.listdir(d) if f.endswith(".json")) if os.path.isdir(d) else []


def backup_state(path):
    c = Ctl(path)
    b = c.call("backup_status").get("backup")
    c.close()
    return b


def wait_finished(path, secs=20):
    t0 = time.time()
    while time.time() - t0 < secs:
        b = backup_state(path)
        if b and b["state"] in ("complete", "failed"):
            return b
        time.sleep(0.05)
    raise AssertionError("the backup did not end")


def timed_write(uri, results):
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    t0 = time.time()
    h.pwrite(b"\x5a" * SECTOR, 60 << 20)
    results.append(time.time() - t0)
    h.shutdown()


def check(cond, what):
    if not cond:
        print("FAIL: " + what)
        sys.exit(1)
    print("ok: " + what)


def cmd_proto(ctl_path, uri, repo):
    params = {"to": "repo:" + repo, "group": {"id": "20261206T000000.000Z-00000001", "disks": ["x", "y"]}}
    before = gens(repo)

    # 1. prepared, then the coordinator goes away: nothing paused, nothing published
    c = Ctl(ctl_path)
    c.send("group_backup", params=params, pause_limit_ms=1500)
    check(c.recv().get("phase") == "prepared", "the daemon answers prepared")
    c.close()
    b = wait_finished(ctl_path)
    check(b["state"] == "failed" and "abandoned" in (b["error"] or ""),
          f"a coordinator gone after prepared abandons the backup ({b['error']})")
    check(gens(repo) == before, "nothing published")

    # 2. paused, then silence: writes wait, and resume by themselves at the pause limit
    c = Ctl(ctl_path)
    c.send("group_backup", params=params, pause_limit_ms=1500)
    check(c.recv().get("phase") == "prepared", "prepared again")
    t0 = time.time()
    c.send("group_pause")
    check(c.recv().get("phase") == "paused", "the daemon answers paused")
    res = []
    t = threading.Thread(target=timed_write, args=(uri, res))
    t.start()
    time.sleep(0.5)
    check(not res, "a write waits while the disk is paused")
    r = c.recv()
    waited = time.time() - t0
    check(not r.get("ok") and "no group_go within" in r.get("error", ""),
          f"the daemon gives up at the pause limit by itself: {r.get('error')}")
    check(1.3 <= waited <= 3.0, f"the pause ended at the limit ({waited:.2f} s for 1.5 s)")
    t.join(10)
    check(res and res[0] < 3.5, f"the held write completed after the pause ({res})")
    check(gens(repo) == before, "nothing published")
    c.close()

    # 3. go, then the coordinator goes away before commit: the backup is cancelled
    c = Ctl(ctl_path)
    c.send("group_backup", params=params, pause_limit_ms=1500)
    c.recv()
    c.send("group_pause")
    c.recv()
    t_go = time.time()
    r = c.call("group_go")
    check(r.get("ok") and r.get("id"), f"go gives the backup id ({r})")
    c.close()
    b = wait_finished(ctl_path)
    check(b["state"] == "failed", f"a coordinator gone before commit publishes nothing ({b['error']})")
    check(gens(repo) == before, "nothing published")

    # 4. an unexpected command while paused abandons at once, not at the limit
    c = Ctl(ctl_path)
    c.send("group_backup", params=params, pause_limit_ms=5000)
    c.recv()
    c.send("group_pause")
    c.recv()
    t0 = time.time()
    r = c.call("status")
    check(not r.get("ok") and "expected group_go" in r.get("error", "") and time.time() - t0 < 2,
          f"a stray command while paused abandons at once ({r.get('error')})")
    c.close()

    # 5. the whole protocol: ready, commit, complete, one generation with the group
    c = Ctl(ctl_path)
    c.send("group_backup", params=params, pause_limit_ms=1500)
    c.recv()
    c.send("group_pause")
    c.recv()
    r = c.call("group_go")
    check(r.get("ok"), "go")
    t0 = time.time()
    while True:
        b = c.call("backup_status")["backup"]
        if b["state"] in ("ready", "failed", "complete") or time.time() - t0 > 30:
            break
        time.sleep(0.05)
    check(b["state"] == "ready", f"a drained member waits for the commit (state {b['state']})")
    time.sleep(0.3)
    check(gens(repo) == before, "nothing published before the commit")
    r = c.call("group_commit", notes=["post-snapshot note"])
    check(r.get("ok"), f"commit accepted ({r})")
    b = wait_finished(ctl_path)
    check(b["state"] == "complete", "complete after the commit")
    new = [g for g in gens(repo) if g not in before]
    check(len(new) == 1, f"one generation published ({new})")
    meta = json.load(open(os.path.join(repo, "generations", new[0])))
    check(meta.get("group", {}).get("id") == params["group"]["id"], "it carries the group")
    check("post-snapshot note" in meta.get("notes", []), "and the commit's notes")
    c.close()

    # 6. bad pause limits are refused before anything happens
    c = Ctl(ctl_path)
    r = c.call("group_backup", params=params, pause_limit_ms=0)
    check(not r.get("ok") and "pause limit" in r.get("error", ""), "pause limit 0 refused")
    r = c.call("group_backup", params=params, pause_limit_ms=60000)
    check(not r.get("ok") and "pause limit" in r.get("error", ""), "pause limit 60 s refused")
    r = c.call("group_commit")
    check(not r.get("ok"), "a commit without a group backup is refused")
    c.close()
    print("protocol checks passed")


if __name__ == "__main__":
    a = sys.argv[1:]
    if a[0] == "write":
        cmd_write(a[1], a[2], a[3], a[4], int(a[5]) if len(a) > 5 else 4)
    elif a[0] == "check":
        sys.exit(cmd_check(a[1], a[2], int(a[3]) if len(a) > 3 else 4))
    elif a[0] == "proto":
        cmd_proto(a[1], a[2], a[3])
    else:
        sys.exit(f"unknown command {a[0]}")
