//! The updaters kept under the state dir (`<state-dir>/updater/`), outside every snapshot's
//! lifetime, so that a rollback (to factory too) or a pruned snapshot never removes the one that
//! runs: each binary by its SHA-256, and `updater.json`, which says which one is proven good
//! on this device, which are bad (and why), and which one an install is trying.
//!
//! `runs/` is the trial counter of the proven one: the `.deb` binary writes an entry (named by
//! its pid and start time, holding the hash and the boot id) durably before it execs the proven
//! updater; the updater removes its own entry when it ends in order (an exit code of its own,
//! but for serve under systemd only 0: see [`crate::dispatch::finish`]). An entry of this boot
//! whose process is gone is a run that crashed, hung until it was killed, or was a serve that
//! could not serve: after [`MAX_UNFINISHED`] of them, with no run of the same subcommand
//! between that exited 0, the updater is bad and the `.deb` binary runs instead. Entries of an
//! earlier boot are runs a power cut or a reboot ended: not the updater's doing, and not
//! counted.

use crate::fsutil;
use crate::state::Schema;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The directory under the state dir.
pub const DIR: &str = "updater";
/// The record of the kept updaters.
pub const RECORD: &str = "updater.json";
/// The schema of [`RECORD`] this build reads and writes (as state.json's: see
/// [`crate::state::SCHEMA`]).
pub const SCHEMA: u64 = 1;
const RUNS: &str = "runs";
const RECORD_LOCK: &str = "record.lock";
/// Runs of the proven updater that may end without finishing before it is bad.
pub const MAX_UNFINISHED: usize = 3;
/// Bad updaters remembered (the oldest forgotten first).
const MAX_BAD: usize = 16;

/// An updater kept under the state dir.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    pub sha256: String,
    /// Its own version, as its self-test reported it.
    pub version: String,
    /// The release (package version) that carried it.
    pub release: String,
    /// The trusted key that signed that package; None for an unsigned one.
    pub signed_by: Option<String>,
    /// When it became what it is (proven, or tried).
    pub at: String,
    /// Whether its serve tells systemd once it listens (READY=1; the unit is `Type=notify`), as
    /// its self-test said. False in a record made before it could say: serve started by
    /// systemd never runs such an updater, which systemd would kill at its start timeout.
    #[serde(default)]
    pub ready_notify: bool,
    /// Fields a newer updater wrote that this one does not know: kept when it rewrites the
    /// record, so running an older fallback never erases what a newer one recorded.
    #[serde(flatten)]
    pub unknown: serde_json::Map<String, serde_json::Value>,
}

/// An updater that failed, never run again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bad {
    pub sha256: String,
    pub version: Option<String>,
    pub release: Option<String>,
    pub why: String,
    pub at: String,
}

/// An updater an install is trying: self-tested, waiting to finish that install's commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    pub kept: Kept,
    /// The snapshot dir the install switches to.
    pub target: String,
}

/// `updater.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    #[serde(default)]
    pub schema: Schema,
    /// The newest updater proven good on this device: the one the `.deb` binary runs when it
    /// is newer than itself.
    #[serde(default)]
    pub good: Option<Kept>,
    #[serde(default)]
    pub trial: Option<Trial>,
    #[serde(default)]
    pub bad: Vec<Bad>,
    /// As [`Kept::unknown`].
    #[serde(flatten)]
    pub unknown: serde_json::Map<String, serde_json::Value>,
}

impl Record {
    pub fn is_bad(&self, sha256: &str) -> Option<&Bad> {
        self.bad.iter().find(|b| b.sha256 == sha256)
    }
}

pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join(DIR)
}

/// Where the kept updater with this hash lives.
pub fn binary(state_dir: &Path, sha256: &str) -> PathBuf {
    dir(state_dir).join(sha256)
}

/// The record; the default (nothing kept) when there is none. One of a newer schema is
/// `SCHEMA_TOO_NEW`, one that does not parse an error: either way nothing is trusted from it.
pub fn read(state_dir: &Path) -> Result<Record> {
    let path = dir(state_dir).join(RECORD);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Record::default()),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    if let Some(n) = crate::state::declared_schema(&bytes).newer_than(SCHEMA) {
        return Err(crate::state::too_new(&path, n, SCHEMA));
    }
    serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))
}

/// Change the record under its own lock (writers without the state lock, such as the `.deb`
/// binary marking a crashing updater bad, may run at once) and return what was written.
pub fn update(state_dir: &Path, change: impl FnOnce(&mut Record)) -> Result<Record> {
    let d = dir(state_dir);
    make_dir(&d)?;
    let lock_path = d.join(RECORD_LOCK);
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .with_context(|| format!("open {}", lock_path.display()))?;
    fs2::FileExt::lock_exclusive(&lock).with_context(|| format!("lock {}", lock_path.display()))?;
    let mut rec = match read(state_dir) {
        Ok(r) => r,
        Err(e) if !is_corrupt(&e) => return Err(e),
        Err(e) => {
            // A record that does not parse trusts nothing: kept for diagnosis, and a fresh one
            // (nothing proven: the `.deb` binary runs) lets the device go on.
            let path = d.join(RECORD);
            let aside = d.join(format!("{RECORD}.corrupt-{}", crate::clock::now_rfc3339()));
            log::warn!("{e:#}; moved aside to {}", aside.display());
            fsutil::rename_durable(&path, &aside)?;
            Record::default()
        }
    };
    change(&mut rec);
    rec.schema = Schema(SCHEMA);
    let bytes = serde_json::to_vec_pretty(&rec).context("encode the updater record")?;
    fsutil::write_atomic(&d.join(RECORD), &bytes)?;
    Ok(rec)
}

/// Whether `e`, from [`read`], says the record does not parse (not a newer schema, not a read
/// that failed): the next writer moves such a record aside.
pub fn is_corrupt(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<serde_json::Error>())
}

/// The directory, made root-only-writable: what is executed from it must not be writable by the
/// printer's services.
fn make_dir(d: &Path) -> Result<()> {
    fsutil::ensure_dir(d)?;
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", d.display()))
}

/// Keep a copy of the updater at `from` whose hash must be `sha256`, read-only (0555), and
/// return its path. One kept already (an install of the same updater again) is checked and
/// kept as it is.
pub fn keep(state_dir: &Path, from: &Path, sha256: &str) -> Result<PathBuf> {
    let d = dir(state_dir);
    make_dir(&d)?;
    let to = binary(state_dir, sha256);
    if to.exists() && crate::integrity::sha256_file(&to)? == sha256 {
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o555))
            .with_context(|| format!("chmod {}", to.display()))?;
        return Ok(to);
    }
    let tmp = fsutil::temp_path(&d, "updater");
    let done = (|| -> Result<()> {
        fsutil::copy_file(from, &tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o555))
            .with_context(|| format!("chmod {}", tmp.display()))?;
        // The mode durable with the file: after a power cut it is never the package's.
        let f = std::fs::File::open(&tmp).with_context(|| format!("open {}", tmp.display()))?;
        fsutil::sync_file(&f, &tmp)?;
        let got = crate::integrity::sha256_file(&tmp)?;
        if got != sha256 {
            anyhow::bail!(
                "{} changed while it was copied: SHA-256 {got}, its record says {sha256}",
                from.display()
            );
        }
        fsutil::rename_durable(&tmp, &to)
    })();
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done.map(|_| to)
}

/// Mark the updater `sha256` bad: never run or tried again. When it was the proven one, nothing
/// is proven any more (the `.deb` binary runs); its file goes.
pub fn mark_bad(
    state_dir: &Path,
    sha256: &str,
    version: Option<&str>,
    release: Option<&str>,
    why: &str,
) -> Result<()> {
    log::error!("the updater {sha256:.12}… is bad: {why}");
    update(state_dir, |r| {
        if r.good.as_ref().is_some_and(|g| g.sha256 == sha256) {
            r.good = None;
        }
        if r.trial.as_ref().is_some_and(|t| t.kept.sha256 == sha256) {
            r.trial = None;
        }
        r.bad.retain(|b| b.sha256 != sha256);
        r.bad.push(Bad {
            sha256: sha256.to_string(),
            version: version.map(str::to_string),
            release: release.map(str::to_string),
            why: why.to_string(),
            at: crate::clock::now_rfc3339(),
        });
        let extra = r.bad.len().saturating_sub(MAX_BAD);
        r.bad.drain(..extra);
    })?;
    remove_binary(state_dir, sha256);
    Ok(())
}

/// Remove the kept binaries that are neither proven nor on trial (best effort: a leftover only
/// takes space, and nothing runs a binary the record does not name).
pub fn prune(state_dir: &Path, rec: &Record) {
    let Ok(entries) = std::fs::read_dir(dir(state_dir)) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let kept = rec.good.as_ref().is_some_and(|g| g.sha256 == name)
            || rec.trial.as_ref().is_some_and(|t| t.kept.sha256 == name);
        if is_hash(&name) && !kept {
            remove_binary(state_dir, &name);
        }
    }
    let _ = fsutil::sweep_temp(&dir(state_dir));
}

fn remove_binary(state_dir: &Path, sha256: &str) {
    if let Err(e) = fsutil::remove_file_durable(&binary(state_dir, sha256)) {
        log::warn!("removing the kept updater {sha256:.12}…: {e:#}");
    }
}

fn is_hash(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

fn run_entry(state_dir: &Path, pid: u32, start: u64) -> PathBuf {
    dir(state_dir).join(RUNS).join(format!("{pid}.{start}"))
}

/// Record, durably, that this process is about to exec the updater `sha256` (the pid and the
/// start time survive the exec, so the updater finds its entry).
pub fn begin_run(state_dir: &Path, sha256: &str, subcommand: &str) -> Result<()> {
    let pid = std::process::id();
    let start = crate::proc::start_time(pid).context("read our own start time")?;
    let runs = dir(state_dir).join(RUNS);
    fsutil::ensure_dir(&runs)?;
    fsutil::write_atomic(
        &run_entry(state_dir, pid, start),
        format!("{sha256} {} {subcommand}", boot_id().unwrap_or("-")).as_bytes(),
    )
}

/// This boot's id (None when the kernel does not say).
fn boot_id() -> Option<&'static str> {
    static ID: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    })
    .as_deref()
}

/// Whether an entry that names the boot `recorded` was written in this boot. An entry or a
/// kernel that names none (`-`) is judged as this boot's, by its process alone.
fn of_this_boot(recorded: Option<&str>) -> bool {
    match (recorded, boot_id()) {
        (None | Some("-"), _) | (_, None) => true,
        (Some(r), Some(now)) => r == now,
    }
}

/// This process's run ends in order (an honest failure such as `DOWNLOAD_FAILED` is no crash):
/// its entry goes; after a run that succeeded (`cleared`: its subcommand) the entries of
/// earlier runs of the same subcommand that did not finish go too (the counter counts failures
/// in a row: a heal that works says nothing of a serve or an install that crashes). Best
/// effort: a leftover entry counts one failure too many, never one too few.
pub fn end_run(state_dir: &Path, cleared: Option<&str>) {
    let pid = std::process::id();
    let Some(start) = crate::proc::start_time(pid) else {
        return;
    };
    let runs = dir(state_dir).join(RUNS);
    let _ = std::fs::remove_file(run_entry(state_dir, pid, start));
    if let Some(sub) = cleared {
        for (path, rec) in unfinished_entries(&runs) {
            let mut w = rec.split_whitespace();
            let (this_boot, of) = (of_this_boot(w.nth(1)), w.next());
            // Earlier boots' entries are never counted: gone with any clean run.
            if !this_boot || of.unwrap_or("-") == sub {
                let _ = std::fs::remove_file(path);
            }
        }
    }
    let _ = fsutil::sync_dir(&runs);
}

/// How many runs of the updater `sha256` ended without finishing in this boot.
pub fn unfinished(state_dir: &Path, sha256: &str) -> usize {
    unfinished_entries(&dir(state_dir).join(RUNS))
        .into_iter()
        .filter(|(_, rec)| {
            let mut w = rec.split_whitespace();
            w.next() == Some(sha256) && of_this_boot(w.next())
        })
        .count()
}

/// The entries whose process is gone (or is another process that reused the pid), with the hash
/// each names.
fn unfinished_entries(runs: &Path) -> Vec<(PathBuf, String)> {
    let Ok(entries) = std::fs::read_dir(runs) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((pid, start)) = name.split_once('.') else {
            continue;
        };
        let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
            continue;
        };
        let rec = std::fs::read_to_string(e.path()).unwrap_or_default();
        let this_boot = of_this_boot(rec.split_whitespace().nth(1));
        if this_boot && crate::proc::alive(pid) && crate::proc::start_time(pid) == Some(start) {
            continue;
        }
        out.push((e.path(), rec.trim().to_string()));
    }
    out
}

/// Why the file at `path` may not be executed as root: it, or a directory above it, is
/// writable by someone other than root (and us), or owned by them. A sticky directory (such
/// as /tmp) above ours is fine: others cannot rename or remove what is ours in it.
pub fn unsafe_path(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    // The real chain: a state dir reached through a symlink (/var/lib/tope-ota -> /data/…) is
    // judged by where it is, and a relative path by its whole ancestry.
    let real = match std::fs::canonicalize(path) {
        Ok(r) => r,
        Err(e) => return Some(format!("{}: {e}", path.display())),
    };
    let mut p = Some(real.as_path());
    let mut first = true;
    while let Some(at) = p {
        if at.as_os_str().is_empty() {
            break;
        }
        let m = match std::fs::symlink_metadata(at) {
            Ok(m) => m,
            Err(e) => return Some(format!("{}: {e}", at.display())),
        };
        if first && !m.file_type().is_file() {
            return Some(format!("{} is not a regular file", at.display()));
        }
        if !first && !m.file_type().is_dir() {
            return Some(format!("{} is not a directory", at.display()));
        }
        if m.uid() != 0 && m.uid() != me {
            return Some(format!("{} is owned by uid {}", at.display(), m.uid()));
        }
        let sticky = !first && m.mode() & 0o1000 != 0;
        if m.mode() & 0o022 != 0 && !sticky {
            return Some(format!(
                "{} is writable by its group or others (mode {:o})",
                at.display(),
                m.mode() & 0o7777
            ));
        }
        first = false;
        p = at.parent();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_that_did_not_finish_are_counted_until_a_clean_one() {
        let d = tempfile::tempdir().unwrap();
        let runs = dir(d.path()).join(RUNS);
        std::fs::create_dir_all(&runs).unwrap();
        // Two dead runs of this boot (no such pid), one of another updater, and one of an
        // earlier boot (a power cut ended it: not counted).
        let boot = boot_id().expect("the kernel's boot id");
        std::fs::write(
            runs.join(format!("{}.1", u32::MAX - 1)),
            format!("aa {boot} heal"),
        )
        .unwrap();
        std::fs::write(
            runs.join(format!("{}.2", u32::MAX - 2)),
            format!("aa {boot}"),
        )
        .unwrap();
        std::fs::write(
            runs.join(format!("{}.3", u32::MAX - 3)),
            format!("bb {boot}"),
        )
        .unwrap();
        std::fs::write(runs.join(format!("{}.4", u32::MAX - 4)), "aa another-boot").unwrap();
        // A live run: ours.
        begin_run(d.path(), "aa", "heal").unwrap();
        assert_eq!(unfinished(d.path(), "aa"), 2);
        assert_eq!(unfinished(d.path(), "bb"), 1);
        end_run(d.path(), None);
        assert_eq!(unfinished(d.path(), "aa"), 2);
        // A heal that succeeds clears heal's failures, not an install's.
        std::fs::write(
            runs.join(format!("{}.5", u32::MAX - 5)),
            format!("aa {boot} install"),
        )
        .unwrap();
        std::fs::write(
            runs.join(format!("{}.6", u32::MAX - 6)),
            format!("aa {boot} heal"),
        )
        .unwrap();
        begin_run(d.path(), "aa", "heal").unwrap();
        end_run(d.path(), Some("heal"));
        // Left: .2 (no subcommand recorded) and .5 (an install).
        assert_eq!(unfinished(d.path(), "aa"), 2);
        begin_run(d.path(), "aa", "install").unwrap();
        end_run(d.path(), Some("install"));
        assert_eq!(unfinished(d.path(), "aa"), 1);
        assert_eq!(unfinished(d.path(), "bb"), 1);
        // An entry written when the kernel named no boot: judged by its process alone, so a
        // crash loop there still gives way.
        std::fs::write(runs.join(format!("{}.7", u32::MAX - 7)), "cc - heal").unwrap();
        assert_eq!(unfinished(d.path(), "cc"), 1);
        begin_run(d.path(), "cc", "serve").unwrap();
        end_run(d.path(), Some("heal"));
        assert_eq!(unfinished(d.path(), "cc"), 0, "a clean heal clears it");
    }

    #[test]
    fn fields_a_newer_updater_wrote_survive_a_rewrite_by_this_one() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join(DIR)).unwrap();
        let rec = serde_json::json!({"schema": 1, "later": [1, 2], "good": {
            "sha256": "a".repeat(64), "version": "0.3.0", "release": "3.0", "signed_by": null,
            "at": "", "ready_notify": true, "capability": "x"}, "trial": null, "bad": []});
        std::fs::write(
            d.path().join(DIR).join(RECORD),
            serde_json::to_vec(&rec).unwrap(),
        )
        .unwrap();
        update(d.path(), |r| r.trial = None).unwrap();
        let back: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.path().join(DIR).join(RECORD)).unwrap())
                .unwrap();
        assert_eq!(back["later"], serde_json::json!([1, 2]), "{back}");
        assert_eq!(back["good"]["capability"], "x", "{back}");
        assert_eq!(back["good"]["ready_notify"], true);
    }

    #[test]
    fn bad_updaters_are_remembered_and_never_proven() {
        let d = tempfile::tempdir().unwrap();
        let kept = Kept {
            sha256: "a".repeat(64),
            version: "0.2.0".into(),
            release: "1.0".into(),
            signed_by: None,
            at: String::new(),
            ready_notify: true,
            unknown: Default::default(),
        };
        update(d.path(), |r| r.good = Some(kept.clone())).unwrap();
        std::fs::write(binary(d.path(), &kept.sha256), "x").unwrap();
        mark_bad(d.path(), &kept.sha256, Some("0.2.0"), None, "crashed").unwrap();
        let r = read(d.path()).unwrap();
        assert_eq!(r.good, None);
        assert_eq!(r.is_bad(&kept.sha256).unwrap().why, "crashed");
        assert!(!binary(d.path(), &kept.sha256).exists());
        for i in 0..20 {
            mark_bad(d.path(), &format!("{i:064}"), None, None, "x").unwrap();
        }
        assert_eq!(read(d.path()).unwrap().bad.len(), MAX_BAD);
    }

    #[test]
    fn a_path_writable_by_others_is_unsafe() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("bin");
        std::fs::write(&f, "x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o555)).unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(unsafe_path(&f), None, "under a sticky /tmp");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o757)).unwrap();
        assert!(unsafe_path(&f).unwrap().contains("writable"));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o555)).unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o775)).unwrap();
        assert!(unsafe_path(&f).unwrap().contains("writable"));
    }
}
