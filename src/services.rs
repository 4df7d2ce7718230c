//! Service control through an external command (`systemctl` by default), every call bounded:
//! a hung call is killed with its whole process group at its bound.

use crate::error::{ErrorCode, OtaError};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A service of a version: its unit name and its start order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<i64>,
}

/// Sort services into start order (by order, unordered last, then by name) without duplicates.
pub fn start_order(mut v: Vec<Service>) -> Vec<Service> {
    v.sort_by(|a, b| {
        (a.order.unwrap_or(i64::MAX), &a.name).cmp(&(b.order.unwrap_or(i64::MAX), &b.name))
    });
    let mut seen = std::collections::HashSet::new();
    v.retain(|s| seen.insert(s.name.clone()));
    v
}

fn env_ms(name: &str, default: u64) -> Duration {
    Duration::from_millis(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

/// The service manager command and its bounds.
#[derive(Debug, Clone)]
pub struct Manager {
    argv: Vec<String>,
    pub stop_timeout: Duration,
    pub start_timeout: Duration,
    /// How long services must stay up after starting before the check.
    pub settle: Duration,
}

enum CallError {
    Spawn(std::io::Error),
    TimedOut,
}

impl Manager {
    /// `cmd` is split on whitespace (`"systemctl --user"` works). Bounds from SPEC section 4,
    /// overridable for tests by `TOPE_OTA_STOP_TIMEOUT_MS`, `TOPE_OTA_START_TIMEOUT_MS` and
    /// `TOPE_OTA_SETTLE_MS`.
    pub fn new(cmd: &str) -> Manager {
        Manager {
            argv: cmd.split_whitespace().map(str::to_string).collect(),
            stop_timeout: env_ms("TOPE_OTA_STOP_TIMEOUT_MS", 10_000),
            start_timeout: env_ms("TOPE_OTA_START_TIMEOUT_MS", 30_000),
            settle: env_ms("TOPE_OTA_SETTLE_MS", 2_000),
        }
    }

    /// Run `CMD action name` for at most `bound`; Ok(exit success, stderr).
    fn call(&self, action: &str, name: &str, bound: Duration) -> Result<(bool, String), CallError> {
        let Some((prog, pre)) = self.argv.split_first() else {
            return Err(CallError::Spawn(std::io::Error::other(
                "empty --systemctl command",
            )));
        };
        let mut cmd = Command::new(prog);
        cmd.args(pre)
            .arg(action)
            .arg(name)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        // If we are killed, the call dies with us: a stop left running would otherwise land
        // after the heal that follows has started the service again.
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(CallError::Spawn)?;
        let mut stderr = child.stderr.take();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(e) = stderr.as_mut() {
                let _ = e.take(4096).read_to_string(&mut s);
            }
            let _ = tx.send(s);
        });
        let until = Instant::now() + bound;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    let err = rx
                        .recv_timeout(Duration::from_millis(200))
                        .unwrap_or_default();
                    return Ok((status.success(), err.trim().to_string()));
                }
                Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(5)),
                _ => {
                    // SAFETY: kill(2) on the child's own process group.
                    unsafe {
                        libc::kill(-(child.id() as i32), libc::SIGKILL);
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(CallError::TimedOut);
                }
            }
        }
    }

    /// Run `CMD action name` bounded by `bound`; any failure (non-zero exit, hang, cannot run)
    /// becomes `code` with a detail that names the call.
    fn checked(
        &self,
        action: &str,
        name: &str,
        bound: Duration,
        code: ErrorCode,
    ) -> Result<bool, OtaError> {
        let what = format!("`{} {action} {name}`", self.argv.join(" "));
        match self.call(action, name, bound) {
            Ok((ok, _)) if action == "is-active" => Ok(ok),
            Ok((true, _)) => Ok(true),
            Ok((false, err)) => Err(OtaError::new(code, format!("{what} failed: {err}"))),
            Err(CallError::TimedOut) => Err(OtaError::new(
                code,
                format!("{what} hung and was killed after {bound:?}"),
            )),
            Err(CallError::Spawn(e)) => Err(OtaError::new(code, format!("{what}: {e}"))),
        }
    }

    /// True when `is-active` says the unit runs; `code` if the call itself fails.
    fn is_active(&self, name: &str, code: ErrorCode) -> Result<bool, OtaError> {
        self.checked("is-active", name, self.stop_timeout, code)
    }

    /// Whether `is-active` says the unit runs (a failing call counts as not running).
    pub fn is_running(&self, name: &str) -> bool {
        self.is_active(name, ErrorCode::ServiceStartFailed)
            .unwrap_or(false)
    }

    /// Stop one service and confirm it is no longer active.
    pub fn stop(&self, name: &str) -> Result<(), OtaError> {
        let code = ErrorCode::ServiceStopFailed;
        self.checked("stop", name, self.stop_timeout, code)?;
        match self.is_active(name, code)? {
            false => Ok(()),
            true => Err(OtaError::new(
                code,
                format!("{name} is still active after stop"),
            )),
        }
    }

    /// Start one service and confirm it is active.
    pub fn start(&self, name: &str) -> Result<(), OtaError> {
        let code = ErrorCode::ServiceStartFailed;
        self.checked("start", name, self.start_timeout, code)?;
        match self.is_active(name, code)? {
            true => Ok(()),
            false => Err(OtaError::new(
                code,
                format!("{name} is not active after start"),
            )),
        }
    }

    /// Stop `services` in reverse start order. On failure returns the error and the services
    /// already stopped (to start again).
    pub fn stop_all(&self, services: &[Service]) -> Result<(), (OtaError, Vec<Service>)> {
        let mut stopped = Vec::new();
        for s in services.iter().rev() {
            log::info!("stopping {}", s.name);
            if let Err(e) = self.stop(&s.name) {
                stopped.reverse();
                return Err((e, stopped));
            }
            stopped.push(s.clone());
        }
        Ok(())
    }

    /// Start `services` in order, each confirmed active.
    pub fn start_all(&self, services: &[Service]) -> Result<(), OtaError> {
        for s in services {
            log::info!("starting {}", s.name);
            self.start(&s.name)?;
        }
        Ok(())
    }

    /// After the settle time, every service must still be active.
    pub fn check_all(&self, services: &[Service]) -> Result<(), OtaError> {
        if services.is_empty() {
            return Ok(());
        }
        std::thread::sleep(self.settle);
        self.check_now(services)
    }

    /// Every service must be active now.
    pub fn check_now(&self, services: &[Service]) -> Result<(), OtaError> {
        for s in services {
            if !self.is_active(&s.name, ErrorCode::ServiceStartFailed)? {
                return Err(OtaError::new(
                    ErrorCode::ServiceStartFailed,
                    format!(
                        "{} stopped running within {:?} of its start",
                        s.name, self.settle
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Stop without caring for errors (before a rollback switch: the service may be half up).
    pub fn stop_best_effort(&self, services: &[Service]) {
        for s in services.iter().rev() {
            if let Err(e) = self.stop(&s.name) {
                log::warn!("while rolling back: {}", e.message());
            }
        }
    }
}
