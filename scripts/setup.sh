#!/usr/bin/env bash
# Installs the Debian packages cowsnap's tests, demo and benchmarks need. Idempotent.
set -euo pipefail
PKGS=(nbdkit libnbd-bin python3-libnbd fio qemu-utils e2fsprogs xfsprogs fuse3 util-linux fdisk
      postgresql postgresql-contrib kmod procps psmisc jq prometheus curl zsh fish openssl
      ceph-mon ceph-osd ceph-mgr radosgw ceph-common uuid-runtime)
missing=()
. "$(dirname "${BASH_SOURCE[0]}")/pkg.sh"
mapfile -t missing < <(pkg_missing "${PKGS[@]}")
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The prometheus package (for tests/41: prometheus and promtool) enables and starts
  # its own service where systemd runs; the test runs its own instance on a private
  # port, so a service this script just installed is stopped and disabled.
  if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus.service >/dev/null 2>&1 || true
  fi
  # Likewise Ceph (the S3 store of tests/70, scripts/s3-server.sh, is started by hand).
  if [[ " ${missing[*]} " == *" ceph-mon "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now ceph.target >/dev/null 2>&1 || true
  fi
fi
command -v cargo >/dev/null || [ -x "$HOME/.cargo/bin/cargo" ] || { echo "setup: cargo not found (install a Rust toolchain)"; exit 1; }
# Fuzzing (tests/55-fuzz.sh) needs cargo-fuzz, built with Rust nightly; without nightly
# the fuzz test skips.
export PATH=$HOME/.cargo/bin:$PATH
if cargo +nightly --version >/dev/null 2>&1 && ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo +nightly install cargo-fuzz --locked || echo "setup: unable to install cargo-fuzz; the fuzz test will skip"
fi
