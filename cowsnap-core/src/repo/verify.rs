//! Verification: re-read and re-hash every chunk the chosen generations reference.
//! Each distinct chunk is read once; a problem is reported for every generation and
//! offset that references it.

use super::Repo;
use crate::error::Result;
use crate::fsutil::hex;
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;

/// One problem found.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VerifyProblem {
    /// Generation id.
    pub generation: String,
    /// Byte offset in the disk (`None`: the index itself).
    pub offset: Option<u64>,
    /// Chunk hash (hex).
    pub chunk: Option<String>,
    /// "missing", "corrupt" or "index".
    pub problem: String,
    /// Details.
    pub detail: String,
}

/// Outcome of a verification.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Generations checked.
    pub generations: Vec<String>,
    /// Distinct chunks read and hashed.
    pub chunks_checked: u64,
    /// Index entries checked (zero chunks included).
    pub entries_checked: u64,
    /// Bytes of chunk data hashed.
    pub bytes_checked: u64,
    /// Problems, by generation and offset.
    pub problems: Vec<VerifyProblem>,
    /// No problems.
    pub ok: bool,
}

/// Verify one generation (`Some(spec)`, resolved like restore's) or all of them.
pub fn verify(dir: &Path, generation: Option<&str>) -> Result<VerifyReport> {
    let repo = Repo::open(dir)?;
    let _lock = repo.lock(false)?;
    let gens = match generation {
        Some(s) => vec![repo.resolve(Some(s))?],
        None => repo.list()?,
    };
    let mut rep = VerifyReport::default();
    let mut seen: HashMap<[u8; 32], Option<(String, String)>> = HashMap::new();
    for g in &gens {
        rep.generations.push(g.id.clone());
        let idx = match repo.load_index(g) {
            Ok(i) => i,
            Err(e) => {
                rep.problems.push(VerifyProblem {
                    generation: g.id.clone(),
                    offset: None,
                    chunk: None,
                    problem: "index".into(),
                    detail: e.to_string(),
                });
                continue;
            }
        };
        for (i, h) in idx.hashes.iter().enumerate() {
            rep.entries_checked += 1;
            if *h == super::ZERO_HASH {
                continue;
            }
            let len = idx.chunk_len(i as u64);
            let res = seen.entry(*h).or_insert_with(|| {
                rep.chunks_checked += 1;
                match repo.store().read(h, len) {
                    Ok(d) => {
                        rep.bytes_checked += d.len() as u64;
                        None
                    }
                    Err(e) if e.kind() == crate::ErrorKind::NotFound => {
                        Some(("missing".into(), e.to_string()))
                    }
                    Err(e) => Some(("corrupt".into(), e.to_string())),
                }
            });
            if let Some((problem, detail)) = res {
                rep.problems.push(VerifyProblem {
                    generation: g.id.clone(),
                    offset: Some(i as u64 * idx.chunk_size as u64),
                    chunk: Some(hex(h)),
                    problem: problem.clone(),
                    detail: detail.clone(),
                });
            }
        }
    }
    rep.ok = rep.problems.is_empty();
    Ok(rep)
}
