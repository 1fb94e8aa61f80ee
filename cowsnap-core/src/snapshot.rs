//! One point in time of a disk: the chunk map, the container and its slot pool, the
//! figures, and the write-path hook [`Snapshot::preserve`].
//!
//! Design notes: the write path
//! - Every data-changing request (write, trim, write-zeroes) calls `preserve` for its
//!   range before touching the origin, while holding the engine's instant gate shared.
//! - For each chunk touched, in ascending order:
//!   1. not pending (done, preserved, out of scope) or snapshot dropped → nothing;
//!   2. pending → *first* throttle (above the high watermark) and take a container slot
//!      (waiting while the container is full), holding no mark while waiting;
//!   3. take the chunk's busy mark (waiting while another writer or the drainer holds
//!      it); if it stopped being pending meanwhile, give the slot back and go on;
//!   4. read the whole original chunk from the origin, write it to the slot, mark the
//!      chunk preserved (which releases the busy mark and wakes waiters).
//! - Only after every chunk is handled does the caller write the origin and reply:
//!   container write → origin write, always.
//! - A writer holds at most one busy mark, and only across I/O: it never waits for
//!   another mark or a slot while holding one, hence no deadlock with other writers or
//!   the drainer. (During a live restore that I/O may wait for the live restore's fill
//!   marks; see the crate's locking table for why that order is safe.)
//! - Failures: if reading the original or writing the container fails, the snapshot is
//!   failed (`fail`), never the user's write: the mark is released, every waiter is
//!   woken and passes through, and the write goes on to the origin.

use crate::aligned::AlignedBuf;
use crate::blockio::check_range;
use crate::blockio::BlockIo;
use crate::chunk_map::{ChunkIdx, ChunkMap, ChunkState, Geometry, WriteClaim};
use crate::container::{Container, SlotPool};
use crate::error::Result;
use crate::throttle::ThrottleConfig;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

thread_local! {
    /// Per-thread buffer for preserving one chunk (no allocation per write).
    static PRESERVE_BUF: std::cell::RefCell<AlignedBuf> =
        std::cell::RefCell::new(AlignedBuf::new());
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Figures of a snapshot, updated lock-free.
#[derive(Default, Debug)]
pub struct SnapStats {
    /// Writes held while their chunks were preserved (or waited for a busy chunk).
    pub holds: AtomicU64,
    /// Total hold time, ns.
    pub hold_ns: AtomicU64,
    /// Writes slowed by the throttle or by a full container.
    pub throttled: AtomicU64,
    /// Total throttle delay, ns.
    pub throttle_ns: AtomicU64,
    /// Chunks preserved in the container.
    pub preserved: AtomicU64,
    /// Chunks handed to the target.
    pub copied: AtomicU64,
    /// Bytes handed to the target.
    pub bytes_copied: AtomicU64,
    /// Chunks handed to the target as known zeros (counted in `copied` too).
    pub zero: AtomicU64,
    /// Bytes found free in the filesystem on the disk and so stored as zeros.
    pub excluded_free: AtomicU64,
    /// Bytes found to be holes of a sparse origin and so stored as zeros.
    pub excluded_holes: AtomicU64,
    /// Bytes discarded (trimmed or zeroed whole chunks, not written since) before the
    /// instant and so stored as zeros.
    pub excluded_discarded: AtomicU64,
}

/// One snapshot of a disk.
pub struct Snapshot {
    /// Chunk states.
    pub map: ChunkMap,
    /// Where preserved originals go.
    pub container: Box<dyn Container>,
    /// Slot allocation over `container`.
    pub slots: SlotPool,
    /// Throttle tuning.
    pub throttle: ThrottleConfig,
    /// Figures.
    pub stats: SnapStats,
    failure: Mutex<Option<String>>,
    failed: AtomicBool,
    /// Priority ranges still to copy, in chunks `[a, b)`.
    priority: Mutex<VecDeque<(u64, u64)>>,
    /// The snapshot instant.
    pub started: Instant,
}

impl Snapshot {
    /// A snapshot over `map` preserving into `container`.
    pub fn new(map: ChunkMap, container: Box<dyn Container>, throttle: ThrottleConfig) -> Self {
        let slots = SlotPool::new(container.slots());
        Snapshot {
            map,
            container,
            slots,
            throttle,
            stats: SnapStats::default(),
            failure: Mutex::new(None),
            failed: AtomicBool::new(false),
            priority: Mutex::new(VecDeque::new()),
            started: Instant::now(),
        }
    }

    /// Geometry of the disk.
    pub fn geometry(&self) -> &Geometry {
        self.map.geometry()
    }

    /// Fail (drop) the snapshot: the first cause wins; every held or waiting writer is
    /// released and passes through from now on.
    pub fn fail(&self, why: impl Into<String>) {
        let why = why.into();
        {
            let mut f = lock(&self.failure);
            if f.is_none() {
                log::warn!("snapshot dropped: {why}");
                *f = Some(why);
            }
        }
        self.failed.store(true, Ordering::SeqCst);
        self.map.drop_snapshot();
        self.slots.drop_all();
    }

    /// End the snapshot on purpose (a snapshot export released): like [`Self::fail`]
    /// (every waiter passes through from now on) but not logged as a failure.
    pub fn end(&self, why: &str) {
        lock(&self.failure).get_or_insert_with(|| why.to_string());
        self.failed.store(true, Ordering::SeqCst);
        self.map.drop_snapshot();
        self.slots.drop_all();
    }

    /// Why the snapshot failed, if it did.
    pub fn failure(&self) -> Option<String> {
        if !self.failed.load(Ordering::SeqCst) {
            return None;
        }
        lock(&self.failure).clone()
    }

    /// Whether the snapshot was failed.
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Queue byte ranges to copy before the rest.
    pub fn add_priority(&self, ranges: &[(u64, u64)]) {
        let geo = *self.geometry();
        let mut q = lock(&self.priority);
        for &(off, len) in ranges {
            if len == 0 || off >= geo.disk_size {
                continue;
            }
            let len = len.min(geo.disk_size - off);
            let r = geo.chunks_of(off, len);
            q.push_back((r.start, r.end));
        }
    }

    /// The front priority range of chunks, if any.
    pub(crate) fn priority_front(&self) -> Option<(ChunkIdx, ChunkIdx)> {
        lock(&self.priority)
            .front()
            .map(|&(a, b)| (ChunkIdx(a), ChunkIdx(b)))
    }

    /// Replace the front priority range's start (or pop it when empty).
    pub(crate) fn priority_advance(&self, new_start: ChunkIdx) {
        let new_start = new_start.0;
        let mut q = lock(&self.priority);
        if let Some(f) = q.front_mut() {
            if new_start >= f.1 {
                q.pop_front();
            } else {
                f.0 = f.0.max(new_start);
            }
        }
    }

    /// Read `buf.len()` bytes at `off` as they were at the snapshot instant, while
    /// writers run: a pending chunk is read from the origin and is still pending
    /// afterwards (a writer writes the origin only after it marked the chunk
    /// preserved, so data read before that is the instant's), else it is read from its
    /// container slot. Only valid before the drainer starts (a drained chunk's original
    /// is gone and its slot may be reused): chunks done or out of scope are refused.
    pub fn read_view(&self, origin: &dyn BlockIo, buf: &mut [u8], off: u64) -> Result<()> {
        let geo = *self.geometry();
        check_range(geo.disk_size, off, buf.len() as u64, "snapshot read")?;
        let mut pos = 0usize;
        for c in geo.chunks_of(off, buf.len() as u64) {
            let a = geo.chunk_off(c).max(off);
            let b = geo.end_off(c + 1).min(off + buf.len() as u64);
            let piece = &mut buf[pos..pos + (b - a) as usize];
            pos += piece.len();
            // the origin first; the state afterwards says whether that was the instant
            origin.read_at(piece, a)?;
            match self.map.state_and_zero(c) {
                // known zeros: writes pass through such a chunk, the image holds zeros
                (ChunkState::Pending, true) => piece.fill(0),
                (ChunkState::Pending, false) => {}
                (ChunkState::Preserved(slot), _) => {
                    let n = geo.chunk_len(c) as usize;
                    let mut whole = vec![0u8; n];
                    self.container.read_slot(slot, &mut whole)?;
                    let skip = (a - geo.chunk_off(c)) as usize;
                    piece.copy_from_slice(&whole[skip..skip + piece.len()]);
                }
                (ChunkState::Done | ChunkState::OutOfScope, _) => {
                    return Err(crate::err!(
                        InvalidInput,
                        "unable to read chunk {c} as of the snapshot: it is not held by it"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The write-path hook: preserve every pending chunk of `off..off+len` before the
    /// caller changes the origin. Never fails the caller: a failure drops the snapshot.
    pub fn preserve(&self, origin: &dyn BlockIo, off: u64, len: u64) {
        if len == 0 || self.is_failed() {
            return;
        }
        let geo = *self.geometry();
        let t_start = Instant::now();
        let mut held = false;
        let mut throttled = Duration::ZERO;
        let mut was_throttled = false;
        'chunks: for c in geo.chunks_of(off, len) {
            loop {
                if self.is_failed() {
                    break 'chunks;
                }
                let mut slot = None;
                if self.map.needs_preserve(c) {
                    let d = self
                        .throttle
                        .delay_for(self.slots.used(), self.slots.total());
                    if !d.is_zero() {
                        std::thread::sleep(d);
                        throttled += d;
                        was_throttled = true;
                    }
                    match self.slots.alloc_wait() {
                        Some((s, waited)) => {
                            if !waited.is_zero() {
                                throttled += waited;
                                was_throttled = true;
                            }
                            slot = Some(s);
                        }
                        None => break 'chunks,
                    }
                }
                match self.map.claim_for_write(c) {
                    WriteClaim::PassThrough { waited } => {
                        held |= waited;
                        if let Some(s) = slot {
                            self.slots.free(s);
                        }
                        break;
                    }
                    WriteClaim::Preserve { waited } => {
                        held = true;
                        let _ = waited;
                        let Some(s) = slot else {
                            // became pending-and-free without our slot (cannot happen:
                            // pending never goes back to 1); retry with a slot
                            self.map.release(c);
                            continue;
                        };
                        let n = geo.chunk_len(c) as usize;
                        let r = PRESERVE_BUF.with_borrow_mut(|buf| {
                            buf.resize(n);
                            origin
                                .read_at(&mut buf[..n], geo.chunk_off(c))
                                .map_err(|e| {
                                    e.with_context(format!(
                                        "unable to read the original of chunk {c} from the origin"
                                    ))
                                })
                                .and_then(|_| {
                                    self.container.write_slot(s, &buf[..n]).map_err(|e| {
                                        e.with_context(format!(
                                            "unable to preserve chunk {c} in the container"
                                        ))
                                    })
                                })
                        });
                        match r {
                            Ok(()) => {
                                self.map.mark_preserved(c, s);
                                self.stats.preserved.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                self.slots.free(s);
                                self.map.release(c);
                                self.fail(e.to_string());
                                break 'chunks;
                            }
                        }
                        break;
                    }
                }
            }
        }
        if was_throttled {
            self.stats.throttled.fetch_add(1, Ordering::Relaxed);
            self.stats
                .throttle_ns
                .fetch_add(throttled.as_nanos() as u64, Ordering::Relaxed);
        }
        if held {
            let t = t_start.elapsed().saturating_sub(throttled);
            self.stats.holds.fetch_add(1, Ordering::Relaxed);
            self.stats
                .hold_ns
                .fetch_add(t.as_nanos() as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::ram::RamContainer;

    #[test]
    fn preserve_stores_originals_once() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let size = 3 * 65536 + 4096;
        let data: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
        std::fs::write(f.path(), &data).unwrap();
        let mut spec = crate::blockio::OpenSpec::origin(f.path());
        spec.engine = crate::blockio::IoEngine::Sync;
        let origin = crate::blockio::open(&spec).unwrap();
        let geo = Geometry::new(size as u64, 65536).unwrap();
        let snap = Snapshot::new(
            ChunkMap::new(geo, 1, None),
            Box::new(RamContainer::new(8 * 65536, 65536).unwrap()),
            ThrottleConfig::default(),
        );
        // across the edge of chunks 0 and 1, and the short last chunk
        snap.preserve(&*origin, 65000, 1000);
        snap.preserve(&*origin, size as u64 - 1, 1);
        snap.preserve(&*origin, 65000, 1000); // again: nothing new
        assert_eq!(snap.stats.preserved.load(Ordering::Relaxed), 3);
        assert_eq!(snap.slots.used(), 3);
        for c in [0u64, 1, 3] {
            match snap.map.state(c) {
                crate::chunk_map::ChunkState::Preserved(s) => {
                    let n = geo.chunk_len(c) as usize;
                    let mut b = vec![0u8; n];
                    snap.container.read_slot(s, &mut b).unwrap();
                    let o = geo.chunk_off(c) as usize;
                    assert_eq!(b, &data[o..o + n]);
                }
                other => panic!("chunk {c}: {other:?}"),
            }
        }
        assert_eq!(snap.stats.holds.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn read_view_sees_the_instant_while_writers_change_the_origin() {
        use crate::chunk_map::{ClaimResult, GranuleIdx};
        const CS: u32 = 4096;
        let size = 8 * u64::from(CS);
        let file = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..size).map(|i| (i / 512 % 251) as u8 + 1).collect();
        std::fs::write(file.path(), &data).unwrap();
        let mut spec = crate::blockio::OpenSpec::origin(file.path());
        spec.engine = crate::blockio::IoEngine::Sync;
        let origin = crate::blockio::open(&spec).unwrap();
        let geo = Geometry::new(size, CS).unwrap();
        let snap = Snapshot::new(
            ChunkMap::new(geo, 1, None),
            Box::new(RamContainer::new(4 * u64::from(CS), CS).unwrap()),
            ThrottleConfig::default(),
        );
        // a writer changes chunk 2 (preserving it first, as the engine does)
        snap.preserve(&*origin, 2 * 4096 + 100, 10);
        origin.write_at(&[0xEE; 10], 2 * 4096 + 100).unwrap();
        // chunk 6 is marked zero and then written through
        assert_eq!(snap.map.mark_zero(6, 7), 4096);
        origin.write_at(&[0xDD; 4096], 6 * 4096).unwrap();
        // a read across chunks 1..7, not chunk aligned
        let mut buf = vec![0u8; 5 * 4096 + 300];
        snap.read_view(&*origin, &mut buf, 4096 + 50).unwrap();
        let mut want = data[4096 + 50..4096 + 50 + buf.len()].to_vec();
        let z = 6 * 4096 - (4096 + 50);
        want[z..].fill(0);
        assert_eq!(buf, want, "the instant's bytes, zeros where marked zero");
        // beyond the disk: refused
        assert!(snap.read_view(&*origin, &mut [0u8; 10], size - 5).is_err());
        // a chunk no longer held by the snapshot: refused
        snap.map.mark_zero(7, 8);
        let ClaimResult::Claimed(c) = snap
            .map
            .try_claim(GranuleIdx(7), 1, GranuleIdx(8), false)
            .unwrap()
        else {
            panic!("no claim")
        };
        assert!(c.zero);
        let e = snap
            .read_view(&*origin, &mut [0u8; 10], 7 * 4096)
            .unwrap_err();
        assert!(e.to_string().contains("not held"), "{e}");
    }
}
