//! Snapshot exports (pull mode): the point-in-time view while writers run, the dirty
//! bitmap and its commit, the shared job slot, a container that fills.

mod common;

use common::*;
use cowsnap_core::backup::{BackupParams, Backups, SnapshotParams};
use cowsnap_core::changelog::ChangeLog;
use cowsnap_core::engine::{Engine, EngineConfig};
use cowsnap_core::error::ErrorKind;
use cowsnap_core::export::{DirtyExtent, Export};
use std::sync::{Arc, Mutex};

const CS: u64 = 65536;

fn setup(
    chunks: u64,
) -> (
    tempfile::TempDir,
    Arc<Engine>,
    Backups,
    Arc<ChangeLog>,
    Vec<u8>,
) {
    let dir = tempfile::tempdir().unwrap();
    let size = chunks * CS;
    let data = pattern(size as usize, 7);
    let disk = MemDisk::new(data.clone(), Arc::new(Mutex::new(Vec::new())));
    let cl = Arc::new(ChangeLog::open_in(&dir.path().join("state"), size, CS as u32).unwrap());
    let e = Engine::new(disk, EngineConfig::default(), Some(cl.clone())).unwrap();
    let b = Backups::new(e.clone());
    (dir, e, b, cl, data)
}

fn params(container: &str) -> SnapshotParams {
    SnapshotParams {
        container: Some(container.into()),
        ..Default::default()
    }
}

fn read(e: &dyn Export, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    e.read(off, &mut b).unwrap();
    b
}

#[test]
fn the_export_is_the_instant_and_its_dirty_bitmap_follows_commits() {
    let (_d, e, b, cl, data) = setup(8);
    // untrusted tracking: no dirty bitmap
    let s = b.start_snapshot("d@snap", &params("ram:1M")).unwrap();
    assert_eq!(s.dirty_bitmap(), None);
    let rel = b.release_snapshot(true).unwrap();
    let g1 = rel.generation.unwrap();
    assert!(g1.starts_with("pull-"), "{g1}");
    assert_eq!(cl.relative_to().as_deref(), Some(g1.as_str()));

    e.write(2 * CS + 100, &[1u8; 10], false).unwrap();
    let s = b.start_snapshot("d@snap", &params("ram:1M")).unwrap();
    assert_eq!(s.dirty_bitmap().as_deref(), Some(g1.as_str()));
    // writes after the instant change the disk, not the export
    e.write(0, &vec![9u8; (CS + 5) as usize], false).unwrap();
    e.write(7 * CS, &[9u8; 3], false).unwrap();
    let mut want = data.clone();
    want[(2 * CS + 100) as usize..(2 * CS + 110) as usize].fill(1);
    assert_eq!(read(&*s, 0, want.len()), want);
    assert_eq!(
        read(&*s, CS - 1, 3),
        want[(CS - 1) as usize..(CS + 2) as usize]
    );
    assert_eq!(read(&*e, 0, 1), [9u8]);
    assert_eq!(
        s.dirty_status(CS, 3 * CS).unwrap(),
        vec![
            DirtyExtent {
                len: CS,
                dirty: false
            },
            DirtyExtent {
                len: CS,
                dirty: true
            },
            DirtyExtent {
                len: CS,
                dirty: false
            },
        ]
    );
    assert_eq!(s.status().state, "serving");
    assert!(s.caps().read_only);
    assert_eq!(
        s.write(0, &[1], false).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    // release without commit: tracking unchanged, the later writes still tracked
    assert!(b.release_snapshot(false).unwrap().generation.is_none());
    assert_eq!(cl.relative_to().as_deref(), Some(g1.as_str()));
    let s = b.start_snapshot("d@snap", &params("ram:1M")).unwrap();
    let dirty: Vec<bool> = s
        .dirty_status(0, 8 * CS)
        .unwrap()
        .iter()
        .flat_map(|x| std::iter::repeat_n(x.dirty, (x.len / CS) as usize))
        .collect();
    assert_eq!(dirty, [true, true, true, false, false, false, false, true]);
    // a released export reads no more
    b.release_snapshot(false).unwrap();
    let mut x = [0u8; 1];
    assert!(s.read(0, &mut x).is_err());
    assert_eq!(
        b.release_snapshot(false).unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn one_backup_or_snapshot_at_a_time() {
    let (d, _e, b, _cl, _data) = setup(4);
    b.start_snapshot("d@snap", &params("ram:1M")).unwrap();
    let img = d.path().join("img");
    let e = b
        .start(BackupParams {
            to: format!("file:{}", img.display()),
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy);
    assert!(
        e.to_string().contains("snapshot \"d@snap\" is exported"),
        "{e}"
    );
    assert!(!img.exists());
    let Err(e) = b.start_snapshot("x", &params("ram:1M")) else {
        panic!("a second snapshot was taken");
    };
    assert_eq!(e.kind(), ErrorKind::Busy);
    b.release_snapshot(false).unwrap();
    b.start(BackupParams {
        to: format!("file:{}", img.display()),
        ..Default::default()
    })
    .unwrap();
    b.wait(std::time::Duration::from_secs(30)).unwrap();
}

#[test]
fn a_full_container_fails_the_snapshot_not_the_writes() {
    let (_d, e, b, cl, _data) = setup(8);
    cl.reset_relative_to("g0").unwrap();
    let s = b.start_snapshot("d@snap", &params("ram:128K")).unwrap();
    // two slots; the third chunk's writer waits until the watcher fails the snapshot
    for c in 0..4 {
        e.write(c * CS, &[5u8; 512], false).unwrap();
    }
    let st = s.status();
    assert_eq!(st.state, "failed");
    assert!(st.error.unwrap().contains("container is full"));
    let mut x = [0u8; 1];
    assert!(
        s.read(0, &mut x).is_err(),
        "a failed snapshot must not be read"
    );
    let e2 = b.release_snapshot(true).unwrap_err();
    assert!(e2.to_string().contains("it failed"), "{e2}");
    assert!(
        b.snapshot_export().is_some(),
        "a refused commit changes nothing"
    );
    b.release_snapshot(false).unwrap();
    assert_eq!(cl.relative_to().as_deref(), Some("g0"));
    assert_eq!(read(&*e, 3 * CS, 512), vec![5u8; 512]);
}
