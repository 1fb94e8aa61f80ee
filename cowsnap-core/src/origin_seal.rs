//! The origin seal: what a disk's change tracking is bound to, and the evidence that
//! the origin did not change while no daemon served it.
//!
//! # Design notes
//!
//! Change tracking only knows the writes that went through the daemon. Between two
//! daemons (detached, or the daemon killed) anything may write to the origin, and the
//! state directory is found by the disk's *name*, which may now name another file or
//! device. Tracking is therefore trusted at start-up only when `STATE/NAME/origin.seal`
//! proves both that the origin is the one the tracking was recorded for and that it
//! did not change since the last daemon stopped.
//!
//! Lifecycle:
//! - At start the daemon reads the seal, observes the origin and compares; it removes
//!   the seal (and fsyncs the directory) just before anything can write to the origin
//!   (a live restore's fill, NBD clients), so a start that fails earlier keeps a seal
//!   that is still true. A missing seal (unclean stop: kill -9, crash, power loss; or state
//!   from before seals existed), an unreadable one, an invalidated one, another origin,
//!   or any evidence of change makes the change log untrusted with the reason
//!   (`ChangeLog::distrust`); the next incremental reads everything (deduplicated
//!   against the repository) and puts the reason in its notes. Since the seal is gone
//!   while a daemon serves, a crash can never leave a stale valid seal.
//! - At a clean shutdown, after the last write was answered, every connection closed,
//!   a live restore's background fill stopped and the final flush (fsync) succeeded,
//!   the daemon observes the origin and writes the seal (temp, fsync, rename, fsync
//!   directory). If any of that cannot be guaranteed, no seal is written.
//! - An offline restore onto a path that is the sealed origin of any disk in the state
//!   directory rewrites that seal as invalidated (with the reason) before it writes.
//!
//! Evidence, and why it is sound:
//! - **Files**: st_dev + st_ino (identity), size, mtime and ctime in nanoseconds. Any
//!   write, truncate, fallocate, hole punch or attribute change through any path or
//!   link updates ctime, which no user call can set back (utimensat sets mtime but
//!   bumps ctime to now). Timestamps come from a coarse clock, so a write in the same
//!   clock tick as our last one could leave them unchanged: before recording, the
//!   seal waits until the coarse clock is past both timestamps (two seconds past when
//!   both have zero nanoseconds, i.e. a filesystem with coarse timestamps), so any
//!   later write gets a different one. Limits: the wall clock stepped back by more
//!   than the gap, or writes to the block device beneath the filesystem, are not seen.
//! - **Block devices**: identity is major:minor plus the disk sequence number
//!   (`diskseq`, unique per attached disk and boot, Linux 5.15+) and the stable ids
//!   found in sysfs/udev (WWID, serial, partition UUID, start and number, dm/md UUID,
//!   loop backing file); a device with none of these cannot be proven the same one
//!   and is never trusted. Evidence of no change is the kernel's own I/O accounting,
//!   `/sys/dev/block/M:m/stat` write and discard counters (I/Os and sectors; write-
//!   zeroes counts as a write), valid only within one boot (same
//!   `/proc/sys/kernel/random/boot_id`): after a reboot tracking is never trusted.
//!   Flushes are counted apart (Linux 5.5+), so neither our final fsync (recorded
//!   after) nor a later BLKFLSBUF moves them, and the last close writes nothing: the
//!   fsync left no dirty page. A counter that moves for any reason only costs a full
//!   read. For a partition, writes through the whole disk bypass the partition's
//!   counters: the seal also records the whole disk's counters minus those of all its
//!   partitions (the kernel adds partition I/O to the whole disk), which moves only
//!   with direct whole-disk writes. For a loop device the backing file is also sealed
//!   as a file. Not seen: writes to the devices beneath a dm/md device by another
//!   path than this device, or to a disk under another driver while detached.
//!   Filesystem counters (ext4 lifetime writes) are not used: they miss raw writes.

use crate::error::{IoContext, Result};
use crate::fsutil;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// File name of the seal inside a disk's state directory.
pub const SEAL_FILE: &str = "origin.seal";
/// The origin seal format version written and read.
pub const SEAL_VERSION: u32 = 1;

/// Write and discard counters of one block device (from its sysfs `stat`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteCounters {
    /// Write I/Os completed.
    pub write_ios: u64,
    /// Sectors written.
    pub write_sectors: u64,
    /// Discard I/Os completed (0 on kernels without discard accounting).
    pub discard_ios: u64,
    /// Sectors discarded.
    pub discard_sectors: u64,
}

impl WriteCounters {
    fn minus(self, o: WriteCounters) -> WriteCounters {
        WriteCounters {
            write_ios: self.write_ios.wrapping_sub(o.write_ios),
            write_sectors: self.write_sectors.wrapping_sub(o.write_sectors),
            discard_ios: self.discard_ios.wrapping_sub(o.discard_ios),
            discard_sectors: self.discard_sectors.wrapping_sub(o.discard_sectors),
        }
    }
}

/// Parse a sysfs block `stat` line (11, 15 or 17 fields; see the kernel's
/// Documentation/block/stat.rst): field 5 write I/Os, 7 write sectors, 12 discard I/Os,
/// 14 discard sectors.
pub fn parse_stat(s: &str) -> Option<WriteCounters> {
    let f: Vec<u64> = s
        .split_whitespace()
        .map(|x| x.parse::<u64>().ok())
        .collect::<Option<Vec<u64>>>()?;
    if f.len() < 11 {
        return None;
    }
    let (discard_ios, discard_sectors) = if f.len() >= 15 {
        (f[11], f[13])
    } else {
        (0, 0)
    };
    Some(WriteCounters {
        write_ios: f[4],
        write_sectors: f[6],
        discard_ios,
        discard_sectors,
    })
}

/// A regular file's identity and change evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileState {
    /// st_dev.
    pub dev: u64,
    /// st_ino.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// mtime, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// ctime, nanoseconds since the epoch.
    pub ctime_ns: i64,
}

fn ns(sec: i64, nsec: i64) -> i64 {
    sec.saturating_mul(1_000_000_000).saturating_add(nsec)
}

impl FileState {
    fn of(m: &std::fs::Metadata) -> FileState {
        FileState {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        }
    }
}

/// A block device's identity and change evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
    /// Size in bytes (sysfs `size` × 512).
    pub size: u64,
    /// Disk sequence number of the (whole) disk, unique within one boot.
    pub diskseq: Option<u64>,
    /// Stable identities found (wwid, serial, partuuid, part_start, dm_uuid, ...).
    pub ids: BTreeMap<String, String>,
    /// /proc/sys/kernel/random/boot_id.
    pub boot_id: String,
    /// The device's own write counters.
    pub writes: WriteCounters,
    /// A partition: writes to its whole disk that went through no partition.
    pub whole_disk_direct: Option<WriteCounters>,
    /// A loop device: its backing file.
    pub backing: Option<FileState>,
}

/// What an origin is and the evidence of its content at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OriginState {
    /// A regular file.
    File(FileState),
    /// A block device.
    Block(BlockState),
}

/// The seal file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    /// Format version.
    pub version: u32,
    /// The origin's path when sealed (for messages only).
    pub origin: String,
    /// When it was sealed (ms since the epoch).
    pub sealed_at_ms: u64,
    /// The origin at the seal.
    pub state: OriginState,
    /// Set when something wrote the origin on purpose since (an offline restore).
    #[serde(default)]
    pub invalidated: Option<String>,
}

/// Where the host's kernel facts are read from (fixtures in tests).
#[derive(Debug, Clone)]
pub struct SysPaths {
    /// `/sys/dev/block`.
    pub dev_block: PathBuf,
    /// `/run/udev/data`.
    pub udev_data: PathBuf,
    /// `/proc/sys/kernel/random/boot_id`.
    pub boot_id: PathBuf,
}

impl SysPaths {
    /// The running system's paths.
    pub fn host() -> SysPaths {
        SysPaths {
            dev_block: PathBuf::from("/sys/dev/block"),
            udev_data: PathBuf::from("/run/udev/data"),
            boot_id: PathBuf::from("/proc/sys/kernel/random/boot_id"),
        }
    }
}

fn read_trim(p: &Path) -> Option<String> {
    let s = std::fs::read_to_string(p).ok()?;
    let t = s.trim();
    (!t.is_empty()).then(|| t.to_string())
}

fn read_counters(dir: &Path) -> Result<WriteCounters> {
    let p = dir.join("stat");
    let s = std::fs::read_to_string(&p).ctx(|| format!("unable to read {}", p.display()))?;
    parse_stat(&s).ok_or_else(|| crate::err!(Corrupt, "unable to parse {}: {s:?}", p.display()))
}

/// Observe a block device `major:minor` through `sys`.
pub fn observe_block(sys: &SysPaths, major: u32, minor: u32) -> Result<BlockState> {
    let link = sys.dev_block.join(format!("{major}:{minor}"));
    let dir =
        std::fs::canonicalize(&link).ctx(|| format!("unable to resolve {}", link.display()))?;
    let writes = read_counters(&dir)?;
    let size = read_trim(&dir.join("size"))
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| crate::err!(Corrupt, "unable to read the size in {}", dir.display()))?
        .saturating_mul(512);
    let boot_id = read_trim(&sys.boot_id)
        .ok_or_else(|| crate::err!(NotFound, "unable to read {}", sys.boot_id.display()))?;
    let mut ids = BTreeMap::new();
    let is_part = dir.join("partition").exists();
    let whole = if is_part {
        dir.parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.clone())
    } else {
        dir.clone()
    };
    let mut whole_disk_direct = None;
    if is_part {
        for k in ["partition", "start"] {
            if let Some(v) = read_trim(&dir.join(k)) {
                ids.insert(format!("part_{k}"), v);
            }
        }
        // The kernel adds partition I/O to the whole disk: what is left went through
        // the whole disk's node directly.
        let mut direct = read_counters(&whole)?;
        let entries =
            std::fs::read_dir(&whole).ctx(|| format!("unable to list {}", whole.display()))?;
        for e in entries {
            let e = e.ctx(|| format!("unable to list {}", whole.display()))?;
            let p = e.path();
            if p.join("partition").exists() {
                direct = direct.minus(read_counters(&p)?);
            }
        }
        whole_disk_direct = Some(direct);
    }
    let diskseq = read_trim(&whole.join("diskseq")).and_then(|s| s.parse::<u64>().ok());
    for (key, rel) in [
        ("wwid", "wwid"),
        ("wwid", "device/wwid"),
        ("serial", "serial"),
        ("serial", "device/serial"),
    ] {
        if !ids.contains_key(key) {
            if let Some(v) = read_trim(&whole.join(rel)) {
                ids.insert(key.to_string(), v);
            }
        }
    }
    for (key, rel) in [("dm_uuid", "dm/uuid"), ("md_uuid", "md/uuid")] {
        if let Some(v) = read_trim(&whole.join(rel)) {
            ids.insert(key.to_string(), v);
        }
    }
    let mut backing = None;
    if let Some(b) = read_trim(&whole.join("loop/backing_file")) {
        for k in ["offset", "sizelimit"] {
            if let Some(v) = read_trim(&whole.join("loop").join(k)) {
                ids.insert(format!("loop_{k}"), v);
            }
        }
        backing = std::fs::metadata(&b).ok().map(|m| FileState::of(&m));
        ids.insert("loop_backing".into(), b);
    }
    if let Ok(s) = std::fs::read_to_string(sys.udev_data.join(format!("b{major}:{minor}"))) {
        for l in s.lines() {
            let Some(kv) = l.strip_prefix("E:") else {
                continue;
            };
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            let key = match k {
                "ID_WWN" => "udev_wwn",
                "ID_SERIAL" => "udev_serial",
                "ID_PART_ENTRY_UUID" => "partuuid",
                _ => continue,
            };
            if !v.trim().is_empty() {
                ids.insert(key.to_string(), v.trim().to_string());
            }
        }
    }
    Ok(BlockState {
        major,
        minor,
        size,
        diskseq,
        ids,
        boot_id,
        writes,
        whole_disk_direct,
        backing,
    })
}

/// Observe the origin at `path` (a regular file or a block device).
pub fn observe(path: &Path) -> Result<OriginState> {
    observe_with(&SysPaths::host(), path)
}

/// [`observe`] with the kernel facts read through `sys`.
pub fn observe_with(sys: &SysPaths, path: &Path) -> Result<OriginState> {
    let m = std::fs::metadata(path).ctx(|| format!("unable to stat {}", path.display()))?;
    if m.is_file() {
        Ok(OriginState::File(FileState::of(&m)))
    } else if m.file_type().is_block_device() {
        let r = m.rdev();
        Ok(OriginState::Block(observe_block(
            sys,
            libc::major(r),
            libc::minor(r),
        )?))
    } else {
        Err(crate::err!(
            Unsupported,
            "unable to identify {}: neither a regular file nor a block device",
            path.display()
        ))
    }
}

fn coarse_now_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, owned `ts`.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    if r != 0 {
        return i64::MIN;
    }
    ns(ts.tv_sec, ts.tv_nsec)
}

/// Whether a later change of a file with these timestamps is sure to get different
/// ones: the coarse clock is past both (by 2 s on filesystems with whole-second
/// timestamps).
fn times_settled(f: &FileState, now_ns: i64) -> bool {
    let t = f.mtime_ns.max(f.ctime_ns);
    let coarse_fs = f.mtime_ns % 1_000_000_000 == 0 && f.ctime_ns % 1_000_000_000 == 0;
    let need = if coarse_fs {
        t.saturating_add(2_000_000_000)
    } else {
        t.saturating_add(1)
    };
    now_ns >= need
}

/// Observe the origin for sealing: like [`observe`], but for a file (or a loop
/// device's backing file) waits, up to 3 s, until its timestamps are settled (see the
/// design notes). Fails when they do not settle (clock stepped back).
pub fn observe_for_seal(path: &Path) -> Result<OriginState> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let st = observe(path)?;
        let file = match &st {
            OriginState::File(f) => Some(f),
            OriginState::Block(b) => b.backing.as_ref(),
        };
        match file {
            Some(f) if !times_settled(f, coarse_now_ns()) => {}
            _ => return Ok(st),
        }
        if Instant::now() >= deadline {
            return Err(crate::err!(
                Busy,
                "unable to seal {}: its timestamps are ahead of the clock",
                path.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn describe_block(b: &BlockState) -> String {
    let mut s = format!("{}:{}", b.major, b.minor);
    if let Some(q) = b.diskseq {
        s.push_str(&format!(" diskseq {q}"));
    }
    for (k, v) in &b.ids {
        s.push_str(&format!(" {k}={v}"));
    }
    s
}

fn compare_file(a: &FileState, b: &FileState, what: &str) -> std::result::Result<(), String> {
    if (a.dev, a.ino) != (b.dev, b.ino) {
        return Err(format!(
            "{what} is another file than the one tracked (device {:#x} inode {}; tracked: device {:#x} inode {})",
            b.dev, b.ino, a.dev, a.ino
        ));
    }
    if a.size != b.size {
        return Err(format!(
            "{what} changed size while detached ({} -> {} bytes)",
            a.size, b.size
        ));
    }
    if a.ctime_ns != b.ctime_ns || a.mtime_ns != b.mtime_ns {
        return Err(format!(
            "{what} was modified while detached (its modification/change time moved)"
        ));
    }
    Ok(())
}

fn compare_block(a: &BlockState, b: &BlockState) -> std::result::Result<(), String> {
    if a.boot_id != b.boot_id {
        return Err(
            "the machine restarted since the disk was detached: the kernel's write counters cannot prove the origin unchanged"
                .into(),
        );
    }
    if (a.major, a.minor) != (b.major, b.minor) || a.diskseq != b.diskseq || a.ids != b.ids {
        return Err(format!(
            "the origin is another block device than the one tracked ({}; tracked: {})",
            describe_block(b),
            describe_block(a)
        ));
    }
    if a.diskseq.is_none() && a.ids.is_empty() {
        return Err(
            "the origin has no stable identity (no disk sequence number, WWID, serial or partition UUID)"
                .into(),
        );
    }
    if a.size != b.size {
        return Err(format!(
            "the origin changed size while detached ({} -> {} bytes)",
            a.size, b.size
        ));
    }
    if a.writes != b.writes {
        return Err(format!(
            "the origin was written while detached (kernel counters: {} -> {} sectors written, {} -> {} discarded)",
            a.writes.write_sectors,
            b.writes.write_sectors,
            a.writes.discard_sectors,
            b.writes.discard_sectors
        ));
    }
    if a.whole_disk_direct != b.whole_disk_direct {
        return Err(
            "the disk holding the origin partition was written directly while detached".into(),
        );
    }
    match (&a.backing, &b.backing) {
        (Some(x), Some(y)) => compare_file(x, y, "the loop device's backing file")?,
        (None, None) if !a.ids.contains_key("loop_backing") => {}
        _ => return Err("the loop device's backing file cannot be examined".into()),
    }
    Ok(())
}

/// Whether `now` proves the origin unchanged since `sealed`; the error says why not.
pub fn compare(sealed: &OriginState, now: &OriginState) -> std::result::Result<(), String> {
    match (sealed, now) {
        (OriginState::File(a), OriginState::File(b)) => compare_file(a, b, "the origin"),
        (OriginState::Block(a), OriginState::Block(b)) => compare_block(a, b),
        (OriginState::File(_), OriginState::Block(_)) => {
            Err("the origin is now a block device; the tracked one was a file".into())
        }
        (OriginState::Block(_), OriginState::File(_)) => {
            Err("the origin is now a file; the tracked one was a block device".into())
        }
    }
}

/// Whether `a` and `b` may be the same origin (identity only, no evidence). Errs on
/// the side of "yes": it decides whose tracking an offline restore resets.
pub fn same_origin(a: &OriginState, b: &OriginState) -> bool {
    match (a, b) {
        (OriginState::File(x), OriginState::File(y)) => (x.dev, x.ino) == (y.dev, y.ino),
        (OriginState::Block(x), OriginState::Block(y)) => {
            (x.major, x.minor) == (y.major, y.minor) || (!x.ids.is_empty() && x.ids == y.ids)
        }
        // A loop device over the file, either way round.
        (OriginState::Block(x), OriginState::File(f))
        | (OriginState::File(f), OriginState::Block(x)) => x
            .backing
            .as_ref()
            .is_some_and(|b| (b.dev, b.ino) == (f.dev, f.ino)),
    }
}

impl Seal {
    /// Check the seal against the origin as it is now; the error says why tracking
    /// cannot be trusted.
    pub fn check(&self, now: &OriginState) -> std::result::Result<(), String> {
        if self.version != SEAL_VERSION {
            return Err(format!("unknown origin seal version {}", self.version));
        }
        if let Some(r) = &self.invalidated {
            return Err(r.clone());
        }
        compare(&self.state, now)
    }
}

/// The seal file of a state directory.
pub fn seal_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SEAL_FILE)
}

/// Read the seal of `state_dir` (`None` when there is none).
pub fn read_seal(state_dir: &Path) -> Result<Option<Seal>> {
    let p = seal_path(state_dir);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| crate::err!(Corrupt, "unable to parse {}: {e}", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(crate::Error::io(
            format!("unable to read {}", p.display()),
            e,
        )),
    }
}

/// Remove the seal of `state_dir` durably (nothing to do when there is none).
pub fn remove_seal(state_dir: &Path) -> Result<()> {
    let p = seal_path(state_dir);
    match std::fs::remove_file(&p) {
        Ok(()) => fsutil::fsync_dir(state_dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(crate::Error::io(
            format!("unable to remove {}", p.display()),
            e,
        )),
    }
}

/// Write the seal of `state_dir` for the origin at `origin` observed as `state`.
pub fn write_seal(state_dir: &Path, origin: &Path, state: OriginState) -> Result<()> {
    let seal = Seal {
        version: SEAL_VERSION,
        origin: origin.display().to_string(),
        sealed_at_ms: fsutil::now_unix_ms(),
        state,
        invalidated: None,
    };
    let json = serde_json::to_vec_pretty(&seal)
        .map_err(|e| crate::err!(InvalidInput, "unable to encode the origin seal: {e}"))?;
    fsutil::write_atomic(&seal_path(state_dir), &json)
}

/// Mark the seal of `state_dir` invalid with `reason` (the origin is about to be
/// written on purpose). Returns whether there was a seal.
pub fn invalidate(state_dir: &Path, reason: &str) -> Result<bool> {
    let Some(mut seal) = read_seal(state_dir).ok().flatten() else {
        // No seal (or an unreadable one): tracking is not trusted at the next start.
        return Ok(false);
    };
    seal.invalidated = Some(reason.to_string());
    let json = serde_json::to_vec_pretty(&seal)
        .map_err(|e| crate::err!(InvalidInput, "unable to encode the origin seal: {e}"))?;
    fsutil::write_atomic(&seal_path(state_dir), &json)?;
    Ok(true)
}

/// The disks (state subdirectories of `state_root`) whose sealed origin may be the
/// same as `target`.
pub fn disks_sealed_on(state_root: &Path, target: &OriginState) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(state_root) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let dir = e.path();
        if let Ok(Some(seal)) = read_seal(&dir) {
            if same_origin(&seal.state, target) {
                out.push(dir);
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const STAT17: &str = "    8082     3325  2973914    30379     3493    21260  8277024    98754        0    17476   137356     4464      145   461648     7423       34      799\n";

    #[test]
    fn stat_lines_parse() {
        let c = parse_stat(STAT17).unwrap();
        assert_eq!(
            c,
            WriteCounters {
                write_ios: 3493,
                write_sectors: 8277024,
                discard_ios: 4464,
                discard_sectors: 461648
            }
        );
        // 15 fields (4.18+ without flush accounting)
        let c15 = parse_stat("1 2 3 4 5 6 7 8 9 10 11 12 13 14 15").unwrap();
        assert_eq!((c15.write_ios, c15.write_sectors), (5, 7));
        assert_eq!((c15.discard_ios, c15.discard_sectors), (12, 14));
        // 11 fields (old kernels): no discard accounting
        let c11 = parse_stat("1 2 3 4 5 6 7 8 9 10 11").unwrap();
        assert_eq!(
            (c11.write_ios, c11.write_sectors, c11.discard_ios),
            (5, 7, 0)
        );
        assert!(parse_stat("1 2 3").is_none());
        assert!(parse_stat("").is_none());
        assert!(parse_stat("1 2 3 4 x 6 7 8 9 10 11").is_none());
        assert!(parse_stat("1 2 3 4 -5 6 7 8 9 10 11").is_none());
    }

    fn stat_line(w_ios: u64, w_sec: u64) -> String {
        format!("10 0 80 1 {w_ios} 0 {w_sec} 3 0 4 5 0 0 0 0 2 1\n")
    }

    /// A fixture sysfs: disk sdx (8:0, diskseq 9, serial S1) with partitions
    /// sdx1 (8:1) and sdx2 (8:2), and udev data giving sdx1 a partition UUID.
    struct Fixture {
        _d: tempfile::TempDir,
        sys: SysPaths,
        disk: PathBuf,
    }

    fn put(p: &Path, s: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, s).unwrap();
    }

    fn fixture() -> Fixture {
        let d = tempfile::tempdir().unwrap();
        let disk = d.path().join("devices/pci0/block/sdx");
        put(&disk.join("stat"), &stat_line(100, 1000));
        put(&disk.join("size"), "2048\n");
        put(&disk.join("diskseq"), "9\n");
        put(&disk.join("device/serial"), "S1\n");
        for (n, w) in [(1, 60u64), (2, 30u64)] {
            let p = disk.join(format!("sdx{n}"));
            put(&p.join("partition"), &format!("{n}\n"));
            put(&p.join("start"), &format!("{}\n", n * 1024));
            put(&p.join("size"), "1024\n");
            put(&p.join("stat"), &stat_line(w, w * 10));
        }
        let db = d.path().join("dev/block");
        std::fs::create_dir_all(&db).unwrap();
        std::os::unix::fs::symlink(&disk, db.join("8:0")).unwrap();
        std::os::unix::fs::symlink(disk.join("sdx1"), db.join("8:1")).unwrap();
        std::os::unix::fs::symlink(disk.join("sdx2"), db.join("8:2")).unwrap();
        put(
            &d.path().join("udev/b8:1"),
            "S:disk/by-partuuid/abcd\nE:ID_PART_ENTRY_UUID=abcd-01\nE:ID_SERIAL=\n",
        );
        put(&d.path().join("boot_id"), "boot-1\n");
        let sys = SysPaths {
            dev_block: db,
            udev_data: d.path().join("udev"),
            boot_id: d.path().join("boot_id"),
        };
        Fixture { _d: d, sys, disk }
    }

    #[test]
    fn block_device_from_sysfs_fixture() {
        let f = fixture();
        let disk = observe_block(&f.sys, 8, 0).unwrap();
        assert_eq!(disk.size, 2048 * 512);
        assert_eq!(disk.diskseq, Some(9));
        assert_eq!(disk.ids.get("serial").map(String::as_str), Some("S1"));
        assert_eq!(disk.writes.write_sectors, 1000);
        assert!(disk.whole_disk_direct.is_none());
        let p1 = observe_block(&f.sys, 8, 1).unwrap();
        assert_eq!(p1.size, 1024 * 512);
        assert_eq!(p1.diskseq, Some(9), "a partition takes its disk's diskseq");
        assert_eq!(p1.ids.get("partuuid").map(String::as_str), Some("abcd-01"));
        assert_eq!(p1.ids.get("part_start").map(String::as_str), Some("1024"));
        assert_eq!(p1.ids.get("serial").map(String::as_str), Some("S1"));
        assert!(
            !p1.ids.contains_key("udev_serial"),
            "empty values are ignored"
        );
        assert_eq!(p1.writes.write_ios, 60);
        // whole disk 100/1000 minus partitions 60/600 and 30/300
        let direct = p1.whole_disk_direct.unwrap();
        assert_eq!((direct.write_ios, direct.write_sectors), (10, 100));
        assert_eq!(p1.boot_id, "boot-1");
        assert!(compare(&OriginState::Block(p1.clone()), &OriginState::Block(p1)).is_ok());
        put(&f.disk.join("stat"), "garbage\n");
        let e = observe_block(&f.sys, 8, 1).unwrap_err().to_string();
        assert!(e.contains("unable to parse"), "{e}");
        assert!(observe_block(&f.sys, 8, 7).is_err());
    }

    #[test]
    fn block_device_seal_comparison() {
        let f = fixture();
        let sealed = OriginState::Block(observe_block(&f.sys, 8, 1).unwrap());
        let check = |f: &Fixture| {
            compare(
                &sealed,
                &OriginState::Block(observe_block(&f.sys, 8, 1).unwrap()),
            )
        };
        assert!(check(&f).is_ok());

        // a write to the sibling partition moves the disk's counters too: still trusted
        put(&f.disk.join("sdx2/stat"), &stat_line(35, 350));
        put(&f.disk.join("stat"), &stat_line(105, 1050));
        assert!(check(&f).is_ok());

        // a write through the whole disk's node: not trusted
        put(&f.disk.join("stat"), &stat_line(106, 1058));
        let e = check(&f).unwrap_err();
        assert!(e.contains("written directly"), "{e}");
        put(&f.disk.join("stat"), &stat_line(105, 1050));

        // a write to the partition itself
        put(&f.disk.join("sdx1/stat"), &stat_line(61, 608));
        put(&f.disk.join("stat"), &stat_line(106, 1058));
        let e = check(&f).unwrap_err();
        assert!(
            e.contains("written while detached") && e.contains("600 -> 608"),
            "{e}"
        );
        put(&f.disk.join("sdx1/stat"), &stat_line(60, 600));
        put(&f.disk.join("stat"), &stat_line(105, 1050));
        assert!(check(&f).is_ok());

        // a discard counts as a change
        put(
            &f.disk.join("sdx1/stat"),
            "10 0 80 1 60 0 600 3 0 4 5 1 0 8 0 2 1\n",
        );
        put(
            &f.disk.join("stat"),
            "10 0 80 1 105 0 1050 3 0 4 5 1 0 8 0 2 1\n",
        );
        assert!(check(&f).unwrap_err().contains("discarded"));
        put(&f.disk.join("sdx1/stat"), &stat_line(60, 600));
        put(&f.disk.join("stat"), &stat_line(105, 1050));

        // another disk at the same major:minor (new diskseq), another partition UUID
        put(&f.disk.join("diskseq"), "10\n");
        assert!(check(&f).unwrap_err().contains("another block device"));
        put(&f.disk.join("diskseq"), "9\n");
        put(
            &f.sys.udev_data.join("b8:1"),
            "E:ID_PART_ENTRY_UUID=ffff-01\n",
        );
        assert!(check(&f).unwrap_err().contains("another block device"));
        put(
            &f.sys.udev_data.join("b8:1"),
            "E:ID_PART_ENTRY_UUID=abcd-01\n",
        );
        assert!(check(&f).is_ok());

        // a reboot: counters prove nothing
        put(&f.sys.boot_id, "boot-2\n");
        assert!(check(&f).unwrap_err().contains("restarted"));
    }

    #[test]
    fn block_device_without_stable_identity_is_never_trusted() {
        let d = tempfile::tempdir().unwrap();
        let dev = d.path().join("devices/virtual/block/vdz");
        put(&dev.join("stat"), &stat_line(1, 8));
        put(&dev.join("size"), "64\n");
        let db = d.path().join("dev/block");
        std::fs::create_dir_all(&db).unwrap();
        std::os::unix::fs::symlink(&dev, db.join("252:0")).unwrap();
        put(&d.path().join("boot_id"), "b\n");
        let sys = SysPaths {
            dev_block: db,
            udev_data: d.path().join("none"),
            boot_id: d.path().join("boot_id"),
        };
        let a = OriginState::Block(observe_block(&sys, 252, 0).unwrap());
        let e = compare(&a, &a.clone()).unwrap_err();
        assert!(e.contains("no stable identity"), "{e}");
    }

    #[test]
    fn loop_device_seals_its_backing_file() {
        let d = tempfile::tempdir().unwrap();
        let backing = d.path().join("backing.img");
        std::fs::write(&backing, vec![0u8; 8192]).unwrap();
        let dev = d.path().join("devices/virtual/block/loop9");
        put(&dev.join("stat"), &stat_line(1, 8));
        put(&dev.join("size"), "16\n");
        put(&dev.join("diskseq"), "44\n");
        put(
            &dev.join("loop/backing_file"),
            &format!("{}\n", backing.display()),
        );
        put(&dev.join("loop/offset"), "0\n");
        let db = d.path().join("dev/block");
        std::fs::create_dir_all(&db).unwrap();
        std::os::unix::fs::symlink(&dev, db.join("7:9")).unwrap();
        put(&d.path().join("boot_id"), "b\n");
        let sys = SysPaths {
            dev_block: db,
            udev_data: d.path().join("none"),
            boot_id: d.path().join("boot_id"),
        };
        let a = OriginState::Block(observe_block(&sys, 7, 9).unwrap());
        let OriginState::Block(ab) = &a else {
            unreachable!()
        };
        assert!(ab.backing.is_some());
        assert_eq!(ab.ids.get("loop_offset").map(String::as_str), Some("0"));
        assert!(compare(&a, &OriginState::Block(observe_block(&sys, 7, 9).unwrap())).is_ok());
        // a write to the backing file, not through the loop device
        std::thread::sleep(Duration::from_millis(20));
        let mut fh = std::fs::OpenOptions::new()
            .write(true)
            .open(&backing)
            .unwrap();
        fh.write_all(b"x").unwrap();
        drop(fh);
        let e = compare(&a, &OriginState::Block(observe_block(&sys, 7, 9).unwrap())).unwrap_err();
        assert!(e.contains("backing file") && e.contains("modified"), "{e}");
        // the loop device and its backing file are one origin for a restore
        assert!(same_origin(&a, &observe(&backing).unwrap()));
        assert!(same_origin(&observe(&backing).unwrap(), &a));
        let unrelated = d.path().join("unrelated.img");
        std::fs::write(&unrelated, b"u").unwrap();
        assert!(!same_origin(&a, &observe(&unrelated).unwrap()));
        std::fs::remove_file(&backing).unwrap();
        let e = compare(&a, &OriginState::Block(observe_block(&sys, 7, 9).unwrap())).unwrap_err();
        assert!(e.contains("cannot be examined"), "{e}");
    }

    #[test]
    fn file_seal_detects_writes_replacement_and_resize() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk.img");
        std::fs::write(&p, vec![1u8; 65536]).unwrap();
        let sealed = observe_for_seal(&p).unwrap();
        let OriginState::File(f) = &sealed else {
            panic!()
        };
        assert!(times_settled(f, coarse_now_ns()));
        assert!(compare(&sealed, &observe(&p).unwrap()).is_ok());
        // a same-size write in place, right after the seal
        let fh = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&fh, b"z", 100).unwrap();
        drop(fh);
        let e = compare(&sealed, &observe(&p).unwrap()).unwrap_err();
        assert!(e.contains("modified while detached"), "{e}");
        // another file of the same size under the same path
        let sealed = observe_for_seal(&p).unwrap();
        let q = d.path().join("other.img");
        std::fs::write(&q, vec![1u8; 65536]).unwrap();
        std::fs::rename(&q, &p).unwrap();
        let e = compare(&sealed, &observe(&p).unwrap()).unwrap_err();
        assert!(e.contains("another file"), "{e}");
        assert!(!same_origin(&sealed, &observe(&p).unwrap()));
        // resized
        let sealed = observe_for_seal(&p).unwrap();
        assert!(same_origin(&sealed, &observe(&p).unwrap()));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(131072)
            .unwrap();
        assert!(compare(&sealed, &observe(&p).unwrap())
            .unwrap_err()
            .contains("changed size"));
        // a file is not a block device
        let b = OriginState::Block(BlockState {
            major: 7,
            minor: 0,
            size: 0,
            diskseq: Some(1),
            ids: BTreeMap::new(),
            boot_id: "b".into(),
            writes: WriteCounters::default(),
            whole_disk_direct: None,
            backing: None,
        });
        assert!(compare(&b, &observe(&p).unwrap()).is_err());
        assert!(compare(&observe(&p).unwrap(), &b).is_err());
    }

    #[test]
    fn timestamps_settle_past_the_clock_tick() {
        let f = FileState {
            dev: 1,
            ino: 2,
            size: 0,
            mtime_ns: 5_000_000_123,
            ctime_ns: 5_000_000_456,
        };
        assert!(!times_settled(&f, 5_000_000_456));
        assert!(times_settled(&f, 5_000_000_457));
        // whole-second timestamps: two seconds later
        let g = FileState {
            mtime_ns: 5_000_000_000,
            ctime_ns: 5_000_000_000,
            ..f
        };
        assert!(!times_settled(&g, 6_999_999_999));
        assert!(times_settled(&g, 7_000_000_000));
    }

    #[test]
    fn seal_file_roundtrip_invalidate_and_lookup() {
        let d = tempfile::tempdir().unwrap();
        let origin = d.path().join("disk.img");
        std::fs::write(&origin, vec![0u8; 4096]).unwrap();
        let a = d.path().join("state/a");
        let b = d.path().join("state/b");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        assert!(read_seal(&a).unwrap().is_none());
        remove_seal(&a).unwrap();
        assert!(!invalidate(&a, "x").unwrap());
        write_seal(&a, &origin, observe_for_seal(&origin).unwrap()).unwrap();
        let other = d.path().join("other.img");
        std::fs::write(&other, vec![0u8; 4096]).unwrap();
        write_seal(&b, &other, observe_for_seal(&other).unwrap()).unwrap();
        let s = read_seal(&a).unwrap().unwrap();
        assert!(s.check(&observe(&origin).unwrap()).is_ok());
        assert!(s.check(&observe(&other).unwrap()).is_err());
        let found = disks_sealed_on(&d.path().join("state"), &observe(&origin).unwrap());
        assert_eq!(found, vec![a.clone()]);
        assert!(invalidate(&a, "an offline restore was written onto the origin").unwrap());
        let s = read_seal(&a).unwrap().unwrap();
        assert_eq!(
            s.check(&observe(&origin).unwrap()).unwrap_err(),
            "an offline restore was written onto the origin"
        );
        remove_seal(&a).unwrap();
        assert!(read_seal(&a).unwrap().is_none());
        std::fs::write(seal_path(&b), b"{not json").unwrap();
        assert!(read_seal(&b).is_err());
        assert!(disks_sealed_on(&d.path().join("state"), &observe(&other).unwrap()).is_empty());
    }
}
