//! The writer lock: an exclusive flock on `state.lock`, a sibling of `state.json` that is never
//! renamed, held for a writer's whole run.
//!
//! The holder writes what it holds the lock for into the lock file (a [`Holder`] record), so a
//! writer that finds the lock taken can tell a brief pass (heal with nothing to do, a command
//! handing its last callbacks over) from an operation in flight: it waits for a brief holder, at
//! most its `--lock-wait`, and answers `BUSY` at once, naming the operation and since when, to
//! a long one. This is apt's lock timeout, with the holder's own word on how long it will be.

use crate::error::{ErrorCode, OtaError};
use crate::{clock, fsutil, proc};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// File name of the lock inside the state dir.
pub const LOCK_FILE: &str = "state.lock";
/// `serve` hands the lock it took to the child it starts: the child inherits the locked open
/// file description under this fd number (a flock belongs to the description, so the lock passes
/// with it, with no window for another writer).
pub const LOCK_FD_ENV: &str = "TOPE_OTA_LOCK_FD";
/// Called between fork and exec (`pre_exec`) of a child that acts under our lock: clears
/// close-on-exec on the locked `fd`, so the child owns the lock from its first instruction. Only
/// fcntl, which is async-signal-safe.
pub fn keep_across_exec(fd: std::os::fd::RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor number; failures are returned.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The holder record is written in one `pwrite` of this many bytes at offset 0 (padded with
/// spaces), never truncated: a reader sees the old or the new record, or a mix it cannot parse
/// and takes as unknown.
const RECORD_LEN: usize = 512;
/// How often a waiter tries the lock again.
const POLL: Duration = Duration::from_millis(25);

/// What a writer holds the lock for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purpose {
    /// The subcommand (`heal`, `download`, …).
    pub command: String,
    /// What it does, for the waiter's message: `housekeeping`, `a download of 1.3.0`.
    pub activity: String,
    /// An operation that may run for minutes: another writer gets `BUSY` at once.
    pub long: bool,
}

impl Purpose {
    pub fn brief(command: &str, activity: impl Into<String>) -> Purpose {
        Purpose {
            command: command.to_string(),
            activity: activity.into(),
            long: false,
        }
    }

    pub fn long(command: &str, activity: impl Into<String>) -> Purpose {
        Purpose {
            command: command.to_string(),
            activity: activity.into(),
            long: true,
        }
    }
}

/// The record in the lock file: who holds the lock, for what, since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    /// The holder's start time (clock ticks since boot, `/proc/PID/stat`): a pid reused by a
    /// later process is not the holder. 0 when unknown.
    #[serde(default)]
    pub start: u64,
    pub command: String,
    pub activity: String,
    pub long: bool,
    pub since: String,
}

impl Holder {
    fn describe(&self) -> String {
        format!("{} {}", self.activity, self.describe_short())
    }

    fn describe_short(&self) -> String {
        format!(
            "since {} (tope-ota {}, pid {})",
            self.since, self.command, self.pid
        )
    }
}

/// The holder record of the lock file in `state_dir`, if one is there, parses, and names a
/// live process that is the one that wrote it (a record left by a process that died, or not
/// yet written, is no word). Only the record's bytes are read, whatever follows them.
pub fn holder(state_dir: &Path) -> Option<Holder> {
    let file = File::open(state_dir.join(LOCK_FILE)).ok()?;
    let mut bytes = Vec::with_capacity(RECORD_LEN);
    io::Read::read_to_end(&mut io::Read::take(file, RECORD_LEN as u64), &mut bytes).ok()?;
    let text = std::str::from_utf8(&bytes).ok()?.trim();
    let h: Holder = serde_json::from_str(text).ok()?;
    let same = h.start == 0 || proc::start_time(h.pid) == Some(h.start);
    (proc::alive(h.pid) && same).then_some(h)
}

/// Whether some process holds the lock in `state_dir` now (a shared lock is refused while an
/// exclusive one is held). A record alone proves nothing: its writer may have been killed.
pub fn held(state_dir: &Path) -> bool {
    let Ok(file) = File::open(state_dir.join(LOCK_FILE)) else {
        return false;
    };
    match fs2::FileExt::try_lock_shared(&file) {
        Ok(()) => false,
        Err(e) => e.raw_os_error() == Some(libc::EWOULDBLOCK),
    }
}

/// Proof that this process is the one writer. Dropping it blanks the holder record and closes
/// the file, which releases the flock (we never call `unlock`: std ≥ 1.89 has its own
/// `File::unlock` that shadows fs2's).
#[derive(Debug)]
pub struct StateLock {
    file: Option<File>,
    dir: PathBuf,
    command: String,
}

/// A writer waiting for the lock, whether it blocks its thread or not.
struct Waiting {
    start: Instant,
    wait: Duration,
    said: bool,
}

impl Waiting {
    fn new(wait: Duration) -> Waiting {
        Waiting {
            start: Instant::now(),
            wait,
            said: false,
        }
    }

    /// One try: the lock, `BUSY` (the holder's record says so, or the wait is over), or `None`
    /// to try again after [`POLL`]; the first wait is announced.
    fn step(&mut self, state_dir: &Path, purpose: &Purpose) -> Result<Option<StateLock>> {
        let held = match StateLock::try_once(state_dir, purpose)? {
            Try::Taken(l) => return Ok(Some(l)),
            Try::Held(h) => h,
        };
        if let Some(r) = refusal(state_dir, held.as_ref(), self.start.elapsed(), self.wait) {
            return Err(r.into());
        }
        if !self.said {
            self.said = true;
            say_wait(self.wait, held.as_ref());
        }
        Ok(None)
    }
}

/// One try at the lock: the lock, or who holds it (`None` when it says nothing usable).
enum Try {
    Taken(StateLock),
    Held(Option<Holder>),
}

impl StateLock {
    /// Take the lock in `state_dir` for `purpose`. When another process holds it: `BUSY` at
    /// once if that one says it is in a long operation; otherwise wait for it, at most `wait`,
    /// then `BUSY`.
    pub fn acquire(state_dir: &Path, purpose: &Purpose, wait: Duration) -> Result<StateLock> {
        let mut w = Waiting::new(wait);
        loop {
            if let Some(l) = w.step(state_dir, purpose)? {
                return Ok(l);
            }
            std::thread::sleep(POLL);
        }
    }

    /// [`StateLock::acquire`] without blocking the thread: for `serve`'s runtime, which must go
    /// on answering while a POST waits.
    pub async fn acquire_async(
        state_dir: &Path,
        purpose: &Purpose,
        wait: Duration,
    ) -> Result<StateLock> {
        let mut w = Waiting::new(wait);
        loop {
            if let Some(l) = w.step(state_dir, purpose)? {
                return Ok(l);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn try_once(state_dir: &Path, purpose: &Purpose) -> Result<Try> {
        fsutil::ensure_dir(state_dir)?;
        let path = state_dir.join(LOCK_FILE);
        if let Some(file) = inherited(&path) {
            // Already locked through the same description: this succeeds at once.
            fs2::FileExt::try_lock_exclusive(&file)
                .with_context(|| format!("lock inherited {}", path.display()))?;
            return Ok(Try::Taken(Self::taken(file, state_dir, purpose)));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("open lock {}", path.display()))?;
        match fs2::FileExt::try_lock_exclusive(&file) {
            Ok(()) => Ok(Try::Taken(Self::taken(file, state_dir, purpose))),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.raw_os_error() == Some(libc::EWOULDBLOCK) =>
            {
                Ok(Try::Held(holder(state_dir)))
            }
            Err(e) => Err(e).with_context(|| format!("lock {}", path.display())),
        }
    }

    fn taken(file: File, dir: &Path, purpose: &Purpose) -> StateLock {
        // Whatever a crash or a hand left past the record goes, so the record alone is read.
        if let Err(e) = file.set_len(RECORD_LEN as u64) {
            log::debug!("truncating the lock file in {}: {e}", dir.display());
        }
        let lock = StateLock {
            file: Some(file),
            dir: dir.to_path_buf(),
            command: purpose.command.clone(),
        };
        lock.announce(purpose);
        lock
    }

    /// Say what the lock is held for from now on (heal that turns to resuming a download says
    /// so, and from then on others get `BUSY` at once). Best effort: the record informs
    /// waiters, it guards nothing.
    pub fn announce(&self, purpose: &Purpose) {
        let pid = std::process::id();
        let h = Holder {
            pid,
            start: proc::start_time(pid).unwrap_or(0),
            command: if purpose.command.is_empty() {
                self.command.clone()
            } else {
                purpose.command.clone()
            },
            activity: capped(&purpose.activity, 200),
            long: purpose.long,
            since: clock::now_rfc3339(),
        };
        let Ok(mut rec) = serde_json::to_vec(&h) else {
            return;
        };
        self.write_record(&mut rec);
    }

    fn write_record(&self, rec: &mut Vec<u8>) {
        let Some(file) = &self.file else { return };
        rec.truncate(RECORD_LEN - 1);
        rec.resize(RECORD_LEN - 1, b' ');
        rec.push(b'\n');
        if let Err(e) = file.write_all_at(rec, 0) {
            log::debug!("writing the holder record of {}: {e}", self.dir.display());
        }
    }

    /// The locked file.
    pub fn file(&self) -> &File {
        self.file.as_ref().expect("a held lock has its file")
    }

    /// The state dir this lock guards.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The locked file, for `serve` to hand to a child (see [`LOCK_FD_ENV`]); the child writes
    /// its own record.
    pub fn into_file(mut self) -> File {
        self.file.take().expect("a held lock has its file")
    }
}

impl Drop for StateLock {
    fn drop(&mut self) {
        // A record left behind would name a process that no longer holds the lock; a waiter
        // checks the pid too, but a blank record is plainer.
        self.write_record(&mut Vec::new());
    }
}

fn say_wait(wait: Duration, held: Option<&Holder>) {
    log::warn!(
        "waiting up to {} for {} to release the lock",
        crate::clock::format_duration(wait),
        held.map(Holder::describe)
            .unwrap_or_else(|| "another tope-ota".into())
    );
}

/// `s` cut to at most `max` bytes, at a character boundary: the record must fit its bytes.
fn capped(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// `BUSY` for a writer that found the lock held by `held`, once `waited`; `None` to wait on.
fn refusal(
    state_dir: &Path,
    held: Option<&Holder>,
    waited: Duration,
    wait: Duration,
) -> Option<OtaError> {
    let path = state_dir.join(LOCK_FILE);
    match held {
        Some(h) if h.long => Some(OtaError::new(
            ErrorCode::Busy,
            format!("{} is in flight: {}", h.activity, h.describe_short()),
        )),
        _ if waited >= wait => Some(OtaError::new(
            ErrorCode::Busy,
            match held {
                Some(h) => format!(
                    "another tope-ota holds {}: {}{}",
                    path.display(),
                    h.describe(),
                    waited_for(wait)
                ),
                None => format!(
                    "another tope-ota holds {}{}",
                    path.display(),
                    waited_for(wait)
                ),
            },
        )),
        _ => None,
    }
}

fn waited_for(wait: Duration) -> String {
    if wait.is_zero() {
        String::new()
    } else {
        format!(
            "; waited {} (--lock-wait)",
            crate::clock::format_duration(wait)
        )
    }
}

/// Whether this process inherited the lock of `state_dir` (see [`inherited`]): the updater on
/// trial commits an install only under the lock of the install that runs it.
pub fn inherits(state_dir: &Path) -> bool {
    inherited_fd(&state_dir.join(LOCK_FILE)).is_some()
}

/// The lock file inherited from `serve`, if `TOPE_OTA_LOCK_FD` names an open fd that is this
/// very state.lock (same device and inode); anything else is ignored.
fn inherited(path: &Path) -> Option<File> {
    use std::os::fd::FromRawFd;
    let fd = inherited_fd(path)?;
    // SAFETY: the fd is open and is our lock file; we own it from here. Close-on-exec again,
    // so services and the GUI we start never inherit the lock.
    unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        Some(File::from_raw_fd(fd))
    }
}

/// The fd `TOPE_OTA_LOCK_FD` names, when it is open and is the lock file at `path`.
fn inherited_fd(path: &Path) -> Option<i32> {
    use std::os::fd::BorrowedFd;
    use std::os::unix::fs::MetadataExt;
    let fd: i32 = std::env::var(LOCK_FD_ENV).ok()?.parse().ok()?;
    let want = std::fs::metadata(path).ok()?;
    // SAFETY: F_GETFD only asks whether the fd number is open.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // Compared through std's metadata (statx/fstat64): a 32-bit `libc::stat` has 32-bit inode
    // numbers (it fails to build on armhf, and would wrap a large inode).
    // SAFETY: the fd is open (checked above) and stays open while borrowed here.
    let got = unsafe { BorrowedFd::borrow_raw(fd) }
        .try_clone_to_owned()
        .map(File::from)
        .and_then(|f| f.metadata())
        .ok()?;
    (got.dev() == want.dev() && got.ino() == want.ino()).then_some(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_names_the_holder_and_is_blanked_on_release() {
        let dir = tempfile::tempdir().unwrap();
        let lock = StateLock::acquire(
            dir.path(),
            &Purpose::brief("heal", "housekeeping"),
            Duration::ZERO,
        )
        .unwrap();
        let h = holder(dir.path()).expect("a record");
        assert_eq!(h.pid, std::process::id());
        assert!(held(dir.path()));
        // Not this process any more once its start time differs (a reused pid).
        let mut other = h.clone();
        other.start += 1;
        std::fs::write(
            dir.path().join(LOCK_FILE),
            serde_json::to_vec(&other).unwrap(),
        )
        .unwrap();
        assert_eq!(holder(dir.path()), None);
        assert_eq!((h.command.as_str(), h.long), ("heal", false));
        lock.announce(&Purpose::long("", "a download of 1.3.0"));
        let h = holder(dir.path()).expect("a record");
        assert_eq!(h.command, "heal");
        assert_eq!(h.activity, "a download of 1.3.0");
        assert!(h.long);
        let len = std::fs::metadata(dir.path().join(LOCK_FILE)).unwrap().len();
        assert_eq!(len, RECORD_LEN as u64);
        drop(lock);
        assert_eq!(holder(dir.path()), None);
        assert!(!held(dir.path()));
        // Garbage past the record is cut when the lock is taken next.
        std::fs::write(dir.path().join(LOCK_FILE), vec![b'x'; 4000]).unwrap();
        let lock = StateLock::acquire(
            dir.path(),
            &Purpose::long("rollback", "é".repeat(300)),
            Duration::ZERO,
        )
        .unwrap();
        let h = holder(dir.path()).expect("a record");
        assert!(h.activity.len() <= 200 && h.activity.starts_with('é'));
        drop(lock);
    }

    #[test]
    fn a_record_of_a_dead_process_is_no_word() {
        let dir = tempfile::tempdir().unwrap();
        let rec = Holder {
            pid: i32::MAX as u32,
            start: 0,
            command: "download".into(),
            activity: "a download of 1.0.0".into(),
            long: true,
            since: clock::now_rfc3339(),
        };
        std::fs::write(
            dir.path().join(LOCK_FILE),
            serde_json::to_vec(&rec).unwrap(),
        )
        .unwrap();
        assert_eq!(holder(dir.path()), None);
        std::fs::write(dir.path().join(LOCK_FILE), b"{\"pid\":1,\"comm").unwrap();
        assert_eq!(holder(dir.path()), None);
    }
}
