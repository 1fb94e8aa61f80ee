//! `cowsnapctl detach`: refuse while a backup runs, a snapshot is exported (ended with
//! the daemon under --force or --cancel-backup) or the device is mounted (unless
//! --force, which cancels the backup cleanly first), flush, remove the kernel device,
//! stop the daemon, then — holding the name lock, so nothing of a daemon that took the
//! name since is touched — remove sockets, pid files, the attach record and the lock.

use crate::attach::{daemon_status, read_pid, remove_leftovers, stop_daemon, undo_device};
use crate::Dirs;
use anyhow::{bail, Result};
use cowsnap_nbd::attach::{self, AttachRecord};
use cowsnap_nbd::control::{self, BackupStatus, Request};
use cowsnap_nbd::name_lock::NameLock;
use cowsnap_nbd::paths::{self, DiskPaths};
use std::path::Path;
use std::time::{Duration, Instant};

/// Arguments of `detach`.
#[derive(Debug, clap::Args)]
pub struct DetachArgs {
    /// Disk name.
    pub name: String,
    /// Detach even if a backup runs (it is cancelled first; its target is left marked
    /// incomplete) or the device is mounted (the mount then sees I/O errors on every
    /// access and must be unmounted by hand).
    #[arg(long)]
    pub force: bool,
    /// Cancel a running backup first (its target is left marked incomplete), but
    /// still refuse a mounted device: what `cowsnapctl down` and the systemd unit's
    /// stop do.
    #[arg(long)]
    pub cancel_backup: bool,
}

/// A backup that has not ended yet.
fn running(b: &BackupStatus) -> bool {
    !b.state.is_finished()
}

fn describe(b: &BackupStatus) -> String {
    let pct = b
        .chunks_copied
        .saturating_mul(100)
        .checked_div(b.chunks_in_scope)
        .unwrap_or(0);
    format!(
        "backup #{} to {} ({}, {pct}% copied)",
        b.id, b.target, b.state
    )
}

/// The backup the daemon runs now, if any.
fn running_backup(paths: &DiskPaths) -> Option<BackupStatus> {
    let m = control::call(
        &paths.ctl_socket(),
        &Request::BackupStatus,
        Duration::from_secs(10),
    )
    .ok()?;
    let b: BackupStatus = serde_json::from_value(m.get("backup")?.clone()).ok()?;
    running(&b).then_some(b)
}

/// Cancel the running backup and wait until the daemon says it has ended, so its
/// target is marked incomplete before the daemon stops.
fn cancel_backup(paths: &DiskPaths, b: &BackupStatus) -> Result<()> {
    eprintln!("cancelling {} (detach --force)", describe(b));
    match control::call(
        &paths.ctl_socket(),
        &Request::Cancel,
        Duration::from_secs(10),
    ) {
        Ok(_) => {}
        // It ended meanwhile.
        Err(control::ControlError::Daemon(_)) => {}
        Err(e) => bail!("unable to cancel {}: {e}", describe(b)),
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Some(now) = running_backup(paths) {
        if Instant::now() >= deadline {
            bail!(
                "unable to detach {}: {} did not end within 60 s of being cancelled",
                paths.name,
                describe(&now)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Give a `cowsnapctl backup` following it (it polls every 100 ms) time to read
    // the outcome before the daemon goes away.
    std::thread::sleep(Duration::from_millis(300));
    Ok(())
}

pub fn run(dirs: &Dirs, a: DetachArgs) -> Result<()> {
    paths::validate_name(&a.name)?;
    let paths = dirs.paths(&a.name);
    let rec = match AttachRecord::load(&paths.attach_record()) {
        Ok(r) => r,
        Err(e) if a.force => {
            eprintln!("warning: {e}; ignoring it (--force)");
            None
        }
        Err(e) => return Err(e.into()),
    };
    let status = daemon_status(&paths);
    let pid = rec
        .as_ref()
        .map(|r| r.pid as i32)
        .or_else(|| status.as_ref().map(|s| s.pid as i32))
        .or_else(|| read_pid(&paths));
    if rec.is_none() && status.is_none() && pid.map(attach::pid_alive) != Some(true) {
        bail!(
            "no disk named {:?} is attached (nothing in {})",
            a.name,
            dirs.run_dir.display()
        );
    }
    // Refusals first: nothing is touched before both checks pass.
    let backup = status.as_ref().and_then(|_| running_backup(&paths));
    if let (Some(b), false) = (&backup, a.force || a.cancel_backup) {
        bail!(
            "unable to detach {}: {} is running; wait for it to end, or detach --force \
             to cancel it first",
            a.name,
            describe(b)
        );
    }
    let snapshot = status.as_ref().and_then(|s| s.snapshot.as_ref());
    if let (Some(snap), false) = (snapshot, a.force || a.cancel_backup) {
        bail!(
            "unable to detach {}: snapshot {} is exported (taken {} s ago); release it \
             first (cowsnapctl release {}), or detach --force",
            a.name,
            snap.export,
            snap.age_s,
            a.name
        );
    }
    if let Ok(Some(m)) =
        crate::mount_record::MountRecord::load(&crate::mount_record::record_path(dirs, &a.name))
    {
        if !a.force && (m.mounted || m.part_loop.is_some()) {
            bail!(
                "unable to detach {}: it is the export behind the mount of {} on {}; \
                 cowsnapctl umount {} undoes both",
                a.name,
                m.source,
                m.mountpoint,
                m.mountpoint
            );
        }
    }
    let dev = rec.as_ref().and_then(|r| r.device.clone());
    let mounts = match dev.as_deref().map(Path::new) {
        Some(devp) if devp.exists() => attach::mounted_at(devp)?,
        _ => Vec::new(),
    };
    if !mounts.is_empty() {
        let list: Vec<String> = mounts.iter().map(|(_, m)| m.clone()).collect();
        let dev = dev.as_deref().unwrap_or("?");
        if !a.force {
            bail!(
                "{} ({dev}) is mounted on {}; unmount it first \
                 (or --force: the mount then sees I/O errors)",
                a.name,
                list.join(", ")
            );
        }
        eprintln!(
            "warning: {dev} is mounted on {}; detaching anyway (--force): \
             that mount will see I/O errors from now on",
            list.join(", ")
        );
    }

    if let Some(b) = &backup {
        cancel_backup(&paths, b)?;
    }
    // A kernel NBD device whose daemon is gone cannot be flushed: the flush would wait
    // for a reconnect (the dead connection timeout) and then fail.
    let daemon_gone = status.is_none() && !pid.is_some_and(attach::pid_alive);
    if let (Some(dev), true) = (&dev, daemon_gone) {
        let held = rec.as_ref().is_some_and(|r| {
            r.via == attach::Via::Nbd
                && r.nbd_index
                    .is_some_and(cowsnap_nbd::attach::netlink::is_configured)
        });
        if held && !a.force {
            bail!(
                "unable to detach {}: its daemon is gone and {dev} waits for it; attach {} \
                 --name {} again to reconnect it (what the device has not written yet is \
                 kept), or detach --force (that is lost)",
                a.name,
                rec.as_ref().map(|r| r.origin.as_str()).unwrap_or("PATH"),
                a.name
            );
        }
        eprintln!("note: the daemon of {} is gone; not flushing {dev}", a.name);
    }
    if let (Some(dev), false) = (&dev, daemon_gone) {
        let devp = Path::new(dev);
        if devp.exists() {
            if let Err(e) = attach::flush_device(devp) {
                if !a.force {
                    return Err(e.into());
                }
                eprintln!("warning: {e}");
            }
        }
    }
    if let Some(r) = &rec {
        if let Err(e) = undo_device(r) {
            if !a.force {
                return Err(e.context(format!("unable to detach {}", a.name)));
            }
            eprintln!("warning: {e:#}");
        }
    }
    crate::devlink::withdraw(&a.name, dev.as_deref().map(Path::new));
    // A backup started after the check above is cancelled too, never cut off.
    if let Some(b) = running_backup(&paths) {
        cancel_backup(&paths, &b)?;
    }
    stop_daemon(&paths, pid)?;
    // The daemon deletes its ublk device as it stops; one it could not delete (a queue
    // that did not end) is deleted now that the daemon is gone.
    if let Some(r) = rec.as_ref().filter(|r| r.via == attach::Via::Ublk) {
        if let Err(e) = undo_device(r) {
            eprintln!("warning: {e:#}");
        }
    }
    match NameLock::acquire_within(&paths.lock_file(), Duration::from_secs(5)) {
        Ok(Some(lock)) => {
            remove_leftovers(&paths, &lock);
            lock.remove();
        }
        Ok(None) => eprintln!(
            "note: {} is held by another process (a new attach of {:?}?); leaving its files",
            paths.lock_file().display(),
            a.name
        ),
        Err(e) => eprintln!("warning: {e}"),
    }
    eprintln!("detached {}", a.name);
    Ok(())
}
