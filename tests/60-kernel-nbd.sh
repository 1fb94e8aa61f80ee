#!/usr/bin/env bash
# The kernel NBD path (`attach --via nbd`, netlink) on a real kernel: when this host's
# kernel has no nbd module, scripts/vm.sh boots Debian's own kernel under qemu (TCG) on
# this machine's files and tests/vm/kernel-nbd.sh runs there as root (attach, ext4 and
# XFS, --read-only, stamped-sector cut consistency, FLUSH/FUA, reconnect after kill -9,
# restart, upgrade, pgbench). Skips only when no VM can boot here; anything else that
# goes wrong in the VM fails.
#   KNBD_ONLY="attach fs ..."   only these parts (see tests/vm/kernel-nbd.sh)
#   COWSNAP_VM=0                run on this host's kernel instead (it must have nbd)
. "$(dirname "$0")/lib.sh"
need_root

INNER=$ROOT/tests/vm/kernel-nbd.sh
envs=(COWSNAP_BIN_DIR="$BIN" KNBD_ONLY="${KNBD_ONLY:-}" KNBD_PG_SECS="${KNBD_PG_SECS:-}")
if [ "${COWSNAP_VM:-1}" = 0 ] || { [ -d /sys/module/nbd ] && [ -b /dev/nbd0 ]; }; then
  log "running on this host's kernel ($(uname -r))"
  env "${envs[@]}" bash "$INNER"; exit $?
fi
log "this kernel ($(uname -r)) has no nbd module: booting a VM (scripts/vm.sh)"
bash "$ROOT/scripts/vm.sh" --install >"$T/install.out" 2>&1 ||
  skip "unable to install the VM's packages: $(tail -n 3 "$T/install.out")"
# KNBD_TIMEOUT seconds (default 1200) for all of it
vm_test "${KNBD_TIMEOUT:-1200}" 3G "kernel-nbd: running on" -- env "${envs[@]}" bash "$INNER" ||
  fail "kernel NBD test in the VM failed (exit $?)"
log "PASS"
