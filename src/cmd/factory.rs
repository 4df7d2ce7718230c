//! `factory`: make the factory snapshot, the last line of defence, under the lock: a private
//! copy of `current` that shares no inode with any other snapshot, made read-only without
//! touching another snapshot, never pointed at by `current`. Heal re-makes a factory that was
//! made the old way (a link to an installed snapshot, sharing its inodes) once.

use crate::cli::Global;
use crate::error::{fail, ErrorCode};
use crate::lock::Purpose;
use crate::operation::Operation;
use crate::output::Output;
use crate::snapshot::{self, Links, FACTORY, FACTORY_TAG};
use crate::{fsutil, integrity, transition};
use anyhow::{Context, Result};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

pub fn run(g: &Global) -> Result<Output> {
    let op = Operation::begin(g, &Purpose::long("factory", "making the factory snapshot"))?;
    let result = factory(g, &op);
    op.finish();
    result
}

fn factory(g: &Global, op: &Operation) -> Result<Output> {
    op.refuse_in_flight()?;
    let root = &g.versions_dir;
    let links = Links::read(root);
    let Some(cur) = links.current.clone() else {
        return fail(
            ErrorCode::InvalidRequest,
            format!(
                "no current version in {} to make factory of",
                root.display()
            ),
        );
    };
    let data = serde_json::json!({"factory": links.factory});
    if let Some(f) = &links.factory {
        if let Some(what) = remake_if_shared(root)? {
            return Ok(Output::success(format!("{what}\n"), data));
        }
        let fv = snapshot::version_of(f).unwrap_or(f);
        if Some(fv) == links.current_version() {
            return Ok(Output::success(
                format!("factory is already {fv} ({f}); nothing to do\n"),
                data,
            ));
        }
        return fail(
            ErrorCode::InvalidRequest,
            format!("factory is already {fv} ({f}); it is never replaced"),
        );
    }
    let st = integrity::check_target(root, &cur);
    if !st.usable() {
        return fail(
            ErrorCode::DeploymentFailed,
            format!(
                "current {cur} changed since it was installed ({}); a factory must be pristine",
                st.summary()
            ),
        );
    }
    let made = make(root, &cur)?;
    Ok(Output::success(
        format!("factory is now {made}, a read-only private copy of {cur}\n"),
        serde_json::json!({"factory": made}),
    ))
}

/// Copy the snapshot `src` to `v<version>~factory`, recorded, read-only and durable, then point
/// `factory` at it. Returns the new dir name.
fn make(root: &Path, src: &str) -> Result<String> {
    let version = snapshot::version_of(src)
        .context("the source names no version")?
        .to_string();
    let name = format!("v{version}{FACTORY_TAG}");
    if Links::read(root).factory.as_deref() == Some(name.as_str()) {
        anyhow::bail!("{name} is the factory already");
    }
    if fs::symlink_metadata(root.join(&name)).is_ok() {
        // No link points at it (checked above): a leftover of an interrupted earlier attempt.
        fsutil::remove_tree_durable(&root.join(&name))?;
    }
    // Never fill the disk (every heal would do it again): the copy must fit with a margin.
    let need = tree_bytes(&root.join(src))?;
    let free = fsutil::free_bytes(root)?;
    if free < need + need / 10 + (2 << 20) {
        return Err(crate::error::OtaError::new(
            ErrorCode::DiskFull,
            format!("copying {src} needs {need} bytes and a margin; {free} free"),
        )
        .into());
    }
    let staging = fsutil::temp_path(root, "factory");
    let built = (|| -> Result<()> {
        fs::create_dir(&staging).with_context(|| format!("create dir {}", staging.display()))?;
        snapshot::copy_tree(&root.join(src), &staging)?;
        if integrity::read(&staging)?.is_none() {
            // Made before records existed (maybe made read-only by the old script): record
            // what the copy holds, writable for its owner as an installed snapshot is.
            transition::make_owner_writable(&staging)?;
            let rec = integrity::build(&staging, &[], None)?;
            integrity::write(&staging, &rec)?;
        }
        read_only(&staging)?;
        fsutil::sync_new_tree(&staging)?;
        fsutil::rename_durable(&staging, &root.join(&name))
    })();
    if let Err(e) = built {
        let _ = fs::remove_dir_all(&staging);
        return Err(e);
    }
    snapshot::set_link(root, FACTORY, &name)?;
    fsutil::sync_dir(root)?;
    log::info!("factory is now {name}, a private copy of {src}");
    Ok(name)
}

/// `a-w` on every entry of the private copy at `dir` (directories last).
fn read_only(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("read dir {}", dir.display()))? {
        let e = e?;
        let ft = e.file_type()?;
        if ft.is_dir() {
            read_only(&e.path())?;
        } else if ft.is_file() {
            let m = e.metadata()?.mode() & 0o7777;
            fs::set_permissions(e.path(), fs::Permissions::from_mode(m & !0o222))?;
        }
    }
    let m = fs::metadata(dir)?.mode() & 0o7777;
    fs::set_permissions(dir, fs::Permissions::from_mode(m & !0o222))
        .with_context(|| format!("chmod {}", dir.display()))
}

/// Whether a regular file under `dir` has another link (shares its inode with a snapshot).
fn shares_inodes(dir: &Path) -> Result<bool> {
    for e in fs::read_dir(dir).with_context(|| format!("read dir {}", dir.display()))? {
        let e = e?;
        let ft = e.file_type()?;
        if (ft.is_dir() && shares_inodes(&e.path())?) || (ft.is_file() && e.metadata()?.nlink() > 1)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Re-make a factory made the old way (a link to an installed snapshot whose inodes other
/// snapshots share) as a private copy, once. Returns what it did.
/// Whether [`remake_if_shared`] would copy: a factory made the old way (a link to an installed
/// snapshot, not a private `~factory` dir).
pub fn needs_remake(root: &Path) -> bool {
    Links::read(root)
        .factory
        .is_some_and(|f| !snapshot::is_factory_dir(&f))
}

pub fn remake_if_shared(root: &Path) -> Result<Option<String>> {
    let links = Links::read(root);
    let Some(f) = links.factory.clone() else {
        return Ok(None);
    };
    let fdir = root.join(&f);
    if snapshot::is_factory_dir(&f) {
        // Ours: never changed in place. Sharing can only come from a hard link made by hand.
        if shares_inodes(&fdir)? {
            log::warn!("factory {f} shares inodes with files outside it (linked by hand)");
        }
        return Ok(None);
    }
    let made = make(root, &f)?;
    // The old create-factory.sh made the shared inodes and the directories read-only, and new
    // snapshots inherited that. Without a record of the real modes, give the owner write back.
    let in_use = [&links.current, &links.previous]
        .iter()
        .any(|l| l.as_deref() == Some(f.as_str()));
    if in_use {
        if let Err(e) = restore_write_bits(&fdir) {
            log::warn!("restoring write permission on {f}: {e:#}");
        }
    }
    snapshot::prune_best_effort(root);
    Ok(Some(format!(
        "factory pointed at the installed snapshot {f}; it is now {made}, a private copy"
    )))
}

/// Give back the write bits the old script took: the recorded modes where the snapshot has a
/// record (only where nothing but write bits differ), else write for the owner.
fn restore_write_bits(dir: &Path) -> Result<()> {
    let Some(rec) = integrity::read(dir)? else {
        return transition::make_owner_writable(dir);
    };
    for (path, e) in &rec.entries {
        if e.kind == integrity::Kind::Link {
            continue;
        }
        let p = dir.join(path);
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        let mode = m.mode() & 0o7777;
        if mode != e.mode && mode & !0o222 == e.mode & !0o222 {
            fs::set_permissions(&p, fs::Permissions::from_mode(e.mode))
                .with_context(|| format!("chmod {}", p.display()))?;
        }
    }
    let root_mode = fs::metadata(dir)?.mode() & 0o7777;
    fs::set_permissions(dir, fs::Permissions::from_mode(root_mode | 0o200))
        .with_context(|| format!("chmod {}", dir.display()))
}

/// Bytes of the regular files under `dir`.
fn tree_bytes(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for e in fs::read_dir(dir).with_context(|| format!("read dir {}", dir.display()))? {
        let e = e?;
        let ft = e.file_type()?;
        if ft.is_dir() {
            n += tree_bytes(&e.path())?;
        } else if ft.is_file() {
            n += e.metadata()?.len();
        }
    }
    Ok(n)
}
