//! The parts of the kernel's FUSE protocol (`include/uapi/linux/fuse.h`, protocol 7.31)
//! a one-file filesystem needs: request parsing and reply encoding, native byte order,
//! no `unsafe`. Every parser checks the length it was given.

/// Protocol major version spoken.
pub const KERNEL_VERSION: u32 = 7;
/// Protocol minor version answered (at most; the kernel's if lower).
pub const KERNEL_MINOR: u32 = 31;
/// Protocol minor version answered when FUSE over io_uring is negotiated (the first
/// with `FUSE_OVER_IO_URING`).
pub const URING_MINOR: u32 = 42;

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
    /// `FUSE_INIT_EXT`: `flags2` is valid (in `fuse_init_in` and `fuse_init_out`).
    pub const INIT_EXT: u32 = 1 << 30;
    /// `FUSE_OVER_IO_URING` (bit 41 of the 64-bit flags): bit 9 of `flags2`.
    pub const OVER_IO_URING_FLAGS2: u32 = 1 << (41 - 32);
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

    /// Parse a header whose arguments are not behind it (FUSE over io_uring puts the
    /// op's header and the payload in buffers of their own): the fields only.
    pub fn parse_fields(b: &[u8]) -> Option<InHeader> {
        let _ = u16_at(b, 36)?;
        Some(InHeader {
            len: u32_at(b, 0)?,
            opcode: u32_at(b, 4)?,
            unique: u64_at(b, 8)?,
            nodeid: u64_at(b, 16)?,
        })
    }
}

/// Size of `fuse_write_in`: a WRITE's header, before its data.
pub const WRITE_IN: usize = 40;

/// Split a `/dev/fuse` request body into the op's header (the kernel's first
/// argument) and what follows it (LOOKUP's name, WRITE's data) — the two parts FUSE
/// over io_uring delivers in separate buffers — so both transports call the same
/// handlers.
pub fn split_body(opcode: u32, body: &[u8]) -> (&[u8], &[u8]) {
    match opcode {
        op::LOOKUP => (&[], body),
        op::WRITE => body.split_at(body.len().min(WRITE_IN)),
        _ => (body, &[]),
    }
}

/// `fuse_init_in` (the fields used).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitIn {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u32,
    /// `flags2` when `flags` has `INIT_EXT` (and the kernel sent it), else 0.
    pub flags2: u32,
}

impl InitIn {
    pub fn parse(b: &[u8]) -> Option<InitIn> {
        let flags = u32_at(b, 12)?;
        let flags2 = if flags & init::INIT_EXT != 0 {
            u32_at(b, 16).unwrap_or(0)
        } else {
            0
        };
        Some(InitIn {
            major: u32_at(b, 0)?,
            minor: u32_at(b, 4)?,
            max_readahead: u32_at(b, 8)?,
            flags,
            flags2,
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
    /// Read by the kernel only when `flags` has `INIT_EXT`.
    pub flags2: u32,
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
        out.extend_from_slice(&self.flags2.to_ne_bytes());
        out.extend_from_slice(&[0u8; 28]); // max_stack_depth, request_timeout, unused
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

/// `fuse_write_in` (`arg`) and its data (the first `size` bytes of `data`):
/// (offset, open flags, data).
pub fn write_in<'a>(arg: &[u8], data: &'a [u8]) -> Option<(u64, u32, &'a [u8])> {
    let _ = u32_at(arg, WRITE_IN - 4)?; // the whole struct
    let off = u64_at(arg, 8)?;
    let size = u32_at(arg, 16)? as usize;
    let flags = u32_at(arg, 32)?;
    let data = data.get(..size)?;
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

/// FUSE over io_uring (`include/uapi/linux/fuse.h`, protocol 7.42): the buffers of
/// one ring entry and the command an `IORING_OP_URING_CMD` SQE carries.
pub mod ring {
    use super::{u32_at, u64_at};

    /// `FUSE_URING_IN_OUT_HEADER_SZ`: room for `fuse_in_header` / `fuse_out_header`.
    pub const IN_OUT_HEADER: usize = 128;
    /// `FUSE_URING_OP_IN_OUT_SZ`: room for the op's header (`fuse_write_in`, ...).
    pub const OP_IN_OUT: usize = 128;
    /// Offset of `op_in` in `struct fuse_uring_req_header`.
    pub const OP_IN_AT: usize = IN_OUT_HEADER;
    /// Offset of `ring_ent_in_out` in `struct fuse_uring_req_header`.
    pub const ENT_IN_OUT_AT: usize = IN_OUT_HEADER + OP_IN_OUT;
    /// Size of `struct fuse_uring_ent_in_out`.
    pub const ENT_IN_OUT: usize = 32;
    /// Size of `struct fuse_uring_req_header` (the first iovec of an entry).
    pub const REQ_HEADER: usize = ENT_IN_OUT_AT + ENT_IN_OUT;
    /// Size of `struct fuse_uring_cmd_req` (in the SQE's 80-byte command area).
    pub const CMD_REQ: usize = 24;
    /// `FUSE_URING_IOV_SEGS`: header and payload.
    pub const IOV_SEGS: u32 = 2;
    /// `enum fuse_uring_cmd`.
    pub const CMD_REGISTER: u32 = 1;
    pub const CMD_COMMIT_AND_FETCH: u32 = 2;

    /// The SQE's command area: `struct fuse_uring_cmd_req { u64 flags; u64
    /// commit_id; u16 qid; u8 padding[6]; }`, zero-filled to 80 bytes.
    pub fn cmd_req(qid: u16, commit_id: u64) -> [u8; 80] {
        let mut c = [0u8; 80];
        c[8..16].copy_from_slice(&commit_id.to_ne_bytes());
        c[16..18].copy_from_slice(&qid.to_ne_bytes());
        c
    }

    /// `struct fuse_uring_ent_in_out` (the fields used).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct EntInOut {
        /// Which request a commit answers.
        pub commit_id: u64,
        /// Bytes of the payload buffer used (by the request, then by the reply).
        pub payload_sz: u32,
    }

    impl EntInOut {
        /// From an entry's header buffer (`struct fuse_uring_req_header`).
        pub fn parse(hdr: &[u8]) -> Option<EntInOut> {
            let b = hdr.get(ENT_IN_OUT_AT..ENT_IN_OUT_AT + ENT_IN_OUT)?;
            Some(EntInOut {
                commit_id: u64_at(b, 8)?,
                payload_sz: u32_at(b, 16)?,
            })
        }
    }

    /// Set the reply's payload size in an entry's header buffer; false if the buffer
    /// is not a whole header.
    pub fn set_payload_sz(hdr: &mut [u8], n: u32) -> bool {
        match hdr.get_mut(ENT_IN_OUT_AT + 16..ENT_IN_OUT_AT + 20) {
            Some(b) => {
                b.copy_from_slice(&n.to_ne_bytes());
                true
            }
            None => false,
        }
    }
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
            flags2: init::OVER_IO_URING_FLAGS2,
        }
        .encode(&mut v);
        assert_eq!(v.len(), 64);
        // flags2 at offset 32 (after max_pages and map_alignment)
        assert_eq!(&v[32..36], &(1u32 << 9).to_ne_bytes());
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
        let (arg, data) = split_body(op::WRITE, &b);
        let (off, flags, data) = write_in(arg, data).unwrap();
        assert_eq!(
            (off, flags, data),
            (4096, libc::O_DSYNC as u32, &b"abc"[..])
        );
        // a size past the request is refused, not read past
        let (arg, data) = split_body(op::WRITE, &b[..42]);
        assert!(write_in(arg, data).is_none());
        let (arg, data) = split_body(op::WRITE, &b[..30]);
        assert!(write_in(arg, data).is_none());
        assert_eq!(
            split_body(op::LOOKUP, b"disk\0"),
            (&b""[..], &b"disk\0"[..])
        );
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

    #[test]
    fn ring_layout_is_the_kernels() {
        // struct fuse_uring_req_header { char in_out[128]; char op_in[128];
        //   struct fuse_uring_ent_in_out { u64 flags; u64 commit_id; u32 payload_sz;
        //   u32 padding; u64 reserved; } ring_ent_in_out; }
        assert_eq!(ring::REQ_HEADER, 288);
        assert_eq!(ring::OP_IN_AT, 128);
        assert_eq!(ring::ENT_IN_OUT_AT, 256);
        let mut hdr = vec![0u8; ring::REQ_HEADER];
        hdr[264..272].copy_from_slice(&0x1234_5678_9abc_u64.to_ne_bytes());
        hdr[272..276].copy_from_slice(&4096u32.to_ne_bytes());
        assert_eq!(
            ring::EntInOut::parse(&hdr),
            Some(ring::EntInOut {
                commit_id: 0x1234_5678_9abc,
                payload_sz: 4096
            })
        );
        assert!(ring::set_payload_sz(&mut hdr, 8));
        assert_eq!(&hdr[272..276], &8u32.to_ne_bytes());
        assert_eq!(ring::EntInOut::parse(&hdr[..287]), None);
        assert!(!ring::set_payload_sz(&mut hdr[..275], 8));
        // struct fuse_uring_cmd_req { u64 flags; u64 commit_id; u16 qid; u8 pad[6]; }
        let c = ring::cmd_req(1, 77);
        assert_eq!(&c[0..8], &[0u8; 8]);
        assert_eq!(&c[8..16], &77u64.to_ne_bytes());
        assert_eq!(&c[16..18], &1u16.to_ne_bytes());
        assert!(c[18..].iter().all(|&b| b == 0));
        assert_eq!(ring::CMD_REQ, 24);
        assert_eq!((ring::CMD_REGISTER, ring::CMD_COMMIT_AND_FETCH), (1, 2));
        // the in header read from in_out, without a length check against the buffer
        let h = header(40 + 40 + 4096, op::WRITE, 9, 2);
        let mut in_out = vec![0u8; ring::IN_OUT_HEADER];
        in_out[..40].copy_from_slice(&h);
        let p = InHeader::parse_fields(&in_out).unwrap();
        assert_eq!((p.opcode, p.unique, p.nodeid), (op::WRITE, 9, 2));
    }

    #[test]
    fn init_in_flags2_only_with_init_ext() {
        let mut b = vec![0u8; 64];
        b[0..4].copy_from_slice(&7u32.to_ne_bytes());
        b[4..8].copy_from_slice(&45u32.to_ne_bytes());
        b[16..20].copy_from_slice(&init::OVER_IO_URING_FLAGS2.to_ne_bytes());
        assert_eq!(InitIn::parse(&b).unwrap().flags2, 0);
        b[12..16].copy_from_slice(&init::INIT_EXT.to_ne_bytes());
        let i = InitIn::parse(&b).unwrap();
        assert_eq!((i.minor, i.flags2), (45, 1 << 9));
        // an old kernel's 16-byte init_in
        assert_eq!(InitIn::parse(&b[..16]).unwrap().flags2, 0);
    }
}
