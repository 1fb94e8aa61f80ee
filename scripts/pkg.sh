# Sourced by the scripts that install Debian packages (setup.sh, s3-server.sh, vm.sh).
# pkg_missing PKG...: print, one a line, the packages of PKG... that are not installed.
# Asks dpkg for the status: `dpkg -s` also succeeds for a package that was removed and
# left its configuration files behind.
pkg_missing() {
  local p
  for p in "$@"; do
    [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == *" ok installed" ]] || echo "$p"
  done
}
