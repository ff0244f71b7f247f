//! Consumer-group offset translation, sans-I/O: the per-partition index from source (gateway)
//! offsets to remote (central cluster) offsets built from the writer's delivery reports, the
//! exact translation of an edge commit, and MirrorMaker 2's checkpoint record encoding (Kafka's
//! `Struct` byte format of `Checkpoint.java` in `connect-mirror-client`), so that
//! `RemoteClusterUtils.translateOffsets` reads what the receiver writes.
//!
//! Invariant: a translation is never ahead of the mirrored data. An edge commit at `O` (the next
//! record to read) is answered only once every source offset below `O` is stored in the central
//! cluster, and then with the remote offset of the first remote record whose source offset is
//! `>= O` (or, when none is stored yet, the remote offset just after the last one stored).

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};

/// MirrorMaker 2's checkpoints topic for a source cluster alias (the site).
pub fn checkpoints_topic(site: &str) -> String {
    format!("{site}.checkpoints.internal")
}

/// The checkpoint value's schema version (`Checkpoint.VERSION`).
pub const CHECKPOINT_VERSION: i16 = 0;

/// Kafka's `Type.STRING`: `i16` length, then UTF-8. Callers bound lengths well below `i16::MAX`.
fn put_kafka_string(b: &mut BytesMut, s: &str) {
    debug_assert!(s.len() <= i16::MAX as usize, "checked by the caller");
    b.put_i16(s.len().min(i16::MAX as usize) as i16);
    b.put_slice(&s.as_bytes()[..s.len().min(i16::MAX as usize)]);
}

/// A checkpoint's key: `KEY_SCHEMA` = (group STRING, topic STRING, partition INT32); `topic` is
/// the remote topic, as MirrorCheckpointTask writes it.
pub fn checkpoint_key(group: &str, remote_topic: &str, partition: i32) -> Bytes {
    let mut b = BytesMut::with_capacity(8 + group.len() + remote_topic.len());
    put_kafka_string(&mut b, group);
    put_kafka_string(&mut b, remote_topic);
    b.put_i32(partition);
    b.freeze()
}

/// A checkpoint's value: `HEADER_SCHEMA` (version INT16), then `VALUE_SCHEMA_V0` =
/// (upstreamOffset INT64, offset INT64, metadata STRING).
pub fn checkpoint_value(upstream: i64, downstream: i64, metadata: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(20 + metadata.len());
    b.put_i16(CHECKPOINT_VERSION);
    b.put_i64(upstream);
    b.put_i64(downstream);
    put_kafka_string(&mut b, metadata);
    b.freeze()
}

/// Kafka's `Type.STRING` at the front of `b`, advancing it; `None` when malformed.
fn get_kafka_string(b: &mut &[u8]) -> Option<String> {
    let n = usize::try_from(i16::from_be_bytes([*b.first()?, *b.get(1)?])).ok()?;
    let s = std::str::from_utf8(b.get(2..2 + n)?).ok()?.to_string();
    *b = &b[2 + n..];
    Some(s)
}

/// A checkpoint's key decoded: (group, remote topic, partition); `None` when it is not one.
pub fn decode_checkpoint_key(mut b: &[u8]) -> Option<(String, String, i32)> {
    let group = get_kafka_string(&mut b)?;
    let topic = get_kafka_string(&mut b)?;
    let p: [u8; 4] = b.try_into().ok()?;
    Some((group, topic, i32::from_be_bytes(p)))
}

/// A checkpoint's value decoded: (upstream offset, downstream offset); `None` when it is not a
/// version 0 value.
pub fn decode_checkpoint_value(b: &[u8]) -> Option<(i64, i64)> {
    if b.get(0..2)? != CHECKPOINT_VERSION.to_be_bytes() {
        return None;
    }
    let upstream = i64::from_be_bytes(b.get(2..10)?.try_into().ok()?);
    let downstream = i64::from_be_bytes(b.get(10..18)?.try_into().ok()?);
    let mut rest = b.get(18..)?;
    get_kafka_string(&mut rest)?;
    Some((upstream, downstream))
}

/// Consecutive source offsets that landed at consecutive remote offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    source: i64,
    remote: i64,
    len: i64,
}

impl Run {
    fn source_end(&self) -> i64 {
        self.source + self.len
    }
}

/// What a commit translates to now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Translation {
    /// The remote offset to checkpoint.
    Ready(i64),
    /// Records below the commit are not all stored in the central cluster yet.
    Wait,
    /// Below what the index knows (evicted, or before what the receiver could learn).
    Unknown,
}

/// One partition's map from source offsets to remote offsets: runs in source order, at most
/// `runs_max` of them (the oldest go first). Exact for commits at or above `floor`.
#[derive(Debug, Clone)]
pub struct OffsetIndex {
    runs: VecDeque<Run>,
    runs_max: usize,
    /// Translations are exact from this source offset on (`None`: nothing known yet).
    floor: Option<i64>,
    /// Remote offset after the last indexed record.
    next_remote: Option<i64>,
}

impl OffsetIndex {
    pub fn new(runs_max: usize) -> Self {
        assert!(runs_max > 0, "checked by the configuration");
        Self { runs: VecDeque::new(), runs_max, floor: None, next_remote: None }
    }

    /// What the receiver learnt before indexing anything: records with source offset `>= floor`
    /// are not in the remote partition yet, and the next one will land at `next_remote` or later.
    pub fn seed(&mut self, floor: i64, next_remote: i64) {
        self.runs.clear();
        self.floor = Some(floor);
        self.next_remote = Some(next_remote);
    }

    /// A stored record: source offset `source` is at remote offset `remote`. Records come in
    /// source order; one out of order (or at a remote offset going backwards) clears the index.
    pub fn push(&mut self, source: i64, remote: i64) {
        self.push_run(source, remote, 1);
    }

    /// `len` stored records: source offsets `source..source + len` at remote offsets
    /// `remote..remote + len`.
    pub fn push_run(&mut self, source: i64, remote: i64, len: i64) {
        if len <= 0 {
            return;
        }
        if let Some(last) = self.runs.back_mut() {
            if source < last.source_end() || remote < last.remote + last.len {
                tracing::warn!(source, remote, "offset index: record out of order, index cleared");
                self.runs.clear();
                self.floor = None;
                self.next_remote = None;
            } else if source == last.source_end() && remote == last.remote + last.len {
                last.len += len;
                self.next_remote = Some(remote + len);
                return;
            }
        }
        if self.floor.is_none() {
            self.floor = Some(source);
        }
        self.runs.push_back(Run { source, remote, len });
        self.next_remote = Some(remote + len);
        while self.runs.len() > self.runs_max {
            if let Some(old) = self.runs.pop_front() {
                self.floor = Some(old.source_end());
            }
        }
    }

    /// Stored records whose remote offsets cannot be told apart (the writer's reports did not
    /// give each its own): translations below `next_source` become unknown.
    pub fn forget_below(&mut self, next_source: i64, next_remote: i64) {
        self.runs.clear();
        self.floor = Some(next_source);
        self.next_remote = Some(next_remote);
    }

    /// The remote offset of an edge commit at `commit` (the next record to read), given that
    /// every source offset below `stored` is in the central cluster.
    pub fn translate(&self, commit: i64, stored: i64) -> Translation {
        if commit > stored {
            return Translation::Wait;
        }
        match self.floor {
            Some(floor) if commit >= floor => {}
            _ => return Translation::Unknown,
        }
        // The first run that ends above the commit holds the first record at or after it.
        let i = self.runs.partition_point(|r| r.source_end() <= commit);
        match self.runs.get(i) {
            Some(r) if r.source >= commit => Translation::Ready(r.remote),
            Some(r) => Translation::Ready(r.remote + (commit - r.source)),
            None => self.next_remote.map_or(Translation::Unknown, Translation::Ready),
        }
    }

    /// Runs held (each a few words).
    pub fn runs(&self) -> usize {
        self.runs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Source offsets 0..10 at remote 100.., then a gap (retention: 10..20 never mirrored), 20..25
    /// at 110.., then a compaction hole (27 and 28 removed at the edge) and 26, 29, 30.
    fn index() -> OffsetIndex {
        let mut ix = OffsetIndex::new(16);
        ix.seed(0, 100);
        for s in 0..10 {
            ix.push(s, 100 + s);
        }
        for s in 20..26 {
            ix.push(s, 110 + (s - 20));
        }
        for (s, r) in [(26, 116), (29, 117), (30, 118)] {
            ix.push(s, r);
        }
        ix
    }

    #[test]
    fn checkpoints_decode_what_they_encode_and_refuse_what_they_are_not() {
        let key = checkpoint_key("billing", "plant-7.meters", 3);
        assert_eq!(decode_checkpoint_key(&key), Some(("billing".into(), "plant-7.meters".into(), 3)));
        let value = checkpoint_value(57, 1057, "meta");
        assert_eq!(decode_checkpoint_value(&value), Some((57, 1057)));
        assert_eq!(decode_checkpoint_key(&key[..key.len() - 1]), None, "truncated");
        assert_eq!(decode_checkpoint_key(&[key.to_vec(), vec![0]].concat()), None, "trailing byte");
        let mut v1 = value.to_vec();
        v1[1] = 1;
        assert_eq!(decode_checkpoint_value(&v1), None, "another schema version");
        assert_eq!(decode_checkpoint_value(&value[..17]), None, "truncated");
    }

    #[test]
    fn commits_translate_to_the_first_remote_record_at_or_after_them() {
        let ix = index();
        let stored = 31;
        assert_eq!(ix.translate(0, stored), Translation::Ready(100));
        assert_eq!(ix.translate(7, stored), Translation::Ready(107));
        // The consumer read 0..=9: its next record is the first one after the gap.
        assert_eq!(ix.translate(10, stored), Translation::Ready(110), "commit at the start of a gap");
        assert_eq!(ix.translate(15, stored), Translation::Ready(110), "commit inside a gap");
        assert_eq!(ix.translate(20, stored), Translation::Ready(110));
        assert_eq!(ix.translate(27, stored), Translation::Ready(117), "commit inside a compaction hole");
        assert_eq!(ix.translate(28, stored), Translation::Ready(117));
        assert_eq!(ix.translate(29, stored), Translation::Ready(117));
        assert_eq!(ix.translate(30, stored), Translation::Ready(118));
        // At the high watermark: the remote offset the next record will take.
        assert_eq!(ix.translate(31, stored), Translation::Ready(119), "commit at the high watermark");
    }

    #[test]
    fn a_commit_beyond_the_stored_data_waits() {
        let ix = index();
        assert_eq!(ix.translate(31, 30), Translation::Wait, "record 30 is not stored yet");
        assert_eq!(ix.translate(500, 31), Translation::Wait, "beyond everything sent");
        assert_eq!(ix.translate(30, 30), Translation::Ready(118));
    }

    #[test]
    fn a_seeded_index_answers_at_its_floor_and_nothing_below() {
        let mut ix = OffsetIndex::new(4);
        ix.seed(50, 7);
        assert_eq!(ix.translate(50, 50), Translation::Ready(7), "nothing of 50.. stored yet");
        assert_eq!(ix.translate(49, 50), Translation::Unknown);
        assert_eq!(OffsetIndex::new(4).translate(0, 0), Translation::Unknown, "nothing learnt");
    }

    #[test]
    fn the_oldest_runs_go_first_and_their_offsets_become_unknown() {
        let mut ix = OffsetIndex::new(2);
        ix.seed(0, 0);
        // Every other source offset: one run each.
        for (i, s) in [0, 2, 4, 6].into_iter().enumerate() {
            ix.push(s, i as i64);
        }
        assert_eq!(ix.runs(), 2);
        assert_eq!(ix.translate(2, 7), Translation::Unknown, "its run was evicted");
        assert_eq!(ix.translate(3, 7), Translation::Ready(2));
        assert_eq!(ix.translate(6, 7), Translation::Ready(3));
        assert_eq!(ix.translate(7, 7), Translation::Ready(4));
    }

    #[test]
    fn records_out_of_order_clear_the_index_instead_of_answering_wrong() {
        let mut ix = OffsetIndex::new(8);
        ix.seed(0, 0);
        ix.push(0, 0);
        ix.push(1, 1);
        ix.push(1, 2);
        assert_eq!(ix.translate(0, 2), Translation::Unknown);
        assert_eq!(ix.translate(1, 2), Translation::Ready(2));
        ix.forget_below(10, 20);
        assert_eq!(ix.translate(9, 10), Translation::Unknown);
        assert_eq!(ix.translate(10, 10), Translation::Ready(20));
    }

    /// The bytes `Checkpoint.serializeKey` / `serializeValue(0)` produce for
    /// `Checkpoint("g1", plant-7.meters-2, 42, 1042, "")`, written out by hand from the schemas.
    #[test]
    fn checkpoint_records_use_mirrormaker_2s_struct_format() {
        let key = checkpoint_key("g1", "plant-7.meters", 2);
        let mut want = vec![0, 2, b'g', b'1', 0, 14];
        want.extend_from_slice(b"plant-7.meters");
        want.extend_from_slice(&[0, 0, 0, 2]);
        assert_eq!(&key[..], &want[..]);
        let value = checkpoint_value(42, 1042, "");
        let mut want = vec![0, 0];
        want.extend_from_slice(&42i64.to_be_bytes());
        want.extend_from_slice(&1042i64.to_be_bytes());
        want.extend_from_slice(&[0, 0]);
        assert_eq!(&value[..], &want[..]);
        assert_eq!(checkpoints_topic("plant-7"), "plant-7.checkpoints.internal");
    }
}
