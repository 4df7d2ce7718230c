//! `download` by delta (issue 15): ranges of a package, whole downloads assembled from
//! `current` and ranges, and their fallbacks to a full download.

use crate::download::{args, download, pkg, Pkg};
use crate::support::*;
use std::time::{Duration, Instant};

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
    tope_ota::cmd::pack::write_package(std::io::Cursor::new(Vec::new()), manifest, t.path())
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
    assert_eq!(r.requests, 1);
    let sent = srv.body_bytes();
    assert_eq!(sent, (pkg.len() as u64).min(tope_ota::remote::PROBE_TAIL));
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
    let sent = srv.body_bytes();
    assert_eq!(sent, tope_ota::remote::PROBE_TAIL + dir.end.cd_size);
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
        is_unavailable(&e) && e.to_string().contains("changed"),
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
fn delta_setup(env: &Env, changed: &[usize]) -> Pkg {
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
    let manifest = br#"{"version":"1.2.0","modules":[{"name":"bin","src":"bin","dst":"bin"}]}"#;
    let bytes =
        tope_ota::cmd::pack::write_package(std::io::Cursor::new(Vec::new()), manifest, t.path())
            .unwrap()
            .into_inner();
    let md5 = md5_hex(&bytes);
    Pkg { bytes, md5 }
}

#[test]
fn delta_download_reuses_current_and_fetches_what_changed() {
    let env = Env::new();
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
    let env = Env::new();
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
    let env = Env::new();
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

#[test]
fn delta_download_killed_mid_assembly_resumes() {
    let mut env = Env::new();
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
    let before = srv.requests().len();
    download(&env, &srv, &p).expect(0);
    let got = std::fs::read(env.downloads().join("pkg.zip")).unwrap();
    assert!(got == p.bytes);
    // The resume continues from the durable bytes on the ETag of the delta.
    let first = &srv.requests()[before];
    assert_eq!(first.range().unwrap(), format!("bytes={durable}-"));
    assert_eq!(first.headers.get("if-range").unwrap(), "\"pkg-etag-1\"");
}

#[test]
fn delta_download_is_not_tried_without_current_nor_kept_for_a_non_zip() {
    // No current: no probe, one plain request.
    let env = Env::new();
    let p = pkg(300_000, 5);
    let srv = PkgServer::start(p.bytes.clone(), Behaviour::default());
    download(&env, &srv, &p).expect(0);
    assert_eq!(srv.requests().len(), 1);
    assert!(srv.requests()[0].range().is_none());
    // A current, but a package that is not a ZIP: the probe, the last 64 KiB (where an EOCD
    // with a long comment would be), then the full download.
    let env = Env::new();
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
    let env = Env::new();
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

#[test]
fn delta_download_stops_inside_a_range_on_sigterm_and_resumes() {
    let env = Env::new();
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
    assert_eq!(
        out.status.code(),
        Some(143),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = env.state();
    assert_eq!(st["stage"], "downloading");
    let durable = st["bytes_downloaded"].as_u64().unwrap();
    let part = std::fs::read(env.downloads().join("pkg.zip.part")).unwrap();
    assert!(durable > 0 && part.len() as u64 >= durable, "{durable}");
    assert!(part[..durable as usize] == p.bytes[..durable as usize]);
    srv.set(|b| b.throttle = None);
    download(&env, &srv, &p).expect(0);
    assert!(std::fs::read(env.downloads().join("pkg.zip")).unwrap() == p.bytes);
}
