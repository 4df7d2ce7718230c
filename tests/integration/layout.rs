//! One home for each noun (issue #22): the modules of `src/` import each other without a
//! circle, so each can be read, tested and changed from the bottom up. A module is a file of
//! `src/` (`state` for `src/state.rs`), a subcommand (`cmd::install`), `cmd` (`src/cmd/mod.rs`)
//! or `lib` (the items of `src/lib.rs`). An import is any path that names another module: from
//! `crate::`, from `super::` (as often as it is repeated) or, in `lib.rs` and a `mod.rs`, a bare
//! path through a child module (`install::run`); in a `use`, a call or a type, test code
//! included. Comments do not count; strings are skipped.

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
                ("", "main") => continue,
                (p, "mod") => p.trim_end_matches("::").to_string(),
                (p, s) => format!("{p}{s}"),
            };
            let text = std::fs::read_to_string(&path).unwrap();
            out.insert(module, (path, strip_comments(&text)));
        }
    }
    out
}

/// The code without comments (doc comments included: a link in a doc is no import) and
/// without the contents of string and char literals.
fn strip_comments(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < c.len() {
        let next = c.get(i + 1).copied();
        match c[i] {
            '/' if next == Some('/') => {
                while i < c.len() && c[i] != '\n' {
                    i += 1;
                }
            }
            '/' if next == Some('*') => {
                let mut depth = 0;
                while i < c.len() {
                    if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                        depth += 1;
                        i += 2;
                    } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            // r"…", and br"…" or cr"…" (whose b or c was pushed already).
            'r' if (next == Some('"') || next == Some('#')) && !ident_before(&c[..i]) => {
                // A raw string: r"…", r#"…"#, …
                let mut j = i + 1;
                let mut hashes = 0;
                while c.get(j) == Some(&'#') {
                    hashes += 1;
                    j += 1;
                }
                if c.get(j) != Some(&'"') {
                    out.push(c[i]);
                    i += 1;
                    continue;
                }
                j += 1;
                while j < c.len() {
                    if c[j] == '"' && (0..hashes).all(|k| c.get(j + 1 + k) == Some(&'#')) {
                        j += 1 + hashes;
                        break;
                    }
                    j += 1;
                }
                out.push_str("\"\"");
                i = j;
            }
            '"' => {
                i += 1;
                while i < c.len() && c[i] != '"' {
                    i += if c[i] == '\\' { 2 } else { 1 };
                }
                out.push_str("\"\"");
                i += 1;
            }
            // A char literal ('x', '\n', '"'), not a lifetime ('a).
            '\'' if next == Some('\\') || c.get(i + 2) == Some(&'\'') => {
                // After the quote: an escape's two characters ('\'', '\\'), or one.
                let mut j = if next == Some('\\') { i + 3 } else { i + 2 };
                while j < c.len() && c[j] != '\'' {
                    j += 1;
                }
                out.push_str("' '");
                i = j + 1;
            }
            ch => {
                out.push(ch);
                i += 1;
            }
        }
    }
    out
}

/// Whether the characters before a `r` make it part of an identifier (`for`, `attr"`), not
/// a raw string's prefix (`r"`, `br"`, `cr"`).
fn ident_before(before: &[char]) -> bool {
    let is_ident = |c: &char| c.is_alphanumeric() || *c == '_';
    match before {
        [.., p, q] if (*q == 'b' || *q == 'c') && !is_ident(p) => false,
        [q] if *q == 'b' || *q == 'c' => false,
        [.., q] => is_ident(q),
        [] => false,
    }
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
    // The module's path from the crate root, and its children (a bare path through one of
    // them is an import in lib.rs and a mod.rs).
    let own: Vec<String> = match from {
        "lib" => Vec::new(),
        m => m.split("::").map(String::from).collect(),
    };
    let prefix = if own.is_empty() {
        String::new()
    } else {
        format!("{}::", own.join("::"))
    };
    let children: BTreeSet<String> = known
        .iter()
        .filter_map(|k| k.strip_prefix(prefix.as_str()))
        .filter(|rest| !rest.is_empty() && !rest.contains("::") && from != *rest)
        .map(String::from)
        .collect();
    let starts_path = |i: usize| {
        !text[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':' || c == '$')
    };
    // (where the path starts, the path it is relative to, whether it is `crate::`)
    let mut roots: Vec<(usize, Vec<String>, bool)> = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        if starts_path(i) {
            roots.push((i + "crate::".len(), Vec::new(), true));
        }
    }
    for (i, _) in text.match_indices("super::") {
        if !starts_path(i) {
            continue;
        }
        let mut at = i;
        let mut up = 0;
        while text[at..].starts_with("super::") {
            at += "super::".len();
            up += 1;
        }
        if up <= own.len() {
            roots.push((at, own[..own.len() - up].to_vec(), false));
        }
    }
    for child in &children {
        let pat = format!("{child}::");
        for (i, _) in text.match_indices(&pat) {
            if starts_path(i) {
                roots.push((i, own.clone(), false));
            }
        }
    }
    let mut out = BTreeSet::new();
    for (at, base, absolute) in roots {
        for path in use_tree(&text[at..]) {
            let full: Vec<String> = base.iter().cloned().chain(path).collect();
            let two = full[..full.len().min(2)].join("::");
            let target = if known.contains(&two) {
                two
            } else if full.first().is_some_and(|m| known.contains(m)) {
                full[0].clone()
            } else if absolute && !full.is_empty() {
                // An item of the crate root (`crate::report_failure`). (A `super::` that
                // reaches the root from a test module means its own file: never counted.)
                "lib".to_string()
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
    let has = |from: &str, to: &str| g[from].contains(to);
    assert!(has("transition", "operation"), "{:?}", g["transition"]);
    assert!(!has("transition", "cmd") && !has("snapshot", "integrity"));
    assert!(has("cmd", "cmd::heal"), "{:?}", g["cmd"]);
    assert!(has("cmd::heal", "cmd::download"), "{:?}", g["cmd::heal"]);
    assert!(
        !has("cmd::heal", "cmd"),
        "a subcommand imports from below cmd"
    );
    assert!(has("lib", "cmd::status"), "{:?}", g["lib"]);
}

/// The checker itself: it finds a circle through grouped uses, `super::` (once or more), a
/// parent's bare path into its child, an item of lib.rs and a plain path, and ignores
/// comments, strings and the rest of longer paths.
#[test]
fn the_circle_check_sees_what_it_must() {
    let mut mods = BTreeMap::new();
    let add = |mods: &mut BTreeMap<_, _>, m: &str, text: &str| {
        mods.insert(
            m.to_string(),
            (PathBuf::from(format!("{m}.rs")), strip_comments(text)),
        );
    };
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    add(
        &mut mods,
        "cmd",
        "pub use crate::{a::X, state::{self, Y}};\nfn run() { install::run() }",
    );
    add(
        &mut mods,
        "cmd::install",
        "use super::Output; // crate::b\nlet u = \"http://x\"; super::super::b::f();",
    );
    add(&mut mods, "a", "fn f() { crate::cmd::install::run() }");
    add(
        &mut mods,
        "b",
        "/// [`crate::a`]\nfn g() { let s = \"crate::a\"; let c = '\"'; crate::report() }",
    );
    add(
        &mut mods,
        "state",
        r##"use crate::b::deep::path::Z; /* crate::a */ let q = ['\'', '"']; let r = br#"x"y"#;"##,
    );
    // Neither literal swallows what follows.
    add(
        &mut mods,
        "tail",
        r#"let s = br"\"; let t = '\''; crate::state::f();"#,
    );
    add(&mut mods, "lib", "pub fn report() { state::f() }");
    let g = graph(&mods);
    assert_eq!(g["cmd"], set(&["a", "cmd::install", "state"]));
    assert_eq!(g["cmd::install"], set(&["b", "cmd"]));
    assert_eq!(g["a"], set(&["cmd::install"]));
    assert_eq!(g["b"], set(&["lib"]));
    assert_eq!(g["state"], set(&["b"]));
    assert_eq!(g["lib"], set(&["state"]));
    assert_eq!(g["tail"], set(&["state"]));
    let c = find_circle(&g).expect("a circle");
    assert_eq!(c.first(), c.last());
    // Without the parent's and the root's edges, none is left.
    add(&mut mods, "cmd", "pub use crate::{a::X};");
    add(&mut mods, "lib", "");
    add(
        &mut mods,
        "cmd::install",
        "let u = \"http://x\"; super::super::b::f();",
    );
    assert_eq!(find_circle(&graph(&mods)), None, "{:?}", graph(&mods));
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
