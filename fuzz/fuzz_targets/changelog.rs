//! The change log reader: `ChangeLog::open_with_lineage` on a file holding the input
//! (in a private directory under $TMPDIR), then a cut, a commit or abort, and a
//! reopen. Bit 0 of the first byte makes the header agree with what the log is
//! opened for (disk size, chunk size, lineage, magic, version) and repairs its
//! checksum, so the fuzzer reaches the bitmap regions behind it. Bits 1 and 2 pick
//! commit or abort. Whatever the file held, the log must open, hand out a cut of
//! exactly one bit per chunk, never report a new reset on reopen, and come back
//! trusted after a commit.
#![no_main]

use cowsnap_core::changelog::ChangeLog;
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

const HEADER: usize = 4096;
/// The header's checksummed part: everything before the checksum at 248..280, and
/// the reset reason at 280..536.
const BODY: usize = 248;
const REASON_AT: usize = 280;
const REASON_LEN: usize = 256;

fn path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("cowsnap-fuzz-changelog-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("create the change log directory");
        d.join("changelog.bin")
    })
}

fn nul_str(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    std::str::from_utf8(&b[..end]).ok().map(str::to_string)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut file = rest.to_vec();
    // What the daemon opens the log for: a disk of at most 16 MiB here (the bitmap
    // then stays small), chunks of 512 B .. 64 KiB.
    let mut disk_size = 1 << 20;
    let mut chunk_size = 4096u32;
    let mut lineage = "fuzz-lineage".to_string();
    if file.len() >= HEADER {
        let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        disk_size = u64_at(&file, 16) % (16 << 20);
        let cs = u32_at(&file, 24);
        chunk_size = if cs.is_power_of_two() && (512..=65536).contains(&cs) {
            cs
        } else {
            512 << (cs % 8)
        };
        if mode & 1 != 0 {
            file[..8].copy_from_slice(b"CSNPCL01");
            file[8..12].copy_from_slice(&1u32.to_le_bytes());
            file[16..24].copy_from_slice(&disk_size.to_le_bytes());
            file[24..28].copy_from_slice(&chunk_size.to_le_bytes());
            // Lineage ids are UTF-8 (the daemon makes them); keep a readable one.
            match nul_str(&file[56..120]) {
                Some(l) => lineage = l,
                None => {
                    file[56..120].fill(0);
                    file[56..56 + lineage.len()].copy_from_slice(lineage.as_bytes());
                }
            }
            // The checksum covers the body, and the reset reason when there is one.
            let reason = &file[REASON_AT..REASON_AT + REASON_LEN];
            let sum = if reason.iter().all(|&c| c == 0) {
                blake3::hash(&file[..BODY])
            } else {
                let mut h = blake3::Hasher::new();
                h.update(&file[..BODY]);
                h.update(reason);
                h.finalize()
            };
            file[BODY..BODY + 32].copy_from_slice(sum.as_bytes());
        }
    }
    let nbits = disk_size.div_ceil(chunk_size as u64);
    let p = path();
    std::fs::write(p, &file).expect("write the change log");
    let first_reason;
    {
        let cl = ChangeLog::open_with_lineage(p, disk_size, chunk_size, &lineage)
            .expect("a change log opens whatever the file held");
        let st = cl.status();
        assert!(
            st.changed_chunks <= nbits,
            "more changed chunks than chunks"
        );
        assert!(!st.in_generation);
        first_reason = st.reset_reason.clone();
        let cut = cl.begin_generation().expect("cut");
        assert_eq!(cut.changed.len() as u64, nbits);
        assert_eq!(cut.relative_to, st.relative_to);
        if mode & 2 != 0 {
            cl.commit_generation(&cut, "g1").expect("commit");
        } else if mode & 4 != 0 {
            cl.abort_generation(&cut).expect("abort");
        }
    }
    let cl = ChangeLog::open_with_lineage(p, disk_size, chunk_size, &lineage)
        .expect("reopen the change log");
    let st = cl.status();
    // A log just written is not reset again on reopen: it reports no reset, or the
    // same reason as before (possibly cut short), never a new one.
    if let Some(r) = &st.reset_reason {
        let first = first_reason.as_deref().unwrap_or("");
        assert!(
            mode & 2 == 0 && !r.is_empty() && first.starts_with(r.as_str()),
            "reopen reports a new reset: {r:?} (first open: {first_reason:?})"
        );
    }
    if mode & 2 != 0 {
        assert_eq!(st.relative_to.as_deref(), Some("g1"));
        assert_eq!(st.changed_chunks, 0);
    }
});
