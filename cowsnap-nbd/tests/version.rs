//! `cowsnap-nbd --version` names the format versions the daemon writes and reads, as
//! the owning modules' constants define them.

use std::process::Command;

#[test]
fn version_names_the_format_versions() {
    use cowsnap_core::{changelog, origin_seal, repo, restore};
    let o = Command::new(env!("CARGO_BIN_EXE_cowsnap-nbd"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = String::from_utf8(o.stdout).unwrap();
    assert!(
        v.starts_with(&format!("cowsnap-nbd {}\n", env!("CARGO_PKG_VERSION"))),
        "{v}"
    );
    let reads: Vec<String> = changelog::READ_VERSIONS
        .iter()
        .map(u32::to_string)
        .collect();
    for want in [
        format!("repository: writes {0}, reads {0} ", repo::VERSION),
        format!(
            "repository chunk: writes {0}, reads {0} ",
            repo::chunk_store::CHUNK_VERSION
        ),
        format!(
            "repository index: writes {}, reads {} ",
            repo::index::INDEX_VERSION,
            repo::index::INDEX_READ_VERSIONS
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        format!(
            "change log: writes {}, reads {} ",
            changelog::VERSION,
            reads.join(", ")
        ),
        format!(
            "origin seal: writes {0}, reads {0} ",
            origin_seal::SEAL_VERSION
        ),
        format!(
            "live-restore fill state: writes {0}, reads {0} ",
            restore::live::FILL_VERSION
        ),
        format!(
            "control protocol: {}\n",
            cowsnap_nbd::control::wire::VERSION
        ),
    ] {
        assert!(v.contains(&want), "--version lacks {want:?}:\n{v}");
    }
}
