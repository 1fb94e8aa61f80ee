//! `cowsnapctl metrics`: a Prometheus exporter for every disk attached in the run
//! directory (one per host) and the repositories named with `--repo`.
//!
//! - `collect.rs`: asking the daemons (bounded in time) and scanning repositories (in
//!   the background, cached).
//! - `exposition.rs`: the sample encoded in the Prometheus text format with the
//!   `prometheus-client` crate.
//! - `http.rs`: `GET /metrics` over HTTP, bounded in threads and connections.

mod collect;
mod exposition;
mod http;

use crate::parse::parse_duration;
use crate::Dirs;
use anyhow::{bail, Context, Result};
use collect::RepoScanner;
use cowsnap_nbd::paths::parse_repo_spec;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The most `--repo` flags (each has a scanner thread).
const MAX_REPOS: usize = 64;

/// Arguments of `metrics`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("mode").required(true).args(["listen", "once"])))]
pub struct MetricsArgs {
    /// Serve GET /metrics on this address (e.g. 127.0.0.1:9640).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// Print one exposition to stdout and exit.
    #[arg(long)]
    pub once: bool,
    /// Also report this repository (repo:DIR; repeatable).
    #[arg(long = "repo", value_name = "repo:DIR", value_parser = repo_dir)]
    pub repos: Vec<PathBuf>,
    /// Give each disk's daemon this long to answer a scrape (a slower one is
    /// cowsnap_up 0).
    #[arg(long, default_value = "2s", value_parser = timeout)]
    pub daemon_timeout: Duration,
    /// Rescan each repository this often (a scrape shows the last scan).
    #[arg(long, default_value = "5m", value_parser = refresh)]
    pub repo_refresh: Duration,
}

fn repo_dir(s: &str) -> Result<PathBuf> {
    let (dir, gen) = parse_repo_spec(s)?;
    if gen.is_some() {
        bail!("--repo takes repo:DIR without @GEN");
    }
    std::path::absolute(&dir).with_context(|| format!("unable to resolve {}", dir.display()))
}

fn timeout(s: &str) -> Result<Duration> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(10) || d > Duration::from_secs(60) {
        bail!("the daemon timeout must be from 10ms to 60s");
    }
    Ok(d)
}

fn refresh(s: &str) -> Result<Duration> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(1) || d > Duration::from_secs(7 * 86400) {
        bail!("the repository refresh interval must be from 1s to 7 days");
    }
    Ok(d)
}

/// `cowsnapctl metrics`.
pub fn run(dirs: &Dirs, a: MetricsArgs) -> Result<i32> {
    if a.repos.len() > MAX_REPOS {
        bail!("at most {MAX_REPOS} --repo flags");
    }
    let scanners: Vec<Arc<RepoScanner>> = a.repos.iter().cloned().map(RepoScanner::new).collect();
    let timeout = a.daemon_timeout;
    if a.once {
        for s in &scanners {
            s.scan();
        }
        print!("{}", collect::sample(dirs, &scanners, timeout).encode());
        return Ok(0);
    }
    let Some(addr) = a.listen else {
        bail!("give --listen ADDR:PORT or --once");
    };
    let listener =
        TcpListener::bind(addr).with_context(|| format!("unable to listen on {addr}"))?;
    for s in &scanners {
        s.spawn(a.repo_refresh)
            .context("unable to start a repository scanner thread")?;
    }
    eprintln!("cowsnapctl: serving metrics on http://{addr}/metrics");
    let dirs = dirs.clone();
    http::serve(
        listener,
        Arc::new(move || collect::sample(&dirs, &scanners, timeout).encode()),
    )
    .context("unable to serve metrics")?;
    Ok(0)
}

#[cfg(test)]
mod tests;
