//! Free space of the filesystem on a disk, read from the disk itself, so a full backup
//! can leave it out (stored as zeros, never read).
//!
//! Design notes
//! - Input: a reader of the disk *as of the snapshot instant* (`Snapshot::read_view`)
//!   — a crash-consistent image of a filesystem that is usually mounted and live — and
//!   the disk size. Output: [`Probe::Free`] with sorted, merged byte ranges that are
//!   free, or [`Probe::Unknown`] with the reason. The caller excludes only what is in
//!   `Free`; `Unknown` means "back up everything".
//! - The result decides what is *not* backed up, so a wrong "free" loses user data.
//!   Every rule errs towards "used": anything unexpected (an unknown feature, a field
//!   out of range, a structure that does not parse, an external journal) makes the
//!   answer `Unknown`, or the region concerned used.
//! - Journals: on a mounted filesystem the allocation metadata on disk can be older
//!   than its journal; after a restore the journal replays and blocks it allocates
//!   become in use. See each filesystem's module for how that is handled.
//! - Bounded: allocations are bounded by the disk's size (one bitmap block at a time,
//!   group tables of at most [`MAX_TABLE_BYTES`]), every walk by a visit limit.

pub mod ext4;
pub mod xfs;

use crate::error::Result;

/// Largest metadata table (group descriptors, say) read into memory at once.
pub const MAX_TABLE_BYTES: u64 = 256 << 20;

/// Reads `buf.len()` bytes at a byte offset of the disk.
pub type ReadAt<'a> = dyn FnMut(u64, &mut [u8]) -> Result<()> + 'a;

/// What was learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// A filesystem was recognised and its free space read.
    Free {
        /// Filesystem name ("ext4", "xfs").
        fs: &'static str,
        /// Free byte ranges `[start, end)`, sorted and merged.
        ranges: Vec<(u64, u64)>,
        /// Their total.
        free_bytes: u64,
        /// What was treated as used to stay safe (e.g. groups whose bitmaps the
        /// journal holds newer copies of), for the user.
        caveat: Option<String>,
    },
    /// Not known: back up every block.
    Unknown {
        /// Why, for the user.
        why: String,
    },
}

/// Recognise the filesystem on the disk and read its free space.
pub fn probe(read: &mut ReadAt<'_>, disk_size: u64) -> Result<Probe> {
    if disk_size < 64 * 1024 {
        return Ok(Probe::Unknown {
            why: "the disk is too small to hold a filesystem".into(),
        });
    }
    let mut sb = vec![0u8; 1024];
    read(1024, &mut sb)?;
    if ext4::is_ext(&sb) {
        return ext4::probe(read, disk_size, &sb);
    }
    let mut head = [0u8; 4];
    read(0, &mut head)?;
    if xfs::is_xfs(&head) {
        return xfs::probe(read, disk_size);
    }
    Ok(Probe::Unknown {
        why: "no ext4 or XFS filesystem found on the disk".into(),
    })
}

/// Sorted, merged ranges from an unsorted list.
pub(crate) fn merge(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.retain(|r| r.0 < r.1);
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (a, b) in v {
        match out.last_mut() {
            Some(l) if a <= l.1 => l.1 = l.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_sorts_and_joins() {
        assert_eq!(
            merge(vec![(10, 20), (0, 5), (5, 7), (15, 30), (40, 40)]),
            vec![(0, 7), (10, 30)]
        );
    }

    #[test]
    fn garbage_is_unknown() {
        let data = vec![0xA5u8; 1 << 20];
        let mut r = |off: u64, b: &mut [u8]| {
            let o = off as usize;
            b.copy_from_slice(&data[o..o + b.len()]);
            Ok(())
        };
        assert!(matches!(
            probe(&mut r, 1 << 20).unwrap(),
            Probe::Unknown { .. }
        ));
    }
}
