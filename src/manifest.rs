//! `manifest.json` at the package root: what to install where, and which services to restart.

use crate::error::{fail, ErrorCode};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::{Component, Path};

/// The manifest's file name at the ZIP root.
pub const MANIFEST: &str = "manifest.json";
/// Where a package's updater lands in the snapshot: the one module with `"updater": true` has
/// exactly this `dst`, and no other module may place a file there.
pub const UPDATER_DST: &str = "bin/tope-ota";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: String,
    pub modules: Vec<Module>,
    #[serde(default)]
    pub reboot: bool,
    /// Paths inside the snapshot (files or directories) that hold the version's changing data:
    /// not recorded, so `verify` and the rollback checks do not report them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutable: Option<Vec<String>>,
    /// Run in the new snapshot after its mutable data was carried over from `current` and
    /// before anything starts: converts that data for this version (bounded, not retried).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrate: Option<HookCommand>,
}

/// A command a package runs from its snapshot: a string split on whitespace, or an argv array
/// (no shell either way). A program path with a `/` that is relative is inside the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HookCommand {
    Line(String),
    Argv(Vec<String>),
}

impl HookCommand {
    pub fn argv(&self) -> Vec<String> {
        match self {
            HookCommand::Line(s) => s.split_whitespace().map(str::to_string).collect(),
            HookCommand::Argv(v) => v.clone(),
        }
    }

    /// Check the command's shape: at most 64 arguments and 4 KiB, no NUL, a program that is
    /// absolute, a bare name (looked up in PATH) or a clean relative path inside the snapshot.
    pub fn check(&self, who: &str) -> Result<()> {
        let argv = self.argv();
        let Some(prog) = argv.first().filter(|p| !p.is_empty()) else {
            return invalid(format!("{who}: the command is empty"));
        };
        if argv.len() > 64 || argv.iter().map(|a| a.len() + 1).sum::<usize>() > 4096 {
            return invalid(format!(
                "{who}: the command is longer than 64 arguments or 4 KiB"
            ));
        }
        if argv.iter().any(|a| a.contains('\0')) {
            return invalid(format!("{who}: the command holds a NUL byte"));
        }
        if prog.contains('/') && !prog.starts_with('/') && !is_clean_relative(prog) {
            return invalid(format!(
                "{who}: program {prog:?} must be absolute, a bare name, or a clean relative path inside the snapshot"
            ));
        }
        Ok(())
    }

    /// The program's path inside the snapshot when it is relative (to check it was installed).
    pub fn snapshot_program(&self) -> Option<String> {
        let prog = self.argv().into_iter().next()?;
        (prog.contains('/') && !prog.starts_with('/')).then_some(prog)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Module {
    pub name: String,
    /// A file, or a directory (every entry below it), inside the ZIP.
    pub src: String,
    /// Where it goes inside the version snapshot.
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_order: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub md5: Option<String>,
    /// Run from the new snapshot after the services started and before success: exit 0 means
    /// the module works. Retried until the health deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HookCommand>,
    /// This module is a tope-ota binary for the device (issue #23): it lands at
    /// [`UPDATER_DST`] in the snapshot like any file; it is not a service.
    #[serde(default, skip_serializing_if = "is_false")]
    pub updater: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn invalid<T>(detail: String) -> Result<T> {
    fail(ErrorCode::ManifestInvalid, detail)
}

/// A relative path of normal components only (no `.`, `..`, root, empty parts or `\`).
pub fn is_clean_relative(p: &str) -> bool {
    // Path::components() silently drops inner `.` parts, so check the raw parts too.
    !p.is_empty()
        && !p.contains('\0')
        && !p.contains('\\')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

impl Manifest {
    /// Parse and check a manifest for `version`. `in_zip(src)` tells whether `src` names a file
    /// or directory of the package.
    pub fn parse(bytes: &[u8], version: &str, in_zip: impl Fn(&str) -> bool) -> Result<Manifest> {
        let m: Manifest = match serde_json::from_slice(bytes) {
            Ok(m) => m,
            Err(e) => return invalid(format!("manifest.json: {e}")),
        };
        if m.version != version {
            return invalid(format!(
                "manifest version {:?} differs from the requested version {version:?}",
                m.version
            ));
        }
        if m.modules.is_empty() {
            return invalid("manifest lists no modules".into());
        }
        let mut dsts: HashSet<&str> = HashSet::new();
        let updaters: Vec<&Module> = m.modules.iter().filter(|md| md.updater).collect();
        if updaters.len() > 1 {
            return invalid(format!(
                "{} modules say \"updater\": true; a package carries at most one updater",
                updaters.len()
            ));
        }
        for md in &updaters {
            let who = format!("module {:?}", md.name);
            if md.dst != UPDATER_DST {
                return invalid(format!(
                    "{who}: an updater's dst must be {UPDATER_DST:?}, not {:?}",
                    md.dst
                ));
            }
            if md.process_name.is_some() || md.restart_order.is_some() || md.health.is_some() {
                return invalid(format!(
                    "{who}: an updater is not a service: no process_name, restart_order or health"
                ));
            }
        }
        for md in &m.modules {
            let who = format!("module {:?}", md.name);
            if md.dst.starts_with(&format!("{UPDATER_DST}/")) {
                return invalid(format!(
                    "{who}: dst {:?} would make the updater's path {UPDATER_DST:?} a directory",
                    md.dst
                ));
            }
            if !md.updater && md.dst == UPDATER_DST {
                return invalid(format!(
                    "{who}: dst {UPDATER_DST:?} is the updater's: the module must say \"updater\": true"
                ));
            }
            if md.name.is_empty() {
                return invalid("a module has an empty name".into());
            }
            if !is_clean_relative(&md.src) {
                return invalid(format!(
                    "{who}: src {:?} is not a clean relative path",
                    md.src
                ));
            }
            if !in_zip(&md.src) {
                return invalid(format!("{who}: src {:?} is not in the package", md.src));
            }
            if !is_clean_relative(&md.dst) {
                return invalid(format!(
                    "{who}: dst {:?} must be a clean relative path inside the snapshot",
                    md.dst
                ));
            }
            let top = md.dst.split('/').next().unwrap_or("");
            if top == crate::snapshot::META_DIR {
                return invalid(format!(
                    "{who}: dst {:?} is tope-ota's own directory",
                    md.dst
                ));
            }
            if !dsts.insert(md.dst.as_str()) {
                return invalid(format!("two modules have dst {:?}", md.dst));
            }
            if let Some(md5) = &md.md5 {
                if md5.len() != 32 || !md5.bytes().all(|c| c.is_ascii_hexdigit()) {
                    return invalid(format!("{who}: md5 {md5:?} is not 32 hex digits"));
                }
            }
            if let Some(h) = &md.health {
                h.check(&format!("{who}: health"))?;
            }
            if let Some(p) = &md.process_name {
                let ok = !p.is_empty()
                    && p.len() <= 256
                    && !p.starts_with('-')
                    && p.bytes()
                        .all(|c| c.is_ascii_alphanumeric() || b"@._:-\\".contains(&c));
                if !ok {
                    return invalid(format!("{who}: process_name {p:?} is not a unit name"));
                }
            }
        }
        for p in m.mutable.iter().flatten() {
            if !is_clean_relative(p) || p.split('/').next() == Some(crate::snapshot::META_DIR) {
                return invalid(format!(
                    "mutable path {p:?} must be a clean relative path inside the snapshot"
                ));
            }
            if UPDATER_DST == p || UPDATER_DST.starts_with(&format!("{p}/")) {
                return invalid(format!(
                    "mutable path {p:?} holds the updater's path {UPDATER_DST:?}: it would be data a service writes"
                ));
            }
        }
        if m.mutable.as_ref().is_some_and(|v| v.len() > 256) {
            return invalid("more than 256 mutable paths".into());
        }
        let mutable = m.mutable.as_deref().unwrap_or(&[]);
        let inside = |a: &str, b: &str| a == b || a.starts_with(&format!("{b}/"));
        for (i, a) in mutable.iter().enumerate() {
            for b in &mutable[i + 1..] {
                if inside(a, b) || inside(b, a) {
                    return invalid(format!("mutable paths {a:?} and {b:?} overlap"));
                }
            }
        }
        if let Some(c) = &m.migrate {
            c.check("migrate")?;
        }
        for a in &dsts {
            for b in &dsts {
                if a != b && b.starts_with(&format!("{a}/")) {
                    return invalid(format!(
                        "dst {b:?} lies inside the dst {a:?} of another module"
                    ));
                }
            }
        }
        Ok(m)
    }

    /// The module that carries the updater, if any.
    pub fn updater(&self) -> Option<&Module> {
        self.modules.iter().find(|m| m.updater)
    }

    /// The services to restart, in start order (by `restart_order`, then manifest order;
    /// modules without an order start last), each once.
    pub fn services(&self) -> Vec<crate::services::Service> {
        let mut v: Vec<(i64, usize, String)> = Vec::new();
        for (i, md) in self.modules.iter().enumerate() {
            if let Some(p) = &md.process_name {
                if v.iter().any(|(_, _, n)| n == p) {
                    continue;
                }
                v.push((md.restart_order.unwrap_or(i64::MAX), i, p.clone()));
            }
        }
        v.sort();
        v.into_iter()
            .map(|(order, _, name)| crate::services::Service {
                name,
                order: (order != i64::MAX).then_some(order),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_paths() {
        for ok in ["bin/x", "a", "a/b/c.so"] {
            assert!(is_clean_relative(ok), "{ok}");
        }
        for bad in [
            "", "/abs", "a/../b", "./a", "a/./b", "a//b", "a/", "..", "a\\b",
        ] {
            assert!(!is_clean_relative(bad), "{bad}");
        }
    }

    #[test]
    fn the_updater_module_is_checked() {
        let parse = |modules: &str| {
            Manifest::parse(
                format!(r#"{{"version":"1","modules":[{modules}]}}"#).as_bytes(),
                "1",
                |_| true,
            )
            .map_err(|e| crate::error::classify(&e).detail)
        };
        let ok = parse(r#"{"name":"u","src":"tope-ota","dst":"bin/tope-ota","updater":true}"#);
        assert_eq!(ok.unwrap().updater().unwrap().name, "u");
        for (modules, why) in [
            (
                r#"{"name":"u","src":"t","dst":"bin/ota","updater":true}"#,
                "an updater's dst must be",
            ),
            (
                r#"{"name":"u","src":"t","dst":"bin/tope-ota"}"#,
                "must say \"updater\": true",
            ),
            (
                r#"{"name":"u","src":"t","dst":"bin/tope-ota","updater":true,"process_name":"x"}"#,
                "not a service",
            ),
            (
                r#"{"name":"u","src":"t","dst":"bin/tope-ota","updater":true},{"name":"v","src":"t","dst":"bin/tope-ota","updater":true}"#,
                "at most one updater",
            ),
        ] {
            let e = parse(modules).unwrap_err();
            assert!(e.contains(why), "{modules}: {e}");
        }
    }

    #[test]
    fn services_in_order() {
        let m: Manifest = serde_json::from_str(
            r#"{"version":"1","modules":[
            {"name":"a","src":"a","dst":"a","process_name":"late"},
            {"name":"b","src":"b","dst":"b","process_name":"second","restart_order":2},
            {"name":"c","src":"c","dst":"c","process_name":"first","restart_order":1},
            {"name":"d","src":"d","dst":"d"}]}"#,
        )
        .unwrap();
        let names: Vec<String> = m.services().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["first", "second", "late"]);
    }
}
