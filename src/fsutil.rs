//! The only place that fsyncs and renames: atomic durable writes, durable renames, temp names,
//! free space.
//!
//! Every temporary name the updater creates starts with [`TEMP_PREFIX`], so `heal` (and each
//! writer at start) can sweep leftovers of a crash without guessing.

use crate::error::{is_disk_full, ErrorCode, OtaError};
use anyhow::{Context, Result};
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Prefix of every temporary file, dir and symlink the updater creates.
pub const TEMP_PREFIX: &str = ".tope-ota-tmp-";

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh temp path in `dir`, unique within this process and across processes (pid).
pub fn temp_path(dir: &Path, what: &str) -> PathBuf {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("{TEMP_PREFIX}{what}-{}-{n}", std::process::id()))
}

/// fsync a file. A failure is returned as is and never retried: after a failed fsync the kernel
/// may already have dropped the dirty pages, so the caller must fail the operation.
pub fn sync_file(file: &File, path: &Path) -> Result<()> {
    fsync(file).map_err(|e| io_error(e, "fsync", path))
}

/// fsync(2) through the fault-injection hook: the one call every fsync here goes through.
fn fsync(file: &File) -> io::Result<()> {
    crate::failpoint::fault("fsync")?;
    file.sync_all()
}

/// rename(2) through the fault-injection hook.
fn rename_raw(from: &Path, to: &Path) -> io::Result<()> {
    crate::failpoint::fault("rename")?;
    fs::rename(from, to)
}

/// symlink(2) through the fault-injection hook.
pub fn symlink(target: &Path, path: &Path) -> Result<()> {
    crate::failpoint::fault("symlink")
        .and_then(|_| std::os::unix::fs::symlink(target, path))
        .map_err(|e| io_error(e, "create symlink", path))
}

/// fdatasync a file, keeping the raw error so that ENOSPC (delayed allocation) can be told
/// apart. Like [`sync_file`], never retried.
pub fn sync_data(file: &File) -> io::Result<()> {
    crate::failpoint::fault("fsync")?;
    file.sync_data()
}

/// Ask the kernel to start writing `len` bytes at `offset` back to disk now, without waiting, so
/// that a later fsync finds little left to do. Advisory: a failure only loses the head start.
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a valid open fd; it reads no memory of ours.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// fsync a directory, making the names created, renamed or removed in it durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).with_context(|| format!("open dir {}", dir.display()))?;
    fsync(&d).map_err(|e| io_error(e, "fsync dir", dir))
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// An I/O error with the operation and path as context; out of space becomes `DISK_FULL`.
pub fn io_error(e: io::Error, what: &str, path: &Path) -> anyhow::Error {
    if is_disk_full(&e) {
        OtaError::new(
            ErrorCode::DiskFull,
            format!("no space left to {what} {}", path.display()),
        )
        .into()
    } else {
        anyhow::Error::from(e).context(format!("{what} {}", path.display()))
    }
}

/// Replace `path` with `bytes` atomically and durably: temp file in the same directory, fsync,
/// rename over `path`, fsync the directory. A reader sees the old or the new content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    replace_via_temp(path, bytes, true)?;
    crate::failpoint::hit("atomic-after-rename");
    sync_dir(parent_of(path))
}

/// Replace a small bookkeeping file that another thread of a writer may write while the
/// writer sweeps temp files: through a fresh temp file (the one prefix, a unique name) fsynced
/// before the rename so the file is never empty or torn; on any error the temp file is removed,
/// so the next attempt starts afresh (SPEC 3). A sweep that removes the temp file first only
/// fails this write. The directory is not fsynced: losing the rename only brings the old
/// content back. Not through the fault hooks: this file is not part of any operation's
/// durability, and its writes (from a thread, when callbacks are on) must not shift the
/// injected faults.
pub fn replace_small_file(path: &Path, bytes: &[u8]) -> Result<()> {
    replace_via_temp(path, bytes, false)
}

/// `bytes` into a new temp file beside `path`, fsynced, renamed over `path` (the temp file
/// removed on any error). `hooked`: the fsync and the rename go through the fault hooks and the
/// `atomic-before-rename` crash point.
fn replace_via_temp(path: &Path, bytes: &[u8], hooked: bool) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = temp_path(parent_of(path), &name);
    let result = (|| -> Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| io_error(e, "create", &tmp))?;
        f.write_all(bytes).map_err(|e| io_error(e, "write", &tmp))?;
        let synced = if hooked { fsync(&f) } else { f.sync_all() };
        synced.map_err(|e| io_error(e, "fsync", &tmp))?;
        drop(f);
        let renamed = if hooked {
            crate::failpoint::hit("atomic-before-rename");
            rename_raw(&tmp, path)
        } else {
            fs::rename(&tmp, path)
        };
        renamed.with_context(|| format!("rename {} to {}", tmp.display(), path.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Rename `from` to `to` (same filesystem) and fsync the destination directory. The caller has
/// already fsynced what `from` names.
pub fn rename_durable(from: &Path, to: &Path) -> Result<()> {
    rename_raw(from, to)
        .with_context(|| format!("rename {} to {}", from.display(), to.display()))?;
    sync_dir(parent_of(to))
}

/// Remove a file if it exists and fsync its directory; a missing file is not an error.
pub fn remove_file_durable(path: &Path) -> Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => {
            sync_dir(parent_of(path))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("remove {}", path.display())),
    }
}

/// Create `dir` (and parents) if missing, making the new entry durable.
pub fn ensure_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir).with_context(|| format!("create dir {}", dir.display()))?;
    sync_dir(parent_of(dir))
}

/// Point the symlink `dir/name` at `target` atomically: a temp symlink renamed over the old
/// one, so a reader sees the old or the new target, never none. The caller fsyncs `dir` once
/// after its last switch.
pub fn replace_symlink(dir: &Path, name: &str, target: &Path) -> Result<()> {
    let tmp = temp_path(dir, "link");
    symlink(target, &tmp)?;
    // A symlink cannot be fsynced itself: its directory entry and inode become durable with
    // the directory, before it may replace the old link.
    if let Err(e) = sync_dir(dir) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    let dst = dir.join(name);
    if let Err(e) = rename_raw(&tmp, &dst) {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("rename {} to {}", tmp.display(), dst.display()));
    }
    Ok(())
}

/// Rename without fsync, for moves inside a staging tree that is fsynced as a whole later.
pub fn rename(from: &Path, to: &Path) -> Result<()> {
    rename_raw(from, to).with_context(|| format!("rename {} to {}", from.display(), to.display()))
}

/// Make a freshly built tree durable and check every result: one syncfs(2) writes everything
/// back in a batch, then each file created in the tree (a link count of 1: hard links to an
/// older snapshot are durable already) and every directory is fsynced. syncfs reports no
/// writeback error before Linux 5.8; fsync does, so no failed write goes unnoticed.
pub fn sync_new_tree(root: &Path) -> Result<()> {
    if cfg!(feature = "break-snapshot-sync") {
        // Deliberately broken build for the box's power cuts: they must find this.
        return Ok(());
    }
    sync_fs(root)?;
    fn walk(dir: &Path) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        for entry in fs::read_dir(dir).with_context(|| format!("read dir {}", dir.display()))? {
            let entry = entry.with_context(|| format!("read dir {}", dir.display()))?;
            let path = entry.path();
            let ft = entry.file_type()?;
            if ft.is_dir() {
                walk(&path)?;
            } else if ft.is_file() && entry.metadata()?.nlink() == 1 {
                let f = File::open(&path).with_context(|| format!("open {}", path.display()))?;
                sync_file(&f, &path)?;
            }
        }
        sync_dir(dir)
    }
    walk(root)
}

/// syncfs(2): start and wait for the writeback of the whole filesystem holding `path`.
fn sync_fs(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    crate::failpoint::fault("fsync").map_err(|e| io_error(e, "syncfs", path))?;
    // SAFETY: a plain syscall on a valid open fd.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(io_error(io::Error::last_os_error(), "syncfs", path));
    }
    Ok(())
}

/// Open `path` to read it only if it is a regular file (a symlink is not followed): a FIFO or a
/// device put in its place after a stat would block the open or never end a read. O_NONBLOCK
/// keeps the open of a FIFO from waiting for a writer; on a regular file it changes nothing.
pub fn open_regular(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(f)
}

/// Copy the regular file `from` to the new file `to`, sharing no inode: a reflink (FICLONE)
/// where the filesystem can, a byte copy otherwise. Mode, owner and mtime follow `from`; the
/// copy is fsynced before this returns.
pub fn copy_file(from: &Path, to: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let src = open_regular(from).with_context(|| format!("open {}", from.display()))?;
    let meta = src
        .metadata()
        .with_context(|| format!("stat {}", from.display()))?;
    let mut dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(|e| io_error(e, "create", to))?;
    // SAFETY: FICLONE takes the source fd as its argument; both fds are open.
    let cloned = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) } == 0;
    if !cloned {
        let mut src = &src;
        io::copy(&mut src, &mut dst).map_err(|e| io_error(e, "copy to", to))?;
    }
    std::os::unix::fs::fchown(&dst, Some(meta.uid()), Some(meta.gid()))
        .with_context(|| format!("chown {}", to.display()))?;
    dst.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))
        .with_context(|| format!("chmod {}", to.display()))?;
    dst.set_modified(meta.modified()?)
        .with_context(|| format!("set mtime of {}", to.display()))?;
    sync_file(&dst, to)
}

/// Remove a directory tree if it exists, so that no crash leaves half of it under its name:
/// it is first renamed to a temp name (durably), then deleted; `sweep_temp` finishes a deletion
/// a crash interrupted.
pub fn remove_tree_durable(path: &Path) -> Result<()> {
    let parent = parent_of(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let trash = temp_path(parent, &format!("trash-{name}"));
    match rename_raw(path, &trash) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("rename {} to {}", path.display(), trash.display()))
        }
    }
    sync_dir(parent)?;
    fs::remove_dir_all(&trash).with_context(|| format!("remove {}", trash.display()))?;
    sync_dir(parent)
}

/// Whether the temp entry `name` ([`temp_path`]: `…-PID-N`) belongs to another process that is
/// alive: a writer that releases the state lock before its last callback is recorded may still
/// be writing callback.json's temp file while the next writer sweeps. This process's own
/// leftovers (a failed install's staging dir) are swept.
fn temp_owner_alive(name: &[u8]) -> bool {
    let name = String::from_utf8_lossy(name);
    let mut parts = name.rsplitn(3, '-');
    let (_n, pid) = (parts.next(), parts.next());
    pid.and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p != std::process::id() && crate::proc::alive(p))
}

/// Remove every entry of `dir` whose name starts with [`TEMP_PREFIX`], but those of other live
/// processes; returns how many.
pub fn sweep_temp(dir: &Path) -> Result<usize> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("read dir {}", dir.display())),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.with_context(|| format!("read dir {}", dir.display()))?;
        if !entry
            .file_name()
            .as_bytes()
            .starts_with(TEMP_PREFIX.as_bytes())
            || temp_owner_alive(entry.file_name().as_bytes())
        {
            continue;
        }
        let path = entry.path();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        let gone = if is_dir {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match gone {
            Ok(()) => removed += 1,
            // Renamed away meanwhile by the thread that writes callback.json.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("remove {}", path.display())),
        }
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// Bytes available to an unprivileged writer on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Result<u64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("path {} has a NUL byte", path.display()))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("statvfs {}", path.display()));
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_regular_refuses_a_fifo_without_waiting_and_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid C string path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // A plain open would wait for a writer for ever.
        let e = open_regular(&fifo).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let file = dir.path().join("f");
        fs::write(&file, b"bytes").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(open_regular(&link).is_err());
        let mut got = String::new();
        io::Read::read_to_string(&mut open_regular(&file).unwrap(), &mut got).unwrap();
        assert_eq!(got, "bytes");
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn replace_small_file_uses_a_fresh_temp_and_leaves_none_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("callback.json");
        replace_small_file(&p, b"one").unwrap();
        replace_small_file(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        // No fixed `<path>.tmp` another writer could share, and no leftover.
        let names = |d: &Path| -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(d)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(dir.path()), ["callback.json"]);
        // The rename fails (a non-empty directory in the way): the temp file goes with it.
        let blocked = dir.path().join("blocked");
        fs::create_dir(&blocked).unwrap();
        fs::write(blocked.join("x"), b"").unwrap();
        assert!(replace_small_file(&blocked, b"three").is_err());
        assert_eq!(names(dir.path()), ["blocked", "callback.json"]);
    }

    #[test]
    fn sweep_removes_only_prefixed() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(temp_path(dir.path(), "x"), b"").unwrap();
        fs::create_dir(temp_path(dir.path(), "d")).unwrap();
        fs::write(dir.path().join("keep"), b"").unwrap();
        assert_eq!(sweep_temp(dir.path()).unwrap(), 2);
        assert!(dir.path().join("keep").exists());
        // Another live process's temp file (pid 1 here) stays; a dead one's goes.
        let live = dir.path().join(format!("{TEMP_PREFIX}callback.json-1-0"));
        let dead = dir
            .path()
            .join(format!("{TEMP_PREFIX}callback.json-{}-0", i32::MAX));
        fs::write(&live, b"").unwrap();
        fs::write(&dead, b"").unwrap();
        assert_eq!(sweep_temp(dir.path()).unwrap(), 1);
        assert!(live.exists() && !dead.exists());
    }
}
