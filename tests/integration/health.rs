//! Issue 13: health checks before a version is committed, and the device's data (`mutable`
//! paths) carried privately across installs and restored by rollbacks.

use crate::install::*;
use crate::support::*;
use serde_json::{json, Value};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

/// device-api's health check, shipped in every test version. Driven by files in `$TEST_DIR`:
/// `sick-<version>` fails with device-api's answer, `hang-<version>` hangs (its `sleep` pid in
/// `hang.pid`), `fail-first` fails the first run. Every run is logged to `check.log`.
const CHECK_API: &[u8] = br#"#!/bin/sh
n=$(cat "$TEST_DIR/check-count" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "$TEST_DIR/check-count"
echo "check $n of $TOPE_OTA_VERSION in $(pwd)" >> "$TEST_DIR/check.log"
if [ -e "$TEST_DIR/sick-$TOPE_OTA_VERSION" ]; then
  echo "GET /api/v1.0/status: 500"; echo "printer-ui: mainboard unreachable" >&2; exit 1
fi
if [ -e "$TEST_DIR/hang-$TOPE_OTA_VERSION" ]; then sleep 60 & echo $! > "$TEST_DIR/hang.pid"; wait; fi
if [ -e "$TEST_DIR/fail-first" ] && [ "$n" -lt 2 ]; then echo "device-api: not ready yet"; exit 1; fi
exit 0
"#;

/// A device whose health checks and migrations can read `$TEST_DIR`, with short health bounds.
fn device() -> Device {
    let mut d = Device::new();
    let dir = d.env.tmp.path().to_str().unwrap().to_string();
    d.env
        .set("TEST_DIR", &dir)
        .set("TOPE_OTA_HEALTH_DEADLINE", "500ms")
        .set("TOPE_OTA_HEALTH_INTERVAL", "50ms");
    d
}

fn tmp(d: &Device, name: &str) -> std::path::PathBuf {
    d.env.tmp.path().join(name)
}

fn touch(d: &Device, name: &str) {
    std::fs::write(tmp(d, name), b"").unwrap();
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The checks logged so far, as `(version, snapshot dir name)`.
fn checks_run(d: &Device) -> Vec<(String, String)> {
    std::fs::read_to_string(tmp(d, "check.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let dir = Path::new(w[5]).file_name().unwrap().to_string_lossy();
            (w[3].to_string(), dir.into_owned())
        })
        .collect()
}

/// v1's files, a health check and the device's data (initial content at the mutable `data`).
fn v1_data_files() -> Vec<FileSpec> {
    let mut f = v1_files();
    f.push(("bin/check-api", CHECK_API, 0o755));
    f.push(("data/settings.json", b"format=1 cal=0.00\n", 0o644));
    f.push(("data/jobs/1.json", b"job 1", 0o644));
    f
}

/// full_manifest with device-api's health check, and `data` mutable.
fn v1_data_manifest(version: &str) -> Value {
    let mut m = full_manifest(version);
    m["modules"][0]["health"] = json!("bin/check-api");
    let mods = m["modules"].as_array_mut().unwrap();
    mods.push(json!({"name": "check", "src": "bin/check-api", "dst": "bin/check-api"}));
    mods.push(json!({"name": "data", "src": "data", "dst": "data"}));
    m["mutable"] = json!(["data"]);
    m
}

/// A device-api-only package: its own check, no `mutable` (inherited), optional extras.
fn v2_checked(version: &str, extra: Value) -> (Vec<FileSpec>, Value) {
    let api: &'static [u8] = Box::leak(
        format!("#!/bin/sh\necho api {version}\n")
            .into_bytes()
            .into_boxed_slice(),
    );
    let mut m = json!({"version": version, "modules": [
        {"name": "api", "src": "bin/device-api", "dst": "bin/device-api", "process_name": "device-api", "restart_order": 1, "health": "bin/check-api"},
        {"name": "check", "src": "bin/check-api", "dst": "bin/check-api"}
    ]});
    if let Value::Object(x) = extra {
        for (k, v) in x {
            m[k] = v;
        }
    }
    (
        vec![
            ("bin/device-api", api, 0o755),
            ("bin/check-api", CHECK_API, 0o755),
        ],
        m,
    )
}

/// 1.0.0 with its check and data installed.
fn with_data() -> Device {
    let mut d = device();
    let pkg = d.pack("1.0.0", &v1_data_files(), &v1_data_manifest("1.0.0"));
    d.deliver("1.0.0", pkg).expect(0);
    d.sc.clear();
    let _ = std::fs::remove_file(tmp(&d, "check.log"));
    let _ = std::fs::remove_file(tmp(&d, "check-count"));
    d
}

fn install_v2(d: &mut Device, extra: Value) -> Run {
    let (files, m) = v2_checked("2.0.0", extra);
    let pkg = d.pack("2.0.0", &files, &m);
    d.deliver("2.0.0", pkg)
}

#[track_caller]
fn assert_rolled_back_to_v1(d: &Device, run: &Run, code: &str) {
    run.expect(1);
    assert!(
        run.stderr.contains(&format!("error: {code}: ")),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("rolled back to previous 1.0.0"),
        "{}",
        run.stderr
    );
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
    assert_eq!(d.sc.running("device-api").as_deref(), Some("v1.0.0"));
    let s = d.env.state();
    assert_eq!(s["stage"], "failed");
    assert_eq!(s["error"], code);
    assert_eq!(s["rollback"], "previous 1.0.0");
    assert!(!d.root().join("v2.0.0").exists());
}

// ---------------------------------------------------------------- health checks

#[test]
fn active_service_with_a_failing_health_check_ends_on_the_previous_version() {
    let mut d = with_data();
    touch(&d, "sick-2.0.0");
    let t = Instant::now();
    let run = install_v2(&mut d, json!({}));
    assert_rolled_back_to_v1(&d, &run, "HEALTH_CHECK_FAILED");
    // The service started on 2.0.0 and was active when the checks ran (else the code would
    // be SERVICE_START_FAILED): only the check failed, retried until the deadline.
    assert!(
        d.sc.calls()
            .contains(&"start device-api v2.0.0".to_string()),
        "{:?}",
        d.sc.calls()
    );
    let runs = checks_run(&d);
    assert!(runs.len() >= 3, "retried within the deadline: {runs:?}");
    assert!(
        runs.iter().all(|r| *r == ("2.0.0".into(), "v2.0.0".into())),
        "{runs:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    // The message names the check and ends with its last output.
    let msg = d.env.state()["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("health check of api (`bin/check-api`) exited 1")
            && msg.contains(
                "last output: GET /api/v1.0/status: 500 | printer-ui: mainboard unreachable"
            ),
        "{msg}"
    );
    assert!(
        run.stderr.contains("mainboard unreachable"),
        "{}",
        run.stderr
    );
    // status (and GET /progress) show the code.
    let st = d.env.run(&["--json", "status"]).json();
    assert_eq!(st["error"], "HEALTH_CHECK_FAILED");
}

#[test]
fn hanging_health_check_is_killed_at_its_bound_with_its_children() {
    let mut d = with_data();
    d.env
        .set("TOPE_OTA_HEALTH_TIMEOUT", "300ms")
        .set("TOPE_OTA_HEALTH_DEADLINE", "700ms");
    touch(&d, "hang-2.0.0");
    let t = Instant::now();
    let run = install_v2(&mut d, json!({}));
    let took = t.elapsed();
    assert_rolled_back_to_v1(&d, &run, "HEALTH_CHECK_FAILED");
    assert!(
        run.stderr
            .contains("hung and was killed with its process group at its bound of 0.3 s"),
        "{}",
        run.stderr
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    // The check's own child (sleep 60) went with it.
    let pid = read(&tmp(&d, "hang.pid")).trim().to_string();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.rsplit(')').next().unwrap().trim().starts_with('Z'),
        "the check's child {pid} still runs: {stat}"
    );
}

#[cfg(feature = "failpoints")]
#[test]
fn when_no_level_holds_after_a_failed_health_check_the_message_says_the_new_version_still_runs() {
    let mut d = with_data();
    touch(&d, "sick-2.0.0");
    // Symlink calls: the install's switch makes two (previous, current); the third, the switch
    // back to 1.0.0, fails (a bad disk), and there is no factory: the last resort keeps the
    // unhealthy 2.0.0, whose services run, serving.
    d.env.set("TOPE_OTA_FAULT", "symlink:3");
    let run = install_v2(&mut d, json!({}));
    run.expect(1);
    d.env.vars.remove("TOPE_OTA_FAULT");
    assert_eq!(d.link("current").as_deref(), Some("v2.0.0"));
    assert_eq!(d.sc.running("device-api").as_deref(), Some("v2.0.0"));
    let s = d.env.state();
    assert_eq!(s["error"], "HEALTH_CHECK_FAILED", "{s}");
    assert_eq!(
        s["rollback"], "the new version 2.0.0, which failed, still runs",
        "{s}"
    );
    let msg = s["message"].as_str().unwrap();
    assert!(
        msg.contains("; no rollback level held (to previous 1.0.0: ")
            && msg.contains("no factory version")
            && msg.ends_with("; the new version 2.0.0, which failed, still runs"),
        "{msg}"
    );
    assert!(!msg.contains("rolled back"), "{msg}");
    assert!(
        run.stderr
            .contains("the new version 2.0.0, which failed, still runs"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_daemon_a_health_check_leaves_outside_its_group_is_killed() {
    let mut d = Device::with_v1();
    let check = tmp(&d, "leaves-daemon");
    let pidfile = tmp(&d, "daemon.pid");
    std::fs::write(
        &check,
        format!(
            "#!/bin/sh\nsetsid sh -c 'echo $$ > {p}; exec sleep 60' > /dev/null 2>&1 &\nwhile [ ! -s {p} ]; do sleep 0.05; done\nexit 0\n",
            p = pidfile.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&check, std::fs::Permissions::from_mode(0o755)).unwrap();
    d.env.set("TOPE_OTA_HEALTH_CMD", check.to_str().unwrap());
    let (files, manifest) = v2_partial();
    let pkg = d.pack("2.0.0", &files, &manifest);
    let run = d.deliver("2.0.0", pkg);
    run.expect(0);
    let pid = read(&pidfile).trim().to_string();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    if !stat.is_empty() {
        // SAFETY: ending the daemon this test's check started.
        unsafe { libc::kill(pid.parse().unwrap(), libc::SIGKILL) };
    }
    assert!(stat.is_empty(), "the daemon {pid} survived: {stat}");
    assert!(
        run.stderr
            .contains("left 1 process(es) behind outside its process group; killed"),
        "{}",
        run.stderr
    );
}

#[test]
fn health_check_passing_on_the_second_try_commits() {
    let mut d = with_data();
    touch(&d, "fail-first");
    let api = ApiStub::start(Duration::ZERO);
    d.env.set("TOPE_OTA_REPORT_URL", &api.url);
    install_v2(&mut d, json!({})).expect(0);
    assert_eq!(d.link("current").as_deref(), Some("v2.0.0"));
    assert_eq!(read(&tmp(&d, "check-count")).trim(), "2");
    let s = d.env.state();
    assert_eq!(s["stage"], "success");
    assert_eq!(s["error"], Value::Null);
    // device-api saw the health phase between the service check and success.
    let steps: Vec<String> = api
        .bodies()
        .iter()
        .filter_map(|b| b["data"]["step"].as_str().map(str::to_string))
        .collect();
    let at = |s: &str| {
        steps
            .iter()
            .position(|x| x == s)
            .unwrap_or_else(|| panic!("{s}: {steps:?}"))
    };
    assert!(at("verify") < at("health"), "{steps:?}");
}

#[test]
fn device_wide_health_check_from_the_configuration() {
    let mut d = Device::with_v1();
    let dir = d.env.tmp.path().to_str().unwrap().to_string();
    let check = tmp(&d, "device-check");
    std::fs::write(
        &check,
        "#!/bin/sh\necho \"$TOPE_OTA_VERSION $(pwd) $1\" >> \"$0.log\"\nif [ -e \"$0.sick\" ]; then echo 'device-api /status: 503'; exit 7; fi\n",
    )
    .unwrap();
    std::fs::set_permissions(&check, std::fs::Permissions::from_mode(0o755)).unwrap();
    d.env
        .set("TEST_DIR", &dir)
        .set(
            "TOPE_OTA_HEALTH_CMD",
            &format!("{} --quick", check.display()),
        )
        .set("TOPE_OTA_HEALTH_DEADLINE", "300ms")
        .set("TOPE_OTA_HEALTH_INTERVAL", "50ms");
    touch(&d, "device-check.sick");
    let (files, manifest) = v2_partial();
    let pkg = d.pack("2.0.0", &files, &manifest);
    let run = d.deliver("2.0.0", pkg);
    assert_rolled_back_to_v1(&d, &run, "HEALTH_CHECK_FAILED");
    assert!(
        run.stderr.contains("health check of device (--health-cmd)")
            && run.stderr.contains("exited 7")
            && run.stderr.contains("device-api /status: 503"),
        "{}",
        run.stderr
    );
    // Run from the new snapshot, with its arguments (split on whitespace).
    let log = read(&tmp(&d, "device-check.log"));
    let first = log.lines().next().unwrap();
    let snap = std::fs::canonicalize(d.root()).unwrap().join("v2.0.0");
    assert_eq!(first, format!("2.0.0 {} --quick", snap.display()));

    // Healthy: the same install commits.
    std::fs::remove_file(tmp(&d, "device-check.sick")).unwrap();
    let pkg = d.pack("2.0.0", &files, &manifest);
    d.deliver("2.0.0", pkg).expect(0);
    assert_eq!(d.link("current").as_deref(), Some("v2.0.0"));

    // It runs for every target: a rollback to a version that cannot pass it returns, unless
    // the technician turns it off for that run.
    touch(&d, "device-check.sick");
    let run = d.env.run(&["rollback"]);
    run.expect(1);
    assert!(run.stderr.contains("HEALTH_CHECK_FAILED"), "{}", run.stderr);
    assert_eq!(d.link("current").as_deref(), Some("v2.0.0"));
    d.env.run(&["heal"]).expect(0);
    d.env.run(&["--health-cmd", "", "rollback"]).expect(0);
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
}

#[test]
fn manual_rollback_and_heal_after_a_reboot_run_the_targets_own_checks() {
    let mut d = with_data();
    install_v2(&mut d, json!({})).expect(0);
    // 1.0.0's own check fails now; 2.0.0's passes: the rollback must use 1.0.0's.
    touch(&d, "sick-1.0.0");
    std::fs::write(tmp(&d, "check.log"), b"").unwrap();
    let run = d.env.run(&["rollback"]);
    run.expect(1);
    assert!(
        run.stderr.contains("error: HEALTH_CHECK_FAILED: "),
        "{}",
        run.stderr
    );
    assert_eq!(
        d.link("current").as_deref(),
        Some("v2.0.0"),
        "back where it was"
    );
    assert_eq!(d.sc.running("device-api").as_deref(), Some("v2.0.0"));
    assert_eq!(checks_run(&d)[0], ("1.0.0".into(), "v1.0.0".into()));
    std::fs::remove_file(tmp(&d, "sick-1.0.0")).unwrap();
    d.env.run(&["heal"]).expect(0);

    // A reboot package: heal after the reboot runs 3.0.0's checks before it commits.
    d.env.set("TOPE_OTA_REBOOT_CMD", "true");
    touch(&d, "sick-3.0.0");
    let (files, m) = v2_checked("3.0.0", json!({"reboot": true}));
    let pkg = d.pack("3.0.0", &files, &m);
    d.deliver("3.0.0", pkg).expect(0);
    assert_eq!(d.env.state()["stage"], "rebooting");
    std::fs::write(tmp(&d, "check.log"), b"").unwrap();
    d.env.run(&["heal"]).expect(0);
    let s = d.env.state();
    assert_eq!(s["error"], "HEALTH_CHECK_FAILED", "{s}");
    assert_eq!(s["rollback"], "previous 2.0.0");
    assert_eq!(d.link("current").as_deref(), Some("v2.0.0"));
    assert_eq!(checks_run(&d)[0], ("3.0.0".into(), "v3.0.0".into()));
}

#[test]
fn health_and_migrate_commands_are_checked_before_anything_stops() {
    let mut d = with_data();
    for (extra, why) in [
        (
            json!({"migrate": "bin/no-such-migration"}),
            "migrate: program \"bin/no-such-migration\" is not a file",
        ),
        (
            json!({"migrate": "../escape"}),
            "must be absolute, a bare name, or a clean relative path",
        ),
        (json!({"migrate": []}), "migrate: the command is empty"),
        (json!({"mutable": ["data", "data/jobs"]}), "overlap"),
        // `data` is mutable, inherited from 1.0.0: a program there would be the device's copy.
        (
            json!({"migrate": "data/migrate"}),
            "migrate: program \"data/migrate\" lies within the mutable path \"data\"",
        ),
        (
            json!({"mutable": ["bin/check-api"]}),
            "health check of api: program \"bin/check-api\" lies within the mutable path \"bin/check-api\"",
        ),
    ] {
        let run = install_v2(&mut d, extra);
        run.expect(1);
        assert!(
            run.stderr.contains("error: MANIFEST_INVALID: ") && run.stderr.contains(why),
            "{}",
            run.stderr
        );
        assert!(d.sc.calls().is_empty(), "{:?}", d.sc.calls());
        assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
    }
    // A service's module, or one with a health check, within a mutable path (inherited
    // `data`) would be replaced by the device's copy: refused before anything stops.
    for (module, why) in [
        (
            json!({"name": "daemon", "src": "extra/x", "dst": "data/daemon", "process_name": "data-daemon"}),
            "module \"daemon\" (a service or a health check) has its dst \"data/daemon\" within the mutable path \"data\"",
        ),
        (
            json!({"name": "checked", "src": "extra/x", "dst": "data/check", "health": "bin/check-api"}),
            "module \"checked\" (a service or a health check) has its dst \"data/check\" within the mutable path \"data\"",
        ),
    ] {
        let (mut files, mut m) = v2_checked("2.0.0", json!({}));
        files.push(("extra/x", b"#!/bin/sh\n", 0o755));
        m["modules"].as_array_mut().unwrap().push(module);
        let pkg = d.pack("2.0.0", &files, &m);
        let run = d.deliver("2.0.0", pkg);
        run.expect(1);
        assert!(
            run.stderr.contains("error: MANIFEST_INVALID: ") && run.stderr.contains(why),
            "{}",
            run.stderr
        );
        assert!(d.sc.calls().is_empty(), "{:?}", d.sc.calls());
        assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
    }
    // A data module (no service, no check) there is initial content: the carry replaces it
    // with the device's copy and logs each file it replaces.
    let (mut files, mut m) = v2_checked("2.0.0", json!({}));
    files.push(("seed/settings.json", b"format=1 cal=package\n", 0o644));
    m["modules"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "seed", "src": "seed/settings.json", "dst": "data/settings.json"}));
    let pkg = d.pack("2.0.0", &files, &m);
    d.download("2.0.0", pkg).expect(0);
    let run = d.env.run(&["-v", "install"]);
    run.expect(0);
    assert_eq!(
        read(&d.root().join("current/data/settings.json")),
        "format=1 cal=0.00\n"
    );
    assert!(
        run.stderr
            .contains("v1.0.0/data/settings.json replaces the package's")
            && run.stderr.contains("v2.0.0/data/settings.json"),
        "{}",
        run.stderr
    );
}

// ---------------------------------------------------------------- mutable data

/// The service writes its data in place, through `current`.
fn service_writes(d: &Device, rel: &str, what: &str) {
    use std::io::Write;
    let p = d.root().join("current").join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(p)
        .unwrap();
    f.write_all(what.as_bytes()).unwrap();
}

#[test]
fn mutable_data_is_carried_forward_isolated_and_restored_by_a_rollback() {
    let mut d = with_data();
    service_writes(&d, "data/settings.json", "format=1 cal=0.37\n");
    service_writes(&d, "data/jobs/2.json", "job 2");
    install_v2(&mut d, json!({})).expect(0);
    let (v1, v2) = (d.root().join("v1.0.0"), d.root().join("v2.0.0"));

    // Carried forward: the device's data, not the package's initial content.
    assert_eq!(read(&v2.join("data/settings.json")), "format=1 cal=0.37\n");
    assert_eq!(read(&v2.join("data/jobs/2.json")), "job 2");
    for p in ["data/settings.json", "data/jobs/1.json", "data/jobs/2.json"] {
        let (a, b) = (
            std::fs::metadata(v1.join(p)).unwrap(),
            std::fs::metadata(v2.join(p)).unwrap(),
        );
        assert_ne!(a.ino(), b.ino(), "{p} is shared with previous");
        assert_eq!(b.nlink(), 1, "{p}");
    }
    // Static files are still shared: only data is copied.
    assert_eq!(
        std::fs::metadata(v1.join("bin/ui")).unwrap().ino(),
        std::fs::metadata(v2.join("bin/ui")).unwrap().ino()
    );
    // Every service stopped before the copy, not only the package's: printer-ui may write too.
    let calls = d.sc.calls();
    assert!(
        calls.contains(&"stop printer-ui v1.0.0".to_string()),
        "{calls:?}"
    );
    assert_eq!(d.sc.running("printer-ui").as_deref(), Some("v2.0.0"));

    // 2.0.0 writes its data: previous does not see it, and verify stays clean.
    service_writes(
        &d,
        "data/settings.json",
        "format=1 cal=0.99 written-by=2.0.0\n",
    );
    service_writes(&d, "data/jobs/3.json", "job 3");
    std::fs::remove_file(d.root().join("current/data/jobs/1.json")).unwrap();
    assert_eq!(read(&v1.join("data/settings.json")), "format=1 cal=0.37\n");
    assert!(v1.join("data/jobs/1.json").exists());
    let v = d.env.run(&["verify", "--all"]);
    v.expect(0);
    assert!(!v.stdout.contains("changed"), "{}", v.stdout);

    // A rollback restores 1.0.0's own copy as it was when 1.0.0 was left.
    d.env.run(&["rollback"]).expect(0);
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
    let cur = d.root().join("current");
    assert_eq!(read(&cur.join("data/settings.json")), "format=1 cal=0.37\n");
    assert!(!cur.join("data/jobs/3.json").exists());
    assert!(cur.join("data/jobs/1.json").exists());
    // …and forward again: 2.0.0's copy as 2.0.0 left it.
    d.env.run(&["rollback"]).expect(0);
    assert_eq!(
        read(&d.root().join("current/data/settings.json")),
        "format=1 cal=0.99 written-by=2.0.0\n"
    );
}

const MIGRATE: &[u8] = br##"#!/bin/sh
# Logs that it ran to the fake systemctl's calls (to order it against the starts).
echo "migrate $TOPE_OTA_VERSION $(pwd)" >> "$TEST_DIR/systemctl/calls.log"
# Rewrites the carried copy in place (the same inode): it must be the new version's own.
old=$(cat data/settings.json)
printf '%s\n' "$old" | sed 's/format=1/format=2/' > data/.new
cat data/.new > data/settings.json; rm data/.new
echo "$TOPE_OTA_FROM_VERSION -> $TOPE_OTA_VERSION from=${TOPE_OTA_FROM_SNAPSHOT:-none}" >> data/migrations.log
if [ -e "$TEST_DIR/migrate-fails" ]; then echo "half done" > data/settings.json; echo "schema error at row 7" >&2; exit 2; fi
# A bug: relative writes meant for somewhere else (bin/ui is a hard link shared with current
# when run inside the snapshot).
if [ -e "$TEST_DIR/migrate-litters" ]; then echo scratch > scratch.db; printf x >> bin/ui 2>/dev/null; true; fi
# A bug: writing the old version's own copy of the data.
if [ -e "$TEST_DIR/migrate-writes-old" ]; then echo "format=2 by migrate" > "$TOPE_OTA_VERSIONS_DIR/v1.0.0/data/settings.json"; fi
# A bug: a new file in the snapshot itself (not shared: only the new version changes).
if [ -e "$TEST_DIR/migrate-writes-snapshot" ]; then echo scratch > "$TOPE_OTA_SNAPSHOT/scratch.db"; fi
if [ -e "$TEST_DIR/migrate-hangs" ]; then sleep 60 & echo $! > "$TEST_DIR/migrate-hang.pid"; wait; fi
exit 0
"##;

fn v2_migrating() -> (Vec<FileSpec>, Value) {
    let (mut files, mut m) = v2_checked("2.0.0", json!({"migrate": ["bin/migrate"]}));
    files.push(("bin/migrate", MIGRATE, 0o755));
    m["modules"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "migrate", "src": "bin/migrate", "dst": "bin/migrate"}));
    (files, m)
}

#[test]
fn a_migration_changes_the_new_copy_only() {
    let mut d = with_data();
    service_writes(&d, "data/settings.json", "format=1 cal=0.37\n");
    let (files, m) = v2_migrating();
    let pkg = d.pack("2.0.0", &files, &m);
    d.deliver("2.0.0", pkg).expect(0);
    let (v1, v2) = (d.root().join("v1.0.0"), d.root().join("v2.0.0"));
    assert_eq!(read(&v2.join("data/settings.json")), "format=2 cal=0.37\n");
    // The old version's snapshot is not handed to the migration (its data was copied).
    assert_eq!(
        read(&v2.join("data/migrations.log")),
        "1.0.0 -> 2.0.0 from=none\n"
    );
    assert_eq!(read(&v1.join("data/settings.json")), "format=1 cal=0.37\n");
    assert!(!v1.join("data/migrations.log").exists());
    // The migration ran once, after every stop and before anything started, outside the
    // snapshot (in a private dir of the versions root that held only the data).
    let calls = d.sc.calls();
    let at = |p: &str| calls.iter().position(|c| c.starts_with(p));
    let migrated = at("migrate 2.0.0").unwrap_or_else(|| panic!("{calls:?}"));
    assert_eq!(calls.iter().filter(|c| c.starts_with("migrate")).count(), 1);
    assert!(migrated < at("start ").unwrap(), "{calls:?}");
    assert!(migrated > calls.iter().rposition(|c| c.starts_with("stop ")).unwrap());
    let cwd = Path::new(calls[migrated].split_whitespace().nth(2).unwrap());
    let root = std::fs::canonicalize(d.root()).unwrap();
    assert_eq!(cwd.parent(), Some(root.as_path()), "{cwd:?}");
    assert!(!cwd.exists(), "the private dir is removed");
    d.env.run(&["verify", "--all"]).expect(0);
    // A downgrade never reads the newer format.
    d.env.run(&["rollback"]).expect(0);
    assert_eq!(
        read(&d.root().join("current/data/settings.json")),
        "format=1 cal=0.37\n"
    );
}

#[test]
fn a_migration_failing_halfway_rolls_back_with_the_data_untouched() {
    let mut d = with_data();
    service_writes(&d, "data/settings.json", "format=1 cal=0.37\n");
    touch(&d, "migrate-fails");
    let (files, m) = v2_migrating();
    let pkg = d.pack("2.0.0", &files, &m);
    let run = d.deliver("2.0.0", pkg);
    assert_rolled_back_to_v1(&d, &run, "DEPLOYMENT_FAILED");
    assert!(
        run.stderr.contains("migrate (`bin/migrate`) exited 2")
            && run.stderr.contains("last output: schema error at row 7"),
        "{}",
        run.stderr
    );
    let cur = d.root().join("current");
    assert_eq!(read(&cur.join("data/settings.json")), "format=1 cal=0.37\n");
    assert!(!cur.join("data/migrations.log").exists());
    // Nothing of 2.0.0 was ever started.
    assert!(
        d.sc.calls().iter().all(|c| !c.ends_with("v2.0.0")),
        "{:?}",
        d.sc.calls()
    );

    // A migration that succeeds but writes outside the mutable paths (a scratch file, and
    // `bin/ui`, which inside the snapshot would be a hard link shared with 1.0.0) is refused,
    // and 1.0.0 is untouched: the migration ran where only the data was.
    std::fs::remove_file(tmp(&d, "migrate-fails")).unwrap();
    touch(&d, "migrate-litters");
    let pkg = d.pack("2.0.0", &files, &m);
    let run = d.deliver("2.0.0", pkg);
    assert_rolled_back_to_v1(&d, &run, "DEPLOYMENT_FAILED");
    assert!(
        run.stderr
            .contains("migrate (`bin/migrate`) wrote outside the mutable paths data: ")
            && run.stderr.contains("scratch.db"),
        "{}",
        run.stderr
    );
    d.env.run(&["verify", "1.0.0"]).expect(0);
    assert_eq!(
        read(&d.root().join("v1.0.0/bin/ui")),
        "#!/bin/sh\necho ui 1\n"
    );
}

/// A device with a factory (0.9.0), 1.0.0 current with its data.
fn with_factory() -> Device {
    let mut d = device();
    let pkg = d.pack("0.9.0", &v1_data_files(), &v1_data_manifest("0.9.0"));
    d.deliver("0.9.0", pkg).expect(0);
    d.env.run(&["factory"]).expect(0);
    let pkg = d.pack("1.0.0", &v1_data_files(), &v1_data_manifest("1.0.0"));
    d.deliver("1.0.0", pkg).expect(0);
    service_writes(&d, "data/settings.json", "format=1 cal=user\n");
    d.sc.clear();
    d
}

#[test]
fn a_buggy_migration_on_a_device_with_a_factory_rolls_back_to_previous_with_its_data() {
    let mut d = with_factory();
    touch(&d, "migrate-litters");
    let (files, m) = v2_migrating();
    let pkg = d.pack("2.0.0", &files, &m);
    let run = d.deliver("2.0.0", pkg);
    // Not the factory's copy and its data: 1.0.0, unchanged, with the user's data.
    assert_rolled_back_to_v1(&d, &run, "DEPLOYMENT_FAILED");
    assert_eq!(
        read(&d.root().join("current/data/settings.json")),
        "format=1 cal=user\n"
    );
    d.env.run(&["verify", "--all"]).expect(0);

    // One that changes the new snapshot itself (through $TOPE_OTA_SNAPSHOT): caught by the
    // snapshot's record; 1.0.0 is intact, so the fall-back still prefers it to the factory.
    std::fs::remove_file(tmp(&d, "migrate-litters")).unwrap();
    touch(&d, "migrate-writes-snapshot");
    let pkg = d.pack("2.0.0", &files, &m);
    let run = d.deliver("2.0.0", pkg);
    assert_rolled_back_to_v1(&d, &run, "DEPLOYMENT_FAILED");
    assert!(
        run.stderr
            .contains("files outside the mutable paths differ from its record")
            && run.stderr.contains("scratch.db: added"),
        "{}",
        run.stderr
    );
    assert_eq!(
        read(&d.root().join("current/data/settings.json")),
        "format=1 cal=user\n"
    );
    d.env.run(&["verify", "--all"]).expect(0);
}

#[test]
fn a_migration_that_writes_the_old_versions_data_fails_and_says_so() {
    let mut d = with_data();
    touch(&d, "migrate-writes-old");
    let (files, m) = v2_migrating();
    let pkg = d.pack("2.0.0", &files, &m);
    let run = d.deliver("2.0.0", pkg);
    run.expect(1);
    assert!(
        run.stderr.contains("error: DEPLOYMENT_FAILED: migrate (`bin/migrate`) changed the data of the old version v1.0.0")
            && run.stderr.contains("data/settings.json")
            && run.stderr.contains("that version now runs on the changed data"),
        "{}",
        run.stderr
    );
    assert_eq!(d.env.state()["error"], "DEPLOYMENT_FAILED");
    assert!(!d.root().join("v2.0.0").exists());
}

#[test]
fn a_hanging_migration_is_killed_at_its_bound_and_rolls_back() {
    let mut d = with_data();
    d.env.set("TOPE_OTA_MIGRATE_TIMEOUT", "300ms");
    touch(&d, "migrate-hangs");
    let (files, m) = v2_migrating();
    let pkg = d.pack("2.0.0", &files, &m);
    let t = Instant::now();
    let run = d.deliver("2.0.0", pkg);
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert_rolled_back_to_v1(&d, &run, "DEPLOYMENT_FAILED");
    assert!(
        run.stderr.contains(
            "migrate (`bin/migrate`) hung and was killed with its process group at its bound of 0.3 s"
        ),
        "{}",
        run.stderr
    );
    let pid = read(&tmp(&d, "migrate-hang.pid")).trim().to_string();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.rsplit(')').next().unwrap().trim().starts_with('Z'),
        "the migration's child {pid} still runs: {stat}"
    );
    assert_eq!(
        read(&d.root().join("current/data/settings.json")),
        "format=1 cal=0.00\n"
    );
}

#[test]
fn rollback_to_factory_gets_the_factorys_own_data() {
    let mut d = device();
    let pkg = d.pack("0.9.0", &v1_data_files(), &v1_data_manifest("0.9.0"));
    d.deliver("0.9.0", pkg).expect(0);
    service_writes(&d, "data/settings.json", "format=1 cal=factory\n");
    d.env.run(&["factory"]).expect(0);
    let pkg = d.pack("1.0.0", &v1_data_files(), &v1_data_manifest("1.0.0"));
    d.deliver("1.0.0", pkg).expect(0);
    assert_eq!(
        read(&d.root().join("current/data/settings.json")),
        "format=1 cal=factory\n"
    );
    service_writes(&d, "data/settings.json", "format=1 cal=user\n");

    d.env.run(&["rollback", "--to", "factory"]).expect(0);
    let cur = d.link("current").unwrap();
    assert!(
        cur.starts_with("v0.9.0") && !cur.ends_with("~factory"),
        "{cur}"
    );
    let data = d.root().join(&cur).join("data/settings.json");
    assert_eq!(read(&data), "format=1 cal=factory\n");
    // The copy's data is writable by its service; the factory's own stays read-only and intact.
    assert_ne!(std::fs::metadata(&data).unwrap().mode() & 0o200, 0);
    service_writes(&d, "data/settings.json", "format=1 cal=after-reset\n");
    let f = d.root().join("v0.9.0~factory/data/settings.json");
    assert_eq!(read(&f), "format=1 cal=factory\n");
    assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o222, 0);
    d.env.run(&["verify", "--all"]).expect(0);
}

#[test]
fn mutable_paths_that_are_links_missing_or_beneath_a_link() {
    let mut d = with_data();
    // The device keeps its logs outside the versions root, through a link in its data.
    let outside = tmp(&d, "outside-logs");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("today.log"), b"printing").unwrap();
    std::os::unix::fs::symlink(&outside, d.root().join("current/data/logs")).unwrap();
    // 2.0.0 adds a mutable path current does not have: its initial content stays.
    let (mut files, mut m) = v2_checked("2.0.0", json!({"mutable": ["data", "etc/ui.json"]}));
    files.push(("etc/ui.json", b"{\"theme\":\"default\"}", 0o644));
    m["modules"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "etc", "src": "etc", "dst": "etc"}));
    let pkg = d.pack("2.0.0", &files, &m);
    d.deliver("2.0.0", pkg).expect(0);
    let v2 = d.root().join("v2.0.0");
    assert_eq!(
        std::fs::read_link(v2.join("data/logs")).unwrap(),
        outside,
        "carried as a link"
    );
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        1,
        "nothing written outside"
    );
    assert_eq!(read(&v2.join("etc/ui.json")), "{\"theme\":\"default\"}");

    // A mutable path beneath a symlink is refused before anything stops.
    d.sc.clear();
    let (mut files, mut m) = v2_checked("3.0.0", json!({"mutable": ["var/db"]}));
    files.push(("store/keep", b"", 0o644));
    m["modules"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "store", "src": "store", "dst": "store"}));
    let pkg = d.pack("3.0.0", &files, &m);
    // `var -> store`, a link that points down (allowed in a package).
    let pkg = with_symlink(&d, pkg, "var", "store");
    let run = d.deliver("3.0.0", pkg);
    run.expect(1);
    assert!(
        run.stderr.contains("error: DEPLOYMENT_FAILED: ")
            && run.stderr.contains("beneath the symlink"),
        "{}",
        run.stderr
    );
    assert!(d.sc.calls().is_empty(), "{:?}", d.sc.calls());
    assert_eq!(d.link("current").as_deref(), Some("v2.0.0"));
}

/// `pkg` (a ZIP from `pack`) with a symlink entry added, and a module that installs it.
fn with_symlink(d: &Device, pkg: Vec<u8>, name: &str, target: &str) -> Vec<u8> {
    let dir = d.env.tmp.path().join("relink");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("p.zip"), &pkg).unwrap();
    let st = std::process::Command::new("unzip")
        .args(["-q", "p.zip", "-d", "x"])
        .current_dir(&dir)
        .status()
        .unwrap();
    assert!(st.success());
    let x = dir.join("x");
    std::os::unix::fs::symlink(target, x.join(name)).unwrap();
    let mut m: Value =
        serde_json::from_slice(&std::fs::read(x.join("manifest.json")).unwrap()).unwrap();
    m["modules"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": name, "src": name, "dst": name}));
    std::fs::write(x.join("manifest.json"), m.to_string()).unwrap();
    let out = dir.join("out.zip");
    let version = m["version"].as_str().unwrap().to_string();
    d.env
        .run(&[
            "pack",
            "--version",
            &version,
            "--out",
            out.to_str().unwrap(),
            x.to_str().unwrap(),
        ])
        .expect(0);
    std::fs::read(out).unwrap()
}

// ---------------------------------------------------------------- crashes

#[cfg(feature = "failpoints")]
#[test]
fn crash_after_the_migration_or_during_the_checks_then_heal() {
    // Killed while carrying the data, before or after the migration (before the switch): heal
    // undoes the install (the old version and its data as they were); the next install
    // migrates a fresh copy, once.
    let mut d = with_data();
    service_writes(&d, "data/settings.json", "format=1 cal=0.37\n");
    let (files, m) = v2_migrating();
    let pkg = d.pack("2.0.0", &files, &m);
    d.download("2.0.0", pkg).expect(0);
    for (point, step) in [
        ("before-data", "data"),
        ("before-migrate", "migrate"),
        ("after-migrate", "migrate"),
    ] {
        d.env.set("TOPE_OTA_FAILPOINT", point);
        d.install().expect(128 + libc::SIGKILL);
        d.env.vars.remove("TOPE_OTA_FAILPOINT");
        assert_eq!(d.env.state()["step"], step);
        d.env.run(&["heal"]).expect(0);
        let s = d.env.state();
        assert_eq!(s["stage"], "toInstall", "{point}: {s}");
        assert!(
            s["message"]
                .as_str()
                .unwrap()
                .contains(&format!("interrupted at \"{step}\" and undone")),
            "{s}"
        );
        assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
        assert_eq!(d.sc.running("device-api").as_deref(), Some("v1.0.0"));
        assert_eq!(d.sc.running("printer-ui").as_deref(), Some("v1.0.0"));
        assert_eq!(
            read(&d.root().join("v1.0.0/data/settings.json")),
            "format=1 cal=0.37\n"
        );
        assert!(!d.root().join("v2.0.0").exists(), "{point}");
    }
    d.install().expect(0);
    let v2 = d.root().join("v2.0.0");
    assert_eq!(read(&v2.join("data/settings.json")), "format=2 cal=0.37\n");
    assert_eq!(
        read(&v2.join("data/migrations.log")).lines().count(),
        1,
        "migrated once"
    );

    // Killed while the checks run: heal restarts the services and runs the checks again
    // before it commits (3.0.0 healthy); a check that fails then rolls back (4.0.0 sick).
    for (version, sick, ends_on) in [("3.0.0", false, "v3.0.0"), ("4.0.0", true, "v3.0.0")] {
        let (files, m) = v2_checked(version, json!({}));
        let pkg = d.pack(version, &files, &m);
        d.download(version, pkg).expect(0);
        d.env.set("TOPE_OTA_FAILPOINT", "before-health");
        d.install().expect(128 + libc::SIGKILL);
        d.env.vars.remove("TOPE_OTA_FAILPOINT");
        assert_eq!(d.env.state()["step"], "health");
        if sick {
            touch(&d, &format!("sick-{version}"));
        }
        std::fs::write(tmp(&d, "check.log"), b"").unwrap();
        d.env.run(&["heal"]).expect(0);
        assert_eq!(d.link("current").as_deref(), Some(ends_on), "{version}");
        assert_eq!(checks_run(&d)[0].0, version);
        let s = d.env.state();
        assert_eq!(s["stage"], if sick { "failed" } else { "success" }, "{s}");
        assert_eq!(d.sc.running("device-api").as_deref(), Some(ends_on));
    }
}

#[cfg(feature = "failpoints")]
#[test]
fn power_cut_at_the_switch_after_the_data_was_copied_keeps_what_the_old_version_wrote_since() {
    for point in ["before-switch", "mid-switch"] {
        let mut d = with_data();
        // 1.0.0 -> 1.1.0 first, so that previous names a version to keep.
        let (files, m) = v2_checked("1.1.0", json!({}));
        let pkg = d.pack("1.1.0", &files, &m);
        d.deliver("1.1.0", pkg).expect(0);
        service_writes(&d, "data/settings.json", "format=1 cal=before-cut\n");
        let (files, m) = v2_checked("2.0.0", json!({}));
        let pkg = d.pack("2.0.0", &files, &m);
        d.download("2.0.0", pkg).expect(0);
        d.env.set("TOPE_OTA_FAILPOINT", point);
        d.install().expect(128 + libc::SIGKILL);
        d.env.vars.remove("TOPE_OTA_FAILPOINT");
        assert_eq!(d.env.state()["step"], "switch");
        assert_eq!(
            read(&d.root().join("v2.0.0/data/settings.json")),
            "format=1 cal=before-cut\n",
            "the copy was made"
        );
        // At boot the old version runs (current never moved) and writes, before heal.
        assert_eq!(d.link("current").as_deref(), Some("v1.1.0"));
        service_writes(&d, "data/settings.json", "format=1 cal=after-cut\n");
        let heal = d.env.run(&["heal"]);
        heal.expect(0);
        let s = d.env.state();
        assert_eq!(s["stage"], "toInstall", "{point}: {s}");
        assert!(
            s["message"]
                .as_str()
                .unwrap()
                .contains("interrupted at \"switch\" after its data was copied, and undone"),
            "{s}"
        );
        assert_eq!(d.link("current").as_deref(), Some("v1.1.0"), "{point}");
        assert_eq!(d.link("previous").as_deref(), Some("v1.0.0"), "{point}");
        assert_eq!(d.sc.running("device-api").as_deref(), Some("v1.1.0"));
        assert!(!d.root().join("v2.0.0").exists(), "{point}");
        // The next install carries what the old version wrote after the cut.
        d.install().expect(0);
        assert_eq!(
            read(&d.root().join("current/data/settings.json")),
            "format=1 cal=after-cut\n",
            "{point}"
        );
        assert_eq!(d.link("current").as_deref(), Some("v2.0.0"));
        assert_eq!(d.link("previous").as_deref(), Some("v1.1.0"));
    }
}

#[test]
fn checks_run_from_the_snapshot_with_a_relative_versions_dir() {
    let mut d = device();
    let pkg = d.pack("1.0.0", &v1_data_files(), &v1_data_manifest("1.0.0"));
    d.download("1.0.0", pkg).expect(0);
    // Started from the sandbox with `versions` relative to it.
    let run: Run = d
        .env
        .cmd(&["install"])
        .current_dir(d.env.tmp.path())
        .env("TOPE_OTA_VERSIONS_DIR", "versions")
        .output()
        .unwrap()
        .into();
    run.expect(0);
    let snap = std::fs::canonicalize(d.root().join("v1.0.0")).unwrap();
    let log = read(&tmp(&d, "check.log"));
    assert_eq!(
        log.trim(),
        format!("check 1 of 1.0.0 in {}", snap.display())
    );
}

#[test]
fn a_bad_duration_in_the_configuration_stops_nothing() {
    let mut d = Device::with_v1();
    // A typo in /etc/default/tope-ota must not turn heal (or anything else) off.
    d.env
        .set("TOPE_OTA_HEALTH_DEADLINE", "60 seconds")
        .set("TOPE_OTA_HEALTH_CMD", "true");
    let heal = d.env.run(&["heal"]);
    heal.expect(0);
    let (files, manifest) = v2_partial();
    let pkg = d.pack("2.0.0", &files, &manifest);
    let run = d.deliver("2.0.0", pkg);
    run.expect(0);
    assert!(
        run.stderr
            .contains("TOPE_OTA_HEALTH_DEADLINE: \"60 seconds\" is not a duration")
            && run.stderr.contains("using the default 60s"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_zero_timeout_is_a_mistake_warned_about_not_a_failure_of_every_install() {
    let mut d = with_data();
    d.env
        .set("TOPE_OTA_HEALTH_TIMEOUT", "0")
        .set("TOPE_OTA_MIGRATE_TIMEOUT", "0ms")
        .set("TOPE_OTA_HEALTH_DEADLINE", "1min");
    let (files, m) = v2_migrating();
    let pkg = d.pack("2.0.0", &files, &m);
    let run = d.deliver("2.0.0", pkg);
    run.expect(0);
    assert_eq!(d.link("current").as_deref(), Some("v2.0.0"));
    for w in [
        "TOPE_OTA_HEALTH_TIMEOUT: \"0\" is shorter than 100ms, which no command can run in; using the default 10s",
        "TOPE_OTA_MIGRATE_TIMEOUT: \"0ms\" is shorter than 100ms, which no command can run in; using the default 300s",
    ] {
        assert!(run.stderr.contains(w), "{w}: {}", run.stderr);
    }
    // systemd's `min` is a duration: no warning about the deadline.
    assert!(
        !run.stderr.contains("TOPE_OTA_HEALTH_DEADLINE"),
        "{}",
        run.stderr
    );
}

#[test]
fn serve_hands_its_health_settings_to_the_install_it_starts() {
    let mut d = Device::with_v1();
    let (files, manifest) = v2_partial();
    let pkg = d.pack("2.0.0", &files, &manifest);
    d.download("2.0.0", pkg).expect(0);
    let check = tmp(&d, "api-status");
    std::fs::write(
        &check,
        "#!/bin/sh\necho \"device-api answered 500\"\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&check, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Flags on serve's command line (not the environment) reach the install it runs.
    let srv = crate::serve::Server::start_with(
        &d.env,
        &[
            "--health-cmd",
            check.to_str().unwrap(),
            "--health-deadline",
            "0",
            "--health-timeout",
            "2s",
        ],
        &[],
    );
    let body = r#"{"version":"2.0.0"}"#;
    let req = format!(
        "POST /api/v1.0/update HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        srv.addr,
        body.len()
    );
    let (status, text) = crate::serve::raw(&srv.addr, req.as_bytes());
    assert_eq!(status, 200, "{text}");
    let s = d.env.wait_state(30, "the install to end", |s| {
        s["stage"] == "failed" || s["stage"] == "success"
    });
    assert_eq!(s["error"], "HEALTH_CHECK_FAILED", "{s}");
    assert!(
        s["message"]
            .as_str()
            .unwrap()
            .contains("device-api answered 500"),
        "{s}"
    );
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
}
