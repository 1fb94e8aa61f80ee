//! A small foreground NBD server over one file or device, with the daemon's CLI subset:
//! `serve --name NAME --origin PATH --run-dir DIR [--read-only] [--io-engine auto|uring|sync]`.
//! Serves on the unix socket DIR/NAME.nbd with export names "NAME" and "" until SIGTERM
//! or SIGINT.

use anyhow::{Context, Result};
use clap::Parser;
use cowsnap_core::blockio::{self, OpenSpec};
use cowsnap_core::engine::{Engine, EngineConfig};
use cowsnap_nbd::nbd::server::Server;
use nix::sys::signal::{SigSet, Signal};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

#[derive(Parser)]
struct Args {
    /// Export name.
    #[arg(long)]
    name: String,
    /// File or block device to serve.
    #[arg(long)]
    origin: PathBuf,
    /// Directory for the socket.
    #[arg(long)]
    run_dir: PathBuf,
    /// Refuse writes.
    #[arg(long)]
    read_only: bool,
    /// I/O engine: auto, uring or sync.
    #[arg(long, default_value = "auto")]
    io_engine: String,
    /// Worker threads per connection.
    #[arg(long, default_value_t = cowsnap_nbd::nbd::server::DEFAULT_THREADS_PER_CONNECTION)]
    threads: usize,
}

fn main() -> Result<()> {
    // Block the signals first, before any thread starts, so only sigwait below sees
    // them (a SIGTERM during start-up then still ends the process cleanly).
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGTERM);
    sigs.add(Signal::SIGINT);
    sigs.thread_block().context("unable to block signals")?;
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let a = Args::parse();

    let mut spec = OpenSpec::origin(&a.origin);
    spec.read_only = a.read_only;
    spec.engine = a.io_engine.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let origin = blockio::open(&spec).map_err(|e| anyhow::anyhow!("{e}"))?;
    let engine_name = origin.engine_name();
    let engine = Engine::new(
        origin,
        EngineConfig {
            read_only: a.read_only,
            ..Default::default()
        },
        None,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;

    let server = Server::new();
    server.set_threads_per_connection(a.threads);
    let desc = format!("{}", a.origin.display());
    server.set_export(&a.name, engine.clone(), &desc);
    server.set_export("", engine, &desc);

    std::fs::create_dir_all(&a.run_dir)
        .with_context(|| format!("unable to create {}", a.run_dir.display()))?;
    let sock = a.run_dir.join(format!("{}.nbd", a.name));
    let _ = std::fs::remove_file(&sock);
    let l = UnixListener::bind(&sock)
        .with_context(|| format!("unable to listen on {}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    let acceptor = server.spawn_unix(l);
    log::info!(
        "serving {} as {:?} on {} (io engine {engine_name}{})",
        a.origin.display(),
        a.name,
        sock.display(),
        if a.read_only { ", read-only" } else { "" }
    );
    let sig = sigs.wait().context("unable to wait for a signal")?;
    log::info!("{sig:?}: shutting down");
    server.shutdown();
    let _ = acceptor.join();
    if !server.wait_idle(std::time::Duration::from_secs(5)) {
        log::warn!(
            "{} connection(s) still open; exiting anyway",
            server.connections()
        );
    }
    let _ = std::fs::remove_file(&sock);
    Ok(())
}
