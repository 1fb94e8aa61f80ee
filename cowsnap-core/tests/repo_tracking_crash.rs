//! Change tracking survives kill -9: a child process marks and writes an origin file,
//! takes and commits a generation, starts another one, and keeps writing; the parent
//! kills it at various moments and checks that the reopened change log reports every
//! chunk that differs from the content its `relative_to` names.

mod repo_common;

use cowsnap_core::changelog::ChangeLog;
use repo_common::*;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

const SIZE: usize = 8 << 20;
const CS: u32 = 4096;
const ENV: &str = "COWSNAP_TEST_TRACK_CHILD";

#[test]
#[ignore = "child process of kill9_never_under_reports"]
fn track_child() {
    let Ok(dir) = std::env::var(ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let origin = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("origin.img"))
        .unwrap();
    let cl = ChangeLog::open_in(&dir.join("state"), SIZE as u64, CS).unwrap();
    let mut s = std::process::id() as u64;
    let write = |s: &mut u64| {
        let off = splitmix(s) % (SIZE as u64 - 20000);
        let len = splitmix(s) % 20000 + 1;
        let mut d = vec![0u8; len as usize];
        fill_random(&mut d, s);
        cl.mark(off, len).unwrap();
        origin.write_all_at(&d, off).unwrap();
    };
    write(&mut s);
    std::fs::write(dir.join("ready"), b"").unwrap();
    for _ in 0..60 {
        write(&mut s);
    }
    // a backup: cut, copy the snapshot, commit
    let cut = cl.begin_generation().unwrap();
    let mut img = vec![0u8; SIZE];
    origin.read_exact_at(&mut img, 0).unwrap();
    std::fs::write(dir.join("g1.tmp"), &img).unwrap();
    std::fs::rename(dir.join("g1.tmp"), dir.join("g1.img")).unwrap();
    cl.commit_generation(&cut, "G1").unwrap();
    for _ in 0..60 {
        write(&mut s);
    }
    // a backup that never finishes
    let _cut = cl.begin_generation().unwrap();
    loop {
        write(&mut s);
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn kill9_never_under_reports() {
    for kill_after_ms in [0u64, 20, 150, 400, 800, 1500] {
        let d = tempfile::tempdir().unwrap();
        let base = synth_disk(SIZE, kill_after_ms + 1);
        std::fs::write(d.path().join("origin.img"), &base).unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "track_child", "--ignored", "--nocapture"])
            .env(ENV, d.path())
            .spawn()
            .unwrap();
        let t = std::time::Instant::now();
        while !d.path().join("ready").exists() {
            assert!(t.elapsed() < Duration::from_secs(30), "child did not start");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(kill_after_ms));
        // SAFETY: plain kill(2) of the child we spawned; no memory is passed.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGKILL) }, 0);
        let _ = child.wait().unwrap();

        let origin = std::fs::read(d.path().join("origin.img")).unwrap();
        let cl = ChangeLog::open_in(&d.path().join("state"), SIZE as u64, CS).unwrap();
        let rel = cl.relative_to();
        let reference = match rel.as_deref() {
            Some("G1") => std::fs::read(d.path().join("g1.img")).unwrap(),
            None => base.clone(),
            Some(other) => panic!("unexpected relative_to {other}"),
        };
        let cut = cl.begin_generation().unwrap();
        let mut differing = 0;
        for c in 0..SIZE / CS as usize {
            let r = c * CS as usize..(c + 1) * CS as usize;
            if origin[r.clone()] != reference[r] {
                differing += 1;
                assert!(
                    cut.changed[c],
                    "kill after {kill_after_ms} ms (relative to {rel:?}): chunk {c} changed but not reported"
                );
            }
        }
        // Relative to the base, the write made before "ready" always differs; relative
        // to G1, a child killed right after committing it wrote nothing since (seen on a
        // loaded machine), which is a correct empty report.
        assert!(
            differing > 0 || rel.is_some(),
            "kill after {kill_after_ms} ms: the child's first write is not in the origin"
        );
        eprintln!(
            "kill after {kill_after_ms} ms: relative to {rel:?}, {differing} chunks differ, {} reported",
            cut.changed.count_ones()
        );
    }
}
