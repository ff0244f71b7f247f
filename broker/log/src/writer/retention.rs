//! Retention: deleting partitions' oldest batches by the global disk budget (archived batches
//! first), `retention.bytes` and `retention.ms`, and those wholly below a log start that
//! DeleteRecords moved.

use super::*;

impl Writer {
    /// Deletes the oldest batch of a partition if `condition(its header, its length, the
    /// partition's metadata)` holds. Returns the footprint freed, `None` if nothing was deleted.
    pub(super) fn delete_front_if(
        &mut self,
        t: &mut Tables<'_>,
        r: &mut Round,
        pkey: u64,
        condition: impl FnOnce(&BatchHeader, u64, &PartitionMeta) -> bool,
    ) -> Result<Option<u64>, StoreError> {
        let Some(mut m) = self.meta(r, pkey) else { return Ok(None) };
        let first = match t.log.range((pkey, 0u64)..=(pkey, u64::MAX))?.next() {
            Some(e) => {
                let (k, v) = e?;
                let (_, b) = split_value(v.value())?;
                let h = BatchHeader::parse(b).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                // The head may hold only the batch's first bytes (`tables::layout`).
                if !condition(&h, h.total_len().max(b.len()) as u64, &m) {
                    return Ok(None);
                }
                Some((k.value().1, h.next_offset() as u64))
            }
            None => None,
        };
        let Some((base, next)) = first else {
            r.fronts.insert(pkey, None);
            return Ok(None);
        };
        let removed = stored::remove_batch(&mut t.log, &mut t.pieces, pkey, base)?
            .ok_or_else(|| StoreError::Corrupt(format!("batch ({pkey:#x}, {base}) vanished")))?;
        let (batch_len, fp) = (removed.batch_len, removed.footprint);
        self.clean_front_removed(t, r, pkey, base, batch_len)?;
        debug_assert!(next <= m.next_offset, "front batch ends at {next}: {m:?}");
        // The log start never moves back: DeleteRecords may have put it above this batch's end.
        m.log_start_offset = m.log_start_offset.max(next);
        m.logical_bytes = debit(m.logical_bytes, batch_len, "partition logical bytes");
        m.footprint_bytes = debit(m.footprint_bytes, fp, "partition footprint bytes");
        m.batches = debit(m.batches, 1, "partition batches");
        // Time index: entries pointing below the new log start move to it (see tables.rs).
        let mut stale = Vec::new();
        for e in t.time.range((pkey, i64::MIN)..=(pkey, i64::MAX))? {
            let (k, v) = e?;
            if v.value() >= next {
                break;
            }
            stale.push(k.value().1);
        }
        if let Some(&last_ts) = stale.last() {
            for ts in &stale {
                t.time.remove((pkey, *ts))?;
            }
            t.time.insert((pkey, last_ts), next)?;
        }
        let new_front = match t.log.range((pkey, next)..=(pkey, u64::MAX))?.next() {
            Some(e) => Some(split_value(e?.1.value())?.0),
            None => None,
        };
        r.fronts.insert(pkey, new_front);
        self.put_meta(t, r, pkey, m)?;
        r.deleted_batches += 1;
        r.deleted_bytes += batch_len;
        if (next as i64) > self.archived(pkey) {
            r.deleted_unarchived_batches += 1;
        }
        Ok(Some(fp))
    }

    /// The partition's archive mark (-1: none).
    pub(super) fn archived(&self, pkey: u64) -> i64 {
        self.pstates.get(&pkey).map_or(-1, |p| p.archived.load(Ordering::Relaxed))
    }

    pub(super) fn footprint_now(&self, r: &Round) -> u64 {
        let mut total = self.footprint_total;
        for (k, m) in &r.metas {
            let before = self.metas.get(k).map_or(0, |m| m.footprint_bytes);
            let after = m.map_or(0, |m| m.footprint_bytes);
            total = debit(total + after, before, "footprint now");
        }
        total
    }

    /// Per-topic `retention.bytes` (Kafka semantics: delete while the partition stays at or
    /// above the limit without the batch) and the global disk budget (oldest batches first,
    /// from the high mark down to the low mark).
    pub(super) fn size_retention(&mut self, t: &mut Tables<'_>, r: &mut Round) -> Result<(), StoreError> {
        let mut freed = 0u64;
        let cap = self.cfg.retention_delete_bytes_per_commit_max;
        let limited: Vec<(u64, u64)> = r.retention_bytes.iter().map(|(k, l)| (*k, *l)).collect();
        for (pkey, limit) in limited {
            while freed < cap {
                let over = |_: &BatchHeader, len: u64, m: &PartitionMeta| m.logical_bytes.saturating_sub(len) >= limit;
                match self.delete_front_if(t, r, pkey, over)? {
                    Some(fp) => freed += fp,
                    None => break,
                }
            }
        }
        let high = self.cfg.retention_high_bytes();
        let low = self.cfg.retention_low_bytes();
        // Key-value state (sessions, offsets, retained messages) counts against the budget too:
        // log batches are deleted to make room for it.
        let kv = apply_delta(self.kv_total, r.kv_delta, "key-value bytes");
        let mut total = self.footprint_now(r) + kv;
        if total > high {
            self.retention_active = true;
        }
        if !self.retention_active {
            return Ok(());
        }
        // Topics kept from the budget (`Store::keep_from_disk_budget`), by topic id.
        let kept: std::collections::HashSet<u64> = match (self.shared.budget_kept.read(), self.shared.topics.read()) {
            (Ok(names), Ok(topics)) => names.iter().filter_map(|n| topics.get(n)).map(|t| u64::from(t.id)).collect(),
            _ => std::collections::HashSet::new(),
        };
        // Batches another system already has go first (an archived partition's front), then
        // the oldest front across partitions.
        let archived: Vec<(u64, i64)> = self
            .pstates
            .iter()
            .map(|(k, p)| (*k, p.archived.load(Ordering::Relaxed)))
            .filter(|(k, m)| *m > 0 && !kept.contains(&(*k >> 32)))
            .collect();
        for (pkey, mark) in archived {
            while total > low && freed < cap {
                let below = |h: &BatchHeader, _: u64, _: &PartitionMeta| h.next_offset() <= mark;
                let Some(fp) = self.delete_front_if(t, r, pkey, below)? else { break };
                freed += fp;
                total = debit(total, fp, "retention total");
            }
        }
        let mut heap = BinaryHeap::new();
        let keys: Vec<u64> = self.metas.keys().chain(r.metas.keys()).copied().collect();
        let mut seen = std::collections::HashSet::new();
        for pkey in keys {
            if !seen.insert(pkey) || kept.contains(&(pkey >> 32)) {
                continue;
            }
            let Some(m) = self.meta(r, pkey) else { continue };
            if m.batches == 0 {
                continue;
            }
            let front = match self.front(r, pkey) {
                Some(f) => f,
                None => {
                    let f = match t.log.range((pkey, 0u64)..=(pkey, u64::MAX))?.next() {
                        Some(e) => Some(split_value(e?.1.value())?.0),
                        None => None,
                    };
                    r.fronts.insert(pkey, f);
                    f
                }
            };
            if let Some(at) = front {
                heap.push(Reverse((at, pkey)));
            }
        }
        while total > low && freed < cap {
            let Some(Reverse((_, pkey))) = heap.pop() else { break };
            let fp = self.delete_front_if(t, r, pkey, |_, _, _| true)?.unwrap_or(0);
            freed += fp;
            total = debit(total, fp, "retention total");
            if let Some(Some(at)) = r.fronts.get(&pkey) {
                heap.push(Reverse((*at, pkey)));
            }
        }
        if total <= low {
            self.retention_active = false;
        }
        Ok(())
    }

    /// Deletes batches wholly below their partition's log start (moved there by DeleteRecords),
    /// oldest first, at most `storage.retention_delete_bytes_per_commit_max` per round; the rest
    /// in later rounds. The batch holding the log start stays (as Kafka keeps its segment).
    pub(super) fn trim_below_log_start(&mut self, t: &mut Tables<'_>, r: &mut Round) -> Result<(), StoreError> {
        let cap = self.cfg.retention_delete_bytes_per_commit_max;
        let mut freed = 0u64;
        while freed < cap {
            let Some(&pkey) = self.trim.first() else { break };
            let below = |h: &BatchHeader, _: u64, m: &PartitionMeta| h.next_offset() as u64 <= m.log_start_offset;
            match self.delete_front_if(t, r, pkey, below)? {
                Some(fp) => freed += fp.max(1),
                None => {
                    self.trim.remove(&pkey);
                }
            }
        }
        Ok(())
    }

    /// `retention.ms`: delete front batches whose max timestamp is older than the limit.
    pub(super) fn time_retention(&mut self, t: &mut Tables<'_>, r: &mut Round, now: i64) -> Result<(), StoreError> {
        let cap = self.cfg.retention_delete_bytes_per_commit_max;
        let mut freed = 0u64;
        let topics: Vec<Arc<TopicState>> = match self.shared.topics.read() {
            Ok(m) => m.values().cloned().collect(),
            Err(_) => return Ok(()),
        };
        for topic in topics {
            // `retention.ms` deletes only under `cleanup.policy` delete (Kafka: a compact-only
            // topic keeps every key's latest record whatever its age).
            let Some(ms) = topic.config.retention_ms.filter(|_| topic.config.cleanup_policy.deletes()) else {
                continue;
            };
            let cutoff = now.saturating_sub(ms as i64);
            for p in &topic.partitions {
                while freed < cap {
                    match self.delete_front_if(t, r, p.key, |h, _, _| h.max_timestamp < cutoff)? {
                        Some(fp) => freed += fp,
                        None => break,
                    }
                }
            }
        }
        Ok(())
    }
}
