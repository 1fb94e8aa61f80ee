#!/usr/bin/env bash
# I/O engine and O_DIRECT benchmark, all figures from one run on one machine: an idle-disk
# backup of a loop-device origin (random data) to a raw image file and to a `dev:` target
# (another loop device), with --io-engine sync|uring and --direct-io off|on.
#  - origins: a loop device (--direct-io=on) over a file on the machine's disk, and one
#    over a file in /dev/shm (no device latency: the CPU cost of each path shows);
#  - per (origin, target), REPS rounds; each round runs the four engine/direct variants
#    in turn, starting one further on each round (so no variant is always first), page cache dropped before each backup, and times the backup command
#    (including the target's fsync);
#  - page cache: the pages of the origin device and of the target (device or image file)
#    resident in the page cache (mincore over a mapping), sampled every 0.1 s during the
#    backup, peak of each. Per object, so other work on the machine does not count (a
#    global `Cached:` would); sampled, because Linux drops a block device's page cache
#    when its last opener closes it, so a dev: target's pages are gone after the backup;
#  - ratios are per round against `sync, buffered` of the same round, then the median.
# The first round's images are compared with the origin (cmp), outside the timing.
# Usage: scripts/bench-io-engine.sh [SIZE_MIB (1024)] [REPS (4)]
# Needs root (losetup, drop_caches), python3.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${COWSNAP_BIN_DIR:-$ROOT/target/release}; CTL=$BIN/cowsnapctl
MIB=${1:-1024}; REPS=${2:-4}
W=$(mktemp -d /var/tmp/cowsnap-ioeng.XXXXXX)
S=$(mktemp -d /dev/shm/cowsnap-ioeng.XXXXXX)
export COWSNAP_RUN_DIR=$W/run COWSNAP_STATE_DIR=$W/state
LOOPS=()
cleanup() { set +e
  "$CTL" detach bio --force >/dev/null 2>&1
  for l in "${LOOPS[@]}"; do losetup -d "$l"; done
  rm -rf "$W" "$S"; }
trap cleanup EXIT
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
# resident PID PATH...: until PID exits, the peak MiB of each PATH in the page cache
cat >"$W/resident.py" <<'PY'
import ctypes, mmap, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
def resident(p):
    try:
        fd = os.open(p, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if size == 0:
            return 0
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        vec = ctypes.create_string_buffer((size + 4095) // 4096)
        ok = libc.mincore(ctypes.c_void_p(addr), size, vec) == 0
        libc.munmap(ctypes.c_void_p(addr), size)
        return sum(b & 1 for b in vec.raw) * 4096 >> 20 if ok else 0
    finally:
        os.close(fd)
pid, paths = int(sys.argv[1]), sys.argv[2:]
peak = [0] * len(paths)
while True:
    alive = os.path.exists(f"/proc/{pid}")
    peak = [max(a, resident(p)) for a, p in zip(peak, paths)]
    if not alive:
        break
    time.sleep(0.1)
print(" ".join(map(str, peak)))
PY
# loop FILE VAR: a loop device (direct I/O on its backing file) over FILE, named in VAR
loop() { local l; l=$(losetup -f --show --direct-io=on "$1"); LOOPS+=("$l"); printf -v "$2" %s "$l"; }

echo "# $(date -u '+%F %H:%M') UTC; $(nproc) vCPU, $(free -g | awk '/Mem/ {print $2}') GiB RAM, kernel $(uname -r); uptime at start: $(uptime)"
head -c $((MIB << 20)) /dev/urandom >"$W/disk.img"
cp "$W/disk.img" "$S/shm.img"
truncate -s $((MIB << 20)) "$W/tgt.img"
loop "$W/disk.img" LO_DISK; loop "$S/shm.img" LO_SHM; loop "$W/tgt.img" LO_TGT
echo "# origin loop devices: $LO_DISK (disk file; dio $(cat /sys/block/${LO_DISK#/dev/}/loop/dio)), $LO_SHM (/dev/shm file; dio $(cat /sys/block/${LO_SHM#/dev/}/loop/dio)); dev: target $LO_TGT (dio $(cat /sys/block/${LO_TGT#/dev/}/loop/dio)); $MIB MiB; $REPS rounds"

VARIANTS=("sync off" "uring off" "sync on" "uring on")
RES=$W/results.txt; : >"$RES"
for origin in "$LO_DISK" "$LO_SHM"; do
  for tkind in file dev; do
    for rep in $(seq "$REPS"); do
      for k in 0 1 2 3; do
        read -r eng dio <<<"${VARIANTS[$(( (k + rep - 1) % 4 ))]}"
        "$CTL" attach "$origin" --via none --name bio --io-engine "$eng" --direct-io "$dio" >/dev/null 2>&1
        if [ "$tkind" = file ]; then to="file:$W/out.img"; else to="dev:$LO_TGT"; fi
        drop; t0=$(now)
        "$CTL" backup bio --to "$to" --quiesce-idle 0s --json >"$W/bk.json" & BK=$!
        python3 "$W/resident.py" "$BK" "$origin" "${to#*:}" >"$W/res.txt"
        wait "$BK"; t1=$(now)
        "$CTL" detach bio >/dev/null 2>&1
        if [ "$rep" = 1 ]; then
          if [ "$tkind" = file ]; then cmp "$origin" "$W/out.img"; else cmp "$origin" "$LO_TGT"; fi \
            || { echo "image differs from the origin ($origin $tkind $eng $dio)"; exit 1; }
        fi
        rm -f "$W/out.img"
        echo "$origin $tkind $rep $eng $dio $(python3 -c "print(round($t1 - $t0, 3))") $(cat "$W/res.txt")" >>"$RES"
      done
    done
  done
done
echo "# uptime at the end: $(uptime)"
python3 - "$RES" "$LO_DISK" "$LO_SHM" <<'PY'
import sys, statistics as st
rows = [l.split() for l in open(sys.argv[1])]
name = {sys.argv[2]: "loop over a disk file", sys.argv[3]: "loop over a /dev/shm file"}
print("| origin | target | engine | origin reads | wall s, median (each) | time ratio vs sync+buffered, median | peak page cache MiB: origin / target, median |")
print("|---|---|---|---|---|---|---|")
for o in (sys.argv[2], sys.argv[3]):
    for t in ("file", "dev"):
        base = {r[2]: float(r[5]) for r in rows if r[0] == o and r[1] == t and r[3] == "sync" and r[4] == "off"}
        for e, d in (("sync", "off"), ("uring", "off"), ("sync", "on"), ("uring", "on")):
            rr = [r for r in rows if r[0] == o and r[1] == t and r[3] == e and r[4] == d]
            secs = [float(r[5]) for r in rr]
            ratios = [float(r[5]) / base[r[2]] for r in rr]
            po = [int(r[6]) for r in rr]
            pt = [int(r[7]) for r in rr]
            print(f"| {name[o]} | {'raw image file' if t == 'file' else 'dev: loop device'} | {e} | "
                  f"{'O_DIRECT' if d == 'on' else 'buffered'} | {st.median(secs):.2f} ({' '.join(f'{s:.2f}' for s in secs)}) | "
                  f"{st.median(ratios):.2f} | {st.median(po)} / {st.median(pt)} |")
PY
