//! Backfill on request, sans-I/O: `tributary mirror backfill TOPIC --from TIME --to TIME` sends a
//! raw range of a topic the mirror does not otherwise send (kept local, or mirrored only as
//! aggregates) into `{site}.{topic}`, each record once. This module owns the request record's
//! encoding (the CLI appends it to the gateway's log topic [`REQUESTS_TOPIC`]), the accepted
//! requests as the store keeps them (times resolved to offsets once, at acceptance, in the
//! key-value space [`SPACE`]), the per-partition plan of offset ranges still to send, and the
//! parsing of the command's times. The gateway's driver (`gateway.rs`) reads, stores and sends.
//!
//! A backfill stream is an ordinary partition stream to the receiver: the remote copy is in
//! source-offset order and resumes after its last record, so each record goes once across
//! reconnects and restarts. Overlapping requests are merged (an offset is sent once, whatever
//! number of requests name it). A request, or the part of one, below what the centre already holds
//! of that partition (a later range was backfilled first) cannot go into the ordered remote topic:
//! it is recorded as refused, with the count. Ranges go as whole stored batches, so up to one
//! batch on either side of a range goes along.

use tributary_log::KvSpace;

pub mod driver;

/// The gateway log topic backfill requests are appended to (key: the topic; value:
/// `"{from_ms} {to_ms}"`). `__`: never mirrored, internal in Kafka metadata.
pub const REQUESTS_TOPIC: &str = "__mirror.backfill";

/// Where accepted requests and the read position of [`REQUESTS_TOPIC`] are kept.
pub const SPACE: KvSpace = KvSpace::named("kv.mirror_backfill");

/// The key of the next request offset to read.
pub const POSITION_KEY: &[u8] = b"position";

/// The key of an accepted request (its offset in [`REQUESTS_TOPIC`]).
pub fn request_key(id: i64) -> Vec<u8> {
    let mut k = b"request/".to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// A request as the CLI writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub topic: String,
    pub from_ms: i64,
    pub to_ms: i64,
}

impl Request {
    pub fn value(&self) -> String {
        format!("{} {}", self.from_ms, self.to_ms)
    }

    /// From a record of [`REQUESTS_TOPIC`]; `None` if it is not one (any client may write there
    /// with the right to: a malformed one is refused, never acted on).
    pub fn parse(key: Option<&[u8]>, value: Option<&[u8]>) -> Option<Self> {
        let topic = std::str::from_utf8(key?).ok()?.to_string();
        let (from, to) = std::str::from_utf8(value?).ok()?.split_once(' ')?;
        let (from_ms, to_ms) = (from.parse().ok()?, to.parse().ok()?);
        (!topic.is_empty() && topic.len() <= crate::protocol::TOPIC_BYTES_MAX && from_ms < to_ms).then_some(Self {
            topic,
            from_ms,
            to_ms,
        })
    }
}

/// What became of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Its partitions' ranges are planned (`below`: records under what the centre already held,
    /// not sent).
    Accepted,
    /// Not acted on, and why.
    Refused(String),
}

/// One partition of an accepted request: offsets `[from, to)`, and how many of them lay below
/// what the centre held when it was accepted without an earlier request having sent them (never
/// sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartRange {
    pub partition: i32,
    pub from: i64,
    pub to: i64,
    pub below: i64,
}

/// A request as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub id: i64,
    pub request: Request,
    pub verdict: Verdict,
    pub parts: Vec<PartRange>,
}

impl Accepted {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&self.id.to_be_bytes());
        b.extend_from_slice(&self.request.from_ms.to_be_bytes());
        b.extend_from_slice(&self.request.to_ms.to_be_bytes());
        put_str(&mut b, &self.request.topic);
        match &self.verdict {
            Verdict::Accepted => put_str(&mut b, ""),
            Verdict::Refused(why) => put_str(&mut b, &format!("!{why}")),
        }
        b.extend_from_slice(&(self.parts.len() as u32).to_be_bytes());
        for p in &self.parts {
            b.extend_from_slice(&p.partition.to_be_bytes());
            for v in [p.from, p.to, p.below] {
                b.extend_from_slice(&v.to_be_bytes());
            }
        }
        b
    }

    pub fn decode(mut b: &[u8]) -> Option<Self> {
        let id = get_i64(&mut b)?;
        let (from_ms, to_ms) = (get_i64(&mut b)?, get_i64(&mut b)?);
        let topic = get_str(&mut b)?;
        let verdict = match get_str(&mut b)? {
            s if s.is_empty() => Verdict::Accepted,
            s => Verdict::Refused(s.trim_start_matches('!').to_string()),
        };
        let n = u32::from_be_bytes(b.get(..4)?.try_into().ok()?) as usize;
        b = &b[4..];
        // 28 bytes each: a count beyond what is there is corrupt, and nothing is allocated for it.
        if n > b.len() / 28 {
            return None;
        }
        let mut parts = Vec::with_capacity(n);
        for _ in 0..n {
            let partition = i32::from_be_bytes(b.get(..4)?.try_into().ok()?);
            b = &b[4..];
            parts.push(PartRange { partition, from: get_i64(&mut b)?, to: get_i64(&mut b)?, below: get_i64(&mut b)? });
        }
        Some(Self { id, request: Request { topic, from_ms, to_ms }, verdict, parts })
    }

    /// Records of this request in the centre, given each partition's sent position (the next
    /// offset the centre lacks; `None`: not started), and records it brings there in all (its
    /// ranges less what could not be sent; what an earlier request sent counts as its own).
    pub fn progress(&self, sent: impl Fn(i32) -> Option<i64>) -> (i64, i64) {
        let mut done = 0;
        let mut total = 0;
        for p in &self.parts {
            total += p.to - p.from - p.below;
            if let Some(at) = sent(p.partition) {
                // What could not be sent all lies below the position at acceptance, so below `at`.
                done += ((at.min(p.to) - p.from).max(0) - p.below).max(0);
            }
        }
        (done, total)
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    let n = s.len().min(u16::MAX as usize);
    b.extend_from_slice(&(n as u16).to_be_bytes());
    b.extend_from_slice(&s.as_bytes()[..n]);
}

fn get_i64(b: &mut &[u8]) -> Option<i64> {
    let v = i64::from_be_bytes(b.get(..8)?.try_into().ok()?);
    *b = &b[8..];
    Some(v)
}

fn get_str(b: &mut &[u8]) -> Option<String> {
    let n = u16::from_be_bytes(b.get(..2)?.try_into().ok()?) as usize;
    let s = std::str::from_utf8(b.get(2..2 + n)?).ok()?.to_string();
    *b = &b[2 + n..];
    Some(s)
}

/// One partition's backfill: disjoint offset ranges still to send, in order, at most `limit`.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    ranges: Vec<(i64, i64)>,
    limit: usize,
}

/// A range that would take a partition's plan over its limit (`mirror.backfill_ranges_max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{limit} separate ranges are already planned for this partition")]
pub struct PlanFull {
    pub limit: usize,
}

impl Plan {
    pub fn new(limit: usize) -> Self {
        Self { ranges: Vec::new(), limit }
    }

    /// Adds `[from, to)`, the part below `sent` (what the centre holds) left out; returns how many
    /// offsets were left out. Overlapping and touching ranges merge.
    pub fn add(&mut self, from: i64, to: i64, sent: i64) -> Result<i64, PlanFull> {
        let below = (to.min(sent) - from).max(0);
        let from = from.max(sent);
        if from >= to {
            return Ok(below);
        }
        let mut merged = (from, to);
        let (mut keep, mut touched) = (Vec::with_capacity(self.ranges.len() + 1), 0);
        for &(a, b) in &self.ranges {
            if b < merged.0 || a > merged.1 {
                keep.push((a, b));
            } else {
                merged = (merged.0.min(a), merged.1.max(b));
                touched += 1;
            }
        }
        if touched == 0 && self.ranges.len() >= self.limit {
            return Err(PlanFull { limit: self.limit });
        }
        keep.push(merged);
        keep.sort_unstable();
        self.ranges = keep;
        Ok(below)
    }

    /// The part of the plan at or after `at`: the first offset to send and the end of its range
    /// (`None`: nothing left). Nothing is dropped: a session that ends before the centre stores
    /// what was sent starts again lower (see `prune`).
    pub fn next(&self, at: i64) -> Option<(i64, i64)> {
        self.ranges.iter().find(|&&(_, b)| b > at).map(|&(a, b)| (a.max(at), b))
    }

    /// The centre holds everything below `stored`: ranges wholly below it are done.
    pub fn prune(&mut self, stored: i64) {
        self.ranges.retain(|&(_, b)| b > stored);
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// How many offsets of `[from, to)` the ranges cover.
    pub fn covered(&self, from: i64, to: i64) -> i64 {
        self.ranges.iter().map(|&(a, b)| (b.min(to) - a.max(from)).max(0)).sum()
    }

    /// The ranges, for storing (`decode` takes them back).
    pub fn encode(&self) -> Vec<u8> {
        self.ranges.iter().flat_map(|(a, b)| a.to_be_bytes().into_iter().chain(b.to_be_bytes())).collect()
    }

    pub fn decode(b: &[u8], limit: usize) -> Self {
        let ranges = b
            .chunks_exact(16)
            .filter_map(|c| {
                Some((i64::from_be_bytes(c[..8].try_into().ok()?), i64::from_be_bytes(c[8..].try_into().ok()?)))
            })
            .collect();
        Self { ranges, limit }
    }
}

/// A time on the command line: milliseconds since the epoch, or RFC 3339 in UTC
/// (`2026-12-05T14:00:00Z`, optional fraction of a second, `Z` or `+00:00`).
pub fn parse_time(s: &str) -> Option<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Some(ms);
    }
    let s = s.strip_suffix('Z').or_else(|| s.strip_suffix("+00:00"))?;
    let (date, clock) = s.split_once(['T', ' '])?;
    let mut d = date.splitn(3, '-');
    let (year, month, day): (i32, u8, u8) = (d.next()?.parse().ok()?, d.next()?.parse().ok()?, d.next()?.parse().ok()?);
    let (hms, frac) = clock.split_once('.').unwrap_or((clock, ""));
    let mut t = hms.splitn(3, ':');
    let (h, m, sec): (u8, u8, u8) = (t.next()?.parse().ok()?, t.next()?.parse().ok()?, t.next()?.parse().ok()?);
    let milli: u16 = if frac.is_empty() {
        0
    } else if frac.bytes().all(|c| c.is_ascii_digit()) {
        format!("{frac:0<3}")[..3].parse().ok()?
    } else {
        return None;
    };
    let date = time::Date::from_calendar_date(year, time::Month::try_from(month).ok()?, day).ok()?;
    let clock = time::Time::from_hms_milli(h, m, sec, milli).ok()?;
    let at = time::PrimitiveDateTime::new(date, clock).assume_utc();
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_requests_merge_and_each_offset_is_planned_once() {
        let mut p = Plan::new(4);
        assert_eq!(p.add(10, 20, 0), Ok(0));
        assert_eq!(p.add(15, 30, 0), Ok(0), "overlap");
        assert_eq!(p.add(30, 35, 0), Ok(0), "touching");
        assert_eq!(p.add(50, 60, 0), Ok(0));
        assert_eq!(p.next(0), Some((10, 35)));
        assert_eq!(p.next(34), Some((34, 35)));
        assert_eq!(p.next(35), Some((50, 60)), "a hole between requests is not sent");
        assert_eq!(p.next(60), None);
        // Sent is not stored: a new session resuming lower finds its ranges still planned.
        assert_eq!(p.next(12), Some((12, 35)));
        p.prune(40);
        assert_eq!(p.next(12), Some((50, 60)), "the centre holds what lies below 40");
        p.prune(60);
        assert!(p.is_empty());
    }

    #[test]
    fn the_part_below_what_the_centre_holds_is_left_out_and_counted() {
        let mut p = Plan::new(4);
        // The centre holds this partition's records up to 100 (a later range went first).
        assert_eq!(p.add(40, 90, 100), Ok(50), "wholly below: nothing planned");
        assert!(p.is_empty());
        assert_eq!(p.add(80, 120, 100), Ok(20), "partly below");
        assert_eq!(p.next(100), Some((100, 120)));
    }

    #[test]
    fn covered_offsets_are_counted_and_ranges_round_trip() {
        let mut p = Plan::new(8);
        p.add(10, 20, 0).expect("add");
        p.add(30, 40, 0).expect("add");
        assert_eq!(p.covered(0, 100), 20);
        assert_eq!(p.covered(15, 35), 10);
        assert_eq!(p.covered(20, 30), 0);
        let back = Plan::decode(&p.encode(), 8);
        assert_eq!(back.covered(0, 100), 20);
        assert_eq!(back.ranges, p.ranges);
    }

    #[test]
    fn a_partition_s_ranges_are_bounded() {
        let mut p = Plan::new(2);
        p.add(0, 10, 0).expect("first");
        p.add(20, 30, 0).expect("second");
        assert_eq!(p.add(40, 50, 0), Err(PlanFull { limit: 2 }));
        assert_eq!(p.add(5, 25, 0), Ok(0), "merging never needs room");
        assert_eq!(p.add(40, 50, 0), Ok(0), "room again after the merge");
    }

    #[test]
    fn requests_round_trip_and_malformed_ones_are_refused() {
        let r = Request { topic: "raw".into(), from_ms: 1_000, to_ms: 2_000 };
        assert_eq!(Request::parse(Some(b"raw"), Some(r.value().as_bytes())), Some(r.clone()));
        for (k, v) in [
            (Some(&b"raw"[..]), Some(&b"2000 1000"[..])),
            (Some(b"raw"), Some(b"1000")),
            (Some(b"raw"), Some(b"a b")),
            (None, Some(b"1 2")),
            (Some(b""), Some(b"1 2")),
            (Some(b"raw"), None),
        ] {
            assert_eq!(Request::parse(k, v), None, "{k:?} {v:?}");
        }
        let a = Accepted {
            id: 7,
            request: r,
            verdict: Verdict::Accepted,
            parts: vec![
                PartRange { partition: 0, from: 10, to: 20, below: 0 },
                PartRange { partition: 1, from: 5, to: 50, below: 15 },
            ],
        };
        assert_eq!(Accepted::decode(&a.encode()), Some(a.clone()));
        let refused = Accepted { verdict: Verdict::Refused("mirrored anyway".into()), parts: vec![], ..a.clone() };
        assert_eq!(Accepted::decode(&refused.encode()), Some(refused));
        let mut bad = a.encode();
        bad.truncate(bad.len() - 1);
        assert_eq!(Accepted::decode(&bad), None);
        // Partition 0 sent up to 15, partition 1 not started: 5 of 10 + 0 of 30.
        assert_eq!(a.progress(|p| (p == 0).then_some(15)), (5, 40));
        // Partition 1 at 30: its 15 unsendable offsets lie below, 10 sent.
        assert_eq!(a.progress(|_| Some(30)), (20, 40));
    }

    #[test]
    fn times_as_milliseconds_or_rfc_3339_in_utc() {
        assert_eq!(parse_time("1733407200000"), Some(1_733_407_200_000));
        assert_eq!(parse_time("2024-12-05T14:00:00Z"), Some(1_733_407_200_000));
        assert_eq!(parse_time("2024-12-05T14:00:00.25Z"), Some(1_733_407_200_250));
        assert_eq!(parse_time("2024-12-05 14:00:00+00:00"), Some(1_733_407_200_000));
        for bad in ["2024-12-05T14:00:00", "2024-13-05T14:00:00Z", "yesterday", "2024-12-05T14:00:00.x1Z"] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
    }
}
