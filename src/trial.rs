//! A package's updater on trial (issue #23). Before anything stops, the install keeps the new
//! snapshot's `bin/tope-ota` under the state dir ([`crate::proven`]) and runs its self-test
//! there, under the install's own lock: it must read state.json, take the lock and report its
//! version and the schema it reads. Then, at the install's end, the new updater commits the
//! install's success itself. Only then is it proven good, and the `.deb` binary runs it from
//! the next command on. A self-test that fails (exits non-zero, crashes, hangs, reports what
//! does not parse) refuses the release before anything changed; a commit that fails rolls the
//! device back to the version it ran. Either way the updater is marked bad, never tried again.

use crate::cli::Global;
use crate::error::{ErrorCode, OtaError};
use crate::lock::{Purpose, LOCK_FD_ENV};
use crate::operation::Operation;
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
    // Generous: an eMMC that stalls on fsync under load must not make a good updater look hung.
    Duration::from_secs(60)
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
    /// Its serve tells systemd once it listens (see [`crate::proven::Kept::ready_notify`]);
    /// an updater made before says nothing, which reads as false.
    #[serde(default)]
    pub ready_notify: bool,
}

/// How a run of the updater on trial failed.
#[derive(Debug)]
struct Failed {
    why: String,
    /// The updater's own doing (it exited non-zero, crashed, hung, answered nonsense), rather
    /// than the device's (it could not be started, the disk is full, someone stopped it).
    blame: bool,
}

impl Failed {
    fn updater(why: String) -> Failed {
        Failed { why, blame: true }
    }

    fn device(why: String) -> Failed {
        Failed { why, blame: false }
    }
}

/// Run the kept updater `sha256` at `path` as `self-test ARGS` under the lock of `op`, bounded,
/// from the very file descriptor that was hashed (a file swapped after the check never runs);
/// its stdout when it exits 0.
fn run(
    g: &Global,
    op: &Operation,
    path: &Path,
    sha256: &str,
    args: &[&str],
) -> std::result::Result<Vec<u8>, Failed> {
    use std::os::fd::AsRawFd;
    if let Some(why) = proven::unsafe_path(path) {
        return Err(Failed::device(format!("could not be run safely: {why}")));
    }
    let file = crate::fsutil::open_regular(path)
        .map_err(|e| Failed::device(format!("could not be opened: {e}")))?;
    match crate::integrity::sha256_reader(&file) {
        Ok(h) if h == sha256 => {}
        Ok(h) => {
            return Err(Failed::updater(format!(
                "its kept file changed (SHA-256 {h:.12}…)"
            )))
        }
        Err(e) => return Err(Failed::device(format!("could not be read: {e:#}"))),
    }
    let fd = op.lock_fd();
    let mut cmd = Command::new(format!("/proc/self/fd/{}", file.as_raw_fd()));
    cmd.arg0(path)
        .arg(crate::dispatch::SELF_TEST)
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
    // SAFETY: between fork and exec only async-signal-safe calls: fcntl (see
    // crate::lock::keep_across_exec), setsid, prctl. In a session of its own, a terminal's
    // Ctrl-C, hangup or job control (SIGTTOU with `stty tostop`) never reaches the updater on
    // trial, and it dies with us: nothing outlives the bound or holds the lock without us.
    unsafe {
        cmd.pre_exec(move || {
            crate::lock::keep_across_exec(fd)?;
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Failed::device(format!("could not be started: {e}")))?;
    drop(file);
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
                // The whole session it leads: what it started goes too.
                if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                    crate::hooks::kill_group(pid);
                }
                let _ = child.kill();
                let _ = child.wait();
                return Err(Failed::updater(format!(
                    "hung: killed after {}",
                    crate::clock::format_duration(bound)
                )));
            }
            Err(e) => return Err(Failed::device(format!("could not be waited for: {e}"))),
        }
    };
    let stdout = reader.join().unwrap_or_default();
    match (status.code(), status.signal()) {
        (Some(0), _) => Ok(stdout),
        (Some(c), _) => {
            // A disk that is full fails any updater: the device's doing.
            let code = serde_json::from_slice::<serde_json::Value>(&stdout)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string));
            match code.as_deref() {
                Some(e @ "DISK_FULL") => Err(Failed::device(format!("exited {c} ({e})"))),
                _ => Err(Failed::updater(format!("exited {c}"))),
            }
        }
        // Stopped with us (a shutdown, a person stopping the install): not a crash of its
        // own. In its own session nothing else stops it, so any other death is its doing.
        (None, Some(s)) if crate::signals::stop_requested().is_some() => {
            Err(Failed::device(format!("was stopped (signal {s})")))
        }
        (None, Some(s)) => Err(Failed::updater(format!("crashed (signal {s})"))),
        (None, None) => Err(Failed::updater("ended in an unknown way".into())),
    }
}

/// The updater of the snapshot being installed at `snap` (dir name `target`, release
/// `release`), when it is one to try: keep it, self-test it, and record the trial. Nothing to
/// do without one, for the proven one, for one marked bad, for one from an unsigned package
/// while keys are configured, for one without a version stamp, or for one whose stamp is not
/// newer than the updater that runs (kept in the
/// snapshot, never run). A failed self-test is `UPDATER_FAILED`: the caller gives up the
/// release before anything stops.
pub fn begin(
    g: &Global,
    op: &mut Operation,
    snap: &Path,
    target: &str,
    release: &str,
) -> Result<()> {
    let kept = match proven::read(&g.state_dir) {
        Ok(k) => k,
        // One that does not parse trusts nothing; moved aside by this writer, so that the
        // device's self-update goes on (a newer schema, or a read that fails, is left as it is).
        Err(e) if proven::is_corrupt(&e) => match proven::update(&g.state_dir, |_| {}) {
            Ok(k) => k,
            Err(e) => {
                log::warn!("no updater is tried: {e:#}");
                return Ok(());
            }
        },
        Err(e) => {
            log::warn!("no updater is tried: {e:#}");
            return Ok(());
        }
    };
    // A trial an earlier install left (it fell back, a power cut) belongs to no install now.
    if kept.trial.is_some() {
        if let Err(e) = proven::update(&g.state_dir, |r| r.trial = None) {
            log::warn!("no updater is tried: {e:#}");
            return Ok(());
        }
    }
    let Some(rec) = crate::updater::read_record(snap) else {
        return Ok(());
    };
    let sha = rec.sha256.clone();
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
    // Its version from the file, before anything of it runs: one that is not newer than
    // every updater this device runs or may run is never started, so it can neither cost the
    // release nor be marked bad.
    let from = snap.join(crate::manifest::UPDATER_DST);
    let stamped = match crate::fsutil::open_regular(&from).and_then(|f| crate::version::stamped(&f))
    {
        Ok(Some(v)) => v,
        Ok(None) => {
            log::warn!(
                "the package's updater ({sha:.12}…) carries no version stamp of a tope-ota build: it stays in the snapshot and never runs"
            );
            return Ok(());
        }
        Err(e) => {
            log::warn!(
                "the package's updater ({sha:.12}…) is not tried: reading {}: {e}",
                from.display()
            );
            return Ok(());
        }
    };
    let running = crate::dispatch::running();
    let newest = [
        Some(running.version.as_str()),
        Some(running.entry_version()),
        kept.good.as_ref().map(|k| k.version.as_str()),
    ];
    if let Some(v) = newest
        .into_iter()
        .flatten()
        .find(|v| !crate::version::newer(&stamped, v))
    {
        log::warn!(
            "the package's updater {stamped} is not newer than {v}: it stays in the snapshot and never runs"
        );
        return Ok(());
    }
    // Keeping it needs room and a sound disk; without them the release installs with the
    // updater that runs, and a later one tries again.
    let path = match proven::keep(&g.state_dir, &from, &sha) {
        Ok(p) => p,
        Err(e) => {
            log::warn!("the package's updater ({sha:.12}…) is not tried: keeping it: {e:#}");
            return Ok(());
        }
    };
    let tested = run(g, op, &path, &sha, &[]);
    op.hold(&Purpose::long(
        "install",
        format!("an install of {release}"),
    ));
    let report = tested.and_then(|out| {
        #[derive(Deserialize)]
        struct Envelope {
            data: Report,
        }
        let r = serde_json::from_slice::<Envelope>(&out)
            .map(|e| e.data)
            .map_err(|e| Failed::updater(format!("reported what does not parse ({e})")))?;
        if r.version != stamped {
            return Err(Failed::updater(format!(
                "says it is {}, but its file is stamped {stamped}",
                r.version
            )));
        }
        if r.schema < state::SCHEMA {
            return Err(Failed::updater(format!(
                "reads state.json of schema {} at most; this device's is {}",
                r.schema,
                state::SCHEMA
            )));
        }
        Ok(r)
    });
    let report = match report {
        Ok(r) => r,
        Err(f) if !f.blame => {
            log::warn!(
                "the package's updater ({sha:.12}…) is not tried: its self-test {}",
                f.why
            );
            prune_kept(g);
            return Ok(());
        }
        Err(f) => {
            let why = format!("its self-test {}", f.why);
            proven::mark_bad(&g.state_dir, &sha, Some(&stamped), Some(release), &why)?;
            return crate::error::fail(
                ErrorCode::UpdaterFailed,
                format!(
                    "the updater {stamped} of {release} ({sha:.12}…) is bad: {why}; nothing was changed"
                ),
            );
        }
    };
    log::info!(
        "the package's updater {} passed its self-test; it finishes the install",
        report.version
    );
    let recorded = proven::update(&g.state_dir, |r| {
        r.trial = Some(Trial {
            kept: Kept {
                sha256: sha.clone(),
                version: report.version.clone(),
                release: release.to_string(),
                signed_by: signed_by.clone(),
                at: crate::clock::now_rfc3339(),
                ready_notify: report.ready_notify,
                unknown: Default::default(),
            },
            target: target.to_string(),
        });
    });
    if let Err(e) = recorded {
        log::warn!("the package's updater is not tried: recording its trial: {e:#}");
    }
    Ok(())
}

/// Remove the kept copies nothing names, by the record as it is now; nothing when it cannot be
/// read (a record misread as empty would remove the proven updater's copy too).
fn prune_kept(g: &Global) {
    match proven::read(&g.state_dir) {
        Ok(rec) => proven::prune(&g.state_dir, &rec),
        Err(e) => log::warn!("kept updaters not pruned: {e:#}"),
    }
}

/// The trial that the install in flight to `target` records: for that snapshot's own updater,
/// and still newer than the updater that runs and the proven one.
pub fn pending(g: &Global, target: &str) -> Option<Trial> {
    let rec = proven::read(&g.state_dir).ok()?;
    let t = rec.trial?;
    let theirs = crate::updater::read_record(&g.versions_dir.join(target))?;
    let running = crate::dispatch::running();
    let newer = |v: &str| crate::version::newer(&t.kept.version, v);
    (t.target == target
        && theirs.sha256 == t.kept.sha256
        && newer(&running.version)
        && newer(running.entry_version())
        && rec.good.as_ref().is_none_or(|k| newer(&k.version)))
    .then_some(t)
}

/// Let the updater on trial commit the install's success (`self-test --commit VERSION`) and
/// prove it good; when it fails (`Ok(Err)`) it is marked bad and the caller falls back. The
/// success the updater saved becomes the operation's state. `Err`: the updater failed for the
/// device's reasons and our own save of the success failed too, as a commit without a trial
/// can (the caller returns it; heal commits later).
pub fn commit(g: &Global, op: &mut Operation, trial: &Trial) -> Result<Result<(), OtaError>> {
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
    let done = run(g, op, &path, &k.sha256, &[&format!("--commit={version}")]);
    op.hold(&Purpose::long(
        "install",
        format!("an install of {version}"),
    ));
    match done {
        Ok(_) => {}
        Err(f) if f.blame => {
            return Ok(Err(bad(format!(
                "it did not finish the install's commit: it {}",
                f.why
            ))))
        }
        Err(f) => {
            // Not the updater's doing: the install commits as it always did, with the updater
            // that runs; the new one stays unproven (a later release tries it again).
            log::warn!(
                "the updater {} did not commit the install: it {}; committing it ourselves",
                k.version,
                f.why
            );
            let _ = proven::update(&g.state_dir, |r| r.trial = None);
            op.state.mark_success(true, &version);
            // A failing save here is the install's own, as without a trial: heal commits later.
            op.commit()?;
            return Ok(Ok(()));
        }
    }
    let saved = match state::read(&g.state_dir) {
        Ok(ReadOutcome::Ok(s))
            if s.stage == Stage::Success && s.version.as_deref() == Some(&version) =>
        {
            s
        }
        Ok(_) => {
            return Ok(Err(
                bad("it exited 0 but did not commit the install".into()),
            ))
        }
        Err(e) => return Ok(Err(bad(format!("what it committed cannot be read: {e:#}")))),
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
    Ok(Ok(()))
}
