//! [`DiscardMarks`]: the chunks whose last change was a TRIM or WRITE_ZEROES covering
//! the whole chunk, with no write since. A backup hands those chunks to its target as
//! zeros without reading them (`backup/scope.rs`), which matters where the origin
//! cannot say so itself: a block device (BLKDISCARD; what a read returns afterwards is
//! the device's business) has no holes to ask for.
//!
//! Design notes
//! - State: one [`PagedBits`] plane, a bit per tracking chunk, and the data-changing
//!   requests in flight (kind, byte range, "spoiled"), all under one mutex held for
//!   bit operations only, never across I/O. Requests in flight are bounded by the NBD
//!   server's workers, so the list is short.
//! - A write (any request that stores data) clears the bits of every chunk it touches,
//!   partly or wholly, *before* its origin I/O, and spoils every discard in flight that
//!   overlaps it. A discard (trim or write-zeroes) is registered before its I/O, spoiled
//!   at once when an overlapping write is in flight, and on success sets the bits of
//!   the chunks it covers wholly — unless it was spoiled. A partial discard of a chunk
//!   sets nothing; a failed one sets nothing. So a bit is 1 only if a discard of the
//!   whole chunk completed and no write to the chunk overlapped it or came after it.
//!   Overlapping discards need no care: either leaves the chunk discarded.
//! - The snapshot instant holds the engine's instant gate exclusively, so no request
//!   is in flight then and the plane is exactly "discarded and not written since" at
//!   the instant. The backup takes a copy ([`DiscardMarks::at_instant`]); the plane
//!   itself goes on (a mark is true whatever cut or backup came before).
//! - In memory only, deliberately: lost when the daemon stops, so every restart starts
//!   from "nothing known discarded" and those chunks are read, which is always right.
//!   A persisted plane would need the change log's whole durability argument (a crash
//!   between a write's data and its clearing of the bit would leave a stale 1 that
//!   turns data into zeros); reading a few chunks once after a restart is cheaper than
//!   that risk. Writes that bypass the daemon (the origin written while detached) do not
//!   matter for the same reason.
//! - Zeros for a discarded chunk are a faithful image: after a TRIM the NBD client may
//!   read anything from it, after WRITE_ZEROES it reads zeros.

use crate::paged_bits::PagedBits;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// What a request in flight does to its chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChangeKind {
    /// Stores data (write).
    Write,
    /// Leaves the range discarded or zero (trim, write-zeroes).
    Discard,
}

struct InFlight {
    id: u64,
    kind: ChangeKind,
    off: u64,
    end: u64,
    spoiled: bool,
}

struct State {
    plane: PagedBits,
    inflight: Vec<InFlight>,
    next_id: u64,
}

/// Whole-chunk discards not written since (see the module notes).
pub(crate) struct DiscardMarks {
    disk_size: u64,
    chunk_size: u64,
    state: Mutex<State>,
}

/// A registered request; hand it back to [`DiscardMarks::end`].
#[must_use]
pub(crate) struct Ticket(u64);

impl DiscardMarks {
    /// No chunk known discarded.
    pub(crate) fn new(disk_size: u64, chunk_size: u32) -> Self {
        let chunk_size = u64::from(chunk_size.max(1));
        // chunk count of a disk that exists in memory: fits usize on 64-bit hosts
        let nchunks = disk_size.div_ceil(chunk_size) as usize;
        DiscardMarks {
            disk_size,
            chunk_size,
            state: Mutex::new(State {
                plane: PagedBits::new(nchunks, false),
                inflight: Vec::new(),
                next_id: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Chunks `off..off+len` touches at all.
    fn touched(&self, off: u64, len: u64) -> std::ops::Range<usize> {
        let end = off.saturating_add(len).min(self.disk_size);
        if len == 0 || off >= end {
            return 0..0;
        }
        (off / self.chunk_size) as usize..end.div_ceil(self.chunk_size) as usize
    }

    /// Chunks `off..off+len` covers wholly (the disk's short last chunk counts as whole
    /// when the range reaches the disk's end).
    fn covered(&self, off: u64, end: u64) -> std::ops::Range<usize> {
        let end = end.min(self.disk_size);
        if off >= end {
            return 0..0;
        }
        let a = off.div_ceil(self.chunk_size);
        let b = if end == self.disk_size {
            self.disk_size.div_ceil(self.chunk_size)
        } else {
            end / self.chunk_size
        };
        if a >= b {
            return 0..0;
        }
        a as usize..b as usize
    }

    /// Register a request on `off..off+len` before its origin I/O (already checked
    /// against the disk's size).
    pub(crate) fn begin(&self, kind: ChangeKind, off: u64, len: u64) -> Ticket {
        let end = off.saturating_add(len);
        let mut st = self.lock();
        let overlaps = |f: &InFlight| f.off < end && off < f.end;
        let mut spoiled = false;
        match kind {
            ChangeKind::Write => {
                let r = self.touched(off, len);
                if !r.is_empty() {
                    st.plane.fill(r, false);
                }
                for f in st.inflight.iter_mut() {
                    if f.kind == ChangeKind::Discard && overlaps(f) {
                        f.spoiled = true;
                    }
                }
            }
            ChangeKind::Discard => {
                spoiled = st
                    .inflight
                    .iter()
                    .any(|f| f.kind == ChangeKind::Write && overlaps(f));
            }
        }
        let id = st.next_id;
        st.next_id += 1;
        st.inflight.push(InFlight {
            id,
            kind,
            off,
            end,
            spoiled,
        });
        Ticket(id)
    }

    /// The request of `t` is done (`ok`: its origin I/O succeeded).
    pub(crate) fn end(&self, t: Ticket, ok: bool) {
        let mut st = self.lock();
        let Some(i) = st.inflight.iter().position(|f| f.id == t.0) else {
            return;
        };
        let f = st.inflight.swap_remove(i);
        if f.kind == ChangeKind::Discard && ok && !f.spoiled {
            let r = self.covered(f.off, f.end);
            if !r.is_empty() {
                st.plane.fill(r, true);
            }
        }
    }

    /// A copy of the plane, taken at a snapshot instant (no request in flight: the
    /// caller holds the instant gate exclusively).
    pub(crate) fn at_instant(&self) -> PagedBits {
        // (an entry left by a request whose operation panicked can only spoil later
        // discards, never set a bit: harmless)
        self.lock().plane.clone()
    }

    /// Chunks marked now.
    #[cfg(test)]
    pub(crate) fn count(&self) -> usize {
        self.lock().plane.count_all_ones()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u32 = 65536;
    const C: u64 = CS as u64;

    fn marks() -> DiscardMarks {
        // 10.5 chunks: the last is short
        DiscardMarks::new(10 * C + C / 2, CS)
    }

    fn discard(m: &DiscardMarks, off: u64, len: u64) {
        let t = m.begin(ChangeKind::Discard, off, len);
        m.end(t, true);
    }

    fn write(m: &DiscardMarks, off: u64, len: u64) {
        let t = m.begin(ChangeKind::Write, off, len);
        m.end(t, true);
    }

    fn ones(m: &DiscardMarks) -> Vec<usize> {
        let p = m.at_instant();
        (0..p.len()).filter(|&i| p.get(i)).collect()
    }

    #[test]
    fn whole_chunks_only_and_the_short_last_chunk() {
        let m = marks();
        discard(&m, C / 2, 3 * C); // covers chunks 1 and 2 wholly, 0 and 3 partly
        assert_eq!(ones(&m), vec![1, 2]);
        discard(&m, 9 * C + 4096, C + C / 2 - 4096); // chunk 10 (short) wholly, 9 partly
        assert_eq!(ones(&m), vec![1, 2, 10]);
        discard(&m, 4 * C, C - 1); // one byte short: nothing
        assert_eq!(m.count(), 3);
    }

    #[test]
    fn a_later_write_clears_even_a_partial_one() {
        let m = marks();
        discard(&m, 0, 4 * C);
        write(&m, 2 * C + C - 1, 2); // one byte of chunk 2, one of chunk 3
        assert_eq!(ones(&m), vec![0, 1]);
        discard(&m, 2 * C, C); // discarded again: marked again
        assert_eq!(ones(&m), vec![0, 1, 2]);
    }

    #[test]
    fn a_failed_discard_marks_nothing() {
        let m = marks();
        let t = m.begin(ChangeKind::Discard, 0, 4 * C);
        m.end(t, false);
        assert_eq!(m.count(), 0);
    }

    #[test]
    fn overlapping_writes_spoil_a_discard_in_flight() {
        let m = marks();
        // a write in flight when the discard starts
        let w = m.begin(ChangeKind::Write, C, 10);
        let d = m.begin(ChangeKind::Discard, 0, 4 * C);
        m.end(w, true);
        m.end(d, true);
        assert_eq!(m.count(), 0, "the write may have landed after the discard");
        // a write starting while the discard is in flight
        let d = m.begin(ChangeKind::Discard, 0, 4 * C);
        let w = m.begin(ChangeKind::Write, 3 * C, 10);
        m.end(w, true);
        m.end(d, true);
        assert_eq!(m.count(), 0);
        // a write elsewhere does not spoil it
        let d = m.begin(ChangeKind::Discard, 0, 4 * C);
        let w = m.begin(ChangeKind::Write, 5 * C, 10);
        m.end(w, true);
        m.end(d, true);
        assert_eq!(ones(&m), vec![0, 1, 2, 3]);
        // a write that ended before the discard started is older than it
        write(&m, 6 * C, C);
        discard(&m, 6 * C, C);
        assert_eq!(ones(&m), vec![0, 1, 2, 3, 6]);
    }
}
