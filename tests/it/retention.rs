//! Retention against a real file: writing five times the disk budget keeps the database file's
//! real disk use (st_blocks) within budget plus the documented slack, oldest data deleted first.

use bytes::Bytes;
use rand::RngCore;
use tributary_broker::storage::batch::NewRecord;
use tributary_broker::{Codec, StorageConfig, Store, TopicConfig};

use crate::support::read_all;

const MIB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writing_five_times_the_budget_stays_within_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let budget = 16 * MIB;
    let cfg = StorageConfig {
        data_dir: dir.path().to_path_buf(),
        max_bytes: budget,
        cache_size_bytes: 4 * MIB,
        disk_free_bytes_min: 0,
        ..StorageConfig::default()
    };
    let slack = cfg.disk_slack_bytes();
    let (store, _) = Store::open(cfg).expect("open");
    let topic_cfg = TopicConfig { compression: Codec::None, retention_ms: None, ..TopicConfig::default() };
    store.create_topic("a", 2, topic_cfg.clone()).await.expect("create a");
    store.create_topic("b", 1, topic_cfg).await.expect("create b");
    let mut rng = rand::rng();
    let mut written = 0u64;
    let mut max_disk = 0u64;
    let mut seq = 0u64;
    while written < 5 * budget {
        // Three producers at once, incompressible 1 KB values, each value numbered.
        let mut tasks = Vec::new();
        for (topic, p) in [("a", 0), ("a", 1), ("b", 0)] {
            let records: Vec<NewRecord> = (0..64)
                .map(|_| {
                    let mut v = vec![0u8; 1000];
                    rng.fill_bytes(&mut v);
                    v[..8].copy_from_slice(&seq.to_be_bytes());
                    seq += 1;
                    NewRecord::new(None::<Bytes>, Bytes::from(v))
                })
                .collect();
            written += 64 * 1000;
            let s = store.clone();
            tasks.push(tokio::spawn(async move { s.append_records(topic, p, records).await }));
        }
        for t in tasks {
            t.await.expect("join").expect("append");
        }
        let disk = store.disk_usage_bytes().expect("st_blocks");
        max_disk = max_disk.max(disk);
        assert!(disk <= budget + slack, "after {written} bytes: disk use {disk} > budget {budget} + slack {slack}");
    }
    let stats = store.stats();
    assert!(stats.retention_deleted_batches > 0);
    let mut retained = 0u64;
    let mut oldest_kept = u64::MAX;
    let mut newest = 0u64;
    for (topic, p) in [("a", 0), ("a", 1), ("b", 0)] {
        let wm = store.watermarks(topic, p).expect("wm");
        assert!(wm.log_start_offset > 0, "{topic}-{p}: oldest data deleted");
        let records = read_all(&store, topic, p);
        assert_eq!(records.len() as i64, wm.high_watermark - wm.log_start_offset, "retained range is contiguous");
        let seq_of = |r: &tributary_broker::storage::batch::StoredRecord| {
            let v = r.value.as_deref().expect("value");
            u64::from_be_bytes(v[..8].try_into().expect("8 bytes"))
        };
        oldest_kept = oldest_kept.min(records.first().map(seq_of).unwrap_or(u64::MAX));
        newest = newest.max(records.last().map(seq_of).unwrap_or(0));
        retained += records.len() as u64 * 1000;
    }
    assert_eq!(newest, seq - 1, "the newest record is kept");
    // Deletion is oldest-first across partitions: what is kept is the recent tail.
    assert!(seq - oldest_kept < (budget / 1000) * 11 / 10, "kept records reach back to seq {oldest_kept} of {seq}");
    assert!(retained >= budget / 2, "retention must not over-delete: {retained} bytes kept");
    eprintln!(
        "retention: wrote {} MiB into a {} MiB budget; max disk use {:.1} MiB (limit {:.1}); kept {:.1} MiB; {} batches deleted",
        written / MIB,
        budget / MIB,
        max_disk as f64 / MIB as f64,
        (budget + slack) as f64 / MIB as f64,
        retained as f64 / MIB as f64,
        stats.retention_deleted_batches
    );
}
