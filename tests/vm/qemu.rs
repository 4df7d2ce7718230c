//! The box's machinery: the cached images, the pristine booted device, and one running QEMU
//! with its monitor (QMP) and guest agent (QGA).

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Bump when what the pristine device is made of changes in this file.
const PRISTINE_RECIPE: &str = "pristine-3";
const MEMORY_MIB: &str = "512";
/// The guest's name for the host's package server (see customize.sh's /etc/hosts).
pub const PACKAGES_ADDR: &str = "10.0.2.100:80";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn vm_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vm")
}

pub fn cache_root() -> PathBuf {
    if let Some(d) = std::env::var_os("TOPE_OTA_BOX_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache/tope-ota-box")
}

/// Fail loudly, with the reason, when the box cannot run: never a silent skip.
fn need(tool: &str, why: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "the box cannot run: `{tool}` is missing ({why}); `bash tests/setup.sh` installs it"
    );
}

// ---------------------------------------------------------------- architecture

/// The device's processor. amd64 is the x86 board; arm64 and armhf are the printers' ARM boards,
/// emulated by TCG (`-M virt`) with Debian's own kernel for the architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Amd64,
    Arm64,
    Armhf,
}

impl Arch {
    /// Debian's name, as image.sh, build-debs.sh and dpkg take it.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
            Arch::Armhf => "armhf",
        }
    }

    fn qemu(self) -> &'static str {
        match self {
            Arch::Amd64 => "qemu-system-x86_64",
            Arch::Arm64 => "qemu-system-aarch64",
            Arch::Armhf => "qemu-system-arm",
        }
    }

    fn qemu_package(self) -> &'static str {
        match self {
            Arch::Amd64 => "package qemu-system-x86 from bookworm-backports",
            Arch::Arm64 | Arch::Armhf => "package qemu-system-arm from bookworm-backports",
        }
    }

    fn console(self) -> &'static str {
        match self {
            Arch::Amd64 => "ttyS0",
            // -M virt's PL011
            Arch::Arm64 | Arch::Armhf => "ttyAMA0",
        }
    }

    /// How many times longer than amd64's an operation takes in this guest under TCG (the
    /// power cuts' windows stretch by it, so cuts land inside the operation, not after it).
    /// Measured on 2 cores: an arm64 install or rollback takes about twice amd64's, armhf's
    /// boot about 2.5 times (a power cut's whole cycle: 60 s on arm64, 30-50 s on amd64).
    pub fn slowness(self) -> u64 {
        match self {
            Arch::Amd64 => 1,
            Arch::Arm64 => 2,
            Arch::Armhf => 3,
        }
    }
}

pub struct Accel {
    pub name: &'static str,
    args: Vec<&'static str>,
}

/// KVM only for the host's own architecture and where it is real hardware virtualisation:
/// under `kvm_pvm` (a nested software hypervisor) a stock kernel runs far slower than TCG
/// (VM-NOTES.md). The ARM boards are always TCG on this x86 machine.
pub fn accel(arch: Arch) -> Accel {
    match arch {
        Arch::Amd64 => {}
        // A Cortex-A72, the core of the common printer boards (a Raspberry Pi 4's); `max`
        // would add pointer authentication, which TCG emulates slowly.
        Arch::Arm64 => {
            return Accel {
                name: "tcg",
                args: vec!["-machine", "virt,accel=tcg", "-cpu", "cortex-a72"],
            }
        }
        Arch::Armhf => {
            return Accel {
                name: "tcg",
                args: vec!["-machine", "virt,accel=tcg", "-cpu", "cortex-a15"],
            }
        }
    }
    let forced = std::env::var("TOPE_OTA_BOX_ACCEL").ok();
    let kvm_usable = Path::new("/dev/kvm").exists()
        && !Path::new("/sys/module/kvm_pvm").exists()
        && fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
    let kvm = match forced.as_deref() {
        Some("kvm") => true,
        Some("tcg") => false,
        _ => kvm_usable,
    };
    if kvm {
        Accel {
            name: "kvm",
            args: vec![
                "-machine",
                "q35,accel=kvm",
                "-cpu",
                "host,-arch-capabilities",
                "-vga",
                "none",
            ],
        }
    } else {
        Accel {
            name: "tcg",
            args: vec!["-machine", "q35,accel=tcg", "-cpu", "max", "-vga", "none"],
        }
    }
}

// ---------------------------------------------------------------- artifacts

/// What every box starts from: the base image, the .deb, and the pristine device (a disk layer
/// and the RAM of it booted, saved together).
pub struct Artifacts {
    pub arch: Arch,
    pub accel: Accel,
    pub base: PathBuf,
    pub pristine: PathBuf,
    pub boot_secs: f64,
}

static ARTIFACTS: [OnceLock<Artifacts>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];

pub fn artifacts(arch: Arch) -> &'static Artifacts {
    ARTIFACTS[arch as usize].get_or_init(|| {
        need(arch.qemu(), arch.qemu_package());
        need("qemu-img", "package qemu-utils");
        need("mmdebstrap", "package mmdebstrap");
        need("mkfs.ext4", "package e2fsprogs");
        need(
            "socat",
            "package socat: the guest's one path to the package server",
        );
        let accel = accel(arch);
        eprintln!(
            "box: {} board, accelerator {} ({})",
            arch.name(),
            accel.name,
            if arch != Arch::Amd64 {
                "an emulated ARM board"
            } else if accel.name == "tcg" {
                "no usable hardware KVM here"
            } else {
                "hardware KVM"
            }
        );
        let cache = cache_root();
        fs::create_dir_all(&cache).unwrap();
        let lock = fs::File::create(cache.join("lock")).unwrap();
        fs2::FileExt::lock_exclusive(&lock).unwrap();
        let base = base_image(&cache, arch, Stage::of(arch));
        let features = std::env::var("TOPE_OTA_BOX_FEATURES").ok();
        let deb = build_deb(arch, features.as_deref().filter(|f| !f.is_empty()));
        let (pristine, boot_secs) = pristine_device(&cache, &base, &deb, arch, &accel);
        Artifacts {
            arch,
            accel,
            base,
            pristine,
            boot_secs,
        }
    })
}

/// Where a foreign image's packages are configured: on the host under qemu-user (binfmt_misc),
/// or inside the guest itself (image.sh's way where the host has no binfmt_misc).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Stage {
    Host,
    Guest,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Host => "host",
            Stage::Guest => "guest",
        }
    }

    /// How this machine makes the board's image: `TOPE_OTA_IMAGE_STAGE` (host or guest), else
    /// as image.sh's probe finds it (host where qemu-user runs the board's binaries). Decided
    /// here so the image is cached under the way it was made.
    pub fn of(arch: Arch) -> Stage {
        let chosen = std::env::var("TOPE_OTA_IMAGE_STAGE").unwrap_or_default();
        let found = match chosen.as_str() {
            "host" | "guest" => chosen,
            "" | "auto" => {
                let o = Command::new("bash")
                    .arg(vm_dir().join("image.sh"))
                    .args(["--probe", arch.name()])
                    .output()
                    .unwrap();
                assert!(
                    o.status.success(),
                    "tests/vm/image.sh --probe {}: {}",
                    arch.name(),
                    String::from_utf8_lossy(&o.stderr)
                );
                String::from_utf8_lossy(&o.stdout).trim().to_string()
            }
            other => panic!("TOPE_OTA_IMAGE_STAGE is auto, host or guest, not {other:?}"),
        };
        match found.as_str() {
            "guest" => {
                eprintln!(
                    "box: the {} image is configured inside the guest here (no qemu-user)",
                    arch.name()
                );
                Stage::Guest
            }
            _ => Stage::Host,
        }
    }
}

/// The Debian image, built by image.sh and cached outside the clone, keyed by its inputs.
fn base_image(cache: &Path, arch: Arch, stage: Stage) -> PathBuf {
    let mut h = Sha256::new();
    h.update(arch.name());
    let dir = vm_dir();
    let mut inputs = vec![
        dir.join("image.sh"),
        dir.join("setup-hook.sh"),
        dir.join("customize.sh"),
    ];
    if stage == Stage::Guest {
        h.update(stage.name());
        inputs.push(dir.join("second-stage.sh"));
        inputs.push(dir.join("guest-stage.sh"));
    }
    let mut device: Vec<PathBuf> = fs::read_dir(dir.join("device"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    device.sort();
    inputs.extend(device);
    for p in &inputs {
        h.update(p.file_name().unwrap().as_encoded_bytes());
        h.update(fs::read(p).unwrap());
    }
    let key = hex(&h.finalize()[..8]);
    let prefix = match stage {
        Stage::Host => "base",
        Stage::Guest => "base-guest-stage",
    };
    let out = cache.join(format!("{prefix}-{}-{key}", arch.name()));
    if out.join("base.img").exists() {
        return out;
    }
    let t = Instant::now();
    eprintln!(
        "box: building the {} base image (mmdebstrap, configured on the {}) into {}",
        arch.name(),
        stage.name(),
        out.display()
    );
    // Bounded: a maintainer script hung under qemu-user would hang the whole test command.
    // Its own process group, so a timeout ends mmdebstrap and its children too (image.sh's
    // trap then unmounts and removes the half-built root).
    let bound = Duration::from_secs(match stage {
        Stage::Host => 3600,
        // The download and extraction, then up to 3000 s of QEMU configuring it.
        Stage::Guest => 5400,
    });
    let mut child = Command::new("bash")
        .arg(dir.join("image.sh"))
        .arg(&out)
        .arg(arch.name())
        .env("TOPE_OTA_IMAGE_STAGE", stage.name())
        .process_group(0)
        .spawn()
        .unwrap();
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > bound {
            // SAFETY: the group of the child just started, which has not been reaped.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGTERM) };
            let _ = child.wait();
            panic!(
                "tests/vm/image.sh {} did not finish within {bound:?}",
                arch.name()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(st.success(), "tests/vm/image.sh failed: {st}");
    eprintln!("box: base image built in {:.0?}", t.elapsed());
    out
}

/// The real .deb, by `cargo deb` (a release build of this tree); an ARM board's by
/// `deploy/build-debs.sh`, the same cross build a release uses.
fn build_deb(arch: Arch, features: Option<&str>) -> PathBuf {
    need(
        "cargo-deb",
        "cargo install cargo-deb --locked (tests/setup.sh does it)",
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if arch != Arch::Amd64 {
        let mut cmd = Command::new("bash");
        cmd.arg(root.join("deploy/build-debs.sh"));
        if let Some(f) = features {
            cmd.args(["--features", f])
                .env("CARGO_TARGET_DIR", root.join("target/box-features"));
        }
        cmd.arg(arch.name());
        let t = Instant::now();
        let o = cmd.output().unwrap();
        assert!(
            o.status.success(),
            "deploy/build-debs.sh {} failed:\n{}",
            arch.name(),
            String::from_utf8_lossy(&o.stderr)
        );
        let out = String::from_utf8_lossy(&o.stdout);
        let deb = out
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{}: ", arch.name())))
            .and_then(|l| l.split(" (").next())
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("build-debs.sh printed no .deb: {out}"));
        eprintln!("box: {} built in {:.0?}", deb.display(), t.elapsed());
        return deb;
    }
    // A features build's .deb apart from the device's, which the pristine device is made of.
    let out = root.join(if features.is_some() {
        "target/box-features/deb"
    } else {
        "target/box"
    });
    fs::create_dir_all(&out).unwrap();
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(root)
        .args(["deb", "--locked", "--output"])
        .arg(&out);
    if let Some(f) = features {
        // A separate target dir, so the device build in target/release stays as it is.
        cmd.args(["--features", f])
            .env("CARGO_TARGET_DIR", root.join("target/box-features"));
    }
    let t = Instant::now();
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "cargo deb failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let deb = String::from_utf8_lossy(&o.stdout)
        .lines()
        .rfind(|l| l.ends_with(".deb"))
        .map(|l| PathBuf::from(l.trim()))
        .expect("cargo deb printed no .deb path");
    eprintln!("box: {} built in {:.0?}", deb.display(), t.elapsed());
    deb
}

/// The board's tope-ota built with the fail points (`TOPE_OTA_UPDATER_FAULT`), as a release
/// carries it for its updater: the `/usr/bin/tope-ota` of that build's .deb, of this crate's
/// version (the box restamps it, see `support::restamp`).
pub fn updater_binary(arch: Arch) -> &'static [u8] {
    static BUILT: [OnceLock<Vec<u8>>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    BUILT[arch as usize].get_or_init(|| {
        let deb = build_deb(arch, Some("failpoints"));
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "dpkg-deb -x {}", deb.display());
        fs::read(dir.path().join("usr/bin/tope-ota")).unwrap()
    })
}

/// The device's .deb of `arch` made a newer one, as a later release of tope-ota would be: its
/// binary restamped to `version`, its control file's Version and md5sums to match.
pub fn newer_deb(arch: Arch, version: &str, out: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let deb = build_deb(
        arch,
        std::env::var("TOPE_OTA_BOX_FEATURES")
            .ok()
            .as_deref()
            .filter(|f| !f.is_empty()),
    );
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    let run = |cmd: &mut Command| {
        let o = cmd.output().unwrap();
        assert!(
            o.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    run(Command::new("dpkg-deb").arg("-R").arg(&deb).arg(&tree));
    let bin = tree.join("usr/bin/tope-ota");
    let mut bytes = fs::read(&bin).unwrap();
    crate::support::restamp(&mut bytes, version);
    fs::write(&bin, &bytes).unwrap();
    let control = tree.join("DEBIAN/control");
    let text = fs::read_to_string(&control).unwrap();
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("Version: ") {
                format!("Version: {version}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    fs::write(&control, text).unwrap();
    let sums = tree.join("DEBIAN/md5sums");
    if let Ok(text) = fs::read_to_string(&sums) {
        let md5 = crate::support::md5_hex(&bytes);
        let text: String = text
            .lines()
            .map(|l| {
                if l.ends_with(" usr/bin/tope-ota") {
                    format!("{md5}  usr/bin/tope-ota\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        fs::write(&sums, text).unwrap();
    }
    let _ = root;
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-b"])
        .arg(&tree)
        .arg(out));
}

fn qemu_version(arch: Arch) -> String {
    let o = Command::new(arch.qemu()).arg("--version").output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

/// The pristine device: the base image booted once, tope-ota's .deb installed with dpkg -i,
/// factory made; then the running machine (RAM and devices) saved beside its disk layer, so
/// every scenario resumes a booted device in about a second. Cached by image, .deb, QEMU and
/// accelerator: the saved RAM belongs with exactly this disk chain.
fn pristine_device(
    cache: &Path,
    base: &Path,
    deb: &Path,
    arch: Arch,
    accel: &Accel,
) -> (PathBuf, f64) {
    let mut h = Sha256::new();
    h.update(base.file_name().unwrap().as_encoded_bytes());
    h.update(fs::read(deb).unwrap());
    h.update(qemu_version(arch));
    h.update(accel.name);
    h.update(PRISTINE_RECIPE);
    // How QEMU is started and the pristine device made live in this file.
    h.update(include_str!("qemu.rs"));
    let key = hex(&h.finalize()[..8]);
    let out = cache.join(format!("pristine-{}-{key}", arch.name()));
    if out.join("state.bin").exists() {
        let _ = fs::write(out.join("last-used"), b"");
        let boot = fs::read_to_string(out.join("boot-secs"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0.0);
        return (out, boot);
    }
    // Others not used for two hours (a run that uses one touches its `last-used`).
    for e in fs::read_dir(cache).unwrap().flatten() {
        let used = fs::metadata(e.path().join("last-used"))
            .or_else(|_| e.metadata())
            .and_then(|m| m.modified());
        let idle = used.map(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(7200));
        if e.file_name().to_string_lossy().starts_with("pristine-") && idle.unwrap_or(true) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    let tmp = cache.join(format!(".tope-ota-pristine-{key}"));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).unwrap();
    let disk = tmp.join("disk.qcow2");
    qemu_img_overlay(&base.join("base.img"), "raw", &disk);

    let t = Instant::now();
    eprintln!("box: making the {} pristine device", arch.name());
    let mut vm = Vm::start(Launch {
        arch,
        dir: tmp.clone(),
        disk: disk.clone(),
        base: base.to_path_buf(),
        incoming: None,
        shelf_port: 9, // nothing listens: the pristine device downloads nothing
        keep: true,
    });
    let boot = make_device(&mut vm, deb, arch);
    vm.sh_ok("sync", 60);
    vm.save(&tmp.join("state.bin"));
    drop(vm);
    fs::set_permissions(&disk, fs::Permissions::from_mode(0o444)).unwrap();
    fs::write(
        tmp.join("boot-secs"),
        format!("{:.1}\n", boot.as_secs_f64()),
    )
    .unwrap();
    for f in ["qga.sock", "qmp.sock"] {
        let _ = fs::remove_file(tmp.join(f));
    }
    fs::write(tmp.join("last-used"), b"").unwrap();
    fs::rename(&tmp, &out).unwrap();
    eprintln!("box: pristine device ready in {:.0?}", t.elapsed());
    (out, boot.as_secs_f64())
}

/// A cold-booted image made into a device as a printer's image is: the .deb installed with
/// dpkg -i, the heal timer shortened for tests, the factory created, every unit up. The time of
/// the cold boot to the guest agent.
fn make_device(vm: &mut Vm, deb: &Path, arch: Arch) -> Duration {
    let boot = vm.wait_agent(Duration::from_secs(300 * arch.slowness()));
    eprintln!("box: cold boot to the guest agent: {boot:.1?}");
    vm.put("/root/tope-ota.deb", &fs::read(deb).unwrap());
    let t_dpkg = Instant::now();
    vm.sh_ok("dpkg -i /root/tope-ota.deb && rm /root/tope-ota.deb", 300);
    eprintln!("box: dpkg -i: {:.1?}", t_dpkg.elapsed());
    // Tests shorten the timer with a drop-in, as an operator could: heal runs 5 s after boot
    // and every 15 s after that, so every scenario runs with the timer live and firing (a
    // device's day of heals in minutes), and a command that meets a heal must wait for it.
    vm.sh_ok(
        "mkdir -p /etc/systemd/system/tope-ota-heal.timer.d && \
         printf '[Timer]\\nOnBootSec=5s\\nOnUnitActiveSec=15s\\nRandomizedDelaySec=0\\nAccuracySec=1s\\n' \
           > /etc/systemd/system/tope-ota-heal.timer.d/box.conf && \
         systemctl daemon-reload && systemctl restart tope-ota-heal.timer",
        60,
    );
    vm.sh_ok("/usr/share/tope-ota/create-factory.sh", 120);
    vm.wait_units(
        &[
            "device-api",
            "printer-ui",
            "mainboard",
            "tope-ota-serve",
            "tope-ota-heal.timer",
            "box-api-relay",
        ],
        120,
    );
    boot
}

/// The image whose packages were configured inside the guest (image.sh's way where the host
/// has no binfmt_misc) and the board's .deb: built before the box is taken, as [`artifacts`].
pub fn guest_stage_image(arch: Arch) -> (PathBuf, PathBuf) {
    need("xz", "package xz-utils: compressed kernel modules");
    need(arch.qemu(), arch.qemu_package());
    need("qemu-img", "package qemu-utils");
    need("mmdebstrap", "package mmdebstrap");
    need("cpio", "package cpio: the guest stage's initramfs");
    need("modprobe", "package kmod: the guest stage's modules");
    let cache = cache_root();
    fs::create_dir_all(&cache).unwrap();
    let lock = fs::File::create(cache.join("lock")).unwrap();
    fs2::FileExt::lock_exclusive(&lock).unwrap();
    let base = base_image(&cache, arch, Stage::Guest);
    (base, build_deb(arch, None))
}

/// The packages installed in the board's usual image (made as [`artifacts`] makes it), read
/// from its dpkg status without booting it.
pub fn usual_image_packages(arch: Arch) -> std::collections::BTreeSet<String> {
    need("debugfs", "package e2fsprogs");
    let cache = cache_root();
    let base = {
        let lock = fs::File::create(cache.join("lock")).unwrap();
        fs2::FileExt::lock_exclusive(&lock).unwrap();
        base_image(&cache, arch, Stage::of(arch))
    };
    let o = Command::new("debugfs")
        .arg("-R")
        .arg("cat /var/lib/dpkg/status")
        .arg(base.join("base.img"))
        .output()
        .unwrap();
    assert!(o.status.success(), "debugfs of {}", base.display());
    installed_packages(&String::from_utf8_lossy(&o.stdout))
}

/// The names of the installed packages in a dpkg status file.
pub fn installed_packages(status: &str) -> std::collections::BTreeSet<String> {
    status
        .split("\n\n")
        .filter(|p| p.lines().any(|l| l == "Status: install ok installed"))
        .filter_map(|p| p.lines().find_map(|l| l.strip_prefix("Package: ")))
        .map(str::to_string)
        .collect()
}

/// A device made from [`guest_stage_image`] as the pristine device is made, cold-booted from a
/// fresh overlay and left running.
pub fn guest_stage_device(arch: Arch, base: PathBuf, deb: &Path) -> Vm {
    let dir = run_dir();
    let disk = dir.join("run.qcow2");
    qemu_img_overlay(&base.join("base.img"), "raw", &disk);
    let mut vm = Vm::start(Launch {
        arch,
        dir,
        disk,
        base,
        incoming: None,
        shelf_port: 9,
        keep: false,
    });
    let boot = make_device(&mut vm, deb, arch);
    eprintln!("box: the guest-stage image booted to its agent in {boot:.1?} and is a device");
    vm
}

/// A fresh directory for one box run (kept on failure by [`Vm`]'s drop, as its evidence).
pub fn run_dir() -> PathBuf {
    tempfile::Builder::new()
        .prefix("tope-box.")
        .tempdir()
        .unwrap()
        .keep()
}

fn qemu_img_overlay(backing: &Path, fmt: &str, out: &Path) {
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(backing)
        .args(["-F", fmt])
        .arg(out)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img create failed");
}

// ---------------------------------------------------------------- one running QEMU

pub struct Launch {
    pub arch: Arch,
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub base: PathBuf,
    /// Resume this saved machine instead of booting.
    pub incoming: Option<PathBuf>,
    /// Host port the guest's packages.box:80 reaches.
    pub shelf_port: u16,
    /// Keep `dir` when the Vm is dropped.
    pub keep: bool,
}

pub struct Vm {
    launch: Launch,
    child: Option<Child>,
    pub api_port: u16,
    agent: Option<BufReader<UnixStream>>,
    sync_id: u64,
    /// A power cut is on its way (a timer's SIGKILL): QEMU's end is an error of the guest
    /// calls, not a failure of the box.
    cut_armed: bool,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Output of one command in the guest.
#[derive(Debug)]
pub struct Exec {
    pub code: i64,
    pub out: String,
    pub err: String,
}

impl Vm {
    pub fn start(launch: Launch) -> Vm {
        let api_port = free_port();
        let mut vm = Vm {
            launch,
            child: None,
            api_port,
            agent: None,
            sync_id: 0,
            cut_armed: false,
        };
        vm.spawn();
        vm
    }

    fn spawn(&mut self) {
        let l = &self.launch;
        let accel = &accel(l.arch);
        let _ = fs::remove_file(l.dir.join("qga.sock"));
        let _ = fs::remove_file(l.dir.join("qmp.sock"));
        let mut cmd = Command::new(l.arch.qemu());
        cmd.args(&accel.args)
            .args(["-smp", "2", "-m", MEMORY_MIB])
            .args(["-display", "none", "-monitor", "none"])
            .arg("-kernel")
            .arg(l.base.join("vmlinuz"))
            .arg("-initrd")
            .arg(l.base.join("initrd.img"))
            // commit=300: ext4 writes back on its own only every 5 minutes, so a power cut
            // loses whatever tope-ota did not fsync.
            .arg("-append")
            .arg(format!(
                "console={} root=LABEL=vmroot rw rootflags=commit=300 panic=-1",
                l.arch.console()
            ))
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=qcow2,cache=writeback",
                l.disk.display()
            ))
            .arg("-serial")
            .arg(format!("file:{}", l.dir.join("console.log").display()))
            .arg("-chardev")
            .arg(format!(
                "socket,id=qga,path={},server=on,wait=off",
                l.dir.join("qga.sock").display()
            ))
            .args(["-device", "virtio-serial-pci,id=vs"])
            .args([
                "-device",
                "virtserialport,bus=vs.0,chardev=qga,name=org.qemu.guest_agent.0",
            ])
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                l.dir.join("qmp.sock").display()
            ))
            // restrict=on: the guest reaches nothing but the one package server.
            .arg("-netdev")
            .arg(format!(
                "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{}-10.0.2.15:12315,\
                 guestfwd=tcp:{PACKAGES_ADDR}-cmd:socat - TCP:127.0.0.1:{}",
                self.api_port, l.shelf_port
            ))
            .args(["-device", "virtio-net-pci,netdev=n0"]);
        if let Some(state) = &l.incoming {
            cmd.arg("-incoming")
                .arg(format!("exec:cat {}", state.display()));
        }
        let log = fs::File::create(l.dir.join("qemu.log")).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: prctl in the child before exec; QEMU dies with the test thread that made it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        self.child = Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("start {}: {e}", l.arch.qemu())),
        );
        self.agent = None;
    }

    /// QEMU's pid, while it runs: a power cut at an exact instant is a SIGKILL from a timer.
    pub fn qemu_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Power cut: SIGKILL QEMU. The guest's page cache is gone; what it flushed is on disk.
    pub fn power_cut(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.agent = None;
        self.cut_armed = false;
    }

    /// Power back on: a cold boot from the same disk.
    pub fn power_on(&mut self) {
        assert!(self.child.is_none(), "power on a running box");
        self.launch.incoming = None;
        self.spawn();
    }

    fn check_alive(&mut self) -> Result<(), String> {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                if self.cut_armed {
                    return Err(format!("the power was cut ({st})"));
                }
                panic!(
                    "qemu exited ({st}):\n{}\nconsole tail:\n{}",
                    fs::read_to_string(self.launch.dir.join("qemu.log")).unwrap_or_default(),
                    self.console_tail(30)
                );
            }
        }
        Ok(())
    }

    /// A power cut is coming from elsewhere (a timer's SIGKILL of [`Vm::qemu_pid`]); until
    /// [`Vm::power_cut`], the guest's calls fail instead of the box panicking.
    pub fn arm_cut(&mut self) {
        self.cut_armed = true;
    }

    pub fn console_tail(&self, lines: usize) -> String {
        let s = fs::read_to_string(self.launch.dir.join("console.log")).unwrap_or_default();
        let v: Vec<&str> = s.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    // ------------------------------------------------------------ QMP

    fn qmp(&mut self, cmds: &[Value]) -> Vec<Value> {
        let path = self.launch.dir.join("qmp.sock");
        let until = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(&path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < until => {
                    self.check_alive().unwrap_or_else(|e| panic!("qmp: {e}"));
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("qmp connect {}: {e}", path.display()),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let mut w = stream.try_clone().unwrap();
        let mut r = BufReader::new(stream);
        let mut line = String::new();
        r.read_line(&mut line).unwrap(); // greeting
        let mut out = Vec::new();
        for c in std::iter::once(&json!({"execute": "qmp_capabilities"})).chain(cmds) {
            writeln!(w, "{c}").unwrap();
            loop {
                line.clear();
                let n = r.read_line(&mut line).unwrap();
                assert!(n > 0, "qmp closed during {c}");
                let v: Value = serde_json::from_str(&line).unwrap();
                if v.get("event").is_some() {
                    continue;
                }
                if let Some(e) = v.get("error") {
                    panic!("qmp {c}: {e}");
                }
                out.push(v["return"].clone());
                break;
            }
        }
        out.remove(0);
        out
    }

    fn run_state(&mut self) -> String {
        let r = self.qmp(&[json!({"execute": "query-status"})]);
        r[0]["status"].as_str().unwrap_or("").to_string()
    }

    /// Save the running machine (RAM and devices) to `file`; the disk is left as it is now.
    fn save(&mut self, file: &Path) {
        let t = Instant::now();
        self.qmp(&[
            json!({"execute": "stop"}),
            json!({"execute": "migrate", "arguments": {"uri": format!("exec:cat > {}", file.display())}}),
        ]);
        loop {
            let r = self.qmp(&[json!({"execute": "query-migrate"})]);
            match r[0]["status"].as_str() {
                Some("completed") => break,
                Some("failed") | Some("cancelled") => panic!("saving the machine failed: {}", r[0]),
                _ if t.elapsed() > Duration::from_secs(300) => {
                    panic!("saving the machine took over 5 minutes: {}", r[0])
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        self.qmp(&[json!({"execute": "quit"})]);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        eprintln!("box: machine saved in {:.1?}", t.elapsed());
    }

    /// Resume a saved machine: wait for the load, continue, set the stale guest clock.
    pub fn resume(&mut self) -> Duration {
        let t = Instant::now();
        loop {
            match self.run_state().as_str() {
                "inmigrate" => std::thread::sleep(Duration::from_millis(20)),
                "paused" | "postmigrate" | "prelaunch" => break,
                "running" => break,
                other => panic!("unexpected state while resuming: {other}"),
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "resume took over 2 minutes"
            );
        }
        self.qmp(&[json!({"execute": "cont"})]);
        self.wait_agent(Duration::from_secs(60));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        self.sh_ok(
            &format!(
                "date -s @{}.{:09} >/dev/null",
                now.as_secs(),
                now.subsec_nanos()
            ),
            30,
        );
        t.elapsed()
    }

    // ------------------------------------------------------------ guest agent

    fn agent_connect(&mut self, deadline: Instant) -> Result<(), String> {
        let path = self.launch.dir.join("qga.sock");
        loop {
            self.check_alive()?;
            if let Ok(s) = UnixStream::connect(&path) {
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                self.sync_id += 1;
                let id = self.sync_id;
                // 0xFF resets the agent's parser; the delimited reply starts with 0xFF too.
                let _ = w.write_all(&[0xff]);
                let _ = writeln!(
                    w,
                    "{}",
                    json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
                );
                let until = Instant::now() + Duration::from_secs(3);
                let mut buf = Vec::new();
                while Instant::now() < until {
                    buf.clear();
                    match r.read_until(b'\n', &mut buf) {
                        Ok(0) => break,
                        Ok(_) => {
                            let text: Vec<u8> =
                                buf.iter().copied().filter(|&b| b != 0xff).collect();
                            if let Ok(v) = serde_json::from_slice::<Value>(&text) {
                                if v["return"].as_u64() == Some(id) {
                                    r.get_ref()
                                        .set_read_timeout(Some(Duration::from_secs(60)))
                                        .unwrap();
                                    self.agent = Some(r);
                                    return Ok(());
                                }
                            }
                        }
                        Err(_) => break,
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err("the guest agent does not answer".into());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// One agent request; reconnects (after a reboot or resume) until `deadline`. A request
    /// whose answer was lost is sent again only if running it twice is harmless.
    fn agent(&mut self, cmd: Value, deadline: Instant) -> Result<Value, String> {
        let once = matches!(
            cmd["execute"].as_str(),
            Some("guest-exec" | "guest-file-open" | "guest-file-write")
        );
        loop {
            if self.agent.is_none() {
                self.agent_connect(deadline)?;
            }
            let r = self.agent.as_mut().unwrap();
            let left = deadline
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(200), Duration::from_secs(60));
            r.get_ref().set_read_timeout(Some(left)).unwrap();
            if writeln!(r.get_mut(), "{cmd}").is_ok() {
                let mut line = Vec::new();
                if r.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                    let text: Vec<u8> = line.iter().copied().filter(|&b| b != 0xff).collect();
                    match serde_json::from_slice::<Value>(&text) {
                        Ok(v) if v.get("return").is_some() => return Ok(v["return"].clone()),
                        Ok(v) if v.get("error").is_some() => {
                            return Err(format!("agent: {}", v["error"]))
                        }
                        _ => {}
                    }
                }
                if once {
                    self.agent = None;
                    return Err(format!("agent request {cmd}: no answer (it may have run)"));
                }
            }
            self.agent = None;
            if Instant::now() >= deadline {
                return Err(format!("agent request {cmd} got no answer"));
            }
        }
    }

    /// Wait until the guest agent answers; the time it took.
    pub fn wait_agent(&mut self, bound: Duration) -> Duration {
        let t = Instant::now();
        if let Err(e) = self.agent_connect(t + bound) {
            panic!(
                "{e} after {bound:?}; console tail:\n{}",
                self.console_tail(40)
            );
        }
        t.elapsed()
    }

    /// Start `sh -c script` in the guest; its agent pid.
    pub fn spawn_sh(&mut self, script: &str) -> i64 {
        self.try_spawn(script, Instant::now() + Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_spawn(&mut self, script: &str, deadline: Instant) -> Result<i64, String> {
        let r = self.agent(
            json!({"execute": "guest-exec", "arguments": {
                "path": "/bin/sh", "arg": ["-c", script], "capture-output": true}}),
            deadline,
        )?;
        r["pid"]
            .as_i64()
            .ok_or_else(|| format!("guest-exec gave no pid: {r}"))
    }

    /// The result of a started command, if it has ended.
    pub fn poll(&mut self, pid: i64) -> Result<Option<Exec>, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let r = self.agent(
            json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}),
            deadline,
        )?;
        if !r["exited"].as_bool().unwrap_or(false) {
            return Ok(None);
        }
        let text = |k: &str| {
            String::from_utf8_lossy(&b64_decode(r[k].as_str().unwrap_or(""))).into_owned()
        };
        Ok(Some(Exec {
            code: r["exitcode"]
                .as_i64()
                .unwrap_or(-(r["signal"].as_i64().unwrap_or(255))),
            out: text("out-data"),
            err: text("err-data"),
        }))
    }

    /// Run `sh -c script` in the guest, for at most `secs`.
    pub fn sh(&mut self, script: &str, secs: u64) -> Exec {
        self.try_sh(script, secs)
            .unwrap_or_else(|e| panic!("`{script}` in the guest: {e}"))
    }

    /// Like [`Vm::sh`], but an unreachable agent (a reboot under way) is an error, not a panic.
    pub fn try_sh(&mut self, script: &str, secs: u64) -> Result<Exec, String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let pid = self.try_spawn(script, deadline)?;
        loop {
            if let Some(e) = self.poll(pid)? {
                return Ok(e);
            }
            if Instant::now() >= deadline {
                return Err(format!("`{script}` did not finish within {secs} s"));
            }
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    /// Run a script that must succeed; its stdout.
    pub fn sh_ok(&mut self, script: &str, secs: u64) -> String {
        let e = self.sh(script, secs);
        assert_eq!(
            e.code, 0,
            "`{script}` failed in the guest ({}):\n{}{}",
            e.code, e.out, e.err
        );
        e.out
    }

    /// Write a file in the guest through the agent.
    pub fn put(&mut self, path: &str, bytes: &[u8]) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let h = self
            .agent(
                json!({"execute": "guest-file-open", "arguments": {"path": path, "mode": "w"}}),
                deadline,
            )
            .unwrap();
        for chunk in bytes.chunks(1 << 20) {
            self.agent(
                json!({"execute": "guest-file-write", "arguments": {"handle": h, "buf-b64": b64_encode(chunk)}}),
                deadline,
            )
            .unwrap();
        }
        self.agent(
            json!({"execute": "guest-file-close", "arguments": {"handle": h}}),
            deadline,
        )
        .unwrap();
    }

    /// Wait until every unit is active.
    pub fn wait_units(&mut self, units: &[&str], secs: u64) {
        let script = format!("systemctl is-active {}", units.join(" "));
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            let e = self.sh(&script, 30);
            if e.code == 0 {
                return;
            }
            if Instant::now() >= until {
                let status = self.sh("systemctl --no-pager status --lines=5 device-api printer-ui mainboard tope-ota-serve 2>&1 | head -60", 30);
                panic!(
                    "units not active after {secs} s:\n{}\n{}",
                    e.out, status.out
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    pub fn boot_id(&mut self) -> String {
        self.sh_ok("cat /proc/sys/kernel/random/boot_id", 30)
            .trim()
            .to_string()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.power_cut();
        if std::thread::panicking() {
            eprintln!(
                "box: console tail of {}:\n{}",
                self.launch.dir.display(),
                self.console_tail(40)
            );
        }
        // Kept on failure: console.log and qemu.log are the evidence.
        if !self.launch.keep
            && !std::thread::panicking()
            && std::env::var_os("TOPE_OTA_BOX_KEEP").is_none()
        {
            let _ = fs::remove_dir_all(&self.launch.dir);
        }
    }
}

// ---------------------------------------------------------------- base64 for the agent

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64_encode(data: &[u8]) -> String {
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

fn b64_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0);
    for b in s.bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => continue,
        };
        acc = acc << 6 | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[test]
fn base64_round_trips() {
    for n in 0..10 {
        let d: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
        assert_eq!(b64_decode(&b64_encode(&d)), d);
    }
    assert_eq!(b64_encode(b"hello"), "aGVsbG8=");
}
