//! The redb tables of the store, their key layouts and value encodings, and the page-footprint
//! model that retention uses (redb rounds large values up to power-of-two page runs and leaves
//! sequentially filled leaves about half full).

use redb::TableDefinition;

use crate::error::StoreError;

/// Topic name -> `TopicRecord` (id, partition count, `key=value` settings).
pub const TOPICS: TableDefinition<&str, &[u8]> = TableDefinition::new("topics");
/// Partition key -> `PartitionMeta`; updated in the same transaction as every append and delete.
pub const PARTITIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("partitions");
/// (partition key, base offset) -> append time (i64 BE, 8 bytes) followed by the RecordBatch v2.
pub const LOG: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("log");
/// (partition key, timestamp) -> base offset of the batch where the partition's running max
/// timestamp first reached that timestamp. Only inserted when the running max grows.
pub const TIME_INDEX: TableDefinition<(u64, i64), u64> = TableDefinition::new("time_index");
/// Partition key -> `CleanState`: how far compaction got in a compacted partition. Written in
/// the same transaction as the batches each compaction step rewrites.
pub const COMPACTION: TableDefinition<u64, &[u8]> = TableDefinition::new("compaction");
/// Counters (next topic id, the watchdog probe's count).
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

pub const META_NEXT_TOPIC_ID: &str = "next_topic_id";
/// Counter the watchdog's probe writes (a real write through the writer, see `Store::probe`).
pub const META_PROBE: &str = "probe";

/// Bytes in front of each stored batch: the append time in ms (big-endian i64).
pub const VALUE_PREFIX_LEN: usize = 8;

const PAGE_BYTES: u64 = 4096;
/// A LOG entry's overhead inside a redb leaf: 16-byte fixed-width key, 4-byte value length.
const LOG_ENTRY_OVERHEAD: u64 = 16 + 4;
/// Leaf page header (page type, pair count).
const LEAF_HEADER: u64 = 4;

/// Default cap of batches the store builds: a stored value (prefix + batch) plus its entry
/// overhead fills a 16 KiB page exactly.
pub const DEFAULT_BATCH_SIZE_BYTES_MAX: u32 =
    (4 * PAGE_BYTES - LEAF_HEADER - LOG_ENTRY_OVERHEAD) as u32 - VALUE_PREFIX_LEN as u32;

/// Disk bytes one LOG value of `value_len` bytes costs, as an upper bound:
/// - a value that does not fit one page gets its own run of 2^k pages;
/// - smaller values share leaves, which sequential appends leave at least half full.
pub fn footprint(value_len: usize) -> u64 {
    entry_footprint(value_len as u64 + LOG_ENTRY_OVERHEAD)
}

/// Disk bytes of one leaf entry of `entry` bytes (key, value and their overhead).
fn entry_footprint(entry: u64) -> u64 {
    if entry + LEAF_HEADER > PAGE_BYTES {
        let pages = (entry + LEAF_HEADER).div_ceil(PAGE_BYTES).next_power_of_two();
        pages * PAGE_BYTES
    } else {
        2 * entry
    }
}

/// A key-value entry's overhead inside a redb leaf: key and value end offsets (4 bytes each).
const KV_ENTRY_OVERHEAD: u64 = 4 + 4;

/// Disk bytes one key-value entry costs, as an upper bound (the same model as [`footprint`]):
/// what `storage.max_bytes` charges for sessions, offsets, retained messages and other state.
pub fn kv_footprint(key_len: usize, value_len: usize) -> u64 {
    entry_footprint((key_len + value_len) as u64 + KV_ENTRY_OVERHEAD)
}

/// Internal partition key: topic id in the high half, partition number in the low half.
/// Topic ids are never reused, so a re-created topic never sees an old topic's data.
pub fn partition_key(topic_id: u32, partition: u32) -> u64 {
    (u64::from(topic_id) << 32) | u64::from(partition)
}

/// Persistent state of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PartitionMeta {
    pub log_start_offset: u64,
    pub next_offset: u64,
    /// Sum of stored batch lengths.
    pub logical_bytes: u64,
    /// Sum of `footprint()` of stored values: what retention budgets.
    pub footprint_bytes: u64,
    pub batches: u64,
    /// Running max timestamp (drives the time index).
    pub max_timestamp: i64,
    /// Offsets below this may have been handed out by commits that were not made durable
    /// (`durability = "relaxed"`). It is only ever changed by durable commits, so its value in
    /// memory is the durable one. After a crash, `[next_offset, reserved_offset)` is filled with
    /// a gap batch so those offsets are never handed out again. `<= next_offset`: nothing reserved.
    pub reserved_offset: u64,
}

/// Version 1 lacked `reserved_offset` (read as 0: nothing reserved).
const META_VERSION_1: u8 = 1;
const META_LEN_1: usize = 1 + 8 * 6;
const META_VERSION: u8 = 2;
const META_LEN: usize = 1 + 8 * 7;

impl PartitionMeta {
    /// Counts a batch just stored at `next_offset` (its base) as a value of `value_len` bytes
    /// (prefix included); the partition continues at `batch_next_offset`.
    pub fn account_batch(&mut self, batch_next_offset: u64, value_len: usize) {
        debug_assert!(
            batch_next_offset > self.next_offset,
            "a batch ends after where it starts: {batch_next_offset} {self:?}"
        );
        debug_assert!(value_len > VALUE_PREFIX_LEN, "a stored value holds its prefix and a batch: {value_len}");
        self.next_offset = batch_next_offset;
        self.logical_bytes += value_len.saturating_sub(VALUE_PREFIX_LEN) as u64;
        self.footprint_bytes += footprint(value_len);
        self.batches += 1;
    }

    pub fn encode(&self) -> [u8; META_LEN] {
        let mut b = [0u8; META_LEN];
        b[0] = META_VERSION;
        let fields = [
            self.log_start_offset,
            self.next_offset,
            self.logical_bytes,
            self.footprint_bytes,
            self.batches,
            self.max_timestamp as u64,
            self.reserved_offset,
        ];
        for (i, f) in fields.iter().enumerate() {
            b[1 + i * 8..9 + i * 8].copy_from_slice(&f.to_be_bytes());
        }
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, StoreError> {
        let known =
            matches!((b.first(), b.len()), (Some(&META_VERSION), META_LEN) | (Some(&META_VERSION_1), META_LEN_1));
        if !known {
            return Err(StoreError::Corrupt(format!(
                "partition metadata of {} bytes, version {:?}",
                b.len(),
                b.first()
            )));
        }
        let f = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[1 + i * 8..9 + i * 8]);
            u64::from_be_bytes(a)
        };
        Ok(Self {
            log_start_offset: f(0),
            next_offset: f(1),
            logical_bytes: f(2),
            footprint_bytes: f(3),
            batches: f(4),
            max_timestamp: f(5) as i64,
            reserved_offset: if b[0] == META_VERSION { f(6) } else { 0 },
        })
    }
}

/// Most tombstone-horizon ranges a `CleanState` keeps; older neighbours merge beyond it (the
/// later time wins, so a tombstone is never removed early).
pub const CLEAN_RANGES_MAX: usize = 16;

/// Compaction's persistent progress in one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CleanState {
    /// Batches with a base offset below this were compacted at least once (the *clean* part);
    /// the rest is *dirty*.
    pub clean_offset: u64,
    /// Logical bytes of the batches below `clean_offset` (so dirty = partition's logical - this).
    pub clean_bytes: u64,
    /// When the earliest tombstone kept by the last pass may go (`i64::MAX`: none kept).
    pub tombstone_due_ms: i64,
    /// When compaction first passed over each clean stretch: (end offset, time in ms), ends
    /// increasing; a batch belongs to the first range whose end lies beyond its base. A
    /// tombstone's `delete.retention.ms` counts from its range's time.
    pub ranges: Vec<(u64, i64)>,
}

impl Default for CleanState {
    fn default() -> Self {
        Self { clean_offset: 0, clean_bytes: 0, tombstone_due_ms: i64::MAX, ranges: Vec::new() }
    }
}

const CLEAN_VERSION: u8 = 1;

impl CleanState {
    /// The time compaction first passed over the clean batch at `base` (`None`: not clean).
    pub fn cleaned_at(&self, base: u64) -> Option<i64> {
        self.ranges.iter().find(|(end, _)| *end > base).map(|(_, at)| *at)
    }

    /// Marks `[clean_offset, end)` as first compacted at `at`.
    pub fn extend(&mut self, end: u64, at: i64) {
        debug_assert!(end >= self.clean_offset, "clean part shrinks: {end} < {}", self.clean_offset);
        self.clean_offset = end;
        match self.ranges.last_mut() {
            Some(last) if last.1 == at => last.0 = end,
            _ => self.ranges.push((end, at)),
        }
        while self.ranges.len() > CLEAN_RANGES_MAX {
            let (first_at, (second_end, second_at)) = (self.ranges[0].1, self.ranges[1]);
            self.ranges[1] = (second_end, first_at.max(second_at));
            self.ranges.remove(0);
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(26 + 16 * self.ranges.len());
        b.push(CLEAN_VERSION);
        b.extend_from_slice(&self.clean_offset.to_be_bytes());
        b.extend_from_slice(&self.clean_bytes.to_be_bytes());
        b.extend_from_slice(&self.tombstone_due_ms.to_be_bytes());
        b.push(self.ranges.len() as u8);
        for (end, at) in &self.ranges {
            b.extend_from_slice(&end.to_be_bytes());
            b.extend_from_slice(&at.to_be_bytes());
        }
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, StoreError> {
        let bad = || StoreError::Corrupt(format!("compaction state of {} bytes", b.len()));
        if b.len() < 26 || b[0] != CLEAN_VERSION {
            return Err(bad());
        }
        let u = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[at..at + 8]);
            u64::from_be_bytes(a)
        };
        let n = usize::from(b[25]);
        if b.len() != 26 + 16 * n {
            return Err(bad());
        }
        let ranges = (0..n).map(|i| (u(26 + 16 * i), u(34 + 16 * i) as i64)).collect();
        Ok(Self { clean_offset: u(1), clean_bytes: u(9), tombstone_due_ms: u(17) as i64, ranges })
    }
}

/// Persistent record of one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicRecord {
    pub id: u32,
    pub partitions: u32,
    pub config_text: String,
}

impl TopicRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(9 + self.config_text.len());
        b.push(1);
        b.extend_from_slice(&self.id.to_be_bytes());
        b.extend_from_slice(&self.partitions.to_be_bytes());
        b.extend_from_slice(self.config_text.as_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, StoreError> {
        if b.len() < 9 || b[0] != 1 {
            return Err(StoreError::Corrupt("topic record".into()));
        }
        let id = u32::from_be_bytes([b[1], b[2], b[3], b[4]]);
        let partitions = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
        let config_text =
            String::from_utf8(b[9..].to_vec()).map_err(|_| StoreError::Corrupt("topic config text".into()))?;
        Ok(Self { id, partitions, config_text })
    }
}

/// Splits a stored LOG value into (append time, batch bytes).
pub fn split_value(v: &[u8]) -> Result<(i64, &[u8]), StoreError> {
    if v.len() < VALUE_PREFIX_LEN {
        return Err(StoreError::Corrupt("stored batch shorter than its prefix".into()));
    }
    let mut a = [0u8; 8];
    a.copy_from_slice(&v[..8]);
    Ok((i64::from_be_bytes(a), &v[VALUE_PREFIX_LEN..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footprint_rounds_large_values_to_power_of_two_pages() {
        assert_eq!(footprint(100), 240);
        assert_eq!(footprint(DEFAULT_BATCH_SIZE_BYTES_MAX as usize + VALUE_PREFIX_LEN), 16384);
        assert_eq!(footprint(DEFAULT_BATCH_SIZE_BYTES_MAX as usize + VALUE_PREFIX_LEN + 1), 32768);
        assert_eq!(footprint(5000), 8192);
    }

    #[test]
    fn meta_round_trips() {
        let m = PartitionMeta {
            log_start_offset: 5,
            next_offset: 9,
            logical_bytes: 3,
            footprint_bytes: 4,
            batches: 2,
            max_timestamp: -1,
            reserved_offset: 70_000,
        };
        assert_eq!(PartitionMeta::decode(&m.encode()).expect("decodes"), m);
        // A version-1 meta (before reservations) reads as reserving nothing.
        let mut v1 = m.encode()[..META_LEN_1].to_vec();
        v1[0] = META_VERSION_1;
        assert_eq!(PartitionMeta::decode(&v1).expect("decodes v1"), PartitionMeta { reserved_offset: 0, ..m });
        assert!(PartitionMeta::decode(&m.encode()[..META_LEN_1]).is_err(), "a v2 tag with a v1 length");
    }

    #[test]
    fn clean_state_round_trips_and_merges_old_ranges_keeping_the_later_time() {
        let mut c = CleanState::default();
        for i in 1..=20u64 {
            c.extend(i * 10, i as i64 * 1000);
        }
        assert_eq!(c.ranges.len(), CLEAN_RANGES_MAX);
        assert_eq!(c.clean_offset, 200);
        // The merged first range covers [0, 50) with the latest of its times.
        assert_eq!(c.ranges[0], (50, 5000));
        assert_eq!(c.cleaned_at(0), Some(5000));
        assert_eq!(c.cleaned_at(55), Some(6000));
        assert_eq!(c.cleaned_at(200), None);
        c.clean_bytes = 77;
        c.tombstone_due_ms = 123;
        assert_eq!(CleanState::decode(&c.encode()).expect("decodes"), c);
        assert!(CleanState::decode(&c.encode()[..30]).is_err());
    }

    #[test]
    fn kv_footprint_counts_small_entries_twice_and_large_ones_in_page_runs() {
        assert_eq!(kv_footprint(10, 100), 2 * 118);
        assert_eq!(kv_footprint(10, 5000), 8192);
        assert_eq!(kv_footprint(10, 1 << 20), 2 << 20);
    }
}
