//! Streaming an HTTP(S) package into a partial file while hashing it, with Range resume, retries
//! and stall timeouts. Knows nothing of state.json: it reports through a [`Sink`].

use crate::error::{is_disk_full, ErrorCode, OtaError};
use crate::fsutil;
use anyhow::{Context, Result};
use md5::{Digest, Md5};
use sha2::Sha256;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BUF_SIZE: usize = 256 * 1024;

/// Network and retry settings. Defaults suit a device on a slow, flaky link; tests shorten them
/// through the `TOPE_OTA_*` tuning variables (see README).
#[derive(Debug, Clone)]
pub struct Tuning {
    pub connect_timeout: Duration,
    /// A read that receives nothing for this long fails the attempt (a stalled connection).
    pub stall_timeout: Duration,
    /// Attempts after the first that made no progress; an attempt that made progress resets it.
    pub retries: u32,
    pub backoff: Duration,
    pub backoff_max: Duration,
}

fn env_ms(name: &str) -> Option<Duration> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis)
}

impl Tuning {
    pub fn from_env() -> Tuning {
        let d = Tuning::default();
        Tuning {
            connect_timeout: env_ms("TOPE_OTA_CONNECT_TIMEOUT_MS").unwrap_or(d.connect_timeout),
            stall_timeout: env_ms("TOPE_OTA_STALL_TIMEOUT_MS").unwrap_or(d.stall_timeout),
            retries: std::env::var("TOPE_OTA_RETRIES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d.retries),
            backoff: env_ms("TOPE_OTA_RETRY_DELAY_MS").unwrap_or(d.backoff),
            backoff_max: d.backoff_max,
        }
    }
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            connect_timeout: Duration::from_secs(15),
            stall_timeout: Duration::from_secs(30),
            retries: 6,
            backoff: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
        }
    }
}

/// Where the fetch reports to.
pub trait Sink {
    /// `durable` bytes of the partial are fsynced; `validator` is what to send as `If-Range`.
    /// Called at least at every 5 % and when the fetch ends or stops.
    fn checkpoint(&mut self, durable: u64, validator: Option<&str>) -> Result<()>;
    /// Called for every chunk received (progress bar).
    fn tick(&mut self, received: u64);
    /// `fetched` more bytes came from the server, `reused` more were regenerated from
    /// `current`; recorded with the next checkpoint.
    fn account(&mut self, _fetched: u64, _reused: u64) {}
    /// True when the command was asked to stop (SIGTERM/SIGINT).
    fn stop_requested(&self) -> bool;
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// All `size` bytes are in the partial, fsynced; their digests.
    Complete(Digests),
    /// Stopped on request with this many durable bytes.
    Stopped { durable: u64 },
}

/// What to fetch and where to resume from.
pub struct Request<'a> {
    pub url: &'a str,
    pub size: u64,
    /// Durable bytes already in the partial (from state.json).
    pub offset: u64,
    pub validator: Option<String>,
    /// Also compute the SHA-256.
    pub sha256: bool,
}

enum AttemptError {
    /// Worth another attempt (network error, stall, 5xx, dropped connection).
    Transient(String),
    /// Not worth retrying: a coded error or a local failure.
    Fatal(anyhow::Error),
    /// The partial was dropped (416, or a range we did not ask for): fetch again from zero at
    /// once. Cannot loop: with no partial no Range is sent.
    Restart,
    /// The server sent a shorter range than asked for (RFC 9110 allows it): ask for the rest.
    More,
}

impl From<anyhow::Error> for AttemptError {
    fn from(e: anyhow::Error) -> Self {
        AttemptError::Fatal(e)
    }
}

fn coded(code: ErrorCode, detail: impl Into<String>) -> AttemptError {
    AttemptError::Fatal(OtaError::new(code, detail).into())
}

/// The digests computed while streaming: MD5 always, SHA-256 when the request names one.
#[derive(Clone, Default)]
pub struct Hashes {
    md5: Md5,
    sha256: Option<Sha256>,
}

impl Hashes {
    pub(crate) fn new(sha256: bool) -> Hashes {
        Hashes {
            md5: Md5::new(),
            sha256: sha256.then(Sha256::new),
        }
    }

    pub(crate) fn update(&mut self, data: &[u8]) {
        self.md5.update(data);
        if let Some(s) = self.sha256.as_mut() {
            s.update(data);
        }
    }

    pub(crate) fn finish(self) -> Digests {
        Digests {
            md5: hex(&self.md5.finalize()),
            sha256: self.sha256.map(|s| hex(&s.finalize())),
        }
    }
}

/// Lowercase hex digests of a whole package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    pub md5: String,
    pub sha256: Option<String>,
}

struct Partial<'a> {
    file: File,
    path: &'a Path,
    hasher: Hashes,
    len: u64,
}

impl Partial<'_> {
    fn reset(&mut self) -> Result<()> {
        self.file
            .set_len(0)
            .with_context(|| format!("truncate {}", self.path.display()))?;
        self.file.seek(SeekFrom::Start(0))?;
        self.hasher = Hashes::new(self.hasher.sha256.is_some());
        self.len = 0;
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        fsutil::sync_data(&self.file).map_err(|e| match write_error(self.path, e) {
            AttemptError::Fatal(e) => e,
            _ => anyhow::anyhow!("fsync {}", self.path.display()),
        })
    }

    /// Drop the partial and record at once that nothing is durable, so state.json never claims
    /// bytes that are gone.
    fn drop_all(&mut self, sink: &mut dyn Sink, validator: Option<&str>) -> Result<()> {
        self.reset()?;
        self.sync()?;
        sink.checkpoint(0, validator)
    }
}

fn write_error(path: &Path, e: io::Error) -> AttemptError {
    if is_disk_full(&e) {
        coded(
            ErrorCode::DiskFull,
            format!("no space left writing {}", path.display()),
        )
    } else {
        AttemptError::Fatal(anyhow::Error::from(e).context(format!("write {}", path.display())))
    }
}

/// Open the partial, keep only its durable prefix, and rebuild the hash from those bytes.
fn open_partial<'a>(path: &'a Path, offset: u64, size: u64, sha256: bool) -> Result<Partial<'a>> {
    let (file, hasher, len) = reopen_partial(path, offset, size, sha256)?;
    Ok(Partial {
        file,
        path,
        hasher,
        len,
    })
}

/// The partial at `path` opened for writing at its durable prefix (at most `offset` bytes; past
/// it may be garbage after a power loss, dropped), with the prefix's hashes and length.
pub(crate) fn reopen_partial(
    path: &Path,
    offset: u64,
    size: u64,
    sha256: bool,
) -> Result<(File, Hashes, u64)> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let on_disk = file.metadata()?.len();
    let keep = offset.min(on_disk).min(size);
    if on_disk != keep {
        file.set_len(keep)
            .with_context(|| format!("truncate {}", path.display()))?;
    }
    let mut hasher = Hashes::new(sha256);
    let mut buf = vec![0u8; BUF_SIZE];
    let mut left = keep;
    file.seek(SeekFrom::Start(0))?;
    while left > 0 {
        let want = left.min(BUF_SIZE as u64) as usize;
        file.read_exact(&mut buf[..want])
            .with_context(|| format!("re-read {}", path.display()))?;
        hasher.update(&buf[..want]);
        left -= want as u64;
    }
    file.seek(SeekFrom::Start(keep))?;
    Ok((file, hasher, keep))
}

/// The HTTP agent of every package request: statuses as answers, the tuning's timeouts.
pub(crate) fn agent(tuning: &Tuning) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(tuning.connect_timeout))
        .timeout_send_request(Some(tuning.stall_timeout))
        .timeout_per_read(Some(tuning.stall_timeout))
        .max_redirects(5)
        .user_agent(concat!("tope-ota/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

/// Fetch `req` into `part`, retrying transient failures with exponential backoff, each retry
/// resuming from the bytes on disk.
pub fn fetch(part: &Path, req: Request, tuning: &Tuning, sink: &mut dyn Sink) -> Result<Outcome> {
    let agent = agent(tuning);
    let mut p = open_partial(part, req.offset, req.size, req.sha256)?;
    let mut validator = req.validator.clone();
    let mut failures = 0u32;
    let mut delay = tuning.backoff;
    loop {
        if sink.stop_requested() {
            p.sync()?;
            sink.checkpoint(p.len, validator.as_deref())?;
            return Ok(Outcome::Stopped { durable: p.len });
        }
        let before = p.len;
        match attempt(&agent, &req, &mut p, &mut validator, sink) {
            Ok(outcome) => return Ok(outcome),
            Err(AttemptError::Fatal(e)) => return Err(e),
            // Only ever after dropping a partial (so the next request has no Range) or after a
            // short range that made progress: neither can repeat without end.
            Err(AttemptError::Restart) | Err(AttemptError::More) => continue,
            Err(AttemptError::Transient(why)) => {
                if p.len > before {
                    failures = 0;
                    delay = tuning.backoff;
                }
                failures += 1;
                if failures > tuning.retries {
                    p.sync()?;
                    sink.checkpoint(p.len, validator.as_deref())?;
                    return Err(OtaError::new(
                        ErrorCode::DownloadFailed,
                        format!("{why} (gave up after {} attempts)", failures),
                    )
                    .into());
                }
                log::warn!(
                    "download attempt failed at {} of {} bytes: {why}; retrying in {} ms",
                    p.len,
                    req.size,
                    delay.as_millis()
                );
                p.sync()?;
                sink.checkpoint(p.len, validator.as_deref())?;
                let until = Instant::now() + delay;
                while Instant::now() < until {
                    if sink.stop_requested() {
                        return Ok(Outcome::Stopped { durable: p.len });
                    }
                    std::thread::sleep(Duration::from_millis(50).min(delay));
                }
                delay = (delay * 2).min(tuning.backoff_max);
            }
        }
    }
}

fn header<'r>(resp: &'r ureq::http::Response<ureq::Body>, name: &str) -> Option<&'r str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

/// `bytes START-END/TOTAL` → (start, end inclusive, total); total is None for `*`.
fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let total = if total.trim() == "*" {
        None
    } else {
        Some(total.trim().parse().ok()?)
    };
    let (start, end) = (start.trim().parse().ok()?, end.trim().parse().ok()?);
    (end >= start).then_some((start, end, total))
}

/// The validator to send as If-Range (RFC 9110 13.1.5): a strong ETag, or Last-Modified when
/// there is no ETag at all. A weak ETag gives none: a date may not stand in for an entity tag.
fn validator_of(resp: &ureq::http::Response<ureq::Body>) -> Option<String> {
    match header(resp, "etag") {
        Some(e) if !e.starts_with("W/") => Some(e.to_string()),
        Some(_) => None,
        None => header(resp, "last-modified").map(str::to_string),
    }
}

fn attempt(
    agent: &ureq::Agent,
    req: &Request,
    p: &mut Partial,
    validator: &mut Option<String>,
    sink: &mut dyn Sink,
) -> std::result::Result<Outcome, AttemptError> {
    if p.len == req.size {
        // The partial is already whole: verify it without asking the server again.
        return finish(p, validator, sink, req.size);
    }
    let mut call = agent.get(req.url);
    if p.len > 0 {
        call = call.header("Range", format!("bytes={}-", p.len));
        if let Some(v) = validator.as_deref() {
            call = call.header("If-Range", v);
        }
    }
    let resp = call
        .call()
        .map_err(|e| AttemptError::Transient(format!("request to {}: {e}", req.url)))?;
    let status = resp.status().as_u16();
    let content_length = header(&resp, "content-length").and_then(|v| v.trim().parse::<u64>().ok());
    // Where this response's body ends: the package's end, or a shorter range's end.
    let mut body_end = req.size;
    match status {
        200 => {
            let fresh = validator_of(&resp);
            if p.len > 0 {
                log::info!(
                    "server ignored the range request; restarting from zero ({} bytes dropped)",
                    p.len
                );
                p.drop_all(sink, fresh.as_deref())?;
            }
            *validator = fresh;
            if let Some(cl) = content_length {
                if cl != req.size {
                    return Err(coded(
                        ErrorCode::PackageSizeMismatch,
                        format!("server announces {cl} bytes, package_size is {}", req.size),
                    ));
                }
            }
        }
        206 => {
            let range = header(&resp, "content-range").and_then(parse_content_range);
            // A server that honours Range but not If-Range would splice two files: a strong
            // ETag that differs from the one we resume means the file changed.
            let changed = match (validator.as_deref(), header(&resp, "etag")) {
                (Some(v), Some(e)) if v.starts_with('"') && !e.starts_with("W/") => v != e,
                _ => false,
            };
            match range {
                Some((start, end, total)) if start == p.len && p.len > 0 && !changed => {
                    if let Some(total) = total {
                        if total != req.size {
                            return Err(coded(
                                ErrorCode::PackageSizeMismatch,
                                format!(
                                    "server announces {total} bytes, package_size is {}",
                                    req.size
                                ),
                            ));
                        }
                    }
                    if end >= req.size {
                        return Err(coded(
                            ErrorCode::PackageSizeMismatch,
                            format!(
                                "server sends bytes up to {end}, package_size is {}",
                                req.size
                            ),
                        ));
                    }
                    body_end = end + 1;
                }
                _ if p.len == 0 => {
                    return Err(AttemptError::Transient(format!(
                        "{} answered 206 to a request without Range",
                        req.url
                    )))
                }
                _ => {
                    log::warn!(
                        "server answered a range we did not ask for, or the file changed; restarting from zero"
                    );
                    *validator = None;
                    p.drop_all(sink, None)?;
                    return Err(AttemptError::Restart);
                }
            }
            if let Some(cl) = content_length {
                if cl != body_end - p.len {
                    return Err(coded(
                        ErrorCode::PackageSizeMismatch,
                        format!(
                            "server announces {cl} bytes for the range {}-{}",
                            p.len,
                            body_end - 1
                        ),
                    ));
                }
            }
        }
        416 if p.len > 0 => {
            log::info!(
                "server refused the range from byte {}; restarting from zero",
                p.len
            );
            *validator = None;
            p.drop_all(sink, None)?;
            return Err(AttemptError::Restart);
        }
        408 | 416 | 429 | 500..=599 => {
            return Err(AttemptError::Transient(format!(
                "{} answered HTTP {status}",
                req.url
            )))
        }
        _ => {
            return Err(coded(
                ErrorCode::DownloadFailed,
                format!("{} answered HTTP {status}", req.url),
            ))
        }
    }
    let framed = content_length.is_some()
        || header(&resp, "transfer-encoding").is_some_and(|t| t.contains("chunked"));
    let mut body = resp.into_body().into_reader();
    let ended = stream(&mut body, p, req.size, body_end, validator, sink)?;
    match ended {
        Ended::Eof => {}
        Ended::Stopped => return Ok(Outcome::Stopped { durable: p.len }),
        Ended::TooLong => {
            return Err(coded(
                ErrorCode::PackageSizeMismatch,
                format!(
                    "server sent more than announced (package_size {}, range end {body_end})",
                    req.size
                ),
            ))
        }
        Ended::ReadError(e) => {
            return Err(AttemptError::Transient(format!(
                "reading body at byte {}: {e}",
                p.len
            )))
        }
    }
    if p.len == body_end && body_end < req.size {
        return Err(AttemptError::More);
    }
    if p.len < body_end {
        if framed {
            return Err(coded(
                ErrorCode::PackageSizeMismatch,
                format!(
                    "server ended the body after {} bytes, package_size is {}",
                    p.len, req.size
                ),
            ));
        }
        return Err(AttemptError::Transient(format!(
            "connection closed after {} of {} bytes",
            p.len, req.size
        )));
    }
    finish(p, validator, sink, req.size)
}

/// The first byte count at which the progress reaches the next multiple of 5 %.
fn next_step(len: u64, size: u64) -> u64 {
    let (len, size) = (len as u128, size.max(1) as u128);
    let q = len * 20 / size;
    ((q + 1) * size).div_ceil(20) as u64
}

/// Progress in percent (0–100) of `len` bytes out of `size`.
pub fn percent(len: u64, size: u64) -> u8 {
    (len as u128 * 100 / size.max(1) as u128).min(100) as u8
}

/// How a body stream ended; in every case all bytes received are written and fsynced.
enum Ended {
    Eof,
    Stopped,
    TooLong,
    ReadError(io::Error),
}

enum Chunk {
    Data {
        buf: Vec<u8>,
        len: usize,
        sync: bool,
    },
    Sync,
}

enum Written {
    Durable(u64),
    Failed(io::Error),
}

/// Bytes written between two requests to start writeback early (see `fsutil::start_writeback`).
const WRITEBACK_STEP: u64 = 8 * 1024 * 1024;

/// Buffers in flight between the reader, the hasher and the writer: bounds memory.
const POOL: usize = 8;

/// Stream `body` into the partial through a three-stage pipeline, so that receiving, hashing
/// and writing (with its fsyncs) overlap on separate cores: reader (this thread) → hasher →
/// writer, buffers recycled through a pool. The hash stays in stream order; the writer fsyncs
/// at each 5 % step and reports the durable length back, and only then is it checkpointed.
fn stream(
    body: &mut dyn Read,
    p: &mut Partial,
    size: u64,
    limit: u64,
    validator: &Option<String>,
    sink: &mut dyn Sink,
) -> std::result::Result<Ended, AttemptError> {
    let start_len = p.len;
    let path = p.path;
    let file = &p.file;
    let hasher = &mut p.hasher;
    let mut received = start_len;
    let mut fatal: Option<AttemptError> = None;
    let ended = std::thread::scope(|scope| {
        let (to_hash, hash_rx) = mpsc::sync_channel::<Chunk>(POOL);
        let (to_write, write_rx) = mpsc::sync_channel::<Chunk>(POOL);
        let (pool_tx, pool_rx) = mpsc::channel::<Vec<u8>>();
        let (ev_tx, ev_rx) = mpsc::channel::<Written>();
        for _ in 0..POOL {
            let _ = pool_tx.send(vec![0u8; BUF_SIZE]);
        }
        scope.spawn(move || {
            for chunk in hash_rx {
                if let Chunk::Data { buf, len, .. } = &chunk {
                    hasher.update(&buf[..*len]);
                }
                if to_write.send(chunk).is_err() {
                    break;
                }
            }
        });
        // The syncer fsyncs while the writer goes on writing, so the disk works while we
        // receive and hash; fdatasync covers every byte written before it was called.
        let (sync_tx, sync_rx) = mpsc::channel::<u64>();
        let sync_ev = ev_tx.clone();
        scope.spawn(move || {
            for n in sync_rx {
                if let Err(e) = fsutil::sync_data(file) {
                    let _ = sync_ev.send(Written::Failed(e));
                    return;
                }
                let _ = sync_ev.send(Written::Durable(n));
            }
        });
        scope.spawn(move || {
            let mut written = start_len;
            let mut kicked = start_len;
            let mut out = file;
            for chunk in write_rx {
                let sync = match chunk {
                    Chunk::Data { buf, len, sync } => {
                        if let Err(e) = out.write_all(&buf[..len]) {
                            let _ = ev_tx.send(Written::Failed(e));
                            return;
                        }
                        written += len as u64;
                        let _ = pool_tx.send(buf);
                        sync
                    }
                    Chunk::Sync => true,
                };
                if written - kicked >= WRITEBACK_STEP {
                    fsutil::start_writeback(file, kicked, written - kicked);
                    kicked = written;
                }
                if sync && sync_tx.send(written).is_err() {
                    return;
                }
            }
        });

        let mut next_checkpoint = next_step(received, size);
        let mut last_checkpoint = Instant::now();
        let handle = |ev: Written, sink: &mut dyn Sink, fatal: &mut Option<AttemptError>| match ev {
            Written::Durable(n) => {
                if let Err(e) = sink.checkpoint(n, validator.as_deref()) {
                    fatal.get_or_insert(AttemptError::Fatal(e));
                }
            }
            Written::Failed(e) => {
                fatal.get_or_insert(write_error(path, e));
            }
        };
        let ended = loop {
            while let Ok(ev) = ev_rx.try_recv() {
                handle(ev, sink, &mut fatal);
            }
            if fatal.is_some() {
                break Ended::Eof;
            }
            if sink.stop_requested() {
                break Ended::Stopped;
            }
            let Ok(mut buf) = pool_rx.recv() else {
                break Ended::Eof; // the writer failed; its event says why
            };
            // Never read past the next checkpoint, so every 5 % step is persisted and reported.
            let want = (next_checkpoint - received).min(BUF_SIZE as u64) as usize;
            let mut filled = 0;
            let mut end = None;
            let fill_start = Instant::now();
            while filled < want {
                match body.read(&mut buf[filled..want]) {
                    Ok(0) => {
                        end = Some(Ended::Eof);
                        break;
                    }
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                        if sink.stop_requested() {
                            break;
                        }
                    }
                    Err(e) => {
                        end = Some(Ended::ReadError(e));
                        break;
                    }
                }
                if fill_start.elapsed() >= Duration::from_millis(200) {
                    break;
                }
            }
            if received + filled as u64 > limit {
                break Ended::TooLong;
            }
            if filled > 0 {
                received += filled as u64;
                sink.account(filled as u64, 0);
                sink.tick(received);
                let sync = received >= next_checkpoint
                    || last_checkpoint.elapsed() >= Duration::from_secs(10);
                if sync {
                    next_checkpoint = next_step(received, size);
                    last_checkpoint = Instant::now();
                }
                let data = Chunk::Data {
                    buf,
                    len: filled,
                    sync,
                };
                if to_hash.send(data).is_err() {
                    break Ended::Eof;
                }
            }
            if let Some(end) = end {
                break end;
            }
        };
        // Drain: everything received is written, hashed and fsynced before we return.
        let _ = to_hash.send(Chunk::Sync);
        drop(to_hash);
        for ev in ev_rx {
            handle(ev, sink, &mut fatal);
        }
        ended
    });
    p.len = received;
    match fatal {
        Some(e) => Err(e),
        None => Ok(ended),
    }
}

fn finish(
    p: &mut Partial,
    validator: &Option<String>,
    sink: &mut dyn Sink,
    size: u64,
) -> std::result::Result<Outcome, AttemptError> {
    p.sync()?;
    sink.checkpoint(size, validator.as_deref())?;
    Ok(Outcome::Complete(std::mem::take(&mut p.hasher).finish()))
}

/// The digests of a whole file (SHA-256 too when asked).
pub fn file_digests(path: &Path, sha256: bool) -> Result<Digests> {
    let mut f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut h = Hashes::new(sha256);
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish())
}

/// MD5 of a whole file, lowercase hex.
pub fn md5_file(path: &Path) -> Result<String> {
    Ok(file_digests(path, false)?.md5)
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range("bytes 10-99/100"),
            Some((10, 99, Some(100)))
        );
        assert_eq!(parse_content_range("bytes 0-0/*"), Some((0, 0, None)));
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }

    #[test]
    fn steps_hit_every_five_percent() {
        // Below 20 bytes one byte is more than 5 %, so only sizes from 20 up hit every step.
        for size in [20u64, 100, 103, 1 << 20, 999_999_937] {
            let mut len = 0;
            let mut seen = vec![];
            while len < size {
                len = next_step(len, size).min(size);
                seen.push(percent(len, size) / 5);
            }
            assert_eq!(seen, (1..=20).collect::<Vec<u8>>(), "{size}");
        }
    }

    #[test]
    fn hex_digest() {
        assert_eq!(hex(&Md5::digest(b"")), "d41d8cd98f00b204e9800998ecf8427e");
    }
}
