#!/usr/bin/env bash
# Encrypted repository (directory) through the real daemon: `key create` (and its refusal
# to overwrite); a 64 MiB disk holding a known incompressible 1 MiB marker is backed up
# into an unencrypted repository (the marker's bytes are found in its files: the check
# can fail) and, with --key, into an encrypted one (the marker's bytes, the disk name
# and the key are found in none of its files, and no chunk name is shared with the
# unencrypted repository); a full and an incremental backup restore bit-exact with the
# key, also served by an export; a wrong key and a missing key are refused with clear
# errors by backup, list, verify, prune, restore and export and change nothing (the
# repository tree is hashed before and after; no restore destination appears); a key
# given to an unencrypted repository is refused; a second disk with the same content
# backed up with the same key stores (almost) nothing new.
. "$(dirname "$0")/lib.sh"
need nbdcopy sha256sum; need_python_nbd

sha() { sha256sum "$1" | cut -d' ' -f1; }
ENC=$T/enc PLAIN=$T/plain K1=$T/k1.key K2=$T/k2.key
# tree_sum DIR: one hash over every file's path and content under DIR
tree_sum() { (cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1); }
# holds DIR FILE: 0 when any file under DIR contains the 64 bytes at offset 4096 of FILE
holds() {
  /usr/bin/python3 - "$1" "$2" <<'PY'
import os, sys
needle = open(sys.argv[2], "rb").read()[4096:4096 + 64]
for root, _, files in os.walk(sys.argv[1]):
    for f in files:
        if needle in open(os.path.join(root, f), "rb").read():
            sys.exit(0)
sys.exit(1)
PY
}
# refused WHAT WANT CMD...: CMD fails and its error contains WANT
refused() {
  local what=$1 want=$2; shift 2
  if "$@" >"$T/ref.out" 2>"$T/ref.err"; then fail "$what succeeded: $(cat "$T/ref.out")"; fi
  grep -qF -- "$want" "$T/ref.err" || fail "$what: expected \"$want\", got: $(cat "$T/ref.err")"
  log "refused ($what): $(tail -n 1 "$T/ref.err")"
}

log "key create, and its refusal to overwrite"
ctl key create "$K1" >/dev/null || fail "key create"
[ "$(stat -c '%s %a' "$K1")" = "32 600" ] || fail "key file is not 32 bytes mode 0600: $(stat -c '%s %a' "$K1")"
k1sum=$(sha "$K1")
refused "key create over an existing file" "exists" ctl key create "$K1"
[ "$(sha "$K1")" = "$k1sum" ] || fail "key create overwrote the key file"
ctl key create "$K2" >/dev/null || fail "key create k2"
[ "$(sha "$K2")" != "$k1sum" ] || fail "two keys are equal"

log "64 MiB disk: 16 MiB random, zeros, a 1 MiB random marker at 32 MiB"
marker_disk "$T/d.img" "$T/marker"
uri=$(ctl attach "$T/d.img" --name encdisk72 --via none | tail -n 1) || fail "attach"

log "unencrypted backup: the marker is stored as is"
backup_gen encdisk72 --to "repo:$PLAIN" >/dev/null
holds "$PLAIN" "$T/marker" || fail "the marker is not found in the unencrypted repository (the check cannot fail)"

log "encrypted full backup (--key)"
g1=$(backup_gen encdisk72 --to "repo:$ENC" --key "$K1")
nbdcopy "$uri" "$T/e1.img" || fail "nbdcopy e1"
jq -e '.version == 2 and .encryption.algorithm != null and (.encryption.key_check | length) == 64' \
  "$ENC/cowsnap-repo.json" >/dev/null || fail "config does not record the encryption: $(cat "$ENC/cowsnap-repo.json")"
log "writes: 4 random regions, then an encrypted incremental (COWSNAP_KEY_FILE)"
nbd_write_random "$uri" 72 4 || fail "writes"
g2=$(COWSNAP_KEY_FILE=$K1 backup_gen encdisk72 --to "repo:$ENC" --incremental)
nbdcopy "$uri" "$T/e2.img" || fail "nbdcopy e2"
L=$(ctl list "repo:$ENC" --key "$K1" --json) || fail "list --key"
[ "$(json_field "$L" 'length')" = 2 ] || fail "expected 2 generations: $L"
[ "$(json_field "$L" '.[1].kind')" = incremental ] || fail "second is not incremental: $L"
[ "$(json_field "$L" '.[1].parent')" = "$g1" ] || fail "parent of #2 is not #1: $L"

log "the encrypted repository holds no marker byte, disk name or key; no shared chunk name"
holds "$ENC" "$T/marker" && fail "the marker's bytes are in the encrypted repository"
if grep -rqF encdisk72 "$ENC"/chunks "$ENC"/generations; then fail "the disk name is readable in the encrypted repository"; fi
/usr/bin/python3 - "$ENC" "$K1" <<'PY' || fail "the key's bytes are in the repository"
import os, sys
key = open(sys.argv[2], "rb").read()
for root, _, files in os.walk(sys.argv[1]):
    for f in files:
        if key in open(os.path.join(root, f), "rb").read():
            sys.exit(1)
PY
comm -12 <(find "$PLAIN/chunks" -type f -printf '%f\n' | sort) <(find "$ENC/chunks" -type f -printf '%f\n' | sort) > "$T/shared"
[ -s "$T/shared" ] && fail "chunk names shared with the unencrypted repository: $(head -n 3 "$T/shared")"
[ "$(find "$ENC/chunks" -type f | wc -l)" -ge 17 ] || fail "too few chunks in the encrypted repository"

log "restore both generations with the key, verify"
for pair in "$g1 e1" "$g2 e2"; do
  set -- $pair
  rm -f "$T/r.img"
  ctl restore "repo:$ENC@$1" --to "$T/r.img" --key "$K1" >/dev/null || fail "restore $1"
  [ "$(sha "$T/r.img")" = "$(sha "$T/$2.img")" ] || fail "restore of $1 differs from the content at its snapshot ($2)"
done
ctl verify "repo:$ENC" --key "$K1" >/dev/null || fail "verify --key"

log "an export of the encrypted generation serves its content"
euri=$(ctl export "repo:$ENC@$g2" --name x72 --via none --key "$K1" | tail -n 1) || fail "export --key"
nbdcopy "$euri" "$T/x.img" || fail "nbdcopy of the export"
[ "$(sha "$T/x.img")" = "$(sha "$T/e2.img")" ] || fail "the export differs from generation $g2"
ctl detach x72 >/dev/null || fail "detach the export"

log "wrong key and missing key: clear errors, nothing changed"
before=$(tree_sum "$ENC")
refused "backup with a wrong key" "wrong key for repository" \
  timeout 120 "$CTL" backup encdisk72 --to "repo:$ENC" --incremental --quiesce-idle 0 --key "$K2"
refused "backup without a key" "is encrypted: give its key file" \
  timeout 120 "$CTL" backup encdisk72 --to "repo:$ENC" --incremental --quiesce-idle 0
refused "list with a wrong key" "wrong key for repository" ctl list "repo:$ENC" --key "$K2"
refused "list without a key" "is encrypted" ctl list "repo:$ENC"
refused "verify with a wrong key" "wrong key for repository" ctl verify "repo:$ENC" --key "$K2"
refused "prune with a wrong key" "wrong key for repository" ctl prune "repo:$ENC" --keep-last 1 --key "$K2"
refused "prune without a key" "is encrypted" ctl prune "repo:$ENC" --keep-last 1
refused "restore with a wrong key" "wrong key for repository" ctl restore "repo:$ENC@$g1" --to "$T/no.img" --key "$K2"
refused "restore without a key" "is encrypted" ctl restore "repo:$ENC@$g1" --to "$T/no.img"
refused "export without a key" "is encrypted" ctl export "repo:$ENC@$g1" --name y72 --via none
refused "a key file that is not a key" "not a cowsnap key" ctl list "repo:$ENC" --key "$T/d.img"
[ -e "$T/no.img" ] && fail "a refused restore created its destination"
[ "$(tree_sum "$ENC")" = "$before" ] || fail "a refused command changed the encrypted repository"
pb=$(tree_sum "$PLAIN")
refused "a key for an unencrypted repository" "is not encrypted" ctl list "repo:$PLAIN" --key "$K1"
refused "backup with a key into an unencrypted repository" "is not encrypted" \
  timeout 120 "$CTL" backup encdisk72 --to "repo:$PLAIN" --quiesce-idle 0 --key "$K1"
[ "$(tree_sum "$PLAIN")" = "$pb" ] || fail "a refused command changed the unencrypted repository"
L=$(ctl list "repo:$ENC" --key "$K1" --json) || fail "list after the refusals"
[ "$(json_field "$L" 'length')" = 2 ] || fail "the refusals changed the generations: $L"

log "dedup: a second disk with the same content, same key, stores (almost) nothing"
cp "$T/e2.img" "$T/o.img"
ctl attach "$T/o.img" --name o72 --via none >/dev/null || fail "attach o72"
g3=$(backup_gen o72 --to "repo:$ENC" --key "$K1")
L=$(ctl list "repo:$ENC" --key "$K1" --json)
new=$(json_field "$L" ".[] | select(.id == \"$g3\") | .stats.bytes_stored_new")
reused=$(json_field "$L" ".[] | select(.id == \"$g3\") | .stats.chunks_reused")
log "second disk: bytes_stored_new=$new chunks_reused=$reused"
[ "$new" -lt $((64 << 10)) ] || fail "the same content under the same key stored $new new bytes"
[ "$reused" -ge 17 ] || fail "only $reused chunks reused"
rm -f "$T/r.img"
ctl restore "repo:$ENC@$g3" --to "$T/r.img" --key "$K1" >/dev/null || fail "restore $g3"
[ "$(sha "$T/r.img")" = "$(sha "$T/e2.img")" ] || fail "restore of the deduplicated backup differs"

echo "PASS: 72-repo-encrypt"
