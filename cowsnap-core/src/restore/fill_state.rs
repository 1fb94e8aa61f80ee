//! The live restore's fill state file: its format and the one read that needs no
//! fill running ([`read_fill_state`]).
//!
//! Layout: a 4096-byte header (`FillHeader`: magic `CSNPFL01`, version, flags
//! complete / abandoned, the disk's size and chunk size, the chunk count, the
//! generation id, a blake3 checksum of the fields before it), then the "restored"
//! bitmap, one bit per repository chunk, little-endian 64-bit words, written in
//! 4096-byte blocks. [`super::live`] owns the rules (when a bit may be set, when the
//! header says complete); this module only encodes and decodes, so a repository pin
//! can check a fill's state without depending on the fill (`repo::pin`).

use crate::error::Result;
use crate::ondisk::{Decoder, Encoder};
use std::path::Path;

/// The header's magic.
pub(crate) const MAGIC: [u8; 8] = *b"CSNPFL01";
/// The fill state format version written and read.
pub const FILL_VERSION: u32 = 1;
/// Bytes of the header; the bitmap starts here.
pub(crate) const HEADER: u64 = 4096;
/// The bitmap is written in blocks of this many bytes.
pub(crate) const BLOCK: u64 = 4096;
/// Header flag: every chunk is restored.
pub(crate) const FLAG_COMPLETE: u32 = 1;
/// Header flag: the fill was abandoned (partial data).
pub(crate) const FLAG_ABANDONED: u32 = 2;

/// The state file header: its fields in order, little endian ([`crate::ondisk`]);
/// 4096 bytes on disk.
#[repr(C)]
pub(crate) struct FillHeader {
    pub(crate) magic: [u8; 8],
    pub(crate) version: u32,
    pub(crate) flags: u32,
    pub(crate) disk_size: u64,
    pub(crate) chunk_size: u32,
    pub(crate) _pad: u32,
    pub(crate) nchunks: u64,
    pub(crate) generation: [u8; 64],
    pub(crate) checksum: [u8; 32],
}

const _: () = assert!(std::mem::size_of::<FillHeader>() == 136);

impl FillHeader {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new(HEADER as usize);
        e.bytes(&self.magic)
            .u32(self.version)
            .u32(self.flags)
            .u64(self.disk_size)
            .u32(self.chunk_size)
            .u32(self._pad)
            .u64(self.nchunks)
            .bytes(&self.generation);
        let sum = blake3::hash(e.written());
        e.bytes(sum.as_bytes());
        e.finish(HEADER as usize)
    }

    pub(crate) fn decode(b: &[u8]) -> Option<FillHeader> {
        let mut d = Decoder::new(b);
        let magic = d.array()?;
        if magic != MAGIC {
            return None;
        }
        let (version, flags, disk_size, chunk_size, _pad) =
            (d.u32()?, d.u32()?, d.u64()?, d.u32()?, d.u32()?);
        let nchunks = d.u64()?;
        let generation = d.array()?;
        let body = d.read();
        let checksum: [u8; 32] = d.array()?;
        // A version this build does not know is unreadable, like a bad checksum.
        if blake3::hash(body).as_bytes()[..] != checksum || version != FILL_VERSION {
            return None;
        }
        Some(FillHeader {
            magic,
            version,
            flags,
            disk_size,
            chunk_size,
            _pad: 0,
            nchunks,
            generation,
            checksum,
        })
    }
}

/// What a fill state file says: the generation and whether the fill is finished
/// (completed, or abandoned: either way nothing is left to resume). `Ok(None)` when
/// there is no state file; an unreadable one is an error.
pub fn read_fill_state(state_path: &Path) -> Result<Option<(String, bool)>> {
    let sp = state_path.display();
    let b = match std::fs::read(state_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(crate::Error::io(
                format!("unable to read fill state {sp}"),
                e,
            ))
        }
    };
    let h = FillHeader::decode(&b)
        .ok_or_else(|| crate::err!(Corrupt, "fill state {sp} is unreadable"))?;
    let generation = String::from_utf8_lossy(&h.generation)
        .trim_end_matches('\0')
        .to_string();
    Ok(Some((
        generation,
        h.flags & (FLAG_COMPLETE | FLAG_ABANDONED) != 0,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_header_is_pinned() {
        let mut generation = [0u8; 64];
        generation[..4].copy_from_slice(b"G123");
        let h = FillHeader {
            magic: MAGIC,
            version: FILL_VERSION,
            flags: FLAG_COMPLETE,
            disk_size: 0x0102_0304_0506_0708,
            chunk_size: 1 << 20,
            _pad: 0,
            nchunks: 7,
            generation,
            checksum: [0; 32],
        };
        let b = h.encode();
        assert_eq!(b.len(), HEADER as usize);
        assert_eq!(&b[..8], b"CSNPFL01");
        assert_eq!(&b[8..12], &[1, 0, 0, 0]);
        assert_eq!(&b[12..16], &[1, 0, 0, 0]);
        assert_eq!(&b[16..24], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[24..28], &[0, 0, 0x10, 0]);
        assert_eq!(&b[28..32], &[0; 4]);
        assert_eq!(&b[32..40], &[7, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[40..44], b"G123");
        assert!(b[44..104].iter().all(|&x| x == 0));
        assert_eq!(&b[104..136], blake3::hash(&b[..104]).as_bytes());
        assert!(b[136..].iter().all(|&x| x == 0));
        let d = FillHeader::decode(&b).unwrap();
        assert_eq!((d.flags, d.disk_size, d.nchunks), (1, h.disk_size, 7));
        assert_eq!(d.generation, generation);
        let mut torn = b.clone();
        torn[20] ^= 1;
        assert!(FillHeader::decode(&torn).is_none());
        assert!(FillHeader::decode(&b[..135]).is_none());
    }
}
