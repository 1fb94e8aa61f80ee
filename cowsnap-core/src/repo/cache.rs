//! The local cache of object-store repositories' generation indexes:
//! `STATE_DIR/.repo-cache/<32 hex>/<id>.idx`, one directory per repository location
//! (the hex is blake3 of its `s3://` URL; `location` in it names the URL for people).
//!
//! - What is cached: index objects exactly as stored (sealed in an encrypted
//!   repository: no plaintext of an encrypted repository is ever written here), filled
//!   when an index is fetched from the store and when a backup publishes one, so the
//!   next incremental finds its parent's index at once.
//! - Validation: a generation's metadata (fetched from the store each time, and
//!   authenticated in an encrypted repository) records blake3 of its index object
//!   (`index_hash`). A hit is used only when the cached bytes hash to it; a mismatch
//!   (damage, tampering, a torn write) is deleted, counted, logged once per process,
//!   and the object fetched from the store. Generations written before `index_hash`
//!   existed are not cached. `verify` never reads the cache: it checks the store.
//! - Writes: a temporary file (`.tmp-*`) renamed into place, so a reader sees a whole
//!   file or none; no fsync (a file torn by a crash fails validation).
//! - Bound: [`MAX_ENV`] (`COWSNAP_REPO_CACHE_MAX`, bytes with K/M/G/T suffix, default
//!   [`DEFAULT_MAX`], 0 turns the cache off) over the whole cache (all repositories);
//!   after each insert the least recently used files (mtime, refreshed on each hit)
//!   are deleted until the total fits. An object larger than the bound is not cached.
//! - Failures of the cache (full disk, permissions) never fail an operation: they are
//!   logged and the store is used.
//!
//! Directory repositories have no cache (they are local already).

use crate::error::Result;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

/// The environment variable bounding the cache (bytes, K/M/G/T suffix; 0 = off).
pub const MAX_ENV: &str = "COWSNAP_REPO_CACHE_MAX";
/// The default bound: 1 GiB (the indexes of about 32 TiB of disk data at 1 MiB chunks).
pub const DEFAULT_MAX: u64 = 1 << 30;
/// The cache's directory under the state directory (disk names cannot start with '.').
pub const DIR_NAME: &str = ".repo-cache";
/// Temporary files older than this are leftovers of a crash and removed at eviction.
const STALE_TMP: Duration = Duration::from_secs(3600);

static STATE_DIR: OnceLock<PathBuf> = OnceLock::new();
/// A damaged cache file is logged once per process (then only counted).
static LOGGED_INVALID: AtomicBool = AtomicBool::new(false);

/// Set the state directory whose `.repo-cache` this process uses (once, at start-up;
/// later calls are ignored). A process that never calls it uses no cache.
pub fn set_state_dir(dir: &Path) {
    let _ = STATE_DIR.set(dir.to_path_buf());
}

/// The bound from `var` (the value of [`MAX_ENV`], if set).
pub fn parse_max(var: Option<&str>) -> Result<u64> {
    match var {
        None => Ok(DEFAULT_MAX),
        Some(v) => crate::container::parse_size(v).map_err(|e| {
            crate::err!(
                InvalidInput,
                "{MAX_ENV}={v:?} is not a size (bytes with an optional K, M, G or T suffix; 0 turns the cache off): {e}"
            )
        }),
    }
}

/// Figures of one repository handle's index reads.
#[derive(Debug, Default)]
pub struct IndexIo {
    /// Indexes served by the cache (validated).
    pub hits: AtomicU64,
    /// Indexes fetched from the store.
    pub fetched: AtomicU64,
    /// Bytes of indexes fetched from the store.
    pub fetched_bytes: AtomicU64,
    /// Cache files that failed validation (deleted, refetched).
    pub invalid: AtomicU64,
}

/// What a backup into an object store fetched and requested (its status and output).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RepoIo {
    /// Where the parent's index came from: `cache`, `store`, or empty (no parent).
    pub parent_index: String,
    /// Indexes served by the local cache.
    pub index_cache_hits: u64,
    /// Cached indexes that failed validation (deleted and fetched from the store).
    pub index_cache_invalid: u64,
    /// Indexes fetched from the store.
    pub indexes_fetched: u64,
    /// Bytes of indexes fetched from the store.
    pub index_bytes_fetched: u64,
    /// Requests made to the store up to the publish.
    pub store_requests: u64,
}

impl IndexIo {
    /// The figures now (`parent_index` and `store_requests` left for the caller).
    pub fn snapshot(&self) -> RepoIo {
        RepoIo {
            index_cache_hits: self.hits.load(Ordering::Relaxed),
            index_cache_invalid: self.invalid.load(Ordering::Relaxed),
            indexes_fetched: self.fetched.load(Ordering::Relaxed),
            index_bytes_fetched: self.fetched_bytes.load(Ordering::Relaxed),
            ..RepoIo::default()
        }
    }
}

/// The cache of one repository location.
#[derive(Debug)]
pub struct IndexCache {
    /// `STATE_DIR/.repo-cache` (the bound covers all of it).
    root: PathBuf,
    /// `root/<32 hex>` of this location.
    dir: PathBuf,
    url: String,
    max: u64,
}

impl IndexCache {
    /// The cache of the repository at `url` for this process: none when no state
    /// directory was set ([`set_state_dir`]) or the bound is 0; an error when
    /// [`MAX_ENV`] is not a size.
    pub fn for_url(url: &str) -> Result<Option<IndexCache>> {
        let max = parse_max(std::env::var(MAX_ENV).ok().as_deref())?;
        Ok(STATE_DIR
            .get()
            .filter(|_| max > 0)
            .map(|s| IndexCache::new(&s.join(DIR_NAME), url, max)))
    }

    /// The cache of the repository at `url` under `root`, bounded by `max` bytes.
    pub fn new(root: &Path, url: &str, max: u64) -> IndexCache {
        let h = blake3::hash(url.trim_end_matches('/').as_bytes());
        IndexCache {
            root: root.to_path_buf(),
            dir: root.join(&h.to_hex()[..32]),
            url: url.to_string(),
            max,
        }
    }

    /// This location's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of generation `id`'s index.
    fn path(&self, id: &str) -> Option<PathBuf> {
        super::generation::valid_id(id).then(|| self.dir.join(format!("{id}.idx")))
    }

    /// The cached index object of generation `id` if its blake3 is `expect`. A file
    /// that does not match is deleted and counted in `io`.
    pub fn get(&self, id: &str, expect: &[u8; 32], io: &IndexIo) -> Option<Vec<u8>> {
        let path = self.path(id)?;
        let b = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                log::warn!("repository cache: unable to read {}: {e}", path.display());
                return None;
            }
        };
        if blake3::hash(&b).as_bytes() != expect {
            io.invalid.fetch_add(1, Ordering::Relaxed);
            if !LOGGED_INVALID.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "repository cache: {} does not match the index hash recorded in generation {id}'s metadata; deleted, the index is read from {}",
                    path.display(),
                    self.url
                );
            }
            let _ = std::fs::remove_file(&path);
            return None;
        }
        // least recently used goes first at eviction
        if let Ok(f) = std::fs::File::options().write(true).open(&path) {
            let _ = f.set_modified(SystemTime::now());
        }
        io.hits.fetch_add(1, Ordering::Relaxed);
        Some(b)
    }

    /// Cache `bytes` as generation `id`'s index object (not when larger than the
    /// bound), then evict down to the bound. Failures are logged, never returned.
    pub fn put(&self, id: &str, bytes: &[u8]) {
        let Some(path) = self.path(id) else { return };
        if bytes.len() as u64 > self.max {
            return;
        }
        if let Err(e) = self.install(&path, bytes) {
            log::warn!("repository cache: {e}");
            return;
        }
        if let Err(e) = self.evict() {
            log::warn!("repository cache: {e}");
        }
    }

    /// Write `bytes` to a temporary file and rename it to `path`.
    fn install(&self, path: &Path, bytes: &[u8]) -> std::result::Result<(), String> {
        let fresh = !self.dir.exists();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| format!("unable to create {}: {e}", self.dir.display()))?;
        if fresh {
            let _ = std::fs::write(self.dir.join("location"), format!("{}\n", self.url));
        }
        let tmp = self.dir.join(format!(
            ".tmp-{}",
            crate::fsutil::random_hex(6).map_err(|e| e.to_string())?
        ));
        let r = std::fs::File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(bytes))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!("unable to write {}: {e}", path.display()));
        }
        Ok(())
    }

    /// Delete the least recently used files of the whole cache until it holds at most
    /// the bound; temporary files left by a crash go too.
    pub fn evict(&self) -> std::result::Result<(), String> {
        let mut files = Vec::new();
        let mut total = 0u64;
        let now = SystemTime::now();
        let dirs = std::fs::read_dir(&self.root)
            .map_err(|e| format!("unable to list {}: {e}", self.root.display()))?;
        for d in dirs.flatten() {
            let Ok(ents) = std::fs::read_dir(d.path()) else {
                continue;
            };
            for e in ents.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                let Ok(m) = e.metadata() else { continue };
                if !m.is_file() {
                    continue;
                }
                let mtime = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                if name.starts_with(".tmp-") {
                    if now.duration_since(mtime).unwrap_or_default() > STALE_TMP {
                        let _ = std::fs::remove_file(e.path());
                    } else {
                        total += m.len();
                    }
                    continue;
                }
                if name.ends_with(".idx") {
                    total += m.len();
                    files.push((mtime, m.len(), e.path()));
                }
            }
        }
        if total <= self.max {
            return Ok(());
        }
        files.sort();
        for (_, len, path) in files {
            if total <= self.max {
                break;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => total -= len,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => total -= len,
                Err(e) => return Err(format!("unable to delete {}: {e}", path.display())),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "cowsnap-cache-test-{}",
            crate::fsutil::random_hex(6).unwrap()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn max_parses() {
        assert_eq!(parse_max(None).unwrap(), DEFAULT_MAX);
        assert_eq!(parse_max(Some("0")).unwrap(), 0);
        assert_eq!(parse_max(Some("64K")).unwrap(), 64 << 10);
        assert_eq!(parse_max(Some("2G")).unwrap(), 2 << 30);
        for bad in ["", "x", "-1", "12Q", "1.5G"] {
            let e = parse_max(Some(bad)).unwrap_err().to_string();
            assert!(e.contains(MAX_ENV), "{bad}: {e}");
        }
    }

    #[test]
    fn hit_miss_tamper() {
        let root = tmpdir();
        let c = IndexCache::new(&root, "s3://b/p", 1 << 20);
        let io = IndexIo::default();
        let data = b"index bytes".to_vec();
        let h = *blake3::hash(&data).as_bytes();
        assert!(c.get("g1", &h, &io).is_none());
        c.put("g1", &data);
        assert_eq!(c.get("g1", &h, &io).unwrap(), data);
        assert_eq!(io.hits.load(Ordering::Relaxed), 1);
        // a wrong expectation is a mismatch: deleted
        let other = *blake3::hash(b"x").as_bytes();
        assert!(c.get("g1", &other, &io).is_none());
        assert!(!c.dir().join("g1.idx").exists());
        // a flipped byte is detected and the file deleted
        c.put("g1", &data);
        let p = c.dir().join("g1.idx");
        let mut b = std::fs::read(&p).unwrap();
        b[3] ^= 0xff;
        std::fs::write(&p, &b).unwrap();
        assert!(c.get("g1", &h, &io).is_none());
        assert_eq!(io.invalid.load(Ordering::Relaxed), 2);
        assert!(!p.exists());
        // bad ids are neither read nor written
        c.put("../x", &data);
        assert!(c.get("../x", &h, &io).is_none());
        assert!(!root.join("x.idx").exists());
        assert_eq!(
            std::fs::read_to_string(c.dir().join("location")).unwrap(),
            "s3://b/p\n"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn eviction_keeps_the_bound() {
        let root = tmpdir();
        let a = IndexCache::new(&root, "s3://b/a", 10_000);
        let b = IndexCache::new(&root, "s3://b/b", 10_000);
        let io = IndexIo::default();
        let blob = vec![7u8; 3000];
        let h = *blake3::hash(&blob).as_bytes();
        for i in 0..10 {
            let c = if i % 2 == 0 { &a } else { &b };
            c.put(&format!("g{i}"), &blob);
            // older mtimes for earlier files, whatever the clock's resolution
            let p = c.dir().join(format!("g{i}.idx"));
            let f = std::fs::File::options().write(true).open(&p).unwrap();
            f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1000 + i))
                .unwrap();
        }
        a.evict().unwrap();
        let mut total = 0;
        let mut names = Vec::new();
        for d in std::fs::read_dir(&root).unwrap() {
            for e in std::fs::read_dir(d.unwrap().path()).unwrap() {
                let e = e.unwrap();
                let n = e.file_name().to_string_lossy().into_owned();
                if n.ends_with(".idx") {
                    total += e.metadata().unwrap().len();
                    names.push(n);
                }
            }
        }
        assert!(total <= 10_000, "{total}");
        names.sort();
        // the newest three stay
        assert_eq!(names, ["g7.idx", "g8.idx", "g9.idx"]);
        assert!(b.get("g9", &h, &io).is_some());
        // larger than the bound: not cached
        a.put("big", &vec![1u8; 10_001]);
        assert!(!a.dir().join("big.idx").exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// An object-store repository in memory (encrypted under `key` if given) whose
    /// indexes are cached under `root`.
    fn mem_repo(
        root: &Path,
        key: Option<std::sync::Arc<super::super::crypt::RepoKey>>,
    ) -> super::super::Repo {
        let store = Box::new(object_store::memory::InMemory::new());
        let r = super::super::object::ObjectRepo::with_store("s3://mem/p", "p", store).unwrap();
        let json =
            super::super::new_config_json("s3://mem/p", 4096, key.as_deref(), Some(3600)).unwrap();
        r.put(super::super::CONFIG_FILE, json).unwrap();
        let mut repo = super::super::Repo::open_object_on(std::sync::Arc::new(r), key).unwrap();
        repo.set_cache(Some(IndexCache::new(root, "s3://mem/p", 1 << 20)));
        repo
    }

    /// Publish generation `id` of `img` through the repository's writers.
    fn publish(repo: &super::super::Repo, id: &str, img: &[u8]) -> super::super::GenerationInfo {
        let cs = repo.chunk_size() as usize;
        let hashes: Vec<[u8; 32]> = img
            .chunks(cs)
            .map(|c| {
                let h = repo.store().hash(c);
                repo.store().insert(&h, c).unwrap();
                h
            })
            .collect();
        let idx = super::super::FixedIndex::from_hashes(id, cs as u32, img.len() as u64, &hashes)
            .unwrap();
        let (_, hash) = repo.publish_index(&idx).unwrap();
        let mut g = super::super::testutil::make_info(id, img.len() as u64, cs as u32);
        g.index_hash = hash;
        repo.write_meta(&g).unwrap();
        g
    }

    #[test]
    fn repo_reads_through_the_cache_and_never_trusts_it() {
        let root = tmpdir();
        let repo = mem_repo(&root, None);
        let img: Vec<u8> = (0..5 * 4096u32).map(|i| (i / 7) as u8).collect();
        let g = publish(&repo, "g1", &img);
        assert!(g.index_hash.is_some());
        let cached = repo.cache.as_ref().unwrap().dir().join("g1.idx");
        assert!(cached.exists(), "a published index is cached at once");
        let want = repo.load_index_from_store(&g).unwrap().to_hashes();
        let before = repo.io();
        assert_eq!(before.indexes_fetched, 1);
        // hit: no request to the store
        let idx = repo.load_index(&g).unwrap();
        assert_eq!(idx.to_hashes(), want);
        let after = repo.io();
        assert_eq!(after.index_cache_hits, 1);
        assert_eq!(after.store_requests, before.store_requests);
        // tampered: detected, deleted, fetched from the store, cached again
        let mut b = std::fs::read(&cached).unwrap();
        let n = b.len();
        b[n - 1] ^= 1;
        std::fs::write(&cached, &b).unwrap();
        let idx = repo.load_index(&g).unwrap();
        assert_eq!(idx.to_hashes(), want);
        let io = repo.io();
        assert_eq!(io.index_cache_invalid, 1);
        assert_eq!(io.indexes_fetched, 2);
        assert_eq!(io.store_requests, after.store_requests + 1);
        assert_eq!(std::fs::read(&cached).unwrap().len(), n);
        // the store's copy is what verify reads, whatever the cache holds
        std::fs::write(&cached, b"junk").unwrap();
        assert_eq!(repo.load_index_from_store(&g).unwrap().to_hashes(), want);
        // missing from the cache: fetched
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(repo.load_index(&g).unwrap().to_hashes(), want);
        // a generation without a recorded hash is neither served from nor put into it
        let mut old = g.clone();
        old.index_hash = None;
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(repo.load_index(&old).unwrap().to_hashes(), want);
        assert!(!cached.exists());
        // a store object that does not match the recorded hash is refused
        let mut wrong = g.clone();
        wrong.index_hash = Some(crate::fsutil::hex(blake3::hash(b"other").as_bytes()));
        let e = repo.load_index(&wrong).unwrap_err().to_string();
        assert!(e.contains("does not match the hash"), "{e}");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn an_encrypted_repository_caches_sealed_objects_only() {
        let root = tmpdir();
        let key = std::sync::Arc::new(super::super::crypt::RepoKey::from_bytes(&[9; 32], "t"));
        let repo = mem_repo(&root, Some(key));
        let img: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8).collect();
        let g = publish(&repo, "g1", &img);
        let cached = std::fs::read(repo.cache.as_ref().unwrap().dir().join("g1.idx")).unwrap();
        let plain = repo.load_index(&g).unwrap();
        assert_eq!(repo.io().index_cache_hits, 1);
        let encoded = plain.encode();
        assert_ne!(cached, encoded);
        // neither the index's header nor any chunk id appears in the cached file
        assert!(!cached
            .windows(8)
            .any(|w| w == super::super::index::INDEX_MAGIC));
        for (_, h) in plain.data() {
            assert!(!cached.windows(32).any(|w| w == h));
        }
        let _ = std::fs::remove_dir_all(&root);
    }
}
