//! The command-line definition (clap derive), and nothing else: man pages, completions and tests
//! render from this same definition.

use crate::clock::{format_duration, parse_duration};
use clap::builder::FalseyValueParser;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

/// The shortest bound a command may be given (a health check's or a migration's timeout):
/// below it every run would be killed at once and every install fail, so a smaller setting
/// is a mistake, warned about, and the default is used.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(100);

/// A duration setting as given (flag or environment). It never fails to parse: a typo in
/// /etc/default/tope-ota must not stop every command, heal at boot included. An invalid value
/// is logged and its default used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationSetting {
    pub raw: String,
    parsed: Result<Duration, String>,
}

impl DurationSetting {
    /// The duration, or `default` with a warning when the setting is not a duration.
    pub fn or(&self, name: &str, default: Duration) -> Duration {
        match &self.parsed {
            Ok(d) => *d,
            Err(e) => {
                log::warn!(
                    "{name}: {e}; using the default {}",
                    format_duration(default)
                );
                default
            }
        }
    }
}

impl DurationSetting {
    /// Like [`DurationSetting::or`], and a duration shorter than `floor` (0 included) is
    /// warned about and replaced by `default` too.
    pub fn or_at_least(&self, name: &str, default: Duration, floor: Duration) -> Duration {
        let d = self.or(name, default);
        if d < floor {
            log::warn!(
                "{name}: {:?} is shorter than {}, which no command can run in; using the default {}",
                self.raw,
                format_duration(floor),
                format_duration(default)
            );
            return default;
        }
        d
    }
}

fn duration_setting(s: &str) -> Result<DurationSetting, std::convert::Infallible> {
    Ok(DurationSetting {
        raw: s.to_string(),
        parsed: parse_duration(s),
    })
}

/// Parse the process's arguments; `--version` says which updater runs (see
/// [`crate::dispatch`]).
pub fn parse() -> Cli {
    use clap::FromArgMatches;
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // clap exits by itself for --help, --version and a usage error: the run ends in order
    // first (see crate::dispatch::finish_unparsed), so a technician's --version is no crash.
    let exit = |e: clap::Error| -> ! {
        crate::dispatch::finish_unparsed(e.exit_code());
        e.exit()
    };
    if args.get(1).and_then(|a| a.to_str()) == Some(crate::dispatch::SELF_TEST) {
        args.remove(1);
        let t = SelfTestCli::try_parse_from(args).unwrap_or_else(|e| exit(e));
        return Cli {
            global: t.global,
            command: Command::SelfTest(t.args),
        };
    }
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let m = command()
        .version(leak(crate::version::version().to_string()))
        .long_version(leak(crate::dispatch::long_version()))
        .try_get_matches_from(args)
        .unwrap_or_else(|e| exit(e));
    Cli::from_arg_matches(&m).unwrap_or_else(|e| exit(e))
}

/// The command line as it parses and as `--help` and the man pages show it: the global
/// options under their own heading in `tope-ota --help`, and in each subcommand's help (and
/// page) folded into one line, so that a technician sees the subcommand's own options first.
/// The globals are still accepted after the subcommand: each subcommand holds a hidden copy
/// (clap propagates a global only where no argument of that id exists). Completions render
/// from [`Cli`] itself, where the globals complete after the subcommand too.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let globals: Vec<clap::Arg> = cmd
        .get_arguments()
        .filter(|a| a.is_global_set())
        .cloned()
        .collect();
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    let shown = ["--json", "-q", "-v", "--state-dir"];
    let template = format!(
        "{{before-help}}{{about-with-newline}}\n{{usage-heading}} {{usage}}\n\n{{all-args}}\n\n\
         {GLOBAL_HEADING}: {} and {} more (`tope-ota --help` lists them){{after-help}}",
        shown.join(", "),
        globals.len() - shown.len()
    );
    names.iter().fold(cmd, |cmd, name| {
        cmd.mut_subcommand(name, |sc| {
            // clap writes `[OPTIONS]` for visible options only: a subcommand without any
            // argument of its own says it too, since it takes the global ones.
            let sc = if sc.get_arguments().next().is_some() {
                sc
            } else {
                sc.override_usage(format!("tope-ota {name} [OPTIONS]"))
            };
            globals
                .iter()
                .fold(sc, |sc, a| sc.arg(a.clone().hide(true)))
                .help_template(template.clone())
        })
    })
}

/// The heading of the options every subcommand takes.
pub const GLOBAL_HEADING: &str = "Global options";

const DOWNLOAD_EXAMPLES: &str = "\
Examples:
  # The package a release announces (all five are needed):
  tope-ota download --version 1.2.0 --url http://updates.example/tope-1.2.0.zip \\
      --name tope-1.2.0.zip --size 73400320 --md5 0123456789abcdef0123456789abcdef
  # The same from device-api's JSON request body, the outcome as JSON:
  tope-ota download --request body.json --json
  # Run again after a cut connection: the partial download is re-hashed and resumed.

More: docs/downloads.md (/usr/share/doc/tope-ota/ on a device)";

const INSTALL_EXAMPLES: &str = "\
Examples:
  tope-ota install                             # the package downloaded last
  tope-ota install --version 1.2.0 --wait 600  # wait up to 10 min for a print to end
  tope-ota install --version 1.1.0 --allow-downgrade
  tope-ota status                              # how it went, and the installed versions

More: docs/versions.md#install (/usr/share/doc/tope-ota/ on a device)";

const ROLLBACK_EXAMPLES: &str = "\
Examples:
  tope-ota rollback                        # back to the previous version
  tope-ota rollback --to factory           # the version the device shipped with
  tope-ota rollback --to 1.1.0 --wait 600  # a named version, once no print runs

More: docs/versions.md#rollback (/usr/share/doc/tope-ota/ on a device)";

/// Over-the-air updater of TOPE devices: download, verify, install and roll back software versions.
#[derive(Debug, Parser)]
#[command(
    name = "tope-ota",
    version,
    max_term_width = 100,
    after_help = "Each subcommand: tope-ota help <COMMAND>, man tope-ota-<COMMAND>. More: README.md \
                  and docs/ (/usr/share/doc/tope-ota/ on a device)"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand takes.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = GLOBAL_HEADING)]
pub struct Global {
    /// Directory of state.json, its lock and downloads/
    #[arg(
        long,
        global = true,
        env = "TOPE_OTA_STATE_DIR",
        value_name = "DIR",
        default_value = "/var/lib/tope-ota"
    )]
    pub state_dir: PathBuf,

    /// Root of the version snapshots and the current/previous/factory symlinks
    #[arg(
        long,
        global = true,
        env = "TOPE_OTA_VERSIONS_DIR",
        value_name = "DIR",
        default_value = "/opt/tope/versions"
    )]
    pub versions_dir: PathBuf,

    /// Where progress callbacks are POSTed; an empty string disables them
    #[arg(
        long,
        global = true,
        env = "TOPE_OTA_REPORT_URL",
        value_name = "URL",
        default_value = "http://127.0.0.1:9080/api/v1.0/ota/report"
    )]
    pub report_url: String,

    /// Service manager command, called as `CMD stop|start|is-active NAME`
    #[arg(
        long,
        global = true,
        env = "TOPE_OTA_SYSTEMCTL",
        value_name = "CMD",
        default_value = "systemctl"
    )]
    pub systemctl: String,

    /// Command that reboots the device
    #[arg(
        long,
        global = true,
        env = "TOPE_OTA_REBOOT_CMD",
        value_name = "CMD",
        default_value = "systemctl reboot"
    )]
    pub reboot_cmd: String,

    /// Progress screen launched during install, when it exists
    #[arg(
        long,
        global = true,
        env = "TOPE_OTA_GUI",
        value_name = "PATH",
        default_value = "/opt/tope/ota-gui"
    )]
    pub gui: PathBuf,

    /// Directory where the printer's software drops a file while it prints: install and
    /// rollback wait until it is empty
    #[arg(
        long,
        global = true,
        env = "TOPE_OTA_INHIBIT_DIR",
        value_name = "DIR",
        default_value = "/run/tope-ota/inhibit.d"
    )]
    pub inhibit_dir: PathBuf,

    /// Trusted minisign public keys (*.pub); with at least one, packages must be signed
    #[arg(
        long,
        global = true,
        env = "TOPE_OTA_KEYS_DIR",
        value_name = "DIR",
        default_value = "/etc/tope-ota/keys.d"
    )]
    pub keys_dir: PathBuf,

    /// Command whose non-zero exit also inhibits install and rollback
    #[arg(long, global = true, env = "TOPE_OTA_INHIBIT_CMD", value_name = "CMD")]
    pub inhibit_cmd: Option<String>,

    /// Device-wide health check, run from the new snapshot after its services started, before
    /// a version is committed: exit 0 means healthy (split on whitespace, no shell)
    #[arg(long, global = true, env = "TOPE_OTA_HEALTH_CMD", value_name = "CMD")]
    pub health_cmd: Option<String>,

    /// Health checks are retried in rounds until one passes or this long has passed (500ms,
    /// 60s, 2min, 1h); a run started before then has its full --health-timeout
    #[arg(
        long,
        global = true,
        env = "TOPE_OTA_HEALTH_DEADLINE",
        value_name = "DURATION",
        default_value = "60s",
        value_parser = duration_setting
    )]
    pub health_deadline: DurationSetting,

    /// Each run of a health check is killed, with its process group, after this long
    #[arg(
        long,
        global = true,
        env = "TOPE_OTA_HEALTH_TIMEOUT",
        value_name = "DURATION",
        default_value = "10s",
        value_parser = duration_setting
    )]
    pub health_timeout: DurationSetting,

    /// Pause between rounds of health checks
    #[arg(
        long,
        global = true,
        env = "TOPE_OTA_HEALTH_INTERVAL",
        value_name = "DURATION",
        default_value = "2s",
        value_parser = duration_setting
    )]
    pub health_interval: DurationSetting,

    /// A package's migrate command is killed, with its process group, after this long
    #[arg(
        long,
        global = true,
        env = "TOPE_OTA_MIGRATE_TIMEOUT",
        value_name = "DURATION",
        default_value = "300s",
        value_parser = duration_setting
    )]
    pub migrate_timeout: DurationSetting,

    /// A writer that finds the lock held by a brief pass (heal with nothing to do, a command
    /// finishing) waits this long for it, then says BUSY; an operation in flight (a download,
    /// an install) is BUSY at once. 0 never waits
    #[arg(
        long,
        global = true,
        env = "TOPE_OTA_LOCK_WAIT",
        value_name = "DURATION",
        default_value = "5s",
        value_parser = duration_setting
    )]
    pub lock_wait: DurationSetting,

    /// Print one JSON object on stdout instead of human text
    #[arg(long, global = true)]
    pub json: bool,

    /// More log output (repeat for debug)
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,

    /// Only errors on stderr, no progress bar
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Download and verify an update package, resuming a partial one
    #[command(after_help = DOWNLOAD_EXAMPLES)]
    Download(DownloadArgs),
    /// Install the downloaded package as a new version snapshot
    #[command(after_help = INSTALL_EXAMPLES)]
    Install(InstallArgs),
    /// Show the operation in flight and the installed versions
    Status,
    /// Switch back to the previous, the factory or a named version
    #[command(after_help = ROLLBACK_EXAMPLES)]
    Rollback(RollbackArgs),
    /// Finish or undo whatever an interruption left (run at boot and by a timer)
    Heal(HealArgs),
    /// Serve the HTTP API of device-api on loopback
    Serve(ServeArgs),
    /// Build an update package (ZIP with manifest.json) from a directory
    Pack(PackArgs),
    /// Make the factory snapshot: a private, read-only copy of current (once per device)
    Factory,
    /// Compare snapshots with what was installed; exit 1 on any difference
    Verify(VerifyArgs),
    /// `self-test`: what an install runs on a package's updater, never a person; parsed apart
    /// (see [`parse`]), so it is in no help, man page or completion.
    #[command(skip)]
    SelfTest(SelfTestArgs),
}

/// `tope-ota self-test [--commit V]` and the global options.
#[derive(Debug, Parser)]
#[command(name = "tope-ota self-test", bin_name = "tope-ota self-test")]
struct SelfTestCli {
    #[command(flatten)]
    global: Global,
    #[command(flatten)]
    args: SelfTestArgs,
}

#[derive(Debug, Clone, Args)]
pub struct SelfTestArgs {
    /// Finish the install of this version in flight: commit its success (the last step of a new
    /// updater's trial)
    #[arg(long, value_name = "V")]
    pub commit: Option<String>,
}

#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["request", "version"])))]
pub struct DownloadArgs {
    /// Version of the package, [0-9A-Za-z._+-]{1,64}
    #[arg(long, value_name = "V", requires_all = ["url", "name", "size", "md5"])]
    pub version: Option<String>,
    /// http(s) URL of the package
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// File name the package is stored under in downloads/
    #[arg(long, value_name = "FILE")]
    pub name: Option<String>,
    /// Size of the package in bytes
    #[arg(long, value_name = "BYTES")]
    pub size: Option<u64>,
    /// MD5 of the package, 32 hex digits
    #[arg(long, value_name = "HEX")]
    pub md5: Option<String>,
    /// SHA-256 of the package, 64 hex digits (optional; checked beside the MD5)
    #[arg(long, value_name = "HEX", conflicts_with = "request")]
    pub sha256: Option<String>,
    /// URL of the package's minisign signature (default: the package URL + .minisig)
    #[arg(long, value_name = "URL", conflicts_with = "request")]
    pub sig_url: Option<String>,
    /// The API's JSON request body, from FILE or `-` for stdin
    #[arg(long, value_name = "FILE|-", conflicts_with_all = ["version", "url", "name", "size", "md5"])]
    pub request: Option<String>,
    /// Download the whole package: no delta from the files of current
    #[arg(long)]
    pub full: bool,
}

#[derive(Debug, Clone, Args)]
pub struct InstallArgs {
    /// Version to install; must be the downloaded one
    #[arg(long, value_name = "V")]
    pub version: Option<String>,
    /// Install even if the version is lower than the current one
    #[arg(long, env = "TOPE_OTA_ALLOW_DOWNGRADE", value_parser = FalseyValueParser::new())]
    pub allow_downgrade: bool,
    /// Wait up to SECS for inhibitors (print jobs) to clear instead of refusing at once
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub wait: u64,
    /// Install the version current already runs again: a fresh snapshot (current mirrored,
    /// every module from the package) under a new dir name. Without it, that install succeeds
    /// with nothing to do
    #[arg(long)]
    pub reinstall: bool,
}

#[derive(Debug, Clone, Args)]
pub struct HealArgs {
    /// Also install a pending package once no print job inhibits it
    #[arg(long, env = "TOPE_OTA_AUTO_INSTALL", value_parser = FalseyValueParser::new())]
    pub auto_install: bool,
}

#[derive(Debug, Clone, Args)]
pub struct RollbackArgs {
    /// Wait up to SECS for inhibitors (print jobs) to clear instead of refusing at once
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub wait: u64,
    /// previous, factory or a version
    #[arg(
        long,
        value_name = "previous|factory|VERSION",
        default_value = "previous"
    )]
    pub to: String,
}

#[derive(Debug, Clone, Args)]
pub struct PackArgs {
    /// Version the package installs
    #[arg(long, value_name = "V")]
    pub version: String,
    /// manifest.json to use (default: DIR/manifest.json, else one module per top-level entry)
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Where to write the package
    #[arg(long, value_name = "PKG.zip")]
    pub out: PathBuf,
    /// Directory whose contents become the package
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// Version or snapshot dir to check (default: current)
    #[arg(value_name = "VERSION", conflicts_with = "all")]
    pub version: Option<String>,
    /// Check every snapshot in the versions root
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on (loopback unless the operator says otherwise)
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:12315")]
    pub listen: String,
    /// Honour `"allow_downgrade": true` in POST /update; without it the field is ignored
    /// (logged) and a lower version is refused with DOWNGRADE_REFUSED
    #[arg(long, env = "TOPE_OTA_API_ALLOW_DOWNGRADE", value_parser = FalseyValueParser::new())]
    pub api_allow_downgrade: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_run_counter_knows_every_subcommand() {
        let mut names: Vec<String> = Cli::command()
            .get_subcommands()
            .map(|s| s.get_name().to_string())
            .collect();
        names.push(crate::dispatch::SELF_TEST.to_string());
        assert_eq!(names, crate::dispatch::SUBCOMMANDS);
    }

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
        command().debug_assert();
    }

    #[test]
    fn durations() {
        let bad = duration_setting("60 seconds").unwrap();
        assert_eq!(bad.or("x", Duration::from_secs(3)), Duration::from_secs(3));
        let good = duration_setting("2s").unwrap();
        assert_eq!(good.or("x", Duration::from_secs(3)), Duration::from_secs(2));
    }

    #[test]
    fn systemd_units_and_a_floor_for_timeouts() {
        assert_eq!(parse_duration("2min"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(24 * 3600)));
        assert_eq!(parse_duration(" 5 min"), Ok(Duration::from_secs(300)));
        for bad in ["25h", "1hour", "h", "min", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        let default = Duration::from_secs(10);
        for zero in ["0", "0s", "0ms", "99ms", "0min", "0h"] {
            let d = duration_setting(zero).unwrap();
            assert_eq!(d.or_at_least("x", default, MIN_TIMEOUT), default, "{zero}");
        }
        for ok in ["100ms", "1s", "2min"] {
            let d = duration_setting(ok).unwrap();
            assert_eq!(
                d.or_at_least("x", default, MIN_TIMEOUT),
                parse_duration(ok).unwrap()
            );
        }
        // A deadline of 0 keeps its meaning (one round): only timeouts have a floor.
        assert_eq!(
            duration_setting("0").unwrap().or("x", default),
            Duration::ZERO
        );
    }
}
