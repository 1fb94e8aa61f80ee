//! Making an attached disk visible to the kernel, and taking it away again.
//!
//! Five ways (`cowsnapctl attach --via`):
//! - `ublk`: the daemon's own ublk server (`crate::ublk`, `cowsnap-nbd --ublk`) makes
//!   `/dev/ublkbN` itself; nothing is set up here but the record. Needs `ublk_drv`.
//! - `nbd`: the kernel NBD client, configured over generic netlink ([`netlink`]). The
//!   client side of the NBD handshake is done here ([`client`]); the kernel gets
//!   sockets that are already in the transmission phase.
//! - `fuse`: the daemon's own FUSE server exposes the export as a file
//!   (`crate::fuse`), `losetup` turns the file into `/dev/loopN` ([`fuse`]). Used
//!   where `nbd.ko` is absent.
//! - `nbdfuse`: the same with libnbd's `nbdfuse` serving the file from the NBD socket
//!   (the older path, kept as a fallback).
//! - `none`: no kernel device; clients use the NBD URI.
//!
//! What was set up is recorded in `RUN_DIR/NAME.attach.json` ([`AttachRecord`]) so
//! that `detach` and `status` can find it from another process.

pub mod client;
pub mod fuse;
pub mod netlink;

use cowsnap_core::error::{Error, IoContext, Result};
use cowsnap_core::mountinfo;
use serde::{Deserialize, Serialize};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// How a disk is exposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// The daemon's ublk device.
    Ublk,
    /// Kernel NBD client (netlink).
    Nbd,
    /// The daemon's FUSE file + loop device.
    Fuse,
    /// nbdfuse + loop device.
    Nbdfuse,
    /// No kernel device.
    None,
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Via::Ublk => "ublk",
            Via::Nbd => "nbd",
            Via::Fuse => "fuse",
            Via::Nbdfuse => "nbdfuse",
            Via::None => "none",
        })
    }
}

/// The device nodes whose presence `auto` looks at.
pub const UBLK_CONTROL: &str = crate::ublk::abi::CONTROL_PATH;
/// The first kernel NBD device.
pub const NBD0: &str = "/dev/nbd0";

/// `auto`: the daemon's ublk device when `/dev/ublk-control` exists, else the kernel
/// NBD client when `/dev/nbd0` exists, else the daemon's FUSE file + loop.
pub fn auto_via() -> Via {
    auto_via_with(|p| Path::new(p).exists())
}

/// [`auto_via`] with `exists` saying which device nodes exist.
pub fn auto_via_with(exists: impl Fn(&str) -> bool) -> Via {
    if exists(UBLK_CONTROL) {
        Via::Ublk
    } else if exists(NBD0) {
        Via::Nbd
    } else {
        Via::Fuse
    }
}

/// Refuse `--via ublk` on a host without the driver, before anything is started.
pub fn check_ublk_with(exists: impl Fn(&str) -> bool) -> Result<()> {
    if exists(UBLK_CONTROL) {
        Ok(())
    } else {
        Err(cowsnap_core::err!(
            NotFound,
            "{}",
            crate::ublk::ctrl::NO_DRIVER
        ))
    }
}

/// [`check_ublk_with`] on this host.
pub fn check_ublk() -> Result<()> {
    check_ublk_with(|p| Path::new(p).exists())
}

/// What `attach` set up, as stored in `RUN_DIR/NAME.attach.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AttachRecord {
    /// Disk name.
    pub name: String,
    /// Origin path.
    pub origin: String,
    /// How it is exposed.
    pub via: Via,
    /// The block device (`/dev/nbdN`, `/dev/loopN`), if any.
    pub device: Option<String>,
    /// NBD URI.
    pub uri: String,
    /// Daemon pid.
    pub pid: u32,
    /// Kernel NBD index (`--via nbd`).
    #[serde(default)]
    pub nbd_index: Option<u32>,
    /// ublk device id N of `/dev/ublkbN` (`--via ublk`).
    #[serde(default)]
    pub ublk_id: Option<u32>,
    /// FUSE mount directory (`--via fuse`, `--via nbdfuse`).
    #[serde(default)]
    pub fuse_mount: Option<PathBuf>,
    /// nbdfuse pid (`--via nbdfuse`).
    #[serde(default)]
    pub nbdfuse_pid: Option<i32>,
    /// Loop device (`--via fuse`, `--via nbdfuse`).
    #[serde(default)]
    pub loop_device: Option<String>,
    /// Whether the loop device does direct I/O (`--via fuse`, `--via nbdfuse`).
    #[serde(default)]
    pub direct_io: Option<bool>,
    /// Read-only attach.
    #[serde(default)]
    pub read_only: bool,
    /// Kernel NBD connections (`--via nbd`).
    #[serde(default)]
    pub nbd_connections: Option<u32>,
    /// Kernel NBD dead connection timeout in seconds (`--via nbd`).
    #[serde(default)]
    pub dead_conn_timeout: Option<u64>,
    /// The daemon's arguments (without the binary and `--lock-fd`), so that
    /// `cowsnapctl restart` starts the same daemon again.
    #[serde(default)]
    pub daemon_args: Vec<String>,
}

impl AttachRecord {
    /// Write atomically (temp file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        use std::io::Write;
        let ctx = || format!("unable to write attach record {}", path.display());
        let tmp = path.with_extension("json.tmp");
        let data = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::new(cowsnap_core::ErrorKind::InvalidInput, e.to_string()))?;
        let mut f = std::fs::File::create(&tmp).ctx(ctx)?;
        f.write_all(&data).ctx(ctx)?;
        f.sync_all().ctx(ctx)?;
        std::fs::rename(&tmp, path).ctx(ctx)
    }
    /// Read; `Ok(None)` when there is none.
    pub fn load(path: &Path) -> Result<Option<Self>> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                cowsnap_core::err!(
                    Corrupt,
                    "unable to read attach record {}: {e}",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(
                format!("unable to read attach record {}", path.display()),
                e,
            )),
        }
    }
}

/// Mount points in `mountinfo` text whose device is one of `devs` ("major:minor").
pub fn mounts_of(mountinfo: &str, devs: &[String]) -> Vec<(String, String)> {
    mountinfo::parse(mountinfo)
        .into_iter()
        .filter(|m| devs.contains(&m.dev))
        .map(|m| (m.dev, m.mount_point))
        .collect()
}

/// "major:minor" of a block device and of each of its partitions.
pub fn device_numbers(dev: &Path) -> Result<Vec<String>> {
    let meta = std::fs::metadata(dev).ctx(|| format!("unable to inspect {}", dev.display()))?;
    if !meta.file_type().is_block_device() {
        return Err(cowsnap_core::err!(
            InvalidInput,
            "{} is not a block device",
            dev.display()
        ));
    }
    let rdev = meta.rdev();
    let (maj, min) = (libc::major(rdev), libc::minor(rdev));
    let me = format!("{maj}:{min}");
    let mut out = vec![me.clone()];
    // Partitions: /sys/dev/block/M:m/<part>/{partition,dev}
    if let Ok(rd) = std::fs::read_dir(format!("/sys/dev/block/{me}")) {
        for e in rd.flatten() {
            let p = e.path();
            if p.join("partition").exists() {
                if let Ok(d) = std::fs::read_to_string(p.join("dev")) {
                    out.push(d.trim().to_string());
                }
            }
        }
    }
    Ok(out)
}

/// Where the device or any of its partitions is mounted (major:minor, mount point).
pub fn mounted_at(dev: &Path) -> Result<Vec<(String, String)>> {
    let devs = device_numbers(dev)?;
    Ok(mountinfo::read()?
        .into_iter()
        .filter(|m| devs.contains(&m.dev))
        .map(|m| (m.dev, m.mount_point))
        .collect())
}

/// Write back everything cached for a block device (`blockdev --flushbufs`).
pub fn flush_device(dev: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    // BLKFLSBUF = _IO(0x12, 97), numbered for this architecture by nix.
    nix::ioctl_none!(blkflsbuf, 0x12, 97);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .open(dev)
        .ctx(|| format!("unable to open {}", dev.display()))?;
    f.sync_all()
        .ctx(|| format!("unable to flush {}", dev.display()))?;
    // SAFETY: the fd is valid while `f` lives; BLKFLSBUF takes no argument.
    unsafe { blkflsbuf(f.as_raw_fd()) }.map_err(|e| {
        Error::io(
            format!("unable to flush the buffers of {}", dev.display()),
            e.into(),
        )
    })?;
    Ok(())
}

/// Whether a process exists (signal 0).
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // Signal 0 only checks for existence and permission.
    matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Ok(()) | Err(nix::errno::Errno::EPERM)
    )
}

/// Whether a process is a zombie (exited, not yet reaped) per /proc/PID/stat.
pub fn pid_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Wait until `pid` is gone (or a zombie), up to `timeout`.
pub fn wait_pid_gone(pid: i32, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if !pid_alive(pid) || pid_zombie(pid) {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MI: &str = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
95 22 7:3 / /mnt/my\\040disk rw,relatime shared:50 - ext4 /dev/loop3 rw
96 22 7:3 / /srv/bind rw,relatime shared:50 - ext4 /dev/loop3 rw
97 22 7:30 / /other rw,relatime shared:51 - ext4 /dev/loop30 rw
98 22 43:1 / /data rw - xfs /dev/nbd0p1 rw
";

    #[test]
    fn finds_mounts_by_device_number() {
        let m = mounts_of(MI, &["7:3".into()]);
        assert_eq!(
            m,
            vec![
                ("7:3".to_string(), "/mnt/my disk".to_string()),
                ("7:3".to_string(), "/srv/bind".to_string())
            ]
        );
        let m = mounts_of(MI, &["43:0".into(), "43:1".into()]);
        assert_eq!(m, vec![("43:1".to_string(), "/data".to_string())]);
        assert!(mounts_of(MI, &["8:0".into()]).is_empty());
        assert!(mounts_of("garbage\n\n1 2", &["7:3".into()]).is_empty());
    }

    #[test]
    fn record_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.attach.json");
        assert_eq!(AttachRecord::load(&p).unwrap(), None);
        let r = AttachRecord {
            name: "d".into(),
            origin: "/x".into(),
            via: Via::Fuse,
            device: Some("/dev/loop3".into()),
            uri: "nbd+unix:///d?socket=/r/d.nbd".into(),
            pid: 42,
            nbd_index: None,
            ublk_id: None,
            fuse_mount: Some("/r/d.fuse".into()),
            nbdfuse_pid: Some(43),
            loop_device: Some("/dev/loop3".into()),
            direct_io: Some(true),
            read_only: false,
            nbd_connections: None,
            dead_conn_timeout: None,
            daemon_args: vec!["--name".into(), "d".into()],
        };
        r.save(&p).unwrap();
        assert_eq!(AttachRecord::load(&p).unwrap(), Some(r));
        let s = std::fs::read_to_string(&p).unwrap();
        assert!(s.contains("\"via\": \"fuse\""), "{s}");
        // a record written before these fields existed still loads
        let old = s
            .replace("\"daemon_args\"", "\"x_args\"")
            .replace("\"nbd_connections\"", "\"x_conns\"");
        std::fs::write(&p, old).unwrap();
        let back = AttachRecord::load(&p).unwrap().unwrap();
        assert!(back.daemon_args.is_empty() && back.nbd_connections.is_none());
        let nf = AttachRecord {
            via: Via::Nbdfuse,
            ..back
        };
        nf.save(&p).unwrap();
        assert!(std::fs::read_to_string(&p)
            .unwrap()
            .contains("\"via\": \"nbdfuse\""));
        assert_eq!(AttachRecord::load(&p).unwrap(), Some(nf));
        std::fs::write(&p, "{").unwrap();
        assert!(AttachRecord::load(&p).is_err());
    }

    #[test]
    fn auto_prefers_ublk_then_nbd_then_fuse() {
        let with = |devs: &'static [&'static str]| move |p: &str| devs.contains(&p);
        assert_eq!(
            auto_via_with(with(&["/dev/ublk-control", "/dev/nbd0"])),
            Via::Ublk
        );
        assert_eq!(auto_via_with(with(&["/dev/ublk-control"])), Via::Ublk);
        assert_eq!(auto_via_with(with(&["/dev/nbd0"])), Via::Nbd);
        assert_eq!(
            auto_via_with(with(&["/dev/nbd1", "/dev/ublkc0"])),
            Via::Fuse
        );
        assert_eq!(auto_via_with(with(&[])), Via::Fuse);
    }

    #[test]
    fn ublk_is_refused_without_the_driver() {
        assert!(check_ublk_with(|p| p == "/dev/ublk-control").is_ok());
        let e = check_ublk_with(|p| p == "/dev/nbd0")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--via ublk needs the ublk_drv module: /dev/ublk-control not found"),
            "{e}"
        );
    }

    #[test]
    fn ublk_record_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("u.attach.json");
        let r = AttachRecord {
            name: "u".into(),
            origin: "/x".into(),
            via: Via::Ublk,
            device: Some("/dev/ublkb2".into()),
            uri: "nbd+unix:///u?socket=/r/u.nbd".into(),
            pid: 42,
            nbd_index: None,
            ublk_id: Some(2),
            fuse_mount: None,
            nbdfuse_pid: None,
            loop_device: None,
            direct_io: None,
            read_only: false,
            nbd_connections: None,
            dead_conn_timeout: None,
            daemon_args: vec![],
        };
        r.save(&p).unwrap();
        let s = std::fs::read_to_string(&p).unwrap();
        assert!(
            s.contains("\"via\": \"ublk\"") && s.contains("\"ublk_id\": 2"),
            "{s}"
        );
        assert_eq!(AttachRecord::load(&p).unwrap(), Some(r));
    }

    #[test]
    fn own_pid_alive() {
        assert!(pid_alive(std::process::id() as i32));
        assert!(!pid_alive(0));
        assert!(!pid_zombie(std::process::id() as i32));
    }
}
