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
//! from their slots. The runs of a batch are read with one `BlockIo::read_many` (on
//! io_uring: up to `uring::BATCH_DEPTH` SQEs per submission; the buffer is the batch,
//! at most `MAX_BATCH` bytes, so memory stays bounded whatever the engine).
//!
//! The origin handle the drainer reads may be a second, O_DIRECT one on the same block
//! device (`BlockIo::open_direct_reader`, chosen by the backup: `EngineConfig::direct_io`)
//! or, for a repository target, on the same regular file
//! (`blockio::open_direct_file_reader`: its unaligned tail read buffered) so that a
//! backup does not fill the page cache of the machine it protects. Reads of
//! busy chunks only: Linux writes back the dirty cached pages of the range before an
//! O_DIRECT read, so the read sees every write that completed before the chunk was
//! claimed, and writers cannot write the chunk until the read is done. Writers and
//! preserving reads keep using the buffered handle; nothing writes the origin O_DIRECT,
//! so its cached pages are never stale.
//! The busy marks are dropped as soon as the origin read is done (the data is in
//! memory), the batch goes to the target in one `write`, then the preserved chunks'
//! slots are freed. A granule holding a chunk that a writer is preserving is skipped
//! and revisited; the drainer never waits while holding a mark. When nothing can be
//! claimed it waits for a state change (at most 5 ms) and decides again.
//!
//! In-kernel copies: when the origin is a plain file (`BlockIo::plain_file`) and the
//! target takes ranges of it (`Target::copy_from_file`: a file image), the runs of
//! pending chunks of a batch go from the origin's file to the target in the kernel
//! (`copy_file_range`), and only preserved chunks pass through the buffer. The busy
//! marks are then held until the copy is done (not only until the read is), since the
//! copy is what reads the origin: a writer of one of those chunks waits for it, then
//! finds the chunk done and writes straight through. Preserved chunks never come from
//! the origin. A target that declines (`Ok(false)`) gets the whole batch read and
//! written as usual, and the drainer stops trying.
//!
//! Runs of whole granules known to be zeros at the instant (free space of the
//! filesystem, holes: `ChunkMap::mark_zero`) are claimed on their own, up to
//! `chunk_map::MAX_ZERO_CLAIM_GRANULES` at a time, and handed to the target as one
//! zero range (`Target::write_zeroes`) without reading or a buffer.
//!
//! Units: chunks are [`ChunkIdx`], granules [`GranuleIdx`], slots
//! [`SlotIdx`](crate::container::SlotIdx); the target gets byte ranges. Repository
//! chunks are the target's business: a repository target's granule is one repository
//! chunk (or one tracking chunk holding several). Conversions are the
//! `Geometry::byte_*` and `ChunkMap::granule_*` methods only (see [`ChunkIdx`]).
//!
//! Failure: any origin, container or target error fails the snapshot (releasing every
//! writer) and ends the drain with that error.

use crate::aligned::AlignedBuf;
use crate::blockio::BlockIo;
use crate::chunk_map::{ChunkIdx, Claim, ClaimResult, GranuleIdx};
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
    /// Most granules in one batch (a count, not an index).
    max_granules: u64,
    /// Where the sequential walk goes on.
    cursor: ChunkIdx,
    /// Where the walk over preserved chunks goes on.
    pcursor: ChunkIdx,
    rate: Option<RateLimiter>,
    buf: AlignedBuf,
    /// Try in-kernel copies from the origin's file (see the module notes).
    direct: bool,
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
        // a preserved chunk goes on its own: only for targets of one-chunk granules
        let direct = origin.plain_file().is_some() && target.granule_chunks() == 1;
        Drainer {
            origin,
            snap,
            target,
            max_granules,
            cursor: ChunkIdx(0),
            pcursor: ChunkIdx(0),
            rate: rate.filter(|&r| r > 0).map(RateLimiter::new),
            buf: AlignedBuf::new(),
            direct,
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

    fn claim_at(
        &self,
        g: GranuleIdx,
        limit: GranuleIdx,
        preserved_only: bool,
    ) -> Result<ClaimResult> {
        self.snap
            .map
            .try_claim(g, self.max_granules, limit, preserved_only)
            .inspect_err(|e| {
                self.snap.fail(e.to_string());
            })
    }

    fn pick(&mut self) -> Result<Option<Claim>> {
        let map = &self.snap.map;
        // 1. container first
        if self.snap.slots.waiters() > 0
            || self
                .snap
                .throttle
                .drain_container_first(self.snap.slots.used(), self.snap.slots.total())
        {
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
                    let g = map.granule_of(c);
                    match self.claim_at(g, map.granules_before(b), false)? {
                        ClaimResult::Claimed(cl) => {
                            self.snap.priority_advance(cl.end);
                            return Ok(Some(cl));
                        }
                        // busy: the sequential walk picks it up later
                        _ => self.snap.priority_advance(map.granule_chunks(g).end),
                    }
                }
            }
        }
        // 3. sequential walk
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
        mut from: ChunkIdx,
        preserved_only: bool,
        next: impl Fn(ChunkIdx) -> Option<ChunkIdx>,
    ) -> Result<Option<Claim>> {
        let map = &self.snap.map;
        let all = GranuleIdx(map.granule_count());
        let mut wrapped = false;
        for _ in 0..TRIES {
            match next(from) {
                Some(c) => {
                    let g = map.granule_of(c);
                    match self.claim_at(g, all, preserved_only)? {
                        ClaimResult::Claimed(cl) => return Ok(Some(cl)),
                        _ => from = map.granule_chunks(g).end,
                    }
                }
                None if !wrapped && from > ChunkIdx(0) => {
                    wrapped = true;
                    from = ChunkIdx(0);
                }
                None => break,
            }
        }
        Ok(None)
    }

    fn process(&mut self, claim: &Claim) -> Result<()> {
        let geo = *self.snap.geometry();
        let off = geo.byte_offset(claim.first);
        let end = geo.byte_end(claim.end);
        let len = (end - off) as usize;
        if claim.zero {
            // known zeros (free space, holes): a range, never a zero-filled buffer
            self.target
                .write_zeroes(off, end - off)
                .map_err(|e| e.with_context("unable to write the backup target"))?;
            let n = claim.len();
            self.snap.stats.copied.fetch_add(n, Ordering::Relaxed);
            self.snap.stats.zero.fetch_add(n, Ordering::Relaxed);
            return Ok(());
        }
        let copied = match self.direct {
            true => self.copy_direct(claim),
            false => Ok(false),
        };
        match copied {
            Ok(true) => {}
            Ok(false) => {
                self.buf.resize(len);
                if let Err(e) = self.fill(claim, off) {
                    self.snap.map.abandon(claim);
                    return Err(e);
                }
                self.snap.map.mark_copied(claim);
                match self.target.takes_buffers() {
                    // given away: the target keeps the bytes without copying them and
                    // returns a buffer for the next batch
                    true => {
                        let data = std::mem::take(&mut self.buf);
                        self.buf = self
                            .target
                            .write_owned(off, data, len)
                            .map_err(|e| e.with_context("unable to write the backup target"))?;
                    }
                    false => self
                        .target
                        .write(off, &self.buf[..len])
                        .map_err(|e| e.with_context("unable to write the backup target"))?,
                }
            }
            Err(e) => {
                self.snap.map.abandon(claim);
                return Err(e);
            }
        }
        for &(c, _) in &claim.preserved {
            if let Some(s) = self.snap.map.mark_drained(c) {
                self.snap.slots.free(s);
            }
        }
        self.snap
            .stats
            .copied
            .fetch_add(claim.len(), Ordering::Relaxed);
        self.snap
            .stats
            .bytes_copied
            .fetch_add(len as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Store the claim with in-kernel copies of its runs of pending chunks (their busy
    /// marks held until the last copy is done; then they are marked copied) and
    /// buffered writes of its preserved chunks. `Ok(false)`: nothing marked, the claim
    /// goes through the buffer — it holds only preserved chunks, or the target declined
    /// (before anything of the claim was stored that a buffered write would not redo;
    /// direct copies are off from then on).
    fn copy_direct(&mut self, claim: &Claim) -> Result<bool> {
        let geo = *self.snap.geometry();
        let Some(src) = self.origin.plain_file() else {
            self.direct = false;
            return Ok(false);
        };
        // 1. the runs of pending chunks, from the origin's file; nothing is written
        //    before the target has taken the first one
        let mut any = false;
        let mut c = claim.first;
        let mut pres = claim.preserved.iter().map(|&(pc, _)| pc).peekable();
        while c < claim.end {
            if pres.peek() == Some(&c) {
                pres.next();
                c = c.next();
                continue;
            }
            let run_end = pres.peek().copied().unwrap_or(claim.end);
            let ro = geo.byte_offset(c);
            let re = geo.byte_end(run_end);
            if let Some(r) = self.rate.as_mut() {
                r.take(re - ro);
            }
            let done = self
                .target
                .copy_from_file(src, ro, re - ro)
                .map_err(|e| e.with_context("unable to copy the origin to the backup target"))?;
            if !done {
                self.direct = false;
                return Ok(false);
            }
            any = true;
            c = run_end;
        }
        if !any {
            // only preserved chunks: the buffered path does the same in one write
            return Ok(false);
        }
        // the origin has been read: writers of those chunks may go on
        self.snap.map.mark_copied(claim);
        // 2. the preserved chunks, from their slots (never from the origin)
        for &(pc, slot) in &claim.preserved {
            let n = geo.byte_len(pc) as usize;
            self.buf.resize(n);
            self.snap
                .container
                .read_slot(slot, &mut self.buf[..n])
                .map_err(|e| {
                    e.with_context(format!(
                        "unable to read chunk {} back from the container",
                        pc.0
                    ))
                })?;
            self.target
                .write(geo.byte_offset(pc), &self.buf[..n])
                .map_err(|e| e.with_context("unable to write the backup target"))?;
        }
        Ok(true)
    }

    /// Read the claim's data: runs of pending chunks from the origin, preserved ones
    /// from the container. The origin's ranges of the claim are read in one
    /// `read_many` (one submission on the io_uring engine) after the slots are read.
    fn fill(&mut self, claim: &Claim, base: u64) -> Result<()> {
        let geo = *self.snap.geometry();
        // origin ranges to read: (offset in the buffer, length, disk offset)
        let mut reads: Vec<(usize, usize, u64)> = Vec::new();
        let mut c = claim.first;
        let mut pres = claim.preserved.iter().peekable();
        while c < claim.end {
            if let Some(&&(pc, slot)) = pres.peek() {
                if pc == c {
                    let o = (geo.byte_offset(c) - base) as usize;
                    let n = geo.byte_len(c) as usize;
                    self.snap
                        .container
                        .read_slot(slot, &mut self.buf[o..o + n])
                        .map_err(|e| {
                            e.with_context(format!(
                                "unable to read chunk {} back from the container",
                                c.0
                            ))
                        })?;
                    pres.next();
                    c = c.next();
                    continue;
                }
            }
            let run_end = pres.peek().map_or(claim.end, |&&(pc, _)| pc);
            let ro = geo.byte_offset(c);
            let re = geo.byte_end(run_end);
            // Holes of a sparse origin read as zeros without I/O. The chunks are busy,
            // so no write can fill a hole between this query and the read.
            let data = match self.origin.data_ranges(ro, re - ro) {
                Ok(Some(ranges)) => ranges,
                _ => vec![(ro, re)],
            };
            // only the gaps between data ranges are zero-filled: the data is read over
            let mut done = ro;
            for (a, b) in data {
                let (a, b) = (a.max(done), b.min(re));
                if a >= b {
                    continue;
                }
                self.buf[(done - base) as usize..(a - base) as usize].fill(0);
                reads.push(((a - base) as usize, (b - a) as usize, a));
                done = b;
            }
            self.buf[(done - base) as usize..(re - base) as usize].fill(0);
            c = run_end;
        }
        if reads.is_empty() {
            return Ok(());
        }
        if let Some(r) = self.rate.as_mut() {
            r.take(reads.iter().map(|&(_, n, _)| n as u64).sum());
        }
        // disjoint, ascending ranges of the buffer: split it into their slices
        let mut reqs: Vec<(&mut [u8], u64)> = Vec::with_capacity(reads.len());
        let mut rest: &mut [u8] = &mut self.buf[..];
        let mut at = 0usize;
        for &(o, n, disk) in &reads {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(o - at);
            let (mine, tail) = tail.split_at_mut(n);
            reqs.push((mine, disk));
            rest = tail;
            at = o + n;
        }
        self.origin
            .read_many(&mut reqs)
            .map_err(|e| e.with_context("unable to read the origin for the backup"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockio::{self, IoEngine, OpenSpec};
    use crate::changelog::Cut;
    use crate::chunk_map::{ChunkMap, Geometry, WriteClaim};
    use crate::container::ram::RamContainer;
    use crate::target::{Scope, SnapshotInfo, TargetSummary};
    use crate::test_util::wait_for;
    use crate::throttle::ThrottleConfig;
    use std::sync::{Arc, Mutex};

    const CS: u32 = 4096;
    const CSU: u64 = CS as u64;

    /// What the target received: (offset, bytes) per write.
    type Writes = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

    /// Records every write (offset, bytes); fails every write when `fail` is set.
    struct Rec {
        granule: u32,
        writes: Writes,
        zeroes: Arc<Mutex<Vec<(u64, u64)>>>,
        fail: bool,
    }

    impl Target for Rec {
        fn granule_chunks(&self) -> u32 {
            self.granule
        }
        fn scope(&mut self, _cut: Option<&Cut>) -> Result<Scope> {
            Ok(Scope::All)
        }
        fn begin(&mut self, _info: &SnapshotInfo) -> Result<()> {
            Ok(())
        }
        fn write(&mut self, off: u64, data: &[u8]) -> Result<()> {
            if self.fail {
                return Err(crate::err!(Io, "target full"));
            }
            self.writes.lock().unwrap().push((off, data.to_vec()));
            Ok(())
        }
        fn write_zeroes(&mut self, off: u64, len: u64) -> Result<()> {
            if self.fail {
                return Err(crate::err!(Io, "target full"));
            }
            self.zeroes.lock().unwrap().push((off, len));
            self.writes
                .lock()
                .unwrap()
                .push((off, vec![0u8; len as usize]));
            Ok(())
        }
        fn commit(self: Box<Self>) -> Result<TargetSummary> {
            Ok(TargetSummary::default())
        }
        fn abort(self: Box<Self>, _why: &str) {}
    }

    struct Setup {
        _file: tempfile::NamedTempFile,
        origin: Arc<dyn BlockIo>,
        data: Vec<u8>,
        snap: Snapshot,
        writes: Writes,
        zeroes: Arc<Mutex<Vec<(u64, u64)>>>,
    }

    fn setup(size: u64, granule: u32, slots: u64) -> Setup {
        let file = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..size).map(|i| (i / 512 % 251) as u8 + 1).collect();
        std::fs::write(file.path(), &data).unwrap();
        let mut spec = OpenSpec::origin(file.path());
        spec.engine = IoEngine::Sync;
        let origin = blockio::open(&spec).unwrap();
        let geo = Geometry::new(size, CS).unwrap();
        let snap = Snapshot::new(
            ChunkMap::new(geo, u64::from(granule), None),
            Box::new(RamContainer::new(slots * CSU, CS).unwrap()),
            ThrottleConfig::default(),
        );
        Setup {
            _file: file,
            origin,
            data,
            snap,
            writes: Arc::new(Mutex::new(Vec::new())),
            zeroes: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn rec(s: &Setup, granule: u32) -> Rec {
        Rec {
            granule,
            writes: s.writes.clone(),
            zeroes: s.zeroes.clone(),
            fail: false,
        }
    }

    /// The image the target received.
    fn image(s: &Setup) -> Vec<u8> {
        let mut img = vec![0u8; s.data.len()];
        for (off, d) in s.writes.lock().unwrap().iter() {
            img[*off as usize..*off as usize + d.len()].copy_from_slice(d);
        }
        img
    }

    #[test]
    fn copies_every_chunk_once_in_whole_granules() {
        // 37 chunks and a short last one; granules of 4 chunks
        let size = 37 * CSU + 100;
        let s = setup(size, 4, 4);
        let mut t = rec(&s, 4);
        Drainer::new(&*s.origin, &s.snap, &mut t, None)
            .run()
            .unwrap();
        assert_eq!(image(&s), s.data);
        let w = s.writes.lock().unwrap();
        let total: usize = w.iter().map(|(_, d)| d.len()).sum();
        assert_eq!(total as u64, size, "each byte handed over once");
        for (off, d) in w.iter() {
            assert_eq!(off % (4 * CSU), 0, "batches start on a granule");
            assert!((d.len() as u64).is_multiple_of(4 * CSU) || off + d.len() as u64 == size);
        }
        assert_eq!(s.snap.stats.copied.load(Ordering::Relaxed), 38);
        assert_eq!(s.snap.map.remaining(), 0);
    }

    #[test]
    fn holes_of_a_sparse_origin_read_as_zeros_whatever_the_buffer_held() {
        // three batches of 4 MiB; the first is all data, so the buffer is full of it
        // when the next ones, mostly holes, are filled
        let size = 12 << 20;
        let s = setup(size, 1, 4);
        let mut want = s.data.clone();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(s._file.path())
            .unwrap();
        let keep = [(4 << 20) + 8192, (8 << 20) + 20 * 4096, size - 4096];
        let mut at = 4u64 << 20;
        for &k in &keep {
            punch(&f, at, k - at);
            want[at as usize..k as usize].fill(0);
            at = k + 4096;
        }
        assert_eq!(at, size);
        let mut t = rec(&s, 1);
        Drainer::new(&*s.origin, &s.snap, &mut t, None)
            .run()
            .unwrap();
        assert_eq!(image(&s), want);
    }

    fn punch(f: &std::fs::File, off: u64, len: u64) {
        use std::os::fd::AsRawFd;
        nix::fcntl::fallocate(
            f.as_raw_fd(),
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            off as i64,
            len as i64,
        )
        .unwrap();
    }

    #[test]
    fn preserved_chunks_come_from_the_container_first() {
        let size = 64 * CSU;
        let s = setup(size, 1, 2);
        // a writer preserves chunk 60, then changes the origin
        s.snap.preserve(&*s.origin, 60 * CSU, 10);
        s.origin.write_at(&[0xEE; 10], 60 * CSU).unwrap();
        assert_eq!(s.snap.slots.used(), 1, "half full: above the low watermark");
        let mut t = rec(&s, 1);
        Drainer::new(&*s.origin, &s.snap, &mut t, None)
            .run()
            .unwrap();
        let w = s.writes.lock().unwrap();
        assert_eq!(w[0].0, 60 * CSU, "the container is drained first");
        drop(w);
        assert_eq!(image(&s), s.data, "the original, not the new write");
        assert_eq!(s.snap.slots.used(), 0, "its slot was freed");
    }

    #[test]
    fn priority_ranges_go_before_the_walk() {
        let size = 64 * CSU;
        let s = setup(size, 1, 4);
        s.snap.add_priority(&[(48 * CSU, 2 * CSU)]);
        let mut t = rec(&s, 1);
        Drainer::new(&*s.origin, &s.snap, &mut t, None)
            .run()
            .unwrap();
        let w = s.writes.lock().unwrap();
        assert_eq!((w[0].0, w[0].1.len() as u64), (48 * CSU, 2 * CSU));
        drop(w);
        assert_eq!(image(&s), s.data);
    }

    #[test]
    fn a_priority_range_inside_a_granule_claims_that_whole_granule() {
        // granules of 4 chunks; the priority is chunk 13 (granule 3): the first batch
        // is chunks 12..16, at byte 12 chunks (not 13 chunks, not 3)
        let size = 32 * CSU;
        let s = setup(size, 4, 4);
        s.snap.add_priority(&[(13 * CSU, 10)]);
        let mut t = rec(&s, 4);
        Drainer::new(&*s.origin, &s.snap, &mut t, None)
            .run()
            .unwrap();
        let w = s.writes.lock().unwrap();
        assert_eq!((w[0].0, w[0].1.len() as u64), (12 * CSU, 4 * CSU));
        drop(w);
        assert_eq!(image(&s), s.data);
    }

    #[test]
    fn a_busy_granule_is_skipped_and_revisited() {
        let size = 16 * CSU;
        let s = Arc::new(setup(size, 1, 4));
        // a writer holds chunk 0 while it preserves it
        assert_eq!(
            s.snap.map.claim_for_write(0),
            WriteClaim::Preserve { waited: false }
        );
        let s2 = s.clone();
        let drain = std::thread::spawn(move || {
            let mut t = rec(&s2, 1);
            Drainer::new(&*s2.origin, &s2.snap, &mut t, None).run()
        });
        // everything but chunk 0 is copied while the mark is held
        wait_for(|| s.snap.map.remaining() == 1);
        assert!(!drain.is_finished());
        s.snap.map.release(0);
        drain.join().unwrap().unwrap();
        let w = s.writes.lock().unwrap();
        assert_ne!(w[0].0, 0);
        assert_eq!(w.last().unwrap().0, 0, "chunk 0 comes last");
        drop(w);
        assert_eq!(image(&s), s.data);
    }

    #[test]
    fn a_target_error_fails_the_snapshot() {
        let s = setup(8 * CSU, 1, 4);
        let mut t = Rec {
            fail: true,
            ..rec(&s, 1)
        };
        let e = Drainer::new(&*s.origin, &s.snap, &mut t, None)
            .run()
            .unwrap_err();
        assert!(e.to_string().contains("target full"), "{e}");
        assert!(s.snap.is_failed(), "writers are released");
        assert!(s.snap.failure().unwrap().contains("target full"));
    }

    #[test]
    fn a_failed_snapshot_stops_the_drain() {
        let s = setup(8 * CSU, 1, 4);
        s.snap.fail("backup canceled");
        let mut t = rec(&s, 1);
        let e = Drainer::new(&*s.origin, &s.snap, &mut t, None)
            .run()
            .unwrap_err();
        assert!(e.to_string().contains("backup canceled"), "{e}");
        assert!(s.writes.lock().unwrap().is_empty());
    }

    #[test]
    fn a_file_image_takes_pending_runs_in_the_kernel_and_preserved_chunks_from_slots() {
        use crate::target::raw::RawImage;
        // 2 MiB + a short chunk; a hole in the origin; two chunks preserved and then
        // changed on the origin: the image is the disk at the instant
        let size = 512 * CSU + 100;
        let s = setup(size, 1, 4);
        let mut want = s.data.clone();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(s._file.path())
            .unwrap();
        punch(&f, 100 * CSU, 50 * CSU);
        want[(100 * CSU) as usize..(150 * CSU) as usize].fill(0);
        for c in [3u64, 300] {
            s.snap.preserve(&*s.origin, c * CSU, 10);
            s.origin.write_at(&[0xEE; 10], c * CSU).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let mut t = RawImage::create_file(&p, size, CS).unwrap();
        t.begin(&SnapshotInfo {
            disk: "t".into(),
            disk_size: size,
            chunk_size: CS,
            created_unix: 0,
            lineage: String::new(),
            seq_next: 0,
            seq_lowest_unacked: 0,
        })
        .unwrap();
        let mut d = Drainer::new(&*s.origin, &s.snap, &mut t, None);
        d.run().unwrap();
        assert!(d.direct, "the kernel copy was used throughout");
        drop(d);
        Box::new(t).commit().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), want);
        assert_eq!(s.snap.slots.used(), 0, "the slots were freed");
        assert_eq!(s.snap.map.remaining(), 0);
        // the origin's hole stayed a hole in the image
        let img = std::fs::File::open(&p).unwrap();
        let r = crate::blockio::sync::data_ranges_fd(&img, 100 * CSU, 150 * CSU).unwrap();
        assert_eq!(r, Some(vec![]), "{r:?}");
    }

    #[test]
    fn zero_granules_go_to_the_target_as_ranges_unread() {
        // 16 chunks, granules of 2; chunks 4..12 known zero (free space, say)
        let size = 16 * CSU;
        let s = setup(size, 2, 4);
        assert_eq!(s.snap.map.mark_zero(4, 12), 8 * CSU);
        let mut t = rec(&s, 2);
        Drainer::new(&*s.origin, &s.snap, &mut t, None)
            .run()
            .unwrap();
        // one range, though the origin holds data there: it was not read
        assert_eq!(*s.zeroes.lock().unwrap(), vec![(4 * CSU, 8 * CSU)]);
        let mut want = s.data.clone();
        want[(4 * CSU) as usize..(12 * CSU) as usize].fill(0);
        assert_eq!(image(&s), want);
        assert_eq!(s.snap.stats.copied.load(Ordering::Relaxed), 16);
        assert_eq!(s.snap.stats.zero.load(Ordering::Relaxed), 8);
        assert_eq!(
            s.snap.stats.bytes_copied.load(Ordering::Relaxed),
            8 * CSU,
            "only the data chunks were read"
        );
    }

    /// Counts the requests of every `read_many`, and hands them to the engine.
    struct CountReads {
        inner: Arc<dyn BlockIo>,
        batches: Mutex<Vec<usize>>,
    }

    impl BlockIo for CountReads {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
            self.batches.lock().unwrap().push(1);
            self.inner.read_at(buf, off)
        }
        fn read_many(&self, reqs: &mut [(&mut [u8], u64)]) -> Result<()> {
            self.batches.lock().unwrap().push(reqs.len());
            self.inner.read_many(reqs)
        }
        fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
            self.inner.write_at(buf, off)
        }
        fn flush(&self) -> Result<()> {
            self.inner.flush()
        }
        fn discard(&self, off: u64, len: u64) -> Result<()> {
            self.inner.discard(off, len)
        }
        fn write_zeroes(&self, off: u64, len: u64, may_unmap: bool) -> Result<()> {
            self.inner.write_zeroes(off, len, may_unmap)
        }
        fn fast_zero(&self) -> bool {
            false
        }
        fn is_block_device(&self) -> bool {
            true
        }
        fn engine_name(&self) -> &'static str {
            self.inner.engine_name()
        }
    }

    /// A batch whose pending chunks are cut into runs by preserved ones reads all the
    /// runs in one `read_many`, on either engine, and the image is the disk at the
    /// instant.
    #[test]
    fn the_runs_of_a_batch_are_read_in_one_call_on_both_engines() {
        let mut engines = vec![IoEngine::Sync];
        if blockio::uring::probe() {
            engines.push(IoEngine::Uring);
        }
        for engine in engines {
            // one granule of 64 chunks: one batch
            let size = 64 * CSU;
            let s = setup(size, 64, 64);
            let mut spec = OpenSpec::origin(s._file.path());
            spec.engine = engine;
            let inner = blockio::open(&spec).unwrap();
            assert_eq!(inner.engine_name(), spec_name(engine));
            // every fourth chunk preserved and then changed: 16 runs of 3 chunks
            for c in (0..64u64).step_by(4) {
                s.snap.preserve(&*inner, c * CSU, 10);
                inner.write_at(&[0xEE; 10], c * CSU).unwrap();
            }
            let counted = CountReads {
                inner,
                batches: Mutex::new(Vec::new()),
            };
            let mut t = rec(&s, 64);
            Drainer::new(&counted, &s.snap, &mut t, None).run().unwrap();
            assert_eq!(image(&s), s.data, "{engine:?}");
            assert_eq!(*counted.batches.lock().unwrap(), vec![16], "{engine:?}");
            assert_eq!(s.snap.slots.used(), 0);
        }
    }

    fn spec_name(e: IoEngine) -> &'static str {
        match e {
            IoEngine::Uring => "uring",
            _ => "sync",
        }
    }
}
