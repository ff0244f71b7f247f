//! Unit tests of how batches lie in the database (`tables::layout`, `stored`): batches in pieces
//! read back whole through every reader, leave no piece behind when removed, cost about the
//! bytes appended on disk, and databases written with whole batches (before pieces) open, read
//! and go on.

use bytes::Bytes;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};

use super::batch::{self, NewRecord};
use super::*;
use crate::config::{Codec, StorageConfig, TimestampKind, TopicConfig};
use crate::tables::{footprint, PartitionMeta, LOG, LOG_PIECES, PARTITIONS};
use crate::tests::noise;

/// No tail cache: every read below comes from the tables.
fn config(dir: &std::path::Path) -> StorageConfig {
    StorageConfig {
        data_dir: dir.to_path_buf(),
        disk_free_bytes_min: 0,
        tail_cache_bytes_max: 0,
        ..StorageConfig::default()
    }
}

/// A client batch of one record with `value` at `timestamp`.
fn one_record_batch(value: Bytes, timestamp: i64) -> Bytes {
    let r =
        NewRecord { key: Some(Bytes::from_static(b"k")), value: Some(value), headers: Vec::new(), timestamp_ms: None };
    let mut out = Vec::new();
    batch::encode_batch(&[(&r, timestamp)], 0, Codec::None, TimestampKind::CreateTime, 0, &mut out).expect("encode");
    Bytes::from(out)
}

/// Values of every record of partition 0 from its log start, read in fetches of `max_bytes`.
fn values(store: &Store, topic: &str, max_bytes: usize) -> Vec<(i64, Bytes)> {
    let wm = store.watermarks(topic, 0).expect("wm");
    let mut out = Vec::new();
    let mut at = wm.log_start_offset;
    while at < wm.high_watermark {
        let (records, next) = store.read_records_next(topic, 0, at, max_bytes).expect("read");
        out.extend(records.into_iter().map(|r| (r.offset, r.value.expect("value"))));
        assert!(next > at, "reads move on");
        at = next;
    }
    out
}

/// (heads, pieces, pieces without a head) in the database.
fn count_entries(store: &Store) -> (u64, u64, u64) {
    let db = store.inner.shared.db.read().expect("db").clone().expect("open");
    let rtx = db.begin_read().expect("read");
    let log = rtx.open_table(LOG).expect("log");
    let pieces = rtx.open_table(LOG_PIECES).expect("pieces");
    let mut orphans = 0;
    for e in pieces.iter().expect("iter") {
        let (k, _) = e.expect("piece");
        let (pkey, base, _) = k.value();
        if log.get((pkey, base)).expect("get").is_none() {
            orphans += 1;
        }
    }
    (log.len().expect("len"), pieces.len().expect("len"), orphans)
}

/// Sizes from a few bytes to 300 KB (whole values, pieces, a last piece under a page) go in,
/// come back byte for byte from the tables (fetches of any size, after a restart, by
/// timestamp), and every removal (retention by size, DeleteRecords, a deleted topic) takes the
/// batch's pieces with it and gives back exactly the footprint it counted.
#[tokio::test]
async fn batches_in_pieces_read_back_whole_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(config(dir.path())).expect("open").0;
    store
        .create_topic("t", 1, TopicConfig { compression: Codec::None, ..TopicConfig::default() })
        .await
        .expect("create");
    let mut seed = 0x1234_5678_9abc_def1u64;
    let sizes = [10usize, 4000, 4010, 4100, 8120, 9000, 16_300, 40_000, 109_900, 131_000, 300_000, 65_000];
    let mut sent = Vec::new();
    for (i, n) in sizes.iter().enumerate() {
        let v = noise(&mut seed, *n);
        let o = store.append_batch("t", 0, one_record_batch(v.clone(), 1_000 + i as i64)).await.expect("append");
        assert_eq!(o.base_offset, i as i64);
        sent.push((i as i64, v));
    }
    let (heads, pieces, orphans) = count_entries(&store);
    assert_eq!((heads, orphans), (sizes.len() as u64, 0));
    assert!(pieces >= 15, "the large batches are in pieces: {pieces}");
    for max_bytes in [1, 50_000, 1 << 20] {
        assert_eq!(values(&store, "t", max_bytes), sent, "fetches of {max_bytes} bytes");
    }
    // One batch by timestamp: the record is read from its pieces.
    assert_eq!(store.offset_for_timestamp("t", 0, 1_010).expect("time"), Some((10, 1_010)));
    let info = store.partition_info("t", 0).expect("info");
    store.close().await.expect("close");
    let store = Store::open(config(dir.path())).expect("reopen").0;
    assert_eq!(values(&store, "t", 1 << 20), sent, "after a restart");
    assert_eq!(store.partition_info("t", 0).expect("info"), info);
    // DeleteRecords past the first five batches: they go, with their pieces.
    store.delete_records("t", 0, 5).await.expect("delete records");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while count_entries(&store).0 > (sizes.len() - 5) as u64 {
        store.kv_put(KvSpace::named("kv.t"), b"k".to_vec(), Some(b"v".to_vec())).await.expect("a round");
        assert!(std::time::Instant::now() < deadline, "trimmed");
    }
    assert_eq!(count_entries(&store).2, 0, "no piece outlives its head");
    assert_eq!(values(&store, "t", 1 << 20), sent[5..].to_vec());
    let left = store.partition_info("t", 0).expect("info");
    let gone: u64 = sizes[..5].iter().map(|n| one_record_batch(Bytes::from(vec![0; *n]), 0).len() as u64).sum();
    assert_eq!(left.logical_bytes, info.logical_bytes - gone, "logical bytes follow exactly");
    store.delete_topic("t").await.expect("delete topic");
    assert_eq!(count_entries(&store), (0, 0, 0), "a deleted topic leaves no piece");
    assert_eq!(store.stats().footprint_bytes, 0, "every footprint counted was given back");
    store.close().await.expect("close");
}

/// The target in the store alone: 40 MiB of the storage benchmark's 109,997-byte client
/// batches over 4 partitions take at most 1.05x their bytes of real disk (plus the empty
/// database's own pages); whole, each took a 128 KiB page run (1.19x).
#[tokio::test]
async fn large_client_batches_take_about_their_bytes_of_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(config(dir.path())).expect("open").0;
    let empty = store.disk_usage_bytes().expect("disk");
    store
        .create_topic("b", 4, TopicConfig { compression: Codec::None, ..TopicConfig::default() })
        .await
        .expect("create");
    let records: Vec<NewRecord> =
        (0..1000).map(|_| NewRecord::new(None::<Bytes>, Bytes::from(vec![b'y'; 100]))).collect();
    let stamped: Vec<_> = records.iter().map(|r| (r, 1_700_000_000_000)).collect();
    let mut one = Vec::new();
    batch::encode_batch(&stamped, 0, Codec::None, TimestampKind::CreateTime, 0, &mut one).expect("encode");
    assert_eq!(one.len(), 109_997);
    let one = Bytes::from(one);
    let mut pending = Vec::new();
    for i in 0..384 {
        pending.push(store.enqueue_batch("b", i % 4, one.clone()).await.expect("queue"));
        if pending.len() == 16 {
            for p in pending.drain(..) {
                p.wait().await.expect("append");
            }
        }
    }
    for p in pending {
        p.wait().await.expect("append");
    }
    let appended = store.stats().appended_bytes;
    assert_eq!(appended, 384 * 109_997);
    let disk = store.disk_usage_bytes().expect("disk") - empty;
    let ratio = disk as f64 / appended as f64;
    assert!(ratio <= 1.05, "{disk} bytes of disk for {appended} appended: {ratio:.3}x");
    store.close().await.expect("close");
}

/// What the store before pieces wrote: every batch whole in LOG, counted with `footprint` of
/// its whole value, and no LOG_PIECES table. Rewrites a closed database into that form.
fn rewrite_as_whole_batches(path: &std::path::Path) {
    let db = redb::Database::create(path.join(DB_FILE_NAME)).expect("open db");
    let tx = db.begin_write().expect("write");
    {
        let mut log = tx.open_table(LOG).expect("log");
        let mut pieces = tx.open_table(LOG_PIECES).expect("pieces");
        let mut parts = tx.open_table(PARTITIONS).expect("parts");
        let heads: Vec<((u64, u64), Vec<u8>)> =
            log.iter().expect("iter").map(|e| e.expect("head")).map(|(k, v)| (k.value(), v.value().to_vec())).collect();
        let mut footprints = std::collections::HashMap::<u64, u64>::new();
        for ((pkey, base), head) in heads {
            let mut whole = head.clone();
            for e in pieces.range((pkey, base, 0u8)..=(pkey, base, u8::MAX)).expect("range") {
                whole.extend_from_slice(e.expect("piece").1.value());
            }
            pieces.retain_in((pkey, base, 0u8)..=(pkey, base, u8::MAX), |_, _| false).expect("remove");
            log.insert((pkey, base), whole.as_slice()).expect("insert");
            *footprints.entry(pkey).or_default() += footprint(whole.len());
        }
        let keys: Vec<u64> = parts.iter().expect("iter").map(|e| e.expect("part").0.value()).collect();
        for pkey in keys {
            let mut m = PartitionMeta::decode(parts.get(pkey).expect("get").expect("meta").value()).expect("meta");
            m.footprint_bytes = footprints.get(&pkey).copied().unwrap_or(0);
            parts.insert(pkey, m.encode().as_slice()).expect("put");
        }
    }
    assert!(tx.delete_table(LOG_PIECES).expect("drop pieces"));
    tx.commit().expect("commit");
}

/// Format versioning: a database whose batches are whole (written before pieces existed) opens
/// and reads as it is, with no migration; new batches after it go in pieces; both read in one
/// fetch; retention deletes the old whole batches giving back what they were counted for; and
/// compaction of a compacted topic rewrites old whole batches into the new layout.
#[tokio::test]
async fn databases_with_whole_batches_open_read_and_go_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(config(dir.path())).expect("open").0;
    let plain = TopicConfig { compression: Codec::None, ..TopicConfig::default() };
    store.create_topic("t", 1, plain).await.expect("create");
    let mut seed = 0xfeed_beef_0bad_cafeu64;
    let mut sent = Vec::new();
    for i in 0..6i64 {
        let v = noise(&mut seed, 30_000 + 7_000 * i as usize);
        store.append_batch("t", 0, one_record_batch(v.clone(), i)).await.expect("append");
        sent.push((i, v));
    }
    store.close().await.expect("close");
    drop(store);
    rewrite_as_whole_batches(dir.path());
    let store = Store::open(config(dir.path())).expect("open a database of whole batches").0;
    assert_eq!(count_entries(&store), (6, 0, 0), "whole batches, no pieces");
    let old = store.partition_info("t", 0).expect("info");
    let old_model: u64 = sent.iter().map(|(_, v)| footprint(one_record_batch(v.clone(), 0).len() + 8)).sum();
    assert_eq!(old.footprint_bytes, old_model, "counted as the old store counted them");
    assert_eq!(values(&store, "t", 1 << 20), sent, "whole batches read as they are");
    for i in 6..10i64 {
        let v = noise(&mut seed, 50_000);
        store.append_batch("t", 0, one_record_batch(v.clone(), i)).await.expect("append");
        sent.push((i, v));
    }
    assert!(count_entries(&store).1 > 0, "new batches in pieces");
    assert_eq!(values(&store, "t", 10 << 20), sent, "old and new in one fetch");
    // Every old batch removed: its footprint given back by the old model, nothing goes negative.
    let new_fp = store.partition_info("t", 0).expect("info").footprint_bytes - old_model;
    store.delete_records("t", 0, 6).await.expect("delete records");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store.partition_info("t", 0).expect("info").footprint_bytes != new_fp {
        store.kv_put(KvSpace::named("kv.t"), b"k".to_vec(), Some(b"v".to_vec())).await.expect("a round");
        assert!(std::time::Instant::now() < deadline, "trimmed: {:?}", store.partition_info("t", 0));
    }
    assert_eq!(values(&store, "t", 1 << 20), sent[6..].to_vec());
    store.close().await.expect("close");
}

/// Crash safety of the layout: a batch's head and pieces are one commit. Records of 9-28 KB
/// (batches in pieces) are appended to a compacted topic whose compaction rewrites them in small
/// steps meanwhile, on a recorded simulated disk; at power cuts all along the trace (the synced
/// bytes plus a random subset of the unsynced writes, the last one torn) the store opens, every
/// batch reads back whole (a missing or torn piece would fail the read), every record's bytes are
/// the ones appended, and every key holds its latest acknowledged version or a later one.
#[tokio::test]
async fn power_cuts_leave_every_batch_whole_with_its_pieces() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = simdisk::SimDisk::recording();
    let cfg = StorageConfig {
        retention_check_interval_ms: 10,
        compaction_bytes_per_commit_max: 64 << 10,
        ..config(dir.path())
    };
    let (store, _) = Store::open_with_backend(cfg.clone(), disk.opener()).expect("open");
    let compacted = TopicConfig {
        cleanup_policy: crate::config::CleanupPolicy::Compact,
        compression: Codec::None,
        min_cleanable_dirty_ratio_ppm: 0,
        ..TopicConfig::default()
    };
    store.create_topic("c", 1, compacted).await.expect("create");
    const KEYS: u64 = 6;
    const APPENDS: u64 = KEYS * 8;
    let value_of = |k: u64, v: u64| {
        let mut seed = (k << 32 | v) | 1;
        noise(&mut seed, 9_000 + 1_000 * ((k * 7 + v) % 20) as usize)
    };
    let mut removed_before = 0;
    for n in 0..APPENDS {
        let (k, v) = (n % KEYS, n / KEYS);
        if k == 0 {
            removed_before = store.stats().compaction_removed_records;
        }
        let r = NewRecord::new(Some(Bytes::from(format!("k{k}"))), value_of(k, v));
        store.append_records("c", 0, vec![r]).await.expect("append");
        disk.mark(n);
        // From the second round of keys on (each makes older versions of every key), compaction
        // removes some before the next round: without the wait, a release build's appends
        // could all finish before a pass began.
        if v >= 1 && k == KEYS - 1 {
            crate::compaction_tests::wait_stats(&store, "a compaction step between rounds of keys", |s| {
                s.compaction_removed_records > removed_before
            })
            .await;
        }
    }
    let s = store.stats();
    assert!(s.compaction_removed_records > 0, "compaction rewrote batches meanwhile: {s:?}");
    assert!(count_entries(&store).1 > 0, "batches in pieces");
    drop(store);
    let checked = crate::compaction_tests::at_power_cuts(&disk, &cfg, 40, |i, after, acked| {
        assert_eq!(count_entries(&after).2, 0, "cut {i}: no piece without its head");
        let wm = after.watermarks("c", 0).expect("wm");
        let (mut at, mut latest) = (wm.log_start_offset, std::collections::HashMap::<u64, u64>::new());
        while at < wm.high_watermark {
            let (records, next) = after.read_records_next("c", 0, at, 1 << 20).expect("every batch reads whole");
            for r in records {
                let key = String::from_utf8_lossy(r.key.as_deref().expect("key")).into_owned();
                let k: u64 = key[1..].parse().expect("key");
                let value = r.value.expect("value");
                let v = (0..APPENDS / KEYS).find(|v| value_of(k, *v) == value);
                let v = v.unwrap_or_else(|| panic!("cut {i}: {key} at {} holds bytes never appended", r.offset));
                let e = latest.entry(k).or_default();
                *e = (*e).max(v);
            }
            at = next;
        }
        for n in 0..=acked.min(APPENDS - 1) {
            let (k, v) = (n % KEYS, n / KEYS);
            let got = latest.get(&k).copied();
            assert!(got.is_some_and(|g| g >= v), "cut {i}: k{k} acknowledged at version {v}, found {got:?}");
        }
    });
    assert!(checked >= 30, "only {checked} cuts after acknowledged appends");
}
