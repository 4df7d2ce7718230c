//! `install`: the verified package becomes a new version snapshot and the running software,
//! with an automatic rollback (through [`crate::transition`]) when the new version does not
//! come up.

use super::{Operation, Output};
use crate::archive::{self, Limits};
use crate::cli::{Global, InstallArgs};
use crate::error::{fail, ErrorCode, OtaError, EXIT_SIGTERM};
use crate::manifest::{Manifest, MANIFEST};
use crate::services::{self, Manager, Service};
use crate::snapshot::{self, Links};
use crate::state::{Stage, DOWNLOADS_DIR};
use crate::transition::{self, set_step};
use crate::{clock, failpoint, fsutil, inhibit, integrity, signals, validate};
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
    let mut gui = Gui::none();
    let result = install(g, args, &mut op, &mut gui);
    gui.finish();
    op.finish();
    result
}

/// The optional progress screen: started detached once the install will run, never waited
/// for, never fatal.
pub struct Gui(Option<Screen>);

enum Screen {
    /// Our own child, when run from a shell.
    Child(Child),
    /// A transient unit of its own, when we run inside a systemd unit.
    Unit,
}

/// The transient unit the screen runs in when tope-ota itself runs under systemd.
const GUI_UNIT: &str = "tope-ota-gui.service";

/// Whether this process runs inside a systemd unit (serve's child, the heal timer). A child
/// of ours would then inherit that unit's sandbox: private /tmp, read-only /run, the syscall
/// filter and the cut capability set, so no display.
fn under_systemd() -> bool {
    std::env::var_os("INVOCATION_ID").is_some() && Path::new("/run/systemd/system").is_dir()
}

/// Run a short helper command, killed after `bound`; whether it exited 0.
fn run_bounded(cmd: &mut Command, bound: Duration) -> std::io::Result<bool> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()?;
    let until = std::time::Instant::now() + bound;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st.success());
        }
        if std::time::Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other(format!(
                "hung, killed after {bound:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Gui {
    /// No screen (yet).
    pub fn none() -> Gui {
        Gui(None)
    }

    fn launch(path: &Path) -> Gui {
        if !path.exists() {
            log::warn!(
                "no ota-gui at {}; installing without a progress screen",
                path.display()
            );
            return Gui(None);
        }
        if under_systemd() {
            // PID 1 starts it outside our sandbox; --no-block: never wait on the screen.
            let started = run_bounded(
                Command::new("systemd-run")
                    .args([
                        "--unit",
                        GUI_UNIT,
                        "--collect",
                        "--quiet",
                        "--no-block",
                        "--",
                    ])
                    .arg(path),
                Duration::from_secs(5),
            );
            return match started {
                Ok(true) => Gui(Some(Screen::Unit)),
                Ok(false) => {
                    // Most often the screen of an earlier install still runs in that unit.
                    log::warn!("ota-gui {}: systemd-run failed", path.display());
                    Gui(None)
                }
                Err(e) => {
                    log::warn!("ota-gui {}: systemd-run: {e}", path.display());
                    Gui(None)
                }
            };
        }
        match Command::new(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
        {
            Ok(c) => Gui(Some(Screen::Child(c))),
            Err(e) => {
                log::warn!("ota-gui {} did not start: {e}", path.display());
                Gui(None)
            }
        }
    }

    /// Take the screen down again: the install gave the package back (a print started).
    fn close(&mut self) {
        match self.0.take() {
            Some(Screen::Child(mut child)) => {
                // SAFETY: kill(2) on the GUI's own process group.
                unsafe {
                    libc::kill(-(child.id() as i32), libc::SIGTERM);
                }
                let _ = child.wait();
            }
            Some(Screen::Unit) => {
                let stopped = run_bounded(
                    Command::new("systemctl").args(["stop", "--no-block", GUI_UNIT]),
                    Duration::from_secs(5),
                );
                if !matches!(stopped, Ok(true)) {
                    log::warn!("ota-gui: could not stop {GUI_UNIT}");
                }
            }
            None => {}
        }
    }

    fn finish(mut self) {
        // Reaped if it already ended; a GUI still showing progress is left running.
        if let Some(Screen::Child(child)) = self.0.as_mut() {
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

/// Unpack, validate and build the snapshot in `staging/snapshot` (recorded, durable); returns
/// the manifest.
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
    set_step(op, "snapshot", 30, format!("Building snapshot v{version}"))?;

    let snap = staging.join("snapshot");
    fs::DirBuilder::new().mode(0o755).create(&snap)?;
    let mut list: Vec<Service> = Vec::new();
    let mut reuse = None;
    if let Some(cur) = current {
        let n = snapshot::mirror(cur, &snap)?;
        log::info!("mirrored {n} entries of {} by hard links", cur.display());
        list = snapshot::read_services(cur);
        match integrity::read(cur) {
            Ok(r) => reuse = r,
            Err(e) => log::warn!("{e:#}; every file of the new snapshot is hashed"),
        }
    }
    for md in &manifest.modules {
        place(&unpack.join(&md.src), &snap, &md.dst)?;
    }
    for s in manifest.services() {
        list.retain(|o| o.name != s.name);
        list.push(s);
    }
    snapshot::write_services(&snap, &list)?;
    let mutable = match (&manifest.mutable, &reuse) {
        (Some(m), _) => m.clone(),
        (None, Some(r)) => r.mutable.clone(),
        (None, None) => Vec::new(),
    };
    let rec = integrity::build(&snap, &mutable, current.zip(reuse.as_ref()))?;
    integrity::write(&snap, &rec)?;
    fsutil::sync_new_tree(&snap)?;
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

/// The install under a writer's lock; heal --auto-install calls it too.
pub fn install(
    g: &Global,
    args: &InstallArgs,
    op: &mut Operation,
    gui: &mut Gui,
) -> Result<Output> {
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
    let root = g.versions_dir.clone();
    let links = Links::read(&root);
    if !args.allow_downgrade {
        if let Some(cur) = links.current_version() {
            if validate::compare_versions(&version, cur) == std::cmp::Ordering::Less {
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
    // The install will run: now the progress screen may cover the device's own.
    *gui = Gui::launch(&g.gui);

    fsutil::ensure_dir(&root)?;
    fsutil::sweep_temp(&root)?;
    let target = snapshot::dir_name(&version);
    op.state.stage = Stage::Installing;
    op.state.error = None;
    op.state.rollback = None;
    op.state.rollback_cause = None;
    op.state.bytes_done = 0;
    op.state.bytes_total = 0;
    op.state.speed_bps = 0;
    op.state.eta_s = None;
    op.state.previous_version = links.current_version().map(str::to_string);
    op.state.previous_before = links.previous_version().map(str::to_string);
    op.state.from = links.current.clone();
    op.state.previous_from = links.previous.clone();
    op.state.target = Some(target.clone());
    op.state.services = Vec::new();
    set_step(op, "unpack", 0, format!("Unpacking {name}"))?;

    let target_path = root.join(&target);
    let staging = fsutil::temp_path(&root, "stage");
    let built = (|| -> Result<Manifest> {
        if fs::symlink_metadata(&target_path).is_ok() {
            if links.references(&target) {
                return fail(
                    ErrorCode::DeploymentFailed,
                    format!("version {version} is already installed (current, previous or factory); use rollback"),
                );
            }
            log::info!(
                "removing the unreferenced leftover {}",
                target_path.display()
            );
            fsutil::remove_tree_durable(&target_path)?;
        }
        fs::DirBuilder::new().mode(0o755).create(&staging)?;
        let current_dir = links.current.as_ref().map(|d| root.join(d));
        let m = build(op, &root, &pkg, &version, &staging, current_dir.as_deref())?;
        failpoint::hit("before-snapshot-rename");
        fsutil::rename_durable(&staging.join("snapshot"), &target_path)?;
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
    let gave_back = match inhibit::check(g, Duration::ZERO) {
        Err(e) => Some((format!("{}; the package waits", e.message()), Err(e))),
        Ok(()) if signals::stop_requested().is_some() => Some((
            "Install interrupted before any change; run install again".to_string(),
            Ok(()),
        )),
        Ok(()) => None,
    };
    if let Some((message, why)) = gave_back {
        // Nothing has changed for the running software yet: give the package back.
        gui.close();
        fsutil::remove_tree_durable(&target_path)?;
        op.state.stage = Stage::ToInstall;
        op.state.step = None;
        op.state.progress = 100;
        op.state.message = message;
        op.commit()?;
        why?;
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
        return Err(transition::failed(g, op, &mgr, e).into());
    }

    failpoint::hit("after-stop");
    // From here on, services are down: any failure falls back instead of returning.
    let from = op.state.from.clone();
    let switched =
        set_step(op, "switch", 60, format!("Switching current to {version}")).and_then(|_| {
            failpoint::hit("before-switch");
            snapshot::switch(&root, from.as_deref(), &target)
        });
    if let Err(e) = switched {
        return Err(transition::failed(g, op, &mgr, crate::error::classify(&e)).into());
    }
    failpoint::hit("after-switch");

    if manifest.reboot {
        op.state.stage = Stage::Rebooting;
        if let Err(e) = set_step(op, "reboot", 70, format!("Rebooting into {version}")) {
            return Err(transition::failed(g, op, &mgr, crate::error::classify(&e)).into());
        }
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

    let old = op.state.previous_version.clone();
    let out = transition::forward(g, op, &mgr, false)?;
    Ok(Output {
        human: format!(
            "installed version {version}{}\n",
            old.map(|o| format!(" (previous: {o})")).unwrap_or_default()
        ),
        ..out
    })
}
