//! Version snapshots under the versions root: `v<version>/` dirs and the `current`, `previous`
//! and `factory` symlinks that select them.

use std::fs;
use std::path::Path;

pub const CURRENT: &str = "current";
pub const PREVIOUS: &str = "previous";
pub const FACTORY: &str = "factory";

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

/// The version a symlink in `root` points to, from its target's last component `v<version>`.
pub fn link_version(root: &Path, name: &str) -> Option<String> {
    let target = fs::read_link(root.join(name)).ok()?;
    let last = target.file_name()?.to_str()?;
    last.strip_prefix('v').map(str::to_string)
}
