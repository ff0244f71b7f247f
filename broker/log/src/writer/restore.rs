//! Restores: records written back at the offsets they had (a gateway rebuilt from the central
//! cluster's copy), through the same writer and commit as appends. Invariant: a restored record
//! never lands below its partition's next offset, so an offset once given is never given to
//! another record; offsets no restored record holds stay holes, and an empty partition's log
//! starts at its first restored record.

use super::*;
use crate::{PendingAppend, Store};

/// The highest offset a restored record may have. Restored offsets come from the central
/// cluster, a peer: one near `i64::MAX` would overflow the partition's next offset (and with it
/// every offset given after it), so the store keeps 2^62 offsets of room above any restore.
pub const RESTORE_OFFSET_MAX: i64 = 1 << 62;

impl Store {
    /// Writes `records` (each at its own offset, increasing, with its timestamp) into a
    /// partition, with `kv` in the same commit (the caller's progress), and returns once
    /// durable. The records are packed into CreateTime batches of at most
    /// `storage.batch_size_bytes_max` (compressed with the topic's codec), keeping the offsets
    /// between them as holes. Refused with `RestoreBelowNext`, nothing written, when the first
    /// offset is below the partition's next offset. An empty partition's log start moves up to
    /// the first record. Its `AppendOutcome` spans the first to the last restored offset.
    pub async fn restore_records(
        &self,
        topic: &str,
        partition: i32,
        records: Vec<(i64, NewRecord)>,
        kv: Vec<(KvSpace, Vec<u8>, Option<Vec<u8>>)>,
    ) -> Result<AppendOutcome, StoreError> {
        self.enqueue_restore(topic, partition, records, kv).await?.wait().await
    }

    /// Ends a partition's restore: its next offset moves up to `next_offset` if below (the
    /// offsets between stay a hole: they were given out by the gateway that was lost, in records
    /// the central cluster does not have), with `kv` in the same commit (the caller's progress),
    /// and returns once durable. An empty partition's log starts there. Refused with
    /// `InvalidBatch`, nothing written, when `next_offset` is negative or above
    /// `RESTORE_OFFSET_MAX`. Its `AppendOutcome` is empty (`base_offset` = the next offset).
    pub async fn restore_end(
        &self,
        topic: &str,
        partition: i32,
        next_offset: i64,
        kv: Vec<(KvSpace, Vec<u8>, Option<Vec<u8>>)>,
    ) -> Result<AppendOutcome, StoreError> {
        let (t, p) = self.partition_state(topic, partition)?;
        let rx = self
            .enqueue(|reply| Op::Restore {
                topic: t,
                pkey: p.key,
                records: Vec::new(),
                end: Some(next_offset),
                kv,
                reply,
            })
            .await?;
        PendingAppend(rx).wait().await
    }

    /// Queues a restore like [`Store::restore_records`]; the [`PendingAppend`] resolves once it
    /// is durable (or refused).
    pub async fn enqueue_restore(
        &self,
        topic: &str,
        partition: i32,
        records: Vec<(i64, NewRecord)>,
        kv: Vec<(KvSpace, Vec<u8>, Option<Vec<u8>>)>,
    ) -> Result<PendingAppend, StoreError> {
        let cfg = &self.inner.shared.config;
        let size: usize = records.iter().map(|(_, r)| r.encoded_len_max()).sum();
        if size as u64 > u64::from(cfg.append_size_bytes_max) {
            return Err(StoreError::AppendTooLarge { size: size as u64, max: cfg.append_size_bytes_max.into() });
        }
        let (t, p) = self.partition_state(topic, partition)?;
        let rx = self.enqueue(|reply| Op::Restore { topic: t, pkey: p.key, records, end: None, kv, reply }).await?;
        Ok(PendingAppend(rx))
    }
}

/// Checks restored records before anything is written: some, offsets increasing from at least
/// `next` up to `RESTORE_OFFSET_MAX`, timestamps given, keys on a compacted topic.
fn check(topic: &TopicState, partition: i32, records: &[(i64, NewRecord)], next: i64) -> Result<(), StoreError> {
    let Some((first, _)) = records.first() else { return Err(StoreError::InvalidBatch(batch::BatchError::Empty(0))) };
    if *first < next {
        return Err(StoreError::RestoreBelowNext {
            topic: topic.name.clone(),
            partition,
            offset: *first,
            next_offset: next,
        });
    }
    let mut last = first - 1;
    for (i, (offset, r)) in records.iter().enumerate() {
        if *offset > RESTORE_OFFSET_MAX {
            return Err(StoreError::InvalidBatch(batch::BatchError::Record {
                index: i as u64,
                reason: "a restored offset above the highest a restore may write (2^62)",
            }));
        }
        if *offset <= last {
            return Err(StoreError::InvalidBatch(batch::BatchError::Record {
                index: i as u64,
                reason: "restored offsets must increase",
            }));
        }
        if r.timestamp_ms.is_none() {
            return Err(StoreError::InvalidBatch(batch::BatchError::Record {
                index: i as u64,
                reason: "a restored record carries its timestamp",
            }));
        }
        if topic.config.compacted() && r.key.is_none() {
            return Err(StoreError::KeylessRecord { topic: topic.name.clone(), partition, index: i as u64 });
        }
        last = *offset;
    }
    Ok(())
}

impl Writer {
    /// Ends one restore into the round (`Store::restore_end`). `Ok(Err(_))`: refused, nothing
    /// written; `Err(_)`: the round fails.
    pub(super) fn apply_restore_end(
        &mut self,
        t: &mut Tables<'_>,
        r: &mut Round,
        topic: &TopicState,
        pkey: u64,
        end: i64,
    ) -> Result<Result<AppendOutcome, StoreError>, StoreError> {
        let Some(mut m) = self.meta(r, pkey) else { return Ok(Err(StoreError::UnknownTopic(topic.name.clone()))) };
        if !(0..=RESTORE_OFFSET_MAX).contains(&end) {
            return Ok(Err(StoreError::InvalidBatch(batch::BatchError::Record {
                index: 0,
                reason: "a restore's end outside 0..=2^62",
            })));
        }
        if end as u64 > m.next_offset {
            // A hole at the end: nothing stored there, the next record goes after it.
            m.next_offset = end as u64;
            if m.batches == 0 {
                m.log_start_offset = m.log_start_offset.max(end as u64);
            }
            if topic.config.durability == Durability::Relaxed {
                r.relaxed.insert(pkey);
            }
            self.put_meta(t, r, pkey, m)?;
        }
        Ok(Ok(AppendOutcome {
            base_offset: m.next_offset as i64,
            last_offset: m.next_offset as i64 - 1,
            log_append_time_ms: None,
            log_start_offset: m.log_start_offset as i64,
        }))
    }

    /// Writes one restore into the round. `Ok(Err(_))`: refused, nothing written; `Err(_)`: the
    /// round fails.
    pub(super) fn apply_restore(
        &mut self,
        t: &mut Tables<'_>,
        r: &mut Round,
        topic: &TopicState,
        pkey: u64,
        records: &[(i64, NewRecord)],
        now: i64,
    ) -> Result<Result<AppendOutcome, StoreError>, StoreError> {
        let partition = (pkey & 0xffff_ffff) as i32;
        let Some(mut m) = self.meta(r, pkey) else { return Ok(Err(StoreError::UnknownTopic(topic.name.clone()))) };
        if let Err(e) = check(topic, partition, records, m.next_offset as i64) {
            return Ok(Err(e));
        }
        if topic.config.durability == Durability::Relaxed {
            r.relaxed.insert(pkey);
        }
        let first = records[0].0;
        if m.batches == 0 {
            // Nothing stored: the log starts at the first restored record.
            m.log_start_offset = m.log_start_offset.max(first as u64);
        }
        let cap = self.cfg.batch_size_bytes_max as usize;
        let mut out = Vec::with_capacity(VALUE_PREFIX_LEN + cap + HEADER_LEN);
        let mut i = 0;
        while i < records.len() {
            // As many records as fit a batch uncompressed (at least one), and offsets within an
            // i32 of the batch's first.
            let mut raw = 0usize;
            let mut j = i;
            while j < records.len()
                && (j == i
                    || (raw + records[j].1.encoded_len_max() <= cap - HEADER_LEN
                        && records[j].0 - records[i].0 <= i64::from(i32::MAX)))
            {
                raw += records[j].1.encoded_len_max();
                j += 1;
            }
            let chunk: Vec<(&NewRecord, i64, i64)> =
                records[i..j].iter().map(|(o, rec)| (rec, rec.timestamp_ms.unwrap_or(now), *o)).collect();
            out.clear();
            out.extend_from_slice(&[0u8; VALUE_PREFIX_LEN]);
            let h = batch::encode_batch_at(&chunk, topic.config.compression, &mut out)?;
            // The batch is stored at its first record's offset: offsets before it are a hole.
            debug_assert!(h.base_offset >= m.next_offset as i64, "checked above");
            m.next_offset = h.base_offset as u64;
            self.store_batch(t, r, pkey, &mut m, &mut out, &h, topic.config.retention_bytes_limit(), now)?;
            let batch = &out[VALUE_PREFIX_LEN..];
            self.cache_batch(r, pkey, &h, batch.len(), || bytes::Bytes::copy_from_slice(batch));
            i = j;
        }
        self.put_meta(t, r, pkey, m)?;
        Ok(Ok(AppendOutcome {
            base_offset: first,
            last_offset: m.next_offset as i64 - 1,
            log_append_time_ms: None,
            log_start_offset: m.log_start_offset as i64,
        }))
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use crate::batch::NewRecord;
    use crate::config::{Codec, StorageConfig, TopicConfig};
    use crate::{KvSpace, Store, StoreError, Watermarks};

    const PROGRESS: KvSpace = KvSpace::named("kv.test_restore");

    fn open(dir: &std::path::Path) -> Store {
        Store::open(StorageConfig { data_dir: dir.to_path_buf(), disk_free_bytes_min: 0, ..StorageConfig::default() })
            .expect("open")
            .0
    }

    fn rec(offset: i64) -> (i64, NewRecord) {
        (
            offset,
            NewRecord {
                key: Some(Bytes::from(format!("k{offset}"))),
                value: (offset % 7 != 3).then(|| Bytes::from(format!("value-{offset}"))),
                headers: vec![("h".into(), Some(Bytes::from("x"))), ("h".into(), None)],
                timestamp_ms: Some(1_700_000_000_000 + (offset % 1_000_000) * 10),
            },
        )
    }

    /// Restored records come back at their offsets with everything they had; offsets between
    /// them stay holes; the log starts at the first; the next offset follows the last; and the
    /// progress written with them is in the same commit.
    #[tokio::test]
    async fn records_are_restored_at_their_offsets_with_holes_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let config = TopicConfig { compression: Codec::Lz4, ..TopicConfig::default() };
        store.create_topic("t", 1, config).await.expect("create");
        let offsets: Vec<i64> = (100..150).chain(160..170).chain([500, 70_000]).collect();
        let records: Vec<(i64, NewRecord)> = offsets.iter().map(|o| rec(*o)).collect();
        let out = store
            .restore_records("t", 0, records[..30].to_vec(), vec![(PROGRESS, b"t/0".to_vec(), Some(b"30".to_vec()))])
            .await
            .expect("restore");
        assert_eq!((out.base_offset, out.last_offset, out.log_start_offset), (100, 129, 100));
        store.restore_records("t", 0, records[30..].to_vec(), Vec::new()).await.expect("restore the rest");
        assert_eq!(store.watermarks("t", 0).expect("wm"), Watermarks { log_start_offset: 100, high_watermark: 70_001 });
        assert_eq!(store.kv_get(PROGRESS, b"t/0").expect("kv"), Some(b"30".to_vec()));
        store.close().await.expect("close");
        drop(store);
        let store = open(dir.path());
        let mut back = Vec::new();
        let mut at = 100;
        while at < 70_001 {
            let got = store.read_records("t", 0, at, 1 << 20).expect("read");
            let last = got.last().map(|r| r.offset).expect("records after a hole");
            back.extend(got.into_iter().filter(|r| r.offset >= at));
            at = last + 1;
        }
        assert_eq!(back.len(), records.len());
        for (got, (offset, want)) in back.iter().zip(&records) {
            assert_eq!(got.offset, *offset);
            assert_eq!((&got.key, &got.value, &got.headers), (&want.key, &want.value, &want.headers));
            assert_eq!(Some(got.timestamp), want.timestamp_ms);
        }
        // A hole's offset reads from the next record on.
        let got = store.read_records("t", 0, 155, 1 << 20).expect("read in a hole");
        assert_eq!(got.iter().find(|r| r.offset >= 155).map(|r| r.offset), Some(160));
        // New appends continue after the last restored offset.
        let o = store.append_records("t", 0, vec![NewRecord::new(Some("k"), "new")]).await.expect("append");
        assert_eq!(o.base_offset, 70_001);
    }

    /// An offset the partition already gave out is never given to a restored record: refused,
    /// nothing of it written (its progress neither).
    #[tokio::test]
    async fn a_restore_below_the_next_offset_is_refused_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        store.create_topic("t", 1, TopicConfig::default()).await.expect("create");
        store.restore_records("t", 0, vec![rec(10), rec(11)], Vec::new()).await.expect("restore");
        for records in [vec![rec(11), rec(12)], vec![rec(5)]] {
            let e = store
                .restore_records("t", 0, records, vec![(PROGRESS, b"p".to_vec(), Some(b"x".to_vec()))])
                .await
                .expect_err("below the next offset");
            assert!(matches!(e, StoreError::RestoreBelowNext { next_offset: 12, .. }), "{e}");
        }
        assert_eq!(store.kv_get(PROGRESS, b"p").expect("kv"), None, "its progress was not written either");
        assert_eq!(store.watermarks("t", 0).expect("wm").high_watermark, 12);
        // Offsets out of order, and a record without its timestamp, are refused too.
        let e = store.restore_records("t", 0, vec![rec(20), rec(20)], Vec::new()).await.expect_err("order");
        assert!(matches!(e, StoreError::InvalidBatch(_)), "{e}");
        let mut bare = rec(30);
        bare.1.timestamp_ms = None;
        assert!(store.restore_records("t", 0, vec![bare], Vec::new()).await.is_err());
        // Appended records take offsets first: a restore can no longer go there.
        store.append_records("t", 0, vec![NewRecord::new(Some("k"), "v")]).await.expect("append");
        let e = store.restore_records("t", 0, vec![rec(12)], Vec::new()).await.expect_err("taken by an append");
        assert!(matches!(e, StoreError::RestoreBelowNext { offset: 12, next_offset: 13, .. }), "{e}");
    }

    /// Offsets and timestamps come from the central cluster (a peer): an offset so high that the
    /// partition's next offset would overflow is refused, nothing written, and the partition keeps
    /// giving offsets above the ones it gave; extreme timestamps are stored, not a panic.
    #[tokio::test]
    async fn a_restored_offset_near_the_end_of_the_offset_space_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        store.create_topic("t", 1, TopicConfig::default()).await.expect("create");
        store.restore_records("t", 0, vec![rec(10)], Vec::new()).await.expect("restore");
        for records in [vec![rec(i64::MAX)], vec![rec(11), rec(super::RESTORE_OFFSET_MAX + 1)]] {
            let e = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                store.restore_records("t", 0, records, Vec::new()),
            )
            .await
            .expect("an answer, not a writer that died")
            .expect_err("out of range");
            assert!(matches!(e, StoreError::InvalidBatch(_)), "{e}");
        }
        assert_eq!(store.watermarks("t", 0).expect("wm").high_watermark, 11);
        store.restore_records("t", 0, vec![rec(super::RESTORE_OFFSET_MAX)], Vec::new()).await.expect("the highest");
        let o = store.append_records("t", 0, vec![NewRecord::new(Some("k"), "v")]).await.expect("append after it");
        assert_eq!(o.base_offset, super::RESTORE_OFFSET_MAX + 1);
        // Timestamps as far apart as an i64 allows are kept as they came.
        store.create_topic("u", 1, TopicConfig::default()).await.expect("create");
        let mut far = vec![rec(1), rec(2)];
        (far[0].1.timestamp_ms, far[1].1.timestamp_ms) = (Some(i64::MAX), Some(i64::MIN));
        store.restore_records("u", 0, far, Vec::new()).await.expect("extreme timestamps");
        let back: Vec<i64> =
            store.read_records("u", 0, 1, 1 << 20).expect("read").iter().map(|r| r.timestamp).collect();
        assert_eq!(back, vec![i64::MAX, i64::MIN]);
    }

    /// Issue 18: a restore's end moves the next offset up over offsets the lost gateway gave (a
    /// hole at the end), durably with its progress; a reopen accepts it; the next record appended
    /// gets the offset after the hole; an end below the next offset changes only the progress;
    /// an empty partition's log starts at its end; an end outside 0..=2^62 is refused whole.
    #[tokio::test]
    async fn a_restore_end_leaves_a_hole_at_the_end_that_survives_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        store.create_topic("t", 2, TopicConfig::default()).await.expect("create");
        store.restore_records("t", 0, (10..20).map(rec).collect(), Vec::new()).await.expect("restore");
        let progress = |v: &[u8]| vec![(PROGRESS, b"t/0".to_vec(), Some(v.to_vec()))];
        store.restore_end("t", 0, 500, progress(b"done")).await.expect("end");
        assert_eq!(store.watermarks("t", 0).expect("wm"), Watermarks { log_start_offset: 10, high_watermark: 500 });
        // Below the next offset: only the progress.
        store.restore_end("t", 0, 30, progress(b"again")).await.expect("end below");
        assert_eq!(store.watermarks("t", 0).expect("wm").high_watermark, 500);
        assert_eq!(store.kv_get(PROGRESS, b"t/0").expect("kv"), Some(b"again".to_vec()));
        // Nothing restored: the log is empty and starts at the end.
        store.restore_end("t", 1, 77, Vec::new()).await.expect("end of an empty partition");
        assert_eq!(store.watermarks("t", 1).expect("wm"), Watermarks { log_start_offset: 77, high_watermark: 77 });
        for bad in [-1, super::RESTORE_OFFSET_MAX + 1] {
            let e = store.restore_end("t", 0, bad, progress(b"bad")).await.expect_err("refused");
            assert!(matches!(e, StoreError::InvalidBatch(_)), "{e}");
        }
        assert_eq!(store.kv_get(PROGRESS, b"t/0").expect("kv"), Some(b"again".to_vec()), "refused whole");
        store.close().await.expect("close");
        drop(store);
        let store = open(dir.path());
        assert_eq!(store.watermarks("t", 0).expect("wm"), Watermarks { log_start_offset: 10, high_watermark: 500 });
        assert_eq!(store.read_records("t", 0, 20, 1 << 20).expect("read in the hole"), Vec::new());
        let o = store.append_records("t", 0, vec![NewRecord::new(Some("k"), "new")]).await.expect("append");
        assert_eq!(o.base_offset, 500, "the next record goes after the hole");
        let got = store.read_records("t", 0, 20, 1 << 20).expect("read from the hole");
        assert_eq!(got.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![500]);
        let o = store.append_records("t", 1, vec![NewRecord::new(Some("k"), "new")]).await.expect("append");
        assert_eq!((o.base_offset, o.log_start_offset), (77, 77));
    }
}
