//! Committed offsets: their keys and values in the store's `spaces::GROUP_OFFSETS` space
//! (injective keys), and the coordinator's commit, fetch, lag and delete of them.

use super::*;

/// An offset to commit. A topic's name is
/// shared by its partitions, not copied for each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetToCommit {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: Option<String>,
}

/// A partition's committed offset as read: (topic, partition, the offset if there is one).
pub type CommittedPartition = (Arc<str>, i32, Option<CommittedOffset>);

/// A committed offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedOffset {
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: String,
    pub commit_time_ms: i64,
}

/// Called after each durable offset commit, with the group, what it committed (topic, partition,
/// offset) and the commit time (ms since the epoch). Read-only: the mirror uses it to send
/// committed offsets to the central cluster. It runs on the committing task: it must not block.
pub type CommitHook = Arc<dyn Fn(&str, &[(Arc<str>, i32, i64)], i64) + Send + Sync>;

/// Where the coordinator keeps its commit hook.
#[derive(Default)]
pub(super) struct HookSlot(std::sync::Mutex<Option<CommitHook>>);

impl std::fmt::Debug for HookSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HookSlot")
    }
}

/// Every committed offset of every group, as (group, topic, partition, offset).
pub type AllCommitted = Vec<(String, String, i32, CommittedOffset)>;

/// One partition's consumer lag: committed offset vs high watermark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    pub committed: i64,
    pub high_watermark: i64,
    pub lag: i64,
}

pub(super) fn offset_key_prefix(group: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + group.len());
    k.extend_from_slice(&(group.len() as u16).to_be_bytes());
    k.extend_from_slice(group.as_bytes());
    k
}

pub(super) fn offset_key(group: &str, topic: &str, partition: i32) -> Vec<u8> {
    let mut k = offset_key_prefix(group);
    k.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    k.extend_from_slice(topic.as_bytes());
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// (group, topic, partition) of an offset key.
pub(super) fn parse_offset_key(k: &[u8]) -> Option<(String, String, i32)> {
    let glen = u16::from_be_bytes([*k.first()?, *k.get(1)?]) as usize;
    let group = std::str::from_utf8(k.get(2..2 + glen)?).ok()?.to_string();
    let rest = k.get(2 + glen..)?;
    let tlen = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]) as usize;
    let topic = std::str::from_utf8(rest.get(2..2 + tlen)?).ok()?.to_string();
    let p = rest.get(2 + tlen..2 + tlen + 4)?;
    Some((group, topic, i32::from_be_bytes([p[0], p[1], p[2], p[3]])))
}

pub(super) fn encode_offset(o: &CommittedOffset) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + o.metadata.len());
    v.extend_from_slice(&o.offset.to_be_bytes());
    v.extend_from_slice(&o.leader_epoch.to_be_bytes());
    v.extend_from_slice(&o.commit_time_ms.to_be_bytes());
    v.extend_from_slice(o.metadata.as_bytes());
    v
}

pub(super) fn decode_offset(v: &[u8]) -> Option<CommittedOffset> {
    let offset = i64::from_be_bytes(v.get(0..8)?.try_into().ok()?);
    let leader_epoch = i32::from_be_bytes(v.get(8..12)?.try_into().ok()?);
    let commit_time_ms = i64::from_be_bytes(v.get(12..20)?.try_into().ok()?);
    let metadata = String::from_utf8_lossy(v.get(20..)?).into_owned();
    Some(CommittedOffset { offset, leader_epoch, metadata, commit_time_ms })
}

/// The key and value of a committed offset in `spaces::GROUP_OFFSETS`, for a group offset written
/// without the coordinator (a gateway restored from the central cluster, before it serves).
pub fn offset_entry(group: &str, topic: &str, partition: i32, offset: i64, commit_time_ms: i64) -> (Vec<u8>, Vec<u8>) {
    let value = encode_offset(&CommittedOffset { offset, leader_epoch: -1, metadata: String::new(), commit_time_ms });
    (offset_key(group, topic, partition), value)
}

impl Coordinator {
    /// Commits offsets durably (one store commit for the whole request); one error code per
    /// `(topic, partition)` in request order.
    pub async fn commit(
        &self,
        group_id: &str,
        generation: i32,
        member_id: &str,
        instance_id: Option<&str>,
        offsets: Vec<OffsetToCommit>,
    ) -> Vec<i16> {
        if group_id.is_empty() {
            return vec![ec::INVALID_GROUP_ID; offsets.len()];
        }
        if let Some(e) = self.commit_allowed(group_id, generation, member_id, instance_id) {
            return vec![e; offsets.len()];
        }
        let now = now_ms();
        let mut errors = Vec::with_capacity(offsets.len());
        let mut entries = Vec::with_capacity(offsets.len());
        let mut committed = Vec::with_capacity(offsets.len());
        for OffsetToCommit { topic, partition, offset, leader_epoch, metadata } in offsets {
            let metadata = metadata.unwrap_or_default();
            if self.store.partition_info(&topic, partition).is_err() {
                errors.push(ec::UNKNOWN_TOPIC_OR_PARTITION);
            } else if metadata.len() > self.limits.offset_metadata_bytes_max as usize {
                errors.push(ec::OFFSET_METADATA_TOO_LARGE);
            } else {
                let value = encode_offset(&CommittedOffset { offset, leader_epoch, metadata, commit_time_ms: now });
                entries.push((offset_key(group_id, &topic, partition), Some(value)));
                committed.push((topic, partition, offset));
                errors.push(ec::NONE);
            }
        }
        if !entries.is_empty() {
            if let Err(e) = self.store.kv_write(spaces::GROUP_OFFSETS, entries).await {
                tracing::warn!(group = group_id, error = %e, "offset commit failed");
                let c = ec::code(&e);
                return errors.into_iter().map(|x| if x == ec::NONE { c } else { x }).collect();
            }
            if let Some(g) = self.lock().get_mut(group_id) {
                g.has_offsets = true;
            }
            let hook = self.commit_hook.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
            if let Some(hook) = hook {
                hook(group_id, &committed, now);
            }
        }
        errors
    }

    /// Installs the hook called after every durable commit (one at a time; a second replaces
    /// the first).
    pub fn set_commit_hook(&self, hook: CommitHook) {
        *self.commit_hook.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(hook);
    }

    /// Every group's committed offsets, at most `limit` of them (in key order: by group, then
    /// topic, then partition).
    pub fn all_committed(&self, limit: usize) -> Result<AllCommitted, crate::error::StoreError> {
        Ok(self
            .store
            .kv_scan(spaces::GROUP_OFFSETS, &[], limit)?
            .into_iter()
            .filter_map(|(k, v)| {
                let (g, t, p) = parse_offset_key(&k)?;
                Some((g, t, p, decode_offset(&v)?))
            })
            .collect())
    }

    /// [`Coordinator::committed`] on the blocking pool (it reads the store).
    pub async fn committed_async(
        self: &Arc<Self>,
        group_id: String,
        partitions: Option<Vec<(Arc<str>, i32)>>,
    ) -> Result<Vec<CommittedPartition>, crate::error::StoreError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.committed(&group_id, partitions.as_deref()))
            .await
            .map_err(|e| crate::error::StoreError::io("offset read task", std::io::Error::other(e)))?
    }

    /// A group's committed offsets: of the asked partitions (unknown ones are `None`), or all.
    pub fn committed(
        &self,
        group_id: &str,
        partitions: Option<&[(Arc<str>, i32)]>,
    ) -> Result<Vec<CommittedPartition>, crate::error::StoreError> {
        match partitions {
            Some(ps) => ps
                .iter()
                .map(|(t, p)| {
                    let v = self.store.kv_get(spaces::GROUP_OFFSETS, &offset_key(group_id, t, *p))?;
                    Ok((t.clone(), *p, v.as_deref().and_then(decode_offset)))
                })
                .collect(),
            None => Ok(self
                .store
                .kv_scan(spaces::GROUP_OFFSETS, &offset_key_prefix(group_id), usize::MAX)?
                .into_iter()
                .filter_map(|(k, v)| {
                    let (_, t, p) = parse_offset_key(&k)?;
                    Some((t.into(), p, decode_offset(&v)))
                })
                .collect()),
        }
    }

    /// Consumer lag of a group: each committed partition's offset against its high watermark.
    pub fn lag(&self, group_id: &str) -> Result<Vec<PartitionLag>, crate::error::StoreError> {
        Ok(self
            .committed(group_id, None)?
            .into_iter()
            .filter_map(|(topic, partition, c)| {
                let c = c?;
                let hw = self.store.watermarks(&topic, partition).ok()?.high_watermark;
                Some(PartitionLag {
                    topic: topic.to_string(),
                    partition,
                    committed: c.offset,
                    high_watermark: hw,
                    lag: (hw - c.offset).max(0),
                })
            })
            .collect())
    }

    pub(super) async fn delete_offsets(
        &self,
        group_id: &str,
        which: impl Fn(&str, i32) -> bool,
    ) -> Result<usize, crate::error::StoreError> {
        let (store, prefix) = (self.store.clone(), offset_key_prefix(group_id));
        let found = tokio::task::spawn_blocking(move || store.kv_scan(spaces::GROUP_OFFSETS, &prefix, usize::MAX))
            .await
            .map_err(|e| crate::error::StoreError::io("offset scan task", std::io::Error::other(e)))??;
        let keys: Vec<_> = found
            .into_iter()
            .filter(|(k, _)| parse_offset_key(k).is_some_and(|(_, t, p)| which(&t, p)))
            .map(|(k, _)| (k, None))
            .collect();
        let n = keys.len();
        if n > 0 {
            self.store.kv_write(spaces::GROUP_OFFSETS, keys).await?;
        }
        Ok(n)
    }

    /// OffsetDelete: removes committed offsets of partitions the group does not consume.
    /// Returns the group-level error and one code per partition.
    pub async fn offset_delete(&self, group_id: &str, partitions: &[(Arc<str>, i32)]) -> (i16, Vec<i16>) {
        let subscribed: std::collections::HashSet<String> = {
            let groups = self.lock();
            let Some(g) = groups.get(group_id) else { return (ec::GROUP_ID_NOT_FOUND, Vec::new()) };
            g.members
                .iter()
                .flat_map(|m| m.protocols.iter().filter(|(n, _)| Some(n) == g.protocol.as_ref()))
                .flat_map(|(_, md)| subscribed_topics(md))
                .collect()
        };
        let codes: Vec<i16> = partitions
            .iter()
            .map(|(t, _)| if subscribed.contains(&**t) { ec::GROUP_SUBSCRIBED_TO_TOPIC } else { ec::NONE })
            .collect();
        let delete: std::collections::HashSet<(&str, i32)> =
            partitions.iter().zip(&codes).filter(|(_, c)| **c == ec::NONE).map(|((t, p), _)| (&**t, *p)).collect();
        match self.delete_offsets(group_id, |t, p| delete.contains(&(t, p))).await {
            Ok(_) => (ec::NONE, codes),
            Err(e) => (ec::code(&e), codes),
        }
    }
}
