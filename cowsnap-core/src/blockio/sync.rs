//! The pread/pwrite engine: always available, used where io_uring is not and in tests.

use super::{check_range, BlockIo};
use crate::error::{IoContext, Result};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// pread/pwrite on a file or device.
pub struct SyncIo {
    file: File,
    size: u64,
    is_blk: bool,
}

impl SyncIo {
    /// Wrap an open file of known size.
    pub fn new(file: File, size: u64, is_blk: bool) -> Self {
        SyncIo { file, size, is_blk }
    }
}

/// Hole punch / zero range / BLKDISCARD / BLKZEROOUT, shared by both engines.
pub(crate) fn discard_fd(file: &File, is_blk: bool, off: u64, len: u64) -> std::io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    if is_blk {
        blk_range_ioctl(file, BLKDISCARD, off, len)
    } else {
        fallocate(
            file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    }
}

pub(crate) fn zero_fd(
    file: &File,
    is_blk: bool,
    off: u64,
    len: u64,
    may_unmap: bool,
) -> std::io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let r = if is_blk && may_unmap {
        // A punch hole on a block device is a write-zeroes the device may do by
        // unmapping (thin provisioning, a loop device's file gets a hole); BLKZEROOUT
        // always asks the device to keep the blocks allocated. Devices without a
        // write-zeroes command refuse the punch (EOPNOTSUPP): then BLKZEROOUT.
        fallocate(
            file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
        .or_else(|_| blk_range_ioctl(file, BLKZEROOUT, off, len))
    } else if is_blk {
        blk_range_ioctl(file, BLKZEROOUT, off, len)
    } else if may_unmap {
        fallocate(
            file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
        .or_else(|_| fallocate(file, libc::FALLOC_FL_ZERO_RANGE, off, len))
    } else {
        fallocate(file, libc::FALLOC_FL_ZERO_RANGE, off, len)
    };
    match r {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY)
            ) =>
        {
            write_zeros(file, off, len)
        }
        Err(e) => Err(e),
    }
}

fn write_zeros(file: &File, mut off: u64, len: u64) -> std::io::Result<()> {
    // aligned, so that it also works on an O_DIRECT fd
    let mut zeros = crate::aligned::AlignedBuf::new();
    zeros.resize(1 << 20);
    let end = off + len;
    while off < end {
        let n = ((end - off) as usize).min(zeros.len());
        file.write_all_at(&zeros[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

fn fallocate(file: &File, mode: libc::c_int, off: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: plain syscall on a valid fd with integer arguments; no memory is passed.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off as i64, len as i64) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

// _IO(0x12, 119) and _IO(0x12, 127)
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

fn blk_range_ioctl(file: &File, req: libc::c_ulong, off: u64, len: u64) -> std::io::Result<()> {
    let range: [u64; 2] = [off, len];
    // SAFETY: BLKDISCARD/BLKZEROOUT read a `u64[2]` (start, length) through the pointer,
    // which points at a live array of that type; the fd is valid for `file`'s lifetime.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), req, range.as_ptr()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl BlockIo for SyncIo {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        check_range(self.size, off, buf.len() as u64, "read")?;
        self.file
            .read_exact_at(buf, off)
            .ctx(|| format!("unable to read {} bytes at offset {off}", buf.len()))
    }
    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        check_range(self.size, off, buf.len() as u64, "write")?;
        self.file
            .write_all_at(buf, off)
            .ctx(|| format!("unable to write {} bytes at offset {off}", buf.len()))
    }
    fn flush(&self) -> Result<()> {
        self.file.sync_data().ctx(|| "unable to flush".into())
    }
    fn discard(&self, off: u64, len: u64) -> Result<()> {
        check_range(self.size, off, len, "discard")?;
        discard_fd(&self.file, self.is_blk, off, len)
            .ctx(|| format!("unable to discard {len} bytes at offset {off}"))
    }
    fn write_zeroes(&self, off: u64, len: u64, may_unmap: bool) -> Result<()> {
        check_range(self.size, off, len, "write-zeroes")?;
        zero_fd(&self.file, self.is_blk, off, len, may_unmap)
            .ctx(|| format!("unable to zero {len} bytes at offset {off}"))
    }
    fn fast_zero(&self) -> bool {
        !self.is_blk
    }
    fn is_block_device(&self) -> bool {
        self.is_blk
    }
    fn engine_name(&self) -> &'static str {
        "sync"
    }
    fn plain_file(&self) -> Option<&File> {
        (!self.is_blk).then_some(&self.file)
    }
    fn open_direct_reader(&self) -> Result<Option<std::sync::Arc<dyn BlockIo>>> {
        match self.is_blk {
            true => super::reopen_direct(&self.file, self.size, super::IoEngine::Sync),
            false => Ok(None),
        }
    }
    fn data_ranges(&self, off: u64, len: u64) -> Result<Option<Vec<(u64, u64)>>> {
        if self.is_blk {
            return Ok(None);
        }
        check_range(self.size, off, len, "block status")?;
        data_ranges_fd(&self.file, off, off + len)
            .ctx(|| format!("unable to map allocation at offset {off} length {len}"))
    }
}

/// SEEK_DATA/SEEK_HOLE walk of `off..end` on a regular file; `None` where the file
/// system does not support it. At most 1024 ranges, the rest reported as data.
pub(crate) fn data_ranges_fd(
    file: &File,
    off: u64,
    end: u64,
) -> std::io::Result<Option<Vec<(u64, u64)>>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = off;
    while pos < end {
        // SAFETY: lseek on a valid fd with integer arguments; no memory is passed.
        let d = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if d < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(Some(out)), // only a hole up to EOF
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(None),
                _ => Err(e),
            };
        }
        let d = d as u64;
        if d >= end {
            break;
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(fd, d as libc::off_t, libc::SEEK_HOLE) };
        if h < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let h = (h as u64).min(end);
        if out.len() >= 1024 {
            out.push((d, end));
            break;
        }
        out.push((d, h));
        pos = h;
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::data_ranges_fd;
    use crate::blockio::{open, IoEngine, OpenSpec};

    #[test]
    fn conformance_sync() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(4 << 20).unwrap();
        let mut spec = OpenSpec::origin(f.path());
        spec.engine = IoEngine::Sync;
        let io = open(&spec).unwrap();
        assert_eq!(io.engine_name(), "sync");
        crate::blockio::conformance::run(&*io);
        crate::blockio::conformance::read_many(&*io);
    }

    #[test]
    fn data_ranges_follow_holes() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(8 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.as_file().write_all_at(&[1u8; 65536], 2 << 20).unwrap();
        let r = data_ranges_fd(f.as_file(), 0, 8 << 20).unwrap();
        let Some(r) = r else { return }; // file system without SEEK_DATA
        assert_eq!(r.len(), 1, "{r:?}");
        assert!(r[0].0 <= 2 << 20 && r[0].1 >= (2 << 20) + 65536, "{r:?}");
        assert!(r[0].1 - r[0].0 < 1 << 20, "{r:?}");
        let mut spec = OpenSpec::origin(f.path());
        spec.engine = IoEngine::Sync;
        let io = open(&spec).unwrap();
        assert_eq!(io.data_ranges(0, 1 << 20).unwrap(), Some(vec![]));
    }
}
