//! Repository tests: a RepoTarget driven directly with synthetic disks.

mod repo_common;

use cowsnap_core::changelog::{ChangeLog, Cut};
use cowsnap_core::repo::{self, GenerationKind, Repo};
use cowsnap_core::restore::restore_to;
use cowsnap_core::target::Scope;
use repo_common::*;
use std::path::Path;

const MIB: usize = 1 << 20;

fn chunk_files(repo: &Path) -> usize {
    Repo::open(repo).unwrap().store().walk().unwrap().len()
}

#[test]
fn chain_of_three_generations_restores_each_exactly() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let state = d.path().join("state");
    // 20 MiB + a partial last chunk, so sizes are not whole repository chunks.
    let mut disk = synth_disk(20 * MIB + 3 * TCS as usize + 512, 1);
    let cl = ChangeLog::open_in(&state, disk.len() as u64, TCS).unwrap();

    let b1 = backup_tracked(&repo, "vm1", &disk, &cl);
    assert!(!b1.scope_changed, "first backup reads everything");
    assert!(b1.summary.notes[0].contains("cannot be trusted"));
    let h1 = hash(&disk);
    let g1 = b1.summary.generation.clone().unwrap();

    scribble(&mut disk, Some(&cl), 0, 10, 2); // first byte
    scribble(&mut disk, Some(&cl), 5 * MIB - 7, 20, 3); // across a chunk edge
    let last = disk.len() - 1;
    scribble(&mut disk, Some(&cl), last, 1, 4); // last byte
    let b2 = backup_tracked(&repo, "vm1", &disk, &cl);
    assert!(b2.scope_changed);
    assert!(b2.summary.notes.is_empty(), "{:?}", b2.summary.notes);
    // chunks 0, 4, 5 and the partial last one
    let last_len = (disk.len() % MIB) as u64;
    assert_eq!(b2.bytes_handed, 3 * MIB as u64 + last_len);
    let h2 = hash(&disk);
    let g2 = b2.summary.generation.clone().unwrap();

    // zero a whole MiB and change one more chunk
    cl.mark(8 * MIB as u64, MIB as u64).unwrap();
    disk[8 * MIB..9 * MIB].fill(0);
    scribble(&mut disk, Some(&cl), 13 * MIB + 100, 5000, 5);
    let b3 = backup_tracked(&repo, "vm1", &disk, &cl);
    assert_eq!(b3.bytes_handed, 2 * MIB as u64);
    let h3 = hash(&disk);
    let g3 = b3.summary.generation.clone().unwrap();

    let gens = repo::list(&repo).unwrap();
    assert_eq!(
        gens.iter().map(|g| g.id.clone()).collect::<Vec<_>>(),
        vec![g1.clone(), g2.clone(), g3.clone()]
    );
    assert_eq!(gens[0].kind, GenerationKind::Full);
    assert_eq!(gens[1].kind, GenerationKind::Incremental);
    assert_eq!(gens[1].parent.as_deref(), Some(g1.as_str()));
    assert_eq!(gens[2].parent.as_deref(), Some(g2.as_str()));
    assert_eq!(gens[2].lineage, cl.lineage());
    assert_eq!(gens[2].stats.chunks_zero, 1);
    assert_eq!(
        gens[2].stats.chunks_from_parent,
        gens[2].stats.chunks_total - 2
    );

    assert_eq!(hash(&restore_bytes(&repo, &g1, d.path())), h1);
    assert_eq!(hash(&restore_bytes(&repo, &g2, d.path())), h2);
    assert_eq!(hash(&restore_bytes(&repo, &g3, d.path())), h3);
    // the newest by disk name and by default
    let dest = d.path().join("x.img");
    let r = restore_to(&repo, None, &dest, &|_, _| {}).unwrap();
    assert_eq!(r.generation, g3);
    assert_eq!(hash(&std::fs::read(&dest).unwrap()), h3);
    let r = restore_to(&repo, Some("vm1"), &dest, &|_, _| {}).unwrap();
    assert_eq!(r.generation, g3);
    let v = repo::verify(&repo, None).unwrap();
    assert!(v.ok, "{:?}", v.problems);
    assert_eq!(v.generations.len(), 3);
}

#[test]
fn incremental_with_one_percent_changed_reads_and_stores_one_percent() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    // 64 KiB repository chunks so that 1% of a small disk is many chunks.
    Repo::open_or_create(&repo, TCS).unwrap();
    let size = 48 * MIB;
    let mut disk = vec![0u8; size];
    let mut s = 7;
    fill_random(&mut disk, &mut s);
    let cl = ChangeLog::open_in(&d.path().join("state"), size as u64, TCS).unwrap();
    let full = backup_tracked(&repo, "db", &disk, &cl);
    assert_eq!(full.bytes_handed, size as u64);
    let nchunks = size / TCS as usize;
    let changed = nchunks / 100; // 7 chunks of 768
    for k in 0..changed {
        let c = (k * 97 + 13) % nchunks;
        scribble(
            &mut disk,
            Some(&cl),
            c * TCS as usize + 1000,
            3000,
            100 + k as u64,
        );
    }
    let inc = backup_tracked(&repo, "db", &disk, &cl);
    let gens = repo::list(&repo).unwrap();
    let st = &gens[1].stats;
    assert_eq!(inc.bytes_handed, (changed * TCS as usize) as u64);
    assert_eq!(st.bytes_read, inc.bytes_handed);
    assert_eq!(st.chunks_new, changed as u64);
    assert_eq!(st.chunks_from_parent, (nchunks - changed) as u64);
    let full_stored = gens[0].stats.bytes_stored_new;
    let ratio = st.bytes_stored_new as f64 / full_stored as f64;
    assert!(
        (0.005..0.015).contains(&ratio),
        "incremental stored {} of {} (ratio {ratio})",
        st.bytes_stored_new,
        full_stored
    );
    assert_eq!(
        hash(&restore_bytes(&repo, &gens[1].id, d.path())),
        hash(&disk)
    );
}

#[test]
fn dedup_across_two_disks() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let a = synth_disk(16 * MIB, 11);
    let mut b = a.clone();
    scribble(&mut b, None, 3 * MIB, 100, 12);
    let ba = backup(&repo, "a", &a, None, "la", false);
    let files_a = chunk_files(&repo);
    let bb = backup(&repo, "b", &b, None, "lb", false);
    let gens = repo::list(&repo).unwrap();
    let sb = &gens[1].stats;
    assert_eq!(sb.chunks_new, 1, "only the changed chunk is new");
    assert_eq!(sb.chunks_reused + sb.chunks_zero + 1, 16);
    assert_eq!(chunk_files(&repo), files_a + 1);
    assert!(bb.summary.bytes_stored < ba.summary.bytes_stored / 4);
    assert_eq!(hash(&restore_bytes(&repo, &gens[0].id, d.path())), hash(&a));
    assert_eq!(hash(&restore_bytes(&repo, &gens[1].id, d.path())), hash(&b));
}

#[test]
fn corruption_is_reported_by_verify_and_refused_by_restore() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let disk = synth_disk(8 * MIB, 21);
    let g = backup(&repo, "c", &disk, None, "l", false)
        .summary
        .generation
        .unwrap();
    let r = Repo::open(&repo).unwrap();
    let gi = r.resolve(Some(&g)).unwrap();
    let idx = r.load_index(&gi).unwrap();
    // the 6th chunk (offset 5 MiB) must hold data, and only once
    let i = (0..idx.to_hashes().len())
        .rev()
        .find(|&i| {
            idx.to_hashes()[i] != repo::ZERO_HASH
                && idx
                    .to_hashes()
                    .iter()
                    .filter(|h| **h == idx.to_hashes()[i])
                    .count()
                    == 1
        })
        .unwrap();
    let path = r.store().path_of(&idx.to_hashes()[i]);
    let mut b = std::fs::read(&path).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x01;
    std::fs::write(&path, b).unwrap();

    let v = repo::verify(&repo, Some(&g)).unwrap();
    assert!(!v.ok);
    assert_eq!(v.problems.len(), 1, "{:?}", v.problems);
    let p = &v.problems[0];
    assert_eq!(p.generation, g);
    assert_eq!(p.offset, Some((i * MIB) as u64));
    assert_eq!(p.problem, "corrupt");
    let json = serde_json::to_string(&v).unwrap();
    assert!(json.contains("\"problem\":\"corrupt\""));

    let dest = d.path().join("r.img");
    let e = restore_to(&repo, Some(&g), &dest, &|_, _| {}).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(&format!("offset {}", i * MIB)), "{msg}");
    assert!(
        msg.contains(&cowsnap_core::fsutil::hex(&idx.to_hashes()[i])),
        "{msg}"
    );
    // verify moved the damaged chunk to the quarantine: restore says so
    assert_eq!(e.kind(), cowsnap_core::ErrorKind::NotFound);
    assert!(msg.contains("quarantine"), "{msg}");
    assert!(!path.exists());
    assert_eq!(v.quarantined.len(), 1);

    // from then on it is a missing chunk
    let v = repo::verify(&repo, None).unwrap();
    assert_eq!(v.problems[0].problem, "missing");
}

#[test]
fn prune_keeps_what_kept_generations_reference() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let state = d.path().join("state");
    let mut disk = synth_disk(12 * MIB, 31);
    let cl = ChangeLog::open_in(&state, disk.len() as u64, TCS).unwrap();
    let mut ids = Vec::new();
    let mut hashes = Vec::new();
    for k in 0..3 {
        if k > 0 {
            // replace whole chunks so old content becomes garbage
            scribble(&mut disk, Some(&cl), k * 2 * MIB, MIB, 40 + k as u64);
        }
        ids.push(
            backup_tracked(&repo, "p", &disk, &cl)
                .summary
                .generation
                .unwrap(),
        );
        hashes.push(hash(&disk));
    }
    let other = synth_disk(4 * MIB, 99);
    let og = backup(&repo, "other", &other, None, "lo", false)
        .summary
        .generation
        .unwrap();
    // leftovers of a crashed backup: an index without metadata
    let r = Repo::open(&repo).unwrap();
    std::fs::copy(
        r.index_path(&ids[0]),
        r.index_path("20000101T000000.000Z-deadbeef"),
    )
    .unwrap();
    let before = chunk_files(&repo);
    let rep = repo::prune(&repo, &repo::PruneOptions::keep_last(1)).unwrap();
    assert_eq!(
        rep.removed_generations,
        vec![ids[0].clone(), ids[1].clone()]
    );
    assert_eq!(rep.leftovers_removed, 1);
    let mut kept = rep.kept_generations.clone();
    kept.sort();
    let mut want = vec![ids[2].clone(), og.clone()];
    want.sort();
    assert_eq!(kept, want);
    // the chunks written by gen 1 and 2 at 2 MiB and 4 MiB were replaced later: gone
    assert_eq!(rep.chunks_removed, 2);
    assert_eq!(chunk_files(&repo), before - 2);
    let v = repo::verify(&repo, None).unwrap();
    assert!(v.ok, "{:?}", v.problems);
    assert_eq!(hash(&restore_bytes(&repo, &ids[2], d.path())), hashes[2]);
    assert_eq!(hash(&restore_bytes(&repo, &og, d.path())), hash(&other));
    // the incremental chain continues after its parent's parents are gone
    scribble(&mut disk, Some(&cl), 0, 1, 77);
    let b = backup_tracked(&repo, "p", &disk, &cl);
    assert!(b.scope_changed);
    let g = b.summary.generation.unwrap();
    assert_eq!(hash(&restore_bytes(&repo, &g, d.path())), hash(&disk));
}

#[test]
fn two_concurrent_backups_into_one_repository() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let a = synth_disk(12 * MIB, 51);
    let mut b = a.clone();
    scribble(&mut b, None, MIB, 4 * MIB, 52);
    let (ra, rb) = std::thread::scope(|s| {
        let ta = s.spawn(|| backup(&repo, "a", &a, None, "la", false));
        let tb = s.spawn(|| backup(&repo, "b", &b, None, "lb", false));
        (ta.join().unwrap(), tb.join().unwrap())
    });
    let ga = ra.summary.generation.unwrap();
    let gb = rb.summary.generation.unwrap();
    assert_eq!(repo::list(&repo).unwrap().len(), 2);
    assert!(repo::verify(&repo, None).unwrap().ok);
    assert_eq!(hash(&restore_bytes(&repo, &ga, d.path())), hash(&a));
    assert_eq!(hash(&restore_bytes(&repo, &gb, d.path())), hash(&b));
}

#[test]
fn prune_waits_for_a_running_backup() {
    use cowsnap_core::repo::{open_target, RepoTargetParams};
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let old = synth_disk(4 * MIB, 61);
    backup(&repo, "w", &old, None, "l", false);
    let disk = synth_disk(4 * MIB, 62);
    let mut t = open_target(
        &repo,
        RepoTargetParams {
            disk_name: "w".into(),
            incremental: false,
            key: None,
        },
        TCS,
    )
    .unwrap();
    t.scope(None).unwrap();
    t.begin(&info(&disk, "l", 0)).unwrap();
    t.write(0, &disk[..2 * MIB]).unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let p = s.spawn(|| {
            let r = repo::prune(&repo, &repo::PruneOptions::keep_last(1)).unwrap();
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            r
        });
        // prune is blocked on the repository lock (not merely not started yet)
        let t0 = std::time::Instant::now();
        while !flock_waiter_on(&repo.join("lock")) {
            assert!(
                !done.load(std::sync::atomic::Ordering::SeqCst),
                "prune ran during a backup"
            );
            assert!(t0.elapsed().as_secs() < 30, "prune never took the lock");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(
            !done.load(std::sync::atomic::Ordering::SeqCst),
            "prune ran during a backup"
        );
        t.write(2 * MIB as u64, &disk[2 * MIB..]).unwrap();
        let g = t.commit().unwrap().generation.unwrap();
        let rep = p.join().unwrap();
        assert_eq!(rep.kept_generations, vec![g.clone()]);
        assert!(repo::verify(&repo, None).unwrap().ok);
        assert_eq!(hash(&restore_bytes(&repo, &g, d.path())), hash(&disk));
    });
}

#[test]
fn untrusted_tracking_falls_back_to_a_full_read() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let disk = synth_disk(6 * MIB, 71);
    let g1 = backup(&repo, "u", &disk, None, "l1", false)
        .summary
        .generation
        .unwrap();
    let mut changed = bitvec::vec::BitVec::new();
    changed.resize(disk.len() / TCS as usize, false);
    let mut cut = Cut {
        changed,
        relative_to: Some("20000101T000000.000Z-00000000".into()),
        lineage: "l1".into(),
        ..Default::default()
    };
    // relative to an unknown generation
    let b = backup(&repo, "u", &disk, Some(&cut), "l1", true);
    assert!(!b.scope_changed);
    assert!(
        b.summary.notes[0].contains("cannot be trusted"),
        "{:?}",
        b.summary.notes
    );
    assert_eq!(b.bytes_handed, disk.len() as u64);
    let gens = repo::list(&repo).unwrap();
    assert_eq!(gens[1].kind, GenerationKind::Full);
    assert_eq!(gens[1].stats.chunks_new, 0, "everything deduplicated");
    // no cut at all
    let b = backup(&repo, "u", &disk, None, "l1", true);
    assert!(!b.scope_changed);
    // relative to the parent, but the snapshot's lineage differs: refused at begin
    cut.relative_to = Some(repo::list(&repo).unwrap().last().unwrap().id.clone());
    let mut t = cowsnap_core::repo::open_target(
        &repo,
        cowsnap_core::repo::RepoTargetParams {
            disk_name: "u".into(),
            incremental: true,
            key: None,
        },
        TCS,
    )
    .unwrap();
    assert!(matches!(t.scope(Some(&cut)).unwrap(), Scope::Changed));
    assert!(t.begin(&info(&disk, "l2", 0)).is_err());
    t.abort("test");
    assert_eq!(repo::list(&repo).unwrap().len(), 3);
    assert_eq!(hash(&restore_bytes(&repo, &g1, d.path())), hash(&disk));
}

#[test]
fn abort_and_drop_publish_nothing() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let disk = synth_disk(3 * MIB, 81);
    for abort in [true, false] {
        let mut t = cowsnap_core::repo::open_target(
            &repo,
            cowsnap_core::repo::RepoTargetParams {
                disk_name: "x".into(),
                incremental: false,
                key: None,
            },
            TCS,
        )
        .unwrap();
        t.scope(None).unwrap();
        t.begin(&info(&disk, "l", 0)).unwrap();
        t.write(0, &disk[..MIB]).unwrap();
        if abort {
            t.abort("test");
        } else {
            drop(t);
        }
    }
    assert!(repo::list(&repo).unwrap().is_empty());
    let names: Vec<_> = std::fs::read_dir(repo.join("generations"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(names.is_empty(), "{names:?}");
    // chunks written but not yet published (fsynced and renamed) were removed
    let mut tmp = Vec::new();
    for sub in std::fs::read_dir(repo.join("chunks")).unwrap() {
        let sub = sub.unwrap().path();
        if sub.is_dir() {
            for f in std::fs::read_dir(&sub).unwrap() {
                let n = f.unwrap().file_name().to_string_lossy().into_owned();
                if n.starts_with(".tmp-") {
                    tmp.push(n);
                }
            }
        }
    }
    assert!(tmp.is_empty(), "temporary chunk files left: {tmp:?}");
    // unaligned and oversize writes are refused
    let mut t = cowsnap_core::repo::open_target(
        &repo,
        cowsnap_core::repo::RepoTargetParams {
            disk_name: "x".into(),
            incremental: false,
            key: None,
        },
        TCS,
    )
    .unwrap();
    t.scope(None).unwrap();
    t.begin(&info(&disk, "l", 0)).unwrap();
    assert!(t.write(4096, &disk[..MIB]).is_err());
    assert!(t.write(2 * MIB as u64, &disk[..2 * MIB]).is_err());
    assert!(t.write(0, &disk[..MIB / 2]).is_err());
}

#[test]
fn a_chunk_handed_over_twice_keeps_the_last_data() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let disk = synth_disk(4 * MIB, 91);
    let mut t = cowsnap_core::repo::open_target(
        &repo,
        cowsnap_core::repo::RepoTargetParams {
            disk_name: "t".into(),
            incremental: false,
            key: None,
        },
        TCS,
    )
    .unwrap();
    t.scope(None).unwrap();
    t.begin(&info(&disk, "l", 0)).unwrap();
    let mut stale = vec![0u8; MIB];
    let mut s = 5;
    fill_random(&mut stale, &mut s);
    for _ in 0..20 {
        t.write(MIB as u64, &stale).unwrap();
    }
    t.write(0, &disk).unwrap();
    let g = t.commit().unwrap().generation.unwrap();
    assert_eq!(hash(&restore_bytes(&repo, &g, d.path())), hash(&disk));
}

/// The parent is resolved before the instant (`prepare`): `scope` at the instant then
/// reads nothing — shown by removing the parent's index between the two, which a
/// `scope` that loads the index would report as "parent unusable". A `prepare` for
/// another generation than the cut's is not used.
#[test]
fn prepare_resolves_the_parent_before_the_instant() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let disk = synth_disk(4 * MIB, 91);
    let g1 = backup(&repo, "p", &disk, None, "l1", false)
        .summary
        .generation
        .unwrap();
    let mut changed = bitvec::vec::BitVec::new();
    changed.resize(disk.len() / TCS as usize, false);
    let cut = Cut {
        changed,
        relative_to: Some(g1.clone()),
        lineage: "l1".into(),
        ..Default::default()
    };
    let open = || {
        cowsnap_core::repo::open_target(
            &repo,
            cowsnap_core::repo::RepoTargetParams {
                disk_name: "p".into(),
                incremental: true,
                key: None,
            },
            TCS,
        )
        .unwrap()
    };
    let index = repo.join("generations").join(format!("{g1}.idx"));
    let saved = std::fs::read(&index).unwrap_or_else(|e| panic!("{}: {e}", index.display()));
    // prepared for g1, index gone before the instant: still incremental
    let mut t = open();
    assert!(matches!(t.prepare(Some(&g1)), Scope::Changed));
    std::fs::remove_file(&index).unwrap();
    assert!(matches!(t.scope(Some(&cut)).unwrap(), Scope::Changed));
    t.abort("test");
    // prepared for another generation: scope resolves itself, finds no index, and
    // falls back to a full read
    let mut t = open();
    assert!(
        matches!(t.prepare(Some("20000101T000000.000Z-00000000")), Scope::All),
        "no such parent: a full read is expected"
    );
    assert!(matches!(t.scope(Some(&cut)).unwrap(), Scope::All));
    t.abort("test");
    std::fs::write(&index, saved).unwrap();
}

/// Whether this process waits for a `flock` on `path`: /proc/locks lists a blocked
/// request as `N: -> FLOCK ADVISORY WRITE PID MAJ:MIN:INODE 0 EOF`.
fn flock_waiter_on(path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(path).unwrap().ino().to_string();
    let pid = std::process::id().to_string();
    std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&"->")
                && f.get(2) == Some(&"FLOCK")
                && f.get(5) == Some(&pid.as_str())
                && f.get(6).and_then(|d| d.rsplit(':').next()) == Some(ino.as_str())
        })
}

/// Zero ranges are recorded whole and ordered with the data handed over: data then a
/// zero range over it gives zeros, a zero range then data gives the data. In an
/// incremental, chunks neither written nor zeroed keep the parent's hash. The index is
/// sized by the data (version 2: runs and hashes), and reads back as restored.
#[test]
fn zero_ranges_and_data_keep_their_order_and_the_parent_the_rest() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let mut disk = vec![0u8; 8 * MIB];
    let mut s = 11;
    fill_random(&mut disk, &mut s);
    let g1 = backup(&repo, "z", &disk, None, "l", false)
        .summary
        .generation
        .unwrap();
    let mut changed = bitvec::vec::BitVec::new();
    changed.resize(disk.len() / TCS as usize, false);
    let cut = Cut {
        changed,
        relative_to: Some(g1.clone()),
        lineage: "l".into(),
        ..Default::default()
    };
    let mut t = cowsnap_core::repo::open_target(
        &repo,
        cowsnap_core::repo::RepoTargetParams {
            disk_name: "z".into(),
            incremental: true,
            key: None,
        },
        TCS,
    )
    .unwrap();
    assert!(matches!(t.scope(Some(&cut)).unwrap(), Scope::Changed));
    t.begin(&info(&disk, "l", 0)).unwrap();
    let mut expect = disk.clone();
    let mut fresh = vec![0u8; MIB];
    fill_random(&mut fresh, &mut s);
    // chunk 1: data, then zeros over chunks 1 and 2
    t.write(MIB as u64, &fresh).unwrap();
    t.write_zeroes(MIB as u64, 2 * MIB as u64).unwrap();
    expect[MIB..3 * MIB].fill(0);
    // chunks 4 and 5: zeros, then data in chunk 5
    t.write_zeroes(4 * MIB as u64, 2 * MIB as u64).unwrap();
    t.write(5 * MIB as u64, &fresh).unwrap();
    expect[4 * MIB..5 * MIB].fill(0);
    expect[5 * MIB..6 * MIB].copy_from_slice(&fresh);
    let g2 = t.commit().unwrap().generation.unwrap();
    assert_eq!(hash(&restore_bytes(&repo, &g2, d.path())), hash(&expect));
    let gens = repo::list(&repo).unwrap();
    let st = &gens[1].stats;
    assert_eq!(gens[1].kind, GenerationKind::Incremental);
    assert_eq!(st.chunks_written, 4, "chunks 1, 2, 4, 5 handed over");
    assert_eq!(
        st.chunks_from_parent, 4,
        "chunks 0, 3, 6, 7 from the parent"
    );
    let idx_path = repo.join("generations").join(format!("{g2}.idx"));
    let idx = repo::FixedIndex::read(&idx_path).unwrap();
    assert_eq!(idx.data_chunks(), 5, "chunks 0, 3, 5, 6, 7");
    assert_eq!(idx.data_runs().collect::<Vec<_>>(), vec![0..1, 3..4, 5..8]);
    assert_eq!(
        std::fs::metadata(&idx_path).unwrap().len(),
        4096 + 3 * 16 + 5 * 32
    );
    // the parent's index is whole and unchanged
    let p = repo::FixedIndex::read(&repo.join("generations").join(format!("{g1}.idx"))).unwrap();
    assert_eq!(p.data_runs().collect::<Vec<_>>(), vec![0..8]);
}

/// A repository written by an older build (version 1 indexes) keeps working: an
/// incremental relative to a version 1 parent, verify, diff, prune and restore; the new
/// generation is written as version 2.
#[test]
fn version_1_indexes_are_read_and_new_ones_are_version_2() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let disk = synth_disk(6 * MIB, 73);
    let g1 = backup(&repo, "v", &disk, None, "l", false)
        .summary
        .generation
        .unwrap();
    let p1 = repo.join("generations").join(format!("{g1}.idx"));
    let old = repo::FixedIndex::read(&p1).unwrap();
    std::fs::write(&p1, old.encode_v1()).unwrap();
    assert_eq!(&std::fs::read(&p1).unwrap()[..8], b"CSNPIX01");
    let mut changed = bitvec::vec::BitVec::new();
    changed.resize(disk.len() / TCS as usize, false);
    let mut disk2 = disk.clone();
    // one tracking chunk in repository chunk 3 changes
    let at = 3 * MIB + 5 * TCS as usize;
    disk2[at..at + 100].fill(0x77);
    changed.set(at / TCS as usize, true);
    let cut = Cut {
        changed,
        relative_to: Some(g1.clone()),
        lineage: "l".into(),
        ..Default::default()
    };
    let b = backup(&repo, "v", &disk2, Some(&cut), "l", true);
    assert!(b.scope_changed, "{:?}", b.summary.notes);
    let g2 = b.summary.generation.unwrap();
    let p2 = repo.join("generations").join(format!("{g2}.idx"));
    assert_eq!(&std::fs::read(&p2).unwrap()[..8], b"CSNPIX02");
    assert_eq!(hash(&restore_bytes(&repo, &g1, d.path())), hash(&disk));
    assert_eq!(hash(&restore_bytes(&repo, &g2, d.path())), hash(&disk2));
    let v = repo::verify::verify(&repo, None).unwrap();
    assert!(v.ok, "{:?}", v.problems);
    assert_eq!(v.entries_checked, 12, "6 chunks in each of 2 generations");
    let r = Repo::open(&repo).unwrap();
    let gens = r.list().unwrap();
    let diff = r.diff(&gens[0], &gens[1]).unwrap();
    assert_eq!(diff.changed_chunks, 1);
    assert_eq!(diff.ranges[0].offset, 3 * MIB as u64);
}

/// The drainer's way (`write_owned`): batch buffers given away, a free one returned
/// for the next batch — recycled ones (still holding an earlier batch's length) once
/// the workers are done with them — and the generation restores exactly, short last
/// chunk included. A buffer shorter than the length asked is refused.
#[test]
fn handed_over_batch_buffers_are_recycled_and_store_exactly() {
    use cowsnap_core::aligned::AlignedBuf;
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    // 41 chunks and a bit: more batches than buffers in circulation
    let size = 41 * MIB + 3 * TCS as usize;
    let disk = synth_disk(size, 17);
    let mut t = cowsnap_core::repo::open_target(
        &repo,
        cowsnap_core::repo::RepoTargetParams {
            disk_name: "o".into(),
            incremental: false,
            key: None,
        },
        TCS,
    )
    .unwrap();
    assert!(t.takes_buffers());
    t.scope(None).unwrap();
    t.begin(&info(&disk, "l", 0)).unwrap();
    let mut buf = AlignedBuf::new();
    let mut recycled = 0;
    for (k, part) in disk.chunks(MIB).enumerate() {
        if buf.len() == MIB {
            recycled += 1;
        }
        buf.resize(part.len());
        buf.copy_from_slice(part);
        buf = t.write_owned((k * MIB) as u64, buf, part.len()).unwrap();
    }
    assert!(recycled > 0, "no buffer came back for reuse");
    let mut short = AlignedBuf::new();
    short.resize(4096);
    assert!(t.write_owned(0, short, MIB).is_err());
    let g = t.commit().unwrap().generation.unwrap();
    assert_eq!(hash(&restore_bytes(&repo, &g, d.path())), hash(&disk));
}
