//! Per-chunk state of one snapshot.
//!
//! Design notes
//! - The disk is cut into chunks of `chunk_size` bytes (a power of two, 64 KiB by
//!   default); the last chunk may be short when the disk size is not a multiple.
//! - State encoding (bit planes, [`PagedBits`], one bit per chunk each):
//!
//!   | pending | done | in `preserved` | state |
//!   |---|---|---|---|
//!   | 0 | 0 | no  | out of scope: never copied; writes pass straight through |
//!   | 1 | 0 | no  | pending: the original is still on the origin, not copied yet |
//!   | 0 | 0 | yes | preserved: the original sits in a container slot |
//!   | 0 | 1 | no  | done: copied to the target; writes pass straight through |
//!
//!   A third plane, `zero`, marks pending chunks whose content at the instant is known
//!   to be zeros without reading them: free space of the filesystem on the disk, holes
//!   of a sparse origin file ([`ChunkMap::mark_zero`], after the instant). A zero
//!   chunk is pending, never busy and never preserved: a write passes straight
//!   through (the image holds zeros there whatever is written now), and the drainer
//!   takes runs of whole zero granules without reading ([`ClaimResult::Claimed`] with
//!   `zero` set) and hands them to the target as a zero range. Only whole granules
//!   that are pending, not busy and hold no preserved chunk become zero, so a chunk a
//!   writer already preserved or is preserving keeps its data path.
//!
//!   Preserved chunks are few (at most the container's slots), so they are kept in a
//!   `BTreeMap<chunk, slot>` rather than a full-size plane. The planes are paged: a
//!   page of 32 Ki chunks whose bits are all 0 or all 1 is a header without words, so a
//!   fresh map and long uniform runs (a full backup's `pending`, `mark_zero` over free
//!   space, the drainer's done runs) cost page headers only (under 1 MiB at 16 TiB);
//!   only mixed pages hold words, 4 KiB each, at most 3 bits per chunk with the zero
//!   plane (96 MiB for a 16 TiB disk at 64 KiB chunks if every page were mixed). Busy
//!   marks are a small set
//!   (at most one per writer plus the drainer's batch).
//! - Creating a map makes the planes' page headers and sets `pending` (all ones, or the
//!   change-log cut widened to whole target granules). Nothing is read from the disk:
//!   the cost is the headers plus the pages the cut partly covers, independent of what
//!   is on the disk.
//! - Transitions, all under the one mutex and never across I/O:
//!   pending → busy(writer) → preserved (`mark_preserved`) or back to pending (`release`);
//!   pending → busy(drainer) → done (`mark_copied`); preserved → done (`mark_drained`, after the
//!   target write). `pending` only ever goes from 1 to 0, so a chunk seen not-pending
//!   never needs preserving again.
//! - Writers wait (condvar) only for a busy chunk; busy holders only do I/O and never
//!   wait for another busy mark or a slot while holding one, so there is no
//!   lock-order cycle (the one wait inside that I/O, a live restore's fill marks, is
//!   ordered after busy marks: see the crate's locking table). The drainer never
//!   waits for a busy chunk: it skips the granule and comes back.
//! - `drop_snapshot` releases every waiter; from then on every chunk reads as
//!   "pass through" for writers.
//! - The busy marks are a [`BusySet`] inside the state, not a
//!   [`BusyMarks`](crate::busy::BusyMarks) with a lock of its own as the live
//!   restore's fill marks are: a mark is taken in one decision with the chunk's state
//!   and given back by the state change itself, and waiters wake for either (see
//!   [`crate::busy`]).

use crate::busy::BusySet;
use crate::container::SlotIdx;
use crate::error::Result;
use crate::paged_bits::PagedBits;
use bitvec::prelude::*;
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Default tracking chunk size (64 KiB); see `engine::check_chunk_size` for the range.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;

/// Disk size and chunking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Chunk size in bytes (power of two).
    pub chunk_size: u32,
    shift: u32,
    /// Number of chunks (the last may be short).
    pub nchunks: u64,
}

impl Geometry {
    /// Chunking of a disk.
    pub fn new(disk_size: u64, chunk_size: u32) -> Result<Self> {
        if !chunk_size.is_power_of_two() {
            return Err(crate::err!(
                InvalidInput,
                "chunk size {chunk_size} is not a power of two"
            ));
        }
        let shift = chunk_size.trailing_zeros();
        // cannot overflow: disk_size >> shift < 2^64 and we add at most 1
        let nchunks =
            (disk_size >> shift) + u64::from(disk_size & (u64::from(chunk_size) - 1) != 0);
        if usize::try_from(nchunks).is_err() {
            return Err(crate::err!(
                InvalidInput,
                "disk of {disk_size} bytes has too many chunks"
            ));
        }
        Ok(Geometry {
            disk_size,
            chunk_size,
            shift,
            nchunks,
        })
    }

    /// Chunk holding byte `off`.
    pub fn chunk_of(&self, off: u64) -> u64 {
        off >> self.shift
    }

    /// First byte of chunk `c` (c <= nchunks, so this cannot overflow past the disk size
    /// rounded up to a chunk).
    pub fn chunk_off(&self, c: u64) -> u64 {
        c << self.shift
    }

    /// Length of chunk `c` in bytes (short for the last chunk).
    pub fn chunk_len(&self, c: u64) -> u64 {
        let off = self.chunk_off(c);
        u64::from(self.chunk_size).min(self.disk_size.saturating_sub(off))
    }

    /// End byte (exclusive) of chunks `..end`, clipped to the disk.
    pub fn end_off(&self, end_chunk: u64) -> u64 {
        self.chunk_off(end_chunk).min(self.disk_size)
    }

    /// Chunks touched by `off..off+len` (empty for len 0). Callers validated the range.
    pub fn chunks_of(&self, off: u64, len: u64) -> Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let last = off.saturating_add(len - 1);
        self.chunk_of(off)..self.chunk_of(last) + 1
    }

    /// First byte of chunk `c` (the one chunk → byte conversion of [`ChunkIdx`]).
    pub fn byte_offset(&self, c: ChunkIdx) -> u64 {
        self.chunk_off(c.0)
    }

    /// End byte (exclusive) of chunks `..end`, clipped to the disk.
    pub fn byte_end(&self, end: ChunkIdx) -> u64 {
        self.end_off(end.0)
    }

    /// Length of chunk `c` in bytes (short for the last chunk).
    pub fn byte_len(&self, c: ChunkIdx) -> u64 {
        self.chunk_len(c.0)
    }
}

/// Index of an engine (tracking) chunk, the unit of the chunk map: `chunk_size` bytes
/// ([`Geometry`]). The drainer and its interfaces (a [`Claim`], the map calls it makes,
/// its priority ranges) use this type, so it cannot be mixed up with the other address
/// spaces that meet there:
/// - a granule ([`GranuleIdx`]): the target's unit, `granule` chunks;
/// - a repository chunk: the repository's own chunk size. A repository target's
///   granule is one repository chunk when that is at least the tracking chunk
///   (`RepoTarget::granule_chunks`); the drainer never numbers repository chunks, it
///   hands the target byte ranges of whole granules;
/// - a container slot ([`SlotIdx`]): where a preserved chunk's original sits.
///
/// Conversions, one place each: chunk → bytes in [`Geometry::byte_offset`],
/// [`Geometry::byte_end`], [`Geometry::byte_len`]; chunk ↔ granule in
/// [`ChunkMap::granule_of`], [`ChunkMap::granule_chunks`], [`ChunkMap::granules_before`];
/// slot → bytes in [`SlotIdx::byte_offset`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkIdx(pub u64);

impl ChunkIdx {
    /// The next chunk. Cannot overflow: chunk numbers are below the chunk count, which
    /// fits a `usize`.
    pub fn next(self) -> ChunkIdx {
        ChunkIdx(self.0 + 1)
    }
}

/// Index of a target granule: granule `g` is chunks `g × granule .. (g + 1) × granule`
/// (the last one may be short). See [`ChunkIdx`] for the other address spaces it must
/// not be mixed up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct GranuleIdx(pub u64);

/// The state of one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    /// Not part of this backup.
    OutOfScope,
    /// Original on the origin, not copied yet.
    Pending,
    /// Original in a container slot.
    Preserved(SlotIdx),
    /// Copied to the target.
    Done,
}

/// What a writer must do for a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteClaim {
    /// Nothing: the chunk is done, preserved, out of scope, or the snapshot was dropped.
    PassThrough {
        /// The writer waited for a busy mark first.
        waited: bool,
    },
    /// The caller now holds the busy mark and must preserve the chunk, then call
    /// [`ChunkMap::mark_preserved`] or [`ChunkMap::release`].
    Preserve {
        /// The writer waited for a busy mark first.
        waited: bool,
    },
}

/// A run of whole granules the drainer holds: every pending chunk in `first..end` is
/// marked busy, the preserved ones are listed with their slots. A `zero` claim is a run
/// of zero granules, already done in the map (nothing to read, no busy marks): the
/// target stores it as zeros.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// First chunk.
    pub first: ChunkIdx,
    /// End chunk (exclusive).
    pub end: ChunkIdx,
    /// Preserved chunks in the run, ascending.
    pub preserved: Vec<(ChunkIdx, SlotIdx)>,
    /// The run is known zeros (see the module notes).
    pub zero: bool,
}

impl Claim {
    /// Chunks in the run.
    pub fn len(&self) -> u64 {
        self.end.0 - self.first.0
    }

    /// Whether the run holds no chunk.
    pub fn is_empty(&self) -> bool {
        self.end <= self.first
    }

    fn range(&self) -> Range<u64> {
        self.first.0..self.end.0
    }
}

/// Most granules one zero claim takes (bounds the time the map's mutex is held:
/// one bit-plane pass over this many granules).
pub const MAX_ZERO_CLAIM_GRANULES: u64 = 1 << 16;

/// Result of [`ChunkMap::try_claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimResult {
    /// Claimed.
    Claimed(Claim),
    /// The first granule has a pending chunk a writer is preserving: try later.
    Busy,
    /// The first granule has nothing to copy.
    Nothing,
}

struct State {
    pending: PagedBits,
    done: PagedBits,
    /// Pending chunks known to be zeros (module notes); a subset of `pending`.
    zero: PagedBits,
    zero_count: u64,
    preserved: BTreeMap<u64, SlotIdx>,
    /// Chunk busy marks: part of the state, decided and released with it
    /// (see [`crate::busy`]).
    busy: BusySet,
    pending_count: u64,
    dropped: bool,
    /// Writers waiting in `claim_for_write` for a busy mark.
    waiting: u64,
}

/// Chunk states of one snapshot.
pub struct ChunkMap {
    geo: Geometry,
    granule: u64,
    in_scope: u64,
    st: Mutex<State>,
    cv: Condvar,
}

impl ChunkMap {
    /// A map where `scope` (one bit per chunk, widened here to whole granules of
    /// `granule` chunks) is pending, or every chunk when `scope` is `None`.
    pub fn new(geo: Geometry, granule: u64, scope: Option<&BitSlice<u64, Lsb0>>) -> Self {
        let n = geo.nchunks as usize;
        let granule = granule.max(1);
        // O(pages) plus the set bits of the cut beyond the scan: a fresh plane is
        // uniform pages, no words, until a page is partly set.
        let (pending, pending_count) = match scope {
            None => (PagedBits::new(n, true), geo.nchunks),
            Some(bits) => {
                let mut p = PagedBits::new(n, false);
                let mut count = 0u64;
                let mut last_g = u64::MAX;
                for c in bits.iter_ones().take_while(|&c| c < n) {
                    let g = c as u64 / granule;
                    if g == last_g {
                        continue;
                    }
                    last_g = g;
                    let a = (g * granule) as usize;
                    let b = ((g + 1) * granule).min(geo.nchunks) as usize;
                    p.fill(a..b, true);
                    count += (b - a) as u64;
                }
                (p, count)
            }
        };
        ChunkMap {
            geo,
            granule,
            in_scope: pending_count,
            st: Mutex::new(State {
                pending,
                done: PagedBits::new(n, false),
                zero: PagedBits::new(n, false),
                zero_count: 0,
                preserved: BTreeMap::new(),
                busy: BusySet::new(),
                pending_count,
                dropped: false,
                waiting: 0,
            }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }

    /// Granule in chunks.
    pub fn granule(&self) -> u64 {
        self.granule
    }

    /// Number of granules (the last one may be short).
    pub fn granule_count(&self) -> u64 {
        self.geo.nchunks.div_ceil(self.granule)
    }

    /// The granule holding chunk `c`.
    pub fn granule_of(&self, c: ChunkIdx) -> GranuleIdx {
        GranuleIdx(c.0 / self.granule)
    }

    /// The granules before chunk `end`: the first granule not below it (a claim's
    /// limit for chunks `..end`).
    pub fn granules_before(&self, end: ChunkIdx) -> GranuleIdx {
        GranuleIdx(end.0.div_ceil(self.granule))
    }

    /// The chunks of granule `g`, clipped to the disk. Cannot overflow: `g` comes from
    /// a chunk index of this disk, so `(g + 1) × granule` is at most the chunk count
    /// rounded up to a granule.
    pub fn granule_chunks(&self, g: GranuleIdx) -> Range<ChunkIdx> {
        let a = g.0 * self.granule;
        ChunkIdx(a.min(self.geo.nchunks))
            ..ChunkIdx(((g.0 + 1) * self.granule).min(self.geo.nchunks))
    }

    /// Chunks in scope at the snapshot instant.
    pub fn in_scope(&self) -> u64 {
        self.in_scope
    }

    /// Heap bytes the three bit planes hold now: page headers plus mixed pages (the
    /// status's `bitmap_bytes`). At most 3 bits per chunk plus the headers, when every
    /// page is mixed.
    pub fn plane_heap_bytes(&self) -> u64 {
        let st = self.lock();
        (st.pending.heap_bytes() + st.done.heap_bytes() + st.zero.heap_bytes()) as u64
    }

    /// Mark the whole granules inside chunks `first..end` that are pending, not busy
    /// and hold no preserved chunk as known zeros (see the module notes). The caller
    /// knows their content at the instant is zeros (or, for free space, irrelevant).
    /// Returns how many bytes became zero. Works in pieces so writers are not kept
    /// off the mutex for long.
    pub fn mark_zero(&self, first: u64, end: u64) -> u64 {
        let end = end.min(self.geo.nchunks);
        // whole granules only: round the start up, the end down (the disk's last,
        // short granule counts as whole when `end` reaches the disk's end)
        let mut g = first.div_ceil(self.granule);
        let g_end = if end == self.geo.nchunks {
            self.granule_count()
        } else {
            end / self.granule
        };
        let mut marked = 0;
        while g < g_end {
            let piece_end = (g + MAX_ZERO_CLAIM_GRANULES).min(g_end);
            let mut st = self.lock();
            if st.dropped {
                break;
            }
            // the common case: the whole piece is untouched, one pass over the planes
            let (pa, pb) = (
                (g * self.granule) as usize,
                (piece_end * self.granule).min(self.geo.nchunks) as usize,
            );
            if st.pending.all(pa..pb)
                && !st.zero.any(pa..pb)
                && st.preserved.range(pa as u64..pb as u64).next().is_none()
                && !st.busy.any_in(pa as u64..pb as u64)
            {
                st.zero.fill(pa..pb, true);
                st.zero_count += (pb - pa) as u64;
                marked += self.geo.end_off(pb as u64) - self.geo.chunk_off(pa as u64);
                drop(st);
                g = piece_end;
                continue;
            }
            for gi in g..piece_end {
                let a = (gi * self.granule) as usize;
                let b = ((gi + 1) * self.granule).min(self.geo.nchunks) as usize;
                if !st.pending.all(a..b) || st.zero.any(a..b) {
                    continue;
                }
                if st.preserved.range(a as u64..b as u64).next().is_some()
                    || st.busy.any_in(a as u64..b as u64)
                {
                    continue;
                }
                st.zero.fill(a..b, true);
                st.zero_count += (b - a) as u64;
                marked += self.geo.end_off(b as u64) - self.geo.chunk_off(a as u64);
            }
            drop(st);
            g = piece_end;
        }
        marked
    }

    /// Chunks currently marked zero and not yet taken by the drainer.
    pub fn zero_count(&self) -> u64 {
        self.lock().zero_count
    }

    /// State of chunk `c`.
    pub fn state(&self, c: u64) -> ChunkState {
        let st = self.lock();
        Self::state_of(&st, c)
    }

    /// State of chunk `c` and whether it is marked zero (one lock, so the two agree).
    pub fn state_and_zero(&self, c: u64) -> (ChunkState, bool) {
        let st = self.lock();
        (Self::state_of(&st, c), st.zero.get(c as usize))
    }

    fn state_of(st: &State, c: u64) -> ChunkState {
        if let Some(s) = st.preserved.get(&c) {
            ChunkState::Preserved(*s)
        } else if st.pending.get(c as usize) {
            ChunkState::Pending
        } else if st.done.get(c as usize) {
            ChunkState::Done
        } else {
            ChunkState::OutOfScope
        }
    }

    /// Chunks still to copy (pending + preserved).
    pub fn remaining(&self) -> u64 {
        let st = self.lock();
        st.pending_count + st.preserved.len() as u64
    }

    /// Chunks currently preserved.
    pub fn preserved_count(&self) -> u64 {
        self.lock().preserved.len() as u64
    }

    /// Whether a write to `c` would have to preserve it (a hint: the answer may go
    /// from true to false, never the other way).
    pub fn needs_preserve(&self, c: u64) -> bool {
        let st = self.lock();
        !st.dropped && st.pending.get(c as usize) && !st.zero.get(c as usize)
    }

    /// A writer is about to change chunk `c`: wait while it is busy, then either pass
    /// through or take the busy mark to preserve it.
    pub fn claim_for_write(&self, c: u64) -> WriteClaim {
        let mut st = self.lock();
        let mut waited = false;
        loop {
            if st.dropped {
                return WriteClaim::PassThrough { waited };
            }
            if st.zero.get(c as usize) {
                // zeros in the image whatever is written now: nothing to preserve
                return WriteClaim::PassThrough { waited };
            }
            if st.busy.is_marked(c) {
                waited = true;
                st.waiting += 1;
                st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
                st.waiting -= 1;
                continue;
            }
            if st.pending.get(c as usize) {
                st.busy.mark(c);
                return WriteClaim::Preserve { waited };
            }
            return WriteClaim::PassThrough { waited };
        }
    }

    /// The writer holding `c` stored its original in `slot`.
    pub fn mark_preserved(&self, c: u64, slot: SlotIdx) {
        let mut st = self.lock();
        st.busy.unmark(c);
        if st.pending.get(c as usize) {
            st.pending.set(c as usize, false);
            st.pending_count -= 1;
            st.preserved.insert(c, slot);
        }
        drop(st);
        self.cv.notify_all();
    }

    /// The holder of `c` gives up its busy mark without changing the state.
    pub fn release(&self, c: u64) {
        let mut st = self.lock();
        st.busy.unmark(c);
        drop(st);
        self.cv.notify_all();
    }

    /// Writers waiting for a busy mark right now.
    pub fn writers_waiting(&self) -> u64 {
        self.lock().waiting
    }

    /// Drop the snapshot: every waiter and every later writer passes through.
    pub fn drop_snapshot(&self) {
        let mut st = self.lock();
        st.dropped = true;
        drop(st);
        self.cv.notify_all();
    }

    /// Whether the snapshot was dropped.
    pub fn is_dropped(&self) -> bool {
        self.lock().dropped
    }

    /// First chunk at or after `from` that still needs copying (pending or preserved).
    pub fn next_work_from(&self, from: ChunkIdx) -> Option<ChunkIdx> {
        let from = from.0;
        if from >= self.geo.nchunks {
            return None;
        }
        let st = self.lock();
        let p = st
            .pending
            .first(from as usize..self.geo.nchunks as usize, true)
            .map(|i| i as u64);
        let q = st.preserved.range(from..).next().map(|(c, _)| *c);
        match (p, q) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
        .map(ChunkIdx)
    }

    /// First preserved chunk at or after `from`.
    pub fn next_preserved_from(&self, from: ChunkIdx) -> Option<ChunkIdx> {
        let st = self.lock();
        st.preserved
            .range(from.0..)
            .next()
            .map(|(c, _)| ChunkIdx(*c))
    }

    /// Claim up to `max` whole granules starting at granule `g`, stopping before
    /// granule `limit` and at the first granule with nothing to copy or a busy chunk
    /// (or, with `preserved_only`, without a preserved chunk: draining the container
    /// should not wait for origin reads).
    pub fn try_claim(
        &self,
        g: GranuleIdx,
        max: u64,
        limit: GranuleIdx,
        preserved_only: bool,
    ) -> Result<ClaimResult> {
        let g = g.0;
        let limit = limit.0.min(self.granule_count());
        let mut st = self.lock();
        if st.dropped {
            return Ok(ClaimResult::Nothing);
        }
        if g < limit && st.zero.get((g * self.granule) as usize) {
            return Ok(ClaimResult::Claimed(self.take_zero_run(
                &mut st,
                g,
                limit.min(g + MAX_ZERO_CLAIM_GRANULES),
            )));
        }
        let mut claim = Claim {
            first: ChunkIdx(g * self.granule),
            end: ChunkIdx(g * self.granule),
            preserved: Vec::new(),
            zero: false,
        };
        let mut gi = g;
        while gi < limit && gi - g < max.max(1) {
            let a = gi * self.granule;
            let b = ((gi + 1) * self.granule).min(self.geo.nchunks);
            let npending = st.pending.count_ones(a as usize..b as usize) as u64;
            let pres: Vec<(u64, SlotIdx)> =
                st.preserved.range(a..b).map(|(c, s)| (*c, *s)).collect();
            if (npending == 0 && pres.is_empty()) || (preserved_only && pres.is_empty()) {
                break;
            }
            if npending + pres.len() as u64 != b - a {
                // a granule partly done or partly out of scope: granules are always
                // scoped and copied whole, so this is a bug, not a disk state
                st.busy.unmark_range(claim.range());
                drop(st);
                self.cv.notify_all();
                return Err(crate::err!(
                    Corrupt,
                    "unable to copy chunks {a}..{b}: the granule is partly copied"
                ));
            }
            if st.busy.any_in(a..b) || st.zero.get(a as usize) {
                // busy, or a zero run: that goes in a claim of its own
                break;
            }
            for c in a..b {
                if st.pending.get(c as usize) {
                    st.busy.mark(c);
                }
            }
            claim
                .preserved
                .extend(pres.into_iter().map(|(c, s)| (ChunkIdx(c), s)));
            claim.end = ChunkIdx(b);
            gi += 1;
        }
        if claim.end > claim.first {
            return Ok(ClaimResult::Claimed(claim));
        }
        if gi < limit {
            let a = gi * self.granule;
            let b = ((gi + 1) * self.granule).min(self.geo.nchunks);
            let has =
                st.pending.any(a as usize..b as usize) || st.preserved.range(a..b).next().is_some();
            if has {
                return Ok(ClaimResult::Busy);
            }
        }
        Ok(ClaimResult::Nothing)
    }

    /// Take the run of zero granules from `g` (which is zero) up to `limit`: they
    /// become done at once (nothing to read, so no busy marks).
    fn take_zero_run(&self, st: &mut State, g: u64, limit: u64) -> Claim {
        let a = (g * self.granule) as usize;
        let max_end = (limit * self.granule).min(self.geo.nchunks) as usize;
        // zero marks are whole granules, so the first non-zero chunk is on a boundary
        let b = st.zero.first(a..max_end, false).unwrap_or(max_end);
        st.zero.fill(a..b, false);
        st.pending.fill(a..b, false);
        st.done.fill(a..b, true);
        let n = (b - a) as u64;
        st.zero_count -= n;
        st.pending_count -= n;
        Claim {
            first: ChunkIdx(a as u64),
            end: ChunkIdx(b as u64),
            preserved: Vec::new(),
            zero: true,
        }
    }

    /// The drainer has read the pending chunks of `claim` (into memory): they are done
    /// and their busy marks released. The preserved ones stay until [`Self::mark_drained`].
    pub fn mark_copied(&self, claim: &Claim) {
        let mut st = self.lock();
        for c in claim.range() {
            if st.pending.get(c as usize) {
                st.pending.set(c as usize, false);
                st.pending_count -= 1;
                st.done.set(c as usize, true);
            }
            st.busy.unmark(c);
        }
        drop(st);
        self.cv.notify_all();
    }

    /// The drainer gives up `claim` without copying (failure path).
    pub fn abandon(&self, claim: &Claim) {
        let mut st = self.lock();
        st.busy.unmark_range(claim.range());
        drop(st);
        self.cv.notify_all();
    }

    /// The preserved chunk `c` reached the target; returns its slot to free.
    pub fn mark_drained(&self, c: ChunkIdx) -> Option<SlotIdx> {
        let mut st = self.lock();
        let s = st.preserved.remove(&c.0);
        if s.is_some() {
            st.done.set(c.0 as usize, true);
        }
        drop(st);
        self.cv.notify_all();
        s
    }

    /// Wait until some chunk changes state or `timeout` passes.
    pub fn wait_change(&self, timeout: Duration) {
        let st = self.lock();
        let _ = self.cv.wait_timeout(st, timeout);
    }

    /// Counts: (pending, preserved, done).
    pub fn counts(&self) -> (u64, u64, u64) {
        let st = self.lock();
        (
            st.pending_count,
            st.preserved.len() as u64,
            st.done.count_all_ones() as u64,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::wait_for;
    use std::sync::Arc;

    fn geo(size: u64) -> Geometry {
        Geometry::new(size, 65536).unwrap()
    }

    #[test]
    fn geometry_short_last_chunk() {
        let g = geo(3 * 65536 + 100);
        assert_eq!(g.nchunks, 4);
        assert_eq!(g.chunk_len(3), 100);
        assert_eq!(g.chunk_len(0), 65536);
        assert_eq!(g.chunks_of(65535, 2), 0..2);
        assert_eq!(g.chunks_of(3 * 65536 + 99, 1), 3..4);
        assert_eq!(g.chunks_of(0, 0), 0..0);
        assert_eq!(g.end_off(4), 3 * 65536 + 100);
        assert!(Geometry::new(100, 3000).is_err());
    }

    #[test]
    fn write_claim_lifecycle() {
        let m = ChunkMap::new(geo(4 * 65536), 1, None);
        assert_eq!(m.in_scope(), 4);
        assert_eq!(m.state(1), ChunkState::Pending);
        assert_eq!(m.claim_for_write(1), WriteClaim::Preserve { waited: false });
        m.mark_preserved(1, SlotIdx(7));
        assert_eq!(m.state(1), ChunkState::Preserved(SlotIdx(7)));
        assert_eq!(
            m.claim_for_write(1),
            WriteClaim::PassThrough { waited: false }
        );
        assert!(!m.needs_preserve(1));
        assert_eq!(m.remaining(), 4);
        // release keeps the chunk pending
        assert_eq!(m.claim_for_write(2), WriteClaim::Preserve { waited: false });
        m.release(2);
        assert_eq!(m.state(2), ChunkState::Pending);
    }

    #[test]
    fn scope_is_widened_to_granules() {
        let mut bits: BitVec<u64, Lsb0> = BitVec::repeat(false, 10);
        bits.set(5, true);
        bits.set(9, true);
        let m = ChunkMap::new(geo(10 * 65536), 4, Some(&bits));
        // granules 4..8 and 8..10 (short)
        assert_eq!(m.in_scope(), 6);
        assert_eq!(m.state(0), ChunkState::OutOfScope);
        assert_eq!(m.state(4), ChunkState::Pending);
        assert_eq!(m.state(8), ChunkState::Pending);
        assert_eq!(
            m.claim_for_write(0),
            WriteClaim::PassThrough { waited: false }
        );
        assert_eq!(m.next_work_from(ChunkIdx(0)), Some(ChunkIdx(4)));
    }

    #[test]
    fn drainer_claims_whole_granules_and_skips_busy() {
        let m = ChunkMap::new(geo(8 * 65536), 2, None);
        assert_eq!(m.claim_for_write(3), WriteClaim::Preserve { waited: false });
        // granule 1 (chunks 2,3) is busy
        assert_eq!(
            m.try_claim(GranuleIdx(1), 4, GranuleIdx(u64::MAX), false)
                .unwrap(),
            ClaimResult::Busy
        );
        // from granule 0: stops before the busy granule
        match m
            .try_claim(GranuleIdx(0), 4, GranuleIdx(u64::MAX), false)
            .unwrap()
        {
            ClaimResult::Claimed(c) => {
                assert_eq!((c.first, c.end), (ChunkIdx(0), ChunkIdx(2)));
                m.mark_copied(&c);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(m.state(0), ChunkState::Done);
        m.mark_preserved(3, SlotIdx(0));
        match m.try_claim(GranuleIdx(1), 4, GranuleIdx(3), false).unwrap() {
            ClaimResult::Claimed(c) => {
                assert_eq!((c.first, c.end), (ChunkIdx(2), ChunkIdx(6)));
                assert_eq!(c.preserved, vec![(ChunkIdx(3), SlotIdx(0))]);
                m.mark_copied(&c);
                assert_eq!(m.mark_drained(ChunkIdx(3)), Some(SlotIdx(0)));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(m.state(3), ChunkState::Done);
        assert_eq!(
            m.try_claim(GranuleIdx(0), 4, GranuleIdx(u64::MAX), false)
                .unwrap(),
            ClaimResult::Nothing
        );
        assert_eq!(m.remaining(), 2);
        assert_eq!(m.counts(), (2, 0, 6));
    }

    #[test]
    fn writer_waits_for_drainer_busy_then_passes() {
        let m = Arc::new(ChunkMap::new(geo(2 * 65536), 1, None));
        let c = match m
            .try_claim(GranuleIdx(0), 1, GranuleIdx(u64::MAX), false)
            .unwrap()
        {
            ClaimResult::Claimed(c) => c,
            other => panic!("{other:?}"),
        };
        let m2 = m.clone();
        let t = std::thread::spawn(move || m2.claim_for_write(0));
        wait_for(|| m.writers_waiting() == 1);
        assert!(!t.is_finished(), "writer must wait for the drainer's copy");
        m.mark_copied(&c);
        assert_eq!(t.join().unwrap(), WriteClaim::PassThrough { waited: true });
    }

    #[test]
    fn drop_releases_waiters() {
        let m = Arc::new(ChunkMap::new(geo(2 * 65536), 1, None));
        assert_eq!(m.claim_for_write(0), WriteClaim::Preserve { waited: false });
        let m2 = m.clone();
        let t = std::thread::spawn(move || m2.claim_for_write(0));
        wait_for(|| m.writers_waiting() == 1);
        m.drop_snapshot();
        assert_eq!(t.join().unwrap(), WriteClaim::PassThrough { waited: true });
        assert!(!m.needs_preserve(1));
    }

    #[test]
    fn chunk_granule_and_byte_conversions_keep_the_units_apart() {
        // 4096-byte chunks, granules of 4 chunks (a 16 KiB repository chunk, say), 14
        // chunks: the last granule (chunks 12..14) is short, the last chunk too
        let g = Geometry::new(13 * 4096 + 100, 4096).unwrap();
        let m = ChunkMap::new(g, 4, None);
        assert_eq!(m.granule_count(), 4);
        // chunk 13 is in granule 3, not granule 13, and granule 3 starts at chunk 12
        assert_eq!(m.granule_of(ChunkIdx(13)), GranuleIdx(3));
        assert_eq!(m.granule_of(ChunkIdx(3)), GranuleIdx(0));
        assert_eq!(m.granule_chunks(GranuleIdx(3)), ChunkIdx(12)..ChunkIdx(14));
        assert_eq!(m.granule_chunks(GranuleIdx(1)), ChunkIdx(4)..ChunkIdx(8));
        assert_eq!(m.granules_before(ChunkIdx(5)), GranuleIdx(2));
        assert_eq!(m.granules_before(ChunkIdx(8)), GranuleIdx(2));
        // bytes of a chunk are chunk-sized steps, not granule-sized ones
        assert_eq!(g.byte_offset(ChunkIdx(3)), 3 * 4096);
        let first = m.granule_chunks(GranuleIdx(3)).start;
        assert_eq!(g.byte_offset(first), 12 * 4096);
        assert_eq!(g.byte_len(ChunkIdx(13)), 100, "the short last chunk");
        assert_eq!(
            g.byte_end(ChunkIdx(14)),
            13 * 4096 + 100,
            "clipped to the disk"
        );
        // a claim of granule 1 covers chunks 4..8, bytes 16 KiB..32 KiB
        let ClaimResult::Claimed(c) = m.try_claim(GranuleIdx(1), 1, GranuleIdx(4), false).unwrap()
        else {
            panic!("no claim")
        };
        assert_eq!((c.first, c.end, c.len()), (ChunkIdx(4), ChunkIdx(8), 4));
        assert_eq!(
            (g.byte_offset(c.first), g.byte_end(c.end)),
            (4 * 4096, 8 * 4096)
        );
        m.abandon(&c);
    }

    #[test]
    fn bitmap_memory_is_at_most_three_bits_per_chunk_and_headers() {
        let m = ChunkMap::new(geo(1 << 30), 1, None);
        let uniform = m.plane_heap_bytes();
        assert!(
            uniform < 1024,
            "a uniform map holds page headers only: {uniform}"
        );
        // one claim makes the pending and done pages mixed: two pages of 16384 bits
        let ClaimResult::Claimed(c) = m
            .try_claim(GranuleIdx(0), 1, GranuleIdx(u64::MAX), false)
            .unwrap()
        else {
            panic!("nothing to claim")
        };
        m.mark_copied(&c);
        let mixed = m.plane_heap_bytes();
        assert!(
            mixed > uniform && mixed <= uniform + 3 * (16384 / 8),
            "{mixed}"
        );
    }

    #[test]
    fn uniform_planes_hold_page_headers_only() {
        // 1 TiB at 64 KiB chunks: 16 Mi chunks, 512 pages per plane
        let m = ChunkMap::new(geo(1 << 40), 16, None);
        let fresh = m.plane_heap_bytes();
        assert!(fresh <= 3 * 512 * 64, "{fresh} bytes for a fresh map");
        // marking the first half zero (zero chunks stay pending) writes headers only
        let n = m.geometry().nchunks;
        assert_eq!(m.mark_zero(0, n / 2), (n / 2) * 65536);
        assert_eq!(m.plane_heap_bytes(), fresh);
        // a claim copied partway into a page costs that page's words in two planes
        let ClaimResult::Claimed(c) = m
            .try_claim(
                m.granule_of(ChunkIdx(n / 2)),
                1,
                GranuleIdx(m.granule_count()),
                false,
            )
            .unwrap()
        else {
            panic!("no claim")
        };
        m.mark_copied(&c);
        assert_eq!(m.plane_heap_bytes(), fresh + 2 * 4096);
        assert_eq!(m.counts(), (n - 16, 0, 16));
    }

    #[test]
    fn zero_marks_only_whole_untouched_granules() {
        // 10 chunks, granules of 4 (the last one short: chunks 8..10)
        let m = ChunkMap::new(geo(10 * 65536), 4, None);
        // a writer is preserving chunk 1, chunk 5 is preserved already
        assert_eq!(m.claim_for_write(1), WriteClaim::Preserve { waited: false });
        assert_eq!(m.claim_for_write(5), WriteClaim::Preserve { waited: false });
        m.mark_preserved(5, SlotIdx(0));
        // partial granules at both ends are left alone: 3..10 covers granule 2 only
        // whole, and the short last granule counts as whole at the disk's end
        assert_eq!(m.mark_zero(3, 10), 2 * 65536);
        assert_eq!(m.zero_count(), 2);
        // granules 0 (busy chunk) and 1 (preserved chunk) were refused
        assert_eq!(m.mark_zero(0, 8), 0);
        m.release(1);
        assert_eq!(m.mark_zero(0, 4), 4 * 65536);
        assert_eq!(m.mark_zero(0, 4), 0, "marking twice counts once");
        // a write to a zero chunk needs nothing preserved and never waits
        assert!(!m.needs_preserve(9));
        assert_eq!(
            m.claim_for_write(9),
            WriteClaim::PassThrough { waited: false }
        );
        assert_eq!(m.state_and_zero(9), (ChunkState::Pending, true));
        assert_eq!(m.remaining(), 10);
    }

    #[test]
    fn zero_runs_are_claimed_on_their_own_and_done_at_once() {
        let m = ChunkMap::new(geo(12 * 65536), 2, None);
        // granules 1, 2, 3 (chunks 2..8) zero; granule 0 and 4.. normal
        assert_eq!(m.mark_zero(2, 8), 6 * 65536);
        // a normal claim stops before the zero run
        let ClaimResult::Claimed(c) = m
            .try_claim(GranuleIdx(0), 10, GranuleIdx(6), false)
            .unwrap()
        else {
            panic!("no claim")
        };
        assert_eq!((c.first, c.end, c.zero), (ChunkIdx(0), ChunkIdx(2), false));
        m.mark_copied(&c);
        // the zero run is one claim, done already, nothing busy
        let ClaimResult::Claimed(z) = m.try_claim(GranuleIdx(1), 1, GranuleIdx(6), false).unwrap()
        else {
            panic!("no zero claim")
        };
        assert_eq!((z.first, z.end, z.zero), (ChunkIdx(2), ChunkIdx(8), true));
        for c in 2..8 {
            assert_eq!(m.state_and_zero(c), (ChunkState::Done, false));
        }
        assert_eq!(m.zero_count(), 0);
        assert_eq!(m.remaining(), 4);
        assert_eq!(m.next_work_from(ChunkIdx(2)), Some(ChunkIdx(8)));
    }
}
