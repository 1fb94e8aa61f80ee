//! The per-disk daemon: opens the origin, builds the engine, serves it over NBD on a
//! unix socket (and TCP when asked) and answers the control socket.
//!
//! Start-up order: make every path argument absolute and change to `/` (the daemon
//! pins no mount and no relative path lands in a caller's directory); take the name
//! lock `RUN_DIR/NAME.lock` (or adopt the one `cowsnapctl attach` holds, `--lock-fd`)
//! before touching any file of the name; refuse if another daemon answers on the
//! control socket; remove stale sockets; open the origin (O_EXCL on block devices) and
//! refuse an empty one or one whose size is not a multiple of 512; build the engine and
//! the change log; bind every socket (umask 0177, so they are born 0600); write the pid
//! file; start serving. A fatal error ends in one `cowsnap-nbd: error: ...` line on
//! stderr (the log), which `cowsnapctl attach` shows as the reason. Shutdown (SIGTERM, SIGINT or the `shutdown` command): stop
//! accepting, give open connections a moment to finish in-flight requests, flush the
//! origin, remove the sockets and the pid file, exit 0.
//!
//! Threads: one signal thread (SIGTERM/SIGINT are blocked everywhere else), the NBD
//! server's accept threads, one control accept thread and one thread per control
//! connection. The main thread waits for a stop event.
//!
//! Change tracking is bound to the origin (`cowsnap_core::origin_seal`): at start the
//! seal the last daemon left is taken (removed before anything is served) and checked;
//! a clean shutdown seals the origin again after the final flush.

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use cowsnap_core::backup::Backups;
use cowsnap_core::blockio::{self, OpenSpec};
use cowsnap_core::changelog::ChangeLog;
use cowsnap_core::engine::{Engine, EngineConfig};
use cowsnap_core::export::Export;
use cowsnap_core::identity::Identity;
use cowsnap_core::origin_seal;
use cowsnap_core::repo::Repo;
use cowsnap_core::restore::{self, live::FillingIo};
use cowsnap_nbd::config::DiskPaths;
use cowsnap_nbd::control::{self, FillInfo, IoCounters, Request, StatusInfo};
use cowsnap_nbd::name_lock::{self, NameLock};
use cowsnap_nbd::nbd::limits::Limits;
use cowsnap_nbd::nbd::server::Server;
use crossbeam_channel::{Receiver, Sender};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, ToSocketAddrs};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Command line of `cowsnap-nbd`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "cowsnap-nbd",
    version,
    about = "Serve one disk over NBD through the cowsnap engine (runs in the foreground)"
)]
pub struct Args {
    /// Disk name: export name and socket file names.
    #[arg(long)]
    pub name: String,
    /// Block device or regular file to serve.
    #[arg(long)]
    pub origin: PathBuf,
    /// Directory for sockets and the pid file.
    #[arg(long, env = cowsnap_nbd::config::ENV_RUN_DIR, default_value = cowsnap_nbd::config::DEFAULT_RUN_DIR)]
    pub run_dir: PathBuf,
    /// Directory for the change log.
    #[arg(long, env = cowsnap_nbd::config::ENV_STATE_DIR, default_value = cowsnap_nbd::config::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Refuse writes (no change log is kept).
    #[arg(long)]
    pub read_only: bool,
    /// I/O engine for the origin.
    #[arg(long, default_value = "auto", value_parser = ["auto", "uring", "sync"])]
    pub io_engine: String,
    /// Also listen on TCP (e.g. tcp:127.0.0.1:10809). Repeatable.
    #[arg(long = "listen", value_name = "tcp:ADDR:PORT")]
    pub listen: Vec<String>,
    /// Tracking chunk size in bytes (power of two, >= 4096).
    #[arg(long, default_value_t = 65536)]
    pub chunk_size: u32,
    /// Default container for backups (ram:SIZE, file:PATH:SIZE, dev:PATH).
    #[arg(long)]
    pub container: Option<String>,
    /// Also write the log to this file.
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// Live restore: the origin is filled from this repository generation
    /// (`repo:DIR@GENERATION`) while it is served. On a later start the fill resumes
    /// from the disk's state directory without this flag.
    #[arg(long, value_name = "repo:DIR@GEN")]
    pub restore_from: Option<String>,
    /// NBD connections open at once; further ones are closed at once (and logged).
    #[arg(long, default_value_t = cowsnap_nbd::nbd::limits::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Memory for NBD request payloads across all connections (e.g. 128M, at least 32M);
    /// a connection uses at most 64M of it.
    #[arg(long, default_value = "128M")]
    pub request_memory: String,
    /// An open descriptor of `RUN_DIR/NAME.lock` that the starting process has already
    /// locked (`cowsnapctl attach`); the daemon keeps it for its life.
    #[arg(long, hide = true)]
    pub lock_fd: Option<i32>,
}

/// Every path argument made absolute against the caller's working directory, before
/// the daemon changes to `/`.
fn absolute_args(mut a: Args) -> Result<Args> {
    let abs = |p: &Path| {
        std::path::absolute(p).with_context(|| format!("unable to resolve {}", p.display()))
    };
    a.origin = abs(&a.origin)?;
    a.run_dir = abs(&a.run_dir)?;
    a.state_dir = abs(&a.state_dir)?;
    if let Some(l) = &a.log_file {
        a.log_file = Some(abs(l)?);
    }
    if let Some(c) = &a.container {
        a.container = Some(
            cowsnap_nbd::config::absolute_container(c)
                .with_context(|| format!("unable to resolve --container {c:?}"))?,
        );
    }
    if let Some(r) = &a.restore_from {
        if let Some(rest) = r.strip_prefix("repo:") {
            let (dir, gen) = match rest.rsplit_once('@') {
                Some((d, g)) => (d, Some(g)),
                None => (rest, None),
            };
            let dir = abs(Path::new(dir))?;
            a.restore_from = Some(match gen {
                Some(g) => format!("repo:{}@{g}", dir.display()),
                None => format!("repo:{}", dir.display()),
            });
        }
    }
    Ok(a)
}

/// Paths in a backup request must be absolute: the daemon works in `/`, so a relative
/// one would land there, not where the caller meant.
fn check_request_paths(p: &cowsnap_nbd::control::BackupParams) -> Result<(), String> {
    let to = cowsnap_nbd::config::target_path(&p.to);
    let c = p
        .container
        .as_deref()
        .and_then(cowsnap_nbd::config::container_path);
    for path in to.into_iter().chain(c) {
        if !Path::new(path).is_absolute() {
            return Err(format!(
                "unable to start the backup: the path {path:?} is relative \
                 (the daemon works in /); give an absolute path"
            ));
        }
    }
    Ok(())
}

/// The name lock for the daemon's life; removed at exit if the daemon took it itself
/// (an inherited one is removed by whoever still holds it: see `name_lock`).
struct NameHold {
    lock: Option<NameLock>,
    own: bool,
}

impl Drop for NameHold {
    fn drop(&mut self) {
        if let Some(l) = self.lock.take() {
            if self.own {
                l.remove();
            }
        }
    }
}

/// Take (or adopt) the name lock; refuse when another process holds it.
fn hold_name(args: &Args, paths: &DiskPaths) -> Result<NameHold> {
    let path = paths.lock_file();
    if let Some(fd) = args.lock_fd {
        // SAFETY: the descriptor was handed to this process to own (`--lock-fd`) and
        // nothing else in it uses it.
        let lock = unsafe { NameLock::adopt(fd, &path) }.map_err(|e| anyhow!("{e}"))?;
        return Ok(NameHold {
            lock: Some(lock),
            own: false,
        });
    }
    match NameLock::try_acquire(&path).map_err(|e| anyhow!("{e}"))? {
        Some(lock) => Ok(NameHold {
            lock: Some(lock),
            own: true,
        }),
        None => bail!(
            "disk {:?} is already served by another daemon or being attached \
             (pid {} holds {})",
            args.name,
            name_lock::holder_pid(&path)
                .map(|p| p.to_string())
                .unwrap_or_else(|| "?".into()),
            path.display()
        ),
    }
}

/// Events that stop the daemon.
#[derive(Debug)]
enum Stop {
    Signal(i32),
    Command,
}

/// The running daemon's shared state.
pub struct Daemon {
    args: Args,
    paths: DiskPaths,
    engine: Arc<Engine>,
    backups: Backups,
    server: Arc<Server>,
    started: Instant,
    stop_tx: Sender<Stop>,
    changelog: Option<Arc<ChangeLog>>,
    filling: Option<Arc<FillingIo>>,
}

/// Parse a `--listen` value: `tcp:HOST:PORT`.
pub fn parse_listen(spec: &str) -> Result<std::net::SocketAddr> {
    let rest = spec
        .strip_prefix("tcp:")
        .ok_or_else(|| anyhow!("invalid --listen {spec:?}: expected tcp:ADDR:PORT"))?;
    rest.to_socket_addrs()
        .with_context(|| format!("invalid --listen {spec:?}: expected tcp:ADDR:PORT"))?
        .next()
        .ok_or_else(|| anyhow!("invalid --listen {spec:?}: address resolves to nothing"))
}

impl Daemon {
    /// Answer one control line (never panics on bad input).
    pub fn handle_line(&self, line: &str) -> (String, bool) {
        match control::decode_request(line) {
            Err(e) => {
                log::warn!("control: {e}");
                (control::error_reply(&e), false)
            }
            Ok(req) => self.handle(req),
        }
    }

    /// Answer one request; the flag says "stop after replying".
    pub fn handle(&self, req: Request) -> (String, bool) {
        let fail = |e: &dyn std::fmt::Display| control::error_reply(&e.to_string());
        match req {
            Request::Status => (control::ok_reply(&self.status()), false),
            Request::Flush => match self.engine.flush() {
                Ok(()) => (control::ok_reply(&()), false),
                Err(e) => (fail(&format!("unable to flush the origin: {e}")), false),
            },
            Request::Shutdown => (control::ok_reply(&()), true),
            Request::Backup { mut params } => {
                if params.container.is_none() {
                    params.container = self.args.container.clone();
                }
                if let Err(e) = check_request_paths(&params) {
                    return (fail(&e), false);
                }
                log::info!("backup requested to {}", params.to);
                // Nothing is opened before the target and the container are checked.
                let own = cowsnap_nbd::attached::OwnDisk {
                    name: &self.args.name,
                    origin: Some(&self.args.origin),
                    default_container: self.args.container.as_deref(),
                };
                if let Err(e) =
                    cowsnap_nbd::attached::check_backup(&self.args.run_dir, &own, &params)
                {
                    log::warn!("{e}");
                    return (fail(&e), false);
                }
                match self.backups.start(params) {
                    Ok(id) => (control::ok_reply(&serde_json::json!({ "id": id })), false),
                    Err(e) => (fail(&e), false),
                }
            }
            Request::BackupStatus => (
                control::ok_reply(&serde_json::json!({ "backup": self.backups.status() })),
                false,
            ),
            Request::Priority { ranges } => match self.backups.prioritize(&ranges) {
                Ok(()) => (control::ok_reply(&()), false),
                Err(e) => (fail(&e), false),
            },
            Request::Cancel => match self.backups.cancel() {
                Ok(()) => (control::ok_reply(&()), false),
                Err(e) => (fail(&e), false),
            },
        }
    }

    /// The `status` reply.
    pub fn status(&self) -> StatusInfo {
        StatusInfo {
            name: self.paths.name.clone(),
            origin: self.args.origin.display().to_string(),
            size: self.engine.size(),
            read_only: self.args.read_only,
            io_engine: self.engine.origin().engine_name().to_string(),
            chunk_size: self.engine.config().chunk_size,
            uri: self.paths.uri(),
            listen: self.args.listen.clone(),
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            connections: self.server.connections() as u64,
            stats: IoCounters::from(self.engine.stats()),
            container: self.args.container.clone(),
            backup: self.backups.status(),
            lineage: self.changelog.as_ref().map(|c| c.lineage().to_string()),
            tracking: self
                .changelog
                .as_ref()
                .and_then(|c| serde_json::to_value(c.status()).ok()),
            restored_from: Identity::load_or_create(&self.paths.disk_state_dir())
                .ok()
                .and_then(|i| i.restored_from)
                .and_then(|r| serde_json::to_value(r).ok()),
            fill: self.filling.as_ref().map(|f| {
                let st = f.fill_status();
                FillInfo {
                    done: st.done,
                    total: st.total,
                    complete: st.complete,
                    error: st.error,
                }
            }),
        }
    }

    fn serve_control_conn(self: &Arc<Self>, stream: UnixStream) {
        let Ok(w) = stream.try_clone() else { return };
        let mut writer = w;
        let mut reader = BufReader::new(stream);
        loop {
            let mut buf = Vec::new();
            let n = match (&mut reader)
                .take(control::MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut buf)
            {
                Ok(n) => n,
                Err(e) => {
                    log::debug!("control connection: {e}");
                    return;
                }
            };
            if n == 0 {
                return;
            }
            let too_long = buf.len() > control::MAX_LINE;
            let (reply, stop) = if too_long {
                (
                    control::error_reply(&format!(
                        "request longer than {} bytes",
                        control::MAX_LINE
                    )),
                    false,
                )
            } else {
                match std::str::from_utf8(&buf) {
                    Ok(s) if s.trim().is_empty() => continue,
                    Ok(s) => self.handle_line(s),
                    Err(_) => (control::error_reply("malformed request (not UTF-8)"), false),
                }
            };
            let mut out = reply.into_bytes();
            out.push(b'\n');
            if writer.write_all(&out).and_then(|_| writer.flush()).is_err() {
                return;
            }
            if stop {
                let _ = self.stop_tx.send(Stop::Command);
                return;
            }
            if too_long && !buf.ends_with(b"\n") {
                // Skip the rest of the oversized line, then go on with the next one.
                let mut skipped = 0u64;
                loop {
                    let mut chunk = Vec::new();
                    match (&mut reader)
                        .take(control::MAX_LINE as u64)
                        .read_until(b'\n', &mut chunk)
                    {
                        Ok(0) | Err(_) => return,
                        Ok(n) => skipped += n as u64,
                    }
                    if chunk.ends_with(b"\n") {
                        break;
                    }
                    if skipped > 64 * control::MAX_LINE as u64 {
                        return;
                    }
                }
            }
        }
    }
}

fn init_logging(log_file: Option<&Path>) -> Result<()> {
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if let Some(p) = log_file {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .with_context(|| format!("unable to open log file {}", p.display()))?;
        b.target(env_logger::Target::Pipe(Box::new(f)));
    }
    b.format_timestamp_millis();
    let _ = b.try_init();
    Ok(())
}

fn make_dir(p: &Path, mode: u32) -> Result<()> {
    if let Ok(m) = std::fs::metadata(p) {
        if m.is_dir() && m.permissions().mode() & 0o077 != 0 {
            log::warn!(
                "{} is accessible to other users (mode {:o}); 0700 is advised",
                p.display(),
                m.permissions().mode() & 0o7777
            );
        }
        if m.is_dir() {
            return Ok(());
        }
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(p)
        .with_context(|| format!("unable to create directory {}", p.display()))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("unable to set the mode of {}", p.display()))
}

/// Bind a unix socket, replacing a stale socket file.
fn bind_unix(p: &Path) -> Result<UnixListener> {
    match std::fs::remove_file(p) {
        Ok(()) => log::info!("removed stale socket {}", p.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("unable to remove {}", p.display())),
    }
    UnixListener::bind(p).with_context(|| format!("unable to listen on {}", p.display()))
}

/// Regular files have no O_EXCL: take an exclusive advisory lock instead, so that two
/// daemons never serve the same file. Held for the daemon's lifetime.
fn lock_origin(path: &Path) -> Result<Option<std::fs::File>> {
    use std::os::fd::AsRawFd;
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => {}
        _ => return Ok(None), // devices: O_EXCL in blockio::open; errors reported there
    }
    let f =
        std::fs::File::open(path).with_context(|| format!("unable to open {}", path.display()))?;
    // SAFETY: flock on a valid fd owned by `f`.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            bail!(
                "unable to lock {}: it is served by another cowsnap daemon (or locked by another program)",
                path.display()
            );
        }
        return Err(e).with_context(|| format!("unable to lock {}", path.display()));
    }
    Ok(Some(f))
}

/// Check the flags that every later backup depends on, before anything is touched.
fn check_args(args: &Args) -> Result<()> {
    cowsnap_core::engine::check_chunk_size(u64::from(args.chunk_size))
        .map_err(|e| anyhow!("{e}"))?;
    if let Some(c) = &args.container {
        cowsnap_core::container::check_default(c, args.chunk_size).map_err(|e| anyhow!("{e}"))?;
    }
    Ok(())
}

/// The NBD server's limits from the flags.
fn nbd_limits(args: &Args) -> Result<Limits> {
    let d = Limits::default();
    if args.max_connections == 0 {
        bail!("invalid --max-connections 0: at least one connection is needed");
    }
    let mem = cowsnap_core::container::parse_size(&args.request_memory)
        .map_err(|e| anyhow!("invalid --request-memory: {e}"))?;
    let min = cowsnap_nbd::nbd::proto::MAX_PAYLOAD as u64;
    if mem < min {
        bail!(
            "invalid --request-memory {}: at least {} MiB (one request of the largest size)",
            args.request_memory,
            min >> 20
        );
    }
    let mem = usize::try_from(mem).unwrap_or(usize::MAX);
    Ok(Limits {
        max_connections: args.max_connections,
        memory: mem,
        connection_memory: d.connection_memory.min(mem),
        ..d
    })
}

/// Run the daemon until a stop event; returns after cleaning up.
pub fn run(args: Args) -> Result<()> {
    let args = absolute_args(args)?;
    std::env::set_current_dir("/").context("unable to change the working directory to /")?;
    init_logging(args.log_file.as_deref())?;
    cowsnap_nbd::config::validate_name(&args.name).map_err(|e| anyhow!("invalid --name: {e}"))?;
    check_args(&args)?;
    let limits = nbd_limits(&args)?;
    let paths = DiskPaths::new(&args.name, &args.run_dir, &args.state_dir);
    let listen: Vec<std::net::SocketAddr> = args
        .listen
        .iter()
        .map(|s| parse_listen(s))
        .collect::<Result<_>>()?;
    let engine_kind: blockio::IoEngine = args
        .io_engine
        .parse()
        .map_err(|e| anyhow!("invalid --io-engine: {e}"))?;

    // Block the stop signals before any thread starts, so only the signal thread sees them.
    let mut sigs = nix::sys::signal::SigSet::empty();
    sigs.add(nix::sys::signal::Signal::SIGTERM);
    sigs.add(nix::sys::signal::Signal::SIGINT);
    sigs.add(nix::sys::signal::Signal::SIGHUP);
    sigs.thread_block().context("unable to block signals")?;

    make_dir(&args.run_dir, 0o700)?;
    let _name = hold_name(&args, &paths)?;
    if control::Client::connect(&paths.ctl_socket(), Duration::from_secs(2)).is_ok() {
        bail!(
            "disk {:?} is already served by another daemon (control socket {} answers)",
            args.name,
            paths.ctl_socket().display()
        );
    }

    if let Some(r) = &args.restore_from {
        // A live restore overwrites the origin: never another disk's origin or a mount.
        let action = format!("restore {r} onto {}", args.origin.display());
        cowsnap_nbd::attached::check_destination(
            &args.run_dir,
            Some(&args.name),
            &args.origin,
            &action,
        )
        .map_err(|e| anyhow!(e))?;
    }
    let _origin_lock = lock_origin(&args.origin)?;
    let spec = OpenSpec {
        path: args.origin.clone(),
        read_only: args.read_only,
        exclusive: true,
        engine: engine_kind,
        direct: false,
    };
    let dest = blockio::open(&spec).map_err(|e| anyhow!("{e}"))?;
    let size = dest.size();
    cowsnap_nbd::config::check_disk_size(size)
        .map_err(|why| anyhow!("unable to serve {}: {why}", args.origin.display()))?;
    // What other commands check their destinations against, even if we do not answer.
    // Removed when `run` returns, on failure and after shutdown alike.
    let _origin_record = cowsnap_nbd::attached::OriginRecordFile::write(&paths, &args.origin)?;
    let (origin, filling, changelog) = open_origin_state(&args, &paths, dest)?;
    // `..Default::default()`: the engine's config grows (name, container, throttle);
    // the default container is applied per request in `Daemon::handle`.
    let cfg = EngineConfig {
        name: args.name.clone(),
        chunk_size: args.chunk_size,
        read_only: args.read_only,
        default_container: args.container.clone(),
        ..EngineConfig::default()
    };
    let engine = Engine::new(origin, cfg, changelog.clone()).map_err(|e| anyhow!("{e}"))?;

    // Sockets are born 0600: umask while binding (no other thread runs yet).
    // SAFETY: umask only changes this process's file-creation mask; no other thread
    // exists yet that could create files concurrently.
    let old = unsafe { libc::umask(0o177) };
    let bound = (|| -> Result<_> {
        let nbd = bind_unix(&paths.nbd_socket())?;
        let ctl = bind_unix(&paths.ctl_socket())?;
        let mut tcp = Vec::new();
        for a in &listen {
            tcp.push(TcpListener::bind(a).with_context(|| format!("unable to listen on {a}"))?);
        }
        Ok((nbd, ctl, tcp))
    })();
    // SAFETY: as above; restores the previous mask.
    unsafe { libc::umask(old) };
    let (nbd_l, ctl_l, tcp_l) = match bound {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_file(paths.nbd_socket());
            let _ = std::fs::remove_file(paths.ctl_socket());
            return Err(e);
        }
    };

    let server = Server::with_limits(limits);
    let export: Arc<dyn Export> = engine.clone();
    let desc = format!("cowsnap disk {} ({})", args.name, args.origin.display());
    server.set_export(&args.name, export.clone(), &desc);
    server.set_export("", export, &desc);

    let (stop_tx, stop_rx) = crossbeam_channel::unbounded();
    let daemon = Arc::new(Daemon {
        args: args.clone(),
        paths: paths.clone(),
        engine: engine.clone(),
        backups: Backups::new(engine.clone()),
        server: server.clone(),
        started: Instant::now(),
        stop_tx: stop_tx.clone(),
        changelog,
        filling: filling.clone(),
    });
    // The origin seal goes before anything can write to the origin (the fill, NBD
    // clients): from here on a crash leaves none. A start that failed before this
    // point wrote nothing, so its seal stays valid.
    if !args.read_only {
        origin_seal::remove_seal(&paths.disk_state_dir()).map_err(|e| anyhow!("{e}"))?;
    }
    if let Some(f) = &filling {
        // Hidden knob for tests and demos: limit the background fill (bytes/s).
        if let Some(rate) = std::env::var("COWSNAP_FILL_RATE")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            log::info!("background fill limited to {rate} bytes/s (COWSNAP_FILL_RATE)");
            f.set_fill_rate(rate);
        }
        f.start_fill();
    }

    {
        let tx = stop_tx.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                match sigs.wait() {
                    Ok(sig) => {
                        let _ = tx.send(Stop::Signal(sig as i32));
                    }
                    Err(e) => {
                        log::error!("sigwait: {e}");
                        return;
                    }
                }
            })
            .context("unable to start the signal thread")?;
    }

    server.spawn_unix(nbd_l);
    for l in tcp_l {
        server.spawn_tcp(l);
    }
    {
        let d = daemon.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in ctl_l.incoming() {
                    match conn {
                        Ok(s) => {
                            let d2 = d.clone();
                            let _ = std::thread::Builder::new()
                                .name("control-conn".into())
                                .spawn(move || d2.serve_control_conn(s));
                        }
                        Err(e) => log::warn!("control accept: {e}"),
                    }
                }
            })
            .context("unable to start the control thread")?;
    }

    let pid_tmp = paths.run_dir.join(format!(".{}.pid.tmp", args.name));
    std::fs::write(&pid_tmp, format!("{}\n", std::process::id()))
        .and_then(|_| std::fs::rename(&pid_tmp, paths.pid_file()))
        .with_context(|| format!("unable to write {}", paths.pid_file().display()))?;

    log::info!(
        "serving {} ({} bytes, io {}{}) as {} ; control {}{}",
        args.origin.display(),
        size,
        engine.origin().engine_name(),
        if args.read_only { ", read-only" } else { "" },
        paths.uri(),
        paths.ctl_socket().display(),
        if listen.is_empty() {
            String::new()
        } else {
            format!(
                " ; tcp {}",
                listen
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    );

    let why = wait_stop(&stop_rx);
    log::info!("stopping ({why})");
    shutdown(&daemon);
    Ok(())
}

/// What identifies the destination of a live restore across restarts.
fn origin_key(origin: &Path) -> String {
    std::fs::canonicalize(origin)
        .unwrap_or_else(|_| origin.to_path_buf())
        .display()
        .to_string()
}

/// A fill state belongs to one destination: never fill another disk from it.
fn check_fill_origin(sdir: &Path, origin: &Path) -> Result<()> {
    let want = std::fs::read_to_string(sdir.join("fill.origin")).unwrap_or_default();
    let have = origin_key(origin);
    if want != have {
        bail!(
            "the state directory {} holds a live restore onto {:?}, not {have:?}: \
             attach under another --name, or remove that directory if the restore is abandoned",
            sdir.display(),
            want
        );
    }
    Ok(())
}

type OriginState = (
    Arc<dyn cowsnap_core::blockio::BlockIo>,
    Option<Arc<FillingIo>>,
    Option<Arc<ChangeLog>>,
);

/// The disk's state (identity, change log) and, for a disk being restored on the fly,
/// the filling layer over the destination. A fresh `--restore-from` starts a new
/// identity (new lineage, tracking relative to the generation); a restart finds the
/// fill state in the disk's state directory and resumes the fill.
fn open_origin_state(
    args: &Args,
    paths: &DiskPaths,
    dest: Arc<dyn cowsnap_core::blockio::BlockIo>,
) -> Result<OriginState> {
    let size = dest.size();
    if args.read_only {
        if args.restore_from.is_some() {
            bail!("--restore-from cannot be combined with --read-only");
        }
        return Ok((dest, None, None));
    }
    make_dir(&args.state_dir, 0o700)?;
    let sdir = paths.disk_state_dir();
    // Whether the seal proves the origin unchanged (it is removed later, in `run`,
    // before the origin is served).
    let unproven = check_origin_seal(&args.origin, &sdir);
    let mut fresh_restore = false;
    let fill_state = paths.fill_state();
    let mut filling = None;
    // Named in the repository's pin while the live restore is unfinished.
    let owner = restore::live::PinOwner {
        disk: args.name.clone(),
        destination: origin_key(&args.origin),
    };
    if let Some(spec) = &args.restore_from {
        let rest = spec
            .strip_prefix("repo:")
            .ok_or_else(|| anyhow!("invalid --restore-from {spec:?}: expected repo:DIR@GEN"))?;
        let (dir, gen) = match rest.rsplit_once('@') {
            Some((d, g)) => (PathBuf::from(d), Some(g.to_string())),
            None => (PathBuf::from(rest), None),
        };
        let repo = Repo::open(&dir).map_err(|e| anyhow!("{e}"))?;
        let g = repo.resolve(gen.as_deref()).map_err(|e| anyhow!("{e}"))?;
        if g.disk_size > size {
            bail!(
                "unable to restore generation {} ({} bytes) onto {} ({size} bytes): too small",
                g.id,
                g.disk_size,
                args.origin.display()
            );
        }
        // A completed earlier restore under this name is not resumed: restoring again
        // (the same generation or another) starts afresh.
        let pending = restore::live::read_fill_state(&fill_state)
            .map_err(|e| anyhow!("{e}"))?
            .is_some_and(|(_, complete)| !complete);
        if !pending {
            // A fresh restore: whatever state this name had belongs to another disk.
            if sdir.exists() {
                std::fs::remove_dir_all(&sdir)
                    .with_context(|| format!("unable to reset {}", sdir.display()))?;
            }
            make_dir(&sdir, 0o700)?;
            restore::init_restored_state(&sdir, &dir, &g.id, size, args.chunk_size)
                .map_err(|e| anyhow!("{e}"))?;
            // Exact by construction: the content is the generation's, filled from now.
            fresh_restore = true;
            std::fs::write(sdir.join("fill.origin"), origin_key(&args.origin))
                .with_context(|| format!("unable to write {}", sdir.display()))?;
        }
        check_fill_origin(&sdir, &args.origin)?;
        let f = FillingIo::open_pinned(dest.clone(), &dir, Some(&g.id), &fill_state, &owner)
            .map_err(|e| anyhow!("{e}"))?;
        filling = Some(f);
    } else if fill_state.exists() {
        check_fill_origin(&sdir, &args.origin)?;
        let id = Identity::load_or_create(&sdir).map_err(|e| anyhow!("{e}"))?;
        let from = id.restored_from.ok_or_else(|| {
            anyhow!(
                "{} holds a fill state but the identity names no repository",
                sdir.display()
            )
        })?;
        let f = FillingIo::open_pinned(
            dest.clone(),
            Path::new(&from.repo),
            Some(&from.generation),
            &fill_state,
            &owner,
        )
        .map_err(|e| anyhow!("unable to resume the live restore: {e}"))?;
        if !f.fill_status().complete {
            log::info!(
                "resuming the live restore of generation {} from {}",
                from.generation,
                from.repo
            );
        }
        filling = Some(f);
    }
    make_dir(&sdir, 0o700)?;
    let cl = ChangeLog::open_in(&sdir, size, args.chunk_size)
        .map_err(|e| anyhow!("unable to open the change log: {e}"))?;
    if let (false, Some(rel), Some(why)) = (fresh_restore, cl.relative_to(), unproven) {
        log::warn!("change tracking (relative to {rel}) is not trusted: {why}");
        cl.distrust(&why)
            .map_err(|e| anyhow!("unable to reset the change log: {e}"))?;
    }
    let origin: Arc<dyn cowsnap_core::blockio::BlockIo> = match &filling {
        Some(f) => f.clone(),
        None => dest,
    };
    Ok((origin, filling, Some(Arc::new(cl))))
}

/// Check the origin seal of the state directory `sdir` against the origin as it is
/// now. `None`: the origin is proven to be the one tracked, unchanged since the last
/// clean stop; else why not.
fn check_origin_seal(origin: &Path, sdir: &Path) -> Option<String> {
    if !sdir.exists() {
        return Some("the disk has no state yet".into());
    }
    match origin_seal::read_seal(sdir) {
        Err(e) => Some(format!("the origin seal is unreadable ({e})")),
        Ok(None) => Some(
            "no origin seal: the disk was not detached cleanly (or its state predates origin \
             seals), so changes to the origin since its last daemon are unknown"
                .into(),
        ),
        Ok(Some(s)) => match origin_seal::observe(origin) {
            Err(e) => Some(format!("unable to examine the origin: {e}")),
            Ok(now) => s.check(&now).err(),
        },
    }
}

/// At a clean shutdown: record the origin seal, but only when nothing can write to the
/// origin any more: no NBD connection left, a live restore's fill stopped, no backup
/// that could fetch chunks through the fill, and the final flush succeeded. Otherwise
/// no seal: the next start does not trust the tracking.
fn seal_origin(d: &Daemon, flushed: bool) {
    let skip = |why: &str| {
        log::warn!("origin not sealed ({why}): the next incremental will read everything")
    };
    if !flushed {
        return skip("the final flush failed");
    }
    if d.server.connections() > 0 {
        return skip("NBD connections are still open");
    }
    if let Some(f) = &d.filling {
        if f.fill_running() {
            return skip("the live restore's fill is still running");
        }
        let backup_running = d
            .backups
            .status()
            .is_some_and(|b| b.state == "running" || b.state == "quiescing");
        if !f.fill_status().complete && backup_running {
            return skip("a backup is still reading through the live restore");
        }
    }
    let sdir = d.paths.disk_state_dir();
    match origin_seal::observe_for_seal(&d.args.origin)
        .and_then(|st| origin_seal::write_seal(&sdir, &d.args.origin, st))
    {
        Ok(()) => log::info!("origin sealed"),
        Err(e) => skip(&e.to_string()),
    }
}

fn wait_stop(rx: &Receiver<Stop>) -> String {
    match rx.recv() {
        Ok(Stop::Signal(s)) => format!("signal {s}"),
        Ok(Stop::Command) => "shutdown command".into(),
        Err(_) => "all senders gone".into(),
    }
}

fn shutdown(d: &Daemon) {
    d.server.shutdown();
    let _ = std::fs::remove_file(d.paths.nbd_socket());
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.server.connections() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if d.server.connections() > 0 {
        log::warn!(
            "{} NBD connection(s) still open at shutdown",
            d.server.connections()
        );
    }
    if let Some(f) = &d.filling {
        f.stop_fill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while f.fill_running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    if !d.args.read_only {
        let flushed = match d.engine.flush() {
            Ok(()) => {
                log::info!("origin flushed");
                true
            }
            Err(e) => {
                log::error!("unable to flush the origin at shutdown: {e}");
                false
            }
        };
        if d.changelog.is_some() {
            seal_origin(d, flushed);
        }
    }
    let _ = std::fs::remove_file(d.paths.ctl_socket());
    let _ = std::fs::remove_file(d.paths.pid_file());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_daemon(dir: &Path) -> Daemon {
        let origin = dir.join("disk.img");
        let f = std::fs::File::create(&origin).unwrap();
        f.set_len(4 << 20).unwrap();
        let args = Args::parse_from([
            "cowsnap-nbd",
            "--name",
            "t1",
            "--origin",
            origin.to_str().unwrap(),
            "--run-dir",
            dir.to_str().unwrap(),
            "--state-dir",
            dir.to_str().unwrap(),
            "--io-engine",
            "sync",
        ]);
        let io = blockio::open(&OpenSpec {
            path: origin.clone(),
            read_only: false,
            exclusive: true,
            engine: blockio::IoEngine::Sync,
            direct: false,
        })
        .unwrap();
        let engine = Engine::new(io, EngineConfig::default(), None).unwrap();
        let (tx, _rx) = crossbeam_channel::unbounded();
        Daemon {
            paths: DiskPaths::new("t1", dir, dir),
            args,
            backups: Backups::new(engine.clone()),
            engine,
            server: Server::new(),
            started: Instant::now(),
            stop_tx: tx,
            changelog: None,
            filling: None,
        }
    }

    #[test]
    fn control_lines_get_replies() {
        let dir = tempfile::tempdir().unwrap();
        let d = test_daemon(dir.path());
        let (r, stop) = d.handle_line(r#"{"v":1,"cmd":"status"}"#);
        assert!(!stop);
        let m = control::decode_reply(&r).unwrap();
        let st: StatusInfo = serde_json::from_value(serde_json::Value::Object(m)).unwrap();
        assert_eq!(st.name, "t1");
        assert_eq!(st.size, 4 << 20);
        assert_eq!(st.io_engine, "sync");
        assert!(st.uri.ends_with("t1.nbd"), "{}", st.uri);

        d.engine.write(0, &[1u8; 4096], false).unwrap();
        let (r, _) = d.handle_line(r#"{"v":1,"cmd":"flush"}"#);
        assert!(control::decode_reply(&r).is_ok());
        let (r, _) = d.handle_line(r#"{"v":1,"cmd":"status"}"#);
        let m = control::decode_reply(&r).unwrap();
        assert_eq!(m["stats"]["writes"], 1);
        assert_eq!(m["stats"]["flushes"], 1);

        for bad in ["hello", "{}", r#"{"v":1,"cmd":"nope"}"#, "\u{0}\u{1}"] {
            let (r, stop) = d.handle_line(bad);
            assert!(!stop);
            assert!(
                matches!(
                    control::decode_reply(&r),
                    Err(control::ControlError::Daemon(_))
                ),
                "{bad:?} → {r}"
            );
        }
        let (r, stop) = d.handle_line(r#"{"v":1,"cmd":"shutdown"}"#);
        assert!(stop);
        assert!(control::decode_reply(&r).is_ok());
    }

    #[test]
    fn backup_errors_are_replies() {
        let dir = tempfile::tempdir().unwrap();
        let d = test_daemon(dir.path());
        let (r, _) =
            d.handle_line(r#"{"v":1,"cmd":"backup","params":{"to":"file:/nonexistent/x"}}"#);
        // Whatever the engine answers, the reply is well-formed.
        let parsed: serde_json::Value = serde_json::from_str(&r).unwrap();
        assert_eq!(parsed["v"], 1);
        assert!(parsed["ok"].is_boolean());
        let (r, _) = d.handle_line(r#"{"v":1,"cmd":"backup_status"}"#);
        let m = control::decode_reply(&r).unwrap();
        assert!(m.contains_key("backup"));
    }

    #[test]
    fn backup_onto_its_own_origin_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = test_daemon(dir.path());
        let origin = dir.path().join("disk.img");
        std::fs::write(&origin, vec![7u8; 4 << 20]).unwrap();
        let link = dir.path().join("link.img");
        std::fs::hard_link(&origin, &link).unwrap();
        for req in [
            format!(
                r#"{{"v":1,"cmd":"backup","params":{{"to":"file:{}"}}}}"#,
                link.display()
            ),
            format!(
                r#"{{"v":1,"cmd":"backup","params":{{"to":"file:{}/x.img","container":"dev:{}"}}}}"#,
                dir.path().display(),
                origin.display()
            ),
        ] {
            let (r, _) = d.handle_line(&req);
            match control::decode_reply(&r) {
                Err(control::ControlError::Daemon(m)) => {
                    assert!(m.contains("is the origin of attached disk \"t1\""), "{m}")
                }
                other => panic!("{req} → {other:?}"),
            }
        }
        assert_eq!(std::fs::read(&origin).unwrap(), vec![7u8; 4 << 20]);
        assert!(!dir.path().join("x.img").exists());
    }

    #[test]
    fn origin_seal_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let origin = dir.path().join("disk.img");
        std::fs::write(&origin, vec![0u8; 1 << 16]).unwrap();
        let sdir = dir.path().join("state");
        assert!(check_origin_seal(&origin, &sdir).is_some());
        std::fs::create_dir_all(&sdir).unwrap();
        let why = check_origin_seal(&origin, &sdir).unwrap();
        assert!(why.contains("no origin seal"), "{why}");
        let seal = |p: &Path| {
            origin_seal::write_seal(&sdir, p, origin_seal::observe_for_seal(p).unwrap()).unwrap()
        };
        seal(&origin);
        assert_eq!(check_origin_seal(&origin, &sdir), None);
        origin_seal::remove_seal(&sdir).unwrap();
        assert!(check_origin_seal(&origin, &sdir).is_some());
        seal(&origin);
        std::fs::write(&origin, vec![1u8; 1 << 16]).unwrap();
        let why = check_origin_seal(&origin, &sdir).unwrap();
        assert!(why.contains("modified while detached"), "{why}");
        let other = dir.path().join("other.img");
        std::fs::write(&other, vec![0u8; 1 << 16]).unwrap();
        seal(&origin);
        let why = check_origin_seal(&other, &sdir).unwrap();
        assert!(why.contains("another file"), "{why}");
        std::fs::write(origin_seal::seal_path(&sdir), b"{").unwrap();
        let why = check_origin_seal(&origin, &sdir).unwrap();
        assert!(why.contains("unreadable"), "{why}");
    }

    #[test]
    fn listen_specs() {
        assert_eq!(
            parse_listen("tcp:127.0.0.1:10809").unwrap().to_string(),
            "127.0.0.1:10809"
        );
        assert_eq!(
            parse_listen("tcp:[::1]:10").unwrap().to_string(),
            "[::1]:10"
        );
        assert!(parse_listen("127.0.0.1:10809").is_err());
        assert!(parse_listen("tcp:127.0.0.1").is_err());
        assert!(parse_listen("unix:/x").is_err());
    }
}
