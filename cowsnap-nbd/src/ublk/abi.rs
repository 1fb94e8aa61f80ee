//! The ublk user-space ABI (`include/uapi/linux/ublk_cmd.h`): the control and I/O
//! command payloads, the shared I/O descriptor, the parameter blocks, and the command
//! numbers, ioctl-encoded (`UBLK_U_CMD_*`, `UBLK_U_IO_*`) or plain ([`Encoding`]). Layouts are
//! `#[repr(C)]` with compile-time size asserts; the tests pin sizes, offsets and the
//! encoded numbers against the values the header gives on Linux.

use std::mem::{offset_of, size_of};

/// The control device.
pub const CONTROL_PATH: &str = "/dev/ublk-control";
/// The per-device character device (`/dev/ublkcN`): the queues' descriptor.
pub fn char_path(id: u32) -> String {
    format!("/dev/ublkc{id}")
}
/// The block device (`/dev/ublkbN`).
pub fn block_path(id: u32) -> String {
    format!("/dev/ublkb{id}")
}

/// Control command numbers (`UBLK_CMD_*`, the `_IOC_NR` of the encoded ones).
pub mod cmd {
    /// Information on one device.
    pub const GET_DEV_INFO: u32 = 0x02;
    /// Add a device (`ublksrv_ctrl_dev_info` in and out).
    pub const ADD_DEV: u32 = 0x04;
    /// Delete a stopped device (waits until its char device is released).
    pub const DEL_DEV: u32 = 0x05;
    /// Start: waits until every queue has fetched every tag, then adds the disk.
    pub const START_DEV: u32 = 0x06;
    /// Stop: removes the disk, aborts outstanding fetches.
    pub const STOP_DEV: u32 = 0x07;
    /// Set the parameters (before START_DEV).
    pub const SET_PARAMS: u32 = 0x08;
}

/// I/O command numbers (`UBLK_IO_*`).
pub mod io {
    /// Hand one tag's buffer to the driver; completes when a request arrives.
    pub const FETCH_REQ: u32 = 0x20;
    /// Complete the tag's request with a result and fetch the next one.
    pub const COMMIT_AND_FETCH_REQ: u32 = 0x21;
}

const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = 8;
const IOC_SIZESHIFT: u32 = 16;
const IOC_DIRSHIFT: u32 = 30;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;
/// The ioctl type letter of ublk commands.
const UBLK_TYPE: u32 = b'u' as u32;

/// `_IOC(dir, 'u', nr, size)` as the generic Linux encoding (x86, arm64, riscv, s390).
const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << IOC_DIRSHIFT)
        | (UBLK_TYPE << IOC_TYPESHIFT)
        | (nr << IOC_NRSHIFT)
        | ((size as u32) << IOC_SIZESHIFT)
}

/// `_IOR('u', nr, struct ublksrv_ctrl_cmd)`.
pub const fn ior_ctrl(nr: u32) -> u32 {
    ioc(IOC_READ, nr, size_of::<CtrlCmd>())
}
/// `_IOWR('u', nr, struct ublksrv_ctrl_cmd)`.
pub const fn iowr_ctrl(nr: u32) -> u32 {
    ioc(IOC_READ | IOC_WRITE, nr, size_of::<CtrlCmd>())
}
/// `_IOWR('u', nr, struct ublksrv_io_cmd)`.
pub const fn iowr_io(nr: u32) -> u32 {
    ioc(IOC_READ | IOC_WRITE, nr, size_of::<IoCmd>())
}

/// How command numbers are given to the driver.
///
/// Linux 6.3 added ioctl-encoded numbers (`UBLK_U_*`); a kernel built without
/// `CONFIG_BLKDEV_UBLK_LEGACY_OPCODES` takes only those. The drivers of 6.0–6.2 (and
/// distribution kernels of that age, e.g. Debian 12's 6.1) take only the plain
/// numbers. A server tries the encoded form first and falls back (see
/// [`super::ctrl::Control`]); a device's queues use the form its ADD_DEV took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `UBLK_U_CMD_*` / `UBLK_U_IO_*`.
    Ioctl,
    /// `UBLK_CMD_*` / `UBLK_IO_*`: the plain numbers.
    Legacy,
}

impl Encoding {
    /// The `cmd_op` of control command `nr` ([`cmd`]).
    pub const fn ctrl(self, nr: u32) -> u32 {
        match self {
            // GET_DEV_INFO only reads the device (`_IOR`); the others are `_IOWR`.
            Encoding::Ioctl if nr == cmd::GET_DEV_INFO => ior_ctrl(nr),
            Encoding::Ioctl => iowr_ctrl(nr),
            Encoding::Legacy => nr,
        }
    }
    /// The `cmd_op` of I/O command `nr` ([`io`]).
    pub const fn io(self, nr: u32) -> u32 {
        match self {
            Encoding::Ioctl => iowr_io(nr),
            Encoding::Legacy => nr,
        }
    }
}

/// Device feature flags (`UBLK_F_*`) this server uses or refuses.
pub mod flags {
    /// Commands are ioctl-encoded (`UBLK_U_*`); Linux 6.3 and later.
    pub const CMD_IOCTL_ENCODE: u64 = 1 << 6;
    /// Keep the disk when the server dies, for a new server to take over. Not used:
    /// see the module notes.
    pub const USER_RECOVERY: u64 = 1 << 3;
}

/// Request operations (`enum ublk_op`, the low 8 bits of `op_flags`).
pub mod op {
    /// Read into the tag's buffer.
    pub const READ: u8 = 0;
    /// Write from the tag's buffer.
    pub const WRITE: u8 = 1;
    /// Cache flush.
    pub const FLUSH: u8 = 2;
    /// Discard (TRIM).
    pub const DISCARD: u8 = 3;
    /// WRITE SAME (never sent: no parameter advertises it).
    pub const WRITE_SAME: u8 = 4;
    /// Write zeroes.
    pub const WRITE_ZEROES: u8 = 5;
}

/// Request flags (`UBLK_IO_F_*`, bits 8..31 of `op_flags`).
pub mod ioflag {
    /// Forced unit access: durable before completion.
    pub const FUA: u32 = 1 << 13;
    /// Write zeroes without deallocating.
    pub const NOUNMAP: u32 = 1 << 15;
}

/// Results of a fetch (`cqe.res`).
pub mod res {
    /// A request is in the tag's descriptor.
    pub const OK: i32 = 0;
    /// The queue is going away: do not fetch again (`-ENODEV`).
    pub const ABORT: i32 = -libc::ENODEV;
}

/// Parameter types (`UBLK_PARAM_TYPE_*`).
pub mod param_type {
    /// [`super::ParamBasic`].
    pub const BASIC: u32 = 1 << 0;
    /// [`super::ParamDiscard`].
    pub const DISCARD: u32 = 1 << 1;
}

/// Attributes of [`ParamBasic::attrs`] (`UBLK_ATTR_*`).
pub mod attr {
    /// Read-only disk.
    pub const READ_ONLY: u32 = 1 << 0;
    /// A volatile write cache: the block layer sends FLUSH.
    pub const VOLATILE_CACHE: u32 = 1 << 2;
    /// FUA writes are honoured (else the block layer emulates them with a flush).
    pub const FUA: u32 = 1 << 3;
}

/// Where queue `q`'s descriptor array is mapped in the char device
/// (`UBLKSRV_CMD_BUF_OFFSET` + `q` × the largest array, `UBLK_MAX_QUEUE_DEPTH` tags).
pub const fn desc_mmap_offset(q: u16) -> u64 {
    q as u64 * (MAX_QUEUE_DEPTH as u64 * size_of::<IoDesc>() as u64)
}

/// `UBLK_MAX_QUEUE_DEPTH`.
pub const MAX_QUEUE_DEPTH: u16 = 4096;
/// `UBLK_MAX_NR_QUEUES`.
pub const MAX_NR_QUEUES: u16 = 4096;

/// `struct ublksrv_ctrl_cmd`: the 32 bytes of a control command in the SQE's command
/// area (an SQE128 ring).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CtrlCmd {
    /// Target device (`u32::MAX`: let ADD_DEV choose).
    pub dev_id: u32,
    /// Target queue (`u16::MAX`: none).
    pub queue_id: u16,
    /// Length of the buffer at `addr`.
    pub len: u16,
    /// Command buffer (in or out).
    pub addr: u64,
    /// Inline data (START_DEV: the server's pid).
    pub data: [u64; 1],
    /// Path length, for unprivileged devices only.
    pub dev_path_len: u16,
    /// Padding.
    pub pad: u16,
    /// Reserved.
    pub reserved: u32,
}

/// `struct ublksrv_ctrl_dev_info`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DevInfo {
    /// Queues.
    pub nr_hw_queues: u16,
    /// Tags per queue.
    pub queue_depth: u16,
    /// `UBLK_S_DEV_*`.
    pub state: u16,
    /// Padding.
    pub pad0: u16,
    /// Largest request payload (each tag's buffer).
    pub max_io_buf_bytes: u32,
    /// Device id (`u32::MAX` asks the driver to pick).
    pub dev_id: u32,
    /// The server's pid.
    pub ublksrv_pid: i32,
    /// Padding.
    pub pad1: u32,
    /// `UBLK_F_*`.
    pub flags: u64,
    /// The server's own flags (not read by the driver).
    pub ublksrv_flags: u64,
    /// Owner, stored by the driver.
    pub owner_uid: u32,
    /// Owner group, stored by the driver.
    pub owner_gid: u32,
    /// Reserved.
    pub reserved1: u64,
    /// Reserved.
    pub reserved2: u64,
}

/// `struct ublksrv_io_desc`: one tag's request, in the mapped array.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoDesc {
    /// Operation (bits 0..7) and flags (8..31).
    pub op_flags: u32,
    /// Length in 512-byte sectors.
    pub nr_sectors: u32,
    /// First sector.
    pub start_sector: u64,
    /// The tag's buffer address as given with the fetch.
    pub addr: u64,
}

impl IoDesc {
    /// The operation.
    pub fn op(&self) -> u8 {
        (self.op_flags & 0xff) as u8
    }
    /// The flags.
    pub fn flags(&self) -> u32 {
        self.op_flags & !0xff
    }
}

/// `struct ublksrv_io_cmd`: the 16 bytes of an I/O command (fits a plain SQE).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoCmd {
    /// Queue.
    pub q_id: u16,
    /// Tag.
    pub tag: u16,
    /// Result of the committed request: bytes done, or a negative errno.
    pub result: i32,
    /// The tag's buffer.
    pub addr: u64,
}

impl IoCmd {
    /// The bytes for the SQE's command area.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..2].copy_from_slice(&self.q_id.to_ne_bytes());
        b[2..4].copy_from_slice(&self.tag.to_ne_bytes());
        b[4..8].copy_from_slice(&self.result.to_ne_bytes());
        b[8..16].copy_from_slice(&self.addr.to_ne_bytes());
        b
    }
}

impl CtrlCmd {
    /// The bytes for an SQE128's 80-byte command area (the rest zero).
    pub fn to_bytes(self) -> [u8; 80] {
        let mut b = [0u8; 80];
        b[0..4].copy_from_slice(&self.dev_id.to_ne_bytes());
        b[4..6].copy_from_slice(&self.queue_id.to_ne_bytes());
        b[6..8].copy_from_slice(&self.len.to_ne_bytes());
        b[8..16].copy_from_slice(&self.addr.to_ne_bytes());
        b[16..24].copy_from_slice(&self.data[0].to_ne_bytes());
        b[24..26].copy_from_slice(&self.dev_path_len.to_ne_bytes());
        b[26..28].copy_from_slice(&self.pad.to_ne_bytes());
        b[28..32].copy_from_slice(&self.reserved.to_ne_bytes());
        b
    }
}

/// `struct ublk_param_basic`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamBasic {
    /// `UBLK_ATTR_*`.
    pub attrs: u32,
    /// log2 of the logical block size (9..=PAGE_SHIFT).
    pub logical_bs_shift: u8,
    /// log2 of the physical block size (>= logical).
    pub physical_bs_shift: u8,
    /// log2 of the optimal I/O size.
    pub io_opt_shift: u8,
    /// log2 of the minimal I/O size.
    pub io_min_shift: u8,
    /// Largest request in sectors (at most `max_io_buf_bytes` / 512).
    pub max_sectors: u32,
    /// Chunk size in sectors (0: none).
    pub chunk_sectors: u32,
    /// Device size in sectors.
    pub dev_sectors: u64,
    /// DMA boundary mask (0: none).
    pub virt_boundary_mask: u64,
}

/// `struct ublk_param_discard`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamDiscard {
    /// Alignment in bytes.
    pub discard_alignment: u32,
    /// Granularity in bytes (must not be 0).
    pub discard_granularity: u32,
    /// Largest discard in sectors (0: no DISCARD).
    pub max_discard_sectors: u32,
    /// Largest write-zeroes in sectors (0: no WRITE_ZEROES).
    pub max_write_zeroes_sectors: u32,
    /// Segments per discard (must be 1 when discard is on).
    pub max_discard_segments: u16,
    /// Reserved.
    pub reserved0: u16,
}

/// The leading part of `struct ublk_params` this server sets: header, basic and
/// discard. `len` says how much of the kernel's (larger) struct is given; the driver
/// zeroes the rest.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Params {
    /// Bytes given (this struct's size).
    pub len: u32,
    /// `UBLK_PARAM_TYPE_*` present.
    pub types: u32,
    /// Basic parameters.
    pub basic: ParamBasic,
    /// Discard and write-zeroes limits.
    pub discard: ParamDiscard,
}

/// The bytes of [`Params`] that carry data (the kernel struct continues after them).
pub const PARAMS_LEN: usize = offset_of!(Params, discard) + size_of::<ParamDiscard>();

const _: () = assert!(size_of::<CtrlCmd>() == 32);
const _: () = assert!(size_of::<DevInfo>() == 64);
const _: () = assert!(size_of::<IoDesc>() == 24);
const _: () = assert!(size_of::<IoCmd>() == 16);
const _: () = assert!(size_of::<ParamBasic>() == 32);
const _: () = assert!(size_of::<ParamDiscard>() == 20);
const _: () = assert!(PARAMS_LEN == 60);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_offsets_match_the_header() {
        assert_eq!(size_of::<CtrlCmd>(), 32);
        assert_eq!(offset_of!(CtrlCmd, queue_id), 4);
        assert_eq!(offset_of!(CtrlCmd, len), 6);
        assert_eq!(offset_of!(CtrlCmd, addr), 8);
        assert_eq!(offset_of!(CtrlCmd, data), 16);
        assert_eq!(offset_of!(CtrlCmd, dev_path_len), 24);
        assert_eq!(offset_of!(CtrlCmd, reserved), 28);

        assert_eq!(size_of::<DevInfo>(), 64);
        assert_eq!(offset_of!(DevInfo, queue_depth), 2);
        assert_eq!(offset_of!(DevInfo, state), 4);
        assert_eq!(offset_of!(DevInfo, max_io_buf_bytes), 8);
        assert_eq!(offset_of!(DevInfo, dev_id), 12);
        assert_eq!(offset_of!(DevInfo, ublksrv_pid), 16);
        assert_eq!(offset_of!(DevInfo, flags), 24);
        assert_eq!(offset_of!(DevInfo, ublksrv_flags), 32);
        assert_eq!(offset_of!(DevInfo, owner_uid), 40);
        assert_eq!(offset_of!(DevInfo, reserved1), 48);

        assert_eq!(size_of::<IoDesc>(), 24);
        assert_eq!(offset_of!(IoDesc, nr_sectors), 4);
        assert_eq!(offset_of!(IoDesc, start_sector), 8);
        assert_eq!(offset_of!(IoDesc, addr), 16);

        assert_eq!(size_of::<IoCmd>(), 16);
        assert_eq!(offset_of!(IoCmd, tag), 2);
        assert_eq!(offset_of!(IoCmd, result), 4);
        assert_eq!(offset_of!(IoCmd, addr), 8);

        assert_eq!(size_of::<ParamBasic>(), 32);
        assert_eq!(offset_of!(ParamBasic, logical_bs_shift), 4);
        assert_eq!(offset_of!(ParamBasic, physical_bs_shift), 5);
        assert_eq!(offset_of!(ParamBasic, io_opt_shift), 6);
        assert_eq!(offset_of!(ParamBasic, io_min_shift), 7);
        assert_eq!(offset_of!(ParamBasic, max_sectors), 8);
        assert_eq!(offset_of!(ParamBasic, chunk_sectors), 12);
        assert_eq!(offset_of!(ParamBasic, dev_sectors), 16);
        assert_eq!(offset_of!(ParamBasic, virt_boundary_mask), 24);

        assert_eq!(size_of::<ParamDiscard>(), 20);
        assert_eq!(offset_of!(ParamDiscard, discard_granularity), 4);
        assert_eq!(offset_of!(ParamDiscard, max_discard_sectors), 8);
        assert_eq!(offset_of!(ParamDiscard, max_write_zeroes_sectors), 12);
        assert_eq!(offset_of!(ParamDiscard, max_discard_segments), 16);

        // struct ublk_params: len, types, then basic at 8 and discard at 40.
        assert_eq!(offset_of!(Params, types), 4);
        assert_eq!(offset_of!(Params, basic), 8);
        assert_eq!(offset_of!(Params, discard), 40);
        assert_eq!(PARAMS_LEN, 60);
    }

    #[test]
    fn ioctl_numbers_match_the_header() {
        // _IOWR('u', nr, 32 bytes) = 0xc020_75nn; _IOR = 0x8020_75nn;
        // _IOWR('u', nr, 16 bytes) = 0xc010_75nn (the values the header yields on
        // x86-64 and arm64).
        assert_eq!(Encoding::Ioctl.ctrl(cmd::GET_DEV_INFO), 0x8020_7502);
        assert_eq!(Encoding::Ioctl.ctrl(cmd::ADD_DEV), 0xc020_7504);
        assert_eq!(Encoding::Ioctl.ctrl(cmd::DEL_DEV), 0xc020_7505);
        assert_eq!(Encoding::Ioctl.ctrl(cmd::START_DEV), 0xc020_7506);
        assert_eq!(Encoding::Ioctl.ctrl(cmd::STOP_DEV), 0xc020_7507);
        assert_eq!(Encoding::Ioctl.ctrl(cmd::SET_PARAMS), 0xc020_7508);
        assert_eq!(Encoding::Ioctl.io(io::FETCH_REQ), 0xc010_7520);
        assert_eq!(Encoding::Ioctl.io(io::COMMIT_AND_FETCH_REQ), 0xc010_7521);
        // the same as libc's/nix's generic encoding
        assert_eq!(
            Encoding::Ioctl.ctrl(cmd::ADD_DEV) as u64,
            nix::request_code_readwrite!(b'u', 0x04, size_of::<CtrlCmd>()) as u64
        );
        assert_eq!(
            Encoding::Ioctl.io(io::FETCH_REQ) as u64,
            nix::request_code_readwrite!(b'u', 0x20, size_of::<IoCmd>()) as u64
        );
        assert_eq!(
            Encoding::Ioctl.ctrl(cmd::GET_DEV_INFO) as u64,
            nix::request_code_read!(b'u', 0x02, size_of::<CtrlCmd>()) as u64
        );
    }

    #[test]
    fn legacy_numbers_are_the_plain_ones() {
        // UBLK_CMD_* and UBLK_IO_* of Linux 6.0-6.2 (include/uapi/linux/ublk_cmd.h)
        assert_eq!(Encoding::Legacy.ctrl(cmd::GET_DEV_INFO), 0x02);
        assert_eq!(Encoding::Legacy.ctrl(cmd::ADD_DEV), 0x04);
        assert_eq!(Encoding::Legacy.ctrl(cmd::DEL_DEV), 0x05);
        assert_eq!(Encoding::Legacy.ctrl(cmd::START_DEV), 0x06);
        assert_eq!(Encoding::Legacy.ctrl(cmd::STOP_DEV), 0x07);
        assert_eq!(Encoding::Legacy.ctrl(cmd::SET_PARAMS), 0x08);
        assert_eq!(Encoding::Legacy.io(io::FETCH_REQ), 0x20);
        assert_eq!(Encoding::Legacy.io(io::COMMIT_AND_FETCH_REQ), 0x21);
    }

    #[test]
    fn command_bytes_are_the_struct_in_native_order() {
        let c = CtrlCmd {
            dev_id: 7,
            queue_id: u16::MAX,
            len: 64,
            addr: 0x1122_3344_5566_7788,
            data: [4242],
            ..Default::default()
        };
        let b = c.to_bytes();
        assert_eq!(&b[0..4], &7u32.to_ne_bytes());
        assert_eq!(&b[4..6], &[0xff, 0xff]);
        assert_eq!(&b[6..8], &64u16.to_ne_bytes());
        assert_eq!(&b[8..16], &0x1122_3344_5566_7788u64.to_ne_bytes());
        assert_eq!(&b[16..24], &4242u64.to_ne_bytes());
        assert!(b[24..].iter().all(|&x| x == 0));
        // same as the struct's memory
        // SAFETY: CtrlCmd is repr(C), 32 bytes, no padding (pinned above), and lives
        // for the borrow.
        let raw: &[u8; 32] = unsafe { &*(&c as *const CtrlCmd as *const [u8; 32]) };
        assert_eq!(&b[..32], raw);

        let io = IoCmd {
            q_id: 3,
            tag: 17,
            result: -libc::EIO,
            addr: 0xdead_beef,
        };
        // SAFETY: IoCmd is repr(C), 16 bytes, no padding.
        let raw: &[u8; 16] = unsafe { &*(&io as *const IoCmd as *const [u8; 16]) };
        assert_eq!(&io.to_bytes(), raw);
    }

    #[test]
    fn descriptor_fields() {
        let d = IoDesc {
            op_flags: op::WRITE as u32 | ioflag::FUA,
            ..Default::default()
        };
        assert_eq!(d.op(), op::WRITE);
        assert_eq!(d.flags(), ioflag::FUA);
        assert_eq!(desc_mmap_offset(0), 0);
        assert_eq!(desc_mmap_offset(1), 4096 * 24);
        assert_eq!(desc_mmap_offset(2), 2 * 4096 * 24);
        assert_eq!(res::ABORT, -19);
        assert_eq!(block_path(3), "/dev/ublkb3");
        assert_eq!(char_path(3), "/dev/ublkc3");
    }
}
