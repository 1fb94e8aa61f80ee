//! The free-space reader against real filesystems made by mkfs.ext4 (populated with
//! `mkfs.ext4 -d`, a file then deleted with debugfs): the ranges it calls free are
//! overwritten with garbage in a copy, which must still be e2fsck-clean with every
//! file's bytes unchanged (read back with debugfs) — garbage, not zeros, so a used
//! block called free shows. The free total must match dumpe2fs's. Damaged metadata
//! gives "unknown", never a panic. Skips when e2fsprogs is missing.

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
