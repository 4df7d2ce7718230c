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
}
