//! Every versioned format this build writes and reads, from the constants of the
//! modules that own them: what `cowsnapctl --version` and `cowsnap-nbd --version`
//! print, so an admin can tell which repositories and state files a binary handles.

use crate::{changelog, origin_seal, repo, restore};

/// One versioned format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    /// What it is, as a user knows it.
    pub name: &'static str,
    /// Where it lives.
    pub file: &'static str,
    /// The version written.
    pub writes: u32,
    /// The versions read.
    pub reads: &'static [u32],
}

/// Versions read when only the written one is.
const REPO_READS: &[u32] = &[repo::VERSION];
const CHUNK_READS: &[u32] = &[repo::chunk_store::CHUNK_VERSION as u32];
const REPO_ENC_READS: &[u32] = &[repo::VERSION_ENCRYPTED];
const CHUNK_SEALED_READS: &[u32] = &[repo::chunk_store::CHUNK_VERSION_SEALED as u32];
const SEALED_OBJECT_READS: &[u32] = &[repo::crypt::OBJ_VERSION as u32];
const SEAL_READS: &[u32] = &[origin_seal::SEAL_VERSION];
const FILL_READS: &[u32] = &[restore::live::FILL_VERSION];

/// The formats, repository first.
pub const FORMATS: &[Format] = &[
    Format {
        name: "repository",
        file: "DIR/cowsnap-repo.json",
        writes: repo::VERSION,
        reads: REPO_READS,
    },
    Format {
        name: "repository chunk",
        file: "DIR/chunks/ab/<hash>",
        writes: repo::chunk_store::CHUNK_VERSION as u32,
        reads: CHUNK_READS,
    },
    Format {
        name: "encrypted repository",
        file: "DIR/cowsnap-repo.json with \"encryption\"",
        writes: repo::VERSION_ENCRYPTED,
        reads: REPO_ENC_READS,
    },
    Format {
        name: "encrypted repository chunk",
        file: "DIR/chunks/ab/<keyed hash>",
        writes: repo::chunk_store::CHUNK_VERSION_SEALED as u32,
        reads: CHUNK_SEALED_READS,
    },
    Format {
        name: "sealed index and metadata",
        file: "DIR/generations/<id>.idx, .json of an encrypted repository",
        writes: repo::crypt::OBJ_VERSION as u32,
        reads: SEALED_OBJECT_READS,
    },
    Format {
        name: "repository index",
        file: "DIR/generations/<id>.idx",
        writes: repo::index::INDEX_VERSION,
        reads: repo::index::INDEX_READ_VERSIONS,
    },
    Format {
        name: "change log",
        file: "STATE_DIR/NAME/changelog.bin",
        writes: changelog::VERSION,
        reads: changelog::READ_VERSIONS,
    },
    Format {
        name: "origin seal",
        file: "STATE_DIR/NAME/origin.seal",
        writes: origin_seal::SEAL_VERSION,
        reads: SEAL_READS,
    },
    Format {
        name: "live-restore fill state",
        file: "STATE_DIR/NAME/fill.state",
        writes: restore::live::FILL_VERSION,
        reads: FILL_READS,
    },
];

/// The lines `--version` prints after the version: one per format, e.g.
/// `change log: writes 2, reads 1, 2`.
pub fn describe() -> String {
    FORMATS
        .iter()
        .map(|f| {
            let reads: Vec<String> = f.reads.iter().map(u32::to_string).collect();
            format!(
                "{}: writes {}, reads {} ({})",
                f.name,
                f.writes,
                reads.join(", "),
                f.file
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_format_reads_what_it_writes() {
        for f in FORMATS {
            assert!(f.reads.contains(&f.writes), "{}", f.name);
        }
    }

    #[test]
    fn describe_names_each_version() {
        let d = describe();
        assert_eq!(d.lines().count(), FORMATS.len());
        assert!(d.contains(&format!(
            "repository: writes {}, reads {}",
            repo::VERSION,
            repo::VERSION
        )));
        assert!(d.contains(&format!(
            "change log: writes {}, reads 1, 2",
            changelog::VERSION
        )));
        assert!(
            d.contains("encrypted repository: writes 2, reads 2 ("),
            "{d}"
        );
        assert!(
            d.contains("encrypted repository chunk: writes 2, reads 2 ("),
            "{d}"
        );
        assert!(
            d.contains("sealed index and metadata: writes 1, reads 1 ("),
            "{d}"
        );
    }
}
