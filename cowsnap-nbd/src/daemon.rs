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
//! origin, close the change log, seal the origin, remove the sockets and the pid
//! file, exit 0.
//!
//! With `--fuse-mount DIR` the export is also the file `DIR/disk` of the daemon's own
//! FUSE server (`cowsnap_nbd::fuse`), mounted after the engine is built and before the
//! pid file is written; shutdown detaches loop devices on it and unmounts it first.
//!
//! With `--ublk` the export is also the block device `/dev/ublkbN` of the daemon's own
//! ublk server (`cowsnap_nbd::ublk`), started after the FUSE mount and before the pid
//! file, its id written to `RUN_DIR/NAME.ublk` for `cowsnapctl attach`; shutdown stops
//! and deletes the device before the final flush.
//!
//! Threads: one signal thread (SIGTERM/SIGINT are blocked everywhere else), the NBD
//! server's accept threads, the FUSE workers (`--fuse-threads`), one control accept
//! thread and one thread per control connection. The main thread waits for a stop event.
//!
//! Change tracking is bound to the origin (`cowsnap_core::origin_seal`): at start the
//! seal the last daemon left is checked (`cowsnap_core::disk_state`) and removed before
//! anything is served; a clean shutdown closes the change log and seals the origin
//! again after the final flush.
//!
//! With `--generation repo:DIR@GEN` the daemon serves a repository generation instead
//! of an origin (`cowsnap_core::restore::generation_export`): read-only, no state
//! directory, no origin lock or record, no seal; the generation is pinned from start-up
//! until the clean stop removes the pin (a killed daemon's pin is stale: its `flock`
//! is gone, and prune removes it).
//!
//! This file is the process plumbing (start-up order, sockets, signals, shutdown);
//! the command line is `cli.rs`, the disk's state `cowsnap_core::disk_state`, the
//! control socket `cowsnap_nbd::control::server`.

use anyhow::{anyhow, bail, Context, Result};
use cowsnap_core::backup::{Backups, LastBackupRecord};
use cowsnap_core::blockio::{self, BlockIo, OpenSpec};
use cowsnap_core::changelog::ChangeLog;
use cowsnap_core::disk_state::{self, DiskStateOptions};
use cowsnap_core::engine::{Engine, EngineConfig};
use cowsnap_core::export::Export;
use cowsnap_core::identity::RestoredFrom;
use cowsnap_core::origin_seal;
use cowsnap_core::restore::generation_export::GenerationExport;
use cowsnap_core::restore::live::FillingIo;
use cowsnap_nbd::cli::{self, Args};
use cowsnap_nbd::control::{self, server::ControlServer};
use cowsnap_nbd::fuse::FuseServer;
use cowsnap_nbd::name_lock::{self, NameLock};
use cowsnap_nbd::nbd::server::Server;
use cowsnap_nbd::paths::DiskPaths;
use cowsnap_nbd::ublk::{self, UblkServer};
use crossbeam_channel::{Receiver, Sender};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::stat::Mode;
use std::net::TcpListener;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
        let lock = unsafe { NameLock::adopt(fd, &path) }?;
        return Ok(NameHold {
            lock: Some(lock),
            own: false,
        });
    }
    match NameLock::try_acquire(&path)? {
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

/// What shutdown needs.
struct Daemon {
    origin: PathBuf,
    read_only: bool,
    paths: DiskPaths,
    engine: Arc<Engine>,
    backups: Arc<Backups>,
    server: Arc<Server>,
    fuse: Option<Arc<FuseServer>>,
    ublk: Option<Arc<UblkServer>>,
    changelog: Option<Arc<ChangeLog>>,
    filling: Option<Arc<FillingIo>>,
    generation: Option<Arc<GenerationExport>>,
}

/// The disk's state for serving `dest`: none for a read-only export, else identity,
/// change log and (for a live restore) the filling layer (`cowsnap_core::disk_state`).
struct Served {
    io: Arc<dyn BlockIo>,
    filling: Option<Arc<FillingIo>>,
    changelog: Option<Arc<ChangeLog>>,
    restored_from: Option<RestoredFrom>,
}

fn open_disk_state(
    args: &Args,
    origin: &Path,
    paths: &DiskPaths,
    dest: Arc<dyn BlockIo>,
) -> Result<Served> {
    if args.read_only {
        if args.restore_from.is_some() {
            bail!("--restore-from cannot be combined with --read-only");
        }
        return Ok(Served {
            io: dest,
            filling: None,
            changelog: None,
            restored_from: None,
        });
    }
    make_dir(&args.state_dir, 0o700)?;
    let source = args
        .restore_from
        .as_deref()
        .map(cli::restore_source)
        .transpose()?;
    let sdir = paths.disk_state_dir();
    let opts = DiskStateOptions {
        name: &args.name,
        origin,
        state_dir: &sdir,
        chunk_size: args.chunk_size,
        restore_from: source.as_ref().map(|(d, g)| (d.as_path(), g.as_deref())),
    };
    let st = disk_state::open(&opts, dest)?;
    Ok(Served {
        io: st.io,
        filling: st.filling,
        changelog: Some(st.changelog),
        restored_from: st.restored_from,
    })
}

fn init_logging(log_file: Option<&Path>) -> Result<()> {
    cowsnap_nbd::logging::init("info", log_file)?;
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
fn lock_origin(path: &Path) -> Result<Option<Flock<std::fs::File>>> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => {}
        _ => return Ok(None), // devices: O_EXCL in blockio::open; errors reported there
    }
    let f =
        std::fs::File::open(path).with_context(|| format!("unable to open {}", path.display()))?;
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(l)),
        Err((_, Errno::EWOULDBLOCK)) => bail!(
            "unable to lock {}: it is served by another cowsnap daemon (or locked by another program)",
            path.display()
        ),
        Err((_, e)) => {
            Err(std::io::Error::from(e)).with_context(|| format!("unable to lock {}", path.display()))
        }
    }
}

/// Run the daemon until a stop event; returns after cleaning up.
pub fn run(args: Args) -> Result<()> {
    let args = cli::absolute_args(args)?;
    // The repository key of --generation / --restore-from: every repository this
    // process opens by path uses it (a backup brings its own).
    if let Some(k) = &args.key {
        if args.generation.is_none() && args.restore_from.is_none() {
            bail!("--key needs --generation or --restore-from");
        }
        let key = cowsnap_core::repo::crypt::RepoKey::load(k).context("invalid --key")?;
        cowsnap_core::repo::crypt::set_process_key(Some(key));
    }
    // Object-store repositories cache their indexes under the state directory.
    cowsnap_core::repo::cache::set_state_dir(&args.state_dir);
    std::env::set_current_dir("/").context("unable to change the working directory to /")?;
    init_logging(args.log_file.as_deref())?;
    cowsnap_nbd::paths::validate_name(&args.name).context("invalid --name")?;
    cli::check_args(&args)?;
    let limits = cli::nbd_limits(&args)?;
    let paths = DiskPaths::new(&args.name, &args.run_dir, &args.state_dir);
    let listen: Vec<std::net::SocketAddr> = args
        .listen
        .iter()
        .map(|s| cli::parse_listen(s))
        .collect::<Result<_>>()?;
    // TCP needs TLS (or --insecure-tcp); the credentials are read and checked now.
    let tls = cli::tls_config(&args)?;
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

    // A generation: opened (and pinned) here; `origin_path` is then only its label
    // ("repo:DIR@ID"), for status and logs.
    let (origin_path, generation) = match &args.generation {
        Some(spec) => {
            let (dir, gen) = cli::restore_source(spec).context("invalid --generation")?;
            let ge =
                GenerationExport::open(&dir, gen.as_deref(), &args.name, cli::cache_bytes(&args)?)
                    .with_context(|| format!("unable to export {spec}"))?;
            let label = format!("repo:{}@{}", dir.display(), ge.generation().id);
            (PathBuf::from(label), Some(Arc::new(ge)))
        }
        None => (
            args.origin
                .clone()
                .ok_or_else(|| anyhow!("--origin or --generation is needed"))?,
            None,
        ),
    };
    if let Some(r) = &args.restore_from {
        // A live restore overwrites the origin: never another disk's origin or a mount.
        let action = format!("restore {r} onto {}", origin_path.display());
        cowsnap_nbd::attached::check_destination(
            &args.run_dir,
            Some(&args.name),
            &origin_path,
            &action,
        )?;
    }
    let (dest, _origin_lock, _origin_record) = match &generation {
        Some(g) => {
            let io: Arc<dyn BlockIo> = g.clone();
            (io, None, None)
        }
        None => {
            let lock = lock_origin(&origin_path)?;
            let spec = OpenSpec {
                path: origin_path.clone(),
                read_only: args.read_only,
                exclusive: true,
                engine: engine_kind,
                direct: false,
            };
            let dest = blockio::open(&spec)?;
            // What other commands check their destinations against, even if we do not
            // answer. Removed when `run` returns, on failure and after shutdown alike.
            let rec = cowsnap_nbd::attached::OriginRecordFile::write(&paths, &origin_path)?;
            (dest, lock, Some(rec))
        }
    };
    let size = dest.size();
    cowsnap_nbd::paths::check_disk_size(size)
        .map_err(|why| anyhow!("unable to serve {}: {why}", origin_path.display()))?;
    let Served {
        io: origin,
        filling,
        changelog,
        restored_from,
    } = open_disk_state(&args, &origin_path, &paths, dest)?;
    // The disk's default container is known twice: the control server puts it into a
    // backup request that names none (so the destination check sees it before anything
    // is opened), and the engine falls back to it for callers that bypass the socket.
    let cfg = EngineConfig {
        name: args.name.clone(),
        chunk_size: args.chunk_size,
        read_only: args.read_only,
        default_container: args.container.clone(),
        direct_io: args.direct_io == "on",
        ..EngineConfig::default()
    };
    let engine = Engine::new(origin, cfg, changelog.clone())?;

    // Sockets are born 0600: umask while binding (no other thread runs yet, so no
    // other file is created under this mask).
    let old = nix::sys::stat::umask(Mode::from_bits_truncate(0o177));
    let bound = (|| -> Result<_> {
        let nbd = bind_unix(&paths.nbd_socket())?;
        let ctl = bind_unix(&paths.ctl_socket())?;
        let mut tcp = Vec::new();
        for a in &listen {
            tcp.push(TcpListener::bind(a).with_context(|| format!("unable to listen on {a}"))?);
        }
        Ok((nbd, ctl, tcp))
    })();
    nix::sys::stat::umask(old);
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
    let desc = format!("cowsnap disk {} ({})", args.name, origin_path.display());
    server.set_export(&args.name, export.clone(), &desc);
    server.set_export("", export.clone(), &desc);

    let (stop_tx, stop_rx) = crossbeam_channel::unbounded();
    // The last successful backup is remembered in the disk's state directory (a
    // read-only export has none: memory only).
    let last = if args.read_only {
        LastBackupRecord::in_memory()
    } else {
        LastBackupRecord::in_dir(&paths.disk_state_dir())
    };
    let backups = Arc::new(Backups::with_record(engine.clone(), last));
    let control = Arc::new(ControlServer {
        paths: paths.clone(),
        origin: origin_path.clone(),
        read_only: args.read_only,
        listen: args.listen.clone(),
        tls: tls.is_some(),
        container: args.container.clone(),
        engine: engine.clone(),
        backups: backups.clone(),
        server: server.clone(),
        started: Instant::now(),
        changelog: changelog.clone(),
        filling: filling.clone(),
        generation: generation.clone(),
        restored_from,
        on_shutdown: {
            let tx: Sender<Stop> = stop_tx.clone();
            Box::new(move || {
                let _ = tx.send(Stop::Command);
            })
        },
    });
    let mut daemon = Daemon {
        origin: origin_path.clone(),
        read_only: args.read_only,
        paths: paths.clone(),
        engine: engine.clone(),
        backups,
        server: server.clone(),
        fuse: None,
        ublk: None,
        changelog,
        filling: filling.clone(),
        generation,
    };
    // The origin seal goes before anything can write to the origin (the fill, NBD
    // clients): from here on a crash leaves none. A start that failed before this
    // point wrote nothing, so its seal stays valid.
    if !args.read_only {
        origin_seal::remove_seal(&paths.disk_state_dir())?;
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

    // The FUSE file exists before the pid file and the control socket: whoever sees the
    // daemon answer can put a loop device on it.
    if let Some(dir) = &args.fuse_mount {
        let f = FuseServer::mount(
            export.clone(),
            dir,
            args.fuse_threads,
            args.fuse_uring,
            &args.name,
        );
        match f {
            Ok(f) => daemon.fuse = Some(f),
            Err(e) => {
                let _ = std::fs::remove_file(paths.nbd_socket());
                let _ = std::fs::remove_file(paths.ctl_socket());
                return Err(e.into());
            }
        }
    }

    // Likewise the ublk device, and the file naming it.
    if args.ublk {
        let opts = ublk::Options {
            queues: args.ublk_queues,
            depth: args.ublk_depth,
            helpers: args.ublk_helpers,
        };
        let started = UblkServer::start(export.clone(), opts, &args.name).and_then(|u| {
            let tmp = paths.run_dir.join(format!(".{}.ublk.tmp", args.name));
            std::fs::write(&tmp, format!("{}\n", u.id()))
                .and_then(|_| std::fs::rename(&tmp, paths.ublk_file()))
                .map_err(|e| {
                    cowsnap_core::Error::io(
                        format!("unable to write {}", paths.ublk_file().display()),
                        e,
                    )
                })
                .map(|_| u.clone())
                .inspect_err(|_| u.stop())
        });
        match started {
            Ok(u) => daemon.ublk = Some(u),
            Err(e) => {
                if let Some(f) = &daemon.fuse {
                    f.stop();
                }
                let _ = std::fs::remove_file(paths.nbd_socket());
                let _ = std::fs::remove_file(paths.ctl_socket());
                return Err(e.into());
            }
        }
    }

    // The pid file exists before anything answers: whoever sees the daemon answer
    // (cowsnapctl attach, and systemd's PIDFile= of a Type=forking unit after it)
    // finds the pid.
    let pid_tmp = paths.run_dir.join(format!(".{}.pid.tmp", args.name));
    std::fs::write(&pid_tmp, format!("{}\n", std::process::id()))
        .and_then(|_| std::fs::rename(&pid_tmp, paths.pid_file()))
        .with_context(|| format!("unable to write {}", paths.pid_file().display()))?;
    server.spawn_unix(nbd_l);
    for l in tcp_l {
        match &tls {
            Some(t) => server.spawn_tcp_tls(l, t.clone()),
            None => server.spawn_tcp(l),
        };
    }
    control
        .spawn(ctl_l)
        .context("unable to start the control thread")?;

    log::info!(
        "serving {} ({} bytes, io {}{}) as {} ; control {}{}",
        origin_path.display(),
        size,
        engine.origin().engine_name(),
        if args.read_only { ", read-only" } else { "" },
        paths.uri(),
        paths.ctl_socket().display(),
        if listen.is_empty() {
            String::new()
        } else {
            format!(
                " ; tcp{} {}",
                match &tls {
                    Some(t) if t.verify_peer => " (TLS, client certificates required)",
                    Some(_) => " (TLS)",
                    None => " (insecure: no TLS)",
                },
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
    if d.fuse.as_ref().is_some_and(|f| f.live_workers() > 0) {
        return skip("the FUSE file is still in use");
    }
    if let Some(f) = &d.filling {
        if f.fill_running() {
            return skip("the live restore's fill is still running");
        }
        let backup_running = d.backups.status().is_some_and(|b| !b.state.is_finished());
        if !f.fill_status().complete && backup_running {
            return skip("a backup is still reading through the live restore");
        }
    }
    let sdir = d.paths.disk_state_dir();
    match origin_seal::observe_for_seal(&d.origin)
        .and_then(|st| origin_seal::write_seal(&sdir, &d.origin, st))
    {
        Ok(()) => log::info!("origin sealed"),
        Err(e) => skip(&e.to_string()),
    }
}

/// The daemon's threads hold the change log until the process exits, so its `Drop`
/// never runs: record the clean stop explicitly, once no NBD connection can write
/// through it any more (else it stays dirty, as after a crash).
fn close_changelog(d: &Daemon, cl: &ChangeLog) {
    if d.server.connections() > 0 {
        log::warn!("change log left open: NBD connections are still open");
        return;
    }
    if d.fuse.as_ref().is_some_and(|f| f.live_workers() > 0) {
        log::warn!("change log left open: the FUSE file is still in use");
        return;
    }
    if let Err(e) = cl.close() {
        log::warn!("{e:#}");
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
    if let Some(u) = &d.ublk {
        u.stop();
        let _ = std::fs::remove_file(d.paths.ublk_file());
    }
    if let Some(f) = &d.fuse {
        f.stop();
    }
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
    if !d.read_only {
        let flushed = match d.engine.flush() {
            Ok(()) => {
                log::info!("origin flushed");
                true
            }
            Err(e) => {
                log::error!("unable to flush the origin at shutdown: {e:#}");
                false
            }
        };
        if let Some(cl) = &d.changelog {
            close_changelog(d, cl);
            seal_origin(d, flushed);
        }
    }
    if let Some(g) = &d.generation {
        // Connections still open get EIO-free reads until exit; the pin goes now.
        match g.close() {
            Ok(()) => log::info!("generation {} unpinned", g.generation().id),
            Err(e) => log::warn!("{e:#}"),
        }
    }
    let _ = std::fs::remove_file(d.paths.ctl_socket());
    let _ = std::fs::remove_file(d.paths.pid_file());
}
