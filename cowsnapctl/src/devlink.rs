//! The stable device path of an attached disk: `/dev/cowsnap/NAME` (the directory is
//! `COWSNAP_DEV_DIR` when set), a symlink to whatever device the disk got (`/dev/nbdN`,
//! `/dev/loopN`), so fstab and mount units never name those.
//!
//! Where udev runs and `dist/udev/99-cowsnap.rules` is installed, udev owns the link: the
//! rule asks `cowsnapctl udev-name KERNEL` which disk a device belongs to (from the
//! attach records in the default run dir) and adds `cowsnap/NAME` (and
//! `cowsnap/NAME-partN` for its partitions), so systemd gets a device unit for the path
//! (`dev-cowsnap-NAME.device`) that a mount can wait for. `attach` asks udev to look at
//! the device again once the attach record names it, waits for it (bounded), and makes
//! the link itself when udev did not (no udev, rule not installed, other run dir).
//! `detach` removes the link when it points at the disk's device.

use anyhow::{anyhow, Context, Result};
use cowsnap_nbd::attach::AttachRecord;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long `attach` waits for udev to make the link.
const UDEV_WAIT: Duration = Duration::from_secs(10);

/// Environment variable: the directory of the stable links (default `/dev/cowsnap`).
pub const ENV_DEV_DIR: &str = "COWSNAP_DEV_DIR";
/// The directory of the stable links without [`ENV_DEV_DIR`].
pub const DEFAULT_DEV_DIR: &str = "/dev/cowsnap";

/// The directory of the stable links.
pub fn dev_dir() -> PathBuf {
    std::env::var_os(ENV_DEV_DIR)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DEV_DIR))
}

/// `/dev/cowsnap/NAME`.
pub fn link_path(name: &str) -> PathBuf {
    dev_dir().join(name)
}

/// Whether `link` is a symlink resolving to `device`.
fn points_to(link: &Path, device: &Path) -> bool {
    match (std::fs::canonicalize(link), std::fs::canonicalize(device)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Whether udev runs here (its control socket exists) and the links are in /dev.
fn udev_manages(dir: &Path) -> bool {
    dir.starts_with("/dev") && Path::new("/run/udev/control").exists()
}

/// Make `/dev/cowsnap/NAME` point at `device`: through udev where it runs, else (or if
/// udev did not) as a symlink made here. Returns the link.
pub fn publish(name: &str, device: &Path) -> Result<PathBuf> {
    let dir = dev_dir();
    let link = dir.join(name);
    if udev_manages(&dir) {
        // --settle waits for this event only; a udev that does not answer is given
        // UDEV_WAIT, then the link is made here.
        if let Ok(mut child) = Command::new("udevadm")
            .args(["trigger", "--action=change", "--settle"])
            .arg(device)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            let deadline = Instant::now() + UDEV_WAIT;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if points_to(&link, device) {
            return Ok(link);
        }
    }
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)
            .with_context(|| format!("unable to create {}", dir.display()))?;
    }
    // Atomic: a new link under a temporary name renamed over any old one.
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(device, &tmp)
        .with_context(|| format!("unable to create the link {}", tmp.display()))?;
    std::fs::rename(&tmp, &link).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow!("unable to create the link {}: {e}", link.display())
    })?;
    Ok(link)
}

/// Remove `/dev/cowsnap/NAME` if it points at `device` (or at nothing any more); a link
/// to something else (another attach of the name since) is left alone.
pub fn withdraw(name: &str, device: Option<&Path>) {
    let link = link_path(name);
    let Ok(meta) = std::fs::symlink_metadata(&link) else {
        return;
    };
    if !meta.file_type().is_symlink() {
        return;
    }
    let dangling = std::fs::metadata(&link).is_err();
    if dangling || device.is_some_and(|d| points_to(&link, d)) {
        if let Err(e) = std::fs::remove_file(&link) {
            eprintln!("warning: unable to remove {}: {e}", link.display());
        }
    }
}

/// For the udev rule: the link name of kernel device `kernel` (`nbd0`, `loop3`,
/// `nbd0p1`), from the attach records in `run_dir`: `NAME` for a disk's device,
/// `NAME-partN` for its partition N; `None` when no attached disk has it.
pub fn udev_name(run_dir: &Path, kernel: &str) -> Option<String> {
    let rd = std::fs::read_dir(run_dir).ok()?;
    let mut records = Vec::new();
    for ent in rd.flatten() {
        let p = ent.path();
        if p.to_string_lossy().ends_with(".attach.json") {
            if let Ok(Some(r)) = AttachRecord::load(&p) {
                records.push(r);
            }
        }
    }
    name_for(&records, kernel)
}

fn name_for(records: &[AttachRecord], kernel: &str) -> Option<String> {
    for r in records {
        let Some(dev) = r.device.as_deref() else {
            continue;
        };
        let Some(base) = dev.strip_prefix("/dev/") else {
            continue;
        };
        if kernel == base {
            return Some(r.name.clone());
        }
        // Partitions: nbd0p1, loop3p2.
        if let Some(n) = kernel
            .strip_prefix(base)
            .and_then(|s| s.strip_prefix('p'))
            .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
        {
            return Some(format!("{}-part{n}", r.name));
        }
    }
    None
}

/// `cowsnapctl udev-name KERNEL` (hidden; for the udev rule).
#[derive(Debug, clap::Args)]
pub struct UdevNameArgs {
    /// Kernel device name (udev's %k), e.g. nbd0, loop3, nbd0p1.
    pub kernel: String,
}

/// Prints the link name; exit 1 when the device is no attached disk's.
pub fn run_udev_name(dirs: &crate::Dirs, a: UdevNameArgs) -> Result<i32> {
    match udev_name(&dirs.run_dir, &a.kernel) {
        Some(n) => {
            println!("{n}");
            Ok(0)
        }
        None => Ok(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cowsnap_nbd::attach::Via;

    fn rec(name: &str, device: Option<&str>) -> AttachRecord {
        AttachRecord {
            name: name.into(),
            origin: "/o".into(),
            via: Via::Fuse,
            device: device.map(str::to_string),
            uri: String::new(),
            pid: 1,
            nbd_index: None,
            ublk_id: None,
            fuse_mount: None,
            nbdfuse_pid: None,
            loop_device: None,
            direct_io: None,
            read_only: false,
            nbd_connections: None,
            dead_conn_timeout: None,
            daemon_args: Vec::new(),
        }
    }

    #[test]
    fn kernel_names_map_to_disk_and_partition_links() {
        let r = [
            rec("none", None),
            rec("pg", Some("/dev/loop3")),
            rec("wal", Some("/dev/nbd1")),
        ];
        assert_eq!(name_for(&r, "loop3").as_deref(), Some("pg"));
        assert_eq!(name_for(&r, "loop3p2").as_deref(), Some("pg-part2"));
        assert_eq!(name_for(&r, "nbd1").as_deref(), Some("wal"));
        assert_eq!(name_for(&r, "nbd1p10").as_deref(), Some("wal-part10"));
        assert_eq!(name_for(&r, "loop30"), None);
        assert_eq!(name_for(&r, "nbd10"), None);
        assert_eq!(name_for(&r, "loop3p"), None);
        assert_eq!(name_for(&r, "sda"), None);
    }

    #[test]
    fn records_are_read_from_the_run_dir() {
        let d = tempfile::tempdir().unwrap();
        rec("pg", Some("/dev/loop7"))
            .save(&d.path().join("pg.attach.json"))
            .unwrap();
        std::fs::write(d.path().join("junk.attach.json"), b"{not json").unwrap();
        assert_eq!(udev_name(d.path(), "loop7").as_deref(), Some("pg"));
        assert_eq!(udev_name(d.path(), "loop8"), None);
        assert_eq!(udev_name(Path::new("/nonexistent"), "loop7"), None);
    }
}
