//! The mirror's decisions, sans-I/O: per-partition flow control (credit granted, bytes in
//! transit, credit returned once stored), progress reports, the bandwidth cap's token bucket and
//! the reconnect backoff. Fed with events and `now`; the QUIC drivers do the I/O.

use std::time::{Duration, Instant};

/// A gateway sent more than it was granted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{received} bytes in transit on {topic}/{partition}, over the credit of {window}")]
pub struct CreditExceeded {
    pub topic: String,
    pub partition: i32,
    pub received: u64,
    pub window: u64,
}

/// The cloud's flow control of one partition: it grants `window` bytes, counts what arrives
/// until it is stored in Kafka, and gives that credit back in chunks (not per batch).
#[derive(Debug, Clone)]
pub struct Flow {
    window: u64,
    /// The largest frame: a gateway may overshoot its credit by one batch.
    slack: u64,
    in_transit: u64,
    to_return: u64,
}

impl Flow {
    pub fn new(window: u64, slack: u64) -> Self {
        Self { window, slack, in_transit: 0, to_return: 0 }
    }

    /// The first grant of a new stream.
    pub fn initial_credit(&self) -> u64 {
        self.window
    }

    /// A batch of `len` bytes arrived.
    pub fn on_received(&mut self, topic: &str, partition: i32, len: u64) -> Result<(), CreditExceeded> {
        self.in_transit += len;
        if self.in_transit > self.window + self.slack {
            return Err(CreditExceeded {
                topic: topic.to_string(),
                partition,
                received: self.in_transit,
                window: self.window,
            });
        }
        Ok(())
    }

    /// `len` bytes of received batches are stored in the central cluster.
    pub fn on_stored(&mut self, len: u64) {
        self.in_transit = self.in_transit.saturating_sub(len);
        self.to_return += len;
    }

    /// Enough credit is due to send it without waiting for the next tick.
    pub fn credit_due(&self) -> bool {
        self.to_return >= self.window / 4
    }

    /// Credit to give back now: a quarter of the window at least, or whatever is due when
    /// `flush` (a report tick).
    pub fn take_credit(&mut self, flush: bool) -> Option<u64> {
        if self.to_return > 0 && (flush || self.to_return >= self.window / 4) {
            Some(std::mem::take(&mut self.to_return))
        } else {
            None
        }
    }

    pub fn in_transit(&self) -> u64 {
        self.in_transit
    }
}

/// Progress of one partition into the central cluster, reported to the gateway at most once
/// per interval.
#[derive(Debug, Clone)]
pub struct Progress {
    stored: i64,
    reported: i64,
    interval: Duration,
    last: Option<Instant>,
}

impl Progress {
    /// `start`: where the partition resumes; everything below it is already stored, which is
    /// the first report (a gateway whose marks were behind learns it at once).
    pub fn new(start: i64, interval: Duration) -> Self {
        Self { stored: start, reported: i64::MIN, interval, last: None }
    }

    /// Everything below `next` is stored.
    pub fn on_stored(&mut self, next: i64) {
        self.stored = self.stored.max(next);
    }

    pub fn stored(&self) -> i64 {
        self.stored
    }

    /// The offset to report now, if it moved and the interval has passed.
    pub fn take_report(&mut self, now: Instant) -> Option<i64> {
        if self.stored <= self.reported || self.last.is_some_and(|l| now.duration_since(l) < self.interval) {
            return None;
        }
        self.reported = self.stored;
        self.last = Some(now);
        Some(self.stored)
    }
}

/// Token bucket for the link's bandwidth cap. `rate` 0 = no cap.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// Bytes per second, and the largest burst (at least one read's worth).
    pub fn new(rate: u64, burst: u64, now: Instant) -> Self {
        Self { rate: rate as f64, burst: burst as f64, tokens: burst as f64, last: now }
    }

    /// No cap (rate 0): every take is free.
    pub fn unlimited(&self) -> bool {
        self.rate <= 0.0
    }

    /// Takes `n` bytes; returns how long to wait before sending them (zero: send now). The
    /// bucket may go into debt by one send, so a batch larger than the burst still passes.
    pub fn take(&mut self, n: u64, now: Instant) -> Duration {
        if self.rate <= 0.0 {
            return Duration::ZERO;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Reconnect delays: doubling from `min` to `max`, each with up to 50% random jitter so a fleet
/// of gateways does not reconnect in step after a cloud outage.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { min, max, attempt: 0 }
    }

    /// The next delay; `jitter` in `[0, 1)` (random in production, fixed in tests).
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let base = self.min.saturating_mul(1u32 << self.attempt.min(20)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }

    /// A connection worked: start again from the minimum.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_grants_returns_in_chunks_and_refuses_overshoot() {
        let mut f = Flow::new(1000, 100);
        assert_eq!(f.initial_credit(), 1000);
        f.on_received("t", 0, 600).expect("within credit");
        f.on_received("t", 0, 450).expect("one batch of slack");
        assert!(f.on_received("t", 0, 100).is_err(), "beyond window + slack");
        let mut f = Flow::new(1000, 100);
        f.on_received("t", 0, 200).expect("ok");
        f.on_stored(100);
        assert_eq!(f.take_credit(false), None, "less than a quarter window");
        assert_eq!(f.take_credit(true), Some(100), "flushed on a tick");
        f.on_stored(100);
        f.on_received("t", 0, 300).expect("ok");
        f.on_stored(300);
        assert_eq!(f.take_credit(false), Some(400));
        assert_eq!(f.in_transit(), 0);
    }

    #[test]
    fn progress_is_reported_when_it_moves_at_most_once_per_interval() {
        let t0 = Instant::now();
        let mut p = Progress::new(10, Duration::from_millis(100));
        assert_eq!(p.take_report(t0), Some(10), "the resume point is stored already");
        assert_eq!(p.take_report(t0 + Duration::from_millis(100)), None, "nothing new");
        p.on_stored(15);
        assert_eq!(p.take_report(t0 + Duration::from_millis(200)), Some(15));
        p.on_stored(20);
        assert_eq!(p.take_report(t0 + Duration::from_millis(250)), None);
        assert_eq!(p.take_report(t0 + Duration::from_millis(300)), Some(20));
        p.on_stored(5);
        assert_eq!(p.stored(), 20, "never backwards");
    }

    #[test]
    fn token_bucket_holds_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 500, t0);
        assert_eq!(b.take(500, t0), Duration::ZERO, "the burst");
        assert_eq!(b.take(1000, t0), Duration::from_secs(1), "a second of debt");
        // Over 10 s the bucket lets ~10,000 bytes through.
        let mut now = t0 + Duration::from_secs(1);
        let mut sent = 0;
        while now < t0 + Duration::from_secs(11) {
            now += b.take(100, now);
            sent += 100;
        }
        assert!((9_900..=10_600).contains(&sent), "{sent}");
        assert_eq!(TokenBucket::new(0, 0, t0).take(1 << 30, t0), Duration::ZERO, "no cap");
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_max_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.next_delay(1.0), Duration::from_millis(100));
        assert_eq!(b.next_delay(1.0), Duration::from_millis(200));
        assert_eq!(b.next_delay(0.0), Duration::from_millis(200), "half of 400 with no jitter luck");
        for _ in 0..10 {
            assert!(b.next_delay(1.0) <= Duration::from_secs(1));
        }
        b.reset();
        assert_eq!(b.next_delay(1.0), Duration::from_millis(100));
    }
}
