//! Test harness: the real binary in a temp sandbox, a loopback package server that serves Range
//! requests and misbehaves on demand, and a device-api stub that records callbacks.

#![allow(dead_code)]

use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_tope-ota");

/// Deterministic pseudo-random bytes (xorshift), so tests need no fixtures.
pub fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

pub fn sha256_hex(b: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

pub fn md5_hex(bytes: &[u8]) -> String {
    use md5::{Digest, Md5};
    Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// ---------------------------------------------------------------- sandbox and binary

/// A temp dir with a state dir and a versions root, and the environment for the binary.
pub struct Env {
    pub tmp: tempfile::TempDir,
    pub state_dir: PathBuf,
    pub versions_dir: PathBuf,
    pub vars: HashMap<String, String>,
    /// The binary, and the emulator that runs it (none: natively).
    pub bin: PathBuf,
    pub runner: Vec<String>,
}

impl Env {
    pub fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let state_dir = tmp.path().join("state");
        let versions_dir = tmp.path().join("versions");
        let mut vars = HashMap::new();
        vars.insert("TOPE_OTA_REPORT_URL".into(), String::new());
        // Short network timings so failure paths take milliseconds, not minutes.
        vars.insert("TOPE_OTA_STALL_TIMEOUT_MS".into(), "1000".into());
        vars.insert("TOPE_OTA_CONNECT_TIMEOUT_MS".into(), "1000".into());
        vars.insert("TOPE_OTA_RETRY_DELAY_MS".into(), "50".into());
        // Never the machine's /etc/tope-ota/keys.d or /run/tope-ota/inhibit.d.
        vars.insert(
            "TOPE_OTA_KEYS_DIR".into(),
            tmp.path().join("keys.d").to_string_lossy().into_owned(),
        );
        vars.insert(
            "TOPE_OTA_INHIBIT_DIR".into(),
            tmp.path().join("inhibit.d").to_string_lossy().into_owned(),
        );
        Env {
            tmp,
            state_dir,
            versions_dir,
            vars,
            bin: PathBuf::from(BIN),
            runner: vec![],
        }
    }

    /// The same sandbox for the armhf build of tope-ota ([`armhf_bin`]), run by qemu-arm: a
    /// 32-bit `usize` and `off_t`/`time_t` of a 32-bit ABI, as on the printers' ARMv7 boards.
    pub fn armhf() -> Env {
        Env {
            bin: armhf_bin(),
            // The multi-arch libc6:armhf, not `-L /usr/arm-linux-gnueabihf`: under the cross
            // sysroot's libc every pthread_create crashed in qemu-arm here (7.2 and 10.0).
            runner: vec!["qemu-arm-static".to_string()],
            ..Env::new()
        }
    }

    pub fn set(&mut self, k: &str, v: &str) -> &mut Self {
        self.vars.insert(k.into(), v.into());
        self
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = match self.runner.split_first() {
            None => Command::new(&self.bin),
            Some((emulator, opts)) => {
                let mut c = Command::new(emulator);
                c.args(opts).arg(&self.bin);
                c
            }
        };
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("TOPE_OTA_STATE_DIR", &self.state_dir)
            .env("TOPE_OTA_VERSIONS_DIR", &self.versions_dir)
            .envs(&self.vars)
            .args(args)
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        let out = self.cmd(args).output().unwrap();
        Run::from(out)
    }

    pub fn run_stdin(&self, args: &[&str], input: &[u8]) -> Run {
        let mut child = self
            .cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        Run::from(child.wait_with_output().unwrap())
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    pub fn state(&self) -> Value {
        let bytes = std::fs::read(self.state_dir.join("state.json")).expect("state.json exists");
        serde_json::from_slice(&bytes).expect("state.json parses")
    }

    pub fn try_state(&self) -> Option<Value> {
        let bytes = std::fs::read(self.state_dir.join("state.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn downloads(&self) -> PathBuf {
        self.state_dir.join("downloads")
    }

    /// Names in downloads/, sorted.
    pub fn download_files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.downloads())
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Poll state.json until `pred` holds (panics after `secs`).
    pub fn wait_state(&self, secs: u64, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(s) = self.try_state() {
                if pred(&s) {
                    return s;
                }
            }
            assert!(
                Instant::now() < until,
                "timed out waiting for {what}: {:?}",
                self.try_state()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// tope-ota for `armv7-unknown-linux-gnueabihf` (a debug build with the fail points, as the
/// suite's own binary, so arithmetic overflow panics instead of wrapping), by Debian's
/// toolchain, which `tests/setup-cross.sh` installs; built once per test run, in its own
/// target dir.
pub fn armhf_bin() -> PathBuf {
    static ARMHF: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ARMHF
        .get_or_init(|| {
            armhf_cargo(
                &[
                    "build",
                    "--locked",
                    "--features",
                    "failpoints",
                    "--bin",
                    "tope-ota",
                ],
                "the armhf build",
            );
            armhf_target().join(ARMHF_TRIPLE).join("debug/tope-ota")
        })
        .clone()
}

/// The library's unit tests built for armhf (`cargo test --lib --no-run`): the test binary.
pub fn armhf_unit_tests() -> PathBuf {
    let out = armhf_cargo(
        &[
            "test",
            "--locked",
            "--features",
            "failpoints",
            "--lib",
            "--no-run",
            "--message-format=json",
        ],
        "the armhf unit-test build",
    );
    out.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .expect("cargo named no unit-test binary")
}

const ARMHF_TRIPLE: &str = "armv7-unknown-linux-gnueabihf";

fn armhf_target() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/cross")
}

/// `cargo ARGS --target armv7-…` by Debian's cargo and rustc, after `tests/setup-cross.sh armhf`
/// (the machine's rustup toolchain has no std for the target), in a target dir of their own:
/// its stdout; a failure fails the test with cargo's stderr.
fn armhf_cargo(args: &[&str], what: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Once per run: two apt-get runs at a time would fight over dpkg's lock.
    static SETUP: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    SETUP.get_or_init(|| {
        let st = Command::new("bash")
            .arg(root.join("tests/setup-cross.sh"))
            .arg("armhf")
            .status()
            .expect("bash runs tests/setup-cross.sh");
        assert!(st.success(), "tests/setup-cross.sh armhf failed");
    });
    let mut cmd = Command::new("/usr/bin/cargo");
    cmd.current_dir(root)
        .env("PATH", "/usr/bin:/bin")
        .env("RUSTC", "/usr/bin/rustc")
        .env("CARGO_TARGET_DIR", armhf_target())
        .env(
            "CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_LINKER",
            "arm-linux-gnueabihf-gcc",
        )
        .env(
            "CC_armv7_unknown_linux_gnueabihf",
            "arm-linux-gnueabihf-gcc",
        )
        .env("AR_armv7_unknown_linux_gnueabihf", "arm-linux-gnueabihf-ar")
        .args(args)
        .args(["--target", ARMHF_TRIPLE]);
    let out = cmd.output().expect("/usr/bin/cargo runs");
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A finished run of the binary.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        use std::os::unix::process::ExitStatusExt;
        Run {
            code: o
                .status
                .code()
                .unwrap_or_else(|| 128 + o.status.signal().unwrap_or(0)),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Run {
    #[track_caller]
    pub fn expect(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}):\n{}", self.stdout))
    }
}

// ---------------------------------------------------------------- package server

/// How the package server misbehaves; the default is a well-behaved server.
#[derive(Debug, Clone)]
pub struct Behaviour {
    pub honor_range: bool,
    /// Announce this Content-Length on full responses instead of the real one.
    pub content_length: Option<u64>,
    /// Send a chunked body (no Content-Length) of this many bytes instead.
    pub chunked_len: Option<u64>,
    /// Once: stop sending at this absolute offset and hold the connection open.
    pub stall_once_at: Option<u64>,
    /// Once: close the connection after this absolute offset (also inside a multipart answer).
    pub drop_once_at: Option<u64>,
    /// Answer 416 to Range requests.
    pub refuse_ranges: bool,
    /// Answer 503 to this many requests first.
    pub fail_first: u32,
    /// Send the body in chunks of this size with a pause after each.
    pub throttle: Option<(usize, Duration)>,
    pub etag: Option<String>,
    /// Block at this absolute offset until [`PkgServer::release`].
    pub gate_at: Option<u64>,
    /// Answer every request with this status and an empty body.
    pub status: Option<u16>,
    /// Serve at most this many bytes per 206 response (a capped CDN).
    pub max_range: Option<u64>,
    /// Honour Range but ignore If-Range (splices files if the ETag changed).
    pub ignore_if_range: bool,
    /// From the request of this index on (0 is the first), closed ranges (`bytes=A-B`) come
    /// with their first byte flipped: a server whose ranges lie.
    pub corrupt_ranges_from: Option<usize>,
    /// Answer requests for several ranges with `multipart/byteranges`, as nginx does; when
    /// false, with the whole file (200), as S3 does.
    pub multi_range: bool,
    /// Every response paced as a token bucket against the wall clock (see [`Pace`]).
    pub pace: Option<Pace>,
    /// Once the server has sent this many body bytes in all, the package is named by this
    /// ETag (its bytes unchanged): a package replaced on the server mid-download.
    pub etag_after: Option<(u64, String)>,
}

/// A link that bursts and then keeps a rate, as token buckets, cellular links and CDNs do:
/// each response's first `burst` bytes at once, then `rate` bytes per second (0: unpaced);
/// from when the server has sent `then.0` body bytes in all, `then.1` bytes per second.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pace {
    pub burst: u64,
    pub rate: u64,
    pub then: Option<(u64, u64)>,
}

/// One response's token bucket.
struct Pacer {
    pace: Option<Pace>,
    /// Since when at `rate`, and the bytes allowed at that instant.
    from: Instant,
    credit: u64,
    rate: u64,
    sent: u64,
}

impl Pacer {
    fn new(pace: Option<Pace>) -> Pacer {
        Pacer {
            pace,
            from: Instant::now(),
            credit: pace.map_or(0, |p| p.burst),
            rate: pace.map_or(0, |p| p.rate),
            sent: 0,
        }
    }

    /// The chunk size to write in.
    fn chunk(&self, default: usize) -> usize {
        if self.pace.is_some() {
            16 * 1024
        } else {
            default
        }
    }

    /// Wait until `n` more bytes may go.
    fn wait(&mut self, n: usize, s: &Shared) {
        let Some(p) = self.pace else { return };
        if let Some((at, rate)) = p.then {
            if rate != self.rate && s.st.lock().unwrap().body_bytes >= at {
                // From here on the new rate, with no new burst.
                self.credit = self.sent;
                self.from = Instant::now();
                self.rate = rate;
            }
        }
        self.sent += n as u64;
        if self.rate == 0 || self.sent <= self.credit {
            return;
        }
        let due = self.from
            + Duration::from_secs_f64((self.sent - self.credit) as f64 / self.rate as f64);
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
    }
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            honor_range: true,
            content_length: None,
            chunked_len: None,
            stall_once_at: None,
            drop_once_at: None,
            refuse_ranges: false,
            fail_first: 0,
            throttle: None,
            etag: Some("\"pkg-etag-1\"".into()),
            gate_at: None,
            status: None,
            max_range: None,
            ignore_if_range: false,
            corrupt_ranges_from: None,
            multi_range: true,
            pace: None,
            etag_after: None,
        }
    }
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub status: u16,
}

impl Seen {
    pub fn range(&self) -> Option<&str> {
        self.headers.get("range").map(String::as_str)
    }
}

#[derive(Default)]
struct SrvState {
    requests: Vec<Seen>,
    body_bytes: u64,
    stalled: bool,
    dropped: bool,
    gate_reached: bool,
    gate_open: bool,
}

struct Shared {
    data: Vec<u8>,
    behaviour: Mutex<Behaviour>,
    st: Mutex<SrvState>,
    cv: Condvar,
}

pub struct PkgServer {
    pub addr: String,
    shared: Arc<Shared>,
}

impl PkgServer {
    pub fn start(data: Vec<u8>, behaviour: Behaviour) -> PkgServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shared = Arc::new(Shared {
            data,
            behaviour: Mutex::new(behaviour),
            st: Mutex::new(SrvState::default()),
            cv: Condvar::new(),
        });
        let s = shared.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                thread::spawn(move || {
                    let _ = serve_pkg(conn, &s);
                });
            }
        });
        PkgServer { addr, shared }
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{name}", self.addr)
    }

    pub fn set(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.shared.behaviour.lock().unwrap());
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.shared.st.lock().unwrap().requests.clone()
    }

    /// Body bytes written to sockets, over all requests.
    pub fn body_bytes(&self) -> u64 {
        self.shared.st.lock().unwrap().body_bytes
    }

    pub fn wait_gate(&self, secs: u64) {
        let until = Instant::now() + Duration::from_secs(secs);
        let mut st = self.shared.st.lock().unwrap();
        while !st.gate_reached {
            assert!(Instant::now() < until, "the client never reached the gate");
            st = self
                .shared
                .cv
                .wait_timeout(st, Duration::from_millis(20))
                .unwrap()
                .0;
        }
    }

    pub fn release(&self) {
        self.shared.st.lock().unwrap().gate_open = true;
        self.shared.cv.notify_all();
    }
}

pub fn read_head(
    conn: &mut BufReader<TcpStream>,
) -> Option<(String, String, HashMap<String, String>)> {
    let mut line = String::new();
    conn.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if conn.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    Some((method, path, headers))
}

fn serve_pkg(conn: TcpStream, s: &Shared) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    let Some((method, path, headers)) = read_head(&mut reader) else {
        return Ok(());
    };
    let mut b = s.behaviour.lock().unwrap().clone();
    if let Some((at, etag)) = b.etag_after.clone() {
        if s.st.lock().unwrap().body_bytes >= at {
            b.etag = Some(etag);
        }
    }
    let total = s.data.len() as u64;
    let record = |status: u16| {
        s.st.lock().unwrap().requests.push(Seen {
            method: method.clone(),
            path: path.clone(),
            headers: headers.clone(),
            status,
        });
    };
    let failing = {
        let st = s.st.lock().unwrap();
        (st.requests.len() as u32) < b.fail_first
    };
    if let Some(code) = b.status {
        record(code);
        write!(
            out,
            "HTTP/1.1 {code} Whatever\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        return Ok(());
    }
    if failing {
        record(503);
        write!(
            out,
            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        return Ok(());
    }
    let mut start = 0u64;
    // The end (exclusive) of a closed range `bytes=A-B`.
    let mut closed_end: Option<u64> = None;
    let mut partial = false;
    if let (Some(m), Some(e), true) = (headers.get("if-match"), &b.etag, b.honor_range) {
        if m != e {
            record(412);
            write!(
                out,
                "HTTP/1.1 412 Precondition Failed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
            return Ok(());
        }
    }
    let many = headers
        .get("range")
        .filter(|r| b.honor_range && !b.refuse_ranges && r.contains(','));
    if let Some(r) = many.filter(|_| b.multi_range) {
        let spec = r.strip_prefix("bytes=").unwrap_or("");
        let ranges: Option<Vec<(u64, u64)>> = spec
            .split(',')
            .map(|x| {
                let (a, z) = x.trim().split_once('-')?;
                let (a, z) = (a.parse::<u64>().ok()?, z.parse::<u64>().ok()?);
                (z >= a && a < total).then_some((a, (z + 1).min(total)))
            })
            .collect();
        if let Some(ranges) = ranges {
            record(206);
            return serve_multipart(out, s, &b, &ranges);
        }
    }
    if let Some(r) = headers
        .get("range")
        .filter(|_| b.honor_range && many.is_none())
    {
        let if_range_ok = b.ignore_if_range
            || match (headers.get("if-range"), &b.etag) {
                (Some(v), Some(e)) => v == e,
                (Some(_), None) => false,
                (None, _) => true,
            };
        let spec = r.strip_prefix("bytes=").unwrap_or("");
        let from = match spec.split_once('-') {
            Some((a, "")) => a.parse::<u64>().ok(),
            Some((a, z)) => match (a.parse::<u64>(), z.parse::<u64>()) {
                (Ok(a), Ok(z)) if z >= a => {
                    closed_end = Some((z + 1).min(total));
                    Some(a)
                }
                _ => None,
            },
            None => None,
        };
        if b.refuse_ranges || from.is_none_or(|f| f >= total) {
            record(416);
            write!(out, "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{total}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
            return Ok(());
        }
        if if_range_ok {
            start = from.unwrap();
            partial = true;
        }
    }
    let etag = b
        .etag
        .as_ref()
        .map(|e| format!("ETag: {e}\r\n"))
        .unwrap_or_default();
    let chunked = b.chunked_len.is_some() && !partial;
    let padded;
    let body: &[u8] = match b.chunked_len.filter(|_| !partial) {
        Some(n) => {
            let mut v = data(n as usize, 7);
            let keep = (n as usize).min(s.data.len());
            v[..keep].copy_from_slice(&s.data[..keep]);
            padded = v;
            &padded
        }
        None => {
            let end = closed_end.filter(|_| partial).unwrap_or(total);
            let end = match b.max_range.filter(|_| partial) {
                Some(m) => (start + m).min(end),
                None => end,
            };
            &s.data[start as usize..end as usize]
        }
    };
    let corrupted;
    let body: &[u8] = match b.corrupt_ranges_from {
        Some(k) if partial && closed_end.is_some() && s.st.lock().unwrap().requests.len() >= k => {
            let mut v = body.to_vec();
            v[0] ^= 0xFF;
            corrupted = v;
            &corrupted
        }
        _ => body,
    };
    if partial {
        record(206);
        write!(
            out,
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{}/{total}\r\nContent-Length: {}\r\n{etag}Connection: close\r\n\r\n",
            start + body.len() as u64 - 1,
            body.len()
        )?;
    } else if chunked {
        record(200);
        write!(
            out,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n{etag}Connection: close\r\n\r\n"
        )?;
    } else {
        record(200);
        let cl = b.content_length.unwrap_or(total);
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: {cl}\r\n{etag}Connection: close\r\n\r\n"
        )?;
    }
    if method == "HEAD" {
        return Ok(());
    }
    let mut pos = start;
    let end = start + body.len() as u64;
    let mut pacer = Pacer::new(b.pace);
    let chunk = pacer.chunk(b.throttle.map(|t| t.0).unwrap_or(64 * 1024));
    while pos < end {
        // Cut points: the next offset where something happens.
        let mut next = (pos + chunk as u64).min(end);
        for at in [b.stall_once_at, b.drop_once_at, b.gate_at]
            .into_iter()
            .flatten()
        {
            if at > pos && at < next {
                next = at;
            }
        }
        let slice = &body[(pos - start) as usize..(next - start) as usize];
        pacer.wait(slice.len(), s);
        if chunked {
            write!(out, "{:x}\r\n", slice.len())?;
            out.write_all(slice)?;
            write!(out, "\r\n")?;
        } else {
            out.write_all(slice)?;
        }
        s.st.lock().unwrap().body_bytes += slice.len() as u64;
        pos = next;
        if Some(pos) == b.gate_at {
            out.flush()?;
            let mut st = s.st.lock().unwrap();
            st.gate_reached = true;
            s.cv.notify_all();
            while !st.gate_open {
                st = s.cv.wait(st).unwrap();
            }
        }
        if Some(pos) == b.stall_once_at {
            let first = {
                let mut st = s.st.lock().unwrap();
                !std::mem::replace(&mut st.stalled, true)
            };
            if first {
                out.flush()?;
                thread::sleep(Duration::from_secs(30));
                return Ok(());
            }
        }
        if Some(pos) == b.drop_once_at {
            let first = {
                let mut st = s.st.lock().unwrap();
                !std::mem::replace(&mut st.dropped, true)
            };
            if first {
                out.flush()?;
                let _ = out.shutdown(std::net::Shutdown::Both);
                return Ok(());
            }
        }
        if let Some((_, pause)) = b.throttle {
            thread::sleep(pause);
        }
    }
    if chunked {
        write!(out, "0\r\n\r\n")?;
    }
    out.flush()
}

/// A 206 of several ranges as `multipart/byteranges`, throttled like any body.
fn serve_multipart(
    mut out: TcpStream,
    s: &Shared,
    b: &Behaviour,
    ranges: &[(u64, u64)],
) -> std::io::Result<()> {
    const BOUNDARY: &str = "00000000000000000042";
    let total = s.data.len();
    let corrupt = b
        .corrupt_ranges_from
        .is_some_and(|k| s.st.lock().unwrap().requests.len() > k);
    let mut body = Vec::new();
    // Where the body is cut when `drop_once_at` falls inside a part.
    let mut cut = None;
    for &(a, z) in ranges {
        write!(
            body,
            "\r\n--{BOUNDARY}\r\nContent-Type: application/zip\r\nContent-Range: bytes {a}-{}/{total}\r\n\r\n",
            z - 1
        )?;
        let at = body.len();
        body.extend_from_slice(&s.data[a as usize..z as usize]);
        if corrupt {
            body[at] ^= 0xFF;
        }
        if let Some(d) = b.drop_once_at.filter(|d| (a..z).contains(d)) {
            cut.get_or_insert(at + (d - a) as usize);
        }
    }
    write!(body, "\r\n--{BOUNDARY}--\r\n")?;
    let etag = b
        .etag
        .as_ref()
        .map(|e| format!("ETag: {e}\r\n"))
        .unwrap_or_default();
    write!(
        out,
        "HTTP/1.1 206 Partial Content\r\nContent-Type: multipart/byteranges; boundary={BOUNDARY}\r\nContent-Length: {}\r\n{etag}Connection: close\r\n\r\n",
        body.len()
    )?;
    let first_drop = cut.is_some() && {
        let mut st = s.st.lock().unwrap();
        !std::mem::replace(&mut st.dropped, true)
    };
    let send = if first_drop {
        &body[..cut.unwrap()]
    } else {
        &body[..]
    };
    let mut pacer = Pacer::new(b.pace);
    let chunk = pacer.chunk(b.throttle.map(|t| t.0).unwrap_or(64 * 1024));
    for slice in send.chunks(chunk) {
        pacer.wait(slice.len(), s);
        out.write_all(slice)?;
        s.st.lock().unwrap().body_bytes += slice.len() as u64;
        if let Some((_, pause)) = b.throttle {
            thread::sleep(pause);
        }
    }
    out.flush()?;
    if first_drop {
        let _ = out.shutdown(std::net::Shutdown::Both);
    }
    Ok(())
}

// ---------------------------------------------------------------- device-api stub

/// Records the JSON bodies POSTed to it; answers 200 after `delay`.
pub struct ApiStub {
    pub url: String,
    bodies: Arc<Mutex<Vec<Value>>>,
}

impl ApiStub {
    pub fn start(delay: Duration) -> ApiStub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "http://{}/api/v1.0/ota/report",
            listener.local_addr().unwrap()
        );
        let bodies: Arc<Mutex<Vec<Value>>> = Arc::default();
        let b = bodies.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let b = b.clone();
                thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    let mut out = conn;
                    while let Some((_m, _p, headers)) = read_head(&mut reader) {
                        let len: usize = headers
                            .get("content-length")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        let mut body = vec![0; len];
                        if reader.read_exact(&mut body).is_err() {
                            return;
                        }
                        if let Ok(v) = serde_json::from_slice(&body) {
                            b.lock().unwrap().push(v);
                        }
                        thread::sleep(delay);
                        let ok = b"{\"code\":200,\"msg\":\"success\",\"data\":null}";
                        if write!(
                            out,
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                            ok.len()
                        )
                        .and_then(|_| out.write_all(ok))
                        .is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        ApiStub { url, bodies }
    }

    pub fn bodies(&self) -> Vec<Value> {
        self.bodies.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------- small filesystems

/// A tmpfs of `mib` MiB mounted at a temp dir; unmounted on drop. Tests run as root here.
pub struct Tmpfs {
    pub dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(mib: u32) -> Tmpfs {
        Tmpfs::mount_with(&format!("size={mib}m"))
    }

    /// A tmpfs with these mount options (`size=16m,nr_inodes=500`).
    pub fn mount_with(opts: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            st.success(),
            "mounting a tmpfs failed: these tests need root (CI and the dev machines run as root)"
        );
        Tmpfs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Write zeros into `name` until the filesystem is full.
    pub fn fill(&self, name: &str) {
        let mut f = std::fs::File::create(self.path().join(name)).unwrap();
        let buf = vec![0u8; 64 * 1024];
        loop {
            if f.write_all(&buf).is_err() {
                break;
            }
        }
        // Single bytes for the last partial block.
        while f.write_all(&[0]).is_ok() {}
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Send a signal to a child.
pub fn kill(child: &Child, sig: i32) {
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// Run a command to its end; returns (wall time, exit code, peak RSS in KiB). The peak is the
/// child's VmHWM, polled from /proc: wait4's ru_maxrss would count the test process's memory
/// that the child shared between fork and exec.
pub fn run_measured(cmd: &mut Command) -> (Duration, i32, u64) {
    let t = Instant::now();
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd.stdout(Stdio::null()).spawn().unwrap_or_else(|e| {
        panic!("cannot run {program}: {e} (bash tests/setup.sh installs the tools the suite calls)")
    });
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak = 0u64;
    loop {
        if let Ok(text) = std::fs::read_to_string(&status_path) {
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("VmHWM:") {
                    let kib: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                    peak = peak.max(kib);
                }
            }
        }
        if let Some(st) = child.try_wait().unwrap() {
            use std::os::unix::process::ExitStatusExt;
            let code = st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0));
            return (t.elapsed(), code, peak);
        }
        thread::sleep(Duration::from_millis(2));
    }
}

// ---------------------------------------------------------------- fake systemctl

/// A fake service manager on disk that fails the way a device's does: a unit's program lives
/// in a version, so `start` runs it only when its executable exists in the snapshot `current`
/// points to (`bin/<unit>`, or the path in `unit-<unit>`), and records that snapshot as what the
/// unit runs (`active-<unit>` holds its dir name). Logs `ACTION NAME CURRENT-TARGET` per call.
/// Misbehaviour by files in its dir: `fail-ACTION-NAME` (always), `fail-ACTION-NAME@vX` (while
/// current points to vX), `hang-ACTION-NAME` (sleeps 60 s), `die-NAME@vX` (is-active false
/// while current is vX), and `on-ACTION`, a script run once at the next such call (a fault that
/// strikes while services are down).
pub struct FakeSystemctl {
    pub dir: PathBuf,
    pub script: PathBuf,
}

impl FakeSystemctl {
    pub fn install(env: &mut Env) -> FakeSystemctl {
        let dir = env.tmp.path().join("systemctl");
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("systemctl");
        // Location-independent (its dir from $0, the versions root from the environment tope-ota
        // passes on), so a whole sandbox can be copied.
        let body = r#"#!/bin/sh
d=$(dirname "$0")
cur=$(readlink "$TOPE_OTA_VERSIONS_DIR/current" 2>/dev/null || echo none)
echo "$1 $2 $cur" >> "$d/calls.log"
if [ -e "$d/hang-$1-$2" ]; then sleep 60; fi
if [ -x "$d/on-$1" ]; then mv "$d/on-$1" "$d/ran-on-$1"; "$d/ran-on-$1"; fi
if [ -e "$d/fail-$1-$2" ] || [ -e "$d/fail-$1-$2@$cur" ]; then echo "fake: $1 $2 failed" >&2; exit 1; fi
prog="bin/$2"
if [ -f "$d/unit-$2" ]; then prog=$(cat "$d/unit-$2"); fi
case "$1" in
  stop) rm -f "$d/active-$2" ;;
  start)
    if [ -e "$d/active-$2" ]; then exit 0; fi
    if [ ! -x "$TOPE_OTA_VERSIONS_DIR/current/$prog" ]; then
      echo "fake: $2: $prog is not in $cur (status=203/EXEC)" >&2; exit 1
    fi
    echo "$cur" > "$d/active-$2" ;;
  is-active)
    if [ -e "$d/die-$2@$cur" ]; then exit 3; fi
    [ -e "$d/active-$2" ] || exit 3 ;;
esac
exit 0
"#;
        std::fs::write(&script, body).unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        // printer-ui's program is bin/ui in the test versions.
        std::fs::write(dir.join("unit-printer-ui"), "bin/ui").unwrap();
        env.set("TOPE_OTA_SYSTEMCTL", script.to_str().unwrap());
        env.set("TOPE_OTA_SETTLE_MS", "0");
        FakeSystemctl { dir, script }
    }

    /// The snapshot dir a unit runs from, when it runs.
    pub fn running(&self, unit: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.join(format!("active-{unit}")))
            .ok()
            .map(|s| s.trim().to_string())
    }

    /// A script run once at the next `action` call.
    pub fn on(&self, action: &str, script: &str) {
        let p = self.dir.join(format!("on-{action}"));
        std::fs::write(&p, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }

    pub fn touch(&self, name: &str) {
        std::fs::write(self.dir.join(name), b"").unwrap();
    }

    pub fn rm(&self, name: &str) {
        let _ = std::fs::remove_file(self.dir.join(name));
    }

    /// Calls other than is-active, as `ACTION NAME CURRENT`.
    pub fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("calls.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.starts_with("is-active"))
            .map(str::to_string)
            .collect()
    }

    pub fn clear(&self) {
        let _ = std::fs::remove_file(self.dir.join("calls.log"));
    }
}

// ---------------------------------------------------------------- raw ZIP writer

pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// One stored (uncompressed) ZIP entry with full control over its name, mode and sizes.
pub struct RawEntry {
    pub name: String,
    pub data: Vec<u8>,
    /// Full st_mode, file type bits included (0o100644 file, 0o120777 symlink, …).
    pub mode: u32,
    /// Uncompressed size to write in the headers instead of the real one.
    pub declared: Option<u32>,
}

impl RawEntry {
    pub fn file(name: &str, data: &[u8]) -> RawEntry {
        RawEntry {
            name: name.into(),
            data: data.to_vec(),
            mode: 0o100644,
            declared: None,
        }
    }
    pub fn mode(mut self, mode: u32) -> RawEntry {
        self.mode = mode;
        self
    }
    pub fn dir(name: &str) -> RawEntry {
        RawEntry {
            name: format!("{}/", name.trim_end_matches('/')),
            data: vec![],
            mode: 0o040755,
            declared: None,
        }
    }
    pub fn symlink(name: &str, target: &str) -> RawEntry {
        RawEntry {
            name: name.into(),
            data: target.as_bytes().to_vec(),
            mode: 0o120777,
            declared: None,
        }
    }
}

/// A ZIP of stored entries, written byte by byte (no validation: tests make hostile ones).
pub fn raw_zip(entries: &[RawEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for e in entries {
        let offset = out.len() as u32;
        let crc = crc32(&e.data);
        let csize = e.data.len() as u32;
        let usize_ = e.declared.unwrap_or(csize);
        let name = e.name.as_bytes();
        let mut local = Vec::new();
        local.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        local.extend_from_slice(&20u16.to_le_bytes());
        local.extend_from_slice(&0u16.to_le_bytes()); // flags
        local.extend_from_slice(&0u16.to_le_bytes()); // stored
        local.extend_from_slice(&0u16.to_le_bytes()); // time
        local.extend_from_slice(&0x21u16.to_le_bytes()); // date 1980-01-01
        local.extend_from_slice(&crc.to_le_bytes());
        local.extend_from_slice(&csize.to_le_bytes());
        local.extend_from_slice(&usize_.to_le_bytes());
        local.extend_from_slice(&(name.len() as u16).to_le_bytes());
        local.extend_from_slice(&0u16.to_le_bytes());
        local.extend_from_slice(name);
        out.extend_from_slice(&local);
        out.extend_from_slice(&e.data);
        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&((3u16 << 8) | 20).to_le_bytes());
        central.extend_from_slice(&20u16.to_le_bytes());
        central.extend_from_slice(&0u16.to_le_bytes());
        central.extend_from_slice(&0u16.to_le_bytes());
        central.extend_from_slice(&0u16.to_le_bytes());
        central.extend_from_slice(&0x21u16.to_le_bytes());
        central.extend_from_slice(&crc.to_le_bytes());
        central.extend_from_slice(&csize.to_le_bytes());
        central.extend_from_slice(&usize_.to_le_bytes());
        central.extend_from_slice(&(name.len() as u16).to_le_bytes());
        central.extend_from_slice(&0u16.to_le_bytes()); // extra
        central.extend_from_slice(&0u16.to_le_bytes()); // comment
        central.extend_from_slice(&0u16.to_le_bytes()); // disk
        central.extend_from_slice(&0u16.to_le_bytes()); // internal attrs
        central.extend_from_slice(&(e.mode << 16).to_le_bytes());
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name);
    }
    let cd_offset = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

// ---------------------------------------------------------------- trees

/// Every entry under `root` as `relative path -> (kind, content or link target, mode, inode)`.
pub fn tree(root: &Path) -> std::collections::BTreeMap<String, (char, Vec<u8>, u32, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeMap::new();
    fn walk(
        base: &Path,
        dir: &Path,
        out: &mut std::collections::BTreeMap<String, (char, Vec<u8>, u32, u64)>,
    ) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.file_type().is_symlink() {
                let t = std::fs::read_link(&p).unwrap();
                out.insert(
                    rel,
                    (
                        'l',
                        t.to_string_lossy().as_bytes().to_vec(),
                        m.mode(),
                        m.ino(),
                    ),
                );
            } else if m.is_dir() {
                out.insert(rel, ('d', vec![], m.mode(), m.ino()));
                walk(base, &p, out);
            } else {
                out.insert(rel, ('f', std::fs::read(&p).unwrap(), m.mode(), m.ino()));
            }
        }
    }
    walk(root, root, &mut out);
    out
}

// ---------------------------------------------------------------- signatures

/// A minisign key pair made with Debian's minisign tool (as release engineers do).
pub struct KeyPair {
    pub public: std::path::PathBuf,
    pub secret: std::path::PathBuf,
}

pub fn keypair(dir: &std::path::Path, name: &str) -> KeyPair {
    let public = dir.join(format!("{name}.pub"));
    let secret = dir.join(format!("{name}.key"));
    let out = std::process::Command::new("minisign")
        .args(["-G", "-W", "-p"])
        .arg(&public)
        .arg("-s")
        .arg(&secret)
        .output()
        .expect("minisign is needed: bash tests/setup.sh installs it");
    assert!(out.status.success(), "{out:?}");
    KeyPair { public, secret }
}

pub fn sign(key: &KeyPair, file: &std::path::Path) -> Vec<u8> {
    let sig = std::path::PathBuf::from(format!("{}.minisig", file.display()));
    let out = std::process::Command::new("minisign")
        .args(["-S", "-s"])
        .arg(&key.secret)
        .arg("-m")
        .arg(file)
        .output()
        .expect("minisign is needed: bash tests/setup.sh installs it");
    assert!(out.status.success(), "{out:?}");
    std::fs::read(sig).unwrap()
}

/// This build of tope-ota as version `version`: its version stamp (`TOPE-OTA-VERSION:` and the
/// version, NUL padded, in `src/dispatch.rs`) rewritten, the rest byte for byte the same. It is
/// the same program, so it runs here and acts as this one does; only what it says it is differs
/// (and so its hash; its debug info is stripped too), which is what the choice of the updater
/// and a self-test look at.
pub fn updater_build(version: &str) -> &'static [u8] {
    // Without its debug info (81 MB of the debug build's 101): the same code, a fifth to pack,
    // download, unpack and hash.
    static STRIPPED: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let mut bin = STRIPPED
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("tope-ota");
            let st = Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(&out)
                .arg(BIN)
                .status()
                .unwrap();
            assert!(st.success(), "strip {BIN}");
            std::fs::read(&out).unwrap()
        })
        .clone();
    restamp(&mut bin, version);
    Box::leak(bin.into_boxed_slice())
}

/// Rewrite the version stamp of the tope-ota build `bin` (of this crate's version) to `version`.
pub fn restamp(bin: &mut [u8], version: &str) {
    let stamp = format!("TOPE-OTA-VERSION:{}\0", env!("CARGO_PKG_VERSION"));
    let at: Vec<usize> = bin
        .windows(stamp.len())
        .enumerate()
        .filter(|(_, w)| *w == stamp.as_bytes())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 1, "the version stamp is in the binary once");
    assert!(version.len() < 64 - 17);
    let field = &mut bin[at[0] + 17..at[0] + 64];
    field.fill(0);
    field[..version.len()].copy_from_slice(version.as_bytes());
}
