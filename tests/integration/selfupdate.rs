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

#[test]
fn an_updater_that_is_not_newer_stays_in_the_snapshot_and_never_runs() {
    let mut d = Device::with_v1();
    let same = updater_build(env!("CARGO_PKG_VERSION"));
    let mut older = updater_build("0.0.9").to_vec();
    // Not the very file of this build: another build of an older version.
    older.push(0);
    let older: &'static [u8] = Box::leak(older.into_boxed_slice());
    for (v, bin) in [("1.1.0", same), ("1.2.0", older)] {
        let run = d.deliver(v, release(&d, v, bin));
        assert_eq!(run.code, 0, "{}", run.stderr);
        assert_eq!(record(&d)["good"], Value::Null, "{v}");
        assert!(run.stderr.contains("is not newer than"), "{}", run.stderr);
        assert!(version_of(&d).starts_with(&format!("tope-ota {}\n", env!("CARGO_PKG_VERSION"))));
    }
}

/// A device whose updater fails at `at` in the way `how` (see src/failpoint.rs).
fn faulty(at_how: &str) -> Device {
    let mut d = Device::with_v1();
    d.env.set("TOPE_OTA_UPDATER_FAULT", at_how);
    d.env.set("TOPE_OTA_UPDATER_TIMEOUT_MS", "3000");
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
        ("hang", "its self-test hung: killed after 3s"),
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
        ("commit:hang", "it hung: killed after 3s"),
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
