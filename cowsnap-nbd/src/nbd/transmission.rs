//! The transmission phase of one connection.
//!
//! Design notes
//! - A connection is served by symmetric worker threads (nbdkit's model): a worker
//!   takes the reader turn, reads one request header (and, for WRITE, its payload),
//!   hands the turn on, executes the request and sends the reply. So several requests
//!   are in flight per connection, replies go out in completion order (the client
//!   matches them by cookie), and there is no hand-off between a reader thread and a
//!   pool on the hot path.
//! - The reader turn is a mutex around the buffered socket (a quick hand-off: waiters
//!   spin briefly before sleeping). Workers are started on demand (see
//!   [`super::limits`]): the connection's own thread is the first; a worker that has
//!   read a request and finds nobody waiting for the turn starts another, up to the
//!   per-connection and server-wide limits. The socket has a read timeout of
//!   [`IDLE_WORKER`]: when it expires before a request starts, the connection is idle
//!   and its extra workers leave (a timeout inside a request just goes on waiting, so
//!   no request is cut). An idle connection costs one thread.
//! - Every payload buffer is leased from the server's budget *before* it exists
//!   (per connection, then server-wide) and goes back after the reply is written. The
//!   reader waits for the lease while holding the turn, so a client that does not read
//!   its replies stops being read once its requests hold its share.
//! - Every request is validated once here ([`proto::validate`]) before the export sees
//!   it. A refused WRITE (or one whose buffer could not be allocated: ENOMEM) still has
//!   its payload consumed so the stream stays in step.
//! - A bad request magic or a read error ends the connection: no new requests are read,
//!   requests in flight finish and are answered (nothing acknowledged is dropped), then
//!   the socket closes. NBD_CMD_DISC ends it the same way.
//! - Replies: READ answers with one OFFSET_DATA chunk when structured replies are on
//!   (which also satisfies DF), errors on READ and BLOCK_STATUS as an ERROR chunk, every
//!   other command with a simple reply. Small replies are queued (at most [`QUEUE_MAX`]
//!   bytes) and written in batches by whichever worker finds the queue idle ([`Out`], a
//!   group commit); large ones go out directly, header and data in one writev.

use super::handshake::Session;
use super::limits::{class_of, ConnMemory, LeaseError, Shared, IDLE_WORKER};
use super::proto::{self, *};
use super::stream::Stream;
use cowsnap_core::export::{Export, ZeroFlags};
use std::io::{self, BufReader, Read};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// Size of the buffered reader on the socket (amortises header reads); the caller
/// creates the reader with it before the handshake so no byte is lost in between.
pub const READ_BUF: usize = 256 << 10;
/// CACHE reads the range through a buffer of this size.
const CACHE_PIECE: usize = 1 << 20;

struct Conn {
    /// The reader turn: the worker holding it reads the next request.
    reader: Mutex<BufReader<Stream>>,
    /// Workers waiting for the reader turn.
    waiting: AtomicUsize,
    /// Worker threads alive, the connection's own included.
    workers: AtomicUsize,
    /// Extra workers should leave (the connection was idle for [`IDLE_WORKER`]).
    retire: AtomicBool,
    /// Signalled when a worker leaves.
    gone: (Mutex<()>, Condvar),
    out: Out,
    closing: AtomicBool,
    export: Arc<dyn Export>,
    view: ExportView,
    /// `base:allocation` selected.
    base_allocation: bool,
    /// The export's dirty bitmap selected.
    dirty_bitmap: bool,
    id: u64,
    shared: Arc<Shared>,
    mem: ConnMemory,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A payload buffer leased from the budgets; given back when dropped.
struct Lease<'a> {
    c: &'a Conn,
    buf: Vec<u8>,
    class: usize,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.c.shared.budget.give(std::mem::take(&mut self.buf));
        self.c.mem.release(self.class);
    }
}

impl Conn {
    fn closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst) || self.shared.is_shutting_down()
    }

    /// Lease a buffer of at least `n` bytes (waits while the budgets are spent).
    fn lease(&self, n: usize) -> Result<Lease<'_>, LeaseError> {
        let class = class_of(n);
        let closing = || self.closing();
        let idle = self.mem.reserve(class, &closing)?;
        match self.shared.budget.take(class, idle, &closing) {
            Ok(buf) => Ok(Lease {
                c: self,
                buf,
                class,
            }),
            Err(e) => {
                self.mem.release(class);
                Err(e)
            }
        }
    }
}

/// What a worker took off the wire.
enum Job<'a> {
    /// Reply this error right away (the request was refused at the edge).
    Refuse(Request, u32),
    /// Execute it (a WRITE's payload is in the lease).
    Run(Request, Option<Lease<'a>>),
}

/// Serve the transmission phase until the client disconnects or misbehaves. Returns
/// when every in-flight request has been answered.
pub(crate) fn serve(
    id: u64,
    session: Session,
    reader: BufReader<Stream>,
    writer: Stream,
    shared: Arc<Shared>,
) -> io::Result<()> {
    let export = session.entry.export.clone();
    let view = ExportView {
        size: export.size(),
        tflags: session.tflags,
        structured: session.structured,
        meta_context_selected: session.meta_context_selected(),
    };
    let mem = ConnMemory::new(shared.limits.connection_memory);
    // Idle extra workers notice the quiet socket through this timeout and leave; the
    // connection's own worker just reads on.
    writer.set_read_timeout(Some(IDLE_WORKER))?;
    let conn = Arc::new(Conn {
        reader: Mutex::new(reader),
        waiting: AtomicUsize::new(0),
        workers: AtomicUsize::new(1),
        retire: AtomicBool::new(false),
        gone: (Mutex::new(()), Condvar::new()),
        out: Out::new(writer)?,
        closing: AtomicBool::new(false),
        export,
        view,
        base_allocation: session.base_allocation,
        dirty_bitmap: session.dirty_bitmap,
        id,
        shared,
        mem,
    });
    worker(&conn, true);
    // Wait for every other worker: their requests are answered before the socket closes.
    let mut g = lock(&conn.gone.0);
    while conn.workers.load(Ordering::SeqCst) > 1 {
        g = conn
            .gone
            .1
            .wait_timeout(g, std::time::Duration::from_millis(50))
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
    drop(g);
    let _ = conn.out.ctl.shutdown(Shutdown::Both);
    Ok(())
}

/// Replies larger than this are written directly; smaller ones are queued and sent in
/// batches.
const COALESCE_MAX: usize = 64 << 10;
/// The reply queue holds at most this many bytes; a reply that does not fit waits for
/// the socket (back-pressure on a client that does not read its replies). The queue
/// and its spare are allocated once at this size, so a connection holds at most twice
/// this for queued replies.
const QUEUE_MAX: usize = 512 << 10;

/// The reply side of a connection: group commit of small replies.
///
/// A worker appends its reply to the queue; if nobody is flushing, it becomes the
/// flusher and writes the queue to the socket, again and again until it finds the queue
/// empty (checked under the queue lock, so no reply is left behind). Workers that find a
/// flusher at work return at once and go on reading requests; under load many replies
/// leave in one syscall. Large replies (and any reply that does not fit the queue) are
/// written directly; the socket lock keeps every reply contiguous.
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
        let n = head.len() + data.len();
        if n <= COALESCE_MAX {
            let mut q = self.queue.lock().map_err(|_| poisoned())?;
            let len = q.bytes.len();
            if q.bytes.capacity() < QUEUE_MAX {
                // Once, at its full size; if memory is short the reply goes out directly.
                let _ = q.bytes.try_reserve_exact(QUEUE_MAX - len);
            }
            if len + n <= q.bytes.capacity().min(QUEUE_MAX) {
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
                    if batch.capacity() <= QUEUE_MAX {
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

/// Start one more worker for `c` (the caller has counted it in `workers`).
fn spawn_worker(c: &Arc<Conn>) {
    let c2 = c.clone();
    let r = std::thread::Builder::new()
        .name(format!("nbd{}-w", c.id))
        .spawn(move || {
            worker(&c2, false);
            c2.shared.workers.put();
        });
    if let Err(e) = r {
        log::warn!("nbd connection {}: unable to start a worker: {e}", c.id);
        c.shared.workers.put();
        worker_gone(c);
    }
}

fn worker_gone(c: &Conn) {
    c.workers.fetch_sub(1, Ordering::SeqCst);
    let _g = lock(&c.gone.0);
    c.gone.1.notify_all();
}

/// After a request was read: start another worker when nobody waits for the reader
/// turn and the limits allow, so the next request is read while this one runs.
fn maybe_spawn(c: &Arc<Conn>) {
    if c.waiting.load(Ordering::SeqCst) != 0 || c.closing.load(Ordering::SeqCst) {
        return;
    }
    let max = c.shared.limits.threads_per_connection;
    let counted = c
        .workers
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok();
    if !counted {
        return;
    }
    if c.shared.workers.try_take() {
        spawn_worker(c);
    } else {
        c.workers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What the holder of the reader turn found.
enum Next<'a> {
    Job(Job<'a>),
    /// Nothing arrived for [`IDLE_WORKER`].
    Idle,
    /// No more requests: the connection ends.
    End,
}

fn worker(c: &Arc<Conn>, primary: bool) {
    loop {
        c.waiting.fetch_add(1, Ordering::SeqCst);
        let rd = lock(&c.reader);
        c.waiting.fetch_sub(1, Ordering::SeqCst);
        if !primary && c.retire.load(Ordering::SeqCst) {
            break;
        }
        let job = match next_job(c, rd) {
            Next::Job(j) => j,
            Next::End => break,
            Next::Idle => {
                c.retire.store(true, Ordering::SeqCst);
                if !primary {
                    break;
                }
                // Let the extra workers queued for the turn see `retire` and leave.
                if c.workers.load(Ordering::SeqCst) > 1 {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                continue;
            }
        };
        maybe_spawn(c);
        let ok = match job {
            Job::Refuse(r, err) => reply_error(c, &r, err, "request refused"),
            Job::Run(r, lease) => execute(c, &r, lease),
        };
        if let Err(e) = ok {
            log::debug!("nbd connection {}: unable to send a reply: {e}", c.id);
            stop(c);
            break;
        }
    }
    if !primary {
        worker_gone(c);
    }
}

fn stop(c: &Conn) {
    c.closing.store(true, Ordering::SeqCst);
    let _ = c.out.ctl.shutdown(Shutdown::Read);
}

/// Fill `buf` from the socket. `Ok(false)`: nothing arrived within the socket's read
/// timeout and `may_idle` (no byte of `buf` read yet); otherwise a timeout just goes on
/// waiting, so no request is ever cut.
fn read_full(rd: &mut impl Read, buf: &mut [u8], may_idle: bool) -> io::Result<bool> {
    let mut n = 0;
    while n < buf.len() {
        match rd.read(&mut buf[n..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(k) => n += k,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if n == 0 && may_idle {
                    return Ok(false);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Read the next request while holding the reader turn `rd`.
fn next_job<'a>(c: &'a Conn, mut rd: MutexGuard<'_, BufReader<Stream>>) -> Next<'a> {
    let end = |c: &Conn| {
        c.closing.store(true, Ordering::SeqCst);
        Next::End
    };
    if c.closing.load(Ordering::SeqCst) {
        return Next::End;
    }
    let mut hb = [0u8; REQUEST_LEN];
    match read_full(&mut *rd, &mut hb, true) {
        Ok(true) => {}
        Ok(false) => return Next::Idle,
        Err(e) => {
            if e.kind() != io::ErrorKind::UnexpectedEof {
                log::debug!("nbd connection {}: read failed: {e}", c.id);
            }
            return end(c);
        }
    }
    if c.retire.load(Ordering::Relaxed) {
        c.retire.store(false, Ordering::SeqCst);
    }
    let r = match parse_request(&hb) {
        Ok(r) => r,
        Err(e) => {
            log::warn!("nbd connection {}: {e}; closing the connection", c.id);
            return end(c);
        }
    };
    if r.cmd == CMD_DISC {
        return end(c);
    }
    let mut verdict = validate(&r, &c.view);
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
    // The buffer is leased before it exists: waits here while the budgets are spent.
    let mut lease = None;
    if verdict.is_ok() {
        let need = match r.cmd {
            CMD_READ | CMD_WRITE => r.len as usize,
            CMD_CACHE => (r.len as usize).min(CACHE_PIECE),
            _ => 0,
        };
        if need > 0 {
            match c.lease(need) {
                Ok(l) => lease = Some(l),
                Err(LeaseError::Closing) => return end(c),
                Err(LeaseError::NoMemory) => {
                    log::warn!(
                        "nbd connection {}: no memory for a {}-byte request: ENOMEM",
                        c.id,
                        need
                    );
                    verdict = Err(ENOMEM);
                }
            }
        }
    }
    if r.cmd == CMD_WRITE {
        let res = match lease.as_mut() {
            Some(l) => {
                let n = r.len as usize;
                read_full(&mut *rd, &mut l.buf[..n], false).map(|_| ())
            }
            None => discard(&mut *rd, r.len as u64),
        };
        if let Err(e) = res {
            log::debug!("nbd connection {}: write payload cut short: {e}", c.id);
            return end(c);
        }
    }
    drop(rd);
    Next::Job(match verdict {
        Ok(()) => Job::Run(r, lease),
        Err(e) => Job::Refuse(r, e),
    })
}

fn discard(r: &mut impl Read, mut n: u64) -> io::Result<()> {
    let mut scratch = [0u8; 16384];
    while n > 0 {
        let k = (n as usize).min(scratch.len());
        read_full(r, &mut scratch[..k], false)?;
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

/// NBD_CMD_CACHE: read the range through the export (into the leased buffer, in
/// pieces) so that it is in the page cache when the client asks for it.
fn cache(e: &dyn Export, mut off: u64, len: u64, buf: &mut [u8]) -> cowsnap_core::Result<()> {
    let end = off + len;
    while off < end {
        let n = ((end - off) as usize).min(buf.len());
        e.read(off, &mut buf[..n])?;
        off += n as u64;
    }
    Ok(())
}

fn execute(c: &Conn, r: &Request, lease: Option<Lease<'_>>) -> io::Result<()> {
    let e = &c.export;
    let fua = r.flags & CMD_FLAG_FUA != 0;
    let mut empty = [0u8; 0];
    let mut lease = lease;
    let buf: &mut [u8] = match lease.as_mut() {
        Some(l) => &mut l.buf,
        None => &mut empty,
    };
    let result = match r.cmd {
        CMD_READ => {
            let n = r.len as usize;
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
        CMD_CACHE if !buf.is_empty() => cache(e.as_ref(), r.offset, r.len as u64, buf),
        CMD_CACHE => Ok(()),
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
        CMD_BLOCK_STATUS => match block_status(c, r) {
            Ok(Some(reply)) => return c.out.send(&reply, &[]),
            Ok(None) => return reply_error(c, r, EIO, "no extents for the range"),
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
            // The client learns what failed and the errno, never the daemon's paths:
            // the whole message is in the log above.
            reply_error(c, r, code, &client_message(r.cmd, code))
        }
    }
}

/// The BLOCK_STATUS reply: one chunk per selected meta context, the last flagged
/// DONE; `None` when a context has no extent for the range.
fn block_status(c: &Conn, r: &Request) -> cowsnap_core::Result<Option<Vec<u8>>> {
    let req_one = r.flags & CMD_FLAG_REQ_ONE != 0;
    let mut reply = Vec::new();
    if c.base_allocation {
        let ext = c.export.block_status(r.offset, r.len as u64)?;
        let d = descriptors(&ext, r.len, req_one);
        if d.is_empty() {
            return Ok(None);
        }
        reply.extend(block_status_chunk_part(
            r.cookie,
            BASE_ALLOCATION_ID,
            &d,
            !c.dirty_bitmap,
        ));
    }
    if c.dirty_bitmap {
        let ext = c.export.dirty_status(r.offset, r.len as u64)?;
        let d = dirty_descriptors(&ext, r.len, req_one);
        if d.is_empty() {
            return Ok(None);
        }
        reply.extend(block_status_chunk_part(r.cookie, DIRTY_BITMAP_ID, &d, true));
    }
    Ok(Some(reply))
}

/// The message of an ERROR chunk: the command and the errno's description, which say
/// nothing about the host (no paths, no container or repository names).
fn client_message(cmd: u16, nbd_errno: u32) -> String {
    let what = match cmd {
        CMD_READ => "read",
        CMD_BLOCK_STATUS => "block status",
        _ => "request",
    };
    let desc = match nbd_errno {
        EPERM => "Operation not permitted",
        EIO => "Input/output error",
        ENOMEM => "Cannot allocate memory",
        EINVAL => "Invalid argument",
        ENOSPC => "No space left on device",
        EOVERFLOW => "Value too large",
        ENOTSUP => "Operation not supported",
        ESHUTDOWN => "Server is shutting down",
        _ => "error",
    };
    format!("{what} failed: {desc}")
}
