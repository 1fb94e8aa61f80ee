//! The backup repository `repo:DIR`: generations (restore points) over a
//! content-addressed, compressed, deduplicated chunk store.
//!
//! # Layout
//!
//! ```text
//! DIR/cowsnap-repo.json          format marker, repository chunk size, encryption (see crypt)
//! DIR/lock                       flock: backups/restores LOCK_SH, prune LOCK_EX
//! DIR/chunks/ab/<64 hex>         one chunk (see chunk_store)
//! DIR/generations/<id>.idx       fixed index (see index)
//! DIR/generations/<id>.json      metadata (see generation), written after the index
//! DIR/quarantine/<64 hex>[.N]    damaged chunks moved out of the store (see chunk_store)
//! DIR/pins/<id>.<8 hex>.json     generations unfinished live restores need (see pin; objects on s3)
//! ```
//!
//! A repository is a directory or, when its "directory" is an `s3://BUCKET[/PREFIX]`
//! URL, the same layout as objects in an S3-compatible store (see [`object`]): [`Repo`]
//! and [`ChunkStore`] hide which. What an object store cannot do yet — locks, export
//! pins, the quarantine — is refused there with "not yet supported for s3 repositories"
//! ([`Repo::require_local`]); prune there collects chunks by the rules of [`gc`],
//! which backups follow too.
//! Indexes of an object store are kept in a local cache checked against the hash
//! each generation's metadata records ([`cache`]); `verify` reads the store.
//!
//! # Locking
//!
//! | operations | together? | why it is safe |
//! |---|---|---|
//! | backups (any disks), restores, verify, list | yes | they only add files (chunk renames are atomic, identical content under one name); readers see only generations with both files |
//! | quarantining a chunk vs anything holding the shared lock | yes | the move happens under `DIR/quarantine/.lock` after reading the chunk again; only a damaged file is moved, and a name is only ever installed when free, so a healthy copy is never moved away |
//! | prune vs a live restore's fill | yes | the fill's generation is pinned (`DIR/pins`) before the fill starts; prune keeps it and so every chunk the fill reads; the fill holds the lock only while it sets up |
//! | prune vs backup/restore/verify | no | prune holds `LOCK_EX` on `DIR/lock` for its whole run, everyone else `LOCK_SH` for theirs, so a sweep never sees a running backup's new or reused chunks as garbage; prune waits for running backups and a backup started during prune waits for it |
//!
//! A shared lock for the whole backup, rather than only for the sweep, is the simple
//! choice: prune is rare and fast (no data is read), so making it wait is cheap, and
//! there is no window in which a backup has decided "chunk exists, reuse it" while a
//! sweep deletes it.

pub mod cache;
pub mod chunk_store;
pub mod crypt;
pub mod diff;
pub mod gc;
pub mod generation;
pub mod group;
pub mod index;
pub mod object;
pub mod pin;
pub mod prune;
pub mod retention;
pub mod target;
pub mod usage;
pub mod verify;

pub use chunk_store::{ChunkStore, ZERO_HASH};
pub use generation::{GenerationInfo, GenerationKind, GenerationStats, GroupRef};
pub use group::{GroupInfo, GroupMember, Resolved};
pub use index::FixedIndex;
pub use prune::{prune, GenerationDecision, PruneOptions, PruneReport};
pub use retention::RetentionPolicy;
pub use target::{open_target, RepoTarget, RepoTargetParams};
pub use usage::{DiskUsage, RepoUsage, UsageCache};
pub use verify::{
    verify, verify_repair, verify_repair_with_progress, verify_with_progress, Phase as VerifyPhase,
    RepairReport, VerifyProblem, VerifyReport,
};

use crate::error::{IoContext, Result};
use crate::fsutil;
use crypt::{EncryptionConfig, RepoKey};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Default repository chunk size: 1 MiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// The largest repository chunk size (a power of two): every chunk read allocates up to
/// this much, so a damaged or hostile repository configuration cannot ask for more.
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;

/// Whether `chunk_size` is a repository chunk size: a power of two in 4 KiB ..= 64 MiB.
fn valid_chunk_size(chunk_size: u32) -> bool {
    chunk_size.is_power_of_two() && (4096..=MAX_CHUNK_SIZE).contains(&chunk_size)
}
const CONFIG_FILE: &str = "cowsnap-repo.json";
/// The largest sealed metadata file read (a generation's metadata is a few KiB).
const MAX_META_BYTES: u64 = 16 << 20;
/// The largest sealed index read whole: 32 bytes per chunk plus runs, so 1 GiB covers
/// a disk of 32 TiB at 1 MiB chunks (plain indexes are read in pieces instead).
const MAX_INDEX_BYTES: u64 = 1 << 30;
/// The `format` of `cowsnap-repo.json`.
pub const FORMAT: &str = "cowsnap-repo";
/// The repository format version written and read (`cowsnap-repo.json` `version`).
pub const VERSION: u32 = 1;
/// The version of an encrypted repository (`encryption` present): a build that does
/// not know encryption refuses it rather than reading sealed objects as damage.
pub const VERSION_ENCRYPTED: u32 = 2;

/// The repository's format marker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepoConfig {
    /// Always "cowsnap-repo".
    pub format: String,
    /// Format version ([`VERSION`]).
    pub version: u32,
    /// Repository chunk size in bytes (a power of two).
    pub chunk_size: u32,
    /// Client-side encryption: algorithm and key check value (never the key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionConfig>,
    /// Object stores: the garbage-collection grace period in seconds every backup and
    /// prune follow (see [`gc`]); absent: [`gc::DEFAULT_GRACE_SECS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gc_grace_secs: Option<u64>,
}

/// The environment variable that sets the grace period of a new object-store
/// repository (seconds; see [`gc`]).
pub const GRACE_ENV: &str = "COWSNAP_REPO_GC_GRACE";

/// The grace period for a new object-store repository at `what`: [`GRACE_ENV`] or the
/// default, checked before anything is created.
fn new_grace(what: &str) -> Result<u64> {
    match std::env::var(GRACE_ENV) {
        Err(_) => Ok(gc::DEFAULT_GRACE_SECS),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(n) if (gc::MIN_GRACE_SECS..=gc::MAX_GRACE_SECS).contains(&n) => Ok(n),
            _ => Err(crate::err!(
                InvalidInput,
                "unable to create repository {what}: {GRACE_ENV}={v:?} is not a number of seconds from {} to {}",
                gc::MIN_GRACE_SECS,
                gc::MAX_GRACE_SECS
            )),
        },
    }
}

/// The environment variable that sets the chunk size of a new repository (a size such
/// as `4M`, a power of two from 64 KiB to [`MAX_CHUNK_SIZE`]): read by the backup that
/// creates the repository, ignored for an existing one (its config says).
pub const CHUNK_SIZE_ENV: &str = "COWSNAP_REPO_CHUNK_SIZE";
/// The smallest chunk size [`CHUNK_SIZE_ENV`] takes: the largest tracking chunk is
/// below it, and smaller chunks only add requests.
pub const MIN_NEW_CHUNK_SIZE: u32 = 64 << 10;

/// The chunk size of a new repository at `what`: `value` (of [`CHUNK_SIZE_ENV`]) if
/// given, else `default`; checked before anything is created.
fn new_chunk_size(what: &str, value: Option<&str>, default: u32) -> Result<u32> {
    let Some(v) = value else {
        return Ok(default);
    };
    match crate::container::parse_size(v).ok().and_then(|n| u32::try_from(n).ok()) {
        Some(n) if valid_chunk_size(n) && n >= MIN_NEW_CHUNK_SIZE => Ok(n),
        _ => Err(crate::err!(
            InvalidInput,
            "unable to create repository {what}: {CHUNK_SIZE_ENV}={v:?} is not a power of two from 64K to {}M",
            MAX_CHUNK_SIZE >> 20
        )),
    }
}

/// [`new_chunk_size`] from the environment.
fn new_chunk_size_env(what: &str, default: u32) -> Result<u32> {
    let v = std::env::var(CHUNK_SIZE_ENV).ok();
    new_chunk_size(what, v.as_deref(), default)
}

/// How long a backup's end tries to remove its clock probe (`writers/<id>`); one left
/// behind is removed by a later prune once older than the grace period.
const PROBE_CLEANUP_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A generation whose index is present but whose metadata cannot be read
/// ([`Repo::list_all`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    /// Its id (from the file or object name).
    pub id: String,
    /// Why it cannot be read.
    pub why: String,
}

/// What [`Repo::list_all`] found.
#[derive(Debug, Clone, Default)]
pub struct Listed {
    /// Every complete generation whose metadata reads, oldest first.
    pub generations: Vec<GenerationInfo>,
    /// Generations with an index whose metadata cannot be read.
    pub unreadable: Vec<Unreadable>,
}

impl Listed {
    fn unreadable(&mut self, id: &str, why: String) {
        self.unreadable.push(Unreadable {
            id: id.to_string(),
            why,
        });
    }

    /// Refuse a spec that names a generation whose metadata cannot be read, by its id or
    /// by a prefix no readable generation matches, rather than answer "not found".
    pub(crate) fn check_spec(&self, spec: Option<&str>, dir: &Path) -> Result<()> {
        let named = |s: &str| {
            self.unreadable.iter().find(|u| {
                u.id == s
                    || (u.id.starts_with(s)
                        && !self
                            .generations
                            .iter()
                            .any(|g| g.disk == s || g.id.starts_with(s)))
            })
        };
        match spec.and_then(named) {
            Some(u) => Err(crate::err!(
                Corrupt,
                "unable to use generation {} in {}: its metadata cannot be read ({}); run cowsnapctl verify",
                u.id,
                dir.display(),
                u.why
            )),
            None => Ok(()),
        }
    }

    /// Refuse a pick `g`, resolved from `spec`, that a generation whose
    /// metadata cannot be read could change: for "the newest" (no spec, or a disk name) an
    /// unreadable generation newer than the pick — its disk unknown, it may be the newest
    /// asked for; for an id prefix, an unreadable generation the prefix also matches.
    /// Generation ids sort by time.
    pub(crate) fn check_pick(
        &self,
        spec: Option<&str>,
        g: &GenerationInfo,
        dir: &Path,
    ) -> Result<()> {
        let (id, disk) = (g.id.as_str(), g.disk.as_str());
        let newest = spec.is_none() || spec.is_some_and(|s| s == disk && s != id);
        let hit = match spec {
            _ if newest => self.unreadable.iter().find(|u| u.id.as_str() > id),
            Some(s) if s != id => self.unreadable.iter().find(|u| u.id.starts_with(s)),
            _ => None,
        };
        match hit {
            Some(u) if newest => Err(crate::err!(
                Corrupt,
                "unable to pick the newest generation{} in {}: generation {}, newer than {id}, cannot be read ({}); name the generation to use (@ID), or run cowsnapctl verify",
                spec.map(|s| format!(" of {s:?}")).unwrap_or_default(),
                dir.display(),
                u.id,
                u.why
            )),
            Some(u) => Err(crate::err!(
                Corrupt,
                "unable to pick a generation: {:?} matches {id} and generation {}, whose metadata cannot be read ({}), in {}; give more of the id",
                spec.unwrap_or_default(),
                u.id,
                u.why,
                dir.display()
            )),
            None => Ok(()),
        }
    }
}

/// An opened repository.
pub struct Repo {
    dir: PathBuf,
    config: RepoConfig,
    store: ChunkStore,
    /// The object store of an `s3://` repository (`dir` is then its URL).
    remote: Option<Arc<object::ObjectRepo>>,
    /// The key of an encrypted repository (checked against the config at open).
    key: Option<Arc<RepoKey>>,
    /// The local cache of an object store's indexes (see [`cache`]).
    cache: Option<cache::IndexCache>,
    /// Index reads of this handle (cache hits, fetches).
    io: cache::IndexIo,
}

/// The repository lock held (see [`Repo::lock`]); none on an object store.
pub struct RepoLock {
    _file: Option<File>,
}

/// Check a repository's format marker.
fn check_config(b: &[u8], dir: &Path) -> Result<RepoConfig> {
    let config: RepoConfig = serde_json::from_slice(b).map_err(|e| {
        crate::err!(
            Corrupt,
            "unable to parse {}: {e}",
            dir.join(CONFIG_FILE).display()
        )
    })?;
    let version = match config.encryption {
        None => VERSION,
        Some(_) => VERSION_ENCRYPTED,
    };
    if config.format != FORMAT || config.version != version {
        return Err(crate::err!(
            Unsupported,
            "unable to open repository {}: format {} version {} is not supported",
            dir.display(),
            config.format,
            config.version
        ));
    }
    if !valid_chunk_size(config.chunk_size) {
        return Err(crate::err!(
            Corrupt,
            "unable to open repository {}: bad chunk size {}",
            dir.display(),
            config.chunk_size
        ));
    }
    Ok(config)
}

fn not_a_repo(dir: &Path) -> crate::Error {
    crate::err!(
        NotFound,
        "unable to open repository {}: not a cowsnap repository (no {CONFIG_FILE})",
        dir.display()
    )
}

/// The config of a new repository at `what` (its path or URL), encrypted under `key`
/// if given, checked before anything is created.
fn new_config_json(
    what: &str,
    chunk_size: u32,
    key: Option<&RepoKey>,
    gc_grace_secs: Option<u64>,
) -> Result<Vec<u8>> {
    if !valid_chunk_size(chunk_size) {
        return Err(crate::err!(
            InvalidInput,
            "unable to create repository {what}: chunk size {chunk_size} is not a power of two from 4096 to {MAX_CHUNK_SIZE}"
        ));
    }
    let cfg = RepoConfig {
        format: FORMAT.into(),
        version: match key {
            None => VERSION,
            Some(_) => VERSION_ENCRYPTED,
        },
        chunk_size,
        encryption: key.map(|k| k.config()),
        gc_grace_secs,
    };
    serde_json::to_vec_pretty(&cfg)
        .map_err(|e| crate::err!(InvalidInput, "unable to encode config: {e}"))
}

impl Repo {
    /// Open an existing object-store repository (`s3://…`).
    fn open_object(url: &str, key: Option<Arc<RepoKey>>) -> Result<Repo> {
        Self::open_object_on(Arc::new(object::ObjectRepo::open(url)?), key)
    }

    /// Open the object-store repository at `remote` with `key`.
    fn open_object_on(remote: Arc<object::ObjectRepo>, key: Option<Arc<RepoKey>>) -> Result<Repo> {
        let url = remote.url().to_string();
        let dir = PathBuf::from(remote.url());
        let b = remote
            .get(CONFIG_FILE)
            .map_err(|e| e.with_context(format!("unable to open repository {url}")))?
            .ok_or_else(|| not_a_repo(&dir))?;
        let config = check_config(&b, &dir)?;
        crypt::check_key(&url, config.encryption.as_ref(), key.as_deref())?;
        let grace = gc::Grace::from_secs(config.gc_grace_secs.unwrap_or(gc::DEFAULT_GRACE_SECS));
        let cache = cache::IndexCache::for_url(&url)
            .map_err(|e| e.with_context(format!("unable to open repository {url}")))?;
        Ok(Repo {
            store: ChunkStore::object(remote.clone(), grace).with_key(key.clone()),
            dir,
            config,
            remote: Some(remote),
            key,
            cache,
            io: cache::IndexIo::default(),
        })
    }

    /// Open an existing repository with the process key ([`crypt::set_process_key`]).
    pub fn open(dir: &Path) -> Result<Repo> {
        Self::open_keyed(dir, crypt::process_key())
    }

    /// Open an existing repository with `key` (required by an encrypted repository,
    /// refused by a plain one).
    pub fn open_keyed(dir: &Path, key: Option<Arc<RepoKey>>) -> Result<Repo> {
        if let Some(url) = object::s3_url(dir) {
            return Self::open_object(url, key);
        }
        let path = dir.join(CONFIG_FILE);
        let b = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_a_repo(dir)),
            Err(e) => {
                return Err(crate::Error::io(
                    format!("unable to open repository {}", dir.display()),
                    e,
                ))
            }
        };
        let config = check_config(&b, dir)?;
        crypt::check_key(
            &dir.display().to_string(),
            config.encryption.as_ref(),
            key.as_deref(),
        )?;
        Ok(Repo {
            dir: dir.to_path_buf(),
            store: ChunkStore::new(&dir.join("chunks"), &dir.join("quarantine"))
                .with_key(key.clone()),
            config,
            remote: None,
            key,
            cache: None,
            io: cache::IndexIo::default(),
        })
    }

    /// Open the repository with the process key, creating it (with `chunk_size`) if
    /// `dir` holds none.
    pub fn open_or_create(dir: &Path, chunk_size: u32) -> Result<Repo> {
        Self::open_or_create_keyed(dir, chunk_size, crypt::process_key())
    }

    /// Open the repository with `key`, creating it (with `chunk_size`, encrypted under
    /// `key` if given) if `dir` holds none. An existing repository's key is checked
    /// before anything is written.
    pub fn open_or_create_keyed(
        dir: &Path,
        chunk_size: u32,
        key: Option<Arc<RepoKey>>,
    ) -> Result<Repo> {
        if let Some(url) = object::s3_url(dir) {
            // No conditional write: two first backups racing both write the marker;
            // with the one chunk size backups create repositories with, they agree.
            let remote = object::ObjectRepo::open(url)?;
            let missing = remote
                .get(CONFIG_FILE)
                .map_err(|e| e.with_context(format!("unable to open repository {url}")))?
                .is_none();
            if missing {
                let cs = new_chunk_size_env(url, chunk_size)?;
                let json = new_config_json(url, cs, key.as_deref(), Some(new_grace(url)?))?;
                remote
                    .put(CONFIG_FILE, json)
                    .map_err(|e| e.with_context(format!("unable to create repository {url}")))?;
            }
            return Self::open_object(url, key);
        }
        if !dir.join(CONFIG_FILE).exists() {
            let what = dir.display().to_string();
            let cs = new_chunk_size_env(&what, chunk_size)?;
            let json = new_config_json(&what, cs, key.as_deref(), None)?;
            for d in [
                dir.to_path_buf(),
                dir.join("chunks"),
                dir.join("generations"),
            ] {
                std::fs::create_dir_all(&d).ctx(|| format!("unable to create {}", d.display()))?;
            }
            // Two creators race harmlessly: the first rename wins, and an existing
            // config is never replaced.
            let tmp = dir.join(format!(".tmp-config-{}", fsutil::random_hex(6)?));
            std::fs::write(&tmp, &json).ctx(|| format!("unable to write {}", tmp.display()))?;
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .ctx(|| format!("unable to fsync {}", tmp.display()))?;
            let r = std::fs::hard_link(&tmp, dir.join(CONFIG_FILE));
            let _ = std::fs::remove_file(&tmp);
            match r {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(crate::Error::io(
                        format!("unable to create repository {}", dir.display()),
                        e,
                    ))
                }
            }
            fsutil::fsync_dir(dir)?;
            if let Some(parent) = dir.parent() {
                let _ = fsutil::fsync_dir(parent);
            }
        }
        Self::open_keyed(dir, key)
    }

    /// Whether the repository is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.key.is_some()
    }

    /// Seal `plain` as the object `name` in an encrypted repository; as is otherwise.
    fn seal(&self, name: &str, plain: Vec<u8>) -> Result<Vec<u8>> {
        match &self.key {
            None => Ok(plain),
            Some(k) => k.seal_object(name, &plain),
        }
    }

    /// Open the object `name` (read from `what`) of an encrypted repository; as is
    /// otherwise.
    fn unseal(&self, name: &str, b: Vec<u8>, what: &str) -> Result<Vec<u8>> {
        match &self.key {
            None => Ok(b),
            Some(k) => k.open_object(name, &b, what),
        }
    }

    /// Read a local generation file (index or metadata) named `name` (under `DIR`),
    /// at most `limit` bytes.
    fn read_local(&self, name: &str, limit: u64) -> Result<Vec<u8>> {
        use std::io::Read;
        let path = self.dir.join(name);
        let f = File::open(&path).ctx(|| format!("unable to read {}", path.display()))?;
        let mut b = Vec::new();
        f.take(limit + 1)
            .read_to_end(&mut b)
            .ctx(|| format!("unable to read {}", path.display()))?;
        if b.len() as u64 > limit {
            return Err(crate::err!(
                Corrupt,
                "{} is corrupt: larger than {limit} bytes",
                path.display()
            ));
        }
        Ok(b)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The garbage-collection grace period of an object-store repository.
    pub fn grace(&self) -> gc::Grace {
        gc::Grace::from_secs(self.config.gc_grace_secs.unwrap_or(gc::DEFAULT_GRACE_SECS))
    }

    /// The object store of an `s3://` repository.
    pub fn remote(&self) -> Option<&Arc<object::ObjectRepo>> {
        self.remote.as_ref()
    }

    /// Repository chunk size.
    pub fn chunk_size(&self) -> u32 {
        self.config.chunk_size
    }

    /// The chunk store.
    pub fn store(&self) -> &ChunkStore {
        &self.store
    }

    fn generations_dir(&self) -> PathBuf {
        self.dir.join("generations")
    }

    /// Index path of a generation.
    pub fn index_path(&self, id: &str) -> PathBuf {
        self.generations_dir().join(format!("{id}.idx"))
    }

    /// Metadata path of a generation.
    pub fn meta_path(&self, id: &str) -> PathBuf {
        self.generations_dir().join(format!("{id}.json"))
    }

    /// Whether the repository lives in an object store (`s3://`).
    pub fn is_object(&self) -> bool {
        self.remote.is_some()
    }

    /// Refuse `what` (e.g. "live restore from") on an object-store repository: for operations that
    /// need locks, pins or the quarantine.
    pub fn require_local(&self, what: &str) -> Result<()> {
        match self.remote {
            Some(_) => Err(object::unsupported(what, &self.dir)),
            None => Ok(()),
        }
    }

    /// Take the repository lock: shared for backups and restores, exclusive for prune.
    /// An object store has none (see [`object`] and [`gc`] for how prune and backups get along there).
    pub fn lock(&self, exclusive: bool) -> Result<RepoLock> {
        if self.remote.is_some() {
            return Ok(RepoLock { _file: None });
        }
        Ok(RepoLock {
            _file: Some(fsutil::lock_file(&self.dir.join("lock"), exclusive)?),
        })
    }

    /// Publish a generation's index (before its metadata); returns its size.
    pub fn write_index(&self, idx: &FixedIndex) -> Result<u64> {
        self.publish_index(idx).map(|(n, _)| n)
    }

    /// Publish a generation's index (before its metadata); returns its size and, on an
    /// object store, blake3 (hex) of the object as stored, for the metadata's
    /// `index_hash`. The object goes into the local cache too (see [`cache`]).
    pub fn publish_index(&self, idx: &FixedIndex) -> Result<(u64, Option<String>)> {
        let name = format!("generations/{}.idx", idx.generation);
        match (&self.remote, &self.key) {
            (None, None) => Ok((idx.write(&self.index_path(&idx.generation))?, None)),
            (None, Some(_)) => {
                let b = self.seal(&name, idx.encode())?;
                fsutil::write_atomic(&self.index_path(&idx.generation), &b)?;
                Ok((b.len() as u64, None))
            }
            (Some(r), _) => {
                let b = self.seal(&name, idx.encode())?;
                let n = b.len() as u64;
                let hash = blake3::hash(&b);
                // cached first, so the object moves into the PUT uncopied; a cached
                // index whose publish fails is never used: no metadata records its hash
                if let Some(c) = &self.cache {
                    c.put(&idx.generation, &b);
                }
                r.put(&name, b)?;
                Ok((n, Some(hash.to_hex().to_string())))
            }
        }
    }

    /// The index reads of this handle so far, and the store's request count.
    pub fn io(&self) -> cache::RepoIo {
        cache::RepoIo {
            store_requests: self.remote.as_ref().map_or(0, |r| r.requests()),
            ..self.io.snapshot()
        }
    }

    /// Use `cache` for this object store's indexes instead of the process's.
    #[cfg(test)]
    pub(crate) fn set_cache(&mut self, cache: Option<cache::IndexCache>) {
        self.cache = cache;
    }

    /// The index object of generation `g` from the store, or from the local cache when
    /// `cached` and `g`'s metadata records its hash and the cached copy matches it.
    fn fetch_index(
        &self,
        r: &object::ObjectRepo,
        g: &GenerationInfo,
        cached: bool,
    ) -> Result<Vec<u8>> {
        let name = format!("generations/{}.idx", g.id);
        let want = g.index_hash.as_deref().and_then(fsutil::parse_hash);
        let cache = self.cache.as_ref().filter(|_| cached);
        if let (Some(c), Some(h)) = (cache, &want) {
            if let Some(b) = c.get(&g.id, h, &self.io) {
                return Ok(b);
            }
        }
        let b = r.get(&name)?.ok_or_else(|| {
            crate::err!(NotFound, "unable to read index {}/{name}: gone", r.url())
        })?;
        self.io
            .fetched
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.io
            .fetched_bytes
            .fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = &want {
            if blake3::hash(&b).as_bytes() != h {
                return Err(crate::err!(
                    Corrupt,
                    "index {}/{name} does not match the hash its generation's metadata records",
                    r.url()
                ));
            }
            if let Some(c) = &self.cache {
                c.put(&g.id, &b);
            }
        }
        Ok(b)
    }

    /// Publish a generation's metadata (its index and chunks first): the generation
    /// exists from here on. Returns its size.
    pub fn write_meta(&self, g: &GenerationInfo) -> Result<u64> {
        if self.remote.is_none() && self.key.is_none() {
            return g.write(&self.meta_path(&g.id));
        }
        let name = format!("generations/{}.json", g.id);
        let json = serde_json::to_vec_pretty(g)
            .map_err(|e| crate::err!(InvalidInput, "unable to encode generation {}: {e}", g.id))?;
        let b = self.seal(&name, json)?;
        let n = b.len() as u64;
        match &self.remote {
            None => fsutil::write_atomic(&self.meta_path(&g.id), &b)?,
            Some(r) => r.put(&name, b)?,
        }
        Ok(n)
    }

    /// Object stores: a backup of generation `id` starts (see [`gc`], W1): probe the
    /// store's clock with `writers/<id>`. Nothing to do on a directory.
    pub fn writer_begin(&self, id: &str) -> Result<()> {
        if let Some(r) = &self.remote {
            let start = r.probe(&format!("writers/{id}"))?;
            self.store.writer_start(start);
        }
        Ok(())
    }

    /// Object stores: before a backup writes its index (W3, see
    /// [`ChunkStore::writer_check_refreshed`]).
    pub fn writer_before_publish(&self) -> Result<()> {
        self.store.writer_check_refreshed().map(|_| ())
    }

    /// Object stores: right after a backup published `id`'s metadata (W4): probe the
    /// store's clock again; if the backup ran over a quarter of the grace period since
    /// its start, delete the metadata again (unpublish) and fail.
    pub fn writer_after_publish(&self, id: &str) -> Result<()> {
        let Some(r) = &self.remote else {
            return Ok(());
        };
        let probe = format!("writers/{id}");
        let start = r.modified(&probe)?;
        let end = r.probe(&probe)?;
        match start {
            Some(s) if self.grace().published_in_time(s, end) => Ok(()),
            _ => {
                r.delete(&format!("generations/{id}.json"))?;
                Err(crate::err!(
                    Io,
                    "unable to publish generation {id}: the backup took longer than a quarter of the repository's grace period ({} s), so a concurrent prune may have collected chunks it relies on; unpublished again, run the backup again",
                    self.grace().millis() / 1000
                ))
            }
        }
    }

    /// Object stores: a backup of `id` ended (published or not): remove its probe,
    /// trying for at most [`PROBE_CLEANUP_LIMIT`] — a backup that failed because the
    /// store is down must not spend another retry period on it.
    pub fn writer_end(&self, id: &str) {
        self.store.writer_end();
        if let Some(r) = &self.remote {
            if let Err(e) = r.delete_within(&format!("writers/{id}"), PROBE_CLEANUP_LIMIT) {
                log::warn!("{e} (a later prune removes it)");
            }
        }
    }

    /// [`Self::list_all`] of an object store: one listing, then each metadata object.
    fn list_object(&self, r: &object::ObjectRepo) -> Result<Listed> {
        let names = r.list("generations/")?;
        let idx: std::collections::HashSet<&str> = names
            .iter()
            .filter_map(|(n, _)| n.strip_prefix("generations/")?.strip_suffix(".idx"))
            .collect();
        let mut out = Listed::default();
        for (n, len) in &names {
            let Some(id) = n
                .strip_prefix("generations/")
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            if !generation::valid_id(id) || !idx.contains(id) {
                continue;
            }
            if *len > 16 << 20 {
                out.unreadable(id, format!("{n}: {len} bytes of metadata"));
                continue;
            }
            let Some(b) = r.get(n)? else { continue };
            let b = match self.unseal(n, b, &format!("{}/{n}", r.url())) {
                Ok(b) => b,
                Err(e) => {
                    out.unreadable(id, e.to_string());
                    continue;
                }
            };
            match serde_json::from_slice::<GenerationInfo>(&b) {
                Ok(g) if g.id == id => out.generations.push(g),
                Ok(_) => out.unreadable(id, format!("{n}: id does not match the object name")),
                Err(e) => out.unreadable(id, format!("unable to parse {}/{n}: {e}", r.url())),
            }
        }
        out.generations.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Every complete generation (index and metadata present) whose metadata reads,
    /// oldest first; one whose metadata does not is left out with a warning. For
    /// callers that may delete what no listed generation references, [`Self::list_all`].
    pub fn list(&self) -> Result<Vec<GenerationInfo>> {
        let l = self.list_all()?;
        for u in &l.unreadable {
            log::warn!("{}; generation ignored", u.why);
        }
        Ok(l.generations)
    }

    /// Every complete generation, and apart from them the ones whose metadata cannot be
    /// read (unreadable, damaged, not matching its name).
    pub fn list_all(&self) -> Result<Listed> {
        if let Some(r) = &self.remote {
            return self.list_object(r);
        }
        let dir = self.generations_dir();
        let mut out = Listed::default();
        for ent in crate::fsutil::dir_entries(&dir)? {
            let name = ent.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".json") else {
                continue;
            };
            if !generation::valid_id(id) || !self.index_path(id).exists() {
                continue;
            }
            let read = match &self.key {
                None => GenerationInfo::read(&ent.path()),
                Some(_) => self.read_sealed_meta(&name),
            };
            match read {
                Ok(g) if g.id == id => out.generations.push(g),
                Ok(_) => out.unreadable(id, format!("{name}: id does not match the file name")),
                Err(e) => out.unreadable(id, e.to_string()),
            }
        }
        out.generations.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Read and open the sealed metadata file `name` (`ID.json`).
    fn read_sealed_meta(&self, name: &str) -> Result<GenerationInfo> {
        let rel = format!("generations/{name}");
        let what = self.dir.join(&rel).display().to_string();
        let b = self.read_local(&rel, MAX_META_BYTES)?;
        let b = self.unseal(&rel, b, &what)?;
        serde_json::from_slice(&b).map_err(|e| crate::err!(Corrupt, "unable to parse {what}: {e}"))
    }

    /// The newest complete generation of `disk`.
    pub fn latest_of(&self, disk: &str) -> Result<Option<GenerationInfo>> {
        Ok(self.list()?.into_iter().rev().find(|g| g.disk == disk))
    }

    /// Resolve a generation spec: an id, a unique id prefix, a disk name (its newest
    /// generation), or `None` (the newest generation when the repository holds one disk).
    /// [`group::resolve`] also accepts group ids.
    ///
    /// A generation whose metadata cannot be read is not picked silently around: a spec
    /// naming it, or a pick it could change (see [`Listed::check_pick`]), is refused.
    pub fn resolve(&self, spec: Option<&str>) -> Result<GenerationInfo> {
        let l = self.list_all()?;
        l.check_spec(spec, &self.dir)?;
        let g = resolve_in(&l.generations, spec, &self.dir)?;
        l.check_pick(spec, &g, &self.dir)?;
        Ok(g)
    }

    /// Load a generation's index and check it matches its metadata; on an object
    /// store from the local cache when it holds a valid copy (see [`cache`]).
    pub fn load_index(&self, g: &GenerationInfo) -> Result<FixedIndex> {
        self.load_index_with(g, true)
    }

    /// [`Self::load_index`] from the store itself, never the local cache (`verify`).
    pub fn load_index_from_store(&self, g: &GenerationInfo) -> Result<FixedIndex> {
        self.load_index_with(g, false)
    }

    fn load_index_with(&self, g: &GenerationInfo, cached: bool) -> Result<FixedIndex> {
        let name = format!("generations/{}.idx", g.id);
        let idx = match (&self.remote, &self.key) {
            (None, None) => FixedIndex::read(&self.index_path(&g.id))?,
            (None, Some(_)) => {
                let what = self.index_path(&g.id).display().to_string();
                let b = self.read_local(&name, MAX_INDEX_BYTES)?;
                FixedIndex::decode(&self.unseal(&name, b, &what)?, &what)?
            }
            (Some(r), _) => {
                let b = self.fetch_index(r, g, cached)?;
                let what = format!("{}/{name}", r.url());
                FixedIndex::decode(&self.unseal(&name, b, &what)?, &what)?
            }
        };
        if idx.generation != g.id || idx.disk_size != g.disk_size || idx.chunk_size != g.chunk_size
        {
            return Err(crate::err!(
                Corrupt,
                "index of generation {} does not match its metadata",
                g.id
            ));
        }
        Ok(idx)
    }
}

/// [`Repo::resolve`] over the generations `all` of the repository at `dir`.
pub(crate) fn resolve_in(
    all: &[GenerationInfo],
    spec: Option<&str>,
    dir: &Path,
) -> Result<GenerationInfo> {
    let dir = dir.display();
    match spec {
        None => {
            let last = all.last().ok_or_else(|| {
                crate::err!(
                    NotFound,
                    "unable to pick a generation: repository {dir} has none"
                )
            })?;
            if all.iter().any(|g| g.disk != last.disk) {
                return Err(crate::err!(
                    InvalidInput,
                    "unable to pick a generation: repository {dir} holds several disks; name a generation or a disk"
                ));
            }
            Ok(last.clone())
        }
        Some(s) => {
            if let Some(g) = all.iter().find(|g| g.id == s) {
                return Ok(g.clone());
            }
            if let Some(g) = all.iter().rev().find(|g| g.disk == s) {
                return Ok(g.clone());
            }
            let m: Vec<_> = all.iter().filter(|g| g.id.starts_with(s)).collect();
            match m.len() {
                1 => Ok(m[0].clone()),
                0 => {
                    let members: Vec<String> = all
                        .iter()
                        .filter(|g| g.group.as_ref().is_some_and(|r| r.id == s))
                        .map(|g| format!("{} ({})", g.id, g.disk))
                        .collect();
                    if members.is_empty() {
                        Err(crate::err!(
                            NotFound,
                            "unable to find generation {s:?} in repository {dir}"
                        ))
                    } else {
                        Err(crate::err!(
                            InvalidInput,
                            "unable to pick a generation: {s:?} is a consistency group in {dir}, and this takes one generation: name one of its members, {}",
                            members.join(", ")
                        ))
                    }
                }
                n => Err(crate::err!(
                    InvalidInput,
                    "unable to pick a generation: {s:?} matches {n} generations in {dir}"
                )),
            }
        }
    }
}

/// Every complete generation in the repository at `dir`, oldest first.
pub fn list(dir: &Path) -> Result<Vec<GenerationInfo>> {
    Repo::open(dir)?.list()
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::{FixedIndex, GenerationInfo, GenerationKind, GenerationStats, Repo};

    /// A new object-store repository (4 KiB chunks, grace period `grace_secs`) in
    /// memory: the store's clock is this host's.
    pub(crate) fn in_memory(grace_secs: u64) -> Repo {
        let store = Box::new(object_store::memory::InMemory::new());
        let r = super::object::ObjectRepo::with_store("s3://mem/p", "p", store).unwrap();
        let json = super::new_config_json("s3://mem/p", 4096, None, Some(grace_secs)).unwrap();
        r.put(super::CONFIG_FILE, json).unwrap();
        Repo::open_object_on(std::sync::Arc::new(r), None).unwrap()
    }

    /// Another handle on the same object store (another host's view).
    pub(crate) fn reopen(repo: &Repo) -> Repo {
        Repo::open_object_on(repo.remote().unwrap().clone(), None).unwrap()
    }

    /// Store `img`'s chunks (zero chunks are not stored); their hashes.
    fn store_chunks(repo: &Repo, img: &[u8]) -> Vec<[u8; 32]> {
        img.chunks(repo.chunk_size() as usize)
            .map(|c| {
                let h = super::chunk_store::chunk_hash(c);
                if h != super::ZERO_HASH {
                    repo.store().insert(&h, c).unwrap();
                }
                h
            })
            .collect()
    }

    /// Store `img`'s chunks and write the index of generation `id` (not published).
    pub(crate) fn stage(repo: &Repo, id: &str, img: &[u8]) -> FixedIndex {
        let cs = repo.chunk_size() as usize;
        let hashes = store_chunks(repo, img);
        let idx = FixedIndex::from_hashes(id, cs as u32, img.len() as u64, &hashes).unwrap();
        repo.write_index(&idx).unwrap();
        idx
    }

    /// The metadata of a full generation `id` of `disk` made at `created_unix`.
    pub(crate) fn meta(id: &str, disk: &str, size: u64, created_unix: u64) -> GenerationInfo {
        GenerationInfo {
            disk: disk.into(),
            created_unix,
            ..make_info(id, size, 4096)
        }
    }

    /// Store `img` as a full generation `id` of disk "d".
    pub(crate) fn make_gen(repo: &Repo, id: &str, img: &[u8]) -> GenerationInfo {
        let cs = repo.chunk_size() as usize;
        let hashes = store_chunks(repo, img);
        repo.store().sync_dirs().unwrap();
        FixedIndex::from_hashes(id, cs as u32, img.len() as u64, &hashes)
            .unwrap()
            .write(&repo.index_path(id))
            .unwrap();
        let g = make_info(id, img.len() as u64, cs as u32);
        g.write(&repo.meta_path(id)).unwrap();
        g
    }

    /// The metadata of a full generation `id` of disk "d".
    pub(crate) fn make_info(id: &str, disk_size: u64, chunk_size: u32) -> GenerationInfo {
        GenerationInfo {
            id: id.into(),
            disk: "d".into(),
            disk_size,
            chunk_size,
            created_unix: 0,
            created: String::new(),
            kind: GenerationKind::Full,
            parent: None,
            lineage: "l".into(),
            seq_next: 0,
            seq_lowest_unacked: 0,
            stats: GenerationStats::default(),
            notes: Vec::new(),
            group: None,
            index_hash: None,
        }
    }
}

#[cfg(test)]
mod chunk_size_tests {
    use super::*;

    #[test]
    fn a_new_repositorys_chunk_size_comes_from_the_setting_checked() {
        assert_eq!(
            new_chunk_size("x", None, DEFAULT_CHUNK_SIZE).unwrap(),
            1 << 20
        );
        assert_eq!(new_chunk_size("x", Some("4M"), 1 << 20).unwrap(), 4 << 20);
        assert_eq!(
            new_chunk_size("x", Some("256K"), 1 << 20).unwrap(),
            256 << 10
        );
        assert_eq!(
            new_chunk_size("x", Some("65536"), 1 << 20).unwrap(),
            64 << 10
        );
        for bad in ["32K", "3M", "128M", "", "big", "99999999999999999999"] {
            let e = new_chunk_size("s3://b/r", Some(bad), 1 << 20).unwrap_err();
            assert!(e.to_string().contains(CHUNK_SIZE_ENV), "{bad}: {e}");
            assert!(e.to_string().contains("s3://b/r"), "{e}");
        }
    }
}
