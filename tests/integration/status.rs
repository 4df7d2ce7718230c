//! `status` and the subcommands of later issues.

use crate::support::*;

#[test]
fn status_of_a_fresh_device_is_idle() {
    let env = Env::new();
    let run = env.run(&["status"]);
    run.expect(0);
    assert!(run.stdout.contains("stage:     idle"), "{}", run.stdout);
    assert!(run.stdout.contains("current:   -"), "{}", run.stdout);
    let j = env.run(&["--json", "status"]).json();
    assert_eq!(
        j,
        serde_json::json!({"stage": "idle", "progress": 0, "message": "", "error": null,
            "bytes_done": 0, "bytes_total": 0, "speed_bps": 0, "eta_s": null, "step": null,
            "bytes_fetched": 0, "bytes_reused": 0})
    );
    assert!(!env.state_dir.exists(), "status writes nothing");
}

#[test]
fn status_shows_state_and_versions() {
    let env = Env::new();
    std::fs::create_dir_all(&env.state_dir).unwrap();
    std::fs::create_dir_all(env.versions_dir.join("v1.1.0")).unwrap();
    std::fs::create_dir_all(env.versions_dir.join("v1.0.0")).unwrap();
    std::os::unix::fs::symlink("v1.1.0", env.versions_dir.join("current")).unwrap();
    std::os::unix::fs::symlink("v1.0.0", env.versions_dir.join("previous")).unwrap();
    std::os::unix::fs::symlink("v1.0.0", env.versions_dir.join("factory")).unwrap();
    std::fs::write(
        env.state_dir.join("state.json"),
        r#"{"stage":"failed","progress":40,"message":"expected a, got b","error":"MD5_MISMATCH","version":"1.2.0"}"#,
    )
    .unwrap();
    let run = env.run(&["status"]);
    run.expect(0);
    for line in [
        "stage:     failed",
        "progress:  40%",
        "version:   1.2.0",
        "error:     MD5_MISMATCH",
        "current:   1.1.0",
        "previous:  1.0.0",
        "factory:   1.0.0",
    ] {
        assert!(
            run.stdout.contains(line),
            "missing {line:?} in\n{}",
            run.stdout
        );
    }
    let j = env.run(&["--json", "status"]).json();
    assert_eq!(
        j,
        serde_json::json!({"stage": "failed", "progress": 40, "message": "expected a, got b", "error": "MD5_MISMATCH",
            "bytes_done": 0, "bytes_total": 0, "speed_bps": 0, "eta_s": null, "step": null,
            "bytes_fetched": 0, "bytes_reused": 0})
    );
}

#[test]
fn status_reads_a_corrupt_state_without_changing_it() {
    let env = Env::new();
    std::fs::create_dir_all(&env.state_dir).unwrap();
    std::fs::write(env.state_dir.join("state.json"), b"garbage").unwrap();
    let j = env.run(&["--json", "status"]).expect(0).json();
    assert_eq!(j["stage"], "idle");
    assert!(j["message"].as_str().unwrap().contains("unreadable"));
    assert_eq!(
        std::fs::read(env.state_dir.join("state.json")).unwrap(),
        b"garbage"
    );
}

#[test]
fn usage_errors_exit_2() {
    let env = Env::new();
    env.run(&["download", "--version", "1"]).expect(2);
    env.run(&["frobnicate"]).expect(2);
    env.run(&["rollback", "--to"]).expect(2);
}
