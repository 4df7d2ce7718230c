//! Byte ranges of a package on a static HTTP server, for delta downloads: a probe that finds
//! out whether the server honours Range and names the file by a strong ETag, then closed ranges
//! fetched with `If-Match` on that ETag, each answer checked exactly (206, the Content-Range
//! asked for, the package's size, as many bytes as announced). Anything else is a reason not to
//! use a delta ([`Unavailable`]), never a guess: the caller downloads the package whole.

use crate::fetch::Tuning;
use crate::zipdir::{self, Directory, Limits};
use anyhow::Result;
use std::fmt;
use std::io::{Read, Write};

/// Why a delta cannot be used with this server or package; the full download follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable(pub String);

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no delta: {}", self.0)
    }
}

impl std::error::Error for Unavailable {}

fn unavailable<T>(why: impl Into<String>) -> Result<T> {
    Err(Unavailable(why.into()).into())
}

/// A package on a server that honours Range, named by its strong ETag.
pub struct Remote {
    agent: ureq::Agent,
    pub url: String,
    pub size: u64,
    pub etag: String,
    /// Requests made and body bytes received, for the log and the tests.
    pub requests: u64,
    pub received: u64,
}

/// The most a range read into memory may be (a directory, a manifest, a calibration entry).
pub const MAX_IN_MEMORY: u64 = 16 << 20;

fn header<'r>(resp: &'r ureq::http::Response<ureq::Body>, name: &str) -> Option<&'r str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

impl Remote {
    /// Ask for the last `tail` bytes (at most the package). A server that answers 206 with
    /// exactly that range of a file of `size` bytes and a strong ETag gives a `Remote` and the
    /// bytes; 200 (Range ignored), another size, a weak or missing ETag are [`Unavailable`]
    /// (the 200's body is not read). Network failures are plain errors.
    pub fn probe(url: &str, size: u64, tail: u64, tuning: &Tuning) -> Result<(Remote, Vec<u8>)> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(tuning.connect_timeout))
            .timeout_send_request(Some(tuning.stall_timeout))
            .timeout_per_read(Some(tuning.stall_timeout))
            .max_redirects(5)
            .user_agent(concat!("tope-ota/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        let start = size - tail.min(size);
        let resp = agent
            .get(url)
            .header("Range", format!("bytes={start}-{}", size - 1))
            .call()
            .map_err(|e| anyhow::anyhow!("range probe of {url}: {e}"))?;
        let status = resp.status().as_u16();
        if status != 206 {
            return unavailable(format!("the server answered {status} to a range request"));
        }
        let etag = match header(&resp, "etag") {
            Some(e) if e.starts_with('"') => e.to_string(),
            Some(_) => return unavailable("the server's ETag is weak"),
            None => return unavailable("the server sends no ETag"),
        };
        let mut remote = Remote {
            agent,
            url: url.to_string(),
            size,
            etag,
            requests: 1,
            received: 0,
        };
        let mut bytes = Vec::new();
        remote.body(resp, start, size, &mut bytes)?;
        Ok((remote, bytes))
    }

    /// Check a 206's Content-Range and length against `[start, end)` and copy its body to `out`.
    fn body(
        &mut self,
        resp: ureq::http::Response<ureq::Body>,
        start: u64,
        end: u64,
        out: &mut dyn Write,
    ) -> Result<()> {
        let want = format!("bytes {start}-{}/{}", end - 1, self.size);
        match header(&resp, "content-range") {
            Some(cr) if cr.trim() == want => {}
            Some(cr) => return unavailable(format!("asked for {want}, the server sent {cr}")),
            None => return unavailable(format!("asked for {want}, no Content-Range came")),
        }
        if let Some(e) = header(&resp, "etag") {
            if e != self.etag {
                return unavailable(format!(
                    "the package changed on the server (ETag {e}, was {})",
                    self.etag
                ));
            }
        }
        let len = end - start;
        let mut reader = resp.into_body().into_reader().take(len);
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(anyhow::anyhow!("range {start}-{end} of {}: {e}", self.url)),
            };
            out.write_all(&buf[..n])?;
            got += n as u64;
        }
        self.received += got;
        if got != len {
            return Err(anyhow::anyhow!(
                "range {start}-{end} of {}: {got} of {len} bytes came",
                self.url
            ));
        }
        Ok(())
    }

    /// Bytes `[start, end)` of the package into `out`, with `If-Match` on the probe's ETag.
    pub fn copy_range(&mut self, start: u64, end: u64, out: &mut dyn Write) -> Result<()> {
        if start >= end || end > self.size {
            return Err(anyhow::anyhow!(
                "range {start}-{end} is not inside the {} bytes of the package",
                self.size
            ));
        }
        self.requests += 1;
        let resp = self
            .agent
            .get(&self.url)
            .header("Range", format!("bytes={start}-{}", end - 1))
            .header("If-Match", &self.etag)
            .call()
            .map_err(|e| anyhow::anyhow!("range request to {}: {e}", self.url))?;
        match resp.status().as_u16() {
            206 => self.body(resp, start, end, out),
            412 => unavailable("the package changed on the server (If-Match failed)"),
            s => unavailable(format!("the server answered {s} to a range request")),
        }
    }

    /// Bytes `[start, end)` in memory (at most [`MAX_IN_MEMORY`]).
    pub fn get(&mut self, start: u64, end: u64) -> Result<Vec<u8>> {
        if end.saturating_sub(start) > MAX_IN_MEMORY {
            return unavailable(format!(
                "{} bytes would be held in memory, the limit is {MAX_IN_MEMORY}",
                end - start
            ));
        }
        let mut v = Vec::with_capacity((end - start) as usize);
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
                return Ok(tail[(a - tail_start) as usize..(b - tail_start) as usize].to_vec());
            }
            self.get(a, b)
        });
        r.map_err(|e| match e.downcast::<zipdir::ZipDirError>() {
            Ok(z) => Unavailable(z.to_string()).into(),
            Err(e) => e,
        })
    }
}

/// How many of the last bytes to probe with: the EOCD with a short comment, the ZIP64 locator
/// and record, and room for a small package's directory (about 100 entries); a longer comment
/// or directory costs one more range.
pub const PROBE_TAIL: u64 = 16 * 1024;
