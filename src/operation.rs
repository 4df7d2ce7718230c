//! A writer's run: the state lock, the state and the reporter, so that every state change is
//! saved durably, logged and reported in one place. Below `cmd/` and `transition.rs`, which both
//! act through it.

use crate::cli::Global;
use crate::error::OtaError;
use crate::lock::{Purpose, StateLock};
use crate::logging;
use crate::report::Reporter;
use crate::state::{self, Stage, State};
use anyhow::Result;

/// A writer's run: holds the lock from `begin` to drop; the only path that saves state.
pub struct Operation {
    /// Always `Some` until the operation ends.
    lock: Option<StateLock>,
    pub state: State,
    reporter: Reporter,
    /// The (stage, error, version) this operation last committed.
    last_key: Option<(Stage, Option<crate::error::ErrorCode>, Option<String>)>,
    /// state.json did not parse and was moved aside when the operation began.
    pub recovered: bool,
}

impl Operation {
    /// Take the lock for `purpose` (waiting for a brief holder, `BUSY` at once for an
    /// operation in flight; see [`crate::lock`]) and load the state, recovering a corrupt one.
    pub fn begin(g: &Global, purpose: &Purpose) -> Result<Operation> {
        let lock = StateLock::acquire(&g.state_dir, purpose, lock_wait(g))?;
        let (state, recovered) = state::load_for_write(&lock)?;
        Ok(Operation {
            lock: Some(lock),
            reporter: Reporter::new(&g.report_url, &g.state_dir, &state),
            state,
            last_key: None,
            recovered,
        })
    }

    /// Save the state durably, then report it (callbacks never delay the save).
    pub fn commit(&mut self) -> Result<()> {
        logging::set_context(
            self.state.version.as_deref().unwrap_or(""),
            self.state.stage.as_str(),
        );
        let key = (
            self.state.stage,
            self.state.error,
            self.state.version.clone(),
        );
        if self.last_key.as_ref() != Some(&key) {
            self.state.stage_seq = self.state.stage_seq.wrapping_add(1);
            self.last_key = Some(key);
        }
        // A stage at rest ends the operation's long part: from the moment its callback can
        // reach device-api (which may then ask for the next operation at once), a writer waits
        // for what is left of this one instead of getting BUSY.
        if matches!(
            self.state.stage,
            Stage::Idle | Stage::ToInstall | Stage::Success | Stage::Failed
        ) {
            self.hold(&Purpose::brief("", "finishing"));
        }
        self.state
            .save(self.lock.as_ref().expect("held until the operation ends"))?;
        self.reporter.observe(&self.state);
        Ok(())
    }

    /// `BUSY` while state.json shows an install in flight (running, or interrupted and waiting
    /// for heal): nothing may switch software under it.
    pub fn refuse_in_flight(&self) -> Result<()> {
        if matches!(self.state.stage, Stage::Installing | Stage::Rebooting) {
            return crate::error::fail(
                crate::error::ErrorCode::Busy,
                format!(
                    "an install is in flight (stage {}); run `tope-ota heal` first",
                    self.state.stage
                ),
            );
        }
        Ok(())
    }

    /// Save, but never let a failing save (a full or broken disk) stop what must go on once
    /// services are down.
    pub fn commit_best_effort(&mut self) {
        if let Err(e) = self.commit() {
            log::error!("recording the state failed (the operation goes on): {e:#}");
        }
    }

    /// [`Operation::fail`], logging a failing save instead of returning it.
    pub fn fail_best_effort(&mut self, err: &OtaError) {
        if let Err(e) = self.fail(err) {
            log::error!("recording the failure failed: {e:#}");
        }
    }

    /// Record a failure: stage `failed`, the code in `error`, the detail in `message`.
    pub fn fail(&mut self, err: &OtaError) -> Result<()> {
        self.state.stage = Stage::Failed;
        self.state.error = Some(err.code);
        self.state.message = err.detail.clone();
        let saved = self.commit();
        log::error!(target: logging::OUTCOME_TARGET, "{}", err.message());
        saved
    }

    /// The locked file's descriptor, for a child that acts under this operation's lock (a
    /// package's updater on trial; see [`crate::lock::LOCK_FD_ENV`]).
    pub fn lock_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.lock
            .as_ref()
            .expect("held until the operation ends")
            .file()
            .as_raw_fd()
    }

    /// Take the state a child of ours saved under our lock as the operation's own, and report
    /// it.
    pub fn adopt_saved(&mut self, state: State) {
        self.last_key = Some((state.stage, state.error, state.version.clone()));
        self.state = state;
        self.reporter.observe(&self.state);
    }

    /// Say what the lock is held for from now on (see [`StateLock::announce`]).
    pub fn hold(&self, purpose: &Purpose) {
        if let Some(l) = &self.lock {
            l.announce(purpose);
        }
    }

    /// End the operation: release the lock, then wait (bounded) for queued callbacks. The
    /// callback lock, taken by the sender before the state lock goes, keeps the callbacks of
    /// consecutive operations in order at device-api; the next writer need not wait for a slow
    /// device-api.
    pub fn finish(self) {
        drop(self);
    }
}

impl Drop for Operation {
    fn drop(&mut self) {
        // The work is done: a writer that comes now waits for the hand-over, not BUSY.
        self.hold(&Purpose::brief("", "finishing"));
        self.reporter.hand_over(crate::report::FINISH_BOUND);
        drop(self.lock.take());
        self.reporter.finish();
    }
}

/// How long a writer waits for a brief holder of the lock (`--lock-wait`).
pub fn lock_wait(g: &Global) -> std::time::Duration {
    g.lock_wait.or(
        "--lock-wait (TOPE_OTA_LOCK_WAIT)",
        std::time::Duration::from_secs(5),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::Parser;

    #[test]
    fn a_stage_at_rest_turns_the_lock_record_brief() {
        let dir = tempfile::tempdir().unwrap();
        let cli = Cli::parse_from([
            "tope-ota",
            "--state-dir",
            dir.path().to_str().unwrap(),
            "--report-url",
            "",
            "heal",
        ]);
        let mut op =
            Operation::begin(&cli.global, &Purpose::long("heal", "a download of 1.2.0")).unwrap();
        let record = || crate::lock::holder(dir.path()).expect("a record");
        op.state.stage = Stage::Downloading;
        op.commit().unwrap();
        assert!(record().long);
        // The download verified: device-api may ask for the install from now on.
        op.state.stage = Stage::ToInstall;
        op.commit().unwrap();
        let h = record();
        assert!(!h.long, "{h:?}");
        assert_eq!(
            (h.command.as_str(), h.activity.as_str()),
            ("heal", "finishing")
        );
        op.finish();
        assert!(crate::lock::holder(dir.path()).is_none());
    }
}
