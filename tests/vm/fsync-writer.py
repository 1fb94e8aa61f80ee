#!/usr/bin/python3
# A writer on a mounted filesystem that must never see an error: it writes numbered
# 128 KiB files, fsyncs each, and logs "N sha256 t_start t_end" per file.
#
#   fsync-writer.py write DIR LOG STOPFILE    until STOPFILE exists; exit 1 on any error
#   fsync-writer.py verify DIR LOG            every logged file holds what was written
import hashlib
import os
import sys
import time

mode, d, logp = sys.argv[1:4]
if mode == "write":
    stopf = sys.argv[4]
    i = 0
    worst = 0.0
    with open(logp, "a", buffering=1) as log:
        while not os.path.exists(stopf):
            data = hashlib.sha256(str(i).encode()).digest() * 4096
            t0 = time.monotonic()
            try:
                with open(os.path.join(d, f"f{i:06d}"), "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                log.write(f"ERROR {i} {e}\n")
                sys.exit(f"writer: file {i}: {e}")
            t1 = time.monotonic()
            worst = max(worst, t1 - t0)
            log.write(f"{i} {hashlib.sha256(data).hexdigest()} {t0:.3f} {t1:.3f}\n")
            i += 1
    print(f"writer: {i} files, slowest write+fsync {worst:.1f} s")
else:
    n = 0
    for line in open(logp):
        f = line.split()
        if f[0] == "ERROR":
            sys.exit(f"verify: the writer saw an error: {line.strip()}")
        with open(os.path.join(d, f"f{int(f[0]):06d}"), "rb") as fh:
            if hashlib.sha256(fh.read()).hexdigest() != f[1]:
                sys.exit(f"verify: file {f[0]} differs from what was written")
        n += 1
    print(f"verify: {n} files intact")
