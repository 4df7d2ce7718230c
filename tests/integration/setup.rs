//! A fresh machine: `tests/setup.sh` installs every tool the tests call, the README's test
//! command and `.ci/run` run it, and it is quiet and idempotent when everything is there.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The tools tests/setup.sh installs, and their Debian packages.
const TOOLS: [(&str, &str); 24] = [
    ("minisign", "minisign"),
    ("strace", "strace"),
    ("shellcheck", "shellcheck"),
    ("unzip", "unzip"),
    ("nginx", "nginx-light"),
    ("zip", "zip"),
    ("man", "man-db"),
    ("systemd-analyze", "systemd"),
    ("script", "bsdutils"),
    ("mmdebstrap", "mmdebstrap"),
    ("mkfs.ext4", "e2fsprogs"),
    ("debugfs", "e2fsprogs"),
    ("socat", "socat"),
    ("qemu-img", "qemu-utils"),
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("qemu-system-aarch64", "qemu-system-arm"),
    ("qemu-aarch64-static", "qemu-user-static"),
    ("arch-test", "arch-test"),
    ("cpio", "cpio"),
    ("xz", "xz-utils"),
    ("zstd", "zstd"),
    ("modprobe", "kmod"),
    ("python3", "python3"),
    ("strip", "binutils"),
];

/// Programs `tests/setup-cross.sh` installs, which the armhf checks run themselves
/// (`support::armhf_bin`), and their Debian packages.
const CROSS: [(&str, &str); 2] = [
    ("cargo", "cargo-web"),
    ("qemu-arm-static", "qemu-user-static"),
];

/// Programs the tests may call without tests/setup.sh: in every Debian base system
/// (coreutils, util-linux's mount, dash, bash), or only in the ignored benchmarks (curl).
const ESSENTIAL: [&str; 11] = [
    "sh", "bash", "cp", "mount", "umount", "md5sum", "dd", "sync", "curl", "chmod", "dpkg-deb",
];

fn write_exe(path: &Path, body: &str) {
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A PATH with only `id`, `env`, a fake `apt-get` that logs its calls, and `present` stubs.
fn fake_path(dir: &Path, present: &[&str]) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for real in ["id", "env"] {
        let from = ["/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(real))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{real} not found"));
        std::os::unix::fs::symlink(from, bin.join(real)).unwrap();
    }
    let log = dir.join("apt.log");
    write_exe(
        &bin.join("apt-get"),
        &format!(
            "#!/bin/sh\necho \"DEBIAN_FRONTEND=$DEBIAN_FRONTEND $*\" >> {}\n",
            log.display()
        ),
    );
    for tool in present {
        write_exe(&bin.join(tool), "#!/bin/sh\nexit 0\n");
    }
    bin
}

fn run_setup(path: &Path) -> (i32, String, String) {
    let out = Command::new("/bin/bash")
        .arg(repo().join("tests/setup.sh"))
        .env_clear()
        .env("PATH", path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn setup_installs_exactly_the_missing_tools_and_is_quiet_otherwise() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the suite runs as root (tmpfs mounts)"
    );
    // Everything there: no apt-get call, no output.
    let all = tempfile::tempdir().unwrap();
    // `cargo` answers `cargo deb --version`: cargo-deb is there too.
    let mut names: Vec<&str> = TOOLS.iter().map(|t| t.0).collect();
    names.push("cargo");
    let bin = fake_path(all.path(), &names);
    let (code, out, err) = run_setup(&bin);
    assert_eq!((code, out.as_str(), err.as_str()), (0, "", ""));
    assert!(!all.path().join("apt.log").exists(), "apt-get was called");

    // Some missing: one update, then one install of exactly their packages, noninteractive.
    let some = tempfile::tempdir().unwrap();
    // (QEMU present: its backports source is not this test's business.)
    let bin = fake_path(
        some.path(),
        &[
            "strace",
            "unzip",
            "script",
            "cargo",
            "mkfs.ext4",
            "debugfs",
            "qemu-img",
            "qemu-system-x86_64",
            "qemu-system-aarch64",
            "qemu-aarch64-static",
        ],
    );
    let (code, out, err) = run_setup(&bin);
    assert_eq!(code, 0, "{out}{err}");
    let log = std::fs::read_to_string(some.path().join("apt.log")).unwrap();
    let calls: Vec<&str> = log.lines().collect();
    assert_eq!(calls.len(), 2, "{log}");
    assert!(calls[0].ends_with(" update -qq"), "{log}");
    assert!(
        calls[1].starts_with("DEBIAN_FRONTEND=noninteractive install "),
        "{log}"
    );
    let installed: BTreeSet<&str> = calls[1]
        .split_whitespace()
        .filter(|w| !w.starts_with('-') && !w.contains('=') && *w != "install")
        .collect();
    let want: BTreeSet<&str> = [
        "minisign",
        "shellcheck",
        "man-db",
        "systemd",
        "mmdebstrap",
        "socat",
        "python3",
        "nginx-light",
        "zip",
        "arch-test",
        "cpio",
        "xz-utils",
        "zstd",
        "kmod",
        "binutils",
    ]
    .into();
    assert_eq!(installed, want, "{log}");
}

#[test]
fn setup_covers_every_tool_the_tests_call_and_the_commands_run_it() {
    let script = std::fs::read_to_string(repo().join("tests/setup.sh")).unwrap();
    for (tool, package) in TOOLS {
        assert!(
            script.contains(&format!(
                "command -v {tool} >/dev/null 2>&1 || need+=({package})"
            )),
            "tests/setup.sh does not install {tool} ({package})"
        );
    }
    let cross = std::fs::read_to_string(repo().join("tests/setup-cross.sh")).unwrap();
    for (tool, package) in CROSS {
        assert!(
            cross.contains(package),
            "tests/setup-cross.sh does not install {tool} ({package})"
        );
    }
    // Every program a test runs by name is installed by tests/setup.sh, tests/setup-cross.sh,
    // or essential.
    let mut called = BTreeSet::new();
    let files = ["tests/integration", "tests/vm"]
        .iter()
        .flat_map(|d| std::fs::read_dir(repo().join(d)).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"));
    for file in files {
        let text = std::fs::read_to_string(file).unwrap();
        for part in text.split("Command::new(\"").skip(1) {
            let prog = part.split('"').next().unwrap();
            // By base name: "/bin/bash" is bash.
            called.insert(prog.rsplit('/').next().unwrap().to_string());
        }
    }
    for prog in &called {
        assert!(
            TOOLS.iter().chain(&CROSS).any(|t| t.0 == prog) || ESSENTIAL.contains(&prog.as_str()),
            "a test calls {prog}, which tests/setup.sh does not install"
        );
    }
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    assert!(
        readme.contains("\nbash tests/setup.sh && cargo test --locked --features failpoints "),
        "the README's test command runs tests/setup.sh first"
    );
    let ci = std::fs::read_to_string(repo().join(".ci/run")).unwrap();
    let lines: Vec<&str> = ci
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(lines.contains(&"bash tests/setup.sh"), "{ci}");
    assert_eq!(
        lines.last(),
        Some(&"cargo test --locked --features failpoints"),
        "{ci}"
    );
    assert!(
        !ci.contains("apt-get"),
        ".ci/run installs through tests/setup.sh only"
    );
}
