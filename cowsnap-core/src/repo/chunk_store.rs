//! Content-addressed chunk store: `chunks/ab/<64 hex>`, named by the blake3 hash of
//! the uncompressed data.
//!
//! Chunk file: a 16-byte header (`CSCK`, version 1, encoding 0 = raw / 1 = zstd,
//! 2 reserved bytes, raw length u32 LE, stored length u32 LE) and the payload. A chunk
//! is compressed with zstd (level [`ZSTD_LEVEL`]) and stored raw when that does not
//! shrink it. A backup publishes its chunks late ([`ChunkStore::insert_unpublished`]):
//! each is written under its temporary name with its writeback started, and fsynced and
//! renamed a while later (at the latest before the index), so the fsync rarely waits
//! for the disk. Incompressible data (random, already compressed or encrypted) is found
//! without compressing the whole chunk ([`worth_compressing`]: one compression of
//! [`PROBE_SLICES`] slices spread over it); such a chunk is stored raw, which can cost
//! a little space on a chunk whose compressible parts all fall between the slices. Files are written under a temporary name, `fdatasync`ed and renamed, so
//! a name never points at partial data; callers fsync the touched `ab/` directories
//! (see [`ChunkStore::sync_dirs`]) before publishing an index that references them.
//! The all-zero chunk is never stored: indexes carry [`ZERO_HASH`] for it.
//!
//! Dedup: a chunk whose file already exists is not written again, but it is read back
//! and compared with the data first (a decompression and a memcmp: no hashing, since the
//! caller's data already hashes to the name). Reuse is what would spread damage: a
//! backup that reused a damaged chunk would publish a generation that cannot be
//! restored. Concurrent writers of the same chunk each write their own temporary file
//! and rename it; both renames install identical content.
//!
//! # Quarantine
//!
//! A chunk found damaged — by a read (verify, restore, a live restore's fill) or by a
//! backup about to reuse it — is moved to `DIR/quarantine/<64 hex>` (atomic rename;
//! the bytes are kept as evidence, later copies get a `.N` suffix). The name is then
//! free: [`ChunkStore::insert`] stores the data afresh the next time any backup (or
//! `verify --repair`) has it, and since every generation references chunks by hash,
//! that one file heals every generation that references it. A read of a quarantined
//! chunk fails with `NotFound` and says so.
//!
//! Replacing a file that exists (quarantining it) happens only under the exclusive
//! `flock` on `DIR/quarantine/.lock`, after reading it again: two processes that both
//! found it damaged quarantine it once, and a healthy copy installed meanwhile (only
//! possible once the name is free) is never moved away. Installing a chunk never
//! replaces a file that is there: it renames only over a missing name (or over an
//! identical copy a concurrent writer installed).
//!
//! # On an object store
//!
//! The same chunks, as objects `PREFIX/chunks/ab/<64 hex>` ([`ChunkStore::object`],
//! see `repo::object`): a chunk is PUT whole (atomic; nothing to fsync or rename, so
//! it is "published" when the PUT returns). Whether a chunk is present comes from one
//! listing of `chunks/` taken at the first question, plus what this store wrote since
//! (a chunk another writer added meanwhile is written again: the same bytes). A present
//! chunk is reused without reading it back — during a backup only if the listing says
//! it was last modified at most half a grace period before the backup started; an
//! older one is written again (a refresh) and checked again before the backup
//! publishes (`repo::gc`, rules W2 and W3). There is no quarantine: a damaged chunk is
//! reported and left in place.

use super::crypt::RepoKey;
use super::object::ObjectRepo;
use crate::bytes::is_zero;
use crate::error::{Error, IoContext, Result};
use crate::fsutil::{self, hex};
use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Reserved hash for an all-zero chunk (never stored).
pub const ZERO_HASH: [u8; 32] = [0u8; 32];
/// zstd level used for chunks.
pub const ZSTD_LEVEL: i32 = 1;
const MAGIC: [u8; 4] = *b"CSCK";
/// The chunk file format version written and read (the header's fifth byte).
pub const CHUNK_VERSION: u8 = 1;
/// The version of a sealed chunk (an encrypted repository's; see `repo::crypt`).
pub const CHUNK_VERSION_SEALED: u8 = 2;
const HDR: usize = 16;
/// Marks "a subdirectory was created" in the touched set: the parent needs a sync.
const PARENT: u16 = 256;

/// Slices of [`PROBE_SLICE`] bytes taken, evenly spread, to probe a chunk.
pub const PROBE_SLICES: usize = 8;
/// Bytes per probe slice.
pub const PROBE_SLICE: usize = 4096;

/// Whether compressing `data` whole may shrink it: chunks of up to 4 probes are always
/// tried; larger ones only when the probe (the slices, compressed together) shrinks
/// by more than 1/64. A probe that cannot be compressed says "try".
pub fn worth_compressing(data: &[u8]) -> bool {
    if data.len() <= 4 * PROBE_SLICES * PROBE_SLICE {
        return true;
    }
    let step = data.len() / PROBE_SLICES;
    let mut probe = Vec::with_capacity(PROBE_SLICES * PROBE_SLICE);
    for k in 0..PROBE_SLICES {
        probe.extend_from_slice(&data[k * step..k * step + PROBE_SLICE]);
    }
    match zstd::bulk::compress(&probe, ZSTD_LEVEL) {
        Ok(c) => c.len() < probe.len() - probe.len() / 64,
        Err(_) => true,
    }
}

/// The hash an index records for `data` in an unencrypted repository (the zero hash
/// for zeros); see [`ChunkStore::hash`].
pub fn chunk_hash(data: &[u8]) -> [u8; 32] {
    chunk_hash_keyed(data, None)
}

/// The hash an index records for `data`: blake3, or under `key` its keyed hash (the
/// zero hash for zeros either way).
pub fn chunk_hash_keyed(data: &[u8], key: Option<&RepoKey>) -> [u8; 32] {
    if is_zero(data) {
        ZERO_HASH
    } else {
        content_hash(data, key)
    }
}

/// The name `data` (not all zeros) has.
fn content_hash(data: &[u8], key: Option<&RepoKey>) -> [u8; 32] {
    match key {
        None => *blake3::hash(data).as_bytes(),
        Some(k) => k.chunk_id(data),
    }
}

/// The associated data a sealed chunk is bound to: its header and its name.
fn chunk_aad(hdr: &[u8], hash: &[u8; 32]) -> [u8; HDR + 32] {
    let mut aad = [0u8; HDR + 32];
    aad[..HDR].copy_from_slice(&hdr[..HDR]);
    aad[HDR..].copy_from_slice(hash);
    aad
}

/// Open a sealed payload (`key` given) or pass a plain one through.
fn unseal(hash: &[u8; 32], hdr: &[u8], payload: Vec<u8>, key: Option<&RepoKey>) -> Result<Vec<u8>> {
    match key {
        None => Ok(payload),
        Some(k) => k
            .open_chunk(&chunk_aad(hdr, hash), &payload)
            .ok_or_else(|| {
                corrupt(
                    hash,
                    "it does not authenticate (damaged, or not this chunk)",
                )
            }),
    }
}

/// The chunks directory of a repository.
pub struct ChunkStore {
    dir: PathBuf,
    quarantine: PathBuf,
    touched: Mutex<BTreeSet<u16>>,
    /// The object store, for a repository on one (then `dir` is only for messages).
    remote: Option<Remote>,
    /// The key of an encrypted repository: names are keyed hashes, payloads sealed.
    key: Option<Arc<RepoKey>>,
}

/// Chunks known present and their last-modified times (ms, the store's clock).
type Known = HashMap<[u8; 32], i64>;

/// The chunks of an object-store repository.
struct Remote {
    repo: Arc<ObjectRepo>,
    grace: super::gc::Grace,
    /// Chunks known present with their last-modified times (ms, the store's clock): one
    /// listing at the first question, plus those written since (`i64::MAX`: by us).
    known: Mutex<Option<Known>>,
    /// Listings of `chunks/` that failed, and the last one's error: see
    /// [`Remote::known`].
    list_failures: AtomicU64,
    list_failed: Mutex<Option<(crate::ErrorKind, String)>>,
    /// The running backup's start and refreshes (see `repo::gc`, W1 to W3).
    writer: Mutex<Writer>,
    /// When the listing of `chunks/` returned.
    listed_at: Mutex<Option<Instant>>,
}

/// A backup's view of the garbage-collection rules.
#[derive(Default)]
struct Writer {
    /// The store's time at the backup's start (W1); `None`: no backup runs.
    start: Option<i64>,
    /// Chunks written again because they were too old to reuse unwritten (W2).
    refreshed: Vec<[u8; 32]>,
    /// When the last refresh returned.
    last_refresh: Option<Instant>,
    /// New chunks PUT within [`super::gc::Grace::refresh_wait`] of the listing.
    early: Vec<[u8; 32]>,
}

/// Whether a chunk is present, and if so whether it may be reused unwritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presence {
    Absent,
    Reusable,
    /// Present, but too old to rely on without writing it again.
    Stale,
}

impl Remote {
    /// The chunks known present (lists the store at the first call). A caller that
    /// waited here while a listing failed gets that listing's error rather than
    /// listing again: a backup's workers all ask at once, and with the store down each
    /// of them in turn would spend a whole retry period on a listing of its own, so the
    /// backup would fail only after as many retry periods as it has workers. A caller
    /// that comes after the failure lists again.
    fn known(&self) -> Result<std::sync::MutexGuard<'_, Option<Known>>> {
        let failures = self.list_failures.load(Ordering::SeqCst);
        let mut k = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if k.is_none() {
            if self.list_failures.load(Ordering::SeqCst) != failures {
                let failed = self.list_failed.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((kind, msg)) = failed.as_ref() {
                    return Err(Error::new(*kind, msg.clone()));
                }
            }
            let listed = match self.repo.list_meta("chunks/") {
                Ok(l) => l,
                Err(e) => {
                    // Recorded before the count: a waiting caller reads it after.
                    *self.list_failed.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((e.kind(), e.to_string()));
                    self.list_failures.fetch_add(1, Ordering::SeqCst);
                    return Err(e);
                }
            };
            *self.listed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            *k = Some(
                listed
                    .iter()
                    .filter_map(|l| {
                        let h = fsutil::parse_hash(l.name.rsplit('/').next()?)?;
                        Some((h, l.modified_ms))
                    })
                    .collect(),
            );
        }
        Ok(k)
    }

    /// Whether `hash` is known present (lists the store at the first call).
    fn contains(&self, hash: &[u8; 32]) -> Result<bool> {
        Ok(self
            .known()?
            .as_ref()
            .is_some_and(|set| set.contains_key(hash)))
    }

    /// Whether `hash` is present and reusable by the running backup (W2).
    fn presence(&self, hash: &[u8; 32]) -> Result<Presence> {
        let start = self.writer.lock().unwrap_or_else(|p| p.into_inner()).start;
        let k = self.known()?;
        let Some(set) = k.as_ref() else {
            return Ok(Presence::Absent);
        };
        Ok(match (set.get(hash), start) {
            (None, _) => Presence::Absent,
            (Some(_), None) => Presence::Reusable,
            (Some(&m), Some(s)) if self.grace.reusable(m, s) => Presence::Reusable,
            (Some(_), Some(_)) => Presence::Stale,
        })
    }

    fn add(&self, hash: &[u8; 32]) {
        if let Some(set) = self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            set.insert(*hash, i64::MAX);
        }
    }
}

/// See [`ChunkStore::lookup`].
pub struct Lookup<'a> {
    store: &'a ChunkStore,
    /// Whether an object store's listing is still asked (after it failed once, each
    /// chunk is asked for alone: one failed listing costs one retry period, not one
    /// per chunk).
    listing: bool,
}

impl Lookup<'_> {
    /// Whether a chunk file exists under `hash` (healthy or not); an error when the
    /// store cannot tell (unreachable, a directory that cannot be read), never `false`
    /// for a chunk that may be there.
    pub fn contains(&mut self, hash: &[u8; 32]) -> Result<bool> {
        if *hash == ZERO_HASH {
            return Ok(true);
        }
        let Some(r) = &self.store.remote else {
            let path = self.store.path_of(hash);
            return path
                .try_exists()
                .ctx(|| format!("unable to look up chunk {}", path.display()));
        };
        if self.listing {
            match r.contains(hash) {
                Ok(b) => return Ok(b),
                Err(e) => {
                    log::warn!("{e}; asking for each chunk alone");
                    self.listing = false;
                }
            }
        }
        r.repo.exists(&chunk_key(hash))
    }
}

/// The object key of a chunk, relative to the repository's prefix.
fn chunk_key(hash: &[u8; 32]) -> String {
    let h = hex(hash);
    format!("chunks/{}/{h}", &h[..2])
}

/// A chunk's header and payload (zstd when that shrinks it; sealed under `key`;
/// otherwise the data itself, not copied).
fn encode_parts<'a>(
    hash: &[u8; 32],
    data: &'a [u8],
    key: Option<&RepoKey>,
) -> Result<([u8; HDR], Cow<'a, [u8]>)> {
    let compressed = match worth_compressing(data) {
        true => zstd::bulk::compress(data, ZSTD_LEVEL)
            .ctx(|| format!("unable to compress chunk {}", hex(hash)))?,
        false => Vec::new(),
    };
    let (enc, payload): (u8, Cow<'a, [u8]>) =
        if !compressed.is_empty() && compressed.len() < data.len() {
            (1, Cow::Owned(compressed))
        } else {
            (0, Cow::Borrowed(data))
        };
    let stored_len = payload.len() + key.map_or(0, |_| super::crypt::CHUNK_OVERHEAD);
    let mut hdr = [0u8; HDR];
    hdr[..4].copy_from_slice(&MAGIC);
    hdr[4] = match key {
        None => CHUNK_VERSION,
        Some(_) => CHUNK_VERSION_SEALED,
    };
    hdr[5] = enc;
    hdr[8..12].copy_from_slice(&(data.len() as u32).to_le_bytes());
    hdr[12..16].copy_from_slice(&(stored_len as u32).to_le_bytes());
    let payload = match key {
        None => payload,
        Some(k) => Cow::Owned(k.seal_chunk(&chunk_aad(&hdr, hash), &payload)?),
    };
    Ok((hdr, payload))
}

/// A chunk's stored bytes: header and payload (zstd when that shrinks it; sealed under
/// `key`).
fn encode_chunk(hash: &[u8; 32], data: &[u8], key: Option<&RepoKey>) -> Result<Vec<u8>> {
    let (hdr, payload) = encode_parts(hash, data, key)?;
    let mut out = Vec::with_capacity(HDR + payload.len());
    out.extend_from_slice(&hdr);
    out.extend_from_slice(&payload);
    Ok(out)
}

/// One file found in the store: its hash (`None` for a stray temporary file), path
/// and size in bytes.
pub type StoredFile = (Option<[u8; 32]>, PathBuf, u64);

/// Result of storing one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    /// Written now; bytes on disk (header included).
    New(u64),
    /// Already present (and read back equal to the data).
    Reused,
    /// A damaged copy was there: it went to quarantine and the data was written
    /// afresh; bytes on disk (header included).
    Healed(u64),
}

/// A chunk written under its temporary name, not yet durable nor under its name
/// ([`ChunkStore::insert_unpublished`]). Dropping it removes the temporary file.
pub struct PendingChunk {
    file: fsutil::AtomicFile,
}

impl PendingChunk {
    /// fsync the chunk, then rename it to its name (the caller fsyncs the directory:
    /// [`ChunkStore::sync_dirs`]).
    pub fn publish(self) -> Result<()> {
        self.file.commit_no_dir_sync()
    }
}

impl PendingChunk {
    /// Publish the chunk the way `sync` says: fsync and rename ([`Self::publish`]), or
    /// (file-system sync) only rename it, not over a chunk already under that name
    /// (whose content is the same: it hashes to the name), leaving durability to
    /// [`ChunkStore::sync_for_commit`].
    pub fn publish_for(self, sync: &ChunkSync) -> Result<()> {
        match sync {
            ChunkSync::PerChunk => self.publish(),
            ChunkSync::FileSystem(_) => self.file.name_unsynced().map(|_| ()),
        }
    }
}

/// How a backup into a directory repository makes the chunks it stores durable before
/// it publishes an index that references them (ARCHITECTURE "Chunk durability").
#[derive(Debug)]
pub enum ChunkSync {
    /// Each chunk is fsynced before it gets its name; the chunk directories touched
    /// are fsynced at commit. Every named chunk is durable.
    PerChunk,
    /// Chunks get their names unsynced; the commit calls `syncfs` on this descriptor
    /// of the chunk directory, opened before the backup wrote anything, so it reports
    /// any writeback error on the file system since (Linux 5.8+). Every chunk an index
    /// references is durable; a named chunk nothing published references may be torn
    /// by a crash, which the reuse check (it reads every chunk it reuses) heals.
    FileSystem(File),
}

impl ChunkSync {
    /// Whether chunks are synced per file system (at commit).
    pub fn per_file_system(&self) -> bool {
        matches!(self, ChunkSync::FileSystem(_))
    }
}

/// File systems whose `syncfs` writes every dirty page and inode of the file system and
/// reports writeback errors (Linux 5.8+): local, one host. ext2/3/4, XFS, btrfs, F2FS,
/// tmpfs (nothing to write back).
const SYNCFS_TRUSTED: [nix::sys::statfs::FsType; 5] = {
    use nix::sys::statfs::*;
    [
        EXT4_SUPER_MAGIC,
        XFS_SUPER_MAGIC,
        BTRFS_SUPER_MAGIC,
        F2FS_SUPER_MAGIC,
        TMPFS_MAGIC,
    ]
};

/// Whether the running kernel reports writeback errors from `syncfs` (5.8 and later).
fn syncfs_reports_errors() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").is_ok_and(|r| release_at_least_5_8(&r))
}

/// Whether a kernel release string (`6.1.0-18-amd64`) is 5.8 or later.
fn release_at_least_5_8(rel: &str) -> bool {
    let mut it = rel
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    (major, minor) >= (5, 8)
}

/// A chunk file's header fields and payload.
struct Decoded<'a> {
    encoding: u8,
    raw_len: usize,
    payload: &'a [u8],
}

fn corrupt(hash: &[u8; 32], why: &str) -> Error {
    crate::err!(Corrupt, "chunk {} is corrupt: {why}", hex(hash))
}

/// Check a chunk file's header (its first [`HDR`] bytes) against the payload length
/// the file holds: `(encoding, raw length)`.
fn parse_header(
    hash: &[u8; 32],
    hdr: &[u8],
    payload_len: usize,
    key: Option<&RepoKey>,
) -> Result<(u8, usize)> {
    let version = match key {
        None => CHUNK_VERSION,
        Some(_) => CHUNK_VERSION_SEALED,
    };
    if hdr.len() < HDR || hdr[..4] != MAGIC || hdr[4] != version {
        return Err(corrupt(hash, "bad header"));
    }
    let raw_len = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
    // Decompression allocates raw_len bytes: a damaged header must not ask for more
    // than any repository chunk holds.
    if raw_len > super::MAX_CHUNK_SIZE as usize {
        return Err(corrupt(hash, &format!("implausible length {raw_len}")));
    }
    let stored_len = u32::from_le_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]) as usize;
    if stored_len != payload_len {
        return Err(corrupt(hash, "truncated"));
    }
    if hdr[5] > 1 {
        return Err(corrupt(hash, &format!("unknown encoding {}", hdr[5])));
    }
    Ok((hdr[5], raw_len))
}

/// Check a chunk file's header.
fn decode_header<'a>(hash: &[u8; 32], raw: &'a [u8], key: Option<&RepoKey>) -> Result<Decoded<'a>> {
    if raw.len() < HDR {
        return Err(corrupt(hash, "bad header"));
    }
    let (encoding, raw_len) = parse_header(hash, &raw[..HDR], raw.len() - HDR, key)?;
    Ok(Decoded {
        encoding,
        raw_len,
        payload: &raw[HDR..],
    })
}

/// Read the chunk file at `path` and decode it into `out` (replacing its content):
/// it decodes, hashes to `hash` and holds `expect_len` bytes (the outer error is I/O,
/// the inner one the file's content). A raw (encoding 0) payload is read straight
/// into `out`, whose allocation is reused: no copy, no fresh zeroed memory per chunk.
fn read_decoded(
    hash: &[u8; 32],
    path: &Path,
    expect_len: usize,
    key: Option<&RepoKey>,
    out: &mut Vec<u8>,
) -> std::io::Result<Result<()>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let size = f.metadata()?.len();
    let mut hdr = [0u8; HDR];
    if size < HDR as u64 {
        return Ok(Err(corrupt(hash, "bad header")));
    }
    // the whole file is read next: ask for all of it at once, so a cold chunk costs one
    // request to the disk instead of a read-ahead window growing from a few pages
    crate::fsutil::will_need(&f, size);
    f.read_exact(&mut hdr)?;
    let payload_len = usize::try_from(size - HDR as u64).unwrap_or(usize::MAX);
    let (encoding, raw_len) = match parse_header(hash, &hdr, payload_len, key) {
        Ok(h) => h,
        Err(e) => return Ok(Err(e)),
    };
    // stored_len (= payload_len) fits in the header's u32
    let mut stored = Vec::new();
    let dst = match (encoding, key) {
        (0, None) => &mut *out,
        _ => &mut stored,
    };
    // one read of the payload's whole length (read_to_end would start at 8 KiB and
    // double, a syscall and a wait per step on a cold file)
    dst.clear();
    dst.resize(payload_len, 0);
    match f.read_exact(dst) {
        Ok(()) => {}
        // shorter than its size said a moment ago: damage, like a truncation
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Ok(Err(corrupt(hash, "truncated")))
        }
        Err(e) => return Err(e),
    }
    if key.is_some() {
        stored = match unseal(hash, &hdr, stored, key) {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        if encoding == 0 {
            *out = std::mem::take(&mut stored);
        }
    }
    if encoding != 0 {
        match zstd::bulk::decompress(&stored, raw_len) {
            Ok(d) => *out = d,
            Err(e) => return Ok(Err(corrupt(hash, &format!("does not decompress: {e}")))),
        }
    }
    if out.len() != raw_len || content_hash(out, key) != *hash {
        return Ok(Err(corrupt(hash, "content does not match its hash")));
    }
    if out.len() != expect_len {
        return Ok(Err(wrong_len(hash, out.len(), expect_len)));
    }
    Ok(Ok(()))
}

/// Decode a chunk file and check its content hashes to `hash`.
fn decode_any(hash: &[u8; 32], raw: &[u8], key: Option<&RepoKey>) -> Result<Vec<u8>> {
    let d = decode_header(hash, raw, key)?;
    let payload = unseal(hash, &raw[..HDR], d.payload.to_vec(), key)?;
    let data = match d.encoding {
        0 => payload,
        _ => zstd::bulk::decompress(&payload, d.raw_len)
            .map_err(|e| corrupt(hash, &format!("does not decompress: {e}")))?,
    };
    if data.len() != d.raw_len || content_hash(&data, key) != *hash {
        return Err(corrupt(hash, "content does not match its hash"));
    }
    Ok(data)
}

/// Decode a chunk object read whole (an object store's body) and check it holds
/// `expect_len` bytes.
fn decode(
    hash: &[u8; 32],
    raw: &[u8],
    expect_len: usize,
    key: Option<&RepoKey>,
) -> Result<Vec<u8>> {
    let data = decode_any(hash, raw, key)?;
    if data.len() != expect_len {
        return Err(wrong_len(hash, data.len(), expect_len));
    }
    Ok(data)
}

/// The error for a healthy chunk of another length than the caller expects: the
/// caller (its index) is wrong, not the chunk, so it is not damage.
fn wrong_len(hash: &[u8; 32], have: usize, expect_len: usize) -> Error {
    crate::err!(
        InvalidInput,
        "chunk {} holds {have} bytes, expected {expect_len}",
        hex(hash)
    )
}

/// Whether a chunk file holds exactly `data` (which the caller hashed to its name).
fn holds(hash: &[u8; 32], raw: &[u8], data: &[u8], key: Option<&RepoKey>) -> Result<()> {
    let d = decode_header(hash, raw, key)?;
    if d.raw_len != data.len() {
        // Either the header is damaged or the file is healthy and of another length
        // (impossible for a correct hash): tell them apart by decoding it.
        let have = decode_any(hash, raw, key)?;
        return Err(wrong_len(hash, have.len(), data.len()));
    }
    if key.is_some() {
        // sealed: authenticate and decode it whole, then compare
        let have = decode_any(hash, raw, key)?;
        return match have == data {
            true => Ok(()),
            false => Err(corrupt(hash, "content does not match its hash")),
        };
    }
    let same = match d.encoding {
        0 => d.payload == data,
        _ => {
            zstd::bulk::decompress(d.payload, d.raw_len)
                .map_err(|e| corrupt(hash, &format!("does not decompress: {e}")))?
                == data
        }
    };
    if same {
        Ok(())
    } else {
        Err(corrupt(hash, "content does not match its hash"))
    }
}

/// Whether an error means "this chunk file is damaged" (as opposed to "cannot be read
/// now"): bad content, or EIO from the medium.
pub fn is_damage(e: &Error) -> bool {
    e.kind() == crate::ErrorKind::Corrupt
        || e.os_error().and_then(|s| s.raw_os_error()) == Some(libc::EIO)
}

impl ChunkStore {
    /// The store under `dir` (`DIR/chunks`), quarantining into `quarantine`
    /// (`DIR/quarantine`).
    pub fn new(dir: &Path, quarantine: &Path) -> Self {
        ChunkStore {
            dir: dir.to_path_buf(),
            quarantine: quarantine.to_path_buf(),
            touched: Mutex::new(BTreeSet::new()),
            remote: None,
            key: None,
        }
    }

    /// The chunks of the object-store repository `repo` (`PREFIX/chunks/`).
    pub fn object(repo: Arc<ObjectRepo>, grace: super::gc::Grace) -> Self {
        let base = PathBuf::from(repo.url());
        ChunkStore {
            dir: base.join("chunks"),
            quarantine: base.join("quarantine"),
            touched: Mutex::new(BTreeSet::new()),
            remote: Some(Remote {
                repo,
                grace,
                known: Mutex::new(None),
                list_failures: AtomicU64::new(0),
                list_failed: Mutex::new(None),
                writer: Mutex::new(Writer::default()),
                listed_at: Mutex::new(None),
            }),
            key: None,
        }
    }

    /// The store of an encrypted repository: chunks named by keyed hashes and sealed
    /// under `key` (see `repo::crypt`).
    pub fn with_key(mut self, key: Option<Arc<RepoKey>>) -> Self {
        self.key = key;
        self
    }

    /// Whether chunks are sealed.
    pub fn is_encrypted(&self) -> bool {
        self.key.is_some()
    }

    /// The name (index entry) of `data`: its blake3 hash, or keyed hash in an encrypted
    /// repository; [`ZERO_HASH`] for zeros.
    pub fn hash(&self, data: &[u8]) -> [u8; 32] {
        chunk_hash_keyed(data, self.key.as_deref())
    }

    /// Object stores: a backup that started at the store time `start` (ms) begins
    /// (see `repo::gc`, W1): from now on only chunks recent enough are reused unwritten.
    pub fn writer_start(&self, start: i64) {
        if let Some(r) = &self.remote {
            *r.writer.lock().unwrap_or_else(|p| p.into_inner()) = Writer {
                start: Some(start),
                ..Writer::default()
            };
        }
    }

    /// Object stores, before the running backup writes its index (W3): when it wrote
    /// old chunks again, wait until no prune that listed them before could still be
    /// deleting them, then check each is there. Returns how many were refreshed.
    pub fn writer_check_refreshed(&self) -> Result<u64> {
        let Some(r) = &self.remote else {
            return Ok(0);
        };
        let (mut refreshed, last, early) = {
            let mut w = r.writer.lock().unwrap_or_else(|p| p.into_inner());
            (
                std::mem::take(&mut w.refreshed),
                w.last_refresh.take(),
                std::mem::take(&mut w.early),
            )
        };
        let wait = r.grace.refresh_wait();
        let listed = *r.listed_at.lock().unwrap_or_else(|p| p.into_inner());
        let since = |t: Option<Instant>| {
            t.map_or(std::time::Duration::ZERO, |t| {
                wait.saturating_sub(t.elapsed())
            })
        };
        std::thread::sleep(since(last).max(if early.is_empty() {
            std::time::Duration::ZERO
        } else {
            since(listed)
        }));
        refreshed.extend(early);
        for h in &refreshed {
            if !r.repo.exists(&chunk_key(h))? {
                return Err(crate::err!(
                    Io,
                    "unable to publish the backup: chunk {} it wrote again was deleted by a concurrent prune meanwhile; nothing published, run the backup again",
                    hex(h)
                ));
            }
        }
        Ok(refreshed.len() as u64)
    }

    /// Object stores: the running backup has ended (published or not).
    pub fn writer_end(&self) {
        if let Some(r) = &self.remote {
            *r.writer.lock().unwrap_or_else(|p| p.into_inner()) = Writer::default();
        }
    }

    /// Whether the chunks live in an object store.
    pub fn is_object(&self) -> bool {
        self.remote.is_some()
    }

    /// Path of a chunk.
    pub fn path_of(&self, hash: &[u8; 32]) -> PathBuf {
        let h = hex(hash);
        self.dir.join(&h[..2]).join(h)
    }

    /// The quarantine directory.
    pub fn quarantine_dir(&self) -> &Path {
        &self.quarantine
    }

    /// Whether a damaged copy of `hash` was quarantined.
    pub fn is_quarantined(&self, hash: &[u8; 32]) -> bool {
        if self.remote.is_some() {
            return false;
        }
        self.quarantine.join(hex(hash)).exists()
    }

    /// A lookup of many chunks' presence that tells "absent" from "could not ask"
    /// ([`Lookup::contains`]), for checks whose answer decides what is published.
    pub fn lookup(&self) -> Lookup<'_> {
        Lookup {
            store: self,
            listing: true,
        }
    }

    /// Whether a chunk file exists under `hash` (healthy or not: see [`Self::read`]).
    /// A store that cannot be asked answers `false`: for checks that decide what is
    /// published, use [`Self::lookup`].
    pub fn contains(&self, hash: &[u8; 32]) -> bool {
        if let Some(r) = &self.remote {
            return *hash == ZERO_HASH
                || r.contains(hash).unwrap_or_else(|e| {
                    log::warn!("{e}; asking for chunk {} alone", hex(hash));
                    r.repo.exists(&chunk_key(hash)).unwrap_or(false)
                });
        }
        *hash == ZERO_HASH || self.path_of(hash).exists()
    }

    /// Store `data` under `hash` (the caller computed it). A chunk already present is
    /// read back and compared: equal → [`Insert::Reused`]; damaged → quarantined and
    /// written afresh ([`Insert::Healed`]).
    pub fn insert(&self, hash: &[u8; 32], data: &[u8]) -> Result<Insert> {
        let (ins, pending) = self.insert_unpublished(hash, data)?;
        if let Some(p) = pending {
            p.publish()?;
        }
        Ok(ins)
    }

    /// Like [`Self::insert`], but a chunk written now is left under its temporary name
    /// with its writeback started (`sync_file_range`): the caller publishes it
    /// ([`PendingChunk::publish`]: fsync, rename) later — by then the disk has usually
    /// written it, so the fsync costs little — and always before an index that
    /// references it (then [`Self::sync_dirs`]). Dropping it removes the file.
    pub fn insert_unpublished(
        &self,
        hash: &[u8; 32],
        data: &[u8],
    ) -> Result<(Insert, Option<PendingChunk>)> {
        if let Some(r) = &self.remote {
            let presence = r.presence(hash)?;
            if presence == Presence::Reusable {
                return Ok((Insert::Reused, None));
            }
            let bytes = encode_chunk(hash, data, self.key.as_deref())?;
            let n = bytes.len() as u64;
            // A new chunk PUT soon after the listing may have had an old copy that a
            // prune listed before our listing and deletes only now: checked like a
            // refresh (W3).
            let soon = r
                .listed_at
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|t| t.elapsed() < r.grace.refresh_wait());
            r.repo.put(&chunk_key(hash), bytes)?;
            r.add(hash);
            let mut w = r.writer.lock().unwrap_or_else(|p| p.into_inner());
            if w.start.is_some() {
                if presence == Presence::Stale {
                    w.refreshed.push(*hash);
                    w.last_refresh = Some(Instant::now());
                } else if soon {
                    w.early.push(*hash);
                }
            }
            if presence == Presence::Stale {
                return Ok((Insert::Reused, None));
            }
            return Ok((Insert::New(n), None));
        }
        let path = self.path_of(hash);
        let mut healed = false;
        match std::fs::read(&path) {
            Ok(raw) => match holds(hash, &raw, data, self.key.as_deref()) {
                Ok(()) => return Ok((Insert::Reused, None)),
                Err(e) if !is_damage(&e) => return Err(e),
                Err(e) => {
                    log::warn!("{e}; storing it afresh");
                    self.quarantine_damaged(hash, data.len())?;
                    healed = true;
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                let e = Error::io(format!("unable to read chunk {}", path.display()), e);
                if !is_damage(&e) {
                    return Err(e);
                }
                log::warn!("{e}; storing it afresh");
                self.quarantine_damaged(hash, data.len())?;
                healed = true;
            }
        }
        let sub = path.parent().unwrap_or(&self.dir);
        if !sub.exists() {
            std::fs::create_dir_all(sub)
                .ctx(|| format!("unable to create chunk directory {}", sub.display()))?;
            self.touched
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(PARENT);
        }
        // header and payload written apart: a raw chunk's data is not copied first
        let (hdr, payload) = encode_parts(hash, data, self.key.as_deref())?;
        let mut f = fsutil::AtomicFile::create(&path)?;
        let name = path.display().to_string();
        f.file()
            .write_all(&hdr)
            .and_then(|()| f.file().write_all(&payload))
            .ctx(|| format!("unable to write chunk {name}"))?;
        fsutil::start_writeback(f.file(), 0, 0);
        self.touched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(hash[0] as u16);
        let n = (HDR + payload.len()) as u64;
        let ins = if healed {
            Insert::Healed(n)
        } else {
            Insert::New(n)
        };
        Ok((ins, Some(PendingChunk { file: f })))
    }

    /// How a backup starting now makes its chunks durable ([`ChunkSync`]): per file
    /// system on a local file system ([`SYNCFS_TRUSTED`]) of a kernel whose `syncfs`
    /// reports writeback errors, per chunk anywhere else (a network or FUSE file system,
    /// an object store, an older kernel). The choice depends only on where the
    /// repository is, so every backup into it on this host makes the same.
    pub fn begin_sync(&self) -> ChunkSync {
        if self.remote.is_some() || !syncfs_reports_errors() {
            return ChunkSync::PerChunk;
        }
        let trusted = nix::sys::statfs::statfs(&self.dir)
            .map(|st| SYNCFS_TRUSTED.contains(&st.filesystem_type()))
            .unwrap_or(false);
        match trusted.then(|| File::open(&self.dir)) {
            Some(Ok(f)) => ChunkSync::FileSystem(f),
            Some(Err(e)) => {
                log::debug!(
                    "unable to open {}: {e}; chunks synced one by one",
                    self.dir.display()
                );
                ChunkSync::PerChunk
            }
            None => ChunkSync::PerChunk,
        }
    }

    /// Make every chunk a backup stored durable, before its index is published: fsync
    /// the touched chunk directories (per chunk), or `syncfs` the file system (per file
    /// system; it covers the names too). A `syncfs` that fails drops the cached pages
    /// of `stored` (the chunks the backup handed over), so that whatever reads them
    /// next reads what the disk holds (the reuse check then heals a torn one).
    pub fn sync_for_commit<'a>(
        &self,
        sync: &ChunkSync,
        stored: impl Iterator<Item = &'a [u8; 32]>,
    ) -> Result<()> {
        let ChunkSync::FileSystem(dir) = sync else {
            return self.sync_dirs();
        };
        self.touched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        fsutil::syncfs(dir).map_err(|e| {
            for h in stored.filter(|h| **h != ZERO_HASH) {
                fsutil::forget_cached(&self.path_of(h));
            }
            Error::io(
                format!(
                    "unable to make the backup's chunks durable (syncfs of {}); nothing published, run cowsnapctl verify before the next backup",
                    self.dir.display()
                ),
                e,
            )
        })
    }

    /// fsync every chunk directory a rename went into since the last call.
    pub fn sync_dirs(&self) -> Result<()> {
        if self.remote.is_some() {
            return Ok(());
        }
        let touched = std::mem::take(&mut *self.touched.lock().unwrap_or_else(|p| p.into_inner()));
        for b in touched.iter().filter(|&&b| b != PARENT) {
            let d = self.dir.join(hex(&[*b as u8]));
            fsutil::fsync_dir(&d)?;
        }
        if touched.contains(&PARENT) {
            fsutil::fsync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Read a chunk and check it: decodes, has `expect_len` bytes, hashes to `hash`.
    /// A damaged chunk is quarantined (the error says so); a quarantined one reads as
    /// `NotFound`, saying it was quarantined.
    pub fn read(&self, hash: &[u8; 32], expect_len: usize) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.read_into(hash, expect_len, &mut out)?;
        Ok(out)
    }

    /// [`Self::read`] into `out` (its content replaced, its allocation reused): for
    /// readers of many chunks, which then neither allocate nor fault in fresh memory
    /// per chunk. On error `out` holds nothing of use.
    pub fn read_into(&self, hash: &[u8; 32], expect_len: usize, out: &mut Vec<u8>) -> Result<()> {
        if self.remote.is_some() {
            return self.read_no_quarantine_into(hash, expect_len, out);
        }
        match self.read_no_quarantine_into(hash, expect_len, out) {
            Ok(()) => Ok(()),
            Err(e) if is_damage(&e) => match self.quarantine_damaged(hash, expect_len) {
                Ok(Some(q)) => {
                    Err(e.with_context(format!("chunk moved to quarantine ({})", q.display())))
                }
                Ok(None) => self.read_no_quarantine_into(hash, expect_len, out),
                Err(qe) => {
                    log::warn!("{qe}");
                    Err(e)
                }
            },
            Err(e) => Err(e),
        }
    }

    /// [`Self::read`] without quarantining anything.
    pub fn read_no_quarantine(&self, hash: &[u8; 32], expect_len: usize) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.read_no_quarantine_into(hash, expect_len, &mut out)?;
        Ok(out)
    }

    /// [`Self::read_no_quarantine`] into `out` (see [`Self::read_into`]).
    pub fn read_no_quarantine_into(
        &self,
        hash: &[u8; 32],
        expect_len: usize,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        if *hash == ZERO_HASH {
            out.clear();
            out.resize(expect_len, 0);
            return Ok(());
        }
        if let Some(r) = &self.remote {
            let raw = r.repo.get(&chunk_key(hash))?.ok_or_else(|| {
                crate::err!(
                    NotFound,
                    "chunk {} is missing from {}",
                    hex(hash),
                    r.repo.url()
                )
            })?;
            *out = decode(hash, &raw, expect_len, self.key.as_deref())?;
            return Ok(());
        }
        let path = self.path_of(hash);
        match read_decoded(hash, &path, expect_len, self.key.as_deref(), out) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.is_quarantined(hash) => {
                Err(crate::err!(
                    NotFound,
                    "chunk {} is damaged and was moved to quarantine ({}): back the disk up again, or run cowsnapctl verify --repair",
                    hex(hash),
                    self.quarantine.display()
                ))
            }
            Err(e) => Err(Error::io(
                format!("unable to read chunk {}", path.display()),
                e,
            )),
        }
    }

    /// Move the chunk file of `hash` to the quarantine if it is (still) damaged:
    /// read again under the quarantine lock, so a healthy copy is never moved.
    /// Returns where it went, or `None` when it is healthy or gone.
    pub fn quarantine_damaged(
        &self,
        hash: &[u8; 32],
        expect_len: usize,
    ) -> Result<Option<PathBuf>> {
        if *hash == ZERO_HASH || self.remote.is_some() {
            return Ok(None);
        }
        std::fs::create_dir_all(&self.quarantine)
            .ctx(|| format!("unable to create {}", self.quarantine.display()))?;
        let _lock = fsutil::lock_file(&self.quarantine.join(".lock"), true)?;
        let path = self.path_of(hash);
        match self.read_no_quarantine(hash, expect_len) {
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == crate::ErrorKind::NotFound => return Ok(None),
            Err(e) if !is_damage(&e) => return Err(e),
            Err(_) => {}
        }
        let h = hex(hash);
        let mut dest = self.quarantine.join(&h);
        // Bounded: a few numbered copies, then a random suffix.
        let mut n = 1;
        while dest.exists() {
            dest = if n <= 16 {
                self.quarantine.join(format!("{h}.{n}"))
            } else {
                self.quarantine
                    .join(format!("{h}.{}", fsutil::random_hex(4)?))
            };
            n += 1;
        }
        match std::fs::rename(&path, &dest) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Error::io(
                    format!(
                        "unable to move damaged chunk {} to {}",
                        path.display(),
                        dest.display()
                    ),
                    e,
                ))
            }
        }
        fsutil::fsync_dir(&self.quarantine)?;
        if let Some(p) = path.parent() {
            fsutil::fsync_dir(p)?;
        }
        log::warn!("damaged chunk {h} moved to {}", dest.display());
        Ok(Some(dest))
    }

    /// Hashes of the chunks in the quarantine (one readdir; usually empty).
    pub fn quarantined_hashes(&self) -> Result<std::collections::HashSet<[u8; 32]>> {
        Ok(self
            .quarantined()?
            .iter()
            .filter_map(|p| {
                let n = p.file_name()?.to_string_lossy().into_owned();
                fsutil::parse_hash(n.get(..64)?)
            })
            .collect())
    }

    /// Files in the quarantine (damaged chunks kept as evidence).
    pub fn quarantined(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        if self.remote.is_some() {
            return Ok(out);
        }
        for ent in crate::fsutil::dir_entries(&self.quarantine)? {
            if !ent.file_name().to_string_lossy().starts_with('.') {
                out.push(ent.path());
            }
        }
        out.sort();
        Ok(out)
    }

    /// How many chunk files the store holds and their bytes, from directory entries
    /// only (no chunk is opened; stray temporary files are not counted).
    pub fn usage(&self) -> Result<(u64, u64)> {
        if let Some(r) = &self.remote {
            let l = r.repo.list("chunks/")?;
            let l = l
                .iter()
                .filter(|(n, _)| n.rsplit('/').next().and_then(fsutil::parse_hash).is_some());
            return Ok(l.fold((0, 0), |(f, b), (_, len)| (f + 1, b + len)));
        }
        let (mut files, mut bytes) = (0u64, 0u64);
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
            Err(e) => {
                return Err(Error::io(
                    format!("unable to list {}", self.dir.display()),
                    e,
                ))
            }
        };
        for sub in rd {
            let sub = sub.ctx(|| format!("unable to list {}", self.dir.display()))?;
            if !sub.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            for f in std::fs::read_dir(sub.path())
                .ctx(|| format!("unable to list {}", sub.path().display()))?
            {
                let f = f.ctx(|| format!("unable to list {}", sub.path().display()))?;
                if fsutil::parse_hash(&f.file_name().to_string_lossy()).is_none() {
                    continue;
                }
                // a chunk removed by a concurrent prune is simply not counted
                if let Ok(m) = f.metadata() {
                    files += 1;
                    bytes += m.len();
                }
            }
        }
        Ok((files, bytes))
    }

    /// Every stored chunk: (hash, path, size in bytes). Stray temporary files are
    /// returned as `None` hashes.
    pub fn walk(&self) -> Result<Vec<StoredFile>> {
        if self.remote.is_some() {
            return Err(super::object::unsupported("walk the chunks of", &self.dir));
        }
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => {
                return Err(Error::io(
                    format!("unable to list {}", self.dir.display()),
                    e,
                ))
            }
        };
        for sub in rd {
            let sub = sub.ctx(|| format!("unable to list {}", self.dir.display()))?;
            if !sub.path().is_dir() {
                continue;
            }
            for f in std::fs::read_dir(sub.path())
                .ctx(|| format!("unable to list {}", sub.path().display()))?
            {
                let f = f.ctx(|| format!("unable to list {}", sub.path().display()))?;
                let name = f.file_name().to_string_lossy().into_owned();
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                out.push((fsutil::parse_hash(&name), f.path(), len));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn workers_that_waited_for_a_failed_listing_do_not_list_again() {
        // Every listing fails after a second; eight workers ask at once.
        let mut f = super::super::object::tests::Flaky::new(
            usize::MAX,
            super::super::object::tests::denied,
        );
        f.list_delay = std::time::Duration::from_secs(1);
        let (repo, store) =
            super::super::object::tests::flaky_repo(f, std::time::Duration::from_secs(10));
        let s = ChunkStore::object(Arc::new(repo), super::super::gc::Grace::from_secs(3600));
        let data = vec![7u8; 4096];
        let h = s.hash(&data);
        let t = Instant::now();
        std::thread::scope(|sc| {
            let ws: Vec<_> = (0..8).map(|_| sc.spawn(|| s.insert(&h, &data))).collect();
            for w in ws {
                let e = w.join().unwrap().unwrap_err();
                assert!(e.to_string().contains("AccessDenied"), "{e}");
            }
        });
        // One listing for all (as long as one), not one each in turn.
        assert_eq!(store.reads.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(
            t.elapsed() < std::time::Duration::from_secs(4),
            "{:?}",
            t.elapsed()
        );
        // A caller after the failure lists again.
        assert!(s.insert(&h, &data).is_err());
        assert_eq!(store.reads.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn a_lookup_tells_a_store_it_cannot_ask_from_an_absent_chunk() {
        use super::super::object::{tests as ot, ObjectRepo};
        use object_store::ObjectStore;
        // faults in place of answers (HEADs fail too)
        let mut f = ot::Flaky::new(0, ot::denied);
        f.body = false;
        let (repo, store) = ot::flaky_repo(f, std::time::Duration::from_secs(5));
        let s = ChunkStore::object(Arc::new(repo), super::super::gc::Grace::from_secs(3600));
        let data = vec![7u8; 4096];
        let h = s.hash(&data);
        s.insert(&h, &data).unwrap();
        let absent = s.hash(&[8u8; 4096]);
        // a fresh store on the same bucket (no listing cached yet)
        let fresh = || {
            let r = ObjectRepo::with_store(
                "s3://mem/p",
                "p",
                Box::new(Arc::clone(&store) as Arc<dyn ObjectStore>),
            )
            .unwrap();
            ChunkStore::object(Arc::new(r), super::super::gc::Grace::from_secs(3600))
        };
        let reads = |n| {
            let r = store.reads.load(Ordering::SeqCst);
            assert_eq!(r, n, "reads of the store");
        };
        let base = store.reads.load(Ordering::SeqCst);
        // healthy: one listing answers both
        let s2 = fresh();
        let mut l = s2.lookup();
        assert!(l.contains(&h).unwrap());
        assert!(!l.contains(&absent).unwrap());
        reads(base + 1);
        // only the listing fails: each chunk is asked for alone, the listing not again
        store.left.store(1, Ordering::SeqCst);
        let s3 = fresh();
        let mut l = s3.lookup();
        assert!(l.contains(&h).unwrap());
        assert!(!l.contains(&absent).unwrap());
        reads(base + 4);
        // the store cannot be asked at all: an error, not "absent" (contains says false)
        store.left.store(usize::MAX, Ordering::SeqCst);
        let s4 = fresh();
        let e = s4.lookup().contains(&h).unwrap_err();
        assert!(e.to_string().contains("AccessDenied"), "{e}");
        assert!(!s4.contains(&h));
        // a directory store: present, absent, zeros, and a lookup the file system
        // cannot answer (a chunk directory that is a file: ENOTDIR)
        let d = tempfile::tempdir().unwrap();
        let local = ChunkStore::new(&d.path().join("chunks"), &d.path().join("quarantine"));
        local.insert(&h, &data).unwrap();
        let mut l = local.lookup();
        assert!(l.contains(&h).unwrap());
        assert!(!l.contains(&absent).unwrap());
        assert!(l.contains(&ZERO_HASH).unwrap());
        let sub = local.path_of(&absent).parent().unwrap().to_path_buf();
        assert_ne!(sub, local.path_of(&h).parent().unwrap());
        std::fs::write(&sub, b"not a directory").unwrap();
        let e = local.lookup().contains(&absent).unwrap_err();
        assert!(e.to_string().contains("unable to look up chunk"), "{e}");
    }

    #[test]
    fn store_and_read_back_both_encodings() {
        let d = tempfile::tempdir().unwrap();
        let s = ChunkStore::new(&d.path().join("chunks"), &d.path().join("quarantine"));
        let text = vec![b'a'; 100_000];
        let h = chunk_hash(&text);
        assert!(matches!(s.insert(&h, &text).unwrap(), Insert::New(n) if n < 1000));
        assert_eq!(s.insert(&h, &text).unwrap(), Insert::Reused);
        let mut rnd = vec![0u8; 65536];
        let mut x: u64 = 88172645463325252;
        for b in rnd.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let h2 = chunk_hash(&rnd);
        assert_eq!(s.insert(&h2, &rnd).unwrap(), Insert::New(65536 + 16));
        s.sync_dirs().unwrap();
        assert_eq!(s.read(&h, text.len()).unwrap(), text);
        assert_eq!(s.read(&h2, rnd.len()).unwrap(), rnd);
        // a wrong length is the caller's error: the healthy chunk stays
        assert_eq!(
            s.read(&h2, 100).unwrap_err().kind(),
            crate::ErrorKind::InvalidInput
        );
        assert_eq!(chunk_hash(&[0u8; 4096]), ZERO_HASH);
        assert_eq!(s.walk().unwrap().len(), 2);
        // corrupt the raw one
        let p = s.path_of(&h2);
        let mut b = std::fs::read(&p).unwrap();
        b[1000] ^= 1;
        std::fs::write(&p, b).unwrap();
        let e = s.read(&h2, rnd.len()).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Corrupt);
    }

    #[test]
    fn syncfs_is_trusted_from_linux_5_8() {
        for (rel, want) in [
            ("5.7.19", false),
            ("5.8.0", true),
            ("4.19.0-26-amd64", false),
            ("6.18.44-fc-v1272\n", true),
            ("10.0", true),
            ("garbage", false),
        ] {
            assert_eq!(release_at_least_5_8(rel), want, "{rel}");
        }
    }

    /// Per file system: a chunk is named without replacing one already there (whose
    /// temporary file is removed), and the commit's syncfs succeeds; per chunk: fsync
    /// and rename. A chunk named unsynced and then torn (what a crash before the
    /// syncfs can leave) is healed by the next store of the same data.
    #[test]
    fn chunks_named_per_file_system_never_replace_and_torn_ones_heal() {
        let d = tempfile::tempdir().unwrap();
        let s = ChunkStore::new(&d.path().join("chunks"), &d.path().join("quarantine"));
        std::fs::create_dir_all(d.path().join("chunks")).unwrap();
        let sync = s.begin_sync();
        // ext4, XFS or tmpfs where the tests run; skip the check elsewhere
        if !sync.per_file_system() {
            eprintln!("the test directory's file system is synced per chunk; skipped");
            return;
        }
        let data = random(65536, 11);
        let h = chunk_hash(&data);
        let (ins, p1) = s.insert_unpublished(&h, &data).unwrap();
        assert!(matches!(ins, Insert::New(_)));
        let (_, p2) = s.insert_unpublished(&h, &data).unwrap();
        p1.unwrap().publish_for(&sync).unwrap();
        let first = std::fs::metadata(s.path_of(&h)).unwrap().ino();
        p2.unwrap().publish_for(&sync).unwrap();
        assert_eq!(
            std::fs::metadata(s.path_of(&h)).unwrap().ino(),
            first,
            "a named chunk was replaced"
        );
        let stray = s.walk().unwrap().iter().filter(|f| f.0.is_none()).count();
        assert_eq!(stray, 0, "a temporary file was left");
        s.sync_for_commit(&sync, [h].iter()).unwrap();
        assert_eq!(s.read(&h, data.len()).unwrap(), data);
        // torn after its name: the next store of the same data heals it
        std::fs::write(s.path_of(&h), b"").unwrap();
        assert!(matches!(s.insert(&h, &data).unwrap(), Insert::Healed(_)));
        assert_eq!(s.read(&h, data.len()).unwrap(), data);
        // per chunk: fsync + rename, and the directories at commit
        let data2 = random(65536, 12);
        let h2 = chunk_hash(&data2);
        let (_, p) = s.insert_unpublished(&h2, &data2).unwrap();
        p.unwrap().publish_for(&ChunkSync::PerChunk).unwrap();
        s.sync_for_commit(&ChunkSync::PerChunk, [h2].iter())
            .unwrap();
        assert_eq!(s.read(&h2, data2.len()).unwrap(), data2);
    }

    #[test]
    fn incompressible_chunks_are_stored_raw_without_compressing_them_whole() {
        let rnd = random(1 << 20, 7);
        assert!(!worth_compressing(&rnd));
        // random with a text region under one probe slice: compressed
        let mut mixed = rnd.clone();
        for (i, b) in mixed[(3 << 17)..(3 << 17) + 8192].iter_mut().enumerate() {
            *b = b"the quick brown fox "[i % 20];
        }
        assert!(worth_compressing(&mixed));
        assert!(worth_compressing(&vec![7u8; 1 << 20]));
        assert!(
            worth_compressing(&rnd[..65536]),
            "small chunks are always tried"
        );
        let d = tempfile::tempdir().unwrap();
        let s = ChunkStore::new(&d.path().join("chunks"), &d.path().join("quarantine"));
        let h = chunk_hash(&rnd);
        assert_eq!(s.insert(&h, &rnd).unwrap(), Insert::New((1 << 20) + 16));
        assert_eq!(std::fs::read(s.path_of(&h)).unwrap()[5], 0, "encoding raw");
        assert_eq!(s.read(&h, rnd.len()).unwrap(), rnd);
        let h2 = chunk_hash(&mixed);
        assert!(matches!(s.insert(&h2, &mixed).unwrap(), Insert::New(n) if n < (1 << 20)));
        assert_eq!(s.read(&h2, mixed.len()).unwrap(), mixed);
    }

    /// The read path reads the header and the payload separately: a raw chunk reads
    /// back bit-exact, and a file cut short (inside the payload or the header) or one
    /// with bytes appended is damage, never data.
    #[test]
    fn raw_chunks_read_back_exactly_and_short_files_are_damage() {
        let d = tempfile::tempdir().unwrap();
        let s = ChunkStore::new(&d.path().join("chunks"), &d.path().join("quarantine"));
        let rnd = random(1 << 20, 3);
        let h = chunk_hash(&rnd);
        s.insert(&h, &rnd).unwrap();
        assert_eq!(std::fs::read(s.path_of(&h)).unwrap()[5], 0, "encoding raw");
        assert_eq!(s.read_no_quarantine(&h, rnd.len()).unwrap(), rnd);
        let p = s.path_of(&h);
        let whole = std::fs::read(&p).unwrap();
        for cut in [whole.len() - 1, HDR + 10, HDR, 7, 0] {
            std::fs::write(&p, &whole[..cut]).unwrap();
            let e = s.read_no_quarantine(&h, rnd.len()).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Corrupt, "cut at {cut}: {e}");
        }
        let mut longer = whole.clone();
        longer.push(0);
        std::fs::write(&p, &longer).unwrap();
        let e = s.read_no_quarantine(&h, rnd.len()).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Corrupt);
        std::fs::write(&p, &whole).unwrap();
        assert_eq!(s.read(&h, rnd.len()).unwrap(), rnd);
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

    fn flip(p: &Path, at: usize) {
        let mut b = std::fs::read(p).unwrap();
        b[at] ^= 0x55;
        std::fs::write(p, b).unwrap();
    }

    #[test]
    fn a_damaged_chunk_read_goes_to_quarantine_and_is_stored_afresh() {
        let d = tempfile::tempdir().unwrap();
        let s = ChunkStore::new(&d.path().join("chunks"), &d.path().join("quarantine"));
        let data = random(65536, 7);
        let h = chunk_hash(&data);
        s.insert(&h, &data).unwrap();
        let p = s.path_of(&h);
        flip(&p, 5000);
        let e = s.read(&h, data.len()).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Corrupt);
        assert!(e.to_string().contains("quarantine"), "{e}");
        assert!(!p.exists());
        assert!(s.is_quarantined(&h));
        assert_eq!(s.quarantined().unwrap().len(), 1);
        // evidence kept byte for byte
        let q = std::fs::read(d.path().join("quarantine").join(hex(&h))).unwrap();
        assert_ne!(
            s.read_no_quarantine(&h, data.len()).unwrap_err().kind(),
            crate::ErrorKind::Corrupt
        );
        assert_eq!(q.len(), 65536 + 16);
        let e = s.read(&h, data.len()).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::NotFound);
        assert!(e.to_string().contains("quarantine"), "{e}");
        assert!(!s.contains(&h));
        // the next backup with this data stores it again: the name heals
        assert!(matches!(s.insert(&h, &data).unwrap(), Insert::New(_)));
        assert_eq!(s.read(&h, data.len()).unwrap(), data);
        // damaged again, found by a backup about to reuse it: healed in place,
        // the second copy kept under another quarantine name
        flip(&p, 100);
        assert!(matches!(s.insert(&h, &data).unwrap(), Insert::Healed(_)));
        assert_eq!(s.read(&h, data.len()).unwrap(), data);
        assert_eq!(s.quarantined().unwrap().len(), 2);
        assert_eq!(s.insert(&h, &data).unwrap(), Insert::Reused);
    }

    #[test]
    fn quarantine_never_moves_a_healthy_chunk() {
        let d = tempfile::tempdir().unwrap();
        let s = ChunkStore::new(&d.path().join("chunks"), &d.path().join("quarantine"));
        let data = vec![b'x'; 70000];
        let h = chunk_hash(&data);
        s.insert(&h, &data).unwrap();
        assert_eq!(s.quarantine_damaged(&h, data.len()).unwrap(), None);
        assert!(s.path_of(&h).exists());
        assert_eq!(s.quarantine_damaged(&[9u8; 32], 10).unwrap(), None);
        // a compressed chunk with a damaged header is caught by the reuse check too
        let p = s.path_of(&h);
        flip(&p, 9);
        assert!(matches!(s.insert(&h, &data).unwrap(), Insert::Healed(_)));
        assert_eq!(s.read(&h, data.len()).unwrap(), data);
    }

    /// Found by fuzzing: a chunk header claiming a 4 GiB length made the reader
    /// allocate it before decompressing. It is damage, caught from the header alone.
    #[test]
    fn an_implausible_length_is_damage_without_allocating_it() {
        let d = tempfile::tempdir().unwrap();
        let s = ChunkStore::new(&d.path().join("chunks"), &d.path().join("quarantine"));
        let data = vec![b'y'; 50_000];
        let h = chunk_hash(&data);
        s.insert(&h, &data).unwrap();
        let p = s.path_of(&h);
        let mut raw = std::fs::read(&p).unwrap();
        assert_eq!(raw[5], 1, "compressed");
        raw[8..12].copy_from_slice(&0xffff_ff00u32.to_le_bytes());
        std::fs::write(&p, &raw).unwrap();
        let e = s.read(&h, data.len()).unwrap_err();
        assert!(is_damage(&e), "{e}");
        assert!(e.to_string().contains("implausible length"), "{e}");
        assert!(s.is_quarantined(&h));
    }
}
