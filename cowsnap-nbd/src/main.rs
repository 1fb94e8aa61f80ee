//! `cowsnap-nbd`: the per-disk daemon. See `daemon.rs`.
use clap::Parser;

mod daemon;

fn main() {
    let args = daemon::Args::parse();
    if let Err(e) = daemon::run(args) {
        // One line: `cowsnapctl attach` shows the last "error:" line as the reason.
        eprintln!(
            "cowsnap-nbd: error: {}",
            format!("{e:#}").replace('\n', " ")
        );
        std::process::exit(1);
    }
}
