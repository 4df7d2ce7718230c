//! Benchmarks, ignored in the normal suite: `cargo test --release -- --ignored --nocapture bench`.
//! They print figures and ratios against baselines measured in the same run; they assert only
//! that the work succeeded.

use crate::support::*;
use std::process::Command;
use std::time::Duration;

fn best_of(n: usize, mut f: impl FnMut() -> Duration) -> Duration {
    (0..n).map(|_| f()).min().unwrap()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[test]
#[ignore]
fn bench_download() {
    let mib: usize = std::env::var("TOPE_OTA_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let len = mib * 1024 * 1024;
    let bytes = data(len, 42);
    let md5 = md5_hex(&bytes);
    let env = Env::new();
    let file = env.tmp.path().join("pkg.bin");
    std::fs::write(&file, &bytes).unwrap();
    let srv = PkgServer::start(
        bytes,
        Behaviour {
            throttle: Some((1024 * 1024, Duration::ZERO)),
            ..Behaviour::default()
        },
    );
    let url = srv.url("pkg.bin");

    let md5sum = best_of(3, || {
        let (t, code, _) = run_measured(Command::new("md5sum").arg(&file));
        assert_eq!(code, 0);
        t
    });
    let out = env.tmp.path().join("curl.out");
    let curl = best_of(3, || {
        let (t1, c1, _) = run_measured(Command::new("curl").args(["-s", "-o"]).arg(&out).arg(&url));
        let (t2, c2, _) = run_measured(Command::new("md5sum").arg(&out));
        assert_eq!((c1, c2), (0, 0));
        t1 + t2
    });
    let _ = std::fs::remove_file(&out);

    let dd_out = env.tmp.path().join("dd.out");
    let dd = best_of(3, || {
        let (t, code, _) = run_measured(
            Command::new("dd")
                .arg(format!("if={}", file.display()))
                .arg(format!("of={}", dd_out.display()))
                .args(["bs=1M", "conv=fsync", "status=none"]),
        );
        assert_eq!(code, 0);
        t
    });
    let _ = std::fs::remove_file(&dd_out);

    let size = len.to_string();
    let mut rss = 0;
    let mut ota_in = |state_dir: &std::path::Path| {
        let mut e = Env::new();
        e.state_dir = state_dir.to_path_buf();
        best_of(3, || {
            let _ = std::fs::remove_dir_all(&e.state_dir);
            let (t, code, kib) = run_measured(&mut e.cmd(&[
                "download",
                "--version",
                "1.0.0",
                "--url",
                &url,
                "--name",
                "pkg.bin",
                "--size",
                &size,
                "--md5",
                &md5,
            ]));
            assert_eq!(code, 0, "download failed");
            assert_eq!(e.state()["stage"], "toInstall");
            rss = rss.max(kib);
            t
        })
    };
    let on_disk = ota_in(&env.tmp.path().join("state"));
    let fs = Tmpfs::mount((mib + 64) as u32);
    let on_tmpfs = ota_in(&fs.path().join("state"));
    drop(fs);

    let r = |a: Duration, b: Duration| secs(a) / secs(b);
    println!("bench_download: {mib} MiB over loopback, best of 3 each");
    println!(
        "  md5sum f (f in page cache)            {:8.3} s",
        secs(md5sum)
    );
    println!(
        "  curl -o f && md5sum f                 {:8.3} s",
        secs(curl)
    );
    println!("  dd conv=fsync of f (disk write bound) {:8.3} s", secs(dd));
    println!(
        "  tope-ota download, state on tmpfs     {:8.3} s = {:.2}x md5sum (budget 1.15x), {:.2}x curl+md5sum",
        secs(on_tmpfs),
        r(on_tmpfs, md5sum),
        r(on_tmpfs, curl)
    );
    println!(
        "  tope-ota download, state on disk      {:8.3} s = {:.2}x md5sum, {:.2}x curl+md5sum, {:.2}x max(md5sum, dd)",
        secs(on_disk),
        r(on_disk, md5sum),
        r(on_disk, curl),
        r(on_disk, md5sum.max(dd))
    );
    println!(
        "  tope-ota peak RSS                     {:8.1} MiB (budget 16 MiB)",
        rss as f64 / 1024.0
    );
}

#[test]
#[ignore]
fn bench_install() {
    let files: usize = std::env::var("TOPE_OTA_BENCH_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let mib: usize = std::env::var("TOPE_OTA_BENCH_INSTALL_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(230);
    let mut env = Env::new();
    let _sc = FakeSystemctl::install(&mut env);
    let src = env.tmp.path().join("src");
    let per = mib * 1024 * 1024 / files;
    for i in 0..files {
        let p = src.join(format!("data/d{:02}/f{i:05}.bin", i % 50));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        // Mostly random with a repeated tail: compresses a little, like firmware files.
        let mut b = data(per * 7 / 8, i as u64 + 1);
        b.extend(std::iter::repeat_n((i % 251) as u8, per - per * 7 / 8));
        std::fs::write(&p, b).unwrap();
    }
    std::fs::write(
        src.join("manifest.json"),
        r#"{"version":"9.0.0","modules":[{"name":"data","src":"data","dst":"data","process_name":"device-api","restart_order":1}]}"#,
    )
    .unwrap();
    let zip = env.tmp.path().join("pkg.zip");
    let run = env.run(&[
        "pack",
        "--version",
        "9.0.0",
        "--out",
        zip.to_str().unwrap(),
        src.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 0, "{run:?}");
    let bytes = std::fs::read(&zip).unwrap();
    let md5 = md5_hex(&bytes);
    let size = bytes.len().to_string();

    let out = env.tmp.path().join("unzipped");
    let unzip = best_of(3, || {
        let _ = std::fs::remove_dir_all(&out);
        let (t1, c1, _) = run_measured(
            Command::new("unzip")
                .arg("-q")
                .arg(&zip)
                .arg("-d")
                .arg(&out),
        );
        let (t2, c2, _) = run_measured(&mut Command::new("sync"));
        assert_eq!((c1, c2), (0, 0));
        t1 + t2
    });
    let _ = std::fs::remove_dir_all(&out);

    let srv = PkgServer::start(bytes, Behaviour::default());
    let url = srv.url("pkg.zip");
    let mut rss = 0;
    let ota = best_of(3, || {
        let _ = std::fs::remove_dir_all(&env.state_dir);
        let _ = std::fs::remove_dir_all(&env.versions_dir);
        let run = env.run(&[
            "download",
            "--version",
            "9.0.0",
            "--url",
            &url,
            "--name",
            "pkg.zip",
            "--size",
            &size,
            "--md5",
            &md5,
        ]);
        assert_eq!(run.code, 0, "{run:?}");
        let (t, code, kib) = run_measured(&mut env.cmd(&["install"]));
        assert_eq!(code, 0, "install failed: {:?}", env.state());
        rss = rss.max(kib);
        t
    });
    let n = std::fs::read_dir(env.versions_dir.join("current/data/d00"))
        .unwrap()
        .count();
    assert_eq!(n, files / 50);
    println!(
        "bench_install: {} MiB package, {files} files, best of 3 each",
        bytes_mib(&zip)
    );
    println!("  unzip -q && sync                {:8.3} s", secs(unzip));
    println!(
        "  tope-ota install                {:8.3} s = {:.2}x unzip+sync (budget 1.5x)",
        secs(ota),
        secs(ota) / secs(unzip)
    );
    println!(
        "  tope-ota install peak RSS       {:8.1} MiB (budget 16 MiB)",
        rss as f64 / 1024.0
    );
}

fn bytes_mib(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).unwrap().len() >> 20
}

/// GET /progress over one keep-alive connection: (status, latency).
fn keepalive_get(s: &mut std::net::TcpStream, host: &str) -> (u16, Duration) {
    use std::io::{Read, Write};
    let t = std::time::Instant::now();
    s.write_all(format!("GET /api/v1.0/progress HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .unwrap();
    let mut buf = Vec::with_capacity(512);
    let mut byte = [0u8; 1024];
    let (head_end, len) = loop {
        let n = s.read(&mut byte).unwrap();
        assert!(n > 0, "server closed the connection");
        buf.extend_from_slice(&byte[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            break (i + 4, len);
        }
    };
    while buf.len() < head_end + len {
        let n = s.read(&mut byte).unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&byte[..n]);
    }
    let status = String::from_utf8_lossy(&buf[9..12]).parse().unwrap_or(0);
    (status, t.elapsed())
}

#[test]
#[ignore]
fn bench_serve_progress() {
    let secs: u64 = std::env::var("TOPE_OTA_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let rate: u64 = 500;
    let env = Env::new();
    let srv = crate::serve::Server::start(&env);
    let bytes = data(160 << 20, 9);
    let pkg = PkgServer::start(
        bytes.clone(),
        Behaviour {
            throttle: Some((64 * 1024, Duration::from_millis(6))),
            ..Behaviour::default()
        },
    );
    let body = serde_json::json!({"version": "1.0.0", "package_url": pkg.url("p.zip"), "package_name": "p.zip",
        "package_size": bytes.len(), "package_md5": md5_hex(&bytes)})
    .to_string();
    let (st, _) = crate::serve::call(&srv.addr, "POST", "/api/v1.0/download", Some(&body));
    assert_eq!(st, 200);
    let mut conn = std::net::TcpStream::connect(&srv.addr).unwrap();
    conn.set_nodelay(true).unwrap();
    let start = std::time::Instant::now();
    let mut lat = Vec::new();
    let mut stages = std::collections::BTreeSet::new();
    for i in 0..secs * rate {
        let due = start + Duration::from_micros(i * 1_000_000 / rate);
        if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
            std::thread::sleep(wait);
        }
        let (status, d) = keepalive_get(&mut conn, &srv.addr);
        assert_eq!(status, 200);
        lat.push(d);
        if i % 500 == 0 {
            stages.insert(
                crate::serve::call(&srv.addr, "GET", "/api/v1.0/progress", None).1["data"]["stage"]
                    .to_string(),
            );
        }
    }
    let wall = start.elapsed();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let status = std::fs::read_to_string(format!("/proc/{}/status", srv.child.id())).unwrap();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .unwrap_or("")
        .to_string();
    println!("bench_serve_progress: {} GET /progress in {:.2} s ({:.0}/s) during a download (stages seen {stages:?})",
        lat.len(), wall.as_secs_f64(), lat.len() as f64 / wall.as_secs_f64());
    println!(
        "  p50 {:?}  p99 {:?}  max {:?}  (budget p99 <= 5 ms)",
        pct(0.50),
        pct(0.99),
        lat[lat.len() - 1]
    );
    println!(
        "  serve peak RSS: {} (budget 16 MiB)",
        hwm.trim_start_matches("VmHWM:").trim()
    );
}
