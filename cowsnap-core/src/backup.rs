//! Backup jobs: parse a target spec, quiesce, take the snapshot, run the drainer.
//! (Skeleton: the API the daemon calls. The job lands with the CoW engine.)

use crate::engine::Engine;
use crate::error::Result;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// What `cowsnapctl backup` asks for.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BackupParams {
    /// `file:PATH`, `dev:PATH` or `repo:DIR`.
    pub to: String,
    /// Container spec (`ram:SIZE`, `file:PATH:SIZE`, `dev:PATH`); `None` = the disk's default.
    pub container: Option<String>,
    /// Incremental (repository targets only).
    #[serde(default)]
    pub incremental: bool,
    /// Priority ranges (offset, length) in bytes.
    #[serde(default)]
    pub priority: Vec<(u64, u64)>,
    /// Read-side rate limit in bytes per second.
    pub rate_limit: Option<u64>,
    /// Wait for this long without writes before the snapshot (0 = don't wait).
    #[serde(default)]
    pub quiesce_idle_ms: u64,
    /// Give up waiting for an idle window after this long.
    #[serde(default)]
    pub quiesce_timeout_ms: u64,
}

/// Figures of the running (or last) backup.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BackupStatus {
    /// Job id, counting from 1 per daemon.
    pub id: u64,
    /// "quiescing", "running", "complete" or "failed".
    pub state: String,
    /// Why it failed.
    pub error: Option<String>,
    /// The target spec.
    pub target: String,
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Tracking chunk size in bytes.
    pub chunk_size: u32,
    /// Chunks the backup must copy.
    pub chunks_in_scope: u64,
    /// Chunks copied to the target.
    pub chunks_copied: u64,
    /// Chunks whose originals went through the container.
    pub chunks_preserved: u64,
    /// Bytes handed to the target.
    pub bytes_copied: u64,
    /// Container capacity in slots.
    pub container_slots: u64,
    /// Slots in use now.
    pub container_used: u64,
    /// Most slots in use at once.
    pub container_high_water: u64,
    /// Writes held while their chunk was preserved.
    pub holds: u64,
    /// Total time writes were held, ms.
    pub hold_time_ms: u64,
    /// Writes slowed by the throttle.
    pub throttled_writes: u64,
    /// Total throttle delay, ms.
    pub throttle_delay_ms: u64,
    /// Time since the snapshot instant, ms.
    pub elapsed_ms: u64,
    /// Generation id for repository targets.
    pub generation: Option<String>,
    /// Notes for the user.
    pub notes: Vec<String>,
}

impl Engine {
    /// Start a backup: returns after the snapshot instant, with the job id.
    pub fn start_backup(self: &Arc<Self>, _p: BackupParams) -> Result<u64> {
        Err(crate::err!(Unsupported, "backups are not implemented yet"))
    }
    /// The running or last backup.
    pub fn backup_status(&self) -> Option<BackupStatus> {
        None
    }
    /// Copy these ranges next.
    pub fn backup_priority(&self, _ranges: &[(u64, u64)]) -> Result<()> {
        Err(crate::err!(Unsupported, "no backup running"))
    }
    /// Stop the running backup; its target is left incomplete.
    pub fn cancel_backup(&self) -> Result<()> {
        Err(crate::err!(Unsupported, "no backup running"))
    }
}
