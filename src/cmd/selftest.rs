//! `tope-ota self-test` (hidden): what an install runs on a package's updater, from its kept
//! copy, under the install's lock (see [`crate::trial`]). Without `--commit` it reads
//! state.json as every command does, takes and releases the lock, and reports its version and
//! the schema it reads; with `--commit V` it commits the success of the install of `V` in
//! flight, as the install itself would have.

use crate::cli::{Global, SelfTestArgs};
use crate::error::{fail, ErrorCode};
use crate::lock::{Purpose, StateLock};
use crate::operation::Operation;
use crate::output::Output;
use crate::state::{self, ReadOutcome, Stage};
use crate::trial::Report;
use anyhow::Result;
use std::time::Duration;

pub fn run(g: &Global, args: &SelfTestArgs) -> Result<Output> {
    crate::failpoint::updater_fault("self-test", crate::proven::DIR);
    // Read without moving anything aside: an updater that cannot parse what the device holds
    // must fail its test, not reset an install in flight.
    let stage = match state::read(&g.state_dir)? {
        ReadOutcome::Missing => Stage::Idle,
        ReadOutcome::Ok(s) => s.stage,
        ReadOutcome::Corrupt(why) => {
            return fail(
                ErrorCode::Internal,
                format!("state.json does not parse for this updater: {why}"),
            )
        }
    };
    let version = crate::version::version().to_string();
    let Some(v) = &args.commit else {
        let lock = StateLock::acquire(
            &g.state_dir,
            &Purpose::brief("self-test", "testing itself"),
            Duration::ZERO,
        )?;
        drop(lock);
        let report = Report {
            version: version.clone(),
            schema: state::SCHEMA,
            stage: stage.as_str().to_string(),
            ready_notify: true,
        };
        return Ok(Output::success(
            format!(
                "self-test passed: tope-ota {version} reads state.json (stage {stage}, schema {} at most) and takes the lock\n",
                state::SCHEMA
            ),
            report,
        ));
    };
    // Only under the lock of the install that runs us: never by hand, over an install that
    // was interrupted and waits for heal.
    if !crate::lock::inherits(&g.state_dir) {
        return fail(
            ErrorCode::InvalidRequest,
            "self-test --commit runs only under the lock of the install that tries this updater",
        );
    }
    let mut op = Operation::begin(g, &Purpose::long("self-test", format!("committing {v}")))?;
    let target = op.state.target_dir().unwrap_or_default();
    let current = crate::snapshot::link_dir(&g.versions_dir, crate::snapshot::CURRENT);
    if op.state.stage != Stage::Installing
        || op.state.version.as_deref() != Some(v.as_str())
        || op.state.package_name.is_none()
        || !matches!(op.state.step.as_deref(), Some("verify" | "health"))
        || current.as_deref() != Some(target.as_str())
    {
        return fail(
            ErrorCode::InvalidRequest,
            format!(
                "no install of {v} is at its commit (stage {}, step {}, version {}, current {})",
                op.state.stage,
                op.state.step.as_deref().unwrap_or("-"),
                op.state.version.as_deref().unwrap_or("-"),
                current.as_deref().unwrap_or("-")
            ),
        );
    }
    // Only the snapshot's own updater commits its install.
    let own = crate::integrity::sha256_file(std::path::Path::new("/proc/self/exe"))?;
    let theirs = crate::updater::read_record(&g.versions_dir.join(&target)).map(|c| c.sha256);
    if theirs.as_deref() != Some(own.as_str()) {
        return fail(
            ErrorCode::InvalidRequest,
            format!("this binary is not the updater of {target}"),
        );
    }
    crate::failpoint::updater_fault("commit", crate::proven::DIR);
    op.state.mark_success(true, v);
    op.commit()?;
    crate::failpoint::updater_fault("after-commit", crate::proven::DIR);
    let out = Output::success(format!("{}\n", op.state.message), op.state.progress_data());
    op.finish();
    Ok(out)
}
