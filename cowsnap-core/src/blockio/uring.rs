//! The io_uring engine. (Placeholder: delegates to pread/pwrite until the ring lands.)

use super::sync::SyncIo;
use super::BlockIo;
use crate::error::Result;
use std::fs::File;

/// Whether io_uring works on this kernel.
pub fn probe() -> bool {
    false
}

/// io_uring I/O on a file or device.
pub struct UringIo {
    inner: SyncIo,
}

impl UringIo {
    /// Set up rings for an open file.
    pub fn new(file: File, size: u64, is_blk: bool) -> Result<Self> {
        Ok(UringIo {
            inner: SyncIo::new(file, size, is_blk),
        })
    }
}

impl BlockIo for UringIo {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.inner.write_at(buf, off)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.inner.discard(off, len)
    }
    fn write_zeroes(&self, off: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.inner.write_zeroes(off, len, may_unmap)
    }
    fn fast_zero(&self) -> bool {
        self.inner.fast_zero()
    }
    fn is_block_device(&self) -> bool {
        self.inner.is_block_device()
    }
    fn engine_name(&self) -> &'static str {
        "uring"
    }
}
