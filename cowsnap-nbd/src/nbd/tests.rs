//! In-process tests of the whole server: a memory export, raw protocol bytes over a
//! socketpair, and the edge cases a well-behaved client library never sends.

use super::proto::*;
use super::server::Server;
use super::stream::Stream;
use cowsnap_core::export::{Export, ExportCaps, Extent, ZeroFlags};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, RwLock};
use std::time::Duration;

struct Mem {
    data: RwLock<Vec<u8>>,
    read_only: bool,
    /// Reads at offset 0 sleep this long (to keep workers busy).
    slow_zero: Duration,
    /// Reads at offset 0 wait until this gate is opened (to force out-of-order
    /// completion without depending on timing).
    gate: Option<Arc<Gate>>,
    /// Reads at this offset fail with an error that names a host path.
    fail_at: Option<u64>,
    /// Set when a call reached the export outside its size (the server must have
    /// refused it at the protocol edge).
    out_of_range: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Gate {
    open: std::sync::Mutex<bool>,
    cv: std::sync::Condvar,
}

impl Gate {
    fn wait(&self) {
        let mut o = self.open.lock().unwrap();
        while !*o {
            o = self.cv.wait(o).unwrap();
        }
    }
    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

impl Mem {
    fn new(size: usize, read_only: bool) -> Arc<Self> {
        Arc::new(Mem {
            data: RwLock::new(vec![0; size]),
            read_only,
            slow_zero: Duration::ZERO,
            gate: None,
            fail_at: None,
            out_of_range: Default::default(),
        })
    }

    /// Record and refuse a call outside the export.
    fn check_range(&self, off: u64, len: u64) -> cowsnap_core::Result<()> {
        let size = self.data.read().unwrap().len() as u64;
        if off.checked_add(len).is_none_or(|end| end > size) {
            self.out_of_range
                .store(true, std::sync::atomic::Ordering::SeqCst);
            return Err(cowsnap_core::err!(OutOfRange, "{off}+{len} past {size}"));
        }
        Ok(())
    }
}

impl Export for Mem {
    fn size(&self) -> u64 {
        self.data.read().unwrap().len() as u64
    }
    fn caps(&self) -> ExportCaps {
        ExportCaps {
            read_only: self.read_only,
            trim: true,
            zeroes: true,
            fast_zero: true,
            multi_conn: true,
        }
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> cowsnap_core::Result<()> {
        self.check_range(off, buf.len() as u64)?;
        if off == 0 {
            std::thread::sleep(self.slow_zero);
            if let Some(g) = &self.gate {
                g.wait();
            }
        }
        if self.fail_at == Some(off) {
            return Err(cowsnap_core::Error::io(
                "unable to read container \"/secret/host/c.cow\"",
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        let d = self.data.read().unwrap();
        buf.copy_from_slice(&d[off as usize..off as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, off: u64, data: &[u8], _fua: bool) -> cowsnap_core::Result<()> {
        assert!(!self.read_only, "write reached a read-only export");
        self.check_range(off, data.len() as u64)?;
        let mut d = self.data.write().unwrap();
        d[off as usize..off as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> cowsnap_core::Result<()> {
        Ok(())
    }
    fn trim(&self, off: u64, len: u64, _fua: bool) -> cowsnap_core::Result<()> {
        self.zero(off, len, ZeroFlags::default())
    }
    fn zero(&self, off: u64, len: u64, _f: ZeroFlags) -> cowsnap_core::Result<()> {
        assert!(!self.read_only, "zero reached a read-only export");
        self.check_range(off, len)?;
        let mut d = self.data.write().unwrap();
        d[off as usize..(off + len) as usize].fill(0);
        Ok(())
    }
    fn block_status(&self, off: u64, len: u64) -> cowsnap_core::Result<Vec<Extent>> {
        // Report each 4 KiB block as data or zero.
        let d = self.data.read().unwrap();
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = off;
        while pos < off + len {
            let end = ((pos / 4096 + 1) * 4096).min(off + len);
            let zero = d[pos as usize..end as usize].iter().all(|&b| b == 0);
            match out.last_mut() {
                Some(e) if e.zero == zero => e.len += end - pos,
                _ => out.push(Extent {
                    len: end - pos,
                    hole: zero,
                    zero,
                }),
            }
            pos = end;
        }
        Ok(out)
    }
}

fn server_with(export: Arc<dyn Export>) -> Arc<Server> {
    let s = Server::new();
    s.set_threads_per_connection(4);
    s.set_export("disk", export.clone(), "a test disk");
    s.set_export("", export, "");
    s
}

struct Client {
    s: UnixStream,
}

impl Client {
    fn connect(server: &Arc<Server>) -> Client {
        let (a, b) = UnixStream::pair().unwrap();
        server.serve_stream(Stream::Unix(a));
        b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Client { s: b };
        let g = c.rx(18);
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        c
    }
    fn rx(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }
    fn tx(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
    fn opt(&mut self, o: u32, d: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&o.to_be_bytes());
        b.extend_from_slice(&(d.len() as u32).to_be_bytes());
        b.extend_from_slice(d);
        self.tx(&b);
    }
    /// (reply type, data)
    fn orep(&mut self, o: u32) -> (u32, Vec<u8>) {
        let h = self.rx(20);
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            OPT_REPLY_MAGIC
        );
        assert_eq!(u32::from_be_bytes(h[8..12].try_into().unwrap()), o);
        let t = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let n = u32::from_be_bytes(h[16..20].try_into().unwrap());
        (t, self.rx(n as usize))
    }
    /// Negotiate: optional structured replies + base:allocation, then GO "disk".
    /// Returns (size, transmission flags).
    fn go(&mut self, structured: bool) -> (u64, u16) {
        self.tx(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes());
        if structured {
            self.opt(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(self.orep(OPT_STRUCTURED_REPLY).0, REP_ACK);
            let mut d = 4u32.to_be_bytes().to_vec();
            d.extend_from_slice(b"disk");
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&15u32.to_be_bytes());
            d.extend_from_slice(b"base:allocation");
            self.opt(OPT_SET_META_CONTEXT, &d);
            let (t, m) = self.orep(OPT_SET_META_CONTEXT);
            assert_eq!(t, REP_META_CONTEXT);
            assert_eq!(&m[4..], b"base:allocation");
            assert_eq!(self.orep(OPT_SET_META_CONTEXT).0, REP_ACK);
        }
        self.opt(OPT_GO, &go_payload(b"disk", &[INFO_NAME]));
        let mut size = None;
        loop {
            let (t, d) = self.orep(OPT_GO);
            match t {
                REP_INFO if d[..2] == [0, 0] => {
                    size = Some((
                        u64::from_be_bytes(d[2..10].try_into().unwrap()),
                        u16::from_be_bytes(d[10..12].try_into().unwrap()),
                    ))
                }
                REP_INFO => {}
                REP_ACK => break,
                other => panic!("GO answered {other:#x}"),
            }
        }
        size.unwrap()
    }
    fn req(&mut self, cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        let r = Request {
            flags,
            cmd,
            cookie,
            offset,
            len,
        };
        self.tx(&encode_request(&r));
    }
    /// A simple reply: (error, cookie).
    fn simple(&mut self) -> (u32, u64) {
        let h = self.rx(16);
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }
    /// One structured chunk: (flags, type, cookie, payload).
    fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let h = self.rx(20);
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            STRUCTURED_REPLY_MAGIC
        );
        let n = u32::from_be_bytes(h[16..20].try_into().unwrap());
        (
            u16::from_be_bytes(h[4..6].try_into().unwrap()),
            u16::from_be_bytes(h[6..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
            self.rx(n as usize),
        )
    }
}

fn go_payload(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

#[test]
fn simple_replies_write_then_read() {
    let m = Mem::new(1 << 20, false);
    let srv = server_with(m.clone());
    let mut c = Client::connect(&srv);
    let (size, tf) = c.go(false);
    assert_eq!(size, 1 << 20);
    assert_eq!(tf & TF_SEND_DF, 0, "DF without structured replies");
    assert_ne!(tf & TF_SEND_TRIM, 0);
    c.req(CMD_WRITE, CMD_FLAG_FUA, 1, 4096, 4);
    c.tx(b"abcd");
    assert_eq!(c.simple(), (0, 1));
    c.req(CMD_READ, 0, 2, 4095, 6);
    assert_eq!(c.simple(), (0, 2));
    assert_eq!(c.rx(6), b"\0abcd\0");
    assert_eq!(&m.data.read().unwrap()[4096..4100], b"abcd");
    c.req(CMD_DISC, 0, 3, 0, 0);
    assert!(c.closed());
}

#[test]
fn option_errors_keep_the_session_going() {
    let srv = server_with(Mem::new(1 << 20, false));
    let mut c = Client::connect(&srv);
    c.tx(&CLIENT_FIXED_NEWSTYLE.to_be_bytes());
    c.opt(0x7654321, b"junk");
    assert_eq!(c.orep(0x7654321).0, REP_ERR_UNSUP);
    c.opt(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(c.orep(OPT_EXTENDED_HEADERS).0, REP_ERR_UNSUP);
    c.opt(OPT_STARTTLS, &[]);
    assert_eq!(c.orep(OPT_STARTTLS).0, REP_ERR_POLICY);
    // truncated GO payload
    c.opt(OPT_GO, &[0, 0, 0, 9, b'd']);
    assert_eq!(c.orep(OPT_GO).0, REP_ERR_INVALID);
    c.opt(OPT_INFO, &go_payload(b"nope", &[]));
    assert_eq!(c.orep(OPT_INFO).0, REP_ERR_UNKNOWN);
    // meta contexts before structured replies
    c.opt(OPT_LIST_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(c.orep(OPT_LIST_META_CONTEXT).0, REP_ERR_INVALID);
    // too big but still discarded
    c.opt(OPT_INFO, &vec![0u8; MAX_OPTION_LEN as usize + 1]);
    assert_eq!(c.orep(OPT_INFO).0, REP_ERR_TOO_BIG);
    c.opt(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (t, d) = c.orep(OPT_LIST);
        if t == REP_ACK {
            break;
        }
        assert_eq!(t, REP_SERVER);
        let n = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(d[4..4 + n].to_vec()).unwrap());
    }
    assert_eq!(names, vec!["".to_string(), "disk".to_string()]);
    c.opt(OPT_INFO, &go_payload(b"disk", &[INFO_DESCRIPTION]));
    let mut saw_desc = false;
    loop {
        let (t, d) = c.orep(OPT_INFO);
        if t == REP_ACK {
            break;
        }
        if d[..2] == INFO_DESCRIPTION.to_be_bytes() {
            assert_eq!(&d[2..], b"a test disk");
            saw_desc = true;
        }
    }
    assert!(saw_desc);
    c.opt(OPT_ABORT, &[]);
    assert_eq!(c.orep(OPT_ABORT).0, REP_ACK);
    assert!(c.closed());
}

#[test]
fn protocol_violations_close_the_connection() {
    let srv = server_with(Mem::new(1 << 20, false));
    // unknown client flag
    let mut c = Client::connect(&srv);
    c.tx(&(1u32 | 1 << 31).to_be_bytes());
    assert!(c.closed());
    // bad option magic
    let mut c = Client::connect(&srv);
    c.tx(&1u32.to_be_bytes());
    c.tx(b"NOTANOPT\0\0\0\x07\0\0\0\0");
    assert!(c.closed());
    // absurd option length
    let mut c = Client::connect(&srv);
    c.tx(&1u32.to_be_bytes());
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    c.tx(&b);
    assert!(c.closed());
    // unknown name with EXPORT_NAME (no error reply exists)
    let mut c = Client::connect(&srv);
    c.tx(&1u32.to_be_bytes());
    c.opt(OPT_EXPORT_NAME, b"nope");
    assert!(c.closed());
    // bad request magic after GO; the export is untouched
    let m = Mem::new(1 << 20, false);
    let srv = server_with(m.clone());
    let mut c = Client::connect(&srv);
    c.go(false);
    c.tx(&[0xffu8; 64]);
    assert!(c.closed());
    assert!(m.data.read().unwrap().iter().all(|&b| b == 0));
}

#[test]
fn export_name_with_and_without_zeroes() {
    let srv = server_with(Mem::new(1 << 20, false));
    for no_zeroes in [false, true] {
        let mut c = Client::connect(&srv);
        let f = if no_zeroes { 3u32 } else { 1 };
        c.tx(&f.to_be_bytes());
        c.opt(OPT_EXPORT_NAME, b"");
        let b = c.rx(10);
        assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), 1 << 20);
        if !no_zeroes {
            assert!(c.rx(124).iter().all(|&x| x == 0));
        }
        c.req(CMD_READ, 0, 9, 0, 8);
        assert_eq!(c.simple(), (0, 9));
        assert_eq!(c.rx(8), vec![0u8; 8]);
    }
}

#[test]
fn edge_validation_errors_keep_the_stream_in_step() {
    let m = Mem::new(1 << 20, false);
    let srv = server_with(m.clone());
    let mut c = Client::connect(&srv);
    c.go(false);
    // write past the end: ENOSPC, payload consumed
    c.req(CMD_WRITE, 0, 1, (1 << 20) - 2, 4);
    c.tx(b"wxyz");
    assert_eq!(c.simple(), (ENOSPC, 1));
    // oversized write: EINVAL, 32 MiB + 1 payload consumed
    c.req(CMD_WRITE, 0, 2, 0, MAX_PAYLOAD + 1);
    let big = vec![0x55u8; MAX_PAYLOAD as usize + 1];
    let mut w = c.s.try_clone().unwrap();
    let t = std::thread::spawn(move || w.write_all(&big).unwrap());
    assert_eq!(c.simple(), (EINVAL, 2));
    t.join().unwrap();
    // oversized read, read past the end, unknown flag, unknown command
    c.req(CMD_READ, 0, 3, 0, MAX_PAYLOAD + 1);
    assert_eq!(c.simple(), (EINVAL, 3));
    c.req(CMD_READ, 0, 4, 1 << 20, 1);
    assert_eq!(c.simple(), (EINVAL, 4));
    c.req(CMD_READ, 1 << 10, 5, 0, 1);
    assert_eq!(c.simple(), (EINVAL, 5));
    c.req(42, 0, 6, 0, 1);
    assert_eq!(c.simple(), (EINVAL, 6));
    // block status without a negotiated context
    c.req(CMD_BLOCK_STATUS, 0, 7, 0, 4096);
    assert_eq!(c.simple(), (EINVAL, 7));
    // and the stream is still in step
    c.req(CMD_WRITE, 0, 8, 0, 2);
    c.tx(b"ok");
    assert_eq!(c.simple(), (0, 8));
    assert_eq!(&m.data.read().unwrap()[..2], b"ok");
    assert!(m.data.read().unwrap()[2..].iter().all(|&b| b == 0));
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let m = Mem::new(1 << 20, true);
    let srv = server_with(m.clone());
    let mut c = Client::connect(&srv);
    let (_, tf) = c.go(false);
    assert_ne!(tf & TF_READ_ONLY, 0);
    assert_eq!(tf & (TF_SEND_TRIM | TF_SEND_WRITE_ZEROES), 0);
    c.req(CMD_WRITE, 0, 1, 0, 3);
    c.tx(b"bad");
    assert_eq!(c.simple(), (EPERM, 1));
    c.req(CMD_TRIM, 0, 2, 0, 4096);
    assert_eq!(c.simple(), (EPERM, 2));
    c.req(CMD_WRITE_ZEROES, 0, 3, 0, 4096);
    assert_eq!(c.simple(), (EPERM, 3));
    c.req(CMD_FLUSH, 0, 4, 0, 0);
    assert_eq!(c.simple(), (0, 4));
}

#[test]
fn a_failing_change_log_sync_fails_the_nbd_write_before_the_origin_changes() {
    use cowsnap_core::changelog::ChangeLog;
    let d = tempfile::tempdir().unwrap();
    let origin = d.path().join("disk");
    let cl = Arc::new(
        ChangeLog::open_with_lineage(&d.path().join("changelog.bin"), 1 << 20, 65536, "l").unwrap(),
    );
    let srv = server_with(crate::test_support::file_engine(
        &origin,
        1 << 20,
        1,
        Some(cl.clone()),
    ));
    let mut c = Client::connect(&srv);
    let (_, tf) = c.go(false);
    assert_ne!(tf & TF_SEND_TRIM, 0);
    assert_ne!(tf & TF_SEND_WRITE_ZEROES, 0);
    let on_disk = || std::fs::read(&origin).unwrap()[65536..65536 + 4096].to_vec();

    cl.set_fail_syncs(true);
    c.req(CMD_WRITE, 0, 1, 65536, 4096);
    c.tx(&[9u8; 4096]);
    assert_eq!(c.simple(), (EIO, 1));
    // trim and write-zeroes change data too
    c.req(CMD_TRIM, 0, 2, 65536, 4096);
    assert_eq!(c.simple(), (EIO, 2));
    c.req(CMD_WRITE_ZEROES, 0, 3, 65536, 4096);
    assert_eq!(c.simple(), (EIO, 3));
    assert!(on_disk().iter().all(|&b| b == 1), "the origin was changed");
    // the session goes on: a read answers with the old bytes
    c.req(CMD_READ, 0, 4, 65536, 4096);
    assert_eq!(c.simple(), (0, 4));
    assert!(c.rx(4096).iter().all(|&b| b == 1));
    assert_eq!(cl.status().changed_chunks, 0);

    // once the change log syncs again, the same write goes through, tracked
    cl.set_fail_syncs(false);
    c.req(CMD_WRITE, 0, 5, 65536, 4096);
    c.tx(&[9u8; 4096]);
    assert_eq!(c.simple(), (0, 5));
    assert!(on_disk().iter().all(|&b| b == 9));
    assert_eq!(cl.status().changed_chunks, 1);
    c.req(CMD_DISC, 0, 6, 0, 0);
    assert!(c.closed());
}

#[test]
fn structured_reads_block_status_and_errors() {
    let m = Mem::new(1 << 20, false);
    m.data.write().unwrap()[8192..8196].copy_from_slice(b"data");
    let srv = server_with(m.clone());
    let mut c = Client::connect(&srv);
    let (_, tf) = c.go(true);
    assert_ne!(tf & TF_SEND_DF, 0);
    c.req(CMD_READ, CMD_FLAG_DF, 1, 8192, 4);
    let (fl, ty, ck, p) = c.chunk();
    assert_eq!((fl, ty, ck), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 1));
    assert_eq!(u64::from_be_bytes(p[..8].try_into().unwrap()), 8192);
    assert_eq!(&p[8..], b"data");
    // read error as an error chunk
    c.req(CMD_READ, 0, 2, 1 << 20, 1);
    let (fl, ty, ck, p) = c.chunk();
    assert_eq!((fl, ty, ck), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 2));
    assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), EINVAL);
    // block status: zero, data, zero
    c.req(CMD_BLOCK_STATUS, 0, 3, 0, 16384);
    let (fl, ty, ck, p) = c.chunk();
    assert_eq!((fl, ty, ck), (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 3));
    assert_eq!(
        u32::from_be_bytes(p[..4].try_into().unwrap()),
        BASE_ALLOCATION_ID
    );
    let d: Vec<(u32, u32)> = p[4..]
        .chunks_exact(8)
        .map(|x| {
            (
                u32::from_be_bytes(x[..4].try_into().unwrap()),
                u32::from_be_bytes(x[4..].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(d, vec![(8192, 3), (4096, 0), (4096, 3)]);
    c.req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 4, 0, 16384);
    let (_, _, _, p) = c.chunk();
    assert_eq!(p.len(), 4 + 8);
    // write-zeroes then a simple reply for a non-read command
    c.req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 5, 8192, 4);
    assert_eq!(c.simple(), (0, 5));
    assert!(m.data.read().unwrap()[8192..8196].iter().all(|&b| b == 0));
}

#[test]
fn replies_come_back_out_of_order() {
    // The read at 0 waits at a gate the test opens only after the read at 4096 was
    // answered: that answer can only come first if replies go out in completion order.
    let gate = Arc::new(Gate::default());
    let mut m = Mem::new(1 << 20, false);
    Arc::get_mut(&mut m).unwrap().gate = Some(gate.clone());
    m.data.write().unwrap().fill(7);
    let srv = server_with(m);
    let mut c = Client::connect(&srv);
    c.go(false);
    c.req(CMD_READ, 0, 1, 0, 16);
    c.req(CMD_READ, 0, 2, 4096, 16);
    assert_eq!(c.simple(), (0, 2), "the fast read should be answered first");
    assert_eq!(c.rx(16), vec![7; 16]);
    gate.open();
    assert_eq!(c.simple(), (0, 1));
    assert_eq!(c.rx(16), vec![7; 16]);
}

#[test]
fn error_chunks_name_no_host_path() {
    let mut m = Mem::new(1 << 20, false);
    Arc::get_mut(&mut m).unwrap().fail_at = Some(8192);
    let srv = server_with(m);
    let mut c = Client::connect(&srv);
    c.go(true);
    c.req(CMD_READ, 0, 1, 8192, 16);
    let (fl, ty, ck, p) = c.chunk();
    assert_eq!((fl, ty, ck), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 1));
    assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), EIO);
    let len = u16::from_be_bytes(p[4..6].try_into().unwrap()) as usize;
    let msg = std::str::from_utf8(&p[6..6 + len]).unwrap();
    assert_eq!(msg, "read failed: Input/output error");
    // Without structured replies the errno alone.
    let mut c = Client::connect(&srv);
    c.go(false);
    c.req(CMD_READ, 0, 2, 8192, 16);
    assert_eq!(c.simple(), (EIO, 2));
}

#[test]
fn disc_answers_every_request_in_flight() {
    let m = Mem::new(1 << 20, false);
    let srv = server_with(m.clone());
    let mut c = Client::connect(&srv);
    c.go(false);
    let mut batch = Vec::new();
    for i in 0..32u64 {
        let r = Request {
            flags: 0,
            cmd: CMD_WRITE,
            cookie: 100 + i,
            offset: i * 4096,
            len: 4096,
        };
        batch.extend_from_slice(&encode_request(&r));
        batch.extend_from_slice(&[i as u8 + 1; 4096]);
    }
    batch.extend_from_slice(&encode_request(&Request {
        flags: 0,
        cmd: CMD_DISC,
        cookie: 999,
        offset: 0,
        len: 0,
    }));
    c.tx(&batch);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..32 {
        let (e, k) = c.simple();
        assert_eq!(e, 0);
        seen.insert(k);
    }
    assert_eq!(seen.len(), 32);
    assert!(c.closed());
    let d = m.data.read().unwrap();
    for i in 0..32usize {
        assert!(d[i * 4096..(i + 1) * 4096]
            .iter()
            .all(|&b| b == i as u8 + 1));
    }
}

#[test]
fn shutdown_closes_idle_connections() {
    let srv = server_with(Mem::new(1 << 20, false));
    let mut c = Client::connect(&srv);
    c.go(false);
    for _ in 0..100 {
        if srv.connections() == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(srv.connections(), 1);
    srv.shutdown();
    assert!(c.closed());
    for _ in 0..100 {
        if srv.connections() == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(srv.connections(), 0);
}

#[test]
fn unix_listener_serves_clients() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.nbd");
    let srv = server_with(Mem::new(1 << 20, false));
    let h = srv.spawn_unix(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut c = Client { s };
    assert_eq!(&c.rx(18)[..8], b"NBDMAGIC");
    c.go(true);
    c.req(CMD_FLUSH, 0, 1, 0, 0);
    assert_eq!(c.simple(), (0, 1));
    srv.shutdown();
    h.join().unwrap();
}

#[test]
fn many_pipelined_replies_stay_intact() {
    // Small (queued) and large (direct) replies from several workers interleave on
    // the wire; every reply must arrive whole and match its request.
    let m = Mem::new(1 << 20, false);
    {
        let mut d = m.data.write().unwrap();
        for (i, b) in d.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
    }
    let srv = server_with(m);
    let mut c = Client::connect(&srv);
    c.go(true);
    let sizes: Vec<u32> = (0..600u32)
        .map(|i| match i % 3 {
            0 => 1 + (i * 37) % 4096,
            1 => 70_000 + i,
            _ => 512,
        })
        .collect();
    let mut w = c.s.try_clone().unwrap();
    let reqs: Vec<(u64, u64, u32)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (i as u64, (i as u64 * 1237) % ((1 << 20) - 70_600), n))
        .collect();
    let rq = reqs.clone();
    let t = std::thread::spawn(move || {
        for (k, off, n) in rq {
            w.write_all(&encode_request(&Request {
                flags: 0,
                cmd: CMD_READ,
                cookie: k,
                offset: off,
                len: n,
            }))
            .unwrap();
        }
    });
    let mut seen = vec![false; reqs.len()];
    for _ in 0..reqs.len() {
        let (fl, ty, k, p) = c.chunk();
        assert_eq!((fl, ty), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA));
        let (_, off, n) = reqs[k as usize];
        assert!(!seen[k as usize], "cookie {k} answered twice");
        seen[k as usize] = true;
        assert_eq!(u64::from_be_bytes(p[..8].try_into().unwrap()), off);
        assert_eq!(p.len() - 8, n as usize);
        for (j, &b) in p[8..].iter().enumerate() {
            assert_eq!(b, ((off as usize + j) % 251) as u8, "cookie {k} byte {j}");
        }
    }
    t.join().unwrap();
}

#[test]
fn tcp_listener_serves_clients() {
    let srv = server_with(Mem::new(1 << 20, false));
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = srv.spawn_tcp(l);
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut o = IHAVEOPT.to_be_bytes().to_vec();
    o.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    o.extend_from_slice(&4u32.to_be_bytes());
    o.extend_from_slice(b"disk");
    s.write_all(&o).unwrap();
    let mut r = [0u8; 10];
    s.read_exact(&mut r).unwrap();
    assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), 1 << 20);
    s.write_all(&encode_request(&Request {
        flags: 0,
        cmd: CMD_FLUSH,
        cookie: 5,
        offset: 0,
        len: 0,
    }))
    .unwrap();
    let mut rep = [0u8; 16];
    s.read_exact(&mut rep).unwrap();
    assert_eq!(rep, simple_reply(0, 5));
    srv.shutdown();
    h.join().unwrap();
    assert!(srv.wait_idle(Duration::from_secs(5)));
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Random bytes after a good handshake never panic the server, never write
        /// outside what valid requests asked for, and leave it serving new clients.
        #[test]
        fn garbage_after_handshake(garbage in proptest::collection::vec(any::<u8>(), 0..256)) {
            let m = Mem::new(1 << 16, false);
            let srv = server_with(m.clone());
            let mut c = Client::connect(&srv);
            c.go(true);
            c.tx(&garbage);
            let _ = c.s.shutdown(std::net::Shutdown::Write);
            let mut sink = Vec::new();
            let _ = c.s.read_to_end(&mut sink);
            let mut c2 = Client::connect(&srv);
            c2.go(false);
            c2.req(CMD_READ, 0, 1, 0, 4);
            prop_assert_eq!(c2.simple(), (0, 1));
            c2.rx(4);
            // Requests from the first connection may still be running: wait for them
            // to finish before looking at what reached the export.
            drop(c2);
            prop_assert!(srv.wait_idle(Duration::from_secs(10)));
            prop_assert!(
                !m.out_of_range.load(std::sync::atomic::Ordering::SeqCst),
                "a request outside the export reached it"
            );
        }

        #[test]
        fn garbage_handshake(garbage in proptest::collection::vec(any::<u8>(), 0..256)) {
            let srv = server_with(Mem::new(1 << 16, false));
            let mut c = Client::connect(&srv);
            c.tx(&garbage);
            let _ = c.s.shutdown(std::net::Shutdown::Write);
            let mut sink = Vec::new();
            let _ = c.s.read_to_end(&mut sink);
            let mut c2 = Client::connect(&srv);
            c2.go(false);
        }
    }
}

fn limited_server(
    export: Arc<dyn Export>,
    f: impl FnOnce(&mut super::limits::Limits),
) -> Arc<Server> {
    let mut l = super::limits::Limits::default();
    f(&mut l);
    let s = Server::with_limits(l);
    s.set_export("disk", export.clone(), "a test disk");
    s.set_export("", export, "");
    s
}

#[test]
fn connections_over_the_limit_are_closed_at_once() {
    let srv = limited_server(Mem::new(1 << 20, false), |l| l.max_connections = 2);
    let mut a = Client::connect(&srv);
    let mut b = Client::connect(&srv);
    a.go(false);
    b.go(false);
    let (x, y) = UnixStream::pair().unwrap();
    srv.serve_stream(Stream::Unix(x));
    y.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut c = Client { s: y };
    assert!(c.closed(), "a third connection is refused");
    assert_eq!(srv.connections_refused(), 1);
    // the open ones still work, and a slot frees up when one closes
    a.req(CMD_FLUSH, 0, 1, 0, 0);
    assert_eq!(a.simple(), (0, 1));
    b.req(CMD_DISC, 0, 2, 0, 0);
    assert!(b.closed());
    for _ in 0..200 {
        if srv.connections() == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut d = Client::connect(&srv);
    d.go(false);
    d.req(CMD_FLUSH, 0, 3, 0, 0);
    assert_eq!(d.simple(), (0, 3));
}

#[test]
fn the_handshake_deadline_is_a_total() {
    let srv = limited_server(Mem::new(1 << 20, false), |l| {
        l.handshake_timeout = Duration::from_millis(800)
    });
    let mut c = Client::connect(&srv);
    let t0 = std::time::Instant::now();
    // one byte every 200 ms: each read is quick, the whole never finishes
    let flags = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes();
    let mut closed = false;
    for i in 0..40 {
        if c.s.write_all(&flags[i % 4..i % 4 + 1]).is_err() {
            closed = true;
            break;
        }
        c.s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut b = [0u8; 1];
        match c.s.read(&mut b) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(_) => panic!("the server answered a partial handshake"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    assert!(closed, "the slow handshake was never dropped");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[test]
fn unread_replies_hold_bounded_memory() {
    // The smallest budget: one 32 MiB request at a time per connection and server.
    let srv = limited_server(Mem::new(64 << 20, false), |l| {
        l.memory = 32 << 20;
        l.connection_memory = 32 << 20;
    });
    let mut c = Client::connect(&srv);
    c.go(false);
    for i in 0..8u64 {
        c.req(CMD_READ, 0, i, (i % 2) * (32 << 20), 32 << 20);
    }
    std::thread::sleep(Duration::from_millis(300));
    let used = srv.request_memory();
    assert!(used <= (32 << 20) + super::limits::OVERDRAFT, "{used}");
    // a second connection with small requests is still served meanwhile
    let mut d = Client::connect(&srv);
    d.go(false);
    d.req(CMD_READ, 0, 99, 4096, 4096);
    assert_eq!(d.simple(), (0, 99));
    assert_eq!(d.rx(4096), vec![0u8; 4096]);
    // every reply of the first arrives once it reads them
    let mut seen = Vec::new();
    for _ in 0..8 {
        let (err, cookie) = c.simple();
        assert_eq!(err, 0);
        assert_eq!(c.rx(32 << 20).len(), 32 << 20);
        seen.push(cookie);
    }
    seen.sort();
    assert_eq!(seen, (0..8).collect::<Vec<_>>());
    assert!(srv.request_memory() <= 32 << 20);
}

#[test]
fn workers_start_on_demand_and_stay_bounded() {
    let mut m = Mem::new(1 << 20, false);
    Arc::get_mut(&mut m).unwrap().slow_zero = Duration::from_millis(300);
    let srv = limited_server(m, |l| {
        l.threads_per_connection = 4;
        l.max_workers = 2;
    });
    let mut c = Client::connect(&srv);
    c.go(false);
    // 6 slow reads: at most 1 + 2 run at once (the server-wide cap), all are answered
    for i in 0..6u64 {
        c.req(CMD_READ, 0, i, 0, 512);
    }
    let t0 = std::time::Instant::now();
    for _ in 0..6 {
        assert_eq!(c.simple().0, 0);
        c.rx(512);
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(550),
        "more than 3 ran at once: {took:?}"
    );
    assert!(
        took < Duration::from_millis(1700),
        "requests ran one by one: {took:?}"
    );
    assert!(srv.shared().workers.running() <= 2);
}

#[test]
fn idle_extra_workers_leave() {
    let mut m = Mem::new(1 << 20, false);
    Arc::get_mut(&mut m).unwrap().slow_zero = Duration::from_millis(200);
    let srv = limited_server(m, |l| l.threads_per_connection = 4);
    let mut c = Client::connect(&srv);
    c.go(false);
    for i in 0..4u64 {
        c.req(CMD_READ, 0, i, 0, 512);
    }
    for _ in 0..4 {
        assert_eq!(c.simple().0, 0);
        c.rx(512);
    }
    assert!(
        srv.shared().workers.running() >= 1,
        "extra workers were started"
    );
    // idle: every extra worker leaves within a few idle periods
    let t0 = std::time::Instant::now();
    while srv.shared().workers.running() > 0 {
        assert!(t0.elapsed() < Duration::from_secs(15), "idle workers stay");
        std::thread::sleep(Duration::from_millis(100));
    }
    // and the connection still serves
    c.req(CMD_READ, 0, 9, 4096, 512);
    assert_eq!(c.simple(), (0, 9));
    c.rx(512);
}

/// [`Mem`] with a dirty bitmap "g1": the second 4 KiB of every 16 KiB is dirty.
struct Dirty(Arc<Mem>);

impl Export for Dirty {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn caps(&self) -> ExportCaps {
        self.0.caps()
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> cowsnap_core::Result<()> {
        self.0.read(off, buf)
    }
    fn write(&self, off: u64, data: &[u8], fua: bool) -> cowsnap_core::Result<()> {
        self.0.write(off, data, fua)
    }
    fn flush(&self) -> cowsnap_core::Result<()> {
        self.0.flush()
    }
    fn trim(&self, off: u64, len: u64, fua: bool) -> cowsnap_core::Result<()> {
        self.0.trim(off, len, fua)
    }
    fn zero(&self, off: u64, len: u64, f: ZeroFlags) -> cowsnap_core::Result<()> {
        self.0.zero(off, len, f)
    }
    fn block_status(&self, off: u64, len: u64) -> cowsnap_core::Result<Vec<Extent>> {
        self.0.block_status(off, len)
    }
    fn dirty_bitmap(&self) -> Option<String> {
        Some("g1".into())
    }
    fn dirty_status(
        &self,
        off: u64,
        len: u64,
    ) -> cowsnap_core::Result<Vec<cowsnap_core::export::DirtyExtent>> {
        let mut out = Vec::new();
        let mut at = off;
        while at < off + len {
            let b = ((at / 4096) + 1) * 4096;
            let b = b.min(off + len);
            out.push(cowsnap_core::export::DirtyExtent {
                len: b - at,
                dirty: (at / 4096) % 4 == 1,
            });
            at = b;
        }
        Ok(out)
    }
}

fn meta_payload(name: &[u8], qs: &[&[u8]]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(&(qs.len() as u32).to_be_bytes());
    for q in qs {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q);
    }
    d
}

fn descs(p: &[u8]) -> (u32, Vec<(u32, u32)>) {
    let d = p[4..]
        .chunks_exact(8)
        .map(|x| {
            (
                u32::from_be_bytes(x[..4].try_into().unwrap()),
                u32::from_be_bytes(x[4..].try_into().unwrap()),
            )
        })
        .collect();
    (u32::from_be_bytes(p[..4].try_into().unwrap()), d)
}

#[test]
fn dirty_bitmap_context_is_listed_selected_and_answered() {
    let m = Mem::new(1 << 20, true);
    let srv = Server::new();
    srv.set_export("plain", m.clone(), "");
    srv.set_export("snap", Arc::new(Dirty(m)), "");
    let mut c = Client::connect(&srv);
    c.tx(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes());
    c.opt(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.orep(OPT_STRUCTURED_REPLY).0, REP_ACK);
    // LIST: "qemu:" finds the bitmap of "snap", none on "plain"
    for (name, want) in [(&b"snap"[..], true), (b"plain", false)] {
        c.opt(OPT_LIST_META_CONTEXT, &meta_payload(name, &[b"qemu:"]));
        let (t, d) = c.orep(OPT_LIST_META_CONTEXT);
        if want {
            assert_eq!(t, REP_META_CONTEXT);
            assert_eq!(&d[4..], b"qemu:dirty-bitmap:g1");
            assert_eq!(c.orep(OPT_LIST_META_CONTEXT).0, REP_ACK);
        } else {
            assert_eq!(t, REP_ACK);
        }
    }
    // SET: an unknown bitmap name is no context (not an error)
    c.opt(
        OPT_SET_META_CONTEXT,
        &meta_payload(
            b"snap",
            &[
                b"base:allocation",
                b"qemu:dirty-bitmap:g0",
                b"qemu:dirty-bitmap:g1",
            ],
        ),
    );
    let (t, d) = c.orep(OPT_SET_META_CONTEXT);
    assert_eq!(
        (t, &d[..]),
        (REP_META_CONTEXT, &rep_meta_context(1, BASE_ALLOCATION)[..])
    );
    let (t, d) = c.orep(OPT_SET_META_CONTEXT);
    assert_eq!(
        (t, &d[..]),
        (
            REP_META_CONTEXT,
            &rep_meta_context(DIRTY_BITMAP_ID, "qemu:dirty-bitmap:g1")[..]
        )
    );
    assert_eq!(c.orep(OPT_SET_META_CONTEXT).0, REP_ACK);
    c.opt(OPT_GO, &go_payload(b"snap", &[]));
    loop {
        match c.orep(OPT_GO).0 {
            REP_ACK => break,
            REP_INFO => {}
            other => panic!("GO answered {other:#x}"),
        }
    }
    // one chunk per context, the last DONE
    c.req(CMD_BLOCK_STATUS, 0, 9, 0, 16384);
    let (fl, ty, ck, p) = c.chunk();
    assert_eq!((fl, ty, ck), (0, REPLY_TYPE_BLOCK_STATUS, 9));
    assert_eq!(descs(&p).0, BASE_ALLOCATION_ID);
    let (fl, ty, ck, p) = c.chunk();
    assert_eq!((fl, ty, ck), (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 9));
    assert_eq!(
        descs(&p),
        (
            DIRTY_BITMAP_ID,
            vec![(4096, 0), (4096, STATE_DIRTY), (8192, 0)]
        )
    );
    c.req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 10, 4096, 16384);
    let _ = c.chunk();
    let (_, _, _, p) = c.chunk();
    assert_eq!(descs(&p), (DIRTY_BITMAP_ID, vec![(4096, STATE_DIRTY)]));
    // removing the export closes its connection
    assert_eq!(srv.remove_export_and_disconnect("snap"), 1);
    assert!(c.closed());
}

/// Option haggling with TLS required or off, on an in-memory wire whose `start_tls`
/// only records where in the output it was called.
mod tls_options {
    use super::super::handshake::{negotiate_io, End, Tls, Wire};
    use super::*;

    struct MockWire {
        input: std::io::Cursor<Vec<u8>>,
        out: Vec<u8>,
        tls_at: Option<usize>,
    }
    impl Read for MockWire {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(b)
        }
    }
    impl Write for MockWire {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.out.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl Wire for MockWire {
        fn start_tls(&mut self) -> std::io::Result<()> {
            assert!(self.tls_at.is_none(), "TLS started twice");
            self.tls_at = Some(self.out.len());
            Ok(())
        }
    }

    fn opt(o: u32, d: &[u8]) -> Vec<u8> {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&o.to_be_bytes());
        b.extend_from_slice(&(d.len() as u32).to_be_bytes());
        b.extend_from_slice(d);
        b
    }

    /// The replies (option, type, offset of the reply's end), where TLS started, and
    /// the result.
    type Outcome = (
        Vec<(u32, u32, usize)>,
        Option<usize>,
        Result<super::super::handshake::Session, End>,
    );

    /// Run negotiation on `opts` (after the client flags).
    fn run(tls: Tls, opts: &[Vec<u8>]) -> Outcome {
        let srv = server_with(Mem::new(1 << 20, false));
        let mut input = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        for o in opts {
            input.extend_from_slice(o);
        }
        let mut w = MockWire {
            input: std::io::Cursor::new(input),
            out: Vec::new(),
            tls_at: None,
        };
        let r = negotiate_io(&*srv, &mut w, tls);
        let mut reps = Vec::new();
        let mut p = 18; // greeting
        while p + 20 <= w.out.len() {
            let h = &w.out[p..p + 20];
            assert_eq!(
                u64::from_be_bytes(h[..8].try_into().unwrap()),
                OPT_REPLY_MAGIC
            );
            let o = u32::from_be_bytes(h[8..12].try_into().unwrap());
            let t = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let n = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            p += 20 + n;
            reps.push((o, t, p));
        }
        (reps, w.tls_at, r)
    }

    #[test]
    fn tls_required_answers_only_starttls_and_abort_until_tls_is_up() {
        let go = go_payload(b"disk", &[]);
        let (reps, tls_at, r) = run(
            Tls::Required,
            &[
                opt(OPT_LIST, &[]),
                opt(OPT_STRUCTURED_REPLY, &[]),
                opt(OPT_INFO, &go),
                opt(OPT_GO, &go),
                opt(OPT_LIST_META_CONTEXT, &[0; 8]),
                opt(99, b"whatever"),
                opt(OPT_STARTTLS, b"x"),
                opt(OPT_STARTTLS, &[]),
                opt(OPT_STARTTLS, &[]),
                opt(OPT_GO, &go),
            ],
        );
        let types: Vec<(u32, u32)> = reps.iter().map(|&(o, t, _)| (o, t)).collect();
        assert_eq!(
            &types[..9],
            &[
                (OPT_LIST, REP_ERR_TLS_REQD),
                (OPT_STRUCTURED_REPLY, REP_ERR_TLS_REQD),
                (OPT_INFO, REP_ERR_TLS_REQD),
                (OPT_GO, REP_ERR_TLS_REQD),
                (OPT_LIST_META_CONTEXT, REP_ERR_TLS_REQD),
                (99, REP_ERR_TLS_REQD),
                (OPT_STARTTLS, REP_ERR_INVALID),
                (OPT_STARTTLS, REP_ACK),
                (OPT_STARTTLS, REP_ERR_INVALID),
            ]
        );
        // TLS starts right after the ACK, before anything else is written.
        assert_eq!(tls_at, Some(reps[7].2));
        assert!(types[9..].iter().all(|&(o, _)| o == OPT_GO));
        assert_eq!(types.last(), Some(&(OPT_GO, REP_ACK)));
        let s = r.unwrap_or_else(|_| panic!("GO inside TLS failed"));
        assert_eq!(s.name, "disk");
        assert!(!s.structured);
    }

    #[test]
    fn export_name_without_tls_drops_the_connection() {
        let (reps, tls_at, r) = run(Tls::Required, &[opt(OPT_EXPORT_NAME, b"disk")]);
        assert!(reps.is_empty(), "{reps:?}");
        assert!(tls_at.is_none());
        match r {
            Err(End::Closed(why)) => assert!(why.contains("TLS"), "{why}"),
            _ => panic!("NBD_OPT_EXPORT_NAME before TLS was not refused"),
        }
        // Inside TLS it works as usual.
        let (_, tls_at, r) = run(
            Tls::Required,
            &[opt(OPT_STARTTLS, &[]), opt(OPT_EXPORT_NAME, b"disk")],
        );
        assert!(tls_at.is_some());
        assert!(r.is_ok());
    }

    #[test]
    fn abort_before_tls_is_acknowledged() {
        let (reps, tls_at, r) = run(Tls::Required, &[opt(OPT_ABORT, &[])]);
        assert_eq!(
            reps.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(),
            [(OPT_ABORT, REP_ACK)]
        );
        assert!(tls_at.is_none());
        assert!(matches!(r, Err(End::Closed(_))));
    }

    #[test]
    fn starttls_is_refused_by_policy_where_tls_is_off() {
        let go = go_payload(b"disk", &[]);
        let (reps, tls_at, r) = run(
            Tls::Off,
            &[
                opt(OPT_STARTTLS, b"x"),
                opt(OPT_STARTTLS, &[]),
                opt(OPT_GO, &go),
            ],
        );
        assert_eq!((reps[0].0, reps[0].1), (OPT_STARTTLS, REP_ERR_INVALID));
        assert_eq!((reps[1].0, reps[1].1), (OPT_STARTTLS, REP_ERR_POLICY));
        assert!(tls_at.is_none());
        assert!(r.is_ok(), "a plain GO after a refused STARTTLS works");
    }
}

/// Real TLS through the server: certificates made with rcgen, a rustls client.
mod tls_sessions {
    use super::*;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use std::net::{TcpListener, TcpStream};

    struct Creds {
        dir: tempfile::TempDir,
        ca: CertificateDer<'static>,
        client: (CertificateDer<'static>, PrivateKeyDer<'static>),
        stranger: (CertificateDer<'static>, PrivateKeyDer<'static>),
    }

    fn ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let k = rcgen::KeyPair::generate().unwrap();
        (p.self_signed(&k).unwrap(), k)
    }

    fn leaf(
        names: &[&str],
        eku: rcgen::ExtendedKeyUsagePurpose,
        by: &(rcgen::Certificate, rcgen::KeyPair),
    ) -> (rcgen::Certificate, rcgen::KeyPair) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut p = rcgen::CertificateParams::new(names).unwrap();
        p.extended_key_usages = vec![eku];
        let k = rcgen::KeyPair::generate().unwrap();
        (p.signed_by(&k, &by.0, &by.1).unwrap(), k)
    }

    fn der(
        c: &(rcgen::Certificate, rcgen::KeyPair),
    ) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        (
            c.0.der().clone(),
            PrivateKeyDer::try_from(c.1.serialize_der()).unwrap(),
        )
    }

    fn creds() -> Creds {
        use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
        let dir = tempfile::tempdir().unwrap();
        let ca1 = ca("test CA");
        let ca2 = ca("another CA");
        let server = leaf(&["localhost", "127.0.0.1"], ServerAuth, &ca1);
        let client = leaf(&[], ClientAuth, &ca1);
        let stranger = leaf(&[], ClientAuth, &ca2);
        std::fs::write(dir.path().join("server-cert.pem"), server.0.pem()).unwrap();
        std::fs::write(dir.path().join("server-key.pem"), server.1.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("ca-cert.pem"), ca1.0.pem()).unwrap();
        Creds {
            ca: ca1.0.der().clone(),
            client: der(&client),
            stranger: der(&stranger),
            dir,
        }
    }

    fn tls_server(
        c: &Creds,
        verify_peer: bool,
        timeout: Duration,
    ) -> (Arc<Server>, std::net::SocketAddr) {
        let srv = limited_server(Mem::new(4 << 20, false), |l| {
            l.handshake_timeout = timeout;
            l.threads_per_connection = 4;
        });
        let cfg = super::super::tls::load(c.dir.path(), verify_peer).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        srv.spawn_tcp_tls(l, cfg);
        (srv, addr)
    }

    fn opt(s: &mut impl Write, o: u32, d: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&o.to_be_bytes());
        b.extend_from_slice(&(d.len() as u32).to_be_bytes());
        b.extend_from_slice(d);
        s.write_all(&b).unwrap();
        s.flush().unwrap();
    }

    fn orep(s: &mut impl Read) -> std::io::Result<(u32, u32, Vec<u8>)> {
        let mut h = [0u8; 20];
        s.read_exact(&mut h)?;
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            OPT_REPLY_MAGIC
        );
        let n = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut d = vec![0u8; n];
        s.read_exact(&mut d)?;
        Ok((
            u32::from_be_bytes(h[8..12].try_into().unwrap()),
            u32::from_be_bytes(h[12..16].try_into().unwrap()),
            d,
        ))
    }

    /// Connect, check that GO is refused in the clear, STARTTLS, and return the TLS
    /// stream (handshake not yet driven: the first read or write does it).
    fn starttls(
        addr: std::net::SocketAddr,
        c: &Creds,
        cert: Option<&(CertificateDer<'static>, PrivateKeyDer<'static>)>,
    ) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        s.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())
            .unwrap();
        opt(&mut s, OPT_GO, &go_payload(b"disk", &[]));
        assert_eq!(orep(&mut s).unwrap().1, REP_ERR_TLS_REQD);
        opt(&mut s, OPT_STARTTLS, &[]);
        assert_eq!(orep(&mut s).unwrap().1, REP_ACK);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(c.ca.clone()).unwrap();
        let b = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let cfg = match cert {
            Some((c, k)) => b
                .with_client_auth_cert(vec![c.clone()], k.clone_key())
                .unwrap(),
            None => b.with_no_client_auth(),
        };
        let conn = rustls::ClientConnection::new(
            Arc::new(cfg),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        rustls::StreamOwned::new(conn, s)
    }

    fn go(t: &mut (impl Read + Write)) -> std::io::Result<()> {
        opt(t, OPT_GO, &go_payload(b"disk", &[]));
        loop {
            let (o, ty, _) = orep(t)?;
            assert_eq!(o, OPT_GO);
            match ty {
                REP_INFO => {}
                REP_ACK => return Ok(()),
                other => panic!("GO answered {other:#x}"),
            }
        }
    }

    fn request(t: &mut impl Write, cmd: u16, cookie: u64, offset: u64, len: u32) {
        let r = Request {
            flags: 0,
            cmd,
            cookie,
            offset,
            len,
        };
        t.write_all(&encode_request(&r)).unwrap();
    }

    fn simple(t: &mut impl Read) -> (u32, u64) {
        let mut h = [0u8; 16];
        t.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    #[test]
    fn transmission_runs_inside_tls_with_several_requests_in_flight() {
        let c = creds();
        let (srv, addr) = tls_server(&c, false, Duration::from_secs(10));
        let mut t = starttls(addr, &c, None);
        go(&mut t).unwrap();
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        // 4 writes of 1 MiB, sent back to back, then their replies.
        for i in 0..4u64 {
            request(&mut t, CMD_WRITE, i, i << 20, 1 << 20);
            t.write_all(&data[(i as usize) << 20..((i as usize) + 1) << 20])
                .unwrap();
        }
        t.flush().unwrap();
        let mut cookies: Vec<u64> = (0..4)
            .map(|_| simple(&mut t))
            .map(|(e, k)| {
                assert_eq!(e, 0);
                k
            })
            .collect();
        cookies.sort();
        assert_eq!(cookies, [0, 1, 2, 3]);
        // 64 reads of 64 KiB in flight at once; replies come in any order.
        for i in 0..64u64 {
            request(&mut t, CMD_READ, 100 + i, i << 16, 1 << 16);
        }
        t.flush().unwrap();
        let mut back = vec![0u8; 4 << 20];
        for _ in 0..64 {
            let (e, k) = simple(&mut t);
            assert_eq!(e, 0);
            let off = ((k - 100) as usize) << 16;
            t.read_exact(&mut back[off..off + (1 << 16)]).unwrap();
        }
        assert!(back == data, "data read over TLS differs");
        request(&mut t, CMD_DISC, 999, 0, 0);
        t.flush().unwrap();
        let mut b = [0u8; 1];
        assert!(matches!(t.read(&mut b), Ok(0) | Err(_)));
        assert!(
            srv.wait_idle(Duration::from_secs(5)),
            "connection (or its pump) left over"
        );
    }

    #[test]
    fn shutdown_ends_tls_connections_after_their_requests() {
        let c = creds();
        let (srv, addr) = tls_server(&c, false, Duration::from_secs(10));
        let mut t = starttls(addr, &c, None);
        go(&mut t).unwrap();
        request(&mut t, CMD_FLUSH, 1, 0, 0);
        t.flush().unwrap();
        assert_eq!(simple(&mut t), (0, 1));
        srv.shutdown();
        // The connection ends: TLS close_notify (Ok(0)) or the socket closes.
        let mut b = [0u8; 1];
        assert!(matches!(t.read(&mut b), Ok(0) | Err(_)));
        assert!(
            srv.wait_idle(Duration::from_secs(5)),
            "the TLS connection outlived shutdown"
        );
    }

    #[test]
    fn verify_peer_serves_only_certificates_of_the_ca() {
        let c = creds();
        let (srv, addr) = tls_server(&c, true, Duration::from_secs(10));
        let mut anon = starttls(addr, &c, None);
        assert!(
            go(&mut anon).is_err(),
            "a client without a certificate was served"
        );
        let mut stranger = starttls(addr, &c, Some(&c.stranger));
        assert!(go(&mut stranger).is_err(), "another CA's client was served");
        let mut ok = starttls(addr, &c, Some(&c.client));
        go(&mut ok).unwrap();
        request(&mut ok, CMD_FLUSH, 7, 0, 0);
        ok.flush().unwrap();
        assert_eq!(simple(&mut ok), (0, 7));
        drop((anon, stranger, ok));
        assert!(srv.wait_idle(Duration::from_secs(5)));
    }

    #[test]
    fn a_stalled_tls_handshake_is_dropped_at_the_deadline() {
        let c = creds();
        let (srv, addr) = tls_server(&c, false, Duration::from_millis(800));
        let t0 = std::time::Instant::now();
        // STARTTLS acknowledged, then the client says nothing: no TLS handshake.
        let t = starttls(addr, &c, None);
        let mut s = t.sock;
        let mut b = [0u8; 1];
        assert!(
            matches!(s.read(&mut b), Ok(0) | Err(_)),
            "the server waited on"
        );
        let took = t0.elapsed();
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert!(
            srv.wait_idle(Duration::from_secs(5)),
            "the pump outlived the deadline"
        );
    }

    #[test]
    fn credentials_are_checked_when_loaded() {
        let c = creds();
        let load = |d: &std::path::Path, v| super::super::tls::load(d, v).map(|_| ());
        let e = load(&c.dir.path().join("nope"), false).unwrap_err();
        assert!(
            format!("{e:#}").contains("unable to read TLS credentials"),
            "{e:#}"
        );
        // A key of another certificate.
        let other = rcgen::KeyPair::generate().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        std::fs::copy(
            c.dir.path().join("server-cert.pem"),
            d2.path().join("server-cert.pem"),
        )
        .unwrap();
        std::fs::write(d2.path().join("server-key.pem"), other.serialize_pem()).unwrap();
        let e = load(d2.path(), false).unwrap_err();
        assert!(
            format!("{e:#}").contains("unable to use TLS credentials"),
            "{e:#}"
        );
        // --tls-verify-peer needs ca-cert.pem.
        std::fs::copy(
            c.dir.path().join("server-key.pem"),
            d2.path().join("server-key.pem"),
        )
        .unwrap();
        load(d2.path(), false).unwrap();
        let e = load(d2.path(), true).unwrap_err();
        assert!(format!("{e:#}").contains("ca-cert.pem"), "{e:#}");
        // Not PEM at all.
        std::fs::write(d2.path().join("server-cert.pem"), "hello").unwrap();
        assert!(load(d2.path(), false).is_err());
    }
}
