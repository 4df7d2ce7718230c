//! `rollback`: switch to the previous, the factory or a named version by hand. The switch, the
//! service restart and the fall-back when the target does not come up are
//! [`crate::transition`]'s.

use crate::cli::{Global, RollbackArgs};
use crate::error::{fail, ErrorCode, OtaError};
use crate::lock::Purpose;
use crate::operation::Operation;
use crate::output::Output;
use crate::services::{self, Manager};
use crate::snapshot::{self, Links};
use crate::state::{Stage, State};
use crate::transition::{self, set_step};
use crate::{failpoint, inhibit, integrity, validate};
use anyhow::Result;

pub fn run(g: &Global, args: &RollbackArgs) -> Result<Output> {
    let purpose = Purpose::long("rollback", format!("a rollback to {}", args.to));
    let mut op = Operation::begin(g, &purpose)?;
    let result = rollback(g, args, &mut op);
    op.finish();
    result
}

/// The snapshot dir `--to` names: `previous`, `factory` (its dir; a copy is built later), a
/// snapshot dir name, or a version: its newest snapshot (the highest `~n`, the plain
/// `v<version>` oldest; a reinstall builds `~n` ones), else the factory's when it is that version.
fn resolve(root: &std::path::Path, links: &Links, to: &str) -> Result<Option<String>> {
    Ok(match to {
        "previous" => links.previous.clone(),
        "factory" => links.factory.clone(),
        d if snapshot::version_of(d).is_some() && root.join(d).is_dir() => Some(d.to_string()),
        v => {
            validate::version(v)?;
            let mut same: Vec<String> = std::fs::read_dir(root)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| {
                            snapshot::version_of(n) == Some(v) && !snapshot::is_factory_dir(n)
                        })
                        .collect()
                })
                .unwrap_or_default();
            // The newest: the highest `~n` (numerically), the plain name lowest; new snapshots
            // of a version are always named above every kept one (snapshot::fresh_dir_name).
            same.sort_by_key(|n| {
                n.split_once('~')
                    .and_then(|(_, t)| t.parse::<u64>().ok())
                    .unwrap_or(0)
            });
            same.pop().or_else(|| {
                links
                    .factory
                    .clone()
                    .filter(|f| snapshot::version_of(f) == Some(v))
            })
        }
    })
}

fn rollback(g: &Global, args: &RollbackArgs, op: &mut Operation) -> Result<Output> {
    op.refuse_in_flight()?;
    let root = &g.versions_dir;
    let links = Links::read(root);
    let Some(mut target) = resolve(root, &links, &args.to)? else {
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
    // Nothing is stopped for a target that changed since it was built.
    let st = integrity::check_target(root, &target);
    if !st.usable() {
        return fail(
            ErrorCode::DeploymentFailed,
            format!(
                "{target} changed since it was built ({}); see `tope-ota verify {}`",
                st.summary(),
                snapshot::version_of(&target).unwrap_or(&target)
            ),
        );
    }
    inhibit::check(g, std::time::Duration::from_secs(args.wait))?;
    if snapshot::is_factory_dir(&target) || links.factory.as_deref() == Some(target.as_str()) {
        // current never points at the factory itself: a fresh, writable copy is built first,
        // while everything still runs.
        target = transition::copy_of_factory(root, &target)?;
    }
    let version = snapshot::version_of(&target).unwrap_or(&target).to_string();
    // The services of both versions are stopped; only the target's own are started.
    let mut list = snapshot::read_services(&root.join(&target));
    if let Some(c) = &links.current {
        list.extend(snapshot::read_services(&root.join(c)));
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
        version: Some(version.clone()),
        previous_version: links.current_version().map(str::to_string),
        previous_before: links.previous_version().map(str::to_string),
        from: links.current.clone(),
        previous_from: links.previous.clone(),
        target: Some(target.clone()),
        services: svc.clone(),
        step: Some("stop".into()),
        message: format!("Rolling back to {version}"),
        ..State::default()
    };
    op.commit()?;
    let mgr = Manager::new(&g.systemctl);
    if let Err((e, _)) = mgr.stop_all(&svc) {
        return Err(transition::failed(g, op, &mgr, e).into());
    }
    let from = op.state.from.clone();
    let switched =
        set_step(op, "switch", 40, format!("Switching current to {target}")).and_then(|_| {
            failpoint::hit("before-switch");
            snapshot::switch(root, from.as_deref(), &target)
        });
    if let Err(e) = switched {
        let e: OtaError = crate::error::classify(&e);
        return Err(transition::failed(g, op, &mgr, e).into());
    }
    failpoint::hit("after-switch");
    transition::forward(g, op, &mgr, false)
}
