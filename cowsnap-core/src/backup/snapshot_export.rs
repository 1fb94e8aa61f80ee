//! A snapshot served read-only instead of drained (pull mode): another host reads the
//! point-in-time image over NBD while the disk stays in use, then the snapshot is
//! released.
//!
//! Design notes
//! - Same engine as a backup: the container is opened and checked first, then the
//!   quiesce step and the instant under the exclusive gate (`begin_generation` cut,
//!   `ChunkMap::new` with every chunk pending, `install`), then the known zeros: the
//!   holes of a sparse origin (`scope::holes`), which read as zeros on the disk too.
//! - Not the filesystem's free space (unlike a full backup): the image must be the
//!   disk's bytes, so that a previous copy plus the dirty extents equals the next copy.
//!   A block freed since the last pull is not written, so it is not in the dirty
//!   bitmap; had the first image shown it as zeros and the second as the old data (or
//!   the other way round), the increment would miss it. Holes have no such problem: a
//!   hole stops being one only by a write (or a trim), which the change log records.
//!   No drainer runs: every chunk stays pending or preserved until the release, so
//!   [`Snapshot::read_view`] serves every byte of the instant.
//! - Reads: `read_view`, then a check that the snapshot has not failed. A writer
//!   passes through a failed snapshot only after it saw the failure, so a read that
//!   finished before the failure was visible read the instant's data; a read that
//!   sees it is answered with an error, never with data of another instant.
//! - The container fills with every first write to a chunk (nothing drains it). Writers
//!   are throttled above the high watermark as in a backup. When it is full and a writer
//!   waits for a slot, the snapshot fails ("container full"): the writer goes on to the
//!   origin (never a failed origin write), the export answers every read with EIO and
//!   the status says why; the disk goes on. `release` then ends it as usual.
//! - Dirty bitmap: the cut taken at the instant holds the chunks changed since the
//!   generation the change log is relative to (`Cut::relative_to`); that name is the
//!   only one offered, as `qemu:dirty-bitmap:NAME`. Without trusted tracking there is
//!   none. Bits are per change-log chunk; a set bit means "changed" (QEMU's value 1).
//! - Release: without `commit` the cut is merged back (`abort_generation`); with it the
//!   cut is committed under a new pull generation id (`pull-…`), to which the next
//!   snapshot's dirty bitmap is relative. A commit is refused (nothing changes) when
//!   the snapshot failed or there is no cut. Then the snapshot is ended (waiters
//!   released), uninstalled and dropped, which releases the container.
//! - A snapshot export and a backup share the disk's job slot ([`super::Backups`]).

use super::job::Job;
use super::quiesce::quiesce;
use super::{BackupParams, BackupState, BackupStatus};
use crate::changelog::Cut;
use crate::chunk_map::{ChunkMap, Geometry};
use crate::container;
use crate::engine::Engine;
use crate::error::Result;
use crate::export::{DirtyExtent, Export, ExportCaps, Extent, ZeroFlags};
use crate::snapshot::Snapshot;
use bitvec::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How often the watcher looks for writers waiting on a full container.
const WATCH_EVERY: Duration = Duration::from_millis(10);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What `cowsnapctl snapshot` asks for.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SnapshotParams {
    /// Export name; `None` = `NAME@snap`.
    #[serde(default)]
    pub export: Option<String>,
    /// Container spec; `None` = the disk's default.
    #[serde(default)]
    pub container: Option<String>,
    /// Wait for this long without writes before the instant (0 = don't wait).
    #[serde(default)]
    pub quiesce_idle_ms: u64,
    /// Give up waiting for an idle window after this long (0 = 80 s).
    #[serde(default)]
    pub quiesce_timeout_ms: u64,
}

/// Figures of a snapshot export (`status`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SnapshotStatus {
    /// The NBD export name.
    pub export: String,
    /// NBD URI on the disk's unix socket (filled in by the daemon).
    #[serde(default)]
    pub uri: String,
    /// NBD URIs on the daemon's TCP listeners (`--listen`; filled in by the daemon).
    #[serde(default)]
    pub tcp_uris: Vec<String>,
    /// `serving` or `failed`.
    pub state: String,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// Unix time (s) of the instant.
    pub instant_unix: u64,
    /// Seconds since the instant.
    pub age_s: u64,
    /// The dirty bitmap served (`qemu:dirty-bitmap:NAME`), if any.
    #[serde(default)]
    pub dirty_bitmap: Option<String>,
    /// Chunks the dirty bitmap marks changed.
    #[serde(default)]
    pub dirty_chunks: u64,
    /// Change-log chunk size (the dirty bitmap's granularity), bytes.
    #[serde(default)]
    pub dirty_chunk_size: u32,
    /// The job's figures (container use, holds, throttling, known zeros, notes).
    pub figures: BackupStatus,
}

/// What `release` did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Released {
    /// The export that was removed.
    pub export: String,
    /// The pull generation committed (with `--commit`).
    pub generation: Option<String>,
    /// Seconds the snapshot was held.
    pub age_s: u64,
}

/// A snapshot of the disk served read-only.
pub struct SnapshotExport {
    engine: Arc<Engine>,
    snap: Mutex<Option<Arc<Snapshot>>>,
    job: Arc<Job>,
    cut: Mutex<Option<Cut>>,
    /// Dirty bitmap: its name, bits and granularity.
    dirty: Option<(String, BitVec<u64, Lsb0>, u32)>,
    name: String,
    instant_unix: u64,
    geo: Geometry,
    releasing: AtomicBool,
    watch_stop: Arc<AtomicBool>,
    watch: Mutex<Option<JoinHandle<()>>>,
}

impl SnapshotExport {
    /// Take the snapshot (container, quiesce, instant, known zeros) and start the
    /// full-container watcher. `export` is the NBD name it will be served under.
    pub(super) fn start(
        engine: &Arc<Engine>,
        job: Arc<Job>,
        export: String,
        p: &SnapshotParams,
        mut barrier: Option<&mut dyn super::group::InstantBarrier>,
    ) -> Result<Arc<Self>> {
        let cfg = engine.config();
        let geo = Geometry::new(engine.size(), cfg.chunk_size)?;
        let container = container::open_for_disk(
            p.container.as_deref(),
            cfg.default_container.as_deref(),
            geo.chunk_size,
        )?;
        let map = ChunkMap::new(geo, 1, None);
        let bp = BackupParams {
            quiesce_idle_ms: p.quiesce_idle_ms,
            quiesce_timeout_ms: p.quiesce_timeout_ms,
            ..Default::default()
        };
        if let Some(b) = barrier.as_mut() {
            b.prepared()?;
        }
        let gate = quiesce(engine, &job, &bp)?;
        if let Some(b) = barrier.as_mut() {
            // the other disks of the group pause too; nothing has changed yet
            b.paused()?;
        }
        // ---- the instant: no data-changing request is in flight ----
        let cut = match engine.changelog() {
            Some(cl) => match cl.begin_generation() {
                Ok(c) => Some(c),
                Err(e) => {
                    job.note(format!(
                        "change tracking unavailable ({e}): no dirty bitmap"
                    ));
                    None
                }
            },
            None => None,
        };
        let snap = Arc::new(Snapshot::new(map, container, cfg.throttle));
        gate.install(snap.clone());
        // ---- writers run again ----
        let instant_unix = now_unix();
        job.run(snap.clone());
        job.update(|st| st.instant_unix = instant_unix);
        let dirty = match (&cut, engine.changelog()) {
            (Some(c), Some(cl)) => match &c.relative_to {
                Some(g) => Some((g.clone(), c.changed.clone(), cl.chunk_size())),
                None => {
                    job.note(
                        "change tracking is not trusted (no committed generation): \
                         no dirty bitmap"
                            .into(),
                    );
                    None
                }
            },
            _ => None,
        };
        // Holes of the origin only, not the filesystem's free space: see the notes.
        match super::scope::holes(&**engine.origin(), &snap) {
            Ok(bytes) => {
                snap.stats
                    .excluded_holes
                    .fetch_add(bytes, Ordering::Relaxed);
            }
            Err(e) => job.note(format!(
                "holes of the origin not known ({e}): reported as data"
            )),
        }
        let watch_stop = Arc::new(AtomicBool::new(false));
        let me = Arc::new(SnapshotExport {
            engine: engine.clone(),
            snap: Mutex::new(Some(snap.clone())),
            job,
            cut: Mutex::new(cut),
            dirty,
            name: export,
            instant_unix,
            geo,
            releasing: AtomicBool::new(false),
            watch_stop: watch_stop.clone(),
            watch: Mutex::new(None),
        });
        let spawned = std::thread::Builder::new()
            .name("cowsnap-snapwatch".into())
            .spawn(move || watch_full(&snap, &watch_stop));
        match spawned {
            Ok(h) => *lock(&me.watch) = Some(h),
            Err(e) => {
                let e = crate::error::Error::io("unable to start the snapshot's watcher", e);
                let _ = me.release(false);
                return Err(e);
            }
        }
        Ok(me)
    }

    /// The NBD export name.
    pub fn export_name(&self) -> &str {
        &self.name
    }

    fn snapshot(&self) -> Result<Arc<Snapshot>> {
        lock(&self.snap).clone().ok_or_else(|| {
            crate::err!(
                Canceled,
                "unable to read the snapshot {:?}: it was released",
                self.name
            )
        })
    }

    /// The status figures.
    pub fn status(&self) -> SnapshotStatus {
        let mut figures = self.job.status();
        let snap = lock(&self.snap).clone();
        let failure = snap.and_then(|s| s.failure());
        if let Some(why) = &failure {
            figures.state = BackupState::Failed;
            figures.error.get_or_insert_with(|| why.clone());
        }
        SnapshotStatus {
            export: self.name.clone(),
            uri: String::new(),
            tcp_uris: Vec::new(),
            state: if failure.is_some() {
                "failed"
            } else {
                "serving"
            }
            .into(),
            error: failure,
            instant_unix: self.instant_unix,
            age_s: now_unix().saturating_sub(self.instant_unix),
            dirty_bitmap: self.dirty.as_ref().map(|d| d.0.clone()),
            dirty_chunks: self.dirty.as_ref().map_or(0, |d| d.1.count_ones() as u64),
            dirty_chunk_size: self.dirty.as_ref().map_or(0, |d| d.2),
            figures,
        }
    }

    /// End the snapshot: commit the cut to a new pull generation (`commit`) or merge it
    /// back, end and uninstall the snapshot, drop the container. A commit that cannot
    /// be honoured is refused before anything changes.
    pub(super) fn release(&self, commit: bool) -> Result<Released> {
        if commit {
            self.check_commit()?;
        }
        if self.releasing.swap(true, Ordering::SeqCst) {
            return Err(crate::err!(
                Busy,
                "unable to release snapshot {:?}: it is being released",
                self.name
            ));
        }
        self.watch_stop.store(true, Ordering::SeqCst);
        if let Some(h) = lock(&self.watch).take() {
            let _ = h.join();
        }
        let mut generation = None;
        let mut commit_err = None;
        let cut = lock(&self.cut).take();
        if let (Some(cl), Some(cut)) = (self.engine.changelog(), cut) {
            if commit {
                let id = pull_generation_id();
                match cl.commit_generation(&cut, &id) {
                    Ok(()) => generation = Some(id),
                    Err(e) => {
                        let _ = cl.abort_generation(&cut);
                        commit_err = Some(e);
                    }
                }
            } else if let Err(e) = cl.abort_generation(&cut) {
                log::warn!("{e}");
            }
        }
        let snap = lock(&self.snap).take();
        if let Some(snap) = snap {
            // waiters pass through from now on; then the engine forgets it
            snap.end("snapshot released");
            self.engine.uninstall(&snap);
            self.job.settle(&snap);
        }
        if let Some(e) = commit_err {
            return Err(e.with_context(format!(
                "snapshot {:?} was released, but its change-log cut could not be committed \
                 (tracking is kept: the next dirty bitmap covers these changes too)",
                self.name
            )));
        }
        Ok(Released {
            export: self.name.clone(),
            generation,
            age_s: now_unix().saturating_sub(self.instant_unix),
        })
    }

    /// Refuse a commit that cannot be honoured: the snapshot failed (a copy of it is
    /// not complete) or there is no change-log cut.
    fn check_commit(&self) -> Result<()> {
        let snap = self.snapshot()?;
        if let Some(why) = snap.failure() {
            return Err(crate::err!(
                InvalidInput,
                "unable to commit snapshot {:?}: it failed ({why}), so a copy of it \
                 is not complete; release it without --commit",
                self.name
            ));
        }
        if lock(&self.cut).is_none() {
            return Err(crate::err!(
                Unsupported,
                "unable to commit snapshot {:?}: the disk has no change tracking \
                 for it; release it without --commit",
                self.name
            ));
        }
        Ok(())
    }

    fn failed_err(&self, why: String) -> crate::error::Error {
        crate::err!(
            Io,
            "unable to read snapshot {:?}: it failed ({why})",
            self.name
        )
    }
}

/// A pull generation id: `pull-<unix seconds>-<8 hex digits>`, unique per disk.
fn pull_generation_id() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let salt = d.subsec_nanos() ^ std::process::id().rotate_left(16);
    format!("pull-{}-{salt:08x}", d.as_secs())
}

/// Fail the snapshot as soon as a writer waits for a slot of a full container: nothing
/// drains it, so the wait would never end.
fn watch_full(snap: &Snapshot, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) && !snap.is_failed() {
        if snap.slots.waiters() > 0 && snap.slots.used() >= snap.slots.total() {
            snap.fail(format!(
                "the container is full ({} chunks preserved, {}); writers go on \
                 unpreserved — release the snapshot, and take it again with a larger \
                 --container",
                snap.slots.total(),
                snap.container.describe()
            ));
            return;
        }
        std::thread::sleep(WATCH_EVERY);
    }
}

impl Export for SnapshotExport {
    fn size(&self) -> u64 {
        self.geo.disk_size
    }

    fn caps(&self) -> ExportCaps {
        ExportCaps::READ_ONLY_IMAGE
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let snap = self.snapshot()?;
        if let Some(why) = snap.failure() {
            return Err(self.failed_err(why));
        }
        snap.read_view(&**self.engine.origin(), buf, off)?;
        // after the read: see the module notes
        if let Some(why) = snap.failure() {
            return Err(self.failed_err(why));
        }
        Ok(())
    }

    fn write(&self, _off: u64, _data: &[u8], _fua: bool) -> Result<()> {
        Err(crate::err!(
            ReadOnly,
            "unable to write: the snapshot is read-only"
        ))
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn trim(&self, _off: u64, _len: u64, _fua: bool) -> Result<()> {
        Err(crate::err!(
            ReadOnly,
            "unable to trim: the snapshot is read-only"
        ))
    }

    fn zero(&self, _off: u64, _len: u64, _flags: ZeroFlags) -> Result<()> {
        Err(crate::err!(
            ReadOnly,
            "unable to zero: the snapshot is read-only"
        ))
    }

    /// Known zeros (holes of the origin at the instant) are holes that read as zeros;
    /// everything else is data.
    fn block_status(&self, off: u64, len: u64) -> Result<Vec<Extent>> {
        let snap = self.snapshot()?;
        crate::blockio::check_range(self.geo.disk_size, off, len, "block status")?;
        let mut out: Vec<Extent> = Vec::new();
        let end = off + len;
        for c in self.geo.chunks_of(off, len) {
            let a = self.geo.chunk_off(c).max(off);
            let b = self.geo.end_off(c + 1).min(end);
            let zero = snap.map.state_and_zero(c).1;
            match out.last_mut() {
                Some(e) if e.zero == zero => e.len += b - a,
                _ => out.push(Extent {
                    len: b - a,
                    hole: zero,
                    zero,
                }),
            }
        }
        Ok(out)
    }

    fn dirty_bitmap(&self) -> Option<String> {
        self.dirty.as_ref().map(|d| d.0.clone())
    }

    fn dirty_status(&self, off: u64, len: u64) -> Result<Vec<DirtyExtent>> {
        let Some((_, bits, cs)) = &self.dirty else {
            return Err(crate::err!(
                Unsupported,
                "unable to report dirty blocks: snapshot {:?} has no dirty bitmap",
                self.name
            ));
        };
        crate::blockio::check_range(self.geo.disk_size, off, len, "dirty status")?;
        let cs = u64::from(*cs);
        let end = off + len;
        let mut out: Vec<DirtyExtent> = Vec::new();
        let mut at = off;
        while at < end {
            let i = at / cs;
            let b = ((i + 1) * cs).min(end);
            // a bit past the bitmap (cannot happen: sizes agree) counts as changed
            let dirty = bits.get(i as usize).is_none_or(|x| *x);
            match out.last_mut() {
                Some(e) if e.dirty == dirty => e.len += b - at,
                _ => out.push(DirtyExtent { len: b - at, dirty }),
            }
            at = b;
        }
        Ok(out)
    }
}

impl Drop for SnapshotExport {
    fn drop(&mut self) {
        self.watch_stop.store(true, Ordering::SeqCst);
    }
}

/// The snapshot-export part of the job slot.
pub(super) enum Slot {
    /// None.
    Empty,
    /// Being taken (quiescing).
    Starting,
    /// Served.
    Serving(Arc<SnapshotExport>),
}

impl Slot {
    /// What holds the slot, for a "busy" error.
    pub(super) fn busy(&self) -> Option<String> {
        match self {
            Slot::Empty => None,
            Slot::Starting => Some("a snapshot export is being taken".into()),
            Slot::Serving(s) => Some(format!("snapshot {:?} is exported", s.name)),
        }
    }
}

impl super::Backups {
    /// Take a snapshot to serve as `export` (the job slot must be free). Returns after
    /// the instant and the known-zeros scan; the caller publishes the export.
    pub fn start_snapshot(&self, export: &str, p: &SnapshotParams) -> Result<Arc<SnapshotExport>> {
        self.start_snapshot_coordinated(export, p, None)
    }

    /// [`Self::start_snapshot`] as a member of a consistency group: `barrier` is met
    /// once the container is open and again once writes are paused (see `group.rs`).
    pub fn start_snapshot_coordinated(
        &self,
        export: &str,
        p: &SnapshotParams,
        barrier: Option<&mut dyn super::group::InstantBarrier>,
    ) -> Result<Arc<SnapshotExport>> {
        let name = self.engine.config().name.clone();
        let job = {
            let cur = lock(&self.cur);
            if let Some(j) = cur.as_ref() {
                if !j.state().is_finished() {
                    return Err(crate::err!(
                        Busy,
                        "unable to take a snapshot of {name:?}: backup {} is running \
                         (one backup or snapshot at a time)",
                        j.id()
                    ));
                }
            }
            let mut slot = lock(&self.snapshot);
            if let Some(what) = slot.busy() {
                return Err(crate::err!(
                    Busy,
                    "unable to take a snapshot of {name:?}: {what}"
                ));
            }
            *slot = Slot::Starting;
            Arc::new(Job::new(BackupStatus {
                state: BackupState::Quiescing,
                target: format!("nbd:{export}"),
                disk_size: self.engine.size(),
                chunk_size: self.engine.config().chunk_size,
                ..Default::default()
            }))
        };
        match SnapshotExport::start(&self.engine, job, export.to_string(), p, barrier) {
            Ok(s) => {
                *lock(&self.snapshot) = Slot::Serving(s.clone());
                log::info!("snapshot {export:?} taken");
                Ok(s)
            }
            Err(e) => {
                *lock(&self.snapshot) = Slot::Empty;
                Err(e.with_context(format!("unable to take a snapshot of {name:?}")))
            }
        }
    }

    /// The served snapshot export, if any.
    pub fn snapshot_export(&self) -> Option<Arc<SnapshotExport>> {
        match &*lock(&self.snapshot) {
            Slot::Serving(s) => Some(s.clone()),
            _ => None,
        }
    }

    /// End the served snapshot export (see [`SnapshotExport`]'s notes). The caller has
    /// removed it from the NBD server first. A refused commit changes nothing.
    pub fn release_snapshot(&self, commit: bool) -> Result<Released> {
        let name = &self.engine.config().name;
        let Some(s) = self.snapshot_export() else {
            return Err(crate::err!(
                NotFound,
                "unable to release a snapshot of {name:?}: no snapshot is exported"
            ));
        };
        let r = s.release(commit);
        // a refused commit leaves it served; anything else ended it
        if s.releasing.load(Ordering::SeqCst) {
            let mut slot = lock(&self.snapshot);
            if matches!(&*slot, Slot::Serving(x) if Arc::ptr_eq(x, &s)) {
                *slot = Slot::Empty;
            }
        }
        if let Ok(rel) = &r {
            log::info!(
                "snapshot {:?} released after {} s{}",
                rel.export,
                rel.age_s,
                rel.generation
                    .as_ref()
                    .map(|g| format!(", committed as {g}"))
                    .unwrap_or_default()
            );
        }
        r
    }

    /// Whether a refused commit would refuse (for the daemon: check before removing
    /// the export, so a refused `release --commit` changes nothing).
    pub fn check_release(&self, commit: bool) -> Result<()> {
        let name = &self.engine.config().name;
        let Some(s) = self.snapshot_export() else {
            return Err(crate::err!(
                NotFound,
                "unable to release a snapshot of {name:?}: no snapshot is exported"
            ));
        };
        if commit {
            s.check_commit()?;
        }
        Ok(())
    }
}
