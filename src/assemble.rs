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
use crate::error::{ErrorCode, OtaError};
use crate::fetch::{Digests, Hashes, Outcome, Sink, Tuning};
use crate::fsutil;
use crate::manifest::{Manifest, MANIFEST};
use crate::remote::{
    Batch, Changed, Remote, Transient, Unavailable, MAX_RANGES_PER_REQUEST, PROBE_TAIL,
};
use crate::switch::{pinned_regen_rate, Known, Prospect};
use crate::zipdir::{Directory, Limits};
use anyhow::Result;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// What a delta did, for the log and the caller's figures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes received (every request), bytes regenerated, requests made.
    pub fetched: u64,
    pub reused: u64,
    pub requests: u64,
    /// Entries regenerated, of the package's entries.
    pub entries_reused: usize,
    pub entries: usize,
}

/// The largest manifest read into memory.
const MAX_MANIFEST: u64 = 1 << 20;

/// An entry's data inside its fetched extent (`bytes` from its local header on).
fn entry_data<'a>(dir: &Directory, i: usize, bytes: &'a [u8]) -> Option<&'a [u8]> {
    if bytes.len() < 30 || bytes[..4] != [0x50, 0x4b, 0x03, 0x04] {
        return None;
    }
    let n = u16::from_le_bytes([bytes[26], bytes[27]]) as usize;
    let x = u16::from_le_bytes([bytes[28], bytes[29]]) as usize;
    let start = 30 + n + x;
    let end = start.checked_add(usize::try_from(dir.entries[i].compressed_size).ok()?)?;
    bytes.get(start..end)
}

fn read_manifest(remote: &mut Remote, dir: &Directory) -> Result<Manifest> {
    let Some(e) = dir.entries.iter().find(|e| e.name == MANIFEST.as_bytes()) else {
        return Err(Unavailable("the package has no manifest.json".into()).into());
    };
    let (a, b) = dir.extent(e.index);
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
    let mut f = fsutil::open_regular(path)?;
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
        // A stop is answered within one file's read; the caller sees it and stops.
        if crate::signals::stop_requested().is_some() {
            break;
        }
        if v.contains_key(&c.local) {
            continue;
        }
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
/// Also gives the device's deflate rate on it (file bytes per second), a first guess for the
/// decision.
fn calibrate(
    remote: &mut Remote,
    dir: &Directory,
    cands: &[Candidate],
    view: &HashMap<String, LocalFile>,
    current: &Path,
) -> Result<(PlanOptions, Option<f64>)> {
    let mut opts = PlanOptions::default();
    let Some(c) = delta::calibration_entry(dir, cands, view) else {
        return Ok((opts, None));
    };
    let local = &cands
        .iter()
        .find(|x| x.entry == c)
        .expect("a candidate")
        .local;
    let (a, b) = dir.extent(c);
    let e = &dir.entries[c];
    // The entry's data is at most MAX_CALIBRATION bytes: a longer span (a gap after it) is not
    // worth holding in memory, and proves nothing more.
    if b - a > delta::MAX_CALIBRATION + (256 << 10) {
        return Ok((opts, None));
    }
    let raw = remote.get(a, b)?;
    let header = delta::regenerate_local_header(e);
    opts.headers_proven = raw.starts_with(&header);
    let mut rate = None;
    if let Some(data) = entry_data(dir, c, &raw) {
        let path = current.join(local);
        let mut file = Vec::new();
        // Read no more than the entry's size and one byte: a file grown since the stat cannot
        // regenerate the entry and must not fill the memory.
        let read = fsutil::open_regular(&path)
            .and_then(|f| f.take(e.uncompressed_size + 1).read_to_end(&mut file));
        if let Err(err) = read {
            log::warn!("delta calibration: cannot read {}: {err}", path.display());
            return Ok((opts, None));
        }
        let t = Instant::now();
        opts.deflate_proven = delta::regenerate_entry(&file, Method::Deflated) == data;
        rate = Some(file.len() as f64 / t.elapsed().as_secs_f64().max(1e-6));
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
    Ok((opts, rate))
}

/// When a delta is tried: `TOPE_OTA_DELTA=auto` (the default) when it is expected to finish
/// sooner than the rest whole, decided again as the link's steady rate shows itself; `bytes`
/// when it is expected to fetch fewer bytes than the rest whole, whatever the speed (a metered
/// link); `always` whenever the package allows; `never` (as `download --full`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Auto,
    Bytes,
    Always,
    Never,
}

impl Mode {
    /// The mode `TOPE_OTA_DELTA` names; a value it cannot read is warned about and taken as
    /// `auto`, so a typo in a settings file never stops updates.
    pub fn from_env() -> Mode {
        let v = std::env::var("TOPE_OTA_DELTA").unwrap_or_default();
        match v.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Mode::Auto,
            "bytes" => Mode::Bytes,
            "always" => Mode::Always,
            "never" => Mode::Never,
            other => {
                log::warn!(
                    "TOPE_OTA_DELTA={other:?} is not auto, bytes, always or never; using auto"
                );
                Mode::Auto
            }
        }
    }
}

/// A delta download to try: the package at `url` (`size` bytes; SHA-256 hashed too when
/// `sha256`) into `part`, from `current`, going on from `resume`.
pub struct Job<'a> {
    pub part: &'a Path,
    pub url: &'a str,
    pub size: u64,
    pub sha256: bool,
    pub current: &'a Path,
    pub resume: Resume,
    pub mode: Mode,
    /// This delta follows a switch from a whole download: its first decision needs the margin.
    pub switched: bool,
    /// Switches are left: `auto` may hand over to a whole download (and give its prospect).
    pub may_switch: bool,
    /// The package's directory and candidates as an earlier try read them this run.
    pub known: Option<&'a Known>,
}

/// The durable prefix of a partial to go on from, and the validator it was fetched under.
#[derive(Debug, Clone, Default)]
pub struct Resume {
    pub offset: u64,
    pub validator: Option<String>,
}

/// The partial being assembled: every byte written goes to the file and the hashes.
struct Assembly {
    file: File,
    hashes: Hashes,
    len: u64,
    /// A write to the file failed (not a stop): the assembly cannot go on.
    broken: bool,
}

impl Assembly {
    /// Back to `pos` bytes and the hashes they had (`saved`).
    fn truncate(&mut self, pos: u64, saved: Hashes) -> io::Result<()> {
        self.hashes = saved;
        self.file.set_len(pos)?;
        self.file.seek(io::SeekFrom::Start(pos))?;
        self.len = pos;
        Ok(())
    }
}

impl Write for Assembly {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // A stop (SIGTERM/SIGINT) ends a long range at once; the piece loop then records what
        // is durable.
        if crate::signals::stop_requested().is_some() {
            return Err(io::Error::other("stop requested"));
        }
        let n = crate::failpoint::fault("write")
            .and_then(|()| self.file.write(buf))
            .inspect_err(|_| self.broken = true)?;
        self.hashes.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Drops the first `skip` bytes (a regenerated prefix already in the partial), then writes at
/// most `left` bytes on, and fails past them (a regeneration longer than its place), saying so
/// in `overflow`.
struct Window<'a> {
    out: &'a mut Assembly,
    skip: u64,
    left: u64,
    overflow: &'a std::cell::Cell<bool>,
}

impl Write for Window<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let skipped = usize::try_from(self.skip).map_or(buf.len(), |s| s.min(buf.len()));
        if skipped > 0 {
            self.skip -= skipped as u64;
            return Ok(skipped);
        }
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

/// A reader that hashes what passes through it (CRC-32).
struct Crc<R> {
    inner: R,
    hasher: crc32fast::Hasher,
}

impl<R: Read> Read for Crc<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Regenerate an entry from `file` into `out`, dropping its first `skip` bytes and writing the
/// `len` after them. `Ok(false)` (and `out` rolled back) when the file cannot be read, no
/// longer has the entry's CRC-32 (changed since the plan) or no longer gives exactly those
/// bytes' count; an error only when `out` fails or a stop came.
fn reuse(
    out: &mut Assembly,
    method: Method,
    file: &Path,
    crc32: u32,
    skip: u64,
    len: u64,
) -> Result<bool> {
    let (pos, saved) = (out.len, out.hashes.clone());
    let overflow = std::cell::Cell::new(false);
    let r = (|| -> io::Result<bool> {
        let mut f = Crc {
            inner: fsutil::open_regular(file)?,
            hasher: crc32fast::Hasher::new(),
        };
        let mut r = Regenerator::new(
            method,
            Window {
                out: &mut *out,
                skip,
                left: len,
                overflow: &overflow,
            },
        );
        crate::packer::copy_chunked(&mut f, &mut r)?;
        let w = r.finish()?;
        Ok(w.left == 0 && w.skip == 0 && f.hasher.finalize() == crc32)
    })();
    let (ok, err) = match r {
        Ok(ok) => (ok, None),
        Err(_) if overflow.get() => (false, None),
        Err(e) if out.broken || crate::signals::stop_requested().is_some() => (false, Some(e)),
        Err(e) => {
            log::warn!("delta: cannot regenerate from {}: {e}", file.display());
            (false, None)
        }
    };
    if !ok {
        // A regeneration cut short is not in the partial (nor counted as reused): a resume
        // regenerates the entry again.
        out.truncate(pos, saved)?;
    }
    match err {
        Some(e) => Err(anyhow::Error::from(e).context("write the regenerated entry")),
        None => Ok(ok),
    }
}

/// How much of a fresh package is fetched first, whatever the plan: the link's rate is
/// measured on bytes needed either way before anything is regenerated.
fn prefix_len(size: u64) -> u64 {
    (size / 256).clamp(64 * 1024, 512 * 1024).min(size)
}

/// Regenerated bytes between two ranges of one multi-range request, at most: the answer waits
/// in the socket meanwhile, and a server's send timeout must not run out.
const MAX_REGEN_IN_BATCH: u64 = 32 << 20;

/// Try the delta download `job`, going on from its `resume` (the durable prefix of an earlier
/// assembly or download, continued by the same plan: it is a function of the directory and
/// `current`).
/// `Ok(None)`: download the rest whole, from the durable bytes the sink last recorded (the
/// reason logged): the delta was not possible (the partial kept as it was), failed in a way
/// that makes the partial unusable (dropped: from zero), or is expected to lose to a full
/// download from here on (from where it got to).
/// `prospect`: set when `auto` goes on whole for now, for the whole download to watch the link
/// and switch back to a delta when it pays ([`crate::switch`]).
pub fn delta_download(
    job: &Job,
    tuning: &Tuning,
    sink: &mut dyn Sink,
    prospect: &mut Option<Prospect>,
) -> Result<Option<(Outcome, Stats)>> {
    let part = job.part;
    let mut started = false;
    let r = try_delta(job, tuning, sink, &mut started, prospect);
    // Regenerated bytes after the last checkpoint are cut from the partial by whatever comes
    // next (a plain resume, a retry): they must not be counted as reused.
    sink.discard_uncommitted();
    let e = match r {
        Ok(x) => return Ok(x),
        Err(e) => e,
    };
    if e.chain().any(|c| c.is::<OtaError>()) {
        return Err(e);
    }
    if e.downcast_ref::<Changed>().is_some() {
        log::info!("no delta: {e}");
        if started {
            // Bytes of another package: nothing assembled can be used.
            fsutil::remove_file_durable(part)?;
            sink.checkpoint(0, None)?;
        }
        return Ok(None);
    }
    if e.downcast_ref::<Unavailable>().is_some() {
        // What was checkpointed passed every check and the final hashes still cover it: the
        // plain download goes on from there.
        log::info!("{e}");
        return Ok(None);
    }
    if !started || e.downcast_ref::<Transient>().is_some() {
        log::warn!("no delta: {e:#}");
        return Ok(None);
    }
    Err(local_failure(part, e))
}

fn try_delta(
    job: &Job,
    tuning: &Tuning,
    sink: &mut dyn Sink,
    started: &mut bool,
    prospect: &mut Option<Prospect>,
) -> Result<Option<(Outcome, Stats)>> {
    let Job {
        part,
        url,
        size,
        sha256,
        current,
        ref resume,
        mode,
        switched,
        may_switch,
        known,
    } = *job;
    if !current.is_dir() {
        log::info!("no delta: no current version at {}", current.display());
        return Ok(None);
    }
    // Known: no probe. Every range is asked with If-Match on the ETag it was read under, so a
    // package changed since answers 412 (the partial is then dropped, as for any change).
    let (mut remote, dir, cands) = match known {
        Some(k) => (
            Remote::known(url, size, &k.etag, tuning),
            k.dir.clone(),
            k.cands.clone(),
        ),
        None => {
            let (mut remote, tail) = Remote::probe(url, size, PROBE_TAIL, tuning)?;
            let found = remote
                .directory(&tail, &delta_limits())
                .and_then(|dir| read_manifest(&mut remote, &dir).map(|m| (dir, m)));
            sink.account(remote.received, 0);
            let (dir, manifest) = found?;
            let cands = delta::candidates(&dir, &manifest);
            (remote, dir, cands)
        }
    };
    let mut offset = resume.offset;
    if offset > 0 && resume.validator.as_deref() != Some(&remote.etag) {
        if !resume
            .validator
            .as_deref()
            .is_some_and(|v| v.starts_with('"'))
        {
            log::info!("no delta: the partial was fetched without the package's ETag");
            return Ok(None);
        }
        log::info!("delta: the package changed on the server since the partial; starting over");
        fsutil::remove_file_durable(part)?;
        sink.checkpoint(0, None)?;
        offset = 0;
    }
    *started = true;
    remote.sampling = true;
    let (file, hashes, len) = crate::fetch::reopen_partial(part, offset, size, sha256)?;
    let mut out = Assembly {
        file,
        hashes,
        len,
        broken: false,
    };
    let validator = Some(remote.etag.clone());
    let accounted_before_prefix = remote.received;
    let by_stat = matches!(mode, Mode::Auto | Mode::Bytes)
        .then(|| Prospect::by_stat(&dir, &cands, current, &remote));
    if let (Mode::Bytes, Some(by_stat)) = (mode, &by_stat) {
        // The probe, directory and manifest are spent: the rest is compared.
        let c = by_stat.cost(offset, 1.0, 1.0, 1.0, false);
        // The calibration entry is still to come.
        let delta_bytes = c.delta_bytes + by_stat.overhead.0;
        if delta_bytes >= c.whole_bytes {
            log::info!(
                "no delta: as a delta the rest would fetch about {delta_bytes} bytes, whole {}: whole is fewer bytes",
                c.whole_bytes
            );
            return Ok(None);
        }
    }
    if offset == 0 && mode == Mode::Auto && !switched {
        // The link measured on the package's first bytes, needed whatever the decision.
        let got = remote.copy_range(0, prefix_len(size), &mut out);
        if got.is_err() && sink.stop_requested() && !out.broken {
            // A stop ends the range at once; what came is the package's first bytes.
            fsutil::sync_data(&out.file)?;
            sink.account(remote.received - accounted_before_prefix, 0);
            sink.checkpoint(out.len, validator.as_deref())?;
            return Ok(Some((
                Outcome::Stopped { durable: out.len },
                Stats::default(),
            )));
        }
        got?;
        fsutil::sync_data(&out.file)?;
        sink.account(remote.received - accounted_before_prefix, 0);
        sink.checkpoint(out.len, validator.as_deref())?;
        if let Some(why) = cannot_win(&dir, &cands, current, out.len, size, &remote) {
            if let (true, Some(mut p)) = (may_switch, by_stat) {
                log::info!("no delta for now: {why}; downloading whole, watching the link");
                p.known = Some(Known {
                    etag: remote.etag.clone(),
                    dir,
                    cands,
                    proven: None,
                });
                *prospect = Some(p);
            } else {
                log::info!("no delta: {why}; downloading the rest whole");
            }
            return Ok(None);
        }
    }
    // A stop before the assembly: nothing was written since the last checkpoint (the prefix,
    // or the resume's offset), so that is what is durable.
    let stopped = |out: &Assembly| {
        Ok(Some((
            Outcome::Stopped { durable: out.len },
            Stats::default(),
        )))
    };
    // Known from an assembly earlier in this run: its view and calibration hold for the same
    // ETag and `current` (each file is checked against its CRC-32 again as it is regenerated).
    let proven = known.and_then(|k| k.proven.clone());
    let view = match &proven {
        Some(p) => p.view.clone(),
        None => current_view(&dir, &cands, current),
    };
    if sink.stop_requested() {
        return stopped(&out);
    }
    if view.is_empty() {
        log::info!(
            "no delta: no file of the package is in {}",
            current.display()
        );
        return Ok(None);
    }
    // A resume proves deflate and headers again (one range): its plan must be the one the
    // partial was assembled by, and that plan is a function of these answers.
    let before = remote.received;
    let calibrated = match proven {
        Some(p) => Ok((p.opts, p.deflate)),
        None => calibrate(&mut remote, &dir, &cands, &view, current),
    };
    sink.account(remote.received - before, 0);
    let (opts, deflate_rate) = calibrated?;
    if sink.stop_requested() {
        return stopped(&out);
    }
    let plan = delta::plan(&dir, &cands, &view, &opts).map_err(|e| Unavailable(e.to_string()))?;
    let proven = crate::switch::Proven {
        view,
        opts,
        deflate: deflate_rate,
    };
    let left: u64 = plan
        .pieces
        .iter()
        .filter(|p| !matches!(p, Piece::Fetch { .. }))
        .map(|p| p.range().1.saturating_sub(p.range().0.max(out.len)))
        .sum();
    if left == 0 {
        log::info!("no delta: nothing of the package left to regenerate from current");
        return Ok(None);
    }
    if mode == Mode::Bytes {
        let (fetch, parts) = plan
            .pieces
            .iter()
            .filter(|p| matches!(p, Piece::Fetch { .. }) && p.range().1 > out.len)
            .fold((0, 0), |(b, n), p| {
                (b + p.range().1 - p.range().0.max(out.len), n + 1)
            });
        let delta_bytes = fetch + parts * crate::switch::PART_OVERHEAD;
        if delta_bytes >= size - out.len {
            log::info!(
                "no delta: the plan fetches {delta_bytes} bytes of the {} left: whole is fewer bytes",
                size - out.len
            );
            return Ok(None);
        }
        log::info!(
            "delta: {delta_bytes} bytes to fetch for the {} left (TOPE_OTA_DELTA=bytes)",
            size - out.len
        );
    }
    log::info!(
        "delta: {} bytes to fetch in {} ranges, {} to regenerate from current",
        plan.fetch_bytes,
        plan.fetch_ranges,
        plan.reuse_bytes
    );
    let accounted = remote.received;
    let mut a = Assembler {
        out,
        remote,
        cands,
        proven,
        dir,
        pieces: plan.pieces,
        current,
        part,
        batch: None,
        stats: Stats::default(),
        accounted: (accounted, 0),
        regen: [(0, Duration::ZERO), (0, Duration::ZERO)],
        deflate_guess: deflate_rate.unwrap_or(20e6),
    };
    a.run(job, tuning, sink, prospect)
}

/// Caps on the directory a delta reads (a larger one means a full download): its bytes and
/// its entries' stay well inside the 16 MiB a download may use.
fn delta_limits() -> Limits {
    Limits {
        max_entries: 20_000,
        max_cd_size: 2 << 20,
        ..Limits::default()
    }
}

/// Why a delta cannot finish sooner than the rest whole, even recompressing at rates no
/// device reaches (deflate 300 MB/s, copies 3 GB/s) every entry whose file has its size in
/// `current` (a stat, no read): on a fast link, decided before current's files are read.
fn cannot_win(
    dir: &Directory,
    cands: &[Candidate],
    current: &Path,
    pos: u64,
    size: u64,
    remote: &Remote,
) -> Option<String> {
    let rate = crate::switch::pinned_prefix_rate().or_else(|| remote.link.rate())?;
    let rest = size.saturating_sub(pos) as f64 / rate;
    let mut best = rest;
    for c in cands {
        let e = &dir.entries[c.entry];
        let same = std::fs::symlink_metadata(current.join(&c.local))
            .is_ok_and(|m| m.is_file() && m.len() == e.uncompressed_size);
        if !same {
            continue;
        }
        let regen = e.uncompressed_size as f64
            / pinned_regen_rate().unwrap_or(if e.method == 8 { 300e6 } else { 3e9 });
        let fetch = e.compressed_size as f64 / rate;
        best -= (fetch - regen).max(0.0);
    }
    (best >= rest * 0.95).then(|| {
        format!(
            "at {}/s the rest comes whole in ~{rest:.2} s; recompressing current's files could not save 5 % of it",
            crate::clock::human_rate(rate)
        )
    })
}

struct Assembler<'a> {
    out: Assembly,
    remote: Remote,
    /// The directory's candidates, the view and the calibration, for a prospect if it hands
    /// over.
    cands: Vec<Candidate>,
    proven: crate::switch::Proven,
    dir: Directory,
    pieces: Vec<Piece>,
    current: &'a Path,
    part: &'a Path,
    /// The request whose parts are being read, if any.
    batch: Option<Batch>,
    stats: Stats,
    /// Received and regenerated bytes already handed to the sink's accounts.
    accounted: (u64, u64),
    /// File bytes regenerated into stored and deflated entries, and the time it took.
    regen: [(u64, Duration); 2],
    deflate_guess: f64,
}

impl Assembler<'_> {
    fn run(
        &mut self,
        job: &Job,
        tuning: &Tuning,
        sink: &mut dyn Sink,
        prospect: &mut Option<Prospect>,
    ) -> Result<Option<(Outcome, Stats)>> {
        let mode = job.mode;
        let size = self.remote.size;
        let validator = Some(self.remote.etag.clone());
        let step = (size / 20).max(1);
        let mut next_mark = self.out.len + step;
        let mut k = self
            .pieces
            .iter()
            .position(|p| p.range().1 > self.out.len)
            .unwrap_or(self.pieces.len());
        let mut failures = 0u32;
        let mut delay = tuning.backoff;
        // An attempt that made progress (since the last failure) resets the retry budget.
        let mut at_last_failure = self.out.len;
        let mut decided: Option<Instant> = None;
        while k < self.pieces.len() {
            if sink.stop_requested() {
                return self.stopped(sink, &validator);
            }
            let r = self.piece(k, next_mark);
            self.settle(sink);
            match r {
                Ok(()) => {
                    if self.out.len >= self.pieces[k].range().1 {
                        k += 1;
                    }
                }
                Err(e) => {
                    self.batch = None;
                    if sink.stop_requested() {
                        return self.stopped(sink, &validator);
                    }
                    if e.downcast_ref::<Transient>().is_none() {
                        return Err(self.fatal(e));
                    }
                    if self.out.len > at_last_failure {
                        failures = 0;
                        delay = tuning.backoff;
                    }
                    at_last_failure = self.out.len;
                    failures += 1;
                    self.durable(sink, &validator)?;
                    if failures > tuning.retries {
                        return Err(OtaError::new(
                            ErrorCode::DownloadFailed,
                            format!("{e} (gave up after {failures} attempts)"),
                        )
                        .into());
                    }
                    log::warn!(
                        "delta: {e} at {} of {size} bytes; retrying in {} ms",
                        self.out.len,
                        delay.as_millis()
                    );
                    let until = Instant::now() + delay;
                    while Instant::now() < until {
                        if sink.stop_requested() {
                            return self.stopped(sink, &validator);
                        }
                        std::thread::sleep(Duration::from_millis(50).min(delay));
                    }
                    delay = (delay * 2).min(tuning.backoff_max);
                    continue;
                }
            }
            if self.out.len >= next_mark {
                self.durable(sink, &validator)?;
                crate::failpoint::hit("delta-checkpoint");
                next_mark = self.out.len + step;
            }
            // Decide once the link is measured, and again every few seconds on what the
            // assembly has measured since. A switch back to whole needs a clear margin, and,
            // after the first decision, a steady rate: a new answer's first bytes may come in
            // the server's burst, which the rest whole would not see.
            // A resume (after a kill, a power cut, a stop) is not fresh: its first answer's
            // bytes may be a burst too, and no prefix measured the link before it.
            let first = decided.is_none() && !job.switched && job.resume.offset == 0;
            if mode == Mode::Auto
                && job.may_switch
                && decided.is_none_or(|t| t.elapsed() >= DECIDE_AGAIN)
                && (first || self.remote.link.steady.is_some())
            {
                if let Some((delta, full, why)) = self.estimate(k) {
                    let margin = if first { 1.0 } else { crate::switch::MARGIN };
                    if decided.is_none() {
                        log::info!("delta: {why}");
                    }
                    decided = Some(Instant::now());
                    if delta > full * margin {
                        self.durable(sink, &validator)?;
                        crate::failpoint::hit("delta-switch");
                        log::info!(
                            "no delta from {} of {size} bytes on: {why}; downloading the rest whole, watching the link",
                            self.out.len
                        );
                        let mut p =
                            Prospect::of_plan(&self.dir, &self.cands, &self.pieces, &self.remote);
                        p.deflate = Some(self.deflate_rate());
                        // The first decision is the choice, not a switch back.
                        p.handback = !first;
                        if let Some(k) = p.known.as_mut() {
                            k.proven = Some(self.proven.clone());
                        }
                        *prospect = Some(p);
                        return Ok(None);
                    }
                }
            }
        }
        self.durable(sink, &validator)?;
        self.stats.requests = self.remote.link.requests;
        self.stats.entries = self.dir.entries.len();
        log::info!(
            "delta: {} of {} entries reused from current; {} bytes fetched in {} requests, {} regenerated",
            self.stats.entries_reused,
            self.stats.entries,
            self.remote.received,
            self.stats.requests,
            self.stats.reused
        );
        self.stats.fetched = self.remote.received;
        let hashes = std::mem::take(&mut self.out.hashes);
        let digests: Digests = hashes.finish();
        Ok(Some((Outcome::Complete(digests), self.stats.clone())))
    }

    /// File bytes deflated per second: pinned for the tests, measured once 1 MiB was, else
    /// the calibration's figure.
    fn deflate_rate(&self) -> f64 {
        let (bytes, t) = self.regen[1];
        pinned_regen_rate().unwrap_or(if bytes >= 1 << 20 {
            bytes as f64 / t.as_secs_f64().max(1e-6)
        } else {
            self.deflate_guess
        })
    }

    /// Expected seconds for the rest as a delta and whole, and the figures behind them; `None`
    /// until the link's rate is measured.
    fn estimate(&self, k: usize) -> Option<(f64, f64, String)> {
        let link = self.remote.link.rate()?;
        let rtt = self.remote.link.rtt().unwrap_or_default().as_secs_f64();
        let rate = |(bytes, t): (u64, Duration), guess: f64| {
            if bytes >= 1 << 20 {
                bytes as f64 / t.as_secs_f64().max(1e-6)
            } else {
                guess
            }
        };
        let rates = delta::Rates {
            rtt,
            link,
            deflate: self.deflate_rate(),
            stored: pinned_regen_rate().unwrap_or_else(|| rate(self.regen[0], 200e6)),
        };
        let per_request = if self.remote.multi == Some(false) {
            1
        } else {
            MAX_RANGES_PER_REQUEST
        };
        let (delta, full) = delta::remaining_cost(
            &self.dir,
            &self.pieces[k..],
            self.out.len,
            self.remote.size,
            &rates,
            per_request,
        );
        let why = format!(
            "at {}/s and {:.0} ms a request, deflating {}/s, the rest takes ~{delta:.2} s as a delta, ~{full:.2} s whole",
            crate::clock::human_rate(link),
            rtt * 1000.0,
            crate::clock::human_rate(rates.deflate),
        );
        Some((delta, full, why))
    }

    /// Write the rest of piece `k` (from the assembly's length on); a fetched piece only up to
    /// `mark`, so that a long range is made durable every 5 % too.
    fn piece(&mut self, k: usize, mark: u64) -> Result<()> {
        let pos = self.out.len;
        let (start, end) = self.pieces[k].range();
        debug_assert!(start <= pos && pos < end);
        match &self.pieces[k] {
            Piece::Fetch { .. } => self.fetch(k, pos, end, mark),
            Piece::Header { entry, .. } => {
                let h = delta::regenerate_local_header(&self.dir.entries[*entry]);
                let saved = self.out.hashes.clone();
                // Within the header: pos is in [start, end), and end - start is its length.
                let from = usize::try_from(pos - start).map_or(h.len(), |f| f.min(h.len()));
                if let Err(e) = self.out.write_all(&h[from..]) {
                    // Regenerated bytes are in the partial only when counted as reused.
                    self.out.truncate(pos, saved)?;
                    return Err(anyhow::Error::from(e).context("write a regenerated header"));
                }
                self.stats.reused += end - pos;
                Ok(())
            }
            Piece::Reuse { entry, local, .. } => {
                let e = &self.dir.entries[*entry];
                let method = Method::from_zip(e.method).expect("planned");
                let skip = pos - (end - e.compressed_size);
                let file = self.current.join(local);
                let t = Instant::now();
                if reuse(&mut self.out, method, &file, e.crc32, skip, end - pos)? {
                    let m = usize::from(method == Method::Deflated);
                    self.regen[m].0 += e.uncompressed_size;
                    self.regen[m].1 += t.elapsed();
                    self.stats.reused += end - pos;
                    self.stats.entries_reused += 1;
                    Ok(())
                } else {
                    log::info!("delta: {local} no longer regenerates its entry; fetching it");
                    self.fetch(k, pos, end, end)
                }
            }
        }
    }

    /// Fetch `[pos, end)` of piece `k`, stopping at `mark` if it comes first: the next bytes
    /// of the open request, or a new request for them and the fetched pieces that follow.
    fn fetch(&mut self, k: usize, pos: u64, end: u64, mark: u64) -> Result<()> {
        if self.batch.as_ref().and_then(Batch::next) != Some((pos, end)) {
            let mut ranges = vec![(pos, end)];
            let mut between = 0u64;
            for p in &self.pieces[k + 1..] {
                match p {
                    Piece::Fetch { start, end } => {
                        if ranges.len() == MAX_RANGES_PER_REQUEST || between > MAX_REGEN_IN_BATCH {
                            break;
                        }
                        ranges.push((*start, *end));
                    }
                    Piece::Reuse { entry, .. } => {
                        between += self.dir.entries[*entry].uncompressed_size
                    }
                    Piece::Header { .. } => {}
                }
            }
            self.batch = Some(self.remote.open(&ranges)?);
        }
        let batch = self.batch.as_mut().expect("opened");
        let stop = if mark > pos { end.min(mark) } else { end };
        self.remote.read_next(batch, pos, stop, &mut self.out)?;
        Ok(())
    }

    /// Hand what came and what was regenerated since the last call to the sink.
    fn settle(&mut self, sink: &mut dyn Sink) {
        let fetched = self.remote.received - self.accounted.0;
        let reused = self.stats.reused - self.accounted.1;
        if fetched > 0 || reused > 0 {
            sink.account(fetched, reused);
            self.accounted = (self.remote.received, self.stats.reused);
        }
        sink.tick(self.out.len);
    }

    fn durable(&mut self, sink: &mut dyn Sink, validator: &Option<String>) -> Result<()> {
        fsutil::sync_data(&self.out.file).map_err(|e| self.fatal(e.into()))?;
        sink.checkpoint(self.out.len, validator.as_deref())
    }

    fn stopped(
        &mut self,
        sink: &mut dyn Sink,
        validator: &Option<String>,
    ) -> Result<Option<(Outcome, Stats)>> {
        self.durable(sink, validator)?;
        Ok(Some((
            Outcome::Stopped {
                durable: self.out.len,
            },
            self.stats.clone(),
        )))
    }

    fn fatal(&self, e: anyhow::Error) -> anyhow::Error {
        local_failure(self.part, e)
    }
}

/// A local failure of the assembly into `part`: out of space is `DISK_FULL`, as for a full
/// download; any other I/O error names the partial.
fn local_failure(part: &Path, e: anyhow::Error) -> anyhow::Error {
    if e.chain().any(|c| c.is::<OtaError>()) {
        return e;
    }
    let mut io = e.chain().filter_map(|c| c.downcast_ref::<io::Error>());
    let Some(first) = io.next() else {
        return e;
    };
    let full = crate::error::is_disk_full(first) || io.any(crate::error::is_disk_full);
    let e = e.context(format!("assemble {}", part.display()));
    if full {
        OtaError::new(ErrorCode::DiskFull, format!("{e:#}")).into()
    } else {
        e
    }
}

/// How often the decision is taken again on what the assembly measured: soon enough to follow
/// a link that changes, and a switch back needs a steady rate and a margin besides.
const DECIDE_AGAIN: Duration = Duration::from_millis(500);
