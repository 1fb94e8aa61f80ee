//! Trims and write-zeroes of whole chunks are not read by the next backup, on an origin
//! that has no holes to show (like a block device): the chunks go to the target as
//! zeros. The origin here keeps its old data on a discard (a device may), so an image
//! that holds zeros there proves the data was not read; one that holds the old data
//! where a write came after the discard proves a write clears the mark.

mod common;

use common::*;
use cowsnap_core::backup::{BackupParams, BackupState, BackupStatus, Backups};
use cowsnap_core::blockio::BlockIo;
use cowsnap_core::changelog::ChangeLog;
use cowsnap_core::engine::{Engine, EngineConfig};
use cowsnap_core::error::Result;
use cowsnap_core::export::{Export, ZeroFlags};
use cowsnap_core::restore::restore_to;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// A device that ignores discards (reads after one return the old data) and counts
/// the bytes read from it.
struct KeepsData {
    disk: Arc<MemDisk>,
    read: AtomicU64,
}

impl BlockIo for KeepsData {
    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.read.fetch_add(buf.len() as u64, Ordering::SeqCst);
        self.disk.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.disk.write_at(buf, off)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn discard(&self, _off: u64, _len: u64) -> Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, off: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.disk.write_zeroes(off, len, may_unmap)
    }
    fn fast_zero(&self) -> bool {
        true
    }
    fn is_block_device(&self) -> bool {
        true
    }
    fn engine_name(&self) -> &'static str {
        "keeps-data"
    }
}

fn backup(backups: &Backups, to: &str, incremental: bool, all_blocks: bool) -> BackupStatus {
    backups
        .start(BackupParams {
            to: to.into(),
            container: Some("ram:1M".into()),
            incremental,
            all_blocks,
            ..Default::default()
        })
        .unwrap();
    let st = backups.wait(Duration::from_secs(60)).unwrap();
    assert_eq!(st.state, BackupState::Complete, "{st:?}");
    st
}

fn zero(img: &mut [u8], a: u64, b: u64) {
    img[a as usize..b as usize].fill(0);
}

#[test]
fn discarded_chunks_go_to_the_target_as_zeros_unread() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB + 12345;
    let data = pattern(size as usize, 3);
    let disk = MemDisk::new(data, Arc::new(std::sync::Mutex::new(Vec::new())));
    let dev = Arc::new(KeepsData {
        disk: disk.clone(),
        read: AtomicU64::new(0),
    });
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let cl = Arc::new(ChangeLog::open_in(&state, size, 65536).unwrap());
    let cfg = EngineConfig {
        name: "d".into(),
        ..Default::default()
    };
    let engine = Engine::new(dev.clone(), cfg.clone(), Some(cl.clone())).unwrap();
    let backups = Backups::new(engine.clone());
    let repo_dir = dir.path().join("repo");
    let to = format!("repo:{}", repo_dir.display());

    let st1 = backup(&backups, &to, false, false);
    assert_eq!(st1.bytes_excluded_discarded, 0);
    // a full backup reads every chunk, and the probe for a filesystem a few bytes
    let probe = dev.read.load(Ordering::SeqCst) - size;
    assert!(probe < 64 * 1024, "{probe}");

    // trim 1..5 MiB, then write into 2..3 MiB (that repository chunk is read again);
    // write-zeroes 8..10 MiB; a trim one byte short of a chunk at each end of
    // 12..13 MiB covers 12 MiB+64K..13 MiB-64K only: not a whole repository chunk;
    // the disk's short last chunk trimmed from 16 MiB to the end
    engine.trim(MIB, 4 * MIB, false).unwrap();
    engine.write(2 * MIB + 100, &[7u8; 4096], false).unwrap();
    engine.zero(8 * MIB, 2 * MIB, ZeroFlags::default()).unwrap();
    engine.trim(12 * MIB + 1, MIB - 2, false).unwrap();
    engine.trim(16 * MIB, size - 16 * MIB, false).unwrap();
    let mut want2 = disk.snapshot();
    zero(&mut want2, MIB, 2 * MIB);
    zero(&mut want2, 3 * MIB, 5 * MIB);
    zero(&mut want2, 16 * MIB, size);
    dev.read.store(0, Ordering::SeqCst);
    let st2 = backup(&backups, &to, true, false);
    // 1..2, 3..5, 8..10 and the tail
    assert_eq!(
        st2.bytes_excluded_discarded,
        5 * MIB + (size - 16 * MIB),
        "{st2:?}"
    );
    assert!(
        st2.notes.iter().any(|n| n.contains("discarded")),
        "{:?}",
        st2.notes
    );
    // in scope: 1..5, 8..10, 12..13, 16..end; read: 2..3 and 12..13 only
    assert_eq!(dev.read.load(Ordering::SeqCst), 2 * MIB, "{st2:?}");

    // the marks outlive the cut: a full backup to a raw image (granule: one 64 KiB
    // chunk) leaves out every chunk discarded and not written since, whatever backup
    // came between
    engine.write(4 * MIB, &[9u8; 65536], false).unwrap();
    let k = 65536;
    let mut want3 = disk.snapshot();
    zero(&mut want3, MIB, 2 * MIB);
    zero(&mut want3, 2 * MIB + k, 4 * MIB);
    zero(&mut want3, 4 * MIB + k, 5 * MIB);
    zero(&mut want3, 12 * MIB + k, 13 * MIB - k);
    zero(&mut want3, 16 * MIB, size);
    let raw = dir.path().join("raw.img");
    dev.read.store(0, Ordering::SeqCst);
    let st3 = backup(&backups, &format!("file:{}", raw.display()), false, false);
    assert_eq!(
        st3.bytes_excluded_discarded,
        MIB + (MIB - k) + MIB + (MIB - k) + 2 * MIB + (MIB - 2 * k) + (size - 16 * MIB),
        "{st3:?}"
    );
    assert_eq!(
        dev.read.load(Ordering::SeqCst),
        size - st3.bytes_excluded_discarded + probe
    );
    assert!(std::fs::read(&raw).unwrap() == want3, "raw image differs");

    // --all-blocks reads them
    let st4 = backup(
        &backups,
        &format!("file:{}", dir.path().join("all.img").display()),
        false,
        true,
    );
    assert_eq!(st4.bytes_excluded_discarded, 0);
    assert!(std::fs::read(dir.path().join("all.img")).unwrap() == disk.snapshot());

    let gens = cowsnap_core::repo::list(&repo_dir).unwrap();
    assert_eq!(gens.len(), 2);
    let out = dir.path().join("r2.img");
    restore_to(&repo_dir, Some(&gens[1].id), &out, &|_, _| {}).unwrap();
    assert!(
        std::fs::read(&out).unwrap() == want2,
        "the incremental differs from the disk at its instant with discards as zeros"
    );

    // a new daemon knows of no discard: everything in scope is read (the safe side)
    drop(backups);
    drop(engine);
    let engine = Engine::new(dev.clone(), cfg, Some(cl)).unwrap();
    let backups = Backups::new(engine.clone());
    dev.read.store(0, Ordering::SeqCst);
    let raw5 = dir.path().join("raw5.img");
    let st5 = backup(&backups, &format!("file:{}", raw5.display()), false, false);
    assert_eq!(st5.bytes_excluded_discarded, 0);
    assert_eq!(dev.read.load(Ordering::SeqCst), size + probe);
    assert!(std::fs::read(&raw5).unwrap() == disk.snapshot());
}

#[test]
fn a_trim_after_the_instant_keeps_the_original_in_the_running_backup() {
    let size = 8 * MIB;
    let data = pattern(size as usize, 5);
    let disk = MemDisk::new(data.clone(), Arc::new(std::sync::Mutex::new(Vec::new())));
    let engine = Engine::new(
        disk.clone(),
        EngineConfig {
            name: "d".into(),
            ..Default::default()
        },
        None,
    )
    .unwrap();
    let backups = Backups::new(engine.clone());
    let (target, ts) = MemTarget::new(size, 65536, 16);
    ts.pause();
    backups
        .start_with(
            BackupParams {
                to: "mem".into(),
                container: Some("ram:16M".into()),
                ..Default::default()
            },
            Some(target),
            None,
        )
        .unwrap();
    // after the instant: the discards zero the disk (MemDisk does), the backup keeps
    // the data of the instant
    engine.trim(0, 4 * MIB, false).unwrap();
    engine.zero(4 * MIB, 4 * MIB, ZeroFlags::default()).unwrap();
    assert!(disk.snapshot().iter().all(|&b| b == 0));
    ts.resume();
    let st = backups.wait(Duration::from_secs(60)).unwrap();
    assert_eq!(st.state, BackupState::Complete, "{st:?}");
    assert_eq!(st.bytes_excluded_discarded, 0);
    assert!(
        *ts.image.lock().unwrap() == data,
        "the image is not the instant"
    );
}
