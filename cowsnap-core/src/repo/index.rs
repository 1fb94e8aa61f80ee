//! The fixed index of one generation: which chunk holds each repository-chunk-sized
//! piece of the disk.
//!
//! Two on-disk versions, both a 4096-byte header (its fields in order, little endian,
//! through the `ondisk` codec) followed by the entries; the header carries the blake3
//! checksum of the entries and of itself, and the generation id, so a torn, truncated
//! or swapped index is refused. The index is published atomically (temp → fsync →
//! rename → fsync dir; the temp is removed if dropped unpublished).
//!
//! - Version 1 ([`IndexHeader`], magic `CSNPIX01`, read only): `chunk_count` entries
//!   of 32 bytes, the blake3 hash of the uncompressed chunk or
//!   [`ZERO_HASH`](super::chunk_store::ZERO_HASH) for a chunk of zeros — 32 bytes per
//!   chunk whatever the data (512 MiB for 16 TiB at 1 MiB chunks).
//! - Version 2 ([`IndexHeaderV2`], magic `CSNPIX02`, written): `run_count` data runs
//!   of 16 bytes (first chunk, chunks; u64 each, ascending, neither empty nor touching
//!   the previous one, inside the disk), then `data_count` hashes of 32 bytes, the
//!   runs' chunks in order (none of them the zero hash). Every chunk outside the runs
//!   is zeros: a zero run costs nothing, a run of data 16 bytes plus 32 per chunk.
//!   The entries checksum covers the runs and the hashes. One content has exactly one
//!   encoding.
//!
//! In memory ([`FixedIndex`]) an index is the same runs and hashes: O(data), whatever
//! the disk size. Reading either version streams the file in 1 MiB pieces; nothing is
//! allocated before the file's length is found to match what its header claims, and
//! then only for the data the file holds.

use super::chunk_store::ZERO_HASH;
use crate::error::{IoContext, Result};
use crate::fsutil::AtomicFile;
use crate::ondisk::{Decoder, Encoder};
use std::io::Read;
use std::path::Path;

/// Versioned magic of index format version 1.
pub const INDEX_MAGIC_V1: [u8; 8] = *b"CSNPIX01";
/// Versioned magic of index format version 2.
pub const INDEX_MAGIC: [u8; 8] = *b"CSNPIX02";
/// Format version written.
pub const INDEX_VERSION: u32 = 2;
/// Format versions read.
pub const INDEX_READ_VERSIONS: &[u32] = &[1, 2];
/// Header size in bytes (both versions).
pub const INDEX_HEADER_SIZE: usize = 4096;
/// Bytes of one data run in a version 2 index.
pub const RUN_SIZE: usize = 16;

/// The version 1 header: its fields in order, little endian (the `ondisk` codec).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IndexHeader {
    /// [`INDEX_MAGIC_V1`].
    pub magic: [u8; 8],
    /// 1.
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

/// The version 2 header: its fields in order, little endian (the `ondisk` codec).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IndexHeaderV2 {
    /// [`INDEX_MAGIC`].
    pub magic: [u8; 8],
    /// [`INDEX_VERSION`].
    pub version: u32,
    /// Repository chunk size in bytes.
    pub chunk_size: u32,
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Chunks of the disk: `ceil(disk_size / chunk_size)`.
    pub chunk_count: u64,
    /// Data runs following the header.
    pub run_count: u64,
    /// Hashes following the runs: the chunks of all runs.
    pub data_count: u64,
    /// blake3 of the runs and the hashes.
    pub entries_checksum: [u8; 32],
    /// Generation id, NUL padded.
    pub generation: [u8; 64],
    /// blake3 of the 144 bytes above.
    pub header_checksum: [u8; 32],
    /// Zero.
    pub reserved: [u8; INDEX_HEADER_SIZE - 176],
}

const _: () = assert!(std::mem::size_of::<IndexHeaderV2>() == INDEX_HEADER_SIZE);

const SHORT: &str = "shorter than its header";

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
        if b.len() < INDEX_HEADER_SIZE {
            return Err(SHORT);
        }
        let mut d = Decoder::new(b);
        let magic = d.array().ok_or(SHORT)?;
        if magic != INDEX_MAGIC_V1 {
            return Err("bad magic");
        }
        let version = d.u32().ok_or(SHORT)?;
        let chunk_size = d.u32().ok_or(SHORT)?;
        let disk_size = d.u64().ok_or(SHORT)?;
        let chunk_count = d.u64().ok_or(SHORT)?;
        let entries_checksum = d.array().ok_or(SHORT)?;
        let generation = d.array().ok_or(SHORT)?;
        let body = d.read();
        let header_checksum: [u8; 32] = d.array().ok_or(SHORT)?;
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

impl IndexHeaderV2 {
    /// Encode, computing the header checksum.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new(INDEX_HEADER_SIZE);
        e.bytes(&self.magic)
            .u32(self.version)
            .u32(self.chunk_size)
            .u64(self.disk_size)
            .u64(self.chunk_count)
            .u64(self.run_count)
            .u64(self.data_count)
            .bytes(&self.entries_checksum)
            .bytes(&self.generation);
        let sum = blake3::hash(e.written());
        e.bytes(sum.as_bytes());
        e.finish(INDEX_HEADER_SIZE)
    }

    /// Decode the fields; `Err` names what is wrong (magic, header checksum). The
    /// caller checks the rest against the entries.
    pub(crate) fn decode(b: &[u8]) -> std::result::Result<IndexHeaderV2, &'static str> {
        if b.len() < INDEX_HEADER_SIZE {
            return Err(SHORT);
        }
        let mut d = Decoder::new(b);
        let magic = d.array().ok_or(SHORT)?;
        if magic != INDEX_MAGIC {
            return Err("bad magic");
        }
        let version = d.u32().ok_or(SHORT)?;
        let chunk_size = d.u32().ok_or(SHORT)?;
        let disk_size = d.u64().ok_or(SHORT)?;
        let chunk_count = d.u64().ok_or(SHORT)?;
        let run_count = d.u64().ok_or(SHORT)?;
        let data_count = d.u64().ok_or(SHORT)?;
        let entries_checksum = d.array().ok_or(SHORT)?;
        let generation = d.array().ok_or(SHORT)?;
        let body = d.read();
        let header_checksum: [u8; 32] = d.array().ok_or(SHORT)?;
        if blake3::hash(body).as_bytes()[..] != header_checksum {
            return Err("header checksum mismatch");
        }
        Ok(IndexHeaderV2 {
            magic,
            version,
            chunk_size,
            disk_size,
            chunk_count,
            run_count,
            data_count,
            entries_checksum,
            generation,
            header_checksum,
            reserved: [0; INDEX_HEADER_SIZE - 176],
        })
    }
}

/// `len` data chunks from chunk `start`; their hashes are `hashes[at..at + len]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    start: u64,
    len: u64,
    at: u64,
}

impl Run {
    fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// A generation's index in memory: its data runs and their hashes; every other chunk
/// is zeros. O(data chunks), whatever the disk size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedIndex {
    /// Generation id.
    pub generation: String,
    /// Repository chunk size.
    pub chunk_size: u32,
    /// Disk size.
    pub disk_size: u64,
    /// Ascending, non-empty, not touching each other.
    runs: Vec<Run>,
    /// The hashes of the runs' chunks, in order; never the zero hash.
    hashes: Vec<[u8; 32]>,
}

/// Entries a disk of `disk_size` needs at `chunk_size`.
pub fn chunk_count(disk_size: u64, chunk_size: u32) -> u64 {
    match chunk_size {
        0 => 0,
        c => disk_size.div_ceil(u64::from(c)),
    }
}

/// Piece size for streaming an index from or to a file.
const PIECE: usize = 1 << 20;

impl FixedIndex {
    /// An index of all zeros (chunks are added with [`push`](Self::push)).
    pub fn new(generation: impl Into<String>, chunk_size: u32, disk_size: u64) -> FixedIndex {
        FixedIndex {
            generation: generation.into(),
            chunk_size,
            disk_size,
            runs: Vec::new(),
            hashes: Vec::new(),
        }
    }

    /// An index from one hash per chunk (`hashes` must have one per chunk).
    pub fn from_hashes(
        generation: impl Into<String>,
        chunk_size: u32,
        disk_size: u64,
        hashes: &[[u8; 32]],
    ) -> Result<FixedIndex> {
        let mut idx = FixedIndex::new(generation, chunk_size, disk_size);
        if hashes.len() as u64 != idx.chunk_count() {
            return Err(crate::err!(
                InvalidInput,
                "unable to build an index: {} hashes for {} chunks",
                hashes.len(),
                idx.chunk_count()
            ));
        }
        for (i, h) in hashes.iter().enumerate() {
            idx.push(i as u64, *h)?;
        }
        Ok(idx)
    }

    /// Record chunk `i`'s hash; chunks are pushed in increasing order, and chunks not
    /// pushed (or pushed with the zero hash) are zeros.
    pub fn push(&mut self, i: u64, h: [u8; 32]) -> Result<()> {
        if i >= self.chunk_count() || self.runs.last().is_some_and(|r| i < r.end()) {
            return Err(crate::err!(
                InvalidInput,
                "unable to add chunk {i} to the index of {}: out of order or past the disk's {} chunks",
                self.generation,
                self.chunk_count()
            ));
        }
        if h == ZERO_HASH {
            return Ok(());
        }
        let at = self.hashes.len() as u64;
        match self.runs.last_mut() {
            Some(r) if r.end() == i => r.len += 1,
            _ => self.runs.push(Run {
                start: i,
                len: 1,
                at,
            }),
        }
        self.hashes.push(h);
        Ok(())
    }

    /// Chunks of the disk.
    pub fn chunk_count(&self) -> u64 {
        chunk_count(self.disk_size, self.chunk_size)
    }

    /// Length of chunk `i` (the last one may be short).
    pub fn chunk_len(&self, i: u64) -> usize {
        let off = i * self.chunk_size as u64;
        (self.disk_size - off).min(self.chunk_size as u64) as usize
    }

    /// The hash of chunk `i` ([`ZERO_HASH`] for zeros, and past the end).
    pub fn hash(&self, i: u64) -> &[u8; 32] {
        let k = self.runs.partition_point(|r| r.start <= i);
        match k.checked_sub(1).map(|k| self.runs[k]) {
            Some(r) if i < r.end() => &self.hashes[(r.at + i - r.start) as usize],
            _ => &ZERO_HASH,
        }
    }

    /// Whether chunk `i` is zeros.
    pub fn is_zero(&self, i: u64) -> bool {
        *self.hash(i) == ZERO_HASH
    }

    /// Chunks that are not zeros.
    pub fn data_chunks(&self) -> u64 {
        self.hashes.len() as u64
    }

    /// Bytes of the disk the data chunks cover (the last chunk may be short).
    pub fn data_bytes(&self) -> u64 {
        let cs = u64::from(self.chunk_size);
        self.runs
            .iter()
            // r.start < chunk count, so r.start * cs < disk size; the end may pass u64
            .map(|r| self.disk_size.min(r.end().saturating_mul(cs)) - r.start * cs)
            .sum()
    }

    /// The data chunks and their hashes, ascending.
    pub fn data(&self) -> impl Iterator<Item = (u64, &[u8; 32])> + '_ {
        self.runs.iter().flat_map(move |r| {
            (r.start..r.end()).zip(&self.hashes[r.at as usize..(r.at + r.len) as usize])
        })
    }

    /// The runs of data chunks as chunk ranges `start..end`, ascending; the chunks
    /// between them are zeros.
    pub fn data_runs(&self) -> impl Iterator<Item = std::ops::Range<u64>> + '_ {
        self.runs.iter().map(|r| r.start..r.end())
    }

    /// The runs of data chunks meeting chunks `first..last`, clipped to them.
    pub fn data_runs_in(
        &self,
        first: u64,
        last: u64,
    ) -> impl Iterator<Item = std::ops::Range<u64>> + '_ {
        let k = self.runs.partition_point(|r| r.end() <= first);
        self.runs[k..]
            .iter()
            .take_while(move |r| r.start < last)
            .map(move |r| r.start.max(first)..r.end().min(last))
    }

    /// One hash per chunk (O(disk size): for tests and small disks).
    pub fn to_hashes(&self) -> Vec<[u8; 32]> {
        let mut v = vec![ZERO_HASH; self.chunk_count() as usize];
        for (i, h) in self.data() {
            v[i as usize] = *h;
        }
        v
    }

    fn generation_field(&self) -> [u8; 64] {
        let mut generation = [0u8; 64];
        let g = self.generation.as_bytes();
        let n = g.len().min(64);
        generation[..n].copy_from_slice(&g[..n]);
        generation
    }

    /// Feed the version 2 entries (runs, then hashes) to `out` in pieces.
    fn emit_entries(&self, out: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let mut buf = Vec::with_capacity(PIECE.min(self.runs.len() * RUN_SIZE));
        for r in &self.runs {
            buf.extend_from_slice(&r.start.to_le_bytes());
            buf.extend_from_slice(&r.len.to_le_bytes());
            if buf.len() >= PIECE {
                out(&buf)?;
                buf.clear();
            }
        }
        if !buf.is_empty() {
            out(&buf)?;
        }
        for piece in self.hashes.chunks(PIECE / 32) {
            out(piece.as_flattened())?;
        }
        Ok(())
    }

    /// The version 2 header for this index.
    pub fn header(&self) -> IndexHeaderV2 {
        let mut h = blake3::Hasher::new();
        // hashing cannot fail
        let _ = self.emit_entries(&mut |b| {
            h.update(b);
            Ok(())
        });
        IndexHeaderV2 {
            magic: INDEX_MAGIC,
            version: INDEX_VERSION,
            chunk_size: self.chunk_size,
            disk_size: self.disk_size,
            chunk_count: self.chunk_count(),
            run_count: self.runs.len() as u64,
            data_count: self.hashes.len() as u64,
            entries_checksum: *h.finalize().as_bytes(),
            generation: self.generation_field(),
            header_checksum: [0; 32],
            reserved: [0; INDEX_HEADER_SIZE - 176],
        }
    }

    /// Serialize header and entries (version 2).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.header().encode();
        v.reserve(self.runs.len() * RUN_SIZE + self.hashes.len() * 32);
        let _ = self.emit_entries(&mut |b| {
            v.extend_from_slice(b);
            Ok(())
        });
        v
    }

    /// Serialize as version 1 (one hash per chunk: O(disk size); what older builds
    /// wrote, for tests of reading it).
    pub fn encode_v1(&self) -> Vec<u8> {
        let dense = self.to_hashes();
        let mut sum = blake3::Hasher::new();
        sum.update(dense.as_flattened());
        let h = IndexHeader {
            magic: INDEX_MAGIC_V1,
            version: 1,
            chunk_size: self.chunk_size,
            disk_size: self.disk_size,
            chunk_count: dense.len() as u64,
            entries_checksum: *sum.finalize().as_bytes(),
            generation: self.generation_field(),
            header_checksum: [0; 32],
            reserved: [0; INDEX_HEADER_SIZE - 160],
        };
        let mut v = h.encode();
        v.extend_from_slice(dense.as_flattened());
        v
    }

    /// Parse and check an encoded index (either version).
    pub fn decode(b: &[u8], what: &str) -> Result<FixedIndex> {
        parse(&mut std::io::Cursor::new(b), b.len() as u64, what)
    }

    /// Publish the index at `path` atomically and durably (version 2, written in
    /// pieces); returns its size.
    pub fn write(&self, path: &Path) -> Result<u64> {
        let head = self.header().encode();
        let mut f = AtomicFile::create(path)?;
        f.write_all(&head)?;
        let mut n = head.len() as u64;
        self.emit_entries(&mut |b| {
            n += b.len() as u64;
            f.write_all(b)
        })?;
        f.commit()?;
        Ok(n)
    }

    /// Load and check the index at `path` (either version), reading it in pieces.
    pub fn read(path: &Path) -> Result<FixedIndex> {
        let what = path.display().to_string();
        let f = std::fs::File::open(path).ctx(|| format!("unable to read index {what}"))?;
        let len = f
            .metadata()
            .ctx(|| format!("unable to read index {what}"))?
            .len();
        parse(&mut std::io::BufReader::with_capacity(PIECE, f), len, &what)
    }

    /// What the index references.
    pub fn summary(&self) -> IndexSummary {
        IndexSummary {
            chunk_size: self.chunk_size,
            disk_size: self.disk_size,
            chunks: self.chunk_count(),
            data_chunks: self.data_chunks(),
            data_bytes: self.data_bytes(),
        }
    }
}

/// Read an index of `len` bytes from `r` (see the module notes for what is checked).
fn parse(r: &mut dyn Read, len: u64, what: &str) -> Result<FixedIndex> {
    let bad = |why: &str| crate::err!(Corrupt, "index {what} is corrupt: {why}");
    let read = |r: &mut dyn Read, buf: &mut [u8]| {
        r.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                bad("wrong length")
            } else {
                crate::Error::io(format!("unable to read index {what}"), e)
            }
        })
    };
    if len < INDEX_HEADER_SIZE as u64 {
        return Err(bad(SHORT));
    }
    let mut head = vec![0u8; INDEX_HEADER_SIZE];
    read(r, &mut head)?;
    let mut sum = blake3::Hasher::new();
    let (idx, entries_checksum) = if head[..8] == INDEX_MAGIC_V1 {
        let h = IndexHeader::decode(&head).map_err(bad)?;
        let version = h.version;
        if version != 1 {
            return Err(bad(&format!("unsupported version {version}")));
        }
        let mut idx = FixedIndex::new(gen_string(&h.generation), h.chunk_size, h.disk_size);
        let count = h.chunk_count;
        if h.chunk_size == 0 || count != idx.chunk_count() {
            return Err(bad("chunk count does not match the disk size"));
        }
        let want = count
            .checked_mul(32)
            .and_then(|n| n.checked_add(INDEX_HEADER_SIZE as u64));
        if want != Some(len) {
            return Err(bad("wrong length"));
        }
        let mut buf = vec![0u8; PIECE.min((count * 32) as usize)];
        let mut i = 0u64;
        while i < count {
            let n = ((count - i).min((PIECE / 32) as u64) * 32) as usize;
            read(r, &mut buf[..n])?;
            sum.update(&buf[..n]);
            for e in buf[..n].chunks_exact(32) {
                let mut h = [0u8; 32];
                h.copy_from_slice(e);
                idx.push(i, h)?;
                i += 1;
            }
        }
        (idx, h.entries_checksum)
    } else if head[..8] == INDEX_MAGIC {
        let h = IndexHeaderV2::decode(&head).map_err(bad)?;
        let version = h.version;
        if version != INDEX_VERSION {
            return Err(bad(&format!("unsupported version {version}")));
        }
        let mut idx = FixedIndex::new(gen_string(&h.generation), h.chunk_size, h.disk_size);
        let (count, runs, data) = (h.chunk_count, h.run_count, h.data_count);
        if h.chunk_size == 0 || count != idx.chunk_count() {
            return Err(bad("chunk count does not match the disk size"));
        }
        if runs > data || data > count {
            return Err(bad("more runs or data chunks than chunks"));
        }
        let want = runs
            .checked_mul(RUN_SIZE as u64)
            .and_then(|a| data.checked_mul(32).and_then(|b| a.checked_add(b)))
            .and_then(|n| n.checked_add(INDEX_HEADER_SIZE as u64));
        if want != Some(len) {
            return Err(bad("wrong length"));
        }
        // Both bounded by the length just checked; grown as the bytes arrive.
        idx.runs
            .reserve(runs.min((PIECE / RUN_SIZE) as u64) as usize);
        idx.hashes.reserve(data.min((PIECE / 32) as u64) as usize);
        let mut buf = vec![0u8; PIECE.min((runs * RUN_SIZE as u64).max(data * 32) as usize)];
        let (mut k, mut at) = (0u64, 0u64);
        while k < runs {
            let n = ((runs - k).min((PIECE / RUN_SIZE) as u64) * RUN_SIZE as u64) as usize;
            read(r, &mut buf[..n])?;
            sum.update(&buf[..n]);
            for e in buf[..n].chunks_exact(RUN_SIZE) {
                let mut d = Decoder::new(e);
                let (start, rlen) = (d.u64().unwrap_or(0), d.u64().unwrap_or(0));
                let after = idx.runs.last().map_or(0, |p| p.end().saturating_add(1));
                let end = start.checked_add(rlen).filter(|&e| e <= count);
                if rlen == 0 || start < after || end.is_none() {
                    return Err(bad(&format!(
                        "data run {k} is empty, out of order or past the disk"
                    )));
                }
                idx.runs.push(Run {
                    start,
                    len: rlen,
                    at,
                });
                // at ≤ data ≤ count: no overflow
                at += rlen;
                if at > data {
                    return Err(bad("the runs cover more chunks than the hashes"));
                }
                k += 1;
            }
        }
        if at != data {
            return Err(bad("the runs cover fewer chunks than the hashes"));
        }
        let mut i = 0u64;
        while i < data {
            let n = ((data - i).min((PIECE / 32) as u64) * 32) as usize;
            read(r, &mut buf[..n])?;
            sum.update(&buf[..n]);
            for e in buf[..n].chunks_exact(32) {
                let mut h = [0u8; 32];
                h.copy_from_slice(e);
                if h == ZERO_HASH {
                    return Err(bad("a data run holds the zero hash"));
                }
                idx.hashes.push(h);
                i += 1;
            }
        }
        (idx, h.entries_checksum)
    } else {
        return Err(bad("bad magic"));
    };
    let mut extra = [0u8; 1];
    if r.read(&mut extra)
        .ctx(|| format!("unable to read index {what}"))?
        != 0
    {
        return Err(bad("wrong length"));
    }
    if *sum.finalize().as_bytes() != entries_checksum {
        return Err(bad("entries checksum mismatch"));
    }
    Ok(idx)
}

fn gen_string(g: &[u8; 64]) -> String {
    let end = g.iter().position(|&c| c == 0).unwrap_or(64);
    String::from_utf8_lossy(&g[..end]).into_owned()
}

/// What an index references (see [`summarize`]).
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

/// Count what the index at `path` references. Read and checked as by
/// [`FixedIndex::read`] (in pieces; held in memory only as its data runs).
pub fn summarize(path: &Path) -> Result<IndexSummary> {
    Ok(FixedIndex::read(path)?.summary())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> FixedIndex {
        FixedIndex::from_hashes(
            "20261125T232732.123Z-0011aabb",
            1 << 20,
            (3 << 20) + 5,
            &[[0u8; 32], [1u8; 32], [2u8; 32], [0xffu8; 32]],
        )
        .unwrap()
    }

    #[test]
    fn header_bytes_are_pinned() {
        let b = sample().encode_v1();
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
    fn v2_bytes_are_pinned() {
        let b = sample().encode();
        // one run (chunks 1..4), three hashes
        assert_eq!(b.len(), INDEX_HEADER_SIZE + RUN_SIZE + 3 * 32);
        let expect_head: &[u8] = b"CSNPIX02\
            \x02\x00\x00\x00\
            \x00\x00\x10\x00\
            \x05\x00\x30\x00\x00\x00\x00\x00\
            \x04\x00\x00\x00\x00\x00\x00\x00\
            \x01\x00\x00\x00\x00\x00\x00\x00\
            \x03\x00\x00\x00\x00\x00\x00\x00";
        assert_eq!(&b[..48], expect_head);
        assert_eq!(&b[80..109], b"20261125T232732.123Z-0011aabb");
        assert!(b[109..144].iter().all(|&c| c == 0));
        assert!(b[176..INDEX_HEADER_SIZE].iter().all(|&c| c == 0));
        let body = &b[INDEX_HEADER_SIZE..];
        assert_eq!(&body[..8], &1u64.to_le_bytes());
        assert_eq!(&body[8..16], &3u64.to_le_bytes());
        assert_eq!(&body[16..48], &[1u8; 32]);
        assert_eq!(&body[80..112], &[0xffu8; 32]);
        assert_eq!(
            &b[48..80],
            blake3::hash(body).as_bytes(),
            "entries checksum"
        );
        assert_eq!(
            &b[144..176],
            blake3::hash(&b[..144]).as_bytes(),
            "header checksum"
        );
        assert_eq!(
            crate::fsutil::hex(&b[144..176]),
            PINNED_V2_HEADER_SUM,
            "header checksum"
        );
        assert_eq!(FixedIndex::decode(&b, "x").unwrap(), sample());
    }

    const PINNED_V2_HEADER_SUM: &str =
        "cb741779c28f399eb59beacefff87970565560934afcb0ace38020420d1250f7";

    #[test]
    fn damage_is_refused() {
        for (b, body) in [
            (sample().encode_v1(), INDEX_HEADER_SIZE + 33),
            (sample().encode(), INDEX_HEADER_SIZE + 3),
            (sample().encode(), INDEX_HEADER_SIZE + 9),
            (sample().encode(), INDEX_HEADER_SIZE + 40),
        ] {
            for pos in [0usize, 9, 17, 40, 50, 70, 100, 140, 150, body] {
                let mut c = b.clone();
                c[pos] ^= 0x40;
                assert!(FixedIndex::decode(&c, "x").is_err(), "flip at {pos}");
            }
            assert!(FixedIndex::decode(&b[..b.len() - 1], "x").is_err());
            let mut longer = b.clone();
            longer.push(0);
            assert!(FixedIndex::decode(&longer, "x").is_err());
            assert!(FixedIndex::decode(&b[..100], "x").is_err());
        }
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("g.idx");
        let n = sample().write(&p).unwrap();
        assert_eq!(n, std::fs::metadata(&p).unwrap().len());
        assert_eq!(FixedIndex::read(&p).unwrap(), sample());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        std::fs::write(&p, sample().encode_v1()).unwrap();
        assert_eq!(FixedIndex::read(&p).unwrap(), sample(), "version 1 is read");
    }

    /// Re-seal a v2 header after changing its fields (so only the body checks remain).
    fn reseal_v2(b: &mut [u8]) {
        let sum = *blake3::hash(&b[..144]).as_bytes();
        b[144..176].copy_from_slice(&sum);
    }

    fn reseal_entries_v2(b: &mut [u8]) {
        let sum = *blake3::hash(&b[INDEX_HEADER_SIZE..]).as_bytes();
        b[48..80].copy_from_slice(&sum);
        reseal_v2(b);
    }

    #[test]
    fn huge_claims_are_refused_before_allocating() {
        // a 16 EiB disk of 4 KiB chunks claiming 2^50 runs and hashes: the length does
        // not match, so nothing is allocated (an allocation of that size would abort)
        let mut idx = FixedIndex::new("g", 4096, u64::MAX - 4096);
        idx.push(5, [7; 32]).unwrap();
        let mut b = idx.encode();
        b[24..32].copy_from_slice(&chunk_count(u64::MAX - 4096, 4096).to_le_bytes());
        for (runs, data) in [(1u64 << 50, 1u64 << 50), (1, 1 << 58), (u64::MAX, u64::MAX)] {
            let mut c = b.clone();
            c[32..40].copy_from_slice(&runs.to_le_bytes());
            c[40..48].copy_from_slice(&data.to_le_bytes());
            reseal_v2(&mut c);
            let e = FixedIndex::decode(&c, "x").unwrap_err().to_string();
            assert!(e.contains("length") || e.contains("more runs"), "{e}");
        }
        // version 1: a huge chunk count
        let mut v1 = sample().encode_v1();
        v1[16..24].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        v1[24..32].copy_from_slice(&((u64::MAX / 2).div_ceil(1 << 20)).to_le_bytes());
        let sum = *blake3::hash(&v1[..128]).as_bytes();
        v1[128..160].copy_from_slice(&sum);
        let e = FixedIndex::decode(&v1, "x").unwrap_err().to_string();
        assert!(e.contains("wrong length"), "{e}");
        // a file whose header claims more than it holds
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("g.idx");
        let mut c = b.clone();
        c[40..48].copy_from_slice(&(1u64 << 40).to_le_bytes());
        reseal_v2(&mut c);
        std::fs::write(&p, &c).unwrap();
        assert!(FixedIndex::read(&p).is_err());
    }

    #[test]
    fn non_canonical_runs_are_refused() {
        let idx = FixedIndex::from_hashes("g", 4096, 10 * 4096, &{
            let mut v = [ZERO_HASH; 10];
            v[2] = [1; 32];
            v[3] = [2; 32];
            v[7] = [3; 32];
            v
        })
        .unwrap();
        let b = idx.encode();
        assert_eq!(b.len(), INDEX_HEADER_SIZE + 2 * RUN_SIZE + 3 * 32);
        assert_eq!(FixedIndex::decode(&b, "x").unwrap(), idx);
        let run = |c: &mut Vec<u8>, k: usize, start: u64, len: u64| {
            let o = INDEX_HEADER_SIZE + k * RUN_SIZE;
            c[o..o + 8].copy_from_slice(&start.to_le_bytes());
            c[o + 8..o + 16].copy_from_slice(&len.to_le_bytes());
            reseal_entries_v2(c);
        };
        let cases: [(usize, u64, u64, &str); 5] = [
            (1, 4, 1, "touching"),
            (1, 3, 1, "overlapping"),
            (1, 1, 1, "out of order"),
            (1, 10, 1, "past the disk"),
            (0, 2, 0, "empty"),
        ];
        for (k, start, len, what) in cases {
            let mut c = b.clone();
            run(&mut c, k, start, len);
            assert!(FixedIndex::decode(&c, "x").is_err(), "{what}");
        }
        // a zero hash inside a run
        let mut c = b.clone();
        let o = INDEX_HEADER_SIZE + 2 * RUN_SIZE + 32;
        c[o..o + 32].copy_from_slice(&ZERO_HASH);
        reseal_entries_v2(&mut c);
        let e = FixedIndex::decode(&c, "x").unwrap_err().to_string();
        assert!(e.contains("zero hash"), "{e}");
        // the runs' lengths disagree with the hash count
        let mut c = b.clone();
        run(&mut c, 1, 7, 2);
        assert!(FixedIndex::decode(&c, "x").is_err());
    }

    fn index_strategy() -> impl Strategy<Value = FixedIndex> {
        (
            1u64..300,
            prop::sample::select(vec![512u32, 4096, 1 << 20]),
            0u32..3,
        )
            .prop_flat_map(|(chunks, cs, tail)| {
                let disk = chunks * u64::from(cs) - u64::from(tail);
                (
                    Just(cs),
                    Just(disk),
                    prop::collection::vec(
                        prop_oneof![3 => Just(0u8), 1 => 1u8..=255],
                        chunks as usize,
                    ),
                )
            })
            .prop_map(|(cs, disk, fill)| {
                let hashes: Vec<[u8; 32]> = fill
                    .iter()
                    .map(|&b| if b == 0 { ZERO_HASH } else { [b; 32] })
                    .collect();
                FixedIndex::from_hashes("20261207T000000.000Z-00000001", cs, disk, &hashes).unwrap()
            })
    }

    proptest! {
        #[test]
        fn v1_and_v2_round_trip(idx in index_strategy()) {
            let v2 = idx.encode();
            let back = FixedIndex::decode(&v2, "x").unwrap();
            prop_assert_eq!(&back, &idx);
            prop_assert_eq!(back.encode(), v2.clone());
            let v1 = idx.encode_v1();
            prop_assert_eq!(&FixedIndex::decode(&v1, "x").unwrap(), &idx);
            let dense = idx.to_hashes();
            for (i, h) in dense.iter().enumerate() {
                prop_assert_eq!(idx.hash(i as u64), h);
            }
            prop_assert_eq!(idx.hash(dense.len() as u64), &ZERO_HASH);
            let data: u64 = dense.iter().filter(|h| **h != ZERO_HASH).count() as u64;
            prop_assert_eq!(idx.data_chunks(), data);
            prop_assert_eq!(v2.len() as u64, (INDEX_HEADER_SIZE as u64) + idx.data_runs().count() as u64 * 16 + data * 32);
            let bytes: u64 = (0..dense.len() as u64)
                .filter(|&i| dense[i as usize] != ZERO_HASH)
                .map(|i| idx.chunk_len(i) as u64)
                .sum();
            prop_assert_eq!(idx.data_bytes(), bytes);
            let n = dense.len() as u64;
            let (a, b) = (n / 3, n - n / 4);
            let clipped: Vec<u64> = idx.data_runs_in(a, b).flatten().collect();
            let want: Vec<u64> = (a..b).filter(|&i| dense[i as usize] != ZERO_HASH).collect();
            prop_assert_eq!(clipped, want);
        }
    }

    #[test]
    fn a_disk_ending_near_u64_max_counts_its_last_chunk() {
        let (ds, cs) = (u64::MAX - 5, 1u32 << 31);
        let mut idx = FixedIndex::new("g", cs, ds);
        let last = idx.chunk_count() - 1;
        idx.push(last, [1; 32]).unwrap();
        assert_eq!(idx.data_bytes(), ds - last * u64::from(cs));
        assert_eq!(idx.chunk_len(last) as u64, idx.data_bytes());
        assert_eq!(FixedIndex::decode(&idx.encode(), "x").unwrap(), idx);
        // one-byte chunks: the last run ends at u64::MAX, a run after it is refused
        let mut idx = FixedIndex::new("g", 1, u64::MAX);
        idx.push(u64::MAX - 1, [1; 32]).unwrap();
        let mut b = idx.encode();
        assert_eq!(FixedIndex::decode(&b, "x").unwrap(), idx);
        b[32..40].copy_from_slice(&2u64.to_le_bytes());
        b[40..48].copy_from_slice(&2u64.to_le_bytes());
        let run2: Vec<u8> = [u64::MAX.to_le_bytes(), 1u64.to_le_bytes()].concat();
        b.splice(
            INDEX_HEADER_SIZE + RUN_SIZE..INDEX_HEADER_SIZE + RUN_SIZE,
            run2,
        );
        b.extend_from_slice(&[2; 32]);
        reseal_entries_v2(&mut b);
        assert!(FixedIndex::decode(&b, "x").is_err());
    }

    #[test]
    fn a_sparse_16_tib_index_is_small() {
        let mut idx = FixedIndex::new("g", 1 << 20, 16 << 40);
        for k in 0..16u64 {
            for i in 0..4 {
                idx.push(k * (1 << 20) + (1 << 18) + i, [k as u8 + 1; 32])
                    .unwrap();
            }
        }
        let b = idx.encode();
        assert_eq!(b.len(), INDEX_HEADER_SIZE + 16 * RUN_SIZE + 64 * 32);
        let back = FixedIndex::decode(&b, "x").unwrap();
        assert_eq!(back.chunk_count(), 16 << 20);
        assert_eq!(back.data_bytes(), 64 << 20);
        assert_eq!(back.hash((1 << 20) + (1 << 18) + 3), &[2; 32]);
        assert_eq!(back.hash((1 << 20) + (1 << 18) + 4), &ZERO_HASH);
        assert!(idx.push(3, [1; 32]).is_err(), "out of order");
        assert!(idx.push(16 << 20, [1; 32]).is_err(), "past the disk");
    }

    #[test]
    fn summarize_counts_data_chunks() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("g.idx");
        for bytes in [sample().encode(), sample().encode_v1()] {
            std::fs::write(&p, &bytes).unwrap();
            let s = summarize(&p).unwrap();
            assert_eq!(s.chunks, 4);
            assert_eq!(s.data_chunks, 3, "one zero entry");
            assert_eq!(
                s.data_bytes,
                (2 << 20) + 5,
                "two whole chunks and the 5-byte tail"
            );
            // damage is found as by read()
            let mut b = bytes.clone();
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
}
