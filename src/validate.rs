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

/// Order versions: the leading dotted numeric parts as numbers (missing parts are 0), then
/// the rest as text. `1.10.0 > 1.9.2`, `2 == 2.0`, `1.2.0-rc1 > 1.2.0` (text after equal numbers).
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    fn split(v: &str) -> (Vec<u64>, &str) {
        let mut nums = Vec::new();
        let mut rest = v;
        loop {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                break;
            }
            nums.push(rest[..digits].parse().unwrap_or(u64::MAX));
            rest = &rest[digits..];
            match rest.strip_prefix('.') {
                Some(r) if r.starts_with(|c: char| c.is_ascii_digit()) => rest = r,
                _ => break,
            }
        }
        (nums, rest)
    }
    let (na, ra) = split(a);
    let (nb, rb) = split(b);
    for i in 0..na.len().max(nb.len()) {
        let (x, y) = (
            na.get(i).copied().unwrap_or(0),
            nb.get(i).copied().unwrap_or(0),
        );
        if x != y {
            return x.cmp(&y);
        }
    }
    ra.cmp(rb)
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
            ("1.2.0-rc1", "1.2.0", Greater),
            ("10", "9.99", Greater),
            ("1.0.0", "1.0.0", Equal),
            ("abc", "abd", Less),
        ] {
            assert_eq!(compare_versions(a, b), o, "{a} vs {b}");
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
