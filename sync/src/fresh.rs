//! Fresh data first, sans-I/O: while a mirrored topic has a backlog, its fresh tail (records
//! younger than `mirror.fresh_age_ms`) also goes to the remote topic `{site}.{topic}.live`,
//! ahead of the backlog on the link, within `mirror.fresh_share_percent` of the bandwidth cap.
//! This module owns the two decisions, fed with `now`: which batches a partition's live stream
//! sends ([`FreshTail`]), and how the cap is shared between the ordered streams and the live
//! streams ([`LinkShare`]). The gateway's driver (`gateway.rs`) does the reads and the sends.
//!
//! `{site}.{topic}` is untouched: every record, in order, exactly once. The live stream is a
//! preview: it sends the stored batches of the same partition as they are (same source offsets),
//! only batches whose newest record is fresh, only while the ordered stream's next batch is older
//! than the fresh age (a backlog), in increasing offset order, never one the ordered stream has
//! already sent. So a central consumer of both topics sees a fresh record twice at most, once in
//! each, and tells them apart (and which source offsets it has) by the provenance headers.

use std::time::{Duration, Instant};

use crate::core::TokenBucket;

/// The name of a topic's live stream (and, on the receiver, the source part of its remote topic
/// `{site}.{topic}.live`).
pub fn live_topic(topic: &str) -> String {
    format!("{topic}{LIVE_SUFFIX}")
}

/// What a live stream's name adds to its topic's.
pub const LIVE_SUFFIX: &str = ".live";

/// One partition's live stream: where it stands and what it does next.
#[derive(Debug, Clone)]
pub struct FreshTail {
    age_ms: i64,
    /// The next source offset it may send (it never goes back).
    next: i64,
}

/// What the live stream of a partition does now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing to send: no backlog, or nothing fresh above what is sent. Wait for new records or
    /// the next check.
    Idle,
    /// Read batches from this offset and offer each to [`FreshTail::offer`].
    Read { from: i64 },
}

/// What to do with one batch read at the live stream's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it.
    Send,
    /// The live stream fell behind the fresh age (it starts at an old resume point, or records
    /// arrive faster than its share): find the first offset at or after `cutoff_ms` and
    /// [`FreshTail::seek`] there; the batches in between are the backlog's to send.
    Seek { cutoff_ms: i64 },
    /// The ordered stream has sent it meanwhile (or no backlog any more): stop reading.
    Stop,
}

impl FreshTail {
    /// `resume`: where the receiver's copy of the live stream ends (its `Start`).
    pub fn new(age_ms: u64, resume: i64) -> Self {
        Self { age_ms: age_ms.min(i64::MAX as u64) as i64, next: resume }
    }

    pub fn next(&self) -> i64 {
        self.next
    }

    /// Whether the ordered stream is behind by more than the fresh age: it has records left
    /// (`ordered_sent < high_watermark`) and the newest record of the batch it is on
    /// (`ordered_head_ms`: `None` while it knows of none, e.g. it is caught up and waiting) is
    /// older than the age.
    pub fn backlog(&self, ordered_sent: i64, high_watermark: i64, ordered_head_ms: Option<i64>, now_ms: i64) -> bool {
        ordered_sent < high_watermark && ordered_head_ms.is_some_and(|t| t < now_ms.saturating_sub(self.age_ms))
    }

    /// The next step, given the ordered stream's position and head, the partition's high
    /// watermark and `now`.
    pub fn step(&mut self, ordered_sent: i64, high_watermark: i64, ordered_head_ms: Option<i64>, now_ms: i64) -> Step {
        // Never what the ordered stream already sent.
        self.next = self.next.max(ordered_sent);
        if !self.backlog(ordered_sent, high_watermark, ordered_head_ms, now_ms) || self.next >= high_watermark {
            return Step::Idle;
        }
        Step::Read { from: self.next }
    }

    /// A batch `[base, next_offset)` whose newest record is `max_timestamp_ms`, read at the live
    /// stream's position; `ordered_sent` is the ordered stream's position now.
    pub fn offer(
        &mut self,
        base: i64,
        next_offset: i64,
        max_timestamp_ms: i64,
        ordered_sent: i64,
        now_ms: i64,
    ) -> Verdict {
        let cutoff_ms = now_ms.saturating_sub(self.age_ms);
        if next_offset <= self.next.max(ordered_sent) {
            return Verdict::Stop;
        }
        if max_timestamp_ms < cutoff_ms {
            return Verdict::Seek { cutoff_ms };
        }
        debug_assert!(next_offset > base, "a batch holds at least one offset");
        self.next = next_offset;
        Verdict::Send
    }

    /// The first offset at or after the cutoff (`None`: no fresh record at all, so the live
    /// stream goes to `high_watermark`); it never goes back.
    pub fn seek(&mut self, fresh_from: Option<i64>, high_watermark: i64) {
        self.next = self.next.max(fresh_from.unwrap_or(high_watermark));
    }
}

/// Which streams a send belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The ordered streams (`{site}.{topic}`): every record, in order.
    Ordered,
    /// The live streams (`{site}.{topic}.live`) of fresh records during a backlog.
    Live,
}

/// The bandwidth cap shared between the ordered and the live streams. Live sends go first: they
/// never wait behind the ordered streams' sends, only for their own share (`share_percent` of the
/// cap); their bytes are charged to the cap too, so the ordered streams get the cap minus what
/// the live streams used (at least `100 - share_percent`%, and all of it while nothing is
/// fresh). Over any stretch the total stays within the cap (plus one burst). A cap of 0 (none)
/// lets everything through: then the QUIC stream priority (live above ordered) decides on a
/// congested link.
#[derive(Debug, Clone)]
pub struct LinkShare {
    total: TokenBucket,
    live: TokenBucket,
}

impl LinkShare {
    /// `rate`: the cap in bytes per second (0: none); `burst`: the largest burst of the ordered
    /// streams (at least one read's worth); `share_percent`: the live streams' share (1-90).
    pub fn new(rate: u64, burst: u64, share_percent: u8, now: Instant) -> Self {
        let live_rate = rate.saturating_mul(u64::from(share_percent.min(100))) / 100;
        // A live burst of a second at its rate: a batch or two of fresh records go at once.
        let live_burst = if rate == 0 { 0 } else { live_rate.max(1) };
        Self { total: TokenBucket::new(rate, burst, now), live: TokenBucket::new(live_rate.max(1), live_burst, now) }
    }

    /// Takes `n` bytes for a send of `class`; how long to wait before sending them.
    pub fn take(&mut self, class: Class, n: u64, now: Instant) -> Duration {
        match class {
            Class::Ordered => self.total.take(n, now),
            Class::Live => {
                if self.total.unlimited() {
                    return Duration::ZERO;
                }
                // Charged to the cap (the ordered streams wait for it), never waiting for it.
                self.total.take(n, now);
                self.live.take(n, now)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGE: u64 = 5_000;
    const NOW: i64 = 1_700_000_000_000;

    #[test]
    fn no_backlog_no_live_stream() {
        let mut t = FreshTail::new(AGE, 0);
        // Caught up: the ordered stream sent everything.
        assert_eq!(t.step(100, 100, None, NOW), Step::Idle);
        // A new batch arrived; the ordered stream is on it (fresh) or has not read it yet.
        assert_eq!(t.step(100, 110, Some(NOW - 10), NOW), Step::Idle);
        assert_eq!(t.step(100, 110, None, NOW), Step::Idle);
        // Behind, but by less than the age: the ordered stream delivers it in time.
        assert_eq!(t.step(50, 110, Some(NOW - 4_999), NOW), Step::Idle);
        assert_eq!(t.next(), 100, "never below what the ordered stream sent");
    }

    #[test]
    fn a_backlog_starts_the_live_stream_at_the_fresh_cutoff_and_it_follows_the_tail() {
        let mut t = FreshTail::new(AGE, 0);
        // An hour of backlog: the ordered stream is on a batch an hour old.
        let head = Some(NOW - 3_600_000);
        assert_eq!(t.step(10, 1_000, head, NOW), Step::Read { from: 10 });
        // The batch at its old resume point is stale: seek to the cutoff.
        assert_eq!(t.offer(10, 20, NOW - 3_599_000, 10, NOW), Verdict::Seek { cutoff_ms: NOW - 5_000 });
        t.seek(Some(990), 1_000);
        assert_eq!(t.step(10, 1_000, head, NOW), Step::Read { from: 990 });
        assert_eq!(t.offer(990, 1_000, NOW - 100, 10, NOW), Verdict::Send);
        assert_eq!(t.step(12, 1_000, head, NOW), Step::Idle, "all fresh records sent");
        // New records arrive: the live stream sends them as they come.
        assert_eq!(t.step(12, 1_005, head, NOW + 100), Step::Read { from: 1_000 });
        assert_eq!(t.offer(1_000, 1_005, NOW + 100, 12, NOW + 100), Verdict::Send);
        assert_eq!(t.next(), 1_005);
    }

    #[test]
    fn the_live_stream_never_goes_back_and_stops_where_the_ordered_stream_is() {
        let mut t = FreshTail::new(AGE, 500);
        let head = Some(NOW - 60_000);
        // A seek never moves it back (its resume point is above the cutoff's offset).
        t.seek(Some(400), 1_000);
        assert_eq!(t.next(), 500);
        // Nothing fresh at all: to the high watermark.
        t.seek(None, 1_000);
        assert_eq!(t.next(), 1_000);
        assert_eq!(t.step(10, 1_000, head, NOW), Step::Idle);
        // The ordered stream passed the live stream's position: the live one jumps with it, and
        // a batch the ordered one sent meanwhile is not sent again.
        let mut t = FreshTail::new(AGE, 500);
        assert_eq!(t.step(700, 1_000, head, NOW), Step::Read { from: 700 });
        assert_eq!(t.offer(690, 700, NOW, 700, NOW), Verdict::Stop);
        assert_eq!(t.offer(700, 710, NOW, 710, NOW), Verdict::Stop, "sent by the ordered stream meanwhile");
        assert_eq!(t.offer(700, 710, NOW, 705, NOW), Verdict::Send, "partly sent: the rest is fresh");
        // The backlog is gone: idle again.
        assert_eq!(t.step(1_000, 1_000, None, NOW), Step::Idle);
    }

    #[test]
    fn a_live_stream_that_falls_behind_the_age_skips_to_the_cutoff() {
        let mut t = FreshTail::new(AGE, 0);
        t.seek(Some(100), 2_000);
        assert_eq!(t.offer(100, 110, NOW - 4_000, 0, NOW), Verdict::Send);
        // Its share is too small for the arrivals: 6 s later its next batch is 7 s old.
        let later = NOW + 6_000;
        assert_eq!(t.offer(110, 120, NOW - 1_000, 0, later), Verdict::Seek { cutoff_ms: later - 5_000 });
        t.seek(Some(1_500), 2_000);
        assert_eq!(t.step(0, 2_000, Some(NOW - 60_000), later), Step::Read { from: 1_500 });
    }

    /// Both classes busy for 100 s under a cap of 10,000 B/s with a 30% live share: the live
    /// streams get their share, the ordered streams the rest, the total the cap.
    #[test]
    fn the_cap_is_shared_live_first_within_its_share_and_the_ordered_streams_get_the_rest() {
        let t0 = Instant::now();
        let mut s = LinkShare::new(10_000, 10_000, 30, t0);
        let (mut ordered_at, mut live_at) = (t0, t0);
        let (mut ordered, mut live) = (0u64, 0u64);
        let end = t0 + Duration::from_secs(100);
        // Two senders, each sending 500-byte batches as soon as the share lets it.
        while ordered_at < end || live_at < end {
            if live_at <= ordered_at {
                live_at += s.take(Class::Live, 500, live_at);
                if live_at < end {
                    live += 500;
                }
                live_at += Duration::from_millis(1);
            } else {
                ordered_at += s.take(Class::Ordered, 500, ordered_at);
                if ordered_at < end {
                    ordered += 500;
                }
                ordered_at += Duration::from_millis(1);
            }
        }
        let (live_rate, ordered_rate) = (live as f64 / 100.0, ordered as f64 / 100.0);
        assert!((2_900.0..=3_200.0).contains(&live_rate), "live {live_rate} B/s: its 30%");
        assert!((6_600.0..=7_300.0).contains(&ordered_rate), "ordered {ordered_rate} B/s: the rest");
        assert!(live_rate + ordered_rate <= 10_000.0 * 1.02 + 200.0, "total within the cap");
    }

    #[test]
    fn live_sends_never_wait_behind_the_ordered_streams_and_an_idle_live_class_costs_nothing() {
        let t0 = Instant::now();
        let mut s = LinkShare::new(10_000, 10_000, 50, t0);
        // The ordered streams took a read's worth and then some: the cap is 2 s in debt.
        assert_eq!(s.take(Class::Ordered, 10_000, t0), Duration::ZERO, "the burst");
        assert_eq!(s.take(Class::Ordered, 20_000, t0), Duration::from_secs(2));
        // A fresh batch goes now, within its own share.
        assert_eq!(s.take(Class::Live, 1_000, t0), Duration::ZERO);
        // ...and the ordered streams wait for its bytes as well.
        assert_eq!(s.take(Class::Ordered, 0, t0), Duration::from_millis(2_100));
        // Only the ordered class sending: the whole cap is theirs.
        let mut s = LinkShare::new(10_000, 10_000, 50, t0);
        let mut at = t0 + Duration::from_secs(1);
        let mut sent = 0;
        while at < t0 + Duration::from_secs(21) {
            at += s.take(Class::Ordered, 1_000, at);
            sent += 1_000;
        }
        assert!((199_000..=212_000).contains(&sent), "{sent} in 20 s: the whole cap");
        // No cap: nobody waits.
        let mut s = LinkShare::new(0, 0, 50, t0);
        assert_eq!(s.take(Class::Live, 1 << 30, t0), Duration::ZERO);
        assert_eq!(s.take(Class::Ordered, 1 << 30, t0), Duration::ZERO);
    }

    #[test]
    fn a_live_class_over_its_share_waits_for_it() {
        let t0 = Instant::now();
        let mut s = LinkShare::new(10_000, 10_000, 20, t0);
        // Its burst is a second of its rate (2,000 B); beyond that it waits at 2,000 B/s.
        assert_eq!(s.take(Class::Live, 2_000, t0), Duration::ZERO);
        assert_eq!(s.take(Class::Live, 2_000, t0), Duration::from_secs(1));
    }
}
