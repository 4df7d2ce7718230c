//! `state.json`: the one operation in flight (SPEC section 3).
//!
//! Readers call [`read`] and take no lock. Writers hold a [`StateLock`] and go through
//! [`load_for_write`] and [`State::save`], which is the only code that writes the file.

use crate::clock;
use crate::error::ErrorCode;
use crate::fsutil;
use crate::lock::StateLock;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// File name of the state inside the state dir.
pub const STATE_FILE: &str = "state.json";
/// Sub-directory of the state dir holding partial and verified packages.
pub const DOWNLOADS_DIR: &str = "downloads";

/// A verified package may be installed for this long after `verified_at`.
pub const PACKAGE_TTL_SECS: i64 = 24 * 3600;

/// The schema of state.json this build reads and writes. 1 is the core schema, frozen: every
/// version can read it and roll back from it, so a later build keeps writing 1 and only adds
/// fields (unknown fields are ignored, missing ones take defaults). A build that must change
/// what a field means, or write a stage or an error code an older build does not know, writes a
/// higher number; an older build (from this one on) then refuses to act on the file
/// (`SCHEMA_TOO_NEW`) and leaves it as it is, instead of misreading it or moving it aside as
/// corrupt. A file without the field (written before schemas existed) is schema 1.
pub const SCHEMA: u64 = 1;

/// A record's `schema`: [`SCHEMA`] by default, so a record without one is the core schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Schema(pub u64);

impl Default for Schema {
    fn default() -> Schema {
        Schema(SCHEMA)
    }
}

/// What a JSON record declares about its schema, read before anything else of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declared {
    /// Not one JSON object with at most one whole-number `schema` (an array, garbage, a
    /// duplicated or non-integer `schema`): corrupt, whatever else it holds.
    Malformed,
    /// The schema, the core one when the field is missing.
    Schema(u64),
}

impl Declared {
    /// The declared schema when it is newer than `max`.
    pub fn newer_than(self, max: u64) -> Option<u64> {
        match self {
            Declared::Schema(n) if n > max => Some(n),
            _ => None,
        }
    }
}

/// Read only the `schema` of a JSON record, skipping the rest without building it.
pub fn declared_schema(bytes: &[u8]) -> Declared {
    #[derive(Deserialize)]
    struct Head {
        schema: Option<u64>,
    }
    // An object only: serde's derived structs would also take a JSON array.
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Declared::Malformed;
    }
    match serde_json::from_slice::<Head>(bytes) {
        Ok(h) => Declared::Schema(h.schema.unwrap_or(SCHEMA)),
        Err(_) => Declared::Malformed,
    }
}

/// The stage of the operation in flight; serialized as the old API spelled it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum Stage {
    #[default]
    Idle,
    Downloading,
    Verifying,
    ToInstall,
    Installing,
    Rebooting,
    Success,
    Failed,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Idle => "idle",
            Stage::Downloading => "downloading",
            Stage::Verifying => "verifying",
            Stage::ToInstall => "toInstall",
            Stage::Installing => "installing",
            Stage::Rebooting => "rebooting",
            Stage::Success => "success",
            Stage::Failed => "failed",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything SPEC section 3 keeps about the operation in flight. Unknown fields written by a
/// newer build are ignored and missing ones take defaults, so a downgrade never makes it unparsable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct State {
    /// See [`SCHEMA`]; every save writes this build's.
    pub schema: Schema,
    pub stage: Stage,
    pub progress: u8,
    pub message: String,
    pub error: Option<ErrorCode>,
    pub version: Option<String>,
    pub package_url: Option<String>,
    pub package_name: Option<String>,
    pub package_size: Option<u64>,
    pub package_md5: Option<String>,
    pub package_sha256: Option<String>,
    pub package_sig_url: Option<String>,
    /// The trusted key the package's signature verified against (None: unsigned, or no keys):
    /// with keys configured, only a signed package's updater is ever run.
    pub package_signed_by: Option<String>,
    /// Bytes of the partial that are known durable (fsynced before this was written).
    pub bytes_downloaded: u64,
    /// Rich progress of the running step: bytes done of bytes total, the rate this run has
    /// reached, and the seconds it has left at that rate.
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub speed_bps: u64,
    pub eta_s: Option<u64>,
    /// ETag or Last-Modified of the first response, sent back as `If-Range` when resuming.
    pub resume_validator: Option<String>,
    /// Of the package downloaded (or being downloaded): bytes received from the server, every
    /// request and resume counted, and bytes of the partial regenerated from `current` by a
    /// delta (issue #15). A full download reuses nothing.
    pub bytes_fetched: u64,
    pub bytes_reused: u64,
    /// No delta for this package's download, resumes and heals included: `download --full`
    /// asked for it, or an assembled package failed its hashes and is being fetched whole.
    pub delta_off: bool,
    pub verified_at: Option<String>,
    pub updated_at: Option<String>,
    /// The version `current` pointed to when the install started (for rollback).
    pub previous_version: Option<String>,
    /// The install step reached, recorded before each irreversible action.
    pub step: Option<String>,
    /// What `previous` pointed to before the install switched it (restored by a rollback).
    pub previous_before: Option<String>,
    /// The services the install or rollback stops and starts, in start order.
    pub services: Vec<crate::services::Service>,
    /// The detail of the failure that started an automatic rollback (its code is `error`).
    pub rollback_cause: Option<String>,
    /// After an automatic rollback: the level that held (`previous <v>`, `factory <v>`) or
    /// `failed`.
    pub rollback: Option<String>,
    /// The snapshot dir the operation switches `current` to.
    pub target: Option<String>,
    /// The snapshot dir `current` pointed to when the operation began.
    pub from: Option<String>,
    /// The snapshot dir `previous` pointed to when the operation began.
    pub previous_from: Option<String>,
    /// The latest time a download made durable progress (RFC 3339): a kept partial may be
    /// resumed until 24 h after it.
    pub progressed_at: Option<String>,
    /// Counts the stage changes the writers committed (each operation's first commit, and every
    /// later change of stage, error or version): what tells a repeated outcome (the same failure
    /// again, a reinstall's success) from the one device-api already received.
    pub stage_seq: u64,
}

/// The `data` object of `GET /progress` and of `status --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressData {
    pub stage: Stage,
    pub progress: u8,
    pub message: String,
    pub error: Option<ErrorCode>,
    // Additions to the old API's four fields; old clients ignore them.
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub speed_bps: u64,
    pub eta_s: Option<u64>,
    pub step: Option<String>,
    pub bytes_fetched: u64,
    pub bytes_reused: u64,
}

impl State {
    /// A committed success: of the install of `version`, or of a rollback to it.
    pub fn mark_success(&mut self, installing: bool, version: &str) {
        self.stage = Stage::Success;
        self.step = None;
        self.progress = 100;
        self.message = if installing {
            format!("Installed version {version}")
        } else {
            format!(
                "Rolled back to {version}; previous is now {}",
                self.previous_version.as_deref().unwrap_or("-")
            )
        };
    }

    /// The snapshot dir being switched to (older state files name only the version).
    pub fn target_dir(&self) -> Option<String> {
        self.target
            .clone()
            .or_else(|| self.version.as_deref().map(crate::snapshot::dir_name))
    }

    /// The snapshot dir that was current when the operation began.
    pub fn from_dir(&self) -> Option<String> {
        self.from.clone().or_else(|| {
            self.previous_version
                .as_deref()
                .map(crate::snapshot::dir_name)
        })
    }

    /// The snapshot dir that `previous` pointed to when the operation began.
    pub fn previous_dir(&self) -> Option<String> {
        self.previous_from.clone().or_else(|| {
            self.previous_before
                .as_deref()
                .map(crate::snapshot::dir_name)
        })
    }

    pub fn progress_data(&self) -> ProgressData {
        ProgressData {
            stage: self.stage,
            progress: self.progress,
            message: self.message.clone(),
            error: self.error,
            bytes_done: self.bytes_done,
            bytes_total: self.bytes_total,
            speed_bps: self.speed_bps,
            eta_s: self.eta_s,
            step: self.step.clone(),
            bytes_fetched: self.bytes_fetched,
            bytes_reused: self.bytes_reused,
        }
    }

    /// Write this state atomically and durably; only a lock holder can.
    pub fn save(&mut self, lock: &StateLock) -> Result<()> {
        self.schema = Schema(SCHEMA);
        self.updated_at = Some(clock::now_rfc3339());
        let mut bytes = serde_json::to_vec_pretty(self).context("encode state")?;
        bytes.push(b'\n');
        fsutil::write_atomic(&state_path(lock.dir()), &bytes)
    }
}

pub fn state_path(state_dir: &Path) -> PathBuf {
    state_dir.join(STATE_FILE)
}

/// What a reader found.
#[derive(Debug)]
pub enum ReadOutcome {
    /// No state.json yet: the device is idle.
    Missing,
    Ok(Box<State>),
    /// The file exists but does not parse; a writer will move it aside.
    Corrupt(String),
}

/// `SCHEMA_TOO_NEW` for a record at `path` of schema `found` when this build reads `max`.
pub fn too_new(path: &Path, found: u64, max: u64) -> anyhow::Error {
    crate::error::OtaError::new(
        ErrorCode::SchemaTooNew,
        format!(
            "{} has schema {found}; tope-ota {} reads schema {max} at most and leaves it as it is: \
             run the newer tope-ota that wrote it, or move the file aside to let this one act \
             (losing what it records)",
            path.display(),
            crate::version::version(),
        ),
    )
    .into()
}

/// Read state.json without a lock. Safe against concurrent writers: renames are atomic. A
/// state.json of a newer schema is `SCHEMA_TOO_NEW`, for readers and writers alike.
pub fn read(state_dir: &Path) -> Result<ReadOutcome> {
    let path = state_path(state_dir);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ReadOutcome::Missing),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    match declared_schema(&bytes) {
        Declared::Schema(n) if n > SCHEMA => return Err(too_new(&path, n, SCHEMA)),
        Declared::Schema(_) => {}
        Declared::Malformed => {
            let why = match serde_json::from_slice::<serde_json::Value>(&bytes) {
                Err(e) => e.to_string(),
                Ok(_) => "not one JSON object with a whole-number schema".to_string(),
            };
            return Ok(ReadOutcome::Corrupt(why));
        }
    }
    Ok(match serde_json::from_slice::<State>(&bytes) {
        Ok(s) => ReadOutcome::Ok(Box::new(s)),
        Err(e) => ReadOutcome::Corrupt(e.to_string()),
    })
}

/// Load the state for a writer. A state.json that does not parse is moved aside as
/// `state.json.corrupt-<timestamp>` (kept for diagnosis) and replaced by idle, with a warning.
/// The flag is true when the file was corrupt.
pub fn load_for_write(lock: &StateLock) -> Result<(State, bool)> {
    match read(lock.dir())? {
        ReadOutcome::Missing => Ok((State::default(), false)),
        ReadOutcome::Ok(s) => Ok((*s, false)),
        ReadOutcome::Corrupt(why) => {
            let path = state_path(lock.dir());
            let aside = lock
                .dir()
                .join(format!("{STATE_FILE}.corrupt-{}", clock::now_rfc3339()));
            log::warn!(
                "{} does not parse ({why}); moved aside to {} and reset to idle",
                path.display(),
                aside.display()
            );
            fsutil::rename_durable(&path, &aside)?;
            let mut s = State {
                message: format!(
                    "state.json was corrupt and was moved aside to {}",
                    aside.display()
                ),
                ..State::default()
            };
            s.save(lock)?;
            Ok((s, true))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_spelling() {
        assert_eq!(
            serde_json::to_string(&Stage::ToInstall).unwrap(),
            "\"toInstall\""
        );
        for s in [Stage::Idle, Stage::Downloading, Stage::Rebooting] {
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
    }

    #[test]
    fn unknown_and_missing_fields_parse() {
        let s: State = serde_json::from_str(r#"{"stage":"failed","future":1}"#).unwrap();
        assert_eq!(s.stage, Stage::Failed);
        assert_eq!(s.progress, 0);
    }

    #[test]
    fn schema_is_declared_or_core() {
        use Declared::*;
        assert_eq!(declared_schema(br#"{"stage":"idle"}"#), Schema(1));
        assert_eq!(declared_schema(br#" {"schema":2,"stage":"??"}"#), Schema(2));
        for bad in [
            &br#"{"schema":"2"}"#[..],
            br#"{"schema":1e30}"#,
            br#"{"schema":-1}"#,
            br#"{"schema":1.5}"#,
            br#"{"schema":1,"schema":2}"#,
            b"{not json",
            b"[2,\"installing\"]",
            b"",
        ] {
            assert_eq!(
                declared_schema(bad),
                Malformed,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn an_array_or_a_bad_schema_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [
            &b"[2,\"installing\"]"[..],
            br#"{"schema":"x","stage":"idle"}"#,
        ] {
            fs::write(dir.path().join(STATE_FILE), bad).unwrap();
            assert!(matches!(read(dir.path()).unwrap(), ReadOutcome::Corrupt(_)));
        }
        // Schema 1 with a stage this build does not know: corrupt, as it always was.
        fs::write(
            dir.path().join(STATE_FILE),
            br#"{"schema":1,"stage":"swapping"}"#,
        )
        .unwrap();
        assert!(matches!(read(dir.path()).unwrap(), ReadOutcome::Corrupt(_)));
    }

    #[test]
    fn a_newer_schema_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let newer = br#"{"schema":2,"stage":"swapping","error":"NEW_CODE"}"#;
        fs::write(dir.path().join(STATE_FILE), newer).unwrap();
        let e = read(dir.path()).unwrap_err();
        assert_eq!(crate::error::classify(&e).code, ErrorCode::SchemaTooNew);
        let purpose = crate::lock::Purpose::brief("test", "loading the state");
        let lock = StateLock::acquire(dir.path(), &purpose, std::time::Duration::ZERO).unwrap();
        let e = load_for_write(&lock).unwrap_err();
        assert_eq!(crate::error::classify(&e).code, ErrorCode::SchemaTooNew);
        assert_eq!(fs::read(dir.path().join(STATE_FILE)).unwrap(), newer);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            2,
            "nothing moved aside"
        );
    }

    #[test]
    fn the_core_schema_is_written_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let purpose = crate::lock::Purpose::brief("test", "saving the state");
        let lock = StateLock::acquire(dir.path(), &purpose, std::time::Duration::ZERO).unwrap();
        let mut s = State::default();
        s.save(&lock).unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.path().join(STATE_FILE)).unwrap()).unwrap();
        assert_eq!(v["schema"], 1);
        // A file from before schemas: schema 1.
        fs::write(dir.path().join(STATE_FILE), br#"{"stage":"failed"}"#).unwrap();
        let ReadOutcome::Ok(s) = read(dir.path()).unwrap() else {
            panic!("reads")
        };
        assert_eq!((s.schema, s.stage), (Schema(1), Stage::Failed));
        assert_eq!(State::default().schema, Schema(1));
    }

    #[test]
    fn corrupt_state_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        let purpose = crate::lock::Purpose::brief("test", "loading the state");
        let lock = StateLock::acquire(dir.path(), &purpose, std::time::Duration::ZERO).unwrap();
        let (s, recovered) = load_for_write(&lock).unwrap();
        assert!(recovered);
        assert_eq!(s.stage, Stage::Idle);
        let aside: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1);
        assert!(matches!(read(dir.path()).unwrap(), ReadOutcome::Ok(_)));
    }
}
