#!/usr/bin/env bash
# Builds the kernel's own ublk driver (drivers/block/ublk_drv.c) as a module for a
# Debian kernel whose configuration leaves it out (Debian 12's 6.1 kernels have
# CONFIG_BLK_DEV_UBLK unset), from the distribution's kernel source and headers of
# that kernel. tests/16-ublk.sh uses it to run the ublk path against the real driver in
# the VM of scripts/vm.sh on hosts that have no ublk_drv. Prints the module's path.
#
#   scripts/ublk-module.sh KVER       e.g. 6.1.0-57-amd64
#
# Installs linux-headers-KVER and linux-source-X.Y (idempotent). The module is cached
# in $COWSNAP_UBLK_CACHE (default /var/cache/cowsnap/ublk)/KVER/ublk_drv.ko and
# rebuilt only when missing. Exits 1 with the reason when it cannot build.
set -euo pipefail
KVER=${1:?usage: scripts/ublk-module.sh KVER}
CACHE=${COWSNAP_UBLK_CACHE:-/var/cache/cowsnap/ublk}/$KVER
say() { echo "ublk-module: $*" >&2; }
die() { say "$*"; exit 1; }

KO=$CACHE/ublk_drv.ko
if [ -s "$KO" ] && modinfo -F vermagic "$KO" 2>/dev/null | grep -q "^$KVER "; then
  echo "$KO"; exit 0
fi

series=$(echo "$KVER" | grep -oE '^[0-9]+\.[0-9]+') || die "not a kernel version: $KVER"
. "$(dirname "${BASH_SOURCE[0]}")/pkg.sh"
mapfile -t missing < <(pkg_missing "linux-headers-$KVER" "linux-source-$series" make gcc xz-utils)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >/dev/null ||
    die "unable to install ${missing[*]}"
fi
src=/usr/src/linux-source-$series.tar.xz
[ -r "$src" ] || die "no $src after installing linux-source-$series"
build=/lib/modules/$KVER/build
[ -d "$build" ] || die "no $build after installing linux-headers-$KVER"

work=$(mktemp -d /tmp/cowsnap-ublk-module.XXXXXX)
trap 'rm -rf "$work"' EXIT
tar -xJf "$src" -C "$work" --strip-components=3 "linux-source-$series/drivers/block/ublk_drv.c" ||
  die "no drivers/block/ublk_drv.c in $src (a kernel before 6.0?)"
echo 'obj-m := ublk_drv.o' > "$work/Kbuild"
make -s -C "$build" M="$work" modules >"$work/build.log" 2>&1 ||
  die "build failed: $(tail -n 5 "$work/build.log")"
modinfo -F vermagic "$work/ublk_drv.ko" | grep -q "^$KVER " ||
  die "the module built is not for $KVER: $(modinfo -F vermagic "$work/ublk_drv.ko")"
mkdir -p "$CACHE"
cp "$work/ublk_drv.ko" "$KO.tmp" && mv "$KO.tmp" "$KO"
say "built $KO from $src"
echo "$KO"
