//! `file:PATH:SIZE` and `dev:PATH`: slots at `slot * slot_size` in a file or on a
//! block device, through the plain pread/pwrite engine.
//!
//! - `file:` creates the file new (an existing file is refused rather than
//!   overwritten), preallocates SIZE with fallocate so the backup cannot hit ENOSPC in
//!   the container later, and removes it when the container is dropped.
//! - `dev:` opens an existing block device (exclusively) or regular file; its whole
//!   size is the capacity; it is never truncated or removed.

use super::{check_slot, Container, SlotIdx};
use crate::blockio::{self, BlockIo, OpenSpec};
use crate::error::{IoContext, Result};
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Slots in a file or on a device.
pub struct FileContainer {
    io: Arc<dyn BlockIo>,
    slot_size: u32,
    slots: u64,
    path: PathBuf,
    remove_on_drop: bool,
    spec: String,
}

impl FileContainer {
    /// Create `path` (must not exist) preallocated to `size` bytes.
    pub fn create(path: &Path, size: u64, slot_size: u32) -> Result<Self> {
        let slots = size / u64::from(slot_size.max(1));
        if slots == 0 {
            return Err(crate::err!(
                InvalidInput,
                "unable to create container {}: {size} bytes is smaller than one {slot_size}-byte slot",
                path.display()
            ));
        }
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .ctx(|| format!("unable to create container {}", path.display()))?;
        let len = slots * u64::from(slot_size);
        // SAFETY: plain syscall on a valid fd with integer arguments.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as libc::off_t) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            drop(f);
            let _ = std::fs::remove_file(path);
            return Err(crate::error::Error::io(
                format!(
                    "unable to preallocate container {} ({len} bytes)",
                    path.display()
                ),
                e,
            ));
        }
        drop(f);
        let mut spec = OpenSpec::origin(path);
        spec.exclusive = false;
        spec.engine = blockio::IoEngine::Sync;
        let io = match blockio::open(&spec) {
            Ok(io) => io,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e.with_context("unable to open container"));
            }
        };
        Ok(FileContainer {
            io,
            slot_size,
            slots,
            path: path.to_path_buf(),
            remove_on_drop: true,
            spec: format!("file:{}:{len}", path.display()),
        })
    }

    /// Use an existing block device (or file) as the container; never removed.
    pub fn open_device(path: &Path, slot_size: u32) -> Result<Self> {
        let mut spec = OpenSpec::origin(path);
        spec.engine = blockio::IoEngine::Sync;
        let io = blockio::open(&spec).map_err(|e| e.with_context("unable to open container"))?;
        let slots = io.size() / u64::from(slot_size.max(1));
        if slots == 0 {
            return Err(crate::err!(
                InvalidInput,
                "unable to open container {}: smaller than one {slot_size}-byte slot",
                path.display()
            ));
        }
        Ok(FileContainer {
            io,
            slot_size,
            slots,
            path: path.to_path_buf(),
            remove_on_drop: false,
            spec: format!("dev:{}", path.display()),
        })
    }

    fn offset(&self, slot: SlotIdx) -> Result<u64> {
        slot.byte_offset(self.slot_size)
            .ok_or_else(|| crate::err!(OutOfRange, "{slot} offset overflows"))
    }
}

impl Container for FileContainer {
    fn slot_size(&self) -> u32 {
        self.slot_size
    }
    fn slots(&self) -> u64 {
        self.slots
    }
    fn write_slot(&self, slot: SlotIdx, data: &[u8]) -> Result<()> {
        check_slot(self, slot, data.len())?;
        let off = self.offset(slot)?;
        self.io
            .write_at(data, off)
            .map_err(|e| e.with_context(format!("unable to write container {}", self.spec)))
    }
    fn read_slot(&self, slot: SlotIdx, buf: &mut [u8]) -> Result<()> {
        check_slot(self, slot, buf.len())?;
        let off = self.offset(slot)?;
        self.io
            .read_at(buf, off)
            .map_err(|e| e.with_context(format!("unable to read container {}", self.spec)))
    }
    fn describe(&self) -> String {
        self.spec.clone()
    }
}

impl Drop for FileContainer {
    fn drop(&mut self) {
        if self.remove_on_drop {
            if let Err(e) = std::fs::remove_file(&self.path) {
                log::warn!("unable to remove container {}: {e}", self.path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conformance_file_and_removal() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.cow");
        {
            let c = FileContainer::create(&p, 4 * 65536, 65536).unwrap();
            assert_eq!(c.slots(), 4);
            // preallocated: blocks are reserved
            let m = std::fs::metadata(&p).unwrap();
            use std::os::unix::fs::MetadataExt;
            assert!(m.blocks() * 512 >= 4 * 65536);
            super::super::conformance::run(&c);
            // an existing file is refused
            assert!(FileContainer::create(&p, 65536, 65536).is_err());
        }
        assert!(!p.exists(), "file container is removed when dropped");
    }

    #[test]
    fn conformance_dev_on_a_file() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(3 * 65536 + 512).unwrap();
        let c = FileContainer::open_device(f.path(), 65536).unwrap();
        assert_eq!(c.slots(), 3);
        super::super::conformance::run(&c);
        drop(c);
        assert!(f.path().exists(), "dev: containers are never removed");
    }

    #[test]
    fn spec_via_open() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        let c = super::super::open(&format!("file:{}:256K", p.display()), 65536).unwrap();
        assert_eq!(c.slots(), 4);
        assert!(p.exists());
        drop(c);
        assert!(!p.exists());
    }
}
