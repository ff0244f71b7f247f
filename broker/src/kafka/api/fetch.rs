//! Fetch: reading many partitions within the response and partition byte limits (soft for the
//! first non-empty partition, KIP-74), long-polling on the partitions' watermarks until enough
//! bytes arrived or the wait is over, and encoding the response without copying record data.
//!
//! A partition named twice counts once (at its first position, with its last offset and limit),
//! as in the Java broker's request map. Once the response's byte limit is reached, the remaining
//! partitions are answered from their in-memory watermarks without a read. Reads run on the
//! blocking pool, not on an async worker, and the response's share of the memory budget is held
//! only while reading and answering, never while parked in a long poll.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::future::select_all;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::error::StoreError;
use crate::kafka::context::{Call, Ctx, PendingReply, Reply};
use crate::kafka::errors::{self, code};
use crate::kafka::requests::{FetchRequest, FetchTopic};
use crate::security::{Access, TopicOp};
use crate::storage::{Store, Watermarks};

/// What was read for a partition: its record data and watermarks, or an error code and the
/// watermarks if the partition exists.
pub(crate) type PartitionRead = Result<(Bytes, Watermarks), (i16, Option<Watermarks>)>;

/// One partition of a fetch and what was read for it.
#[derive(Debug)]
pub(crate) struct FetchedPartition {
    /// Shared by the topic's partitions: a long name is held once, not once per partition.
    pub topic: Arc<str>,
    pub partition: i32,
    offset: i64,
    max_bytes: usize,
    /// The user may not read the topic: answered TOPIC_AUTHORIZATION_FAILED, never read.
    denied: bool,
    /// `None` until read.
    pub result: Option<PartitionRead>,
}

/// The asked partitions in request order, each (topic, partition) once: at its first position,
/// with the offset and limit of its last mention (the Java broker keeps them in a map).
/// Fetch: reads (and long polls) as the request asks; the response holds its share of the memory
/// budget until written.
pub(super) fn fetch_request(ctx: Arc<Ctx>, call: Call, req: FetchRequest) -> PendingReply {
    Box::pin(async move {
        let (partitions, permit) = fetch(&ctx, req, &call.access).await;
        let chunks = encode_response(call.correlation_id, call.version, &partitions);
        Ok(Some(Reply { chunks, permits: [Some(call.permit), permit].into_iter().flatten().collect() }))
    })
}

fn partitions(topics: Vec<FetchTopic>, access: &Access) -> Vec<FetchedPartition> {
    let mut parts: Vec<FetchedPartition> = Vec::new();
    let mut seen: HashMap<(Arc<str>, i32), usize> = HashMap::new();
    for FetchTopic { name: topic, partitions: ps } in topics {
        let denied = !access.topic(TopicOp::Read, &topic);
        let topic: Arc<str> = Arc::from(topic);
        for p in ps {
            let part = FetchedPartition {
                topic: topic.clone(),
                partition: p.partition,
                offset: p.fetch_offset,
                max_bytes: p.partition_max_bytes.max(0) as usize,
                denied,
                result: None,
            };
            match seen.entry((topic.clone(), p.partition)) {
                std::collections::hash_map::Entry::Occupied(at) => parts[*at.get()] = part,
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(parts.len());
                    parts.push(part);
                }
            }
        }
    }
    parts
}

/// Reads the asked partitions the user may read, waiting (up to the request's `max_wait_ms`,
/// capped by `kafka.fetch_wait_max_ms`) until `min_bytes` are there. Returns the partitions in
/// request order and the memory reserved for the response (what was read, at least one byte).
pub(crate) async fn fetch(
    ctx: &Arc<Ctx>,
    req: FetchRequest,
    access: &Access,
) -> (Vec<FetchedPartition>, Option<OwnedSemaphorePermit>) {
    let wait = Duration::from_millis(req.max_wait_ms.clamp(0, ctx.cfg.fetch_wait_max_ms as i32) as u64);
    let deadline = Instant::now() + wait;
    let limit = (req.max_bytes.max(0) as u64).clamp(1, u64::from(ctx.cfg.fetch_response_bytes_max)) as usize;
    // The first batch may exceed the limit (KIP-74): reserve room for one whole batch too.
    let reserve = limit.max(ctx.store.config().append_size_bytes_max as usize);
    let min_bytes = req.min_bytes;
    let mut parts = partitions(req.topics, access);
    // Watches first, then reads: an append between the read and the wait still wakes us.
    let mut draining = ctx.draining.clone();
    let mut watches: Vec<_> =
        parts.iter().filter(|s| !s.denied).filter_map(|s| ctx.store.watch(&s.topic, s.partition).ok()).collect();
    loop {
        let mut permit = ctx.reserve(reserve as u64).await;
        // Readers at the tail are served from the store's tail cache in place; anything else
        // reads the database on the blocking pool.
        let in_place = (parts.len() <= IN_PLACE_PARTITIONS_MAX)
            .then(|| read_round(&ctx.store, &mut parts, limit, &ctx.stats.fetch_partition_reads, Source::Memory))
            .flatten();
        let read = match in_place {
            Some((total, any_error)) => Ok((parts, total, any_error)),
            None => {
                let store = ctx.store.clone();
                let stats = ctx.stats.clone();
                tokio::task::spawn_blocking(move || {
                    let (total, any_error) =
                        read_round(&store, &mut parts, limit, &stats.fetch_partition_reads, Source::Database)
                            .unwrap_or_default();
                    (parts, total, any_error)
                })
                .await
            }
        };
        let (back, total, any_error) = match read {
            Ok(r) => r,
            // The read panicked (a bug): answer nothing rather than take the connection down.
            Err(e) => {
                tracing::error!(error = %e, "fetch read task failed");
                return (Vec::new(), permit);
            }
        };
        parts = back;
        // Keep only what the answer holds.
        if let Some(p) = permit.as_mut() {
            let keep = total.max(1);
            if p.num_permits() > keep {
                drop(p.split(p.num_permits() - keep));
            }
        }
        let enough = total >= min_bytes.max(0) as usize && (total > 0 || min_bytes <= 0);
        if enough || any_error || Instant::now() >= deadline || watches.is_empty() {
            return (parts, permit);
        }
        // Parked: nothing read is kept, no memory is held.
        drop(permit);
        for p in &mut parts {
            p.result = None;
        }
        let changed = select_all(watches.iter_mut().map(|w| Box::pin(w.changed())));
        ctx.stats.fetches_waiting.fetch_add(1, Ordering::Relaxed);
        // A stopping listener ends the wait as its deadline would: the connection can then
        // answer and close within the listener's shutdown wait.
        let timed_out = tokio::select! {
            r = tokio::time::timeout_at(deadline, changed) => r.is_err(),
            () = draining.wait() => true,
        };
        ctx.stats.fetches_waiting.fetch_sub(1, Ordering::Relaxed);
        if timed_out {
            // The wait is over: one more read so the answer is as fresh as possible.
            watches.clear();
        }
    }
}

/// A fetch over more partitions than this always reads on the blocking pool, so an async worker
/// never spends long on one request.
const IN_PLACE_PARTITIONS_MAX: usize = 256;

/// Where `read_round` may read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The store's tail cache only: the round gives up (`None`) at the first partition it
    /// would have to read from the database. Never blocks.
    Memory,
    /// The database (blocking: call on the blocking pool).
    Database,
}

/// One pass over the partitions, in order, within `limit` bytes (the first non-empty partition
/// may exceed it, KIP-74). Once the limit is reached the rest are answered from their watermarks
/// alone. Returns the bytes read and whether a partition failed (always `Some` from the
/// database).
fn read_round(
    store: &Store,
    parts: &mut [FetchedPartition],
    limit: usize,
    reads: &std::sync::atomic::AtomicU64,
    source: Source,
) -> Option<(usize, bool)> {
    let mut remaining = limit;
    let mut total = 0usize;
    let mut any_error = false;
    // Counted once the round is complete: a round from memory that gives up is read again.
    let mut partition_reads = 0u64;
    for s in parts.iter_mut() {
        if s.denied {
            s.result = Some(Err((errors::TOPIC_AUTHORIZATION_FAILED, None)));
            continue;
        }
        let res = if total > 0 && remaining == 0 {
            store.watermarks(&s.topic, s.partition).and_then(|wm| {
                if s.offset < wm.log_start_offset || s.offset > wm.high_watermark {
                    Err(StoreError::OffsetOutOfRange {
                        offset: s.offset,
                        log_start_offset: wm.log_start_offset,
                        high_watermark: wm.high_watermark,
                    })
                } else {
                    Ok((Bytes::new(), wm))
                }
            })
        } else {
            let max_bytes = s.max_bytes.min(remaining).max(1);
            let fetched = match source {
                Source::Memory => store.fetch_cached(&s.topic, s.partition, s.offset, max_bytes)?,
                Source::Database => store.fetch(&s.topic, s.partition, s.offset, max_bytes),
            };
            partition_reads += 1;
            fetched.map(|f| {
                // Only the first non-empty partition may exceed the limit (KIP-74).
                let data = if total > 0 && f.data.len() > remaining { Bytes::new() } else { f.data };
                (data, f.watermarks)
            })
        };
        s.result = Some(match res {
            Ok((data, wm)) => {
                total += data.len();
                remaining = remaining.saturating_sub(data.len());
                Ok((data, wm))
            }
            Err(e) => {
                any_error = true;
                Err((code(&e), store.watermarks(&s.topic, s.partition).ok()))
            }
        });
    }
    reads.fetch_add(partition_reads, Ordering::Relaxed);
    Some((total, any_error))
}

fn put_str(b: &mut BytesMut, s: &str) {
    b.put_i16(s.len() as i16);
    b.put_slice(s.as_bytes());
}

/// Encodes a Fetch response (v4-v11, the versions served): the frame header and every
/// partition's fields go into small buffers, each partition's record data is a chunk of its own.
pub(crate) fn encode_response(correlation_id: i32, v: i16, parts: &[FetchedPartition]) -> Vec<Bytes> {
    let mut chunks = Vec::with_capacity(2 * parts.len() + 1);
    let mut buf = BytesMut::with_capacity(256);
    buf.put_i32(0); // size, patched below
    buf.put_i32(correlation_id);
    buf.put_i32(0); // throttle_time_ms
    if v >= 7 {
        buf.put_i16(errors::NONE);
        buf.put_i32(0); // session_id: no fetch sessions
    }
    // Topics are consecutive runs of partitions with the same name, in request order.
    let mut runs: Vec<(&str, usize)> = Vec::new();
    for p in parts {
        match runs.last_mut() {
            Some((t, n)) if *t == &*p.topic => *n += 1,
            _ => runs.push((&p.topic, 1)),
        }
    }
    buf.put_i32(runs.len() as i32);
    let mut parts = parts.iter();
    for (topic, n) in runs {
        put_str(&mut buf, topic);
        buf.put_i32(n as i32);
        for p in parts.by_ref().take(n) {
            let (error, wm, records) = match &p.result {
                Some(Ok((data, wm))) => (errors::NONE, Some(*wm), data.clone()),
                Some(Err((e, wm))) => (*e, *wm, Bytes::new()),
                None => (errors::UNKNOWN_SERVER_ERROR, None, Bytes::new()),
            };
            buf.put_i32(p.partition);
            buf.put_i16(error);
            buf.put_i64(wm.map_or(-1, |w| w.high_watermark));
            buf.put_i64(wm.map_or(-1, |w| w.high_watermark)); // last stable offset
            if v >= 5 {
                buf.put_i64(wm.map_or(-1, |w| w.log_start_offset));
            }
            buf.put_i32(0); // aborted transactions: none (an empty array, not null)
            if v >= 11 {
                buf.put_i32(-1); // preferred read replica
            }
            // Never null: librdkafka rejects a records length of -1.
            buf.put_i32(records.len() as i32);
            if !records.is_empty() {
                chunks.push(std::mem::replace(&mut buf, BytesMut::with_capacity(64)).freeze());
                chunks.push(records);
            }
        }
    }
    if !buf.is_empty() {
        chunks.push(buf.freeze());
    }
    let size: usize = chunks.iter().map(Bytes::len).sum::<usize>() - 4;
    let mut first = BytesMut::from(&chunks[0][..]);
    first[..4].copy_from_slice(&(size as i32).to_be_bytes());
    chunks[0] = first.freeze();
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::{fetch_response, BrokerId, FetchResponse, TopicName};
    use kafka_protocol::protocol::{Encodable, StrBytes};

    /// The hand encoding is byte-identical to the protocol crate's at every served version.
    #[test]
    fn matches_the_protocol_crate_at_every_version() {
        let wm = Watermarks { log_start_offset: 3, high_watermark: 40 };
        let part = |topic: &str, partition, result| FetchedPartition {
            topic: topic.into(),
            partition,
            offset: 0,
            max_bytes: 0,
            denied: false,
            result,
        };
        let parts = vec![
            part("a", 0, Some(Ok((Bytes::from_static(b"batch-bytes"), wm)))),
            part("a", 1, Some(Ok((Bytes::new(), wm)))),
            part("b", 0, Some(Err((errors::OFFSET_OUT_OF_RANGE, Some(wm))))),
            part("b", 7, Some(Err((errors::UNKNOWN_TOPIC_OR_PARTITION, None)))),
        ];
        for v in 4..=11 {
            let ours: Vec<u8> = encode_response(42, v, &parts).concat();
            let mut resp = FetchResponse::default();
            for (topic, range) in [("a", 0..2), ("b", 2..4)] {
                let mut t = fetch_response::FetchableTopicResponse::default()
                    .with_topic(TopicName(StrBytes::from_static_str(topic)));
                for p in &parts[range] {
                    let (e, wm, rec) = match &p.result {
                        Some(Ok((d, wm))) => (0, Some(*wm), d.clone()),
                        Some(Err((e, wm))) => (*e, *wm, Bytes::new()),
                        None => unreachable!(),
                    };
                    t.partitions.push(
                        fetch_response::PartitionData::default()
                            .with_partition_index(p.partition)
                            .with_error_code(e)
                            .with_high_watermark(wm.map_or(-1, |w| w.high_watermark))
                            .with_last_stable_offset(wm.map_or(-1, |w| w.high_watermark))
                            .with_log_start_offset(wm.map_or(-1, |w| w.log_start_offset))
                            .with_aborted_transactions(Some(Vec::new()))
                            .with_preferred_read_replica(BrokerId(-1))
                            .with_records(Some(rec)),
                    );
                }
                resp.responses.push(t);
            }
            let mut theirs = BytesMut::new();
            theirs.put_i32(0);
            theirs.put_i32(42);
            resp.encode(&mut theirs, v).expect("encode");
            let size = (theirs.len() - 4) as i32;
            theirs[..4].copy_from_slice(&size.to_be_bytes());
            assert_eq!(ours, theirs.to_vec(), "Fetch v{v}");
        }
    }
}
