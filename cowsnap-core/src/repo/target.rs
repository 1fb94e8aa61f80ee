//! [`RepoTarget`]: a backup into the repository, as a [`Target`].
//!
//! Flow (called by the drainer): `granule_chunks` → `scope(cut)` → `begin(info)` →
//! `write(off, data)`* in any order → `commit` or `abort`.
//!
//! - The granule is one repository chunk: `repo_chunk / tracking_chunk` tracking chunks
//!   (1 when the tracking chunk is larger; a write then covers several repo chunks).
//! - `scope`: a full backup reads everything. An incremental trusts the cut only if it
//!   is relative to a complete generation this repository holds (the parent:
//!   `cut.relative_to == parent.id`, of this disk or, for a disk restored from another
//!   disk's generation, of that disk) and that index loads; otherwise it reads
//!   everything, deduplicating against the store, with a note saying why. Generation
//!   ids are unique, and a change log only ever becomes relative to a generation by
//!   committing it (same lineage) or by being reset to it at restore (new lineage,
//!   content exactly that generation), so a matching `relative_to` is what makes the
//!   bits trustworthy; a lineage differing from the parent's is reported as a note.
//!   `begin` refuses a snapshot whose lineage differs from the cut's (the scope can no
//!   longer be widened there).
//! - Chunks out of scope keep the parent's hash; in a full backup chunks never written
//!   (free space the drainer skipped) are zeros.
//!   A parent chunk in the quarantine (damaged) makes the backup read everything, so
//!   the data is stored afresh (one readdir at the instant); `commit` refuses to
//!   publish a generation that would take a missing chunk from its parent.
//! - Reusing a stored chunk reads it back and compares it (see `chunk_store`); a
//!   damaged one is quarantined and written afresh, which heals every generation
//!   referencing it, and the generation's notes say how many.
//! - `commit`: make the chunks durable (`ChunkStore::sync_for_commit`: one `syncfs` of
//!   the file system, or the touched chunk directories fsynced), publish the index, then
//!   the metadata. `abort` or drop: nothing is published; chunks already stored stay
//!   unreferenced until a prune.
//! - The repository lock is held shared from open to commit/abort (see the module's
//!   locking table).
//! - A worker writes a chunk under its temporary name and starts its writeback
//!   (`ChunkStore::insert_unpublished`). Synced per file system ([`ChunkSync`], chosen
//!   when the target opens) it renames it at once; synced per chunk it fsyncs and
//!   renames it [`PUBLISH_LAG`] chunks later, and `commit` publishes the rest
//!   ([`PUBLISHERS`] threads) before it syncs and publishes the index; abort or drop
//!   removes the chunks not renamed.
//! - Hashing, compression and chunk writes run on a worker pool of 4× the CPUs, at
//!   least 8 and at most 16 (`write` copies
//!   the data into a bounded queue and returns; `write_owned`, the drainer's way, takes
//!   the batch buffer itself, its chunks' work sharing it without a copy, and returns a
//!   free one of workers + [`SPARE_BATCHES`] buffers in circulation, waiting for one
//!   if need be, so the data held stays bounded); `commit` waits for the workers, and
//!   abort or drop joins them before the lock is released, so no chunk is written
//!   into the repository after the shared lock is gone.

use super::chunk_store::{ChunkSync, Insert, PendingChunk, ZERO_HASH};
use super::generation::{
    new_generation_id, GenerationInfo, GenerationKind, GenerationStats, GroupRef,
};
use super::index::{chunk_count, FixedIndex};
use super::{Repo, DEFAULT_CHUNK_SIZE};
use crate::aligned::AlignedBuf;
use crate::changelog::Cut;
use crate::error::Result;
use crate::target::{Scope, SnapshotInfo, Target, TargetSummary};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// One repository chunk for the workers.
struct ChunkWork {
    /// Orders work on the same chunk: the last handed over wins.
    seq: u64,
    index: u64,
    off: u64,
    data: ChunkData,
}

/// A chunk's bytes: its own copy, or a range of a batch buffer the drainer gave away.
enum ChunkData {
    Owned(Vec<u8>),
    Shared(Arc<Batch>, std::ops::Range<usize>),
}

impl ChunkData {
    fn bytes(&self) -> &[u8] {
        match self {
            ChunkData::Owned(v) => v,
            ChunkData::Shared(b, r) => &b.buf[r.clone()],
        }
    }
}

/// A drainer batch buffer handed over (`write_owned`), shared by the work of its
/// chunks; the last of them to finish sends it back for the drainer to reuse.
struct Batch {
    buf: AlignedBuf,
    back: Sender<AlignedBuf>,
}

impl Drop for Batch {
    fn drop(&mut self) {
        // the pool's channel holds every buffer of it, so this never blocks; a full
        // one (the drainer's own first buffer came on top) frees this buffer instead
        let _ = self.back.try_send(std::mem::take(&mut self.buf));
    }
}

/// Batch buffers in circulation beyond the workers' count: with one per worker they
/// bound a backup's buffered data at (workers + this) × the drainer's largest batch.
const SPARE_BATCHES: usize = 2;

/// The newest state of a chunk handed over in this backup.
#[derive(Clone, Copy)]
struct Change {
    /// Seq of the work whose hash `hash` is (0: none finished yet).
    seq: u64,
    hash: [u8; 32],
}

/// What the workers produce. The new generation's index is the parent's (or zeros),
/// then `zeroed`, then `changes`: O(chunks handed over as data, and zero ranges),
/// never O(disk size).
#[derive(Default)]
struct Shared {
    /// Every chunk handed over as data (registered by `write` before the work is
    /// queued), and the chunks of a zero range met later: the newest wins.
    changes: BTreeMap<u64, Change>,
    /// Chunk ranges handed over as zeros, `start → end`, disjoint and not touching.
    zeroed: BTreeMap<u64, u64>,
    chunks_new: u64,
    chunks_reused: u64,
    chunks_zero: u64,
    chunks_healed: u64,
    bytes_stored_new: u64,
    error: Option<crate::Error>,
    /// Chunks written but not yet fsynced and renamed, oldest first (at most
    /// [`PUBLISH_LAG`] between two worker steps; the rest at commit).
    pending: VecDeque<PendingChunk>,
}

/// How many chunks a backup leaves written but unpublished: a chunk is fsynced and
/// renamed this many chunks after it was written, when its writeback (started at
/// once) has usually finished, so a worker rarely waits for the disk in the fsync.
const PUBLISH_LAG: usize = 32;

struct Pool {
    tx: Option<Sender<ChunkWork>>,
    workers: Vec<JoinHandle<()>>,
    /// Free batch buffers (`write_owned`); `batches` of them in circulation.
    free_tx: Sender<AlignedBuf>,
    free_rx: Receiver<AlignedBuf>,
}

impl Pool {
    fn start(repo: &Arc<Repo>, shared: &Arc<Mutex<Shared>>, sync: &Arc<ChunkSync>) -> Result<Pool> {
        // Four times the CPUs, at least 8 (on an object store a worker mostly waits
        // for a PUT, on a directory for the disk — synced per chunk, in its fsync —
        // neither using a CPU; concurrent fsyncs share journal commits). 8 workers on 2 CPUs measured
        // faster than 4 and as fast as 16 (BENCHMARKS.md).
        let n = std::thread::available_parallelism()
            .map(|p| p.get() * 4)
            .unwrap_or(8)
            .clamp(8, 16);
        let (tx, rx) = bounded::<ChunkWork>(2 * n);
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let rx = rx.clone();
            let repo = repo.clone();
            let shared = shared.clone();
            let sync = sync.clone();
            let h = std::thread::Builder::new()
                .name(format!("cowsnap-repo-{i}"))
                .spawn(move || {
                    for work in rx.iter() {
                        store_chunk(&repo, &shared, &sync, work);
                    }
                })
                .map_err(|e| crate::Error::io("unable to start a repository worker", e))?;
            workers.push(h);
        }
        let batches = n + SPARE_BATCHES;
        let (free_tx, free_rx) = bounded::<AlignedBuf>(batches);
        for _ in 0..batches {
            // empty: the drainer sizes (allocates) it at its first use
            let _ = free_tx.try_send(AlignedBuf::new());
        }
        Ok(Pool {
            tx: Some(tx),
            workers,
            free_tx,
            free_rx,
        })
    }

    fn finish(&mut self) {
        self.tx = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn lock_shared(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

fn store_chunk(repo: &Repo, shared: &Mutex<Shared>, sync: &ChunkSync, work: ChunkWork) {
    if lock_shared(shared).error.is_some() {
        return;
    }
    let data = work.data.bytes();
    let h = repo.store().hash(data);
    let r = if h == ZERO_HASH {
        None
    } else {
        Some(repo.store().insert_unpublished(&h, data).map_err(|e| {
            e.with_context(format!("unable to store the chunk at offset {}", work.off))
        }))
    };
    let mut s = lock_shared(shared);
    let pending = match r {
        None => {
            s.chunks_zero += 1;
            None
        }
        Some(Ok((Insert::New(n), p))) => {
            s.chunks_new += 1;
            s.bytes_stored_new += n;
            p
        }
        Some(Ok((Insert::Healed(n), p))) => {
            s.chunks_new += 1;
            s.chunks_healed += 1;
            s.bytes_stored_new += n;
            p
        }
        Some(Ok((Insert::Reused, p))) => {
            s.chunks_reused += 1;
            p
        }
        Some(Err(e)) => {
            if s.error.is_none() {
                s.error = Some(e);
            }
            return;
        }
    };
    let c = s.changes.entry(work.index).or_insert(Change {
        seq: 0,
        hash: ZERO_HASH,
    });
    if work.seq > c.seq {
        *c = Change {
            seq: work.seq,
            hash: h,
        };
    }
    // synced per file system: named at once (nothing to wait for); per chunk: a group
    // at a time, late: the first fsync commits the file system's journal for all of
    // them (their writeback is long done), so the others find little left to do
    let due: Vec<PendingChunk> = if sync.per_file_system() {
        pending.into_iter().collect()
    } else {
        s.pending.extend(pending);
        match s.pending.len() >= 2 * PUBLISH_LAG {
            true => s.pending.drain(..PUBLISH_LAG).collect(),
            false => Vec::new(),
        }
    };
    drop(s);
    for p in due {
        if let Err(e) = p.publish_for(sync) {
            let mut s = lock_shared(shared);
            if s.error.is_none() {
                s.error = Some(e.with_context("unable to store a chunk"));
            }
            return;
        }
    }
}

/// Add chunks `first..last` to `set` (ranges `start → end`, disjoint and not touching).
fn add_range(set: &mut BTreeMap<u64, u64>, mut first: u64, mut last: u64) {
    if let Some((&s, &e)) = set.range(..=first).next_back() {
        if e >= first {
            first = s;
            last = last.max(e);
        }
    }
    let meet: Vec<(u64, u64)> = set.range(first..=last).map(|(&s, &e)| (s, e)).collect();
    for (s, e) in meet {
        set.remove(&s);
        last = last.max(e);
    }
    set.insert(first, last);
}

/// Whether chunk `i` is in `set` (see [`add_range`]).
fn in_ranges(set: &BTreeMap<u64, u64>, i: u64) -> bool {
    set.range(..=i).next_back().is_some_and(|(_, &e)| i < e)
}

/// Threads that publish the chunks still pending at commit: each fsync waits for the
/// disk, not a CPU, so several run at once.
const PUBLISHERS: usize = 8;

/// Publish every chunk still pending (before the index is), [`PUBLISHERS`] at a time;
/// the first error is returned (the chunks not published are removed when dropped).
fn publish_pending(shared: &Mutex<Shared>, sync: &ChunkSync) -> Result<()> {
    let pending: Vec<PendingChunk> = std::mem::take(&mut lock_shared(shared).pending).into();
    let per = pending.len().div_ceil(PUBLISHERS).max(1);
    let mut groups: Vec<Vec<PendingChunk>> = Vec::new();
    let mut rest = pending.into_iter().peekable();
    while rest.peek().is_some() {
        groups.push(rest.by_ref().take(per).collect());
    }
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let hs: Vec<_> = groups
            .into_iter()
            .map(|g| s.spawn(move || g.into_iter().try_for_each(|p| p.publish_for(sync))))
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(crate::err!(Io, "a chunk publisher stopped unexpectedly"))
                })
            })
            .collect()
    });
    results
        .into_iter()
        .collect::<Result<()>>()
        .map_err(|e| e.with_context("unable to store a chunk"))
}

/// What a repository backup needs to know up front.
#[derive(Debug, Clone, Default)]
pub struct RepoTargetParams {
    /// Disk name the generation is filed under.
    pub disk_name: String,
    /// Read only changed chunks when the change log can be trusted.
    pub incremental: bool,
    /// The key of an encrypted repository (one created now is encrypted under it).
    pub key: Option<Arc<super::crypt::RepoKey>>,
}

/// A backup into a repository.
pub struct RepoTarget {
    repo: Arc<Repo>,
    params: RepoTargetParams,
    tracking_chunk: u32,
    _lock: super::RepoLock,
    parent: Option<(GenerationInfo, FixedIndex)>,
    /// The parent resolved before the instant, for the generation id it was resolved
    /// for (see `Target::prepare`).
    #[allow(clippy::type_complexity)]
    prepared: Option<(
        String,
        std::result::Result<(GenerationInfo, FixedIndex), String>,
    )>,
    cut_lineage: Option<String>,
    scope: Option<Scope>,
    notes: Vec<String>,
    group: Option<GroupRef>,
    info: Option<SnapshotInfo>,
    id: String,
    shared: Arc<Mutex<Shared>>,
    pool: Option<Pool>,
    /// How the chunks are made durable (chosen when the target opens, before anything
    /// is written: its descriptor reports writeback errors from then on).
    sync: Arc<ChunkSync>,
    work_seq: u64,
    stats: GenerationStats,
    started: Instant,
}

/// Open a backup of `params.disk_name` into the repository at `dir` (created with the
/// default chunk size if missing) for a disk tracked in `tracking_chunk`-byte chunks
/// (checked again in `begin`).
pub fn open_target(
    dir: &Path,
    params: RepoTargetParams,
    tracking_chunk: u32,
) -> Result<Box<dyn Target>> {
    Ok(Box::new(RepoTarget::open(dir, params, tracking_chunk)?))
}

impl RepoTarget {
    /// Open the target (see [`open_target`]).
    pub fn open(dir: &Path, params: RepoTargetParams, tracking_chunk: u32) -> Result<Self> {
        if params.disk_name.is_empty() {
            return Err(crate::err!(
                InvalidInput,
                "unable to back up: the disk has no name"
            ));
        }
        if !tracking_chunk.is_power_of_two() || tracking_chunk == 0 {
            return Err(crate::err!(
                InvalidInput,
                "unable to back up: tracking chunk size {tracking_chunk} is not a power of two"
            ));
        }
        let repo = Repo::open_or_create_keyed(dir, DEFAULT_CHUNK_SIZE, params.key.clone())?;
        let lock = repo.lock(false)?;
        let sync = Arc::new(repo.store().begin_sync());
        Ok(RepoTarget {
            repo: Arc::new(repo),
            params,
            tracking_chunk,
            _lock: lock,
            parent: None,
            prepared: None,
            cut_lineage: None,
            scope: None,
            notes: Vec::new(),
            group: None,
            info: None,
            id: String::new(),
            shared: Arc::new(Mutex::new(Shared::default())),
            pool: None,
            sync,
            work_seq: 0,
            stats: GenerationStats::default(),
            started: Instant::now(),
        })
    }

    /// Generation id (after `begin`).
    pub fn generation_id(&self) -> &str {
        &self.id
    }

    fn decide(&mut self, cut: Option<&Cut>) -> std::result::Result<Scope, String> {
        let cut = cut.ok_or("no change log for this disk")?;
        let rel = cut
            .relative_to
            .as_deref()
            .ok_or_else(|| match &cut.reset_reason {
                Some(r) => format!("the change log was reset: {r}"),
                None => "the change log is not relative to any generation".to_string(),
            })?;
        // Resolved before the instant (`prepare`) when the change log was already
        // relative to this generation: then the instant does no I/O here.
        let (parent, idx) = match self.prepared.take() {
            Some((id, r)) if id == rel => r?,
            _ => self.resolve_parent(rel)?,
        };
        if parent.lineage != cut.lineage {
            self.notes.push(format!(
                "incremental relative to generation {} (this disk was restored from it)",
                parent.id
            ));
        }
        self.cut_lineage = Some(cut.lineage.clone());
        self.parent = Some((parent, idx));
        Ok(Scope::Changed)
    }

    /// Find the generation `rel` in this repository and load its index, checking it
    /// can be a parent. I/O: a listing, the index, a readdir of the quarantine.
    fn resolve_parent(
        &self,
        rel: &str,
    ) -> std::result::Result<(GenerationInfo, FixedIndex), String> {
        // The parent is the generation the change log is relative to (a disk restored
        // from another disk's generation, under another name, has it as its parent),
        // when this repository holds it complete. It need not be the newest of this
        // disk: tracking relative to it is exact whatever came later.
        let parent = self
            .repo
            .list()
            .map_err(|e| format!("unable to list the repository: {e}"))?
            .into_iter()
            .find(|g| g.id == rel)
            .ok_or_else(|| {
                match self.repo.latest_of(&self.params.disk_name) {
                    Ok(Some(g)) => format!(
                        "changes are relative to generation {rel}, which this repository does not hold (the newest of this disk is {})",
                        g.id
                    ),
                    _ => format!(
                        "changes are relative to generation {rel}, which this repository does not hold"
                    ),
                }
            })?;
        if parent.chunk_size != self.repo.chunk_size() {
            return Err("the parent has another chunk size".into());
        }
        let idx = self
            .repo
            .load_index(&parent)
            .map_err(|e| format!("parent unusable: {e}"))?;
        // Unchanged chunks take the parent's hashes unread: only sound if the parent's
        // chunks are there. A quarantined (damaged) one must be read from the disk and
        // stored afresh, so read everything (dedup keeps it cheap). One readdir of the
        // quarantine; chunks missing for any other reason (also one quarantined after
        // this check) are caught at commit, which refuses to publish.
        let q = self
            .repo
            .store()
            .quarantined_hashes()
            .map_err(|e| format!("unable to list the quarantine: {e}"))?;
        let damaged = if q.is_empty() {
            0
        } else {
            idx.data()
                .map(|(_, h)| h)
                .collect::<std::collections::HashSet<_>>()
                .into_iter()
                .filter(|h| q.contains(*h) && !self.repo.store().contains(h))
                .count()
        };
        if damaged > 0 {
            return Err(format!(
                "the parent generation {} references {damaged} damaged or missing chunk(s); reading everything stores them afresh",
                parent.id
            ));
        }
        Ok((parent, idx))
    }

    /// Queue the repository chunks of `off..off+len` for the workers, each chunk's
    /// bytes (its range of the data) made by `make`.
    fn queue(
        &mut self,
        off: u64,
        len: usize,
        make: &mut dyn FnMut(std::ops::Range<usize>) -> ChunkData,
    ) -> Result<()> {
        let Some(info) = &self.info else {
            return Err(crate::err!(
                InvalidInput,
                "unable to store data: backup not begun"
            ));
        };
        let disk_size = info.disk_size;
        let cs = self.repo.chunk_size() as u64;
        if off & (cs - 1) != 0 {
            return Err(crate::err!(
                InvalidInput,
                "unable to store data at offset {off}: not aligned to the repository chunk size {cs}"
            ));
        }
        crate::blockio::check_range(disk_size, off, len as u64, "repository write")?;
        let mut pos = 0usize;
        while pos < len {
            let coff = off + pos as u64;
            let want = (disk_size - coff).min(cs) as usize;
            if pos + want > len {
                return Err(crate::err!(
                    InvalidInput,
                    "unable to store data at offset {coff}: {} bytes is not a whole repository chunk",
                    len - pos
                ));
            }
            let i = coff / cs;
            {
                let mut sh = lock_shared(&self.shared);
                if let Some(e) = &sh.error {
                    return Err(crate::Error::new(e.kind(), e.to_string()));
                }
                // registered before it is queued, so a zero range handed over before
                // the work finishes takes precedence over it
                sh.changes.entry(i).or_insert(Change {
                    seq: 0,
                    hash: ZERO_HASH,
                });
            }
            self.work_seq += 1;
            let tx = self
                .pool
                .as_ref()
                .and_then(|p| p.tx.as_ref())
                .ok_or_else(|| {
                    crate::err!(InvalidInput, "unable to store data: backup not begun")
                })?;
            tx.send(ChunkWork {
                seq: self.work_seq,
                index: i,
                off: coff,
                data: make(pos..pos + want),
            })
            .map_err(|_| crate::err!(Io, "unable to store data: repository workers stopped"))?;
            self.stats.bytes_read += want as u64;
            pos += want;
        }
        Ok(())
    }
}

impl Target for RepoTarget {
    fn reads_file_origin_direct(&self) -> bool {
        // Measured on a quiet machine (BENCHMARKS.md, "O_DIRECT file reads measured
        // again"): one O_DIRECT read at a time, without the page cache's read-ahead, made
        // a repository backup of a file 1.5x slower, so file origins are read buffered.
        false
    }

    fn granule_chunks(&self) -> u32 {
        (self.repo.chunk_size() / self.tracking_chunk).max(1)
    }

    fn prepare(&mut self, relative_to: Option<&str>) -> Scope {
        let (true, Some(rel)) = (self.params.incremental, relative_to) else {
            return Scope::All;
        };
        let parent = self.resolve_parent(rel);
        let expect = if parent.is_ok() {
            Scope::Changed
        } else {
            Scope::All
        };
        self.prepared = Some((rel.to_string(), parent));
        expect
    }

    fn scope(&mut self, cut: Option<&Cut>) -> Result<Scope> {
        let s = if self.params.incremental {
            match self.decide(cut) {
                Ok(s) => s,
                Err(why) => {
                    self.notes.push(format!(
                        "change tracking cannot be trusted ({why}): full read with dedup"
                    ));
                    Scope::All
                }
            }
        } else {
            Scope::All
        };
        self.scope = Some(s.clone());
        Ok(s)
    }

    fn begin(&mut self, info: &SnapshotInfo) -> Result<()> {
        if info.chunk_size != self.tracking_chunk {
            return Err(crate::err!(
                InvalidInput,
                "unable to begin the backup: tracking chunk size {} differs from the {} this target was opened for",
                info.chunk_size,
                self.tracking_chunk
            ));
        }
        let cs = self.repo.chunk_size();
        let n = chunk_count(info.disk_size, cs);
        if let Some((p, idx)) = &self.parent {
            if let Some(l) = &self.cut_lineage {
                if *l != info.lineage {
                    return Err(crate::err!(
                        InvalidInput,
                        "unable to begin the incremental backup: the change log belongs to lineage {l}, the disk has lineage {}",
                        info.lineage
                    ));
                }
            }
            if p.disk_size != info.disk_size || idx.chunk_count() != n {
                return Err(crate::err!(
                    InvalidInput,
                    "unable to begin the incremental backup: the disk is {} bytes, its parent generation {} was {}",
                    info.disk_size,
                    p.id,
                    p.disk_size
                ));
            }
        }
        {
            // the parent's index is not copied: the new one is merged at commit
            let mut sh = lock_shared(&self.shared);
            sh.changes.clear();
            sh.zeroed.clear();
        }
        if self.pool.is_none() {
            self.pool = Some(Pool::start(&self.repo, &self.shared, &self.sync)?);
        }
        if !self.id.is_empty() {
            self.repo.writer_end(&self.id);
        }
        self.id = new_generation_id()?;
        self.repo.writer_begin(&self.id)?;
        self.info = Some(info.clone());
        self.started = Instant::now();
        Ok(())
    }

    fn takes_buffers(&self) -> bool {
        true
    }

    fn write(&mut self, off: u64, data: &[u8]) -> Result<()> {
        self.queue(off, data.len(), &mut |r| ChunkData::Owned(data[r].to_vec()))
    }

    fn write_owned(&mut self, off: u64, data: AlignedBuf, len: usize) -> Result<AlignedBuf> {
        let Some(pool) = &self.pool else {
            return Err(crate::err!(
                InvalidInput,
                "unable to store data: backup not begun"
            ));
        };
        if len > data.len() {
            return Err(crate::err!(
                InvalidInput,
                "unable to store data at offset {off}: {len} bytes asked of a buffer of {}",
                data.len()
            ));
        }
        let free = pool.free_rx.clone();
        let batch = Arc::new(Batch {
            buf: data,
            back: pool.free_tx.clone(),
        });
        self.queue(off, len, &mut |r| ChunkData::Shared(batch.clone(), r))?;
        drop(batch);
        // the next batch's buffer: a free one, once the work of an earlier batch is done
        loop {
            match free.recv_timeout(std::time::Duration::from_millis(100)) {
                Ok(b) => return Ok(b),
                Err(RecvTimeoutError::Disconnected) => return Ok(AlignedBuf::new()),
                Err(RecvTimeoutError::Timeout) => {
                    if let Some(e) = &lock_shared(&self.shared).error {
                        return Err(crate::Error::new(e.kind(), e.to_string()));
                    }
                    let stopped = self
                        .pool
                        .as_ref()
                        .is_none_or(|p| p.workers.iter().all(|w| w.is_finished()));
                    if stopped {
                        return Err(crate::err!(
                            Io,
                            "unable to store data: repository workers stopped"
                        ));
                    }
                }
            }
        }
    }
    fn write_zeroes(&mut self, off: u64, len: u64) -> Result<()> {
        let Some(info) = &self.info else {
            return Err(crate::err!(
                InvalidInput,
                "unable to store zeros: backup not begun"
            ));
        };
        let disk_size = info.disk_size;
        let cs = self.repo.chunk_size() as u64;
        crate::blockio::check_range(disk_size, off, len, "repository zero range")?;
        let end = off + len;
        if off & (cs - 1) != 0 || (end & (cs - 1) != 0 && end != disk_size) {
            return Err(crate::err!(
                InvalidInput,
                "unable to store zeros over {off}..{end}: not whole repository chunks of {cs} bytes"
            ));
        }
        // no work for the pool: the range is recorded whole, and its chunks handed over
        // earlier as data (registered in `changes`) become zeros, taking precedence
        // over work still queued for them (like a later write). O(log) plus the data
        // chunks in the range, whatever its length.
        let (first, last) = (off / cs, end.div_ceil(cs));
        let mut sh = lock_shared(&self.shared);
        if let Some(e) = &sh.error {
            return Err(crate::Error::new(e.kind(), e.to_string()));
        }
        self.work_seq += 1;
        let seq = self.work_seq;
        for (_, c) in sh.changes.range_mut(first..last) {
            *c = Change {
                seq,
                hash: ZERO_HASH,
            };
        }
        add_range(&mut sh.zeroed, first, last);
        sh.chunks_zero += last - first;
        Ok(())
    }

    fn commit(mut self: Box<Self>) -> Result<TargetSummary> {
        let Some(info) = self.info.clone() else {
            return Err(crate::err!(
                InvalidInput,
                "unable to commit: backup not begun"
            ));
        };
        if let Some(mut p) = self.pool.take() {
            p.finish();
        }
        if let Some(e) = lock_shared(&self.shared).error.take() {
            return Err(e);
        }
        publish_pending(&self.shared, &self.sync)?;
        let (changes, zeroed) = {
            let mut sh = lock_shared(&self.shared);
            self.stats.chunks_new = sh.chunks_new;
            self.stats.chunks_reused = sh.chunks_reused;
            self.stats.chunks_zero = sh.chunks_zero;
            self.stats.chunks_healed = sh.chunks_healed;
            self.stats.bytes_stored_new = sh.bytes_stored_new;
            (
                std::mem::take(&mut sh.changes),
                std::mem::take(&mut sh.zeroed),
            )
        };
        if let Some((i, _)) = changes.iter().find(|(_, c)| c.seq == 0) {
            return Err(crate::err!(
                Io,
                "unable to commit: the chunk at offset {} was handed over but never stored",
                i * u64::from(self.repo.chunk_size())
            ));
        }
        // Chunks handed over (as data or zeros); the others come from the parent.
        let written = |i: u64| changes.contains_key(&i) || in_ranges(&zeroed, i);
        self.stats.chunks_written = zeroed.iter().map(|(s, e)| e - s).sum::<u64>()
            + changes.keys().filter(|&&i| !in_ranges(&zeroed, i)).count() as u64;
        // Chunks taken from the parent unread must exist, or this generation could not
        // be restored: refuse to publish it.
        if let Some((p, pidx)) = &self.parent {
            let mut checked = std::collections::HashSet::new();
            let cs = self.repo.chunk_size() as u64;
            // a store that cannot be asked fails the commit with its own error (not a
            // count of "missing" chunks that may all be there)
            let mut lookup = self.repo.store().lookup();
            let mut missing = Vec::new();
            for (i, h) in pidx.data() {
                if written(i) || !checked.insert(*h) {
                    continue;
                }
                let present = lookup.contains(h).map_err(|e| {
                    e.with_context(format!(
                        "unable to commit the incremental backup: unable to check that the chunks it reuses from its parent generation {} are in the repository",
                        p.id
                    ))
                })?;
                if !present {
                    missing.push(i * cs);
                }
            }
            if let Some(first) = missing.first() {
                return Err(crate::err!(
                    Corrupt,
                    "unable to commit the incremental backup: its parent generation {} lacks {} chunk(s) this backup would reuse (first at offset {first}); run cowsnapctl verify --repair, or a full backup",
                    p.id,
                    missing.len()
                ));
            }
        }
        self.repo
            .store()
            .sync_for_commit(&self.sync, changes.values().map(|c| &c.hash))?;
        self.repo.writer_before_publish()?;
        // The parent's data chunks not handed over, merged with the ones handed over
        // (consumed as they go, so the two are not held whole side by side).
        let mut idx = FixedIndex::new(self.id.clone(), self.repo.chunk_size(), info.disk_size);
        let mut from_parent = self
            .parent
            .iter()
            .flat_map(|(_, p)| p.data())
            .filter(|(i, _)| !in_ranges(&zeroed, *i))
            .peekable();
        let mut handed = changes.into_iter().map(|(i, c)| (i, c.hash)).peekable();
        loop {
            let next = match (from_parent.peek(), handed.peek()) {
                // handed over in this backup: the parent's hash is replaced
                (Some(p), Some(c)) if p.0 == c.0 => {
                    from_parent.next();
                    continue;
                }
                (Some(p), Some(c)) if p.0 < c.0 => from_parent.next().map(|(i, h)| (i, *h)),
                (Some(_), None) => from_parent.next().map(|(i, h)| (i, *h)),
                (_, Some(_)) => handed.next(),
                (None, None) => break,
            };
            if let Some((i, h)) = next {
                idx.push(i, h)?;
            }
        }
        drop(from_parent);
        let (idx_bytes, index_hash) = self.repo.publish_index(&idx)?;
        let total = idx.chunk_count();
        self.stats.chunks_total = total;
        self.stats.chunks_from_parent = match self.parent {
            Some(_) => total - self.stats.chunks_written,
            None => 0,
        };
        self.stats.duration_ms = self.started.elapsed().as_millis() as u64;
        if self.stats.chunks_healed > 0 {
            self.notes.push(format!(
                "{} damaged chunk(s) found in the repository were quarantined and stored afresh (older generations referencing them are whole again)",
                self.stats.chunks_healed
            ));
        }
        let g = GenerationInfo {
            id: self.id.clone(),
            disk: self.params.disk_name.clone(),
            disk_size: info.disk_size,
            chunk_size: self.repo.chunk_size(),
            created_unix: info.created_unix,
            created: crate::fsutil::format_utc(info.created_unix.saturating_mul(1000)),
            kind: if self.parent.is_some() {
                GenerationKind::Incremental
            } else {
                GenerationKind::Full
            },
            parent: self.parent.as_ref().map(|(p, _)| p.id.clone()),
            lineage: info.lineage.clone(),
            seq_next: info.seq_next,
            seq_lowest_unacked: info.seq_lowest_unacked,
            stats: self.stats.clone(),
            notes: self.notes.clone(),
            group: self.group.clone(),
            index_hash,
        };
        let meta_bytes = self.repo.write_meta(&g)?;
        self.repo.writer_after_publish(&self.id)?;
        // Object stores: where the parent's index came from, what the store served.
        let repo_io = self.repo.remote().map(|_| {
            let mut io = self.repo.io();
            if self.parent.is_some() {
                io.parent_index = if io.index_cache_hits > 0 {
                    "cache"
                } else {
                    "store"
                }
                .into();
            }
            io
        });
        Ok(TargetSummary {
            generation: Some(self.id.clone()),
            bytes_stored: self.stats.bytes_stored_new + idx_bytes + meta_bytes,
            notes: self.notes.clone(),
            repo_io,
        })
    }

    fn annotate(&mut self, group: Option<&GroupRef>, notes: &[String]) {
        if let Some(g) = group {
            self.group = Some(g.clone());
        }
        self.notes.extend(notes.iter().cloned());
    }

    fn abort(mut self: Box<Self>, why: &str) {
        if let Some(mut p) = self.pool.take() {
            p.finish();
        }
        // unpublished chunks are removed while the lock is held
        lock_shared(&self.shared).pending.clear();
        log::warn!(
            "backup of {} into {} aborted: {why}; no generation published",
            self.params.disk_name,
            self.repo.dir().display()
        );
    }
}

impl Drop for RepoTarget {
    fn drop(&mut self) {
        // Join the workers and remove unpublished chunks while the repository lock is
        // still held.
        if let Some(mut p) = self.pool.take() {
            p.finish();
        }
        lock_shared(&self.shared).pending.clear();
        if !self.id.is_empty() {
            self.repo.writer_end(&self.id);
        }
    }
}
