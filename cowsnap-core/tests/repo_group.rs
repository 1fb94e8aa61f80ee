//! Consistency groups in a repository through the real engine and repository target:
//! two disks backed up into one repository with a group recorded in each generation
//! (`BackupParams.group`, as the group coordinator sets it), then the group is listed,
//! resolved and restored, every member bit-exact; a group whose second member never
//! published is listed incomplete and refused.

use cowsnap_core::backup::{BackupParams, BackupState, Backups};
use cowsnap_core::blockio::{open, IoEngine, OpenSpec};
use cowsnap_core::engine::{Engine, EngineConfig};
use cowsnap_core::export::Export;
use cowsnap_core::repo::{self, group, GroupRef, Repo, Resolved};
use cowsnap_core::restore::group as rgroup;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::time::Duration;

const MIB: u64 = 1 << 20;

struct Disk {
    engine: std::sync::Arc<Engine>,
    backups: Backups,
    path: std::path::PathBuf,
}

fn disk(dir: &Path, name: &str, size: u64, seed: u64) -> Disk {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let data: Vec<u8> = (0..size)
        .map(|i| if i % 5 == 0 { 0 } else { rng.gen() })
        .collect();
    let path = dir.join(format!("{name}.img"));
    std::fs::write(&path, &data).unwrap();
    let mut spec = OpenSpec::origin(&path);
    spec.engine = IoEngine::Sync;
    let cfg = EngineConfig {
        name: name.into(),
        ..Default::default()
    };
    let engine = Engine::new(open(&spec).unwrap(), cfg, None).unwrap();
    let backups = Backups::new(engine.clone());
    Disk {
        engine,
        backups,
        path,
    }
}

fn backup(d: &Disk, to: &str, group: Option<GroupRef>) {
    d.backups
        .start(BackupParams {
            to: to.into(),
            container: Some("ram:1M".into()),
            group,
            ..Default::default()
        })
        .unwrap();
    let st = d.backups.wait(Duration::from_secs(60)).unwrap();
    assert_eq!(st.state, BackupState::Complete, "{st:?}");
}

#[test]
fn a_group_of_two_disks_lists_resolves_and_restores_bit_exact() {
    let t = tempfile::tempdir().unwrap();
    let a = disk(t.path(), "a", 6 * MIB + 4096, 1);
    let b = disk(t.path(), "b", 3 * MIB + 512, 2);
    let repo_dir = t.path().join("repo");
    let to = format!("repo:{}", repo_dir.display());
    let gid = repo::generation::new_generation_id().unwrap();
    let gref = GroupRef {
        id: gid.clone(),
        disks: vec!["a".into(), "b".into()],
    };
    backup(&a, &to, Some(gref.clone()));
    backup(&b, &to, Some(gref));
    let img_a = std::fs::read(&a.path).unwrap();
    let img_b = std::fs::read(&b.path).unwrap();
    // Later writes and a single-disk generation of a: not the group's data.
    a.engine.write(0, &[0xEE; 8192], false).unwrap();
    b.engine.write(MIB, &[0xDD; 4096], false).unwrap();
    backup(&a, &to, None);
    // An incomplete group: b's member never published.
    let lone = GroupRef {
        id: repo::generation::new_generation_id().unwrap(),
        disks: vec!["a".into(), "b".into()],
    };
    backup(&a, &to, Some(lone.clone()));

    let r = Repo::open(&repo_dir).unwrap();
    let groups = group::list(&r).unwrap();
    assert_eq!(groups.len(), 2, "{groups:?}");
    let g = groups.iter().find(|g| g.id == gid).unwrap();
    assert!(g.complete, "{g:?}");
    assert_eq!(g.disks, ["a", "b"]);
    assert_eq!(g.members.len(), 2);
    let inc = groups.iter().find(|g| g.id == lone.id).unwrap();
    assert!(!inc.complete);
    assert_eq!(inc.missing, ["b"]);

    let all = r.list().unwrap();
    assert_eq!(all.len(), 4);
    let Resolved::Group(resolved) = group::resolve(&r, Some(&gid)).unwrap() else {
        panic!("{gid} did not resolve to a group");
    };
    assert_eq!(&resolved, g);
    // A member id still names its generation.
    let ma = &g.member_of("a").unwrap().generation;
    assert!(matches!(
        group::resolve(&r, Some(ma)).unwrap(),
        Resolved::Generation(x) if &x.id == ma
    ));

    let dests = rgroup::parse_destinations(&format!(
        "b={},a={}",
        t.path().join("rb.img").display(),
        t.path().join("ra.img").display()
    ))
    .unwrap();
    let Resolved::Group(inc) = group::resolve(&r, Some(&lone.id)).unwrap() else {
        panic!("{} did not resolve to a group", lone.id);
    };
    let e = rgroup::plan(&inc, &all, &dests).unwrap_err().to_string();
    assert!(e.contains("missing: disk b"), "{e}");
    assert!(!t.path().join("ra.img").exists());

    let plan = rgroup::plan(g, &all, &dests).unwrap();
    let reps = rgroup::restore_group(&repo_dir, &plan, &|_, _| {}).unwrap();
    assert_eq!(reps.len(), 2);
    let got_a = std::fs::read(t.path().join("ra.img")).unwrap();
    let got_b = std::fs::read(t.path().join("rb.img")).unwrap();
    assert!(
        got_a == img_a,
        "disk a differs from its image at the group's instant"
    );
    assert!(
        got_b == img_b,
        "disk b differs from its image at the group's instant"
    );
    assert!(repo::verify(&repo_dir, Some(&gid)).unwrap().ok);
}
