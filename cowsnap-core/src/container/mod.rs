//! Containers: fixed-capacity slot stores for the originals of chunks written while a
//! snapshot is active.
//!
//! Design notes
//! - A container stores whole chunks in numbered slots (`SlotIdx`); it does not
//!   allocate them. Slot allocation, usage, the high-water mark and the waiting of
//!   writers when it is full live in [`SlotPool`] (`pool.rs`), so every backend shares one
//!   implementation of that logic and a new backend only moves bytes.
//! - Specs: `ram:SIZE` ([`ram::RamContainer`], memory allocated per slot on first use),
//!   `file:PATH:SIZE` ([`file::FileContainer`], created new and preallocated with
//!   fallocate, removed when the backup ends), `dev:PATH` (the same file container
//!   on an existing block device or file, opened exclusively, never removed).
//!   SIZE accepts K/M/G/T suffixes (binary multiples). Capacity in slots is
//!   `SIZE / chunk_size`; at least one slot is required.
//! - [`check`] validates a spec against what the machine has before anything is
//!   created, and [`open`] runs it first: `ram:` must fit in MemAvailable, `file:` in
//!   the free space of its filesystem (and must not exist yet), `dev:` must exist and
//!   hold one slot. Every kind also needs memory for its slot bookkeeping (a preserved
//!   map entry and a table entry per slot, [`SLOT_BOOKKEEPING`] bytes each), which
//!   must fit in MemAvailable too. So a too-large spec is one error, never an
//!   allocation failure that ends the daemon.
//! - The default container when neither the backup nor the disk names one is
//!   [`DEFAULT_CONTAINER`] (`ram:64M`: 1024 slots of 64 KiB).
//! - Every backend runs the `conformance::run` checks in its tests.

pub mod file;
mod pool;
pub mod ram;

pub use pool::SlotPool;

use crate::error::Result;
use std::fmt;

/// Container spec used when neither the backup nor the disk names one.
pub const DEFAULT_CONTAINER: &str = "ram:64M";

/// Index of a slot in a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotIdx(pub u64);

impl SlotIdx {
    /// Byte offset of this slot for a slot size, checked (a container never exceeds
    /// u64 bytes, so overflow means a corrupt index).
    pub fn byte_offset(self, slot_size: u32) -> Option<u64> {
        self.0.checked_mul(u64::from(slot_size))
    }
}

impl fmt::Display for SlotIdx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "slot {}", self.0)
    }
}

/// A fixed-capacity slot store.
pub trait Container: Send + Sync {
    /// Bytes per slot (the tracking chunk size).
    fn slot_size(&self) -> u32;
    /// Capacity in slots.
    fn slots(&self) -> u64;
    /// Store `data` (at most `slot_size` bytes) in `slot`.
    fn write_slot(&self, slot: SlotIdx, data: &[u8]) -> Result<()>;
    /// Fill `buf` (at most `slot_size` bytes) from `slot`.
    fn read_slot(&self, slot: SlotIdx, buf: &mut [u8]) -> Result<()>;
    /// Human description for status output (`ram:64M`, `file:/x:1G`).
    fn describe(&self) -> String;
}

/// Parse a size: a number with an optional binary suffix K, M, G, T or P (also `KB`,
/// `KiB`, ..., any case); a bare number (or `B`) is bytes. `64M` = 64 MiB, `1P` = 1 PiB.
/// The one size parser of the project (the command line uses it too).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(crate::err!(
            InvalidInput,
            "invalid size {s:?}: expected a number with an optional K, M, G, T or P suffix"
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| crate::err!(InvalidInput, "invalid size {s:?}: number too large"))?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        other => {
            return Err(crate::err!(
                InvalidInput,
                "invalid size {s:?}: unknown unit {other:?} (use K, M, G, T or P)"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| crate::err!(InvalidInput, "invalid size {s:?}: too large"))
}

/// Memory the engine needs per container slot whatever the container's kind: an entry
/// of the preserved map (chunk → slot), of the free-slot list and, for `ram:`, of the
/// slot table. A generous round figure; [`check`] requires `slots ×` this to fit in
/// MemAvailable.
pub const SLOT_BOOKKEEPING: u64 = 96;

/// A parsed container spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    /// `ram:SIZE`
    Ram {
        /// Bytes.
        size: u64,
    },
    /// `file:PATH:SIZE`
    File {
        /// The file to create.
        path: std::path::PathBuf,
        /// Bytes.
        size: u64,
    },
    /// `dev:PATH`
    Dev {
        /// The device (or existing file).
        path: std::path::PathBuf,
    },
}

/// Parse `ram:SIZE`, `file:PATH:SIZE` or `dev:PATH` (syntax only).
pub fn parse_spec(spec: &str) -> Result<Spec> {
    let bad = |why: &str| {
        crate::err!(
            InvalidInput,
            "unable to use container {spec:?}: {why} (expected ram:SIZE, file:PATH:SIZE or dev:PATH)"
        )
    };
    let (kind, rest) = spec.split_once(':').ok_or_else(|| bad("no kind"))?;
    let size_of = |s: &str| {
        parse_size(s).map_err(|e| {
            crate::err!(
                InvalidInput,
                "unable to use container {spec:?}: {}",
                e.context()
            )
        })
    };
    match kind {
        "ram" => Ok(Spec::Ram {
            size: size_of(rest)?,
        }),
        "file" => {
            let (path, size) = rest.rsplit_once(':').ok_or_else(|| bad("no size"))?;
            if path.is_empty() {
                return Err(bad("empty path"));
            }
            Ok(Spec::File {
                path: path.into(),
                size: size_of(size)?,
            })
        }
        "dev" => {
            if rest.is_empty() {
                return Err(bad("empty path"));
            }
            Ok(Spec::Dev { path: rest.into() })
        }
        _ => Err(bad("unknown kind")),
    }
}

/// Bytes of memory available for new allocations (MemAvailable), if known.
pub fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

use crate::bytes::human;

/// Size of an existing block device or regular file.
fn size_of_path(path: &std::path::Path) -> std::io::Result<u64> {
    use std::io::Seek;
    let mut f = std::fs::File::open(path)?;
    f.seek(std::io::SeekFrom::End(0))
}

/// Free bytes on the filesystem holding `dir` (f_bavail: the blocks reserved for root
/// are left to the system).
fn free_space(dir: &std::path::Path) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// Check a container spec for slots of `chunk_size` bytes against what the machine has,
/// creating and opening nothing: the size holds at least one slot, `ram:` fits in
/// MemAvailable, `file:` does not exist yet and fits in its filesystem's free space,
/// `dev:` exists, and the slot bookkeeping fits in MemAvailable. Returns the capacity
/// in slots.
pub fn check(spec: &str, chunk_size: u32) -> Result<u64> {
    check_inner(spec, chunk_size, true)
}

/// [`check`] for a disk's default container at attach: the same, except that a
/// `file:` container left behind by a crashed daemon does not stop the disk from being
/// attached again (the backup that would create it says so).
pub fn check_default(spec: &str, chunk_size: u32) -> Result<u64> {
    check_inner(spec, chunk_size, false)
}

fn check_inner(spec: &str, chunk_size: u32, fresh: bool) -> Result<u64> {
    let parsed = parse_spec(spec)?;
    let cs = u64::from(chunk_size.max(1));
    let fail = |why: String| crate::err!(InvalidInput, "unable to use container {spec}: {why}");
    let size = match &parsed {
        Spec::Ram { size } | Spec::File { size, .. } => *size,
        Spec::Dev { path } => {
            let m = std::fs::metadata(path).map_err(|e| {
                crate::error::Error::io(format!("unable to use container {spec}"), e)
            })?;
            use std::os::unix::fs::FileTypeExt;
            if !(m.file_type().is_block_device() || m.is_file()) {
                return Err(fail("not a block device or a regular file".into()));
            }
            size_of_path(path).map_err(|e| {
                crate::error::Error::io(format!("unable to use container {spec}"), e)
            })?
        }
    };
    let slots = size / cs;
    if slots == 0 {
        return Err(fail(format!(
            "{} is smaller than one {}-byte slot (the chunk size)",
            human(size),
            chunk_size
        )));
    }
    let avail = mem_available();
    let bookkeeping = slots.saturating_mul(SLOT_BOOKKEEPING);
    match &parsed {
        Spec::Ram { .. } => {
            if let Some(a) = avail {
                let need = size.saturating_add(bookkeeping);
                if need > a {
                    return Err(fail(format!(
                        "{} (with {} of slot bookkeeping) is more than the {} of memory available (MemAvailable)",
                        human(size),
                        human(bookkeeping),
                        human(a)
                    )));
                }
            }
        }
        Spec::File { path, .. } => {
            if fresh && std::fs::symlink_metadata(path).is_ok() {
                return Err(fail(format!(
                    "{} already exists (a file container is created new)",
                    path.display()
                )));
            }
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => std::path::PathBuf::from("."),
            };
            if !dir.is_dir() {
                return Err(fail(format!("{} is not a directory", dir.display())));
            }
            let free = free_space(&dir).map_err(|e| {
                crate::error::Error::io(format!("unable to use container {spec}"), e)
            })?;
            let len = slots * cs;
            if len > free {
                return Err(fail(format!(
                    "{} is more than the {} free on the filesystem of {}",
                    human(len),
                    human(free),
                    dir.display()
                )));
            }
        }
        Spec::Dev { .. } => {}
    }
    if !matches!(parsed, Spec::Ram { .. }) {
        if let Some(a) = avail {
            if bookkeeping > a {
                return Err(fail(format!(
                    "{slots} slots need {} of memory for their bookkeeping, more than the {} available (use a larger chunk size or a smaller container)",
                    human(bookkeeping),
                    human(a)
                )));
            }
        }
    }
    Ok(slots)
}

/// The container of a backup or snapshot: `spec`, else the disk's default, else
/// [`DEFAULT_CONTAINER`], opened for `chunk_size`-byte chunks ([`check_slot_size`]).
pub fn open_for_disk(
    spec: Option<&str>,
    disk_default: Option<&str>,
    chunk_size: u32,
) -> Result<Box<dyn Container>> {
    let c = open(
        spec.or(disk_default).unwrap_or(DEFAULT_CONTAINER),
        chunk_size,
    )?;
    check_slot_size(&*c, chunk_size)?;
    Ok(c)
}

/// A container whose slots are not exactly one chunk cannot hold a chunk's original.
pub fn check_slot_size(c: &dyn Container, chunk_size: u32) -> Result<()> {
    if c.slot_size() != chunk_size {
        return Err(crate::err!(
            InvalidInput,
            "unable to use container {}: {}-byte slots for {}-byte chunks",
            c.describe(),
            c.slot_size(),
            chunk_size
        ));
    }
    Ok(())
}

/// Open a container from its spec for slots of `chunk_size` bytes, after [`check`].
pub fn open(spec: &str, chunk_size: u32) -> Result<Box<dyn Container>> {
    match parse_spec(spec)? {
        Spec::Ram { size } => {
            check(spec, chunk_size)?;
            Ok(Box::new(ram::RamContainer::new(size, chunk_size)?))
        }
        Spec::File { path, size } => {
            check(spec, chunk_size)?;
            Ok(Box::new(file::FileContainer::create(
                &path, size, chunk_size,
            )?))
        }
        Spec::Dev { path } => {
            check(spec, chunk_size)?;
            Ok(Box::new(file::FileContainer::open_device(
                &path, chunk_size,
            )?))
        }
    }
}

pub(crate) fn check_slot(c: &dyn Container, slot: SlotIdx, len: usize) -> Result<()> {
    if slot.0 >= c.slots() {
        return Err(crate::err!(
            OutOfRange,
            "unable to access container {}: {slot} is outside {} slots",
            c.describe(),
            c.slots()
        ));
    }
    if len > c.slot_size() as usize {
        return Err(crate::err!(
            InvalidInput,
            "unable to access container {}: {len} bytes do not fit a {}-byte slot",
            c.describe(),
            c.slot_size()
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod conformance {
    //! Tests every container backend runs.
    use super::*;

    /// `c` must have at least 3 slots and a slot size of at least 4096.
    pub fn run(c: &dyn Container) {
        let n = c.slots();
        let ss = c.slot_size() as usize;
        assert!(n >= 3 && ss >= 4096);
        let pat = |seed: u8| -> Vec<u8> {
            (0..ss)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect()
        };
        // every slot keeps its own data
        for s in [0, 1, n - 1] {
            c.write_slot(SlotIdx(s), &pat(s as u8)).unwrap();
        }
        for s in [0, 1, n - 1] {
            let mut b = vec![0u8; ss];
            c.read_slot(SlotIdx(s), &mut b).unwrap();
            assert_eq!(b, pat(s as u8), "slot {s}");
        }
        // overwrite reuses the slot
        c.write_slot(SlotIdx(1), &pat(99)).unwrap();
        let mut b = vec![0u8; ss];
        c.read_slot(SlotIdx(1), &mut b).unwrap();
        assert_eq!(b, pat(99));
        let mut b0 = vec![0u8; ss];
        c.read_slot(SlotIdx(0), &mut b0).unwrap();
        assert_eq!(b0, pat(0));
        // short chunk (the disk's last one)
        c.write_slot(SlotIdx(2), &pat(7)[..1000]).unwrap();
        let mut short = vec![0u8; 1000];
        c.read_slot(SlotIdx(2), &mut short).unwrap();
        assert_eq!(short, &pat(7)[..1000]);
        // out of range slot and oversized data fail
        assert!(c.write_slot(SlotIdx(n), &pat(1)).is_err());
        assert!(c.read_slot(SlotIdx(n), &mut b).is_err());
        let mut big = vec![0u8; ss + 1];
        assert!(c.write_slot(SlotIdx(0), &big).is_err());
        assert!(c.read_slot(SlotIdx(0), &mut big).is_err());
        assert!(!c.describe().is_empty());
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("1TiB").unwrap(), 1 << 40);
        assert_eq!(parse_size("1P").unwrap(), 1 << 50, "P is a pebibyte");
        assert!(parse_size("M").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn specs_parse() {
        let c = open("ram:1M", 65536).unwrap();
        assert_eq!(c.slots(), 16);
        assert!(open("ram:1K", 65536).is_err(), "less than one slot");
        assert!(open("tape:1M", 65536).is_err());
        assert!(open("file:/nonexistent-dir/x", 65536).is_err());
        let e = open("nonsense", 65536).err().unwrap();
        assert!(e.to_string().contains("unable to use container"), "{e}");
    }

    #[test]
    fn checks_against_the_machine() {
        // far more than any machine has: refused before anything is allocated
        let e = check("ram:100T", 65536).unwrap_err().to_string();
        assert!(e.contains("more than") && e.contains("MemAvailable"), "{e}");
        assert!(open("ram:100T", 65536).is_err());
        assert!(check("ram:1M", 65536).is_ok());
        assert!(check("ram:", 65536).is_err());
        assert!(check("ram:12Q", 65536).is_err());
        assert!(check("ram:4K", 65536)
            .unwrap_err()
            .to_string()
            .contains("smaller than one"));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c");
        let e = check(&format!("file:{}:1000T", p.display()), 65536)
            .unwrap_err()
            .to_string();
        assert!(e.contains("free on the filesystem"), "{e}");
        assert!(!p.exists(), "a refused file container is never created");
        assert_eq!(
            check(&format!("file:{}:1M", p.display()), 65536).unwrap(),
            16
        );
        std::fs::write(&p, b"x").unwrap();
        assert!(check(&format!("file:{}:1M", p.display()), 65536)
            .unwrap_err()
            .to_string()
            .contains("already exists"));
        assert!(check_default(&format!("file:{}:1M", p.display()), 65536).is_ok());
        assert!(check(&format!("file:{}/nodir/x:1M", p.display()), 65536).is_err());
        assert!(check(&format!("dev:{}", dir.path().join("none").display()), 65536).is_err());
        assert!(check(&format!("dev:{}", dir.path().display()), 65536).is_err());
        assert!(check(&format!("dev:{}", p.display()), 65536)
            .unwrap_err()
            .to_string()
            .contains("smaller than one"));
        std::fs::write(&p, vec![0u8; 3 * 65536]).unwrap();
        assert_eq!(check(&format!("dev:{}", p.display()), 65536).unwrap(), 3);
        assert_eq!(human(4 << 40), "4 TiB");
        assert_eq!(human(1536), "1.5 KiB");
    }
}
