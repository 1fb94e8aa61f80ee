//! `cowsnapctl man OUTDIR`: the manual pages, generated from the command line
//! definitions (`clap_mangen`): `cowsnapctl.1`, `cowsnapctl-SUBCOMMAND.1` for each
//! subcommand and `cowsnap-nbd.8` for the daemon (its definition is
//! `cowsnap_nbd::cli`). clap_mangen renders the title, synopsis, description and
//! options; this file adds EXIT STATUS, ENVIRONMENT, FILES and SEE ALSO, whose paths
//! and variable names come from `cowsnap_nbd::paths`.

use anyhow::{Context, Result};
use cowsnap_nbd::paths;
use roff::{bold, italic, roman, Roff};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Arguments of `man`.
#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// Directory to write the pages into (created if missing; pages there are replaced).
    pub outdir: PathBuf,
}

/// The daemon's page section: a system administration daemon.
const DAEMON_SECTION: &str = "8";

/// Exit statuses every cowsnapctl command shares.
const EXIT_STATUS: &[(&str, &str)] = &[
    ("0", "Success."),
    (
        "1",
        "The command failed; a message on standard error says what failed and why. \
         Values checked after parsing (sizes, durations, targets, names) fail with 1 too, \
         before anything is changed.",
    ),
    (
        "2",
        "Usage error: the command line could not be parsed (unknown subcommand or option, \
         missing or malformed argument). Nothing was done.",
    ),
    (
        "130",
        "Interrupted by Ctrl-C (SIGINT). backup, restore, verify and diff --files also take \
         SIGTERM and SIGHUP, stop cleanly (see their pages) and exit 130; the short commands are ended \
         by the signal itself, which a shell reports as 130.",
    ),
];

/// What a subcommand adds to [`EXIT_STATUS`].
fn exit_note(sub: &str) -> Option<&'static str> {
    Some(match sub {
        "status" => {
            "1 also when NAME is not attached, or when the daemon of a listed disk does not \
             respond (the disk is still listed)."
        }
        "verify" => {
            "1 also when a chunk is missing or corrupt (with --repair: when a generation is \
             still damaged after it). 130: the check stopped; chunks found damaged until then \
             are already in DIR/quarantine, nothing is left half-done."
        }
        "backup" => {
            "130: the backup was cancelled in the daemon (its target holds no restore point; a \
             frozen filesystem is thawed first)."
        }
        "prune" => {
            "1 also, before anything is changed, when every --keep-* given is 0 or --disk \
             names a disk without generations; 2 when no --keep-* is given. --dry-run changes \
             nothing."
        }
        "restore" => {
            "130: the restore stopped; the destination is incomplete (a file keeps \
             DEST.incomplete, a device its first chunk zeroed) until a restore completes. With \
             --live, 130 means only that following the fill stopped: the disk stays attached \
             and the fill goes on in its daemon."
        }
        "up" | "down" => {
            "1 also when any one disk failed (each is reported on its own line; the others \
             were still brought up or down). A bad configuration file or an unknown name \
             fails before any disk is touched."
        }
        "config" => "1 also when a schedule is refused by systemd-analyze calendar.",
        _ => return None,
    })
}

/// The daemon's exit statuses.
const DAEMON_EXIT_STATUS: &[(&str, &str)] = &[
    (
        "0",
        "Clean shutdown: SIGTERM, SIGINT or the control socket's shutdown command (the \
         origin flushed, the change log closed, the origin sealed).",
    ),
    (
        "1",
        "The daemon could not start or stopped on an error; the last line on standard error \
         reads \"cowsnap-nbd: error: ...\".",
    ),
    ("2", "Usage error: the command line could not be parsed."),
];

/// The variables a page's program reads; `ctl`: cowsnapctl's (the daemon reads only
/// the directories and the log filter).
fn environment(ctl: bool) -> Vec<(String, String)> {
    let mut v = vec![
        (
            paths::ENV_RUN_DIR.into(),
            format!(
                "The run directory, as --run-dir (default {}).",
                paths::DEFAULT_RUN_DIR
            ),
        ),
        (
            paths::ENV_STATE_DIR.into(),
            format!(
                "The state directory, as --state-dir (default {}).",
                paths::DEFAULT_STATE_DIR
            ),
        ),
        (
            cowsnap_core::repo::cache::MAX_ENV.into(),
            "Bound of the local cache of s3 repositories' indexes under the state directory \
             (bytes with an optional K, M, G or T suffix; default 1G; 0 turns it off)."
                .into(),
        ),
        (
            "RUST_LOG".into(),
            format!(
                "Log filter on standard error (default {}; e.g. info, debug).",
                if ctl { "warn" } else { "info" }
            ),
        ),
        (
            cowsnap_nbd::logging::JOURNAL_STREAM.into(),
            "Set by systemd: when it names standard error (DEV:INO), log lines are written \
             as <N>message with their syslog priority and no timestamp, for the journal."
                .into(),
        ),
    ];
    if ctl {
        v.push((
            crate::attach::ENV_NBD_BIN.into(),
            "The daemon binary attach starts (default: cowsnap-nbd next to cowsnapctl, \
             else on PATH)."
                .into(),
        ));
        v.push((
            crate::attach::ENV_ATTACH_TIMEOUT.into(),
            format!(
                "Seconds attach waits for the daemon and nbdfuse (default {}).",
                crate::attach::DEFAULT_ATTACH_TIMEOUT_SECS
            ),
        ));
        v.push((
            crate::config::ENV_CONFIG.into(),
            format!(
                "The configuration file of up, down, config and backup without --to, as \
                 --config (default {}).",
                crate::config::DEFAULT_CONFIG
            ),
        ));
        v.push((
            crate::key::ENV_KEY_FILE.into(),
            "The key file of an encrypted repository, as --key.".into(),
        ));
        v.push((
            crate::devlink::ENV_DEV_DIR.into(),
            format!(
                "Directory of the stable device links NAME and NAME-partN (default {}).",
                crate::devlink::DEFAULT_DEV_DIR
            ),
        ));
    }
    v
}

fn files() -> Vec<(String, String)> {
    let p = paths::DiskPaths::new(
        "NAME",
        Path::new(paths::DEFAULT_RUN_DIR),
        Path::new(paths::DEFAULT_STATE_DIR),
    );
    let s = |p: PathBuf| p.display().to_string();
    vec![
        (
            s(p.nbd_socket()),
            "NBD unix socket of disk NAME (mode 0600).".into(),
        ),
        (
            s(p.ctl_socket()),
            "Control socket of the daemon (JSON lines, mode 0600).".into(),
        ),
        (s(p.pid_file()), "Daemon pid.".into()),
        (
            s(p.lock_file()),
            "Held (flock) by the daemon for its life.".into(),
        ),
        (
            s(p.attach_record()),
            "How cowsnapctl attach exposed the disk.".into(),
        ),
        (
            s(p.disk_state_dir()),
            "The disk's state: change log, identity, origin seal, live-restore fill state. \
             Keep it: without it the next incremental backup reads everything."
                .into(),
        ),
        (
            s(p.log_file()),
            "Daemon log when started by cowsnapctl.".into(),
        ),
    ]
}

/// `.TP` items: a bold term, then its text.
fn items<'a>(r: &mut Roff, list: impl IntoIterator<Item = (&'a str, &'a str)>) {
    for (term, text) in list {
        r.control("TP", []);
        r.text([bold(term)]);
        r.text([roman(text)]);
    }
}

/// One page: clap_mangen's sections, then `extra` (EXIT STATUS, ...), then VERSION.
fn page(man: &clap_mangen::Man, cmd: &clap::Command, extra: &Roff) -> Result<Vec<u8>> {
    let mut w = Vec::new();
    man.render_title(&mut w)?;
    man.render_name_section(&mut w)?;
    man.render_synopsis_section(&mut w)?;
    man.render_description_section(&mut w)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut w)?;
    }
    if cmd.has_subcommands() {
        man.render_subcommands_section(&mut w)?;
    }
    extra.to_writer(&mut w)?;
    if let Some(v) = cmd.get_long_version() {
        version_section(v).to_writer(&mut w)?;
    }
    Ok(dedupe_preamble(w))
}

/// VERSION: the `--version` text, one line per format (clap_mangen's own section runs
/// the lines together).
fn version_section(long_version: &str) -> Roff {
    let mut roff = Roff::new();
    roff.control("SH", ["VERSION"]);
    for line in long_version.lines() {
        roff.text([roman(line)]);
        roff.control("br", []);
    }
    roff
}

/// Each rendered piece starts with the same two-line apostrophe preamble; keep the
/// first.
fn dedupe_preamble(page: Vec<u8>) -> Vec<u8> {
    let text = String::from_utf8_lossy(&page).into_owned();
    let preamble = ".ie \\n(.g .ds Aq \\(aq\n.el .ds Aq '\n";
    match text.split_once(preamble) {
        Some((head, rest)) => {
            format!("{head}{preamble}{}", rest.replace(preamble, "")).into_bytes()
        }
        None => page,
    }
}

fn see_also(r: &mut Roff, pages: &[String], this: &str) {
    let refs: Vec<&String> = pages.iter().filter(|p| p.as_str() != this).collect();
    if refs.is_empty() {
        return;
    }
    r.control("SH", ["SEE ALSO"]);
    let mut line = Vec::new();
    for (i, p) in refs.iter().enumerate() {
        let (name, sec) = p.rsplit_once('.').unwrap_or((p.as_str(), "1"));
        line.push(bold(name));
        line.push(roman(format!(
            "({sec}){}",
            if i + 1 < refs.len() { ", " } else { "" }
        )));
    }
    r.text(line);
}

/// EXIT STATUS (with `note`), ENVIRONMENT (cowsnapctl's when `ctl`), FILES when
/// `with_files`.
fn common_sections(
    r: &mut Roff,
    exit: &[(&str, &str)],
    note: Option<&str>,
    with_files: bool,
    ctl: bool,
) {
    r.control("SH", ["EXIT STATUS"]);
    items(r, exit.iter().copied());
    if let Some(n) = note {
        r.control("PP", []);
        r.text([roman(n)]);
    }
    let env = environment(ctl);
    r.control("SH", ["ENVIRONMENT"]);
    items(r, env.iter().map(|(a, b)| (a.as_str(), b.as_str())));
    if with_files {
        let files = files();
        r.control("SH", ["FILES"]);
        r.text([
            roman("Paths shown for the default directories; "),
            italic("NAME"),
            roman(" is the disk name."),
        ]);
        items(r, files.iter().map(|(a, b)| (a.as_str(), b.as_str())));
    }
}

/// Every page as (file name, roff source), `cowsnapctl.1` first.
pub fn pages() -> Result<Vec<(String, Vec<u8>)>> {
    let mut top = crate::command().disable_help_subcommand(true);
    top.build();
    let source = format!("cowsnap {}", env!("CARGO_PKG_VERSION"));
    let subs: Vec<clap::Command> = top
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    let mut names = vec!["cowsnapctl.1".to_string()];
    for s in &subs {
        names.push(format!(
            "{}.1",
            s.get_display_name().unwrap_or_else(|| s.get_name())
        ));
    }
    let daemon_page = format!("cowsnap-nbd.{DAEMON_SECTION}");
    names.push(daemon_page.clone());
    let mut out = Vec::new();

    let man = clap_mangen::Man::new(top.clone())
        .source(source.clone())
        .manual("cowsnap");
    let mut extra = Roff::new();
    common_sections(&mut extra, EXIT_STATUS, None, true, true);
    see_also(&mut extra, &names, "cowsnapctl.1");
    out.push((man.get_filename(), page(&man, &top, &extra)?));

    for s in subs {
        let man = clap_mangen::Man::new(s.clone())
            .source(source.clone())
            .manual("cowsnap");
        let mut extra = Roff::new();
        common_sections(
            &mut extra,
            EXIT_STATUS,
            exit_note(s.get_name()),
            false,
            true,
        );
        see_also(&mut extra, &names[..1], "");
        out.push((man.get_filename(), page(&man, &s, &extra)?));
    }

    let mut daemon = cowsnap_nbd::cli::command();
    daemon.build();
    let man = clap_mangen::Man::new(daemon.clone())
        .section(DAEMON_SECTION)
        .source(source)
        .manual("cowsnap");
    let mut extra = Roff::new();
    common_sections(&mut extra, DAEMON_EXIT_STATUS, None, true, false);
    see_also(&mut extra, &names[..1], "");
    out.push((man.get_filename(), page(&man, &daemon, &extra)?));
    debug_assert_eq!(
        out.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        names
    );
    Ok(out)
}

/// Write every page into `dir` (created if missing); returns the paths written.
pub fn write_pages(dir: &Path) -> Result<Vec<PathBuf>> {
    let pages = pages()?;
    std::fs::create_dir_all(dir).with_context(|| format!("unable to create {}", dir.display()))?;
    let mut written = Vec::new();
    for (name, text) in pages {
        let p = dir.join(&name);
        let mut f = std::fs::File::create(&p)
            .with_context(|| format!("unable to create {}", p.display()))?;
        f.write_all(&text)
            .and_then(|_| f.flush())
            .with_context(|| format!("unable to write {}", p.display()))?;
        written.push(p);
    }
    Ok(written)
}

pub fn run(a: ManArgs) -> Result<i32> {
    for p in write_pages(&a.outdir)? {
        println!("{}", p.display());
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dir: &Path, name: &str) -> String {
        std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// The `.TH` line of a page: title and section.
    fn th(page: &str) -> Vec<String> {
        let line = page
            .lines()
            .find(|l| l.starts_with(".TH "))
            .unwrap_or_else(|| panic!("no .TH line in\n{page}"));
        line[4..].split_whitespace().map(str::to_string).collect()
    }

    /// roff escapes a '-' as "\-": undo it to search for option names.
    fn plain(page: &str) -> String {
        page.replace("\\-", "-")
    }

    #[test]
    fn every_subcommand_has_a_page_naming_its_options() {
        let d = tempfile::tempdir().unwrap();
        let written = write_pages(d.path()).unwrap();
        let mut cmd = crate::command();
        cmd.build();
        let mut expected = vec!["cowsnapctl.1".to_string(), "cowsnap-nbd.8".to_string()];
        for s in cmd
            .get_subcommands()
            .filter(|s| s.get_name() != "help" && !s.is_hide_set())
        {
            let name = format!("cowsnapctl-{}.1", s.get_name());
            let page = plain(&read(d.path(), &name));
            assert_eq!(
                th(&page)[..2],
                [format!("cowsnapctl-{}", s.get_name()), "1".into()]
            );
            for a in s.get_arguments().filter(|a| !a.is_hide_set()) {
                if let Some(l) = a.get_long() {
                    assert!(page.contains(&format!("--{l}")), "{name} lacks --{l}");
                }
            }
            assert!(
                page.contains(".SH \"EXIT STATUS\""),
                "{name}: no EXIT STATUS"
            );
            assert!(page.contains(".SH ENVIRONMENT"), "{name}: no ENVIRONMENT");
            expected.push(name);
        }
        let mut got: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        got.sort();
        expected.sort();
        assert_eq!(got, expected);
        // The top page lists every subcommand and documents the exit codes.
        let top = plain(&read(d.path(), "cowsnapctl.1"));
        assert_eq!(th(&top)[..2], ["cowsnapctl".to_string(), "1".into()]);
        for s in cmd
            .get_subcommands()
            .filter(|s| s.get_name() != "help" && !s.is_hide_set())
        {
            assert!(
                top.contains(&format!("cowsnapctl-{}(1)", s.get_name())),
                "{}",
                s.get_name()
            );
        }
        for (code, _) in EXIT_STATUS {
            assert!(
                top.contains(&format!(".TP\n\\fB{code}\\fR")),
                "exit status {code}"
            );
        }
        assert!(top.contains(paths::ENV_RUN_DIR) && top.contains(paths::ENV_STATE_DIR));
        assert!(top.contains(".SH FILES") && top.contains(paths::DEFAULT_RUN_DIR));
        assert!(top.contains(cowsnap_core::formats::describe().lines().next().unwrap()));
        assert_eq!(top.matches(".ie \\n(.g .ds Aq").count(), 1, "one preamble");
    }

    #[test]
    fn the_daemon_page_names_its_options() {
        let d = tempfile::tempdir().unwrap();
        write_pages(d.path()).unwrap();
        let page = plain(&read(d.path(), "cowsnap-nbd.8"));
        assert_eq!(th(&page)[..2], ["cowsnap-nbd".to_string(), "8".into()]);
        let mut cmd = cowsnap_nbd::cli::command();
        cmd.build();
        let mut n = 0;
        for a in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
            if let Some(l) = a.get_long() {
                assert!(
                    page.contains(&format!("--{l}")),
                    "cowsnap-nbd.8 lacks --{l}"
                );
                n += 1;
            }
        }
        assert!(n >= 10, "only {n} options");
        assert!(!page.contains("--lock-fd"), "a hidden option is documented");
        for (code, _) in DAEMON_EXIT_STATUS {
            assert!(
                page.contains(&format!(".TP\n\\fB{code}\\fR")),
                "exit status {code}"
            );
        }
        assert!(page.contains(".SH FILES"));
    }
}
