//! Test doubles for the engine: an in-memory recording origin, a recording /
//! fault-injecting container and a pausable, fault-injecting in-memory target.
#![allow(dead_code)]

use cowsnap_core::blockio::BlockIo;
use cowsnap_core::changelog::Cut;
use cowsnap_core::container::{ram::RamContainer, Container, SlotIdx};
use cowsnap_core::error::{Error, Result};
use cowsnap_core::target::{Scope, SnapshotInfo, Target, TargetSummary};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Something that happened, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ev {
    OriginWrite { off: u64, len: u64 },
    OriginRead { off: u64, len: u64 },
    ContainerWrite { slot: u64, first_byte: u8 },
}

pub type Log = Arc<Mutex<Vec<Ev>>>;

pub fn eio(what: &str) -> Error {
    Error::io(what.to_string(), io::Error::from_raw_os_error(libc::EIO))
}

/// An origin in memory that records every write and read.
pub struct MemDisk {
    pub data: Mutex<Vec<u8>>,
    pub log: Log,
    pub record_reads: AtomicBool,
    /// While true, writes wait (after counting themselves in `writes_waiting`).
    pub block_writes: Mutex<bool>,
    pub writes_waiting: AtomicUsize,
    cv: Condvar,
}

impl MemDisk {
    pub fn new(data: Vec<u8>, log: Log) -> Arc<Self> {
        Arc::new(MemDisk {
            data: Mutex::new(data),
            log,
            record_reads: AtomicBool::new(false),
            block_writes: Mutex::new(false),
            writes_waiting: AtomicUsize::new(0),
            cv: Condvar::new(),
        })
    }
    pub fn set_block_writes(&self, on: bool) {
        *self.block_writes.lock().unwrap() = on;
        self.cv.notify_all();
    }
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }
}

impl BlockIo for MemDisk {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let d = self.data.lock().unwrap();
        let o = off as usize;
        if o + buf.len() > d.len() {
            return Err(eio("read past end"));
        }
        buf.copy_from_slice(&d[o..o + buf.len()]);
        if self.record_reads.load(Ordering::SeqCst) {
            self.log.lock().unwrap().push(Ev::OriginRead {
                off,
                len: buf.len() as u64,
            });
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        {
            let mut b = self.block_writes.lock().unwrap();
            if *b {
                self.writes_waiting.fetch_add(1, Ordering::SeqCst);
                while *b {
                    b = self.cv.wait(b).unwrap();
                }
                self.writes_waiting.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let mut d = self.data.lock().unwrap();
        let o = off as usize;
        if o + buf.len() > d.len() {
            return Err(eio("write past end"));
        }
        d[o..o + buf.len()].copy_from_slice(buf);
        self.log.lock().unwrap().push(Ev::OriginWrite {
            off,
            len: buf.len() as u64,
        });
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.write_zeroes(off, len, true)
    }
    fn write_zeroes(&self, off: u64, len: u64, _may_unmap: bool) -> Result<()> {
        let mut d = self.data.lock().unwrap();
        d[off as usize..(off + len) as usize].fill(0);
        self.log.lock().unwrap().push(Ev::OriginWrite { off, len });
        Ok(())
    }
    fn fast_zero(&self) -> bool {
        true
    }
    fn is_block_device(&self) -> bool {
        false
    }
    fn engine_name(&self) -> &'static str {
        "mem"
    }
}

/// A RAM container that records writes and fails them on demand.
pub struct RecContainer {
    pub inner: RamContainer,
    pub log: Log,
    pub fail_writes: Arc<AtomicBool>,
    pub fail_reads: Arc<AtomicBool>,
}

impl RecContainer {
    pub fn new(slots: u64, chunk: u32, log: Log) -> Self {
        RecContainer {
            inner: RamContainer::new(slots * u64::from(chunk), chunk).unwrap(),
            log,
            fail_writes: Arc::new(AtomicBool::new(false)),
            fail_reads: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl Container for RecContainer {
    fn slot_size(&self) -> u32 {
        self.inner.slot_size()
    }
    fn slots(&self) -> u64 {
        self.inner.slots()
    }
    fn write_slot(&self, slot: SlotIdx, data: &[u8]) -> Result<()> {
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(eio("container write"));
        }
        self.log.lock().unwrap().push(Ev::ContainerWrite {
            slot: slot.0,
            first_byte: data[0],
        });
        self.inner.write_slot(slot, data)
    }
    fn read_slot(&self, slot: SlotIdx, buf: &mut [u8]) -> Result<()> {
        if self.fail_reads.load(Ordering::SeqCst) {
            return Err(eio("container read"));
        }
        self.inner.read_slot(slot, buf)
    }
    fn describe(&self) -> String {
        "test:recording".into()
    }
}

/// Shared state of a [`MemTarget`].
pub struct TargetState {
    pub image: Mutex<Vec<u8>>,
    pub written: Mutex<Vec<bool>>,
    paused: Mutex<bool>,
    cv: Condvar,
    /// Fail every write after this many succeeded, with this errno.
    pub fail_after: Mutex<Option<(usize, i32)>>,
    pub writes: AtomicUsize,
    pub committed: AtomicBool,
    pub aborted: Mutex<Option<String>>,
    pub began: AtomicBool,
    pub chunk: u32,
    /// Writes that found the target paused (and waited).
    pub blocked: AtomicUsize,
    /// Ranges handed over as known zeros (`write_zeroes`), in order.
    pub zero_ranges: Mutex<Vec<(u64, u64)>>,
}

impl TargetState {
    pub fn pause(&self) {
        *self.paused.lock().unwrap() = true;
    }
    pub fn resume(&self) {
        *self.paused.lock().unwrap() = false;
        self.cv.notify_all();
    }
    /// Wait until a write is blocked on the pause (the drainer is inside a batch).
    pub fn wait_blocked(&self) {
        let t = std::time::Instant::now();
        while self.blocked.load(Ordering::SeqCst) == 0 {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no write reached the target"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Wait until `cond` holds (another thread reached the state the test asserts on),
/// failing after 30 s: tests wait for a state, never for a fixed time.
pub fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let t = std::time::Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "never happened: {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// An in-memory target: pausable, fault-injecting, granule configurable.
pub struct MemTarget {
    pub st: Arc<TargetState>,
    pub granule: u32,
}

impl MemTarget {
    pub fn new(size: u64, chunk: u32, granule: u32) -> (Box<Self>, Arc<TargetState>) {
        let nchunks = size.div_ceil(u64::from(chunk)) as usize;
        let st = Arc::new(TargetState {
            image: Mutex::new(vec![0u8; size as usize]),
            written: Mutex::new(vec![false; nchunks]),
            paused: Mutex::new(false),
            cv: Condvar::new(),
            fail_after: Mutex::new(None),
            writes: AtomicUsize::new(0),
            committed: AtomicBool::new(false),
            aborted: Mutex::new(None),
            began: AtomicBool::new(false),
            chunk,
            blocked: AtomicUsize::new(0),
            zero_ranges: Mutex::new(Vec::new()),
        });
        (
            Box::new(MemTarget {
                st: st.clone(),
                granule,
            }),
            st,
        )
    }
}

impl Target for MemTarget {
    fn granule_chunks(&self) -> u32 {
        self.granule
    }
    fn scope(&mut self, _cut: Option<&Cut>) -> Result<Scope> {
        Ok(Scope::All)
    }
    fn begin(&mut self, info: &SnapshotInfo) -> Result<()> {
        assert_eq!(info.chunk_size, self.st.chunk);
        self.st.began.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn write(&mut self, off: u64, data: &[u8]) -> Result<()> {
        {
            let mut p = self.st.paused.lock().unwrap();
            if *p {
                self.st.blocked.fetch_add(1, Ordering::SeqCst);
            }
            while *p {
                p = self
                    .st
                    .cv
                    .wait_timeout(p, Duration::from_millis(50))
                    .unwrap()
                    .0;
            }
        }
        if let Some((n, errno)) = *self.st.fail_after.lock().unwrap() {
            if self.st.writes.load(Ordering::SeqCst) >= n {
                return Err(Error::io(
                    format!("unable to write test target at {off}"),
                    io::Error::from_raw_os_error(errno),
                ));
            }
        }
        let cs = u64::from(self.st.chunk);
        let g = u64::from(self.granule) * cs;
        let size = self.st.image.lock().unwrap().len() as u64;
        assert_eq!(off % g, 0, "write at {off} is not granule aligned");
        let end = off + data.len() as u64;
        assert!(
            (end / g) * g == end || end == size,
            "write end {end} not a granule edge"
        );
        let mut w = self.st.written.lock().unwrap();
        for c in off / cs..end.div_ceil(cs) {
            assert!(!w[c as usize], "chunk {c} written twice");
            w[c as usize] = true;
        }
        self.st.image.lock().unwrap()[off as usize..end as usize].copy_from_slice(data);
        self.st.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn write_zeroes(&mut self, off: u64, len: u64) -> Result<()> {
        // test disks are small: the same checks as a write of zeros
        self.st.zero_ranges.lock().unwrap().push((off, len));
        self.write(off, &vec![0u8; len as usize])
    }
    fn commit(self: Box<Self>) -> Result<TargetSummary> {
        assert!(
            self.st.written.lock().unwrap().iter().all(|&w| w),
            "commit with holes"
        );
        self.st.committed.store(true, Ordering::SeqCst);
        Ok(TargetSummary::default())
    }
    fn abort(self: Box<Self>, why: &str) {
        *self.st.aborted.lock().unwrap() = Some(why.to_string());
    }
}

/// Deterministic non-zero pattern.
pub fn pattern(size: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..size)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) as u8) | 1
        })
        .collect()
}

/// Wraps a target and records the offset of every write, in order.
pub struct Spy(pub Box<MemTarget>, pub Arc<Mutex<Vec<u64>>>);

impl Target for Spy {
    fn granule_chunks(&self) -> u32 {
        self.0.granule_chunks()
    }
    fn scope(&mut self, c: Option<&Cut>) -> Result<Scope> {
        self.0.scope(c)
    }
    fn begin(&mut self, i: &SnapshotInfo) -> Result<()> {
        self.0.begin(i)
    }
    fn write(&mut self, off: u64, d: &[u8]) -> Result<()> {
        self.1.lock().unwrap().push(off);
        self.0.write(off, d)
    }
    fn write_zeroes(&mut self, off: u64, len: u64) -> Result<()> {
        self.1.lock().unwrap().push(off);
        self.0.write_zeroes(off, len)
    }
    fn commit(self: Box<Self>) -> Result<TargetSummary> {
        self.0.commit()
    }
    fn abort(self: Box<Self>, why: &str) {
        self.0.abort(why)
    }
}
