//! A version's mutable data (the manifest's `mutable` paths: calibration, settings, print
//! history). Each snapshot holds its own private copy: an install carries the copy of `current`
//! into the new snapshot once the services stopped (never a hard link, so the version left behind
//! keeps its data as it was), and a rollback finds the target's own copy as that version left
//! it. Nothing here reads or writes through a symlink: a mutable path that is a symlink is carried
//! as a symlink, and one that lies beneath a symlink is refused before anything stops.

use crate::error::{ErrorCode, OtaError};
use crate::fsutil;
use anyhow::{Context, Result};
use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Check that the parents of `rel` under `base` are real directories (or missing). Returns
/// false when a parent is missing.
fn parents_ok(base: &Path, rel: &str, side: &str) -> Result<bool> {
    let parts: Vec<&str> = rel.split('/').collect();
    let mut at = base.to_path_buf();
    for part in &parts[..parts.len() - 1] {
        at.push(part);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(OtaError::new(
                    ErrorCode::DeploymentFailed,
                    format!(
                        "mutable path {rel:?} lies beneath the symlink {} in {side}; data is never carried through a link",
                        at.display()
                    ),
                )
                .into())
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(OtaError::new(
                    ErrorCode::DeploymentFailed,
                    format!(
                        "mutable path {rel:?}: {} in {side} is not a directory",
                        at.display()
                    ),
                )
                .into())
            }
            Err(_) => return Ok(false),
        }
    }
    Ok(true)
}

/// Bytes of the regular files at `path` (a file, or a dir tree; links not followed).
fn bytes_at(path: &Path) -> u64 {
    let Ok(m) = fs::symlink_metadata(path) else {
        return 0;
    };
    if m.is_file() {
        return m.len();
    }
    if !m.is_dir() {
        return 0;
    }
    fs::read_dir(path)
        .map(|rd| rd.flatten().map(|e| bytes_at(&e.path())).sum())
        .unwrap_or(0)
}

/// At build, before anything stops: every mutable path must be reachable without passing
/// through a symlink or a file, in `from` (the snapshot it is carried from) and in the new
/// snapshot `snap`; the parent dirs of a path `from` holds are created in `snap` where missing,
/// so the record lists them. Returns the bytes the carry will copy.
pub fn prepare(from: Option<&Path>, snap: &Path, mutable: &[String]) -> Result<u64> {
    let mut bytes = 0;
    for rel in mutable {
        let in_from = match from {
            Some(f) => parents_ok(f, rel, "current")? && fs::symlink_metadata(f.join(rel)).is_ok(),
            None => false,
        };
        if !parents_ok(snap, rel, "the new snapshot")? && in_from {
            let parent = Path::new(rel).parent().unwrap_or(Path::new(""));
            let mut at = snap.to_path_buf();
            for part in parent.components() {
                at.push(part);
                if fs::symlink_metadata(&at).is_err() {
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&at)
                        .with_context(|| format!("create dir {}", at.display()))?;
                }
            }
        }
        if in_from {
            bytes += bytes_at(&from.unwrap_or(snap).join(rel));
        }
    }
    Ok(bytes)
}

/// Remove whatever stands at `path` (a dir tree, a file, a symlink: never followed).
fn remove_any(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            fs::remove_dir_all(path).with_context(|| format!("remove {}", path.display()))
        }
        Ok(_) => fs::remove_file(path).with_context(|| format!("remove {}", path.display())),
        Err(_) => Ok(()),
    }
}

/// Put a private copy of `from` at `to`: a file or symlink replaces what is there; a dir merges
/// into a dir (entries of `from` win, entries only `to` has stay). Dirs written are listed in
/// `dirs` (to fsync).
fn copy_over(from: &Path, to: &Path, dirs: &mut Vec<PathBuf>) -> Result<()> {
    let meta = fs::symlink_metadata(from).with_context(|| format!("stat {}", from.display()))?;
    let ft = meta.file_type();
    let there = fs::symlink_metadata(to).ok();
    if there.as_ref().is_some_and(|m| !(m.is_dir() && ft.is_dir())) {
        // What the package placed here (a module at a mutable path is initial content only).
        log::info!(
            "the device's {} replaces the package's {}",
            from.display(),
            to.display()
        );
    }
    if ft.is_dir() {
        if !there.is_some_and(|m| m.is_dir()) {
            remove_any(to)?;
            fs::DirBuilder::new()
                .mode(0o700)
                .create(to)
                .with_context(|| format!("create dir {}", to.display()))?;
        }
        for e in fs::read_dir(from).with_context(|| format!("read dir {}", from.display()))? {
            let e = e.with_context(|| format!("read dir {}", from.display()))?;
            copy_over(&e.path(), &to.join(e.file_name()), dirs)?;
        }
        std::os::unix::fs::lchown(to, Some(meta.uid()), Some(meta.gid()))
            .with_context(|| format!("chown {}", to.display()))?;
        fs::set_permissions(to, fs::Permissions::from_mode(meta.mode() & 0o7777))
            .with_context(|| format!("chmod {}", to.display()))?;
        dirs.push(to.to_path_buf());
        return Ok(());
    }
    if ft.is_symlink() {
        remove_any(to)?;
        let target = fs::read_link(from).with_context(|| format!("readlink {}", from.display()))?;
        fsutil::symlink(&target, to)?;
        std::os::unix::fs::lchown(to, Some(meta.uid()), Some(meta.gid()))
            .with_context(|| format!("chown {}", to.display()))?;
    } else if ft.is_file() {
        remove_any(to)?;
        fsutil::copy_file(from, to)?;
    } else {
        log::warn!("not carrying the special file {}", from.display());
    }
    Ok(())
}

/// Once the services stopped: replace each mutable path of the new snapshot `to` with a private
/// copy of `from`'s (a dir merges: the device's entries win, entries only the package brings
/// stay as initial content). A path `from` lacks keeps what the package placed there, if
/// anything. Everything is durable when this returns. Returns the paths carried.
pub fn carry(from: &Path, to: &Path, mutable: &[String]) -> Result<Vec<String>> {
    let mut carried = Vec::new();
    let mut dirs = Vec::new();
    for rel in mutable {
        if !parents_ok(from, rel, "current")? || fs::symlink_metadata(from.join(rel)).is_err() {
            log::info!("mutable path {rel} is not in current; the new version starts without it");
            continue;
        }
        parents_ok(to, rel, "the new snapshot")?;
        let dst = to.join(rel);
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("create dir {}", parent.display()))?;
            dirs.push(parent.to_path_buf());
        }
        copy_over(&from.join(rel), &dst, &mut dirs)?;
        carried.push(rel.clone());
    }
    dirs.sort();
    dirs.dedup();
    for d in &dirs {
        fsutil::sync_dir(d)?;
    }
    Ok(carried)
}

/// Before a migration: move the package's initial content at each mutable path of the new
/// snapshot `snap` into the private dir `work` (paths as in the snapshot), so that `work` holds
/// only data. The carry then merges the device's copy into `work`, and the migration runs there:
/// no file of the snapshot (hard links shared with older versions) is reachable by a relative
/// path.
pub fn stage_out(snap: &Path, work: &Path, mutable: &[String]) -> Result<()> {
    for rel in mutable {
        if !parents_ok(snap, rel, "the new snapshot")? {
            continue;
        }
        let at = snap.join(rel);
        if fs::symlink_metadata(&at).is_err() {
            continue;
        }
        let to = work.join(rel);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("create dir {}", parent.display()))?;
        }
        fsutil::rename(&at, &to)?;
    }
    Ok(())
}

/// Every path under `base` (relative, `/`-separated), links not followed.
fn walk_rel(base: &Path, rel: &str, out: &mut Vec<String>) -> Result<()> {
    let dir = if rel.is_empty() {
        base.to_path_buf()
    } else {
        base.join(rel)
    };
    for e in fs::read_dir(&dir).with_context(|| format!("read dir {}", dir.display()))? {
        let e = e.with_context(|| format!("read dir {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let r = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
        out.push(r.clone());
        if is_dir {
            walk_rel(base, &r, out)?;
        }
    }
    Ok(())
}

/// After a migration: move each mutable path from the private dir `work` back into the new
/// snapshot `snap`. Anything the migration left in `work` outside the mutable paths (a scratch
/// file, a relative write meant for a program) is `DEPLOYMENT_FAILED`, naming it, and so is a
/// mutable path that appeared in the snapshot itself while its data was out.
pub fn stage_in(work: &Path, snap: &Path, mutable: &[String]) -> Result<()> {
    let mut all = Vec::new();
    walk_rel(work, "", &mut all)?;
    let ancestor = |p: &str| mutable.iter().any(|m| m.starts_with(&format!("{p}/")));
    let stray: Vec<String> = all
        .into_iter()
        .filter(|p| !crate::snapshot::within(p, mutable))
        .filter(|p| !(ancestor(p) && fs::symlink_metadata(work.join(p)).is_ok_and(|m| m.is_dir())))
        .collect();
    if !stray.is_empty() {
        let more = stray.len().saturating_sub(5);
        return Err(OtaError::new(
            ErrorCode::DeploymentFailed,
            format!(
                "wrote outside the mutable paths {}: {}{}",
                mutable.join(", "),
                stray[..stray.len().min(5)].join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            ),
        )
        .into());
    }
    for rel in mutable {
        let from = work.join(rel);
        if fs::symlink_metadata(&from).is_err() {
            continue;
        }
        parents_ok(snap, rel, "the new snapshot")?;
        let to = snap.join(rel);
        if fs::symlink_metadata(&to).is_ok() {
            return Err(OtaError::new(
                ErrorCode::DeploymentFailed,
                format!(
                    "{rel} appeared in the new snapshot itself while its data was being migrated elsewhere"
                ),
            )
            .into());
        }
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("create dir {}", parent.display()))?;
        }
        fsutil::rename(&from, &to)?;
    }
    Ok(())
}

/// A cheap fingerprint of the data at the mutable paths of `base`: per entry its path, kind,
/// mode, owner, size, inode and its mtime and ctime to the nanosecond. Any write changes the
/// ctime (which not even root can set back), so two equal fingerprints mean nothing was written.
pub fn fingerprint(base: &Path, mutable: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for rel in mutable {
        if !parents_ok(base, rel, "the old version")? {
            continue;
        }
        let mut paths = vec![rel.clone()];
        if fs::symlink_metadata(base.join(rel)).is_ok_and(|m| m.is_dir()) {
            let mut below = Vec::new();
            walk_rel(base, rel, &mut below)?;
            paths.extend(below);
        }
        for p in paths {
            let Ok(m) = fs::symlink_metadata(base.join(&p)) else {
                continue;
            };
            out.push(format!(
                "{p}\0{:o}:{}:{}:{}:{}:{}.{}:{}.{}",
                m.mode(),
                m.uid(),
                m.gid(),
                m.size(),
                m.ino(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec()
            ));
        }
    }
    Ok(out)
}

/// The paths whose entry differs between two fingerprints.
pub fn fingerprint_diff(before: &[String], after: &[String]) -> Vec<String> {
    let name = |l: &String| l.split('\0').next().unwrap_or("").to_string();
    let a: std::collections::BTreeSet<&String> = before.iter().collect();
    let b: std::collections::BTreeSet<&String> = after.iter().collect();
    let mut changed: Vec<String> = a.symmetric_difference(&b).map(|l| name(l)).collect();
    changed.sort();
    changed.dedup();
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn carry_copies_merges_and_never_links() {
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        let (f, t) = (from.path(), to.path());
        fs::create_dir_all(f.join("data/jobs")).unwrap();
        fs::write(f.join("data/jobs/1.json"), b"job 1").unwrap();
        fs::write(f.join("data/cal.json"), b"device cal").unwrap();
        fs::write(f.join("settings.json"), b"device settings").unwrap();
        symlink("/nonexistent/outside", f.join("logs")).unwrap();
        // The package's initial content.
        fs::create_dir_all(t.join("data")).unwrap();
        fs::write(t.join("data/cal.json"), b"package default").unwrap();
        fs::write(t.join("data/new.json"), b"package new").unwrap();
        let m: Vec<String> = ["data", "settings.json", "logs", "missing/x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(prepare(Some(f), t, &m).unwrap(), 5 + 10 + 15);
        let carried = carry(f, t, &m).unwrap();
        assert_eq!(carried, ["data", "settings.json", "logs"]);
        assert_eq!(fs::read(t.join("data/cal.json")).unwrap(), b"device cal");
        assert_eq!(fs::read(t.join("data/new.json")).unwrap(), b"package new");
        assert_eq!(fs::read(t.join("data/jobs/1.json")).unwrap(), b"job 1");
        assert_eq!(
            fs::read_link(t.join("logs")).unwrap(),
            Path::new("/nonexistent/outside")
        );
        for p in ["data/cal.json", "settings.json", "data/jobs/1.json"] {
            let a = fs::metadata(f.join(p)).unwrap();
            let b = fs::metadata(t.join(p)).unwrap();
            assert_ne!(a.ino(), b.ino(), "{p} shares its inode");
        }
        assert!(!t.join("missing").exists());
    }

    #[test]
    fn staged_data_moves_out_and_back_and_strays_are_named() {
        let snap = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        let (s, w) = (snap.path(), work.path());
        fs::create_dir_all(s.join("bin")).unwrap();
        fs::write(s.join("bin/ui"), b"ui").unwrap();
        fs::create_dir_all(s.join("var/db")).unwrap();
        fs::write(s.join("var/db/rows"), b"initial").unwrap();
        let m = vec!["var/db".to_string(), "etc/x.json".to_string()];
        stage_out(s, w, &m).unwrap();
        assert!(!s.join("var/db").exists() && s.join("var").is_dir());
        assert_eq!(fs::read(w.join("var/db/rows")).unwrap(), b"initial");
        // The migration: converts the data, adds a mutable path, and litters.
        fs::write(w.join("var/db/rows"), b"migrated").unwrap();
        fs::create_dir_all(w.join("etc")).unwrap();
        fs::write(w.join("etc/x.json"), b"{}").unwrap();
        fs::write(w.join("var/scratch"), b"").unwrap();
        let e = stage_in(w, s, &m).unwrap_err();
        let e = crate::error::classify(&e);
        assert_eq!(e.code, ErrorCode::DeploymentFailed);
        assert!(e.detail.contains("outside the mutable paths") && e.detail.contains("var/scratch"));
        fs::remove_file(w.join("var/scratch")).unwrap();
        stage_in(w, s, &m).unwrap();
        assert_eq!(fs::read(s.join("var/db/rows")).unwrap(), b"migrated");
        assert_eq!(fs::read(s.join("etc/x.json")).unwrap(), b"{}");
        assert_eq!(fs::read(s.join("bin/ui")).unwrap(), b"ui");
    }

    #[test]
    fn a_fingerprint_sees_every_write() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("data/jobs")).unwrap();
        fs::write(d.path().join("data/jobs/1"), b"a").unwrap();
        let m = vec!["data".to_string(), "none".to_string()];
        let before = fingerprint(d.path(), &m).unwrap();
        assert_eq!(
            fingerprint_diff(&before, &fingerprint(d.path(), &m).unwrap()),
            Vec::<String>::new()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
        // Same size, same content, mtime put back: the ctime still moved.
        let p = d.path().join("data/jobs/1");
        let mtime = fs::metadata(&p).unwrap().modified().unwrap();
        fs::write(&p, b"a").unwrap();
        fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        fs::write(d.path().join("data/new"), b"").unwrap();
        let diff = fingerprint_diff(&before, &fingerprint(d.path(), &m).unwrap());
        assert_eq!(diff, ["data", "data/jobs/1", "data/new"]);
    }

    #[test]
    fn a_path_beneath_a_symlink_is_refused() {
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("x"), b"outside").unwrap();
        symlink(outside.path(), from.path().join("var")).unwrap();
        symlink(outside.path(), to.path().join("var")).unwrap();
        let m = vec!["var/x".to_string()];
        let e = prepare(Some(from.path()), to.path(), &m).unwrap_err();
        assert_eq!(crate::error::classify(&e).code, ErrorCode::DeploymentFailed);
        // The new snapshot's side alone is refused too.
        fs::remove_file(from.path().join("var")).unwrap();
        fs::create_dir(from.path().join("var")).unwrap();
        fs::write(from.path().join("var/x"), b"mine").unwrap();
        assert!(prepare(Some(from.path()), to.path(), &m).is_err());
        assert!(carry(from.path(), to.path(), &m).is_err());
        assert_eq!(fs::read(outside.path().join("x")).unwrap(), b"outside");
    }
}
