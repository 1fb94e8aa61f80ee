//! The engine: the write path of one attached disk. Without a snapshot every request
//! passes straight to the origin. While a backup runs, a write to a chunk the backup
//! has not copied yet is held until the chunk's original is preserved in the container
//! (see [`crate::snapshot`] for the per-chunk rules).
//!
//! The engine owns the instant gate and the installed snapshot, nothing else: a backup
//! job ([`crate::backup`]) takes the gate exclusively (`Engine::pause_writes`),
//! installs its snapshot (`ExclusiveGate::install`) and uninstalls it at the end
//! (`Engine::uninstall`). The engine knows nothing of jobs, targets or drainers.
//!
//! Design notes
//! - The instant gate: `active` is an `RwLock<Option<Arc<Snapshot>>>`. Every
//!   data-changing request (write, trim, write-zeroes — there is no other; the
//!   [`Export`] trait has no default bodies, so a new one cannot bypass this) holds it
//!   shared from the snapshot check until its origin I/O has completed. Installing a
//!   snapshot takes it exclusively: in-flight writes finish first, new ones wait, so
//!   the image is exactly the disk at one point in time. Clearing the snapshot at the
//!   end of a backup takes it exclusively too (after every waiter was released).
//! - Quiesce support: the engine keeps the time of the last data-changing request and
//!   how many are in flight (`Engine::idle_for`), for a job's idle-window wait.
//! - Reads and flushes do not take the gate: reads never wait on the drainer.
//! - Discard marks (`discard.rs`): every data-changing request registers with them
//!   inside the gate, before its origin I/O, and reports its outcome after it; a trim
//!   or write-zeroes that covered whole chunks, overlapped by no write, marks them. A
//!   snapshot instant copies the marks (`discarded_at_instant`, exclusive gate held).
//! - Change-log marks happen inside the gate, before the origin write, so the cut taken
//!   at the instant matches the image.
//! - `block_status` reports holes/zeros only where the origin says so (SEEK_HOLE on a
//!   regular file); otherwise one data extent. It never reports zero over data.
//! - Reads and writes record their service time in a fixed-bucket histogram
//!   ([`crate::latency`]: relaxed atomics, no lock, constant memory); a write's time
//!   includes waiting at the gate, throttle delays and holds while its chunk's
//!   original is preserved, which is what a backup costs the disk's users.

use crate::blockio::BlockIo;
use crate::changelog::ChangeLog;
use crate::discard::{ChangeKind, DiscardMarks};
use crate::error::Result;
use crate::export::{Export, ExportCaps, Extent, ZeroFlags};
use crate::latency::{LatencyHistogram, LatencySnapshot};
use crate::paged_bits::PagedBits;
use crate::snapshot::Snapshot;
use crate::throttle::ThrottleConfig;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

/// The instant gate held exclusively: while it lives no data-changing request is in
/// flight and new ones wait. Dropping it lets writers run again.
pub(crate) struct ExclusiveGate<'a>(RwLockWriteGuard<'a, Option<Arc<Snapshot>>>);

impl ExclusiveGate<'_> {
    /// Install `snap` as the engine's snapshot and let writers run again: from now on
    /// every data-changing request preserves the pending chunks it touches first.
    pub(crate) fn install(mut self, snap: Arc<Snapshot>) {
        *self.0 = Some(snap);
    }
}

/// Engine settings fixed at attach time.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tracking chunk size in bytes: a power of two, 64 KiB by default.
    pub chunk_size: u32,
    /// Refuse data-changing requests.
    pub read_only: bool,
    /// Disk name (for snapshot info and status), default "".
    pub name: String,
    /// Container spec used when a backup names none; `None` = `ram:64M`
    /// ([`crate::container::DEFAULT_CONTAINER`]).
    pub default_container: Option<String>,
    /// Writer throttling and drain-first watermarks.
    pub throttle: ThrottleConfig,
    /// Bypass the page cache (O_DIRECT) for a backup's bulk I/O on block devices: the
    /// drainer's origin reads (a second, read-only handle) and `dev:` targets. A file
    /// origin's live I/O always uses the page cache; a backup whose target asks for it
    /// (`Target::reads_file_origin_direct`; no target does now) reads a file origin
    /// O_DIRECT too (`blockio::open_direct_file_reader`). Where the kernel refuses
    /// O_DIRECT it falls back to buffered I/O and logs it.
    pub direct_io: bool,
}

/// Whether backups use O_DIRECT on block devices unless told otherwise
/// (`EngineConfig::direct_io`; BENCHMARKS.md "I/O engines and O_DIRECT").
pub const DEFAULT_DIRECT_IO: bool = true;

/// Smallest tracking chunk.
pub const MIN_CHUNK_SIZE: u32 = 4096;
/// Largest tracking chunk: the repository chunk (a repository granule is a whole number
/// of tracking chunks).
pub const MAX_CHUNK_SIZE: u32 = crate::repo::DEFAULT_CHUNK_SIZE;

/// Check a tracking chunk size: a power of two from [`MIN_CHUNK_SIZE`] to
/// [`MAX_CHUNK_SIZE`].
pub fn check_chunk_size(cs: u64) -> Result<u32> {
    if !cs.is_power_of_two() || cs < u64::from(MIN_CHUNK_SIZE) || cs > u64::from(MAX_CHUNK_SIZE) {
        return Err(crate::err!(
            InvalidInput,
            "unable to use chunk size {cs}: expected a power of two from {} to {} (4K to 1M)",
            MIN_CHUNK_SIZE,
            MAX_CHUNK_SIZE
        ));
    }
    Ok(cs as u32)
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            chunk_size: crate::chunk_map::DEFAULT_CHUNK_SIZE,
            read_only: false,
            name: String::new(),
            default_container: None,
            throttle: ThrottleConfig::default(),
            direct_io: DEFAULT_DIRECT_IO,
        }
    }
}

/// I/O counters, as shown by `cowsnapctl status` (also the control socket's wire type).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct IoStats {
    /// Read requests.
    pub reads: u64,
    /// Write requests.
    pub writes: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Flush requests.
    pub flushes: u64,
    /// Trim requests.
    pub trims: u64,
    /// Write-zeroes requests.
    pub zeroes: u64,
    /// Requests that failed.
    pub errors: u64,
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    zeroes: AtomicU64,
    errors: AtomicU64,
    read_latency: LatencyHistogram,
    write_latency: LatencyHistogram,
}

/// One attached disk's engine.
pub struct Engine {
    origin: Arc<dyn BlockIo>,
    cfg: EngineConfig,
    changelog: Option<Arc<ChangeLog>>,
    counters: Counters,
    active: RwLock<Option<Arc<Snapshot>>>,
    epoch: Instant,
    /// ns since `epoch` of the last data-changing request's start or end.
    last_change_ns: AtomicU64,
    /// Snapshot instants waiting for the exclusive gate (writes in flight to finish).
    instant_waiting: AtomicU64,
    /// Data-changing requests in flight.
    inflight: AtomicU64,
    /// Chunks wholly trimmed or zeroed and not written since (in memory only).
    discards: DiscardMarks,
}

impl Engine {
    /// Build an engine over an opened origin.
    pub fn new(
        origin: Arc<dyn BlockIo>,
        cfg: EngineConfig,
        changelog: Option<Arc<ChangeLog>>,
    ) -> Result<Arc<Self>> {
        check_chunk_size(u64::from(cfg.chunk_size))?;
        let discards = DiscardMarks::new(origin.size(), cfg.chunk_size);
        Ok(Arc::new(Engine {
            discards,
            origin,
            cfg,
            changelog,
            counters: Counters::default(),
            active: RwLock::new(None),
            epoch: Instant::now(),
            last_change_ns: AtomicU64::new(0),
            instant_waiting: AtomicU64::new(0),
            inflight: AtomicU64::new(0),
        }))
    }

    /// The origin.
    pub fn origin(&self) -> &Arc<dyn BlockIo> {
        &self.origin
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// The disk's change log, if it has one.
    pub fn changelog(&self) -> Option<&Arc<ChangeLog>> {
        self.changelog.as_ref()
    }

    /// Snapshot of the I/O counters.
    pub fn stats(&self) -> IoStats {
        let c = &self.counters;
        IoStats {
            reads: c.reads.load(Ordering::Relaxed),
            writes: c.writes.load(Ordering::Relaxed),
            bytes_read: c.bytes_read.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            flushes: c.flushes.load(Ordering::Relaxed),
            trims: c.trims.load(Ordering::Relaxed),
            zeroes: c.zeroes.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
        }
    }

    /// Service-time histograms of reads and writes.
    pub fn latency(&self) -> LatencySnapshot {
        LatencySnapshot {
            read: self.counters.read_latency.snapshot(),
            write: self.counters.write_latency.snapshot(),
        }
    }

    /// The active snapshot, if a backup is running.
    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.gate_shared().clone()
    }

    fn gate_shared(&self) -> RwLockReadGuard<'_, Option<Arc<Snapshot>>> {
        self.active.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Take the instant gate exclusively: data-changing requests in flight finish
    /// first, new ones wait until the returned gate is dropped or installs a snapshot.
    pub(crate) fn pause_writes(&self) -> ExclusiveGate<'_> {
        self.instant_waiting.fetch_add(1, Ordering::SeqCst);
        let g = self.active.write().unwrap_or_else(PoisonError::into_inner);
        self.instant_waiting.fetch_sub(1, Ordering::SeqCst);
        ExclusiveGate(g)
    }

    /// Snapshot instants waiting right now for the data-changing requests in flight to
    /// finish (so a test knows the instant is held, not merely not yet reached).
    pub fn instant_waiting(&self) -> u64 {
        self.instant_waiting.load(Ordering::SeqCst)
    }

    /// The chunks wholly trimmed or zeroed and not written since, as of the instant the
    /// caller holds (`gate`: no data-changing request is in flight). Known since the
    /// daemon started only (`discard.rs`); chunks discarded before are not marked.
    pub(crate) fn discarded_at_instant(&self, _gate: &ExclusiveGate<'_>) -> PagedBits {
        self.discards.at_instant()
    }

    /// Remove `snap` if it is the installed snapshot (under the exclusive gate, so no
    /// writer is inside it). Its waiters must have been released first (failed) or
    /// have nothing left to wait for (complete).
    pub(crate) fn uninstall(&self, snap: &Arc<Snapshot>) {
        let mut g = self.active.write().unwrap_or_else(PoisonError::into_inner);
        if g.as_ref().is_some_and(|s| Arc::ptr_eq(s, snap)) {
            *g = None;
        }
    }

    /// Time since the last data-changing request started or ended, and how many are
    /// in flight (for quiesce-idle waiting).
    pub(crate) fn idle_for(&self) -> (std::time::Duration, u64) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        let last = self.last_change_ns.load(Ordering::SeqCst);
        (
            std::time::Duration::from_nanos(now.saturating_sub(last)),
            self.inflight.load(Ordering::SeqCst),
        )
    }

    fn touch(&self) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        self.last_change_ns.fetch_max(now, Ordering::SeqCst);
    }

    fn count_err<T>(&self, r: Result<T>) -> Result<T> {
        if r.is_err() {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Persist the change bits of `off..off+len` (before the data changes), run `op`,
    /// then acknowledge its change sequence number.
    fn tracked(&self, off: u64, len: u64, op: impl FnOnce() -> Result<()>) -> Result<()> {
        match &self.changelog {
            Some(cl) => {
                let seq = cl.mark_seq(off, len)?;
                let r = op();
                cl.ack(seq);
                r
            }
            None => op(),
        }
    }

    /// Run a data-changing operation on `off..off+len` under the instant gate, after
    /// preserving the originals of pending chunks; `kind` says whether it leaves the
    /// range discarded (trim, write-zeroes) or stores data (`discard.rs`).
    fn change(
        &self,
        what: &str,
        kind: ChangeKind,
        off: u64,
        len: u64,
        op: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        crate::blockio::check_range(self.size(), off, len, what)?;
        let gate = self.gate_shared();
        self.inflight.fetch_add(1, Ordering::SeqCst);
        self.touch();
        if let Some(snap) = gate.as_ref() {
            snap.preserve(&*self.origin, off, len);
        }
        let ticket = self.discards.begin(kind, off, len);
        let r = self.tracked(off, len, op);
        self.discards.end(ticket, r.is_ok());
        self.touch();
        self.inflight.fetch_sub(1, Ordering::SeqCst);
        drop(gate);
        r
    }

    /// Extents of `off..off+len` from the origin's allocation (regular files), or
    /// `None` when unknown.
    fn allocation(&self, off: u64, len: u64) -> Option<Vec<Extent>> {
        let ranges = self.origin.data_ranges(off, len).ok()??;
        let end = off + len;
        let mut out = Vec::new();
        let mut pos = off;
        for (a, b) in ranges {
            let a = a.max(pos).min(end);
            let b = b.min(end);
            if a > pos {
                out.push(Extent {
                    len: a - pos,
                    hole: true,
                    zero: true,
                });
            }
            if b > a {
                out.push(Extent {
                    len: b - a,
                    hole: false,
                    zero: false,
                });
                pos = b;
            } else {
                pos = pos.max(a);
            }
        }
        if pos < end {
            out.push(Extent {
                len: end - pos,
                hole: true,
                zero: true,
            });
        }
        Some(out)
    }
}

impl Export for Engine {
    fn size(&self) -> u64 {
        self.origin.size()
    }
    fn caps(&self) -> ExportCaps {
        ExportCaps {
            read_only: self.cfg.read_only,
            trim: true,
            zeroes: true,
            fast_zero: self.origin.fast_zero(),
            multi_conn: true,
        }
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let t0 = Instant::now();
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        let r = self.count_err(self.origin.read_at(buf, off));
        self.counters.read_latency.record(t0.elapsed());
        r
    }
    fn write(&self, off: u64, data: &[u8], fua: bool) -> Result<()> {
        if self.cfg.read_only {
            return Err(crate::err!(ReadOnly, "write to a read-only export"));
        }
        let t0 = Instant::now();
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let r = self.change("write", ChangeKind::Write, off, data.len() as u64, || {
            self.origin.write_at(data, off)?;
            if fua {
                self.origin.flush()?;
            }
            Ok(())
        });
        self.counters.write_latency.record(t0.elapsed());
        self.count_err(r)
    }
    fn flush(&self) -> Result<()> {
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        self.count_err(self.origin.flush())
    }
    fn trim(&self, off: u64, len: u64, fua: bool) -> Result<()> {
        if self.cfg.read_only {
            return Err(crate::err!(ReadOnly, "trim on a read-only export"));
        }
        self.counters.trims.fetch_add(1, Ordering::Relaxed);
        let r = self.change("trim", ChangeKind::Discard, off, len, || {
            self.origin.discard(off, len)?;
            if fua {
                self.origin.flush()?;
            }
            Ok(())
        });
        self.count_err(r)
    }
    fn zero(&self, off: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if self.cfg.read_only {
            return Err(crate::err!(ReadOnly, "write-zeroes on a read-only export"));
        }
        if flags.fast && !self.origin.fast_zero() {
            return Err(crate::err!(Unsupported, "fast zero not supported"));
        }
        self.counters.zeroes.fetch_add(1, Ordering::Relaxed);
        let r = self.change("write-zeroes", ChangeKind::Discard, off, len, || {
            self.origin.write_zeroes(off, len, !flags.no_hole)?;
            if flags.fua {
                self.origin.flush()?;
            }
            Ok(())
        });
        self.count_err(r)
    }
    fn block_status(&self, off: u64, len: u64) -> Result<Vec<Extent>> {
        crate::blockio::check_range(self.size(), off, len, "block status")
            .map_err(|e| e.with_context("unable to report block status"))?;
        if len == 0 {
            return Ok(Vec::new());
        }
        Ok(self.allocation(off, len).unwrap_or_else(|| {
            vec![Extent {
                len,
                hole: false,
                zero: false,
            }]
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockio::{self, IoEngine, OpenSpec};

    #[test]
    fn a_failing_change_log_sync_fails_the_write_before_the_origin_changes() {
        let d = tempfile::tempdir().unwrap();
        let origin = d.path().join("disk");
        std::fs::write(&origin, vec![1u8; 1 << 20]).unwrap();
        let mut spec = OpenSpec::origin(&origin);
        spec.engine = IoEngine::Sync;
        let cl = Arc::new(
            ChangeLog::open_with_lineage(&d.path().join("changelog.bin"), 1 << 20, 65536, "l")
                .unwrap(),
        );
        let e = Engine::new(
            blockio::open(&spec).unwrap(),
            EngineConfig::default(),
            Some(cl.clone()),
        )
        .unwrap();
        cl.fail_syncs.store(true, Ordering::SeqCst);
        let err = e.write(65536, &[9u8; 4096], false).unwrap_err();
        assert!(err.to_string().contains("change log"), "{err}");
        assert_eq!(e.stats().errors, 1);
        let mut b = vec![0u8; 4096];
        e.read(65536, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 1), "the origin was not written");
        // the same holds for trim and write-zeroes, which change data too
        assert!(e.trim(65536, 4096, false).is_err());
        assert!(e.zero(65536, 4096, ZeroFlags::default()).is_err());
        // once the change log is healthy again the write goes through, tracked
        cl.fail_syncs.store(false, Ordering::SeqCst);
        e.write(65536, &[9u8; 4096], false).unwrap();
        e.read(65536, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 9));
        assert_eq!(cl.status().changed_chunks, 1);
    }

    #[test]
    fn reads_and_writes_are_timed() {
        let d = tempfile::tempdir().unwrap();
        let origin = d.path().join("disk");
        std::fs::write(&origin, vec![0u8; 1 << 20]).unwrap();
        let mut spec = OpenSpec::origin(&origin);
        spec.engine = IoEngine::Sync;
        let e = Engine::new(blockio::open(&spec).unwrap(), EngineConfig::default(), None).unwrap();
        for i in 0..3 {
            e.write(i * 4096, &[1u8; 4096], false).unwrap();
        }
        let mut b = vec![0u8; 4096];
        e.read(0, &mut b).unwrap();
        // a failed write is timed too: it was served (with an error)
        assert!(e.write(1 << 20, &[1u8; 4096], false).is_err());
        let l = e.latency();
        assert_eq!(l.write.count(), 4, "three writes and the refused one");
        assert_eq!(l.read.count(), 1);
        assert!(l.write.sum_ns > 0 && l.read.sum_ns > 0);
        assert!(l.read.is_valid() && l.write.is_valid());
    }
}
