//! One ublk request → one [`Export`] call. Validated here, once, at the edge: the
//! operation, the range against the disk's size and the length against the tag's
//! buffer. A bad request gets a negative errno as its result (the block layer fails
//! that one I/O); nothing panics and nothing reaches the engine.
//!
//! Mapping (the same engine calls as the daemon's FUSE server, `crate::fuse`):
//! - `READ` → [`Export::read`] into the tag's buffer; result = bytes.
//! - `WRITE` → [`Export::write`], `fua` from `UBLK_IO_F_FUA`: the engine preserves
//!   what a running backup still needs, applies the write, and with FUA makes it
//!   durable before the result is committed. Result = bytes.
//! - `FLUSH` → [`Export::flush`] (the origin's stable storage before the result).
//! - `DISCARD` → [`Export::trim`], `WRITE_ZEROES` → [`Export::zero`] (`no_hole` from
//!   `UBLK_IO_F_NOUNMAP`), both with FUA passed on; result 0.
//! - anything else → `-EOPNOTSUPP`.

use super::abi::{ioflag, op, IoDesc};
use cowsnap_core::error::Error;
use cowsnap_core::export::{Export, ZeroFlags};

/// A validated request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at `off`.
    Read { off: u64, len: usize },
    /// Write `len` bytes at `off`.
    Write { off: u64, len: usize, fua: bool },
    /// Flush.
    Flush,
    /// Discard.
    Trim { off: u64, len: u64, fua: bool },
    /// Write zeroes.
    Zero {
        off: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    },
}

/// The disk as the queues see it.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Disk size in bytes.
    pub size: u64,
    /// Each tag's buffer (largest READ/WRITE).
    pub max_io: usize,
    /// Whether writes are refused.
    pub read_only: bool,
}

/// Decode and validate `d`; a negative errno when it cannot be served.
pub fn decode(d: &IoDesc, lim: &Limits) -> Result<Request, i32> {
    let op = d.op();
    if op == op::FLUSH {
        return Ok(Request::Flush);
    }
    let off = d.start_sector.checked_mul(512).ok_or(-libc::EINVAL)?;
    let len = u64::from(d.nr_sectors) * 512;
    let end = off.checked_add(len).ok_or(-libc::EINVAL)?;
    if end > lim.size {
        return Err(-libc::EINVAL);
    }
    let fua = d.flags() & ioflag::FUA != 0;
    let writes = matches!(op, op::WRITE | op::DISCARD | op::WRITE_ZEROES);
    if writes && lim.read_only {
        return Err(-libc::EROFS);
    }
    match op {
        op::READ | op::WRITE => {
            if len as usize > lim.max_io {
                return Err(-libc::EINVAL);
            }
            let len = len as usize;
            Ok(if op == op::READ {
                Request::Read { off, len }
            } else {
                Request::Write { off, len, fua }
            })
        }
        op::DISCARD => Ok(Request::Trim { off, len, fua }),
        op::WRITE_ZEROES => Ok(Request::Zero {
            off,
            len,
            no_hole: d.flags() & ioflag::NOUNMAP != 0,
            fua,
        }),
        _ => Err(-libc::EOPNOTSUPP),
    }
}

fn errno(e: &Error, what: &str) -> i32 {
    log::warn!("ublk: {what}: {e}");
    -e.errno()
}

/// Serve `req` with `buf` (the tag's buffer, at least `max_io` bytes): the result to
/// commit (bytes for READ/WRITE, 0 for the rest, or a negative errno).
pub fn serve(export: &dyn Export, req: Request, buf: &mut [u8]) -> i32 {
    let caps = export.caps();
    match req {
        Request::Read { off, len } => match buf.get_mut(..len) {
            Some(b) => match export.read(off, b) {
                Ok(()) => len as i32,
                Err(e) => errno(&e, "read"),
            },
            None => -libc::EINVAL,
        },
        Request::Write { off, len, fua } => match buf.get(..len) {
            Some(b) => match export.write(off, b, fua) {
                Ok(()) => len as i32,
                Err(e) => errno(&e, "write"),
            },
            None => -libc::EINVAL,
        },
        Request::Flush => {
            if caps.read_only {
                return 0;
            }
            match export.flush() {
                Ok(()) => 0,
                Err(e) => errno(&e, "flush"),
            }
        }
        Request::Trim { off, len, fua } => {
            if !caps.trim {
                return -libc::EOPNOTSUPP;
            }
            if len == 0 {
                return 0;
            }
            match export.trim(off, len, fua) {
                Ok(()) => 0,
                Err(e) => errno(&e, "discard"),
            }
        }
        Request::Zero {
            off,
            len,
            no_hole,
            fua,
        } => {
            if !caps.zeroes {
                return -libc::EOPNOTSUPP;
            }
            if len == 0 {
                return 0;
            }
            let flags = ZeroFlags {
                no_hole,
                fast: false,
                fua,
            };
            match export.zero(off, len, flags) {
                Ok(()) => 0,
                Err(e) => errno(&e, "write-zeroes"),
            }
        }
    }
}

/// [`decode`] then [`serve`].
pub fn handle(export: &dyn Export, lim: &Limits, d: &IoDesc, buf: &mut [u8]) -> i32 {
    match decode(d, lim) {
        Ok(r) => serve(export, r, buf),
        Err(e) => {
            log::warn!(
                "ublk: refused request op {} sectors {}+{}: errno {}",
                d.op(),
                d.start_sector,
                d.nr_sectors,
                -e
            );
            e
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cowsnap_core::error::Result;
    use cowsnap_core::export::{ExportCaps, Extent};
    use std::sync::Mutex;

    /// Records every call; data in memory.
    struct Rec {
        data: Mutex<Vec<u8>>,
        calls: Mutex<Vec<String>>,
        caps: ExportCaps,
    }

    impl Rec {
        fn new(size: usize) -> Rec {
            Rec {
                data: Mutex::new((0..size).map(|i| (i % 251) as u8).collect()),
                calls: Mutex::new(Vec::new()),
                caps: ExportCaps {
                    read_only: false,
                    trim: true,
                    zeroes: true,
                    fast_zero: false,
                    multi_conn: true,
                },
            }
        }
        fn calls(&self) -> Vec<String> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }
        fn log(&self, s: String) {
            self.calls.lock().unwrap().push(s);
        }
    }

    impl Export for Rec {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn caps(&self) -> ExportCaps {
            self.caps
        }
        fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
            self.log(format!("read {off} {}", buf.len()));
            let d = self.data.lock().unwrap();
            buf.copy_from_slice(&d[off as usize..off as usize + buf.len()]);
            Ok(())
        }
        fn write(&self, off: u64, data: &[u8], fua: bool) -> Result<()> {
            self.log(format!("write {off} {} fua={fua}", data.len()));
            self.data.lock().unwrap()[off as usize..off as usize + data.len()]
                .copy_from_slice(data);
            Ok(())
        }
        fn flush(&self) -> Result<()> {
            self.log("flush".into());
            Ok(())
        }
        fn trim(&self, off: u64, len: u64, fua: bool) -> Result<()> {
            self.log(format!("trim {off} {len} fua={fua}"));
            Ok(())
        }
        fn zero(&self, off: u64, len: u64, f: ZeroFlags) -> Result<()> {
            self.log(format!(
                "zero {off} {len} no_hole={} fua={}",
                f.no_hole, f.fua
            ));
            self.data.lock().unwrap()[off as usize..(off + len) as usize].fill(0);
            Ok(())
        }
        fn block_status(&self, _: u64, len: u64) -> Result<Vec<Extent>> {
            Ok(vec![Extent {
                len,
                hole: false,
                zero: false,
            }])
        }
    }

    fn desc(op: u8, flags: u32, sector: u64, sectors: u32) -> IoDesc {
        IoDesc {
            op_flags: op as u32 | flags,
            nr_sectors: sectors,
            start_sector: sector,
            addr: 0,
        }
    }

    const SIZE: usize = 64 * 1024;

    fn lim(read_only: bool) -> Limits {
        Limits {
            size: SIZE as u64,
            max_io: 16 * 1024,
            read_only,
        }
    }

    #[test]
    fn read_and_write_reach_the_export_with_fua() {
        let e = Rec::new(SIZE);
        let mut buf = vec![0u8; 16 * 1024];
        assert_eq!(
            handle(&e, &lim(false), &desc(op::READ, 0, 2, 2), &mut buf),
            1024
        );
        assert_eq!(e.calls(), ["read 1024 1024"]);
        assert_eq!(buf[0], (1024 % 251) as u8);

        buf[..512].fill(0xab);
        assert_eq!(
            handle(&e, &lim(false), &desc(op::WRITE, 0, 1, 1), &mut buf),
            512
        );
        assert_eq!(
            handle(
                &e,
                &lim(false),
                &desc(op::WRITE, ioflag::FUA, 3, 1),
                &mut buf
            ),
            512
        );
        assert_eq!(
            e.calls(),
            ["write 512 512 fua=false", "write 1536 512 fua=true"]
        );
        assert_eq!(e.data.lock().unwrap()[512..1024], [0xab; 512]);
    }

    #[test]
    fn flush_discard_and_write_zeroes() {
        let e = Rec::new(SIZE);
        let mut buf = vec![0u8; 16 * 1024];
        let l = lim(false);
        assert_eq!(handle(&e, &l, &desc(op::FLUSH, 0, 0, 0), &mut buf), 0);
        assert_eq!(handle(&e, &l, &desc(op::DISCARD, 0, 8, 16), &mut buf), 0);
        // a discard or write-zeroes is not limited by the tag's buffer
        assert_eq!(
            handle(&e, &l, &desc(op::WRITE_ZEROES, 0, 0, 128), &mut buf),
            0
        );
        assert_eq!(
            handle(
                &e,
                &l,
                &desc(op::WRITE_ZEROES, ioflag::NOUNMAP | ioflag::FUA, 4, 4),
                &mut buf
            ),
            0
        );
        assert_eq!(
            e.calls(),
            [
                "flush",
                "trim 4096 8192 fua=false",
                "zero 0 65536 no_hole=false fua=false",
                "zero 2048 2048 no_hole=true fua=true",
            ]
        );
    }

    #[test]
    fn bad_requests_get_an_error_result_and_reach_nothing() {
        let e = Rec::new(SIZE);
        let mut buf = vec![0u8; 16 * 1024];
        let l = lim(false);
        let last = (SIZE / 512) as u64;
        // past the end, straddling the end, overflowing sector numbers
        assert_eq!(
            handle(&e, &l, &desc(op::READ, 0, last, 1), &mut buf),
            -libc::EINVAL
        );
        assert_eq!(
            handle(&e, &l, &desc(op::WRITE, 0, last - 1, 2), &mut buf),
            -libc::EINVAL
        );
        assert_eq!(
            handle(&e, &l, &desc(op::DISCARD, 0, u64::MAX / 256, 1), &mut buf),
            -libc::EINVAL
        );
        assert_eq!(
            handle(&e, &l, &desc(op::WRITE_ZEROES, 0, u64::MAX, 8), &mut buf),
            -libc::EINVAL
        );
        // larger than the tag's buffer
        assert_eq!(
            handle(&e, &l, &desc(op::READ, 0, 0, 33), &mut buf),
            -libc::EINVAL
        );
        // a buffer shorter than promised
        let mut short = vec![0u8; 512];
        assert_eq!(
            handle(&e, &l, &desc(op::READ, 0, 0, 2), &mut short),
            -libc::EINVAL
        );
        // unknown or unadvertised operations
        assert_eq!(
            handle(&e, &l, &desc(op::WRITE_SAME, 0, 0, 1), &mut buf),
            -libc::EOPNOTSUPP
        );
        assert_eq!(
            handle(&e, &l, &desc(13, 0, 0, 1), &mut buf),
            -libc::EOPNOTSUPP
        );
        assert!(e.calls().is_empty());
        // the last sector itself is fine
        assert_eq!(
            handle(&e, &l, &desc(op::READ, 0, last - 1, 1), &mut buf),
            512
        );
    }

    #[test]
    fn read_only_refuses_changes_but_reads_and_flushes() {
        let mut e = Rec::new(SIZE);
        e.caps.read_only = true;
        let mut buf = vec![0u8; 16 * 1024];
        let l = lim(true);
        for op in [op::WRITE, op::DISCARD, op::WRITE_ZEROES] {
            assert_eq!(handle(&e, &l, &desc(op, 0, 0, 1), &mut buf), -libc::EROFS);
        }
        assert_eq!(handle(&e, &l, &desc(op::FLUSH, 0, 0, 0), &mut buf), 0);
        assert_eq!(handle(&e, &l, &desc(op::READ, 0, 0, 1), &mut buf), 512);
        assert_eq!(e.calls(), ["read 0 512"]);
    }

    #[test]
    fn unsupported_discard_and_zeroes_are_eopnotsupp() {
        let mut e = Rec::new(SIZE);
        e.caps.trim = false;
        e.caps.zeroes = false;
        let mut buf = vec![0u8; 512];
        let l = lim(false);
        assert_eq!(
            handle(&e, &l, &desc(op::DISCARD, 0, 0, 1), &mut buf),
            -libc::EOPNOTSUPP
        );
        assert_eq!(
            handle(&e, &l, &desc(op::WRITE_ZEROES, 0, 0, 1), &mut buf),
            -libc::EOPNOTSUPP
        );
        assert!(e.calls().is_empty());
    }

    #[test]
    fn engine_errors_become_errno_results() {
        struct Failing(Rec);
        impl Export for Failing {
            fn size(&self) -> u64 {
                self.0.size()
            }
            fn caps(&self) -> ExportCaps {
                self.0.caps()
            }
            fn read(&self, _: u64, _: &mut [u8]) -> Result<()> {
                Err(Error::io(
                    "read",
                    std::io::Error::from_raw_os_error(libc::EIO),
                ))
            }
            fn write(&self, _: u64, _: &[u8], _: bool) -> Result<()> {
                Err(Error::io(
                    "write",
                    std::io::Error::from_raw_os_error(libc::ENOSPC),
                ))
            }
            fn flush(&self) -> Result<()> {
                Err(Error::io(
                    "flush",
                    std::io::Error::from_raw_os_error(libc::EIO),
                ))
            }
            fn trim(&self, o: u64, l: u64, f: bool) -> Result<()> {
                self.0.trim(o, l, f)
            }
            fn zero(&self, o: u64, l: u64, f: ZeroFlags) -> Result<()> {
                self.0.zero(o, l, f)
            }
            fn block_status(&self, o: u64, l: u64) -> Result<Vec<Extent>> {
                self.0.block_status(o, l)
            }
        }
        let e = Failing(Rec::new(SIZE));
        let mut buf = vec![0u8; 16 * 1024];
        let l = lim(false);
        assert_eq!(
            handle(&e, &l, &desc(op::READ, 0, 0, 1), &mut buf),
            -libc::EIO
        );
        assert_eq!(
            handle(&e, &l, &desc(op::WRITE, 0, 0, 1), &mut buf),
            -libc::ENOSPC
        );
        assert_eq!(
            handle(&e, &l, &desc(op::FLUSH, 0, 0, 0), &mut buf),
            -libc::EIO
        );
    }

    #[test]
    fn a_fua_write_through_the_engine_reaches_the_origin() {
        // The real engine: a FUA write arriving as a ublk request takes the engine's
        // write path (the one NBD and FUSE writes take) down to the origin file.
        let dir = tempfile::tempdir().unwrap();
        let engine = crate::test_support::file_engine(&dir.path().join("o"), SIZE as u64, 7, None);
        let mut buf = vec![0x55u8; 16 * 1024];
        let l = Limits {
            size: SIZE as u64,
            max_io: buf.len(),
            read_only: false,
        };
        let exp: &dyn Export = engine.as_ref();
        assert_eq!(
            handle(exp, &l, &desc(op::WRITE, ioflag::FUA, 8, 8), &mut buf),
            4096
        );
        assert_eq!(handle(exp, &l, &desc(op::FLUSH, 0, 0, 0), &mut buf), 0);
        let mut back = vec![0u8; 4096];
        assert_eq!(handle(exp, &l, &desc(op::READ, 0, 8, 8), &mut back), 4096);
        assert_eq!(back, vec![0x55u8; 4096]);
        let on_disk = std::fs::read(dir.path().join("o")).unwrap();
        assert_eq!(on_disk[4096..8192], [0x55u8; 4096]);
        assert_eq!(on_disk[0..4096], [7u8; 4096]);
    }
}
