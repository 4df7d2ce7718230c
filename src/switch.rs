//! Switching a download between whole and delta as the link shows itself (issue 25). A
//! [`Prospect`] is what a delta would save from any byte of the package on, known from the
//! directory and a stat of `current`'s files (no file read); a [`Watcher`] follows the steady
//! rate of a whole download ([`crate::rate`]) and says when a delta would finish the rest
//! sooner, so that the download switches at a durable checkpoint.

use crate::delta::{self, Candidate, LocalFile, Piece};
use crate::rate::RateWindow;
use crate::remote::{Remote, MAX_RANGES_PER_REQUEST};
use crate::zipdir::Directory;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Switches between whole and delta in one run of `download`, at most: a link that keeps
/// changing its mind must not make the download pay a switch's overhead without end.
pub const MAX_SWITCHES: u32 = 3;

/// How much faster the other way must be expected to be to switch to it.
pub const MARGIN: f64 = 1.25;

/// A switch back to whole waits this long before it may switch again.
pub const MIN_BETWEEN: Duration = Duration::from_secs(1);

/// Bytes a multipart answer spends on each part's boundary and headers.
pub const PART_OVERHEAD: u64 = 100;

/// Reused runs shorter than this are fetched (the plan merges ranges closer than 16 KiB).
const MERGE_GAP: u64 = 16 * 1024;

/// Tests only (failpoints builds): the rate the first bytes of a fresh download are taken to
/// have come at (`TOPE_OTA_TEST_PREFIX_RATE`), as a burst that always looks fast, whatever the
/// loaded machine reads them at; the steady rate is still measured.
pub fn pinned_prefix_rate() -> Option<f64> {
    #[cfg(feature = "failpoints")]
    {
        std::env::var("TOPE_OTA_TEST_PREFIX_RATE")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|r| r.is_finite() && *r > 0.0)
    }
    #[cfg(not(feature = "failpoints"))]
    {
        None
    }
}

/// What the decision's tests pin the regeneration rate to (`TOPE_OTA_TEST_DEFLATE_RATE`, file
/// bytes per second, deflate and copies alike), so that no outcome depends on how busy the
/// machine is; never in a device build.
pub fn pinned_regen_rate() -> Option<f64> {
    #[cfg(feature = "failpoints")]
    {
        std::env::var("TOPE_OTA_TEST_DEFLATE_RATE")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|r| *r > 0.0)
    }
    #[cfg(not(feature = "failpoints"))]
    {
        None
    }
}

/// A reused run of the package: its bytes, and the file bytes deflated and copied for it.
#[derive(Debug, Clone, Copy)]
struct Run {
    start: u64,
    end: u64,
    deflated: u64,
    stored: u64,
}

/// What a delta would save from any byte on, and what a switch to one spends first.
#[derive(Debug, Clone)]
pub struct Prospect {
    size: u64,
    runs: Vec<Run>,
    /// Bytes and requests a switch spends before it assembles: the calibration entry (the
    /// directory and manifest are [`Known`]).
    pub overhead: (u64, u64),
    rtt: f64,
    per_request: usize,
    /// A deflated entry's file in `current`, to measure the device's deflate rate on.
    sample: Option<PathBuf>,
    /// The deflate rate, once known (pinned, measured by calibration, or on `sample`).
    pub deflate: Option<f64>,
    /// Made by an assembly that handed over: the watcher waits [`MIN_BETWEEN`] first.
    pub handback: bool,
    /// The package as the delta read it, and the agent it read it over.
    pub known: Option<Known>,
    pub agent: Option<ureq::Agent>,
}

/// A package's directory and candidates as read under its strong ETag: a switch to a delta
/// reads neither again, nor probes (its ranges' If-Match checks the ETag).
#[derive(Debug, Clone)]
pub struct Known {
    pub etag: String,
    pub dir: Directory,
    pub cands: Vec<Candidate>,
    /// What an assembly proved, when one ran.
    pub proven: Option<Proven>,
}

/// An assembly's view of `current` and its calibration: a switch back to a delta in the same
/// run neither reads `current` nor fetches the calibration entry again.
#[derive(Debug, Clone)]
pub struct Proven {
    pub view: HashMap<String, LocalFile>,
    pub opts: delta::PlanOptions,
    pub deflate: Option<f64>,
}

/// Expected seconds and bytes of the rest from some byte on, as a delta and whole.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cost {
    pub delta_s: f64,
    pub whole_s: f64,
    pub delta_bytes: u64,
    pub whole_bytes: u64,
}

impl Prospect {
    /// From the directory and a stat of `current`: every candidate whose file there is a
    /// regular file of the entry's size is taken as reusable (the assembly checks its CRC-32).
    pub fn by_stat(
        dir: &Directory,
        cands: &[Candidate],
        current: &Path,
        remote: &Remote,
    ) -> Prospect {
        let mut view = HashMap::new();
        let mut entries = Vec::new();
        for c in cands {
            let e = &dir.entries[c.entry];
            let same = std::fs::symlink_metadata(current.join(&c.local))
                .is_ok_and(|m| m.is_file() && m.len() == e.uncompressed_size);
            if same && matches!(e.method, 0 | 8) {
                view.insert(
                    c.local.clone(),
                    LocalFile {
                        size: e.uncompressed_size,
                        crc32: e.crc32,
                    },
                );
                let end = dir.extent(c.entry).1;
                // A directory whose sizes overlap the next entry is refused by the plan later;
                // here it just counts for nothing.
                if let Some(start) = end.checked_sub(e.compressed_size) {
                    entries.push((start, end, e.uncompressed_size, e.method));
                }
            }
        }
        entries.sort_unstable();
        let sample = cands
            .iter()
            .filter(|c| view.contains_key(&c.local) && dir.entries[c.entry].method == 8)
            .max_by_key(|c| dir.entries[c.entry].uncompressed_size.min(1 << 20))
            .map(|c| current.join(&c.local));
        let calibration = delta::calibration_entry(dir, cands, &view)
            .map(|i| {
                let (a, b) = dir.extent(i);
                b - a
            })
            .unwrap_or(0);
        let mut p = Prospect::new(remote, entries);
        p.overhead.0 += calibration;
        p.sample = sample;
        p
    }

    /// From an assembly's plan (`cands` its candidates): its reused pieces.
    pub fn of_plan(
        dir: &Directory,
        cands: &[Candidate],
        pieces: &[Piece],
        remote: &Remote,
    ) -> Prospect {
        let entries = pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Reuse { entry, .. } => {
                    let e = &dir.entries[*entry];
                    let (a, b) = p.range();
                    Some((a, b, e.uncompressed_size, e.method))
                }
                _ => None,
            })
            .collect();
        let mut p = Prospect::new(remote, entries);
        p.known = Some(Known {
            etag: remote.etag.clone(),
            dir: dir.clone(),
            cands: cands.to_vec(),
            proven: None,
        });
        p
    }

    fn new(remote: &Remote, entries: Vec<(u64, u64, u64, u16)>) -> Prospect {
        let mut runs: Vec<Run> = Vec::new();
        for (a, b, file, method) in entries {
            let (deflated, stored) = if method == 8 { (file, 0) } else { (0, file) };
            match runs.last_mut() {
                // Only a local header between them: one run (a header is fetched or
                // regenerated, a few dozen bytes either way).
                Some(r) if a >= r.end && a - r.end <= 1024 => {
                    r.end = b;
                    r.deflated += deflated;
                    r.stored += stored;
                }
                _ => runs.push(Run {
                    start: a,
                    end: b,
                    deflated,
                    stored,
                }),
            }
        }
        runs.retain(|r| r.end - r.start >= MERGE_GAP);
        Prospect {
            size: remote.size,
            runs,
            // The switch fetches the calibration entry (added by the caller): the directory
            // and manifest are known.
            overhead: (0, 1),
            rtt: remote.link.rtt().unwrap_or_default().as_secs_f64(),
            per_request: if remote.multi == Some(false) {
                1
            } else {
                MAX_RANGES_PER_REQUEST
            },
            sample: None,
            deflate: pinned_regen_rate(),
            handback: false,
            known: None,
            agent: Some(remote.agent()),
        }
    }

    /// Whether a delta has anything to regenerate from `pos` on.
    pub fn saves_anything(&self, pos: u64) -> bool {
        self.runs.iter().any(|r| r.end > pos)
    }

    /// The rest from `pos` at `link` bytes per second, deflating at `deflate` and copying at
    /// `stored`; `switch`: the delta pays the overhead of a switch (probe, directory, manifest,
    /// calibration) first.
    pub fn cost(&self, pos: u64, link: f64, deflate: f64, stored: f64, switch: bool) -> Cost {
        let rest = self.size.saturating_sub(pos);
        let mut reused = 0u64;
        let mut regen = 0.0;
        let mut ranges = 1u64;
        for r in self.runs.iter().filter(|r| r.end > pos) {
            let from = r.start.max(pos);
            // A run begun is reused in proportion.
            let f = (r.end - from) as f64 / (r.end - r.start) as f64;
            reused += r.end - from;
            regen += f * (r.deflated as f64 / deflate.max(1.0) + r.stored as f64 / stored.max(1.0));
            ranges += 1;
        }
        let (over_bytes, over_requests) = if switch { self.overhead } else { (0, 0) };
        let delta_bytes = rest - reused.min(rest) + ranges * PART_OVERHEAD + over_bytes;
        let requests = over_requests + ranges.div_ceil(self.per_request as u64);
        let link = link.max(1.0);
        Cost {
            delta_s: delta_bytes as f64 / link + requests as f64 * self.rtt + regen,
            whole_s: rest as f64 / link,
            delta_bytes,
            whole_bytes: rest,
        }
    }

    /// The deflate rate: pinned, known, or measured once on one file of `current` (at most
    /// 1 MiB of it read and deflated, about 10–50 ms on a device).
    pub fn deflate_rate(&mut self) -> f64 {
        if let Some(r) = self.deflate {
            return r;
        }
        let measured = self.sample.as_ref().and_then(|p| {
            use std::io::Read;
            let mut buf = Vec::new();
            crate::fsutil::open_regular(p)
                .and_then(|f| f.take(1 << 20).read_to_end(&mut buf))
                .ok()?;
            let t = Instant::now();
            let _ = delta::regenerate_entry(&buf, delta::Method::Deflated);
            Some(buf.len() as f64 / t.elapsed().as_secs_f64().max(1e-6))
        });
        let r = measured.unwrap_or(20e6);
        self.deflate = Some(r);
        r
    }
}

/// The copy rate of stored entries: pinned for the tests, else a guess far below any device's.
pub fn stored_rate() -> f64 {
    pinned_regen_rate().unwrap_or(200e6)
}

/// Follows a whole download's steady rate and says when to switch to a delta.
#[derive(Debug)]
pub struct Watcher {
    prospect: Prospect,
    window: RateWindow,
    pos: u64,
    started: (Instant, u64),
    checked: Option<Instant>,
    not_before: Instant,
    /// Why it switched: for the log, and for the caller to know a stop was a switch.
    pub why: Option<String>,
}

impl Watcher {
    pub fn new(prospect: Prospect) -> Watcher {
        let now = Instant::now();
        let not_before = if prospect.handback {
            now + MIN_BETWEEN
        } else {
            now
        };
        Watcher {
            prospect,
            window: RateWindow::default(),
            pos: 0,
            started: (now, 0),
            checked: None,
            not_before,
            why: None,
        }
    }

    /// A response's body begins at byte `pos`.
    pub fn streaming(&mut self, pos: u64) {
        let now = Instant::now();
        self.window.restart(now);
        self.pos = pos;
        self.started = (now, pos);
    }

    /// The prospect, to go on with after a switch.
    pub fn into_prospect(self) -> Prospect {
        self.prospect
    }

    /// The download has `pos` bytes; true when the rest should come as a delta.
    pub fn received(&mut self, pos: u64) -> bool {
        let now = Instant::now();
        self.window.add(now, pos.saturating_sub(self.pos));
        self.pos = pos;
        if now < self.not_before || self.checked.is_some_and(|t| now - t < CHECK_EVERY) {
            return false;
        }
        self.checked = Some(now);
        let Some(link) = self.window.steady() else {
            return false;
        };
        if !self.prospect.saves_anything(pos) {
            return false;
        }
        // Even regenerating at rates no device reaches (deflate 300 MB/s): no switch, and no
        // file of current read to measure deflate.
        let best = self.prospect.cost(pos, link, 300e6, 3e9, true);
        if best.delta_s * MARGIN >= best.whole_s {
            return false;
        }
        let deflate = self.prospect.deflate_rate();
        let c = self.prospect.cost(pos, link, deflate, stored_rate(), true);
        if c.delta_s * MARGIN >= c.whole_s {
            return false;
        }
        let (t0, p0) = self.started;
        let since = (pos - p0) as f64 / now.duration_since(t0).as_secs_f64().max(1e-6);
        self.why = Some(format!(
            "switching to a delta at {pos} of {} bytes: the link's steady rate is {}/s (this response's average {}/s, its first burst included); deflating {}/s, the rest takes ~{:.2} s as a delta (~{} to fetch with the switch's calibration, if current's files of the entries' sizes hold them), ~{:.2} s whole",
            self.prospect.size,
            crate::clock::human_rate(link),
            crate::clock::human_rate(since),
            crate::clock::human_rate(deflate),
            c.delta_s,
            crate::clock::human_bytes(c.delta_bytes),
            c.whole_s,
        ));
        true
    }
}

/// How often the watcher looks at the rate.
const CHECK_EVERY: Duration = Duration::from_millis(20);

#[cfg(test)]
mod tests {
    use super::*;

    fn prospect(runs: Vec<Run>) -> Prospect {
        Prospect {
            size: 1_000_000,
            runs,
            overhead: (50_000, 2),
            rtt: 0.05,
            per_request: MAX_RANGES_PER_REQUEST,
            sample: None,
            deflate: None,
            handback: false,
            known: None,
            agent: None,
        }
    }

    #[test]
    fn the_cost_counts_what_is_left_and_the_switch() {
        // 800 KB reusable in one run (1.6 MB of files deflated), from 100 KB on.
        let p = prospect(vec![Run {
            start: 100_000,
            end: 900_000,
            deflated: 1_600_000,
            stored: 0,
        }]);
        let c = p.cost(0, 1e6, 16e6, 200e6, false);
        assert_eq!(c.whole_bytes, 1_000_000);
        assert_eq!(c.delta_bytes, 200_000 + 2 * PART_OVERHEAD);
        // 0.2 s of ranges, one request, 0.1 s of deflate.
        assert!((c.delta_s - (0.2002 + 0.05 + 0.1)).abs() < 1e-3, "{c:?}");
        assert!((c.whole_s - 1.0).abs() < 1e-9);
        // Half way into the run: half of it is left to regenerate; a switch pays its overhead.
        let c = p.cost(500_000, 1e6, 16e6, 200e6, true);
        assert_eq!(c.whole_bytes, 500_000);
        assert_eq!(c.delta_bytes, 100_000 + 2 * PART_OVERHEAD + 50_000);
        assert!(
            (c.delta_s - (0.1502 + 3.0 * 0.05 + 0.05)).abs() < 1e-3,
            "{c:?}"
        );
        // Past the run nothing is saved.
        assert!(!p.saves_anything(900_000));
        let c = p.cost(950_000, 1e6, 16e6, 200e6, false);
        assert!(c.delta_bytes >= c.whole_bytes);
    }
}
