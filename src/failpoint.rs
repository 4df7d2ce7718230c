//! Named crash points and injected I/O faults for the crash-injection tests. Compiled in only
//! with the `failpoints` feature (the device binary has none).
//!
//! - `TOPE_OTA_FAILPOINT=name`: the process SIGKILLs itself at [`hit`]`(name)`, on the
//!   `TOPE_OTA_FAILPOINT_HIT`-th pass (default the first).
//! - `TOPE_OTA_FAULT=op:N`: from the N-th call of [`fault`]`(op)` on, every call fails with EIO,
//!   as a disk that went bad stays bad. `op` is `fsync`, `rename` or `symlink` (the calls that
//!   make a change durable or visible), or `write` (a delta's writes to the partial); `N`
//!   defaults to 1.
//! - `TOPE_OTA_UPDATER_FAULT=at:how`: a kept updater (one run from `<state-dir>/updater/`, the
//!   `kept_dir` its callers name, never the binary that tries or execs it) fails at
//!   [`updater_fault`]`(at, kept_dir)`: `exit` (1), `crash` (SIGABRT) or `hang` (sleeps, deaf
//!   to SIGTERM). `at` is `self-test`, `commit`, `after-commit` or `run` (every command's start).

#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static PASSES: AtomicU32 = AtomicU32::new(0);
    if std::env::var("TOPE_OTA_FAILPOINT").ok().as_deref() != Some(name) {
        return;
    }
    let want: u32 = std::env::var("TOPE_OTA_FAILPOINT_HIT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    if PASSES.fetch_add(1, Ordering::SeqCst) + 1 == want {
        // SAFETY: raising a signal at ourselves.
        unsafe {
            libc::raise(libc::SIGKILL);
        }
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}

#[cfg(feature = "failpoints")]
pub fn fault(op: &str) -> std::io::Result<()> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static PASSES: AtomicU32 = AtomicU32::new(0);
    let Ok(spec) = std::env::var("TOPE_OTA_FAULT") else {
        return Ok(());
    };
    let (name, from) = match spec.split_once(':') {
        Some((n, k)) => (n.to_string(), k.parse::<u32>().unwrap_or(1)),
        None => (spec, 1),
    };
    if name != op {
        return Ok(());
    }
    if PASSES.fetch_add(1, Ordering::SeqCst) + 1 >= from {
        return Err(std::io::Error::from_raw_os_error(libc::EIO));
    }
    Ok(())
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn fault(_op: &str) -> std::io::Result<()> {
    Ok(())
}

#[cfg(feature = "failpoints")]
pub fn updater_fault(at: &str, kept_dir: &str) {
    let Ok(spec) = std::env::var("TOPE_OTA_UPDATER_FAULT") else {
        return;
    };
    let Some((name, how)) = spec.split_once(':') else {
        return;
    };
    let exe = std::fs::read_link("/proc/self/exe").unwrap_or_default();
    let kept = exe
        .parent()
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == kept_dir);
    if name != at || !kept {
        return;
    }
    match how {
        "exit" => std::process::exit(1),
        // SAFETY: signals at ourselves; SIG_IGN for SIGTERM so the hang is deaf to it.
        // No core file: the tests run in the source tree.
        "crash" => unsafe {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            libc::abort();
        },
        "hang" => {
            unsafe {
                libc::signal(libc::SIGTERM, libc::SIG_IGN);
            }
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        _ => {}
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn updater_fault(_at: &str, _kept_dir: &str) {}
