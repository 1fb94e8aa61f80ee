//! `cowsnapctl attach`: start the disk's daemon in the background, wait until it
//! answers, expose it (the daemon's ublk device, kernel nbd, the daemon's FUSE file +
//! loop, nbdfuse + loop, or nothing), record what was set up.
//!
//! `--via ublk` (`auto`'s first choice where `/dev/ublk-control` exists): the daemon
//! creates `/dev/ublkbN` itself (`cowsnap-nbd --ublk`) before it answers, and names N
//! in `RUN_DIR/NAME.ublk`; the record keeps N so that `detach` (and `attach` after a
//! daemon died) can delete a device its daemon left behind.
//!
//! Everything is validated first (origin type and size, name, flags); then the name
//! lock `RUN_DIR/NAME.lock` is taken before any file of the name is touched, and handed
//! to the daemon, which keeps it for its life: of two attaches of one name, the loser
//! stops at the lock and touches nothing of the winner's. A daemon that fails to start
//! reports one `cowsnap-nbd: error: ...` line, shown here as the reason.
//!
//! Kernel NBD (`--via nbd`) gets `--connections` sockets, each negotiated separately,
//! and a dead connection timeout (`--reconnect-timeout`). When the daemon of such a
//! disk is gone (killed, crashed) while the kernel still holds `/dev/nbdN` (mounted or
//! not), `attach` of the same origin under the same name does not clean up: it starts
//! a new daemon and hands the device new sockets (`NBD_CMD_RECONFIGURE`), so the
//! filesystem on it sees delayed I/O instead of errors. `cowsnapctl restart` does the
//! same for a running daemon after stopping it cleanly (an upgrade: the new binary).

use crate::Dirs;
use anyhow::{anyhow, bail, Context, Result};
use cowsnap_nbd::attach::{self, client, fuse, netlink, AttachRecord, Via};
use cowsnap_nbd::control::{self, Request, StatusInfo};
use cowsnap_nbd::name_lock::{self, NameLock};
use cowsnap_nbd::paths::{self, DiskPaths};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::io::{Read, Seek};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Arguments of `attach`.
#[derive(Debug, clap::Args)]
pub struct AttachArgs {
    /// Block device or regular file to serve.
    pub path: PathBuf,
    /// Disk name (default: derived from PATH, e.g. /dev/sdb → sdb).
    #[arg(long)]
    pub name: Option<String>,
    /// How to expose the disk: the daemon's ublk device (/dev/ublkbN; needs ublk_drv),
    /// kernel nbd, the daemon's FUSE file + loop device, nbdfuse + loop device (the older
    /// FUSE path), or only the NBD URI. auto: ublk, else nbd, else fuse.
    #[arg(long, default_value = "auto", value_parser = ["auto", "ublk", "nbd", "fuse", "nbdfuse", "none"])]
    pub via: String,
    /// Use this kernel NBD device (--via nbd), e.g. /dev/nbd3.
    #[arg(long)]
    pub nbd_device: Option<PathBuf>,
    /// Serve read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Also listen on TCP (tcp:ADDR:PORT, e.g. tcp:127.0.0.1:10809). Repeatable. Needs
    /// --tls-creds (or --insecure-tcp).
    #[arg(long, value_name = "tcp:ADDR:PORT")]
    pub listen: Vec<String>,
    #[command(flatten)]
    pub tls: TcpSecurity,
    /// I/O engine for the origin.
    #[arg(long, default_value = "auto", value_parser = ["auto", "uring", "sync"])]
    pub io_engine: String,
    /// O_DIRECT for a backup's bulk I/O on block devices (the drainer's origin reads,
    /// dev: targets): on (the default) or off.
    #[arg(long, value_parser = ["on", "off"])]
    pub direct_io: Option<String>,
    /// Default backup container (ram:SIZE, file:PATH:SIZE, dev:PATH).
    #[arg(long)]
    pub container: Option<String>,
    /// Tracking chunk size (power of two, e.g. 64K).
    #[arg(long)]
    pub chunk_size: Option<String>,
    /// NBD connections the daemon accepts at once (default 64).
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Connections of the kernel NBD client (--via nbd; default: the number of CPUs,
    /// at most 4; 1 to 16).
    #[arg(long)]
    pub connections: Option<u32>,
    /// How long the kernel NBD device waits for a daemon that went away to come back
    /// before failing I/O (--via nbd), e.g. 60s, 10m.
    #[arg(long, default_value = DEFAULT_RECONNECT_TIMEOUT)]
    pub reconnect_timeout: String,
    /// Print {name, device, uri, pid, via} as JSON.
    #[arg(long)]
    pub json: bool,
    /// Fill the disk from a repository generation while serving it
    /// (set by `cowsnapctl restore --live`).
    #[arg(long, hide = true, value_name = "repo:DIR@GEN")]
    pub restore_from: Option<String>,
    /// Serve this repository generation (`repo:DIR@ID`, absolute) instead of PATH,
    /// read-only (set by `cowsnapctl export` and `mount`; PATH is then its label).
    #[arg(skip)]
    pub generation: Option<String>,
    /// The daemon's chunk cache for a generation (`--cache-size`).
    #[arg(skip)]
    pub cache_size: Option<String>,
    /// Print nothing on success (`cowsnapctl mount` reports instead).
    #[arg(skip)]
    pub quiet: bool,
}

impl AttachArgs {
    /// `attach PATH` with every flag at its default: the base that `up`, `export`,
    /// `mount` and `restore --live` change what they need of.
    pub fn new(path: PathBuf) -> AttachArgs {
        AttachArgs {
            path,
            name: None,
            via: "auto".into(),
            nbd_device: None,
            read_only: false,
            listen: Vec::new(),
            tls: TcpSecurity::default(),
            io_engine: "auto".into(),
            direct_io: None,
            container: None,
            chunk_size: None,
            max_connections: None,
            connections: None,
            reconnect_timeout: DEFAULT_RECONNECT_TIMEOUT.into(),
            json: false,
            restore_from: None,
            generation: None,
            cache_size: None,
            quiet: false,
        }
    }
}

/// How the TCP listeners are protected (`attach` and `export`; the daemon's flags of
/// the same names).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TcpSecurity {
    /// Require TLS on the TCP listeners, with the X.509 credentials in DIR:
    /// server-cert.pem, server-key.pem and (for --tls-verify-peer) ca-cert.pem, as for
    /// qemu-nbd and nbdkit. Clients connect with nbds://. The unix socket stays plain.
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// With --tls-creds: require a client certificate signed by DIR/ca-cert.pem.
    #[arg(long, requires = "tls_creds")]
    pub tls_verify_peer: bool,
    /// Serve --listen TCP addresses in the clear, without TLS: anyone who reaches the
    /// port can read (and unless read-only, write) the disk.
    #[arg(long, conflicts_with = "tls_creds")]
    pub insecure_tcp: bool,
}

impl TcpSecurity {
    /// Check the flags with `listen` and read the credentials (as the daemon will),
    /// before anything is touched. The directory is made absolute.
    pub fn check(&mut self, listen: &[String]) -> Result<()> {
        if let Some(d) = &self.tls_creds {
            self.tls_creds = Some(
                std::path::absolute(d)
                    .with_context(|| format!("unable to resolve {}", d.display()))?,
            );
        }
        cowsnap_nbd::cli::check_tcp_security(
            listen,
            self.tls_creds.as_deref(),
            self.tls_verify_peer,
            self.insecure_tcp,
        )?;
        if let Some(d) = &self.tls_creds {
            cowsnap_nbd::nbd::tls::load(d, self.tls_verify_peer)?;
        }
        Ok(())
    }

    /// The daemon's arguments for these flags.
    pub fn daemon_args(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(d) = &self.tls_creds {
            v.extend(["--tls-creds".to_string(), d.display().to_string()]);
        }
        if self.tls_verify_peer {
            v.push("--tls-verify-peer".into());
        }
        if self.insecure_tcp {
            v.push("--insecure-tcp".into());
        }
        v
    }
}

/// `--reconnect-timeout` when not given.
pub const DEFAULT_RECONNECT_TIMEOUT: &str = "60s";

/// The most kernel NBD connections `--connections` accepts.
pub const MAX_NBD_CONNECTIONS: u32 = 16;

/// Default kernel NBD connections: one per CPU, at most 4 (more rarely helps: each
/// connection has its own kernel receive thread and daemon workers).
pub fn default_connections() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
        .clamp(1, 4)
}

/// Environment variable: seconds attach waits for the daemon and nbdfuse.
pub const ENV_ATTACH_TIMEOUT: &str = "COWSNAP_ATTACH_TIMEOUT";
/// What attach waits without [`ENV_ATTACH_TIMEOUT`], in seconds.
pub const DEFAULT_ATTACH_TIMEOUT_SECS: u64 = 30;
/// Environment variable: the daemon binary cowsnapctl starts.
pub const ENV_NBD_BIN: &str = "COWSNAP_NBD_BIN";

/// How long to wait for the daemon and nbdfuse ([`ENV_ATTACH_TIMEOUT`] seconds).
fn attach_timeout() -> Duration {
    std::env::var(ENV_ATTACH_TIMEOUT)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(DEFAULT_ATTACH_TIMEOUT_SECS))
}

/// The daemon binary: $COWSNAP_NBD_BIN, else next to this program, else on PATH.
pub fn daemon_binary() -> PathBuf {
    if let Some(p) = std::env::var_os(ENV_NBD_BIN) {
        return PathBuf::from(p);
    }
    if let Ok(me) = std::env::current_exe() {
        if let Some(dir) = me.parent() {
            let p = dir.join("cowsnap-nbd");
            if p.exists() {
                return p;
            }
        }
    }
    PathBuf::from("cowsnap-nbd")
}

/// The reason a daemon gave for failing, from what it wrote to its log after
/// `offset`: its last `cowsnap-nbd: error:` line, else its last line with `error:`,
/// else its last non-empty line.
pub fn daemon_reason(log: &Path, offset: u64) -> Option<String> {
    let mut f = std::fs::File::open(log).ok()?;
    f.seek(std::io::SeekFrom::Start(offset)).ok()?;
    let mut buf = Vec::new();
    // Bounded: the reason is at the end of what a failing start-up wrote.
    f.take(1 << 20).read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    const FATAL: &str = "cowsnap-nbd: error: ";
    if let Some(l) = lines.iter().rev().find(|l| l.starts_with(FATAL)) {
        return Some(l[FATAL.len()..].to_string());
    }
    lines
        .iter()
        .rev()
        .find(|l| l.contains("error: "))
        .or(lines.last())
        .map(|l| l.to_string())
}

/// Size of a regular file or a block device, without opening it for writing.
fn origin_size(path: &Path, meta: &std::fs::Metadata) -> Result<u64> {
    if meta.is_file() {
        return Ok(meta.len());
    }
    let mut f = std::fs::File::open(path)
        .map_err(|e| anyhow!("unable to attach {}: {e}", path.display()))?;
    f.seek(std::io::SeekFrom::End(0)).map_err(|e| {
        anyhow!(
            "unable to attach {}: unable to read its size: {e}",
            path.display()
        )
    })
}

/// Whether a daemon answers on the disk's control socket.
pub fn daemon_status(paths: &DiskPaths) -> Option<StatusInfo> {
    control::Client::connect(&paths.ctl_socket(), Duration::from_secs(3))
        .ok()?
        .status()
        .ok()
}

/// [`daemon_status`], but "permission denied" on the run directory or the socket is
/// an error saying so, not "no daemon".
pub fn daemon_status_checked(paths: &DiskPaths) -> Result<Option<StatusInfo>> {
    let sock = paths.ctl_socket();
    let denied = || {
        anyhow!(
            "unable to query disk {:?}: permission denied on {} (the daemon's files belong \
             to the user that attached it, usually root)",
            paths.name,
            sock.display()
        )
    };
    let is_denied = |e: &std::io::Error| e.kind() == std::io::ErrorKind::PermissionDenied;
    if let Err(e) = std::fs::symlink_metadata(&sock) {
        if is_denied(&e) {
            return Err(denied());
        }
    }
    match control::Client::connect(&sock, Duration::from_secs(3)) {
        Ok(mut c) => Ok(c.status().ok()),
        Err(control::ControlError::NotRunning { source, .. }) if is_denied(&source) => {
            Err(denied())
        }
        Err(_) => Ok(None),
    }
}

/// Pid from the disk's pid file.
pub fn read_pid(paths: &DiskPaths) -> Option<i32> {
    std::fs::read_to_string(paths.pid_file())
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn make_dir(p: &Path, mode: u32) -> Result<()> {
    if !p.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(p)
            .with_context(|| format!("unable to create directory {}", p.display()))?;
    }
    Ok(())
}

fn nbd_index(dev: &Path) -> Result<u32> {
    let s = dev.to_string_lossy();
    s.strip_prefix("/dev/nbd")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("invalid --nbd-device {s:?}: expected /dev/nbdN"))
}

/// The daemon's arguments for `attach` (without `--lock-fd`): recorded, so that
/// `restart` can start the same daemon again.
fn daemon_args(a: &AttachArgs, origin: &Path, paths: &DiskPaths, via: Via) -> Result<Vec<String>> {
    let s = |p: &Path| p.display().to_string();
    let source = match &a.generation {
        Some(g) => ["--generation".to_string(), g.clone()],
        None => ["--origin".to_string(), s(origin)],
    };
    let mut v: Vec<String> = vec![
        "--name".into(),
        paths.name.clone(),
        source[0].clone(),
        source[1].clone(),
        "--run-dir".into(),
        s(&paths.run_dir),
        "--state-dir".into(),
        s(&paths.state_dir),
        "--io-engine".into(),
        a.io_engine.clone(),
    ];
    if let Some(d) = &a.direct_io {
        v.extend(["--direct-io".into(), d.clone()]);
    }
    if via == Via::Fuse {
        v.extend(["--fuse-mount".into(), s(&paths.fuse_dir())]);
    }
    if via == Via::Ublk {
        v.push("--ublk".into());
    }
    if a.read_only {
        v.push("--read-only".into());
    }
    if let Some(c) = &a.cache_size {
        v.extend(["--cache-size".into(), c.clone()]);
    }
    for l in &a.listen {
        v.extend(["--listen".into(), l.clone()]);
    }
    v.extend(a.tls.daemon_args());
    if let Some(c) = &a.container {
        let c = paths::absolute_container(c)
            .with_context(|| format!("unable to resolve --container {c:?}"))?;
        v.extend(["--container".into(), c]);
    }
    if let Some(r) = &a.restore_from {
        v.extend(["--restore-from".into(), r.clone()]);
    }
    if a.generation.is_some() || a.restore_from.is_some() {
        if let Some(k) = crate::key::key_file_for_daemon()? {
            v.extend(["--key".into(), s(&k)]);
        }
    }
    if let Some(n) = a.max_connections {
        v.extend(["--max-connections".into(), n.to_string()]);
    }
    if let Some(c) = &a.chunk_size {
        v.extend([
            "--chunk-size".into(),
            crate::parse::parse_size(c)?.to_string(),
        ]);
    }
    Ok(v)
}

/// Start the daemon (the current binary, see [`daemon_binary`]) with `args` in the
/// background and wait until it answers `status`. The daemon inherits the name lock;
/// `started` gets its pid as soon as it exists.
pub fn start_daemon(
    args: &[String],
    what: &str,
    paths: &DiskPaths,
    lock: &NameLock,
    started: &std::cell::Cell<Option<u32>>,
) -> Result<(u32, StatusInfo)> {
    let log = paths.log_file();
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("unable to open the daemon log {}", log.display()))?;
    let log_start = logf.metadata().map(|m| m.len()).unwrap_or(0);
    let bin = daemon_binary();
    let mut cmd = Command::new(&bin);
    cmd.args(args);
    let lock_fd = lock.raw_fd();
    cmd.arg("--lock-fd").arg(lock_fd.to_string());
    cmd.stdin(Stdio::null())
        .stdout(logf.try_clone().context("unable to duplicate the log fd")?)
        .stderr(logf);
    // SAFETY: the hook runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: setsid(2) and fcntl(2) are, and the nix
    // wrappers around them allocate nothing and touch no memory of the parent.
    // Clearing FD_CLOEXEC lets the daemon inherit the locked name lock.
    unsafe {
        cmd.pre_exec(move || {
            let _ = nix::unistd::setsid();
            fcntl(lock_fd, FcntlArg::F_SETFD(FdFlag::empty()))?;
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("unable to start the daemon {}", bin.display()))?;
    let pid = child.id();
    started.set(Some(pid));
    let deadline = Instant::now() + attach_timeout();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            let why = daemon_reason(&log, log_start)
                .unwrap_or_else(|| format!("the daemon exited ({st}) without a reason"));
            bail!("{what}: {why}");
        }
        if let Some(s) = daemon_status(paths) {
            if s.pid == pid {
                return Ok((pid, s));
            }
        }
        if Instant::now() >= deadline {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            let _ = child.wait();
            bail!(
                "{what}: the daemon did not answer on {} within {:?} (its log: {})",
                paths.ctl_socket().display(),
                attach_timeout(),
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Stop a daemon: `shutdown` over the control socket, SIGTERM as fallback; wait.
/// Leftover files are not removed here: see [`remove_leftovers`].
pub fn stop_daemon(paths: &DiskPaths, pid: Option<i32>) -> Result<()> {
    let asked = control::call(
        &paths.ctl_socket(),
        &Request::Shutdown,
        Duration::from_secs(10),
    );
    let pid = pid.or_else(|| read_pid(paths));
    if let Some(pid) = pid {
        if asked.is_err() && attach::pid_alive(pid) {
            log::warn!("daemon did not take the shutdown command; sending SIGTERM to {pid}");
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        if !attach::wait_pid_gone(pid, Duration::from_secs(30)) {
            bail!("the daemon (pid {pid}) of {:?} did not exit", paths.name);
        }
    }
    Ok(())
}

/// Remove what a stopped daemon and its attach left: sockets, pid files, the attach
/// record. Only while holding the name lock (`_lock`), so nothing of a daemon that
/// has taken the name since is touched.
pub fn remove_leftovers(paths: &DiskPaths, _lock: &NameLock) {
    for p in [
        paths.ctl_socket(),
        paths.nbd_socket(),
        paths.pid_file(),
        paths.fuse_pid_file(),
        paths.ublk_file(),
        paths.attach_record(),
    ] {
        let _ = std::fs::remove_file(p);
    }
}

/// `n` sockets to the daemon, each through the handshake; the export's info.
fn nbd_sockets(
    paths: &DiskPaths,
    n: u32,
) -> Result<(Vec<std::os::unix::net::UnixStream>, client::ExportInfo)> {
    let mut socks = Vec::new();
    let mut first: Option<client::ExportInfo> = None;
    for _ in 0..n.max(1) {
        let mut s = std::os::unix::net::UnixStream::connect(paths.nbd_socket())
            .with_context(|| format!("unable to connect to {}", paths.nbd_socket().display()))?;
        let info = client::handshake(&mut s, &paths.name)
            .with_context(|| format!("unable to negotiate export {:?}", paths.name))?;
        if let Some(f) = &first {
            if f.size != info.size || f.flags != info.flags {
                bail!(
                    "export {:?} changed between two connections ({} → {} bytes, flags {:#x} → {:#x})",
                    paths.name,
                    f.size,
                    info.size,
                    f.flags,
                    info.flags
                );
            }
        }
        first.get_or_insert(info);
        socks.push(s);
    }
    let info = first.ok_or_else(|| anyhow!("no connection to {:?}", paths.name))?;
    Ok((socks, info))
}

/// Kernel nbd: `n` handshaken sockets, handed to the kernel in one `NBD_CMD_CONNECT`.
fn attach_nbd(
    paths: &DiskPaths,
    index: Option<u32>,
    n: u32,
    dead_conn_timeout: u64,
) -> Result<(u32, String)> {
    let (socks, info) = nbd_sockets(paths, n)?;
    let block = match info.min_block {
        Some(b) if (512..=4096).contains(&b) && b.is_power_of_two() => b as u64,
        _ => 512,
    };
    let idx = netlink::connect(&netlink::ConnectParams {
        index,
        size: info.size,
        block_size: block,
        server_flags: u64::from(info.flags),
        timeout: None,
        dead_conn_timeout,
        fds: socks.iter().map(|s| s.as_raw_fd()).collect(),
    })?;
    drop(socks); // the kernel holds its own reference to each socket
    let dev = format!("/dev/nbd{idx}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !Path::new(&dev).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((idx, dev))
}

/// Kernel nbd after a daemon (re)start: new handshaken sockets for the dead
/// connections of `/dev/nbd<index>` (`NBD_CMD_RECONFIGURE`). `size` must be what the
/// kernel device has: another size would not be seen by the kernel.
pub fn reconnect_nbd(
    paths: &DiskPaths,
    index: u32,
    n: u32,
    dead_conn_timeout: Option<u64>,
    size: u64,
) -> Result<()> {
    let (socks, info) = nbd_sockets(paths, n)?;
    if info.size != size {
        bail!(
            "unable to reconnect /dev/nbd{index}: the disk now has {} bytes, the device {size}",
            info.size
        );
    }
    let fds: Vec<_> = socks.iter().map(|s| s.as_raw_fd()).collect();
    netlink::reconfigure(index, dead_conn_timeout, &fds)?;
    Ok(())
}

/// Size in bytes of a block device (BLKGETSIZE64 via seek to the end).
pub fn device_size(dev: &Path) -> Result<u64> {
    let mut f =
        std::fs::File::open(dev).with_context(|| format!("unable to open {}", dev.display()))?;
    f.seek(std::io::SeekFrom::End(0))
        .with_context(|| format!("unable to read the size of {}", dev.display()))
}

/// Undo a kernel/FUSE attach (not the daemon). `lazy`: unmount FUSE lazily.
pub fn undo_device(rec: &AttachRecord) -> Result<()> {
    match rec.via {
        Via::Nbd => {
            if let Some(i) = rec.nbd_index {
                netlink::disconnect(i)?;
            }
        }
        Via::Fuse | Via::Nbdfuse => {
            if let Some(m) = &rec.fuse_mount {
                fuse::detach(&fuse::FuseAttach {
                    mount_dir: m.clone(),
                    nbdfuse_pid: rec.nbdfuse_pid,
                    loop_device: rec.loop_device.clone(),
                    direct_io: rec.direct_io.unwrap_or(false),
                    notes: vec![],
                })?;
            }
        }
        Via::Ublk => {
            // A running daemon removes its device when it stops; a dead one's is
            // deleted here (stopped by the driver already, its id still taken).
            let gone = !attach::pid_alive(rec.pid as i32) || attach::pid_zombie(rec.pid as i32);
            if let (Some(id), true) = (rec.ublk_id, gone) {
                cowsnap_nbd::ublk::ctrl::remove(id)?;
            }
        }
        Via::None => {}
    }
    Ok(())
}

/// The id N of the daemon's `/dev/ublkbN`, as it wrote it to `RUN_DIR/NAME.ublk`.
fn read_ublk_id(paths: &DiskPaths) -> Result<u32> {
    let f = paths.ublk_file();
    let s = std::fs::read_to_string(&f)
        .with_context(|| format!("unable to read {} (the daemon's ublk device)", f.display()))?;
    s.trim().parse().map_err(|_| {
        anyhow!(
            "unable to read {}: {:?} is not a device id",
            f.display(),
            s.trim()
        )
    })
}

/// The leftovers of a daemon that died (killed, crashed): remove its device (unless
/// it is mounted), sockets, pid file and attach record, so the disk can be attached
/// again (a live restore then resumes its fill). Returns false, touching nothing,
/// when the device is still mounted: that needs `detach --force` and an unmount.
fn clean_dead_attach(paths: &DiskPaths, rec: &AttachRecord, lock: &NameLock) -> bool {
    if let Some(dev) = rec.device.as_deref().map(Path::new) {
        if dev.exists() && attach::mounted_at(dev).map_or(true, |m| !m.is_empty()) {
            return false;
        }
    }
    eprintln!(
        "note: cleaning up after the daemon (pid {}) of {:?}, which is gone",
        rec.pid, paths.name
    );
    if let Err(e) = undo_device(rec) {
        eprintln!("warning: {e:#}");
    }
    remove_leftovers(paths, lock);
    true
}

/// `--reconnect-timeout` in whole seconds (at least 1).
fn reconnect_timeout_secs(s: &str) -> Result<u64> {
    let d = crate::parse::parse_duration(s)
        .with_context(|| format!("invalid --reconnect-timeout {s:?}"))?;
    let secs = d.as_secs();
    if secs == 0 || secs > 86_400 {
        bail!("invalid --reconnect-timeout {s:?}: 1 s to 24 h");
    }
    Ok(secs)
}

/// Whether a dead daemon's attach can be resumed: a kernel NBD device that the kernel
/// still holds (waiting for its connections to come back).
fn resumable(rec: &AttachRecord) -> bool {
    rec.via == Via::Nbd && rec.nbd_index.is_some_and(netlink::is_configured)
}

/// `attach` of a disk whose daemon died while the kernel kept `/dev/nbdN`: start a new
/// daemon (with this attach's arguments) and reconnect the device. Refused when the
/// origin or the mode differ from the recorded attach.
fn resume_locked(
    a: &AttachArgs,
    origin: &Path,
    paths: &DiskPaths,
    mut rec: AttachRecord,
    lock: &NameLock,
    started: &std::cell::Cell<Option<u32>>,
) -> Result<()> {
    let name = &paths.name;
    let dev = rec.device.clone().unwrap_or_default();
    if rec.origin != origin.display().to_string() {
        bail!(
            "unable to attach {} as {name:?}: {dev} of that name still waits for its              daemon (origin {}); attach that origin again, or detach --force {name}",
            origin.display(),
            rec.origin
        );
    }
    if rec.read_only != a.read_only {
        bail!(
            "unable to attach {} as {name:?}: {dev} was attached {}; attach it the same way",
            origin.display(),
            if rec.read_only {
                "--read-only"
            } else {
                "read-write"
            }
        );
    }
    eprintln!(
        "note: the daemon (pid {}) of {name:?} is gone and the kernel still holds {dev};          starting a new one and reconnecting",
        rec.pid
    );
    let args = daemon_args(a, origin, paths, rec.via)?;
    let what = format!("unable to attach {} as {name:?}", origin.display());
    resume_daemon(paths, &mut rec, args, &what, lock, started)?;
    if !dev.is_empty() {
        if let Err(e) = crate::devlink::publish(name, Path::new(&dev)) {
            eprintln!("warning: {e:#} (the disk is attached as {dev})");
        }
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "name": name, "device": rec.device, "uri": rec.uri, "pid": rec.pid,
                "via": rec.via, "read_only": rec.read_only, "resumed": true,
            })
        );
    } else {
        eprintln!(
            "reconnected {dev} to {name:?}; daemon pid {}; {}",
            rec.pid, rec.uri
        );
        println!("{dev}");
    }
    Ok(())
}

/// Start a daemon for `rec`'s disk with `args`, reconnect its kernel device (if it has
/// one) and save the record with the new pid. On a failure the new daemon is stopped
/// and the record left as it was (the kernel device goes on waiting).
pub fn resume_daemon(
    paths: &DiskPaths,
    rec: &mut AttachRecord,
    args: Vec<String>,
    what: &str,
    lock: &NameLock,
    started: &std::cell::Cell<Option<u32>>,
) -> Result<()> {
    let (pid, st) = start_daemon(&args, what, paths, lock, started)?;
    let r = (|| -> Result<()> {
        if let (Via::Nbd, Some(idx)) = (rec.via, rec.nbd_index) {
            let dev = Path::new(rec.device.as_deref().unwrap_or(""));
            let size = device_size(dev)?;
            let n = rec.nbd_connections.unwrap_or(1);
            reconnect_nbd(paths, idx, n, rec.dead_conn_timeout, size)?;
        }
        let mut new = rec.clone();
        new.pid = pid;
        new.uri = st.uri.clone();
        new.daemon_args = args.clone();
        new.save(&paths.attach_record())?;
        *rec = new;
        Ok(())
    })();
    if let Err(e) = r {
        if let Err(e2) = stop_daemon(paths, Some(pid as i32)) {
            eprintln!("cowsnapctl: cleanup: {e2:#}");
        }
        return Err(e.context(what.to_string()));
    }
    Ok(())
}

pub fn run(dirs: &Dirs, mut a: AttachArgs) -> Result<()> {
    let origin = a.path.clone();
    let meta = std::fs::metadata(&origin)
        .map_err(|e| anyhow!("unable to attach {}: {e}", origin.display()))?;
    if !(meta.file_type().is_block_device() || meta.is_file()) {
        bail!(
            "unable to attach {}: not a block device or a regular file",
            origin.display()
        );
    }
    let origin = std::fs::canonicalize(&origin)
        .with_context(|| format!("unable to resolve {}", origin.display()))?;
    let size = origin_size(&origin, &meta)?;
    paths::check_disk_size(size)
        .map_err(|why| anyhow!("unable to attach {}: {why}", origin.display()))?;
    let name = match &a.name {
        Some(n) => n.clone(),
        None => paths::derive_name(&origin),
    };
    paths::validate_name(&name).map_err(|e| anyhow!("invalid --name: {e}"))?;
    for l in &a.listen {
        if !l.starts_with("tcp:")
            || l.rsplit_once(':')
                .map(|(_, p)| p.parse::<u16>().is_err())
                .unwrap_or(true)
        {
            bail!("invalid --listen {l:?}: expected tcp:ADDR:PORT");
        }
    }
    a.tls.check(&a.listen)?;
    // Every later backup depends on these: refuse bad values now, before the daemon.
    let chunk_size = match &a.chunk_size {
        Some(c) => cowsnap_core::engine::check_chunk_size(crate::parse::parse_size(c)?)?,
        None => cowsnap_core::engine::EngineConfig::default().chunk_size,
    };
    if let Some(c) = &a.container {
        cowsnap_core::container::check_default(c, chunk_size)?;
    }
    if a.max_connections == Some(0) {
        bail!("invalid --max-connections 0: at least one connection is needed");
    }
    reconnect_timeout_secs(&a.reconnect_timeout)?;
    let via = parse_via(&a.via);
    if via == Via::Ublk {
        attach::check_ublk()?;
    }
    if let Some(n) = a.connections {
        if via != Via::Nbd {
            bail!("--connections {n} needs --via nbd (this attach uses {via})");
        }
        if !(1..=MAX_NBD_CONNECTIONS).contains(&n) {
            bail!("invalid --connections {n}: 1 to {MAX_NBD_CONNECTIONS}");
        }
        if let Some(m) = a.max_connections {
            if n as usize > m {
                bail!("invalid --connections {n}: more than --max-connections {m}");
            }
        }
    }
    let index = match &a.nbd_device {
        Some(d) if via != Via::Nbd => bail!(
            "--nbd-device {} needs --via nbd (this attach uses {via})",
            d.display()
        ),
        Some(d) => Some(nbd_index(d)?),
        None => None,
    };
    run_named(dirs, &a, &origin, &name, via, index).map(|_| ())
}

/// `attach` once everything is validated: take the name, start the daemon, expose it.
/// Returns what was set up.
pub fn run_named(
    dirs: &Dirs,
    a: &AttachArgs,
    origin: &Path,
    name: &str,
    via: Via,
    index: Option<u32>,
) -> Result<AttachRecord> {
    let name = name.to_string();
    let paths = dirs.paths(&name);
    make_dir(&dirs.run_dir, 0o700)?;
    make_dir(&dirs.state_dir, 0o700)?;

    // The name is ours from here on, or we stop without touching anything of it.
    let lock = match NameLock::try_acquire(&paths.lock_file())? {
        Some(l) => l,
        None => {
            if let Some(s) = daemon_status(&paths) {
                bail!(
                    "a disk named {name:?} is already attached (origin {}, daemon pid {}); \
                     detach it first (cowsnapctl detach {name}) or choose another --name",
                    s.origin,
                    s.pid
                );
            }
            bail!(
                "unable to attach {} as {name:?}: the name is already attached or being \
                 attached (pid {} holds {})",
                origin.display(),
                name_lock::holder_pid(&paths.lock_file())
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "?".into()),
                paths.lock_file().display()
            );
        }
    };
    let started = std::cell::Cell::new(None);
    let r = attach_locked(a, origin, &name, via, index, &paths, &lock, &started);
    match (&r, started.get()) {
        // The daemon holds the lock now (inherited); our copy just closes.
        (Ok(_), _) => drop(lock),
        // Our daemon outlived the failure: it still holds the name; leave the file.
        (Err(_), Some(pid)) if attach::pid_alive(pid as i32) && !attach::pid_zombie(pid as i32) => {
            drop(lock)
        }
        (Err(_), _) => lock.remove(),
    }
    r
}

/// The `--via` value as a [`Via`] (`auto`: ublk, else kernel nbd, else FUSE, by which
/// devices exist).
pub fn parse_via(v: &str) -> Via {
    match v {
        "ublk" => Via::Ublk,
        "nbd" => Via::Nbd,
        "fuse" => Via::Fuse,
        "nbdfuse" => Via::Nbdfuse,
        "none" => Via::None,
        _ => attach::auto_via(),
    }
}

/// Check `--listen` values (tcp:ADDR:PORT).
pub fn check_listen(listen: &[String]) -> Result<()> {
    for l in listen {
        if !l.starts_with("tcp:")
            || l.rsplit_once(':')
                .map(|(_, p)| p.parse::<u16>().is_err())
                .unwrap_or(true)
        {
            bail!("invalid --listen {l:?}: expected tcp:ADDR:PORT");
        }
    }
    Ok(())
}

/// The part of `attach` done while holding the name lock.
#[allow(clippy::too_many_arguments)]
fn attach_locked(
    a: &AttachArgs,
    origin: &Path,
    name: &str,
    via: Via,
    index: Option<u32>,
    paths: &DiskPaths,
    lock: &NameLock,
    started: &std::cell::Cell<Option<u32>>,
) -> Result<AttachRecord> {
    let paths = paths.clone();
    let name = name.to_string();
    if let Some(s) = daemon_status(&paths) {
        bail!(
            "a disk named {name:?} is already attached (origin {}, daemon pid {}); \
             detach it first (cowsnapctl detach {name}) or choose another --name",
            s.origin,
            s.pid
        );
    }
    if let Ok(Some(rec)) = AttachRecord::load(&paths.attach_record()) {
        let alive = attach::pid_alive(rec.pid as i32) && !attach::pid_zombie(rec.pid as i32);
        if !alive && resumable(&rec) && a.generation.is_none() {
            resume_locked(a, origin, &paths, rec.clone(), lock, started)?;
            return Ok(rec);
        }
        if alive || !clean_dead_attach(&paths, &rec, lock) {
            bail!(
                "a disk named {name:?} has a stale attach record ({}; daemon pid {} not answering); \
                 clean it up with: cowsnapctl detach {name} --force",
                paths.attach_record().display(),
                rec.pid
            );
        }
    }

    let args = daemon_args(a, origin, &paths, via)?;
    let what = format!("unable to attach {} as {name:?}", origin.display());
    let (pid, st) = start_daemon(&args, &what, &paths, lock, started)?;
    let mut rec = AttachRecord {
        name: name.clone(),
        origin: origin.display().to_string(),
        via,
        device: None,
        uri: st.uri.clone(),
        pid,
        nbd_index: None,
        ublk_id: None,
        fuse_mount: None,
        nbdfuse_pid: None,
        loop_device: None,
        direct_io: None,
        read_only: a.read_only,
        nbd_connections: None,
        dead_conn_timeout: None,
        daemon_args: args,
    };
    // Recorded at once, so that `detach --force` finds the daemon if this process dies.
    if let Err(e) = rec.save(&paths.attach_record()) {
        if stop_daemon(&paths, Some(pid as i32)).is_ok() {
            remove_leftovers(&paths, lock);
        }
        return Err(e.into());
    }
    let exposed: Result<Vec<String>> = (|| {
        let mut notes = Vec::new();
        match via {
            Via::None => {}
            Via::Ublk => {
                let id = read_ublk_id(&paths)?;
                rec.ublk_id = Some(id);
                rec.device = Some(cowsnap_nbd::ublk::abi::block_path(id));
            }
            Via::Nbd => {
                let n = a.connections.unwrap_or_else(default_connections);
                let t = reconnect_timeout_secs(&a.reconnect_timeout)?;
                let (idx, dev) = attach_nbd(&paths, index, n, t)?;
                rec.nbd_index = Some(idx);
                rec.device = Some(dev);
                rec.nbd_connections = Some(n);
                rec.dead_conn_timeout = Some(t);
            }
            Via::Fuse => {
                let fa = fuse::attach_file(&paths.fuse_dir(), a.read_only)?;
                rec.fuse_mount = Some(fa.mount_dir.clone());
                rec.loop_device = fa.loop_device.clone();
                rec.device = fa.loop_device.clone();
                rec.direct_io = Some(fa.direct_io);
                notes = fa.notes;
            }
            Via::Nbdfuse => {
                let fa = fuse::attach(
                    &st.uri,
                    &paths.fuse_dir(),
                    &paths.fuse_pid_file(),
                    Some(&paths.log_file()),
                    a.read_only,
                    attach_timeout(),
                )?;
                rec.fuse_mount = Some(fa.mount_dir.clone());
                rec.nbdfuse_pid = fa.nbdfuse_pid;
                rec.loop_device = fa.loop_device.clone();
                rec.device = fa.loop_device.clone();
                rec.direct_io = Some(fa.direct_io);
                notes = fa.notes;
            }
        }
        rec.save(&paths.attach_record())?;
        Ok(notes)
    })();
    let notes = match exposed {
        Ok(n) => n,
        Err(e) => {
            if let Err(e2) = undo_device(&rec) {
                eprintln!("cowsnapctl: cleanup: {e2:#}");
            }
            match stop_daemon(&paths, Some(pid as i32)) {
                Ok(()) => remove_leftovers(&paths, lock),
                Err(e2) => eprintln!("cowsnapctl: cleanup: {e2:#}"),
            }
            return Err(e.context(format!("unable to attach {} via {via}", origin.display())));
        }
    };
    for n in &notes {
        eprintln!("note: {n}");
    }
    if a.quiet {
        return Ok(rec);
    }
    let link = rec.device.as_deref().and_then(|d| {
        crate::devlink::publish(&name, Path::new(d))
            .map_err(|e| eprintln!("warning: {e:#} (the disk is attached as {d})"))
            .ok()
    });
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "name": name,
                "device": rec.device,
                "link": link,
                "uri": rec.uri,
                "pid": pid,
                "via": via,
                "size": st.size,
                "read_only": a.read_only,
            })
        );
    } else {
        eprintln!(
            "{} {} as {name:?} ({}, via {via}{}); daemon pid {pid}; {}{}",
            if a.generation.is_some() {
                "exported"
            } else {
                "attached"
            },
            origin.display(),
            crate::parse::human_bytes(st.size),
            if a.read_only { ", read-only" } else { "" },
            st.uri,
            link.as_ref()
                .map(|l| format!("; stable path {}", l.display()))
                .unwrap_or_default()
        );
        println!("{}", rec.device.as_deref().unwrap_or(&rec.uri));
    }
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_is_the_fatal_line_written_after_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("d.log");
        let old = "cowsnap-nbd: error: an old failure\n";
        std::fs::write(
            &log,
            format!(
                "{old}[t INFO x] starting\n[t WARN x] control: parse error: junk\n\
                 cowsnap-nbd: error: unable to open /x: No such file\n[t INFO x] late\n"
            ),
        )
        .unwrap();
        assert_eq!(
            daemon_reason(&log, 0).as_deref(),
            Some("unable to open /x: No such file")
        );
        let all = std::fs::read(&log).unwrap();
        assert_eq!(daemon_reason(&log, all.len() as u64), None);
        std::fs::write(&log, format!("{old}fake: cannot serve\n\n")).unwrap();
        assert_eq!(
            daemon_reason(&log, old.len() as u64).as_deref(),
            Some("fake: cannot serve")
        );
    }
}
