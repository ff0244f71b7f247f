//! Helpers shared by the end-to-end tests.

use tributary_broker::storage::batch::StoredRecord;
use tributary_broker::Store;

/// Every record of a partition, from its log start to its high watermark.
pub fn read_all(store: &Store, topic: &str, partition: i32) -> Vec<StoredRecord> {
    let wm = store.watermarks(topic, partition).expect("partition exists");
    let mut out = Vec::new();
    let mut offset = wm.log_start_offset;
    while offset < wm.high_watermark {
        let f = store.fetch(topic, partition, offset, 1 << 20).expect("fetch");
        assert!(f.batches > 0, "no progress at offset {offset}");
        let records = store.read_records(topic, partition, offset, 1 << 20).expect("read");
        out.extend(records);
        offset = f.next_offset;
    }
    out
}
