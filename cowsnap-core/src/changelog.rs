//! Persistent changed-chunk tracking, stamped with the disk's lineage.
//! (Skeleton: the API is fixed, the persistence lands with restore points.)

use crate::error::Result;
use bitvec::prelude::*;
use std::path::Path;

/// What a snapshot takes from the change log at its instant.
#[derive(Debug, Clone)]
pub struct Cut {
    /// Tracking chunks changed since the generation named by `relative_to`.
    pub changed: BitVec<u64, Lsb0>,
    /// Generation the bits are relative to; `None` when tracking cannot be trusted.
    pub relative_to: Option<String>,
    /// Next change sequence number at the snapshot instant.
    pub seq_next: u64,
    /// Lowest sequence number not yet acknowledged at the snapshot instant.
    pub seq_lowest_unacked: u64,
}

/// Chunks written since the last acknowledged generation.
pub struct ChangeLog {
    lineage: String,
}

impl ChangeLog {
    /// Open (or create) the change log of a disk at `path`.
    pub fn open(_path: &Path, _disk_size: u64, _chunk_size: u32) -> Result<Self> {
        Ok(ChangeLog {
            lineage: String::new(),
        })
    }
    /// The disk's lineage id.
    pub fn lineage(&self) -> &str {
        &self.lineage
    }
    /// Record that `off..off+len` is about to change; persisted before returning.
    pub fn mark(&self, _off: u64, _len: u64) -> Result<()> {
        Ok(())
    }
    /// At a snapshot instant (writes are paused by the caller): hand out the changed set.
    pub fn begin_generation(&self) -> Result<Cut> {
        Err(crate::err!(Unsupported, "change tracking not implemented"))
    }
    /// The backup of `cut` is committed as generation `gen`: forget its bits.
    pub fn commit_generation(&self, _cut: &Cut, _gen: &str) -> Result<()> {
        Ok(())
    }
    /// The backup of `cut` failed: keep its bits for the next one.
    pub fn abort_generation(&self, _cut: &Cut) -> Result<()> {
        Ok(())
    }
}
