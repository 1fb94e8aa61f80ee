//! The fixed index of one generation: which chunk holds each repository-chunk-sized
//! piece of the disk.
//!
//! Layout: a 4096-byte header ([`IndexHeader`]: its fields in order, little endian), then
//! `chunk_count` entries of 32 bytes: the blake3 hash of the uncompressed chunk, or
//! [`ZERO_HASH`](super::chunk_store::ZERO_HASH) for a chunk of zeros. The header
//! carries the blake3 checksum of all entries and of itself, and the generation id, so
//! a torn, truncated or swapped index is refused. The index is published atomically
//! (temp → fsync → rename → fsync dir; the temp is removed if dropped unpublished).

use crate::error::{IoContext, Result};
use crate::fsutil::AtomicFile;
use crate::ondisk::{Decoder, Encoder};
use std::path::Path;

/// Versioned magic of the index format.
pub const INDEX_MAGIC: [u8; 8] = *b"CSNPIX01";
/// Format version.
pub const INDEX_VERSION: u32 = 1;
/// Header size in bytes.
pub const INDEX_HEADER_SIZE: usize = 4096;

/// The on-disk header: its fields in order, little endian (the `ondisk` codec).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IndexHeader {
    /// [`INDEX_MAGIC`].
    pub magic: [u8; 8],
    /// [`INDEX_VERSION`].
    pub version: u32,
    /// Repository chunk size in bytes.
    pub chunk_size: u32,
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Number of entries: `ceil(disk_size / chunk_size)`.
    pub chunk_count: u64,
    /// blake3 of the entries.
    pub entries_checksum: [u8; 32],
    /// Generation id, NUL padded.
    pub generation: [u8; 64],
    /// blake3 of the 128 bytes above.
    pub header_checksum: [u8; 32],
    /// Zero.
    pub reserved: [u8; INDEX_HEADER_SIZE - 160],
}

const _: () = assert!(std::mem::size_of::<IndexHeader>() == INDEX_HEADER_SIZE);

impl IndexHeader {
    /// Encode, computing the header checksum.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new(INDEX_HEADER_SIZE);
        e.bytes(&self.magic)
            .u32(self.version)
            .u32(self.chunk_size)
            .u64(self.disk_size)
            .u64(self.chunk_count)
            .bytes(&self.entries_checksum)
            .bytes(&self.generation);
        let sum = blake3::hash(e.written());
        e.bytes(sum.as_bytes());
        e.finish(INDEX_HEADER_SIZE)
    }

    /// Decode the fields; `Err` names what is wrong (magic, header checksum). The
    /// caller checks the rest against the entries.
    pub(crate) fn decode(b: &[u8]) -> std::result::Result<IndexHeader, &'static str> {
        let short = "shorter than its header";
        if b.len() < INDEX_HEADER_SIZE {
            return Err(short);
        }
        let mut d = Decoder::new(b);
        let magic = d.array().ok_or(short)?;
        if magic != INDEX_MAGIC {
            return Err("bad magic");
        }
        let version = d.u32().ok_or(short)?;
        let chunk_size = d.u32().ok_or(short)?;
        let disk_size = d.u64().ok_or(short)?;
        let chunk_count = d.u64().ok_or(short)?;
        let entries_checksum = d.array().ok_or(short)?;
        let generation = d.array().ok_or(short)?;
        let body = d.read();
        let header_checksum: [u8; 32] = d.array().ok_or(short)?;
        if blake3::hash(body).as_bytes()[..] != header_checksum {
            return Err("header checksum mismatch");
        }
        Ok(IndexHeader {
            magic,
            version,
            chunk_size,
            disk_size,
            chunk_count,
            entries_checksum,
            generation,
            header_checksum,
            reserved: [0; INDEX_HEADER_SIZE - 160],
        })
    }
}

/// A generation's index in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedIndex {
    /// Generation id.
    pub generation: String,
    /// Repository chunk size.
    pub chunk_size: u32,
    /// Disk size.
    pub disk_size: u64,
    /// One hash per chunk.
    pub hashes: Vec<[u8; 32]>,
}

/// Entries a disk of `disk_size` needs at `chunk_size`.
pub fn chunk_count(disk_size: u64, chunk_size: u32) -> u64 {
    disk_size.div_ceil(chunk_size as u64)
}

impl FixedIndex {
    /// Length of chunk `i` (the last one may be short).
    pub fn chunk_len(&self, i: u64) -> usize {
        let off = i * self.chunk_size as u64;
        (self.disk_size - off).min(self.chunk_size as u64) as usize
    }

    fn entries_checksum(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        for e in &self.hashes {
            h.update(e);
        }
        *h.finalize().as_bytes()
    }

    /// The header for this index.
    pub fn header(&self) -> IndexHeader {
        let mut generation = [0u8; 64];
        let g = self.generation.as_bytes();
        let n = g.len().min(64);
        generation[..n].copy_from_slice(&g[..n]);
        IndexHeader {
            magic: INDEX_MAGIC,
            version: INDEX_VERSION,
            chunk_size: self.chunk_size,
            disk_size: self.disk_size,
            chunk_count: self.hashes.len() as u64,
            entries_checksum: self.entries_checksum(),
            generation,
            header_checksum: [0; 32],
            reserved: [0; INDEX_HEADER_SIZE - 160],
        }
    }

    /// Serialize header and entries.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.header().encode();
        v.reserve(self.hashes.len() * 32);
        for e in &self.hashes {
            v.extend_from_slice(e);
        }
        v
    }

    /// Parse and check an encoded index.
    pub fn decode(b: &[u8], what: &str) -> Result<FixedIndex> {
        let bad = |why: &str| crate::err!(Corrupt, "index {what} is corrupt: {why}");
        let h = IndexHeader::decode(b).map_err(bad)?;
        let version = h.version;
        if version != INDEX_VERSION {
            return Err(bad(&format!("unsupported version {version}")));
        }
        let (chunk_size, disk_size, count) = (h.chunk_size, h.disk_size, h.chunk_count);
        if chunk_size == 0 || count != chunk_count(disk_size, chunk_size) {
            return Err(bad("chunk count does not match the disk size"));
        }
        let want_len = (count as usize)
            .checked_mul(32)
            .and_then(|n| n.checked_add(INDEX_HEADER_SIZE));
        if want_len != Some(b.len()) {
            return Err(bad("wrong length"));
        }
        let hashes: Vec<[u8; 32]> = b[INDEX_HEADER_SIZE..]
            .chunks_exact(32)
            .map(|c| {
                let mut h = [0u8; 32];
                h.copy_from_slice(c);
                h
            })
            .collect();
        let gen_end = h.generation.iter().position(|&c| c == 0).unwrap_or(64);
        let idx = FixedIndex {
            generation: String::from_utf8_lossy(&h.generation[..gen_end]).into_owned(),
            chunk_size,
            disk_size,
            hashes,
        };
        if idx.entries_checksum() != h.entries_checksum {
            return Err(bad("entries checksum mismatch"));
        }
        Ok(idx)
    }

    /// Publish the index at `path` atomically and durably.
    pub fn write(&self, path: &Path) -> Result<u64> {
        let bytes = self.encode();
        let mut f = AtomicFile::create(path)?;
        f.write_all(&bytes)?;
        f.commit()?;
        Ok(bytes.len() as u64)
    }

    /// Load and check the index at `path`.
    pub fn read(path: &Path) -> Result<FixedIndex> {
        let b = std::fs::read(path).ctx(|| format!("unable to read index {}", path.display()))?;
        Self::decode(&b, &path.display().to_string())
    }
}

/// What an index references, counted without keeping its entries (see [`summarize`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexSummary {
    /// Repository chunk size.
    pub chunk_size: u32,
    /// Disk size.
    pub disk_size: u64,
    /// Entries.
    pub chunks: u64,
    /// Entries that name a stored chunk (not the zero hash).
    pub data_chunks: u64,
    /// Bytes of the disk those entries cover (the last chunk may be short).
    pub data_bytes: u64,
}

/// Count what the index at `path` references, reading it in 1 MiB pieces (an index
/// is 32 bytes per chunk: 512 MiB for 16 TiB at 1 MiB chunks, too much to hold for a
/// figure). The header and the entries' checksum are checked as in [`FixedIndex::read`].
pub fn summarize(path: &Path) -> Result<IndexSummary> {
    use std::io::Read;
    let what = path.display().to_string();
    let bad = |why: &str| crate::err!(Corrupt, "index {what} is corrupt: {why}");
    let mut f =
        std::fs::File::open(path).ctx(|| format!("unable to read index {}", path.display()))?;
    let mut head = vec![0u8; INDEX_HEADER_SIZE];
    f.read_exact(&mut head)
        .ctx(|| format!("unable to read index {}", path.display()))?;
    let h = IndexHeader::decode(&head).map_err(bad)?;
    let (version, chunk_size, disk_size, count) =
        (h.version, h.chunk_size, h.disk_size, h.chunk_count);
    if version != INDEX_VERSION {
        return Err(bad(&format!("unsupported version {version}")));
    }
    if chunk_size == 0 || count != chunk_count(disk_size, chunk_size) {
        return Err(bad("chunk count does not match the disk size"));
    }
    let zero = super::chunk_store::ZERO_HASH;
    let mut sum = IndexSummary {
        chunk_size,
        disk_size,
        chunks: count,
        ..Default::default()
    };
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut i = 0u64;
    while i < count {
        let n = ((count - i).min((buf.len() / 32) as u64) * 32) as usize;
        f.read_exact(&mut buf[..n]).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                bad("wrong length")
            } else {
                crate::Error::io(format!("unable to read index {}", path.display()), e)
            }
        })?;
        hasher.update(&buf[..n]);
        for e in buf[..n].chunks_exact(32) {
            if e != zero {
                // the last entry may cover less than a chunk
                let off = i * u64::from(chunk_size);
                sum.data_chunks += 1;
                sum.data_bytes += (disk_size - off).min(u64::from(chunk_size));
            }
            i += 1;
        }
    }
    let mut extra = [0u8; 1];
    if f.read(&mut extra)
        .ctx(|| format!("unable to read index {}", path.display()))?
        != 0
    {
        return Err(bad("wrong length"));
    }
    if *hasher.finalize().as_bytes() != h.entries_checksum {
        return Err(bad("entries checksum mismatch"));
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FixedIndex {
        FixedIndex {
            generation: "20261125T232732.123Z-0011aabb".into(),
            chunk_size: 1 << 20,
            disk_size: (3 << 20) + 5,
            hashes: vec![[0u8; 32], [1u8; 32], [2u8; 32], [0xffu8; 32]],
        }
    }

    #[test]
    fn header_bytes_are_pinned() {
        let b = sample().encode();
        assert_eq!(b.len(), INDEX_HEADER_SIZE + 4 * 32);
        let expect_head: &[u8] = b"CSNPIX01\
            \x01\x00\x00\x00\
            \x00\x00\x10\x00\
            \x05\x00\x30\x00\x00\x00\x00\x00\
            \x04\x00\x00\x00\x00\x00\x00\x00";
        assert_eq!(&b[..32], expect_head);
        assert_eq!(&b[64..93], b"20261125T232732.123Z-0011aabb");
        assert!(b[93..128].iter().all(|&c| c == 0));
        assert!(b[160..INDEX_HEADER_SIZE].iter().all(|&c| c == 0));
        assert_eq!(
            crate::fsutil::hex(&b[32..64]),
            PINNED_ENTRIES_SUM,
            "entries checksum"
        );
        assert_eq!(
            crate::fsutil::hex(&b[128..160]),
            PINNED_HEADER_SUM,
            "header checksum"
        );
        assert_eq!(FixedIndex::decode(&b, "x").unwrap(), sample());
    }

    const PINNED_ENTRIES_SUM: &str =
        "427859bda3c7fb47f9bedafa5ada2838c1b2b1b491b8083d7ebe49379c136f5f";
    const PINNED_HEADER_SUM: &str =
        "3d575a9a139314976ccbc0b4774a65365a0dc395832a39171938c592f55bf6ae";

    #[test]
    fn damage_is_refused() {
        let b = sample().encode();
        for pos in [0usize, 9, 17, 40, 70, 140, INDEX_HEADER_SIZE + 33] {
            let mut c = b.clone();
            c[pos] ^= 0x40;
            assert!(FixedIndex::decode(&c, "x").is_err(), "flip at {pos}");
        }
        assert!(FixedIndex::decode(&b[..b.len() - 1], "x").is_err());
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("g.idx");
        sample().write(&p).unwrap();
        assert_eq!(FixedIndex::read(&p).unwrap(), sample());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn summarize_counts_data_chunks_without_loading_the_index() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("g.idx");
        let idx = sample();
        idx.write(&p).unwrap();
        let s = summarize(&p).unwrap();
        assert_eq!(s.chunks, 4);
        assert_eq!(s.data_chunks, 3, "one zero entry");
        assert_eq!(
            s.data_bytes,
            (2 << 20) + 5,
            "two whole chunks and the 5-byte tail"
        );
        // damage is found as by read()
        let mut b = std::fs::read(&p).unwrap();
        let last = b.len() - 1;
        b[last] ^= 1;
        std::fs::write(&p, &b).unwrap();
        assert!(summarize(&p).unwrap_err().to_string().contains("checksum"));
        b.push(0);
        std::fs::write(&p, &b).unwrap();
        assert!(summarize(&p)
            .unwrap_err()
            .to_string()
            .contains("wrong length"));
        b.truncate(b.len() - 40);
        std::fs::write(&p, &b).unwrap();
        assert!(summarize(&p)
            .unwrap_err()
            .to_string()
            .contains("wrong length"));
    }
}
