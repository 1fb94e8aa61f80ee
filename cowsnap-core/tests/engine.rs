//! Engine behaviour with recording and fault-injecting doubles.

mod common;

use common::*;
use cowsnap_core::backup::{BackupParams, BackupState, Backups};
use cowsnap_core::blockio::{self, OpenSpec};
use cowsnap_core::engine::{Engine, EngineConfig};
use cowsnap_core::error::ErrorKind;
use cowsnap_core::export::{Export, ZeroFlags};
use cowsnap_core::target::raw::incomplete_marker;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CS: u32 = 65536;
const CSU: u64 = CS as u64;
/// Disk size in chunks for tests that pause the drainer: its first batch (64 chunks)
/// is claimed and read before it blocks in the paused target.
const N: u64 = 256;
/// Offset of the half the paused drainer has not touched.
const B: u64 = 128 * CSU;

fn params(to: &str) -> BackupParams {
    BackupParams {
        to: to.into(),
        ..Default::default()
    }
}

fn wait_done(b: &Backups) -> cowsnap_core::backup::BackupStatus {
    let st = b.wait(Duration::from_secs(30)).unwrap();
    assert!(st.state.is_finished(), "backup did not finish: {st:?}");
    st
}

type MemEngine = (Arc<Engine>, Arc<Backups>, Arc<MemDisk>, Log, Vec<u8>);

fn mem_engine(size: usize, seed: u64) -> MemEngine {
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let data = pattern(size, seed);
    let disk = MemDisk::new(data.clone(), log.clone());
    let e = Engine::new(disk.clone(), EngineConfig::default(), None).unwrap();
    let b = Arc::new(Backups::new(e.clone()));
    (e, b, disk, log, data)
}

#[test]
fn file_backup_of_a_file_origin_matches() {
    file_backup_matches(blockio::IoEngine::Sync);
}

#[test]
fn file_backup_of_a_file_origin_matches_on_io_uring() {
    if !blockio::uring::probe() {
        eprintln!("SKIP: io_uring is not available here");
        return;
    }
    file_backup_matches(blockio::IoEngine::Uring);
}

fn file_backup_matches(io_engine: blockio::IoEngine) {
    let dir = tempfile::tempdir().unwrap();
    let origin = dir.path().join("disk");
    let size = 5 * CSU + 12345; // short last chunk
    let mut data = pattern(size as usize, 1);
    data[CSU as usize..2 * CSU as usize].fill(0); // zero data: copied as data
    data[3 * CSU as usize..4 * CSU as usize].fill(0); // a hole: stays a hole
    std::fs::write(&origin, &data).unwrap();
    punch(&origin, 3 * CSU, CSU);
    let mut spec = OpenSpec::origin(&origin);
    spec.engine = io_engine;
    let io = blockio::open(&spec).unwrap();
    let e = Engine::new(io, EngineConfig::default(), None).unwrap();
    assert_eq!(
        e.origin().engine_name(),
        if io_engine == blockio::IoEngine::Sync {
            "sync"
        } else {
            "uring"
        }
    );
    let b = Backups::new(e.clone());
    let img = dir.path().join("img");
    let id = b.start(params(&format!("file:{}", img.display()))).unwrap();
    assert_eq!(id, 1);
    let st = wait_done(&b);
    assert_eq!(st.state, BackupState::Complete, "{st:?}");
    assert_eq!(st.chunks_in_scope, 6);
    assert_eq!(st.chunks_copied, 6);
    assert_eq!(
        st.bytes_copied,
        size - CSU,
        "the hole is known zeros, not read"
    );
    // the file origin is copied in the kernel: the hole is skipped, the zero data
    // chunk is stored as data (only what passes through the buffer is looked at)
    assert_eq!(st.bytes_stored, size - CSU);
    assert_eq!(st.container, "ram:67108864", "default container is ram:64M");
    assert_eq!(std::fs::read(&img).unwrap(), data);
    assert_eq!(
        allocated(&img, 3 * CSU, 4 * CSU),
        0,
        "the hole stayed a hole"
    );
    assert!(!incomplete_marker(&img).exists());
    // a second backup may start now
    let id2 = b.start(params(&format!("file:{}", img.display()))).unwrap();
    assert_eq!(id2, 2);
    assert_eq!(wait_done(&b).state, BackupState::Complete);
}

fn punch(path: &std::path::Path, off: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    nix::fcntl::fallocate(
        f.as_raw_fd(),
        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        off as i64,
        len as i64,
    )
    .unwrap();
}

/// Bytes of `a..b` of a file that hold data (SEEK_DATA/SEEK_HOLE).
fn allocated(path: &std::path::Path, a: u64, b: u64) -> u64 {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let (mut pos, mut n) = (a, 0);
    while pos < b {
        let d = nix::unistd::lseek(f.as_raw_fd(), pos as i64, nix::unistd::Whence::SeekData);
        let Ok(d) = d else { break };
        let d = d as u64;
        if d >= b {
            break;
        }
        let h = nix::unistd::lseek(f.as_raw_fd(), d as i64, nix::unistd::Whence::SeekHole).unwrap()
            as u64;
        n += h.min(b) - d;
        pos = h;
    }
    n
}

#[test]
fn a_zero_chunk_that_passes_through_the_buffer_is_a_hole_in_a_file_image() {
    // an origin without a plain file (here a test disk; a block device, a live
    // restore) is read into the drainer's buffer: all-zero chunks are not written
    let (_e, b, _disk, _log, _) = mem_engine(8 * CS as usize, 3);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    _e.write(2 * CSU, &vec![0u8; CS as usize], false).unwrap();
    b.start(params(&format!("file:{}", img.display()))).unwrap();
    let st = wait_done(&b);
    assert_eq!(st.state, BackupState::Complete, "{st:?}");
    assert_eq!(st.bytes_stored, 7 * CSU);
    assert_eq!(allocated(&img, 2 * CSU, 3 * CSU), 0);
    assert_eq!(allocated(&img, 0, 2 * CSU), 2 * CSU);
}

#[test]
fn container_write_comes_before_origin_write() {
    let (e, b, disk, log, orig) = mem_engine(N as usize * CS as usize, 2);
    let (t, ts) = MemTarget::new(N * CSU, CS, 1);
    // the drainer blocks in its first target write (chunks 0..63); the upper half of
    // the disk stays pending until resumed
    ts.pause();
    let c = RecContainer::new(16, CS, log.clone());
    b.start_with(params("test:"), Some(t), Some(Box::new(c)))
        .unwrap();
    log.lock().unwrap().clear();
    // across chunk 130 / 131
    e.write(B + 3 * CSU - 10, &[0xEE; 20], false).unwrap();
    // again: already preserved, straight through
    e.write(B + 3 * CSU - 5, &[0xDD; 4], false).unwrap();
    let ev = log.lock().unwrap().clone();
    assert_eq!(
        ev,
        vec![
            Ev::ContainerWrite {
                slot: 0,
                first_byte: orig[(B + 2 * CSU) as usize]
            },
            Ev::ContainerWrite {
                slot: 1,
                first_byte: orig[(B + 3 * CSU) as usize]
            },
            Ev::OriginWrite {
                off: B + 3 * CSU - 10,
                len: 20
            },
            Ev::OriginWrite {
                off: B + 3 * CSU - 5,
                len: 4
            },
        ]
    );
    let st = b.status().unwrap();
    assert_eq!(st.state, BackupState::Running);
    assert_eq!(st.chunks_preserved, 2);
    assert_eq!(st.holds, 1);
    ts.resume();
    let st = wait_done(&b);
    assert_eq!(st.state, BackupState::Complete, "{st:?}");
    assert_eq!(
        *ts.image.lock().unwrap(),
        orig,
        "image is the disk at the instant"
    );
    assert_eq!(disk.snapshot()[(B + 3 * CSU - 5) as usize], 0xDD);
    // after the backup: plain pass-through, no container traffic
    log.lock().unwrap().clear();
    e.write(0, &[1; 10], false).unwrap();
    assert_eq!(
        *log.lock().unwrap(),
        vec![Ev::OriginWrite { off: 0, len: 10 }]
    );
}

#[test]
fn done_chunks_pass_through_without_reads() {
    let (e, b, disk, log, orig) = mem_engine(4 * CS as usize, 3);
    let (t, ts) = MemTarget::new(4 * CSU, CS, 1);
    b.start_with(params("test:"), Some(t), None).unwrap();
    assert_eq!(wait_done(&b).state, BackupState::Complete);
    assert_eq!(*ts.image.lock().unwrap(), orig);
    disk.record_reads.store(true, Ordering::SeqCst);
    log.lock().unwrap().clear();
    e.write(CSU, &[9; 100], false).unwrap();
    assert_eq!(
        *log.lock().unwrap(),
        vec![Ev::OriginWrite { off: CSU, len: 100 }]
    );
}

#[test]
fn trim_and_write_zeroes_preserve_too() {
    let size = N * CSU + 300;
    let (e, b, disk, _log, orig) = mem_engine(size as usize, 4);
    let (t, ts) = MemTarget::new(size, CS, 2);
    ts.pause();
    b.start_with(params("test:"), Some(t), None).unwrap();
    e.trim(B + CSU / 2, 2 * CSU, false).unwrap();
    e.zero(B + 4 * CSU, 2 * CSU + 300, ZeroFlags::default())
        .unwrap();
    // the disk's last byte
    e.write(size - 1, &[0x11], true).unwrap();
    ts.resume();
    let st = wait_done(&b);
    assert_eq!(st.state, BackupState::Complete, "{st:?}");
    assert_eq!(*ts.image.lock().unwrap(), orig);
    let now = disk.snapshot();
    let t0 = (B + CSU / 2) as usize;
    assert!(now[t0..t0 + 2 * CS as usize].iter().all(|&b| b == 0));
    assert_eq!(now[size as usize - 1], 0x11);
    assert!(st.chunks_preserved >= 5, "{st:?}");
}

#[test]
fn target_enospc_fails_backup_and_keeps_every_write() {
    let (e, b, disk, log, _orig) = mem_engine(N as usize * CS as usize, 5);
    let (t, ts) = MemTarget::new(N * CSU, CS, 1);
    // the first batch succeeds, the second hits ENOSPC
    *ts.fail_after.lock().unwrap() = Some((1, libc::ENOSPC));
    ts.pause();
    b.start_with(
        params("test:"),
        Some(t),
        Some(Box::new(RecContainer::new(4, CS, log))),
    )
    .unwrap();
    let mut expect = disk.snapshot();
    for i in 0..3u64 {
        let off = B + i * 6 * CSU + 100;
        let d = vec![i as u8 + 1; 5000];
        e.write(off, &d, false).unwrap();
        expect[off as usize..off as usize + 5000].copy_from_slice(&d);
    }
    assert_eq!(b.status().unwrap().chunks_preserved, 3);
    ts.resume();
    // writes keep coming while it fails
    let mut i = 0u64;
    let t0 = Instant::now();
    loop {
        let st = b.status().unwrap();
        if st.state == BackupState::Failed {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{st:?}");
        let off = (i * 7919 * 4096) % ((N - 1) * CSU);
        let d = vec![(i % 200) as u8 + 20; 8192];
        e.write(off, &d, false).unwrap();
        expect[off as usize..off as usize + 8192].copy_from_slice(&d);
        i += 1;
    }
    let st = b.status().unwrap();
    let err = st.error.clone().unwrap();
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("unable to write the backup target"), "{err}");
    let aborted = ts.aborted.lock().unwrap().clone().unwrap();
    assert!(aborted.contains("No space left"), "{aborted}");
    assert!(!ts.committed.load(Ordering::SeqCst));
    // the disk keeps serving and holds every acknowledged write
    for j in 0..20u64 {
        let off = j * 3 * CSU + 7;
        e.write(off, &[0x77; 3000], false).unwrap();
        expect[off as usize..off as usize + 3000].fill(0x77);
    }
    assert!(disk.snapshot() == expect, "acknowledged writes lost");
    // and a new backup can start
    let (t2, _ts2) = MemTarget::new(N * CSU, CS, 1);
    b.start_with(params("test:"), Some(t2), None).unwrap();
    assert_eq!(wait_done(&b).state, BackupState::Complete);
}

#[test]
fn container_eio_fails_backup_not_the_write() {
    let (e, b, disk, log, _orig) = mem_engine(N as usize * CS as usize, 6);
    let (t, ts) = MemTarget::new(N * CSU, CS, 1);
    ts.pause();
    let c = RecContainer::new(8, CS, log);
    let fail = c.fail_writes.clone();
    b.start_with(params("test:"), Some(t), Some(Box::new(c)))
        .unwrap();
    e.write(B, &[1; 100], false).unwrap();
    fail.store(true, Ordering::SeqCst);
    e.write(B + 5 * CSU, &[2; 100], false).unwrap(); // needs preservation: container EIO
    e.write(B + 9 * CSU, &[3; 100], false).unwrap(); // snapshot dropped: pass-through
    ts.resume();
    let st = wait_done(&b);
    assert_eq!(st.state, BackupState::Failed);
    let err = st.error.unwrap();
    assert!(
        err.contains("unable to preserve chunk 133 in the container"),
        "{err}"
    );
    assert!(err.contains("Input/output error"), "{err}");
    assert!(ts.aborted.lock().unwrap().is_some());
    let d = disk.snapshot();
    assert_eq!(d[B as usize], 1);
    assert_eq!(d[(B + 5 * CSU) as usize], 2);
    assert_eq!(d[(B + 9 * CSU) as usize], 3);
}

#[test]
fn container_read_eio_fails_backup() {
    let (e, b, _disk, log, _orig) = mem_engine(N as usize * CS as usize, 7);
    let (t, ts) = MemTarget::new(N * CSU, CS, 1);
    ts.pause();
    let c = RecContainer::new(8, CS, log);
    let fail = c.fail_reads.clone();
    b.start_with(params("test:"), Some(t), Some(Box::new(c)))
        .unwrap();
    e.write(B + 3 * CSU, &[1; 100], false).unwrap();
    fail.store(true, Ordering::SeqCst);
    ts.resume();
    let st = wait_done(&b);
    assert_eq!(st.state, BackupState::Failed);
    assert!(
        st.error
            .as_deref()
            .unwrap()
            .contains("back from the container"),
        "{st:?}"
    );
}

#[test]
fn full_container_holds_writers_until_drained_or_dropped() {
    let (e, b, disk, log, orig) = mem_engine(N as usize * CS as usize, 8);
    let (t, ts) = MemTarget::new(N * CSU, CS, 1);
    ts.pause();
    b.start_with(
        params("test:"),
        Some(t),
        Some(Box::new(RecContainer::new(2, CS, log))),
    )
    .unwrap();
    e.write(B + 10 * CSU, &[1; 10], false).unwrap();
    e.write(B + 11 * CSU, &[2; 10], false).unwrap(); // throttled (container now full)
    let e2 = e.clone();
    let w = std::thread::spawn(move || e2.write(B + 12 * CSU, &[3; 10], false));
    wait_until("the writer waits for a slot", || {
        e.snapshot().is_some_and(|s| s.slots.waiters() == 1)
    });
    assert!(!w.is_finished(), "a full container must hold the writer");
    // reads never wait
    let mut buf = [0u8; 10];
    let r = (B + 12 * CSU) as usize;
    e.read(B + 12 * CSU, &mut buf).unwrap();
    assert_eq!(buf[..], orig[r..r + 10]);
    ts.resume(); // the drainer frees slots
    w.join().unwrap().unwrap();
    let st = wait_done(&b);
    assert_eq!(st.state, BackupState::Complete, "{st:?}");
    assert_eq!(*ts.image.lock().unwrap(), orig);
    assert_eq!(st.container_high_water, 2);
    assert!(st.throttled_writes >= 2, "{st:?}");
    assert!(st.throttle_delay_ms >= 100, "{st:?}");
    assert_eq!(disk.snapshot()[r], 3);
}

#[test]
fn cancel_releases_held_writers() {
    let (e, b, disk, log, _orig) = mem_engine(N as usize * CS as usize, 9);
    let (t, ts) = MemTarget::new(N * CSU, CS, 1);
    ts.pause();
    b.start_with(
        params("test:"),
        Some(t),
        Some(Box::new(RecContainer::new(1, CS, log))),
    )
    .unwrap();
    e.write(B + 10 * CSU, &[1; 10], false).unwrap();
    let e2 = e.clone();
    let w = std::thread::spawn(move || e2.write(B + 12 * CSU, &[3; 10], false));
    wait_until("the writer waits for a slot", || {
        e.snapshot().is_some_and(|s| s.slots.waiters() == 1)
    });
    assert!(!w.is_finished());
    b.cancel().unwrap();
    w.join().unwrap().unwrap();
    assert_eq!(disk.snapshot()[(B + 12 * CSU) as usize], 3);
    ts.resume();
    let st = wait_done(&b);
    assert_eq!(st.state, BackupState::Failed);
    assert!(st.error.unwrap().contains("canceled"));
    assert!(b.cancel().is_err(), "nothing left to cancel");
    assert!(b.prioritize(&[(0, 1)]).is_err());
}

#[test]
fn one_backup_at_a_time_and_bad_specs() {
    let (_e, b, _disk, _log, _orig) = mem_engine(8 * CS as usize, 10);
    let (t, ts) = MemTarget::new(8 * CSU, CS, 1);
    ts.pause();
    b.start_with(params("test:"), Some(t), None).unwrap();
    let (t2, _) = MemTarget::new(8 * CSU, CS, 1);
    let err = b.start_with(params("test:"), Some(t2), None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy);
    assert!(err.to_string().contains("still running"), "{err}");
    ts.resume();
    wait_done(&b);
    let mut inc = params("file:/tmp/never-written.img");
    inc.incremental = true;
    let err = b.start(inc).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(
        err.to_string().contains("--incremental needs a repository"),
        "{err}"
    );
    assert!(!std::path::Path::new("/tmp/never-written.img").exists());
    assert_eq!(b.status().unwrap().state, BackupState::Failed);
    let err = b.start(params("ftp:x")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let mut p = params("file:/nonexistent-dir/img");
    p.container = Some("ram:1K".into());
    assert!(b.start(p).is_err());
}

#[test]
fn priority_ranges_go_first() {
    let (_e, b, _disk, _log, orig) = mem_engine(256 * CS as usize, 11);
    let (t, ts) = MemTarget::new(256 * CSU, CS, 1);
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut p = params("test:");
    p.priority = vec![(200 * CSU, 3 * CSU)];
    b.start_with(p, Some(Box::new(Spy(t, order.clone()))), None)
        .unwrap();
    let st = wait_done(&b);
    assert_eq!(st.state, BackupState::Complete, "{st:?}");
    assert_eq!(*ts.image.lock().unwrap(), orig);
    let o = order.lock().unwrap();
    assert_eq!(o[0], 200 * CSU, "priority range first: {o:?}");
    // 4 MiB batches afterwards
    assert!(o.len() <= 8, "{o:?}");
}

#[test]
fn quiesce_waits_for_idle_or_fails_cleanly() {
    let (e, b, _disk, _log, _orig) = mem_engine(8 * CS as usize, 12);
    // a busy disk: writes every 5 ms
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let last = Arc::new(Mutex::new(Instant::now()));
    let (e2, stop2, count2, last2) = (e.clone(), stop.clone(), count.clone(), last.clone());
    let w = std::thread::spawn(move || {
        while !stop2.load(Ordering::SeqCst) {
            e2.write(0, &[1; 512], false).unwrap();
            *last2.lock().unwrap() = Instant::now();
            count2.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    while count.load(Ordering::SeqCst) < 3 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let (t, ts) = MemTarget::new(8 * CSU, CS, 1);
    let mut p = params("test:");
    p.quiesce_idle_ms = 300;
    p.quiesce_timeout_ms = 600;
    let t0 = Instant::now();
    let err = b.start_with(p.clone(), Some(t), None).unwrap_err();
    assert!(t0.elapsed() >= Duration::from_millis(600));
    assert_eq!(err.kind(), ErrorKind::Busy);
    assert!(err.to_string().contains("never idle for 300 ms"), "{err}");
    assert!(ts.aborted.lock().unwrap().is_some());
    assert!(!ts.began.load(Ordering::SeqCst));
    assert_eq!(b.status().unwrap().state, BackupState::Failed);
    stop.store(true, Ordering::SeqCst);
    w.join().unwrap();
    let (t, _ts) = MemTarget::new(8 * CSU, CS, 1);
    b.start_with(p, Some(t), None).unwrap();
    let quiet = last.lock().unwrap().elapsed();
    assert!(
        quiet >= Duration::from_millis(300),
        "snapshot after only {quiet:?} of quiet"
    );
    assert_eq!(wait_done(&b).state, BackupState::Complete);
}

#[test]
fn file_target_enospc_like_failure_leaves_marker() {
    // a dev: target that is too small is refused before the snapshot
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("dev");
    std::fs::write(&dev, vec![0u8; 4 * CS as usize]).unwrap();
    let (_e, b, _disk, _log, _orig) = mem_engine(8 * CS as usize, 13);
    let err = b
        .start(params(&format!("dev:{}", dev.display())))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoSpace);
    // a file target whose drain fails keeps its .incomplete marker (the rate limit
    // keeps the 512 KiB backup running for ~5 s)
    let img = dir.path().join("img");
    let mut p = params(&format!("file:{}", img.display()));
    p.rate_limit = Some(100 * 1024);
    let id = b.start(p).unwrap();
    assert!(incomplete_marker(&img).exists());
    std::thread::sleep(Duration::from_millis(100));
    b.cancel().unwrap();
    let st = wait_done(&b);
    assert_eq!(st.id, id);
    assert_eq!(st.state, BackupState::Failed);
    let m = std::fs::read_to_string(incomplete_marker(&img)).unwrap();
    assert!(m.contains("canceled"), "{m}");
}

#[test]
fn block_status_reports_holes_only_where_there_are_holes() {
    let dir = tempfile::tempdir().unwrap();
    let origin = dir.path().join("disk");
    let f = std::fs::File::create(&origin).unwrap();
    f.set_len(16 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[5u8; 65536], 4 << 20).unwrap();
    drop(f);
    let mut spec = OpenSpec::origin(&origin);
    spec.engine = blockio::IoEngine::Sync;
    let io = blockio::open(&spec).unwrap();
    if io.data_ranges(0, 1).unwrap().is_none() {
        eprintln!("SKIP: file system without SEEK_DATA");
        return;
    }
    let e = Engine::new(io, EngineConfig::default(), None).unwrap();
    let ex = e.block_status(0, 16 << 20).unwrap();
    assert_eq!(ex.iter().map(|x| x.len).sum::<u64>(), 16 << 20);
    let mut pos = 0u64;
    for x in &ex {
        let data_here = pos < (4 << 20) + 65536 && pos + x.len > 4 << 20;
        if data_here {
            assert!(!x.zero && !x.hole, "zero reported over data: {ex:?}");
        }
        pos += x.len;
    }
    assert!(ex.iter().any(|x| x.hole && x.zero), "{ex:?}");
    let ex = e.block_status(4 << 20, 4096).unwrap();
    assert_eq!(ex.len(), 1);
    assert!(!ex[0].zero);
}

#[test]
fn the_instant_waits_for_writes_in_flight() {
    let (e, b, disk, _log, orig) = mem_engine(N as usize * CS as usize, 14);
    disk.set_block_writes(true);
    let e1 = e.clone();
    // spans two chunks; stuck inside the origin write
    let w = std::thread::spawn(move || e1.write(B + CSU - 100, &[0xAB; 200], false));
    while disk.writes_waiting.load(Ordering::SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let (t, ts) = MemTarget::new(N * CSU, CS, 1);
    let b2 = b.clone();
    let start = std::thread::spawn(move || b2.start_with(params("test:"), Some(t), None));
    // (not `e.snapshot()` here: a reader would queue behind the waiting instant)
    wait_until("the instant waits for the gate", || {
        e.instant_waiting() == 1
    });
    assert!(
        !start.is_finished(),
        "the snapshot must wait for the write in flight"
    );
    disk.set_block_writes(false);
    w.join().unwrap().unwrap();
    start.join().unwrap().unwrap();
    assert_eq!(wait_done(&b).state, BackupState::Complete);
    // the write happened before the instant: the image has all of it
    let mut expect = orig;
    expect[(B + CSU - 100) as usize..(B + CSU + 100) as usize].fill(0xAB);
    assert!(*ts.image.lock().unwrap() == expect);
}

#[test]
fn container_above_low_watermark_is_drained_first() {
    let (e, b, _disk, log, orig) = mem_engine(N as usize * CS as usize, 15);
    let (t, ts) = MemTarget::new(N * CSU, CS, 1);
    let order = Arc::new(Mutex::new(Vec::new()));
    ts.pause(); // blocks in the first batch (chunks 0..63)
    b.start_with(
        params("test:"),
        Some(Box::new(Spy(t, order.clone()))),
        Some(Box::new(RecContainer::new(8, CS, log))),
    )
    .unwrap();
    // The drainer sits in its first batch (0..63) before the writes come.
    ts.wait_blocked();
    // 3 of 8 slots: above the 25 % low watermark
    for c in [200u64, 201, 202] {
        e.write(c * CSU + 10, &[1; 10], false).unwrap();
    }
    ts.resume();
    let st = wait_done(&b);
    assert_eq!(st.state, BackupState::Complete, "{st:?}");
    assert_eq!(*ts.image.lock().unwrap(), orig);
    let o = order.lock().unwrap();
    // the first batch (0..63) was under way before the writes; the preserved run
    // 200..203 goes right after it, before the walk reaches 64
    let p200 = o
        .iter()
        .position(|&x| x == 200 * CSU)
        .expect("preserved run");
    let p64 = o.iter().position(|&x| x == 64 * CSU).expect("walk");
    assert!(p200 < p64, "preserved chunks first: {o:?}");
    assert_eq!(p200, 1, "{o:?}");
    assert!(!o.contains(&(201 * CSU)), "one batch for the run: {o:?}");
}

#[test]
fn sparse_origin_holes_are_zeros_in_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let origin = dir.path().join("disk");
    let size: u64 = 64 << 20;
    let f = std::fs::File::create(&origin).unwrap();
    f.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    let a = pattern(3 * 4096, 21);
    f.write_all_at(&a, 5 * CSU + 4096).unwrap(); // data inside a chunk, holes around
    f.write_all_at(&a, size - a.len() as u64).unwrap(); // the disk's end
    drop(f);
    let before = std::fs::read(&origin).unwrap();
    let mut spec = OpenSpec::origin(&origin);
    spec.engine = blockio::IoEngine::Sync;
    let e = Engine::new(blockio::open(&spec).unwrap(), EngineConfig::default(), None).unwrap();
    let b = Backups::new(e.clone());
    let img = dir.path().join("img");
    let mut p = params(&format!("file:{}", img.display()));
    p.rate_limit = Some(32 << 20);
    b.start(p).unwrap();
    // writes into holes and over data during the backup
    for i in 0..16u64 {
        e.write(i * 4 * CSU + 777, &[0x5A; 9000], false).unwrap();
    }
    let st = wait_done(&b);
    assert_eq!(st.state, BackupState::Complete, "{st:?}");
    assert!(
        std::fs::read(&img).unwrap() == before,
        "image is not the disk at the instant"
    );
    assert_eq!(
        st.bytes_stored,
        2 * 3 * 4096,
        "only the data of the two data chunks is stored (the kernel copy skips the \
         holes around it): {st:?}"
    );
}
