//! `dev:` container and `dev:` target on real block devices (loop devices). Skips
//! when loop devices cannot be set up (not root, no losetup, no loop module).

use cowsnap_core::backup::{BackupParams, BackupState, Backups};
use cowsnap_core::blockio::{self, OpenSpec};
use cowsnap_core::engine::{Engine, EngineConfig};
use cowsnap_core::export::Export;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

struct Loop(PathBuf);

impl Loop {
    fn attach(file: &Path) -> Option<Loop> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let dev = String::from_utf8(out.stdout).ok()?.trim().to_string();
        Some(Loop(PathBuf::from(dev)))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn dev_container_and_dev_target_on_loop_devices() {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 8 << 20;
    let origin = dir.path().join("disk");
    let data: Vec<u8> = (0..size).map(|i| ((i / 4096) % 251) as u8 | 1).collect();
    std::fs::write(&origin, &data).unwrap();
    let cfile = dir.path().join("cont");
    std::fs::write(&cfile, vec![0u8; 4 << 16]).unwrap(); // 4 slots
    let tfile = dir.path().join("target");
    std::fs::write(&tfile, vec![0xEEu8; size as usize + (1 << 20)]).unwrap();
    let (Some(cdev), Some(tdev)) = (Loop::attach(&cfile), Loop::attach(&tfile)) else {
        eprintln!("SKIP: cannot set up loop devices");
        return;
    };
    let mut spec = OpenSpec::origin(&origin);
    spec.engine = blockio::IoEngine::Sync;
    let e = Engine::new(blockio::open(&spec).unwrap(), EngineConfig::default(), None).unwrap();
    let b = Backups::new(e.clone());
    // a chunk of zeros on the disk must come out as zeros on the device (which held 0xEE)
    e.zero(3 << 16, 1 << 16, Default::default()).unwrap();
    let mut expect = data.clone();
    expect[3 << 16..4 << 16].fill(0);
    b.start(BackupParams {
        to: format!("dev:{}", tdev.0.display()),
        container: Some(format!("dev:{}", cdev.0.display())),
        rate_limit: Some(4 << 20),
        ..Default::default()
    })
    .unwrap();
    // writes during the backup go through the device container
    for i in 0..20u64 {
        e.write(i * 7 * 4096 + 100, &[0x42; 5000], false).unwrap();
    }
    let st = b.wait(Duration::from_secs(60)).unwrap();
    assert_eq!(st.state, BackupState::Complete, "{st:?}");
    assert!(st.chunks_preserved > 0, "{st:?}");
    assert_eq!(st.container_slots, 4);
    drop(e);
    let img = std::fs::read(&tdev.0).unwrap();
    assert!(img[..size as usize] == expect[..], "device image differs");
    assert!(
        img[size as usize..].iter().all(|&b| b == 0xEE),
        "past the disk untouched"
    );
}

#[test]
fn direct_io_origin_on_a_loop_device() {
    use cowsnap_core::aligned::AlignedBuf;
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 4 << 20;
    let ofile = dir.path().join("disk");
    let data: Vec<u8> = (0..size).map(|i| ((i / 512) % 253) as u8 | 1).collect();
    std::fs::write(&ofile, &data).unwrap();
    let Some(odev) = Loop::attach(&ofile) else {
        eprintln!("SKIP: cannot set up loop devices");
        return;
    };
    let mut spec = OpenSpec::origin(&odev.0);
    spec.engine = blockio::IoEngine::Sync;
    spec.direct = true;
    let e = Engine::new(blockio::open(&spec).unwrap(), EngineConfig::default(), None).unwrap();
    let b = Backups::new(e.clone());
    let img = dir.path().join("img");
    b.start(BackupParams {
        to: format!("file:{}", img.display()),
        container: Some("ram:128K".into()),
        rate_limit: Some(8 << 20),
        ..Default::default()
    })
    .unwrap();
    let mut buf = AlignedBuf::new();
    buf.resize(8192);
    buf.fill(0x42);
    for i in 0..16u64 {
        e.write(i * 4 * 65536 + 4096, &buf, false).unwrap();
    }
    let st = b.wait(Duration::from_secs(60)).unwrap();
    assert_eq!(st.state, BackupState::Complete, "{st:?}");
    assert!(st.chunks_preserved > 0, "{st:?}");
    assert!(std::fs::read(&img).unwrap() == data, "image differs");
    drop(e);
}

/// A block-device origin served buffered, backed up with `direct_io` (the drainer reads
/// it through a second, O_DIRECT handle), on both engines: writes made just before the
/// backup (still dirty in the page cache) are in the image, writes during it are not,
/// and the origin holds them afterwards.
#[test]
fn a_buffered_loop_origin_is_drained_o_direct_on_both_engines() {
    let mut engines = vec![blockio::IoEngine::Sync];
    if blockio::uring::probe() {
        engines.push(blockio::IoEngine::Uring);
    }
    for engine in engines {
        let dir = tempfile::tempdir().unwrap();
        let size: u64 = 8 << 20;
        let ofile = dir.path().join("disk");
        let mut data: Vec<u8> = (0..size).map(|i| ((i / 512) % 241) as u8 | 1).collect();
        std::fs::write(&ofile, &data).unwrap();
        let Some(odev) = Loop::attach(&ofile) else {
            eprintln!("SKIP: cannot set up loop devices");
            return;
        };
        let mut spec = OpenSpec::origin(&odev.0);
        spec.engine = engine;
        let cfg = EngineConfig {
            direct_io: true,
            ..EngineConfig::default()
        };
        let e = Engine::new(blockio::open(&spec).unwrap(), cfg, None).unwrap();
        assert!(
            e.origin().open_direct_reader().unwrap().is_some(),
            "{engine:?}: a loop device takes O_DIRECT"
        );
        // buffered and unaligned, not flushed: dirty in the page cache at the instant
        for i in 0..32u64 {
            let off = i * 200_003 + 77;
            let w = vec![0x5A ^ i as u8; 3000];
            e.write(off, &w, false).unwrap();
            data[off as usize..off as usize + 3000].copy_from_slice(&w);
        }
        let b = Backups::new(e.clone());
        let img = dir.path().join("img");
        b.start(BackupParams {
            to: format!("file:{}", img.display()),
            container: Some("ram:256K".into()),
            rate_limit: Some(8 << 20),
            ..Default::default()
        })
        .unwrap();
        let mut after = data.clone();
        for i in 0..16u64 {
            let off = i * 500_009 + 1;
            e.write(off, &[0xC7; 5000], false).unwrap();
            after[off as usize..off as usize + 5000].fill(0xC7);
        }
        let st = b.wait(Duration::from_secs(60)).unwrap();
        assert_eq!(st.state, BackupState::Complete, "{engine:?}: {st:?}");
        assert!(
            std::fs::read(&img).unwrap() == data,
            "{engine:?}: image differs from the disk at the instant"
        );
        e.flush().unwrap();
        drop(b);
        drop(e);
        assert!(
            std::fs::read(&odev.0).unwrap() == after,
            "{engine:?}: the origin lost a write"
        );
    }
}
