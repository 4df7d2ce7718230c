//! `install`, `rollback` and `pack`: SPEC section 4 "install" and "rollback".

use crate::support::*;
use serde_json::{json, Value};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A device: sandbox, fake systemctl, and the package servers it downloaded from.
pub struct Device {
    pub env: Env,
    pub sc: FakeSystemctl,
    pub servers: Vec<PkgServer>,
}

/// A file of a version: (path, content, mode).
pub type FileSpec = (&'static str, &'static [u8], u32);
pub type Files<'a> = &'a [FileSpec];

pub fn full_manifest(version: &str) -> Value {
    json!({
        "version": version,
        "modules": [
            {"name": "api", "src": "bin/device-api", "dst": "bin/device-api", "process_name": "device-api", "restart_order": 1},
            {"name": "ui", "src": "bin/ui", "dst": "bin/ui", "process_name": "printer-ui", "restart_order": 2},
            {"name": "share", "src": "share", "dst": "share"},
            {"name": "lib", "src": "lib", "dst": "lib"}
        ]
    })
}

pub fn v1_files() -> Vec<FileSpec> {
    vec![
        ("bin/device-api", b"#!/bin/sh\necho api 1\n", 0o755),
        ("bin/ui", b"#!/bin/sh\necho ui 1\n", 0o755),
        ("share/a.txt", b"alpha 1", 0o644),
        ("share/b.txt", b"beta 1", 0o644),
        ("lib/libx.so", b"\x7fELF libx 1", 0o644),
    ]
}

impl Device {
    pub fn new() -> Device {
        Device::on(Env::new())
    }

    /// A device in `env` (for example [`Env::armhf`]).
    pub fn on(mut env: Env) -> Device {
        let sc = FakeSystemctl::install(&mut env);
        env.set(
            "TOPE_OTA_GUI",
            env.tmp.path().join("no-gui").to_str().unwrap(),
        );
        Device {
            env,
            sc,
            servers: vec![],
        }
    }

    /// Write a source dir with `files` and `manifest`, pack it with the real binary.
    pub fn pack(&self, version: &str, files: Files, manifest: &Value) -> Vec<u8> {
        self.pack_with_links(version, files, manifest, &[])
    }

    /// [`Device::pack`] with symlinks `(path, target)` added to the source dir.
    pub fn pack_with_links(
        &self,
        version: &str,
        files: Files,
        manifest: &Value,
        links: &[(&str, &str)],
    ) -> Vec<u8> {
        let dir = self
            .env
            .tmp
            .path()
            .join(format!("src-{version}-{}", self.servers.len()));
        let _ = std::fs::remove_dir_all(&dir);
        for (path, data, mode) in files {
            let p = dir.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, data).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).unwrap();
        }
        for (path, target) in links {
            std::os::unix::fs::symlink(target, dir.join(path)).unwrap();
        }
        std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
        let out = self.env.tmp.path().join(format!("pkg-{version}.zip"));
        let run = self.env.run(&[
            "pack",
            "--version",
            version,
            "--out",
            out.to_str().unwrap(),
            dir.to_str().unwrap(),
        ]);
        run.expect(0);
        std::fs::read(out).unwrap()
    }

    pub fn download(&mut self, version: &str, bytes: Vec<u8>) -> Run {
        self.download_with(version, bytes, &[])
    }

    /// [`Device::download`] with more `download` arguments (`--sig-url …`).
    pub fn download_with(&mut self, version: &str, bytes: Vec<u8>, more: &[&str]) -> Run {
        let md5 = md5_hex(&bytes);
        let size = bytes.len().to_string();
        let srv = PkgServer::start(bytes, Behaviour::default());
        let url = srv.url("pkg.zip");
        self.servers.push(srv);
        let mut args = vec![
            "download",
            "--version",
            version,
            "--url",
            &url,
            "--name",
            "pkg.zip",
            "--size",
            &size,
            "--md5",
            &md5,
        ];
        args.extend_from_slice(more);
        self.env.run(&args)
    }

    pub fn install(&self) -> Run {
        self.env.run(&["install"])
    }

    /// Download and install `bytes`; returns the install run.
    pub fn deliver(&mut self, version: &str, bytes: Vec<u8>) -> Run {
        self.download(version, bytes).expect(0);
        self.install()
    }

    pub fn root(&self) -> &Path {
        &self.env.versions_dir
    }

    pub fn link(&self, name: &str) -> Option<String> {
        std::fs::read_link(self.root().join(name))
            .ok()
            .map(|t| t.to_string_lossy().into_owned())
    }

    /// Install version 1.0.0 with all files and services; the starting point of most tests.
    pub fn with_v1() -> Device {
        let mut d = Device::new();
        let pkg = d.pack("1.0.0", &v1_files(), &full_manifest("1.0.0"));
        d.deliver("1.0.0", pkg).expect(0);
        d.sc.clear();
        d
    }

    /// A device as one is made: 0.9.0 installed and made factory by `tope-ota factory`, then
    /// 1.0.0 installed over it (current v1.0.0, previous v0.9.0, factory v0.9.0~factory).
    pub fn with_factory() -> Device {
        let mut d = Device::new();
        let pkg = d.pack("0.9.0", &factory_files(), &full_manifest("0.9.0"));
        d.deliver("0.9.0", pkg).expect(0);
        d.env.run(&["factory"]).expect(0);
        let pkg = d.pack("1.0.0", &v1_files(), &full_manifest("1.0.0"));
        d.deliver("1.0.0", pkg).expect(0);
        d.sc.clear();
        d
    }

    /// The snapshot `current` points to holds exactly `files` (every file, content and mode),
    /// and the services run from it.
    #[track_caller]
    pub fn assert_current_is(&self, files: Files) {
        let cur = self.link("current").expect("current resolves");
        assert_eq!(
            version_files(&self.root().join(&cur)),
            spec_files(files),
            "current -> {cur} is not the complete version"
        );
        for (unit, prog) in [("device-api", "bin/device-api"), ("printer-ui", "bin/ui")] {
            let runs = self
                .sc
                .running(unit)
                .unwrap_or_else(|| panic!("{unit} is not running"));
            assert_eq!(
                std::fs::read(self.root().join(&runs).join(prog)).ok(),
                std::fs::read(self.root().join(&cur).join(prog)).ok(),
                "{unit} runs {runs}'s program, not current {cur}'s"
            );
        }
    }

    pub fn no_staging_left(&self) {
        let left: Vec<String> = std::fs::read_dir(self.root())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tope-ota-tmp"))
            .collect();
        assert!(left.is_empty(), "staging left behind: {left:?}");
    }
}

/// The factory version's files: all of v1's paths, other contents.
pub fn factory_files() -> Vec<FileSpec> {
    vec![
        ("bin/device-api", b"#!/bin/sh\necho api 0.9\n", 0o755),
        ("bin/ui", b"#!/bin/sh\necho ui 0.9\n", 0o755),
        ("share/a.txt", b"alpha 0.9", 0o644),
        ("share/b.txt", b"beta 1", 0o644),
        ("lib/libx.so", b"\x7fELF libx 0.9", 0o644),
    ]
}

/// v1's files with 2.0.0's device-api.
pub fn v2_files() -> Vec<FileSpec> {
    let mut f = v1_files();
    f[0] = ("bin/device-api", b"#!/bin/sh\necho api 2\n", 0o755);
    f
}

/// Files (and symlinks) of a snapshot: path -> (content or link target, permission bits),
/// without tope-ota's own `.tope-ota/`.
pub fn version_files(dir: &Path) -> std::collections::BTreeMap<String, (Vec<u8>, u32)> {
    tree(dir)
        .into_iter()
        .filter(|(p, v)| !p.starts_with(".tope-ota") && v.0 != 'd')
        .map(|(p, v)| (p, (v.1, v.2 & 0o777)))
        .collect()
}

pub fn spec_files(files: Files) -> std::collections::BTreeMap<String, (Vec<u8>, u32)> {
    files
        .iter()
        .map(|(p, c, m)| (p.to_string(), (c.to_vec(), *m)))
        .collect()
}

pub fn v2_partial() -> (Vec<FileSpec>, Value) {
    (
        vec![("bin/device-api", b"#!/bin/sh\necho api 2\n", 0o755)],
        json!({"version": "2.0.0", "modules": [
            {"name": "api", "src": "bin/device-api", "dst": "bin/device-api", "process_name": "device-api", "restart_order": 1}
        ]}),
    )
}

#[test]
fn download_install_switch_and_status() {
    let mut d = Device::new();
    let pkg = d.pack("1.0.0", &v1_files(), &full_manifest("1.0.0"));
    let run = d.deliver("1.0.0", pkg);
    run.expect(0);
    assert!(
        run.stdout.contains("installed version 1.0.0"),
        "{}",
        run.stdout
    );
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
    assert_eq!(
        d.sc.calls(),
        [
            "stop printer-ui none",
            "stop device-api none",
            "start device-api v1.0.0",
            "start printer-ui v1.0.0",
        ]
    );
    let s = d.env.state();
    assert_eq!(s["stage"], "success");
    assert_eq!(s["progress"], 100);
    assert!(
        d.env.download_files().is_empty(),
        "the package is deleted after success"
    );
    let st = d.env.run(&["status"]);
    assert!(st.stdout.contains("current:   1.0.0"), "{}", st.stdout);
    assert_eq!(
        std::fs::read(d.root().join("current/share/a.txt")).unwrap(),
        b"alpha 1"
    );
    let mode = std::fs::metadata(d.root().join("current/bin/device-api"))
        .unwrap()
        .mode();
    assert_eq!(mode & 0o777, 0o755, "exec bit kept");
    d.no_staging_left();

    // A second version: stop in reverse restart_order, start in order, previous kept.
    let (files, manifest) = v2_partial();
    let pkg = d.pack("2.0.0", &files, &manifest);
    d.sc.clear();
    d.deliver("2.0.0", pkg).expect(0);
    assert_eq!(d.link("current").as_deref(), Some("v2.0.0"));
    assert_eq!(d.link("previous").as_deref(), Some("v1.0.0"));
    assert_eq!(
        d.sc.calls(),
        ["stop device-api v1.0.0", "start device-api v2.0.0"]
    );
    let j = d.env.run(&["--json", "status"]).json();
    assert_eq!(j["stage"], "success");
    let st = d.env.run(&["status"]).stdout;
    assert!(
        st.contains("current:   2.0.0") && st.contains("previous:  1.0.0"),
        "{st}"
    );
}

#[test]
fn partial_update_shares_inodes_and_keeps_the_old_snapshot_intact() {
    let mut d = Device::with_v1();
    let before = tree(&d.root().join("v1.0.0"));
    let (files, manifest) = v2_partial();
    let pkg = d.pack("2.0.0", &files, &manifest);
    d.deliver("2.0.0", pkg).expect(0);
    let after_old = tree(&d.root().join("v1.0.0"));
    assert_eq!(before, after_old, "the old snapshot changed");
    let new = tree(&d.root().join("v2.0.0"));
    for unchanged in ["bin/ui", "share/a.txt", "share/b.txt", "lib/libx.so"] {
        assert_eq!(
            new[unchanged].3, before[unchanged].3,
            "{unchanged} is not a hard link"
        );
    }
    assert_ne!(new["bin/device-api"].3, before["bin/device-api"].3);
    assert_eq!(new["bin/device-api"].1, b"#!/bin/sh\necho api 2\n");
    assert_eq!(before["bin/device-api"].1, b"#!/bin/sh\necho api 1\n");
}

#[test]
fn stop_failure_switches_nothing() {
    let mut d = Device::with_v1();
    d.sc.touch("fail-stop-device-api");
    let (files, manifest) = v2_partial();
    let pkg = d.pack("2.0.0", &files, &manifest);
    let run = d.deliver("2.0.0", pkg);
    run.expect(1);
    assert!(
        run.stderr.contains("error: SERVICE_STOP_FAILED: "),
        "{}",
        run.stderr
    );
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
    let s = d.env.state();
    assert_eq!(s["stage"], "failed");
    assert_eq!(s["error"], "SERVICE_STOP_FAILED");
    assert!(
        !d.root().join("v2.0.0").exists(),
        "the unused snapshot is removed"
    );
    d.no_staging_left();
}

#[test]
fn start_failure_rolls_back_to_previous() {
    let mut d = Device::with_v1();
    d.sc.touch("fail-start-device-api@v2.0.0");
    let (files, manifest) = v2_partial();
    let pkg = d.pack("2.0.0", &files, &manifest);
    let run = d.deliver("2.0.0", pkg);
    run.expect(1);
    assert!(
        run.stderr.contains("error: SERVICE_START_FAILED: "),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("rolled back to previous 1.0.0"),
        "{}",
        run.stderr
    );
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
    // The rollback restarts the whole service set of the version it lands on, in order.
    let calls = d.sc.calls();
    assert_eq!(
        calls[calls.len() - 2..],
        ["start device-api v1.0.0", "start printer-ui v1.0.0"],
        "{calls:?}"
    );
    let s = d.env.state();
    assert_eq!(s["error"], "SERVICE_START_FAILED");
    assert_eq!(s["rollback"], "previous 1.0.0");
    assert!(!d.root().join("v2.0.0").exists());
    let st = d.env.run(&["status"]).stdout;
    assert!(st.contains("rolled back to previous 1.0.0"), "{st}");
    assert!(st.contains("rollback:  previous 1.0.0"), "{st}");
    assert!(st.contains("error:     SERVICE_START_FAILED"), "{st}");
}

#[test]
fn service_dying_after_start_rolls_back() {
    let mut d = Device::with_v1();
    d.sc.touch("die-device-api@v2.0.0");
    let (files, manifest) = v2_partial();
    let pkg = d.pack("2.0.0", &files, &manifest);
    d.deliver("2.0.0", pkg).expect(1);
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
    assert_eq!(d.env.state()["rollback"], "previous 1.0.0");
}

#[test]
fn previous_failing_too_falls_back_to_factory() {
    let mut d = Device::with_factory();
    d.sc.touch("fail-start-device-api@v2.0.0");
    d.sc.touch("fail-start-device-api@v1.0.0");
    let (files, manifest) = v2_partial();
    let pkg = d.pack("2.0.0", &files, &manifest);
    let run = d.deliver("2.0.0", pkg);
    run.expect(1);
    // current never points at the factory itself: a fresh copy of it.
    let cur = d.link("current").unwrap();
    assert!(
        cur.starts_with("v0.9.0") && cur != "v0.9.0~factory",
        "{cur}"
    );
    let s = d.env.state();
    assert_eq!(s["error"], "SERVICE_START_FAILED");
    assert_eq!(s["rollback"], "factory 0.9.0");
    // The rollback restarts the whole service set of the version it lands on, in order.
    let calls = d.sc.calls();
    assert_eq!(
        calls[calls.len() - 2..],
        [
            format!("start device-api {cur}"),
            format!("start printer-ui {cur}")
        ],
        "{calls:?}"
    );
    d.assert_current_is(&factory_files());
    assert_eq!(d.link("factory").as_deref(), Some("v0.9.0~factory"));
}

#[test]
fn everything_failing_is_rollback_failed() {
    let mut d = Device::with_factory();
    d.sc.touch("fail-start-device-api");
    let (files, manifest) = v2_partial();
    let pkg = d.pack("2.0.0", &files, &manifest);
    let run = d.deliver("2.0.0", pkg);
    run.expect(1);
    assert!(
        run.stderr
            .contains("error: ROLLBACK_FAILED: SERVICE_START_FAILED: "),
        "{}",
        run.stderr
    );
    let s = d.env.state();
    assert_eq!(s["error"], "ROLLBACK_FAILED");
    assert_eq!(s["rollback"], "failed");
    // current still names a complete version, and factory is intact.
    assert!(d.root().join("current/bin/device-api").exists());
    assert_eq!(d.link("factory").as_deref(), Some("v0.9.0~factory"));
}

#[test]
fn hung_systemctl_is_killed_at_its_bound() {
    let mut d = Device::with_v1();
    d.env.set("TOPE_OTA_STOP_TIMEOUT_MS", "700");
    d.sc.touch("hang-stop-device-api");
    let (files, manifest) = v2_partial();
    let pkg = d.pack("2.0.0", &files, &manifest);
    d.download("2.0.0", pkg).expect(0);
    let t = Instant::now();
    let run = d.install();
    let took = t.elapsed();
    run.expect(1);
    assert!(run.stderr.contains("hung and was killed"), "{}", run.stderr);
    assert!(took < Duration::from_secs(20), "{took:?}");
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
}

fn hostile(d: &mut Device, zip: Vec<u8>, code: &str, what: &str) {
    let before = tree(&d.root().join("v1.0.0"));
    d.download("2.0.0", zip).expect(0);
    let run = d.install();
    assert_eq!(run.code, 1, "{what}: {run:?}");
    assert!(
        run.stderr.contains(&format!("error: {code}: ")),
        "{what}: {}",
        run.stderr
    );
    assert_eq!(d.env.state()["error"], code, "{what}");
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"), "{what}");
    assert_eq!(
        tree(&d.root().join("v1.0.0")),
        before,
        "{what}: current changed"
    );
    assert!(!d.root().join("v2.0.0").exists(), "{what}");
    d.no_staging_left();
    assert!(d.sc.calls().is_empty(), "{what}: services touched");
    assert!(
        d.env.download_files().is_empty(),
        "{what}: the failed package is kept"
    );
}

pub fn good_manifest_entry() -> RawEntry {
    RawEntry::file(
        "manifest.json",
        json!({"version": "2.0.0", "modules": [{"name": "api", "src": "bin/device-api", "dst": "bin/device-api"}]})
            .to_string()
            .as_bytes(),
    )
}

#[test]
fn hostile_zips_are_refused_with_current_untouched() {
    let mut d = Device::with_v1();
    let api = || RawEntry::file("bin/device-api", b"x");
    let cases: Vec<(&str, Vec<RawEntry>)> = vec![
        (
            "dot-dot entry",
            vec![
                good_manifest_entry(),
                api(),
                RawEntry::file("../../evil", b"x"),
            ],
        ),
        (
            "absolute entry",
            vec![
                good_manifest_entry(),
                api(),
                RawEntry::file("/tmp/evil", b"x"),
            ],
        ),
        (
            "symlink leaving",
            vec![
                good_manifest_entry(),
                api(),
                RawEntry::symlink("bin/out", "../../../etc"),
            ],
        ),
        (
            "absolute symlink",
            vec![
                good_manifest_entry(),
                api(),
                RawEntry::symlink("bin/out", "/etc/passwd"),
            ],
        ),
        (
            "file under symlink",
            vec![
                good_manifest_entry(),
                api(),
                RawEntry::symlink("lnk", "bin"),
                RawEntry::file("lnk/x", b"x"),
            ],
        ),
        ("duplicate name", vec![good_manifest_entry(), api(), api()]),
        (
            "device file",
            vec![
                good_manifest_entry(),
                api(),
                RawEntry::file("dev/sda", b"").mode(0o060644),
            ],
        ),
        (
            "fifo",
            vec![
                good_manifest_entry(),
                api(),
                RawEntry::file("fifo", b"").mode(0o010644),
            ],
        ),
        (
            "size header lies",
            vec![
                good_manifest_entry(),
                RawEntry {
                    declared: Some(3),
                    ..RawEntry::file("bin/device-api", b"0123456789")
                },
            ],
        ),
        ("not a zip", vec![]),
    ];
    for (what, entries) in cases {
        let zip = if entries.is_empty() {
            b"this is not a zip file".to_vec()
        } else {
            raw_zip(&entries)
        };
        hostile(&mut d, zip, "PACKAGE_INVALID", what);
    }
}

#[test]
fn zip_limits_are_enforced() {
    let mut d = Device::with_v1();
    // A compression ratio typical of zip bombs: 32 MiB of zeros deflate to ~32 KiB.
    let bomb = {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let o = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        w.start_file("manifest.json", o).unwrap();
        std::io::Write::write_all(
            &mut w,
            br#"{"version":"2.0.0","modules":[{"name":"a","src":"z","dst":"z"}]}"#,
        )
        .unwrap();
        w.start_file("z", o).unwrap();
        std::io::Write::write_all(&mut w, &vec![0u8; 32 << 20]).unwrap();
        w.finish().unwrap().into_inner()
    };
    hostile(&mut d, bomb, "PACKAGE_INVALID", "zip bomb");

    let many: Vec<RawEntry> = std::iter::once(good_manifest_entry())
        .chain((0..20).map(|i| RawEntry::file(&format!("f{i}"), b"x")))
        .chain(std::iter::once(RawEntry::file("bin/device-api", b"x")))
        .collect();
    d.env.set("TOPE_OTA_MAX_ENTRIES", "10");
    hostile(
        &mut d,
        raw_zip(&many),
        "PACKAGE_INVALID",
        "too many entries",
    );
    d.env.vars.remove("TOPE_OTA_MAX_ENTRIES");

    d.env.set("TOPE_OTA_MAX_UNPACKED", "100");
    let big = vec![
        good_manifest_entry(),
        RawEntry::file("bin/device-api", &[7u8; 500]),
    ];
    hostile(
        &mut d,
        raw_zip(&big),
        "PACKAGE_INVALID",
        "over the size limit",
    );
    d.env.vars.remove("TOPE_OTA_MAX_UNPACKED");
}

#[test]
fn unpacked_size_over_free_space_is_disk_full() {
    let fs = Tmpfs::mount(16);
    let mut d = Device::new();
    d.env.versions_dir = fs.path().join("versions");
    FakeSystemctl::install(&mut d.env);
    let pkg = d.pack("1.0.0", &v1_files(), &full_manifest("1.0.0"));
    d.deliver("1.0.0", pkg).expect(0);
    d.sc = FakeSystemctl {
        dir: d.env.tmp.path().join("systemctl"),
        script: PathBuf::new(),
    };
    d.sc.clear();
    let big = vec![
        good_manifest_entry(),
        RawEntry::file("bin/device-api", &vec![1u8; 20 << 20]),
    ];
    hostile(
        &mut d,
        raw_zip(&big),
        "DISK_FULL",
        "bigger than the filesystem",
    );
}

#[test]
fn setuid_bits_are_stripped_and_exec_kept() {
    let mut d = Device::with_v1();
    let zip = raw_zip(&[
        good_manifest_entry(),
        RawEntry::file("bin/device-api", b"#!/bin/sh\n").mode(0o106755),
    ]);
    d.deliver("2.0.0", zip).expect(0);
    let mode = std::fs::metadata(d.root().join("v2.0.0/bin/device-api"))
        .unwrap()
        .mode();
    assert_eq!(mode & 0o7777, 0o755);
}

#[test]
fn invalid_manifests_are_refused() {
    let mut d = Device::with_v1();
    let m = |body: &str| {
        raw_zip(&[
            RawEntry::file("manifest.json", body.as_bytes()),
            RawEntry::file("bin/device-api", b"x"),
        ])
    };
    let md5_x = md5_hex(b"x");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not json", m("{nope"), "manifest.json"),
        ("missing modules", m(r#"{"version":"2.0.0"}"#), "modules"),
        (
            "missing dst",
            m(r#"{"version":"2.0.0","modules":[{"name":"a","src":"bin/device-api"}]}"#),
            "dst",
        ),
        (
            "version differs",
            m(
                r#"{"version":"2.0.1","modules":[{"name":"a","src":"bin/device-api","dst":"bin/a"}]}"#,
            ),
            "differs",
        ),
        (
            "src not in zip",
            m(r#"{"version":"2.0.0","modules":[{"name":"a","src":"bin/nope","dst":"bin/a"}]}"#),
            "not in the package",
        ),
        (
            "dst absolute",
            m(
                r#"{"version":"2.0.0","modules":[{"name":"a","src":"bin/device-api","dst":"/usr/bin/a"}]}"#,
            ),
            "clean relative",
        ),
        (
            "dst not clean",
            m(
                r#"{"version":"2.0.0","modules":[{"name":"a","src":"bin/device-api","dst":"bin/../../a"}]}"#,
            ),
            "clean relative",
        ),
        (
            "two modules one dst",
            m(
                r#"{"version":"2.0.0","modules":[{"name":"a","src":"bin/device-api","dst":"bin/a"},{"name":"b","src":"bin/device-api","dst":"bin/a"}]}"#,
            ),
            "two modules",
        ),
        (
            "module md5 mismatch",
            m(
                r#"{"version":"2.0.0","modules":[{"name":"a","src":"bin/device-api","dst":"bin/a","md5":"00000000000000000000000000000000"}]}"#,
            ),
            "md5",
        ),
        (
            "no manifest",
            raw_zip(&[RawEntry::file("bin/device-api", b"x")]),
            "no manifest.json",
        ),
    ];
    for (what, zip, needle) in cases {
        hostile(&mut d, zip, "MANIFEST_INVALID", what);
        let msg = d.env.state()["message"].as_str().unwrap().to_string();
        assert!(msg.contains(needle), "{what}: {msg}");
    }
    // And a matching module md5 installs.
    let ok = m(&format!(
        r#"{{"version":"2.0.0","modules":[{{"name":"a","src":"bin/device-api","dst":"bin/a","md5":"{md5_x}"}}]}}"#
    ));
    d.deliver("2.0.0", ok).expect(0);
}

#[test]
fn install_preconditions() {
    let mut d = Device::new();
    let run = d.install();
    run.expect(1);
    assert!(run.stderr.contains("error: NO_PACKAGE: "), "{}", run.stderr);

    let pkg = d.pack("1.0.0", &v1_files(), &full_manifest("1.0.0"));
    d.download("1.0.0", pkg).expect(0);
    let run = d.env.run(&["install", "--version", "1.0.1"]);
    run.expect(1);
    assert!(
        run.stderr.contains("error: VERSION_MISMATCH: "),
        "{}",
        run.stderr
    );
    assert_eq!(
        d.env.state()["stage"],
        "toInstall",
        "a refused install changes nothing"
    );

    // Expired: verified 25 h ago.
    let path = d.env.state_dir.join("state.json");
    let mut s = d.env.state();
    s["verified_at"] = json!("2000-01-01T00:00:00Z");
    std::fs::write(&path, s.to_string()).unwrap();
    let run = d.install();
    run.expect(1);
    assert!(
        run.stderr.contains("error: PACKAGE_EXPIRED: "),
        "{}",
        run.stderr
    );
    assert!(
        d.env.download_files().is_empty(),
        "the expired package is deleted"
    );
    assert_eq!(d.env.state()["error"], "PACKAGE_EXPIRED");
    assert!(d.link("current").is_none());
}

#[test]
fn installing_the_running_version_is_success_with_nothing_to_do() {
    let mut d = Device::with_v1();
    let pkg = d.pack("1.0.0", &v1_files(), &full_manifest("1.0.0"));
    let run = d.deliver("1.0.0", pkg);
    run.expect(0);
    assert!(
        run.stdout.contains("1.0.0 already runs; nothing to do"),
        "{run:?}"
    );
    let s = d.env.state();
    assert_eq!(
        (s["stage"].clone(), s["error"].clone()),
        (json!("success"), Value::Null)
    );
    assert!(
        s["message"].as_str().unwrap().contains("already runs"),
        "{s}"
    );
    assert!(d.env.download_files().is_empty(), "the package is deleted");
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
    assert!(
        d.sc.calls().is_empty(),
        "no service touched: {:?}",
        d.sc.calls()
    );
}

/// v1.0.0 with other contents: a rebuilt package of the same version.
fn v1_rebuilt() -> Vec<FileSpec> {
    vec![
        ("bin/device-api", b"#!/bin/sh\necho api 1 rebuilt\n", 0o755),
        ("bin/ui", b"#!/bin/sh\necho ui 1\n", 0o755),
        ("share/a.txt", b"alpha 1 rebuilt", 0o644),
        ("share/b.txt", b"beta 1", 0o644),
        ("lib/libx.so", b"\x7fELF libx 1", 0o644),
    ]
}

#[test]
fn reinstall_builds_a_fresh_snapshot_under_a_new_name() {
    let mut d = Device::with_v1();
    let pkg = d.pack("1.0.0", &v1_rebuilt(), &full_manifest("1.0.0"));
    d.download("1.0.0", pkg.clone()).expect(0);
    let run = d.env.run(&["install", "--reinstall"]);
    run.expect(0);
    // Every module from the package, none from the existing snapshot of 1.0.0.
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0~2"));
    assert_eq!(d.link("previous").as_deref(), Some("v1.0.0"));
    d.assert_current_is(&v1_rebuilt());
    assert_eq!(
        version_files(&d.root().join("v1.0.0")),
        spec_files(&v1_files()),
        "the old snapshot is untouched"
    );
    let calls = d.sc.calls();
    assert!(
        calls.iter().any(|c| c.starts_with("stop device-api")),
        "{calls:?}"
    );
    // status names the dir; rollback --to and verify of the version are unambiguous.
    let st = d.env.run(&["status"]).stdout;
    assert!(st.contains("current:   1.0.0 (v1.0.0~2)"), "{st}");
    assert!(st.contains("previous:  1.0.0\n"), "{st}");
    let run = d.env.run(&["rollback", "--to", "1.0.0"]);
    run.expect(0);
    assert!(run.stdout.contains("already current"), "{run:?}");
    let v = d.env.run(&["--json", "verify", "1.0.0"]);
    v.expect(0);
    assert_eq!(
        v.json()["data"]["snapshots"].as_array().unwrap().len(),
        2,
        "{:?}",
        v.json()
    );
    // Again: a third snapshot; the one no link holds any more is pruned.
    d.download("1.0.0", pkg).expect(0);
    d.env.run(&["install", "--reinstall"]).expect(0);
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0~3"));
    assert_eq!(d.link("previous").as_deref(), Some("v1.0.0~2"));
    assert!(!d.root().join("v1.0.0").exists(), "pruned");
    // The older snapshot by its dir name or `previous`.
    d.env.run(&["rollback", "--to", "v1.0.0~2"]).expect(0);
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0~2"));
    d.no_staging_left();
}

#[test]
fn reinstalls_never_reuse_a_pruned_name_so_rollback_to_the_version_takes_the_newest() {
    // Each reinstall prunes the snapshot no link holds; a freed name (`v1.0.0`, `~2`…) given to
    // a newer snapshot would make the highest `~n` an older one.
    let mut d = Device::with_v1();
    let pkg = d.pack("1.0.0", &v1_files(), &full_manifest("1.0.0"));
    let mut seen = vec!["v1.0.0".to_string()];
    for i in 2..=5 {
        d.download("1.0.0", pkg.clone()).expect(0);
        d.env.run(&["install", "--reinstall"]).expect(0);
        let cur = d.link("current").unwrap();
        assert_eq!(cur, format!("v1.0.0~{i}"), "reinstall {i}");
        assert!(!seen.contains(&cur), "{cur} reused");
        seen.push(cur.clone());
        assert_eq!(d.link("previous"), Some(seen[seen.len() - 2].clone()));
        // The newest snapshot of 1.0.0 is the current one: a no-op.
        let run = d.env.run(&["rollback", "--to", "1.0.0"]);
        run.expect(0);
        assert!(
            run.stdout.contains("already current"),
            "reinstall {i}: {run:?}"
        );
        assert_eq!(d.link("current").as_deref(), Some(cur.as_str()));
    }
    d.env.run(&["verify", "--all"]).expect(0);
    let st = d.env.run(&["status"]).stdout;
    assert!(st.contains("current:   1.0.0 (v1.0.0~5)"), "{st}");
    assert!(st.contains("previous:  1.0.0 (v1.0.0~4)"), "{st}");
}

#[test]
fn a_version_only_previous_holds_installs_afresh() {
    let mut d = Device::with_v1();
    let (files, manifest) = v2_partial();
    let v2 = d.pack("2.0.0", &files, &manifest);
    d.deliver("2.0.0", v2.clone()).expect(0);
    d.env.run(&["rollback"]).expect(0);
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
    assert_eq!(d.link("previous").as_deref(), Some("v2.0.0"));
    // 2.0.0 again, while previous holds it: built the usual way under a new name.
    d.deliver("2.0.0", v2).expect(0);
    assert_eq!(d.link("current").as_deref(), Some("v2.0.0~2"));
    assert_eq!(d.link("previous").as_deref(), Some("v1.0.0"));
    assert!(
        !d.root().join("v2.0.0").exists(),
        "the unreferenced one is pruned"
    );
    // A lower version only previous holds: the downgrade rules apply.
    let v1 = d.pack("1.0.0", &v1_files(), &full_manifest("1.0.0"));
    let run = d.deliver("1.0.0", v1);
    run.expect(1);
    assert!(run.stderr.contains("DOWNGRADE_REFUSED"), "{run:?}");
    d.env.run(&["install", "--allow-downgrade"]).expect(0);
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0~2"));
    assert_eq!(d.link("previous").as_deref(), Some("v2.0.0~2"));
    d.assert_current_is(&v1_files());
}

#[test]
fn manual_rollback_to_previous_factory_and_named_version() {
    let d = v2_with_factory();
    d.sc.clear();

    let run = d.env.run(&["rollback"]);
    run.expect(0);
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
    assert_eq!(
        d.link("previous").as_deref(),
        Some("v2.0.0"),
        "previous becomes the old current"
    );
    assert_eq!(
        d.sc.calls(),
        [
            "stop printer-ui v2.0.0",
            "stop device-api v2.0.0",
            "start device-api v1.0.0",
            "start printer-ui v1.0.0"
        ]
    );
    assert_eq!(d.env.state()["stage"], "success");

    d.env.run(&["rollback", "--to", "factory"]).expect(0);
    // A fresh, writable copy of factory; factory itself stays read-only and unlinked.
    assert_eq!(d.link("current").as_deref(), Some("v0.9.0"));
    assert_eq!(d.link("previous").as_deref(), Some("v1.0.0"));
    d.assert_current_is(&factory_files());

    d.env.run(&["rollback", "--to", "2.0.0"]).expect(0);
    assert_eq!(d.link("current").as_deref(), Some("v2.0.0"));
    assert_eq!(
        d.link("factory").as_deref(),
        Some("v0.9.0~factory"),
        "factory never moves"
    );

    let run = d.env.run(&["rollback", "--to", "7.7.7"]);
    run.expect(2);
    assert!(
        run.stderr.contains("error: INVALID_REQUEST: "),
        "{}",
        run.stderr
    );
    assert_eq!(d.link("current").as_deref(), Some("v2.0.0"));
}

#[test]
fn failing_manual_rollback_returns_to_where_it_was() {
    let mut d = Device::with_v1();
    let (files, manifest) = v2_partial();
    let pkg = d.pack("2.0.0", &files, &manifest);
    d.deliver("2.0.0", pkg).expect(0);
    d.sc.touch("fail-start-device-api@v1.0.0");
    let run = d.env.run(&["rollback"]);
    run.expect(1);
    assert!(
        run.stderr.contains("SERVICE_START_FAILED"),
        "{}",
        run.stderr
    );
    assert_eq!(d.link("current").as_deref(), Some("v2.0.0"));
    assert_eq!(d.link("previous").as_deref(), Some("v1.0.0"));
}

#[test]
fn callbacks_advance_through_the_install() {
    let api = ApiStub::start(Duration::ZERO);
    let mut d = Device::new();
    d.env.set("TOPE_OTA_REPORT_URL", &api.url);
    let pkg = d.pack("1.0.0", &v1_files(), &full_manifest("1.0.0"));
    d.deliver("1.0.0", pkg).expect(0);
    let bodies = api.bodies();
    let install: Vec<(String, u64)> = bodies
        .iter()
        .skip_while(|b| b["data"]["stage"] != "installing")
        .map(|b| {
            (
                b["data"]["stage"].as_str().unwrap().to_string(),
                b["data"]["progress"].as_u64().unwrap(),
            )
        })
        .collect();
    let progress: Vec<u64> = install.iter().map(|p| p.1).collect();
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{install:?}");
    assert!(
        install.len() >= 6,
        "install progress moves in steps: {install:?}"
    );
    assert_eq!(install.last().unwrap(), &("success".to_string(), 100));
    for b in &bodies {
        assert_eq!(b["data"]["version"], "1.0.0");
    }
}

#[test]
fn ota_gui_present_missing_or_crashing_never_blocks() {
    for (what, script) in [
        (
            "present",
            "#!/bin/sh\necho started > \"$0.ran\"\nsleep 30\n",
        ),
        ("crashing", "#!/bin/sh\necho started > \"$0.ran\"\nexit 3\n"),
    ] {
        let mut d = Device::new();
        let gui = d.env.tmp.path().join("ota-gui");
        std::fs::write(&gui, script).unwrap();
        std::fs::set_permissions(&gui, std::fs::Permissions::from_mode(0o755)).unwrap();
        d.env.set("TOPE_OTA_GUI", gui.to_str().unwrap());
        let pkg = d.pack("1.0.0", &v1_files(), &full_manifest("1.0.0"));
        let t = Instant::now();
        d.deliver("1.0.0", pkg).expect(0);
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "{what}: the GUI blocked the install"
        );
        let ran = PathBuf::from(format!("{}.ran", gui.display()));
        let until = Instant::now() + Duration::from_secs(5);
        while !ran.exists() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(ran.exists(), "{what}: the GUI was not launched");
    }
    // Missing: the default of Device::new points at nothing.
    Device::with_v1();
}

#[test]
fn reboot_manifest_runs_the_reboot_command() {
    let mut d = Device::with_v1();
    let marker = d.env.tmp.path().join("rebooted");
    let cmd = d.env.tmp.path().join("reboot.sh");
    std::fs::write(&cmd, format!("#!/bin/sh\ntouch '{}'\n", marker.display())).unwrap();
    std::fs::set_permissions(&cmd, std::fs::Permissions::from_mode(0o755)).unwrap();
    d.env.set("TOPE_OTA_REBOOT_CMD", cmd.to_str().unwrap());
    let (files, mut manifest) = v2_partial();
    manifest["reboot"] = json!(true);
    let pkg = d.pack("2.0.0", &files, &manifest);
    let run = d.deliver("2.0.0", pkg);
    run.expect(0);
    assert!(marker.exists(), "the reboot command did not run");
    let s = d.env.state();
    assert_eq!(s["stage"], "rebooting");
    assert_eq!(d.link("current").as_deref(), Some("v2.0.0"));
    assert_eq!(
        d.sc.calls(),
        ["stop device-api v1.0.0"],
        "services start after the reboot"
    );
}

#[test]
fn pack_builds_a_manifest_from_the_directory() {
    let d = Device::new();
    let dir = d.env.tmp.path().join("tree");
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::write(dir.join("bin/tool"), b"tool").unwrap();
    std::fs::write(dir.join("README"), b"hi").unwrap();
    let out = d.env.tmp.path().join("p.zip");
    let run = d.env.run(&[
        "--json",
        "pack",
        "--version",
        "3.1.4",
        "--out",
        out.to_str().unwrap(),
        dir.to_str().unwrap(),
    ]);
    run.expect(0);
    let j = run.json();
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(j["data"]["size"], bytes.len() as u64);
    assert_eq!(j["data"]["md5"], md5_hex(&bytes));
    let mut ar = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut m = String::new();
    std::io::Read::read_to_string(&mut ar.by_name("manifest.json").unwrap(), &mut m).unwrap();
    let m: Value = serde_json::from_str(&m).unwrap();
    assert_eq!(m["version"], "3.1.4");
    let dsts: Vec<&str> = m["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["dst"].as_str().unwrap())
        .collect();
    assert_eq!(dsts, ["README", "bin"]);
}

#[test]
fn downgrade_is_refused_unless_allowed() {
    let d = downgrade_ready();
    let run = d.install();
    run.expect(1);
    assert!(
        run.stderr
            .contains("error: DOWNGRADE_REFUSED: 1.5.0 is lower than the current 2.0.0"),
        "{}",
        run.stderr
    );
    assert_eq!(
        d.env.state()["stage"],
        "toInstall",
        "refused by policy: the package waits"
    );
    assert_eq!(d.link("current").as_deref(), Some("v2.0.0"));
    d.env.run(&["install", "--allow-downgrade"]).expect(0);
    assert_eq!(d.link("current").as_deref(), Some("v1.5.0"));
    assert_eq!(d.link("previous").as_deref(), Some("v2.0.0"));
}

// ---------------------------------------------------------------- print-job inhibit (issue 8)

fn inhibit_dir(d: &Device) -> PathBuf {
    PathBuf::from(&d.env.vars["TOPE_OTA_INHIBIT_DIR"])
}

fn start_print(d: &Device) -> PathBuf {
    let dir = inhibit_dir(d);
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("print-job-42");
    std::fs::write(&f, b"").unwrap();
    f
}

/// 2.0.0 installed over 1.0.0, and 1.5.0 downloaded: a downgrade waiting.
pub fn downgrade_ready() -> Device {
    let mut d = Device::with_v1();
    let (files, manifest) = v2_partial();
    let pkg = d.pack("2.0.0", &files, &manifest);
    d.deliver("2.0.0", pkg).expect(0);
    let old = d.pack(
        "1.5.0",
        &[("bin/device-api", b"#!/bin/sh\necho api 1.5\n", 0o755)],
        &json!({"version": "1.5.0", "modules": [{"name": "api", "src": "bin/device-api", "dst": "bin/device-api", "process_name": "device-api"}]}),
    );
    d.download("1.5.0", old).expect(0);
    d
}

/// 2.0.0 installed over 1.0.0, with a factory 0.9.0.
pub fn v2_with_factory() -> Device {
    let mut d = Device::with_factory();
    let (files, manifest) = v2_partial();
    let pkg = d.pack("2.0.0", &files, &manifest);
    d.deliver("2.0.0", pkg).expect(0);
    d
}

/// 1.0.0 installed and 2.0.0 downloaded, ready to install.
pub fn v2_ready() -> Device {
    let mut d = Device::with_v1();
    let (files, manifest) = v2_partial();
    let pkg = d.pack("2.0.0", &files, &manifest);
    d.download("2.0.0", pkg).expect(0);
    d
}

#[test]
fn inhibited_install_waits_with_its_package() {
    let mut d = v2_ready();
    // A progress screen that records being shown: never over a print.
    let gui = d.env.tmp.path().join("ota-gui");
    std::fs::write(&gui, "#!/bin/sh\necho shown >> \"$0.ran\"\n").unwrap();
    std::fs::set_permissions(&gui, std::fs::Permissions::from_mode(0o755)).unwrap();
    d.env.set("TOPE_OTA_GUI", gui.to_str().unwrap());
    let shown = PathBuf::from(format!("{}.ran", gui.display()));
    let job = start_print(&d);
    let run = d.install();
    run.expect(69);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !shown.exists(),
        "ota-gui was started for an inhibited install"
    );
    assert!(
        run.stderr
            .contains("error: INHIBITED: a print job is running"),
        "{}",
        run.stderr
    );
    let s = d.env.state();
    assert_eq!(s["stage"], "toInstall");
    assert!(
        s["message"].as_str().unwrap().starts_with("INHIBITED: "),
        "{s}"
    );
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
    assert!(d.sc.calls().is_empty(), "no service was touched");
    // --wait: the print ends while install waits.
    let remover = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        std::fs::remove_file(job).unwrap();
    });
    let t = Instant::now();
    d.env.run(&["install", "--wait", "30"]).expect(0);
    remover.join().unwrap();
    assert!(t.elapsed() >= Duration::from_millis(600));
    assert_eq!(d.link("current").as_deref(), Some("v2.0.0"));
}

#[test]
fn inhibit_command_and_manual_rollback() {
    let mut d = v2_ready();
    d.env.set("TOPE_OTA_INHIBIT_CMD", "false");
    let run = d.install();
    run.expect(69);
    d.env.set("TOPE_OTA_INHIBIT_CMD", "true");
    d.install().expect(0);
    start_print(&d);
    let run = d.env.run(&["rollback"]);
    run.expect(69);
    assert!(run.stderr.contains("INHIBITED"), "{}", run.stderr);
    assert_eq!(d.link("current").as_deref(), Some("v2.0.0"));
}

#[test]
fn heal_auto_install_installs_once_the_print_ends() {
    let d = v2_ready();
    let job = start_print(&d);
    let run = d.env.run(&["heal", "--auto-install"]);
    run.expect(0);
    assert!(run.stdout.contains("waits: INHIBITED"), "{}", run.stdout);
    assert_eq!(d.env.state()["stage"], "toInstall");
    // Without the opt-in, heal leaves a pending package alone.
    std::fs::remove_file(job).unwrap();
    d.env.run(&["heal"]).expect(0);
    assert_eq!(d.env.state()["stage"], "toInstall");
    let run = d.env.run(&["heal", "--auto-install"]);
    run.expect(0);
    assert!(
        run.stdout.contains("installing the pending package 2.0.0"),
        "{}",
        run.stdout
    );
    assert_eq!(d.env.state()["stage"], "success");
    assert_eq!(d.link("current").as_deref(), Some("v2.0.0"));
}

#[test]
fn automatic_rollback_ignores_inhibitors() {
    let d = v2_ready();
    // The print starts while the new version fails to come up: the rollback must still run.
    let dir = inhibit_dir(&d);
    std::fs::create_dir_all(&dir).unwrap();
    let hook = d.sc.dir.join("systemctl");
    let script = std::fs::read_to_string(&hook).unwrap().replace(
        "if [ -e \"$d/fail-$1-$2\" ]",
        &format!("if [ \"$1 $cur\" = \"start v2.0.0\" ]; then touch '{}/print'; exit 1; fi\nif [ -e \"$d/fail-$1-$2\" ]", dir.display()),
    );
    std::fs::write(&hook, script).unwrap();
    let run = d.install();
    run.expect(1);
    assert!(
        run.stderr.contains("rolled back to previous 1.0.0"),
        "{}",
        run.stderr
    );
    assert!(
        dir.join("print").exists(),
        "the inhibitor was there during the rollback"
    );
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
}

// ---------------------------------------------------------------- review fixes

#[test]
fn package_links_cannot_reach_outside_through_dst() {
    let mut d = Device::with_factory();
    let factory_before = tree(&d.root().join("v0.9.0~factory"));
    let m = |body: &str, extra: Vec<RawEntry>| {
        let mut e = vec![RawEntry::file("manifest.json", body.as_bytes())];
        e.extend(extra);
        raw_zip(&e)
    };
    // A link module placed at .tope-ota would make tope-ota write through it.
    let into_meta = m(
        r#"{"version":"2.0.0","modules":[{"name":"m","src":"a/b/m","dst":".tope-ota"}]}"#,
        vec![RawEntry::symlink("a/b/m", "x")],
    );
    hostile(&mut d, into_meta, "MANIFEST_INVALID", "dst .tope-ota");
    // An upward link is refused wherever it would land, chained ones too.
    let up = m(
        r#"{"version":"2.0.0","modules":[{"name":"m","src":"a/b/m","dst":"m"}]}"#,
        vec![RawEntry::symlink("a/b/m", "../../v0.9.0~factory")],
    );
    hostile(&mut d, up, "PACKAGE_INVALID", "upward link");
    let chained = m(
        r#"{"version":"2.0.0","modules":[{"name":"m","src":"y","dst":"y"}]}"#,
        vec![RawEntry::symlink("x", "."), RawEntry::symlink("y", "x/..")],
    );
    hostile(&mut d, chained, "PACKAGE_INVALID", "chained links");
    assert_eq!(
        tree(&d.root().join("v0.9.0~factory")),
        factory_before,
        "factory changed"
    );
    // A downward link is fine.
    let ok = m(
        r#"{"version":"2.0.0","modules":[{"name":"lib","src":"lib","dst":"lib"}]}"#,
        vec![
            RawEntry::file("lib/libx.so.1", b"x"),
            RawEntry::symlink("lib/libx.so", "libx.so.1"),
        ],
    );
    d.deliver("2.0.0", ok).expect(0);
    assert_eq!(
        std::fs::read_link(d.root().join("v2.0.0/lib/libx.so")).unwrap(),
        Path::new("libx.so.1")
    );
}

#[test]
fn rollback_starts_the_old_versions_services_not_the_new_ones() {
    let mut d = Device::with_v1();
    d.sc.touch("fail-start-camera");
    let pkg = d.pack(
        "2.0.0",
        &[("bin/camera", b"#!/bin/sh\n", 0o755)],
        &json!({"version": "2.0.0", "modules": [
            {"name": "camera", "src": "bin/camera", "dst": "bin/camera", "process_name": "camera", "restart_order": 3}
        ]}),
    );
    let run = d.deliver("2.0.0", pkg);
    run.expect(1);
    assert!(
        run.stderr.contains("rolled back to previous 1.0.0"),
        "{}",
        run.stderr
    );
    assert_eq!(d.env.state()["rollback"], "previous 1.0.0");
    let starts: Vec<String> =
        d.sc.calls()
            .into_iter()
            .filter(|c| c.starts_with("start"))
            .collect();
    assert_eq!(
        starts,
        [
            "start camera v2.0.0",
            "start device-api v1.0.0",
            "start printer-ui v1.0.0"
        ],
        "v1 has no camera unit: only its own services start after the rollback"
    );
}
