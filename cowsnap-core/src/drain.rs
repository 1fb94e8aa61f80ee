//! The drainer: copies the point-in-time image to the target.
//!
//! Design notes: order of work, re-decided before every batch
//! 1. Container first: when the container is at or above the low watermark (default
//!    25 %) or a writer waits for a slot, the batch starts at the next preserved chunk
//!    (cycling through them in disk order). Chunks written since the snapshot are
//!    exactly the preserved ones, so hot chunks are drained early and their slots
//!    freed at once.
//! 2. Priority ranges (`BackupParams::priority`, `Backups::prioritize`), in the
//!    order given.
//! 3. The sequential walk over the in-scope chunks, wrapping around to pick up
//!    granules skipped while a writer was preserving them.
//!
//! A batch is a run of whole target granules, up to 4 MiB (at least one granule).
//! Pending chunks in it are marked busy and read from the origin in one read per
//! contiguous run (rate-limited when asked; holes of a sparse origin file, found with
//! SEEK_DATA/SEEK_HOLE, are filled with zeros instead of read); preserved ones come
//! from their slots.
//! The busy marks are dropped as soon as the origin read is done (the data is in
//! memory), the batch goes to the target in one `write`, then the preserved chunks'
//! slots are freed. A granule holding a chunk that a writer is preserving is skipped
//! and revisited; the drainer never waits while holding a mark. When nothing can be
//! claimed it waits for a state change (at most 5 ms) and decides again.
//!
//! Failure: any origin, container or target error fails the snapshot (releasing every
//! writer) and ends the drain with that error.

use crate::aligned::AlignedBuf;
use crate::blockio::BlockIo;
use crate::chunk_map::{Claim, ClaimResult};
use crate::error::Result;
use crate::snapshot::Snapshot;
use crate::target::Target;
use crate::throttle::RateLimiter;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Largest batch, bytes.
pub const MAX_BATCH: u64 = 4 << 20;

/// Attempts at claiming per pick before waiting (bounds lock traffic when every
/// candidate is busy).
const TRIES: usize = 64;

/// Drain `snap` into `target` until every in-scope chunk is copied, the snapshot is
/// failed (or cancelled), or an I/O error occurs.
pub struct Drainer<'a> {
    origin: &'a dyn BlockIo,
    snap: &'a Snapshot,
    target: &'a mut dyn Target,
    max_granules: u64,
    cursor: u64,
    pcursor: u64,
    rate: Option<RateLimiter>,
    buf: AlignedBuf,
}

impl<'a> Drainer<'a> {
    /// A drainer; `rate` in bytes/s for the origin reads.
    pub fn new(
        origin: &'a dyn BlockIo,
        snap: &'a Snapshot,
        target: &'a mut dyn Target,
        rate: Option<u64>,
    ) -> Self {
        let geo = snap.geometry();
        let gbytes = snap.map.granule() * u64::from(geo.chunk_size);
        let mut max_batch = MAX_BATCH;
        if let Some(r) = rate.filter(|&r| r > 0) {
            // a quarter second's worth, so the pacing stays smooth
            max_batch = max_batch.min(r / 4);
        }
        let max_granules = (max_batch / gbytes).max(1);
        Drainer {
            origin,
            snap,
            target,
            max_granules,
            cursor: 0,
            pcursor: 0,
            rate: rate.filter(|&r| r > 0).map(RateLimiter::new),
            buf: AlignedBuf::new(),
        }
    }

    /// Run to completion.
    pub fn run(&mut self) -> Result<()> {
        loop {
            if let Some(why) = self.snap.failure() {
                return Err(crate::err!(Canceled, "{why}"));
            }
            if self.snap.map.remaining() == 0 {
                return Ok(());
            }
            match self.pick()? {
                Some(claim) => {
                    if let Err(e) = self.process(&claim) {
                        self.snap.fail(e.to_string());
                        return Err(e);
                    }
                }
                None => self.snap.map.wait_change(Duration::from_millis(5)),
            }
        }
    }

    fn ngran(&self) -> u64 {
        self.snap
            .geometry()
            .nchunks
            .div_ceil(self.snap.map.granule())
    }

    fn claim_at(&self, g: u64, limit: u64, preserved_only: bool) -> Result<ClaimResult> {
        self.snap
            .map
            .try_claim(g, self.max_granules, limit, preserved_only)
            .inspect_err(|e| {
                self.snap.fail(e.to_string());
            })
    }

    fn pick(&mut self) -> Result<Option<Claim>> {
        let gran = self.snap.map.granule();
        // 1. container first
        if self.snap.slots.waiters() > 0
            || self
                .snap
                .throttle
                .drain_container_first(self.snap.slots.used(), self.snap.slots.total())
        {
            let map = &self.snap.map;
            if let Some(cl) = self.scan(self.pcursor, true, |f| map.next_preserved_from(f))? {
                self.pcursor = cl.end;
                return Ok(Some(cl));
            }
        }
        // 2. priority ranges
        for _ in 0..TRIES {
            let Some((a, b)) = self.snap.priority_front() else {
                break;
            };
            match self.snap.map.next_work_from(a).filter(|&c| c < b) {
                None => self.snap.priority_advance(b),
                Some(c) => {
                    let g = c / gran;
                    match self.claim_at(g, b.div_ceil(gran), false)? {
                        ClaimResult::Claimed(cl) => {
                            self.snap.priority_advance(cl.end);
                            return Ok(Some(cl));
                        }
                        // busy: the sequential walk picks it up later
                        _ => self.snap.priority_advance((g + 1) * gran),
                    }
                }
            }
        }
        // 3. sequential walk
        let map = &self.snap.map;
        let cl = self.scan(self.cursor, false, |f| map.next_work_from(f))?;
        if let Some(cl) = &cl {
            self.cursor = cl.end;
        }
        Ok(cl)
    }

    /// Claim at the first granule, from chunk `from` on and wrapping around once, that
    /// `next` finds and that can be claimed (busy ones are stepped over; at most
    /// [`TRIES`] attempts).
    fn scan(
        &self,
        mut from: u64,
        preserved_only: bool,
        next: impl Fn(u64) -> Option<u64>,
    ) -> Result<Option<Claim>> {
        let gran = self.snap.map.granule();
        let ngran = self.ngran();
        let mut wrapped = false;
        for _ in 0..TRIES {
            match next(from) {
                Some(c) => {
                    let g = c / gran;
                    match self.claim_at(g, ngran, preserved_only)? {
                        ClaimResult::Claimed(cl) => return Ok(Some(cl)),
                        _ => from = (g + 1) * gran,
                    }
                }
                None if !wrapped && from > 0 => {
                    wrapped = true;
                    from = 0;
                }
                None => break,
            }
        }
        Ok(None)
    }

    fn process(&mut self, claim: &Claim) -> Result<()> {
        let geo = *self.snap.geometry();
        let off = geo.chunk_off(claim.first);
        let end = geo.end_off(claim.end);
        let len = (end - off) as usize;
        self.buf.resize(len);
        if let Err(e) = self.fill(claim, off) {
            self.snap.map.abandon(claim);
            return Err(e);
        }
        self.snap.map.mark_copied(claim);
        self.target
            .write(off, &self.buf[..len])
            .map_err(|e| e.with_context("unable to write the backup target"))?;
        for &(c, _) in &claim.preserved {
            if let Some(s) = self.snap.map.mark_drained(c) {
                self.snap.slots.free(s);
            }
        }
        let n = claim.end - claim.first;
        self.snap.stats.copied.fetch_add(n, Ordering::Relaxed);
        self.snap
            .stats
            .bytes_copied
            .fetch_add(len as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Read the claim's data: runs of pending chunks from the origin, preserved ones
    /// from the container.
    fn fill(&mut self, claim: &Claim, base: u64) -> Result<()> {
        let geo = *self.snap.geometry();
        let mut c = claim.first;
        let mut pres = claim.preserved.iter().peekable();
        while c < claim.end {
            if let Some(&&(pc, slot)) = pres.peek() {
                if pc == c {
                    let o = (geo.chunk_off(c) - base) as usize;
                    let n = geo.chunk_len(c) as usize;
                    self.snap
                        .container
                        .read_slot(slot, &mut self.buf[o..o + n])
                        .map_err(|e| {
                            e.with_context(format!(
                                "unable to read chunk {c} back from the container"
                            ))
                        })?;
                    pres.next();
                    c += 1;
                    continue;
                }
            }
            let run_end = pres.peek().map_or(claim.end, |&&(pc, _)| pc);
            let ro = geo.chunk_off(c);
            let re = geo.end_off(run_end);
            // Holes of a sparse origin read as zeros without I/O. The chunks are busy,
            // so no write can fill a hole between this query and the read.
            let data = match self.origin.data_ranges(ro, re - ro) {
                Ok(Some(ranges)) => {
                    let o = (ro - base) as usize;
                    self.buf[o..o + (re - ro) as usize].fill(0);
                    ranges
                }
                _ => vec![(ro, re)],
            };
            for (a, b) in data {
                let (a, b) = (a.max(ro), b.min(re));
                if a >= b {
                    continue;
                }
                if let Some(r) = self.rate.as_mut() {
                    r.take(b - a);
                }
                let o = (a - base) as usize;
                self.origin
                    .read_at(&mut self.buf[o..o + (b - a) as usize], a)
                    .map_err(|e| e.with_context("unable to read the origin for the backup"))?;
            }
            c = run_end;
        }
        Ok(())
    }
}
