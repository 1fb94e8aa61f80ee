//! A live restore of a large, mostly empty generation fills in steps proportional to
//! its data: runs of zero chunks are one step each (nothing written onto a fresh
//! sparse file, one write-zeroes per run onto a device), counted as calls to the
//! destination.

use cowsnap_core::backup::{BackupParams, BackupState, Backups};
use cowsnap_core::blockio::{self, BlockIo, IoEngine, OpenSpec};
use cowsnap_core::engine::{Engine, EngineConfig};
use cowsnap_core::error::Result;
use cowsnap_core::restore::live::FillingIo;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const SIZE: u64 = 64 * GIB + 3 * MIB;
/// Where the generation holds data (one 4 KiB write in each of these repository chunks).
const DATA: [u64; 3] = [5 * MIB + 7, 20 * GIB, SIZE - 4096];

/// A destination that counts the calls it gets; `device`: it cannot tell where it
/// holds data (as a block device).
struct Counting {
    inner: Arc<dyn BlockIo>,
    device: bool,
    writes: AtomicU64,
    zeroes: AtomicU64,
    flushes: AtomicU64,
}

impl BlockIo for Counting {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.write_at(buf, off)
    }
    fn flush(&self) -> Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.inner.flush()
    }
    fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.inner.discard(off, len)
    }
    fn write_zeroes(&self, off: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.zeroes.fetch_add(1, Ordering::SeqCst);
        self.inner.write_zeroes(off, len, may_unmap)
    }
    fn fast_zero(&self) -> bool {
        self.inner.fast_zero()
    }
    fn is_block_device(&self) -> bool {
        self.device
    }
    fn engine_name(&self) -> &'static str {
        "counting"
    }
    fn data_ranges(&self, off: u64, len: u64) -> Result<Option<Vec<(u64, u64)>>> {
        if self.device {
            return Ok(None);
        }
        self.inner.data_ranges(off, len)
    }
}

fn open_file(path: &Path) -> Arc<dyn BlockIo> {
    let mut spec = OpenSpec::origin(path);
    spec.engine = IoEngine::Sync;
    blockio::open(&spec).unwrap()
}

fn sparse(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

/// A 64 GiB generation holding 3 chunks of data, backed up from a sparse file.
fn generation(dir: &Path) -> (std::path::PathBuf, String) {
    let origin = dir.join("origin.img");
    sparse(&origin, SIZE);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&origin)
        .unwrap();
    for (i, &off) in DATA.iter().enumerate() {
        f.write_all_at(&[i as u8 + 1; 4096], off).unwrap();
    }
    drop(f);
    let engine = Engine::new(
        open_file(&origin),
        EngineConfig {
            name: "s".into(),
            ..Default::default()
        },
        None,
    )
    .unwrap();
    let backups = Backups::new(engine);
    let repo = dir.join("repo");
    backups
        .start(BackupParams {
            to: format!("repo:{}", repo.display()),
            container: Some("ram:1M".into()),
            ..Default::default()
        })
        .unwrap();
    let st = backups.wait(Duration::from_secs(120)).unwrap();
    assert_eq!(st.state, BackupState::Complete, "{st:?}");
    (repo, st.generation.unwrap())
}

fn fill(dest: &Arc<Counting>, repo: &Path, g: &str, state: &Path) -> Arc<FillingIo> {
    let f = FillingIo::open(dest.clone(), repo, Some(g), state).unwrap();
    // a whole chunk written before the fill: the zero run around it is cut in two
    f.write_at(&vec![9u8; MIB as usize], 10 * GIB).unwrap();
    let writes_before = dest.writes.load(Ordering::SeqCst);
    assert_eq!(writes_before, 1);
    f.start_fill();
    let t = Instant::now();
    while !f.fill_status().complete {
        assert!(f.fill_status().error.is_none(), "{:?}", f.fill_status());
        assert!(t.elapsed() < Duration::from_secs(300), "fill stuck");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(f.fill_status().done, f.fill_status().total);
    f
}

fn check(f: &FillingIo) {
    let mut b = vec![0u8; 4096];
    for (i, &off) in DATA.iter().enumerate() {
        f.read_at(&mut b, off).unwrap();
        assert!(b.iter().all(|&x| x == i as u8 + 1), "data at {off}");
    }
    f.read_at(&mut b, 10 * GIB + 4096).unwrap();
    assert!(b.iter().all(|&x| x == 9), "the write before the fill");
    for off in [0, 7 * GIB, 10 * GIB + MIB, 40 * GIB] {
        f.read_at(&mut b, off).unwrap();
        assert!(b.iter().all(|&x| x == 0), "zeros at {off}");
    }
}

#[test]
fn a_sparse_generation_fills_a_fresh_sparse_file_without_writing_zeros() {
    let d = tempfile::tempdir().unwrap();
    let (repo, g) = generation(d.path());
    let path = d.path().join("dest.img");
    sparse(&path, SIZE);
    let dest = Arc::new(Counting {
        inner: open_file(&path),
        device: false,
        writes: AtomicU64::new(0),
        zeroes: AtomicU64::new(0),
        flushes: AtomicU64::new(0),
    });
    let state = d.path().join("fill.state");
    let f = fill(&dest, &repo, &g, &state);
    // 65,539 chunks: the 3 data chunks written, nothing for the zero runs (holes),
    // one flush per step
    assert_eq!(dest.writes.load(Ordering::SeqCst), 1 + 3);
    assert_eq!(dest.zeroes.load(Ordering::SeqCst), 0);
    let flushes = dest.flushes.load(Ordering::SeqCst);
    assert!(flushes <= 12, "{flushes} flushes");
    check(&f);
    drop(f);
    // the state file says complete: a plain disk from now on
    let f = FillingIo::open(dest.clone(), &repo, Some(&g), &state).unwrap();
    assert!(f.fill_status().complete);
}

#[test]
fn a_sparse_generation_fills_a_device_with_one_write_zeroes_per_run() {
    let d = tempfile::tempdir().unwrap();
    let (repo, g) = generation(d.path());
    let path = d.path().join("dest.img");
    // old data where zeros must go: the device is zeroed, not trusted
    sparse(&path, SIZE);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(&[0xEE; 4096], 40 * GIB)
        .unwrap();
    let dest = Arc::new(Counting {
        inner: open_file(&path),
        device: true,
        writes: AtomicU64::new(0),
        zeroes: AtomicU64::new(0),
        flushes: AtomicU64::new(0),
    });
    let f = fill(&dest, &repo, &g, &d.path().join("fill.state"));
    assert_eq!(dest.writes.load(Ordering::SeqCst), 1 + 3);
    // runs of at most 1 GiB: 64 GiB in about 64 calls (not one per chunk: 65,535)
    let zeroes = dest.zeroes.load(Ordering::SeqCst);
    assert!((64..=70).contains(&zeroes), "{zeroes} write-zeroes calls");
    let flushes = dest.flushes.load(Ordering::SeqCst);
    assert!(flushes <= zeroes + 6, "{flushes} flushes");
    check(&f);
}
