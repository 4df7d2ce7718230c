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

/// The version stamped in the tope-ota build `file` (see [`STAMP`]), read without running it:
/// an install learns whether a package's updater is newer before it lets it run at all. None
/// when the file carries no stamp that parses as a version, or two that differ.
pub fn stamped(file: &std::fs::File) -> std::io::Result<Option<String>> {
    use std::io::Read;
    // The prefix is taken from our own stamp: a literal of it here would be a second stamp.
    // SAFETY: as in version().
    let own: [u8; STAMP_LEN] = unsafe { std::ptr::read_volatile(&STAMP) };
    let prefix = &own[..STAMP_PREFIX_LEN];
    let mut found: Option<String> = None;
    let mut buf = vec![0u8; 64 * 1024 + STAMP_LEN];
    let mut kept = 0;
    let mut r = file;
    loop {
        let n = r.read(&mut buf[kept..])?;
        let len = kept + n;
        // A stamp must lie whole in the buffer; one that starts in the last STAMP_LEN - 1
        // bytes is looked at again with the next read (or at the end).
        let last = if n == 0 {
            len
        } else {
            len.saturating_sub(STAMP_LEN - 1)
        };
        let mut i = 0;
        while let Some(at) = buf[i..last].iter().position(|&c| c == prefix[0]) {
            i += at;
            if buf[i..len].starts_with(prefix) {
                let field = &buf[i + STAMP_PREFIX_LEN..len.min(i + STAMP_LEN)];
                if let Some(end) = field.iter().position(|&c| c == 0) {
                    if let Some(v) = std::str::from_utf8(&field[..end])
                        .ok()
                        .filter(|v| parse(v).is_some())
                    {
                        match &found {
                            Some(f) if f != v => return Ok(None),
                            _ => found = Some(v.to_string()),
                        }
                    }
                }
            }
            i += 1;
        }
        if n == 0 {
            return Ok(found);
        }
        buf.copy_within(last..len, 0);
        kept = len - last;
    }
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

    #[test]
    fn the_stamp_is_read_from_the_file_without_running_it() {
        use std::io::{Seek, Write};
        let stamp = |v: &str| {
            let mut s = STAMP[..STAMP_PREFIX_LEN].to_vec();
            s.extend(v.as_bytes());
            s.resize(STAMP_LEN, 0);
            s
        };
        let of = |bytes: &[u8]| {
            let mut f = tempfile::tempfile().unwrap();
            f.write_all(bytes).unwrap();
            f.rewind().unwrap();
            stamped(&f).unwrap()
        };
        // Across the reads' boundary, at every offset near it.
        for at in (64 * 1024 - 70)..(64 * 1024 + 5) {
            let mut b = vec![7u8; at];
            b.extend(stamp("1.2.3"));
            b.extend(vec![9u8; 100]);
            assert_eq!(of(&b).as_deref(), Some("1.2.3"), "at {at}");
        }
        // At the very end of the file, NUL-terminated.
        let mut b = vec![1u8; 10];
        b.extend(&stamp("0.4.0")[..STAMP_PREFIX_LEN + 6]);
        assert_eq!(of(&b).as_deref(), Some("0.4.0"));
        assert_eq!(of(b"no stamp here"), None);
        // The prefix alone, or a value that is no version, is no stamp.
        let mut b = STAMP[..STAMP_PREFIX_LEN].to_vec();
        b.extend(b"not a version\0");
        assert_eq!(of(&b), None);
        // Two that differ: none is believed.
        let mut b = stamp("1.0.0");
        b.extend(stamp("2.0.0"));
        assert_eq!(of(&b), None);
        let mut b = stamp("1.0.0");
        b.extend(stamp("1.0.0"));
        assert_eq!(of(&b).as_deref(), Some("1.0.0"));
        // This very binary.
        let me = std::fs::File::open("/proc/self/exe").unwrap();
        assert_eq!(stamped(&me).unwrap().as_deref(), Some(version()));
    }
}
