//! A backup that is one member of a consistency group: one snapshot instant for several
//! disks, whatever daemons serve them, and one restore point published only when every
//! member has its data.
//!
//! The coordinator (`cowsnapctl backup NAME1 NAME2 …`) drives each member's daemon
//! through three steps on one control connection per disk; the daemon's side is a
//! [`InstantBarrier`] passed to [`super::Backups::start_coordinated`] and a
//! [`CommitGate`] the finished drainer waits on:
//!
//! | step | daemon does | then waits for | gives up (resumes, publishes nothing) when |
//! |---|---|---|---|
//! | request | opens target and container, resolves the parent | `pause` | the connection closes, `abort`, or [`PREPARED_WAIT`] passes |
//! | `pause` | takes the instant gate (in-flight writes finish, new ones wait) | `go` | the connection closes, `abort`, or the group's pause limit passes, counted from the moment writes stopped |
//! | `go` | takes the instant, installs the snapshot, writers resume, drains | `commit` (state `ready`) | the connection closes, `abort`, the job is cancelled, or [`COMMIT_WAIT`] passes |
//! | `commit` | publishes the generation (with the coordinator's notes) | — | — |
//!
//! So every disk of the group is paused at one moment (after the last `paused` reply,
//! before the first `go`) and each image is its disk at that moment; a writer that
//! saw disk A's acknowledgement before writing disk B can never find its B write in
//! the group without its A write. A coordinator that dies, or a member daemon that dies
//! (the coordinator then closes every other connection), leaves no disk paused for longer
//! than the pause limit and nothing published: the only window in which part of a group
//! can be published is between the first and the last `commit` line, microseconds of
//! the coordinator writing to sockets; such a generation is still a correct backup of
//! its own disk, and `list` shows its group as incomplete.

use crate::error::Result;
use std::sync::mpsc::Receiver;
use std::time::Duration;

/// How long a prepared member waits for `pause` before giving up: the coordinator
/// prepares every member first (opening a repository and reading a parent index can
/// take long), then pauses them all.
pub const PREPARED_WAIT: Duration = Duration::from_secs(600);

/// How long a drained member waits for the group's `commit`: the slowest member's
/// drain. Nothing is held meanwhile (no chunk is pending, writes pass unhindered);
/// the connection closing ends the wait at once.
pub const COMMIT_WAIT: Duration = Duration::from_secs(7 * 24 * 3600);

/// The longest pause a group may ask for (`--pause-limit`).
pub const MAX_PAUSE_LIMIT: Duration = Duration::from_secs(10);

/// The two rendezvous of the snapshot instant, called on the thread that starts the
/// backup. An error gives the backup up: nothing is paused after it returns.
pub trait InstantBarrier {
    /// The target and container are open and the parent resolved; nothing is paused.
    /// Return when the writes may be paused.
    fn prepared(&mut self) -> Result<()>;
    /// Writes are paused (no data-changing request in flight). Return when the
    /// instant may be taken; an error resumes the writes and abandons the backup.
    fn paused(&mut self) -> Result<()>;
}

/// The coordinator's last word on a drained member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitDecision {
    /// Publish, adding these notes to the generation (a post-snapshot hook's outcome).
    Commit(Vec<String>),
    /// Publish nothing, for this reason.
    Abort(String),
}

/// Where the drained member's decision comes from; the sender's drop means "abort".
pub type CommitGate = Receiver<CommitDecision>;
