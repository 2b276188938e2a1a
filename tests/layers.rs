//! The modules of `src/` form a DAG that reads bottom-up (see the README's layout section): no
//! module uses one that uses it back, directly or through others. Checked over every `crate::`
//! path (and `super::` inside folders) of the library's files, at two levels: between top-level
//! modules (`io`, `models`, `methods`, …) and between the files of one folder (its `mod.rs`, which
//! declares and re-exports the others, aside).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// `from -> to` with the file and line that make the edge.
type Graph = BTreeMap<String, BTreeMap<String, String>>;

/// The library's source files as (path relative to `src/`, text); the CLI (`main.rs`, `flags.rs`)
/// sits above everything and goes through `meet::`.
fn sources(src: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(src).unwrap().to_string_lossy().replace('\\', "/");
                if !["main.rs", "flags.rs"].contains(&rel.as_str()) {
                    out.push((rel, std::fs::read_to_string(&p).unwrap()));
                }
            }
        }
    }
    out.sort();
    out
}

/// `a/b.rs`, `a/b/mod.rs`, `a/b/c.rs` → (`a`, `b`); `a/mod.rs` → (`a`, `mod`); `a.rs` → (`a`, `mod`).
fn node(rel: &str) -> (String, String) {
    let parts: Vec<&str> = rel.trim_end_matches(".rs").split('/').collect();
    match parts.as_slice() {
        [top] => (top.to_string(), "mod".into()),
        [top, child, ..] => (top.to_string(), child.to_string()),
        [] => unreachable!(),
    }
}

/// The first path segment of each item in a `{…}` group (nested groups kept whole).
fn group_heads(s: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let (mut depth, mut item) = (0, String::new());
    for c in s.chars() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                heads.push(std::mem::take(&mut item));
                continue;
            }
            _ => {}
        }
        item.push(c);
    }
    heads.push(item);
    heads
        .iter()
        .map(|h| h.trim().split("::").next().unwrap_or("").trim().to_string())
        .filter(|h| !h.is_empty())
        .collect()
}

fn ident(s: &str) -> String {
    s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()
}

/// Both graphs: between top-level modules, and between the files of each folder.
fn graphs(files: &[(String, String)]) -> (Graph, BTreeMap<String, Graph>) {
    let is_folder = |top: &str| files.iter().any(|(r, _)| r.starts_with(&format!("{top}/")));
    let has_child = |top: &str, child: &str| {
        files.iter().any(|(r, _)| r == &format!("{top}/{child}.rs") || r.starts_with(&format!("{top}/{child}/")))
    };
    // `pub use x::…::{A, B}` in lib.rs: items the crate root re-exports from module `x`.
    let mut reexports: BTreeMap<String, String> = BTreeMap::new();
    if let Some((_, lib)) = files.iter().find(|(r, _)| r == "lib.rs") {
        for line in lib.lines().filter_map(|l| l.trim().strip_prefix("pub use ")) {
            let module = ident(line);
            let tail = line.rsplit("::").next().unwrap_or("");
            for item in group_heads(tail.trim_start_matches('{')) {
                reexports.insert(item.trim_end_matches(';').to_string(), module.clone());
            }
        }
    }
    let (mut top_graph, mut folders) = (Graph::new(), BTreeMap::<String, Graph>::new());
    for (rel, text) in files.iter().filter(|(r, _)| r != "lib.rs") {
        let (top, child) = node(rel);
        for (no, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            let at = format!("src/{rel}:{}", no + 1);
            let mut targets: Vec<(String, Option<String>)> = Vec::new();
            for (i, _) in code.match_indices("crate::") {
                let rest = &code[i + "crate::".len()..];
                let heads = match rest.strip_prefix('{') {
                    Some(g) => group_heads(g),
                    None => vec![ident(rest)],
                };
                for h in heads {
                    let module = reexports.get(&h).cloned().unwrap_or(h.clone());
                    let after = rest.strip_prefix(&format!("{h}::")).unwrap_or("");
                    let children = match after.strip_prefix('{') {
                        Some(g) => group_heads(g),
                        None => vec![ident(after)],
                    };
                    for c in children {
                        targets.push((module.clone(), Some(c)));
                    }
                }
            }
            if is_folder(&top) {
                for (i, _) in code.match_indices("super::") {
                    // `super::` one level below the folder is the folder itself.
                    if rel.matches('/').count() == 1 {
                        let rest = &code[i + "super::".len()..];
                        let heads = match rest.strip_prefix('{') {
                            Some(g) => group_heads(g),
                            None => vec![ident(rest)],
                        };
                        targets.extend(heads.into_iter().map(|h| (top.clone(), Some(h))));
                    }
                }
            }
            for (module, c) in targets {
                if module.is_empty() || module.chars().next().is_some_and(|c| c.is_uppercase()) {
                    continue;
                }
                if module != top {
                    top_graph.entry(top.clone()).or_default().entry(module).or_insert(at.clone());
                } else if let Some(c) = c.filter(|c| has_child(&top, c) && *c != child) {
                    if child != "mod" {
                        folders
                            .entry(top.clone())
                            .or_default()
                            .entry(child.clone())
                            .or_default()
                            .entry(c)
                            .or_insert(at.clone());
                    }
                }
            }
        }
    }
    (top_graph, folders)
}

/// A cycle of `g` as its edges' (from, to, where), if there is one.
fn cycle(g: &Graph) -> Option<Vec<(String, String, String)>> {
    fn visit(n: &str, g: &Graph, state: &mut BTreeMap<String, u8>, path: &mut Vec<String>) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        path.push(n.to_string());
        for m in g.get(n).map(|e| e.keys().cloned().collect::<Vec<_>>()).unwrap_or_default() {
            match state.get(&m).copied().unwrap_or(0) {
                1 => {
                    let start = path.iter().position(|p| *p == m).unwrap();
                    let mut c = path[start..].to_vec();
                    c.push(m);
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(&m, g, state, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if state.get(n).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, g, &mut state, &mut Vec::new()) {
                return Some(c.windows(2).map(|w| (w[0].clone(), w[1].clone(), g[&w[0]][&w[1]].clone())).collect());
            }
        }
    }
    None
}

fn describe(c: &[(String, String, String)]) -> String {
    c.iter().map(|(a, b, at)| format!("  {a} -> {b} ({at})")).collect::<Vec<_>>().join("\n")
}

/// Every module below another in the order it can be read (each only uses those before it).
fn order(g: &Graph) -> Vec<String> {
    let nodes: BTreeSet<String> = g.keys().chain(g.values().flat_map(|e| e.keys())).cloned().collect();
    let mut done: Vec<String> = Vec::new();
    while done.len() < nodes.len() {
        let next = nodes
            .iter()
            .find(|n| !done.contains(n) && g.get(*n).is_none_or(|e| e.keys().all(|m| done.contains(m))))
            .expect("acyclic")
            .clone();
        done.push(next);
    }
    done
}

#[test]
fn the_modules_form_a_dag() {
    let files = sources(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(files.len() > 30, "read {} files", files.len());
    let (top, folders) = graphs(&files);
    // The graph is real: the layers named in the README are there.
    for (a, b) in [("models", "nn"), ("methods", "train"), ("experiment", "methods"), ("tokenizer", "io")] {
        assert!(top.get(a).is_some_and(|e| e.contains_key(b)), "{a} should use {b}");
    }
    if let Some(c) = cycle(&top) {
        panic!("an import circle between modules:\n{}", describe(&c));
    }
    for (folder, g) in &folders {
        if let Some(c) = cycle(g) {
            panic!("an import circle between the files of src/{folder}/:\n{}", describe(&c));
        }
    }
    eprintln!("bottom-up: {}", order(&top).join(" → "));
}

#[test]
fn the_check_finds_a_new_circle() {
    let file = |p: &str, t: &str| (p.to_string(), t.to_string());
    let files = vec![
        file("lib.rs", "pub mod a;\npub mod b;\npub use a::thing::{Thing, Other};\n"),
        file("a/mod.rs", "pub mod thing;\npub mod other;\n"),
        file("a/thing.rs", "use crate::b::Helper; // crate::c is only a comment\n"),
        file("a/other.rs", "use super::thing::Thing;\n"),
        file("b.rs", "fn f() -> crate::Thing { todo!() }\n"),
    ];
    let (top, folders) = graphs(&files);
    let c = cycle(&top).expect("a -> b -> a (through the re-export Thing)");
    assert_eq!(c.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(c[0].2, "src/a/thing.rs:1");
    assert!(!top.contains_key("c") && !top.get("a").unwrap().contains_key("c"), "comments are not code");
    assert!(cycle(&folders["a"]).is_none());
    // Between files of one folder: other -> thing -> other.
    let mut files = files;
    files[2] = file("a/thing.rs", "use crate::a::other::X;\n");
    let (_, folders) = graphs(&files);
    let c = cycle(&folders["a"]).expect("thing <-> other");
    assert_eq!(c.len(), 2, "{}", describe(&c));
}
