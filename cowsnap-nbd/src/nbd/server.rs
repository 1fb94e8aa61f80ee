//! The NBD server: accepts connections on unix or TCP listeners and serves exports.
//!
//! Design notes
//! - One accept thread per listener; it polls the listener with a short timeout so
//!   [`Server::shutdown`] stops it promptly.
//! - One thread per connection runs the handshake ([`super::handshake`]), then becomes
//!   one of the connection's workers ([`super::transmission`]).
//! - Shutdown stops accepting and shuts the read side of every open connection: no
//!   new request is read, requests in flight finish and are answered, then the
//!   connection closes. [`Server::connections`] drops to zero when all are gone.

use super::handshake::{self, End};
use super::stream::Stream;
use super::transmission::{self, READ_BUF};
use cowsnap_core::export::Export;
use std::collections::{BTreeMap, HashMap};
use std::io::BufReader;
use std::net::{Shutdown, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A client must finish the handshake within this time (a connection that never
/// speaks would otherwise hold a thread forever).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Socket send buffer asked for in transmission (capped by the kernel's wmem_max).
pub const SEND_BUFFER: usize = 4 << 20;

/// Worker threads per connection unless set otherwise.
pub const DEFAULT_THREADS_PER_CONNECTION: usize = 16;

/// One named export.
#[derive(Clone)]
pub struct ExportEntry {
    /// What it serves.
    pub export: Arc<dyn Export>,
    /// Shown by NBD_OPT_LIST / NBD_INFO_DESCRIPTION.
    pub description: String,
}

/// A server with a table of exports; the export named "" is the default.
pub struct Server {
    exports: RwLock<BTreeMap<String, ExportEntry>>,
    shutdown: AtomicBool,
    threads: AtomicUsize,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Stream>>,
    total: AtomicU64,
}

impl Server {
    /// An empty server.
    pub fn new() -> Arc<Self> {
        Arc::new(Server {
            exports: RwLock::new(BTreeMap::new()),
            shutdown: AtomicBool::new(false),
            threads: AtomicUsize::new(DEFAULT_THREADS_PER_CONNECTION),
            next_id: AtomicU64::new(1),
            open: Mutex::new(HashMap::new()),
            total: AtomicU64::new(0),
        })
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
    /// The export called `name`, if any.
    pub fn export(&self, name: &str) -> Option<ExportEntry> {
        self.exports.read().ok()?.get(name).cloned()
    }
    /// All exports, by name.
    pub fn export_list(&self) -> Vec<(String, ExportEntry)> {
        match self.exports.read() {
            Ok(t) => t.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(_) => Vec::new(),
        }
    }
    /// Worker threads (requests in flight) per connection for new connections (>= 1).
    pub fn set_threads_per_connection(&self, n: usize) {
        self.threads.store(n.max(1), Ordering::Relaxed);
    }
    /// Accept connections on a unix socket in a background thread.
    pub fn spawn_unix(self: &Arc<Self>, listener: UnixListener) -> JoinHandle<()> {
        let me = self.clone();
        std::thread::spawn(move || {
            me.accept_loop(listener.as_raw_fd(), || {
                listener.accept().map(|(s, _)| Stream::Unix(s))
            })
        })
    }
    /// Accept connections on a TCP socket in a background thread.
    pub fn spawn_tcp(self: &Arc<Self>, listener: TcpListener) -> JoinHandle<()> {
        let me = self.clone();
        std::thread::spawn(move || {
            me.accept_loop(listener.as_raw_fd(), || {
                let (s, _) = listener.accept()?;
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            })
        })
    }
    /// Serve one already-connected client (e.g. one end of a socketpair, or a socket
    /// handed over by a supervisor) in a background thread.
    pub fn serve_stream(self: &Arc<Self>, s: Stream) {
        self.start_connection(s);
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
        self.shutdown.store(true, Ordering::SeqCst);
        if let Ok(m) = self.open.lock() {
            for s in m.values() {
                let _ = s.shutdown(Shutdown::Read);
            }
        }
    }

    fn accept_loop(
        self: &Arc<Self>,
        fd: std::os::fd::RawFd,
        mut accept: impl FnMut() -> std::io::Result<Stream>,
    ) {
        while !self.shutdown.load(Ordering::SeqCst) {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `pfd` is a live, initialised pollfd and we pass a count of 1; the
            // listener owning `fd` outlives this loop (it is owned by the closure's caller).
            let r = unsafe { libc::poll(&mut pfd, 1, 200) };
            if r <= 0 {
                continue;
            }
            match accept() {
                Ok(s) => self.start_connection(s),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("unable to accept an NBD connection: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
        }
    }

    fn start_connection(self: &Arc<Self>, s: Stream) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        let me = self.clone();
        let r = std::thread::Builder::new()
            .name(format!("nbd{id}"))
            .spawn(move || {
                if let Err(e) = me.run_connection(id, s) {
                    log::debug!("nbd connection {id}: {e}");
                }
                if let Ok(mut m) = me.open.lock() {
                    m.remove(&id);
                }
            });
        if let Err(e) = r {
            log::warn!("unable to start a thread for an NBD connection: {e}");
        }
    }

    fn run_connection(&self, id: u64, s: Stream) -> std::io::Result<()> {
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        {
            let mut m = self
                .open
                .lock()
                .map_err(|_| std::io::Error::other("connection table lock poisoned"))?;
            if self.shutdown.load(Ordering::SeqCst) {
                return Ok(());
            }
            m.insert(id, s.try_clone()?);
        }
        let mut writer = s.try_clone()?;
        let mut reader = BufReader::with_capacity(READ_BUF, s);
        let session = match handshake::negotiate(self, &mut reader, &mut writer) {
            Ok(s) => s,
            Err(End::Closed(why)) => {
                log::debug!("nbd connection {id}: {why}");
                let _ = writer.shutdown(Shutdown::Both);
                return Ok(());
            }
            Err(End::Io(e)) => {
                let _ = writer.shutdown(Shutdown::Both);
                return Err(e);
            }
        };
        log::debug!(
            "nbd connection {id}: serving export {:?} (structured replies: {})",
            session.name,
            session.structured
        );
        // Idle connections are normal in transmission (a mounted, quiet disk).
        writer.set_read_timeout(None)?;
        writer.set_send_buffer(SEND_BUFFER);
        let threads = self.threads.load(Ordering::Relaxed);
        transmission::serve(id, session, reader, writer, threads)
    }
}
