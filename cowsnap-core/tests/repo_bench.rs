//! Repository figures on a synthetic disk (not run by default):
//! `cargo test --release -p cowsnap-core --test repo_bench -- --ignored --nocapture`
//! Env COWSNAP_BENCH_MIB sets the disk size (default 256), COWSNAP_BENCH_DIR the
//! directory (default: a temporary directory under /var/tmp).

mod repo_common;

use cowsnap_core::changelog::ChangeLog;
use cowsnap_core::repo;
use repo_common::*;
use std::path::Path;
use std::time::Instant;

fn du(p: &Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        if m.is_dir() {
            n += du(&e.path());
        } else {
            use std::os::unix::fs::MetadataExt;
            n += m.blocks() * 512;
        }
    }
    n
}

#[test]
#[ignore = "benchmark"]
fn bench_full_vs_incremental_and_restore() {
    let mib: usize = std::env::var("COWSNAP_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let base = std::env::var("COWSNAP_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let d = tempfile::tempdir_in(base).unwrap();
    let repo = d.path().join("repo");
    let size = mib << 20;
    let mut disk = synth_disk(size, 1);
    let cl = ChangeLog::open_in(&d.path().join("state"), size as u64, TCS).unwrap();

    let t = Instant::now();
    let full = backup_tracked(&repo, "bench", &disk, &cl);
    let full_t = t.elapsed();
    let mut times = vec![full_t];
    let mut s = 9u64;
    // (a) 1% of the repository chunks changed (a 4 KiB write in each)
    let rchunks = size >> 20;
    for k in 0..(rchunks / 100).max(1) {
        let c = (k * 97 + 13) % rchunks;
        scribble(&mut disk, Some(&cl), c << 20, 4096, 30 + k as u64);
    }
    let t = Instant::now();
    backup_tracked(&repo, "bench", &disk, &cl);
    times.push(t.elapsed());
    // (b) 1% of the 64 KiB tracking chunks changed, scattered
    let nchunks = size / TCS as usize;
    for _ in 0..nchunks / 100 {
        let c = (splitmix(&mut s) % nchunks as u64) as usize;
        scribble(&mut disk, Some(&cl), c * TCS as usize, 4096, 50);
    }
    let t = Instant::now();
    backup_tracked(&repo, "bench", &disk, &cl);
    times.push(t.elapsed());
    let gens = repo::list(&repo).unwrap();
    for (g, t) in gens.iter().zip(&times) {
        println!(
            "{:<12} {:>8.3} s  read {:>10} B  stored new {:>10} B  chunks new {:>4} reused {:>4} zero {:>4} from parent {:>4}",
            format!("{:?}", g.kind),
            t.as_secs_f64(),
            g.stats.bytes_read,
            g.stats.bytes_stored_new,
            g.stats.chunks_new,
            g.stats.chunks_reused,
            g.stats.chunks_zero,
            g.stats.chunks_from_parent
        );
    }
    println!(
        "(a) 1% of repo chunks changed, incremental/full: time {:.2}%, bytes read {:.2}%, bytes stored {:.2}%",
        100.0 * times[1].as_secs_f64() / full_t.as_secs_f64(),
        100.0 * gens[1].stats.bytes_read as f64 / gens[0].stats.bytes_read as f64,
        100.0 * gens[1].stats.bytes_stored_new as f64 / gens[0].stats.bytes_stored_new as f64
    );
    println!(
        "(b) 1% of 64 KiB tracking chunks changed, scattered: time {:.2}%, bytes read {:.2}%, bytes stored {:.2}%",
        100.0 * times[2].as_secs_f64() / full_t.as_secs_f64(),
        100.0 * gens[2].stats.bytes_read as f64 / gens[0].stats.bytes_read as f64,
        100.0 * gens[2].stats.bytes_stored_new as f64 / gens[0].stats.bytes_stored_new as f64
    );
    println!(
        "repository for 3 generations: {} B on disk; 3 raw images: {} B ({:.1}%)",
        du(&repo),
        3 * size,
        100.0 * du(&repo) as f64 / (3 * size) as f64
    );
    let _ = full;

    // restore throughput vs cp of a raw image
    let raw = d.path().join("raw.img");
    std::fs::write(&raw, &disk).unwrap();
    let f = std::fs::File::open(&raw).unwrap();
    f.sync_all().unwrap();
    let dest = d.path().join("restored.img");
    let t = Instant::now();
    cowsnap_core::restore::restore_to(&repo, Some(&gens[2].id), &dest, &|_, _| {}).unwrap();
    let rt = t.elapsed();
    assert_eq!(hash(&std::fs::read(&dest).unwrap()), hash(&disk));
    let cp_dest = d.path().join("cp.img");
    let t = Instant::now();
    let st = std::process::Command::new("cp")
        .arg(&raw)
        .arg(&cp_dest)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::File::open(&cp_dest).unwrap().sync_all().unwrap();
    let ct = t.elapsed();
    println!(
        "restore {:.3} s ({:.0} MiB/s) vs cp+fsync {:.3} s ({:.0} MiB/s)",
        rt.as_secs_f64(),
        mib as f64 / rt.as_secs_f64(),
        ct.as_secs_f64(),
        mib as f64 / ct.as_secs_f64()
    );
}
