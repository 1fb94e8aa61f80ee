//! The FUSE attach paths, for hosts without `nbd.ko`: the export is the file
//! `RUN_DIR/NAME.fuse/disk`, and `losetup` turns that file into `/dev/loopN`.
//!
//! - `--via fuse` ([`attach_file`]): the daemon serves the file itself
//!   (`crate::fuse`, `cowsnap-nbd --fuse-mount`), mounted before the daemon answers;
//!   only the loop device is set up here.
//! - `--via nbdfuse` ([`attach`]): libnbd's `nbdfuse` serves the file as an NBD client
//!   of the daemon's socket (a second process and a socket hop; kept as a fallback for
//!   a daemon binary or kernel where the in-daemon server cannot mount).
//!
//! Loop set-up: losetup with direct I/O (so the page cache is not doubled; if the
//! kernel refuses direct I/O on the FUSE file, plain buffered loop I/O is used and the
//! record says so). Tear-down is the reverse: `losetup -d`, unmount the FUSE mount
//! (nbdfuse then exits by itself; the daemon's workers end), remove the directory.

use super::{pid_alive, wait_pid_gone};
use cowsnap_core::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What the FUSE path set up.
#[derive(Debug, Clone)]
pub struct FuseAttach {
    /// Mount directory.
    pub mount_dir: PathBuf,
    /// nbdfuse pid (`--via nbdfuse`; none when the daemon serves the file).
    pub nbdfuse_pid: Option<i32>,
    /// `/dev/loopN`, once set up.
    pub loop_device: Option<String>,
    /// Whether the loop device does direct I/O.
    pub direct_io: bool,
    /// Remarks for the user.
    pub notes: Vec<String>,
}

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io(format!("unable to {what}"), e))?;
    if !out.status.success() {
        return Err(cowsnap_core::err!(
            Io,
            "unable to {what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Whether `dir` is a mount point (by /proc/self/mountinfo).
pub fn is_mounted(dir: &Path) -> bool {
    let d = dir.to_string_lossy();
    cowsnap_core::mountinfo::read()
        .map(|ms| ms.iter().any(|m| m.mount_point == d))
        .unwrap_or(false)
}

/// Start nbdfuse on `uri`, wait until it serves, set up a loop device.
/// On failure, everything set up so far is torn down.
pub fn attach(
    uri: &str,
    mount_dir: &Path,
    pid_file: &Path,
    log: Option<&Path>,
    read_only: bool,
    timeout: Duration,
) -> Result<FuseAttach> {
    std::fs::create_dir_all(mount_dir)
        .map_err(|e| Error::io(format!("unable to create {}", mount_dir.display()), e))?;
    let _ = std::fs::remove_file(pid_file);
    let mut cmd = Command::new("nbdfuse");
    if read_only {
        cmd.arg("-r");
    }
    cmd.arg("-P")
        .arg(pid_file)
        .arg(mount_dir.join("disk"))
        .arg(uri)
        .stdin(Stdio::null());
    match log.and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    }) {
        Some(f) => {
            let f2 = f.try_clone().ok();
            cmd.stdout(f);
            match f2 {
                Some(f2) => cmd.stderr(f2),
                None => cmd.stderr(Stdio::null()),
            };
        }
        None => {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
    }
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: the hook runs in the forked child before exec, where only
        // async-signal-safe calls are allowed: setsid is one, and it allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                let _ = nix::unistd::setsid();
                Ok(())
            });
        }
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io("unable to start nbdfuse (is libnbd-bin installed?)", e))?;
    let deadline = Instant::now() + timeout;
    let pid = loop {
        if let Ok(s) = std::fs::read_to_string(pid_file) {
            if let Ok(p) = s.trim().parse::<i32>() {
                if is_mounted(mount_dir) {
                    break p;
                }
            }
        }
        if let Ok(Some(st)) = child.try_wait() {
            if st.success() {
                // It went to the background by itself: keep waiting for the pid file.
                std::thread::sleep(Duration::from_millis(20));
                if Instant::now() < deadline {
                    continue;
                }
            }
            give_up(mount_dir);
            return Err(cowsnap_core::err!(
                Io,
                "unable to start nbdfuse on {uri}: it exited with {st}{}",
                log.map(|p| format!(" (see {})", p.display()))
                    .unwrap_or_default()
            ));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            give_up(mount_dir);
            return Err(cowsnap_core::err!(
                Io,
                "unable to start nbdfuse on {uri}: not serving after {:?}",
                timeout
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let fa = FuseAttach {
        mount_dir: mount_dir.to_path_buf(),
        nbdfuse_pid: Some(pid),
        loop_device: None,
        direct_io: true,
        notes: Vec::new(),
    };
    setup_loop(fa, read_only)
}

/// `--via fuse`: the daemon serves `mount_dir/disk` already; set up a loop device on
/// it. On failure the loop device is not left behind (the mount is the daemon's).
pub fn attach_file(mount_dir: &Path, read_only: bool) -> Result<FuseAttach> {
    let file = mount_dir.join(crate::fuse::FILE_NAME);
    if !is_mounted(mount_dir) || !file.exists() {
        return Err(cowsnap_core::err!(
            Io,
            "unable to find the daemon's FUSE file {}",
            file.display()
        ));
    }
    let fa = FuseAttach {
        mount_dir: mount_dir.to_path_buf(),
        nbdfuse_pid: None,
        loop_device: None,
        direct_io: true,
        notes: Vec::new(),
    };
    setup_loop(fa, read_only)
}

/// losetup (direct I/O when the kernel allows it) on `fa.mount_dir/disk`. On failure
/// everything in `fa` is torn down.
fn setup_loop(mut fa: FuseAttach, read_only: bool) -> Result<FuseAttach> {
    let mount_dir = fa.mount_dir.clone();
    let file = mount_dir.join("disk");
    let mut base = Command::new("losetup");
    if read_only {
        base.arg("-r");
    }
    let lo = {
        let mut c = Command::new("losetup");
        if read_only {
            c.arg("-r");
        }
        c.arg("--direct-io=on").arg("-f").arg("--show").arg(&file);
        match run(&mut c, "set up a loop device with direct I/O") {
            Ok(d) => Ok(d),
            Err(e) => {
                fa.direct_io = false;
                fa.notes.push(format!(
                    "loop device without direct I/O ({e}); pages are cached twice"
                ));
                let mut c = base;
                c.arg("-f").arg("--show").arg(&file);
                run(
                    &mut c,
                    &format!("set up a loop device on {}", file.display()),
                )
            }
        }
    };
    match lo {
        Ok(dev) if dev.starts_with("/dev/") => {
            // losetup may silently fall back to buffered I/O: read the real state.
            let dio = loop_dio(&dev);
            if fa.direct_io && dio == Some(false) {
                fa.direct_io = false;
                fa.notes.push(
                    "the kernel refused direct I/O on the loop device; using buffered I/O".into(),
                );
            }
            fa.loop_device = Some(dev);
            Ok(fa)
        }
        Ok(other) => {
            detach(&fa)?;
            Err(cowsnap_core::err!(
                Io,
                "unable to set up a loop device: losetup printed {other:?}"
            ))
        }
        Err(e) => {
            let _ = detach(&fa);
            Err(e)
        }
    }
}

/// `/sys/block/loopN/loop/dio`.
pub fn loop_dio(dev: &str) -> Option<bool> {
    let n = Path::new(dev).file_name()?.to_string_lossy().into_owned();
    let s = std::fs::read_to_string(format!("/sys/block/{n}/loop/dio")).ok()?;
    Some(s.trim() == "1")
}

/// Tear down: loop device, FUSE mount, nbdfuse, mount directory. Idempotent.
pub fn detach(fa: &FuseAttach) -> Result<()> {
    if let Some(lo) = &fa.loop_device {
        if Path::new(lo).exists() && loop_backing(lo).is_some() {
            run(
                Command::new("losetup").arg("-d").arg(lo),
                &format!("detach loop device {lo}"),
            )?;
            // losetup -d is asynchronous while the device is open; wait for release.
            let deadline = Instant::now() + Duration::from_secs(10);
            while loop_backing(lo).is_some() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let mut lazy = false;
    if is_mounted(&fa.mount_dir) {
        let mut last = None;
        for _ in 0..30 {
            match unmount(&fa.mount_dir, false) {
                Ok(_) => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(e) = last {
            // Still busy (e.g. a forced detach of a mounted loop device): detach the
            // FUSE mount lazily; it goes away when its last user does.
            log::warn!("{e}; unmounting {} lazily", fa.mount_dir.display());
            lazy = true;
            unmount(&fa.mount_dir, true)?;
        }
    }
    // After a lazy unmount nbdfuse lives until the mount's last user lets go.
    if let Some(pid) = fa.nbdfuse_pid {
        if !lazy && pid_alive(pid) && !wait_pid_gone(pid, Duration::from_secs(10)) {
            log::warn!("nbdfuse (pid {pid}) did not exit after unmount");
        }
    }
    let _ = std::fs::remove_dir(&fa.mount_dir);
    Ok(())
}

/// Unmount a FUSE mount (`lazy`: `MNT_DETACH`): `umount2` as root, `fusermount3 -u`
/// when that is not permitted.
fn unmount(dir: &Path, lazy: bool) -> Result<()> {
    let flags = if lazy {
        nix::mount::MntFlags::MNT_DETACH
    } else {
        nix::mount::MntFlags::empty()
    };
    match nix::mount::umount2(dir, flags) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EPERM) => {
            let mut c = Command::new("fusermount3");
            c.arg("-u");
            if lazy {
                c.arg("-z");
            }
            run(c.arg(dir), &format!("unmount {}", dir.display())).map(|_| ())
        }
        Err(e) => Err(Error::io(
            format!("unable to unmount {}", dir.display()),
            e.into(),
        )),
    }
}

/// The backing file of a loop device, if it is bound.
pub fn loop_backing(dev: &str) -> Option<String> {
    let n = Path::new(dev).file_name()?.to_string_lossy().into_owned();
    std::fs::read_to_string(format!("/sys/block/{n}/loop/backing_file"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Undo a half-started nbdfuse: unmount (if it got that far) and remove the mount point.
fn give_up(mount_dir: &Path) {
    let _ = Command::new("fusermount3")
        .arg("-u")
        .arg(mount_dir)
        .output();
    let _ = std::fs::remove_dir(mount_dir);
}
