//! One ublk queue: a thread with its own io_uring (the driver takes a queue's
//! commands only from the task that fetched on it), the queue's descriptor array
//! mapped read-only from `/dev/ublkcN`, and one buffer of `max_io` bytes per tag.
//!
//! Loop: FETCH_REQ every tag; when a fetch completes with `UBLK_IO_RES_OK`, the tag's
//! descriptor holds a request: serve it ([`super::dispatch`]; a WRITE's data is
//! already in the tag's buffer, a READ's is put there) and submit
//! COMMIT_AND_FETCH_REQ with the result, which completes the request and waits for
//! the next. A completion with `UBLK_IO_RES_ABORT` (STOP_DEV, or the device going
//! away) retires the tag; the thread ends when every tag is retired. Requests are
//! served on the queue's thread, but for large reads while others wait, which go to its
//! helper threads ([`HELPERS`]; results come back over a channel and an eventfd, see
//! [`Queue::run`]); queues run in parallel.
//!
//! Ownership: the buffers and the mapping outlive the ring (the ring is dropped first,
//! which cancels whatever is still outstanding).

use super::abi::{self, IoCmd, IoDesc};
use super::dispatch::{self, Limits};
use cowsnap_core::error::{Error, Result};
use cowsnap_core::export::Export;
use io_uring::{opcode, types, IoUring};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

/// An anonymous or file mapping, unmapped on drop.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by one queue thread at a time; the raw
// pointer is only dereferenced by that thread.
unsafe impl Send for Mapping {}

impl Mapping {
    fn new(fd: Option<&File>, len: usize, off: u64, what: &str) -> Result<Mapping> {
        let (prot, flags, raw) = match fd {
            Some(f) => (
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                f.as_raw_fd(),
            ),
            None => (
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
            ),
        };
        // SAFETY: a new mapping at an address the kernel chooses; nothing existing is
        // replaced. The result is checked before use.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, raw, off as i64) };
        if ptr == libc::MAP_FAILED {
            return Err(Error::io(
                format!("unable to map {what}"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned; no reference into the
        // mapping outlives `self`.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// What a queue thread needs.
pub struct QueueSpec {
    /// Queue id.
    pub q_id: u16,
    /// Tags.
    pub depth: u16,
    /// The device's char device (shared by the queues).
    pub cdev: Arc<File>,
    /// Disk limits.
    pub limits: Limits,
    /// The command numbering the device's ADD_DEV took.
    pub enc: abi::Encoding,
    /// Helper threads (0: every request on the queue's thread).
    pub helpers: u8,
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory effects.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// A queue set up and ready to fetch.
pub struct Queue {
    spec: QueueSpec,
    descs: Mapping,
    bufs: Mapping,
    ring: Option<IoUring>,
}

const USER_DATA_TAG_MASK: u64 = 0xffff;
/// The wake eventfd's read (never a tag: tags are below 2^16).
const USER_DATA_WAKE: u64 = 1 << 32;

/// Helper threads of one queue by default (at most the queue's depth are started).
pub const HELPERS: u8 = 4;
/// Reads of at least this size go to the helpers when others are waiting; smaller
/// reads and every other request are served on the queue's thread. Measured in the VM
/// benchmark (BENCHMARKS, ublk in a VM): handing 4 KiB requests over cost more than it
/// gained (4k QD32 random reads 0.80× → 0.16× a loop device, writes 0.93× → 0.39×);
/// 1 MiB reads gained in every run (0.58× → 0.84× and 0.53× → 0.98× in paired runs);
/// 1 MiB writes handed over did not (0.73× → 0.52× paired), though that VM's noise is
/// as large.
pub const HAND_OVER_BYTES: u64 = 128 * 1024;

/// A tag's request handed to a helper: its descriptor and its buffer (`max_io` bytes).
struct Job {
    tag: u16,
    desc: IoDesc,
    buf: *mut u8,
}

// SAFETY: the pointer is the tag's region of the queue's buffer mapping, which outlives
// the helpers (they are scoped inside `Queue::run`); exactly one thread uses a tag's
// region at a time (see `Queue::run`).
unsafe impl Send for Job {}

/// The queue thread's ends of the helper channels.
struct Helpers<'a> {
    jobs: crossbeam_channel::Sender<Job>,
    done: crossbeam_channel::Receiver<(u16, i32)>,
    wake: &'a WakeFd,
}

/// An eventfd the helpers write after sending a result.
struct WakeFd {
    fd: std::os::fd::OwnedFd,
}

impl WakeFd {
    fn new() -> Result<WakeFd> {
        // SAFETY: eventfd takes no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::io(
                "unable to create an eventfd for the queue's helpers",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: `fd` is a new descriptor owned by nothing else.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(WakeFd { fd })
    }

    fn signal(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local to an eventfd we own. A blocking
        // eventfd blocks only at a counter of 2^64 - 2, which one write per request
        // cannot reach before the queue thread reads it.
        unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}

impl Queue {
    /// Map the descriptors, allocate the buffers, set up the ring. Runs on the thread
    /// that will serve the queue.
    pub fn new(spec: QueueSpec) -> Result<Queue> {
        let page = page_size();
        let dlen = (usize::from(spec.depth) * std::mem::size_of::<IoDesc>()).div_ceil(page) * page;
        let descs = Mapping::new(
            Some(&spec.cdev),
            dlen,
            abi::desc_mmap_offset(spec.q_id),
            &format!("the descriptors of ublk queue {}", spec.q_id),
        )?;
        // Pages are touched only as requests use them.
        let blen = usize::from(spec.depth) * spec.limits.max_io;
        let bufs = Mapping::new(None, blen, 0, "ublk request buffers")?;
        let ring = IoUring::new((u32::from(spec.depth) + 1).next_power_of_two())
            .map_err(|e| Error::io("unable to set up an io_uring for a ublk queue", e))?;
        Ok(Queue {
            spec,
            descs,
            bufs,
            ring: Some(ring),
        })
    }

    fn buf_addr(&self, tag: u16) -> u64 {
        self.bufs.ptr as u64 + u64::from(tag) * self.spec.limits.max_io as u64
    }

    fn push(&mut self, op: u32, tag: u16, result: i32) -> Result<()> {
        let cmd = IoCmd {
            q_id: self.spec.q_id,
            tag,
            result,
            addr: self.buf_addr(tag),
        };
        let e = opcode::UringCmd16::new(types::Fd(self.spec.cdev.as_raw_fd()), op)
            .cmd(cmd.to_bytes())
            .build()
            .user_data(u64::from(tag));
        let Some(ring) = self.ring.as_mut() else {
            return Err(cowsnap_core::err!(Io, "ublk queue ring is closed"));
        };
        // SAFETY: the command names the char device (open for the queue's life) and
        // the tag's buffer inside `self.bufs`, which is unmapped only after the ring
        // is dropped (`run` drops it first), so the kernel never writes freed memory.
        unsafe { ring.submission().push(&e) }
            .map_err(|_| cowsnap_core::err!(Io, "ublk queue ring is full"))
    }

    /// Fetch on every tag (submitted; START_DEV waits for these).
    pub fn fetch_all(&mut self) -> Result<()> {
        for tag in 0..self.spec.depth {
            self.push(self.spec.enc.io(abi::io::FETCH_REQ), tag, 0)?;
        }
        match self.ring.as_mut() {
            Some(r) => r
                .submit()
                .map(|_| ())
                .map_err(|e| Error::io("unable to submit ublk fetches", e)),
            None => Ok(()),
        }
    }

    fn desc(&self, tag: u16) -> IoDesc {
        let p = self.descs.ptr as *const IoDesc;
        // SAFETY: tag < depth, and the mapping holds `depth` descriptors; the driver
        // wrote this one before completing the tag's fetch (the completion orders it),
        // and does not touch it again until the tag is committed. Volatile: shared
        // memory written by the kernel.
        unsafe { std::ptr::read_volatile(p.add(usize::from(tag))) }
    }

    fn buf(&mut self, tag: u16) -> &mut [u8] {
        let max = self.spec.limits.max_io;
        // SAFETY: the slice is the tag's own region of the buffer mapping, in bounds
        // (tag < depth), and no other reference to it exists: the kernel copies in or
        // out of it only while the tag's command is outstanding, not while we serve.
        unsafe {
            std::slice::from_raw_parts_mut(
                (self.bufs.ptr as *mut u8).add(usize::from(tag) * max),
                max,
            )
        }
    }

    /// Serve until every tag is retired. Returns how many requests were served.
    ///
    /// A lone request is served on this thread (no hand-over for QD1), and so is every
    /// request but a read of [`HAND_OVER_BYTES`] or more. Such reads, when several
    /// requests are waiting, go to the helper threads ([`HELPERS`] by default), so one
    /// queue serves them concurrently (the block layer sends all of one submitting
    /// CPU's requests to one queue: served one after another, 1 MiB reads at QD8 ran at
    /// 0.27× a loop device in the VM benchmark). The driver takes a queue's commands
    /// only from the thread that fetched, so helpers do not commit: each sends its
    /// result back and writes an eventfd, whose read on this thread's ring wakes it to
    /// commit.
    pub fn run(mut self, export: &dyn Export) -> u64 {
        if self.spec.helpers == 0 {
            return self.serve(export, None);
        }
        let wake = match WakeFd::new() {
            Ok(w) => w,
            Err(e) => {
                log::warn!(
                    "ublk queue {}: {e}; serving its requests one at a time",
                    self.spec.q_id
                );
                return self.serve(export, None);
            }
        };
        let depth = usize::from(self.spec.depth);
        let lim = self.spec.limits;
        let (job_tx, job_rx) = crossbeam_channel::bounded::<Job>(depth);
        let (done_tx, done_rx) = crossbeam_channel::bounded::<(u16, i32)>(depth);
        std::thread::scope(|s| {
            let mut started = 0;
            for i in 0..usize::from(self.spec.helpers).min(depth) {
                let (rx, tx, wake) = (job_rx.clone(), done_tx.clone(), &wake);
                let h = std::thread::Builder::new()
                    .name(format!("ublk-q{}h{i}", self.spec.q_id))
                    .spawn_scoped(s, move || {
                        for job in rx {
                            // SAFETY: `job.buf` is the tag's own region of the buffer
                            // mapping (in bounds, `max_io` bytes), which outlives this
                            // scope; between the fetch that handed the tag over and the
                            // commit of the result sent below, nothing else touches it:
                            // the queue thread gave it away and the driver copies only
                            // while the tag's command is outstanding.
                            let buf =
                                unsafe { std::slice::from_raw_parts_mut(job.buf, lim.max_io) };
                            let r = dispatch::handle(export, &lim, &job.desc, buf);
                            if tx.send((job.tag, r)).is_err() {
                                break;
                            }
                            wake.signal();
                        }
                    });
                match h {
                    Ok(_) => started += 1,
                    Err(e) => log::warn!("ublk queue {}: helper thread: {e}", self.spec.q_id),
                }
            }
            drop(job_rx);
            drop(done_tx);
            let helpers = (started > 0).then_some(Helpers {
                jobs: job_tx,
                done: done_rx,
                wake: &wake,
            });
            // Dropping `helpers` at the end closes the job channel: the helpers end.
            self.serve(export, helpers)
        })
    }

    /// The loop of [`Queue::run`]; `helpers` None: every request on this thread.
    fn serve(&mut self, export: &dyn Export, helpers: Option<Helpers<'_>>) -> u64 {
        let mut live = usize::from(self.spec.depth);
        let mut served = 0u64;
        let mut away = 0usize; // requests with the helpers
        let lim = self.spec.limits;
        let mut wake_buf = Box::new(0u64);
        let mut armed = false;
        while live > 0 {
            if let Some(h) = &helpers {
                if !armed {
                    if let Err(e) = self.arm_wake(h.wake, &mut wake_buf) {
                        log::error!("ublk queue {}: {e}; stopping it", self.spec.q_id);
                        break;
                    }
                    armed = true;
                }
            }
            let waited = match self.ring.as_mut() {
                Some(r) => r.submit_and_wait(1),
                None => break,
            };
            match waited {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    log::error!("ublk queue {}: {e}; stopping it", self.spec.q_id);
                    break;
                }
            }
            let done: Vec<(u64, i32)> = match self.ring.as_mut() {
                Some(r) => r
                    .completion()
                    .map(|c| (c.user_data(), c.result()))
                    .collect(),
                None => break,
            };
            let mut ready = Vec::new();
            for (ud, res) in done {
                if ud == USER_DATA_WAKE {
                    // Re-armed at the top of the loop; a failed read (never seen) is
                    // said and tried again.
                    if res < 0 {
                        log::warn!("ublk queue {}: wake read: errno {}", self.spec.q_id, -res);
                    }
                    armed = false;
                    continue;
                }
                let tag = (ud & USER_DATA_TAG_MASK) as u16;
                if res != abi::res::OK {
                    if res != abi::res::ABORT {
                        log::warn!(
                            "ublk queue {} tag {tag}: fetch ended with errno {}",
                            self.spec.q_id,
                            -res
                        );
                    }
                    live -= 1;
                    continue;
                }
                ready.push(tag);
            }
            let mut results = Vec::new();
            let many = ready.len() > 1 || away > 0;
            for tag in ready {
                let d = self.desc(tag);
                let big_read =
                    d.op() == abi::op::READ && u64::from(d.nr_sectors) * 512 >= HAND_OVER_BYTES;
                if let (Some(h), true, true) = (&helpers, many, big_read) {
                    let job = Job {
                        tag,
                        desc: d,
                        buf: self.buf(tag).as_mut_ptr(),
                    };
                    // Bounded by the depth: never more jobs than tags.
                    if h.jobs.send(job).is_ok() {
                        away += 1;
                        continue;
                    }
                }
                results.push((tag, dispatch::handle(export, &lim, &d, self.buf(tag))));
            }
            if let Some(h) = &helpers {
                while let Ok(r) = h.done.try_recv() {
                    away -= 1;
                    results.push(r);
                }
            }
            for (tag, result) in results {
                served += 1;
                let op = self.spec.enc.io(abi::io::COMMIT_AND_FETCH_REQ);
                if let Err(e) = self.push(op, tag, result) {
                    log::error!("ublk queue {}: {e}", self.spec.q_id);
                    live -= 1;
                }
            }
        }
        // The ring first: closing it cancels what is outstanding (the wake read too),
        // before the buffers (and `wake_buf`) go.
        self.ring = None;
        drop(wake_buf);
        served
    }

    /// Queue a read of the wake eventfd into `buf` (completes when a helper signals).
    fn arm_wake(&mut self, wake: &WakeFd, buf: &mut u64) -> Result<()> {
        let e = opcode::Read::new(
            types::Fd(wake.fd.as_raw_fd()),
            buf as *mut u64 as *mut u8,
            8,
        )
        .build()
        .user_data(USER_DATA_WAKE);
        let Some(ring) = self.ring.as_mut() else {
            return Err(cowsnap_core::err!(Io, "ublk queue ring is closed"));
        };
        // SAFETY: the read names the eventfd (alive for the whole loop) and `buf`, a
        // heap cell the loop keeps until after the ring is dropped, which cancels the
        // read if it is still outstanding.
        unsafe { ring.submission().push(&e) }
            .map_err(|_| cowsnap_core::err!(Io, "ublk queue ring is full"))
    }
}
