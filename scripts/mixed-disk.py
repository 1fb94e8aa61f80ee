#!/usr/bin/env python3
"""mixed-disk.py PATH MIB: the benchmarks' mixed disk image (bench-repo.sh, bench-s3.sh,
bench-s3-objsize.sh): per 1 MiB region, ~1/3 zeros (a hole), ~1/3 text (words,
compressible, not repeating), ~1/3 random; the layout and the text are the same in
every run (seed 42), the random regions are not."""
import os, random, sys
path, mib = sys.argv[1], int(sys.argv[2])
R = 1 << 20
rng = random.Random(42)
words = [''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randint(2, 10))) for _ in range(5000)]
with open(path, 'wb') as f:
    for i in range(mib):
        k = rng.random()
        if k < 1/3:
            f.seek(R, 1)
        elif k < 2/3:
            out, n = [], 0
            while n < R:
                line = ' '.join(rng.choices(words, k=12)) + '\n'
                out.append(line); n += len(line)
            f.write(''.join(out).encode()[:R])
        else:
            f.write(os.urandom(R))
    f.truncate(mib * R)
