//! FUSE over io_uring (Linux 6.14+, `CONFIG_FUSE_IO_URING`, `enable_uring=Y`): the
//! kernel hands requests to ring entries the server registered, and takes the reply
//! and the next request in one `IORING_OP_URING_CMD` — no `read()`/`write()` on
//! `/dev/fuse` per request. The requests are answered by the same handlers as on
//! `/dev/fuse` (`super::handle`, `super::read_into`).
//!
//! Protocol (`include/uapi/linux/fuse.h`, `fs/fuse/dev_uring.c`): INIT (still over
//! `/dev/fuse`) negotiates 7.42 with `FUSE_OVER_IO_URING`; then each entry is an SQE128
//! `URING_CMD` on a `/dev/fuse` descriptor with `cmd_op` REGISTER, two iovecs (`struct
//! fuse_uring_req_header`: in/out header, op header, `fuse_uring_ent_in_out`; and a
//! payload buffer of at least `max_write` = 1 MiB) and `struct fuse_uring_cmd_req`
//! (`qid`) in the command area. The command completes when a request is in the
//! buffers; the answer goes back with COMMIT_AND_FETCH (`qid`, `commit_id` from
//! `fuse_uring_ent_in_out`): out header in the header buffer, the reply's arguments in
//! the payload buffer, their size in `payload_sz`. FORGET and INTERRUPT still come
//! over `/dev/fuse`, so one `/dev/fuse` reader stays.
//!
//! Queues and threads: the kernel has one queue per possible CPU and sends a request
//! to the queue of the CPU its caller runs on; it switches to the rings only once
//! every queue has an entry. [`plan`] gives each queue `threads / queues` threads (at
//! least one), each with its own ring and one entry: a thread answers one request at
//! a time, as a `/dev/fuse` worker does, so the queue depth of a queue is its thread
//! count, the memory is threads × (1 MiB + 288 bytes), and requests in flight are
//! bounded by `--fuse-threads`. With more possible CPUs than `MAX_THREADS`, a thread
//! holds one entry on each of several queues. Each ring is `SINGLE_ISSUER |
//! DEFER_TASKRUN`, created disabled and enabled by its thread, so the kernel's task
//! work (copying a request into the buffers) runs when that thread waits instead of
//! interrupting it. Threads are not pinned to their
//! queue's CPU: on a loaded machine a pinned thread would wait for its CPU while
//! another is idle.
//!
//! Teardown: unmounting (or the daemon's death) aborts the connection; the kernel
//! completes every registered command with an error (`ENOTCONN`), and a thread
//! ends when none of its entries is registered. The buffers of a thread that ended
//! while the connection lived (an unexpected error) are leaked, never freed under
//! the kernel.

use super::abi::{self, op, ring, InHeader};
use super::{handle, read_into, Handled, Shared, MAX_IO, MAX_THREADS, OUT_HEADER};
use cowsnap_core::error::{Error, Result};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::fs::File;
use std::os::fd::AsRawFd;

/// Possible CPUs (`/sys/devices/system/cpu/possible`): the kernel's queue count.
pub fn possible_cpus() -> Result<usize> {
    let p = "/sys/devices/system/cpu/possible";
    let s = std::fs::read_to_string(p).map_err(|e| Error::io(format!("unable to read {p}"), e))?;
    parse_cpu_list(&s)
        .filter(|&n| n <= usize::from(u16::MAX))
        .ok_or_else(|| cowsnap_core::err!(Io, "unable to parse {p}: {:?}", s.trim()))
}

/// The number of CPUs a list such as `0-1` or `0,2-5` covers (highest + 1).
pub fn parse_cpu_list(s: &str) -> Option<usize> {
    let mut top = None;
    for part in s.trim().split(',') {
        let last = part.rsplit('-').next()?.trim().parse::<usize>().ok()?;
        top = Some(top.map_or(last, |t: usize| t.max(last)));
    }
    top.map(|t| t + 1)
}

/// Which queues each thread holds one entry on: `threads / queues` threads per queue
/// (at least one); with more queues than `MAX_THREADS`, `MAX_THREADS` threads share
/// them round-robin.
pub fn plan(queues: usize, threads: usize) -> Vec<Vec<u16>> {
    let queues = queues.max(1);
    let n = if queues > MAX_THREADS {
        MAX_THREADS
    } else {
        (threads / queues).max(1) * queues
    };
    let mut v = vec![Vec::new(); n];
    for j in 0..n.max(queues) {
        v[j % n].push((j % queues) as u16);
    }
    v
}

/// One ring entry's buffers (kept at fixed addresses: the kernel holds them).
struct Ent {
    qid: u16,
    hdr: Box<[u8; ring::REQ_HEADER]>,
    payload: Box<[u8]>,
    registered: bool,
}

/// A thread's ring and its entries.
pub struct QueueThread {
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    ents: Vec<Ent>,
}

/// Set the SQE's `len` field (the crate's `UringCmd80` does not expose it; FUSE
/// reads the iovec count there).
fn with_len(e: squeue::Entry128, len: u32) -> squeue::Entry128 {
    // SAFETY: `Entry128` is `#[repr(C)]` of the 64-byte `io_uring_sqe` and 64 bytes
    // of command, plain data without padding or invalid bit patterns, 128 bytes
    // (transmute checks the size); `len` is the u32 at offset 24 of the SQE.
    let mut b: [u8; 128] = unsafe { std::mem::transmute::<squeue::Entry128, [u8; 128]>(e) };
    b[24..28].copy_from_slice(&len.to_ne_bytes());
    // SAFETY: as above, every 128-byte pattern is a valid `Entry128`.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(b) }
}

fn gone(errno: i32) -> bool {
    matches!(
        errno,
        libc::ENOTCONN | libc::ECANCELED | libc::ENODEV | libc::ECONNABORTED
    )
}

impl QueueThread {
    /// Buffers and a ring for one entry on each queue of `qids`.
    pub fn new(qids: Vec<u16>) -> Result<QueueThread> {
        let size = (qids.len() as u32).next_power_of_two().max(2);
        // Created disabled and enabled by the thread that uses it: one issuer, and the
        // kernel's task work (copying a request into the buffers) runs only when that
        // thread waits for completions, without interrupting it (DEFER_TASKRUN).
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .setup_r_disabled()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(size)
            .map_err(|e| Error::io("unable to create an io_uring for FUSE", e))?;
        let mut ents = Vec::with_capacity(qids.len());
        for qid in qids {
            ents.push(Ent {
                qid,
                hdr: Box::new([0u8; ring::REQ_HEADER]),
                payload: vec![0u8; MAX_IO].into_boxed_slice(),
                registered: false,
            });
        }
        Ok(QueueThread { ring, ents })
    }

    fn push(&mut self, sqe: squeue::Entry128) -> bool {
        // SAFETY: the SQE points at the iovecs and buffers of an entry of `self`,
        // which stay allocated (at the same addresses: boxed) for as long as the
        // kernel may use them — they are leaked if the thread ends while the
        // connection lives (see `run`).
        unsafe { self.ring.submission().push(&sqe) }.is_ok()
    }

    /// Register the entries and serve requests until the connection ends.
    pub(super) fn run(self, sh: &Shared, fd: &File) {
        let mut served = 0u64;
        self.serve(sh, fd, &mut served);
        sh.served_uring
            .fetch_add(served, std::sync::atomic::Ordering::Relaxed);
    }

    fn serve(mut self, sh: &Shared, fd: &File, served: &mut u64) {
        if let Err(e) = self.ring.submitter().register_enable_rings() {
            log::error!("FUSE: unable to enable an io_uring: {e}");
            return;
        }
        let fd = types::Fd(fd.as_raw_fd());
        // The iovecs of each entry (header, payload), read by the kernel when it takes
        // the REGISTER command; kept until the thread ends.
        let iovs: Vec<[libc::iovec; 2]> = self
            .ents
            .iter_mut()
            .map(|e| {
                [
                    libc::iovec {
                        iov_base: e.hdr.as_mut_ptr().cast(),
                        iov_len: ring::REQ_HEADER,
                    },
                    libc::iovec {
                        iov_base: e.payload.as_mut_ptr().cast(),
                        iov_len: e.payload.len(),
                    },
                ]
            })
            .collect();
        for (i, iov) in iovs.iter().enumerate() {
            let sqe = opcode::UringCmd80::new(fd, ring::CMD_REGISTER)
                .cmd(ring::cmd_req(self.ents[i].qid, 0))
                .addr(Some(iov.as_ptr() as u64))
                .build();
            let sqe = with_len(sqe, ring::IOV_SEGS).user_data(i as u64);
            if !self.push(sqe) {
                log::error!("FUSE: io_uring submission queue full at registration");
                std::mem::forget(iovs);
                return self.leak();
            }
            self.ents[i].registered = true;
        }
        let mut rep: Vec<u8> = Vec::with_capacity(OUT_HEADER + 64 * 1024);
        let mut done: Vec<(u64, i32)> = Vec::with_capacity(self.ents.len());
        let mut ended = false;
        while self.ents.iter().any(|e| e.registered) {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    log::error!("FUSE: io_uring wait failed: {e}");
                    std::mem::forget(iovs);
                    return self.leak();
                }
            }
            done.clear();
            done.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for &(i, res) in &done {
                let Some(ent) = self.ents.get_mut(i as usize) else {
                    continue;
                };
                if res < 0 {
                    ent.registered = false;
                    if gone(-res) {
                        ended = true;
                    } else {
                        log::error!(
                            "FUSE: io_uring queue {}: {}",
                            ent.qid,
                            std::io::Error::from_raw_os_error(-res)
                        );
                    }
                    continue;
                }
                *served += 1;
                let commit_id = serve(sh, ent, &mut rep);
                let sqe = opcode::UringCmd80::new(fd, ring::CMD_COMMIT_AND_FETCH)
                    .cmd(ring::cmd_req(ent.qid, commit_id))
                    .build()
                    .user_data(i);
                if !self.push(sqe) {
                    // cannot happen: one SQE per entry, the queue holds them all
                    log::error!("FUSE: io_uring submission queue full");
                    std::mem::forget(iovs);
                    return self.leak();
                }
            }
        }
        if !ended {
            std::mem::forget(iovs);
            return self.leak();
        }
        drop(iovs);
    }

    /// End without freeing the buffers the kernel may still hold.
    fn leak(self) {
        let QueueThread { ring, ents } = self;
        drop(ring);
        std::mem::forget(ents);
    }
}

/// Answer the request in `ent`'s buffers; leaves the reply there and returns the
/// commit id.
fn serve(sh: &Shared, ent: &mut Ent, rep: &mut Vec<u8>) -> u64 {
    let io = ring::EntInOut::parse(&ent.hdr[..]).unwrap_or(ring::EntInOut {
        commit_id: 0,
        payload_sz: 0,
    });
    let Some(h) = InHeader::parse_fields(&ent.hdr[..ring::IN_OUT_HEADER]) else {
        return io.commit_id; // cannot happen: the buffer is whole
    };
    let arg = &ent.hdr[ring::OP_IN_AT..ring::OP_IN_AT + ring::OP_IN_OUT];
    let psz = (io.payload_sz as usize).min(ent.payload.len());
    let (err, n) = if h.opcode == op::READ {
        // read straight into the payload buffer
        match read_into(sh, &h, arg, &mut ent.payload[..]) {
            Ok(n) => (0, n),
            Err(e) => (-e, 0),
        }
    } else {
        rep.clear();
        rep.resize(OUT_HEADER, 0);
        match handle(sh, &h, arg, &ent.payload[..psz], rep) {
            Handled::Reply => {
                let body = &rep[OUT_HEADER..];
                let n = body.len().min(ent.payload.len());
                ent.payload[..n].copy_from_slice(&body[..n]);
                (0, n)
            }
            Handled::Error(e) => (-e, 0),
            // FORGET and INTERRUPT do not come over the ring; DESTROY needs no body
            Handled::NoReply | Handled::Destroy => (0, 0),
        }
    };
    abi::out_header(h.unique, err, n, &mut ent.hdr[..OUT_HEADER]);
    ring::set_payload_sz(&mut ent.hdr[..], n as u32);
    io.commit_id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-1\n"), Some(2));
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("0,2-5"), Some(6));
        assert_eq!(parse_cpu_list("x"), None);
        assert_eq!(parse_cpu_list(""), None);
    }

    #[test]
    fn plan_covers_every_queue_within_the_thread_bound() {
        assert_eq!(
            plan(2, 8),
            vec![
                vec![0],
                vec![1],
                vec![0],
                vec![1],
                vec![0],
                vec![1],
                vec![0],
                vec![1]
            ]
        );
        assert_eq!(plan(2, 1), vec![vec![0], vec![1]]);
        assert_eq!(plan(4, 6), vec![vec![0], vec![1], vec![2], vec![3]]);
        let p = plan(70, 8);
        assert_eq!(p.len(), MAX_THREADS);
        let mut all: Vec<u16> = p.concat();
        all.sort();
        assert_eq!(all, (0..70).collect::<Vec<u16>>());
    }

    #[test]
    fn register_sqe_layout() {
        let hdr = [0u8; ring::REQ_HEADER];
        let sqe = opcode::UringCmd80::new(types::Fd(7), ring::CMD_REGISTER)
            .cmd(ring::cmd_req(1, 0))
            .addr(Some(0x1000))
            .build();
        let sqe = with_len(sqe, ring::IOV_SEGS).user_data(5);
        // SAFETY: as in `with_len`: 128 bytes of plain data.
        let b: [u8; 128] = unsafe { std::mem::transmute::<squeue::Entry128, [u8; 128]>(sqe) };
        assert_eq!(b[0], 46); // IORING_OP_URING_CMD
        assert_eq!(&b[4..8], &7i32.to_ne_bytes()); // fd
        assert_eq!(&b[8..12], &ring::CMD_REGISTER.to_ne_bytes()); // cmd_op
        assert_eq!(&b[16..24], &0x1000u64.to_ne_bytes()); // addr: the iovecs
        assert_eq!(&b[24..28], &2u32.to_ne_bytes()); // len: FUSE_URING_IOV_SEGS
        assert_eq!(&b[32..40], &5u64.to_ne_bytes()); // user_data
        assert_eq!(&b[48..128], &ring::cmd_req(1, 0)); // struct fuse_uring_cmd_req
        assert_eq!(hdr.len(), 288);
    }
}
