//! Restore on the fly: [`FillingIo`] serves a destination that is still being filled
//! from a repository generation.
//!
//! # Design notes
//!
//! State: one bit per repository chunk, "restored": the destination holds the chunk's
//! generation content or newer writes. The bits live in memory (atomics) and in a state
//! file (4096-byte header + bitmap). A bit is set in memory only after it is durable in
//! the state file, and it is written to the state file only after the chunk's data is
//! durable on the destination (dest flush → bitmap pwrite → fdatasync).
//!
//! Rules:
//! - read: every unrestored chunk in range is fetched first (read the repository chunk,
//!   check its hash, write it, flush, persist the bit), then the destination is read.
//! - write / write-zeroes / discard: unrestored chunks the request covers entirely are
//!   not fetched: the request is done, flushed, and their bits persisted; chunks it only
//!   partly covers are fetched first.
//! - Per-chunk fill marks ([`BusyMarks`], RAII guards) serialize a fetch with any
//!   write to the same unrestored chunk; `BusyMarks::acquire` always takes marks in
//!   ascending chunk order, so user requests and the fill cannot deadlock. A chunk's bit never goes
//!   from set to unset, so I/O to restored chunks takes no mark at all.
//! - The background fill takes marks on a batch of chunks, fetches them, flushes the
//!   destination once, persists the batch's bits, then releases the marks: a write to a
//!   chunk whose fetch is not yet durable waits, so a restart can never re-fetch a chunk
//!   over an acknowledged write.
//! - Zero runs: the background fill takes a run of consecutive unrestored chunks whose
//!   hash is the zero hash as one step (at most [`ZERO_RUN_CHUNKS`] chunks): marks on
//!   the run, then — under the marks — the destination asked for data there
//!   (`BlockIo::data_ranges`): none (holes of a fresh sparse file) means nothing is
//!   written; otherwise, or unknown (a device), one `write_zeroes` over the run (at most
//!   [`ZERO_RUN_WRITE_BYTES`], so a writer waiting for a mark waits for one bounded
//!   zeroing). Then one flush and one persist of the whole run's bits, as for a data
//!   batch. So a sparse generation fills in steps proportional to its data, plus one
//!   per run. Sound as any batch: the bits become durable only after the flush, and a
//!   chunk a writer restored meanwhile is left out (its bit is set, its data the
//!   writer's); a hole seen under the marks cannot be filled by anyone but the marks'
//!   holder, and the flush makes a hole an earlier step punched durable.
//! - Fetching: the chunks of one batch of the fill, or of one request, are fetched in
//!   parallel ([`FETCHERS`] at a time, from a directory or an object store: both wait,
//!   on the disk or the network, more than on the CPU), each under the fill mark its
//!   batch or request already holds; requests served at once fetch at once. Every chunk read, the fill's and the requests'
//!   together, takes one of [`FETCH_SLOTS`] slots first, so at most that many fetched
//!   chunks are in memory. Read-ahead: a read that had to fetch records the chunk after
//!   its last one, and the background fill continues from there (a sequential reader
//!   finds the next chunks fetched or in flight); when it reaches the end having
//!   jumped, it starts over from chunk 0 for what it skipped.
//! - Restart (daemon killed): the state file's bits are exactly the chunks whose data
//!   and later writes are safe; the rest are fetched again. A missing state file means a
//!   fresh destination. When every bit is set the header says "complete" and the
//!   device is plain pass-through.
//! - Pin: before a fresh fill's state file exists, a pin naming the generation, disk
//!   and destination is written into the repository (`repo::pin`), and its path into
//!   `fill.pin` beside the state file; prune keeps a pinned generation whether or not
//!   a daemon runs. The repository lock is held only while opening (until the pin is
//!   durable), not for the fill. The pin is removed after "complete" is durable (or again at the next
//!   open, if the daemon died in between), or by [`abandon`]. A resumed fill whose pin
//!   is gone pins again.
//! - Abandon: [`abandon`] sets the "abandoned" flag and removes the pin. An abandoned
//!   fill is never resumed nor served as a plain disk (the destination holds partial
//!   data); a new live restore under the name starts afresh.

pub use super::fill_state::{read_fill_state, FILL_VERSION};
use super::fill_state::{FillHeader, BLOCK, FLAG_ABANDONED, FLAG_COMPLETE, HEADER, MAGIC};
use crate::bitmap::{self, AtomicBitmap};
use crate::blockio::{check_range, BlockIo};
use crate::busy::BusyMarks;
use crate::error::{IoContext, Result};
use crate::fsutil::hex;
use crate::repo::pin::{self, Pin};
use crate::repo::{FixedIndex, Repo, ZERO_HASH};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};

thread_local! {
    /// A chunk buffer per thread that fetches chunks (fillers, readers of a missing
    /// chunk), reused for every chunk it fetches: no fresh allocation per chunk. At
    /// most one repository chunk per such thread.
    static FETCH_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Chunks fetched per durable step of the background fill: a write to one of them
/// waits for the whole step (32 MiB of 1 MiB chunks: tens of milliseconds).
const FILL_BATCH: usize = 32;
/// Chunks of one batch or request fetched in parallel (each worker one chunk at a
/// time). A cold chunk of a directory repository costs a lookup, an inode read and a
/// data read, each a wait on the disk; one of an object store a network round trip: 8
/// keep the disk or the network busy (on a 2-CPU VM, 1 GiB filled in 1.7–2.5 s with 4
/// fetchers and 16-chunk batches, 1.5–1.9 s with 8 and 32; BENCHMARKS.md).
const FETCHERS: usize = 8;
/// Most chunk reads in flight at once over the background fill and every request
/// together: bounds the memory of fetched chunks to this many chunks.
const FETCH_SLOTS: usize = 16;
/// No read-ahead position (see [`FillingIo::ahead`]).
const NO_HINT: u64 = u64::MAX;
/// Most chunks of one zero run of the background fill (one durable step, one set of
/// fill marks).
const ZERO_RUN_CHUNKS: u64 = 1 << 16;
/// Most bytes of a zero run the destination already reads as zeros (holes of a file):
/// nothing is written, only the bits are persisted.
const ZERO_RUN_HOLE_BYTES: u64 = 64 << 30;
/// Most bytes of a zero run that must be zeroed (one `write_zeroes`): bounds how long
/// a write to a chunk of the run waits for its fill mark.
const ZERO_RUN_WRITE_BYTES: u64 = 1 << 30;

/// Progress of the background fill.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct FillStatus {
    /// Repository chunks restored.
    pub done: u64,
    /// Repository chunks in the generation.
    pub total: u64,
    /// Every chunk is restored: the device is a plain disk now.
    pub complete: bool,
    /// The fill stopped on this error.
    pub error: Option<String>,
}

/// Who a fill's pin names: the disk being restored and its destination.
#[derive(Debug, Clone, Default)]
pub struct PinOwner {
    /// Disk name.
    pub disk: String,
    /// Destination path.
    pub destination: String,
}

/// The file beside the state file that names the fill's pin.
fn pin_note_path(state_path: &Path) -> PathBuf {
    state_path.with_extension("pin")
}

/// Remove the fill's pin (named in `fill.pin`) and the note.
fn unpin(state_path: &Path) -> Result<Option<PathBuf>> {
    let note = pin_note_path(state_path);
    let target = match std::fs::read_to_string(&note) {
        Ok(s) => PathBuf::from(s.trim()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(crate::Error::io(
                format!("unable to read {}", note.display()),
                e,
            ))
        }
    };
    pin::remove(&target)?;
    std::fs::remove_file(&note).ctx(|| format!("unable to remove {}", note.display()))?;
    Ok(Some(target))
}

/// Pin generation `g` for the fill tracked in `state_path` (the caller holds the
/// repository lock), and note the pin beside the state file.
fn pin_for(repo: &Repo, g: &str, state_path: &Path, owner: &PinOwner) -> Result<PathBuf> {
    let state = std::path::absolute(state_path).unwrap_or_else(|_| state_path.to_path_buf());
    let p = pin::create(
        repo,
        &Pin {
            generation: g.to_string(),
            disk: owner.disk.clone(),
            destination: owner.destination.clone(),
            state: state.display().to_string(),
            host: pin::host_name(),
            created: crate::fsutil::format_utc(crate::fsutil::now_unix_ms()),
            kind: pin::PinKind::LiveRestore,
            pid: None,
        },
    )?;
    let abs = match crate::repo::object::is_s3(&p) {
        true => p,
        false => std::path::absolute(&p).unwrap_or(p),
    };
    crate::fsutil::write_atomic(
        &pin_note_path(state_path),
        abs.display().to_string().as_bytes(),
    )?;
    Ok(abs)
}

/// What [`abandon`] did.
#[derive(Debug, Clone, Serialize)]
pub struct Abandoned {
    /// The generation the fill came from.
    pub generation: String,
    /// Chunks that had been restored, of the total.
    pub done: u64,
    /// Chunks in the generation.
    pub total: u64,
    /// The pin removed, if there was one.
    pub pin_removed: Option<String>,
}

/// Abandon the unfinished live restore tracked in `state_path` (its daemon must not
/// be running): mark it abandoned and remove its pin, so prune may delete the
/// generation. Refused when there is no fill state or the fill completed.
pub fn abandon(state_path: &Path) -> Result<Abandoned> {
    let sp = state_path.display();
    let b = match std::fs::read(state_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(crate::err!(
                NotFound,
                "unable to abandon the live restore: there is no fill state {sp}"
            ))
        }
        Err(e) => {
            return Err(crate::Error::io(
                format!("unable to read fill state {sp}"),
                e,
            ))
        }
    };
    let mut h = FillHeader::decode(&b).ok_or_else(|| {
        crate::err!(
            Corrupt,
            "unable to abandon the live restore: fill state {sp} is unreadable"
        )
    })?;
    let generation = String::from_utf8_lossy(&h.generation)
        .trim_end_matches('\0')
        .to_string();
    if h.flags & FLAG_COMPLETE != 0 {
        let _ = unpin(state_path);
        return Err(crate::err!(
            InvalidInput,
            "unable to abandon the live restore of generation {generation}: it completed"
        ));
    }
    let words = h.nchunks.div_ceil(64) as usize;
    let mut done = 0u64;
    for i in 0..words {
        let o = HEADER as usize + i * 8;
        if let Some(w) = b.get(o..o + 8) {
            let mut x = [0u8; 8];
            x.copy_from_slice(w);
            let mut v = u64::from_le_bytes(x);
            if i == words - 1 && h.nchunks % 64 != 0 {
                v &= (1u64 << (h.nchunks % 64)) - 1;
            }
            done += v.count_ones() as u64;
        }
    }
    if h.flags & FLAG_ABANDONED == 0 {
        h.flags |= FLAG_ABANDONED;
        let file = OpenOptions::new()
            .write(true)
            .open(state_path)
            .ctx(|| format!("unable to open fill state {sp}"))?;
        file.write_all_at(&h.encode(), 0)
            .and_then(|_| file.sync_data())
            .ctx(|| format!("unable to write fill state {sp}"))?;
    }
    let pin_removed = unpin(state_path)?.map(|p| p.display().to_string());
    Ok(Abandoned {
        generation,
        done,
        total: h.nchunks,
        pin_removed,
    })
}

/// A destination being filled from a generation, as a [`BlockIo`].
pub struct FillingIo {
    dest: Arc<dyn BlockIo>,
    repo: Option<Repo>,
    index: FixedIndex,
    chunk_size: u64,
    nchunks: u64,
    state_path: PathBuf,
    state: Mutex<File>,
    restored: AtomicBitmap,
    /// Chunks whose bit is set (restored).
    restored_count: AtomicU64,
    complete: AtomicBool,
    /// Fill marks: one fetch or write per unrestored chunk at a time.
    busy: BusyMarks,
    stop: AtomicBool,
    fill_running: AtomicBool,
    error: Mutex<Option<String>>,
    fill_rate: AtomicU64,
    /// Chunk reads in flight (at most [`FETCH_SLOTS`]).
    in_flight: Mutex<usize>,
    slot_free: Condvar,
    /// Read-ahead: the chunk after the last one a read had to fetch; the background
    /// fill continues from there ([`NO_HINT`]: none).
    ahead: AtomicU64,
}

/// One chunk read in flight (see [`FillingIo::slot`]).
struct Slot<'a>(&'a FillingIo);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut n = self.0.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
        drop(n);
        self.0.slot_free.notify_one();
    }
}

impl FillingIo {
    /// Wait for one of the [`FETCH_SLOTS`] chunk reads.
    fn slot(&self) -> Slot<'_> {
        let mut n = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        while *n >= FETCH_SLOTS {
            n = self.slot_free.wait(n).unwrap_or_else(|p| p.into_inner());
        }
        *n += 1;
        Slot(self)
    }

    /// Serve `dest` filled from generation `generation` (id, prefix or disk name; `None`
    /// = the newest when the repository holds one disk) of the repository at
    /// `repo_dir`, tracking progress in `state_path`. A missing state file starts a
    /// fresh fill (`dest` is assumed to hold nothing of value); an existing one resumes,
    /// and must belong to the same generation.
    ///
    /// The pin names the state directory's name as the disk and an unknown destination;
    /// see [`FillingIo::open_pinned`].
    pub fn open(
        dest: Arc<dyn BlockIo>,
        repo_dir: &Path,
        generation: Option<&str>,
        state_path: &Path,
    ) -> Result<Arc<FillingIo>> {
        let owner = PinOwner {
            disk: state_path
                .parent()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            destination: "(unknown)".into(),
        };
        Self::open_pinned(dest, repo_dir, generation, state_path, &owner)
    }

    /// [`FillingIo::open`], naming `owner` in the generation's pin.
    pub fn open_pinned(
        dest: Arc<dyn BlockIo>,
        repo_dir: &Path,
        generation: Option<&str>,
        state_path: &Path,
        owner: &PinOwner,
    ) -> Result<Arc<FillingIo>> {
        let sp = state_path.display();
        let existing = match std::fs::read(state_path) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(crate::Error::io(
                    format!("unable to read fill state {sp}"),
                    e,
                ))
            }
        };
        let header = match &existing {
            Some(b) => Some(FillHeader::decode(b).ok_or_else(|| {
                crate::err!(
                    Corrupt,
                    "unable to resume the restore: fill state {sp} is unreadable"
                )
            })?),
            None => None,
        };
        let hgen = |h: &FillHeader| {
            String::from_utf8_lossy(&h.generation)
                .trim_end_matches('\0')
                .to_string()
        };
        if let Some(h) = header
            .as_ref()
            .filter(|h| h.flags & FLAG_ABANDONED != 0 && h.flags & FLAG_COMPLETE == 0)
        {
            return Err(crate::err!(
                InvalidInput,
                "the live restore of generation {} onto this destination was abandoned (cowsnapctl abandon), so it holds partial data: restore it again (cowsnapctl restore --live) or attach another disk",
                hgen(h)
            ));
        }
        if let Some(h) = header.as_ref().filter(|h| h.flags & FLAG_COMPLETE != 0) {
            // Done earlier: a plain disk, the repository is not needed any more (a pin
            // left by a daemon that died right after completing goes now).
            if let Err(e) = unpin(state_path) {
                log::warn!("{e}");
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(state_path)
                .ctx(|| format!("unable to open fill state {sp}"))?;
            return Ok(Arc::new(FillingIo {
                dest,
                repo: None,
                index: FixedIndex::new(hgen(h), h.chunk_size, h.disk_size),
                chunk_size: h.chunk_size as u64,
                nchunks: h.nchunks,
                state_path: state_path.to_path_buf(),
                state: Mutex::new(file),
                restored: AtomicBitmap::from_words(Vec::new()),
                restored_count: AtomicU64::new(h.nchunks),
                complete: AtomicBool::new(true),
                busy: BusyMarks::new(),
                stop: AtomicBool::new(false),
                fill_running: AtomicBool::new(false),
                error: Mutex::new(None),
                fill_rate: AtomicU64::new(0),
                in_flight: Mutex::new(0),
                slot_free: Condvar::new(),
                ahead: AtomicU64::new(NO_HINT),
            }));
        }
        let repo = Repo::open(repo_dir)?;
        let lock = repo.lock(false)?;
        let g = match (&header, generation) {
            (Some(h), None) => repo.resolve(Some(&hgen(h)))?,
            _ => repo.resolve(generation)?,
        };
        let index = repo.load_index(&g)?;
        if dest.size() < g.disk_size {
            return Err(crate::err!(
                NoSpace,
                "unable to restore generation {}: the destination holds {} bytes, the disk needs {}",
                g.id,
                dest.size(),
                g.disk_size
            ));
        }
        let chunk_size = index.chunk_size as u64;
        let nchunks = index.chunk_count();
        let words = nchunks.div_ceil(64) as usize;
        let region = ((words as u64 * 8).div_ceil(BLOCK)).max(1) * BLOCK;
        let mut bits = vec![0u64; words];
        match (&header, &existing) {
            (Some(h), Some(b)) => {
                if hgen(h) != g.id || h.disk_size != g.disk_size || h.nchunks != nchunks {
                    return Err(crate::err!(
                        InvalidInput,
                        "unable to resume the restore: fill state {sp} belongs to generation {}, not {}",
                        hgen(h),
                        g.id
                    ));
                }
                if (b.len() as u64) < HEADER + region {
                    return Err(crate::err!(
                        Corrupt,
                        "unable to resume the restore: fill state {sp} is truncated"
                    ));
                }
                bits = bitmap::from_le_bytes(&b[HEADER as usize..], words);
                // A fill from before pins existed, or whose pin was removed: pin again.
                let pinned = std::fs::read_to_string(pin_note_path(state_path))
                    .is_ok_and(|p| pin::exists(Path::new(p.trim())));
                if !pinned {
                    pin_for(&repo, &g.id, state_path, owner)?;
                }
            }
            _ => {
                // Pin first: from the moment a state file exists, the generation is
                // needed until the fill completes or is abandoned.
                pin_for(&repo, &g.id, state_path, owner)?;
                let mut generation = [0u8; 64];
                let gb = g.id.as_bytes();
                generation[..gb.len().min(64)].copy_from_slice(&gb[..gb.len().min(64)]);
                let h = FillHeader {
                    magic: MAGIC,
                    version: FILL_VERSION,
                    flags: 0,
                    disk_size: g.disk_size,
                    chunk_size: index.chunk_size,
                    _pad: 0,
                    nchunks,
                    generation,
                    checksum: [0; 32],
                };
                let mut b = h.encode();
                b.resize((HEADER + region) as usize, 0);
                crate::fsutil::write_atomic(state_path, &b)?;
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(state_path)
            .ctx(|| format!("unable to open fill state {sp}"))?;
        // Bits past the end count as restored.
        if nchunks & 63 != 0 {
            if let Some(last) = bits.last_mut() {
                *last |= !0u64 << (nchunks % 64);
            }
        }
        let done: u64 =
            bits.iter().map(|w| w.count_ones() as u64).sum::<u64>() - (words as u64 * 64 - nchunks);
        // The pin now keeps the generation (and so its chunks) from prune: the shared
        // repository lock taken for the set-up is not held for the fill, so a prune
        // neither waits for a fill that may take hours nor depends on this process.
        drop(lock);
        let fio = Arc::new(FillingIo {
            dest,
            repo: Some(repo),
            index,
            chunk_size,
            nchunks,
            state_path: state_path.to_path_buf(),
            state: Mutex::new(file),
            restored: AtomicBitmap::from_words(bits),
            restored_count: AtomicU64::new(done),
            complete: AtomicBool::new(false),
            busy: BusyMarks::new(),
            stop: AtomicBool::new(false),
            fill_running: AtomicBool::new(false),
            error: Mutex::new(None),
            fill_rate: AtomicU64::new(0),
            in_flight: Mutex::new(0),
            slot_free: Condvar::new(),
            ahead: AtomicU64::new(NO_HINT),
        });
        if done == nchunks {
            fio.finish()?;
        }
        Ok(fio)
    }

    /// The generation being restored.
    pub fn generation(&self) -> &str {
        &self.index.generation
    }

    /// The destination.
    pub fn dest(&self) -> &Arc<dyn BlockIo> {
        &self.dest
    }

    /// Progress of the fill.
    pub fn fill_status(&self) -> FillStatus {
        FillStatus {
            done: self.restored_count.load(Ordering::SeqCst),
            total: self.nchunks,
            complete: self.complete.load(Ordering::SeqCst),
            error: self.error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }

    fn is_restored(&self, c: u64) -> bool {
        self.restored.get(c)
    }

    fn chunk_range(&self, off: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        off / self.chunk_size..(off + len - 1) / self.chunk_size + 1
    }

    /// Copy chunk `c` from the repository to the destination (not yet durable).
    fn fetch_data(&self, c: u64) -> Result<()> {
        let off = c * self.chunk_size;
        let len = self.index.chunk_len(c);
        let h = self.index.hash(c);
        let repo = self.repo.as_ref().ok_or_else(|| {
            crate::err!(
                InvalidInput,
                "unable to fetch chunk {c}: restore already complete"
            )
        })?;
        if *h == ZERO_HASH {
            return self.dest.write_zeroes(off, len as u64, true);
        }
        let _slot = self.slot();
        FETCH_BUF.with(|b| {
            let mut buf = b.borrow_mut();
            repo.store().read_into(h, len, &mut buf).map_err(|e| {
                e.with_context(format!(
                    "unable to restore generation {} at offset {off} (chunk {})",
                    self.index.generation,
                    hex(h)
                ))
            })?;
            self.dest.write_at(&buf, off)?;
            // on its way to the disk while the batch's other chunks are fetched, so the
            // batch's flush waits for less
            self.dest.start_writeback(off, len as u64);
            Ok(())
        })
    }

    /// [`Self::fetch_data`] for each of `chunks` (their fill marks held), up to
    /// [`FETCHERS`] at a time; the first error stops the rest and is returned.
    fn fetch_many(&self, chunks: &[u64]) -> Result<()> {
        let workers = FETCHERS.min(chunks.len());
        if workers <= 1 {
            return chunks.iter().try_for_each(|&c| self.fetch_data(c));
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let first_err: Mutex<Option<crate::Error>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| {
                    while !failed.load(Ordering::Relaxed) {
                        let Some(&c) = chunks.get(next.fetch_add(1, Ordering::Relaxed)) else {
                            return;
                        };
                        if let Err(e) = self.fetch_data(c) {
                            failed.store(true, Ordering::Relaxed);
                            first_err
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e);
                            return;
                        }
                    }
                });
            }
        });
        match first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Persist the bits of `chunks` (their data already durable), then publish them.
    fn persist(&self, chunks: &[u64]) -> Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        let file = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // the new bits by word; only the state file's blocks they fall in are written,
        // each with the bits already durable (set in memory only after their fsync)
        let mut masks = std::collections::BTreeMap::<usize, u64>::new();
        for &c in chunks {
            *masks.entry((c / 64) as usize).or_default() |= 1 << (c % 64);
        }
        let block_words = (BLOCK / 8) as usize;
        let mut blocks: Vec<usize> = masks.keys().map(|w| w / block_words).collect();
        blocks.dedup();
        for b in blocks {
            let w0 = b * block_words;
            let w1 = (w0 + block_words).min(self.restored.nwords());
            let words: Vec<u64> = (w0..w1)
                .map(|w| self.restored.word(w) | masks.get(&w).copied().unwrap_or(0))
                .collect();
            let bytes = bitmap::to_le_bytes(&words, (w1 - w0) * 8);
            file.write_all_at(&bytes, HEADER + b as u64 * BLOCK)
                .ctx(|| format!("unable to write fill state {}", self.state_path.display()))?;
        }
        file.sync_data()
            .ctx(|| format!("unable to sync fill state {}", self.state_path.display()))?;
        let mut newly = 0;
        for &c in chunks {
            if !self.restored.set(c) {
                newly += 1;
            }
        }
        let done = self.restored_count.fetch_add(newly, Ordering::SeqCst) + newly;
        drop(file);
        if done == self.nchunks {
            self.finish()?;
        }
        Ok(())
    }

    /// Every chunk is restored: say so durably and let go of the repository.
    fn finish(&self) -> Result<()> {
        {
            let file = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let mut hb = vec![0u8; HEADER as usize];
            file.read_exact_at(&mut hb, 0)
                .ctx(|| format!("unable to read fill state {}", self.state_path.display()))?;
            if let Some(mut h) = FillHeader::decode(&hb) {
                if h.flags & FLAG_COMPLETE == 0 {
                    h.flags |= FLAG_COMPLETE;
                    file.write_all_at(&h.encode(), 0)
                        .and_then(|_| file.sync_data())
                        .ctx(|| {
                            format!("unable to write fill state {}", self.state_path.display())
                        })?;
                }
            }
        }
        // "complete" is durable: the generation is not needed any more.
        if let Err(e) = unpin(&self.state_path) {
            log::warn!("{e}; prune will remove the pin");
        }
        self.complete.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Make sure every chunk of `range` is restored (fetching the missing ones).
    fn ensure(&self, range: std::ops::Range<u64>) -> Result<()> {
        let missing: Vec<u64> = range.filter(|&c| !self.is_restored(c)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let _g = self.busy.acquire(missing.clone());
        let todo: Vec<u64> = missing
            .into_iter()
            .filter(|&c| !self.is_restored(c))
            .collect();
        if let Some(&last) = todo.last() {
            // read-ahead: the background fill goes on from the next chunk
            self.ahead.store(last + 1, Ordering::Relaxed);
            self.fetch_many(&todo)?;
            self.dest.flush()?;
            self.persist(&todo)?;
        }
        Ok(())
    }

    /// Run a data-changing request: fetch partly covered unrestored chunks first, do
    /// `op`, then mark the fully covered ones restored.
    fn changing(&self, off: u64, len: u64, op: impl FnOnce() -> Result<()>) -> Result<()> {
        if self.complete.load(Ordering::Acquire) {
            return op();
        }
        let range = self.chunk_range(off, len);
        let missing: Vec<u64> = range.filter(|&c| !self.is_restored(c)).collect();
        if missing.is_empty() {
            return op();
        }
        let _g = self.busy.acquire(missing.clone());
        let end = off + len;
        let mut covered = Vec::new();
        let mut partial = Vec::new();
        for c in missing {
            if self.is_restored(c) {
                continue;
            }
            let cs = c * self.chunk_size;
            let ce = cs + self.index.chunk_len(c) as u64;
            if off <= cs && end >= ce {
                covered.push(c);
            } else {
                partial.push(c);
            }
        }
        self.fetch_many(&partial)?;
        if !partial.is_empty() {
            self.dest.flush()?;
            self.persist(&partial)?;
        }
        op()?;
        if !covered.is_empty() {
            self.dest.flush()?;
            self.persist(&covered)?;
        }
        Ok(())
    }

    /// Start the background fill (no-op if complete or already running).
    pub fn start_fill(self: &Arc<Self>) {
        if self.complete.load(Ordering::SeqCst) || self.fill_running.swap(true, Ordering::SeqCst) {
            return;
        }
        self.stop.store(false, Ordering::SeqCst);
        let weak: Weak<FillingIo> = Arc::downgrade(self);
        let r = std::thread::Builder::new()
            .name("cowsnap-fill".into())
            .spawn(move || fill_loop(weak));
        if let Err(e) = r {
            self.fill_running.store(false, Ordering::SeqCst);
            *self.error.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(format!("unable to start the fill thread: {e}"));
        }
    }

    /// Ask the background fill to stop after its current batch.
    pub fn stop_fill(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Limit the background fill to about `bytes_per_sec` (0: unlimited). On-demand
    /// fetches for requests are never limited.
    pub fn set_fill_rate(&self, bytes_per_sec: u64) {
        self.fill_rate.store(bytes_per_sec, Ordering::SeqCst);
    }

    /// Whether the background fill thread is running.
    pub fn fill_running(&self) -> bool {
        self.fill_running.load(Ordering::SeqCst)
    }

    /// Whether chunk `c` of the generation is all zeros.
    fn is_zero_chunk(&self, c: u64) -> bool {
        *self.index.hash(c) == ZERO_HASH
    }

    /// Byte offset just past chunk `c`.
    fn chunk_end(&self, c: u64) -> u64 {
        c * self.chunk_size + self.index.chunk_len(c) as u64
    }

    /// Whether the destination reads zeros in `off..end` because it holds no data there
    /// (holes of a file); `false` when unknown.
    fn dest_has_no_data(&self, off: u64, end: u64) -> bool {
        match self.dest.data_ranges(off, end - off) {
            Ok(Some(r)) => r.iter().all(|&(a, b)| b <= off || a >= end || b <= a),
            _ => false,
        }
    }

    /// Fetch the next batch (a run of zero chunks, or up to [`FILL_BATCH`] other
    /// unrestored chunks); `None` when the end is reached, else the bytes written.
    fn fill_batch(&self, from: &mut u64) -> Result<Option<u64>> {
        while *from < self.nchunks && self.is_restored(*from) {
            *from += 1;
        }
        if *from >= self.nchunks {
            return Ok(None);
        }
        if self.is_zero_chunk(*from) {
            return self.fill_zero_run(from).map(Some);
        }
        let mut batch = Vec::with_capacity(FILL_BATCH);
        while *from < self.nchunks && batch.len() < FILL_BATCH {
            if !self.is_restored(*from) {
                if self.is_zero_chunk(*from) {
                    break;
                }
                batch.push(*from);
            }
            *from += 1;
        }
        let _g = self.busy.acquire(batch.clone());
        let todo: Vec<u64> = batch
            .into_iter()
            .filter(|&c| !self.is_restored(c))
            .collect();
        self.fetch_many(&todo)?;
        if !todo.is_empty() {
            self.dest.flush()?;
            self.persist(&todo)?;
        }
        Ok(Some(todo.len() as u64 * self.chunk_size))
    }

    /// Restore the run of unrestored zero chunks starting at `*from` in one step (see
    /// the module notes); returns the bytes written (0 when the destination already
    /// held no data there).
    fn fill_zero_run(&self, from: &mut u64) -> Result<u64> {
        let first = *from;
        let cap = |bytes: u64| (bytes / self.chunk_size).clamp(1, ZERO_RUN_CHUNKS);
        let mut end = first;
        while end < self.nchunks
            && end - first < cap(ZERO_RUN_HOLE_BYTES)
            && !self.is_restored(end)
            && self.is_zero_chunk(end)
        {
            end += 1;
        }
        // a run that needs writing is cut shorter (checked again under the marks)
        if !self.dest_has_no_data(first * self.chunk_size, self.chunk_end(end - 1)) {
            end = end.min(first + cap(ZERO_RUN_WRITE_BYTES));
        }
        *from = end;
        let _g = self.busy.acquire((first..end).collect());
        // chunks a writer restored meanwhile are the writer's
        let todo: Vec<u64> = (first..end).filter(|&c| !self.is_restored(c)).collect();
        let mut written = 0;
        let mut i = 0;
        while i < todo.len() {
            // contiguous pieces of `todo` (one, unless a writer came between)
            let mut j = i + 1;
            while j < todo.len() && todo[j] == todo[j - 1] + 1 {
                j += 1;
            }
            let (a, b) = (todo[i] * self.chunk_size, self.chunk_end(todo[j - 1]));
            if !self.dest_has_no_data(a, b) {
                self.dest.write_zeroes(a, b - a, true)?;
                written += b - a;
            }
            i = j;
        }
        if !todo.is_empty() {
            self.dest.flush()?;
            self.persist(&todo)?;
        }
        Ok(written)
    }
}

/// The most a rate-limited fill may run ahead of its pace after falling behind.
const FILL_BURST: std::time::Duration = std::time::Duration::from_millis(500);

fn fill_loop(weak: Weak<FillingIo>) {
    let mut from = 0u64;
    // Whether the fill jumped ahead (read-ahead) since it last started from chunk 0:
    // then chunks before the jump may be left when it reaches the end.
    let mut jumped = false;
    let started = std::time::Instant::now();
    let mut bytes = 0u64;
    loop {
        // Pace to the fill rate, waking often enough to notice a stop.
        loop {
            let Some(io) = weak.upgrade() else {
                return;
            };
            let rate = io.fill_rate.load(Ordering::SeqCst);
            if rate == 0 || io.stop.load(Ordering::SeqCst) {
                break;
            }
            let due = std::time::Duration::from_secs_f64(bytes as f64 / rate as f64);
            let now = started.elapsed();
            if now >= due {
                // A fill that fell behind (slow I/O, a rate raised later) does not
                // catch up in a burst: at most FILL_BURST of credit is kept.
                if now > due + FILL_BURST {
                    bytes = ((now - FILL_BURST).as_secs_f64() * rate as f64) as u64;
                }
                break;
            }
            drop(io);
            std::thread::sleep((due - now).min(std::time::Duration::from_millis(50)));
        }
        let Some(io) = weak.upgrade() else {
            return;
        };
        if io.stop.load(Ordering::SeqCst) || io.complete.load(Ordering::SeqCst) {
            io.fill_running.store(false, Ordering::SeqCst);
            return;
        }
        let hint = io.ahead.swap(NO_HINT, Ordering::Relaxed);
        if hint < io.nchunks && hint != from {
            from = hint;
            jumped = true;
        }
        match io.fill_batch(&mut from) {
            Ok(Some(n)) => bytes += n,
            Ok(None) if jumped && io.restored_count.load(Ordering::SeqCst) < io.nchunks => {
                from = 0;
                jumped = false;
            }
            Ok(None) => {
                if io.restored_count.load(Ordering::SeqCst) < io.nchunks {
                    // said in the status too: a fill that is not running and not
                    // complete must not look like one still at work
                    let e = "restore fill passed the end with chunks missing";
                    log::error!("{e}");
                    *io.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.into());
                }
                io.fill_running.store(false, Ordering::SeqCst);
                return;
            }
            Err(e) => {
                log::error!("restore fill stopped: {e}");
                *io.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                io.fill_running.store(false, Ordering::SeqCst);
                return;
            }
        }
    }
}

impl BlockIo for FillingIo {
    fn size(&self) -> u64 {
        self.index.disk_size
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        check_range(self.size(), off, buf.len() as u64, "read")?;
        if !self.complete.load(Ordering::Acquire) {
            self.ensure(self.chunk_range(off, buf.len() as u64))?;
        }
        self.dest.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        check_range(self.size(), off, buf.len() as u64, "write")?;
        self.changing(off, buf.len() as u64, || self.dest.write_at(buf, off))
    }
    fn flush(&self) -> Result<()> {
        self.dest.flush()
    }
    fn discard(&self, off: u64, len: u64) -> Result<()> {
        check_range(self.size(), off, len, "discard")?;
        self.changing(off, len, || self.dest.discard(off, len))
    }
    fn write_zeroes(&self, off: u64, len: u64, may_unmap: bool) -> Result<()> {
        check_range(self.size(), off, len, "write-zeroes")?;
        self.changing(off, len, || self.dest.write_zeroes(off, len, may_unmap))
    }
    fn fast_zero(&self) -> bool {
        self.dest.fast_zero()
    }
    fn is_block_device(&self) -> bool {
        self.dest.is_block_device()
    }
    fn engine_name(&self) -> &'static str {
        self.dest.engine_name()
    }
}
