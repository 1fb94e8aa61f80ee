//! `cowsnapctl`: attach a disk behind its cowsnap daemon, detach it, show status, back
//! it up. Talks to each disk's daemon over its control socket (JSON lines).

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use cowsnap_nbd::paths;
use std::path::PathBuf;

mod attach;
mod backup;
mod backup_args;
mod completions;
mod config;
mod detach;
mod devlink;
mod diff;
mod export;
mod freeze;
mod group;
mod hooks;
mod key;
mod man;
mod metrics;
mod mount_record;
mod parse;
mod progress;
mod repo;
mod restart;
mod signals;
mod snapshot;
mod status;
mod up;

/// Directories shared by every command.
#[derive(Debug, Clone, clap::Args)]
pub struct Dirs {
    /// Directory of sockets, pid files and attach records.
    #[arg(long, global = true, env = paths::ENV_RUN_DIR, default_value = paths::DEFAULT_RUN_DIR)]
    pub run_dir: PathBuf,
    /// Directory of change logs and daemon logs.
    #[arg(long, global = true, env = paths::ENV_STATE_DIR, default_value = paths::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

impl Dirs {
    /// Both directories made absolute: they are handed to the daemon, which works in `/`.
    fn absolute(self) -> Result<Dirs> {
        let abs = |p: PathBuf| {
            std::path::absolute(&p)
                .map_err(|e| anyhow::anyhow!("unable to resolve {}: {e}", p.display()))
        };
        Ok(Dirs {
            run_dir: abs(self.run_dir)?,
            state_dir: abs(self.state_dir)?,
        })
    }

    /// The files of disk `name`.
    pub fn paths(&self, name: &str) -> paths::DiskPaths {
        paths::DiskPaths::new(name, &self.run_dir, &self.state_dir)
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "cowsnapctl",
    version,
    about = "Online, consistent, block-level backup of live disks",
    long_about = "Online, consistent, block-level backup of live disks.\n\n\
        `cowsnapctl attach /dev/sdb` serves the disk through its own cowsnap-nbd daemon and \
        gives back a block device to mount instead; `cowsnapctl backup` copies a \
        point-in-time image while the disk stays in use."
)]
struct Cli {
    #[command(flatten)]
    dirs: Dirs,
    /// The key file of an encrypted repository (`cowsnapctl key create`): needed by
    /// every command that opens one; a backup that creates a repository with it
    /// encrypts it. Refused by an unencrypted repository.
    #[arg(long, global = true, alias = "encrypt", value_name = "FILE", env = key::ENV_KEY_FILE)]
    key: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve a disk (block device or file) and attach it as a block device.
    Attach(attach::AttachArgs),
    /// Detach a disk: flush, remove the device, stop its daemon.
    Detach(detach::DetachArgs),
    /// Replace a disk's daemon (e.g. after an upgrade) without taking its device away.
    Restart(restart::RestartArgs),
    /// Show attached disks.
    Status(status::StatusArgs),
    /// Back up an attached disk while it stays in use.
    Backup(backup::BackupArgs),
    /// Take a snapshot and serve it read-only over NBD (pull mode); prints its URI.
    Snapshot(snapshot::SnapshotArgs),
    /// End a `snapshot`: remove its export; --commit records the instant for the next
    /// snapshot's dirty bitmap.
    Release(snapshot::ReleaseArgs),
    /// List the restore points (generations and consistency groups) of a repository.
    List(repo::ListArgs),
    /// Re-hash every chunk the repository's generations reference (--repair: heal).
    Verify(repo::VerifyArgs),
    /// Delete old generations and the chunks no kept generation references.
    Prune(repo::PruneArgs),
    /// Restore a generation, or every disk of a consistency group, to files or devices
    /// (on the fly with --live).
    Restore(repo::RestoreArgs),
    /// Give up an interrupted live restore: its generation is no longer pinned.
    Abandon(repo::AbandonArgs),
    /// Serve a restore point read-only over NBD (fetched on demand), as a device or URI.
    Export(export::ExportArgs),
    /// Mount a restore point read-only (export, device, partition, mount) to copy files.
    Mount(export::MountArgs),
    /// Undo a `mount`: unmount, remove its devices and stop its export.
    Umount(export::UmountArgs),
    /// What changed between two restore points: byte ranges, or files with --files.
    #[command(long_about = diff::LONG_ABOUT)]
    Diff(diff::DiffArgs),
    /// Export Prometheus metrics of every attached disk (and --repo repositories).
    Metrics(metrics::MetricsArgs),
    /// Attach the disks of the configuration file that are not attached.
    Up(up::UpArgs),
    /// Detach the disks of the configuration file (a running backup is cancelled, a
    /// mounted device refused).
    Down(up::DownArgs),
    /// Check the configuration file and show the disks it configures.
    Config(up::ConfigCheckArgs),
    /// systemd generator: the backup timers' schedules from the configuration file.
    #[command(hide = true)]
    SystemdGenerator(up::GeneratorArgs),
    /// For the udev rule: the /dev/cowsnap link name of a kernel device.
    #[command(hide = true)]
    UdevName(devlink::UdevNameArgs),
    /// Repository keys: `key create FILE` makes a new one.
    #[command(subcommand)]
    Key(key::KeyCmd),
    /// Write the manual pages (cowsnapctl.1, one per subcommand, cowsnap-nbd.8).
    Man(man::ManArgs),
    /// Print a shell completion script (bash, zsh, fish, ...) to stdout.
    Completions(completions::CompletionsArgs),
}

/// The command line as a [`clap::Command`]: for parsing, the manual pages and the
/// completions alike. `--version` also shows the format versions this build writes and
/// reads.
pub fn command() -> clap::Command {
    Cli::command().long_version(cowsnap_nbd::cli::long_version())
}

fn main() {
    // Logs go to stderr (the journal's format when stderr is the journal).
    if let Err(e) = cowsnap_nbd::logging::init("warn", None) {
        eprintln!("cowsnapctl: {e}");
    }
    // A usage error exits 2 (clap), --help and --version 0.
    let mut cli = Cli::from_arg_matches(&command().get_matches()).unwrap_or_else(|e| e.exit());
    cli.dirs = match cli.dirs.absolute() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cowsnapctl: {e:#}");
            std::process::exit(1);
        }
    };
    // Object-store repositories cache their indexes under the state directory.
    cowsnap_core::repo::cache::set_state_dir(&cli.dirs.state_dir);
    // Commands that open repositories use the key (read now: a bad key file fails
    // before anything is done); the others ignore it.
    let uses_key = !matches!(
        cli.cmd,
        Cmd::Key(_)
            | Cmd::Man(_)
            | Cmd::Completions(_)
            | Cmd::Status(_)
            | Cmd::Detach(_)
            | Cmd::UdevName(_)
            | Cmd::SystemdGenerator(_)
            | Cmd::Config(_)
    );
    if uses_key {
        if let Err(e) = key::init(cli.key.as_deref()) {
            progress::error_result(&format!("{e:#}"));
            eprintln!("cowsnapctl: {e:#}");
            std::process::exit(1);
        }
    }
    let r: Result<i32> = match cli.cmd {
        Cmd::Attach(a) => attach::run(&cli.dirs, a).map(|_| 0),
        Cmd::Detach(a) => detach::run(&cli.dirs, a).map(|_| 0),
        Cmd::Restart(a) => restart::run(&cli.dirs, a).map(|_| 0),
        Cmd::Status(a) => status::run(&cli.dirs, a),
        Cmd::Backup(a) => backup::run(&cli.dirs, a),
        Cmd::Snapshot(a) => snapshot::snapshot(&cli.dirs, a),
        Cmd::Release(a) => snapshot::release(&cli.dirs, a),
        Cmd::List(a) => repo::list(a),
        Cmd::Verify(a) => repo::verify(&cli.dirs, a),
        Cmd::Prune(a) => repo::prune(a),
        Cmd::Restore(a) => repo::restore(&cli.dirs, a),
        Cmd::Abandon(a) => repo::abandon(&cli.dirs, a),
        Cmd::Export(a) => export::export(&cli.dirs, a).map(|_| 0),
        Cmd::Mount(a) => export::mount(&cli.dirs, a).map(|_| 0),
        Cmd::Umount(a) => export::umount(&cli.dirs, a).map(|_| 0),
        Cmd::Diff(a) => diff::run(&cli.dirs, a),
        Cmd::Metrics(a) => metrics::run(&cli.dirs, a),
        Cmd::Up(a) => up::up(&cli.dirs, a),
        Cmd::Down(a) => up::down(&cli.dirs, a),
        Cmd::Config(a) => up::check(a),
        Cmd::SystemdGenerator(a) => up::generator(a),
        Cmd::UdevName(a) => devlink::run_udev_name(&cli.dirs, a),
        Cmd::Key(k) => key::run(k).map(|_| 0),
        Cmd::Man(a) => man::run(a),
        Cmd::Completions(a) => completions::run(a),
    };
    match r {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            progress::error_result(&format!("{e:#}"));
            eprintln!("cowsnapctl: {e:#}");
            std::process::exit(1);
        }
    }
}
