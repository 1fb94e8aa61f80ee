//! A generation's fixed index: `FixedIndex::decode` on arbitrary bytes, both versions
//! (version 1: one hash per chunk; version 2: data runs, then their hashes). The first
//! input byte says which checksums to repair before decoding (bit 0: the header's,
//! bit 1: the entries'), so the fuzzer also reaches the checks behind them. Whatever
//! decodes must re-encode, in its own version, to exactly the input, and mean the same
//! in the other version.
#![no_main]

use cowsnap_core::repo::index::{chunk_count, FixedIndex, INDEX_HEADER_SIZE, INDEX_MAGIC};
use cowsnap_core::repo::ZERO_HASH;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut b = rest.to_vec();
    let v2 = b.len() >= 8 && b[..8] == INDEX_MAGIC;
    // where the entries checksum and the header checksum live, and what the latter covers
    let (entries_sum, header_sum) = if v2 { (48, 144) } else { (32, 128) };
    if b.len() >= INDEX_HEADER_SIZE {
        if mode & 2 != 0 {
            let sum = *blake3::hash(&b[INDEX_HEADER_SIZE..]).as_bytes();
            b[entries_sum..entries_sum + 32].copy_from_slice(&sum);
        }
        if mode & 1 != 0 {
            let sum = *blake3::hash(&b[..header_sum]).as_bytes();
            b[header_sum..header_sum + 32].copy_from_slice(&sum);
        }
    }
    if let Ok(idx) = FixedIndex::decode(&b, "fuzz") {
        let n = chunk_count(idx.disk_size, idx.chunk_size);
        assert_eq!(idx.chunk_count(), n);
        assert!(idx.data_chunks() <= n);
        for i in [0, n.saturating_sub(1)] {
            if i < n {
                let l = idx.chunk_len(i);
                assert!(l > 0 && l <= idx.chunk_size as usize);
            }
        }
        let mut last = None;
        for (i, h) in idx.data().take(4096) {
            assert!(i < n && last.is_none_or(|l| l < i), "data chunks ascend");
            assert_ne!(*h, ZERO_HASH);
            assert_eq!(idx.hash(i), h);
            last = Some(i);
        }
        assert!(idx.data_bytes() <= idx.disk_size);
        let enc = if v2 { idx.encode() } else { idx.encode_v1() };
        // The header's padding and the generation id's bytes after its NUL are not
        // kept; the geometry, checksums and entries are.
        let kept = if v2 { 80 } else { 64 };
        assert_eq!(enc.len(), b.len());
        assert_eq!(&enc[..kept], &b[..kept]);
        assert_eq!(&enc[INDEX_HEADER_SIZE..], &b[INDEX_HEADER_SIZE..]);
        let again = FixedIndex::decode(&enc, "fuzz").expect("re-encoded index decodes");
        // A generation id that is not UTF-8 comes back lossily (the repository then
        // refuses the index: it does not match its metadata).
        let gen_end = b[kept..kept + 64].iter().position(|&c| c == 0).unwrap_or(64);
        if idx.generation.as_bytes() == &b[kept..kept + gen_end] {
            assert_eq!(again, idx);
        }
        // The other version says the same (version 1 only for small disks: it is one
        // hash per chunk).
        if v2 && n > 1 << 16 {
            return;
        }
        let other = if v2 { idx.encode_v1() } else { idx.encode() };
        assert_eq!(FixedIndex::decode(&other, "fuzz").expect("other version decodes"), again);
    }
});
