//! The control protocol between `cowsnapctl` and a disk's daemon: JSON lines over the
//! unix socket `RUN_DIR/NAME.ctl`.
//!
//! Every request is one line `{"v":1,"cmd":"<command>", ...}`; every reply is one line
//! `{"v":1,"ok":true, ...}` or `{"v":1,"ok":false,"error":"..."}`. A client may send
//! several requests on one connection; the daemon answers them in order. A line that
//! is not JSON, has no or another version, names an unknown command or is longer than
//! [`MAX_LINE`] gets an error reply; the daemon keeps serving.
//!
//! | cmd | fields | reply fields |
//! |---|---|---|
//! | `status` | | [`StatusInfo`] |
//! | `flush` | | |
//! | `shutdown` | | (the daemon exits after replying) |
//! | `backup` | `params`: [`BackupParams`] | `id` |
//! | `backup_status` | | `backup`: [`BackupStatus`] or null |
//! | `backup_wait` | `timeout_ms` | as `backup_status`, once the backup is finished or the wait (at most [`MAX_WAIT_MS`]) is over |
//! | `priority` | `ranges`: `[[offset, length], ...]` | |
//! | `cancel` | | |
//! | `group_backup` | `params`, `pause_limit_ms` | `phase: "prepared"`, then (after `group_pause`) `phase: "paused"`, then (after `group_go`) `id` |
//! | `group_pause`, `group_go` | | (only as steps of `group_backup`) |
//! | `group_commit` | `notes` | (publishes this connection's group backup once `ready`) |
//! | `group_abort` | `why` | (abandons it) |
//!
//! New fields may be added to requests and replies within version 1; readers ignore
//! fields they do not know. An incompatible change bumps `v`.
//!
//! `wire.rs` holds the types and their encoding, `client.rs` the client, and
//! `server.rs` the daemon's side: the connection loop and what each command does.

pub mod client;
mod group;
pub mod server;
pub mod wire;

pub use client::{call, Client};
pub use wire::*;
