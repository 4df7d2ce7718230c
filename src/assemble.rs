//! A delta download: the package assembled in its `.part`, in order, from ranges fetched from
//! the server ([`crate::remote`]) and entries regenerated from `current` ([`crate::delta`]),
//! hashed as it grows. The caller verifies the result exactly as a full download's and falls
//! back to a full download on any mismatch; every reason not to use a delta is returned as
//! `Ok(None)` after logging it, so that the full download follows.
//!
//! Crash safety: the bytes assembled are the package's own bytes, so the durable count recorded
//! through the [`Sink`] is a valid partial for the ordinary resume (`Range: bytes=N-`, If-Range
//! on the same ETag). A prefix that regenerated wrongly is caught by the final MD5.

use crate::delta::{self, Candidate, LocalFile, Method, Piece, PlanOptions, Regenerator};
use crate::fetch::{Digests, Hashes, Outcome, Sink, Tuning};
use crate::fsutil;
use crate::manifest::{Manifest, MANIFEST};
use crate::remote::{Remote, Unavailable, PROBE_TAIL};
use crate::zipdir::{Directory, Limits};
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;

/// What a delta did, for the log and the caller's figures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub fetched: u64,
    pub reused: u64,
    pub requests: u64,
}

/// The largest manifest read into memory.
const MAX_MANIFEST: u64 = 1 << 20;

/// Entry `i`'s bytes from its local header to the next record.
fn extent(dir: &Directory, i: usize) -> (u64, u64) {
    let e = &dir.entries[i];
    let next = dir
        .entries
        .iter()
        .map(|x| x.local_header_offset)
        .filter(|&o| o > e.local_header_offset)
        .min()
        .unwrap_or(dir.end.cd_start);
    (e.local_header_offset, next)
}

/// An entry's data inside its fetched extent (`bytes` from its local header on).
fn entry_data<'a>(dir: &Directory, i: usize, bytes: &'a [u8]) -> Option<&'a [u8]> {
    if bytes.len() < 30 || bytes[..4] != [0x50, 0x4b, 0x03, 0x04] {
        return None;
    }
    let n = u16::from_le_bytes([bytes[26], bytes[27]]) as usize;
    let x = u16::from_le_bytes([bytes[28], bytes[29]]) as usize;
    let start = 30 + n + x;
    let end = start.checked_add(dir.entries[i].compressed_size as usize)?;
    bytes.get(start..end)
}

fn read_manifest(remote: &mut Remote, dir: &Directory) -> Result<Manifest> {
    let Some(e) = dir.entries.iter().find(|e| e.name == MANIFEST.as_bytes()) else {
        return Err(Unavailable("the package has no manifest.json".into()).into());
    };
    let (a, b) = extent(dir, e.index);
    if b - a > MAX_MANIFEST || e.uncompressed_size > MAX_MANIFEST {
        return Err(Unavailable("manifest.json is over 1 MiB".into()).into());
    }
    let raw = remote.get(a, b)?;
    let data = entry_data(dir, e.index, &raw)
        .ok_or_else(|| Unavailable("manifest.json's local header is not readable".into()))?;
    let mut json = Vec::new();
    match Method::from_zip(e.method) {
        Some(Method::Stored) => json.extend_from_slice(data),
        Some(Method::Deflated) => {
            flate2::read::DeflateDecoder::new(data)
                .take(MAX_MANIFEST + 1)
                .read_to_end(&mut json)
                .map_err(|err| Unavailable(format!("manifest.json does not inflate: {err}")))?;
        }
        None => {
            return Err(Unavailable("manifest.json is neither stored nor deflated".into()).into())
        }
    }
    if crc32fast::hash(&json) != e.crc32 {
        return Err(Unavailable("manifest.json does not match its CRC-32".into()).into());
    }
    serde_json::from_slice(&json)
        .map_err(|err| Unavailable(format!("manifest.json does not parse: {err}")).into())
}

fn crc32_file(path: &Path) -> io::Result<u32> {
    let mut f = File::open(path)?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finalize());
        }
        h.update(&buf[..n]);
    }
}

/// The view of `current` the plan needs: for each candidate whose file has the entry's size,
/// its size and CRC-32 (files of another size are never read).
pub fn current_view(
    dir: &Directory,
    cands: &[Candidate],
    current: &Path,
) -> HashMap<String, LocalFile> {
    let mut v = HashMap::new();
    for c in cands {
        let p = current.join(&c.local);
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if !m.is_file() || m.len() != dir.entries[c.entry].uncompressed_size {
            continue;
        }
        if let Ok(crc32) = crc32_file(&p) {
            v.insert(
                c.local.clone(),
                LocalFile {
                    size: m.len(),
                    crc32,
                },
            );
        }
    }
    v
}

/// Prove deflate and local headers on one entry: fetch it, compare with its regeneration.
fn calibrate(
    remote: &mut Remote,
    dir: &Directory,
    cands: &[Candidate],
    view: &HashMap<String, LocalFile>,
    current: &Path,
) -> Result<PlanOptions> {
    let mut opts = PlanOptions::default();
    let Some(c) = delta::calibration_entry(dir, cands, view) else {
        return Ok(opts);
    };
    let local = &cands
        .iter()
        .find(|x| x.entry == c)
        .expect("a candidate")
        .local;
    let (a, b) = extent(dir, c);
    let e = &dir.entries[c];
    if b - a > crate::remote::MAX_IN_MEMORY {
        return Ok(opts);
    }
    let raw = remote.get(a, b)?;
    let header = delta::regenerate_local_header(e);
    opts.headers_proven = raw.starts_with(&header);
    if let Some(data) = entry_data(dir, c, &raw) {
        let file = std::fs::read(current.join(local))
            .with_context(|| format!("read {}", current.join(local).display()))?;
        opts.deflate_proven = delta::regenerate_entry(&file, Method::Deflated) == data;
    }
    log::info!(
        "delta calibration on {:?}: deflate {}, local headers {}",
        String::from_utf8_lossy(&e.name),
        if opts.deflate_proven {
            "reproduces"
        } else {
            "does not reproduce"
        },
        if opts.headers_proven {
            "reproduce"
        } else {
            "do not reproduce"
        },
    );
    Ok(opts)
}

/// The partial being assembled: every byte written goes to the file and the hashes.
struct Assembly {
    file: File,
    hashes: Hashes,
    len: u64,
}

impl Write for Assembly {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // A stop (SIGTERM/SIGINT) ends a long range at once; the piece loop then records what
        // is durable.
        if crate::signals::stop_requested().is_some() {
            return Err(io::Error::other("stop requested"));
        }
        let n = self.file.write(buf)?;
        self.hashes.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Writes at most `left` bytes on, and fails past them (a regeneration longer than its place),
/// saying so in `overflow`.
struct Bounded<'a> {
    out: &'a mut Assembly,
    left: u64,
    overflow: &'a std::cell::Cell<bool>,
}

impl Write for Bounded<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.len() as u64 > self.left {
            self.overflow.set(true);
            return Err(io::Error::other("regenerated entry longer than its place"));
        }
        let n = self.out.write(buf)?;
        self.left -= n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Regenerate `[start, end)` from `current/local` into `out`; false (and `out` rolled back to
/// `start`) when the file no longer gives exactly those many bytes.
fn reuse(out: &mut Assembly, method: Method, file: &Path, start: u64, end: u64) -> Result<bool> {
    let saved = out.hashes.clone();
    let overflow = std::cell::Cell::new(false);
    let ok = (|| -> io::Result<bool> {
        let mut f = File::open(file)?;
        let mut r = Regenerator::new(
            method,
            Bounded {
                out: &mut *out,
                left: end - start,
                overflow: &overflow,
            },
        );
        match delta::copy_chunked(&mut f, &mut r).and_then(|_| r.finish()) {
            Ok(b) => Ok(b.left == 0),
            Err(_) if overflow.get() => Ok(false),
            Err(e) => Err(e),
        }
    })()
    .with_context(|| format!("regenerate from {}", file.display()))?;
    if !ok {
        out.hashes = saved;
        out.file.set_len(start)?;
        use std::io::Seek;
        out.file.seek(io::SeekFrom::Start(start))?;
        out.len = start;
    }
    Ok(ok)
}

/// Try a delta download of the package at `url` (`size` bytes) into `part`, from `current`.
/// `Ok(None)`: no delta (the reason logged; `part` left empty), download it whole.
pub fn delta_download(
    part: &Path,
    url: &str,
    size: u64,
    sha256: bool,
    current: &Path,
    tuning: &Tuning,
    sink: &mut dyn Sink,
) -> Result<Option<(Outcome, Stats)>> {
    let r = try_delta(part, url, size, sha256, current, tuning, sink);
    match r {
        Ok(Some(x)) => Ok(Some(x)),
        Ok(None) => Ok(None),
        Err(e) => {
            if e.downcast_ref::<Unavailable>().is_some() {
                log::info!("{e}");
            } else {
                log::warn!("no delta: {e:#}");
            }
            // Nothing assembled counts: the full download starts from zero. Before the assembly
            // (the caller removed any partial) there is nothing to drop and no state to write.
            if part.exists() {
                fsutil::remove_file_durable(part)?;
                sink.checkpoint(0, None)?;
            }
            Ok(None)
        }
    }
}

fn try_delta(
    part: &Path,
    url: &str,
    size: u64,
    sha256: bool,
    current: &Path,
    tuning: &Tuning,
    sink: &mut dyn Sink,
) -> Result<Option<(Outcome, Stats)>> {
    if !current.is_dir() {
        log::info!("no delta: no current version at {}", current.display());
        return Ok(None);
    }
    let (mut remote, tail) = Remote::probe(url, size, PROBE_TAIL, tuning)?;
    let dir = remote.directory(&tail, &Limits::default())?;
    let manifest = read_manifest(&mut remote, &dir)?;
    let cands = delta::candidates(&dir, &manifest);
    let view = current_view(&dir, &cands, current);
    if view.is_empty() {
        log::info!(
            "no delta: no file of the package is in {}",
            current.display()
        );
        return Ok(None);
    }
    let opts = calibrate(&mut remote, &dir, &cands, &view, current)?;
    let plan = delta::plan(&dir, &cands, &view, &opts).map_err(|e| Unavailable(e.to_string()))?;
    if plan.reuse_bytes == 0 {
        log::info!("no delta: nothing of the package can be regenerated from current");
        return Ok(None);
    }
    log::info!(
        "delta: {} bytes to fetch in {} ranges, {} to regenerate from current",
        plan.fetch_bytes,
        plan.fetch_ranges,
        plan.reuse_bytes
    );
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(part)
        .with_context(|| format!("open {}", part.display()))?;
    let mut out = Assembly {
        file,
        hashes: Hashes::new(sha256),
        len: 0,
    };
    let mut stats = Stats::default();
    let validator = Some(remote.etag.clone());
    let step = (size / 20).max(1);
    let mut next_mark = step;
    for p in &plan.pieces {
        if sink.stop_requested() {
            fsutil::sync_data(&out.file)?;
            sink.checkpoint(out.len, validator.as_deref())?;
            return Ok(Some((Outcome::Stopped { durable: out.len }, stats)));
        }
        let (start, _) = p.range();
        debug_assert_eq!(out.len, start);
        let done = piece(p, &dir, &mut remote, &mut out, current, &mut stats);
        if done.is_err() && sink.stop_requested() {
            // Fetched bytes are the package's: keep them for the resume. A regeneration cut
            // short is not proven (its length was not reached): drop it.
            if !matches!(p, Piece::Fetch { .. }) {
                out.file.set_len(start)?;
                out.len = start;
            }
            fsutil::sync_data(&out.file)?;
            sink.checkpoint(out.len, validator.as_deref())?;
            return Ok(Some((Outcome::Stopped { durable: out.len }, stats)));
        }
        done?;
        sink.tick(out.len);
        if out.len >= next_mark {
            fsutil::sync_data(&out.file)?;
            sink.checkpoint(out.len, validator.as_deref())?;
            crate::failpoint::hit("delta-checkpoint");
            next_mark = out.len + step;
        }
    }
    fsutil::sync_data(&out.file)?;
    sink.checkpoint(out.len, validator.as_deref())?;
    stats.requests = remote.requests;
    log::info!(
        "delta: assembled {} bytes, {} fetched in {} requests, {} regenerated",
        out.len,
        stats.fetched,
        stats.requests,
        stats.reused
    );
    let digests: Digests = out.hashes.finish();
    Ok(Some((Outcome::Complete(digests), stats)))
}

/// Write one piece of the plan to `out`.
fn piece(
    p: &Piece,
    dir: &Directory,
    remote: &mut Remote,
    out: &mut Assembly,
    current: &Path,
    stats: &mut Stats,
) -> Result<()> {
    let (start, end) = p.range();
    match p {
        Piece::Fetch { .. } => {
            remote.copy_range(start, end, out)?;
            stats.fetched += end - start;
        }
        Piece::Header { entry, .. } => {
            out.write_all(&delta::regenerate_local_header(&dir.entries[*entry]))?;
            stats.reused += end - start;
        }
        Piece::Reuse { entry, local, .. } => {
            let method = Method::from_zip(dir.entries[*entry].method).expect("planned");
            if reuse(out, method, &current.join(local), start, end)? {
                stats.reused += end - start;
            } else {
                log::info!("{local} no longer regenerates its entry; fetching it");
                remote.copy_range(start, end, out)?;
                stats.fetched += end - start;
            }
        }
    }
    Ok(())
}
