//! Layers point one way: reads every `crate::…` and `super::…` path in
//! `src/**.rs` and fails when a module names one above it (ARCHITECTURE.md,
//! "Layers").
//!
//! Each file belongs to the longest unit of [`UNITS`] that prefixes its
//! module path (`src/index/redis.rs` is `index`). Units
//! are listed top to bottom: a unit may use itself and the units listed
//! after it, never one listed before it. Because the list is one total
//! order, a cycle between units cannot pass either. A module missing from
//! the list fails the test, so a new module has to take its place.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// (unit, layer), top to bottom.
const UNITS: &[(&str, &str)] = &[
    // Edges: parse, authorize, render errors; wire the node.
    // Test builds only: the fuzz targets drive ws's own helpers and the
    // leaves below it.
    ("ws::fuzz", "edges"),
    ("ws::testee", "edges"),
    ("node", "edges"),
    ("health", "edges"),
    ("http", "edges"),
    ("ws", "edges"),
    ("node::app", "edges"),
    // Rules, one top-level module: the order services call the dispatcher;
    // both share domain's Ctx, DomainError and model.
    ("domain::orders", "rules"),
    ("domain::sync", "rules"),
    ("domain::bonuses", "rules"),
    ("domain::dispatch", "rules"),
    ("domain", "rules"),
    // Infrastructure: sockets, brokers, storage, seams.
    ("hub", "infrastructure"),
    ("broker", "infrastructure"),
    ("index", "infrastructure"),
    ("clock", "infrastructure"),
    ("store", "infrastructure"),
    ("redis_conn", "infrastructure"),
    ("auth", "infrastructure"),
    ("ws::assemble", "infrastructure"),
    ("ws::outbox", "infrastructure"),
    ("tls", "infrastructure"),
    // Leaves: no IO of their own, import only each other downwards.
    ("ws::dialect", "leaves"),
    ("ws::frame", "leaves"),
    ("event", "leaves"),
    ("config", "leaves"),
    ("metrics", "leaves"),
    ("lock", "leaves"),
];

/// The module path of a source file: `src/a/b/mod.rs` and `src/a/b.rs` are
/// both `a::b`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|l| l == "mod") {
        parts.pop();
    }
    parts
}

/// Index in [`UNITS`] of the longest unit prefixing `path`.
fn unit_of(path: &[String]) -> Option<usize> {
    let joined = path.join("::");
    UNITS
        .iter()
        .enumerate()
        .filter(|(_, (u, _))| joined == *u || joined.starts_with(&format!("{u}::")))
        .max_by_key(|(_, (u, _))| u.len())
        .map(|(i, _)| i)
}

/// Every `crate::a::b` and `super::a` path in `text`, resolved to an
/// absolute module path (items at the end do not matter: units are matched
/// by prefix).
fn references(module: &[String], text: &str) -> Vec<(usize, Vec<String>)> {
    let mut out = Vec::new();
    // Past an inline `mod x {` (a file's `mod tests`), `super` is the
    // file's own module.
    let mut inline_mod = false;
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let t = code.trim_start();
        let t = t
            .strip_prefix("pub(crate) ")
            .or_else(|| t.strip_prefix("pub "))
            .unwrap_or(t);
        if t.starts_with("mod ") && t.trim_end().ends_with('{') {
            inline_mod = true;
        }
        for (start, _) in code
            .match_indices("crate::")
            .chain(code.match_indices("super::"))
        {
            // `switchboard_client::` and the like are other crates.
            let before = code[..start].chars().last();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let rest = &code[start..];
            // Identifiers joined by `::`, up to the first other character.
            let mut segs: Vec<&str> = Vec::new();
            for raw in rest.split("::") {
                let id = raw
                    .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .next()
                    .unwrap_or("");
                if id.is_empty() {
                    break;
                }
                segs.push(id);
                if id.len() != raw.len() {
                    break;
                }
            }
            let mut path: Vec<String> = Vec::new();
            let mut it = segs.iter().peekable();
            match it.next() {
                Some(&"crate") => {}
                Some(&"super") if inline_mod => {
                    path.extend(module.iter().cloned());
                    while it.peek() == Some(&&"super") {
                        it.next();
                        path.pop();
                    }
                }
                Some(&"super") => {
                    // In `a/b.rs` and in `a/b/mod.rs` (both module a::b)
                    // `super` is `a`.
                    path.extend(module.iter().take(module.len().saturating_sub(1)).cloned());
                    while it.peek() == Some(&&"super") {
                        it.next();
                        path.pop();
                    }
                }
                _ => continue,
            }
            path.extend(it.map(|s| s.to_string()));
            out.push((n + 1, path));
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable src") {
        let p = entry.expect("dir entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// Every upward import in the tree, as readable lines.
fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut bad = Vec::new();
    for file in files {
        let module = module_of(src, &file);
        // The crate root and the binary only declare and call.
        if module == ["lib"] || module == ["main"] {
            continue;
        }
        let name = file.strip_prefix(src).unwrap().display().to_string();
        let Some(from) = unit_of(&module) else {
            bad.push(format!(
                "src/{name}: module {} is in no unit of tests/layering.rs",
                module.join("::")
            ));
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("readable file");
        for (line, path) in references(&module, &text) {
            if path.is_empty() {
                continue; // `use crate::{…}` lists: checked one by one below
            }
            let Some(to) = unit_of(&path) else {
                bad.push(format!(
                    "src/{name}:{line}: {} is in no unit of tests/layering.rs",
                    path.join("::")
                ));
                continue;
            };
            if to < from {
                let (fu, fl) = UNITS[from];
                let (tu, tl) = UNITS[to];
                bad.push(format!(
                    "src/{name}:{line}: {fu} ({fl}) imports {} of {tu} ({tl}), which is above it",
                    path.join("::")
                ));
            }
        }
    }
    bad
}

#[test]
fn layers_point_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let bad = violations(&src);
    assert!(
        bad.is_empty(),
        "upward imports (see ARCHITECTURE.md, Layers):\n{}",
        bad.join("\n")
    );
}

#[test]
fn every_unit_exists_once() {
    let mut seen = BTreeSet::new();
    for (u, _) in UNITS {
        assert!(seen.insert(*u), "{u} listed twice");
        let base = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src")
            .join(u.replace("::", "/"));
        assert!(
            base.with_extension("rs").exists() || base.join("mod.rs").exists(),
            "unit {u} has no source file"
        );
    }
}

/// The checker itself: an upward import written into a scratch tree is
/// reported, and the same tree without it is clean.
#[test]
fn an_upward_import_is_reported() {
    let dir = std::env::temp_dir().join(format!("layering-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("ws")).unwrap();
    std::fs::write(dir.join("event.rs"), "use crate::config::Config;\n").unwrap();
    std::fs::write(dir.join("ws/outbox.rs"), "use super::dialect::Dialect;\n").unwrap();
    assert!(violations(&dir).is_empty(), "{:?}", violations(&dir));
    std::fs::write(
        dir.join("event.rs"),
        "use crate::config::Config;\nfn f() { crate::store::connect(); }\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("ws/outbox.rs"),
        "use super::conn::x;\nmod tests {\n    use super::*;\n    fn f() { super::close(); }\n}\n",
    )
    .unwrap();
    let bad = violations(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(bad.len(), 2, "{bad:?}");
    assert!(
        bad[0].contains(
            "event.rs:2: event (leaves) imports store::connect of store (infrastructure)"
        ),
        "{bad:?}"
    );
    assert!(
        bad[1].contains(
            "ws/outbox.rs:1: ws::outbox (infrastructure) imports ws::conn::x of ws (edges)"
        ),
        "{bad:?}"
    );
}
