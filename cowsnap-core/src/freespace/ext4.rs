//! ext2/3/4 free space: the block bitmaps, as of the instant, minus what the journal
//! could still change.
//!
//! Design notes
//! - Read: the superblock (byte 1024), the group descriptor table (the block after the
//!   first data block; `meta_bg` is not supported), then each group's block bitmap —
//!   runs of consecutive bitmap blocks (flex_bg places them together) in one read. A
//!   set bit is a used block.
//! - `BLOCK_UNINIT` groups have no bitmap on disk: the group is free except its own
//!   superblock backup and descriptor blocks (sparse_super groups) and any group's
//!   bitmaps or inode table placed in it — what the kernel's `ext4_init_block_bitmap`
//!   would set.
//! - With an empty journal, a group whose bitmap and free count disagree is treated as
//!   used (they are written together, so the metadata is not what it should be).
//! - The journal (internal, inode 8, extent- or block-mapped): a mounted ext4 writes
//!   new bitmap and descriptor blocks to the journal first; the data of a newly
//!   allocated block may already be on disk, and a restore replays the journal, so a
//!   block free in the on-disk bitmap may be in use once restored. After a replay each
//!   block holds its newest copy among the one on disk and those in the journal's
//!   live transactions (jbd2 moves the tail past a transaction only once its blocks
//!   are checkpointed). So unless the journal is empty (`s_start == 0`), the log is
//!   walked as recovery will walk it on the restored disk — from the superblock's
//!   `s_start`/`s_sequence` as they are in this very image. Without async commit, jbd2
//!   writes a commit block only after its transaction's blocks are on disk, so every
//!   transaction whose commit block is in the image is replayed, in log order: a bitmap
//!   or descriptor block is taken as its last committed copy (the replay's result),
//!   the one on disk when the log holds none; an uncommitted tail is not replayed and
//!   ignored. With async commit a block is free only if free on disk and in every
//!   copy, committed or not. A journal that cannot be read makes the answer unknown.
//! - Unknown: a feature that changes the layout or the replay (meta_bg, bigalloc,
//!   sparse_super2, fast_commit, an external journal, a compression flag, any
//!   incompat bit not listed in [`INCOMPAT_OK`]), a field out of range, a filesystem
//!   larger than the disk.
//! - Blocks outside the filesystem (before the first data block, past the block count)
//!   are never free: the disk may hold something else there.

use super::{merge, Probe, ReadAt, MAX_TABLE_BYTES};
use crate::error::Result;
use std::collections::{HashMap, HashSet};

/// An I/O error (`Err`), or the answer: a value or why the filesystem cannot be
/// read (`Ok(Err(why))`, which makes the probe's answer unknown).
type Outcome<T> = Result<std::result::Result<T, String>>;
/// An inode's data as (logical block, physical block, count) runs.
type Extents = Vec<(u64, u64, u64)>;

const MAGIC: u16 = 0xEF53;
const JBD2_MAGIC: u32 = 0xC03B_3998;

const COMPAT_HAS_JOURNAL: u32 = 0x4;
const COMPAT_SPARSE_SUPER2: u32 = 0x200;
const COMPAT_FAST_COMMIT: u32 = 0x400;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_BIGALLOC: u32 = 0x200;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_64BIT: u32 = 0x80;
/// Incompat features whose layout of bitmaps and descriptors is understood here:
/// filetype, recover, extents, 64bit, mmp, flex_bg, ea_inode, dirdata, csum_seed,
/// largedir, inline_data, encrypt, casefold.
pub const INCOMPAT_OK: u32 = 0x2
    | 0x4
    | 0x40
    | 0x80
    | 0x100
    | 0x200
    | 0x400
    | 0x1000
    | 0x2000
    | 0x4000
    | 0x8000
    | 0x10000
    | 0x20000;
const BG_BLOCK_UNINIT: u16 = 0x2;
const EXTENTS_FL: u32 = 0x8_0000;

/// Whether `sb` (the 1024 bytes at offset 1024) carries the ext2/3/4 magic.
pub fn is_ext(sb: &[u8]) -> bool {
    sb.len() >= 1024 && le16(sb, 56) == MAGIC
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn unknown(why: impl Into<String>) -> Result<Probe> {
    Ok(Probe::Unknown {
        why: format!("ext4: {}", why.into()),
    })
}

struct Geo {
    bs: u64,
    blocks: u64,
    first: u64,
    bpg: u64,
    ipg: u64,
    inode_size: u64,
    desc_size: usize,
    groups: u64,
    gdt_blocks: u64,
    reserved_gdt: u64,
    sparse_super: bool,
    is64: bool,
}

impl Geo {
    fn group_range(&self, g: u64) -> (u64, u64) {
        let a = self.first + g * self.bpg;
        (a, (a + self.bpg).min(self.blocks))
    }
    fn has_super(&self, g: u64) -> bool {
        if !self.sparse_super || g <= 1 {
            return true;
        }
        [3u64, 5, 7].iter().any(|&p| {
            let mut x = p;
            while x < g {
                x *= p;
            }
            x == g
        })
    }
}

struct Desc {
    block_bitmap: u64,
    inode_bitmap: u64,
    inode_table: u64,
    free: u64,
    flags: u16,
}

fn desc(g: &Geo, t: &[u8], i: u64) -> Desc {
    let o = i as usize * g.desc_size;
    let d = &t[o..o + g.desc_size];
    let hi = |lo: u32, at: usize| {
        let h = if g.is64 { u64::from(le32(d, at)) } else { 0 };
        u64::from(lo) | (h << 32)
    };
    let free_hi = if g.is64 { u64::from(le16(d, 0x2C)) } else { 0 };
    Desc {
        block_bitmap: hi(le32(d, 0), 0x20),
        inode_bitmap: hi(le32(d, 4), 0x24),
        inode_table: hi(le32(d, 8), 0x28),
        free: u64::from(le16(d, 12)) | (free_hi << 16),
        flags: le16(d, 18),
    }
}

/// Read the free space of the ext2/3/4 filesystem whose superblock is `sb`.
pub fn probe(read: &mut ReadAt<'_>, disk_size: u64, sb: &[u8]) -> Result<Probe> {
    let compat = le32(sb, 92);
    let incompat = le32(sb, 96);
    let ro_compat = le32(sb, 100);
    if incompat & !INCOMPAT_OK != 0 {
        return unknown(format!(
            "unsupported incompatible features {:#x}",
            incompat & !INCOMPAT_OK
        ));
    }
    if incompat & (INCOMPAT_META_BG | INCOMPAT_JOURNAL_DEV) != 0 {
        return unknown("meta_bg or journal-device layout is not supported");
    }
    if ro_compat & RO_COMPAT_BIGALLOC != 0 {
        return unknown("bigalloc is not supported");
    }
    if compat & (COMPAT_SPARSE_SUPER2 | COMPAT_FAST_COMMIT) != 0 {
        return unknown("sparse_super2 or fast_commit is not supported");
    }
    let log_bs = le32(sb, 24);
    if log_bs > 6 {
        return unknown(format!("block size 2^{} is out of range", 10 + log_bs));
    }
    let bs = 1024u64 << log_bs;
    let is64 = incompat & INCOMPAT_64BIT != 0;
    let blocks = u64::from(le32(sb, 4))
        | if is64 {
            u64::from(le32(sb, 336)) << 32
        } else {
            0
        };
    let first = u64::from(le32(sb, 20));
    let bpg = u64::from(le32(sb, 32));
    let ipg = u64::from(le32(sb, 40));
    let inode_size = if le32(sb, 76) == 0 {
        128
    } else {
        u64::from(le16(sb, 88))
    };
    let desc_size = if is64 { usize::from(le16(sb, 254)) } else { 32 };
    if bpg == 0 || bpg > 8 * bs || blocks <= first || first > 1 || ipg == 0 {
        return unknown("superblock geometry out of range");
    }
    if !(32..=1024).contains(&desc_size) || !desc_size.is_power_of_two() {
        return unknown(format!("group descriptor size {desc_size} out of range"));
    }
    if !(128..=bs).contains(&inode_size) || !inode_size.is_power_of_two() {
        return unknown(format!("inode size {inode_size} out of range"));
    }
    if blocks.checked_mul(bs).is_none_or(|b| b > disk_size) {
        return unknown("the filesystem is larger than the disk");
    }
    let groups = (blocks - first).div_ceil(bpg);
    let table = groups * desc_size as u64;
    if table > MAX_TABLE_BYTES {
        return unknown("group descriptor table too large");
    }
    let g = Geo {
        bs,
        blocks,
        first,
        bpg,
        ipg,
        inode_size,
        desc_size,
        groups,
        gdt_blocks: table.div_ceil(bs),
        reserved_gdt: u64::from(le16(sb, 206)),
        sparse_super: ro_compat & RO_COMPAT_SPARSE_SUPER != 0,
        is64,
    };
    if 1 + g.gdt_blocks + g.reserved_gdt > bpg {
        return unknown("descriptor blocks do not fit in a group");
    }
    let mut gdt = vec![0u8; (g.gdt_blocks * bs) as usize];
    read((first + 1) * bs, &mut gdt)?;
    let descs: Vec<Desc> = (0..groups).map(|i| desc(&g, &gdt, i)).collect();
    let itb = (ipg * inode_size).div_ceil(bs);
    for (i, d) in descs.iter().enumerate() {
        let inside = |b: u64, n: u64| b >= first && b.checked_add(n).is_some_and(|e| e <= blocks);
        if !inside(d.block_bitmap, 1) || !inside(d.inode_bitmap, 1) || !inside(d.inode_table, itb) {
            return unknown(format!("group {i}: metadata outside the filesystem"));
        }
    }

    // every copy of a bitmap or descriptor block the journal holds (any transaction)
    let mut interesting: HashSet<u64> = descs.iter().map(|d| d.block_bitmap).collect();
    interesting.extend((0..g.gdt_blocks).map(|k| first + 1 + k));
    let mut copies: HashMap<u64, Vec<JCopy>> = HashMap::new();
    let mut exact = true;
    if compat & COMPAT_HAS_JOURNAL != 0 {
        match journal_copies(read, &g, &descs, sb, &interesting)? {
            Ok((c, e)) => (copies, exact) = (c, e),
            Err(why) => return unknown(why),
        }
    }
    let journal_empty = copies.is_empty();
    let dpb = bs / desc_size as u64;
    // a group is BLOCK_UNINIT as its descriptor says after the replay (exact), or only
    // if it is so on disk and in every journaled copy (not exact)
    let mut uninit: Vec<bool> = descs
        .iter()
        .map(|d| d.flags & BG_BLOCK_UNINIT != 0)
        .collect();
    let mut groups_journaled = 0u64;
    for k in 0..g.gdt_blocks {
        let Some(cs) = copies.get(&(first + 1 + k)) else {
            continue;
        };
        for c in cs {
            let blk = read_copy(read, &g, c)?;
            for j in 0..dpb {
                let gi = k * dpb + j;
                if gi >= groups {
                    break;
                }
                let d = desc(&g, &blk, j);
                if d.block_bitmap != descs[gi as usize].block_bitmap {
                    return unknown(format!(
                        "group {gi}: the journal moves its bitmap (an online resize?)"
                    ));
                }
                let u = d.flags & BG_BLOCK_UNINIT != 0;
                if exact {
                    uninit[gi as usize] = u;
                } else if !u {
                    uninit[gi as usize] = false;
                }
            }
        }
    }

    // metadata of every group, for the BLOCK_UNINIT groups
    let mut meta: Vec<(u64, u64)> = Vec::with_capacity(descs.len() * 3);
    for d in &descs {
        meta.push((d.block_bitmap, d.block_bitmap + 1));
        meta.push((d.inode_bitmap, d.inode_bitmap + 1));
        meta.push((d.inode_table, d.inode_table + itb));
    }
    let meta = merge(meta);

    let mut free: Vec<(u64, u64)> = Vec::new();
    let mut counts_disagree = 0u64;
    let mut i = 0u64;
    while i < groups {
        let d = &descs[i as usize];
        if uninit[i as usize] {
            let (a, b) = g.group_range(i);
            let mut start = a;
            if g.has_super(i) {
                start += 1 + g.gdt_blocks + g.reserved_gdt;
            }
            // the group minus any metadata placed in it
            let mut at = start;
            let k = meta.partition_point(|m| m.1 <= at);
            for &(ma, mb) in &meta[k..] {
                if ma >= b {
                    break;
                }
                if ma > at {
                    free.push((at, ma));
                }
                at = at.max(mb);
            }
            if at < b {
                free.push((at, b));
            }
            i += 1;
            continue;
        }
        // a run of initialised groups whose bitmaps are consecutive blocks: one read
        let mut n = 1u64;
        while i + n < groups && n < 256 {
            let e = &descs[(i + n) as usize];
            if uninit[(i + n) as usize] || e.block_bitmap != d.block_bitmap + n {
                break;
            }
            n += 1;
        }
        let mut bm = vec![0u8; (n * bs) as usize];
        read(d.block_bitmap * bs, &mut bm)?;
        for j in 0..n {
            let gi = i + j;
            let (a, b) = g.group_range(gi);
            let bits = &mut bm[(j * bs) as usize..((j + 1) * bs) as usize];
            // exact: the bitmap is the copy the replay writes last; not exact: used in
            // any copy or on disk is used (the replayed bitmap is one of them)
            let mut journaled = false;
            if let Some(cs) = copies.get(&descs[gi as usize].block_bitmap) {
                for c in cs {
                    let cb = read_copy(read, &g, c)?;
                    if exact {
                        bits.copy_from_slice(&cb);
                    } else {
                        for (x, y) in bits.iter_mut().zip(&cb) {
                            *x |= y;
                        }
                    }
                }
                journaled = true;
                groups_journaled += 1;
            }
            let used = |k: u64| bits[(k / 8) as usize] & (1 << (k % 8)) != 0;
            let mut runs = Vec::new();
            let mut nfree = 0u64;
            let mut k = 0u64;
            while k < b - a {
                if used(k) {
                    k += 1;
                    continue;
                }
                let s = k;
                while k < b - a && !used(k) {
                    k += 1;
                }
                runs.push((a + s, a + k));
                nfree += k - s;
            }
            // with an empty journal the bitmap and the count were written together;
            // disagreeing, neither is trusted
            if journal_empty && !journaled && nfree != descs[gi as usize].free {
                counts_disagree += 1;
                continue;
            }
            free.extend(runs);
        }
        i += n;
    }
    let ranges: Vec<(u64, u64)> = merge(free)
        .into_iter()
        .map(|(a, b)| (a * bs, b * bs))
        .collect();
    let free_bytes = ranges.iter().map(|r| r.1 - r.0).sum();
    let mut caveats = Vec::new();
    if groups_journaled > 0 {
        caveats.push(format!(
            "{groups_journaled} group bitmap(s) taken from the journal{}",
            if exact {
                " (the copies its replay writes)"
            } else {
                " (async commit: a block is free only if free in every copy)"
            }
        ));
    }
    if counts_disagree > 0 {
        caveats.push(format!(
            "{counts_disagree} block group(s) treated as used: their bitmap and free count disagree"
        ));
    }
    Ok(Probe::Free {
        fs: "ext4",
        ranges,
        free_bytes,
        caveat: (!caveats.is_empty()).then(|| caveats.join("; ")),
    })
}

/// Where the journal holds a copy of a filesystem block.
struct JCopy {
    /// Physical block of the copy.
    phys: u64,
    /// Its first four bytes were the journal magic and are stored as zeros.
    escaped: bool,
}

/// Read a journaled copy, undoing the escape.
fn read_copy(read: &mut ReadAt<'_>, g: &Geo, c: &JCopy) -> Result<Vec<u8>> {
    let mut b = vec![0u8; g.bs as usize];
    read(c.phys * g.bs, &mut b)?;
    if c.escaped {
        b[..4].copy_from_slice(&JBD2_MAGIC.to_be_bytes());
    }
    Ok(b)
}

/// Physical extents (block, count) of an inode's data, from its extent tree.
fn inode_extents(read: &mut ReadAt<'_>, g: &Geo, descs: &[Desc], ino: u64) -> Outcome<Extents> {
    if ino == 0 || ino > g.groups * g.ipg {
        return Ok(Err(format!("journal inode {ino} out of range")));
    }
    let grp = (ino - 1) / g.ipg;
    let idx = (ino - 1) % g.ipg;
    let mut inode = vec![0u8; g.inode_size as usize];
    read(
        descs[grp as usize].inode_table * g.bs + idx * g.inode_size,
        &mut inode,
    )?;
    if le32(&inode, 0x20) & EXTENTS_FL == 0 {
        return block_mapped(read, g, &inode[0x28..0x28 + 60]);
    }
    let mut out = Vec::new();
    let mut visits = 0usize;
    let root = inode[0x28..0x28 + 60].to_vec();
    Ok(walk(read, g, &root, 5, &mut out, &mut visits)?.map(|()| out))
}

/// The blocks of an ext2/3-style (direct, indirect, double and triple indirect)
/// mapped inode, as (logical, physical, 1) runs joined where contiguous.
fn block_mapped(read: &mut ReadAt<'_>, g: &Geo, iblock: &[u8]) -> Outcome<Extents> {
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    let per = g.bs / 4;
    let mut logical = 0u64;
    let push = |out: &mut Vec<(u64, u64, u64)>, logical: &mut u64, phys: u64| {
        if phys != 0 {
            match out.last_mut() {
                Some(l) if l.0 + l.2 == *logical && l.1 + l.2 == phys => l.2 += 1,
                _ => out.push((*logical, phys, 1)),
            }
        }
        *logical += 1;
    };
    for i in 0..12 {
        push(&mut out, &mut logical, u64::from(le32(iblock, i * 4)));
    }
    // (pointer, levels of indirection) walked depth first with an explicit stack
    let mut reads = 0u64;
    for (slot, levels) in [(12usize, 1u32), (13, 2), (14, 3)] {
        let top = u64::from(le32(iblock, slot * 4));
        if top == 0 {
            logical += per.pow(levels);
            continue;
        }
        let mut stack: Vec<(u64, u32)> = vec![(top, levels)];
        while let Some((blk, lv)) = stack.pop() {
            if blk == 0 {
                logical += per.pow(lv);
                continue;
            }
            if blk < g.first || blk >= g.blocks {
                return Ok(Err("journal block map points outside the filesystem".into()));
            }
            reads += 1;
            if reads > 1 << 20 {
                return Ok(Err("journal block map too large".into()));
            }
            let mut b = vec![0u8; g.bs as usize];
            read(blk * g.bs, &mut b)?;
            if lv == 1 {
                for k in 0..per as usize {
                    let p = u64::from(le32(&b, k * 4));
                    if p != 0 && (p < g.first || p >= g.blocks) {
                        return Ok(Err("journal block outside the filesystem".into()));
                    }
                    push(&mut out, &mut logical, p);
                }
            } else {
                // children in reverse so they pop in order
                for k in (0..per as usize).rev() {
                    stack.push((u64::from(le32(&b, k * 4)), lv - 1));
                }
            }
        }
    }
    Ok(Ok(out))
}

/// One node of an extent tree: leaves push (logical, physical, count).
fn walk(
    read: &mut ReadAt<'_>,
    g: &Geo,
    node: &[u8],
    depth_left: u16,
    out: &mut Vec<(u64, u64, u64)>,
    visits: &mut usize,
) -> Outcome<()> {
    *visits += 1;
    if *visits > 100_000 {
        return Ok(Err("journal extent tree too large".into()));
    }
    if node.len() < 12 || le16(node, 0) != 0xF30A {
        return Ok(Err("bad extent header in the journal inode".into()));
    }
    let entries = usize::from(le16(node, 2));
    let depth = le16(node, 6);
    if depth > depth_left || 12 + entries * 12 > node.len() {
        return Ok(Err("journal extent tree out of range".into()));
    }
    for e in 0..entries {
        let o = 12 + e * 12;
        if depth == 0 {
            let logical = u64::from(le32(node, o));
            let mut len = u64::from(le16(node, o + 4));
            if len > 32768 {
                len -= 32768;
            }
            let phys = (u64::from(le16(node, o + 6)) << 32) | u64::from(le32(node, o + 8));
            if phys < g.first || phys.saturating_add(len) > g.blocks {
                return Ok(Err("journal extent outside the filesystem".into()));
            }
            out.push((logical, phys, len));
        } else {
            let child = u64::from(le32(node, o + 4)) | (u64::from(le16(node, o + 8)) << 32);
            if child < g.first || child >= g.blocks {
                return Ok(Err("journal extent index outside the filesystem".into()));
            }
            let mut b = vec![0u8; g.bs as usize];
            read(child * g.bs, &mut b)?;
            if let Err(e) = walk(read, g, &b, depth - 1, out, visits)? {
                return Ok(Err(e));
            }
        }
    }
    Ok(Ok(()))
}

/// The copies of the blocks in `wanted` that a replay of this journal writes: the log
/// walked as recovery walks it — from `s_start`, block headers carrying the expected
/// sequence, a commit block moving to the next. Exact (`true`, no async commit): for
/// each block, the copy of the last committed transaction (what the replay leaves);
/// otherwise every copy, committed or not (a superset). Each tag's data is the journal
/// block after the descriptor at the tag's position, wrapping at the journal's end.
/// Revokes are ignored: bitmap and descriptor blocks are never revoked. Empty when
/// the journal is empty (`s_start == 0`).
fn journal_copies(
    read: &mut ReadAt<'_>,
    g: &Geo,
    descs: &[Desc],
    sb: &[u8],
    wanted: &HashSet<u64>,
) -> Outcome<(HashMap<u64, Vec<JCopy>>, bool)> {
    if le32(sb, 228) != 0 {
        return Ok(Err("external journal".into()));
    }
    let ino = u64::from(le32(sb, 224));
    let extents = match inode_extents(read, g, descs, ino)? {
        Ok(e) => e,
        Err(why) => return Ok(Err(why)),
    };
    // logical journal block -> physical
    let phys_of = |l: u64| {
        extents
            .iter()
            .find(|e| l >= e.0 && l < e.0 + e.2)
            .map(|e| e.1 + (l - e.0))
    };
    let Some(jsb_phys) = phys_of(0) else {
        return Ok(Err("the journal has no first block".into()));
    };
    let bs = g.bs as usize;
    let mut jsb = vec![0u8; bs];
    read(jsb_phys * g.bs, &mut jsb)?;
    if be32(&jsb, 0) != JBD2_MAGIC || !matches!(be32(&jsb, 4), 3 | 4) {
        return Ok(Err("bad journal superblock".into()));
    }
    if u64::from(be32(&jsb, 0xC)) != g.bs {
        return Ok(Err(
            "journal block size differs from the filesystem's".into()
        ));
    }
    let mut out: HashMap<u64, Vec<JCopy>> = HashMap::new();
    if be32(&jsb, 0x1C) == 0 {
        return Ok(Ok((out, true)));
    }
    let maxlen = u64::from(be32(&jsb, 0x10));
    let jfirst = u64::from(be32(&jsb, 0x14));
    if jfirst == 0 || jfirst >= maxlen || phys_of(maxlen - 1).is_none() {
        return Ok(Err("journal geometry out of range".into()));
    }
    let jincompat = if be32(&jsb, 4) == 4 {
        be32(&jsb, 0x28)
    } else {
        0
    };
    if jincompat & !(0x1 | 0x2 | 0x4 | 0x8 | 0x10) != 0 {
        return Ok(Err(format!("unsupported journal features {jincompat:#x}")));
    }
    let j64 = jincompat & 0x2 != 0;
    // without async commit a commit block is written only after its transaction's
    // blocks are on disk: a committed transaction in this image is one a replay
    // applies, in log order, so the last committed copy is the replayed content
    let exact = jincompat & 0x4 == 0;
    // the copies of the transaction being walked, until its commit block
    let mut pending: Vec<(u64, JCopy)> = Vec::new();
    let csum2 = jincompat & 0x8 != 0;
    let csum3 = jincompat & 0x10 != 0;
    let tag_size = if csum3 {
        if j64 {
            16
        } else {
            12
        }
    } else {
        let mut s = 12 + if csum2 { 2 } else { 0 };
        if !j64 {
            s -= 4;
        }
        s
    };
    let tail = if csum2 || csum3 { 4 } else { 0 };
    let wrap = |l: u64| {
        if l >= maxlen {
            jfirst + (l - maxlen) % (maxlen - jfirst)
        } else {
            l
        }
    };
    // walk the log as recovery will: from s_start, blocks whose header carries the
    // expected sequence; a commit block moves on to the next sequence
    let mut p = u64::from(be32(&jsb, 0x1C));
    let mut seq = be32(&jsb, 0x18);
    if p < jfirst || p >= maxlen {
        return Ok(Err("journal start out of range".into()));
    }
    let mut ncopies = 0usize;
    let mut blk = vec![0u8; bs];
    let mut visited = 0u64;
    while visited < maxlen {
        let Some(phys) = phys_of(p) else {
            return Ok(Err("journal block unmapped".into()));
        };
        read(phys * g.bs, &mut blk)?;
        if be32(&blk, 0) != JBD2_MAGIC || be32(&blk, 8) != seq {
            break; // the end of the log
        }
        match be32(&blk, 4) {
            1 => {
                // descriptor: its tags' data follow it, one block per tag
                let mut o = 12;
                let mut k = 0u64;
                while o + tag_size + tail <= bs {
                    let lo = u64::from(be32(&blk, o));
                    let hi = if j64 { u64::from(be32(&blk, o + 8)) } else { 0 };
                    let flags = if csum3 {
                        be32(&blk, o + 4)
                    } else {
                        u32::from(u16::from_be_bytes([blk[o + 6], blk[o + 7]]))
                    };
                    k += 1;
                    let target = lo | (hi << 32);
                    if wanted.contains(&target) {
                        let Some(phys) = phys_of(wrap(p + k)) else {
                            return Ok(Err("journal block unmapped".into()));
                        };
                        ncopies += 1;
                        if ncopies > 1 << 20 {
                            return Ok(Err("the journal holds too many copies".into()));
                        }
                        let c = JCopy {
                            phys,
                            escaped: flags & 0x1 != 0,
                        };
                        if exact {
                            pending.push((target, c));
                        } else {
                            out.entry(target).or_default().push(c);
                        }
                    }
                    o += tag_size;
                    if flags & 0x2 == 0 {
                        o += 16; // the UUID after a tag without SAME_UUID
                    }
                    if flags & 0x8 != 0 {
                        break; // LAST_TAG
                    }
                }
                visited += 1 + k;
                p = wrap(p + 1 + k);
            }
            2 => {
                // committed: its copies replace earlier ones (last wins)
                for (t, c) in pending.drain(..) {
                    out.insert(t, vec![c]);
                }
                seq = seq.wrapping_add(1);
                visited += 1;
                p = wrap(p + 1);
            }
            5 => {
                visited += 1;
                p = wrap(p + 1);
            }
            _ => break,
        }
    }
    // a transaction without its commit block is not replayed: `pending` is dropped
    Ok(Ok((out, exact)))
}
