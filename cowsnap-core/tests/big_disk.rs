//! Starting a snapshot of a 16 TiB sparse disk costs no scan of the disk and no
//! full-size bitmaps (the chunk map's planes stay unallocated while uniform). Prints the figures for the benchmarks.

use cowsnap_core::backup::{BackupParams, BackupState, Backups};
use cowsnap_core::blockio::{self, OpenSpec};
use cowsnap_core::changelog::Cut;
use cowsnap_core::chunk_map::Geometry;
use cowsnap_core::engine::{Engine, EngineConfig};
use cowsnap_core::error::Result;
use cowsnap_core::export::Export;
use cowsnap_core::target::raw::incomplete_marker;
use cowsnap_core::target::{self, Scope, SnapshotInfo, Target, TargetSummary};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The real target, whose first `write` waits until the test opens the gate: the
/// drainer stays inside its first batch, so every chunk past it stays pending.
struct Held {
    inner: Box<dyn Target>,
    open: Arc<(Mutex<bool>, Condvar)>,
}

impl Target for Held {
    fn granule_chunks(&self) -> u32 {
        self.inner.granule_chunks()
    }
    fn uses_change_log(&self) -> bool {
        self.inner.uses_change_log()
    }
    fn prepare(&mut self, relative_to: Option<&str>) -> Scope {
        self.inner.prepare(relative_to)
    }
    fn scope(&mut self, cut: Option<&Cut>) -> Result<Scope> {
        self.inner.scope(cut)
    }
    fn begin(&mut self, info: &SnapshotInfo) -> Result<()> {
        self.inner.begin(info)
    }
    fn write(&mut self, off: u64, data: &[u8]) -> Result<()> {
        let (m, cv) = &*self.open;
        let mut g = m.lock().unwrap();
        while !*g {
            g = cv.wait(g).unwrap();
        }
        drop(g);
        self.inner.write(off, data)
    }
    fn write_zeroes(&mut self, off: u64, len: u64) -> Result<()> {
        self.inner.write_zeroes(off, len)
    }
    fn commit(self: Box<Self>) -> Result<TargetSummary> {
        self.inner.commit()
    }
    fn abort(self: Box<Self>, why: &str) {
        self.inner.abort(why)
    }
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The chunk in the middle of a disk of `size` the test writes to.
fn mid_chunk(size: u64) -> u64 {
    (size / 2) & !65535
}

/// Start (and cancel) a backup of a sparse disk of `size`; returns (start time,
/// bitmap memory in bytes as the status reports it, rss growth KiB).
fn start_on(dir: &Path, size: u64) -> (Duration, u64, u64) {
    let origin = dir.join(format!("disk-{size}"));
    let f = std::fs::File::create(&origin).unwrap();
    f.set_len(size).unwrap();
    // Data in the chunks the test writes, and in the first one (where the held
    // drainer waits): the holes around them are learned as zeros by the drainer at
    // any moment, and a write to a known-zero chunk passes through unpreserved.
    use std::os::unix::fs::FileExt;
    for at in [0, mid_chunk(size), size - 65536] {
        f.write_all_at(&[1; 65536], at).unwrap();
    }
    drop(f);
    let mut spec = OpenSpec::origin(&origin);
    spec.engine = blockio::IoEngine::Sync;
    let e = Engine::new(blockio::open(&spec).unwrap(), EngineConfig::default(), None).unwrap();
    let b = Backups::new(e.clone());
    let img = dir.join(format!("img-{size}"));
    let rss0 = rss_kib();
    let to = format!("file:{}", img.display());
    let open = Arc::new((Mutex::new(false), Condvar::new()));
    let t0 = Instant::now();
    let geo = Geometry::new(size, EngineConfig::default().chunk_size).unwrap();
    let held = Held {
        inner: target::open(&to, &geo, "", false, false, None).unwrap(),
        open: open.clone(),
    };
    b.start_with(
        BackupParams {
            to,
            // the bare start: learning holes would make these writes pass through
            all_blocks: true,
            ..Default::default()
        },
        Some(Box::new(held)),
        None,
    )
    .unwrap();
    let took = t0.elapsed();
    let rss = rss_kib().saturating_sub(rss0);
    // the disk works during the snapshot, also at its very end
    e.write(size - 1, &[7], false).unwrap();
    e.write(mid_chunk(size), &[8; 4096], false).unwrap();
    let st = b.status().unwrap();
    assert_eq!(st.state, BackupState::Running);
    assert_eq!(st.chunks_preserved, 2, "{st:?}");
    let bitmap = st.bitmap_bytes;
    b.cancel().unwrap();
    *open.0.lock().unwrap() = true;
    open.1.notify_all();
    let st = b.wait(Duration::from_secs(10)).unwrap();
    assert_eq!(st.state, BackupState::Failed);
    assert!(incomplete_marker(&img).exists());
    let mut byte = [0u8; 1];
    e.read(size - 1, &mut byte).unwrap();
    assert_eq!(byte[0], 7);
    std::fs::remove_file(&img).unwrap();
    std::fs::remove_file(&origin).unwrap();
    (took, bitmap, rss)
}

#[test]
fn sixteen_tib_sparse_disk_starts_quickly() {
    let dir = tempfile::tempdir().unwrap();
    // ext4 caps files at 16 TiB - 4 KiB; use the largest size the file system allows
    let mut size: u64 = 16 << 40;
    {
        let probe = dir.path().join("probe");
        let f = std::fs::File::create(&probe).unwrap();
        if f.set_len(size).is_err() {
            size -= 4096;
            if f.set_len(size).is_err() {
                eprintln!("SKIP: the file system cannot hold a 16 TiB sparse file");
                return;
            }
        }
        drop(f);
        std::fs::remove_file(&probe).unwrap();
    }
    let (small_t, small_bits, _) = start_on(dir.path(), 1 << 30);
    let (big_t, big_bits, big_rss) = start_on(dir.path(), size);
    let full_planes = 3 * size.div_ceil(65536).div_ceil(64) * 8;
    // two written chunks make a few pages mixed; the rest are headers only
    assert!(
        big_bits < full_planes / 64 && big_bits < 4 << 20,
        "bit planes of a 16 TiB snapshot hold {big_bits} bytes (full size {full_planes})"
    );
    assert!(small_bits <= 3 * (16384 / 8) + 4096, "{small_bits}");
    eprintln!(
        "1 GiB: snapshot start {small_t:?}, bitmaps {small_bits} bytes; \
         {size} bytes: snapshot start {big_t:?}, bitmaps {big_bits} bytes ({} MiB), \
         RSS growth {} MiB",
        big_bits >> 20,
        big_rss >> 10
    );
    assert!(
        big_t < Duration::from_secs(3),
        "starting a snapshot of a 16 TiB sparse disk took {big_t:?}"
    );
}

/// A full backup of a 16 TiB sparse disk holding a few MiB completes, reading only
/// the data: the holes reach the target as zero ranges (a sparse image). Its time is
/// reported for the benchmarks, not asserted.
#[test]
fn sixteen_tib_sparse_disk_full_backup_reads_only_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut size: u64 = 16 << 40;
    let origin = dir.path().join("disk");
    let f = std::fs::File::create(&origin).unwrap();
    if f.set_len(size).is_err() {
        size -= 65536;
        if f.set_len(size).is_err() {
            eprintln!("SKIP: the file system cannot hold a 16 TiB sparse file");
            return;
        }
    }
    drop(f);
    let mut spec = OpenSpec::origin(&origin);
    spec.engine = blockio::IoEngine::Sync;
    let e = Engine::new(blockio::open(&spec).unwrap(), EngineConfig::default(), None).unwrap();
    // data at the start, in the middle (not chunk aligned) and at the very end
    let spots = [0u64, (size / 2) + 12345, size - 3 * 65536];
    for (i, &at) in spots.iter().enumerate() {
        e.write(at, &vec![i as u8 + 1; 3 * 65536], false).unwrap();
    }
    let b = Backups::new(e.clone());
    let img = dir.path().join("img");
    let t0 = Instant::now();
    b.start(BackupParams {
        to: format!("file:{}", img.display()),
        ..Default::default()
    })
    .unwrap();
    let st = b.wait(Duration::from_secs(600)).unwrap();
    let took = t0.elapsed();
    assert_eq!(st.state, BackupState::Complete, "{st:?}");
    assert_eq!(st.bytes_in_scope, size);
    // whole chunks holding data: 3 + 4 (unaligned) + 3
    assert_eq!(st.bytes_copied, 10 * 65536, "{st:?}");
    assert_eq!(st.bytes_excluded_zero, size - 10 * 65536);
    let img_f = std::fs::File::open(&img).unwrap();
    assert_eq!(img_f.metadata().unwrap().len(), size);
    use std::os::unix::fs::FileExt;
    for (i, &at) in spots.iter().enumerate() {
        let mut got = vec![0u8; 3 * 65536];
        img_f.read_exact_at(&mut got, at).unwrap();
        assert!(got.iter().all(|&x| x == i as u8 + 1), "data at {at}");
    }
    // around the data: zeros
    let mut z = [1u8; 4096];
    for at in [
        3 * 65536,
        spots[1] - 4096,
        spots[1] + 3 * 65536,
        size - 4 * 65536,
    ] {
        img_f.read_exact_at(&mut z, at).unwrap();
        assert!(z.iter().all(|&x| x == 0), "zeros at {at}");
    }
    eprintln!("16 TiB sparse disk, 3 data spots: full backup to a file image in {took:?}");
}
