//! The delta-download benchmark (issue #15 item 6), ignored in the normal suite:
//! `cargo test --release --features failpoints --test integration -- --ignored --nocapture bench_delta`.
//! `TOPE_OTA_BENCH_DELTA_MIB` (default 200) sizes the package's files.
//!
//! A package of 2,000 files (half compressible text, half random bytes) whose next version
//! changes 5 % of them, served by a private nginx; tope-ota downloads the new version whole
//! (`--full`) and as a delta from the old version installed as `current`, on three links: 2 MB/s
//! with 50 ms added to each request, the same with a 1 MiB burst at the start of each
//! connection (whole, `always` and `auto` on it), and loopback unlimited. Requests and bytes are counted in
//! nginx's access log, wall time and peak RSS by [`run_measured`]. Then the same version packed
//! by Python's zipfile (deflate level 6) and by `zip -9`: how many entries the delta reproduces.
//! It prints figures, ratios and budgets (`met` / `NOT MET`); it asserts only that the
//! downloads succeeded.
//!
//! The 2 MB/s link is a relay in this test (one rate for all its connections, and 50 ms before
//! each request goes on), not nginx's `limit_rate` alone: `limit_rate` is per request and
//! counted in whole seconds with a second's worth of credit at the start, so a response smaller
//! than 2 MB is never slowed, and a delta's ranges would see an unlimited link. nginx still has
//! `limit_rate 2000000` on that link, which changes nothing a relay-paced response would see.

use crate::support::*;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const FILES: usize = 2000;
/// 2 MB/s, the old service's network.
const RATE: u64 = 2_000_000;
const DELAY: Duration = Duration::from_millis(50);
const MANIFEST: &str =
    r#"{"version":"2.0.0","modules":[{"name":"data","src":"data","dst":"data"}]}"#;

// ---------------------------------------------------------------- the package

/// xorshift64, the same generator as [`data`].
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Lines of words from a 256-word vocabulary with a line number: text that deflates about 3×.
fn text(len: usize, seed: u64) -> Vec<u8> {
    const SYL: [&str; 8] = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi"];
    const END: [&str; 4] = ["", "n", "s", "r"];
    let vocab: Vec<String> = (0..256)
        .map(|k| format!("{}{}{}", SYL[k % 8], SYL[(k / 8) % 8], END[k / 64]))
        .collect();
    let mut r = Rng::new(seed);
    let mut v = Vec::with_capacity(len + 128);
    let mut line = 0u64;
    while v.len() < len {
        line += 1;
        write!(v, "{line:06}").unwrap();
        for _ in 0..2 {
            let x = r.next();
            for k in 0..6 {
                v.push(b' ');
                v.extend_from_slice(vocab[((x >> (8 * k)) & 0xff) as usize].as_bytes());
            }
        }
        v.push(b'\n');
    }
    v.truncate(len);
    v
}

/// File `i` of a version: its path in the package and the snapshot, and its contents.
fn file(i: usize, changed: bool, mib: usize) -> (String, Vec<u8>) {
    let mut r = Rng::new(7 + i as u64);
    // 10 KiB to 190 KiB, 100 KiB on average: 2,000 files make 200 MiB (at the default size).
    let mut len = (10 * 1024 + (r.next() % (180 * 1024)) as usize) * mib / 200;
    let seed = if changed {
        // Half of the changed files also change size.
        if (i / 20) % 4 < 2 {
            len += len / 10;
        }
        1_000_000 + i as u64
    } else {
        i as u64
    };
    if i % 2 == 0 {
        (format!("data/d{:02}/f{i:04}.txt", i % 50), text(len, seed))
    } else {
        (format!("data/d{:02}/f{i:04}.bin", i % 50), data(len, seed))
    }
}

/// 5 % of the files, one in each run of 20, alternately text and random.
fn is_changed(i: usize) -> bool {
    i % 20 == 10 + (i / 20) % 2
}

fn md5_file(p: &Path) -> String {
    use md5::{Digest, Md5};
    let mut f = File::open(p).unwrap();
    let mut h = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A package file in the directory nginx serves.
struct Pkg {
    name: String,
    size: u64,
    md5: String,
}

impl Pkg {
    fn of(dir: &Path, name: &str) -> Pkg {
        let p = dir.join(name);
        Pkg {
            name: name.into(),
            size: std::fs::metadata(&p).unwrap().len(),
            md5: md5_file(&p),
        }
    }
}

// ---------------------------------------------------------------- nginx

/// One line of the access log.
struct Logged {
    status: u16,
    bytes_sent: u64,
    body_bytes_sent: u64,
}

/// A private nginx serving `root` on a loopback port, one process (`master_process off`, so
/// that killing it leaves no worker behind, and it reads the root-only temp dirs as root).
struct Nginx {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
}

impl Nginx {
    fn start(root: &Path, limit_rate: Option<u64>) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        // nginx cannot listen on port 0: take a free port and hand it over.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.path().display();
        let limit = limit_rate
            .map(|r| format!("limit_rate {r};"))
            .unwrap_or_default();
        let conf = format!(
            r#"master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 64; }}
http {{
    default_type application/octet-stream;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    log_format bench '$status $bytes_sent $body_bytes_sent "$http_range"';
    access_log {d}/access.log bench;
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ {limit} }}
    }}
}}
"#,
            root = root.display()
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run nginx: {e} (bash tests/setup.sh installs nginx-light)")
            });
        let mut n = Nginx {
            child: Some(child),
            dir,
            port,
        };
        let until = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = n.child.as_mut().unwrap().try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < until,
                "nginx did not start ({exited:?}): {}",
                std::fs::read_to_string(n.dir.path().join("error.log")).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(10));
        }
        n
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Shut down gracefully (every request logged), then the access log.
    fn stop(&mut self) -> Vec<Logged> {
        if let Some(mut child) = self.child.take() {
            kill(&child, libc::SIGQUIT);
            let until = Instant::now() + Duration::from_secs(10);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > until {
                    kill(&child, libc::SIGKILL);
                    child.wait().unwrap();
                    break;
                }
                thread::sleep(Duration::from_millis(5));
            }
        }
        std::fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let mut w = l.split_whitespace();
                let mut num = || w.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                Logged {
                    status: num() as u16,
                    bytes_sent: num(),
                    body_bytes_sent: num(),
                }
            })
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(&child, libc::SIGKILL);
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------- the slow link

/// A TCP relay in front of `upstream` that is a slow link: the server's bytes go on at `rate`
/// bytes/s over all connections together, and a request goes on `delay` after it arrived when
/// a response started since the previous one (a request, not each of its packets). With a
/// `burst`, each connection's first `burst` bytes go on at once, as a token bucket per
/// connection (nginx's `limit_rate_after`, a CDN, a cellular link) gives them.
struct Relay {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    max_open: Arc<AtomicUsize>,
    /// Bytes the link delivered to the device (headers included). What nginx sent may be more:
    /// a response the device ends early (a switch to a delta) leaves bytes in the socket
    /// buffers between nginx and the link that never cross it.
    delivered: Arc<AtomicU64>,
}

impl Relay {
    fn start(upstream: SocketAddr, rate: u64, delay: Duration, burst: u64) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let max_open = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        // When the link is free again.
        let link = Arc::new(Mutex::new(Instant::now()));
        let delivered = Arc::new(AtomicU64::new(0));
        let (conns, max, total) = (connections.clone(), max_open.clone(), delivered.clone());
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                conns.fetch_add(1, Ordering::SeqCst);
                let now_open = open.fetch_add(1, Ordering::SeqCst) + 1;
                max.fetch_max(now_open, Ordering::SeqCst);
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let responded = Arc::new(AtomicBool::new(true));
                // Up: client to server, each new request delayed.
                {
                    let (mut from, mut to) =
                        (client.try_clone().unwrap(), server.try_clone().unwrap());
                    let responded = responded.clone();
                    thread::spawn(move || {
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            if responded.swap(false, Ordering::SeqCst) {
                                thread::sleep(delay);
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
                // Down: server to client at the link's rate.
                let (mut from, mut to) = (server, client);
                let (link, open, total) = (link.clone(), open.clone(), total.clone());
                thread::spawn(move || {
                    let mut buf = vec![0u8; 16 * 1024];
                    let mut credit = burst;
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        responded.store(true, Ordering::SeqCst);
                        if credit >= n as u64 {
                            credit -= n as u64;
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            total.fetch_add(n as u64, Ordering::SeqCst);
                            continue;
                        }
                        credit = 0;
                        let done = {
                            let mut free = link.lock().unwrap();
                            let start = (*free).max(Instant::now());
                            *free = start + Duration::from_nanos(n as u64 * 1_000_000_000 / rate);
                            *free
                        };
                        if let Some(wait) = done.checked_duration_since(Instant::now()) {
                            thread::sleep(wait);
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        total.fetch_add(n as u64, Ordering::SeqCst);
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                    let _ = from.shutdown(std::net::Shutdown::Both);
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Relay {
            addr,
            connections,
            max_open,
            delivered,
        }
    }
}

// ---------------------------------------------------------------- one download

#[derive(Clone, Copy, PartialEq)]
enum Link {
    /// 2 MB/s with 50 ms per request.
    Slow,
    /// The same, each connection's first [`BURST`] bytes at once.
    Burst,
    Unlimited,
}

/// The bursting link's burst per connection.
const BURST: u64 = 1 << 20;

/// How the download is asked for: `--full`, `TOPE_OTA_DELTA=always`, the default (`auto`).
#[derive(Clone, Copy, PartialEq)]
enum Ask {
    Full,
    Always,
    Auto,
}

struct Figures {
    requests: usize,
    /// Everything nginx sent (headers included), and the bodies alone.
    sent: u64,
    body: u64,
    statuses: String,
    wall: Duration,
    rss_kib: u64,
    /// `R of N` from `delta: R of N entries reused from current`, when logged.
    reused: Option<(u64, u64)>,
    /// The product's own delta log lines.
    log: Vec<String>,
    /// Entries planned as regenerated that did not regenerate, fetched instead.
    refetched: usize,
    /// Connections over the relay (slow link) and the most open at once.
    connections: Option<(usize, usize)>,
    /// Bytes the relay delivered (what crossed the slow link).
    link_bytes: Option<u64>,
}

/// Download `pkg` from `served` into a fresh state dir, with `versions` (whose `current` is the
/// old version) as the versions root.
fn measure(served: &Path, pkg: &Pkg, versions: &Path, link: Link, ask: Ask) -> Figures {
    let mut nginx = Nginx::start(served, (link == Link::Slow).then_some(RATE));
    let relay = match link {
        Link::Slow => Some(Relay::start(nginx.addr(), RATE, DELAY, 0)),
        Link::Burst => Some(Relay::start(nginx.addr(), RATE, DELAY, BURST)),
        Link::Unlimited => None,
    };
    let addr = relay.as_ref().map_or(nginx.addr(), |r| r.addr);
    let url = format!("http://{addr}/{}", pkg.name);
    let mut env = Env::new();
    env.versions_dir = versions.to_path_buf();
    env.set("TOPE_OTA_STALL_TIMEOUT_MS", "30000");
    env.set("TOPE_OTA_CONNECT_TIMEOUT_MS", "10000");
    let size = pkg.size.to_string();
    // -v: the delta's info lines (what it fetched and reused).
    let mut args = vec![
        "-v",
        "download",
        "--version",
        "2.0.0",
        "--url",
        &url,
        "--name",
        &pkg.name,
        "--size",
        &size,
        "--md5",
        &pkg.md5,
    ];
    match ask {
        Ask::Full => args.push("--full"),
        Ask::Always => {
            env.set("TOPE_OTA_DELTA", "always");
        }
        Ask::Auto => {}
    }
    let stderr_path = env.tmp.path().join("stderr.log");
    let mut cmd = env.cmd(&args);
    cmd.stderr(File::create(&stderr_path).unwrap());
    let (wall, code, rss_kib) = run_measured(&mut cmd);
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert_eq!(code, 0, "download failed:\n{stderr}");
    assert_eq!(env.state()["stage"], "toInstall", "{stderr}");
    let logged = nginx.stop();
    let mut statuses = std::collections::BTreeMap::new();
    for l in &logged {
        *statuses.entry(l.status).or_insert(0usize) += 1;
    }
    let re = regex::Regex::new(r"delta: (\d+) of (\d+) entries reused from current").unwrap();
    let reused = re
        .captures(&stderr)
        .map(|c| (c[1].parse().unwrap(), c[2].parse().unwrap()));
    Figures {
        requests: logged.len(),
        sent: logged.iter().map(|l| l.bytes_sent).sum(),
        body: logged.iter().map(|l| l.body_bytes_sent).sum(),
        statuses: statuses
            .iter()
            .map(|(s, n)| format!("{n}×{s}"))
            .collect::<Vec<_>>()
            .join(" "),
        wall,
        rss_kib,
        reused,
        log: stderr
            .lines()
            .filter(|l| l.contains("delta"))
            .map(str::to_string)
            .collect(),
        refetched: stderr
            .matches("no longer regenerates its entry; fetching it")
            .count(),
        connections: relay.as_ref().map(|r| {
            (
                r.connections.load(Ordering::SeqCst),
                r.max_open.load(Ordering::SeqCst),
            )
        }),
        link_bytes: relay.map(|r| r.delivered.load(Ordering::SeqCst)),
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn print_run(what: &str, f: &Figures) {
    let reused = f
        .reused
        .map_or("n/a".to_string(), |(r, n)| format!("{r} of {n}"));
    let conns = f.connections.map_or(String::new(), |(c, m)| {
        format!(", {c} connections ({m} at once)")
    });
    let over = f.link_bytes.map_or(String::new(), |b| {
        format!(", over the link {b} bytes ({:.2} MiB)", mib(b))
    });
    println!(
        "  {what:<6} {:5} requests ({}{conns}), nginx sent {:>11} bytes ({:7.2} MiB; bodies {:.2} MiB){over}, wall {:7.2} s, peak RSS {:5.1} MiB, entries reused: {reused}",
        f.requests,
        f.statuses,
        f.sent,
        mib(f.sent),
        mib(f.body),
        f.wall.as_secs_f64(),
        f.rss_kib as f64 / 1024.0,
    );
}

fn print_log(f: &Figures) {
    for l in &f.log {
        println!("           | {l}");
    }
    if f.refetched > 0 {
        println!(
            "           | ({} times `… no longer regenerates its entry; fetching it`)",
            f.refetched
        );
    }
}

fn budget(what: &str, ok: bool, detail: String) {
    println!(
        "  budget {what}: {} ({detail})",
        if ok { "met" } else { "NOT MET" }
    );
}

#[test]
#[ignore]
fn bench_delta() {
    let size_mib: usize = std::env::var("TOPE_OTA_BENCH_DELTA_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let work = tempfile::tempdir().unwrap();
    let versions = work.path().join("versions");
    let v1 = versions.join("v1.0.0");
    let v2 = work.path().join("v2");
    let served = work.path().join("www");
    std::fs::create_dir_all(&served).unwrap();

    // v1 installed as current (module data -> data), v2's tree: its unchanged files are v1's.
    let t = Instant::now();
    let mut total = 0u64;
    let mut changed_names = std::collections::BTreeSet::new();
    for i in 0..FILES {
        let (name, bytes) = file(i, false, size_mib);
        let p1 = v1.join(&name);
        let p2 = v2.join(&name);
        std::fs::create_dir_all(p1.parent().unwrap()).unwrap();
        std::fs::create_dir_all(p2.parent().unwrap()).unwrap();
        std::fs::write(&p1, &bytes).unwrap();
        if is_changed(i) {
            let (name, bytes) = file(i, true, size_mib);
            std::fs::write(&p2, &bytes).unwrap();
            total += bytes.len() as u64;
            changed_names.insert(name);
        } else {
            std::fs::hard_link(&p1, &p2).unwrap();
            total += bytes.len() as u64;
        }
    }
    std::os::unix::fs::symlink("v1.0.0", versions.join("current")).unwrap();
    std::fs::write(v2.join("manifest.json"), MANIFEST).unwrap();

    // v2 by `tope-ota pack` (the manifest.json in the directory), Python's zipfile, `zip -9`.
    let env = Env::new();
    let out = served.join("v2.zip");
    env.run(&[
        "pack",
        "--version",
        "2.0.0",
        "--out",
        out.to_str().unwrap(),
        v2.to_str().unwrap(),
    ])
    .expect(0);
    let py = r#"
import os, sys, zipfile
src, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as z:
    z.write(os.path.join(src, "manifest.json"), "manifest.json")
    for d, dirs, files in os.walk(os.path.join(src, "data")):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(d, f)
            z.write(p, os.path.relpath(p, src))
"#;
    let st = Command::new("python3")
        .args(["-c", py])
        .arg(&v2)
        .arg(served.join("v2-zipfile.zip"))
        .status()
        .unwrap();
    assert!(st.success(), "python3 zipfile failed");
    let st = Command::new("zip")
        .args(["-9", "-r", "-q"])
        .arg(served.join("v2-zip9.zip"))
        .args(["manifest.json", "data"])
        .current_dir(&v2)
        .status()
        .unwrap_or_else(|e| panic!("cannot run zip: {e} (bash tests/setup.sh installs it)"));
    assert!(st.success(), "zip -9 failed");
    let pkg = Pkg::of(&served, "v2.zip");
    let zipfile_pkg = Pkg::of(&served, "v2-zipfile.zip");
    let zip9_pkg = Pkg::of(&served, "v2-zip9.zip");

    // The changed entries' compressed size, from v2's central directory.
    let mut archive = zip::ZipArchive::new(File::open(&out).unwrap()).unwrap();
    let entries = archive.len();
    let mut changed_compressed = 0u64;
    for name in &changed_names {
        changed_compressed += archive.by_name(name).unwrap().compressed_size();
    }
    println!(
        "bench_delta: {FILES} files, {:.1} MiB ({} text, {} random), {} changed (5 %); prepared in {:.1} s",
        mib(total),
        FILES / 2,
        FILES / 2,
        changed_names.len(),
        t.elapsed().as_secs_f64()
    );
    println!(
        "  v2 by tope-ota pack: {} bytes ({:.2} MiB), {entries} entries; the changed entries' compressed size {} bytes ({:.2} MiB)",
        pkg.size,
        mib(pkg.size),
        changed_compressed,
        mib(changed_compressed)
    );

    let slow_full = measure(&served, &pkg, &versions, Link::Slow, Ask::Full);
    let slow_delta = measure(&served, &pkg, &versions, Link::Slow, Ask::Auto);
    let fast_full = measure(&served, &pkg, &versions, Link::Unlimited, Ask::Full);
    let fast_delta = measure(&served, &pkg, &versions, Link::Unlimited, Ask::Auto);
    let burst_full = measure(&served, &pkg, &versions, Link::Burst, Ask::Full);
    let burst_always = measure(&served, &pkg, &versions, Link::Burst, Ask::Always);
    let burst_auto = measure(&served, &pkg, &versions, Link::Burst, Ask::Auto);
    let zipfile = measure(&served, &zipfile_pkg, &versions, Link::Slow, Ask::Auto);
    let zip9 = measure(&served, &zip9_pkg, &versions, Link::Slow, Ask::Auto);

    let ratio = |a: f64, b: f64| a / b;
    for (name, full, delta) in [
        (
            "2 MB/s + 50 ms per request (relay; nginx limit_rate 2000000)",
            &slow_full,
            &slow_delta,
        ),
        ("unlimited (loopback)", &fast_full, &fast_delta),
    ] {
        println!("link {name}:");
        print_run("full", full);
        print_run("delta", delta);
        print_log(delta);
        println!(
            "  delta/full: requests {} / {}, bytes {:.3}x, wall {:.3}x, peak RSS {:.2}x",
            delta.requests,
            full.requests,
            ratio(delta.sent as f64, full.sent as f64),
            ratio(delta.wall.as_secs_f64(), full.wall.as_secs_f64()),
            ratio(delta.rss_kib as f64, full.rss_kib as f64),
        );
    }
    println!("link 1 MiB burst per connection, then 2 MB/s + 50 ms per request (relay):");
    print_run("full", &burst_full);
    print_run("always", &burst_always);
    print_log(&burst_always);
    print_run("auto", &burst_auto);
    print_log(&burst_auto);
    for (name, f) in [("always", &burst_always), ("auto", &burst_auto)] {
        println!(
            "  {name}/full: bytes over the link {:.3}x, wall {:.3}x",
            ratio(
                f.link_bytes.unwrap_or(f.sent) as f64,
                burst_full.link_bytes.unwrap_or(burst_full.sent) as f64
            ),
            ratio(f.wall.as_secs_f64(), burst_full.wall.as_secs_f64()),
        );
    }
    let link = |f: &Figures| f.link_bytes.unwrap_or(f.sent) as f64;
    println!(
        "  auto/always: bytes over the link {:.3}x (nginx sent {:.3}x), wall {:.3}x",
        ratio(link(&burst_auto), link(&burst_always)),
        ratio(burst_auto.sent as f64, burst_always.sent as f64),
        ratio(
            burst_auto.wall.as_secs_f64(),
            burst_always.wall.as_secs_f64()
        ),
    );
    println!("budgets:");
    let allowed = changed_compressed + pkg.size / 50;
    let over = burst_auto.link_bytes.unwrap_or(burst_auto.sent);
    budget(
        "bytes over the link by auto on the bursting link <= changed entries' compressed size + 2 % of the package",
        over <= allowed,
        format!(
            "{:.2} MiB <= {:.2} MiB; nginx sent {:.2} MiB",
            mib(over),
            mib(allowed),
            mib(burst_auto.sent)
        ),
    );
    let r = ratio(
        burst_auto.wall.as_secs_f64(),
        burst_always.wall.as_secs_f64(),
    );
    budget(
        "wall of auto on the bursting link <= 1.1x always's",
        r <= 1.1,
        format!(
            "{:.2} s / {:.2} s = {r:.3}x",
            burst_auto.wall.as_secs_f64(),
            burst_always.wall.as_secs_f64()
        ),
    );
    budget(
        "bytes fetched by the delta at 2 MB/s + 50 ms <= changed entries' compressed size + 2 % of the package",
        slow_delta.sent <= allowed,
        format!(
            "{:.2} MiB <= {:.2} + {:.2} = {:.2} MiB",
            mib(slow_delta.sent),
            mib(changed_compressed),
            mib(pkg.size / 50),
            mib(allowed)
        ),
    );
    let r = ratio(slow_delta.wall.as_secs_f64(), slow_full.wall.as_secs_f64());
    budget(
        "wall at 2 MB/s + 50 ms <= 0.15x the full download",
        r <= 0.15,
        format!(
            "{:.2} s / {:.2} s = {r:.3}x",
            slow_delta.wall.as_secs_f64(),
            slow_full.wall.as_secs_f64()
        ),
    );
    let r = ratio(fast_delta.wall.as_secs_f64(), fast_full.wall.as_secs_f64());
    budget(
        "wall unlimited <= 1.1x the full download (delta declines)",
        r <= 1.1,
        format!(
            "{:.2} s / {:.2} s = {r:.3}x",
            fast_delta.wall.as_secs_f64(),
            fast_full.wall.as_secs_f64()
        ),
    );
    let runs = [
        ("full 2 MB/s", &slow_full),
        ("delta 2 MB/s", &slow_delta),
        ("full unlimited", &fast_full),
        ("delta unlimited", &fast_delta),
        ("full burst", &burst_full),
        ("always burst", &burst_always),
        ("auto burst", &burst_auto),
        ("delta zipfile", &zipfile),
        ("delta zip -9", &zip9),
    ];
    let (worst, peak) = runs
        .iter()
        .map(|(n, f)| (*n, f.rss_kib))
        .max_by_key(|r| r.1)
        .unwrap();
    budget(
        "peak RSS <= 16 MiB",
        peak <= 16 * 1024,
        format!("{:.1} MiB at most, in {worst}", peak as f64 / 1024.0),
    );
    for (name, p, f) in [
        ("Python zipfile (deflate, level 6)", &zipfile_pkg, &zipfile),
        ("zip -9 -r", &zip9_pkg, &zip9),
    ] {
        println!(
            "package by {name}: {} bytes ({:.2} MiB), delta at 2 MB/s + 50 ms from current:",
            p.size,
            mib(p.size)
        );
        print_run("delta", f);
        print_log(f);
        println!(
            "  entries reproduced: {}; fetched {:.3}x the package",
            f.reused.map_or(
                "n/a (no `delta: R of N entries reused` line)".to_string(),
                |(r, n)| { format!("{r} of {n}") }
            ),
            ratio(f.sent as f64, p.size as f64)
        );
    }
}
