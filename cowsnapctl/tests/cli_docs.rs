//! The built `cowsnapctl` binary's manual pages, shell completions, `--version` and
//! exit codes. The expected subcommands and options come from its `--help` output, not
//! from the code that writes the pages.

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_cowsnapctl");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("COWSNAP_RUN_DIR")
        .env_remove("COWSNAP_STATE_DIR")
        .output()
        .unwrap_or_else(|e| panic!("unable to run {BIN}: {e}"))
}

fn stdout_ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "cowsnapctl {args:?}: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// The names under "Commands:" in `--help` (without `help`).
fn subcommands() -> Vec<String> {
    let help = stdout_ok(&["--help"]);
    let list = help
        .split("Commands:")
        .nth(1)
        .expect("--help lists Commands:");
    let names: Vec<String> = list
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != "help")
        .map(str::to_string)
        .collect();
    assert!(
        names.len() >= 10,
        "too few subcommands in --help: {names:?}"
    );
    names
}

/// The long options in `cowsnapctl SUB --help`.
fn long_options(sub: &str) -> Vec<String> {
    let help = stdout_ok(&[sub, "--help"]);
    help.split_whitespace()
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_string()
        })
        .filter(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        .collect()
}

/// A long option as roff writes it: `\-\-run\-dir`.
fn roff_opt(long: &str) -> String {
    format!("\\-\\-{}", long.replace('-', "\\-"))
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("no page {file} in {}: {e}", dir.display()))
}

#[test]
fn man_writes_a_page_per_subcommand_with_its_options() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("new/man");
    let listed = stdout_ok(&["man", out.to_str().unwrap()]);

    let top = read(&out, "cowsnapctl.1");
    assert!(top.contains(".TH cowsnapctl 1 "), "cowsnapctl.1 has no .TH");
    for opt in ["run-dir", "state-dir"] {
        assert!(top.contains(&roff_opt(opt)), "cowsnapctl.1 lacks --{opt}");
    }
    let subs = subcommands();
    for sub in &subs {
        let file = format!("cowsnapctl-{sub}.1");
        assert!(listed.contains(&file), "`man` did not report {file}");
        let page = read(&out, &file);
        assert!(
            page.contains(&format!(".TH cowsnapctl-{sub} 1 ")),
            "{file} has no .TH naming it:\n{}",
            &page[..page.len().min(300)]
        );
        assert!(page.contains(".SH OPTIONS"), "{file} has no OPTIONS");
        let opts = long_options(sub);
        assert!(opts.iter().any(|o| o == "help"), "{sub} --help: {opts:?}");
        for opt in opts {
            assert!(page.contains(&roff_opt(&opt)), "{file} lacks --{opt}");
        }
        assert!(
            top.contains(&format!("cowsnapctl\\-{sub}(1)")),
            "no {sub} in cowsnapctl.1"
        );
    }
    // nothing else than the pages named: the top one, the subcommands', the daemon's
    let mut files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files.len(), subs.len() + 2, "{files:?}");

    let nbd = read(&out, "cowsnap-nbd.8");
    assert!(
        nbd.contains(".TH cowsnap-nbd 8 "),
        "cowsnap-nbd.8 has no .TH"
    );
    let mut daemon = cowsnap_nbd::cli::command();
    daemon.build();
    for a in daemon.get_arguments() {
        if let Some(l) = a.get_long() {
            assert_eq!(
                nbd.contains(&roff_opt(l)),
                !a.is_hide_set(),
                "cowsnap-nbd.8 and --{l}"
            );
        }
    }
}

#[test]
fn top_page_has_exit_status_and_environment() {
    let tmp = tempfile::tempdir().unwrap();
    stdout_ok(&["man", tmp.path().to_str().unwrap()]);
    let top = read(tmp.path(), "cowsnapctl.1");
    let exit = top
        .find(".SH \"EXIT STATUS\"")
        .expect("EXIT STATUS section");
    let env = top.find(".SH ENVIRONMENT").expect("ENVIRONMENT section");
    assert!(exit < env);
    let codes = &top[exit..env];
    for code in ["0", "1", "2", "130"] {
        assert!(
            codes.contains(&format!(".TP\n\\fB{code}\\fR\n")),
            "exit code {code}"
        );
    }
    assert!(codes.contains("SIGINT"));
    let env_part = &top[env..];
    for var in [
        cowsnap_nbd::paths::ENV_RUN_DIR,
        cowsnap_nbd::paths::ENV_STATE_DIR,
    ] {
        assert!(env_part.contains(var), "no {var}");
    }
}

#[test]
fn man_into_a_file_fails_and_names_it() {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    let o = run(&["man", tmp.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(tmp.path().to_str().unwrap()), "{err}");
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(run(&["--no-such-flag"]).status.code(), Some(2));
    assert_eq!(run(&["no-such-command"]).status.code(), Some(2));
    assert_eq!(run(&["completions", "tcsh-nope"]).status.code(), Some(2));
}

/// `SHELL -n FILE` on the script, or None when SHELL is not installed.
fn syntax_check(shell: &str, script: &Path) -> Option<Output> {
    match Command::new(shell).arg("-n").arg(script).output() {
        Ok(o) => Some(o),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("unable to run {shell}: {e}"),
    }
}

#[test]
fn completions_are_valid_scripts_naming_every_subcommand() {
    let subs = subcommands();
    let tmp = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let s = stdout_ok(&["completions", shell]);
        for sub in &subs {
            assert!(s.contains(sub.as_str()), "{shell} completion lacks {sub}");
        }
        let p = tmp.path().join(format!("cowsnapctl.{shell}"));
        std::fs::write(&p, &s).unwrap();
        match syntax_check(shell, &p) {
            Some(o) => assert!(
                o.status.success(),
                "{shell} -n: {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            None if shell == "bash" => panic!("bash is not installed"),
            None => eprintln!("{shell} not installed: its script is not syntax-checked"),
        }
    }
    // a broken script is caught: the check can fail
    let bad = tmp.path().join("bad.bash");
    std::fs::write(&bad, "_f() {\n if then\n").unwrap();
    assert!(!syntax_check("bash", &bad).unwrap().status.success());
}

#[test]
fn version_names_the_format_versions() {
    use cowsnap_core::{changelog, origin_seal, repo, restore};
    let v = stdout_ok(&["--version"]);
    let mut lines = v.lines();
    assert_eq!(
        lines.next(),
        Some(format!("cowsnapctl {}", env!("CARGO_PKG_VERSION")).as_str())
    );
    let line = |name: &str| -> String {
        v.lines()
            .find(|l| l.starts_with(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("--version has no {name:?} line:\n{v}"))
            .to_string()
    };
    let only = |n: u32| format!("writes {n}, reads {n} ");
    assert!(line("repository").contains(&only(repo::VERSION)));
    assert!(line("repository chunk").contains(&only(u32::from(repo::chunk_store::CHUNK_VERSION))));
    assert!(line("encrypted repository").contains(&only(repo::VERSION_ENCRYPTED)));
    assert!(line("encrypted repository chunk")
        .contains(&only(u32::from(repo::chunk_store::CHUNK_VERSION_SEALED))));
    assert!(line("repository index").contains(&format!(
        "writes {}, reads 1, 2 ",
        repo::index::INDEX_VERSION
    )));
    assert!(line("origin seal").contains(&only(origin_seal::SEAL_VERSION)));
    assert!(line("live-restore fill state").contains(&only(restore::live::FILL_VERSION)));
    let reads: Vec<String> = changelog::READ_VERSIONS
        .iter()
        .map(u32::to_string)
        .collect();
    assert!(line("change log").contains(&format!(
        "writes {}, reads {} ",
        changelog::VERSION,
        reads.join(", ")
    )));
    assert_eq!(
        line("control protocol"),
        format!("control protocol: {}", cowsnap_nbd::control::wire::VERSION)
    );
}
