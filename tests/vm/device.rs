//! The printer's software as the box runs it: releases of the stand-ins (packed with the real
//! `tope-ota pack`), the files each version must have, and the invariants of SPEC 9a checked
//! inside the guest.

use crate::qemu::{vm_dir, Vm};
use crate::support::{data, BIN};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;

/// The units of the printer's software, in restart order.
pub const UNITS: [&str; 3] = ["mainboard", "device-api", "printer-ui"];
pub const FACTORY_VERSION: &str = "1.0.0";

#[derive(Clone, Debug)]
pub struct Release {
    pub version: String,
    /// mainboard exits 1 at start.
    pub broken: bool,
    pub reboot: bool,
    /// Size of share/payload.bin (so a download and an install take a while).
    pub payload: usize,
    /// A tope-ota build the release carries as its updater (`bin/tope-ota`, issue #23).
    pub updater: Option<Updater>,
}

/// An updater build, and the version it says it is.
#[derive(Clone)]
pub struct Updater {
    pub version: String,
    pub bytes: std::sync::Arc<Vec<u8>>,
}

impl std::fmt::Debug for Updater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Updater({}, {} bytes)", self.version, self.bytes.len())
    }
}

/// Where a release's updater lands in its snapshot.
pub const UPDATER_DST: &str = "bin/tope-ota";

impl Release {
    pub fn new(version: &str) -> Release {
        Release {
            version: version.into(),
            broken: false,
            reboot: false,
            payload: 256 * 1024,
            updater: None,
        }
    }

    /// path in the snapshot -> (bytes, mode)
    pub fn files(&self) -> BTreeMap<String, (Vec<u8>, u32)> {
        let mut f = files_of(&self.version, self.broken, Some(self.payload));
        if let Some(u) = &self.updater {
            f.insert(UPDATER_DST.to_string(), (u.bytes.to_vec(), 0o755));
        }
        f
    }

    /// The update package, made by `tope-ota pack`.
    pub fn pack(&self) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir(&src).unwrap();
        let mut modules = Vec::new();
        let order = |unit: &str| UNITS.iter().position(|u| *u == unit).unwrap() as i64 + 1;
        for (path, (bytes, mode)) in self.files() {
            let name = path.rsplit('/').next().unwrap().to_string();
            let f = src.join(&name);
            fs::write(&f, bytes).unwrap();
            fs::set_permissions(&f, fs::Permissions::from_mode(mode)).unwrap();
            let mut m = json!({"name": name, "src": name, "dst": path});
            if path == UPDATER_DST {
                m["updater"] = json!(true);
            } else if let Some(unit) = path.strip_prefix("bin/") {
                m["process_name"] = json!(format!("{unit}.service"));
                m["restart_order"] = json!(order(unit));
            }
            modules.push(m);
        }
        let manifest = json!({"version": self.version, "modules": modules, "reboot": self.reboot});
        let mf = dir.path().join("manifest.json");
        fs::write(&mf, manifest.to_string()).unwrap();
        let out = dir.path().join("pkg.zip");
        let o = std::process::Command::new(BIN)
            .args(["pack", "--version", &self.version, "--manifest"])
            .arg(&mf)
            .arg("--out")
            .arg(&out)
            .arg(&src)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "tope-ota pack: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        fs::read(out).unwrap()
    }
}

fn program(template: &str, version: &str) -> Vec<u8> {
    fs::read_to_string(vm_dir().join("device").join(template))
        .unwrap()
        .replace("@VERSION@", version)
        .into_bytes()
}

/// The files of a version: 1.0.0 is what image.sh puts in the image; every release ships all
/// of its files, so a snapshot of it holds exactly these, whatever it was installed over.
fn files_of(
    version: &str,
    broken: bool,
    payload: Option<usize>,
) -> BTreeMap<String, (Vec<u8>, u32)> {
    let mut f = BTreeMap::new();
    f.insert(
        "bin/device-api".into(),
        (program("device-api", version), 0o755),
    );
    f.insert(
        "bin/printer-ui".into(),
        (program("service", version), 0o755),
    );
    f.insert("bin/mainboard".into(), (program("service", version), 0o755));
    let conf = if broken {
        "{\"fail\": true}\n"
    } else {
        "{\"fail\": false}\n"
    };
    f.insert(
        "etc/mainboard.conf".into(),
        (conf.as_bytes().to_vec(), 0o644),
    );
    if version != FACTORY_VERSION {
        let seed = version
            .bytes()
            .fold(7u64, |a, b| a.wrapping_mul(31) + b as u64);
        let n = payload.unwrap_or(256 * 1024);
        f.insert("share/payload.bin".into(), (data(n, seed), 0o644));
    }
    f
}

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// What the checks know about the versions a run has used.
#[derive(Default)]
pub struct Catalog {
    releases: BTreeMap<String, Release>,
}

impl Catalog {
    /// Whether the run has published anything (then tope-ota has written a state.json).
    pub fn is_empty(&self) -> bool {
        self.releases.is_empty()
    }

    pub fn add(&mut self, r: &Release) {
        self.releases.insert(r.version.clone(), r.clone());
    }

    /// The SHA-256 of every updater a release of this run carried.
    fn updaters(&self) -> impl Iterator<Item = String> + '_ {
        self.releases
            .values()
            .filter_map(|r| r.updater.as_ref())
            .map(|u| sha256_hex(&u.bytes))
    }

    fn expected(&self, version: &str) -> Option<BTreeMap<String, String>> {
        let files = if version == FACTORY_VERSION {
            files_of(version, false, None)
        } else {
            self.releases.get(version)?.files()
        };
        Some(
            files
                .into_iter()
                .map(|(p, (b, _))| (p, sha256_hex(&b)))
                .collect(),
        )
    }
}

/// `v1.2.0`, `v1.2.0~3`, `v1.2.0~factory` -> `1.2.0`
pub fn version_of(dir: &str) -> String {
    let v = dir.strip_prefix('v').unwrap_or(dir);
    v.split('~').next().unwrap().to_string()
}

/// Differences between the files under `/opt/tope/versions/<link>` and its version's.
fn tree_violations(vm: &mut Vm, cat: &Catalog, link: &str) -> (String, Vec<String>) {
    let mut v = Vec::new();
    let dir = vm
        .sh(&format!("readlink /opt/tope/versions/{link}"), 30)
        .out
        .trim()
        .to_string();
    if dir.is_empty() || dir.contains('/') {
        v.push(format!("{link} is not a link to a snapshot dir: {dir:?}"));
        return (dir, v);
    }
    let version = version_of(&dir);
    let Some(want) = cat.expected(&version) else {
        v.push(format!("{link} -> {dir}: a version this run never made"));
        return (dir, v);
    };
    let e = vm.sh(
        &format!(
            "cd /opt/tope/versions/{link}/ && find . -path ./.tope-ota -prune -o \\( -type f -o -type l \\) -print0 | xargs -0r sha256sum"
        ),
        60,
    );
    if e.code != 0 {
        v.push(format!("{link} -> {dir}: cannot read it: {}", e.err.trim()));
        return (dir, v);
    }
    let have: BTreeMap<String, String> = e
        .out
        .lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(h, p)| (p.trim_start_matches("./").to_string(), h.to_string()))
        .collect();
    for (p, h) in &want {
        match have.get(p) {
            None => v.push(format!("{link} -> {dir}: {p} is missing")),
            Some(x) if x != h => v.push(format!("{link} -> {dir}: {p} differs from {version}'s")),
            _ => {}
        }
    }
    for (p, h) in have.iter().filter(|(p, _)| !want.contains_key(*p)) {
        // A release without an updater keeps the one of the version it was installed over.
        if p == UPDATER_DST && cat.updaters().any(|u| u == *h) {
            continue;
        }
        v.push(format!("{link} -> {dir}: unexpected file {p}"));
    }
    (dir, v)
}

/// The running programs: unit -> (is-active, reported version, reported pid, MainPID).
pub fn running(vm: &mut Vm) -> BTreeMap<String, (String, String, i64, i64)> {
    let mut m = BTreeMap::new();
    for u in UNITS {
        let e = vm.sh(
            &format!(
                "systemctl is-active {u}; systemctl show -p MainPID --value {u}; cat /run/tope-device/{u}.json 2>/dev/null"
            ),
            30,
        );
        let mut lines = e.out.lines();
        let active = lines.next().unwrap_or("").to_string();
        let main_pid = lines.next().and_then(|l| l.parse().ok()).unwrap_or(-1);
        let seen: Value = lines
            .next()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or(Value::Null);
        m.insert(
            u.to_string(),
            (
                active,
                seen["version"].as_str().unwrap_or("").to_string(),
                seen["pid"].as_i64().unwrap_or(-2),
                main_pid,
            ),
        );
    }
    m
}

/// Violations of SPEC 9a on the device as it is now (after a heal). `factory_dir` is the
/// factory snapshot's dir name on the pristine device. `had_state`: state.json was on disk,
/// durably, before the fault, so losing it is a violation; a device that never ran an
/// operation has none (the pristine device), and a cut before the first write leaves it so.
pub fn violations(vm: &mut Vm, cat: &Catalog, factory_dir: &str, had_state: bool) -> Vec<String> {
    quiet(vm);
    let mut v = Vec::new();
    let st = vm.sh("cat /var/lib/tope-ota/state.json", 30);
    let state: Option<Value> = serde_json::from_str(&st.out).ok();
    if st.code != 0 && had_state {
        v.push(format!("state.json is missing: {}", st.err.trim()));
    } else if st.code == 0 && state.is_none() {
        v.push(format!("state.json does not parse: {:?}", st.out));
    }
    let (dir, mut cur) = tree_violations(vm, cat, "current");
    v.append(&mut cur);
    if let Some(s) = &state {
        if s["stage"] == "success" && s["version"].as_str() != Some(version_of(&dir).as_str()) {
            v.push(format!(
                "state says success for {}, current is {dir}",
                s["version"]
            ));
        }
    }
    let (fdir, mut fac) = tree_violations(vm, cat, "factory");
    v.append(&mut fac);
    if fdir != factory_dir {
        v.push(format!("factory moved: {factory_dir} -> {fdir}"));
    }
    let shared = vm.sh("find /opt/tope/versions/factory/ -type f -links +1", 30);
    if !shared.out.trim().is_empty() {
        v.push(format!("factory shares inodes: {}", shared.out.trim()));
    }
    let fv = vm.sh("tope-ota verify factory", 60);
    if fv.code != 0 {
        v.push(format!(
            "tope-ota verify factory: {}{}",
            fv.out.trim(),
            fv.err.trim()
        ));
    }
    let ota = vm.sh(
        "systemctl is-active tope-ota-serve.service tope-ota-heal.timer",
        30,
    );
    if ota.code != 0 {
        v.push(format!(
            "tope-ota's units: {}",
            ota.out.split_whitespace().collect::<Vec<_>>().join(" ")
        ));
    }
    let version = version_of(&dir);
    for (u, (active, seen, pid, main)) in running(vm) {
        if active != "active" {
            v.push(format!("{u} is {active}"));
        } else if seen != version || pid != main {
            v.push(format!(
                "{u} runs {seen:?} (pid {pid}, MainPID {main}), current is {version}"
            ));
        }
    }
    v
}

/// Wait until no tope-ota writer holds the lock (the timer's heal runs every 15 s in the box):
/// what is checked then is what the device settled on, not a heal's step. Bounded by the
/// longest a heal may take here.
pub fn quiet(vm: &mut Vm) {
    vm.sh_ok(
        "for i in $(seq 1200); do flock -n /var/lib/tope-ota/state.lock true && exit 0; sleep 0.1; done; \
         echo 'the lock was held for 120 s' >&2; exit 1",
        150,
    );
}

/// How often the timer's heal ran and how often a command waited for a brief holder since
/// `since` (Unix seconds; the guest clock is set at resume), from what the journal holds.
pub fn lock_figures(vm: &mut Vm, since: u64) -> Option<(u64, u64)> {
    let e = vm
        .try_sh(
            &format!(
                "journalctl --since=@{since} --no-pager -o cat -u tope-ota-heal.service | grep -c '^Starting' ; \
                 journalctl --since=@{since} --no-pager -o cat | grep -c 'waiting up to .* to release the lock'"
            ),
            10,
        )
        .ok()?;
    let mut n = e.out.split_whitespace().map(|w| w.parse().unwrap_or(0));
    Some((n.next()?, n.next()?))
}

/// The device's state.json, or Null.
pub fn state(vm: &mut Vm) -> Value {
    let e = vm.sh("cat /var/lib/tope-ota/state.json 2>/dev/null", 30);
    serde_json::from_str(&e.out).unwrap_or(Value::Null)
}
