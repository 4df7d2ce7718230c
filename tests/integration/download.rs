//! `download`: SPEC section 4 "download", section 5 callbacks, section 9 exit codes.

use crate::support::*;
use serde_json::Value;
use std::time::{Duration, Instant};

const MIB: usize = 1024 * 1024;

pub(crate) struct Pkg {
    pub(crate) bytes: Vec<u8>,
    pub(crate) md5: String,
}

pub(crate) fn pkg(len: usize, seed: u64) -> Pkg {
    let bytes = data(len, seed);
    let md5 = md5_hex(&bytes);
    Pkg { bytes, md5 }
}

pub(crate) fn args<'a>(url: &'a str, p: &'a Pkg, size: &'a str) -> Vec<&'a str> {
    vec![
        "download",
        "--version",
        "1.2.0",
        "--url",
        url,
        "--name",
        "pkg.zip",
        "--size",
        size,
        "--md5",
        &p.md5,
    ]
}

pub(crate) fn download(env: &Env, srv: &PkgServer, p: &Pkg) -> Run {
    let url = srv.url("pkg.zip");
    let size = p.bytes.len().to_string();
    env.run(&args(&url, p, &size))
}

#[track_caller]
fn assert_installed_package(env: &Env, p: &Pkg) {
    let s = env.state();
    assert_eq!(s["stage"], "toInstall", "{s:#}");
    assert_eq!(s["progress"], 100);
    assert_eq!(s["error"], Value::Null);
    assert!(
        s["verified_at"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{s:#}"
    );
    assert_eq!(s["bytes_downloaded"], p.bytes.len() as u64);
    let got = std::fs::read(env.downloads().join("pkg.zip")).unwrap();
    assert!(got == p.bytes, "downloaded bytes differ");
    assert_eq!(env.download_files(), vec!["pkg.zip"]);
}

#[track_caller]
fn assert_failed(env: &Env, run: &Run, code: &str) -> Value {
    run.expect(1);
    assert!(
        run.stderr.contains(&format!("error: {code}: ")),
        "stderr: {}",
        run.stderr
    );
    let s = env.state();
    assert_eq!(s["stage"], "failed", "{s:#}");
    assert_eq!(s["error"], code, "{s:#}");
    s
}

#[test]
fn happy_path() {
    let env = Env::new();
    let p = pkg(3 * MIB + 17, 1);
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    let run = download(&env, &srv, &p);
    run.expect(0);
    assert!(run.stdout.contains("MD5 verified"), "{}", run.stdout);
    assert_installed_package(&env, &p);
    let reqs = srv.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].range(), None);
    assert_eq!(srv.body_bytes(), p.bytes.len() as u64);
}

#[test]
fn json_output_and_request_from_stdin() {
    let env = Env::new();
    let p = pkg(MIB, 2);
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    let body = serde_json::json!({
        "version": "1.2.0",
        "package_url": srv.url("pkg.zip"),
        "package_name": "pkg.zip",
        "package_size": p.bytes.len(),
        "package_md5": p.md5.to_uppercase(),
    });
    let run = env.run_stdin(
        &["--json", "download", "--request", "-"],
        body.to_string().as_bytes(),
    );
    run.expect(0);
    let out = run.json();
    assert_eq!(out["code"], 200);
    assert_eq!(out["msg"], "success");
    assert_eq!(out["data"]["stage"], "toInstall");
    assert_eq!(out["data"]["progress"], 100);
    assert_installed_package(&env, &p);
    assert_eq!(
        env.state()["package_md5"],
        p.md5,
        "md5 normalized to lowercase"
    );
}

#[test]
fn request_from_file() {
    let env = Env::new();
    let p = pkg(MIB / 2, 3);
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    let req = env.tmp.path().join("req.json");
    std::fs::write(
        &req,
        serde_json::json!({
            "version": "1.2.0", "package_url": srv.url("pkg.zip"), "package_name": "pkg.zip",
            "package_size": p.bytes.len(), "package_md5": p.md5,
        })
        .to_string(),
    )
    .unwrap();
    env.run(&["download", "--request", req.to_str().unwrap()])
        .expect(0);
    assert_installed_package(&env, &p);
}

#[test]
fn content_length_disagrees_with_package_size() {
    let env = Env::new();
    let p = pkg(MIB, 4);
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            content_length: Some(MIB as u64 + 10),
            ..Behaviour::default()
        },
    );
    let run = download(&env, &srv, &p);
    let s = assert_failed(&env, &run, "PACKAGE_SIZE_MISMATCH");
    assert!(s["message"].as_str().unwrap().contains("1048586"), "{s:#}");
    assert!(
        env.download_files().is_empty(),
        "{:?}",
        env.download_files()
    );
    assert_eq!(srv.requests().len(), 1, "a size mismatch is not retried");
}

#[test]
fn body_shorter_than_package_size() {
    let env = Env::new();
    let p = pkg(MIB, 5);
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            chunked_len: Some(MIB as u64 - 1000),
            ..Behaviour::default()
        },
    );
    let run = download(&env, &srv, &p);
    assert_failed(&env, &run, "PACKAGE_SIZE_MISMATCH");
    assert!(env.download_files().is_empty());
}

#[test]
fn body_longer_than_package_size() {
    let env = Env::new();
    let p = pkg(MIB, 6);
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            chunked_len: Some(MIB as u64 + 1000),
            ..Behaviour::default()
        },
    );
    let run = download(&env, &srv, &p);
    assert_failed(&env, &run, "PACKAGE_SIZE_MISMATCH");
    assert!(env.download_files().is_empty());
}

#[test]
fn md5_mismatch_deletes_the_file() {
    let env = Env::new();
    let p = pkg(MIB, 7);
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    let wrong = Pkg {
        bytes: p.bytes.clone(),
        md5: "0123456789abcdef0123456789abcdef".into(),
    };
    let run = download(&env, &srv, &wrong);
    let s = assert_failed(&env, &run, "MD5_MISMATCH");
    assert!(s["message"].as_str().unwrap().contains(&p.md5), "{s:#}");
    assert!(
        env.download_files().is_empty(),
        "{:?}",
        env.download_files()
    );
}

#[test]
fn resume_after_sigkill() {
    let env = Env::new();
    let p = pkg(8 * MIB, 8);
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            throttle: Some((64 * 1024, Duration::from_millis(10))),
            ..Behaviour::default()
        },
    );
    let url = srv.url("pkg.zip");
    let size = p.bytes.len().to_string();
    let mut child = env.spawn(&args(&url, &p, &size));
    env.wait_state(30, "progress 30", |s| s["progress"].as_u64() >= Some(30));
    kill(&child, libc::SIGKILL);
    child.wait().unwrap();
    let s = env.state();
    assert_eq!(s["stage"], "downloading");
    let durable = s["bytes_downloaded"].as_u64().unwrap();
    assert!(durable > 0);

    srv.set(|b| b.throttle = None);
    env.run(&args(&url, &p, &size)).expect(0);
    assert_installed_package(&env, &p);
    let reqs = srv.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    let range = reqs[1].range().expect("the resume sends Range");
    let from: u64 = range
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        from >= durable,
        "resumed from {from}, durable was {durable}"
    );
    assert_eq!(
        reqs[1].headers.get("if-range").map(String::as_str),
        Some("\"pkg-etag-1\"")
    );
    assert_eq!(reqs[1].status, 206);
    let served = srv.body_bytes() as f64;
    assert!(
        served < 1.1 * p.bytes.len() as f64,
        "served {served} bytes for a {} byte package",
        p.bytes.len()
    );
}

/// Leave a resumable partial: the connection drops mid-body and no retries are allowed.
fn leave_partial(env: &mut Env, srv: &PkgServer, p: &Pkg) -> u64 {
    env.set("TOPE_OTA_RETRIES", "0");
    let run = download(env, srv, p);
    assert_failed(env, &run, "DOWNLOAD_FAILED");
    env.vars.remove("TOPE_OTA_RETRIES");
    assert_eq!(env.download_files(), vec!["pkg.zip.part"]);
    let durable = env.state()["bytes_downloaded"].as_u64().unwrap();
    assert!(durable > 0);
    durable
}

/// A 2 MiB package whose first download was cut at 1 MiB, leaving a resumable partial.
fn with_partial(seed: u64) -> (Env, Pkg, PkgServer) {
    let mut env = Env::new();
    let p = pkg(2 * MIB, seed);
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            drop_once_at: Some(MIB as u64),
            ..Behaviour::default()
        },
    );
    leave_partial(&mut env, &srv, &p);
    (env, p, srv)
}

#[test]
fn server_ignoring_range_restarts_from_zero() {
    let (env, p, srv) = with_partial(9);
    srv.set(|b| b.honor_range = false);
    download(&env, &srv, &p).expect(0);
    assert_installed_package(&env, &p);
    let reqs = srv.requests();
    assert_eq!(reqs.len(), 2);
    assert!(reqs[1].range().is_some());
    assert_eq!(reqs[1].status, 200);
}

#[test]
fn range_not_satisfiable_deletes_partial_and_restarts() {
    let (env, p, srv) = with_partial(10);
    srv.set(|b| b.refuse_ranges = true);
    download(&env, &srv, &p).expect(0);
    assert_installed_package(&env, &p);
    let reqs = srv.requests();
    let statuses: Vec<(u16, bool)> = reqs
        .iter()
        .map(|r| (r.status, r.range().is_some()))
        .collect();
    assert_eq!(statuses, vec![(200, false), (416, true), (200, false)]);
}

#[test]
fn stall_mid_body_times_out_and_resumes() {
    let mut env = Env::new();
    env.set("TOPE_OTA_STALL_TIMEOUT_MS", "500");
    let p = pkg(2 * MIB, 11);
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            stall_once_at: Some(MIB as u64 + 5),
            ..Behaviour::default()
        },
    );
    let t = Instant::now();
    download(&env, &srv, &p).expect(0);
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "a stall must not hang the command"
    );
    assert_installed_package(&env, &p);
    let reqs = srv.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[1].status, 206);
    assert!(srv.body_bytes() < (2 * MIB + MIB / 5) as u64);
}

#[test]
fn dropped_connection_is_retried_and_resumed() {
    let env = Env::new();
    let p = pkg(2 * MIB, 12);
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            drop_once_at: Some(MIB as u64 + 333),
            ..Behaviour::default()
        },
    );
    download(&env, &srv, &p).expect(0);
    assert_installed_package(&env, &p);
    let reqs = srv.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].status, 206);
    assert_eq!(reqs[1].range(), Some("bytes=1048909-"));
}

#[test]
fn server_errors_are_retried_with_backoff() {
    let env = Env::new();
    let p = pkg(MIB, 13);
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            fail_first: 2,
            ..Behaviour::default()
        },
    );
    download(&env, &srv, &p).expect(0);
    assert_installed_package(&env, &p);
    let statuses: Vec<u16> = srv.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![503, 503, 200]);
}

#[test]
fn retries_spent_is_download_failed_and_keeps_nothing_broken() {
    let mut env = Env::new();
    env.set("TOPE_OTA_RETRIES", "2");
    let p = pkg(MIB, 14);
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            fail_first: 100,
            ..Behaviour::default()
        },
    );
    let run = download(&env, &srv, &p);
    let s = assert_failed(&env, &run, "DOWNLOAD_FAILED");
    assert!(s["message"].as_str().unwrap().contains("503"), "{s:#}");
    assert_eq!(srv.requests().len(), 3);
}

#[test]
fn not_found_is_not_retried() {
    let env = Env::new();
    let p = pkg(1000, 15);
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            status: Some(404),
            ..Behaviour::default()
        },
    );
    let run = download(&env, &srv, &p);
    let s = assert_failed(&env, &run, "DOWNLOAD_FAILED");
    assert!(s["message"].as_str().unwrap().contains("404"), "{s:#}");
    assert_eq!(srv.requests().len(), 1);
}

#[test]
fn unreachable_server_fails_after_retries() {
    let mut env = Env::new();
    env.set("TOPE_OTA_RETRIES", "1");
    let p = pkg(1000, 15);
    let url = "http://127.0.0.1:1/nothing-listens-here.zip".to_string();
    let run = env.run(&args(&url, &p, "1000"));
    let s = assert_failed(&env, &run, "DOWNLOAD_FAILED");
    assert!(
        s["message"]
            .as_str()
            .unwrap()
            .contains("gave up after 2 attempts"),
        "{s:#}"
    );
}

#[test]
fn disk_full_precheck() {
    let fs = Tmpfs::mount(16);
    let mut env = Env::new();
    env.state_dir = fs.path().join("state");
    let p = pkg(1000, 16);
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    let url = srv.url("pkg.zip");
    let big = (64 * MIB).to_string();
    let run = env.run(&args(&url, &p, &big));
    let s = assert_failed(&env, &run, "DISK_FULL");
    assert!(s["message"].as_str().unwrap().contains("67108864"), "{s:#}");
    assert!(
        srv.requests().is_empty(),
        "nothing is fetched when it cannot fit"
    );
}

#[test]
fn enospc_mid_body_keeps_state_intact() {
    let fs = Tmpfs::mount(16);
    let mut env = Env::new();
    env.state_dir = fs.path().join("state");
    let p = pkg(8 * MIB, 17);
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            gate_at: Some(2 * MIB as u64),
            ..Behaviour::default()
        },
    );
    let url = srv.url("pkg.zip");
    let size = p.bytes.len().to_string();
    let child = env.spawn(&args(&url, &p, &size));
    srv.wait_gate(20);
    env.wait_state(20, "2 MiB durable", |s| {
        s["bytes_downloaded"].as_u64() >= Some(2 * MIB as u64 * 9 / 10)
    });
    fs.fill("filler");
    srv.release();
    let run = Run::from(child.wait_with_output().unwrap());
    let s = assert_failed(&env, &run, "DISK_FULL");
    assert_eq!(s["version"], "1.2.0");
    assert!(
        env.download_files().is_empty(),
        "the partial is deleted to give the space back"
    );
    // Once space is back, the same request downloads it whole.
    std::fs::remove_file(fs.path().join("filler")).unwrap();
    srv.set(|b| b.gate_at = None);
    env.run(&args(&url, &p, &size)).expect(0);
    assert_installed_package(&env, &p);
}

#[test]
fn invalid_inputs_are_refused_with_nothing_written() {
    let env = Env::new();
    let good_md5 = "0123456789abcdef0123456789abcdef";
    let cases: &[(&str, [&str; 5])] = &[
        (
            "name with /",
            ["1.2.0", "http://h/p.zip", "a/b.zip", "10", good_md5],
        ),
        (
            "version ..",
            ["..", "http://h/p.zip", "p.zip", "10", good_md5],
        ),
        (
            "version with space",
            ["1 2", "http://h/p.zip", "p.zip", "10", good_md5],
        ),
        (
            "short md5",
            ["1.2.0", "http://h/p.zip", "p.zip", "10", "abc123"],
        ),
        (
            "size 0",
            ["1.2.0", "http://h/p.zip", "p.zip", "0", good_md5],
        ),
        (
            "ftp url",
            ["1.2.0", "ftp://h/p.zip", "p.zip", "10", good_md5],
        ),
    ];
    for (what, [v, u, n, s, m]) in cases {
        let run = env.run(&[
            "--json",
            "download",
            "--version",
            v,
            "--url",
            u,
            "--name",
            n,
            "--size",
            s,
            "--md5",
            m,
        ]);
        assert_eq!(run.code, 2, "{what}: {run:?}");
        assert!(
            run.stderr.contains("error: INVALID_REQUEST: "),
            "{what}: {}",
            run.stderr
        );
        let out = run.json();
        assert_eq!(out["code"], 400, "{what}");
        assert_eq!(out["error"], "INVALID_REQUEST", "{what}");
        assert!(!env.state_dir.exists(), "{what}: the state dir was created");
    }
    // The same checks apply to a --request body, which also refuses unknown and missing fields.
    for (what, body) in [
        (
            "extra field",
            r#"{"version":"1","package_url":"http://h/p","package_name":"p","package_size":1,"package_md5":"0123456789abcdef0123456789abcdef","x":1}"#,
        ),
        (
            "missing field",
            r#"{"version":"1","package_url":"http://h/p","package_name":"p","package_size":1}"#,
        ),
        (
            "wrong type",
            r#"{"version":"1","package_url":"http://h/p","package_name":"p","package_size":"1","package_md5":"0123456789abcdef0123456789abcdef"}"#,
        ),
        ("not json", "{"),
    ] {
        let run = env.run_stdin(&["download", "--request", "-"], body.as_bytes());
        assert_eq!(run.code, 2, "{what}: {run:?}");
        assert!(
            run.stderr.contains("INVALID_REQUEST"),
            "{what}: {}",
            run.stderr
        );
        assert!(!env.state_dir.exists(), "{what}: the state dir was created");
    }
}

#[test]
fn second_writer_is_busy_while_first_completes() {
    let env = Env::new();
    let p = pkg(4 * MIB, 18);
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            throttle: Some((64 * 1024, Duration::from_millis(5))),
            ..Behaviour::default()
        },
    );
    let url = srv.url("pkg.zip");
    let size = p.bytes.len().to_string();
    let first = env.spawn(&args(&url, &p, &size));
    env.wait_state(20, "downloading", |s| s["stage"] == "downloading");
    let t = Instant::now();
    let second = env.run(&[
        "--json",
        "download",
        "--version",
        "9.9.9",
        "--url",
        &url,
        "--name",
        "other.zip",
        "--size",
        "5",
        "--md5",
        &p.md5,
    ]);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "BUSY must not wait for the lock"
    );
    second.expect(75);
    assert!(second.stderr.contains("error: BUSY: "), "{}", second.stderr);
    assert_eq!(second.json()["error"], "BUSY");
    let first = Run::from(first.wait_with_output().unwrap());
    first.expect(0);
    assert_installed_package(&env, &p);
}

#[test]
fn corrupt_state_is_moved_aside() {
    let env = Env::new();
    std::fs::create_dir_all(&env.state_dir).unwrap();
    std::fs::write(env.state_dir.join("state.json"), b"{\"stage\": \"downl").unwrap();
    let p = pkg(1000, 19);
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    let run = download(&env, &srv, &p);
    run.expect(0);
    assert!(run.stderr.contains("moved aside"), "{}", run.stderr);
    assert_eq!(env.state()["stage"], "toInstall");
    let aside: Vec<_> = std::fs::read_dir(&env.state_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("state.json.corrupt-")
        })
        .collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(
        std::fs::read(aside[0].path()).unwrap(),
        b"{\"stage\": \"downl"
    );
}

#[test]
fn sigterm_leaves_a_resumable_partial() {
    let env = Env::new();
    let p = pkg(4 * MIB, 20);
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            throttle: Some((64 * 1024, Duration::from_millis(10))),
            ..Behaviour::default()
        },
    );
    let url = srv.url("pkg.zip");
    let size = p.bytes.len().to_string();
    let child = env.spawn(&args(&url, &p, &size));
    env.wait_state(20, "progress 20", |s| s["progress"].as_u64() >= Some(20));
    kill(&child, libc::SIGTERM);
    let run = Run::from(child.wait_with_output().unwrap());
    run.expect(143);
    let s = env.state();
    assert_eq!(s["stage"], "downloading");
    assert_eq!(s["error"], Value::Null);
    let durable = s["bytes_downloaded"].as_u64().unwrap();
    let part = std::fs::metadata(env.downloads().join("pkg.zip.part"))
        .unwrap()
        .len();
    assert_eq!(
        part, durable,
        "on SIGTERM everything received is made durable"
    );
    srv.set(|b| b.throttle = None);
    env.run(&args(&url, &p, &size)).expect(0);
    assert_installed_package(&env, &p);
    assert_eq!(
        srv.requests()[1].range(),
        Some(format!("bytes={durable}-").as_str())
    );
}

#[test]
fn another_package_discards_the_old_partial() {
    let (env, _, _old_server) = with_partial(21);
    let q = pkg(MIB, 22);
    let srv2 = PkgServer::start(q.bytes.clone(), Behaviour::default());
    let url = srv2.url("new.zip");
    let size = q.bytes.len().to_string();
    env.run(&[
        "download",
        "--version",
        "1.3.0",
        "--url",
        &url,
        "--name",
        "new.zip",
        "--size",
        &size,
        "--md5",
        &q.md5,
    ])
    .expect(0);
    assert_eq!(env.download_files(), vec!["new.zip"]);
    assert_eq!(srv2.requests()[0].range(), None);
    assert_eq!(env.state()["version"], "1.3.0");
}

#[test]
fn already_verified_package_is_not_fetched_again() {
    let env = Env::new();
    let p = pkg(MIB, 23);
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    download(&env, &srv, &p).expect(0);
    download(&env, &srv, &p).expect(0);
    assert_eq!(srv.requests().len(), 1);
    assert_installed_package(&env, &p);
}

// ---------------------------------------------------------------- callbacks

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

#[test]
fn callbacks_follow_stages_and_five_point_steps() {
    let api = ApiStub::start(Duration::ZERO);
    let mut env = Env::new();
    env.set("TOPE_OTA_REPORT_URL", &api.url);
    let p = pkg(4 * MIB + 3, 24);
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    download(&env, &srv, &p).expect(0);
    let bodies = api.bodies();
    for b in &bodies {
        assert_eq!(keys(b), ["code", "data", "msg"]);
        assert_eq!(
            keys(&b["data"]),
            [
                "bytes_done",
                "bytes_fetched",
                "bytes_reused",
                "bytes_total",
                "error",
                "eta_s",
                "message",
                "progress",
                "speed_bps",
                "stage",
                "step",
                "version"
            ]
        );
        assert_eq!(b["code"], 200);
        assert_eq!(b["msg"], "success");
        assert_eq!(b["data"]["error"], Value::Null);
        assert_eq!(b["data"]["version"], "1.2.0");
    }
    let mut stages: Vec<&str> = bodies
        .iter()
        .map(|b| b["data"]["stage"].as_str().unwrap())
        .collect();
    stages.dedup();
    assert_eq!(stages, ["downloading", "verifying", "toInstall"]);
    let steps: Vec<u64> = bodies
        .iter()
        .filter(|b| b["data"]["stage"] == "downloading")
        .map(|b| b["data"]["progress"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (0..=20).map(|i| i * 5).collect::<Vec<u64>>());
    assert_eq!(bodies.last().unwrap()["data"]["progress"], 100);
}

#[test]
fn failure_callback_carries_the_code() {
    let api = ApiStub::start(Duration::ZERO);
    let mut env = Env::new();
    env.set("TOPE_OTA_REPORT_URL", &api.url);
    let p = pkg(MIB, 25);
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    let wrong = Pkg {
        bytes: p.bytes.clone(),
        md5: "ffffffffffffffffffffffffffffffff".into(),
    };
    download(&env, &srv, &wrong).expect(1);
    let last = api.bodies().last().cloned().unwrap();
    assert_eq!(last["code"], 500);
    assert!(
        last["msg"].as_str().unwrap().starts_with("MD5_MISMATCH: "),
        "{last}"
    );
    assert_eq!(last["data"]["stage"], "failed");
    assert_eq!(last["stage"], "failed", "beside code and msg too");
    assert_eq!(last["data"]["error"], "MD5_MISMATCH");
    assert_eq!(last["data"]["version"], "1.2.0");
}

#[test]
fn device_api_down_or_slow_never_fails_or_stalls_the_download() {
    let p = pkg(4 * MIB, 26);
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());

    let env = Env::new();
    let t = Instant::now();
    download(&env, &srv, &p).expect(0);
    let baseline = t.elapsed();

    // Down: nothing listens on the port.
    let mut down = Env::new();
    down.set(
        "TOPE_OTA_REPORT_URL",
        "http://127.0.0.1:1/api/v1.0/ota/report",
    );
    download(&down, &srv, &p).expect(0);
    assert_installed_package(&down, &p);

    // Slow: answers every callback after 5 s. Sent in line, 20+ callbacks would cost 10 s+.
    let api = ApiStub::start(Duration::from_secs(5));
    let mut slow = Env::new();
    slow.set("TOPE_OTA_REPORT_URL", &api.url);
    let t = Instant::now();
    download(&slow, &srv, &p).expect(0);
    let took = t.elapsed();
    assert_installed_package(&slow, &p);
    // The download itself is not slowed; at exit the process waits at most FLUSH_DEADLINE
    // for the stage changes.
    assert!(
        took < baseline + tope_ota::report::FLUSH_DEADLINE + Duration::from_millis(1000),
        "slow device-api slowed the download: {took:?} vs {baseline:?}"
    );
    assert!(!api.bodies().is_empty(), "callbacks were attempted");
}

// ---------------------------------------------------------------- terminal output and logs

/// Run the download under a pseudo-terminal (util-linux `script`), returning what the
/// terminal showed.
fn download_on_tty(env: &Env, srv: &PkgServer, p: &Pkg, extra: &[&str]) -> String {
    let url = srv.url("pkg.zip");
    let size = p.bytes.len().to_string();
    let mut words: Vec<String> = vec![BIN.to_string()];
    words.extend(extra.iter().map(|s| s.to_string()));
    words.extend(args(&url, p, &size).iter().map(|s| s.to_string()));
    let line = words.join(" ");
    let cmd = env.cmd(&[]);
    let out = std::process::Command::new("script")
        .args(["-qefc", &line, "/dev/null"])
        .envs(
            cmd.get_envs()
                .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned()))),
        )
        .env("TERM", "xterm")
        .output()
        .expect("script (bsdutils) is needed: bash tests/setup.sh installs it");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn progress_bar_only_on_a_terminal_and_never_with_json_or_quiet() {
    let p = pkg(4 * MIB, 27);
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            throttle: Some((256 * 1024, Duration::from_millis(20))),
            ..Behaviour::default()
        },
    );
    let shown = download_on_tty(&Env::new(), &srv, &p, &[]);
    assert!(
        shown.contains("downloading ["),
        "no bar on a terminal:\n{shown}"
    );
    assert!(shown.contains("MD5 verified"));
    let json = download_on_tty(&Env::new(), &srv, &p, &["--json"]);
    assert!(!json.contains("downloading ["), "bar with --json:\n{json}");
    let v: Value = serde_json::from_str(json.trim()).expect("only the JSON object");
    assert_eq!(v["code"], 200);
    let quiet = download_on_tty(&Env::new(), &srv, &p, &["-q"]);
    assert_eq!(quiet.trim(), "", "-q prints nothing on success");
    // Not a terminal: no bar either.
    let run = download(&Env::new(), &srv, &p);
    assert!(!run.stderr.contains('['), "{}", run.stderr);
}

#[test]
fn log_records_carry_version_and_stage() {
    let mut env = Env::new();
    env.set("TOPE_OTA_RETRIES", "3");
    let p = pkg(MIB, 28);
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            fail_first: 1,
            ..Behaviour::default()
        },
    );
    let url = srv.url("pkg.zip");
    let size = p.bytes.len().to_string();
    let mut a = vec!["-v"];
    a.extend(args(&url, &p, &size));
    let run = env.run(&a);
    run.expect(0);
    assert!(
        run.stderr
            .contains("tope-ota: warning: [1.2.0 downloading] download attempt failed"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("info: [1.2.0 toInstall]"),
        "{}",
        run.stderr
    );
}

// ---------------------------------------------------------------- HTTP corner cases (review)

#[test]
fn range_refused_without_a_partial_is_retried_with_backoff_not_looped() {
    let mut env = Env::new();
    env.set("TOPE_OTA_RETRIES", "2");
    let p = pkg(1000, 40);
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            status: Some(416),
            ..Behaviour::default()
        },
    );
    let run = download(&env, &srv, &p);
    assert_failed(&env, &run, "DOWNLOAD_FAILED");
    assert_eq!(
        srv.requests().len(),
        3,
        "one request per attempt, no tight loop"
    );
}

#[test]
fn sigterm_stops_a_download_that_keeps_failing() {
    let mut env = Env::new();
    env.set("TOPE_OTA_RETRY_DELAY_MS", "200");
    env.set("TOPE_OTA_RETRIES", "1000");
    let p = pkg(1000, 41);
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            status: Some(503),
            ..Behaviour::default()
        },
    );
    let url = srv.url("pkg.zip");
    let child = env.spawn(&args(&url, &p, "1000"));
    env.wait_state(10, "downloading", |s| s["stage"] == "downloading");
    std::thread::sleep(Duration::from_millis(300));
    kill(&child, libc::SIGTERM);
    let t = Instant::now();
    let run = Run::from(child.wait_with_output().unwrap());
    assert!(t.elapsed() < Duration::from_secs(5));
    run.expect(143);
}

#[test]
fn short_ranges_are_continued() {
    let mut env = Env::new();
    let p = pkg(2 * MIB, 42);
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            drop_once_at: Some(MIB as u64 / 2),
            max_range: Some(256 * 1024),
            ..Behaviour::default()
        },
    );
    leave_partial(&mut env, &srv, &p);
    download(&env, &srv, &p).expect(0);
    assert_installed_package(&env, &p);
    let partials = srv.requests().iter().filter(|r| r.status == 206).count();
    assert!(partials >= 6, "{partials} range responses");
    assert!(srv.body_bytes() < (2 * MIB + MIB / 5) as u64);
}

#[test]
fn weak_etag_sends_no_if_range() {
    let mut env = Env::new();
    let p = pkg(2 * MIB, 43);
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            drop_once_at: Some(MIB as u64),
            etag: Some("W/\"weak\"".into()),
            ..Behaviour::default()
        },
    );
    leave_partial(&mut env, &srv, &p);
    download(&env, &srv, &p).expect(0);
    let reqs = srv.requests();
    assert!(reqs[1].range().is_some());
    assert_eq!(reqs[1].headers.get("if-range"), None);
    assert_eq!(reqs[1].status, 206);
}

#[test]
fn a_changed_file_behind_a_server_ignoring_if_range_restarts_cleanly() {
    let (env, p, srv) = with_partial(44);
    srv.set(|b| {
        b.etag = Some("\"pkg-etag-2\"".into());
        b.ignore_if_range = true;
    });
    download(&env, &srv, &p).expect(0);
    assert_installed_package(&env, &p);
    let statuses: Vec<(u16, bool)> = srv
        .requests()
        .iter()
        .map(|r| (r.status, r.range().is_some()))
        .collect();
    assert_eq!(statuses, vec![(200, false), (206, true), (200, false)]);
}

// ---------------------------------------------------------------- SHA-256 (issue 8)

#[test]
fn sha256_good_bad_and_resumed() {
    let p = pkg(2 * MIB, 50);
    let good = sha256_hex(&p.bytes);
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    let url = srv.url("pkg.zip");
    let size = p.bytes.len().to_string();

    let env = Env::new();
    let mut a = args(&url, &p, &size);
    a.extend(["--sha256", &good]);
    env.run(&a).expect(0);
    assert_installed_package(&env, &p);
    assert_eq!(env.state()["package_sha256"], good);

    let env = Env::new();
    let bad = "ab".repeat(32);
    let mut a = args(&url, &p, &size);
    a.extend(["--sha256", &bad]);
    let run = env.run(&a);
    let s = assert_failed(&env, &run, "SHA256_MISMATCH");
    assert!(s["message"].as_str().unwrap().contains(&good), "{s:#}");
    assert!(env.download_files().is_empty(), "the bad file is deleted");

    // Through --request, and resumed: the SHA-256 is rebuilt from the bytes on disk.
    let mut env = Env::new();
    let drop_srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            drop_once_at: Some(MIB as u64 + 77),
            ..Behaviour::default()
        },
    );
    env.set("TOPE_OTA_RETRIES", "0");
    let body = serde_json::json!({"version": "1.2.0", "package_url": drop_srv.url("pkg.zip"), "package_name": "pkg.zip",
        "package_size": p.bytes.len(), "package_md5": p.md5, "package_sha256": good.to_uppercase()});
    let run = env.run_stdin(&["download", "--request", "-"], body.to_string().as_bytes());
    assert_failed(&env, &run, "DOWNLOAD_FAILED");
    env.vars.remove("TOPE_OTA_RETRIES");
    env.run_stdin(&["download", "--request", "-"], body.to_string().as_bytes())
        .expect(0);
    assert_installed_package(&env, &p);
    assert!(drop_srv.requests()[1].range().is_some());

    let run = Env::new().run(&[
        "download",
        "--version",
        "1",
        "--url",
        &url,
        "--name",
        "p",
        "--size",
        "5",
        "--md5",
        &p.md5,
        "--sha256",
        "abc",
    ]);
    run.expect(2);
    assert!(run.stderr.contains("INVALID_REQUEST"), "{}", run.stderr);
}

#[test]
fn rich_progress_fields_are_present_and_monotone() {
    let env = Env::new();
    let p = pkg(4 * MIB, 51);
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            throttle: Some((128 * 1024, Duration::from_millis(25))),
            ..Behaviour::default()
        },
    );
    let url = srv.url("pkg.zip");
    let size = p.bytes.len().to_string();
    let child = env.spawn(&args(&url, &p, &size));
    let mut seen: Vec<Value> = Vec::new();
    loop {
        let j = env.run(&["--json", "status"]).json();
        let done = j["stage"] == "toInstall";
        if j["stage"] == "downloading" {
            seen.push(j);
        }
        if done {
            break;
        }
        std::thread::sleep(Duration::from_millis(15));
    }
    Run::from(child.wait_with_output().unwrap()).expect(0);
    assert!(seen.len() >= 5, "{}", seen.len());
    let bytes: Vec<u64> = seen
        .iter()
        .map(|j| j["bytes_done"].as_u64().unwrap())
        .collect();
    assert!(bytes.windows(2).all(|w| w[0] <= w[1]), "{bytes:?}");
    for j in &seen {
        assert_eq!(j["bytes_total"], p.bytes.len() as u64);
    }
    let mid = seen
        .iter()
        .find(|j| j["speed_bps"].as_u64() > Some(0))
        .expect("a speed");
    assert!(mid["eta_s"].as_u64().is_some(), "{mid}");
    let msg = mid["message"].as_str().unwrap();
    let re = regex::Regex::new(
        r"^Downloading \d+\.\d (kB|MB) / 4\.2 MB at \d+\.\d (kB|MB)/s, \d+ s left$",
    )
    .unwrap();
    assert!(re.is_match(msg), "{msg}");
}

// ---------------------------------------------------------------- signatures (issue 8)

#[test]
fn signed_packages() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (keypair(tmp.path(), "a"), keypair(tmp.path(), "b"));
    let p = pkg(MIB, 52);
    let file = tmp.path().join("pkg.zip");
    std::fs::write(&file, &p.bytes).unwrap();
    let by_a = sign(&a, &file);
    let by_b = sign(&b, &file);
    let other = tmp.path().join("other.zip");
    std::fs::write(&other, b"another file").unwrap();
    let for_other = sign(&a, &other);

    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    let url = srv.url("pkg.zip");
    let size = p.bytes.len().to_string();
    // Signatures served from a second server, each at its own path.
    let sig_srv = |sig: &[u8]| PkgServer::start(sig.to_vec(), Behaviour::default());

    let trust = |env: &Env, keys: &[&KeyPair]| {
        let dir = std::path::PathBuf::from(&env.vars["TOPE_OTA_KEYS_DIR"]);
        std::fs::create_dir_all(&dir).unwrap();
        for k in keys {
            std::fs::copy(&k.public, dir.join(k.public.file_name().unwrap())).unwrap();
        }
    };
    let run_with = |env: &Env, sig_url: Option<&str>| {
        let mut a = args(&url, &p, &size);
        if let Some(u) = sig_url {
            a.extend(["--sig-url", u]);
        }
        env.run(&a)
    };

    // No keys: old behaviour, no signature fetched, and status says so.
    let env = Env::new();
    run_with(&env, None).expect(0);
    assert_eq!(srv.requests().len(), 1);
    let st = env.run(&["status"]).stdout;
    assert!(st.contains("packages:  not authenticated"), "{st}");

    // Valid signature by a trusted key.
    let env = Env::new();
    trust(&env, &[&a]);
    let s = sig_srv(&by_a);
    run_with(&env, Some(&s.url("pkg.zip.minisig"))).expect(0);
    assert_installed_package(&env, &p);
    assert!(env
        .run(&["status"])
        .stdout
        .contains("must be signed by one of 1 key(s)"));

    // Default signature URL: <package_url>.minisig — the package server answers that path
    // with the package bytes, which are no signature.
    let env = Env::new();
    trust(&env, &[&a]);
    let run = run_with(&env, None);
    assert_failed(&env, &run, "SIGNATURE_INVALID");
    assert!(srv.requests().iter().any(|r| r.path == "/pkg.zip.minisig"));

    // Missing signature (404).
    let env = Env::new();
    trust(&env, &[&a]);
    let missing = PkgServer::start(
        vec![],
        Behaviour {
            status: Some(404),
            ..Behaviour::default()
        },
    );
    let run = run_with(&env, Some(&missing.url("x.minisig")));
    let st = assert_failed(&env, &run, "SIGNATURE_INVALID");
    assert!(
        st["message"].as_str().unwrap().contains("no signature"),
        "{st}"
    );
    assert!(
        env.download_files().is_empty(),
        "a refused package is deleted"
    );

    // Signed by an unknown key.
    let env = Env::new();
    trust(&env, &[&a]);
    let s = sig_srv(&by_b);
    let run = run_with(&env, Some(&s.url("pkg.zip.minisig")));
    let st = assert_failed(&env, &run, "SIGNATURE_INVALID");
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("not signed by any"),
        "{st}"
    );

    // A signature of another file.
    let env = Env::new();
    trust(&env, &[&a]);
    let s = sig_srv(&for_other);
    let run = run_with(&env, Some(&s.url("other.zip.minisig")));
    let st = assert_failed(&env, &run, "SIGNATURE_INVALID");
    assert!(
        st["message"].as_str().unwrap().contains("does not match"),
        "{st}"
    );

    // Key rotation: both keys trusted, the package signed by the new one.
    let env = Env::new();
    trust(&env, &[&a, &b]);
    let s = sig_srv(&by_b);
    run_with(&env, Some(&s.url("pkg.zip.minisig"))).expect(0);
    assert_installed_package(&env, &p);
}
// ---------------------------------------------------------------- keys directory (fail closed)

#[test]
fn a_keys_dir_that_is_a_file_refuses_unsigned_packages() {
    let mut env = Env::new();
    let keys = env.tmp.path().join("keys-file");
    std::fs::write(&keys, b"not a directory").unwrap();
    env.set("TOPE_OTA_KEYS_DIR", keys.to_str().unwrap());
    let bytes = data(64 * 1024, 90);
    let srv = PkgServer::start(bytes.clone(), Behaviour::default());
    let run = env.run(&[
        "download",
        "--version",
        "1.0.0",
        "--url",
        &srv.url("pkg.zip"),
        "--name",
        "pkg.zip",
        "--size",
        &bytes.len().to_string(),
        "--md5",
        &md5_hex(&bytes),
    ]);
    run.expect(1);
    assert!(
        run.stderr.contains("error: SIGNATURE_INVALID: ")
            && run.stderr.contains(keys.to_str().unwrap()),
        "{}",
        run.stderr
    );
    let s = env.state();
    assert_eq!(s["stage"], "failed", "{s}");
    assert_eq!(s["error"], "SIGNATURE_INVALID", "{s}");
    // A keys dir that does not exist still means "no keys".
    env.set(
        "TOPE_OTA_KEYS_DIR",
        env.tmp.path().join("no-such-dir").to_str().unwrap(),
    );
    let srv = PkgServer::start(bytes.clone(), Behaviour::default());
    env.run(&[
        "download",
        "--version",
        "1.0.0",
        "--url",
        &srv.url("pkg.zip"),
        "--name",
        "pkg.zip",
        "--size",
        &bytes.len().to_string(),
        "--md5",
        &md5_hex(&bytes),
    ])
    .expect(0);
    assert_eq!(env.state()["stage"], "toInstall");
}
// ---------------------------------------------------------------- SemVer precedence

#[test]
fn a_prerelease_of_the_installed_version_is_a_downgrade() {
    use crate::install::{full_manifest, v1_files, v2_partial, Device};
    use crate::serve::{call, Server};
    let mut d = Device::new();
    let pkg = d.pack("1.2.0", &v1_files(), &full_manifest("1.2.0"));
    d.deliver("1.2.0", pkg).expect(0);
    let (files, _) = v2_partial();
    let manifest = serde_json::json!({"version": "1.2.0-rc1", "modules": [
        {"name": "api", "src": "bin/device-api", "dst": "bin/device-api", "process_name": "device-api", "restart_order": 1}
    ]});
    let rc = d.pack("1.2.0-rc1", &files, &manifest);
    d.download("1.2.0-rc1", rc).expect(0);
    let run = d.install();
    run.expect(1);
    assert!(
        run.stderr
            .contains("error: DOWNGRADE_REFUSED: 1.2.0-rc1 is lower than the current 1.2.0"),
        "{}",
        run.stderr
    );
    assert_eq!(d.env.state()["stage"], "toInstall", "the package waits");
    assert_eq!(d.link("current").as_deref(), Some("v1.2.0"));
    // Through the API too.
    let srv = Server::start(&d.env);
    let (st, v) = call(
        &srv.addr,
        "POST",
        "/api/v1.0/update",
        Some(r#"{"version":"1.2.0-rc1"}"#),
    );
    assert_eq!(st, 400, "{v}");
    assert!(
        v["msg"]
            .as_str()
            .unwrap()
            .starts_with("DOWNGRADE_REFUSED: "),
        "{v}"
    );
    assert_eq!(d.link("current").as_deref(), Some("v1.2.0"));
}
