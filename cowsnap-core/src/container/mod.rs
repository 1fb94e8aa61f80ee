//! Containers: fixed-capacity slot stores for the originals of chunks written while a
//! snapshot is active.
//!
//! Design notes
//! - A container stores whole chunks in numbered slots (`SlotIdx`); it does not
//!   allocate them. Slot allocation, usage, the high-water mark and the waiting of
//!   writers when it is full live in `snapshot::SlotPool`, so every backend shares one
//!   implementation of that logic and a new backend only moves bytes.
//! - Specs: `ram:SIZE` ([`ram::RamContainer`], memory allocated per slot on first use),
//!   `file:PATH:SIZE` ([`file::FileContainer`], created new and preallocated with
//!   fallocate, removed when the backup ends), `dev:PATH` (the same file container
//!   on an existing block device or file, opened exclusively, never removed).
//!   SIZE accepts K/M/G/T suffixes (binary multiples). Capacity in slots is
//!   `SIZE / chunk_size`; at least one slot is required.
//! - The default container when neither the backup nor the disk names one is
//!   [`DEFAULT_CONTAINER`] (`ram:64M`: 1024 slots of 64 KiB).
//! - Every backend runs the `conformance::run` checks in its tests.

pub mod file;
pub mod ram;

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

/// Parse a size with an optional binary suffix: `4096`, `64K`, `64M`, `2G`, `1T`
/// (also `KiB`/`MiB`/... and lower case).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    let n: u64 = num
        .parse()
        .map_err(|_| crate::err!(InvalidInput, "unable to parse size {s:?}: not a number"))?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        other => {
            return Err(crate::err!(
                InvalidInput,
                "unable to parse size {s:?}: unknown suffix {other:?} (use K, M, G or T)"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| crate::err!(InvalidInput, "unable to parse size {s:?}: too large"))
}

/// Open a container from its spec for slots of `chunk_size` bytes.
pub fn open(spec: &str, chunk_size: u32) -> Result<Box<dyn Container>> {
    let bad = |why: &str| {
        crate::err!(
            InvalidInput,
            "unable to open container {spec:?}: {why} (expected ram:SIZE, file:PATH:SIZE or dev:PATH)"
        )
    };
    let (kind, rest) = spec.split_once(':').ok_or_else(|| bad("no kind"))?;
    match kind {
        "ram" => {
            let size = parse_size(rest).map_err(|e| e.with_context("unable to open container"))?;
            Ok(Box::new(ram::RamContainer::new(size, chunk_size)?))
        }
        "file" => {
            let (path, size) = rest.rsplit_once(':').ok_or_else(|| bad("no size"))?;
            if path.is_empty() {
                return Err(bad("empty path"));
            }
            let size = parse_size(size).map_err(|e| e.with_context("unable to open container"))?;
            Ok(Box::new(file::FileContainer::create(
                path.as_ref(),
                size,
                chunk_size,
            )?))
        }
        "dev" => {
            if rest.is_empty() {
                return Err(bad("empty path"));
            }
            Ok(Box::new(file::FileContainer::open_device(
                rest.as_ref(),
                chunk_size,
            )?))
        }
        _ => Err(bad("unknown kind")),
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
        assert!(e.to_string().contains("unable to open container"), "{e}");
    }
}
