//! First-write cost of change tracking (not run by default):
//! `cargo test --release -p cowsnap-core --test repo_tracking_bench -- --ignored --nocapture`

use cowsnap_core::changelog::ChangeLog;
use std::sync::Arc;
use std::time::Instant;

#[test]
#[ignore = "benchmark"]
fn bench_first_marks() {
    let d = tempfile::tempdir_in("/var/tmp").unwrap();
    let cs = 64 * 1024u64;
    let size = 64u64 << 30; // 1 Mi chunks
    for threads in [1u64, 4, 16] {
        let cl = Arc::new(
            ChangeLog::open(&d.path().join(format!("c{threads}")), size, cs as u32).unwrap(),
        );
        let per = 2000 / threads;
        let t = Instant::now();
        let hs: Vec<_> = (0..threads)
            .map(|k| {
                let cl = cl.clone();
                std::thread::spawn(move || {
                    for i in 0..per {
                        // distinct chunks, spread over the bitmap
                        let c = (i * threads + k) * 7919 % (size / cs);
                        cl.mark(c * cs, 4096).unwrap();
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        let first = t.elapsed();
        let t = Instant::now();
        for i in 0..per * threads {
            let c = i * 7919 % (size / cs);
            cl.mark(c * cs, 4096).unwrap();
        }
        let again = t.elapsed();
        println!(
            "{threads:>2} threads: {} first marks in {:.3} s ({:.0}/s); repeat marks {:.0} ns each",
            per * threads,
            first.as_secs_f64(),
            (per * threads) as f64 / first.as_secs_f64(),
            again.as_nanos() as f64 / (per * threads) as f64
        );
    }
}
