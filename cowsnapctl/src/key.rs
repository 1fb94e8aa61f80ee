//! Repository keys on the command line: `key create FILE`, and the `--key FILE` /
//! `COWSNAP_KEY_FILE` every repository command takes. Only the key file's path ever
//! travels (to the daemon in a backup request, to an export's or a live restore's
//! daemon as its `--key`); the key is read from the file by whoever opens the
//! repository.

use anyhow::{anyhow, bail, Context, Result};
use cowsnap_core::repo::{crypt, Repo};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The variable naming the key file when --key is not given.
pub const ENV_KEY_FILE: &str = "COWSNAP_KEY_FILE";

/// `cowsnapctl key ...`.
#[derive(Debug, clap::Subcommand)]
pub enum KeyCmd {
    /// Create a new key file: 32 random bytes, mode 0600; an existing file is never
    /// overwritten. Keep a copy: without it an encrypted repository cannot be read.
    Create(CreateArgs),
}

/// Arguments of `key create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The key file to create.
    pub file: PathBuf,
}

/// Run a `key` subcommand.
pub fn run(k: KeyCmd) -> Result<()> {
    match k {
        KeyCmd::Create(a) => {
            crypt::create_key_file(&a.file)?;
            println!("created key file {}", a.file.display());
            Ok(())
        }
    }
}

/// The key file given (absolute), once [`init`] ran.
static KEY_FILE: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Read the key file `file` (if any) and make it the key of every repository this
/// process opens.
pub fn init(file: Option<&Path>) -> Result<()> {
    let Some(f) = file else {
        let _ = KEY_FILE.set(None);
        return Ok(());
    };
    if f.as_os_str().is_empty() {
        bail!("invalid --key: empty path");
    }
    let abs = std::path::absolute(f)
        .with_context(|| format!("unable to resolve key file {}", f.display()))?;
    let key = crypt::RepoKey::load(&abs)?;
    crypt::set_process_key(Some(key));
    let _ = KEY_FILE.set(Some(abs));
    Ok(())
}

/// The key file's absolute path for a daemon (which runs in `/`), if one was given.
pub fn key_file_for_daemon() -> Result<Option<PathBuf>> {
    Ok(KEY_FILE.get().cloned().flatten())
}

/// Before a backup is asked of a daemon: a key goes with repository targets only,
/// and an existing repository's key must match (a missing repository is created, then
/// encrypted if a key is given). Nothing is written.
pub fn check_backup_target(to: &str) -> Result<()> {
    let key = crypt::process_key();
    let Some(dir) = to.strip_prefix("repo:") else {
        if key.is_some() {
            bail!("unable to back up to {to}: a key encrypts repositories only (repo:DIR)");
        }
        return Ok(());
    };
    match Repo::open_keyed(Path::new(dir), key) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == cowsnap_core::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow!(e)).context(format!("unable to back up to {to}")),
    }
}
