//! Byte ranges of a package on a static HTTP server, for delta downloads: a probe that finds
//! out whether the server honours Range and names the file by a strong ETag, then ranges
//! fetched with `If-Match` on that ETag — several in one multi-range request where the server
//! answers `multipart/byteranges` — each answer checked exactly (206, the Content-Range asked
//! for, the package's size, as many bytes as announced). A server that cannot be trusted with
//! ranges is [`Unavailable`], never a guess: the caller downloads the package whole. A network
//! failure is [`Transient`]: the caller retries from the bytes it has.
//!
//! It also measures the link for the delta's decision: the latency of each request, and the
//! rate of each first range read straight after its request.

use crate::fetch::Tuning;
use crate::zipdir::{self, Directory, Limits};
use anyhow::Result;
use std::collections::VecDeque;
use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::time::{Duration, Instant};

/// Why a delta cannot be used with this server or package; the full download follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable(pub String);

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no delta: {}", self.0)
    }
}

impl std::error::Error for Unavailable {}

/// A network failure worth another attempt: connection, stall, a body cut short, 408/429/5xx.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transient(pub String);

impl fmt::Display for Transient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Transient {}

/// The package on the server is another one than the bytes fetched before (412, another
/// ETag): what was assembled from it cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed(pub String);

impl fmt::Display for Changed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Changed {}

fn unavailable<T>(why: impl Into<String>) -> Result<T> {
    Err(Unavailable(why.into()).into())
}

fn transient<T>(why: impl Into<String>) -> Result<T> {
    Err(Transient(why.into()).into())
}

/// The most ranges asked for in one request (its Range header stays under 2 KiB).
pub const MAX_RANGES_PER_REQUEST: usize = 64;

/// A pause inside a part longer than this (a slow checkpoint) ends a stream for the steady
/// rate: what the server sent meanwhile may have filled the socket's buffers.
const READ_PAUSE: Duration = Duration::from_millis(250);

/// The longest header line of a multipart answer, and the most lines before a part's data.
const MAX_PART_LINE: usize = 1024;
const MAX_PART_LINES: usize = 16;

/// What the requests so far say about the link.
#[derive(Debug, Clone, Default)]
pub struct LinkStats {
    /// Requests made, and the time from each request to its answer's headers, summed.
    pub requests: u64,
    pub latency: Duration,
    /// Bytes of first ranges read at once after their request, and the time they took.
    pub sampled: u64,
    pub sample_time: Duration,
    /// Every range's reads, for the steady rate of long ranges (a read after a pause, when
    /// the answer waited in the socket, starts it again), and the last steady rate it gave.
    pub window: crate::rate::RateWindow,
    pub steady: Option<f64>,
}

impl LinkStats {
    /// The mean time a request costs before its first byte.
    pub fn rtt(&self) -> Option<Duration> {
        (self.requests > 0).then(|| self.latency / u32::try_from(self.requests).unwrap_or(u32::MAX))
    }

    /// Bytes per second the link delivers: the last steady rate of a long range, else the
    /// first ranges' average once 64 KiB were sampled.
    pub fn rate(&self) -> Option<f64> {
        self.steady.or_else(|| {
            (self.sampled >= 64 * 1024)
                .then(|| self.sampled as f64 / self.sample_time.as_secs_f64().max(1e-6))
        })
    }
}

/// A package on a server that honours Range, named by its strong ETag.
pub struct Remote {
    agent: ureq::Agent,
    pub url: String,
    pub size: u64,
    pub etag: String,
    /// Body bytes received, for the accounts and the log.
    pub received: u64,
    pub link: LinkStats,
    /// Whether the server answers multi-range requests: unknown until one was asked.
    pub multi: Option<bool>,
    /// First parts sample the link only once this is set: the small reads before the
    /// assembly (probe, manifest, calibration) measure the latency, not the rate.
    pub sampling: bool,
}

/// The answer to one request, read part by part in the order the ranges were asked.
pub struct Batch {
    reader: BufReader<ureq::BodyReader<'static>>,
    /// `multipart/byteranges` boundary; `None` for a single range.
    boundary: Option<String>,
    queue: VecDeque<(u64, u64)>,
    /// The rest of the part being read, when it was read only in part.
    open: Option<(u64, u64)>,
    /// The first part is being read (right after the request, in reads with only checkpoints
    /// between them): it samples the link.
    fresh: bool,
}

impl Batch {
    fn new(
        reader: ureq::BodyReader<'static>,
        boundary: Option<String>,
        queue: VecDeque<(u64, u64)>,
    ) -> Batch {
        Batch {
            reader: BufReader::new(reader),
            boundary,
            queue,
            open: None,
            fresh: true,
        }
    }

    /// The bytes this answer holds next: the rest of a part begun, or the next part.
    pub fn next(&self) -> Option<(u64, u64)> {
        self.open.or_else(|| self.queue.front().copied())
    }
}

fn header<'r>(resp: &'r ureq::http::Response<ureq::Body>, name: &str) -> Option<&'r str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

fn range_header(ranges: &[(u64, u64)]) -> String {
    let list: Vec<String> = ranges
        .iter()
        .map(|(a, b)| format!("{a}-{}", b - 1))
        .collect();
    format!("bytes={}", list.join(","))
}

/// The boundary of a `multipart/byteranges` content type.
fn boundary_of(content_type: &str) -> Option<String> {
    let mut parts = content_type.split(';');
    if !parts
        .next()?
        .trim()
        .eq_ignore_ascii_case("multipart/byteranges")
    {
        return None;
    }
    parts.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_string())
            .filter(|b| !b.is_empty() && b.len() <= 70)
    })
}

/// One header line of a multipart answer, without its CRLF; bounded.
fn read_line(r: &mut impl BufRead) -> Result<String> {
    let mut line = Vec::new();
    let n = r
        .take(MAX_PART_LINE as u64 + 2)
        .read_until(b'\n', &mut line)
        .map_err(|e| Transient(format!("multipart answer: {e}")))?;
    if n == 0 {
        return transient("multipart answer cut short");
    }
    if line.last() != Some(&b'\n') {
        return unavailable("a multipart header line is too long");
    }
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    String::from_utf8(line).or_else(|_| unavailable("a multipart header is not text"))
}

impl Remote {
    /// Ask for the last `tail` bytes (at most the package). A server that answers 206 with
    /// exactly that range of a file of `size` bytes and a strong ETag gives a `Remote` and the
    /// bytes; 200 (Range ignored), another size, a weak or missing ETag are [`Unavailable`]
    /// (the 200's body is not read). Network failures are plain errors.
    pub fn probe(url: &str, size: u64, tail: u64, tuning: &Tuning) -> Result<(Remote, Vec<u8>)> {
        let agent = crate::fetch::agent(tuning);
        let start = size - tail.min(size);
        let t = Instant::now();
        let resp = agent
            .get(url)
            .header("Range", format!("bytes={start}-{}", size - 1))
            .call()
            .map_err(|e| anyhow::anyhow!("range probe of {url}: {e}"))?;
        let latency = t.elapsed();
        let status = resp.status().as_u16();
        if status != 206 {
            return unavailable(format!("the server answered {status} to a range request"));
        }
        let etag = match (
            header(&resp, "etag"),
            crate::fetch::raw_header(&resp, "etag"),
        ) {
            (Some(e), _) if e.starts_with('"') => e.to_string(),
            (None, Some(_)) => return unavailable("the server's ETag is not ASCII"),
            (Some(_), _) => return unavailable("the server's ETag is weak"),
            (None, None) => return unavailable("the server sends no ETag"),
        };
        let mut remote = Remote {
            agent,
            url: url.to_string(),
            size,
            etag,
            received: 0,
            link: LinkStats {
                requests: 1,
                latency,
                ..LinkStats::default()
            },
            multi: None,
            sampling: false,
        };
        remote.check_single(&resp, start, size)?;
        let mut batch = Batch::new(
            resp.into_body().into_reader(),
            None,
            VecDeque::from([(start, size)]),
        );
        let mut bytes = Vec::new();
        remote.read_next(&mut batch, start, size, &mut bytes)?;
        Ok((remote, bytes))
    }

    /// The package at `url` as an earlier probe found it, under its strong `etag`, with no
    /// request: the ranges' If-Match checks it is still that package.
    pub fn known(url: &str, size: u64, etag: &str, tuning: &Tuning) -> Remote {
        Remote {
            agent: crate::fetch::agent(tuning),
            url: url.to_string(),
            size,
            etag: etag.to_string(),
            received: 0,
            link: LinkStats::default(),
            multi: None,
            sampling: false,
        }
    }

    /// The agent (and its kept-alive connections) the requests went over.
    pub fn agent(&self) -> ureq::Agent {
        self.agent.clone()
    }

    fn check_content_range(&self, got: Option<&str>, start: u64, end: u64) -> Result<()> {
        let want = format!("bytes {start}-{}/{}", end - 1, self.size);
        match got {
            Some(cr) if cr.trim() == want => Ok(()),
            Some(cr) => unavailable(format!("asked for {want}, the server sent {cr}")),
            None => unavailable(format!("asked for {want}, no Content-Range came")),
        }
    }

    /// A single-range 206: its Content-Range and ETag.
    fn check_single(
        &self,
        resp: &ureq::http::Response<ureq::Body>,
        start: u64,
        end: u64,
    ) -> Result<()> {
        self.check_content_range(header(resp, "content-range"), start, end)?;
        self.check_etag(resp)
    }

    fn check_etag(&self, resp: &ureq::http::Response<ureq::Body>) -> Result<()> {
        // Compared as bytes: an ETag with bytes beyond ASCII differs from ours too.
        match crate::fetch::raw_header(resp, "etag") {
            Some(e) if e != self.etag.as_bytes() => Err(Changed(format!(
                "the package changed on the server (ETag {}, was {})",
                String::from_utf8_lossy(e),
                self.etag
            ))
            .into()),
            _ => Ok(()),
        }
    }

    /// Send one request for `ranges` (sorted, disjoint, inside the package).
    fn request(&mut self, ranges: &[(u64, u64)]) -> Result<ureq::http::Response<ureq::Body>> {
        let t = Instant::now();
        self.link.requests += 1;
        let resp = self
            .agent
            .get(&self.url)
            .header("Range", range_header(ranges))
            .header("If-Match", &self.etag)
            .call()
            .map_err(|e| Transient(format!("range request to {}: {e}", self.url)))?;
        self.link.latency += t.elapsed();
        match resp.status().as_u16() {
            412 => {
                Err(Changed("the package changed on the server (If-Match failed)".into()).into())
            }
            s @ (408 | 429 | 500..=599) => {
                transient(format!("the server answered {s} to a range request"))
            }
            _ => Ok(resp),
        }
    }

    /// One request for `ranges` (the first up to [`MAX_RANGES_PER_REQUEST`]; just the first
    /// where the server is known not to answer several); read its parts with
    /// [`Remote::read_next`]. A server that answers a multi-range request with anything but
    /// those ranges as `multipart/byteranges` is asked one range at a time from then on.
    pub fn open(&mut self, ranges: &[(u64, u64)]) -> Result<Batch> {
        for &(a, b) in ranges {
            if a >= b || b > self.size {
                return Err(anyhow::anyhow!(
                    "range {a}-{b} is not inside the {} bytes of the package",
                    self.size
                ));
            }
        }
        let many = ranges.len() > 1 && self.multi != Some(false);
        let ask = if many {
            &ranges[..ranges.len().min(MAX_RANGES_PER_REQUEST)]
        } else {
            &ranges[..1]
        };
        let resp = self.request(ask)?;
        let status = resp.status().as_u16();
        if !many {
            if status != 206 {
                return unavailable(format!("the server answered {status} to a range request"));
            }
            self.check_single(&resp, ask[0].0, ask[0].1)?;
            return Ok(Batch::new(
                resp.into_body().into_reader(),
                None,
                VecDeque::from([ask[0]]),
            ));
        }
        let boundary = header(&resp, "content-type").and_then(boundary_of);
        match (status, boundary) {
            (206, Some(boundary)) => {
                self.check_etag(&resp)?;
                self.multi = Some(true);
                Ok(Batch::new(
                    resp.into_body().into_reader(),
                    Some(boundary),
                    ask.iter().copied().collect(),
                ))
            }
            _ => {
                // 200 (the whole package: dropped unread), one range for several, or a refusal
                // (416, 400) of a Range header it cannot parse.
                log::info!(
                    "delta: the server answered {status} without multipart/byteranges to {} ranges; asking one range at a time",
                    ask.len()
                );
                self.multi = Some(false);
                drop(resp);
                self.open(&ranges[..1])
            }
        }
    }

    /// Bytes `[start, end)` of `batch` into `out`: they must begin its [`Batch::next`] bytes,
    /// and may stop short of their end (the rest is read by the next call).
    pub fn read_next(
        &mut self,
        batch: &mut Batch,
        start: u64,
        end: u64,
        out: &mut dyn Write,
    ) -> Result<()> {
        let begun = batch.open.is_some();
        let part = match batch.next() {
            Some((a, b)) if a == start && end <= b => (a, b),
            _ => {
                return Err(anyhow::anyhow!(
                    "range {start}-{end} read out of the order asked"
                ))
            }
        };
        if !begun {
            batch.queue.pop_front();
        }
        batch.open = (end < part.1).then_some((end, part.1));
        if let (Some(boundary), false) = (&batch.boundary, begun) {
            let delimiter = format!("--{boundary}");
            let mut lines = 0;
            loop {
                let line = read_line(&mut batch.reader)?;
                lines += 1;
                if line == delimiter {
                    break;
                }
                if !line.is_empty() || lines > 2 {
                    return unavailable(format!(
                        "a multipart answer has {line:?} where a boundary belongs"
                    ));
                }
            }
            let mut content_range = None;
            let mut ended = false;
            for _ in 0..=MAX_PART_LINES {
                let line = read_line(&mut batch.reader)?;
                if line.is_empty() {
                    ended = true;
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    if k.trim().eq_ignore_ascii_case("content-range") {
                        content_range = Some(v.trim().to_string());
                    }
                }
            }
            if !ended {
                return unavailable("a multipart part's headers do not end");
            }
            self.check_content_range(content_range.as_deref(), part.0, part.1)?;
        }
        let len = end - start;
        let t = Instant::now();
        // Only the reads of one part, in calls with no more than a checkpoint between them, are
        // one stream: a part's first bytes waited in the socket while the parts before were
        // regenerated (or came in the server's burst), and the time spent regenerating is no
        // time of the link's.
        if !begun
            || self
                .link
                .window
                .last()
                .is_none_or(|l| t.duration_since(l) > READ_PAUSE)
        {
            self.link.window.restart(t);
        }
        let mut body = (&mut batch.reader).take(len);
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0u64;
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.received += got;
                    return transient(format!("range {start}-{end} of {}: {e}", self.url));
                }
            };
            if let Err(e) = out.write_all(&buf[..n]) {
                self.received += got + n as u64;
                return Err(anyhow::Error::from(e).context("write the range"));
            }
            got += n as u64;
            if self.sampling {
                self.link.window.add(Instant::now(), n as u64);
                if let Some(r) = self.link.window.steady() {
                    self.link.steady = Some(r);
                }
            }
        }
        self.received += got;
        if got != len {
            return transient(format!(
                "range {start}-{end} of {}: {got} of {len} bytes came",
                self.url
            ));
        }
        if batch.fresh && self.sampling {
            self.link.sampled += len;
            self.link.sample_time += t.elapsed();
            batch.fresh = batch.open.is_some();
        }
        if batch.next().is_none() {
            // Read the answer to its end (a multipart's closing boundary, a single range's
            // end), so that the connection goes back to the agent's pool for the next request.
            let _ = std::io::copy(&mut (&mut batch.reader).take(4096), &mut std::io::sink());
        }
        Ok(())
    }

    /// Bytes `[start, end)` of the package into `out`, in a request of their own.
    pub fn copy_range(&mut self, start: u64, end: u64, out: &mut dyn Write) -> Result<()> {
        let mut batch = self.open(&[(start, end)])?;
        self.read_next(&mut batch, start, end, out)
    }

    /// Bytes `[start, end)` in memory (at most [`MAX_IN_MEMORY`]).
    pub fn get(&mut self, start: u64, end: u64) -> Result<Vec<u8>> {
        if end.saturating_sub(start) > MAX_IN_MEMORY {
            return unavailable(format!(
                "{} bytes would be held in memory, the limit is {MAX_IN_MEMORY}",
                end - start
            ));
        }
        // Under MAX_IN_MEMORY (checked above), so it fits a usize on every device.
        let mut v = Vec::with_capacity(usize::try_from(end - start).unwrap_or(0));
        self.copy_range(start, end, &mut v)?;
        Ok(v)
    }

    /// The package's central directory, from the probe's `tail` (the last bytes) and as few
    /// further ranges as it needs. A package that is not a ZIP, or whose directory lies or
    /// exceeds `limits`, is [`Unavailable`].
    pub fn directory(&mut self, tail: &[u8], limits: &Limits) -> Result<Directory> {
        let tail_start = self.size - tail.len() as u64;
        let r = zipdir::read_directory(self.size, limits, |a, b| {
            if a >= tail_start {
                // Offsets inside the tail, which is in memory: they fit a usize, or the
                // directory reader asked past the package, which the slice refuses.
                let at = |x: u64| usize::try_from(x - tail_start).unwrap_or(usize::MAX);
                return Ok(tail[at(a)..at(b)].to_vec());
            }
            self.get(a, b)
        });
        r.map_err(|e| match e.downcast::<zipdir::ZipDirError>() {
            Ok(z) => Unavailable(z.to_string()).into(),
            Err(e) => e,
        })
    }
}

/// The most a range read into memory may be (a directory, a manifest, a calibration entry).
pub const MAX_IN_MEMORY: u64 = 16 << 20;

/// How many of the last bytes to probe with: the EOCD with a short comment, the ZIP64 locator
/// and record, and room for a small package's directory (about 100 entries); a longer comment
/// or directory costs one more range.
pub const PROBE_TAIL: u64 = 16 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_and_range_headers() {
        assert_eq!(
            boundary_of("multipart/byteranges; boundary=00000000000000000001").as_deref(),
            Some("00000000000000000001")
        );
        assert_eq!(
            boundary_of("Multipart/ByteRanges;boundary=\"a b\"").as_deref(),
            Some("a b")
        );
        assert_eq!(boundary_of("application/zip"), None);
        assert_eq!(boundary_of("multipart/byteranges"), None);
        assert_eq!(range_header(&[(0, 10), (20, 21)]), "bytes=0-9,20-20");
    }

    #[test]
    fn link_stats_need_a_sample() {
        let mut l = LinkStats::default();
        assert_eq!(l.rtt(), None);
        assert_eq!(l.rate(), None);
        l.requests = 2;
        l.latency = Duration::from_millis(100);
        l.sampled = 1 << 20;
        l.sample_time = Duration::from_millis(500);
        assert_eq!(l.rtt(), Some(Duration::from_millis(50)));
        assert_eq!(l.rate(), Some(2.0 * (1 << 20) as f64));
    }
}
