//! One backup job: its published status and, while it runs, its snapshot.
//!
//! The status mutex and the snapshot mutex are each held briefly and never across I/O;
//! when both are taken (`settle`), the status mutex is first.

use super::{lock, BackupState, BackupStatus};
use crate::snapshot::Snapshot;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub(super) struct Job {
    status: Mutex<BackupStatus>,
    snap: Mutex<Option<Arc<Snapshot>>>,
    canceled: AtomicBool,
}

impl Job {
    pub(super) fn new(status: BackupStatus) -> Self {
        Job {
            status: Mutex::new(status),
            snap: Mutex::new(None),
            canceled: AtomicBool::new(false),
        }
    }

    pub(super) fn id(&self) -> u64 {
        lock(&self.status).id
    }

    pub(super) fn state(&self) -> BackupState {
        lock(&self.status).state
    }

    pub(super) fn snapshot(&self) -> Option<Arc<Snapshot>> {
        lock(&self.snap).clone()
    }

    pub(super) fn note(&self, n: String) {
        lock(&self.status).notes.push(n);
    }

    /// Publish "failed"; the first cause is kept.
    pub(super) fn fail(&self, why: String) {
        let mut st = lock(&self.status);
        st.state = BackupState::Failed;
        st.error.get_or_insert(why);
    }

    /// Publish "complete" with what the target reported.
    pub(super) fn complete(&self) {
        lock(&self.status).state = BackupState::Complete;
    }

    /// Edit the status (figures reported by the target at commit).
    pub(super) fn update(&self, f: impl FnOnce(&mut BackupStatus)) {
        f(&mut lock(&self.status));
    }

    /// The snapshot is installed: the job runs.
    pub(super) fn run(&self, snap: Arc<Snapshot>) {
        *lock(&self.snap) = Some(snap);
        lock(&self.status).state = BackupState::Running;
    }

    /// Ask the job to stop: a quiesce wait gives up, a running snapshot fails with
    /// `why`.
    pub(super) fn cancel(&self, why: &str) {
        self.canceled.store(true, Ordering::SeqCst);
        if let Some(s) = self.snapshot() {
            s.fail(why);
        }
    }

    pub(super) fn is_canceled(&self) -> bool {
        self.canceled.load(Ordering::SeqCst)
    }

    /// The status with the live figures of the running snapshot.
    pub(super) fn status(&self) -> BackupStatus {
        let mut st = lock(&self.status).clone();
        if let Some(s) = self.snapshot() {
            fill_figures(&mut st, &s);
        }
        st
    }

    /// Copy the final figures of `snap` and let go of it (and so of its container).
    pub(super) fn settle(&self, snap: &Snapshot) {
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
    st.bitmap_bytes = s.map.plane_heap_bytes();
    let geo = s.geometry();
    st.bytes_in_scope = (s.map.in_scope() * u64::from(geo.chunk_size)).min(geo.disk_size);
    st.bytes_excluded_free = s.stats.excluded_free.load(Ordering::Relaxed);
    st.bytes_excluded_zero = s.stats.excluded_holes.load(Ordering::Relaxed);
    st.bytes_excluded_discarded = s.stats.excluded_discarded.load(Ordering::Relaxed);
}
