//! The transmission phase of one connection.
//!
//! Design notes
//! - A connection is served by a small set of symmetric worker threads (nbdkit's
//!   model). A worker takes the reader lock, reads one request header (and, for WRITE,
//!   its payload), releases the lock, executes the request and sends the reply under the
//!   writer lock. So up to `threads` requests are in flight per connection, replies go
//!   out in completion order (the client matches them by cookie), and there is no
//!   hand-off between a reader thread and a pool on the hot path.
//! - Each worker owns one data buffer, grown on demand and reused for every request;
//!   a buffer that grew past [`KEEP_BUF`] is released after the request.
//! - Every request is validated once here ([`proto::validate`]) before the export sees
//!   it. A refused WRITE still has its payload consumed so the stream stays in step.
//! - A bad request magic or a read error ends the connection: no new requests are read,
//!   requests in flight finish and are answered (nothing acknowledged is dropped), then
//!   the socket closes. NBD_CMD_DISC ends it the same way.
//! - Replies: READ answers with one OFFSET_DATA chunk when structured replies are on
//!   (which also satisfies DF), errors on READ and BLOCK_STATUS as an ERROR chunk, every
//!   other command with a simple reply. Small replies are queued and written in batches
//!   by whichever worker finds the queue idle ([`Out`], a group commit); large ones go
//!   out directly, header and data in one writev.

use super::handshake::Session;
use super::proto::{self, *};
use super::stream::Stream;
use cowsnap_core::export::{Export, ZeroFlags};
use std::io::{self, BufReader, Read};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A worker's buffer is given back to the allocator after a request if it grew past
/// this size (big requests are rare; keep the steady state small).
const KEEP_BUF: usize = 4 << 20;
/// Size of the buffered reader on the socket (amortises header reads); the caller
/// creates the reader with it before the handshake so no byte is lost in between.
pub const READ_BUF: usize = 256 << 10;

struct Conn {
    reader: Mutex<BufReader<Stream>>,
    out: Out,
    closing: AtomicBool,
    export: Arc<dyn Export>,
    view: ExportView,
    id: u64,
}

/// What a worker took off the wire.
enum Job {
    /// Reply this error right away (the request was refused at the edge).
    Refuse(Request, u32),
    /// Execute it (a WRITE's payload is in the worker's buffer).
    Run(Request),
}

/// Serve the transmission phase until the client disconnects or misbehaves. Returns
/// when every in-flight request has been answered.
pub fn serve(
    id: u64,
    session: Session,
    reader: BufReader<Stream>,
    writer: Stream,
    threads: usize,
) -> io::Result<()> {
    let export = session.entry.export.clone();
    let view = ExportView {
        size: export.size(),
        tflags: session.tflags,
        structured: session.structured,
        base_allocation: session.base_allocation,
    };
    let conn = Arc::new(Conn {
        reader: Mutex::new(reader),
        out: Out::new(writer)?,
        closing: AtomicBool::new(false),
        export,
        view,
        id,
    });
    let mut hs = Vec::new();
    for i in 1..threads.max(1) {
        let c = conn.clone();
        let h = std::thread::Builder::new()
            .name(format!("nbd{id}-w{i}"))
            .spawn(move || worker(&c))?;
        hs.push(h);
    }
    worker(&conn);
    for h in hs {
        let _ = h.join();
    }
    let _ = conn.out.ctl.shutdown(Shutdown::Both);
    Ok(())
}

/// Replies larger than this are written directly; smaller ones are queued and sent in
/// batches.
const COALESCE_MAX: usize = 64 << 10;
/// A queue this full makes new replies wait for the socket (back-pressure on a client
/// that does not read its replies).
const QUEUE_MAX: usize = 8 << 20;

/// The reply side of a connection: group commit of small replies.
///
/// A worker appends its reply to the queue; if nobody is flushing, it becomes the
/// flusher and writes the queue to the socket, again and again until it finds the queue
/// empty (checked under the queue lock, so no reply is left behind). Workers that find a
/// flusher at work return at once and go on reading requests; under load many replies
/// leave in one syscall. Large replies (and any reply while the queue is over
/// [`QUEUE_MAX`]) are written directly; the socket lock keeps every reply contiguous.
struct Out {
    queue: Mutex<Queue>,
    sock: Mutex<Stream>,
    /// A handle for shutdown that never waits behind a blocked write.
    ctl: Stream,
}

#[derive(Default)]
struct Queue {
    bytes: Vec<u8>,
    spare: Vec<u8>,
    flushing: bool,
}

fn poisoned() -> io::Error {
    io::Error::other("reply lock poisoned")
}

impl Out {
    fn new(s: Stream) -> io::Result<Out> {
        Ok(Out {
            queue: Mutex::new(Queue::default()),
            ctl: s.try_clone()?,
            sock: Mutex::new(s),
        })
    }

    /// Send one reply: `head` then `data`, contiguous on the wire.
    fn send(&self, head: &[u8], data: &[u8]) -> io::Result<()> {
        if head.len() + data.len() <= COALESCE_MAX {
            let mut q = self.queue.lock().map_err(|_| poisoned())?;
            if q.bytes.len() < QUEUE_MAX {
                q.bytes.extend_from_slice(head);
                q.bytes.extend_from_slice(data);
                if q.flushing {
                    return Ok(());
                }
                q.flushing = true;
                drop(q);
                return self.flush_queue();
            }
        }
        let mut s = self.sock.lock().map_err(|_| poisoned())?;
        s.write_two(head, data)
    }

    fn flush_queue(&self) -> io::Result<()> {
        let mut batch = {
            let mut q = self.queue.lock().map_err(|_| poisoned())?;
            std::mem::take(&mut q.spare)
        };
        loop {
            {
                let mut q = self.queue.lock().map_err(|_| poisoned())?;
                if q.bytes.is_empty() {
                    q.flushing = false;
                    batch.clear();
                    if batch.capacity() <= 2 * QUEUE_MAX {
                        q.spare = batch;
                    }
                    return Ok(());
                }
                std::mem::swap(&mut q.bytes, &mut batch);
            }
            let r = match self.sock.lock() {
                Ok(mut s) => s.write_two(&batch, &[]),
                Err(_) => Err(poisoned()),
            };
            batch.clear();
            if let Err(e) = r {
                // The connection is lost: drop what is queued and let others see it.
                if let Ok(mut q) = self.queue.lock() {
                    q.flushing = false;
                    q.bytes.clear();
                }
                return Err(e);
            }
        }
    }
}

fn worker(c: &Conn) {
    let mut buf: Vec<u8> = Vec::new();
    while let Some(job) = next_job(c, &mut buf) {
        let ok = match job {
            Job::Refuse(r, err) => reply_error(c, &r, err, "request refused"),
            Job::Run(r) => execute(c, &r, &mut buf),
        };
        if buf.capacity() > KEEP_BUF {
            buf = Vec::new();
        }
        if let Err(e) = ok {
            log::debug!("nbd connection {}: unable to send a reply: {e}", c.id);
            stop(c);
            break;
        }
    }
}

fn stop(c: &Conn) {
    c.closing.store(true, Ordering::SeqCst);
    let _ = c.out.ctl.shutdown(Shutdown::Read);
}

fn ensure_len(buf: &mut Vec<u8>, n: usize) {
    if buf.len() < n {
        buf.resize(n, 0);
    }
}

/// Read the next request under the reader lock. `None`: no more requests.
fn next_job(c: &Conn, buf: &mut Vec<u8>) -> Option<Job> {
    let mut rd = c.reader.lock().ok()?;
    if c.closing.load(Ordering::SeqCst) {
        return None;
    }
    let mut hb = [0u8; REQUEST_LEN];
    if let Err(e) = rd.read_exact(&mut hb) {
        if e.kind() != io::ErrorKind::UnexpectedEof {
            log::debug!("nbd connection {}: read failed: {e}", c.id);
        }
        c.closing.store(true, Ordering::SeqCst);
        return None;
    }
    let r = match parse_request(&hb) {
        Ok(r) => r,
        Err(e) => {
            log::warn!("nbd connection {}: {e}; closing the connection", c.id);
            c.closing.store(true, Ordering::SeqCst);
            return None;
        }
    };
    if r.cmd == CMD_DISC {
        c.closing.store(true, Ordering::SeqCst);
        return None;
    }
    let verdict = validate(&r, &c.view);
    if let Err(e) = verdict {
        log::debug!(
            "nbd connection {}: refused command {} flags {:#x} offset {} length {}: errno {e}",
            c.id,
            r.cmd,
            r.flags,
            r.offset,
            r.len
        );
    }
    if r.cmd == CMD_WRITE {
        let res = match verdict {
            Ok(()) => {
                let n = r.len as usize;
                ensure_len(buf, n);
                rd.read_exact(&mut buf[..n])
            }
            Err(_) => discard(&mut *rd, r.len as u64),
        };
        if let Err(e) = res {
            log::debug!("nbd connection {}: write payload cut short: {e}", c.id);
            c.closing.store(true, Ordering::SeqCst);
            return None;
        }
    }
    drop(rd);
    Some(match verdict {
        Ok(()) => Job::Run(r),
        Err(e) => Job::Refuse(r, e),
    })
}

fn discard(r: &mut impl Read, mut n: u64) -> io::Result<()> {
    let mut scratch = [0u8; 16384];
    while n > 0 {
        let k = (n as usize).min(scratch.len());
        r.read_exact(&mut scratch[..k])?;
        n -= k as u64;
    }
    Ok(())
}

fn send_simple(c: &Conn, cookie: u64, err: u32) -> io::Result<()> {
    c.out.send(&simple_reply(err, cookie), &[])
}

fn reply_error(c: &Conn, r: &Request, err: u32, msg: &str) -> io::Result<()> {
    if c.view.structured && matches!(r.cmd, CMD_READ | CMD_BLOCK_STATUS) {
        c.out.send(&error_chunk(r.cookie, err, msg), &[])
    } else {
        send_simple(c, r.cookie, err)
    }
}

/// NBD_CMD_CACHE: read the range through the export (into the worker's buffer, in
/// pieces) so that it is in the page cache when the client asks for it.
fn cache(e: &dyn Export, mut off: u64, len: u64, buf: &mut Vec<u8>) -> cowsnap_core::Result<()> {
    const PIECE: u64 = 1 << 20;
    let end = off + len;
    while off < end {
        let n = (end - off).min(PIECE) as usize;
        ensure_len(buf, n);
        e.read(off, &mut buf[..n])?;
        off += n as u64;
    }
    Ok(())
}

fn execute(c: &Conn, r: &Request, buf: &mut Vec<u8>) -> io::Result<()> {
    let e = &c.export;
    let fua = r.flags & CMD_FLAG_FUA != 0;
    let result = match r.cmd {
        CMD_READ => {
            let n = r.len as usize;
            ensure_len(buf, n);
            match e.read(r.offset, &mut buf[..n]) {
                Ok(()) => {
                    return if c.view.structured {
                        c.out
                            .send(&offset_data_header(r.cookie, r.offset, r.len), &buf[..n])
                    } else {
                        c.out.send(&simple_reply(0, r.cookie), &buf[..n])
                    };
                }
                Err(err) => Err(err),
            }
        }
        CMD_CACHE => cache(e.as_ref(), r.offset, r.len as u64, buf),
        CMD_WRITE => e.write(r.offset, &buf[..r.len as usize], fua),
        CMD_FLUSH => e.flush(),
        CMD_TRIM => e.trim(r.offset, r.len as u64, fua),
        CMD_WRITE_ZEROES => e.zero(
            r.offset,
            r.len as u64,
            ZeroFlags {
                no_hole: r.flags & CMD_FLAG_NO_HOLE != 0,
                fast: r.flags & CMD_FLAG_FAST_ZERO != 0,
                fua,
            },
        ),
        CMD_BLOCK_STATUS => match e.block_status(r.offset, r.len as u64) {
            Ok(ext) => {
                let d = descriptors(&ext, r.len, r.flags & CMD_FLAG_REQ_ONE != 0);
                if d.is_empty() {
                    return reply_error(c, r, EIO, "no extents for the range");
                }
                let chunk = block_status_chunk(r.cookie, BASE_ALLOCATION_ID, &d);
                return c.out.send(&chunk, &[]);
            }
            Err(err) => Err(err),
        },
        // validate() refuses every other command.
        _ => return reply_error(c, r, EINVAL, "unknown command"),
    };
    match result {
        Ok(()) => send_simple(c, r.cookie, 0),
        Err(err) => {
            let code = proto::errno_of(&err);
            if code != ENOTSUP {
                log::warn!("nbd connection {}: {err}", c.id);
            }
            reply_error(c, r, code, &err.to_string())
        }
    }
}
