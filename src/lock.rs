//! The writer lock: an exclusive flock on `state.lock`, a sibling of `state.json` that is never
//! renamed, held for a writer's whole run. A second writer fails at once with `BUSY`.

use crate::error::{ErrorCode, OtaError};
use crate::fsutil;
use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

/// File name of the lock inside the state dir.
pub const LOCK_FILE: &str = "state.lock";
/// `serve` hands the lock it took to the child it starts: the child inherits the locked open
/// file description under this fd number (a flock belongs to the description, so the lock passes
/// with it, with no window for another writer).
pub const LOCK_FD_ENV: &str = "TOPE_OTA_LOCK_FD";

/// Proof that this process is the one writer. Dropping it closes the file, which releases the
/// flock (we never call `unlock`: std ≥ 1.89 has its own `File::unlock` that shadows fs2's).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
    dir: PathBuf,
}

impl StateLock {
    /// Take the lock in `state_dir` without waiting; `BUSY` if another process holds it.
    pub fn acquire(state_dir: &Path) -> Result<StateLock> {
        fsutil::ensure_dir(state_dir)?;
        let path = state_dir.join(LOCK_FILE);
        if let Some(file) = inherited(&path) {
            // Already locked through the same description: this succeeds at once.
            fs2::FileExt::try_lock_exclusive(&file)
                .with_context(|| format!("lock inherited {}", path.display()))?;
            return Ok(StateLock {
                _file: file,
                dir: state_dir.to_path_buf(),
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("open lock {}", path.display()))?;
        match fs2::FileExt::try_lock_exclusive(&file) {
            Ok(()) => Ok(StateLock {
                _file: file,
                dir: state_dir.to_path_buf(),
            }),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.raw_os_error() == Some(libc::EWOULDBLOCK) =>
            {
                Err(OtaError::new(
                    ErrorCode::Busy,
                    format!("another tope-ota holds {}", path.display()),
                )
                .into())
            }
            Err(e) => Err(e).with_context(|| format!("lock {}", path.display())),
        }
    }

    /// The state dir this lock guards.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The locked file, for `serve` to hand to a child (see [`LOCK_FD_ENV`]).
    pub fn into_file(self) -> File {
        self._file
    }
}

/// The lock file inherited from `serve`, if `TOPE_OTA_LOCK_FD` names an open fd that is this
/// very state.lock (same device and inode); anything else is ignored.
fn inherited(path: &Path) -> Option<File> {
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::MetadataExt;
    let fd: i32 = std::env::var(LOCK_FD_ENV).ok()?.parse().ok()?;
    let want = std::fs::metadata(path).ok()?;
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on an fd number only reads its metadata into `st`.
    if fd < 3 || unsafe { libc::fstat(fd, &mut st) } != 0 {
        return None;
    }
    if st.st_dev != want.dev() || st.st_ino != want.ino() {
        return None;
    }
    // SAFETY: the fd is open and is our lock file; we own it from here. Close-on-exec again,
    // so services and the GUI we start never inherit the lock.
    unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        Some(File::from_raw_fd(fd))
    }
}
