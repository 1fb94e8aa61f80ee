//! Backup jobs: parse the target and container specs, quiesce, take the snapshot at
//! one instant, run the drainer on its own thread, commit or abort the target.
//!
//! Design notes
//! - One backup at a time per disk: a second `start_backup` while one is quiescing or
//!   running fails with `Busy`.
//! - Order of `start_backup`: open the target (`file:` writes its `.incomplete` marker
//!   first) and the container, so bad specs fail before anything waits; quiesce (wait
//!   for `quiesce_idle_ms` without data-changing requests, re-checked under the gate;
//!   fail cleanly after `quiesce_timeout_ms`, default 80 s when 0); then the *instant*,
//!   under the exclusive gate: `changelog.begin_generation()` (an error means "no cut"
//!   plus a note; skipped for targets that do not use it, `Target::uses_change_log`),
//!   `target.scope(cut)`, build the chunk map, install the snapshot.
//!   Then `target.begin`, the priority ranges, and the drainer thread. It returns
//!   right after the instant with the job id.
//! - End: success → `target.commit()`; then, when the target reports a generation, the
//!   change log's `commit_generation(cut, generation)`; a target without generations
//!   keeps the change bits (`abort_generation`) so the next repository backup still
//!   sees every change (raw images take no cut at all, see `Target::uses_change_log`). Failure → the snapshot is dropped (writers
//!   released), `abort_generation`, `target.abort(why)`. Either way the snapshot is
//!   uninstalled and the container released (a `file:` container is removed).
//! - Target specs: `file:PATH`, `dev:PATH` ([`crate::target::raw`]); `repo:DIR` is
//!   wired here (see [`open_target`]).

use crate::changelog::Cut;
use crate::chunk_map::{ChunkMap, Geometry};
use crate::container::{self, Container, DEFAULT_CONTAINER};
use crate::drain::Drainer;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::export::Export;
use crate::snapshot::Snapshot;
use crate::target::raw::RawImage;
use crate::target::{Scope, SnapshotInfo, Target};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLockWriteGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Quiesce timeout when the params say 0.
pub const DEFAULT_QUIESCE_TIMEOUT_MS: u64 = 80_000;

/// What `cowsnapctl backup` asks for.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BackupParams {
    /// `file:PATH`, `dev:PATH` or `repo:DIR`.
    pub to: String,
    /// Container spec (`ram:SIZE`, `file:PATH:SIZE`, `dev:PATH`); `None` = the disk's default.
    pub container: Option<String>,
    /// Incremental (repository targets only).
    #[serde(default)]
    pub incremental: bool,
    /// Priority ranges (offset, length) in bytes.
    #[serde(default)]
    pub priority: Vec<(u64, u64)>,
    /// Read-side rate limit in bytes per second.
    pub rate_limit: Option<u64>,
    /// Wait for this long without writes before the snapshot (0 = don't wait).
    #[serde(default)]
    pub quiesce_idle_ms: u64,
    /// Give up waiting for an idle window after this long (0 = 80 s).
    #[serde(default)]
    pub quiesce_timeout_ms: u64,
}

/// Figures of the running (or last) backup.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BackupStatus {
    /// Job id, counting from 1 per daemon.
    pub id: u64,
    /// "quiescing", "running", "complete" or "failed".
    pub state: String,
    /// Why it failed.
    pub error: Option<String>,
    /// The target spec.
    pub target: String,
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Tracking chunk size in bytes.
    pub chunk_size: u32,
    /// Chunks the backup must copy.
    pub chunks_in_scope: u64,
    /// Chunks copied to the target.
    pub chunks_copied: u64,
    /// Chunks whose originals went through the container.
    pub chunks_preserved: u64,
    /// Bytes handed to the target.
    pub bytes_copied: u64,
    /// Container capacity in slots.
    pub container_slots: u64,
    /// Slots in use now.
    pub container_used: u64,
    /// Most slots in use at once.
    pub container_high_water: u64,
    /// Writes held while their chunk was preserved.
    pub holds: u64,
    /// Total time writes were held, ms.
    pub hold_time_ms: u64,
    /// Writes slowed by the throttle.
    pub throttled_writes: u64,
    /// Total throttle delay, ms.
    pub throttle_delay_ms: u64,
    /// Time since the snapshot instant, ms.
    pub elapsed_ms: u64,
    /// Generation id for repository targets.
    pub generation: Option<String>,
    /// Notes for the user.
    pub notes: Vec<String>,
    /// The container in use (`ram:67108864`, `file:/x:1073741824`, ...).
    #[serde(default)]
    pub container: String,
    /// Memory held by the chunk map's bit planes, bytes.
    #[serde(default)]
    pub bitmap_bytes: u64,
    /// Bytes the target reported as stored (after commit).
    #[serde(default)]
    pub bytes_stored: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The engine's current or last job.
#[derive(Default)]
pub(crate) struct JobSlot {
    cur: Mutex<Option<Arc<Job>>>,
    seq: AtomicU64,
}

pub(crate) struct Job {
    status: Mutex<BackupStatus>,
    snap: Mutex<Option<Arc<Snapshot>>>,
    cancel: AtomicBool,
}

impl Job {
    fn finished(&self) -> bool {
        let st = lock(&self.status);
        st.state == "complete" || st.state == "failed"
    }

    fn snapshot(&self) -> Option<Arc<Snapshot>> {
        lock(&self.snap).clone()
    }

    fn note(&self, n: String) {
        lock(&self.status).notes.push(n);
    }

    fn fail(&self, why: String) {
        let mut st = lock(&self.status);
        st.state = "failed".into();
        st.error.get_or_insert(why);
    }

    fn status(&self) -> BackupStatus {
        let mut st = lock(&self.status).clone();
        if let Some(s) = self.snapshot() {
            fill_figures(&mut st, &s);
        }
        st
    }

    /// Copy the final figures and let go of the snapshot (and its container).
    fn freeze(&self, snap: &Snapshot) {
        let mut st = lock(&self.status);
        fill_figures(&mut st, snap);
        *lock(&self.snap) = None;
    }
}

fn fill_figures(st: &mut BackupStatus, s: &Snapshot) {
    let ms = |ns: u64| ns / 1_000_000;
    st.chunks_in_scope = s.map.in_scope();
    st.chunks_copied = s.stats.copied.load(Ordering::Relaxed);
    st.chunks_preserved = s.stats.preserved.load(Ordering::Relaxed);
    st.bytes_copied = s.stats.bytes_copied.load(Ordering::Relaxed);
    st.container_slots = s.slots.total();
    st.container_used = s.slots.used();
    st.container_high_water = s.slots.high_water();
    st.holds = s.stats.holds.load(Ordering::Relaxed);
    st.hold_time_ms = ms(s.stats.hold_ns.load(Ordering::Relaxed));
    st.throttled_writes = s.stats.throttled.load(Ordering::Relaxed);
    st.throttle_delay_ms = ms(s.stats.throttle_ns.load(Ordering::Relaxed));
    st.elapsed_ms = s.started.elapsed().as_millis() as u64;
    st.container = s.container.describe();
    st.bitmap_bytes = s.map.bitmap_bytes();
}

/// Open a backup target from its spec for the disk `disk_name` of `geo`.
/// `incremental` is only meaningful for repository targets.
pub fn open_target(
    spec: &str,
    geo: &Geometry,
    disk_name: &str,
    incremental: bool,
) -> Result<Box<dyn Target>> {
    let bad = |why: &str| {
        crate::err!(
            InvalidInput,
            "unable to open target {spec:?}: {why} (expected file:PATH, dev:PATH or repo:DIR)"
        )
    };
    let (kind, rest) = spec.split_once(':').ok_or_else(|| bad("no kind"))?;
    if rest.is_empty() {
        return Err(bad("empty path"));
    }
    if incremental && kind != "repo" {
        return Err(crate::err!(
            InvalidInput,
            "unable to open target {spec:?}: --incremental needs a repository target (repo:DIR)"
        ));
    }
    match kind {
        "file" => Ok(Box::new(RawImage::create_file(
            rest.as_ref(),
            geo.disk_size,
            geo.chunk_size,
        )?)),
        "dev" => Ok(Box::new(RawImage::open_device(
            rest.as_ref(),
            geo.disk_size,
            geo.chunk_size,
        )?)),
        "repo" => crate::repo::open_target_with(
            rest.as_ref(),
            crate::repo::RepoTargetParams {
                disk_name: disk_name.to_string(),
                incremental,
            },
            geo.chunk_size,
        ),
        _ => Err(bad("unknown kind")),
    }
}

/// The drainer is background work: give the CPU to the disk's users first (nice +10
/// for this thread only). Failure is harmless and ignored.
fn lower_thread_priority() {
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    // SAFETY: setpriority with integer arguments only; on Linux PRIO_PROCESS with a
    // thread id changes that thread's nice value.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10) };
    if r != 0 {
        log::debug!(
            "unable to lower the drainer's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Engine {
    /// Start a backup: returns after the snapshot instant, with the job id.
    pub fn start_backup(self: &Arc<Self>, p: BackupParams) -> Result<u64> {
        self.start_backup_with(p, None, None)
    }

    /// [`Self::start_backup`] with an already opened target and/or container instead of
    /// the ones `p.to` / `p.container` name (`p.to` is then only shown in the status).
    /// For targets built elsewhere (the repository) and for tests.
    pub fn start_backup_with(
        self: &Arc<Self>,
        p: BackupParams,
        target: Option<Box<dyn Target>>,
        container: Option<Box<dyn Container>>,
    ) -> Result<u64> {
        let job = {
            let mut cur = lock(&self.jobs.cur);
            if let Some(j) = cur.as_ref() {
                if !j.finished() {
                    let id = lock(&j.status).id;
                    return Err(crate::err!(
                        Busy,
                        "unable to start a backup of {:?}: backup {id} is still running",
                        self.config().name
                    ));
                }
            }
            let id = self.jobs.seq.fetch_add(1, Ordering::SeqCst) + 1;
            let job = Arc::new(Job {
                status: Mutex::new(BackupStatus {
                    id,
                    state: "quiescing".into(),
                    target: p.to.clone(),
                    disk_size: self.size(),
                    chunk_size: self.config().chunk_size,
                    ..Default::default()
                }),
                snap: Mutex::new(None),
                cancel: AtomicBool::new(false),
            });
            *cur = Some(job.clone());
            job
        };
        match self.start_inner(&job, p, target, container) {
            Ok(()) => Ok(lock(&job.status).id),
            Err(e) => {
                job.fail(e.to_string());
                Err(e)
            }
        }
    }

    fn start_inner(
        self: &Arc<Self>,
        job: &Arc<Job>,
        p: BackupParams,
        target: Option<Box<dyn Target>>,
        container: Option<Box<dyn Container>>,
    ) -> Result<()> {
        let geo = Geometry::new(self.size(), self.config().chunk_size)?;
        let container = match container {
            Some(c) => c,
            None => {
                let cspec = p
                    .container
                    .clone()
                    .or_else(|| self.config().default_container.clone())
                    .unwrap_or_else(|| DEFAULT_CONTAINER.to_string());
                container::open(&cspec, geo.chunk_size)?
            }
        };
        if container.slot_size() != geo.chunk_size {
            return Err(crate::err!(
                InvalidInput,
                "unable to use container {}: {}-byte slots for {}-byte chunks",
                container.describe(),
                container.slot_size(),
                geo.chunk_size
            ));
        }
        let mut target = match target {
            Some(t) => t,
            None => open_target(&p.to, &geo, &self.config().name, p.incremental)?,
        };
        let gate = match self.quiesce(job, &p) {
            Ok(g) => g,
            Err(e) => {
                target.abort(&e.to_string());
                return Err(e);
            }
        };
        // ---- the snapshot instant: no data-changing request is in flight ----
        let mut gate = gate;
        let cut: Option<Cut> = match &self.changelog {
            Some(cl) if target.uses_change_log() => match cl.begin_generation() {
                Ok(c) => Some(c),
                Err(e) => {
                    job.note(format!("change tracking unavailable ({e}): full backup"));
                    None
                }
            },
            _ => None,
        };
        let scope = match target.scope(cut.as_ref()) {
            Ok(s) => s,
            Err(e) => {
                drop(gate);
                self.end_generation(job, cut.as_ref(), None);
                let e = e.with_context("unable to start the backup");
                target.abort(&e.to_string());
                return Err(e);
            }
        };
        let granule = u64::from(target.granule_chunks().max(1));
        if !granule.is_power_of_two() {
            drop(gate);
            self.end_generation(job, cut.as_ref(), None);
            let e = crate::err!(
                InvalidInput,
                "unable to start the backup: target granule {granule} is not a power of two"
            );
            target.abort(&e.to_string());
            return Err(e);
        }
        let bits = match (&scope, &cut) {
            (Scope::All, _) => None,
            (Scope::Changed, Some(c)) => Some(&c.changed[..]),
            (Scope::Changed, None) => {
                job.note("no change set available: every chunk is read".into());
                None
            }
        };
        let map = ChunkMap::new(geo, granule, bits);
        let snap = Arc::new(Snapshot::new(map, container, self.config().throttle));
        *gate = Some(snap.clone());
        let created_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        drop(gate);
        // ---- writers run again; pending chunks are now preserved before changing ----
        *lock(&job.snap) = Some(snap.clone());
        lock(&job.status).state = "running".into();
        // a cancel that raced with the instant (it saw no snapshot yet)
        if job.cancel.load(Ordering::SeqCst) {
            snap.fail("backup canceled");
        }
        // A repository target that falls back to a full read says why in its own note.
        if p.incremental && matches!(scope, Scope::All) && !p.to.starts_with("repo:") {
            job.note("this target takes full backups only: incremental ignored".into());
        }
        let info = SnapshotInfo {
            disk: self.config().name.clone(),
            disk_size: geo.disk_size,
            chunk_size: geo.chunk_size,
            created_unix,
            lineage: self
                .changelog
                .as_ref()
                .map(|c| c.lineage().to_string())
                .unwrap_or_default(),
            seq_next: cut.as_ref().map_or(0, |c| c.seq_next),
            seq_lowest_unacked: cut.as_ref().map_or(0, |c| c.seq_lowest_unacked),
        };
        if let Err(e) = target.begin(&info) {
            let e = e.with_context("unable to start the backup");
            snap.fail(e.to_string());
            self.finish(job, &snap, Err(e.to_string()), target, cut);
            return Err(e);
        }
        snap.add_priority(&p.priority);
        let engine = self.clone();
        let job2 = job.clone();
        let snap2 = snap.clone();
        let rate = p.rate_limit;
        let spawned = std::thread::Builder::new()
            .name("cowsnap-drain".into())
            .spawn(move || {
                lower_thread_priority();
                // a panic in the drainer must not leave writers held: it fails the
                // snapshot like any other drain error
                let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    Drainer::new(&**engine.origin(), &snap2, &mut *target, rate).run()
                }));
                let res = match res {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err("the drainer stopped unexpectedly (internal error)".into()),
                };
                engine.finish(&job2, &snap2, res, target, cut);
            });
        if let Err(e) = spawned {
            let e = Error::io("unable to start the drainer thread", e);
            snap.fail(e.to_string());
            self.uninstall(&snap);
            job.freeze(&snap);
            return Err(e);
        }
        Ok(())
    }

    /// Wait for an idle window (if asked) and take the gate exclusively.
    fn quiesce(
        &self,
        job: &Job,
        p: &BackupParams,
    ) -> Result<RwLockWriteGuard<'_, Option<Arc<Snapshot>>>> {
        if p.quiesce_idle_ms == 0 {
            return Ok(self.gate_exclusive());
        }
        let idle = Duration::from_millis(p.quiesce_idle_ms);
        let timeout = Duration::from_millis(if p.quiesce_timeout_ms == 0 {
            DEFAULT_QUIESCE_TIMEOUT_MS
        } else {
            p.quiesce_timeout_ms
        });
        let t0 = Instant::now();
        loop {
            if job.cancel.load(Ordering::SeqCst) {
                return Err(crate::err!(
                    Canceled,
                    "backup canceled while waiting for the disk to become idle"
                ));
            }
            let (since, inflight) = self.idle_for();
            if inflight == 0 && since >= idle {
                let g = self.gate_exclusive();
                // under the gate nothing is in flight; did a write slip in?
                if self.idle_for().0 >= idle {
                    return Ok(g);
                }
            }
            if t0.elapsed() >= timeout {
                return Err(crate::err!(
                    Busy,
                    "unable to start the backup of {:?}: the disk was never idle for {} ms within {} ms \
                     (writes kept coming); nothing was changed — retry, or lower the idle time",
                    self.config().name,
                    idle.as_millis(),
                    timeout.as_millis()
                ));
            }
            let wait = idle
                .saturating_sub(since)
                .clamp(Duration::from_millis(1), Duration::from_millis(20));
            std::thread::sleep(wait);
        }
    }

    fn end_generation(&self, job: &Job, cut: Option<&Cut>, generation: Option<&str>) {
        let (Some(cl), Some(cut)) = (&self.changelog, cut) else {
            return;
        };
        let r = match generation {
            Some(g) => cl.commit_generation(cut, g),
            None => cl.abort_generation(cut),
        };
        if let Err(e) = r {
            job.note(format!("change log not updated: {e}"));
        }
    }

    fn uninstall(&self, snap: &Arc<Snapshot>) {
        let mut g = self.gate_exclusive();
        if g.as_ref().is_some_and(|s| Arc::ptr_eq(s, snap)) {
            *g = None;
        }
    }

    fn finish(
        &self,
        job: &Job,
        snap: &Arc<Snapshot>,
        res: std::result::Result<(), String>,
        target: Box<dyn Target>,
        cut: Option<Cut>,
    ) {
        // the state is published last, after the snapshot is gone, so a caller that
        // sees "complete"/"failed" can start the next backup at once
        let outcome: std::result::Result<(), String> = match res {
            Ok(()) => match target.commit() {
                Ok(summary) => {
                    self.end_generation(job, cut.as_ref(), summary.generation.as_deref());
                    let mut st = lock(&job.status);
                    st.generation = summary.generation;
                    st.notes.extend(summary.notes);
                    st.bytes_stored = summary.bytes_stored;
                    Ok(())
                }
                Err(e) => {
                    self.end_generation(job, cut.as_ref(), None);
                    Err(e
                        .with_context("unable to commit the backup target")
                        .to_string())
                }
            },
            Err(e) => {
                // the drainer's error, or the first cause recorded by the snapshot
                let why = snap.failure().unwrap_or(e);
                snap.fail(why.clone());
                self.end_generation(job, cut.as_ref(), None);
                target.abort(&why);
                Err(why)
            }
        };
        // every waiter was released (fail) or nothing is pending (complete)
        self.uninstall(snap);
        job.freeze(snap);
        match outcome {
            Ok(()) => lock(&job.status).state = "complete".into(),
            Err(why) => job.fail(why),
        }
        let st = job.status();
        log::info!(
            "backup {} {}: {} chunks copied, {} preserved, {} ms{}",
            st.id,
            st.state,
            st.chunks_copied,
            st.chunks_preserved,
            st.elapsed_ms,
            st.error.map(|e| format!(": {e}")).unwrap_or_default()
        );
    }

    /// The running or last backup.
    pub fn backup_status(&self) -> Option<BackupStatus> {
        lock(&self.jobs.cur).as_ref().map(|j| j.status())
    }

    /// Copy these ranges next.
    pub fn backup_priority(&self, ranges: &[(u64, u64)]) -> Result<()> {
        let job = lock(&self.jobs.cur).clone();
        match job.and_then(|j| j.snapshot()) {
            Some(s) if !s.is_failed() => {
                s.add_priority(ranges);
                Ok(())
            }
            _ => Err(crate::err!(
                NotFound,
                "unable to reorder the backup: no backup running"
            )),
        }
    }

    /// Stop the running backup; its target is left incomplete.
    pub fn cancel_backup(&self) -> Result<()> {
        let job = lock(&self.jobs.cur).clone();
        match job {
            Some(j) if !j.finished() => {
                j.cancel.store(true, Ordering::SeqCst);
                if let Some(s) = j.snapshot() {
                    s.fail("backup canceled");
                }
                Ok(())
            }
            _ => Err(crate::err!(
                NotFound,
                "unable to cancel the backup: no backup running"
            )),
        }
    }

    /// Wait until the current backup is complete or failed (or `timeout` passes) and
    /// return its status.
    pub fn wait_backup(&self, timeout: Duration) -> Option<BackupStatus> {
        let t0 = Instant::now();
        loop {
            let st = self.backup_status()?;
            if st.state == "complete" || st.state == "failed" || t0.elapsed() >= timeout {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
