//! Version snapshots under the versions root: `v<version>/` dirs, the `current`, `previous` and
//! `factory` symlinks that select them, building a new snapshot as a hard-linked mirror, and the
//! services list each snapshot carries.

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

/// The versions the three symlinks point to (None when missing or not a `v<version>` target).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Links {
    pub current: Option<String>,
    pub previous: Option<String>,
    pub factory: Option<String>,
}

impl Links {
    pub fn read(root: &Path) -> Links {
        Links {
            current: link_version(root, CURRENT),
            previous: link_version(root, PREVIOUS),
            factory: link_version(root, FACTORY),
        }
    }
}

/// The dir name of a version's snapshot.
pub fn dir_name(version: &str) -> String {
    format!("v{version}")
}

pub fn version_dir(root: &Path, version: &str) -> PathBuf {
    root.join(dir_name(version))
}

/// The version a symlink in `root` points to, from its target's last component `v<version>`,
/// when the target is an existing directory.
pub fn link_version(root: &Path, name: &str) -> Option<String> {
    let target = fs::read_link(root.join(name)).ok()?;
    let last = target.file_name()?.to_str()?;
    let version = last.strip_prefix('v')?;
    root.join(name).is_dir().then(|| version.to_string())
}

/// Point `previous` and/or `current` at versions (each a temp symlink renamed over the old),
/// then fsync the root once. Targets are relative (`v1.2.0`), so the tree can be moved.
pub fn switch(root: &Path, previous: Option<&str>, current: &str) -> Result<()> {
    if let Some(p) = previous {
        fsutil::replace_symlink(root, PREVIOUS, Path::new(&dir_name(p)))?;
        crate::failpoint::hit("mid-switch");
    }
    fsutil::replace_symlink(root, CURRENT, Path::new(&dir_name(current)))?;
    fsutil::sync_dir(root)
}

/// Mirror `src` into the empty dir `dst`: directories recreated with their modes, files hard
/// linked (sharing the inode: never to be written through `dst`), symlinks copied.
pub fn mirror(src: &Path, dst: &Path) -> Result<u64> {
    let mut count = 0;
    for entry in fs::read_dir(src).with_context(|| format!("read dir {}", src.display()))? {
        let entry = entry.with_context(|| format!("read dir {}", src.display()))?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let ft = entry.file_type()?;
        if ft.is_dir() {
            let mode = entry.metadata()?.permissions().mode() & 0o7777;
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&to)
                .with_context(|| format!("create dir {}", to.display()))?;
            count += mirror(&from, &to)?;
            let meta = entry.metadata()?;
            // Keep the owner: a service that writes in its directory must still be able to.
            std::os::unix::fs::lchown(&to, Some(meta.uid()), Some(meta.gid()))
                .with_context(|| format!("chown {}", to.display()))?;
            fs::set_permissions(&to, fs::Permissions::from_mode(mode))
                .with_context(|| format!("chmod {}", to.display()))?;
        } else if ft.is_symlink() {
            let target =
                fs::read_link(&from).with_context(|| format!("readlink {}", from.display()))?;
            std::os::unix::fs::symlink(&target, &to)
                .with_context(|| format!("symlink {}", to.display()))?;
            let meta = fs::symlink_metadata(&from)?;
            std::os::unix::fs::lchown(&to, Some(meta.uid()), Some(meta.gid()))
                .with_context(|| format!("chown {}", to.display()))?;
        } else if ft.is_file() {
            fs::hard_link(&from, &to)
                .with_context(|| format!("hard link {} to {}", from.display(), to.display()))?;
        } else {
            log::warn!("not mirroring special file {}", from.display());
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

/// Write the services list of the snapshot at `dir` as a new file (never through a hard link).
pub fn write_services(dir: &Path, list: &[Service]) -> Result<()> {
    let meta = dir.join(META_DIR);
    // Whatever stands at .tope-ota but a real directory (a symlink above all) goes: we never
    // write through a link.
    match fs::symlink_metadata(&meta) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => fs::remove_file(&meta).with_context(|| format!("remove {}", meta.display()))?,
        Err(_) => {}
    }
    if !meta.is_dir() {
        fs::create_dir(&meta).with_context(|| format!("create dir {}", meta.display()))?;
    }
    let bytes = serde_json::to_vec_pretty(&services::start_order(list.to_vec()))?;
    fsutil::write_atomic(&meta.join(SERVICES_FILE), &bytes)
}

/// Remove snapshot dirs that no symlink in `root` points to; returns the names removed.
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
        } else if ft.is_dir() && name.starts_with('v') {
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
