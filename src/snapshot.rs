//! Version snapshots under the versions root: their dir names, the `current`, `previous` and
//! `factory` symlinks that select them, building a new snapshot as a hard-linked mirror or as a
//! private copy, and the services list each snapshot carries.
//!
//! A snapshot dir is named `v<version>`, or `v<version>~<n>` when a fresh snapshot of a version
//! is built while another of the same version is still kept (a rollback to factory), or
//! `v<version>~factory` for the factory's private, read-only copy. The version is the part
//! between `v` and `~`; `~` is outside the version alphabet, so the names never collide.

use crate::fsutil;
use crate::services::{self, Service};
use anyhow::{Context, Result};
use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub const CURRENT: &str = "current";
pub const PREVIOUS: &str = "previous";
pub const FACTORY: &str = "factory";
/// Inside a snapshot: what tope-ota keeps about that version.
pub const META_DIR: &str = ".tope-ota";
const SERVICES_FILE: &str = "services.json";
/// The suffix of the factory's private copy.
pub const FACTORY_TAG: &str = "~factory";

/// The version a snapshot dir name stands for (`v1.2.0`, `v1.2.0~2`, `v1.2.0~factory`).
pub fn version_of(dir: &str) -> Option<&str> {
    let rest = dir.strip_prefix('v')?;
    let (v, tag) = match rest.split_once('~') {
        Some((v, t)) => (v, Some(t)),
        None => (rest, None),
    };
    let tag_ok = tag.is_none_or(|t| {
        t == &FACTORY_TAG[1..] || (!t.is_empty() && t.bytes().all(|c| c.is_ascii_digit()))
    });
    (tag_ok && crate::validate::version(v).is_ok()).then_some(v)
}

/// True for the factory's private copy, which nothing but `tope-ota factory` creates.
pub fn is_factory_dir(dir: &str) -> bool {
    dir.ends_with(FACTORY_TAG) && version_of(dir).is_some()
}

/// The snapshot dir names the three symlinks point to (None when missing, dangling or not a
/// snapshot dir name).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Links {
    pub current: Option<String>,
    pub previous: Option<String>,
    pub factory: Option<String>,
}

impl Links {
    pub fn read(root: &Path) -> Links {
        Links {
            current: link_dir(root, CURRENT),
            previous: link_dir(root, PREVIOUS),
            factory: link_dir(root, FACTORY),
        }
    }

    /// The version `current` runs.
    pub fn current_version(&self) -> Option<&str> {
        self.current.as_deref().and_then(version_of)
    }

    pub fn previous_version(&self) -> Option<&str> {
        self.previous.as_deref().and_then(version_of)
    }

    pub fn factory_version(&self) -> Option<&str> {
        self.factory.as_deref().and_then(version_of)
    }

    /// Whether any link points at the snapshot dir `dir`.
    pub fn references(&self, dir: &str) -> bool {
        [&self.current, &self.previous, &self.factory]
            .iter()
            .any(|l| l.as_deref() == Some(dir))
    }
}

/// The plain dir name of a version's snapshot.
pub fn dir_name(version: &str) -> String {
    format!("v{version}")
}

/// The highest `n` of the `v<version>~<n>` dirs in `root` (the factory's `~factory` is not
/// one), if any.
pub fn max_suffix(root: &Path, version: &str) -> Option<u64> {
    let prefix = format!("{}~", dir_name(version));
    fs::read_dir(root)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let rest = name.to_str()?.strip_prefix(&prefix)?.to_string();
            rest.parse::<u64>().ok()
        })
        .max()
}

/// A dir name for a new snapshot of `version` that is newer than every snapshot of it in
/// `root`: `v<version>` when there is none, else `v<version>~<n>` with `n` one above the highest
/// kept (2 with only the plain name). A name freed by prune is never given to a newer snapshot
/// while an older one of the version is kept, so the highest `~n` is always the newest and the
/// plain name the oldest.
pub fn fresh_dir_name(root: &Path, version: &str) -> String {
    let plain = dir_name(version);
    match max_suffix(root, version) {
        Some(n) => format!("{plain}~{}", n.max(1) + 1),
        None if fs::symlink_metadata(root.join(&plain)).is_err() => plain,
        None => format!("{plain}~2"),
    }
}

/// The dir a symlink in `root` points to, from its target's last component, when that is a
/// snapshot dir name and an existing directory.
pub fn link_dir(root: &Path, name: &str) -> Option<String> {
    let target = fs::read_link(root.join(name)).ok()?;
    let last = target.file_name()?.to_str()?;
    version_of(last)?;
    root.join(name).is_dir().then(|| last.to_string())
}

/// Point the symlink `name` at the snapshot dir `dir` unless it already does (a temp symlink
/// renamed over the old one). Returns whether it changed; the caller fsyncs the root.
pub fn set_link(root: &Path, name: &str, dir: &str) -> Result<bool> {
    if fs::read_link(root.join(name)).ok().as_deref() == Some(Path::new(dir)) {
        return Ok(false);
    }
    fsutil::replace_symlink(root, name, Path::new(dir))?;
    Ok(true)
}

/// Point `previous` (when given) and then `current` at snapshot dirs, each only if it does not
/// already, then fsync the root once if anything changed. `current` goes last, so a crash in
/// between leaves the running software as it was.
pub fn switch(root: &Path, previous: Option<&str>, current: &str) -> Result<()> {
    let mut changed = false;
    if let Some(p) = previous {
        changed |= set_link(root, PREVIOUS, p)?;
        crate::failpoint::hit("mid-switch");
    }
    changed |= set_link(root, CURRENT, current)?;
    if changed {
        fsutil::sync_dir(root)?;
    }
    Ok(())
}

/// How a mirror places one entry of the snapshot it mirrors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pick {
    /// A hard link (a file), or recreated (a dir, a symlink).
    Link,
    /// A private copy, sharing no inode.
    Copy,
    /// Left out.
    Skip,
}

/// Mirror `src` into the empty dir `dst`: directories recreated with their modes, files hard
/// linked (sharing the inode: never to be written through `dst`), symlinks copied. Paths under
/// `skip` are left out (the mutable data the new version gets once services stopped); files
/// under `private` are copied instead of linked (data the old version wrote in place).
pub fn mirror(src: &Path, dst: &Path, skip: &[String], private: &[String]) -> Result<u64> {
    let pick = |rel: &str| {
        if within(rel, skip) {
            Pick::Skip
        } else if within(rel, private) {
            Pick::Copy
        } else {
            Pick::Link
        }
    };
    walk_into(src, dst, "", &pick)
}

/// Copy `src` into the empty dir `dst`, sharing no inode with it (reflinks where the
/// filesystem can): the way a factory snapshot is made and a rollback to it is built. Every
/// file is fsynced; the caller makes the directories durable.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<u64> {
    walk_into(src, dst, "", &|_| Pick::Copy)
}

/// Recreate the tree `src` in `dst` (dirs with owner and mode, symlinks as they are), placing
/// each regular file as `pick` says for its path relative to the top.
fn walk_into(src: &Path, dst: &Path, rel: &str, pick: &dyn Fn(&str) -> Pick) -> Result<u64> {
    let mut count = 0;
    for entry in fs::read_dir(src).with_context(|| format!("read dir {}", src.display()))? {
        let entry = entry.with_context(|| format!("read dir {}", src.display()))?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let how = pick(&rel);
        if how == Pick::Skip {
            continue;
        }
        let ft = entry.file_type()?;
        if ft.is_dir() {
            let meta = entry.metadata()?;
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&to)
                .with_context(|| format!("create dir {}", to.display()))?;
            count += walk_into(&from, &to, &rel, pick)?;
            // Keep the owner: a service that writes in its directory must still be able to.
            std::os::unix::fs::lchown(&to, Some(meta.uid()), Some(meta.gid()))
                .with_context(|| format!("chown {}", to.display()))?;
            fs::set_permissions(&to, fs::Permissions::from_mode(meta.mode() & 0o7777))
                .with_context(|| format!("chmod {}", to.display()))?;
        } else if ft.is_symlink() {
            let target =
                fs::read_link(&from).with_context(|| format!("readlink {}", from.display()))?;
            fsutil::symlink(&target, &to)?;
            let meta = fs::symlink_metadata(&from)?;
            std::os::unix::fs::lchown(&to, Some(meta.uid()), Some(meta.gid()))
                .with_context(|| format!("chown {}", to.display()))?;
        } else if ft.is_file() {
            if how == Pick::Copy {
                fsutil::copy_file(&from, &to)?;
            } else {
                fs::hard_link(&from, &to)
                    .with_context(|| format!("hard link {} to {}", from.display(), to.display()))?;
            }
        } else {
            log::warn!("not copying special file {}", from.display());
            continue;
        }
        count += 1;
    }
    Ok(count)
}

/// The services of the version in `dir` (empty when it has no list).
pub fn read_services(dir: &Path) -> Vec<Service> {
    let path = dir.join(META_DIR).join(SERVICES_FILE);
    fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The `.tope-ota` dir of the snapshot under construction at `dir`, created as a real
/// directory: whatever else stands there (a symlink above all) goes, as we never write through
/// a link.
pub fn meta_dir(dir: &Path) -> Result<PathBuf> {
    let meta = dir.join(META_DIR);
    match fs::symlink_metadata(&meta) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => fs::remove_file(&meta).with_context(|| format!("remove {}", meta.display()))?,
        Err(_) => {}
    }
    if !meta.is_dir() {
        fs::create_dir(&meta).with_context(|| format!("create dir {}", meta.display()))?;
    }
    Ok(meta)
}

/// Write the services list of the snapshot at `dir` as a new file (never through a hard link).
pub fn write_services(dir: &Path, list: &[Service]) -> Result<()> {
    let meta = meta_dir(dir)?;
    let bytes = serde_json::to_vec_pretty(&services::start_order(list.to_vec()))?;
    fsutil::write_atomic(&meta.join(SERVICES_FILE), &bytes)
}

/// Remove the snapshot dirs (`v<version>` names, never the factory's copy) that no symlink in
/// `root` points to; nothing else in the root is touched. Returns the names removed.
pub fn prune(root: &Path) -> Result<Vec<String>> {
    let mut referenced = HashSet::new();
    let mut candidates = Vec::new();
    for entry in fs::read_dir(root).with_context(|| format!("read dir {}", root.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ft = entry.file_type()?;
        if ft.is_symlink() {
            if let Ok(t) = fs::read_link(entry.path()) {
                if let Some(n) = t.file_name() {
                    referenced.insert(n.to_string_lossy().into_owned());
                }
            }
        } else if ft.is_dir() && version_of(&name).is_some() && !is_factory_dir(&name) {
            candidates.push(name);
        }
    }
    let mut removed = Vec::new();
    for name in candidates {
        if !referenced.contains(&name) {
            fsutil::remove_tree_durable(&root.join(&name))?;
            removed.push(name);
        }
    }
    Ok(removed)
}

/// Prune, logging instead of failing: cleaning up never decides an operation's outcome.
pub fn prune_best_effort(root: &Path) {
    match prune(root) {
        Ok(removed) if !removed.is_empty() => {
            log::info!("removed unused snapshot(s) {}", removed.join(", "))
        }
        Ok(_) => {}
        Err(e) => log::warn!("removing unused snapshots: {e:#}"),
    }
}

/// Whether `path` is one of `mutable` or lies under one.
pub fn within(path: &str, mutable: &[String]) -> bool {
    mutable.iter().any(|m| {
        path == m
            || path
                .strip_prefix(m.as_str())
                .is_some_and(|r| r.starts_with('/'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_names() {
        assert_eq!(version_of("v1.2.0"), Some("1.2.0"));
        assert_eq!(version_of("v1.2.0~2"), Some("1.2.0"));
        assert_eq!(version_of("v1.2.0~factory"), Some("1.2.0"));
        for bad in [
            "1.2.0",
            "v",
            "v1~",
            "v1~x",
            "v..",
            "current",
            ".tope-ota-tmp-x",
        ] {
            assert_eq!(version_of(bad), None, "{bad}");
        }
        assert!(is_factory_dir("v1~factory"));
        assert!(!is_factory_dir("v1~2"));
    }

    #[test]
    fn fresh_names_skip_used_ones() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(fresh_dir_name(d.path(), "1.0"), "v1.0");
        fs::create_dir(d.path().join("v1.0")).unwrap();
        fs::create_dir(d.path().join("v1.0~2")).unwrap();
        assert_eq!(fresh_dir_name(d.path(), "1.0"), "v1.0~3");
        fs::create_dir(d.path().join("v1.0~factory")).unwrap();
        fs::create_dir(d.path().join("v1.0~7")).unwrap();
        assert_eq!(fresh_dir_name(d.path(), "1.0"), "v1.0~8");
        // Freed names are not reused while a newer snapshot is kept.
        fs::remove_dir(d.path().join("v1.0")).unwrap();
        fs::remove_dir(d.path().join("v1.0~2")).unwrap();
        assert_eq!(fresh_dir_name(d.path(), "1.0"), "v1.0~8");
        assert_eq!(fresh_dir_name(d.path(), "1.0.1"), "v1.0.1");
    }

    #[test]
    fn prune_touches_only_unreferenced_snapshots() {
        let d = tempfile::tempdir().unwrap();
        for n in ["v1", "v2", "v3~2", "v0~factory", "data", "vbad!"] {
            fs::create_dir_all(d.path().join(n)).unwrap();
        }
        std::os::unix::fs::symlink("v2", d.path().join("current")).unwrap();
        let mut removed = prune(d.path()).unwrap();
        removed.sort();
        assert_eq!(removed, ["v1", "v3~2"]);
        assert!(d.path().join("v0~factory").is_dir());
        assert!(d.path().join("data").is_dir());
        assert!(d.path().join("vbad!").is_dir());
    }
}
