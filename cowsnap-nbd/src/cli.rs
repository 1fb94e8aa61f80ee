//! The command line of the `cowsnap-nbd` daemon and the checks on it that need no file: every
//! path made absolute, the chunk size, the default container, the NBD limits, the
//! `--listen` addresses.

use crate::nbd::limits::Limits;
use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};

/// Command line of `cowsnap-nbd`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "cowsnap-nbd",
    version,
    about = "Serve one disk over NBD through the cowsnap engine (runs in the foreground)"
)]
pub struct Args {
    /// Disk name: export name and socket file names.
    #[arg(long)]
    pub name: String,
    /// Block device or regular file to serve.
    #[arg(long, required_unless_present = "generation")]
    pub origin: Option<PathBuf>,
    /// Serve this repository generation read-only instead of an origin
    /// (`repo:DIR@GENERATION`): chunks are read on demand and verified, the generation
    /// is pinned while it is served, no state is written. Implies --read-only.
    #[arg(long, value_name = "repo:DIR@GEN", conflicts_with_all = ["origin", "restore_from", "container"])]
    pub generation: Option<String>,
    /// With --generation: memory for decompressed chunks kept for reuse (e.g. 64M).
    #[arg(long, default_value = "64M", value_name = "SIZE")]
    pub cache_size: String,
    /// Directory for sockets and the pid file.
    #[arg(long, env = crate::paths::ENV_RUN_DIR, default_value = crate::paths::DEFAULT_RUN_DIR)]
    pub run_dir: PathBuf,
    /// Directory for the change log.
    #[arg(long, env = crate::paths::ENV_STATE_DIR, default_value = crate::paths::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Refuse writes (no change log is kept).
    #[arg(long)]
    pub read_only: bool,
    /// I/O engine for the origin.
    #[arg(long, default_value = "auto", value_parser = ["auto", "uring", "sync"])]
    pub io_engine: String,
    /// Bypass the page cache (O_DIRECT) for a backup's bulk I/O on block devices: the
    /// drainer's reads of the origin and `dev:` targets. A file origin is always read
    /// and written through the page cache.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub direct_io: String,
    /// Also listen on TCP (e.g. tcp:127.0.0.1:10809). Repeatable. Needs --tls-creds
    /// (or --insecure-tcp).
    #[arg(long = "listen", value_name = "tcp:ADDR:PORT")]
    pub listen: Vec<String>,
    /// Require TLS on the TCP listeners, with the X.509 credentials in DIR:
    /// server-cert.pem, server-key.pem and (for --tls-verify-peer) ca-cert.pem, as for
    /// qemu-nbd and nbdkit. Clients connect with nbds://. The unix socket stays plain.
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// With --tls-creds: require a client certificate signed by DIR/ca-cert.pem.
    #[arg(long, requires = "tls_creds")]
    pub tls_verify_peer: bool,
    /// Serve --listen TCP addresses in the clear, without TLS: anyone who reaches the
    /// port can read and write the disk.
    #[arg(long, conflicts_with = "tls_creds")]
    pub insecure_tcp: bool,
    /// Tracking chunk size in bytes (power of two, >= 4096).
    #[arg(long, default_value_t = 65536)]
    pub chunk_size: u32,
    /// Default container for backups (ram:SIZE, file:PATH:SIZE, dev:PATH).
    #[arg(long)]
    pub container: Option<String>,
    /// Also write the log to this file.
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// Live restore: the origin is filled from this repository generation
    /// (`repo:DIR@GENERATION`) while it is served. On a later start the fill resumes
    /// from the disk's state directory without this flag.
    #[arg(long, value_name = "repo:DIR@GEN")]
    pub restore_from: Option<String>,
    /// The key file of the encrypted repository of --generation or --restore-from (its
    /// path: the key itself is never on a command line).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// NBD connections open at once; further ones are closed at once (and logged).
    #[arg(long, default_value_t = crate::nbd::limits::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Memory for NBD request payloads across all connections (e.g. 128M, at least 32M);
    /// a connection uses at most 64M of it.
    #[arg(long, default_value = "128M")]
    pub request_memory: String,
    /// Also serve the disk as the file DIR/disk through the daemon's own FUSE server
    /// (mounted at start, unmounted at shutdown; `cowsnapctl attach --via fuse` puts a
    /// loop device on it).
    #[arg(long, value_name = "DIR")]
    pub fuse_mount: Option<PathBuf>,
    /// With --fuse-mount: FUSE worker threads (requests served at once; 1 to 32).
    #[arg(
        long,
        default_value_t = crate::fuse::DEFAULT_THREADS,
        value_name = "N",
        env = "COWSNAP_FUSE_THREADS"
    )]
    pub fuse_threads: usize,
    /// With --fuse-mount: serve FUSE over io_uring (auto: when the kernel offers it,
    /// /sys/module/fuse/parameters/enable_uring = Y; on: refuse to start otherwise;
    /// off: plain /dev/fuse). `cowsnapctl attach --via fuse` passes it on through the
    /// environment.
    #[arg(
        long,
        value_enum,
        default_value = "auto",
        value_name = "MODE",
        env = "COWSNAP_FUSE_URING"
    )]
    pub fuse_uring: crate::fuse::UringMode,
    /// Also serve the disk as the block device /dev/ublkbN through the daemon's own ublk
    /// server (needs the ublk_drv module; the id N is written to RUN_DIR/NAME.ublk).
    #[arg(long)]
    pub ublk: bool,
    /// With --ublk: queues, one thread each (1 to 16).
    #[arg(long, default_value_t = crate::ublk::DEFAULT_QUEUES, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=crate::ublk::MAX_QUEUES as i64))]
    pub ublk_queues: u16,
    /// With --ublk: requests in flight per queue (1 to 128; each has a 512 KiB buffer).
    #[arg(long, default_value_t = crate::ublk::DEFAULT_DEPTH, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=crate::ublk::MAX_DEPTH as i64))]
    pub ublk_depth: u16,
    /// With --ublk: helper threads per queue that serve requests of 128 KiB and more
    /// while others wait (0 to 8; 0: every request on the queue's own thread).
    #[arg(long, default_value_t = crate::ublk::queue::HELPERS, value_name = "N",
          env = "COWSNAP_UBLK_HELPERS",
          value_parser = clap::value_parser!(u8).range(0..=crate::ublk::MAX_HELPERS as i64))]
    pub ublk_helpers: u8,
    /// An open descriptor of `RUN_DIR/NAME.lock` that the starting process has already
    /// locked (`cowsnapctl attach`); the daemon keeps it for its life.
    #[arg(long, hide = true)]
    pub lock_fd: Option<i32>,
}

/// What `--version` prints after the version: the format versions this build writes
/// and reads ([`cowsnap_core::formats`]) and the control protocol it speaks. Shared by
/// `cowsnap-nbd` and `cowsnapctl` (they come from one build).
pub fn long_version() -> String {
    format!(
        "{}\n{}\ncontrol protocol: {}",
        env!("CARGO_PKG_VERSION"),
        cowsnap_core::formats::describe(),
        crate::control::wire::VERSION
    )
}

/// The daemon's command line as a [`clap::Command`] (for parsing and for its manual
/// page), `--version` showing [`long_version`].
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    Args::command().long_version(long_version())
}

/// Parse the process's arguments (exits 2 on a usage error, 0 after --help/--version).
pub fn parse() -> Args {
    use clap::FromArgMatches;
    Args::from_arg_matches(&command().get_matches()).unwrap_or_else(|e| e.exit())
}

/// Every path argument made absolute against the caller's working directory, before
/// the daemon changes to `/`.
pub fn absolute_args(mut a: Args) -> Result<Args> {
    let abs = |p: &Path| {
        std::path::absolute(p).with_context(|| format!("unable to resolve {}", p.display()))
    };
    if let Some(o) = &a.origin {
        a.origin = Some(abs(o)?);
    }
    if let Some(g) = &a.generation {
        let (dir, gen) = crate::paths::parse_repo_spec(g).context("invalid --generation")?;
        let dir = match cowsnap_core::repo::object::is_s3(&dir) {
            true => dir,
            false => abs(&dir)?,
        };
        a.generation = Some(match gen {
            Some(g) => format!("repo:{}@{g}", dir.display()),
            None => format!("repo:{}", dir.display()),
        });
        a.read_only = true;
    }
    a.run_dir = abs(&a.run_dir)?;
    a.state_dir = abs(&a.state_dir)?;
    if let Some(l) = &a.log_file {
        a.log_file = Some(abs(l)?);
    }
    if let Some(f) = &a.fuse_mount {
        a.fuse_mount = Some(abs(f)?);
    }
    if let Some(t) = &a.tls_creds {
        a.tls_creds = Some(abs(t)?);
    }
    if let Some(c) = &a.container {
        a.container = Some(
            crate::paths::absolute_container(c)
                .with_context(|| format!("unable to resolve --container {c:?}"))?,
        );
    }
    if let Some(r) = &a.restore_from {
        let (dir, gen) = restore_source(r)?;
        // an object store's URL is no path
        let dir = match cowsnap_core::repo::object::is_s3(&dir) {
            true => dir,
            false => abs(&dir)?,
        };
        a.restore_from = Some(match gen {
            Some(g) => format!("repo:{}@{g}", dir.display()),
            None => format!("repo:{}", dir.display()),
        });
    }
    Ok(a)
}

/// `--restore-from repo:DIR[@GEN]` → (DIR, GEN).
pub fn restore_source(spec: &str) -> Result<(PathBuf, Option<String>)> {
    crate::paths::parse_repo_spec(spec).context("invalid --restore-from")
}

/// Parse a `--listen` value: `tcp:HOST:PORT`.
pub fn parse_listen(spec: &str) -> Result<std::net::SocketAddr> {
    let rest = spec
        .strip_prefix("tcp:")
        .ok_or_else(|| anyhow!("invalid --listen {spec:?}: expected tcp:ADDR:PORT"))?;
    rest.to_socket_addrs()
        .with_context(|| format!("invalid --listen {spec:?}: expected tcp:ADDR:PORT"))?
        .next()
        .ok_or_else(|| anyhow!("invalid --listen {spec:?}: address resolves to nothing"))
}

/// Check the TCP and TLS flags together: TCP needs `--tls-creds` or `--insecure-tcp`,
/// and the TLS flags need a TCP listener (the unix socket is never TLS).
pub fn check_tcp_security(
    listen: &[String],
    tls_creds: Option<&Path>,
    verify_peer: bool,
    insecure: bool,
) -> Result<()> {
    if verify_peer && tls_creds.is_none() {
        bail!("invalid --tls-verify-peer: it needs --tls-creds DIR");
    }
    if tls_creds.is_some() && insecure {
        bail!("invalid --insecure-tcp: --tls-creds is given (TLS is required with it)");
    }
    if listen.is_empty() {
        if let Some(d) = tls_creds {
            bail!(
                "invalid --tls-creds {}: TLS is for TCP listeners; give --listen tcp:ADDR:PORT \
                 (the unix socket is always plain)",
                d.display()
            );
        }
        if insecure {
            bail!("invalid --insecure-tcp: no --listen tcp:ADDR:PORT is given");
        }
        return Ok(());
    }
    if tls_creds.is_none() && !insecure {
        bail!(
            "unable to listen on {}: NBD over TCP needs TLS: give --tls-creds DIR (with \
             server-cert.pem and server-key.pem), or --insecure-tcp to serve the disk in the \
             clear to anyone who reaches the port",
            listen.join(", ")
        );
    }
    Ok(())
}

/// The TLS credentials of the TCP listeners, read and checked (None without
/// `--tls-creds`).
pub fn tls_config(args: &Args) -> Result<Option<crate::nbd::tls::TlsConfig>> {
    check_tcp_security(
        &args.listen,
        args.tls_creds.as_deref(),
        args.tls_verify_peer,
        args.insecure_tcp,
    )?;
    args.tls_creds
        .as_deref()
        .map(|d| crate::nbd::tls::load(d, args.tls_verify_peer))
        .transpose()
}

/// `--cache-size` in bytes (at least 1 MiB, at most 16 GiB).
pub fn cache_bytes(args: &Args) -> Result<u64> {
    let n = cowsnap_core::container::parse_size(&args.cache_size)
        .map_err(|e| anyhow!("invalid --cache-size: {e}"))?;
    if !(1 << 20..=16 << 30).contains(&n) {
        bail!("invalid --cache-size {}: 1M to 16G", args.cache_size);
    }
    Ok(n)
}

/// Check the flags that every later backup depends on, before anything is touched.
pub fn check_args(args: &Args) -> Result<()> {
    cache_bytes(args)?;
    if !(1..=crate::fuse::MAX_THREADS).contains(&args.fuse_threads) {
        bail!(
            "invalid --fuse-threads {}: 1 to {}",
            args.fuse_threads,
            crate::fuse::MAX_THREADS
        );
    }
    if args.ublk {
        crate::attach::check_ublk()?;
    }
    cowsnap_core::engine::check_chunk_size(u64::from(args.chunk_size))?;
    if let Some(c) = &args.container {
        cowsnap_core::container::check_default(c, args.chunk_size)?;
    }
    Ok(())
}

/// The NBD server's limits from the flags.
pub fn nbd_limits(args: &Args) -> Result<Limits> {
    let d = Limits::default();
    if args.max_connections == 0 {
        bail!("invalid --max-connections 0: at least one connection is needed");
    }
    let mem = cowsnap_core::container::parse_size(&args.request_memory)
        .map_err(|e| anyhow!("invalid --request-memory: {e}"))?;
    let min = crate::nbd::proto::MAX_PAYLOAD as u64;
    if mem < min {
        bail!(
            "invalid --request-memory {}: at least {} MiB (one request of the largest size)",
            args.request_memory,
            min >> 20
        );
    }
    let mem = usize::try_from(mem).unwrap_or(usize::MAX);
    Ok(Limits {
        max_connections: args.max_connections,
        memory: mem,
        connection_memory: d.connection_memory.min(mem),
        ..d
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_specs() {
        assert_eq!(
            parse_listen("tcp:127.0.0.1:10809").unwrap().to_string(),
            "127.0.0.1:10809"
        );
        assert_eq!(
            parse_listen("tcp:[::1]:10").unwrap().to_string(),
            "[::1]:10"
        );
        assert!(parse_listen("127.0.0.1:10809").is_err());
        assert!(parse_listen("tcp:127.0.0.1").is_err());
        assert!(parse_listen("unix:/x").is_err());
    }
    #[test]
    fn tcp_needs_tls_or_insecure() {
        let l = vec!["tcp:127.0.0.1:10809".to_string()];
        let d = Path::new("/etc/cowsnap/tls");
        let err = |r: Result<()>| format!("{:#}", r.unwrap_err());
        assert!(err(check_tcp_security(&l, None, false, false)).contains("needs TLS"));
        assert!(check_tcp_security(&l, None, false, true).is_ok());
        assert!(check_tcp_security(&l, Some(d), false, false).is_ok());
        assert!(check_tcp_security(&l, Some(d), true, false).is_ok());
        assert!(err(check_tcp_security(&l, None, true, true)).contains("--tls-verify-peer"));
        assert!(err(check_tcp_security(&l, Some(d), false, true)).contains("--insecure-tcp"));
        assert!(err(check_tcp_security(&[], Some(d), false, false)).contains("TCP listeners"));
        assert!(err(check_tcp_security(&[], None, false, true)).contains("no --listen"));
        assert!(check_tcp_security(&[], None, false, false).is_ok());
        // clap knows the pairs too.
        assert!(Args::try_parse_from([
            "cowsnap-nbd",
            "--name",
            "d",
            "--origin",
            "/x",
            "--tls-verify-peer"
        ])
        .is_err());
        assert!(Args::try_parse_from([
            "cowsnap-nbd",
            "--name",
            "d",
            "--origin",
            "/x",
            "--tls-creds",
            "/t",
            "--insecure-tcp"
        ])
        .is_err());
    }
    #[test]
    fn restore_source_is_made_absolute() {
        let a = Args::parse_from([
            "cowsnap-nbd",
            "--name",
            "d",
            "--origin",
            "/x",
            "--restore-from",
            "repo:rel@G1",
        ]);
        let a = absolute_args(a).unwrap();
        let want = std::path::absolute("rel").unwrap();
        assert_eq!(
            a.restore_from.unwrap(),
            format!("repo:{}@G1", want.display())
        );
        assert!(restore_source("nope").is_err());
    }
    #[test]
    fn generation_replaces_origin_and_implies_read_only() {
        let a = Args::try_parse_from(["cowsnap-nbd", "--name", "d", "--generation", "repo:rel@G1"])
            .unwrap();
        let a = absolute_args(a).unwrap();
        let want = std::path::absolute("rel").unwrap();
        assert_eq!(a.generation.unwrap(), format!("repo:{}@G1", want.display()));
        assert!(a.read_only && a.origin.is_none());
        assert!(Args::try_parse_from(["cowsnap-nbd", "--name", "d"]).is_err());
        assert!(Args::try_parse_from([
            "cowsnap-nbd",
            "--name",
            "d",
            "--origin",
            "/x",
            "--generation",
            "repo:/r@G"
        ])
        .is_err());
        let mut a = Args::try_parse_from(["cowsnap-nbd", "--name", "d", "--origin", "/x"]).unwrap();
        assert_eq!(cache_bytes(&a).unwrap(), 64 << 20);
        a.cache_size = "4K".into();
        assert!(cache_bytes(&a).is_err());
    }
}
