//! A gateway's restore from the central cluster, sans-I/O: which partitions to restore and from
//! where (the listing, the options and the progress stored by an earlier run), how many stream at
//! once, each partition's credit, the progress kept in the store with the records, and the
//! figures of the progress line (records, bytes, rate, ETA). Fed with events and `now`; the
//! driver (`gateway_restore.rs`) does the QUIC and store I/O.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use tributary_log::KvSpace;

use crate::core::{CreditExceeded, Flow};
use crate::protocol::{RestoreFrom, RestoreTopic};

/// The restore's progress per partition, written in the same commit as the records it covers:
/// key (topic, partition) -> (remote offset to continue from, done).
pub const RESTORE_PROGRESS: KvSpace = KvSpace::named("kv.restore");

/// A partition's stored progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// The remote offset after the last record stored.
    pub remote_next: i64,
    /// The partition was restored up to the remote high watermark.
    pub done: bool,
}

/// The progress key of a partition: `u16 length | topic | i32 partition` (injective).
pub fn progress_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut k = Vec::with_capacity(6 + topic.len());
    k.extend_from_slice(&(topic.len().min(u16::MAX as usize) as u16).to_be_bytes());
    k.extend_from_slice(topic.as_bytes());
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// (topic, partition) of a progress key.
pub fn parse_progress_key(k: &[u8]) -> Option<(String, i32)> {
    let n = u16::from_be_bytes([*k.first()?, *k.get(1)?]) as usize;
    let topic = std::str::from_utf8(k.get(2..2 + n)?).ok()?.to_string();
    let p: [u8; 4] = k.get(2 + n..)?.try_into().ok()?;
    Some((topic, i32::from_be_bytes(p)))
}

pub fn encode_progress(s: Stored) -> Vec<u8> {
    let mut v = s.remote_next.to_be_bytes().to_vec();
    v.push(u8::from(s.done));
    v
}

pub fn decode_progress(v: &[u8]) -> Option<Stored> {
    let remote_next = i64::from_be_bytes(v.get(0..8)?.try_into().ok()?);
    let done = match v.get(8..)? {
        [0] => false,
        [1] => true,
        _ => return None,
    };
    Some(Stored { remote_next, done })
}

/// What to restore of each topic: all of it (neither set), the records of the last `since_ms`
/// (`--since`), or the last `bytes` of records per topic (`--bytes`, shared out over its
/// partitions by their remote extents). Compacted topics (MQTT retained messages among them)
/// always come back whole: a part of one would lose keys. `topics` empty = every listed topic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    pub topics: Vec<String>,
    pub since_ms: Option<u64>,
    pub bytes: Option<u64>,
}

/// Why a restore cannot go on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("topic {0:?} is not in the central cluster for this site (asked for with --topic)")]
    NotListed(String),
    #[error("--since and --bytes exclude each other")]
    BothLimits,
    #[error("{topic}-{partition}: data for a partition that was not started")]
    NotStarted { topic: String, partition: i32 },
    #[error("{topic}-{partition}: a second stream from the receiver for the partition")]
    SecondStream { topic: String, partition: i32 },
    #[error("{topic}-{partition}: remote offset went back from {from} to {to}")]
    WentBack { topic: String, partition: i32, from: i64, to: i64 },
    #[error("{0}")]
    Credit(#[from] CreditExceeded),
}

/// One partition to restore.
#[derive(Debug, Clone)]
pub struct Planned {
    pub topic: String,
    pub partition: i32,
    pub from: RestoreFrom,
    /// Remote extent when listed.
    pub low: i64,
    pub high: i64,
}

/// Decides each partition's start: a partition done earlier is left out, one begun earlier
/// continues after its last stored record, the others start as `sel` says. Topics in the listing
/// order; `compacted(topic)` tells compacted topics (restored whole).
pub fn plan(
    listing: &[RestoreTopic],
    sel: &Selection,
    stored: &BTreeMap<(String, i32), Stored>,
    now_ms: i64,
) -> Result<Vec<Planned>, PlanError> {
    if sel.since_ms.is_some() && sel.bytes.is_some() {
        return Err(PlanError::BothLimits);
    }
    if let Some(missing) = sel.topics.iter().find(|t| !listing.iter().any(|l| &l.topic == *t)) {
        return Err(PlanError::NotListed(missing.clone()));
    }
    let mut out = Vec::new();
    for t in listing {
        if !sel.topics.is_empty() && !sel.topics.contains(&t.topic) {
            continue;
        }
        let compacted = t.configs.iter().any(|(k, v)| k == "cleanup.policy" && v.contains("compact"));
        // Extents are the receiver's: summed wide (each is at most i64::MAX, a topic at most
        // RESTORE_PARTITIONS_MAX of them).
        let records: i128 = t.extents.iter().map(|(l, h)| i128::from(h.saturating_sub(*l).max(0))).sum();
        for (partition, &(low, high)) in t.extents.iter().enumerate() {
            let partition = partition as i32;
            let from = match stored.get(&(t.topic.clone(), partition)) {
                Some(s) if s.done => continue,
                Some(s) => RestoreFrom::Offset(s.remote_next),
                None if compacted => RestoreFrom::Offset(low),
                None => match (sel.since_ms, sel.bytes) {
                    (Some(since), _) => RestoreFrom::Time(now_ms.saturating_sub(since.min(i64::MAX as u64) as i64)),
                    // The topic's bytes shared by the partitions' record counts.
                    (_, Some(bytes)) => {
                        let share = if records > 0 {
                            let share = i128::from(bytes) * i128::from(high.saturating_sub(low).max(0)) / records;
                            i64::try_from(share).unwrap_or(i64::MAX)
                        } else {
                            0
                        };
                        RestoreFrom::TailBytes(share)
                    }
                    (None, None) => RestoreFrom::Offset(low),
                },
            };
            out.push(Planned { topic: t.topic.clone(), partition, from, low, high });
        }
    }
    Ok(out)
}

/// A partition being restored.
#[derive(Debug)]
struct Active {
    flow: Flow,
    /// Remote offset after the last stored record (None until the first batch).
    remote_next: Option<i64>,
    from: i64,
    high: i64,
    /// Records stored of it in this run.
    read: u64,
    /// Its stream from the receiver was accepted (one at most).
    streaming: bool,
}

/// What the driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Ask the cloud for this partition and grant it `credit` bytes.
    Start { topic: String, partition: i32, from: RestoreFrom, credit: u64 },
    /// Give back `bytes` of credit to a partition's stream.
    Credit { topic: String, partition: i32, bytes: u64 },
}

/// The restore's running state: partitions waiting, streaming (at most `streams_max`), done;
/// counters and the rate window for the progress line.
#[derive(Debug)]
pub struct Restore {
    waiting: VecDeque<Planned>,
    active: BTreeMap<(String, i32), Active>,
    streams_max: usize,
    window: u64,
    slack: u64,
    done: usize,
    total: usize,
    /// Records and bytes stored in this run.
    pub records: u64,
    pub bytes: u64,
    /// Records expected in this run (remote extents of the partitions still to restore).
    records_expected: u64,
    samples: VecDeque<(Instant, u64, u64)>,
    rate_window: Duration,
}

/// The figures of one progress line.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub partitions_done: usize,
    pub partitions: usize,
    pub records: u64,
    pub records_expected: u64,
    pub bytes: u64,
    pub records_per_s: f64,
    pub bytes_per_s: f64,
    /// Seconds left at the current rate (`None`: no rate yet).
    pub eta_s: Option<u64>,
}

impl Restore {
    /// `window`: each partition's credit (bytes in transit); `slack`: the largest frame, by which a
    /// stream may overshoot it.
    pub fn new(planned: Vec<Planned>, streams_max: usize, window: u64, slack: u64, now: Instant) -> Self {
        let records_expected = planned
            .iter()
            .map(|p| {
                let from = match p.from {
                    RestoreFrom::Offset(o) => o.clamp(p.low, p.high),
                    _ => p.low,
                };
                p.high.saturating_sub(from).max(0) as u64
            })
            .fold(0u64, u64::saturating_add);
        let total = planned.len();
        Self {
            waiting: planned.into(),
            active: BTreeMap::new(),
            streams_max: streams_max.max(1),
            window,
            slack,
            done: 0,
            total,
            records: 0,
            bytes: 0,
            records_expected,
            samples: VecDeque::from([(now, 0, 0)]),
            rate_window: Duration::from_secs(10),
        }
    }

    /// Partitions to start now (up to `streams_max` streaming at once).
    pub fn starts(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        while self.active.len() < self.streams_max {
            let Some(p) = self.waiting.pop_front() else { break };
            let from = match p.from {
                RestoreFrom::Offset(o) => o,
                _ => p.low,
            };
            self.active.insert(
                (p.topic.clone(), p.partition),
                Active {
                    flow: Flow::new(self.window, self.slack),
                    remote_next: None,
                    from,
                    high: p.high,
                    read: 0,
                    streaming: false,
                },
            );
            out.push(Action::Start { topic: p.topic, partition: p.partition, from: p.from, credit: self.window });
        }
        out
    }

    /// Whether a partition is streaming.
    pub fn is_active(&self, topic: &str, partition: i32) -> bool {
        self.active.contains_key(&(topic.to_string(), partition))
    }

    /// A stream from the receiver opened for a partition: accepted once per started partition
    /// (a second one, from a broken or hostile receiver, would hold a second frame buffer and
    /// race the first for the partition's offsets).
    pub fn on_stream(&mut self, topic: &str, partition: i32) -> Result<(), PlanError> {
        let a = self.active(topic, partition)?;
        if a.streaming {
            return Err(PlanError::SecondStream { topic: topic.to_string(), partition });
        }
        a.streaming = true;
        Ok(())
    }

    fn active(&mut self, topic: &str, partition: i32) -> Result<&mut Active, PlanError> {
        self.active
            .get_mut(&(topic.to_string(), partition))
            .ok_or_else(|| PlanError::NotStarted { topic: topic.to_string(), partition })
    }

    /// A batch of `len` bytes arrived for a partition, ending at `remote_next`: within its
    /// credit, and moving forward.
    pub fn on_received(&mut self, topic: &str, partition: i32, remote_next: i64, len: u64) -> Result<(), PlanError> {
        let a = self.active(topic, partition)?;
        let last = a.remote_next.unwrap_or(a.from.min(remote_next));
        if remote_next <= last && a.remote_next.is_some() {
            return Err(PlanError::WentBack { topic: topic.to_string(), partition, from: last, to: remote_next });
        }
        a.flow.on_received(topic, partition, len)?;
        Ok(())
    }

    /// The batch is durable in the store: counted, its credit given back when due.
    pub fn on_stored(
        &mut self,
        topic: &str,
        partition: i32,
        remote_next: i64,
        len: u64,
        records: u64,
        now: Instant,
    ) -> Result<Option<Action>, PlanError> {
        let a = self.active(topic, partition)?;
        a.remote_next = Some(remote_next);
        a.read += records;
        a.flow.on_stored(len);
        let credit = a.flow.take_credit(false);
        self.records += records;
        self.bytes += len;
        self.sample(now);
        Ok(credit.map(|bytes| Action::Credit { topic: topic.to_string(), partition, bytes }))
    }

    /// Whether an end at `remote_next` may be recorded: the partition is streaming, and the end
    /// is not below what was stored of it. Changes nothing; the driver checks before it stores
    /// the partition as done.
    pub fn check_end(&self, topic: &str, partition: i32, remote_next: i64) -> Result<(), PlanError> {
        let a = self
            .active
            .get(&(topic.to_string(), partition))
            .ok_or_else(|| PlanError::NotStarted { topic: topic.to_string(), partition })?;
        match a.remote_next {
            Some(n) if remote_next < n => {
                Err(PlanError::WentBack { topic: topic.to_string(), partition, from: n, to: remote_next })
            }
            _ => Ok(()),
        }
    }

    /// A partition is complete: the next waiting one may start.
    pub fn on_end(&mut self, topic: &str, partition: i32, remote_next: i64) -> Result<(), PlanError> {
        self.check_end(topic, partition, remote_next)?;
        let a = self.active(topic, partition)?;
        // A partition restored from a time or a size, or whose remote copy has holes
        // (compaction), held fewer records than its extent: what it did not send was never due.
        let unsent = (a.high.saturating_sub(a.from).max(0) as u64).saturating_sub(a.read);
        self.records_expected = self.records_expected.saturating_sub(unsent);
        self.active.remove(&(topic.to_string(), partition));
        self.done += 1;
        Ok(())
    }

    /// Every partition is restored.
    pub fn finished(&self) -> bool {
        self.waiting.is_empty() && self.active.is_empty()
    }

    fn sample(&mut self, now: Instant) {
        self.samples.push_back((now, self.records, self.bytes));
        while self.samples.len() > 2
            && self.samples.front().is_some_and(|(t, _, _)| now.duration_since(*t) > self.rate_window)
        {
            self.samples.pop_front();
        }
    }

    /// The progress line's figures at `now`: rates over the last `rate_window`, the ETA from the
    /// records still expected.
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        let (records_per_s, bytes_per_s) = match self.samples.front() {
            Some((t, r, b)) if now.duration_since(*t) >= Duration::from_millis(200) => {
                let s = now.duration_since(*t).as_secs_f64();
                ((self.records - r) as f64 / s, (self.bytes - b) as f64 / s)
            }
            _ => (0.0, 0.0),
        };
        let left = self.records_expected.saturating_sub(self.records);
        let eta_s = (records_per_s > 0.0).then(|| (left as f64 / records_per_s).ceil() as u64);
        Snapshot {
            partitions_done: self.done,
            partitions: self.total,
            records: self.records,
            records_expected: self.records_expected.max(self.records),
            bytes: self.bytes,
            records_per_s,
            bytes_per_s,
            eta_s,
        }
    }
}

impl Snapshot {
    /// One line: `partitions 3/8  records 120000/500000 (24%)  14.2 MB  31000 rec/s 3.6 MB/s  ETA 13 s`.
    pub fn line(&self) -> String {
        let pct = (self.records * 100).checked_div(self.records_expected).unwrap_or(100);
        let eta = self.eta_s.map_or_else(|| "ETA -".to_string(), |s| format!("ETA {}", duration(s)));
        format!(
            "partitions {}/{}  records {}/{} ({pct}%)  {}  {:.0} rec/s {}/s  {eta}",
            self.partitions_done,
            self.partitions,
            self.records,
            self.records_expected,
            human_bytes(self.bytes as f64),
            self.records_per_s,
            human_bytes(self.bytes_per_s),
        )
    }

    /// A bar of `width` cells for a terminal.
    pub fn bar(&self, width: usize) -> String {
        let filled = if self.records_expected > 0 {
            (self.records as u128 * width as u128 / self.records_expected as u128) as usize
        } else {
            width
        };
        let filled = filled.min(width);
        format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
    }
}

fn human_bytes(b: f64) -> String {
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b:.0} B")
    }
}

fn duration(s: u64) -> String {
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing() -> Vec<RestoreTopic> {
        vec![
            RestoreTopic {
                topic: "mqtt.retained".into(),
                configs: vec![("cleanup.policy".into(), "compact".into())],
                extents: vec![(0, 40)],
                reported: vec![0],
            },
            RestoreTopic {
                topic: "meters".into(),
                configs: Vec::new(),
                extents: vec![(0, 300), (100, 200)],
                reported: vec![0, 0],
            },
        ]
    }

    #[test]
    fn progress_round_trips_and_keys_are_unambiguous() {
        for s in [Stored { remote_next: 0, done: false }, Stored { remote_next: i64::MAX, done: true }] {
            assert_eq!(decode_progress(&encode_progress(s)), Some(s));
        }
        assert_eq!(decode_progress(&[0; 8]), None);
        assert_eq!(decode_progress(&[0, 0, 0, 0, 0, 0, 0, 0, 2]), None);
        assert_ne!(progress_key("a", 0x0102), progress_key("a\u{1}", 2));
        assert_eq!(parse_progress_key(&progress_key("meters", 7)), Some(("meters".into(), 7)));
    }

    #[test]
    fn the_plan_starts_each_partition_where_the_options_and_the_stored_progress_say() {
        let none = BTreeMap::new();
        let all = plan(&listing(), &Selection::default(), &none, 0).expect("plan");
        let froms: Vec<(String, i32, RestoreFrom)> =
            all.iter().map(|p| (p.topic.clone(), p.partition, p.from)).collect();
        assert_eq!(
            froms,
            vec![
                ("mqtt.retained".into(), 0, RestoreFrom::Offset(0)),
                ("meters".into(), 0, RestoreFrom::Offset(0)),
                ("meters".into(), 1, RestoreFrom::Offset(100)),
            ]
        );
        // --since: by time, except the compacted topic (whole).
        let since = Selection { since_ms: Some(3_600_000), ..Selection::default() };
        let p = plan(&listing(), &since, &none, 10_000_000).expect("plan");
        assert_eq!(p[0].from, RestoreFrom::Offset(0));
        assert_eq!(p[1].from, RestoreFrom::Time(6_400_000));
        // --bytes: the topic's bytes shared by record counts (300 : 100).
        let bytes = Selection { bytes: Some(4_000), ..Selection::default() };
        let p = plan(&listing(), &bytes, &none, 0).expect("plan");
        assert_eq!((p[1].from, p[2].from), (RestoreFrom::TailBytes(3_000), RestoreFrom::TailBytes(1_000)));
        // A resumed restore: done partitions are left out, begun ones continue where they stopped
        // whatever the options say.
        let stored = BTreeMap::from([
            (("meters".to_string(), 0), Stored { remote_next: 300, done: true }),
            (("meters".to_string(), 1), Stored { remote_next: 150, done: false }),
        ]);
        let p = plan(&listing(), &since, &stored, 10_000_000).expect("plan");
        assert_eq!(
            p.iter().map(|p| (p.partition, p.from)).collect::<Vec<_>>(),
            vec![(0, RestoreFrom::Offset(0)), (1, RestoreFrom::Offset(150))]
        );
        // Topics chosen by name; an unknown one and both limits are refused.
        let only = Selection { topics: vec!["meters".into()], ..Selection::default() };
        assert_eq!(plan(&listing(), &only, &none, 0).expect("plan").len(), 2);
        let unknown = Selection { topics: vec!["nope".into()], ..Selection::default() };
        assert_eq!(plan(&listing(), &unknown, &none, 0).err(), Some(PlanError::NotListed("nope".into())));
        let both = Selection { since_ms: Some(1), bytes: Some(1), ..Selection::default() };
        assert_eq!(plan(&listing(), &both, &none, 0).err(), Some(PlanError::BothLimits));
    }

    #[test]
    fn partitions_stream_a_few_at_a_time_within_their_credit_and_the_eta_follows_the_rate() {
        let t0 = Instant::now();
        let planned = plan(&listing(), &Selection::default(), &BTreeMap::new(), 0).expect("plan");
        let mut r = Restore::new(planned, 2, 1000, 100, t0);
        let starts = r.starts();
        assert_eq!(starts.len(), 2, "two streams at most");
        assert!(matches!(&starts[0], Action::Start { topic, credit: 1000, .. } if topic == "mqtt.retained"));
        assert!(r.starts().is_empty());
        assert_eq!(r.snapshot(t0).records_expected, 40 + 300 + 100);
        // Data of a partition not started is refused; so is more than the credit.
        assert!(matches!(r.on_received("meters", 1, 10, 10), Err(PlanError::NotStarted { .. })));
        r.on_received("meters", 0, 100, 600).expect("within credit");
        assert!(matches!(r.on_received("meters", 0, 200, 600), Err(PlanError::Credit(_))));
        // Stored: counted; credit goes back a quarter window at a time.
        let a = r.on_stored("meters", 0, 100, 600, 100, t0 + Duration::from_secs(1)).expect("stored");
        assert_eq!(a, Some(Action::Credit { topic: "meters".into(), partition: 0, bytes: 600 }));
        let s = r.snapshot(t0 + Duration::from_secs(1));
        assert_eq!((s.records, s.bytes), (100, 600));
        assert!((s.records_per_s - 100.0).abs() < 1.0, "{s:?}");
        assert_eq!(s.eta_s, Some(4), "340 records left at 100/s");
        assert!(s.line().contains("records 100/440 (22%)"), "{}", s.line());
        assert_eq!(s.bar(10), "[##--------]");
        // A batch going back is refused.
        assert!(matches!(r.on_received("meters", 0, 50, 1), Err(PlanError::WentBack { .. })));
        // The retained topic ends: the third partition starts.
        r.on_end("mqtt.retained", 0, 40).expect("end");
        let next = r.starts();
        assert!(matches!(&next[..], [Action::Start { partition: 1, from: RestoreFrom::Offset(100), .. }]));
        assert!(!r.finished());
        r.on_end("meters", 0, 300).expect("end");
        r.on_end("meters", 1, 200).expect("end");
        assert!(r.finished());
        assert_eq!(r.snapshot(t0).partitions_done, 3);
    }

    /// Extents come from the receiver (a peer): the widest it may list are summed without
    /// overflow, in the plan's shares and the progress line's expected records.
    #[test]
    fn the_widest_extents_a_receiver_may_list_do_not_overflow() {
        let wide = vec![RestoreTopic {
            topic: "t".into(),
            configs: Vec::new(),
            extents: vec![(0, i64::MAX); 3],
            reported: vec![0; 3],
        }];
        let sel = Selection { bytes: Some(u64::MAX), ..Selection::default() };
        let p = plan(&wide, &sel, &BTreeMap::new(), 0).expect("plan");
        assert!(p.iter().all(|p| matches!(p.from, RestoreFrom::TailBytes(b) if b >= 0)), "{p:?}");
        let p = plan(&wide, &Selection::default(), &BTreeMap::new(), 0).expect("plan");
        let r = Restore::new(p, 4, 1000, 100, Instant::now());
        assert_eq!(r.snapshot(Instant::now()).records_expected, u64::MAX);
    }

    /// An end that goes back is refused before anything records the partition as done.
    #[test]
    fn an_end_below_what_was_stored_is_refused_by_the_check() {
        let t0 = Instant::now();
        let planned = plan(&listing()[1..], &Selection::default(), &BTreeMap::new(), 0).expect("plan");
        let mut r = Restore::new(planned, 4, 1000, 100, t0);
        r.starts();
        r.on_received("meters", 0, 100, 10).expect("received");
        r.on_stored("meters", 0, 100, 10, 100, t0).expect("stored");
        assert!(matches!(r.check_end("meters", 0, 50), Err(PlanError::WentBack { .. })));
        assert!(r.is_active("meters", 0), "checking changes nothing");
        r.check_end("meters", 0, 300).expect("forward");
        assert!(matches!(r.check_end("meters", 7, 300), Err(PlanError::NotStarted { .. })));
    }

    /// The receiver opens one stream per started partition; a second is refused.
    #[test]
    fn a_second_stream_for_a_partition_is_refused() {
        let planned = plan(&listing()[1..], &Selection::default(), &BTreeMap::new(), 0).expect("plan");
        let mut r = Restore::new(planned, 4, 1000, 100, Instant::now());
        r.starts();
        r.on_stream("meters", 1).expect("its stream");
        assert!(matches!(r.on_stream("meters", 1), Err(PlanError::SecondStream { .. })));
        assert!(matches!(r.on_stream("meters", 9), Err(PlanError::NotStarted { .. })));
    }

    #[test]
    fn a_partition_restored_from_a_time_expects_only_what_it_read() {
        let t0 = Instant::now();
        let sel = Selection { since_ms: Some(1), ..Selection::default() };
        let planned = plan(&listing()[1..], &sel, &BTreeMap::new(), 100).expect("plan");
        let mut r = Restore::new(planned, 4, 1000, 100, t0);
        r.starts();
        assert_eq!(r.snapshot(t0).records_expected, 400);
        // Partition 0 held 50 records newer than the time: it ends having read those.
        r.on_received("meters", 0, 300, 10).expect("received");
        r.on_stored("meters", 0, 300, 10, 50, t0).expect("stored");
        r.on_end("meters", 0, 300).expect("end");
        r.on_end("meters", 1, 200).expect("end, nothing newer");
        let s = r.snapshot(t0);
        assert_eq!((s.records, s.records_expected), (50, 50));
    }
}
