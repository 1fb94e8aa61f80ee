//! Backup jobs: one disk's current or last backup, from the request to the published
//! target. [`Backups`] is the only entry point (the daemon's control server calls it).
//!
//! Files
//! - `mod.rs`: the request ([`BackupParams`]), the figures ([`BackupStatus`],
//!   [`BackupState`]) and [`Backups`] (the job slot: one backup at a time per disk).
//! - `job.rs`: one job's state and figures.
//! - `quiesce.rs`: waiting for an idle window before the instant.
//! - `run.rs`: the snapshot instant, the drainer thread, commit or abort.
//! - `scope.rs`: after the instant, before the drainer: what need not be read (holes,
//!   free space), marked as known zeros.
//! - `last.rs`: the last successful backup, kept in the disk's state directory.
//! - `group.rs`: a backup that is one member of a consistency group (the instant's
//!   barrier and the commit gate; the protocol table is there).
//! - `snapshot_export.rs`: a snapshot served read-only over NBD instead of drained
//!   (pull mode); it takes the same job slot.
//!
//! Design notes
//! - One backup at a time per disk: a second `start` while one is quiescing or
//!   running fails with `Busy`; so does a backup while a snapshot export is taken or
//!   served, and a snapshot while a backup runs (`cur` is locked before `snapshot`).
//! - Order of `start`: open the target (`file:` writes its `.incomplete` marker
//!   first, [`crate::target::open`]) and the container, so bad specs fail before
//!   anything waits; quiesce (wait for `quiesce_idle_ms` without data-changing
//!   requests, re-checked under the gate; fail cleanly after `quiesce_timeout_ms`,
//!   default 80 s when 0); then the *instant*, under the exclusive gate
//!   (`Engine::pause_writes`): `changelog.begin_generation()` (an error
//!   means "no cut" plus a note; skipped for targets that do not use it,
//!   `Target::uses_change_log`), `target.scope(cut)`, build the chunk map, install the
//!   snapshot. Then `target.begin`, the priority ranges, and the drainer thread. It
//!   returns right after the instant with the job id.
//! - End: success → `target.commit()`; then, when the target reports a generation, the
//!   change log's `commit_generation(cut, generation)`; a target without generations
//!   keeps the change bits (`abort_generation`) so the next repository backup still
//!   sees every change (raw images take no cut at all, see `Target::uses_change_log`).
//!   Failure → the snapshot is failed (writers released), `abort_generation`,
//!   `target.abort(why)`. Either way the snapshot is uninstalled and the container
//!   released (a `file:` container is removed), and only then is the state published
//!   as complete or failed, so a caller that sees it can start the next backup at once.
//!   A completed backup is recorded as the last successful one ([`LastBackupRecord`])
//!   before "complete" is published.

pub mod group;
mod job;
mod last;
mod quiesce;
mod run;
mod scope;
mod snapshot_export;

use crate::container::Container;
use crate::engine::Engine;
use crate::error::Result;
use crate::export::Export;
use crate::target::Target;
use job::Job;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

pub use last::{LastBackup, LastBackupRecord, LAST_BACKUP_FILE};
pub use quiesce::DEFAULT_QUIESCE_TIMEOUT_MS;
pub use snapshot_export::{Released, SnapshotExport, SnapshotParams, SnapshotStatus};

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
    /// Read free space too: do not learn the filesystem's free space (`--all-blocks`;
    /// holes of a sparse origin are zeros and stay unread).
    #[serde(default)]
    pub all_blocks: bool,
    /// Notes recorded in the generation (a pre-snapshot hook's outcome).
    #[serde(default)]
    pub notes: Vec<String>,
    /// The consistency group this backup is a member of, recorded in the generation.
    #[serde(default)]
    pub group: Option<crate::repo::generation::GroupRef>,
    /// The key file of an encrypted repository (its path, never its content; the
    /// daemon reads it). A repository created by this backup is encrypted under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<std::path::PathBuf>,
}

/// Where a backup job is. On the wire (control protocol, `--json`) it is the lower-case
/// name: `"quiescing"`, `"running"`, `"complete"`, `"failed"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupState {
    /// Waiting for the idle window before the snapshot instant.
    #[default]
    Quiescing,
    /// The snapshot is installed and the drainer copies.
    Running,
    /// A group member whose data is all copied, waiting for the group's commit.
    Ready,
    /// The target is committed.
    Complete,
    /// The backup failed or was canceled (see `BackupStatus::error`).
    Failed,
}

impl BackupState {
    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            BackupState::Quiescing => "quiescing",
            BackupState::Running => "running",
            BackupState::Ready => "ready",
            BackupState::Complete => "complete",
            BackupState::Failed => "failed",
        }
    }

    /// Complete or failed: nothing runs any more.
    pub fn is_finished(self) -> bool {
        matches!(self, BackupState::Complete | BackupState::Failed)
    }
}

impl fmt::Display for BackupState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Figures of the running (or last) backup.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BackupStatus {
    /// Job id, counting from 1 per daemon.
    pub id: u64,
    /// Where the job is.
    pub state: BackupState,
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
    /// Bytes in the backup's scope at the instant (chunks in scope × chunk size).
    #[serde(default)]
    pub bytes_in_scope: u64,
    /// Bytes of the scope found free in the filesystem on the disk: stored as zeros,
    /// not read.
    #[serde(default)]
    pub bytes_excluded_free: u64,
    /// Bytes of the scope that are holes of a sparse origin: stored as zeros, not read.
    #[serde(default)]
    pub bytes_excluded_zero: u64,
    /// Bytes of the scope trimmed or zeroed (whole chunks) before the instant and not
    /// written since: stored as zeros, not read.
    #[serde(default)]
    pub bytes_excluded_discarded: u64,
    /// How long writes were paused for the snapshot instant, µs (from the moment no
    /// data-changing request was in flight to the installed snapshot).
    #[serde(default)]
    pub instant_pause_us: u64,
    /// Unix time (s) of the snapshot instant (0 before it).
    #[serde(default)]
    pub instant_unix: u64,
    /// Object-store repositories: where the parent's index came from (local cache or
    /// store), index bytes fetched, store requests (after commit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo_io: Option<crate::repo::cache::RepoIo>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The backups of one disk: the current or last job, one at a time.
pub struct Backups {
    engine: Arc<Engine>,
    cur: Mutex<Option<Arc<Job>>>,
    seq: AtomicU64,
    last: Arc<LastBackupRecord>,
    /// The snapshot export, which takes the job slot too (`snapshot_export.rs`);
    /// locked after `cur`.
    snapshot: Mutex<snapshot_export::Slot>,
}

impl Backups {
    /// The backup jobs of the disk `engine` serves.
    /// The last successful backup is remembered in memory only.
    pub fn new(engine: Arc<Engine>) -> Self {
        Self::with_record(engine, LastBackupRecord::in_memory())
    }

    /// [`Self::new`], remembering the last successful backup in `last` (the daemon
    /// keeps it in the disk's state directory).
    pub fn with_record(engine: Arc<Engine>, last: LastBackupRecord) -> Self {
        Backups {
            engine,
            cur: Mutex::new(None),
            seq: AtomicU64::new(0),
            last: Arc::new(last),
            snapshot: Mutex::new(snapshot_export::Slot::Empty),
        }
    }

    /// The last backup that completed, if one is known (across daemon restarts when
    /// the record has a file).
    pub fn last_success(&self) -> Option<LastBackup> {
        self.last.get()
    }

    /// The engine the backups snapshot.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Start a backup: returns after the snapshot instant, with the job id.
    pub fn start(&self, p: BackupParams) -> Result<u64> {
        self.start_with(p, None, None)
    }

    /// [`Self::start`] with an already opened target and/or container instead of the
    /// ones `p.to` / `p.container` name (`p.to` is then only shown in the status).
    /// For targets built elsewhere (the repository) and for tests.
    pub fn start_with(
        &self,
        p: BackupParams,
        target: Option<Box<dyn Target>>,
        container: Option<Box<dyn Container>>,
    ) -> Result<u64> {
        self.start_inner(p, target, container, None)
    }

    /// Start a backup as a member of a consistency group ([`group`]): `barrier` is
    /// called once everything is open and again once writes are paused; the drained
    /// backup publishes only when `gate` says commit. Returns after the instant.
    pub fn start_coordinated(
        &self,
        p: BackupParams,
        barrier: &mut dyn group::InstantBarrier,
        gate: group::CommitGate,
    ) -> Result<u64> {
        self.start_inner(p, None, None, Some((barrier, gate)))
    }

    fn start_inner(
        &self,
        p: BackupParams,
        target: Option<Box<dyn Target>>,
        container: Option<Box<dyn Container>>,
        coord: Option<(&mut dyn group::InstantBarrier, group::CommitGate)>,
    ) -> Result<u64> {
        let job = {
            let mut cur = lock(&self.cur);
            if let Some(j) = cur.as_ref() {
                if !j.state().is_finished() {
                    return Err(crate::err!(
                        Busy,
                        "unable to start a backup of {:?}: backup {} is still running",
                        self.engine.config().name,
                        j.id()
                    ));
                }
            }
            if let Some(what) = lock(&self.snapshot).busy() {
                return Err(crate::err!(
                    Busy,
                    "unable to start a backup of {:?}: {what} (release it first: \
                     cowsnapctl release {})",
                    self.engine.config().name,
                    self.engine.config().name
                ));
            }
            let id = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
            let job = Arc::new(Job::new(BackupStatus {
                id,
                state: BackupState::Quiescing,
                target: p.to.clone(),
                disk_size: self.engine.size(),
                chunk_size: self.engine.config().chunk_size,
                ..Default::default()
            }));
            *cur = Some(job.clone());
            job
        };
        match run::start(&self.engine, &job, &self.last, p, target, container, coord) {
            Ok(()) => Ok(job.id()),
            Err(e) => {
                job.fail(e.to_string());
                Err(e)
            }
        }
    }

    fn current(&self) -> Option<Arc<Job>> {
        lock(&self.cur).clone()
    }

    /// The running or last backup.
    pub fn status(&self) -> Option<BackupStatus> {
        self.current().map(|j| j.status())
    }

    /// Copy these byte ranges next.
    pub fn prioritize(&self, ranges: &[(u64, u64)]) -> Result<()> {
        match self.current().and_then(|j| j.snapshot()) {
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
    pub fn cancel(&self) -> Result<()> {
        self.cancel_because("backup canceled")
    }

    /// [`Self::cancel`], recording `why` as the backup's error.
    pub fn cancel_because(&self, why: &str) -> Result<()> {
        match self.current() {
            Some(j) if !j.state().is_finished() => {
                j.cancel(why);
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
    pub fn wait(&self, timeout: Duration) -> Option<BackupStatus> {
        let t0 = Instant::now();
        loop {
            let st = self.status()?;
            if st.state.is_finished() || t0.elapsed() >= timeout {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_wire_form_is_the_lower_case_name() {
        for s in [
            BackupState::Quiescing,
            BackupState::Running,
            BackupState::Ready,
            BackupState::Complete,
            BackupState::Failed,
        ] {
            let j = serde_json::to_string(&s).unwrap();
            assert_eq!(j, format!("\"{}\"", s.as_str()));
            assert_eq!(serde_json::from_str::<BackupState>(&j).unwrap(), s);
        }
        assert_eq!(
            serde_json::to_string(&BackupState::Running).unwrap(),
            "\"running\""
        );
        assert!(BackupState::Failed.is_finished() && !BackupState::Running.is_finished());
    }
}
