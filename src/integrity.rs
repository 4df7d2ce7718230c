//! What a snapshot held when it was built, and what changed since.
//!
//! Each snapshot keeps `.tope-ota/files.json`: every entry's kind, mode and, for files, size,
//! SHA-256 and mtime (symlinks: their target). `previous` shares inodes with `current` by
//! design, so a service that writes in place changes both; this record is how tope-ota (and a
//! technician, with `tope-ota verify`) notices. Paths the manifest declares `mutable` are the
//! version's changing data and are not recorded.

use crate::fsutil;
use crate::snapshot::{within, META_DIR};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The record's file name inside a snapshot's `.tope-ota/`.
pub const FILES: &str = "files.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Link,
    Dir,
}

/// One recorded entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub kind: Kind,
    /// Permission bits (`& 0o7777`).
    pub mode: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// mtime (s, ns) when recorded: a file whose mtime did not move is not hashed again by the
    /// quick check.
    #[serde(default, skip_serializing_if = "is_zero_i")]
    pub mtime: i64,
    #[serde(default, skip_serializing_if = "is_zero_i")]
    pub mtime_ns: i64,
}

impl Default for Record {
    fn default() -> Record {
        Record {
            schema: crate::state::Schema(SCHEMA),
            mutable: Vec::new(),
            entries: BTreeMap::new(),
        }
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}
fn is_zero_i(v: &i64) -> bool {
    *v == 0
}

/// The schema of the records this build reads and writes; frozen at 1 as state.json's is (see
/// [`crate::state::SCHEMA`]). A record without the field is schema 1.
pub const SCHEMA: u64 = 1;

/// A snapshot's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    #[serde(default)]
    pub schema: crate::state::Schema,
    /// Paths (files or directories) that hold the version's changing data: not recorded.
    #[serde(default)]
    pub mutable: Vec<String>,
    pub entries: BTreeMap<String, Entry>,
}

/// One difference between a snapshot and its record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub path: String,
    /// `missing`, `added`, `kind`, `size`, `mode`, `content` or `target`.
    pub what: &'static str,
    pub detail: String,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.what)?;
        if !self.detail.is_empty() {
            write!(f, " ({})", self.detail)?;
        }
        Ok(())
    }
}

/// What a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Intact,
    Changed(Vec<Change>),
    /// No record (a snapshot made before records existed, or outside tope-ota).
    Unrecorded,
    /// A record of a newer schema than this build reads (a newer tope-ota built the snapshot):
    /// not compared, so neither intact nor changed, and usable as unrecorded is.
    NewerRecord(u64),
}

impl Status {
    /// Usable as a target: intact, or nothing to compare with.
    pub fn usable(&self) -> bool {
        !matches!(self, Status::Changed(_))
    }

    /// One line for logs and messages.
    pub fn summary(&self) -> String {
        match self {
            Status::Intact => "intact".into(),
            Status::Unrecorded => "no record to compare with".into(),
            Status::NewerRecord(n) => format!(
                "a record of schema {n}, newer than this tope-ota reads ({SCHEMA}): not compared"
            ),
            Status::Changed(c) => {
                let shown: Vec<String> = c.iter().take(5).map(|c| c.to_string()).collect();
                let more = c.len().saturating_sub(5);
                format!(
                    "{} change(s): {}{}",
                    c.len(),
                    shown.join("; "),
                    if more > 0 {
                        format!("; and {more} more")
                    } else {
                        String::new()
                    }
                )
            }
        }
    }
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let f = fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    sha256_reader(&f).with_context(|| format!("read {}", path.display()))
}

/// SHA-256 of what is left to read of an open file, hex.
pub fn sha256_reader(mut f: &fs::File) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Walk `root` (without `.tope-ota/` and mutable paths), calling `f(rel, path, meta)`.
fn walk(
    root: &Path,
    mutable: &[String],
    f: &mut dyn FnMut(&str, &Path, &fs::Metadata) -> Result<()>,
) -> Result<()> {
    fn inner(
        root: &Path,
        dir: &Path,
        mutable: &[String],
        f: &mut dyn FnMut(&str, &Path, &fs::Metadata) -> Result<()>,
    ) -> Result<()> {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .with_context(|| format!("read dir {}", dir.display()))?
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("read dir {}", dir.display()))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            if rel == META_DIR || within(&rel, mutable) {
                continue;
            }
            let meta =
                fs::symlink_metadata(&path).with_context(|| format!("stat {}", path.display()))?;
            f(&rel, &path, &meta)?;
            if meta.is_dir() {
                inner(root, &path, mutable, f)?;
            }
        }
        Ok(())
    }
    inner(root, root, mutable, f)
}

fn entry_of(path: &Path, meta: &fs::Metadata, sha: Option<String>) -> Result<Entry> {
    let ft = meta.file_type();
    let mut e = Entry {
        kind: Kind::Dir,
        mode: meta.mode() & 0o7777,
        size: 0,
        sha256: None,
        target: None,
        mtime: 0,
        mtime_ns: 0,
    };
    if ft.is_symlink() {
        e.kind = Kind::Link;
        e.mode = 0;
        e.target = Some(
            fs::read_link(path)
                .with_context(|| format!("readlink {}", path.display()))?
                .to_string_lossy()
                .into_owned(),
        );
    } else if ft.is_file() {
        e.kind = Kind::File;
        e.size = meta.len();
        e.mtime = meta.mtime();
        e.mtime_ns = meta.mtime_nsec();
        e.sha256 = Some(match sha {
            Some(s) => s,
            None => sha256_file(path)?,
        });
    }
    Ok(e)
}

/// Record the snapshot at `dir`. A file hard-linked from `reuse` (the snapshot it was mirrored
/// from, with that snapshot's record) whose size and mtime still match that record keeps the
/// recorded hash: only new files are hashed.
pub fn build(dir: &Path, mutable: &[String], reuse: Option<(&Path, &Record)>) -> Result<Record> {
    let mut entries = BTreeMap::new();
    walk(dir, mutable, &mut |rel, path, meta| {
        let mut sha = None;
        if let (true, Some((from, rec))) = (meta.is_file(), reuse) {
            if let (Some(old), Ok(m)) = (rec.entries.get(rel), fs::symlink_metadata(from.join(rel)))
            {
                if m.ino() == meta.ino()
                    && m.dev() == meta.dev()
                    && old.size == meta.len()
                    && old.mtime == meta.mtime()
                    && old.mtime_ns == meta.mtime_nsec()
                {
                    sha = old.sha256.clone();
                }
            }
        }
        entries.insert(rel.to_string(), entry_of(path, meta, sha)?);
        Ok(())
    })?;
    Ok(Record {
        schema: crate::state::Schema(SCHEMA),
        mutable: mutable.to_vec(),
        entries,
    })
}

/// Write the record into the snapshot at `dir` (a new file, durable).
pub fn write(dir: &Path, rec: &Record) -> Result<()> {
    let meta = crate::snapshot::meta_dir(dir)?;
    let bytes = serde_json::to_vec(rec).context("encode the files record")?;
    fsutil::write_atomic(&meta.join(FILES), &bytes)
}

/// What a snapshot's record file holds.
#[derive(Debug)]
pub enum Found {
    Record(Record),
    /// None (a snapshot made before records existed, or outside tope-ota).
    Missing,
    /// A record of this newer schema: this build cannot read it and does not try.
    Newer(u64),
}

/// The record of the snapshot at `dir`. A record that does not parse is an error: it cannot
/// vouch for anything.
pub fn find(dir: &Path) -> Result<Found> {
    let path = dir.join(META_DIR).join(FILES);
    match fs::read(&path) {
        Ok(b) => {
            if let Some(n) = crate::state::declared_schema(&b).newer_than(SCHEMA) {
                return Ok(Found::Newer(n));
            }
            serde_json::from_slice(&b)
                .map(Found::Record)
                .with_context(|| format!("{} does not parse", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Found::Missing),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// The record of the snapshot at `dir`, for what it says (its data paths, its modes, its
/// hashes); None when it has none. One of a newer schema is `SCHEMA_TOO_NEW`: what it says about
/// the version's data cannot be read, and guessing would lose data.
pub fn read(dir: &Path) -> Result<Option<Record>> {
    match find(dir)? {
        Found::Record(r) => Ok(Some(r)),
        Found::Missing => Ok(None),
        Found::Newer(n) => Err(crate::state::too_new(
            &dir.join(META_DIR).join(FILES),
            n,
            SCHEMA,
        )),
    }
}

/// How hard to look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Size, mode and kind always; a hash only where the mtime moved.
    Quick,
    /// Every file hashed.
    Full,
}

/// Compare the snapshot at `dir` with its record. `ignore_write_bits` for the factory copy,
/// which is made read-only after it is recorded.
pub fn check(dir: &Path, depth: Depth, ignore_write_bits: bool) -> Status {
    let rec = match find(dir) {
        Ok(Found::Record(r)) => r,
        Ok(Found::Missing) => return Status::Unrecorded,
        Ok(Found::Newer(n)) => return Status::NewerRecord(n),
        Err(e) => {
            return Status::Changed(vec![Change {
                path: format!("{META_DIR}/{FILES}"),
                what: "content",
                detail: format!("{e:#}"),
            }])
        }
    };
    let mask = if ignore_write_bits { !0o222 } else { !0 };
    let mut changes = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let walked = walk(dir, &rec.mutable, &mut |rel, path, meta| {
        seen.insert(rel.to_string());
        let Some(want) = rec.entries.get(rel) else {
            changes.push(Change {
                path: rel.into(),
                what: "added",
                detail: String::new(),
            });
            return Ok(());
        };
        let push = |changes: &mut Vec<Change>, what, detail: String| {
            changes.push(Change {
                path: rel.into(),
                what,
                detail,
            })
        };
        let ft = meta.file_type();
        let kind = if ft.is_symlink() {
            Kind::Link
        } else if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::File
        } else {
            push(&mut changes, "kind", "special file".into());
            return Ok(());
        };
        if kind != want.kind {
            push(
                &mut changes,
                "kind",
                format!("{:?} became {:?}", want.kind, kind),
            );
            return Ok(());
        }
        match kind {
            Kind::Link => {
                let t = fs::read_link(path)
                    .map(|t| t.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if Some(&t) != want.target.as_ref() {
                    push(&mut changes, "target", format!("now -> {t}"));
                }
            }
            Kind::Dir | Kind::File => {
                let mode = meta.mode() & 0o7777;
                if mode & mask != want.mode & mask {
                    push(
                        &mut changes,
                        "mode",
                        format!("{:o} is now {:o}", want.mode, mode),
                    );
                }
            }
        }
        if kind == Kind::File {
            if meta.len() != want.size {
                push(
                    &mut changes,
                    "size",
                    format!("{} bytes is now {}", want.size, meta.len()),
                );
                return Ok(());
            }
            let moved = meta.mtime() != want.mtime || meta.mtime_nsec() != want.mtime_ns;
            if depth == Depth::Full || moved {
                match sha256_file(path) {
                    Ok(h) if Some(&h) == want.sha256.as_ref() => {}
                    Ok(_) => push(&mut changes, "content", String::new()),
                    Err(e) => push(&mut changes, "content", format!("{e:#}")),
                }
            }
        }
        Ok(())
    });
    if let Err(e) = walked {
        changes.push(Change {
            path: String::new(),
            what: "missing",
            detail: format!("{e:#}"),
        });
    }
    for p in rec.entries.keys() {
        if !seen.contains(p) {
            changes.push(Change {
                path: p.clone(),
                what: "missing",
                detail: String::new(),
            });
        }
    }
    if changes.is_empty() {
        Status::Intact
    } else {
        changes.sort_by(|a, b| a.path.cmp(&b.path));
        Status::Changed(changes)
    }
}

/// Check the snapshot dir `name` in `root` quickly, logging what changed.
pub fn check_target(root: &Path, name: &str) -> Status {
    let dir = root.join(name);
    if !dir.is_dir() {
        return Status::Changed(vec![Change {
            path: name.into(),
            what: "missing",
            detail: "the snapshot does not exist".into(),
        }]);
    }
    let st = check(&dir, Depth::Quick, crate::snapshot::is_factory_dir(name));
    if let Status::Changed(_) = &st {
        log::warn!(
            "snapshot {name} changed since it was built: {}",
            st.summary()
        );
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("bin")).unwrap();
        fs::create_dir_all(d.path().join("data")).unwrap();
        fs::write(d.path().join("bin/app"), b"app").unwrap();
        fs::write(d.path().join("data/db"), b"rows").unwrap();
        std::os::unix::fs::symlink("bin/app", d.path().join("link")).unwrap();
        d
    }

    #[test]
    fn intact_then_each_kind_of_change() {
        let d = tree();
        let rec = build(d.path(), &["data".into()], None).unwrap();
        write(d.path(), &rec).unwrap();
        assert_eq!(check(d.path(), Depth::Full, false), Status::Intact);
        // Mutable data may change freely.
        fs::write(d.path().join("data/db"), b"more rows").unwrap();
        assert_eq!(check(d.path(), Depth::Quick, false), Status::Intact);
        // Same size, new content: the mtime moved, so even the quick check hashes it.
        fs::write(d.path().join("bin/app"), b"APP").unwrap();
        fs::set_permissions(d.path().join("bin"), fs::Permissions::from_mode(0o555)).unwrap();
        fs::write(d.path().join("extra"), b"").unwrap();
        let Status::Changed(c) = check(d.path(), Depth::Quick, false) else {
            panic!("no change found")
        };
        let what: Vec<_> = c.iter().map(|c| (c.path.as_str(), c.what)).collect();
        assert_eq!(
            what,
            [("bin", "mode"), ("bin/app", "content"), ("extra", "added")]
        );
        assert!(
            !check(d.path(), Depth::Quick, true).usable(),
            "content still differs"
        );
    }

    #[test]
    fn unrecorded_is_usable() {
        let d = tree();
        assert_eq!(check(d.path(), Depth::Quick, false), Status::Unrecorded);
        assert!(Status::Unrecorded.usable());
        // A newer tope-ota's record: not read, not compared, usable.
        let meta = crate::snapshot::meta_dir(d.path()).unwrap();
        std::fs::write(meta.join(FILES), br#"{"schema":2,"entries":"elsewhere"}"#).unwrap();
        assert_eq!(check(d.path(), Depth::Full, false), Status::NewerRecord(2));
        assert!(Status::NewerRecord(2).usable());
        let e = read(d.path()).unwrap_err();
        assert_eq!(
            crate::error::classify(&e).code,
            crate::error::ErrorCode::SchemaTooNew
        );
        // One from before schemas: schema 1.
        std::fs::write(meta.join(FILES), br#"{"entries":{}}"#).unwrap();
        assert_eq!(
            read(d.path()).unwrap().unwrap().schema,
            crate::state::Schema(1)
        );
    }
}
