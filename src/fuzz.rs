//! Fuzz targets: every parser that reads bytes from outside, each with the property it checks.
//! The libFuzzer binaries in `fuzz/` and the corpus test of the normal suite
//! (`tests/fuzz_corpus.rs`) call these same functions; a target panics when its property fails.
//! Run them with `fuzz/run` (see the README's Fuzzing section).
//!
//! Properties every target checks: no panic; no allocation beyond [`ALLOC_CAP`] live bytes
//! (counted by [`CappedAlloc`], which the fuzz binaries and the corpus test install). Each
//! target's own properties are on its function.

use crate::cmd::download::Package;
use crate::delta::{self, LocalFile, PlanOptions};
use crate::manifest::{self, Manifest, Module};
use crate::state::{self, ReadOutcome, State};
use crate::zipdir;
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// A target: panics when its property fails on the input.
pub type Target = fn(&[u8]);

/// The targets by name, as `fuzz/fuzz_targets/<name>.rs` and `fuzz/corpus/<name>/` are named.
pub const TARGETS: &[(&str, Target)] = &[
    ("unpack", unpack),
    ("manifest", manifest_json),
    ("request", request),
    ("state", state_json),
    ("api", api),
    ("minisign", minisign),
    ("http_headers", http_headers),
    ("delta_plan", delta_plan),
];

/// Live heap bytes a target may hold at once: the largest legitimate use is the unpacker's and
/// the delta's buffers (a few MiB); 64 MiB is an allocation sized by the input.
pub const ALLOC_CAP: usize = 64 << 20;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static ABORT_OVER_CAP: AtomicBool = AtomicBool::new(false);

/// The system allocator, counting live bytes and their peak. With [`CappedAlloc::abort_over_cap`]
/// (the fuzz binaries) an allocation past [`ALLOC_CAP`] aborts at once, so libFuzzer saves the
/// input; the corpus test reads [`CappedAlloc::peak`] after each input instead.
pub struct CappedAlloc;

impl CappedAlloc {
    pub fn abort_over_cap() {
        ABORT_OVER_CAP.store(true, Ordering::SeqCst);
    }

    /// The peak of live bytes since the last call, and reset it to what is live now.
    pub fn peak() -> usize {
        PEAK.swap(LIVE.load(Ordering::SeqCst), Ordering::SeqCst)
    }

    fn grew(size: usize) {
        let live = LIVE.fetch_add(size, Ordering::SeqCst) + size;
        PEAK.fetch_max(live, Ordering::SeqCst);
        if live > ALLOC_CAP && ABORT_OVER_CAP.load(Ordering::Relaxed) {
            // No unwinding out of an allocator: say why and abort (libFuzzer keeps the input).
            let msg = b"fuzz: live heap over ALLOC_CAP\n";
            // SAFETY: writing a static buffer to stderr.
            unsafe {
                libc::write(2, msg.as_ptr().cast(), msg.len());
                libc::abort();
            }
        }
    }
}

// SAFETY: every call is forwarded to `System`; the counters are atomics.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        // A failed realloc keeps the old block: nothing changed.
        if !p.is_null() {
            if new_size > layout.size() {
                Self::grew(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::SeqCst);
            }
        }
        p
    }
}

/// A fresh dir under the temp dir, removed with everything in it when dropped.
struct Sandbox(std::path::PathBuf);

impl Sandbox {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sandbox() -> Sandbox {
    static N: AtomicUsize = AtomicUsize::new(0);
    let p = std::env::temp_dir().join(format!(
        "tope-ota-fuzz-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir(&p).expect("a temp dir");
    Sandbox(p)
}

/// Every path under `dir` (not following symlinks), relative.
fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            out.push(
                p.strip_prefix(dir)
                    .unwrap_or(&p)
                    .to_string_lossy()
                    .into_owned(),
            );
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Where `name` (an entry's name as the ZIP spells it) lands when joined to `dest` and its `.`
/// and `..` resolved by the letter, or None when it stays inside `dest`.
fn lands_outside(dest: &Path, name: &str) -> Option<std::path::PathBuf> {
    let mut p = if name.starts_with('/') {
        std::path::PathBuf::from("/")
    } else {
        dest.to_path_buf()
    };
    for c in name.split(['/', '\\']) {
        match c {
            "" | "." => {}
            ".." => {
                p.pop();
            }
            c => p.push(c),
        }
    }
    (!p.starts_with(dest)).then_some(p)
}

/// What is at a path (not following a link): its inode and mtime, or None.
type Stamp = Option<(u64, i64, i64)>;

fn stamp(p: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.ino(), m.mtime(), m.mtime_nsec()))
}

/// The ZIP reader and the unpack loop: `data` is a package. Properties: nothing is written
/// outside the staging dir: the dirs around it (three levels, each with an empty sibling) hold
/// only what they held, and every path an entry's name would reach outside it by the letter
/// (absolute, or climbing with `..`) is as it was; every symlink unpacked points down,
/// relative and without `..`; no file keeps setuid, setgid or sticky; the bytes unpacked stay
/// within the caps.
pub fn unpack(data: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    let t = sandbox();
    let zip = t.path().join("pkg.zip");
    std::fs::write(&zip, data).expect("write the package");
    let mut levels = vec![t.path().to_path_buf()];
    for l in ["l1", "l2", "l3"] {
        let next = levels.last().expect("a level").join(l);
        levels.push(next);
    }
    let dest = levels.last().expect("a level").join("stage");
    std::fs::create_dir_all(&dest).expect("the staging dir");
    for l in &levels {
        std::fs::create_dir(l.join("outside")).expect("a sibling dir");
    }
    let before = |l: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(l)
            .expect("a level")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let listed: Vec<Vec<String>> = levels.iter().map(|l| before(l)).collect();
    // The names as the directory spells them, read apart from the unpacker.
    let names: Vec<String> = zip::ZipArchive::new(std::io::Cursor::new(data))
        .map(|mut ar| {
            (0..ar.len().min(4096))
                .filter_map(|i| {
                    ar.by_index_raw(i)
                        .ok()
                        .map(|e| String::from_utf8_lossy(e.name_raw()).into_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    let reach: Vec<(std::path::PathBuf, Stamp)> = names
        .iter()
        .filter_map(|n| lands_outside(&dest, n))
        .map(|p| {
            let s = stamp(&p);
            (p, s)
        })
        .collect();
    let limits = crate::archive::Limits {
        max_entries: 256,
        max_total: 4 << 20,
        max_ratio: 200,
        ratio_floor: 64 << 10,
    };
    let r = crate::archive::unpack(&zip, &dest, &limits, 16 << 20);
    for (l, was) in levels.iter().zip(&listed) {
        assert!(
            listing(&l.join("outside")).is_empty(),
            "written outside the staging dir, in {}",
            l.display()
        );
        assert_eq!(
            &before(l),
            was,
            "written beside the staging dir, in {}",
            l.display()
        );
    }
    for (p, was) in &reach {
        assert_eq!(&stamp(p), was, "an entry reached {}", p.display());
    }
    let mut total = 0u64;
    for rel in listing(&dest) {
        let p = dest.join(&rel);
        let m = std::fs::symlink_metadata(&p).expect("stat an unpacked path");
        if m.file_type().is_symlink() {
            let target = std::fs::read_link(&p).expect("a link");
            let target = target.to_string_lossy();
            assert!(
                !target.starts_with('/') && !target.split('/').any(|c| c == ".."),
                "{rel} -> {target} leaves the staging dir"
            );
        } else if m.is_file() {
            total += m.len();
            assert_eq!(
                m.permissions().mode() & 0o7000,
                0,
                "{rel} keeps special bits"
            );
        } else {
            assert!(m.is_dir(), "{rel} is a special file");
        }
    }
    assert!(total <= limits.max_total, "{total} bytes unpacked");
    if let Ok(u) = r {
        assert!(u.bytes <= limits.max_total);
    }
}

/// `manifest.json`. Properties: what parses has every `src`, `dst` and mutable path clean and
/// relative, no `dst` in tope-ota's own dir, and parses again to itself from its own JSON.
pub fn manifest_json(data: &[u8]) {
    let version = "1.2.0";
    let Ok(m) = Manifest::parse(data, version, |_| true) else {
        return;
    };
    for md in &m.modules {
        assert!(manifest::is_clean_relative(&md.src), "{:?}", md.src);
        assert!(manifest::is_clean_relative(&md.dst), "{:?}", md.dst);
        assert_ne!(
            md.dst.split('/').next(),
            Some(crate::snapshot::META_DIR),
            "{:?}",
            md.dst
        );
    }
    for p in m.mutable.iter().flatten() {
        assert!(manifest::is_clean_relative(p), "{p:?}");
    }
    let json = serde_json::to_vec(&m).expect("serialize");
    let again = Manifest::parse(&json, version, |_| true).expect("its own JSON parses");
    assert_eq!(again, m);
    let _ = m.services();
}

/// A download request (`download --request` and the API's body). Properties: what validates
/// has a version, file name and URL the validators accept, a size above 0 and a lowercase MD5
/// of 32 hex digits, and validates again to itself.
pub fn request(data: &[u8]) {
    let Ok(p) = serde_json::from_slice::<Package>(data) else {
        return;
    };
    let Ok(p) = p.validated() else {
        return;
    };
    assert!(crate::validate::version(&p.version).is_ok());
    assert!(crate::validate::file_name(&p.package_name).is_ok());
    assert!(crate::validate::url(&p.package_url).is_ok());
    assert!(p.package_size > 0);
    assert!(
        p.package_md5.len() == 32
            && p.package_md5
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
        "{:?}",
        p.package_md5
    );
    assert_eq!(p.clone().validated().expect("validates again"), p);
}

/// state.json as a reader and a writer load it. Properties: a reader never changes the file;
/// what parses writes back to JSON that parses to the same state; a writer moves a state that
/// does not parse aside (its bytes kept whole) and starts idle, and keeps one that parses; a
/// state of a newer schema is `SCHEMA_TOO_NEW` for both, and left exactly as it was.
pub fn state_json(data: &[u8]) {
    let t = sandbox();
    let path = state::state_path(t.path());
    std::fs::write(&path, data).expect("write state.json");
    let read = match state::read(t.path()) {
        Ok(r) => r,
        Err(e) => {
            assert_eq!(
                crate::error::classify(&e).code,
                crate::error::ErrorCode::SchemaTooNew,
                "{e:#}"
            );
            let purpose = crate::lock::Purpose::brief("fuzz", "loading the state");
            let lock =
                crate::lock::StateLock::acquire(t.path(), &purpose, std::time::Duration::ZERO)
                    .expect("the lock");
            let e = state::load_for_write(&lock).expect_err("a writer refuses it too");
            assert_eq!(
                crate::error::classify(&e).code,
                crate::error::ErrorCode::SchemaTooNew
            );
            assert_eq!(std::fs::read(&path).expect("state.json"), data, "changed");
            return;
        }
    };
    assert_eq!(
        std::fs::read(&path).expect("state.json"),
        data,
        "a reader changed it"
    );
    let purpose = crate::lock::Purpose::brief("fuzz", "loading the state");
    let lock = crate::lock::StateLock::acquire(t.path(), &purpose, std::time::Duration::ZERO)
        .expect("the lock");
    let (loaded, corrupt) = state::load_for_write(&lock).expect("load for a writer");
    match read {
        ReadOutcome::Ok(s) => {
            assert!(!corrupt);
            assert_eq!(*s, loaded);
            let json = serde_json::to_vec(&*s).expect("serialize");
            let again: State = serde_json::from_slice(&json).expect("its own JSON parses");
            assert_eq!(again, *s);
            let _ = s.progress_data();
        }
        ReadOutcome::Corrupt(_) => {
            assert!(corrupt);
            assert_eq!(loaded.stage, state::Stage::Idle);
            let aside: Vec<_> = std::fs::read_dir(t.path())
                .expect("the state dir")
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
                .map(|e| std::fs::read(e.path()).expect("the file moved aside"))
                .collect();
            assert_eq!(aside, vec![data.to_vec()], "the corrupt state was not kept");
        }
        ReadOutcome::Missing => panic!("state.json was written"),
    }
}

/// The state.json the API target starts from, chosen by a byte: idle, a
/// download in flight, a package verified and ready, an install in flight.
fn api_state(first: u8) -> String {
    let pkg = r#""version":"1.2.0","package_url":"http://127.0.0.1:9/pkg.zip","package_name":"pkg.zip","package_size":1000,"package_md5":"0123456789abcdef0123456789abcdef""#;
    let now = crate::clock::now_rfc3339();
    match first % 4 {
        0 => r#"{"stage":"idle"}"#.to_string(),
        1 => format!(r#"{{"stage":"downloading","progress":40,{pkg},"bytes_downloaded":400}}"#),
        2 => format!(
            r#"{{"stage":"toInstall","progress":100,{pkg},"bytes_downloaded":1000,"verified_at":"{now}"}}"#
        ),
        _ => format!(r#"{{"stage":"installing","step":"before-switch",{pkg}}}"#),
    }
}

/// The HTTP API through the hyper service, in process: `data` is a byte that picks the state the
/// device is in ([`api_state`]), then what a client sends on one connection. Properties: the service
/// answers or closes within its deadline (never hangs); every answer begins with an HTTP/1.x
/// status line; an operation is started only by a POST to /download or /update, and never for
/// a request with an Origin header (a web page), a Host that is not loopback or a Content-Type
/// that is not JSON (none at all is accepted, as old clients send none); state.json is unchanged (serve writes it never; its children do, and here none
/// can start).
pub fn api(data: &[u8]) {
    use clap::Parser;
    let t = sandbox();
    let state_dir = t.path().join("state");
    std::fs::create_dir(&state_dir).expect("the state dir");
    let Some((&pick, data)) = data.split_first() else {
        return;
    };
    let state = api_state(pick);
    std::fs::write(state::state_path(&state_dir), &state).expect("state.json");
    std::fs::create_dir(state_dir.join(state::DOWNLOADS_DIR)).expect("downloads/");
    std::fs::write(state_dir.join(state::DOWNLOADS_DIR).join("pkg.zip"), b"PK").expect("a package");
    let versions = t.path().join("versions");
    let cli = crate::cli::Cli::try_parse_from([
        std::ffi::OsStr::new("tope-ota"),
        "--state-dir".as_ref(),
        state_dir.as_os_str(),
        "--versions-dir".as_ref(),
        versions.as_os_str(),
        "--report-url".as_ref(),
        "".as_ref(),
        "status".as_ref(),
    ])
    .expect("the CLI");
    let exe = t.path().join("no-such-tope-ota");
    let (out, starts) = crate::cmd::serve::exchange_in_memory(&cli.global, &exe, data);
    assert!(
        out.is_empty() || out.starts_with(b"HTTP/1.1 ") || out.starts_with(b"HTTP/1.0 "),
        "not an HTTP answer: {:?}",
        String::from_utf8_lossy(&out[..out.len().min(200)])
    );
    if starts > 0 {
        let text = String::from_utf8_lossy(data);
        let lower = text.to_ascii_lowercase();
        assert!(
            text.contains("POST /api/v1.0/download") || text.contains("POST /api/v1.0/update"),
            "an operation started without a POST to /download or /update"
        );
        // Judged per request where the connection carries one (a pipelined refused request
        // may stand beside one that starts).
        let single = text.matches(" HTTP/1.").count() <= 1;
        for line in lower.split("\r\n").filter(|_| single) {
            assert!(
                !line.starts_with("origin:"),
                "an operation started for a request with an Origin header"
            );
            // No Content-Type is accepted (old clients); one that is there is JSON.
            if let Some(ct) = line.strip_prefix("content-type:") {
                assert!(
                    crate::cmd::serve::is_json_media_type(ct.as_bytes()),
                    "an operation started for Content-Type {ct:?}"
                );
            }
            if let Some(host) = line.strip_prefix("host:") {
                let h = host.trim();
                assert!(
                    h.starts_with("127.")
                        || h.starts_with("localhost")
                        || h.starts_with("[::1]")
                        || h.starts_with("ip6-localhost"),
                    "an operation started for Host {h:?}"
                );
            }
        }
    }
    assert_eq!(
        std::fs::read_to_string(state::state_path(&state_dir)).expect("state.json"),
        state,
        "the API changed state.json"
    );
}

/// Splits `data` into `n` parts at the byte 0xff (the last part takes the rest).
fn parts(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut v: Vec<&[u8]> = data.splitn(n, |&b| b == 0xff).collect();
    v.resize(n, &[]);
    v
}

/// minisign key files and signatures: `data` is a key file, 0xff, a signature file, 0xff, the
/// signed bytes. Properties: a key file that does not parse is refused with
/// `SIGNATURE_INVALID`; a signature that verifies stops verifying when one byte of the payload
/// changes.
pub fn minisign(data: &[u8]) {
    let p = parts(data, 3);
    let t = sandbox();
    let keys = t.path().join("keys");
    std::fs::create_dir(&keys).expect("the keys dir");
    std::fs::write(keys.join("release.pub"), p[0]).expect("the key file");
    let payload = t.path().join("pkg.zip");
    std::fs::write(&payload, p[2]).expect("the payload");
    let keys = match crate::sign::load_keys(&keys) {
        Ok(k) => k,
        Err(e) => {
            assert_eq!(e.code, crate::error::ErrorCode::SignatureInvalid);
            return;
        }
    };
    assert_eq!(keys.len(), 1);
    let sig = String::from_utf8_lossy(p[1]);
    match crate::sign::verify_file(&payload, &sig, &keys) {
        Ok(name) => {
            assert_eq!(name, "release.pub");
            let mut changed = p[2].to_vec();
            if changed.is_empty() {
                changed.push(0);
            } else {
                changed[0] ^= 1;
            }
            std::fs::write(&payload, changed).expect("the payload");
            assert!(
                crate::sign::verify_file(&payload, &sig, &keys).is_err(),
                "a changed payload verifies"
            );
        }
        Err(e) => assert_eq!(e.code, crate::error::ErrorCode::SignatureInvalid),
    }
}

/// The package a test server serves in the HTTP target: 4,000 bytes, known to the checks.
fn served_package() -> Vec<u8> {
    (0..4000u32).map(|i| (i * 7 % 251) as u8).collect()
}

/// An HTTP answer's status and the value of its header `name` (case-insensitive), read from
/// its head by the letter.
fn answer_head(answer: &[u8]) -> (Option<u16>, impl Fn(&str) -> Option<String> + '_) {
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(answer.len());
    let head = String::from_utf8_lossy(&answer[..end]).into_owned();
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok());
    let header = move |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    (status, header)
}

/// The loopback server of [`http_headers`]: one for the process (a listener and its
/// connections per input would run out of ports at a fuzzer's rate), answering each request by
/// its Range with one of the three `answers` last given, then closing.
fn answering_server(answers: Vec<Vec<u8>>) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    use std::sync::{Mutex, OnceLock};
    static SERVER: OnceLock<(std::net::SocketAddr, &'static Mutex<Vec<Vec<u8>>>)> = OnceLock::new();
    let (addr, current) = SERVER.get_or_init(|| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let current: &'static Mutex<Vec<Vec<u8>>> = Box::leak(Box::new(Mutex::new(Vec::new())));
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else {
                    continue;
                };
                let _ = s.set_read_timeout(Some(std::time::Duration::from_millis(200)));
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
                    match s.read(&mut b) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let which = if head.contains("range: bytes=3488-3999\r\n") {
                    1
                } else if head.contains("range: bytes=0-9,") {
                    2
                } else {
                    0
                };
                let answer = current
                    .lock()
                    .map(|a| a.get(which).cloned().unwrap_or_default())
                    .unwrap_or_default();
                let _ = s.write_all(&answer);
            }
        });
        (addr, current)
    });
    *current.lock().unwrap_or_else(|e| e.into_inner()) = answers;
    *addr
}

/// Content-Range, ETag, Last-Modified, If-Range and multipart handling: `data` is three raw
/// HTTP answers separated by 0xff, which a loopback server gives: the first to a download
/// resumed at byte 1,000 of a 4,000-byte package with the validator `"v1"` (and to any request
/// without Range), the second to a delta's probe of the last 512 bytes, the third to a request
/// for the two ranges 0-9 and 100-119. Properties: the partial never holds more than the
/// package's size, and its hashes are of its bytes; bytes past the resume point are kept only
/// from a 206 whose Content-Range starts there and whose strong ETag, if any, is `"v1"`; a
/// probe is accepted only from a 206 with exactly the range asked and a strong ETag, and
/// gives 512 bytes; the two ranges come as exactly 10 and 20 bytes.
pub fn http_headers(data: &[u8]) {
    let answers: Vec<Vec<u8>> = parts(data, 3).into_iter().map(<[u8]>::to_vec).collect();
    let addr = answering_server(answers.clone());
    let url = format!("http://{addr}/pkg.zip");
    let pkg = served_package();
    let size = pkg.len() as u64;
    let tuning = crate::fetch::Tuning {
        retries: 0,
        ..crate::fetch::Tuning::from_env()
    };

    // A resumed plain download.
    let t = sandbox();
    let part = t.path().join("pkg.zip.part");
    std::fs::write(&part, &pkg[..1000]).expect("the partial");
    struct Quiet;
    impl crate::fetch::Sink for Quiet {
        fn checkpoint(&mut self, _: u64, _: Option<&str>) -> anyhow::Result<()> {
            Ok(())
        }
        fn tick(&mut self, _: u64) {}
        fn account(&mut self, _: u64, _: u64) {}
        fn stop_requested(&self) -> bool {
            false
        }
    }
    let req = crate::fetch::Request {
        url: &url,
        size,
        offset: 1000,
        validator: Some("\"v1\"".into()),
        sha256: false,
    };
    let r = crate::fetch::fetch(&part, req, &tuning, &mut Quiet);
    let got = std::fs::read(&part).unwrap_or_default();
    assert!(got.len() as u64 <= size, "{} bytes of {size}", got.len());
    if let Ok(crate::fetch::Outcome::Complete(d)) = &r {
        // The hashes are of the bytes in the partial, every one of them.
        assert_eq!(got.len() as u64, size, "complete with {} bytes", got.len());
        use md5::Digest;
        assert_eq!(d.md5, crate::fetch::hex(&md5::Md5::digest(&got)));
    }
    let (status, header) = answer_head(&answers[0]);
    if got.len() > 1000 && got[..1000] == pkg[..1000] && status != Some(200) {
        // Kept the resume point and added to it: only a 206 that starts there, of "v1".
        let cr = header("content-range").unwrap_or_default();
        assert!(
            status == Some(206) && cr.starts_with("bytes 1000-"),
            "bytes past the resume point kept from {status:?} {cr:?}"
        );
        if let Some(etag) = header("etag").filter(|e| e.starts_with('"')) {
            assert_eq!(etag, "\"v1\"", "bytes of another ETag kept");
        }
    }

    // A delta's probe and two ranges in one request.
    if let Ok((mut remote, tail)) = crate::remote::Remote::probe(&url, size, 512, &tuning) {
        let (status, header) = answer_head(&answers[1]);
        assert_eq!(status, Some(206), "a probe accepted from {status:?}");
        assert_eq!(
            header("content-range").as_deref(),
            Some("bytes 3488-3999/4000"),
            "a probe accepted with another range"
        );
        assert!(
            header("etag").is_some_and(|e| e.starts_with('"')),
            "a probe accepted without a strong ETag"
        );
        assert_eq!(tail.len(), 512, "the probe's tail");
        if let Ok(mut batch) = remote.open(&[(0, 10), (100, 120)]) {
            let mut a = Vec::new();
            if remote.read_next(&mut batch, 0, 10, &mut a).is_ok() {
                assert_eq!(a.len(), 10);
                let mut b = Vec::new();
                if remote.read_next(&mut batch, 100, 120, &mut b).is_ok() {
                    assert_eq!(b.len(), 20);
                }
            }
        }
    }
}

/// The delta planner over a package's end records and central directory: `data` is a
/// package. The directory is read as a delta reads it (by ranges, with its caps), every entry
/// under `bin/` or `data/` is taken as present in `current` with its size and CRC-32, and a
/// plan is made with deflate and headers proven (when the first byte is odd) or not, and runs
/// merged (the default) or not (bit 1 of the first byte).
/// Properties: the plan's pieces cover the package exactly, in order, none empty; regenerated
/// pieces lie before the directory; fetched plus regenerated bytes are the package's size; the
/// cost model gives finite figures.
pub fn delta_plan(data: &[u8]) {
    let len = data.len() as u64;
    let limits = zipdir::Limits {
        max_entries: 20_000,
        max_cd_size: 2 << 20,
        ..zipdir::Limits::default()
    };
    let Ok(dir) = zipdir::read_directory(len, &limits, |a, b| {
        Ok(data
            .get(usize::try_from(a).unwrap_or(usize::MAX)..usize::try_from(b).unwrap_or(usize::MAX))
            .map(<[u8]>::to_vec)
            .unwrap_or_default())
    }) else {
        return;
    };
    let module = |d: &str| Module {
        name: d.into(),
        src: d.into(),
        dst: d.into(),
        ..serde_json::from_str::<Module>(r#"{"name":"x","src":"x","dst":"x"}"#).expect("a module")
    };
    let m = Manifest {
        version: "1.2.0".into(),
        modules: vec![module("bin"), module("data")],
        reboot: false,
        mutable: None,
        migrate: None,
    };
    let cands = delta::candidates(&dir, &m);
    let view: HashMap<String, LocalFile> = cands
        .iter()
        .map(|c| {
            let e = &dir.entries[c.entry];
            (
                c.local.clone(),
                LocalFile {
                    size: e.uncompressed_size,
                    crc32: e.crc32,
                },
            )
        })
        .collect();
    let first = data.first().copied().unwrap_or(0);
    let defaults = PlanOptions::default();
    let opts = PlanOptions {
        deflate_proven: first & 1 == 1,
        headers_proven: first & 1 == 1,
        // Bit 1: no merging, so that every regenerated run stays a piece of its own.
        merge_gap: if first & 2 == 2 {
            0
        } else {
            defaults.merge_gap
        },
    };
    let _ = delta::calibration_entry(&dir, &cands, &view);
    let Ok(plan) = delta::plan(&dir, &cands, &view, &opts) else {
        return;
    };
    let mut pos = 0u64;
    let (mut fetched, mut reused) = (0u64, 0u64);
    for p in &plan.pieces {
        let (a, b) = p.range();
        assert_eq!(a, pos, "pieces not contiguous: {:?}", plan.pieces);
        assert!(b > a, "an empty piece: {p:?}");
        match p {
            delta::Piece::Fetch { .. } => fetched += b - a,
            _ => {
                assert!(
                    b <= dir.end.cd_start,
                    "regenerated past the directory: {p:?}"
                );
                reused += b - a;
            }
        }
        pos = b;
    }
    assert_eq!(pos, len, "the pieces end at {pos} of {len}");
    assert_eq!(fetched + reused, len);
    assert_eq!(fetched, plan.fetch_bytes);
    let rates = delta::Rates {
        rtt: 0.05,
        link: 2e6,
        deflate: 25e6,
        stored: 200e6,
    };
    let (d, f) = delta::remaining_cost(&dir, &plan.pieces, 0, len, &rates, 64);
    assert!(
        d.is_finite() && f.is_finite() && d >= 0.0 && f >= 0.0,
        "{d} {f}"
    );
}
