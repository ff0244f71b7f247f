//! Topic administration inside a round: create, delete, add partitions, alter settings, move a
//! partition's log start (DeleteRecords); topic name rules.

use super::*;

/// Kafka's topic name rules.
pub fn validate_topic_name(name: &str) -> Result<(), StoreError> {
    let bad = |reason| Err(StoreError::InvalidTopicName { name: name.to_string(), reason });
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > 249 {
        return bad("longer than 249 characters");
    }
    if name == "." || name == ".." {
        return bad("'.' and '..' are not allowed");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-') {
        return bad("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

impl Writer {
    pub(super) fn admin(&mut self, t: &mut Tables<'_>, r: &mut Round, cmd: AdminCmd) -> Result<(), StoreError> {
        match cmd {
            AdminCmd::CreateTopic { name, partitions, config } => {
                validate_topic_name(&name)?;
                if t.topics.get(name.as_str())?.is_some() {
                    return Err(StoreError::TopicExists(name));
                }
                self.check_partitions(&name, partitions, partitions)?;
                let topic_count = t.topics.len()?;
                if topic_count >= u64::from(self.cfg.topics_max) {
                    return Err(StoreError::LimitReached {
                        key: "storage.topics_max",
                        limit: self.cfg.topics_max.into(),
                    });
                }
                let id = t.meta.get(META_NEXT_TOPIC_ID)?.map_or(1, |v| v.value()) as u32;
                t.meta.insert(META_NEXT_TOPIC_ID, u64::from(id) + 1)?;
                let rec = TopicRecord { id, partitions, config_text: config.to_text() };
                t.topics.insert(name.as_str(), rec.encode().as_slice())?;
                let mut states = Vec::with_capacity(partitions as usize);
                for p in 0..partitions {
                    let key = partition_key(id, p);
                    let m = PartitionMeta { max_timestamp: i64::MIN, ..PartitionMeta::default() };
                    self.put_meta(t, r, key, m)?;
                    states.push(PartitionState::new(key, &m));
                }
                r.topic_changes.push(TopicChange::Upsert(Arc::new(TopicState {
                    id,
                    name,
                    config,
                    partitions: states,
                })));
            }
            AdminCmd::DeleteTopic { name } => {
                let rec = match t.topics.get(name.as_str())? {
                    Some(v) => TopicRecord::decode(v.value())?,
                    None => return Err(StoreError::UnknownTopic(name)),
                };
                for p in 0..rec.partitions {
                    let key = partition_key(rec.id, p);
                    t.log.retain_in((key, 0u64)..=(key, u64::MAX), |_, _| false)?;
                    t.pieces.retain_in((key, 0u64, 0u8)..=(key, u64::MAX, u8::MAX), |_, _| false)?;
                    t.time.retain_in((key, i64::MIN)..=(key, i64::MAX), |_, _| false)?;
                    t.parts.remove(key)?;
                    t.clean.remove(key)?;
                    r.compaction.states.insert(key, None);
                    r.metas.insert(key, None);
                    r.fronts.insert(key, None);
                }
                t.topics.remove(name.as_str())?;
                r.topic_changes.push(TopicChange::Remove(name));
            }
            AdminCmd::CreatePartitions { name, total } => {
                let mut rec = match t.topics.get(name.as_str())? {
                    Some(v) => TopicRecord::decode(v.value())?,
                    None => return Err(StoreError::UnknownTopic(name)),
                };
                if total <= rec.partitions {
                    return Err(StoreError::InvalidPartitions {
                        topic: name,
                        reason: format!(
                            "topic has {} partitions; the new count must be larger (got {total})",
                            rec.partitions
                        ),
                    });
                }
                self.check_partitions(&name, total, total - rec.partitions)?;
                let current = self.current_topic(r, &name)?;
                let mut states = current.partitions.clone();
                for p in rec.partitions..total {
                    let key = partition_key(rec.id, p);
                    let m = PartitionMeta { max_timestamp: i64::MIN, ..PartitionMeta::default() };
                    self.put_meta(t, r, key, m)?;
                    states.push(PartitionState::new(key, &m));
                }
                rec.partitions = total;
                t.topics.insert(name.as_str(), rec.encode().as_slice())?;
                r.topic_changes.push(TopicChange::Upsert(Arc::new(TopicState {
                    id: rec.id,
                    name,
                    config: current.config.clone(),
                    partitions: states,
                })));
            }
            AdminCmd::AlterConfig { name, config } => {
                let mut rec = match t.topics.get(name.as_str())? {
                    Some(v) => TopicRecord::decode(v.value())?,
                    None => return Err(StoreError::UnknownTopic(name)),
                };
                rec.config_text = config.to_text();
                t.topics.insert(name.as_str(), rec.encode().as_slice())?;
                let current = self.current_topic(r, &name)?;
                if config.durability == Durability::Fsync {
                    // This commit is durable: nothing relaxed is left to reserve offsets for.
                    for p in &current.partitions {
                        if let Some(m) = self.meta(r, p.key).filter(|m| m.reserved_offset > m.next_offset) {
                            self.put_meta(t, r, p.key, PartitionMeta { reserved_offset: m.next_offset, ..m })?;
                        }
                    }
                }
                r.topic_changes.push(TopicChange::Upsert(Arc::new(TopicState {
                    id: rec.id,
                    name,
                    config,
                    partitions: current.partitions.clone(),
                })));
            }
            AdminCmd::DeleteRecords { name, partition, offset } => {
                let topic = self.current_topic(r, &name)?;
                let unknown = || StoreError::UnknownPartition { topic: name.clone(), partition };
                let pkey = usize::try_from(partition)
                    .ok()
                    .and_then(|i| topic.partitions.get(i))
                    .map(|p| p.key)
                    .ok_or_else(unknown)?;
                if !topic.config.cleanup_policy.deletes() {
                    // Kafka: a compact-only topic keeps every key's latest record.
                    return Err(StoreError::DeleteRecordsPolicy { topic: name, partition });
                }
                let mut m = self.meta(r, pkey).ok_or_else(unknown)?;
                let high = m.next_offset as i64;
                let to = if offset == -1 { high } else { offset };
                if to < 0 || to > high {
                    return Err(StoreError::OffsetOutOfRange {
                        offset,
                        log_start_offset: m.log_start_offset as i64,
                        high_watermark: high,
                    });
                }
                // Kafka: an offset at or below the log start changes nothing.
                if to as u64 > m.log_start_offset {
                    m.log_start_offset = to as u64;
                    self.put_meta(t, r, pkey, m)?;
                    self.trim.insert(pkey);
                }
            }
        }
        Ok(())
    }

    pub(super) fn check_partitions(&self, name: &str, total: u32, added: u32) -> Result<(), StoreError> {
        if total == 0 || total > self.cfg.partitions_per_topic_max {
            return Err(StoreError::InvalidPartitions {
                topic: name.to_string(),
                reason: format!(
                    "must be between 1 and storage.partitions_per_topic_max = {} (got {total})",
                    self.cfg.partitions_per_topic_max
                ),
            });
        }
        let existing = self.metas.len() as u64;
        if existing + u64::from(added) > u64::from(self.cfg.partitions_total_max) {
            return Err(StoreError::LimitReached {
                key: "storage.partitions_total_max",
                limit: self.cfg.partitions_total_max.into(),
            });
        }
        Ok(())
    }

    /// The topic as of this round (including changes staged earlier in it).
    pub(super) fn current_topic(&self, r: &Round, name: &str) -> Result<Arc<TopicState>, StoreError> {
        for c in r.topic_changes.iter().rev() {
            match c {
                TopicChange::Upsert(t) if t.name == name => return Ok(t.clone()),
                TopicChange::Remove(n) if n == name => return Err(StoreError::UnknownTopic(name.to_string())),
                _ => {}
            }
        }
        self.shared
            .topics
            .read()
            .map_err(|_| StoreError::Closed)?
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::UnknownTopic(name.to_string()))
    }
}
