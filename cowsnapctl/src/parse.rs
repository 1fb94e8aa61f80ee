//! Parsing of sizes ("64M"), durations ("3s", "500ms"), priority ranges and target
//! specs given on the command line, and human-readable formatting.

use anyhow::{anyhow, bail, Result};
use std::time::Duration;

/// A size ("64M" = 64 MiB, P = 2^50): [`cowsnap_core::container::parse_size`].
pub fn parse_size(s: &str) -> Result<u64> {
    Ok(cowsnap_core::container::parse_size(s)?)
}

/// A duration: jiff's friendly format ("3s", "500ms", "2m", "1h 30m", "1.5s"); a bare
/// number is seconds. Negative and absurd (over ~31 years) durations are refused.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let t = s.trim();
    let bad = || anyhow!("invalid duration {s:?}: expected e.g. 3s, 500ms, 2m, 1h 30m");
    let d = if !t.is_empty() && t.chars().all(|c| c.is_ascii_digit()) {
        Duration::from_secs(t.parse().map_err(|_| bad())?)
    } else {
        let sd: jiff::SignedDuration = t.parse().map_err(|_| bad())?;
        Duration::try_from(sd).map_err(|_| bad())?
    };
    if d > Duration::from_secs(1_000_000_000) {
        return Err(bad());
    }
    Ok(d)
}

/// Priority ranges: "OFFSET:LENGTH,..." with sizes ("0:64M,1G:16M").
pub fn parse_ranges(s: &str) -> Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (o, l) = part
            .split_once(':')
            .ok_or_else(|| anyhow!("invalid range {part:?}: expected OFFSET:LENGTH"))?;
        let (o, l) = (parse_size(o)?, parse_size(l)?);
        if l == 0 {
            bail!("invalid range {part:?}: length is zero");
        }
        o.checked_add(l)
            .ok_or_else(|| anyhow!("invalid range {part:?}: overflows"))?;
        out.push((o, l));
    }
    if out.is_empty() {
        bail!("invalid ranges {s:?}: expected OFFSET:LENGTH[,OFFSET:LENGTH...]");
    }
    Ok(out)
}

/// Check a backup target spec: `file:PATH`, `dev:PATH`, `repo:DIR` or
/// `repo:s3://BUCKET[/PREFIX]`.
pub fn check_target(s: &str) -> Result<()> {
    match s.split_once(':') {
        Some(("repo", p)) if p.starts_with(cowsnap_core::repo::object::SCHEME) => {
            cowsnap_core::repo::object::parse_url(p)?;
            Ok(())
        }
        Some(("file" | "dev" | "repo", p)) if !p.is_empty() => Ok(()),
        _ => bail!(
            "invalid target {s:?}: expected file:PATH, dev:PATH, repo:DIR or repo:s3://BUCKET[/PREFIX]"
        ),
    }
}

/// A target spec with its path made absolute against this process's working directory:
/// the daemon resolves paths against its own (the directory `attach` ran in).
pub fn absolute_target(s: &str) -> Result<String> {
    check_target(s)?;
    let (kind, p) = s
        .split_once(':')
        .ok_or_else(|| anyhow!("invalid target {s:?}"))?;
    if cowsnap_core::repo::object::is_s3(std::path::Path::new(p)) {
        return Ok(s.to_string());
    }
    let abs = std::path::absolute(p)
        .map_err(|e| anyhow!("unable to resolve the target path {p:?}: {e}"))?;
    Ok(format!("{kind}:{}", abs.display()))
}

/// A `--container` spec with its path made absolute (the daemon works in `/`).
pub fn absolute_container(c: Option<&str>) -> Result<Option<String>> {
    c.map(|c| {
        cowsnap_nbd::paths::absolute_container(c)
            .map_err(|e| anyhow!("unable to resolve --container {c:?}: {e}"))
    })
    .transpose()
}

/// "1.5 GiB": [`cowsnap_core::bytes::human`], the one size formatter.
pub use cowsnap_core::bytes::human as human_bytes;

/// "1h02m", "3m05s", "12s".
pub fn human_secs(s: u64) -> String {
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("64m").unwrap(), 64 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("8K").unwrap(), 8192);
        assert_eq!(parse_size("16T").unwrap(), 16 << 40);
        assert_eq!(parse_size("2P").unwrap(), 2 << 50);
        assert_eq!(parse_size(" 3 MiB ").unwrap(), 3 << 20);
        for bad in [
            "",
            "M",
            "1X",
            "-1",
            "1.5G",
            "99999999999P",
            "18446744073709551616",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("3s").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("80").unwrap(), Duration::from_secs(80));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("2min").unwrap(), Duration::from_secs(120));
        for bad in [
            "",
            "s",
            "3x",
            "-1s",
            "1..2s",
            "3parsecs",
            "99999999999999999999",
            "40y",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(
            parse_ranges("0:64M,1G:4096").unwrap(),
            vec![(0, 64 << 20), (1 << 30, 4096)]
        );
        assert_eq!(parse_ranges(" 10:20 ").unwrap(), vec![(10, 20)]);
        for bad in ["", "10", "10:0", "a:b", "18446744073709551615:2"] {
            assert!(parse_ranges(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn targets() {
        assert!(check_target("file:/tmp/x.img").is_ok());
        assert!(check_target("dev:/dev/sdc").is_ok());
        assert!(check_target("repo:/srv/backups").is_ok());
        assert_eq!(absolute_target("repo:/srv/b").unwrap(), "repo:/srv/b");
        assert_eq!(
            absolute_target("repo:s3://bkt/p").unwrap(),
            "repo:s3://bkt/p"
        );
        assert!(check_target("repo:s3://UPPER/p").is_err());
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            absolute_target("file:x/y.img").unwrap(),
            format!("file:{}", cwd.join("x/y.img").display())
        );
        assert!(absolute_target("nope:x").is_err());
        for bad in ["/tmp/x", "file:", "nbd:x", ""] {
            assert!(check_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn human() {
        assert_eq!(human_bytes(512), "512 bytes");
        assert_eq!(human_bytes(1 << 30), "1 GiB");
        assert_eq!(human_secs(5), "5s");
        assert_eq!(human_secs(185), "3m05s");
        assert_eq!(human_secs(3720), "1h02m");
    }
}
