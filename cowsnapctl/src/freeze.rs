//! `backup --freeze MOUNTPOINT`: which filesystem may be frozen, and for how long.
//!
//! Only the mount point of a filesystem on the disk's own exposed device (the device
//! in `RUN_DIR/NAME.attach.json`, or a partition of it) is accepted: the path must be
//! where that filesystem is mounted (the topmost mount there, per
//! `/proc/self/mountinfo`), and the directory opened for the ioctl must be on that
//! device (`fstat`), so what is checked is what gets frozen. Anything else — `/`, a
//! subdirectory, another disk — is refused before anything is frozen.
//!
//! Every freeze is bounded: a watchdog thread thaws (`FITHAW`) at the deadline. The
//! main thread thaws as soon as the daemon has answered that the snapshot instant has
//! passed; both thaw under one mutex, so exactly one of them does. If the watchdog
//! thawed first, or the filesystem was no longer frozen (someone else thawed it), the
//! instant cannot be shown to lie inside the freeze, and the caller fails the backup.

use anyhow::{anyhow, bail, Context, Result};
use cowsnap_nbd::attach;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

// FIFREEZE = _IOWR('X', 119, int), FITHAW = _IOWR('X', 120, int), numbered for this
// architecture by nix.
nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);

/// FIFREEZE or FITHAW.
#[derive(Debug, Clone, Copy)]
enum FsIoctl {
    Freeze,
    Thaw,
}

/// Longest freeze `--freeze-timeout` may ask for.
pub const MAX_FREEZE: Duration = Duration::from_secs(10);

pub use cowsnap_core::mountinfo::{parse as parse_mountinfo, MountEntry};

/// Decide whether `path` (canonical) may be frozen for a disk whose device and
/// partitions are `devs`, given the mount table and the device of the opened
/// directory (`dir_dev`, "major:minor"). The error is the reason.
pub fn check_mount(
    mounts: &[MountEntry],
    path: &str,
    dir_dev: &str,
    devs: &[String],
    device: &str,
) -> std::result::Result<(), String> {
    let on_disk: Vec<&str> = mounts
        .iter()
        .filter(|m| devs.contains(&m.dev))
        .map(|m| m.mount_point.as_str())
        .collect();
    let hint = if on_disk.is_empty() {
        format!("nothing on {device} is mounted")
    } else {
        format!("{device} is mounted on {}", on_disk.join(", "))
    };
    // The topmost mount on that path is the one a lookup of it reaches.
    let Some(top) = mounts.iter().rev().find(|m| m.mount_point == path) else {
        return Err(format!("it is not a mount point ({hint})"));
    };
    if top.dev != dir_dev {
        return Err(format!(
            "the mount on it changed while it was checked ({} now, {dir_dev} opened)",
            top.dev
        ));
    }
    if !devs.contains(&top.dev) {
        return Err(format!(
            "it is a filesystem on {} ({}), not on this disk's device ({hint})",
            if top.source.is_empty() {
                "?"
            } else {
                &top.source
            },
            top.dev
        ));
    }
    Ok(())
}

/// A mount point checked for freezing, held open.
#[derive(Debug)]
pub struct Mountpoint {
    dir: File,
    /// The canonical path.
    pub path: PathBuf,
}

/// Check that `path` is the mount point of a filesystem on `device` (or a partition
/// of it) and open it for the freeze.
pub fn open_mountpoint(path: &Path, device: &Path) -> Result<Mountpoint> {
    let what = || format!("unable to freeze {}", path.display());
    let canon = std::fs::canonicalize(path).with_context(what)?;
    let devs = attach::device_numbers(device).with_context(what)?;
    let dir = File::open(&canon).with_context(what)?;
    let meta = dir.metadata().with_context(what)?;
    if !meta.is_dir() {
        bail!("{}: not a directory", what());
    }
    let dir_dev = format!("{}:{}", libc::major(meta.dev()), libc::minor(meta.dev()));
    let mi = std::fs::read_to_string("/proc/self/mountinfo")
        .with_context(|| format!("{}: unable to read /proc/self/mountinfo", what()))?;
    check_mount(
        &parse_mountinfo(&mi),
        &canon.to_string_lossy(),
        &dir_dev,
        &devs,
        &device.display().to_string(),
    )
    .map_err(|why| anyhow!("{}: {why}", what()))?;
    Ok(Mountpoint { dir, path: canon })
}

fn ioctl_int(f: &File, req: FsIoctl) -> std::io::Result<()> {
    let mut arg: libc::c_int = 0;
    // SAFETY: the fd is valid while `f` lives; `arg` is a live int for the call's
    // duration (FIFREEZE/FITHAW ignore it).
    let r = unsafe {
        match req {
            FsIoctl::Freeze => fifreeze(f.as_raw_fd(), &mut arg),
            FsIoctl::Thaw => fithaw(f.as_raw_fd(), &mut arg),
        }
    };
    r.map(|_| ()).map_err(std::io::Error::from)
}

/// How a bounded freeze ended.
#[derive(Debug)]
pub enum Outcome {
    /// Thawed by the caller, within the bound: everything done meanwhile happened
    /// while the filesystem was frozen.
    Held {
        /// How long it stayed frozen.
        frozen_for: Duration,
    },
    /// The watchdog thawed it at the deadline (the thaw's error, if it had one).
    Expired {
        /// The bound.
        bound: Duration,
        /// The watchdog's thaw failed.
        thaw_error: Option<String>,
    },
    /// The caller's thaw failed: with EINVAL the filesystem was not frozen any more
    /// (someone else thawed it), so nothing shows it stayed frozen.
    ThawFailed(std::io::Error),
}

enum State {
    Frozen,
    Thawed,
    Expired(Option<String>),
}

type ThawFn = Box<dyn FnMut() -> std::io::Result<()> + Send>;

struct Inner {
    state: State,
    thaw: ThawFn,
}

/// A frozen filesystem with a deadline: a thread thaws it when the deadline passes;
/// [`Watchdog::finish`] (or dropping it) thaws it before that.
pub struct Watchdog {
    shared: Arc<(Mutex<Inner>, Condvar)>,
    thread: Option<JoinHandle<()>>,
    started: Instant,
    bound: Duration,
    outcome: Option<Outcome>,
}

impl Watchdog {
    /// Arm a watchdog for something already frozen; `thaw` undoes it.
    pub fn arm(bound: Duration, thaw: ThawFn) -> Result<Watchdog> {
        let shared = Arc::new((
            Mutex::new(Inner {
                state: State::Frozen,
                thaw,
            }),
            Condvar::new(),
        ));
        let started = Instant::now();
        let deadline = started + bound;
        let sh = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("freeze-watchdog".into())
            .spawn(move || {
                let (m, cv) = &*sh;
                let mut g = m.lock().unwrap_or_else(PoisonError::into_inner);
                while matches!(g.state, State::Frozen) {
                    let now = Instant::now();
                    if now >= deadline {
                        // Nothing here may block on the frozen filesystem: no output.
                        let r = (g.thaw)();
                        g.state = State::Expired(r.err().map(|e| e.to_string()));
                        return;
                    }
                    g = cv
                        .wait_timeout(g, deadline - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            });
        let thread = match spawned {
            Ok(t) => t,
            Err(e) => {
                // No watchdog, no freeze.
                let (m, _) = &*shared;
                let mut g = m.lock().unwrap_or_else(PoisonError::into_inner);
                let _ = (g.thaw)();
                g.state = State::Thawed;
                bail!("unable to start the freeze watchdog: {e}");
            }
        };
        Ok(Watchdog {
            shared,
            thread: Some(thread),
            started,
            bound,
            outcome: None,
        })
    }

    fn end(&mut self) {
        if self.outcome.is_some() {
            return;
        }
        let outcome = {
            let (m, cv) = &*self.shared;
            let mut g = m.lock().unwrap_or_else(PoisonError::into_inner);
            let o = match std::mem::replace(&mut g.state, State::Thawed) {
                State::Frozen => {
                    let frozen_for = self.started.elapsed();
                    match (g.thaw)() {
                        Ok(()) => Outcome::Held { frozen_for },
                        Err(e) => Outcome::ThawFailed(e),
                    }
                }
                State::Expired(thaw_error) => Outcome::Expired {
                    bound: self.bound,
                    thaw_error,
                },
                State::Thawed => Outcome::ThawFailed(std::io::Error::other("thawed twice")),
            };
            cv.notify_all();
            o
        };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.outcome = Some(outcome);
    }

    /// Thaw now (unless the watchdog already did) and say how the freeze ended.
    pub fn finish(mut self) -> Outcome {
        self.end();
        self.outcome
            .take()
            .unwrap_or(Outcome::ThawFailed(std::io::Error::other(
                "no outcome recorded",
            )))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.end();
    }
}

/// Freeze the checked mount point, with a watchdog that thaws it after `bound`.
pub fn freeze(mp: &Mountpoint, bound: Duration) -> Result<Watchdog> {
    ioctl_int(&mp.dir, FsIoctl::Freeze).map_err(|e| {
        anyhow!(
            "unable to freeze {}: {e}{}",
            mp.path.display(),
            if e.raw_os_error() == Some(libc::EBUSY) {
                " (it is frozen already)"
            } else {
                ""
            }
        )
    })?;
    let dir = match mp.dir.try_clone() {
        Ok(d) => d,
        Err(e) => {
            let _ = ioctl_int(&mp.dir, FsIoctl::Thaw);
            bail!("unable to freeze {}: {e}", mp.path.display());
        }
    };
    Watchdog::arm(bound, Box::new(move || ioctl_int(&dir, FsIoctl::Thaw)))
}

/// The mount point `--freeze` names, checked against the exposed device of disk `name`
/// (from its attach record, which must belong to the daemon answering on `cl`).
pub fn disk_mountpoint(
    paths: &cowsnap_nbd::paths::DiskPaths,
    cl: &mut cowsnap_nbd::control::Client,
    name: &str,
    m: &std::path::Path,
) -> Result<Mountpoint> {
    let what = || format!("unable to freeze {}", m.display());
    let st = cl
        .status()
        .map_err(|e| anyhow!("{}: the daemon of {name} does not answer: {e}", what()))?;
    let rec = cowsnap_nbd::attach::AttachRecord::load(&paths.attach_record())
        .with_context(what)?
        .filter(|r| r.pid == st.pid)
        .ok_or_else(|| {
            anyhow!(
                "{}: disk {name} has no attach record of its daemon (pid {}), so no device \
                 to check the mount against",
                what(),
                st.pid
            )
        })?;
    let Some(dev) = rec.device else {
        bail!(
            "{}: disk {name} has no block device (attached --via {}), so no filesystem of it \
             can be mounted",
            what(),
            rec.via
        );
    };
    open_mountpoint(m, std::path::Path::new(&dev))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn counter() -> (Arc<AtomicUsize>, ThawFn) {
        let n = Arc::new(AtomicUsize::new(0));
        let n2 = n.clone();
        (
            n,
            Box::new(move || {
                n2.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }),
        )
    }

    #[test]
    fn finish_within_the_bound_thaws_once() {
        let (n, thaw) = counter();
        let w = Watchdog::arm(Duration::from_secs(5), thaw).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        match w.finish() {
            Outcome::Held { frozen_for } => assert!(frozen_for < Duration::from_secs(5)),
            o => panic!("{o:?}"),
        }
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn watchdog_thaws_at_the_deadline() {
        let (n, thaw) = counter();
        let t0 = Instant::now();
        let w = Watchdog::arm(Duration::from_millis(200), thaw).unwrap();
        // A slow snapshot step: the watchdog thaws while we are still "waiting".
        while n.load(Ordering::SeqCst) == 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "watchdog never fired"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let fired = t0.elapsed();
        assert!(fired >= Duration::from_millis(200), "{fired:?}");
        assert!(fired < Duration::from_millis(1500), "{fired:?}");
        std::thread::sleep(Duration::from_millis(50));
        match w.finish() {
            Outcome::Expired { bound, thaw_error } => {
                assert_eq!(bound, Duration::from_millis(200));
                assert!(thaw_error.is_none());
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(n.load(Ordering::SeqCst), 1, "thawed exactly once");
    }

    #[test]
    fn drop_thaws() {
        let (n, thaw) = counter();
        drop(Watchdog::arm(Duration::from_secs(5), thaw).unwrap());
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn failed_thaw_is_not_held() {
        let w = Watchdog::arm(
            Duration::from_secs(5),
            Box::new(|| Err(std::io::Error::from_raw_os_error(libc::EINVAL))),
        )
        .unwrap();
        assert!(matches!(w.finish(), Outcome::ThawFailed(_)));
    }

    const MI: &str = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
95 22 7:3 / /mnt/my\\040disk rw,relatime shared:50 - ext4 /dev/loop3 rw
96 22 7:3 /sub /srv/bind rw,relatime shared:50 - ext4 /dev/loop3 rw
97 22 7:30 / /other rw,relatime shared:51 - ext4 /dev/loop30 rw
98 22 43:1 / /data rw - xfs /dev/nbd0p1 rw
99 22 0:50 / /data rw - tmpfs tmpfs rw
";

    #[test]
    fn only_this_disks_mount_points() {
        let m = parse_mountinfo(MI);
        assert_eq!(m[1].mount_point, "/mnt/my disk");
        assert_eq!(m[1].source, "/dev/loop3");
        let loop3 = ["7:3".to_string()];
        assert!(check_mount(&m, "/mnt/my disk", "7:3", &loop3, "/dev/loop3").is_ok());
        assert!(check_mount(&m, "/srv/bind", "7:3", &loop3, "/dev/loop3").is_ok());
        let e = check_mount(&m, "/", "259:2", &loop3, "/dev/loop3").unwrap_err();
        assert!(
            e.contains("/dev/nvme0n1p2") && e.contains("/mnt/my disk"),
            "{e}"
        );
        let e = check_mount(&m, "/mnt/my disk/x", "7:3", &loop3, "/dev/loop3").unwrap_err();
        assert!(e.contains("not a mount point"), "{e}");
        assert!(check_mount(&m, "/other", "7:30", &loop3, "/dev/loop3").is_err());
        // a partition of the disk counts; a mount stacked on top hides it
        let nbd0 = ["43:0".to_string(), "43:1".to_string()];
        let e = check_mount(&m, "/data", "0:50", &nbd0, "/dev/nbd0").unwrap_err();
        assert!(e.contains("tmpfs"), "{e}");
        let m2 = parse_mountinfo(&MI.lines().take(5).collect::<Vec<_>>().join("\n"));
        assert!(check_mount(&m2, "/data", "43:1", &nbd0, "/dev/nbd0").is_ok());
        // the opened directory must be the mount that was checked
        assert!(check_mount(&m2, "/data", "259:2", &nbd0, "/dev/nbd0").is_err());
        let e = check_mount(&m, "/nowhere", "259:2", &["8:0".into()], "/dev/sda").unwrap_err();
        assert!(e.contains("nothing on /dev/sda is mounted"), "{e}");
    }
}
