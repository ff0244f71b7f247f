//! Compaction of `cleanup.policy=compact` topics, in bounded steps inside the writer's rounds:
//! the latest record per key is kept, superseded records are removed, tombstones (null values)
//! are kept for `delete.retention.ms` after compaction first passed over them, then removed.
//!
//! A *pass* over one partition (one at a time, like Kafka's cleaner thread) has two phases:
//! 1. **map**: from the partition's clean offset (`CleanState`), read the dirty batches into a
//!    map key -> latest offset, up to the *dirty end*: the partition's newest batch (the active
//!    tail, never compacted), a batch appended less than `min.compaction.lag.ms` ago, or the
//!    batch whose keys would overflow `storage.compaction_memory_bytes_max` (the rest waits for
//!    the next pass);
//! 2. **rewrite**: from the log's start to the dirty end, each batch keeps the records that
//!    no later record of the map supersedes (`batch::retain_records`: same base offset and
//!    offset span, the survivors' offsets unchanged; a batch left empty is removed, so consumers
//!    see offset gaps as with Kafka).
//!
//! Both phases read at most `storage.compaction_bytes_per_commit_max` per round. Every change a
//! step makes (batches, the partition's metadata and byte accounting, its `CleanState`) is in the
//! round's one transaction: a crash keeps a step whole or not at all. A step only removes
//! records superseded by a later record of the same key, and that record is either kept or
//! itself superseded, so the latest record of every key survives any sequence of steps and
//! crashes (and is never duplicated: records are only removed, never copied elsewhere). The map
//! lives in memory only: after a crash or failed commit the pass starts again.
//!
//! A partition is compacted when its dirty share of bytes reaches `min.cleanable.dirty.ratio`,
//! when its oldest dirty batch is older than `max.compaction.lag.ms`, or when a kept tombstone
//! is due for removal. Times are the store's append times (the value prefix), not client
//! timestamps.

use super::*;
use crate::batch::Retained;
use crate::keymap::LatestKeys;
use crate::tables::CleanState;

#[derive(Debug)]
enum Phase {
    Map,
    Rewrite,
}

/// One pass in progress.
#[derive(Debug)]
pub(super) struct Pass {
    pkey: u64,
    phase: Phase,
    /// Next offset to read in the current phase.
    cursor: u64,
    /// Key -> offset of its latest record in `[clean offset, dirty_end)`, within
    /// `storage.compaction_memory_bytes_max`.
    map: LatestKeys,
    /// Offsets from here on are not compacted by this pass (set when the map phase ends).
    dirty_end: u64,
    /// When the pass started: the time tombstones it finds in the dirty part are first seen.
    started_ms: i64,
    /// Earliest removal time of the tombstones this pass kept.
    tombstone_due_ms: i64,
}

/// Counts of one round's compaction, published after its commit.
#[derive(Debug, Default)]
pub(super) struct CompactionRound {
    pub reclaimed_bytes: u64,
    pub removed_records: u64,
    pub passes: u64,
    /// Partitions whose batches were rewritten or removed: their tail cache is cleared.
    pub rewritten: HashSet<u64>,
    /// Compaction states written this round; `None` = removed.
    pub states: HashMap<u64, Option<CleanState>>,
}

/// The settings of a compacted topic that a pass needs.
struct Policy {
    min_lag_ms: i64,
    max_lag_ms: i64,
    min_ratio_ppm: u64,
    delete_retention_ms: i64,
}

impl Writer {
    /// The compaction state of a partition as of this round (`None`: never compacted).
    pub(super) fn clean_state(&self, t: &Tables<'_>, r: &Round, pkey: u64) -> Result<Option<CleanState>, StoreError> {
        if let Some(s) = r.compaction.states.get(&pkey) {
            return Ok(s.clone());
        }
        if let Some(s) = self.clean.get(&pkey) {
            return Ok(Some(s.clone()));
        }
        match t.clean.get(pkey)? {
            Some(v) => Ok(Some(CleanState::decode(v.value())?)),
            None => Ok(None),
        }
    }

    pub(super) fn put_clean_state(
        &self,
        t: &mut Tables<'_>,
        r: &mut Round,
        pkey: u64,
        s: CleanState,
    ) -> Result<(), StoreError> {
        t.clean.insert(pkey, s.encode().as_slice())?;
        r.compaction.states.insert(pkey, Some(s));
        Ok(())
    }

    /// Retention removed the front batch `[base, ..)` of `batch_len` bytes: the clean part
    /// shrinks with it.
    pub(super) fn clean_front_removed(
        &self,
        t: &mut Tables<'_>,
        r: &mut Round,
        pkey: u64,
        base: u64,
        batch_len: u64,
    ) -> Result<(), StoreError> {
        if let Some(mut s) = self.clean_state(t, r, pkey)? {
            if base < s.clean_offset {
                s.clean_bytes = debit(s.clean_bytes, batch_len, "compaction clean bytes");
                self.put_clean_state(t, r, pkey, s)?;
            }
        }
        Ok(())
    }

    /// Whether a pass is under way (the writer then keeps running rounds while idle).
    pub(super) fn compaction_pending(&self) -> bool {
        self.pass.is_some()
    }

    /// One bounded step of compaction in this round: continues the pass under way, or (when
    /// `check` is set) picks the partition that needs one most.
    pub(super) fn compaction_step(
        &mut self,
        t: &mut Tables<'_>,
        r: &mut Round,
        now: i64,
        check: bool,
    ) -> Result<(), StoreError> {
        if self.pass.is_none() && check {
            self.pass = self.pick_partition(t, r, now)?;
        }
        let mut budget = self.cfg.compaction_bytes_per_commit_max;
        while budget > 0 {
            let Some(pass) = self.pass.take() else { break };
            let Some(policy) = self.policy(pass.pkey) else { break };
            if self.meta(r, pass.pkey).is_none() {
                break;
            }
            self.pass = match pass.phase {
                Phase::Map => self.map_step(t, r, pass, &policy, now, &mut budget)?,
                Phase::Rewrite => self.rewrite_step(t, r, pass, &policy, now, &mut budget)?,
            };
        }
        Ok(())
    }

    /// The compaction settings of the partition's topic, `None` if it is gone or not compacted.
    fn policy(&self, pkey: u64) -> Option<Policy> {
        let topics = self.shared.topics.read().ok()?;
        let id = (pkey >> 32) as u32;
        let t = topics.values().find(|t| t.id == id)?;
        let c = &t.config;
        c.compacted().then(|| Policy {
            min_lag_ms: i64::try_from(c.min_compaction_lag_ms).unwrap_or(i64::MAX),
            max_lag_ms: i64::try_from(c.max_compaction_lag_ms).unwrap_or(i64::MAX),
            min_ratio_ppm: u64::from(c.min_cleanable_dirty_ratio_ppm),
            delete_retention_ms: i64::try_from(c.delete_retention_ms).unwrap_or(i64::MAX),
        })
    }

    /// Looks at every compacted partition: publishes the dirty bytes, the highest dirty ratio
    /// and the compaction lag, and returns a pass over the dirtiest partition that is due.
    fn pick_partition(&mut self, t: &mut Tables<'_>, r: &mut Round, now: i64) -> Result<Option<Pass>, StoreError> {
        let pkeys: Vec<u64> = match self.shared.topics.read() {
            Ok(m) => {
                m.values().filter(|t| t.config.compacted()).flat_map(|t| t.partitions.iter().map(|p| p.key)).collect()
            }
            Err(_) => return Ok(None),
        };
        let (mut dirty_total, mut ratio_max, mut lag_max) = (0u64, 0u64, 0u64);
        let mut best: Option<(u64, u64, u64, bool)> = None; // (ratio, pkey, clean offset, map first)
        for pkey in pkeys {
            let (Some(m), Some(policy)) = (self.meta(r, pkey), self.policy(pkey)) else { continue };
            if m.batches == 0 {
                continue;
            }
            let s = self.clean_state(t, r, pkey)?.unwrap_or_default();
            let first_dirty = match t.log.range((pkey, s.clean_offset)..=(pkey, u64::MAX))?.next() {
                Some(e) => {
                    let (k, v) = e?;
                    Some((k.value().1, split_value(v.value())?.0))
                }
                None => None,
            };
            let last_base = match t.log.range((pkey, 0u64)..=(pkey, u64::MAX))?.next_back() {
                Some(e) => e?.0.value().1,
                None => continue,
            };
            let dirty = m.logical_bytes.saturating_sub(s.clean_bytes);
            let ratio = dirty.saturating_mul(1_000_000).checked_div(m.logical_bytes).unwrap_or(0);
            dirty_total += dirty;
            ratio_max = ratio_max.max(ratio);
            let mut due = now >= s.tombstone_due_ms;
            let mut map_first = false;
            if let Some((base, appended)) = first_dirty {
                let age = now.saturating_sub(appended).max(0);
                lag_max = lag_max.max(age as u64);
                let compactable = base < last_base && age >= policy.min_lag_ms;
                if compactable && (ratio >= policy.min_ratio_ppm || age > policy.max_lag_ms) {
                    due = true;
                    map_first = true;
                }
            }
            if due && best.is_none_or(|b| ratio > b.0) {
                best = Some((ratio, pkey, s.clean_offset, map_first));
            }
        }
        let c = &self.shared.counters;
        c.compaction_dirty_bytes.store(dirty_total, Ordering::Relaxed);
        c.compaction_dirty_ratio_max_ppm.store(ratio_max, Ordering::Relaxed);
        c.compaction_lag_ms.store(lag_max, Ordering::Relaxed);
        Ok(best.map(|(_, pkey, clean_offset, map_first)| Pass {
            pkey,
            // Only tombstones are due: nothing new to map, the clean part is rewritten.
            phase: if map_first { Phase::Map } else { Phase::Rewrite },
            cursor: if map_first { clean_offset } else { 0 },
            map: LatestKeys::new(self.cfg.compaction_memory_bytes_max),
            dirty_end: clean_offset,
            started_ms: now,
            tombstone_due_ms: i64::MAX,
        }))
    }

    /// Maps dirty batches from `pass.cursor` until the dirty end, the memory limit or the budget.
    fn map_step(
        &mut self,
        t: &mut Tables<'_>,
        _r: &mut Round,
        mut pass: Pass,
        policy: &Policy,
        now: i64,
        budget: &mut u64,
    ) -> Result<Option<Pass>, StoreError> {
        let pkey = pass.pkey;
        let last_base = match t.log.range((pkey, 0u64)..=(pkey, u64::MAX))?.next_back() {
            Some(e) => e?.0.value().1,
            None => return Ok(None),
        };
        let limit = self.cfg.decompressed_size_bytes_max;
        let mut ended = true;
        for e in t.log.range((pkey, pass.cursor)..=(pkey, u64::MAX))? {
            let (k, v) = e?;
            let base = k.value().1;
            let (appended, head) = split_value(v.value())?;
            // The active tail and batches within min.compaction.lag.ms are left alone.
            if base >= last_base || now.saturating_sub(appended) < policy.min_lag_ms {
                pass.dirty_end = base;
                break;
            }
            if *budget == 0 {
                ended = false;
                break;
            }
            let batch = stored::read_batch(&t.pieces, pkey, base, head)?;
            if !pass.map.admit(&batch, 0, limit).map_err(|e| StoreError::Corrupt(e.to_string()))? {
                // The map is full: this pass compacts up to here, the next one goes on.
                pass.dirty_end = base;
                break;
            }
            let h = BatchHeader::parse(&batch).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            pass.cursor = h.next_offset() as u64;
            pass.dirty_end = pass.cursor;
            *budget = budget.saturating_sub(batch.len() as u64);
        }
        if ended {
            pass.phase = Phase::Rewrite;
            pass.cursor = 0;
        }
        Ok(Some(pass))
    }

    /// Rewrites batches from `pass.cursor` up to the dirty end, within the budget.
    fn rewrite_step(
        &mut self,
        t: &mut Tables<'_>,
        r: &mut Round,
        mut pass: Pass,
        policy: &Policy,
        now: i64,
        budget: &mut u64,
    ) -> Result<Option<Pass>, StoreError> {
        let pkey = pass.pkey;
        let Some(mut m) = self.meta(r, pkey) else { return Ok(None) };
        let mut s = self.clean_state(t, r, pkey)?.unwrap_or_default();
        let limit = self.cfg.decompressed_size_bytes_max;
        let mut removed_front = false;
        let mut finished = false;
        while *budget > 0 {
            let next = match t.log.range((pkey, pass.cursor)..(pkey, pass.dirty_end.max(pass.cursor)))?.next() {
                Some(e) => {
                    let (k, v) = e?;
                    let (appended, head) = split_value(v.value())?;
                    let base = k.value().1;
                    Some((base, appended, stored::read_batch(&t.pieces, pkey, base, head)?.into_owned()))
                }
                None => None,
            };
            let Some((base, appended, old)) = next else {
                finished = true;
                break;
            };
            let old = &old[..];
            let h = BatchHeader::parse(old).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let clean = base < s.clean_offset;
            let horizon = if clean { s.cleaned_at(base).unwrap_or(now) } else { pass.started_ms };
            let expires = horizon.saturating_add(policy.delete_retention_ms);
            let mut due = pass.tombstone_due_ms;
            let retained = batch::retain_records(old, limit, |rec, offset| {
                // Kafka's cleaner drops records without a key (they cannot be compacted).
                let Some(key) = rec.key else { return false };
                if pass.map.latest(key).is_some_and(|latest| latest > offset) {
                    return false;
                }
                if rec.value.is_none() {
                    if clean && expires <= now {
                        return false;
                    }
                    due = due.min(expires);
                }
                true
            })
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            pass.tombstone_due_ms = due;
            let old_len = old.len() as u64;
            let new_len = match retained {
                Retained::All => old_len,
                Retained::None => {
                    let gone = stored::remove_batch(&mut t.log, &mut t.pieces, pkey, base)?
                        .ok_or_else(|| StoreError::Corrupt(format!("batch ({pkey:#x}, {base}) vanished")))?;
                    m.logical_bytes = debit(m.logical_bytes, gone.batch_len, "partition logical bytes");
                    m.footprint_bytes = debit(m.footprint_bytes, gone.footprint, "partition footprint bytes");
                    m.batches = debit(m.batches, 1, "partition batches");
                    r.compaction.removed_records += h.record_count.max(0) as u64;
                    r.compaction.rewritten.insert(pkey);
                    removed_front = true;
                    0
                }
                Retained::Some { batch: new, removed } => {
                    let mut value = Vec::with_capacity(VALUE_PREFIX_LEN + new.len());
                    value.extend_from_slice(&appended.to_be_bytes());
                    value.extend_from_slice(&new);
                    let gone = stored::remove_batch(&mut t.log, &mut t.pieces, pkey, base)?
                        .ok_or_else(|| StoreError::Corrupt(format!("batch ({pkey:#x}, {base}) vanished")))?;
                    let put = stored::put_batch(&mut t.log, &mut t.pieces, pkey, base, &value)?;
                    m.logical_bytes = debit(m.logical_bytes + put.batch_len, gone.batch_len, "partition logical bytes");
                    m.footprint_bytes =
                        debit(m.footprint_bytes + put.footprint, gone.footprint, "partition footprint bytes");
                    r.compaction.removed_records += removed;
                    r.compaction.rewritten.insert(pkey);
                    new.len() as u64
                }
            };
            r.compaction.reclaimed_bytes += old_len - new_len;
            if clean {
                s.clean_bytes = debit(s.clean_bytes + new_len, old_len, "compaction clean bytes");
            } else {
                s.clean_bytes += new_len;
                s.extend(h.next_offset() as u64, pass.started_ms);
            }
            pass.cursor = h.next_offset() as u64;
            *budget = budget.saturating_sub(old_len);
        }
        if removed_front {
            let front = match t.log.range((pkey, 0u64)..=(pkey, u64::MAX))?.next() {
                Some(e) => Some(split_value(e?.1.value())?.0),
                None => None,
            };
            r.fronts.insert(pkey, front);
        }
        if finished {
            if pass.dirty_end > s.clean_offset {
                s.extend(pass.dirty_end, pass.started_ms);
            }
            s.tombstone_due_ms = pass.tombstone_due_ms;
            r.compaction.passes += 1;
        }
        self.put_meta(t, r, pkey, m)?;
        self.put_clean_state(t, r, pkey, s)?;
        Ok((!finished).then_some(pass))
    }
}
