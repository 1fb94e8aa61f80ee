//! Client-side encryption of a repository: keys, chunk ids and sealed objects.
//!
//! # Keys
//!
//! A key file holds 32 random bytes and nothing else ([`create_key_file`]: created with
//! `O_EXCL`, mode 0600, never over an existing file). The key itself is never stored
//! in the repository, put on a command line or logged: commands and daemon requests
//! carry the key file's path, and [`RepoKey`] wipes its bytes on drop and has no
//! `Debug` output of them. From the master key, blake3 `derive_key` makes one subkey
//! per purpose (the contexts below), so no two uses share a key:
//!
//! | subkey | use |
//! |---|---|
//! | chunk id | keyed blake3 of a chunk's plaintext: its name (and the index's entry) |
//! | chunk seal | XChaCha20-Poly1305 of a chunk's (compressed) payload |
//! | object seal | XChaCha20-Poly1305 of an index or a generation's metadata |
//! | check | the key check value recorded in `cowsnap-repo.json` |
//!
//! The repository's config records the algorithm ([`ALGORITHM`]) and the key check
//! value (hex of the check subkey, which reveals nothing of the others): opening
//! compares it before anything is read or written, so a wrong key is refused with
//! "wrong key for repository X" and a repository is never written under two keys.
//!
//! # What the store sees
//!
//! Chunk names are keyed hashes: without the key, a name says nothing about the
//! content (equal content under one key still has one name, so backups sharing a key
//! deduplicate). A chunk file keeps its 16-byte header (version 2 = sealed, the
//! encoding, the plaintext length and the sealed length) and its payload is
//! `nonce (24) ‖ ciphertext ‖ tag (16)` with a random nonce; the associated data is the
//! header and the chunk id, so a chunk cannot be moved under another name or given
//! another header. Indexes and metadata are sealed whole ([`seal_object`]: a `CSEO`
//! header, nonce, ciphertext, tag) with their object name (`generations/ID.idx`,
//! `generations/ID.json`) as associated data, so two generations' objects cannot be
//! swapped. Visible still: object sizes (so chunk compressibility), counts, generation
//! ids (their creation times) and pins (local repositories only).
//!
//! # Which key a command uses
//!
//! [`Repo::open`](super::Repo::open) uses the process key ([`set_process_key`]: the
//! command line's `--key FILE` or `COWSNAP_KEY_FILE`, the daemon's `--key FILE` for an
//! export or a live restore); a backup in the daemon carries its own key file path and
//! opens with [`Repo::open_or_create_keyed`](super::Repo::open_or_create_keyed).

use crate::error::{IoContext, Result};
use crate::fsutil;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use zeroize::Zeroizing;

/// The algorithm recorded in an encrypted repository's config.
pub const ALGORITHM: &str = "xchacha20poly1305-blake3keyed";
/// Bytes in a key file.
pub const KEY_LEN: usize = 32;
/// Bytes of a nonce.
pub const NONCE_LEN: usize = 24;
/// Bytes of an authentication tag.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed chunk payload adds to its plaintext.
pub const CHUNK_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

const CTX_CHUNK_ID: &str = "cowsnap repository 2026 chunk id v1";
const CTX_CHUNK_SEAL: &str = "cowsnap repository 2026 chunk seal v1";
const CTX_OBJECT_SEAL: &str = "cowsnap repository 2026 object seal v1";
const CTX_CHECK: &str = "cowsnap repository 2026 key check v1";

/// Magic and version of a sealed index or metadata object.
const OBJ_MAGIC: [u8; 4] = *b"CSEO";
pub(crate) const OBJ_VERSION: u8 = 1;
const OBJ_HDR: usize = 8;

/// The `encryption` entry of an encrypted repository's `cowsnap-repo.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionConfig {
    /// [`ALGORITHM`].
    pub algorithm: String,
    /// Hex of the key's check subkey.
    pub key_check: String,
}

/// A repository key: the subkeys derived from a key file's bytes (wiped on drop).
pub struct RepoKey {
    id: Zeroizing<[u8; 32]>,
    chunk_seal: XChaCha20Poly1305,
    object_seal: XChaCha20Poly1305,
    check: String,
    /// Where the key came from, for messages.
    source: String,
}

impl std::fmt::Debug for RepoKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoKey")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl RepoKey {
    /// The key made of `master` (from `source`, named in messages).
    pub fn from_bytes(master: &[u8; KEY_LEN], source: &str) -> RepoKey {
        let id = Zeroizing::new(blake3::derive_key(CTX_CHUNK_ID, master));
        let cs = Zeroizing::new(blake3::derive_key(CTX_CHUNK_SEAL, master));
        let os = Zeroizing::new(blake3::derive_key(CTX_OBJECT_SEAL, master));
        let check = fsutil::hex(&blake3::derive_key(CTX_CHECK, master));
        RepoKey {
            id,
            chunk_seal: XChaCha20Poly1305::new((&*cs).into()),
            object_seal: XChaCha20Poly1305::new((&*os).into()),
            check,
            source: source.to_string(),
        }
    }

    /// Read a key file: exactly [`KEY_LEN`] bytes.
    pub fn load(path: &Path) -> Result<Arc<RepoKey>> {
        use std::io::Read;
        let what = path.display();
        let f = std::fs::File::open(path).ctx(|| format!("unable to read key file {what}"))?;
        let mut buf = Zeroizing::new(Vec::with_capacity(KEY_LEN + 1));
        // One byte more than a key: a longer file is refused without reading it all.
        f.take(KEY_LEN as u64 + 1)
            .read_to_end(&mut buf)
            .ctx(|| format!("unable to read key file {what}"))?;
        let master: Zeroizing<[u8; KEY_LEN]> =
            Zeroizing::new(buf.as_slice().try_into().map_err(|_| {
                crate::err!(
                    InvalidInput,
                    "unable to use key file {what}: not a cowsnap key (it must hold exactly {KEY_LEN} bytes; make one with `cowsnapctl key create`)"
                )
            })?);
        Ok(Arc::new(RepoKey::from_bytes(&master, &what.to_string())))
    }

    /// The config entry recording this key.
    pub fn config(&self) -> EncryptionConfig {
        EncryptionConfig {
            algorithm: ALGORITHM.into(),
            key_check: self.check.clone(),
        }
    }

    /// Where the key came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The chunk id of `data` (not all zeros): its keyed blake3 hash.
    pub fn chunk_id(&self, data: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.id, data).as_bytes()
    }

    /// Seal a chunk payload: `nonce ‖ ciphertext ‖ tag`, bound to `aad`.
    pub(crate) fn seal_chunk(&self, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>> {
        seal(&self.chunk_seal, aad, plain)
    }

    /// Open a sealed chunk payload; `None` when it does not authenticate.
    pub(crate) fn open_chunk(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        open(&self.chunk_seal, aad, sealed)
    }

    /// Seal an index or metadata object named `name` (relative to the repository).
    pub fn seal_object(&self, name: &str, plain: &[u8]) -> Result<Vec<u8>> {
        let mut hdr = [0u8; OBJ_HDR];
        hdr[..4].copy_from_slice(&OBJ_MAGIC);
        hdr[4] = OBJ_VERSION;
        let mut aad = hdr.to_vec();
        aad.extend_from_slice(name.as_bytes());
        let sealed = seal(&self.object_seal, &aad, plain)?;
        let mut out = Vec::with_capacity(OBJ_HDR + sealed.len());
        out.extend_from_slice(&hdr);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Open a sealed object named `name`; `what` (its path or URL) names it in errors.
    pub fn open_object(&self, name: &str, b: &[u8], what: &str) -> Result<Vec<u8>> {
        if b.len() < OBJ_HDR + CHUNK_OVERHEAD || b[..4] != OBJ_MAGIC || b[4] != OBJ_VERSION {
            return Err(crate::err!(
                Corrupt,
                "{what} is corrupt: not an encrypted object"
            ));
        }
        let mut aad = b[..OBJ_HDR].to_vec();
        aad.extend_from_slice(name.as_bytes());
        open(&self.object_seal, &aad, &b[OBJ_HDR..]).ok_or_else(|| {
            crate::err!(
                Corrupt,
                "{what} is corrupt: it does not authenticate (damaged, or not this object)"
            )
        })
    }
}

fn seal(c: &XChaCha20Poly1305, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>> {
    let mut nonce = [0u8; NONCE_LEN];
    fsutil::random_bytes(&mut nonce)?;
    let ct = c
        .encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad })
        .map_err(|_| crate::err!(InvalidInput, "unable to encrypt {} bytes", plain.len()))?;
    let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

fn open(c: &XChaCha20Poly1305, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < CHUNK_OVERHEAD {
        return None;
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    c.decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad })
        .ok()
}

/// Create a key file at `path`: [`KEY_LEN`] random bytes, mode 0600, refusing an
/// existing file (`O_EXCL`). A file left half-written by a failure is removed.
pub fn create_key_file(path: &Path) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let what = path.display();
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    fsutil::random_bytes(&mut key[..])?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => crate::err!(
                InvalidInput,
                "unable to create key file {what}: it exists (a key is never overwritten)"
            ),
            _ => crate::Error::io(format!("unable to create key file {what}"), e),
        })?;
    let r = f.write_all(&key[..]).and_then(|()| f.sync_all());
    if let Err(e) = r {
        let _ = std::fs::remove_file(path);
        return Err(crate::Error::io(
            format!("unable to write key file {what}"),
            e,
        ));
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fsutil::fsync_dir(parent)?;
    }
    Ok(())
}

static PROCESS_KEY: OnceLock<Option<Arc<RepoKey>>> = OnceLock::new();

/// Set the key every [`Repo::open`](super::Repo::open) of this process uses (once, at
/// start-up; later calls are ignored).
pub fn set_process_key(key: Option<Arc<RepoKey>>) {
    let _ = PROCESS_KEY.set(key);
}

/// The process key (see [`set_process_key`]).
pub fn process_key() -> Option<Arc<RepoKey>> {
    PROCESS_KEY.get().cloned().flatten()
}

/// Check `key` against a repository's `encryption` config (`what` names the
/// repository): both absent, or the same key.
pub fn check_key(
    what: &str,
    config: Option<&EncryptionConfig>,
    key: Option<&RepoKey>,
) -> Result<()> {
    match (config, key) {
        (None, None) => Ok(()),
        (None, Some(k)) => Err(crate::err!(
            InvalidInput,
            "repository {what} is not encrypted: do not give a key (key file {})",
            k.source()
        )),
        (Some(_), None) => Err(crate::err!(
            InvalidInput,
            "repository {what} is encrypted: give its key file with --key FILE (or COWSNAP_KEY_FILE)"
        )),
        (Some(c), Some(k)) => {
            if c.algorithm != ALGORITHM {
                return Err(crate::err!(
                    Unsupported,
                    "unable to open repository {what}: encryption {:?} is not supported",
                    c.algorithm
                ));
            }
            if c.key_check != k.check {
                return Err(crate::err!(
                    InvalidInput,
                    "wrong key for repository {what}: key file {} is not the key it was created with",
                    k.source()
                ));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::{FixedIndex, Repo, ZERO_HASH};

    fn key(b: u8) -> RepoKey {
        RepoKey::from_bytes(&[b; KEY_LEN], "test")
    }

    #[test]
    fn object_round_trip_and_tamper() {
        let k = key(1);
        let b = k.seal_object("generations/a.idx", b"hello").unwrap();
        assert_eq!(
            k.open_object("generations/a.idx", &b, "x").unwrap(),
            b"hello"
        );
        // a fresh nonce every time
        assert_ne!(b, k.seal_object("generations/a.idx", b"hello").unwrap());
        for i in 0..b.len() {
            let mut t = b.clone();
            t[i] ^= 1;
            assert!(
                k.open_object("generations/a.idx", &t, "x").is_err(),
                "byte {i}"
            );
        }
        let e = k.open_object("generations/b.idx", &b, "x").unwrap_err();
        assert!(e.to_string().contains("does not authenticate"), "{e}");
        assert!(key(2).open_object("generations/a.idx", &b, "x").is_err());
        assert!(k.open_object("generations/a.idx", &b[..20], "x").is_err());
    }

    #[test]
    fn subkeys_differ_and_ids_are_keyed() {
        let (a, b) = (key(1), key(2));
        assert_ne!(a.chunk_id(b"x"), b.chunk_id(b"x"));
        assert_ne!(a.chunk_id(b"x"), *blake3::hash(b"x").as_bytes());
        assert_eq!(a.chunk_id(b"x"), key(1).chunk_id(b"x"));
        assert_ne!(a.check, b.check);
        assert!(!a.check.contains(&fsutil::hex(&[1u8; KEY_LEN])));
    }

    #[test]
    fn check_key_cases() {
        let k = key(1);
        let c = k.config();
        assert!(check_key("r", None, None).is_ok());
        assert!(check_key("r", Some(&c), Some(&k)).is_ok());
        let e = check_key("r", Some(&c), Some(&key(2))).unwrap_err();
        assert!(e.to_string().contains("wrong key for repository r"), "{e}");
        let e = check_key("r", Some(&c), None).unwrap_err();
        assert!(e.to_string().contains("is encrypted"), "{e}");
        let e = check_key("r", None, Some(&k)).unwrap_err();
        assert!(e.to_string().contains("is not encrypted"), "{e}");
    }

    /// Store `img` as generation `id` through the repository's own writers.
    fn put_gen(repo: &Repo, id: &str, img: &[u8]) -> Vec<[u8; 32]> {
        let cs = repo.chunk_size() as usize;
        let hashes: Vec<[u8; 32]> = img
            .chunks(cs)
            .map(|c| {
                let h = repo.store().hash(c);
                if h != ZERO_HASH {
                    repo.store().insert(&h, c).unwrap();
                }
                h
            })
            .collect();
        let idx = FixedIndex::from_hashes(id, cs as u32, img.len() as u64, &hashes).unwrap();
        repo.write_index(&idx).unwrap();
        let mut g = crate::repo::testutil::make_info(id, img.len() as u64, cs as u32);
        g.disk = "secret-disk-name".into();
        repo.write_meta(&g).unwrap();
        hashes
    }

    fn random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Every file under `dir` with its content.
    fn tree(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    todo.push(p);
                } else {
                    out.push((p.clone(), std::fs::read(&p).unwrap()));
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn encrypted_repository_round_trip_and_refusals() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("r");
        let k = Arc::new(key(7));
        let repo = Repo::open_or_create_keyed(&dir, 4096, Some(k.clone())).unwrap();
        assert!(repo.is_encrypted());
        let mut img = random(3 * 4096, 11);
        img.extend_from_slice(&[0u8; 4096]);
        img.extend_from_slice(b"plain text that compresses well. ".repeat(124).as_slice());
        let hashes = put_gen(&repo, "g1", &img);
        // names are keyed: not the plain blake3 of the content
        assert_ne!(
            hashes[0],
            crate::repo::chunk_store::chunk_hash(&img[..4096])
        );
        assert_eq!(hashes[3], ZERO_HASH);
        // nothing stored holds the plaintext (random or text), the disk name or the key
        for (p, b) in tree(&dir) {
            for needle in [
                &img[100..132],
                &img[4 * 4096 + 40..4 * 4096 + 72],
                b"secret-disk-name",
            ] {
                assert!(
                    !b.windows(needle.len()).any(|w| w == needle),
                    "{}",
                    p.display()
                );
            }
            assert!(!b.windows(32).any(|w| w == [7u8; 32]), "{}", p.display());
        }
        // read back through a fresh open
        let repo = Repo::open_keyed(&dir, Some(k.clone())).unwrap();
        let gens = repo.list().unwrap();
        assert_eq!(gens.len(), 1);
        assert_eq!(gens[0].disk, "secret-disk-name");
        let idx = repo.load_index(&gens[0]).unwrap();
        let mut back = Vec::new();
        for i in 0..idx.chunk_count() {
            back.extend(repo.store().read(idx.hash(i), idx.chunk_len(i)).unwrap());
        }
        assert_eq!(back, img);
        // dedup: the same data again stores nothing new
        let h = repo.store().hash(&img[..4096]);
        assert_eq!(
            repo.store().insert(&h, &img[..4096]).unwrap(),
            crate::repo::chunk_store::Insert::Reused
        );

        // wrong key, no key, a key for a plain repository: clear errors, nothing written
        let before = tree(&dir);
        let e = Repo::open_keyed(&dir, Some(Arc::new(key(8))))
            .err()
            .unwrap();
        assert!(e.to_string().contains("wrong key for repository"), "{e}");
        let e = Repo::open_or_create_keyed(&dir, 4096, Some(Arc::new(key(8))))
            .err()
            .unwrap();
        assert!(e.to_string().contains("wrong key for repository"), "{e}");
        let e = Repo::open_keyed(&dir, None).err().unwrap();
        assert!(
            e.to_string().contains("is encrypted: give its key file"),
            "{e}"
        );
        let e = Repo::open_or_create_keyed(&dir, 4096, None).err().unwrap();
        assert!(e.to_string().contains("is encrypted"), "{e}");
        assert_eq!(tree(&dir), before, "refusals changed nothing");
        let plain = t.path().join("plain");
        Repo::open_or_create_keyed(&plain, 4096, None).unwrap();
        let e = Repo::open_keyed(&plain, Some(k.clone())).err().unwrap();
        assert!(e.to_string().contains("is not encrypted"), "{e}");
    }

    #[test]
    fn tampered_and_swapped_objects_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("r");
        let k = Arc::new(key(3));
        let repo = Repo::open_or_create_keyed(&dir, 4096, Some(k)).unwrap();
        let a = random(4096, 1);
        let b = random(4096, 2);
        let ha = put_gen(&repo, "g1", &a)[0];
        let hb = put_gen(&repo, "g2", &b)[0];
        // a tampered byte anywhere in a chunk file: damage
        let pa = repo.store().path_of(&ha);
        let orig = std::fs::read(&pa).unwrap();
        for at in [0, 5, 9, 13, 16, 20, 40, 2000, orig.len() - 1] {
            let mut t = orig.clone();
            t[at] ^= 0x40;
            std::fs::write(&pa, &t).unwrap();
            let e = repo.store().read_no_quarantine(&ha, 4096).unwrap_err();
            assert!(crate::repo::chunk_store::is_damage(&e), "byte {at}: {e}");
        }
        // a chunk file moved under another chunk's name: does not authenticate
        std::fs::write(&pa, std::fs::read(repo.store().path_of(&hb)).unwrap()).unwrap();
        let e = repo.store().read_no_quarantine(&ha, 4096).unwrap_err();
        assert!(e.to_string().contains("does not authenticate"), "{e}");
        std::fs::write(&pa, &orig).unwrap();
        assert_eq!(repo.store().read_no_quarantine(&ha, 4096).unwrap(), a);
        // swapped indexes: refused, not read as the other generation
        let gens = repo.list().unwrap();
        let (i1, i2) = (repo.index_path("g1"), repo.index_path("g2"));
        let (b1, b2) = (std::fs::read(&i1).unwrap(), std::fs::read(&i2).unwrap());
        std::fs::write(&i1, &b2).unwrap();
        std::fs::write(&i2, &b1).unwrap();
        for g in &gens {
            let e = repo.load_index(g).unwrap_err();
            assert!(e.to_string().contains("does not authenticate"), "{e}");
        }
        // swapped metadata: neither generation is listed
        let (m1, m2) = (repo.meta_path("g1"), repo.meta_path("g2"));
        let (b1, b2) = (std::fs::read(&m1).unwrap(), std::fs::read(&m2).unwrap());
        std::fs::write(&m1, &b2).unwrap();
        std::fs::write(&m2, &b1).unwrap();
        assert!(repo.list().unwrap().is_empty());
    }

    #[test]
    fn key_file_create_load_refuse() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        create_key_file(&p).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.len(), KEY_LEN as u64);
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        let before = std::fs::read(&p).unwrap();
        let e = create_key_file(&p).unwrap_err();
        assert!(e.to_string().contains("exists"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), before, "not overwritten");
        let k = RepoKey::load(&p).unwrap();
        assert_eq!(
            k.check,
            RepoKey::from_bytes(&before[..].try_into().unwrap(), "").check
        );
        std::fs::write(d.path().join("short"), [0u8; 31]).unwrap();
        assert!(RepoKey::load(&d.path().join("short")).is_err());
        std::fs::write(d.path().join("long"), [0u8; 33]).unwrap();
        assert!(RepoKey::load(&d.path().join("long")).is_err());
    }
}
