//! Unit tests of compacted topics in the store: keyless records refused, retention by age and
//! size not applied to compact-only topics, and compaction (latest record per key kept,
//! tombstones, lags, offsets, accounting, crash safety, page reuse).

use bytes::Bytes;

use super::batch::{self, NewRecord};
use super::*;
use crate::config::{CleanupPolicy, Codec, StorageConfig, TimestampKind, TopicConfig};

fn config(dir: &std::path::Path) -> StorageConfig {
    StorageConfig { data_dir: dir.to_path_buf(), disk_free_bytes_min: 0, ..StorageConfig::default() }
}

fn compacted() -> TopicConfig {
    TopicConfig { cleanup_policy: CleanupPolicy::Compact, compression: Codec::None, ..TopicConfig::default() }
}

fn keyed(key: &str, value: Option<&str>) -> NewRecord {
    NewRecord {
        key: Some(Bytes::from(key.to_string())),
        value: value.map(|v| Bytes::from(v.to_string())),
        headers: Vec::new(),
        timestamp_ms: None,
    }
}

/// Kafka's LogValidator.validateKey: a compacted topic refuses a record without a key, naming
/// the record's index in the batch; the batch is not stored.
#[tokio::test]
async fn compacted_topics_refuse_keyless_records_in_batches_and_single_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(config(dir.path())).expect("open").0;
    store.create_topic("c", 1, compacted()).await.expect("create");
    store.create_topic("d", 1, TopicConfig::default()).await.expect("create");
    let records = [keyed("a", Some("1")), NewRecord::new(None::<Bytes>, "no key"), keyed("b", Some("2"))];
    let stamped: Vec<_> = records.iter().map(|r| (r, 5)).collect();
    let mut b = Vec::new();
    batch::encode_batch(&stamped, 0, Codec::Lz4, TimestampKind::CreateTime, 0, &mut b).expect("encode");
    let e = store.append_batch("c", 0, Bytes::from(b.clone())).await.expect_err("keyless refused");
    assert!(matches!(e, StoreError::KeylessRecord { index: 1, partition: 0, .. }), "{e:?}");
    assert_eq!(e.to_string(), "Compacted topic cannot accept message without key in topic partition c-0.");
    let e = store.append_records("c", 0, records.to_vec()).await.expect_err("keyless refused");
    assert!(matches!(e, StoreError::KeylessRecord { index: 1, .. }), "{e:?}");
    assert_eq!(store.watermarks("c", 0).expect("wm").high_watermark, 0, "nothing stored");
    // A delete-policy topic takes them.
    store.append_batch("d", 0, Bytes::from(b)).await.expect("stored");
    store.append_records("c", 0, vec![keyed("a", Some("1"))]).await.expect("keyed is fine");
}

/// A store whose compaction looks for work every 10 ms and steps through `step_bytes` per round.
fn open_compacting(dir: &std::path::Path, step_bytes: u64, memory_bytes: u64) -> Store {
    let cfg = StorageConfig {
        retention_check_interval_ms: 10,
        compaction_bytes_per_commit_max: step_bytes,
        compaction_memory_bytes_max: memory_bytes,
        ..config(dir)
    };
    Store::open(cfg).expect("open").0
}

/// Polls the store's counters until `done` holds (a deadline, not a sleep to synchronise).
pub(crate) async fn wait_stats(store: &Store, what: &str, done: impl Fn(&StoreStats) -> bool) -> StoreStats {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let s = store.stats();
        if done(&s) {
            return s;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}: {s:?}");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// Every record of a partition from its log start, as (offset, key, value).
fn read_all(store: &Store, topic: &str) -> Vec<(i64, String, Option<String>)> {
    let wm = store.watermarks(topic, 0).expect("wm");
    let mut out = Vec::new();
    let mut at = wm.log_start_offset;
    while at < wm.high_watermark {
        let f = store.fetch(topic, 0, at, 1 << 20).expect("fetch");
        let mut data = &f.data[..];
        while !data.is_empty() {
            let len = batch::BatchHeader::parse(data).expect("header").total_len();
            for r in batch::decode_records(&data[..len], 1 << 30).expect("decode") {
                if r.offset >= at {
                    let s = |b: &Bytes| String::from_utf8_lossy(b).into_owned();
                    out.push((r.offset, r.key.as_ref().map(s).unwrap_or_default(), r.value.as_ref().map(s)));
                }
            }
            data = &data[len..];
        }
        assert!(f.next_offset > at, "fetch moves on");
        at = f.next_offset;
    }
    out
}

/// The partition's stored batches summed from the table must equal its accounted bytes.
fn assert_accounting_exact(store: &Store, topic: &str) {
    let info = store.partition_info(topic, 0).expect("info");
    let db = store.inner.shared.db.read().expect("db").clone().expect("open");
    let rtx = redb::ReadableDatabase::begin_read(&*db).expect("read");
    let log = rtx.open_table(tables::LOG).expect("log");
    let pieces = rtx.open_table(tables::LOG_PIECES).expect("pieces");
    let key = store.topic_state(topic).expect("topic").partitions[0].key;
    let (mut logical, mut fp) = (0u64, 0u64);
    for e in log.range((key, 0u64)..=(key, u64::MAX)).expect("range") {
        let (k, v) = e.expect("entry");
        let base = k.value().1;
        let lens: Vec<usize> = pieces
            .range((key, base, 0u8)..=(key, base, u8::MAX))
            .expect("pieces")
            .map(|p| p.expect("piece").1.value().len())
            .collect();
        logical += (v.value().len() - tables::VALUE_PREFIX_LEN + lens.iter().sum::<usize>()) as u64;
        fp += if lens.is_empty() {
            tables::footprint(v.value().len())
        } else {
            tables::split_footprint(v.value().len(), lens)
        };
    }
    assert_eq!((info.logical_bytes, info.footprint_bytes), (logical, fp), "accounting matches the table");
}

/// Kafka's view after compaction: the latest record per key, at its original offset; removed
/// records leave offset gaps; the newest batch (the active tail) is untouched; the byte
/// accounting stays exact; the tail cache never serves a batch compaction rewrote.
#[tokio::test]
async fn compaction_keeps_the_latest_record_per_key_at_its_original_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_compacting(dir.path(), 1 << 20, 1 << 20);
    // min.compaction.lag.ms of an hour first: nothing may be compacted yet.
    let cfg = TopicConfig { min_cleanable_dirty_ratio_ppm: 100_000, min_compaction_lag_ms: 3_600_000, ..compacted() };
    store.create_topic("c", 1, cfg.clone()).await.expect("create");
    // 10 keys x 20 versions, one record per append (one batch each).
    for v in 0..20 {
        for k in 0..10 {
            store.append_records("c", 0, vec![keyed(&format!("k{k}"), Some(&format!("v{v}")))]).await.expect("append");
        }
    }
    // Read once so the tail cache holds batches that compaction then rewrites.
    assert_eq!(read_all(&store, "c").len(), 200);
    let s = wait_stats(&store, "a look at the dirty partition", |s| s.compaction_dirty_bytes > 0).await;
    assert_eq!((s.compaction_passes, s.compaction_removed_records), (0, 0), "within min.compaction.lag.ms");
    assert_eq!(s.compaction_dirty_ratio_max_ppm, 1_000_000);
    assert_eq!(read_all(&store, "c").len(), 200);
    assert!(store.stats().tail_cache_bytes > 0, "the tail cache holds the batches");
    store.alter_topic_config("c", TopicConfig { min_compaction_lag_ms: 0, ..cfg }).await.expect("alter");
    let s = wait_stats(&store, "a pass", |s| s.compaction_passes >= 1).await;
    assert!(s.compaction_removed_records >= 180, "{s:?}");
    let all = read_all(&store, "c");
    // Offsets 190..=199 hold the latest of every key. k9's latest (199) is the active tail,
    // which compaction neither rewrites nor maps (as Kafka's active segment), so k9's version
    // before it (189) stays until the next pass; nothing else before 190 survives.
    let mut expect: Vec<(i64, String, Option<String>)> = vec![(189, "k9".to_string(), Some("v18".to_string()))];
    expect.extend((0..10).map(|k| (190 + k as i64, format!("k{k}"), Some("v19".to_string()))));
    assert_eq!(all, expect);
    assert_eq!(store.watermarks("c", 0).expect("wm"), Watermarks { log_start_offset: 0, high_watermark: 200 });
    assert_accounting_exact(&store, "c");
    assert_eq!(store.stats().logical_bytes, store.partition_info("c", 0).expect("info").logical_bytes);
    // A reader at offset 0 (removed) is served from the next batch, as Kafka does.
    let f = store.fetch("c", 0, 0, 1 << 20).expect("fetch at a removed offset");
    assert_eq!(batch::decode_records(&f.data, 1 << 20).expect("decode")[0].offset, 189);
    // Appends go on after compaction, at the next offsets.
    let o = store.append_records("c", 0, vec![keyed("k0", Some("v20"))]).await.expect("append");
    assert_eq!(o.base_offset, 200);
}

/// Several records per batch: a rewritten batch keeps its base offset and offset span, only the
/// superseded records go (consumers see gaps inside it).
#[tokio::test]
async fn partially_superseded_batches_are_rewritten_in_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_compacting(dir.path(), 1 << 20, 1 << 20);
    store.create_topic("c", 1, TopicConfig { min_cleanable_dirty_ratio_ppm: 0, ..compacted() }).await.expect("create");
    let batch = |names: &[&str], v: &str| names.iter().map(|n| keyed(n, Some(v))).collect::<Vec<_>>();
    store.append_records("c", 0, batch(&["a", "b", "c", "d"], "1")).await.expect("append"); // 0..=3
    store.append_records("c", 0, batch(&["b", "d"], "2")).await.expect("append"); // 4..=5
    store.append_records("c", 0, batch(&["z"], "tail")).await.expect("append"); // 6: active tail
                                                                                // A pass may run before the last append (then it finds nothing superseded): wait for the
                                                                                // two superseded records to go, not for any pass.
    wait_stats(&store, "b:1 and d:1 removed", |s| s.compaction_removed_records >= 2).await;
    let all = read_all(&store, "c");
    let got: Vec<(i64, &str, &str)> =
        all.iter().map(|(o, k, v)| (*o, k.as_str(), v.as_deref().unwrap_or("-"))).collect();
    assert_eq!(got, [(0, "a", "1"), (2, "c", "1"), (4, "b", "2"), (5, "d", "2"), (6, "z", "tail")]);
    let f = store.fetch("c", 0, 0, 1 << 20).expect("fetch");
    let h = batch::BatchHeader::parse(&f.data).expect("header");
    assert_eq!((h.base_offset, h.last_offset(), h.record_count), (0, 3, 2), "offset span kept, 2 records left");
    assert_accounting_exact(&store, "c");
}

/// Tombstones: a null value supersedes the key's earlier records, stays for
/// `delete.retention.ms` after compaction first passed over it (consumers from the start see the
/// deletion), then goes with the next pass (the key is gone).
#[tokio::test]
async fn tombstones_stay_for_delete_retention_ms_then_go() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_compacting(dir.path(), 1 << 20, 1 << 20);
    let cfg = TopicConfig { min_cleanable_dirty_ratio_ppm: 0, delete_retention_ms: 300, ..compacted() };
    store.create_topic("c", 1, cfg).await.expect("create");
    for v in 0..3 {
        store.append_records("c", 0, vec![keyed("gone", Some(&format!("v{v}")))]).await.expect("append");
        store.append_records("c", 0, vec![keyed("kept", Some(&format!("v{v}")))]).await.expect("append");
    }
    let deleted_at = std::time::Instant::now();
    store.append_records("c", 0, vec![keyed("gone", None)]).await.expect("tombstone"); // offset 6
    store.append_records("c", 0, vec![keyed("tail", Some("x"))]).await.expect("append"); // 7, active tail
                                                                                         // 5 superseded records (gone v0-v2, kept v0-v1): the pass that saw the tombstone is done.
    wait_stats(&store, "the pass over the tombstone", |s| s.compaction_removed_records >= 5).await;
    let view = read_all(&store, "c");
    if deleted_at.elapsed() < std::time::Duration::from_millis(300) {
        assert_eq!(
            view,
            [(5, "kept".into(), Some("v2".into())), (6, "gone".into(), None), (7, "tail".into(), Some("x".into()))],
            "the tombstone stays within delete.retention.ms"
        );
    }
    // The tombstone is due: a pass removes it (no new dirty data needed).
    wait_stats(&store, "the tombstone's removal", |s| s.compaction_removed_records >= 6).await;
    assert!(deleted_at.elapsed() >= std::time::Duration::from_millis(300), "not before delete.retention.ms");
    assert_eq!(read_all(&store, "c"), [(5, "kept".into(), Some("v2".into())), (7, "tail".into(), Some("x".into()))]);
    assert_accounting_exact(&store, "c");
}

/// More keys than the key map holds: compaction goes in several passes and still keeps exactly
/// the latest record of every key.
#[tokio::test]
async fn a_key_map_smaller_than_the_keys_compacts_in_several_passes() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 4 KiB of map: about 55 keys of 10 bytes per pass; 300 keys.
    let store = open_compacting(dir.path(), 16 * 1024, 4096);
    store.create_topic("c", 1, TopicConfig { min_cleanable_dirty_ratio_ppm: 0, ..compacted() }).await.expect("create");
    for v in 0..3 {
        for chunk in (0..300).collect::<Vec<_>>().chunks(20) {
            let recs = chunk.iter().map(|k| keyed(&format!("key-{k:05}"), Some(&format!("v{v}")))).collect();
            store.append_records("c", 0, recs).await.expect("append");
        }
    }
    store.append_records("c", 0, vec![keyed("tail", Some("x"))]).await.expect("append");
    let s = wait_stats(&store, "every superseded record removed", |s| s.compaction_removed_records >= 600).await;
    assert!(s.compaction_passes >= 4, "several passes: {s:?}");
    let view = read_all(&store, "c");
    assert_eq!(view.len(), 301);
    for (i, (_, k, v)) in view.iter().take(300).enumerate() {
        assert_eq!((k.as_str(), v.as_deref()), (format!("key-{i:05}").as_str(), Some("v2")));
    }
    assert_accounting_exact(&store, "c");
}

/// A crash during compaction loses nothing and duplicates nothing: compaction runs in many small
/// steps between durable appends on a recorded simulated disk; at power cuts all along the trace
/// (the synced bytes plus a random subset of the unsynced writes, the last one torn), the store
/// opens, and every key holds its latest acknowledged version or a later one, each record once.
#[tokio::test]
async fn power_cuts_during_compaction_lose_no_latest_value_and_duplicate_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = simdisk::SimDisk::recording();
    let cfg = StorageConfig {
        retention_check_interval_ms: 10,
        relaxed_flush_interval_ms: 3_600_000,
        compaction_bytes_per_commit_max: 4096,
        ..config(dir.path())
    };
    let (store, _) = Store::open_with_backend(cfg.clone(), disk.opener()).expect("open");
    store.create_topic("c", 1, TopicConfig { min_cleanable_dirty_ratio_ppm: 0, ..compacted() }).await.expect("create");
    const KEYS: u64 = 30;
    for n in 0..KEYS * 12 {
        let (k, v) = (n % KEYS, n / KEYS);
        store.append_records("c", 0, vec![keyed(&format!("k{k}"), Some(&format!("{v}")))]).await.expect("append");
        disk.mark(n);
    }
    let s = store.stats();
    assert!(s.compaction_passes >= 2 && s.compaction_removed_records > 100, "compaction ran meanwhile: {s:?}");
    drop(store);
    let checked = at_power_cuts(&disk, &cfg, 40, |i, after, acked| {
        if after.topic("c").is_none() {
            panic!("cut {i}: the topic is gone after acknowledged appends");
        }
        let view = read_all(&after, "c");
        let mut latest: HashMap<String, u64> = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        for w in view.windows(2) {
            assert!(w[0].0 < w[1].0, "cut {i}: offsets increase: {w:?}");
        }
        for (_, k, v) in &view {
            let v: u64 = v.as_deref().expect("no tombstones here").parse().expect("version");
            assert!(seen.insert((k.clone(), v)), "cut {i}: {k} version {v} twice");
            let e = latest.entry(k.clone()).or_default();
            *e = (*e).max(v);
        }
        for n in 0..=acked.min(KEYS * 12 - 1) {
            let (k, v) = (n % KEYS, n / KEYS);
            let got = latest.get(&format!("k{k}")).copied();
            assert!(got.is_some_and(|g| g >= v), "cut {i}: k{k} acknowledged at version {v}, found {got:?}");
        }
    });
    assert!(checked >= 30, "only {checked} cuts after acknowledged appends");
}

/// Cuts power `cuts` times all along `disk`'s recorded trace (the synced bytes plus a random subset
/// of the unsynced writes, the last one torn; seeded, so a failure replays), opens the store on
/// each image and, once an append was acknowledged (`acked`: the highest mark reached by then),
/// hands it to `check`. Returns how many images were checked.
pub(crate) fn at_power_cuts(
    disk: &simdisk::SimDisk,
    cfg: &StorageConfig,
    cuts: usize,
    mut check: impl FnMut(usize, Store, u64),
) -> usize {
    use rand::SeedableRng;
    let trace = disk.trace();
    let mut replay = simdisk::Replay::new(&trace);
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let (mut acked, mut checked) = (None::<u64>, 0);
    for i in 1..=cuts {
        if let Some(m) = replay.advance(trace.len() * i / cuts).into_iter().max() {
            acked = Some(m);
        }
        let image = replay.power_cut(&mut rng);
        if image.is_empty() {
            continue;
        }
        let crashed = simdisk::SimDisk::from_image(image);
        let Ok((after, _)) = Store::open_with_backend(cfg.clone(), crashed.opener()) else {
            panic!("cut {i}: the store must open after a power cut");
        };
        let Some(acked) = acked else { continue };
        check(i, after, acked);
        checked += 1;
    }
    checked
}

/// redb files do not shrink, but the pages compaction frees are reused: 200 keys rewritten 60
/// times (about 12 MiB appended, with fsync), the file's disk use stays flat once compaction
/// keeps pace, while without compaction it would grow with every round.
#[tokio::test]
async fn pages_freed_by_compaction_are_reused_and_the_file_stays_flat() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_compacting(dir.path(), 4 << 20, 8 << 20);
    store.create_topic("c", 1, compacted()).await.expect("create");
    let value = "x".repeat(1000);
    let mut sizes = Vec::new();
    for round in 0..60 {
        let recs = (0..200).map(|k| keyed(&format!("meter-{k:04}"), Some(&format!("{round}:{value}")))).collect();
        store.append_records("c", 0, recs).await.expect("append");
        // Compaction runs in the writer's own rounds; wait for it to keep pace (the live data is
        // about 200 KiB; min.cleanable.dirty.ratio 0.5 lets about as much again be dirty).
        wait_stats(&store, "compaction to keep pace", |s| s.logical_bytes <= 1_000_000).await;
        sizes.push(store.disk_usage_bytes().expect("disk use"));
    }
    let s = store.stats();
    let (early, last) = (sizes[9], sizes[59]);
    eprintln!(
        "appended {} bytes in 60 rounds; reclaimed {}; file disk use after round 10: {early}, after round 60: {last} ({sizes:?}); \
         logical {}",
        s.appended_bytes, s.compaction_reclaimed_bytes, s.logical_bytes
    );
    assert!(s.appended_bytes > 12_000_000, "{s:?}");
    assert!(s.compaction_reclaimed_bytes > 9_000_000, "compaction freed most of it: {s:?}");
    assert!(last <= 2 * early && last < s.appended_bytes / 5, "disk use stays flat: {sizes:?}");
    assert_accounting_exact(&store, "c");
}

/// An idempotent producer's batch that compaction shrank still tells its last sequence after a
/// restart (the producer state is rebuilt from the batches' offset span, which compaction keeps,
/// not from their record count): the producer's next batch is accepted, not refused as out of
/// order.
#[tokio::test]
async fn a_compacted_idempotent_batch_keeps_its_last_sequence_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let idempotent = |keys: &[&str], seq: i32| {
        let records: Vec<NewRecord> = keys.iter().map(|k| keyed(k, Some("v"))).collect();
        let stamped: Vec<_> = records.iter().map(|r| (r, 1_000)).collect();
        let mut b = Vec::new();
        batch::encode_batch(&stamped, 0, Codec::None, TimestampKind::CreateTime, 0, &mut b).expect("encode");
        // RecordBatch v2: producerId at 43, producerEpoch at 51, baseSequence at 53; the CRC
        // (at 17) covers everything from the attributes (21) on.
        b[43..51].copy_from_slice(&7i64.to_be_bytes());
        b[51..53].copy_from_slice(&0i16.to_be_bytes());
        b[53..57].copy_from_slice(&seq.to_be_bytes());
        let crc = crc32c::crc32c(&b[21..]);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
        Bytes::from(b)
    };
    {
        let store = open_compacting(dir.path(), 1 << 20, 1 << 20);
        store
            .create_topic("c", 1, TopicConfig { min_cleanable_dirty_ratio_ppm: 0, ..compacted() })
            .await
            .expect("create");
        store.append_batch("c", 0, idempotent(&["a", "b", "c"], 0)).await.expect("seq 0-2"); // offsets 0-2
        store.append_records("c", 0, vec![keyed("a", Some("2")), keyed("b", Some("2"))]).await.expect("append");
        store.append_records("c", 0, vec![keyed("z", Some("tail"))]).await.expect("append");
        wait_stats(&store, "a and b superseded", |s| s.compaction_removed_records >= 2).await;
        let f = store.fetch("c", 0, 0, 1 << 20).expect("fetch");
        let h = batch::BatchHeader::parse(&f.data).expect("header");
        assert_eq!((h.record_count, h.last_offset_delta, h.producer_id), (1, 2, 7), "shrunk, span kept");
        store.close().await.expect("close");
    }
    let store = open_compacting(dir.path(), 1 << 20, 1 << 20);
    let o = store.append_batch("c", 0, idempotent(&["d"], 3)).await.expect("the next sequence is accepted");
    assert_eq!(o.base_offset, 6);
    // A retry of the shrunk batch is still recognised as a duplicate (its original offsets).
    let dup = store.append_batch("c", 0, idempotent(&["a", "b", "c"], 0)).await;
    assert!(matches!(dup, Ok(AppendOutcome { base_offset: 0, last_offset: 2, .. })), "{dup:?}");
}

/// `max.compaction.lag.ms`: a partition whose dirty share stays under
/// `min.cleanable.dirty.ratio` is compacted anyway once its oldest dirty batch is older than the
/// lag, and not before.
#[tokio::test]
async fn max_compaction_lag_forces_a_pass_below_the_dirty_ratio() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_compacting(dir.path(), 1 << 20, 1 << 20);
    // A ratio of 1.0 is only reached while nothing is clean: the first pass, then never again.
    let cfg = TopicConfig { min_cleanable_dirty_ratio_ppm: 1_000_000, max_compaction_lag_ms: 400, ..compacted() };
    store.create_topic("c", 1, cfg).await.expect("create");
    // One batch of 20 keys, then the active tail: the first pass cleans the batch, and the tail
    // is the oldest dirty batch from then on (its append time starts the lag).
    let recs = (0..20).map(|k| keyed(&format!("k{k}"), Some("1"))).collect();
    store.append_records("c", 0, recs).await.expect("append");
    let dirty_at = std::time::Instant::now();
    store.append_records("c", 0, vec![keyed("tail", Some("1"))]).await.expect("append");
    let first = wait_stats(&store, "the first pass", |s| s.compaction_passes >= 1).await.compaction_passes;
    assert!(dirty_at.elapsed() < std::time::Duration::from_millis(400), "the first pass came by the ratio");
    store.append_records("c", 0, vec![keyed("k0", Some("2"))]).await.expect("append");
    store.append_records("c", 0, vec![keyed("tail", Some("2"))]).await.expect("append");
    let s = wait_stats(&store, "a pass forced by the lag", |s| s.compaction_passes > first).await;
    assert!(dirty_at.elapsed() >= std::time::Duration::from_millis(400), "not before max.compaction.lag.ms: {s:?}");
    assert!(s.compaction_dirty_ratio_max_ppm < 1_000_000, "below the ratio: {s:?}");
    let view = read_all(&store, "c");
    assert!(!view.iter().any(|(o, k, _)| k == "k0" && *o == 0), "k0's first version went: {view:?}");
}
