//! The one codec of the fixed-size on-disk headers (change log, live-restore fill
//! state, repository index): fields are written and read in declaration order, little
//! endian, with no implicit padding — so a header struct's field list *is* its byte
//! layout, and nothing names an offset by hand. Each header is `#[repr(C)]` with
//! explicit padding fields and a compile-time size assert (its fields add up to the
//! encoded size); a test per header pins its bytes.

/// Appends fields, little endian.
pub(crate) struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    /// An encoder for a header of `size` bytes.
    pub(crate) fn new(size: usize) -> Self {
        Encoder {
            buf: Vec::with_capacity(size),
        }
    }

    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub(crate) fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    /// Everything written so far (what a checksum covers).
    pub(crate) fn written(&self) -> &[u8] {
        &self.buf
    }

    /// The encoded header, zero-padded to `size` bytes.
    pub(crate) fn finish(mut self, size: usize) -> Vec<u8> {
        self.buf.resize(size, 0);
        self.buf
    }
}

/// Reads fields in the order they were written; `None` past the end.
pub(crate) struct Decoder<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Decoder<'a> {
    pub(crate) fn new(b: &'a [u8]) -> Self {
        Decoder { b, at: 0 }
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let s = self.b.get(self.at..self.at.checked_add(N)?)?;
        self.at += N;
        s.try_into().ok()
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }

    /// The bytes read so far (what a checksum covers).
    pub(crate) fn read(&self) -> &'a [u8] {
        &self.b[..self.at]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_in_order_little_endian() {
        let mut e = Encoder::new(32);
        e.bytes(b"MAGIC!!!").u32(1).u32(0x0203).u64(u64::MAX - 1);
        assert_eq!(e.written().len(), 24);
        let b = e.finish(32);
        assert_eq!(&b[8..12], &[1, 0, 0, 0]);
        assert_eq!(&b[12..16], &[3, 2, 0, 0]);
        assert!(b[24..].iter().all(|&x| x == 0));
        let mut d = Decoder::new(&b);
        assert_eq!(&d.array::<8>().unwrap(), b"MAGIC!!!");
        assert_eq!(d.u32(), Some(1));
        assert_eq!(d.u32(), Some(0x0203));
        assert_eq!(d.u64(), Some(u64::MAX - 1));
        assert_eq!(d.read().len(), 24);
        assert_eq!(d.array::<16>(), None, "past the end");
    }
}
