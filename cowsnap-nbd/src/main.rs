//! `cowsnap-nbd`: the per-disk daemon. See `daemon.rs`.
use clap::Parser;

mod daemon;

fn main() {
    let args = daemon::Args::parse();
    if let Err(e) = daemon::run(args) {
        eprintln!("cowsnap-nbd: {e:#}");
        std::process::exit(1);
    }
}
