//! A package that carries the updater (issue #23, item 1): the module that says
//! `"updater": true` lands at `bin/tope-ota` in the snapshot like any file, once it is checked to
//! be a program this device runs; anything else is refused before the device changes.

use crate::install::*;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;

fn leak(bytes: Vec<u8>) -> &'static [u8] {
    Box::leak(bytes.into_boxed_slice())
}

/// A small program of this machine's own target, standing in for a tope-ota build.
fn native_program() -> &'static [u8] {
    leak(std::fs::read("/bin/true").unwrap())
}

/// An ELF header of the other 64-bit board (arm64 here, amd64 on an ARM build).
fn foreign_program() -> &'static [u8] {
    let own = std::fs::read("/proc/self/exe").unwrap();
    let machine = u16::from_le_bytes([own[18], own[19]]);
    let other: u16 = if machine == 183 { 62 } else { 183 };
    let mut h = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x02\0".to_vec();
    h.extend(other.to_le_bytes());
    h.extend([0u8; 44]);
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
    let prog = native_program();
    let mut files = v1_files();
    files.push(("tope-ota", prog, 0o755));
    let p = d.pack("1.1.0", &files, &with_updater("1.1.0", updater_module()));
    let run = d.deliver("1.1.0", p);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let dst = d.root().join("v1.1.0/bin/tope-ota");
    assert_eq!(std::fs::read(&dst).unwrap(), prog);
    assert_eq!(
        std::fs::metadata(&dst).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let v = d.env.run(&["verify"]);
    assert!(
        v.stdout.contains("v1.1.0 (current): intact"),
        "{}",
        v.stdout
    );
    // The updater is not a service: nothing of it is started or stopped.
    assert!(
        !d.sc.calls().iter().any(|c| c.contains("tope-ota")),
        "{:?}",
        d.sc.calls()
    );
}

#[test]
fn an_updater_this_device_cannot_run_is_refused_before_anything_stops() {
    let mut d = Device::with_v1();
    let mut script = v1_files();
    script.push(("tope-ota", b"#!/bin/sh\nexit 0\n", 0o755));
    let m = with_updater("1.1.0", updater_module());
    assert_refused(
        &mut d,
        "1.1.0",
        &script,
        &m,
        "PACKAGE_INVALID",
        "is not an ELF program",
    );
    let mut foreign = v1_files();
    foreign.push(("tope-ota", foreign_program(), 0o755));
    assert_refused(
        &mut d,
        "1.1.0",
        &foreign,
        &m,
        "PACKAGE_INVALID",
        "is built for",
    );
    let mut not_exec = v1_files();
    not_exec.push(("tope-ota", native_program(), 0o644));
    assert_refused(
        &mut d,
        "1.1.0",
        &not_exec,
        &m,
        "PACKAGE_INVALID",
        "is not executable",
    );
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
    assert_refused(
        &mut d,
        "1.1.0",
        &files,
        &tree,
        "MANIFEST_INVALID",
        "without \"updater\": true",
    );
    // The updater's path named by a module without the flag, or the flag on another path.
    let mut plain = v1_files();
    plain.push(("tope-ota", native_program(), 0o755));
    let unflagged = with_updater(
        "1.1.0",
        json!({"name": "u", "src": "tope-ota", "dst": "bin/tope-ota"}),
    );
    assert_refused(
        &mut d,
        "1.1.0",
        &plain,
        &unflagged,
        "MANIFEST_INVALID",
        "must say \"updater\": true",
    );
    let elsewhere = with_updater(
        "1.1.0",
        json!({"name": "u", "src": "tope-ota", "dst": "bin/ota", "updater": true}),
    );
    assert_refused(
        &mut d,
        "1.1.0",
        &plain,
        &elsewhere,
        "MANIFEST_INVALID",
        "an updater's dst must be",
    );
}
