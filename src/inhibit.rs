//! Print-job inhibitors: a 3D printer must never switch software in the middle of a print.
//! Install and rollback by hand (not the automatic rollback, which must run) check them before
//! stopping any service.

use crate::cli::Global;
use crate::error::{ErrorCode, OtaError};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What inhibits now, if anything: a file in the inhibit dir, or the inhibit command failing.
pub fn active(g: &Global) -> Option<String> {
    if let Ok(rd) = std::fs::read_dir(&g.inhibit_dir) {
        let mut names: Vec<String> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        if let Some(first) = names.first() {
            return Some(format!("{} holds {first}", g.inhibit_dir.display()));
        }
    }
    let cmd = g.inhibit_cmd.as_deref()?.trim();
    if cmd.is_empty() {
        return None;
    }
    let argv: Vec<&str> = cmd.split_whitespace().collect();
    let child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        // An inhibit command that cannot run inhibits: never switch when we cannot tell.
        Err(e) => return Some(format!("inhibit command {cmd:?} could not run: {e}")),
    };
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return None,
            Ok(Some(st)) => return Some(format!("inhibit command {cmd:?} says busy ({st})")),
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Some(format!(
                    "inhibit command {cmd:?} did not answer within 10 s"
                ));
            }
        }
    }
}

/// Wait up to `wait` for the inhibitors to clear; `INHIBITED` if they do not.
pub fn check(g: &Global, wait: Duration) -> Result<(), OtaError> {
    let until = Instant::now() + wait;
    loop {
        let Some(why) = active(g) else {
            return Ok(());
        };
        if Instant::now() >= until || crate::signals::stop_requested().is_some() {
            return Err(OtaError::new(
                ErrorCode::Inhibited,
                format!("a print job is running: {why}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
