//! Positioned I/O on the origin disk (a block device or a regular file) and on other
//! devices the engine touches (containers, targets, restore destinations).
//!
//! Design notes
//! - `BlockIo` is small and capability-based: read, write, flush, discard, zero. Every
//!   call is a whole operation: `read_at` fills the buffer or fails, never returns short.
//! - Two engines implement it: [`sync::SyncIo`] (pread/pwrite, always available) and
//!   [`uring::UringIo`] (io_uring, probed at start). [`open`] picks one by [`IoEngine`].
//! - Discard is a hole punch on files and BLKDISCARD on devices; write-zeroes is a
//!   zero-range fallocate on files and BLKZEROOUT on devices, with a plain write of
//!   zeros as fallback.
//! - `read_many` reads several ranges in one call: a loop of `read_at` by default,
//!   a bounded batch of SQEs per `io_uring_enter` on the io_uring engine.
//! - O_DIRECT (`OpenSpec::direct`, block devices only) is wrapped in
//!   [`direct::DirectIo`], which checks the device's logical block size and bounces
//!   unaligned requests through an aligned buffer. A device or driver that refuses
//!   O_DIRECT (EINVAL at open) is opened buffered, with a log line.
//! - Block devices are opened with `O_EXCL` when asked (the daemon always asks for the
//!   origin) so nothing mounts or writes behind the daemon.

pub mod direct;
pub mod sync;
pub mod uring;

use crate::error::{Error, ErrorKind, IoContext, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Positioned I/O on a device or a file.
pub trait BlockIo: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` from `off`. Fails rather than return short.
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()>;
    /// Fill every `(buf, off)` of `reqs`, like `read_at` on each. The requests are
    /// independent (any order, any overlap of offsets; the buffers are disjoint by
    /// construction). Fails if any fails; which of the others were filled is then
    /// unspecified. Engines that can keep several reads in flight at once override it
    /// (io_uring: a bounded number of SQEs per submission).
    fn read_many(&self, reqs: &mut [(&mut [u8], u64)]) -> Result<()> {
        for (buf, off) in reqs.iter_mut() {
            self.read_at(buf, *off)?;
        }
        Ok(())
    }
    /// Write all of `buf` at `off`.
    fn write_at(&self, buf: &[u8], off: u64) -> Result<()>;
    /// Make every completed write durable.
    fn flush(&self) -> Result<()>;
    /// Deallocate a range (contents then read as zeros on files; unspecified on
    /// devices without discard-zeroes).
    fn discard(&self, off: u64, len: u64) -> Result<()>;
    /// Make a range read as zeros. `may_unmap` allows deallocation (NBD without NO_HOLE).
    fn write_zeroes(&self, off: u64, len: u64, may_unmap: bool) -> Result<()>;
    /// Whether a zero-range can be done without writing data (for NBD FAST_ZERO).
    fn fast_zero(&self) -> bool;
    /// Whether this is a block device (not a file).
    fn is_block_device(&self) -> bool;
    /// Which engine serves this I/O ("uring" or "sync"), for status output.
    fn engine_name(&self) -> &'static str;
    /// The allocated (data) ranges `[start, end)` within `off..off+len`, ascending, if
    /// the backend can tell cheaply (SEEK_DATA/SEEK_HOLE on regular files); `None`
    /// when unknown (then everything must be treated as data). Not data-changing, so
    /// a default is safe.
    fn data_ranges(&self, off: u64, len: u64) -> Result<Option<Vec<(u64, u64)>>> {
        let _ = (off, len);
        Ok(None)
    }
    /// The regular file whose plain reads are this backend's reads, for in-kernel
    /// copies (`copy_file_range`) of ranges the caller has made stable. `None` for
    /// block devices and for any backend whose reads are more than a read of one file
    /// (a live restore's filling reads, test disks): their data must go through
    /// `read_at`. Not data-changing, so a default (`None`, the safe answer) is fine.
    fn plain_file(&self) -> Option<&File> {
        None
    }
    /// Start writing `off..off+len` back to the disk without waiting for it, so a later
    /// flush finds little left to write (restores: the next chunks are read meanwhile).
    /// Advice only, never data-changing: done where the backend is one plain file
    /// ([`Self::plain_file`]), nothing elsewhere.
    fn start_writeback(&self, off: u64, len: u64) {
        if let Some(f) = self.plain_file() {
            crate::fsutil::start_writeback(f, off, len);
        }
    }
    /// A second, read-only handle on the same block device that bypasses the page
    /// cache (O_DIRECT), on the same engine, taking any buffer and offset (unaligned
    /// requests go through an aligned bounce buffer: [`direct::DirectIo`]). `Ok(None)`
    /// for anything but a plain block device (files, and backends whose reads are more
    /// than a read of one device), and where the device or its driver refuses O_DIRECT
    /// (EINVAL), which is logged. Not data-changing, so a default (`None`) is safe.
    fn open_direct_reader(&self) -> Result<Option<Arc<dyn BlockIo>>> {
        Ok(None)
    }
}

/// Which I/O engine to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEngine {
    /// io_uring if the probe succeeds, otherwise pread/pwrite.
    Auto,
    /// io_uring only; opening fails if unsupported.
    Uring,
    /// pread/pwrite only.
    Sync,
}

impl std::str::FromStr for IoEngine {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(IoEngine::Auto),
            "uring" | "io_uring" => Ok(IoEngine::Uring),
            "sync" => Ok(IoEngine::Sync),
            _ => Err(crate::err!(
                InvalidInput,
                "unknown I/O engine {s:?} (expected auto, uring or sync)"
            )),
        }
    }
}

/// How to open a device or file.
#[derive(Debug, Clone)]
pub struct OpenSpec {
    /// The path.
    pub path: PathBuf,
    /// Open read-only.
    pub read_only: bool,
    /// Open block devices with `O_EXCL` (the origin always is).
    pub exclusive: bool,
    /// I/O engine.
    pub engine: IoEngine,
    /// Open with O_DIRECT (devices only; files use the page cache).
    pub direct: bool,
}

impl OpenSpec {
    /// Defaults for an origin: read-write, exclusive, auto engine, buffered.
    pub fn origin(path: impl AsRef<Path>) -> Self {
        OpenSpec {
            path: path.as_ref().to_path_buf(),
            read_only: false,
            exclusive: true,
            engine: IoEngine::Auto,
            direct: false,
        }
    }
}

/// Open the file and find its size and type; the last value says whether the fd is
/// O_DIRECT (asked for, a block device, and accepted by the kernel).
pub(crate) fn open_file(spec: &OpenSpec) -> Result<(File, u64, bool, bool)> {
    let path = &spec.path;
    let meta = std::fs::metadata(path).ctx(|| format!("unable to open {}", path.display()))?;
    let is_blk = meta.file_type().is_block_device();
    if !is_blk && !meta.file_type().is_file() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "unable to open {}: not a block device or a regular file",
                path.display()
            ),
        ));
    }
    let mut flags = libc::O_CLOEXEC;
    if is_blk && spec.exclusive {
        flags |= libc::O_EXCL;
    }
    let open = |flags: libc::c_int| {
        OpenOptions::new()
            .read(true)
            .write(!spec.read_only)
            .custom_flags(flags)
            .open(path)
    };
    let mut direct = spec.direct && is_blk;
    let opened = match open(flags | if direct { libc::O_DIRECT } else { 0 }) {
        Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
            log::info!(
                "{}: O_DIRECT refused ({e}); using the page cache",
                path.display()
            );
            direct = false;
            open(flags)
        }
        r => r,
    };
    let file = opened.map_err(|e| {
        if e.raw_os_error() == Some(libc::EBUSY) {
            Error::io(
                format!(
                    "unable to open {} exclusively (mounted, or in use by another program)",
                    path.display()
                ),
                e,
            )
        } else {
            Error::io(format!("unable to open {}", path.display()), e)
        }
    })?;
    let size = if is_blk {
        device_size(&file).ctx(|| format!("unable to read the size of {}", path.display()))?
    } else {
        meta.len()
    };
    Ok((file, size, is_blk, direct))
}

/// Size of a block device (BLKGETSIZE64).
pub fn device_size(file: &File) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut size: u64 = 0;
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    // SAFETY: the fd is valid for the lifetime of `file`, and BLKGETSIZE64 writes one u64
    // through the pointer, which points at a live, properly aligned u64.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

/// Open a device or file with the requested engine.
pub fn open(spec: &OpenSpec) -> Result<Arc<dyn BlockIo>> {
    let (file, size, is_blk, direct) = open_file(spec)?;
    let lbs = match direct {
        true => Some(
            logical_block_size(&file)
                .ctx(|| format!("unable to read the block size of {}", spec.path.display()))?,
        ),
        false => None,
    };
    let io = with_engine(spec.engine, file, size, is_blk)?;
    match lbs {
        Some(lbs) => Ok(Arc::new(direct::DirectIo::new(io, lbs))),
        None => Ok(io),
    }
}

/// Wrap an open file in the requested engine.
fn with_engine(engine: IoEngine, file: File, size: u64, is_blk: bool) -> Result<Arc<dyn BlockIo>> {
    match engine {
        IoEngine::Sync => Ok(Arc::new(sync::SyncIo::new(file, size, is_blk))),
        IoEngine::Uring => Ok(Arc::new(uring::UringIo::new(file, size, is_blk)?)),
        IoEngine::Auto => {
            if uring::probe() {
                Ok(Arc::new(uring::UringIo::new(file, size, is_blk)?))
            } else {
                log::info!("io_uring unavailable; using pread/pwrite");
                Ok(Arc::new(sync::SyncIo::new(file, size, is_blk)))
            }
        }
    }
}

/// A read-only O_DIRECT handle on the block device open as `file`, on `engine`
/// (`BlockIo::open_direct_reader`): the same inode reopened through `/proc/self/fd`, so
/// it is the device the daemon holds even if the path was replaced since. Not
/// exclusive: the daemon's own O_EXCL handle already keeps other claimants out.
/// The inode open as `file`, opened again read-only with O_DIRECT through
/// `/proc/self/fd` (EINVAL: the file system refuses O_DIRECT).
fn reopen_proc_direct(file: &File) -> std::io::Result<File> {
    use std::os::fd::AsRawFd;
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// `Ok(None)` when the kernel refuses O_DIRECT on it (EINVAL), with a log line.
pub(crate) fn reopen_direct(
    file: &File,
    size: u64,
    engine: IoEngine,
) -> Result<Option<Arc<dyn BlockIo>>> {
    let f = match reopen_proc_direct(file) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            log::info!(
                "O_DIRECT refused on the origin ({e}); the drainer reads through the page cache"
            );
            return Ok(None);
        }
        Err(e) => return Err(Error::io("unable to reopen the origin with O_DIRECT", e)),
    };
    let lbs = logical_block_size(&f).ctx(|| "unable to read the origin's block size".into())?;
    let io = with_engine(engine, f, size, true)?;
    Ok(Some(Arc::new(direct::DirectIo::new(io, lbs))))
}

/// A read-only O_DIRECT handle on the regular file `origin` reads (its
/// [`BlockIo::plain_file`]; `Ok(None)` for anything else), on the same engine, for a
/// backup's bulk reads of a file origin (`Target::reads_file_origin_direct`). The
/// same inode reopened through `/proc/self/fd`; requests aligned to
/// [`crate::aligned::ALIGN`] (4096, a multiple of every common file system's O_DIRECT
/// unit) go to the file O_DIRECT, the rest through an aligned bounce buffer, and the
/// bytes past the last whole block of a size that is not a multiple of it through a
/// buffered fd of the file ([`direct::DirectIo::with_tail`]). Coherence is the block
/// device's (`direct` module notes): Linux writes back the dirty cached pages of a
/// file range before an O_DIRECT read of it. `Ok(None)`, with a log line, where the
/// file system refuses O_DIRECT or 4096-byte aligned direct reads (EINVAL).
pub fn open_direct_file_reader(origin: &dyn BlockIo) -> Result<Option<Arc<dyn BlockIo>>> {
    use std::os::unix::fs::FileExt;
    let Some(file) = origin.plain_file() else {
        return Ok(None);
    };
    let size = origin.size();
    let refused = |e: &std::io::Error| {
        log::info!(
            "O_DIRECT refused on the origin file ({e}); the drainer reads through the page cache"
        );
    };
    let f = match reopen_proc_direct(file) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            refused(&e);
            return Ok(None);
        }
        Err(e) => return Err(Error::io("unable to reopen the origin with O_DIRECT", e)),
    };
    let lbs = crate::aligned::ALIGN;
    // a file system that wants more than 4096-byte alignment refuses these
    let mut probe = crate::aligned::AlignedBuf::new();
    probe.resize(lbs);
    for off in [0, lbs as u64] {
        if off + lbs as u64 > size {
            break;
        }
        match f.read_at(&mut probe, off) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                refused(&e);
                return Ok(None);
            }
            Err(e) => return Err(Error::io("unable to read the origin with O_DIRECT", e)),
        }
    }
    let tail = file
        .try_clone()
        .map_err(|e| Error::io("unable to duplicate the origin's fd", e))?;
    let engine = match origin.engine_name() {
        "uring" => IoEngine::Uring,
        _ => IoEngine::Sync,
    };
    let io = with_engine(engine, f, size, false)?;
    Ok(Some(Arc::new(
        direct::DirectIo::new(io, lbs).with_tail(tail),
    )))
}

/// Logical block size of a block device (BLKSSZGET): the unit of O_DIRECT offsets and
/// lengths.
pub fn logical_block_size(file: &File) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // BLKSSZGET = _IO(0x12, 104)
    const BLKSSZGET: libc::c_ulong = 0x1268;
    // SAFETY: the fd is valid for the lifetime of `file`, and BLKSSZGET writes one int
    // through the pointer, which points at a live, properly aligned c_int.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut n as *mut libc::c_int) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    match usize::try_from(n) {
        Ok(n) if n.is_power_of_two() && n <= crate::aligned::ALIGN => Ok(n),
        _ => Err(std::io::Error::other(format!(
            "unexpected logical block size {n}"
        ))),
    }
}

/// Check that `off..off+len` lies inside a device of `size` bytes.
pub fn check_range(size: u64, off: u64, len: u64, what: &str) -> Result<()> {
    match off.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(crate::err!(
            OutOfRange,
            "{what} at offset {off} length {len} is outside the device (size {size})"
        )),
    }
}

#[cfg(test)]
pub(crate) mod conformance {
    //! Tests every engine runs.
    use super::*;

    pub fn run(io: &dyn BlockIo) {
        let size = io.size();
        assert!(size >= 1 << 20);
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
        io.write_at(&data, 4096).unwrap();
        let mut back = vec![0u8; 8192];
        io.read_at(&mut back, 4096).unwrap();
        assert_eq!(back, data);
        // last byte
        io.write_at(&[0xAB], size - 1).unwrap();
        let mut one = [0u8; 1];
        io.read_at(&mut one, size - 1).unwrap();
        assert_eq!(one[0], 0xAB);
        // past the end fails
        assert!(io.read_at(&mut back, size - 10).is_err());
        assert!(io.write_at(&data, size - 10).is_err());
        // zeroes and discard
        io.write_zeroes(4096, 4096, false).unwrap();
        io.read_at(&mut back, 4096).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0));
        assert_eq!(&back[4096..], &data[4096..]);
        io.write_zeroes(8192, 4096, true).unwrap();
        io.read_at(&mut back[..4096], 8192).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0));
        io.write_at(&data, 65536).unwrap();
        io.discard(65536, 8192).unwrap();
        io.flush().unwrap();
        // unaligned
        io.write_at(&[1, 2, 3], 513).unwrap();
        let mut three = [0u8; 3];
        io.read_at(&mut three, 513).unwrap();
        assert_eq!(three, [1, 2, 3]);
    }

    /// `read_many` agrees with `read_at`: more requests than the io_uring batch depth,
    /// of mixed sizes and offsets, some empty, and one past the end refused whole.
    pub fn read_many(io: &dyn BlockIo) {
        let size = io.size();
        assert!(size >= 1 << 20);
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
        io.write_at(&data, 0).unwrap();
        let n = 3 * crate::blockio::uring::BATCH_DEPTH + 5;
        let want: Vec<(u64, usize)> = (0..n as u64)
            .map(|i| {
                (
                    (i * 19_937) % ((1 << 20) - 70_000),
                    (i as usize * 977) % 65_536,
                )
            })
            .collect();
        let mut bufs: Vec<Vec<u8>> = want.iter().map(|&(_, len)| vec![0xFF; len]).collect();
        let mut reqs: Vec<(&mut [u8], u64)> = bufs
            .iter_mut()
            .zip(&want)
            .map(|(b, &(off, _))| (&mut b[..], off))
            .collect();
        io.read_many(&mut reqs).unwrap();
        for (b, &(off, len)) in bufs.iter().zip(&want) {
            assert_eq!(
                &b[..],
                &data[off as usize..off as usize + len],
                "read at {off}"
            );
        }
        // an empty batch is fine
        io.read_many(&mut []).unwrap();
        // a request crossing the end fails, whatever the others
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 8192];
        let mut reqs: Vec<(&mut [u8], u64)> = vec![(&mut a[..], 0), (&mut b[..], size - 4096)];
        let e = io.read_many(&mut reqs).unwrap_err();
        assert!(e.to_string().contains("outside the device"), "{e}");
    }
}
