//! Page-aligned byte buffers, so that the engine's own origin reads (preserving a
//! chunk, draining a batch) also work on an origin opened with O_DIRECT.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every buffer: enough for O_DIRECT on 4 KiB-sector devices.
pub const ALIGN: usize = 4096;

/// A growable, zero-initialised, 4 KiB-aligned byte buffer.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8], like Vec<u8>.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// An empty buffer (no allocation).
    pub fn new() -> Self {
        AlignedBuf {
            ptr: NonNull::dangling(),
            len: 0,
            cap: 0,
        }
    }

    /// Set the length to `len`. Growing reallocates (contents are not kept) and zeroes;
    /// shrinking and re-growing within the capacity keeps old bytes, as callers
    /// overwrite what they use.
    pub fn resize(&mut self, len: usize) {
        if len > self.cap {
            self.free();
            let cap = len.next_multiple_of(ALIGN);
            let layout = match Layout::from_size_align(cap, ALIGN) {
                Ok(l) => l,
                Err(_) => alloc::handle_alloc_error(Layout::new::<u8>()),
            };
            // SAFETY: the layout has a non-zero size: len > old cap >= 0, so the new cap
            // is at least ALIGN.
            let p = unsafe { alloc::alloc_zeroed(layout) };
            self.ptr = match NonNull::new(p) {
                Some(p) => p,
                None => alloc::handle_alloc_error(layout),
            };
            self.cap = cap;
        }
        self.len = len;
    }

    fn free(&mut self) {
        if self.cap > 0 {
            // SAFETY: ptr was allocated by alloc_zeroed with exactly this layout
            // (cap and ALIGN were valid when it was allocated).
            unsafe {
                alloc::dealloc(
                    self.ptr.as_ptr(),
                    Layout::from_size_align_unchecked(self.cap, ALIGN),
                )
            };
            self.cap = 0;
            self.len = 0;
            self.ptr = NonNull::dangling();
        }
    }
}

impl Default for AlignedBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        self.free();
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised bytes (alloc_zeroed), or
        // dangling with len 0, which is valid for an empty slice.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_resizable() {
        let mut b = AlignedBuf::new();
        assert!(b.is_empty());
        b.resize(10000);
        assert_eq!(b.len(), 10000);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert!(b.iter().all(|&x| x == 0));
        b[9999] = 7;
        b.resize(100);
        assert_eq!(b.len(), 100);
        b.resize(10000);
        assert_eq!(b[9999], 7, "kept within capacity");
        b.resize(1 << 20);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert_eq!(b.len(), 1 << 20);
    }
}
