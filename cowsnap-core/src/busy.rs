//! Busy marks: at most one holder per chunk at a time.
//!
//! Design notes
//! - A busy mark says "someone is doing I/O on this chunk that another change to it
//!   must not overlap". Marks are held across I/O and never across a wait for
//!   anything but another busy mark of the same set.
//! - [`BusySet`] is the set itself (a `BTreeSet` of chunk numbers: small, at most one
//!   mark per writer plus a batch, and range queries are cheap). It has no lock of its
//!   own: the owner keeps it under the mutex that guards whatever the marks must agree
//!   with.
//! - [`BusyMarks`] is a set with its own mutex and condvar, for owners whose marks
//!   stand alone: [`BusyMarks::acquire`] takes several marks, always in ascending
//!   chunk order (it sorts them), waiting for each holder, and returns a
//!   [`BusyGuard`] that gives them all back when dropped. Two holders that take marks
//!   in the same order cannot deadlock: the holder of the highest mark either of them
//!   wants never waits for the other.
//!
//! Users, and why they differ
//! - The live restore's fill marks (`restore::live::FillingIo`) are a [`BusyMarks`]:
//!   a fetch or a write to unrestored chunks takes the marks, does its I/O, drops the
//!   guard. Nothing else has to be read together with them.
//! - The snapshot's chunk busy marks (`chunk_map::ChunkMap`) are a [`BusySet`] inside
//!   the chunk map's state, under the map's one mutex and condvar: taking a mark is
//!   one decision with the chunk's state (a writer takes the mark only if the chunk is
//!   pending, not zero and the snapshot not dropped; the drainer marks whole granules
//!   only if none of their chunks is marked), and giving it back is the state change
//!   itself (`mark_preserved`, `mark_copied`), so the waiters wake for either. A lock
//!   of their own would split that decision in two.
//! - The order between the two sets is fixed: chunk busy mark → fill mark (see the
//!   crate's locking table).

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// A set of busy chunks, without a lock (see the module notes).
#[derive(Debug, Default)]
pub struct BusySet {
    marks: BTreeSet<u64>,
}

impl BusySet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether chunk `c` is marked.
    pub fn is_marked(&self, c: u64) -> bool {
        self.marks.contains(&c)
    }

    /// Whether any chunk of `r` is marked.
    pub fn any_in(&self, r: Range<u64>) -> bool {
        r.start < r.end && self.marks.range(r).next().is_some()
    }

    /// Mark chunk `c`; `false` if it was marked already.
    pub fn mark(&mut self, c: u64) -> bool {
        self.marks.insert(c)
    }

    /// Unmark chunk `c` (nothing if it was not marked).
    pub fn unmark(&mut self, c: u64) {
        self.marks.remove(&c);
    }

    /// Unmark every chunk of `r`.
    pub fn unmark_range(&mut self, r: Range<u64>) {
        for c in r {
            self.marks.remove(&c);
        }
    }

    /// Marks held.
    pub fn len(&self) -> usize {
        self.marks.len()
    }

    /// Whether no chunk is marked.
    pub fn is_empty(&self) -> bool {
        self.marks.is_empty()
    }
}

struct Inner {
    set: BusySet,
    /// Threads waiting in `acquire` right now.
    waiting: u64,
}

/// A [`BusySet`] with its own mutex and condvar, taken through RAII guards.
pub struct BusyMarks {
    inner: Mutex<Inner>,
    cv: Condvar,
}

impl Default for BusyMarks {
    fn default() -> Self {
        Self::new()
    }
}

impl BusyMarks {
    /// No chunk marked.
    pub fn new() -> Self {
        BusyMarks {
            inner: Mutex::new(Inner {
                set: BusySet::new(),
                waiting: 0,
            }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Take the marks of `chunks` in ascending order (they are sorted here, duplicates
    /// dropped), waiting for each one's holder; marks already taken are kept while
    /// waiting for the next. The guard gives them all back.
    pub fn acquire(&self, mut chunks: Vec<u64>) -> BusyGuard<'_> {
        chunks.sort_unstable();
        chunks.dedup();
        // Built first, so the marks taken so far are given back even on unwinding.
        let mut guard = BusyGuard {
            marks: self,
            chunks: Vec::with_capacity(chunks.len()),
        };
        for c in chunks {
            let mut st = self.lock();
            while st.set.is_marked(c) {
                st.waiting += 1;
                st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
                st.waiting -= 1;
            }
            st.set.mark(c);
            drop(st);
            guard.chunks.push(c);
        }
        guard
    }

    /// Whether chunk `c` is marked right now.
    pub fn is_marked(&self, c: u64) -> bool {
        self.lock().set.is_marked(c)
    }

    /// Threads waiting for a mark right now.
    pub fn waiting(&self) -> u64 {
        self.lock().waiting
    }
}

/// Marks held on chunks (ascending); given back when dropped.
pub struct BusyGuard<'a> {
    marks: &'a BusyMarks,
    chunks: Vec<u64>,
}

impl BusyGuard<'_> {
    /// The chunks held, ascending.
    pub fn chunks(&self) -> &[u64] {
        &self.chunks
    }
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        if self.chunks.is_empty() {
            return;
        }
        let mut st = self.marks.lock();
        for &c in &self.chunks {
            st.set.unmark(c);
        }
        drop(st);
        self.marks.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::wait_for;
    use std::sync::mpsc;
    use std::sync::Arc;

    #[test]
    fn set_marks_ranges_and_unmarks() {
        let mut s = BusySet::new();
        assert!(s.mark(5));
        assert!(!s.mark(5), "marked twice is one mark");
        assert!(s.mark(9));
        assert!(s.is_marked(5) && !s.is_marked(6));
        assert!(s.any_in(0..6));
        assert!(!s.any_in(6..9), "the end is exclusive");
        assert!(s.any_in(9..10));
        assert!(!s.any_in(7..7), "an empty range holds nothing");
        s.unmark_range(0..9);
        assert_eq!(s.len(), 1);
        s.unmark(9);
        assert!(s.is_empty());
    }

    #[test]
    fn guard_gives_the_marks_back() {
        let m = BusyMarks::new();
        let g = m.acquire(vec![4, 2, 2, 7]);
        assert_eq!(g.chunks(), &[2, 4, 7], "sorted, duplicates dropped");
        assert!(m.is_marked(2) && m.is_marked(4) && m.is_marked(7));
        drop(g);
        assert!(!m.is_marked(2) && !m.is_marked(4) && !m.is_marked(7));
        assert!(m.acquire(Vec::new()).chunks().is_empty());
    }

    #[test]
    fn a_second_holder_waits_until_the_guard_drops() {
        let m = Arc::new(BusyMarks::new());
        let g = m.acquire(vec![3]);
        let (tx, rx) = mpsc::channel();
        let m2 = m.clone();
        let t = std::thread::spawn(move || {
            let g = m2.acquire(vec![3]);
            tx.send(()).unwrap();
            // hold the mark until the main thread has looked
            drop(g);
        });
        wait_for(|| m.waiting() == 1);
        assert!(rx.try_recv().is_err(), "took a mark that was held");
        drop(g);
        rx.recv().unwrap();
        t.join().unwrap();
        assert!(!m.is_marked(3));
        assert_eq!(m.waiting(), 0);
    }

    #[test]
    fn marks_are_taken_in_ascending_order_whatever_the_order_asked() {
        // Held: 1. A thread asks for [3, 1]: ascending order means it waits for 1
        // first, holding nothing, so 3 stays free for others meanwhile.
        let m = Arc::new(BusyMarks::new());
        let g1 = m.acquire(vec![1]);
        let m2 = m.clone();
        let (tx, rx) = mpsc::channel();
        let t = std::thread::spawn(move || {
            let g = m2.acquire(vec![3, 1]);
            tx.send(g.chunks().to_vec()).unwrap();
        });
        wait_for(|| m.waiting() == 1);
        assert!(!m.is_marked(3), "3 was taken before 1");
        // and 3 can be taken and given back while the thread waits
        drop(m.acquire(vec![3]));
        drop(g1);
        assert_eq!(rx.recv().unwrap(), vec![1, 3]);
        t.join().unwrap();
        assert!(!m.is_marked(1) && !m.is_marked(3));
    }

    #[test]
    fn crossing_requests_do_not_deadlock() {
        // Two threads want {1, 2} in opposite orders while a third holds 2: with
        // ascending acquisition both wait for 1 or 2 without holding the other's next.
        let m = Arc::new(BusyMarks::new());
        let held = m.acquire(vec![2]);
        let spawn = |chunks: Vec<u64>| {
            let m = m.clone();
            std::thread::spawn(move || drop(m.acquire(chunks)))
        };
        let a = spawn(vec![1, 2]);
        let b = spawn(vec![2, 1]);
        // one holds 1 and waits for 2, the other waits for 1
        wait_for(|| m.waiting() == 2);
        drop(held);
        a.join().unwrap();
        b.join().unwrap();
        assert!(!m.is_marked(1) && !m.is_marked(2));
    }
}
