//! The repository heals instead of spreading damage: quarantine of damaged chunks, a
//! backup that stores them afresh (healing older generations), incrementals whose
//! parent lacks chunks, and pins of unfinished live restores against prune.

mod repo_common;

use cowsnap_core::blockio::{self, BlockIo, OpenSpec};
use cowsnap_core::changelog::ChangeLog;
use cowsnap_core::repo::{self, pin, Repo};
use cowsnap_core::restore::live::{self, FillingIo, PinOwner};
use cowsnap_core::restore::restore_to;
use repo_common::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MIB: usize = 1 << 20;

fn flip_chunk(repo: &Path, gen: &str, chunk: usize) -> PathBuf {
    let r = Repo::open(repo).unwrap();
    let g = r.resolve(Some(gen)).unwrap();
    let idx = r.load_index(&g).unwrap();
    let p = r.store().path_of(&idx.to_hashes()[chunk]);
    let mut b = std::fs::read(&p).unwrap();
    let n = b.len();
    b[n - 7] ^= 0x40;
    std::fs::write(&p, b).unwrap();
    p
}

fn restores_to(repo: &Path, gen: &str, dir: &Path, want: &[u8]) -> bool {
    let dest = dir.join("check.img");
    match restore_to(repo, Some(gen), &dest, &|_, _| {}) {
        Ok(_) => std::fs::read(&dest).unwrap() == want,
        Err(_) => false,
    }
}

/// A disk whose every 1 MiB repository chunk is random (none zero, none repeated).
fn random_disk(size: usize, seed: u64) -> Vec<u8> {
    let mut d = vec![0u8; size];
    let mut s = seed;
    fill_random(&mut d, &mut s);
    d
}

#[test]
fn a_damaged_chunk_is_not_reused_and_the_next_full_backup_heals_old_generations() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let disk = random_disk(8 * MIB, 1);
    let g1 = backup(&repo, "h", &disk, None, "l", false)
        .summary
        .generation
        .unwrap();
    let g2 = backup(&repo, "h", &disk, None, "l", false)
        .summary
        .generation
        .unwrap();
    // damage found by nobody yet: the next backup's reuse check finds and heals it
    let p = flip_chunk(&repo, &g1, 3);
    let b3 = backup(&repo, "h", &disk, None, "l", false);
    assert!(
        b3.summary.notes.iter().any(|n| n.contains("stored afresh")),
        "{:?}",
        b3.summary.notes
    );
    assert!(p.exists());
    for g in [&g1, &g2, b3.summary.generation.as_ref().unwrap()] {
        assert!(restores_to(&repo, g, d.path(), &disk), "generation {g}");
    }
    assert!(repo::verify(&repo, None).unwrap().ok);
    // damage found by verify: quarantined; the next full backup stores it again
    flip_chunk(&repo, &g1, 5);
    let v = repo::verify(&repo, None).unwrap();
    assert!(!v.ok);
    assert_eq!(v.quarantined.len(), 1);
    assert_eq!(
        v.problems.len(),
        3,
        "one offset in each of the three generations"
    );
    assert!(!restores_to(&repo, &g2, d.path(), &disk));
    let b4 = backup(&repo, "h", &disk, None, "l", false);
    assert!(b4.summary.generation.is_some());
    assert!(repo::verify(&repo, None).unwrap().ok);
    assert!(restores_to(&repo, &g1, d.path(), &disk));
    assert_eq!(
        Repo::open(&repo)
            .unwrap()
            .store()
            .quarantined()
            .unwrap()
            .len(),
        2,
        "evidence kept"
    );
}

#[test]
fn an_incremental_whose_parent_lost_a_chunk_reads_everything() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let mut disk = random_disk(8 * MIB, 2);
    let cl = ChangeLog::open(&d.path().join("cl.bin"), disk.len() as u64, TCS).unwrap();
    let g1 = backup_tracked(&repo, "i", &disk, &cl)
        .summary
        .generation
        .unwrap();
    flip_chunk(&repo, &g1, 6);
    assert!(!repo::verify(&repo, None).unwrap().ok); // quarantined
    scribble(&mut disk, Some(&cl), MIB, 4096, 9);
    let b = backup_tracked(&repo, "i", &disk, &cl);
    assert!(
        !b.scope_changed,
        "must not take the parent's missing chunk unread"
    );
    assert!(
        b.summary
            .notes
            .iter()
            .any(|n| n.contains("damaged or missing")),
        "{:?}",
        b.summary.notes
    );
    let g2 = b.summary.generation.unwrap();
    assert!(restores_to(&repo, &g2, d.path(), &disk));
    // the re-read stored the lost chunk again: the parent is whole too
    assert!(repo::verify(&repo, None).unwrap().ok);
}

fn dest_file(path: &Path, size: u64) -> Arc<dyn BlockIo> {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    let mut spec = OpenSpec::origin(path);
    spec.engine = blockio::IoEngine::Sync;
    blockio::open(&spec).unwrap()
}

#[test]
fn an_unfinished_live_restore_pins_its_generation_until_it_completes_or_is_abandoned() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let disk = random_disk(6 * MIB, 3);
    let g1 = backup(&repo, "p", &disk, None, "l", false)
        .summary
        .generation
        .unwrap();
    let sdir = d.path().join("state").join("p2");
    std::fs::create_dir_all(&sdir).unwrap();
    let state = sdir.join("fill.state");
    let dest = d.path().join("dest.img");
    let owner = PinOwner {
        disk: "p2".into(),
        destination: dest.display().to_string(),
    };
    let f = FillingIo::open_pinned(
        dest_file(&dest, disk.len() as u64),
        &repo,
        Some(&g1),
        &state,
        &owner,
    )
    .unwrap();
    let mut b = vec![0u8; 4096];
    f.read_at(&mut b, 0).unwrap(); // one chunk fetched
                                   // a prune while the fill is open does not wait for it (the pin protects it)
    let (tx, rx) = std::sync::mpsc::channel();
    let r2 = repo.clone();
    std::thread::spawn(move || {
        tx.send(repo::prune(&r2, &repo::PruneOptions::keep_last(1)).map(|r| r.kept_generations))
    });
    let kept = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("prune waited for the open fill")
        .unwrap();
    assert_eq!(kept, vec![g1.clone()]);
    drop(f); // the daemon dies mid-fill
    let pins = pin::list(&Repo::open(&repo).unwrap()).unwrap();
    assert_eq!(pins.len(), 1);
    assert_eq!(pins[0].generation, g1);
    assert!(pins[0].describe().contains("p2"));
    for seed in 4..6 {
        backup(&repo, "p", &random_disk(6 * MIB, seed), None, "l", false);
    }
    let rep = repo::prune(&repo, &repo::PruneOptions::keep_last(1)).unwrap();
    assert_eq!(rep.removed_generations.len(), 1, "{rep:?}");
    assert_eq!(rep.pinned.len(), 1);
    assert_eq!(rep.pinned[0].generation, g1);
    assert!(rep.pinned[0]
        .pinned_by
        .contains(&dest.display().to_string()));
    // the fill resumes and completes with the right content; the pin goes
    let f = FillingIo::open_pinned(reopen(&dest), &repo, Some(&g1), &state, &owner).unwrap();
    f.start_fill();
    let t = std::time::Instant::now();
    while !f.fill_status().complete {
        assert!(f.fill_status().error.is_none(), "{:?}", f.fill_status());
        assert!(t.elapsed().as_secs() < 60);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    drop(f);
    assert_eq!(std::fs::read(&dest).unwrap(), disk);
    assert!(pin::list(&Repo::open(&repo).unwrap()).unwrap().is_empty());
    let rep = repo::prune(&repo, &repo::PruneOptions::keep_last(1)).unwrap();
    assert_eq!(rep.removed_generations, vec![g1.clone()]);
    assert!(rep.pinned.is_empty());

    // abandon: the pin goes, the fill is never resumed, a new restore starts afresh
    let g = Repo::open(&repo)
        .unwrap()
        .latest_of("p")
        .unwrap()
        .unwrap()
        .id;
    let state2 = d.path().join("state").join("p3").join("fill.state");
    std::fs::create_dir_all(state2.parent().unwrap()).unwrap();
    let dest2 = d.path().join("dest2.img");
    let f = FillingIo::open(
        dest_file(&dest2, disk.len() as u64),
        &repo,
        Some(&g),
        &state2,
    )
    .unwrap();
    drop(f);
    assert_eq!(pin::list(&Repo::open(&repo).unwrap()).unwrap().len(), 1);
    let a = live::abandon(&state2).unwrap();
    assert_eq!(a.generation, g);
    assert!(a.pin_removed.is_some());
    assert!(pin::list(&Repo::open(&repo).unwrap()).unwrap().is_empty());
    let e = FillingIo::open(reopen(&dest2), &repo, None, &state2)
        .err()
        .unwrap();
    assert!(e.to_string().contains("abandoned"), "{e}");
    assert_eq!(
        live::read_fill_state(&state2).unwrap(),
        Some((g.clone(), true))
    );
    assert!(live::abandon(&d.path().join("nope.state")).is_err());
}

#[test]
fn prune_drops_pins_that_pin_nothing_and_keeps_unreadable_ones() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let g1 = backup(&repo, "s", &random_disk(2 * MIB, 7), None, "l", false)
        .summary
        .generation
        .unwrap();
    let g2 = backup(&repo, "s", &random_disk(2 * MIB, 8), None, "l", false)
        .summary
        .generation
        .unwrap();
    let r = Repo::open(&repo).unwrap();
    // a pin on this host whose fill state is gone (the daemon died before writing it)
    let stale = pin::create(
        &r,
        &pin::Pin {
            generation: g1.clone(),
            disk: "x".into(),
            destination: "/nowhere".into(),
            state: d.path().join("gone/fill.state").display().to_string(),
            host: pin::host_name(),
            created: String::new(),
            kind: pin::PinKind::LiveRestore,
            pid: None,
        },
    )
    .unwrap();
    let rep = repo::prune(&repo, &repo::PruneOptions::keep_last(1)).unwrap();
    assert_eq!(rep.stale_pins_removed.len(), 1, "{rep:?}");
    assert!(!stale.exists());
    assert_eq!(rep.removed_generations, vec![g1]);
    // an unreadable pin still pins the generation its name starts with
    let g3 = backup(&repo, "s", &random_disk(2 * MIB, 9), None, "l", false)
        .summary
        .generation
        .unwrap();
    std::fs::write(repo.join("pins").join(format!("{g2}.0badc0de.json")), b"{").unwrap();
    let rep = repo::prune(&repo, &repo::PruneOptions::keep_last(1)).unwrap();
    assert!(rep.removed_generations.is_empty(), "{rep:?}");
    assert_eq!(rep.pinned.len(), 1);
    assert!(rep.pinned[0].pinned_by.contains("unreadable"));
    assert_eq!(rep.kept_generations.len(), 2);
    let _ = g3;
}

fn reopen(path: &Path) -> Arc<dyn BlockIo> {
    let mut spec = OpenSpec::origin(path);
    spec.engine = blockio::IoEngine::Sync;
    blockio::open(&spec).unwrap()
}

#[test]
fn an_incremental_refuses_to_publish_a_generation_taking_a_missing_chunk_from_its_parent() {
    use cowsnap_core::repo::{open_target, RepoTargetParams};
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let mut disk = random_disk(4 * MIB, 11);
    let cl = ChangeLog::open(&d.path().join("cl.bin"), disk.len() as u64, TCS).unwrap();
    let g1 = backup_tracked(&repo, "m", &disk, &cl)
        .summary
        .generation
        .unwrap();
    // lost outside the quarantine (deleted by hand)
    let r = Repo::open(&repo).unwrap();
    let idx = r.load_index(&r.resolve(Some(&g1)).unwrap()).unwrap();
    std::fs::remove_file(r.store().path_of(&idx.to_hashes()[3])).unwrap();
    scribble(&mut disk, Some(&cl), 0, 4096, 12);
    let cut = cl.begin_generation().unwrap();
    let mut t = open_target(
        &repo,
        RepoTargetParams {
            disk_name: "m".into(),
            incremental: true,
            key: None,
        },
        TCS,
    )
    .unwrap();
    let g = t.granule_chunks() as usize * TCS as usize;
    assert!(matches!(
        t.scope(Some(&cut)).unwrap(),
        cowsnap_core::target::Scope::Changed
    ));
    t.begin(&info(&disk, cl.lineage(), cut.seq_next)).unwrap();
    t.write(0, &disk[..g]).unwrap();
    let e = t.commit().err().unwrap();
    assert!(e.to_string().contains("lacks 1 chunk"), "{e}");
    assert!(
        e.to_string().contains(&format!("offset {}", 3 * MIB)),
        "{e}"
    );
    cl.abort_generation(&cut).unwrap();
    assert_eq!(
        Repo::open(&repo).unwrap().list().unwrap().len(),
        1,
        "nothing published"
    );
}
