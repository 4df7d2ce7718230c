//! A package that carries the updater (issue #23, item 1): the module that says
//! `"updater": true` lands at `bin/tope-ota` in the snapshot like any file, once it is checked to
//! be a program this device runs; anything else is refused before the device changes.

use crate::install::*;
use crate::support::sha256_hex;

use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;

fn leak(bytes: Vec<u8>) -> &'static [u8] {
    Box::leak(bytes.into_boxed_slice())
}

/// A small program of this machine's own target, standing in for a tope-ota build.
fn native_program() -> &'static [u8] {
    leak(std::fs::read("/bin/true").unwrap())
}

/// A static program of the other 64-bit board (arm64 here, amd64 on an ARM build): an ELF
/// header and one loadable segment's program header.
fn foreign_program() -> &'static [u8] {
    let own = std::fs::read("/proc/self/exe").unwrap();
    let machine = u16::from_le_bytes([own[18], own[19]]);
    let other: u16 = if machine == 183 { 62 } else { 183 };
    let mut h = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x02\0".to_vec();
    h.extend(other.to_le_bytes());
    h.extend(1u32.to_le_bytes()); // e_version
    h.extend([0u8; 8]); // e_entry
    h.extend(64u64.to_le_bytes()); // e_phoff
    h.extend([0u8; 8]); // e_shoff
    h.extend([0u8; 4]); // e_flags
    h.extend(64u16.to_le_bytes()); // e_ehsize
    h.extend(56u16.to_le_bytes()); // e_phentsize
    h.extend(1u16.to_le_bytes()); // e_phnum
    h.extend([0u8; 6]);
    let mut ph = vec![0u8; 56];
    ph[0] = 1; // PT_LOAD
    h.extend(ph);
    leak(h)
}

fn with_updater(version: &str, module: Value) -> Value {
    let mut m = full_manifest(version);
    m["modules"].as_array_mut().unwrap().push(module);
    m
}

fn updater_module() -> Value {
    json!({"name": "updater", "src": "tope-ota", "dst": "bin/tope-ota", "updater": true})
}

#[track_caller]
fn assert_refused(
    d: &mut Device,
    version: &str,
    files: Files,
    manifest: &Value,
    code: &str,
    why: &str,
) {
    d.sc.clear();
    let p = d.pack(version, files, manifest);
    let run = d.deliver(version, p);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!("error: {code}: ")) && run.stderr.contains(why),
        "{}",
        run.stderr
    );
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
    assert!(
        !d.sc.calls().iter().any(|c| c.starts_with("stop")),
        "services stopped: {:?}",
        d.sc.calls()
    );
}

#[test]
fn a_package_carries_the_updater_to_bin_tope_ota() {
    let mut d = Device::with_v1();
    let prog = crate::support::updater_build("0.1.1");
    let mut files = v1_files();
    files.push(("tope-ota", prog, 0o755));
    let p = d.pack("1.1.0", &files, &with_updater("1.1.0", updater_module()));
    let run = d.deliver("1.1.0", p);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let dst = d.root().join("v1.1.0/bin/tope-ota");
    assert_eq!(std::fs::read(&dst).unwrap(), prog);
    let mode = std::fs::metadata(&dst).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755);
    let v = d.env.run(&["verify"]);
    assert!(
        v.stdout.contains("v1.1.0 (current): intact"),
        "{}",
        v.stdout
    );
    // The updater is not a service: nothing of it is started or stopped.
    let calls = d.sc.calls();
    assert!(!calls.iter().any(|c| c.contains("tope-ota")), "{calls:?}");
    // What was checked is recorded with the snapshot.
    let root = d.root().to_path_buf();
    let record = |v: &str| -> Value {
        let p = root.join(format!("v{v}/.tope-ota/updater.json"));
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let rec = record("1.1.0");
    assert_eq!(rec["module"], "updater");
    assert_eq!(rec["sha256"], sha256_hex(prog), "{rec}");
    // A later release without one keeps it, and its record.
    let p = d.pack("1.2.0", &v1_files(), &full_manifest("1.2.0"));
    let run = d.deliver("1.2.0", p);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let kept = d.root().join("v1.2.0/bin/tope-ota");
    assert_eq!(std::fs::read(&kept).unwrap(), prog);
    assert_eq!(record("1.2.0"), rec);
    // It is recorded like any file: a changed updater is reported.
    std::fs::remove_file(&kept).unwrap();
    std::fs::write(&kept, b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o755)).unwrap();
    let v = d.env.run(&["verify"]);
    assert_eq!(v.code, 1, "{}", v.stdout);
    assert!(v.stdout.contains("bin/tope-ota: "), "{}", v.stdout);
}

#[test]
fn an_updater_this_device_cannot_run_is_refused_before_anything_stops() {
    let mut d = Device::with_v1();
    let m = with_updater("1.1.0", updater_module());
    let cases: [(&'static str, &'static [u8], u32, &str, &str); 6] = [
        (
            "tope-ota",
            b"#!/bin/sh\nexit 0\n",
            0o755,
            "PACKAGE_INVALID",
            "not an ELF file",
        ),
        (
            "tope-ota",
            foreign_program(),
            0o755,
            "PACKAGE_INVALID",
            "built for",
        ),
        (
            "tope-ota",
            native_program(),
            0o644,
            "PACKAGE_INVALID",
            "not executable by its owner",
        ),
        (
            "tope-ota",
            shared_library(),
            0o755,
            "PACKAGE_INVALID",
            "a shared library",
        ),
        (
            "tope-ota/inner",
            native_program(),
            0o755,
            "PACKAGE_INVALID",
            "not a regular file",
        ),
        (
            "tope-ota",
            &native_program()[..40],
            0o755,
            "PACKAGE_INVALID",
            "truncated ELF header",
        ),
    ];
    for (path, bytes, mode, code, why) in cases {
        let mut files = v1_files();
        files.push((path, bytes, mode));
        assert_refused(&mut d, "1.1.0", &files, &m, code, why);
    }
    // The updater's path as a data path.
    let mut ok = v1_files();
    ok.push(("tope-ota", native_program(), 0o755));
    let mut data = m.clone();
    data["mutable"] = json!(["bin"]);
    assert_refused(
        &mut d,
        "1.1.0",
        &ok,
        &data,
        "MANIFEST_INVALID",
        "holds the updater's path",
    );
}

/// A shared library of this machine (no interpreter): not a program.
fn shared_library() -> &'static [u8] {
    let path = ["/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu"]
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libz.so."))
        })
        .expect("libz in /lib");
    leak(std::fs::read(path).unwrap())
}

#[test]
fn only_the_updater_module_places_bin_tope_ota() {
    let mut d = Device::with_v1();
    // A directory module whose tree holds bin/tope-ota, without the flag.
    let mut files = v1_files();
    files.push(("bin/tope-ota", native_program(), 0o755));
    let tree = json!({"version": "1.1.0", "modules": [
        {"name": "bin", "src": "bin", "dst": "bin", "process_name": "device-api"},
        {"name": "share", "src": "share", "dst": "share"},
        {"name": "lib", "src": "lib", "dst": "lib"}
    ]});
    let why = "without \"updater\": true";
    assert_refused(&mut d, "1.1.0", &files, &tree, "MANIFEST_INVALID", why);
    // A symlink in the package that makes bin a door to another module's file.
    let mut linked = v1_files();
    linked.push(("x/tope-ota", native_program(), 0o755));
    let door = json!({"version": "1.1.0", "modules": [
        {"name": "x", "src": "x", "dst": "x"},
        {"name": "door", "src": "door", "dst": "bin"}
    ]});
    d.sc.clear();
    let p = d.pack_with_links("1.1.0", &linked, &door, &[("door", "x")]);
    let run = d.deliver("1.1.0", p);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("error: MANIFEST_INVALID: "),
        "{}",
        run.stderr
    );
    assert_eq!(d.link("current").as_deref(), Some("v1.0.0"));
    // The updater's path named by a module without the flag, the flag on another path, a dst
    // inside the updater's path.
    let mut plain = v1_files();
    plain.push(("tope-ota", native_program(), 0o755));
    for (module, why) in [
        (
            json!({"name": "u", "src": "tope-ota", "dst": "bin/tope-ota"}),
            "must say \"updater\": true",
        ),
        (
            json!({"name": "u", "src": "tope-ota", "dst": "bin/ota", "updater": true}),
            "an updater's dst must be",
        ),
        (
            json!({"name": "u", "src": "tope-ota", "dst": "bin/tope-ota/x"}),
            "a directory",
        ),
    ] {
        let m = with_updater("1.1.0", module);
        assert_refused(&mut d, "1.1.0", &plain, &m, "MANIFEST_INVALID", why);
    }
}
