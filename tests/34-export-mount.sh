#!/usr/bin/env bash
# Restore points served read-only (export) and mounted (mount/umount), through the real
# binaries:
# - an XFS disk (attach --via fuse, mkfs, files), backed up into a repository: `export`
#   --via none; `nbdinfo --map` holes/data agree with the restore report (data bytes)
#   and every hole reads as zeros; `nbdcopy` of the export is bit-identical to an offline
#   `restore`; status shows the generation; writes are refused; `detach` stops it and
#   removes its pin. Then `mount` (ro,norecovery,nouuid): files match their hashes.
# - a 100 GiB sparse ext4 disk holding a 1 GiB and a 4 MiB file (plus small ones):
#   `mount` (ro,noload), files match; copying the 4 MiB file reads only a few chunks from
#   the repository: at most 2 more than the chunks its extents lie in (filefrag; the
#   daemon's counters; the figure is printed for BENCHMARKS.md);
#   a newer backup and `prune --keep-last 1` keep the mounted generation (pinned by the
#   export) and say so; detach of the export behind the mount is refused; `umount`
#   removes mount, loop devices and daemon; the pin is gone; prune then removes it.
# - a GPT disk with ext4 in partition 2: `mount` without --partition lists the two
#   partitions and leaves nothing behind; --partition 2 mounts it, files match.
# - a killed exporter's pin is stale: prune removes it and says so.
# - refusals before anything is touched: a non-empty mount point, an unknown generation.
. "$(dirname "$0")/lib.sh"
need_root; need_fuse; need mkfs.ext4 mkfs.xfs sfdisk nbdinfo nbdcopy sha256sum mountpoint cmp filefrag
[ -x /usr/bin/python3 ] || skip "no /usr/bin/python3"
/usr/bin/python3 -c 'import nbd' 2>/dev/null || skip "python3-libnbd is not installed"
REPO=$T/repo
sha() { sha256sum "$1" | cut -d' ' -f1; }
hashes() { (cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum); }
pins() { ls "$REPO/pins" 2>/dev/null | wc -l; }
no_leftovers() { # NAME: no daemon, record, socket or loop device of a stopped export
  [ ! -e "$COWSNAP_RUN_DIR/$1.ctl" ] || fail "$1: control socket left"
  [ ! -e "$COWSNAP_RUN_DIR/$1.attach.json" ] || fail "$1: attach record left"
  [ ! -e "$COWSNAP_RUN_DIR/$1.mount.json" ] || fail "$1: mount record left"
  if losetup -n -O BACK-FILE | grep -qF "$COWSNAP_RUN_DIR/$1.fuse/"; then fail "$1: loop device left"; fi
}
mkdir -p "$T/m"

log "XFS disk: 512 MiB, attach --via fuse, mkfs.xfs, files"
truncate -s 512M "$T/x.img"
dev=$(ctl attach "$T/x.img" --name x34 --via fuse | tail -n 1) || fail "attach x34"
mkfs.xfs -q -f "$dev" || fail "mkfs.xfs"
mount "$dev" "$T/m" || fail "mount xfs"; track_mount "$T/m"
head -c $((20 << 20)) /dev/urandom > "$T/m/a.bin"
mkdir "$T/m/d"; for i in $(seq 50); do echo "x $i $RANDOM" > "$T/m/d/f$i"; done
hashes "$T/m" > "$T/x.hashes"; umount "$T/m" || fail "umount xfs"
gx=$(backup_gen x34 --to "repo:$REPO") || fail "backup x34"
log "generation $gx"

log "export --via none: map, nbdcopy = restore, status, read-only"
out=$(ctl export "repo:$REPO@$gx" --name ex1 --via none --json) || fail "export: $out"
uri=$(json_field "$out" .uri)
[ "$(pins)" = 1 ] || fail "no pin while exported: $(ls "$REPO/pins" 2>&1)"
rep=$(ctl restore "repo:$REPO@$gx" --to "$T/x.restored" --json | tail -n 1) || fail "restore"
nbdcopy "$uri" "$T/x.copy" || fail "nbdcopy"
cmp "$T/x.copy" "$T/x.restored" || fail "the export differs from the offline restore"
nbdinfo --map "$uri" > "$T/map" || fail "nbdinfo --map"
data=$(awk '$3 == 0 { s += $2 } END { print s + 0 }' "$T/map")
want=$(json_field "$rep" '.report.bytes_written // .bytes_written')
log "map: $(wc -l < "$T/map") extents, $data data bytes; restore wrote $want"
[ "$data" = "$want" ] || fail "map data bytes $data != restored data bytes $want: $(head "$T/map")"
holes=$(awk '$3 == 3' "$T/map" | wc -l)
[ "$holes" -gt 0 ] || fail "no hole in the map: $(head "$T/map")"
awk '$3 == 3 { print $1, $2 }' "$T/map" | head -n 20 | while read -r off len; do
  n=$(( len < 1048576 ? len : 1048576 ))
  [ -z "$(dd if="$T/x.restored" bs=1 skip="$off" count="$n" iflag=skip_bytes,count_bytes status=none | tr -d '\0' | head -c 1)" ] \
    || { echo "hole at $off holds data"; exit 1; }
done || fail "a hole of the map is not zeros in the restore"
st=$(ctl status ex1 --json) || fail "status"
[ "$(json_field "$st" .daemon.export.generation)" = "$gx" ] || fail "status generation: $st"
[ "$(json_field "$st" .daemon.read_only)" = true ] || fail "status not read-only: $st"
[ "$(json_field "$st" .daemon.size)" = $((512 << 20)) ] || fail "status size: $st"
if /usr/bin/python3 -c 'import nbd,sys; h=nbd.NBD(); h.connect_uri(sys.argv[1]); h.pwrite(b"x"*512, 0)' "$uri" 2>/dev/null; then
  fail "a write to the export succeeded"
fi
ctl detach ex1 || fail "detach ex1"
no_leftovers ex1
[ "$(pins)" = 0 ] || fail "pin left after detach: $(ls "$REPO/pins")"

log "mount the XFS generation"
out=$(ctl mount "repo:$REPO@$gx" "$T/m" --via fuse 2>&1) || fail "mount xfs gen: $out"
log "$out"
echo "$out" | grep -q "norecovery" || fail "xfs not mounted with norecovery: $out"
hashes "$T/m" | diff - "$T/x.hashes" >/dev/null || fail "files of the mounted XFS generation differ"
ctl umount "$T/m" || fail "umount xfs gen"
mountpoint -q "$T/m" && fail "still mounted"
ctl detach x34 >/dev/null || fail "detach x34"

log "ext4 disk: 100 GiB sparse, a 1 GiB and a 4 MiB file"
truncate -s 100G "$T/e.img"
dev=$(ctl attach "$T/e.img" --name e34 --via fuse | tail -n 1) || fail "attach e34"
mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1,nodiscard "$dev" || fail "mkfs.ext4"
mount -o noinit_itable "$dev" "$T/m" || fail "mount ext4"
head -c $((1 << 30)) /dev/urandom > "$T/m/big.bin"
head -c $((4 << 20)) /dev/urandom > "$T/m/small.bin"
mkdir "$T/m/d"; for i in $(seq 100); do echo "e $i $RANDOM" > "$T/m/d/f$i"; done
hashes "$T/m" > "$T/e.hashes"; umount "$T/m" || fail "umount ext4"
ge1=$(backup_gen e34 --to "repo:$REPO") || fail "backup e34"
log "generation $ge1: $(tail -n 1 "$T/bk.out" | jq -c '{bytes_read: (.stats.bytes_read // .report.stats.bytes_read)}' 2>/dev/null)"

log "mount refusals touch nothing"
touch "$T/m/x"
msg=$(ctl mount "repo:$REPO@$ge1" "$T/m" 2>&1) && fail "mount on a non-empty dir succeeded"
echo "$msg" | grep -q "not empty" || fail "refusal does not say why: $msg"
rm "$T/m/x"
msg=$(ctl mount "repo:$REPO@nosuchgen" "$T/m" 2>&1) && fail "mount of an unknown generation succeeded"
[ -z "$(ls "$COWSNAP_RUN_DIR" | grep -v '^x34\|^e34')" ] || fail "a refused mount left files: $(ls "$COWSNAP_RUN_DIR")"

log "mount the ext4 generation, copy the 4 MiB file"
out=$(ctl mount "repo:$REPO@$ge1" "$T/m" --name em 2>&1) || fail "mount ext4 gen: $out"
log "$out"
echo "$out" | grep -q "noload" || fail "ext4 not mounted with noload: $out"
f0=$(ctl status em --json | jq .daemon.export.stats.bytes_fetched)
c0=$(ctl status em --json | jq .daemon.export.stats.chunks_fetched)
cp "$T/m/small.bin" "$T/small.copy" || fail "copy"
f1=$(ctl status em --json | jq .daemon.export.stats.bytes_fetched)
c1=$(ctl status em --json | jq .daemon.export.stats.chunks_fetched)
grep -F "./small.bin" "$T/e.hashes" | grep -qF "$(sha "$T/small.copy")" || fail "copied file differs"
# The repository chunks (1 MiB) the file's extents lie in (FIEMAP via filefrag).
fc=$(/usr/bin/python3 - "$T/m/small.bin" <<'PY'
import re, subprocess, sys
out = subprocess.run(["filefrag", "-e", sys.argv[1]], capture_output=True, text=True, check=True).stdout
bs = int(re.search(r"blocks of (\d+) bytes", out).group(1))
chunks = set()
for a, b in re.findall(r"^\s*\d+:\s*\d+\.\.\s*\d+:\s*(\d+)\.\.\s*(\d+):", out, re.M):
    chunks.update(range(int(a) * bs >> 20, ((int(b) + 1) * bs - 1 >> 20) + 1))
print(len(chunks))
PY
) || fail "filefrag"
log "MEASURE: mount read $f0 bytes ($c0 chunks) from the repository; copying the 4 MiB file read $((f1 - f0)) bytes ($((c1 - c0)) chunks), its data lies in $fc chunks; disk 100 GiB, 1 GiB + 4 MiB of files"
[ $((c1 - c0)) -ge "$fc" ] || fail "the copy read fewer chunks ($((c1 - c0))) than the file's data lies in ($fc)?"
[ $((c1 - c0)) -le $((fc + 2)) ] || fail "copying the file read $((c1 - c0)) chunks; its data lies in $fc"
[ $((f1 - f0)) -le $((16 << 20)) ] || fail "copying a 4 MiB file read $((f1 - f0)) bytes from the repository"
[ "$f0" -le $((64 << 20)) ] || fail "mounting read $f0 bytes from the repository"
hashes "$T/m" | diff - "$T/e.hashes" >/dev/null || fail "files of the mounted ext4 generation differ"
msg=$(ctl detach em 2>&1) && fail "detach of the export behind a mount succeeded"
echo "$msg" | grep -q "umount" || fail "refused detach does not point at umount: $msg"

log "newer backup, prune --keep-last 1 keeps the mounted generation"
/usr/bin/python3 -c 'import nbd,sys; h=nbd.NBD(); h.connect_uri(sys.argv[1]); h.pwrite(b"y"*65536, 1<<30); h.flush(); h.shutdown()' \
  "nbd+unix:///e34?socket=$COWSNAP_RUN_DIR/e34.nbd" || fail "write to e34"
ge2=$(backup_gen e34 --to "repo:$REPO" --incremental) || fail "backup e34 #2"
ctl prune "repo:$REPO" --keep-last 1 > "$T/prune.out" 2>&1 || fail "prune: $(cat "$T/prune.out")"
cat "$T/prune.out"
grep -q "kept $ge1: pinned by export em" "$T/prune.out" || fail "prune does not say the export pins $ge1"
ctl list "repo:$REPO" --json | jq -e --arg g "$ge1" 'map(.id) | index($g) != null' >/dev/null || fail "$ge1 was pruned while mounted"
hashes "$T/m" | diff - "$T/e.hashes" >/dev/null || fail "files differ after prune"

log "umount removes mount, devices, daemon and pin"
pid=$(ctl status em --json | jq .daemon.pid)
ctl umount "$T/m" || fail "umount"
mountpoint -q "$T/m" && fail "still mounted after umount"
wait_gone "$pid" 10 || fail "daemon $pid still runs"
no_leftovers em
[ "$(pins)" = 0 ] || fail "pin left after umount: $(ls "$REPO/pins")"
ctl prune "repo:$REPO" --keep-last 1 > "$T/prune.out" 2>&1 || fail "prune 2"
ctl list "repo:$REPO" --json | jq -e --arg g "$ge1" 'map(.id) | index($g) == null' >/dev/null || fail "$ge1 kept after umount"
ctl detach e34 >/dev/null || fail "detach e34"

log "GPT disk, ext4 in partition 2"
truncate -s 256M "$T/g.img"
printf 'label: gpt\nsize=16MiB\nsize=200MiB\n' | sfdisk -q "$T/g.img" || fail "sfdisk"
read -r s2 n2 < <(partx -g -r -o START,SECTORS --nr 2 "$T/g.img")
lo=$(losetup -f --show -o $((s2 * 512)) --sizelimit $((n2 * 512)) "$T/g.img") || fail "losetup"
mkfs.ext4 -q -F "$lo" || fail "mkfs p2"
mount "$lo" "$T/m" || fail "mount p2"
for i in $(seq 30); do head -c $((i * 1000)) /dev/urandom > "$T/m/p$i"; done
hashes "$T/m" > "$T/g.hashes"; umount "$T/m"; losetup -d "$lo"
ctl attach "$T/g.img" --name g34 --via none >/dev/null || fail "attach g34"
gg=$(backup_gen g34 --to "repo:$REPO") || fail "backup g34"
msg=$(ctl mount "repo:$REPO@$gg" "$T/m" 2>&1) && fail "mount of a two-partition disk without --partition succeeded"
echo "$msg" | grep -q "2 partitions" && echo "$msg" | grep -q -- "--partition" || fail "refusal does not list the partitions: $msg"
mountpoint -q "$T/m" && fail "mounted anyway"
[ -z "$(ls "$COWSNAP_RUN_DIR" | grep -v '^g34')" ] || fail "a failed mount left files: $(ls "$COWSNAP_RUN_DIR")"
[ "$(pins)" = 0 ] || fail "a failed mount left a pin"
out=$(ctl mount "repo:$REPO@$gg" "$T/m" --partition 2 2>&1) || fail "mount --partition 2: $out"
log "$out"
hashes "$T/m" | diff - "$T/g.hashes" >/dev/null || fail "files of partition 2 differ"
ctl umount "$T/m" || fail "umount p2"
if losetup -n -O BACK-FILE | grep -qF "$COWSNAP_RUN_DIR/"; then fail "loop devices left: $(losetup -a)"; fi

log "a killed exporter's pin is stale"
out=$(ctl export "repo:$REPO@$gg" --name ek --via none --json) || fail "export ek"
pid=$(json_field "$out" .pid)
kill -9 "$pid"; wait_gone "$pid" 10 || fail "exporter survived kill -9"
[ "$(pins)" = 1 ] || fail "no pin left by the killed exporter"
ctl prune "repo:$REPO" --keep-last 1 > "$T/prune.out" 2>&1 || fail "prune 3: $(cat "$T/prune.out")"
grep -q "no longer holds it" "$T/prune.out" || fail "prune does not call the pin stale: $(cat "$T/prune.out")"
[ "$(pins)" = 0 ] || fail "stale pin not removed"
ctl detach ek --force >/dev/null 2>&1
ctl detach g34 >/dev/null || fail "detach g34"
log "PASS"
