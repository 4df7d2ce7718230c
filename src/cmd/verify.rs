//! `verify`: compare snapshots with what was installed (their `.tope-ota/files.json`), every
//! file hashed. A technician's command: it takes no lock and changes nothing.

use crate::cli::{Global, VerifyArgs};
use crate::error::{fail, ErrorCode};
use crate::integrity::{self, Depth, Status};
use crate::output::Output;
use crate::snapshot::{self, Links};
use anyhow::Result;
use serde_json::json;

pub fn run(g: &Global, args: &VerifyArgs) -> Result<Output> {
    let root = &g.versions_dir;
    let links = Links::read(root);
    let mut dirs: Vec<String> = std::fs::read_dir(root)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| snapshot::version_of(n).is_some())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    let chosen: Vec<String> = if args.all {
        dirs
    } else {
        match args.version.as_deref() {
            None | Some("current") => links.current.clone().into_iter().collect(),
            Some("previous") => links.previous.clone().into_iter().collect(),
            Some("factory") => links.factory.clone().into_iter().collect(),
            Some(v) if dirs.iter().any(|d| d == v) => vec![v.to_string()],
            Some(v) => {
                crate::validate::version(v)?;
                dirs.into_iter()
                    .filter(|d| snapshot::version_of(d) == Some(v))
                    .collect()
            }
        }
    };
    if chosen.is_empty() {
        return fail(
            ErrorCode::InvalidRequest,
            format!(
                "no snapshot {} in {}",
                args.version.as_deref().unwrap_or("current"),
                root.display()
            ),
        );
    }
    let mut human = String::new();
    let mut report = Vec::new();
    let mut changed = 0;
    for d in &chosen {
        let st = integrity::check(&root.join(d), Depth::Full, snapshot::is_factory_dir(d));
        let mut names: Vec<&str> = Vec::new();
        for (n, l) in [
            ("current", &links.current),
            ("previous", &links.previous),
            ("factory", &links.factory),
        ] {
            if l.as_deref() == Some(d.as_str()) {
                names.push(n);
            }
        }
        let tag = if names.is_empty() {
            String::new()
        } else {
            format!(" ({})", names.join(", "))
        };
        let (status, changes) = match &st {
            Status::Intact => ("intact", Vec::new()),
            Status::Unrecorded => ("unrecorded", Vec::new()),
            Status::NewerRecord(_) => ("newer-record", Vec::new()),
            Status::Changed(c) => {
                changed += 1;
                ("changed", c.clone())
            }
        };
        human.push_str(&format!("{d}{tag}: {status}\n"));
        for c in &changes {
            human.push_str(&format!("  {c}\n"));
        }
        report.push(json!({
            "snapshot": d,
            "version": snapshot::version_of(d),
            "links": names,
            "status": status,
            "changes": changes,
        }));
    }
    let (lines, updaters, bad) = kept_updaters(g);
    human.push_str(&lines);
    changed += bad;
    let data = json!({ "snapshots": report, "updaters": updaters });
    if changed == 0 {
        return Ok(Output::success(human, data));
    }
    Ok(Output {
        human,
        json: json!({
            "code": 409,
            "msg": format!("{changed} snapshot(s) or kept updater(s) changed since they were installed"),
            "error": null,
            "data": data,
        }),
        exit: 1,
    })
}

/// The updaters kept under the state dir (the proven one, one on trial): each file hashed
/// against its record, and its path checked to be one only root can write. Reported, never
/// changed (the `.deb` binary marks a changed one bad before it would run it).
fn kept_updaters(g: &Global) -> (String, Vec<serde_json::Value>, usize) {
    let rec = match crate::proven::read(&g.state_dir) {
        Ok(r) => r,
        Err(e) => {
            return (
                format!("updaters: the record cannot be read: {e:#}\n"),
                Vec::new(),
                1,
            )
        }
    };
    let mut human = String::new();
    let mut out = Vec::new();
    let mut bad = 0;
    let kept = rec
        .good
        .iter()
        .map(|k| ("proven", k))
        .chain(rec.trial.iter().map(|t| ("on trial", &t.kept)));
    for (role, k) in kept {
        let path = crate::proven::binary(&g.state_dir, &k.sha256);
        let status = match crate::integrity::sha256_file(&path) {
            Ok(h) if h != k.sha256 => format!("changed: SHA-256 {h}"),
            Ok(_) => match crate::proven::unsafe_path(&path) {
                Some(why) => format!("unsafe: {why}"),
                None => "intact".to_string(),
            },
            Err(e) => format!("unreadable: {e:#}"),
        };
        if status != "intact" {
            bad += 1;
        }
        human.push_str(&format!(
            "updater {} ({role}, {}): {status}\n",
            k.version,
            path.display()
        ));
        out.push(json!({
            "role": role,
            "version": k.version,
            "release": k.release,
            "path": path,
            "sha256": k.sha256,
            "signed_by": k.signed_by,
            "status": status,
        }));
    }
    (human, out, bad)
}
