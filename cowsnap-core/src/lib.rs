//! cowsnap-core: the engine of cowsnap, with no networking. Origin and target I/O,
//! chunk state tracking, containers, the drainer, throttling, the backup repository,
//! change tracking and restore. Everything here is testable in-process on files.
//!
//! # Where things live
//!
//! | concern | modules |
//! |---|---|
//! | origin I/O | [`blockio`] (`BlockIo`; `sync.rs`, `uring.rs`), [`aligned`] |
//! | the write path and the instant gate | [`engine`] (`Engine`), [`export`] (the NBD-facing trait) |
//! | backup jobs | [`backup`] (`Backups`: job slot, state, quiesce, instant, drainer thread) |
//! | one snapshot | [`snapshot`] (`Snapshot::preserve`), [`chunk_map`] (chunk states, busy marks), [`throttle`] |
//! | copying the image | [`drain`] (`Drainer`), [`target`] (`Target`, spec parsing, raw images) |
//! | containers | [`container`] (`Container`, `SlotPool`, RAM and file backends) |
//! | the repository | [`repo`] (chunk store, index, generations, `RepoTarget`, verify, prune, pins) |
//! | change tracking | [`changelog`], [`identity`], [`origin_seal`] |
//! | restore | [`restore`] (offline; `live.rs`: `FillingIo`; `fill_state.rs`: the fill state file's format) |
//! | destinations that are live data | [`dest_guard`] |
//! | shared primitives | [`bitmap`] (atomic bitmap), [`busy`] (busy marks: `BusySet`, `BusyMarks` and its guards), [`bytes`] (`is_zero`), `ondisk` (header codec), [`fsutil`], [`error`] |
//! | format versions (for `--version`) | [`formats`] |
//!
//! # Locking table
//!
//! Every lock of one attached disk, outermost first: a thread holding a lock of a row
//! only takes locks of later rows. "Across I/O" means the lock is held while the
//! thread reads, writes or syncs a file or device.
//!
//! | # | lock | held by, and for how long | across I/O? | protects |
//! |---|---|---|---|---|
//! | 1 | `Backups` job slot mutex (`backup/mod.rs`) | `start`, `status`, `cancel`, `prioritize`: while looking at / replacing the current job | no | the current job, one at a time |
//! | 1 | `Backups` snapshot-export slot mutex (`backup/snapshot_export.rs`), after the job slot | `start_snapshot`, `release_snapshot`, a backup's `start`: while looking at / replacing the slot (empty, starting, serving); never across the quiesce, the instant or the release | no | one snapshot export, never beside a backup |
//! | 3 | `SnapshotExport` snapshot / cut / watcher mutexes | briefly (the cut is taken out before it is committed or aborted) | no | the served snapshot, its change-log cut |
//! | 2 | instant gate, exclusive (`Engine::pause_writes`) | the snapshot instant: `ChangeLog::begin_generation`, `Target::scope`, building the chunk map, installing; `Engine::uninstall` at the end of a backup | **yes**: begin_generation writes and fsyncs the change log's 4 KiB header (no bitmap I/O, unless the spare region could not be zeroed before or an earlier cut is unresolved); a repository target's `scope` reads the parent index only if it was not resolved before the pause (`Target::prepare`, done while writes run, for the generation the change log is relative to) | "no data-changing request in flight"; the snapshot pointer |
//! | 2 | instant gate, shared (`Engine::change`) | every write / trim / write-zeroes, from the snapshot check until its origin I/O is done | **yes**: the whole request, including preserving originals, the change log's group commit and the origin write | that the request's preserve, change-log mark and origin write all belong to one side of the instant |
//! | 3 | `Job` status, then `Job` snapshot mutex (`backup/job.rs`) | briefly | no | job state and figures |
//! | 4 | `ChunkMap` mutex + condvar (`chunk_map.rs`) | briefly | no | pending/done planes, preserved map, busy marks (a `busy::BusySet` in the map's state: taken and given back with the chunk's state) |
//! | 5 | chunk busy marks (`ChunkMap`'s `BusySet`, logical) | a writer: one mark while it reads the original and writes the slot; the drainer: a batch's pending chunks while it reads the origin | **yes** | one chunk's original against a concurrent change |
//! | 6 | `SlotPool` mutex + condvar (`container/pool.rs`) | briefly; writers wait on the condvar holding no busy mark | no | free slots, usage, waiters |
//! | 7 | `Snapshot` failure / priority mutexes | briefly | no | first failure cause; priority ranges |
//! | 8 | `RamContainer` table RwLock, then one slot's mutex | one memcpy (the table is written only to grow it) | no | one slot's bytes |
//! | 9 | live restore fill marks (`FillingIo`'s `busy::BusyMarks`, logical; guards from `BusyMarks::acquire`; `restore/live.rs`) | a fetch or a write to unrestored chunks: from taking the marks until the chunks' data and bits are durable | **yes** | one repository chunk's fetch against a write to it |
//! | 10 | live restore state-file mutex | writing and fsyncing the fill state's bitmap blocks or header | **yes** | the fill state file |
//! | 11 | `ChangeLog` group commit (leader flag in the queue mutex, logical) | the leader: writing the queued bitmap blocks and one fdatasync; other first writers wait on the queue condvar | **yes** | one fdatasync per batch of first writes |
//! | 12 | `ChangeLog` state mutex (`inner`) | cut, commit, abort, distrust, close (header and region writes, fsyncs); the group-commit leader while it writes bitmap blocks | **yes** | relative-to, whether a cut is outstanding, region C on disk |
//! | 13 | `ChangeLog` spare mutex | the cut (after `inner`); zeroing the spare region after a commit or abort (write + fdatasync, `inner` not held, so first writes go on) | **yes** | whether the spare region is zeroed or holds the cut's P; which region is C changes only with 12 and 13 held |
//! | 14 | `ChangeLog` in-memory bitmap RwLock | read: a first write's check and queueing, the leader publishing bits, status (briefly); write: the cut swaps in an empty bitmap (O(1)) | no | the in-memory copy of C |
//! | 15 | `ChangeLog` queue mutex, in-flight sequence mutex | briefly (the queue is never held across the leader's I/O) | no | queued bits and tickets; unacknowledged sequence numbers |
//! | 16 | discard marks mutex (`discard.rs`, in the engine) | every write / trim / write-zeroes, briefly before and after its origin I/O (bit operations, the list of requests in flight); the instant copies the plane under the exclusive gate | no | chunks wholly discarded and not written since |
//!
//! The repository's own locks (the `DIR/lock` flock, the quarantine lock) and the
//! operations they order are in [`repo`]'s table; the NBD server's locks are in
//! cowsnap-nbd.
//!
//! Waiting while holding something, and why it cannot deadlock:
//! - A writer waiting for a chunk's busy mark or a container slot holds the gate shared
//!   and nothing else. The exclusive gate is only taken when no snapshot is installed
//!   (the instant) or after every waiter was released (`Snapshot::fail`) or has nothing
//!   left to wait for (complete), so those waits always end.
//! - A writer waits for a slot *before* it takes the chunk's busy mark, and the drainer
//!   never waits for a busy chunk (it skips the granule), so busy marks and slots form
//!   no cycle. Nothing else waits while holding a chunk busy mark — except during a
//!   live restore: the origin is then a `FillingIo`, and a writer preserving a chunk
//!   or the drainer reading a batch holds chunk busy marks (row 5) while `FillingIo`
//!   takes fill marks (row 9) and may wait for them. The order is always chunk busy
//!   mark → fill mark: `FillingIo` and its background fill never take a chunk-map
//!   mark, so no cycle. Fill marks are taken in ascending chunk order by everyone
//!   (`BusyMarks::acquire` sorts them), so fill marks among themselves do not
//!   deadlock either. Both kinds of mark are the one primitive of [`busy`]; they
//!   differ only in whose mutex guards the set (see its module notes).
//! - The change log's group commit: first writers wait for the leader's fdatasync
//!   holding the gate shared (and no busy mark: preserving is done before the change
//!   log is marked). A cut (under the exclusive gate) takes the state mutex, which the
//!   leader takes too, but never waits for the queue.
//!
//! | operations | may run together? | what makes it safe |
//! |---|---|---|
//! | reads vs anything | yes | reads take no engine lock and never wait on the drainer (a live restore's read may wait for a fill mark); a read racing a write sees old or new data, as on any disk |
//! | writes to different chunks | yes | per-chunk busy marks; the gate is shared |
//! | writes to the same pending chunk | serialised per chunk | busy mark: the second waits, then finds it preserved and passes through |
//! | write vs drainer copying the same chunk | serialised per chunk | the drainer holds the busy mark while it reads the origin; the writer waits, then passes through (done) |
//! | write vs drainer on different chunks | yes | the drainer skips granules with busy chunks and never waits holding marks |
//! | writes vs the snapshot instant | no | the gate: in-flight writes finish, new ones wait while the snapshot is installed (`Target::scope` and `ChangeLog::begin_generation` run in this window and must be quick) |
//! | writes waiting for a container slot vs drainer | yes | the waiting writer holds no busy mark; the drainer frees slots (it drains the container first above the low watermark or when anyone waits) |
//! | snapshot failure / cancel vs held writers | yes | `Snapshot::fail` wakes every chunk and slot waiter; they pass through |
//! | two backups of one disk | no | `Backups::start` returns `Busy` |
//! | flush vs anything | yes | forwarded to the origin, no engine lock |

#![warn(missing_docs)]

pub mod aligned;
pub mod backup;
pub mod bitmap;
pub mod blockio;
pub mod busy;
pub mod bytes;
pub mod changelog;
pub mod chunk_map;
pub mod container;
pub mod dest_guard;
mod discard;
pub mod disk_state;
pub mod drain;
pub mod engine;
pub mod error;
pub mod export;
pub mod formats;
pub mod freespace;
pub mod fsutil;
pub mod identity;
pub mod latency;
pub mod mountinfo;
mod ondisk;
pub mod origin_seal;
pub mod paged_bits;
pub mod repo;
pub mod restore;
pub mod snapshot;
pub mod target;
pub mod thread_prio;
pub mod throttle;

pub use error::{Error, ErrorKind, Result};

#[cfg(test)]
pub(crate) mod test_util {
    use std::time::{Duration, Instant};

    /// Wait until `cond` holds (another thread reached a wait), failing after 30 s:
    /// tests wait for the state they assert, never for a fixed time.
    pub(crate) fn wait_for(cond: impl Fn() -> bool) {
        let t0 = Instant::now();
        while !cond() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "condition never met"
            );
            std::thread::yield_now();
        }
    }
}
