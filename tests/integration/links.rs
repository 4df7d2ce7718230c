//! The front door (issue #22): the README stays short and everything else lives in `docs/`,
//! one file per reader's question. Nothing is lost in the move and nothing points nowhere:
//! every relative link and every `docs/…` anchor named in the README, the docs, the man pages
//! and `--help` resolves, and each error code of `error.rs` is documented exactly once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tope_ota::error::ErrorCode;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and docs/*.md, by path.
fn markdown() -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let readme = root().join("README.md");
    out.insert(readme.clone(), std::fs::read_to_string(&readme).unwrap());
    for e in std::fs::read_dir(root().join("docs")).expect("docs/ exists") {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            out.insert(p.clone(), std::fs::read_to_string(&p).unwrap());
        }
    }
    out
}

/// The text outside fenced code blocks (a shell example is no link).
fn prose(md: &str) -> String {
    // The fence that opened the block (its character, at least as many to close it).
    let mut fence: Option<(char, usize)> = None;
    let mut out = String::new();
    for l in md.lines() {
        let t = l.trim_start();
        let run = |ch: char| t.chars().take_while(|c| *c == ch).count();
        let opens = ['`', '~']
            .into_iter()
            .map(|ch| (ch, run(ch)))
            .find(|(_, n)| *n >= 3);
        match (fence, opens) {
            (None, Some(f)) => {
                fence = Some(f);
                out.push('\n');
                continue;
            }
            (Some((ch, n)), Some((c2, m))) if ch == c2 && m >= n => {
                fence = None;
                out.push('\n');
                continue;
            }
            _ => {}
        }
        if fence.is_none() {
            out.push_str(l);
        }
        out.push('\n');
    }
    out
}

/// GitHub's anchors of a Markdown file's headings (duplicates get `-1`, `-2`, …).
fn anchors(md: &str) -> Vec<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = Vec::new();
    for l in prose(md).lines() {
        let Some(title) = l.strip_prefix('#').map(|t| t.trim_start_matches('#')) else {
            continue;
        };
        if !title.starts_with(' ') {
            continue;
        }
        // A closing run of `#` is no part of the title.
        let slug: String = title
            .trim()
            .trim_end_matches('#')
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let n = seen.entry(slug.clone()).or_insert(0);
        out.push(if *n == 0 {
            slug.clone()
        } else {
            format!("{slug}-{n}")
        });
        *n += 1;
    }
    out
}

/// The links of Markdown prose: inline `[text](target)` and the targets of reference
/// definitions `[name]: target`.
fn md_links(md: &str) -> Vec<String> {
    let text = prose(md);
    let mut out = Vec::new();
    for l in text.lines() {
        let t = l.trim_start();
        // A reference definition (not a footnote's, not indented as code).
        if l.len() - t.len() >= 4 || t.starts_with("[^") {
            continue;
        }
        if let Some(def) = t.strip_prefix('[').and_then(|r| r.split_once("]:")) {
            if let Some(target) = def.1.split_whitespace().next() {
                out.push(target.to_string());
            }
        }
    }
    let mut rest = text.as_str();
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        match after.find(')') {
            Some(j) => {
                out.push(after[..j].trim().to_string());
                rest = &after[j..];
            }
            None => break,
        }
    }
    out
}

/// Every `docs/NAME.md` or `docs/NAME.md#anchor` named in a text.
fn docs_mentions(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in text.match_indices("docs/") {
        let tail: String = text[i..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || "/._-#".contains(*c))
            .collect();
        let tail = tail.trim_end_matches(['.', '#']);
        if tail.contains(".md") {
            out.push(tail.to_string());
        }
    }
    out
}

/// Whether `target` (a path relative to `base`, with an optional `#anchor`) resolves.
fn check(base: &Path, target: &str, from: &str, problems: &mut Vec<String>) {
    let (path, anchor) = match target.split_once('#') {
        Some((p, a)) => (p, Some(a)),
        None => (target, None),
    };
    let file = if path.is_empty() {
        PathBuf::from(from)
    } else {
        base.join(path)
    };
    if !file.exists() {
        problems.push(format!("{from}: {target}: no file {}", file.display()));
        return;
    }
    if let Some(a) = anchor {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        if !anchors(&text).iter().any(|x| x == a) {
            problems.push(format!(
                "{from}: {target}: no heading #{a} in {}",
                file.display()
            ));
        }
    }
}

/// Every help text the binary prints: the top level's and each subcommand's, long and short.
fn help_texts() -> Vec<(String, String)> {
    let mut cmd = tope_ota::cli::command();
    cmd.build();
    let mut out = vec![
        (
            "tope-ota --help".to_string(),
            cmd.render_long_help().to_string(),
        ),
        ("tope-ota -h".to_string(), cmd.render_help().to_string()),
    ];
    for sub in cmd.get_subcommands_mut() {
        let name = sub.get_name().to_string();
        out.push((
            format!("tope-ota {name} --help"),
            sub.render_long_help().to_string(),
        ));
    }
    out
}

#[test]
fn every_link_and_docs_anchor_resolves() {
    let md = markdown();
    assert!(
        md.len() >= 8,
        "docs/ holds the rest of the guide: {:?}",
        md.keys()
    );
    let mut problems = Vec::new();
    let mut checked = 0;
    for (path, text) in &md {
        let from = path.display().to_string();
        let base = path.parent().unwrap();
        for link in md_links(text) {
            let target = link
                .split_whitespace()
                .next()
                .unwrap_or("")
                .trim_matches(['<', '>']);
            if target.contains("://") || target.starts_with("mailto:") || target.is_empty() {
                continue;
            }
            check(base, target, &from, &mut problems);
            checked += 1;
        }
        // A `docs/…` path named in prose or code is relative to the repository's root.
        for m in docs_mentions(text) {
            check(&root(), &m, &from, &mut problems);
            checked += 1;
        }
    }
    for e in std::fs::read_dir(root().join("man")).unwrap() {
        let p = e.unwrap().path();
        let text = std::fs::read_to_string(&p).unwrap().replace("\\-", "-");
        for m in docs_mentions(&text) {
            check(&root(), &m, &p.display().to_string(), &mut problems);
            checked += 1;
        }
    }
    let mut help_mentions = 0;
    for (what, text) in help_texts() {
        for m in docs_mentions(&text) {
            check(&root(), &m, &what, &mut problems);
            help_mentions += 1;
        }
    }
    assert!(
        problems.is_empty(),
        "links that point nowhere:\n  {}",
        problems.join("\n  ")
    );
    assert!(
        checked > 50,
        "only {checked} links found: is the parser blind?"
    );
    assert!(
        help_mentions >= 3,
        "--help names docs/ only {help_mentions} times"
    );
}

#[test]
fn each_error_code_is_documented_exactly_once() {
    let md = markdown();
    let mut problems = Vec::new();
    for c in ErrorCode::ALL {
        let row = format!("| `{}` |", c.as_str());
        let places: Vec<String> = md
            .iter()
            .flat_map(|(p, text)| {
                text.lines()
                    .filter(|l| l.trim_start().starts_with(&row))
                    .map(move |_| p.display().to_string())
            })
            .collect();
        if places.len() != 1 {
            problems.push(format!("{}: documented in {places:?}", c.as_str()));
        }
    }
    assert!(
        problems.is_empty(),
        "each code is one row of one table (docs/errors.md):\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn the_readme_is_a_front_door_and_each_doc_says_what_it_is_for() {
    let md = markdown();
    let readme = &md[&root().join("README.md")];
    let lines = readme.lines().count();
    assert!(
        lines <= 250,
        "README.md has {lines} lines; move the rest into docs/"
    );
    for (path, text) in &md {
        if path.ends_with("README.md") {
            continue;
        }
        let mut ls = text.lines().filter(|l| !l.trim().is_empty());
        let title = ls.next().unwrap_or("");
        let purpose = ls.next().unwrap_or("");
        assert!(title.starts_with("# "), "{}: no title", path.display());
        assert!(
            !purpose.starts_with('#') && !purpose.is_empty(),
            "{}: no one-line purpose under the title",
            path.display()
        );
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(
            readme.contains(&format!("docs/{name}")),
            "the README does not link {name}"
        );
    }
}

/// The checker itself sees a broken anchor, a missing file and GitHub's slugs.
#[test]
fn the_link_check_sees_what_it_must() {
    assert_eq!(
        anchors("# A\n## serve: the HTTP API for device-api\n```\n# not a heading\n```\n## A\n~~~\n# no\n~~~\n## B ##\n"),
        ["a", "serve-the-http-api-for-device-api", "a-1", "b"]
    );
    assert_eq!(
        md_links("see [x](docs/a.md#b) and `[y](c.md)`\n```\n[z](d.md)\n```\n[r]: e.md#f\n~~~\n[s]: g.md\n```\n~~~\n[^1]: a note\n"),
        ["e.md#f", "docs/a.md#b", "c.md"]
    );
    assert_eq!(
        docs_mentions("More: docs/versions.md#rollback (in docs/). and docs/api.md."),
        ["docs/versions.md#rollback", "docs/api.md"]
    );
    let mut problems = Vec::new();
    let from = root().join("README.md").display().to_string();
    check(&root(), "README.md#no-such-heading", &from, &mut problems);
    check(&root(), "docs/no-such-file.md", &from, &mut problems);
    check(&root(), "Cargo.toml", &from, &mut problems);
    assert_eq!(problems.len(), 2, "{problems:?}");
}
