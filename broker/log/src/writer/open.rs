//! Opening the database: creating tables, loading topics and partitions (checked against their
//! last batches), rebuilding producer state, filling the gaps a crash left in relaxed partitions;
//! and the in-process reopen after a failed write (faults pause writes, the database is reopened
//! and the writer's state reconciled with what the file holds).

use super::*;

/// State read from the database at open.
pub(crate) struct Loaded {
    pub topics: HashMap<String, Arc<TopicState>>,
    pub metas: HashMap<u64, PartitionMeta>,
    pub producers: ProducerStates,
    /// Footprint of every key-value entry (`tables::kv_footprint`), charged to `storage.max_bytes`.
    pub kv_bytes: u64,
    /// Partitions that got a gap batch at this open (see `fill_gaps`).
    pub gaps: usize,
}

/// Creates missing tables and reads topics and partition metadata, checking that each
/// partition's metadata agrees with its last stored batch; fills the gaps a crash left in
/// `relaxed` partitions (`fill_gaps`).
pub(crate) fn load(db: &Database, config: &StorageConfig) -> Result<Loaded, StoreError> {
    let tx = db.begin_write()?;
    {
        tx.open_table(TOPICS)?;
        tx.open_table(PARTITIONS)?;
        tx.open_table(LOG)?;
        tx.open_table(LOG_PIECES)?;
        tx.open_table(TIME_INDEX)?;
        tx.open_table(META)?;
    }
    tx.commit()?;
    let rtx = db.begin_read()?;
    let topics_t = rtx.open_table(TOPICS)?;
    let parts_t = rtx.open_table(PARTITIONS)?;
    let log_t = rtx.open_table(LOG)?;
    let mut topics = HashMap::new();
    let mut metas = HashMap::new();
    // (name, id, settings, partition keys), and the partitions holding a reservation.
    let mut listed = Vec::new();
    let mut held = Vec::new();
    for e in topics_t.iter()? {
        let (name, rec) = e?;
        let rec = TopicRecord::decode(rec.value())?;
        let config = TopicConfig::from_text(&rec.config_text).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut partitions = Vec::with_capacity(rec.partitions as usize);
        for p in 0..rec.partitions {
            let key = partition_key(rec.id, p);
            let meta = match parts_t.get(key)? {
                Some(v) => PartitionMeta::decode(v.value())?,
                None => return Err(StoreError::Corrupt(format!("topic {} lacks partition {p}", name.value()))),
            };
            if let Some(last) = log_t.range((key, 0u64)..=(key, u64::MAX))?.next_back() {
                let (k, v) = last?;
                let (_, b) = split_value(v.value())?;
                let h = BatchHeader::parse(b).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                // The next offset may be above the last batch's end: a hole at the end, where a
                // restore moved it up over offsets the lost gateway gave (`Store::restore_end`),
                // as a partition whose batches retention deleted has no batch at all.
                if (h.next_offset() as u64) > meta.next_offset || k.value().1 as i64 != h.base_offset {
                    return Err(StoreError::Corrupt(format!(
                        "{}-{p}: metadata says next offset {}, last batch ends after it at {}",
                        name.value(),
                        meta.next_offset,
                        h.next_offset()
                    )));
                }
            }
            if meta.reserved_offset > meta.next_offset {
                held.push((key, name.value().to_string(), p));
            }
            partitions.push(key);
            metas.insert(key, meta);
        }
        listed.push((name.value().to_string(), rec.id, config, partitions));
    }
    let mut producers = ProducerStates::new(config.producer_states_max as usize);
    for (&key, meta) in &metas {
        rebuild_producers(&log_t, key, meta, &mut producers)?;
    }
    let mut kv_bytes = 0u64;
    let spaces: Vec<String> =
        rtx.list_tables()?.map(|t| t.name().to_string()).filter(|n| KvSpace::is_space(n)).collect();
    for space in &spaces {
        let def: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new(space);
        for e in rtx.open_table(def)?.iter()? {
            let (k, v) = e?;
            kv_bytes += kv_footprint(k.value().len(), v.value().len());
        }
    }
    drop((topics_t, parts_t, log_t, rtx));
    let gaps = fill_gaps(db, &mut metas, &held)?;
    for (name, id, config, keys) in listed {
        let partitions = keys.iter().filter_map(|k| metas.get(k).map(|m| PartitionState::new(*k, m))).collect();
        topics.insert(name.clone(), Arc::new(TopicState { id, name, config, partitions }));
    }
    Ok(Loaded { topics, metas, producers, kv_bytes, gaps })
}

/// After a crash (or an in-process reopen after a failed write), a partition whose durable
/// reservation is above its next offset lost non-durable commits that had handed out offsets up
/// to it: `[next, reserved)` gets gap batches (`batch::encode_gap_batch`) in one durable commit,
/// so those offsets are never handed out again and consumers move past them. The reservation is
/// released (reserved = next). Returns how many partitions got a gap.
pub(super) fn fill_gaps(
    db: &Database,
    metas: &mut HashMap<u64, PartitionMeta>,
    held: &[(u64, String, u32)],
) -> Result<usize, StoreError> {
    if held.is_empty() {
        return Ok(0);
    }
    let now = now_ms();
    let tx = db.begin_write()?;
    {
        let mut log = tx.open_table(LOG)?;
        let mut pieces = tx.open_table(LOG_PIECES)?;
        let mut parts = tx.open_table(PARTITIONS)?;
        for (key, topic, partition) in held {
            let Some(m) = metas.get_mut(key) else { continue };
            let from = m.next_offset;
            let to = m.reserved_offset;
            put_gap(&mut log, &mut pieces, *key, m, to, now)?;
            parts.insert(*key, m.encode().as_slice())?;
            tracing::warn!(%topic, partition, from, to = m.next_offset,
                "offsets handed out by relaxed commits a crash undid are skipped (a gap batch); they are never reused");
        }
    }
    tx.commit()?;
    Ok(held.len())
}

/// Gap batches over `[m.next_offset, to)` (as many as `batch::GAP_OFFSETS_MAX` allows each),
/// accounted in `m`: offsets no record will ever have.
pub(super) fn put_gap(
    log: &mut crate::stored::LogTable<'_>,
    pieces: &mut crate::stored::PiecesTable<'_>,
    key: u64,
    m: &mut PartitionMeta,
    to: u64,
    now: i64,
) -> Result<(), StoreError> {
    while m.next_offset < to {
        let count = (to - m.next_offset).min(batch::GAP_OFFSETS_MAX as u64);
        let mut value = now.to_be_bytes().to_vec();
        value.extend_from_slice(&batch::encode_gap_batch(m.next_offset as i64, count as i64, now));
        let stored = stored::put_batch(log, pieces, key, m.next_offset, &value)?;
        m.account_batch(m.next_offset + count, stored.batch_len as usize, stored.footprint);
    }
    Ok(())
}

/// Reads the last batches of a partition (oldest first) into the idempotent-producer state.
pub(super) fn rebuild_producers(
    log: &redb::ReadOnlyTable<(u64, u64), &'static [u8]>,
    key: u64,
    meta: &PartitionMeta,
    producers: &mut ProducerStates,
) -> Result<(), StoreError> {
    let mut tail = Vec::new();
    for e in log.range((key, 0u64)..=(key, u64::MAX))?.rev().take(producers::REBUILD_BATCHES_PER_PARTITION) {
        let (_, v) = e?;
        let (_, b) = split_value(v.value())?;
        let h = BatchHeader::parse(b).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if h.producer_id >= 0 {
            tail.push(h);
        }
    }
    for h in tail.into_iter().rev() {
        let log_append = h.attributes & 0x08 != 0;
        let outcome = AppendOutcome {
            base_offset: h.base_offset,
            last_offset: h.last_offset(),
            log_append_time_ms: log_append.then_some(h.max_timestamp),
            log_start_offset: meta.log_start_offset as i64,
        };
        let pk = (key, h.producer_id);
        let mut entry = producers.get(&pk).cloned().unwrap_or_else(|| ProducerEntry::new(h.producer_epoch));
        let clock = producers.tick();
        entry.record(
            h.producer_epoch,
            h.base_sequence,
            // The span, not the record count: compaction removes records from a batch but keeps
            // its lastOffsetDelta, so the producer's last sequence stays (as Kafka's cleaner).
            producers::last_seq(h.base_sequence, h.last_offset_delta.saturating_add(1)),
            outcome,
            clock,
        );
        producers.insert(pk, entry);
    }
    Ok(())
}

impl Writer {
    /// Why in-process and not `exit` for systemd to restart us: a restart gives up the
    /// connections and sessions of every client and, with a full disk or a file-size limit,
    /// comes back to the same fault with reads gone meanwhile; the reopen is what a restart
    /// would do to the store (drop the database, open and repair it, reload the state), without
    /// the rest. Counts the failure, pauses writes for `write_backoff` and reopens at once so
    /// reads work again.
    pub(super) fn write_failed(&mut self, e: &StoreError) {
        self.shared.counters.failed_commits.fetch_add(1, Ordering::Relaxed);
        let failures = self.fault.as_ref().map_or(0, |f| f.failures) + 1;
        let pause = write_backoff(failures);
        tracing::error!(error = %e, failures, pause_ms = pause.as_millis() as u64,
            "write failed: reopening the database; writes are refused until the pause ends");
        self.fault = Some(Fault { cause: e.to_string(), failures, retry_at: Instant::now() + pause });
        self.shared.refusals.record(
            crate::refusals::RefusalKind::Storage,
            "store",
            "",
            &format!("write failed, writes paused: {e}"),
        );
        self.publish_fault();
        self.reopen();
    }

    pub(super) fn write_succeeded(&mut self) {
        if let Some(f) = self.fault.take() {
            tracing::info!(failures = f.failures, "writes succeed again after a storage fault");
            self.publish_fault();
        }
    }

    /// The fault as readers and the watchdog see it.
    pub(super) fn publish_fault(&self) {
        if let Ok(mut slot) = self.shared.fault.lock() {
            *slot = self.fault.as_ref().map(|f| f.cause.clone());
        }
    }

    /// `None`: the round may write. `Some(e)`: refuse its ops with `e` (writes paused after a
    /// fault, or the database could not be reopened yet).
    pub(super) fn fault_gate(&mut self) -> Option<StoreError> {
        let f = self.fault.as_ref()?;
        let now = Instant::now();
        if now < f.retry_at {
            let wait = f.retry_at - now;
            return Some(StoreError::Unavailable(format!(
                "writes paused after a storage fault ({}); next attempt in {} ms",
                f.cause,
                wait.as_millis()
            )));
        }
        if self.db.is_none() && !self.reopen() {
            let cause = self.fault.as_ref().map_or_else(String::new, |f| f.cause.clone());
            return Some(StoreError::Unavailable(format!("the database could not be reopened: {cause}")));
        }
        None
    }

    /// Drops the database (waiting for readers, bounded) and opens it again, reloads the state
    /// and fills the gaps of offsets the lost non-durable commits had handed out (`load`). On
    /// failure the next attempt comes after a longer pause. Returns whether it is open.
    pub(super) fn reopen(&mut self) -> bool {
        self.detach_db();
        if let Some(old) = self.db.take() {
            drop(wait_unshared(old));
        }
        let opened = crate::open_database(&self.shared.config, &self.shared.location, &self.shared.counters).and_then(
            |(db, repaired)| {
                let loaded = load(&db, &self.cfg)?;
                Ok((Arc::new(db), loaded, repaired))
            },
        );
        match opened {
            Ok((db, loaded, repaired)) => {
                let gaps = loaded.gaps;
                self.reconcile(loaded);
                if let Err(e) = crate::load_archive_marks(&db, &self.shared) {
                    tracing::warn!(error = %e, "archive marks not reloaded");
                }
                self.db = Some(db.clone());
                if let Ok(mut slot) = self.shared.db.write() {
                    *slot = Some(db);
                }
                self.shared.counters.reopens.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(repaired, gaps, "database reopened after a storage fault: reads work again");
                true
            }
            Err(e) => {
                self.shared.counters.failed_reopens.fetch_add(1, Ordering::Relaxed);
                let f = self.fault.get_or_insert(Fault { cause: String::new(), failures: 0, retry_at: Instant::now() });
                f.failures += 1;
                f.retry_at = Instant::now() + write_backoff(f.failures);
                f.cause = format!("reopening the database failed: {e}");
                tracing::error!(error = %e, failures = f.failures, "reopening the database failed; retrying later");
                self.publish_fault();
                false
            }
        }
    }

    /// After a reopen: the topic map keeps the partition states readers and watchers hold
    /// (same topic id and partition count) and moves them to what the database holds now.
    pub(super) fn reconcile(&mut self, loaded: Loaded) {
        if let Ok(mut topics) = self.shared.topics.write() {
            let mut next: HashMap<String, Arc<TopicState>> = HashMap::new();
            for (name, fresh) in &loaded.topics {
                let t = match topics.get(name) {
                    Some(old) if old.id == fresh.id && old.partitions.len() == fresh.partitions.len() => {
                        Arc::new(TopicState {
                            id: old.id,
                            name: name.clone(),
                            config: fresh.config.clone(),
                            partitions: old.partitions.clone(),
                        })
                    }
                    _ => fresh.clone(),
                };
                next.insert(name.clone(), t);
            }
            let live: HashSet<*const PartitionState> =
                next.values().flat_map(|t| t.partitions.iter().map(Arc::as_ptr)).collect();
            for old in topics.values() {
                for p in old.partitions.iter().filter(|p| !live.contains(&Arc::as_ptr(p))) {
                    p.set_deleted();
                }
            }
            for p in next.values().flat_map(|t| t.partitions.iter()) {
                if let Some(m) = loaded.metas.get(&p.key) {
                    p.logical_bytes.store(m.logical_bytes, Ordering::Relaxed);
                    p.footprint_bytes.store(m.footprint_bytes, Ordering::Relaxed);
                    // Staged records a failed round had shown are gone (a gap covers them).
                    p.staged.send_replace(m.next_offset as i64);
                    p.set_watermarks(m.log_start_offset as i64, m.next_offset as i64);
                }
            }
            *topics = next;
        }
        // The reopened database may hold topics memory had not seen (or lack ones it had).
        self.shared.topics_changed.send_modify(|n| *n = n.wrapping_add(1));
        self.adopt(loaded);
    }
}
