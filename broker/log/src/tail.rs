//! The tail cache: the newest committed batches of each partition, kept in memory as stored, so
//! that readers at the end of a log (MQTT subscribers, Kafka consumers, the mirror) are served
//! without a database read and without a blocking-pool thread. One budget
//! (`storage.tail_cache_bytes_max`) covers every partition; the writer alone adds batches (a
//! durable round's before its commit, staged, any other's after it) and evicts the oldest batch
//! of all partitions first.
//!
//! Invariants: a partition's cached batches are contiguous in offsets (each starts where the one
//! before it ended); those at or above the partition's high watermark belong to the round being
//! committed, and a read bounded by the high watermark never returns them (only a staged read,
//! bounded by the staged end, does); if that commit fails, the writer clears the partition. The
//! bytes held, summed over all partitions, never exceed the budget.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use bytes::{Bytes, BytesMut};

/// One committed batch as stored (the batch without the value prefix).
#[derive(Debug, Clone)]
struct Cached {
    /// Order of entry into the cache, over all partitions (see `TailBudget`).
    seq: u64,
    base_offset: i64,
    next_offset: i64,
    bytes: Bytes,
}

/// A partition's newest committed batches.
#[derive(Debug, Default)]
pub(crate) struct PartitionTail {
    batches: Mutex<VecDeque<Cached>>,
    /// The budget's count of what is held, set by the first batch added: every change here (and
    /// dropping the partition) is counted there, so the total stays exact whatever happens to
    /// the partition.
    held: OnceLock<Arc<Held>>,
}

/// Bytes and batches held by the cache over all partitions.
#[derive(Debug, Default)]
struct Held {
    bytes: AtomicUsize,
    batches: AtomicUsize,
}

impl Held {
    fn add(&self, bytes: usize, batches: usize) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.batches.fetch_add(batches, Ordering::Relaxed);
    }

    fn sub(&self, bytes: usize, batches: usize) {
        let before = self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        let before_batches = self.batches.fetch_sub(batches, Ordering::Relaxed);
        debug_assert!(bytes <= before && batches <= before_batches, "tail cache accounting went below zero");
    }
}

/// What a read from the cache found: whole batches from the one holding the asked offset.
#[derive(Debug)]
pub(crate) struct TailRead {
    pub data: Bytes,
    pub batches: usize,
    pub next_offset: i64,
}

impl PartitionTail {
    /// Batches from the one holding `offset`, below `high_watermark`, until `max_bytes` (soft:
    /// the first batch is returned even if larger, as `Store::fetch` does). `None` if the cache
    /// does not hold `offset` (the caller reads the database).
    pub fn read(&self, offset: i64, high_watermark: i64, max_bytes: usize) -> Option<TailRead> {
        let batches = self.batches.lock().ok()?;
        let first = batches.front()?;
        if offset < first.base_offset || offset >= high_watermark {
            return None;
        }
        // Batches are contiguous: find the one holding `offset` by a binary search.
        let i = batches.partition_point(|b| b.next_offset <= offset);
        let mut parts: Vec<&Cached> = Vec::new();
        let mut len = 0usize;
        for b in batches.iter().skip(i) {
            if b.base_offset >= high_watermark || (!parts.is_empty() && len + b.bytes.len() > max_bytes) {
                break;
            }
            parts.push(b);
            len += b.bytes.len();
            if len >= max_bytes {
                break;
            }
        }
        let next_offset = parts.last()?.next_offset;
        let data = match parts.as_slice() {
            [one] => one.bytes.clone(),
            many => {
                let mut joined = BytesMut::with_capacity(len);
                for b in many {
                    joined.extend_from_slice(&b.bytes);
                }
                joined.freeze()
            }
        };
        Some(TailRead { data, batches: parts.len(), next_offset })
    }

    /// Adds a committed batch at the end. A batch that does not continue the cached ones (the
    /// cache was behind, or a gap) replaces them.
    fn push(&self, held: &Arc<Held>, batch: Cached) {
        debug_assert!(batch.next_offset > batch.base_offset, "an empty batch {batch:?}");
        let account = self.held.get_or_init(|| held.clone());
        debug_assert!(Arc::ptr_eq(account, held), "a partition's tail belongs to one budget");
        let Ok(mut batches) = self.batches.lock() else { return };
        if batches.back().is_some_and(|b| b.next_offset != batch.base_offset) {
            Self::drain(&mut batches, account);
        }
        debug_assert!(batches.back().is_none_or(|b| b.seq < batch.seq));
        account.add(batch.bytes.len(), 1);
        batches.push_back(batch);
    }

    /// Removes the oldest batch if it is the one that entered as `seq`.
    fn pop_front_if(&self, seq: u64) {
        let Some(account) = self.held.get() else { return };
        let Ok(mut batches) = self.batches.lock() else { return };
        if batches.front().is_some_and(|b| b.seq == seq) {
            if let Some(b) = batches.pop_front() {
                account.sub(b.bytes.len(), 1);
            }
        }
    }

    /// Whether the batch that entered as `seq` is still here: seqs grow within a partition and
    /// batches leave from the front (or all at once).
    fn holds(&self, seq: u64) -> bool {
        self.batches.lock().is_ok_and(|b| b.front().is_some_and(|f| f.seq <= seq))
    }

    fn drain(batches: &mut VecDeque<Cached>, account: &Held) {
        account.sub(batches.iter().map(|b| b.bytes.len()).sum(), batches.len());
        batches.clear();
    }

    /// Drops every cached batch (the partition was deleted, or the store reopened).
    pub fn clear(&self) {
        let Some(account) = self.held.get() else { return };
        if let Ok(mut batches) = self.batches.lock() {
            Self::drain(&mut batches, account);
        }
    }
}

impl Drop for PartitionTail {
    fn drop(&mut self) {
        self.clear();
    }
}

/// The writer's side: which batch of which partition entered the cache when, so the oldest
/// batch leaves first and the total stays within the budget.
#[derive(Debug)]
pub(crate) struct TailBudget {
    limit_bytes: usize,
    held: Arc<Held>,
    next_seq: u64,
    /// Batches in order of entry. An entry whose batch already left (its partition was cleared,
    /// deleted or replaced its batches) is skipped when it comes up, and such entries are
    /// dropped once they outnumber the batches held.
    order: VecDeque<(Weak<PartitionTail>, u64)>,
}

impl TailBudget {
    pub fn new(limit_bytes: u64) -> Self {
        Self {
            limit_bytes: usize::try_from(limit_bytes).unwrap_or(usize::MAX),
            held: Arc::default(),
            next_seq: 0,
            order: VecDeque::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.limit_bytes > 0
    }

    /// `storage.tail_cache_bytes_max`.
    pub fn limit_bytes(&self) -> usize {
        self.limit_bytes
    }

    pub fn held_bytes(&self) -> usize {
        self.held.bytes.load(Ordering::Relaxed)
    }

    fn held_batches(&self) -> usize {
        self.held.batches.load(Ordering::Relaxed)
    }

    /// Adds a committed batch to `tail`, first evicting the oldest batches of all partitions
    /// until it fits. A batch larger than the whole budget is not cached.
    pub fn add(&mut self, tail: &Arc<PartitionTail>, base_offset: i64, next_offset: i64, bytes: Bytes) {
        let len = bytes.len();
        if len > self.limit_bytes {
            // Not cached; what is cached of this partition no longer leads up to the tail.
            tail.clear();
            return;
        }
        while self.held_bytes() + len > self.limit_bytes {
            let Some((weak, seq)) = self.order.pop_front() else { break };
            if let Some(t) = weak.upgrade() {
                t.pop_front_if(seq);
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        tail.push(&self.held, Cached { seq, base_offset, next_offset, bytes });
        self.order.push_back((Arc::downgrade(tail), seq));
        if self.order.len() > 2 * self.held_batches() + 1024 {
            self.order.retain(|(weak, seq)| weak.upgrade().is_some_and(|t| t.holds(*seq)));
        }
        debug_assert!(self.held_bytes() <= self.limit_bytes, "tail cache over its budget");
        debug_assert!(self.order.len() >= self.held_batches());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(len: usize) -> Bytes {
        Bytes::from(vec![7u8; len])
    }

    #[test]
    fn reads_start_at_the_batch_holding_the_offset_and_stop_at_the_high_watermark() {
        let tail = Arc::new(PartitionTail::default());
        let mut budget = TailBudget::new(1 << 20);
        budget.add(&tail, 0, 10, batch(100));
        budget.add(&tail, 10, 20, batch(100));
        budget.add(&tail, 20, 30, batch(100));
        let r = tail.read(15, 30, 1 << 20).expect("held");
        assert_eq!((r.batches, r.next_offset, r.data.len()), (2, 30, 200));
        // Not yet visible: the high watermark stops the read.
        let r = tail.read(0, 20, 1 << 20).expect("held");
        assert_eq!((r.batches, r.next_offset), (2, 20));
        // max_bytes is soft for the first batch only.
        let r = tail.read(0, 30, 1).expect("held");
        assert_eq!((r.batches, r.next_offset), (1, 10));
        assert!(tail.read(30, 30, 1 << 20).is_none(), "at the high watermark");
    }

    #[test]
    fn the_budget_evicts_the_oldest_batch_of_any_partition_first() {
        let (a, b) = (Arc::new(PartitionTail::default()), Arc::new(PartitionTail::default()));
        let mut budget = TailBudget::new(300);
        budget.add(&a, 0, 5, batch(100));
        budget.add(&b, 0, 5, batch(100));
        budget.add(&a, 5, 9, batch(100));
        budget.add(&b, 5, 7, batch(100));
        assert_eq!(budget.held_bytes(), 300);
        assert!(a.read(0, 9, 1 << 20).is_none(), "a's first batch was the oldest");
        assert_eq!(a.read(5, 9, 1 << 20).map(|r| r.next_offset), Some(9));
        assert_eq!(b.read(0, 7, 1 << 20).map(|r| r.batches), Some(2));
        // A batch larger than the budget is not cached and leaves no stale tail behind.
        budget.add(&b, 7, 8, batch(301));
        assert!(b.read(5, 8, 1 << 20).is_none());
        assert_eq!(budget.held_bytes(), 100);
    }

    #[test]
    fn a_batch_that_does_not_continue_the_cached_ones_replaces_them() {
        let tail = Arc::new(PartitionTail::default());
        let mut budget = TailBudget::new(1 << 20);
        budget.add(&tail, 0, 10, batch(100));
        budget.add(&tail, 50, 60, batch(40));
        assert!(tail.read(0, 60, 1 << 20).is_none());
        assert_eq!(tail.read(50, 60, 1 << 20).map(|r| r.data.len()), Some(40));
        assert_eq!(budget.held_bytes(), 40);
    }

    #[test]
    fn a_deleted_partition_frees_its_bytes_at_once() {
        let tail = Arc::new(PartitionTail::default());
        let mut budget = TailBudget::new(1000);
        budget.add(&tail, 0, 10, batch(400));
        tail.clear();
        drop(tail);
        assert_eq!(budget.held_bytes(), 0);
        let other = Arc::new(PartitionTail::default());
        budget.add(&other, 0, 1, batch(1000));
        assert_eq!(budget.held_bytes(), 1000);
    }

    #[test]
    fn entries_of_batches_that_left_are_dropped_before_they_pile_up() {
        let mut budget = TailBudget::new(1 << 30);
        let tail = Arc::new(PartitionTail::default());
        for i in 0..20_000i64 {
            budget.add(&tail, i, i + 1, batch(10));
            assert!(budget.order.len() <= 2 * budget.held_batches() + 1024, "{} entries", budget.order.len());
            if i % 2 == 1 {
                tail.clear();
            }
        }
        assert_eq!((budget.held_bytes(), budget.held_batches()), (0, 0));
    }

    #[test]
    fn a_partition_dropped_with_batches_in_it_gives_its_bytes_back() {
        let mut budget = TailBudget::new(1000);
        let gone = Arc::new(PartitionTail::default());
        budget.add(&gone, 0, 3, batch(600));
        drop(gone);
        assert_eq!(budget.held_bytes(), 0);
        let other = Arc::new(PartitionTail::default());
        budget.add(&other, 0, 1, batch(1000));
        assert_eq!((budget.held_bytes(), budget.held_batches()), (1000, 1));
    }
}
