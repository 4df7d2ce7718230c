//! The install's progress screen (`--gui`, ota-gui): started detached once an install will run,
//! never waited for, never fatal; under systemd a transient unit of its own, outside the sandbox
//! of the unit that runs tope-ota.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The optional progress screen: started detached once the install will run, never waited
/// for, never fatal.
pub struct Gui(Option<Screen>);

enum Screen {
    /// Our own child, when run from a shell.
    Child(Child),
    /// A transient unit of its own, when we run inside a systemd unit.
    Unit,
}

/// The transient unit the screen runs in when tope-ota itself runs under systemd.
const GUI_UNIT: &str = "tope-ota-gui.service";

/// What the screen keeps of our environment in its unit (besides `TOPE_OTA_*`): PID 1's own
/// environment has no display.
const GUI_ENV: [&str; 7] = [
    "DISPLAY",
    "WAYLAND_DISPLAY",
    "XDG_RUNTIME_DIR",
    "QT_QPA_PLATFORM",
    "XAUTHORITY",
    "LANG",
    "TZ",
];

/// Whether this process runs inside a systemd unit (serve's child, the heal timer). A child
/// of ours would then inherit that unit's sandbox: private /tmp, read-only /run, the syscall
/// filter and the cut capability set, so no display.
fn under_systemd() -> bool {
    std::env::var_os("INVOCATION_ID").is_some() && Path::new("/run/systemd/system").is_dir()
}

/// Run a short helper command, killed after `bound`; whether it exited 0.
fn run_bounded(cmd: &mut Command, bound: Duration) -> std::io::Result<bool> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()?;
    let until = std::time::Instant::now() + bound;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st.success());
        }
        if std::time::Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other(format!(
                "hung, killed after {bound:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Gui {
    /// No screen (yet).
    pub fn none() -> Gui {
        Gui(None)
    }

    pub fn launch(path: &Path) -> Gui {
        if !path.exists() {
            log::warn!(
                "no ota-gui at {}; installing without a progress screen",
                path.display()
            );
            return Gui(None);
        }
        if under_systemd() {
            // PID 1 resolves the path in its own namespace, and would expand `$` in it.
            let path = match std::fs::canonicalize(path) {
                Ok(p) if !p.to_string_lossy().contains('$') => p,
                _ => {
                    log::warn!("ota-gui {}: not a plain absolute path", path.display());
                    return Gui(None);
                }
            };
            // The screen of an earlier install that still shows goes; this one takes its place.
            for action in ["stop", "reset-failed"] {
                let _ = run_bounded(
                    Command::new("systemctl").args([action, GUI_UNIT]),
                    Duration::from_secs(5),
                );
            }
            // PID 1 starts it outside our sandbox, with the settings a display needs from our
            // environment; --no-block: never wait on the screen.
            let mut cmd = Command::new("systemd-run");
            cmd.args(["--unit", GUI_UNIT, "--collect", "--quiet", "--no-block"]);
            for (name, _) in std::env::vars_os() {
                let name = name.to_string_lossy();
                if GUI_ENV.contains(&name.as_ref()) || name.starts_with("TOPE_OTA_") {
                    cmd.arg(format!("--setenv={name}"));
                }
            }
            let started = run_bounded(cmd.arg("--").arg(&path), Duration::from_secs(5));
            return match started {
                Ok(true) => Gui(Some(Screen::Unit)),
                Ok(false) => {
                    // Most often the screen of an earlier install still runs in that unit.
                    log::warn!("ota-gui {}: systemd-run failed", path.display());
                    Gui(None)
                }
                Err(e) => {
                    log::warn!("ota-gui {}: systemd-run: {e}", path.display());
                    Gui(None)
                }
            };
        }
        match Command::new(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
        {
            Ok(c) => Gui(Some(Screen::Child(c))),
            Err(e) => {
                log::warn!("ota-gui {} did not start: {e}", path.display());
                Gui(None)
            }
        }
    }

    /// Take the screen down again: the install gave the package back (a print started).
    pub fn close(&mut self) {
        match self.0.take() {
            Some(Screen::Child(mut child)) => {
                // SAFETY: kill(2) on the GUI's own process group.
                unsafe {
                    libc::kill(-(child.id() as i32), libc::SIGTERM);
                }
                let _ = child.wait();
            }
            Some(Screen::Unit) => {
                let stopped = run_bounded(
                    Command::new("systemctl").args(["stop", "--no-block", GUI_UNIT]),
                    Duration::from_secs(5),
                );
                if !matches!(stopped, Ok(true)) {
                    log::warn!("ota-gui: could not stop {GUI_UNIT}");
                }
            }
            None => {}
        }
    }

    pub fn finish(mut self) {
        // Reaped if it already ended; a GUI still showing progress is left running.
        if let Some(Screen::Child(child)) = self.0.as_mut() {
            match child.try_wait() {
                Ok(Some(st)) if !st.success() => log::warn!("ota-gui exited early: {st}"),
                _ => {}
            }
        }
    }
}
