//! XFS free space: each allocation group's by-block-number free-space b-tree (bnobt),
//! read only when the log holds nothing a recovery could replay onto it.
//!
//! Design notes
//! - Read: the primary superblock (sector 0), then per allocation group (AG) its AGF
//!   (sector 1 of the AG) and the bnobt from `agf_roots[BNO]`. Leaf records are
//!   (start, count) in AG blocks; AG `a` starts at byte `a * agblocks * blocksize`.
//!   The blocks on the AG free list (AGFL) are not in the bnobt and so count as used:
//!   they are reserved for b-tree growth and may hold metadata at any moment. An AGFL
//!   entry found inside a free record makes the answer unknown.
//! - Checks: v5 (CRC) superblock, AGF, AGFL and b-tree blocks have their crc32c, UUID,
//!   self address and owner checked; every b-tree pointer is range-checked, levels
//!   descend by one, records are in order and disjoint, within the AG and past its
//!   header sectors; a walk visits at most `agf_length` blocks. The records' sum must
//!   equal `agf_freeblks`. Any failure makes the whole answer unknown.
//! - The log: a mounted XFS logs a change before writing it in place, so the b-trees
//!   on disk may be older than the log; recovery on the restored disk replays the log
//!   from its tail to its head and can allocate blocks the bnobt on disk calls free.
//!   So the log is read as recovery reads it: the last record written is the header
//!   with the highest LSN (every 512-byte log block starts with its pass's cycle
//!   number, a header with its magic), it must be complete (its blocks carry its
//!   cycle, its CRC matches), everything before it in the log carries its cycle and
//!   everything after an older one (so nothing was written after it). Then the log
//!   is clean when that record is an unmount record (recovery replays nothing), or
//!   covered when every record from the tail it names to the head holds only
//!   transactions that log the primary superblock buffer (what `FIFREEZE` leaves: the
//!   log covered by superblock-only transactions; replaying them rewrites the
//!   superblock, never an AGF or a b-tree). Anything else — a transaction logging any
//!   other item, a record split across log passes or larger than one 32 KiB header
//!   covers, an external log — makes the answer unknown.
//! - Unknown: a realtime section, an external log, an unknown incompat or ro_compat
//!   feature, `needsrepair`, a v4 shared superblock, a field out of range, a
//!   filesystem larger than the disk. Blocks past `sb_dblocks` are never free.

use super::{merge, Probe, ReadAt, MAX_TABLE_BYTES};
use crate::error::Result;

/// An I/O error (`Err`), or the answer: a value or why the filesystem cannot be
/// read (`Ok(Err(why))`, which makes the probe's answer unknown).
type Outcome<T> = Result<std::result::Result<T, String>>;

const SB_MAGIC: u32 = 0x5846_5342; // XFSB
const AGF_MAGIC: u32 = 0x5841_4746; // XAGF
const AGFL_MAGIC: u32 = 0x5841_464C; // XAFL
const BNO_MAGIC_V4: u32 = 0x4142_5442; // ABTB
const BNO_MAGIC_V5: u32 = 0x4142_3342; // AB3B
const LOG_MAGIC: u32 = 0xFEED_BABE;
const NULL_AGBLOCK: u32 = 0xFFFF_FFFF;
/// Deepest AG b-tree accepted.
const MAX_LEVELS: u32 = 10;
/// Log basic block.
const BB: u64 = 512;
/// Bytes of log data whose displaced cycle words one record header holds.
const HEADER_CYCLE_SIZE: u64 = 32 * 1024;

/// v5 incompat features whose free-space layout is understood here: ftype,
/// sparse inodes, meta_uuid, bigtime, nrext64, exchange-range, parent pointers.
const INCOMPAT_OK: u32 = 0x1 | 0x2 | 0x4 | 0x8 | 0x20 | 0x40 | 0x80;
const INCOMPAT_META_UUID: u32 = 0x4;
/// v5 ro_compat: finobt, rmapbt, reflink, inobtcount.
const RO_COMPAT_OK: u32 = 0x1 | 0x2 | 0x4 | 0x8;
/// v5 log_incompat: logged extended attributes.
const LOG_INCOMPAT_OK: u32 = 0x1;
const V4_SHAREDBIT: u16 = 0x200;
const V4_MOREBITS: u16 = 0x8000;
const F2_CRC: u32 = 0x100;

/// Log operation flags and the buffer log item.
const OP_START: u8 = 0x01;
const OP_COMMIT: u8 = 0x02;
const OP_CONTINUE: u8 = 0x04 | 0x08 | 0x10;
const OP_UNMOUNT: u8 = 0x20;
const TRANS_MAGIC: u32 = 0x5452_414E; // TRAN
const LI_BUF: u16 = 0x123C;

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    (u64::from(be32(b, o)) << 32) | u64::from(be32(b, o + 4))
}
fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn unknown(why: impl Into<String>) -> Result<Probe> {
    Ok(Probe::Unknown {
        why: format!("xfs: {}", why.into()),
    })
}

/// Continue a crc32c (raw register, no final inversion) with the `crc32c` crate, which
/// works on finished values (inverted registers).
fn crc32c_update(crc: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!crc, data)
}

/// XFS's metadata checksum: crc32c of `buf` with its 4-byte field at `off` taken as
/// zeros, stored little-endian at `off`.
fn cksum_ok(buf: &[u8], off: usize) -> bool {
    if buf.len() < off + 4 {
        return false;
    }
    let mut c = crc32c_update(!0, &buf[..off]);
    c = crc32c_update(c, &[0; 4]);
    c = crc32c_update(c, &buf[off + 4..]);
    !c == le32(buf, off)
}

struct Geo {
    bs: u64,
    sect: u64,
    dblocks: u64,
    agblocks: u64,
    v5: bool,
    /// The UUID stamped in v5 metadata blocks.
    meta_uuid: [u8; 16],
}

impl Geo {
    fn ag_byte(&self, ag: u64, agbno: u64) -> u64 {
        (ag * self.agblocks + agbno) * self.bs
    }
    fn ag_len(&self, ag: u64) -> u64 {
        (self.dblocks - ag * self.agblocks).min(self.agblocks)
    }
}

/// Whether `sb` (the disk's first bytes) carries the XFS superblock magic.
pub fn is_xfs(sb: &[u8]) -> bool {
    sb.len() >= 4 && be32(sb, 0) == SB_MAGIC
}

/// Read the free space of the XFS filesystem at the start of the disk.
pub fn probe(read: &mut ReadAt<'_>, disk_size: u64) -> Result<Probe> {
    let mut sb = vec![0u8; 512];
    read(0, &mut sb)?;
    if !is_xfs(&sb) {
        return unknown("no superblock");
    }
    let sect = u64::from(be16(&sb, 102));
    if !(512..=32768).contains(&sect) || !sect.is_power_of_two() {
        return unknown(format!("sector size {sect} out of range"));
    }
    if sect > 512 {
        sb = vec![0u8; sect as usize];
        read(0, &mut sb)?;
    }
    let bs = u64::from(be32(&sb, 4));
    let dblocks = be64(&sb, 8);
    let rblocks = be64(&sb, 16);
    let logstart = be64(&sb, 48);
    let agblocks = u64::from(be32(&sb, 84));
    let agcount = u64::from(be32(&sb, 88));
    let logblocks = u64::from(be32(&sb, 96));
    let versionnum = be16(&sb, 100);
    let blocklog = sb[120];
    let agblklog = sb[124];
    let inprogress = sb[126];
    let features2 = be32(&sb, 200);
    let version = versionnum & 0xF;
    let v5 = match version {
        5 => true,
        4 => false,
        _ => return unknown(format!("superblock version {version} is not supported")),
    };
    if v5 {
        if !cksum_ok(&sb, 224) {
            return unknown("the superblock's checksum does not match");
        }
        let compat_ro = be32(&sb, 212);
        let incompat = be32(&sb, 216);
        let log_incompat = be32(&sb, 220);
        if incompat & !INCOMPAT_OK != 0 {
            return unknown(format!(
                "unsupported incompatible features {:#x}",
                incompat & !INCOMPAT_OK
            ));
        }
        if compat_ro & !RO_COMPAT_OK != 0 {
            return unknown(format!(
                "unsupported read-only-compatible features {:#x}",
                compat_ro & !RO_COMPAT_OK
            ));
        }
        if log_incompat & !LOG_INCOMPAT_OK != 0 {
            return unknown(format!(
                "unsupported log features {:#x}",
                log_incompat & !LOG_INCOMPAT_OK
            ));
        }
    } else {
        if versionnum & V4_SHAREDBIT != 0 {
            return unknown("shared (v4) superblock is not supported");
        }
        if versionnum & V4_MOREBITS != 0 && features2 & F2_CRC != 0 {
            return unknown("a v4 superblock with the CRC feature");
        }
    }
    if inprogress != 0 {
        return unknown("mkfs did not finish (sb_inprogress)");
    }
    if rblocks != 0 {
        return unknown("a realtime section is not supported");
    }
    if logstart == 0 {
        return unknown("an external log is not supported");
    }
    if !(512..=65536).contains(&bs) || !bs.is_power_of_two() || 1u64 << blocklog != bs || sect > bs
    {
        return unknown("block size out of range");
    }
    if agblocks < 16
        || agcount == 0
        || agblklog > 31
        || agblocks > 1u64 << agblklog
        || agblocks <= 1u64 << agblklog >> 1
    {
        return unknown("allocation group geometry out of range");
    }
    let min = (agcount - 1) * agblocks;
    if dblocks <= min || dblocks > agcount * agblocks {
        return unknown("block count disagrees with the allocation groups");
    }
    if dblocks.checked_mul(bs).is_none_or(|b| b > disk_size) {
        return unknown("the filesystem is larger than the disk");
    }
    let mut meta_uuid = [0u8; 16];
    let uuid_at = if v5 && be32(&sb, 216) & INCOMPAT_META_UUID != 0 {
        248
    } else {
        32
    };
    meta_uuid.copy_from_slice(&sb[uuid_at..uuid_at + 16]);
    let g = Geo {
        bs,
        sect,
        dblocks,
        agblocks,
        v5,
        meta_uuid,
    };

    // the internal log: where it is, and whether a recovery would change anything
    let log_ag = logstart >> agblklog;
    let log_agbno = logstart & ((1u64 << agblklog) - 1);
    if log_ag >= agcount
        || logblocks == 0
        || log_agbno + logblocks > g.ag_len(log_ag)
        || logblocks * bs / BB > MAX_TABLE_BYTES / 4
    {
        return unknown("internal log out of range");
    }
    let log = (g.ag_byte(log_ag, log_agbno), logblocks * bs);
    if let Err(why) = log_state(read, log.0, log.1 / BB)? {
        return unknown(why);
    }

    let mut free: Vec<(u64, u64)> = Vec::new();
    for ag in 0..agcount {
        match ag_free(read, &g, ag)? {
            Ok(runs) => free.extend(
                runs.into_iter()
                    .map(|(a, n)| (g.ag_byte(ag, a), g.ag_byte(ag, a + n))),
            ),
            Err(why) => return unknown(format!("allocation group {ag}: {why}")),
        }
    }
    let ranges = merge(free);
    if ranges.iter().any(|r| r.0 < log.0 + log.1 && log.0 < r.1) {
        return unknown("free space overlaps the log");
    }
    let free_bytes = ranges.iter().map(|r| r.1 - r.0).sum();
    Ok(Probe::Free {
        fs: "xfs",
        ranges,
        free_bytes,
        caveat: None,
    })
}

/// The free extents (AG block, count) of one AG, from its bnobt, sorted.
fn ag_free(read: &mut ReadAt<'_>, g: &Geo, ag: u64) -> Outcome<Vec<(u64, u64)>> {
    let mut agf = vec![0u8; g.sect as usize];
    read(g.ag_byte(ag, 0) + g.sect, &mut agf)?;
    if be32(&agf, 0) != AGF_MAGIC || be32(&agf, 4) != 1 {
        return Ok(Err("bad AGF magic or version".into()));
    }
    if u64::from(be32(&agf, 8)) != ag {
        return Ok(Err("AGF sequence number is not the AG's".into()));
    }
    if g.v5 && (!cksum_ok(&agf, 216) || agf[64..80] != g.meta_uuid) {
        return Ok(Err("AGF checksum or UUID does not match".into()));
    }
    let len = u64::from(be32(&agf, 12));
    if len != g.ag_len(ag) {
        return Ok(Err("AGF length is not the AG's".into()));
    }
    let root = u64::from(be32(&agf, 16));
    let levels = be32(&agf, 28);
    let flfirst = u64::from(be32(&agf, 40));
    let flcount = u64::from(be32(&agf, 48));
    let freeblks = u64::from(be32(&agf, 52));
    // the AG's header sectors (superblock, AGF, AGI, AGFL) are never free
    let first_free = (4 * g.sect).div_ceil(g.bs);
    if levels == 0 || levels > MAX_LEVELS || root < first_free || root >= len {
        return Ok(Err("free-space b-tree root out of range".into()));
    }
    let hdr = if g.v5 { 56 } else { 16 };
    let magic = if g.v5 { BNO_MAGIC_V5 } else { BNO_MAGIC_V4 };
    let node_max = (g.bs as usize - hdr) / 12;
    let leaf_max = (g.bs as usize - hdr) / 8;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut sum = 0u64;
    // depth first, children in key order: (AG block, expected level)
    let mut stack: Vec<(u64, u32)> = vec![(root, levels - 1)];
    let mut visits = 0u64;
    let mut blk = vec![0u8; g.bs as usize];
    while let Some((bno, level)) = stack.pop() {
        visits += 1;
        if visits > len {
            return Ok(Err("free-space b-tree has more blocks than the AG".into()));
        }
        read(g.ag_byte(ag, bno), &mut blk)?;
        if be32(&blk, 0) != magic || u32::from(be16(&blk, 4)) != level {
            return Ok(Err(format!(
                "free-space b-tree block {bno}: bad magic or level"
            )));
        }
        if g.v5 {
            let daddr = g.ag_byte(ag, bno) / BB;
            if be64(&blk, 16) != daddr
                || blk[32..48] != g.meta_uuid
                || u64::from(be32(&blk, 48)) != ag
                || !cksum_ok(&blk, 52)
            {
                return Ok(Err(format!(
                    "free-space b-tree block {bno}: checksum, UUID, owner or address does not match"
                )));
            }
        }
        let n = usize::from(be16(&blk, 6));
        if level == 0 {
            if n > leaf_max {
                return Ok(Err(format!(
                    "free-space b-tree block {bno}: too many records"
                )));
            }
            for i in 0..n {
                let o = hdr + i * 8;
                let (s, c) = (u64::from(be32(&blk, o)), u64::from(be32(&blk, o + 4)));
                let after_last = out.last().map_or(first_free, |l| l.0 + l.1);
                if c == 0 || s < after_last || s + c > len {
                    return Ok(Err(format!(
                        "free-space record ({s}, {c}) out of order or out of range"
                    )));
                }
                sum += c;
                out.push((s, c));
            }
        } else {
            if n == 0 || n > node_max {
                return Ok(Err(format!(
                    "free-space b-tree block {bno}: bad record count"
                )));
            }
            let ptrs = hdr + node_max * 8;
            for i in (0..n).rev() {
                let p = u64::from(be32(&blk, ptrs + i * 4));
                if p < first_free || p >= len {
                    return Ok(Err(format!(
                        "free-space b-tree block {bno}: pointer {p} out of range"
                    )));
                }
                stack.push((p, level - 1));
            }
        }
    }
    if sum != freeblks {
        return Ok(Err(format!(
            "the free-space b-tree holds {sum} blocks, the AGF counts {freeblks}"
        )));
    }
    // the free list: its blocks are used; one inside a free record is an inconsistency
    let mut agfl = vec![0u8; g.sect as usize];
    read(g.ag_byte(ag, 0) + 3 * g.sect, &mut agfl)?;
    let base = if g.v5 {
        if be32(&agfl, 0) != AGFL_MAGIC
            || u64::from(be32(&agfl, 4)) != ag
            || agfl[8..24] != g.meta_uuid
            || !cksum_ok(&agfl, 32)
        {
            return Ok(Err("AGFL magic, checksum or UUID does not match".into()));
        }
        36
    } else {
        0
    };
    let size = (g.sect as usize - base) / 4;
    if flcount > size as u64 || (flcount > 0 && flfirst >= size as u64) {
        return Ok(Err("free list count out of range".into()));
    }
    for i in 0..flcount as usize {
        let e = be32(&agfl, base + 4 * ((flfirst as usize + i) % size));
        if e == NULL_AGBLOCK {
            continue;
        }
        let e = u64::from(e);
        let k = out.partition_point(|r| r.0 + r.1 <= e);
        if e >= len || out.get(k).is_some_and(|r| r.0 <= e) {
            return Ok(Err(format!("free list block {e} is out of range or free")));
        }
    }
    Ok(Ok(out))
}

/// A log record header found in the log.
#[derive(Clone, Copy)]
struct Rec {
    blk: u64,
    cycle: u32,
    /// Header blocks (1, or more for v2 logs with large in-core logs).
    hblks: u64,
    /// Data blocks after the header.
    dblks: u64,
}

/// Whether recovering this log would change nothing but the superblock: `Ok(Ok(()))`
/// when clean or covered, `Ok(Err(why))` otherwise.
fn log_state(read: &mut ReadAt<'_>, start: u64, bbs: u64) -> Outcome<()> {
    const DIRTY: &str = "the log holds transactions not yet written back (freeze the \
                         filesystem with --freeze for a clean log, or unmount it)";
    // the cycle word of every log block, and the record headers
    let mut cyc: Vec<u32> = Vec::with_capacity(bbs as usize);
    let mut heads: Vec<u64> = Vec::new();
    let chunk = 2048u64; // blocks per read (1 MiB)
    let mut buf = vec![0u8; (chunk * BB) as usize];
    let mut at = 0u64;
    while at < bbs {
        let n = chunk.min(bbs - at);
        let b = &mut buf[..(n * BB) as usize];
        read(start + at * BB, b)?;
        for i in 0..n as usize {
            let w = be32(b, i * BB as usize);
            if w == LOG_MAGIC {
                heads.push(at + i as u64);
                cyc.push(be32(b, i * BB as usize + 4));
            } else {
                cyc.push(w);
            }
        }
        at += n;
    }
    // the last record written: the valid header with the highest LSN
    let mut last: Option<(Rec, Vec<u8>)> = None;
    for &h in &heads {
        let Some((r, hb)) = header(read, start, bbs, h)? else {
            continue;
        };
        if last
            .as_ref()
            .is_none_or(|(l, _)| r.cycle > l.cycle || (r.cycle == l.cycle && r.blk > l.blk))
        {
            last = Some((r, hb));
        }
    }
    let Some((r, hb)) = last else {
        return Ok(Err("no log record found".into()));
    };
    let c = r.cycle;
    let head = r.blk + r.hblks + r.dblks;
    if head > bbs {
        return Ok(Err(DIRTY.into()));
    }
    // nothing after it: its pass before it, an older pass after it
    if cyc[..head as usize].iter().any(|&x| x != c) || cyc[head as usize..].iter().any(|&x| x >= c)
    {
        return Ok(Err(DIRTY.into()));
    }
    let data = match record_data(read, start, bbs, &r, &hb)? {
        Some(d) => d,
        None => return Ok(Err(DIRTY.into())),
    };
    // an unmount record last: recovery replays nothing
    if be32(&hb, 40) == 1 && data.len() >= 12 && data[9] & OP_UNMOUNT != 0 {
        return Ok(Ok(()));
    }
    // covered: every record from the tail to the head logs only the superblock
    let tail = be64(&hb, 24);
    let (tc, tb) = ((tail >> 32) as u32, tail & 0xFFFF_FFFF);
    let mut p = tb;
    let mut pc = tc;
    if tb >= bbs || !(tc == c && tb <= r.blk || tc.wrapping_add(1) == c && tb >= head) {
        return Ok(Err(DIRTY.into()));
    }
    let mut steps = 0u64;
    loop {
        steps += 1;
        if steps > bbs {
            return Ok(Err(DIRTY.into()));
        }
        let Some((q, qh)) = header(read, start, bbs, p)? else {
            return Ok(Err(DIRTY.into()));
        };
        if q.cycle != pc || cyc.get(p as usize) != Some(&pc) {
            return Ok(Err(DIRTY.into()));
        }
        let Some(d) = record_data(read, start, bbs, &q, &qh)? else {
            return Ok(Err(DIRTY.into()));
        };
        if !only_superblock(&d, be32(&qh, 40)) {
            return Ok(Err(DIRTY.into()));
        }
        if q.blk == r.blk && q.cycle == c {
            return Ok(Ok(()));
        }
        p = q.blk + q.hblks + q.dblks;
        if p > bbs {
            return Ok(Err(DIRTY.into())); // a record split across passes
        }
        if p == bbs {
            p = 0;
            pc = pc.wrapping_add(1);
        }
    }
}

/// The record header at log block `h`, if it is one whose fields are in range.
fn header(read: &mut ReadAt<'_>, start: u64, bbs: u64, h: u64) -> Result<Option<(Rec, Vec<u8>)>> {
    let mut hb = vec![0u8; BB as usize];
    read(start + h * BB, &mut hb)?;
    let cycle = be32(&hb, 4);
    let version = be32(&hb, 8);
    let len = u64::from(be32(&hb, 12));
    let lsn = be64(&hb, 16);
    if be32(&hb, 0) != LOG_MAGIC
        || !matches!(version, 1 | 2)
        || lsn != (u64::from(cycle) << 32 | h)
        || cycle == 0
    {
        return Ok(None);
    }
    let size = u64::from(be32(&hb, 320));
    let hblks = if version == 2 && size > HEADER_CYCLE_SIZE {
        if size > 256 * 1024 {
            return Ok(None);
        }
        size.div_ceil(HEADER_CYCLE_SIZE)
    } else {
        1
    };
    let dblks = len.div_ceil(BB);
    if h >= bbs {
        return Ok(None);
    }
    Ok(Some((
        Rec {
            blk: h,
            cycle,
            hblks,
            dblks,
        },
        hb,
    )))
}

/// A record's data with the cycle words put back, if complete: within the log, every
/// block stamped with its cycle, its CRC right, one header's worth of data.
fn record_data(
    read: &mut ReadAt<'_>,
    start: u64,
    bbs: u64,
    r: &Rec,
    hb: &[u8],
) -> Result<Option<Vec<u8>>> {
    let len = be32(hb, 12) as usize;
    if len as u64 > HEADER_CYCLE_SIZE || r.blk + r.hblks + r.dblks > bbs {
        return Ok(None);
    }
    let mut d = vec![0u8; (r.dblks * BB) as usize];
    read(start + (r.blk + r.hblks) * BB, &mut d)?;
    for i in 0..r.dblks as usize {
        if be32(&d, i * BB as usize) != r.cycle {
            return Ok(None);
        }
    }
    if le32(hb, 32) != 0 {
        // crc32c of the header (without h_crc), then the packed data; the header is
        // 328 bytes where 64-bit fields are 8-aligned, 324 where they are not. A zero
        // h_crc is no checksum (mkfs writes its unmount record so), as the kernel's
        // check of the last records takes it
        let want = le32(hb, 32);
        let ok = [328usize, 324].iter().any(|&hl| {
            let mut c = crc32c_update(!0, &hb[..32]);
            c = crc32c_update(c, &[0; 4]);
            c = crc32c_update(c, &hb[36..hl]);
            c = crc32c_update(c, &d[..len]);
            !c == want
        });
        if !ok {
            return Ok(None);
        }
    }
    for i in 0..r.dblks as usize {
        let o = i * BB as usize;
        d[o..o + 4].copy_from_slice(&hb[44 + 4 * i..48 + 4 * i]);
    }
    d.truncate(len);
    Ok(Some(d))
}

/// Whether a record's operations are only transactions logging the primary
/// superblock's buffer (and unmount records): what replaying it writes is the
/// superblock alone.
fn only_superblock(d: &[u8], nops: u32) -> bool {
    let mut o = 0usize;
    let mut data_regions = 0u32;
    for _ in 0..nops {
        if o + 12 > d.len() {
            return false;
        }
        let len = be32(d, o + 4) as usize;
        let flags = d[o + 9];
        let body = o + 12;
        if body + len > d.len() || flags & OP_CONTINUE != 0 {
            return false;
        }
        let b = &d[body..body + len];
        if data_regions > 0 {
            data_regions -= 1;
        } else if flags & (OP_START | OP_COMMIT | OP_UNMOUNT) != 0 {
            if flags & OP_UNMOUNT == 0 && len != 0 {
                return false;
            }
        } else if len >= 16 && le32(b, 0) == TRANS_MAGIC {
            // the transaction header
        } else if len >= 16 && le16(b, 0) == LI_BUF {
            let regions = u32::from(le16(b, 2));
            let blkno = u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
            if blkno != 0 || regions == 0 {
                return false;
            }
            data_regions = regions - 1;
        } else {
            return false;
        }
        o = body + len;
    }
    data_regions == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_value() {
        assert_eq!(!crc32c_update(!0, b"123456789"), 0xE306_9283);
    }

    #[test]
    fn checksum_field_is_taken_as_zero() {
        let mut b = vec![7u8; 64];
        let mut c = crc32c_update(!0, &b[..8]);
        c = crc32c_update(c, &[0; 4]);
        c = crc32c_update(c, &b[12..]);
        b[8..12].copy_from_slice(&(!c).to_le_bytes());
        assert!(cksum_ok(&b, 8));
        b[40] ^= 1;
        assert!(!cksum_ok(&b, 8));
    }

    #[test]
    fn superblock_only_transactions() {
        let op = |tid: u32, flags: u8, body: &[u8]| {
            let mut v = Vec::new();
            v.extend_from_slice(&tid.to_be_bytes());
            v.extend_from_slice(&(body.len() as u32).to_be_bytes());
            v.extend_from_slice(&[0x69, flags, 0, 0]);
            v.extend_from_slice(body);
            v
        };
        let mut th = TRANS_MAGIC.to_le_bytes().to_vec();
        th.extend_from_slice(&[0; 12]);
        let buf = |blkno: u64| {
            let mut b = LI_BUF.to_le_bytes().to_vec();
            b.extend_from_slice(&2u16.to_le_bytes());
            b.extend_from_slice(&[0; 4]);
            b.extend_from_slice(&blkno.to_le_bytes());
            b.extend_from_slice(&[0; 8]);
            b
        };
        let rec = |blkno: u64| {
            let mut d = op(1, OP_START, &[]);
            d.extend(op(1, 0, &th));
            d.extend(op(1, 0, &buf(blkno)));
            d.extend(op(1, 0, &[0xAB; 384]));
            d.extend(op(1, OP_COMMIT, &[]));
            d
        };
        assert!(only_superblock(&rec(0), 5));
        assert!(
            !only_superblock(&rec(8), 5),
            "an AGF buffer is not the superblock"
        );
        assert!(!only_superblock(&rec(0), 6), "an op past the data");
        let mut other = op(1, OP_START, &[]);
        other.extend(op(1, 0, &th));
        other.extend(op(
            1,
            0,
            &[0x3B, 0x12, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ));
        assert!(!only_superblock(&other, 3), "an inode item");
    }
}
