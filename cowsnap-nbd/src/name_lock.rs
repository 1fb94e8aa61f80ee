//! One disk name, one owner: an exclusive `flock` on `RUN_DIR/NAME.lock`.
//!
//! `cowsnapctl attach` takes the lock before it touches anything of the name (stale
//! files, the log, the daemon) and hands the locked descriptor to the daemon it starts
//! (`cowsnap-nbd --lock-fd N`); the daemon holds it for its whole life. A daemon started
//! by hand takes the lock itself, before it binds or removes anything. So of two
//! attaches of one name exactly one proceeds, and the other touches nothing.
//!
//! Removing the file: only a holder unlinks it, while still holding it; whoever
//! acquires checks afterwards that the file it locked is still the one at the path
//! (same device and inode) and starts over if not. Without that check, an unlink
//! between another process's open and flock would let two processes "hold" the lock
//! on two different files. The daemon removes the file at exit only if it took the
//! lock itself; an inherited lock is removed by `detach` (which takes the lock once
//! the daemon is gone) or by the failing `attach` that still holds it.
//!
//! The file holds the pid of the last holder, for messages only.

use cowsnap_core::error::{Error, IoContext, Result};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// A held name lock. Dropping it releases the lock (when no other process holds the
/// same open file) but leaves the file; [`NameLock::remove`] unlinks it first.
#[derive(Debug)]
pub struct NameLock {
    file: File,
    path: PathBuf,
}

fn same_file(f: &File, path: &Path) -> bool {
    match (f.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// flock(LOCK_EX | LOCK_NB): Ok(true) when taken, Ok(false) when another holds it.
fn try_flock(f: &File) -> std::io::Result<bool> {
    // SAFETY: flock on a valid fd owned by `f`.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

impl NameLock {
    /// Take the lock without waiting; `Ok(None)` when another process holds it.
    pub fn try_acquire(path: &Path) -> Result<Option<NameLock>> {
        let ctx = || format!("unable to lock {}", path.display());
        for _ in 0..100 {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .ctx(ctx)?;
            if !try_flock(&file).ctx(ctx)? {
                return Ok(None);
            }
            if same_file(&file, path) {
                let lock = NameLock {
                    file,
                    path: path.to_path_buf(),
                };
                lock.write_pid(std::process::id());
                return Ok(Some(lock));
            }
            // The holder unlinked it between our open and our flock: start over.
        }
        Err(cowsnap_core::err!(
            Busy,
            "unable to lock {}: it keeps being replaced",
            path.display()
        ))
    }

    /// Adopt a lock inherited from the process that started this one: `fd` must be
    /// open on `path` and hold (or be able to take) its lock.
    ///
    /// # Safety
    /// `fd` must be an open descriptor that nothing else in this process owns; the
    /// returned lock closes it.
    pub unsafe fn adopt(fd: RawFd, path: &Path) -> Result<NameLock> {
        // SAFETY: the caller passes an fd nothing else owns (see above).
        let file = unsafe { File::from_raw_fd(fd) };
        if !same_file(&file, path) {
            return Err(cowsnap_core::err!(
                InvalidInput,
                "unable to use lock descriptor {fd}: it is not open on {}",
                path.display()
            ));
        }
        // Taking a lock this open file already holds succeeds at once.
        if !try_flock(&file).ctx(|| format!("unable to lock {}", path.display()))? {
            return Err(cowsnap_core::err!(
                Busy,
                "unable to use lock descriptor {fd}: {} is held by another process",
                path.display()
            ));
        }
        // No child inherits it.
        let _ = nix::fcntl::fcntl(
            file.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        let lock = NameLock {
            file,
            path: path.to_path_buf(),
        };
        lock.write_pid(std::process::id());
        Ok(lock)
    }

    /// Take the lock, waiting up to `timeout` while another process holds it.
    pub fn acquire_within(path: &Path, timeout: std::time::Duration) -> Result<Option<NameLock>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(l) = Self::try_acquire(path)? {
                return Ok(Some(l));
            }
            if std::time::Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Record `pid` in the file (best effort: for messages only).
    pub fn write_pid(&self, pid: u32) {
        let mut f = &self.file;
        let _ = self.file.set_len(0);
        let _ = f.rewind();
        let _ = f.write_all(format!("{pid}\n").as_bytes());
    }

    /// The descriptor, for handing it to a child process.
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unlink the file while still holding it, then release.
    pub fn remove(self) {
        if same_file(&self.file, &self.path) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The pid written by the last holder of the lock at `path`, if any.
pub fn holder_pid(path: &Path) -> Option<i32> {
    let mut s = String::new();
    File::open(path).ok()?.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// Whether some process holds the lock at `path` now (a probe: takes and drops it).
pub fn is_held(path: &Path) -> Result<bool> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(format!("unable to open {}", path.display()), e)),
    };
    Ok(!try_flock(&f).ctx(|| format!("unable to lock {}", path.display()))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.lock");
        let a = NameLock::try_acquire(&p).unwrap().expect("first");
        assert!(NameLock::try_acquire(&p).unwrap().is_none());
        assert!(is_held(&p).unwrap());
        assert_eq!(holder_pid(&p), Some(std::process::id() as i32));
        drop(a);
        assert!(!is_held(&p).unwrap());
        let b = NameLock::try_acquire(&p).unwrap().expect("after release");
        b.remove();
        assert!(!p.exists());
        assert!(!is_held(&p).unwrap());
    }

    #[test]
    fn adopt_checks_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.lock");
        let other = dir.path().join("other");
        std::fs::write(&other, "").unwrap();
        let a = NameLock::try_acquire(&p).unwrap().unwrap();
        // SAFETY: dup gives a descriptor owned by nothing else.
        let fd = unsafe { libc::dup(a.raw_fd()) };
        // SAFETY: `fd` is owned by nothing else.
        let b = unsafe { NameLock::adopt(fd, &p) }.unwrap();
        // same open file: still one lock, held
        drop(a);
        assert!(NameLock::try_acquire(&p).unwrap().is_none());
        drop(b);
        let f = File::open(&other).unwrap();
        let fd = f.as_raw_fd();
        std::mem::forget(f);
        // SAFETY: `f` was forgotten, so `fd` is owned by nothing else.
        assert!(unsafe { NameLock::adopt(fd, &p) }.is_err());
    }
}
