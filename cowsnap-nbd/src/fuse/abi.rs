//! The parts of the kernel's FUSE protocol (`include/uapi/linux/fuse.h`, protocol 7.31)
//! a one-file filesystem needs: request parsing and reply encoding, native byte order,
//! no `unsafe`. Every parser checks the length it was given.

/// Protocol major version spoken.
pub const KERNEL_VERSION: u32 = 7;
/// Protocol minor version answered (at most; the kernel's if lower).
pub const KERNEL_MINOR: u32 = 31;

/// Size of `fuse_in_header`.
pub const IN_HEADER: usize = 40;
/// Size of `fuse_out_header`.
pub const OUT_HEADER: usize = 16;

/// Opcodes (`enum fuse_opcode`).
pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
}

/// `fuse_init_out.flags` bits this server asks for (granted only if offered).
pub mod init {
    pub const ASYNC_READ: u32 = 1 << 0;
    pub const BIG_WRITES: u32 = 1 << 5;
    pub const ASYNC_DIO: u32 = 1 << 15;
    pub const PARALLEL_DIROPS: u32 = 1 << 18;
    pub const MAX_PAGES: u32 = 1 << 22;
}

/// `fuse_open_out.open_flags`: bypass the page cache for this file.
pub const FOPEN_DIRECT_IO: u32 = 1 << 0;
/// `fuse_open_out.open_flags`: direct writes need not take the inode lock exclusively.
pub const FOPEN_PARALLEL_DIRECT_WRITES: u32 = 1 << 6;

/// `fuse_setattr_in.valid`: mode, uid, gid, size.
pub const FATTR_MODE: u32 = 1 << 0;
pub const FATTR_UID: u32 = 1 << 1;
pub const FATTR_GID: u32 = 1 << 2;
pub const FATTR_SIZE: u32 = 1 << 3;

/// `fallocate(2)` modes.
pub const FALLOC_FL_KEEP_SIZE: u32 = 0x01;
pub const FALLOC_FL_PUNCH_HOLE: u32 = 0x02;
pub const FALLOC_FL_ZERO_RANGE: u32 = 0x10;

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

/// `fuse_in_header`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
}

impl InHeader {
    /// Parse the header of a request of `b.len()` bytes; `None` if short or if its
    /// length field disagrees with what was read.
    pub fn parse(b: &[u8]) -> Option<InHeader> {
        let h = InHeader {
            len: u32_at(b, 0)?,
            opcode: u32_at(b, 4)?,
            unique: u64_at(b, 8)?,
            nodeid: u64_at(b, 16)?,
        };
        let _ = u16_at(b, 36)?; // total_extlen: the header is whole
        (h.len as usize == b.len()).then_some(h)
    }
}

/// `fuse_init_in` (the fields used).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitIn {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u32,
}

impl InitIn {
    pub fn parse(b: &[u8]) -> Option<InitIn> {
        Some(InitIn {
            major: u32_at(b, 0)?,
            minor: u32_at(b, 4)?,
            max_readahead: u32_at(b, 8)?,
            flags: u32_at(b, 12)?,
        })
    }
}

/// `fuse_init_out` (64 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitOut {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u32,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_write: u32,
    pub time_gran: u32,
    pub max_pages: u16,
}

impl InitOut {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.major.to_ne_bytes());
        out.extend_from_slice(&self.minor.to_ne_bytes());
        out.extend_from_slice(&self.max_readahead.to_ne_bytes());
        out.extend_from_slice(&self.flags.to_ne_bytes());
        out.extend_from_slice(&self.max_background.to_ne_bytes());
        out.extend_from_slice(&self.congestion_threshold.to_ne_bytes());
        out.extend_from_slice(&self.max_write.to_ne_bytes());
        out.extend_from_slice(&self.time_gran.to_ne_bytes());
        out.extend_from_slice(&self.max_pages.to_ne_bytes());
        out.extend_from_slice(&0u16.to_ne_bytes()); // map_alignment
        out.extend_from_slice(&[0u8; 32]); // flags2, max_stack_depth, unused[6]
    }
}

/// `fuse_attr` (88 bytes): what `stat` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub time: u64,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Attr {
    pub fn encode(&self, out: &mut Vec<u8>) {
        for v in [
            self.ino,
            self.size,
            self.size.div_ceil(512),
            self.time,
            self.time,
            self.time,
        ] {
            out.extend_from_slice(&v.to_ne_bytes());
        }
        for v in [
            0u32, // atimensec
            0,    // mtimensec
            0,    // ctimensec
            self.mode, self.nlink, self.uid, self.gid, 0,    // rdev
            4096, // blksize
            0,    // flags
        ] {
            out.extend_from_slice(&v.to_ne_bytes());
        }
    }
}

/// `fuse_entry_out` (128 bytes).
pub fn entry_out(attr: &Attr, valid_secs: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(&attr.ino.to_ne_bytes()); // nodeid
    out.extend_from_slice(&0u64.to_ne_bytes()); // generation
    out.extend_from_slice(&valid_secs.to_ne_bytes()); // entry_valid
    out.extend_from_slice(&valid_secs.to_ne_bytes()); // attr_valid
    out.extend_from_slice(&[0u8; 8]); // entry_valid_nsec, attr_valid_nsec
    attr.encode(out);
}

/// `fuse_attr_out` (104 bytes).
pub fn attr_out(attr: &Attr, valid_secs: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(&valid_secs.to_ne_bytes());
    out.extend_from_slice(&[0u8; 8]); // attr_valid_nsec, dummy
    attr.encode(out);
}

/// `fuse_open_out` (16 bytes).
pub fn open_out(open_flags: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(&0u64.to_ne_bytes()); // fh
    out.extend_from_slice(&open_flags.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
}

/// `fuse_write_out` (8 bytes).
pub fn write_out(size: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(&size.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
}

/// `fuse_statfs_out` (80 bytes) for a filesystem of one file of `size` bytes.
pub fn statfs_out(size: u64, out: &mut Vec<u8>) {
    for v in [size.div_ceil(4096), 0, 0, 1, 0] {
        out.extend_from_slice(&v.to_ne_bytes()); // blocks bfree bavail files ffree
    }
    for v in [4096u32, 255, 4096, 0, 0, 0, 0, 0, 0, 0] {
        out.extend_from_slice(&v.to_ne_bytes()); // bsize namelen frsize padding spare[6]
    }
}

/// One `fuse_dirent` (8-byte aligned); false (nothing appended) if it does not fit
/// in `room` bytes.
pub fn dirent(ino: u64, off: u64, kind: u32, name: &[u8], room: usize, out: &mut Vec<u8>) -> bool {
    let len = (24 + name.len()).next_multiple_of(8);
    if len > room {
        return false;
    }
    out.extend_from_slice(&ino.to_ne_bytes());
    out.extend_from_slice(&off.to_ne_bytes());
    out.extend_from_slice(&(name.len() as u32).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(name);
    out.resize(out.len() + len - 24 - name.len(), 0);
    true
}

/// `fuse_open_in.flags`.
pub fn open_flags(b: &[u8]) -> Option<u32> {
    u32_at(b, 0)
}

/// `fuse_getattr_in`, `fuse_setattr_in`: (valid, size).
pub fn setattr_in(b: &[u8]) -> Option<(u32, u64)> {
    let _ = u32_at(b, 84)?; // the whole struct (88 bytes)
    Some((u32_at(b, 0)?, u64_at(b, 16)?))
}

/// `fuse_read_in`: (offset, size).
pub fn read_in(b: &[u8]) -> Option<(u64, u32)> {
    let _ = u32_at(b, 36)?; // the whole struct (40 bytes)
    Some((u64_at(b, 8)?, u32_at(b, 16)?))
}

/// `fuse_write_in` and the data after it: (offset, open flags, data).
pub fn write_in(b: &[u8]) -> Option<(u64, u32, &[u8])> {
    let off = u64_at(b, 8)?;
    let size = u32_at(b, 16)? as usize;
    let flags = u32_at(b, 32)?;
    let data = b.get(40..40 + size)?;
    Some((off, flags, data))
}

/// `fuse_fallocate_in`: (offset, length, mode).
pub fn fallocate_in(b: &[u8]) -> Option<(u64, u64, u32)> {
    let _ = u32_at(b, 28)?;
    Some((u64_at(b, 8)?, u64_at(b, 16)?, u32_at(b, 24)?))
}

/// `fuse_lookup`: the name (NUL-terminated).
pub fn name(b: &[u8]) -> &[u8] {
    b.split(|&c| c == 0).next().unwrap_or(b)
}

/// A reply: `fuse_out_header` then `body`, in one buffer. `error` is 0 or `-errno`.
pub fn out_header(unique: u64, error: i32, body_len: usize, out: &mut [u8]) {
    let len = (OUT_HEADER + body_len) as u32;
    out[0..4].copy_from_slice(&len.to_ne_bytes());
    out[4..8].copy_from_slice(&error.to_ne_bytes());
    out[8..16].copy_from_slice(&unique.to_ne_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(len: u32, opcode: u32, unique: u64, nodeid: u64) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&len.to_ne_bytes());
        b.extend_from_slice(&opcode.to_ne_bytes());
        b.extend_from_slice(&unique.to_ne_bytes());
        b.extend_from_slice(&nodeid.to_ne_bytes());
        b.extend_from_slice(&[0u8; 16]); // uid gid pid extlen padding
        b
    }

    #[test]
    fn header_length_must_match_what_was_read() {
        let mut b = header(48, op::READ, 7, 2);
        b.extend_from_slice(&[0u8; 8]);
        assert_eq!(
            InHeader::parse(&b),
            Some(InHeader {
                len: 48,
                opcode: op::READ,
                unique: 7,
                nodeid: 2
            })
        );
        assert_eq!(InHeader::parse(&b[..47]), None);
        assert_eq!(InHeader::parse(&b[..20]), None);
    }

    #[test]
    fn struct_sizes_are_the_kernels() {
        let a = Attr {
            ino: 2,
            size: 1 << 20,
            time: 1,
            mode: 0o100600,
            nlink: 1,
            uid: 0,
            gid: 0,
        };
        let mut v = Vec::new();
        a.encode(&mut v);
        assert_eq!(v.len(), 88);
        assert_eq!(&v[16..24], &2048u64.to_ne_bytes()); // 512-byte blocks
        v.clear();
        entry_out(&a, 1, &mut v);
        assert_eq!(v.len(), 128);
        v.clear();
        attr_out(&a, 1, &mut v);
        assert_eq!(v.len(), 104);
        v.clear();
        InitOut {
            major: 7,
            minor: 31,
            max_readahead: 0,
            flags: 0,
            max_background: 1,
            congestion_threshold: 1,
            max_write: 1 << 20,
            time_gran: 1,
            max_pages: 256,
        }
        .encode(&mut v);
        assert_eq!(v.len(), 64);
        assert_eq!(&v[20..24], &(1u32 << 20).to_ne_bytes());
        assert_eq!(&v[28..30], &256u16.to_ne_bytes());
        v.clear();
        statfs_out(4096 * 3, &mut v);
        assert_eq!(v.len(), 80);
        assert_eq!(&v[0..8], &3u64.to_ne_bytes());
    }

    #[test]
    fn write_in_takes_exactly_its_data() {
        let mut b = Vec::new();
        b.extend_from_slice(&0u64.to_ne_bytes()); // fh
        b.extend_from_slice(&4096u64.to_ne_bytes());
        b.extend_from_slice(&3u32.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&0u64.to_ne_bytes());
        b.extend_from_slice(&(libc::O_DSYNC as u32).to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(b"abcd");
        let (off, flags, data) = write_in(&b).unwrap();
        assert_eq!(
            (off, flags, data),
            (4096, libc::O_DSYNC as u32, &b"abc"[..])
        );
        // a size past the request is refused, not read past
        assert!(write_in(&b[..42]).is_none());
        assert!(read_in(&b[..39]).is_none());
    }

    #[test]
    fn dirents_are_aligned_and_bounded() {
        let mut v = Vec::new();
        assert!(dirent(2, 3, 8, b"disk", 100, &mut v));
        assert_eq!(v.len(), 32);
        assert!(!dirent(2, 4, 8, b"disk", 31, &mut v));
        assert_eq!(v.len(), 32);
        assert_eq!(name(b"disk\0junk"), b"disk");
    }
}
