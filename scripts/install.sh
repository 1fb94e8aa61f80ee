#!/usr/bin/env bash
# Installs cowsnap for production use: the binaries, manual pages, shell completions,
# systemd units and generator, the udev rule for /dev/cowsnap/NAME, an example
# configuration (never over an existing one) and the Prometheus alert rules.
#   scripts/install.sh                 build (release) and install under /usr/local
#   scripts/install.sh --no-build      install what target/release holds
#   scripts/install.sh --destdir DIR   stage everything under DIR (packaging, tests)
#   scripts/install.sh --prefix P      binaries in P/bin, pages in P/share/man (/usr/local)
# Then: edit /etc/cowsnap/cowsnap.toml, `cowsnapctl config`, and
#   systemctl enable --now cowsnap@NAME.service cowsnap-backup@NAME.timer
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PREFIX=/usr/local DESTDIR= BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --destdir) DESTDIR=$(realpath -m "$2"); shift 2;;
    --prefix) PREFIX=$2; shift 2;;
    --no-build) BUILD=0; shift;;
    -h|--help) sed -n '2,11p' "$0"; exit 0;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2;;
  esac
done
case "$PREFIX" in /*) ;; *) echo "install.sh: --prefix must be absolute" >&2; exit 2;; esac
if [ "$BUILD" = 1 ]; then
  export PATH=$HOME/.cargo/bin:$PATH
  cargo build --release --workspace --bins
fi
BIN=$ROOT/target/release
for b in cowsnapctl cowsnap-nbd; do
  [ -x "$BIN/$b" ] || { echo "install.sh: $BIN/$b is missing (build first)" >&2; exit 1; }
done

d() { install -d -m "${2:-0755}" "$DESTDIR$1"; }
d "$PREFIX/bin"; d "$PREFIX/share/man/man1"; d "$PREFIX/share/man/man8"
d /etc/systemd/system; d /usr/lib/systemd/system-generators; d /etc/udev/rules.d
d /etc/cowsnap; d /var/lib/cowsnap 0700
d /usr/share/bash-completion/completions; d /usr/share/zsh/vendor-completions
d /usr/share/fish/vendor_completions.d; d "$PREFIX/share/cowsnap"

install -m 0755 "$BIN/cowsnapctl" "$BIN/cowsnap-nbd" "$DESTDIR$PREFIX/bin/"
# Manual pages and completions come from the installed binary's own definitions.
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
"$BIN/cowsnapctl" man "$tmp" >/dev/null
install -m 0644 "$tmp"/*.1 "$DESTDIR$PREFIX/share/man/man1/"
install -m 0644 "$tmp"/*.8 "$DESTDIR$PREFIX/share/man/man8/"
"$BIN/cowsnapctl" completions bash > "$DESTDIR/usr/share/bash-completion/completions/cowsnapctl"
"$BIN/cowsnapctl" completions zsh > "$DESTDIR/usr/share/zsh/vendor-completions/_cowsnapctl"
"$BIN/cowsnapctl" completions fish > "$DESTDIR/usr/share/fish/vendor_completions.d/cowsnapctl.fish"

# Units and the generator name the binaries by their installed path.
subst() { sed "s#/usr/local/bin/#$PREFIX/bin/#g" "$1"; }
for u in cowsnap@.service cowsnap-backup@.service cowsnap-backup@.timer cowsnap-metrics.service; do
  subst "dist/systemd/$u" > "$DESTDIR/etc/systemd/system/$u"; chmod 0644 "$DESTDIR/etc/systemd/system/$u"
done
subst dist/systemd/cowsnap-generator > "$DESTDIR/usr/lib/systemd/system-generators/cowsnap-generator"
chmod 0755 "$DESTDIR/usr/lib/systemd/system-generators/cowsnap-generator"
subst dist/udev/99-cowsnap.rules > "$DESTDIR/etc/udev/rules.d/99-cowsnap.rules"
chmod 0644 "$DESTDIR/etc/udev/rules.d/99-cowsnap.rules"
if [ -e "$DESTDIR/etc/cowsnap/cowsnap.toml" ]; then
  echo "kept the existing /etc/cowsnap/cowsnap.toml"
else
  install -m 0644 dist/config/cowsnap.toml "$DESTDIR/etc/cowsnap/cowsnap.toml"
fi
install -m 0644 dist/prometheus/cowsnap-rules.yml "$DESTDIR$PREFIX/share/cowsnap/"

# Tell the running systemd and udev (not when staging).
if [ -z "$DESTDIR" ]; then
  if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
  if [ -S /run/udev/control ]; then udevadm control --reload || true; fi
fi
echo "installed cowsnap under ${DESTDIR:-/} (binaries in $PREFIX/bin)"
