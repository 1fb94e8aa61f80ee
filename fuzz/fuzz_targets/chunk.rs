//! Stored chunks: `ChunkStore::read` on a chunk file holding the input (in a private
//! directory under $TMPDIR). The first byte picks the length and hash the reader is
//! asked for: bit 0 takes the length from the file's own header (else the stored
//! payload's length), bit 1 asks for the zero hash, bit 2 uses the hash of the
//! payload as stored, else the hash of what it decompresses to, so the fuzzer gets
//! past the content check. Bit 3 also stores the input as a new chunk and reads it
//! back. A chunk that reads must have the length and hash asked for; a damaged one
//! must leave the store for the quarantine (emptied after every input).
#![no_main]

use cowsnap_core::fsutil::hex;
use cowsnap_core::repo::chunk_store::{chunk_hash, is_damage, ChunkStore, ZERO_HASH};
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

/// Larger than any repository chunk size.
const MAX_CHUNK: usize = 16 << 20;

fn dir() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("cowsnap-fuzz-chunk-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("create the chunk directory");
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, raw)) = data.split_first() else {
        return;
    };
    let quarantine = dir().join("quarantine");
    let store = ChunkStore::new(dir(), &quarantine);
    let payload = raw.get(16..).unwrap_or(&[]);
    let header_len = raw
        .get(8..12)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize)
        .unwrap_or(0);
    let expect_len = if mode & 1 != 0 {
        header_len
    } else {
        payload.len()
    };
    if expect_len > MAX_CHUNK {
        return;
    }
    let hash = if mode & 2 != 0 {
        ZERO_HASH
    } else if mode & 4 != 0 || raw.get(5) != Some(&1) {
        *blake3::hash(payload).as_bytes()
    } else {
        match zstd::bulk::decompress(payload, expect_len) {
            Ok(d) => *blake3::hash(&d).as_bytes(),
            Err(_) => *blake3::hash(payload).as_bytes(),
        }
    };
    let path = store.path_of(&hash);
    if hash != ZERO_HASH {
        std::fs::create_dir_all(path.parent().unwrap()).expect("create the chunk subdirectory");
        std::fs::write(&path, raw).expect("write the chunk file");
    }
    match store.read(&hash, expect_len) {
        Ok(d) => {
            assert_eq!(d.len(), expect_len);
            assert!(hash == ZERO_HASH || blake3::hash(&d).as_bytes() == &hash);
        }
        Err(e) if is_damage(&e) => {
            assert!(!path.exists(), "a damaged chunk stayed in the store: {e}");
            assert!(
                store.is_quarantined(&hash),
                "a damaged chunk was not quarantined: {e}"
            );
        }
        Err(e) => panic!("reading a chunk file failed without damage: {e}"),
    }
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(quarantine.join(hex(&hash)));
    if mode & 8 != 0 {
        // Store the input as chunk data and read it back.
        let h = chunk_hash(raw);
        if h != ZERO_HASH {
            store.insert(&h, raw).expect("store a chunk");
            assert_eq!(store.read(&h, raw.len()).expect("read a stored chunk"), raw);
            let _ = std::fs::remove_file(store.path_of(&h));
        }
        assert_eq!(store.read(&ZERO_HASH, 7).expect("zero chunk"), vec![0u8; 7]);
    }
});
