//! Unit tests of the store: appends, reads, restarts, retention, topic administration.

use std::time::Duration;

use bytes::Bytes;

use super::batch::{self, NewRecord};
use super::*;
use crate::config::{Codec, StorageConfig, TimestampKind, TopicConfig};

fn config(dir: &std::path::Path) -> StorageConfig {
    StorageConfig { data_dir: dir.to_path_buf(), disk_free_bytes_min: 0, ..StorageConfig::default() }
}

fn open(dir: &std::path::Path) -> Store {
    Store::open(config(dir)).expect("open").0
}

fn rec(i: usize) -> NewRecord {
    NewRecord {
        key: Some(Bytes::from(format!("k{i}"))),
        value: Some(Bytes::from(format!("value-{i}"))),
        headers: vec![("n".into(), Some(Bytes::from(i.to_string())))],
        timestamp_ms: Some(1_000 + i as i64),
    }
}

fn client_batch(n: usize, codec: Codec) -> Vec<u8> {
    let records: Vec<NewRecord> = (0..n).map(rec).collect();
    let stamped: Vec<_> = records.iter().map(|r| (r, r.timestamp_ms.unwrap_or(0))).collect();
    let mut out = Vec::new();
    batch::encode_batch(&stamped, 0, codec, TimestampKind::CreateTime, 0, &mut out).expect("encode");
    out
}

#[tokio::test]
async fn appended_records_survive_a_restart_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    store.create_topic("t", 2, TopicConfig::default()).await.expect("create");
    for i in 0..50 {
        let o = store.append_records("t", (i % 2) as i32, vec![rec(i)]).await.expect("append");
        assert_eq!(o.base_offset, (i / 2) as i64);
    }
    store.close().await.expect("close");
    drop(store);
    let (store, report) = Store::open(config(dir.path())).expect("reopen");
    assert!(!report.repaired, "a clean close needs no repair");
    assert_eq!(store.watermarks("t", 0).expect("wm"), Watermarks { log_start_offset: 0, high_watermark: 25 });
    let back = store.read_records("t", 1, 0, 1 << 20).expect("read");
    assert_eq!(back.len(), 25);
    for (j, r) in back.iter().enumerate() {
        let i = 2 * j + 1;
        assert_eq!(r.offset, j as i64);
        assert_eq!(r.value.as_deref(), Some(format!("value-{i}").as_bytes()));
        assert_eq!(r.timestamp, 1_000 + i as i64);
        assert_eq!(r.headers, vec![("n".to_string(), Some(Bytes::from(i.to_string())))]);
    }
}

#[tokio::test]
async fn concurrent_appenders_share_commits_and_get_contiguous_offsets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    store.create_topic("t", 1, TopicConfig::default()).await.expect("create");
    let mut tasks = Vec::new();
    for i in 0..256 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move { s.append_records("t", 0, vec![rec(i)]).await }));
    }
    let mut offsets = Vec::new();
    for t in tasks {
        offsets.push(t.await.expect("join").expect("append").base_offset);
    }
    offsets.sort_unstable();
    assert_eq!(offsets, (0..256).collect::<Vec<i64>>());
    let stats = store.stats();
    assert_eq!(stats.appended_records, 256);
    assert!(stats.commits < 256, "group commit packs appenders: {} commits", stats.commits);
    assert_eq!(store.read_records("t", 0, 0, 1 << 20).expect("read").len(), 256);
}

#[tokio::test]
async fn client_batches_are_stored_as_sent_with_broker_offsets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    store.create_topic("t", 1, TopicConfig::default()).await.expect("create");
    store.append_records("t", 0, vec![rec(0), rec(1)]).await.expect("append");
    for codec in [Codec::None, Codec::Gzip, Codec::Snappy, Codec::Lz4, Codec::Zstd] {
        let b = client_batch(10, codec);
        let before = store.watermarks("t", 0).expect("wm").high_watermark;
        let o = store.append_batch("t", 0, Bytes::from(b.clone())).await.expect("append batch");
        assert_eq!((o.base_offset, o.last_offset), (before, before + 9));
        let f = store.fetch("t", 0, before, 1).expect("fetch");
        assert_eq!(f.batches, 1);
        assert_eq!(&f.data[8..12], &b[8..12], "length as sent");
        assert_eq!(&f.data[16..], &b[16..], "everything from magic on is stored as sent ({codec})");
        assert_eq!(i64::from_be_bytes(f.data[..8].try_into().expect("8 bytes")), before);
    }
    assert_eq!(store.read_records("t", 0, 0, 1 << 20).expect("read").len(), 52);
}

#[tokio::test]
async fn bad_batches_are_refused_and_leave_the_partition_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    store.create_topic("t", 1, TopicConfig::default()).await.expect("create");
    store.append_batch("t", 0, Bytes::from(client_batch(3, Codec::Lz4))).await.expect("good");
    let before = store.fetch("t", 0, 0, 1 << 20).expect("fetch").data;
    let good = client_batch(3, Codec::None);
    let mut bad_crc = good.clone();
    let n = bad_crc.len();
    bad_crc[n - 1] ^= 1;
    let mut control = good.clone();
    control[22] |= 0x20;
    let crc = crc32c::crc32c(&control[21..]);
    control[17..21].copy_from_slice(&crc.to_be_bytes());
    let mut wrong_count = good.clone();
    wrong_count[57..61].copy_from_slice(&2i32.to_be_bytes());
    wrong_count[23..27].copy_from_slice(&1i32.to_be_bytes());
    let crc = crc32c::crc32c(&wrong_count[21..]);
    wrong_count[17..21].copy_from_slice(&crc.to_be_bytes());
    for (what, b) in [
        ("bad crc", bad_crc),
        ("truncated", good[..good.len() - 5].to_vec()),
        ("control", control),
        ("wrong count", wrong_count),
        ("garbage", vec![0xAB; 100]),
    ] {
        let e = store.append_batch("t", 0, Bytes::from(b)).await.expect_err(what);
        assert!(matches!(e, StoreError::InvalidBatch(_)), "{what}: {e}");
    }
    assert_eq!(store.fetch("t", 0, 0, 1 << 20).expect("fetch").data, before);
    assert_eq!(store.watermarks("t", 0).expect("wm").high_watermark, 3);
    let too_big = vec![0u8; store.config().append_size_bytes_max as usize + 1];
    assert!(matches!(store.append_batch("t", 0, Bytes::from(too_big)).await, Err(StoreError::AppendTooLarge { .. })));
}

#[tokio::test]
async fn fetch_returns_whole_batches_from_the_one_containing_the_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    store.create_topic("t", 1, TopicConfig::default()).await.expect("create");
    for _ in 0..5 {
        store.append_batch("t", 0, Bytes::from(client_batch(10, Codec::None))).await.expect("append");
    }
    let f = store.fetch("t", 0, 23, 1).expect("fetch");
    assert_eq!(f.batches, 1, "max_bytes is soft: one whole batch");
    assert_eq!(i64::from_be_bytes(f.data[..8].try_into().expect("8")), 20);
    assert_eq!(f.next_offset, 30);
    let f = store.fetch("t", 0, 23, 1 << 20).expect("fetch");
    assert_eq!((f.batches, f.next_offset), (3, 50));
    let empty = store.fetch("t", 0, 50, 1 << 20).expect("at the high watermark");
    assert_eq!(empty.batches, 0);
    assert!(matches!(
        store.fetch("t", 0, 51, 100),
        Err(StoreError::OffsetOutOfRange { offset: 51, high_watermark: 50, .. })
    ));
    assert!(matches!(store.fetch("t", 0, -1, 100), Err(StoreError::OffsetOutOfRange { .. })));
    assert!(matches!(store.fetch("t", 1, 0, 100), Err(StoreError::UnknownPartition { .. })));
    assert!(matches!(store.fetch("nope", 0, 0, 100), Err(StoreError::UnknownTopic(_))));
}

#[tokio::test]
async fn long_poll_wakes_on_append_and_times_out_otherwise() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    store.create_topic("t", 1, TopicConfig::default()).await.expect("create");
    let wm = store.wait_for_data("t", 0, 0, Duration::from_millis(20)).await.expect("timeout is not an error");
    assert_eq!(wm.high_watermark, 0);
    let waiter = {
        let s = store.clone();
        tokio::spawn(async move { s.wait_for_data("t", 0, 0, Duration::from_secs(60)).await })
    };
    store.append_records("t", 0, vec![rec(0)]).await.expect("append");
    let wm = waiter.await.expect("join").expect("woken");
    assert_eq!(wm.high_watermark, 1);
}

#[tokio::test]
async fn offsets_by_timestamp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    store.create_topic("t", 1, TopicConfig::default()).await.expect("create");
    // Timestamps 1000..1030 in three batches, one batch out of order.
    for chunk in [0..10usize, 20..30, 10..20] {
        let recs: Vec<NewRecord> = chunk.map(rec).collect();
        store.append_records("t", 0, recs).await.expect("append");
    }
    assert_eq!(store.offset_for_timestamp("t", 0, 0).expect("lookup"), Some((0, 1000)));
    assert_eq!(store.offset_for_timestamp("t", 0, 1005).expect("lookup"), Some((5, 1005)));
    assert_eq!(store.offset_for_timestamp("t", 0, 1012).expect("lookup"), Some((10, 1020)));
    assert_eq!(store.offset_for_timestamp("t", 0, 1029).expect("lookup"), Some((19, 1029)));
    assert_eq!(store.offset_for_timestamp("t", 0, 1030).expect("lookup"), None);
}

#[tokio::test]
async fn log_append_time_topics_stamp_the_broker_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let cfg = TopicConfig { timestamp_type: TimestampKind::LogAppendTime, ..TopicConfig::default() };
    store.create_topic("t", 1, cfg).await.expect("create");
    let o = store.append_batch("t", 0, Bytes::from(client_batch(3, Codec::Snappy))).await.expect("append");
    let at = o.log_append_time_ms.expect("LogAppendTime answers with the broker's time");
    assert!(at > 1_600_000_000_000);
    for r in store.read_records("t", 0, 0, 1 << 20).expect("read") {
        assert_eq!(r.timestamp, at);
    }
}

#[tokio::test]
async fn per_topic_retention_bytes_deletes_oldest_and_advances_log_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let cfg = TopicConfig { retention_bytes: Some(10_000), compression: Codec::None, ..TopicConfig::default() };
    store.create_topic("t", 1, cfg).await.expect("create");
    let big = |i: usize| NewRecord::new(None::<Bytes>, Bytes::from(vec![i as u8; 1000]));
    for i in 0..50 {
        store.append_records("t", 0, vec![big(i)]).await.expect("append");
    }
    let info = store.partition_info("t", 0).expect("info");
    assert!(info.logical_bytes < 10_000 + 1200, "{info:?}");
    assert!(info.watermarks.log_start_offset > 30, "{info:?}");
    assert_eq!(info.watermarks.high_watermark, 50);
    let e = store.fetch("t", 0, 0, 100).expect_err("below log start");
    assert!(matches!(e, StoreError::OffsetOutOfRange { offset: 0, .. }));
    let first = store.read_records("t", 0, info.watermarks.log_start_offset, 1 << 20).expect("read");
    assert_eq!(first[0].offset, info.watermarks.log_start_offset);
    assert_eq!(first.last().map(|r| r.offset), Some(49));
    // Time lookups below the new log start land on it.
    assert_eq!(
        store.offset_for_timestamp("t", 0, 0).expect("lookup").map(|x| x.0),
        Some(info.watermarks.log_start_offset)
    );
}

#[tokio::test]
async fn topics_are_created_grown_altered_and_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    store.create_topic("t", 2, TopicConfig::default()).await.expect("create");
    assert!(matches!(store.create_topic("t", 2, TopicConfig::default()).await, Err(StoreError::TopicExists(_))));
    assert!(matches!(
        store.create_topic("bad name", 1, TopicConfig::default()).await,
        Err(StoreError::InvalidTopicName { .. })
    ));
    assert!(matches!(
        store.create_topic("z", 0, TopicConfig::default()).await,
        Err(StoreError::InvalidPartitions { .. })
    ));
    store.append_records("t", 1, vec![rec(1)]).await.expect("append");
    store.create_partitions("t", 4).await.expect("grow");
    assert!(matches!(store.create_partitions("t", 3).await, Err(StoreError::InvalidPartitions { .. })));
    store.append_records("t", 3, vec![rec(3)]).await.expect("append to new partition");
    assert_eq!(store.watermarks("t", 1).expect("kept").high_watermark, 1);
    let mut cfg = TopicConfig::default();
    cfg.set("retention.ms", Some("60000")).expect("valid");
    store.alter_topic_config("t", cfg.clone()).await.expect("alter");
    assert_eq!(store.topic("t").expect("exists").config, cfg);
    store.delete_topic("t").await.expect("delete");
    assert!(store.topic("t").is_none());
    assert!(matches!(store.append_records("t", 0, vec![rec(0)]).await, Err(StoreError::UnknownTopic(_))));
    store.create_topic("t", 1, TopicConfig::default()).await.expect("recreate");
    assert_eq!(store.watermarks("t", 0).expect("fresh").high_watermark, 0, "a re-created topic starts empty");
    store.close().await.expect("close");
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.topics().iter().map(|t| (t.name.as_str(), t.partitions)).collect::<Vec<_>>(), vec![("t", 1)]);
}

#[tokio::test]
async fn kv_spaces_are_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    store.kv_put(KvSpace::GroupOffsets, b"g1/t/0".to_vec(), Some(b"42".to_vec())).await.expect("put");
    store.kv_put(KvSpace::GroupOffsets, b"g1/t/1".to_vec(), Some(b"7".to_vec())).await.expect("put");
    store.kv_put(KvSpace::GroupOffsets, b"g2/t/0".to_vec(), Some(b"1".to_vec())).await.expect("put");
    store.kv_put(KvSpace::GroupOffsets, b"g1/t/1".to_vec(), None).await.expect("delete");
    store.close().await.expect("close");
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.kv_get(KvSpace::GroupOffsets, b"g1/t/0").expect("get"), Some(b"42".to_vec()));
    assert_eq!(store.kv_scan(KvSpace::GroupOffsets, b"g1/", 10).expect("scan").len(), 1);
}

#[tokio::test]
async fn writer_packs_batches_under_the_page_cap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let cfg = TopicConfig { compression: Codec::None, ..TopicConfig::default() };
    store.create_topic("t", 1, cfg).await.expect("create");
    let records: Vec<NewRecord> =
        (0..2000).map(|i| NewRecord::new(None::<Bytes>, Bytes::from(vec![i as u8; 100]))).collect();
    store.append_records("t", 0, records).await.expect("append");
    let f = store.fetch("t", 0, 0, 1 << 30).expect("fetch");
    let mut rest = &f.data[..];
    let mut n = 0;
    while !rest.is_empty() {
        let h = batch::BatchHeader::parse(rest).expect("header");
        assert!(h.total_len() <= store.config().batch_size_bytes_max as usize, "{}", h.total_len());
        rest = &rest[h.total_len()..];
        n += 1;
    }
    assert!(n >= 2000 * 100 / 16384, "{n} batches");
}

#[tokio::test]
async fn a_key_value_write_commits_with_its_append() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    store.create_topic("t", 1, TopicConfig::default()).await.expect("topic");
    let kv = vec![(KvSpace::MqttSessions, b"c1/pkid/7".to_vec(), Some(b"stored".to_vec()))];
    let o = store.enqueue_records_with("t", 0, vec![rec(0)], kv).await.expect("queued").wait().await.expect("durable");
    assert_eq!(o.base_offset, 0);
    // Refused before queueing (unknown partition): neither the record nor the key is written.
    let kv = vec![(KvSpace::MqttSessions, b"c1/pkid/8".to_vec(), Some(b"x".to_vec()))];
    assert!(store.enqueue_records_with("t", 5, vec![rec(1)], kv).await.is_err());
    store.close().await.expect("close");
    let store = open(dir.path());
    assert_eq!(store.kv_get(KvSpace::MqttSessions, b"c1/pkid/7").expect("get"), Some(b"stored".to_vec()));
    assert_eq!(store.kv_get(KvSpace::MqttSessions, b"c1/pkid/8").expect("get"), None);
    assert_eq!(store.watermarks("t", 0).expect("wm").high_watermark, 1);
    store.close().await.expect("close");
}

#[tokio::test]
async fn probe_writes_through_the_writer_and_fails_once_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    // No ticks during the test, so the commit count below moves only with our own operations.
    let cfg = StorageConfig {
        retention_check_interval_ms: 3_600_000,
        relaxed_flush_interval_ms: 3_600_000,
        ..config(dir.path())
    };
    let store = Store::open(cfg).expect("open").0;
    store.create_topic("t", 1, TopicConfig::default()).await.expect("create");
    // Queued behind an append, the probe is answered once the writer reached it.
    let pending = store.enqueue_records("t", 0, vec![rec(0)]).await.expect("enqueue");
    let fault = tokio::time::timeout(Duration::from_secs(10), store.probe()).await.expect("answered in time");
    assert!(fault.expect("probe").is_none());
    pending.wait().await.expect("append");
    let before = store.stats();
    assert!(store.probe().await.expect("probe").is_none(), "a healthy writer writes");
    let after = store.stats();
    assert_eq!(after.commits, before.commits + 1, "a probe is a real write transaction");
    assert_eq!(after.durable_commits, before.durable_commits + 1, "committed durably (one fsync)");
    store.close().await.expect("close");
    assert!(matches!(store.probe().await, Err(StoreError::Closed)));
}

#[tokio::test]
async fn global_retention_deletes_mirrored_batches_before_older_unmirrored_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = StorageConfig { max_bytes: 16 << 20, ..config(dir.path()) };
    let store = Store::open(cfg).expect("open").0;
    let plain = TopicConfig { compression: Codec::None, ..TopicConfig::default() };
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut noise = |n: usize| {
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            v.extend_from_slice(&seed.to_le_bytes());
        }
        Bytes::from(v)
    };
    let mut fill = |topic: &'static str, mib: usize| {
        let batches: Vec<Vec<NewRecord>> =
            (0..mib * 16).map(|_| (0..16).map(|_| NewRecord::new(None::<Bytes>, noise(4096))).collect()).collect();
        (topic, batches)
    };
    // The oldest data is not mirrored; newer data is, fully.
    // 3 + 3 MiB stay under the 90% high mark of 16 MiB (with page overhead); 6 more go past it.
    for (topic, mib) in [("unmirrored", 3), ("mirrored", 3), ("fresh", 0)] {
        store.create_topic(topic, 1, plain.clone()).await.expect("create");
        let (_, batches) = fill(topic, mib);
        for b in batches {
            store.append_records(topic, 0, b).await.expect("append");
        }
    }
    let hw = store.watermarks("mirrored", 0).expect("wm").high_watermark;
    store.set_mirrored("mirrored", 0, hw).await.expect("mark");
    assert_eq!(store.mirrored("mirrored", 0).expect("mark"), Some(hw));
    assert_eq!(store.mirrored("unmirrored", 0).expect("mark"), None);
    assert_eq!(store.stats().retention_deleted_batches, 0, "{:?}", store.stats());
    // Past the high mark: retention frees space.
    let (_, batches) = fill("fresh", 6);
    for b in batches {
        store.append_records("fresh", 0, b).await.expect("append");
    }
    let unmirrored = store.watermarks("unmirrored", 0).expect("wm");
    let mirrored = store.watermarks("mirrored", 0).expect("wm");
    assert!(mirrored.log_start_offset > 0, "mirrored data deleted: {mirrored:?} {:?}", store.stats());
    assert_eq!(unmirrored.log_start_offset, 0, "older unmirrored data kept while mirrored data remained");
    assert!(store.stats().retention_deleted_batches > 0);
    assert_eq!(store.stats().retention_deleted_unmirrored_batches, 0);
    // The mark survives a restart.
    store.close().await.expect("close");
    let store = open(dir.path());
    assert_eq!(store.mirrored("mirrored", 0).expect("mark"), Some(hw));
}
