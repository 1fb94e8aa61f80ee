//! `cowsnapctl diff repo:DIR@GEN1 repo:DIR@GEN2 [--files] [--json]`: what changed
//! between two restore points of one disk.
//!
//! Without `--files` only the two indexes are read
//! ([`cowsnap_core::repo::diff`]): the changed byte ranges at repository-chunk
//! granularity, no chunk data. Generations of different disk sizes or chunk sizes are
//! refused; different disk names are compared with a note.
//!
//! With `--files` each generation is mounted read-only the way `cowsnapctl mount` does
//! it, in-process ([`crate::export::mount_quiet`]: export, device, partition, mount
//! without journal replay) on a private directory `RUN_DIR/diff-PID-{a,b}.mnt`, with
//! its own export name `dPID{a,b}-TAIL`. Each tree is walked (no symlinks followed, one
//! filesystem, special files skipped, at most `--max-files` entries, else an error),
//! each regular file's extents are mapped with the FIEMAP ioctl (physical byte offsets
//! on the filesystem's device, plus the partition's start, read from the partition's
//! loop device in sysfs) and intersected with the changed ranges:
//! - a path only in GEN2 is *added*, only in GEN1 *deleted*;
//! - a path in both is *modified* when its size differs, or when its data in the
//!   changed ranges (of either generation) differs when read through the two mounts —
//!   a chunk (1 MiB by default) holds many small files, and those that only share a
//!   changed chunk are not reported (counted as `shared_chunk_files`);
//! - changed bytes no file extent covers are "filesystem metadata or free space".
//!
//! A modified file's changed bytes are its data (in GEN2) lying in changed ranges, so
//! the figure is at chunk granularity, not the bytes rewritten; an added or deleted
//! file's are its size. A
//! generation that cannot be mounted (no filesystem, an unknown one, several
//! partitions) is not an error: the ranges are reported as "unknown" with the reason.
//!
//! Cleanup: a guard undoes each mount in `Drop` (unmount, loop devices, export, record,
//! directory), on success, on error and after SIGINT/SIGTERM/SIGHUP, which only set a
//! flag the walk checks (a second Ctrl-C does not cut the cleanup short); the command
//! then exits 130. After a
//! SIGKILL, `cowsnapctl umount RUN_DIR/diff-PID-a.mnt` undoes what is left (its mount
//! record is written as it goes, as for `mount`).

use crate::export::{self, MountArgs};
use crate::mount_record::{record_path, MountRecord};
use crate::parse::human_bytes;
use crate::Dirs;
use anyhow::{anyhow, bail, Context, Result};
use cowsnap_core::repo::diff::{overlap, subtract, ByteRange, IndexDiff};
use cowsnap_core::repo::{GenerationInfo, Repo};
use cowsnap_nbd::paths;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// The manual's description of `diff`.
pub const LONG_ABOUT: &str = "What changed between two restore points of one disk.\n\n\
    Without --files only the two indexes are read: the changed byte ranges at the \
    repository's chunk granularity (offset, length) and their total; no chunk data is \
    read. Generations of different disk sizes or chunk sizes are refused.\n\n\
    With --files both generations are mounted read-only (as `cowsnapctl mount` does, on \
    RUN_DIR/diff-PID-a.mnt and -b.mnt) for the time of the command, every regular file's \
    extents are mapped (FIEMAP) and intersected with the ranges: files are reported \
    modified (size or data in the changed ranges differs), added or deleted, sorted by \
    path, with their changed bytes; changed bytes no file holds are filesystem metadata \
    or free space. A generation that cannot be mounted (no filesystem, several \
    partitions without --partition) leaves the ranges reported as unknown, with the \
    reason; that is not an error. The mounts are undone at the end, on errors and on \
    Ctrl-C; after a kill, `cowsnapctl umount RUN_DIR/diff-PID-a.mnt` undoes them.";

/// Arguments of `diff`.
#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    /// The older restore point: repo:DIR@GEN (an id, a unique prefix or a disk name).
    pub from: String,
    /// The newer restore point: repo:DIR@GEN, in the same repository.
    pub to: String,
    /// Also name the files the changed ranges belong to (ext4, XFS, ...): mounts both
    /// generations read-only for the time of the command.
    #[arg(long)]
    pub files: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// With --files: how to expose the generations (kernel nbd, the daemon's
    /// FUSE file + loop, or nbdfuse + loop).
    #[arg(long, default_value = "auto", value_parser = ["auto", "ublk", "nbd", "fuse", "nbdfuse"])]
    pub via: String,
    /// With --files: the partition holding the filesystem (default: the whole device if
    /// it holds a filesystem, else its only partition).
    #[arg(long, value_name = "N")]
    pub partition: Option<u32>,
    /// With --files: refuse to walk a filesystem with more entries than this.
    #[arg(long, value_name = "N", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub max_files: u64,
}

/// One side of the comparison, as reported.
#[derive(Debug, Serialize)]
struct Side {
    id: String,
    disk: String,
    created: String,
}

impl Side {
    fn of(g: &GenerationInfo) -> Side {
        Side {
            id: g.id.clone(),
            disk: g.disk.clone(),
            created: g.created.clone(),
        }
    }
}

#[derive(Debug, Serialize)]
struct JsonRange {
    offset: u64,
    length: u64,
}

fn json_ranges(r: &[ByteRange]) -> Vec<JsonRange> {
    r.iter()
        .map(|r| JsonRange {
            offset: r.offset,
            length: r.len,
        })
        .collect()
}

/// A changed file.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FileChange {
    /// Path inside the filesystem, from its root ("/a/b").
    pub path: String,
    /// "modified", "added" or "deleted".
    pub status: &'static str,
    /// Modified: bytes of its data (in GEN2) lying in changed ranges; added or
    /// deleted: its size.
    pub changed_bytes: u64,
}

#[derive(Debug, Serialize)]
struct FsSide {
    fstype: Option<String>,
    partition: Option<u32>,
    /// Why the files of this generation are unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    unknown: Option<String>,
}

#[derive(Debug, Serialize)]
struct FilesReport {
    /// false when a generation could not be mounted: then files are not listed.
    known: bool,
    from_fs: FsSide,
    to_fs: FsSide,
    files: Vec<FileChange>,
    /// Files present in both whose data only shares a changed chunk (same content).
    shared_chunk_files: u64,
    /// Changed ranges no file extent covers: filesystem metadata or free space.
    metadata_or_free: Vec<JsonRange>,
    metadata_or_free_bytes: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    from: Side,
    to: Side,
    chunk_size: u32,
    disk_size: u64,
    chunks: u64,
    changed_chunks: u64,
    changed_bytes: u64,
    ranges: Vec<JsonRange>,
    notes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    files: Option<FilesReport>,
}

/// `repo:DIR@GEN` → the repository directory (absolute) and the generation spec.
fn parse_side(spec: &str) -> Result<(PathBuf, String)> {
    let (dir, gen) = paths::parse_repo_spec(spec)?;
    let gen =
        gen.ok_or_else(|| anyhow!("invalid restore point {spec:?}: expected repo:DIR@GEN"))?;
    let abs = std::fs::canonicalize(&dir)
        .with_context(|| format!("unable to open repository {}", dir.display()))?;
    Ok((abs, gen))
}

/// `cowsnapctl diff`.
pub fn run(dirs: &Dirs, a: DiffArgs) -> Result<i32> {
    let (d1, s1) = parse_side(&a.from)?;
    let (d2, s2) = parse_side(&a.to)?;
    if d1 != d2 {
        bail!(
            "unable to compare {} and {}: both restore points must be in one repository",
            a.from,
            a.to
        );
    }
    if a.partition == Some(0) {
        bail!("invalid --partition 0: partitions are numbered from 1");
    }
    if !a.files && (a.partition.is_some() || a.via != "auto") {
        bail!("--partition and --via only apply with --files");
    }
    let repo = Repo::open(&d1)?;
    let g1 = repo.resolve(Some(&s1))?;
    let g2 = repo.resolve(Some(&s2))?;
    let mut notes = Vec::new();
    if g1.disk != g2.disk {
        notes.push(format!(
            "the generations are of different disks ({} and {}); compared byte for byte",
            g1.disk, g2.disk
        ));
    }
    if g1.created_unix > g2.created_unix {
        notes.push(format!(
            "{} is older than {}: added and deleted are seen from the first to the second",
            g2.id, g1.id
        ));
    }
    let d = repo
        .diff(&g1, &g2)
        .with_context(|| format!("unable to compare {} and {}", g1.id, g2.id))?;
    let files = if a.files {
        match files_report(dirs, &a, &d1, &g1, &g2, &d) {
            Ok(f) => Some(f),
            // the mounts' guards ran when files_report returned
            Err(_) if INTERRUPTED.load(Ordering::SeqCst) => {
                eprintln!("cowsnapctl: diff interrupted; its mounts are undone");
                return Ok(130);
            }
            Err(e) => return Err(e),
        }
    } else {
        None
    };
    let rep = Report {
        from: Side::of(&g1),
        to: Side::of(&g2),
        chunk_size: d.chunk_size,
        disk_size: d.disk_size,
        chunks: d.chunks,
        changed_chunks: d.changed_chunks,
        changed_bytes: d.changed_bytes,
        ranges: json_ranges(&d.ranges),
        notes,
        files,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        print_human(&rep);
    }
    Ok(0)
}

fn print_human(r: &Report) {
    println!(
        "from {} ({}, {}) to {} ({}, {})",
        r.from.id, r.from.disk, r.from.created, r.to.id, r.to.disk, r.to.created
    );
    for n in &r.notes {
        println!("note: {n}");
    }
    let unknown_note = r.files.as_ref().filter(|f| !f.known).map(|f| {
        [&f.from_fs, &f.to_fs]
            .iter()
            .filter_map(|s| s.unknown.clone())
            .collect::<Vec<_>>()
            .join("; ")
    });
    match &r.files {
        Some(f) if f.known => {
            println!("{:<9} {:>12}  PATH", "STATUS", "CHANGED");
            for c in &f.files {
                println!(
                    "{:<9} {:>12}  {}",
                    c.status,
                    human_bytes(c.changed_bytes),
                    c.path
                );
            }
            println!(
                "{} files changed; filesystem metadata or free space: {} in {} ranges",
                f.files.len(),
                human_bytes(f.metadata_or_free_bytes),
                f.metadata_or_free.len()
            );
            if f.shared_chunk_files > 0 {
                println!(
                    "{} unchanged files share changed chunks (their content is the same)",
                    f.shared_chunk_files
                );
            }
        }
        _ => {
            println!(
                "{:>16} {:>14} {:>10} {:>10}{}",
                "OFFSET",
                "LENGTH",
                "AT",
                "SIZE",
                if unknown_note.is_some() {
                    "  FILES"
                } else {
                    ""
                }
            );
            for x in &r.ranges {
                println!(
                    "{:>16} {:>14} {:>10} {:>10}{}",
                    x.offset,
                    x.length,
                    human_bytes(x.offset),
                    human_bytes(x.length),
                    if unknown_note.is_some() {
                        "  unknown"
                    } else {
                        ""
                    }
                );
            }
            if let Some(n) = &unknown_note {
                println!("files unknown: {n}");
            }
        }
    }
    println!(
        "total: {} in {} ranges ({} of {} chunks of {}) of a {} disk",
        human_bytes(r.changed_bytes),
        r.ranges.len(),
        r.changed_chunks,
        r.chunks,
        human_bytes(u64::from(r.chunk_size)),
        human_bytes(r.disk_size)
    );
}

// ---- signals ----

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT, SIGTERM and SIGHUP only set [`INTERRUPTED`] from here on, so the mounts'
/// guards run; children (mount, losetup) reset the handler on exec.
fn catch_signals() -> Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let act = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; no
        // other handler of these signals is installed by this process.
        unsafe { sigaction(s, &act) }.context("unable to install a signal handler")?;
    }
    Ok(())
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

// ---- mounts ----

/// A generation mounted for the walk; dropping it undoes the mount.
struct Mounted<'a> {
    dirs: &'a Dirs,
    rec: Option<MountRecord>,
    dir: PathBuf,
    /// Byte offset of the filesystem on the disk (its partition's start).
    base: u64,
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        if let Some(mr) = self.rec.take() {
            if let Err(e) = export::undo(self.dirs, &mr, &record_path(self.dirs, &mr.name)) {
                eprintln!(
                    "cowsnapctl: unable to undo the mount on {}: {e:#}; run: cowsnapctl umount {}",
                    mr.mountpoint, mr.mountpoint
                );
                return;
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The start offset of a loop device (sysfs), 0 when it has none.
fn loop_offset(dev: &str) -> Result<u64> {
    let name = Path::new(dev)
        .file_name()
        .ok_or_else(|| anyhow!("unable to read the offset of {dev}: not a device path"))?;
    let p = Path::new("/sys/block").join(name).join("loop/offset");
    let s = std::fs::read_to_string(&p)
        .with_context(|| format!("unable to read the offset of {dev} ({})", p.display()))?;
    s.trim()
        .parse()
        .with_context(|| format!("unable to read the offset of {dev}: {s:?}"))
}

/// Mount generation `g` on `RUN_DIR/diff-PID-TAG.mnt`. `Err` means it could not be
/// mounted (reported as unknown); `undo` already ran for what was set up.
fn mount_gen<'a>(
    dirs: &'a Dirs,
    a: &DiffArgs,
    dir: &Path,
    g: &GenerationInfo,
    tag: char,
) -> Result<Mounted<'a>> {
    let pid = std::process::id();
    let mp = dirs.run_dir.join(format!("diff-{pid}-{tag}.mnt"));
    std::fs::create_dir_all(&dirs.run_dir)
        .with_context(|| format!("unable to create {}", dirs.run_dir.display()))?;
    std::fs::create_dir(&mp).with_context(|| format!("unable to create {}", mp.display()))?;
    let mut m = Mounted {
        dirs,
        rec: None,
        dir: mp.clone(),
        base: 0,
    };
    let tail = g.id.rsplit('-').next().unwrap_or("");
    let args = MountArgs {
        source: format!("repo:{}@{}", dir.display(), g.id),
        mountpoint: mp,
        partition: a.partition,
        name: Some(format!("d{pid}{tag}-{tail}")),
        via: a.via.clone(),
        cache_size: None,
    };
    let rec = export::mount_quiet(dirs, &args)?;
    let part_loop = rec.part_loop.clone();
    m.rec = Some(rec);
    if let Some(lo) = part_loop {
        m.base = loop_offset(&lo)?;
    }
    Ok(m)
}

// ---- FIEMAP ----

/// `struct fiemap` of linux/fiemap.h, without its extents.
#[repr(C)]
#[derive(Default)]
struct FiemapHeader {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
}

/// `struct fiemap_extent`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

const _: () = assert!(std::mem::size_of::<FiemapHeader>() == 32);
const _: () = assert!(std::mem::size_of::<FiemapExtent>() == 56);

const FIEMAP_EXTENTS: usize = 256;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_UNKNOWN: u32 = 0x2;

#[repr(C)]
struct FiemapBuf {
    hdr: FiemapHeader,
    ext: [FiemapExtent; FIEMAP_EXTENTS],
}

nix::ioctl_readwrite!(fs_ioc_fiemap, b'f', 11, FiemapHeader);

/// One extent of a file: `len` bytes at `logical` in the file, `physical` on the device.
#[derive(Debug, Clone, Copy)]
struct Extent {
    logical: u64,
    physical: u64,
    len: u64,
}

/// Every extent of `f` with a known location, in file order.
fn extents(f: &File, mut each: impl FnMut(Extent)) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut buf = Box::new(FiemapBuf {
        hdr: FiemapHeader::default(),
        ext: [FiemapExtent::default(); FIEMAP_EXTENTS],
    });
    let mut start = 0u64;
    loop {
        buf.hdr = FiemapHeader {
            fm_start: start,
            fm_length: u64::MAX - start,
            fm_extent_count: FIEMAP_EXTENTS as u32,
            ..Default::default()
        };
        // SAFETY: `buf` is a `struct fiemap` followed by room for `fm_extent_count`
        // extents, as the ioctl requires; the kernel writes at most that many, and the
        // fd is open for the call's duration.
        unsafe { fs_ioc_fiemap(f.as_raw_fd(), &mut buf.hdr) }.map_err(std::io::Error::from)?;
        let n = (buf.hdr.fm_mapped_extents as usize).min(FIEMAP_EXTENTS);
        if n == 0 {
            return Ok(());
        }
        for e in &buf.ext[..n] {
            if e.fe_flags & FIEMAP_EXTENT_UNKNOWN == 0 {
                each(Extent {
                    logical: e.fe_logical,
                    physical: e.fe_physical,
                    len: e.fe_length,
                });
            }
        }
        let last = buf.ext[n - 1];
        let next = last.fe_logical.saturating_add(last.fe_length);
        if last.fe_flags & FIEMAP_EXTENT_LAST != 0 || next <= start {
            return Ok(());
        }
        start = next;
    }
}

// ---- walk ----

/// A regular file of one tree.
#[derive(Debug, Default)]
struct FileMap {
    size: u64,
    /// Bytes of its extents in changed ranges.
    changed: u64,
    /// Logical ranges of the file whose data lies in changed ranges.
    logical: Vec<ByteRange>,
}

/// Every regular file under `m` (relative path → map), and the disk ranges file
/// extents cover within the changed ranges (appended to `covered`).
fn walk(
    m: &Mounted,
    ranges: &[ByteRange],
    max: u64,
    covered: &mut Vec<ByteRange>,
) -> Result<HashMap<String, FileMap>> {
    let root = &m.dir;
    let dev = std::fs::symlink_metadata(root)
        .with_context(|| format!("unable to read {}", root.display()))?
        .dev();
    let mut out = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    let mut seen = 0u64;
    let mut pieces = Vec::new();
    while let Some(rel) = stack.pop() {
        let d = root.join(&rel);
        let rd =
            std::fs::read_dir(&d).with_context(|| format!("unable to list {}", d.display()))?;
        for e in rd {
            check_interrupted()?;
            let e = e.with_context(|| format!("unable to list {}", d.display()))?;
            seen += 1;
            if seen > max {
                bail!(
                    "unable to map the files: the filesystem has more than {max} entries (raise --max-files)"
                );
            }
            let p = e.path();
            let md = std::fs::symlink_metadata(&p)
                .with_context(|| format!("unable to read {}", p.display()))?;
            if md.dev() != dev {
                continue;
            }
            let r = rel.join(e.file_name());
            let ft = md.file_type();
            if ft.is_dir() {
                stack.push(r);
                continue;
            }
            if !ft.is_file() {
                continue;
            }
            let f = File::open(&p).with_context(|| format!("unable to open {}", p.display()))?;
            let mut fm = FileMap {
                size: md.len(),
                ..Default::default()
            };
            extents(&f, |x| {
                let Some(phys) = x.physical.checked_add(m.base) else {
                    return;
                };
                pieces.clear();
                let n = overlap(ranges, phys, x.len, &mut pieces);
                if n == 0 {
                    return;
                }
                fm.changed += n;
                for pc in &pieces {
                    fm.logical.push(ByteRange {
                        offset: x.logical + (pc.offset - phys),
                        len: pc.len,
                    });
                }
                covered.extend_from_slice(&pieces);
            })
            .with_context(|| format!("unable to map the extents of {}", p.display()))?;
            out.insert(format!("/{}", r.to_string_lossy()), fm);
        }
    }
    Ok(out)
}

/// Whether `a` and `b` hold different bytes in any of `ranges` (file offsets).
fn differ(a: &Path, b: &Path, ranges: &[ByteRange]) -> Result<bool> {
    let open = |p: &Path| File::open(p).with_context(|| format!("unable to open {}", p.display()));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    for r in ranges {
        let mut pos = r.offset;
        let end = r.end();
        while pos < end {
            check_interrupted()?;
            let n = ((end - pos).min(ba.len() as u64)) as usize;
            let ra = read_at(&mut fa, pos, &mut ba[..n])
                .with_context(|| format!("unable to read {}", a.display()))?;
            let rb = read_at(&mut fb, pos, &mut bb[..n])
                .with_context(|| format!("unable to read {}", b.display()))?;
            if ra != rb || ba[..ra] != bb[..rb] {
                return Ok(true);
            }
            if ra < n {
                break;
            }
            pos += n as u64;
        }
    }
    Ok(false)
}

/// Read up to `buf.len()` bytes at `pos` (fewer at the end of the file).
fn read_at(f: &mut File, pos: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    f.seek(SeekFrom::Start(pos))?;
    let mut got = 0;
    while got < buf.len() {
        let n = f.read(&mut buf[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// Classify the files of the two walks (pure but for the content check `differ`).
fn classify(
    old: &HashMap<String, FileMap>,
    new: &HashMap<String, FileMap>,
    mut differ: impl FnMut(&str, &[ByteRange]) -> Result<bool>,
) -> Result<(Vec<FileChange>, u64)> {
    let mut out = BTreeMap::new();
    let mut shared = 0u64;
    for (p, n) in new {
        match old.get(p) {
            None => {
                out.insert(p.clone(), ("added", n.size));
            }
            Some(o) => {
                if n.changed == 0 && o.changed == 0 && n.size == o.size {
                    continue;
                }
                let mut both: Vec<ByteRange> =
                    n.logical.iter().chain(&o.logical).copied().collect();
                both.sort_unstable();
                if n.size != o.size || differ(p, &both)? {
                    out.insert(p.clone(), ("modified", n.changed));
                } else {
                    shared += 1;
                }
            }
        }
    }
    for (p, o) in old {
        if !new.contains_key(p) {
            out.insert(p.clone(), ("deleted", o.size));
        }
    }
    let files = out
        .into_iter()
        .map(|(path, (status, changed_bytes))| FileChange {
            path,
            status,
            changed_bytes,
        })
        .collect();
    Ok((files, shared))
}

fn fs_side(m: &std::result::Result<Mounted, anyhow::Error>) -> FsSide {
    match m {
        Ok(m) => FsSide {
            fstype: m.rec.as_ref().and_then(|r| r.fstype.clone()),
            partition: m.rec.as_ref().and_then(|r| r.partition),
            unknown: None,
        },
        Err(e) => FsSide {
            fstype: None,
            partition: None,
            unknown: Some(format!("{e:#}")),
        },
    }
}

fn files_report(
    dirs: &Dirs,
    a: &DiffArgs,
    dir: &Path,
    g1: &GenerationInfo,
    g2: &GenerationInfo,
    d: &IndexDiff,
) -> Result<FilesReport> {
    let empty = |why: Option<String>| FilesReport {
        known: why.is_none(),
        from_fs: FsSide {
            fstype: None,
            partition: None,
            unknown: why.clone(),
        },
        to_fs: FsSide {
            fstype: None,
            partition: None,
            unknown: why,
        },
        files: Vec::new(),
        shared_chunk_files: 0,
        metadata_or_free: Vec::new(),
        metadata_or_free_bytes: 0,
    };
    if d.ranges.is_empty() {
        return Ok(empty(None));
    }
    catch_signals()?;
    let m1 = mount_gen(dirs, a, dir, g1, 'a');
    check_interrupted()?;
    let m2 = mount_gen(dirs, a, dir, g2, 'b');
    check_interrupted()?;
    let (from_fs, to_fs) = (fs_side(&m1), fs_side(&m2));
    let (Ok(m1), Ok(m2)) = (&m1, &m2) else {
        return Ok(FilesReport {
            known: false,
            from_fs,
            to_fs,
            ..empty(None)
        });
    };
    let mut covered = Vec::new();
    let old = walk(m1, &d.ranges, a.max_files, &mut covered)
        .with_context(|| format!("unable to map the files of {}", g1.id))?;
    let new = walk(m2, &d.ranges, a.max_files, &mut covered)
        .with_context(|| format!("unable to map the files of {}", g2.id))?;
    let (files, shared) = classify(&old, &new, |p, r| {
        let rel = p.trim_start_matches('/');
        differ(&m1.dir.join(rel), &m2.dir.join(rel), r)
    })?;
    let rest = subtract(&d.ranges, &mut covered);
    Ok(FilesReport {
        known: true,
        from_fs,
        to_fs,
        files,
        shared_chunk_files: shared,
        metadata_or_free_bytes: rest.iter().map(|r| r.len).sum(),
        metadata_or_free: json_ranges(&rest),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fm(size: u64, logical: &[(u64, u64)]) -> FileMap {
        let logical: Vec<ByteRange> = logical
            .iter()
            .map(|&(offset, len)| ByteRange { offset, len })
            .collect();
        FileMap {
            size,
            changed: logical.iter().map(|r| r.len).sum(),
            logical,
        }
    }

    #[test]
    fn classify_names_added_deleted_modified() {
        let old: HashMap<String, FileMap> = [
            ("/a".to_string(), fm(10, &[(0, 10)])),
            ("/c".to_string(), fm(5, &[])),
            ("/d".to_string(), fm(7, &[])),
            ("/s".to_string(), fm(7, &[(0, 7)])),
            ("/t".to_string(), fm(8, &[])),
        ]
        .into_iter()
        .collect();
        let new: HashMap<String, FileMap> = [
            ("/a".to_string(), fm(10, &[(0, 10)])),
            ("/b".to_string(), fm(3, &[(0, 3)])),
            ("/d".to_string(), fm(7, &[])),
            ("/s".to_string(), fm(7, &[(0, 7)])),
            ("/t".to_string(), fm(9, &[])),
        ]
        .into_iter()
        .collect();
        let mut asked = Vec::new();
        let (files, shared) = classify(&old, &new, |p, _| {
            asked.push(p.to_string());
            Ok(p == "/a")
        })
        .unwrap();
        let got: Vec<(&str, &str, u64)> = files
            .iter()
            .map(|f| (f.path.as_str(), f.status, f.changed_bytes))
            .collect();
        assert_eq!(
            got,
            vec![
                ("/a", "modified", 10),
                ("/b", "added", 3),
                ("/c", "deleted", 5),
                ("/t", "modified", 0)
            ]
        );
        assert_eq!(shared, 1, "/s shares a changed chunk, same content");
        asked.sort();
        assert_eq!(
            asked,
            vec!["/a", "/s"],
            "only files with changed data are read"
        );
    }

    #[test]
    fn differ_compares_only_the_ranges() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        let mut x = vec![7u8; 3 << 20];
        std::fs::write(&a, &x).unwrap();
        x[(2 << 20) + 5] = 8;
        std::fs::write(&b, &x).unwrap();
        let r = |offset, len| ByteRange { offset, len };
        assert!(!differ(&a, &b, &[r(0, 2 << 20)]).unwrap());
        assert!(differ(&a, &b, &[r(0, 1), r((2 << 20) + 5, 1)]).unwrap());
        assert!(differ(&a, &b, &[r(0, u64::MAX / 2)]).unwrap());
    }

    #[test]
    fn fiemap_maps_a_written_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, vec![1u8; 256 << 10]).unwrap();
        let f = File::open(&p).unwrap();
        f.sync_all().unwrap();
        let mut total = 0;
        match extents(&f, |e| total += e.len) {
            Ok(()) => assert!(total >= 256 << 10, "{total}"),
            // tmpfs and some overlay filesystems have no FIEMAP
            Err(e) => assert!(
                matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY)
                ),
                "{e}"
            ),
        }
    }
}
