//! Restore tests: offline restore, live restore (FillingIo), restored-disk identity.

mod repo_common;

use cowsnap_core::blockio::{self, BlockIo, OpenSpec};
use cowsnap_core::changelog::ChangeLog;
use cowsnap_core::identity::Identity;
use cowsnap_core::repo::{self, Repo};
use cowsnap_core::restore::live::FillingIo;
use cowsnap_core::restore::{init_restored_state, restore_to};
use repo_common::*;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

fn dest_file(path: &Path, size: u64) -> Arc<dyn BlockIo> {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    reopen(path)
}

fn reopen(path: &Path) -> Arc<dyn BlockIo> {
    let mut spec = OpenSpec::origin(path);
    spec.engine = blockio::IoEngine::Sync;
    blockio::open(&spec).unwrap()
}

fn wait_complete(f: &FillingIo) {
    let t = Instant::now();
    while !f.fill_status().complete {
        assert!(f.fill_status().error.is_none(), "{:?}", f.fill_status());
        assert!(t.elapsed() < Duration::from_secs(120), "fill stuck");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn read_all(io: &dyn BlockIo) -> Vec<u8> {
    let mut b = vec![0u8; io.size() as usize];
    io.read_at(&mut b, 0).unwrap();
    b
}

#[test]
fn restore_twice_and_several_generations_in_sequence() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let mut disk = synth_disk(6 * MIB + 4096, 1);
    let g1 = backup(&repo, "s", &disk, None, "l", false)
        .summary
        .generation
        .unwrap();
    let h1 = hash(&disk);
    disk[..3 * MIB].fill(0);
    scribble(&mut disk, None, 4 * MIB, 1000, 2);
    let g2 = backup(&repo, "s", &disk, None, "l", false)
        .summary
        .generation
        .unwrap();
    let h2 = hash(&disk);
    let dest = d.path().join("dest.img");
    let calls = std::sync::atomic::AtomicU64::new(0);
    let last = std::sync::atomic::AtomicU64::new(0);
    for (g, h) in [(&g1, &h1), (&g1, &h1), (&g2, &h2), (&g1, &h1), (&g2, &h2)] {
        let r = restore_to(&repo, Some(g), &dest, &|done, total| {
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            last.fetch_max(done, std::sync::atomic::Ordering::Relaxed);
            assert_eq!(total, disk.len() as u64);
        })
        .unwrap();
        assert_eq!(&r.generation, g);
        assert_eq!(&hash(&std::fs::read(&dest).unwrap()), h);
    }
    assert!(calls.load(std::sync::atomic::Ordering::Relaxed) >= 7);
    assert_eq!(
        last.load(std::sync::atomic::Ordering::Relaxed),
        disk.len() as u64
    );
    // a too-small block device is refused; a missing generation is an error
    assert!(restore_to(&repo, Some("nope"), &dest, &|_, _| {}).is_err());
}

#[test]
fn live_restore_reader_sees_the_generation_during_the_fill() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let disk = Arc::new(synth_disk(24 * MIB + 12345, 2));
    let g = backup(&repo, "l", &disk, None, "l", false)
        .summary
        .generation
        .unwrap();
    let dest = d.path().join("live.img");
    let io = dest_file(&dest, disk.len() as u64);
    let f = FillingIo::open(io, &repo, Some(&g), &d.path().join("fill.state")).unwrap();
    assert_eq!(f.size(), disk.len() as u64);
    assert_eq!(f.fill_status().done, 0);
    assert_eq!(f.fill_status().total, 25);
    // on-demand read before the fill starts: from the end backwards
    let mut b = vec![0u8; 12345 + 100];
    let off = disk.len() - b.len();
    f.read_at(&mut b, off as u64).unwrap();
    assert_eq!(&b[..], &disk[off..]);
    assert_eq!(f.fill_status().done, 2);
    f.set_fill_rate(4 * MIB as u64);
    f.start_fill();
    let mut s = 5u64;
    let mut reads = 0;
    while !f.fill_status().complete {
        let len = (splitmix(&mut s) % (3 * MIB as u64)) as usize + 1;
        let off = (splitmix(&mut s) % (disk.len() - len) as u64) as usize;
        let mut b = vec![0u8; len];
        f.read_at(&mut b, off as u64).unwrap();
        assert!(b == disk[off..off + len], "difference at {off}+{len}");
        reads += 1;
    }
    assert!(reads > 0);
    let st = f.fill_status();
    assert_eq!((st.done, st.total, st.complete), (25, 25, true));
    assert_eq!(hash(&read_all(&*f)), hash(&disk));
    drop(f);
    assert_eq!(hash(&std::fs::read(&dest).unwrap()), hash(&disk));
    // reopen after completion: pass-through, no repository needed
    std::fs::rename(&repo, d.path().join("moved")).unwrap();
    let f = FillingIo::open(reopen(&dest), &repo, None, &d.path().join("fill.state")).unwrap();
    assert!(f.fill_status().complete);
    f.write_at(b"after", 7).unwrap();
    let mut b = [0u8; 5];
    f.read_at(&mut b, 7).unwrap();
    assert_eq!(&b, b"after");
}

/// A read that fetches moves the fill on to the chunk after it (read-ahead); the fill
/// then comes back for the chunks it skipped, and completes with the generation.
#[test]
fn live_restore_fill_jumps_ahead_of_reads_and_still_fills_everything() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let disk = synth_disk(40 * MIB + 4096, 9);
    let g = backup(&repo, "j", &disk, None, "l", false)
        .summary
        .generation
        .unwrap();
    let dest = d.path().join("live.img");
    let f = FillingIo::open(
        dest_file(&dest, disk.len() as u64),
        &repo,
        Some(&g),
        &d.path().join("fill.state"),
    )
    .unwrap();
    for c in [30usize, 12, 38] {
        let mut b = vec![0u8; 3 * MIB / 2];
        f.read_at(&mut b, (c * MIB) as u64).unwrap();
        assert!(b == disk[c * MIB..c * MIB + b.len()], "chunk {c}");
    }
    assert_eq!(f.fill_status().done, 6);
    f.start_fill();
    wait_complete(&f);
    assert_eq!(f.fill_status().done, 41);
    assert_eq!(hash(&read_all(&*f)), hash(&disk));
    drop(f);
    assert_eq!(hash(&std::fs::read(&dest).unwrap()), hash(&disk));
}

#[test]
fn live_restore_resumes_after_a_stop_and_keeps_writes() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    // more chunks than one fill batch (32), so a stop after the first batch leaves some
    let disk = synth_disk(96 * MIB, 3);
    let g = backup(&repo, "r", &disk, None, "l", false)
        .summary
        .generation
        .unwrap();
    let dest = d.path().join("live.img");
    let state = d.path().join("fill.state");
    let mut expect = disk.clone();
    let f = FillingIo::open(dest_file(&dest, disk.len() as u64), &repo, Some(&g), &state).unwrap();
    // writes before and during the fill: partial chunk (fetch first), whole chunk
    // (no fetch), across a chunk edge, zeroes, discard of a whole chunk
    let w1 = vec![0xA5u8; 1000];
    f.write_at(&w1, 20 * MIB as u64 + 5).unwrap();
    expect[20 * MIB + 5..20 * MIB + 1005].copy_from_slice(&w1);
    let w2 = vec![0x5Au8; MIB];
    f.write_at(&w2, 30 * MIB as u64).unwrap();
    expect[30 * MIB..31 * MIB].copy_from_slice(&w2);
    assert_eq!(f.fill_status().done, 2);
    f.set_fill_rate(4 * MIB as u64);
    f.start_fill();
    let w3 = vec![0x77u8; 4096];
    f.write_at(&w3, 25 * MIB as u64 - 2048).unwrap();
    expect[25 * MIB - 2048..25 * MIB + 2048].copy_from_slice(&w3);
    f.write_zeroes(26 * MIB as u64 + 100, 200, false).unwrap();
    expect[26 * MIB + 100..26 * MIB + 300].fill(0);
    f.discard(28 * MIB as u64, MIB as u64).unwrap();
    expect[28 * MIB..29 * MIB].fill(0);
    // stop mid-fill, then drop (as if the daemon died)
    let t = Instant::now();
    while f.fill_status().done < 6 {
        assert!(t.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(1));
    }
    f.stop_fill();
    while f.fill_running() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let done_before = f.fill_status().done;
    assert!(done_before < 96, "stopped before the end ({done_before})");
    drop(f);

    // a state file of another generation is refused
    let other = synth_disk(32 * MIB, 33);
    let g2 = backup(&repo, "other", &other, None, "l", false)
        .summary
        .generation
        .unwrap();
    let e = FillingIo::open(reopen(&dest), &repo, Some(&g2), &state)
        .err()
        .unwrap();
    assert!(e.to_string().contains("belongs to generation"), "{e}");
    let f = FillingIo::open(reopen(&dest), &repo, Some(&g), &state).unwrap();
    assert_eq!(f.generation(), g);
    assert_eq!(
        f.fill_status().done,
        done_before,
        "resumed from the state file"
    );
    f.start_fill();
    let w4 = vec![0x11u8; 3];
    f.write_at(&w4, (31 * MIB - 1) as u64).unwrap();
    expect[31 * MIB - 1..31 * MIB + 2].copy_from_slice(&w4);
    wait_complete(&f);
    assert_eq!(hash(&read_all(&*f)), hash(&expect));
    drop(f);
    assert_eq!(hash(&std::fs::read(&dest).unwrap()), hash(&expect));
}

#[test]
fn live_restore_fails_loudly_on_a_corrupt_chunk() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let disk = synth_disk(4 * MIB, 4);
    let g = backup(&repo, "c", &disk, None, "l", false)
        .summary
        .generation
        .unwrap();
    let r = Repo::open(&repo).unwrap();
    let idx = r.load_index(&r.resolve(Some(&g)).unwrap()).unwrap();
    let i = (0..4)
        .find(|&i| idx.to_hashes()[i] != repo::ZERO_HASH)
        .unwrap();
    let p = r.store().path_of(&idx.to_hashes()[i]);
    let mut b = std::fs::read(&p).unwrap();
    let n = b.len() - 1;
    b[n] ^= 0xff;
    std::fs::write(&p, b).unwrap();
    let f = FillingIo::open(
        dest_file(&d.path().join("x"), disk.len() as u64),
        &repo,
        Some(&g),
        &d.path().join("s"),
    )
    .unwrap();
    let mut buf = vec![0u8; 10];
    let e = f.read_at(&mut buf, (i * MIB) as u64 + 3).unwrap_err();
    assert!(
        e.to_string().contains(&format!("offset {}", i * MIB)),
        "{e}"
    );
    f.start_fill();
    let t = Instant::now();
    while f.fill_status().error.is_none() {
        assert!(t.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(!f.fill_status().complete);
}

#[test]
fn a_restored_disk_gets_a_new_lineage_and_its_first_incremental_is_relative_to_its_source() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let src_state = d.path().join("src-state");
    let mut disk = synth_disk(10 * MIB, 5);
    let cl = ChangeLog::open_in(&src_state, disk.len() as u64, TCS).unwrap();
    backup_tracked(&repo, "vm", &disk, &cl);
    scribble(&mut disk, Some(&cl), 3 * MIB, 10, 6);
    let g2 = backup_tracked(&repo, "vm", &disk, &cl)
        .summary
        .generation
        .unwrap();
    let src_lineage = cl.lineage().to_string();
    drop(cl);

    // restore g2 to a new disk with its own state dir
    let dest = d.path().join("new.img");
    restore_to(&repo, Some(&g2), &dest, &|_, _| {}).unwrap();
    let new_state = d.path().join("new-state");
    let id = init_restored_state(&new_state, &repo, &g2, disk.len() as u64, TCS).unwrap();
    assert_ne!(id.lineage, src_lineage);
    assert_eq!(id.restored_from.as_ref().unwrap().generation, g2);
    assert_eq!(Identity::load_or_create(&new_state).unwrap(), id);
    let cl2 = ChangeLog::open_in(&new_state, disk.len() as u64, TCS).unwrap();
    assert_eq!(cl2.lineage(), id.lineage);
    assert_eq!(cl2.relative_to().as_deref(), Some(g2.as_str()));
    let mut newdisk = std::fs::read(&dest).unwrap();
    scribble(&mut newdisk, Some(&cl2), 7 * MIB, 5, 7);
    let b = backup_tracked(&repo, "vm", &newdisk, &cl2);
    assert!(b.scope_changed, "{:?}", b.summary.notes);
    assert_eq!(b.bytes_handed, MIB as u64);
    let gens = repo::list(&repo).unwrap();
    let g3 = gens.last().unwrap();
    assert_eq!(g3.parent.as_deref(), Some(g2.as_str()));
    assert_eq!(g3.lineage, id.lineage);
    assert_eq!(
        hash(&restore_bytes(&repo, &g3.id, d.path())),
        hash(&newdisk)
    );

    // the source disk's tracking stays relative to g2 (exact: g2 plus its own bits),
    // although the newest generation of "vm" is now the restored disk's: its next
    // incremental is relative to g2 too
    let cl = ChangeLog::open_in(&src_state, disk.len() as u64, TCS).unwrap();
    assert_eq!(cl.lineage(), src_lineage);
    scribble(&mut disk, Some(&cl), 0, 5, 8);
    let b = backup_tracked(&repo, "vm", &disk, &cl);
    assert!(b.scope_changed, "{:?}", b.summary.notes);
    let g4 = repo::list(&repo).unwrap().last().unwrap().clone();
    assert_eq!(g4.parent.as_deref(), Some(g2.as_str()));
    assert_eq!(g4.lineage, src_lineage);
    assert_eq!(
        hash(&restore_bytes(
            &repo,
            b.summary.generation.as_deref().unwrap(),
            d.path()
        )),
        hash(&disk)
    );
}

#[test]
fn live_restore_concurrent_writers_reads_and_fill() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let disk = synth_disk(24 * MIB, 9);
    let g = backup(&repo, "c", &disk, None, "l", false)
        .summary
        .generation
        .unwrap();
    let dest = d.path().join("live.img");
    let f = FillingIo::open(
        dest_file(&dest, disk.len() as u64),
        &repo,
        Some(&g),
        &d.path().join("state"),
    )
    .unwrap();
    f.set_fill_rate(16 * MIB as u64);
    f.start_fill();
    const T: usize = 3;
    // thread t owns the chunks c with c % T == t; it keeps its own expected image
    let images: Vec<Vec<u8>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..T)
            .map(|t| {
                let f = &f;
                let disk = &disk;
                s.spawn(move || {
                    let mut exp = disk.clone();
                    let mut st = 100 + t as u64;
                    for i in 0..150 {
                        let c = (splitmix(&mut st) % 8) as usize * T + t;
                        let (off, len) = if i % 7 == 0 {
                            (c * MIB, MIB)
                        } else {
                            let o = (splitmix(&mut st) % (MIB as u64 - 9000)) as usize;
                            (c * MIB + o, (splitmix(&mut st) % 9000) as usize + 1)
                        };
                        if i % 11 == 0 {
                            f.write_zeroes(off as u64, len as u64, i % 2 == 0).unwrap();
                            exp[off..off + len].fill(0);
                        } else {
                            let mut data = vec![0u8; len];
                            fill_random(&mut data, &mut st);
                            f.write_at(&data, off as u64).unwrap();
                            exp[off..off + len].copy_from_slice(&data);
                        }
                        // read back something of ours, and something of anyone's
                        let mut b = vec![0u8; 3000];
                        let o = c * MIB + (splitmix(&mut st) % (MIB as u64 - 3000)) as usize;
                        f.read_at(&mut b, o as u64).unwrap();
                        assert!(b == exp[o..o + 3000], "thread {t} read {o}");
                    }
                    exp
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    wait_complete(&f);
    let got = read_all(&*f);
    for c in 0..24 {
        let owner = c % T;
        let r = c * MIB..(c + 1) * MIB;
        assert!(got[r.clone()] == images[owner][r], "chunk {c}");
    }
}

/// Restore onto a block device (a loop device over a file full of garbage): zero
/// chunks must become zeros, not stay garbage. Skips without root or losetup.
#[test]
fn restore_onto_a_block_device_zeroes_zero_chunks() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skip: needs root for a loop device");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let mut disk = synth_disk(6 * MIB, 10);
    disk[MIB..3 * MIB].fill(0);
    let g = backup(&repo, "b", &disk, None, "l", false)
        .summary
        .generation
        .unwrap();
    let backing = d.path().join("backing.img");
    std::fs::write(&backing, vec![0xEEu8; 8 * MIB]).unwrap();
    let out = match std::process::Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&backing)
        .output()
    {
        Ok(o) if o.status.success() => o,
        _ => {
            eprintln!("skip: losetup unavailable");
            return;
        }
    };
    let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }
    let _detach = Detach(dev.clone());
    let r = restore_to(&repo, Some(&g), Path::new(&dev), &|_, _| {}).unwrap();
    assert_eq!(r.chunks_zero, 2);
    let mut got = vec![0u8; 8 * MIB];
    let f = std::fs::File::open(&dev).unwrap();
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut got, 0).unwrap();
    assert_eq!(hash(&got[..6 * MIB]), hash(&disk));
    assert!(
        got[6 * MIB..].iter().all(|&b| b == 0xEE),
        "past the disk untouched"
    );
    // too small a device is refused
    let small = d.path().join("small.img");
    std::fs::write(&small, vec![0u8; MIB]).unwrap();
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&small)
        .output()
        .unwrap();
    let dev2 = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let _detach2 = Detach(dev2.clone());
    let e = restore_to(&repo, Some(&g), Path::new(&dev2), &|_, _| {}).unwrap_err();
    assert!(e.to_string().contains("holds"), "{e}");
}

#[test]
fn an_interrupted_offline_restore_leaves_its_destination_marked_incomplete() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let disk = synth_disk(4 * MIB, 9);
    let g = backup(&repo, "m", &disk, None, "l", false)
        .summary
        .generation
        .unwrap();
    let dest = d.path().join("r.img");
    let marker = d.path().join("r.img.incomplete");
    restore_to(&repo, Some(&g), &dest, &|_, _| {}).unwrap();
    assert!(!marker.exists(), "a complete restore keeps no marker");
    assert_eq!(std::fs::read(&dest).unwrap(), disk);

    // Damage the last data chunk: the restore fails half-way.
    let r = Repo::open(&repo).unwrap();
    let idx = r.load_index(&r.resolve(Some(&g)).unwrap()).unwrap();
    let i = (0..idx.to_hashes().len())
        .rev()
        .find(|&i| idx.to_hashes()[i] != repo::ZERO_HASH)
        .unwrap();
    let p = r.store().path_of(&idx.to_hashes()[i]);
    let mut b = std::fs::read(&p).unwrap();
    let n = b.len() - 1;
    b[n] ^= 0xff;
    std::fs::write(&p, b).unwrap();
    let e = restore_to(&repo, Some(&g), &dest, &|_, _| {}).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(&dest.display().to_string()), "{msg}");
    assert!(msg.contains(&marker.display().to_string()), "{msg}");
    let why = std::fs::read_to_string(&marker).unwrap();
    assert!(
        why.contains("not complete") && why.contains("failed"),
        "{why}"
    );
}
