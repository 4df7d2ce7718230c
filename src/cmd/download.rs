//! `download`: fetch a package into `downloads/`, verify size and MD5, stage `toInstall`.

use crate::assemble as delta;
use crate::cli::{DownloadArgs, Global};
use crate::error::{self, fail, ErrorCode, OtaError, EXIT_SIGINT, EXIT_SIGTERM};
use crate::fetch::{self, Outcome, Sink, Tuning};
use crate::fsutil::{self, TEMP_PREFIX};
use crate::lock::Purpose;
use crate::operation::Operation;
use crate::output::Output;
use crate::progress::Bar;
use crate::state::{Stage, DOWNLOADS_DIR};
use crate::{clock, validate};
use crate::{sign, signals};
use anyhow::{Context, Result};
use serde::Deserialize;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// A download request: the API's body, field for field.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Package {
    pub version: String,
    pub package_url: String,
    pub package_name: String,
    pub package_size: u64,
    pub package_md5: String,
    /// Optional: checked beside the MD5 when given (old requests omit it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_sha256: Option<String>,
    /// Optional: where the detached signature is (default `<package_url>.minisig`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_sig_url: Option<String>,
    /// `download --full`: no delta (not part of the API's body).
    #[serde(skip)]
    pub full: bool,
}

impl Package {
    /// Build from flags or `--request`, then validate. Every refusal is `INVALID_REQUEST`.
    pub fn from_args(args: &DownloadArgs) -> Result<Package> {
        let pkg = match &args.request {
            Some(src) => {
                let bytes = read_request(src)?;
                let mut p = serde_json::from_slice::<Package>(&bytes).map_err(|e| {
                    OtaError::new(ErrorCode::InvalidRequest, format!("request body: {e}"))
                })?;
                p.full = args.full;
                p
            }
            None => Package {
                version: args.version.clone().unwrap_or_default(),
                package_url: args.url.clone().unwrap_or_default(),
                package_name: args.name.clone().unwrap_or_default(),
                package_size: args.size.unwrap_or(0),
                package_md5: args.md5.clone().unwrap_or_default(),
                package_sha256: args.sha256.clone(),
                package_sig_url: args.sig_url.clone(),
                full: args.full,
            },
        };
        pkg.validated()
    }

    /// Check every field; the MD5 is normalized to lowercase.
    pub fn validated(mut self) -> Result<Package> {
        validate::version(&self.version)?;
        validate::file_name(&self.package_name)?;
        validate::url(&self.package_url)?;
        if self.package_size == 0 {
            return fail(ErrorCode::InvalidRequest, "package_size must be > 0");
        }
        self.package_md5 = validate::md5(&self.package_md5)?;
        if let Some(sha) = &self.package_sha256 {
            self.package_sha256 = Some(validate::sha256(sha)?);
        }
        if let Some(u) = &self.package_sig_url {
            validate::url(u)?;
        }
        Ok(self)
    }
}

fn read_request(src: &str) -> Result<Vec<u8>> {
    const MAX: u64 = 64 * 1024;
    let mut bytes = Vec::new();
    let read = if src == "-" {
        std::io::stdin().take(MAX + 1).read_to_end(&mut bytes)
    } else {
        File::open(src).and_then(|f| f.take(MAX + 1).read_to_end(&mut bytes))
    };
    if let Err(e) = read {
        return fail(
            ErrorCode::InvalidRequest,
            format!("read request {src}: {e}"),
        );
    }
    if bytes.len() as u64 > MAX {
        return fail(ErrorCode::InvalidRequest, "request body over 64 KiB");
    }
    Ok(bytes)
}

struct Files {
    dir: PathBuf,
    part: PathBuf,
    done: PathBuf,
}

fn files(state_dir: &Path, name: &str) -> Files {
    let dir = state_dir.join(DOWNLOADS_DIR);
    Files {
        part: dir.join(format!("{name}.part")),
        done: dir.join(name),
        dir,
    }
}

/// Remove everything in downloads/ but the files of `keep` (and the temp files, swept apart).
fn discard_others(dir: &Path, keep: &str) -> Result<()> {
    let keep_part = format!("{keep}.part");
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("read dir {}", dir.display())),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == keep || name == keep_part || name.starts_with(TEMP_PREFIX) {
            continue;
        }
        log::info!(
            "discarding {} of an earlier package",
            entry.path().display()
        );
        fsutil::remove_file_durable(&entry.path())?;
    }
    Ok(())
}

struct StateSink<'a> {
    op: &'a mut Operation,
    bar: &'a Bar,
    size: u64,
    /// Where this run started and when, for the rate and the time left.
    start: (u64, std::time::Instant),
    /// Bytes regenerated since the last checkpoint: they count as reused once durable, so a
    /// failure recorded between two checkpoints does not count what a resume regenerates again.
    reused_pending: u64,
    /// A whole download that may switch to a delta watches the link.
    watch: Option<crate::switch::Watcher>,
}

/// Bytes per second, for people: a float's `as` saturates.
#[allow(clippy::cast_possible_truncation)]
fn speed_of(bytes: u64, secs: f64) -> u64 {
    (bytes as f64 / secs) as u64
}

impl StateSink<'_> {
    /// `Downloading 47.2 MB / 104.9 MB at 2.1 MB/s, 27 s left`, and the figures behind it.
    fn figures(&self, done: u64) -> (u64, Option<u64>, String) {
        let secs = self.start.1.elapsed().as_secs_f64();
        let speed = if secs > 0.05 {
            speed_of(done.saturating_sub(self.start.0), secs)
        } else {
            0
        };
        let eta = (speed > 0).then(|| (self.size - done.min(self.size)).div_ceil(speed));
        let mut msg = format!(
            "Downloading {} / {}",
            clock::human_bytes(done),
            clock::human_bytes(self.size)
        );
        if speed > 0 {
            msg.push_str(&format!(" at {}/s", clock::human_bytes(speed)));
        }
        if let Some(e) = eta {
            msg.push_str(&format!(", {e} s left"));
        }
        (speed, eta, msg)
    }
}

impl Sink for StateSink<'_> {
    fn checkpoint(&mut self, durable: u64, validator: Option<&str>) -> Result<()> {
        let s = &mut self.op.state;
        // Regenerated bytes count only while they are in the partial.
        if durable == 0 {
            s.bytes_reused = 0;
        } else {
            s.bytes_reused += self.reused_pending;
        }
        self.reused_pending = 0;
        if durable > s.bytes_downloaded {
            s.progressed_at = Some(clock::now_rfc3339());
        }
        s.bytes_downloaded = durable;
        s.resume_validator = validator.map(str::to_string);
        s.progress = fetch::percent(durable, self.size);
        let (speed, eta, msg) = self.figures(durable);
        let s = &mut self.op.state;
        s.bytes_done = durable;
        s.bytes_total = self.size;
        s.speed_bps = speed;
        s.eta_s = eta;
        s.message = msg;
        self.op.commit()
    }

    fn tick(&mut self, received: u64) {
        self.bar.set(received);
    }

    fn account(&mut self, fetched: u64, reused: u64) {
        self.op.state.bytes_fetched += fetched;
        self.reused_pending += reused;
    }

    fn stop_requested(&self) -> bool {
        signals::stop_requested().is_some()
    }

    fn discard_uncommitted(&mut self) {
        self.reused_pending = 0;
    }

    fn streaming(&mut self, pos: u64) {
        if let Some(w) = self.watch.as_mut() {
            w.streaming(pos);
        }
    }

    fn handover(&mut self, received: u64) -> bool {
        self.watch.as_mut().is_some_and(|w| w.received(received))
    }
}

/// Remove the partial and record that nothing of it is left.
fn drop_partial(op: &mut Operation, part: &Path) -> Result<()> {
    fsutil::remove_file_durable(part)?;
    let s = &mut op.state;
    s.bytes_downloaded = 0;
    s.resume_validator = None;
    s.bytes_reused = 0;
    Ok(())
}

/// The package into `part` from `resume` on: by a delta first where `mode` allows, then by a
/// plain download of what the delta left (all of it when none was possible). In `auto` the
/// two hand over to each other as the link's rate makes the other way pay, at most
/// [`crate::switch::MAX_SWITCHES`] times, each time from the bytes already durable.
fn obtain(
    g: &Global,
    pkg: &Package,
    part: &Path,
    resume: &delta::Resume,
    mode: delta::Mode,
    tuning: &Tuning,
    sink: &mut StateSink,
) -> Result<Outcome> {
    let mut resume = resume.clone();
    let mut switches = 0u32;
    let mut switched = false;
    let mut known: Option<crate::switch::Known> = None;
    loop {
        let mut prospect: Option<crate::switch::Prospect> = None;
        let may_switch = mode == delta::Mode::Auto && switches < crate::switch::MAX_SWITCHES;
        if mode != delta::Mode::Never {
            let current = g.versions_dir.join(crate::snapshot::CURRENT);
            let job = delta::Job {
                part,
                url: &pkg.package_url,
                size: pkg.package_size,
                sha256: pkg.package_sha256.is_some(),
                current: &current,
                resume,
                mode,
                switched,
                may_switch,
                known: known.as_ref(),
            };
            let got = delta::delta_download(&job, tuning, sink, &mut prospect)?;
            if let Some((outcome, _)) = got {
                return Ok(outcome);
            }
            resume = delta::Resume {
                offset: sink.op.state.bytes_downloaded,
                validator: sink.op.state.resume_validator.clone(),
            };
            if prospect.as_ref().is_some_and(|p| p.handback) {
                switches += 1;
            }
        }
        // The whole download goes on over the delta's connection, when it left one.
        let agent = prospect
            .as_mut()
            .and_then(|p| p.agent.take())
            .unwrap_or_else(|| fetch::agent(tuning));
        sink.watch = prospect
            .filter(|_| switches < crate::switch::MAX_SWITCHES)
            .map(crate::switch::Watcher::new);
        let req = fetch::Request {
            url: &pkg.package_url,
            size: pkg.package_size,
            offset: resume.offset,
            validator: resume.validator.clone(),
            sha256: pkg.package_sha256.is_some(),
        };
        let fetched = fetch::fetch_over(agent, part, req, tuning, sink);
        let (why, p) = match sink.watch.take() {
            Some(mut w) => (w.why.take(), Some(w.into_prospect())),
            None => (None, None),
        };
        let outcome = fetched?;
        let (Outcome::Stopped { durable }, Some(why)) = (&outcome, why) else {
            return Ok(outcome);
        };
        // What was read of the package holds only while the partial was fetched under the same
        // ETag: a whole download that started over on a changed package makes the delta probe
        // afresh (and keep the partial) instead of dropping it for the old ETag's sake.
        known = p
            .and_then(|p| p.known)
            .filter(|k| sink.op.state.resume_validator.as_deref() == Some(k.etag.as_str()));
        if sink.stop_requested() {
            return Ok(outcome);
        }
        crate::failpoint::hit("delta-switch");
        log::info!("{why}");
        switches += 1;
        switched = true;
        resume = delta::Resume {
            offset: *durable,
            validator: sink.op.state.resume_validator.clone(),
        };
    }
}

fn output(op: &Operation, human: String, exit: i32) -> Result<Output> {
    Ok(if exit == 0 {
        Output::success(human, op.state.progress_data())
    } else {
        Output::interrupted(human.trim_end(), op.state.progress_data(), exit)
    })
}

/// What a writer downloading `version` says it holds the lock for: `serve` tells another
/// writer's download of the same package by it.
pub fn activity(version: &str) -> String {
    format!("a download of {version}")
}

pub fn run(g: &Global, args: &DownloadArgs) -> Result<Output> {
    let pkg = Package::from_args(args)?;
    let purpose = Purpose::long("download", activity(&pkg.version));
    let mut op = Operation::begin(g, &purpose)?;
    let result = download(g, &pkg, &mut op);
    op.finish();
    result
}

/// Whether `s` describes `pkg` (a validated package): the same url, version, name, size, MD5
/// and SHA-256, so a download of it resumes or keeps what is on disk.
pub fn is_same_package(s: &crate::state::State, pkg: &Package) -> bool {
    s.version.as_deref() == Some(&pkg.version)
        && s.package_url.as_deref() == Some(&pkg.package_url)
        && s.package_md5.as_deref() == Some(&pkg.package_md5)
        && s.package_name.as_deref() == Some(&pkg.package_name)
        && s.package_size == Some(pkg.package_size)
        && s.package_sha256 == pkg.package_sha256
}

/// The download itself, under a writer's lock; heal calls it to resume one. A failure that
/// the steps below did not record themselves is recorded here, so state.json, the callbacks and
/// the exit code always agree.
pub fn download(g: &Global, pkg: &Package, op: &mut Operation) -> Result<Output> {
    let result = download_steps(g, pkg, op);
    if let Err(e) = &result {
        if matches!(op.state.stage, Stage::Downloading | Stage::Verifying) {
            let err = error::classify(e);
            if let Err(e2) = op.fail(&err) {
                log::error!("could not record {}: {e2:#}", err.message());
            }
        }
    }
    result
}

fn download_steps(g: &Global, pkg: &Package, op: &mut Operation) -> Result<Output> {
    if matches!(op.state.stage, Stage::Installing | Stage::Rebooting) {
        return fail(
            ErrorCode::Busy,
            format!(
                "an install of {} is in flight (stage {}); run `tope-ota heal` first",
                op.state.version.as_deref().unwrap_or("?"),
                op.state.stage
            ),
        );
    }
    let f = files(&g.state_dir, &pkg.package_name);
    fsutil::ensure_dir(&f.dir)?;
    fsutil::sweep_temp(&f.dir)?;
    let same = is_same_package(&op.state, pkg);

    // The same package already renamed into place (verified, or a crash came between the rename
    // and the state write): check it is still whole and keep it.
    let settled = matches!(
        op.state.stage,
        Stage::ToInstall | Stage::Downloading | Stage::Verifying
    );
    if same && settled && f.done.exists() {
        let d = fetch::file_digests(&f.done, pkg.package_sha256.is_some())?;
        if d.md5 == pkg.package_md5 && d.sha256 == pkg.package_sha256 {
            if op.state.stage != Stage::ToInstall {
                fsutil::remove_file_durable(&f.part)?;
                op.state.stage = Stage::ToInstall;
                op.state.error = None;
                op.state.progress = 100;
                op.state.bytes_downloaded = pkg.package_size;
                op.state.verified_at = Some(clock::now_rfc3339());
                op.state.message = format!("Package {} verified; ready to install", pkg.version);
                op.commit()?;
            }
            return output(
                op,
                format!(
                    "{} {} is already downloaded and verified; ready to install\n",
                    pkg.package_name, pkg.version
                ),
                0,
            );
        }
        log::warn!(
            "{} no longer matches its MD5; downloading again",
            f.done.display()
        );
    }
    let resumable = same
        && matches!(
            op.state.stage,
            Stage::Downloading | Stage::Verifying | Stage::Failed
        );
    let offset = if resumable && f.part.exists() {
        op.state.bytes_downloaded.min(pkg.package_size)
    } else {
        0
    };
    let validator = if offset > 0 {
        op.state.resume_validator.clone()
    } else {
        None
    };

    let st = &mut op.state;
    st.stage = Stage::Downloading;
    st.error = None;
    st.version = Some(pkg.version.clone());
    st.package_url = Some(pkg.package_url.clone());
    st.package_name = Some(pkg.package_name.clone());
    st.package_size = Some(pkg.package_size);
    st.package_md5 = Some(pkg.package_md5.clone());
    st.package_sha256 = pkg.package_sha256.clone();
    st.package_sig_url = pkg.package_sig_url.clone();
    st.package_signed_by = None;
    st.bytes_downloaded = offset;
    st.delta_off = pkg.full || (resumable && st.delta_off);
    if offset == 0 {
        st.bytes_fetched = 0;
        st.bytes_reused = 0;
    }
    // A resume that fetches nothing (no network yet at boot) does not restart the 24 h clock.
    if offset == 0 || st.progressed_at.is_none() {
        st.progressed_at = Some(clock::now_rfc3339());
    }
    st.resume_validator = validator.clone();
    st.progress = fetch::percent(offset, pkg.package_size);
    st.verified_at = None;
    st.step = None;
    st.bytes_done = offset;
    st.bytes_total = pkg.package_size;
    st.speed_bps = 0;
    st.eta_s = None;
    st.message = format!(
        "{} {} / {}",
        if offset > 0 {
            "Resuming at"
        } else {
            "Downloading"
        },
        clock::human_bytes(offset),
        clock::human_bytes(pkg.package_size)
    );

    // The state names the new package before any file of the old one goes.
    op.commit()?;
    discard_others(&f.dir, &pkg.package_name)?;
    fsutil::remove_file_durable(&f.done)?;
    if offset == 0 {
        fsutil::remove_file_durable(&f.part)?;
    }

    let need = pkg.package_size - offset;
    let free = fsutil::free_bytes(&f.dir)?;
    if free < need {
        drop_partial(op, &f.part)?;
        let err = OtaError::new(
            ErrorCode::DiskFull,
            format!("{need} bytes needed in {}, {free} free", f.dir.display()),
        );
        op.fail(&err)?;
        return Err(err.into());
    }
    log::info!(
        "downloading {} ({} bytes) from {}{}",
        pkg.package_name,
        pkg.package_size,
        pkg.package_url,
        if offset > 0 {
            format!(", resuming at {offset}")
        } else {
            String::new()
        }
    );

    let bar = Bar::bytes(pkg.package_size, g.json, g.quiet);
    let tuning = Tuning::from_env();
    let mut mode = if pkg.full {
        log::info!("no delta: --full");
        delta::Mode::Never
    } else if op.state.delta_off {
        log::info!("no delta: this package is being downloaded whole (--full, or an assembly that failed its hashes)");
        delta::Mode::Never
    } else {
        delta::Mode::from_env()
    };
    if mode == delta::Mode::Never && !pkg.full && !op.state.delta_off {
        log::info!("no delta: TOPE_OTA_DELTA=never");
    }
    let mut resume = delta::Resume { offset, validator };
    let digests = loop {
        bar.set(resume.offset);
        let fetched = {
            let mut sink = StateSink {
                op,
                bar: &bar,
                size: pkg.package_size,
                start: (resume.offset, std::time::Instant::now()),
                reused_pending: 0,
                watch: None,
            };
            obtain(g, pkg, &f.part, &resume, mode, &tuning, &mut sink)
        };
        let digests = match fetched {
            Ok(Outcome::Complete(d)) => d,
            Ok(Outcome::Stopped { durable }) => {
                bar.finish();
                let sig = signals::stop_requested().unwrap_or(libc::SIGTERM);
                op.state.message = format!(
                    "Interrupted at {durable} of {} bytes; the next download or heal resumes it",
                    pkg.package_size
                );
                op.commit()?;
                log::warn!("{}", op.state.message);
                let exit = if sig == libc::SIGINT {
                    EXIT_SIGINT
                } else {
                    EXIT_SIGTERM
                };
                return output(op, format!("{}\n", op.state.message), exit);
            }
            Err(e) => {
                bar.finish();
                let err = error::classify(&e);
                // A partial that cannot become the package, or that fills the disk, goes; one
                // cut short by the network stays for the next attempt to resume.
                if matches!(
                    err.code,
                    ErrorCode::DiskFull | ErrorCode::PackageSizeMismatch
                ) {
                    drop_partial(op, &f.part)?;
                }
                op.fail(&err)?;
                return Err(e);
            }
        };

        op.state.stage = Stage::Verifying;
        op.state.message = if pkg.package_sha256.is_some() {
            "Verifying size, MD5 and SHA-256".into()
        } else {
            "Verifying size and MD5".into()
        };
        op.commit()?;
        let sha_bad = match (&pkg.package_sha256, &digests.sha256) {
            (Some(want), Some(got)) => (want != got).then(|| (want.clone(), got.clone())),
            _ => None,
        };
        let mismatch = if digests.md5 != pkg.package_md5 {
            Some((
                ErrorCode::Md5Mismatch,
                pkg.package_md5.clone(),
                digests.md5.clone(),
            ))
        } else {
            sha_bad.map(|(want, got)| (ErrorCode::Sha256Mismatch, want, got))
        };
        let Some((code, want, got)) = mismatch else {
            break digests;
        };
        let assembled = op.state.bytes_reused > 0;
        drop_partial(op, &f.part)?;
        // Bytes regenerated from current may be what differs (a file changed under the same
        // CRC-32, a compressor that is not the package's): the package whole, once.
        if assembled {
            log::warn!(
                "delta: the assembled package does not match its {} (expected {want}, got {got}); downloading it whole",
                if code == ErrorCode::Md5Mismatch {
                    "MD5"
                } else {
                    "SHA-256"
                }
            );
            op.state.stage = Stage::Downloading;
            op.state.delta_off = true;
            op.state.message = "Downloading the package whole".into();
            op.commit()?;
            mode = delta::Mode::Never;
            resume = delta::Resume::default();
            continue;
        }
        bar.finish();
        let err = OtaError::new(
            code,
            format!("expected {want}, got {got}; the file was deleted"),
        );
        op.fail(&err)?;
        return Err(err.into());
    };
    bar.finish();
    let keys = match sign::load_keys(&g.keys_dir) {
        Ok(k) => k,
        Err(err) => {
            op.fail(&err)?;
            return Err(err.into());
        }
    };
    if !keys.is_empty() {
        op.state.message = format!(
            "Verifying the signature against {} trusted key(s)",
            keys.len()
        );
        op.commit()?;
        let sig_url = pkg
            .package_sig_url
            .clone()
            .unwrap_or_else(|| format!("{}.minisig", pkg.package_url));
        let signed =
            sign::fetch_signature(&sig_url).and_then(|s| sign::verify_file(&f.part, &s, &keys));
        match signed {
            Ok(key) => {
                log::info!("{} is signed by {key}", pkg.package_name);
                op.state.package_signed_by = Some(key);
            }
            Err(err) => {
                // A signature that could not be fetched says nothing against the package: keep
                // it (whole and hash-verified) for the next attempt, as DOWNLOAD_FAILED does.
                if err.code != ErrorCode::DownloadFailed {
                    drop_partial(op, &f.part)?;
                }
                op.fail(&err)?;
                return Err(err.into());
            }
        }
    }
    crate::failpoint::hit("download-before-rename");
    fsutil::rename_durable(&f.part, &f.done)?;
    crate::failpoint::hit("download-after-rename");
    op.state.stage = Stage::ToInstall;
    op.state.progress = 100;
    op.state.verified_at = Some(clock::now_rfc3339());
    op.state.message = format!("Package {} verified; ready to install", pkg.version);
    op.commit()?;
    log::info!("{} verified (md5 {})", f.done.display(), digests.md5);
    output(
        op,
        format!(
            "downloaded {} ({} bytes), MD5 verified; version {} is ready to install\n",
            pkg.package_name, pkg.package_size, pkg.version
        ),
        0,
    )
}
