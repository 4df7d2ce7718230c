//! tope-ota: the over-the-air updater of TOPE devices.
//!
//! One binary, no daemon: each subcommand takes the state lock, does its work, records every
//! step durably in `state.json` and reports it to device-api. The contract is SPEC.md.
//!
//! # Layout
//! - [`cli`]: the clap definition, the only source of the CLI, man pages and completions.
//! - [`cmd`]: one module per subcommand, over the shared writer `Operation`.
//! - [`operation`]: `Operation`, a writer's lock, state and reporter: the only path that saves state.
//! - [`output`]: what a command prints when it ends without an error.
//! - [`state`]: `state.json`, its stages and fields; the only writer of the file.
//! - [`lock`]: the exclusive flock on `state.lock` that makes a process the one writer.
//! - [`fetch`]: HTTP streaming into a partial with hashing, resume, retries and timeouts.
//! - [`report`]: progress callbacks to device-api, off the operation's path.
//! - [`snapshot`]: version snapshot dirs, the current/previous/factory symlinks, mirroring.
//! - [`integrity`]: each snapshot's record of its files, and what changed since.
//! - [`transition`]: from one snapshot to another once services may be down, with fall-backs.
//! - [`archive`]: safe ZIP unpacking with caps (our own loop, never `extract()`).
//! - [`packer`]: the package format `pack` writes, fixed so that delta can regenerate entries.
//! - [`delta`]: delta downloads: regenerating entries from `current`, planning the ranges.
//! - [`zipdir`]: a ZIP's central directory from byte slices, with caps (for delta downloads).
//! - [`remote`]: byte ranges of a package on a static server (probe, If-Match), for deltas.
//! - [`assemble`]: a delta download assembled in the partial from ranges and `current`.
//! - [`rate`]: the link's steady rate, which a first burst of bytes never sets.
//! - [`switch`]: switching a download between whole and delta as the link shows itself.
//! - [`manifest`]: `manifest.json` parsing and validation.
//! - [`services`]: bounded calls to the service manager (`systemctl`).
//! - [`hooks`]: bounded commands from a snapshot: health checks and migrations.
//! - [`data`]: a version's mutable data, carried privately into the next snapshot.
//! - [`fsutil`]: the only place that fsyncs and renames; temp names; free space.
//! - [`validate`]: request validation (`INVALID_REQUEST`).
//! - [`error`]: the spec's error codes, their exit codes and HTTP statuses.
//! - [`progress`]: the terminal progress bar.
//! - [`logging`]: journal or stderr logging with version and stage on every record.
//! - [`signals`]: SIGTERM/SIGINT as a flag polled at safe points.
//! - [`proc`]: whether another process is alive, and since when.
//! - [`clock`]: RFC 3339 timestamps.
//! - [`sign`]: minisign signatures checked against the keys directory.
//! - [`gui`]: the install's progress screen, started detached, outside the unit's sandbox.
//! - [`inhibit`]: print-job inhibitors checked before install and rollback switch software.
//! - [`updater`]: the tope-ota binary a package can carry, checked to be one this device runs.
//! - [`proven`]: the updaters kept under the state dir: proven, on trial, bad; the run counter.
//! - [`trial`]: a package's updater tried by an install: its self-test, then its own commit.
//! - [`dispatch`]: which updater runs: the `.deb` binary execs the proven one when newer.
//! - [`version`]: this binary's version stamp, and which of two versions is newer.
//! - [`failpoint`]: named crash points, compiled in only for the crash-injection tests.
//! - [`fuzz`]: the fuzz targets, each parser with the property it checks (`fuzz/`).

// Every narrowing cast is looked at: on armhf `usize` is 32 bits, and a size, offset or count
// from a package, a server or state.json must never keep only its low bits.
#![deny(clippy::cast_possible_truncation)]

pub mod archive;
pub mod assemble;
pub mod cli;
pub mod clock;
pub mod cmd;
pub mod data;
pub mod delta;
pub mod dispatch;
pub mod error;
pub mod failpoint;
pub mod fetch;
pub mod fsutil;
pub mod fuzz;
pub mod gui;
pub mod hooks;
pub mod inhibit;
pub mod integrity;
pub mod lock;
pub mod logging;
pub mod manifest;
pub mod operation;
pub mod output;
pub mod packer;
pub mod proc;
pub mod progress;
pub mod proven;
pub mod rate;
pub mod remote;
pub mod report;
pub mod services;
pub mod sign;
pub mod signals;
pub mod snapshot;
pub mod state;
pub mod switch;
pub mod transition;
pub mod trial;
pub mod updater;
pub mod validate;
pub mod version;
pub mod zipdir;

use error::OtaError;
use serde_json::json;
use std::io::Write;

/// Render a failed command: `error: CODE: detail` on stderr, or with `--json` one object on
/// stdout; returns the exit code of the code.
pub fn report_failure(global: &cli::Global, err: &anyhow::Error) -> i32 {
    let e: OtaError = error::classify(err);
    if global.json {
        let data = cmd::status::progress_data(global)
            .ok()
            .and_then(|d| serde_json::to_value(d).ok());
        let out = json!({
            "code": e.code.http_status(),
            "msg": e.message(),
            "error": e.code,
            "data": data,
        });
        let _ = writeln!(std::io::stdout(), "{out}");
    }
    let _ = writeln!(std::io::stderr(), "error: {}", e.message());
    e.code.exit_code()
}
