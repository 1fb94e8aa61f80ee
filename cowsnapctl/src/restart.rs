//! `cowsnapctl restart`: replace a disk's daemon without taking its device away.
//!
//! The running daemon is stopped cleanly (`shutdown`: it flushes and seals the origin,
//! so change tracking stays trusted), then a new one is started with the recorded
//! arguments from the current binary (so this is also how an upgrade takes over a
//! disk), and a kernel NBD device gets new sockets (`NBD_CMD_RECONFIGURE`) in place of
//! the connections that died with the old daemon. Meanwhile the kernel holds new
//! requests (up to the dead connection timeout); a mounted filesystem sees a pause.
//! A daemon that is already gone is just started again.
//!
//! Not for `--via fuse`: a FUSE mount whose server exited cannot be given a new one
//! (the kernel aborts the connection; every access fails with ENOTCONN), so that disk
//! must be unmounted, detached and attached again.

use crate::attach::{self as ctl_attach, daemon_status, read_pid, stop_daemon};
use crate::Dirs;
use anyhow::{anyhow, bail, Result};
use cowsnap_nbd::attach::{self, AttachRecord, Via};
use cowsnap_nbd::control::{self, BackupStatus, Request};
use cowsnap_nbd::name_lock::NameLock;
use cowsnap_nbd::paths;
use std::time::Duration;

/// Arguments of `restart`.
#[derive(Debug, clap::Args)]
pub struct RestartArgs {
    /// Disk name.
    pub name: String,
}

pub fn run(dirs: &Dirs, a: RestartArgs) -> Result<()> {
    paths::validate_name(&a.name)?;
    let paths = dirs.paths(&a.name);
    let mut rec = AttachRecord::load(&paths.attach_record())?.ok_or_else(|| {
        anyhow!(
            "no disk named {:?} is attached (nothing in {})",
            a.name,
            dirs.run_dir.display()
        )
    })?;
    if matches!(rec.via, Via::Fuse | Via::Nbdfuse | Via::Ublk) {
        bail!(
            "unable to restart {}: it is attached via {}, and its device cannot be handed \
             to a new server; unmount {}, then detach and attach it again",
            a.name,
            rec.via,
            rec.device.as_deref().unwrap_or("its loop device")
        );
    }
    if rec.daemon_args.is_empty() {
        bail!(
            "unable to restart {}: its attach record has no daemon arguments (attached by \
             an older cowsnapctl); detach and attach it",
            a.name
        );
    }
    if rec.via == Via::Nbd
        && !rec
            .nbd_index
            .is_some_and(cowsnap_nbd::attach::netlink::is_configured)
    {
        bail!(
            "unable to restart {}: the kernel no longer holds {}; detach --force {} and attach again",
            a.name,
            rec.device.as_deref().unwrap_or("its device"),
            a.name
        );
    }
    let status = daemon_status(&paths);
    if status.is_some() {
        let m = control::call(
            &paths.ctl_socket(),
            &Request::BackupStatus,
            Duration::from_secs(10),
        )
        .map_err(|e| anyhow!("unable to restart {}: {e}", a.name))?;
        if let Some(b) = m
            .get("backup")
            .cloned()
            .and_then(|v| serde_json::from_value::<BackupStatus>(v).ok())
        {
            if !b.state.is_finished() {
                bail!(
                    "unable to restart {}: backup #{} to {} is {}; wait for it to end",
                    a.name,
                    b.id,
                    b.target,
                    b.state
                );
            }
        }
    }
    let pid = status
        .as_ref()
        .map(|s| s.pid as i32)
        .or(Some(rec.pid as i32))
        .filter(|p| attach::pid_alive(*p) && !attach::pid_zombie(*p))
        .or_else(|| read_pid(&paths).filter(|p| attach::pid_alive(*p)));
    if let Some(pid) = pid {
        eprintln!("stopping the daemon (pid {pid}) of {:?}", a.name);
        stop_daemon(&paths, Some(pid))?;
    }
    let lock = NameLock::acquire_within(&paths.lock_file(), Duration::from_secs(10))?.ok_or_else(
        || {
            anyhow!(
                "unable to restart {}: {} is held by another process",
                a.name,
                paths.lock_file().display()
            )
        },
    )?;
    let started = std::cell::Cell::new(None);
    let what = format!("unable to restart {}", a.name);
    let args = rec.daemon_args.clone();
    let r = ctl_attach::resume_daemon(&paths, &mut rec, args, &what, &lock, &started);
    match (&r, started.get()) {
        (Err(_), Some(p)) if !attach::pid_alive(p as i32) || attach::pid_zombie(p as i32) => {
            lock.remove()
        }
        (Err(_), None) => lock.remove(),
        _ => drop(lock),
    }
    r?;
    eprintln!(
        "restarted {} (daemon pid {}{})",
        a.name,
        rec.pid,
        rec.device
            .as_deref()
            .map(|d| format!(", {d} reconnected"))
            .unwrap_or_default()
    );
    println!("{}", rec.device.as_deref().unwrap_or(&rec.uri));
    Ok(())
}
