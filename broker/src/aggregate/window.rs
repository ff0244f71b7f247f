//! Per-key tumbling windows on event time, without I/O: readings (key, event time, values) in,
//! closed windows out once the stream time (the largest event time seen) passes a window's end
//! plus the allowed lateness. Also the window's durable encoding and the record of what changed
//! since the last checkpoint, so the driver can store exactly the windows it must.

use std::collections::{BTreeMap, BTreeSet};

/// Event times (ms since the epoch) the windows accept: far enough from `i64`'s ends that no
/// window boundary or lateness sum overflows.
pub const EVENT_TIME_ABS_MAX: i64 = 1 << 60;

/// The windows' shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSpec {
    /// Window length; windows are `[k * size_ms, (k + 1) * size_ms)`, aligned to the epoch.
    pub size_ms: i64,
    /// How long after its end a window still takes records (by stream time).
    pub lateness_ms: i64,
}

impl WindowSpec {
    /// Start of the window holding `event_ms`.
    pub fn start_of(&self, event_ms: i64) -> i64 {
        event_ms.div_euclid(self.size_ms) * self.size_ms
    }
}

/// One field's aggregate in a window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FieldAgg {
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    /// The value with the largest event time (of equal times, the one that arrived last).
    pub last: f64,
    pub last_ms: i64,
}

impl FieldAgg {
    fn first(v: f64, at_ms: i64) -> Self {
        Self { min: v, max: v, sum: v, last: v, last_ms: at_ms }
    }

    fn add(&mut self, v: f64, at_ms: i64) {
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.sum += v;
        if at_ms >= self.last_ms {
            self.last = v;
            self.last_ms = at_ms;
        }
    }
}

/// An open window's state.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowState {
    pub count: u64,
    /// One per configured field, in the configured order.
    pub fields: Vec<FieldAgg>,
}

/// A closed window: its key, bounds and aggregates (mean = sum / count).
#[derive(Debug, Clone, PartialEq)]
pub struct Closed {
    pub key: Vec<u8>,
    pub start_ms: i64,
    pub end_ms: i64,
    pub state: WindowState,
}

/// What became of one reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Added to its window (opened if new).
    Added,
    /// Its window had closed already (end + lateness <= stream time): dropped.
    Late,
    /// Its window was not open and `windows_open_max` windows are: dropped.
    Full,
    /// An event time outside +-`EVENT_TIME_ABS_MAX`, or a value count unlike the fields': dropped.
    Invalid,
}

/// The open windows of one aggregate, in memory, at most `windows_open_max` of them.
#[derive(Debug)]
pub struct Windows {
    spec: WindowSpec,
    fields: usize,
    windows_open_max: usize,
    /// (window start, key) -> state; ordered by start so the oldest close first.
    open: BTreeMap<(i64, Vec<u8>), WindowState>,
    /// The largest event time seen (`None`: no reading yet).
    stream_ms: Option<i64>,
    /// Windows changed or closed since the last `take_changes`.
    dirty: BTreeSet<(i64, Vec<u8>)>,
}

impl Windows {
    pub fn new(spec: WindowSpec, fields: usize, windows_open_max: usize) -> Self {
        assert!(spec.size_ms > 0 && spec.lateness_ms >= 0, "window spec validated by the config");
        Self { spec, fields, windows_open_max, open: BTreeMap::new(), stream_ms: None, dirty: BTreeSet::new() }
    }

    pub fn spec(&self) -> WindowSpec {
        self.spec
    }

    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    pub fn stream_ms(&self) -> Option<i64> {
        self.stream_ms
    }

    /// Restores a stored window (at start-up). Windows beyond `windows_open_max` (a lowered
    /// limit) are kept: dropping one would lose its result; new ones wait until they close.
    pub fn restore(&mut self, start_ms: i64, key: Vec<u8>, state: WindowState) {
        assert_eq!(state.fields.len(), self.fields, "stored window decoded with the configured fields");
        self.open.insert((start_ms, key), state);
    }

    pub fn restore_stream_time(&mut self, stream_ms: Option<i64>) {
        self.stream_ms = stream_ms;
    }

    /// Whether the window starting at `start_ms` is closed at stream time `stream_ms`.
    fn closed_at(&self, start_ms: i64, stream_ms: Option<i64>) -> bool {
        stream_ms.is_some_and(|s| start_ms + self.spec.size_ms + self.spec.lateness_ms <= s)
    }

    /// Feeds one reading: `values` holds one value per field.
    pub fn offer(&mut self, key: &[u8], event_ms: i64, values: &[f64]) -> Offer {
        if !(-EVENT_TIME_ABS_MAX..=EVENT_TIME_ABS_MAX).contains(&event_ms) || values.len() != self.fields {
            return Offer::Invalid;
        }
        let stream = Some(self.stream_ms.map_or(event_ms, |s| s.max(event_ms)));
        let start = self.spec.start_of(event_ms);
        if self.closed_at(start, stream) {
            // Not reached by the reading that moved stream time (its own window ends after it),
            // so stream time only moves with readings that count.
            return Offer::Late;
        }
        let slot = (start, key.to_vec());
        if let Some(w) = self.open.get_mut(&slot) {
            w.count += 1;
            for (f, &v) in w.fields.iter_mut().zip(values) {
                f.add(v, event_ms);
            }
        } else {
            if self.open.len() >= self.windows_open_max {
                return Offer::Full;
            }
            let fields = values.iter().map(|&v| FieldAgg::first(v, event_ms)).collect();
            self.open.insert(slot.clone(), WindowState { count: 1, fields });
        }
        self.stream_ms = stream;
        self.dirty.insert(slot);
        Offer::Added
    }

    /// Removes and returns up to `max` windows closed at the current stream time, oldest first
    /// (by start, then key).
    pub fn take_closed(&mut self, max: usize) -> Vec<Closed> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(((start, _), _)) = self.open.first_key_value() else { break };
            if !self.closed_at(*start, self.stream_ms) {
                break;
            }
            let Some(((start_ms, key), state)) = self.open.pop_first() else { break };
            self.dirty.insert((start_ms, key.clone()));
            out.push(Closed { key, start_ms, end_ms: start_ms + self.spec.size_ms, state });
        }
        out
    }

    /// Windows changed since the last call: `Some(state)` for open ones, `None` for closed
    /// ones (their stored copies are to be removed).
    pub fn take_changes(&mut self) -> Vec<(i64, Vec<u8>, Option<WindowState>)> {
        std::mem::take(&mut self.dirty)
            .into_iter()
            .map(|slot| {
                let state = self.open.get(&slot).cloned();
                (slot.0, slot.1, state)
            })
            .collect()
    }
}

/// Bytes of one field in a stored window: min, max, sum, last (f64) and last's event time.
const FIELD_BYTES: usize = 40;

impl WindowState {
    /// The stored form: count (u64) then each field, big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + FIELD_BYTES * self.fields.len());
        out.extend_from_slice(&self.count.to_be_bytes());
        for f in &self.fields {
            for v in [f.min, f.max, f.sum, f.last] {
                out.extend_from_slice(&v.to_bits().to_be_bytes());
            }
            out.extend_from_slice(&f.last_ms.to_be_bytes());
        }
        out
    }

    /// Decodes a stored window of `fields` fields (`None`: another length).
    pub fn decode(bytes: &[u8], fields: usize) -> Option<Self> {
        if bytes.len() != 8 + FIELD_BYTES * fields {
            return None;
        }
        let word = |i: usize| -> [u8; 8] {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[i..i + 8]);
            w
        };
        let count = u64::from_be_bytes(word(0));
        let fields = (0..fields)
            .map(|i| {
                let at = 8 + i * FIELD_BYTES;
                let f = |j: usize| f64::from_bits(u64::from_be_bytes(word(at + 8 * j)));
                FieldAgg { min: f(0), max: f(1), sum: f(2), last: f(3), last_ms: i64::from_be_bytes(word(at + 32)) }
            })
            .collect();
        Some(Self { count, fields })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn windows(size: i64, lateness: i64, max: usize) -> Windows {
        Windows::new(WindowSpec { size_ms: size, lateness_ms: lateness }, 2, max)
    }

    #[test]
    fn windows_are_aligned_to_the_epoch_and_half_open() {
        let spec = WindowSpec { size_ms: 1000, lateness_ms: 0 };
        assert_eq!(spec.start_of(0), 0);
        assert_eq!(spec.start_of(999), 0);
        assert_eq!(spec.start_of(1000), 1000);
        assert_eq!(spec.start_of(-1), -1000, "before the epoch too");
        let mut w = windows(1000, 0, 10);
        assert_eq!(w.offer(b"a", 999, &[1.0, 1.0]), Offer::Added);
        assert!(w.take_closed(10).is_empty(), "stream time 999 < end 1000");
        assert_eq!(w.offer(b"a", 1000, &[2.0, 2.0]), Offer::Added);
        let closed = w.take_closed(10);
        assert_eq!(closed.len(), 1);
        assert_eq!((closed[0].start_ms, closed[0].end_ms, closed[0].state.count), (0, 1000, 1));
        assert_eq!(w.open_count(), 1, "the reading at 1000 opened the next window");
    }

    #[test]
    fn min_max_sum_and_last_by_event_time() {
        let mut w = windows(1000, 0, 10);
        for (t, v) in [(100, 5.0), (300, -2.0), (200, 9.0), (300, 4.0)] {
            assert_eq!(w.offer(b"k", t, &[v, v * 10.0]), Offer::Added);
        }
        w.offer(b"other", 5000, &[0.0, 0.0]);
        let closed = w.take_closed(10);
        assert_eq!(closed.len(), 1);
        let s = &closed[0].state;
        assert_eq!(s.count, 4);
        let f = s.fields[0];
        assert_eq!((f.min, f.max, f.sum), (-2.0, 9.0, 16.0));
        assert_eq!((f.last, f.last_ms), (4.0, 300), "latest event time; of equal times the later arrival");
        assert_eq!(s.fields[1].last, 40.0);
        assert_eq!(s.fields[1].sum, 160.0);
    }

    #[test]
    fn lateness_keeps_a_window_open_then_late_readings_are_dropped() {
        let mut w = windows(1000, 500, 10);
        assert_eq!(w.offer(b"k", 100, &[1.0, 1.0]), Offer::Added);
        assert_eq!(w.offer(b"k", 1400, &[1.0, 1.0]), Offer::Added);
        assert!(w.take_closed(10).is_empty(), "1400 < end 1000 + lateness 500");
        assert_eq!(w.offer(b"k", 900, &[7.0, 7.0]), Offer::Added, "late but within the lateness");
        assert_eq!(w.offer(b"k", 1500, &[1.0, 1.0]), Offer::Added);
        let closed = w.take_closed(10);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].state.count, 2);
        assert_eq!(closed[0].state.fields[0].max, 7.0);
        assert_eq!(w.offer(b"k", 999, &[1.0, 1.0]), Offer::Late, "its window closed");
        assert_eq!(w.offer(b"new-key", 0, &[1.0, 1.0]), Offer::Late, "closed for every key");
        assert_eq!(w.stream_ms(), Some(1500), "late readings do not move stream time");
        assert!(w.take_closed(10).is_empty());
    }

    #[test]
    fn keys_have_their_own_windows_and_close_by_stream_time() {
        let mut w = windows(1000, 0, 10);
        w.offer(b"a", 10, &[1.0, 1.0]);
        w.offer(b"b", 20, &[2.0, 2.0]);
        w.offer(b"a", 1010, &[3.0, 3.0]);
        let closed = w.take_closed(10);
        let keys: Vec<&[u8]> = closed.iter().map(|c| c.key.as_slice()).collect();
        assert_eq!(keys, [b"a".as_slice(), b"b"], "b's window closes by a's reading: one stream time");
        assert_eq!(closed[1].state.fields[0].sum, 2.0);
    }

    #[test]
    fn the_open_windows_limit_drops_readings_for_new_windows_only() {
        let mut w = windows(1000, 0, 2);
        assert_eq!(w.offer(b"a", 0, &[1.0, 1.0]), Offer::Added);
        assert_eq!(w.offer(b"b", 0, &[1.0, 1.0]), Offer::Added);
        assert_eq!(w.offer(b"c", 0, &[1.0, 1.0]), Offer::Full);
        assert_eq!(w.offer(b"a", 1, &[1.0, 1.0]), Offer::Added, "an open window still takes readings");
        assert_eq!(w.open_count(), 2);
        assert_eq!(w.offer(b"a", 1000, &[1.0, 1.0]), Offer::Full, "the next window waits for room");
        assert_eq!(w.offer(b"bad", EVENT_TIME_ABS_MAX + 1, &[1.0, 1.0]), Offer::Invalid);
        assert_eq!(w.offer(b"bad", 5, &[1.0]), Offer::Invalid);
    }

    #[test]
    fn take_closed_is_bounded_and_oldest_first() {
        let mut w = windows(10, 0, 100);
        for i in 0..5 {
            w.offer(b"k", i * 10, &[i as f64, 0.0]);
        }
        w.offer(b"k", 1000, &[0.0, 0.0]);
        let first = w.take_closed(3);
        assert_eq!(first.iter().map(|c| c.start_ms).collect::<Vec<_>>(), [0, 10, 20]);
        let rest = w.take_closed(3);
        assert_eq!(rest.iter().map(|c| c.start_ms).collect::<Vec<_>>(), [30, 40]);
    }

    #[test]
    fn changes_name_open_windows_with_state_and_closed_ones_without() {
        let mut w = windows(1000, 0, 10);
        w.offer(b"a", 0, &[1.0, 1.0]);
        assert_eq!(w.take_changes().len(), 1);
        assert!(w.take_changes().is_empty(), "taken");
        w.offer(b"a", 1000, &[1.0, 1.0]);
        w.take_closed(10);
        let changes = w.take_changes();
        assert_eq!(changes.len(), 2);
        assert_eq!((changes[0].0, changes[0].2.is_none()), (0, true), "closed: remove");
        assert_eq!((changes[1].0, changes[1].2.is_some()), (1000, true), "open: store");
    }

    #[test]
    fn stored_window_round_trips() {
        let s = WindowState {
            count: 3,
            fields: vec![
                FieldAgg { min: -1.5, max: 2.0, sum: 0.25, last: 2.0, last_ms: -7 },
                FieldAgg { min: 0.0, max: 1e300, sum: 1e300, last: 1e300, last_ms: 1 << 50 },
            ],
        };
        let bytes = s.encode();
        assert_eq!(WindowState::decode(&bytes, 2), Some(s));
        assert_eq!(WindowState::decode(&bytes, 1), None);
        assert_eq!(WindowState::decode(&bytes[1..], 2), None);
    }
}
