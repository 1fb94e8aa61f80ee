//! Small durable-file helpers shared by the repository, change tracking, the disk
//! identity and restore: atomic publication (temp → fsync → rename → fsync dir, the
//! temp removed on drop), directory fsync, `flock`, random ids and UTC timestamps.

use crate::error::{Error, IoContext, Result};
use nix::fcntl::PosixFadviseAdvice;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// `nbytes` random bytes from the kernel, as lowercase hex.
pub fn random_hex(nbytes: usize) -> Result<String> {
    let mut buf = vec![0u8; nbytes];
    random_bytes(&mut buf)?;
    Ok(hex(&buf))
}

/// Fill `buf` with random bytes from the kernel (`getrandom(2)`, which blocks only
/// until the kernel's generator is seeded).
pub fn random_bytes(buf: &mut [u8]) -> Result<()> {
    let nbytes = buf.len();
    let mut filled = 0;
    while filled < nbytes {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`, a live,
        // writable allocation; getrandom writes at most that many bytes.
        let r = unsafe {
            libc::getrandom(
                buf[filled..].as_mut_ptr() as *mut libc::c_void,
                nbytes - filled,
                0,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(Error::io("unable to read random bytes", e));
        }
        filled += r as usize;
    }
    Ok(())
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Parse 64 hex digits into 32 bytes.
pub fn parse_hash(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The entries of a directory, in no particular order; a directory that does not exist
/// has none. Any other error, also one while reading entries, names the directory.
pub fn dir_entries(dir: &Path) -> Result<Vec<std::fs::DirEntry>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(crate::Error::io(
                format!("unable to list {}", dir.display()),
                e,
            ))
        }
    };
    rd.map(|ent| ent.ctx(|| format!("unable to list {}", dir.display())))
        .collect()
}

/// fsync a directory (makes renames and creations in it durable).
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).ctx(|| format!("unable to open directory {}", dir.display()))?;
    f.sync_all()
        .ctx(|| format!("unable to fsync directory {}", dir.display()))
}

/// A file written under a temporary name and published atomically by [`AtomicFile::commit`].
/// Dropping it uncommitted removes the temporary file.
pub struct AtomicFile {
    tmp: PathBuf,
    dest: PathBuf,
    file: File,
}

impl AtomicFile {
    /// Create the temporary file beside `dest`.
    pub fn create(dest: &Path) -> Result<Self> {
        let dir = dest.parent().unwrap_or(Path::new("."));
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".tmp-{}-{}", name, random_hex(6)?));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .ctx(|| format!("unable to create {}", tmp.display()))?;
        Ok(AtomicFile {
            tmp,
            dest: dest.to_path_buf(),
            file,
        })
    }

    /// The open temporary file.
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// Append bytes.
    pub fn write_all(&mut self, data: &[u8]) -> Result<()> {
        let tmp = self.tmp.clone();
        self.file()
            .write_all(data)
            .ctx(|| format!("unable to write {}", tmp.display()))
    }

    /// fsync, rename over the destination, fsync the directory.
    pub fn commit(self) -> Result<()> {
        let dir = self.dest.parent().unwrap_or(Path::new(".")).to_path_buf();
        self.commit_no_dir_sync()?;
        fsync_dir(&dir)
    }

    /// fsync and rename; the caller fsyncs the directory later (batching many files).
    pub fn commit_no_dir_sync(mut self) -> Result<()> {
        self.file
            .sync_all()
            .ctx(|| format!("unable to fsync {}", self.tmp.display()))?;
        std::fs::rename(&self.tmp, &self.dest).ctx(|| {
            format!(
                "unable to rename {} to {}",
                self.tmp.display(),
                self.dest.display()
            )
        })?;
        self.tmp = PathBuf::new();
        Ok(())
    }

    /// Rename to the destination without an fsync and without replacing a file already
    /// there (`renameat2` with `RENAME_NOREPLACE`): `true` if it got the name, `false`
    /// if the name was taken (the temporary file is then removed). Durability is the
    /// caller's: a `syncfs` of the file system before anything relies on the name.
    pub fn name_unsynced(mut self) -> Result<bool> {
        match nix::fcntl::renameat2(
            None,
            &self.tmp,
            None,
            &self.dest,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => {
                self.tmp = PathBuf::new();
                Ok(true)
            }
            Err(nix::errno::Errno::EEXIST) => Ok(false),
            Err(e) => Err(crate::Error::io(
                format!(
                    "unable to rename {} to {}",
                    self.tmp.display(),
                    self.dest.display()
                ),
                std::io::Error::from(e),
            )),
        }
    }
}

/// `syncfs` on the file system holding `f`: every dirty page and inode of that file
/// system written and the device's cache flushed. Since Linux 5.8 it fails if any
/// writeback error happened on the file system since `f` was opened.
pub fn syncfs(f: &File) -> std::io::Result<()> {
    nix::unistd::syncfs(f.as_raw_fd()).map_err(std::io::Error::from)
}

/// Start reading the first `len` bytes of `f` into the page cache (`POSIX_FADV_WILLNEED`):
/// one request for a file about to be read whole. Advice only: errors are ignored.
pub fn will_need(f: &File, len: u64) {
    advise(
        f,
        i64::try_from(len).unwrap_or(i64::MAX),
        PosixFadviseAdvice::POSIX_FADV_WILLNEED,
    );
}

/// Drop the clean cached pages of the file at `path` (`POSIX_FADV_DONTNEED`), so the
/// next read sees what the disk holds. Advice only: errors are ignored.
pub fn forget_cached(path: &Path) {
    if let Ok(f) = File::open(path) {
        advise(&f, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
    }
}

/// `posix_fadvise(f, 0, len, advice)` (`len` 0: to the end), errors ignored.
fn advise(f: &File, len: i64, advice: PosixFadviseAdvice) {
    let _ = nix::fcntl::posix_fadvise(f.as_raw_fd(), 0, len, advice);
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Start writeback of `len` bytes of `f` at `off` (`sync_file_range` with
/// `SYNC_FILE_RANGE_WRITE`; `len` 0: to the end) without waiting for it, so a later
/// fsync finds the data already on its way to the disk instead of writing it all
/// then. Advice only: errors are logged, never returned (the fsync that makes the data
/// durable reports them).
pub fn start_writeback(f: &File, off: u64, len: u64) {
    let (Ok(o), Ok(l)) = (i64::try_from(off), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range takes a valid fd (borrowed from `f`, open for the whole
    // call) and integers; it touches no memory of ours.
    let r = unsafe { libc::sync_file_range(f.as_raw_fd(), o, l, libc::SYNC_FILE_RANGE_WRITE) };
    if r != 0 {
        log::debug!(
            "unable to start writeback: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Write `data` to `dest` atomically and durably.
pub fn write_atomic(dest: &Path, data: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(dest)?;
    f.write_all(data)?;
    f.commit()
}

/// Take a `flock` on `path` (created if missing): shared or exclusive, blocking.
/// The lock lives as long as the returned file.
pub fn lock_file(path: &Path, exclusive: bool) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .ctx(|| format!("unable to open lock file {}", path.display()))?;
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    loop {
        // SAFETY: plain syscall on a valid fd owned by `f`; no memory is passed.
        let r = unsafe { libc::flock(f.as_raw_fd(), op) };
        if r == 0 {
            return Ok(f);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(Error::io(format!("unable to lock {}", path.display()), e));
        }
    }
}

/// Milliseconds since the epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `ms` since the epoch as a UTC timestamp (times past year 9999 clamp to its end).
fn timestamp(ms: u64) -> jiff::Timestamp {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .unwrap_or(jiff::Timestamp::MAX)
}

/// RFC 3339 UTC time, e.g. `2026-11-25T23:27:32.123Z`.
pub fn format_utc(ms: u64) -> String {
    timestamp(ms).strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// Compact sortable UTC time, e.g. `20261125T232732.123Z`.
pub fn format_utc_compact(ms: u64) -> String {
    timestamp(ms).strftime("%Y%m%dT%H%M%S%.3fZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting() {
        // 2026-11-25T23:27:32.123Z
        assert_eq!(format_utc(1_795_649_252_123), "2026-11-25T23:27:32.123Z");
        assert_eq!(format_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(format_utc_compact(0), "19700101T000000.000Z");
        assert_eq!(
            format_utc_compact(1_795_649_252_123),
            "20261125T232732.123Z"
        );
        // Past the calendar's end: clamped, no panic.
        assert!(format_utc(u64::MAX).starts_with("9999-12-"));
    }

    #[test]
    fn atomic_file_drop_removes_temp() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("x");
        {
            let mut f = AtomicFile::create(&dest).unwrap();
            f.write_all(b"abc").unwrap();
        }
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        write_atomic(&dest, b"hello").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"hello");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn hex_roundtrip() {
        let h = random_hex(32).unwrap();
        assert_eq!(h.len(), 64);
        assert_eq!(hex(&parse_hash(&h).unwrap()), h);
        assert!(parse_hash("zz").is_none());
    }
}
