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
