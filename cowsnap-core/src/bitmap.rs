//! [`AtomicBitmap`]: a fixed-size set of bits in atomic 64-bit words, read lock-free on
//! the I/O path. Used where a bit, once published, is tested by many threads without a
//! lock and set only after what it stands for is durable: the change log's durable
//! region C (`changelog.rs`) and the live restore's restored chunks (`restore/live.rs`).
//! (The chunk map's planes live under its mutex: [`crate::paged_bits::PagedBits`].)
//!
//! Layout, in memory and on disk: bit `i` is bit `i % 64` of word `i / 64`, words are
//! little endian on disk ([`to_le_bytes`], [`from_le_bytes`]), LSB first — the same
//! bytes as a `bitvec` `BitVec<u64, Lsb0>` on a little-endian machine.
//!
//! Memory order: a bit is tested with Acquire and set with AcqRel, so a thread that
//! sees a bit also sees everything its setter did before publishing it.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// Words needed for `nbits` bits.
pub fn words_for(nbits: u64) -> usize {
    nbits.div_ceil(64) as usize
}

/// `words` as little-endian bytes, zero-padded (or cut) to `len` bytes.
pub fn to_le_bytes(words: &[u64], len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len.max(words.len() * 8));
    for w in words {
        v.extend_from_slice(&w.to_le_bytes());
    }
    v.resize(len, 0);
    v
}

/// `nwords` words from little-endian bytes; missing bytes read as zero.
pub fn from_le_bytes(b: &[u8], nwords: usize) -> Vec<u64> {
    (0..nwords)
        .map(|i| {
            let mut w = [0u8; 8];
            if let Some(s) = b.get(i * 8..i * 8 + 8) {
                w.copy_from_slice(s);
            }
            u64::from_le_bytes(w)
        })
        .collect()
}

/// A fixed-size bitmap of atomic words.
pub struct AtomicBitmap {
    words: Vec<AtomicU64>,
}

// `zeroed` and `into_words` move one allocation between `Vec<u64>` and
// `Vec<AtomicU64>`: sound only while the two have one layout.
const _: () = assert!(
    std::mem::size_of::<u64>() == std::mem::size_of::<AtomicU64>()
        && std::mem::align_of::<u64>() == std::mem::align_of::<AtomicU64>()
);

impl AtomicBitmap {
    /// An all-zero bitmap of `nwords` words in O(1): the memory comes zeroed from the
    /// allocator and its pages are touched only when bits are set.
    pub fn zeroed(nwords: usize) -> Self {
        let mut v = std::mem::ManuallyDrop::new(vec![0u64; nwords]);
        // SAFETY: `AtomicU64` has the same in-memory representation as `u64` (std
        // documents it), and the same size and alignment (asserted above), so the
        // allocation `v` owns — made for `nwords` u64 with capacity `v.capacity()` —
        // is a valid, initialised allocation of as many `AtomicU64` with the same
        // layout for `Vec` to own and free. `v` is never used or dropped again.
        let words = unsafe {
            Vec::from_raw_parts(v.as_mut_ptr().cast::<AtomicU64>(), v.len(), v.capacity())
        };
        AtomicBitmap { words }
    }

    /// The words, moved out without copying (O(1)); no other thread can hold the
    /// bitmap, since it is consumed.
    pub fn into_words(self) -> Vec<u64> {
        let mut v = std::mem::ManuallyDrop::new(self.words);
        // SAFETY: as in `zeroed`, the other way round: `AtomicU64` and `u64` share
        // representation, size and alignment, so the allocation `v` owns is a valid,
        // initialised allocation of as many `u64` with the same layout. We own the
        // bitmap, so nothing accesses the words atomically any more, and `v` is never
        // used or dropped again.
        unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<u64>(), v.len(), v.capacity()) }
    }

    /// A bitmap holding `words`.
    pub fn from_words(words: Vec<u64>) -> Self {
        AtomicBitmap {
            words: words.into_iter().map(AtomicU64::new).collect(),
        }
    }

    /// Number of words.
    pub fn nwords(&self) -> usize {
        self.words.len()
    }

    /// Whether bit `i` is set. Panics past the end (callers index checked chunks).
    pub fn get(&self, i: u64) -> bool {
        self.words[(i / 64) as usize].load(Ordering::Acquire) & (1u64 << (i % 64)) != 0
    }

    /// Whether every bit of `r` is set.
    pub fn all(&self, r: Range<u64>) -> bool {
        r.into_iter().all(|i| self.get(i))
    }

    /// Set bit `i`; returns whether it was set before.
    pub fn set(&self, i: u64) -> bool {
        let m = 1u64 << (i % 64);
        self.words[(i / 64) as usize].fetch_or(m, Ordering::AcqRel) & m != 0
    }

    /// Set the bits `mask` in word `w`; returns the word as it was before.
    pub fn or_word(&self, w: usize, mask: u64) -> u64 {
        self.words[w].fetch_or(mask, Ordering::AcqRel)
    }

    /// Word `w` as it is now.
    pub fn word(&self, w: usize) -> u64 {
        self.words[w].load(Ordering::Acquire)
    }

    /// Copy of every word.
    pub fn to_words(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::SeqCst))
            .collect()
    }

    /// Replace every word (`words` as long as the bitmap; extra ones are ignored,
    /// missing ones read as zero).
    pub fn store_words(&self, words: &[u64]) {
        for (i, a) in self.words.iter().enumerate() {
            a.store(words.get(i).copied().unwrap_or(0), Ordering::SeqCst);
        }
    }

    /// Clear every bit.
    pub fn clear(&self) {
        self.store_words(&[]);
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitvec::prelude::*;

    #[test]
    fn zeroed_and_into_words_keep_the_bits() {
        let b = AtomicBitmap::zeroed(1000);
        assert_eq!(b.nwords(), 1000);
        assert_eq!(b.count_ones(), 0);
        b.set(3);
        b.set(64 * 999 + 63);
        let w = b.into_words();
        assert_eq!(w.len(), 1000);
        assert_eq!(w[0], 8);
        assert_eq!(w[999], 1 << 63);
        assert_eq!(w.iter().map(|x| x.count_ones()).sum::<u32>(), 2);
        assert_eq!(AtomicBitmap::zeroed(0).into_words(), Vec::<u64>::new());
    }

    #[test]
    fn bits_words_and_bytes() {
        let b = AtomicBitmap::from_words(vec![0; words_for(130)]);
        assert_eq!(b.nwords(), 3);
        assert!(!b.set(0) && !b.set(65) && !b.set(129));
        assert!(b.set(65), "already set");
        assert!(b.get(0) && b.get(65) && b.get(129) && !b.get(1));
        assert!(b.all(65..66) && !b.all(64..66));
        assert_eq!(b.count_ones(), 3);
        let bytes = to_le_bytes(&b.to_words(), 32);
        assert_eq!(bytes.len(), 32);
        assert_eq!(from_le_bytes(&bytes, 3), b.to_words());
        // the same bytes as a bitvec with Lsb0 u64 words
        let mut v: BitVec<u64, Lsb0> = BitVec::repeat(false, 130);
        for i in [0, 65, 129] {
            v.set(i, true);
        }
        assert_eq!(v.as_raw_slice(), &b.to_words()[..]);
        b.or_word(0, 0b110);
        assert_eq!(b.word(0), 0b111);
        b.clear();
        assert_eq!(b.count_ones(), 0);
    }
}
