//! Byte helpers: `is_zero` for the targets and the repository, `human` for every
//! message that states a size.

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

/// A byte count for people: "4 TiB", "21.3 GiB", "512 KiB", "100 bytes" (powers of
/// 1024; one decimal unless the value is whole). Every crate's messages use this one.
pub fn human(n: u64) -> String {
    const U: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64 / 1024.0;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0} {}", U[i])
    } else {
        format!("{v:.1} {}", U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(0), "0 bytes");
        assert_eq!(human(1023), "1023 bytes");
        assert_eq!(human(1024), "1 KiB");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(4 << 40), "4 TiB");
        assert_eq!(human((21 << 30) + (3 << 28)), "21.8 GiB");
        assert_eq!(human(u64::MAX), "16384 PiB");
    }

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
