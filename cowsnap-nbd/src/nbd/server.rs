//! The NBD server: accepts connections on unix or TCP listeners and serves exports.
//!
//! Design notes
//! - One accept thread per listener; it polls the listener with a short timeout so
//!   [`Server::shutdown`] stops it promptly.
//! - One thread per connection runs the handshake ([`super::handshake`]), then becomes
//!   the connection's first worker ([`super::transmission`]).
//! - At most [`Limits::max_connections`] connections are open; the accept loop closes
//!   any further one at once (logged, rate-limited). The whole handshake must finish
//!   within [`Limits::handshake_timeout`]: every read and write of the handshake gets the
//!   time left as its socket timeout.
//! - A TCP listener with TLS credentials ([`Server::spawn_tcp_tls`]) requires TLS: the
//!   handshake answers only NBD_OPT_STARTTLS until TLS is up, then the connection goes
//!   on through the TLS pump ([`super::tls`]), whose plaintext end replaces the socket
//!   for the rest of the handshake and for transmission. The pump thread is joined
//!   before the connection counts as closed.
//! - Shutdown stops accepting and shuts the read side of every open connection: no
//!   new request is read, requests in flight finish and are answered, then the
//!   connection closes. [`Server::connections`] drops to zero when all are gone.

use super::handshake::{self, End, ExportLookup, Tls, Wire};
use super::limits::{Limits, Shared, REFUSAL_LOG_EVERY};
use super::stream::Stream;
use super::tls::{self, TlsConfig};
use super::transmission::{self, READ_BUF};
use cowsnap_core::export::Export;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener};
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use super::limits::DEFAULT_THREADS_PER_CONNECTION;

/// Socket send buffer asked for in transmission (capped by the kernel's wmem_max).
pub const SEND_BUFFER: usize = 4 << 20;

impl ExportLookup for Server {
    /// The export called `name`, if any.
    fn export(&self, name: &str) -> Option<ExportEntry> {
        self.exports.read().ok()?.get(name).cloned()
    }
    /// All exports, by name.
    fn export_list(&self) -> Vec<(String, ExportEntry)> {
        match self.exports.read() {
            Ok(t) => t.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// The handshake's socket with one deadline for the whole handshake: every read and
/// write gets the time left as its timeout, and fails with TimedOut once it is past.
struct Deadline<'a> {
    rd: &'a mut BufReader<Stream>,
    wr: &'a mut Stream,
    until: Instant,
    /// The credentials, on a listener that requires TLS.
    tls: Option<&'a TlsConfig>,
    /// The TLS pump, once STARTTLS succeeded.
    pump: &'a mut Option<std::thread::JoinHandle<()>>,
    id: u64,
    linger: Duration,
}

impl Wire for Deadline<'_> {
    fn start_tls(&mut self) -> io::Result<()> {
        let (Some(cfg), Stream::Tcp(tcp)) = (self.tls, &*self.wr) else {
            return Err(io::ErrorKind::Unsupported.into());
        };
        // Bytes read past the option are the start of the client's TLS handshake.
        let early = self.rd.buffer().to_vec();
        let (plain, pump) = tls::start(cfg, tcp.try_clone()?, early, self.id, self.linger)?;
        *self.pump = Some(pump);
        *self.rd = BufReader::with_capacity(READ_BUF, Stream::Unix(plain.try_clone()?));
        *self.wr = Stream::Unix(plain);
        Ok(())
    }
}

impl Deadline<'_> {
    fn left(&self) -> io::Result<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the handshake took too long",
            ));
        }
        Ok(left)
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.rd.buffer().is_empty() {
            let left = self.left()?;
            self.rd.get_ref().set_read_timeout(Some(left))?;
        }
        self.rd.read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.wr.set_write_timeout(Some(left))?;
        self.wr.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Connections refused for the connection limit, for rate-limited logging.
#[derive(Default)]
struct Refusals {
    since_log: u64,
    last_log: Option<Instant>,
}

pub use super::handshake::ExportEntry;

/// A server with a table of exports; the export named "" is the default.
pub struct Server {
    exports: RwLock<BTreeMap<String, ExportEntry>>,
    shared: RwLock<Arc<Shared>>,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Stream>>,
    /// The export each connection in transmission serves (by connection id).
    serving: Mutex<HashMap<u64, String>>,
    total: AtomicU64,
    refused: AtomicU64,
    refusals: Mutex<Refusals>,
}

impl Server {
    /// An empty server with the default [`Limits`].
    pub fn new() -> Arc<Self> {
        Self::with_limits(Limits::default())
    }
    /// An empty server with these limits.
    pub fn with_limits(limits: Limits) -> Arc<Self> {
        Arc::new(Server {
            exports: RwLock::new(BTreeMap::new()),
            shared: RwLock::new(Shared::new(limits)),
            next_id: AtomicU64::new(1),
            open: Mutex::new(HashMap::new()),
            serving: Mutex::new(HashMap::new()),
            total: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            refusals: Mutex::new(Refusals::default()),
        })
    }
    pub(crate) fn shared(&self) -> Arc<Shared> {
        match self.shared.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.shared().limits.clone()
    }
    /// Replace the limits (for connections accepted from now on; call before serving).
    pub fn set_limits(&self, limits: Limits) {
        let shut = self.shared().is_shutting_down();
        let n = Shared::new(limits);
        n.shutdown.store(shut, Ordering::SeqCst);
        if let Ok(mut s) = self.shared.write() {
            *s = n;
        }
    }
    /// Bytes of request buffers the server holds now (leased or pooled).
    pub fn request_memory(&self) -> usize {
        self.shared().budget.used()
    }
    /// Connections refused since start because the connection limit was reached.
    pub fn connections_refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
    /// Add or replace an export.
    pub fn set_export(&self, name: &str, export: Arc<dyn Export>, description: &str) {
        if let Ok(mut t) = self.exports.write() {
            t.insert(
                name.to_string(),
                ExportEntry {
                    export,
                    description: description.to_string(),
                },
            );
        }
    }
    /// Remove an export (new connections can no longer select it).
    pub fn remove_export(&self, name: &str) {
        if let Ok(mut t) = self.exports.write() {
            t.remove(name);
        }
    }
    /// Remove an export and close every connection serving it: no new request is
    /// read and the client sees the connection close. Returns how many were closed.
    pub fn remove_export_and_disconnect(&self, name: &str) -> usize {
        self.remove_export(name);
        let ids: Vec<u64> = match self.serving.lock() {
            Ok(m) => m
                .iter()
                .filter(|(_, n)| n.as_str() == name)
                .map(|(id, _)| *id)
                .collect(),
            Err(_) => return 0,
        };
        let Ok(open) = self.open.lock() else { return 0 };
        let mut n = 0;
        for id in ids {
            if let Some(s) = open.get(&id) {
                let _ = s.shutdown(Shutdown::Both);
                n += 1;
            }
        }
        n
    }
    /// Worker threads (requests in flight) per connection for new connections (>= 1).
    pub fn set_threads_per_connection(&self, n: usize) {
        let mut l = self.limits();
        l.threads_per_connection = n.max(1);
        self.set_limits(l);
    }
    /// Accept connections on a unix socket in a background thread.
    pub fn spawn_unix(self: &Arc<Self>, listener: UnixListener) -> JoinHandle<()> {
        let me = self.clone();
        std::thread::spawn(move || {
            me.accept_loop(listener.as_fd(), None, || {
                listener.accept().map(|(s, _)| Stream::Unix(s))
            })
        })
    }
    /// Accept connections on a TCP socket in a background thread.
    pub fn spawn_tcp(self: &Arc<Self>, listener: TcpListener) -> JoinHandle<()> {
        let me = self.clone();
        std::thread::spawn(move || {
            me.accept_loop(listener.as_fd(), None, || {
                let (s, _) = listener.accept()?;
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            })
        })
    }
    /// Accept connections on a TCP socket in a background thread, requiring TLS with
    /// these credentials (NBD_OPT_STARTTLS before anything else).
    pub fn spawn_tcp_tls(
        self: &Arc<Self>,
        listener: TcpListener,
        tls: TlsConfig,
    ) -> JoinHandle<()> {
        let me = self.clone();
        let tls = Arc::new(tls);
        std::thread::spawn(move || {
            me.accept_loop(listener.as_fd(), Some(tls.clone()), || {
                let (s, _) = listener.accept()?;
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            })
        })
    }
    /// Serve one already-connected client (e.g. one end of a socketpair, or a socket
    /// handed over by a supervisor) in a background thread.
    pub fn serve_stream(self: &Arc<Self>, s: Stream) {
        self.start_connection(s, None);
    }
    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.open.lock().map(|m| m.len()).unwrap_or(0)
    }
    /// Connections accepted since start.
    pub fn connections_total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
    /// Wait until no connection is open, at most `timeout`; true if none is.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        loop {
            if self.connections() == 0 {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    /// Stop accepting; connections finish their in-flight requests and close.
    pub fn shutdown(&self) {
        self.shared().shutdown.store(true, Ordering::SeqCst);
        if let Ok(m) = self.open.lock() {
            for s in m.values() {
                let _ = s.shutdown(Shutdown::Read);
            }
        }
    }

    fn accept_loop(
        self: &Arc<Self>,
        fd: std::os::fd::BorrowedFd<'_>,
        tls: Option<Arc<TlsConfig>>,
        mut accept: impl FnMut() -> std::io::Result<Stream>,
    ) {
        while !self.shared().is_shutting_down() {
            // Wake every 200 ms to see whether the server is shutting down.
            let mut pfd = [PollFd::new(fd, PollFlags::POLLIN)];
            match poll(&mut pfd, PollTimeout::from(200u16)) {
                Ok(n) if n > 0 => {}
                _ => continue,
            }
            match accept() {
                Ok(s) => self.start_connection(s, tls.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("unable to accept an NBD connection: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
        }
    }

    fn start_connection(self: &Arc<Self>, s: Stream, tls: Option<Arc<TlsConfig>>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        let shared = self.shared();
        {
            let Ok(mut m) = self.open.lock() else { return };
            if shared.is_shutting_down() {
                return;
            }
            if m.len() >= shared.limits.max_connections {
                drop(m);
                let _ = s.shutdown(Shutdown::Both);
                self.refuse(shared.limits.max_connections);
                return;
            }
            match s.try_clone() {
                Ok(c) => {
                    m.insert(id, c);
                }
                Err(e) => {
                    log::warn!("unable to serve an NBD connection: {e}");
                    return;
                }
            }
        }
        let me = self.clone();
        let r = std::thread::Builder::new()
            .name(format!("nbd{id}"))
            .spawn(move || {
                if let Err(e) = me.run_connection(id, s, shared, tls.as_deref()) {
                    log::debug!("nbd connection {id}: {e}");
                }
                if let Ok(mut m) = me.serving.lock() {
                    m.remove(&id);
                }
                if let Ok(mut m) = me.open.lock() {
                    m.remove(&id);
                }
            });
        if let Err(e) = r {
            log::warn!("unable to start a thread for an NBD connection: {e}");
            if let Ok(mut m) = self.open.lock() {
                m.remove(&id);
            }
        }
    }

    /// Log a refused connection, at most once per [`REFUSAL_LOG_EVERY`].
    fn refuse(&self, max: usize) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let Ok(mut r) = self.refusals.lock() else {
            return;
        };
        r.since_log += 1;
        if r.last_log.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY) {
            log::warn!(
                "refused {} NBD connection(s): {max} connections are open (the limit, --max-connections)",
                r.since_log
            );
            r.since_log = 0;
            r.last_log = Some(Instant::now());
        }
    }

    fn run_connection(
        &self,
        id: u64,
        s: Stream,
        shared: Arc<Shared>,
        tls: Option<&TlsConfig>,
    ) -> std::io::Result<()> {
        let mut pump = None;
        let r = self.serve_connection(id, s, shared, tls, &mut pump);
        if let Some(p) = pump {
            // Ends once the plaintext side is closed (which every path out of
            // serve_connection does) and the last bytes went out, or after the linger.
            let _ = p.join();
        }
        r
    }

    fn serve_connection(
        &self,
        id: u64,
        s: Stream,
        shared: Arc<Shared>,
        tls: Option<&TlsConfig>,
        pump: &mut Option<JoinHandle<()>>,
    ) -> std::io::Result<()> {
        s.set_nonblocking(false)?;
        let limit = shared.limits.handshake_timeout;
        let until = Instant::now() + limit;
        s.set_read_timeout(Some(limit))?;
        s.set_write_timeout(Some(limit))?;
        let mut writer = s.try_clone()?;
        let mut reader = BufReader::with_capacity(READ_BUF, s);
        let negotiated = {
            let mut d = Deadline {
                rd: &mut reader,
                wr: &mut writer,
                until,
                tls,
                pump,
                id,
                linger: limit,
            };
            let mode = if tls.is_some() {
                Tls::Required
            } else {
                Tls::Off
            };
            handshake::negotiate_io(self, &mut d, mode)
        };
        let session = match negotiated {
            Ok(s) => s,
            Err(End::Closed(why)) => {
                log::debug!("nbd connection {id}: {why}");
                let _ = writer.shutdown(Shutdown::Both);
                return Ok(());
            }
            Err(End::Io(e)) => {
                // debug, not info: a client must not be able to fill the log
                if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock {
                    log::debug!(
                        "nbd connection {id}: dropped: the handshake did not finish within {limit:?}"
                    );
                }
                let _ = writer.shutdown(Shutdown::Both);
                return Err(e);
            }
        };
        log::debug!(
            "nbd connection {id}: serving export {:?} (structured replies: {})",
            session.name,
            session.structured
        );
        if let Ok(mut m) = self.serving.lock() {
            m.insert(id, session.name.clone());
        }
        // An export removed during the handshake is not served.
        if self.export(&session.name).is_none() {
            let _ = writer.shutdown(Shutdown::Both);
            return Ok(());
        }
        // Idle connections are normal in transmission (a mounted, quiet disk): no write
        // timeout, and the read timeout only tells idle workers to leave (transmission).
        writer.set_write_timeout(None)?;
        writer.set_send_buffer(SEND_BUFFER);
        transmission::serve(id, session, reader, writer, shared)
    }
}
