//! Which updater runs. Every entry point (the units, a shell, device-api's exec) starts the
//! `.deb`'s `/usr/bin/tope-ota`; before it parses its arguments, it execs the updater proven
//! good on this device (see [`crate::proven`]) when that one is newer than itself, its file is
//! safe to execute and still has its recorded hash, it came from a signed package whenever
//! trusted keys are configured, and it has not ended [`crate::proven::MAX_UNFINISHED`] runs in
//! a row without finishing. Otherwise it runs itself, the trusted fallback.
//!
//! The loop guard compares `/proc/self/exe` with the target (an exec'd updater never execs
//! again); what is exec'd is the file descriptor that was hashed, so a file swapped after the
//! check is never run. The fallback's path and version reach the exec'd updater through two
//! environment variables that it removes at once, so they never leak into a hook.

use crate::proven::{self, Kept};
use crate::version::{newer, version};
use anyhow::Result;
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const ENTRY_ENV: &str = "TOPE_OTA_ENTRY";
const ENTRY_VERSION_ENV: &str = "TOPE_OTA_ENTRY_VERSION";
/// The subcommand a candidate updater is tried with: never dispatched, it must test itself.
pub const SELF_TEST: &str = "self-test";

/// What runs, for `--version`, `status` and serve's restart.
#[derive(Debug, Clone)]
pub struct Running {
    /// Our own binary.
    pub exe: PathBuf,
    pub version: String,
    /// The `.deb` binary that exec'd us, and its version, when we are the proven updater.
    pub fallback: Option<(PathBuf, String)>,
    /// The hash we were exec'd as (the proven updater's).
    pub sha256: Option<String>,
    /// Why the proven updater does not run, when one is recorded.
    pub note: Option<String>,
    pub state_dir: PathBuf,
    /// This run is serve started by systemd (its unit is `Type=notify`: `NOTIFY_SOCKET` set),
    /// which ends only when it is stopped (see [`finish`]).
    pub serve_under_unit: bool,
}

impl Running {
    /// The program a restart (serve's) execs: the `.deb` binary, which chooses again.
    pub fn entry(&self) -> PathBuf {
        self.fallback
            .as_ref()
            .map(|(p, _)| p.clone())
            .unwrap_or_else(|| self.exe.clone())
    }

    /// The version the choice compares the proven updater with: the `.deb` binary's.
    pub fn entry_version(&self) -> &str {
        self.fallback
            .as_ref()
            .map(|(_, v)| v.as_str())
            .unwrap_or(&self.version)
    }
}

static RUNNING: OnceLock<Running> = OnceLock::new();

/// What [`start`] found; a library caller (the tests) that never called it sees this binary.
pub fn running() -> &'static Running {
    RUNNING.get_or_init(|| Running {
        exe: own_exe(),
        version: version().to_string(),
        fallback: None,
        sha256: None,
        note: None,
        state_dir: PathBuf::from("/var/lib/tope-ota"),
        serve_under_unit: false,
    })
}

fn own_exe() -> PathBuf {
    match std::fs::read_link("/proc/self/exe") {
        // Replaced under us (dpkg -i of a newer .deb): the path now names the new binary,
        // which is what a restart or a child should run.
        Ok(p) => match p.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
            Some(s) => PathBuf::from(s),
            None => p,
        },
        Err(_) => PathBuf::from("/proc/self/exe"),
    }
}

/// The value of a global option before clap parses anything (the proven updater may know
/// options this one does not): `--name V`, `--name=V`, the environment, the default.
fn prescan(args: &[OsString], name: &str, env: &str, default: &str) -> PathBuf {
    let mut found = None;
    let mut it = args.iter().skip(1);
    let eq = format!("{name}=");
    while let Some(a) = it.next() {
        let Some(s) = a.to_str() else { continue };
        if s == "--" {
            break;
        }
        if s == name {
            found = it.next().map(PathBuf::from);
        } else if let Some(v) = s.strip_prefix(&eq) {
            found = Some(PathBuf::from(v));
        }
    }
    found
        .or_else(|| std::env::var_os(env).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(default))
}

/// Every subcommand's name, for the run counter before clap parses (a unit test of `cli`
/// holds it equal to the definition's).
pub const SUBCOMMANDS: [&str; 10] = [
    "download", "install", "status", "rollback", "heal", "serve", "pack", "factory", "verify",
    SELF_TEST,
];

/// The subcommand of `args` as far as it can be told before parsing (the proven updater may
/// know more), for the run counter; `-` when none is found.
fn subcommand(args: &[OsString]) -> &str {
    args.iter()
        .skip(1)
        .filter_map(|a| a.to_str())
        .find(|a| SUBCOMMANDS.contains(a))
        .unwrap_or("-")
}

/// The choice, made before anything else: exec the proven updater (this never returns then), or
/// run ourselves. Call first in `main`, while the process has one thread.
pub fn start() -> &'static Running {
    let fallback = match (
        std::env::var_os(ENTRY_ENV),
        std::env::var(ENTRY_VERSION_ENV),
    ) {
        (Some(p), Ok(v)) => Some((PathBuf::from(p), v)),
        _ => None,
    };
    // SAFETY: called first in main, before any thread exists.
    unsafe {
        std::env::remove_var(ENTRY_ENV);
        std::env::remove_var(ENTRY_VERSION_ENV);
    }
    let args: Vec<OsString> = std::env::args_os().collect();
    let state_dir = prescan(
        &args,
        "--state-dir",
        "TOPE_OTA_STATE_DIR",
        "/var/lib/tope-ota",
    );
    let keys_dir = prescan(
        &args,
        "--keys-dir",
        "TOPE_OTA_KEYS_DIR",
        "/etc/tope-ota/keys.d",
    );
    let serve_under_unit = subcommand(&args) == "serve" && notify_expected();
    let mut running = Running {
        exe: own_exe(),
        version: version().to_string(),
        sha256: None,
        note: None,
        state_dir: state_dir.clone(),
        fallback: None,
        serve_under_unit,
    };
    if fallback.is_some() {
        // Believed only by the proven updater itself, exec'd by the choice: to any other
        // binary these variables are someone's environment (a hook's, a hand's), and it
        // chooses as every start does. The path they name is what serve's children and
        // restarts run.
        running.sha256 = proven::read(&state_dir)
            .ok()
            .and_then(|r| r.good)
            .map(|g| g.sha256)
            .filter(|s| is_our_file(&proven::binary(&state_dir, s)));
        if running.sha256.is_some() {
            running.fallback = fallback;
        }
    }
    if running.fallback.is_none() && args.get(1).and_then(|a| a.to_str()) != Some(SELF_TEST) {
        match choose(&state_dir, &keys_dir, version(), serve_under_unit) {
            Choice::Own(note) => running.note = note,
            Choice::Exec(file, kept) => {
                running.note = Some(exec(&args, &state_dir, &running.exe, file, &kept))
            }
        }
    }
    RUNNING.get_or_init(|| running)
}

/// Log why the proven updater does not run, once logging is set up.
pub fn log_choice() {
    let r = running();
    if let Some(n) = &r.note {
        log::info!("{n}");
    }
    if let (Some((p, v)), Some(s)) = (&r.fallback, &r.sha256) {
        log::debug!(
            "the proven updater {} ({s:.12}…) runs; fallback {v} {}",
            r.version,
            p.display()
        );
    }
}

/// The process ends in order with exit code `code`: a proven updater removes its run entry;
/// after exit 0 also the entries of earlier runs of the same subcommand that did not finish.
/// serve under its unit is the exception: it ends only when it is stopped (exit 0), so one that
/// exits with an error could not serve, and systemd (`Restart=on-failure`) would start it again
/// and again: its entry stays, counted as a run that did not finish.
pub fn finish(code: i32) {
    end(code, true);
}

/// [`finish`] for a run that ends before its arguments were parsed (clap exits for `--help`,
/// `--version` or a usage error): even at exit 0 it did none of its subcommand's work, so it
/// clears no earlier failure.
pub fn finish_unparsed(code: i32) {
    end(code, false);
}

fn end(code: i32, may_clear: bool) {
    let r = running();
    if r.fallback.is_none() || (code != 0 && r.serve_under_unit) {
        return;
    }
    let args: Vec<OsString> = std::env::args_os().collect();
    proven::end_run(
        &r.state_dir,
        (code == 0 && may_clear).then(|| subcommand(&args)),
    );
}

/// What the choice decided.
pub enum Choice {
    /// Run ourselves; the note says why the proven updater does not run, when one is recorded.
    Own(Option<String>),
    /// Exec this open file, the proven updater.
    Exec(std::fs::File, Kept),
}

fn is_our_file(path: &Path) -> bool {
    match (std::fs::metadata(path), std::fs::metadata("/proc/self/exe")) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Whether trusted keys are configured: a keys dir that cannot be read counts as configured
/// (trust fails closed, as for packages).
pub fn keys_configured(keys_dir: &Path) -> bool {
    crate::sign::load_keys(keys_dir).map_or(true, |k| !k.is_empty())
}

/// The proven updater that a `.deb` binary of version `own` would run now, without hashing it
/// or counting its runs (for serve, which asks every few seconds whether to restart).
pub fn planned(
    state_dir: &Path,
    keys_dir: &Path,
    own: &str,
    serve_under_systemd: bool,
) -> Option<Kept> {
    let good = proven::read(state_dir).ok()?.good?;
    if !newer(&good.version, own)
        || (serve_under_systemd && !good.ready_notify)
        || (keys_configured(keys_dir) && good.signed_by.is_none())
        || proven::unsafe_path(&proven::binary(state_dir, &good.sha256)).is_some()
    {
        return None;
    }
    Some(good)
}

/// Whether systemd waits for READY=1 from this process (a `Type=notify` unit started it).
fn notify_expected() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Decide whether the proven updater runs instead of a `.deb` binary of version `own`;
/// `serve_under_systemd`: for a serve that systemd waits to hear READY=1 from.
pub fn choose(state_dir: &Path, keys_dir: &Path, own: &str, serve_under_systemd: bool) -> Choice {
    let rec = match proven::read(state_dir) {
        Ok(r) => r,
        Err(e) => return Choice::Own(Some(format!("the updater record: {e:#}"))),
    };
    let Some(good) = rec.good else {
        return Choice::Own(None);
    };
    let short = format!("the proven updater {} ({:.12}…)", good.version, good.sha256);
    if !newer(&good.version, own) {
        return Choice::Own(Some(format!(
            "{short} is not newer than this one ({own}): this one runs"
        )));
    }
    let path = proven::binary(state_dir, &good.sha256);
    if is_our_file(&path) {
        return Choice::Own(None);
    }
    if serve_under_systemd && !good.ready_notify {
        return Choice::Own(Some(format!(
            "{short} does not tell systemd when serve is ready (the unit is Type=notify): this one serves"
        )));
    }
    if let Some(why) = proven::unsafe_path(&path) {
        return Choice::Own(Some(format!("{short} is not run: {why}")));
    }
    if keys_configured(keys_dir) && good.signed_by.is_none() {
        return Choice::Own(Some(format!(
            "{short} is not run: it came from an unsigned package and trusted keys are configured"
        )));
    }
    let bad = |why: String| {
        let _ = proven::mark_bad(
            state_dir,
            &good.sha256,
            Some(&good.version),
            Some(&good.release),
            &why,
        );
        Choice::Own(Some(format!("{short} is bad now: {why}")))
    };
    let failed = proven::unfinished(state_dir, &good.sha256);
    if failed >= proven::MAX_UNFINISHED {
        return bad(format!(
            "its last {failed} runs ended without finishing (a crash, a hang, or a serve under systemd that exited with an error)"
        ));
    }
    let file = match crate::fsutil::open_regular(&path) {
        Ok(f) => f,
        Err(e) => return Choice::Own(Some(format!("{short}: open {}: {e}", path.display()))),
    };
    match crate::integrity::sha256_reader(&file) {
        Ok(h) if h == good.sha256 => Choice::Exec(file, good),
        Ok(h) => bad(format!("its file has SHA-256 {h}, not the recorded one")),
        Err(e) => Choice::Own(Some(format!("{short}: read {}: {e}", path.display()))),
    }
}

/// Exec the open file `file` (the proven updater) with our arguments; returns only when the
/// exec failed, with why.
fn exec(
    args: &[OsString],
    state_dir: &Path,
    me: &Path,
    file: std::fs::File,
    kept: &Kept,
) -> String {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    // The trial counter first: a crash of the exec'd updater must leave a trace. A run that
    // cannot be counted (a full, failing or read-only disk) is not exec'd: a crash loop there
    // would go unnoticed, so the trusted fallback runs.
    if let Err(e) = proven::begin_run(state_dir, &kept.sha256, subcommand(args)) {
        return format!(
            "the proven updater {} ({:.12}…) is not run: its run cannot be counted: {e:#}",
            kept.version, kept.sha256
        );
    }
    let fd_path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let mut cmd = std::process::Command::new(&fd_path);
    if let Some(a0) = args.first() {
        cmd.arg0(a0);
    }
    let err = cmd
        .args(args.iter().skip(1))
        .env(ENTRY_ENV, me)
        .env(ENTRY_VERSION_ENV, version())
        .exec();
    proven::end_run(state_dir, None);
    format!(
        "exec of the proven updater {} ({:.12}…) failed: {err}; this one runs",
        kept.version, kept.sha256
    )
}

/// One line per updater, for `--version` and `status`.
pub fn describe(r: &Running) -> Vec<String> {
    let mut out = Vec::new();
    match (&r.fallback, &r.sha256) {
        (Some((p, v)), sha) => {
            out.push(format!(
                "running:  {} {} (the proven updater{})",
                r.version,
                r.exe.display(),
                sha.as_ref()
                    .map(|s| format!(", sha256 {s:.12}…"))
                    .unwrap_or_default()
            ));
            out.push(format!("fallback: {v} {} (the package's)", p.display()));
        }
        (None, _) => out.push(format!("running:  {} {}", r.version, r.exe.display())),
    }
    if let Some(n) = &r.note {
        out.push(format!("note:     {n}"));
    }
    out
}

/// `status`'s lines on the updaters: the one running, the fallback, the last bad one.
pub fn status_lines(state_dir: &Path) -> Vec<String> {
    let r = running();
    let mut out = Vec::new();
    match (&r.fallback, &r.sha256) {
        (Some((p, v)), Some(sha)) => out.push(format!(
            "updater:   {} (proven, {}, sha256 {sha:.12}…); fallback {v} {}",
            r.version,
            r.exe.display(),
            p.display()
        )),
        _ => out.push(format!("updater:   {} {}", r.version, r.exe.display())),
    }
    match proven::read(state_dir) {
        Ok(rec) => {
            if let Some(n) = &r.note {
                out.push(format!("           {n}"));
            }
            if let Some(g) = rec.good.as_ref().filter(|g| !g.ready_notify) {
                out.push(format!(
                    "           serve under systemd runs the package's updater: the proven {} did not say it tells systemd when it is ready",
                    g.version
                ));
            }
            if let Some(t) = &rec.trial {
                out.push(format!(
                    "           on trial: {} of {} (for {})",
                    t.kept.version, t.kept.release, t.target
                ));
            }
            if let Some(b) = rec.bad.last() {
                out.push(format!(
                    "           bad: {} ({:.12}…) of {} at {}: {}",
                    b.version.as_deref().unwrap_or("?"),
                    b.sha256,
                    b.release.as_deref().unwrap_or("?"),
                    b.at,
                    b.why
                ));
            }
        }
        Err(e) => out.push(format!("           the updater record: {e:#}")),
    }
    out
}

/// `--version`'s long text.
pub fn long_version() -> String {
    let r = running();
    let mut s = r.version.clone();
    for l in describe(r) {
        s.push('\n');
        s.push_str(&l);
    }
    s
}

/// The hash of the proven updater a fresh start of serve would run now (see [`planned`];
/// `serve_under_systemd`: systemd waits for its READY=1): serve restarts when this changes,
/// so a restart whose exec fails is not tried again and again.
pub fn planned_now(keys_dir: &Path, serve_under_systemd: bool) -> Option<String> {
    let r = running();
    planned(
        &r.state_dir,
        keys_dir,
        r.entry_version(),
        serve_under_systemd,
    )
    .map(|k| k.sha256)
}

/// Exec the entry (the `.deb` binary, which chooses again) with `args`, keeping the fds that
/// are not close-on-exec; returns only on failure.
pub fn reexec(args: &[OsString], env: &[(&str, OsString)]) -> Result<std::convert::Infallible> {
    use std::os::unix::process::CommandExt;
    let r = running();
    // Ends in order, clearing nothing: the entry the restarted serve writes takes its place.
    if r.fallback.is_some() {
        proven::end_run(&r.state_dir, None);
    }
    let mut cmd = std::process::Command::new(r.entry());
    if let Some(a0) = args.first() {
        cmd.arg0(a0);
    }
    cmd.args(args.iter().skip(1));
    for (k, v) in env {
        cmd.env(k, v);
    }
    Err(anyhow::anyhow!(
        "exec {}: {}",
        r.entry().display(),
        cmd.exec()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_options_are_found_before_parsing() {
        let a = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let p = |args: &[&str]| prescan(&a(args), "--state-dir", "TOPE_OTA_NO_SUCH_ENV", "/d");
        assert_eq!(p(&["x", "status"]), PathBuf::from("/d"));
        assert_eq!(
            p(&["x", "--state-dir", "/s", "status"]),
            PathBuf::from("/s")
        );
        assert_eq!(p(&["x", "status", "--state-dir=/t"]), PathBuf::from("/t"));
        assert_eq!(p(&["x", "--", "--state-dir=/t"]), PathBuf::from("/d"));
    }
}
