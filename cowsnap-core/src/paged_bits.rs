//! [`PagedBits`]: a fixed-size set of bits kept in pages, where a page whose bits are
//! all 0 or all 1 takes no memory beyond its header. Used for the chunk map's planes
//! (`chunk_map.rs`), which start uniform (`pending` all ones for a full backup, `done`
//! and `zero` all zeros) and take long uniform runs (`mark_zero` over free space).
//!
//! Design notes
//! - Bits are cut into pages of `1 << shift` bits (32 Ki bits = 4 KiB by default); the
//!   last page may be partial. A page is `Zeros`, `Ones`, or `Mixed` with its words and
//!   its count of ones. A `Mixed` page whose count reaches 0 or its length collapses
//!   back to `Zeros` or `Ones`, so a page is `Mixed` only while it really is mixed.
//! - Bits of a partial last page beyond the length are 0 in its words and never read.
//! - Cost: single-bit operations are O(1); range operations are O(pages touched) for
//!   uniform pages and full pages covered whole, plus O(words) of the at most two
//!   partly covered pages and of the `Mixed` pages inside the range. Filling a whole
//!   page or the whole set writes page headers only.
//! - Not thread-safe by itself: the chunk map uses it under its one mutex.

use std::ops::Range;

/// Default page: 32 Ki bits (4 KiB of words).
const PAGE_SHIFT: u32 = 15;

#[derive(Clone, Debug)]
enum Page {
    Zeros,
    Ones,
    /// Words (bit `i` of the page is bit `i % 64` of word `i / 64`) and the ones among
    /// the page's bits; never 0 nor the page's length.
    Mixed {
        ones: usize,
        words: Box<[u64]>,
    },
}

/// A fixed-size set of bits in pages (see the module notes).
#[derive(Clone, Debug)]
pub struct PagedBits {
    len: usize,
    shift: u32,
    pages: Vec<Page>,
}

/// Mask of bits `a..b` of one word (`a < b <= 64`).
fn mask(a: usize, b: usize) -> u64 {
    let hi = if b == 64 { !0 } else { (1u64 << b) - 1 };
    hi & !((1u64 << a) - 1)
}

impl PagedBits {
    /// `len` bits, all `value`.
    pub fn new(len: usize, value: bool) -> Self {
        Self::with_page_shift(len, value, PAGE_SHIFT)
    }

    /// `len` bits, all `value`, in pages of `1 << shift` bits (`6 <= shift < 32`).
    pub fn with_page_shift(len: usize, value: bool, shift: u32) -> Self {
        assert!((6..32).contains(&shift), "page shift {shift} out of range");
        let npages = len.div_ceil(1 << shift);
        let page = if value { Page::Ones } else { Page::Zeros };
        PagedBits {
            len,
            shift,
            pages: vec![page; npages],
        }
    }

    /// Number of bits.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn page_bits(&self) -> usize {
        1 << self.shift
    }

    /// Bits in page `p` (the last one may be partial).
    fn page_len(&self, p: usize) -> usize {
        (self.len - (p << self.shift)).min(self.page_bits())
    }

    /// Heap bytes held: page headers plus the words of mixed pages.
    pub fn heap_bytes(&self) -> usize {
        self.pages.capacity() * std::mem::size_of::<Page>()
            + self
                .pages
                .iter()
                .map(|p| match p {
                    Page::Mixed { words, .. } => words.len() * 8,
                    _ => 0,
                })
                .sum::<usize>()
    }

    /// Bit `i`. Panics when `i >= len`, as slice indexing does.
    pub fn get(&self, i: usize) -> bool {
        assert!(i < self.len, "bit {i} out of range (len {})", self.len);
        match &self.pages[i >> self.shift] {
            Page::Zeros => false,
            Page::Ones => true,
            Page::Mixed { words, .. } => {
                let o = i & (self.page_bits() - 1);
                words[o / 64] >> (o % 64) & 1 == 1
            }
        }
    }

    /// Set bit `i` to `v`. Panics when `i >= len`.
    pub fn set(&mut self, i: usize, v: bool) {
        assert!(i < self.len, "bit {i} out of range (len {})", self.len);
        let p = i >> self.shift;
        let o = i & (self.page_bits() - 1);
        self.fill_in_page(p, o..o + 1, v);
    }

    /// Set bits `r` to `v`. Panics when `r` reaches past `len`.
    pub fn fill(&mut self, r: Range<usize>, v: bool) {
        self.check(&r);
        self.for_pages(r, |me, p, a, b| me.fill_in_page(p, a..b, v));
    }

    /// Whether every bit in `r` is 1 (true for an empty range).
    pub fn all(&self, r: Range<usize>) -> bool {
        self.count_ones(r.clone()) == r.len()
    }

    /// Whether some bit in `r` is 1.
    pub fn any(&self, r: Range<usize>) -> bool {
        self.first(r, true).is_some()
    }

    /// Ones in `r`.
    pub fn count_ones(&self, r: Range<usize>) -> usize {
        self.check(&r);
        self.pieces(r)
            .map(|(p, a, b)| match &self.pages[p] {
                Page::Zeros => 0,
                Page::Ones => b - a,
                Page::Mixed { ones, .. } if a == 0 && b == self.page_len(p) => *ones,
                Page::Mixed { words, .. } => count_in(words, a, b),
            })
            .sum()
    }

    /// Ones in the whole set.
    pub fn count_all_ones(&self) -> usize {
        self.count_ones(0..self.len)
    }

    /// First index in `r` whose bit is `v`.
    pub fn first(&self, r: Range<usize>, v: bool) -> Option<usize> {
        self.check(&r);
        self.pieces(r).find_map(|(p, a, b)| {
            let base = p << self.shift;
            match &self.pages[p] {
                Page::Zeros if !v => Some(base + a),
                Page::Ones if v => Some(base + a),
                Page::Mixed { words, .. } => first_in(words, a, b, v).map(|o| base + o),
                _ => None,
            }
        })
    }

    fn check(&self, r: &Range<usize>) {
        assert!(
            r.start <= r.end && r.end <= self.len,
            "range {r:?} out of bounds (len {})",
            self.len
        );
    }

    /// Call `f(self, page, a, b)` for each page `r` touches, with the page-relative
    /// bits `a..b` it covers.
    fn for_pages(&mut self, r: Range<usize>, mut f: impl FnMut(&mut Self, usize, usize, usize)) {
        for (p, a, b) in self.pieces(r) {
            f(self, p, a, b);
        }
    }

    /// The pages `r` touches, each with the page-relative bits `a..b` it covers, as
    /// `(page, a, b)`. The iterator holds no borrow of `self`.
    fn pieces(&self, r: Range<usize>) -> impl Iterator<Item = (usize, usize, usize)> {
        let (shift, len) = (self.shift, self.len);
        let mut c = r.start;
        std::iter::from_fn(move || {
            if c >= r.end {
                return None;
            }
            let p = c >> shift;
            let base = p << shift;
            let page_len = (len - base).min(1 << shift);
            let b = (r.end - base).min(page_len);
            let piece = (p, c - base, b);
            c = base + b;
            Some(piece)
        })
    }

    /// Set page-relative bits `r` of page `p` to `v`; the page collapses when it
    /// becomes uniform.
    fn fill_in_page(&mut self, p: usize, r: Range<usize>, v: bool) {
        let plen = self.page_len(p);
        if r.is_empty() {
            return;
        }
        if r.start == 0 && r.end == plen {
            self.pages[p] = if v { Page::Ones } else { Page::Zeros };
            return;
        }
        let page = &mut self.pages[p];
        match page {
            Page::Zeros if !v => return,
            Page::Ones if v => return,
            Page::Zeros => {
                *page = Page::Mixed {
                    ones: 0,
                    words: vec![0u64; plen.div_ceil(64)].into_boxed_slice(),
                }
            }
            Page::Ones => {
                let mut words = vec![!0u64; plen.div_ceil(64)];
                if !plen.is_multiple_of(64) {
                    if let Some(last) = words.last_mut() {
                        *last = mask(0, plen % 64);
                    }
                }
                *page = Page::Mixed {
                    ones: plen,
                    words: words.into_boxed_slice(),
                }
            }
            Page::Mixed { .. } => {}
        }
        let Page::Mixed { ones, words } = page else {
            return;
        };
        let mut i = r.start;
        while i < r.end {
            let w = i / 64;
            let e = (r.end - w * 64).min(64);
            let m = mask(i % 64, e);
            let before = (words[w] & m).count_ones() as usize;
            if v {
                words[w] |= m;
                *ones += m.count_ones() as usize - before;
            } else {
                words[w] &= !m;
                *ones -= before;
            }
            i = w * 64 + e;
        }
        if *ones == 0 {
            *page = Page::Zeros;
        } else if *ones == plen {
            *page = Page::Ones;
        }
    }
}

/// Ones among bits `a..b` of `words`.
fn count_in(words: &[u64], a: usize, b: usize) -> usize {
    let mut n = 0;
    let mut i = a;
    while i < b {
        let w = i / 64;
        let e = (b - w * 64).min(64);
        n += (words[w] & mask(i % 64, e)).count_ones() as usize;
        i = w * 64 + e;
    }
    n
}

/// First of bits `a..b` of `words` equal to `v`.
fn first_in(words: &[u64], a: usize, b: usize, v: bool) -> Option<usize> {
    let mut i = a;
    while i < b {
        let w = i / 64;
        let e = (b - w * 64).min(64);
        let word = if v { words[w] } else { !words[w] };
        let hit = word & mask(i % 64, e);
        if hit != 0 {
            return Some(w * 64 + hit.trailing_zeros() as usize);
        }
        i = w * 64 + e;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitvec::prelude::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Set(usize, bool),
        Fill(usize, usize, bool),
    }

    fn op(len: usize) -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..len, any::<bool>()).prop_map(|(i, v)| Op::Set(i, v)),
            (0..=len, 0..=len, any::<bool>()).prop_map(|(a, b, v)| Op::Fill(a.min(b), a.max(b), v)),
        ]
    }

    fn case() -> impl Strategy<Value = (u32, usize, bool, Vec<Op>, Vec<(usize, usize)>)> {
        (6u32..9, 1usize..1200, any::<bool>()).prop_flat_map(|(shift, len, init)| {
            (
                Just(shift),
                Just(len),
                Just(init),
                proptest::collection::vec(op(len), 0..40),
                proptest::collection::vec((0..=len, 0..=len), 1..20),
            )
        })
    }

    /// Every query agrees with `bitvec` on ranges `qs`.
    fn agree(p: &PagedBits, b: &BitVec<u64, Lsb0>, qs: &[(usize, usize)]) {
        assert_eq!(p.len(), b.len());
        for i in 0..b.len() {
            assert_eq!(p.get(i), b[i], "bit {i}");
        }
        assert_eq!(p.count_all_ones(), b.count_ones());
        for &(x, y) in qs {
            let (a, e) = (x.min(y), x.max(y));
            let s = &b[a..e];
            assert_eq!(p.count_ones(a..e), s.count_ones(), "count {a}..{e}");
            assert_eq!(p.all(a..e), s.all(), "all {a}..{e}");
            assert_eq!(p.any(a..e), s.any(), "any {a}..{e}");
            assert_eq!(p.first(a..e, true), s.first_one().map(|i| a + i));
            assert_eq!(p.first(a..e, false), s.first_zero().map(|i| a + i));
        }
        // a page is mixed only while it is
        for (i, pg) in p.pages.iter().enumerate() {
            let r = (i << p.shift)..((i + 1) << p.shift).min(p.len);
            match pg {
                Page::Zeros => assert!(b[r].not_any()),
                Page::Ones => assert!(b[r].all()),
                Page::Mixed { ones, .. } => {
                    assert_eq!(*ones, b[r.clone()].count_ones());
                    assert!(*ones != 0 && *ones != r.len());
                }
            }
        }
    }

    proptest! {
        #[test]
        fn matches_bitvec((shift, len, init, ops, qs) in case()) {
            let mut p = PagedBits::with_page_shift(len, init, shift);
            let mut b: BitVec<u64, Lsb0> = BitVec::repeat(init, len);
            agree(&p, &b, &qs);
            for o in ops {
                match o {
                    Op::Set(i, v) => {
                        p.set(i, v);
                        b.set(i, v);
                    }
                    Op::Fill(a, e, v) => {
                        p.fill(a..e, v);
                        b[a..e].fill(v);
                    }
                }
                agree(&p, &b, &qs);
            }
        }
    }

    #[test]
    fn uniform_fills_allocate_nothing() {
        let n = 3 << PAGE_SHIFT | 5;
        let mut p = PagedBits::new(n, true);
        let headers = p.heap_bytes();
        p.fill(1 << PAGE_SHIFT..n, false);
        assert_eq!(p.heap_bytes(), headers);
        assert_eq!(p.count_all_ones(), 1 << PAGE_SHIFT);
        // one bit makes one page mixed; clearing it again collapses the page
        p.set(7, false);
        assert_eq!(p.heap_bytes(), headers + (1 << PAGE_SHIFT) / 8);
        p.set(7, true);
        assert_eq!(p.heap_bytes(), headers);
        // the last partial page: filled bit by bit it collapses to ones
        for i in 3 << PAGE_SHIFT..n {
            p.set(i, true);
        }
        assert_eq!(p.heap_bytes(), headers);
        assert!(p.all(3 << PAGE_SHIFT..n));
        assert_eq!(p.first(0..n, false), Some(1 << PAGE_SHIFT));
    }
}
