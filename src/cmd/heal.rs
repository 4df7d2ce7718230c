//! `heal`: run at boot and by a timer; brings whatever an interruption left to a consistent end.
//! Quiet and fast when there is nothing to do.

use super::download::{self, Package};
use crate::cli::{Global, HealArgs, InstallArgs};
use crate::error::{ErrorCode, OtaError};
use crate::gui::Gui;
use crate::lock::Purpose;
use crate::operation::Operation;
use crate::output::Output;
use crate::services::Manager;
use crate::snapshot::{self, Links};
use crate::state::PACKAGE_TTL_SECS;
use crate::state::{Stage, DOWNLOADS_DIR};
use crate::transition::{self, Level};
use crate::{clock, fsutil, inhibit};
use anyhow::Result;
use std::fs;

pub fn run(g: &Global, args: &HealArgs) -> Result<Output> {
    let mut op = Operation::begin(g, &Purpose::brief("heal", "housekeeping"))?;
    let result = heal(g, args, &mut op);
    op.finish();
    // One record per run in the journal, whatever it did: the timer's runs are visible there
    // (and which updater ran them, in OTA_UPDATER).
    if let Ok(out) = &result {
        let did = out.human.trim();
        log::info!(
            "{}",
            if did.is_empty() {
                "heal: nothing to do"
            } else {
                did
            }
        );
    }
    result
}

fn output(op: &Operation, did: &[String]) -> Output {
    let human = did.iter().map(|d| format!("heal: {d}\n")).collect();
    let mut out = Output::success(human, op.state.progress_data());
    out.json["repaired"] = serde_json::json!(did);
    out
}

/// The package the state describes, if every field is there and valid.
fn package_of(op: &Operation) -> Option<Package> {
    let s = &op.state;
    Package {
        version: s.version.clone()?,
        package_url: s.package_url.clone()?,
        package_name: s.package_name.clone()?,
        package_size: s.package_size?,
        package_md5: s.package_md5.clone()?,
        package_sha256: s.package_sha256.clone(),
        package_sig_url: s.package_sig_url.clone(),
        full: false,
    }
    .validated()
    .ok()
}

fn remove_downloads(g: &Global) -> Result<usize> {
    let dir = g.state_dir.join(DOWNLOADS_DIR);
    let mut n = 0;
    if let Ok(rd) = fs::read_dir(&dir) {
        for e in rd.flatten() {
            if fsutil::remove_file_durable(&e.path())? {
                n += 1;
            }
        }
    }
    Ok(n)
}

/// Seconds since the RFC 3339 time `t` (None when absent or unparsable).
fn age_of(t: Option<&str>) -> Option<i64> {
    t.and_then(clock::parse_rfc3339)
        .map(|t| clock::now_unix() - t)
}

/// Back to where the interrupted install started: `toInstall` when its package is still there
/// and fresh, else idle.
fn back_to_pending(g: &Global, op: &mut Operation, why: &str) -> Result<()> {
    let pkg = op
        .state
        .package_name
        .as_ref()
        .map(|n| g.state_dir.join(DOWNLOADS_DIR).join(n));
    let fresh = age_of(op.state.verified_at.as_deref()).is_some_and(|a| a <= PACKAGE_TTL_SECS);
    op.state.step = None;
    op.state.error = None;
    if pkg.as_ref().is_some_and(|p| p.is_file()) && fresh {
        op.state.stage = Stage::ToInstall;
        op.state.progress = 100;
        op.state.message = format!("{why}; ready to install again");
    } else {
        op.state.stage = Stage::Idle;
        op.state.progress = 0;
        op.state.message = why.to_string();
    }
    op.commit()
}

/// A download that failed on the network (or whose signature could not be fetched) keeps its
/// bytes for the next attempt: the partial, or the whole verified file.
fn kept_download(g: &Global, op: &Operation) -> bool {
    let Some(name) = op.state.package_name.as_deref() else {
        return false;
    };
    let dl = g.state_dir.join(DOWNLOADS_DIR);
    op.state.error == Some(ErrorCode::DownloadFailed)
        && (dl.join(name).is_file() || dl.join(format!("{name}.part")).is_file())
}

fn heal(g: &Global, args: &HealArgs, op: &mut Operation) -> Result<Output> {
    let mut did = Vec::new();
    if op.recovered {
        did.push("state.json did not parse; moved aside and reset to idle".to_string());
    }
    let root = &g.versions_dir;
    let mut swept =
        fsutil::sweep_temp(&g.state_dir)? + fsutil::sweep_temp(&g.state_dir.join(DOWNLOADS_DIR))?;
    // A versions root that went read-only must not stop heal from bringing services up.
    match fsutil::sweep_temp(root) {
        Ok(n) => swept += n,
        Err(e) => log::warn!("sweeping {}: {e:#}", root.display()),
    }
    if swept > 0 {
        did.push(format!(
            "removed {swept} stale temp file(s), staging dir(s) or link(s)"
        ));
    }
    let mgr = Manager::new(&g.systemctl);
    let stage = op.state.stage;
    let mut result: Result<()> = Ok(());
    match stage {
        Stage::Downloading | Stage::Verifying => {
            let dl = g.state_dir.join(DOWNLOADS_DIR);
            let pkg = package_of(op).filter(|p| {
                dl.join(&p.package_name).exists()
                    || dl.join(format!("{}.part", p.package_name)).exists()
            });
            match pkg {
                Some(p) => {
                    did.push(format!("resuming the download of {}", p.version));
                    op.hold(&Purpose::long("", download::activity(&p.version)));
                    result = download::download(g, &p, op).map(|_| ());
                }
                None => {
                    remove_downloads(g)?;
                    op.state = crate::state::State {
                        message: "an interrupted download had no partial left; cleaned up".into(),
                        ..Default::default()
                    };
                    op.commit()?;
                    did.push("cleaned up an interrupted download with no partial".into());
                }
            }
        }
        Stage::ToInstall => {
            let age = age_of(op.state.verified_at.as_deref());
            if age.is_none_or(|a| a > PACKAGE_TTL_SECS) {
                remove_downloads(g)?;
                let err = OtaError::new(
                    ErrorCode::PackageExpired,
                    "the package waited more than 24 h to be installed and was deleted",
                );
                op.fail(&err)?;
                did.push("expired a package older than 24 h".into());
            } else if args.auto_install {
                match inhibit::active(g) {
                    Some(why) => did.push(format!("the pending install waits: INHIBITED: {why}")),
                    None => {
                        let v = op.state.version.clone().unwrap_or_default();
                        did.push(format!("installing the pending package {v}"));
                        op.hold(&Purpose::long("", format!("an install of {v}")));
                        let install_args = InstallArgs {
                            version: None,
                            allow_downgrade: false,
                            wait: 0,
                            reinstall: false,
                        };
                        let mut gui = Gui::none();
                        result =
                            super::install::install(g, &install_args, op, &mut gui).map(|_| ());
                    }
                }
            }
        }
        Stage::Installing => {
            let step = op.state.step.clone().unwrap_or_default();
            did.push(format!("finishing an install interrupted at step {step:?}"));
            op.hold(&Purpose::long("", "finishing an interrupted install"));
            result = finish_install(g, op, &mgr, &step);
        }
        Stage::Rebooting => {
            did.push("checking the services after the reboot".into());
            op.hold(&Purpose::long("", "checking the services after a reboot"));
            result = transition::forward(g, op, &mgr, true).map(|_| ());
        }
        // A device whose rollback failed waits for a person, but its services run whenever the
        // snapshot current points at is complete.
        Stage::Failed if op.state.error == Some(ErrorCode::RollbackFailed) => {
            op.hold(&Purpose::long("", "reviving the services of current"));
            if let Some(what) = transition::revive_current(root, &mgr) {
                // One heal note, replaced each time: the message must not grow every 15 min.
                let base = op.state.message.split("; heal: ").next().unwrap_or("");
                op.state.message = format!("{base}; heal: {what}");
                op.commit_best_effort();
                did.push(what);
            }
        }
        // Bytes kept for a resume stay until 24 h after the download last made progress.
        Stage::Failed if kept_download(g, op) => {
            let since = op
                .state
                .progressed_at
                .as_deref()
                .or(op.state.updated_at.as_deref());
            if age_of(since).is_none_or(|a| a > PACKAGE_TTL_SECS) {
                let n = remove_downloads(g)?;
                op.state = crate::state::State {
                    message: "a failed download made no progress for 24 h; its bytes were deleted"
                        .into(),
                    ..Default::default()
                };
                op.commit()?;
                did.push(format!(
                    "deleted {n} download(s) that made no progress for 24 h; idle"
                ));
            }
        }
        Stage::Failed => {
            op.hold(&Purpose::long("", "cleaning up after a failure"));
            let n = remove_downloads(g)?;
            let pruned = match snapshot::prune(root) {
                Ok(p) => p.len(),
                Err(e) => {
                    log::warn!("removing unused snapshots: {e:#}");
                    0
                }
            };
            op.state = crate::state::State {
                message: format!(
                    "cleaned up after {}",
                    op.state
                        .error
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| "a failure".into())
                ),
                ..Default::default()
            };
            op.commit()?;
            did.push(format!(
                "cleaned up after a failure ({n} download(s), {pruned} snapshot(s)); idle"
            ));
        }
        Stage::Idle | Stage::Success => {}
    }
    // What acts on the device says so: others get BUSY at once rather than wait it out.
    if transition::current_needs_repair(root) {
        op.hold(&Purpose::long("", "repairing current"));
    }
    if let Some(fixed) = transition::repair_current(root, &mgr) {
        did.push(fixed);
    }
    if super::factory::needs_remake(root) {
        op.hold(&Purpose::long("", "re-making the factory snapshot"));
    }
    match super::factory::remake_if_shared(root) {
        Ok(Some(what)) => did.push(what),
        Ok(None) => {}
        Err(e) => did.push(format!("the factory snapshot could not be re-made: {e:#}")),
    }
    // An operation that failed again is recorded in state.json; heal itself did its job.
    if let Err(e) = result {
        let err = crate::error::classify(&e);
        did.push(format!(
            "the resumed operation ended with {}",
            err.message()
        ));
    }
    Ok(output(op, &did))
}

/// At step `switch`: whether an install carried mutable data into its new snapshot while
/// `current` still points at the version it was carried from.
fn carried_behind(g: &Global, op: &Operation) -> bool {
    let root = &g.versions_dir;
    let Some(from) = op.state.from_dir() else {
        return false;
    };
    if op.state.package_name.is_none()
        || Links::read(root).current.as_deref() != Some(from.as_str())
    {
        return false;
    }
    let Some(target) = op.state.target_dir() else {
        return false;
    };
    match crate::integrity::read(&root.join(target)) {
        Ok(Some(rec)) => !rec.mutable.is_empty(),
        // A record this build cannot read may name data: assume it does, and go back.
        Err(e) if crate::error::has_code(&e, crate::error::ErrorCode::SchemaTooNew) => true,
        _ => false,
    }
}

/// Finish or undo an install (or manual rollback) from the step it recorded.
fn finish_install(g: &Global, op: &mut Operation, mgr: &Manager, step: &str) -> Result<()> {
    let root = &g.versions_dir;
    match step {
        // Nothing the running software depends on changed yet: drop the new snapshot.
        "" | "unpack" | "snapshot" => {
            snapshot::prune_best_effort(root);
            back_to_pending(
                g,
                op,
                &format!("the install was interrupted at {step:?} and undone"),
            )
        }
        // Services may be stopped and current is unchanged (its data only read): start them
        // again on current. A migration interrupted here runs again, on a fresh copy, with
        // the next install; never twice on the same data.
        "stop" | "data" | "migrate" => {
            let current = Links::read(root).current;
            if current.is_some() && current == op.state.target_dir() {
                // The switch had happened after all: go forward.
                return transition::forward(g, op, mgr, true).map(|_| ());
            }
            let cur = current.unwrap_or_default();
            let svc = transition::services_for(root, &cur, &op.state.services, true);
            mgr.stop_best_effort(&svc);
            if let Err(e) = mgr.start_all(&svc).and_then(|_| mgr.check_all(&svc)) {
                transition::fall_back(root, op, mgr, e, Level::Previous);
                return Ok(());
            }
            snapshot::prune_best_effort(root);
            back_to_pending(
                g,
                op,
                &format!("the install was interrupted at {step:?} and undone"),
            )
        }
        // Data was carried, and current still points at the old version: that version ran
        // since the cut (at boot, before this heal) and may have written its data after the
        // copy was made. Switching now would lose those writes: undo the install instead, and
        // the next one carries the data afresh.
        "switch" if carried_behind(g, op) => {
            let from = op.state.from_dir().unwrap_or_default();
            let previous = op.state.previous_dir();
            let restored = match &previous {
                Some(p) if root.join(p).is_dir() => {
                    snapshot::set_link(root, snapshot::PREVIOUS, p).map(|_| ())
                }
                // The switch may have pointed previous at current already.
                _ if snapshot::link_dir(root, snapshot::PREVIOUS).as_deref() == Some(&from) => {
                    fs::remove_file(root.join(snapshot::PREVIOUS)).map_err(Into::into)
                }
                _ => Ok(()),
            }
            .and_then(|_| fsutil::sync_dir(root));
            if let Err(e) = restored {
                log::warn!("restoring previous: {e:#}");
            }
            let svc = transition::services_for(root, &from, &op.state.services, true);
            mgr.stop_best_effort(&svc);
            if let Err(e) = mgr.start_all(&svc).and_then(|_| mgr.check_all(&svc)) {
                transition::fall_back(root, op, mgr, e, Level::Previous);
                return Ok(());
            }
            snapshot::prune_best_effort(root);
            back_to_pending(
                g,
                op,
                "the install was interrupted at \"switch\" after its data was copied, and undone (the old version ran since, its data may be newer)",
            )
        }
        // The snapshot was complete before the stop step: switch to it again and go forward.
        "switch" => transition::switch_and_forward(g, op, mgr).map(|_| ()),
        "reboot" | "start" | "verify" | "health" => {
            transition::forward(g, op, mgr, true).map(|_| ())
        }
        "rollback-previous" | "rollback-factory" => {
            let original = OtaError::new(
                op.state.error.unwrap_or(ErrorCode::Internal),
                op.state
                    .rollback_cause
                    .clone()
                    .unwrap_or_else(|| op.state.message.clone()),
            );
            let from = if step == "rollback-previous" {
                Level::Previous
            } else {
                Level::Factory
            };
            transition::fall_back(root, op, mgr, original, from);
            Ok(())
        }
        other => {
            log::warn!("unknown install step {other:?}; rolling back");
            let e = OtaError::new(
                ErrorCode::Internal,
                format!("install interrupted at unknown step {other:?}"),
            );
            transition::fall_back(root, op, mgr, e, Level::Previous);
            Ok(())
        }
    }
}
