//! The high watermarks gateways reported, kept by the receiver in `{site}.extents.internal`, sans-I/O:
//! the topic's name, its record encoding (key: the edge topic and partition, unambiguous; value:
//! the high watermark, an `i64`), and the coalescing of one session's reports (a partition's value
//! is written only when it grew, at most once per interval). A restore reads the highest value
//! of each partition back, so the restored gateway never gives again an offset the centre knew
//! had been given.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::protocol::PartitionReport;
use crate::restore::{parse_progress_key, progress_key};

/// The compacted topic of a site's reported high watermarks (one partition).
pub fn extents_topic(site: &str) -> String {
    format!("{site}.extents.internal")
}

/// A record's key: `u16 length | edge topic | i32 partition` (the restore progress key's
/// encoding: no two (topic, partition) share one).
pub fn extent_key(topic: &str, partition: i32) -> Vec<u8> {
    progress_key(topic, partition)
}

/// (edge topic, partition) of a key; `None` when it is not one.
pub fn decode_extent_key(k: &[u8]) -> Option<(String, i32)> {
    parse_progress_key(k).filter(|(t, p)| !t.is_empty() && *p >= 0)
}

/// A record's value: the high watermark, big-endian.
pub fn extent_value(high_watermark: i64) -> [u8; 8] {
    high_watermark.to_be_bytes()
}

/// A value decoded; `None` when it is not 8 bytes of a non-negative offset.
pub fn decode_extent_value(v: &[u8]) -> Option<i64> {
    Some(i64::from_be_bytes(v.try_into().ok()?)).filter(|h| *h >= 0)
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    reported: i64,
    written: i64,
    written_at: Option<Instant>,
}

/// One mirror session's reported high watermarks and what of them was written.
#[derive(Debug)]
pub struct Reported {
    entries: HashMap<(String, i32), Entry>,
    /// Partitions held at most (`partitions_per_site_max`).
    partitions_max: usize,
    interval: Duration,
}

impl Reported {
    pub fn new(partitions_max: usize, interval: Duration) -> Self {
        Self { entries: HashMap::new(), partitions_max, interval }
    }

    /// A `Partitions` report: each partition's high watermark, kept if higher than what was
    /// reported before. `mirrored` says which partitions this session mirrors (others, e.g. over
    /// `partitions_per_site_max`, are not kept); at most `partitions_max` are held.
    pub fn on_report(&mut self, list: &[PartitionReport], mirrored: impl Fn(&str, i32) -> bool) {
        for p in list {
            if p.high_watermark < 0 || !mirrored(&p.topic, p.partition) {
                continue;
            }
            let key = (p.topic.clone(), p.partition);
            if let Some(e) = self.entries.get_mut(&key) {
                e.reported = e.reported.max(p.high_watermark);
            } else if self.entries.len() < self.partitions_max {
                self.entries.insert(key, Entry { reported: p.high_watermark, written: -1, written_at: None });
            }
        }
    }

    /// The values to write at `now`: those that grew since written, not written within the
    /// interval. They count as written.
    pub fn due(&mut self, now: Instant) -> Vec<(String, i32, i64)> {
        let mut out = Vec::new();
        for ((topic, partition), e) in &mut self.entries {
            if e.reported > e.written && e.written_at.is_none_or(|t| now.duration_since(t) >= self.interval) {
                e.written = e.reported;
                e.written_at = Some(now);
                out.push((topic.clone(), *partition, e.reported));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(topic: &str, partition: i32, high_watermark: i64) -> PartitionReport {
        PartitionReport { topic: topic.into(), partition, partitions: 2, log_start: 0, high_watermark }
    }

    #[test]
    fn keys_are_unambiguous_and_values_round_trip() {
        assert_eq!(extents_topic("plant-7"), "plant-7.extents.internal");
        // "a" partition 0x0102 and "a\u{1}" partition 2 would share a naive concatenation.
        assert_ne!(extent_key("a", 0x0102), extent_key("a\u{1}", 2));
        assert_eq!(decode_extent_key(&extent_key("meters", 7)), Some(("meters".into(), 7)));
        let mut trailing = extent_key("meters", 7);
        trailing.push(0);
        assert_eq!(decode_extent_key(&trailing), None, "trailing byte");
        assert_eq!(decode_extent_key(&extent_key("meters", -1)), None, "negative partition");
        assert_eq!(decode_extent_key(&extent_key("", 0)), None, "empty topic");
        assert_eq!(decode_extent_value(&extent_value(1 << 40)), Some(1 << 40));
        assert_eq!(decode_extent_value(&extent_value(-1)), None);
        assert_eq!(decode_extent_value(&[0; 7]), None);
    }

    #[test]
    fn values_are_written_when_they_grow_at_most_once_per_interval_and_bounded() {
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        let mut r = Reported::new(2, second);
        r.on_report(&[report("m", 0, 10), report("m", 1, 5), report("x", 0, 9)], |t, _| t == "m");
        let mut due = r.due(t0);
        due.sort();
        assert_eq!(due, vec![("m".into(), 0, 10), ("m".into(), 1, 5)], "x is not mirrored");
        // Grown twice within the interval: written once, with the higher value, after it.
        r.on_report(&[report("m", 0, 20)], |_, _| true);
        r.on_report(&[report("m", 0, 30), report("m", 1, 5)], |_, _| true);
        assert!(r.due(t0 + second / 2).is_empty(), "coalesced");
        assert_eq!(r.due(t0 + second), vec![("m".into(), 0, 30)], "m-1 did not grow");
        // A lower report (a gateway rebuilt without a restore) does not lower it.
        r.on_report(&[report("m", 0, 3)], |_, _| true);
        assert!(r.due(t0 + 5 * second).is_empty());
        // Two partitions at most.
        r.on_report(&[report("m", 2, 99)], |_, _| true);
        assert!(r.due(t0 + 9 * second).is_empty());
    }
}
