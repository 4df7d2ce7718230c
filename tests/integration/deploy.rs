//! deploy/: the systemd units pass `systemd-analyze verify`, the scripts pass shellcheck, and
//! install.sh, create-factory.sh and verify-setup.sh do what they say.

use crate::support::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn sh(script: &str, envs: &[(&str, &Path)], args: &[&str]) -> std::process::Output {
    let mut c = Command::new("sh");
    c.arg(repo().join("deploy").join(script)).args(args);
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn install_into(dest: &Path) {
    let out = sh(
        "install.sh",
        &[("DESTDIR", dest), ("BIN", Path::new(BIN))],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
}

/// Every path under `root` with its mode and a digest of its content or link target.
fn listing(root: &Path) -> Vec<String> {
    tree(root)
        .into_iter()
        .map(|(p, (kind, content, mode, _))| format!("{kind} {mode:o} {p} {}", md5_hex(&content)))
        .collect()
}

#[test]
fn install_sh_is_idempotent_and_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("root");
    install_into(&dest);
    let first = listing(&dest);
    install_into(&dest);
    assert_eq!(first, listing(&dest), "a second run changed the tree");
    for p in [
        "usr/bin/tope-ota",
        "usr/share/man/man1/tope-ota.1",
        "usr/share/man/man1/tope-ota-heal.1",
        "usr/share/bash-completion/completions/tope-ota",
        "usr/share/zsh/vendor-completions/_tope-ota",
        "usr/share/fish/vendor_completions.d/tope-ota.fish",
        "usr/lib/systemd/system/tope-ota-heal.service",
        "usr/lib/systemd/system/tope-ota-heal.timer",
        "usr/lib/systemd/system/tope-ota-serve.service",
        "etc/default/tope-ota",
        "etc/tope-ota/keys.d",
        "var/lib/tope-ota",
        "opt/tope/versions",
    ] {
        assert!(dest.join(p).exists(), "{p} missing");
    }
    let mode = std::fs::metadata(dest.join("var/lib/tope-ota"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o700
    );
    // The operator's settings survive a re-install.
    std::fs::write(dest.join("etc/default/tope-ota"), "TOPE_OTA_REPORT_URL=\n").unwrap();
    install_into(&dest);
    assert_eq!(
        std::fs::read_to_string(dest.join("etc/default/tope-ota")).unwrap(),
        "TOPE_OTA_REPORT_URL=\n"
    );
    // PREFIX is followed by the units.
    let dest2 = tmp.path().join("local");
    let out = sh(
        "install.sh",
        &[
            ("DESTDIR", &dest2),
            ("BIN", Path::new(BIN)),
            ("PREFIX", Path::new("/usr/local")),
        ],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    let unit = std::fs::read_to_string(dest2.join("usr/lib/systemd/system/tope-ota-serve.service"))
        .unwrap();
    assert!(
        unit.contains("ExecStart=/usr/local/bin/tope-ota serve"),
        "{unit}"
    );
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("root");
    install_into(&dest);
    // verify checks that ExecStart exists and that Documentation= man pages resolve: point
    // both into the staged tree.
    let units = tmp.path().join("units");
    std::fs::create_dir_all(&units).unwrap();
    let bin = dest.join("usr/bin/tope-ota");
    let mut paths = Vec::new();
    for u in [
        "tope-ota-heal.service",
        "tope-ota-heal.timer",
        "tope-ota-serve.service",
    ] {
        let text = std::fs::read_to_string(dest.join("usr/lib/systemd/system").join(u)).unwrap();
        let p = units.join(u);
        std::fs::write(&p, text.replace("/usr/bin/tope-ota", bin.to_str().unwrap())).unwrap();
        paths.push(p);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .env("MANPATH", dest.join("usr/share/man"))
        .output()
        .expect("systemd-analyze (systemd) is needed: bash tests/setup.sh installs it");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{err}"
    );
    assert!(
        !err.contains("tope-ota"),
        "warnings about our units:\n{err}"
    );
}

#[test]
fn scripts_pass_shellcheck() {
    let scripts = [
        "deploy/install.sh",
        "deploy/create-factory.sh",
        "deploy/verify-setup.sh",
        "deploy/build-debs.sh",
        "tests/setup-cross.sh",
        "tests/vm/image.sh",
        "tests/vm/setup-hook.sh",
        "tests/vm/customize.sh",
        "tests/vm/power-cuts.sh",
        "deploy/debian/postinst",
        "deploy/debian/prerm",
        "tests/demo.sh",
        "tests/setup.sh",
        ".ci/run",
    ];
    let out = Command::new("shellcheck")
        .args(scripts.iter().map(|s| repo().join(s)))
        .output()
        .expect("shellcheck is needed: bash tests/setup.sh installs it");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn create_factory_then_verify_setup() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("root");
    install_into(&dest);
    let versions = dest.join("opt/tope/versions");
    std::fs::create_dir_all(versions.join("v1.0.0/bin")).unwrap();
    std::fs::write(versions.join("v1.0.0/bin/device-api"), b"api").unwrap();
    std::os::unix::fs::symlink("v1.0.0", versions.join("current")).unwrap();
    let (state, units, bin) = (
        dest.join("var/lib/tope-ota"),
        dest.join("usr/lib/systemd/system"),
        dest.join("usr/bin/tope-ota"),
    );
    let env: Vec<(&str, &Path)> = vec![
        ("TOPE_OTA_STATE_DIR", &state),
        ("TOPE_OTA_VERSIONS_DIR", &versions),
        ("UNITDIR", &units),
        ("BIN", &bin),
    ];

    // No factory yet: verify-setup says so.
    let out = sh("verify-setup.sh", &env, &[]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success());
    assert!(text.contains("PROBLEM: no factory symlink"), "{text}");

    // The script runs `tope-ota factory` (under the lock) for the version current runs.
    let fenv: Vec<(&str, &Path)> = vec![("TOPE_OTA_STATE_DIR", &state), ("BIN", &bin)];
    let out = sh(
        "create-factory.sh",
        &fenv,
        &["1.0.0", versions.to_str().unwrap()],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::read_link(versions.join("factory")).unwrap(),
        Path::new("v1.0.0~factory")
    );
    let mode_of = |p: &str| {
        std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(versions.join(p)).unwrap().permissions(),
        )
    };
    assert_eq!(
        mode_of("v1.0.0~factory/bin/device-api") & 0o222,
        0,
        "factory is read-only"
    );
    assert_ne!(
        mode_of("v1.0.0/bin/device-api") & 0o200,
        0,
        "current is untouched"
    );
    // Idempotent for the version current runs, refused for another.
    assert!(sh(
        "create-factory.sh",
        &fenv,
        &["1.0.0", versions.to_str().unwrap()]
    )
    .status
    .success());
    std::fs::create_dir_all(versions.join("v2.0.0")).unwrap();
    let out = sh(
        "create-factory.sh",
        &fenv,
        &["2.0.0", versions.to_str().unwrap()],
    );
    assert!(!out.status.success(), "factory was replaced");
    assert!(!sh(
        "create-factory.sh",
        &fenv,
        &["9.9.9", versions.to_str().unwrap()]
    )
    .status
    .success());

    let out = sh("verify-setup.sh", &env, &[]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("tope-ota setup looks right"), "{text}");

    // A dangling current and a leftover staging dir are reported.
    std::fs::remove_file(versions.join("current")).unwrap();
    std::os::unix::fs::symlink("v7.0.0", versions.join("current")).unwrap();
    std::fs::create_dir(versions.join(".tope-ota-tmp-stage-1-1")).unwrap();
    let out = sh("verify-setup.sh", &env, &[]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success());
    assert!(text.contains("current -> v7.0.0 points nowhere"), "{text}");
    assert!(
        text.contains("leftovers of an interrupted operation"),
        "{text}"
    );
}
