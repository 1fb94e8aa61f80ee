//! A repository generation served read-only, chunks fetched on demand
//! ([`GenerationExport`]).
//!
//! Design notes
//! - Size and geometry come from the generation's index; the index (its data runs, 32
//!   bytes per data chunk) is held in memory, nothing else is read up front.
//! - A read is split at repository chunk edges. Zero chunks are answered with zeros,
//!   without I/O. Every other chunk comes from the cache or is read from the chunk store,
//!   which checks it against its blake3 hash; a damaged chunk is quarantined by the
//!   store (as a restore does) and the read fails with EIO. Wrong data is never served.
//! - The cache holds decompressed chunks, least recently used first out, bounded in
//!   bytes (`cache_bytes`; a chunk larger than the bound is not cached). The cache
//!   mutex is held for lookups and inserts only, never across a chunk read. A chunk
//!   being read is in the in-flight set (at most one entry per reading thread): a
//!   second reader of it waits for the first and then finds it in the cache, so
//!   concurrent readers (the kernel's readahead splits one file read into several
//!   requests) read each chunk once. Lock order: in-flight set → cache.
//! - Writes, trims and zeroing are refused (`ReadOnly`, EPERM on the wire); flush
//!   succeeds (nothing to make durable). Block status is from the index: zero chunks are
//!   HOLE|ZERO, every other chunk data.
//! - Pinning: [`GenerationExport::open`] takes the shared repository lock, resolves the
//!   generation, loads its index and writes an export pin (`repo::pin`, kind `export`)
//!   with a shared `flock` held on it; then the repository lock is released. The lock is
//!   not held for the export's life because prune takes it exclusively and would wait
//!   for as long as anything is exported; the pin keeps the generation (and so every
//!   chunk it references) through any prune instead, and the `flock` lets prune tell a
//!   dead exporter's pin from a live one. [`GenerationExport::close`] removes the pin.
//!   `verify --repair` and backups only add or heal chunks, which is safe alongside.
//! - Counters ([`ExportStats`]) say how many chunks and bytes were read from the
//!   repository, so "copying one file reads only its chunks" can be measured.

use crate::blockio::BlockIo;
use crate::error::Result;
use crate::export::{Export, ExportCaps, Extent, ZeroFlags};
use crate::fsutil::hex;
use crate::repo::pin::{self, Pin, PinKind};
use crate::repo::{FixedIndex, GenerationInfo, Repo};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// The default bound of the chunk cache: 64 MiB.
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;

/// Counters of an export.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportStats {
    /// Chunks read from the chunk store (cache misses on data chunks).
    pub chunks_fetched: u64,
    /// Their uncompressed bytes.
    pub bytes_fetched: u64,
    /// Data-chunk lookups answered by the cache.
    pub cache_hits: u64,
    /// Bytes of decompressed chunks in the cache now.
    pub cache_bytes: u64,
    /// The cache's bound in bytes.
    pub cache_limit: u64,
    /// Chunks found damaged (quarantined; the read failed).
    pub damaged: u64,
}

/// A bounded LRU of decompressed chunks, by chunk index.
struct Cache {
    limit: u64,
    used: u64,
    tick: u64,
    map: HashMap<u64, (Arc<Vec<u8>>, u64)>,
    order: BTreeMap<u64, u64>,
}

impl Cache {
    fn new(limit: u64) -> Self {
        Cache {
            limit,
            used: 0,
            tick: 0,
            map: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    fn get(&mut self, i: u64) -> Option<Arc<Vec<u8>>> {
        self.tick += 1;
        let t = self.tick;
        let (data, last) = self.map.get_mut(&i)?;
        self.order.remove(last);
        *last = t;
        self.order.insert(t, i);
        Some(data.clone())
    }

    fn insert(&mut self, i: u64, data: Arc<Vec<u8>>) {
        let len = data.len() as u64;
        if len > self.limit || self.map.contains_key(&i) {
            return;
        }
        while self.used + len > self.limit {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            if let Some((d, _)) = self.map.remove(&old) {
                self.used -= d.len() as u64;
            }
        }
        self.tick += 1;
        self.order.insert(self.tick, i);
        self.map.insert(i, (data, self.tick));
        self.used += len;
    }
}

/// A generation served read-only. See the module notes.
pub struct GenerationExport {
    repo: Repo,
    generation: GenerationInfo,
    index: FixedIndex,
    cache: Mutex<Cache>,
    /// Chunks being read from the store now; waiters sleep on `inflight_done`.
    inflight: Mutex<HashSet<u64>>,
    inflight_done: Condvar,
    chunks_fetched: AtomicU64,
    bytes_fetched: AtomicU64,
    cache_hits: AtomicU64,
    damaged: AtomicU64,
    /// The pin file and its `flock` (none when opened unpinned, in tests).
    pin: Mutex<Option<(PathBuf, std::fs::File)>>,
}

impl GenerationExport {
    /// Open generation `gen` (an id, a unique prefix or a disk name; `None` = the newest
    /// when the repository holds one disk) of the repository at `repo_dir` and pin it
    /// for `name` (the export's name). The chunk cache holds at most `cache_bytes`.
    pub fn open(
        repo_dir: &Path,
        gen: Option<&str>,
        name: &str,
        cache_bytes: u64,
    ) -> Result<GenerationExport> {
        if crate::repo::object::is_s3(repo_dir) {
            return Err(crate::repo::object::unsupported("export from", repo_dir));
        }
        let repo = Repo::open(repo_dir)?;
        let lock = repo.lock(false)?;
        let g = repo.resolve(gen)?;
        let index = repo.load_index(&g)?;
        let path = pin::create(
            &repo,
            &Pin {
                generation: g.id.clone(),
                disk: name.to_string(),
                destination: String::new(),
                state: String::new(),
                host: pin::host_name(),
                created: crate::fsutil::format_utc(crate::fsutil::now_unix_ms()),
                kind: PinKind::Export,
                pid: Some(std::process::id()),
            },
        )?;
        let held = match pin::hold(&path) {
            Ok(f) => f,
            Err(e) => {
                let _ = pin::remove(&path);
                return Err(e);
            }
        };
        // The pin (and its lock) keeps the generation from here on.
        drop(lock);
        let mut ex = Self::from_parts(repo, g, index, cache_bytes);
        ex.pin = Mutex::new(Some((path, held)));
        Ok(ex)
    }

    /// Serve `g` with its index `index`, unpinned (the caller keeps it safe).
    pub fn from_parts(
        repo: Repo,
        g: GenerationInfo,
        index: FixedIndex,
        cache_bytes: u64,
    ) -> GenerationExport {
        GenerationExport {
            repo,
            generation: g,
            index,
            cache: Mutex::new(Cache::new(cache_bytes)),
            inflight: Mutex::new(HashSet::new()),
            inflight_done: Condvar::new(),
            chunks_fetched: AtomicU64::new(0),
            bytes_fetched: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            damaged: AtomicU64::new(0),
            pin: Mutex::new(None),
        }
    }

    /// The generation served.
    pub fn generation(&self) -> &GenerationInfo {
        &self.generation
    }

    /// The repository directory.
    pub fn repo_dir(&self) -> &Path {
        self.repo.dir()
    }

    /// The pin file, while pinned.
    pub fn pin_path(&self) -> Option<PathBuf> {
        let g = self.pin.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref().map(|(p, _)| p.clone())
    }

    /// Remove the pin (a clean stop). Reads still work, but the generation may go.
    pub fn close(&self) -> Result<()> {
        let taken = self.pin.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((path, held)) = taken {
            pin::remove(&path)?;
            drop(held);
        }
        Ok(())
    }

    /// The counters.
    pub fn stats(&self) -> ExportStats {
        let c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        ExportStats {
            chunks_fetched: self.chunks_fetched.load(Ordering::Relaxed),
            bytes_fetched: self.bytes_fetched.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            cache_bytes: c.used,
            cache_limit: c.limit,
            damaged: self.damaged.load(Ordering::Relaxed),
        }
    }

    /// Chunk `i`'s data (a data chunk: not the zero hash): from the cache, else read
    /// once however many readers want it at the same time.
    fn chunk(&self, i: u64) -> Result<Arc<Vec<u8>>> {
        {
            let mut fl = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(d) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(i) {
                    self.cache_hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(d);
                }
                if fl.insert(i) {
                    break;
                }
                fl = self
                    .inflight_done
                    .wait(fl)
                    .unwrap_or_else(|p| p.into_inner());
            }
        }
        let r = self.fetch(i);
        if let Ok(d) = &r {
            self.cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(i, d.clone());
        }
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&i);
        self.inflight_done.notify_all();
        r
    }

    /// Read chunk `i` from the store (verified).
    fn fetch(&self, i: u64) -> Result<Arc<Vec<u8>>> {
        let h = self.index.hash(i);
        let len = self.index.chunk_len(i);
        let data = self.repo.store().read(h, len).map_err(|e| {
            if crate::repo::chunk_store::is_damage(&e) {
                self.damaged.fetch_add(1, Ordering::Relaxed);
            }
            // Whatever the store said (damaged, quarantined, unreadable): an I/O error
            // for this read, never other data.
            crate::err!(
                Io,
                "unable to read generation {} at offset {} (chunk {}): {e}",
                self.generation.id,
                i * u64::from(self.index.chunk_size),
                hex(h)
            )
        })?;
        log::debug!("generation {}: fetched chunk {i}", self.generation.id);
        self.chunks_fetched.fetch_add(1, Ordering::Relaxed);
        self.bytes_fetched.fetch_add(len as u64, Ordering::Relaxed);
        Ok(Arc::new(data))
    }

    fn check_range(&self, off: u64, len: u64, what: &str) -> Result<()> {
        crate::blockio::check_range(self.index.disk_size, off, len, what)
    }

    /// Fill `buf` from `off`, chunk by chunk.
    fn read_range(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(off, buf.len() as u64, "read")?;
        let cs = u64::from(self.index.chunk_size);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let i = pos / cs;
            let within = (pos - i * cs) as usize;
            let n = (self.index.chunk_len(i) - within).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            if self.index.is_zero(i) {
                out.fill(0);
            } else {
                let data = self.chunk(i)?;
                out.copy_from_slice(&data[within..within + n]);
            }
            done += n;
        }
        Ok(())
    }

    /// Data (non-zero) ranges within `off..off+len`, ascending and merged.
    fn data_runs(&self, off: u64, len: u64) -> Vec<(u64, u64)> {
        let cs = u64::from(self.index.chunk_size);
        let end = off.saturating_add(len).min(self.index.disk_size);
        let mut out: Vec<(u64, u64)> = Vec::new();
        if off >= end {
            return out;
        }
        // the index's data runs in the range: O(runs), not O(chunks)
        for run in self.index.data_runs_in(off / cs, end.div_ceil(cs)) {
            let a = (run.start * cs).max(off);
            let b = run
                .end
                .saturating_mul(cs)
                .min(self.index.disk_size)
                .min(end);
            match out.last_mut() {
                Some(last) if last.1 == a => last.1 = b,
                _ => out.push((a, b)),
            }
        }
        out
    }

    fn refuse(&self, what: &str) -> crate::Error {
        crate::err!(
            ReadOnly,
            "{what} refused: generation {} is exported read-only",
            self.generation.id
        )
    }
}

impl Drop for GenerationExport {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            log::warn!("{e}");
        }
    }
}

impl Export for GenerationExport {
    fn size(&self) -> u64 {
        self.index.disk_size
    }

    fn caps(&self) -> ExportCaps {
        ExportCaps::READ_ONLY_IMAGE
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.read_range(off, buf)
    }

    fn write(&self, _off: u64, _data: &[u8], _fua: bool) -> Result<()> {
        Err(self.refuse("write"))
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn trim(&self, _off: u64, _len: u64, _fua: bool) -> Result<()> {
        Err(self.refuse("trim"))
    }

    fn zero(&self, _off: u64, _len: u64, _flags: ZeroFlags) -> Result<()> {
        Err(self.refuse("write-zeroes"))
    }

    fn block_status(&self, off: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(off, len, "block status")?;
        let end = off + len;
        let mut out = Vec::new();
        let mut pos = off;
        let hole = |n: u64| Extent {
            len: n,
            hole: true,
            zero: true,
        };
        for (a, b) in self.data_runs(off, len) {
            if a > pos {
                out.push(hole(a - pos));
            }
            out.push(Extent {
                len: b - a,
                hole: false,
                zero: false,
            });
            pos = b;
        }
        if pos < end {
            out.push(hole(end - pos));
        }
        Ok(out)
    }
}

/// The same generation as the origin of a read-only [`crate::engine::Engine`] (how the
/// daemon serves it: status, counters and the NBD server as for any disk). Data-changing
/// calls fail; `data_ranges` comes from the index, so block status does too.
impl BlockIo for GenerationExport {
    fn size(&self) -> u64 {
        self.index.disk_size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.read_range(off, buf)
    }

    fn write_at(&self, _buf: &[u8], _off: u64) -> Result<()> {
        Err(self.refuse("write"))
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn discard(&self, _off: u64, _len: u64) -> Result<()> {
        Err(self.refuse("discard"))
    }

    fn write_zeroes(&self, _off: u64, _len: u64, _may_unmap: bool) -> Result<()> {
        Err(self.refuse("write-zeroes"))
    }

    fn fast_zero(&self) -> bool {
        false
    }

    fn is_block_device(&self) -> bool {
        false
    }

    fn engine_name(&self) -> &'static str {
        "repo"
    }

    fn data_ranges(&self, off: u64, len: u64) -> Result<Option<Vec<(u64, u64)>>> {
        Ok(Some(self.data_runs(off, len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::testutil::make_gen;

    const CS: usize = 4096;

    /// A disk of 5 chunks and a short tail: data, zero, data, data, zero, data (short).
    fn image() -> Vec<u8> {
        let mut img = vec![0u8; 5 * CS + 1000];
        for (i, b) in img.iter_mut().enumerate() {
            let chunk = i / CS;
            if chunk != 1 && chunk != 4 {
                *b = (i % 251) as u8 ^ (chunk as u8).wrapping_mul(37) | 1;
            }
        }
        img
    }

    fn setup(cache: u64) -> (tempfile::TempDir, GenerationExport, Vec<u8>) {
        let d = tempfile::tempdir().unwrap();
        let repo = Repo::open_or_create(d.path(), CS as u32).unwrap();
        let img = image();
        make_gen(&repo, "20261206T120000.000Z-0123abcd", &img);
        let ex = GenerationExport::open(d.path(), None, "t", cache).unwrap();
        (d, ex, img)
    }

    #[test]
    fn reads_across_chunk_edges_match_the_image() {
        let (_d, ex, img) = setup(DEFAULT_CACHE_BYTES);
        assert_eq!(Export::size(&ex), img.len() as u64);
        for (off, len) in [
            (0usize, img.len()),
            (CS - 1, 2),
            (CS - 100, 2 * CS + 200),
            (3 * CS + 5, 2 * CS),
            (img.len() - 1, 1),
            (5 * CS, 1000),
            (CS, CS),
        ] {
            let mut buf = vec![0xeeu8; len];
            Export::read(&ex, off as u64, &mut buf).unwrap();
            assert_eq!(buf, img[off..off + len], "read {off}+{len}");
        }
        assert!(Export::read(&ex, img.len() as u64 - 1, &mut [0u8; 2]).is_err());
    }

    #[test]
    fn zero_chunks_are_read_without_io() {
        let (_d, ex, _img) = setup(DEFAULT_CACHE_BYTES);
        let mut buf = vec![1u8; CS];
        Export::read(&ex, CS as u64, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        Export::read(&ex, 4 * CS as u64, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(ex.stats().chunks_fetched, 0);
        // A second read of a data chunk comes from the cache.
        Export::read(&ex, 0, &mut buf).unwrap();
        Export::read(&ex, 10, &mut buf[..100]).unwrap();
        let s = ex.stats();
        assert_eq!(
            (s.chunks_fetched, s.bytes_fetched, s.cache_hits),
            (1, CS as u64, 1)
        );
    }

    #[test]
    fn a_damaged_chunk_is_an_error_and_quarantined_never_wrong_data() {
        let (d, ex, img) = setup(DEFAULT_CACHE_BYTES);
        let repo = Repo::open(d.path()).unwrap();
        let h = crate::repo::chunk_store::chunk_hash(&img[2 * CS..3 * CS]);
        let p = repo.store().path_of(&h);
        let mut raw = std::fs::read(&p).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 0x55;
        std::fs::write(&p, raw).unwrap();
        let mut buf = vec![0u8; 3 * CS];
        let e = Export::read(&ex, 0, &mut buf).unwrap_err();
        assert_eq!(e.errno(), libc::EIO, "{e}");
        assert!(repo.store().is_quarantined(&h), "{e}");
        assert_eq!(ex.stats().damaged, 1);
        // Again: still an error (quarantined), not zeros or stale data.
        let e = Export::read(&ex, 2 * CS as u64, &mut buf[..CS]).unwrap_err();
        assert_eq!(e.errno(), libc::EIO, "{e}");
        // The chunks beside it still read.
        Export::read(&ex, 3 * CS as u64, &mut buf[..CS]).unwrap();
        assert_eq!(buf[..CS], img[3 * CS..4 * CS]);
    }

    #[test]
    fn the_cache_stays_within_its_bound() {
        let (_d, ex, img) = setup(2 * CS as u64);
        let mut buf = vec![0u8; img.len()];
        for _ in 0..3 {
            Export::read(&ex, 0, &mut buf).unwrap();
            assert_eq!(buf, img);
            let s = ex.stats();
            assert!(s.cache_bytes <= 2 * CS as u64, "{s:?}");
        }
        // Four data chunks through a two-chunk cache, sequentially: every pass misses.
        assert_eq!(ex.stats().chunks_fetched, 12);
        // The most recent chunk is a hit.
        Export::read(&ex, 5 * CS as u64, &mut buf[..10]).unwrap();
        assert_eq!(ex.stats().cache_hits, 1);
        // A cache smaller than a chunk caches nothing.
        let (_d2, small, _) = setup(100);
        Export::read(&small, 0, &mut buf[..10]).unwrap();
        Export::read(&small, 0, &mut buf[..10]).unwrap();
        let s = small.stats();
        assert_eq!((s.chunks_fetched, s.cache_bytes), (2, 0));
    }

    #[test]
    fn concurrent_readers_of_one_chunk_read_it_once() {
        let (_d, ex, img) = setup(DEFAULT_CACHE_BYTES);
        let barrier = std::sync::Barrier::new(8);
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let (ex, img, barrier) = (&ex, &img, &barrier);
                s.spawn(move || {
                    let mut buf = vec![0u8; 512];
                    barrier.wait();
                    let off = 2 * CS as u64 + t * 512;
                    Export::read(ex, off, &mut buf).unwrap();
                    assert_eq!(buf, img[off as usize..off as usize + 512]);
                });
            }
        });
        let s = ex.stats();
        assert_eq!((s.chunks_fetched, s.cache_hits), (1, 7), "{s:?}");
    }

    #[test]
    fn block_status_follows_the_index() {
        let (_d, ex, img) = setup(DEFAULT_CACHE_BYTES);
        let data = |len| Extent {
            len,
            hole: false,
            zero: false,
        };
        let hole = |len| Extent {
            len,
            hole: true,
            zero: true,
        };
        let cs = CS as u64;
        assert_eq!(
            ex.block_status(0, img.len() as u64).unwrap(),
            vec![data(cs), hole(cs), data(2 * cs), hole(cs), data(1000)]
        );
        assert_eq!(
            ex.block_status(cs - 10, 20).unwrap(),
            vec![data(10), hole(10)]
        );
        assert_eq!(ex.block_status(cs + 1, 10).unwrap(), vec![hole(10)]);
        assert!(ex.block_status(0, img.len() as u64 + 1).is_err());
        assert_eq!(ex.stats().chunks_fetched, 0);
    }

    #[test]
    fn data_changing_calls_are_refused_and_the_pin_lives_until_close() {
        let (d, ex, _img) = setup(DEFAULT_CACHE_BYTES);
        assert!(ex.caps().read_only);
        assert_eq!(
            Export::write(&ex, 0, &[1], false).unwrap_err().errno(),
            libc::EPERM
        );
        assert!(Export::trim(&ex, 0, 1, false).is_err());
        assert!(Export::zero(&ex, 0, 1, ZeroFlags::default()).is_err());
        assert!(BlockIo::write_at(&ex, &[1], 0).is_err());
        Export::flush(&ex).unwrap();
        let repo = Repo::open(d.path()).unwrap();
        let pins = pin::list(&repo).unwrap();
        assert_eq!(pins.len(), 1);
        assert_eq!(pin::stale_reason(&pins[0]), None, "held by us");
        let p = ex.pin_path().unwrap();
        ex.close().unwrap();
        assert!(!p.exists());
        assert!(pin::list(&repo).unwrap().is_empty());
    }
}
