//! This binary's version, stamped where the bytes of the file can be read and rewritten, and
//! the semver precedence by which one updater is newer than another.

use std::sync::OnceLock;

const STAMP_PREFIX_LEN: usize = 17;
const STAMP_LEN: usize = 64;

/// The version, in a fixed place of the binary (`TOPE-OTA-VERSION:` and the version, NUL
/// padded), read through a volatile load so that the compiler keeps it in the file: what the
/// self-test reports and the choice compares. The box and the tests make an updater of another
/// version from a build by rewriting it (see `tests/integration/support.rs`).
#[used]
static STAMP: [u8; STAMP_LEN] = stamp(env!("CARGO_PKG_VERSION"));

const fn stamp(version: &str) -> [u8; STAMP_LEN] {
    let prefix = b"TOPE-OTA-VERSION:";
    let v = version.as_bytes();
    let mut out = [0u8; STAMP_LEN];
    let mut i = 0;
    while i < STAMP_PREFIX_LEN {
        out[i] = prefix[i];
        i += 1;
    }
    let mut j = 0;
    while j < v.len() && STAMP_PREFIX_LEN + j < STAMP_LEN - 1 {
        out[STAMP_PREFIX_LEN + j] = v[j];
        j += 1;
    }
    out
}

/// This binary's version (see [`STAMP`]).
pub fn version() -> &'static str {
    static V: OnceLock<String> = OnceLock::new();
    V.get_or_init(|| {
        // SAFETY: a plain read of a static's bytes; volatile so that it is not folded.
        let b: [u8; STAMP_LEN] = unsafe { std::ptr::read_volatile(&STAMP) };
        let v = &b[STAMP_PREFIX_LEN..];
        let end = v.iter().position(|&c| c == 0).unwrap_or(v.len());
        String::from_utf8_lossy(&v[..end]).into_owned()
    })
}

/// A `major.minor.patch[-pre][+build]` version: its numbers and pre-release identifiers (build
/// metadata does not order), or None when it is not one.
fn parse(v: &str) -> Option<(Vec<u64>, Vec<String>)> {
    let v = v.split_once('+').map_or(v, |(c, _)| c);
    let (core, pre) = match v.split_once('-') {
        Some((c, p)) if !p.is_empty() => (c, p.split('.').map(str::to_string).collect()),
        Some(_) => return None,
        None => (v, Vec::new()),
    };
    let n: Option<Vec<u64>> = core.split('.').map(|p| p.parse().ok()).collect();
    n.filter(|n| n.len() == 3).map(|n| (n, pre))
}

/// Semver precedence of two pre-release lists (empty: a release, above any pre-release).
fn pre_cmp(a: &[String], b: &[String]) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    match (a.is_empty(), b.is_empty()) {
        (true, true) => return Ordering::Equal,
        (true, false) => return Ordering::Greater,
        (false, true) => return Ordering::Less,
        _ => {}
    }
    for (x, y) in a.iter().zip(b) {
        let o = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(i), Ok(j)) => i.cmp(&j),
            (Ok(_), Err(_)) => Ordering::Less,
            (Err(_), Ok(_)) => Ordering::Greater,
            (Err(_), Err(_)) => x.cmp(y),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    a.len().cmp(&b.len())
}

/// Whether version `a` is newer than `b` (semver precedence). When either does not parse,
/// neither is newer: the `.deb` binary runs.
pub fn newer(a: &str, b: &str) -> bool {
    match (parse(a), parse(b)) {
        (Some((na, pa)), Some((nb, pb))) => {
            na.cmp(&nb).then_with(|| pre_cmp(&pa, &pb)) == std::cmp::Ordering::Greater
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_as_numbers() {
        assert!(newer("0.10.0", "0.9.9"));
        assert!(newer("1.0.0", "1.0.0-rc1"));
        assert!(!newer("1.0.0-rc1", "1.0.0"));
        assert!(!newer("1.0.0", "1.0.0"));
        assert!(!newer("garbage", "0.1.0"));
        assert!(
            !newer("0.2.0", "garbage"),
            "an unparsable .deb version: the .deb runs"
        );
        assert!(!newer("1.0", "0.1.0"));
        assert!(newer("1.0.0-rc.2", "1.0.0-rc.1"));
        assert!(newer("1.0.0-rc.10", "1.0.0-rc.9"));
        assert!(newer("1.0.0-rc.1", "1.0.0-rc"));
        assert!(
            !newer("0.5.0+git1", "0.5.0"),
            "build metadata does not order"
        );
        assert!(newer("0.5.1+git1", "0.5.0"));
        assert_eq!(version(), env!("CARGO_PKG_VERSION"));
    }
}
