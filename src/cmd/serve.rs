//! `serve`: the old HTTP API (`/api/v1.0/download`, `/update`, `/progress`) on loopback, wire
//! compatible, on hyper's HTTP/1 server and a current-thread tokio runtime.
//!
//! Work runs as a child process of this same binary (`download --request -`, `install`), so
//! the server never holds the lock for longer than it takes to hand it over, and survives a
//! crash of the work. Every response is `{"code","msg","data"}` with the HTTP status = code.

use super::download::Package;
use crate::cli::{Global, ServeArgs};
use crate::error::{self, ErrorCode, OtaError};
use crate::lock::{Purpose, StateLock, LOCK_FD_ENV};
use crate::output::Output;
use crate::state::PACKAGE_TTL_SECS;
use crate::state::{self, ReadOutcome, Stage};
use crate::{clock, validate};
use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE, HOST, ORIGIN};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::task::AbortHandle;

/// Largest request body accepted (413 above).
pub const MAX_BODY: usize = 64 * 1024;
/// Largest request head accepted (hyper answers 431 above). hyper's minimum buffer.
pub const MAX_HEAD: usize = 8 * 1024;
/// A request must arrive whole within this: its head by hyper's header timer, its body by
/// ours. Only receiving is bounded; the work a complete request starts (the lock hand-over,
/// the inhibit command) is not, so it answers instead of being cut off.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Connections open at once. At the cap, a new connection sheds the oldest incomplete one
/// (see [`Conns`]).
pub const MAX_CONNECTIONS: usize = 512;

struct Ctx {
    global: Global,
    exe: std::path::PathBuf,
    /// `serve --api-allow-downgrade`: honour `allow_downgrade` in POST /update.
    api_allow_downgrade: bool,
    conns: Conns,
    /// The names /etc/hosts gives loopback addresses only, read at start.
    loopback_names: HashSet<String>,
    /// The last download a child of ours was started for, and whether that child still runs.
    download: Mutex<Option<(Package, Arc<AtomicBool>)>>,
    /// The last /progress body, valid while state.json keeps its inode, size and mtime.
    progress_cache: Mutex<Option<(StateKey, Bytes)>>,
    /// `--lock-wait`, read once at start.
    lock_wait: Duration,
    /// Where systemd waits for our READY=1 (`NOTIFY_SOCKET`), taken out of the environment at
    /// start: systemd's notifications are serve's alone, and no child (a download, an install,
    /// its migrations and health checks, the inhibit command) inherits the socket. Only serve's
    /// own restart passes it on.
    notify_socket: Option<std::ffi::OsString>,
}

/// The open connections. Each is *incomplete* while its request head or body is still arriving
/// (an idle keep-alive connection between requests too) and *busy* from the moment a whole
/// request has arrived until it is answered. At [`MAX_CONNECTIONS`], a new connection sheds the
/// incomplete connection that has been waiting longest, so connections that send a byte and
/// stall cannot lock out a client that sends a whole request; busy ones are never shed.
#[derive(Default)]
struct Conns {
    table: Mutex<ConnTable>,
    /// A connection ended or stopped being busy.
    freed: tokio::sync::Notify,
}

#[derive(Default)]
struct ConnTable {
    /// Increases at every registration and every busy→incomplete step: the order of "oldest".
    seq: u64,
    open: HashMap<u64, ConnEntry>,
}

struct ConnEntry {
    /// When (in `seq` order) it last became incomplete.
    since: u64,
    busy: bool,
    abort: Option<AbortHandle>,
}

impl Conns {
    fn lock(&self) -> std::sync::MutexGuard<'_, ConnTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn len(&self) -> usize {
        self.lock().open.len()
    }

    /// A new incomplete connection; its id.
    fn register(&self) -> u64 {
        let mut t = self.lock();
        t.seq += 1;
        let id = t.seq;
        t.open.insert(
            id,
            ConnEntry {
                since: id,
                busy: false,
                abort: None,
            },
        );
        id
    }

    fn set_abort(&self, id: u64, h: AbortHandle) {
        if let Some(e) = self.lock().open.get_mut(&id) {
            e.abort = Some(h);
        }
    }

    fn set_busy(&self, id: u64, busy: bool) {
        let mut t = self.lock();
        t.seq += 1;
        let seq = t.seq;
        if let Some(e) = t.open.get_mut(&id) {
            e.busy = busy;
            if !busy {
                e.since = seq;
            }
        }
        drop(t);
        if !busy {
            self.freed.notify_one();
        }
    }

    fn remove(&self, id: u64) {
        if self.lock().open.remove(&id).is_some() {
            self.freed.notify_one();
        }
    }

    /// Whether a connection is answering a whole request.
    fn any_busy(&self) -> bool {
        self.lock().open.values().any(|e| e.busy)
    }

    /// Close the incomplete connection that has waited longest; false when every open
    /// connection is busy.
    fn shed_oldest_incomplete(&self) -> bool {
        let mut t = self.lock();
        let oldest = t
            .open
            .iter()
            .filter(|(_, e)| !e.busy && e.abort.is_some())
            .min_by_key(|(_, e)| e.since)
            .map(|(id, _)| *id);
        let Some(id) = oldest else {
            return false;
        };
        if let Some(h) = t.open.remove(&id).and_then(|e| e.abort) {
            h.abort();
        }
        log::debug!(
            "{} connections open: shed the oldest incomplete one",
            MAX_CONNECTIONS
        );
        true
    }
}

/// One connection's registration, held by its task: removed when the task ends or is shed.
struct ConnSlot {
    ctx: Arc<Ctx>,
    id: u64,
}

impl ConnSlot {
    /// Mark the connection busy (a whole request has arrived) until the guard drops.
    fn busy(&self) -> BusyGuard<'_> {
        self.ctx.conns.set_busy(self.id, true);
        BusyGuard(self)
    }

    /// A request's head has arrived: busy now when nothing else is to come (`whole`), else
    /// once its body is in ([`ConnSlot::busy`]). Either way the connection counts as waiting
    /// for its next request from the moment this guard drops, not from when it was opened.
    fn request(&self, whole: bool) -> BusyGuard<'_> {
        if whole {
            self.ctx.conns.set_busy(self.id, true);
        }
        BusyGuard(self)
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.ctx.conns.remove(self.id);
    }
}

struct BusyGuard<'a>(&'a ConnSlot);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.ctx.conns.set_busy(self.0.id, false);
    }
}

/// What identifies one version of state.json: every write renames a new inode over it.
type StateKey = (u64, u64, i64, i64);

fn state_key(ctx: &Ctx) -> Option<StateKey> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(state::state_path(&ctx.global.state_dir)).ok()?;
    Some((m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

type Resp = Response<Full<Bytes>>;

fn envelope(status: u16, msg: impl Into<String>, data: Value) -> Resp {
    let body = json!({"code": status, "msg": msg.into(), "data": data}).to_string();
    json_response(status, Bytes::from(body))
}

fn json_response(status: u16, body: Bytes) -> Resp {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn coded(err: &OtaError) -> Resp {
    envelope(err.code.http_status(), err.message(), Value::Null)
}

/// Where the loopback names of the device are (`TOPE_OTA_HOSTS_FILE` for tests).
pub const HOSTS_FILE: &str = "/etc/hosts";

/// The names a hosts file gives loopback addresses only (`localhost.localdomain`,
/// `ip6-localhost`, the device's own name on `127.0.1.1`), lowercased. A name that the file also
/// gives another address is not one of them. A file that cannot be read gives none.
pub fn loopback_names(text: &str) -> HashSet<String> {
    let mut loopback = HashSet::new();
    let mut other = HashSet::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace();
        let Some(addr) = words.next() else { continue };
        // `fe80::1%eth0`: the zone does not change what the address is.
        let addr = addr.split('%').next().unwrap_or(addr);
        let is_loopback = addr
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
        for name in words {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if name.is_empty() {
                continue;
            }
            if is_loopback {
                loopback.insert(name);
            } else {
                other.insert(name);
            }
        }
    }
    loopback.retain(|n| !other.contains(n));
    loopback
}

fn read_loopback_names() -> HashSet<String> {
    use std::io::Read;
    let path = std::env::var_os("TOPE_OTA_HOSTS_FILE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| HOSTS_FILE.into());
    // Bytes, decoded lossily: a stray non-UTF-8 byte (a comment in Latin-1, a truncated last
    // character) spoils only the word it is in, not the whole file.
    let mut bytes = Vec::new();
    match std::fs::File::open(&path).and_then(|f| f.take(1 << 20).read_to_end(&mut bytes)) {
        Ok(_) => {
            let names = loopback_names(&String::from_utf8_lossy(&bytes));
            log::debug!("loopback names from {}: {names:?}", path.display());
            names
        }
        Err(e) => {
            log::warn!(
                "reading {}: {e}; only localhost and loopback addresses are accepted as Host",
                path.display()
            );
            HashSet::new()
        }
    }
}

/// `localhost`, `*.localhost`, `127.x.y.z`, `[::1]` or a name the hosts file gives loopback
/// addresses only (`names`, see [`loopback_names`]), with an optional port: the only Hosts a
/// browser on the device can send for us. Anything else is a DNS-rebinding attempt (or a
/// misrouted request).
pub fn is_loopback_host(host: &str, names: &HashSet<String>) -> bool {
    let h = host.trim();
    let name = if let Some(rest) = h.strip_prefix('[') {
        match rest.split_once(']') {
            Some((addr, port)) if port.is_empty() || port.starts_with(':') => addr,
            _ => return false,
        }
    } else {
        match h.rsplit_once(':') {
            Some((n, port)) if port.bytes().all(|c| c.is_ascii_digit()) => n,
            Some(_) => return false,
            None => h,
        }
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") || names.contains(&name) {
        return true;
    }
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => false,
    }
}

/// The body, within [`REQUEST_DEADLINE`]: `Err` drops the connection (nothing is answered to
/// a request that did not arrive whole), `Ok(Err(resp))` answers 400/413.
async fn receive_body(req: Request<Incoming>) -> Result<Result<Bytes, Resp>, std::io::Error> {
    tokio::time::timeout(REQUEST_DEADLINE, read_body(req))
        .await
        .map_err(|_| std::io::Error::other("request body not whole within 5 s"))
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Resp> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(envelope(
            413,
            "PAYLOAD_TOO_LARGE: the body is over 64 KiB",
            Value::Null,
        ));
    }
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(envelope(
                413,
                "PAYLOAD_TOO_LARGE: the body is over 64 KiB",
                Value::Null,
            ))
        }
        Err(e) => Err(envelope(
            400,
            format!("INVALID_REQUEST: reading the body: {e}"),
            Value::Null,
        )),
    }
}

fn invalid(detail: impl std::fmt::Display) -> Resp {
    coded(&OtaError::new(
        ErrorCode::InvalidRequest,
        detail.to_string(),
    ))
}

/// The `data` of GET /progress, from state.json (no lock), re-read only when it changed.
fn progress(ctx: &Ctx) -> Resp {
    let key = state_key(ctx);
    if let (Some(k), Ok(cache)) = (key, ctx.progress_cache.lock()) {
        if let Some((ck, body)) = cache.as_ref() {
            if *ck == k {
                return json_response(200, body.clone());
            }
        }
    }
    let body = match super::status::progress_data(&ctx.global) {
        Ok(d) => Bytes::from(json!({"code": 200, "msg": "success", "data": d}).to_string()),
        Err(e) => return coded(&error::classify(&e)),
    };
    if let (Some(k), Ok(mut cache)) = (key, ctx.progress_cache.lock()) {
        *cache = Some((k, body.clone()));
    }
    json_response(200, body)
}

/// Take the lock and start `tope-ota ARGS` holding it; 409 BUSY when another writer has it.
/// The flag is true while the child runs.
/// Operations a POST asked to start (whether or not the child could run): what the fuzzer's
/// exchange checks a refused request never reaches.
static START_ATTEMPTS: AtomicUsize = AtomicUsize::new(0);

async fn start_child(
    ctx: &Ctx,
    args: &[&str],
    stdin: Option<Bytes>,
) -> Result<Arc<AtomicBool>, Resp> {
    START_ATTEMPTS.fetch_add(1, Ordering::SeqCst);
    // The same rule as the CLI's: a brief holder (heal with nothing to do, a writer ending) is
    // waited for, at most --lock-wait; an operation in flight is BUSY at once.
    let purpose = Purpose::long(
        "serve",
        format!("starting `tope-ota {}` for device-api", args[0]),
    );
    // At most MAX_LOCK_WAITERS requests wait at once; the others try once: a flood of POSTs
    // cannot keep every connection slot busy for a whole --lock-wait.
    let waiter = LockWaiter::new();
    let wait = if waiter.ahead < MAX_LOCK_WAITERS {
        ctx.lock_wait
    } else {
        Duration::ZERO
    };
    let lock = StateLock::acquire_async(&ctx.global.state_dir, &purpose, wait)
        .await
        .map_err(|e| coded(&crate::error::classify(&e)))?;
    drop(waiter);
    let file = lock.into_file();
    let fd = file.as_raw_fd();
    let g = &ctx.global;
    let mut cmd = tokio::process::Command::new(&ctx.exe);
    cmd.arg("--state-dir")
        .arg(&g.state_dir)
        .arg("--versions-dir")
        .arg(&g.versions_dir)
        .arg("--report-url")
        .arg(&g.report_url)
        .arg("--systemctl")
        .arg(&g.systemctl)
        .arg("--reboot-cmd")
        .arg(&g.reboot_cmd)
        .arg("--gui")
        .arg(&g.gui)
        .arg("--inhibit-dir")
        .arg(&g.inhibit_dir)
        .arg("--keys-dir")
        .arg(&g.keys_dir)
        .args(
            g.inhibit_cmd
                .iter()
                .flat_map(|c| ["--inhibit-cmd", c.as_str()]),
        )
        .args(g.health_cmd.iter().map(|c| format!("--health-cmd={c}")))
        .arg(format!("--health-deadline={}", g.health_deadline.raw))
        .arg(format!("--health-timeout={}", g.health_timeout.raw))
        .arg(format!("--health-interval={}", g.health_interval.raw))
        .arg(format!("--migrate-timeout={}", g.migrate_timeout.raw))
        // The child logs at serve's own level (warnings such as a missing ota-gui reach the
        // journal); `--json` keeps a terminal's progress bar out of serve's stderr.
        .arg("--json")
        .args(g.quiet.then_some("-q"))
        .args((0..g.verbose.min(3)).map(|_| "-v"))
        .args(args)
        .env(LOCK_FD_ENV, fd.to_string())
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::null())
        .kill_on_drop(false);
    // SAFETY: the closure only calls fcntl (see crate::lock::keep_across_exec).
    unsafe {
        cmd.pre_exec(move || crate::lock::keep_across_exec(fd));
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Err(envelope(
                500,
                format!("INTERNAL: starting {}: {e}", ctx.exe.display()),
                Value::Null,
            ))
        }
    };
    // The child holds the lock now; our copy of the description goes.
    drop(file);
    if let (Some(body), Some(mut pipe)) = (stdin, child.stdin.take()) {
        tokio::spawn(async move {
            let _ = pipe.write_all(&body).await;
        });
    }
    let what = args.join(" ");
    log::info!("started `tope-ota {what}` (pid {:?})", child.id());
    CHILDREN.fetch_add(1, Ordering::SeqCst);
    let running = Arc::new(AtomicBool::new(true));
    let flag = running.clone();
    tokio::spawn(async move {
        match child.wait().await {
            Ok(st) if st.success() => log::info!("`tope-ota {what}` finished"),
            Ok(st) => log::warn!("`tope-ota {what}` ended with {st}"),
            Err(e) => log::error!("waiting for `tope-ota {what}`: {e}"),
        }
        flag.store(false, Ordering::SeqCst);
        CHILDREN.fetch_sub(1, Ordering::SeqCst);
    });
    Ok(running)
}

/// POSTs that may wait for the lock at the same time.
const MAX_LOCK_WAITERS: usize = 2;
static LOCK_WAITERS: AtomicUsize = AtomicUsize::new(0);

/// One POST waiting for the lock, counted while it lives; `ahead` were waiting before it.
struct LockWaiter {
    ahead: usize,
}

impl LockWaiter {
    fn new() -> LockWaiter {
        LockWaiter {
            ahead: LOCK_WAITERS.fetch_add(1, Ordering::SeqCst),
        }
    }
}

impl Drop for LockWaiter {
    fn drop(&mut self) {
        LOCK_WAITERS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Most time a POST waits for its child's first state write (see [`taken_over`]).
const TAKE_OVER: Duration = Duration::from_secs(2);

/// Wait until the child started has written state.json (or ended), at most [`TAKE_OVER`]: a
/// client that polls /progress right after the 200 sees the new operation (`downloading`,
/// `installing`), not the end of the last one (a `failed` it would take for this one's).
async fn taken_over(ctx: &Ctx, before: Option<StateKey>, running: &AtomicBool) {
    let until = tokio::time::Instant::now() + TAKE_OVER;
    while state_key(ctx) == before
        && running.load(Ordering::SeqCst)
        && tokio::time::Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Children running, for the orderly shutdown.
static CHILDREN: AtomicUsize = AtomicUsize::new(0);

async fn post_download(
    ctx: &Ctx,
    conn: &ConnSlot,
    req: Request<Incoming>,
) -> Result<Resp, std::io::Error> {
    let body = match receive_body(req).await? {
        Ok(b) => b,
        Err(r) => return Ok(r),
    };
    let _busy = conn.busy();
    Ok(start_download(ctx, body).await)
}

/// The fields of a POST /download body.
const DOWNLOAD_FIELDS: &[&str] = &[
    "version",
    "package_url",
    "package_name",
    "package_size",
    "package_md5",
    "package_sha256",
    "package_sig_url",
];
/// The fields of a POST /update body.
const UPDATE_FIELDS: &[&str] = &["version", "allow_downgrade", "reinstall"];

/// The body as a JSON object without the fields the route does not know. The old service's
/// models ignored unknown fields, so a device-api that sends more (`device_id`, `force`) keeps
/// working; each is named in a warning, so a misspelled optional field is visible in the log.
/// (The CLI's `--request` stays strict.) `Err` is the `INVALID_REQUEST` detail.
fn known_fields(route: &str, body: &[u8], known: &[&str]) -> Result<Map<String, Value>, String> {
    let obj = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => o,
        Ok(other) => {
            return Err(format!(
                "request body: expected a JSON object, got {}",
                json_kind(&other)
            ))
        }
        Err(e) => return Err(format!("request body: {e}")),
    };
    let (kept, unknown): (Map<String, Value>, Map<String, Value>) = obj
        .into_iter()
        .partition(|(k, _)| known.contains(&k.as_str()));
    if !unknown.is_empty() {
        const SHOWN: usize = 8;
        let mut names: Vec<String> = unknown
            .keys()
            .take(SHOWN)
            .map(|k| format!("{:?}", k.chars().take(64).collect::<String>()))
            .collect();
        if unknown.len() > SHOWN {
            names.push(format!("and {} more", unknown.len() - SHOWN));
        }
        let shown = names.join(", ");
        match first_time_unknown(route, &shown) {
            WarnOnce::New => log::warn!(
                "POST {route}: unknown field(s) {shown} ignored (known: {})",
                known.join(", ")
            ),
            WarnOnce::Full => log::warn!(
                "POST {route}: unknown field(s) {shown} ignored; {UNKNOWN_SETS} different sets \
                 of unknown fields were logged, further ones are not"
            ),
            WarnOnce::Seen => {}
        }
    }
    Ok(kept)
}

/// How many distinct sets of unknown field names serve warns about: each once, so a client that
/// sends the same extra field with every request does not flood the journal (whose rate limit
/// would then drop the unit's real records).
const UNKNOWN_SETS: usize = 32;

#[derive(Debug, PartialEq, Eq)]
enum WarnOnce {
    New,
    /// The one warning that the table is full.
    Full,
    Seen,
}

fn first_time_unknown(route: &str, names: &str) -> WarnOnce {
    static SEEN: Mutex<Option<(HashSet<String>, bool)>> = Mutex::new(None);
    let mut guard = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    let (seen, full_told) = guard.get_or_insert_with(|| (HashSet::new(), false));
    let key = format!("{route} {names}");
    if seen.contains(&key) {
        return WarnOnce::Seen;
    }
    if seen.len() < UNKNOWN_SETS {
        seen.insert(key);
        return WarnOnce::New;
    }
    if *full_told {
        WarnOnce::Seen
    } else {
        *full_told = true;
        WarnOnce::Full
    }
}

/// `package_size` as the old model took it: an integer, a decimal string (`"104857600"`) or a
/// number with no fraction (`104857600.0`). Anything else (a fraction, a sign, spaces, an
/// exponent in a string, a boolean, over 2^53 as a float) is refused.
// The float is checked whole and within 2^53 before it is cast.
#[allow(clippy::cast_possible_truncation)]
fn lax_size(v: &Value) -> Result<u64, String> {
    /// Floats are exact up to 2^53: above it `1e17` and `1e17 + 1` are the same number.
    const MAX_EXACT: f64 = 9_007_199_254_740_992.0;
    match v {
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                return Ok(u);
            }
            match n.as_f64() {
                Some(f) if f.fract() == 0.0 && (0.0..=MAX_EXACT).contains(&f) => Ok(f as u64),
                _ => Err(format!("{n} is not a whole number of bytes")),
            }
        }
        Value::String(s)
            if !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()) =>
        {
            s.parse::<u64>().map_err(|e| format!("{s:?}: {e}"))
        }
        Value::String(s) => Err(format!(
            "{:?} is not a decimal number of bytes",
            s.chars().take(64).collect::<String>()
        )),
        other => Err(format!(
            "expected a number of bytes, got {}",
            json_kind(other)
        )),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

async fn start_download(ctx: &Ctx, body: Bytes) -> Resp {
    let obj = match known_fields("/api/v1.0/download", &body, DOWNLOAD_FIELDS) {
        Ok(o) => o,
        Err(e) => return invalid(e),
    };
    let mut obj = Value::Object(obj);
    if let Some(size) = obj.get_mut("package_size") {
        match lax_size(size) {
            Ok(n) => *size = Value::from(n),
            Err(e) => return invalid(format!("request body: package_size: {e}")),
        }
    }
    let pkg = match Package::deserialize(&obj) {
        Ok(p) => p,
        Err(e) => return invalid(format!("request body: {e}")),
    };
    let pkg = match pkg.validated() {
        Ok(p) => p,
        Err(e) => return coded(&crate::error::classify(&e)),
    };
    if let Some(r) = in_flight(ctx) {
        return r;
    }
    // The old service took the same request again as "resume": the package that is already
    // downloading, verifying or ready is answered 200 and nothing changes.
    if let Some(why) = same_download(ctx, &pkg) {
        log::info!(
            "POST /download of {} again: {why}; nothing to do",
            pkg.version
        );
        return envelope(200, "success", Value::Null);
    }
    // The child's `--request` is strict: it gets the body with only the known fields.
    let body = Bytes::from(obj.to_string());
    let before = state_key(ctx);
    match start_child(ctx, &["download", "--request", "-"], Some(body)).await {
        Ok(running) => {
            *ctx.download.lock().unwrap_or_else(|p| p.into_inner()) = Some((pkg, running.clone()));
            taken_over(ctx, before, &running).await;
            envelope(200, "success", Value::Null)
        }
        Err(r) => {
            // Another writer (the CLI, the heal timer) may be downloading this very package.
            if r.status() == StatusCode::CONFLICT {
                if let Some(why) = same_download(ctx, &pkg) {
                    log::info!(
                        "POST /download of {} again: {why}; nothing to do",
                        pkg.version
                    );
                    return envelope(200, "success", Value::Null);
                }
            }
            r
        }
    }
}

/// Why a download of `pkg` needs nothing done: the package is downloading or verifying now (by
/// a child of ours, or by another writer that holds the lock), or it is downloaded, verified
/// and still fresh. `None` when a download must run (nothing in flight, another package, an
/// interrupted download to resume, a failed one to retry, a package gone from disk).
fn same_download(ctx: &Ctx, pkg: &Package) -> Option<&'static str> {
    let s = match state::read(&ctx.global.state_dir) {
        Ok(ReadOutcome::Ok(s)) => *s,
        _ => state::State::default(),
    };
    let same = super::download::is_same_package(&s, pkg);
    if same && s.stage == Stage::ToInstall {
        let file = ctx
            .global
            .state_dir
            .join(state::DOWNLOADS_DIR)
            .join(&pkg.package_name);
        let fresh = s
            .verified_at
            .as_deref()
            .and_then(clock::parse_rfc3339)
            .is_some_and(|t| clock::now_unix() - t <= PACKAGE_TTL_SECS);
        let whole =
            std::fs::metadata(&file).is_ok_and(|m| m.is_file() && m.len() == pkg.package_size);
        if fresh && whole {
            return Some("it is downloaded and verified");
        }
    }
    // Our child for this package, still running: its state may not show it yet (it has just
    // started) or show it ready; a failure it recorded is retried by a new child instead.
    let ours = ctx
        .download
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .is_some_and(|(p, running)| p == pkg && running.load(Ordering::SeqCst));
    let settled_otherwise = same && matches!(s.stage, Stage::Failed | Stage::Idle | Stage::Success);
    if ours && !settled_otherwise {
        return Some("it is being downloaded");
    }
    // Another writer's download: only while it holds the lock for it (a heal resuming it
    // says so too); a brief holder over an interrupted download's `downloading` downloads
    // nothing, and the request goes to a child that resumes it.
    if same
        && matches!(s.stage, Stage::Downloading | Stage::Verifying)
        && crate::lock::holder(&ctx.global.state_dir)
            .is_some_and(|h| h.long && h.activity == super::download::activity(&pkg.version))
        && crate::lock::held(&ctx.global.state_dir)
    {
        return Some("it is being downloaded");
    }
    None
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateRequest {
    version: String,
    /// Optional: install even if lower than the current version; honoured only with
    /// `serve --api-allow-downgrade`.
    #[serde(default)]
    allow_downgrade: bool,
    /// Optional: install the version current runs again (`install --reinstall`).
    #[serde(default)]
    reinstall: bool,
}

async fn post_update(
    ctx: &Ctx,
    conn: &ConnSlot,
    req: Request<Incoming>,
) -> Result<Resp, std::io::Error> {
    let body = match receive_body(req).await? {
        Ok(b) => b,
        Err(r) => return Ok(r),
    };
    let _busy = conn.busy();
    Ok(start_update(ctx, body).await)
}

async fn start_update(ctx: &Ctx, body: Bytes) -> Resp {
    let obj = match known_fields("/api/v1.0/update", &body, UPDATE_FIELDS) {
        Ok(o) => o,
        Err(e) => return invalid(e),
    };
    let mut upd = match UpdateRequest::deserialize(&Value::Object(obj)) {
        Ok(u) => u,
        Err(e) => return invalid(format!("request body: {e}")),
    };
    if let Err(e) = validate::version(&upd.version) {
        return coded(&crate::error::classify(&e));
    }
    if upd.allow_downgrade && !ctx.api_allow_downgrade {
        log::warn!(
            "POST /update for {} asks for allow_downgrade, which this device does not allow \
             over the API (serve --api-allow-downgrade): ignored",
            upd.version
        );
        upd.allow_downgrade = false;
    }
    if let Some(r) = in_flight(ctx) {
        return r;
    }
    // The preconditions answer synchronously, as the old API did; the child checks them again
    // under the lock.
    let s = match state::read(&ctx.global.state_dir) {
        Ok(ReadOutcome::Ok(s)) => *s,
        _ => state::State::default(),
    };
    if s.stage != Stage::ToInstall {
        return coded(&OtaError::new(
            ErrorCode::NoPackage,
            format!("no verified package to install (stage is {})", s.stage),
        ));
    }
    if s.version.as_deref() != Some(upd.version.as_str()) {
        return coded(&OtaError::new(
            ErrorCode::VersionMismatch,
            format!(
                "the downloaded package is version {}, not {}",
                s.version.as_deref().unwrap_or("?"),
                upd.version
            ),
        ));
    }
    let expired = s
        .verified_at
        .as_deref()
        .and_then(clock::parse_rfc3339)
        .is_none_or(|t| clock::now_unix() - t > PACKAGE_TTL_SECS);
    // The same falsey words clap accepts for the flag's variable.
    let env_allows = std::env::var("TOPE_OTA_ALLOW_DOWNGRADE").is_ok_and(|v| {
        !matches!(
            v.to_ascii_lowercase().as_str(),
            "" | "0" | "false" | "no" | "off" | "n" | "f"
        )
    });
    if !upd.allow_downgrade && !env_allows {
        let links = crate::snapshot::Links::read(&ctx.global.versions_dir);
        if let Some(cur) = links.current_version() {
            if validate::compare_versions(&upd.version, cur) == std::cmp::Ordering::Less {
                return coded(&OtaError::new(
                    ErrorCode::DowngradeRefused,
                    format!("{} is lower than the current {cur}", upd.version),
                ));
            }
        }
    }
    // As the CLI: an expired package is refused and the version current already runs is
    // success with nothing to do, before the print-job check (nothing to install, nothing to
    // inhibit); the child answers both.
    let noop = !upd.reinstall
        && crate::snapshot::Links::read(&ctx.global.versions_dir).current_version()
            == Some(upd.version.as_str());
    // The inhibit command may take seconds: off the one runtime thread.
    let g = ctx.global.clone();
    let inhibited = if expired || noop {
        None
    } else {
        tokio::task::spawn_blocking(move || crate::inhibit::active(&g))
            .await
            .unwrap_or_else(|_| Some("the inhibit check failed".into()))
    };
    if let Some(why) = inhibited {
        return coded(&OtaError::new(
            ErrorCode::Inhibited,
            format!("a print job is running: {why}"),
        ));
    }
    let mut args = vec!["install", "--version", upd.version.as_str()];
    if upd.allow_downgrade {
        args.push("--allow-downgrade");
    }
    if upd.reinstall {
        args.push("--reinstall");
    }
    let before = state_key(ctx);
    let started = start_child(ctx, &args, None).await;
    if let Ok(running) = &started {
        taken_over(ctx, before, running).await;
    }
    match (started, expired) {
        // The child records the expiry and deletes the package.
        (Ok(_), true) => coded(&OtaError::new(
            ErrorCode::PackageExpired,
            "the package was verified more than 24 h ago; it is deleted",
        )),
        (Ok(_), false) => envelope(200, "success", Value::Null),
        (Err(r), _) => r,
    }
}

/// 409 BUSY while state.json shows an install in flight (running, or interrupted and waiting
/// for heal), as the CLI answers. An interrupted download is not: the same request resumes it.
/// A state.json of a newer schema answers `SCHEMA_TOO_NEW` here, before any child is started.
fn in_flight(ctx: &Ctx) -> Option<Resp> {
    let s = match state::read(&ctx.global.state_dir) {
        Ok(ReadOutcome::Ok(s)) => *s,
        Err(e) if error::has_code(&e, ErrorCode::SchemaTooNew) => {
            return Some(coded(&error::classify(&e)))
        }
        _ => return None,
    };
    matches!(s.stage, Stage::Installing | Stage::Rebooting).then(|| {
        coded(&OtaError::new(
            ErrorCode::Busy,
            format!(
                "an install is in flight (stage {}); heal finishes it",
                s.stage
            ),
        ))
    })
}

fn method_not_allowed(allow: &'static str) -> Resp {
    let mut r = envelope(405, format!("METHOD_NOT_ALLOWED: use {allow}"), Value::Null);
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    r
}

/// `application/json`, in any case, with any parameters (`; charset=utf-8`).
pub fn is_json_media_type(value: &[u8]) -> bool {
    let Ok(v) = std::str::from_utf8(value) else {
        return false;
    };
    let essence = v.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
}

/// The browser rules, before any route: a non-loopback Host (DNS rebinding) and any Origin
/// (only a web page sends one; device-api never does) are 403, a POST whose Content-Type is
/// present and not JSON is 415 (an HTML form or a "simple" cross-site request).
fn refuse_browsers(ctx: &Ctx, req: &Request<Incoming>) -> Option<Resp> {
    // A request without a Host, or with an empty one (HTTP/1.0: the old service answered it),
    // cannot come from a browser, which always names the host it connected to; two Hosts are
    // refused.
    let mut hosts = req.headers().get_all(HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Some(envelope(
            403,
            "FORBIDDEN: more than one Host header",
            Value::Null,
        ));
    }
    if let Some(h) = first.filter(|h| !h.as_bytes().trim_ascii().is_empty()) {
        let host = String::from_utf8_lossy(h.as_bytes());
        if !is_loopback_host(&host, &ctx.loopback_names) {
            return Some(envelope(
                403,
                format!("FORBIDDEN: Host {host:?} is not a loopback name"),
                Value::Null,
            ));
        }
    }
    // An absolute-form target (`GET http://evil.example/…`) names a host too.
    if let Some(auth) = req.uri().authority() {
        if !is_loopback_host(auth.as_str(), &ctx.loopback_names) {
            return Some(envelope(
                403,
                format!(
                    "FORBIDDEN: the request target's host {:?} is not a loopback name",
                    auth.as_str()
                ),
                Value::Null,
            ));
        }
    }
    if let Some(origin) = req.headers().get(ORIGIN) {
        let origin = String::from_utf8_lossy(origin.as_bytes());
        return Some(envelope(
            403,
            format!(
                "FORBIDDEN: a request with an Origin header (Origin {origin:?}) comes from a web page; this API serves device-api only"
            ),
            Value::Null,
        ));
    }
    if req.method() == Method::POST {
        if let Some(ct) = req.headers().get(CONTENT_TYPE) {
            if !is_json_media_type(ct.as_bytes()) {
                let ct = String::from_utf8_lossy(ct.as_bytes());
                return Some(envelope(
                    415,
                    format!(
                        "UNSUPPORTED_MEDIA_TYPE: Content-Type {ct:?}; the body must be application/json"
                    ),
                    Value::Null,
                ));
            }
        }
    }
    None
}

async fn route(conn: Arc<ConnSlot>, req: Request<Incoming>) -> Result<Resp, std::io::Error> {
    let ctx = conn.ctx.clone();
    let _request = conn.request(req.method() != Method::POST);
    if let Some(r) = refuse_browsers(&ctx, &req) {
        return Ok(r);
    }
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let resp = match path.as_str() {
        "/api/v1.0/progress" => match method {
            Method::GET => progress(&ctx),
            _ => method_not_allowed("GET"),
        },
        "/api/v1.0/download" | "/api/v1.0/update" if method != Method::POST => {
            method_not_allowed("POST")
        }
        "/api/v1.0/download" => post_download(&ctx, &conn, req).await?,
        "/api/v1.0/update" => post_update(&ctx, &conn, req).await?,
        _ => envelope(404, format!("NOT_FOUND: no route {path}"), Value::Null),
    };
    Ok(resp)
}

pub fn run(g: &Global, args: &ServeArgs) -> Result<Output> {
    let addr: SocketAddr = args.listen.parse().map_err(|e| {
        OtaError::new(
            ErrorCode::InvalidRequest,
            format!("--listen {:?}: {e}", args.listen),
        )
    })?;
    let notify_socket = std::env::var_os(NOTIFY_SOCKET_ENV);
    // SAFETY: at start, before the runtime and the callback threads exist; nothing else reads it.
    unsafe { std::env::remove_var(NOTIFY_SOCKET_ENV) };
    let handed = inherited_listener(addr);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let ctx = Arc::new(Ctx {
        global: g.clone(),
        // The entry point (the `.deb` binary), as for every other start: it chooses the
        // updater, counts its run, and never is a kept copy that a newer proof removes.
        exe: crate::dispatch::running().entry(),
        api_allow_downgrade: args.api_allow_downgrade,
        conns: Conns::default(),
        loopback_names: read_loopback_names(),
        download: Mutex::new(None),
        progress_cache: Mutex::new(None),
        lock_wait: crate::operation::lock_wait(g),
        notify_socket,
    });
    deliver_pending_callback(g);
    rt.block_on(serve(ctx, addr, handed))?;
    Ok(Output::success(String::new(), Value::Null))
}

/// A stage device-api did not receive (its process ended first) is sent when serve starts.
/// The state lock is held only until the sender holds the callback lock (which orders it
/// before any later writer's callbacks), before serve answers its first request; the round
/// trips to device-api run in the background without it. A writer that holds the lock now
/// sends the stage itself.
fn deliver_pending_callback(g: &Global) {
    if g.report_url.is_empty() {
        return;
    }
    let purpose = Purpose::brief("serve", "sending a missed callback");
    let Ok(lock) = StateLock::acquire(&g.state_dir, &purpose, Duration::ZERO) else {
        return;
    };
    let Ok(ReadOutcome::Ok(s)) = state::read(&g.state_dir) else {
        return;
    };
    let mut reporter = crate::report::Reporter::new(&g.report_url, &g.state_dir, &s);
    reporter.hand_over(Duration::from_millis(500));
    drop(lock);
    let _ = std::thread::Builder::new()
        .name("pending-callback".into())
        .spawn(move || reporter.finish());
}

/// The HTTP/1 settings of every connection (and of the fuzzer's exchange).
fn http1_builder() -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_DEADLINE)
        .max_buf_size(MAX_HEAD)
        .keep_alive(true);
    builder
}

/// The listening socket a restart of ours handed over (`TOPE_OTA_LISTEN_FD`), when it is one
/// bound to `addr`: connections that arrived during the exec wait in its queue.
fn inherited_listener(addr: SocketAddr) -> Option<std::net::TcpListener> {
    use std::os::fd::FromRawFd;
    let fd: i32 = std::env::var(LISTEN_FD_ENV).ok()?.parse().ok()?;
    // SAFETY: read by `run` at start, before the runtime and the callback threads exist;
    // nothing else reads it.
    unsafe { std::env::remove_var(LISTEN_FD_ENV) };
    // SAFETY: F_GETFD only asks whether the fd number is open.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // Close-on-exec again: no child of ours (hooks, the GUI) may hold or accept on it.
    // SAFETY: fcntl on an open fd.
    unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    // SAFETY: the fd is open, handed to us alone, and owned from here on.
    let l = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    let local = l.local_addr().ok()?;
    if local.ip() != addr.ip() || (addr.port() != 0 && local.port() != addr.port()) {
        log::warn!("the listening socket handed over is on {local}, not {addr}: not used");
        return None;
    }
    l.set_nonblocking(true).ok()?;
    Some(l)
}

/// Set by a restart to hand the listening socket to the updater that serves next.
const LISTEN_FD_ENV: &str = "TOPE_OTA_LISTEN_FD";
/// systemd's notification socket (`Type=notify`).
const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";
/// How often serve asks whether the updater to run has changed.
const RESTART_CHECK: Duration = Duration::from_secs(2);
/// How long a restart waits for the requests being answered.
const RESTART_DRAIN: Duration = Duration::from_secs(5);

/// `handed`: the socket a restart of ours handed over, taken by [`run`] before any thread.
async fn serve(
    ctx: Arc<Ctx>,
    addr: SocketAddr,
    handed: Option<std::net::TcpListener>,
) -> Result<()> {
    let restarted = handed.is_some();
    let listener = match handed {
        Some(l) => tokio::net::TcpListener::from_std(l).context("take the handed-over socket")?,
        None => tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listen on {addr}"))?,
    };
    if !addr.ip().is_loopback() {
        log::warn!("listening on {addr}, which is not loopback");
    }
    log::info!("serving the tope-ota API on {}", listener.local_addr()?);
    // Tests and scripts learn the port when they ask for port 0; after a restart they know it
    // (and may no longer read our stdout).
    if let (Ok(a), false) = (listener.local_addr(), restarted) {
        println!("listening on {a}");
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    // A restart execs us with SIGTERM and SIGINT blocked (so one sent meanwhile waits instead
    // of being lost): now that they are handled, let them in.
    signal_mask(libc::SIG_UNBLOCK);
    notify_ready(ctx.notify_socket.as_deref());
    let builder = Arc::new(http1_builder());

    // The updater a fresh start would run: when it changes (a new one proven, this one found
    // bad), we restart into it once idle.
    let mut planned =
        crate::dispatch::planned_now(&ctx.global.keys_dir, ctx.notify_socket.is_some());
    let mut check = tokio::time::interval(RESTART_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'serve: loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = check.tick() => {
                let now = crate::dispatch::planned_now(&ctx.global.keys_dir, ctx.notify_socket.is_some());
                if now != planned && CHILDREN.load(Ordering::SeqCst) == 0 {
                    match restart(&ctx, &listener, &mut term, &mut int).await {
                        Ok(Restart::Stopped) => break,
                        Ok(Restart::Abandoned) => {}
                        Err(e) => log::error!("restarting into the new updater failed, serving on: {e:#}"),
                    }
                    planned = now;
                }
                continue;
            }
        };
        let (stream, _) = match accepted {
            Ok(s) => s,
            Err(e) => {
                log::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // At the cap: make room by shedding the oldest incomplete connection; when every
        // connection is busy with a whole request, wait for one to be answered.
        while ctx.conns.len() >= MAX_CONNECTIONS && !ctx.conns.shed_oldest_incomplete() {
            tokio::select! {
                _ = ctx.conns.freed.notified() => {}
                _ = term.recv() => break 'serve,
                _ = int.recv() => break 'serve,
            }
        }
        let _ = stream.set_nodelay(true);
        let slot = Arc::new(ConnSlot {
            ctx: ctx.clone(),
            id: ctx.conns.register(),
        });
        let id = slot.id;
        let builder = builder.clone();
        let task = tokio::spawn(async move {
            let s = slot.clone();
            let svc = hyper::service::service_fn(move |req| route(s.clone(), req));
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                log::debug!("connection ended: {e}");
            }
            drop(slot);
        });
        ctx.conns.set_abort(id, task.abort_handle());
    }
    drop(listener);
    let running = CHILDREN.load(Ordering::SeqCst);
    log::info!("stopping: no new connections; waiting for {running} running operation(s)");
    while CHILDREN.load(Ordering::SeqCst) > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Tell systemd (the unit is `Type=notify`) that a connection would now be accepted, so
/// `systemctl start`/`restart` of serve, and units ordered after it, wait for the socket and
/// not only for the fork: device-api's first request after a restart is never refused. Sent
/// again after a restart of ours (same pid), which systemd takes as a no-op.
fn notify_ready(socket: Option<&std::ffi::OsStr>) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = socket else {
        return;
    };
    let bytes = path.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(path),
    };
    let sent = UnixDatagram::unbound()
        .and_then(|sock| sock.send_to_addr(b"READY=1\nSTATUS=serving the tope-ota API", &addr?));
    if let Err(e) = sent {
        log::warn!(
            "tell systemd that serve is ready ({}): {e}",
            path.to_string_lossy()
        );
    }
}

/// Block or unblock SIGTERM and SIGINT for this thread (and what it execs).
fn signal_mask(how: libc::c_int) {
    // SAFETY: plain signal-set calls on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// What became of a restart that did not exec.
enum Restart {
    /// A stop was asked for meanwhile: stop instead.
    Stopped,
    /// An operation started meanwhile: serve on, and try at the next change.
    Abandoned,
}

/// Exec the entry (the `.deb` binary, which runs the newest proven updater) with our arguments
/// and the listening socket, once no operation runs and the requests being answered are (for
/// at most [`RESTART_DRAIN`]); connections that arrive meanwhile wait in the socket's queue. A
/// SIGTERM or SIGINT that comes first stops serve instead; one that comes during the exec
/// waits, blocked, for the new serve. Returns only when it did not exec.
async fn restart(
    ctx: &Ctx,
    listener: &tokio::net::TcpListener,
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) -> Result<Restart> {
    use std::os::fd::AsRawFd;
    let until = tokio::time::Instant::now() + RESTART_DRAIN;
    while ctx.conns.any_busy() && tokio::time::Instant::now() < until {
        tokio::select! {
            _ = term.recv() => return Ok(Restart::Stopped),
            _ = int.recv() => return Ok(Restart::Stopped),
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
    if CHILDREN.load(Ordering::SeqCst) > 0 {
        return Ok(Restart::Abandoned);
    }
    signal_mask(libc::SIG_BLOCK);
    // A signal another thread took before the block is in the streams: look once more.
    // signals::install's flag is set by the handler itself, before tokio's driver has run.
    let pending = futures_now(term.recv())
        || futures_now(int.recv())
        || crate::signals::stop_requested().is_some();
    if pending {
        signal_mask(libc::SIG_UNBLOCK);
        return Ok(Restart::Stopped);
    }
    let fd = listener.as_raw_fd();
    // SAFETY: fcntl on our own open socket.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
        signal_mask(libc::SIG_UNBLOCK);
        return Err(std::io::Error::last_os_error()).context("keep the socket across exec");
    }
    log::info!(
        "the updater to run changed: restarting serve with {}",
        crate::dispatch::running().entry().display()
    );
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let mut env = vec![(LISTEN_FD_ENV, fd.to_string().into())];
    if let Some(n) = &ctx.notify_socket {
        env.push((NOTIFY_SOCKET_ENV, n.clone()));
    }
    let err = crate::dispatch::reexec(&args, &env).unwrap_err();
    // SAFETY: as above.
    unsafe { libc::fcntl(fd, libc::F_SETFD, flags) };
    signal_mask(libc::SIG_UNBLOCK);
    Err(err)
}

/// Whether a future is ready at once (a signal already received).
fn futures_now<F: std::future::Future>(f: F) -> bool {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut f = std::pin::pin!(f);
    f.as_mut().poll(&mut cx).is_ready()
}

/// One connection of the service over an in-memory pipe, for the fuzzer and its corpus test:
/// `raw` is everything a client sends (any number of requests, maybe cut short), then the client
/// closes its side; the result is the first MiB the service wrote back (the rest is read and
/// dropped) and how many operations POSTs asked to start. Such a start runs `exe` (for the
/// fuzzer, a path that does not exist). Panics when the connection is not over within 20 s: the
/// service must never hang on input.
#[doc(hidden)]
pub fn exchange_in_memory(g: &Global, exe: &std::path::Path, raw: &[u8]) -> (Vec<u8>, usize) {
    use tokio::io::AsyncReadExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let ctx = Arc::new(Ctx {
        global: g.clone(),
        exe: exe.to_path_buf(),
        api_allow_downgrade: false,
        conns: Conns::default(),
        loopback_names: loopback_names("127.0.0.1 localhost\n::1 localhost ip6-localhost\n"),
        download: Mutex::new(None),
        progress_cache: Mutex::new(None),
        lock_wait: crate::operation::lock_wait(g),
        notify_socket: None,
    });
    rt.block_on(async move {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let slot = Arc::new(ConnSlot {
            ctx: ctx.clone(),
            id: ctx.conns.register(),
        });
        let mut builder = http1_builder();
        // Here only: the client closes its side once all is sent, and what came before that
        // is answered (a socket client that waits for its answers is served the same way).
        builder.half_close(true);
        let served = tokio::spawn(async move {
            let s = slot.clone();
            let svc = hyper::service::service_fn(move |req| route(s.clone(), req));
            let _ = builder.serve_connection(TokioIo::new(server), svc).await;
        });
        let (mut rd, mut wr) = tokio::io::split(client);
        let send = async move {
            let _ = wr.write_all(raw).await;
            let _ = wr.shutdown().await;
        };
        let mut out = Vec::new();
        let receive = async {
            let _ = (&mut rd).take(1 << 20).read_to_end(&mut out).await;
            // Read the rest too: a server blocked on a full pipe is not a hang of its own.
            let _ = tokio::io::copy(&mut rd, &mut tokio::io::sink()).await;
        };
        let starts = START_ATTEMPTS.load(Ordering::SeqCst);
        let whole = async {
            tokio::join!(send, receive);
            let _ = served.await;
        };
        if tokio::time::timeout(Duration::from_secs(20), whole)
            .await
            .is_err()
        {
            panic!("the connection was not over within 20 s");
        }
        (out, START_ATTEMPTS.load(Ordering::SeqCst) - starts)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        let names = loopback_names(
            "127.0.0.1 localhost localhost.localdomain # comment evil.com\n\
             127.0.1.1\tprinter-7.\n\
             ::1 localhost ip6-localhost ip6-loopback\n\
             ff02::1 ip6-allnodes\n\
             # 127.0.0.1 commented.example\n\
             127.0.0.1 both.example\n\
             192.168.1.5 both.example lan.example\n\
             0.0.0.0 blocked.example\n\
             garbage line\n",
        );
        let mut sorted: Vec<&str> = names.iter().map(String::as_str).collect();
        sorted.sort();
        assert_eq!(
            sorted,
            [
                "ip6-localhost",
                "ip6-loopback",
                "localhost",
                "localhost.localdomain",
                "printer-7"
            ]
        );
        for ok in [
            "localhost",
            "localhost:12315",
            "127.0.0.1",
            "127.0.0.1:80",
            "127.1.2.3:9",
            "[::1]",
            "[::1]:12315",
            "LOCALHOST.",
            "localhost.localdomain",
            "ip6-localhost:12315",
            "Printer-7",
        ] {
            assert!(is_loopback_host(ok, &names), "{ok}");
        }
        for bad in [
            "",
            "evil.com",
            "evil.com:12315",
            "192.168.1.5",
            "[::2]:1",
            "localhost.evil.com",
            "127.0.0.1.nip.io",
            "0.0.0.0",
            "localhost:abc",
            "both.example",
            "lan.example",
            "blocked.example",
            "ip6-allnodes",
            "commented.example",
            "evil.com",
        ] {
            assert!(!is_loopback_host(bad, &names), "{bad}");
        }
    }

    #[test]
    fn unknown_fields_are_warned_once_per_set_and_bounded() {
        assert_eq!(first_time_unknown("/t", "\"a\""), WarnOnce::New);
        assert_eq!(first_time_unknown("/t", "\"a\""), WarnOnce::Seen);
        assert_eq!(first_time_unknown("/u", "\"a\""), WarnOnce::New);
        let mut full = 0;
        for i in 0..UNKNOWN_SETS * 2 {
            if first_time_unknown("/t", &format!("\"f{i}\"")) == WarnOnce::Full {
                full += 1;
            }
        }
        assert_eq!(full, 1, "the table is bounded and says so once");
        assert_eq!(first_time_unknown("/t", "\"a\""), WarnOnce::Seen);
    }

    #[test]
    fn json_media_types() {
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "APPLICATION/JSON;charset=UTF-8",
            " application/json ",
        ] {
            assert!(is_json_media_type(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            "text/plain",
            "application/jsonp",
            "application/json-patch+json",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "text/plain; application/json",
        ] {
            assert!(!is_json_media_type(bad.as_bytes()), "{bad}");
        }
        assert!(!is_json_media_type(b"application/json\xff"));
    }
}
