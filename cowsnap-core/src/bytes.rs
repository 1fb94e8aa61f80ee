//! Byte-slice helpers shared by the targets and the repository.

/// Whether every byte of `data` is zero. Safe and fast: the OR of each 64-byte block is
/// one vectorised reduction in release builds (about memory speed), and the first
/// non-zero block ends the scan.
pub fn is_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(64);
    for b in &mut blocks {
        if b.iter().fold(0u8, |a, &x| a | x) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_any_non_zero_byte() {
        assert!(is_zero(&[]));
        for len in [1usize, 63, 64, 65, 4096, 4099] {
            let mut v = vec![0u8; len];
            assert!(is_zero(&v), "{len}");
            for i in [0, len / 2, len - 1] {
                v[i] = 1;
                assert!(!is_zero(&v), "{len} at {i}");
                // unaligned starts too
                assert_eq!(is_zero(&v[1..]), i == 0);
                v[i] = 0;
            }
        }
    }
}
