//! `cowsnapctl backup`: quiesce (fsfreeze and/or an idle window), start the backup in
//! the daemon, follow it to the end with a progress bar or JSON event lines.
//!
//! SIGINT, SIGTERM and SIGHUP are blocked for the whole command and read by a
//! dedicated thread, so no signal can end the process while a filesystem is frozen:
//! the freeze guard always runs `FITHAW`. An interrupt after the snapshot cancels the
//! backup in the daemon.

use crate::parse::{check_target, human_bytes, parse_duration, parse_ranges, parse_size};
use crate::status::backup_line;
use crate::Dirs;
use anyhow::{anyhow, bail, Context, Result};
use cowsnap_nbd::control::{self, BackupParams, BackupStatus, Client, Request};
use std::io::IsTerminal;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Arguments of `backup`.
#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// Disk name.
    pub name: String,
    /// Target: file:PATH (raw image), dev:PATH (block device) or repo:DIR.
    #[arg(long)]
    pub to: String,
    /// Only chunks changed since the last backup (repository targets).
    #[arg(long)]
    pub incremental: bool,
    /// Container for preserved originals (ram:SIZE, file:PATH:SIZE, dev:PATH).
    #[arg(long)]
    pub container: Option<String>,
    /// Freeze this mounted filesystem around the snapshot instant (FIFREEZE/FITHAW).
    #[arg(long, value_name = "MOUNTPOINT")]
    pub freeze: Option<PathBuf>,
    /// Wait for this long without writes before the snapshot (default 3s; 0 = don't).
    #[arg(long, value_name = "DURATION")]
    pub quiesce_idle: Option<String>,
    /// Fail if no idle window came within this long.
    #[arg(long, value_name = "DURATION", default_value = "80s")]
    pub quiesce_timeout: String,
    /// Copy these byte ranges first: OFFSET:LENGTH,... (sizes like 64M allowed).
    #[arg(long)]
    pub priority: Option<String>,
    /// Read-side rate limit in bytes per second (e.g. 100M).
    #[arg(long)]
    pub rate_limit: Option<String>,
    /// Print JSON event lines (also the default when stdout is not a terminal).
    #[arg(long)]
    pub json: bool,
}

// FIFREEZE = _IOWR('X', 119, int), FITHAW = _IOWR('X', 120, int)
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// A frozen filesystem; thawed on drop.
struct Frozen {
    dir: std::fs::File,
    path: PathBuf,
}

impl Frozen {
    fn freeze(path: &Path) -> Result<Frozen> {
        let dir = std::fs::File::open(path)
            .with_context(|| format!("unable to open mount point {}", path.display()))?;
        let mut arg: libc::c_int = 0;
        // SAFETY: the fd is valid while `dir` lives; FIFREEZE ignores its int argument.
        let r = unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE, &mut arg) };
        if r < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("unable to freeze {}", path.display()));
        }
        Ok(Frozen {
            dir,
            path: path.to_path_buf(),
        })
    }
    fn thaw(&self) -> std::io::Result<()> {
        let mut arg: libc::c_int = 0;
        // SAFETY: as in freeze.
        let r = unsafe { libc::ioctl(self.dir.as_raw_fd(), FITHAW, &mut arg) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = self.thaw() {
            eprintln!("cowsnapctl: unable to thaw {}: {e}", self.path.display());
        }
    }
}

fn event(kind: &str, b: Option<&BackupStatus>, extra: serde_json::Value) {
    let mut v = serde_json::json!({ "event": kind });
    if let Some(b) = b {
        if let (Some(o), Ok(serde_json::Value::Object(m))) =
            (v.as_object_mut(), serde_json::to_value(b))
        {
            o.extend(m);
        }
    }
    if let (Some(o), serde_json::Value::Object(m)) = (v.as_object_mut(), extra) {
        o.extend(m);
    }
    println!("{v}");
}

pub fn run(dirs: &Dirs, a: BackupArgs) -> Result<i32> {
    check_target(&a.to)?;
    if a.incremental && !a.to.starts_with("repo:") {
        bail!("--incremental needs a repository target (--to repo:DIR)");
    }
    let timeout = parse_duration(&a.quiesce_timeout)?;
    let idle = match (&a.quiesce_idle, &a.freeze) {
        (Some(s), _) => parse_duration(s)?,
        (None, Some(_)) => Duration::ZERO,
        (None, None) => Duration::from_secs(3),
    };
    let priority = a
        .priority
        .as_deref()
        .map(parse_ranges)
        .transpose()?
        .unwrap_or_default();
    let rate_limit = a.rate_limit.as_deref().map(parse_size).transpose()?;
    let paths = dirs.paths(&a.name);
    cowsnap_nbd::config::validate_name(&a.name).map_err(|e| anyhow!("{e}"))?;
    let mut cl =
        Client::connect(&paths.ctl_socket(), timeout + Duration::from_secs(60)).map_err(|e| {
            anyhow!(
                "disk {:?} is not attached or its daemon does not answer: {e}",
                a.name
            )
        })?;

    // Signals: blocked here, read by a thread (also inherited by the progress thread).
    let mut sigs = nix::sys::signal::SigSet::empty();
    for s in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGHUP,
    ] {
        sigs.add(s);
    }
    sigs.thread_block().context("unable to block signals")?;
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        std::thread::spawn(move || {
            while sigs.wait().is_ok() {
                flag.store(true, Ordering::SeqCst);
            }
        });
    }

    let params = BackupParams {
        to: crate::parse::absolute_target(&a.to)?,
        container: a.container.clone(),
        incremental: a.incremental,
        priority,
        rate_limit,
        quiesce_idle_ms: idle.as_millis() as u64,
        quiesce_timeout_ms: timeout.as_millis() as u64,
    };
    // Early, for a clear error before any freeze; the daemon checks again before it
    // opens anything (it also knows the disk's default container).
    let own = cowsnap_nbd::attached::OwnDisk {
        name: &a.name,
        origin: None,
        default_container: None,
    };
    if let Err(e) = cowsnap_nbd::attached::check_backup(&dirs.run_dir, &own, &params) {
        bail!("{e}");
    }
    let started = {
        let _frozen = match &a.freeze {
            Some(m) => Some(Frozen::freeze(m)?),
            None => None,
        };
        cl.call(&Request::Backup { params })
        // _frozen thawed here, on success and on error alike
    };
    let id = match started {
        Ok(m) => m.get("id").and_then(|v| v.as_u64()).unwrap_or(0),
        Err(control::ControlError::Daemon(msg)) => bail!("backup of {} failed: {msg}", a.name),
        Err(e) => bail!("backup of {} failed: {e}", a.name),
    };
    let json = a.json || !std::io::stdout().is_terminal();
    if json {
        event(
            "started",
            None,
            serde_json::json!({ "id": id, "name": a.name, "target": a.to }),
        );
    }
    let bar = if json {
        None
    } else {
        let pb = indicatif::ProgressBar::new(0);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}\n  {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.enable_steady_tick(Duration::from_millis(200));
        Some(pb)
    };
    let mut cancel_sent = false;
    let mut last_event = Instant::now() - Duration::from_secs(10);
    loop {
        if interrupted.load(Ordering::SeqCst) && !cancel_sent {
            cancel_sent = true;
            if let Some(pb) = &bar {
                pb.println("interrupted: cancelling the backup");
            } else {
                eprintln!("interrupted: cancelling the backup");
            }
            if let Err(e) = cl.call(&Request::Cancel) {
                eprintln!("cowsnapctl: unable to cancel: {e}");
            }
        }
        let m = cl
            .call(&Request::BackupStatus)
            .map_err(|e| anyhow!("lost the daemon of {} during the backup: {e}", a.name))?;
        let b: Option<BackupStatus> = m
            .get("backup")
            .cloned()
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| anyhow!("unable to understand the backup status: {e}"))?;
        let Some(b) = b else {
            bail!("the daemon of {} reports no backup", a.name);
        };
        if b.id != id && id != 0 {
            bail!("backup #{id} was replaced by #{} in the daemon", b.id);
        }
        let total = b
            .chunks_in_scope
            .saturating_mul(u64::from(b.chunk_size))
            .min(b.disk_size.max(1));
        if let Some(pb) = &bar {
            pb.set_length(total.max(b.bytes_copied));
            pb.set_position(b.bytes_copied);
            pb.set_message(format!(
                "container {}/{} slots (high-water {})  holds {}  throttled {} ({} ms)",
                b.container_used,
                b.container_slots,
                b.container_high_water,
                b.holds,
                b.throttled_writes,
                b.throttle_delay_ms
            ));
        }
        match b.state.as_str() {
            "complete" => {
                if let Some(pb) = &bar {
                    pb.finish_and_clear();
                }
                if json {
                    event("complete", Some(&b), serde_json::json!({}));
                } else {
                    println!(
                        "backup of {} to {} complete: {} in {}; {}",
                        a.name,
                        a.to,
                        human_bytes(b.bytes_copied),
                        crate::parse::human_secs(b.elapsed_ms / 1000),
                        backup_line(&b)
                    );
                    for n in &b.notes {
                        println!("note: {n}");
                    }
                }
                return Ok(if cancel_sent { 130 } else { 0 });
            }
            "failed" | "cancelled" | "canceled" => {
                if let Some(pb) = &bar {
                    pb.finish_and_clear();
                }
                let msg = b.error.clone().unwrap_or_else(|| b.state.clone());
                if json {
                    event("failed", Some(&b), serde_json::json!({}));
                }
                if cancel_sent {
                    eprintln!("cowsnapctl: backup of {} cancelled: {msg}", a.name);
                    return Ok(130);
                }
                bail!("backup of {} to {} failed: {msg}", a.name, a.to);
            }
            _ => {
                if json && last_event.elapsed() >= Duration::from_secs(1) {
                    event("progress", Some(&b), serde_json::json!({}));
                    last_event = Instant::now();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
