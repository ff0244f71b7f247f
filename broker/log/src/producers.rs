//! Idempotent-producer state: for each (partition, producer id) the epoch and the sequence ranges
//! of the last few batches, so a retried batch is answered with its original offsets instead of
//! being stored twice, and a gap in the sequence is refused.
//!
//! The state is rebuilt at open from the tail of every partition's log (batch headers carry the
//! producer id, epoch and base sequence), so a producer retrying across a broker restart is still
//! deduplicated. It is bounded by `storage.producer_states_max`; the least recently used entry is
//! evicted first.

use std::collections::{HashMap, VecDeque};

use crate::error::StoreError;
use crate::AppendOutcome;

/// How many batches per producer and partition are remembered (Kafka keeps five, the most a
/// client may have in flight with idempotence on).
pub(crate) const BATCHES_KEPT: usize = 5;

/// How many batches at the end of each partition are read at open to rebuild the state.
pub(crate) const REBUILD_BATCHES_PER_PARTITION: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SeqBatch {
    first_seq: i32,
    last_seq: i32,
    outcome: AppendOutcome,
}

/// One producer's state on one partition.
#[derive(Debug, Clone)]
pub(crate) struct ProducerEntry {
    epoch: i16,
    batches: VecDeque<SeqBatch>,
    last_used: u64,
}

/// What to do with an incoming idempotent batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SeqCheck {
    /// Next in sequence (or the first we know of): store it.
    Append,
    /// Already stored: answer with the original outcome, store nothing.
    Duplicate(AppendOutcome),
}

/// The sequence number after `seq` (Kafka wraps at `i32::MAX` to 0).
pub(crate) fn next_seq(seq: i32) -> i32 {
    if seq == i32::MAX {
        0
    } else {
        seq + 1
    }
}

/// Last sequence number of a batch of `count` records starting at `first`.
pub(crate) fn last_seq(first: i32, count: i32) -> i32 {
    ((i64::from(first) + i64::from(count) - 1) % (i64::from(i32::MAX) + 1)) as i32
}

impl ProducerEntry {
    pub(crate) fn new(epoch: i16) -> Self {
        Self { epoch, batches: VecDeque::with_capacity(BATCHES_KEPT), last_used: 0 }
    }

    /// Checks a batch (`epoch`, sequences `first..=last`) against this state.
    pub(crate) fn check(&self, epoch: i16, first: i32, last: i32) -> Result<SeqCheck, StoreError> {
        if epoch < self.epoch {
            return Err(StoreError::InvalidProducerEpoch { current: self.epoch, got: epoch });
        }
        if epoch > self.epoch {
            // A bumped epoch starts its sequence again at zero.
            return if first == 0 {
                Ok(SeqCheck::Append)
            } else {
                Err(StoreError::OutOfOrderSequence { expected: 0, got: first })
            };
        }
        if let Some(b) = self.batches.iter().find(|b| b.first_seq == first && b.last_seq == last) {
            return Ok(SeqCheck::Duplicate(b.outcome));
        }
        match self.batches.back() {
            None => Ok(SeqCheck::Append),
            Some(b) if next_seq(b.last_seq) == first => Ok(SeqCheck::Append),
            Some(b) => Err(StoreError::OutOfOrderSequence { expected: next_seq(b.last_seq), got: first }),
        }
    }

    /// Records a stored batch.
    pub(crate) fn record(&mut self, epoch: i16, first: i32, last: i32, outcome: AppendOutcome, clock: u64) {
        if epoch != self.epoch {
            self.epoch = epoch;
            self.batches.clear();
        }
        if self.batches.len() == BATCHES_KEPT {
            self.batches.pop_front();
        }
        self.batches.push_back(SeqBatch { first_seq: first, last_seq: last, outcome });
        self.last_used = clock;
    }
}

/// All producers' state, keyed by (partition key, producer id).
#[derive(Debug)]
pub(crate) struct ProducerStates {
    map: HashMap<(u64, i64), ProducerEntry>,
    max: usize,
    clock: u64,
}

impl ProducerStates {
    pub(crate) fn new(max: usize) -> Self {
        Self { map: HashMap::new(), max: max.max(1), clock: 0 }
    }

    pub(crate) fn get(&self, key: &(u64, i64)) -> Option<&ProducerEntry> {
        self.map.get(key)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// The logical clock for `record`; increases with every call.
    pub(crate) fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Stores an entry, evicting the least recently used one when full.
    pub(crate) fn insert(&mut self, key: (u64, i64), entry: ProducerEntry) {
        if !self.map.contains_key(&key) && self.map.len() >= self.max {
            if let Some(oldest) = self.map.iter().min_by_key(|(_, e)| e.last_used).map(|(k, _)| *k) {
                self.map.remove(&oldest);
            }
        }
        self.map.insert(key, entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(base: i64) -> AppendOutcome {
        AppendOutcome { base_offset: base, last_offset: base + 1, log_append_time_ms: None, log_start_offset: 0 }
    }

    #[test]
    fn sequence_rules() {
        let mut e = ProducerEntry::new(0);
        assert_eq!(e.check(0, 7, 8).ok(), Some(SeqCheck::Append), "first batch we know of is accepted");
        e.record(0, 0, 1, outcome(10), 1);
        e.record(0, 2, 3, outcome(12), 2);
        assert_eq!(e.check(0, 0, 1).ok(), Some(SeqCheck::Duplicate(outcome(10))));
        assert_eq!(e.check(0, 4, 9).ok(), Some(SeqCheck::Append));
        assert!(matches!(e.check(0, 5, 9), Err(StoreError::OutOfOrderSequence { expected: 4, got: 5 })));
        assert!(matches!(e.check(1, 4, 9), Err(StoreError::OutOfOrderSequence { expected: 0, got: 4 })));
        assert_eq!(e.check(1, 0, 3).ok(), Some(SeqCheck::Append));
        e.record(1, 0, 3, outcome(20), 3);
        assert!(matches!(e.check(0, 4, 5), Err(StoreError::InvalidProducerEpoch { current: 1, got: 0 })));
        for i in 0..10 {
            e.record(1, 4 + i, 4 + i, outcome(30 + i as i64), 4);
        }
        assert_eq!(e.batches.len(), BATCHES_KEPT);
        assert_eq!(last_seq(i32::MAX, 2), 0);
        assert_eq!(next_seq(i32::MAX), 0);
    }

    #[test]
    fn bounded_with_lru_eviction() {
        let mut s = ProducerStates::new(2);
        for pid in 0..3 {
            let mut e = ProducerEntry::new(0);
            let clock = s.tick();
            e.record(0, 0, 0, outcome(0), clock);
            s.insert((1, pid), e);
        }
        assert_eq!(s.len(), 2);
        assert!(s.get(&(1, 0)).is_none(), "the least recently used producer was evicted");
        assert!(s.get(&(1, 2)).is_some());
    }
}
