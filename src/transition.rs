//! Moving the device from one snapshot to another once services may be down: switch, start,
//! check, and fall back through a list of targets. Install, rollback and heal all end here, so
//! the rule that keeps a printer up is written once:
//!
//! after services stop, the device ends with `current` resolving to a complete snapshot whose
//! services run. A failed switch is followed by a look at where `current` really points; if that
//! snapshot is complete, its services are started. `ROLLBACK_FAILED` only when no complete
//! snapshot's services can be started.

use crate::error::{ErrorCode, OtaError};
use crate::operation::Operation;
use crate::output::Output;
use crate::services::{self, Manager, Service};
use crate::snapshot::{self, Links, CURRENT, PREVIOUS};
use crate::state::{Stage, DOWNLOADS_DIR};
use crate::{failpoint, fsutil};
use crate::{hooks, integrity};
use anyhow::{Context, Result};
use std::fs;
use std::path::Path;

/// Where an automatic rollback starts: heal resumes one at the level it had reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// The snapshot that was current when the operation began.
    Previous,
    /// A fresh copy of the factory snapshot.
    Factory,
}

/// The services to start on `dir`: its own list, limited to `stopped` when `only_stopped`
/// (an install restarts only what it stopped); the stopped ones when the snapshot has no list.
pub fn services_for(
    root: &Path,
    dir: &str,
    stopped: &[Service],
    only_stopped: bool,
) -> Vec<Service> {
    let own = snapshot::read_services(&root.join(dir));
    if own.is_empty() {
        return stopped.to_vec();
    }
    if only_stopped {
        own.into_iter()
            .filter(|s| stopped.iter().any(|t| t.name == s.name))
            .collect()
    } else {
        own
    }
}

/// Stop what may run (`running`, and the target's own services), point `current` at `dir`,
/// start and check the target's own services. `previous` is restored on a best-effort basis: a
/// rollback that holds does not fail on the cosmetic link.
fn bring_up(
    root: &Path,
    mgr: &Manager,
    running: &[Service],
    dir: &str,
    previous: Option<&str>,
) -> Result<(), OtaError> {
    let own = services_for(root, dir, running, false);
    let mut stop = running.to_vec();
    stop.extend(own.iter().cloned());
    mgr.stop_best_effort(&services::start_order(stop));
    point_current(root, dir, previous)?;
    mgr.start_all(&own)?;
    mgr.check_all(&own)
}

/// `current` -> `dir` (strict), then `previous` -> `previous` (best effort). When the switch
/// fails but `current` already points at `dir`, that is success.
fn point_current(root: &Path, dir: &str, previous: Option<&str>) -> Result<(), OtaError> {
    let switched = snapshot::set_link(root, CURRENT, dir).and_then(|changed| {
        if changed {
            fsutil::sync_dir(root)?;
        }
        Ok(())
    });
    if let Err(e) = switched {
        if snapshot::link_dir(root, CURRENT).as_deref() != Some(dir) {
            return Err(OtaError::new(
                ErrorCode::DeploymentFailed,
                format!("switching current to {dir}: {e:#}"),
            ));
        }
        log::warn!("current points at {dir}, but making that durable failed: {e:#}");
    }
    if let Some(p) = previous {
        if root.join(p).is_dir() {
            let kept = snapshot::set_link(root, PREVIOUS, p).and_then(|changed| {
                if changed {
                    fsutil::sync_dir(root)?;
                }
                Ok(())
            });
            if let Err(e) = kept {
                log::warn!("restoring previous to {p} failed (current is right): {e:#}");
            }
        }
    }
    Ok(())
}

/// Build a fresh, writable snapshot from the factory's: a private copy (current never points at
/// the factory itself), with the modes the version was installed with. Returns its dir name.
pub fn copy_of_factory(root: &Path, factory: &str) -> Result<String> {
    let version = snapshot::version_of(factory)
        .context("the factory link names no version")?
        .to_string();
    let src = root.join(factory);
    let staging = fsutil::temp_path(root, "stage");
    let built = (|| -> Result<String> {
        fs::create_dir(&staging).with_context(|| format!("create dir {}", staging.display()))?;
        snapshot::copy_tree(&src, &staging)?;
        // The factory copy is read-only: give the new snapshot the modes it was built with,
        // and its unrecorded mutable data back to its owner.
        if let Some(rec) = integrity::read(&staging)? {
            for m in &rec.mutable {
                make_owner_writable(&staging.join(m))?;
            }
            for (path, e) in &rec.entries {
                if e.kind != integrity::Kind::Link {
                    use std::os::unix::fs::PermissionsExt;
                    let p = staging.join(path);
                    fs::set_permissions(&p, fs::Permissions::from_mode(e.mode))
                        .with_context(|| format!("chmod {}", p.display()))?;
                }
            }
        } else {
            make_owner_writable(&staging)?;
        }
        make_owner_writable(&staging.join(snapshot::META_DIR))?;
        fsutil::sync_new_tree(&staging)?;
        let name = snapshot::fresh_dir_name(root, &version);
        fsutil::rename_durable(&staging, &root.join(&name))?;
        Ok(name)
    })();
    if built.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    built
}

/// `u+w` on a dir tree (dirs and files), for a copy of a read-only tree without a record.
pub fn make_owner_writable(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = fs::symlink_metadata(dir) else {
        return Ok(());
    };
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o200 == 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode | 0o200))
            .with_context(|| format!("chmod {}", dir.display()))?;
    }
    if meta.is_dir() {
        for e in fs::read_dir(dir).with_context(|| format!("read dir {}", dir.display()))? {
            make_owner_writable(&e?.path())?;
        }
    }
    Ok(())
}

/// After `original` failed an install or a rollback once services may be down: level 1 back to
/// the snapshot that was current when the operation began, level 2 to a fresh copy of the
/// factory (an intact target is preferred: a level whose snapshot changed since it was built is
/// tried last), and as the last resort the snapshot `current` points at now, if it is
/// complete. Records the outcome (stage `failed`, the original code, or `ROLLBACK_FAILED`) and
/// returns the error to report. Each level is recorded as the step before it acts, so heal can
/// run it again after a crash; a state write that fails never stops the rollback.
pub fn fall_back(
    root: &Path,
    op: &mut Operation,
    mgr: &Manager,
    original: OtaError,
    from: Level,
) -> OtaError {
    log::error!("{}; rolling back", original.message());
    op.state.stage = Stage::Installing;
    op.state.error = Some(original.code);
    op.state.rollback_cause = Some(original.detail.clone());
    let mut running = op.state.services.clone();
    if let Some(t) = op.state.target_dir() {
        running.extend(snapshot::read_services(&root.join(t)));
    }
    let running = services::start_order(running);
    let links = Links::read(root);
    let start_dir = op.state.from_dir();
    let mut why = Vec::new();
    let mut held = None;

    // The order of levels: previous (unless it changed since it was built), factory, then a
    // changed previous.
    let mut plan: Vec<(Level, bool)> = Vec::new();
    if from == Level::Previous {
        match start_dir.as_deref() {
            Some(d) if root.join(d).is_dir() => {
                let intact = integrity::check_target(root, d).usable();
                plan.push((Level::Previous, intact));
            }
            _ => why.push("no previous version".to_string()),
        }
    }
    plan.push((Level::Factory, true));
    plan.sort_by_key(|(_, intact)| !intact);

    for (level, _) in plan {
        let (step, label, attempt) = match level {
            Level::Previous => {
                let d = start_dir.clone().unwrap_or_default();
                let restore = op.state.previous_dir();
                let label = format!("previous {}", snapshot::version_of(&d).unwrap_or(&d));
                ("rollback-previous", label, Some((d, restore)))
            }
            Level::Factory => match links.factory.clone() {
                Some(f) => {
                    let label = format!("factory {}", snapshot::version_of(&f).unwrap_or(&f));
                    ("rollback-factory", label, Some((f, start_dir.clone())))
                }
                None => {
                    why.push("no factory version".to_string());
                    continue;
                }
            },
        };
        let Some((dir, previous)) = attempt else {
            continue;
        };
        op.state.step = Some(step.into());
        op.state.message = format!("{}; rolling back to {label}", original.detail);
        op.commit_best_effort();
        failpoint::hit(step);
        let dir = if level == Level::Factory {
            match integrity::check_target(root, &dir) {
                st if !st.usable() => {
                    why.push(format!(
                        "to {label}: its snapshot changed: {}",
                        st.summary()
                    ));
                    continue;
                }
                _ => {}
            }
            match copy_of_factory(root, &dir) {
                Ok(d) => d,
                Err(e) => {
                    why.push(format!("to {label}: copying the factory snapshot: {e:#}"));
                    continue;
                }
            }
        } else {
            dir
        };
        match bring_up(root, mgr, &running, &dir, previous.as_deref()) {
            Ok(()) => {
                held = Some(label);
                break;
            }
            Err(e) => why.push(format!("to {label}: {}", e.message())),
        }
    }
    let mut by_last_resort = false;
    if held.is_none() {
        let target = op.state.target_dir();
        held = last_resort(root, mgr, &running, target.as_deref(), &mut why);
        by_last_resort = held.is_some();
    }
    let fin = match &held {
        // Said plainly: no level held, and what runs now (perhaps the version that failed).
        Some(what) if by_last_resort => OtaError::new(
            original.code,
            format!(
                "{}; no rollback level held ({}); {what}",
                original.detail,
                why.join("; ")
            ),
        ),
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
        snapshot::prune_best_effort(root);
    }
    op.fail_best_effort(&fin);
    fin
}

/// When every level failed: if `current` (re-read) resolves to a complete snapshot, start and
/// check its services. Returns what runs then, in words. When that snapshot is `target` (the
/// version that failed: the switch back could not be made), its services are started again all
/// the same: a version whose services run but that failed a health check serves the device
/// better than nothing, and the message says plainly that it is the version that failed.
fn last_resort(
    root: &Path,
    mgr: &Manager,
    running: &[Service],
    target: Option<&str>,
    why: &mut Vec<String>,
) -> Option<String> {
    let Some(cur) = snapshot::link_dir(root, CURRENT) else {
        why.push("current points nowhere".into());
        return None;
    };
    let version = snapshot::version_of(&cur).unwrap_or(&cur);
    let failed_one = target == Some(cur.as_str());
    let label = if failed_one {
        format!("the new version {version}, which failed, still runs")
    } else {
        format!("current {version} as it was runs again")
    };
    let st = integrity::check_target(root, &cur);
    if !st.usable() {
        why.push(format!("current {cur}: not complete: {}", st.summary()));
        return None;
    }
    match bring_up(root, mgr, running, &cur, None) {
        Ok(()) => {
            log::warn!("no rollback level held; {label}");
            Some(label)
        }
        Err(e) => {
            why.push(format!("current {cur}: {}", e.message()));
            None
        }
    }
}

/// From the switch on, an install (or a rollback by hand) only goes forward: start the target's
/// services, check them, and finish with success; any failure falls back. Heal re-enters here
/// after a crash or a reboot with `restart`: what state.json says may lag behind what runs (a
/// write that failed), and `start` leaves a unit that still runs an older program as it is, so
/// the services are stopped first.
pub fn forward(
    g: &crate::cli::Global,
    op: &mut Operation,
    mgr: &Manager,
    restart: bool,
) -> Result<Output> {
    let root = &g.versions_dir;
    let version = op.state.version.clone().unwrap_or_default();
    let target = op.state.target_dir().unwrap_or_default();
    // Heal trusts no record that may lag: success is only ever written for the snapshot
    // `current` really points at (a lost write may hide a rollback that already ran).
    if restart && snapshot::link_dir(root, CURRENT).as_deref() != Some(target.as_str()) {
        return switch_and_forward(g, op, mgr);
    }
    let installing = op.state.package_name.is_some();
    let svc = services_for(root, &target, &op.state.services, installing);
    op.state.stage = Stage::Installing;
    let started = set_step(
        op,
        "start",
        70,
        format!("Starting {} service(s)", svc.len()),
    )
    .map_err(|e| crate::error::classify(&e))
    .and_then(|_| {
        failpoint::hit("before-start");
        if restart {
            mgr.stop_best_effort(&svc);
        }
        mgr.start_all(&svc)
    })
    .and_then(|_| {
        set_step(op, "verify", 90, "Checking the services stay up".into())
            .map_err(|e| crate::error::classify(&e))
    })
    .and_then(|_| mgr.check_all(&svc))
    .and_then(|_| health(g, op, mgr, &target, &version, &svc));
    if let Err(e) = started {
        return Err(failed(g, op, mgr, e).into());
    }
    failpoint::hit("before-success");
    if installing {
        if let Some(name) = &op.state.package_name {
            let pkg = g.state_dir.join(DOWNLOADS_DIR).join(name);
            if let Err(e) = fsutil::remove_file_durable(&pkg) {
                log::warn!("removing the installed package: {e:#}");
            }
        }
    }
    if installing {
        snapshot::prune_best_effort(root);
    }
    // A package's updater on trial commits its own install: that is its proof (see
    // crate::trial); failing it, the device goes back.
    match installing
        .then(|| crate::trial::pending(g, &target))
        .flatten()
    {
        Some(t) => {
            if let Err(e) = crate::trial::commit(g, op, &t)? {
                return Err(failed(g, op, mgr, e).into());
            }
        }
        None => {
            op.state.mark_success(installing, &version);
            op.commit()?;
        }
    }
    failpoint::hit("after-success");
    Ok(Output::success(
        format!("{}\n", op.state.message),
        op.state.progress_data(),
    ))
}

/// The health phase of [`forward`]: the target snapshot's own recorded checks, then the
/// device-wide one, retried until the deadline; then every service must still be active. The
/// step is recorded first, so heal after a crash here restarts the services and runs the checks
/// again before it commits.
fn health(
    g: &crate::cli::Global,
    op: &mut Operation,
    mgr: &Manager,
    target: &str,
    version: &str,
    svc: &[Service],
) -> Result<(), OtaError> {
    let dir = g.versions_dir.join(target);
    let cfg = hooks::HealthConfig::from_global(g);
    let checks = hooks::checks_for(&dir, &cfg)?;
    if checks.is_empty() {
        return Ok(());
    }
    set_step(
        op,
        "health",
        95,
        format!(
            "Running {} health check(s), for up to {:.0} s",
            checks.len(),
            cfg.deadline.as_secs_f64()
        ),
    )
    .map_err(|e| crate::error::classify(&e))?;
    failpoint::hit("before-health");
    hooks::run_checks(&dir, version, &checks, &cfg)?;
    mgr.check_now(svc)
}

/// Fall back after `e`, and delete the package that failed (it is of no further use).
pub fn failed(g: &crate::cli::Global, op: &mut Operation, mgr: &Manager, e: OtaError) -> OtaError {
    let fin = fall_back(&g.versions_dir, op, mgr, e, Level::Previous);
    if let Some(name) = op.state.package_name.clone() {
        let _ = fsutil::remove_file_durable(&g.state_dir.join(DOWNLOADS_DIR).join(name));
    }
    fin
}

/// Switch to the target recorded in the state and go forward; the snapshot must be complete.
pub fn switch_and_forward(
    g: &crate::cli::Global,
    op: &mut Operation,
    mgr: &Manager,
) -> Result<Output> {
    let root = &g.versions_dir;
    let target = op.state.target_dir().unwrap_or_default();
    let st = integrity::check_target(root, &target);
    if !st.usable() {
        let e = OtaError::new(
            ErrorCode::DeploymentFailed,
            format!("snapshot {target} is not complete: {}", st.summary()),
        );
        return Err(failed(g, op, mgr, e).into());
    }
    let switched =
        set_step(op, "switch", 60, format!("Switching current to {target}")).and_then(|_| {
            failpoint::hit("before-switch");
            let prev = op.state.from_dir();
            snapshot::switch(root, prev.as_deref(), &target)
        });
    if let Err(e) = switched {
        return Err(failed(g, op, mgr, crate::error::classify(&e)).into());
    }
    failpoint::hit("after-switch");
    forward(g, op, mgr, true)
}

/// Record the step reached (before the action it names).
pub fn set_step(op: &mut Operation, step: &str, progress: u8, message: String) -> Result<()> {
    op.state.step = Some(step.into());
    op.state.progress = progress;
    op.state.message = message;
    op.commit()
}

/// Heal's repair of a `current` that points nowhere: previous, then a fresh copy of factory,
/// each checked first. A `current` that resolves is left alone even if it changed (that is
/// logged): switching software under a running print is not heal's to decide. Returns what it
/// did.
/// Whether [`repair_current`] has a `current` to repair: one that points nowhere, or none
/// where `previous` or `factory` could take its place.
pub fn current_needs_repair(root: &Path) -> bool {
    if !root.is_dir() {
        return false;
    }
    let links = Links::read(root);
    if links.current.is_some() {
        return false;
    }
    let exists = fs::symlink_metadata(root.join(CURRENT)).is_ok();
    exists || links.previous.is_some() || links.factory.is_some()
}

pub fn repair_current(root: &Path, mgr: &Manager) -> Option<String> {
    if !current_needs_repair(root) {
        if let Some(c) = Links::read(root).current.as_deref() {
            integrity::check_target(root, c);
        }
        return None;
    }
    let links = Links::read(root);
    let what = "current points nowhere";
    let running = links
        .previous
        .as_deref()
        .map(|p| snapshot::read_services(&root.join(p)))
        .unwrap_or_default();
    if let Some(p) = links.previous.as_deref() {
        if integrity::check_target(root, p).usable() {
            match bring_up(root, mgr, &running, p, None) {
                Ok(()) => return Some(format!("{what}; now {p}")),
                Err(e) => log::error!("repairing current to {p}: {}", e.message()),
            }
        }
    }
    if let Some(f) = links.factory.as_deref() {
        if integrity::check_target(root, f).usable() {
            let brought = copy_of_factory(root, f)
                .map_err(|e| format!("{e:#}"))
                .and_then(|d| {
                    bring_up(root, mgr, &running, &d, None)
                        .map(|_| d)
                        .map_err(|e| e.message())
                });
            match brought {
                Ok(d) => return Some(format!("{what}; now {d}, a fresh copy of factory")),
                Err(e) => log::error!("repairing current from factory {f}: {e}"),
            }
        }
    }
    Some(format!(
        "{what}; no previous or factory version could be brought up"
    ))
}

/// Heal in `ROLLBACK_FAILED`: if the snapshot `current` points at is complete and a service of
/// it is not active, start its services again. Returns what it did.
pub fn revive_current(root: &Path, mgr: &Manager) -> Option<String> {
    let cur = snapshot::link_dir(root, CURRENT)?;
    let own = snapshot::read_services(&root.join(&cur));
    if own.iter().all(|s| mgr.is_running(&s.name)) {
        return None;
    }
    if !integrity::check_target(root, &cur).usable() {
        return Some(format!(
            "current {cur} is not complete; it waits for a person"
        ));
    }
    Some(
        match mgr.start_all(&own).and_then(|_| mgr.check_all(&own)) {
            Ok(()) => format!("started the services of current {cur} again"),
            Err(e) => format!(
                "the services of current {cur} do not start: {}",
                e.message()
            ),
        },
    )
}
