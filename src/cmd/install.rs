//! `install`: the verified package becomes a new version snapshot and the running software,
//! with an automatic rollback (through [`crate::transition`]) when the new version does not
//! come up.

use crate::archive::{self, Limits};
use crate::cli::{Global, InstallArgs};
use crate::error::{fail, ErrorCode, OtaError, EXIT_SIGTERM};
use crate::gui::Gui;
use crate::lock::Purpose;
use crate::manifest::{HookCommand, Manifest, MANIFEST};
use crate::operation::Operation;
use crate::output::Output;
use crate::services::{self, Manager, Service};
use crate::snapshot::{self, Links};
use crate::state::{Stage, DOWNLOADS_DIR, PACKAGE_TTL_SECS};
use crate::transition::{self, set_step};
use crate::{clock, data, failpoint, fsutil, hooks, inhibit, integrity, signals, validate};
use anyhow::{Context, Result};
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

pub fn run(g: &Global, args: &InstallArgs) -> Result<Output> {
    let what = match &args.version {
        Some(v) => format!("an install of {v}"),
        None => "an install".to_string(),
    };
    let mut op = Operation::begin(g, &Purpose::long("install", what))?;
    let mut gui = Gui::none();
    let result = install(g, args, &mut op, &mut gui);
    gui.finish();
    op.finish();
    result
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
/// the manifest and the snapshot's mutable paths.
fn build(
    op: &mut Operation,
    root: &Path,
    pkg: &Path,
    version: &str,
    staging: &Path,
    current: Option<&Path>,
) -> Result<(Manifest, Vec<String>)> {
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
    let mut checks = Vec::new();
    let mut reuse = None;
    if let Some(cur) = current {
        match integrity::read(cur) {
            Ok(r) => reuse = r,
            // A newer tope-ota's record: which paths are the version's data cannot be read, and
            // guessing "none" would share them with the new snapshot. Refused, nothing changed.
            Err(e) if crate::error::has_code(&e, ErrorCode::SchemaTooNew) => {
                return Err(e);
            }
            Err(e) => log::warn!("{e:#}; every file of the new snapshot is hashed"),
        }
    }
    // The new version's data paths: its manifest's, else those of the version it replaces.
    let old_mutable = reuse
        .as_ref()
        .map(|r| r.mutable.clone())
        .unwrap_or_default();
    let mutable = manifest
        .mutable
        .clone()
        .unwrap_or_else(|| old_mutable.clone());
    if let Some(cur) = current {
        // Mutable data is carried once the services stopped; data the old version wrote that
        // the new one no longer calls mutable becomes a private copy, never a shared inode.
        let private: Vec<String> = old_mutable
            .iter()
            .filter(|p| !mutable.contains(p))
            .cloned()
            .collect();
        let n = snapshot::mirror(cur, &snap, &mutable, &private)?;
        log::info!("mirrored {n} entries of {} by hard links", cur.display());
        list = snapshot::read_services(cur);
        checks = hooks::read_checks(cur).unwrap_or_else(|e| {
            log::warn!("{e:#}; the new snapshot keeps only the package's health checks");
            Vec::new()
        });
    }
    for md in &manifest.modules {
        place(&unpack.join(&md.src), &snap, &md.dst)?;
    }
    for s in manifest.services() {
        list.retain(|o| o.name != s.name);
        list.push(s);
    }
    snapshot::write_services(&snap, &list)?;
    let checks = hooks::merge_checks(checks, &manifest);
    // The carry replaces whatever the package placed at a mutable path with the device's copy
    // (a module there is initial content): a service's program, or a command run as root,
    // there would be data a service wrote. Refused now, before anything stops.
    let mutable_of = |p: &str| {
        mutable
            .iter()
            .find(|m| crate::snapshot::within(p, std::slice::from_ref(*m)))
            .cloned()
    };
    for md in &manifest.modules {
        if md.process_name.is_none() && md.health.is_none() {
            continue;
        }
        if let Some(m) = mutable_of(&md.dst) {
            return fail(
                ErrorCode::ManifestInvalid,
                format!(
                    "module {:?} (a service or a health check) has its dst {:?} within the mutable path {m:?}: the device's copy of that data would replace it",
                    md.name, md.dst
                ),
            );
        }
    }
    let programs = checks
        .iter()
        .map(|c| (format!("health check of {}", c.module), c.command.clone()))
        .chain(
            manifest
                .migrate
                .iter()
                .map(|m| ("migrate".to_string(), m.argv())),
        );
    for (who, argv) in programs {
        let cmd = HookCommand::Argv(argv);
        if let Some(p) = cmd.snapshot_program() {
            if let Some(m) = mutable_of(&p) {
                return fail(
                    ErrorCode::ManifestInvalid,
                    format!(
                        "{who}: program {p:?} lies within the mutable path {m:?}: it would be the device's copy, data a service wrote, run as root"
                    ),
                );
            }
            if !snap.join(&p).is_file() {
                return fail(
                    ErrorCode::ManifestInvalid,
                    format!("{who}: program {p:?} is not a file of the new snapshot"),
                );
            }
        }
    }
    check_updater(&manifest, &snap, current, &mutable_of)?;
    hooks::write_checks(&snap, &checks)?;
    let data_bytes = data::prepare(current, &snap, &mutable)?;
    let free = fsutil::free_bytes(root)?;
    if data_bytes > 0 && free < data_bytes + data_bytes / 10 + (2 << 20) {
        return fail(
            ErrorCode::DiskFull,
            format!("carrying the mutable data needs {data_bytes} bytes and a margin; {free} free"),
        );
    }
    let rec = integrity::build(&snap, &mutable, current.zip(reuse.as_ref()))?;
    integrity::write(&snap, &rec)?;
    fsutil::sync_new_tree(&snap)?;
    Ok((manifest, mutable))
}

/// Once the services stopped and before the switch: carry the mutable data of `from` into the
/// new snapshot as private copies, then run the package's migration on them. Each step is
/// recorded first; heal undoes an install interrupted here (current never moved, and the old
/// version's data was only read).
///
/// The migration never runs inside the snapshot, where every other file is a hard link shared
/// with older versions (root appending to `bin/ui` there would change them too): it runs in a
/// private dir in the versions root that holds only the data, at the same relative paths, its
/// program taken from the new snapshot by absolute path. The data moves into the snapshot
/// afterwards; anything written outside the mutable paths fails the install, and so does a
/// change to the old version's own copy of the data.
#[allow(clippy::too_many_arguments)]
fn carry_and_migrate(
    g: &Global,
    op: &mut Operation,
    root: &Path,
    target: &str,
    version: &str,
    from: Option<&str>,
    mutable: &[String],
    migrate: Option<&HookCommand>,
) -> Result<()> {
    let snap = root.join(target);
    let work = fsutil::temp_path(root, "migrate");
    let ran = (|| -> Result<()> {
        // Where the data is carried to: the snapshot, or the migration's private dir.
        let dest = if migrate.is_some() {
            fs::DirBuilder::new()
                .mode(0o755)
                .create(&work)
                .with_context(|| format!("create dir {}", work.display()))?;
            data::stage_out(&snap, &work, mutable)?;
            work.clone()
        } else {
            snap.clone()
        };
        if let (Some(f), false) = (from, mutable.is_empty()) {
            set_step(
                op,
                "data",
                55,
                format!(
                    "Carrying {} mutable path(s) of {f} into {target}",
                    mutable.len()
                ),
            )?;
            failpoint::hit("before-data");
            let carried = data::carry(&root.join(f), &dest, mutable)?;
            log::info!(
                "carried the mutable data {} of {f} into {target}",
                carried.join(", ")
            );
        }
        let Some(m) = migrate else {
            return Ok(());
        };
        migrate_in(g, op, root, &snap, &work, version, from, mutable, m)
    })();
    if fs::symlink_metadata(&work).is_ok() {
        if let Err(e) = fs::remove_dir_all(&work) {
            log::warn!("removing {}: {e}", work.display());
        }
    }
    ran?;
    if migrate.is_some() {
        // What the migration wrote is durable before anything runs on it.
        fsutil::sync_new_tree(&snap)?;
        failpoint::hit("after-migrate");
    }
    Ok(())
}

/// Run the package's migration in `work` (the data only), then move the data into `snap`.
#[allow(clippy::too_many_arguments)]
fn migrate_in(
    g: &Global,
    op: &mut Operation,
    root: &Path,
    snap: &Path,
    work: &Path,
    version: &str,
    from: Option<&str>,
    mutable: &[String],
    m: &HookCommand,
) -> Result<()> {
    set_step(
        op,
        "migrate",
        58,
        format!("Migrating the data of {version}"),
    )?;
    failpoint::hit("before-migrate");
    let mut env = vec![
        (
            "TOPE_OTA_SNAPSHOT",
            hooks::absolute(snap).to_string_lossy().into_owned(),
        ),
        (
            "TOPE_OTA_DATA",
            hooks::absolute(work).to_string_lossy().into_owned(),
        ),
        ("TOPE_OTA_VERSION", version.to_string()),
    ];
    // The old version's snapshot is not named: the data was copied already, and its own copy
    // is what a rollback to it will read.
    if let Some(f) = from {
        env.push((
            "TOPE_OTA_FROM_VERSION",
            snapshot::version_of(f).unwrap_or(f).to_string(),
        ));
    }
    let old_data = from.map(|f| root.join(f));
    let before = match &old_data {
        Some(d) => data::fingerprint(d, mutable)?,
        None => Vec::new(),
    };
    let argv = m.argv();
    let bound = g.migrate_timeout.or_at_least(
        "TOPE_OTA_MIGRATE_TIMEOUT",
        Duration::from_secs(300),
        crate::cli::MIN_TIMEOUT,
    );
    let ran = hooks::run_in(&argv, snap, work, &env, bound);
    let who = format!("migrate (`{}`)", argv.join(" "));
    // Whatever the outcome: the old version's data must be as it was, or the fall-back to it
    // must say that it is not.
    if let (Some(d), Some(f)) = (&old_data, from) {
        let changed = data::fingerprint_diff(&before, &data::fingerprint(d, mutable)?);
        if !changed.is_empty() {
            let more = changed.len().saturating_sub(5);
            return fail(
                ErrorCode::DeploymentFailed,
                format!(
                    "{who} changed the data of the old version {f} (its own copy, which a rollback to it reads): {}{}; that version now runs on the changed data",
                    changed[..changed.len().min(5)].join(", "),
                    if more > 0 { format!(" and {more} more") } else { String::new() }
                ),
            );
        }
    }
    if !ran.ok() {
        let out = ran.last_output();
        return fail(
            ErrorCode::DeploymentFailed,
            format!(
                "{who} {}{}",
                ran.describe(bound),
                if out.is_empty() {
                    ", no output".to_string()
                } else {
                    format!("; last output: {out}")
                }
            ),
        );
    }
    data::stage_in(work, snap, mutable).map_err(|e| {
        let err = crate::error::classify(&e);
        anyhow::Error::from(OtaError::new(err.code, format!("{who} {}", err.detail)))
    })?;
    // A migration changes the data, nothing else: a snapshot changed elsewhere (through
    // $TOPE_OTA_SNAPSHOT) would not be an intact rollback target later.
    let st = integrity::check(snap, integrity::Depth::Quick, false);
    if let integrity::Status::Changed(_) = st {
        return fail(
            ErrorCode::DeploymentFailed,
            format!(
                "after {who} the new snapshot's files outside the mutable paths differ from its record: {}",
                st.summary()
            ),
        );
    }
    Ok(())
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

    // The version current runs: success with nothing to do, unless asked to install it again.
    if links.current_version() == Some(version.as_str()) && !args.reinstall {
        fsutil::remove_file_durable(&pkg)?;
        op.state.stage = Stage::Success;
        op.state.error = None;
        op.state.step = None;
        op.state.progress = 100;
        op.state.message = format!(
            "Version {version} already runs; nothing to do (the package was deleted; install --reinstall installs it again)"
        );
        op.commit()?;
        return Ok(Output::success(
            format!("version {version} already runs; nothing to do\n"),
            op.state.progress_data(),
        ));
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
    // A version a link already holds (current for --reinstall, previous, factory) is built
    // fresh, the usual way, under a new dir name (`v<version>~<n>`, above every kept `n`): the
    // snapshot a link points to is never reused nor rebuilt in place.
    // An unreferenced leftover plain `v<version>` is rebuilt under its name only while no
    // `~n` snapshot of the version is kept: the plain name stays the oldest.
    let plain = snapshot::dir_name(&version);
    let target = if links.references(&plain) || snapshot::max_suffix(&root, &version).is_some() {
        snapshot::fresh_dir_name(&root, &version)
    } else {
        plain
    };
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
    let built = (|| -> Result<(Manifest, Vec<String>)> {
        if fs::symlink_metadata(&target_path).is_ok() {
            if links.references(&target) {
                return fail(
                    ErrorCode::DeploymentFailed,
                    format!("{target} is in use (current, previous or factory)"),
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
    let (manifest, mutable) = match built {
        Ok(m) => m,
        Err(e) => {
            let err = crate::error::classify(&e);
            // Stage `failed` cannot be installed from: the package is of no further use.
            fsutil::remove_file_durable(&pkg)?;
            op.fail(&err)?;
            return Err(e);
        }
    };

    let mut svc: Vec<Service> = manifest.services();
    let carries = links.current.is_some() && (!mutable.is_empty() || manifest.migrate.is_some());
    if carries {
        // Data is carried only from a quiet version: every service of current stops, not only
        // the package's (any of them may write the data), and all start again.
        if let Some(c) = &links.current {
            svc.extend(snapshot::read_services(&root.join(c)));
        }
    }
    let svc = services::start_order(svc);
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
    // The package's updater, if it brings a new one, is tried before anything stops: a bad one
    // costs the release and nothing else.
    if let Err(e) = crate::trial::begin(g, op, &target_path, &target, &version) {
        let err = crate::error::classify(&e);
        gui.close();
        fsutil::remove_tree_durable(&target_path)?;
        fsutil::remove_file_durable(&pkg)?;
        op.fail(&err)?;
        return Err(e);
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
    let carried = carry_and_migrate(
        g,
        op,
        &root,
        &target,
        &version,
        from.as_deref(),
        &mutable,
        manifest.migrate.as_ref(),
    );
    if let Err(e) = carried {
        return Err(transition::failed(g, op, &mgr, crate::error::classify(&e)).into());
    }
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

/// The updater's path in the new snapshot, once every module is placed: no data path; a file
/// there only from the module that says `"updater": true`, checked to be a program this device
/// runs and recorded (`.tope-ota/updater.json`), or the very file of `current` (mirrored, its
/// record carried over). Anything else is refused before anything stops (`MANIFEST_INVALID`,
/// `PACKAGE_INVALID`).
fn check_updater(
    manifest: &Manifest,
    snap: &Path,
    current: Option<&Path>,
    mutable_of: &dyn Fn(&str) -> Option<String>,
) -> Result<()> {
    use crate::manifest::UPDATER_DST;
    use std::os::unix::fs::MetadataExt;
    if let Some(m) = mutable_of(UPDATER_DST) {
        let whose = if manifest.mutable.is_some() {
            "the manifest's"
        } else {
            "current's (the manifest names none)"
        };
        return fail(
            ErrorCode::ManifestInvalid,
            format!(
                "the updater's path {UPDATER_DST:?} lies within {whose} mutable path {m:?}: it would be data a service writes"
            ),
        );
    }
    let path = snap.join(UPDATER_DST);
    let bin_is_link =
        fs::symlink_metadata(snap.join("bin")).is_ok_and(|m| m.file_type().is_symlink());
    if bin_is_link && fs::metadata(&path).is_ok() {
        return fail(
            ErrorCode::ManifestInvalid,
            format!("bin is a symlink in the new snapshot and {UPDATER_DST:?} resolves through it"),
        );
    }
    if let Some(md) = manifest.updater() {
        let checked = crate::updater::check_binary(&path, &md.name, &md.src)?;
        return crate::updater::write_record(snap, &checked);
    }
    let Ok(placed) = fs::symlink_metadata(&path) else {
        return Ok(());
    };
    let cur = current.map(|c| c.join(UPDATER_DST));
    let mirrored = cur
        .as_ref()
        .and_then(|c| fs::symlink_metadata(c).ok())
        .is_some_and(|m| (m.dev(), m.ino()) == (placed.dev(), placed.ino()));
    if !mirrored {
        return fail(
            ErrorCode::ManifestInvalid,
            format!(
                "{UPDATER_DST:?} in the new snapshot comes from a module without \"updater\": true (through a directory it places or a symlink)"
            ),
        );
    }
    // current's own updater, kept: so is what was checked of it (none for a file from before).
    match current.and_then(crate::updater::read_record) {
        Some(rec) => crate::updater::write_record(snap, &rec),
        None => Ok(()),
    }
}
