//! Generation metadata: `generations/<id>.json` beside `generations/<id>.idx`.
//! The JSON is written after the index; a generation lacking either is incomplete and
//! ignored by list, restore and incremental backups (prune removes its leftovers).

use crate::error::{IoContext, Result};
use crate::fsutil;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Full or incremental.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GenerationKind {
    /// Every chunk was read.
    Full,
    /// Only changed chunks were read; the rest came from the parent.
    Incremental,
}

/// Figures of the backup that made a generation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationStats {
    /// Bytes handed to the repository (read from the disk).
    pub bytes_read: u64,
    /// Bytes of chunk files written new (compressed, headers included).
    pub bytes_stored_new: u64,
    /// Chunks in the index.
    pub chunks_total: u64,
    /// Chunks handed to the repository.
    pub chunks_written: u64,
    /// Of those, stored new.
    pub chunks_new: u64,
    /// Of those, already present (dedup).
    pub chunks_reused: u64,
    /// Of those, all zeros (not stored).
    pub chunks_zero: u64,
    /// Of the new ones, stored afresh over a damaged copy (which went to quarantine).
    #[serde(default)]
    pub chunks_healed: u64,
    /// Chunks taken from the parent's index unread.
    pub chunks_from_parent: u64,
    /// Wall time from begin to commit, ms.
    pub duration_ms: u64,
}

/// The consistency group a generation belongs to: one snapshot instant taken for all
/// of `disks` together. The group is a restore point when each of its disks has a
/// generation carrying this `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRef {
    /// Group id (the same form as a generation id).
    pub id: String,
    /// Every disk of the group (disk names, sorted).
    pub disks: Vec<String>,
}

/// One restore point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationInfo {
    /// Sortable id: UTC time (ms) and a random suffix.
    pub id: String,
    /// Disk name.
    pub disk: String,
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Repository chunk size in bytes.
    pub chunk_size: u32,
    /// Seconds since the epoch at the snapshot instant.
    pub created_unix: u64,
    /// The snapshot instant, RFC 3339 UTC.
    pub created: String,
    /// Full or incremental.
    pub kind: GenerationKind,
    /// The generation unchanged chunks came from (incremental only).
    pub parent: Option<String>,
    /// Lineage id of the disk.
    pub lineage: String,
    /// Next change sequence number at the snapshot instant.
    pub seq_next: u64,
    /// Lowest unacknowledged sequence number at the snapshot instant.
    pub seq_lowest_unacked: u64,
    /// Backup figures.
    pub stats: GenerationStats,
    /// Notes shown to the user at backup time.
    #[serde(default)]
    pub notes: Vec<String>,
    /// The consistency group of this generation, if it was taken as one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupRef>,
    /// blake3 (hex) of the index object as stored (sealed in an encrypted repository):
    /// what a cached copy is checked against (see `repo::cache`). Object stores only;
    /// absent in generations written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_hash: Option<String>,
}

/// A new generation id: `YYYYMMDDTHHMMSS.mmmZ-<8 hex>` (sorts by time).
pub fn new_generation_id() -> Result<String> {
    Ok(format!(
        "{}-{}",
        fsutil::format_utc_compact(fsutil::now_unix_ms()),
        fsutil::random_hex(4)?
    ))
}

/// Whether `s` looks like a generation id (safe as a file name).
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-' || c == b'_')
        && !s.starts_with('.')
}

impl GenerationInfo {
    /// Write the metadata atomically.
    pub fn write(&self, path: &Path) -> Result<u64> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| {
            crate::err!(InvalidInput, "unable to encode generation {}: {e}", self.id)
        })?;
        fsutil::write_atomic(path, &json)?;
        Ok(json.len() as u64)
    }

    /// Read the metadata.
    pub fn read(path: &Path) -> Result<GenerationInfo> {
        let b = std::fs::read(path).ctx(|| format!("unable to read {}", path.display()))?;
        serde_json::from_slice(&b)
            .map_err(|e| crate::err!(Corrupt, "unable to parse {}: {e}", path.display()))
    }
}
