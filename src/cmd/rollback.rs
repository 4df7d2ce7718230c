//! `rollback`: switch to the previous, the factory or a named version by hand, and the
//! automatic rollback that install (and a failed manual rollback) fall back on.

use super::{Operation, Output};
use crate::cli::{Global, RollbackArgs};
use crate::error::{fail, ErrorCode, OtaError};
use crate::services::{self, Manager, Service};
use crate::snapshot::{self, Links};
use crate::state::{Stage, State};
use crate::{failpoint, inhibit, validate};
use anyhow::Result;
use std::path::Path;

/// Stop what may run (`services` of the failed version and the target's own), point `current`
/// at `target` (and `previous` at `previous`), then start and check the target's services: a
/// service only the failed version has is not started on a version that lacks its unit.
fn try_level(
    root: &Path,
    mgr: &Manager,
    services: &[Service],
    target: &str,
    previous: Option<&str>,
) -> Result<(), OtaError> {
    let own = snapshot::read_services(&snapshot::version_dir(root, target));
    // A snapshot made outside tope-ota records no services: fall back to the failed ones.
    let start = if own.is_empty() {
        services.to_vec()
    } else {
        own.clone()
    };
    let mut stop = services.to_vec();
    stop.extend(own);
    mgr.stop_best_effort(&services::start_order(stop));
    snapshot::switch(root, previous, target)
        .map_err(|e| OtaError::new(ErrorCode::DeploymentFailed, format!("{e:#}")))?;
    mgr.start_all(&start)?;
    mgr.check_all(&start)
}

/// Save the state, but never let a failing save (a full or broken disk) stop a rollback.
fn save_best_effort(op: &mut Operation) {
    if let Err(e) = op.commit() {
        log::error!("recording the rollback failed (it goes on): {e:#}");
    }
}

/// Where an automatic rollback starts: heal resumes one at the level it had reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Previous,
    Factory,
}

/// After `original` failed an install or rollback: level 1 back to the version that was
/// current before (`state.previous_version`), level 2 to `factory`, each with the services
/// restarted and checked. Records the outcome in the state (stage `failed`, the original code,
/// or `ROLLBACK_FAILED`) and returns the error to report. Each level is recorded as the step
/// before it acts, so heal can run it again after a crash.
pub fn auto_rollback(
    root: &Path,
    op: &mut Operation,
    mgr: &Manager,
    original: OtaError,
    from: Level,
) -> Result<OtaError> {
    log::error!("{}; rolling back", original.message());
    op.state.error = Some(original.code);
    op.state.rollback_cause = Some(original.detail.clone());
    let services = op.state.services.clone();
    let before = op.state.previous_version.clone();
    let mut why = Vec::new();
    let mut held = None;
    if from == Level::Previous {
        match before.as_deref() {
            Some(v) if snapshot::version_dir(root, v).is_dir() => {
                op.state.step = Some("rollback-previous".into());
                op.state.message = format!("{}; rolling back to {v}", original.detail);
                save_best_effort(op);
                failpoint::hit("rollback-previous");
                let restore = op.state.previous_before.clone();
                match try_level(root, mgr, &services, v, restore.as_deref()) {
                    Ok(()) => held = Some(format!("previous {v}")),
                    Err(e) => why.push(format!("to previous {v}: {}", e.message())),
                }
            }
            _ => why.push("no previous version".to_string()),
        }
    }
    if held.is_none() {
        match Links::read(root).factory {
            Some(f) => {
                op.state.step = Some("rollback-factory".into());
                op.state.message = format!("{}; rolling back to factory {f}", original.detail);
                save_best_effort(op);
                failpoint::hit("rollback-factory");
                match try_level(root, mgr, &services, &f, before.as_deref()) {
                    Ok(()) => held = Some(format!("factory {f}")),
                    Err(e) => why.push(format!("to factory {f}: {}", e.message())),
                }
            }
            None => why.push("no factory version".to_string()),
        }
    }
    let fin = match &held {
        Some(level) => OtaError::new(
            original.code,
            format!("{}; rolled back to {level}", original.detail),
        ),
        None => OtaError::new(
            ErrorCode::RollbackFailed,
            format!("{}; rollback failed {}", original.message(), why.join("; ")),
        ),
    };
    op.state.rollback = Some(held.clone().unwrap_or_else(|| "failed".into()));
    op.state.step = None;
    if held.is_some() {
        if let Ok(removed) = snapshot::prune(root) {
            if !removed.is_empty() {
                log::info!("removed the failed snapshot(s) {}", removed.join(", "));
            }
        }
    }
    op.fail(&fin)?;
    Ok(fin)
}

pub fn run(g: &Global, args: &RollbackArgs) -> Result<Output> {
    let mut op = Operation::begin(g)?;
    let result = rollback(g, args, &mut op);
    op.finish();
    result
}

fn rollback(g: &Global, args: &RollbackArgs, op: &mut Operation) -> Result<Output> {
    if matches!(op.state.stage, Stage::Installing | Stage::Rebooting) {
        return fail(
            ErrorCode::Busy,
            format!(
                "an install is in flight (stage {}); run `tope-ota heal` first",
                op.state.stage
            ),
        );
    }
    let root = &g.versions_dir;
    let links = Links::read(root);
    let target = match args.to.as_str() {
        "previous" => links.previous.clone(),
        "factory" => links.factory.clone(),
        v => {
            validate::version(v)?;
            snapshot::version_dir(root, v)
                .is_dir()
                .then(|| v.to_string())
        }
    };
    let Some(target) = target else {
        return fail(
            ErrorCode::InvalidRequest,
            format!(
                "there is no {} version to roll back to in {}",
                args.to,
                root.display()
            ),
        );
    };
    if links.current.as_deref() == Some(target.as_str()) {
        return Ok(Output::success(
            format!("version {target} is already current; nothing to do\n"),
            op.state.progress_data(),
        ));
    }
    inhibit::check(g, std::time::Duration::from_secs(args.wait))?;
    let cur = links.current.clone();
    let mut list = snapshot::read_services(&snapshot::version_dir(root, &target));
    if let Some(c) = &cur {
        list.extend(snapshot::read_services(&snapshot::version_dir(root, c)));
    }
    let svc = services::start_order(list);
    // The rollback replaces the operation in flight: a pending package or partial goes with it.
    if let Ok(rd) = std::fs::read_dir(g.state_dir.join(crate::state::DOWNLOADS_DIR)) {
        for e in rd.flatten() {
            crate::fsutil::remove_file_durable(&e.path())?;
        }
    }
    op.state = State {
        stage: Stage::Installing,
        version: Some(target.clone()),
        previous_version: cur.clone(),
        previous_before: links.previous.clone(),
        services: svc.clone(),
        step: Some("stop".into()),
        message: format!("Rolling back to {target}"),
        ..State::default()
    };
    op.commit()?;
    let mgr = Manager::new(&g.systemctl);
    if let Err((e, _)) = mgr.stop_all(&svc) {
        let fin = auto_rollback(root, op, &mgr, e, Level::Previous)?;
        return Err(fin.into());
    }
    op.state.step = Some("switch".into());
    op.state.progress = 40;
    op.commit()?;
    failpoint::hit("before-switch");
    snapshot::switch(root, cur.as_deref(), &target)?;
    failpoint::hit("after-switch");
    super::install::finish_forward(g, op, &mgr)
}
