//! `cowsnap-nbd`: the per-disk daemon. The command line is the library's `cli.rs` (so
//! `cowsnapctl man` renders its page from it); start-up, signals and shutdown are
//! `daemon.rs`.
mod daemon;

fn main() {
    let args = cowsnap_nbd::cli::parse();
    if let Err(e) = daemon::run(args) {
        // One line: `cowsnapctl attach` shows the last "error:" line as the reason.
        // In the journal, with the error priority.
        let prio = if cowsnap_nbd::logging::stderr_is_journal() {
            "<3>"
        } else {
            ""
        };
        eprintln!(
            "{prio}cowsnap-nbd: error: {}",
            format!("{e:#}").replace('\n', " ")
        );
        std::process::exit(1);
    }
}
