//! The mirror's BBR: quinn's BBR controller with its window bounded by 1.5 times the delivery
//! rate this module measures (over round-trip-long intervals) times the minimum round trip.
//!
//! Why: quinn paces every controller at 1.25 x window / smoothed RTT and does not use BBR's own
//! pacing rate, so BBR is held only by its window; quinn's BBR grows that window from per-ACK
//! bandwidth samples, which a lossy path inflates (an ACK that fills a hole acknowledges many
//! packets at once). Measured on a 10 Mbit/s, 100 ms, 1% loss link (`mirror-vs-mm2`): the window
//! grew to 750 KB (six times the path's 125 KB), the bottleneck queue overflowed and 57% of the
//! packets sent were lost, twice the bytes on the wire. Bounded here, the window stays near the
//! path's bandwidth-delay product and loss is the path's own.
//!
//! [`DeliveryRate`] is the measurement, sans-I/O (fed with `now`); [`BoundedBbr`] puts it in
//! front of quinn's controller.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Bbr, BbrConfig, Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

/// The window at most this many hundredths of the measured bandwidth-delay product: the path's
/// pipe and half of it again in the bottleneck's queue. BBR's own gain of 2 filled the shaped
/// link's 100 ms queue (one BDP) and lost 5.6% of packets to tail drop besides the 1% random
/// loss; at 1.5 the link stays as full.
const WINDOW_GAIN_PERCENT: u64 = 150;
/// A measured rate is kept for this many minimum round trips (BBR's bandwidth filter length).
const FILTER_ROUND_TRIPS: u32 = 10;

/// The delivery rate of a path, in bytes per second: bytes acknowledged over intervals at least a
/// minimum round trip long (so one ACK that acknowledges a burst does not count as a rate), the
/// highest of the last one or two filter epochs (each `FILTER_ROUND_TRIPS` round trips).
/// Intervals in which the sender had nothing to send (application-limited) only ever raise it.
#[derive(Debug, Clone, Default)]
pub struct DeliveryRate {
    /// The interval being measured: its start and the bytes acknowledged since.
    interval: Option<(Instant, u64)>,
    app_limited: bool,
    epoch_start: Option<Instant>,
    epoch_max: u64,
    previous_epoch_max: u64,
}

impl DeliveryRate {
    /// `bytes` newly acknowledged at `now`.
    pub fn on_ack(&mut self, now: Instant, bytes: u64, app_limited: bool, min_rtt: Duration) {
        let (start, acked) = self.interval.get_or_insert((now, 0));
        *acked += bytes;
        self.app_limited |= app_limited;
        let elapsed = now.saturating_duration_since(*start);
        if elapsed < min_rtt.max(Duration::from_millis(1)) {
            return;
        }
        let rate = (u128::from(*acked) * 1_000_000 / elapsed.as_micros().max(1)) as u64;
        self.interval = Some((now, 0));
        let app_limited = std::mem::take(&mut self.app_limited);
        let epoch = min_rtt * FILTER_ROUND_TRIPS;
        let epoch_start = *self.epoch_start.get_or_insert(now);
        if now.saturating_duration_since(epoch_start) >= epoch {
            // An epoch with only application-limited intervals measured nothing: the rate
            // before it stands.
            if self.epoch_max > 0 {
                self.previous_epoch_max = self.epoch_max;
            }
            self.epoch_max = 0;
            self.epoch_start = Some(now);
        }
        if !app_limited || rate > self.bytes_per_s() {
            self.epoch_max = self.epoch_max.max(rate);
        }
    }

    /// The rate measured, 0 until the first interval ended.
    pub fn bytes_per_s(&self) -> u64 {
        self.epoch_max.max(self.previous_epoch_max)
    }

    /// `WINDOW_GAIN_PERCENT` of rate x `min_rtt`, not below `floor`; `None` before any
    /// measurement.
    pub fn window_bound(&self, min_rtt: Duration, floor: u64) -> Option<u64> {
        let rate = self.bytes_per_s();
        (rate > 0).then(|| {
            let bdp = (u128::from(rate) * min_rtt.as_micros() / 1_000_000) as u64;
            (bdp.saturating_mul(WINDOW_GAIN_PERCENT) / 100).max(floor)
        })
    }
}

/// quinn's BBR, its window bounded by [`DeliveryRate::window_bound`].
#[derive(Debug, Clone)]
pub struct BoundedBbr {
    inner: Box<Bbr>,
    rate: DeliveryRate,
    min_rtt: Duration,
    initial_window: u64,
}

impl Controller for BoundedBbr {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool, rtt: &RttEstimator) {
        self.min_rtt = rtt.min();
        self.rate.on_ack(now, bytes, app_limited, self.min_rtt);
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool, largest_packet_num_acked: Option<u64>) {
        self.inner.on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(&mut self, now: Instant, sent: Instant, is_persistent_congestion: bool, lost_bytes: u64) {
        self.inner.on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        let inner = self.inner.window();
        self.rate.window_bound(self.min_rtt, self.initial_window).map_or(inner, |bound| inner.min(bound))
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = self.inner.metrics();
        m.congestion_window = self.window();
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.initial_window
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// The initial window, and the least the bound allows: RFC 9002's recommendation (ten 1200-byte
/// datagrams, at least 14,720 bytes). quinn's BBR starts at 200 datagrams (240 KB), which on a
/// fast, short path (loopback: 240 KB in 3 ms) overflows socket buffers at once; from ten, BBR's
/// start-up reaches a 10 Mbit/s x 100 ms path's window in about three round trips.
const INITIAL_WINDOW_BYTES: u64 = 14_720;

/// Builds a [`BoundedBbr`] per connection.
#[derive(Debug, Clone)]
pub struct BoundedBbrConfig {
    bbr: Arc<BbrConfig>,
}

impl Default for BoundedBbrConfig {
    fn default() -> Self {
        let mut bbr = BbrConfig::default();
        bbr.initial_window(INITIAL_WINDOW_BYTES);
        Self { bbr: Arc::new(bbr) }
    }
}

impl ControllerFactory for BoundedBbrConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        let inner = self.bbr.clone().build(now, current_mtu);
        let initial_window = inner.initial_window();
        let inner = inner.into_any().downcast::<Bbr>().unwrap_or_else(|_| unreachable!("BbrConfig builds a Bbr"));
        Box::new(BoundedBbr { inner, rate: DeliveryRate::default(), min_rtt: Duration::MAX, initial_window })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RTT: Duration = Duration::from_millis(100);

    /// A path delivering `rate` bytes/s, acknowledged in `ack_bytes` per ACK, for `for_` from
    /// `start`; returns the time it ended.
    fn deliver(d: &mut DeliveryRate, start: Instant, rate: u64, ack_bytes: u64, for_: Duration, app: bool) -> Instant {
        let step = Duration::from_micros(ack_bytes * 1_000_000 / rate);
        let mut now = start;
        while now < start + for_ {
            now += step;
            d.on_ack(now, ack_bytes, app, RTT);
        }
        now
    }

    #[test]
    fn the_rate_is_measured_over_round_trips_and_bursty_acks_do_not_inflate_it() {
        let mut d = DeliveryRate::default();
        assert_eq!(d.window_bound(RTT, 10_000), None, "nothing measured yet");
        let t = deliver(&mut d, Instant::now(), 1_250_000, 2_400, Duration::from_secs(2), false);
        let rate = d.bytes_per_s();
        assert!((1_200_000..=1_300_000).contains(&rate), "{rate} B/s on a 10 Mbit/s path");
        // 1.5 times the path's bandwidth-delay product (125 KB at 10 Mbit/s and 100 ms).
        let bound = d.window_bound(RTT, 10_000).expect("measured");
        assert!((180_000..=195_000).contains(&bound), "{bound}");
        // A lost ACK, then one ACK for 40 packets at once: per-ACK that is a rate spike; over
        // the round trip it is the same delivery.
        let t = deliver(&mut d, t, 1_250_000, 48_000, Duration::from_secs(2), false);
        assert!(d.bytes_per_s() <= 1_300_000, "{} B/s after bursty ACKs", d.bytes_per_s());
        // The path slows to a fifth: after two filter epochs (20 round trips) the rate follows.
        deliver(&mut d, t, 250_000, 2_400, Duration::from_secs(3), false);
        let slow = d.bytes_per_s();
        assert!((240_000..=260_000).contains(&slow), "{slow} B/s after the path slowed");
    }

    #[test]
    fn application_limited_intervals_do_not_lower_the_rate_and_the_floor_holds() {
        let mut d = DeliveryRate::default();
        let t = deliver(&mut d, Instant::now(), 1_250_000, 2_400, Duration::from_secs(1), false);
        // Nothing to send for a while: slow, application-limited ACKs do not shrink the window.
        deliver(&mut d, t, 10_000, 1_200, Duration::from_secs(5), true);
        assert!(d.bytes_per_s() >= 1_200_000, "{} B/s", d.bytes_per_s());
        let mut small = DeliveryRate::default();
        deliver(&mut small, Instant::now(), 20_000, 1_200, Duration::from_secs(1), false);
        assert_eq!(small.window_bound(RTT, 14_720), Some(14_720), "never below the floor");
    }
}
