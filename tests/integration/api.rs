//! `serve` hardening and compatibility: the browser rules (Origin, Content-Type,
//! `allow_downgrade`), the request deadline that bounds only receiving a request, connection
//! shedding under a flood, the boolean settings' values, and what the old service accepted.

use crate::install::*;
use crate::openapi;
use crate::serve::{raw, Server};
use crate::support::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// One request with extra headers (Host is the server's own, so only the rule under test can
/// refuse it); the response is checked against the OpenAPI document.
fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Value) {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    let (status, text) = raw(addr, req.as_bytes());
    openapi::check(method, path, status, &text)
        .unwrap_or_else(|e| panic!("contract ({method} {path} {headers:?}): {e}"));
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[track_caller]
fn assert_refused(v: &Value, status: u16, prefix: &str, what: &str) {
    assert_eq!(v["code"], status, "{what}: {v}");
    assert_eq!(v["data"], Value::Null, "{what}: {v}");
    assert!(
        v["msg"].as_str().unwrap_or("").starts_with(prefix),
        "{what}: {v}"
    );
}

fn download_body(url: &str) -> String {
    json!({"version": "1.0.0", "package_url": url, "package_name": "pkg.zip",
           "package_size": 10, "package_md5": "0123456789abcdef0123456789abcdef"})
    .to_string()
}

// ---------------------------------------------------------------- browser rules

#[test]
fn any_origin_header_is_forbidden_on_every_path_and_method() {
    let env = Env::new();
    let srv = Server::start(&env);
    let a = &srv.addr;
    let dl = download_body("http://127.0.0.1:1/pkg.zip");
    let requests: [(&str, &str, &str); 6] = [
        ("GET", "/api/v1.0/progress", ""),
        ("POST", "/api/v1.0/download", &dl),
        ("POST", "/api/v1.0/update", r#"{"version":"1.0.0"}"#),
        ("POST", "/api/v1.0/progress", ""),
        ("GET", "/api/v1.0/download", ""),
        ("GET", "/nothing", ""),
    ];
    for origin in [
        "null",
        "http://localhost",
        "http://127.0.0.1:12315",
        "http://[::1]:8080",
        "https://evil.example",
        "",
    ] {
        for (method, path, body) in requests {
            let what = format!("Origin {origin:?} {method} {path}");
            let (st, v) = request(
                a,
                method,
                path,
                &[("Origin", origin), ("Content-Type", "application/json")],
                body,
            );
            assert_eq!(st, 403, "{what}: {v}");
            assert_refused(&v, 403, "FORBIDDEN: ", &what);
        }
    }
    // Without an Origin the same server answers as before.
    let (st, _) = request(a, "GET", "/api/v1.0/progress", &[], "");
    assert_eq!(st, 200);
    assert!(
        !env.state_dir.join("state.json").exists(),
        "a refused POST /download started nothing"
    );
}

#[test]
fn a_post_with_a_non_json_content_type_is_415() {
    let env = Env::new();
    let srv = Server::start(&env);
    let a = &srv.addr;
    let upd = r#"{"version":"1.0.0"}"#;
    let dl = download_body("http://127.0.0.1:1/pkg.zip");
    for ct in [
        "text/plain",
        "text/plain; charset=utf-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonp",
        "application/json-patch+json",
        "application/problem+json",
        "",
    ] {
        for (path, body) in [
            ("/api/v1.0/update", upd),
            ("/api/v1.0/download", dl.as_str()),
        ] {
            let what = format!("Content-Type {ct:?} POST {path}");
            let (st, v) = request(a, "POST", path, &[("Content-Type", ct)], body);
            assert_eq!(st, 415, "{what}: {v}");
            assert_refused(&v, 415, "UNSUPPORTED_MEDIA_TYPE: ", &what);
        }
    }
    assert!(
        !env.state_dir.join("state.json").exists(),
        "a refused POST /download started nothing"
    );
    // JSON, with parameters and in any case, and a missing Content-Type (old clients) pass
    // this rule: nothing was downloaded, so POST /update reaches NO_PACKAGE.
    for headers in [
        &[("Content-Type", "application/json")][..],
        &[("Content-Type", "application/json; charset=utf-8")],
        &[("Content-Type", "Application/JSON ; Charset=UTF-8")],
        &[],
    ] {
        let (st, v) = request(a, "POST", "/api/v1.0/update", headers, upd);
        assert_eq!(st, 400, "{headers:?}: {v}");
        assert_refused(&v, 400, "NO_PACKAGE: ", &format!("{headers:?}"));
    }
}

#[test]
fn allow_downgrade_in_the_request_needs_the_serve_option() {
    let d = downgrade_ready();
    let body = r#"{"version":"1.5.0","allow_downgrade":true}"#;
    let ct = [("Content-Type", "application/json")];
    {
        let srv = Server::start(&d.env);
        let (st, v) = request(&srv.addr, "POST", "/api/v1.0/update", &ct, body);
        assert_eq!(st, 400, "{v}");
        assert_refused(
            &v,
            400,
            "DOWNGRADE_REFUSED: ",
            "without --api-allow-downgrade",
        );
        std::thread::sleep(Duration::from_millis(300));
        assert!(srv.children().is_empty(), "no install was started");
        assert_eq!(d.link("current").as_deref(), Some("v2.0.0"));
        assert_eq!(d.env.state()["stage"], "toInstall", "the package waits");
    }
    // The variable is honoured as the flag: the device allows downgrades over the API.
    let srv = Server::start_with(&d.env, &[], &[("TOPE_OTA_API_ALLOW_DOWNGRADE", "1")]);
    let (st, v) = request(&srv.addr, "POST", "/api/v1.0/update", &ct, body);
    assert_eq!(st, 200, "{v}");
    let until = Instant::now() + Duration::from_secs(30);
    while d.env.try_state().map(|s| s["stage"].clone()) != Some(json!("success")) {
        assert!(Instant::now() < until, "{:?}", d.env.try_state());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(d.link("current").as_deref(), Some("v1.5.0"));
}

// ---------------------------------------------------------------- request deadline

#[test]
fn a_slow_inhibit_command_answers_409_inhibited_not_a_dropped_connection() {
    let mut d = v2_ready();
    let script = d.env.tmp.path().join("slow-inhibit.sh");
    std::fs::write(&script, "#!/bin/sh\nsleep 7\nexit 1\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    d.env.set("TOPE_OTA_INHIBIT_CMD", script.to_str().unwrap());
    let srv = Server::start(&d.env);
    let t = Instant::now();
    let (st, v) = request(
        &srv.addr,
        "POST",
        "/api/v1.0/update",
        &[("Content-Type", "application/json")],
        r#"{"version":"2.0.0"}"#,
    );
    assert_eq!(st, 409, "{v} after {:?}", t.elapsed());
    assert_refused(&v, 409, "INHIBITED: ", "slow inhibit command");
    assert!(t.elapsed() >= Duration::from_secs(6), "{:?}", t.elapsed());
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
}

// ---------------------------------------------------------------- connection flood

#[test]
fn a_connection_flood_sheds_the_oldest_incomplete_connection() {
    let env = Env::new();
    let srv = Server::start(&env);
    let mut flood = Vec::new();
    for i in 0..520 {
        let mut s =
            TcpStream::connect(&srv.addr).unwrap_or_else(|e| panic!("flood connection {i}: {e}"));
        s.write_all(b"G").unwrap();
        flood.push(s);
    }
    // A complete request after the flood is served, at once rather than after the flood's
    // header timeout: one attempt, failing after 10 s.
    let mut s = TcpStream::connect(&srv.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        format!(
            "GET /api/v1.0/progress HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            srv.addr
        )
        .as_bytes(),
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("HTTP/1.1 200 "),
        "the request after 520 stuck connections got {text:?}"
    );
    // 521 connections over a cap of 512: the 9 oldest of the flood were shed (closed), the
    // newest is still open (its header timeout of 5 s has not run out).
    let closed = |s: &mut TcpStream, wait: Duration| {
        s.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) => true,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => true,
            Ok(_) | Err(_) => false,
        }
    };
    for (i, s) in flood.iter_mut().enumerate().take(9) {
        assert!(
            closed(s, Duration::from_secs(2)),
            "flood connection {i} was not shed"
        );
    }
    assert!(
        !closed(flood.last_mut().unwrap(), Duration::from_millis(200)),
        "the newest flood connection was shed"
    );
}

/// GET /progress on a kept-alive connection; the status, 0 when the server closed it.
fn get_kept_alive(s: &mut TcpStream, addr: &str) -> u16 {
    let req = format!("GET /api/v1.0/progress HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return 0;
    }
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => return 0,
        }
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    if s.read_exact(&mut body).is_err() {
        return 0;
    }
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn idle_keep_alive_connections_are_shed_too() {
    let env = Env::new();
    let srv = Server::start(&env);
    // More kept-alive connections than the cap, each served one whole request and left idle:
    // every new one is served, the idle ones that waited longest make room.
    let mut idle = Vec::new();
    for i in 0..520 {
        let mut s = TcpStream::connect(&srv.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(get_kept_alive(&mut s, &srv.addr), 200, "connection {i}");
        idle.push(s);
    }
    // The newest idle connection is still open and answers a second request.
    let last = idle.last_mut().unwrap();
    assert_eq!(get_kept_alive(last, &srv.addr), 200);
    // The oldest was shed.
    assert_eq!(get_kept_alive(&mut idle[0], &srv.addr), 0);
}

// ---------------------------------------------------------------- boolean variables

#[test]
fn boolean_variables_take_1_yes_and_0() {
    // /etc/default/tope-ota suggests `TOPE_OTA_AUTO_INSTALL=1`: it must not make every heal a
    // usage error. Falsey words (0, false, no, off, empty) turn the setting off.
    let env = Env::new();
    for v in ["1", "yes", "true", "on", "0", "false", "no", "off", ""] {
        let run = env.cmd(&["heal"]).env("TOPE_OTA_AUTO_INSTALL", v).output();
        let run = Run::from(run.unwrap());
        assert_eq!(run.code, 0, "TOPE_OTA_AUTO_INSTALL={v:?}: {run:?}");
        let run = Run::from(
            env.cmd(&["install"])
                .env("TOPE_OTA_ALLOW_DOWNGRADE", v)
                .output()
                .unwrap(),
        );
        assert!(
            run.code == 1 && run.stderr.contains("NO_PACKAGE"),
            "TOPE_OTA_ALLOW_DOWNGRADE={v:?}: {run:?}"
        );
    }
    // An allowed downgrade over the API, by the device-wide variable alone.
    let d = downgrade_ready();
    let srv = Server::start_with(&d.env, &[], &[("TOPE_OTA_ALLOW_DOWNGRADE", "1")]);
    let (st, v) = request(
        &srv.addr,
        "POST",
        "/api/v1.0/update",
        &[("Content-Type", "application/json")],
        r#"{"version":"1.5.0"}"#,
    );
    assert_eq!(st, 200, "{v}");
    let until = Instant::now() + Duration::from_secs(30);
    while d.env.try_state().map(|s| s["stage"].clone()) != Some(json!("success")) {
        assert!(Instant::now() < until, "{:?}", d.env.try_state());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(d.link("current").as_deref(), Some("v1.5.0"));
}

// ---------------------------------------------------------------- the old service's leniency

/// Wait until state.json's stage is `stage`.
fn wait_stage(env: &Env, stage: &str) -> Value {
    env.wait_state(30, stage, |s| s["stage"] == stage)
}

#[test]
fn unknown_request_fields_are_ignored_with_a_warning() {
    // The old Pydantic models ignored fields they did not know. A device-api that sends more
    // (a device id, a force flag) keeps working; a misspelled optional field is named in the log.
    let env = Env::new();
    let srv = Server::start_logged(&env);
    let a = &srv.addr;
    let bytes = data(100_000, 140);
    let pkg = PkgServer::start(bytes.clone(), Behaviour::default());
    let body = json!({"version": "1.0.0", "package_url": pkg.url("pkg.zip"),
        "package_name": "pkg.zip", "package_size": bytes.len(), "package_md5": md5_hex(&bytes),
        "device_id": "printer-7", "force": true, "package_sha265": "typo"})
    .to_string();
    let ct = [("Content-Type", "application/json")];
    let (st, v) = request(a, "POST", "/api/v1.0/download", &ct, &body);
    assert_eq!(st, 200, "{v}");
    wait_stage(&env, "toInstall");
    let log = srv.log();
    assert!(
        log.contains("unknown field(s) \"device_id\", \"force\", \"package_sha265\" ignored"),
        "{log}"
    );
    // The same set again (a client that always sends it): not logged again.
    for _ in 0..3 {
        let (st, v) = request(a, "POST", "/api/v1.0/download", &ct, &body);
        assert_eq!(st, 200, "{v}");
    }
    assert_eq!(
        srv.log().matches("unknown field(s) \"device_id\"").count(),
        1,
        "{}",
        srv.log()
    );
    // POST /update: `force` is ignored; the version is checked as always.
    let (st, v) = request(
        a,
        "POST",
        "/api/v1.0/update",
        &ct,
        r#"{"version":"9.9.9","force":true}"#,
    );
    assert_eq!(st, 400, "{v}");
    assert_refused(&v, 400, "VERSION_MISMATCH: ", "update with force");
    assert!(srv.log().contains("\"force\" ignored"), "{}", srv.log());
    // Still refused: a body that is not an object, a known field of the wrong type.
    for (path, body) in [
        ("/api/v1.0/update", "[]"),
        ("/api/v1.0/update", r#"{"version":1,"force":true}"#),
        ("/api/v1.0/update", r#"{"force":true}"#),
        ("/api/v1.0/download", r#"{"version":"1.0.0","x":1}"#),
    ] {
        let (st, v) = request(a, "POST", path, &ct, body);
        assert_eq!(st, 400, "{body}: {v}");
        assert_refused(&v, 400, "INVALID_REQUEST: ", body);
    }
    // The CLI's --request stays strict: a script's typo fails loudly.
    let run = env.run_stdin(&["download", "--request", "-"], body.as_bytes());
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("INVALID_REQUEST"), "{run:?}");
    assert_eq!(env.state()["stage"], "toInstall", "nothing changed");
}

#[test]
fn package_size_as_a_decimal_string_or_a_whole_number() {
    // The old model coerced "104857600" and 104857600.0 to an int; serve does too, and hands
    // its child the integer. Anything else stays INVALID_REQUEST.
    let env = Env::new();
    let srv = Server::start(&env);
    let a = &srv.addr;
    let ct = [("Content-Type", "application/json")];
    let bytes = data(100_000, 141);
    let pkg = PkgServer::start(bytes.clone(), Behaviour::default());
    let body = |size: Value| {
        json!({"version": "1.0.0", "package_url": pkg.url("pkg.zip"), "package_name": "pkg.zip",
               "package_size": size, "package_md5": md5_hex(&bytes)})
        .to_string()
    };
    for size in [
        json!("100000"),
        json!(100000.0),
        serde_json::from_str::<Value>("1.0e5").unwrap(),
    ] {
        let (st, v) = request(a, "POST", "/api/v1.0/download", &ct, &body(size.clone()));
        assert_eq!(st, 200, "{size}: {v}");
        let s = env.wait_state(30, "toInstall", |s| {
            s["stage"] == "toInstall" && srv.children().is_empty()
        });
        assert_eq!(s["package_size"], json!(100000), "{size}: {s}");
    }
    for size in [
        json!("100000.0"),
        json!(" 100000"),
        json!("+100000"),
        json!("-1"),
        json!("1e5"),
        json!("0x186a0"),
        json!(""),
        json!("0"),
        json!("99999999999999999999999"),
        json!(100000.5),
        json!(-100000),
        json!(-100000.0),
        json!(0),
        json!(1e300),
        json!(true),
        json!([100000]),
        json!({"bytes": 100000}),
        Value::Null,
    ] {
        let (st, v) = request(a, "POST", "/api/v1.0/download", &ct, &body(size.clone()));
        assert_eq!(st, 400, "{size}: {v}");
        assert_refused(&v, 400, "INVALID_REQUEST: ", &size.to_string());
    }
    assert_eq!(
        pkg.requests().len(),
        1,
        "one fetch; the second request re-hashed"
    );
}

#[test]
fn http_1_0_without_host_and_the_loopback_names_of_etc_hosts_are_accepted() {
    let mut env = Env::new();
    let hosts = env.tmp.path().join("hosts");
    // A comment in Latin-1 (not UTF-8) spoils nothing but itself.
    std::fs::write(
        &hosts,
        b"# Drucker B\xfcro\n127.0.0.1\tlocalhost localhost.localdomain\n127.0.1.1 printer-7\n\
         ::1 localhost ip6-localhost ip6-loopback\nff02::1 ip6-allnodes\n\
         192.168.1.20 updates.lan\n",
    )
    .unwrap();
    env.set("TOPE_OTA_HOSTS_FILE", hosts.to_str().unwrap());
    let srv = Server::start(&env);
    let a = &srv.addr;
    let get = |head: &str| {
        let (st, body) = raw(a, head.as_bytes());
        if st != 0 {
            openapi::check("GET", "/api/v1.0/progress", st, &body).unwrap();
        }
        (st, body)
    };
    // No Host at all: an HTTP/1.0 client (and a bare HTTP/1.1 one) cannot be a browser.
    for head in [
        "GET /api/v1.0/progress HTTP/1.0\r\n\r\n",
        "GET /api/v1.0/progress HTTP/1.0\r\nUser-Agent: old-device-api\r\n\r\n",
        "GET /api/v1.0/progress HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET /api/v1.0/progress HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n",
    ] {
        let (st, body) = get(head);
        assert_eq!(st, 200, "{head:?}: {body}");
    }
    let body = r#"{"version":"1.0.0"}"#;
    let (st, text) = raw(
        a,
        format!(
            "POST /api/v1.0/update HTTP/1.0\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    assert_eq!(st, 400, "HTTP/1.0 POST reaches the route: {text}");
    assert!(text.contains("NO_PACKAGE: "), "{text}");
    // The names /etc/hosts gives loopback addresses, with or without a port, in any case.
    for host in [
        "localhost.localdomain",
        "LOCALHOST.LOCALDOMAIN:12315",
        "ip6-localhost",
        "ip6-loopback:80",
        "printer-7",
    ] {
        let (st, body) = get(&format!(
            "GET /api/v1.0/progress HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        ));
        assert_eq!(st, 200, "{host}: {body}");
    }
    // Still refused: other names of the file, two Hosts, an absolute target naming another host.
    for head in [
        "GET /api/v1.0/progress HTTP/1.1\r\nHost: updates.lan\r\nConnection: close\r\n\r\n",
        "GET /api/v1.0/progress HTTP/1.1\r\nHost: ip6-allnodes\r\nConnection: close\r\n\r\n",
        "GET /api/v1.0/progress HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
        "GET /api/v1.0/progress HTTP/1.0\r\nHost: evil.example\r\n\r\n",
        "GET /api/v1.0/progress HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
        "GET http://evil.example/api/v1.0/progress HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    ] {
        let (st, body) = get(head);
        assert_eq!(st, 403, "{head:?}: {body}");
    }
    let (st, body) = get(
        "GET http://localhost.localdomain:12315/api/v1.0/progress HTTP/1.1\r\nHost: localhost.localdomain:12315\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(st, 200, "{body}");
}

#[test]
fn a_missing_ota_gui_is_warned_once_per_install_over_the_api() {
    // The old service warned when its progress screen was missing. serve's child logs at
    // serve's level, so the warning reaches serve's log (the journal on a device), once.
    let d = v2_ready();
    let srv = Server::start_logged(&d.env);
    let (st, v) = request(
        &srv.addr,
        "POST",
        "/api/v1.0/update",
        &[("Content-Type", "application/json")],
        r#"{"version":"2.0.0"}"#,
    );
    assert_eq!(st, 200, "{v}");
    d.env.wait_state(30, "success", |s| s["stage"] == "success");
    let until = Instant::now() + Duration::from_secs(10);
    while !srv.children().is_empty() {
        assert!(Instant::now() < until, "the install did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = srv.log();
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("warning") && l.contains("no ota-gui at"))
        .collect();
    assert_eq!(warned.len(), 1, "{log}");
    assert!(warned[0].contains("no-gui"), "{log}");
    // At a shell, the same warning once.
    let d = v2_ready();
    let run = d.install();
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.stderr.matches("no ota-gui at").count(), 1, "{run:?}");
}

#[test]
fn reposting_the_download_in_flight_is_200_and_changes_nothing() {
    let mut env = Env::new();
    // The download waits at the gate as long as the test needs: no stall retry meanwhile.
    env.set("TOPE_OTA_STALL_TIMEOUT_MS", "60000");
    let srv = Server::start(&env);
    let a = &srv.addr;
    let ct = [("Content-Type", "application/json")];
    let bytes = data(2 << 20, 142);
    // Held at 1 MiB until released: the download is in flight exactly while the test posts.
    let pkg = PkgServer::start(
        bytes.clone(),
        Behaviour {
            gate_at: Some(1 << 20),
            ..Behaviour::default()
        },
    );
    let other = PkgServer::start(bytes.clone(), Behaviour::default());
    let body = json!({"version": "1.0.0", "package_url": pkg.url("pkg.zip"), "package_name": "pkg.zip",
        "package_size": bytes.len(), "package_md5": md5_hex(&bytes)});
    let (st, v) = request(a, "POST", "/api/v1.0/download", &ct, &body.to_string());
    assert_eq!(st, 200, "{v}");
    pkg.wait_gate(30);
    // Held at the gate, the progress may not have been written yet: the stage is what counts.
    env.wait_state(30, "downloading", |s| s["stage"] == "downloading");
    let worker = srv.children();
    assert_eq!(worker.len(), 1);
    // The same request again, also as an old client may write it (size as a string, the MD5
    // in capitals, a field more): 200, the same worker, no second fetch.
    let mut again = body.clone();
    again["package_size"] = json!(bytes.len().to_string());
    again["package_md5"] = json!(md5_hex(&bytes).to_uppercase());
    again["device_id"] = json!("printer-7");
    for b in [&body, &again] {
        let (st, v) = request(a, "POST", "/api/v1.0/download", &ct, &b.to_string());
        assert_eq!(st, 200, "{b}: {v}");
        assert_eq!(srv.children(), worker, "no second worker");
    }
    // Another package while this one downloads: BUSY.
    let mut different = body.clone();
    different["package_url"] = json!(other.url("pkg.zip"));
    let (st, v) = request(a, "POST", "/api/v1.0/download", &ct, &different.to_string());
    assert_eq!(st, 409, "{v}");
    assert_refused(&v, 409, "BUSY: ", "another package");
    assert_eq!(
        env.state()["stage"],
        "downloading",
        "still held at the gate"
    );
    pkg.release();
    // Ready: the same request is 200, starts nothing and writes nothing.
    env.wait_state(30, "toInstall", |s| s["stage"] == "toInstall");
    let until = Instant::now() + Duration::from_secs(10);
    while !srv.children().is_empty() {
        assert!(Instant::now() < until, "the download did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = std::fs::read(env.state_dir.join("state.json")).unwrap();
    let (st, v) = request(a, "POST", "/api/v1.0/download", &ct, &body.to_string());
    assert_eq!(st, 200, "{v}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(srv.children().is_empty(), "nothing started");
    assert_eq!(
        std::fs::read(env.state_dir.join("state.json")).unwrap(),
        before,
        "state.json unchanged"
    );
    assert_eq!(pkg.requests().len(), 1, "one fetch in all");
    assert!(other.requests().is_empty());
    // The package gone from disk: the same request downloads it again.
    std::fs::remove_file(env.downloads().join("pkg.zip")).unwrap();
    let (st, v) = request(a, "POST", "/api/v1.0/download", &ct, &body.to_string());
    assert_eq!(st, 200, "{v}");
    env.wait_state(30, "toInstall again", |s| {
        s["stage"] == "toInstall" && env.downloads().join("pkg.zip").is_file()
    });
    assert_eq!(pkg.requests().len(), 2, "fetched again");
}

/// A CLI download of a 2 MiB package (seed `seed`) held at 1 MiB by the server's gate, once
/// state.json says `downloading`: (server, bytes, url, md5, the CLI).
fn gated_cli_download(
    env: &Env,
    seed: u64,
) -> (PkgServer, Vec<u8>, String, String, std::process::Child) {
    let bytes = data(2 << 20, seed);
    let pkg = PkgServer::start(
        bytes.clone(),
        Behaviour {
            gate_at: Some(1 << 20),
            ..Behaviour::default()
        },
    );
    let size = bytes.len().to_string();
    let md5 = md5_hex(&bytes);
    let url = pkg.url("pkg.zip");
    let cli = env.spawn(&[
        "download",
        "--version",
        "1.0.0",
        "--url",
        &url,
        "--name",
        "pkg.zip",
        "--size",
        &size,
        "--md5",
        &md5,
    ]);
    pkg.wait_gate(30);
    // Held at the gate, the progress may not have been written yet: the stage is what counts.
    env.wait_state(30, "downloading", |s| s["stage"] == "downloading");
    (pkg, bytes, url, md5, cli)
}

#[test]
fn reposting_a_download_another_writer_runs_is_200() {
    // The CLI (or the heal timer) downloads; device-api posts the same package: 200, nothing
    // started; another package: BUSY.
    let mut env = Env::new();
    // The download waits at the gate as long as the test needs: no stall retry meanwhile.
    env.set("TOPE_OTA_STALL_TIMEOUT_MS", "60000");
    // Held at 1 MiB until released: the CLI holds the lock and `downloading` exactly while the
    // test posts, so the 200 can only come from the "another writer holds the lock" rule (serve
    // has no child of its own, and the package is not ready).
    let (pkg, bytes, url, md5, mut cli) = gated_cli_download(&env, 143);
    let srv = Server::start(&env);
    let ct = [("Content-Type", "application/json")];
    let body = json!({"version": "1.0.0", "package_url": url, "package_name": "pkg.zip",
        "package_size": bytes.len(), "package_md5": md5});
    let (st, v) = request(
        &srv.addr,
        "POST",
        "/api/v1.0/download",
        &ct,
        &body.to_string(),
    );
    assert_eq!(st, 200, "{v}");
    assert!(srv.children().is_empty(), "nothing started");
    let mut different = body.clone();
    different["version"] = json!("1.0.1");
    let (st, v) = request(
        &srv.addr,
        "POST",
        "/api/v1.0/download",
        &ct,
        &different.to_string(),
    );
    assert_eq!(st, 409, "{v}");
    assert!(srv.children().is_empty(), "nothing started");
    assert_eq!(
        env.state()["stage"],
        "downloading",
        "still held at the gate"
    );
    pkg.release();
    assert!(cli.wait().unwrap().success());
    assert_eq!(env.state()["stage"], "toInstall");
    assert_eq!(pkg.requests().len(), 1);
}

#[test]
fn reposting_an_interrupted_download_while_serve_delivers_a_missed_callback_resumes_it() {
    // A download killed mid-way leaves `downloading`; serve starts and holds the lock to send a
    // stage device-api missed (its receiver hangs). The same request again must resume the
    // download, not be taken for another writer's download in flight.
    let mut env = Env::new();
    let (pkg, bytes, url, md5, mut cli) = gated_cli_download(&env, 77);
    kill(&cli, libc::SIGKILL);
    let _ = cli.wait();
    pkg.release();
    let fetches = pkg.requests().len();
    std::fs::write(
        env.state_dir.join("callback.json"),
        r#"{"stage":"idle","error":null,"version":null}"#,
    )
    .unwrap();
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_url = format!("http://{}/api/v1.0/ota/report", hung.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut keep = vec![];
        for c in hung.incoming() {
            keep.push(c);
        }
    });
    env.set("TOPE_OTA_REPORT_URL", &hung_url);
    let srv = Server::start(&env);
    let body = json!({"version": "1.0.0", "package_url": url, "package_name": "pkg.zip",
        "package_size": bytes.len(), "package_md5": md5});
    let (st, v) = request(
        &srv.addr,
        "POST",
        "/api/v1.0/download",
        &[("Content-Type", "application/json")],
        &body.to_string(),
    );
    assert_eq!(st, 200, "{v}");
    env.wait_state(30, "toInstall", |s| s["stage"] == "toInstall");
    assert!(
        pkg.requests().len() > fetches,
        "a 200 was answered, yet nothing resumed the download"
    );
}

#[test]
fn code_500_only_with_stage_failed_and_failure_callbacks_carry_stage() {
    // An automatic rollback reports its steps with 200 while the stage is still `installing`;
    // only the end, stage `failed`, is 500, with `stage` beside `code` and `msg` as well.
    let api = ApiStub::start(Duration::ZERO);
    let mut d = v2_ready();
    d.env.set("TOPE_OTA_REPORT_URL", &api.url);
    d.sc.touch("fail-start-device-api@v2.0.0");
    let srv = Server::start(&d.env);
    let (st, v) = request(
        &srv.addr,
        "POST",
        "/api/v1.0/update",
        &[("Content-Type", "application/json")],
        r#"{"version":"2.0.0"}"#,
    );
    assert_eq!(st, 200, "{v}");
    let until = Instant::now() + Duration::from_secs(30);
    while api.bodies().last().map(|b| b["code"].clone()) != Some(json!(500)) {
        assert!(Instant::now() < until, "{:#?}", api.bodies());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"), "rolled back");
    let bodies = api.bodies();
    let installing: Vec<&Value> = bodies
        .iter()
        .filter(|b| b["data"]["stage"] == "installing")
        .collect();
    for b in &bodies {
        let failed = b["data"]["stage"] == "failed";
        assert_eq!(b["code"], if failed { 500 } else { 200 }, "{b}");
        if failed {
            assert_eq!(b["stage"], "failed", "{b}");
            assert!(
                b["msg"]
                    .as_str()
                    .unwrap()
                    .starts_with("SERVICE_START_FAILED: "),
                "{b}"
            );
            assert_eq!(b["data"]["error"], "SERVICE_START_FAILED", "{b}");
        } else {
            assert_eq!(b["msg"], "success", "{b}");
            assert!(b.get("stage").is_none(), "{b}");
        }
    }
    // The rollback's own steps were reported, with their step and the cause in data.error.
    let rollback_steps: Vec<&str> = installing
        .iter()
        .filter(|b| b["data"]["error"] == "SERVICE_START_FAILED")
        .filter_map(|b| b["data"]["step"].as_str())
        .collect();
    assert!(!rollback_steps.is_empty(), "{bodies:#?}");
    assert_eq!(
        bodies.iter().filter(|b| b["code"] == 500).count(),
        1,
        "one final failure: {bodies:#?}"
    );
}

// ---------------------------------------------------------------- callback delivery

/// The stages device-api received, consecutive repeats merged.
fn stages(api: &ApiStub) -> Vec<String> {
    let mut s: Vec<String> = api
        .bodies()
        .iter()
        .map(|b| b["data"]["stage"].as_str().unwrap_or("?").to_string())
        .collect();
    s.dedup();
    s
}

fn wait_no_children(srv: &Server) {
    let until = Instant::now() + Duration::from_secs(15);
    while !srv.children().is_empty() {
        assert!(Instant::now() < until, "the worker did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The stages device-api received once the worker has exited and heal (the next writer) has
/// sent a stage the worker could not deliver in time; waits for `last` to arrive.
fn delivered_stages(env: &Env, api: &ApiStub, last: &str) -> Vec<String> {
    env.run(&["heal"]).expect(0);
    let until = Instant::now() + Duration::from_secs(10);
    while stages(api).last().map(String::as_str) != Some(last) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    stages(api)
}

#[test]
fn a_device_api_answering_in_300_ms_receives_every_stage_change() {
    // Within the old 500 ms budget: every stage change arrives, in order; only intermediate
    // progress values may be skipped. Under load an attempt may outlast the 500 ms (it is
    // retried, and the stub records every attempt) or the 2 s exit flush may run out, so the
    // stages are read once the worker has exited and the next writer (heal, as the timer would
    // run it) has sent what it missed.
    let api = ApiStub::start(Duration::from_millis(300));
    let mut d = Device::with_v1();
    d.env.set("TOPE_OTA_REPORT_URL", &api.url);
    let (files, manifest) = v2_partial();
    let bytes = d.pack("2.0.0", &files, &manifest);
    let pkg = PkgServer::start(bytes.clone(), Behaviour::default());
    let srv = Server::start(&d.env);
    let ct = [("Content-Type", "application/json")];
    let body = json!({"version": "2.0.0", "package_url": pkg.url("pkg.zip"), "package_name": "pkg.zip",
        "package_size": bytes.len(), "package_md5": md5_hex(&bytes)});
    let (st, v) = request(
        &srv.addr,
        "POST",
        "/api/v1.0/download",
        &ct,
        &body.to_string(),
    );
    assert_eq!(st, 200, "{v}");
    wait_stage(&d.env, "toInstall");
    wait_no_children(&srv);
    assert_eq!(
        delivered_stages(&d.env, &api, "toInstall"),
        ["downloading", "verifying", "toInstall"]
    );
    let (st, v) = request(
        &srv.addr,
        "POST",
        "/api/v1.0/update",
        &ct,
        r#"{"version":"2.0.0"}"#,
    );
    assert_eq!(st, 200, "{v}");
    wait_stage(&d.env, "success");
    wait_no_children(&srv);
    assert_eq!(
        delivered_stages(&d.env, &api, "success"),
        [
            "downloading",
            "verifying",
            "toInstall",
            "installing",
            "success"
        ]
    );
    let last = api.bodies().last().cloned().unwrap();
    assert_eq!(
        (last["code"].clone(), last["data"]["progress"].clone()),
        (json!(200), json!(100))
    );
}

#[test]
fn an_undelivered_stage_change_is_sent_by_the_next_run() {
    // device-api down while a download ends (as when an install stops it, or a reboot or a
    // kill ends the process): the stage is not lost; heal, the timer and serve send it.
    let mut d = Device::with_v1();
    d.env.set(
        "TOPE_OTA_REPORT_URL",
        "http://127.0.0.1:1/api/v1.0/ota/report",
    );
    let (files, manifest) = v2_partial();
    let bytes = d.pack("2.0.0", &files, &manifest);
    d.download("2.0.0", bytes.clone()).expect(0);
    let api = ApiStub::start(Duration::ZERO);
    d.env.set("TOPE_OTA_REPORT_URL", &api.url);
    d.env.run(&["heal"]).expect(0);
    let bodies = api.bodies();
    assert_eq!(bodies.len(), 1, "{bodies:#?}");
    assert_eq!(bodies[0]["code"], 200);
    assert_eq!(bodies[0]["data"]["stage"], "toInstall");
    assert_eq!(bodies[0]["data"]["version"], "2.0.0");
    // Delivered: the next run sends nothing again.
    d.env.run(&["heal"]).expect(0);
    assert_eq!(api.bodies().len(), 1, "{:#?}", api.bodies());

    // A failure device-api missed, sent by serve when it starts.
    d.env.set(
        "TOPE_OTA_REPORT_URL",
        "http://127.0.0.1:1/api/v1.0/ota/report",
    );
    d.sc.touch("fail-start-device-api@v2.0.0");
    d.install().expect(1);
    d.env.set("TOPE_OTA_REPORT_URL", &api.url);
    let srv = Server::start(&d.env);
    let until = Instant::now() + Duration::from_secs(5);
    while api.bodies().len() < 2 {
        assert!(
            Instant::now() < until,
            "serve did not send the missed stage"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let last = api.bodies().last().cloned().unwrap();
    assert_eq!(last["code"], 500, "{last}");
    assert_eq!(last["stage"], "failed", "{last}");
    assert_eq!(last["data"]["error"], "SERVICE_START_FAILED", "{last}");
    drop(srv);
    // heal does not send the failure again; it reports its own cleanup (back to idle).
    d.env.run(&["heal"]).expect(0);
    d.env.run(&["heal"]).expect(0);
    assert_eq!(
        stages(&api),
        ["toInstall", "failed", "idle"],
        "{:#?}",
        api.bodies()
    );
}

#[test]
fn a_repeated_outcome_device_api_missed_is_sent_again() {
    // The same failure twice: device-api received the first, missed the second (down), and
    // the next run sends it, although stage, error and version are the same as the first's.
    let api = ApiStub::start(Duration::ZERO);
    let mut d = Device::with_v1();
    d.env.set("TOPE_OTA_REPORT_URL", &api.url);
    let (files, manifest) = v2_partial();
    let bytes = d.pack("2.0.0", &files, &manifest);
    d.sc.touch("fail-start-device-api@v2.0.0");
    d.download("2.0.0", bytes.clone()).expect(0);
    d.install().expect(1);
    let failed = |api: &ApiStub| api.bodies().iter().filter(|b| b["code"] == 500).count();
    assert_eq!(failed(&api), 1, "{:#?}", api.bodies());
    d.env.set(
        "TOPE_OTA_REPORT_URL",
        "http://127.0.0.1:1/api/v1.0/ota/report",
    );
    d.download("2.0.0", bytes).expect(0);
    d.install().expect(1);
    assert_eq!(d.env.state()["stage"], "failed");
    d.env.set("TOPE_OTA_REPORT_URL", &api.url);
    d.env.run(&["heal"]).expect(0);
    assert_eq!(failed(&api), 2, "the second failure: {:#?}", api.bodies());
}

#[test]
fn an_unparsable_callback_record_sends_the_stage() {
    // A torn or garbage callback.json records nothing as delivered: the stage is sent.
    let mut d = Device::with_v1();
    let (files, manifest) = v2_partial();
    let bytes = d.pack("2.0.0", &files, &manifest);
    d.download("2.0.0", bytes).expect(0);
    std::fs::write(d.env.state_dir.join("callback.json"), b"{\"stage\":\"to").unwrap();
    let api = ApiStub::start(Duration::ZERO);
    d.env.set("TOPE_OTA_REPORT_URL", &api.url);
    d.env.run(&["heal"]).expect(0);
    let bodies = api.bodies();
    assert_eq!(bodies.len(), 1, "{bodies:#?}");
    assert_eq!(bodies[0]["data"]["stage"], "toInstall");
    d.env.run(&["heal"]).expect(0);
    assert_eq!(api.bodies().len(), 1, "recorded now: {:#?}", api.bodies());
}

// ---------------------------------------------------------------- the version already running

#[test]
fn update_to_the_running_version_is_success_and_reinstall_builds_it_again() {
    let api = ApiStub::start(Duration::ZERO);
    let mut d = Device::with_v1();
    d.env.set("TOPE_OTA_REPORT_URL", &api.url);
    let pkg = d.pack("1.0.0", &v1_files(), &full_manifest("1.0.0"));
    d.download("1.0.0", pkg.clone()).expect(0);
    let srv = Server::start(&d.env);
    let ct = [("Content-Type", "application/json")];
    // POST /update of the running version: 200, then success with nothing to do.
    let update_is_a_no_op = |env: &Env| {
        let (st, v) = request(
            &srv.addr,
            "POST",
            "/api/v1.0/update",
            &ct,
            r#"{"version":"1.0.0"}"#,
        );
        assert_eq!(st, 200, "{v}");
        let s = wait_stage(env, "success");
        assert_eq!(s["error"], Value::Null, "{s}");
        assert!(
            s["message"].as_str().unwrap().contains("already runs"),
            "{s}"
        );
        wait_no_children(&srv);
    };
    update_is_a_no_op(&d.env);
    // During a print job too, as the CLI answers: nothing to install, nothing to inhibit.
    let inhibit = std::path::PathBuf::from(&d.env.vars["TOPE_OTA_INHIBIT_DIR"]);
    std::fs::create_dir_all(&inhibit).unwrap();
    std::fs::write(inhibit.join("print-job-42"), b"").unwrap();
    d.download("1.0.0", pkg.clone()).expect(0);
    let cli = d.env.run(&["install", "--version", "1.0.0"]);
    cli.expect(0);
    assert!(cli.stdout.contains("already runs"), "{cli:?}");
    d.download("1.0.0", pkg.clone()).expect(0);
    update_is_a_no_op(&d.env);
    assert!(d.env.download_files().is_empty(), "the package is deleted");
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
    assert!(d.sc.calls().is_empty(), "{:?}", d.sc.calls());
    let last = api.bodies().last().cloned().unwrap();
    assert_eq!(last["code"], 200, "{last}");
    assert_eq!(last["data"]["stage"], "success", "{last}");
    assert!(
        last["data"]["message"]
            .as_str()
            .unwrap()
            .contains("already runs"),
        "{last}"
    );
    wait_no_children(&srv);
    // A reinstall is an install: the print job refuses it, as the CLI does.
    d.download("1.0.0", pkg.clone()).expect(0);
    let (st, v) = request(
        &srv.addr,
        "POST",
        "/api/v1.0/update",
        &ct,
        r#"{"version":"1.0.0","reinstall":true}"#,
    );
    assert_eq!(st, 409, "{v}");
    assert_refused(&v, 409, "INHIBITED: ", "a reinstall during a print");
    std::fs::remove_file(inhibit.join("print-job-42")).unwrap();
    // "reinstall": true installs it again, under a new snapshot name.
    d.download("1.0.0", pkg).expect(0);
    let (st, v) = request(
        &srv.addr,
        "POST",
        "/api/v1.0/update",
        &ct,
        r#"{"version":"1.0.0","reinstall":true}"#,
    );
    assert_eq!(st, 200, "{v}");
    wait_stage(&d.env, "success");
    wait_no_children(&srv);
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0~2"));
    assert_eq!(d.link("previous").as_deref(), Some("v1.0.0"));
    d.assert_current_is(&v1_files());
}

// ---------------------------------------------------------------- odd and hostile requests

#[test]
fn odd_old_clients_and_hostile_bodies() {
    let env = Env::new();
    let srv = Server::start_logged(&env);
    let a = &srv.addr;
    // Old clients: a chunked body, a query string, HTTP/1.0 with a body and no Content-Type.
    let body = r#"{"version":"1.0.0"}"#;
    let (st, text) = raw(
        a,
        format!(
            "POST /api/v1.0/update HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    assert_eq!(st, 400, "{text}");
    assert!(text.contains("NO_PACKAGE: "), "{text}");
    let (st, text) = raw(
        a,
        format!("GET /api/v1.0/progress?ts=1 HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(st, 200, "{text}");
    // Hostile bodies: refused whole, nothing started, the log not forged.
    let ct = [("Content-Type", "application/json")];
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let nested = format!(r#"{{"version":"1.0.0","x":{deep}}}"#);
    let (st, v) = request(a, "POST", "/api/v1.0/update", &ct, &nested);
    assert_eq!(st, 400, "{v}");
    assert_refused(&v, 400, "INVALID_REQUEST: ", "nesting");
    let forged = r#"{"version":"1.0.0","x\ntope-ota: error: forged":1}"#;
    let (st, v) = request(a, "POST", "/api/v1.0/update", &ct, forged);
    assert_eq!(st, 400, "{v}");
    assert_refused(&v, 400, "NO_PACKAGE: ", "a field name with a newline");
    assert!(
        !srv.log()
            .lines()
            .any(|l| l.starts_with("tope-ota: error: forged")),
        "{}",
        srv.log()
    );
    assert!(
        srv.log().contains(r#""x\ntope-ota: error: forged""#),
        "{}",
        srv.log()
    );
    // Many unknown fields: one warning line, a bounded list.
    let many: serde_json::Map<String, Value> = (0..3000)
        .map(|i| (format!("f{i}"), json!(i)))
        .chain([("version".to_string(), json!("1.0.0"))])
        .collect();
    let (st, v) = request(
        a,
        "POST",
        "/api/v1.0/update",
        &ct,
        &Value::Object(many).to_string(),
    );
    assert_eq!(st, 400, "{v}");
    assert_refused(&v, 400, "NO_PACKAGE: ", "many unknown fields");
    let line = srv
        .log()
        .lines()
        .find(|l| l.contains("\"f0\""))
        .unwrap()
        .to_string();
    assert!(
        line.contains("and 2992 more") && line.len() < 1000,
        "{line}"
    );
    // Duplicate keys: the last one counts, and it is validated.
    let dup = r#"{"version":"1.0.0","package_url":"http://127.0.0.1:1/p","package_name":"p.zip","package_size":10,"package_md5":"0123456789abcdef0123456789abcdef","version":"../x"}"#;
    let (st, v) = request(a, "POST", "/api/v1.0/download", &ct, dup);
    assert_eq!(st, 400, "{v}");
    assert_refused(&v, 400, "INVALID_REQUEST: ", "duplicate keys");
    assert!(srv.children().is_empty());
    assert!(
        !env.state_dir.join("state.json").exists(),
        "nothing written"
    );
}
