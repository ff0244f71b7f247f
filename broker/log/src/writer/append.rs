//! Appends: packing single records into batches per partition, storing client batches
//! (validated, idempotent-producer checks), offset reservations of relaxed topics, key-value
//! writes, and the partition metadata they update.

use super::*;

impl Writer {
    pub(super) fn flush_packs(
        &mut self,
        t: &mut Tables<'_>,
        r: &mut Round,
        packs: &mut Vec<(u64, Pack)>,
        now: i64,
    ) -> Result<(), StoreError> {
        while !packs.is_empty() {
            let (k, p) = packs.remove(0);
            self.flush_pack(t, r, k, p, now)?;
        }
        Ok(())
    }

    /// Writes (`Some`) or removes (`None`) one key-value entry, tracking the footprint it adds
    /// or frees (charged to `storage.max_bytes` with the log).
    pub(super) fn kv_apply(
        txn: &WriteTransaction,
        r: &mut Round,
        space: KvSpace,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let mut table = txn.open_table(space.table())?;
        let old = match value {
            Some(v) => table.insert(key, v)?.map(|g| g.value().len()),
            None => table.remove(key)?.map(|g| g.value().len()),
        };
        let added = value.map_or(0, |v| kv_footprint(key.len(), v.len()));
        let freed = old.map_or(0, |len| kv_footprint(key.len(), len));
        r.kv_delta += added as i64 - freed as i64;
        r.wrote = true;
        Ok(())
    }

    /// Keeps every offset a non-durable commit hands out below its partition's durable
    /// reservation (`PartitionMeta::reserved_offset`): a relaxed round that would go past it
    /// raises the reservation by `RELAXED_RESERVE_OFFSETS` and becomes durable; a round that is
    /// durable anyway tops up reservations that are less than half full.
    pub(super) fn reserve_relaxed_offsets(
        &mut self,
        t: &mut Tables<'_>,
        r: &mut Round,
        durable: &mut bool,
    ) -> Result<(), StoreError> {
        let relaxed: Vec<u64> = r.relaxed.iter().copied().collect();
        for pkey in relaxed {
            let Some(mut m) = self.meta(r, pkey) else { continue };
            let beyond = m.next_offset > m.reserved_offset;
            let low = m.reserved_offset.saturating_sub(m.next_offset) < RELAXED_RESERVE_OFFSETS / 2;
            if beyond || (*durable && low) {
                m.reserved_offset = m.next_offset + RELAXED_RESERVE_OFFSETS;
                self.put_meta(t, r, pkey, m)?;
                *durable = true;
            }
        }
        Ok(())
    }

    /// Covers the offsets of failed staged rounds (`Writer::lost_stages`) with gap batches, so
    /// no other record ever gets an offset a staged reader may have been given.
    pub(super) fn cover_lost_stages(&mut self, t: &mut Tables<'_>, r: &mut Round, now: i64) -> Result<(), StoreError> {
        let lost: Vec<(u64, u64)> = self.lost_stages.iter().map(|(k, end)| (*k, *end)).collect();
        for (pkey, end) in lost {
            let Some(mut m) = self.meta(r, pkey) else { continue };
            if m.next_offset >= end {
                continue;
            }
            let from = m.next_offset;
            if m.batches == 0 {
                r.fronts.insert(pkey, Some(now));
            }
            open::put_gap(&mut t.log, &mut t.pieces, pkey, &mut m, end, now)?;
            self.put_meta(t, r, pkey, m)?;
            r.wrote = true;
            tracing::warn!(partition = pkey, from, to = end,
                "offsets of a round whose commit failed are skipped (a gap batch): subscribers may have been given them");
        }
        Ok(())
    }

    /// Partition metadata as of the current round; `None` if the partition does not exist.
    pub(super) fn meta(&self, r: &Round, pkey: u64) -> Option<PartitionMeta> {
        match r.metas.get(&pkey) {
            Some(m) => *m,
            None => self.metas.get(&pkey).copied(),
        }
    }

    pub(super) fn put_meta(
        &self,
        t: &mut Tables<'_>,
        r: &mut Round,
        pkey: u64,
        m: PartitionMeta,
    ) -> Result<(), StoreError> {
        t.parts.insert(pkey, m.encode().as_slice())?;
        r.metas.insert(pkey, Some(m));
        Ok(())
    }

    pub(super) fn front(&self, r: &Round, pkey: u64) -> Option<Option<i64>> {
        r.fronts.get(&pkey).copied().or_else(|| self.fronts.get(&pkey).copied())
    }

    /// The sparse time index (`tables::TIME_INDEX`) after a batch stored at `m.next_offset`:
    /// a batch that raises the running max starts the pending range if none is open; an entry
    /// (running max, the range's first batch) is written once the range holds
    /// `TIME_INDEX_INTERVAL_BYTES` of batches. A partition's mark not known since the open is read
    /// from the tables first (`read_time_mark`).
    fn index_time(
        &self,
        t: &mut Tables<'_>,
        r: &mut Round,
        pkey: u64,
        m: &mut PartitionMeta,
        h: &BatchHeader,
    ) -> Result<(), StoreError> {
        let raised = h.max_timestamp > m.max_timestamp;
        let known = r.time_marks.get(&pkey).or_else(|| self.time_marks.get(&pkey)).copied();
        let mut mark = match known {
            Some(mark) => mark,
            None => self.read_time_mark(t, pkey, m)?,
        };
        if raised {
            m.max_timestamp = h.max_timestamp;
            if mark.pending.is_none() {
                mark.pending = Some((m.next_offset, 0));
            }
        }
        if let Some((first, bytes)) = mark.pending {
            let bytes = bytes + h.total_len() as u64;
            mark.pending = Some((first, bytes));
            if bytes >= TIME_INDEX_INTERVAL_BYTES {
                t.time.insert((pkey, m.max_timestamp), first)?;
                mark.pending = None;
            }
        }
        r.time_marks.insert(pkey, mark);
        Ok(())
    }

    /// A partition's time index mark from the tables, before the batch stored at
    /// `m.next_offset` (not yet in `m`) is counted. If the running max is past the newest entry,
    /// the batches that raised it lie in the log's last `TIME_INDEX_INTERVAL_BYTES` before that
    /// batch: the pending range starts where those begin (at or before the first that raised
    /// it, which is all an entry needs), with their bytes.
    fn read_time_mark(&self, t: &mut Tables<'_>, pkey: u64, m: &PartitionMeta) -> Result<TimeMark, StoreError> {
        let newest = match t.time.range((pkey, i64::MIN)..=(pkey, i64::MAX))?.next_back() {
            Some(e) => Some(e?.0.value().1),
            None => None,
        };
        if newest.is_some_and(|ts| ts >= m.max_timestamp) {
            return Ok(TimeMark::default());
        }
        let pending = stored::tail_region_start(&t.log, pkey, m.next_offset)?;
        Ok(TimeMark { pending })
    }

    /// Stores one batch (already carrying its base offset) and updates metadata and time index.
    /// `value` is the stored value: `VALUE_PREFIX_LEN` bytes of room for the append time, then
    /// the batch, so the batch is not copied again on its way into the table.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn store_batch(
        &self,
        t: &mut Tables<'_>,
        r: &mut Round,
        pkey: u64,
        m: &mut PartitionMeta,
        value: &mut [u8],
        h: &BatchHeader,
        limit_bytes: Option<u64>,
        now: i64,
    ) -> Result<(), StoreError> {
        value[..VALUE_PREFIX_LEN].copy_from_slice(&now.to_be_bytes());
        let stored = stored::put_batch(&mut t.log, &mut t.pieces, pkey, m.next_offset, value)?;
        if m.batches == 0 {
            r.fronts.insert(pkey, Some(now));
        }
        if let Some(limit) = limit_bytes {
            r.retention_bytes.insert(pkey, limit);
        }
        self.index_time(t, r, pkey, m, h)?;
        m.account_batch(h.next_offset() as u64, stored.batch_len as usize, stored.footprint);
        r.wrote = true;
        r.appended_records += h.record_count as u64;
        r.appended_batches += 1;
        r.appended_bytes += stored.batch_len;
        Ok(())
    }

    /// Keeps a batch this round stored for the tail cache (`batch` makes it: the stored value
    /// itself for a client batch, a copy otherwise), unless it cannot stay there: the cache
    /// keeps the newest batches up to its limit, so what this round wrote before the newest
    /// `limit` bytes is dropped now instead of at the commit.
    pub(super) fn cache_batch(
        &self,
        r: &mut Round,
        pkey: u64,
        h: &BatchHeader,
        len: usize,
        batch: impl FnOnce() -> bytes::Bytes,
    ) {
        if !self.tail.enabled() {
            return;
        }
        let limit = self.tail.limit_bytes();
        if len > limit {
            // Never cached (`TailBudget::add`).
            r.cache_cleared.insert(pkey);
            return;
        }
        r.cached_bytes += len;
        r.cached.push_back((pkey, h.base_offset, h.next_offset(), batch()));
        while r.cached_bytes > limit {
            let Some((old, _, _, b)) = r.cached.pop_front() else { break };
            r.cached_bytes -= b.len();
            r.cache_cleared.insert(old);
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn append_client_batch(
        &mut self,
        t: &mut Tables<'_>,
        r: &mut Round,
        pkey: u64,
        topic: &TopicState,
        mut bytes: BytesMut,
        header: BatchHeader,
        now: i64,
    ) -> Result<AppendOutcome, StoreError> {
        let mut m = self.meta(r, pkey).ok_or_else(|| StoreError::UnknownTopic(topic.name.clone()))?;
        let idempotent = header.producer_id >= 0;
        let (first_seq, last_seq) =
            (header.base_sequence, producers::last_seq(header.base_sequence, header.record_count));
        let pk = (pkey, header.producer_id);
        if idempotent {
            let entry = r.producers.get(&pk).or_else(|| self.producers.get(&pk));
            if let Some(e) = entry {
                if let SeqCheck::Duplicate(original) = e.check(header.producer_epoch, first_seq, last_seq)? {
                    return Ok(original);
                }
            }
        }
        let base = m.next_offset as i64;
        let b = &mut bytes[VALUE_PREFIX_LEN..];
        batch::set_base_offset(b, base);
        batch::set_leader_epoch(b, 0);
        let log_append = topic.config.timestamp_type == TimestampKind::LogAppendTime;
        if log_append {
            batch::stamp_log_append_time(b, now);
        }
        let h = BatchHeader {
            base_offset: base,
            max_timestamp: if log_append { now } else { header.max_timestamp },
            ..header
        };
        self.store_batch(t, r, pkey, &mut m, &mut bytes, &h, topic.config.retention_bytes_limit(), now)?;
        // The cache holds the stored value itself (no copy: the batch is the client's, as sent).
        let len = bytes.len() - VALUE_PREFIX_LEN;
        self.cache_batch(r, pkey, &h, len, || bytes.freeze().slice(VALUE_PREFIX_LEN..));
        self.put_meta(t, r, pkey, m)?;
        let outcome = AppendOutcome {
            base_offset: base,
            last_offset: h.last_offset(),
            log_append_time_ms: log_append.then_some(now),
            log_start_offset: m.log_start_offset as i64,
        };
        if idempotent {
            let mut entry = match r.producers.remove(&pk) {
                Some(e) => e,
                None => self.producers.get(&pk).cloned().unwrap_or_else(|| ProducerEntry::new(header.producer_epoch)),
            };
            let clock = self.producers.tick();
            entry.record(header.producer_epoch, first_seq, last_seq, outcome, clock);
            r.producers.insert(pk, entry);
        }
        Ok(outcome)
    }

    /// Encodes a partition's waiting records into batches under `batch_size_bytes_max`.
    /// On an error its waiters are left in `r.done` to be answered with it.
    pub(super) fn flush_pack(
        &mut self,
        t: &mut Tables<'_>,
        r: &mut Round,
        pkey: u64,
        pack: Pack,
        now: i64,
    ) -> Result<(), StoreError> {
        let Some(m) = self.meta(r, pkey) else {
            let e = StoreError::UnknownTopic(pack.topic.name.clone());
            pack.fail(&e);
            return Ok(());
        };
        match self.pack_records(t, r, pkey, &pack, m, now) {
            Ok(m) => {
                let log_append = pack.topic.config.timestamp_type == TimestampKind::LogAppendTime;
                let mut next = m.next_offset as i64 - pack.records.len() as i64;
                for (tx, n) in pack.waiters {
                    let outcome = AppendOutcome {
                        base_offset: next,
                        last_offset: next + n as i64 - 1,
                        log_append_time_ms: log_append.then_some(now),
                        log_start_offset: m.log_start_offset as i64,
                    };
                    next += n as i64;
                    r.done.push(Done::Append(tx, outcome));
                }
                Ok(())
            }
            Err(e) => {
                pack.doom(r);
                Err(e)
            }
        }
    }

    /// Stores a pack's records as batches; returns the partition's metadata after them.
    pub(super) fn pack_records(
        &mut self,
        t: &mut Tables<'_>,
        r: &mut Round,
        pkey: u64,
        pack: &Pack,
        mut m: PartitionMeta,
        now: i64,
    ) -> Result<PartitionMeta, StoreError> {
        let cfg = &pack.topic.config;
        let stamped: Vec<(&NewRecord, i64)> =
            pack.records.iter().map(|rec| (rec, rec.timestamp_ms.unwrap_or(now))).collect();
        let cap = self.cfg.batch_size_bytes_max as usize;
        let mut ratio = *self.ratios.get(&pkey).unwrap_or(&1.0);
        let mut out = Vec::with_capacity(VALUE_PREFIX_LEN + cap + HEADER_LEN);
        let mut i = 0;
        while i < stamped.len() {
            // Take as many records as the expected compressed size allows (at least one).
            let budget = ((cap - HEADER_LEN) as f64 * 0.95 / ratio) as usize;
            let mut raw = 0usize;
            let mut j = i;
            while j < stamped.len() && (j == i || raw + stamped[j].0.encoded_len_max() <= budget) {
                raw += stamped[j].0.encoded_len_max();
                j += 1;
            }
            loop {
                out.clear();
                out.extend_from_slice(&[0u8; VALUE_PREFIX_LEN]);
                let h = batch::encode_batch(
                    &stamped[i..j],
                    m.next_offset as i64,
                    cfg.compression,
                    cfg.timestamp_type,
                    now,
                    &mut out,
                )?;
                let encoded = out.len() - VALUE_PREFIX_LEN;
                if encoded > cap && j - i > 1 {
                    // Compressed worse than expected: halve and retry.
                    j = i + (j - i) / 2;
                    ratio = (ratio * 1.5).min(1.2);
                    continue;
                }
                let observed = (encoded - HEADER_LEN) as f64 / raw.max(1) as f64;
                if cfg.compression != Codec::None {
                    ratio = (ratio * 0.7 + observed * 0.3).clamp(0.02, 1.2);
                }
                self.store_batch(t, r, pkey, &mut m, &mut out, &h, cfg.retention_bytes_limit(), now)?;
                let batch = &out[VALUE_PREFIX_LEN..];
                self.cache_batch(r, pkey, &h, batch.len(), || bytes::Bytes::copy_from_slice(batch));
                break;
            }
            i = j;
        }
        self.ratios.insert(pkey, ratio);
        self.put_meta(t, r, pkey, m)?;
        Ok(m)
    }
}
