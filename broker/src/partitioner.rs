//! Partition choice for records produced without an explicit partition: murmur2 exactly as the
//! Java client's default partitioner for keyed records, round robin for records without a key.

use std::sync::atomic::{AtomicU32, Ordering};

/// Kafka's `Utils.murmur2`: 32-bit MurmurHash2 with seed 0x9747b28c, little-endian words.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    // Java hashes `int length`; a key longer than i32::MAX cannot reach us (frames are capped).
    let length = data.len() as u32;
    let mut h: u32 = SEED ^ length;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition the Java client (and librdkafka's `murmur2_random`) picks for `key`.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    debug_assert!(partitions > 0);
    let positive = (murmur2(key) & 0x7fff_ffff) as u32;
    positive % partitions.max(1)
}

/// Chooses partitions: murmur2 for keys, round robin for records without a key.
#[derive(Debug, Default)]
pub struct Partitioner {
    next: AtomicU32,
}

impl Partitioner {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn partition(&self, key: Option<&[u8]>, partitions: u32) -> u32 {
        match key {
            Some(k) => partition_for_key(k, partitions),
            None => self.next.fetch_add(1, Ordering::Relaxed) % partitions.max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors from Apache Kafka's `UtilsTest.testMurmur2`.
    #[test]
    fn murmur2_matches_kafka_vectors() {
        let cases: &[(&[u8], i32)] = &[
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            (b"abc", 479_470_107),
        ];
        for (key, want) in cases {
            assert_eq!(murmur2(key), *want, "key {:?}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn keyed_records_are_stable_and_null_keys_spread() {
        let p = Partitioner::new();
        let a = p.partition(Some(b"meter-17"), 6);
        for _ in 0..10 {
            assert_eq!(p.partition(Some(b"meter-17"), 6), a);
        }
        let mut seen = [0u32; 6];
        for _ in 0..60 {
            seen[p.partition(None, 6) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n == 10), "{seen:?}");
    }
}
