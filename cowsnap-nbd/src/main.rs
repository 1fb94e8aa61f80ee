//! `cowsnap-nbd`: the per-disk daemon. The command line is `cli.rs`; start-up, signals
//! and shutdown are `daemon.rs`.
use clap::Parser;

mod cli;
mod daemon;

fn main() {
    let args = cli::Args::parse();
    if let Err(e) = daemon::run(args) {
        // One line: `cowsnapctl attach` shows the last "error:" line as the reason.
        eprintln!(
            "cowsnap-nbd: error: {}",
            format!("{e:#}").replace('\n', " ")
        );
        std::process::exit(1);
    }
}
