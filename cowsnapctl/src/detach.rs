//! `cowsnapctl detach`: refuse while mounted (unless --force), flush, remove the
//! kernel device, stop the daemon, remove sockets and the attach record.

use crate::attach::{daemon_status, read_pid, stop_daemon, undo_device};
use crate::Dirs;
use anyhow::{anyhow, bail, Result};
use cowsnap_nbd::attach::{self, AttachRecord};
use cowsnap_nbd::config;
use std::path::Path;

/// Arguments of `detach`.
#[derive(Debug, clap::Args)]
pub struct DetachArgs {
    /// Disk name.
    pub name: String,
    /// Detach even if the device is mounted: the mount then sees I/O errors on every
    /// access and must be unmounted by hand.
    #[arg(long)]
    pub force: bool,
}

pub fn run(dirs: &Dirs, a: DetachArgs) -> Result<()> {
    config::validate_name(&a.name).map_err(|e| anyhow!("{e}"))?;
    let paths = dirs.paths(&a.name);
    let rec = match AttachRecord::load(&paths.attach_record()) {
        Ok(r) => r,
        Err(e) if a.force => {
            eprintln!("warning: {e}; ignoring it (--force)");
            None
        }
        Err(e) => bail!("{e}"),
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
    if let Some(dev) = rec.as_ref().and_then(|r| r.device.clone()) {
        let devp = Path::new(&dev);
        if devp.exists() {
            let mounts = attach::mounted_at(devp).map_err(|e| anyhow!("{e}"))?;
            if !mounts.is_empty() {
                let list: Vec<String> = mounts.iter().map(|(_, m)| m.clone()).collect();
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
            if let Err(e) = attach::flush_device(devp) {
                if !a.force {
                    bail!("{e}");
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
    stop_daemon(&paths, pid)?;
    let _ = std::fs::remove_file(paths.attach_record());
    let _ = std::fs::remove_file(paths.fuse_pid_file());
    eprintln!("detached {}", a.name);
    Ok(())
}
