//! tope-ota updates itself (issue #23, items 2, 4 and 5): a release's updater is tried by the
//! install (a self-test under the install's lock, then the install's own commit), proven good,
//! and from then on run by the `.deb` binary; a bad one is marked bad, the device goes back
//! where needed, and the `.deb` binary stays the updater.

use crate::install::*;
use crate::support::*;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;

fn release(d: &Device, version: &str, updater: &'static [u8]) -> Vec<u8> {
    let mut files = v1_files();
    files.push(("tope-ota", updater, 0o755));
    let mut m = full_manifest(version);
    m["modules"].as_array_mut().unwrap().push(
        json!({"name": "updater", "src": "tope-ota", "dst": "bin/tope-ota", "updater": true}),
    );
    d.pack(version, &files, &m)
}

fn record(d: &Device) -> Value {
    let p = d.env.state_dir.join("updater/updater.json");
    std::fs::read(&p)
        .map(|b| serde_json::from_slice(&b).unwrap())
        .unwrap_or(Value::Null)
}

fn version_of(d: &Device) -> String {
    let r = d.env.run(&["--version"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    r.stdout
}

#[test]
fn a_release_with_a_newer_updater_proves_it_and_the_next_commands_run_it() {
    let mut d = Device::with_v1();
    let own = env!("CARGO_PKG_VERSION");
    assert!(version_of(&d).starts_with(&format!("tope-ota {own}\nrunning:  {own} ")));
    let new = updater_build("0.1.1");
    let sha = sha256_hex(new);
    let run = d.deliver("1.1.0", release(&d, "1.1.0", new));
    assert_eq!(run.code, 0, "{}", run.stderr);
    let rec = record(&d);
    assert_eq!(rec["good"]["sha256"], sha.as_str(), "{rec}");
    assert_eq!(rec["good"]["version"], "0.1.1");
    assert_eq!(rec["good"]["release"], "1.1.0");
    assert_eq!(rec["trial"], Value::Null);
    let kept = d.env.state_dir.join("updater").join(&sha);
    assert_eq!(std::fs::read(&kept).unwrap(), new);
    let mode = std::fs::metadata(&kept).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o555);
    // The new updater committed the install.
    let st = d.env.state();
    assert_eq!(st["stage"], "success");
    assert_eq!(st["version"], "1.1.0");
    // Every entry point now runs it: --version, status, heal; the .deb one is the fallback.
    let v = version_of(&d);
    assert!(
        v.starts_with("tope-ota 0.1.1\nrunning:  0.1.1 ")
            && v.contains(&format!("/updater/{sha} (the proven updater"))
            && v.contains(&format!("fallback: {own} {BIN} (the package's)")),
        "{v}"
    );
    let s = d.env.run(&["status"]).expect(0).stdout.clone();
    assert!(s.contains("updater:   0.1.1 (proven"), "{s}");
    let h = d.env.run(&["-vv", "heal"]);
    assert_eq!(h.code, 0, "{}", h.stderr);
    assert!(
        h.stderr.contains("the proven updater 0.1.1"),
        "{}",
        h.stderr
    );
    // Its runs ended in order: no run is counted against it.
    let runs = d.env.state_dir.join("updater/runs");
    assert_eq!(std::fs::read_dir(&runs).unwrap().count(), 0);
    // A rollback (the snapshot that brought it is no longer current) keeps it running.
    d.env.run(&["rollback"]).expect(0);
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
    assert!(version_of(&d).starts_with("tope-ota 0.1.1\n"));
    // The next release with an even newer updater is tried by 0.1.1 and replaces it.
    let newer = updater_build("0.1.2");
    let run = d.deliver("1.2.0", release(&d, "1.2.0", newer));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(record(&d)["good"]["version"], "0.1.2");
    assert!(version_of(&d).starts_with("tope-ota 0.1.2\n"));
    assert!(!kept.exists(), "the replaced updater's copy goes");
}

/// The fallback's path reaches the proven updater in an environment variable; any other
/// binary that finds it set (in a hook's environment, or set by hand) ignores it, so it can
/// never name what runs: the choice is made as at every start.
#[test]
fn the_fallbacks_variables_are_believed_only_by_the_proven_updater() {
    let mut d = Device::with_v1();
    let own = env!("CARGO_PKG_VERSION");
    d.env.set("TOPE_OTA_ENTRY", "/bin/false");
    d.env.set("TOPE_OTA_ENTRY_VERSION", "9.9.9");
    let v = version_of(&d);
    assert!(
        v.starts_with(&format!("tope-ota {own}\nrunning:  {own} {BIN}\n"))
            && !v.contains("fallback"),
        "{v}"
    );
    let new = updater_build("0.1.1");
    d.deliver("1.1.0", release(&d, "1.1.0", new)).expect(0);
    let v = version_of(&d);
    assert!(
        v.starts_with("tope-ota 0.1.1\n")
            && v.contains(&format!("fallback: {own} {BIN} (the package's)")),
        "the .deb binary chose, and names itself: {v}"
    );
}

#[test]
fn an_updater_that_is_not_newer_stays_in_the_snapshot_and_never_runs() {
    let mut d = Device::with_v1();
    let same = updater_build(env!("CARGO_PKG_VERSION"));
    let mut older = updater_build("0.0.9").to_vec();
    // Not the very file of this build: another build of an older version.
    older.push(0);
    let older: &'static [u8] = Box::leak(older.into_boxed_slice());
    // Its version is read from its file: nothing of it runs, so a self-test that would crash
    // neither costs the release nor marks it bad.
    d.env.set("TOPE_OTA_UPDATER_FAULT", "self-test:crash");
    for (v, bin) in [("1.1.0", same), ("1.2.0", older)] {
        let run = d.deliver(v, release(&d, v, bin));
        assert_eq!(run.code, 0, "{}", run.stderr);
        let rec = record(&d);
        assert_eq!(rec["good"], Value::Null, "{v}: {rec}");
        assert!(
            rec["bad"].as_array().is_none_or(|b| b.is_empty()),
            "{v}: {rec}"
        );
        assert!(run.stderr.contains("is not newer than"), "{}", run.stderr);
        assert!(version_of(&d).starts_with(&format!("tope-ota {}\n", env!("CARGO_PKG_VERSION"))));
    }
    // A program that is no tope-ota build (no version stamp) is never started either.
    let other: &'static [u8] = Box::leak(std::fs::read("/bin/true").unwrap().into_boxed_slice());
    let run = d.deliver("1.3.0", release(&d, "1.3.0", other));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("carries no version stamp"),
        "{}",
        run.stderr
    );
    let rec = record(&d);
    assert_eq!(rec["good"], Value::Null, "{rec}");
    assert!(rec["bad"].as_array().is_none_or(|b| b.is_empty()), "{rec}");
    assert!(
        std::fs::read_dir(d.env.state_dir.join("updater"))
            .map(|e| e.flatten().all(|e| e.file_name().len() != 64))
            .unwrap_or(true),
        "no copy of an updater that is not tried is kept"
    );
}

/// A record that does not parse trusts nothing (the `.deb` binary runs); the next install moves
/// it aside and self-update goes on.
#[test]
fn a_corrupt_updater_record_is_moved_aside_by_the_next_install() {
    let mut d = Device::with_v1();
    d.deliver("1.1.0", release(&d, "1.1.0", updater_build("0.1.1")))
        .expect(0);
    let p = d.env.state_dir.join("updater/updater.json");
    std::fs::write(&p, b"{\"good\": {\"sha256\": tr").unwrap();
    let own = env!("CARGO_PKG_VERSION");
    assert!(version_of(&d).starts_with(&format!("tope-ota {own}\nrunning:  {own} {BIN}")));
    let newer = updater_build("0.1.2");
    let run = d.deliver("1.2.0", release(&d, "1.2.0", newer));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.contains("moved aside"), "{}", run.stderr);
    assert_eq!(record(&d)["good"]["sha256"], sha256_hex(newer).as_str());
    assert!(version_of(&d).starts_with("tope-ota 0.1.2\n"));
    let aside: Vec<_> = std::fs::read_dir(d.env.state_dir.join("updater"))
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("updater.json.corrupt-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "kept for diagnosis");
    assert_eq!(
        std::fs::read(aside[0].path()).unwrap(),
        b"{\"good\": {\"sha256\": tr"
    );
}

/// A device whose updater fails at `at` in the way `how` (see src/failpoint.rs).
fn faulty(at_how: &str) -> Device {
    let mut d = Device::with_v1();
    d.env.set("TOPE_OTA_UPDATER_FAULT", at_how);
    // Short enough for the hang cases, long enough that a good self-test or commit of the debug
    // build is never cut off on two loaded cores.
    d.env.set("TOPE_OTA_UPDATER_TIMEOUT_MS", "10000");
    d
}

#[track_caller]
fn assert_bad(d: &Device, sha: &str, why: &str) {
    let rec = record(d);
    assert_eq!(rec["good"], Value::Null, "{rec}");
    assert_eq!(rec["trial"], Value::Null, "{rec}");
    let bad = rec["bad"].as_array().unwrap();
    assert!(
        bad.iter()
            .any(|b| b["sha256"] == sha && b["why"].as_str().unwrap().contains(why)),
        "{rec}"
    );
    assert!(
        !d.env.state_dir.join("updater").join(sha).exists(),
        "a bad updater's copy goes"
    );
    let own = env!("CARGO_PKG_VERSION");
    assert!(version_of(d).starts_with(&format!("tope-ota {own}\nrunning:  {own} {BIN}")));
}

/// After a bad updater, the next good release installs and its updater is proven.
#[track_caller]
fn next_good_release_installs(d: &mut Device, version: &str) {
    d.env.vars.remove("TOPE_OTA_UPDATER_FAULT");
    let good = updater_build("0.1.7");
    let run = d.deliver(version, release(d, version, good));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(record(d)["good"]["sha256"], sha256_hex(good).as_str());
    assert!(version_of(d).starts_with("tope-ota 0.1.7\n"));
    d.assert_current_is(&{
        let mut f = v1_files();
        f.push(("bin/tope-ota", good, 0o755));
        f
    });
}

#[test]
fn an_updater_that_fails_its_self_test_costs_the_release_and_nothing_else() {
    for (how, why) in [
        ("exit", "its self-test exited 1"),
        ("crash", "its self-test crashed (signal 6)"),
        ("hang", "its self-test hung: killed after 10s"),
    ] {
        let mut d = faulty(&format!("self-test:{how}"));
        let bin = updater_build("0.1.1");
        let sha = sha256_hex(bin);
        let run = d.deliver("1.1.0", release(&d, "1.1.0", bin));
        assert_eq!(run.code, 1, "{how}: {}", run.stderr);
        assert!(
            run.stderr.contains("error: UPDATER_FAILED: ") && run.stderr.contains(why),
            "{how}: {}",
            run.stderr
        );
        // Nothing changed: no service stopped, current as it was, the new snapshot gone.
        assert!(
            !d.sc.calls().iter().any(|c| c.starts_with("stop")),
            "{how}: {:?}",
            d.sc.calls()
        );
        d.assert_current_is(&v1_files());
        assert!(!d.root().join("v1.1.0").exists(), "{how}");
        let st = d.env.state();
        assert_eq!(
            (&st["stage"], &st["error"]),
            (&json!("failed"), &json!("UPDATER_FAILED"))
        );
        assert!(d.env.download_files().is_empty(), "{how}: the package goes");
        assert_bad(&d, &sha, why);
        // Its version, from its file, names it in the technician's view.
        let s = d.env.run(&["status"]).expect(0).stdout.clone();
        assert!(s.contains("bad: 0.1.1") && s.contains(why), "{how}: {s}");
        next_good_release_installs(&mut d, "1.2.0");
    }
}

#[test]
fn an_updater_that_fails_its_commit_is_bad_and_the_device_goes_back() {
    for (at_how, why) in [
        (
            "commit:exit",
            "it did not finish the install's commit: it exited 1",
        ),
        ("commit:crash", "it crashed (signal 6)"),
        ("commit:hang", "it hung: killed after 10s"),
        // It saved the success and then died: not proven either.
        ("after-commit:crash", "it crashed (signal 6)"),
    ] {
        let mut d = faulty(at_how);
        let bin = updater_build("0.1.1");
        let sha = sha256_hex(bin);
        let run = d.deliver("1.1.0", release(&d, "1.1.0", bin));
        assert_eq!(run.code, 1, "{at_how}: {}", run.stderr);
        assert!(
            run.stderr.contains("error: UPDATER_FAILED: ") && run.stderr.contains(why),
            "{at_how}: {}",
            run.stderr
        );
        // Back on 1.0.0, whose services run.
        d.assert_current_is(&v1_files());
        let st = d.env.state();
        assert_eq!(st["error"], "UPDATER_FAILED", "{at_how}: {st}");
        assert_eq!(st["rollback"], "previous 1.0.0", "{at_how}: {st}");
        assert_bad(&d, &sha, why);
        // The technician's view says what happened.
        let s = d.env.run(&["status"]).expect(0).stdout.clone();
        assert!(s.contains("bad: 0.1.1") && s.contains(why), "{s}");
        next_good_release_installs(&mut d, "1.2.0");
    }
}

#[test]
fn a_proven_updater_that_keeps_crashing_gives_way_to_the_deb_binary() {
    let mut d = Device::with_v1();
    let bin = updater_build("0.1.1");
    let sha = sha256_hex(bin);
    d.deliver("1.1.0", release(&d, "1.1.0", bin)).expect(0);
    assert_eq!(record(&d)["good"]["sha256"], sha.as_str());
    d.env.set("TOPE_OTA_UPDATER_FAULT", "run:crash");
    // Two crashes, then a clean run: the count starts again.
    for _ in 0..2 {
        assert_eq!(d.env.run(&["status"]).code, 134);
    }
    d.env.vars.remove("TOPE_OTA_UPDATER_FAULT");
    d.env.run(&["status"]).expect(0);
    d.env.set("TOPE_OTA_UPDATER_FAULT", "run:crash");
    for _ in 0..2 {
        assert_eq!(d.env.run(&["status"]).code, 134);
    }
    assert_eq!(record(&d)["good"]["sha256"], sha.as_str(), "still proven");
    // The third crash in a row: the next command runs the .deb binary, and says why.
    assert_eq!(d.env.run(&["heal"]).code, 134);
    let s = d.env.run(&["status"]);
    assert_eq!(s.code, 0, "{}", s.stderr);
    assert!(
        s.stdout
            .contains(&format!("updater:   {} {BIN}", env!("CARGO_PKG_VERSION"))),
        "{}",
        s.stdout
    );
    assert_bad(&d, &sha, "its last 3 runs ended without finishing");
    // The device stays updatable: the next release installs with the .deb binary.
    next_good_release_installs(&mut d, "1.2.0");
}

/// serve under its unit ends only when it is stopped: a proven updater whose serve exits with
/// an error there (here: it cannot bind) is counted as a run that did not finish, so systemd's
/// `Restart=on-failure` does not rerun it forever; the fourth start is the `.deb` binary's. The
/// same error of a serve started by hand is a technician's honest failure, not counted.
#[test]
fn a_serve_that_exits_with_an_error_under_its_unit_gives_way_to_the_deb_binary() {
    let mut d = Device::with_v1();
    let bin = updater_build("0.1.1");
    let sha = sha256_hex(bin);
    d.deliver("1.1.0", release(&d, "1.1.0", bin)).expect(0);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let runs = d.env.state_dir.join("updater/runs");
    let entries = || std::fs::read_dir(&runs).map_or(0, |e| e.count());
    for _ in 0..3 {
        let r = d.env.run(&["serve", "--listen", &addr]);
        assert_eq!(r.code, 1, "{}", r.stderr);
    }
    assert_eq!(entries(), 0, "a serve by hand that fails is no crash");
    assert_eq!(record(&d)["good"]["sha256"], sha.as_str());
    let sock_path = d.env.tmp.path().join("notify-unit");
    let _sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    let unit = |d: &Device| {
        let out = d
            .env
            .cmd(&["serve", "--listen", &addr])
            .env("NOTIFY_SOCKET", &sock_path)
            .output()
            .unwrap();
        Run::from(out)
    };
    for n in 1..=3 {
        let r = unit(&d);
        assert_eq!(r.code, 1, "{}", r.stderr);
        assert_eq!(entries(), n, "counted");
        assert_eq!(record(&d)["good"]["sha256"], sha.as_str());
    }
    let r = unit(&d);
    assert_eq!(
        r.code, 1,
        "the .deb binary cannot bind either: {}",
        r.stderr
    );
    assert_bad(
        &d,
        &sha,
        "its last 3 runs ended without finishing (a crash, a hang, or a serve under systemd",
    );
    // Once the address is free, the unit's serve is the .deb's and serves.
    drop(taken);
    let srv = crate::serve::Server::start_with(
        &d.env,
        &[],
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    let exe = std::fs::read_link(format!("/proc/{}/exe", srv.child.id())).unwrap();
    assert_eq!(exe, std::fs::canonicalize(BIN).unwrap());
    next_good_release_installs(&mut d, "1.2.0");
}

/// Download `bytes` signed by `key` (served beside it) and install it.
fn deliver_signed(d: &mut Device, version: &str, bytes: Vec<u8>, key: &KeyPair) -> Run {
    let file = d.env.tmp.path().join(format!("{version}.zip"));
    std::fs::write(&file, &bytes).unwrap();
    let sig_srv = PkgServer::start(sign(key, &file), Behaviour::default());
    let sig_url = sig_srv.url("pkg.zip.minisig");
    d.servers.push(sig_srv);
    d.download_with(version, bytes, &["--sig-url", &sig_url])
        .expect(0);
    d.install()
}

fn trust(d: &Device, key: &KeyPair) {
    let dir = std::path::PathBuf::from(&d.env.vars["TOPE_OTA_KEYS_DIR"]);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&key.public, dir.join(key.public.file_name().unwrap())).unwrap();
}

#[test]
fn with_trusted_keys_only_a_signed_packages_updater_is_ever_run() {
    let keys = tempfile::tempdir().unwrap();
    let key = keypair(keys.path(), "release");
    // Downloaded unsigned, then keys configured before the install: installed, never tried.
    let mut d = Device::with_v1();
    let bin = updater_build("0.1.1");
    d.download("1.1.0", release(&d, "1.1.0", bin)).expect(0);
    trust(&d, &key);
    let run = d.install();
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("not tried: the package is not signed"),
        "{}",
        run.stderr
    );
    assert_eq!(record(&d)["good"], Value::Null);
    // A signed release's updater is proven, and the key recorded.
    let bin = updater_build("0.1.2");
    let pkg = release(&d, "1.2.0", bin);
    let run = deliver_signed(&mut d, "1.2.0", pkg, &key);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        record(&d)["good"]["signed_by"],
        "release.pub",
        "{}",
        record(&d)
    );
    assert!(version_of(&d).starts_with("tope-ota 0.1.2\n"));

    // Proven from an unsigned package while there were no keys: once keys are configured, it no
    // longer runs, and the reason is shown.
    let mut d = Device::with_v1();
    d.deliver("1.1.0", release(&d, "1.1.0", updater_build("0.1.1")))
        .expect(0);
    assert!(version_of(&d).starts_with("tope-ota 0.1.1\n"));
    trust(&d, &key);
    let v = version_of(&d);
    assert!(
        v.starts_with(&format!("tope-ota {}\n", env!("CARGO_PKG_VERSION")))
            && v.contains("it came from an unsigned package and trusted keys are configured"),
        "{v}"
    );
}

#[test]
fn a_proven_updater_whose_file_is_exposed_or_changed_is_not_run() {
    let mut d = Device::with_v1();
    let bin = updater_build("0.1.1");
    let sha = sha256_hex(bin);
    d.deliver("1.1.0", release(&d, "1.1.0", bin)).expect(0);
    let kept = d.env.state_dir.join("updater").join(&sha);
    let own = format!("tope-ota {}\n", env!("CARGO_PKG_VERSION"));
    let verify = |want: &str, code: i32| {
        let v = d.env.run(&["verify"]);
        assert_eq!(v.code, code, "{}{}", v.stdout, v.stderr);
        let line = format!("updater 0.1.1 (proven, {}): {want}", kept.display());
        assert!(v.stdout.contains(&line), "{line:?} in\n{}", v.stdout);
    };
    verify("intact", 0);
    // Writable by others (a printer's service could swap it): not run while it is.
    for (path, mode) in [
        (&kept, 0o557),
        (&kept.parent().unwrap().to_path_buf(), 0o777),
    ] {
        let was = std::fs::metadata(path).unwrap().permissions().mode();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        let v = version_of(&d);
        assert!(
            v.starts_with(&own) && v.contains("is writable by its group or others"),
            "{v}"
        );
        verify("unsafe: ", 1);
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(was)).unwrap();
        assert!(version_of(&d).starts_with("tope-ota 0.1.1\n"));
    }
    // Changed in place (a bad sector, a hand): its hash no longer matches, it is bad for good.
    let mut changed = bin.to_vec();
    let n = changed.len();
    changed[n - 1] ^= 0xff;
    std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(&kept, &changed).unwrap();
    std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o555)).unwrap();
    // (verify is run by the .deb binary too, which finds the change first: see below.)
    let v = version_of(&d);
    assert!(v.starts_with(&own) && v.contains("is bad now"), "{v}");
    assert_bad(&d, &sha, "its file has SHA-256");
}

#[test]
fn a_newer_deb_binary_wins_over_an_older_proven_updater() {
    let mut d = Device::with_v1();
    d.deliver("1.1.0", release(&d, "1.1.0", updater_build("0.1.1")))
        .expect(0);
    assert!(version_of(&d).starts_with("tope-ota 0.1.1\n"));
    // `dpkg -i` of a 0.2.0 .deb puts a newer binary at the entry point.
    let deb = d.env.tmp.path().join("usr-bin/tope-ota");
    std::fs::create_dir_all(deb.parent().unwrap()).unwrap();
    std::fs::write(&deb, updater_build("0.2.0")).unwrap();
    std::fs::set_permissions(&deb, std::fs::Permissions::from_mode(0o755)).unwrap();
    d.env.bin = deb.clone();
    let v = version_of(&d);
    assert!(
        v.starts_with(&format!(
            "tope-ota 0.2.0\nrunning:  0.2.0 {}",
            deb.display()
        )) && v.contains("the proven updater 0.1.1")
            && v.contains("is not newer than this one (0.2.0)"),
        "{v}"
    );
    // A release that still carries 0.1.1 (or anything older than 0.2.0) is not tried again.
    let run = d.deliver("1.2.0", release(&d, "1.2.0", updater_build("0.1.5")));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("is not newer than 0.2.0"),
        "{}",
        run.stderr
    );
    assert_eq!(record(&d)["good"]["version"], "0.1.1");
    // A newer one than the .deb is tried and proven by it.
    let run = d.deliver("1.3.0", release(&d, "1.3.0", updater_build("0.2.1")));
    assert_eq!(run.code, 0, "{}", run.stderr);
    let v = version_of(&d);
    assert!(
        v.starts_with("tope-ota 0.2.1\n")
            && v.contains(&format!("fallback: 0.2.0 {}", deb.display())),
        "{v}"
    );
}

/// One `GET /progress` on a fresh connection: its status, or why it failed.
fn poll(addr: &str) -> Result<u16, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .unwrap();
    s.write_all(b"GET /api/v1.0/progress HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&out);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status in {text:?}"))
}

#[test]
fn serve_restarts_into_a_new_updater_without_dropping_a_poll() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let mut d = Device::with_v1();
    let srv = crate::serve::Server::start_logged(&d.env);
    let pid = srv.child.id();
    let exe = move || std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe(), std::fs::canonicalize(BIN).unwrap());
    // device-api polls all along, a new connection every 10 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let polls = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let poller = {
        let (stop, polls, failed, addr) = (
            stop.clone(),
            polls.clone(),
            failed.clone(),
            srv.addr.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match poll(&addr) {
                    Ok(200) => {}
                    other => failed.lock().unwrap().push(format!("{other:?}")),
                }
                polls.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        })
    };
    let bin = updater_build("0.1.1");
    let sha = sha256_hex(bin);
    let run = d.deliver("1.1.0", release(&d, "1.1.0", bin));
    assert_eq!(run.code, 0, "{}", run.stderr);
    let kept = d.env.state_dir.join("updater").join(&sha);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while exe() != kept && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let before = polls.load(Ordering::SeqCst);
    std::thread::sleep(std::time::Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    poller.join().unwrap();
    assert_eq!(
        exe(),
        kept,
        "serve runs the proven updater, same pid\n{}",
        srv.log()
    );
    assert!(
        polls.load(Ordering::SeqCst) > before,
        "polls answered after the restart"
    );
    assert_eq!(
        failed.lock().unwrap().clone(),
        Vec::<String>::new(),
        "{}",
        srv.log()
    );
    // The new one serves the API, and runs its operations with itself.
    let (status, body) = crate::serve::raw(
        &srv.addr,
        b"GET /api/v1.0/progress HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200);
    assert!(body.contains("Installed version 1.1.0"), "{body}");
}

#[test]
fn a_technicians_version_help_typo_or_closed_pipe_is_no_crash_of_the_proven_updater() {
    let mut d = Device::with_v1();
    let bin = updater_build("0.1.1");
    let sha = sha256_hex(bin);
    d.deliver("1.1.0", release(&d, "1.1.0", bin)).expect(0);
    // clap exits by itself for these; each must still end its run in order.
    for args in [
        &["--version"][..],
        &["--help"],
        &["install", "--help"],
        &["staus"],
        &["--version"],
        &["--version"],
    ] {
        let r = d.env.run(args);
        assert!(r.code == 0 || r.code == 2, "{args:?}: {}", r.stderr);
    }
    // `tope-ota status | head -c0`: stdout's reader is gone before anything is written.
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    unsafe { libc::close(fds[0]) };
    let write_end = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[1]) };
    let st = d
        .env
        .cmd(&["status"])
        .stdout(std::process::Stdio::from(write_end))
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(0), "{st:?}");
    let runs = d.env.state_dir.join("updater/runs");
    assert_eq!(
        std::fs::read_dir(&runs).unwrap().count(),
        0,
        "every run ended in order"
    );
    assert_eq!(record(&d)["good"]["sha256"], sha.as_str(), "{}", record(&d));
    assert!(version_of(&d).starts_with("tope-ota 0.1.1\n"));
    // The commit is only ever run under an install's lock, never by hand: neither without
    // one nor with a variable that names some other open file.
    for fd in [None, Some("1"), Some("not-a-number")] {
        let mut cmd = d.env.cmd(&["self-test", "--commit=1.1.0"]);
        if let Some(fd) = fd {
            cmd.env("TOPE_OTA_LOCK_FD", fd);
        }
        let r = Run::from(cmd.output().unwrap());
        assert_eq!(r.code, 2, "{fd:?}: {}", r.stderr);
        assert!(
            r.stderr
                .contains("error: INVALID_REQUEST: self-test --commit runs only under the lock"),
            "{fd:?}: {}",
            r.stderr
        );
    }
    assert_eq!(d.env.state()["stage"], "success", "nothing committed");
}

#[test]
fn a_state_dir_where_nothing_may_run_costs_the_updater_its_trial_not_the_release() {
    // A state dir mounted noexec (a common hardening): the kept copy cannot be started. That is
    // the device's doing: the release installs with the updater that runs, and the new one is
    // not marked bad.
    let fs = Tmpfs::mount_with("size=256m,noexec");
    let mut d = Device::new();
    d.env.state_dir = fs.path().join("state");
    let pkg = d.pack("1.0.0", &v1_files(), &full_manifest("1.0.0"));
    d.deliver("1.0.0", pkg).expect(0);
    let bin = updater_build("0.1.1");
    let run = d.deliver("1.1.0", release(&d, "1.1.0", bin));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("is not tried: its self-test could not be started"),
        "{}",
        run.stderr
    );
    let rec = record(&d);
    assert!(
        rec["good"].is_null() && rec["bad"].as_array().is_none_or(|b| b.is_empty()),
        "{rec}"
    );
    assert_eq!(d.link("current").as_deref(), Some("v1.1.0"));
    drop(d);
}

/// The serve unit is `Type=notify`: an updater proven before it could say READY=1 (its
/// self-test did not report `ready_notify`) would be killed by systemd at every start. serve
/// started by systemd (NOTIFY_SOCKET set) runs the `.deb` binary then, and says it is ready;
/// every other command, and a serve started by hand, still runs the proven updater. One that
/// reports it serves under systemd too.
#[test]
fn serve_under_systemd_runs_only_an_updater_that_says_it_is_ready() {
    use std::os::unix::net::UnixDatagram;
    let mut d = Device::with_v1();
    let bin = updater_build("0.1.1");
    let sha = sha256_hex(bin);
    let run = d.deliver("1.1.0", release(&d, "1.1.0", bin));
    assert_eq!(run.code, 0, "{}", run.stderr);
    let rec = record(&d);
    assert_eq!(rec["good"]["ready_notify"], true, "{rec}");
    let kept = d.env.state_dir.join("updater").join(&sha);
    let serve_exe = |d: &Device, notify: bool| {
        let path = d.env.tmp.path().join(format!("notify-{}", rand_suffix()));
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let p = path.display().to_string();
        let vars: Vec<(&str, &str)> = if notify {
            vec![("NOTIFY_SOCKET", p.as_str())]
        } else {
            vec![]
        };
        let srv = crate::serve::Server::start_with(&d.env, &[], &vars);
        let exe = std::fs::read_link(format!("/proc/{}/exe", srv.child.id())).unwrap();
        if notify {
            let mut buf = [0u8; 256];
            let n = sock.recv(&mut buf).expect("READY=1 from serve");
            assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
        }
        exe
    };
    assert_eq!(serve_exe(&d, true), kept, "it says READY=1: it serves");
    // The record of an updater that never said so (made from an older one's self-test).
    let p = d.env.state_dir.join("updater/updater.json");
    let mut rec = record(&d);
    rec["good"].as_object_mut().unwrap().remove("ready_notify");
    std::fs::write(&p, serde_json::to_vec_pretty(&rec).unwrap()).unwrap();
    assert_eq!(
        serve_exe(&d, true),
        std::fs::canonicalize(BIN).unwrap(),
        "systemd would wait for a READY=1 that never comes: the .deb binary serves"
    );
    assert_eq!(
        serve_exe(&d, false),
        kept,
        "serve by hand runs the proven one"
    );
    assert!(version_of(&d).starts_with("tope-ota 0.1.1\n"));
    let s = d.env.run(&["status"]).expect(0).stdout.clone();
    assert!(s.contains("updater:   0.1.1 (proven"), "{s}");
    assert!(
        s.contains("serve under systemd runs the package's updater: the proven 0.1.1 did not say"),
        "{s}"
    );
    // serve under systemd, on the .deb binary, restarts into the proven updater once the
    // record says it notifies (as a fresh start would choose), and that one says READY=1 too.
    let path = d.env.tmp.path().join("notify-restart");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let srv =
        crate::serve::Server::start_with(&d.env, &[], &[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    let pid = srv.child.id();
    let exe = move || std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    let mut buf = [0u8; 256];
    sock.recv(&mut buf).expect("READY=1 from the .deb's serve");
    assert_eq!(exe(), std::fs::canonicalize(BIN).unwrap());
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(
        exe(),
        std::fs::canonicalize(BIN).unwrap(),
        "no restart while nothing changed"
    );
    rec["good"]["ready_notify"] = json!(true);
    std::fs::write(&p, serde_json::to_vec_pretty(&rec).unwrap()).unwrap();
    let n = sock
        .recv(&mut buf)
        .expect("READY=1 again, from the restarted serve");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    assert_eq!(exe(), kept, "serve restarted into the proven updater");
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}
