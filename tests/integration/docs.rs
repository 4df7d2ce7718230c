//! Man pages and shell completions are rendered from the library's clap definition; this test
//! fails when the committed files are stale. `TOPE_OTA_REGEN=1 cargo test --features failpoints
//! --test integration docs` rewrites them.

use clap::CommandFactory;
use std::path::PathBuf;
use tope_ota::cli::Cli;
use tope_ota::error::{
    ErrorCode, EXIT_BUSY, EXIT_FAILED, EXIT_INHIBITED, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM,
    EXIT_USAGE,
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Escape text for roff: backslashes, and a leading dot or quote.
fn esc(s: &str) -> String {
    let s = s.replace('\\', "\\e").replace('-', "\\-");
    if s.starts_with('.') || s.starts_with('\'') {
        format!("\\&{s}")
    } else {
        s
    }
}

fn sections(top: bool) -> String {
    let mut r = String::new();
    r.push_str(".SH \"EXIT STATUS\"\n");
    for (code, what) in [
        (EXIT_OK, "success"),
        (EXIT_FAILED, "the operation failed; its code is in state.json, on stderr and in the \\-\\-json output"),
        (EXIT_USAGE, "usage error: bad flags, or INVALID_REQUEST"),
        (EXIT_BUSY, "BUSY: another tope\\-ota holds the lock"),
        (EXIT_INHIBITED, "INHIBITED: a print job inhibits install or rollback; the package waits, nothing failed"),
        (EXIT_SIGINT, "stopped by SIGINT at a safe point"),
        (EXIT_SIGTERM, "stopped by SIGTERM at a safe point"),
    ] {
        r.push_str(&format!(".TP\n\\fB{code}\\fR\n{what}\n"));
    }
    r.push_str(".SH \"ERROR CODES\"\nThe same string appears in state.json, callbacks, API responses, \\-\\-json output and logs.\n");
    for c in ErrorCode::ALL {
        r.push_str(&format!(
            ".TP\n\\fB{}\\fR (HTTP {}, exit {})\n{}\n",
            esc(c.as_str()),
            c.http_status(),
            c.exit_code(),
            esc(c.summary())
        ));
    }
    r.push_str(".SH ENVIRONMENT\n");
    let cmd = Cli::command();
    for a in cmd.get_arguments() {
        if let Some(env) = a.get_env() {
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            r.push_str(&format!(
                ".TP\n\\fB{}\\fR\nas \\fB\\-\\-{}\\fR: {}\n",
                esc(&env.to_string_lossy()),
                esc(a.get_long().unwrap_or("")),
                esc(&help)
            ));
        }
    }
    for (var, what) in [
        (
            "TOPE_OTA_CONNECT_TIMEOUT_MS",
            "download: connect timeout (15000)",
        ),
        (
            "TOPE_OTA_STALL_TIMEOUT_MS",
            "download: a read that receives nothing this long fails the attempt (30000)",
        ),
        (
            "TOPE_OTA_RETRIES",
            "download: failed attempts without progress before DOWNLOAD_FAILED (6)",
        ),
        (
            "TOPE_OTA_RETRY_DELAY_MS",
            "download: first backoff, doubling up to 60 s (1000)",
        ),
        (
            "TOPE_OTA_STOP_TIMEOUT_MS",
            "bound of each systemctl stop and is\\-active (10000)",
        ),
        (
            "TOPE_OTA_START_TIMEOUT_MS",
            "bound of each systemctl start (30000)",
        ),
        (
            "TOPE_OTA_SETTLE_MS",
            "how long services must stay up before the check (2000)",
        ),
        ("TOPE_OTA_MAX_ENTRIES", "install: most ZIP entries (50000)"),
        (
            "TOPE_OTA_MAX_UNPACKED",
            "install: most unpacked bytes (8 GiB)",
        ),
        (
            "TOPE_OTA_MAX_RATIO",
            "install: largest compression ratio of an entry over 1 MiB (200)",
        ),
    ] {
        r.push_str(&format!(".TP\n\\fB{}\\fR\n{}\n", esc(var), what));
    }
    r.push_str(".SH FILES\n");
    for (f, what) in [
        (
            "/var/lib/tope-ota/state.json",
            "the operation in flight, written atomically and durably",
        ),
        (
            "/var/lib/tope-ota/state.lock",
            "the writers' lock (flock), never renamed; its holder writes what it holds it for (pid, command, activity, long or brief, since)",
        ),
        (
            "/var/lib/tope-ota/callback.lock",
            "held by whoever posts callbacks, so they reach device\\-api in order",
        ),
        (
            "/var/lib/tope-ota/downloads/",
            "partial (.part) and verified packages",
        ),
        (
            "/opt/tope/versions/v<version>/",
            "version snapshots; .tope\\-ota/ inside holds each one's services.json, health.json and files.json",
        ),
        (
            "/opt/tope/versions/current, previous, factory",
            "symlinks selecting snapshots; factory is never changed",
        ),
        (
            "/etc/default/tope-ota",
            "optional TOPE_OTA_* settings for the systemd units",
        ),
    ] {
        r.push_str(&format!(".TP\n\\fI{}\\fR\n{}\n", esc(f), what));
    }
    r.push_str(".SH \"SEE ALSO\"\n");
    let subs: Vec<String> = Cli::command()
        .get_subcommands()
        .map(|s| format!("\\fBtope\\-ota\\-{}\\fR(1)", s.get_name()))
        .collect();
    if top {
        r.push_str(&subs.join(", "));
    } else {
        r.push_str("\\fBtope\\-ota\\fR(1)");
    }
    r.push_str(", \\fBsystemctl\\fR(1)\n");
    r
}

/// A subcommand's page: its own options above, then the global ones folded as in its
/// `--help`, then its examples (the `after_help` of the definition).
fn subcommand_sections(cmd: &clap::Command) -> String {
    let globals: Vec<String> = Cli::command()
        .get_arguments()
        .filter(|a| a.is_global_set())
        .filter_map(|a| a.get_long().map(|l| format!("\\fB\\-\\-{}\\fR", esc(l))))
        .collect();
    let mut r = format!(
        ".SH \"GLOBAL OPTIONS\"\nEvery option of \\fBtope\\-ota\\fR(1) is taken before or after the \
         subcommand: {}.\n",
        globals.join(", ")
    );
    if let Some(after) = cmd.get_after_help() {
        let text = after.to_string();
        let examples = text.strip_prefix("Examples:\n").unwrap_or(&text);
        r.push_str(".SH EXAMPLES\n.nf\n");
        for l in examples.lines() {
            r.push_str(&esc(l));
            r.push('\n');
        }
        r.push_str(".fi\n");
    }
    r
}

fn man(cmd: clap::Command, top: bool) -> String {
    let m = clap_mangen::Man::new(cmd.clone())
        .manual("tope-ota")
        .source(format!("tope-ota {}", env!("CARGO_PKG_VERSION")));
    let mut out = Vec::new();
    m.render_title(&mut out).unwrap();
    m.render_name_section(&mut out).unwrap();
    m.render_synopsis_section(&mut out).unwrap();
    m.render_description_section(&mut out).unwrap();
    m.render_options_section(&mut out).unwrap();
    if cmd.get_subcommands().next().is_some() {
        m.render_subcommands_section(&mut out).unwrap();
    }
    let mut s = String::from_utf8(out).unwrap();
    if !top {
        s.push_str(&subcommand_sections(&cmd));
    }
    s.push_str(&sections(top));
    s
}

fn expected() -> Vec<(PathBuf, String)> {
    let mut cmd = tope_ota::cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut out = vec![(root().join("man/tope-ota.1"), man(cmd.clone(), true))];
    for sub in cmd.get_subcommands() {
        // clap wants 'static names here (without its `string` feature); a test can leak them.
        let name: &'static str = Box::leak(format!("tope-ota-{}", sub.get_name()).into_boxed_str());
        let bin: &'static str = Box::leak(format!("tope-ota {}", sub.get_name()).into_boxed_str());
        let page = sub.clone().name(name).display_name(name).bin_name(bin);
        out.push((root().join(format!("man/{name}.1")), man(page, false)));
    }
    for (shell, file) in [
        (clap_complete::Shell::Bash, "completions/tope-ota.bash"),
        (clap_complete::Shell::Zsh, "completions/_tope-ota"),
        (clap_complete::Shell::Fish, "completions/tope-ota.fish"),
    ] {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "tope-ota", &mut buf);
        out.push((root().join(file), String::from_utf8(buf).unwrap()));
    }
    out
}

#[test]
fn man_pages_and_completions_are_fresh() {
    let regen = std::env::var_os("TOPE_OTA_REGEN").is_some();
    let mut stale = Vec::new();
    for (path, want) in expected() {
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        if have == want {
            continue;
        }
        if regen {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &want).unwrap();
            continue;
        }
        let line = have
            .lines()
            .zip(want.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(have.lines().count().min(want.lines().count()));
        stale.push(format!(
            "{} differs at line {}:\n  committed: {:?}\n  generated: {:?}",
            path.strip_prefix(root()).unwrap().display(),
            line + 1,
            have.lines().nth(line).unwrap_or(""),
            want.lines().nth(line).unwrap_or("")
        ));
    }
    assert!(
        stale.is_empty(),
        "stale generated files; rewrite them with\n  TOPE_OTA_REGEN=1 cargo test --features failpoints --test integration docs\n{}",
        stale.join("\n")
    );
}

#[test]
fn man_pages_render_with_man() {
    // Needs man(1): a missing one fails here rather than skipping the check.
    std::process::Command::new("man")
        .arg("--version")
        .output()
        .expect("man (man-db) is needed: bash tests/setup.sh installs it");
    for entry in std::fs::read_dir(root().join("man")).unwrap() {
        let p = entry.unwrap().path();
        let out = std::process::Command::new("man")
            .arg("-l")
            .arg(&p)
            .env("MANWIDTH", "80")
            .env("MAN_KEEP_FORMATTING", "0")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}: {:?}", p.display(), out);
        // Drop overstrike bold/underline ("X\x08X") that man emits without a terminal.
        let mut text = String::new();
        for c in String::from_utf8_lossy(&out.stdout).chars() {
            if c == '\u{8}' {
                text.pop();
            } else {
                text.push(c);
            }
        }
        assert!(
            text.contains("EXIT STATUS") && text.contains("ERROR CODES"),
            "{}",
            p.display()
        );
    }
}

/// What a technician reads first in a subcommand's help is its own options; the global ones
/// are one line that points at `tope-ota --help`, which lists them under their own heading;
/// download, install and rollback end with examples.
#[test]
fn help_puts_a_subcommands_own_options_first_and_folds_the_global_ones() {
    let env = crate::support::Env::new();
    let help = |args: &[&str]| {
        let out = env.cmd(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let top = help(&["--help"]);
    let heading = top
        .find("\nGlobal options:\n")
        .unwrap_or_else(|| panic!("no heading in:\n{top}"));
    for flag in ["--state-dir <DIR>", "--json", "--lock-wait <DURATION>"] {
        let at = top
            .find(flag)
            .unwrap_or_else(|| panic!("{flag} in:\n{top}"));
        assert!(at > heading, "{flag} is not under the heading:\n{top}");
    }
    for sub in [
        "download", "install", "status", "rollback", "heal", "serve", "pack", "factory", "verify",
    ] {
        let h = help(&[sub, "--help"]);
        assert!(
            !h.contains("--state-dir <DIR>"),
            "{sub}: globals unfolded:\n{h}"
        );
        let folded: Vec<&str> = h
            .lines()
            .filter(|l| l.starts_with("Global options:"))
            .collect();
        assert_eq!(folded.len(), 1, "{sub}:\n{h}");
        assert!(
            folded[0].contains("`tope-ota --help` lists them"),
            "{}",
            folded[0]
        );
        assert!(folded[0].len() <= 100, "{}", folded[0]);
        let own = h
            .find("\nOptions:\n")
            .unwrap_or_else(|| panic!("{sub}:\n{h}"));
        assert!(own < h.find("Global options:").unwrap(), "{sub}:\n{h}");
        let examples = h.find("\nExamples:\n");
        if ["download", "install", "rollback"].contains(&sub) {
            let at = examples.unwrap_or_else(|| panic!("{sub} has no examples:\n{h}"));
            assert!(h[at..].contains(&format!("tope-ota {sub}")), "{sub}:\n{h}");
            assert!(at > h.find("Global options:").unwrap(), "{sub}:\n{h}");
        }
    }
    // Folded is only how help looks: every global is still taken after the subcommand.
    use clap::FromArgMatches;
    let m = tope_ota::cli::command()
        .try_get_matches_from([
            "tope-ota",
            "status",
            "--json",
            "--state-dir",
            "/x",
            "--lock-wait",
            "0",
            "-q",
        ])
        .unwrap();
    let cli = Cli::from_arg_matches(&m).unwrap();
    assert!(cli.global.json && cli.global.quiet);
    assert_eq!(cli.global.state_dir, PathBuf::from("/x"));
    assert_eq!(cli.global.lock_wait.raw, "0");
}
