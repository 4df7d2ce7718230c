//! `heal` and the crash-injection suite: SPEC section 4 "heal", durability rules of sections 3–4.

use crate::install::*;
use crate::support::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------- heal, case by case

#[test]
fn nothing_to_do_is_quiet_and_fast() {
    let d = Device::with_v1();
    let t = Instant::now();
    let run = d.env.run(&["heal"]);
    run.expect(0);
    assert_eq!(run.stdout, "", "heal with nothing to do prints nothing");
    assert_eq!(run.stderr, "");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(d.sc.calls().is_empty(), "no service touched");
    assert_eq!(d.env.state()["stage"], "success");
}

#[test]
fn corrupt_state_is_moved_aside_and_idle() {
    let d = Device::with_v1();
    std::fs::write(d.env.state_dir.join("state.json"), b"\0\0garbage").unwrap();
    let run = d.env.run(&["heal"]);
    run.expect(0);
    assert!(run.stdout.contains("moved aside"), "{}", run.stdout);
    assert_eq!(d.env.state()["stage"], "idle");
    let aside = std::fs::read_dir(&d.env.state_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("state.json.corrupt-")
        })
        .count();
    assert_eq!(aside, 1);
}

#[test]
fn stale_staging_and_temp_links_are_removed() {
    let d = Device::with_v1();
    let stage = d.root().join(".tope-ota-tmp-stage-99-1");
    std::fs::create_dir_all(stage.join("snapshot/bin")).unwrap();
    std::os::unix::fs::symlink("v1.0.0", d.root().join(".tope-ota-tmp-link-99-2")).unwrap();
    std::fs::write(d.env.state_dir.join(".tope-ota-tmp-state.json-99-3"), b"{").unwrap();
    let run = d.env.run(&["heal"]);
    run.expect(0);
    assert!(run.stdout.contains("removed 3 stale"), "{}", run.stdout);
    d.no_staging_left();
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
}

#[test]
fn current_pointing_nowhere_is_repaired_to_previous_then_factory() {
    let d = v2_with_factory();
    // current -> a snapshot that is gone.
    std::fs::remove_dir_all(d.root().join("v2.0.0")).unwrap();
    d.sc.clear();
    let run = d.env.run(&["heal"]);
    run.expect(0);
    assert!(
        run.stdout.contains("current points nowhere; now v1.0.0"),
        "{}",
        run.stdout
    );
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
    assert_eq!(
        d.sc.calls().last().map(String::as_str),
        Some("start printer-ui v1.0.0")
    );

    // Previous gone too: a fresh copy of factory.
    std::fs::remove_dir_all(d.root().join("v1.0.0")).unwrap();
    d.env.run(&["heal"]).expect(0);
    assert_eq!(d.link("current").as_deref(), Some("v0.9.0"));
    d.assert_current_is(&factory_files());
    assert_eq!(d.link("factory").as_deref(), Some("v0.9.0~factory"));
}

#[test]
fn pending_package_expires_after_24_hours() {
    let mut d = Device::with_v1();
    let (files, manifest) = v2_partial();
    let pkg = d.pack("2.0.0", &files, &manifest);
    d.download("2.0.0", pkg).expect(0);
    d.env.run(&["heal"]).expect(0);
    assert_eq!(d.env.state()["stage"], "toInstall", "a fresh package waits");
    let mut s = d.env.state();
    s["verified_at"] = json!("2001-01-01T00:00:00Z");
    std::fs::write(d.env.state_dir.join("state.json"), s.to_string()).unwrap();
    let run = d.env.run(&["heal"]);
    run.expect(0);
    assert!(run.stdout.contains("expired"), "{}", run.stdout);
    assert_eq!(d.env.state()["error"], "PACKAGE_EXPIRED");
    assert!(d.env.download_files().is_empty());
}

#[test]
fn failed_is_cleaned_up_to_idle_but_rollback_failed_stays() {
    let mut d = Device::with_v1();
    let wrong = Device::new();
    drop(wrong);
    let zip = raw_zip(&[RawEntry::file("manifest.json", b"{")]);
    d.deliver("2.0.0", zip).expect(1);
    assert_eq!(d.env.state()["stage"], "failed");
    let run = d.env.run(&["heal"]);
    run.expect(0);
    assert!(run.stdout.contains("cleaned up"), "{}", run.stdout);
    assert_eq!(d.env.state()["stage"], "idle");

    let mut s = d.env.state();
    s["stage"] = json!("failed");
    s["error"] = json!("ROLLBACK_FAILED");
    std::fs::write(d.env.state_dir.join("state.json"), s.to_string()).unwrap();
    d.env.run(&["heal"]).expect(0);
    assert_eq!(
        d.env.state()["error"],
        "ROLLBACK_FAILED",
        "waits for a person"
    );
}

#[test]
fn after_a_reboot_healthy_services_mean_success() {
    let mut d = Device::with_v1();
    d.env.set("TOPE_OTA_REBOOT_CMD", "true");
    let (files, mut manifest) = v2_partial();
    manifest["reboot"] = json!(true);
    let pkg = d.pack("2.0.0", &files, &manifest);
    d.deliver("2.0.0", pkg).expect(0);
    assert_eq!(d.env.state()["stage"], "rebooting");
    let run = d.env.run(&["heal"]);
    run.expect(0);
    assert_eq!(d.env.state()["stage"], "success", "{}", run.stdout);
    assert_eq!(
        d.sc.calls().last().map(String::as_str),
        Some("start device-api v2.0.0")
    );
}

#[test]
fn after_a_reboot_failing_services_roll_back() {
    let mut d = Device::with_v1();
    d.env.set("TOPE_OTA_REBOOT_CMD", "true");
    let (files, mut manifest) = v2_partial();
    manifest["reboot"] = json!(true);
    let pkg = d.pack("2.0.0", &files, &manifest);
    d.deliver("2.0.0", pkg).expect(0);
    d.sc.touch("fail-start-device-api@v2.0.0");
    d.env.run(&["heal"]).expect(0);
    let s = d.env.state();
    assert_eq!(s["stage"], "failed");
    assert_eq!(s["rollback"], "previous 1.0.0");
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
}

#[test]
fn interrupted_download_is_resumed_by_heal() {
    let env = Env::new();
    let bytes = data(4 << 20, 77);
    let md5 = md5_hex(&bytes);
    let srv = PkgServer::start(
        bytes.clone(),
        Behaviour {
            throttle: Some((64 * 1024, Duration::from_millis(10))),
            ..Behaviour::default()
        },
    );
    let url = srv.url("p.zip");
    let size = bytes.len().to_string();
    let mut child = env.spawn(&[
        "download",
        "--version",
        "5.0.0",
        "--url",
        &url,
        "--name",
        "p.zip",
        "--size",
        &size,
        "--md5",
        &md5,
    ]);
    env.wait_state(20, "progress 20", |s| s["progress"].as_u64() >= Some(20));
    kill(&child, libc::SIGKILL);
    child.wait().unwrap();
    srv.set(|b| b.throttle = None);
    let run = env.run(&["heal"]);
    run.expect(0);
    assert!(
        run.stdout.contains("resuming the download of 5.0.0"),
        "{}",
        run.stdout
    );
    assert_eq!(env.state()["stage"], "toInstall");
    assert!(srv.requests()[1].range().is_some());
    assert_eq!(std::fs::read(env.downloads().join("p.zip")).unwrap(), bytes);
}

// ---------------------------------------------------------------- crash injection

type Tree = BTreeMap<String, (Vec<u8>, u32)>;

/// Files (and symlinks) of a snapshot by relative path, without tope-ota's own `.tope-ota/`.
fn version_tree(dir: &Path) -> Tree {
    tree(dir)
        .into_iter()
        .filter(|(p, v)| !p.starts_with(".tope-ota") && v.0 != 'd')
        .map(|(p, v)| (p, (v.1, v.2 & 0o777)))
        .collect()
}

fn expect_tree(files: &[FileSpec]) -> Tree {
    files
        .iter()
        .map(|(p, c, m)| (p.to_string(), (c.to_vec(), *m)))
        .collect()
}

/// Two files of 1 MiB (text that deflates, random bytes) and a third for the next version.
fn blobs() -> &'static [Vec<u8>; 3] {
    static BLOBS: std::sync::OnceLock<[Vec<u8>; 3]> = std::sync::OnceLock::new();
    BLOBS.get_or_init(|| {
        let text: Vec<u8> = data(1 << 18, 40)
            .iter()
            .flat_map(|b| format!("G1 X{} Y{}\n", b % 10, b / 10).into_bytes())
            .take(1 << 20)
            .collect();
        [text, data(1 << 20, 41), data(1 << 20, 42)]
    })
}

fn data_manifest(version: &str) -> serde_json::Value {
    let mut m = full_manifest(version);
    m["modules"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "data", "src": "data", "dst": "data"}));
    m
}

/// 1.5.0: v1's files and two of the blobs, what a delta of 4.0.0 regenerates from.
fn v15_files() -> Vec<FileSpec> {
    let b = blobs();
    let mut files = v1_files();
    files.push(("data/a.bin", &b[0], 0o644));
    files.push(("data/b.bin", &b[1], 0o644));
    files
}

fn known_versions() -> BTreeMap<&'static str, Tree> {
    let v1 = expect_tree(&v1_files());
    let mut v2 = v1.clone();
    v2.insert(
        "bin/device-api".into(),
        (b"#!/bin/sh\necho api 2\n".to_vec(), 0o755),
    );
    let mut v3 = v1.clone();
    v3.insert(
        "bin/device-api".into(),
        (b"#!/bin/sh\necho api 3\n".to_vec(), 0o755),
    );
    let factory = expect_tree(&factory_files());
    [
        ("v1.0.0", v1),
        ("v2.0.0", v2),
        ("v3.0.0", v3),
        ("v0.9.0", factory),
        ("v1.5.0", expect_tree(&v15_files())),
    ]
    .into()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Scenario {
    /// install of 2.0.0 over 1.0.0 that succeeds
    Install,
    /// install of 2.0.0 whose service does not start: automatic rollback to 1.0.0
    InstallRollback,
    /// `rollback` by hand from 2.0.0 to 1.0.0
    ManualRollback,
    /// download of 3.0.0 (2 MiB, throttled)
    Download,
    /// delta download of 4.0.0 over 1.0.0: current's files regenerated, 2 MiB fetched
    /// (throttled) in ranges between them
    DeltaDownload,
}

const SCENARIOS: [Scenario; 5] = [
    Scenario::Install,
    Scenario::InstallRollback,
    Scenario::ManualRollback,
    Scenario::Download,
    Scenario::DeltaDownload,
];

/// A prepared device per scenario, copied for every crash so each starts from the same state.
struct Lab {
    base: Device,
    factory: FullTree,
    v3: Vec<u8>,
    v3_url: String,
    slow: PkgServer,
    /// 4.0.0 for the delta: v1's files and two blobs of 1 MiB, on a throttled server.
    v4: Vec<u8>,
    v4_srv: PkgServer,
}

impl Lab {
    fn new(s: Scenario) -> Lab {
        let mut d = Device::with_factory();
        let (files, manifest) = v2_partial();
        let pkg = d.pack("2.0.0", &files, &manifest);
        let v3 = d.pack(
            "3.0.0",
            &[("bin/device-api", b"#!/bin/sh\necho api 3\n", 0o755)],
            &json!({"version": "3.0.0", "modules": [{"name": "api", "src": "bin/device-api", "dst": "bin/device-api", "process_name": "device-api", "restart_order": 1}]}),
        );
        match s {
            Scenario::Install | Scenario::InstallRollback => {
                d.download("2.0.0", pkg).expect(0);
                if s == Scenario::InstallRollback {
                    d.sc.touch("fail-start-device-api@v2.0.0");
                }
            }
            Scenario::ManualRollback => {
                d.deliver("2.0.0", pkg).expect(0);
            }
            Scenario::Download => {}
            Scenario::DeltaDownload => {
                let pkg = d.pack("1.5.0", &v15_files(), &data_manifest("1.5.0"));
                d.deliver("1.5.0", pkg).expect(0);
                d.env.set("TOPE_OTA_DELTA", "always");
            }
        }
        // The log starts with what runs now: the services of current, started before.
        let cur = d.link("current").unwrap();
        std::fs::write(
            d.sc.dir.join("calls.log"),
            format!("start device-api {cur}\n"),
        )
        .unwrap();
        let srv = PkgServer::start(v3.clone(), Behaviour::default());
        let v3_url = srv.url("v3.zip");
        d.servers.push(srv);
        let slow = PkgServer::start(
            data(2 << 20, 5),
            Behaviour {
                throttle: Some((64 * 1024, Duration::from_millis(4))),
                ..Behaviour::default()
            },
        );
        // 4.0.0: 1.5.0 with a new blob between the two it keeps.
        let mut v4_files = v15_files();
        v4_files.push(("data/ab.bin", &blobs()[2], 0o644));
        let v4_manifest = data_manifest("4.0.0");
        let v4 = d.pack("4.0.0", &v4_files, &v4_manifest);
        let v4_srv = PkgServer::start(
            v4.clone(),
            Behaviour {
                throttle: Some((64 * 1024, Duration::from_millis(4))),
                ..Behaviour::default()
            },
        );
        Lab {
            factory: factory_tree(d.root()).unwrap(),
            base: d,
            v3,
            v3_url,
            slow,
            v4,
            v4_srv,
        }
    }

    /// A fresh copy of the prepared device.
    fn copy(&self) -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let st = Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", self.base.env.tmp.path().display()))
            .arg(tmp.path())
            .status()
            .unwrap();
        assert!(st.success());
        let old = self.base.env.tmp.path().to_string_lossy().into_owned();
        let new = tmp.path().to_string_lossy().into_owned();
        let vars = self
            .base
            .env
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.replace(&old, &new)))
            .collect();
        Env {
            state_dir: tmp.path().join("state"),
            versions_dir: tmp.path().join("versions"),
            tmp,
            vars,
            bin: self.base.env.bin.clone(),
            runner: self.base.env.runner.clone(),
        }
    }

    fn op_args(&self, s: Scenario) -> Vec<String> {
        match s {
            Scenario::Install | Scenario::InstallRollback => vec!["install".into()],
            Scenario::ManualRollback => vec!["rollback".into()],
            Scenario::Download => {
                let bytes = data(2 << 20, 5);
                vec![
                    "download".into(),
                    "--version".into(),
                    "3.0.0".into(),
                    "--url".into(),
                    self.slow.url("slow.zip"),
                    "--name".into(),
                    "slow.zip".into(),
                    "--size".into(),
                    bytes.len().to_string(),
                    "--md5".into(),
                    md5_hex(&bytes),
                ]
            }
            Scenario::DeltaDownload => vec![
                "download".into(),
                "--version".into(),
                "4.0.0".into(),
                "--url".into(),
                self.v4_srv.url("v4.zip"),
                "--name".into(),
                "v4.zip".into(),
                "--size".into(),
                self.v4.len().to_string(),
                "--md5".into(),
                md5_hex(&self.v4),
            ],
        }
    }
}

fn temp_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".tope-ota-tmp"))
                .collect()
        })
        .unwrap_or_default()
}

/// The version a snapshot dir holds (`v1.0.0`, `v0.9.0~2` -> `v0.9.0`).
fn version_key(dir: &str) -> &str {
    dir.split('~').next().unwrap_or(dir)
}

/// The invariants after a crash, a fault or a heal: state.json parses, `current` resolves to a
/// complete snapshot (every file matches its version) whose services run from it, `previous`
/// is intact, factory is unchanged (same entries, contents, modes and inodes). Returns a
/// description of the first violation.
fn check_device(
    env: &Env,
    versions: &BTreeMap<&str, Tree>,
    factory: &FullTree,
) -> Result<(), String> {
    env.try_state().ok_or("state.json does not parse")?;
    let root = &env.versions_dir;
    let cur = std::fs::read_link(root.join("current"))
        .map_err(|e| format!("no current: {e}"))?
        .to_string_lossy()
        .into_owned();
    if cur.ends_with("~factory") {
        return Err(format!("current points at the factory itself ({cur})"));
    }
    let cur_tree = version_tree(&root.join(&cur));
    match versions.get(version_key(&cur)) {
        Some(t) if *t == cur_tree => {}
        _ => {
            return Err(format!(
                "current -> {cur} is not a complete version: {:?}",
                cur_tree.keys()
            ))
        }
    }
    if let Ok(p) = std::fs::read_link(root.join("previous")) {
        let p = p.to_string_lossy().into_owned();
        if versions.get(version_key(&p)) != Some(&version_tree(&root.join(&p))) {
            return Err(format!("previous -> {p} is not intact"));
        }
    }
    if std::fs::read_link(root.join("factory")).ok().as_deref() != Some(Path::new("v0.9.0~factory"))
        || factory_tree(root)? != *factory
    {
        return Err("factory changed".into());
    }
    // Each unit runs, and runs the program current holds (a unit an install did not restart
    // runs from an older snapshot, with the same program).
    for (unit, prog) in [("device-api", "bin/device-api"), ("printer-ui", "bin/ui")] {
        let runs = std::fs::read_to_string(env.tmp.path().join(format!("systemctl/active-{unit}")))
            .map(|s| s.trim().to_string())
            .map_err(|_| format!("{unit} is not running (current {cur})"))?;
        let running = std::fs::read(root.join(&runs).join(prog)).ok();
        if running.is_none() || running != std::fs::read(root.join(&cur).join(prog)).ok() {
            return Err(format!("{unit} runs {runs}'s program, not current {cur}'s"));
        }
    }
    Ok(())
}

type FullTree = BTreeMap<String, (char, Vec<u8>, u32)>;

/// The factory snapshot's entries (kind, content, mode); panics if any file shares its inode.
fn factory_tree(root: &Path) -> Result<FullTree, String> {
    use std::os::unix::fs::MetadataExt;
    let dir = root.join("v0.9.0~factory");
    let mut out = FullTree::new();
    for (p, (k, c, m, _)) in tree(&dir) {
        if k == 'f'
            && std::fs::metadata(dir.join(&p))
                .map(|m| m.nlink())
                .unwrap_or(0)
                != 1
        {
            return Err(format!("factory file {p} shares its inode"));
        }
        out.insert(p, (k, c, m));
    }
    Ok(out)
}

/// [`check_device`] after a heal, and heal left no operation in flight and no temp files.
fn check(env: &Env, versions: &BTreeMap<&str, Tree>, factory: &FullTree) -> Result<(), String> {
    let s = env.try_state().ok_or("state.json does not parse")?;
    let stage = s["stage"].as_str().unwrap_or("?");
    if ["installing", "rebooting", "downloading", "verifying"].contains(&stage) {
        return Err(format!("heal left stage {stage}: {s}"));
    }
    check_device(env, versions, factory)?;
    for dir in [
        env.versions_dir.clone(),
        env.state_dir.clone(),
        env.downloads(),
    ] {
        let t = temp_names(&dir);
        if !t.is_empty() {
            return Err(format!("temp left in {}: {t:?}", dir.display()));
        }
    }
    Ok(())
}

/// A later download + install must work on the healed device.
fn later_update_works(env: &Env, lab: &Lab) -> Result<(), String> {
    let size = lab.v3.len().to_string();
    let md5 = md5_hex(&lab.v3);
    let run = env.run(&[
        "download",
        "--version",
        "3.0.0",
        "--url",
        &lab.v3_url,
        "--name",
        "v3.zip",
        "--size",
        &size,
        "--md5",
        &md5,
    ]);
    if run.code != 0 {
        return Err(format!("download after heal: {run:?}"));
    }
    // The fake keeps failing 2.0.0's start in the rollback scenario; 3.0.0 is fine.
    let run = env.run(&["install"]);
    if run.code != 0 {
        return Err(format!("install after heal: {run:?}"));
    }
    if std::fs::read_link(env.versions_dir.join("current"))
        .ok()
        .as_deref()
        != Some(Path::new("v3.0.0"))
    {
        return Err("current is not 3.0.0 after the later install".into());
    }
    Ok(())
}

fn heal_and_check(
    env: &Env,
    lab: &Lab,
    versions: &BTreeMap<&str, Tree>,
    full: bool,
    what: &str,
) -> Result<(), String> {
    // A child of the killed process caught between fork and exec still holds the lock for a
    // moment: heal then says BUSY (75), and the timer runs it again. So does this test.
    let mut run = env.run(&["heal"]);
    for _ in 0..50 {
        if run.code != 75 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        run = env.run(&["heal"]);
    }
    if run.code != 0 {
        return Err(format!("{what}: heal failed: {run:?}"));
    }
    check(env, versions, &lab.factory).map_err(|e| format!("{what}: {e}"))?;
    // A resumed delta gives the package itself.
    let st = env.state();
    if st["version"] == "4.0.0" {
        let got = std::fs::read(env.downloads().join("v4.zip")).ok();
        if st["stage"] != "toInstall" || got.as_deref() != Some(&lab.v4[..]) {
            return Err(format!(
                "{what}: the delta download was not resumed to the package: {st}"
            ));
        }
    }
    // The periodic heal converges: a second one at most cleans up after a recorded failure,
    // a third finds nothing to do.
    let second = env.run(&["heal"]);
    let third = env.run(&["heal"]);
    if second.code != 0 || third.code != 0 || !third.stdout.is_empty() {
        return Err(format!(
            "{what}: heal does not settle: {second:?} then {third:?}"
        ));
    }
    check(env, versions, &lab.factory).map_err(|e| format!("{what} (after more heals): {e}"))?;
    if full {
        later_update_works(env, lab).map_err(|e| format!("{what}: {e}"))?;
    }
    Ok(())
}

#[cfg(feature = "failpoints")]
#[test]
fn crash_at_every_failpoint_then_heal() {
    let versions = known_versions();
    let named: &[(Scenario, &[&str])] = &[
        (
            Scenario::Install,
            &[
                "after-unpack",
                "before-snapshot-rename",
                "after-snapshot-rename",
                "before-stop",
                "after-stop",
                "before-switch",
                "mid-switch",
                "after-switch",
                "before-start",
                "before-success",
                "after-success",
            ],
        ),
        (
            Scenario::InstallRollback,
            &["before-start", "rollback-previous", "mid-switch"],
        ),
        (
            Scenario::ManualRollback,
            &[
                "before-switch",
                "mid-switch",
                "after-switch",
                "before-start",
                "before-success",
            ],
        ),
        (
            Scenario::Download,
            &["download-before-rename", "download-after-rename"],
        ),
        (
            Scenario::DeltaDownload,
            &[
                "delta-checkpoint",
                "download-before-rename",
                "download-after-rename",
            ],
        ),
    ];
    let mut crashes = 0;
    let mut violations = Vec::new();
    for (scenario, points) in named {
        let lab = Lab::new(*scenario);
        let args = lab.op_args(*scenario);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cases: Vec<(String, u32)> = points.iter().map(|p| (p.to_string(), 1)).collect();
        if *scenario == Scenario::DeltaDownload {
            // The durable points of the assembly (5 % steps inside fetched ranges, each piece
            // that passes one).
            cases.extend((2..=10).map(|hit| ("delta-checkpoint".to_string(), hit)));
        }
        // Every durable state write, before and after its rename.
        for hit in 1..=30 {
            cases.push(("atomic-before-rename".into(), hit));
            cases.push(("atomic-after-rename".into(), hit));
        }
        for (point, hit) in cases {
            let mut env = lab.copy();
            env.set("TOPE_OTA_FAILPOINT", &point);
            env.set("TOPE_OTA_FAILPOINT_HIT", &hit.to_string());
            let run = env.run(&args);
            env.vars.remove("TOPE_OTA_FAILPOINT");
            env.vars.remove("TOPE_OTA_FAILPOINT_HIT");
            if run.code != 128 + libc::SIGKILL {
                assert!(
                    point.starts_with("atomic-"),
                    "{scenario:?}: fail point {point}#{hit} was never reached: {run:?}"
                );
                continue; // past the last state write of this operation
            }
            crashes += 1;
            let what = format!("{scenario:?} crashed at {point}#{hit}");
            if let Err(e) = heal_and_check(&env, &lab, &versions, true, &what) {
                violations.push(e);
            }
        }
    }
    println!(
        "crash_at_every_failpoint: {crashes} crashes, {} violations",
        violations.len()
    );
    assert!(violations.is_empty(), "{violations:#?}");
    assert!(crashes >= 60, "only {crashes} crashes");
}

#[test]
fn sigkill_at_random_instants_then_heal() {
    let points: usize = std::env::var("TOPE_OTA_CRASH_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let mut seed: u64 = std::env::var("TOPE_OTA_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5EED_2026);
    println!("sigkill_at_random_instants: seed {seed}, {points} kill points");
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let versions = known_versions();
    let labs: Vec<(Scenario, Lab, Duration)> = SCENARIOS
        .iter()
        .map(|s| {
            let lab = Lab::new(*s);
            // How long the operation takes uncrashed: the window to kill in.
            let env = lab.copy();
            let args = lab.op_args(*s);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let t = Instant::now();
            let run = env.run(&args);
            let took = t.elapsed();
            assert!(
                run.code == 0 || *s == Scenario::InstallRollback,
                "{s:?}: {run:?}"
            );
            (*s, lab, took)
        })
        .collect();
    let mut killed = 0;
    let mut finished_first = 0;
    let mut violations = Vec::new();
    let mut i = 0;
    while killed < points {
        i += 1;
        let (scenario, lab, window) = &labs[i % labs.len()];
        let env = lab.copy();
        let args = lab.op_args(*scenario);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let delay = Duration::from_micros(rand() % (window.as_micros() as u64).max(1));
        let mut child = env.spawn(&args);
        std::thread::sleep(delay);
        let was_running = child.try_wait().unwrap().is_none();
        kill(&child, libc::SIGKILL);
        let _ = child.wait();
        if !was_running {
            finished_first += 1;
            if finished_first > 10 * points {
                panic!("the kill window misses the operations");
            }
            continue;
        }
        killed += 1;
        let what = format!("{scenario:?} killed after {delay:?}");
        if let Err(e) = heal_and_check(&env, lab, &versions, killed % 10 == 0, &what) {
            violations.push(e);
        }
    }
    println!(
        "sigkill_at_random_instants: {killed} kills mid-operation ({finished_first} landed after the end), {} violations",
        violations.len()
    );
    assert!(violations.is_empty(), "{violations:#?}");
}

// ---------------------------------------------------------------- fsync ordering (ALICE-style)

#[derive(Debug, Clone)]
enum Sys {
    Sync(String),
    SyncFs,
    Rename(String, String),
    Symlink(String),
}

fn quoted(s: &str) -> Vec<String> {
    s.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

fn fd_path(s: &str) -> Option<String> {
    let open = s.find('<')?;
    let close = s[open..].find('>')? + open;
    Some(s[open + 1..close].to_string())
}

/// Completed, successful calls of an `strace -f -y` log, in completion order.
fn parse_strace(text: &str) -> Vec<Sys> {
    let mut pending: std::collections::HashMap<String, String> = Default::default();
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        let call = if let Some(head) = rest.strip_suffix("<unfinished ...>") {
            pending.insert(pid.to_string(), head.to_string());
            continue;
        } else if rest.starts_with("<...") {
            let Some(head) = pending.remove(pid) else {
                continue;
            };
            let tail = rest.split_once("resumed>").map(|x| x.1).unwrap_or("");
            format!("{head}{tail}")
        } else {
            rest.to_string()
        };
        if !call.trim_end().ends_with("= 0") {
            continue;
        }
        let name = call.split('(').next().unwrap_or("");
        let ev = match name {
            "fsync" | "fdatasync" => fd_path(&call).map(Sys::Sync),
            "syncfs" => Some(Sys::SyncFs),
            "rename" | "renameat" | "renameat2" => {
                let q = quoted(&call);
                (q.len() >= 2).then(|| Sys::Rename(q[0].clone(), q[1].clone()))
            }
            "symlink" | "symlinkat" => quoted(&call).last().cloned().map(Sys::Symlink),
            _ => None,
        };
        out.extend(ev);
    }
    out
}

fn parent(p: &str) -> String {
    Path::new(p)
        .parent()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// Every rename onto state.json, a snapshot dir, a symlink of the versions root or a verified
/// package is preceded by an fsync of what is renamed (for a symlink: of its directory after it
/// was created; for a snapshot tree: a syncfs) and followed by an fsync of the parent directory
/// before the next such rename into that directory.
/// syncfs(2) reports no writeback error before Linux 5.8: each file the install created (a link
/// count of 1; hard links to the old snapshot are durable already) and each directory of the
/// new snapshot must have been fsynced before the snapshot was renamed into place.
fn every_new_file_of_the_snapshot_is_fsynced(evs: &[Sys], snap: &Path) {
    use std::os::unix::fs::MetadataExt;
    let to = std::fs::canonicalize(snap)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let at = evs
        .iter()
        .position(|e| matches!(e, Sys::Rename(_, t) if *t == to))
        .expect("the snapshot was renamed into place");
    let Sys::Rename(from, _) = &evs[at] else {
        unreachable!()
    };
    let synced: std::collections::HashSet<&str> = evs[..at]
        .iter()
        .filter_map(|e| match e {
            Sys::Sync(p) => Some(p.as_str()),
            _ => None,
        })
        .collect();
    let mut checked = 0;
    for (rel, (kind, ..)) in tree(snap) {
        let m = std::fs::symlink_metadata(snap.join(&rel)).unwrap();
        if kind == 'd' || (kind == 'f' && m.nlink() == 1) {
            let staged = format!("{from}/{rel}");
            assert!(synced.contains(staged.as_str()), "{staged} was not fsynced");
            checked += 1;
        }
    }
    assert!(synced.contains(from.as_str()), "{from} was not fsynced");
    assert!(checked >= 3, "{checked}");
}

fn check_ordering(evs: &[Sys], watched: &[String]) -> Result<usize, String> {
    let mut checked = 0;
    for (i, ev) in evs.iter().enumerate() {
        let Sys::Rename(from, to) = ev else { continue };
        let dir = parent(to);
        // Renames onto temp names (a tree moved aside to be deleted) publish nothing.
        let onto_temp = Path::new(to)
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(".tope-ota-tmp"));
        if !watched.contains(&dir) || onto_temp {
            continue;
        }
        checked += 1;
        let before = &evs[..i];
        let created_at = before
            .iter()
            .rposition(|e| matches!(e, Sys::Symlink(p) if p == from));
        let synced = match created_at {
            Some(c) => before[c..]
                .iter()
                .any(|e| matches!(e, Sys::Sync(p) if *p == parent(from))),
            // A snapshot tree counts as synced by the fsync of its root, which comes last;
            // `every_new_file_of_the_snapshot_is_fsynced` checks the rest of it.
            None => before
                .iter()
                .any(|e| matches!(e, Sys::Sync(p) if p == from)),
        };
        if !synced {
            return Err(format!("rename {from} -> {to} without a prior fsync of it"));
        }
        let after = &evs[i + 1..];
        let dir_sync = after
            .iter()
            .position(|e| matches!(e, Sys::Sync(p) if *p == dir));
        let next_rename = after
            .iter()
            .position(|e| matches!(e, Sys::Rename(_, t) if parent(t) == dir));
        match (dir_sync, next_rename) {
            (Some(s), Some(r)) if s < r => {}
            (Some(_), None) => {}
            _ => {
                return Err(format!(
                    "rename {from} -> {to} not followed by an fsync of {dir}"
                ))
            }
        }
    }
    Ok(checked)
}

#[test]
fn renames_are_fsynced_before_and_after_under_strace() {
    assert!(
        Command::new("strace").arg("-V").output().is_ok(),
        "strace is needed (.ci/run installs it)"
    );
    let d = Device::with_factory();
    let (files, manifest) = v2_partial();
    let pkg = d.pack("2.0.0", &files, &manifest);
    let md5 = md5_hex(&pkg);
    let size = pkg.len().to_string();
    let srv = PkgServer::start(pkg, Behaviour::default());
    let url = srv.url("pkg.zip");
    let trace = d.env.tmp.path().join("trace.txt");
    let traced = |args: &[&str]| {
        let _ = std::fs::remove_file(&trace);
        let base = d.env.cmd(&[]);
        let st = Command::new("strace")
            .args([
                "-f",
                "-y",
                "-e",
                "trace=rename,renameat,renameat2,fsync,fdatasync,syncfs,symlink,symlinkat",
                "-o",
            ])
            .arg(&trace)
            .arg(BIN)
            .args(args)
            .env_clear()
            .envs(
                base.get_envs()
                    .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned()))),
            )
            .output()
            .unwrap();
        assert!(st.status.success(), "{args:?}: {st:?}");
        parse_strace(&std::fs::read_to_string(&trace).unwrap())
    };
    let canon = |p: &Path| {
        std::fs::canonicalize(p)
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    let watched = vec![
        canon(&d.env.state_dir),
        canon(&d.env.downloads()),
        canon(d.root()),
    ];
    let mut total = 0;
    for args in [
        vec![
            "download",
            "--version",
            "2.0.0",
            "--url",
            &url,
            "--name",
            "pkg.zip",
            "--size",
            &size,
            "--md5",
            &md5,
        ],
        vec!["install"],
        vec!["rollback"],
        vec!["rollback", "--to", "factory"],
    ] {
        let evs = traced(&args);
        if args == ["install"] {
            every_new_file_of_the_snapshot_is_fsynced(&evs, &d.root().join("v2.0.0"));
        }
        let n = check_ordering(&evs, &watched).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert!(n > 0, "{args:?}: no rename seen");
        total += n;
    }
    // The trace saw every kind: state.json, the verified package, a snapshot, symlinks.
    println!("fsync ordering: {total} renames checked");
    assert!(total >= 20, "{total}");
}

/// I/O errors from a failing disk (EIO at the N-th fsync, rename or symlink and every one after
/// it, as a disk that went bad stays bad) during an install and a manual rollback: right after
/// the failed command the device runs a complete snapshot; after a heal on a repaired disk it
/// has settled and takes a later update.
#[cfg(feature = "failpoints")]
#[test]
fn io_errors_at_every_fsync_rename_and_symlink_keep_current_running() {
    let versions = known_versions();
    let mut faults = 0;
    let mut violations = Vec::new();
    for scenario in [Scenario::Install, Scenario::ManualRollback] {
        let lab = Lab::new(scenario);
        let args = lab.op_args(scenario);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        for (op, upto) in [("fsync", 40), ("rename", 16), ("symlink", 6)] {
            for n in 1..=upto {
                let mut env = lab.copy();
                env.set("TOPE_OTA_FAULT", &format!("{op}:{n}"));
                let run = env.run(&args);
                env.vars.remove("TOPE_OTA_FAULT");
                if run.code == 0 {
                    continue; // the operation needed fewer such calls
                }
                faults += 1;
                let what = format!("{scenario:?} with EIO from {op} #{n} on");
                if let Err(e) = check_device(&env, &versions, &lab.factory) {
                    violations.push(format!("{what}, before heal: {e} ({run:?})"));
                    continue;
                }
                if let Err(e) = heal_and_check(&env, &lab, &versions, n % 4 == 0, &what) {
                    violations.push(e);
                }
            }
        }
    }
    println!(
        "io_errors: {faults} failed operations, {} violations",
        violations.len()
    );
    assert!(violations.is_empty(), "{violations:#?}");
    assert!(faults >= 60, "only {faults} operations met a fault");
}

/// A partial that DOWNLOAD_FAILED keeps survives heal (the network may come back after boot),
/// and the next download of the same package resumes it; 24 h without progress and heal
/// deletes it.
#[test]
fn heal_keeps_the_partial_of_a_failed_download_for_24_hours() {
    let mut env = Env::new();
    env.set("TOPE_OTA_RETRIES", "0");
    let bytes = data(3 << 20, 77);
    let md5 = md5_hex(&bytes);
    let srv = PkgServer::start(
        bytes.clone(),
        Behaviour {
            drop_once_at: Some(2 << 20),
            ..Behaviour::default()
        },
    );
    let size = bytes.len().to_string();
    let url = srv.url("p.zip");
    let args = [
        "download",
        "--version",
        "3.0.0",
        "--url",
        &url,
        "--name",
        "p.zip",
        "--size",
        &size,
        "--md5",
        &md5,
    ];
    let run = env.run(&args);
    run.expect(1);
    assert_eq!(env.state()["error"], "DOWNLOAD_FAILED");
    let part = env.downloads().join("p.zip.part");
    let kept = std::fs::metadata(&part).expect("the partial is kept").len();
    assert!(kept > 0);
    for _ in 0..2 {
        env.run(&["heal"]).expect(0);
        assert_eq!(
            std::fs::metadata(&part).unwrap().len(),
            kept,
            "heal threw the bytes away"
        );
        assert_eq!(env.state()["stage"], "failed");
    }
    env.vars.remove("TOPE_OTA_RETRIES");
    env.run(&args).expect(0);
    let ranges: Vec<_> = srv
        .requests()
        .iter()
        .filter_map(|r| r.range().map(str::to_string))
        .collect();
    assert!(
        !ranges.is_empty(),
        "the download did not resume: {:?}",
        srv.requests()
    );
    assert_eq!(std::fs::read(env.downloads().join("p.zip")).unwrap(), bytes);

    // Once more, and then a day without progress.
    let env = Env::new();
    let srv = PkgServer::start(
        bytes.clone(),
        Behaviour {
            drop_once_at: Some(1 << 20),
            ..Behaviour::default()
        },
    );
    let url = srv.url("p.zip");
    let mut env = env;
    env.set("TOPE_OTA_RETRIES", "0");
    let args = [
        "download",
        "--version",
        "3.0.0",
        "--url",
        &url,
        "--name",
        "p.zip",
        "--size",
        &size,
        "--md5",
        &md5,
    ];
    env.run(&args).expect(1);
    let mut s = env.state();
    s["progressed_at"] = json!("2001-01-01T00:00:00Z");
    std::fs::write(env.state_dir.join("state.json"), s.to_string()).unwrap();
    let run = env.run(&["heal"]);
    run.expect(0);
    assert!(
        run.stdout.contains("no progress for 24 h"),
        "{}",
        run.stdout
    );
    assert!(env.download_files().is_empty());
    assert_eq!(env.state()["stage"], "idle");
}
