//! The fuzz targets' corpus in the normal suite (issue 16): every seed in `fuzz/corpus/<target>/`
//! and every crash ever found in `fuzz/crashes/<target>/` is run through its target (the same
//! functions the libFuzzer binaries call), with the allocation cap checked after each input.
//! A binary of its own so that its allocator counts only these inputs.
//!
//! `TOPE_OTA_REGEN=1 cargo test --test fuzz_corpus` writes the seeds anew, from the hostile
//! cases of the integration suite (built here as the suite builds them).

#[path = "integration/support.rs"]
mod support;

use std::path::{Path, PathBuf};
use support::{raw_zip, RawEntry};
use tope_ota::fuzz::{CappedAlloc, ALLOC_CAP, TARGETS};

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("read {}: {e}", dir.display()),
    };
    v.retain(|p| p.is_file());
    v.sort();
    v
}

#[test]
fn every_seed_and_every_crash_ever_found_passes_its_target() {
    if std::env::var_os("TOPE_OTA_REGEN").is_some() {
        write_seeds();
    }
    let mut ran = 0;
    let mut failed = Vec::new();
    for (name, target) in TARGETS {
        let seeds = inputs(&fuzz_dir().join("corpus").join(name));
        assert!(
            seeds.len() >= 5,
            "fuzz/corpus/{name} has {} seeds; TOPE_OTA_REGEN=1 writes them",
            seeds.len()
        );
        let crashes = inputs(&fuzz_dir().join("crashes").join(name));
        for p in seeds.iter().chain(&crashes) {
            let data = std::fs::read(p).unwrap();
            CappedAlloc::peak();
            let before = CappedAlloc::peak();
            let r = std::panic::catch_unwind(|| target(&data));
            let peak = CappedAlloc::peak().saturating_sub(before);
            if r.is_err() {
                failed.push(format!("{name}: {} fails its property", p.display()));
            } else if peak > ALLOC_CAP {
                failed.push(format!("{name}: {} held {peak} bytes at once", p.display()));
            }
            ran += 1;
        }
    }
    // Every failing input is named (the panics above say why), not only the first.
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    eprintln!("{ran} corpus inputs passed");
}

// ---------------------------------------------------------------- the seeds

fn seed(target: &str, name: &str, bytes: &[u8]) {
    let d = fuzz_dir().join("corpus").join(target);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(name), bytes).unwrap();
}

/// A package as `pack` makes it, of `files` under bin/ and a manifest.
fn packed(files: &[(&str, &[u8])]) -> Vec<u8> {
    let t = tempfile::tempdir().unwrap();
    for (name, data) in files {
        let p = t.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    let manifest = br#"{"version":"1.2.0","modules":[{"name":"bin","src":"bin","dst":"bin","process_name":"printer"}]}"#;
    tope_ota::packer::write_package(std::io::Cursor::new(Vec::new()), manifest, t.path())
        .unwrap()
        .into_inner()
}

fn text(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| format!("G1 X{} Y{}\n", i % 97, i % 13).into_bytes())
        .take(n)
        .collect()
}

/// The seeds are all generated here (a finding goes to fuzz/crashes/, which this never touches);
/// the minisign key pair is new on each regeneration.
fn write_seeds() {
    let _ = std::fs::remove_dir_all(fuzz_dir().join("corpus"));
    let good = packed(&[
        ("bin/printer", &text(3000)),
        ("bin/lib.so", &support::data(1500, 1)),
        ("data/cal.json", b"{}"),
    ]);

    // unpack: the archive tests' hostile packages.
    let zips: Vec<(&str, Vec<u8>)> = vec![
        ("packed", good.clone()),
        ("traversal", raw_zip(&[RawEntry::file("../evil", b"x")])),
        ("absolute", raw_zip(&[RawEntry::file("/tmp/evil", b"x")])),
        ("dot-parts", raw_zip(&[RawEntry::file("a/./../../b", b"x")])),
        ("backslash", raw_zip(&[RawEntry::file("..\\evil", b"x")])),
        (
            "symlink-out",
            raw_zip(&[
                RawEntry::symlink("bin/l", "../../outside"),
                RawEntry::file("bin/l/x", b"through the link"),
            ]),
        ),
        ("symlink-abs", raw_zip(&[RawEntry::symlink("l", "/etc")])),
        (
            "under-symlink",
            raw_zip(&[
                RawEntry::dir("sub"),
                RawEntry::symlink("link", "sub"),
                RawEntry::file("link/x", b"x"),
            ]),
        ),
        (
            "setuid",
            raw_zip(&[RawEntry::file("bin/su", b"#!/bin/sh\n").mode(0o104755)]),
        ),
        ("fifo", raw_zip(&[RawEntry::file("p", b"").mode(0o010644)])),
        (
            "device",
            raw_zip(&[RawEntry::file("d", b"").mode(0o020644)]),
        ),
        (
            "duplicate",
            raw_zip(&[RawEntry::file("a", b"1"), RawEntry::file("a", b"2")]),
        ),
        (
            "size-lie",
            raw_zip(&[RawEntry {
                declared: Some(u32::MAX),
                ..RawEntry::file("big", &[0u8; 200])
            }]),
        ),
        ("cut", good[..good.len() * 2 / 3].to_vec()),
        (
            "climb-three",
            raw_zip(&[RawEntry::file("../../../evil", b"x")]),
        ),
        (
            "climb-to-sibling",
            raw_zip(&[RawEntry::file("../../outside/x", b"x")]),
        ),
        ("empty-zip", raw_zip(&[])),
        ("not-zip", b"PK\x03\x04 not really".to_vec()),
    ];
    for (n, z) in &zips {
        seed("unpack", n, z);
        seed("delta_plan", n, z);
    }
    // delta_plan: a directory cut short and an end record pointing past the file.
    let mut cut_cd = good.clone();
    let cd = u32::from_le_bytes(
        cut_cd[cut_cd.len() - 6..cut_cd.len() - 2]
            .try_into()
            .unwrap(),
    );
    cut_cd.drain(cd as usize + 10..cd as usize + 40);
    seed("delta_plan", "cut-directory", &cut_cd);
    let mut far = good.clone();
    let n = far.len();
    far[n - 6..n - 2].copy_from_slice(&(n as u32 + 100).to_le_bytes());
    seed("delta_plan", "directory-past-end", &far);
    // The first byte's bits 0 and 1: deflate and headers proven, runs not merged.
    for (name, z) in [("packed-proven", &good), ("setuid-proven", &zips[8].1)] {
        let mut z = z.clone();
        z[0] = 0x53;
        seed("delta_plan", name, &z);
    }

    // manifest
    let manifests: &[(&str, &str)] = &[
        (
            "valid",
            r#"{"version":"1.2.0","modules":[{"name":"ui","src":"ui","dst":"ui","process_name":"tope-ui","restart_order":2,"md5":"0123456789abcdef0123456789abcdef"}],"mutable":["var/db"],"migrate":"bin/migrate --from 1"}"#,
        ),
        (
            "src-dotdot",
            r#"{"version":"1.2.0","modules":[{"name":"a","src":"../etc","dst":"a"}]}"#,
        ),
        (
            "dst-absolute",
            r#"{"version":"1.2.0","modules":[{"name":"a","src":"a","dst":"/etc"}]}"#,
        ),
        (
            "dst-meta",
            r#"{"version":"1.2.0","modules":[{"name":"a","src":"a","dst":".tope-ota/x"}]}"#,
        ),
        (
            "dst-twice",
            r#"{"version":"1.2.0","modules":[{"name":"a","src":"a","dst":"x"},{"name":"b","src":"b","dst":"x"}]}"#,
        ),
        (
            "dst-nested",
            r#"{"version":"1.2.0","modules":[{"name":"a","src":"a","dst":"x"},{"name":"b","src":"b","dst":"x/y"}]}"#,
        ),
        (
            "mutable-overlap",
            r#"{"version":"1.2.0","modules":[{"name":"a","src":"a","dst":"a"}],"mutable":["var","var/db"]}"#,
        ),
        (
            "bad-md5",
            r#"{"version":"1.2.0","modules":[{"name":"a","src":"a","dst":"a","md5":"xyz"}]}"#,
        ),
        (
            "process-name",
            r#"{"version":"1.2.0","modules":[{"name":"a","src":"a","dst":"a","process_name":"-x; rm -rf /"}]}"#,
        ),
        (
            "health",
            r#"{"version":"1.2.0","modules":[{"name":"a","src":"a","dst":"a","health":{"command":["bin/check","--fast"],"timeout_s":5}}]}"#,
        ),
        (
            "wrong-version",
            r#"{"version":"9.9.9","modules":[{"name":"a","src":"a","dst":"a"}]}"#,
        ),
        ("no-modules", r#"{"version":"1.2.0","modules":[]}"#),
        ("deep", &format!("{}{}", "[".repeat(200), "]".repeat(200))),
        ("not-json", "version: 1.2.0"),
    ];
    for (n, m) in manifests {
        seed("manifest", n, m.as_bytes());
    }

    // request
    let requests: &[(&str, &str)] = &[
        (
            "valid",
            r#"{"version":"1.2.0","package_url":"http://10.0.0.5/pkg.zip","package_name":"pkg.zip","package_size":1000,"package_md5":"0123456789ABCDEF0123456789abcdef","package_sha256":"aa00000000000000000000000000000000000000000000000000000000000000"}"#,
        ),
        (
            "size-zero",
            r#"{"version":"1.2.0","package_url":"http://h/p.zip","package_name":"p.zip","package_size":0,"package_md5":"0123456789abcdef0123456789abcdef"}"#,
        ),
        (
            "size-negative",
            r#"{"version":"1.2.0","package_url":"http://h/p.zip","package_name":"p.zip","package_size":-1,"package_md5":"0123456789abcdef0123456789abcdef"}"#,
        ),
        (
            "file-url",
            r#"{"version":"1.2.0","package_url":"file:///etc/shadow","package_name":"p.zip","package_size":1,"package_md5":"0123456789abcdef0123456789abcdef"}"#,
        ),
        (
            "name-slash",
            r#"{"version":"1.2.0","package_url":"http://h/p.zip","package_name":"../state.json","package_size":1,"package_md5":"0123456789abcdef0123456789abcdef"}"#,
        ),
        (
            "version-path",
            r#"{"version":"../../x","package_url":"http://h/p.zip","package_name":"p.zip","package_size":1,"package_md5":"0123456789abcdef0123456789abcdef"}"#,
        ),
        (
            "unknown-field",
            r#"{"version":"1.2.0","package_url":"http://h/p.zip","package_name":"p.zip","package_size":1,"package_md5":"0123456789abcdef0123456789abcdef","extra":true}"#,
        ),
        (
            "md5-short",
            r#"{"version":"1.2.0","package_url":"http://h/p.zip","package_name":"p.zip","package_size":1,"package_md5":"0123"}"#,
        ),
        (
            "sig-url",
            r#"{"version":"1.2.0","package_url":"https://h/p.zip","package_name":"p.zip","package_size":18446744073709551615,"package_md5":"0123456789abcdef0123456789abcdef","package_sig_url":"https://h/p.zip.minisig"}"#,
        ),
    ];
    for (n, r) in requests {
        seed("request", n, r.as_bytes());
    }

    // state
    let states: &[(&str, &str)] = &[
        (
            "downloading",
            r#"{"stage":"downloading","progress":40,"message":"Downloading","version":"1.2.0","package_url":"http://h/p.zip","package_name":"p.zip","package_size":1000,"package_md5":"0123456789abcdef0123456789abcdef","bytes_downloaded":400,"resume_validator":"\"e1\"","bytes_fetched":500,"bytes_reused":100,"delta_off":true}"#,
        ),
        (
            "installing",
            r#"{"stage":"installing","step":"before-switch","version":"1.2.0","previous_version":"1.1.0","target":"v1.2.0","from":"v1.1.0","services":[{"unit":"tope-ui.service","program":"bin/ui"}],"stage_seq":7}"#,
        ),
        (
            "failed",
            r#"{"stage":"failed","error":"MD5_MISMATCH","message":"expected a, got b","rollback":"previous 1.1.0"}"#,
        ),
        ("unknown-stage", r#"{"stage":"flying"}"#),
        (
            "wrong-types",
            r#"{"stage":"idle","progress":"40","bytes_downloaded":-1}"#,
        ),
        (
            "future-fields",
            r#"{"stage":"idle","from_a_newer_build":{"x":[1,2,3]}}"#,
        ),
        ("truncated", r#"{"stage":"downloading","progress":4"#),
        ("empty", ""),
    ];
    for (n, s) in states {
        seed("state", n, s.as_bytes());
    }
    seed(
        "state",
        "not-utf8",
        b"{\"stage\":\"idle\",\"message\":\"\xff\xfe\"}",
    );

    // api
    let body = r#"{"version":"1.2.0","package_url":"http://127.0.0.1:9/pkg.zip","package_name":"pkg.zip","package_size":1000,"package_md5":"0123456789abcdef0123456789abcdef"}"#;
    let post = |path: &str, extra: &str, body: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:12315\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let apis: Vec<(&str, String)> = vec![
        ("progress", "GET /api/v1.0/progress HTTP/1.1\r\nHost: localhost\r\n\r\n".into()),
        ("download", post("/api/v1.0/download", "", body)),
        ("download-same", post("/api/v1.0/download", "", &body.replace("1000", "1000.0"))),
        ("update", post("/api/v1.0/update", "", r#"{"version":"1.2.0"}"#)),
        ("origin", post("/api/v1.0/download", "Origin: http://evil.example\r\n", body)),
        ("rebinding", "GET /api/v1.0/progress HTTP/1.1\r\nHost: evil.example\r\n\r\n".into()),
        ("form", "POST /api/v1.0/update HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 9\r\n\r\nversion=1".into()),
        ("bad-json", post("/api/v1.0/download", "", "{\"version\":")),
        ("chunked", "POST /api/v1.0/download HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nffffffff\r\n{}".into()),
        ("length-lie", "POST /api/v1.0/update HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 99999999\r\n\r\n{}".into()),
        ("pipelined", format!("GET /api/v1.0/progress HTTP/1.1\r\nHost: localhost\r\n\r\nDELETE /api/v1.0/download HTTP/1.1\r\nHost: localhost\r\n\r\n{}", post("/api/v1.0/nothing", "", "{}"))),
        ("long-header", format!("GET /api/v1.0/progress HTTP/1.1\r\nHost: localhost\r\nX: {}\r\n\r\n", "a".repeat(70_000))),
        ("http10", "GET /api/v1.0/progress HTTP/1.0\r\n\r\n".into()),
        ("garbage", "\x16\x03\x01\x02\x00\x01\x00\x01\x7c\x03\x03".into()),
    ];
    // The first byte picks the device's state: 0 idle, 1 downloading, 2 toInstall, 3 installing.
    for (n, a) in &apis {
        for (k, pick) in [
            (0u8, "idle"),
            (1, "downloading"),
            (2, "ready"),
            (3, "installing"),
        ] {
            if k == 0 || n.starts_with("download") || n.starts_with("update") || *n == "progress" {
                seed(
                    "api",
                    &format!("{n}-{pick}"),
                    &[&[k][..], a.as_bytes()].concat(),
                );
            }
        }
    }

    // minisign: a real key pair made by minisign, its signature, and broken ones.
    let t = tempfile::tempdir().unwrap();
    let pair = support::keypair(t.path(), "k");
    let payload = t.path().join("pkg.zip");
    std::fs::write(&payload, &good).unwrap();
    let key = std::fs::read(&pair.public).unwrap();
    let sig = support::sign(&pair, &payload);
    let join = |k: &[u8], s: &[u8], p: &[u8]| [k, &[0xff], s, &[0xff], p].concat();
    seed("minisign", "valid", &join(&key, &sig, &good));
    seed("minisign", "other-payload", &join(&key, &sig, b"other"));
    let mut bad_sig = sig.clone();
    let l = bad_sig.len();
    bad_sig[l / 2] ^= 0x20;
    seed("minisign", "sig-flipped", &join(&key, &bad_sig, &good));
    seed(
        "minisign",
        "key-garbage",
        &join(b"untrusted comment: x\nRWQ!!!\n", &sig, &good),
    );
    seed(
        "minisign",
        "sig-truncated",
        &join(&key, &sig[..sig.len() / 3], &good),
    );
    let legacy = String::from_utf8_lossy(&sig).replacen("RU", "Ed", 1);
    seed(
        "minisign",
        "legacy-algorithm",
        &join(&key, legacy.as_bytes(), &good),
    );

    // http_headers: answers a server may give to a resume, a probe and a multi-range request.
    let pkg: Vec<u8> = (0..4000u32).map(|i| (i * 7 % 251) as u8).collect();
    let resp = |status: &str, headers: &str, body: &[u8]| {
        [
            format!(
                "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
            body,
        ]
        .concat()
    };
    let multipart = {
        let mut b = Vec::new();
        for (a, z) in [(0usize, 10usize), (100, 120)] {
            b.extend_from_slice(
                format!(
                    "\r\n--XB\r\nContent-Type: application/zip\r\nContent-Range: bytes {a}-{}/4000\r\n\r\n",
                    z - 1
                )
                .as_bytes(),
            );
            b.extend_from_slice(&pkg[a..z]);
        }
        b.extend_from_slice(b"\r\n--XB--\r\n");
        b
    };
    let resume = resp(
        "206 Partial Content",
        "ETag: \"v1\"\r\nContent-Range: bytes 1000-3999/4000\r\n",
        &pkg[1000..],
    );
    let probe = resp(
        "206 Partial Content",
        "ETag: \"v1\"\r\nContent-Range: bytes 3488-3999/4000\r\n",
        &pkg[3488..],
    );
    let multi = resp(
        "206 Partial Content",
        "ETag: \"v1\"\r\nContent-Type: multipart/byteranges; boundary=XB\r\n",
        &multipart,
    );
    let mut obs_text_etag = resp(
        "206 Partial Content",
        "ETag: \"vX1\"\r\nContent-Range: bytes 1000-3999/4000\r\n",
        &pkg[1000..],
    );
    let x = obs_text_etag.windows(3).position(|w| w == b"vX1").unwrap() + 1;
    obs_text_etag[x] = 0xff;
    // Each seed: the answers to the resume, the probe and the two-range request.
    let three = |a: &[u8], b: &[u8], c: &[u8]| [a, &[0xff], b, &[0xff], c].concat();
    let headers: Vec<(&str, Vec<u8>)> = vec![
        ("all-good", three(&resume, &probe, &multi)),
        ("resume-range-wrong", three(&resp("206 Partial Content", "ETag: \"v1\"\r\nContent-Range: bytes 0-2999/4000\r\n", &pkg[..2000]), &probe, &multi)),
        ("resume-total-star", three(&resp("206 Partial Content", "ETag: \"v1\"\r\nContent-Range: bytes 1000-3999/*\r\n", &pkg[1000..]), &probe, &multi)),
        ("resume-whole-200", three(&resp("200 OK", "ETag: \"v1\"\r\n", &pkg), &probe, &multi)),
        ("resume-last-modified", three(&resp("206 Partial Content", "Last-Modified: Mon, 23 Nov 2026 10:00:00 GMT\r\nContent-Range: bytes 1000-3999/4000\r\n", &pkg[1000..]), &probe, &multi)),
        // Found by the fuzzer: an ETag of bytes beyond ASCII (obs-text) that differs from ours.
        ("resume-etag-obs-text", three(&obs_text_etag, &probe, &multi)),
        ("resume-etag-changed", three(&resp("206 Partial Content", "ETag: \"v2\"\r\nContent-Range: bytes 1000-3999/4000\r\n", &pkg[1000..]), &probe, &multi)),
        ("resume-too-long", three(&resp("206 Partial Content", "ETag: \"v1\"\r\nContent-Range: bytes 1000-3999/4000\r\n", &[pkg.clone(), pkg.clone()].concat()), &probe, &multi)),
        ("resume-416", three(&resp("416 Range Not Satisfiable", "Content-Range: bytes */4000\r\n", b""), &probe, &multi)),
        ("resume-412", three(&resp("412 Precondition Failed", "", b""), &probe, &multi)),
        ("resume-chunked", three(&[b"HTTP/1.1 206 Partial Content\r\nETag: \"v1\"\r\nContent-Range: bytes 1000-3999/4000\r\nTransfer-Encoding: chunked\r\n\r\nbb8\r\n".as_slice(), &pkg[1000..], b"\r\n0\r\n\r\n"].concat(), &probe, &multi)),
        ("resume-cut-body", three(resume.split_at(500).0, &probe, &multi)),
        ("probe-weak-etag", three(&resume, &resp("206 Partial Content", "ETag: W/\"v1\"\r\nContent-Range: bytes 3488-3999/4000\r\n", &pkg[3488..]), &multi)),
        ("probe-no-etag", three(&resume, &resp("206 Partial Content", "Content-Range: bytes 3488-3999/4000\r\n", &pkg[3488..]), &multi)),
        ("probe-other-size", three(&resume, &resp("206 Partial Content", "ETag: \"v1\"\r\nContent-Range: bytes 3488-3999/5000\r\n", &pkg[3488..]), &multi)),
        ("probe-200", three(&resume, &resp("200 OK", "ETag: \"v1\"\r\n", &pkg), &multi)),
        ("multi-no-boundary", three(&resume, &probe, &resp("206 Partial Content", "ETag: \"v1\"\r\nContent-Type: multipart/byteranges\r\n", &multipart))),
        ("multi-other-boundary", three(&resume, &probe, &resp("206 Partial Content", "ETag: \"v1\"\r\nContent-Type: multipart/byteranges; boundary=\"YB\"\r\n", &multipart))),
        ("multi-one-range", three(&resume, &probe, &resp("206 Partial Content", "ETag: \"v1\"\r\nContent-Range: bytes 0-9/4000\r\n", &pkg[..10]))),
        ("multi-whole-200", three(&resume, &probe, &resp("200 OK", "ETag: \"v1\"\r\n", &pkg))),
        ("multi-etag-changed", three(&resume, &probe, &resp("206 Partial Content", "ETag: \"v2\"\r\nContent-Type: multipart/byteranges; boundary=XB\r\n", &multipart))),
        ("multi-cut", three(&resume, &probe, multi.split_at(multi.len() - 30).0)),
    ];
    for (n, h) in &headers {
        seed("http_headers", n, h);
    }
}
