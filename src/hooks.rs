//! Commands a version brings with it, run from its snapshot and bounded: the health checks that
//! decide whether a version is committed, and the migration of its mutable data.
//!
//! A command runs without a shell: its program is absolute, a bare name looked up in `PATH`, or
//! a relative path inside the snapshot; its working directory is the snapshot (a migration's
//! is a private dir that holds only the data, see `install::carry_and_migrate`). It runs in a
//! process group of its own, with stdin from /dev/null and stdout and stderr into one pipe, of
//! which only the last [`TAIL_BYTES`] are kept. When it exits (or at its bound) the whole group
//! is killed before the exit is reaped, so a child it left in its group cannot outlive it, and
//! the pipe is read no further. While it runs we are a child subreaper, so a daemon that escaped
//! the group (setsid, a double fork) is re-parented to us and killed too; holding the pipe open
//! it delays nothing.

use crate::error::{ErrorCode, OtaError};
use crate::manifest::HookCommand;
use crate::snapshot::META_DIR;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How much of a command's output is kept (the end of it).
pub const TAIL_BYTES: usize = 16 * 1024;
/// The record of a snapshot's health checks, inside its `.tope-ota/`.
pub const HEALTH_FILE: &str = "health.json";

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Exited(i32),
    Signalled(i32),
    /// Killed (with its process group) at its bound.
    TimedOut,
    /// Could not be started.
    NotRun(String),
}

/// A finished run: how it ended, the end of its output, how long it took.
#[derive(Debug, Clone)]
pub struct Ran {
    pub outcome: Outcome,
    pub tail: Vec<u8>,
    pub took: Duration,
}

impl Ran {
    pub fn ok(&self) -> bool {
        self.outcome == Outcome::Exited(0)
    }

    /// `exited 3 after 0.2 s`, `was killed at its bound of 5 s`, …
    pub fn describe(&self, bound: Duration) -> String {
        match &self.outcome {
            Outcome::Exited(c) => format!("exited {c} after {:.1} s", self.took.as_secs_f64()),
            Outcome::Signalled(s) => format!("was killed by signal {s}"),
            Outcome::TimedOut => format!(
                "hung and was killed with its process group at its bound of {:.1} s",
                bound.as_secs_f64()
            ),
            Outcome::NotRun(e) => format!("could not be run: {e}"),
        }
    }

    /// The last lines of the output, on one line (` | ` between lines), at most ~1 KiB, control
    /// characters replaced: fit for state.json, a callback and a log line.
    pub fn last_output(&self) -> String {
        let text = String::from_utf8_lossy(&self.tail);
        let lines: Vec<String> = text
            .lines()
            .map(|l| {
                l.chars()
                    .map(|c| if c.is_control() { '?' } else { c })
                    .collect::<String>()
                    .trim()
                    .to_string()
            })
            .filter(|l| !l.is_empty())
            .collect();
        let mut out = lines[lines.len().saturating_sub(10)..].join(" | ");
        if out.chars().count() > 1000 {
            let skip = out.chars().count() - 1000;
            out = format!("…{}", out.chars().skip(skip).collect::<String>());
        }
        out
    }
}

/// `p` made absolute (against our working directory), so that neither the child's working
/// directory nor its environment depends on where tope-ota was started.
pub fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The program to execute: a relative path with a `/` is inside the snapshot (absolute).
fn program(prog: &str, snapshot: &Path) -> PathBuf {
    if prog.contains('/') && !prog.starts_with('/') {
        snapshot.join(prog)
    } else {
        PathBuf::from(prog)
    }
}

/// The end of a stream, at most `cap` bytes.
struct Tail {
    buf: VecDeque<u8>,
    cap: usize,
}

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        let bytes = &bytes[bytes.len().saturating_sub(self.cap)..];
        let over = (self.buf.len() + bytes.len()).saturating_sub(self.cap);
        self.buf.drain(..over);
        self.buf.extend(bytes);
    }
}

/// Read what the pipe holds now, at most `budget` bytes (a command that writes without end
/// must not keep us from its bound). Returns false at end of file (or on an error).
fn drain(pipe: &mut fs::File, tail: &mut Tail, budget: usize) -> bool {
    let mut buf = [0u8; 16 * 1024];
    let mut read = 0;
    while read < budget {
        match pipe.read(&mut buf) {
            Ok(0) => return false,
            Ok(n) => {
                tail.push(&buf[..n]);
                read += n;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            // Any other error: read no further (polling a broken fd would spin).
            Err(_) => return false,
        }
    }
    true
}

/// Whether the child `pid` has exited, without reaping it (its pid, and so its process group
/// id, cannot be reused until it is reaped).
fn exited(pid: i32) -> bool {
    // SAFETY: waitid(2) writes only into the zeroed siginfo_t we own.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let rc = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        rc == 0 && info.si_pid() != 0
    }
}

/// `(pid, process group, session, zombie)` of every child of this process (from /proc).
fn children() -> Vec<(i32, i32, i32, bool)> {
    let me = std::process::id() as i32;
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // After the command name in parentheses: state ppid pgrp session …
            let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            let ppid: i32 = f.get(1)?.parse().ok()?;
            (ppid == me).then_some((
                pid,
                f.get(2)?.parse().ok()?,
                f.get(3)?.parse().ok()?,
                *f.first()? == "Z",
            ))
        })
        .collect()
}

/// While a command runs, this process is a child subreaper (PR_SET_CHILD_SUBREAPER): what the
/// command leaves behind when its parent dies, a daemon that left its process group included,
/// is re-parented to us instead of to init, so it can be found and killed.
struct Subreaper {
    was: bool,
}

impl Subreaper {
    fn on() -> Subreaper {
        let mut was: libc::c_int = 0;
        // SAFETY: prctl(2) with an int we own for the GET, a plain flag for the SET.
        unsafe {
            libc::prctl(libc::PR_GET_CHILD_SUBREAPER, &mut was as *mut libc::c_int);
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong);
        }
        Subreaper { was: was != 0 }
    }

    /// Kill and reap what the command `pgid` left: children re-parented to us that are in its
    /// process group, or in a session other than ours (a daemon's `setsid`). Our own other
    /// children (same session, another group) are left alone. Returns how many were killed.
    fn reap(&self, pgid: i32) -> usize {
        // SAFETY: getsid(0) only reads our own session id.
        let our_session = unsafe { libc::getsid(0) };
        let mut killed = std::collections::HashSet::new();
        let until = Instant::now() + Duration::from_secs(2);
        loop {
            let left: Vec<_> = children()
                .into_iter()
                .filter(|&(_, g, sid, _)| g == pgid || sid != our_session)
                .collect();
            if left.is_empty() || Instant::now() >= until {
                return killed.len();
            }
            for (pid, _, _, zombie) in left {
                // SAFETY: kill(2) and waitpid(2) on a child of ours (re-parented to us, so its
                // pid cannot be reused before we reap it).
                unsafe {
                    if !zombie {
                        libc::kill(pid, libc::SIGKILL);
                        killed.insert(pid);
                    }
                    libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Subreaper {
    fn drop(&mut self) {
        if !self.was {
            // SAFETY: prctl(2) with a plain flag.
            unsafe {
                libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 0 as libc::c_ulong);
            }
        }
    }
}

/// SIGKILL the process group a child of ours leads (it must not be reaped yet), with all it
/// started.
pub fn kill_group(pid: i32) {
    // SAFETY: kill(2) on the process group the child leads (it is not reaped yet).
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
}

/// Run `argv` from `snapshot` with `env` added, for at most `bound`.
pub fn run(argv: &[String], snapshot: &Path, env: &[(&str, String)], bound: Duration) -> Ran {
    run_in(argv, snapshot, snapshot, env, bound)
}

/// Run `argv`, its program resolved in `snapshot`, with the working directory `cwd` and `env`
/// added, for at most `bound`.
pub fn run_in(
    argv: &[String],
    snapshot: &Path,
    cwd: &Path,
    env: &[(&str, String)],
    bound: Duration,
) -> Ran {
    let start = Instant::now();
    let not_run = |e: String| Ran {
        outcome: Outcome::NotRun(e),
        tail: Vec::new(),
        took: start.elapsed(),
    };
    let Some((prog, args)) = argv.split_first() else {
        return not_run("empty command".into());
    };
    let snapshot = &absolute(snapshot);
    let cwd = &absolute(cwd);
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills the two fds we own from here on.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return not_run(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: both fds were just created and are owned by nothing else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on our own fd.
    unsafe {
        let fl = libc::fcntl(read_end.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(read_end.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    let write_err = match write_end.try_clone() {
        Ok(w) => w,
        Err(e) => return not_run(format!("pipe: {e}")),
    };
    let mut cmd = Command::new(program(prog, snapshot));
    cmd.args(args)
        .current_dir(cwd)
        .env_remove(crate::lock::LOCK_FD_ENV)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::from(write_err))
        .process_group(0);
    let subreaper = Subreaper::on();
    let spawned = cmd.spawn();
    // The Command holds our copies of the write end: without them the pipe ends with the group.
    drop(cmd);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return not_run(format!("{}: {e}", program(prog, snapshot).display())),
    };
    let pid = child.id() as i32;
    let mut pipe = fs::File::from(read_end);
    let mut tail = Tail {
        buf: VecDeque::new(),
        cap: TAIL_BYTES,
    };
    let until = start + bound;
    let mut open = true;
    let timed_out = loop {
        if open {
            open = drain(&mut pipe, &mut tail, 1 << 20);
        }
        if exited(pid) {
            break false;
        }
        let now = Instant::now();
        if now >= until {
            break true;
        }
        let wait = (until - now).min(Duration::from_millis(20));
        if open {
            let mut pfd = libc::pollfd {
                fd: pipe.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll(2) on one pollfd we own.
            unsafe {
                let ms = i32::try_from(wait.as_millis().max(1)).unwrap_or(i32::MAX);
                libc::poll(&mut pfd, 1, ms);
            }
        } else {
            std::thread::sleep(wait);
        }
    };
    // Whatever the command left in its group goes with it, before its pid can be reused.
    kill_group(pid);
    let status = child.wait();
    // What left the group (a daemon) was re-parented to us when its parent died: it goes too.
    let escaped = subreaper.reap(pid);
    if escaped > 0 {
        log::warn!(
            "`{}` left {escaped} process(es) behind outside its process group; killed",
            argv.join(" ")
        );
    }
    drop(subreaper);
    if open {
        // What was written before the end; a writer outside the group cannot hold us here.
        drain(&mut pipe, &mut tail, 1 << 20);
    }
    use std::os::unix::process::ExitStatusExt;
    let outcome = match status {
        _ if timed_out => Outcome::TimedOut,
        Ok(st) => match (st.code(), st.signal()) {
            (Some(c), _) => Outcome::Exited(c),
            (None, Some(s)) => Outcome::Signalled(s),
            _ => Outcome::Exited(-1),
        },
        Err(e) => Outcome::NotRun(format!("wait: {e}")),
    };
    Ran {
        outcome,
        tail: tail.buf.into(),
        took: start.elapsed(),
    }
}

/// One health check a snapshot records: the module it belongs to and its command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub module: String,
    pub command: Vec<String>,
}

/// A snapshot's `.tope-ota/health.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthRecord {
    pub checks: Vec<Check>,
}

/// The health checks recorded in the snapshot at `dir` (none when it has no record: made
/// before health checks existed). A record that does not parse is an error: such a version
/// cannot show it works.
pub fn read_checks(dir: &Path) -> Result<Vec<Check>> {
    let path = dir.join(META_DIR).join(HEALTH_FILE);
    match fs::read(&path) {
        Ok(b) => serde_json::from_slice::<HealthRecord>(&b)
            .map(|r| r.checks)
            .with_context(|| format!("{} does not parse", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// Record the checks of the snapshot under construction at `dir` (a new file).
pub fn write_checks(dir: &Path, checks: &[Check]) -> Result<()> {
    let meta = crate::snapshot::meta_dir(dir)?;
    let bytes = serde_json::to_vec_pretty(&HealthRecord {
        checks: checks.to_vec(),
    })?;
    crate::fsutil::write_atomic(&meta.join(HEALTH_FILE), &bytes)
}

/// The checks of a new snapshot: those of the snapshot it was built from, with every module
/// the package brings replaced by the package's own (with its check, or without one).
pub fn merge_checks(old: Vec<Check>, manifest: &crate::manifest::Manifest) -> Vec<Check> {
    let mut list: Vec<Check> = old
        .into_iter()
        .filter(|c| !manifest.modules.iter().any(|m| m.name == c.module))
        .collect();
    for m in &manifest.modules {
        if let Some(h) = &m.health {
            list.push(Check {
                module: m.name.clone(),
                command: h.argv(),
            });
        }
    }
    list
}

/// The bounds of the health phase.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// The device-wide check (`--health-cmd`), split on whitespace.
    pub device: Option<String>,
    /// No new round starts after this long from the first run.
    pub deadline: Duration,
    /// Each run of a check is killed after this long.
    pub timeout: Duration,
    /// Pause between rounds.
    pub interval: Duration,
}

impl HealthConfig {
    pub fn from_global(g: &crate::cli::Global) -> HealthConfig {
        HealthConfig {
            device: g
                .health_cmd
                .as_deref()
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_string),
            deadline: g
                .health_deadline
                .or("TOPE_OTA_HEALTH_DEADLINE", Duration::from_secs(60)),
            timeout: g.health_timeout.or_at_least(
                "TOPE_OTA_HEALTH_TIMEOUT",
                Duration::from_secs(10),
                crate::cli::MIN_TIMEOUT,
            ),
            interval: g
                .health_interval
                .or("TOPE_OTA_HEALTH_INTERVAL", Duration::from_secs(2)),
        }
    }
}

/// The checks to run for the snapshot `dir`: its own (recorded), then the device-wide one.
pub fn checks_for(dir: &Path, cfg: &HealthConfig) -> Result<Vec<Check>, OtaError> {
    let mut checks = read_checks(dir)
        .map_err(|e| OtaError::new(ErrorCode::HealthCheckFailed, format!("{e:#}")))?;
    if let Some(cmd) = &cfg.device {
        checks.push(Check {
            module: "device (--health-cmd)".into(),
            command: HookCommand::Line(cmd.clone()).argv(),
        });
    }
    Ok(checks)
}

/// Run `checks` from the snapshot `dir` in rounds until one round passes (each check in order,
/// a round ending at the first failure) or the deadline passes: then `HEALTH_CHECK_FAILED`
/// naming the check and ending with its last output. A round starts only before the deadline
/// (the first always: a deadline of 0 means one try), and each run has its full timeout, so the
/// phase takes at most the deadline plus one timeout per check.
pub fn run_checks(
    dir: &Path,
    version: &str,
    checks: &[Check],
    cfg: &HealthConfig,
) -> Result<(), OtaError> {
    if checks.is_empty() {
        return Ok(());
    }
    let start = Instant::now();
    let until = start + cfg.deadline;
    let env = [
        (
            "TOPE_OTA_SNAPSHOT",
            absolute(dir).to_string_lossy().into_owned(),
        ),
        ("TOPE_OTA_VERSION", version.to_string()),
    ];
    let mut round = 0u32;
    loop {
        round += 1;
        let mut failure = None;
        for c in checks {
            // The deadline decides whether a round starts, never how long a run may take: a
            // run cut short would report a hang instead of its real answer.
            let bound = cfg.timeout;
            let ran = run(&c.command, dir, &env, bound);
            if !ran.ok() {
                log::info!(
                    "health check of {} ({}) {} in round {round}: {}",
                    c.module,
                    c.command.join(" "),
                    ran.describe(bound),
                    ran.last_output()
                );
                failure = Some((c, ran, bound));
                break;
            }
        }
        let Some((c, ran, bound)) = failure else {
            log::info!(
                "{} health check(s) passed in round {round} after {:.1} s",
                checks.len(),
                start.elapsed().as_secs_f64()
            );
            return Ok(());
        };
        if Instant::now() + cfg.interval >= until {
            let out = ran.last_output();
            return Err(OtaError::new(
                ErrorCode::HealthCheckFailed,
                format!(
                    "health check of {} (`{}`) {} in round {round}, not healthy within {:.1} s{}",
                    c.module,
                    c.command.join(" "),
                    ran.describe(bound),
                    cfg.deadline.as_secs_f64(),
                    if out.is_empty() {
                        ", no output".to_string()
                    } else {
                        format!("; last output: {out}")
                    }
                ),
            ));
        }
        std::thread::sleep(cfg.interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    #[test]
    fn exit_code_and_output_tail() {
        let d = tempfile::tempdir().unwrap();
        let r = run(
            &sh("echo one; echo two >&2; exit 3"),
            d.path(),
            &[],
            Duration::from_secs(5),
        );
        assert_eq!(r.outcome, Outcome::Exited(3));
        assert_eq!(r.last_output(), "one | two");
    }

    #[test]
    fn a_hang_is_killed_with_its_group_at_the_bound() {
        let d = tempfile::tempdir().unwrap();
        let pidfile = d.path().join("pid");
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let t = Instant::now();
        let r = run(&sh(&script), d.path(), &[], Duration::from_millis(300));
        assert_eq!(r.outcome, Outcome::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(5));
        let pid: i32 = fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Gone, or a zombie waiting for whoever reaps orphans here.
        let gone = || {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|st| st.rsplit(')').next().unwrap_or("").trim().starts_with('Z'))
                .unwrap_or(true)
        };
        let until = Instant::now() + Duration::from_secs(2);
        while !gone() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(gone(), "the grandchild survived");
    }

    /// Gone, or a zombie waiting for whoever reaps orphans here.
    fn gone(pid: i32) -> bool {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|st| st.rsplit(')').next().unwrap_or("").trim().starts_with('Z'))
            .unwrap_or(true)
    }

    #[test]
    fn a_daemon_that_left_the_group_is_killed_and_delays_nothing() {
        let d = tempfile::tempdir().unwrap();
        let (p1, p2) = (d.path().join("pid1"), d.path().join("pid2"));
        // setsid: out of our process group and session, holding stdout open for 30 s; and a
        // double fork whose middle process waits in the group (killed with it).
        let script = format!(
            "setsid sh -c 'echo $$ > {a}; exec sleep 30' & (setsid sh -c 'echo $$ > {b}; exec sleep 30' & sleep 30) & while [ ! -s {a} ] || [ ! -s {b} ]; do sleep 0.02; done; echo started; exit 0",
            a = p1.display(),
            b = p2.display()
        );
        let t = Instant::now();
        let r = run(&sh(&script), d.path(), &[], Duration::from_secs(10));
        let took = t.elapsed();
        let pids: Vec<i32> = [&p1, &p2]
            .iter()
            .map(|p| fs::read_to_string(p).unwrap().trim().parse().unwrap())
            .collect();
        let survivors: Vec<i32> = pids.iter().copied().filter(|&p| !gone(p)).collect();
        for &pid in &survivors {
            // SAFETY: ending a daemon this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        assert!(r.ok(), "{r:?}");
        assert!(took < Duration::from_secs(4), "{took:?}");
        assert_eq!(r.last_output(), "started");
        assert!(
            survivors.is_empty(),
            "daemons survived: {survivors:?} of {pids:?}"
        );
    }

    #[test]
    fn megabytes_of_output_keep_only_the_tail() {
        let d = tempfile::tempdir().unwrap();
        let r = run(
            &sh("head -c 8000000 /dev/zero | tr '\\0' 'x'; echo; echo LAST; exit 1"),
            d.path(),
            &[],
            Duration::from_secs(20),
        );
        assert_eq!(r.outcome, Outcome::Exited(1));
        assert!(r.tail.len() <= TAIL_BYTES);
        let out = r.last_output();
        assert!(out.ends_with("LAST") && out.len() < 1100, "{}", out.len());
    }

    #[test]
    fn relative_programs_are_inside_the_snapshot() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("bin")).unwrap();
        let p = d.path().join("bin/check");
        fs::write(&p, "#!/bin/sh\npwd\necho \"$TOPE_OTA_VERSION\"\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        let r = run(
            &["bin/check".to_string()],
            d.path(),
            &[("TOPE_OTA_VERSION", "9.9".into())],
            Duration::from_secs(5),
        );
        assert!(r.ok(), "{r:?}");
        let cwd = fs::canonicalize(d.path()).unwrap();
        assert_eq!(r.last_output(), format!("{} | 9.9", cwd.display()));
        let r = run(
            &["bin/nope".to_string()],
            d.path(),
            &[],
            Duration::from_secs(5),
        );
        assert!(matches!(r.outcome, Outcome::NotRun(_)), "{r:?}");
    }
}
