//! Schemas of state.json, callback.json and the snapshot records (issue 23, item 3): an older
//! tope-ota meeting a newer schema refuses with `SCHEMA_TOO_NEW` and leaves the file as it is,
//! never misreads it; a file from before schemas reads as the core schema 1.

use crate::install::*;
use crate::serve::{call, Server};
use serde_json::{json, Value};

/// A state.json a later tope-ota could write: a stage and an error code this build does not
/// know, an install in flight that must not be thrown away.
fn newer_state() -> Vec<u8> {
    json!({"schema": 2, "stage": "swapping", "error": "NEW_CODE", "progress": 60,
           "message": "a later updater's install", "version": "3.0.0"})
    .to_string()
    .into_bytes()
}

#[test]
fn every_command_refuses_a_newer_state_and_leaves_it_untouched() {
    let d = Device::with_v1();
    let newer = newer_state();
    std::fs::write(d.env.state_dir.join("state.json"), &newer).unwrap();
    let before: Vec<String> = d.env.download_files();
    for args in [
        &["status"][..],
        &["heal"],
        &["install"],
        &["rollback"],
        &["factory"],
        &[
            "download",
            "--version",
            "2.0.0",
            "--url",
            "http://127.0.0.1:9/p.zip",
            "--name",
            "p.zip",
            "--size",
            "10",
            "--md5",
            "0123456789abcdef0123456789abcdef",
        ],
    ] {
        let run = d.env.run(args);
        assert_eq!(run.code, 1, "{args:?}: {}", run.stderr);
        assert!(
            run.stderr.contains("error: SCHEMA_TOO_NEW: ") && run.stderr.contains("schema 2"),
            "{args:?}: {}",
            run.stderr
        );
        let j = d.env.run(&[&["--json"][..], args].concat());
        assert_eq!(
            j.json()["error"],
            "SCHEMA_TOO_NEW",
            "{args:?}: {}",
            j.stdout
        );
        assert_eq!(
            std::fs::read(d.env.state_dir.join("state.json")).unwrap(),
            newer,
            "{args:?} changed state.json"
        );
    }
    let aside: Vec<_> = std::fs::read_dir(&d.env.state_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("corrupt"))
        .collect();
    assert!(aside.is_empty(), "moved aside: {aside:?}");
    assert_eq!(d.env.download_files(), before);
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
    assert!(
        d.sc.calls().is_empty(),
        "services touched: {:?}",
        d.sc.calls()
    );
}

#[test]
fn serve_answers_schema_too_new_and_starts_nothing() {
    let d = Device::with_v1();
    let newer = newer_state();
    std::fs::write(d.env.state_dir.join("state.json"), &newer).unwrap();
    let srv = Server::start(&d.env);
    let (status, v) = call(&srv.addr, "GET", "/api/v1.0/progress", None);
    assert_eq!(status, 500, "{v}");
    assert!(
        v["msg"].as_str().unwrap().starts_with("SCHEMA_TOO_NEW: "),
        "{v}"
    );
    let body = json!({"version": "2.0.0", "package_url": "http://127.0.0.1:9/p.zip",
        "package_name": "p.zip", "package_size": 10,
        "package_md5": "0123456789abcdef0123456789abcdef"})
    .to_string();
    for path in ["/api/v1.0/download", "/api/v1.0/update"] {
        let req = if path.ends_with("update") {
            r#"{"version":"2.0.0"}"#
        } else {
            body.as_str()
        };
        let (status, v) = call(&srv.addr, "POST", path, Some(req));
        assert_eq!(status, 500, "{path}: {v}");
        assert!(
            v["msg"].as_str().unwrap().starts_with("SCHEMA_TOO_NEW: "),
            "{path}: {v}"
        );
    }
    assert!(srv.children().is_empty(), "serve started a child");
    assert_eq!(
        std::fs::read(d.env.state_dir.join("state.json")).unwrap(),
        newer
    );
}

#[test]
fn files_from_before_schemas_read_as_schema_1_and_are_written_as_1() {
    let d = Device::with_v1();
    // An older build's state and snapshot record: no schema field at all.
    std::fs::write(
        d.env.state_dir.join("state.json"),
        br#"{"stage":"failed","error":"MD5_MISMATCH","message":"old","version":"1.1.0"}"#,
    )
    .unwrap();
    let rec = d.root().join("v1.0.0/.tope-ota/files.json");
    let mut old: Value = serde_json::from_slice(&std::fs::read(&rec).unwrap()).unwrap();
    assert_eq!(old["schema"], 1, "this build writes schema 1");
    old.as_object_mut().unwrap().remove("schema");
    std::fs::write(&rec, old.to_string()).unwrap();
    let st = d.env.run(&["--json", "status"]);
    st.expect(0);
    assert_eq!(st.json()["error"], "MD5_MISMATCH");
    let v = d.env.run(&["verify"]);
    v.expect(0);
    assert!(
        v.stdout.contains("v1.0.0 (current): intact"),
        "{}",
        v.stdout
    );
    d.env.run(&["heal"]).expect(0);
    let s = d.env.state();
    assert_eq!(
        (s["schema"].clone(), s["stage"].clone()),
        (json!(1), json!("idle")),
        "{s}"
    );
}

#[test]
fn a_schema_1_state_with_an_unknown_stage_is_still_corrupt() {
    let d = Device::with_v1();
    let odd = br#"{"schema":1,"stage":"swapping"}"#;
    std::fs::write(d.env.state_dir.join("state.json"), odd).unwrap();
    d.env.run(&["heal"]).expect(0);
    assert_eq!(d.env.state()["stage"], "idle");
    let aside: Vec<Vec<u8>> = std::fs::read_dir(&d.env.state_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
        .map(|e| std::fs::read(e.path()).unwrap())
        .collect();
    assert_eq!(aside, vec![odd.to_vec()]);
}

#[test]
fn a_snapshot_record_of_a_newer_schema_is_not_compared_and_not_guessed_at() {
    let mut d = Device::with_v1();
    let rec = d.root().join("v1.0.0/.tope-ota/files.json");
    let newer =
        br#"{"schema":2,"entries":{"bin/device-api":{"kind":"file","digest":"elsewhere"}}}"#;
    std::fs::write(&rec, newer).unwrap();
    let v = d.env.run(&["--json", "verify"]);
    v.expect(0);
    let snaps = v.json()["data"]["snapshots"].clone();
    assert_eq!(snaps[0]["status"], "newer-record", "{snaps}");
    let human = d.env.run(&["verify"]);
    assert!(
        human.stdout.contains("v1.0.0 (current): newer-record"),
        "{}",
        human.stdout
    );
    // Which of current's paths are data cannot be read from it: an install refuses rather than
    // guess, and changes nothing.
    d.sc.clear();
    let p = d.pack("1.1.0", &v1_files(), &full_manifest("1.1.0"));
    let run = d.deliver("1.1.0", p);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("SCHEMA_TOO_NEW"), "{}", run.stderr);
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
    assert_eq!(
        std::fs::read(&rec).unwrap(),
        newer,
        "the newer record was rewritten"
    );
    assert!(
        !d.sc.calls().iter().any(|c| c.contains("stop")),
        "services stopped: {:?}",
        d.sc.calls()
    );
}
