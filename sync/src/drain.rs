//! The mirror's drain estimate, without I/O: samples of a backlog (records and bytes not yet in
//! the central cluster, and records mirrored so far) over a sliding window give the rate records
//! leave, the rate the backlog shrinks at, and the time until it is gone.
//!
//! The ETA divides the backlog by the rate it *shrinks* at (records sent minus records arriving,
//! both over the window), not by the send rate: a link that sends 1,000 records/s while 900 arrive
//! drains a 10,000-record backlog in 100 s, not 10. A backlog that does not shrink over the window
//! (link down, or arrivals as fast as sending) has no ETA.

use std::collections::VecDeque;
use std::time::Duration;

/// Samples kept per window: the sample interval is the window divided by this (bounded below by
/// [`SAMPLE_INTERVAL_MIN`] and above by [`SAMPLE_INTERVAL_MAX`]).
pub const SAMPLES_PER_WINDOW: u64 = 30;
pub const SAMPLE_INTERVAL_MIN: Duration = Duration::from_millis(100);
pub const SAMPLE_INTERVAL_MAX: Duration = Duration::from_secs(2);

/// How often to sample for a window of `window_ms`.
pub fn sample_interval(window_ms: u64) -> Duration {
    Duration::from_millis(window_ms / SAMPLES_PER_WINDOW).clamp(SAMPLE_INTERVAL_MIN, SAMPLE_INTERVAL_MAX)
}

/// One observation of a backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub at_ms: u64,
    pub backlog_records: u64,
    pub backlog_bytes: u64,
    /// Records below the mirrored marks, summed (only grows, except when retention moves a
    /// partition's start past its mark: that jump is not counted as sent).
    pub mirrored_records: u64,
}

/// What the window says.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DrainEstimate {
    pub backlog_records: u64,
    pub backlog_bytes: u64,
    /// Records mirrored per second over the window.
    pub sent_records_per_s: f64,
    /// Records per second the backlog shrank by over the window (negative: it grew).
    pub shrink_records_per_s: f64,
    /// Seconds until the backlog is gone at the shrink rate: `Some(0.0)` with no backlog, `None`
    /// when it does not shrink (or the window holds a single sample).
    pub eta_s: Option<f64>,
}

/// A sliding window of samples of one backlog (a topic's, or all topics').
#[derive(Debug, Clone)]
pub struct DrainWindow {
    window_ms: u64,
    samples: VecDeque<Sample>,
}

impl DrainWindow {
    pub fn new(window_ms: u64) -> Self {
        Self { window_ms, samples: VecDeque::new() }
    }

    /// Most samples held: a window's worth at the shortest interval, plus the one at its edge.
    fn samples_max(&self) -> usize {
        (self.window_ms / SAMPLE_INTERVAL_MIN.as_millis() as u64) as usize + 2
    }

    /// Adds `s` (samples must come in time order; one older than the newest is ignored) and drops
    /// those that left the window, keeping the newest sample at or before the window's start so
    /// the window spans all of `window_ms` once it can.
    pub fn observe(&mut self, s: Sample) {
        if self.samples.back().is_some_and(|last| s.at_ms < last.at_ms) {
            return;
        }
        self.samples.push_back(s);
        let start = s.at_ms.saturating_sub(self.window_ms);
        while self.samples.len() >= 2 && self.samples[1].at_ms <= start {
            self.samples.pop_front();
        }
        while self.samples.len() > self.samples_max() {
            self.samples.pop_front();
        }
        debug_assert!(self.samples.len() <= self.samples_max());
    }

    pub fn estimate(&self) -> DrainEstimate {
        let Some(last) = self.samples.back() else { return DrainEstimate::default() };
        let mut e = DrainEstimate {
            backlog_records: last.backlog_records,
            backlog_bytes: last.backlog_bytes,
            eta_s: (last.backlog_records == 0).then_some(0.0),
            ..DrainEstimate::default()
        };
        let Some(first) = self.samples.front() else { return e };
        let span_s = last.at_ms.saturating_sub(first.at_ms) as f64 / 1000.0;
        if span_s <= 0.0 {
            return e;
        }
        e.sent_records_per_s = last.mirrored_records.saturating_sub(first.mirrored_records) as f64 / span_s;
        e.shrink_records_per_s = (first.backlog_records as f64 - last.backlog_records as f64) / span_s;
        if last.backlog_records > 0 && e.shrink_records_per_s > 0.0 {
            e.eta_s = Some(last.backlog_records as f64 / e.shrink_records_per_s);
        }
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(at_ms: u64, backlog_records: u64, mirrored_records: u64) -> Sample {
        Sample { at_ms, backlog_records, backlog_bytes: backlog_records * 100, mirrored_records }
    }

    #[test]
    fn the_eta_divides_the_backlog_by_the_rate_it_shrinks_at_not_the_send_rate() {
        let mut w = DrainWindow::new(10_000);
        // 1,000 records/s sent while 900/s arrive: the backlog shrinks by 100/s.
        for i in 0..=10u64 {
            w.observe(s(i * 1000, 10_000 - i * 100, i * 1000));
        }
        let e = w.estimate();
        assert_eq!(e.backlog_records, 9_000);
        assert_eq!(e.backlog_bytes, 900_000);
        assert!((e.sent_records_per_s - 1000.0).abs() < 1e-9, "{e:?}");
        assert!((e.shrink_records_per_s - 100.0).abs() < 1e-9, "{e:?}");
        assert_eq!(e.eta_s, Some(90.0));
    }

    #[test]
    fn a_backlog_that_does_not_shrink_has_no_eta_and_none_has_eta_zero() {
        let mut w = DrainWindow::new(5_000);
        assert_eq!(w.estimate().eta_s, None, "no sample");
        w.observe(s(0, 500, 0));
        assert_eq!(w.estimate().eta_s, None, "one sample says nothing of a rate");
        w.observe(s(1000, 500, 0));
        assert_eq!(w.estimate().eta_s, None, "link down: not shrinking");
        w.observe(s(2000, 700, 0));
        let e = w.estimate();
        assert_eq!(e.eta_s, None, "growing");
        assert!(e.shrink_records_per_s < 0.0);
        w.observe(s(3000, 0, 700));
        assert_eq!(w.estimate().eta_s, Some(0.0), "drained");
    }

    #[test]
    fn old_samples_leave_the_window_so_the_rate_follows_the_link() {
        let mut w = DrainWindow::new(2_000);
        // A fast burst first (1,000/s), then 100/s for longer than the window.
        for i in 0..=2u64 {
            w.observe(s(i * 1000, 20_000 - i * 1000, i * 1000));
        }
        for i in 3..=10u64 {
            w.observe(s(i * 1000, 18_000 - (i - 2) * 100, 2000 + (i - 2) * 100));
        }
        let e = w.estimate();
        assert!((e.shrink_records_per_s - 100.0).abs() < 1e-9, "only the last 2 s count: {e:?}");
        assert_eq!(e.eta_s, Some(e.backlog_records as f64 / 100.0));
        assert!(w.samples.len() <= 3, "{} samples kept for a 2 s window at 1 s", w.samples.len());
    }

    #[test]
    fn samples_are_bounded_and_out_of_order_ones_ignored() {
        let mut w = DrainWindow::new(1_000);
        for i in 0..10_000u64 {
            w.observe(s(i, 1_000_000 - i, i));
        }
        assert!(w.samples.len() <= w.samples_max(), "{}", w.samples.len());
        let before = w.estimate();
        w.observe(s(5, 0, 0));
        assert_eq!(w.estimate(), before, "a sample from the past changes nothing");
        assert_eq!(sample_interval(60_000), Duration::from_secs(2));
        assert_eq!(sample_interval(1_000), SAMPLE_INTERVAL_MIN);
    }
}
