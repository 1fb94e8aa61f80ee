//! Indicative in-process figures (run with `--release -- --ignored --nocapture`):
//! backup of an idle disk vs a plain read/write/fsync copy of the same file, and 4 KiB
//! random-write IOPS during a backup vs pass-through. Files live in the page cache, so
//! these are CPU/locking costs, not disk speed.

use cowsnap_core::backup::{BackupParams, BackupState, Backups};
use cowsnap_core::blockio::{self, OpenSpec};
use cowsnap_core::engine::{Engine, EngineConfig};
use cowsnap_core::export::Export;
use rand::{Rng, SeedableRng};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIZE: u64 = 512 << 20;

fn make_disk(path: &std::path::Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut buf = vec![0u8; 4 << 20];
    for _ in 0..SIZE / buf.len() as u64 {
        rng.fill(&mut buf[..]);
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

fn engine(path: &std::path::Path) -> Arc<Engine> {
    let mut spec = OpenSpec::origin(path);
    spec.engine = blockio::IoEngine::Sync;
    Engine::new(blockio::open(&spec).unwrap(), EngineConfig::default(), None).unwrap()
}

fn randwrite(e: &Arc<Engine>, secs: f64, threads: u64, until: Option<&AtomicBool>) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let n = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let (e, stop, n) = (e.clone(), stop.clone(), n.clone());
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                let buf = vec![t as u8 + 1; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let off = rng.gen_range(0..SIZE / 4096) * 4096;
                    e.write(off, &buf, false).unwrap();
                    n.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let done = until.is_some_and(|u| u.load(Ordering::Relaxed));
        if t0.elapsed().as_secs_f64() >= secs || done {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        h.join().unwrap();
    }
    n.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64()
}

#[test]
#[ignore]
fn throughput_figures() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    make_disk(&disk);

    // plain copy: 4 MiB read/write + fsync
    let t0 = Instant::now();
    {
        let mut src = std::fs::File::open(&disk).unwrap();
        let mut dst = std::fs::File::create(dir.path().join("copy")).unwrap();
        let mut buf = vec![0u8; 4 << 20];
        loop {
            let n = src.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            dst.write_all(&buf[..n]).unwrap();
        }
        dst.sync_all().unwrap();
    }
    let copy_t = t0.elapsed();
    std::fs::remove_file(dir.path().join("copy")).unwrap();

    let e = engine(&disk);
    let b = Arc::new(Backups::new(e.clone()));
    let img = dir.path().join("img");
    let t0 = Instant::now();
    b.start(BackupParams {
        to: format!("file:{}", img.display()),
        ..Default::default()
    })
    .unwrap();
    let st = b.wait(Duration::from_secs(300)).unwrap();
    let backup_t = t0.elapsed();
    assert_eq!(st.state, BackupState::Complete);
    std::fs::remove_file(&img).unwrap();
    println!(
        "idle backup of {} MiB: {:.2} s ({:.0} MiB/s); read/write/fsync copy: {:.2} s; ratio copy/backup {:.2}",
        SIZE >> 20,
        backup_t.as_secs_f64(),
        (SIZE >> 20) as f64 / backup_t.as_secs_f64(),
        copy_t.as_secs_f64(),
        copy_t.as_secs_f64() / backup_t.as_secs_f64()
    );

    let pass = randwrite(&e, 3.0, 2, None);
    let done = Arc::new(AtomicBool::new(false));
    b.start(BackupParams {
        to: format!("file:{}", img.display()),
        container: Some("ram:8M".into()),
        rate_limit: Some(128 << 20),
        ..Default::default()
    })
    .unwrap();
    let b2 = b.clone();
    let d2 = done.clone();
    let watcher = std::thread::spawn(move || {
        let st = b2.wait(Duration::from_secs(300)).unwrap();
        d2.store(true, Ordering::Relaxed);
        st
    });
    let during = randwrite(&e, 3.0, 2, Some(&done));
    let st = watcher.join().unwrap();
    assert_eq!(st.state, BackupState::Complete, "{st:?}");
    println!(
        "4k randwrite, 2 threads: pass-through {pass:.0} IOPS, during backup {during:.0} IOPS, ratio {:.2}",
        during / pass
    );
    println!("backup under load: {st:?}");
}
