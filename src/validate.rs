//! Input validation shared by the CLI and the API: every refusal is `INVALID_REQUEST`.

use crate::error::{fail, ErrorCode};
use crate::fsutil::TEMP_PREFIX;
use anyhow::Result;

/// `[0-9A-Za-z._+-]{1,64}`, not `.` or `..`.
pub fn version(v: &str) -> Result<()> {
    let ok_chars = v
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'+' | b'-'));
    if v.is_empty() || v.len() > 64 || !ok_chars || v == "." || v == ".." {
        return fail(
            ErrorCode::InvalidRequest,
            format!("version {v:?} must match [0-9A-Za-z._+-]{{1,64}} and not be . or .."),
        );
    }
    Ok(())
}

/// A plain file name: no `/`, no NUL, not `.`/`..`, not hidden (temp files start with a dot),
/// at most 200 bytes so `<name>.part` fits every filesystem's name limit.
pub fn file_name(n: &str) -> Result<()> {
    let bad = n.is_empty()
        || n.len() > 200
        || n.contains('/')
        || n.contains('\0')
        || n.starts_with('.')
        || n.starts_with(TEMP_PREFIX)
        || n.chars().any(char::is_control);
    if bad {
        return fail(
            ErrorCode::InvalidRequest,
            format!("package_name {n:?} must be a plain file name (no '/', not hidden, at most 200 bytes)"),
        );
    }
    Ok(())
}

/// An http or https URL with a host.
pub fn url(u: &str) -> Result<()> {
    let parsed: Option<ureq::http::Uri> = u.parse().ok();
    let ok = parsed.as_ref().is_some_and(|p| {
        matches!(p.scheme_str(), Some("http") | Some("https"))
            && p.host().is_some_and(|h| !h.is_empty())
    });
    if !ok {
        return fail(
            ErrorCode::InvalidRequest,
            format!("package_url {u:?} must be an http:// or https:// URL"),
        );
    }
    Ok(())
}

/// 32 hex digits; returned lowercase.
pub fn md5(m: &str) -> Result<String> {
    if m.len() != 32 || !m.bytes().all(|c| c.is_ascii_hexdigit()) {
        return fail(
            ErrorCode::InvalidRequest,
            format!("package_md5 {m:?} must be 32 hex digits"),
        );
    }
    Ok(m.to_ascii_lowercase())
}

/// 64 hex digits; returned lowercase.
pub fn sha256(m: &str) -> Result<String> {
    if m.len() != 64 || !m.bytes().all(|c| c.is_ascii_hexdigit()) {
        return fail(
            ErrorCode::InvalidRequest,
            format!("package_sha256 {m:?} must be 64 hex digits"),
        );
    }
    Ok(m.to_ascii_lowercase())
}

/// Order versions by precedence, for the downgrade guard.
///
/// SemVer 2.0 versions (`MAJOR.MINOR.PATCH`, optional `-prerelease`, optional `+build`) compare
/// by SemVer precedence: numbers as numbers, a pre-release ranks below its release
/// (`1.2.0-rc1 < 1.2.0`), pre-release identifiers compare one by one (numeric ones by value and
/// below alphanumeric ones, alphanumeric ones in ASCII order, a shorter set below a longer one
/// it prefixes), and build metadata is ignored (`1.2.0+build == 1.2.0`).
///
/// Any other version string (`2`, `1.2`, `1.2.3.4`, `1.02.0`, `2024.05.1b`) compares by the
/// same rules, generalised: `+build` is dropped; the leading dot-separated numbers compare as
/// numbers, a missing one counting as 0 (`2 == 2.0`, `1.10 > 1.9.2`); then what follows them:
/// a `-suffix` is a pre-release, below the bare release and compared as SemVer pre-release
/// identifiers (`2.0-rc1 < 2.0`); any other suffix ranks above the bare release and compares
/// as text (`1.2.0 < 1.2.0b`). On SemVer versions this is exactly SemVer precedence, so
/// mixing both kinds is consistent.
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;

    /// What follows the numbers: a pre-release (`-x`) < nothing < any other text.
    #[derive(PartialEq, Eq, PartialOrd, Ord)]
    enum Rest<'a> {
        Pre(&'a str),
        Release,
        Other(&'a str),
    }

    fn split(v: &str) -> (Vec<&str>, Rest<'_>) {
        // Build metadata never counts ('+' is not allowed in a pre-release).
        let v = v.split_once('+').map_or(v, |(x, _)| x);
        let mut nums = Vec::new();
        let mut rest = v;
        loop {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                break;
            }
            nums.push(&rest[..digits]);
            rest = &rest[digits..];
            match rest.strip_prefix('.') {
                Some(r) if r.starts_with(|c: char| c.is_ascii_digit()) => rest = r,
                _ => break,
            }
        }
        let rest = if rest.is_empty() {
            Rest::Release
        } else if let Some(pre) = rest.strip_prefix('-') {
            Rest::Pre(pre)
        } else {
            Rest::Other(rest)
        };
        (nums, rest)
    }

    /// Digit strings by value, whatever their length (no overflow, leading zeros ignored).
    fn cmp_numeric(x: &str, y: &str) -> Ordering {
        let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
        x.len().cmp(&y.len()).then_with(|| x.cmp(y))
    }

    /// SemVer 2.0 rule 11.4: identifier by identifier.
    fn cmp_pre(x: &str, y: &str) -> Ordering {
        let numeric = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
        let (mut xs, mut ys) = (x.split('.'), y.split('.'));
        loop {
            let o = match (xs.next(), ys.next()) {
                (None, None) => return Ordering::Equal,
                (None, Some(_)) => return Ordering::Less,
                (Some(_), None) => return Ordering::Greater,
                (Some(p), Some(q)) => match (numeric(p), numeric(q)) {
                    (true, true) => cmp_numeric(p, q),
                    (true, false) => Ordering::Less,
                    (false, true) => Ordering::Greater,
                    (false, false) => p.cmp(q),
                },
            };
            if o != Ordering::Equal {
                return o;
            }
        }
    }

    let (na, ra) = split(a);
    let (nb, rb) = split(b);
    for i in 0..na.len().max(nb.len()) {
        let o = cmp_numeric(na.get(i).unwrap_or(&"0"), nb.get(i).unwrap_or(&"0"));
        if o != Ordering::Equal {
            return o;
        }
    }
    match (ra, rb) {
        (Rest::Pre(x), Rest::Pre(y)) => cmp_pre(x, y),
        (x, y) => x.cmp(&y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_order() {
        use std::cmp::Ordering::*;
        for (a, b, o) in [
            ("1.10.0", "1.9.2", Greater),
            ("2", "2.0", Equal),
            ("1.2.0", "1.2.1", Less),
            ("1.2.0-rc1", "1.2.0", Less),
            ("1.2.0+build.5", "1.2.0", Equal),
            ("1.2.0+build.5", "1.2.0-rc1", Greater),
            ("1.2.1-rc1", "1.2.0", Greater),
            ("10", "9.99", Greater),
            ("1.0.0", "1.0.0", Equal),
            ("abc", "abd", Less),
            ("99999999999999999999999.0.0", "1.0.0", Greater),
        ] {
            assert_eq!(compare_versions(a, b), o, "{a} vs {b}");
            assert_eq!(compare_versions(b, a), o.reverse(), "{b} vs {a}");
        }
    }

    /// The example chain of SemVer 2.0 rule 11, and build metadata ignored (rule 10).
    #[test]
    fn semver_precedence() {
        use std::cmp::Ordering::*;
        let chain = [
            "1.0.0-alpha",
            "1.0.0-alpha.1",
            "1.0.0-alpha.beta",
            "1.0.0-beta",
            "1.0.0-beta.2",
            "1.0.0-beta.11",
            "1.0.0-rc.1",
            "1.0.0",
        ];
        for (i, a) in chain.iter().enumerate() {
            for (j, b) in chain.iter().enumerate() {
                assert_eq!(compare_versions(a, b), i.cmp(&j), "{a} vs {b}");
            }
        }
        for (a, b, o) in [
            ("1.0.0+build", "1.0.0", Equal),
            ("1.0.0-alpha+001", "1.0.0-alpha", Equal),
            ("1.0.0+20130313144700", "1.0.0+exp.sha.5114f85", Equal),
            ("1.0.0-beta+exp.sha.5114f85", "1.0.0-beta.2", Less),
            ("1.0.0", "2.0.0", Less),
            ("2.0.0", "2.1.0", Less),
            ("2.1.0", "2.1.1", Less),
            ("1.0.0-2", "1.0.0-10", Less),
            ("1.0.0-x-y", "1.0.0-x", Greater),
        ] {
            assert_eq!(compare_versions(a, b), o, "{a} vs {b}");
            assert_eq!(compare_versions(b, a), o.reverse(), "{b} vs {a}");
        }
    }

    /// Versions that are not SemVer: the documented fallback.
    #[test]
    fn non_semver_fallback() {
        use std::cmp::Ordering::*;
        for (a, b, o) in [
            ("2", "2.0.0", Equal),
            ("1.2", "1.2.0-rc1", Greater),
            ("2.0-rc1", "2.0", Less),
            ("2.0-rc.2", "2.0-rc.10", Less),
            ("1.2.3.4", "1.2.3", Greater),
            ("1.02.0", "1.2.0", Equal),
            ("1.2.0b", "1.2.0", Greater),
            ("1.2.0b", "1.2.0-rc1", Greater),
            ("1.2+7", "1.2", Equal),
        ] {
            assert_eq!(compare_versions(a, b), o, "{a} vs {b}");
            assert_eq!(compare_versions(b, a), o.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn versions() {
        for ok in ["1.2.0", "1.2.0-rc1+build.5", "a", &"9".repeat(64)] {
            assert!(version(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "1/2", "1 2", &"9".repeat(65), "v1;rm"] {
            assert!(version(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_urls_md5() {
        assert!(file_name("pkg-1.2.0.zip").is_ok());
        for bad in ["", "a/b", "..", ".", ".hidden", "a\nb"] {
            assert!(file_name(bad).is_err(), "{bad:?}");
        }
        assert!(url("https://h/x.zip").is_ok());
        assert!(url("http://127.0.0.1:8080/x").is_ok());
        for bad in ["ftp://h/x", "file:///etc/passwd", "http://", "nonsense"] {
            assert!(url(bad).is_err(), "{bad}");
        }
        assert_eq!(md5(&"A".repeat(32)).unwrap(), "a".repeat(32));
        assert!(md5("abc").is_err());
        assert!(md5(&"g".repeat(32)).is_err());
    }
}
