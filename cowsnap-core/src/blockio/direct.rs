//! O_DIRECT on a block device: the engine's I/O, with the alignment rules kept.
//!
//! Design notes
//! - An O_DIRECT fd takes only requests whose buffer address, offset and length are
//!   multiples of the device's logical block size (BLKSSZGET); anything else fails
//!   with EINVAL. [`DirectIo`] passes aligned requests to the engine as they are (the
//!   drainer's buffer is an [`AlignedBuf`] and its runs start on chunk boundaries, so
//!   that is every read of a backup) and bounces the rest through an aligned buffer of
//!   at most [`BOUNCE`] bytes at a time: reads read the covering blocks and copy out;
//!   writes read the partly covered edge blocks, patch them and write the cover
//!   (read-modify-write, so a writer of the same blocks through another handle at the
//!   same time could be undone: only for single-writer users such as a `dev:` target).
//! - Page cache coherence. Linux writes back and waits on dirty page-cache pages of
//!   the range before an O_DIRECT read of a block device, so a direct read sees every
//!   buffered write that completed before it. An O_DIRECT write invalidates the cached
//!   pages of its range after it, so later buffered readers see it; a buffered write
//!   racing with it on the same blocks is not ordered, which is why the origin is only
//!   ever read O_DIRECT (the writers' path stays buffered) and a target is written by
//!   one thread.
//! - Device sizes are multiples of the logical block size, so the covering range of a
//!   request inside the device stays inside it. A regular file's size need not be
//!   (`open_direct_file_reader`): its last, partial block is read through a second,
//!   buffered fd of the same file ([`DirectIo::with_tail`]), as is any part of a
//!   request past the last whole block; an O_DIRECT read never reaches past the end.

use super::{check_range, BlockIo};
use crate::aligned::AlignedBuf;
use crate::error::Result;
use std::fs::File;
use std::sync::Arc;

/// Largest bounce buffer for an unaligned request, bytes.
pub const BOUNCE: usize = 1 << 20;

/// An engine on an O_DIRECT block-device fd, taking requests of any alignment.
pub struct DirectIo {
    inner: Arc<dyn BlockIo>,
    lbs: usize,
    /// A buffered fd of the same file, for the bytes past the last whole block of a
    /// size that is not a multiple of `lbs` (regular files only).
    tail: Option<File>,
}

impl DirectIo {
    /// Wrap an engine open on an O_DIRECT fd of a device with logical blocks of `lbs`
    /// bytes (a power of two, at most `aligned::ALIGN`).
    pub fn new(inner: Arc<dyn BlockIo>, lbs: usize) -> Self {
        debug_assert!(lbs.is_power_of_two() && lbs <= crate::aligned::ALIGN);
        DirectIo {
            inner,
            lbs,
            tail: None,
        }
    }

    /// Read the bytes from the last whole block on through `tail`, a buffered fd of
    /// the same file (for a size that is not a multiple of the block size).
    pub fn with_tail(mut self, tail: File) -> Self {
        self.tail = Some(tail);
        self
    }

    /// Read the part of `buf` (at `off`) at or past the last whole block through the
    /// tail fd, if there is one; returns the part still to read.
    fn read_tail<'b>(&self, buf: &'b mut [u8], off: u64) -> Result<&'b mut [u8]> {
        let Some(t) = &self.tail else {
            return Ok(buf);
        };
        let l = self.lbs as u64;
        let whole = self.size() / l * l;
        if off + buf.len() as u64 <= whole {
            return Ok(buf);
        }
        let head = whole.saturating_sub(off).min(buf.len() as u64) as usize;
        let (head_buf, rest) = buf.split_at_mut(head);
        let roff = off + head as u64;
        use std::os::unix::fs::FileExt;
        t.read_exact_at(rest, roff).map_err(|e| {
            crate::Error::io(
                format!("unable to read {} bytes at offset {roff}", rest.len()),
                e,
            )
        })?;
        Ok(head_buf)
    }

    /// The logical block size requests are aligned to.
    pub fn block_size(&self) -> usize {
        self.lbs
    }

    fn aligned(&self, ptr: *const u8, off: u64, len: usize) -> bool {
        let m = self.lbs - 1;
        (ptr as usize) & m == 0 && (off as usize) & m == 0 && len & m == 0
    }

    /// `off..end` widened to whole logical blocks.
    fn cover(&self, off: u64, end: u64) -> (u64, u64) {
        let l = self.lbs as u64;
        (off / l * l, end.div_ceil(l) * l)
    }

    fn bounce_read(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let mut tmp = AlignedBuf::new();
        let mut done = 0usize;
        while done < buf.len() {
            let o = off + done as u64;
            let n = (buf.len() - done).min(BOUNCE - self.lbs);
            let (a, e) = self.cover(o, o + n as u64);
            tmp.resize((e - a) as usize);
            self.inner.read_at(&mut tmp, a)?;
            let s = (o - a) as usize;
            buf[done..done + n].copy_from_slice(&tmp[s..s + n]);
            done += n;
        }
        Ok(())
    }

    fn bounce_write(&self, buf: &[u8], off: u64) -> Result<()> {
        let mut tmp = AlignedBuf::new();
        let lbs = self.lbs;
        let mut done = 0usize;
        while done < buf.len() {
            let o = off + done as u64;
            let n = (buf.len() - done).min(BOUNCE - lbs);
            let (a, e) = self.cover(o, o + n as u64);
            let len = (e - a) as usize;
            tmp.resize(len);
            let s = (o - a) as usize;
            // the edge blocks the data covers only in part keep their other bytes
            if s != 0 {
                self.inner.read_at(&mut tmp[..lbs], a)?;
            }
            if !(s + n).is_multiple_of(lbs) {
                let last = len - lbs;
                self.inner.read_at(&mut tmp[last..], e - lbs as u64)?;
            }
            tmp[s..s + n].copy_from_slice(&buf[done..done + n]);
            self.inner.write_at(&tmp, a)?;
            done += n;
        }
        Ok(())
    }
}

impl BlockIo for DirectIo {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        check_range(self.size(), off, buf.len() as u64, "read")?;
        let buf = self.read_tail(buf, off)?;
        if buf.is_empty() {
            Ok(())
        } else if self.aligned(buf.as_ptr(), off, buf.len()) {
            self.inner.read_at(buf, off)
        } else {
            self.bounce_read(buf, off)
        }
    }
    fn read_many(&self, reqs: &mut [(&mut [u8], u64)]) -> Result<()> {
        let mut direct: Vec<(&mut [u8], u64)> = Vec::with_capacity(reqs.len());
        for (buf, off) in reqs.iter_mut() {
            check_range(self.size(), *off, buf.len() as u64, "read")?;
            let buf = self.read_tail(buf, *off)?;
            if buf.is_empty() {
                continue;
            }
            if self.aligned(buf.as_ptr(), *off, buf.len()) {
                direct.push((buf, *off));
            } else {
                self.bounce_read(buf, *off)?;
            }
        }
        self.inner.read_many(&mut direct)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        check_range(self.size(), off, buf.len() as u64, "write")?;
        if self.tail.is_some() {
            return Err(crate::err!(
                InvalidInput,
                "unable to write at offset {off}: a file's O_DIRECT handle only reads"
            ));
        }
        if self.aligned(buf.as_ptr(), off, buf.len()) {
            self.inner.write_at(buf, off)
        } else {
            self.bounce_write(buf, off)
        }
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
        self.inner.engine_name()
    }
    fn plain_file(&self) -> Option<&File> {
        None
    }
    fn open_direct_reader(&self) -> Result<Option<Arc<dyn BlockIo>>> {
        self.inner.open_direct_reader()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockio::{sync::SyncIo, uring, uring::UringIo};
    use std::os::unix::fs::{FileExt, OpenOptionsExt};

    /// A file of `len` bytes of a pattern, and an O_DIRECT fd on it; `None` where the
    /// file system refuses O_DIRECT.
    fn direct_file(len: usize) -> Option<(tempfile::NamedTempFile, File, Vec<u8>)> {
        let f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i / 512 % 249) as u8 + 1).collect();
        std::fs::write(f.path(), &data).unwrap();
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(f.path())
        {
            Ok(d) => Some((f, d, data)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => None,
            Err(e) => panic!("{e}"),
        }
    }

    fn engines(file: File, size: u64) -> Vec<Arc<dyn BlockIo>> {
        let mut v: Vec<Arc<dyn BlockIo>> = Vec::new();
        let dup = file.try_clone().unwrap();
        v.push(Arc::new(SyncIo::new(dup, size, false)));
        if uring::probe() {
            v.push(Arc::new(UringIo::new(file, size, false).unwrap()));
        }
        v
    }

    #[test]
    fn unaligned_requests_are_bounced_on_both_engines() {
        let size = 4 << 20;
        let Some((f, fd, _)) = direct_file(size) else {
            println!("SKIP: no O_DIRECT on this file system");
            return;
        };
        for inner in engines(fd, size as u64) {
            let name = inner.engine_name();
            let io = DirectIo::new(inner, 4096);
            crate::blockio::conformance::run(&io);
            crate::blockio::conformance::read_many(&io);
            // a read of aligned and unaligned requests in one batch
            let mut a = AlignedBuf::new();
            a.resize(3 * 4096);
            let mut u = vec![0u8; 5000];
            let mut reqs: Vec<(&mut [u8], u64)> =
                vec![(&mut a[..], 8192), (&mut u[..], 77), (&mut [][..], 3)];
            io.read_many(&mut reqs).unwrap();
            let plain = File::open(f.path()).unwrap();
            let mut want = vec![0u8; 3 * 4096];
            plain.read_exact_at(&mut want, 8192).unwrap();
            assert_eq!(&a[..], &want[..], "{name}");
            let mut want = vec![0u8; 5000];
            plain.read_exact_at(&mut want, 77).unwrap();
            assert_eq!(u, want, "{name}");
            // an unaligned write keeps the neighbouring bytes of its edge blocks
            let mut before = vec![0u8; 3 * 4096];
            plain.read_exact_at(&mut before, 1 << 20).unwrap();
            io.write_at(&[0xC3; 5000], (1 << 20) + 100).unwrap();
            let mut after = vec![0u8; 3 * 4096];
            plain.read_exact_at(&mut after, 1 << 20).unwrap();
            before[100..5100].fill(0xC3);
            assert_eq!(after, before, "{name}");
            // larger than the bounce buffer, unaligned both ways
            let big: Vec<u8> = (0..(BOUNCE * 2 + 999)).map(|i| (i % 7) as u8).collect();
            io.write_at(&big, 1_000_001).unwrap();
            let mut back = vec![0u8; big.len() + 2];
            io.read_at(&mut back[1..big.len() + 1], 1_000_001).unwrap();
            assert_eq!(&back[1..big.len() + 1], &big[..], "{name}");
        }
    }

    #[test]
    fn the_bare_o_direct_engines_refuse_unaligned_requests_cleanly() {
        let size = 1 << 20;
        let Some((_f, fd, data)) = direct_file(size) else {
            println!("SKIP: no O_DIRECT on this file system");
            return;
        };
        for io in engines(fd, size as u64) {
            let name = io.engine_name();
            let mut a = AlignedBuf::new();
            a.resize(8192);
            // an offset off the block size: EINVAL from the kernel, an error here
            assert!(io.read_at(&mut a[..4096], 1).is_err(), "{name}");
            let mut b = AlignedBuf::new();
            b.resize(4096);
            let (a1, a2) = a.split_at_mut(4096);
            let mut reqs: Vec<(&mut [u8], u64)> = vec![(a1, 0), (a2, 4097), (&mut b[..], 4096)];
            assert!(io.read_many(&mut reqs).is_err(), "{name}");
            // and the engine works on afterwards
            let mut reqs: Vec<(&mut [u8], u64)> = vec![(&mut a[..], 0), (&mut b[..], 65536)];
            io.read_many(&mut reqs).unwrap();
            assert_eq!(&a[..], &data[..8192], "{name}");
            assert_eq!(&b[..], &data[65536..65536 + 4096], "{name}");
        }
    }

    /// The buffered origin of a file of `size` bytes of a pattern on `engine`.
    fn file_origin(
        size: usize,
        engine: crate::blockio::IoEngine,
    ) -> (tempfile::NamedTempFile, Arc<dyn BlockIo>, Vec<u8>) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..size).map(|i| (i * 7 / 4093 % 251) as u8 + 1).collect();
        std::fs::write(f.path(), &data).unwrap();
        let mut spec = crate::blockio::OpenSpec::origin(f.path());
        spec.engine = engine;
        let io = crate::blockio::open(&spec).unwrap();
        (f, io, data)
    }

    fn file_engines() -> Vec<crate::blockio::IoEngine> {
        let mut v = vec![crate::blockio::IoEngine::Sync];
        if uring::probe() {
            v.push(crate::blockio::IoEngine::Uring);
        }
        v
    }

    #[test]
    fn a_file_read_with_o_direct_reads_its_unaligned_tail_on_both_engines() {
        let size = (3 << 20) + 1234;
        let whole = size / 4096 * 4096;
        for engine in file_engines() {
            let (_f, origin, data) = file_origin(size, engine);
            let Some(d) = crate::blockio::open_direct_file_reader(&*origin).unwrap() else {
                println!("SKIP: no O_DIRECT on this file system");
                return;
            };
            let name = d.engine_name();
            assert_eq!(name, origin.engine_name());
            assert_eq!(d.size(), size as u64);
            assert!(d.plain_file().is_none(), "{name}");
            // the drainer's way: aligned buffers, runs of whole chunks, a short last one
            let mut a = AlignedBuf::new();
            a.resize(size);
            {
                let mut reqs: Vec<(&mut [u8], u64)> = a
                    .chunks_mut(1 << 20)
                    .enumerate()
                    .map(|(i, c)| (c, (i as u64) << 20))
                    .collect();
                d.read_many(&mut reqs).unwrap();
            }
            assert!(a[..] == data[..], "{name}: whole file");
            // aligned start, crossing the last whole block into the tail
            let mut b = AlignedBuf::new();
            b.resize(4096 + 1234);
            d.read_at(&mut b, (whole - 4096) as u64).unwrap();
            assert_eq!(&b[..], &data[whole - 4096..], "{name}: across the tail");
            // inside the tail only, and unaligned across it
            let mut t = vec![0u8; 100];
            d.read_at(&mut t, whole as u64 + 10).unwrap();
            assert_eq!(
                &t[..],
                &data[whole + 10..whole + 110],
                "{name}: in the tail"
            );
            let mut u = vec![0u8; 9000];
            d.read_at(&mut u, (size - 9000) as u64).unwrap();
            assert_eq!(&u[..], &data[size - 9000..], "{name}: unaligned to the end");
            // past the end: refused, as on every engine
            assert!(d.read_at(&mut t, size as u64 - 50).is_err(), "{name}");
            // a reader only
            assert!(d.write_at(&b, 0).is_err(), "{name}");
        }
    }

    #[test]
    fn a_file_read_with_o_direct_sees_writes_still_dirty_in_the_page_cache() {
        let size = (2 << 20) + 100;
        for engine in file_engines() {
            let (_f, origin, _) = file_origin(size, engine);
            let Some(d) = crate::blockio::open_direct_file_reader(&*origin).unwrap() else {
                println!("SKIP: no O_DIRECT on this file system");
                return;
            };
            let name = d.engine_name();
            // read once through O_DIRECT (nothing of it cached by this reader)
            let mut a = AlignedBuf::new();
            a.resize(1 << 20);
            d.read_at(&mut a, 1 << 20).unwrap();
            // buffered writes, never flushed: dirty pages of the file
            origin.write_at(&[0xA5; 8192], (1 << 20) + 4096).unwrap();
            origin.write_at(&[0x5A; 77], size as u64 - 80).unwrap();
            d.read_at(&mut a, 1 << 20).unwrap();
            assert!(
                a[4096..4096 + 8192].iter().all(|&b| b == 0xA5),
                "{name}: dirty pages"
            );
            assert!(
                a[..4096].iter().all(|&b| b != 0xA5),
                "{name}: neighbours kept"
            );
            let mut t = AlignedBuf::new();
            t.resize(size - (2 << 20));
            d.read_at(&mut t, 2 << 20).unwrap();
            assert!(
                t[t.len() - 80..t.len() - 3].iter().all(|&b| b == 0x5A),
                "{name}: tail"
            );
        }
    }
}
