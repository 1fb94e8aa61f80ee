#!/usr/bin/env bash
# Runs a command as root in a VM booted from Debian's own kernel (which has the nbd
# module), on this machine's root filesystem: the kernel NBD path can be tested on a
# host whose running kernel has no nbd module. Installs what it needs (idempotent):
# qemu-system-x86, linux-image-amd64, busybox-static from Debian, and virtme-ng from
# PyPI in a virtualenv ($COWSNAP_VNG_VENV, default /opt/virtme-ng).
#
#   scripts/vm.sh --install            install only
#   scripts/vm.sh --check              install, then say whether a VM can boot here (exit 0/1)
#   scripts/vm.sh --kernel             install, then print the path of the kernel it boots
#   scripts/vm.sh [--rwdir DIR] [--memory 2G] [--cpus 2] -- CMD [ARG...]
#                                      boot, run CMD (in the VM: root, cwd = this cwd,
#                                      the host's files read-only except DIR), exit with
#                                      CMD's exit status; 125 when the VM did not boot or
#                                      CMD's status could not be read back
#
# The VM runs without KVM (TCG: a nested KVM boot hangs on the machines this was
# written for; `COWSNAP_VM_KVM=1` tries KVM), so it is slow: about 25 s to boot, and
# CPU-bound work runs several times slower than on the host. Unix sockets cannot be
# created in DIR (a 9p/virtiofs share answers ENXIO): put run directories on a tmpfs in
# the VM, e.g. /dev/shm. The kernel is the newest /boot/vmlinuz-*-amd64 ($COWSNAP_VM_KERNEL
# overrides it). Nothing of the host is changed besides the installs.
set -uo pipefail
VENV=${COWSNAP_VNG_VENV:-/opt/virtme-ng}
RWDIR="" MEM=2G CPUS=2 MODE=run

while [ $# -gt 0 ]; do
  case $1 in
    --install) MODE=install; shift;;
    --check) MODE=check; shift;;
    --kernel) MODE=kernel; shift;;
    --rwdir) RWDIR=$2; shift 2;;
    --memory) MEM=$2; shift 2;;
    --cpus) CPUS=$2; shift 2;;
    --) shift; break;;
    *) break;;
  esac
done

say() { echo "vm.sh: $*" >&2; }

install() {
  local missing=()
  . "$(dirname "${BASH_SOURCE[0]}")/pkg.sh"
  mapfile -t missing < <(pkg_missing qemu-system-x86 linux-image-amd64 busybox-static python3-venv)
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
      { say "unable to install ${missing[*]}"; return 1; }
    # The distribution's qemu-system-x86 takes a newer qemu-utils (a backport) away
    # with it; the other tests need qemu-img and qemu-io: put the distribution's back.
    if ! command -v qemu-io >/dev/null || ! command -v qemu-img >/dev/null; then
      say "qemu-img/qemu-io gone with that install: installing the distribution's qemu-utils"
      apt-get install -y -qq --no-install-recommends qemu-utils >/dev/null ||
        { say "unable to install qemu-utils"; return 1; }
    fi
  fi
  if [ ! -x "$VENV/bin/vng" ]; then
    say "installing virtme-ng into $VENV"
    { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q virtme-ng; } >&2 ||
      { say "unable to install virtme-ng"; return 1; }
  fi
}

kernel() {
  if [ -n "${COWSNAP_VM_KERNEL:-}" ]; then echo "$COWSNAP_VM_KERNEL"; return; fi
  ls /boot/vmlinuz-*-amd64 2>/dev/null | sort -V | tail -n 1
}

install || exit 125
K=$(kernel)
[ -n "$K" ] && [ -r "$K" ] || { say "no Debian kernel in /boot (linux-image-amd64)"; exit 125; }
[ "$MODE" = install ] && { say "ready: $VENV/bin/vng, kernel $K"; exit 0; }
[ "$MODE" = kernel ] && { echo "$K"; exit 0; }

KVM=(--disable-kvm)
[ "${COWSNAP_VM_KVM:-0}" = 1 ] && KVM=()
own_rwdir=""
if [ -z "$RWDIR" ]; then RWDIR=$(mktemp -d /tmp/cowsnap-vm.XXXXXX); own_rwdir=$RWDIR; fi
RWDIR=$(cd "$RWDIR" && pwd)
tag=$$.$RANDOM
rcfile=$RWDIR/.vm-rc.$tag
trap '[ -n "$own_rwdir" ] && rm -rf "$own_rwdir"; rm -f "$rcfile"' EXIT

if [ "$MODE" = check ]; then set -- true; fi
[ $# -gt 0 ] || { say "no command given (scripts/vm.sh -- CMD ...)"; exit 2; }
# The command runs under bash inside the VM; its status is written to the shared dir,
# since not every virtme-ng version passes it through.
inner=$(printf '%q ' "$@")
script="cd $(printf '%q' "$PWD") 2>/dev/null || cd /; $inner; echo \$? > $(printf '%q' "$rcfile")"
say "booting $K (${KVM[*]:-kvm}, $MEM, $CPUS cpus)"
PATH=$VENV/bin:$PATH "$VENV/bin/vng" -r "$K" --disable-microvm "${KVM[@]}" --memory "$MEM" --cpus "$CPUS" \
  --rwdir "$RWDIR" --exec "bash -c $(printf '%q' "$script")" </dev/null
vrc=$?
if [ ! -s "$rcfile" ]; then
  say "the VM did not run the command to its end (vng exit $vrc)"
  exit 125
fi
rc=$(cat "$rcfile")
[ "$MODE" = check ] && say "a VM boots here"
exit "$rc"
