//! `cowsnap-nbd`: the per-disk daemon.
fn main() {
    eprintln!("cowsnap-nbd: not implemented yet");
    std::process::exit(1);
}
