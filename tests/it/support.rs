//! Helpers shared by the end-to-end tests.

use tributary_broker::storage::batch::StoredRecord;
use tributary_broker::Store;

/// Every record of a partition, from its log start to its high watermark.
pub fn read_all(store: &Store, topic: &str, partition: i32) -> Vec<StoredRecord> {
    let wm = store.watermarks(topic, partition).expect("partition exists");
    let mut out = Vec::new();
    let mut offset = wm.log_start_offset;
    while offset < wm.high_watermark {
        let records = store.read_records(topic, partition, offset, 1 << 20).expect("read");
        let last = records.last().map(|r| r.offset).unwrap_or_else(|| panic!("no progress at offset {offset}"));
        out.extend(records);
        offset = last + 1;
    }
    out
}
