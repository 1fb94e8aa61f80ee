//! The free-space reader against real filesystems made by mkfs.ext4 (populated with
//! `mkfs.ext4 -d`, a file then deleted with debugfs): the ranges it calls free are
//! overwritten with garbage in a copy, which must still be e2fsck-clean with every
//! file's bytes unchanged (read back with debugfs) — garbage, not zeros, so a used
//! block called free shows. The free total must match dumpe2fs's. Damaged metadata
//! gives "unknown", never a panic. Skips when e2fsprogs is missing.
//! XFS the same way (populated through a loop mount, so root only; xfs_repair -n and
//! the files read back through a mount), the total checked against the AGFs,
//! fdblocks and xfs_db's freesp; a frozen filesystem's log (covered) is read, a live
//! copy's or a shut-down filesystem's log is not; v4 images are checked unmounted
//! (kernels without CONFIG_XFS_SUPPORT_V4 do not mount them).

use cowsnap_core::freespace::{self, Probe};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(args: &[&str]) -> String {
    let o = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn probe_file(img: &Path) -> Probe {
    let f = std::fs::File::open(img).unwrap();
    let size = f.metadata().unwrap().len();
    let mut read = |off: u64, buf: &mut [u8]| {
        f.read_exact_at(buf, off)
            .map_err(|e| cowsnap_core::Error::io("read test image", e))
    };
    freespace::probe(&mut read, size).unwrap()
}

/// Deterministic pseudo-random bytes.
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn check_variant(mkfs_opts: &[&str], size_mib: u64) {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    let mut files = Vec::new();
    for i in 0..12u64 {
        let name = if i % 3 == 0 {
            format!("sub/f{i}")
        } else {
            format!("f{i}")
        };
        let data = noise(i + 1, (i as usize * 997_001) % (9 << 20) + 1000);
        std::fs::write(src.join(&name), &data).unwrap();
        files.push((name, data));
    }
    // to be deleted: its blocks become free
    std::fs::write(src.join("gone"), noise(99, 20 << 20)).unwrap();
    let img = d.path().join("fs.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(size_mib << 20).unwrap();
    drop(f);
    let mut args = vec!["mkfs.ext4", "-q", "-F"];
    args.extend_from_slice(mkfs_opts);
    let (srcs, imgs) = (src.display().to_string(), img.display().to_string());
    args.extend_from_slice(&["-d", &srcs, &imgs]);
    run(&args);
    run(&["debugfs", "-w", "-R", "rm /gone", &imgs]);
    let Probe::Free {
        fs,
        ranges,
        free_bytes,
        caveat,
    } = probe_file(&img)
    else {
        panic!("{mkfs_opts:?}: not recognised: {:?}", probe_file(&img));
    };
    assert_eq!(fs, "ext4");
    assert_eq!(
        caveat, None,
        "an unmounted, clean filesystem has an empty journal"
    );
    // the total agrees with dumpe2fs
    let dump = run(&["dumpe2fs", "-h", &imgs]);
    let field = |k: &str| -> u64 {
        dump.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let bs = field("Block size:");
    assert_eq!(
        free_bytes,
        field("Free blocks:") * bs,
        "{mkfs_opts:?}: free bytes differ from dumpe2fs"
    );
    assert!(free_bytes > 20 << 20, "the deleted file's blocks are free");
    // garbage over every free range: still clean, files unchanged
    let copy = d.path().join("copy.img");
    std::fs::copy(&img, &copy).unwrap();
    let c = std::fs::OpenOptions::new().write(true).open(&copy).unwrap();
    for (i, &(a, b)) in ranges.iter().enumerate() {
        let mut off = a;
        while off < b {
            let n = (b - off).min(4 << 20) as usize;
            c.write_all_at(&noise(i as u64 * 7919 + off, n), off)
                .unwrap();
            off += n as u64;
        }
    }
    c.sync_all().unwrap();
    drop(c);
    let copys = copy.display().to_string();
    run(&["e2fsck", "-fn", &copys]);
    for (name, data) in &files {
        let out = d.path().join("out");
        let _ = std::fs::remove_file(&out);
        run(&[
            "debugfs",
            "-R",
            &format!("dump /{name} {}", out.display()),
            &copys,
        ]);
        assert!(
            std::fs::read(&out).unwrap() == *data,
            "{mkfs_opts:?}: {name} changed when free space was overwritten"
        );
    }
}

#[test]
fn ext4_variants_free_space_is_exactly_free() {
    if !have("mkfs.ext4") || !have("debugfs") || !have("e2fsck") || !have("dumpe2fs") {
        eprintln!("SKIP: e2fsprogs not installed");
        return;
    }
    check_variant(&[], 256); // small: 1 KiB blocks, flex_bg, 64bit, metadata_csum
    check_variant(&["-b", "4096"], 512);
    check_variant(&["-b", "4096", "-O", "^flex_bg"], 512);
    check_variant(&["-b", "4096", "-O", "^64bit,^metadata_csum"], 512);
    check_variant(&["-b", "2048", "-O", "^has_journal,^resize_inode"], 300);
    check_variant(&["-t", "ext3", "-b", "4096"], 400);
}

#[test]
fn damaged_metadata_is_unknown_not_a_panic() {
    if !have("mkfs.ext4") {
        eprintln!("SKIP: e2fsprogs not installed");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("fs.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    run(&[
        "mkfs.ext4",
        "-q",
        "-F",
        "-b",
        "4096",
        &img.display().to_string(),
    ]);
    let good = std::fs::read(&img).unwrap();
    let mut seen_unknown = 0;
    // damage one superblock or descriptor field at a time
    for (off, val) in [
        (1024 + 4, 0xFFFF_FFFFu32),  // block count beyond the disk
        (1024 + 24, 40),             // block size
        (1024 + 32, 0),              // blocks per group
        (1024 + 96, 0x8000_0000),    // unknown incompat feature
        (1024 + 224, 1_000_000_000), // journal inode out of range
        (4096, 0xFFFF_FFF0),         // group 0's bitmap far outside
    ] {
        let mut b = good.clone();
        b[off..off + 4].copy_from_slice(&val.to_le_bytes());
        let size = b.len() as u64;
        let mut read = |o: u64, buf: &mut [u8]| {
            let o = o as usize;
            match b.get(o..o + buf.len()) {
                Some(s) => {
                    buf.copy_from_slice(s);
                    Ok(())
                }
                None => Err(cowsnap_core::err!(InvalidInput, "read beyond the image")),
            }
        };
        match freespace::probe(&mut read, size) {
            Ok(Probe::Unknown { .. }) | Err(_) => seen_unknown += 1,
            Ok(p) => panic!("damage at {off} gave {p:?}"),
        }
    }
    assert_eq!(seen_unknown, 6);
    // random bytes over the whole first megabyte: never a panic
    for seed in 0..50u64 {
        let mut b = good.clone();
        let n = noise(seed, 1 << 20);
        b[1024..1 << 20].copy_from_slice(&n[1024..]);
        b[1024 + 56..1024 + 58].copy_from_slice(&0xEF53u16.to_le_bytes());
        let size = b.len() as u64;
        let mut read = |o: u64, buf: &mut [u8]| {
            let o = o as usize;
            match b.get(o..o + buf.len()) {
                Some(s) => {
                    buf.copy_from_slice(s);
                    Ok(())
                }
                None => Err(cowsnap_core::err!(InvalidInput, "read beyond the image")),
            }
        };
        let _ = freespace::probe(&mut read, size);
    }
}

// ---- XFS: populated through a loop mount (root only), the log left clean by
// unmount, covered by a freeze, or dirty after a shutdown.

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn have_xfs() -> bool {
    [
        "mkfs.xfs",
        "xfs_db",
        "xfs_repair",
        "xfs_io",
        "xfs_freeze",
        "mount",
        "umount",
    ]
    .iter()
    .all(|c| have(c))
}

/// A mounted loop filesystem, unmounted on drop (also when a test fails).
struct Mounted(std::path::PathBuf);

impl Mounted {
    fn new(img: &Path, dir: &Path, opts: &str) -> Mounted {
        std::fs::create_dir_all(dir).unwrap();
        run(&[
            "mount",
            "-o",
            &format!("loop{opts}"),
            &img.display().to_string(),
            &dir.display().to_string(),
        ]);
        Mounted(dir.to_path_buf())
    }
    fn unmount(self) {
        run(&["umount", &self.0.display().to_string()]);
        std::mem::forget(self);
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let d = self.0.display().to_string();
        let _ = Command::new("xfs_freeze").args(["-u", &d]).output();
        if !Command::new("umount")
            .arg(&d)
            .status()
            .is_ok_and(|s| s.success())
        {
            let _ = Command::new("umount").args(["-l", &d]).status();
        }
    }
}

fn sparse_image(path: &Path, mib: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(mib << 20).unwrap();
}

/// Files written into a mounted filesystem: (name, bytes).
fn populate(m: &Path, seed: u64) -> Vec<(String, Vec<u8>)> {
    std::fs::create_dir_all(m.join("sub")).unwrap();
    let mut files = Vec::new();
    for i in 0..12u64 {
        let name = if i % 3 == 0 {
            format!("sub/f{i}")
        } else {
            format!("f{i}")
        };
        let data = noise(seed + i + 1, (i as usize * 797_003) % (7 << 20) + 1000);
        std::fs::write(m.join(&name), &data).unwrap();
        files.push((name, data));
    }
    std::fs::write(m.join("gone"), noise(seed + 99, 20 << 20)).unwrap();
    run(&["sync"]);
    std::fs::remove_file(m.join("gone")).unwrap();
    files
}

/// Garbage over every range called free, in place.
fn garble(img: &Path, ranges: &[(u64, u64)]) {
    let c = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    for (i, &(a, b)) in ranges.iter().enumerate() {
        let mut off = a;
        while off < b {
            let n = (b - off).min(4 << 20) as usize;
            c.write_all_at(&noise(i as u64 * 7919 + off, n), off)
                .unwrap();
            off += n as u64;
        }
    }
    c.sync_all().unwrap();
}

fn xfs_db(img: &Path, cmds: &[&str]) -> String {
    let mut args = vec!["xfs_db", "-r"];
    for c in cmds {
        args.extend_from_slice(&["-c", c]);
    }
    let imgs = img.display().to_string();
    args.push(&imgs);
    run(&args)
}

/// `name = value` lines of xfs_db's print, in order.
fn db_values(out: &str, name: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.strip_prefix(&format!("{name} = ")))
        .map(|v| v.trim().parse().unwrap())
        .collect()
}

/// The reader's free total against XFS's own counts: the bnobt records are
/// Σ agf_freeblks; the superblock's fdblocks (exact after unmount) adds each AG's
/// free-list blocks and free-space b-tree blocks; xfs_db's freesp adds the free lists.
fn check_xfs_counts(img: &Path, free_bytes: u64) {
    let sb = xfs_db(img, &["sb 0", "p blocksize agcount fdblocks"]);
    let bs = db_values(&sb, "blocksize")[0];
    let agcount = db_values(&sb, "agcount")[0];
    let fdblocks = db_values(&sb, "fdblocks")[0];
    let mut cmds = Vec::new();
    for a in 0..agcount {
        cmds.push(format!("agf {a}"));
        cmds.push("p freeblks flcount btreeblks".to_string());
    }
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let agf = xfs_db(img, &cmds);
    let freeblks: u64 = db_values(&agf, "freeblks").iter().sum();
    let flcount: u64 = db_values(&agf, "flcount").iter().sum();
    let btreeblks: u64 = db_values(&agf, "btreeblks").iter().sum();
    assert_eq!(free_bytes % bs, 0);
    let free = free_bytes / bs;
    assert_eq!(free, freeblks, "free blocks differ from the AGFs' freeblks");
    assert_eq!(
        fdblocks,
        free + flcount + btreeblks,
        "fdblocks is not free + free lists + b-tree blocks"
    );
    let fs = xfs_db(img, &["freesp -s"]);
    let total: u64 = fs
        .lines()
        .find_map(|l| l.strip_prefix("total free blocks "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        total,
        free + flcount,
        "xfs_db freesp counts free + free lists"
    );
}

/// Mount a copy read-only (replaying its log if any) and compare every file.
fn check_files(img: &Path, dir: &Path, files: &[(String, Vec<u8>)], what: &str) {
    let m = Mounted::new(img, dir, ",nouuid");
    for (name, data) in files {
        assert!(
            std::fs::read(dir.join(name)).unwrap() == *data,
            "{what}: {name} changed when free space was overwritten"
        );
    }
    m.unmount();
}

fn free_of(p: Probe, what: &str) -> (Vec<(u64, u64)>, u64) {
    match p {
        Probe::Free {
            fs,
            ranges,
            free_bytes,
            caveat,
        } => {
            assert_eq!(fs, "xfs");
            assert_eq!(caveat, None);
            (ranges, free_bytes)
        }
        p => panic!("{what}: not read: {p:?}"),
    }
}

fn check_xfs_variant(mkfs_opts: &[&str], size_mib: u64) {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("fs.img");
    sparse_image(&img, size_mib);
    let imgs = img.display().to_string();
    let mut args = vec!["mkfs.xfs", "-q", "-f"];
    args.extend_from_slice(mkfs_opts);
    args.push(&imgs);
    run(&args);
    let m = Mounted::new(&img, &d.path().join("m"), "");
    let files = populate(&d.path().join("m"), size_mib);
    m.unmount();
    let (ranges, free_bytes) = free_of(probe_file(&img), &format!("{mkfs_opts:?}"));
    check_xfs_counts(&img, free_bytes);
    assert!(free_bytes > 20 << 20, "the deleted file's blocks are free");
    eprintln!(
        "xfs {mkfs_opts:?} {size_mib} MiB: {} MiB free in {} ranges",
        free_bytes >> 20,
        ranges.len()
    );
    let copy = d.path().join("copy.img");
    std::fs::copy(&img, &copy).unwrap();
    garble(&copy, &ranges);
    run(&["xfs_repair", "-n", &copy.display().to_string()]);
    check_files(
        &copy,
        &d.path().join("c"),
        &files,
        &format!("{mkfs_opts:?}"),
    );
}

#[test]
fn xfs_variants_free_space_is_exactly_free() {
    if !is_root() || !have_xfs() {
        eprintln!("SKIP: needs root (loop mounts) and xfsprogs");
        return;
    }
    check_xfs_variant(&[], 300); // v5: crc, finobt, reflink, sparse inodes
    check_xfs_variant(&["-m", "reflink=0"], 300);
    check_xfs_variant(&["-m", "rmapbt=1"], 300);
    check_xfs_variant(&["-b", "size=1024"], 300);
    check_xfs_variant(&["-d", "agcount=7", "-l", "size=64m"], 600);
    check_xfs_variant(&["-s", "size=4096"], 300);
    check_xfs_variant(&[], 1024);
}

#[test]
fn xfs_v4_fresh_image_is_read() {
    // mkfs.xfs still makes v4 (crc=0) filesystems, but kernels without
    // CONFIG_XFS_SUPPORT_V4 do not mount them: the unmounted image is read and checked
    if !have("mkfs.xfs") || !have("xfs_db") || !have("xfs_repair") {
        eprintln!("SKIP: xfsprogs not installed");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("v4.img");
    sparse_image(&img, 320);
    run(&[
        "mkfs.xfs",
        "-q",
        "-f",
        "-m",
        "crc=0",
        &img.display().to_string(),
    ]);
    let (ranges, free_bytes) = free_of(probe_file(&img), "v4");
    check_xfs_counts(&img, free_bytes);
    assert!(free_bytes > 250 << 20);
    garble(&img, &ranges);
    run(&["xfs_repair", "-n", &img.display().to_string()]);
}

#[test]
fn xfs_frozen_log_is_free_dirty_log_is_unknown() {
    if !is_root() || !have_xfs() {
        eprintln!("SKIP: needs root (loop mounts) and xfsprogs");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("fs.img");
    sparse_image(&img, 300);
    let imgs = img.display().to_string();
    run(&["mkfs.xfs", "-q", "-f", &imgs]);
    let mdir = d.path().join("m");
    let ms = mdir.display().to_string();

    // frozen while mounted: the log is covered by superblock-only transactions
    let m = Mounted::new(&img, &mdir, "");
    let files = populate(&mdir, 7);
    run(&["xfs_freeze", "-f", &ms]);
    let frozen = d.path().join("frozen.img");
    let copied = std::fs::copy(&img, &frozen);
    run(&["xfs_freeze", "-u", &ms]);
    copied.unwrap();
    let logprint = Command::new("xfs_logprint")
        .args(["-t", &frozen.display().to_string()])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let (ranges, free_bytes) = free_of(probe_file(&frozen), "frozen");
    eprintln!(
        "xfs frozen: {} MiB free; xfs_logprint: {}",
        free_bytes >> 20,
        logprint.lines().find(|l| l.contains("head")).unwrap_or("")
    );
    assert!(free_bytes > 20 << 20);
    // random damage to the log's first blocks (its records): never a panic, never
    // more free space
    let mut b = std::fs::read(&frozen).unwrap();
    let good = b.clone();
    let bs = u64::from(img_be32(&b, 4));
    let logstart = (u64::from(img_be32(&b, 48)) << 32) | u64::from(img_be32(&b, 52));
    let agblocks = u64::from(img_be32(&b, 84));
    let agblklog = b[124];
    let log = ((logstart >> agblklog) * agblocks + (logstart & ((1 << agblklog) - 1))) * bs;
    let mut unknown = 0;
    for seed in 0..200u64 {
        let n = noise(seed + 1000, 16);
        let at = log as usize + (u16::from_le_bytes([n[0], n[1]]) as usize) % (64 * 512);
        b[at] ^= n[2] | 1;
        match probe_bytes(&b) {
            Ok(Probe::Free { ranges: r, .. }) => assert!(
                within(&r, &ranges),
                "log damage (seed {seed}) made used space free"
            ),
            _ => unknown += 1,
        }
        b[at] = good[at];
    }
    eprintln!("xfs frozen: {unknown} of 200 log damages gave unknown");
    drop((b, good));
    garble(&frozen, &ranges);
    check_files(&frozen, &d.path().join("c"), &files, "frozen");
    run(&["xfs_repair", "-n", &frozen.display().to_string()]);

    // written while mounted, copied without a freeze: transactions in the log
    for i in 0..4u64 {
        std::fs::write(mdir.join(format!("late{i}")), noise(500 + i, 3 << 20)).unwrap();
    }
    run(&["sync"]);
    std::fs::write(mdir.join("later"), noise(600, 1 << 20)).unwrap();
    let live = d.path().join("live.img");
    std::fs::copy(&img, &live).unwrap();
    match probe_file(&live) {
        Probe::Unknown { why } => assert!(why.contains("log"), "{why}"),
        p => panic!("a live copy with log records gave {p:?}"),
    }

    // a shutdown without flushing the log: a dirty log
    std::fs::write(mdir.join("fsynced"), noise(700, 2 << 20)).unwrap();
    std::fs::File::open(mdir.join("fsynced"))
        .unwrap()
        .sync_all()
        .unwrap();
    run(&["xfs_io", "-x", "-c", "shutdown", &ms]);
    m.unmount();
    match probe_file(&img) {
        Probe::Unknown { why } => assert!(
            why.contains("the log holds transactions"),
            "dirty log: {why}"
        ),
        p => panic!("a dirty log gave {p:?}"),
    }
    // after recovery (mount, unmount) it is clean again and read
    Mounted::new(&img, &mdir, "").unmount();
    let (_, free_bytes) = free_of(probe_file(&img), "recovered");
    check_xfs_counts(&img, free_bytes);
}

/// Read a big-endian u32 of an image.
fn img_be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn probe_bytes(b: &[u8]) -> cowsnap_core::Result<Probe> {
    let size = b.len() as u64;
    let mut read = |o: u64, buf: &mut [u8]| {
        let o = o as usize;
        match b.get(o..o + buf.len()) {
            Some(s) => {
                buf.copy_from_slice(s);
                Ok(())
            }
            None => Err(cowsnap_core::err!(InvalidInput, "read beyond the image")),
        }
    };
    freespace::probe(&mut read, size)
}

/// Whether every range of `a` lies within a range of `b` (both sorted, merged).
fn within(a: &[(u64, u64)], b: &[(u64, u64)]) -> bool {
    a.iter().all(|&(s, e)| {
        let k = b.partition_point(|r| r.1 <= s);
        b.get(k).is_some_and(|r| r.0 <= s && e <= r.1)
    })
}

#[test]
fn xfs_damaged_metadata_is_unknown_not_a_panic() {
    if !have("mkfs.xfs") {
        eprintln!("SKIP: xfsprogs not installed");
        return;
    }
    // (mkfs.xfs makes nothing under 300 MB)
    for (crc, mib) in [("crc=1", 300u64), ("crc=0", 300)] {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("fs.img");
        sparse_image(&img, mib);
        let imgs = img.display().to_string();
        run(&["mkfs.xfs", "-q", "-f", "-m", crc, "-d", "agcount=4", &imgs]);
        let good = std::fs::read(&img).unwrap();
        let Ok(Probe::Free {
            ranges: good_free, ..
        }) = probe_bytes(&good)
        else {
            panic!(
                "{crc}: the pristine image is not read: {:?}",
                probe_bytes(&good)
            );
        };
        let bs = img_be32(&good, 4) as usize;
        let sect = u16::from_be_bytes([good[102], good[103]]) as usize;
        let agblocks = img_be32(&good, 84) as usize;
        let ag1 = agblocks * bs;
        let root = img_be32(&good, sect + 16) as usize * bs;
        // one field at a time: each must make the answer unknown
        let mut cases: Vec<(usize, u32)> = vec![
            (8, 0xFFFF_FFFF),           // dblocks far beyond the disk
            (16 + 4, 1),                // a realtime section
            (52, 0),                    // logstart 0: an external log
            (84, 1000),                 // agblocks disagrees with agblklog
            (sect + 52, 12345),         // AG 0's freeblks
            (ag1 + sect + 12, 77),      // AG 1's length
            (ag1 + sect + 16, 1 << 30), // AG 1's bnobt root far outside
            (root + 6, 0xFFFF_0000),    // AG 0's bnobt numrecs
        ];
        if crc == "crc=1" {
            cases.push((216, 0x8000_0000)); // an unknown incompat feature
            cases.push((root + 60, 0x0102_0304)); // a record (CRC no longer matches)
        }
        let mut b = good.clone();
        for (off, val) in cases {
            b[off..off + 4].copy_from_slice(&val.to_be_bytes());
            match probe_bytes(&b) {
                Ok(Probe::Unknown { .. }) | Err(_) => {}
                Ok(p) => panic!("{crc}: damage at {off} gave {p:?}"),
            }
            b[off..off + 4].copy_from_slice(&good[off..off + 4]);
        }
        // random damage to the superblock, the AGFs and the bnobt roots: never a
        // panic; with CRCs, whatever is still read lies within the true free space
        let (mut unknown, mut wrong) = (0, 0);
        let trials = 300u64;
        for seed in 0..trials {
            let n = noise(seed + 1, 16);
            let ag = n[0] as usize % 4;
            let agf_root = img_be32(&good, ag * ag1 + sect + 16) as usize;
            let (base, len) = match n[1] % 3 {
                0 => (0, sect),
                1 => (ag * ag1 + sect, sect),
                _ => (ag * ag1 + agf_root * bs, bs),
            };
            for k in 0..1 + n[2] as usize % 4 {
                let at = base + (u16::from_le_bytes([n[3 + 2 * k], n[4 + 2 * k]]) as usize) % len;
                b[at] ^= n[12 + k] | 1;
            }
            match probe_bytes(&b) {
                Ok(Probe::Free { ranges, .. }) => {
                    if !within(&ranges, &good_free) {
                        // without CRCs a damaged record can still add up
                        assert!(
                            crc == "crc=0",
                            "{crc}: damage (seed {seed}) made used space free"
                        );
                        wrong += 1;
                    }
                }
                _ => unknown += 1,
            }
            b[base..base + len].copy_from_slice(&good[base..base + len]);
        }
        eprintln!(
            "xfs {crc}: of {trials} random damages {unknown} gave unknown, \
             {wrong} free space that is not"
        );
        if crc == "crc=1" {
            assert!(unknown * 10 >= trials * 9, "{crc}: only {unknown} unknown");
        }
    }
}
