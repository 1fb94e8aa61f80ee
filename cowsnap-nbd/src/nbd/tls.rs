//! TLS for NBD over TCP: the credentials (`--tls-creds DIR`) and the TLS session of
//! one connection after NBD_OPT_STARTTLS.
//!
//! Design notes
//! - Credentials use the layout of qemu-nbd and nbdkit: `DIR/server-cert.pem` (the
//!   server's certificate, then any intermediates), `DIR/server-key.pem`, and with
//!   `--tls-verify-peer` `DIR/ca-cert.pem` (clients must present a certificate signed
//!   by it). Everything is read and checked by [`load`] before the daemon touches
//!   anything: the key must match the certificate. X.509 only: rustls has no TLS-PSK.
//! - The session is pumped by one thread per TLS connection ([`start`]): it owns the
//!   rustls server connection and the TCP socket, and joins them to one end of a unix
//!   socketpair; the connection's handshake and workers get the other end as a plain
//!   [`super::stream::Stream::Unix`]. So the transmission design stays as it is
//!   (workers take the reader turn on the buffered socket while other workers write
//!   replies, timeouts and shutdown act on the socket), and no lock is ever held across
//!   a blocking TLS read. The cost: one more thread per TLS connection, and each byte
//!   crosses the socketpair once more (a copy into and out of the kernel) besides the
//!   encryption.
//! - The pump is non-blocking and polls both sockets. It reads TCP only when the
//!   plaintext it decrypted has been handed on, and reads the socketpair only when the
//!   TLS records of the last read have been sent: memory is bounded by [`PLAIN_CHUNK`]
//!   of records to send and [`TO_INNER_MAX`] of plaintext to hand on (each plus one
//!   read), and a slow side slows the other (back-pressure through the socket buffers).
//! - End of the connection: TCP end of file (the client left, or
//!   [`super::server::Server::shutdown`] shut the TCP read side) becomes end of file on
//!   the socketpair once the decrypted bytes are handed on, so the workers answer what
//!   is in flight; when the workers close their end, the pump sends what is left and a
//!   TLS close_notify, for at most the linger time, then closes the TCP socket. A TLS
//!   error (a bad certificate, a forged record) ends the pump at once: the alert is
//!   sent if possible and the socketpair closes, which the handshake or the workers see
//!   as the client leaving.

use anyhow::{anyhow, bail, Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The server's certificate (then any intermediates) in a credentials directory.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server's private key in a credentials directory.
pub const SERVER_KEY: &str = "server-key.pem";
/// The certificate authority for client certificates (`--tls-verify-peer`).
pub const CA_CERT: &str = "ca-cert.pem";

/// Plaintext the pump reads from the workers at once (and so the most TLS output it
/// holds: one read, encrypted).
const PLAIN_CHUNK: usize = 256 << 10;
/// Decrypted bytes the pump gathers from the client before handing them on (plus at
/// most one read's worth of records).
const TO_INNER_MAX: usize = 256 << 10;
/// Credential files larger than this are refused (a PEM certificate chain is a few KiB).
const MAX_PEM_BYTES: u64 = 1 << 20;

/// Checked TLS credentials, ready for connections.
#[derive(Clone)]
pub struct TlsConfig {
    config: Arc<ServerConfig>,
    /// The directory they came from.
    pub dir: PathBuf,
    /// Clients must present a certificate signed by `ca-cert.pem`.
    pub verify_peer: bool,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("dir", &self.dir)
            .field("verify_peer", &self.verify_peer)
            .finish()
    }
}

fn read_pem(dir: &Path, name: &str) -> Result<Vec<u8>> {
    let p = dir.join(name);
    let f = std::fs::File::open(&p)
        .with_context(|| format!("unable to read TLS credentials {}", p.display()))?;
    let mut v = Vec::new();
    f.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut v)
        .with_context(|| format!("unable to read TLS credentials {}", p.display()))?;
    if v.len() as u64 > MAX_PEM_BYTES {
        bail!(
            "unable to read TLS credentials {}: larger than {} KiB",
            p.display(),
            MAX_PEM_BYTES >> 10
        );
    }
    Ok(v)
}

fn certs(dir: &Path, name: &str) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read_pem(dir, name)?;
    let p = dir.join(name);
    let v: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow!("unable to read TLS credentials {}: {e}", p.display()))?;
    if v.is_empty() {
        bail!(
            "unable to read TLS credentials {}: no PEM certificate in it",
            p.display()
        );
    }
    Ok(v)
}

/// Read and check the credentials in `dir` (see the module notes for the layout).
pub fn load(dir: &Path, verify_peer: bool) -> Result<TlsConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = certs(dir, SERVER_CERT)?;
    let key_path = dir.join(SERVER_KEY);
    let key = PrivateKeyDer::from_pem_slice(&read_pem(dir, SERVER_KEY)?)
        .map_err(|e| anyhow!("unable to read TLS credentials {}: {e}", key_path.display()))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow!("unable to set up TLS: {e}"))?;
    let builder = if verify_peer {
        let mut roots = RootCertStore::empty();
        for c in certs(dir, CA_CERT)? {
            roots.add(c).map_err(|e| {
                anyhow!(
                    "unable to read TLS credentials {}: {e}",
                    dir.join(CA_CERT).display()
                )
            })?;
        }
        let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| anyhow!("unable to set up TLS client verification: {e}"))?;
        builder.with_client_cert_verifier(v)
    } else {
        builder.with_no_client_auth()
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| {
        anyhow!(
            "unable to use TLS credentials {} and {}: {e}",
            dir.join(SERVER_CERT).display(),
            key_path.display()
        )
    })?;
    Ok(TlsConfig {
        config: Arc::new(config),
        dir: dir.to_path_buf(),
        verify_peer,
    })
}

/// Start TLS on `tcp` right after the NBD_REP_ACK of NBD_OPT_STARTTLS. `early`: bytes
/// the handshake had already read past the option (the start of the client's TLS
/// handshake). Returns the plaintext end of the connection and the pump thread, which
/// ends when both sides are done (at most `linger` after the plaintext end closes).
pub fn start(
    cfg: &TlsConfig,
    tcp: TcpStream,
    early: Vec<u8>,
    id: u64,
    linger: Duration,
) -> io::Result<(UnixStream, JoinHandle<()>)> {
    let mut conn = ServerConnection::new(cfg.config.clone()).map_err(io::Error::other)?;
    // One read from the workers, encrypted, always fits (it is only read when nothing
    // is queued).
    conn.set_buffer_limit(Some(2 * PLAIN_CHUNK));
    let (outer, inner) = UnixStream::pair()?;
    tcp.set_nonblocking(true)?;
    inner.set_nonblocking(true)?;
    let mut pump = Pump {
        conn,
        tcp,
        inner,
        early,
        to_inner: Vec::new(),
        sent: 0,
        tcp_eof: false,
        inner_shut: false,
        inner_eof: false,
        inner_hup: false,
        linger_until: None,
        linger,
    };
    let h = std::thread::Builder::new()
        .name(format!("nbd{id}-tls"))
        .spawn(move || {
            if let Err(why) = pump.run() {
                // debug: a client must not be able to fill the log
                log::debug!("nbd connection {id}: TLS: {why}");
            }
            let _ = pump.tcp.shutdown(Shutdown::Both);
        })?;
    Ok((outer, h))
}

/// One TLS connection's pump (see the module notes).
struct Pump {
    conn: ServerConnection,
    tcp: TcpStream,
    inner: UnixStream,
    /// Client bytes read before TLS started, fed to rustls first.
    early: Vec<u8>,
    /// Decrypted bytes not yet handed to the workers, from `sent`.
    to_inner: Vec<u8>,
    sent: usize,
    /// No more bytes come from the client.
    tcp_eof: bool,
    /// The workers were told (end of file on their side).
    inner_shut: bool,
    /// The workers closed their side, and all they wrote was read.
    inner_eof: bool,
    /// The workers shut their side (what they wrote may still be queued).
    inner_hup: bool,
    linger_until: Option<Instant>,
    linger: Duration,
}

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

impl Pump {
    fn run(&mut self) -> Result<(), String> {
        let mut buf = vec![0u8; PLAIN_CHUNK];
        if !self.early.is_empty() {
            let early = std::mem::take(&mut self.early);
            let mut rd = &early[..];
            while !rd.is_empty() {
                let n = self
                    .conn
                    .read_tls(&mut rd)
                    .map_err(|e| format!("unable to read the client's handshake: {e}"))?;
                self.process()?;
                if n == 0 {
                    break;
                }
            }
        }
        loop {
            if self.inner_hup && self.conn.is_handshaking() {
                return Err("the connection was closed during the TLS handshake".into());
            }
            self.hand_on()?;
            self.send_tls()?;
            if self.inner_eof && !self.conn.wants_write() {
                return Ok(());
            }
            if self.tcp_eof && self.sent == self.to_inner.len() && !self.inner_shut {
                self.inner_shut = true;
                let _ = self.inner.shutdown(Shutdown::Write);
            }
            if let Some(t) = self.linger_until {
                if Instant::now() >= t {
                    return Err(format!(
                        "the client did not take its last replies within {:?}",
                        self.linger
                    ));
                }
            }

            let want_tcp_in = !self.tcp_eof && self.sent == self.to_inner.len();
            let want_tcp_out = self.conn.wants_write();
            // Nothing is taken from the workers before the TLS handshake is done, nor
            // while the records of the last read are still queued.
            let want_inner_in =
                !self.inner_eof && !self.conn.is_handshaking() && !self.conn.wants_write();
            let want_inner_out = !self.inner_eof && self.sent < self.to_inner.len();
            let flags = |i: bool, o: bool| {
                let mut f = PollFlags::empty();
                if i {
                    f |= PollFlags::POLLIN;
                }
                if o {
                    f |= PollFlags::POLLOUT;
                }
                f
            };
            let timeout = match self.linger_until {
                Some(t) => {
                    let ms = t.saturating_duration_since(Instant::now()).as_millis();
                    PollTimeout::try_from(ms.min(60_000) as u32 + 1).unwrap_or(PollTimeout::MAX)
                }
                None => PollTimeout::NONE,
            };
            let (tcp_ev, inner_ev) = {
                let mut fds = vec![PollFd::new(
                    self.tcp.as_fd(),
                    flags(want_tcp_in, want_tcp_out),
                )];
                // The workers' side is always watched for its end (the handshake's
                // deadline closes it), except once it was seen: a shut socket would
                // wake the poll again and again while the client is slow to read.
                if !self.inner_eof && (want_inner_in || !self.inner_hup) {
                    fds.push(PollFd::new(
                        self.inner.as_fd(),
                        flags(want_inner_in, want_inner_out),
                    ));
                }
                match poll(&mut fds, timeout) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(format!("unable to poll: {e}")),
                }
                let ev = |f: &PollFd| f.revents().unwrap_or(PollFlags::empty());
                (
                    ev(&fds[0]),
                    fds.get(1).map(ev).unwrap_or(PollFlags::empty()),
                )
            };
            let bad = PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL;
            if tcp_ev.intersects(PollFlags::POLLERR | PollFlags::POLLNVAL) {
                return Err("the TCP connection failed".into());
            }
            if tcp_ev.contains(PollFlags::POLLHUP) && !want_tcp_in {
                // Both directions of TCP are closed: nothing can be sent any more.
                return Err("the client closed the connection".into());
            }
            if want_tcp_in && tcp_ev.intersects(PollFlags::POLLIN | bad) {
                self.read_tcp()?;
            }
            // POLLHUP: the workers shut both directions (they always do, at the end).
            if want_inner_in && inner_ev.intersects(PollFlags::POLLIN | bad) {
                self.read_inner(&mut buf)?;
            } else if inner_ev.intersects(bad) {
                // Their last replies are read once the client took what is queued
                // (within the linger).
                self.inner_hup = true;
                self.start_linger();
            }
        }
    }

    /// Decrypt what rustls has read; queue the plaintext for the workers.
    fn process(&mut self) -> Result<(), String> {
        if let Err(e) = self.conn.process_new_packets() {
            // Send the alert that says why, if the socket takes it.
            let _ = self.send_tls();
            return Err(format!("{e}"));
        }
        if self.sent == self.to_inner.len() {
            self.to_inner.clear();
            self.sent = 0;
        }
        let mut chunk = [0u8; 16 << 10];
        loop {
            match self.conn.reader().read(&mut chunk) {
                Ok(0) => {
                    // close_notify: the client sends nothing more.
                    self.tcp_eof = true;
                    return Ok(());
                }
                Ok(n) => self.to_inner.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => {
                    self.tcp_eof = true;
                    return if e.kind() == io::ErrorKind::UnexpectedEof {
                        Ok(())
                    } else {
                        Err(format!("{e}"))
                    };
                }
            }
        }
    }

    /// Read and decrypt what the client sent, up to [`TO_INNER_MAX`] at a time.
    fn read_tcp(&mut self) -> Result<(), String> {
        loop {
            match self.conn.read_tls(&mut self.tcp) {
                Ok(0) => {
                    self.tcp_eof = true;
                    return self.process();
                }
                Ok(_) => self.process()?,
                Err(e) if would_block(&e) => return Ok(()),
                Err(e) => {
                    self.tcp_eof = true;
                    return Err(format!("unable to read from the client: {e}"));
                }
            }
            if self.tcp_eof || self.to_inner.len() - self.sent >= TO_INNER_MAX {
                return Ok(());
            }
        }
    }

    /// Hand decrypted bytes to the workers (as much as their socket takes).
    fn hand_on(&mut self) -> Result<(), String> {
        while !self.inner_eof && self.sent < self.to_inner.len() {
            match self.inner.write(&self.to_inner[self.sent..]) {
                Ok(n) => self.sent += n,
                Err(e) if would_block(&e) => return Ok(()),
                Err(_) => {
                    // The workers closed their end: nothing more to hand on.
                    self.close_inner();
                }
            }
        }
        Ok(())
    }

    fn read_inner(&mut self, buf: &mut [u8]) -> Result<(), String> {
        match self.inner.read(buf) {
            Ok(0) => self.close_inner(),
            Ok(n) => {
                if let Err(e) = self.conn.writer().write_all(&buf[..n]) {
                    return Err(format!("unable to encrypt a reply: {e}"));
                }
            }
            Err(e) if would_block(&e) => {}
            Err(_) => self.close_inner(),
        }
        Ok(())
    }

    /// The workers are done: send close_notify after what is queued, then linger.
    fn close_inner(&mut self) {
        if self.inner_eof {
            return;
        }
        self.inner_eof = true;
        self.to_inner = Vec::new();
        self.sent = 0;
        self.conn.send_close_notify();
        self.start_linger();
    }

    fn start_linger(&mut self) {
        if self.linger_until.is_none() {
            self.linger_until = Some(Instant::now() + self.linger);
        }
    }

    /// Write queued TLS records to the client (as much as the socket takes).
    fn send_tls(&mut self) -> Result<(), String> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.tcp) {
                Ok(_) => {}
                Err(e) if would_block(&e) => return Ok(()),
                Err(e) => return Err(format!("unable to write to the client: {e}")),
            }
        }
        Ok(())
    }
}
