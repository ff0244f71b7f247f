//! Unit tests of the store: appends, reads, restarts, retention, topic administration.

use std::time::Duration;

use bytes::Bytes;

use super::batch::{self, NewRecord};
use super::*;
use crate::config::{Codec, StorageConfig, TimestampKind, TopicConfig};

/// Key-value spaces of these tests (users name theirs; the store knows none of them).
const SPACE_A: KvSpace = KvSpace::named("kv.test_a");
const SPACE_B: KvSpace = KvSpace::named("kv.test_b");
const SPACE_C: KvSpace = KvSpace::named("kv.test_c");

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
    let started = std::time::Instant::now();
    let wm = store.wait_for_data("t", 0, 0, Duration::from_millis(20)).await.expect("timeout is not an error");
    assert_eq!(wm.high_watermark, 0);
    assert!(started.elapsed() >= Duration::from_millis(20), "nothing to wake it: it waited out its timeout");
    // A waiter with a timeout far longer than the test may take: woken by the append, it
    // returns at once; a broken wake-up would only return after the timeout.
    let timeout = Duration::from_secs(10);
    let waiter = {
        let s = store.clone();
        tokio::spawn(async move {
            let wm = s.wait_for_data("t", 0, 0, timeout).await;
            (wm, std::time::Instant::now())
        })
    };
    // Append only once the waiter is parked on the partition's watch (else it would find the
    // record without waiting and prove nothing).
    let (_, p) = store.partition_state("t", 0).expect("partition");
    let parked = std::time::Instant::now();
    while p.signal.receiver_count() == 0 {
        assert!(parked.elapsed() < Duration::from_secs(10), "the waiter never parked");
        tokio::task::yield_now().await;
    }
    store.append_records("t", 0, vec![rec(0)]).await.expect("append");
    let appended = std::time::Instant::now();
    let (wm, woke) = waiter.await.expect("join");
    assert_eq!(wm.expect("woken").high_watermark, 1);
    let after = woke.saturating_duration_since(appended);
    assert!(after < timeout / 2, "woken {after:?} after the append: not by it (timeout {timeout:?})");
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

/// Every record of partition 0 of `t` from the log start, by reading on until the high watermark.
fn all_records(store: &Store) -> Vec<(i64, i64)> {
    let wm = store.watermarks("t", 0).expect("watermarks");
    let mut out = Vec::new();
    let mut at = wm.log_start_offset;
    while at < wm.high_watermark {
        let (records, next) = store.read_records_next("t", 0, at, 1 << 20).expect("read");
        out.extend(records.iter().filter(|r| r.offset >= at).map(|r| (r.offset, r.timestamp)));
        assert!(next > at, "reading from {at} made no progress");
        at = next;
    }
    out
}

/// The sparse time index (`tables::TIME_INDEX`): every lookup answers what a scan of every
/// record answers (the first record at or past the time), with timestamps that mostly grow but
/// also go back and jump ahead, through restarts (which forget where the index stands) and
/// retention (which moves the log start); and the index keeps about one entry per
/// `TIME_INDEX_INTERVAL_BYTES` of batches, not one per batch.
#[tokio::test]
async fn time_lookups_agree_with_a_scan_of_every_record_through_restarts_and_retention() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut store = open(dir.path());
    let cfg = TopicConfig { retention_bytes: Some(400_000), compression: Codec::None, ..TopicConfig::default() };
    store.create_topic("t", 1, cfg).await.expect("create");
    let mut ts = 1_000_000i64;
    for phase in 0..6 {
        for _ in 0..120 {
            let n = rng.random_range(1..=6);
            let records: Vec<NewRecord> = (0..n)
                .map(|_| {
                    ts += match rng.random_range(0..10) {
                        0 => -rng.random_range(0..5_000),
                        1 => rng.random_range(0..20_000),
                        _ => rng.random_range(0..50),
                    };
                    let value = vec![b'v'; rng.random_range(10..1_500)];
                    NewRecord {
                        key: None,
                        value: Some(Bytes::from(value)),
                        headers: Vec::new(),
                        timestamp_ms: Some(ts),
                    }
                })
                .collect();
            store.append_records("t", 0, records).await.expect("append");
        }
        let records = all_records(&store);
        let (lo, hi) = records.iter().fold((i64::MAX, i64::MIN), |(lo, hi), r| (lo.min(r.1), hi.max(r.1)));
        let mut times = vec![i64::MIN, 0, lo - 1, lo, hi, hi + 1, i64::MAX];
        for _ in 0..250 {
            let (_, t) = records[rng.random_range(0..records.len())];
            times.push(t + rng.random_range(-1..=1));
        }
        for t in times {
            let want = records.iter().find(|r| r.1 >= t).copied();
            assert_eq!(store.offset_for_timestamp("t", 0, t).expect("lookup"), want, "phase {phase}, time {t}");
        }
        // Sparse: at most one entry per interval of the batches kept, and a few more (retention
        // moves one entry to the log start, a restart may start a range early).
        let (_, p) = store.partition_state("t", 0).expect("partition");
        let db = store.db().expect("db");
        let rtx = db.begin_read().expect("read");
        let entries = rtx
            .open_table(TIME_INDEX)
            .expect("index")
            .range((p.key, i64::MIN)..=(p.key, i64::MAX))
            .expect("range")
            .count() as u64;
        let info = store.partition_info("t", 0).expect("info");
        assert!(
            entries <= info.logical_bytes / tables::TIME_INDEX_INTERVAL_BYTES + 3,
            "phase {phase}: {entries} entries for {} bytes of batches",
            info.logical_bytes
        );
        if phase % 2 == 1 {
            drop(rtx);
            drop(db);
            store.close().await.expect("close");
            drop(store);
            store = open(dir.path());
        }
    }
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
    store.kv_put(SPACE_A, b"g1/t/0".to_vec(), Some(b"42".to_vec())).await.expect("put");
    store.kv_put(SPACE_A, b"g1/t/1".to_vec(), Some(b"7".to_vec())).await.expect("put");
    store.kv_put(SPACE_A, b"g2/t/0".to_vec(), Some(b"1".to_vec())).await.expect("put");
    store.kv_put(SPACE_A, b"g1/t/1".to_vec(), None).await.expect("delete");
    store.close().await.expect("close");
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.kv_get(SPACE_A, b"g1/t/0").expect("get"), Some(b"42".to_vec()));
    assert_eq!(store.kv_scan(SPACE_A, b"g1/", 10).expect("scan").len(), 1);
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
    let kv = vec![(SPACE_B, b"c1/pkid/7".to_vec(), Some(b"stored".to_vec()))];
    let o = store.enqueue_records_with("t", 0, vec![rec(0)], kv).await.expect("queued").wait().await.expect("durable");
    assert_eq!(o.base_offset, 0);
    // Refused before queueing (unknown partition): neither the record nor the key is written.
    let kv = vec![(SPACE_B, b"c1/pkid/8".to_vec(), Some(b"x".to_vec()))];
    assert!(store.enqueue_records_with("t", 5, vec![rec(1)], kv).await.is_err());
    store.close().await.expect("close");
    let store = open(dir.path());
    assert_eq!(store.kv_get(SPACE_B, b"c1/pkid/7").expect("get"), Some(b"stored".to_vec()));
    assert_eq!(store.kv_get(SPACE_B, b"c1/pkid/8").expect("get"), None);
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
async fn global_retention_deletes_archived_batches_before_older_unarchived_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = StorageConfig { max_bytes: 16 << 20, ..config(dir.path()) };
    let store = Store::open(cfg).expect("open").0;
    let plain = TopicConfig { compression: Codec::None, ..TopicConfig::default() };
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut noise = |n: usize| noise(&mut seed, n);
    let mut fill = |topic: &'static str, mib: usize| {
        let batches: Vec<Vec<NewRecord>> =
            (0..mib * 16).map(|_| (0..16).map(|_| NewRecord::new(None::<Bytes>, noise(4096))).collect()).collect();
        (topic, batches)
    };
    // The oldest data is not archived; newer data is, fully.
    // 3 + 3 MiB stay under the 90% high mark of 16 MiB (with page overhead); 9 more go past it.
    for (topic, mib) in [("unarchived", 3), ("archived", 3), ("fresh", 0)] {
        store.create_topic(topic, 1, plain.clone()).await.expect("create");
        let (_, batches) = fill(topic, mib);
        for b in batches {
            store.append_records(topic, 0, b).await.expect("append");
        }
    }
    let hw = store.watermarks("archived", 0).expect("wm").high_watermark;
    store.set_archived("archived", 0, hw).await.expect("mark");
    assert_eq!(store.archived("archived", 0).expect("mark"), Some(hw));
    assert_eq!(store.archived("unarchived", 0).expect("mark"), None);
    assert_eq!(store.stats().retention_deleted_batches, 0, "{:?}", store.stats());
    // Past the high mark: retention frees space.
    let (_, batches) = fill("fresh", 9);
    for b in batches {
        store.append_records("fresh", 0, b).await.expect("append");
    }
    let unarchived = store.watermarks("unarchived", 0).expect("wm");
    let archived = store.watermarks("archived", 0).expect("wm");
    assert!(archived.log_start_offset > 0, "archived data deleted: {archived:?} {:?}", store.stats());
    assert_eq!(unarchived.log_start_offset, 0, "older unarchived data kept while archived data remained");
    assert!(store.stats().retention_deleted_batches > 0);
    assert_eq!(store.stats().retention_deleted_unarchived_batches, 0);
    // The mark survives a restart.
    store.close().await.expect("close");
    let store = open(dir.path());
    assert_eq!(store.archived("archived", 0).expect("mark"), Some(hw));
}

// ---- issue 13: auto-creation under a crowd, relaxed offsets, disk faults, the disk budget ----

/// Item 13: many callers create the same new topic at once. Each answer (success or
/// TopicExists) comes only after the round that created the topic was committed and published,
/// so every caller finds the topic the moment it is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_topic_answers_only_once_the_topic_is_visible() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    for round in 0..20 {
        let name = format!("crowd-{round}");
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let (s, name) = (store.clone(), name.clone());
            tasks.push(tokio::spawn(async move {
                let answer = s.create_topic(&name, 1, TopicConfig::default()).await;
                let visible = s.topic(&name).is_some();
                (answer, visible)
            }));
        }
        let mut created = 0;
        for t in tasks {
            let (answer, visible) = t.await.expect("join");
            match answer {
                Ok(()) => created += 1,
                Err(StoreError::TopicExists(_)) => {}
                Err(e) => panic!("{name}: {e}"),
            }
            assert!(visible, "{name}: answered before the topic was visible");
        }
        assert_eq!(created, 1, "{name}: exactly one creation");
    }
}

/// A store on a simulated disk with no time-driven rounds (no ticks, no relaxed flush), so
/// only the test's operations write.
fn open_on(disk: &simdisk::SimDisk, dir: &std::path::Path) -> (Store, OpenReport) {
    let cfg =
        StorageConfig { retention_check_interval_ms: 3_600_000, relaxed_flush_interval_ms: 3_600_000, ..config(dir) };
    Store::open_with_backend(cfg, disk.opener()).expect("open on the simulated disk")
}

/// Topic `t` (one partition, fsync) on a simulated disk, holding `rec(0)` at offset 0.
async fn one_record_on_a_sim_disk() -> (tempfile::TempDir, simdisk::SimDisk, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = simdisk::SimDisk::new();
    let (store, _) = open_on(&disk, dir.path());
    store.create_topic("t", 1, TopicConfig::default()).await.expect("create");
    store.append_records("t", 0, vec![rec(0)]).await.expect("append");
    (dir, disk, store)
}

/// Appends `record` to `t` once writes work again after a fault (they are paused for a while
/// after each failure), within 30 s.
async fn append_once_writes_resume(store: &Store, record: NewRecord) -> AppendOutcome {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match store.append_records("t", 0, vec![record.clone()]).await {
            Ok(o) => return o,
            Err(e) => assert!(std::time::Instant::now() < deadline, "writes never resumed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Item 5: acknowledged relaxed appends that a crash loses leave a gap; their offsets are never
/// handed out again, readers and Kafka-style fetches move past the gap, and a clean close leaves
/// no gap.
#[tokio::test]
async fn relaxed_appends_lost_in_a_crash_leave_a_gap_and_no_offset_is_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = simdisk::SimDisk::new();
    let (store, _) = open_on(&disk, dir.path());
    let relaxed = TopicConfig { durability: crate::config::Durability::Relaxed, ..TopicConfig::default() };
    store.create_topic("r", 1, relaxed).await.expect("create");
    let mut acked = Vec::new();
    for i in 0..20 {
        acked.push(store.append_records("r", 0, vec![rec(i)]).await.expect("append").base_offset);
    }
    assert_eq!(acked, (0..20).collect::<Vec<i64>>());
    // A process crash: the file as it is now, the process gone without closing.
    let crashed = simdisk::SimDisk::from_image(disk.image());
    let (after, report) = open_on(&crashed, dir.path());
    assert!(report.repaired, "an unclean shutdown");
    assert_eq!(report.gaps, 1, "the relaxed partition lost appends: one gap");
    let wm = after.watermarks("r", 0).expect("wm");
    let kept = after.read_records("r", 0, 0, 1 << 20).expect("read");
    // The first append raised the reservation durably; the later ones were not durable.
    assert!(!kept.is_empty() && kept.len() < 20, "kept {} of 20", kept.len());
    for (i, r) in kept.iter().enumerate() {
        assert_eq!((r.offset, r.value.as_deref()), (i as i64, Some(format!("value-{i}").as_bytes())));
    }
    assert!(wm.high_watermark >= 20, "offsets up to the reservation are skipped: {wm:?}");
    let next = after.append_records("r", 0, vec![rec(99)]).await.expect("append after the crash");
    assert_eq!(next.base_offset, wm.high_watermark, "new records go after the gap");
    assert!(next.base_offset > *acked.last().expect("acked"), "an acknowledged offset is never reused");
    // Inside the gap, a fetch serves the gap batch and then the next records, whatever max_bytes.
    let lost = kept.len() as i64;
    let f = after.fetch("r", 0, lost + 1, 1).expect("fetch inside the gap");
    let h = batch::BatchHeader::parse(&f.data).expect("header");
    assert!(h.is_control() && h.base_offset == lost && h.next_offset() == wm.high_watermark, "{h:?}");
    assert_eq!(f.batches, 2, "the gap batch and the first batch after it");
    assert_eq!(f.next_offset, next.last_offset + 1);
    let read = after.read_records("r", 0, lost + 1, 1).expect("read past the gap");
    assert_eq!(read.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![next.base_offset]);
    // A clean close releases the reservation: the next open adds no gap.
    after.close().await.expect("close");
    let (reopened, report) = open_on(&crashed, dir.path());
    assert_eq!((report.repaired, report.gaps), (false, 0));
    assert_eq!(reopened.watermarks("r", 0).expect("wm").high_watermark, next.last_offset + 1);
    store.close().await.expect("close the crashed store's leftover handle");
}

/// A durable round's records are staged: while its commit waits for the disk, readers of staged
/// records (MQTT delivery) get them and are woken for them; committed readers (Kafka fetch, the
/// mirror) and the acknowledgement wait for the commit.
#[tokio::test]
async fn a_durable_rounds_records_are_staged_while_its_commit_waits_for_the_disk() {
    let (_dir, disk, store) = one_record_on_a_sim_disk().await;
    let mut staged = store.watch_staged("t", 0).expect("watch");
    let mut committed = store.watch("t", 0).expect("watch");
    disk.hold(simdisk::Held::Syncs);
    let pending = store.enqueue_records("t", 0, vec![rec(1)]).await.expect("queued");
    let waiting = tokio::spawn(pending.wait());
    assert!(tokio::time::timeout(Duration::from_secs(30), staged.changed()).await.expect("staged in time"));
    assert!(disk.wait_for_held(Duration::from_secs(30)), "the commit waits at the disk");
    let (wm, end) = store.staged_watermarks("t", 0).expect("staged");
    assert_eq!((wm.high_watermark, end), (1, 2));
    let read = store.read_records_cached_to("t", 0, 1, 1 << 20, ReadTo::Staged).expect("in memory").expect("read");
    assert_eq!(read.iter().map(|r| (r.offset, r.value.clone())).collect::<Vec<_>>(), vec![(1, rec(1).value)]);
    // Nobody else sees it yet, and nobody is told it is stored.
    assert!(store.read_records("t", 0, 1, 1 << 20).expect("read").is_empty());
    assert!(store.read_records_cached("t", 0, 1, 1 << 20).expect("cached").expect("read").is_empty());
    assert!(!waiting.is_finished());
    assert!(
        tokio::time::timeout(Duration::from_millis(50), committed.changed()).await.is_err(),
        "committed readers are not woken by a stage"
    );
    disk.release();
    let outcome = waiting.await.expect("join").expect("durable");
    assert_eq!(outcome.base_offset, 1);
    assert!(committed.changed().await);
    assert_eq!(store.read_records("t", 0, 1, 1 << 20).expect("read").len(), 1);
    assert_eq!(store.staged_watermarks("t", 0).expect("staged").1, 2);
    store.close().await.expect("close");
}

/// A round that restores records is not staged: a restore whose commit failed is written again
/// at the same offsets, which a gap over staged offsets would have taken.
#[tokio::test]
async fn a_restore_is_not_staged() {
    let (_dir, disk, store) = one_record_on_a_sim_disk().await;
    disk.hold(simdisk::Held::Syncs);
    let pending = store.enqueue_restore("t", 0, vec![(5, rec(5))], Vec::new()).await.expect("queued");
    assert!(disk.wait_for_held(Duration::from_secs(30)), "the commit waits at the disk");
    assert_eq!(store.staged_watermarks("t", 0).expect("staged").1, 1, "nothing staged");
    assert!(store
        .read_records_cached_to("t", 0, 1, 1 << 20, ReadTo::Staged)
        .expect("answered")
        .expect("read")
        .is_empty());
    disk.release();
    assert_eq!(pending.wait().await.expect("restored").base_offset, 5);
    assert_eq!(store.read_records("t", 0, 5, 1 << 20).expect("read").len(), 1);
    store.close().await.expect("close");
}

/// A staged round whose commit fails: its records leave memory, and the offsets it showed are
/// never handed out again (the next committed round covers them with a gap batch), so a
/// subscriber that was given them and stored its position after them misses no later record.
#[tokio::test]
async fn a_staged_round_whose_commit_fails_leaves_a_gap_over_what_it_showed() {
    let (dir, disk, store) = one_record_on_a_sim_disk().await;
    disk.hold(simdisk::Held::Writes);
    let pending = store.enqueue_records("t", 0, vec![rec(1), rec(2)]).await.expect("queued");
    assert!(disk.wait_for_held(Duration::from_secs(30)), "the commit's first write waits at the disk");
    let shown = store.read_records_cached_to("t", 0, 1, 1 << 20, ReadTo::Staged).expect("in memory").expect("read");
    assert_eq!(shown.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![1, 2]);
    disk.set_fault(Some(simdisk::WriteFault::All));
    disk.release();
    assert!(pending.wait().await.is_err(), "the commit failed");
    let (wm, end) = store.staged_watermarks("t", 0).expect("staged");
    assert_eq!((wm.high_watermark, end), (1, 1), "the staged records are gone");
    assert!(store
        .read_records_cached_to("t", 0, 1, 1 << 20, ReadTo::Staged)
        .expect("answered")
        .expect("read")
        .is_empty());
    disk.set_fault(None);
    let next = append_once_writes_resume(&store, rec(3)).await;
    assert_eq!(next.base_offset, 3, "offsets 1 and 2 were shown: never given to another record");
    let check = |store: &Store| {
        let read = store.read_records("t", 0, 0, 1 << 20).expect("read");
        assert_eq!(
            read.into_iter().map(|r| (r.offset, r.value)).collect::<Vec<_>>(),
            vec![(0, rec(0).value), (3, rec(3).value)]
        );
        let f = store.fetch("t", 0, 1, 1).expect("fetch in the gap");
        let h = batch::BatchHeader::parse(&f.data).expect("header");
        assert!(h.is_control() && h.base_offset == 1 && h.next_offset() == 3, "{h:?}");
    };
    check(&store);
    // The gap is stored, not only remembered.
    let crashed = simdisk::SimDisk::from_image(disk.image());
    let (after, _) = open_on(&crashed, dir.path());
    check(&after);
    assert_eq!(after.watermarks("t", 0).expect("wm").high_watermark, 4);
    after.close().await.expect("close");
    store.close().await.expect("close");
}

/// Item 4: a disk that refuses to grow the file (a full file system, RLIMIT_FSIZE) makes
/// writes fail with a clear error while reads go on; every failure is counted; once the disk
/// works again writes succeed without anyone reopening anything, and nothing acknowledged
/// before the fault is lost.
#[tokio::test]
async fn a_failed_write_is_not_forever() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = simdisk::SimDisk::new();
    let (store, _) = open_on(&disk, dir.path());
    let plain = TopicConfig { compression: Codec::None, ..TopicConfig::default() };
    store.create_topic("t", 1, plain).await.expect("create");
    let big = |i: usize| NewRecord::new(None::<Bytes>, Bytes::from(vec![i as u8; 64 << 10]));
    let mut acked = Vec::new();
    for i in 0..8 {
        acked.push(store.append_records("t", 0, vec![big(i)]).await.expect("append").base_offset);
    }
    disk.set_fault(Some(simdisk::WriteFault::Beyond(disk.len_bytes())));
    // Until three writes have failed (each answered once the database is reopened); between
    // failures, writes are refused without trying (paused: `Unavailable`) for a growing pause.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (mut failed, mut paused) = (0, 0);
    while failed < 3 {
        assert!(std::time::Instant::now() < deadline, "{:?}", store.stats());
        match store.append_records("t", 0, vec![big(acked.len())]).await {
            Ok(o) => acked.push(o.base_offset),
            Err(StoreError::Storage(_)) => failed += 1,
            Err(StoreError::Unavailable(_)) => paused += 1,
            Err(e) => panic!("unexpected error: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(paused > 0, "writes are paused between attempts");
    let stats = store.stats();
    assert_eq!(stats.failed_commits, 3, "every failed write is counted, not only the first: {stats:?}");
    assert_eq!(stats.reopens, 3, "{stats:?}");
    assert!(store.write_fault().is_some());
    // Reads work: the database was reopened.
    let read = store.read_records("t", 0, 0, 1 << 30).expect("reads work during the fault");
    assert_eq!(read.iter().map(|r| r.offset).collect::<Vec<_>>(), acked);
    // The watchdog's probe: the writer answers, naming the fault.
    assert!(store.probe().await.expect("the writer answers").is_some());
    // The fault clears: writes work again, nobody reopened anything.
    disk.set_fault(None);
    let o = append_once_writes_resume(&store, big(1000)).await;
    acked.push(o.base_offset);
    assert!(store.write_fault().is_none());
    assert!(store.probe().await.expect("probe").is_none(), "the probe writes again");
    let read = store.read_records("t", 0, 0, 1 << 30).expect("read");
    assert_eq!(read.iter().map(|r| r.offset).collect::<Vec<_>>(), acked, "nothing acknowledged was lost");
    store.close().await.expect("close");
}

/// Item 4: a disk that refuses every write (reads may be unavailable meanwhile, with a clear
/// error, if the database cannot be reopened without writing): once it works again, everything
/// comes back on its own.
#[tokio::test]
async fn a_disk_refusing_every_write_recovers_once_it_works_again() {
    let (_dir, disk, store) = one_record_on_a_sim_disk().await;
    disk.set_fault(Some(simdisk::WriteFault::All));
    assert!(store.append_records("t", 0, vec![rec(1)]).await.is_err());
    // Reopening may or may not work without writing: reads work, or fail with a clear error.
    match store.fetch("t", 0, 0, 1 << 20) {
        Ok(f) => assert_eq!(f.batches, 1),
        Err(e) => assert!(matches!(e, StoreError::Unavailable(_)), "{e}"),
    }
    assert!(matches!(store.probe().await, Ok(Some(_))), "the writer still answers");
    disk.set_fault(None);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while store.append_records("t", 0, vec![rec(2)]).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let values: Vec<_> = store.read_records("t", 0, 0, 1 << 20).expect("read").into_iter().map(|r| r.value).collect();
    assert_eq!(values, vec![rec(0).value, rec(2).value]);
    store.close().await.expect("close");
}

/// Item 4: key-value inserts (sessions, offsets, retained messages) are refused on a full disk
/// as appends are; removals, which free space, go through; the probe reports the full disk.
#[tokio::test]
async fn key_value_inserts_are_refused_on_a_full_disk_and_removals_allowed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    store.kv_put(SPACE_C, b"a".to_vec(), Some(b"1".to_vec())).await.expect("room: stored");
    store.close().await.expect("close");
    // No volume has 2^50 bytes free: the disk counts as full.
    let full = StorageConfig { disk_free_bytes_min: 1 << 50, ..config(dir.path()) };
    let store = Store::open(full).expect("open").0;
    for space in [SPACE_B, SPACE_A, SPACE_C] {
        let e = store.kv_put(space, b"k".to_vec(), Some(b"v".to_vec())).await.expect_err("insert refused");
        assert!(matches!(e, StoreError::DiskFull { .. }), "{space:?}: {e}");
    }
    let mixed = vec![(b"a".to_vec(), None), (b"b".to_vec(), Some(b"2".to_vec()))];
    assert!(matches!(store.kv_write(SPACE_C, mixed).await, Err(StoreError::DiskFull { .. })));
    assert_eq!(store.kv_get(SPACE_C, b"a").expect("get"), Some(b"1".to_vec()), "all or nothing");
    store.kv_put(SPACE_C, b"a".to_vec(), None).await.expect("a removal frees space: allowed");
    assert_eq!(store.kv_get(SPACE_C, b"a").expect("get"), None);
    assert!(matches!(store.probe().await, Ok(Some(StoreError::DiskFull { .. }))));
    store.close().await.expect("close");
}

/// Item 9 (the store's part): key-value bytes count against `storage.max_bytes`: writing them
/// makes retention delete log batches, `kv_bytes` follows every write and removal, and is
/// recomputed at open.
#[tokio::test]
async fn key_value_bytes_count_against_the_disk_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = StorageConfig { max_bytes: 16 << 20, ..config(dir.path()) };
    let store = Store::open(cfg.clone()).expect("open").0;
    let plain = TopicConfig { compression: Codec::None, ..TopicConfig::default() };
    store.create_topic("t", 1, plain).await.expect("create");
    // 768 records of 16 KiB: 12.5 MiB of pages (each a 16 KiB piece and a head, `tables::layout`).
    for i in 0..12 * 64 {
        store
            .append_records("t", 0, vec![NewRecord::new(None::<Bytes>, Bytes::from(vec![i as u8; 16 << 10]))])
            .await
            .expect("append");
    }
    assert_eq!(store.watermarks("t", 0).expect("wm").log_start_offset, 0, "12 MiB of log pages fit the budget");
    assert_eq!(store.stats().kv_bytes, 0);
    // 10 retained messages of 500 KiB (5 MiB of pages) and 12.5 MiB of log pages: past the 90%
    // high mark of 16 MiB.
    let value = 500 << 10;
    for i in 0..10u8 {
        store.kv_put(SPACE_C, vec![b'r', i], Some(vec![i; value])).await.expect("put");
    }
    let stats = store.stats();
    assert_eq!(stats.kv_bytes, 10 * tables::kv_footprint(2, value), "{stats:?}");
    assert!(store.watermarks("t", 0).expect("wm").log_start_offset > 0, "log batches deleted to make room: {stats:?}");
    assert!(stats.footprint_bytes + stats.kv_bytes <= cfg.retention_high_bytes(), "{stats:?}");
    store.kv_put(SPACE_C, vec![b'r', 0], None).await.expect("remove");
    store.kv_put(SPACE_C, vec![b'r', 1], Some(vec![1; 100])).await.expect("shrink");
    let kv = store.stats().kv_bytes;
    assert_eq!(kv, 8 * tables::kv_footprint(2, value) + tables::kv_footprint(2, 100));
    store.close().await.expect("close");
    let store = Store::open(cfg).expect("reopen").0;
    assert_eq!(store.stats().kv_bytes, kv, "recomputed at open");
    store.close().await.expect("close");
}

/// Item 4: what one watchdog probe costs (it runs every `WATCHDOG_USEC / 2`, 15 s with the
/// shipped unit, on an SD card): syncs and bytes written (exact, on the simulated disk) and its
/// latency on this machine's file system. Measurement only:
/// `cargo test -p tributary-broker probe_cost -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "a measurement, not a check"]
async fn probe_cost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = simdisk::SimDisk::recording();
    let (store, _) = open_on(&disk, dir.path());
    store.create_topic("t", 1, TopicConfig::default()).await.expect("create");
    store.probe().await.expect("probe");
    const N: usize = 100;
    let before = disk.trace().len();
    for _ in 0..N {
        assert!(store.probe().await.expect("probe").is_none());
    }
    let trace = disk.trace();
    let (mut writes, mut bytes, mut syncs) = (0usize, 0usize, 0usize);
    for e in &trace[before..] {
        match e {
            simdisk::Event::Write { data, .. } => {
                writes += 1;
                bytes += data.len();
            }
            simdisk::Event::Sync => syncs += 1,
            _ => {}
        }
    }
    eprintln!(
        "probe on the simulated disk, idle: {:.1} syncs, {:.1} writes, {} bytes written per probe",
        syncs as f64 / N as f64,
        writes as f64 / N as f64,
        bytes / N
    );
    // Under traffic the probe joins the round of the appends queued with it: no sync of its own.
    let syncs_of = |from: usize| disk.trace()[from..].iter().filter(|e| **e == simdisk::Event::Sync).count();
    let mut alone = 0;
    let mut joined = 0;
    for i in 0..N {
        let mark = disk.trace().len();
        store.append_records("t", 0, vec![rec(i)]).await.expect("append");
        alone += syncs_of(mark);
        let mark = disk.trace().len();
        let pending = store.enqueue_records("t", 0, vec![rec(i)]).await.expect("enqueue");
        assert!(store.probe().await.expect("probe").is_none());
        pending.wait().await.expect("append");
        joined += syncs_of(mark);
    }
    eprintln!(
        "an append alone: {alone} syncs per {N}; an append with a probe queued behind it: {joined} syncs per {N}"
    );
    store.close().await.expect("close");
    let store = open(dir.path());
    store.probe().await.expect("probe");
    let mut micros: Vec<u128> = Vec::new();
    for _ in 0..N {
        let t = std::time::Instant::now();
        store.probe().await.expect("probe");
        micros.push(t.elapsed().as_micros());
    }
    micros.sort_unstable();
    eprintln!("probe on a real file here: median {} us, p99 {} us", micros[N / 2], micros[N * 99 / 100]);
    store.close().await.expect("close");
}

/// Every read the tail cache serves equals what the database holds: single records packed by
/// the writer (lz4) and client batches, at every offset, with small and large `max_bytes`.
#[tokio::test]
async fn the_tail_cache_serves_exactly_what_the_database_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    store
        .create_topic("t", 1, TopicConfig { compression: Codec::Lz4, ..TopicConfig::default() })
        .await
        .expect("create");
    for i in 0..40 {
        if i % 3 == 0 {
            store.append_batch("t", 0, Bytes::from(client_batch(7, Codec::Gzip))).await.expect("append batch");
        } else {
            store.append_records("t", 0, vec![rec(i), rec(i + 1000)]).await.expect("append records");
        }
    }
    let (_, p) = store.partition_state("t", 0).expect("partition");
    let wm = store.watermarks("t", 0).expect("wm");
    let before = store.stats();
    for offset in 0..wm.high_watermark {
        for max_bytes in [1, 300, 1 << 20] {
            let cached = store.fetch_cached("t", 0, offset, max_bytes).expect("held").expect("read");
            let stored = store.fetch_stored(&p, wm, offset, max_bytes).expect("stored");
            assert_eq!(
                (&cached.data, cached.batches, cached.next_offset, cached.watermarks),
                (&stored.data, stored.batches, stored.next_offset, stored.watermarks),
                "offset {offset}, max_bytes {max_bytes}"
            );
        }
    }
    let hits = store.stats().tail_cache_hits - before.tail_cache_hits;
    assert_eq!(hits, 3 * wm.high_watermark as u64);
    let records = store.read_records_cached("t", 0, 5, 1 << 20).expect("held").expect("decoded");
    assert_eq!(records.first().map(|r| r.offset), Some(5));
    assert_eq!(records.last().map(|r| r.offset), Some(wm.high_watermark - 1));
    // At the high watermark: an empty answer without the database; past it: out of range.
    assert_eq!(store.fetch_cached("t", 0, wm.high_watermark, 100).expect("answer").expect("empty").batches, 0);
    assert!(matches!(
        store.fetch_cached("t", 0, wm.high_watermark + 1, 100),
        Some(Err(StoreError::OffsetOutOfRange { .. }))
    ));
}

/// The cache keeps to `storage.tail_cache_bytes_max`: older batches are read from the database,
/// and the bytes it holds never exceed the limit.
#[tokio::test]
async fn the_tail_cache_keeps_to_its_budget_and_older_reads_go_to_the_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(StorageConfig { tail_cache_bytes_max: 4096, ..config(dir.path()) }).expect("open").0;
    store
        .create_topic("t", 2, TopicConfig { compression: Codec::None, ..TopicConfig::default() })
        .await
        .expect("create");
    let big = |i: usize| NewRecord::new(None::<Bytes>, Bytes::from(vec![i as u8; 700]));
    for i in 0..30 {
        store.append_records("t", (i % 2) as i32, vec![big(i)]).await.expect("append");
        assert!(store.stats().tail_cache_bytes <= 4096, "{:?}", store.stats());
    }
    assert!(store.fetch_cached("t", 0, 0, 1 << 20).is_none(), "the oldest batches left the cache");
    assert_eq!(store.fetch_cached("t", 0, 14, 1 << 20).map(|r| r.map(|f| f.next_offset).ok()), Some(Some(15)));
    let misses = store.stats().tail_cache_misses;
    let all = store.read_records("t", 0, 0, 1 << 20).expect("from the database");
    assert_eq!(all.len(), 15);
    assert!(store.stats().tail_cache_misses > misses);
    // Turned off: nothing is held, everything still reads.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let off = Store::open(StorageConfig { tail_cache_bytes_max: 0, ..config(dir2.path()) }).expect("open").0;
    off.create_topic("t", 1, TopicConfig::default()).await.expect("create");
    off.append_records("t", 0, vec![rec(1)]).await.expect("append");
    assert!(off.fetch_cached("t", 0, 0, 100).is_none());
    assert_eq!(off.read_records("t", 0, 0, 100).expect("read").len(), 1);
    assert_eq!(off.stats().tail_cache_bytes, 0);
}

/// A round that writes more than the cache holds copies only the newest batches for it (issue
/// 16: a round of 8 MiB copied it all for a 1 MiB cache), and what the cache then holds of each
/// partition still leads up to its tail: a batch of an earlier round is not served beside a gap.
#[tokio::test]
async fn a_round_larger_than_the_tail_cache_leaves_no_gap_in_it() {
    // Client batches are stored as sent (single records of one round would be packed into one
    // batch per partition); the cache holds four and a half of them.
    let batch = || Bytes::from(client_batch(7, Codec::None));
    let limit = batch().len() * 9 / 2;
    let dir = tempfile::tempdir().expect("tempdir");
    let store =
        Store::open(StorageConfig { tail_cache_bytes_max: limit as u64, ..config(dir.path()) }).expect("open").0;
    store
        .create_topic("t", 2, TopicConfig { compression: Codec::None, ..TopicConfig::default() })
        .await
        .expect("create");
    // An earlier round: partition 0's first batch, a small one, is cached (small enough to fit
    // beside the newest batches of the round below: only a clear takes it out).
    let small = Bytes::from(client_batch(1, Codec::None));
    assert!(small.len() < batch().len() / 2);
    store.append_batch("t", 0, small).await.expect("append");
    assert!(store.fetch_cached("t", 0, 0, 1 << 20).is_some());
    // One round (queued together, one commit) of 20 batches, far more than the cache holds.
    let mut pending = Vec::new();
    for i in 1..=20 {
        pending.push(store.enqueue_batch("t", i % 2, batch()).await.expect("enqueue"));
    }
    for p in pending {
        p.wait().await.expect("append");
    }
    assert!(store.stats().tail_cache_bytes <= limit as u64, "{:?}", store.stats());
    for partition in 0..2 {
        let (_, p) = store.partition_state("t", partition).expect("partition");
        let wm = store.watermarks("t", partition).expect("wm");
        let mut served = 0;
        for offset in 0..wm.high_watermark {
            let Some(cached) = store.fetch_cached("t", partition, offset, 1 << 20) else { continue };
            let cached = cached.expect("read");
            let stored = store.fetch_stored(&p, wm, offset, 1 << 20).expect("stored");
            assert_eq!(
                (&cached.data, cached.next_offset),
                (&stored.data, stored.next_offset),
                "partition {partition}, offset {offset}: the cache serves what the database holds"
            );
            served += 1;
        }
        assert!(served > 0, "partition {partition}: its newest batches are cached");
    }
}

/// Retention and topic deletion: the cache never serves a batch below the log start, nor an old
/// topic's batches to a new topic of the same name.
#[tokio::test]
async fn the_tail_cache_serves_nothing_below_the_log_start_or_of_a_deleted_topic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let cfg = TopicConfig { retention_bytes: Some(5_000), compression: Codec::None, ..TopicConfig::default() };
    store.create_topic("t", 1, cfg).await.expect("create");
    let big = |i: usize| NewRecord::new(None::<Bytes>, Bytes::from(vec![i as u8; 1000]));
    for i in 0..30 {
        store.append_records("t", 0, vec![big(i)]).await.expect("append");
    }
    let wm = store.watermarks("t", 0).expect("wm");
    assert!(wm.log_start_offset > 0, "{wm:?}");
    assert!(matches!(store.fetch_cached("t", 0, 0, 100), Some(Err(StoreError::OffsetOutOfRange { offset: 0, .. }))));
    store.delete_topic("t").await.expect("delete");
    store.create_topic("t", 1, TopicConfig::default()).await.expect("recreate");
    store.append_records("t", 0, vec![rec(7)]).await.expect("append");
    let back = store.read_records_cached("t", 0, 0, 1 << 20).expect("held").expect("read");
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].value.as_deref(), Some(&b"value-7"[..]));
}

/// Kafka's DeleteRecords: the log start moves to the asked offset at once and durably (reads
/// below get OFFSET_OUT_OF_RANGE), the batches wholly below it are deleted and the one holding
/// it stays; -1 means the high watermark; offsets beyond it are refused; lower ones change
/// nothing.
#[tokio::test]
async fn delete_records_moves_the_log_start_durably_and_deletes_the_batches_below() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    store.create_topic("t", 2, TopicConfig::default()).await.expect("create");
    for _ in 0..5 {
        store.append_batch("t", 0, Bytes::from(client_batch(10, Codec::None))).await.expect("append");
    }
    let batch_bytes = store.partition_info("t", 0).expect("info").logical_bytes / 5;
    assert_eq!(store.delete_records("t", 0, 25).await.expect("delete"), 25, "the new low watermark");
    let info = store.partition_info("t", 0).expect("info");
    assert_eq!(info.watermarks, Watermarks { log_start_offset: 25, high_watermark: 50 });
    assert_eq!(info.logical_bytes, 3 * batch_bytes, "batches 0-9 and 10-19 deleted; 20-29 holds 25 and stays");
    assert!(matches!(store.fetch("t", 0, 24, 1 << 20), Err(StoreError::OffsetOutOfRange { offset: 24, .. })));
    let f = store.fetch("t", 0, 25, 1 << 20).expect("fetch at the log start");
    assert_eq!(i64::from_be_bytes(f.data[..8].try_into().expect("8")), 20, "the straddling batch, whole");
    let read = store.read_records("t", 0, 25, 1 << 20).expect("read");
    assert_eq!((read[0].offset, read.len()), (25, 25));
    // Below the log start: nothing changes. Beyond the high watermark: refused.
    assert_eq!(store.delete_records("t", 0, 10).await.expect("lower"), 25);
    assert!(matches!(
        store.delete_records("t", 0, 51).await,
        Err(StoreError::OffsetOutOfRange { offset: 51, high_watermark: 50, .. })
    ));
    assert!(matches!(store.delete_records("t", 0, -2).await, Err(StoreError::OffsetOutOfRange { .. })));
    assert!(matches!(store.delete_records("t", 2, 0).await, Err(StoreError::UnknownPartition { .. })));
    assert!(matches!(store.delete_records("t", -1, 0).await, Err(StoreError::UnknownPartition { .. })));
    assert!(matches!(store.delete_records("nope", 0, 0).await, Err(StoreError::UnknownTopic(_))));
    assert_eq!(store.watermarks("t", 1).expect("wm").log_start_offset, 0, "the other partition untouched");
    // A compact-only topic keeps every key's latest record: refused as Kafka does; with
    // `compact,delete` records can be deleted.
    for (policy, deletable) in [("compact", false), ("compact,delete", true)] {
        let mut cfg = TopicConfig::default();
        cfg.set("cleanup.policy", Some(policy)).expect("policy");
        store.create_topic(policy.replace(',', "-").as_str(), 1, cfg).await.expect("create");
        store.append_records(&policy.replace(',', "-"), 0, vec![rec(1), rec(2)]).await.expect("append");
        let r = store.delete_records(&policy.replace(',', "-"), 0, 1).await;
        if deletable {
            assert_eq!(r.expect("compact,delete"), 1);
        } else {
            assert!(matches!(r, Err(StoreError::DeleteRecordsPolicy { .. })), "{r:?}");
        }
    }

    // Durable: after a restart the log start is where it was moved.
    store.close().await.expect("close");
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.watermarks("t", 0).expect("wm"), Watermarks { log_start_offset: 25, high_watermark: 50 });
    assert!(matches!(store.fetch("t", 0, 24, 1 << 20), Err(StoreError::OffsetOutOfRange { .. })));
    // -1: up to the high watermark; every batch is below it, and appends go on after it.
    assert_eq!(store.delete_records("t", 0, -1).await.expect("all"), 50);
    let info = store.partition_info("t", 0).expect("info");
    assert_eq!((info.watermarks.log_start_offset, info.logical_bytes), (50, 0));
    let o = store.append_records("t", 0, vec![rec(1)]).await.expect("append after");
    assert_eq!(o.base_offset, 50, "an offset is never given twice");
    assert_eq!(store.read_records("t", 0, 50, 1 << 20).expect("read")[0].offset, 50);
    store.close().await.expect("close");
}

/// The batches below a moved log start are deleted in steps of at most
/// `retention_delete_bytes_per_commit_max` per commit, not in one unbounded transaction; the
/// log start itself moves at once.
#[tokio::test]
async fn delete_records_deletes_in_bounded_steps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = StorageConfig { retention_delete_bytes_per_commit_max: 1 << 20, ..config(dir.path()) };
    let store = Store::open(cfg).expect("open").0;
    let tc = TopicConfig { compression: Codec::None, ..TopicConfig::default() };
    store.create_topic("t", 1, tc).await.expect("create");
    let big = |i: usize| NewRecord::new(None::<Bytes>, Bytes::from(vec![i as u8; 60_000]));
    for i in 0..60 {
        store.append_records("t", 0, vec![big(i)]).await.expect("append");
    }
    let before = store.partition_info("t", 0).expect("info").logical_bytes;
    assert!(before > 3_500_000, "{before}");
    assert_eq!(store.delete_records("t", 0, -1).await.expect("delete"), 60, "the log start moved at once");
    let mut left = store.partition_info("t", 0).expect("info").logical_bytes;
    assert!(left > 0 && left < before, "one bounded step in the DeleteRecords commit: {left} of {before}");
    let mut rounds = 0;
    while left > 0 {
        // Every commit takes a further step.
        store.kv_put(SPACE_A, b"k".to_vec(), Some(vec![rounds as u8])).await.expect("kv");
        let now = store.partition_info("t", 0).expect("info").logical_bytes;
        assert!(now < left || now == 0, "a step per commit: {now} after {left}");
        assert!(left - now <= (1 << 20) + 70_000, "at most the bound (and one batch) per commit");
        left = now;
        rounds += 1;
        assert!(rounds < 10, "{left} bytes left");
    }
    assert!(rounds >= 2, "3.6 MB in steps of 1 MiB take several commits ({rounds} after the first)");
    assert_eq!(store.watermarks("t", 0).expect("wm").log_start_offset, 60);
    store.close().await.expect("close");
}

/// `Store::keep_from_disk_budget`: a kept topic's batches count against `storage.max_bytes` (the
/// budget deletes other topics' batches for them), but are never deleted by it, even when they
/// are the oldest and archived (the MQTT retained messages' topic).
#[tokio::test]
async fn the_disk_budget_counts_a_kept_topic_and_deletes_other_topics_for_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = StorageConfig { max_bytes: 16 << 20, ..config(dir.path()) };
    let store = Store::open(cfg).expect("open").0;
    let plain = TopicConfig { compression: Codec::None, ..TopicConfig::default() };
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut noise = |n: usize| noise(&mut seed, n);
    store.keep_from_disk_budget("kept");
    // Oldest first: 3 MiB kept (and archived), 3 MiB of another topic, then 9 MiB past the mark.
    for (topic, mib) in [("kept", 3usize), ("other", 3), ("fresh", 9)] {
        store.create_topic(topic, 1, plain.clone()).await.expect("create");
        for i in 0..mib * 16 {
            let records = (0..16).map(|j| NewRecord::new(Some(format!("k{i}-{j}")), noise(4096))).collect();
            store.append_records(topic, 0, records).await.expect("append");
        }
        if topic == "kept" {
            let hw = store.watermarks("kept", 0).expect("wm").high_watermark;
            store.set_archived("kept", 0, hw).await.expect("mark");
        }
    }
    let stats = store.stats();
    assert!(stats.retention_deleted_batches > 0, "past the budget: {stats:?}");
    assert_eq!(store.watermarks("kept", 0).expect("wm").log_start_offset, 0, "the kept topic lost nothing");
    assert!(store.watermarks("other", 0).expect("wm").log_start_offset > 0, "the oldest other topic paid");
    let kept = store.partition_info("kept", 0).expect("info").footprint_bytes;
    assert!(kept > 3 << 20 && stats.footprint_bytes > kept, "counted: {kept} of {}", stats.footprint_bytes);
    store.close().await.expect("close");
}

/// `Store::enqueue_appends`: records for two partitions (and key-value writes) commit together,
/// each answered with its own offsets; a keyless record for a compacted topic refuses the whole
/// call before anything is queued.
#[tokio::test]
async fn appends_to_several_partitions_commit_together() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    const SPACE: KvSpace = KvSpace::named("kv.test");
    store.create_topic("a", 1, TopicConfig::default()).await.expect("create");
    let compact = TopicConfig { cleanup_policy: crate::config::CleanupPolicy::Compact, ..TopicConfig::default() };
    store.create_topic("c", 1, compact).await.expect("create");
    store.append_records("c", 0, vec![NewRecord::new(Some("k0"), "v0")]).await.expect("append");
    let pending = store
        .enqueue_appends(
            vec![("a", 0, vec![rec(1), rec(2)]), ("c", 0, vec![NewRecord::new(Some("k1"), "v1")])],
            vec![(SPACE, b"x".to_vec(), Some(b"1".to_vec()))],
        )
        .await
        .expect("queued");
    let mut outcomes = Vec::new();
    for p in pending {
        outcomes.push(p.wait().await.expect("durable"));
    }
    assert_eq!(outcomes.iter().map(|o| (o.base_offset, o.last_offset)).collect::<Vec<_>>(), [(0, 1), (1, 1)]);
    assert_eq!(store.kv_get(SPACE, b"x").expect("get"), Some(b"1".to_vec()));
    let refused = store
        .enqueue_appends(vec![("a", 0, vec![rec(3)]), ("c", 0, vec![NewRecord::new(None::<Bytes>, "v")])], Vec::new())
        .await;
    assert!(matches!(refused, Err(StoreError::KeylessRecord { .. })), "{refused:?}");
    assert_eq!(store.watermarks("a", 0).expect("wm").high_watermark, 2, "nothing of a refused call written");
    store.close().await.expect("close");
}

/// `n` bytes of xorshift64 noise from `seed` (which moves on): incompressible, so stored bytes
/// are what was appended.
pub(crate) fn noise(seed: &mut u64, n: usize) -> Bytes {
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        v.extend_from_slice(&seed.to_le_bytes());
    }
    v.truncate(n);
    Bytes::from(v)
}
