//! One ublk queue: a thread with its own io_uring (the driver takes a queue's
//! commands only from the task that fetched on it), the queue's descriptor array
//! mapped read-only from `/dev/ublkcN`, and one buffer of `max_io` bytes per tag.
//!
//! Loop: FETCH_REQ every tag; when a fetch completes with `UBLK_IO_RES_OK`, the tag's
//! descriptor holds a request: serve it ([`super::dispatch`]; a WRITE's data is
//! already in the tag's buffer, a READ's is put there) and submit
//! COMMIT_AND_FETCH_REQ with the result, which completes the request and waits for
//! the next. A completion with `UBLK_IO_RES_ABORT` (STOP_DEV, or the device going
//! away) retires the tag; the thread ends when every tag is retired. Requests of one
//! queue are served one after another; queues run in parallel.
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
        let ring = IoUring::new(u32::from(spec.depth).next_power_of_two())
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
    pub fn run(mut self, export: &dyn Export) -> u64 {
        let mut live = usize::from(self.spec.depth);
        let mut served = 0u64;
        let lim = self.spec.limits;
        while live > 0 {
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
            let done: Vec<(u16, i32)> = match self.ring.as_mut() {
                Some(r) => r
                    .completion()
                    .map(|c| ((c.user_data() & USER_DATA_TAG_MASK) as u16, c.result()))
                    .collect(),
                None => break,
            };
            for (tag, res) in done {
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
                let d = self.desc(tag);
                let result = dispatch::handle(export, &lim, &d, self.buf(tag));
                served += 1;
                let op = self.spec.enc.io(abi::io::COMMIT_AND_FETCH_REQ);
                if let Err(e) = self.push(op, tag, result) {
                    log::error!("ublk queue {}: {e}", self.spec.q_id);
                    live -= 1;
                }
            }
        }
        // The ring first: closing it cancels what is outstanding, before the buffers go.
        self.ring = None;
        served
    }
}
