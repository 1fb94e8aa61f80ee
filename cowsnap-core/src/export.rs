//! What an NBD export serves: the operations a client may ask for, already validated
//! at the protocol edge (range, flags, read-only). The NBD server only sees this trait;
//! the [`crate::engine::Engine`] implements it for a live disk.

use crate::error::Result;
use serde::Serialize;

/// One block-status extent (NBD `base:allocation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Extent {
    /// Length in bytes (> 0).
    pub len: u64,
    /// Not allocated (NBD_STATE_HOLE).
    pub hole: bool,
    /// Reads as zeros (NBD_STATE_ZERO).
    pub zero: bool,
}

/// One extent of a dirty bitmap (the `qemu:dirty-bitmap:NAME` meta context).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DirtyExtent {
    /// Length in bytes (> 0).
    pub len: u64,
    /// Changed since the bitmap's generation (QEMU's flag value 1).
    pub dirty: bool,
}

/// Flags of a write-zeroes request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The client asked NOT to deallocate (NBD_CMD_FLAG_NO_HOLE).
    pub no_hole: bool,
    /// Fail with ENOTSUP unless zeroing is fast (NBD_CMD_FLAG_FAST_ZERO).
    pub fast: bool,
    /// Durable before the reply (NBD_CMD_FLAG_FUA).
    pub fua: bool,
}

/// What an export can do, for the NBD transmission flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportCaps {
    /// Refuses every data-changing command.
    pub read_only: bool,
    /// TRIM is honoured.
    pub trim: bool,
    /// WRITE_ZEROES is honoured.
    pub zeroes: bool,
    /// FAST_ZERO can be promised.
    pub fast_zero: bool,
    /// Writes on one connection are visible on all after FLUSH (true for a single origin).
    pub multi_conn: bool,
}

impl ExportCaps {
    /// A read-only image (a snapshot, a restore point): nothing changes it, so every
    /// connection sees the same bytes.
    pub const READ_ONLY_IMAGE: ExportCaps = ExportCaps {
        read_only: true,
        trim: false,
        zeroes: false,
        fast_zero: false,
        multi_conn: true,
    };
}

/// A disk served over NBD. Callers have validated ranges against [`Export::size`].
/// Data-changing methods have no default body: a new write-like operation must be
/// handled by every implementation (see the snapshot layer).
pub trait Export: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Capabilities.
    fn caps(&self) -> ExportCaps;
    /// Fill `buf` from `off`.
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<()>;
    /// Write `data` at `off`; durable before returning when `fua`.
    fn write(&self, off: u64, data: &[u8], fua: bool) -> Result<()>;
    /// Make all acknowledged writes durable.
    fn flush(&self) -> Result<()>;
    /// Discard a range.
    fn trim(&self, off: u64, len: u64, fua: bool) -> Result<()>;
    /// Zero a range.
    fn zero(&self, off: u64, len: u64, flags: ZeroFlags) -> Result<()>;
    /// Allocation status of `off..off+len`: extents covering at least the first byte,
    /// none past `off+len`.
    fn block_status(&self, off: u64, len: u64) -> Result<Vec<Extent>>;
    /// The name of the dirty bitmap this export serves (the `NAME` of the meta context
    /// `qemu:dirty-bitmap:NAME`), if any. Read-only information: a default is safe.
    fn dirty_bitmap(&self) -> Option<String> {
        None
    }
    /// Dirty status of `off..off+len`: extents covering at least the first byte, none
    /// past `off+len`. Only called when [`Export::dirty_bitmap`] names one.
    fn dirty_status(&self, off: u64, len: u64) -> Result<Vec<DirtyExtent>> {
        let _ = (off, len);
        Err(crate::err!(
            Unsupported,
            "unable to report dirty blocks: this export has no dirty bitmap"
        ))
    }
}
