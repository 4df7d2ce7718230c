//! `status`: the operation in flight and the installed versions. Takes no lock.

use crate::cli::Global;
use crate::output::Output;
use crate::snapshot;
use crate::state::{self, ProgressData, ReadOutcome};
use anyhow::Result;
use std::fmt::Write;

/// The `data` object of `GET /progress`, read without a lock.
pub fn progress_data(g: &Global) -> Result<ProgressData> {
    Ok(match state::read(&g.state_dir)? {
        ReadOutcome::Ok(s) => s.progress_data(),
        ReadOutcome::Missing => state::State::default().progress_data(),
        ReadOutcome::Corrupt(why) => state::State {
            message: format!("state.json is unreadable ({why}); the next writer resets it"),
            ..Default::default()
        }
        .progress_data(),
    })
}

pub fn run(g: &Global) -> Result<Output> {
    let data = progress_data(g)?;
    let full = match state::read(&g.state_dir)? {
        ReadOutcome::Ok(s) => Some(*s),
        _ => None,
    };
    let links = snapshot::Links::read(&g.versions_dir);
    let dash = |v: Option<&str>| v.unwrap_or("-").to_string();
    let mut human = String::new();
    let _ = writeln!(human, "stage:     {}", data.stage);
    let _ = writeln!(human, "progress:  {}%", data.progress);
    let _ = writeln!(
        human,
        "version:   {}",
        dash(full.as_ref().and_then(|s| s.version.as_deref()))
    );
    if !data.message.is_empty() {
        let _ = writeln!(human, "message:   {}", data.message);
    }
    let _ = writeln!(
        human,
        "error:     {}",
        data.error
            .map(|e| e.to_string())
            .unwrap_or_else(|| "-".into())
    );
    if let Some(s) = &full {
        if let Some(r) = &s.rollback {
            let _ = writeln!(human, "rollback:  {r}");
        }
        if let Some(step) = &s.step {
            let _ = writeln!(human, "step:      {step}");
        }
        if s.bytes_fetched > 0 || s.bytes_reused > 0 {
            let _ = writeln!(
                human,
                "fetched:   {} ({} reused from current)",
                crate::clock::human_bytes(s.bytes_fetched),
                crate::clock::human_bytes(s.bytes_reused)
            );
        }
        if let Some(at) = &s.verified_at {
            let _ = writeln!(human, "verified:  {at}");
        }
        if let Some(at) = &s.updated_at {
            let _ = writeln!(human, "updated:   {at}");
        }
    }
    // The version, and the snapshot dir where its name is not the plain `v<version>`.
    let show = |d: &Option<String>| match d.as_deref() {
        None => "-".to_string(),
        Some(d) => match snapshot::version_of(d) {
            Some(v) if snapshot::dir_name(v) == d => v.to_string(),
            Some(v) => format!("{v} ({d})"),
            None => d.to_string(),
        },
    };
    let _ = writeln!(human, "current:   {}", show(&links.current));
    let _ = writeln!(human, "previous:  {}", show(&links.previous));
    let _ = writeln!(human, "factory:   {}", show(&links.factory));
    let _ = match crate::sign::load_keys(&g.keys_dir) {
        Ok(k) if k.is_empty() => writeln!(
            human,
            "packages:  not authenticated (no keys in {})",
            g.keys_dir.display()
        ),
        Ok(k) => writeln!(
            human,
            "packages:  must be signed by one of {} key(s) in {}",
            k.len(),
            g.keys_dir.display()
        ),
        Err(e) => writeln!(human, "packages:  refused: {}", e.message()),
    };
    for l in crate::dispatch::status_lines(&g.state_dir) {
        let _ = writeln!(human, "{l}");
    }
    Ok(Output {
        human,
        json: serde_json::to_value(&data)?,
        exit: 0,
    })
}
