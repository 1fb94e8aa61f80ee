//! Content-addressed chunk store: `chunks/ab/<64 hex>`, named by the blake3 hash of
//! the uncompressed data.
//!
//! Chunk file: a 16-byte header (`CSCK`, version 1, encoding 0 = raw / 1 = zstd,
//! 2 reserved bytes, raw length u32 LE, stored length u32 LE) and the payload. A chunk
//! is compressed with zstd (level [`ZSTD_LEVEL`]) and stored raw when that does not
//! shrink it. Files are written under a temporary name, `fdatasync`ed and renamed, so
//! a name never points at partial data; callers fsync the touched `ab/` directories
//! (see [`ChunkStore::sync_dirs`]) before publishing an index that references them.
//! The all-zero chunk is never stored: indexes carry [`ZERO_HASH`] for it.
//!
//! Dedup: a chunk whose file already exists is not written again. Concurrent writers
//! of the same chunk each write their own temporary file and rename it; both renames
//! install identical content.

use crate::error::{Error, IoContext, Result};
use crate::fsutil::{self, hex};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Reserved hash for an all-zero chunk (never stored).
pub const ZERO_HASH: [u8; 32] = [0u8; 32];
/// zstd level used for chunks.
pub const ZSTD_LEVEL: i32 = 1;
const MAGIC: [u8; 4] = *b"CSCK";
const HDR: usize = 16;
/// Marks "a subdirectory was created" in the touched set: the parent needs a sync.
const PARENT: u16 = 256;

/// Whether every byte is zero.
pub fn is_zero(data: &[u8]) -> bool {
    let (pre, mid, post) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the
        // aligned middle of the byte slice, which stays borrowed from `data`.
        unsafe { data.align_to::<u64>() }
    };
    pre.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

/// The hash an index records for `data` (the zero hash for zeros).
pub fn chunk_hash(data: &[u8]) -> [u8; 32] {
    if is_zero(data) {
        ZERO_HASH
    } else {
        *blake3::hash(data).as_bytes()
    }
}

/// The chunks directory of a repository.
pub struct ChunkStore {
    dir: PathBuf,
    touched: Mutex<BTreeSet<u16>>,
}

/// One file found in the store: its hash (`None` for a stray temporary file), path
/// and size in bytes.
pub type StoredFile = (Option<[u8; 32]>, PathBuf, u64);

/// Result of storing one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    /// Written now; bytes on disk (header included).
    New(u64),
    /// Already present.
    Reused,
}

impl ChunkStore {
    /// The store under `dir` (`DIR/chunks`).
    pub fn new(dir: &Path) -> Self {
        ChunkStore {
            dir: dir.to_path_buf(),
            touched: Mutex::new(BTreeSet::new()),
        }
    }

    /// Path of a chunk.
    pub fn path_of(&self, hash: &[u8; 32]) -> PathBuf {
        let h = hex(hash);
        self.dir.join(&h[..2]).join(h)
    }

    /// Store `data` under `hash` (the caller computed it) unless already present.
    pub fn insert(&self, hash: &[u8; 32], data: &[u8]) -> Result<Insert> {
        let path = self.path_of(hash);
        if path.exists() {
            return Ok(Insert::Reused);
        }
        let sub = path.parent().unwrap_or(&self.dir);
        if !sub.exists() {
            std::fs::create_dir_all(sub)
                .ctx(|| format!("unable to create chunk directory {}", sub.display()))?;
            self.touched
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(PARENT);
        }
        let compressed = zstd::bulk::compress(data, ZSTD_LEVEL)
            .ctx(|| format!("unable to compress chunk {}", hex(hash)))?;
        let (enc, payload): (u8, &[u8]) = if compressed.len() < data.len() {
            (1, &compressed)
        } else {
            (0, data)
        };
        let mut hdr = [0u8; HDR];
        hdr[..4].copy_from_slice(&MAGIC);
        hdr[4] = 1;
        hdr[5] = enc;
        hdr[8..12].copy_from_slice(&(data.len() as u32).to_le_bytes());
        hdr[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut f = fsutil::AtomicFile::create(&path)?;
        let name = path.display().to_string();
        f.file()
            .write_all(&hdr)
            .and_then(|_| f.file().write_all(payload))
            .ctx(|| format!("unable to write chunk {name}"))?;
        f.commit_no_dir_sync()?;
        self.touched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(hash[0] as u16);
        Ok(Insert::New((HDR + payload.len()) as u64))
    }

    /// fsync every chunk directory a rename went into since the last call.
    pub fn sync_dirs(&self) -> Result<()> {
        let touched = std::mem::take(&mut *self.touched.lock().unwrap_or_else(|p| p.into_inner()));
        for b in touched.iter().filter(|&&b| b != PARENT) {
            let d = self.dir.join(hex(&[*b as u8]));
            fsutil::fsync_dir(&d)?;
        }
        if touched.contains(&PARENT) {
            fsutil::fsync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Read a chunk and check it: decodes, has `expect_len` bytes, hashes to `hash`.
    pub fn read(&self, hash: &[u8; 32], expect_len: usize) -> Result<Vec<u8>> {
        if *hash == ZERO_HASH {
            return Ok(vec![0u8; expect_len]);
        }
        let path = self.path_of(hash);
        let raw = std::fs::read(&path)
            .map_err(|e| Error::io(format!("unable to read chunk {}", path.display()), e))?;
        let bad = |why: &str| crate::err!(Corrupt, "chunk {} is corrupt: {why}", hex(hash));
        if raw.len() < HDR || raw[..4] != MAGIC || raw[4] != 1 {
            return Err(bad("bad header"));
        }
        let raw_len = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]) as usize;
        let stored_len = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]) as usize;
        if stored_len != raw.len() - HDR {
            return Err(bad("truncated"));
        }
        if raw_len != expect_len {
            return Err(bad(&format!(
                "holds {raw_len} bytes, expected {expect_len}"
            )));
        }
        let data = match raw[5] {
            0 => raw[HDR..].to_vec(),
            1 => zstd::bulk::decompress(&raw[HDR..], raw_len)
                .map_err(|e| bad(&format!("does not decompress: {e}")))?,
            e => return Err(bad(&format!("unknown encoding {e}"))),
        };
        if data.len() != raw_len || blake3::hash(&data).as_bytes() != hash {
            return Err(bad("content does not match its hash"));
        }
        Ok(data)
    }

    /// Every stored chunk: (hash, path, size in bytes). Stray temporary files are
    /// returned as `None` hashes.
    pub fn walk(&self) -> Result<Vec<StoredFile>> {
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => {
                return Err(Error::io(
                    format!("unable to list {}", self.dir.display()),
                    e,
                ))
            }
        };
        for sub in rd {
            let sub = sub.ctx(|| format!("unable to list {}", self.dir.display()))?;
            if !sub.path().is_dir() {
                continue;
            }
            for f in std::fs::read_dir(sub.path())
                .ctx(|| format!("unable to list {}", sub.path().display()))?
            {
                let f = f.ctx(|| format!("unable to list {}", sub.path().display()))?;
                let name = f.file_name().to_string_lossy().into_owned();
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                out.push((fsutil::parse_hash(&name), f.path(), len));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_and_read_back_both_encodings() {
        let d = tempfile::tempdir().unwrap();
        let s = ChunkStore::new(d.path());
        let text = vec![b'a'; 100_000];
        let h = chunk_hash(&text);
        assert!(matches!(s.insert(&h, &text).unwrap(), Insert::New(n) if n < 1000));
        assert_eq!(s.insert(&h, &text).unwrap(), Insert::Reused);
        let mut rnd = vec![0u8; 65536];
        let mut x: u64 = 88172645463325252;
        for b in rnd.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let h2 = chunk_hash(&rnd);
        assert_eq!(s.insert(&h2, &rnd).unwrap(), Insert::New(65536 + 16));
        s.sync_dirs().unwrap();
        assert_eq!(s.read(&h, text.len()).unwrap(), text);
        assert_eq!(s.read(&h2, rnd.len()).unwrap(), rnd);
        assert!(s.read(&h2, 100).is_err());
        assert_eq!(chunk_hash(&[0u8; 4096]), ZERO_HASH);
        assert_eq!(s.walk().unwrap().len(), 2);
        // corrupt the raw one
        let p = s.path_of(&h2);
        let mut b = std::fs::read(&p).unwrap();
        b[1000] ^= 1;
        std::fs::write(&p, b).unwrap();
        let e = s.read(&h2, rnd.len()).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Corrupt);
    }
}
