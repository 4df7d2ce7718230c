//! The link's steady rate, for the delta's decision. Socket buffers, token buckets, cellular
//! links and CDNs deliver a response's first bytes in a burst far above the rate the link keeps
//! up; a rate taken from those bytes is wrong for the rest of the download. A [`RateWindow`]
//! gives a rate only over the last [`WINDOW`] of continuous streaming, and only when both halves
//! of that window agree (within [`AGREE`]): a burst inside the window, or a stall, gives none.
//! The caller keeps the last steady rate it saw and keeps asking: the decision follows the link.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The span a steady rate is measured over: long enough that a few reads of a paced link make
/// it, short enough that a switch after a burst comes a fraction of a second after the burst.
pub const WINDOW: Duration = Duration::from_millis(200);

/// How far apart the rates of the window's two halves may be for the window to be steady.
pub const AGREE: f64 = 2.0;

const GRAIN: Duration = Duration::from_millis(5);

/// Bytes received over time during one continuous stream.
#[derive(Debug, Clone, Default)]
pub struct RateWindow {
    /// (when, bytes received by then), oldest first, covering a little more than the window.
    samples: VecDeque<(Instant, u64)>,
    total: u64,
}

impl RateWindow {
    /// A new stream begins at `now` (a request, or reads again after a pause): bytes buffered
    /// before it belong to no window.
    pub fn restart(&mut self, now: Instant) {
        self.samples.clear();
        self.samples.push_back((now, self.total));
    }

    /// `bytes` more came by `now`.
    pub fn add(&mut self, now: Instant, bytes: u64) {
        if self.samples.is_empty() {
            self.samples.push_back((now, self.total));
        }
        self.total += bytes;
        // Samples closer than GRAIN are one: the window holds a bounded number of them however
        // fast the reads come.
        let n = self.samples.len();
        if n >= 2 && now.duration_since(self.samples[n - 2].0) < GRAIN {
            self.samples[n - 1] = (now, self.total);
        } else {
            self.samples.push_back((now, self.total));
        }
        // Keep one sample at or before the window's start, for the interpolation.
        while self.samples.len() > 2 && now.duration_since(self.samples[1].0) >= WINDOW {
            self.samples.pop_front();
        }
    }

    /// When the last bytes came.
    pub fn last(&self) -> Option<Instant> {
        self.samples.back().map(|s| s.0)
    }

    /// Bytes received by `t`, assuming the bytes between two samples came evenly.
    // A fraction of a u64 difference: it fits (and `as` saturates in any case).
    #[allow(clippy::cast_possible_truncation)]
    fn at(&self, t: Instant) -> u64 {
        let mut prev = self.samples[0];
        for &s in &self.samples {
            if s.0 >= t {
                let span = s.0.duration_since(prev.0).as_secs_f64();
                if span <= 0.0 {
                    return s.1;
                }
                let f = t.duration_since(prev.0).as_secs_f64() / span;
                return prev.1 + ((s.1 - prev.1) as f64 * f) as u64;
            }
            prev = s;
        }
        prev.1
    }

    /// Bytes per second over the last [`WINDOW`] up to the last sample, when the stream has
    /// lasted that long and the window's halves agree; the faster half's rate, so that a
    /// choice made on it errs towards what the link gave.
    pub fn steady(&self) -> Option<f64> {
        let &(first, _) = self.samples.front()?;
        let &(end, total) = self.samples.back()?;
        let start = end.checked_sub(WINDOW)?;
        if first > start {
            return None;
        }
        let mid = start + WINDOW / 2;
        let half = (WINDOW / 2).as_secs_f64();
        let (a, m) = (self.at(start), self.at(mid));
        let r1 = (m - a) as f64 / half;
        let r2 = (total - m) as f64 / half;
        let (lo, hi) = (r1.min(r2), r1.max(r2));
        (lo > 0.0 && hi <= lo * AGREE).then_some(hi)
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    /// `bytes` per `step` from `t` for `n` steps.
    fn feed(w: &mut RateWindow, t: &mut Instant, step: Duration, bytes: u64, n: u32) {
        for _ in 0..n {
            *t += step;
            w.add(*t, bytes);
        }
    }

    #[test]
    fn a_burst_is_no_rate_until_the_window_has_passed_it() {
        let mut t = Instant::now();
        let mut w = RateWindow::default();
        w.restart(t);
        // 1 MiB at once, then 2 MB/s in reads of 20 KB every 10 ms.
        t += Duration::from_millis(2);
        w.add(t, 1 << 20);
        assert_eq!(w.steady(), None);
        let steps = (WINDOW.as_millis() / 10) as u32;
        feed(&mut w, &mut t, Duration::from_millis(10), 20_000, steps - 1);
        assert_eq!(w.steady(), None, "the burst is in the window");
        feed(&mut w, &mut t, Duration::from_millis(10), 20_000, 2);
        let r = w.steady().expect("steady past the burst");
        assert!((r - 2e6).abs() < 0.05e6, "{r}");
    }

    #[test]
    fn a_change_of_rate_is_followed_and_a_stall_is_no_rate() {
        let mut t = Instant::now();
        let mut w = RateWindow::default();
        w.restart(t);
        feed(&mut w, &mut t, Duration::from_millis(10), 10_000, 40);
        assert!((w.steady().unwrap() - 1e6).abs() < 0.05e6);
        feed(&mut w, &mut t, Duration::from_millis(10), 40_000, 40);
        assert!((w.steady().unwrap() - 4e6).abs() < 0.1e6);
        // Nothing for a whole half: not steady.
        t += WINDOW;
        w.add(t, 0);
        assert_eq!(w.steady(), None);
        // A restart forgets what came before it.
        w.restart(t);
        feed(&mut w, &mut t, Duration::from_millis(10), 40_000, 10);
        assert_eq!(w.steady(), None);
    }
}
