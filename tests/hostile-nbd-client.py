#!/usr/bin/env python3
"""A hostile NBD client for tests/53-trust-hostile-client.sh: raw sockets on the
daemon's unix socket, the fixed-newstyle handshake done by hand.

  hostile-nbd-client.py MODE SOCKET EXPORT PID [args]

Modes (each prints one JSON line of what it measured):
  reads CONNS REQS HOLD DATA  CONNS connections each pipeline REQS 32 MiB READs and never
                              read the replies; for HOLD seconds sample the daemon's
                              VmRSS and Threads; meanwhile a fresh connection reads 64 KiB
                              at offset 0, which must equal the first 64 KiB of DATA
  writes CONNS HOLD DATA      CONNS connections each send a 32 MiB WRITE header and no
                              payload; the same sampling and probe
  idle CONNS HOLD             open CONNS connections and finish the handshake on each (or
                              see it refused), hold them, sample
  slow LIMIT                  after the greeting send one byte every 2 s; report how long
                              the server kept the connection (gives up after LIMIT s)
Everything is bounded: at most CONNS sockets, fixed request counts, fixed durations.
"""
import json
import os
import socket
import struct
import sys
import time

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
OPT_GO = 7
REP_ACK = 1
CMD_READ = 0
CMD_WRITE = 1


def recv_exact(s, n):
    b = b""
    while len(b) < n:
        chunk = s.recv(n - len(b))
        if not chunk:
            raise EOFError("server closed the connection")
        b += chunk
    return b


def connect(path, timeout=10.0):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def greeting(s):
    g = recv_exact(s, 18)
    magic, opt = struct.unpack(">QQ", g[:16])
    if magic != NBDMAGIC or opt != IHAVEOPT:
        raise ValueError("bad greeting")


def handshake(path, export, timeout=10.0):
    """Connect and negotiate export with NBD_OPT_GO; returns the socket."""
    s = connect(path, timeout)
    greeting(s)
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    name = export.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
    while True:
        h = recv_exact(s, 20)
        magic, _opt, rtype, ln = struct.unpack(">QIII", h)
        if magic != OPT_REPLY_MAGIC:
            raise ValueError("bad option reply magic")
        recv_exact(s, ln)
        if rtype == REP_ACK:
            return s
        if rtype & 0x80000000:
            raise ValueError("NBD_OPT_GO refused: %#x" % rtype)


def request(cmd, cookie, offset, length):
    return struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, cookie, offset, length)


def status(pid):
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "Threads"):
                out[k] = int(v.split()[0])
    return out


class Sampler:
    def __init__(self, pid):
        self.pid = pid
        self.rss = 0
        self.threads = 0

    def sample(self):
        st = status(self.pid)
        self.rss = max(self.rss, st.get("VmRSS", 0))
        self.threads = max(self.threads, st.get("Threads", 0))

    def hold(self, secs):
        end = time.time() + secs
        while time.time() < end:
            self.sample()
            time.sleep(0.2)


def probe(path, export, data_file):
    """A well-behaved client reads 64 KiB at offset 0 (simple reply) and checks it."""
    t0 = time.time()
    try:
        s = handshake(path, export, timeout=20.0)
        s.sendall(request(CMD_READ, 7, 0, 65536))
        h = recv_exact(s, 16)
        magic, err, cookie = struct.unpack(">IIQ", h)
        if magic != SIMPLE_REPLY_MAGIC or cookie != 7 or err != 0:
            return {"ok": False, "why": "reply magic %#x error %d cookie %d" % (magic, err, cookie)}
        got = recv_exact(s, 65536)
        s.close()
    except Exception as e:  # noqa: BLE001 - reported to the test
        return {"ok": False, "why": str(e), "secs": round(time.time() - t0, 2)}
    with open(data_file, "rb") as f:
        want = f.read(65536)
    return {"ok": got == want, "why": "" if got == want else "data differs",
            "secs": round(time.time() - t0, 2)}


def flood(path, export, pid, conns, hold, data_file, make):
    socks = []
    smp = Sampler(pid)
    for i in range(conns):
        s = handshake(path, export)
        s.setblocking(False)
        try:
            s.send(make(i))
        except BlockingIOError:
            pass
        socks.append(s)
    smp.hold(hold / 2)
    pr = probe(path, export, data_file)
    smp.hold(hold / 2)
    for s in socks:
        s.close()
    return {"peak_rss_kb": smp.rss, "peak_threads": smp.threads, "probe": pr}


def main():
    mode, path, export, pid = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    a = sys.argv[5:]
    if mode == "reads":
        conns, reqs, hold, data = int(a[0]), int(a[1]), float(a[2]), a[3]
        # REQS pipelined 32 MiB reads in one send per connection
        res = flood(path, export, pid, conns, hold, data,
                    lambda i: b"".join(request(CMD_READ, i * 1000 + k, 0, 32 << 20)
                                       for k in range(reqs)))
    elif mode == "writes":
        conns, hold, data = int(a[0]), float(a[1]), a[2]
        res = flood(path, export, pid, conns, hold, data,
                    lambda i: request(CMD_WRITE, i, 0, 32 << 20))
    elif mode == "idle":
        conns, hold = int(a[0]), float(a[1])
        socks, refused = [], 0
        smp = Sampler(pid)
        for _ in range(conns):
            try:
                socks.append(handshake(path, export, timeout=5.0))
            except (EOFError, ConnectionError, OSError, ValueError):
                refused += 1
        smp.hold(hold)
        for s in socks:
            s.close()
        res = {"accepted": len(socks), "refused": refused,
               "peak_rss_kb": smp.rss, "peak_threads": smp.threads}
    elif mode == "slow":
        limit = float(a[0])
        s = connect(path)
        greeting(s)
        t0 = time.time()
        closed = False
        payload = struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, OPT_GO, 6) + b"\0" * 6
        i = 0
        while time.time() - t0 < limit:
            try:
                if i < len(payload):
                    s.sendall(payload[i:i + 1])
                    i += 1
                s.settimeout(2.0)
                if s.recv(1) == b"":
                    closed = True
                    break
            except socket.timeout:
                continue
            except OSError:
                closed = True
                break
        res = {"closed": closed, "secs": round(time.time() - t0, 1), "bytes_sent": i}
    else:
        sys.exit("unknown mode " + mode)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
