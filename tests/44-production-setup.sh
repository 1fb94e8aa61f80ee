#!/usr/bin/env bash
# The production set-up as an admin does it: scripts/install.sh stages binaries, pages,
# completions, systemd units, the generator and the udev rule; `systemd-analyze verify`
# accepts the units (with the generator's schedule drop-in; a bad schedule is refused,
# so the drop-in is really read); the configuration file's errors name the line and
# change nothing; `cowsnapctl up` attaches the configured disks (one via fuse with ext4
# mounted through /dev/cowsnap/NAME, one via none), again is a no-op, and a missing
# origin fails only its own disk; `backup NAME` without --to backs up into the
# configured repository (full, then incremental) and applies the disk's retention;
# `down` refuses a mounted disk, then detaches and removes the stable path.
. "$(dirname "$0")/lib.sh"
need_root; need_fuse; need mkfs.ext4 systemd-analyze sha256sum
command -v zsh >/dev/null && command -v fish >/dev/null || skip "zsh and fish are not installed"

# --- install.sh (staged) -------------------------------------------------------------
log "install.sh --destdir"
S=$T/stage
bash "$ROOT/scripts/install.sh" --no-build --destdir "$S" >"$T/install.out" 2>&1 ||
  fail "install.sh: $(cat "$T/install.out")"
for f in usr/local/bin/cowsnapctl usr/local/bin/cowsnap-nbd \
  usr/local/share/man/man1/cowsnapctl.1 usr/local/share/man/man1/cowsnapctl-up.1 \
  usr/local/share/man/man1/cowsnapctl-backup.1 usr/local/share/man/man8/cowsnap-nbd.8 \
  usr/share/bash-completion/completions/cowsnapctl usr/share/zsh/vendor-completions/_cowsnapctl \
  usr/share/fish/vendor_completions.d/cowsnapctl.fish \
  etc/systemd/system/cowsnap@.service etc/systemd/system/cowsnap-backup@.service \
  etc/systemd/system/cowsnap-backup@.timer etc/systemd/system/cowsnap-metrics.service \
  usr/lib/systemd/system-generators/cowsnap-generator etc/udev/rules.d/99-cowsnap.rules \
  etc/cowsnap/cowsnap.toml; do
  [ -s "$S/$f" ] || fail "install.sh did not install /$f"
done
[ -x "$S/usr/lib/systemd/system-generators/cowsnap-generator" ] || fail "generator not executable"
bash -n "$S/usr/share/bash-completion/completions/cowsnapctl" || fail "bash completion does not parse"
zsh -n "$S/usr/share/zsh/vendor-completions/_cowsnapctl" || fail "zsh completion does not parse"
fish -n "$S/usr/share/fish/vendor_completions.d/cowsnapctl.fish" || fail "fish completion does not parse"
# The example configuration checks clean (it configures no disk until edited).
ctl config --config "$S/etc/cowsnap/cowsnap.toml" >"$T/c.out" 2>&1 || fail "example config: $(cat "$T/c.out")"
echo 'keep' > "$S/etc/cowsnap/cowsnap.toml"
bash "$ROOT/scripts/install.sh" --no-build --destdir "$S" >/dev/null 2>&1 || fail "install.sh again"
[ "$(cat "$S/etc/cowsnap/cowsnap.toml")" = keep ] || fail "install.sh overwrote an existing configuration"

# --- systemd-analyze verify -----------------------------------------------------------
log "systemd-analyze verify (units as installed, binaries of this build)"
U=$T/units G=$T/gen; mkdir -p "$U" "$G"
for f in "$S"/etc/systemd/system/*; do
  sed "s#/usr/local/bin/#$BIN/#g" "$f" > "$U/$(basename "$f")"
done
cat > "$T/sched.toml" <<EOF
[defaults]
repository = "repo:$T/repo"
[disk.pg44]
path = "/dev/disk/by-id/example"
schedule = "*-*-* 02:30"
EOF
"$S/usr/lib/systemd/system-generators/cowsnap-generator" "$G" "$G" "$G" 2>/dev/null
# The installed wrapper runs /usr/local/bin/cowsnapctl (maybe absent here): run the
# generator of this build with the test's configuration instead.
rm -rf "$G"/*; ctl systemd-generator "$G" "$G" "$G" --config "$T/sched.toml" || fail "generator"
grep -qx 'OnCalendar=\*-\*-\* 02:30' "$G/cowsnap-backup@pg44.timer.d/50-schedule.conf" || fail "generator drop-in"
verify() { (cd "$T" && SYSTEMD_UNIT_PATH=$G:$U: systemd-analyze verify --man=no "$@") >"$T/verify.out" 2>&1; }
verify cowsnap@pg44.service cowsnap-backup@pg44.service cowsnap-backup@pg44.timer cowsnap-metrics.service ||
  fail "systemd-analyze verify: $(cat "$T/verify.out")"
printf '[Timer]\nOnCalendar=\nOnCalendar=bogus!!\n' > "$G/cowsnap-backup@pg44.timer.d/50-schedule.conf"
verify cowsnap-backup@pg44.timer && fail "verify accepted a bad schedule drop-in (is it read at all?)"
grep -q 'ExecStart=.*cowsnapctl up --wait' "$U/cowsnap@.service" || fail "cowsnap@.service does not run up"
grep -q '^Before=local-fs-pre.target' "$U/cowsnap@.service" || fail "cowsnap@.service not before local-fs-pre"
# cowsnapctl config asks systemd about schedules.
sed -i 's/02:30/bogus!!/' "$T/sched.toml"
ctl config --config "$T/sched.toml" >"$T/c.out" 2>&1 && fail "config accepted a bad schedule"
grep -q 'invalid schedule "\*-\*-\* bogus!!"' "$T/c.out" || fail "bad schedule message: $(cat "$T/c.out")"

# --- configuration errors change nothing -------------------------------------------------
log "configuration errors"
truncate -s 256M "$T/a.img"; truncate -s 64M "$T/b.img"
C=$T/cowsnap.toml
cat > "$C" <<EOF
[defaults]
repository = "repo:$T/repo"
retention = { keep-last = 1 }

[disk.a44]
path = "$T/a.img"
via = "fuse"
chunk-size = "63K"
EOF
ctl up --config "$C" >"$T/up.out" 2>&1 && fail "up accepted chunk-size 63K"
grep -q "cowsnap.toml: line 8, column 14: invalid chunk-size" "$T/up.out" || fail "error does not name the line: $(cat "$T/up.out")"
ls "$COWSNAP_RUN_DIR" | grep -q . && fail "a refused up left files in the run dir: $(ls "$COWSNAP_RUN_DIR")"
ctl up nope --config "$C" >/dev/null 2>&1 && fail "up accepted a broken file"
sed -i 's/^chunk-size = "63K"$/chunk-size = "64K"/' "$C"
cat >> "$C" <<EOF

[disk.b44]
path = "$T/b.img"
via = "none"
retention = { keep-last = 5 }
EOF
ctl config --config "$C" >"$T/c.out" 2>&1 || fail "config: $(cat "$T/c.out")"
grep -q "2 disk(s), ok" "$T/c.out" || fail "config output: $(cat "$T/c.out")"
ctl up nope --config "$C" >"$T/up.out" 2>&1 && fail "up accepted an unknown disk"
grep -q 'no disk "nope"' "$T/up.out" || fail "unknown disk message: $(cat "$T/up.out")"
[ -e "$COWSNAP_RUN_DIR/a44.ctl" ] && fail "up of an unknown disk attached another"

# --- up, the stable path, backups from the configuration --------------------------------
log "up"
ctl up --config "$C" >"$T/up.out" 2>&1 || fail "up: $(cat "$T/up.out")"
LINK=/dev/cowsnap/a44
[ -L "$LINK" ] || fail "no stable path $LINK: $(cat "$T/up.out")"
dev=$(jq -r .device "$COWSNAP_RUN_DIR/a44.attach.json")
[ "$(readlink -f "$LINK")" = "$(readlink -f "$dev")" ] || fail "$LINK points to $(readlink -f "$LINK"), not $dev"
[ -S "$COWSNAP_RUN_DIR/b44.nbd" ] || fail "b44 (via none) not attached"
[ -e /dev/cowsnap/b44 ] && fail "a disk without a device got a stable path"
ctl up --config "$C" >"$T/up.out" 2>&1 || fail "up again: $(cat "$T/up.out")"
grep -q "a44: already attached" "$T/up.out" || fail "up again: $(cat "$T/up.out")"
mkfs.ext4 -q -F "$LINK" || fail "mkfs through $LINK"
mkdir -p "$T/mnt"; mount "$LINK" "$T/mnt" || fail "mount $LINK"; track_mount "$T/mnt"
head -c $((20 << 20)) /dev/urandom > "$T/mnt/f1"; sync

log "backup a44 without --to: full, then incremental, retention keep-last 1"
ctl backup a44 --config "$C" --quiesce-idle 0 --json >"$T/bk1.out" 2>"$T/bk1.err" || fail "backup 1: $(cat "$T/bk1.err")"
grep -q "backing up a44 to repo:$T/repo" "$T/bk1.err" || fail "backup 1 did not say where: $(cat "$T/bk1.err")"
ctl list "repo:$T/repo" --json > "$T/l1.json" || fail "list 1"
[ "$(jq 'length' "$T/l1.json")" = 1 ] || fail "after backup 1: $(cat "$T/l1.json")"
g1=$(jq -r '.[0].id' "$T/l1.json")
head -c $((4 << 20)) /dev/urandom > "$T/mnt/f2"; sync
sum_f1=$(sha256sum < "$T/mnt/f1"); sum_f2=$(sha256sum < "$T/mnt/f2")
ctl backup a44 --config "$C" --quiesce-idle 0 --freeze "$T/mnt" --json >"$T/bk2.out" 2>"$T/bk2.err" || fail "backup 2: $(cat "$T/bk2.err")"
ctl list "repo:$T/repo" --json > "$T/l2.json" || fail "list 2"
[ "$(jq 'length' "$T/l2.json")" = 1 ] || fail "retention keep-last 1 left: $(jq -r '.[].id' "$T/l2.json")"
g2=$(jq -r '.[0].id' "$T/l2.json")
[ "$g2" != "$g1" ] || fail "the newest generation was pruned"
[ "$(jq -r '.[0].kind' "$T/l2.json")" = incremental ] || fail "backup 2 was not incremental: $(cat "$T/l2.json")"
ctl backup b44 --config "$C" --quiesce-idle 0 --json >/dev/null 2>"$T/bk3.err" || fail "backup b44: $(cat "$T/bk3.err")"
[ "$(ctl list "repo:$T/repo" --json | jq 'length')" = 2 ] || fail "b44's backup or a44's retention touched the other disk"
ctl verify "repo:$T/repo" >/dev/null 2>&1 || fail "verify after retention"
ctl restore "repo:$T/repo@$g2" --to "$T/r.img" >/dev/null 2>&1 || fail "restore $g2"
mkdir -p "$T/rmnt"; mount -o ro,noload "$T/r.img" "$T/rmnt" || fail "mount the restored image"; track_mount "$T/rmnt"
[ "$(sha256sum < "$T/rmnt/f1")" = "$sum_f1" ] && [ "$(sha256sum < "$T/rmnt/f2")" = "$sum_f2" ] ||
  fail "the restored files differ"
umount "$T/rmnt"

# --- down --------------------------------------------------------------------------------
log "down"
ctl down a44 --config "$C" >"$T/down.out" 2>&1 && fail "down detached a mounted disk"
grep -q "is mounted on" "$T/down.out" || fail "down: $(cat "$T/down.out")"
ctl status a44 >/dev/null 2>&1 || fail "a refused down detached a44"
[ -L "$LINK" ] || fail "a refused down removed $LINK"
umount "$T/mnt"
ctl down --config "$C" >"$T/down.out" 2>&1 || fail "down: $(cat "$T/down.out")"
[ -e "$LINK" ] || [ -L "$LINK" ] && fail "down left $LINK"
[ -e "$COWSNAP_RUN_DIR/a44.ctl" ] || [ -e "$COWSNAP_RUN_DIR/b44.ctl" ] && fail "down left a daemon: $(ls "$COWSNAP_RUN_DIR")"

log "up with one origin missing: the other disk still goes up"
rm -f "$T/b.img"
ctl up --config "$C" >"$T/up.out" 2>&1 && fail "up with a missing origin exited 0"
grep -q "b44: unable to attach: $T/b.img does not exist" "$T/up.out" || fail "missing origin: $(cat "$T/up.out")"
[ -L "$LINK" ] || fail "a44 did not go up beside the missing b44"
ctl down --config "$C" >/dev/null 2>&1 || fail "down"
log "PASS"
