//! A generation's fixed index: `FixedIndex::decode` on arbitrary bytes. The first
//! input byte says which checksums to repair before decoding (bit 0: the header's,
//! bit 1: the entries'), so the fuzzer also reaches the checks behind them. Whatever
//! decodes must re-encode to exactly the input.
#![no_main]

use cowsnap_core::repo::index::{FixedIndex, INDEX_HEADER_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut b = rest.to_vec();
    if b.len() >= INDEX_HEADER_SIZE {
        if mode & 2 != 0 {
            let mut h = blake3::Hasher::new();
            for e in b[INDEX_HEADER_SIZE..].chunks(32) {
                h.update(e);
            }
            let sum = *h.finalize().as_bytes();
            b[32..64].copy_from_slice(&sum);
        }
        if mode & 1 != 0 {
            let sum = *blake3::hash(&b[..128]).as_bytes();
            b[128..160].copy_from_slice(&sum);
        }
    }
    if let Ok(idx) = FixedIndex::decode(&b, "fuzz") {
        assert_eq!(
            idx.hashes.len() as u64,
            cowsnap_core::repo::index::chunk_count(idx.disk_size, idx.chunk_size)
        );
        for i in [0, idx.hashes.len().saturating_sub(1)] {
            if i < idx.hashes.len() {
                let l = idx.chunk_len(i as u64);
                assert!(l > 0 && l <= idx.chunk_size as usize);
            }
        }
        let enc = idx.encode();
        // The header's padding and the generation id's bytes after its NUL are not
        // kept; the geometry, checksums and entries are.
        assert_eq!(enc.len(), b.len());
        assert_eq!(&enc[..64], &b[..64]);
        assert_eq!(&enc[INDEX_HEADER_SIZE..], &b[INDEX_HEADER_SIZE..]);
        let again = FixedIndex::decode(&enc, "fuzz").expect("re-encoded index decodes");
        // A generation id that is not UTF-8 comes back lossily (the repository then
        // refuses the index: it does not match its metadata).
        let gen_end = b[64..128].iter().position(|&c| c == 0).unwrap_or(64);
        if idx.generation.as_bytes() == &b[64..64 + gen_end] {
            assert_eq!(again, idx);
        }
    }
});
