#!/usr/bin/env bash
# An S3-compatible object store on loopback for tests and benchmarks: a single-node Ceph
# cluster (one monitor, one manager, one BlueStore OSD on a sparse file, pools of size 1,
# no cephx) with a radosgw (beast frontend) in front, and one S3 user.
#
#   scripts/s3-server.sh start   install the packages if missing, start (idempotent)
#   scripts/s3-server.sh env     print AWS_* exports for the user (eval "$(... env)")
#   scripts/s3-server.sh mb BKT  create bucket BKT (as the user; curl's SigV4)
#   scripts/s3-server.sh stop    stop every daemon it started and remove the state dir
#   scripts/s3-server.sh rgw-stop / rgw-start   stop or start radosgw alone (an S3 outage)
#
# Everything lives under COWSNAP_S3_DIR (default /var/tmp/cowsnap-s3); the S3 endpoint is
# http://127.0.0.1:COWSNAP_S3_PORT (default 17480), the monitor listens on
# 127.0.0.1:COWSNAP_S3_MON_PORT (default 13300). Root only (the OSD's BlueStore and the
# daemons run as the caller).
set -euo pipefail
S=${COWSNAP_S3_DIR:-/var/tmp/cowsnap-s3}
PORT=${COWSNAP_S3_PORT:-17480}
MON_PORT=${COWSNAP_S3_MON_PORT:-13300}
PKGS=(ceph-mon ceph-osd ceph-mgr radosgw ceph-common uuid-runtime curl)
DAEMONS=(rgw osd mgr mon) # stop order
CONF=$S/ceph.conf

die() { echo "s3-server: $*" >&2; exit 1; }

install_pkgs() {
  local missing=()
  . "$(dirname "${BASH_SOURCE[0]}")/pkg.sh"
  mapfile -t missing < <(pkg_missing "${PKGS[@]}")
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "s3-server: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Where systemd runs, the packages enable their units; this store is started by hand.
  if [ -d /run/systemd/system ]; then systemctl disable --now ceph.target >/dev/null 2>&1 || true; fi
}

alive() { # NAME: the daemon recorded in $S/run/NAME.pid runs
  local f=$S/run/$1.pid pid
  [ -f "$f" ] || return 1
  pid=$(cat "$f")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

run_daemon() { # NAME CMD...: start in the foreground in its own session, record its pid
  local name=$1; shift
  setsid "$@" -f -c "$CONF" >>"$S/log/$name.out" 2>&1 </dev/null &
  echo $! >"$S/run/$name.pid"
}

rgw_up() { curl -s -o /dev/null -m 2 "http://127.0.0.1:$PORT/"; }

wait_for() { # SECONDS WHAT CMD...
  local t=$1 what=$2; shift 2
  local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $end ]; then
      tail -n 3 "$S"/log/*.out >&2 2>/dev/null || true
      die "$what did not come up in ${t}s (logs: $S/log)"
    fi
    sleep 0.5
  done
}

ceph_() { timeout 30 ceph -c "$CONF" "$@"; }

start() {
  [ "$(id -u)" = 0 ] || die "must run as root"
  install_pkgs
  if alive rgw && alive osd && alive mon && alive mgr && rgw_up && [ -s "$S/user.json" ]; then
    return 0
  fi
  # A half-started or stale store: start over.
  stop_all
  mkdir -p "$S"/{run,log,mon,mgr,osd/ceph-0,rgw}
  local fsid
  fsid=$(uuidgen)
  cat >"$CONF" <<EOF
[global]
fsid = $fsid
mon_host = v2:127.0.0.1:$MON_PORT
public_addr = 127.0.0.1
ms_bind_msgr1 = false
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
auth_allow_insecure_global_id_reclaim = true
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
# a test store on a shared disk: the monitor refuses to start below 5 % free by default
mon_data_avail_warn = 2
mon_data_avail_crit = 1
osd_crush_chooseleaf_type = 0
run_dir = $S/run
admin_socket = $S/run/\$name.asok
log_file = $S/log/\$name.log
mon_data = $S/mon/\$cluster-\$id
mgr_data = $S/mgr/\$cluster-\$id
osd_data = $S/osd/\$cluster-\$id
keyring = $S/keyring
osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = 8589934592
bluestore_cache_autotune = false
bluestore_cache_size = 268435456
osd_memory_target = 1073741824
osd_max_object_name_len = 256
osd_max_object_namespace_len = 64
mgr_initial_modules =
[client.rgw.cowsnap]
rgw_frontends = beast endpoint=127.0.0.1:$PORT
rgw_data = $S/rgw
rgw_dns_name = 127.0.0.1
# without cephx, the v2 messenger's default client modes leave radosgw unable to reach the monitor
ms_mon_client_mode = crc
ms_client_mode = crc
EOF
  ceph-authtool --create-keyring "$S/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  monmaptool --create --addv a "[v2:127.0.0.1:$MON_PORT]" --fsid "$fsid" "$S/monmap" >/dev/null
  ceph-mon -c "$CONF" --mkfs -i a --monmap "$S/monmap" --keyring "$S/keyring" >>"$S/log/mkfs.out" 2>&1 \
    || die "ceph-mon --mkfs failed (see $S/log/mkfs.out)"
  run_daemon mon ceph-mon -i a
  wait_for 20 "the monitor" ceph_ mon stat
  mkdir -p "$S/mgr/ceph-x"
  run_daemon mgr ceph-mgr -i x
  local uuid id
  uuid=$(uuidgen)
  id=$(ceph_ osd new "$uuid") || die "ceph osd new failed"
  [ "$id" = 0 ] || die "unexpected osd id $id"
  ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$uuid" >>"$S/log/mkfs.out" 2>&1 \
    || die "ceph-osd --mkfs failed (see $S/log/mkfs.out)"
  run_daemon osd ceph-osd -i 0
  wait_for 30 "the OSD" sh -c "ceph -c '$CONF' osd stat -f json | grep -q '\"num_up_osds\":1'"
  run_daemon rgw radosgw -n client.rgw.cowsnap
  wait_for 60 "radosgw" rgw_up
  timeout 30 radosgw-admin -c "$CONF" user create --uid=cowsnap --display-name=cowsnap \
    >"$S/user.json.tmp" 2>>"$S/log/mkfs.out" || die "radosgw-admin user create failed"
  mv "$S/user.json.tmp" "$S/user.json"
  chmod 600 "$S/user.json"
  echo "s3-server: up on http://127.0.0.1:$PORT (state $S)" >&2
}

env_() {
  [ -s "$S/user.json" ] || die "not running (start it first)"
  python3 - "$S/user.json" "$PORT" <<'EOF'
import json, sys, shlex
u = json.load(open(sys.argv[1]))
k = u["keys"][0]
for n, v in (("AWS_ACCESS_KEY_ID", k["access_key"]), ("AWS_SECRET_ACCESS_KEY", k["secret_key"]),
             ("AWS_ENDPOINT_URL", "http://127.0.0.1:" + sys.argv[2]), ("AWS_REGION", "us-east-1"),
             ("AWS_ALLOW_HTTP", "true")):
    print("export %s=%s" % (n, shlex.quote(v)))
EOF
}

mb() { # BUCKET
  [ -n "${1:-}" ] || die "usage: $0 mb BUCKET"
  [ -s "$S/user.json" ] || die "not running (start it first)"
  local ak sk code
  ak=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["keys"][0]["access_key"])' "$S/user.json")
  sk=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["keys"][0]["secret_key"])' "$S/user.json")
  # the keys go to curl in a config on a pipe, not on its command line
  code=$(curl -s -o "$S/log/mb.out" -w '%{http_code}' -K <(printf 'user = "%s:%s"\n' "$ak" "$sk") \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" --aws-sigv4 "aws:amz:us-east-1:s3" -X PUT "http://127.0.0.1:$PORT/$1")
  case $code in
    200) ;;
    409) grep -q BucketAlreadyOwnedByYou "$S/log/mb.out" || die "bucket $1: $(cat "$S/log/mb.out")" ;;
    *) die "unable to create bucket $1: HTTP $code $(cat "$S/log/mb.out")" ;;
  esac
}

stop_all() {
  local n pid i
  for n in "${DAEMONS[@]}"; do
    [ -f "$S/run/$n.pid" ] || continue
    pid=$(cat "$S/run/$n.pid")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for i in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$S/run/$n.pid"
  done
  case "$S" in /|"") die "refusing to remove $S" ;; esac
  rm -rf "$S"
}

rgw_stop() { # stop radosgw only (the cluster keeps running): an S3 outage
  local pid i
  alive rgw || return 0
  pid=$(cat "$S/run/rgw.pid")
  kill "$pid" 2>/dev/null || true
  for i in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  rm -f "$S/run/rgw.pid"
}

rgw_start() { # start radosgw again after rgw-stop
  [ -s "$S/user.json" ] || die "not running (start it first)"
  alive rgw && rgw_up && return 0
  run_daemon rgw radosgw -n client.rgw.cowsnap
  wait_for 60 "radosgw" rgw_up
}

case "${1:-}" in
  start) start ;;
  stop) stop_all ;;
  rgw-stop) rgw_stop ;;
  rgw-start) rgw_start ;;
  env) env_ ;;
  mb) mb "${2:-}" ;;
  *) echo "usage: $0 start|stop|env|mb BUCKET|rgw-stop|rgw-start" >&2; exit 2 ;;
esac
