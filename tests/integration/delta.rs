//! `download` by delta (issue 15): ranges of a package, whole downloads assembled from
//! `current` and ranges, and their fallbacks to a full download.

use crate::download::{args, download, pkg, Pkg};
use crate::support::*;
use std::time::{Duration, Instant};

// The decision's tests pin the regeneration rate, a hook of failpoints builds only.
#[cfg(feature = "failpoints")]
mod links;

// ---------------------------------------------------------------- delta: ranges of a package

/// A package of `files` files with long names (so that its directory grows), packed by `pack`.
fn delta_package(files: usize) -> Vec<u8> {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("bin");
    std::fs::create_dir_all(&d).unwrap();
    for i in 0..files {
        let name = format!("module-{i:05}-with-a-rather-long-name-for-the-directory.so");
        std::fs::write(d.join(name), data(200 + i % 300, i as u64)).unwrap();
    }
    let manifest = br#"{"version":"2.0.0","modules":[{"name":"bin","src":"bin","dst":"bin"}]}"#;
    tope_ota::packer::write_package(std::io::Cursor::new(Vec::new()), manifest, t.path())
        .unwrap()
        .into_inner()
}

fn delta_remote(
    srv: &PkgServer,
    len: usize,
) -> anyhow::Result<(tope_ota::remote::Remote, Vec<u8>)> {
    tope_ota::remote::Remote::probe(
        &srv.url("p.zip"),
        len as u64,
        tope_ota::remote::PROBE_TAIL,
        &tope_ota::fetch::Tuning::default(),
    )
}

fn is_unavailable(e: &anyhow::Error) -> bool {
    e.downcast_ref::<tope_ota::remote::Unavailable>().is_some()
}

/// The server's count of body bytes sent, once it reaches `want` (or 5 s have passed): the
/// server adds a response's bytes after its write returns, and a client that has read them
/// all can look before it does.
fn body_bytes_reaching(srv: &PkgServer, want: u64) -> u64 {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let n = srv.body_bytes();
        if n >= want || Instant::now() > until {
            return n;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The server's count of body bytes sent, once it no longer moves (see [`body_bytes_reaching`]).
fn settled_body_bytes(srv: &PkgServer) -> u64 {
    let mut last = srv.body_bytes();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let n = srv.body_bytes();
        if n == last {
            return n;
        }
        last = n;
    }
}

#[test]
fn delta_reads_the_directory_by_range_in_the_probe() {
    let pkg = delta_package(20);
    let srv = PkgServer::start(pkg.clone(), Behaviour::default());
    let (mut r, tail) = delta_remote(&srv, pkg.len()).unwrap();
    let dir = r.directory(&tail, &Default::default()).unwrap();
    let zip = zip::ZipArchive::new(std::io::Cursor::new(&pkg)).unwrap();
    assert_eq!(dir.entries.len(), zip.len());
    // A small package: the probe held the whole directory, one request, the tail's bytes.
    assert_eq!(srv.requests().len(), 1);
    assert_eq!(r.link.requests, 1);
    let tail = (pkg.len() as u64).min(tope_ota::remote::PROBE_TAIL);
    let sent = body_bytes_reaching(&srv, tail);
    assert_eq!(sent, tail);
    assert_eq!(r.received, sent);
    // A range of the package, checked byte for byte, with If-Match.
    let e = &dir.entries[3];
    let got = r
        .get(e.local_header_offset, e.local_header_offset + 30)
        .unwrap();
    let at = e.local_header_offset as usize;
    assert!(got == pkg[at..at + 30]);
    let seen = srv.requests();
    assert_eq!(seen[1].headers.get("if-match").unwrap(), "\"pkg-etag-1\"");
    assert_eq!(seen[1].range().unwrap(), format!("bytes={at}-{}", at + 29));
}

#[test]
fn delta_reads_a_large_directory_with_one_more_range() {
    let pkg = delta_package(3000);
    let srv = PkgServer::start(pkg.clone(), Behaviour::default());
    let (mut r, tail) = delta_remote(&srv, pkg.len()).unwrap();
    let dir = r.directory(&tail, &Default::default()).unwrap();
    assert_eq!(dir.entries.len(), 3002, "manifest, bin/ and the files");
    assert!(dir.end.cd_size > tope_ota::remote::PROBE_TAIL);
    let seen = srv.requests();
    assert_eq!(seen.len(), 2, "the probe and the directory");
    assert_eq!(
        seen[1].range().unwrap(),
        format!("bytes={}-{}", dir.end.cd_start, dir.end.end_start - 1)
    );
    // What was sent: the tail and the directory, a fraction of the package.
    let want = tope_ota::remote::PROBE_TAIL + dir.end.cd_size;
    let sent = body_bytes_reaching(&srv, want);
    assert_eq!(sent, want);
    assert!(sent < pkg.len() as u64 / 2, "{sent} of {}", pkg.len());
}

#[test]
fn delta_is_unavailable_from_servers_that_do_not_keep_to_ranges() {
    let pkg = delta_package(5);
    // Range ignored: 200.
    let srv = PkgServer::start(
        pkg.clone(),
        Behaviour {
            honor_range: false,
            ..Behaviour::default()
        },
    );
    let e = delta_remote(&srv, pkg.len()).err().unwrap();
    assert!(is_unavailable(&e), "{e:#}");
    assert!(e.to_string().contains("200"), "{e}");
    // No ETag, or a weak one.
    for etag in [None, Some("W/\"x\"".to_string())] {
        let srv = PkgServer::start(
            pkg.clone(),
            Behaviour {
                etag,
                ..Behaviour::default()
            },
        );
        let e = delta_remote(&srv, pkg.len()).err().unwrap();
        assert!(is_unavailable(&e), "{e:#}");
    }
    // Another size than the request's.
    let srv = PkgServer::start(pkg.clone(), Behaviour::default());
    let e = delta_remote(&srv, pkg.len() + 1).err().unwrap();
    assert!(is_unavailable(&e), "{e:#}");
    // A range shorter than asked (a capped CDN): never taken for the bytes asked.
    let srv = PkgServer::start(pkg.clone(), Behaviour::default());
    let (mut r, _) = delta_remote(&srv, pkg.len()).unwrap();
    srv.set(|b| b.max_range = Some(10));
    let e = r.get(0, 100).err().unwrap();
    assert!(is_unavailable(&e), "{e:#}");
    // The package replaced on the server: If-Match fails.
    srv.set(|b| {
        b.max_range = None;
        b.etag = Some("\"pkg-etag-2\"".into());
    });
    let e = r.get(0, 100).err().unwrap();
    assert!(
        e.downcast_ref::<tope_ota::remote::Changed>().is_some(),
        "{e:#}"
    );
    assert_eq!(srv.requests().last().unwrap().status, 412);
    // Not a ZIP.
    let srv = PkgServer::start(data(100_000, 3), Behaviour::default());
    let (mut r, tail) = delta_remote(&srv, 100_000).unwrap();
    let e = r.directory(&tail, &Default::default()).err().unwrap();
    assert!(
        is_unavailable(&e) && e.to_string().contains("not a ZIP"),
        "{e:#}"
    );
}

// ---------------------------------------------------------------- delta: whole downloads

/// `current` -> v1.0.0 holding `bin/` of 40 files (text and random data); the package of
/// v2.0.0, the same files but `changed` ones, packed by `pack`.
/// A sandbox that tries a delta whatever the link (the default, `auto`, declines one on
/// loopback, where a full download is sooner).
fn delta_env() -> Env {
    let mut env = Env::new();
    env.set("TOPE_OTA_DELTA", "always");
    env
}

fn delta_setup(env: &Env, changed: &[usize]) -> Pkg {
    let t = delta_trees(env, changed);
    let manifest = br#"{"version":"1.2.0","modules":[{"name":"bin","src":"bin","dst":"bin"}]}"#;
    let bytes =
        tope_ota::packer::write_package(std::io::Cursor::new(Vec::new()), manifest, t.path())
            .unwrap()
            .into_inner();
    let md5 = md5_hex(&bytes);
    Pkg { bytes, md5 }
}

/// `current` -> v1.0.0 holding `bin/` of 40 files of 20,000 bytes (text and random data); the
/// tree of v2.0.0 returned: the same files but `changed` ones, with no manifest.
fn delta_trees(env: &Env, changed: &[usize]) -> tempfile::TempDir {
    let make = |root: &std::path::Path, v2: bool| {
        let d = root.join("bin");
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..40usize {
            let seed = if v2 && changed.contains(&i) {
                1000 + i
            } else {
                i
            } as u64;
            let bytes = if i % 2 == 0 {
                // Text that deflates.
                let words = data(4_000, seed);
                words
                    .iter()
                    .flat_map(|b| format!("G1 X{} Y{} ", b % 10, b / 10).into_bytes())
                    .take(20_000)
                    .collect()
            } else {
                data(20_000, seed)
            };
            std::fs::write(d.join(format!("lib{i:02}.so")), bytes).unwrap();
        }
    };
    let v1 = env.versions_dir.join("v1.0.0");
    make(&v1, false);
    std::os::unix::fs::symlink("v1.0.0", env.versions_dir.join("current")).unwrap();
    let t = tempfile::tempdir().unwrap();
    make(t.path(), true);
    t
}

#[test]
fn delta_download_reuses_current_and_fetches_what_changed() {
    let env = delta_env();
    let p = delta_setup(&env, &[3, 4]);
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    let r = download(&env, &srv, &p);
    r.expect(0);
    assert_eq!(env.state()["stage"], "toInstall");
    let got = std::fs::read(env.downloads().join("pkg.zip")).unwrap();
    assert!(got == p.bytes, "the assembled package is the package");
    // Two of 40 files changed (2 × ~20 KB, one of them random) + the tail, the manifest, the
    // calibration entry and the local headers around the changed entries.
    let sent = srv.body_bytes();
    let len = p.bytes.len() as u64;
    eprintln!(
        "delta: {sent} of {len} bytes sent in {} requests",
        srv.requests().len()
    );
    assert!(sent < len / 3, "{sent} of {len}");
    assert!(srv
        .requests()
        .iter()
        .skip(1)
        .all(|q| q.headers.get("if-match").map(String::as_str) == Some("\"pkg-etag-1\"")));
}

#[test]
fn delta_download_falls_back_to_a_full_download_when_ranges_lie() {
    let env = delta_env();
    let p = delta_setup(&env, &[3]);
    // The probe, the manifest and the calibration are true; the assembly's ranges lie.
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            corrupt_ranges_from: Some(3),
            ..Behaviour::default()
        },
    );
    let r = download(&env, &srv, &p);
    r.expect(0);
    let got = std::fs::read(env.downloads().join("pkg.zip")).unwrap();
    assert!(got == p.bytes);
    let full = srv
        .requests()
        .iter()
        .filter(|q| q.range().is_none())
        .count();
    assert_eq!(full, 1, "one full download after the failed delta");
    assert!(srv.body_bytes() > p.bytes.len() as u64);
}

#[test]
fn delta_download_is_skipped_by_a_server_that_ignores_range() {
    let env = delta_env();
    let p = delta_setup(&env, &[3]);
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            honor_range: false,
            ..Behaviour::default()
        },
    );
    download(&env, &srv, &p).expect(0);
    let got = std::fs::read(env.downloads().join("pkg.zip")).unwrap();
    assert!(got == p.bytes);
    assert_eq!(env.state()["stage"], "toInstall");
}

#[cfg(feature = "failpoints")]
#[test]
fn delta_download_killed_mid_assembly_resumes() {
    let mut env = delta_env();
    let p = delta_setup(&env, &[3, 30]);
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    env.set("TOPE_OTA_FAILPOINT", "delta-checkpoint");
    env.set("TOPE_OTA_FAILPOINT_HIT", "3");
    let r = download(&env, &srv, &p);
    assert_eq!(r.code, 128 + 9, "killed: {}", r.stderr);
    let st = env.state();
    assert_eq!(st["stage"], "downloading");
    let durable = st["bytes_downloaded"].as_u64().unwrap();
    assert!(durable > 0 && durable < p.bytes.len() as u64, "{durable}");
    // What is durable is the package's own prefix.
    let part = std::fs::read(env.downloads().join("pkg.zip.part")).unwrap();
    assert!(part.len() as u64 >= durable);
    assert!(part[..durable as usize] == p.bytes[..durable as usize]);
    env.vars.remove("TOPE_OTA_FAILPOINT");
    env.vars.remove("TOPE_OTA_FAILPOINT_HIT");
    let (before, sent) = (srv.requests().len(), srv.body_bytes());
    download(&env, &srv, &p).expect(0);
    let got = std::fs::read(env.downloads().join("pkg.zip")).unwrap();
    assert!(got == p.bytes);
    // The resume continues the plan from the durable bytes (probe, directory and calibration
    // again, then closed ranges on the same ETag), not a plain download of the rest.
    let resumed = &srv.requests()[before..];
    assert!(
        resumed
            .iter()
            .all(|q| q.range().is_some_and(|r| !r.ends_with('-'))),
        "{resumed:?}"
    );
    let rest = p.bytes.len() as u64 - durable;
    assert!(
        srv.body_bytes() - sent < rest / 2,
        "{} of {rest}",
        srv.body_bytes() - sent
    );
    let st = env.state();
    assert!(st["bytes_reused"].as_u64() > Some(0), "{st}");
    assert!(
        st["bytes_fetched"].as_u64() >= Some(srv.body_bytes() - sent),
        "{st}"
    );
}

#[test]
fn delta_download_is_not_tried_without_current_nor_kept_for_a_non_zip() {
    // No current: no probe, one plain request.
    let env = delta_env();
    let p = pkg(300_000, 5);
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    download(&env, &srv, &p).expect(0);
    assert_eq!(srv.requests().len(), 1);
    assert!(srv.requests()[0].range().is_none());
    // A current, but a package that is not a ZIP: the probe, the last 64 KiB (where an EOCD
    // with a long comment would be), then the full download.
    let env = delta_env();
    std::fs::create_dir_all(env.versions_dir.join("v1.0.0/bin")).unwrap();
    std::os::unix::fs::symlink("v1.0.0", env.versions_dir.join("current")).unwrap();
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    download(&env, &srv, &p).expect(0);
    let seen = srv.requests();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen[0].range().is_some() && seen[1].range().is_some() && seen[2].range().is_none());
    assert!(std::fs::read(env.downloads().join("pkg.zip")).unwrap() == p.bytes);
    let wasted = srv.body_bytes() - p.bytes.len() as u64;
    assert!(wasted <= tope_ota::remote::PROBE_TAIL + 65_633, "{wasted}");
}

#[test]
fn delta_download_full_downloads_the_whole_package() {
    let env = delta_env();
    let p = delta_setup(&env, &[3]);
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    let url = srv.url("pkg.zip");
    let size = p.bytes.len().to_string();
    let mut a = args(&url, &p, &size);
    a.push("--full");
    env.run(&a).expect(0);
    assert_eq!(srv.requests().len(), 1);
    assert!(srv.requests()[0].range().is_none());
    assert_eq!(srv.body_bytes(), p.bytes.len() as u64);
    assert!(std::fs::read(env.downloads().join("pkg.zip")).unwrap() == p.bytes);
}

/// After a stop: exit 143, stage downloading, the durable bytes are the package's own prefix,
/// and the next download finishes the package.
#[track_caller]
fn assert_stopped_then_resumes(env: &Env, srv: &PkgServer, p: &Pkg, out: &std::process::Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let st = env.state();
    assert_eq!(out.status.code(), Some(143), "{stderr}\n{st}");
    assert_eq!(st["stage"], "downloading", "{st}");
    let durable = st["bytes_downloaded"].as_u64().unwrap() as usize;
    let part = std::fs::read(env.downloads().join("pkg.zip.part")).unwrap_or_default();
    assert!(
        part.len() >= durable,
        "{durable} durable, {} in the partial",
        part.len()
    );
    assert!(part[..durable] == p.bytes[..durable]);
    srv.set(|b| b.throttle = None);
    download(env, srv, p).expect(0);
    assert!(std::fs::read(env.downloads().join("pkg.zip")).unwrap() == p.bytes);
}

/// `download -v` of `p` stopped by SIGTERM while the server holds its answer at the gate; the
/// requests made up to the gate and the process's output.
fn sigterm_at_the_gate(env: &Env, srv: &PkgServer, p: &Pkg) -> (Vec<Seen>, std::process::Output) {
    let url = srv.url("pkg.zip");
    let size = p.bytes.len().to_string();
    let mut a = vec!["-v"];
    a.extend(args(&url, p, &size));
    let child = env.spawn(&a);
    srv.wait_gate(20);
    let seen = srv.requests();
    kill(&child, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(100));
    srv.release();
    (seen, child.wait_with_output().unwrap())
}

#[test]
fn delta_download_stops_inside_a_range_on_sigterm_and_resumes() {
    let env = delta_env();
    // Every random file changed: long fetched ranges.
    let changed: Vec<usize> = (1..40).step_by(2).collect();
    let p = delta_setup(&env, &changed);
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            throttle: Some((2000, Duration::from_millis(20))),
            ..Behaviour::default()
        },
    );
    let url = srv.url("pkg.zip");
    let size = p.bytes.len().to_string();
    let child = env.spawn(&args(&url, &p, &size));
    // Into the assembly: the probe, the manifest and the calibration are done.
    let until = Instant::now() + Duration::from_secs(20);
    while srv.requests().len() < 4 {
        assert!(Instant::now() < until, "no assembly: {:?}", srv.requests());
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(150));
    let t0 = Instant::now();
    kill(&child, libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(env.state()["bytes_downloaded"].as_u64() > Some(0));
    assert_stopped_then_resumes(&env, &srv, &p, &out);
}

/// SIGTERM before the assembly (here while the manifest comes) is answered before `current` is
/// read and the calibration fetched, as a stop (not a delta declined); the next download goes on.
#[test]
fn delta_download_stops_before_reading_current_on_sigterm() {
    let env = delta_env();
    let p = delta_setup(&env, &[3]);
    let mut ar = zip::ZipArchive::new(std::io::Cursor::new(&p.bytes)).unwrap();
    let at = ar.by_name("manifest.json").unwrap().data_start().unwrap() + 1;
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            gate_at: Some(at),
            ..Behaviour::default()
        },
    );
    let (seen, out) = sigterm_at_the_gate(&env, &srv, &p);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Stopped, not declined (an empty view of current is not a reason), and no calibration.
    assert!(
        !stderr.contains("no delta") && !stderr.contains("delta calibration"),
        "{stderr}"
    );
    assert_eq!(srv.requests().len(), seen.len(), "{:?}", srv.requests());
    assert_stopped_then_resumes(&env, &srv, &p, &out);
}

// ---------------------------------------------------------------- delta: packages of every kind

/// The download with `-v`: the delta's decisions (and its reasons for not being used) are
/// logged at info, on stderr.
fn download_v(env: &Env, srv: &PkgServer, p: &Pkg) -> Run {
    let url = srv.url("pkg.zip");
    let size = p.bytes.len().to_string();
    let mut a = vec!["-v"];
    a.extend(args(&url, p, &size));
    env.run(&a)
}

/// The download succeeded and `downloads/pkg.zip` is the package, byte for byte.
#[track_caller]
fn assert_downloaded(env: &Env, run: &Run, p: &Pkg) {
    run.expect(0);
    assert_eq!(env.state()["stage"], "toInstall", "{}", run.stderr);
    let got = std::fs::read(env.downloads().join("pkg.zip")).unwrap();
    assert!(
        got == p.bytes,
        "the downloaded file differs from the package served\n{}",
        run.stderr
    );
}

fn pkg_of(bytes: Vec<u8>) -> Pkg {
    let md5 = md5_hex(&bytes);
    Pkg { bytes, md5 }
}

/// `[a, b]` of a request's `Range: bytes=a-b`.
/// The closed ranges `bytes=A-B[,C-D…]` a request asked for.
fn closed_ranges(q: &Seen) -> Vec<(u64, u64)> {
    let Some(spec) = q.range().and_then(|r| r.strip_prefix("bytes=")) else {
        return Vec::new();
    };
    spec.split(',')
        .filter_map(|r| {
            let (a, b) = r.trim().split_once('-')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect()
}

#[test]
fn delta_download_fetches_a_file_of_current_modified_in_place() {
    // The baseline: current holds every file of the package.
    let env0 = delta_env();
    let p = delta_setup(&env0, &[]);
    let srv0 = PkgServer::start(p.bytes.clone(), Behaviour::default());
    assert_downloaded(&env0, &download_v(&env0, &srv0, &p), &p);
    let base = settled_body_bytes(&srv0);
    // The same, but one byte of a file of current flipped in place: same size, other CRC-32.
    let env = delta_env();
    assert!(delta_setup(&env, &[]).bytes == p.bytes);
    let f = env.versions_dir.join("v1.0.0/bin/lib05.so");
    let mut b = std::fs::read(&f).unwrap();
    b[10_000] ^= 0x20;
    std::fs::write(&f, &b).unwrap();
    assert_eq!(std::fs::metadata(&f).unwrap().len(), 20_000);
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    let run = download_v(&env, &srv, &p);
    assert_downloaded(&env, &run, &p);
    // The delta was used (no full request, an assembly) and the entry fetched, not regenerated.
    assert!(
        srv.requests().iter().all(|q| q.range().is_some()),
        "{:?}",
        srv.requests()
    );
    assert!(
        run.stderr.contains("entries reused from current"),
        "{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("no longer regenerates"),
        "the CRC-32 was not looked at: {}",
        run.stderr
    );
    let mut ar = zip::ZipArchive::new(std::io::Cursor::new(&p.bytes)).unwrap();
    let e = ar.by_name("bin/lib05.so").unwrap();
    let (data, csize) = (e.data_start().unwrap(), e.compressed_size());
    drop(e);
    assert!(
        srv.requests()
            .iter()
            .flat_map(closed_ranges)
            .any(|(a, b)| a <= data && b + 1 >= data + csize),
        "no range holds the entry's data [{data}, {}): {:?}",
        data + csize,
        srv.requests()
    );
    let sent = settled_body_bytes(&srv);
    let len = p.bytes.len() as u64;
    eprintln!("modified in place: {sent} of {len} bytes sent (baseline {base})");
    assert!(sent >= base + csize, "{sent} < {base} + {csize}");
    // The 39 other files were regenerated.
    assert!(sent < len / 4, "{sent} of {len}");
}

/// `pkg` (a ZIP without comment) with the records of its last `cut` directory entries taken
/// out. The end record is kept as it was, claiming the bytes and entries cut, or with
/// `fix_size` the directory's size set to what is left, so that only the count claims more.
fn cut_directory(pkg: &[u8], cut: usize, fix_size: bool) -> Vec<u8> {
    let u16_at = |i: usize| u16::from_le_bytes([pkg[i], pkg[i + 1]]) as usize;
    let u32_at = |i: usize| u32::from_le_bytes(pkg[i..i + 4].try_into().unwrap()) as usize;
    let eocd = pkg.len() - 22;
    assert_eq!(u32_at(eocd), 0x0605_4b50);
    let (n, size, start) = (u16_at(eocd + 10), u32_at(eocd + 12), u32_at(eocd + 16));
    let mut at = start;
    let mut records = Vec::new();
    while at < start + size {
        assert_eq!(u32_at(at), 0x0201_4b50);
        records.push(at);
        at += 46 + u16_at(at + 28) + u16_at(at + 30) + u16_at(at + 32);
    }
    assert_eq!(records.len(), n);
    let from = records[n - cut];
    let mut out = pkg[..from].to_vec();
    out.extend_from_slice(&pkg[start + size..]);
    if fix_size {
        let e = out.len() - 22;
        out[e + 12..e + 16].copy_from_slice(&((from - start) as u32).to_le_bytes());
    }
    out
}

#[test]
fn delta_download_of_a_cut_directory_or_end_record_is_a_full_download() {
    let env = delta_env();
    let good = delta_setup(&env, &[3]).bytes;
    let cases = [
        (
            "the end record claims directory bytes and entries that are not there",
            cut_directory(&good, 3, false),
            "no delta: invalid ZIP directory: ",
        ),
        (
            "the end record claims entries that are not there",
            cut_directory(&good, 3, true),
            "no delta: truncated ZIP: ",
        ),
        (
            "the end record cut off",
            good[..good.len() - 10].to_vec(),
            "no delta: not a ZIP: ",
        ),
    ];
    for (what, bytes, reason) in cases {
        let env = delta_env();
        delta_setup(&env, &[3]);
        // The package is whatever the server serves: its size and MD5 are the request's.
        let p = pkg_of(bytes);
        let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
        let run = download_v(&env, &srv, &p);
        assert_downloaded(&env, &run, &p);
        assert!(run.stderr.contains(reason), "{what}: {}", run.stderr);
        assert!(
            !run.stderr.contains("entries reused from current"),
            "{what}"
        );
        let seen = srv.requests();
        let full: Vec<_> = seen.iter().filter(|q| q.range().is_none()).collect();
        assert_eq!(full.len(), 1, "{what}: {seen:?}");
        assert!(seen.last().unwrap().range().is_none(), "{what}: {seen:?}");
        // Only the end of the package was read before the full download.
        let wasted = settled_body_bytes(&srv) - p.bytes.len() as u64;
        assert!(
            wasted <= tope_ota::remote::PROBE_TAIL + 65_633,
            "{what}: {wasted}"
        );
    }
}

/// Run a Python script with `args`; its stdout.
fn python(script: &str, args: &[&std::ffi::OsStr]) -> String {
    let o = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "python3: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

const BIN_MANIFEST: &str =
    r#"{"version":"1.2.0","modules":[{"name":"bin","src":"bin","dst":"bin"}]}"#;

/// Bytes of the files of `tree` (under `bin/`) that `current` holds the same.
fn same_in_current(env: &Env, tree: &std::path::Path) -> u64 {
    let mut same = 0;
    for e in std::fs::read_dir(tree.join("bin")).unwrap() {
        let e = e.unwrap();
        let b = std::fs::read(e.path()).unwrap();
        let c = std::fs::read(env.versions_dir.join("current/bin").join(e.file_name()));
        if c.is_ok_and(|c| c == b) {
            same += b.len() as u64;
        }
    }
    same
}

#[test]
fn delta_download_of_a_zip64_package_by_python() {
    let env = delta_env();
    let tree = delta_trees(&env, &[3]);
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("py64.zip");
    // ZIP64_LIMIT lowered: every file over 1 KiB gets ZIP64 extra fields, in its local header
    // and in the directory (with its offset past 1 KiB), and the package the ZIP64 end records.
    // The manifest deflated, the files stored (regenerable whatever the compressor).
    let script = "import os, sys, zipfile\n\
        zipfile.ZIP64_LIMIT = 1024\n\
        root, out, manifest = sys.argv[1], sys.argv[2], sys.argv[3]\n\
        with zipfile.ZipFile(out, 'w', zipfile.ZIP_DEFLATED) as z:\n\
        \x20   z.writestr('manifest.json', manifest)\n\
        \x20   for d, dirs, files in sorted(os.walk(root)):\n\
        \x20       dirs.sort()\n\
        \x20       for f in sorted(files):\n\
        \x20           p = os.path.join(d, f)\n\
        \x20           z.write(p, os.path.relpath(p, root), compress_type=zipfile.ZIP_STORED)\n";
    python(
        script,
        &[
            tree.path().as_os_str(),
            out.as_os_str(),
            BIN_MANIFEST.as_ref(),
        ],
    );
    // What Python wrote: the ZIP64 end record and locator, ZIP64 extra fields in the directory.
    let check = "import sys, zipfile\n\
        d = open(sys.argv[1], 'rb').read()\n\
        z = zipfile.ZipFile(sys.argv[1])\n\
        x = [i for i in z.infolist() if i.extra[:2] == b'\\x01\\x00']\n\
        print(b'PK\\x06\\x06' in d, b'PK\\x06\\x07' in d, len(x), len(z.infolist()))\n";
    assert_eq!(python(check, &[out.as_os_str()]).trim(), "True True 40 41");
    let p = pkg_of(std::fs::read(&out).unwrap());
    let reusable = same_in_current(&env, tree.path());
    assert_eq!(reusable, 39 * 20_000);
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    let run = download_v(&env, &srv, &p);
    eprintln!("{}", run.stderr);
    assert_downloaded(&env, &run, &p);
    let sent = settled_body_bytes(&srv);
    let len = p.bytes.len() as u64;
    eprintln!(
        "ZIP64 by Python: {sent} of {len} bytes sent in {} requests",
        srv.requests().len()
    );
    assert!(
        srv.requests().iter().all(|q| q.range().is_some()),
        "a full download: {:?}",
        srv.requests()
    );
    assert!(
        run.stderr.contains("entries reused from current"),
        "{}",
        run.stderr
    );
    // Every stored file current holds was regenerated; what was sent beyond the rest is the
    // probe's tail (the directory and end records, fetched again by the plan), the manifest,
    // and the part headers of the multi-range answers (about 100 bytes a range).
    let ranges: u64 = srv
        .requests()
        .iter()
        .map(|q| closed_ranges(q).len() as u64)
        .sum();
    assert!(
        sent + reusable <= len + tope_ota::remote::PROBE_TAIL + 1024 + 100 * ranges,
        "{sent} sent of {len}, {reusable} of it in current"
    );
}

#[test]
fn delta_download_of_a_package_made_by_info_zip() {
    let env = delta_env();
    let tree = delta_trees(&env, &[3]);
    std::fs::write(tree.path().join("manifest.json"), BIN_MANIFEST).unwrap();
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("izip.zip");
    let o = std::process::Command::new("zip")
        .args(["-q", "-9", "-r"])
        .arg(&out)
        .args(["manifest.json", "bin"])
        .current_dir(tree.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let p = pkg_of(std::fs::read(&out).unwrap());
    // What zip made of it: random files stored (deflate would grow them), text deflated.
    let mut ar = zip::ZipArchive::new(std::io::Cursor::new(&p.bytes)).unwrap();
    let (mut stored, mut deflated) = (0u64, 0u64);
    for i in 0..ar.len() {
        let e = ar.by_index_raw(i).unwrap();
        if !e.is_file() || e.name() == "manifest.json" || e.name() == "bin/lib03.so" {
            continue;
        }
        match e.compression() {
            zip::CompressionMethod::Stored => stored += e.compressed_size(),
            _ => deflated += e.compressed_size(),
        }
    }
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    let run = download_v(&env, &srv, &p);
    assert_downloaded(&env, &run, &p);
    let sent = settled_body_bytes(&srv);
    let len = p.bytes.len() as u64;
    let calibration = run
        .stderr
        .lines()
        .find(|l| l.contains("delta calibration"))
        .unwrap_or("no calibration");
    eprintln!(
        "zip -9 -r: {sent} of {len} bytes sent ({:.1} %) in {} requests; {stored} bytes of \
         unchanged files stored, {deflated} deflated; {calibration}",
        100.0 * sent as f64 / len as f64,
        srv.requests().len()
    );
    assert!(stored > 0, "zip stored no file");
    assert!(
        srv.requests().iter().all(|q| q.range().is_some()),
        "a full download: {}",
        run.stderr
    );
    // The stored files were regenerated at least; beyond the rest of the package, the probe's
    // tail, the manifest and the calibration entry (a few KiB of text) were sent.
    assert!(
        sent + stored <= len + tope_ota::remote::PROBE_TAIL + 8192,
        "{sent} sent of {len}, {stored} stored in current"
    );
}

/// `b` with its byte `at` flipped and the four bytes at `fix` changed so that the CRC-32 is
/// `b`'s: a file of the same size and CRC-32 as `b`, with other bytes. CRC-32 is affine over
/// GF(2): flipping bit i of the 32 at `fix` XORs the CRC with a fixed `delta_i`, so the bits to
/// flip solve `XOR of their deltas = the CRC's change` (Gaussian elimination).
fn crc_twin(b: &[u8], at: usize, fix: usize) -> Vec<u8> {
    assert!(!(fix..fix + 4).contains(&at));
    let want = crc32fast::hash(b);
    let mut x = b.to_vec();
    x[at] ^= 0x01;
    let base = crc32fast::hash(&x);
    // basis[k]: a delta whose highest bit is k, and the patch bits that give it.
    let mut basis: [Option<(u32, u32)>; 32] = [None; 32];
    for i in 0..32 {
        let mut y = x.clone();
        y[fix + i / 8] ^= 1 << (i % 8);
        let (mut d, mut m) = (crc32fast::hash(&y) ^ base, 1u32 << i);
        while d != 0 {
            let k = 31 - d.leading_zeros() as usize;
            match basis[k] {
                Some((bd, bm)) => (d, m) = (d ^ bd, m ^ bm),
                None => {
                    basis[k] = Some((d, m));
                    break;
                }
            }
        }
    }
    let (mut t, mut patch) = (base ^ want, 0u32);
    while t != 0 {
        let k = 31 - t.leading_zeros() as usize;
        let (bd, bm) = basis[k].expect("32 contiguous bits reach every CRC-32");
        (t, patch) = (t ^ bd, patch ^ bm);
    }
    for (i, p) in patch.to_le_bytes().iter().enumerate() {
        x[fix + i] ^= p;
    }
    assert_eq!(crc32fast::hash(&x), want);
    assert!(x != b && x.len() == b.len());
    x
}

#[test]
fn delta_download_of_a_file_of_current_with_the_same_crc_falls_back_to_a_full_download() {
    let env = delta_env();
    let p = delta_setup(&env, &[]);
    // lib01 (random data, deflated into stored blocks: as long from any same-sized file) with
    // the size and CRC-32 of the package's but other bytes: taken for the entry, it regenerates
    // to bytes of the right length and the wrong content, which only the hashes catch.
    let f = env.versions_dir.join("v1.0.0/bin/lib01.so");
    std::fs::write(&f, crc_twin(&std::fs::read(&f).unwrap(), 100, 200)).unwrap();
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    let run = download_v(&env, &srv, &p);
    assert_downloaded(&env, &run, &p);
    assert!(
        run.stderr
            .contains("the assembled package does not match its MD5"),
        "{}",
        run.stderr
    );
    let full = srv
        .requests()
        .iter()
        .filter(|q| q.range().is_none())
        .count();
    assert_eq!(full, 1, "{:?}", srv.requests());
}

/// The same twin of a file of current, and a crash after the wrongly regenerated entry was
/// recorded durable: the resume continues a partial that is not the package's prefix.
/// SPEC (issue 15): any mismatch falls back to a full download; what a crash leaves must not
/// turn it into a failed download.
#[cfg(feature = "failpoints")]
#[test]
fn delta_download_killed_after_a_wrong_regeneration_still_downloads_the_package() {
    let mut env = delta_env();
    let p = delta_setup(&env, &[]);
    let f = env.versions_dir.join("v1.0.0/bin/lib01.so");
    std::fs::write(&f, crc_twin(&std::fs::read(&f).unwrap(), 100, 200)).unwrap();
    let mut ar = zip::ZipArchive::new(std::io::Cursor::new(&p.bytes)).unwrap();
    let e = ar.by_name("bin/lib01.so").unwrap();
    let lib01_end = e.data_start().unwrap() + e.compressed_size();
    drop(e);
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    env.set("TOPE_OTA_FAILPOINT", "delta-checkpoint");
    env.set("TOPE_OTA_FAILPOINT_HIT", "3");
    let r = download_v(&env, &srv, &p);
    assert_eq!(r.code, 128 + 9, "killed: {}", r.stderr);
    let durable = env.state()["bytes_downloaded"].as_u64().unwrap();
    assert!(durable > lib01_end, "{durable} <= {lib01_end}");
    let part = std::fs::read(env.downloads().join("pkg.zip.part")).unwrap();
    let d = durable as usize;
    assert!(
        part[..d] != p.bytes[..d],
        "the durable {durable} bytes are the package's prefix: no wrong regeneration recorded"
    );
    env.vars.remove("TOPE_OTA_FAILPOINT");
    env.vars.remove("TOPE_OTA_FAILPOINT_HIT");
    let run = download_v(&env, &srv, &p);
    assert!(
        run.code == 0,
        "the resume of a delta whose durable prefix is not the package's: exit {}\n{}",
        run.code,
        run.stderr
    );
    assert_downloaded(&env, &run, &p);
}

// ---------------------------------------------------------------- delta: the decision, the link

/// The decision's rates are set by the test, not by how busy the machine is: regeneration
/// pinned (`TOPE_OTA_TEST_DEFLATE_RATE`), the slow link paced by the server.
#[cfg(feature = "failpoints")]
#[test]
fn delta_auto_declines_on_a_fast_link_and_is_used_on_a_slow_one() {
    // Loopback against regeneration pinned at 1 MB/s: after the measured prefix the rest is
    // downloaded whole.
    let mut env = Env::new();
    env.set("TOPE_OTA_TEST_DEFLATE_RATE", "1000000");
    let p = delta_setup(&env, &[3]);
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    let run = download_v(&env, &srv, &p);
    assert_downloaded(&env, &run, &p);
    assert!(
        run.stderr.contains("no delta for now") && run.stderr.contains("downloading whole"),
        "{}",
        run.stderr
    );
    // At most what came before the decision (the first headers) was regenerated.
    let st = env.state();
    assert!(
        st["bytes_reused"].as_u64() < Some(p.bytes.len() as u64 / 20),
        "{st}"
    );
    assert!(
        srv.requests()
            .iter()
            .any(|q| q.range().is_some_and(|r| r.ends_with('-'))),
        "the rest by a plain resume: {:?}",
        srv.requests()
    );
    // 1.6 MB/s against regeneration pinned at 1 GB/s: the delta wins by far.
    let mut env = Env::new();
    env.set("TOPE_OTA_TEST_DEFLATE_RATE", "1000000000");
    let p = delta_setup(&env, &[3]);
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            pace: Some(Pace {
                burst: 0,
                rate: 1_600_000,
                then: None,
            }),
            ..Behaviour::default()
        },
    );
    let run = download_v(&env, &srv, &p);
    assert_downloaded(&env, &run, &p);
    assert!(run.stderr.contains("as a delta"), "{}", run.stderr);
    assert!(!run.stderr.contains("the rest whole"), "{}", run.stderr);
    let st = env.state();
    let reused = st["bytes_reused"].as_u64().unwrap();
    assert!(reused > p.bytes.len() as u64 / 2, "{st}");
    assert!(settled_body_bytes(&srv) < p.bytes.len() as u64 / 2);
}

#[test]
fn delta_counts_fetched_and_reused_bytes_in_json_status_and_callbacks() {
    let mut env = delta_env();
    let api = ApiStub::start(Duration::ZERO);
    env.set("TOPE_OTA_REPORT_URL", &api.url);
    let p = delta_setup(&env, &[3]);
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    let url = srv.url("pkg.zip");
    let size = p.bytes.len().to_string();
    let mut a = vec!["--json"];
    a.extend(args(&url, &p, &size));
    let run = env.run(&a);
    run.expect(0);
    let out = run.json();
    let sent = settled_body_bytes(&srv);
    let (fetched, reused) = (
        out["data"]["bytes_fetched"].as_u64().unwrap(),
        out["data"]["bytes_reused"].as_u64().unwrap(),
    );
    // What came is what the server sent less the multipart part headers; with what was
    // regenerated, at least the package.
    assert!(
        fetched <= sent && fetched + 2048 >= sent,
        "{fetched} of {sent}"
    );
    assert!(
        reused > 0 && fetched + reused >= p.bytes.len() as u64,
        "{out}"
    );
    let status = env.run(&["--json", "status"]);
    assert_eq!(status.json()["bytes_reused"], reused, "{}", status.stdout);
    let human = env.run(&["status"]);
    assert!(
        human.stdout.contains("reused from current"),
        "{}",
        human.stdout
    );
    let bodies = api.bodies();
    let last = bodies.last().unwrap();
    assert_eq!(last["data"]["stage"], "toInstall");
    assert_eq!(last["data"]["bytes_reused"], reused, "{last}");
    // A full download reuses nothing.
    let mut full = vec!["--json"];
    full.extend(args(&url, &p, &size));
    full[3] = "1.2.1";
    full.push("--full");
    let run = env.run(&full);
    run.expect(0);
    assert_eq!(run.json()["data"]["bytes_reused"], 0);
    assert!(run.json()["data"]["bytes_fetched"].as_u64() >= Some(p.bytes.len() as u64));
}

#[test]
fn delta_uses_single_ranges_where_multi_range_requests_get_the_whole_file() {
    let env = delta_env();
    let p = delta_setup(&env, &[3, 20, 30]);
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            multi_range: false,
            ..Behaviour::default()
        },
    );
    let run = download_v(&env, &srv, &p);
    assert_downloaded(&env, &run, &p);
    assert!(
        run.stderr.contains("asking one range at a time"),
        "{}",
        run.stderr
    );
    let reqs = srv.requests();
    let many = reqs
        .iter()
        .filter(|q| q.range().is_some_and(|r| r.contains(',')))
        .count();
    assert_eq!(many, 1, "asked once: {reqs:?}");
    assert!(env.state()["bytes_reused"].as_u64() > Some(0));
}

#[test]
fn delta_retries_a_dropped_range_from_the_bytes_it_has() {
    let env = delta_env();
    let p = delta_setup(&env, &[3, 30]);
    // The connection dropped inside lib30's entry.
    let mut ar = zip::ZipArchive::new(std::io::Cursor::new(&p.bytes)).unwrap();
    let e = ar.by_name("bin/lib30.so").unwrap();
    let at = e.data_start().unwrap() + e.compressed_size() / 2;
    drop(e);
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            drop_once_at: Some(at),
            ..Behaviour::default()
        },
    );
    let run = download_v(&env, &srv, &p);
    assert_downloaded(&env, &run, &p);
    assert!(run.stderr.contains("retrying in"), "{}", run.stderr);
    // The retry asked for the rest of the range, not the package whole.
    let reqs = srv.requests();
    assert!(
        reqs.iter().all(|q| q.range().is_some()),
        "no full download: {reqs:?}"
    );
    assert!(
        reqs.iter().any(|q| q
            .range()
            .is_some_and(|r| r.starts_with(&format!("bytes={at}-")))),
        "{reqs:?}"
    );
    assert!(env.state()["bytes_reused"].as_u64() > Some(0));
}

// ---------------------------------------------------------------- delta: what a resume keeps

/// `--full`, and the whole download that follows an assembly failing its hashes, hold for the
/// package's resumes: a heal after a kill goes on with a plain `Range: bytes=N-`, no probe.
#[test]
fn delta_download_whole_holds_across_a_kill_and_a_heal() {
    for fallback in [false, true] {
        let env = delta_env();
        let p = delta_setup(&env, &[3]);
        if fallback {
            // A file of current with its entry's CRC-32 and other bytes: the assembly fails
            // its MD5, and the package is then downloaded whole.
            let f = env.versions_dir.join("v1.0.0/bin/lib01.so");
            std::fs::write(&f, crc_twin(&std::fs::read(&f).unwrap(), 100, 200)).unwrap();
        }
        let srv = PkgServer::start(
            p.bytes.clone(),
            Behaviour {
                throttle: Some((4096, Duration::from_millis(10))),
                ..Behaviour::default()
            },
        );
        let url = srv.url("pkg.zip");
        let size = p.bytes.len().to_string();
        let mut a = args(&url, &p, &size);
        if !fallback {
            a.push("--full");
        }
        let mut child = env.spawn(&a);
        let st = env.wait_state(60, "durable bytes of the whole download", |s| {
            s["delta_off"] == true && s["bytes_downloaded"].as_u64() > Some(0)
        });
        kill(&child, libc::SIGKILL);
        child.wait().unwrap();
        let durable = st["bytes_downloaded"].as_u64().unwrap();
        assert!(durable < p.bytes.len() as u64, "{st}");
        srv.set(|b| b.throttle = None);
        let before = srv.requests().len();
        let run = env.run(&["-v", "heal"]);
        run.expect(0);
        assert!(
            run.stderr
                .contains("no delta: this package is being downloaded whole"),
            "{}",
            run.stderr
        );
        assert_eq!(env.state()["stage"], "toInstall", "{}", run.stderr);
        assert!(std::fs::read(env.downloads().join("pkg.zip")).unwrap() == p.bytes);
        let resumed = &srv.requests()[before..];
        assert_eq!(resumed.len(), 1, "fallback {fallback}: {resumed:?}");
        let from = env.state()["bytes_downloaded"].as_u64().unwrap();
        assert_eq!(from, p.bytes.len() as u64);
        let r = resumed[0].range().expect("a resume");
        assert!(
            r.starts_with("bytes=") && r.ends_with('-') && r != "bytes=0-",
            "fallback {fallback}: {r}"
        );
        // A new download of another package tries a delta again.
        let q = delta_setup_again(&env, &[5]);
        let srv2 = PkgServer::start(q.bytes.clone(), Behaviour::default());
        let url2 = srv2.url("pkg.zip");
        let size2 = q.bytes.len().to_string();
        let mut b = args(&url2, &q, &size2);
        b[2] = "2.1.0";
        env.run(&b).expect(0);
        assert_eq!(env.state()["delta_off"], false);
        assert!(
            srv2.requests().iter().any(|q| q.range().is_some()),
            "{:?}",
            srv2.requests()
        );
    }
}

/// The package of v2.0.0 with `changed` files, for an env whose current already exists.
fn delta_setup_again(env: &Env, changed: &[usize]) -> Pkg {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("bin");
    std::fs::create_dir_all(&d).unwrap();
    for e in std::fs::read_dir(env.versions_dir.join("v1.0.0/bin")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
    }
    for i in changed {
        std::fs::write(
            d.join(format!("lib{i:02}.so")),
            data(20_000, 5000 + *i as u64),
        )
        .unwrap();
    }
    let manifest = br#"{"version":"2.1.0","modules":[{"name":"bin","src":"bin","dst":"bin"}]}"#;
    let bytes =
        tope_ota::packer::write_package(std::io::Cursor::new(Vec::new()), manifest, t.path())
            .unwrap()
            .into_inner();
    pkg_of(bytes)
}

/// A write of the partial failing with EIO mid-assembly fails the download and keeps what is
/// durable; its resume finishes the package and counts every regenerated byte once: a failure
/// between two checkpoints does not count what the resume regenerates again.
#[cfg(feature = "failpoints")]
#[test]
fn delta_download_resumed_after_eio_counts_reused_bytes_once() {
    let clean = {
        let env = delta_env();
        let p = delta_setup(&env, &[3, 30]);
        let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
        download(&env, &srv, &p).expect(0);
        env.state()["bytes_reused"].as_u64().unwrap()
    };
    assert!(clean > 0);
    let mut past_durable = 0;
    for n in [30, 60, 120, 240] {
        let mut env = delta_env();
        let p = delta_setup(&env, &[3, 30]);
        let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
        env.set("TOPE_OTA_FAULT", &format!("write:{n}"));
        let r = download_v(&env, &srv, &p);
        if r.code == 0 {
            continue; // fewer writes than n
        }
        assert_ne!(r.code, 0);
        let st = env.state();
        assert_eq!(st["stage"], "failed", "{}", r.stderr);
        assert_eq!(st["error"], "INTERNAL", "{}", r.stderr);
        assert!(r.stderr.contains("pkg.zip.part"), "{}", r.stderr);
        let durable = st["bytes_downloaded"].as_u64().unwrap();
        let part =
            std::fs::read(env.downloads().join("pkg.zip.part")).expect("the partial is kept");
        assert!(part.len() as u64 >= durable);
        assert!(part[..durable as usize] == p.bytes[..durable as usize]);
        assert!(st["bytes_reused"].as_u64() <= Some(durable), "{st}");
        if part.len() as u64 > durable {
            past_durable += 1;
        }
        env.vars.remove("TOPE_OTA_FAULT");
        download(&env, &srv, &p).expect(0);
        assert!(std::fs::read(env.downloads().join("pkg.zip")).unwrap() == p.bytes);
        assert_eq!(
            env.state()["bytes_reused"].as_u64(),
            Some(clean),
            "fault at write {n}"
        );
    }
    assert!(past_durable > 0, "no fault came between two checkpoints");
    // Auto: the first write is of the prefix that measures the link.
    let mut env = delta_env();
    env.set("TOPE_OTA_DELTA", "auto");
    let p = delta_setup(&env, &[3]);
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    env.set("TOPE_OTA_FAULT", "write:1");
    let r = download_v(&env, &srv, &p);
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert_eq!(env.state()["error"], "INTERNAL", "{}", r.stderr);
    assert!(
        r.stderr.contains("assemble") && r.stderr.contains("pkg.zip.part"),
        "{}",
        r.stderr
    );
    env.vars.remove("TOPE_OTA_FAULT");
    download(&env, &srv, &p).expect(0);
    assert!(std::fs::read(env.downloads().join("pkg.zip")).unwrap() == p.bytes);
}

// ---------------------------------------------------------------- delta: a hostile review's cases

/// SIGTERM while `auto` fetches the prefix that measures the link (the first 64 KiB to 512 KiB
/// of a fresh package, before current is read) is a stop (exit 143, stage downloading), not a
/// local failure of the partial; the next download goes on.
#[test]
fn delta_sigterm_during_the_auto_prefix_is_a_stop() {
    let env = Env::new(); // TOPE_OTA_DELTA unset: auto
    let p = delta_setup(&env, &[3]);
    assert!(p.bytes.len() > 200_000);
    // Inside the prefix [0, 64 KiB), past the manifest's extent, before the probe's tail.
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            gate_at: Some(60_000),
            ..Behaviour::default()
        },
    );
    let (seen, out) = sigterm_at_the_gate(&env, &srv, &p);
    assert!(
        seen.last()
            .and_then(|q| q.range())
            .is_some_and(|r| r.starts_with("bytes=0-")),
        "the gate is in the prefix request: {seen:?}"
    );
    assert_stopped_then_resumes(&env, &srv, &p, &out);
}

/// A server that stops keeping to ranges mid-assembly hands over to the plain download from
/// the last checkpoint, which cuts the regenerated bytes after it: `bytes_reused` never
/// exceeds the regenerated bytes in the final file.
#[test]
fn delta_bytes_reused_not_counted_after_ranges_stop_mid_assembly() {
    let env = delta_env();
    // One random 20 KB file in the middle changed: entries 0-20 are regenerated (with
    // checkpoints every 5 %), then its range is refused.
    let p = delta_setup(&env, &[21]);
    let srv = PkgServer::start(
        p.bytes.clone(),
        Behaviour {
            // Several ranges are answered whole (200): one range at a time; single ranges are
            // capped at 16 KiB, so that a 20 KB range comes with a Content-Range not asked for.
            multi_range: false,
            max_range: Some(16 * 1024),
            ..Behaviour::default()
        },
    );
    let r = download_v(&env, &srv, &p);
    assert_downloaded(&env, &r, &p);
    // Where the plain download took over: its open-ended range `bytes=D-`.
    let seen = srv.requests();
    let d: u64 = seen
        .iter()
        .filter_map(|q| {
            q.range()?
                .strip_prefix("bytes=")?
                .strip_suffix('-')?
                .parse()
                .ok()
        })
        .min()
        .unwrap_or_else(|| panic!("a plain download after the delta: {seen:?}\n{}", r.stderr));
    // Bytes of [0, D) that were fetched by closed ranges before it; the rest was regenerated.
    let mut covered = vec![false; d as usize];
    for (a, b) in seen.iter().flat_map(closed_ranges) {
        for i in a..=b.min(d.saturating_sub(1)) {
            if i < d {
                covered[i as usize] = true;
            }
        }
    }
    let regenerated_in_file = covered.iter().filter(|c| !**c).count() as u64;
    let st = env.state();
    eprintln!("{}", r.stderr);
    let reused = st["bytes_reused"].as_u64().unwrap();
    assert!(
        reused <= regenerated_in_file,
        "bytes_reused {reused} > {regenerated_in_file} regenerated bytes in the file (plain download from {d})\n{st}"
    );
}

/// Bytes this process has read through read(2) and friends (`rchar` of /proc/self/io).
fn rchar() -> u64 {
    let s = std::fs::read_to_string("/proc/self/io").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A package (its directory and manifest are read from the server before any hash can be
/// checked) whose modules map many `src` to one `dst` (which a valid manifest never has), each
/// with an entry of the size of a large file of current: no entry is a candidate, and the view
/// of current reads a file once however many candidates name it. Otherwise N entries of a few
/// bytes would cost N whole reads (and recompressions) of the file on the device.
#[test]
fn delta_reads_each_file_of_current_once_whatever_the_directory_claims() {
    const N: usize = 60;
    const BIG: usize = 2 << 20;
    let t = tempfile::tempdir().unwrap();
    let current = t.path().join("current");
    std::fs::create_dir_all(current.join("bin")).unwrap();
    std::fs::write(current.join("bin/big"), data(BIG, 9)).unwrap();
    let modules: Vec<String> = (0..N)
        .map(|i| format!(r#"{{"name":"m{i}","src":"a{i}","dst":"bin"}}"#))
        .collect();
    let manifest = format!(r#"{{"version":"9.9.9","modules":[{}]}}"#, modules.join(","));
    let mut entries = vec![RawEntry::file("manifest.json", manifest.as_bytes())];
    for i in 0..N {
        let mut e = RawEntry::file(&format!("a{i}/big"), b"x");
        e.declared = Some(BIG as u32);
        entries.push(e);
    }
    let zip = raw_zip(&entries);
    let dir = tope_ota::zipdir::read_directory(
        zip.len() as u64,
        &tope_ota::zipdir::Limits::default(),
        |a, b| Ok(zip[a as usize..b as usize].to_vec()),
    )
    .unwrap();
    let m: tope_ota::manifest::Manifest = serde_json::from_str(&manifest).unwrap();
    let cands = tope_ota::delta::candidates(&dir, &m);
    assert!(cands.is_empty(), "{} entries claim bin/big", cands.len());
    let claimed: Vec<_> = (1..=N)
        .map(|entry| tope_ota::delta::Candidate {
            entry,
            local: "bin/big".into(),
        })
        .collect();
    let before = rchar();
    let view = tope_ota::assemble::current_view(&dir, &claimed, &current);
    let read = rchar() - before;
    assert_eq!(view.len(), 1);
    assert!(
        read <= 2 * BIG as u64,
        "{read} bytes read to look at one {BIG}-byte file ({} times it)",
        read / BIG as u64
    );
}
