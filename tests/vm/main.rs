//! The device in a box: tope-ota's real .deb on a booted Debian under QEMU, with real systemd,
//! real units of the printer's (stand-in) software, real reboots and real power cuts.
//!
//! Every scenario resumes the pristine device (booted once, saved) on a fresh qcow2 overlay;
//! only reboots and power cuts boot. One box at a time: TCG uses both cores. Each scenario runs
//! on each board it is listed for at the bottom (`amd64::`, `arm64::`, `armhf::`), so
//! `cargo test --test vm arm64::` runs one board.
//! See README "The device in a box".

#[path = "../integration/support.rs"]
mod support;

mod device;
mod qemu;
mod shelf;

use device::{Catalog, Release, FACTORY_VERSION, UNITS};
use qemu::{artifacts, Arch, Launch, Vm};
use serde_json::Value;
use shelf::{Package, Shelf};
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

static ONE_BOX: Mutex<()> = Mutex::new(());

const FACTORY_DIR: &str = "v1.0.0~factory";

/// A running box: the pristine device resumed, and its package server.
struct Box {
    vm: Vm,
    shelf: Shelf,
    catalog: Catalog,
    _one: MutexGuard<'static, ()>,
    /// One box on the machine: another test run waits (TCG takes both cores).
    _machine: std::fs::File,
    started: Instant,
    /// When the pristine device was resumed (Unix seconds, host and guest clock alike).
    resumed_at: u64,
}

impl Drop for Box {
    fn drop(&mut self) {
        let name = std::thread::current().name().unwrap_or("?").to_string();
        let figures = device::lock_figures(&mut self.vm, self.resumed_at)
            .map(|(heals, waits)| {
                format!("; since the resume: {heals} heal runs, {waits} commands waited for a brief holder")
            })
            .unwrap_or_default();
        println!(
            "box: {name}: {:.1} s from resume to the end{figures}",
            self.started.elapsed().as_secs_f64()
        );
    }
}

impl Box {
    fn pristine(arch: Arch) -> Box {
        let one = ONE_BOX.lock().unwrap_or_else(|e| e.into_inner());
        let a = artifacts(arch);
        let machine = std::fs::File::create(qemu::cache_root().join("box.lock")).unwrap();
        fs2::FileExt::lock_exclusive(&machine).unwrap();
        let shelf = Shelf::start();
        let dir = qemu::run_dir();
        let disk = dir.join("run.qcow2");
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-b"])
            .arg(a.pristine.join("disk.qcow2"))
            .args(["-F", "qcow2"])
            .arg(&disk)
            .status()
            .unwrap();
        assert!(st.success());
        let mut vm = Vm::start(Launch {
            arch,
            dir,
            disk,
            base: a.base.clone(),
            incoming: Some(a.pristine.join("state.bin")),
            shelf_port: shelf.port,
            keep: false,
        });
        let t = vm.resume();
        eprintln!("box: pristine device resumed in {t:.1?}");
        Box {
            vm,
            shelf,
            catalog: Catalog::default(),
            _one: one,
            _machine: machine,
            started: Instant::now(),
            resumed_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        }
    }

    fn publish(&mut self, r: &Release) -> Package {
        self.catalog.add(r);
        self.shelf.put(&r.version, r.pack())
    }

    /// Download and install `r` with the CLI, as a technician would; the install's --json.
    fn install(&mut self, r: &Release) -> (i64, Value) {
        let p = self.publish(r);
        self.vm.sh_ok(&p.download_cmd(), 300);
        let e = self.vm.sh("tope-ota --json install", 300);
        let out = serde_json::from_str(&e.out)
            .unwrap_or_else(|_| serde_json::json!({"stdout": e.out, "stderr": e.err}));
        (e.code, out)
    }

    fn assert_runs(&mut self, version: &str) {
        for (u, (active, seen, pid, main)) in device::running(&mut self.vm) {
            assert_eq!(active, "active", "{u}");
            assert_eq!(seen, version, "{u} runs another version");
            assert_eq!(pid, main, "{u}: the report is not from the running process");
        }
    }

    fn assert_intact(&mut self) {
        let had_state = !self.catalog.is_empty();
        let v = device::violations(&mut self.vm, &self.catalog, FACTORY_DIR, had_state);
        assert!(v.is_empty(), "invariants violated:\n{}", v.join("\n"));
    }

    fn wait_stage(&mut self, secs: u64, stages: &[&str]) -> Value {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = device::state(&mut self.vm);
            if stages.contains(&s["stage"].as_str().unwrap_or("")) {
                return s;
            }
            assert!(
                Instant::now() < until,
                "stage not in {stages:?} after {secs} s: {s}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Wait for a new boot, for the heal that its timer starts to have run, and for the
    /// network: what the test downloads next needs the DHCP lease, which a boot slowed by a
    /// second emulator on the cores once had not after a minute (the download's retries ran out:
    /// "Network is unreachable").
    fn wait_boot_and_heal(&mut self, old_boot: &str) -> (Duration, String) {
        let t = Instant::now();
        let boot = loop {
            assert!(
                t.elapsed() < Duration::from_secs(300),
                "no new boot in 300 s"
            );
            if let Ok(id) = self.vm.try_sh("cat /proc/sys/kernel/random/boot_id", 5) {
                let id = id.out.trim().to_string();
                if !id.is_empty() && id != old_boot {
                    break id;
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        let booted = t.elapsed();
        // Heal from the timer: ran once (an exit timestamp) and is not running any more.
        let until = Instant::now() + Duration::from_secs(600);
        loop {
            let e = self.vm.sh(
                "systemctl show -p ExecMainExitTimestampMonotonic --value tope-ota-heal.service; systemctl is-active tope-ota-heal.service",
                30,
            );
            let mut l = e.out.lines();
            let exited = l.next().unwrap_or("0").trim() != "0";
            let state = l.next().unwrap_or("");
            if exited && state != "activating" {
                break;
            }
            assert!(Instant::now() < until, "heal did not run after boot");
            std::thread::sleep(Duration::from_millis(500));
        }
        // A route to the package server (on the user-mode subnet; restrict=on gives no
        // default route), which the lease brings. Now and then (1 boot in 50 on arm64, 1 in 5
        // once on amd64, after a power cut) the guest's networkd holds no lease for minutes:
        // the guest's own trouble, not tope-ota's (whose next heal would retry), so the
        // harness says so, shows networkd's view, and restarts it once.
        let server = qemu::PACKAGES_ADDR.split(':').next().unwrap();
        let has_route = |vm: &mut Vm| vm.sh(&format!("ip -4 route get {server}"), 30).code == 0;
        let t = Instant::now();
        let mut kicked = false;
        while !has_route(&mut self.vm) {
            if !kicked && t.elapsed() > Duration::from_secs(60) {
                let diag = self.vm.sh(
                    "networkctl --no-pager; ip -4 addr; journalctl -b -u systemd-networkd --no-pager | tail -15",
                    60,
                );
                println!(
                    "box: no route to {server} 60 s after boot; the guest's network:\n{}{}\nbox: restarting the guest's systemd-networkd (test equipment, not tope-ota)",
                    diag.out, diag.err
                );
                self.vm.sh("systemctl restart systemd-networkd", 60);
                kicked = true;
            }
            assert!(
                t.elapsed() < Duration::from_secs(300),
                "no route to {server} 300 s after boot"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        (booted, boot)
    }
}

fn curl_json(vm: &mut Vm, args: &str) -> Value {
    let e = vm.sh(&format!("curl -s --max-time 10 {args}"), 30);
    serde_json::from_str(&e.out).unwrap_or(Value::Null)
}

// ---------------------------------------------------------------- scenarios

fn boot_units_are_active_and_serve_is_sandboxed(arch: Arch) {
    let mut b = Box::pristine(arch);
    let out = b.vm.sh_ok(
        "systemctl is-active tope-ota-heal.timer tope-ota-serve.service; systemctl is-enabled tope-ota-heal.timer tope-ota-serve.service",
        30,
    );
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["active", "active", "enabled", "enabled"]
    );
    let sec = b.vm.sh(
        "systemd-analyze security tope-ota-serve.service --no-pager",
        60,
    );
    let overall = sec
        .out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure in:\n{}{}", sec.out, sec.err))
        .trim()
        .to_string();
    println!("box: {overall}");
    let level: f64 = overall
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!(level < 5.0, "serve's sandbox got weaker: {overall}");
    // The power-cut model is in effect: long ext4 commit, writeback held back.
    let model = b.vm.sh_ok(
        "findmnt -no OPTIONS /; sysctl -n vm.dirty_expire_centisecs vm.dirty_writeback_centisecs",
        30,
    );
    assert!(model.contains("commit=300"), "{model}");
    assert_eq!(
        model.lines().skip(1).collect::<Vec<_>>(),
        ["30000", "30000"],
        "{model}"
    );
    b.assert_runs(FACTORY_VERSION);
    b.assert_intact();
}

fn device_api_flow_over_http_restarts_real_units_and_runs_ota_gui_outside_the_sandbox(arch: Arch) {
    let mut b = Box::pristine(arch);
    let r = Release::new("1.1.0");
    let p = b.publish(&r);
    let before = device::running(&mut b.vm);
    // The display setting a GUI needs comes from the units' environment file.
    b.vm.sh_ok(
        "echo DISPLAY=:7 >> /etc/default/tope-ota && systemctl restart tope-ota-serve && \
         { journalctl --rotate --vacuum-files=1 -q 2>/dev/null; rm -f /run/tope-device/ota-gui.json; }",
        60,
    );

    // device-api drives tope-ota over 127.0.0.1:12315, as the real one does.
    let body = p.request().replace('\'', "");
    let resp = curl_json(
        &mut b.vm,
        &format!("-X POST -H 'Content-Type: application/json' --data '{body}' http://127.0.0.1:9080/ota/download"),
    );
    assert_eq!(resp["code"], 200, "{resp}");
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let pr = curl_json(&mut b.vm, "http://127.0.0.1:9080/ota/progress");
        if pr["data"]["stage"] == "toInstall" {
            break;
        }
        assert!(pr["data"]["stage"] != "failed", "{pr}");
        assert!(Instant::now() < until, "download did not finish: {pr}");
        std::thread::sleep(Duration::from_millis(300));
    }
    // The host reaches serve through hostfwd (and the box's relay to loopback).
    let host_view = host_get(b.vm.api_port, "/api/v1.0/progress");
    assert!(host_view.contains("toInstall"), "{host_view}");

    let resp = curl_json(
        &mut b.vm,
        "-X POST -H 'Content-Type: application/json' --data '{\"version\":\"1.1.0\"}' http://127.0.0.1:9080/ota/update",
    );
    assert_eq!(resp["code"], 200, "{resp}");
    let s = b.wait_stage(180, &["success", "failed"]);
    assert_eq!(s["stage"], "success", "{s}");
    b.assert_runs("1.1.0");
    for u in UNITS {
        assert_ne!(
            before[u].3,
            device::running(&mut b.vm)[u].3,
            "{u} was not restarted"
        );
    }
    b.assert_intact();

    // Real systemctl stop in reverse restart_order, start in restart_order.
    let log = b.vm.sh_ok(
        "journalctl --no-pager -o cat _PID=1 | grep -E '^(Stopping|Started) (mainboard|device-api|printer-ui)\\.service' | tail -6",
        30,
    );
    let seen: Vec<String> = log
        .lines()
        .map(|l| l.split(" - ").next().unwrap().to_string())
        .collect();
    assert_eq!(
        seen,
        [
            "Stopping printer-ui.service",
            "Stopping device-api.service",
            "Stopping mainboard.service",
            "Started mainboard.service",
            "Started device-api.service",
            "Started printer-ui.service",
        ],
        "journal:\n{log}"
    );

    // Callbacks reached the real device-api (those while it was stopped are lost, by design).
    let calls = b.vm.sh_ok("cat /var/lib/device-api/callbacks.jsonl", 30);
    let stages: Vec<String> = calls
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| v["data"]["stage"].as_str().unwrap_or("").to_string())
        .collect();
    for want in ["downloading", "toInstall", "installing", "success"] {
        assert!(
            stages.iter().any(|s| s == want),
            "no {want} callback in {stages:?}"
        );
    }

    // ota-gui, started by the install that serve's child ran, runs outside serve's sandbox.
    let gui = b.vm.sh_ok(
        "cat /run/tope-device/ota-gui.json || cat /var/lib/tope-ota/ota-gui.json",
        30,
    );
    let g: Value = serde_json::from_str(&gui).unwrap();
    assert_eq!(g["written_to"], "/run/tope-device/ota-gui.json", "{g}");
    assert_eq!(g["display"], ":7", "{g}");
    assert_eq!(g["no_new_privs"], "0", "{g}");
    assert_eq!(g["seccomp"], "0", "{g}");
    assert_eq!(g["mnt_ns"], g["init_mnt_ns"], "private mounts: {g}");
    assert!(
        !g["cgroup"].as_str().unwrap().contains("tope-ota-serve"),
        "{g}"
    );
    let full_caps = b.vm.sh_ok("grep CapBnd /proc/1/status | cut -f2", 30);
    assert_eq!(g["cap_bnd"].as_str().unwrap(), full_caps.trim(), "{g}");
}

fn host_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn a_service_that_fails_to_start_rolls_back_with_real_systemd(arch: Arch) {
    let mut b = Box::pristine(arch);
    let mut r = Release::new("1.2.0");
    r.broken = true;
    let (code, out) = b.install(&r);
    assert_eq!(code, 1, "{out}");
    assert_eq!(out["error"], "SERVICE_START_FAILED", "{out}");
    let link = b.vm.sh_ok("readlink /opt/tope/versions/current", 30);
    assert_eq!(link.trim(), "v1.0.0");
    b.assert_runs(FACTORY_VERSION);
    b.assert_intact();
}

fn a_reboot_package_reboots_and_heal_at_boot_commits_it(arch: Arch) {
    let mut b = Box::pristine(arch);
    let mut r = Release::new("1.3.0");
    r.reboot = true;
    let p = b.publish(&r);
    b.vm.sh_ok(&p.download_cmd(), 300);
    let boot = b.vm.boot_id();
    b.vm.spawn_sh("tope-ota install >/tmp/install.log 2>&1");
    let (took, _) = b.wait_boot_and_heal(&boot);
    eprintln!("box: install to rebooted: {took:.1?}");
    let s = device::state(&mut b.vm);
    assert_eq!(s["stage"], "success", "{s}");
    assert_eq!(s["version"], "1.3.0");
    b.assert_runs("1.3.0");
    b.assert_intact();
}

fn technician_man_page_completion_and_status(arch: Arch) {
    let mut b = Box::pristine(arch);
    let man =
        b.vm.sh_ok("MANPAGER=cat MANWIDTH=80 man tope-ota 2>&1 | head -20", 60);
    assert!(man.contains("tope-ota"), "{man}");
    assert!(man.to_lowercase().contains("install"), "{man}");
    // The README the package ships links into docs/, shipped beside it; the examples of the
    // subcommand's help point there too.
    let docs = b.vm.sh_ok(
        "cd /usr/share/doc/tope-ota && grep -o 'docs/[a-z-]*\\.md' README.md | sort -u | xargs ls && \
         tope-ota install --help | tail -1",
        30,
    );
    assert!(
        docs.contains("docs/errors.md") && docs.contains("docs/versions.md"),
        "{docs}"
    );
    assert!(docs.contains("More: docs/versions.md#install"), "{docs}");
    let comp = b.vm.sh_ok(
        r#"bash -c '. /usr/share/bash-completion/bash_completion
_completion_loader tope-ota
f=$(complete -p tope-ota | sed -E "s/.* -F ([^ ]+) .*/\1/")
COMP_WORDS=(tope-ota ins); COMP_CWORD=1; COMP_LINE="tope-ota ins"; COMP_POINT=${#COMP_LINE}
"$f" tope-ota ins tope-ota
printf "%s\n" "${COMPREPLY[@]}"'"#,
        60,
    );
    assert_eq!(
        comp.split_whitespace().collect::<Vec<_>>(),
        ["install"],
        "{comp}"
    );
    let status = b.vm.sh_ok("tope-ota status", 30);
    for want in [
        "stage:     idle",
        "current:   1.0.0",
        "factory:   1.0.0 (v1.0.0~factory)",
    ] {
        assert!(status.contains(want), "no {want:?} in:\n{status}");
    }
    let js: Value = serde_json::from_str(&b.vm.sh_ok("tope-ota --json status", 30)).unwrap();
    assert_eq!(js["stage"], "idle", "{js}");
}

/// `systemctl show` of `props` of `unit`, by name (its output follows systemd's order, not ours).
fn unit_props(vm: &mut Vm, unit: &str, props: &[&str]) -> BTreeMap<String, String> {
    let out = vm.sh_ok(
        &format!("systemctl show {unit} -p {}", props.join(" -p ")),
        30,
    );
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// When the heal unit's last run started (monotonic µs; 0 before the first).
fn heal_started_at(vm: &mut Vm) -> u64 {
    unit_props(
        vm,
        "tope-ota-heal.service",
        &["ExecMainStartTimestampMonotonic"],
    )
    .get("ExecMainStartTimestampMonotonic")
    .and_then(|v| v.parse().ok())
    .unwrap_or(0)
}

/// Wait for a heal the timer starts after `after` (monotonic µs) to end, and check it ran under
/// its unit's sandbox and succeeded.
fn assert_timer_heal_succeeds(vm: &mut Vm, arch: Arch, after: u64) {
    let props = [
        "ExecMainStartTimestampMonotonic",
        "ExecMainExitTimestampMonotonic",
        "ExecMainStatus",
        "Result",
    ];
    let mono = |m: &BTreeMap<String, String>, k: &str| -> u64 {
        m.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    let until = Instant::now() + Duration::from_secs(120 * arch.slowness());
    let heal = loop {
        let m = unit_props(vm, "tope-ota-heal.service", &props);
        let started = mono(&m, "ExecMainStartTimestampMonotonic");
        if started > after && mono(&m, "ExecMainExitTimestampMonotonic") > started {
            break m;
        }
        assert!(
            Instant::now() < until,
            "the heal timer fired no heal: {m:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(
        (heal["Result"].as_str(), heal["ExecMainStatus"].as_str()),
        ("success", "0"),
        "heal under its unit: {heal:?}"
    );
}

/// An image whose packages were configured inside the guest (image.sh's way where the host has
/// no binfmt_misc for qemu-user, `TOPE_OTA_IMAGE_STAGE=guest`) is a device like the others: every
/// package configured, no unit failed, the .deb installed by dpkg -i, the printer's units running
/// from `current`, and a heal started by the timer succeeding under its unit.
fn an_image_configured_inside_the_guest_becomes_a_device(arch: Arch) {
    let _one = ONE_BOX.lock().unwrap_or_else(|e| e.into_inner());
    let (base, deb) = qemu::guest_stage_image(arch);
    let usual = qemu::usual_image_packages(arch);
    let machine = std::fs::File::create(qemu::cache_root().join("box.lock")).unwrap();
    fs2::FileExt::lock_exclusive(&machine).unwrap();
    let t = Instant::now();
    let mut vm = qemu::guest_stage_device(arch, base, &deb);
    assert_eq!(
        vm.sh_ok("cat /etc/tope-box-stage", 30).trim(),
        "guest",
        "this image was not made by the guest stage"
    );
    // The same packages as the usual image, but for tope-ota, installed since, and
    // usr-is-merged, which mmdebstrap's merged-/usr hook installs (the usual image has only
    // usrmerge; seen as the one difference on 2026-12-03).
    let status = vm.sh_ok("cat /var/lib/dpkg/status", 60);
    let skip = ["tope-ota", "usr-is-merged"];
    let here: std::collections::BTreeSet<String> = qemu::installed_packages(&status)
        .into_iter()
        .filter(|p| !skip.contains(&p.as_str()))
        .collect();
    let usual: std::collections::BTreeSet<String> = usual
        .into_iter()
        .filter(|p| !skip.contains(&p.as_str()))
        .collect();
    assert_eq!(
        (
            here.difference(&usual).collect::<Vec<_>>(),
            usual.difference(&here).collect::<Vec<_>>()
        ),
        (vec![], vec![]),
        "packages only in the guest-stage image, only in the usual one"
    );
    let audit = vm.sh("dpkg --audit", 120);
    assert!(
        audit.code == 0 && audit.out.trim().is_empty(),
        "packages left unconfigured by the guest stage:\n{}{}",
        audit.out,
        audit.err
    );
    let failed = vm.sh_ok("systemctl --failed --no-legend --plain", 60);
    assert!(failed.trim().is_empty(), "failed units: {failed}");
    let out = vm.sh_ok(
        "readlink /opt/tope/versions/current; dpkg-query -W -f '${Version}\\n' tope-ota",
        60,
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"v1.0.0"), "{out}");
    assert_eq!(
        lines.get(1).copied(),
        Some(env!("CARGO_PKG_VERSION"))
            .map(|v| format!("{v}-1"))
            .as_deref(),
        "{out}"
    );
    assert_timer_heal_succeeds(&mut vm, arch, 0);
    let status = vm.sh_ok("tope-ota status", 60);
    assert!(status.contains("1.0.0"), "{status}");
    println!(
        "box: the guest-stage image became a device in {:.0?}",
        t.elapsed()
    );
}

/// A technician's update and rollback on the device, with the heal timer firing through its
/// unit meanwhile: on armhf the proof that the units' `SystemCallArchitectures=native` and
/// seccomp filter let the 32-bit binary run (a heal started by the timer after the rollback
/// exits 0, serve answers). Then the clock is set past 2038 (a 32-bit `time_t` ends on
/// 2038-01-19) and a download must record the guest's real time. Past 2038 tope-ota is run by
/// its path and nothing else of the system is asked: bookworm's armhf userland has a 32-bit
/// `time_t` (dash's `stat` of a program whose atime is past 2038 fails with EOVERFLOW: "Value too
/// large for defined data type"), which is the system's limit, not tope-ota's.
fn a_technician_installs_and_rolls_back_through_the_units(arch: Arch) {
    let mut b = Box::pristine(arch);
    let r = Release::new("1.1.0");
    let (code, out) = b.install(&r);
    assert_eq!(code, 0, "{out}");
    let s = device::state(&mut b.vm);
    assert_eq!(
        (&s["stage"], &s["version"]),
        (&"success".into(), &"1.1.0".into()),
        "{s}"
    );
    b.assert_runs("1.1.0");
    b.assert_intact();
    let e = b.vm.sh("tope-ota --json rollback", 300);
    assert_eq!(e.code, 0, "{}{}", e.out, e.err);
    let link = b.vm.sh_ok("readlink /opt/tope/versions/current", 30);
    assert_eq!(link.trim(), "v1.0.0");
    b.assert_runs(FACTORY_VERSION);
    b.assert_intact();
    // A heal the timer starts after the rollback runs under the unit's sandbox and succeeds.
    let before = heal_started_at(&mut b.vm);
    assert_timer_heal_succeeds(&mut b.vm, arch, before);
    let body = curl_json(&mut b.vm, "http://127.0.0.1:12315/api/v1.0/progress");
    assert!(
        body["data"]["stage"].is_string(),
        "serve under its unit: {body}"
    );
    let sys = b.vm.sh_ok("uname -m; tope-ota --version", 30);
    println!("box: {}: {}", arch.name(), sys.replace('\n', "; "));

    // 2040-10-31: a download records it, and status reads it back.
    let p = b.publish(&Release::new("1.2.0"));
    let year =
        b.vm.sh_ok("date -s @2235300000 >/dev/null && date -u +%Y", 30);
    assert_eq!(year.trim(), "2040");
    let e = b.vm.sh(&format!("/usr/bin/{}", p.download_cmd()), 300);
    assert_eq!(e.code, 0, "a download in 2040: {}{}", e.out, e.err);
    let stamps = b.vm.sh_ok(
        "grep -o '\"[a-z_]*_at\": *\"[^\"]*\"' /var/lib/tope-ota/state.json",
        30,
    );
    assert!(
        stamps.lines().any(|l| l.starts_with("\"verified_at\""))
            && stamps.lines().all(|l| l.contains("\"2040-10-31T")),
        "state.json's times after 2038: {stamps}"
    );
    let st = b.vm.sh("/usr/bin/tope-ota status", 30);
    assert_eq!(st.code, 0, "status in 2040: {}{}", st.out, st.err);
    for want in ["stage:     toInstall", "verified:  2040-10-31T"] {
        assert!(
            st.out.contains(want),
            "no {want:?} in status in 2040:\n{}",
            st.out
        );
    }
}

// ---------------------------------------------------------------- self-update (issue #23)

/// The first line of `tope-ota --version` in the guest: the version of the updater that runs.
fn running_updater(vm: &mut Vm) -> String {
    let out = vm.sh_ok("tope-ota --version", 60);
    out.lines()
        .next()
        .unwrap_or("")
        .trim_start_matches("tope-ota ")
        .to_string()
}

/// What serve runs now: its main pid and its binary.
fn serve_exe(vm: &mut Vm) -> (String, String) {
    let out = vm.sh_ok(
        "p=$(systemctl show -p MainPID --value tope-ota-serve.service); echo $p; readlink /proc/$p/exe",
        30,
    );
    let mut l = out.lines();
    (
        l.next().unwrap_or("").to_string(),
        l.next().unwrap_or("").to_string(),
    )
}

/// On real systemd, with the real .deb: releases whose updater exits 1, crashes or hangs in its
/// self-test, or crashes in its commit, leave the device on a running version with the .deb
/// binary; the next good release, installed through device-api and serve (so under serve's
/// sandbox), proves its updater, and from then on serve (restarted into it, same pid) and the
/// heal timer run it; `dpkg -i` of a newer .deb wins over it.
fn the_updater_updates_itself_and_a_bad_one_never_strands_the_device(arch: Arch) {
    let mut b = Box::pristine(arch);
    let deb = env!("CARGO_PKG_VERSION");
    assert_eq!(running_updater(&mut b.vm), deb);
    for (version, updater, fault, why) in [
        ("1.1.0", "0.1.1", "self-test:exit", "its self-test exited 1"),
        ("1.2.0", "0.1.2", "self-test:crash", "its self-test crashed"),
        ("1.3.0", "0.1.3", "self-test:hang", "its self-test hung"),
        (
            "1.4.0",
            "0.1.4",
            "commit:crash",
            "it did not finish the install's commit",
        ),
    ] {
        let r = with_updater(Release::new(version), arch, updater);
        let p = b.publish(&r);
        b.vm.sh_ok(&p.download_cmd(), 300);
        let e = b.vm.sh(
            &format!("TOPE_OTA_UPDATER_FAULT={fault} tope-ota --json install"),
            600,
        );
        let out: Value = serde_json::from_str(&e.out).unwrap_or(Value::Null);
        assert_eq!(e.code, 1, "{fault}: {}{}", e.out, e.err);
        assert_eq!(out["error"], "UPDATER_FAILED", "{fault}: {out}");
        assert!(
            out["msg"].as_str().unwrap_or("").contains(why),
            "{fault}: {out}"
        );
        b.assert_runs(FACTORY_VERSION);
        b.assert_intact();
        assert_eq!(running_updater(&mut b.vm), deb, "{fault}");
    }
    let st = b.vm.sh_ok("tope-ota status", 60);
    assert!(st.contains("bad: 0.1.4"), "{st}");

    // The next good release, through device-api and serve.
    let (serve_pid, serve_bin) = serve_exe(&mut b.vm);
    assert_eq!(serve_bin, "/usr/bin/tope-ota");
    let r = with_updater(Release::new("1.5.0"), arch, "0.2.0");
    let sha = support::sha256_hex(&r.updater.as_ref().unwrap().bytes);
    let p = b.publish(&r);
    let body = p.request().replace('\'', "");
    let resp = curl_json(
        &mut b.vm,
        &format!("-X POST -H 'Content-Type: application/json' --data '{body}' http://127.0.0.1:9080/ota/download"),
    );
    assert_eq!(resp["code"], 200, "{resp}");
    b.wait_stage(300, &["toInstall", "failed"]);
    let resp = curl_json(
        &mut b.vm,
        "-X POST -H 'Content-Type: application/json' --data '{\"version\":\"1.5.0\"}' http://127.0.0.1:9080/ota/update",
    );
    assert_eq!(resp["code"], 200, "{resp}");
    let s = b.wait_stage(300 * arch.slowness(), &["success", "failed"]);
    assert_eq!(s["stage"], "success", "{s}");
    b.assert_runs("1.5.0");
    b.assert_intact();
    assert_eq!(running_updater(&mut b.vm), "0.2.0");
    let kept = format!("/var/lib/tope-ota/updater/{sha}");
    // serve restarts into it once idle: the same pid (systemd saw no restart), the new binary.
    let until = Instant::now() + Duration::from_secs(60 * arch.slowness());
    let serve = loop {
        let now = serve_exe(&mut b.vm);
        if now.1 == kept || Instant::now() > until {
            break now;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(serve, (serve_pid, kept.clone()), "serve after the proof");
    let body = curl_json(&mut b.vm, "http://127.0.0.1:12315/api/v1.0/progress");
    assert_eq!(body["data"]["stage"], "success", "{body}");
    // The heal timer runs it, under its unit's sandbox: its journal records say so.
    let before = heal_started_at(&mut b.vm);
    assert_timer_heal_succeeds(&mut b.vm, arch, before);
    let who = b.vm.sh_ok(
        "journalctl -q -u tope-ota-heal.service -o json -n 1 OTA_UPDATER=0.2.0 | head -c 200",
        60,
    );
    assert!(
        !who.trim().is_empty(),
        "no heal record by the updater 0.2.0"
    );
    let violations = updater_violations(&mut b.vm);
    assert!(violations.is_empty(), "{violations:?}");
    // A later release without an updater is installed by it and keeps it.
    let (code, out) = b.install(&Release::new("1.6.0"));
    assert_eq!(code, 0, "{out}");
    assert_eq!(running_updater(&mut b.vm), "0.2.0");

    // dpkg -i of a newer .deb: the higher version runs, serve included (restarted by dpkg).
    let dir = tempfile::tempdir().unwrap();
    let newer = dir.path().join("tope-ota_0.3.0_newer.deb");
    qemu::newer_deb(arch, "0.3.0", &newer);
    b.vm.put("/root/newer.deb", &std::fs::read(&newer).unwrap());
    b.vm.sh_ok("dpkg -i /root/newer.deb >/dev/null", 600);
    assert_eq!(running_updater(&mut b.vm), "0.3.0");
    let v = b.vm.sh_ok("tope-ota --version", 60);
    assert!(v.contains("is not newer than this one (0.3.0)"), "{v}");
    let until = Instant::now() + Duration::from_secs(60 * arch.slowness());
    while serve_exe(&mut b.vm).1 != "/usr/bin/tope-ota" && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(serve_exe(&mut b.vm).1, "/usr/bin/tope-ota");
    let (code, out) = b.install(&Release::new("1.7.0"));
    assert_eq!(code, 0, "{out}");
    b.assert_runs("1.7.0");
    b.assert_intact();
}

// ---------------------------------------------------------------- power cuts

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Download,
    Install,
    Rollback,
    Heal,
    /// An install whose release carries a new updater (tried, then proven by its own commit).
    SelfUpdate,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn ms(&mut self, max: u64) -> Duration {
        Duration::from_millis(self.next() % max.max(1))
    }
}

struct Cut {
    op: Op,
    at: Duration,
    landed: String,
    after: String,
    violations: Vec<String>,
    secs: f64,
}

fn stage_step(s: &Value) -> String {
    if s.is_null() {
        return "no state".into();
    }
    let mut t = s["stage"].as_str().unwrap_or("?").to_string();
    if let Some(step) = s["step"].as_str() {
        t += &format!("/{step}");
    }
    if t.starts_with("downloading") {
        t += &format!(" {}%", s["progress"]);
    }
    t
}

/// One power cut: set up, start `op`, cut at a random instant, boot, let the timer's heal run,
/// check the invariants, then show that a later update still works.
fn one_cut(arch: Arch, op: Op, rng: &mut Rng) -> Cut {
    let t0 = Instant::now();
    let mut b = Box::pristine(arch);
    let v11 = Release {
        payload: 3 << 20,
        ..Release::new("1.1.0")
    };
    let v11 = if op == Op::SelfUpdate {
        with_updater(v11, arch, "0.2.0")
    } else {
        v11
    };
    let p11 = b.publish(&v11);
    let (cmd, window) = match op {
        Op::SelfUpdate => {
            b.vm.sh_ok(&p11.download_cmd(), 300);
            // The self-test and the commit by the new updater come on top of an install.
            ("tope-ota install".to_string(), 8000)
        }
        Op::Download => {
            b.shelf.set_rate(1 << 20);
            (p11.download_cmd(), 3500)
        }
        Op::Install => {
            b.vm.sh_ok(&p11.download_cmd(), 300);
            ("tope-ota install".to_string(), 6000)
        }
        Op::Rollback => {
            let (code, out) = b.install(&v11);
            assert_eq!(code, 0, "{out}");
            ("tope-ota rollback".to_string(), 5000)
        }
        Op::Heal => {
            // An interrupted download for heal to resume.
            b.shelf.set_rate(1 << 20);
            let pid = b.vm.spawn_sh(&p11.download_cmd());
            std::thread::sleep(Duration::from_millis(1200 + 500 * (arch.slowness() - 1)));
            b.vm.sh("pkill -9 -f '^tope-ota download'", 30);
            let _ = b.vm.poll(pid);
            ("tope-ota heal".to_string(), 3000)
        }
    };
    // The install and the rollback are the CPU's: they take about `slowness` times as long on
    // an emulated board. A download and heal's resume are the link's (1 MiB/s), plus a start.
    let window = match op {
        Op::Install | Op::Rollback | Op::SelfUpdate => window * arch.slowness(),
        Op::Download | Op::Heal => window + 500 * (arch.slowness() - 1),
    };
    let planned = rng.ms(window);
    // What the operation starts from (fsynced by the set-up's own tope-ota commands, if any).
    let had_state = b.vm.sh("test -e /var/lib/tope-ota/state.json", 30).code == 0;
    let boot = b.vm.boot_id();
    let op_pid = b.vm.spawn_sh(&format!("{cmd} >/dev/null 2>&1"));
    // The cut comes from a timer at the planned instant: an agent call in the watch loop below
    // takes a while on an emulated board, and must not delay it.
    let qemu = b.vm.qemu_pid().expect("qemu runs");
    b.vm.arm_cut();
    let started = Instant::now();
    let cutter = std::thread::spawn(move || {
        std::thread::sleep(planned.saturating_sub(started.elapsed()));
        // SAFETY: a signal to the QEMU child this test started and has not reaped.
        unsafe { libc::kill(qemu as i32, libc::SIGKILL) };
        started.elapsed()
    });
    let mut landed = String::new();
    let mut ended = None;
    while !cutter.is_finished() {
        if let Ok(e) = b.vm.try_sh("cat /var/lib/tope-ota/state.json", 2) {
            if !cutter.is_finished() {
                landed = stage_step(&serde_json::from_str(&e.out).unwrap_or(Value::Null));
            }
        }
        if ended.is_none() && !cutter.is_finished() {
            ended = b.vm.poll(op_pid).ok().flatten().map(|e| e.code);
        }
    }
    let at = cutter.join().unwrap();
    b.vm.power_cut();
    if let Some(code) = ended {
        landed = format!("{landed} (op had ended, exit {code})");
    }
    b.shelf.set_rate(0);
    b.vm.power_on();
    b.wait_boot_and_heal(&boot);
    let after = stage_step(&device::state(&mut b.vm));
    let mut violations = device::violations(&mut b.vm, &b.catalog, FACTORY_DIR, had_state);
    violations.extend(updater_violations(&mut b.vm));
    // A later update still works.
    let later = Release::new("2.0.0");
    let (code, out) = b.install(&later);
    if code != 0 {
        violations.push(format!("a later install failed: {out}"));
    } else {
        violations.extend(device::violations(&mut b.vm, &b.catalog, FACTORY_DIR, true));
    }
    Cut {
        op,
        at,
        landed,
        after,
        violations,
        secs: t0.elapsed().as_secs_f64(),
    }
}

/// The release `r` carrying the board's tope-ota (the fail-point build) as updater `version`.
fn with_updater(r: Release, arch: Arch, version: &str) -> Release {
    let mut bytes = qemu::updater_binary(arch).to_vec();
    support::restamp(&mut bytes, version);
    Release {
        updater: Some(device::Updater {
            version: version.to_string(),
            bytes: std::sync::Arc::new(bytes),
        }),
        ..r
    }
}

/// What is wrong with the updater that runs now: it must be a good one, the proven updater
/// when one is recorded (its kept file intact), the .deb binary otherwise; never one marked bad.
fn updater_violations(vm: &mut Vm) -> Vec<String> {
    let mut out = Vec::new();
    let rec = vm.sh("cat /var/lib/tope-ota/updater/updater.json 2>/dev/null", 30);
    let rec: Value = serde_json::from_str(&rec.out).unwrap_or(Value::Null);
    let v = vm.sh("tope-ota --version", 60);
    if v.code != 0 {
        return vec![format!("tope-ota --version exits {}: {}", v.code, v.err)];
    }
    let running = v
        .out
        .lines()
        .next()
        .unwrap_or("")
        .trim_start_matches("tope-ota ")
        .to_string();
    let deb = env!("CARGO_PKG_VERSION");
    match rec["good"]["sha256"].as_str() {
        Some(sha) => {
            let want = rec["good"]["version"].as_str().unwrap_or("?");
            if running != want {
                out.push(format!("the proven updater is {want}, {running} runs"));
            }
            let on_disk = vm.sh(&format!("sha256sum /var/lib/tope-ota/updater/{sha}"), 60);
            if !on_disk.out.starts_with(sha) {
                out.push(format!(
                    "the proven updater's kept file is not intact: {}{}",
                    on_disk.out, on_disk.err
                ));
            }
            if rec["bad"]
                .as_array()
                .is_some_and(|b| b.iter().any(|x| x["sha256"] == sha))
            {
                out.push(format!("the proven updater {sha} is also marked bad"));
            }
        }
        None if running != deb => out.push(format!("no proven updater, yet {running} runs")),
        None => {}
    }
    out
}

/// `name` as a number, `default` when unset or empty; anything else is a mistake to stop on.
fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        _ => default,
    }
}

/// `TOPE_OTA_POWER_CUTS` cuts (5 by default) with seed `TOPE_OTA_POWER_CUT_SEED`. With
/// `TOPE_OTA_BOX_FEATURES=break-snapshot-sync` (tests/vm/power-cuts.sh --broken) the device runs a
/// build that does not sync a new snapshot, and the cuts must find violations.
fn power_cuts(arch: Arch) {
    // In the test command: five on the x86 board, three on an ARM one (a download, an install
    // and a rollback: a cut there takes about twice as long); tests/vm/power-cuts.sh runs
    // many.
    let n = env_u64(
        "TOPE_OTA_POWER_CUTS",
        if arch == Arch::Amd64 { 5 } else { 3 },
    );
    run_cuts(
        arch,
        &[Op::Download, Op::Install, Op::Rollback, Op::Heal],
        n,
    );
}

/// `TOPE_OTA_SELF_UPDATE_CUTS` cuts (2 by default) during installs of releases that carry a new
/// updater (issue #23): the usual invariants, and the updater that runs after boot and heal is
/// a good one. `tests/vm/power-cuts.sh --self-update` runs 20.
fn self_update_power_cuts(arch: Arch) {
    let n = env_u64("TOPE_OTA_SELF_UPDATE_CUTS", 2);
    run_cuts(arch, &[Op::SelfUpdate], n);
}

fn run_cuts(arch: Arch, ops: &[Op], n: u64) {
    let seed = env_u64("TOPE_OTA_POWER_CUT_SEED", 20261123);
    let broken = std::env::var("TOPE_OTA_BOX_FEATURES").is_ok_and(|f| !f.is_empty());
    let mut rng = Rng(seed | 1);
    let a = artifacts(arch);
    println!(
        "box: {} board, accelerator {}, cold boot to the guest agent {:.1} s",
        a.arch.name(),
        a.accel.name,
        a.boot_secs
    );
    let mut cuts = Vec::new();
    let t = Instant::now();
    let mut harness_errors = 0;
    for i in 0..n {
        let op = ops[(i as usize) % ops.len()];
        // A harness failure (a hung agent, a boot that never came) is reported apart from
        // invariant violations, and the run goes on.
        let c = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            one_cut(arch, op, &mut rng)
        })) {
            Ok(c) => c,
            Err(e) => {
                harness_errors += 1;
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                println!("cut {:>3} {op:<8?} HARNESS ERROR: {msg}", i + 1);
                continue;
            }
        };
        println!(
            "cut {:>3} {:<8?} at {:>5} ms  landed in {:<28} after heal {:<16} {:>5.1} s  {}",
            i + 1,
            c.op,
            c.at.as_millis(),
            c.landed,
            c.after,
            c.secs,
            if c.violations.is_empty() {
                "ok".to_string()
            } else {
                format!("VIOLATIONS: {}", c.violations.join("; "))
            }
        );
        cuts.push(c);
    }
    let bad = cuts.iter().filter(|c| !c.violations.is_empty()).count();
    println!(
        "power cuts on {}: {n} (seed {seed}), {bad} with violations, {:.1} s per cut, {:.0} s in all{}",
        arch.name(),
        t.elapsed().as_secs_f64() / n.max(1) as f64,
        t.elapsed().as_secs_f64(),
        if broken { " [broken build]" } else { "" }
    );
    let mut landed: std::collections::BTreeMap<String, usize> = Default::default();
    for c in &cuts {
        *landed
            .entry(format!("{:?} {}", c.op, c.landed))
            .or_default() += 1;
    }
    for (k, v) in landed {
        println!("  {v:>3} × {k}");
    }
    let during = cuts
        .iter()
        .filter(|c| !c.landed.contains("op had ended"))
        .count();
    println!(
        "  {during} of {} cuts landed while the operation ran; {harness_errors} harness errors",
        cuts.len()
    );
    assert_eq!(harness_errors, 0, "the box failed during cuts (see above)");
    if broken {
        assert!(
            bad > 0,
            "the broken build survived {n} cuts: the cuts find nothing"
        );
    } else {
        assert_eq!(bad, 0, "power cuts broke invariants");
    }
}

// ---------------------------------------------------------------- figures in the guest

/// Runs a command in the guest and prints its wall time and the peak RSS of it and its children.
const MEASURE_PY: &str = r#"import json, resource, subprocess, sys, time
t = time.monotonic()
r = subprocess.run(["sh", "-c", sys.argv[1]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
secs = time.monotonic() - t
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"code": r.returncode, "secs": secs, "maxrss_kib": ru.ru_maxrss, "err": r.stderr.decode(errors="replace")[-500:]}))
"#;

fn measure(vm: &mut Vm, script: &str) -> (f64, u64) {
    let out = vm.sh_ok(
        &format!(
            "python3 /root/measure.py '{}'",
            script.replace('\'', r"'\''")
        ),
        1800,
    );
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["code"], 0, "`{script}` in the guest: {v}");
    (
        v["secs"].as_f64().unwrap(),
        v["maxrss_kib"].as_u64().unwrap(),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The download and install benchmarks inside the guest, against the guest's own tools on the
/// same package: `curl` + `md5sum` + `sync` for a download, `unzip` + `sync` for an install.
/// Ratios, since TCG makes every absolute figure slow; peak RSS of tope-ota and of the baseline.
/// `TOPE_OTA_GUEST_BENCH_MIB` (default 32) sets the package's payload, `..._RUNS` (3) the runs.
fn figures_in_the_guest(arch: Arch) {
    let mib = env_u64("TOPE_OTA_GUEST_BENCH_MIB", 32) as usize;
    let runs = env_u64("TOPE_OTA_GUEST_BENCH_RUNS", 3);
    let mut b = Box::pristine(arch);
    b.vm.put("/root/measure.py", MEASURE_PY.as_bytes());
    let (mut dl, mut dl_base, mut inst, mut inst_base) = (vec![], vec![], vec![], vec![]);
    let (mut rss_dl, mut rss_inst, mut rss_base) = (0, 0, 0);
    let mut size = 0;
    for i in 0..runs {
        let r = Release {
            payload: mib << 20,
            ..Release::new(&format!("1.{}.0", i + 1))
        };
        let p = b.publish(&r);
        size = p.size;
        let get = format!(
            "rm -rf /var/tmp/bench && mkdir /var/tmp/bench && curl -sf -o /var/tmp/bench/p.zip {} && md5sum /var/tmp/bench/p.zip >/dev/null && sync",
            p.url()
        );
        let (t, rss) = measure(&mut b.vm, &get);
        dl_base.push(t);
        rss_base = rss_base.max(rss);
        let (t, rss) = measure(&mut b.vm, &format!("sync && {}", p.download_cmd()));
        dl.push(t);
        rss_dl = rss_dl.max(rss);
        let (t, rss) = measure(
            &mut b.vm,
            "sync && unzip -q -o /var/tmp/bench/p.zip -d /var/tmp/bench/x && sync",
        );
        inst_base.push(t);
        rss_base = rss_base.max(rss);
        let (t, rss) = measure(&mut b.vm, "sync && tope-ota install");
        inst.push(t);
        rss_inst = rss_inst.max(rss);
        b.assert_runs(&r.version);
    }
    b.assert_intact();
    let (d, db, n, nb) = (median(dl), median(dl_base), median(inst), median(inst_base));
    println!(
        "figures on {} ({} B package, {mib} MiB payload, median of {runs}): \
         download {d:.2} s vs curl+md5sum+sync {db:.2} s = {:.2}x; \
         install {n:.2} s vs unzip+sync {nb:.2} s = {:.2}x (install restarts the three units); \
         peak RSS download {} KiB, install {} KiB, baselines {} KiB",
        arch.name(),
        size,
        d / db,
        n / nb,
        rss_dl,
        rss_inst,
        rss_base
    );
}

mod figures {
    #[test]
    #[ignore = "benchmark in the guest: cargo test --release --features failpoints --test vm figures -- --ignored --nocapture"]
    fn amd64() {
        super::figures_in_the_guest(super::Arch::Amd64)
    }

    #[test]
    #[ignore = "benchmark in the guest: cargo test --release --features failpoints --test vm figures -- --ignored --nocapture"]
    fn arm64() {
        super::figures_in_the_guest(super::Arch::Arm64)
    }
}

// ---------------------------------------------------------------- the boards

/// `mod BOARD { #[test] fn SCENARIO() }` for each scenario named.
macro_rules! board {
    ($board:ident, $arch:ident, [$($scenario:ident),* $(,)?]) => {
        mod $board {
            $(
                #[test]
                fn $scenario() {
                    super::$scenario(super::Arch::$arch)
                }
            )*
        }
    };
}

/// Every scenario: the x86 board and the 64-bit ARM board run the same list, and a board's own.
macro_rules! every_scenario {
    ($board:ident, $arch:ident, [$($own:ident),* $(,)?]) => {
        board!(
            $board,
            $arch,
            [
                boot_units_are_active_and_serve_is_sandboxed,
                device_api_flow_over_http_restarts_real_units_and_runs_ota_gui_outside_the_sandbox,
                a_service_that_fails_to_start_rolls_back_with_real_systemd,
                a_reboot_package_reboots_and_heal_at_boot_commits_it,
                technician_man_page_completion_and_status,
                power_cuts,
                $($own,)*
            ]
        );
    };
}

every_scenario!(
    amd64,
    Amd64,
    [
        the_updater_updates_itself_and_a_bad_one_never_strands_the_device,
        self_update_power_cuts,
    ]
);
// A foreign image made without binfmt_misc: proven on the 64-bit ARM board.
every_scenario!(
    arm64,
    Arm64,
    [an_image_configured_inside_the_guest_becomes_a_device]
);

// The 32-bit board: booted, its units up, an update and a rollback through them.
board!(
    armhf,
    Armhf,
    [
        boot_units_are_active_and_serve_is_sandboxed,
        a_technician_installs_and_rolls_back_through_the_units,
    ]
);
