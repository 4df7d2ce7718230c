//! Logging: records go to the systemd journal when stderr is connected to it (`JOURNAL_STREAM`),
//! else to stderr. Every record carries the version and stage of the operation in flight, as
//! journal fields `OTA_VERSION`/`OTA_STAGE` or as a `[version stage]` prefix on stderr; in the
//! journal, `OTA_UPDATER` is the version of the updater that wrote the record.

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::io::Write;
use std::sync::Mutex;
use systemd_journal_logger::JournalLog;

/// Target of the one record a failed command logs about its outcome. `main` prints that
/// outcome to stderr itself, so the stderr logger skips this target; the journal keeps it.
pub const OUTCOME_TARGET: &str = "tope_ota::outcome";

static CONTEXT: Mutex<(String, String)> = Mutex::new((String::new(), String::new()));

/// Set the version and stage that every following record carries.
pub fn set_context(version: &str, stage: &str) {
    if let Ok(mut c) = CONTEXT.lock() {
        c.0 = version.to_string();
        c.1 = stage.to_string();
    }
}

fn context() -> (String, String) {
    CONTEXT.lock().map(|c| c.clone()).unwrap_or_default()
}

struct OtaLogger {
    level: LevelFilter,
    journal: Option<JournalLog>,
}

impl Log for OtaLogger {
    fn enabled(&self, meta: &Metadata) -> bool {
        meta.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let (version, stage) = context();
        let version = if version.is_empty() { "-" } else { &version };
        let stage = if stage.is_empty() { "-" } else { &stage };
        match &self.journal {
            Some(journal) => {
                // Which updater wrote the record: the `.deb` binary or a proven one.
                let kvs = [
                    ("OTA_VERSION", version),
                    ("OTA_STAGE", stage),
                    ("OTA_UPDATER", crate::version::version()),
                ];
                let _ = journal.journal_send(
                    &Record::builder()
                        .args(*record.args())
                        .level(record.level())
                        .target(record.target())
                        .module_path(record.module_path())
                        .file(record.file())
                        .line(record.line())
                        .key_values(&kvs)
                        .build(),
                );
            }
            None => {
                if record.target() == OUTCOME_TARGET {
                    return;
                }
                let level = match record.level() {
                    Level::Error => "error",
                    Level::Warn => "warning",
                    Level::Info => "info",
                    Level::Debug => "debug",
                    Level::Trace => "trace",
                };
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "tope-ota: {level}: [{version} {stage}] {}",
                    record.args()
                );
            }
        }
    }

    fn flush(&self) {}
}

/// Install the logger. `verbose` counts `-v`; `quiet` is `-q`.
pub fn init(verbose: u8, quiet: bool) {
    let journal = if systemd_journal_logger::connected_to_journal() {
        JournalLog::new().ok()
    } else {
        None
    };
    // The journal is the record of what happened on an unattended device, so it gets info by
    // default; a shell gets warnings only, since commands print their own summary.
    let base = if journal.is_some() {
        LevelFilter::Info
    } else {
        LevelFilter::Warn
    };
    let level = if quiet {
        LevelFilter::Error
    } else {
        match verbose {
            0 => base,
            1 => base.max(LevelFilter::Info),
            2 => LevelFilter::Debug,
            _ => LevelFilter::Trace,
        }
    };
    let logger = OtaLogger { level, journal };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
}
