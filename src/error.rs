//! Error codes of SPEC section 7 and the error type that carries one.
//!
//! Every failure that an operator or device-api must act on is an [`OtaError`]: a [`ErrorCode`]
//! whose string is exactly the spec's, plus a human detail. Anything else that goes wrong is wrapped
//! by anyhow and surfaces as `INTERNAL`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Exit code of a successful command.
pub const EXIT_OK: i32 = 0;
/// Exit code when the operation failed; its code is in state.json and in `--json` output.
pub const EXIT_FAILED: i32 = 1;
/// Exit code for a usage error: bad flags (clap) or an invalid request.
pub const EXIT_USAGE: i32 = 2;
/// Exit code when another writer holds the lock (`BUSY`); sysexits' EX_TEMPFAIL.
pub const EXIT_BUSY: i32 = 75;
/// Exit code when a print job inhibits install or rollback (sysexits' EX_UNAVAILABLE): the
/// package waits, nothing failed.
pub const EXIT_INHIBITED: i32 = 69;
/// Exit code of a command stopped by SIGINT (128 + 2); the operation can be resumed.
pub const EXIT_SIGINT: i32 = 130;
/// Exit code of a command stopped by SIGTERM (128 + 15); the operation can be resumed.
pub const EXIT_SIGTERM: i32 = 143;

macro_rules! codes {
    ($($variant:ident => $text:literal, $http:literal, $exit:expr;)*) => {
        /// A machine-readable error code; `as_str` is the spec's spelling.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum ErrorCode {
            $(#[serde(rename = $text)] $variant,)*
        }

        impl ErrorCode {
            /// Every code, in the spec's order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The code as written in state.json, callbacks, API responses and logs.
            pub fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $text,)* }
            }

            /// The HTTP status the API answers with for this code.
            pub fn http_status(self) -> u16 {
                match self { $(ErrorCode::$variant => $http,)* }
            }

            /// The process exit code for this code.
            pub fn exit_code(self) -> i32 {
                match self { $(ErrorCode::$variant => $exit,)* }
            }
        }
    };
}

codes! {
    InvalidRequest => "INVALID_REQUEST", 400, EXIT_USAGE;
    Busy => "BUSY", 409, EXIT_BUSY;
    DownloadFailed => "DOWNLOAD_FAILED", 500, EXIT_FAILED;
    DiskFull => "DISK_FULL", 500, EXIT_FAILED;
    PackageSizeMismatch => "PACKAGE_SIZE_MISMATCH", 500, EXIT_FAILED;
    Md5Mismatch => "MD5_MISMATCH", 500, EXIT_FAILED;
    NoPackage => "NO_PACKAGE", 400, EXIT_FAILED;
    VersionMismatch => "VERSION_MISMATCH", 400, EXIT_FAILED;
    PackageExpired => "PACKAGE_EXPIRED", 400, EXIT_FAILED;
    PackageInvalid => "PACKAGE_INVALID", 500, EXIT_FAILED;
    ManifestInvalid => "MANIFEST_INVALID", 500, EXIT_FAILED;
    DeploymentFailed => "DEPLOYMENT_FAILED", 500, EXIT_FAILED;
    ServiceStopFailed => "SERVICE_STOP_FAILED", 500, EXIT_FAILED;
    ServiceStartFailed => "SERVICE_START_FAILED", 500, EXIT_FAILED;
    RollbackFailed => "ROLLBACK_FAILED", 500, EXIT_FAILED;
    Internal => "INTERNAL", 500, EXIT_FAILED;
    Sha256Mismatch => "SHA256_MISMATCH", 500, EXIT_FAILED;
    SignatureInvalid => "SIGNATURE_INVALID", 500, EXIT_FAILED;
    Inhibited => "INHIBITED", 409, EXIT_INHIBITED;
    DowngradeRefused => "DOWNGRADE_REFUSED", 400, EXIT_FAILED;
    HealthCheckFailed => "HEALTH_CHECK_FAILED", 500, EXIT_FAILED;
    SchemaTooNew => "SCHEMA_TOO_NEW", 500, EXIT_FAILED;
    UpdaterFailed => "UPDATER_FAILED", 500, EXIT_FAILED;
}

impl ErrorCode {
    /// One line on when the code is given, for the man pages.
    pub fn summary(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => {
                "a request field is missing, of the wrong type, or invalid"
            }
            ErrorCode::Busy => "another tope-ota holds the lock, or an install is in flight",
            ErrorCode::DownloadFailed => "the server answered an error, or the retries were spent",
            ErrorCode::DiskFull => "not enough free space, before starting or while writing",
            ErrorCode::PackageSizeMismatch => {
                "the server's size or the body's length differs from package_size"
            }
            ErrorCode::Md5Mismatch => "the package's MD5 differs; the file is deleted",
            ErrorCode::NoPackage => "install with no verified package",
            ErrorCode::VersionMismatch => "install names another version than the downloaded one",
            ErrorCode::PackageExpired => {
                "the package was verified more than 24 h ago; it is deleted"
            }
            ErrorCode::PackageInvalid => "the ZIP is unreadable, hostile or over a cap",
            ErrorCode::ManifestInvalid => "manifest.json is missing or wrong",
            ErrorCode::DeploymentFailed => "the snapshot cannot be built or switched to",
            ErrorCode::ServiceStopFailed => "a service did not stop, or its call hung",
            ErrorCode::ServiceStartFailed => "a service did not start, or did not stay up",
            ErrorCode::RollbackFailed => {
                "both rollback levels failed; the device waits for a person"
            }
            ErrorCode::Internal => "anything unexpected; the detail says what and where",
            ErrorCode::Sha256Mismatch => "the package's SHA-256 differs; the file is deleted",
            ErrorCode::SignatureInvalid => "the package's signature is missing or does not verify",
            ErrorCode::Inhibited => "a print job inhibits switching software now",
            ErrorCode::DowngradeRefused => "the version is lower than the current one",
            ErrorCode::HealthCheckFailed => {
                "a health check did not pass within its deadline; the device rolled back"
            }
            ErrorCode::UpdaterFailed => {
                "a package's updater failed its self-test or its install's commit; it is marked bad and never runs"
            }
            ErrorCode::SchemaTooNew => {
                "state.json was written by a newer tope-ota in a schema this one does not read; it is left untouched"
            }
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A coded failure: what went wrong (`code`) and for whom to read (`detail`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtaError {
    pub code: ErrorCode,
    pub detail: String,
}

impl OtaError {
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        OtaError {
            code,
            detail: detail.into(),
        }
    }

    /// `CODE: detail`, the form used in logs, `msg` fields and on stderr.
    pub fn message(&self) -> String {
        format!("{}: {}", self.code, self.detail)
    }
}

impl fmt::Display for OtaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.detail)
    }
}

impl std::error::Error for OtaError {}

/// Shorthand for `Err(OtaError::new(code, detail).into())`.
pub fn fail<T>(code: ErrorCode, detail: impl Into<String>) -> anyhow::Result<T> {
    Err(OtaError::new(code, detail).into())
}

/// The first coded error in an anyhow chain, or `INTERNAL` with the whole chain as detail.
pub fn classify(err: &anyhow::Error) -> OtaError {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<OtaError>() {
            return e.clone();
        }
    }
    OtaError::new(ErrorCode::Internal, format!("{err:#}"))
}

/// Whether the first coded error in `err`'s chain has `code`.
pub fn has_code(err: &anyhow::Error, code: ErrorCode) -> bool {
    classify(err).code == code
}

/// True when an I/O error means the filesystem is out of space (or quota).
pub fn is_disk_full(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialize_as_spec_strings() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            let back: ErrorCode = serde_json::from_str(&json).unwrap();
            assert_eq!(back, *code);
        }
    }

    #[test]
    fn classify_finds_coded_error_under_context() {
        let err = anyhow::Error::from(OtaError::new(ErrorCode::DiskFull, "no space"))
            .context("writing /x");
        assert_eq!(classify(&err).code, ErrorCode::DiskFull);
        let other = anyhow::anyhow!("boom");
        assert_eq!(classify(&other).code, ErrorCode::Internal);
    }
}
