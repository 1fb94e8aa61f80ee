//! Snapshot correctness under concurrent writers, checked with stamped sectors.
//!
//! Several writer threads write random runs of 4 KiB sectors (across chunk edges, at
//! the disk's last sector; the disk size is not a multiple of the chunk size) and
//! write-zeroes, while a rate-limited drainer copies the disk through a 4-slot file
//! container to a file image. Each sector carries (offset, sequence, writer,
//! checksum), so a wrong or torn sector in the image or on the disk is found and
//! explained. The reference is taken at the instant: writers hold a test-side
//! RwLock shared around each request and the main thread takes it exclusively around
//! `Backups::start`, copying the per-sector model first.

use cowsnap_core::backup::{BackupParams, BackupState, Backups};
use cowsnap_core::blockio::{self, OpenSpec};
use cowsnap_core::engine::{Engine, EngineConfig};
use cowsnap_core::export::{Export, ZeroFlags};
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

const SECTOR: usize = 4096;
const ZERO_SEQ: u64 = u64::MAX;

fn every(n: u64, k: u64) -> bool {
    n.rem_euclid(k) == 0
}

fn checksum(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for w in b.chunks_exact(8) {
        h ^= u64::from_le_bytes(w.try_into().unwrap());
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn stamp(buf: &mut [u8], off: u64, seq: u64, writer: u64) {
    buf[0..8].copy_from_slice(&off.to_le_bytes());
    buf[8..16].copy_from_slice(&seq.to_le_bytes());
    buf[16..24].copy_from_slice(&writer.to_le_bytes());
    let fill = (seq % 251) as u8;
    buf[24..SECTOR - 8].fill(fill);
    let c = checksum(&buf[..SECTOR - 8]);
    buf[SECTOR - 8..].copy_from_slice(&c.to_le_bytes());
}

/// What a sector holds: Ok(seq) (ZERO_SEQ for all zeros) or a description of damage.
fn read_stamp(buf: &[u8], off: u64) -> Result<u64, String> {
    if buf.iter().all(|&b| b == 0) {
        return Ok(ZERO_SEQ);
    }
    let c = checksum(&buf[..SECTOR - 8]);
    let want = u64::from_le_bytes(buf[SECTOR - 8..].try_into().unwrap());
    let o = u64::from_le_bytes(buf[0..8].try_into().unwrap());
    let seq = u64::from_le_bytes(buf[8..16].try_into().unwrap());
    if c != want {
        return Err(format!(
            "sector at {off}: torn (checksum mismatch; header says offset {o} seq {seq})"
        ));
    }
    if o != off {
        return Err(format!(
            "sector at {off}: holds the sector of offset {o} (seq {seq})"
        ));
    }
    Ok(seq)
}

/// Serialises overlapping test writes so the expected final content is defined;
/// non-overlapping writes (also inside one chunk) run concurrently.
struct RangeLock {
    held: Mutex<Vec<(u64, u64)>>,
    cv: Condvar,
}

impl RangeLock {
    fn lock(&self, a: u64, b: u64) {
        let mut h = self.held.lock().unwrap();
        while h.iter().any(|&(x, y)| x < b && a < y) {
            h = self.cv.wait(h).unwrap();
        }
        h.push((a, b));
    }
    fn unlock(&self, a: u64, b: u64) {
        let mut h = self.held.lock().unwrap();
        let i = h.iter().position(|&r| r == (a, b)).unwrap();
        h.swap_remove(i);
        drop(h);
        self.cv.notify_all();
    }
}

/// Both I/O engines (io_uring only when the kernel allows it).
fn engines() -> Vec<blockio::IoEngine> {
    let mut v = vec![blockio::IoEngine::Sync];
    if blockio::uring::probe() {
        v.push(blockio::IoEngine::Uring);
    } else {
        eprintln!("SKIP (io_uring part): io_uring is not available here");
    }
    v
}

#[test]
fn image_is_the_disk_at_the_instant_under_concurrent_writers() {
    for engine in engines() {
        image_at_the_instant(engine);
    }
}

fn image_at_the_instant(io_engine: blockio::IoEngine) {
    let dir = tempfile::tempdir().unwrap();
    let chunk: u64 = 65536;
    let size: u64 = 24 * (1 << 20) + 5 * SECTOR as u64; // not a multiple of the chunk
    let nsec = (size / SECTOR as u64) as usize;
    let origin = dir.path().join("disk");
    {
        let mut all = vec![0u8; size as usize];
        for (i, s) in all.chunks_exact_mut(SECTOR).enumerate() {
            stamp(s, (i * SECTOR) as u64, 0, 99);
        }
        std::fs::write(&origin, &all).unwrap();
    }
    let mut spec = OpenSpec::origin(&origin);
    spec.engine = io_engine;
    let io = blockio::open(&spec).unwrap();
    let engine = Engine::new(
        io,
        EngineConfig {
            name: "stress".into(),
            ..Default::default()
        },
        None,
    )
    .unwrap();
    let backups = Backups::new(engine.clone());

    let model: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(vec![0; nsec]));
    let instant = Arc::new(RwLock::new(()));
    let ranges = Arc::new(RangeLock {
        held: Mutex::new(Vec::new()),
        cv: Condvar::new(),
    });
    let seq = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let writers = 4;
    let mut handles = Vec::new();
    for w in 0..writers {
        let (e, model, instant, ranges, seq, stop, acked) = (
            engine.clone(),
            model.clone(),
            instant.clone(),
            ranges.clone(),
            seq.clone(),
            stop.clone(),
            acked.clone(),
        );
        handles.push(std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(1000 + w);
            let mut buf = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let len = rng.gen_range(1..=40usize);
                let first = if every(n, 50) {
                    nsec - len // ends at the disk's last byte
                } else if every(n, 7) {
                    // straddle a chunk edge
                    let edge =
                        rng.gen_range(1..(size / chunk)) as usize * (chunk as usize / SECTOR);
                    edge.saturating_sub(rng.gen_range(1..=len.min(edge)))
                } else {
                    rng.gen_range(0..nsec - len)
                };
                let (a, b) = ((first * SECTOR) as u64, ((first + len) * SECTOR) as u64);
                let _g = instant.read().unwrap();
                ranges.lock(a, b);
                let s = seq.fetch_add(1, Ordering::SeqCst);
                if every(n, 23) {
                    e.zero(a, b - a, ZeroFlags::default()).unwrap();
                    let mut m = model.lock().unwrap();
                    m[first..first + len].fill(ZERO_SEQ);
                } else {
                    buf.resize(len * SECTOR, 0);
                    for (i, sbuf) in buf.chunks_exact_mut(SECTOR).enumerate() {
                        stamp(sbuf, a + (i * SECTOR) as u64, s, w);
                    }
                    e.write(a, &buf, every(n, 31)).unwrap();
                    let mut m = model.lock().unwrap();
                    m[first..first + len].fill(s);
                }
                ranges.unlock(a, b);
                acked.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // let the writers get going, then take the snapshot at a known instant
    while acked.load(Ordering::Relaxed) < 200 {
        std::thread::sleep(Duration::from_millis(2));
    }
    let img = dir.path().join("img");
    let cont = dir.path().join("c.cow");
    let at_instant;
    {
        let _all = instant.write().unwrap();
        at_instant = model.lock().unwrap().clone();
        backups
            .start(BackupParams {
                to: format!("file:{}", img.display()),
                container: Some(format!("file:{}:256K", cont.display())), // 4 slots
                rate_limit: Some(12 << 20),
                priority: vec![(size - 3 * chunk, 3 * chunk)],
                ..Default::default()
            })
            .unwrap();
    }
    let acked_at_start = acked.load(Ordering::Relaxed);
    assert!(cont.exists());
    let t0 = Instant::now();
    let st = loop {
        let st = backups.status().unwrap();
        if st.state != BackupState::Running {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "stuck: {st:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    // a little more traffic after the backup, then stop
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    eprintln!("status: {st:#?}");
    eprintln!(
        "writes acknowledged: {} ({} during the backup)",
        acked.load(Ordering::Relaxed),
        acked.load(Ordering::Relaxed) - acked_at_start
    );
    assert_eq!(st.state, BackupState::Complete, "{st:?}");
    assert!(!cont.exists(), "file container removed after the backup");
    assert!(!img.with_extension("incomplete").exists());

    // the image is the disk at the instant
    let image = std::fs::read(&img).unwrap();
    assert_eq!(image.len() as u64, size);
    let mut bad = Vec::new();
    for (i, s) in image.chunks_exact(SECTOR).enumerate() {
        match read_stamp(s, (i * SECTOR) as u64) {
            Ok(q) if q == at_instant[i] => {}
            Ok(q) => bad.push(format!(
                "image sector {i}: seq {q}, expected {} (chunk {})",
                at_instant[i],
                i * SECTOR / chunk as usize
            )),
            Err(e) => bad.push(format!("image {e}")),
        }
    }
    assert!(
        bad.is_empty(),
        "{} bad image sectors: {:?}",
        bad.len(),
        &bad[..bad.len().min(10)]
    );

    // the live disk holds every acknowledged write
    let disk = std::fs::read(&origin).unwrap();
    let fin = model.lock().unwrap().clone();
    for (i, s) in disk.chunks_exact(SECTOR).enumerate() {
        match read_stamp(s, (i * SECTOR) as u64) {
            Ok(q) if q == fin[i] => {}
            Ok(q) => bad.push(format!("disk sector {i}: seq {q}, expected {}", fin[i])),
            Err(e) => bad.push(format!("disk {e}")),
        }
    }
    assert!(
        bad.is_empty(),
        "{} bad disk sectors: {:?}",
        bad.len(),
        &bad[..bad.len().min(10)]
    );
    assert!(
        fin.iter().zip(&at_instant).any(|(a, b)| a != b),
        "nothing changed"
    );

    // the backup really ran under pressure
    assert_eq!(st.container_slots, 4);
    assert!(st.container_high_water <= 4);
    assert!(st.chunks_preserved > 0, "{st:?}");
    assert!(st.holds > 0, "{st:?}");
    assert!(
        st.throttled_writes > 0 && st.throttle_delay_ms > 0,
        "{st:?}"
    );
    assert_eq!(st.chunks_copied, st.chunks_in_scope);
    assert_eq!(st.chunks_in_scope, size.div_ceil(chunk));
}

/// Without any test-side barrier: every writer writes its own region, one request at
/// a time, many of them spanning several chunks. The engine's instant gate must put
/// each request wholly before or wholly after the snapshot, so each writer's region in
/// the image equals its state after some prefix of its writes.
#[test]
fn the_instant_never_splits_a_request() {
    for engine in engines() {
        instant_never_splits(engine);
    }
}

fn instant_never_splits(io_engine: blockio::IoEngine) {
    let dir = tempfile::tempdir().unwrap();
    let region_sec: usize = 512; // 2 MiB per writer
    let writers = 4usize;
    let nsec = region_sec * writers + 3;
    let size = (nsec * SECTOR) as u64;
    let origin = dir.path().join("disk");
    {
        let mut all = vec![0u8; size as usize];
        for (i, s) in all.chunks_exact_mut(SECTOR).enumerate() {
            stamp(s, (i * SECTOR) as u64, 0, 99);
        }
        std::fs::write(&origin, &all).unwrap();
    }
    let mut spec = OpenSpec::origin(&origin);
    spec.engine = io_engine;
    let engine = Engine::new(blockio::open(&spec).unwrap(), EngineConfig::default(), None).unwrap();
    let backups = Backups::new(engine.clone());
    let seq = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for w in 0..writers {
        let (e, seq, stop, acked) = (engine.clone(), seq.clone(), stop.clone(), acked.clone());
        handles.push(std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(77 + w as u64);
            let base = w * region_sec;
            let mut history: Vec<(usize, usize, u64)> = Vec::new();
            let mut buf = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let len = rng.gen_range(8..=64usize); // 32 KiB .. 256 KiB: 1..5 chunks
                let first = base + rng.gen_range(0..region_sec - len);
                let s = seq.fetch_add(1, Ordering::SeqCst);
                buf.resize(len * SECTOR, 0);
                for (i, sb) in buf.chunks_exact_mut(SECTOR).enumerate() {
                    stamp(sb, ((first + i) * SECTOR) as u64, s, w as u64);
                }
                e.write((first * SECTOR) as u64, &buf, false).unwrap();
                history.push((first, len, s));
                acked.fetch_add(1, Ordering::Relaxed);
            }
            history
        }));
    }
    while acked.load(Ordering::Relaxed) < 100 {
        std::thread::sleep(Duration::from_millis(2));
    }
    let img = dir.path().join("img");
    backups
        .start(BackupParams {
            to: format!("file:{}", img.display()),
            container: Some("ram:512K".into()),
            ..Default::default()
        })
        .unwrap();
    let st = backups.wait(Duration::from_secs(60)).unwrap();
    stop.store(true, Ordering::Relaxed);
    let histories: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(st.state, BackupState::Complete, "{st:?}");
    let image = std::fs::read(&img).unwrap();
    let seqs: Vec<u64> = image
        .chunks_exact(SECTOR)
        .enumerate()
        .map(|(i, s)| read_stamp(s, (i * SECTOR) as u64).unwrap())
        .collect();
    for (w, hist) in histories.iter().enumerate() {
        let base = w * region_sec;
        let region = &seqs[base..base + region_sec];
        let latest = region.iter().copied().filter(|&q| q != 0).max();
        // replay the prefix of this writer's history up to `latest`
        let mut model = vec![0u64; region_sec];
        if let Some(latest) = latest {
            let k = hist
                .iter()
                .position(|&(_, _, s)| s == latest)
                .expect("image holds a sequence this writer never wrote");
            for &(first, len, s) in &hist[..=k] {
                model[first - base..first - base + len].fill(s);
            }
        }
        assert_eq!(
            region,
            &model[..],
            "writer {w}: image is not a prefix of its writes"
        );
    }
    // the tail sectors nobody writes
    assert!(seqs[writers * region_sec..].iter().all(|&q| q == 0));
}
