//! Slot allocation over a container: which slots are free, usage and its high-water
//! mark, and writers waiting while the container is full. Shared by every container
//! backend (a backend only moves bytes, see [`super::Container`]).
//!
//! - Low slots first: never-used slots are handed out in order, returned ones are
//!   reused first, so the RAM container's slot table grows only with use.
//! - `alloc_wait` blocks on the pool's condvar while no slot is free; `free` wakes one
//!   waiter, `drop_all` (the snapshot failed) wakes all and every later allocation
//!   returns `None`. The pool mutex is held briefly, never across I/O.

use super::SlotIdx;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct PoolState {
    fresh: u64,
    returned: Vec<SlotIdx>,
    used: u64,
    high: u64,
    waiters: u64,
    dropped: bool,
}

/// Slot allocation over a container: usage, high-water mark, and waiting while full.
pub struct SlotPool {
    total: u64,
    st: Mutex<PoolState>,
    cv: Condvar,
}

impl SlotPool {
    /// A pool of `total` slots, all free.
    pub fn new(total: u64) -> Self {
        SlotPool {
            total,
            st: Mutex::new(PoolState {
                fresh: 0,
                returned: Vec::new(),
                used: 0,
                high: 0,
                waiters: 0,
                dropped: false,
            }),
            cv: Condvar::new(),
        }
    }

    /// Capacity.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Slots in use.
    pub fn used(&self) -> u64 {
        lock(&self.st).used
    }

    /// Most slots in use at once.
    pub fn high_water(&self) -> u64 {
        lock(&self.st).high
    }

    /// Writers waiting for a free slot.
    pub fn waiters(&self) -> u64 {
        lock(&self.st).waiters
    }

    /// Take a slot, waiting while none is free. `None` once the pool is dropped.
    /// Also returns how long it waited.
    pub fn alloc_wait(&self) -> Option<(SlotIdx, Duration)> {
        let mut st = lock(&self.st);
        let t0 = Instant::now();
        let mut waited = false;
        loop {
            if st.dropped {
                if waited {
                    st.waiters -= 1;
                }
                return None;
            }
            let slot = if let Some(s) = st.returned.pop() {
                Some(s)
            } else if st.fresh < self.total {
                st.fresh += 1;
                Some(SlotIdx(st.fresh - 1))
            } else {
                None
            };
            if let Some(s) = slot {
                if waited {
                    st.waiters -= 1;
                }
                st.used += 1;
                st.high = st.high.max(st.used);
                return Some((s, if waited { t0.elapsed() } else { Duration::ZERO }));
            }
            if !waited {
                waited = true;
                st.waiters += 1;
            }
            st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Give a slot back.
    pub fn free(&self, s: SlotIdx) {
        let mut st = lock(&self.st);
        st.returned.push(s);
        st.used -= 1;
        drop(st);
        self.cv.notify_one();
    }

    /// Wake every waiter; no allocation succeeds afterwards.
    pub fn drop_all(&self) {
        lock(&self.st).dropped = true;
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::wait_for;
    use std::sync::Arc;

    #[test]
    fn pool_waits_when_full_and_wakes_on_free() {
        let p = Arc::new(SlotPool::new(2));
        let a = p.alloc_wait().unwrap().0;
        let _b = p.alloc_wait().unwrap().0;
        assert_eq!(p.used(), 2);
        let p2 = p.clone();
        let t = std::thread::spawn(move || p2.alloc_wait());
        wait_for(|| p.waiters() == 1);
        assert!(!t.is_finished(), "a full pool must hold the writer");
        p.free(a);
        let (s, waited) = t.join().unwrap().unwrap();
        assert_eq!(s, a);
        assert!(!waited.is_zero(), "the wait is reported");
        assert_eq!(p.waiters(), 0);
        assert_eq!(p.high_water(), 2);
    }

    #[test]
    fn pool_drop_releases_waiters() {
        let p = Arc::new(SlotPool::new(1));
        p.alloc_wait().unwrap();
        let p2 = p.clone();
        let t = std::thread::spawn(move || p2.alloc_wait());
        wait_for(|| p.waiters() == 1);
        p.drop_all();
        assert!(t.join().unwrap().is_none());
    }
}
