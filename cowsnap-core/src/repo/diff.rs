//! Which bytes of a disk differ between two generations, from their indexes alone.
//!
//! Two generations of one disk size and chunk size are compared entry by entry: a
//! chunk whose hash differs changed (a chunk's name is the blake3 hash of its
//! uncompressed data, so equal hashes mean equal data, and the zero hash means zeros in
//! both). Adjacent changed chunks are coalesced into one [`ByteRange`]; the last chunk
//! may be short, and its range ends at the disk's end.
//!
//! Cost: both indexes are loaded by [`FixedIndex::read`](super::FixedIndex::read) (read
//! in 1 MiB pieces and checked: header, entries checksum, length; by `Repo::diff` also
//! the generation id, size and chunk size against the metadata) and their data chunks
//! merged: O(data chunks of both), never O(disk size). No chunk data is read. Memory:
//! the two indexes' data runs and hashes, and the ranges (16 bytes per range).
//!
//! The ranges are also what `cowsnapctl diff --files` intersects with file extents: the
//! helpers [`overlap`] and [`subtract`] work on sorted, disjoint ranges.

use super::index::chunk_count;
use super::{FixedIndex, GenerationInfo, Repo};
use crate::error::Result;
use std::path::Path;

/// A byte range of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteRange {
    /// First byte.
    pub offset: u64,
    /// Length in bytes (never 0 in a diff).
    pub len: u64,
}

impl ByteRange {
    /// One past the last byte (saturating: ranges come from sizes below `u64::MAX`).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// The changed byte ranges between two generations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexDiff {
    /// Repository chunk size of both.
    pub chunk_size: u32,
    /// Disk size of both.
    pub disk_size: u64,
    /// Chunks compared.
    pub chunks: u64,
    /// Chunks whose hashes differ.
    pub changed_chunks: u64,
    /// Changed bytes (the sum of `ranges`).
    pub changed_bytes: u64,
    /// Changed ranges, sorted, disjoint and not adjacent.
    pub ranges: Vec<ByteRange>,
}

/// Coalesces changed chunks, given in increasing order, into ranges.
struct Coalescer {
    chunk_size: u64,
    disk_size: u64,
    diff: IndexDiff,
}

impl Coalescer {
    fn new(chunk_size: u32, disk_size: u64) -> Coalescer {
        Coalescer {
            chunk_size: u64::from(chunk_size),
            disk_size,
            diff: IndexDiff {
                chunk_size,
                disk_size,
                chunks: chunk_count(disk_size, chunk_size),
                changed_chunks: 0,
                changed_bytes: 0,
                ranges: Vec::new(),
            },
        }
    }

    /// Chunk `i` changed (`i` < chunk count, increasing).
    fn changed(&mut self, i: u64) {
        // i < chunk_count, so i * chunk_size < disk_size + chunk_size: no overflow for
        // any disk size an index header can hold below u64::MAX - 64 MiB.
        let offset = i * self.chunk_size;
        let len = (self.disk_size - offset).min(self.chunk_size);
        self.diff.changed_chunks += 1;
        self.diff.changed_bytes += len;
        match self.diff.ranges.last_mut() {
            Some(r) if r.end() == offset => r.len += len,
            _ => self.diff.ranges.push(ByteRange { offset, len }),
        }
    }
}

/// The changed ranges between two lists of chunk hashes of one disk (`a` and `b` must
/// both have `ceil(disk_size / chunk_size)` entries).
pub fn diff_hashes(
    chunk_size: u32,
    disk_size: u64,
    a: &[[u8; 32]],
    b: &[[u8; 32]],
) -> Result<IndexDiff> {
    let n = chunk_count(disk_size, chunk_size);
    if chunk_size == 0 || a.len() as u64 != n || b.len() as u64 != n {
        return Err(crate::err!(
            InvalidInput,
            "unable to compare indexes: {} and {} entries for a disk of {n} chunks",
            a.len(),
            b.len()
        ));
    }
    let mut c = Coalescer::new(chunk_size, disk_size);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if x != y {
            c.changed(i as u64);
        }
    }
    Ok(c.diff)
}

/// The changed ranges between two indexes of one disk and chunk size: their data
/// chunks merged (a chunk that is data in one and zeros in the other changed).
/// O(data chunks of both), whatever the disk size.
pub fn diff_indexes(a: &FixedIndex, b: &FixedIndex) -> Result<IndexDiff> {
    same_layout(a, b)?;
    let mut c = Coalescer::new(a.chunk_size, a.disk_size);
    let mut ia = a.data().peekable();
    let mut ib = b.data().peekable();
    loop {
        match (ia.peek(), ib.peek()) {
            (Some(&(i, x)), Some(&(j, y))) if i == j => {
                if x != y {
                    c.changed(i);
                }
                ia.next();
                ib.next();
            }
            (Some(&(i, _)), Some(&(j, _))) if i < j => {
                c.changed(i);
                ia.next();
            }
            (Some(&(i, _)), None) => {
                c.changed(i);
                ia.next();
            }
            (_, Some(&(j, _))) => {
                c.changed(j);
                ib.next();
            }
            (None, None) => break,
        }
    }
    Ok(c.diff)
}

/// Compare the index files `a` and `b` (see the module notes). Refused: different
/// disk sizes or chunk sizes (no byte-for-byte comparison exists), damaged indexes.
pub fn diff_index_files(a: &Path, b: &Path) -> Result<IndexDiff> {
    diff_indexes(&FixedIndex::read(a)?, &FixedIndex::read(b)?)
}

/// Refuse two indexes that do not describe the same bytes.
fn same_layout(a: &FixedIndex, b: &FixedIndex) -> Result<()> {
    let (ca, da) = (a.chunk_size, a.disk_size);
    let (cb, db) = (b.chunk_size, b.disk_size);
    if da != db {
        return Err(crate::err!(
            InvalidInput,
            "unable to compare {} and {}: the disk sizes differ ({da} and {db} bytes)",
            a.generation,
            b.generation
        ));
    }
    if ca != cb {
        return Err(crate::err!(
            InvalidInput,
            "unable to compare {} and {}: the chunk sizes differ ({ca} and {cb} bytes)",
            a.generation,
            b.generation
        ));
    }
    Ok(())
}

impl Repo {
    /// The changed ranges from generation `a` to `b` (see the module notes); each index
    /// must carry its generation's id, size and chunk size.
    pub fn diff(&self, a: &GenerationInfo, b: &GenerationInfo) -> Result<IndexDiff> {
        diff_indexes(&self.load_index(a)?, &self.load_index(b)?)
    }
}

/// Bytes of `[start, start + len)` inside the sorted, disjoint `ranges`, and the
/// pieces that are (appended to `out`).
pub fn overlap(ranges: &[ByteRange], start: u64, len: u64, out: &mut Vec<ByteRange>) -> u64 {
    let end = start.saturating_add(len);
    // the first range that ends after `start`
    let first = ranges.partition_point(|r| r.end() <= start);
    let mut total = 0;
    for r in &ranges[first..] {
        if r.offset >= end {
            break;
        }
        let s = r.offset.max(start);
        let e = r.end().min(end);
        if e > s {
            total += e - s;
            out.push(ByteRange {
                offset: s,
                len: e - s,
            });
        }
    }
    total
}

/// `ranges` minus `covered` (any order, may overlap): sorted, disjoint ranges.
pub fn subtract(ranges: &[ByteRange], covered: &mut [ByteRange]) -> Vec<ByteRange> {
    covered.sort_unstable();
    let mut out = Vec::new();
    let mut j = 0;
    for r in ranges {
        let mut pos = r.offset;
        let end = r.end();
        // skip covered pieces that end before this range
        while j < covered.len() && covered[j].end() <= pos {
            j += 1;
        }
        let mut k = j;
        while k < covered.len() && covered[k].offset < end {
            let c = covered[k];
            if c.offset > pos {
                out.push(ByteRange {
                    offset: pos,
                    len: c.offset - pos,
                });
            }
            pos = pos.max(c.end());
            if pos >= end {
                break;
            }
            k += 1;
        }
        if pos < end {
            out.push(ByteRange {
                offset: pos,
                len: end - pos,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::index::{INDEX_HEADER_SIZE, RUN_SIZE};

    const CS: u32 = 4096;

    fn h(n: u8) -> [u8; 32] {
        [n; 32]
    }

    fn r(offset: u64, len: u64) -> ByteRange {
        ByteRange { offset, len }
    }

    #[test]
    fn equal_indexes_have_no_ranges() {
        let a = vec![h(1), h(2), h(0)];
        let d = diff_hashes(CS, 3 * 4096, &a, &a).unwrap();
        assert_eq!(d.ranges, vec![]);
        assert_eq!((d.chunks, d.changed_chunks, d.changed_bytes), (3, 0, 0));
    }

    #[test]
    fn adjacent_chunks_coalesce_and_gaps_split() {
        let a = vec![h(1), h(2), h(3), h(4), h(5), h(6)];
        let b = vec![h(9), h(9), h(3), h(9), h(5), h(9)];
        let d = diff_hashes(CS, 6 * 4096, &a, &b).unwrap();
        assert_eq!(d.ranges, vec![r(0, 8192), r(12288, 4096), r(20480, 4096)]);
        assert_eq!(d.changed_chunks, 4);
        assert_eq!(d.changed_bytes, 4 * 4096);
    }

    #[test]
    fn short_last_chunk_ends_at_the_disk_end() {
        let size = 2 * 4096 + 100;
        let a = vec![h(1), h(2), h(3)];
        let b = vec![h(1), h(7), h(8)];
        let d = diff_hashes(CS, size, &a, &b).unwrap();
        assert_eq!(d.ranges, vec![r(4096, 4096 + 100)]);
        assert_eq!(d.changed_bytes, 4196);
        // only the last (short) chunk
        let b = vec![h(1), h(2), h(8)];
        let d = diff_hashes(CS, size, &a, &b).unwrap();
        assert_eq!(d.ranges, vec![r(8192, 100)]);
    }

    #[test]
    fn zero_hash_against_data_is_a_change() {
        let z = crate::repo::ZERO_HASH;
        let d = diff_hashes(CS, 2 * 4096, &[z, z], &[z, h(3)]).unwrap();
        assert_eq!(d.ranges, vec![r(4096, 4096)]);
    }

    #[test]
    fn wrong_entry_counts_are_refused() {
        assert!(diff_hashes(CS, 3 * 4096, &[h(1)], &[h(1)]).is_err());
    }

    fn write(dir: &Path, id: &str, size: u64, cs: u32, hashes: Vec<[u8; 32]>) -> PathBuf {
        let p = dir.join(format!("{id}.idx"));
        FixedIndex::from_hashes(id, cs, size, &hashes)
            .unwrap()
            .write(&p)
            .unwrap();
        p
    }
    use std::path::PathBuf;

    #[test]
    fn index_files_stream_in_pieces() {
        // more entries than one 1 MiB read holds (32768), changes across the seam
        let n = 70_000u64;
        let a: Vec<[u8; 32]> = (0..n).map(|i| [(i % 251) as u8; 32]).collect();
        let mut b = a.clone();
        for i in [0u64, 32_767, 32_768, 32_769, 65_536, n - 1] {
            b[i as usize] = h(255);
        }
        let d = tempfile::tempdir().unwrap();
        let size = n * 4096 - 1;
        let pa = write(d.path(), "a", size, CS, a.clone());
        let pb = write(d.path(), "b", size, CS, b.clone());
        let got = diff_index_files(&pa, &pb).unwrap();
        assert_eq!(got, diff_hashes(CS, size, &a, &b).unwrap());
        assert_eq!(
            got.ranges,
            vec![
                r(0, 4096),
                r(32_767 * 4096, 3 * 4096),
                r(65_536 * 4096, 4096),
                r((n - 1) * 4096, 4095)
            ]
        );
        assert_eq!(got.changed_chunks, 6);
    }

    #[test]
    fn different_sizes_and_damage_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let pa = write(d.path(), "a", 3 * 4096, CS, vec![h(1); 3]);
        let pb = write(d.path(), "b", 2 * 4096, CS, vec![h(1); 2]);
        let e = diff_index_files(&pa, &pb).unwrap_err().to_string();
        assert!(e.contains("disk sizes differ"), "{e}");
        let pc = write(d.path(), "c", 3 * 4096, 8192, vec![h(1); 2]);
        let e = diff_index_files(&pa, &pc).unwrap_err().to_string();
        assert!(
            e.contains("disk sizes differ") || e.contains("chunk sizes"),
            "{e}"
        );
        let pd = write(d.path(), "d", 4 * 4096, 8192, vec![h(1); 2]);
        let pe = write(d.path(), "e", 4 * 4096, CS, vec![h(1); 4]);
        let e = diff_index_files(&pd, &pe).unwrap_err().to_string();
        assert!(e.contains("chunk sizes differ"), "{e}");
        // a flipped hash byte fails the entries checksum
        let pf = write(d.path(), "f", 3 * 4096, CS, vec![h(2); 3]);
        let mut bytes = std::fs::read(&pf).unwrap();
        bytes[INDEX_HEADER_SIZE + RUN_SIZE + 5] ^= 1;
        std::fs::write(&pf, &bytes).unwrap();
        let e = diff_index_files(&pa, &pf).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        bytes.push(0);
        std::fs::write(&pf, &bytes).unwrap();
        assert!(diff_index_files(&pa, &pf).is_err());
    }

    #[test]
    fn repo_diff_checks_metadata() {
        let d = tempfile::tempdir().unwrap();
        let repo = Repo::open_or_create(d.path(), 4096).unwrap();
        let mut img = vec![0u8; 5 * 4096];
        img[4096..8192].fill(1);
        let g1 = crate::repo::testutil::make_gen(&repo, "20260101T000000.000Z-00000001", &img);
        img[4 * 4096 + 7] = 9;
        img[4096] = 2;
        let g2 = crate::repo::testutil::make_gen(&repo, "20260101T000000.000Z-00000002", &img);
        let got = repo.diff(&g1, &g2).unwrap();
        assert_eq!(got.ranges, vec![r(4096, 4096), r(4 * 4096, 4096)]);
        assert_eq!(repo.diff(&g2, &g2).unwrap().ranges, vec![]);
        let mut wrong = g2.clone();
        wrong.disk_size += 1;
        assert!(repo.diff(&g1, &wrong).is_err());
    }

    #[test]
    fn overlap_and_subtract() {
        let ranges = vec![r(100, 100), r(300, 100), r(500, 50)];
        let mut pieces = Vec::new();
        assert_eq!(overlap(&ranges, 0, 100, &mut pieces), 0);
        assert_eq!(overlap(&ranges, 150, 200, &mut pieces), 50 + 50);
        assert_eq!(pieces, vec![r(150, 50), r(300, 50)]);
        pieces.clear();
        assert_eq!(overlap(&ranges, 0, 1000, &mut pieces), 250);
        assert_eq!(pieces, ranges);
        assert_eq!(overlap(&ranges, 549, u64::MAX, &mut Vec::new()), 1);

        let mut covered = vec![r(350, 10), r(120, 10), r(300, 60), r(500, 50)];
        assert_eq!(
            subtract(&ranges, &mut covered),
            vec![r(100, 20), r(130, 70), r(360, 40)]
        );
        assert_eq!(subtract(&ranges, &mut []), ranges);
        assert_eq!(subtract(&ranges, &mut [r(0, 1000)]), vec![]);
    }
}
