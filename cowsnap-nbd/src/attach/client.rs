//! The client side of the NBD handshake, for handing connected sockets to the kernel.
//!
//! The kernel's NBD driver does no negotiation: it wants sockets already in the
//! transmission phase. This does the fixed-newstyle handshake with `NBD_OPT_GO` (no
//! structured replies: the kernel speaks simple replies only) and returns the export
//! size and transmission flags to pass to `NBD_CMD_CONNECT`.

use std::io::{self, Read, Write};

// The protocol's numbers are the server's: one copy, in `nbd::proto`.
use crate::nbd::proto::{
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_BLOCK_SIZE, INFO_EXPORT, NBDMAGIC, OPT_GO,
    OPT_REPLY_MAGIC as REPLY_MAGIC, REP_ACK, REP_INFO,
};

/// What the server told about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Minimum block size, if announced.
    pub min_block: Option<u32>,
    /// Preferred block size, if announced.
    pub pref_block: Option<u32>,
}

fn rd<const N: usize>(s: &mut impl Read) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)?;
    Ok(b)
}

fn proto(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// The bytes of an `NBD_OPT_GO` for `export`, asking for block sizes.
pub fn go_request(export: &str) -> Vec<u8> {
    let mut data = Vec::new();
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    let mut m = Vec::new();
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(&data);
    m
}

/// Negotiate `export` with `NBD_OPT_GO`; on success the stream is in transmission.
pub fn handshake<S: Read + Write>(s: &mut S, export: &str) -> io::Result<ExportInfo> {
    if export.len() > 4096 {
        return Err(proto("export name too long".into()));
    }
    let magic = u64::from_be_bytes(rd::<8>(s)?);
    if magic != NBDMAGIC {
        return Err(proto(format!("not an NBD server (magic {magic:#x})")));
    }
    let opt = u64::from_be_bytes(rd::<8>(s)?);
    if opt != IHAVEOPT {
        return Err(proto(
            "server speaks the old-style handshake, not newstyle".into(),
        ));
    }
    let hflags = u16::from_be_bytes(rd::<2>(s)?);
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(proto("server does not support fixed newstyle".into()));
    }
    let cflags = u32::from(hflags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    s.write_all(&cflags.to_be_bytes())?;
    s.write_all(&go_request(export))?;
    s.flush()?;

    let mut info: Option<(u64, u16)> = None;
    let (mut min_block, mut pref_block) = (None, None);
    loop {
        let m = u64::from_be_bytes(rd::<8>(s)?);
        if m != REPLY_MAGIC {
            return Err(proto(format!("bad option reply magic {m:#x}")));
        }
        let o = u32::from_be_bytes(rd::<4>(s)?);
        let typ = u32::from_be_bytes(rd::<4>(s)?);
        let len = u32::from_be_bytes(rd::<4>(s)?);
        if o != OPT_GO {
            return Err(proto(format!("reply to option {o}, expected {OPT_GO}")));
        }
        if len > 64 * 1024 {
            return Err(proto(format!("option reply of {len} bytes is too long")));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        if typ & (1 << 31) != 0 {
            let msg = String::from_utf8_lossy(&data).into_owned();
            return Err(io::Error::other(format!(
                "the server refused export {export:?} (error {:#x}){}",
                typ,
                if msg.is_empty() {
                    String::new()
                } else {
                    format!(": {msg}")
                }
            )));
        }
        match typ {
            REP_ACK => break,
            REP_INFO if data.len() >= 2 => {
                let it = u16::from_be_bytes([data[0], data[1]]);
                if it == INFO_EXPORT && data.len() == 12 {
                    let mut sz = [0u8; 8];
                    sz.copy_from_slice(&data[2..10]);
                    info = Some((
                        u64::from_be_bytes(sz),
                        u16::from_be_bytes([data[10], data[11]]),
                    ));
                } else if it == INFO_BLOCK_SIZE && data.len() == 14 {
                    let g = |i: usize| {
                        u32::from_be_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]])
                    };
                    min_block = Some(g(2));
                    pref_block = Some(g(6));
                }
            }
            _ => {}
        }
    }
    let (size, flags) = info.ok_or_else(|| proto("server sent no NBD_INFO_EXPORT".into()))?;
    Ok(ExportInfo {
        size,
        flags,
        min_block,
        pref_block,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn reply(out: &mut Vec<u8>, typ: u32, data: &[u8]) {
        out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&OPT_GO.to_be_bytes());
        out.extend_from_slice(&typ.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
    }

    /// A scripted server: checks the client's bytes, sends canned replies.
    fn serve(
        replies: Vec<u8>,
        export: &'static str,
    ) -> (UnixStream, std::thread::JoinHandle<Vec<u8>>) {
        let (c, mut s) = UnixStream::pair().unwrap();
        let h = std::thread::spawn(move || {
            let mut hello = Vec::new();
            hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
            hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
            hello.extend_from_slice(&3u16.to_be_bytes());
            s.write_all(&hello).unwrap();
            let mut got = vec![0u8; 4 + 16 + 4 + export.len() + 4];
            s.read_exact(&mut got).unwrap();
            s.write_all(&replies).unwrap();
            got
        });
        (c, h)
    }

    #[test]
    fn go_bytes_are_exact() {
        let b = go_request("ab");
        let want: Vec<u8> = vec![
            0x49, 0x48, 0x41, 0x56, 0x45, 0x4F, 0x50, 0x54, // IHAVEOPT
            0, 0, 0, 7, // NBD_OPT_GO
            0, 0, 0, 10, // length: 4 + 2 + 2 + 2
            0, 0, 0, 2, b'a', b'b', // name
            0, 1, 0, 3, // one info request: NBD_INFO_BLOCK_SIZE
        ];
        assert_eq!(b, want);
    }

    #[test]
    fn negotiates_size_and_flags() {
        let mut r = Vec::new();
        let mut exp = vec![0, 0];
        exp.extend_from_slice(&(1u64 << 30).to_be_bytes());
        exp.extend_from_slice(&0x004du16.to_be_bytes());
        reply(&mut r, REP_INFO, &exp);
        let mut bs = vec![0, 3];
        for v in [512u32, 4096, 32 << 20] {
            bs.extend_from_slice(&v.to_be_bytes());
        }
        reply(&mut r, REP_INFO, &bs);
        reply(&mut r, REP_ACK, &[]);
        let (mut c, h) = serve(r, "disk");
        let info = handshake(&mut c, "disk").unwrap();
        assert_eq!(info.size, 1 << 30);
        assert_eq!(info.flags, 0x4d);
        assert_eq!(info.min_block, Some(512));
        assert_eq!(info.pref_block, Some(4096));
        let got = h.join().unwrap();
        assert_eq!(&got[..4], &[0, 0, 0, 3]); // client flags echo FIXED_NEWSTYLE|NO_ZEROES
        assert_eq!(&got[4..], &go_request("disk")[..]);
    }

    #[test]
    fn refusals_and_garbage_are_errors() {
        let mut r = Vec::new();
        reply(&mut r, (1 << 31) | 6, b"no such export");
        let (mut c, _h) = serve(r, "x");
        let e = handshake(&mut c, "x").unwrap_err();
        assert!(e.to_string().contains("no such export"), "{e}");

        // ACK without INFO_EXPORT
        let mut r = Vec::new();
        reply(&mut r, REP_ACK, &[]);
        let (mut c, _h) = serve(r, "x");
        assert!(handshake(&mut c, "x").is_err());

        // not an NBD server
        let (mut c, mut s) = UnixStream::pair().unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
        assert!(handshake(&mut c, "x")
            .unwrap_err()
            .to_string()
            .contains("not an NBD server"));

        // truncated
        let (mut c, mut s) = UnixStream::pair().unwrap();
        s.write_all(&NBDMAGIC.to_be_bytes()).unwrap();
        drop(s);
        assert!(handshake(&mut c, "x").is_err());
    }

    /// What the kernel does: GO, then simple-reply transmission, against our server.
    #[test]
    fn handshake_and_simple_read_with_our_server() {
        use crate::nbd::server::Server;
        use crate::test_support::file_engine;
        use cowsnap_core::export::Export;
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let engine = file_engine(&dir.path().join("d.img"), 8 << 20, 0, None);
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        engine.write(65536, &pattern, false).unwrap();
        let server = Server::new();
        let export: Arc<dyn Export> = engine;
        server.set_export("disk", export, "test");
        let sock = dir.path().join("s.nbd");
        server.spawn_unix(std::os::unix::net::UnixListener::bind(&sock).unwrap());

        let mut c = UnixStream::connect(&sock).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let info = handshake(&mut c, "disk").unwrap();
        assert_eq!(info.size, 8 << 20);
        assert_ne!(info.flags & 1, 0, "NBD_FLAG_HAS_FLAGS");
        assert_eq!(info.flags & crate::nbd::proto::TF_READ_ONLY, 0);
        // NBD_CMD_READ of 4096 bytes at 65536, simple reply expected
        let mut req = Vec::new();
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&0xfeed_u64.to_be_bytes());
        req.extend_from_slice(&65536u64.to_be_bytes());
        req.extend_from_slice(&4096u32.to_be_bytes());
        c.write_all(&req).unwrap();
        let mut hdr = [0u8; 16];
        c.read_exact(&mut hdr).unwrap();
        assert_eq!(
            &hdr[0..4],
            &0x6744_6698u32.to_be_bytes(),
            "simple reply magic"
        );
        assert_eq!(&hdr[4..8], &[0, 0, 0, 0], "no error");
        assert_eq!(&hdr[8..16], &0xfeed_u64.to_be_bytes());
        let mut data = vec![0u8; 4096];
        c.read_exact(&mut data).unwrap();
        assert_eq!(data, pattern);

        let mut c2 = UnixStream::connect(&sock).unwrap();
        c2.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        assert!(handshake(&mut c2, "nope").is_err());
        server.shutdown();
    }

    /// What the kernel relies on with several connections (CAN_MULTI_CONN): a write
    /// acknowledged on one connection has reached the export, on the same origin, by
    /// the time a FLUSH sent on another connection is executed.
    #[test]
    fn flush_on_one_connection_covers_writes_acknowledged_on_another() {
        use crate::nbd::server::Server;
        use cowsnap_core::error::Result as CResult;
        use cowsnap_core::export::{Export, ExportCaps, Extent, ZeroFlags};
        use std::sync::{Arc, Mutex};

        /// An export over a Vec that records, at each flush, the bytes it holds.
        struct Mem {
            data: Mutex<Vec<u8>>,
            at_flush: Mutex<Vec<Vec<u8>>>,
        }
        impl Export for Mem {
            fn size(&self) -> u64 {
                self.data.lock().unwrap().len() as u64
            }
            fn caps(&self) -> ExportCaps {
                ExportCaps {
                    read_only: false,
                    trim: false,
                    zeroes: false,
                    fast_zero: false,
                    multi_conn: true,
                }
            }
            fn read(&self, off: u64, buf: &mut [u8]) -> CResult<()> {
                let d = self.data.lock().unwrap();
                buf.copy_from_slice(&d[off as usize..off as usize + buf.len()]);
                Ok(())
            }
            fn write(&self, off: u64, data: &[u8], _fua: bool) -> CResult<()> {
                self.data.lock().unwrap()[off as usize..off as usize + data.len()]
                    .copy_from_slice(data);
                Ok(())
            }
            fn flush(&self) -> CResult<()> {
                let snap = self.data.lock().unwrap().clone();
                self.at_flush.lock().unwrap().push(snap);
                Ok(())
            }
            fn trim(&self, _: u64, _: u64, _: bool) -> CResult<()> {
                Ok(())
            }
            fn zero(&self, _: u64, _: u64, _: ZeroFlags) -> CResult<()> {
                Ok(())
            }
            fn block_status(&self, off: u64, len: u64) -> CResult<Vec<Extent>> {
                let _ = off;
                Ok(vec![Extent {
                    len,
                    hole: false,
                    zero: false,
                }])
            }
        }

        fn request(c: &mut UnixStream, cmd: u16, handle: u64, off: u64, data: &[u8], len: u32) {
            let mut req = Vec::new();
            req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
            req.extend_from_slice(&0u16.to_be_bytes());
            req.extend_from_slice(&cmd.to_be_bytes());
            req.extend_from_slice(&handle.to_be_bytes());
            req.extend_from_slice(&off.to_be_bytes());
            req.extend_from_slice(&len.to_be_bytes());
            req.extend_from_slice(data);
            c.write_all(&req).unwrap();
            let mut hdr = [0u8; 16];
            c.read_exact(&mut hdr).unwrap();
            assert_eq!(&hdr[4..8], &[0, 0, 0, 0], "error reply to command {cmd}");
            assert_eq!(&hdr[8..16], &handle.to_be_bytes());
        }

        let dir = tempfile::tempdir().unwrap();
        let mem = Arc::new(Mem {
            data: Mutex::new(vec![0u8; 1 << 20]),
            at_flush: Mutex::new(Vec::new()),
        });
        let server = Server::new();
        let export: Arc<dyn Export> = mem.clone();
        server.set_export("disk", export, "test");
        let sock = dir.path().join("s.nbd");
        server.spawn_unix(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        let mut conns: Vec<UnixStream> = (0..4)
            .map(|_| {
                let mut c = UnixStream::connect(&sock).unwrap();
                c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                    .unwrap();
                let info = handshake(&mut c, "disk").unwrap();
                assert_ne!(info.flags & (1 << 8), 0, "CAN_MULTI_CONN advertised");
                c
            })
            .collect();
        // writes acknowledged on connections 0..3, then a flush on connection 3
        for (i, c) in conns.iter_mut().enumerate().take(3) {
            let pat = vec![0x10 + i as u8; 4096];
            request(c, 1, 100 + i as u64, (i as u64) * 65536, &pat, 4096);
        }
        request(&mut conns[3], 3, 200, 0, &[], 0);
        let flushed = mem.at_flush.lock().unwrap();
        assert_eq!(flushed.len(), 1);
        for i in 0..3usize {
            let o = i * 65536;
            assert!(
                flushed[0][o..o + 4096].iter().all(|&b| b == 0x10 + i as u8),
                "the write acknowledged on connection {i} had not reached the export when \
                 connection 3's flush ran"
            );
        }
        drop(flushed);
        server.shutdown();
    }
}
