//! The engine, the change log and the repository together: full and incremental
//! backups of a file disk taken through `Backups::start` while writers run,
//! each generation restored and compared with the disk at its snapshot instant.

use cowsnap_core::backup::{BackupParams, BackupState, Backups};
use cowsnap_core::blockio::{open, IoEngine, OpenSpec};
use cowsnap_core::changelog::ChangeLog;
use cowsnap_core::engine::{Engine, EngineConfig};
use cowsnap_core::export::Export;
use cowsnap_core::repo;
use cowsnap_core::restore::restore_to;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn backup(backups: &Backups, to: &str, incremental: bool) -> cowsnap_core::backup::BackupStatus {
    backups
        .start(BackupParams {
            to: to.into(),
            container: Some("ram:1M".into()),
            incremental,
            ..Default::default()
        })
        .unwrap();
    let st = backups.wait(Duration::from_secs(60)).unwrap();
    assert_eq!(st.state, BackupState::Complete, "{st:?}");
    st
}

fn write_random(engine: &Engine, rng: &mut rand::rngs::StdRng, n: usize, size: u64) {
    for _ in 0..n {
        let len = rng.gen_range(1..=3 * 65536u64);
        let off = rng.gen_range(0..size - len);
        let buf: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        engine.write(off, &buf, false).unwrap();
    }
}

#[test]
fn full_then_incremental_through_the_engine_restore_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let size = 32 * MIB + 12345;
    let disk = dir.path().join("disk.img");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let init: Vec<u8> = (0..size)
        .map(|i| if i % 3 == 0 { 0 } else { rng.gen() })
        .collect();
    std::fs::write(&disk, &init).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mut spec = OpenSpec::origin(&disk);
    spec.engine = IoEngine::Sync;
    let origin = open(&spec).unwrap();
    let cl = Arc::new(ChangeLog::open_in(&state, size, 65536).unwrap());
    let cfg = EngineConfig {
        name: "d".into(),
        ..Default::default()
    };
    let engine = Engine::new(origin, cfg, Some(cl)).unwrap();
    let backups = Backups::new(engine.clone());
    let repo_dir = dir.path().join("repo");
    let to = format!("repo:{}", repo_dir.display());

    // Generation 1: full. The disk at its instant is `init`.
    let st1 = backup(&backups, &to, false);
    let img1 = init.clone();
    // Generation 2: incremental after a few scattered writes.
    write_random(&engine, &mut rng, 6, size);
    let img2 = std::fs::read(&disk).unwrap();
    let st2 = backup(&backups, &to, true);
    // Generation 3: incremental after writes at the first and last byte.
    engine.write(0, &[0xAA; 100], false).unwrap();
    engine.write(size - 7, &[0xBB; 7], false).unwrap();
    let img3 = std::fs::read(&disk).unwrap();
    let st3 = backup(&backups, &to, true);

    let gens = repo::list(&repo_dir).unwrap();
    assert_eq!(gens.len(), 3);
    assert_eq!(gens[1].parent.as_deref(), Some(gens[0].id.as_str()));
    assert!(st2.chunks_in_scope < st1.chunks_in_scope / 2, "{st2:?}");
    assert!(st3.chunks_in_scope <= 2 * 16, "{st3:?}");
    for (g, want) in gens.iter().zip([&img1, &img2, &img3]) {
        let out = dir.path().join(format!("r-{}.img", g.id));
        restore_to(&repo_dir, Some(&g.id), &out, &|_, _| {}).unwrap();
        let got = std::fs::read(&out).unwrap();
        assert_eq!(got.len(), want.len());
        assert!(
            got == **want,
            "generation {} differs from the disk at its instant",
            g.id
        );
    }
    assert!(repo::verify(&repo_dir, None).unwrap().ok);
}

#[test]
fn the_last_successful_backup_is_recorded_and_survives_a_restart() {
    use cowsnap_core::backup::LastBackupRecord;
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![7u8; size as usize]).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mut spec = OpenSpec::origin(&disk);
    spec.engine = IoEngine::Sync;
    let cfg = EngineConfig {
        name: "d".into(),
        ..Default::default()
    };
    let engine = Engine::new(open(&spec).unwrap(), cfg, None).unwrap();
    let backups = Backups::with_record(engine.clone(), LastBackupRecord::in_dir(&state));
    assert!(backups.last_success().is_none());
    let to = format!("repo:{}", dir.path().join("repo").display());
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let st = backup(&backups, &to, false);
    let last = backups.last_success().expect("recorded");
    assert_eq!(last.id, st.id);
    assert_eq!(last.generation, st.generation);
    assert_eq!(last.bytes_copied, size);
    assert!(last.instant_unix >= before && last.finished_unix >= last.instant_unix);

    // A failed backup leaves the record alone.
    backups
        .start(BackupParams {
            to: format!("file:{}", dir.path().join("no/such/dir/x.img").display()),
            container: Some("ram:1M".into()),
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(backups.last_success().as_ref(), Some(&last));

    // A new daemon over the same state directory knows it.
    let again = Backups::with_record(engine, LastBackupRecord::in_dir(&state));
    assert_eq!(again.last_success(), Some(last));
}
