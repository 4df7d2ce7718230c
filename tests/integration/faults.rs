//! Real faults once services are down (a versions filesystem turning read-only, a full disk),
//! manual rollbacks across a service one version lacks, the factory as a private copy, and
//! `verify`: SPEC section 9a.

use crate::install::*;
use crate::support::*;
use serde_json::json;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A device whose versions root (and, with `state_too`, state dir) lives on `fs`.
fn device_on(fs: &Tmpfs, state_too: bool) -> Device {
    let mut d = Device::new();
    d.env.versions_dir = fs.path().join("versions");
    if state_too {
        d.env.state_dir = fs.path().join("state");
    }
    let pkg = d.pack("1.0.0", &v1_files(), &full_manifest("1.0.0"));
    d.deliver("1.0.0", pkg).expect(0);
    d.sc.clear();
    d
}

fn remount(fs: &Tmpfs, how: &str) {
    let st = std::process::Command::new("mount")
        .args(["-o", &format!("remount,{how}")])
        .arg(fs.path())
        .status()
        .unwrap();
    assert!(st.success(), "remount {how}");
}

#[test]
fn versions_root_turning_read_only_at_the_first_stop_keeps_current_running() {
    let fs = Tmpfs::mount(64);
    let mut d = device_on(&fs, false);
    let (files, manifest) = v2_partial();
    let pkg = d.pack("2.0.0", &files, &manifest);
    d.download("2.0.0", pkg).expect(0);
    d.sc.on(
        "stop",
        &format!("mount -o remount,ro {}", fs.path().display()),
    );
    let run = d.install();
    run.expect(1);
    let s = d.env.state();
    assert_eq!(s["stage"], "failed");
    assert_ne!(s["error"], "ROLLBACK_FAILED", "{s:#}");
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
    d.assert_current_is(&v1_files());
    // Heal while the filesystem is still read-only: nothing to break, services stay up.
    d.env.run(&["heal"]).expect(0);
    d.assert_current_is(&v1_files());
    // Repaired: heal cleans up, and the update goes through.
    remount(&fs, "rw");
    d.env.run(&["heal"]).expect(0);
    assert_eq!(d.env.state()["stage"], "idle");
    let pkg = d.pack("2.0.0", &files, &manifest);
    d.deliver("2.0.0", pkg).expect(0);
    d.assert_current_is(&v2_files());

    // A manual rollback under the same fault stays on the complete 2.0.0, services running.
    d.sc.on(
        "stop",
        &format!("mount -o remount,ro {}", fs.path().display()),
    );
    let run = d.env.run(&["rollback"]);
    run.expect(1);
    let s = d.env.state();
    assert_eq!(s["stage"], "failed", "{s:#}");
    assert_ne!(s["error"], "ROLLBACK_FAILED", "{s:#}");
    d.assert_current_is(&v2_files());
    remount(&fs, "rw");
}

#[test]
fn disk_full_at_the_first_stop_keeps_current_running() {
    // State dir and versions root on one small filesystem, as on a device; full of blocks and
    // of inodes once the first service has stopped.
    let fs = Tmpfs::mount_with("size=24m,nr_inodes=600");
    let mut d = device_on(&fs, true);
    let (files, manifest) = v2_partial();
    let pkg = d.pack("2.0.0", &files, &manifest);
    d.download("2.0.0", pkg).expect(0);
    let p = fs.path().display();
    d.sc.on(
        "stop",
        &format!(
            "dd if=/dev/zero of={p}/fill bs=64k 2>/dev/null; i=0; while touch {p}/f$i 2>/dev/null; do i=$((i+1)); done"
        ),
    );
    let run = d.install();
    run.expect(1);
    assert!(!run.stderr.contains("ROLLBACK_FAILED"), "{}", run.stderr);
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
    d.assert_current_is(&v1_files());
    d.env.run(&["heal"]).expect(0);
    d.assert_current_is(&v1_files());
    // Space freed: heal settles and a later install works.
    for e in std::fs::read_dir(fs.path()).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n == "fill" || (n.starts_with('f') && n[1..].bytes().all(|c| c.is_ascii_digit())) {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    d.env.run(&["heal"]).expect(0);
    d.env.run(&["heal"]).expect(0);
    let s = d.env.state();
    assert!(
        ["idle", "toInstall"].contains(&s["stage"].as_str().unwrap()),
        "{s:#}"
    );
    let pkg = d.pack("2.0.0", &files, &manifest);
    d.deliver("2.0.0", pkg).expect(0);
    d.assert_current_is(&v2_files());
}

#[test]
fn manual_rollback_leaves_a_release_that_added_a_service() {
    let mut d = Device::with_v1();
    let mut files = v1_files();
    files.push(("bin/camera", b"#!/bin/sh\necho camera\n", 0o755));
    let mut manifest = full_manifest("1.1.0");
    manifest["modules"].as_array_mut().unwrap().push(json!(
        {"name": "camera", "src": "bin/camera", "dst": "bin/camera", "process_name": "camera", "restart_order": 3}
    ));
    let pkg = d.pack("1.1.0", &files, &manifest);
    d.deliver("1.1.0", pkg).expect(0);
    assert_eq!(d.sc.running("camera").as_deref(), Some("v1.1.0"));
    d.sc.clear();
    // 1.0.0 has no camera program: the rollback stops it and starts only 1.0.0's own.
    d.env.run(&["rollback"]).expect(0);
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
    assert_eq!(d.sc.running("camera"), None);
    d.assert_current_is(&v1_files());
    let starts: Vec<String> =
        d.sc.calls()
            .into_iter()
            .filter(|c| c.starts_with("start"))
            .collect();
    assert_eq!(
        starts,
        ["start device-api v1.0.0", "start printer-ui v1.0.0"]
    );
    assert!(d.sc.calls().contains(&"stop camera v1.1.0".to_string()));
}

fn files_under(dir: &Path) -> Vec<(String, std::fs::Metadata)> {
    tree(dir)
        .into_keys()
        .map(|p| {
            let m = std::fs::symlink_metadata(dir.join(&p)).unwrap();
            (p, m)
        })
        .collect()
}

#[test]
fn factory_is_a_private_read_only_copy_that_current_never_points_at() {
    let d = Device::with_factory();
    let f = d.root().join("v0.9.0~factory");
    assert_eq!(d.link("factory").as_deref(), Some("v0.9.0~factory"));
    let before = tree(&f);
    // No inode shared with any other snapshot; nothing writable.
    let others: std::collections::HashSet<u64> = ["v1.0.0", "v0.9.0"]
        .iter()
        .filter(|v| d.root().join(v).is_dir())
        .flat_map(|v| files_under(&d.root().join(v)))
        .map(|(_, m)| m.ino())
        .collect();
    for (p, m) in files_under(&f) {
        assert!(!others.contains(&m.ino()), "{p} shares an inode");
        if m.is_file() {
            assert_eq!(m.nlink(), 1, "{p}");
        }
        if !m.file_type().is_symlink() {
            assert_eq!(m.mode() & 0o222, 0, "{p} is writable");
        }
    }
    // Making it read-only touched no other snapshot: current's directories stay writable.
    let cur_bin = std::fs::metadata(d.root().join("current/bin")).unwrap();
    assert_eq!(cur_bin.mode() & 0o777, 0o755);
    // Root writing in place through current (a config appended to) leaves factory alone.
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(d.root().join("current/share/b.txt"))
        .unwrap()
        .write_all(b" appended")
        .unwrap();
    assert_eq!(tree(&f), before);
    // A second `factory` (current is 1.0.0 now) is refused: factory is never replaced.
    let run = d.env.run(&["factory"]);
    run.expect(2);
    assert!(run.stderr.contains("never replaced"), "{}", run.stderr);
    assert_eq!(tree(&f), before);
    // A rollback to factory runs a fresh writable copy, never the factory itself.
    d.env.run(&["rollback", "--to", "factory"]).expect(0);
    let cur = d.link("current").unwrap();
    assert_ne!(cur, "v0.9.0~factory");
    d.assert_current_is(&factory_files());
    let m = std::fs::metadata(d.root().join("current/bin")).unwrap();
    assert_eq!(m.mode() & 0o777, 0o755, "the copy has the installed modes");
    assert_eq!(tree(&f), before, "factory unchanged");
    // Nothing but unreferenced snapshot dirs is ever pruned from the versions root.
    std::fs::create_dir(d.root().join("data")).unwrap();
    std::fs::write(d.root().join("notes.txt"), b"keep").unwrap();
    std::fs::create_dir(d.root().join("vbad!")).unwrap();
    let mut d = d;
    let (files, manifest) = v2_partial();
    let pkg = d.pack("2.0.0", &files, &manifest);
    d.deliver("2.0.0", pkg).expect(0);
    for keep in ["data", "notes.txt", "vbad!", "v0.9.0~factory"] {
        assert!(d.root().join(keep).exists(), "{keep} was removed");
    }
}

#[test]
fn factory_made_the_old_way_is_remade_by_heal() {
    let d = Device::with_v1();
    // What the old create-factory.sh did: chmod -R a-w on the installed snapshot, then a link.
    let st = std::process::Command::new("chmod")
        .args(["-R", "a-w"])
        .arg(d.root().join("v1.0.0"))
        .status()
        .unwrap();
    assert!(st.success());
    std::os::unix::fs::symlink("v1.0.0", d.root().join("factory")).unwrap();
    let run = d.env.run(&["heal"]);
    run.expect(0);
    assert!(run.stdout.contains("private copy"), "{}", run.stdout);
    assert_eq!(d.link("factory").as_deref(), Some("v1.0.0~factory"));
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
    for (p, m) in files_under(&d.root().join("v1.0.0~factory")) {
        if m.is_file() {
            assert_eq!(m.nlink(), 1, "{p} still shared");
        }
    }
    // The installed snapshot's directories are writable for their owner again.
    let m = std::fs::metadata(d.root().join("v1.0.0/bin")).unwrap();
    assert_eq!(m.mode() & 0o200, 0o200);
    // Once: the next heal has nothing to do.
    assert_eq!(d.env.run(&["heal"]).stdout, "");
}

#[test]
fn verify_reports_what_changed_and_rollbacks_prefer_an_intact_target() {
    let mut d = Device::with_factory();
    let run = d.env.run(&["verify"]);
    run.expect(0);
    assert!(
        run.stdout.contains("v1.0.0 (current): intact"),
        "{}",
        run.stdout
    );
    let run = d.env.run(&["--json", "verify", "--all"]);
    run.expect(0);
    let j = run.json();
    assert_eq!(j["code"], 200);
    let snaps = j["data"]["snapshots"].as_array().unwrap();
    assert!(snaps.iter().all(|s| s["status"] == "intact"), "{j:#}");
    assert!(snaps.iter().any(|s| s["snapshot"] == "v0.9.0~factory"));

    // Same size, other bytes, written in place through current.
    std::fs::write(d.root().join("current/bin/ui"), b"#!/bin/sh\necho UI 1\n").unwrap();
    let run = d.env.run(&["verify", "1.0.0"]);
    run.expect(1);
    assert!(run.stdout.contains("bin/ui: content"), "{}", run.stdout);
    let j = d.env.run(&["--json", "verify"]).json();
    assert_eq!(j["data"]["snapshots"][0]["status"], "changed");
    assert_eq!(j["data"]["snapshots"][0]["changes"][0]["path"], "bin/ui");

    // A manual rollback to a changed snapshot is refused before anything stops.
    let (files, manifest) = v2_partial();
    let pkg = d.pack("2.0.0", &files, &manifest);
    d.deliver("2.0.0", pkg.clone()).expect(0);
    d.sc.clear();
    let run = d.env.run(&["rollback"]);
    run.expect(1);
    assert!(run.stderr.contains("DEPLOYMENT_FAILED"), "{}", run.stderr);
    assert!(run.stderr.contains("bin/ui"), "{}", run.stderr);
    assert!(d.sc.calls().is_empty(), "{:?}", d.sc.calls());
    assert_eq!(d.link("current").as_deref(), Some("v2.0.0"));
}

#[test]
fn automatic_rollback_prefers_factory_over_a_changed_previous() {
    let mut d = Device::with_factory();
    // previous (1.0.0 once 2.0.0 is in) changed in place.
    std::fs::write(d.root().join("v1.0.0/share/a.txt"), b"ALPHA 1").unwrap();
    d.sc.touch("fail-start-device-api@v2.0.0");
    let (files, manifest) = v2_partial();
    let pkg = d.pack("2.0.0", &files, &manifest);
    d.deliver("2.0.0", pkg).expect(1);
    assert_eq!(d.env.state()["rollback"], "factory 0.9.0");
    d.assert_current_is(&factory_files());
}

#[test]
fn mutable_paths_are_not_verified() {
    let mut d = Device::new();
    let mut files = v1_files();
    files.push(("data/settings.ini", b"speed=1\n", 0o644));
    let mut manifest = full_manifest("1.0.0");
    manifest["mutable"] = json!(["data"]);
    manifest["modules"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "data", "src": "data", "dst": "data"}));
    let pkg = d.pack("1.0.0", &files, &manifest);
    d.deliver("1.0.0", pkg).expect(0);
    std::fs::write(d.root().join("current/data/settings.ini"), b"speed=2\n").unwrap();
    std::fs::write(d.root().join("current/data/history.log"), b"print 1\n").unwrap();
    d.env.run(&["verify"]).expect(0);
}

#[test]
fn heal_brings_current_up_after_rollback_failed() {
    let mut d = Device::with_factory();
    d.sc.touch("fail-start-device-api");
    let (files, manifest) = v2_partial();
    let pkg = d.pack("2.0.0", &files, &manifest);
    d.deliver("2.0.0", pkg).expect(1);
    assert_eq!(d.env.state()["error"], "ROLLBACK_FAILED");
    assert_eq!(d.sc.running("device-api"), None);
    // The fault is gone (a flaky mainboard came back): heal starts current's services.
    d.sc.rm("fail-start-device-api");
    let run = d.env.run(&["heal"]);
    run.expect(0);
    assert!(
        run.stdout.contains("started the services"),
        "{}",
        run.stdout
    );
    let cur = d.link("current").unwrap();
    assert_eq!(d.sc.running("device-api").as_deref(), Some(cur.as_str()));
    assert_eq!(
        d.env.state()["error"],
        "ROLLBACK_FAILED",
        "still for a person"
    );
    // With the services up, the next heal has nothing to do.
    assert_eq!(d.env.run(&["heal"]).stdout, "");
}

#[test]
fn heal_never_records_success_for_a_version_current_does_not_run() {
    // A reboot package switched in; then a rollback to 1.0.0 ran whose state writes were lost
    // (a full state disk): state.json still says `rebooting` into 2.0.0, current is 1.0.0.
    let mut d = Device::with_v1();
    d.env.set("TOPE_OTA_REBOOT_CMD", "true");
    let (files, mut manifest) = v2_partial();
    manifest["reboot"] = json!(true);
    let pkg = d.pack("2.0.0", &files, &manifest);
    d.deliver("2.0.0", pkg).expect(0);
    assert_eq!(d.env.state()["stage"], "rebooting");
    std::fs::remove_file(d.root().join("current")).unwrap();
    std::os::unix::fs::symlink("v1.0.0", d.root().join("current")).unwrap();
    d.env.run(&["heal"]).expect(0);
    let s = d.env.state();
    if s["stage"] == "success" {
        assert_eq!(d.link("current").as_deref(), Some("v2.0.0"), "{s:#}");
        d.assert_current_is(&v2_files());
    } else {
        d.assert_current_is(&v1_files());
    }
}
