//! `/proc/self/mountinfo`, read one way for every mount check: the destination check
//! (mounted block devices), `detach` (is the device or a partition mounted), the FUSE
//! attach path (is the mount point mounted) and `backup --freeze` (which mount is at
//! this path).
//!
//! A line is `ID PARENT MAJOR:MINOR ROOT MOUNT_POINT OPTIONS [TAGS...] - FSTYPE SOURCE
//! SUPER_OPTIONS`; paths have space, tab, newline and backslash escaped as octal
//! (`\040`). Lines that do not parse are skipped.

use crate::error::{IoContext, Result};

/// One mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// "major:minor" of the mounted filesystem.
    pub dev: String,
    /// Where it is mounted (unescaped).
    pub mount_point: String,
    /// The mount source (e.g. `/dev/loop3`, unescaped); empty when the line has none.
    pub source: String,
}

impl MountEntry {
    /// The device number, for mounts of a block device (major 0 is tmpfs, FUSE,
    /// overlay, btrfs subvolumes: no block device).
    pub fn block_rdev(&self) -> Option<u64> {
        let (ma, mi) = self.dev.split_once(':')?;
        let (ma, mi) = (ma.parse::<u32>().ok()?, mi.parse::<u32>().ok()?);
        (ma != 0).then(|| libc::makedev(ma, mi))
    }
}

/// Parse mountinfo text.
pub fn parse(text: &str) -> Vec<MountEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() < 5 {
            continue;
        }
        let source = f
            .iter()
            .position(|x| *x == "-")
            .and_then(|i| f.get(i + 2))
            .map(|s| unescape_octal(s))
            .unwrap_or_default();
        out.push(MountEntry {
            dev: f[2].to_string(),
            mount_point: unescape_octal(f[4]),
            source,
        });
    }
    out
}

/// This process's mounts.
pub fn read() -> Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .ctx(|| "unable to read /proc/self/mountinfo".to_string())?;
    Ok(parse(&text))
}

/// Decode the octal escapes of /proc files (`\040` = space): mountinfo, swaps.
pub fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |a, &c| a * 8 + u32::from(c - b'0'));
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MI: &str = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
95 22 7:3 / /mnt/my\\040disk rw,relatime shared:50 - ext4 /dev/loop3 rw
30 22 0:26 / /tmp rw - tmpfs tmpfs rw
garbage
";

    #[test]
    fn parses_and_unescapes() {
        let m = parse(MI);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].dev, "7:3");
        assert_eq!(m[1].mount_point, "/mnt/my disk");
        assert_eq!(m[1].source, "/dev/loop3");
        assert_eq!(m[1].block_rdev(), Some(libc::makedev(7, 3)));
        assert_eq!(m[2].block_rdev(), None);
        assert!(parse("1 2 3 4").is_empty());
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape_octal("/a\\040b\\011c"), "/a b\tc");
        assert_eq!(unescape_octal("/a\\x"), "/a\\x");
        assert_eq!(unescape_octal("/a\\04"), "/a\\04");
        assert_eq!(unescape_octal("\\134"), "\\");
        assert_eq!(unescape_octal("\\777"), "\\777");
    }
}
