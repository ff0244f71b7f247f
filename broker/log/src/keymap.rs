//! The latest offset of every key over a range of a log, within a memory limit: the map that
//! compaction builds before it rewrites (`writer/compaction.rs`) and that the mirror's
//! latest-first view builds before it sends a backlog's compacted view (`sync/src/latest.rs`).
//! Batches go in whole or not at all, their memory charged before anything is allocated.

use std::collections::HashMap;

use crate::batch::{self, BatchError, BatchHeader, RecordIter};

/// Memory charged per key in the map beyond the key's bytes (vector header, offset, hash slot
/// and load factor).
pub const ENTRY_OVERHEAD_BYTES: u64 = 64;

/// Key -> offset of its latest record among the batches admitted, at most `limit_bytes` of
/// keys (each charged its length plus [`ENTRY_OVERHEAD_BYTES`]).
#[derive(Debug, Default)]
pub struct LatestKeys {
    map: HashMap<Vec<u8>, i64>,
    bytes: u64,
    limit_bytes: u64,
}

impl LatestKeys {
    pub fn new(limit_bytes: u64) -> Self {
        Self { map: HashMap::new(), bytes: 0, limit_bytes }
    }

    /// Admits the keyed records of one stored batch at offsets `>= from` (keyless records and
    /// control batches have no key to map), all or none: `Ok(false)`, with nothing inserted,
    /// when their keys would take the map over its limit (each keyed record charged as if its
    /// key were new, before the map grows). A map with nothing in it admits any one batch, so a
    /// pass always moves on.
    pub fn admit(&mut self, batch: &[u8], from: i64, decompressed_limit: u64) -> Result<bool, BatchError> {
        let h = BatchHeader::parse(batch)?;
        if h.is_control() {
            return Ok(true);
        }
        let data = batch::records_data(batch, &h, decompressed_limit)?;
        let offset = |delta: i32| h.base_offset.saturating_add(i64::from(delta));
        let mut cost = 0u64;
        for r in RecordIter::new(&data) {
            let r = r?;
            if let Some(k) = r.key.filter(|_| offset(r.offset_delta) >= from) {
                cost = cost.saturating_add(k.len() as u64 + ENTRY_OVERHEAD_BYTES);
            }
        }
        if !self.map.is_empty() && self.bytes.saturating_add(cost) > self.limit_bytes {
            return Ok(false);
        }
        for r in RecordIter::new(&data) {
            let r = r?;
            let at = offset(r.offset_delta);
            let Some(key) = r.key.filter(|_| at >= from) else { continue };
            match self.map.get_mut(key) {
                Some(latest) => *latest = (*latest).max(at),
                None => {
                    self.bytes += key.len() as u64 + ENTRY_OVERHEAD_BYTES;
                    self.map.insert(key.to_vec(), at);
                }
            }
        }
        Ok(true)
    }

    /// The offset of `key`'s latest record admitted.
    pub fn latest(&self, key: &[u8]) -> Option<i64> {
        self.map.get(key).copied()
    }

    /// Whether the record of `key` at `offset` is its latest admitted (the one a compacted view
    /// of the admitted range keeps).
    pub fn is_latest(&self, key: &[u8], offset: i64) -> bool {
        self.latest(key) == Some(offset)
    }

    /// Keys mapped.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Memory charged now.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Empties the map (its memory goes back) for the next range.
    pub fn clear(&mut self) {
        self.map = HashMap::new();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::batch::{encode_batch, NewRecord};
    use crate::{Codec, TimestampKind};

    fn batch(base: i64, keys: &[&str], codec: Codec) -> Vec<u8> {
        let records: Vec<NewRecord> =
            keys.iter().map(|k| NewRecord::new(Some(Bytes::from(k.to_string())), "v")).collect();
        let with_ts: Vec<_> = records.iter().map(|r| (r, 1_700_000_000_000)).collect();
        let mut out = Vec::new();
        encode_batch(&with_ts, base, codec, TimestampKind::CreateTime, 0, &mut out).expect("encode");
        out
    }

    #[test]
    fn the_latest_offset_per_key_from_an_offset_on() {
        let mut m = LatestKeys::new(1 << 20);
        assert!(m.admit(&batch(10, &["a", "b", "a"], Codec::Lz4), 11, 1 << 20).expect("admit"));
        assert_eq!((m.latest(b"a"), m.latest(b"b")), (Some(12), Some(11)), "offset 10 is below `from`");
        assert!(m.admit(&batch(13, &["b", "c"], Codec::None), 0, 1 << 20).expect("admit"));
        assert!(m.is_latest(b"b", 13) && !m.is_latest(b"b", 11) && m.is_latest(b"c", 14));
        assert_eq!(m.len(), 3);
        assert_eq!(m.bytes(), 3 * (1 + ENTRY_OVERHEAD_BYTES));
        m.clear();
        assert!(m.is_empty() && m.bytes() == 0);
    }

    #[test]
    fn a_batch_over_the_limit_is_refused_whole_unless_the_map_is_empty() {
        let limit = 2 * (1 + ENTRY_OVERHEAD_BYTES);
        let mut m = LatestKeys::new(limit);
        // Three keys on an empty map: admitted (a pass always moves on), over the limit.
        assert!(m.admit(&batch(0, &["a", "b", "c"], Codec::None), 0, 1 << 20).expect("admit"));
        assert!(!m.admit(&batch(3, &["a"], Codec::None), 0, 1 << 20).expect("admit"), "charged before it grows");
        assert_eq!(m.latest(b"a"), Some(0), "nothing of a refused batch inserted");
        let mut m = LatestKeys::new(limit);
        assert!(m.admit(&batch(0, &["a"], Codec::None), 0, 1 << 20).expect("admit"));
        assert!(m.admit(&batch(1, &["b"], Codec::None), 0, 1 << 20).expect("admit"));
        assert!(!m.admit(&batch(2, &["c"], Codec::None), 0, 1 << 20).expect("admit"));
        assert_eq!(m.bytes(), limit);
    }
}
