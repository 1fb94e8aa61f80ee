//! No module imports itself in a loop. For each crate root of the workspace (every
//! `lib.rs` and `main.rs`), the modules are found by following `mod NAME;`; an edge
//! A → B is a path `crate::B::…` or `super::…` (resolved to the longest module prefix)
//! in A's code outside its tests. A strongly connected set of more than one module is
//! a cycle and fails this test, naming the modules and the lines that tie them.
//!
//! The check reads source text, not the compiler's resolution: paths through
//! `self::`, re-exports or glob imports are taken at face value, which is what a
//! reader sees too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Cycles that exist and are being taken apart elsewhere: (crate root, modules).
/// A new cycle, or a known one that grows, fails; so does an entry whose cycle is gone
/// (the list stays true).
const KNOWN: &[(&str, &[&str])] = &[];

struct Module {
    file: PathBuf,
    /// Module path from the crate root, `[]` for the root.
    path: Vec<String>,
    /// The directory holding this module's children.
    child_dir: PathBuf,
}

/// The source with comments, string literals and `#[cfg(test)]` items removed (the
/// tests are assumed to be the last item of a file, as they are in this workspace).
fn code_of(src: &str) -> String {
    let src = match src.find("#[cfg(test)]") {
        Some(i) => &src[..i],
        None => src,
    };
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            i += 2;
            while i < b.len() && !b[i..].starts_with(b"*/") {
                if b[i] == b'\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                if i < b.len() && b[i] == b'\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// `mod NAME;` declarations (not inline `mod NAME { … }`).
fn child_mods(code: &str) -> Vec<String> {
    let mut v = Vec::new();
    for line in code.lines() {
        let t = line.trim();
        let t = t
            .strip_prefix("pub(crate) ")
            .or_else(|| t.strip_prefix("pub "))
            .unwrap_or(t);
        if let Some(rest) = t.strip_prefix("mod ") {
            if let Some(name) = rest.strip_suffix(';') {
                if name.chars().all(is_ident) {
                    v.push(name.to_string());
                }
            }
        }
    }
    v
}

fn modules_of(root: &Path) -> Vec<Module> {
    let mut out = Vec::new();
    let mut todo = vec![Module {
        file: root.to_path_buf(),
        path: Vec::new(),
        child_dir: root.parent().unwrap().to_path_buf(),
    }];
    while let Some(m) = todo.pop() {
        let code = code_of(&std::fs::read_to_string(&m.file).unwrap());
        for name in child_mods(&code) {
            let flat = m.child_dir.join(format!("{name}.rs"));
            let nested = m.child_dir.join(&name).join("mod.rs");
            let (file, child_dir) = if flat.exists() {
                (flat, m.child_dir.join(&name))
            } else if nested.exists() {
                (nested, m.child_dir.join(&name))
            } else {
                continue;
            };
            let mut path = m.path.clone();
            path.push(name);
            todo.push(Module {
                file,
                path,
                child_dir,
            });
        }
        out.push(m);
    }
    out
}

/// Every path in a `use` tree: `a::{b, c::{self, d}}` → a::b, a::c, a::c::d.
fn use_paths(tree: &str) -> Vec<String> {
    fn walk(prefix: &str, s: &str, out: &mut Vec<String>) {
        let s = s.trim();
        if let Some(open) = s.find('{') {
            let head = s[..open].trim().trim_end_matches("::");
            let inner = &s[open + 1..s.rfind('}').unwrap_or(s.len())];
            let base = join(prefix, head);
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        walk(&base, &inner[start..i], out);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            walk(&base, &inner[start..], out);
        } else {
            let s = s.split(" as ").next().unwrap_or("").trim();
            if s.is_empty() {
                return;
            }
            let s = if s == "self" { "" } else { s };
            out.push(join(prefix, s));
        }
    }
    fn join(a: &str, b: &str) -> String {
        match (a.is_empty(), b.is_empty()) {
            (true, _) => b.to_string(),
            (_, true) => a.to_string(),
            _ => format!("{a}::{b}"),
        }
    }
    let mut out = Vec::new();
    walk("", tree, &mut out);
    out
}

/// The paths a module's code names, with the line they are on.
fn named_paths(code: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    // `use` trees (they may span lines).
    let mut rest = code;
    let mut offset = 0;
    while let Some(i) = rest.find("use ") {
        let at = offset + i;
        let before = code[..at].chars().last();
        let starts_item = before.is_none_or(|c| !is_ident(c) && c != ':');
        let end = rest[i..].find(';').map(|e| i + e).unwrap_or(rest.len());
        if starts_item {
            let line = code[..at].matches('\n').count() + 1;
            for p in use_paths(&rest[i + 4..end]) {
                out.push((line, p));
            }
        }
        offset += i + 4;
        rest = &rest[i + 4..];
    }
    // Paths in expressions and types: `crate::a::b`, `super::a`.
    for (n, line) in code.lines().enumerate() {
        if line.trim_start().starts_with("use ") || line.trim_start().starts_with("pub use ") {
            continue;
        }
        for start in ["crate::", "super::"] {
            let mut from = 0;
            while let Some(i) = line[from..].find(start) {
                let at = from + i;
                let prev = line[..at].chars().last();
                let end = line[at..]
                    .find(|c: char| !(is_ident(c) || c == ':'))
                    .map(|e| at + e)
                    .unwrap_or(line.len());
                if prev.is_none_or(|c| !is_ident(c) && c != ':') {
                    out.push((n + 1, line[at..end].trim_end_matches(':').to_string()));
                }
                from = end.max(at + start.len());
            }
        }
    }
    out
}

/// The module a path names, from module `here`; `None` for paths outside the crate.
fn resolve(path: &str, here: &[String], known: &BTreeSet<Vec<String>>) -> Option<Vec<String>> {
    let mut segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    let mut base: Vec<String> = match *segs.first()? {
        "crate" => {
            segs.remove(0);
            Vec::new()
        }
        "super" => {
            // `super` of a module is its parent, whether it is `x.rs` or `x/mod.rs`.
            let mut b = here.to_vec();
            while segs.first() == Some(&"super") {
                segs.remove(0);
                b.pop()?;
            }
            b
        }
        _ => return None,
    };
    let mut best = base.clone();
    for s in segs {
        base.push(s.to_string());
        if known.contains(&base) {
            best = base.clone();
        } else {
            break;
        }
    }
    Some(best)
}

/// Strongly connected sets of more than one module (Tarjan).
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    struct T<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<String, usize>,
        low: BTreeMap<String, usize>,
        stack: Vec<String>,
        on: BTreeSet<String>,
        out: Vec<BTreeSet<String>>,
    }
    fn visit(t: &mut T<'_>, v: &str) {
        let i = t.index.len();
        t.index.insert(v.to_string(), i);
        t.low.insert(v.to_string(), i);
        t.stack.push(v.to_string());
        t.on.insert(v.to_string());
        for w in t.edges.get(v).into_iter().flatten() {
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut set = BTreeSet::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(&w);
                let done = w == v;
                set.insert(w);
                if done {
                    break;
                }
            }
            if set.len() > 1 {
                t.out.push(set);
            }
        }
    }
    let mut t = T {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !t.index.contains_key(v) {
            visit(&mut t, v);
        }
    }
    t.out
}

fn name(path: &[String]) -> String {
    if path.is_empty() {
        "crate".into()
    } else {
        path.join("::")
    }
}

/// Cycles of one crate root, each with the lines that make its edges.
fn crate_cycles(root: &Path) -> Vec<(BTreeSet<String>, Vec<String>)> {
    let mods = modules_of(root);
    let known: BTreeSet<Vec<String>> = mods.iter().map(|m| m.path.clone()).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut why: BTreeMap<(String, String), String> = BTreeMap::new();
    for m in &mods {
        if m.file.file_name().is_some_and(|f| f == "tests.rs") {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(&m.file).unwrap());
        let from = name(&m.path);
        edges.entry(from.clone()).or_default();
        for (line, p) in named_paths(&code) {
            let Some(to) = resolve(&p, &m.path, &known) else {
                continue;
            };
            let to = name(&to);
            // A module naming its own ancestor through `super`/`crate` is an edge; one
            // naming itself is not.
            if to != from {
                why.entry((from.clone(), to.clone()))
                    .or_insert_with(|| format!("{}:{line}: {p}", m.file.display()));
                edges.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    cycles(&edges)
        .into_iter()
        .map(|set| {
            let ties = why
                .iter()
                .filter(|((a, b), _)| set.contains(a) && set.contains(b))
                .map(|((a, b), w)| format!("{a} -> {b} ({w})"))
                .collect();
            (set, ties)
        })
        .collect()
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn no_module_cycles() {
    let ws = workspace();
    let mut roots = Vec::new();
    for krate in ["cowsnap-core", "cowsnap-nbd", "cowsnapctl"] {
        for root in ["lib.rs", "main.rs"] {
            let p = ws.join(krate).join("src").join(root);
            if p.exists() {
                roots.push((format!("{krate}/src/{root}"), p));
            }
        }
    }
    assert!(
        roots.len() >= 4,
        "crate roots not found under {}",
        ws.display()
    );
    let mut bad = Vec::new();
    let mut seen = vec![false; KNOWN.len()];
    for (label, root) in &roots {
        for (set, ties) in crate_cycles(root) {
            for (i, (r, mods)) in KNOWN.iter().enumerate() {
                if r == label && set.iter().all(|m| mods.contains(&m.as_str())) {
                    seen[i] = true;
                }
            }
            let allowed = KNOWN
                .iter()
                .any(|(r, mods)| r == label && set.iter().all(|m| mods.contains(&m.as_str())));
            if !allowed {
                bad.push(format!(
                    "{label}: modules {:?} import each other:\n    {}",
                    set,
                    ties.join("\n    ")
                ));
            }
        }
    }
    for (i, (r, mods)) in KNOWN.iter().enumerate() {
        if !seen[i] {
            bad.push(format!(
                "{r}: the known cycle {mods:?} is gone: remove it from KNOWN"
            ));
        }
    }
    assert!(bad.is_empty(), "module cycles:\n{}", bad.join("\n"));
}

#[test]
fn the_check_sees_a_cycle() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path();
    std::fs::write(src.join("lib.rs"), "pub mod a;\npub mod b;\nmod c;\n").unwrap();
    std::fs::write(src.join("a.rs"), "use crate::b::X;\n").unwrap();
    std::fs::write(
        src.join("b.rs"),
        "// use crate::c;\npub fn f() { super::a::g(); }\n#[cfg(test)]\nmod tests { use crate::c; }\n",
    )
    .unwrap();
    std::fs::write(src.join("c.rs"), "use crate::{a, b::{self, Y}};\n").unwrap();
    let found = crate_cycles(&src.join("lib.rs"));
    assert_eq!(
        found.len(),
        1,
        "{:?}",
        found.iter().map(|c| &c.0).collect::<Vec<_>>()
    );
    assert_eq!(
        found[0].0,
        BTreeSet::from(["a".to_string(), "b".to_string()])
    );
    // Without the b → a edge there is none (c → a, c → b are one way).
    std::fs::write(src.join("b.rs"), "pub fn f() {}\n").unwrap();
    assert!(crate_cycles(&src.join("lib.rs")).is_empty());
}
