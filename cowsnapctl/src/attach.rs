//! `cowsnapctl attach`: start the disk's daemon in the background, wait until it
//! answers, expose it (kernel nbd, nbdfuse + loop, or nothing), record what was set up.

use crate::Dirs;
use anyhow::{anyhow, bail, Context, Result};
use cowsnap_nbd::attach::{self, client, fuse, netlink, AttachRecord, Via};
use cowsnap_nbd::config::{self, DiskPaths};
use cowsnap_nbd::control::{self, Request, StatusInfo};
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
    /// How to expose the disk: kernel nbd, nbdfuse + loop device, or only the NBD URI.
    #[arg(long, default_value = "auto", value_parser = ["auto", "nbd", "fuse", "none"])]
    pub via: String,
    /// Use this kernel NBD device (--via nbd), e.g. /dev/nbd3.
    #[arg(long)]
    pub nbd_device: Option<PathBuf>,
    /// Serve read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Also listen on TCP (tcp:ADDR:PORT, e.g. tcp:127.0.0.1:10809). Repeatable.
    #[arg(long, value_name = "tcp:ADDR:PORT")]
    pub listen: Vec<String>,
    /// I/O engine for the origin.
    #[arg(long, default_value = "auto", value_parser = ["auto", "uring", "sync"])]
    pub io_engine: String,
    /// Default backup container (ram:SIZE, file:PATH:SIZE, dev:PATH).
    #[arg(long)]
    pub container: Option<String>,
    /// Tracking chunk size (power of two, e.g. 64K).
    #[arg(long)]
    pub chunk_size: Option<String>,
    /// NBD connections the daemon accepts at once (default 64).
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Print {name, device, uri, pid, via} as JSON.
    #[arg(long)]
    pub json: bool,
    /// Fill the disk from a repository generation while serving it
    /// (set by `cowsnapctl restore --live`).
    #[arg(long, hide = true, value_name = "repo:DIR@GEN")]
    pub restore_from: Option<String>,
}

/// How long to wait for the daemon and nbdfuse (COWSNAP_ATTACH_TIMEOUT seconds).
fn attach_timeout() -> Duration {
    std::env::var("COWSNAP_ATTACH_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(30))
}

/// The daemon binary: $COWSNAP_NBD_BIN, else next to this program, else on PATH.
pub fn daemon_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("COWSNAP_NBD_BIN") {
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

/// Last `n` lines of a file, for error messages.
pub fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let lines: Vec<&str> = s.lines().collect();
            let start = lines.len().saturating_sub(n);
            lines[start..].join("\n")
        }
        Err(_) => String::from("(no log)"),
    }
}

/// Whether a daemon answers on the disk's control socket.
pub fn daemon_status(paths: &DiskPaths) -> Option<StatusInfo> {
    control::Client::connect(&paths.ctl_socket(), Duration::from_secs(3))
        .ok()?
        .status()
        .ok()
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

/// Start the daemon in the background and wait until it answers `status`.
fn start_daemon(a: &AttachArgs, origin: &Path, paths: &DiskPaths) -> Result<(u32, StatusInfo)> {
    let log = paths.log_file();
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("unable to open the daemon log {}", log.display()))?;
    let bin = daemon_binary();
    let mut cmd = Command::new(&bin);
    cmd.arg("--name")
        .arg(&paths.name)
        .arg("--origin")
        .arg(origin)
        .arg("--run-dir")
        .arg(&paths.run_dir)
        .arg("--state-dir")
        .arg(&paths.state_dir)
        .arg("--io-engine")
        .arg(&a.io_engine);
    if a.read_only {
        cmd.arg("--read-only");
    }
    for l in &a.listen {
        cmd.arg("--listen").arg(l);
    }
    if let Some(c) = &a.container {
        cmd.arg("--container").arg(c);
    }
    if let Some(r) = &a.restore_from {
        cmd.arg("--restore-from").arg(r);
    }
    if let Some(n) = a.max_connections {
        cmd.arg("--max-connections").arg(n.to_string());
    }
    if let Some(c) = &a.chunk_size {
        cmd.arg("--chunk-size")
            .arg(crate::parse::parse_size(c)?.to_string());
    }
    cmd.stdin(Stdio::null())
        .stdout(logf.try_clone().context("unable to duplicate the log fd")?)
        .stderr(logf);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("unable to start the daemon {}", bin.display()))?;
    let pid = child.id();
    let deadline = Instant::now() + attach_timeout();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            bail!(
                "the daemon for {:?} exited ({st}) before serving; its log {} ends with:\n{}",
                paths.name,
                log.display(),
                log_tail(&log, 10)
            );
        }
        if let Some(s) = daemon_status(paths) {
            if s.pid == pid {
                return Ok((pid, s));
            }
        }
        if Instant::now() >= deadline {
            // SAFETY: plain kill(2) on the child we started.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            let _ = child.wait();
            bail!(
                "the daemon for {:?} did not answer on {} within {:?}; its log {} ends with:\n{}",
                paths.name,
                paths.ctl_socket().display(),
                attach_timeout(),
                log.display(),
                log_tail(&log, 10)
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Stop a daemon: `shutdown` over the control socket, SIGTERM as fallback; wait.
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
            // SAFETY: plain kill(2).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        if !attach::wait_pid_gone(pid, Duration::from_secs(30)) {
            bail!("the daemon (pid {pid}) of {:?} did not exit", paths.name);
        }
    }
    for p in [paths.ctl_socket(), paths.nbd_socket(), paths.pid_file()] {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

/// Kernel nbd: handshake on a fresh socket, hand it to the kernel.
fn attach_nbd(paths: &DiskPaths, index: Option<u32>) -> Result<(u32, String)> {
    let mut s = std::os::unix::net::UnixStream::connect(paths.nbd_socket())
        .with_context(|| format!("unable to connect to {}", paths.nbd_socket().display()))?;
    let info = client::handshake(&mut s, &paths.name)
        .with_context(|| format!("unable to negotiate export {:?}", paths.name))?;
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
        dead_conn_timeout: 60,
        fds: vec![s.as_raw_fd()],
    })
    .map_err(|e| anyhow!("{e}"))?;
    drop(s); // the kernel holds its own reference to the socket
    let dev = format!("/dev/nbd{idx}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !Path::new(&dev).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((idx, dev))
}

/// Undo a kernel/FUSE attach (not the daemon). `lazy`: unmount FUSE lazily.
pub fn undo_device(rec: &AttachRecord) -> Result<()> {
    match rec.via {
        Via::Nbd => {
            if let Some(i) = rec.nbd_index {
                netlink::disconnect(i).map_err(|e| anyhow!("{e}"))?;
            }
        }
        Via::Fuse => {
            if let (Some(m), Some(p)) = (&rec.fuse_mount, rec.nbdfuse_pid) {
                fuse::detach(&fuse::FuseAttach {
                    mount_dir: m.clone(),
                    nbdfuse_pid: p,
                    loop_device: rec.loop_device.clone(),
                    direct_io: rec.direct_io.unwrap_or(false),
                    notes: vec![],
                })
                .map_err(|e| anyhow!("{e}"))?;
            }
        }
        Via::None => {}
    }
    Ok(())
}

/// The leftovers of a daemon that died (killed, crashed): remove its device (unless
/// it is mounted), sockets, pid file and attach record, so the disk can be attached
/// again (a live restore then resumes its fill). Returns false, touching nothing,
/// when the device is still mounted: that needs `detach --force` and an unmount.
fn clean_dead_attach(paths: &DiskPaths, rec: &AttachRecord) -> bool {
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
    for p in [
        paths.ctl_socket(),
        paths.nbd_socket(),
        paths.pid_file(),
        paths.fuse_pid_file(),
        paths.attach_record(),
    ] {
        let _ = std::fs::remove_file(p);
    }
    true
}

pub fn run(dirs: &Dirs, a: AttachArgs) -> Result<()> {
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
    let name = match &a.name {
        Some(n) => n.clone(),
        None => config::derive_name(&origin),
    };
    config::validate_name(&name).map_err(|e| anyhow!("invalid --name: {e}"))?;
    for l in &a.listen {
        if !l.starts_with("tcp:")
            || l.rsplit_once(':')
                .map(|(_, p)| p.parse::<u16>().is_err())
                .unwrap_or(true)
        {
            bail!("invalid --listen {l:?}: expected tcp:ADDR:PORT");
        }
    }
    // Every later backup depends on these: refuse bad values now, before the daemon.
    let chunk_size = match &a.chunk_size {
        Some(c) => cowsnap_core::engine::check_chunk_size(crate::parse::parse_size(c)?)
            .map_err(|e| anyhow!("{e}"))?,
        None => cowsnap_core::engine::EngineConfig::default().chunk_size,
    };
    if let Some(c) = &a.container {
        cowsnap_core::container::check_default(c, chunk_size).map_err(|e| anyhow!("{e}"))?;
    }
    if a.max_connections == Some(0) {
        bail!("invalid --max-connections 0: at least one connection is needed");
    }
    let via = match a.via.as_str() {
        "nbd" => Via::Nbd,
        "fuse" => Via::Fuse,
        "none" => Via::None,
        _ => attach::auto_via(),
    };
    let index = match &a.nbd_device {
        Some(d) if via != Via::Nbd => bail!(
            "--nbd-device {} needs --via nbd (this attach uses {via})",
            d.display()
        ),
        Some(d) => Some(nbd_index(d)?),
        None => None,
    };
    let paths = dirs.paths(&name);
    make_dir(&dirs.run_dir, 0o700)?;
    make_dir(&dirs.state_dir, 0o700)?;

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
        if alive || !clean_dead_attach(&paths, &rec) {
            bail!(
                "a disk named {name:?} has a stale attach record ({}; daemon pid {} not answering); \
                 clean it up with: cowsnapctl detach {name} --force",
                paths.attach_record().display(),
                rec.pid
            );
        }
    }

    let (pid, st) = start_daemon(&a, &origin, &paths)?;
    let mut rec = AttachRecord {
        name: name.clone(),
        origin: origin.display().to_string(),
        via,
        device: None,
        uri: st.uri.clone(),
        pid,
        nbd_index: None,
        fuse_mount: None,
        nbdfuse_pid: None,
        loop_device: None,
        direct_io: None,
        read_only: a.read_only,
    };
    // Recorded at once, so that `detach --force` finds the daemon if this process dies.
    if let Err(e) = rec.save(&paths.attach_record()) {
        let _ = stop_daemon(&paths, Some(pid as i32));
        bail!("{e}");
    }
    let exposed: Result<Vec<String>> = (|| {
        let mut notes = Vec::new();
        match via {
            Via::None => {}
            Via::Nbd => {
                let (idx, dev) = attach_nbd(&paths, index)?;
                rec.nbd_index = Some(idx);
                rec.device = Some(dev);
            }
            Via::Fuse => {
                let fa = fuse::attach(
                    &st.uri,
                    &paths.fuse_dir(),
                    &paths.fuse_pid_file(),
                    Some(&paths.log_file()),
                    a.read_only,
                    attach_timeout(),
                )
                .map_err(|e| anyhow!("{e}"))?;
                rec.fuse_mount = Some(fa.mount_dir.clone());
                rec.nbdfuse_pid = Some(fa.nbdfuse_pid);
                rec.loop_device = fa.loop_device.clone();
                rec.device = fa.loop_device.clone();
                rec.direct_io = Some(fa.direct_io);
                notes = fa.notes;
            }
        }
        rec.save(&paths.attach_record())
            .map_err(|e| anyhow!("{e}"))?;
        Ok(notes)
    })();
    let notes = match exposed {
        Ok(n) => n,
        Err(e) => {
            if let Err(e2) = undo_device(&rec) {
                eprintln!("cowsnapctl: cleanup: {e2:#}");
            }
            if let Err(e2) = stop_daemon(&paths, Some(pid as i32)) {
                eprintln!("cowsnapctl: cleanup: {e2:#}");
            }
            let _ = std::fs::remove_file(paths.attach_record());
            return Err(e.context(format!("unable to attach {} via {via}", origin.display())));
        }
    };
    for n in &notes {
        eprintln!("note: {n}");
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "name": name,
                "device": rec.device,
                "uri": rec.uri,
                "pid": pid,
                "via": via,
                "size": st.size,
                "read_only": a.read_only,
            })
        );
    } else {
        eprintln!(
            "attached {} as {name:?} ({}, via {via}{}); daemon pid {pid}; {}",
            origin.display(),
            crate::parse::human_bytes(st.size),
            if a.read_only { ", read-only" } else { "" },
            st.uri
        );
        println!("{}", rec.device.as_deref().unwrap_or(&rec.uri));
    }
    Ok(())
}
