//! cowsnap-core: the engine of cowsnap, with no networking. Origin and target I/O,
//! chunk state tracking, containers, the drainer, throttling, the backup repository,
//! change tracking and restore. Everything here is testable in-process on files.
//!
//! # Locking table
//!
//! Locks of one engine, outermost first. No lock is held across I/O except the instant
//! gate (shared, by the request doing the I/O), and nothing waits while holding a
//! busy mark.
//!
//! | lock | held by | protects |
//! |---|---|---|
//! | instant gate `Engine::active` (RwLock) | shared: each write / trim / write-zeroes for its whole duration; exclusive: `start_backup` for the instant, the drainer thread to uninstall the snapshot | the snapshot pointer; "no data-changing request in flight" |
//! | `JobSlot` / `Job` mutexes | briefly, never across I/O | job state and figures |
//! | `ChunkMap` mutex + condvar | briefly, never across I/O | pending/done planes, preserved map, busy marks |
//! | `SlotPool` mutex + condvar | briefly, never across I/O | free slots, usage, waiters |
//! | `RamContainer` per-slot mutex | for one memcpy | one slot's bytes |
//!
//! | operations | may run together? | what makes it safe |
//! |---|---|---|
//! | reads vs anything | yes | reads take no engine lock and never wait on the drainer; a read racing a write sees old or new data, as on any disk |
//! | writes to different chunks | yes | per-chunk busy marks; the gate is shared |
//! | writes to the same pending chunk | serialised per chunk | busy mark: the second waits, then finds it preserved and passes through |
//! | write vs drainer copying the same chunk | serialised per chunk | the drainer holds the busy mark while it reads the origin; the writer waits, then passes through (done) |
//! | write vs drainer on different chunks | yes | the drainer skips granules with busy chunks and never waits holding marks |
//! | writes vs the snapshot instant | no | the gate: in-flight writes finish, new ones wait while the snapshot is installed (`Target::scope` and `ChangeLog::begin_generation` run in this window and must be quick) |
//! | writes waiting for a container slot vs drainer | yes | the waiting writer holds no busy mark; the drainer frees slots (it drains the container first above the low watermark or when anyone waits) |
//! | snapshot failure / cancel vs held writers | yes | `Snapshot::fail` wakes every chunk and slot waiter; they pass through |
//! | two backups of one disk | no | `start_backup` returns `Busy` |
//! | flush vs anything | yes | forwarded to the origin, no engine lock |

#![warn(missing_docs)]

pub mod aligned;
pub mod backup;
pub mod blockio;
pub mod changelog;
pub mod chunk_map;
pub mod container;
pub mod dest_guard;
pub mod disk_state;
pub mod drain;
pub mod engine;
pub mod error;
pub mod export;
pub mod fsutil;
pub mod identity;
pub mod mountinfo;
pub mod origin_seal;
pub mod repo;
pub mod restore;
pub mod snapshot;
pub mod target;
pub mod throttle;

pub use error::{Error, ErrorKind, Result};
