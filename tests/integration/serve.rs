//! `serve`: SPEC section 6, through the real binary on an ephemeral loopback port. Every
//! response these tests receive is checked against deploy/openapi.json (the contract test).

use crate::install::*;
use crate::openapi;
use crate::support::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    pub child: Child,
    pub addr: String,
    /// serve's stderr, when started by [`Server::start_logged`].
    log: Option<std::path::PathBuf>,
}

impl Server {
    pub fn start(env: &Env) -> Server {
        Server::start_with(env, &[], &[])
    }

    /// With extra `serve` arguments and environment variables.
    pub fn start_with(env: &Env, args: &[&str], vars: &[(&str, &str)]) -> Server {
        Server::spawn(env, args, vars, None)
    }

    /// With serve's log (stderr) kept in a file, for [`Server::log`].
    pub fn start_logged(env: &Env) -> Server {
        let path = env.tmp.path().join("serve.log");
        Server::spawn(env, &[], &[], Some(path))
    }

    /// What serve logged so far.
    pub fn log(&self) -> String {
        let path = self.log.as_ref().expect("started with start_logged");
        std::fs::read_to_string(path).unwrap_or_default()
    }

    fn spawn(
        env: &Env,
        args: &[&str],
        vars: &[(&str, &str)],
        log: Option<std::path::PathBuf>,
    ) -> Server {
        let mut argv = vec!["serve", "--listen", "127.0.0.1:0"];
        argv.extend_from_slice(args);
        let stderr = match &log {
            Some(p) => Stdio::from(std::fs::File::create(p).unwrap()),
            None => Stdio::inherit(),
        };
        let mut child = env
            .cmd(&argv)
            .envs(vars.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("serve said {line:?}"))
            .to_string();
        Server { child, addr, log }
    }

    /// The tope-ota children serve started (ppid = serve).
    pub fn children(&self) -> Vec<i32> {
        let me = self.child.id() as i32;
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| {
                        let after = s.rsplit_once(')')?.1.to_string();
                        after.split_whitespace().nth(1)?.parse::<i32>().ok()
                    })
                    == Some(me)
            })
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        for pid in self.children() {
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Send raw bytes, read until the server closes: (status, body).
pub fn raw(addr: &str, req: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(req).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

/// One request; the response is checked against the OpenAPI document.
pub fn call(addr: &str, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (status, text) = raw(addr, req.as_bytes());
    openapi::check(method, path, status, &text).unwrap_or_else(|e| panic!("contract: {e}"));
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// A call that must fail with `status` and `msg` starting `CODE: `; the whole body back.
fn refused(addr: &str, path: &str, body: &str, status: u16, code: &str) -> Value {
    let (st, v) = call(addr, "POST", path, Some(body));
    assert_eq!(st, status, "{v}");
    assert!(
        v["msg"].as_str().unwrap().starts_with(&format!("{code}: ")),
        "{v}"
    );
    v
}

fn progress(addr: &str) -> Value {
    let (status, v) = call(addr, "GET", "/api/v1.0/progress", None);
    assert_eq!(status, 200);
    v["data"].clone()
}

fn download_body(url: &str, bytes: &[u8], version: &str) -> String {
    json!({"version": version, "package_url": url, "package_name": "pkg.zip",
           "package_size": bytes.len(), "package_md5": md5_hex(bytes)})
    .to_string()
}

fn wait_progress(addr: &str, secs: u64, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        let p = progress(addr);
        if pred(&p) {
            return p;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}: {p}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn progress_answers_in_the_envelope() {
    let env = Env::new();
    let srv = Server::start(&env);
    let (status, v) = call(&srv.addr, "GET", "/api/v1.0/progress", None);
    assert_eq!(status, 200);
    assert_eq!(
        v,
        json!({"code": 200, "msg": "success", "data": {"stage": "idle", "progress": 0, "message": "", "error": null,
            "bytes_done": 0, "bytes_total": 0, "speed_bps": 0, "eta_s": null, "step": null,
            "bytes_fetched": 0, "bytes_reused": 0}})
    );
}

/// The unit is `Type=notify`: serve tells systemd READY=1 once its socket accepts, at a
/// filesystem socket and at an abstract one (`@name`, as systemd may pass).
#[test]
fn serve_tells_systemd_it_is_ready_once_it_listens() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let env = Env::new();
    let path = env.tmp.path().join("notify");
    let abstract_name = format!("tope-ota-test-notify-{}", std::process::id());
    for (var, sock) in [
        (
            path.display().to_string(),
            UnixDatagram::bind(&path).unwrap(),
        ),
        (
            format!("@{abstract_name}"),
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&abstract_name).unwrap())
                .unwrap(),
        ),
    ] {
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let srv = Server::start_with(&env, &[], &[("NOTIFY_SOCKET", &var)]);
        let mut buf = [0u8; 256];
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification at {var}: {e}"));
        let msg = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(msg.lines().any(|l| l == "READY=1"), "{var}: {msg:?}");
        let (status, _) = call(&srv.addr, "GET", "/api/v1.0/progress", None);
        assert_eq!(status, 200, "{var}");
    }
    // The socket is serve's alone: what serve runs (here the inhibit command, which it runs
    // itself; downloads, installs and their hooks alike) never inherits it.
    let d = v2_ready();
    let seen = d.env.tmp.path().join("inhibit-env");
    let script = d.env.tmp.path().join("printing");
    std::fs::write(
        &script,
        format!("#!/bin/sh\nenv > {}\nexit 1\n", seen.display()),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = d.env.tmp.path().join("notify2");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let srv = Server::start_with(
        &d.env,
        &[],
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("TOPE_OTA_INHIBIT_CMD", script.to_str().unwrap()),
        ],
    );
    let mut buf = [0u8; 256];
    sock.recv(&mut buf).expect("READY=1");
    refused(
        &srv.addr,
        "/api/v1.0/update",
        r#"{"version":"2.0.0"}"#,
        409,
        "INHIBITED",
    );
    let env = std::fs::read_to_string(&seen).unwrap();
    assert!(env.contains("TOPE_OTA_STATE_DIR="), "{env}");
    assert!(!env.contains("NOTIFY_SOCKET"), "{env}");
}

#[test]
fn hostile_and_malformed_requests() {
    let env = Env::new();
    let srv = Server::start(&env);
    let a = &srv.addr;
    let cases: Vec<(&str, &str, Option<String>, u16, &str)> = vec![
        ("bad json", "/api/v1.0/download", Some("{nope".into()), 400, "INVALID_REQUEST"),
        ("wrong type", "/api/v1.0/download", Some(r#"{"version":"1","package_url":"http://h/p","package_name":"p","package_size":"ten","package_md5":"0123456789abcdef0123456789abcdef"}"#.into()), 400, "INVALID_REQUEST"),
        ("missing field", "/api/v1.0/download", Some(r#"{"version":"1","package_url":"http://h/p","package_name":"p","package_size":10}"#.into()), 400, "INVALID_REQUEST"),
        ("not an object", "/api/v1.0/download", Some("[1]".into()), 400, "INVALID_REQUEST"),
        ("invalid value", "/api/v1.0/download", Some(r#"{"version":"..","package_url":"http://h/p","package_name":"p","package_size":10,"package_md5":"0123456789abcdef0123456789abcdef"}"#.into()), 400, "INVALID_REQUEST"),
        ("update bad json", "/api/v1.0/update", Some("[]".into()), 400, "INVALID_REQUEST"),
        ("update wrong type", "/api/v1.0/update", Some(r#"{"version":1}"#.into()), 400, "INVALID_REQUEST"),
        ("update nothing downloaded", "/api/v1.0/update", Some(r#"{"version":"1.0.0"}"#.into()), 400, "NO_PACKAGE"),
        ("body over 64 KiB", "/api/v1.0/download", Some("x".repeat(70 * 1024)), 413, "PAYLOAD_TOO_LARGE"),
        ("unknown path", "/api/v1.0/nothing", None, 404, "NOT_FOUND"),
        ("root", "/", None, 404, "NOT_FOUND"),
    ];
    for (what, path, body, status, code) in cases {
        let method = if body.is_some() { "POST" } else { "GET" };
        let (st, v) = call(a, method, path, body.as_deref());
        assert_eq!(st, status, "{what}: {v}");
        assert!(
            v["msg"].as_str().unwrap().starts_with(&format!("{code}: ")),
            "{what}: {v}"
        );
        assert_eq!(v["code"], status);
    }
    for (method, path) in [
        ("GET", "/api/v1.0/download"),
        ("PUT", "/api/v1.0/update"),
        ("POST", "/api/v1.0/progress"),
        ("DELETE", "/api/v1.0/progress"),
    ] {
        let (st, v) = call(a, method, path, Some(""));
        assert_eq!(st, 405, "{method} {path}: {v}");
    }
    // DNS rebinding: a non-loopback Host.
    for host in [
        "evil.example",
        "evil.example:12315",
        "192.168.1.10",
        "localhost.evil.example",
    ] {
        let (st, body) = raw(
            a,
            format!("GET /api/v1.0/progress HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
        assert_eq!(st, 403, "{host}: {body}");
        openapi::check("GET", "/api/v1.0/progress", st, &body).unwrap();
    }
    for host in ["localhost", "127.0.0.1", "[::1]:12315", "localhost:8080"] {
        let (st, _) = raw(
            a,
            format!("GET /api/v1.0/progress HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
        assert_eq!(st, 200, "{host}");
    }
    // Headers over 8 KiB.
    let big = format!(
        "GET /api/v1.0/progress HTTP/1.1\r\nHost: {a}\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(9 * 1024)
    );
    let (st, _) = raw(a, big.as_bytes());
    assert_eq!(st, 431);
    // The server is still fine.
    assert_eq!(progress(a)["stage"], "idle");
    assert!(
        !env.state_dir.join("state.json").exists(),
        "refused requests wrote nothing"
    );
}

#[test]
fn incomplete_requests_are_dropped_after_5_seconds() {
    let env = Env::new();
    let srv = Server::start(&env);
    let mut heads = TcpStream::connect(&srv.addr).unwrap();
    heads
        .write_all(b"GET /api/v1.0/progress HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .unwrap();
    let mut body = TcpStream::connect(&srv.addr).unwrap();
    body.write_all(format!("POST /api/v1.0/download HTTP/1.1\r\nHost: {}\r\nContent-Length: 200\r\n\r\n{{\"version\"", srv.addr).as_bytes()).unwrap();
    let t = Instant::now();
    for s in [&mut heads, &mut body] {
        s.set_read_timeout(Some(Duration::from_secs(12))).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        assert!(!text.contains("200 OK"), "{text}");
    }
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(9),
        "{took:?}"
    );
}

#[test]
fn slowloris_does_not_stop_progress() {
    let env = Env::new();
    let srv = Server::start(&env);
    let addr = srv.addr.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut trickles = Vec::new();
    for _ in 0..50 {
        let addr = addr.clone();
        let stop = stop.clone();
        trickles.push(std::thread::spawn(move || {
            let Ok(mut s) = TcpStream::connect(&addr) else {
                return;
            };
            let _ = s.write_all(b"GET /api/v1.0/progress HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ");
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if s.write_all(b"a").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..10 {
        let t = Instant::now();
        assert_eq!(progress(&addr)["stage"], "idle");
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for t in trickles {
        let _ = t.join();
    }
}

fn slow_package(bytes: &[u8]) -> PkgServer {
    PkgServer::start(
        bytes.to_vec(),
        Behaviour {
            throttle: Some((64 * 1024, Duration::from_millis(15))),
            ..Behaviour::default()
        },
    )
}

#[test]
fn concurrent_downloads_of_one_package_run_once_others_are_busy() {
    let env = Env::new();
    let srv = Server::start(&env);
    let bytes = data(2 << 20, 60);
    let pkg = slow_package(&bytes);
    let other = slow_package(&bytes);
    let body = download_body(&pkg.url("pkg.zip"), &bytes, "1.0.0");
    // The same request ten times at once: one download runs, every request is answered 200
    // (the old service took the same package again as "resume").
    let threads: Vec<_> = (0..10)
        .map(|_| {
            let addr = srv.addr.clone();
            let body = body.clone();
            std::thread::spawn(move || call(&addr, "POST", "/api/v1.0/download", Some(&body)))
        })
        .collect();
    let statuses: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap().0).collect();
    assert_eq!(statuses, [200; 10]);
    // Another package while that one downloads: BUSY, every time.
    let body2 = download_body(&other.url("pkg.zip"), &bytes, "1.0.1");
    let threads: Vec<_> = (0..5)
        .map(|_| {
            let addr = srv.addr.clone();
            let body = body2.clone();
            std::thread::spawn(move || call(&addr, "POST", "/api/v1.0/download", Some(&body)))
        })
        .collect();
    let statuses: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap().0).collect();
    assert_eq!(statuses, [409; 5]);
    wait_progress(&srv.addr, 30, "toInstall", |p| p["stage"] == "toInstall");
    assert_eq!(pkg.requests().len(), 1, "exactly one download ran");
    assert!(
        other.requests().is_empty(),
        "the other package was not fetched"
    );
}

#[test]
fn progress_rises_during_a_download_and_answers_fast() {
    let env = Env::new();
    let srv = Server::start(&env);
    let bytes = data(2 << 20, 61);
    let pkg = slow_package(&bytes);
    let (st, _) = call(
        &srv.addr,
        "POST",
        "/api/v1.0/download",
        Some(&download_body(&pkg.url("pkg.zip"), &bytes, "1.0.0")),
    );
    assert_eq!(st, 200);
    let mut seen = Vec::new();
    let mut slowest = Duration::ZERO;
    loop {
        let t = Instant::now();
        let p = progress(&srv.addr);
        slowest = slowest.max(t.elapsed());
        seen.push((
            p["stage"].as_str().unwrap().to_string(),
            p["progress"].as_u64().unwrap(),
        ));
        if p["stage"] == "toInstall" || seen.len() > 2000 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let dl: Vec<u64> = seen
        .iter()
        .filter(|s| s.0 == "downloading")
        .map(|s| s.1)
        .collect();
    assert!(dl.windows(2).all(|w| w[0] <= w[1]), "{dl:?}");
    let distinct: std::collections::BTreeSet<u64> = dl.iter().copied().collect();
    assert!(distinct.len() >= 5, "progress did not rise: {distinct:?}");
    assert_eq!(seen.last().unwrap(), &("toInstall".to_string(), 100));
    assert!(
        slowest < Duration::from_millis(100),
        "GET /progress took {slowest:?}"
    );
}

#[test]
fn serve_survives_a_killed_worker() {
    let env = Env::new();
    let srv = Server::start(&env);
    let bytes = data(2 << 20, 62);
    let pkg = slow_package(&bytes);
    let body = download_body(&pkg.url("pkg.zip"), &bytes, "1.0.0");
    assert_eq!(
        call(&srv.addr, "POST", "/api/v1.0/download", Some(&body)).0,
        200
    );
    wait_progress(&srv.addr, 20, "progress", |p| {
        p["progress"].as_u64() >= Some(10)
    });
    let kids = srv.children();
    assert_eq!(kids.len(), 1, "{kids:?}");
    unsafe {
        libc::kill(kids[0], libc::SIGKILL);
    }
    std::thread::sleep(Duration::from_millis(300));
    let p = progress(&srv.addr);
    assert_eq!(
        p["stage"], "downloading",
        "the state of the killed worker is reported"
    );
    assert!(srv.children().is_empty(), "the dead worker was reaped");
    // The lock died with the worker: a new request resumes the download.
    assert_eq!(
        call(&srv.addr, "POST", "/api/v1.0/download", Some(&body)).0,
        200
    );
    wait_progress(&srv.addr, 30, "toInstall", |p| p["stage"] == "toInstall");
    assert!(
        pkg.requests().iter().any(|r| r.range().is_some()),
        "resumed with Range"
    );
}

#[test]
fn download_then_update_through_the_api_with_callbacks() {
    let api = ApiStub::start(Duration::ZERO);
    let mut d = Device::with_v1();
    d.env.set("TOPE_OTA_REPORT_URL", &api.url);
    let (files, manifest) = v2_partial();
    let bytes = d.pack("2.0.0", &files, &manifest);
    let pkg = PkgServer::start(bytes.clone(), Behaviour::default());
    let srv = Server::start(&d.env);
    let a = srv.addr.clone();
    let (st, v) = call(
        &a,
        "POST",
        "/api/v1.0/update",
        Some(r#"{"version":"2.0.0"}"#),
    );
    assert_eq!(
        (st, v["msg"].as_str().unwrap().starts_with("NO_PACKAGE")),
        (400, true)
    );
    assert_eq!(
        call(
            &a,
            "POST",
            "/api/v1.0/download",
            Some(&download_body(&pkg.url("pkg.zip"), &bytes, "2.0.0"))
        )
        .0,
        200
    );
    wait_progress(&a, 30, "toInstall", |p| p["stage"] == "toInstall");
    refused(
        &a,
        "/api/v1.0/update",
        r#"{"version":"9.9.9"}"#,
        400,
        "VERSION_MISMATCH",
    );
    assert_eq!(
        call(
            &a,
            "POST",
            "/api/v1.0/update",
            Some(r#"{"version":"2.0.0"}"#)
        )
        .0,
        200
    );
    wait_progress(&a, 30, "success", |p| p["stage"] == "success");
    assert_eq!(d.link("current").as_deref(), Some("v2.0.0"));
    // state.json says success before the worker's last callback has gone out: wait for it.
    let until = Instant::now() + Duration::from_secs(5);
    while api
        .bodies()
        .last()
        .map(|b| b["data"]["stage"] != "success")
        .unwrap_or(true)
    {
        assert!(Instant::now() < until, "no success callback");
        std::thread::sleep(Duration::from_millis(20));
    }
    let stages: Vec<String> = api
        .bodies()
        .iter()
        .map(|b| b["data"]["stage"].as_str().unwrap().to_string())
        .collect();
    let mut dedup = stages.clone();
    dedup.dedup();
    assert_eq!(
        dedup,
        [
            "downloading",
            "verifying",
            "toInstall",
            "installing",
            "success"
        ]
    );
}

#[test]
fn update_of_an_expired_package_and_while_busy() {
    let mut d = Device::with_v1();
    let (files, manifest) = v2_partial();
    let bytes = d.pack("2.0.0", &files, &manifest);
    d.download("2.0.0", bytes).expect(0);
    let mut s = d.env.state();
    s["verified_at"] = json!("2000-01-01T00:00:00Z");
    std::fs::write(d.env.state_dir.join("state.json"), s.to_string()).unwrap();
    let srv = Server::start(&d.env);
    refused(
        &srv.addr,
        "/api/v1.0/update",
        r#"{"version":"2.0.0"}"#,
        400,
        "PACKAGE_EXPIRED",
    );
    let until = Instant::now() + Duration::from_secs(10);
    while d.env.state()["error"] != "PACKAGE_EXPIRED" {
        assert!(Instant::now() < until, "the expiry was not recorded");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        d.env.download_files().is_empty(),
        "the expired package is deleted"
    );

    // A writer holding the lock: 409 BUSY.
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .open(d.env.state_dir.join("state.lock"))
        .unwrap();
    assert_eq!(
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) },
        0
    );
    let mut s = d.env.state();
    s["stage"] = json!("toInstall");
    s["verified_at"] = json!(clock_now());
    std::fs::write(d.env.state_dir.join("state.json"), s.to_string()).unwrap();
    refused(
        &srv.addr,
        "/api/v1.0/update",
        r#"{"version":"2.0.0"}"#,
        409,
        "BUSY",
    );
    let (st, _) = call(
        &srv.addr,
        "POST",
        "/api/v1.0/download",
        Some(&download_body("http://127.0.0.1:1/x", b"x", "3.0.0")),
    );
    assert_eq!(st, 409);
    drop(lock);
}

fn clock_now() -> String {
    tope_ota::clock::now_rfc3339()
}

#[test]
fn sigterm_stops_accepting_and_lets_the_worker_finish() {
    let env = Env::new();
    let mut srv = Server::start(&env);
    let bytes = data(2 << 20, 63);
    let pkg = slow_package(&bytes);
    assert_eq!(
        call(
            &srv.addr,
            "POST",
            "/api/v1.0/download",
            Some(&download_body(&pkg.url("pkg.zip"), &bytes, "1.0.0"))
        )
        .0,
        200
    );
    wait_progress(&srv.addr, 20, "progress", |p| {
        p["progress"].as_u64() >= Some(5)
    });
    unsafe {
        libc::kill(srv.child.id() as i32, libc::SIGTERM);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        TcpStream::connect(&srv.addr).is_err(),
        "still accepting after SIGTERM"
    );
    let st = srv.child.wait().unwrap();
    assert!(st.success(), "{st:?}");
    let s = env.state();
    assert_eq!(s["stage"], "toInstall", "the worker finished: {s}");
}

#[test]
fn update_refuses_a_downgrade_unless_the_request_allows_it() {
    let d = downgrade_ready();
    // The request's allow_downgrade counts only where the device allows it over the API.
    let srv = Server::start_with(&d.env, &["--api-allow-downgrade"], &[]);
    refused(
        &srv.addr,
        "/api/v1.0/update",
        r#"{"version":"1.5.0"}"#,
        400,
        "DOWNGRADE_REFUSED",
    );
    let (st, _) = call(
        &srv.addr,
        "POST",
        "/api/v1.0/update",
        Some(r#"{"version":"1.5.0","allow_downgrade":true}"#),
    );
    assert_eq!(st, 200);
    wait_progress(&srv.addr, 30, "success", |p| p["stage"] == "success");
    assert_eq!(d.link("current").as_deref(), Some("v1.5.0"));
}

#[test]
fn update_is_409_inhibited_during_a_print() {
    let d = v2_ready();
    let dir = std::path::PathBuf::from(&d.env.vars["TOPE_OTA_INHIBIT_DIR"]);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("job"), b"").unwrap();
    let srv = Server::start(&d.env);
    refused(
        &srv.addr,
        "/api/v1.0/update",
        r#"{"version":"2.0.0"}"#,
        409,
        "INHIBITED",
    );
    std::fs::remove_file(dir.join("job")).unwrap();
    assert_eq!(
        call(
            &srv.addr,
            "POST",
            "/api/v1.0/update",
            Some(r#"{"version":"2.0.0"}"#)
        )
        .0,
        200
    );
    wait_progress(&srv.addr, 30, "success", |p| p["stage"] == "success");
}
