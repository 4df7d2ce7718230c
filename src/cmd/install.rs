//! `install`: the verified package becomes a new version snapshot and the running software,
//! with an automatic rollback when the new version does not come up.

use super::rollback::{auto_rollback, Level};
use super::{Operation, Output};
use crate::archive::{self, Limits};
use crate::cli::{Global, InstallArgs};
use crate::error::{fail, ErrorCode, OtaError, EXIT_SIGTERM};
use crate::manifest::{Manifest, MANIFEST};
use crate::services::{self, Manager, Service};
use crate::snapshot::{self, Links};
use crate::state::{Stage, DOWNLOADS_DIR};
use crate::{clock, failpoint, fsutil, inhibit, signals, validate};
use anyhow::{Context, Result};
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A verified package may be installed for this long after `verified_at`.
pub const PACKAGE_TTL_SECS: i64 = 24 * 3600;

pub fn run(g: &Global, args: &InstallArgs) -> Result<Output> {
    let mut op = Operation::begin(g)?;
    let gui = Gui::launch(&g.gui);
    let result = install(g, args, &mut op);
    gui.finish();
    op.finish();
    result
}

/// The optional progress screen: started detached, never waited for, never fatal.
struct Gui(Option<Child>);

impl Gui {
    fn launch(path: &Path) -> Gui {
        if !path.exists() {
            log::debug!("no ota-gui at {}", path.display());
            return Gui(None);
        }
        match Command::new(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
        {
            Ok(c) => Gui(Some(c)),
            Err(e) => {
                log::warn!("ota-gui {} did not start: {e}", path.display());
                Gui(None)
            }
        }
    }

    fn finish(mut self) {
        // Reaped if it already ended; a GUI still showing progress is left running.
        if let Some(child) = self.0.as_mut() {
            match child.try_wait() {
                Ok(Some(st)) if !st.success() => log::warn!("ota-gui exited early: {st}"),
                _ => {}
            }
        }
    }
}

/// Put `from` (a file, symlink or dir of the unpacked package) at `dst` inside the snapshot
/// `snap`, by rename: new inodes only, so no hard-linked file of the old version is touched.
fn place(from: &Path, snap: &Path, dst: &str) -> Result<()> {
    let mut at = snap.to_path_buf();
    let parts: Vec<&str> = dst.split('/').collect();
    for part in &parts[..parts.len() - 1] {
        at.push(part);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return fail(
                    ErrorCode::DeploymentFailed,
                    format!("dst {dst:?} passes through the symlink {}", at.display()),
                )
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                fs::remove_file(&at).with_context(|| format!("remove {}", at.display()))?;
                fs::DirBuilder::new().mode(0o755).create(&at)?;
            }
            Err(_) => fs::DirBuilder::new()
                .mode(0o755)
                .create(&at)
                .with_context(|| format!("create dir {}", at.display()))?,
        }
    }
    let to = snap.join(dst);
    let from_meta =
        fs::symlink_metadata(from).with_context(|| format!("stat {}", from.display()))?;
    let to_meta = fs::symlink_metadata(&to).ok();
    let to_is_dir = to_meta.as_ref().is_some_and(|m| m.is_dir());
    if from_meta.is_dir() && to_is_dir {
        // A directory module merges into the directory it replaces, entry by entry.
        for entry in fs::read_dir(from).with_context(|| format!("read dir {}", from.display()))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            place(&entry.path(), snap, &format!("{dst}/{name}"))?;
        }
        return Ok(());
    }
    if to_is_dir {
        fs::remove_dir_all(&to).with_context(|| format!("remove {}", to.display()))?;
    }
    fsutil::rename(from, &to)
}

/// Unpack, validate and build the snapshot in `staging/snapshot`; returns the manifest.
fn build(
    op: &mut Operation,
    root: &Path,
    pkg: &Path,
    version: &str,
    staging: &Path,
    current: Option<&Path>,
) -> Result<Manifest> {
    let unpack = staging.join("unpack");
    fs::DirBuilder::new().mode(0o755).create(&unpack)?;
    let free = fsutil::free_bytes(root)?;
    let up = archive::unpack(pkg, &unpack, &Limits::from_env(), free)?;
    failpoint::hit("after-unpack");
    let bytes = match fs::read(unpack.join(MANIFEST)) {
        Ok(b) => b,
        Err(_) => {
            return fail(
                ErrorCode::ManifestInvalid,
                "no manifest.json at the package root",
            )
        }
    };
    let manifest = Manifest::parse(&bytes, version, |src| up.contains(src))?;
    for md in &manifest.modules {
        if let Some(want) = &md.md5 {
            if !up.files.contains(&md.src) {
                return fail(
                    ErrorCode::ManifestInvalid,
                    format!(
                        "module {:?}: md5 given but src {:?} is not a file",
                        md.name, md.src
                    ),
                );
            }
            let got = crate::fetch::md5_file(&unpack.join(&md.src))?;
            if !got.eq_ignore_ascii_case(want) {
                return fail(
                    ErrorCode::ManifestInvalid,
                    format!(
                        "module {:?}: md5 of {} is {got}, manifest says {want}",
                        md.name, md.src
                    ),
                );
            }
        }
    }
    op.state.progress = 30;
    op.state.step = Some("snapshot".into());
    op.state.message = format!("Building snapshot v{version}");
    op.commit()?;

    let snap = staging.join("snapshot");
    fs::DirBuilder::new().mode(0o755).create(&snap)?;
    let mut list: Vec<Service> = Vec::new();
    if let Some(cur) = current {
        let n = snapshot::mirror(cur, &snap)?;
        log::info!("mirrored {n} entries of {} by hard links", cur.display());
        list = snapshot::read_services(cur);
    }
    for md in &manifest.modules {
        place(&unpack.join(&md.src), &snap, &md.dst)?;
    }
    for s in manifest.services() {
        list.retain(|o| o.name != s.name);
        list.push(s);
    }
    snapshot::write_services(&snap, &list)?;
    fsutil::sync_fs(&snap)?;
    Ok(manifest)
}

/// Run the reboot command, bounded; false when it could not be run or failed.
fn reboot(cmd: &str) -> bool {
    let argv: Vec<&str> = cmd.split_whitespace().collect();
    let Some((prog, args)) = argv.split_first() else {
        return false;
    };
    let child = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        log::error!("reboot command {cmd:?} could not be started");
        return false;
    };
    for _ in 0..3000 {
        match child.try_wait() {
            Ok(Some(st)) => return st.success(),
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => return false,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

fn set_step(op: &mut Operation, step: &str, progress: u8, message: String) -> Result<()> {
    op.state.step = Some(step.into());
    op.state.progress = progress;
    op.state.message = message;
    op.commit()
}

/// The install under a writer's lock; heal --auto-install calls it too.
pub fn install(g: &Global, args: &InstallArgs, op: &mut Operation) -> Result<Output> {
    let s = &op.state;
    if s.stage != Stage::ToInstall {
        return fail(
            ErrorCode::NoPackage,
            format!("no verified package to install (stage is {})", s.stage),
        );
    }
    let (Some(version), Some(name)) = (s.version.clone(), s.package_name.clone()) else {
        return fail(ErrorCode::NoPackage, "state.json names no package");
    };
    if let Some(v) = &args.version {
        validate::version(v)?;
        if v != &version {
            return fail(
                ErrorCode::VersionMismatch,
                format!("the downloaded package is version {version}, not {v}"),
            );
        }
    }
    if !args.allow_downgrade {
        if let Some(cur) = Links::read(&g.versions_dir).current {
            if validate::compare_versions(&version, &cur) == std::cmp::Ordering::Less {
                return fail(
                    ErrorCode::DowngradeRefused,
                    format!("{version} is lower than the current {cur}; use rollback, or --allow-downgrade"),
                );
            }
        }
    }
    let pkg = g.state_dir.join(DOWNLOADS_DIR).join(&name);
    if !pkg.is_file() {
        let err = OtaError::new(
            ErrorCode::NoPackage,
            format!("{} is missing; download it again", pkg.display()),
        );
        op.fail(&err)?;
        return Err(err.into());
    }
    let verified = s.verified_at.as_deref().and_then(clock::parse_rfc3339);
    let age = verified.map(|t| clock::now_unix() - t);
    if age.is_none_or(|a| a > PACKAGE_TTL_SECS) {
        fsutil::remove_file_durable(&pkg)?;
        let err = OtaError::new(
            ErrorCode::PackageExpired,
            format!(
                "verified at {}, more than 24 h ago; the package was deleted",
                s.verified_at.as_deref().unwrap_or("never")
            ),
        );
        op.fail(&err)?;
        return Err(err.into());
    }

    if let Err(e) = inhibit::check(g, Duration::from_secs(args.wait)) {
        op.state.message = format!("{}; the package waits", e.message());
        op.commit()?;
        return Err(e.into());
    }

    let root = g.versions_dir.clone();
    fsutil::ensure_dir(&root)?;
    fsutil::sweep_temp(&root)?;
    let links = Links::read(&root);
    let old = links.current.clone();
    op.state.stage = Stage::Installing;
    op.state.error = None;
    op.state.rollback = None;
    op.state.bytes_done = 0;
    op.state.bytes_total = 0;
    op.state.speed_bps = 0;
    op.state.eta_s = None;
    op.state.previous_version = old.clone();
    op.state.previous_before = links.previous.clone();
    op.state.services = Vec::new();
    set_step(op, "unpack", 0, format!("Unpacking {name}"))?;

    let target = snapshot::version_dir(&root, &version);
    let staging = fsutil::temp_path(&root, "stage");
    let built = (|| -> Result<Manifest> {
        if target.exists() {
            let used = [&links.current, &links.previous, &links.factory]
                .iter()
                .any(|l| l.as_deref() == Some(version.as_str()));
            if used {
                return fail(
                    ErrorCode::DeploymentFailed,
                    format!("version {version} is already installed (current, previous or factory); use rollback"),
                );
            }
            log::info!("removing the unreferenced leftover {}", target.display());
            fsutil::remove_tree_durable(&target)?;
        }
        fs::DirBuilder::new().mode(0o755).create(&staging)?;
        let current_dir = old.as_ref().map(|v| snapshot::version_dir(&root, v));
        let m = build(op, &root, &pkg, &version, &staging, current_dir.as_deref())?;
        failpoint::hit("before-snapshot-rename");
        fsutil::rename_durable(&staging.join("snapshot"), &target)?;
        failpoint::hit("after-snapshot-rename");
        Ok(m)
    })();
    let _ = fs::remove_dir_all(&staging);
    let manifest = match built {
        Ok(m) => m,
        Err(e) => {
            let err = crate::error::classify(&e);
            // Stage `failed` cannot be installed from: the package is of no further use.
            fsutil::remove_file_durable(&pkg)?;
            op.fail(&err)?;
            return Err(e);
        }
    };

    let svc: Vec<Service> = services::start_order(manifest.services());
    op.state.services = svc.clone();
    // A print may have started while we unpacked: look again before stopping anything.
    if let Err(e) = inhibit::check(g, Duration::ZERO) {
        fsutil::remove_tree_durable(&target)?;
        op.state.stage = Stage::ToInstall;
        op.state.step = None;
        op.state.progress = 100;
        op.state.message = format!("{}; the package waits", e.message());
        op.commit()?;
        return Err(e.into());
    }
    if signals::stop_requested().is_some() {
        // Nothing has changed for the running software yet: give the package back.
        fsutil::remove_tree_durable(&target)?;
        op.state.stage = Stage::ToInstall;
        op.state.step = None;
        op.state.progress = 100;
        op.state.message = "Install interrupted before any change; run install again".into();
        op.commit()?;
        return Ok(Output::interrupted(
            &op.state.message,
            op.state.progress_data(),
            EXIT_SIGTERM,
        ));
    }
    // Recorded only now, after the last chance to give the package back unchanged.
    set_step(op, "stop", 50, format!("Stopping {} service(s)", svc.len()))?;
    let mgr = Manager::new(&g.systemctl);
    failpoint::hit("before-stop");
    if let Err((e, _)) = mgr.stop_all(&svc) {
        return rolled_back(g, op, &mgr, e);
    }

    failpoint::hit("after-stop");
    // From here on, services are down: any failure rolls back instead of returning.
    let switched =
        set_step(op, "switch", 60, format!("Switching current to {version}")).and_then(|_| {
            failpoint::hit("before-switch");
            snapshot::switch(&root, old.as_deref(), &version)
        });
    if let Err(e) = switched {
        return rolled_back(g, op, &mgr, crate::error::classify(&e));
    }
    failpoint::hit("after-switch");

    if manifest.reboot {
        op.state.stage = Stage::Rebooting;
        set_step(op, "reboot", 70, format!("Rebooting into {version}"))?;
        if reboot(&g.reboot_cmd) {
            return Ok(Output::success(
                format!("version {version} switched in; rebooting\n"),
                op.state.progress_data(),
            ));
        }
        log::error!(
            "the reboot command {:?} failed; starting services instead",
            g.reboot_cmd
        );
        op.state.stage = Stage::Installing;
    }

    let out = finish_forward(g, op, &mgr)?;
    Ok(Output {
        human: format!(
            "installed version {version}{}\n",
            old.map(|o| format!(" (previous: {o})")).unwrap_or_default()
        ),
        ..out
    })
}

/// From the switch on, an install (or a rollback by hand) only goes forward: start the
/// services of `state.version`, check them, and finish with success; any failure rolls back.
/// Shared by install and by heal, which re-enters here after a crash or a reboot.
pub fn finish_forward(g: &Global, op: &mut Operation, mgr: &Manager) -> Result<Output> {
    let root = &g.versions_dir;
    let version = op.state.version.clone().unwrap_or_default();
    let svc = op.state.services.clone();
    op.state.stage = Stage::Installing;
    if let Err(e) = set_step(
        op,
        "start",
        70,
        format!("Starting {} service(s)", svc.len()),
    ) {
        return rolled_back(g, op, mgr, crate::error::classify(&e));
    }
    failpoint::hit("before-start");
    if let Err(e) = mgr.start_all(&svc) {
        return rolled_back(g, op, mgr, e);
    }
    if let Err(e) = set_step(op, "verify", 90, "Checking the services stay up".into()) {
        return rolled_back(g, op, mgr, crate::error::classify(&e));
    }
    if let Err(e) = mgr.check_all(&svc) {
        return rolled_back(g, op, mgr, e);
    }
    failpoint::hit("before-success");
    let installing = op.state.package_name.is_some();
    if installing {
        if let Some(name) = &op.state.package_name {
            fsutil::remove_file_durable(&g.state_dir.join(DOWNLOADS_DIR).join(name))?;
        }
        let removed = snapshot::prune(root)?;
        if !removed.is_empty() {
            log::info!("removed old snapshots {}", removed.join(", "));
        }
    }
    op.state.stage = Stage::Success;
    op.state.step = None;
    op.state.progress = 100;
    op.state.message = if installing {
        format!("Installed version {version}")
    } else {
        format!(
            "Rolled back to {version}; previous is now {}",
            op.state.previous_version.as_deref().unwrap_or("-")
        )
    };
    op.commit()?;
    failpoint::hit("after-success");
    Ok(Output::success(
        format!("{}\n", op.state.message),
        op.state.progress_data(),
    ))
}

/// Roll back after `original`, record the outcome and return it as this command's error.
fn rolled_back(
    g: &Global,
    op: &mut Operation,
    mgr: &Manager,
    original: OtaError,
) -> Result<Output> {
    let fin = auto_rollback(&g.versions_dir, op, mgr, original, Level::Previous)?;
    let pkg_name = op.state.package_name.clone().unwrap_or_default();
    let _ = fsutil::remove_file_durable(&g.state_dir.join(DOWNLOADS_DIR).join(pkg_name));
    Err(fin.into())
}
