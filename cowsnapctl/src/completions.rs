//! `cowsnapctl completions SHELL`: the shell completion script, generated from the
//! command line definition (`clap_complete`), on stdout.

use anyhow::Result;

/// Arguments of `completions`.
#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Write the script for `shell` to `w`.
pub fn generate(shell: clap_complete::Shell, w: &mut dyn std::io::Write) {
    let mut cmd = crate::command();
    clap_complete::generate(shell, &mut cmd, "cowsnapctl", w);
}

pub fn run(a: CompletionsArgs) -> Result<i32> {
    generate(a.shell, &mut std::io::stdout().lock());
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap_complete::Shell;

    fn script(shell: Shell) -> String {
        let mut out = Vec::new();
        generate(shell, &mut out);
        String::from_utf8(out).unwrap()
    }

    /// Every subcommand and every long option of it appears in each script.
    #[test]
    fn scripts_name_every_subcommand_and_option() {
        let mut cmd = crate::command();
        cmd.build();
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let s = script(shell);
            for sub in cmd.get_subcommands() {
                assert!(s.contains(sub.get_name()), "{shell}: no {}", sub.get_name());
                for a in sub.get_arguments().filter(|a| !a.is_hide_set()) {
                    if let Some(l) = a.get_long() {
                        assert!(s.contains(l), "{shell}: {} has no --{l}", sub.get_name());
                    }
                }
            }
        }
    }

    /// The bash script is valid bash (`bash -n`).
    #[test]
    fn bash_script_parses() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("cowsnapctl.bash");
        std::fs::write(&p, script(Shell::Bash)).unwrap();
        let st = std::process::Command::new("bash")
            .arg("-n")
            .arg(&p)
            .status()
            .unwrap();
        assert!(st.success(), "bash -n {}: {st}", p.display());
    }
}
