//! Raw image targets: `file:PATH` (a sparse image file) and `dev:PATH` (a block device
//! of at least the disk's size).
//!
//! Design notes
//! - `file:PATH`: the marker `PATH.incomplete` is created (and fsynced) *before* the
//!   image is created or truncated, so there is no moment at which a stale or partial
//!   image stands without it. The image is truncated to zero and then sized to the
//!   disk: every byte starts as a hole. All-zero chunks are not written (they stay
//!   holes and read as zeros). At commit the image is fsynced, then the marker is
//!   removed and the directory fsynced; on abort the marker is kept and the reason is
//!   written into it. A crash at any point leaves the marker: a reader must treat an
//!   image with a `.incomplete` sidecar as invalid.
//! - `dev:PATH`: a device keeps whatever it held before, so zero chunks are written
//!   explicitly (BLKZEROOUT through `write_zeroes`, which lets the device unmap or
//!   zero cheaply) — skipping them would leave old data in the image. A sidecar next
//!   to a device node makes no sense (`/dev` is volatile), so the first chunk (where
//!   partition tables and most filesystem superblocks live) is zeroed at `begin`, held
//!   back in memory during the backup, and written only after everything else is
//!   fsynced; then it is fsynced itself. An aborted or interrupted backup leaves a
//!   device whose first chunk is zeros: it does not look like a valid disk.
//! - A file image can take runs of the origin straight from the origin's file
//!   (`copy_from_file`: `copy_file_range`, the data never passes through the
//!   drainer's buffer; the origin's holes are skipped with SEEK_DATA/SEEK_HOLE and stay
//!   holes). Zero data blocks of the origin copied that way are stored as data: only
//!   the buffered path (`write`) sees the bytes and leaves all-zero chunks as holes.
//!   When the kernel cannot copy between the two files (EXDEV, EINVAL, EOPNOTSUPP,
//!   ENOSYS) the image says so once and the drainer reads and writes from then on.
//! - Writeback is left to the kernel until the commit's fsync. Starting it as the image
//!   fills (`sync_file_range` WRITE every 32 MiB) was measured: no gain against cp +
//!   sync on an idle disk (1.96 s vs 1.77 s median for 1 GiB, BENCHMARKS.md), so the
//!   image is written like cp writes its copy.
//! - `dev:PATH` on a block device is written O_DIRECT when the engine asks
//!   (`EngineConfig::direct_io`, the default): a backup of many TB then does not fill the
//!   page cache with a copy nobody reads back. The drainer's batches are aligned; the
//!   held-back first chunk goes through `blockio::direct`'s bounce buffer. The image
//!   is written by the drainer thread only.
//! - Granule: one tracking chunk. Scope: always every chunk (a raw image is full), so
//!   the change log is not cut for it (`uses_change_log` is false).

use super::{Scope, SnapshotInfo, Target, TargetSummary};
use crate::blockio::{self, BlockIo, OpenSpec};
use crate::bytes::is_zero;
use crate::changelog::Cut;
use crate::error::Error;
use crate::error::{IoContext, Result};
use nix::errno::Errno;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A raw image in a file or on a device.
pub struct RawImage {
    io: Arc<dyn BlockIo>,
    path: PathBuf,
    marker: Option<PathBuf>,
    disk_size: u64,
    chunk_size: u32,
    device: bool,
    held_first: Option<Vec<u8>>,
    bytes_stored: u64,
    /// Whether `copy_from_file` may still try the kernel copy.
    copy_ok: bool,
}

/// Path of the "incomplete" marker of an image file.
pub fn incomplete_marker(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".incomplete");
    PathBuf::from(s)
}

fn fsync_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("unable to sync directory {}", dir.display()))
}

impl RawImage {
    /// `file:PATH`: write the marker, then create/truncate the image, sized to the disk.
    pub fn create_file(path: &Path, disk_size: u64, chunk_size: u32) -> Result<Self> {
        let marker = incomplete_marker(path);
        let mut m = std::fs::File::create(&marker)
            .ctx(|| format!("unable to create marker {}", marker.display()))?;
        m.write_all(b"cowsnap: backup in progress; this image is not complete\n")
            .and_then(|_| m.sync_all())
            .ctx(|| format!("unable to write marker {}", marker.display()))?;
        fsync_dir(&marker)?;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .ctx(|| format!("unable to create image {}", path.display()))?;
        f.set_len(disk_size).ctx(|| {
            format!(
                "unable to size image {} to {disk_size} bytes",
                path.display()
            )
        })?;
        drop(f);
        let mut spec = OpenSpec::origin(path);
        spec.exclusive = false;
        spec.engine = blockio::IoEngine::Sync;
        let io = blockio::open(&spec).map_err(|e| e.with_context("unable to open image"))?;
        Ok(RawImage {
            io,
            path: path.to_path_buf(),
            marker: Some(marker),
            disk_size,
            chunk_size,
            device: false,
            held_first: None,
            bytes_stored: 0,
            copy_ok: true,
        })
    }

    /// `dev:PATH`: an existing block device (or file) of at least `disk_size` bytes,
    /// opened exclusively; a block device O_DIRECT when `direct` (buffered, with a log
    /// line, where the kernel refuses it).
    pub fn open_device(path: &Path, disk_size: u64, chunk_size: u32, direct: bool) -> Result<Self> {
        let mut spec = OpenSpec::origin(path);
        spec.engine = blockio::IoEngine::Sync;
        spec.direct = direct;
        let io =
            blockio::open(&spec).map_err(|e| e.with_context("unable to open target device"))?;
        if io.size() < disk_size {
            return Err(crate::err!(
                NoSpace,
                "unable to use target {}: it holds {} bytes, the disk needs {disk_size}",
                path.display(),
                io.size()
            ));
        }
        Ok(RawImage {
            io,
            path: path.to_path_buf(),
            marker: None,
            disk_size,
            chunk_size,
            device: true,
            held_first: None,
            bytes_stored: 0,
            copy_ok: true,
        })
    }

    fn first_len(&self) -> u64 {
        u64::from(self.chunk_size).min(self.disk_size)
    }

    fn ctx(&self, what: &str) -> String {
        format!("unable to {what} target {}", self.path.display())
    }
}

/// Copy `a..b` of `src` to the same offset of `dst` in the kernel. `Ok(false)`: the
/// kernel cannot copy between these files (nothing or part of it copied).
fn copy_range(src: &File, dst: &File, a: u64, b: u64) -> std::io::Result<bool> {
    let (mut i, mut o) = (a as i64, a as i64);
    while (i as u64) < b {
        let n = usize::try_from(b - i as u64).unwrap_or(usize::MAX);
        match nix::fcntl::copy_file_range(src, Some(&mut i), dst, Some(&mut o), n) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the origin ends at offset {i}, before {b}"),
                ))
            }
            Ok(_) => {}
            Err(Errno::EINTR) => {}
            Err(Errno::EXDEV | Errno::EINVAL | Errno::EOPNOTSUPP | Errno::ENOSYS) => {
                return Ok(false)
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

impl Target for RawImage {
    fn granule_chunks(&self) -> u32 {
        1
    }

    fn uses_change_log(&self) -> bool {
        // a raw image is always full and has no generations: a cut would only be
        // merged back at the end
        false
    }

    fn scope(&mut self, _cut: Option<&Cut>) -> Result<Scope> {
        Ok(Scope::All)
    }

    fn begin(&mut self, info: &SnapshotInfo) -> Result<()> {
        if info.disk_size != self.disk_size || info.chunk_size != self.chunk_size {
            return Err(crate::err!(
                InvalidInput,
                "{}: prepared for {} bytes / {}-byte chunks, snapshot has {} / {}",
                self.ctx("begin"),
                self.disk_size,
                self.chunk_size,
                info.disk_size,
                info.chunk_size
            ));
        }
        if self.device {
            self.io
                .write_zeroes(0, self.first_len(), false)
                .and_then(|_| self.io.flush())
                .map_err(|e| e.with_context(self.ctx("invalidate the header of")))?;
        }
        Ok(())
    }

    fn write(&mut self, off: u64, data: &[u8]) -> Result<()> {
        let cs = self.chunk_size as usize;
        let mut data = data;
        let mut off = off;
        if self.device && off == 0 && !data.is_empty() {
            let n = (self.first_len() as usize).min(data.len());
            self.held_first = Some(data[..n].to_vec());
            data = &data[n..];
            off += n as u64;
        }
        // coalesce runs of non-zero (or, on a device, zero) chunks
        let mut i = 0;
        while i < data.len() {
            let zero = is_zero(&data[i..(i + cs).min(data.len())]);
            let mut j = i;
            while j < data.len() && is_zero(&data[j..(j + cs).min(data.len())]) == zero {
                j = (j + cs).min(data.len());
            }
            let o = off + i as u64;
            if !zero {
                self.io
                    .write_at(&data[i..j], o)
                    .map_err(|e| e.with_context(self.ctx("write")))?;
                self.bytes_stored += (j - i) as u64;
            } else if self.device {
                self.io
                    .write_zeroes(o, (j - i) as u64, false)
                    .map_err(|e| e.with_context(self.ctx("zero")))?;
            }
            i = j;
        }
        Ok(())
    }

    fn copy_from_file(&mut self, src: &File, off: u64, len: u64) -> Result<bool> {
        if self.device || !self.copy_ok {
            return Ok(false);
        }
        crate::blockio::check_range(self.disk_size, off, len, "image copy")?;
        let end = off + len;
        // the image was created empty: the origin's holes stay holes
        let data = match crate::blockio::sync::data_ranges_fd(src, off, end) {
            Ok(Some(r)) => r,
            _ => vec![(off, end)],
        };
        for (a, b) in data {
            let (a, b) = (a.max(off), b.min(end));
            if a >= b {
                continue;
            }
            let Some(dst) = self.io.plain_file() else {
                return Ok(false);
            };
            let copied = copy_range(src, dst, a, b).map_err(|e| {
                Error::io(
                    format!(
                        "{} (copying {} bytes at offset {a} from the origin)",
                        self.ctx("write"),
                        b - a
                    ),
                    e,
                )
            })?;
            if !copied {
                log::info!(
                    "{}: the kernel cannot copy from the origin's file; reading and writing",
                    self.path.display()
                );
                self.copy_ok = false;
                return Ok(false);
            }
            self.bytes_stored += b - a;
        }
        Ok(true)
    }

    fn write_zeroes(&mut self, off: u64, len: u64) -> Result<()> {
        crate::blockio::check_range(self.disk_size, off, len, "image zero range")?;
        let (mut off, mut len) = (off, len);
        if self.device && off == 0 && len > 0 {
            // the first chunk is zeroed at begin and written at commit: keep zeros
            let n = self.first_len().min(len);
            self.held_first = Some(vec![0u8; n as usize]);
            off += n;
            len -= n;
        }
        if len == 0 {
            return Ok(());
        }
        if self.device {
            // a device holds anything: zero it (BLKZEROOUT or written zeros)
            self.io
                .write_zeroes(off, len, false)
                .map_err(|e| e.with_context(self.ctx("zero")))?;
        }
        // a file image was created empty at its full size: its holes read as zeros
        Ok(())
    }

    fn commit(mut self: Box<Self>) -> Result<TargetSummary> {
        self.io
            .flush()
            .map_err(|e| e.with_context(self.ctx("flush")))?;
        if self.device {
            let first = self.held_first.take().unwrap_or_default();
            if !first.is_empty() && !is_zero(&first) {
                self.io
                    .write_at(&first, 0)
                    .and_then(|_| self.io.flush())
                    .map_err(|e| e.with_context(self.ctx("write the header of")))?;
                self.bytes_stored += first.len() as u64;
            }
        }
        if let Some(m) = self.marker.take() {
            std::fs::remove_file(&m).ctx(|| format!("unable to remove marker {}", m.display()))?;
            fsync_dir(&m)?;
        }
        Ok(TargetSummary {
            generation: None,
            bytes_stored: self.bytes_stored,
            notes: Vec::new(),
            repo_io: None,
        })
    }

    fn abort(self: Box<Self>, why: &str) {
        match &self.marker {
            Some(m) => {
                let r = std::fs::write(
                    m,
                    format!("cowsnap: backup failed; this image is not complete: {why}\n"),
                );
                if let Err(e) = r {
                    log::error!("unable to update marker {}: {e}", m.display());
                }
            }
            None => log::warn!(
                "backup to {} failed ({why}); its first {} bytes are left zeroed",
                self.path.display(),
                self.first_len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(size: u64) -> SnapshotInfo {
        SnapshotInfo {
            disk: "t".into(),
            disk_size: size,
            chunk_size: 65536,
            created_unix: 0,
            lineage: String::new(),
            seq_next: 0,
            seq_lowest_unacked: 0,
        }
    }

    #[test]
    fn file_image_is_sparse_and_marked_until_commit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![0xEEu8; 1 << 20]).unwrap(); // old content is discarded
        let size = 4 * 65536 + 100;
        let mut t = Box::new(RawImage::create_file(&p, size, 65536).unwrap());
        assert!(incomplete_marker(&p).exists());
        t.begin(&info(size)).unwrap();
        let mut d = vec![0u8; 2 * 65536];
        d[65536 + 5] = 9;
        t.write(0, &d).unwrap();
        t.write(4 * 65536, &[7u8; 100]).unwrap();
        assert!(incomplete_marker(&p).exists());
        let s = t.commit().unwrap();
        assert_eq!(s.bytes_stored, 65536 + 100);
        assert!(!incomplete_marker(&p).exists());
        let img = std::fs::read(&p).unwrap();
        assert_eq!(img.len() as u64, size);
        assert_eq!(img[65536 + 5], 9);
        assert!(img[..65536].iter().all(|&b| b == 0));
        assert!(img[2 * 65536..4 * 65536].iter().all(|&b| b == 0));
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&p).unwrap().blocks() * 512;
        assert!(blocks < 3 * 65536, "zero chunks must stay holes ({blocks})");
    }

    #[test]
    fn aborted_file_image_keeps_marker_with_reason() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let mut t = Box::new(RawImage::create_file(&p, 65536, 65536).unwrap());
        t.begin(&info(65536)).unwrap();
        t.abort("target vanished");
        let m = std::fs::read_to_string(incomplete_marker(&p)).unwrap();
        assert!(m.contains("target vanished"), "{m}");
    }

    #[test]
    fn device_writes_zeros_and_holds_back_first_chunk() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let size = 3 * 65536;
        std::fs::write(f.path(), vec![0xAAu8; size as usize + 4096]).unwrap();
        let mut t = Box::new(RawImage::open_device(f.path(), size, 65536, true).unwrap());
        t.begin(&info(size)).unwrap();
        t.write(0, &vec![5u8; 65536]).unwrap();
        t.write(65536, &vec![0u8; 2 * 65536]).unwrap();
        let mid = std::fs::read(f.path()).unwrap();
        assert!(mid[..65536].iter().all(|&b| b == 0), "header held back");
        t.commit().unwrap();
        let img = std::fs::read(f.path()).unwrap();
        assert!(img[..65536].iter().all(|&b| b == 5));
        assert!(img[65536..size as usize].iter().all(|&b| b == 0));
        assert!(
            img[size as usize..].iter().all(|&b| b == 0xAA),
            "past the disk untouched"
        );
        // too small
        assert!(RawImage::open_device(f.path(), size * 2, 65536, true).is_err());
    }
}
