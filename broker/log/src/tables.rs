//! The redb tables of the store, their key layouts and value encodings, how a batch larger than a
//! page is laid out as a head and pieces that fill redb's power-of-two page runs exactly
//! (`layout`), and the page-footprint model that retention uses (redb rounds a large value up to
//! a power-of-two page run and leaves leaves filled in the middle of a key range half full).

use redb::TableDefinition;

use crate::error::StoreError;

/// Topic name -> `TopicRecord` (id, partition count, `key=value` settings).
pub const TOPICS: TableDefinition<&str, &[u8]> = TableDefinition::new("topics");
/// Partition key -> `PartitionMeta`; updated in the same transaction as every append and delete.
pub const PARTITIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("partitions");
/// (partition key, base offset) -> a batch's head: append time (i64 BE, 8 bytes) followed by the
/// RecordBatch v2, whole, or its first bytes (at least its header) when the batch is laid out in
/// pieces (see `layout`; the batch header's length says which).
pub const LOG: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("log");
/// (partition key, base offset, piece number) -> the bytes of a batch after its head, in pieces
/// numbered from 0 that each fill a power-of-two run of pages exactly (see `layout`). Written and
/// removed in the same transaction as the head. Databases written before pieces existed have
/// whole batches in `LOG` and nothing here: they read as they are, no migration.
pub const LOG_PIECES: TableDefinition<(u64, u64, u8), &[u8]> = TableDefinition::new("log_pieces");
/// (partition key, timestamp) -> offset: a sparse index of each partition's running max
/// timestamp, one entry per `TIME_INDEX_INTERVAL_BYTES` of batches at most (as Kafka's
/// `index.interval.bytes`), because an entry per commit costs the commit a page write or two.
/// An entry `(ts, off)` is written once `TIME_INDEX_INTERVAL_BYTES` of batches have been stored
/// since `off`, the first batch that raised the running max after the previous entry; `ts` is
/// the running max then. So (1) every record below `off` has a timestamp at most the previous
/// entry's, and entries' timestamps grow with their offsets; (2) the batches that raised the
/// running max past the newest entry all lie in the partition's last `TIME_INDEX_INTERVAL_BYTES`
/// (`stored::tail_region_start`). Databases written with an entry per raise (before this) hold
/// both. Retention moves entries below the log start up to it.
pub const TIME_INDEX: TableDefinition<(u64, i64), u64> = TableDefinition::new("time_index");

/// Batch bytes between time index entries at most (see `TIME_INDEX`). A constant, not a
/// setting: lookups rely on it for entries written before any restart.
pub const TIME_INDEX_INTERVAL_BYTES: u64 = 64 * 1024;
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
/// A LOG_PIECES entry's overhead inside a redb leaf: 17-byte fixed-width key, 4-byte value length.
const PIECE_ENTRY_OVERHEAD: u64 = 17 + 4;
/// The largest LOG value that fits one page beside nothing else: a head is never larger, so
/// heads share leaves instead of taking page runs.
pub const HEAD_VALUE_MAX: usize = (PAGE_BYTES - LEAF_HEADER - LOG_ENTRY_OVERHEAD) as usize;
/// The bytes a head holds at least: the append time and the batch header (what retention,
/// compaction and the open-time checks read without the pieces).
const HEAD_VALUE_MIN: usize = VALUE_PREFIX_LEN + crate::batch::HEADER_LEN;

/// Bytes of a piece that fills a run of `pages` pages (a power of two) exactly.
fn piece_capacity(pages: u64) -> usize {
    (pages * PAGE_BYTES - LEAF_HEADER - PIECE_ENTRY_OVERHEAD) as usize
}

/// How a stored value (`VALUE_PREFIX_LEN` bytes of append time, then the batch) lies in the
/// tables: `head` bytes in LOG, then `pieces` in LOG_PIECES, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub head: usize,
    pub pieces: Vec<usize>,
}

impl Layout {
    /// Disk bytes the layout costs (the model of `footprint`, per entry).
    pub fn footprint(&self) -> u64 {
        split_footprint(self.head, self.pieces.iter().copied())
    }
}

/// The layout of a stored value of `value_len` bytes. A value that fits one page stays whole (it
/// shares leaves). A larger one would take the next power-of-two run of pages whole (a 110 KB
/// batch takes 128 KiB): instead its bytes after the head go into pieces that each fill a
/// power-of-two run exactly (largest first), and what is left, less than a page, stays in the
/// head beside the batch header, or becomes a last piece of under a page if the head would not
/// fit one page then. The whole value is kept when that costs no more (a value that already
/// fills its run, as the store's own batches do).
pub fn layout(value_len: usize) -> Layout {
    let whole = Layout { head: value_len, pieces: Vec::new() };
    if value_len <= HEAD_VALUE_MAX {
        return whole;
    }
    let mut rest = value_len - HEAD_VALUE_MIN;
    let mut pieces = Vec::new();
    while rest >= piece_capacity(1) {
        let mut pages = 1u64;
        while piece_capacity(pages * 2) <= rest {
            pages *= 2;
        }
        pieces.push(piece_capacity(pages));
        rest -= piece_capacity(pages);
    }
    let head = if HEAD_VALUE_MIN + rest <= HEAD_VALUE_MAX {
        HEAD_VALUE_MIN + rest
    } else {
        pieces.push(rest);
        HEAD_VALUE_MIN
    };
    let split = Layout { head, pieces };
    debug_assert_eq!(split.head + split.pieces.iter().sum::<usize>(), value_len);
    assert!(split.pieces.len() <= usize::from(u8::MAX), "pieces are numbered by a u8: {value_len}");
    if footprint(value_len) <= split.footprint() {
        whole
    } else {
        split
    }
}

/// Disk bytes of a batch stored as a head of `head` bytes and pieces of the given lengths:
/// each piece its page run, the head (and a last piece under a page) its share of a leaf, at
/// most the one page it fits.
pub fn split_footprint(head: usize, pieces: impl IntoIterator<Item = usize>) -> u64 {
    leaf_footprint(head as u64 + LOG_ENTRY_OVERHEAD)
        + pieces.into_iter().map(|p| leaf_footprint(p as u64 + PIECE_ENTRY_OVERHEAD)).sum::<u64>()
}

/// `entry_footprint`, at most one page for an entry that fits one.
fn leaf_footprint(entry: u64) -> u64 {
    if entry + LEAF_HEADER <= PAGE_BYTES {
        entry_footprint(entry).min(PAGE_BYTES)
    } else {
        entry_footprint(entry)
    }
}

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
    /// Counts a batch of `batch_len` bytes just stored at `next_offset` (its base), costing
    /// `footprint` bytes of disk (`Layout::footprint`); the partition continues at
    /// `batch_next_offset`.
    pub fn account_batch(&mut self, batch_next_offset: u64, batch_len: usize, footprint: u64) {
        debug_assert!(
            batch_next_offset > self.next_offset,
            "a batch ends after where it starts: {batch_next_offset} {self:?}"
        );
        debug_assert!(batch_len > 0, "a stored batch has bytes");
        self.next_offset = batch_next_offset;
        self.logical_bytes += batch_len as u64;
        self.footprint_bytes += footprint;
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

    /// Every piece fills its page run exactly; the head fits one page beside others; the whole
    /// value is kept when the layout saves nothing.
    #[test]
    fn layout_fills_page_runs_exactly() {
        // The storage benchmark's 109,997-byte client batch: 64 + 32 + 8 KiB runs and a head of
        // 3,584 bytes, about 108 KiB instead of a 128 KiB run.
        let l = layout(109_997 + VALUE_PREFIX_LEN);
        assert_eq!(l.pieces, vec![65536 - 25, 32768 - 25, 8192 - 25]);
        assert_eq!(l.head, 3584);
        assert_eq!(l.footprint(), 4096 + 65536 + 32768 + 8192);
        for len in (HEAD_VALUE_MAX + 1..3 << 20).step_by(997) {
            let l = layout(len);
            assert_eq!(l.head + l.pieces.iter().sum::<usize>(), len, "{len}");
            if l.pieces.is_empty() {
                // Kept whole: its run costs no more than pieces would.
                assert_eq!(l.head, len);
                continue;
            }
            assert!(l.head <= HEAD_VALUE_MAX, "{len}: head {} does not fit one page", l.head);
            assert!(l.head >= HEAD_VALUE_MIN, "{len}: the head holds the batch header");
            let entry = |p: usize| p as u64 + PIECE_ENTRY_OVERHEAD;
            let fills = |p: usize| entry(p) + LEAF_HEADER == leaf_footprint(entry(p));
            let (last, full) = l.pieces.split_last().expect("pieces");
            assert!(full.iter().all(|p| fills(*p)), "{len}: every piece but the last fills its run: {l:?}");
            assert!(fills(*last) || *last < piece_capacity(1), "{len}: a last piece under a page: {l:?}");
            // At most a page (the head's, or a last piece's) and the entry overheads beyond the bytes.
            let waste = l.footprint() - len as u64;
            assert!(waste < PAGE_BYTES + 25 * l.pieces.len() as u64 + 24, "{len}: {waste} wasted, {l:?}");
            assert!(l.footprint() < footprint(len), "{len}: split only when it saves");
        }
        // Values up to a page and values that fill their run already stay whole.
        assert!(layout(HEAD_VALUE_MAX).pieces.is_empty());
        let filled = DEFAULT_BATCH_SIZE_BYTES_MAX as usize + VALUE_PREFIX_LEN;
        assert_eq!(layout(filled), Layout { head: filled, pieces: Vec::new() });
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
