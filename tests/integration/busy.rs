//! BUSY (issue 26): a writer waits, at most `--lock-wait`, for a brief holder of the lock (heal
//! with nothing to do, a writer handing its callbacks over), and answers BUSY at once, naming
//! the operation and since when, to one in flight. Housekeeping holds the lock as little as it
//! can: a missed callback is sent to a slow device-api without it.

use crate::download::{args, pkg};
use crate::serve::{call, Server};
use crate::support::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// state.lock held by this test process, with the record a tope-ota holder writes.
struct Holder {
    _file: std::fs::File,
}

impl Holder {
    fn take(env: &Env, command: &str, activity: &str, long: bool) -> Holder {
        std::fs::create_dir_all(&env.state_dir).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(env.state_dir.join("state.lock"))
            .unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        assert_eq!(unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) }, 0);
        let rec = json!({
            "pid": std::process::id(),
            "command": command,
            "activity": activity,
            "long": long,
            "since": "2026-12-03T08:00:00Z",
        });
        std::fs::write(env.state_dir.join("state.lock"), rec.to_string()).unwrap();
        Holder { _file: file }
    }
}

/// A child whose stderr lines are collected as they come.
struct Watched {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Watched {
    fn spawn(env: &Env, argv: &[&str]) -> Watched {
        let mut child = env.spawn(argv);
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let l = lines.clone();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                l.lock().unwrap().push(line);
            }
        });
        Watched { child, lines }
    }

    fn stderr(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Wait until a stderr line contains `what`; panics if the child ends first.
    fn wait_line(&mut self, secs: u64, what: &str) {
        let until = Instant::now() + Duration::from_secs(secs);
        while !self.stderr().contains(what) {
            if let Some(st) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(50));
                panic!("ended ({st}) before saying {what:?}:\n{}", self.stderr());
            }
            assert!(Instant::now() < until, "no {what:?} in:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The exit code, at most `secs` from now (killed and failed after that: it waited).
    fn exit_within(&mut self, secs: u64) -> i32 {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // The reader thread gets the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return st.code().unwrap_or(-1);
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                panic!("still running after {secs} s:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
fn a_brief_holder_is_waited_for_then_the_command_runs() {
    let mut env = Env::new();
    env.set("TOPE_OTA_LOCK_WAIT", "60s");
    let p = pkg(64 * 1024, 31);
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    let url = srv.url("pkg.zip");
    let size = p.bytes.len().to_string();
    let holder = Holder::take(&env, "heal", "housekeeping", false);
    let mut w = Watched::spawn(&env, &args(&url, &p, &size));
    w.wait_line(
        30,
        "waiting up to 60s for housekeeping since 2026-12-03T08:00:00Z (tope-ota heal, pid",
    );
    assert!(env.try_state().is_none(), "it ran while the lock was held");
    drop(holder);
    assert_eq!(w.exit_within(60), 0, "{}", w.stderr());
    assert_eq!(env.state()["stage"], "toInstall");
}

#[test]
fn a_brief_holder_past_the_lock_wait_is_busy_with_its_record() {
    let mut env = Env::new();
    let _holder = Holder::take(&env, "heal", "housekeeping", false);
    env.set("TOPE_OTA_LOCK_WAIT", "300ms");
    let run = env.run(&["--json", "rollback"]);
    run.expect(75);
    assert!(
        run.stderr.contains("error: BUSY: another tope-ota holds")
            && run
                .stderr
                .contains("housekeeping since 2026-12-03T08:00:00Z (tope-ota heal, pid")
            && run.stderr.contains("waited 300ms (--lock-wait)"),
        "{}",
        run.stderr
    );
    assert_eq!(run.json()["error"], "BUSY");
    // 0 never waits: no note of waiting.
    env.set("TOPE_OTA_LOCK_WAIT", "0");
    let run = env.run(&["rollback"]);
    run.expect(75);
    assert!(!run.stderr.contains("waiting up to"), "{}", run.stderr);
    assert!(!run.stderr.contains("waited"), "{}", run.stderr);
}

#[test]
fn an_operation_in_flight_is_busy_at_once_and_says_what_and_since_when() {
    let mut env = Env::new();
    // Were it waited for, the install would wait for the download, which waits at the gate
    // until the install has answered.
    env.set("TOPE_OTA_LOCK_WAIT", "10min");
    let p = pkg(256 * 1024, 32);
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            gate_at: Some(100 * 1024),
            ..Behaviour::default()
        },
    );
    let url = srv.url("pkg.zip");
    let size = p.bytes.len().to_string();
    let first = env.spawn(&args(&url, &p, &size));
    srv.wait_gate(30);
    let mut second = Watched::spawn(&env, &["--json", "install"]);
    assert_eq!(second.exit_within(60), 75, "{}", second.stderr());
    let err = second.stderr();
    assert!(
        err.contains("error: BUSY: a download of 1.2.0 is in flight: since ")
            && err.contains(&format!("(tope-ota download, pid {})", first.id())),
        "{err}"
    );
    assert!(!err.contains("waiting up to"), "{err}");
    // The API follows the same rule.
    let serve = Server::start(&env);
    let t = Instant::now();
    let other = json!({
        "version": "3.0.0",
        "package_url": srv.url("other.zip"),
        "package_name": "other.zip",
        "package_size": 5,
        "package_md5": p.md5,
    })
    .to_string();
    let (status, body) = call(&serve.addr, "POST", "/api/v1.0/download", Some(&other));
    assert_eq!(status, 409, "{body}");
    assert!(
        body["msg"]
            .as_str()
            .unwrap()
            .starts_with("BUSY: a download of 1.2.0 is in flight: since "),
        "{body}"
    );
    assert!(t.elapsed() < Duration::from_secs(60), "the API waited");
    srv.release();
    let first = Run::from(first.wait_with_output().unwrap());
    first.expect(0);
    assert_eq!(env.state()["stage"], "toInstall");
}

#[test]
fn the_api_waits_for_a_brief_holder_then_starts_the_operation() {
    let mut env = Env::new();
    env.set("TOPE_OTA_LOCK_WAIT", "60s");
    let p = pkg(64 * 1024, 33);
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    let serve = Server::start(&env);
    let holder = Holder::take(&env, "heal", "housekeeping", false);
    let body = api_body(&srv, &p);
    let addr = serve.addr.clone();
    let post = std::thread::spawn(move || call(&addr, "POST", "/api/v1.0/download", Some(&body)));
    // The POST waits: it has not answered while the holder holds the lock.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !post.is_finished(),
        "the POST did not wait for a brief holder"
    );
    assert!(env.try_state().is_none());
    drop(holder);
    let (status, answer) = post.join().unwrap();
    assert_eq!(status, 200, "{answer}");
    env.wait_state(60, "toInstall", |s| s["stage"] == "toInstall");
}

/// The API's download body for `p` on `srv`, as version 1.2.0.
fn api_body(srv: &PkgServer, p: &crate::download::Pkg) -> String {
    json!({
        "version": "1.2.0",
        "package_url": srv.url("pkg.zip"),
        "package_name": "pkg.zip",
        "package_size": p.bytes.len(),
        "package_md5": p.md5,
    })
    .to_string()
}

/// state.json at `success` with a callback device-api did not receive (callback.json records an
/// earlier stage), as a process that ended before its last delivery leaves it.
fn missed_callback(env: &Env) {
    std::fs::create_dir_all(&env.state_dir).unwrap();
    std::fs::write(
        env.state_dir.join("state.json"),
        json!({"stage": "success", "progress": 100, "message": "Installed 1.0.0",
               "version": "1.0.0", "stage_seq": 5})
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        env.state_dir.join("callback.json"),
        json!({"stage": "installing", "error": null, "version": "1.0.0", "seq": 4}).to_string(),
    )
    .unwrap();
}

#[test]
fn a_command_started_while_heal_resends_a_callback_to_a_slow_device_api_runs_after_it() {
    let mut env = Env::new();
    // Slower than the 500 ms a callback may take: heal's three attempts all time out.
    let api = ApiStub::start(Duration::from_millis(800));
    env.set("TOPE_OTA_REPORT_URL", &api.url);
    missed_callback(&env);
    let p = pkg(64 * 1024, 34);
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    let url = srv.url("pkg.zip");
    let size = p.bytes.len().to_string();
    let heal = env.spawn(&["heal"]);
    // heal is sending the missed stage to device-api.
    let until = Instant::now() + Duration::from_secs(30);
    while api.bodies().is_empty() {
        assert!(Instant::now() < until, "heal sent nothing");
        std::thread::sleep(Duration::from_millis(5));
    }
    // heal's sender posts while heal may still be at its housekeeping (brief: waited for);
    // the round trips themselves (three attempts of 500 ms) are not made under the lock.
    let run = env.run(&args(&url, &p, &size));
    run.expect(0);
    assert_eq!(env.state()["stage"], "toInstall");
    let heal = Run::from(heal.wait_with_output().unwrap());
    heal.expect(0);
    // In order at device-api: the stage heal sent, then the download's.
    let stages: Vec<String> = api
        .bodies()
        .iter()
        .map(|b: &Value| b["data"]["stage"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(stages[0], "success", "{stages:?}");
    let first_download = stages.iter().position(|s| s == "downloading");
    let last_success = stages.iter().rposition(|s| s == "success");
    if let (Some(d), Some(s)) = (first_download, last_success) {
        assert!(s < d, "heal's stage after the download's: {stages:?}");
    }
}

/// The holder record in `env`'s state.lock, as JSON (Null when absent or torn).
fn record(env: &Env) -> Value {
    std::fs::read(env.state_dir.join("state.lock"))
        .ok()
        .and_then(|b| serde_json::from_slice(String::from_utf8_lossy(&b).trim().as_bytes()).ok())
        .unwrap_or(Value::Null)
}

#[test]
fn heal_that_repairs_current_says_so_and_others_are_busy_at_once() {
    let mut d = crate::install::Device::with_factory();
    let root = d.root().to_path_buf();
    std::fs::remove_file(root.join("current")).unwrap();
    std::os::unix::fs::symlink("v9.9.9", root.join("current")).unwrap();
    // The repair's first start waits at a gate, as a slow service would.
    let gate = d.sc.dir.join("go");
    d.sc.on(
        "start",
        &format!("while [ ! -e {} ]; do sleep 0.02; done", gate.display()),
    );
    d.env.set("TOPE_OTA_LOCK_WAIT", "10min");
    let heal = d.env.spawn(&["heal"]);
    let until = Instant::now() + Duration::from_secs(60);
    while record(&d.env)["activity"] != "repairing current" {
        assert!(
            Instant::now() < until,
            "no record of the repair: {}",
            record(&d.env)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut tech = Watched::spawn(&d.env, &["rollback"]);
    assert_eq!(tech.exit_within(60), 75, "{}", tech.stderr());
    assert!(
        tech.stderr()
            .contains("BUSY: repairing current is in flight: since "),
        "{}",
        tech.stderr()
    );
    std::fs::write(&gate, b"").unwrap();
    let heal = Run::from(heal.wait_with_output().unwrap());
    heal.expect(0);
    assert!(
        heal.stdout.contains("current points nowhere"),
        "{}",
        heal.stdout
    );
}

#[test]
fn the_api_lets_two_requests_wait_for_the_lock_and_refuses_more_at_once() {
    let mut env = Env::new();
    env.set("TOPE_OTA_LOCK_WAIT", "10min");
    let p = pkg(64 * 1024, 35);
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    let serve = Server::start_logged(&env);
    let holder = Holder::take(&env, "heal", "housekeeping", false);
    let body = api_body(&srv, &p);
    let post = |body: String| {
        let addr = serve.addr.clone();
        std::thread::spawn(move || call(&addr, "POST", "/api/v1.0/download", Some(&body)))
    };
    let first = post(body.clone());
    let second = post(body.clone());
    let until = Instant::now() + Duration::from_secs(60);
    while serve
        .log()
        .matches("waiting up to 600s for housekeeping")
        .count()
        < 2
    {
        assert!(
            Instant::now() < until,
            "the POSTs do not wait:\n{}",
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (status, third) = call(&serve.addr, "POST", "/api/v1.0/download", Some(&body));
    assert_eq!(status, 409, "{third}");
    assert!(
        third["msg"]
            .as_str()
            .unwrap()
            .starts_with("BUSY: another tope-ota holds"),
        "{third}"
    );
    drop(holder);
    for t in [first, second] {
        let (status, answer) = t.join().unwrap();
        assert_eq!(status, 200, "{answer}");
    }
    env.wait_state(60, "toInstall", |s| s["stage"] == "toInstall");
}
