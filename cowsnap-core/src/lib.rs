//! cowsnap-core: the engine of cowsnap, with no networking. Origin and target I/O,
//! chunk state tracking, containers, the drainer, throttling, the backup repository,
//! change tracking and restore. Everything here is testable in-process on files.
//!
//! # Locking table
//!
//! | operations | may run together? | what makes it safe |
//! |---|---|---|
//! | reads / writes to different chunks | yes | no shared lock across I/O |
//! (completed as the snapshot engine lands)

#![warn(missing_docs)]

pub mod backup;
pub mod blockio;
pub mod changelog;
pub mod engine;
pub mod error;
pub mod export;
pub mod fsutil;
pub mod identity;
pub mod repo;
pub mod restore;
pub mod target;

pub use error::{Error, ErrorKind, Result};
