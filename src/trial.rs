//! A package's updater on trial (issue #23). Before anything stops, the install keeps the new
//! snapshot's `bin/tope-ota` under the state dir ([`crate::proven`]) and runs its self-test
//! there, under the install's own lock: it must read state.json, take the lock and report its
//! version and the schema it reads. Then, at the install's end, the new updater commits the
//! install's success itself. Only then is it proven good, and the `.deb` binary runs it from
//! the next command on. A self-test that fails (exits non-zero, crashes, hangs, reports what
//! does not parse) refuses the release before anything changed; a commit that fails rolls the
//! device back to the version it ran. Either way the updater is marked bad, never tried again.

use crate::cli::Global;
use crate::cmd::Operation;
use crate::error::{ErrorCode, OtaError};
use crate::lock::{Purpose, LOCK_FD_ENV};
use crate::proven::{self, Kept, Trial};
use crate::state::{self, ReadOutcome, Stage};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long the self-test and the commit may take before the updater counts as hung.
fn bound() -> Duration {
    #[cfg(feature = "failpoints")]
    if let Some(ms) = std::env::var("TOPE_OTA_UPDATER_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return Duration::from_millis(ms);
    }
    Duration::from_secs(30)
}

/// What a self-test reports (`tope-ota self-test --json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// The updater's own version.
    pub version: String,
    /// The highest schema of state.json it reads.
    pub schema: u64,
    /// The stage it read.
    pub stage: String,
}

/// Run the updater at `exe` as `self-test ARGS` under the lock of `op`, bounded; its stdout
/// when it exits 0, otherwise how it failed.
fn run(
    g: &Global,
    op: &Operation,
    exe: &Path,
    args: &[&str],
) -> std::result::Result<Vec<u8>, String> {
    let fd = op.lock_fd();
    let mut cmd = Command::new(exe);
    cmd.arg(crate::dispatch::SELF_TEST)
        .args(args)
        .arg("--state-dir")
        .arg(&g.state_dir)
        .arg("--versions-dir")
        .arg(&g.versions_dir)
        .arg("--keys-dir")
        .arg(&g.keys_dir)
        // Callbacks stay with us: the operation's reporter sends what the updater commits.
        .arg("--report-url=")
        .arg("--json")
        .env(LOCK_FD_ENV, fd.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: only fcntl between fork and exec (async-signal-safe): the locked fd survives the
    // exec, so the updater acts under our lock.
    unsafe {
        cmd.pre_exec(move || {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("could not be started: {e}"))?;
    let mut out = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = (&mut out).take(64 * 1024).read_to_end(&mut buf);
        buf
    });
    let bound = bound();
    let until = Instant::now() + bound;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "hung: killed after {}",
                    crate::cli::format_duration(bound)
                ));
            }
            Err(e) => return Err(format!("could not be waited for: {e}")),
        }
    };
    let stdout = reader.join().unwrap_or_default();
    match (status.code(), status.signal()) {
        (Some(0), _) => Ok(stdout),
        (Some(c), _) => Err(format!("exited {c}")),
        (None, Some(s)) => Err(format!("crashed (signal {s})")),
        (None, None) => Err("ended in an unknown way".into()),
    }
}

/// The updater of the snapshot being installed at `snap` (dir name `target`, release
/// `release`), when it is one to try: keep it, self-test it, and record the trial. Nothing to
/// do without one, for the proven one, for one marked bad, for one from an unsigned package
/// while keys are configured, or for one not newer than the updater that runs (kept in the
/// snapshot, never run). A failed self-test is `UPDATER_FAILED`: the caller gives up the
/// release before anything stops.
pub fn begin(
    g: &Global,
    op: &mut Operation,
    snap: &Path,
    target: &str,
    release: &str,
) -> Result<()> {
    let Some(rec) = crate::updater::read_record(snap) else {
        return Ok(());
    };
    let sha = rec.sha256.clone();
    let kept = match proven::read(&g.state_dir) {
        Ok(k) => k,
        Err(e) => {
            log::warn!("the package's updater is not tried: {e:#}");
            return Ok(());
        }
    };
    if kept.good.as_ref().is_some_and(|k| k.sha256 == sha) {
        return Ok(());
    }
    if let Some(b) = kept.is_bad(&sha) {
        log::warn!(
            "the package's updater ({sha:.12}…) is not tried: it was marked bad at {}: {}",
            b.at,
            b.why
        );
        return Ok(());
    }
    let signed_by = op.state.package_signed_by.clone();
    if signed_by.is_none() && crate::dispatch::keys_configured(&g.keys_dir) {
        log::warn!(
            "the package's updater ({sha:.12}…) is not tried: the package is not signed and trusted keys are configured"
        );
        return Ok(());
    }
    let running = crate::dispatch::running();
    let path = proven::keep(&g.state_dir, &snap.join(crate::manifest::UPDATER_DST), &sha)?;
    let tested = run(g, op, &path, &[]);
    op.hold(&Purpose::long(
        "install",
        format!("an install of {release}"),
    ));
    let report = tested.and_then(|out| {
        #[derive(Deserialize)]
        struct Envelope {
            data: Report,
        }
        serde_json::from_slice::<Envelope>(&out)
            .map(|e| e.data)
            .map_err(|e| format!("reported what does not parse ({e})"))
    });
    let report = match report.and_then(|r| {
        if r.schema < state::SCHEMA {
            Err(format!(
                "reads state.json of schema {} at most; this device's is {}",
                r.schema,
                state::SCHEMA
            ))
        } else {
            Ok(r)
        }
    }) {
        Ok(r) => r,
        Err(why) => {
            let why = format!("its self-test {why}");
            proven::mark_bad(&g.state_dir, &sha, None, Some(release), &why)?;
            return crate::error::fail(
                ErrorCode::UpdaterFailed,
                format!("the updater of {release} ({sha:.12}…) is bad: {why}; nothing was changed"),
            );
        }
    };
    let newest = [
        Some(running.version.as_str()),
        Some(running.entry_version()),
        kept.good.as_ref().map(|k| k.version.as_str()),
    ];
    if let Some(v) = newest
        .into_iter()
        .flatten()
        .find(|v| !crate::dispatch::newer(&report.version, v))
    {
        log::warn!(
            "the package's updater {} is not newer than {v}: it stays in the snapshot and never runs",
            report.version
        );
        proven::prune(&g.state_dir, &kept);
        return Ok(());
    }
    log::info!(
        "the package's updater {} passed its self-test; it finishes the install",
        report.version
    );
    proven::update(&g.state_dir, |r| {
        r.trial = Some(Trial {
            kept: Kept {
                sha256: sha.clone(),
                version: report.version.clone(),
                release: release.to_string(),
                signed_by: signed_by.clone(),
                at: crate::clock::now_rfc3339(),
            },
            target: target.to_string(),
        });
    })?;
    Ok(())
}

/// The trial that the install in flight to `target` records.
pub fn pending(g: &Global, target: &str) -> Option<Trial> {
    proven::read(&g.state_dir)
        .ok()?
        .trial
        .filter(|t| t.target == target)
}

/// Let the updater on trial commit the install's success (`self-test --commit VERSION`) and
/// prove it good; on any failure it is marked bad and the caller falls back. The success the
/// updater saved becomes the operation's state.
pub fn commit(g: &Global, op: &mut Operation, trial: &Trial) -> Result<(), OtaError> {
    let version = op.state.version.clone().unwrap_or_default();
    let k = &trial.kept;
    let path = proven::binary(&g.state_dir, &k.sha256);
    let bad = |why: String| {
        let _ = proven::mark_bad(
            &g.state_dir,
            &k.sha256,
            Some(&k.version),
            Some(&k.release),
            &why,
        );
        OtaError::new(
            ErrorCode::UpdaterFailed,
            format!(
                "the updater {} of {} is bad: {why}; the device goes back to the version it ran",
                k.version, k.release
            ),
        )
    };
    match crate::integrity::sha256_file(&path) {
        Ok(h) if h == k.sha256 => {}
        Ok(h) => return Err(bad(format!("its kept file changed (SHA-256 {h:.12}…)"))),
        Err(e) => return Err(bad(format!("its kept file cannot be read: {e:#}"))),
    }
    let done = run(g, op, &path, &["--commit", &version]);
    op.hold(&Purpose::long(
        "install",
        format!("an install of {version}"),
    ));
    if let Err(why) = done {
        return Err(bad(format!(
            "it did not finish the install's commit: it {why}"
        )));
    }
    let saved = match state::read(&g.state_dir) {
        Ok(ReadOutcome::Ok(s))
            if s.stage == Stage::Success && s.version.as_deref() == Some(&version) =>
        {
            s
        }
        Ok(_) => return Err(bad("it exited 0 but did not commit the install".into())),
        Err(e) => return Err(bad(format!("what it committed cannot be read: {e:#}"))),
    };
    op.adopt_saved(*saved);
    let proven = proven::update(&g.state_dir, |r| {
        r.good = Some(Kept {
            at: crate::clock::now_rfc3339(),
            ..k.clone()
        });
        r.trial = None;
    });
    match proven {
        Ok(rec) => {
            log::info!(
                "the updater {} ({:.12}…) is proven good; it runs from the next command on",
                k.version,
                k.sha256
            );
            proven::prune(&g.state_dir, &rec);
        }
        // The install is done; only the proof is lost (the next release tries again).
        Err(e) => log::error!("recording the proven updater failed: {e:#}"),
    }
    Ok(())
}
