//! What a client can make the server hold: connections, threads, request memory.
//!
//! Design notes
//! - Connections: at most [`Limits::max_connections`] are open at once (handshake and
//!   transmission alike); the accept loop closes any further one at once and logs it
//!   (at most one message per [`REFUSAL_LOG_EVERY`], with a count).
//! - Threads: each connection has one thread of its own; more workers are started on
//!   demand (when a request was read and no other worker waits to read the next one),
//!   up to [`Limits::threads_per_connection`] per connection and [`Limits::max_workers`]
//!   across the server, and leave again after [`IDLE_WORKER`] without work. Worst case:
//!   `max_connections + max_workers` connection threads.
//! - Memory: every request payload (a READ's data, a WRITE's payload, a CACHE piece)
//!   lives in a buffer leased from the server's [`Budget`] *before* it is allocated and
//!   given back after the reply is written. A connection leases at most
//!   [`Limits::connection_memory`]; the server at most [`Limits::memory`], plus
//!   [`OVERDRAFT`] for a connection that has nothing else in flight, so a well-behaved
//!   client is served even while others hold the whole budget. Buffers are sized in
//!   powers of two (at least [`MIN_CLASS`]) and kept for reuse in a small pool that
//!   counts against the budget; a lease that would exceed the budget first empties the
//!   pool, then waits. An allocation that fails is answered with ENOMEM: a request
//!   never ends the daemon.
//! - Worst-case memory held for clients is `memory + max_connections × (OVERDRAFT +
//!   read buffer + reply queue)`, about 128 + 64 × 2.25 MiB = 272 MiB with the defaults.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Smallest buffer handed out (small requests share one size class).
pub const MIN_CLASS: usize = 64 << 10;
/// A connection with nothing in flight may lease this much beyond the server's budget.
pub const OVERDRAFT: usize = 1 << 20;
/// An extra worker with no work for this long leaves.
pub const IDLE_WORKER: Duration = Duration::from_secs(2);
/// Refused connections are logged at most once per this interval.
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);
/// How often a waiting lease looks at whether its connection is closing.
const WAIT_SLICE: Duration = Duration::from_millis(100);

/// Server-wide limits (see the module notes).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Worker threads (requests in flight) per connection.
    pub threads_per_connection: usize,
    /// Worker threads beyond each connection's own, across the server.
    pub max_workers: usize,
    /// Bytes of request buffers across the server.
    pub memory: usize,
    /// Bytes of request buffers per connection.
    pub connection_memory: usize,
    /// The whole handshake must finish within this time.
    pub handshake_timeout: Duration,
}

/// Default for [`Limits::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Default for [`Limits::threads_per_connection`].
pub const DEFAULT_THREADS_PER_CONNECTION: usize = 16;
/// Default for [`Limits::max_workers`].
pub const DEFAULT_MAX_WORKERS: usize = 256;
/// Default for [`Limits::memory`].
pub const DEFAULT_MEMORY: usize = 128 << 20;
/// Default for [`Limits::connection_memory`].
pub const DEFAULT_CONNECTION_MEMORY: usize = 64 << 20;
/// Default for [`Limits::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            threads_per_connection: DEFAULT_THREADS_PER_CONNECTION,
            max_workers: DEFAULT_MAX_WORKERS,
            memory: DEFAULT_MEMORY,
            connection_memory: DEFAULT_CONNECTION_MEMORY,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

impl Limits {
    /// The limits made consistent: at least one of everything, and room for one
    /// request of the largest payload per connection and in the server.
    pub fn sane(mut self) -> Self {
        let max = class_of(super::proto::MAX_PAYLOAD as usize);
        self.max_connections = self.max_connections.max(1);
        self.threads_per_connection = self.threads_per_connection.max(1);
        self.memory = self.memory.max(max);
        self.connection_memory = self.connection_memory.clamp(max, self.memory);
        if self.handshake_timeout.is_zero() {
            self.handshake_timeout = DEFAULT_HANDSHAKE_TIMEOUT;
        }
        self
    }
}

/// The buffer size class for `n` bytes.
pub fn class_of(n: usize) -> usize {
    n.max(MIN_CLASS).next_power_of_two()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why a lease was not granted.
#[derive(Debug, PartialEq, Eq)]
pub enum LeaseError {
    /// The connection is closing (or the server shutting down).
    Closing,
    /// The allocation failed.
    NoMemory,
}

/// Size classes from [`MIN_CLASS`] to 2^(16+CLASSES-1).
const CLASSES: usize = 16;

#[derive(Default)]
struct BudgetState {
    /// Bytes of buffers in existence (leased or pooled).
    used: usize,
    /// Free buffers by class index.
    pooled: Vec<Vec<Vec<u8>>>,
    pooled_bytes: usize,
    waiters: usize,
}

/// The server-wide budget of request buffer bytes, with a pool of free buffers.
pub struct Budget {
    limit: usize,
    overdraft: usize,
    pool_max: usize,
    st: Mutex<BudgetState>,
    cv: Condvar,
}

fn class_index(cap: usize) -> usize {
    (cap.trailing_zeros() as usize).saturating_sub(MIN_CLASS.trailing_zeros() as usize)
}

/// A zero-filled buffer of `n` bytes, or `None` when memory is short. Large buffers come
/// from fresh mappings whose pages cost nothing until written, so a WRITE header whose
/// payload never comes holds budget but hardly any memory.
fn alloc_zeroed(n: usize) -> Option<Vec<u8>> {
    if n == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<u8>(n).ok()?;
    // SAFETY: `layout` has a non-zero size (n > 0 checked above).
    let p = unsafe { std::alloc::alloc_zeroed(layout) };
    if p.is_null() {
        return None;
    }
    // SAFETY: `p` was allocated by the global allocator with the layout of `[u8; n]`,
    // which is what a Vec<u8> of capacity n uses; all n bytes are initialised (zeroed).
    Some(unsafe { Vec::from_raw_parts(p, n, n) })
}

impl Budget {
    /// A budget of `limit` bytes; a connection with nothing in flight may go beyond it
    /// by one lease of at most [`OVERDRAFT`] while the total overdraft stays under
    /// `connections × OVERDRAFT`.
    pub fn new(limit: usize, connections: usize) -> Self {
        Budget {
            limit,
            overdraft: connections.saturating_mul(OVERDRAFT),
            pool_max: (limit / 4).min(32 << 20),
            st: Mutex::new(BudgetState {
                pooled: (0..CLASSES).map(|_| Vec::new()).collect(),
                ..Default::default()
            }),
            cv: Condvar::new(),
        }
    }

    /// Bytes of buffers in existence now.
    pub fn used(&self) -> usize {
        lock(&self.st).used
    }

    /// Takers waiting for the budget right now.
    #[cfg(test)]
    fn waiters(&self) -> usize {
        lock(&self.st).waiters
    }

    /// Take a buffer of class `class` (len == capacity >= class). `idle`: the caller's
    /// connection has nothing else in flight (it may use the overdraft). Waits while the
    /// budget is spent; `closing` is asked every [`WAIT_SLICE`].
    pub fn take(
        &self,
        class: usize,
        idle: bool,
        closing: &dyn Fn() -> bool,
    ) -> Result<Vec<u8>, LeaseError> {
        let ci = class_index(class);
        let mut st = lock(&self.st);
        loop {
            if let Some(b) = (ci..CLASSES).find_map(|i| st.pooled[i].pop()) {
                st.pooled_bytes -= b.len();
                return Ok(b);
            }
            let fits = st.used + class <= self.limit
                || (idle && class <= OVERDRAFT && st.used + class <= self.limit + self.overdraft);
            if fits {
                st.used += class;
                drop(st);
                return match alloc_zeroed(class) {
                    Some(b) => Ok(b),
                    None => {
                        let mut st = lock(&self.st);
                        st.used -= class;
                        drop(st);
                        self.cv.notify_all();
                        Err(LeaseError::NoMemory)
                    }
                };
            }
            // Over budget: free pooled buffers (largest first) before waiting.
            if let Some(b) = (0..CLASSES).rev().find_map(|i| st.pooled[i].pop()) {
                st.pooled_bytes -= b.len();
                st.used -= b.len();
                continue;
            }
            if closing() {
                return Err(LeaseError::Closing);
            }
            st.waiters += 1;
            st = self
                .cv
                .wait_timeout(st, WAIT_SLICE)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            st.waiters -= 1;
        }
    }

    /// Give a buffer back (kept for reuse when nobody waits and the pool has room).
    pub fn give(&self, b: Vec<u8>) {
        let cap = b.len();
        let mut st = lock(&self.st);
        if st.waiters == 0
            && st.used <= self.limit
            && st.pooled_bytes + cap <= self.pool_max
            && cap.is_power_of_two()
            && class_index(cap) < CLASSES
        {
            st.pooled_bytes += cap;
            let i = class_index(cap);
            st.pooled[i].push(b);
            return;
        }
        st.used -= cap;
        let wake = st.waiters > 0;
        drop(st);
        drop(b);
        if wake {
            self.cv.notify_all();
        }
    }
}

/// A per-connection cap on leased bytes.
pub struct ConnMemory {
    cap: usize,
    /// (bytes reserved, reservations waiting)
    used: Mutex<(usize, usize)>,
    cv: Condvar,
}

impl ConnMemory {
    /// A cap of `cap` bytes.
    pub fn new(cap: usize) -> Self {
        ConnMemory {
            cap,
            used: Mutex::new((0, 0)),
            cv: Condvar::new(),
        }
    }

    /// Reserve `n` bytes, waiting while the connection's requests in flight hold too
    /// much (a connection with nothing in flight always gets its request). Returns
    /// whether nothing else was in flight.
    pub fn reserve(&self, n: usize, closing: &dyn Fn() -> bool) -> Result<bool, LeaseError> {
        let mut u = lock(&self.used);
        while u.0 > 0 && u.0 + n > self.cap {
            if closing() {
                return Err(LeaseError::Closing);
            }
            u.1 += 1;
            u = self
                .cv
                .wait_timeout(u, WAIT_SLICE)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            u.1 -= 1;
        }
        let idle = u.0 == 0;
        u.0 += n;
        Ok(idle)
    }

    /// Release `n` bytes.
    pub fn release(&self, n: usize) {
        let mut u = lock(&self.used);
        u.0 = u.0.saturating_sub(n);
        let wake = u.1 > 0;
        drop(u);
        if wake {
            self.cv.notify_all();
        }
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        lock(&self.used).0
    }

    /// Reservations waiting right now.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        lock(&self.used).1
    }
}

/// Counts the extra worker threads across the server.
pub struct Workers {
    max: usize,
    now: AtomicUsize,
}

impl Workers {
    /// At most `max` at once.
    pub fn new(max: usize) -> Self {
        Workers {
            max,
            now: AtomicUsize::new(0),
        }
    }
    /// Take a place for one more worker, if there is one.
    pub fn try_take(&self) -> bool {
        self.now
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }
    /// Give a place back.
    pub fn put(&self) {
        self.now.fetch_sub(1, Ordering::AcqRel);
    }
    /// Extra workers running now.
    pub fn running(&self) -> usize {
        self.now.load(Ordering::Acquire)
    }
}

/// What every connection of a server shares: its limits, the request memory budget,
/// the count of extra workers.
pub(crate) struct Shared {
    pub(crate) limits: Limits,
    pub(crate) budget: Budget,
    pub(crate) workers: Workers,
    pub(crate) shutdown: AtomicBool,
}

impl Shared {
    pub(crate) fn new(limits: Limits) -> Arc<Self> {
        let limits = limits.sane();
        Arc::new(Shared {
            budget: Budget::new(limits.memory, limits.max_connections),
            workers: Workers::new(limits.max_workers),
            limits,
            shutdown: AtomicBool::new(false),
        })
    }
    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Wait until `cond` holds (another thread is waiting), failing after 30 s.
    fn wait_for(cond: impl Fn() -> bool) {
        let t0 = std::time::Instant::now();
        while !cond() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "condition never met"
            );
            std::thread::yield_now();
        }
    }

    #[test]
    fn classes() {
        assert_eq!(class_of(0), MIN_CLASS);
        assert_eq!(class_of(4096), MIN_CLASS);
        assert_eq!(class_of(MIN_CLASS + 1), 2 * MIN_CLASS);
        assert_eq!(class_of(32 << 20), 32 << 20);
        assert_eq!(class_index(MIN_CLASS), 0);
        assert_eq!(class_index(32 << 20), 9);
    }

    #[test]
    fn budget_bounds_and_pools() {
        let b = Arc::new(Budget::new(4 << 20, 2));
        let no = || false;
        let x = b.take(2 << 20, false, &no).unwrap();
        let y = b.take(2 << 20, false, &no).unwrap();
        assert_eq!(b.used(), 4 << 20);
        // over budget: an idle connection may overdraft one small lease
        let z = b.take(1 << 20, true, &no).unwrap();
        assert_eq!(b.used(), 5 << 20);
        // but a busy connection waits
        let b2 = b.clone();
        let t = std::thread::spawn(move || b2.take(2 << 20, false, &|| false));
        wait_for(|| b.waiters() == 1);
        assert!(!t.is_finished());
        assert_eq!(b.used(), 5 << 20, "the waiter took nothing");
        b.give(z);
        b.give(x);
        let w = t.join().unwrap().unwrap();
        assert_eq!(w.len(), 2 << 20);
        assert_eq!(b.used(), 4 << 20);
        // a closing connection stops waiting
        assert_eq!(b.take(2 << 20, false, &|| true), Err(LeaseError::Closing));
        b.give(w);
        b.give(y);
        assert_eq!(b.used(), 0, "too large to pool");
        // small buffers are pooled and reused
        let s = b.take(class_of(100), false, &no).unwrap();
        assert_eq!(s.len(), MIN_CLASS);
        b.give(s);
        assert_eq!(b.used(), MIN_CLASS);
        let s = b.take(MIN_CLASS, false, &no).unwrap();
        assert_eq!(b.used(), MIN_CLASS);
        b.give(s);
        // and given up when a lease needs the room
        let big = b.take(4 << 20, false, &no).unwrap();
        assert_eq!(b.used(), 4 << 20);
        b.give(big);
    }

    #[test]
    fn connection_memory_waits() {
        let m = Arc::new(ConnMemory::new(3 << 20));
        assert!(m.reserve(2 << 20, &|| false).unwrap());
        assert!(!m.reserve(1 << 20, &|| false).unwrap());
        let m2 = m.clone();
        let t = std::thread::spawn(move || m2.reserve(1 << 20, &|| false));
        wait_for(|| m.waiting() == 1);
        assert!(!t.is_finished());
        assert_eq!(m.used(), 3 << 20, "the waiter reserved nothing");
        m.release(2 << 20);
        assert_eq!(t.join().unwrap(), Ok(false));
        assert_eq!(m.reserve(2 << 20, &|| true), Err(LeaseError::Closing));
    }

    #[test]
    fn workers_are_counted() {
        let w = Workers::new(2);
        assert!(w.try_take() && w.try_take() && !w.try_take());
        w.put();
        assert!(w.try_take());
        assert_eq!(w.running(), 2);
    }
}
