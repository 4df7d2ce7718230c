//! One home for each noun (issue #22): the modules of `src/` import each other without a
//! circle, so each can be read, tested and changed from the bottom up. A module is a file of
//! `src/` (`state` for `src/state.rs`) or a subcommand (`cmd::install`); `cmd` is
//! `src/cmd/mod.rs`. An import is any `crate::…` path (a `use`, a call, a type; test code
//! included), and `super::…` in a subcommand; comments do not count.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every module of `src/` and its text, comments removed.
fn modules(src: &Path) -> BTreeMap<String, (PathBuf, String)> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![(src.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = dirs.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            if path.is_dir() {
                dirs.push((path, format!("{prefix}{name}::")));
                continue;
            }
            let Some(stem) = name.strip_suffix(".rs") else {
                continue;
            };
            let module = match (prefix.as_str(), stem) {
                ("", "lib" | "main") => continue,
                (p, "mod") => p.trim_end_matches("::").to_string(),
                (p, s) => format!("{p}{s}"),
            };
            let text = std::fs::read_to_string(&path).unwrap();
            out.insert(module, (path, strip_comments(&text)));
        }
    }
    out
}

/// The text without `//` comments (doc comments included: a link in a doc is no import).
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            // A `//` inside a string (a URL) cuts the rest of the line: no import hides there.
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first two segments of every path of the use tree at the start of `s`
/// (`a::b`, `{a, b::{c, d}}`, `a::*`).
fn use_tree(s: &str) -> Vec<Vec<String>> {
    fn tree(s: &[u8], i: &mut usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
        let skip_ws = |i: &mut usize| {
            while *i < s.len() && s[*i].is_ascii_whitespace() {
                *i += 1;
            }
        };
        skip_ws(i);
        if *i < s.len() && s[*i] == b'{' {
            *i += 1;
            loop {
                skip_ws(i);
                if *i >= s.len() || s[*i] == b'}' {
                    *i += 1;
                    return;
                }
                let at = *i;
                tree(s, i, prefix, out);
                if *i == at {
                    // A token no use tree has: step over it rather than loop.
                    *i += 1;
                }
                skip_ws(i);
                if *i < s.len() && s[*i] == b',' {
                    *i += 1;
                }
            }
        }
        let start = *i;
        while *i < s.len() && (s[*i].is_ascii_alphanumeric() || s[*i] == b'_') {
            *i += 1;
        }
        let ident = std::str::from_utf8(&s[start..*i]).unwrap().to_string();
        if ident.is_empty() {
            // `*` or the end of the tree.
            if *i < s.len() && s[*i] == b'*' {
                *i += 1;
            }
            if !prefix.is_empty() {
                out.push(prefix.to_vec());
            }
            return;
        }
        let mut path = prefix.to_vec();
        path.push(ident);
        if s[*i..].starts_with(b"::") && path.len() < 2 {
            *i += 2;
            tree(s, i, &path, out);
        } else {
            out.push(path);
            // Skip the rest of a longer path (`a::b::c`) up to where the tree goes on.
            let mut depth = 0usize;
            while *i < s.len() {
                match s[*i] {
                    b'{' => depth += 1,
                    b'}' if depth == 0 => return,
                    b'}' => depth -= 1,
                    b',' if depth == 0 => return,
                    c if depth == 0 && !(c.is_ascii_alphanumeric() || c == b'_' || c == b':') => {
                        return
                    }
                    _ => {}
                }
                *i += 1;
            }
        }
    }
    let mut out = Vec::new();
    tree(s.as_bytes(), &mut 0, &[], &mut out);
    out
}

/// The modules `text` (of module `from`) imports, among `known`.
fn imports(from: &str, text: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut roots: Vec<(usize, bool)> = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        let prev = text[..i].chars().next_back();
        if !prev.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            roots.push((i + "crate::".len(), false));
        }
    }
    if from.starts_with("cmd::") {
        for (i, _) in text.match_indices("super::") {
            let prev = text[..i].chars().next_back();
            if !prev.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                roots.push((i + "super::".len(), true));
            }
        }
    }
    for (at, in_cmd) in roots {
        for mut path in use_tree(&text[at..]) {
            if in_cmd {
                path.insert(0, "cmd".to_string());
            }
            let two = path[..path.len().min(2)].join("::");
            let target = if known.contains(&two) {
                two
            } else if known.contains(&path[0]) {
                path[0].clone()
            } else {
                continue;
            };
            if target != from {
                out.insert(target);
            }
        }
    }
    out
}

/// A circle of the graph, when there is one.
fn find_circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(n) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let from = stack.iter().position(|s| s == n).unwrap();
                let mut circle = stack[from..].to_vec();
                circle.push(n.to_string());
                return Some(circle);
            }
            None => {}
        }
        marks.insert(n.to_string(), Mark::Open);
        stack.push(n.to_string());
        for m in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, graph, marks, stack) {
                return Some(c);
            }
        }
        stack.pop();
        marks.insert(n.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for n in graph.keys() {
        if let Some(c) = visit(n, graph, &mut marks, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

fn graph(mods: &BTreeMap<String, (PathBuf, String)>) -> BTreeMap<String, BTreeSet<String>> {
    let known: BTreeSet<String> = mods.keys().cloned().collect();
    mods.iter()
        .map(|(m, (_, text))| (m.clone(), imports(m, text, &known)))
        .collect()
}

#[test]
fn the_import_graph_has_no_circle() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mods = modules(&src);
    assert!(
        mods.len() > 30 && mods.contains_key("cmd::install"),
        "{mods:?}"
    );
    let g = graph(&mods);
    // The reader sees the edges that make it.
    if let Some(circle) = find_circle(&g) {
        let mut why = String::new();
        for w in circle.windows(2) {
            why.push_str(&format!(
                "  {} -> {} (in {})\n",
                w[0],
                w[1],
                mods[&w[0]].0.display()
            ));
        }
        panic!(
            "the modules import each other in a circle:\n{why}move what both need into one \
             of them or a module below both"
        );
    }
    // The edges the issue names are gone, and the graph still sees imports at all.
    assert!(
        g["transition"].contains("operation"),
        "{:?}",
        g["transition"]
    );
    assert!(g["cmd::heal"].contains("cmd"), "{:?}", g["cmd::heal"]);
}

/// The checker itself: it finds a circle through grouped uses, `super::` in a subcommand and
/// a plain path, and ignores comments and longer paths.
#[test]
fn the_circle_check_sees_what_it_must() {
    let mut mods = BTreeMap::new();
    let add = |mods: &mut BTreeMap<_, _>, m: &str, text: &str| {
        mods.insert(
            m.to_string(),
            (PathBuf::from(format!("{m}.rs")), strip_comments(text)),
        );
    };
    add(&mut mods, "cmd", "pub use crate::{a::X, state::{self, Y}};");
    add(&mut mods, "cmd::install", "use super::Output; // crate::b");
    add(&mut mods, "a", "fn f() { crate::cmd::install::run() }");
    add(&mut mods, "b", "/// [`crate::a`]\nfn g() {}");
    add(&mut mods, "state", "use crate::b::deep::path::Z;");
    let g = graph(&mods);
    assert_eq!(g["cmd"], ["a", "state"].map(String::from).into());
    assert_eq!(g["cmd::install"], ["cmd"].map(String::from).into());
    assert_eq!(g["a"], ["cmd::install"].map(String::from).into());
    assert!(g["b"].is_empty());
    assert_eq!(g["state"], ["b"].map(String::from).into());
    let c = find_circle(&g).expect("a -> cmd::install -> cmd -> a");
    assert_eq!(c.first(), c.last());
    assert!(c.len() == 4, "{c:?}");
    add(&mut mods, "a", "fn f() {}");
    assert_eq!(find_circle(&graph(&mods)), None);
}

/// `lib.rs`'s `# Layout` names every module with one line, so a newcomer finds each noun.
#[test]
fn the_layout_lists_every_module() {
    let lib = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs"))
        .unwrap();
    let listed: BTreeSet<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("//! - [`"))
        .filter_map(|l| l.split_once("`]").map(|(m, _)| m))
        .collect();
    let declared: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';'))
        .collect();
    assert!(declared.len() > 30, "{declared:?}");
    let missing: Vec<&&str> = declared.iter().filter(|m| !listed.contains(*m)).collect();
    assert!(missing.is_empty(), "not in lib.rs's # Layout: {missing:?}");
}
