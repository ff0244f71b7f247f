//! The MQTT listener and its sessions: CONNECT (3.1.1 or 5, chosen by the protocol level),
//! keep-alive, session takeover, inbound QoS 0/1/2 with every acknowledgement sent only once the
//! message is durable (QoS 2 packet ids are stored in the same commit as the message and count as
//! received only once that commit succeeded), retained messages, will messages (delayed ones in
//! one bounded queue), subscriptions served from the log through per-partition cursors within the
//! client's in-flight window, and the background sweep of expired sessions. Store reads run on
//! the blocking pool, and every loop over a count a client controls yields.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::select_all;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::sync::{oneshot, Notify};
use tokio::task::coop::consume_budget;

use super::config::MqttConfig;
use super::persist::{
    decode_session, decode_shared, encode_session, legacy_qos2_key, legacy_qos2_prefix, qos2_key, qos2_pkid,
    qos2_prefix, session_client, session_deadline, session_key, session_prefix, shared_key, shared_prefix, Position,
    StoredSession,
};
use super::reason;
use super::retained::{self, RetainedIndex};
use super::routes::{
    Router, HEADER_CONTENT_TYPE, HEADER_CORRELATION_DATA, HEADER_RESPONSE_TOPIC, HEADER_TOPIC, RETAINED_TOPIC,
};
use super::session::{self, Action, Counter, Limits, Message, Sent, Session, SharedSub, Source, Start};
use super::shared::SharedGroup;
use super::sockets;
use super::topic;
use super::wills::WillQueue;
use super::wire::{self, Charge, FrameReader, In, PublishProps, ReadBudget, Version, WireError};
use crate::config::{CleanupPolicy, Durability, TopicConfig, TopicTemplate};
use crate::error::StoreError;
use crate::listener::{self, Conn, Draining, Listener, ListenerStats, OverLimit, Reader, Writer};
use crate::partitioner::Partitioner;
use crate::security::{tls, Auth, LoginError, User};
use crate::spaces;
use crate::storage::batch::{NewRecord, StoredRecord};
use crate::storage::clock::now_ms;
use crate::storage::refusals::RefusalKind;
use crate::storage::{AppendOutcome, KvEntry, KvSpace, PendingAppend, Store};

/// Header carrying the QoS a message was published with.
pub const HEADER_QOS: &str = "mqtt.qos";
/// Header carrying the publishing client's id (for MQTT 5 No Local subscriptions).
pub const HEADER_CLIENT: &str = "mqtt.client";
/// Header carrying an MQTT 5 message's expiry (ms since the epoch).
pub const HEADER_EXPIRES: &str = "mqtt.expires-ms";
/// Header `1` on a message published with RETAIN set (for Retain As Published).
pub const HEADER_RETAIN: &str = "mqtt.retain";
/// Header carrying an MQTT 5 message's Payload Format Indicator (`0` or `1`).
pub const HEADER_PAYLOAD_FORMAT: &str = "mqtt.payload-format";

/// Why the MQTT listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("invalid MQTT configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot read the retained messages: {0}")]
    Store(#[from] StoreError),
}

impl From<sockets::BindError> for MqttError {
    fn from(e: sockets::BindError) -> Self {
        match e {
            sockets::BindError::Bind { addr, source } => Self::Bind { addr, source },
            sockets::BindError::Tls(e) => Self::Tls(e),
        }
    }
}

/// Counters of the MQTT front end.
#[derive(Debug, Default)]
pub struct MqttStats {
    /// The listener's (plain and TLS together): connections accepted, refused, open,
    /// rate-limited, TLS handshake failures, connections ended by malformed input.
    pub listener: Arc<ListenerStats>,
    /// CONNECT packets read (before login is checked).
    pub connects_read: AtomicU64,
    pub publishes_in: AtomicU64,
    pub publishes_out: AtomicU64,
    /// Messages a subscriber never got because retention deleted them first.
    pub retention_skipped_messages: AtomicU64,
    /// Messages not delivered because their MQTT 5 expiry passed.
    pub expired_messages: AtomicU64,
    /// Messages not delivered because they exceed the client's Maximum Packet Size.
    pub oversized_messages: AtomicU64,
    /// Retained messages refused by `mqtt.retained_messages_max` or `mqtt.retained_bytes_max`.
    pub retained_refused: AtomicU64,
    /// Expired retained messages deleted when a subscription's scan found them.
    pub retained_expired_deleted: AtomicU64,
    /// Retained messages stored, and their bytes (topics and payloads).
    pub retained_messages: AtomicU64,
    pub retained_bytes: AtomicU64,
    /// Every record of the retained topic below this offset is in the retained index (read at
    /// start-up, then followed as any writer appends).
    pub retained_followed_offset: AtomicU64,
    /// Packet bytes received and sent.
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// CONNECTs refused for bad or missing credentials or an unknown certificate user.
    pub auth_failures: AtomicU64,
    /// CONNECTs refused because the client id belongs to another user (`mqtt.client_ids`).
    pub client_ids_refused: AtomicU64,
    /// Publishes and subscriptions the user's ACL does not allow.
    pub publishes_denied: AtomicU64,
    pub subscriptions_denied: AtomicU64,
    /// Messages a granted subscription matched that `mqtt.subscribe_deny` kept from the
    /// subscriber (from the log and retained; a shared group's stay for its other members).
    pub deliveries_denied: AtomicU64,
    /// Client publishes to `$` topics (the broker's), acknowledged as refused and dropped.
    pub publishes_reserved: AtomicU64,
    /// MQTT 5 publishes whose Payload Format Indicator says UTF-8 and whose payload is not,
    /// refused with 0x99 and dropped.
    pub publishes_payload_invalid: AtomicU64,
    /// Connections closed because `mqtt.buffer_memory_bytes_max` stayed exhausted.
    pub buffer_memory_exhausted: AtomicU64,
    /// Delayed wills waiting (`mqtt.delayed_wills_max`), and those published before their delay
    /// because the queue was full.
    pub delayed_wills: AtomicU64,
    pub wills_published_early: AtomicU64,
    /// Expired persistent sessions deleted by the sweep.
    pub sessions_expired: AtomicU64,
    read_budget: OnceLock<ReadBudget>,
}

impl MqttStats {
    /// Bytes of packets being read, charged to `mqtt.buffer_memory_bytes_max`.
    pub fn buffer_memory_bytes(&self) -> u64 {
        self.read_budget.get().map_or(0, |b| b.in_use() as u64)
    }
}

/// A will message waiting for its delay, with the client it belongs to.
#[derive(Debug)]
struct DelayedWill {
    origin: Origin,
    msg: Message,
}

#[derive(Debug)]
struct Ctx {
    store: Store,
    cfg: MqttConfig,
    router: Router,
    defaults: TopicTemplate,
    partitioner: Partitioner,
    stats: Arc<MqttStats>,
    /// Connected client ids, with the way to close that connection (session takeover).
    clients: Mutex<HashMap<String, (u64, Takeover)>>,
    next_conn: AtomicU64,
    /// Set when the listener stops: sessions store their state and end.
    draining: Draining,
    /// Shared subscriptions (`$share/{group}/{filter}`) by their full filter.
    shared: Mutex<HashMap<String, Arc<SharedGroup>>>,
    /// Retained topics and sizes (the limits are checked here, without reading the store).
    retained: Arc<Mutex<RetainedIndex>>,
    /// Held from a retained message's index update until its write is queued, and by the
    /// deletion of expired retained messages until its commit: the store applies retained
    /// writes in the order the index saw them, so a deletion never removes a newer message.
    retained_order: tokio::sync::Mutex<()>,
    /// Delayed wills, published by one scheduler task.
    wills: Mutex<WillQueue<DelayedWill>>,
    wills_changed: Notify,
    /// `mqtt.buffer_memory_bytes_max`: memory of packets being read, all connections together.
    read_budget: ReadBudget,
    auth: Arc<Auth>,
}

/// Locks a mutex whose data stays consistent even if a holder panicked.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs a store read on the blocking pool, off the async workers (the runtime has two).
async fn off_worker<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| format!("store read task failed: {e}"))
}

/// Messages one session takes from a shared group in one go, so active members share the load.
const SHARED_BATCH: usize = 16;
/// Retained topics one page of a subscription's retained scan looks at, and QoS 0 retained
/// messages one page sends (QoS 1/2 ones are bounded by the free in-flight window as well).
const RETAINED_PAGE_EXAMINE: usize = 256;
const RETAINED_PAGE_QOS0: usize = 64;
/// Bytes of retained payloads one page reads at most (at least one message).
const RETAINED_PAGE_BYTES: u64 = 256 * 1024;
/// Most bytes of stored batches a delivery decodes in place from the store's tail cache (more is
/// read on the blocking pool), so an async worker never spends long decompressing.
const IN_PLACE_READ_BYTES: usize = 64 * 1024;
/// Log chunks one delivery round reads at most before the session looks at its socket again.
const DELIVERY_READS_MAX: usize = 16;
/// Stored sessions the sweep reads per page (each is bounded by the subscription and in-flight
/// limits).
const SWEEP_PAGE: usize = 16;
/// Topic aliases a client may set (its Topic Alias Maximum, announced in CONNACK).
const TOPIC_ALIAS_MAX: u16 = 64;
/// Read-ahead of a logged-in connection (several small packets per read).
const READ_AHEAD_BYTES: usize = 4096;
/// A connection's write buffer is allocated with at least this much room (it grows with what a
/// round of answers and deliveries adds, and is freed once written).
const WRITE_CHUNK_BYTES: usize = 1024;

/// A bound MQTT listener (plain, TLS when `[mqtt.tls]` is enabled, WebSocket and secure
/// WebSocket when configured).
#[derive(Debug)]
pub struct MqttServer {
    /// The sockets, in `sockets::bind`'s order.
    listener: Listener,
    /// Which of the listener's sockets is TLS, WebSocket, secure WebSocket.
    socket_index: [Option<usize>; 3],
    ctx: Arc<Ctx>,
}

/// Bytes of the retained topic one step of the start-up scan reads (at least one batch).
const RETAINED_LOAD_STEP_BYTES: usize = 256 * 1024;
/// `kv.mqtt_retained` entries one migration step reads (each value at most a publish's size)
/// and moves into the retained topic in one commit, with at most this many bytes of records.
const RETAINED_MIGRATE_STEP_ENTRIES: usize = 8;
const RETAINED_MIGRATE_STEP_BYTES: usize = 256 * 1024;

/// The settings of the retained topic (`routes::RETAINED_TOPIC`) when the broker creates it:
/// compacted (the latest record per MQTT topic, tombstones kept `delete.retention.ms` so a
/// consumer reading it sees the deletion), durable, one partition (its order is the index's).
fn retained_topic_config(defaults: &TopicConfig) -> TopicConfig {
    TopicConfig {
        cleanup_policy: CleanupPolicy::Compact,
        durability: Durability::Fsync,
        retention_ms: None,
        retention_bytes: None,
        ..defaults.clone()
    }
}

/// Creates the retained topic if it is missing.
async fn ensure_retained_topic(store: &Store, defaults: &TopicConfig) -> Result<(), StoreError> {
    if store.topic(RETAINED_TOPIC).is_some() {
        return Ok(());
    }
    match store.create_topic(RETAINED_TOPIC, 1, retained_topic_config(defaults)).await {
        Ok(()) | Err(StoreError::TopicExists(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The record of a retained message in the retained topic: key = the MQTT topic's exact bytes,
/// value = the payload (`None`: a tombstone, the topic's retained message cleared), headers =
/// those of the published record (QoS, properties, the expiry as an absolute time).
fn retained_record(topic: &str, payload: Option<Bytes>, headers: Vec<(String, Option<Bytes>)>) -> NewRecord {
    NewRecord { key: Some(Bytes::copy_from_slice(topic.as_bytes())), value: payload, headers, timestamp_ms: None }
}

/// A QoS as a header value (no allocation per message).
fn qos_text(qos: u8) -> Bytes {
    match qos {
        0 => Bytes::from_static(b"0"),
        1 => Bytes::from_static(b"1"),
        2 => Bytes::from_static(b"2"),
        q => Bytes::from(q.to_string()),
    }
}

/// The headers of a record (routed or retained) for a message, in one vector of their number.
fn message_headers(m: &Message, by: By<'_>, expires_ms: Option<i64>) -> Vec<(String, Option<Bytes>)> {
    let p = &m.props;
    let count = 3
        + usize::from(expires_ms.is_some())
        + usize::from(m.retain)
        + usize::from(p.payload_format.is_some())
        + usize::from(p.content_type.is_some())
        + usize::from(p.correlation_data.is_some())
        + usize::from(p.response_topic.is_some())
        + p.user_properties.len();
    let mut headers = Vec::with_capacity(count);
    let client = by.client_header.cloned().unwrap_or_else(|| Bytes::copy_from_slice(by.client_id.as_bytes()));
    headers.push((HEADER_TOPIC.to_string(), Some(Bytes::copy_from_slice(m.topic.as_bytes()))));
    headers.push((HEADER_QOS.to_string(), Some(qos_text(m.qos))));
    headers.push((HEADER_CLIENT.to_string(), Some(client)));
    if let Some(deadline) = expires_ms {
        headers.push((HEADER_EXPIRES.to_string(), Some(Bytes::from(deadline.to_string().into_bytes()))));
    }
    if m.retain {
        headers.push((HEADER_RETAIN.to_string(), Some(Bytes::from_static(b"1"))));
    }
    props_headers(&m.props, &mut headers);
    headers
}

/// MQTT 5 properties as record headers (read back by `props_of`).
fn props_headers(p: &PublishProps, headers: &mut Vec<(String, Option<Bytes>)>) {
    if let Some(format) = p.payload_format {
        headers.push((HEADER_PAYLOAD_FORMAT.to_string(), Some(Bytes::from(format.to_string().into_bytes()))));
    }
    if let Some(ct) = &p.content_type {
        headers.push((HEADER_CONTENT_TYPE.to_string(), Some(Bytes::from(ct.clone().into_bytes()))));
    }
    if let Some(cd) = &p.correlation_data {
        headers.push((HEADER_CORRELATION_DATA.to_string(), Some(cd.clone())));
    }
    if let Some(rt) = &p.response_topic {
        headers.push((HEADER_RESPONSE_TOPIC.to_string(), Some(Bytes::from(rt.clone().into_bytes()))));
    }
    for (k, v) in &p.user_properties {
        headers.push((k.clone(), Some(Bytes::from(v.clone().into_bytes()))));
    }
}

/// Moves the previous releases' retained messages (`kv.mqtt_retained`) into the retained topic,
/// a step at a time: each step appends a few of them as records and removes their entries in
/// the same commit, so a crash keeps a step whole or not at all (no message lost or doubled);
/// the next start goes on with what is left. Expired ones are only removed ([MQTT-3.3.2-5]),
/// and so are those of a topic that already has a record in the topic (a message or tombstone
/// written after an earlier, unfinished move is newer). Returns how many messages moved.
async fn migrate_retained(store: &Store, defaults: &TopicConfig) -> Result<u64, StoreError> {
    let mut moved = 0u64;
    let pending = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.kv_scan_from(spaces::MQTT_RETAINED, &[], 1))
            .await
            .map_err(|e| StoreError::Corrupt(format!("retained migration task: {e}")))??
    };
    if pending.is_empty() {
        return Ok(0);
    }
    // The topics the retained topic has records for (only when there is something to move).
    let newer = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            let mut keys = std::collections::HashSet::new();
            scan_retained(&store, |r| {
                if let Some(k) = &r.key {
                    keys.insert(k.to_vec());
                }
            })
            .map(|_| keys)
        })
        .await
        .map_err(|e| StoreError::Corrupt(format!("retained migration task: {e}")))??
    };
    loop {
        let page = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || {
                store.kv_scan_from(spaces::MQTT_RETAINED, &[], RETAINED_MIGRATE_STEP_ENTRIES)
            })
            .await
            .map_err(|e| StoreError::Corrupt(format!("retained migration task: {e}")))??
        };
        if page.is_empty() {
            if moved > 0 {
                tracing::info!(moved, topic = RETAINED_TOPIC, "retained messages moved into their log topic");
            }
            return Ok(moved);
        }
        let now = now_ms();
        let (mut records, mut removals, mut bytes) = (Vec::new(), Vec::new(), 0usize);
        for (k, v) in page {
            let value = retained::decode_value(&v);
            let topic = std::str::from_utf8(&k).ok().filter(|t| topic::valid_topic(t));
            match (topic, value) {
                (Some(_), Some(_)) if newer.contains(&k) => {}
                (Some(t), Some(r)) if r.expires_ms.is_none_or(|d| d > now) && !r.payload.is_empty() => {
                    let mut headers = vec![
                        (HEADER_TOPIC.to_string(), Some(Bytes::from(t.to_string().into_bytes()))),
                        (HEADER_QOS.to_string(), Some(Bytes::from(r.qos.to_string().into_bytes()))),
                    ];
                    if let Some(deadline) = r.expires_ms {
                        headers
                            .push((HEADER_EXPIRES.to_string(), Some(Bytes::from(deadline.to_string().into_bytes()))));
                    }
                    headers.push((HEADER_RETAIN.to_string(), Some(Bytes::from_static(b"1"))));
                    props_headers(&r.props, &mut headers);
                    let record = retained_record(t, Some(r.payload), headers);
                    let len = record.encoded_len_max();
                    if !records.is_empty() && bytes + len > RETAINED_MIGRATE_STEP_BYTES {
                        break;
                    }
                    bytes += len;
                    records.push(record);
                }
                (Some(_), Some(_)) => {}
                _ => tracing::warn!(key = ?String::from_utf8_lossy(&k), "an unreadable retained message is dropped"),
            }
            removals.push((spaces::MQTT_RETAINED, k, None));
        }
        if records.is_empty() {
            let keys = removals.into_iter().map(|(_, k, v)| (k, v)).collect();
            store.kv_write(spaces::MQTT_RETAINED, keys).await?;
            continue;
        }
        ensure_retained_topic(store, defaults).await?;
        moved += records.len() as u64;
        store.enqueue_records_with(RETAINED_TOPIC, 0, records, removals).await?.wait().await?;
    }
}

/// Every record of the retained topic from its log start, in offset order, read 256 KiB at a
/// time (the topic is compacted, so about the retained messages' own size); returns the offset
/// after the last record read. Blocking: run it on the blocking pool.
fn scan_retained(store: &Store, mut each: impl FnMut(&StoredRecord)) -> Result<i64, StoreError> {
    let Ok(wm) = store.watermarks(RETAINED_TOPIC, 0) else { return Ok(0) };
    let mut at = wm.log_start_offset;
    while at < wm.high_watermark {
        let (records, next) = match store.read_records_next(RETAINED_TOPIC, 0, at, RETAINED_LOAD_STEP_BYTES) {
            Ok(read) => read,
            // Retention moved the log start meanwhile: go on from it.
            Err(StoreError::OffsetOutOfRange { log_start_offset, .. }) if log_start_offset > at => {
                at = log_start_offset;
                continue;
            }
            Err(e) => return Err(e),
        };
        records.iter().for_each(&mut each);
        if next <= at {
            break;
        }
        at = next;
    }
    Ok(at)
}

/// A record of the retained topic as the index takes it: its MQTT topic (the key; a key that is
/// not a valid MQTT topic name, say from a Kafka producer or a restore, is never taken for one:
/// no wildcards, no empty topic), and its size and expiry (`None`: a tombstone).
fn committed_of(r: &StoredRecord) -> Option<(&str, retained::Committed)> {
    let t = r.key.as_deref().and_then(|k| std::str::from_utf8(k).ok()).filter(|t| topic::valid_topic(t))?;
    let size = r.value.as_ref().map(|v| retained::stored_size(t.as_bytes(), v.len(), &r.headers));
    let expires_ms = header(r, HEADER_EXPIRES).and_then(|d| d.parse().ok());
    Some((t, retained::Committed { offset: r.offset, size, expires_ms }))
}

/// Rebuilds the index from the retained topic (`scan_retained`); the follower goes on from
/// where it ended.
fn load_retained(store: &Store, index: &mut RetainedIndex) -> Result<(), StoreError> {
    let mut skipped = 0u64;
    let end = scan_retained(store, |r| {
        let Some((t, c)) = committed_of(r) else { return };
        if !index.load(t, c.offset, c.size, c.expires_ms) {
            skipped += 1;
        }
    })?;
    index.set_followed(end);
    if skipped > 0 {
        tracing::warn!(skipped, "retained messages beyond mqtt.retained_messages_max were not loaded");
    }
    Ok(())
}

/// The retained topic was deleted: the index forgets every retained message.
fn reset_retained(ctx: &Ctx) {
    tracing::warn!(topic = RETAINED_TOPIC, "the retained topic was deleted: its retained messages are gone");
    let mut ix = lock(&ctx.retained);
    ix.reset();
    retained_gauges(&ctx.stats, &ix);
    ctx.stats.retained_followed_offset.store(0, Ordering::Relaxed);
}

/// How long the retained follower waits for new records before looking again (it is woken by
/// every commit to the topic; this only bounds a wait on a topic that was deleted).
const RETAINED_FOLLOW_WAIT: Duration = Duration::from_secs(5);

/// Follows the retained topic: every record appended to it, by any path (this server's
/// publishes, a Kafka producer, a restore), goes into the index in offset order
/// (`RetainedIndex::follow`), so new subscribers get what the topic holds without a restart, and
/// a tombstone clears the topic. Reads at most `RETAINED_LOAD_STEP_BYTES` a step (from the tail
/// cache when it can), woken by the topic's commits; never re-reads the topic from its start.
async fn retained_follower(ctx: Arc<Ctx>) {
    let mut topics = ctx.store.topics_changed();
    loop {
        let at = lock(&ctx.retained).followed();
        let wm = match ctx.store.wait_for_data(RETAINED_TOPIC, 0, at, RETAINED_FOLLOW_WAIT).await {
            // Offsets never go back: a lower high watermark is a topic deleted and created again.
            Ok(wm) if wm.high_watermark < at => {
                reset_retained(&ctx);
                continue;
            }
            Ok(wm) => wm,
            Err(StoreError::UnknownTopic(_)) => {
                // Not created yet (the first retained publish or a Kafka client creates it), or
                // deleted: its retained messages went with it.
                if at > 0 {
                    reset_retained(&ctx);
                }
                let _ = tokio::time::timeout(RETAINED_FOLLOW_WAIT, topics.changed()).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "following the retained topic failed; trying again");
                tokio::time::sleep(RETAINED_FOLLOW_WAIT).await;
                continue;
            }
        };
        if wm.high_watermark <= at {
            continue;
        }
        let step = RETAINED_LOAD_STEP_BYTES;
        let read = match ctx.store.read_records_cached(RETAINED_TOPIC, 0, at, step) {
            Some(Ok(records)) => Ok((records, None)),
            _ => {
                let store = ctx.store.clone();
                match off_worker(move || store.read_records_next(RETAINED_TOPIC, 0, at, step)).await {
                    Ok(r) => r.map(|(records, next)| (records, Some(next))),
                    Err(e) => Err(StoreError::Corrupt(e)),
                }
            }
        };
        let (records, next) = match read {
            Ok(read) => read,
            // Retention or DeleteRecords moved the log start past it: go on from there.
            Err(StoreError::OffsetOutOfRange { log_start_offset, .. }) if log_start_offset > at => {
                lock(&ctx.retained).set_followed(log_start_offset);
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, at, "reading the retained topic failed; trying again");
                tokio::time::sleep(RETAINED_FOLLOW_WAIT).await;
                continue;
            }
        };
        // The cached read gives records, not where the batches end: past the last one at least.
        let next = next.unwrap_or_else(|| records.last().map_or(at, |r| r.offset + 1)).max(at);
        let mut skipped = 0u64;
        {
            let mut ix = lock(&ctx.retained);
            for r in &records {
                if let Some((t, c)) = committed_of(r) {
                    if !ix.follow(t, c) {
                        skipped += 1;
                    }
                }
            }
            ix.set_followed(next);
            retained_gauges(&ctx.stats, &ix);
        }
        ctx.stats.retained_followed_offset.store(next.max(0) as u64, Ordering::Relaxed);
        if skipped > 0 {
            tracing::warn!(skipped, "retained messages beyond mqtt.retained_messages_max were not taken");
        }
        if next <= at {
            // A stretch without records (offsets compaction emptied): the uncached read moves on.
            let store = ctx.store.clone();
            if let Ok(Ok((_, n))) = off_worker(move || store.read_records_next(RETAINED_TOPIC, 0, at, step)).await {
                lock(&ctx.retained).set_followed(n);
            }
        }
        tokio::task::yield_now().await;
    }
}

impl MqttServer {
    /// Binds with authentication off.
    pub async fn bind(cfg: MqttConfig, store: Store, defaults: TopicTemplate) -> Result<Self, MqttError> {
        Self::bind_with(cfg, store, defaults, Auth::disabled()).await
    }

    /// Binds the listeners; with `auth` enabled every client logs in and every publish and
    /// subscription is checked against its user's rules.
    pub async fn bind_with(
        cfg: MqttConfig,
        store: Store,
        defaults: TopicTemplate,
        auth: Arc<Auth>,
    ) -> Result<Self, MqttError> {
        cfg.validate("mqtt")?;
        cfg.validate_with_storage("mqtt", store.config())?;
        let router = cfg.router("mqtt")?;
        let bound = sockets::bind(&cfg).await?;
        let socket_index = [bound.tls, bound.websocket, bound.websocket_tls];
        let listener = Listener::new(
            bound.sockets,
            listener::Limits {
                name: "mqtt",
                connections_max: cfg.connections_max,
                connections_per_ip_per_s_max: cfg.connections_per_ip_per_s_max,
                connection_rate_addresses_max: cfg.connection_rate_addresses_max,
                handshake_timeout: Duration::from_millis(cfg.connect_timeout_ms),
                over_limit: OverLimit::Answer,
                websocket_request_bytes_max: cfg.websocket_request_bytes_max as usize,
            },
        );
        // Counted in the disk budget, but a retained message is not deleted for being old: its
        // size is bounded by `mqtt.retained_bytes_max` and compaction.
        store.keep_from_disk_budget(RETAINED_TOPIC);
        // A failed move (a full disk, a write fault) does not keep the listener from starting:
        // what is left in the side table waits for a later start (and is not served meanwhile).
        if let Err(e) = migrate_retained(&store, &defaults.config).await {
            tracing::error!(
                error = %e,
                "moving the retained messages of kv.mqtt_retained into mqtt.retained stopped; \
                 those not moved are served after a later start moves them"
            );
        }
        let mut index = RetainedIndex::new(
            cfg.retained_messages_max as usize,
            cfg.retained_bytes_max,
            cfg.retained_clears_max as usize,
        );
        let index = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || load_retained(&store, &mut index).map(|()| index))
                .await
                .map_err(|e| StoreError::Corrupt(format!("retained scan task: {e}")))??
        };
        let stats = Arc::new(MqttStats::default());
        stats.retained_messages.store(index.count() as u64, Ordering::Relaxed);
        stats.retained_bytes.store(index.bytes(), Ordering::Relaxed);
        stats.retained_followed_offset.store(index.followed().max(0) as u64, Ordering::Relaxed);
        let read_budget = ReadBudget::new(
            usize::try_from(cfg.buffer_memory_bytes_max).unwrap_or(usize::MAX),
            Duration::from_millis(cfg.connect_timeout_ms),
        );
        let _ = stats.read_budget.set(read_budget.clone());
        let ctx = Arc::new(Ctx {
            store,
            router,
            defaults,
            partitioner: Partitioner::default(),
            stats,
            clients: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            draining: listener.draining(),
            shared: Mutex::new(HashMap::new()),
            retained: Arc::new(Mutex::new(index)),
            retained_order: tokio::sync::Mutex::new(()),
            wills: Mutex::new(WillQueue::new(
                cfg.delayed_wills_max as usize,
                usize::try_from(cfg.delayed_will_bytes_max).unwrap_or(usize::MAX),
            )),
            wills_changed: Notify::new(),
            read_budget,
            cfg,
            auth,
        });
        Ok(Self { listener, socket_index, ctx })
    }

    /// A handle for the broker's own `$SYS/...` messages (metrics for MQTT clients).
    pub fn sys_publisher(&self) -> SysPublisher {
        SysPublisher { ctx: self.ctx.clone() }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr(0).unwrap_or_else(|| Err(std::io::ErrorKind::NotFound.into()))
    }

    /// The TLS listener's address, if `[mqtt.tls]` is enabled.
    pub fn tls_local_addr(&self) -> Option<std::io::Result<SocketAddr>> {
        self.listener.local_addr(self.socket_index[0]?)
    }

    /// The WebSocket listener's address, if `mqtt.websocket_listen` is set.
    pub fn websocket_local_addr(&self) -> Option<std::io::Result<SocketAddr>> {
        self.listener.local_addr(self.socket_index[1]?)
    }

    /// The secure WebSocket listener's address, if `mqtt.websocket_tls_listen` is set.
    pub fn websocket_tls_local_addr(&self) -> Option<std::io::Result<SocketAddr>> {
        self.listener.local_addr(self.socket_index[2]?)
    }

    pub fn stats(&self) -> Arc<MqttStats> {
        self.ctx.stats.clone()
    }

    /// Accepts connections until `shutdown` completes; then asks every session to store its
    /// state and end, and waits (up to `listener::SHUTDOWN_WAIT`) until they have.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        if self.ctx.auth.enabled() && self.ctx.auth.user_count() == 0 && self.ctx.auth.anonymous().is_none() {
            tracing::warn!("auth.enabled with no [[auth.users]]: every MQTT client will be refused");
        }
        let wills = tokio::spawn(will_scheduler(self.ctx.clone()));
        let sweep = tokio::spawn(session_sweeper(self.ctx.clone()));
        let follower = tokio::spawn(retained_follower(self.ctx.clone()));
        let ctx = self.ctx;
        let stats = ctx.stats.listener.clone();
        self.listener.run(stats, shutdown, move |conn| handle(ctx.clone(), conn)).await;
        wills.abort();
        sweep.abort();
        follower.abort();
    }
}

/// One accepted connection (its task and TLS handshake are the listener's): over the
/// connection limit a "server busy" CONNACK; else the CONNECT and login, then the session. Each
/// phase is a boxed future of its own, so the task holds only the one running.
async fn handle(ctx: Arc<Ctx>, conn: Box<Conn>) -> Result<(), String> {
    let Conn { mut rd, wr, peer, cert_name, admitted, .. } = conn.into_parts();
    if !admitted {
        // Boxed: its timer would otherwise take room in every connection's task.
        Box::pin(refuse_busy(&mut rd, wr)).await;
        return Ok(());
    }
    // Login and session are separate boxed futures, one at a time: an idle
    // connection's task holds only its session, not the CONNECT and login states.
    match Box::pin(connection(&ctx, rd, wr, peer, cert_name)).await {
        Ok(Some(l)) => Box::pin(serve(ctx.clone(), l)).await,
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Over the connection limit: read just the CONNECT's protocol level (a dozen bytes, never the
/// packet) to answer in its version, then close.
async fn refuse_busy(rd: &mut Reader, mut wr: Writer) {
    let read = tokio::time::timeout(Duration::from_secs(2), wire::read_connect_level(rd));
    if let Ok(Ok(level)) = read.await {
        let version = if level == 5 { Version::V5 } else { Version::V4 };
        let _ = wr.write_all(&wire::connack(version, false, reason::SERVER_BUSY, &wire::ConnAckProps::default())).await;
        let _ = wr.flush().await;
    }
}

/// Publishes the broker's own `$SYS/...` messages: retained (a new subscriber gets the latest
/// values at once), into the log topic `__sys`, which keeps at most 1 MiB and one hour.
#[derive(Debug, Clone)]
pub struct SysPublisher {
    ctx: Arc<Ctx>,
}

impl SysPublisher {
    pub async fn publish(&self, topic: &str, payload: impl Into<Bytes>) -> Result<(), StoreError> {
        let ctx = &self.ctx;
        if ctx.store.topic(super::routes::SYS_TOPIC).is_none() {
            let cfg = crate::config::TopicConfig {
                retention_bytes: Some(1 << 20),
                retention_ms: Some(3_600_000),
                durability: crate::config::Durability::Relaxed,
                ..ctx.defaults.config.clone()
            };
            match ctx.store.create_topic(super::routes::SYS_TOPIC, 1, cfg).await {
                Ok(()) | Err(StoreError::TopicExists(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let origin = Origin { client_id: "$SYS".into(), username: None };
        let msg = Message {
            topic: topic.to_string(),
            qos: 0,
            retain: true,
            payload: payload.into(),
            props: PublishProps::default(),
        };
        publish_message(ctx, origin.by(), &msg, Vec::new()).await?.wait().await.map(|_| ())
    }
}

/// Closes a connection whose session a new connection takes over; the new one is told once the
/// old one has stored the session.
type Takeover = oneshot::Sender<oneshot::Sender<()>>;

/// How long a taking-over connection waits for the old one to store the session.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

fn session_deadline_ms(expiry_s: u32) -> i64 {
    if expiry_s == u32::MAX {
        0
    } else {
        now_ms() + i64::from(expiry_s) * 1000
    }
}

async fn save_session(ctx: &Ctx, s: &mut Session) -> Result<(), StoreError> {
    if !s.persistent {
        return Ok(());
    }
    ctx.store.kv_write(spaces::MQTT_SESSIONS, s.stored_entries(session_deadline_ms(s.session_expiry_s))).await?;
    s.saving();
    Ok(())
}

/// What a CONNECT left for the session, once the client is logged in and answered: the
/// session's start, and the connection's entry among the connected clients.
struct Accepted {
    start: Start,
    conn_id: u64,
    kill_rx: oneshot::Receiver<oneshot::Sender<()>>,
}

/// Writes a CONNACK refusal and ends the connection.
async fn refuse_connect(wr: &mut Writer, version: Version, code: u8) {
    let _ = wr.write_all(&wire::connack(version, false, code, &wire::ConnAckProps::default())).await;
    let _ = wr.flush().await;
}

/// The state a CONNECT finds: inbound QoS 2 packet ids stored for the client (this release's
/// keys and the previous one's) and the stored session.
type StoredState = (Vec<(Vec<u8>, u16)>, Option<Vec<u8>>);

fn read_stored_state(store: &Store, client_id: &str) -> Result<StoredState, StoreError> {
    let mut keys = Vec::new();
    for prefix in [qos2_prefix(client_id), legacy_qos2_prefix(client_id)] {
        for (k, _) in store.kv_scan(spaces::MQTT_SESSIONS, &prefix, 2 * 65_536)? {
            if let Some(pkid) = qos2_pkid(&prefix, &k) {
                keys.push((k, pkid));
            }
        }
    }
    let session = store.kv_get(spaces::MQTT_SESSIONS, &session_key(client_id))?;
    Ok((keys, session))
}

/// A client whose CONNECT was accepted and answered: what its session starts from.
struct LoggedIn {
    rd: FrameReader<Reader>,
    wr: Writer,
    accepted: Accepted,
}

/// A connection up to its session: the CONNECT (read into a small buffer charged to the read
/// budget), login, the client-id check, takeover, the stored session, CONNACK. `None`: refused
/// with a CONNACK. The session itself ([`serve`]) is allocated only after this is dropped.
async fn connection(
    ctx: &Arc<Ctx>,
    rd: Reader,
    mut wr: Writer,
    peer: SocketAddr,
    cert_name: Option<String>,
) -> Result<Option<Box<LoggedIn>>, String> {
    let max = ctx.cfg.packet_bytes_max as usize;
    let mut rd = FrameReader::new(rd, ctx.read_budget.clone());
    // CONNECT first, within the connect timeout.
    let first = tokio::time::timeout(Duration::from_millis(ctx.cfg.connect_timeout_ms), rd.next(max, |b| b == 0x10))
        .await
        .map_err(|_| "no CONNECT within mqtt.connect_timeout_ms".to_string())?;
    let frame = match first {
        Ok(f) => f,
        Err(WireError::Closed) => return Ok(None),
        Err(e @ WireError::BudgetExhausted) => {
            ctx.stats.buffer_memory_exhausted.fetch_add(1, Ordering::Relaxed);
            return Err(e.to_string());
        }
        Err(e) => return Err(e.to_string()),
    };
    ctx.stats.connects_read.fetch_add(1, Ordering::Relaxed);
    ctx.stats.bytes_in.fetch_add(frame.bytes.len() as u64, Ordering::Relaxed);
    let version = match wire::connect_level(&frame.bytes) {
        Ok(4) => Version::V4,
        Ok(5) => Version::V5,
        Ok(level) | Err(WireError::UnsupportedProtocol(level)) => {
            refuse_connect(&mut wr, Version::V4, reason::UNSUPPORTED_PROTOCOL_VERSION).await;
            return Err(format!("unsupported MQTT protocol level {level}"));
        }
        Err(e) => return Err(e.to_string()),
    };
    let wire::Frame { bytes, charge } = frame;
    let connect = match wire::decode(version, bytes, max) {
        Ok(c) => c,
        Err(e) => {
            // MQTT 5: CONNACK "malformed packet" first (3.1.1 just closes).
            if version == Version::V5 {
                refuse_connect(&mut wr, version, reason::MALFORMED_PACKET).await;
            }
            return Err(format!("bad CONNECT: {e}"));
        }
    };
    drop(charge);
    let In::Connect {
        client_id,
        clean,
        keep_alive,
        username,
        password,
        will,
        receive_max,
        session_expiry_s,
        max_packet,
        topic_alias_max,
    } = connect
    else {
        return Err("the first packet must be CONNECT".into());
    };
    let (client_id, assigned) = if client_id.is_empty() {
        if !clean && version == Version::V4 {
            refuse_connect(&mut wr, version, reason::CLIENT_IDENTIFIER_NOT_VALID).await;
            return Err("empty client id with clean session 0".into());
        }
        (format!("auto-{:016x}", rand::random::<u64>()), true)
    } else {
        (client_id, false)
    };
    if client_id.len() > ctx.cfg.client_id_bytes_max as usize {
        refuse_connect(&mut wr, version, reason::CLIENT_IDENTIFIER_NOT_VALID).await;
        return Err(format!("client id longer than mqtt.client_id_bytes_max = {}", ctx.cfg.client_id_bytes_max));
    }
    if let Some(w) = &will {
        if let Err(reason) = session::check_topic(&limits(&ctx.cfg), &w.topic) {
            refuse_connect(&mut wr, version, reason::TOPIC_NAME_INVALID).await;
            return Err(format!("will topic: {reason}"));
        }
    }
    // Who the client is: its certificate's user, its username and password, or anonymous.
    let user = if ctx.auth.enabled() {
        let started = Instant::now();
        let login = login(ctx, cert_name.as_deref(), username.as_deref(), password.as_deref()).await;
        let login = match (login, &will) {
            (Ok(u), Some(w)) if !u.may_publish(&client_id, &w.topic) => Err((
                reason::NOT_AUTHORIZED,
                LoginError::Protocol(format!("may not publish its will to {:?}", w.topic)),
            )),
            (other, _) => other,
        };
        match login {
            Ok(u) => Some(u),
            Err((code, e)) => {
                ctx.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, client = %client_id, user = ?cert_name.as_ref().or(username.as_ref()),
                    reason = %e, "mqtt login refused");
                let user = cert_name.as_deref().or(username.as_deref()).unwrap_or("-");
                ctx.store.refusals().record(
                    RefusalKind::Login,
                    "mqtt",
                    &format!("{} user {user:?} client {client_id:?}", peer.ip()),
                    &e.to_string(),
                );
                ctx.auth.delay_failure(started).await;
                refuse_connect(&mut wr, version, code).await;
                return Ok(None);
            }
        }
    } else if let Some(anonymous) = ctx.auth.anonymous() {
        // Logins off, `[auth.anonymous]` set: its rules hold for the will too.
        if will.as_ref().is_some_and(|w| !anonymous.may_publish(&client_id, &w.topic)) {
            tracing::warn!(%peer, client = %client_id, "anonymous will topic not allowed: refused");
            refuse_connect(&mut wr, version, reason::NOT_AUTHORIZED).await;
            return Ok(None);
        }
        Some(anonymous)
    } else {
        None
    };
    // A client id belongs to one user: another user's id is refused before any session is
    // touched or taken over (MQTT 5: 0x85 "client identifier not valid"; 3.1.1: return code 2).
    if let Some(u) = &user {
        if !assigned && !u.may_use_client_id(&client_id) {
            ctx.stats.client_ids_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, client = %client_id, user = %u.name,
                "client id not among the user's mqtt.client_ids: refused");
            refuse_connect(&mut wr, version, reason::CLIENT_IDENTIFIER_NOT_VALID).await;
            return Ok(None);
        }
    }
    let username = user.as_ref().filter(|u| !u.is_anonymous()).map(|u| u.name.clone()).or(username);
    // Session takeover: the previous connection with this client id is closed.
    let conn_id = ctx.next_conn.fetch_add(1, Ordering::Relaxed);
    let (kill_tx, kill_rx) = oneshot::channel();
    let previous = lock(&ctx.clients).insert(client_id.clone(), (conn_id, kill_tx));
    if let Some((_, kill)) = previous {
        tracing::info!(client = %client_id, "session taken over by a new connection");
        // Resume from what the old connection stores as it ends, not from an older save.
        let (done_tx, done_rx) = oneshot::channel();
        if kill.send(done_tx).is_ok() {
            let _ = tokio::time::timeout(TAKEOVER_WAIT, done_rx).await;
        }
    }
    // Back within its will delay: the will is not published.
    let cancelled = {
        let mut wills = lock(&ctx.wills);
        let cancelled = wills.cancel(&client_id).is_some();
        ctx.stats.delayed_wills.store(wills.len() as u64, Ordering::Relaxed);
        cancelled
    };
    if cancelled {
        tracing::debug!(client = %client_id, "client back before its will delay: will dropped");
    }
    let result = accept_session(ctx, &mut wr, version, client_id.clone(), clean, session_expiry_s, user.as_ref()).await;
    let (resumed, qos2, session_present, persistent) = match result {
        Ok(r) => r,
        Err(e) => {
            forget_client(ctx, &client_id, conn_id);
            return Err(e);
        }
    };
    let props = wire::ConnAckProps {
        receive_max: ctx.cfg.inflight_messages_max,
        max_packet: ctx.cfg.packet_bytes_max,
        topic_alias_max: TOPIC_ALIAS_MAX,
        server_keep_alive: ctx.cfg.server_keep_alive_s,
        assigned_client_id: assigned.then(|| client_id.clone()),
        reason: None,
    };
    let answered = async {
        wr.write_all(&wire::connack(version, session_present, 0, &props)).await?;
        wr.flush().await
    };
    if let Err(e) = answered.await {
        forget_client(ctx, &client_id, conn_id);
        return Err(e.to_string());
    }
    tracing::debug!(client = %client_id, ?version, clean, keep_alive, "mqtt client connected");
    // MQTT 5: a Server Keep Alive in CONNACK is the one the client uses ([MQTT-3.2.2-21]).
    let keep_alive = match (version, ctx.cfg.server_keep_alive_s) {
        (Version::V5, k) if k > 0 => k,
        _ => keep_alive,
    };
    let start = Start {
        version,
        client_id,
        username,
        user,
        will,
        keep_alive_s: keep_alive,
        aliases_out: if version == Version::V5 { topic_alias_max.min(ctx.cfg.topic_aliases_out_max) } else { 0 },
        receive_max,
        session_expiry_s,
        max_packet,
        persistent,
        resumed,
        qos2,
    };
    let accepted = Accepted { start, conn_id, kill_rx };
    Ok(Some(Box::new(LoggedIn { rd, wr, accepted })))
}

/// Removes this connection's entry from the connected clients (unless a newer one took it).
fn forget_client(ctx: &Ctx, client_id: &str, conn_id: u64) {
    let mut clients = lock(&ctx.clients);
    if clients.get(client_id).is_some_and(|(id, _)| *id == conn_id) {
        clients.remove(client_id);
    }
}

type SessionStart = (StoredSession, Vec<u16>, bool, bool);

/// Loads or clears the stored session of a client about to be accepted: clean start (or a
/// session another user owned) forgets it with its QoS 2 packet ids; a new persistent session
/// is stored at once, so it exists (session present) even if the gateway dies before the client
/// leaves. Returns the resumed session, its QoS 2 packet ids, session present and persistence.
async fn accept_session(
    ctx: &Arc<Ctx>,
    wr: &mut Writer,
    version: Version,
    client_id: String,
    clean: bool,
    session_expiry_s: u32,
    user: Option<&Arc<User>>,
) -> Result<SessionStart, String> {
    let store = ctx.store.clone();
    let id = client_id.clone();
    let read = off_worker(move || read_stored_state(&store, &id)).await?;
    let (stored_qos2, previous_session) = match read {
        Ok(r) => r,
        Err(e) => {
            refuse_connect(wr, version, reason::UNSPECIFIED_ERROR).await;
            return Err(format!("cannot read the stored session: {e}"));
        }
    };
    let persistent = match version {
        Version::V4 => !clean,
        Version::V5 => session_expiry_s > 0,
    };
    let mut resumed = None;
    let mut forget = clean;
    if !clean {
        resumed = previous_session.as_deref().and_then(|v| decode_session(v, now_ms()));
        if let (Some(s), Some(u)) = (&resumed, user) {
            if s.owner.as_ref().is_some_and(|o| *o != u.name) {
                // Stored while another user owned this id (the rules changed since).
                tracing::warn!(client = %client_id, owner = ?s.owner, user = %u.name,
                    "stored session belongs to another user: not resumed");
                resumed = None;
                forget = true;
            }
        }
    }
    let mut writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
    let mut qos2 = Vec::new();
    if forget || !persistent {
        // A session that ends with this connection keeps no stored copy.
        if previous_session.is_some() {
            writes.push((session_key(&client_id), None));
        }
    }
    if forget {
        writes.extend(stored_qos2.into_iter().map(|(k, _)| (k, None)));
    } else {
        for (_, pkid) in stored_qos2 {
            qos2.push(pkid);
        }
    }
    let session_present = resumed.is_some() || !qos2.is_empty();
    if persistent && resumed.is_none() {
        let fresh = StoredSession { owner: user.map(|u| u.name.clone()), ..StoredSession::default() };
        writes.push((session_key(&client_id), Some(encode_session(session_deadline_ms(session_expiry_s), &fresh))));
    }
    if !writes.is_empty() {
        if let Err(e) = ctx.store.kv_write(spaces::MQTT_SESSIONS, writes).await {
            refuse_connect(wr, version, reason::UNSPECIFIED_ERROR).await;
            return Err(format!("session not stored: {e}"));
        }
    }
    Ok((resumed.unwrap_or_default(), qos2, session_present, persistent))
}

/// The limits a session enforces, from `[mqtt]`.
fn limits(cfg: &MqttConfig) -> Limits {
    Limits {
        inflight_messages_max: cfg.inflight_messages_max,
        subscriptions_per_client_max: cfg.subscriptions_per_client_max as usize,
        topic_bytes_max: cfg.topic_bytes_max as usize,
        topic_levels_max: cfg.topic_levels_max as usize,
        topic_alias_max: TOPIC_ALIAS_MAX,
    }
}

/// A logged-in client until it leaves; then its session is stored (or its QoS 2 packet ids
/// removed), its shared-subscription messages given back and its will published or scheduled.
/// Awaits other than the session loop are boxed: a future's size is that of its largest await,
/// and this one lives as long as the connection.
async fn serve(ctx: Arc<Ctx>, logged_in: Box<LoggedIn>) -> Result<(), String> {
    let ctx = &ctx;
    // Built in a plain function: what it takes apart (the CONNECT's state) holds no room in
    // this future, which lives as long as the connection.
    let (mut s, mut rd, mut out, conn_id, mut kill_rx, resumed_shared) = open_session(ctx, logged_in);
    let client_id = s.client_id.clone();
    let stored = s.persistent;
    let mut setup = Ok(());
    for (name, qos, id) in resumed_shared {
        consume_budget().await;
        if let Some((_, inner)) = name.strip_prefix("$share/").and_then(|r| r.split_once('/')) {
            if s.user.as_ref().is_some_and(|u| !u.may_subscribe(&client_id, inner)) {
                continue;
            }
            match Box::pin(shared_group(ctx, &name, inner)).await {
                Ok(g) => s.shared.push(SharedSub { name: name.clone(), qos, id, group: Some(g) }),
                Err(e) => {
                    setup = Err(e);
                    break;
                }
            }
        }
    }
    let mut taken_over = None;
    let result = match setup {
        Ok(()) => session_loop(ctx, &mut s, &mut rd, &mut out, &mut kill_rx, &mut taken_over).await,
        Err(e) => Err(e),
    };
    // Shared-subscription messages the client does not have yet go to the other members.
    s.out.retain(|_, m| match &m.source {
        Source::Shared(g, position) if !m.released => {
            g.give_back(position.clone());
            false
        }
        _ => true,
    });
    if s.persistent {
        if let Err(e) = Box::pin(save_session(ctx, &mut s)).await {
            tracing::warn!(client = %client_id, error = %e, "session not stored");
        }
    } else {
        // A clean session ends with the connection: its QoS 2 packet ids go too, and the stored
        // copy of a session whose DISCONNECT set its expiry to 0.
        let ids = s.qos2_ids();
        if !ids.is_empty() || stored {
            let mut removals: Vec<(Vec<u8>, Option<Vec<u8>>)> = ids
                .iter()
                .flat_map(|&p| [(qos2_key(&client_id, p), None), (legacy_qos2_key(&client_id, p), None)])
                .collect();
            if stored {
                removals.push((session_key(&client_id), None));
            }
            if let Err(e) = Box::pin(ctx.store.kv_write(spaces::MQTT_SESSIONS, removals)).await {
                tracing::warn!(client = %client_id, error = %e, "QoS 2 packet ids of a clean session not removed");
            }
        }
    }
    release_groups(ctx, std::mem::take(&mut s.shared).into_iter().filter_map(|g| g.group).collect());
    // A will is published unless the client said goodbye normally; an MQTT 5 will delay holds
    // it back (in the listener's will queue), and a reconnect of the same client within the
    // delay cancels it.
    let graceful = matches!(result, Ok(true));
    if let (false, Some(w)) = (graceful, s.will.take()) {
        let w = *w;
        let msg = Message { topic: w.topic, qos: w.qos, retain: w.retain, payload: w.payload, props: w.props };
        let origin = Origin { client_id: client_id.clone(), username: s.username.clone() };
        let delay = Duration::from_secs(u64::from(w.delay_s.min(s.session_expiry_s)));
        let will = DelayedWill { origin, msg };
        if delay.is_zero() {
            Box::pin(publish_will(ctx, will)).await;
        } else {
            let bytes = will.msg.topic.len() + will.msg.payload.len() + will.msg.props.bytes();
            let scheduled = {
                let mut wills = lock(&ctx.wills);
                let scheduled = wills.schedule(&client_id, Instant::now() + delay, bytes, will);
                ctx.stats.delayed_wills.store(wills.len() as u64, Ordering::Relaxed);
                scheduled
            };
            match scheduled {
                Ok(()) => ctx.wills_changed.notify_one(),
                Err(will) => {
                    ctx.stats.wills_published_early.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(client = %client_id,
                        "delayed will queue full (mqtt.delayed_wills_max / delayed_will_bytes_max): published now");
                    Box::pin(publish_will(ctx, will)).await;
                }
            }
        }
    }
    // A connection taking this session over goes on now: the session is stored and the will
    // handled (so its reconnect cancels a delayed will).
    if let Some(done) = taken_over.take() {
        let _ = done.send(());
    }
    forget_client(ctx, &client_id, conn_id);
    // The last answers (a DISCONNECT with its reason) go out, for as long as a CONNECT may
    // take at most.
    let limit = Duration::from_millis(ctx.cfg.connect_timeout_ms);
    let _ = tokio::time::timeout(limit, Box::pin(out.close())).await;
    result.map(|_| ())
}

/// A logged-in connection's session, reader and writer, with what its driver keeps beside them.
type Opened =
    (Session, FrameReader<Reader>, Outgoing, u64, oneshot::Receiver<oneshot::Sender<()>>, Vec<(String, u8, u32)>);

fn open_session(ctx: &Ctx, logged_in: Box<LoggedIn>) -> Opened {
    let LoggedIn { mut rd, wr, accepted } = *logged_in;
    rd.set_read_ahead(READ_AHEAD_BYTES);
    let Accepted { mut start, conn_id, kill_rx } = accepted;
    let resumed_shared = std::mem::take(&mut start.resumed.shared);
    let s = Session::new(start, limits(&ctx.cfg), Instant::now());
    let ahead_max = usize::try_from(ctx.cfg.write_ahead_bytes_max).unwrap_or(usize::MAX);
    (s, rd, Outgoing::new(wr, ctx.stats.clone(), ahead_max), conn_id, kill_rx, resumed_shared)
}

/// Packets on their way to the client, written by the session's own task (no writer task, no
/// channel): an idle connection holds no buffer. Answers and deliveries are appended in the
/// order the session queued them and leave in that order.
struct Outgoing {
    wr: Writer,
    /// A round's only packet, written from where the session made it (most rounds of a
    /// device's connection send one acknowledgement: no buffer, no copy); a second packet moves
    /// it into `buf`.
    one: Option<Bytes>,
    buf: Vec<u8>,
    /// Bytes of `one`, else of `buf`, written already.
    sent: usize,
    /// Written but not flushed (TLS keeps what it encrypted until flushed).
    unflushed: bool,
    stats: Arc<MqttStats>,
    /// `mqtt.write_ahead_bytes_max`: bytes waiting for the socket before the session stops to
    /// write them (answers and deliveries wait; what a round adds is bounded by the in-flight
    /// window and `DELIVERY_READS_MAX` reads).
    ahead_max: usize,
}

impl Outgoing {
    fn new(wr: Writer, stats: Arc<MqttStats>, ahead_max: usize) -> Self {
        Self { wr, one: None, buf: Vec::new(), sent: 0, unflushed: false, stats, ahead_max }
    }

    fn push(&mut self, packet: Bytes) {
        self.stats.bytes_out.fetch_add(packet.len() as u64, Ordering::Relaxed);
        if self.buf.is_empty() && self.one.is_none() {
            self.one = Some(packet);
            return;
        }
        if self.buf.capacity() == 0 {
            let first = self.one.as_ref().map_or(0, Bytes::len);
            self.buf.reserve((first + packet.len()).max(WRITE_CHUNK_BYTES));
        }
        if let Some(first) = self.one.take() {
            // Written in part already: `sent` counts into it, and goes on counting in `buf`.
            self.buf.extend_from_slice(&first);
        }
        self.buf.extend_from_slice(&packet);
    }

    /// What is queued, from its start.
    fn queued(&self) -> &[u8] {
        match &self.one {
            Some(one) => one,
            None => &self.buf,
        }
    }

    /// Bytes queued and not written yet.
    fn unsent(&self) -> usize {
        self.queued().len() - self.sent
    }

    fn pending(&self) -> bool {
        self.unsent() > 0 || self.unflushed
    }

    /// One write (or the flush after the last): cancel-safe, so a `select!` may drop it (all
    /// progress lives in `self`). Once everything is written the buffer is freed.
    async fn write_some(&mut self) -> Result<(), String> {
        if self.unsent() > 0 {
            let queued = match &self.one {
                Some(one) => &one[self.sent..],
                None => &self.buf[self.sent..],
            };
            let n = self.wr.write(queued).await.map_err(|e| format!("write failed: {e}"))?;
            if n == 0 {
                return Err("connection closed while writing".into());
            }
            self.sent += n;
            if self.sent == self.queued().len() {
                self.one = None;
                self.buf = Vec::new();
                self.sent = 0;
                self.unflushed = true;
            }
        } else if self.unflushed {
            self.wr.flush().await.map_err(|e| format!("write failed: {e}"))?;
            self.unflushed = false;
        }
        Ok(())
    }

    /// Writes what the socket takes now, without waiting for it.
    fn write_now(&mut self) -> Result<(), String> {
        while self.pending() {
            match futures_util::FutureExt::now_or_never(self.write_some()) {
                Some(r) => r?,
                None => break,
            }
        }
        Ok(())
    }

    /// Waits until fewer than `mqtt.write_ahead_bytes_max` wait for the socket: a client that
    /// does not read holds up its own session, not the broker's memory.
    async fn make_room(&mut self) -> Result<(), String> {
        while self.unsent() >= self.ahead_max {
            self.write_some().await?;
        }
        Ok(())
    }

    /// Writes everything, then shuts the write side down.
    async fn close(&mut self) -> Result<(), String> {
        while self.pending() {
            self.write_some().await?;
        }
        self.wr.shutdown().await.map_err(|e| format!("shutdown failed: {e}"))
    }
}

/// Publishes a will message and waits for its commit (logged either way).
async fn publish_will(ctx: &Ctx, will: DelayedWill) {
    let client = will.origin.client_id.clone();
    match publish_message(ctx, will.origin.by(), &will.msg, Vec::new()).await {
        Ok(p) => match p.wait().await {
            Ok(_) => tracing::debug!(client = %client, "will message published"),
            Err(e) => tracing::warn!(client = %client, error = %e, "will message not stored"),
        },
        Err(e) => tracing::warn!(client = %client, error = %e, "will message not stored"),
    }
}

/// The listener's one timer for delayed wills: sleeps until the next is due (or the queue
/// changes) and publishes what is due, unless its client is connected again.
async fn will_scheduler(ctx: Arc<Ctx>) {
    loop {
        let next = lock(&ctx.wills).next_due();
        tokio::select! {
            () = ctx.wills_changed.notified() => continue,
            () = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
        loop {
            let due = {
                let mut wills = lock(&ctx.wills);
                let due = wills.pop_due(Instant::now());
                ctx.stats.delayed_wills.store(wills.len() as u64, Ordering::Relaxed);
                due
            };
            let Some((client, will)) = due else { break };
            if lock(&ctx.clients).contains_key(&client) {
                tracing::debug!(client = %client, "client back before its will delay: will dropped");
                continue;
            }
            publish_will(&ctx, will).await;
        }
    }
}

/// Deletes, every `mqtt.session_sweep_interval_ms`, the stored sessions whose expiry passed
/// (with their QoS 2 packet ids) and the shared-subscription positions no unexpired member
/// session stored, a page at a time with a yield between pages.
async fn session_sweeper(ctx: Arc<Ctx>) {
    let period = Duration::from_millis(ctx.cfg.session_sweep_interval_ms);
    loop {
        tokio::time::sleep(period).await;
        if let Err(e) = sweep_sessions(&ctx).await {
            tracing::warn!(error = %e, "mqtt session sweep failed");
        }
    }
}

/// One page of the stored keys under `prefix`, from `from` on (read on the blocking pool), and
/// where the next page starts (`None`: no more).
async fn sweep_page(
    ctx: &Ctx,
    prefix: &'static [u8],
    from: Vec<u8>,
) -> Result<(Vec<KvEntry>, Option<Vec<u8>>), String> {
    let store = ctx.store.clone();
    let mut page = off_worker(move || store.kv_scan_from(spaces::MQTT_SESSIONS, &from, SWEEP_PAGE))
        .await?
        .map_err(|e| e.to_string())?;
    // The first possible key after the last one: it followed by a zero byte.
    let next = page.last().map(|(k, _)| [k.as_slice(), &[0]].concat());
    let full = page.len() == SWEEP_PAGE;
    let before = page.len();
    page.retain(|(k, _)| k.starts_with(prefix));
    let more = full && page.len() == before;
    Ok((page, next.filter(|_| more)))
}

async fn sweep_sessions(ctx: &Arc<Ctx>) -> Result<(), String> {
    let now = now_ms();
    let expired = |deadline: i64| deadline != 0 && deadline < now;
    let mut from = Some(session_prefix().to_vec());
    while let Some(start) = from.take() {
        let (page, next) = sweep_page(ctx, session_prefix(), start).await?;
        from = next;
        let mut doomed = Vec::new();
        for (k, v) in page {
            let (Some(client), Some(deadline)) = (session_client(&k), session_deadline(&v)) else { continue };
            if expired(deadline) && !lock(&ctx.clients).contains_key(client) {
                doomed.push(client.to_string());
            }
        }
        for client in doomed {
            consume_budget().await;
            let store = ctx.store.clone();
            let id = client.clone();
            let (qos2, _) = off_worker(move || read_stored_state(&store, &id)).await?.map_err(|e| e.to_string())?;
            if lock(&ctx.clients).contains_key(&client) {
                continue;
            }
            let mut removals: Vec<(Vec<u8>, Option<Vec<u8>>)> = qos2.into_iter().map(|(k, _)| (k, None)).collect();
            removals.push((session_key(&client), None));
            ctx.store.kv_write(spaces::MQTT_SESSIONS, removals).await.map_err(|e| e.to_string())?;
            ctx.stats.sessions_expired.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(client = %client, "expired session deleted");
        }
        tokio::task::yield_now().await;
    }
    let mut from = Some(shared_prefix().to_vec());
    while let Some(start) = from.take() {
        let (page, next) = sweep_page(ctx, shared_prefix(), start).await?;
        from = next;
        let mut removals = Vec::new();
        for (k, v) in page {
            let Some((Some(deadline), _)) = decode_shared(&v) else { continue };
            let in_use =
                std::str::from_utf8(&k[shared_prefix().len()..]).is_ok_and(|name| lock(&ctx.shared).contains_key(name));
            if expired(deadline) && !in_use {
                removals.push((k, None));
            }
        }
        if !removals.is_empty() {
            ctx.store.kv_write(spaces::MQTT_SESSIONS, removals).await.map_err(|e| e.to_string())?;
        }
        tokio::task::yield_now().await;
    }
    Ok(())
}

/// Authenticates a CONNECT; the error carries the v5 reason code (mapped to 3.1.1 return codes
/// 4 and 5 by `wire::connack`).
async fn login(
    ctx: &Ctx,
    cert_name: Option<&str>,
    username: Option<&str>,
    password: Option<&str>,
) -> Result<Arc<User>, (u8, LoginError)> {
    if let Some(name) = cert_name {
        if username.is_some_and(|u| u != name) {
            return Err((
                reason::NOT_AUTHORIZED,
                LoginError::Protocol(format!("username differs from the certificate's name {name:?}")),
            ));
        }
        return ctx.auth.user(name).ok_or((reason::NOT_AUTHORIZED, LoginError::UnknownUser));
    }
    match (username, password) {
        (None, None) => ctx.auth.anonymous().ok_or((reason::NOT_AUTHORIZED, LoginError::NoCredentials)),
        (None, Some(_)) => Err((reason::NOT_AUTHORIZED, LoginError::NoCredentials)),
        (Some(_), None) => {
            Err((reason::BAD_USER_NAME_OR_PASSWORD, LoginError::Protocol("username without a password".into())))
        }
        (Some(u), Some(p)) => {
            ctx.auth.check_password(u, p.as_bytes()).await.map_err(|e| (reason::BAD_USER_NAME_OR_PASSWORD, e))
        }
    }
}

/// Who published a message (a session, or the client a will message belongs to).
#[derive(Debug)]
struct Origin {
    client_id: String,
    username: Option<String>,
}

impl Origin {
    fn by(&self) -> By<'_> {
        By { client_id: &self.client_id, username: self.username.as_deref(), client_header: None }
    }
}

/// Who publishes, borrowed for one append (a session's publishes copy nothing of it).
#[derive(Debug, Clone, Copy)]
struct By<'a> {
    client_id: &'a str,
    username: Option<&'a str>,
    /// The client id as a record header value, made once per connection (a copy otherwise).
    client_header: Option<&'a Bytes>,
}

/// A publish queued in the store; a retained message's place in the index is settled (its
/// record's offset) once committed, undone if the commit fails.
struct Published {
    pending: PendingAppend,
    retained: Option<RetainedWrite>,
}

/// A retained message's record being committed with its publish, and its index update.
struct RetainedWrite {
    pending: Option<PendingAppend>,
    index: Arc<Mutex<RetainedIndex>>,
    stats: Arc<MqttStats>,
    update: retained::Update,
}

impl RetainedWrite {
    fn undo(&self) {
        let mut ix = lock(&self.index);
        ix.undo(&self.update);
        retained_gauges(&self.stats, &ix);
    }
}

impl Published {
    async fn wait(self) -> Result<AppendOutcome, StoreError> {
        let mut result = self.pending.wait().await;
        if let Some(mut w) = self.retained {
            // Committed in the same transaction as the publish: both outcomes are the same.
            let record = match w.pending.take() {
                Some(p) => p.wait().await.map(|o| Some(o.base_offset)),
                None => Ok(None),
            };
            match (&result, record) {
                (Ok(_), Ok(offset)) => {
                    if let Some(offset) = offset {
                        lock(&w.index).settle(&w.update, offset);
                    }
                }
                (Ok(_), Err(e)) => {
                    w.undo();
                    result = Err(e);
                }
                (Err(_), _) => w.undo(),
            }
        }
        result
    }
}

fn retained_gauges(stats: &MqttStats, ix: &RetainedIndex) {
    stats.retained_messages.store(ix.count() as u64, Ordering::Relaxed);
    stats.retained_bytes.store(ix.bytes(), Ordering::Relaxed);
}

/// Appends one message to its routed log topic (creating the topic on first use); `kv` is
/// committed with it, and so is a retained message's record in the retained topic (within
/// `mqtt.retained_messages_max` and `mqtt.retained_bytes_max`; an empty payload writes a
/// tombstone if the topic had a retained message, [MQTT-3.3.1-6/7]).
async fn publish_message(
    ctx: &Ctx,
    s: By<'_>,
    m: &Message,
    kv: Vec<(KvSpace, Vec<u8>, Option<Vec<u8>>)>,
) -> Result<Published, StoreError> {
    let dest = ctx.router.route(&m.topic, s.client_id, s.username);
    let partitions = match ctx.store.topic_partitions(dest.topic) {
        Some(n) => n,
        None => {
            let config = ctx.router.topic_config(dest.topic, &ctx.defaults.config);
            match ctx.store.create_topic(dest.topic, ctx.defaults.partitions, config).await {
                Ok(()) | Err(StoreError::TopicExists(_)) => {}
                Err(e) => return Err(e),
            }
            ctx.store.topic(dest.topic).map_or(1, |t| t.partitions)
        }
    };
    let partition = ctx.partitioner.partition(dest.key.as_deref().map(str::as_bytes), partitions) as i32;
    let expires_ms = m.props.message_expiry_s.map(|secs| now_ms() + i64::from(secs) * 1000);
    let headers = message_headers(m, s, expires_ms);
    let mut retained = None;
    let mut appends = Vec::with_capacity(2);
    // Held until the write is queued (see `Ctx::retained_order`).
    let _order = if m.retain { Some(ctx.retained_order.lock().await) } else { None };
    if m.retain {
        ensure_retained_topic(&ctx.store, &ctx.defaults.config).await?;
        // Every property is kept with it, and its expiry as an absolute time (3.3.1.3,
        // [MQTT-3.3.2-5]); an empty payload clears it with a tombstone.
        let payload = (!m.payload.is_empty()).then(|| m.payload.clone());
        let size = payload.as_ref().map(|p| retained::stored_size(m.topic.as_bytes(), p.len(), &headers));
        let update = {
            let mut ix = lock(&ctx.retained);
            // Nothing to clear: no tombstone ([MQTT-3.3.1-7]: an empty message is not retained).
            let update = if size.is_none() && !ix.contains(&m.topic) {
                None
            } else {
                Some(ix.update_expiring(&m.topic, size, expires_ms))
            };
            retained_gauges(&ctx.stats, &ix);
            update
        };
        match update {
            None => {}
            Some(Ok(update)) => {
                appends.push((RETAINED_TOPIC, 0, vec![retained_record(&m.topic, payload, headers.clone())]));
                retained = Some(RetainedWrite {
                    pending: None,
                    index: ctx.retained.clone(),
                    stats: ctx.stats.clone(),
                    update,
                });
            }
            Some(Err(key)) => {
                ctx.stats.retained_refused.fetch_add(1, Ordering::Relaxed);
                let limit = match key {
                    "mqtt.retained_bytes_max" => ctx.cfg.retained_bytes_max,
                    _ => ctx.cfg.retained_messages_max.into(),
                };
                return Err(StoreError::LimitReached { key, limit });
            }
        }
    }
    let record = NewRecord {
        key: dest.key.map(|k| Bytes::from(k.into_bytes())),
        value: Some(m.payload.clone()),
        headers,
        timestamp_ms: None,
    };
    appends.insert(0, (dest.topic, partition, vec![record]));
    ctx.stats.publishes_in.fetch_add(1, Ordering::Relaxed);
    match ctx.store.enqueue_appends(appends, kv).await {
        Ok(pending) => {
            let mut pending = pending.into_iter();
            let Some(main) = pending.next() else {
                return Err(StoreError::Corrupt("an append without its outcome".into()));
            };
            if let Some(w) = retained.as_mut() {
                w.pending = pending.next();
            }
            Ok(Published { pending: main, retained })
        }
        Err(e) => {
            if let Some(w) = retained {
                w.undo();
            }
            Err(e)
        }
    }
}

/// v5 reason code for a refused publish.
fn publish_reason(e: &StoreError) -> u8 {
    match e {
        StoreError::DiskFull { .. } | StoreError::LimitReached { .. } => reason::QUOTA_EXCEEDED,
        StoreError::AppendTooLarge { .. } => reason::PACKET_TOO_LARGE,
        StoreError::InvalidTopicName { .. } => reason::TOPIC_NAME_INVALID,
        _ => reason::UNSPECIFIED_ERROR,
    }
}

/// An outcome the session waits for (a commit or a store write), with its ticket.
type Outcome = Pin<Box<dyn Future<Output = (u64, Result<(), u8>)> + Send>>;

/// The outcomes the session waits for. The set (about 150 bytes even empty) exists only while
/// the connection does something: made by the first push, freed by [`Outcomes::trim`] when the
/// session trims its own buffers.
#[derive(Default)]
struct Outcomes(Option<FuturesUnordered<Outcome>>);

impl Outcomes {
    fn push(&mut self, outcome: Outcome) {
        self.0.get_or_insert_with(FuturesUnordered::new).push(outcome);
    }

    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(FuturesUnordered::is_empty)
    }

    /// The next outcome; `None` when none is awaited.
    async fn next(&mut self) -> Option<(u64, Result<(), u8>)> {
        match &mut self.0 {
            Some(set) => set.next().await,
            None => None,
        }
    }

    fn trim(&mut self) {
        if self.is_empty() {
            self.0 = None;
        }
    }
}

/// Drives a session until it ends: reads packets, delivers from the log, waits for commits and
/// timers, and performs what the session asks. `Ok(true)` = a normal DISCONNECT (no will).
async fn session_loop(
    ctx: &Arc<Ctx>,
    s: &mut Session,
    rd: &mut FrameReader<Reader>,
    out: &mut Outgoing,
    kill: &mut oneshot::Receiver<oneshot::Sender<()>>,
    taken_over: &mut Option<oneshot::Sender<()>>,
) -> Result<bool, String> {
    let mut shutdown = ctx.draining.clone();
    let mut topics_changed = ctx.store.topics_changed();
    let mut outcomes = Outcomes::default();
    let mut ahead = ReadAhead::default();
    // Partitions whose delivery waits for a commit (see `deliver`): watched for commits.
    let mut awaiting_commit: Vec<(String, i32)> = Vec::new();
    let max = ctx.cfg.packet_bytes_max as usize;
    let v = s.version;
    let client = Bytes::copy_from_slice(s.client_id.as_bytes());
    loop {
        // Each round yields to the runtime's budget: a client that keeps the session busy
        // (packets, deliveries) cannot keep a worker to itself.
        consume_budget().await;
        s.step();
        perform(ctx, s, &client, out, &mut outcomes).await?;
        if let Some(end) = s.end() {
            return end.clone();
        }
        out.make_room().await?;
        if s.closing() {
            // Answers queued before the end still go out, once their outcomes are known.
            let pending = out.pending();
            tokio::select! {
                written = out.write_some(), if pending => written?,
                outcome = outcomes.next() => {
                    let Some((ticket, outcome)) = outcome else {
                        debug_assert!(false, "a closing session waits for no outcome");
                        return Err("session ended with answers waiting".into());
                    };
                    s.resolve(ticket, outcome);
                }
            }
            continue;
        }
        if s.working() {
            continue;
        }
        // Watches first, then the watermarks delivery reads: a commit in between wakes the
        // session instead of waiting for the next one.
        let (watched, watches) = subscription_watches(ctx, s, &awaiting_commit);
        // Deliveries queue behind answers waiting for commits: not while too many wait.
        // A connection that only publishes (a meter) has nothing to deliver: no boxed delivery
        // future per round.
        let idle = s.resend.is_empty() && s.retained.is_empty() && s.shared.is_empty() && s.subs.is_empty();
        // (No allocation unless some partition waits.)
        let awaited = awaiting_commit.clone();
        let more = if s.backlogged() || idle {
            false
        } else {
            Box::pin(deliver(ctx, s, &mut ahead, &mut awaiting_commit)).await?
        };
        // A partition that began to wait for a commit is watched for it from the next round on.
        let more = more || awaiting_commit.iter().any(|k| !awaited.contains(k));
        perform(ctx, s, &client, out, &mut outcomes).await?;
        // What this round queued goes out now, as far as the socket takes it.
        out.write_now()?;
        // Partitions this round began to follow are watched from the next round on.
        let more = more || watched != watched_partitions(s);
        let wait_for_data = async {
            let mut watches = watches;
            match watches.as_mut_slice() {
                [] => std::future::pending::<()>().await,
                // One partition followed (the common case): no boxed future per round.
                [one] => {
                    one.changed().await;
                }
                many => {
                    let _ = select_all(many.iter_mut().map(|w| Box::pin(w.changed()))).await;
                }
            }
        };
        let following = !s.subs.is_empty() || !s.shared.is_empty();
        let timeout = s.poll_timeout();
        let reading = s.wants_read();
        let waiting = !outcomes.is_empty();
        let writing = out.pending();
        let frame = tokio::select! {
            done = &mut *kill => {
                *taken_over = done.ok();
                s.taken_away(reason::SESSION_TAKEN_OVER, "session taken over");
                continue;
            }
            // Delivery stopped at a page limit with the window open: go on after a look at the
            // socket.
            () = std::future::ready(()), if more => continue,
            () = wait_for_data => continue,
            // Topics or partitions appeared (or went): the next round starts cursors for them.
            changed = topics_changed.changed(), if following => {
                if changed.is_err() {
                    return Err("store closed".into());
                }
                continue;
            }
            // Keep-alive, and the delivery progress of a persistent session stored at most a
            // second late.
            () = async {
                match timeout {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            } => {
                s.handle_timeout(Instant::now());
                // Quiet for a while (or a keep-alive or save is due): the session gave back
                // its emptied buffers, and so does the driver.
                outcomes.trim();
                continue;
            }
            () = shutdown.wait() => {
                s.taken_away(reason::SERVER_SHUTTING_DOWN, "server shutting down");
                continue;
            }
            Some((ticket, outcome)) = outcomes.next(), if waiting => {
                s.resolve(ticket, outcome);
                continue;
            }
            written = out.write_some(), if writing => {
                written?;
                continue;
            }
            f = rd.next(max, |_| true), if reading => f,
        };
        match frame {
            Ok(f) => {
                ctx.stats.bytes_in.fetch_add(f.bytes.len() as u64, Ordering::Relaxed);
                // The packet's bytes stay charged to the read budget until it is handled.
                let wire::Frame { bytes, charge } = f;
                match wire::decode(v, bytes, max) {
                    Ok(packet) => s.handle(Instant::now(), packet),
                    Err(e) => s.close(reason::MALFORMED_PACKET, e.to_string()),
                }
                perform(ctx, s, &client, out, &mut outcomes).await?;
                drop(charge);
            }
            Err(e) => {
                if matches!(e, WireError::BudgetExhausted) {
                    ctx.stats.buffer_memory_exhausted.fetch_add(1, Ordering::Relaxed);
                }
                s.read_failed(&e);
            }
        }
    }
}

/// Performs what the session asked for, in order: packets to the writer, appends to the log
/// and store writes (their outcomes go back to the session through `outcomes`), shared groups,
/// cursors and counters.
///
/// `client`: the client id as a record header value (made once per connection).
async fn perform(
    ctx: &Arc<Ctx>,
    s: &mut Session,
    client: &Bytes,
    out: &mut Outgoing,
    outcomes: &mut Outcomes,
) -> Result<(), String> {
    loop {
        // The action is taken apart in a plain function: held here across the await, the
        // ~230-byte action would take room in this future, and so in every idle connection's.
        let step = match s.poll_action() {
            Some(action) => perform_one(ctx, s, client, out, outcomes, action),
            None => return Ok(()),
        };
        if let Some(awaited) = step {
            awaited.await?;
        }
    }
}

/// A boxed step of [`perform`] to await.
type Step<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// Performs one action; what must be awaited comes back boxed (one allocation, as the
/// awaited store calls were boxed before).
fn perform_one<'a>(
    ctx: &'a Arc<Ctx>,
    s: &'a mut Session,
    client: &'a Bytes,
    out: &mut Outgoing,
    outcomes: &'a mut Outcomes,
    action: Action,
) -> Option<Step<'a>> {
    match action {
        Action::Send(bytes) => out.push(bytes),
        Action::Append { ticket, msg, qos2_pkid } => {
            return Some(Box::pin(async move {
                append(ctx, s, client, outcomes, ticket, msg, qos2_pkid).await;
                Ok(())
            }));
        }
        Action::DeleteQos2 { ticket, pkid } => {
            let store = ctx.store.clone();
            let keys = vec![(qos2_key(&s.client_id, pkid), None), (legacy_qos2_key(&s.client_id, pkid), None)];
            outcomes.push(Box::pin(async move {
                (ticket, store.kv_write(spaces::MQTT_SESSIONS, keys).await.map_err(|_| reason::UNSPECIFIED_ERROR))
            }));
        }
        Action::SaveSession { ticket } => {
            let entries = s.stored_entries(session_deadline_ms(s.session_expiry_s));
            match ticket {
                Some(t) => {
                    let store = ctx.store.clone();
                    outcomes.push(Box::pin(async move {
                        let written = store.kv_write(spaces::MQTT_SESSIONS, entries).await;
                        (t, written.map_err(|_| reason::UNSPECIFIED_ERROR))
                    }));
                }
                None => {
                    return Some(Box::pin(async move {
                        ctx.store
                            .kv_write(spaces::MQTT_SESSIONS, entries)
                            .await
                            .map_err(|e| format!("session not stored: {e}"))
                    }))
                }
            }
        }
        Action::JoinShared { name, inner } => return Some(Box::pin(join_shared(ctx, s, name, inner))),
        Action::LeaveShared(group) => release_groups(ctx, vec![group]),
        Action::StartCursors { filter } => {
            for (route_filter, log_topic) in ctx.router.filters() {
                if filters_overlap(route_filter, &filter) {
                    start_cursors(ctx, s, log_topic);
                }
            }
        }
        Action::PublishDenied { topic } => {
            ctx.stats.publishes_denied.fetch_add(1, Ordering::Relaxed);
            let who = s.username.as_deref().map_or_else(|| s.client_id.clone(), |u| format!("{u} ({})", s.client_id));
            ctx.store.refusals().record(RefusalKind::Publish, "mqtt", &who, &format!("publish to {topic:?} denied"));
        }
        Action::Count(Counter::PublishReserved) => {
            ctx.stats.publishes_reserved.fetch_add(1, Ordering::Relaxed);
        }
        Action::Count(Counter::PayloadFormatInvalid) => {
            ctx.stats.publishes_payload_invalid.fetch_add(1, Ordering::Relaxed);
        }
        Action::Count(Counter::SubscriptionDenied) => {
            ctx.stats.subscriptions_denied.fetch_add(1, Ordering::Relaxed);
        }
        Action::Disconnect { reason: code, detail } => {
            tracing::debug!(client = %s.client_id, reason = code.map(reason::meaning), %detail, "closing the connection");
            if let Some(code) = code {
                out.push(wire::disconnect(code));
            }
        }
    }
    None
}

/// [`Action::Append`]: the message to the log; with a ticket, its commit's outcome goes back to
/// the session through `outcomes`.
async fn append(
    ctx: &Arc<Ctx>,
    s: &mut Session,
    client: &Bytes,
    outcomes: &mut Outcomes,
    ticket: Option<u64>,
    msg: Message,
    qos2_pkid: Option<u16>,
) {
    let kv = match qos2_pkid {
        Some(p) => vec![(spaces::MQTT_SESSIONS, qos2_key(&s.client_id, p), Some(Vec::new()))],
        None => Vec::new(),
    };
    let by = By { client_id: &s.client_id, username: s.username.as_deref(), client_header: Some(client) };
    match (publish_message(ctx, by, &msg, kv).await, ticket) {
        (Ok(published), Some(t)) => outcomes.push(Box::pin(async move {
            let result = published.wait().await;
            if let Err(e) = &result {
                tracing::debug!(error = %e, "publish not stored");
            }
            (t, result.map(|_| ()).map_err(|e| publish_reason(&e)))
        })),
        (Ok(_), None) => {}
        (Err(e), Some(t)) => {
            tracing::debug!(client = %s.client_id, error = %e, "publish refused");
            s.resolve(t, Err(publish_reason(&e)));
        }
        (Err(e), None) => tracing::debug!(client = %s.client_id, error = %e, "QoS 0 publish dropped"),
    }
}

/// [`Action::JoinShared`]: finds or loads the group and gives it to the session.
async fn join_shared(ctx: &Arc<Ctx>, s: &mut Session, name: String, inner: String) -> Result<(), String> {
    let group = shared_group(ctx, &name, &inner).await?;
    s.set_group(&name, group);
    Ok(())
}

/// Whether some topic name could match both filters.
pub(super) fn filters_overlap(a: &str, b: &str) -> bool {
    // A leading wildcard never matches a `$` topic: `#` and `+/...` reach nothing of `$SYS/...`.
    let wild_first = |f: &str| f.starts_with('#') || f.starts_with('+');
    if (a.starts_with('$') && wild_first(b)) || (b.starts_with('$') && wild_first(a)) {
        return false;
    }
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (Some(p), Some(q)) if p == "+" || q == "+" || p == q => {}
            _ => return false,
        }
    }
}

fn start_cursors(ctx: &Ctx, s: &mut Session, log_topic: &str) {
    let Some(info) = ctx.store.topic(log_topic) else {
        // Not created yet: everything it will hold is new (picked up by `refresh_cursors` when
        // the store says topics changed).
        return;
    };
    for p in 0..info.partitions as i32 {
        if let Ok((_, end)) = readable(ctx, log_topic, p) {
            s.cursors.entry((log_topic.to_string(), p)).or_insert(end);
        }
    }
}

/// A partition's committed watermarks and where a subscriber's delivery may read up to: the
/// staged end with `mqtt.deliver_before_commit` (records whose commit is being written, see
/// `Store::staged_watermarks`), else the high watermark.
fn readable(
    ctx: &Ctx,
    log_topic: &str,
    p: i32,
) -> Result<(crate::storage::Watermarks, i64), crate::storage::StoreError> {
    if ctx.cfg.deliver_before_commit {
        ctx.store.staged_watermarks(log_topic, p)
    } else {
        ctx.store.watermarks(log_topic, p).map(|wm| (wm, wm.high_watermark))
    }
}

/// Cursors for partitions (and topics) that appeared after the subscription: from their start.
fn refresh_cursors(ctx: &Ctx, s: &mut Session) {
    for (route_filter, log_topic) in ctx.router.filters() {
        if !s.subs.iter().any(|sub| filters_overlap(route_filter, &sub.filter)) {
            continue;
        }
        if let Some(partitions) = ctx.store.topic_partitions(log_topic) {
            for p in 0..partitions as i32 {
                // Looked up without making a key: this runs every delivery round.
                if s.cursors.keys().any(|(t, q)| t == log_topic && *q == p) {
                    continue;
                }
                if let Ok(wm) = ctx.store.watermarks(log_topic, p) {
                    s.cursors.insert((log_topic.to_string(), p), wm.log_start_offset);
                }
            }
        }
    }
}

/// Which partitions a session follows (its cursors and its shared groups'), as a number that
/// changes when they change: how many, and the sum of their hashes (order-free; computed every
/// round without copying a topic name).
fn watched_partitions(s: &Session) -> (usize, u64) {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    let hash = |t: &str, p: i32| BuildHasherDefault::<DefaultHasher>::default().hash_one((t, p));
    let mut n = s.cursors.len();
    let mut sum = s.cursors.keys().fold(0u64, |acc, (t, p)| acc.wrapping_add(hash(t, *p)));
    for g in s.shared.iter().filter_map(|x| x.group.as_ref()) {
        for (t, p) in g.partitions() {
            n += 1;
            sum = sum.wrapping_add(hash(&t, p));
        }
    }
    (n, sum)
}

/// Watches of the partitions a session follows, and which they are.
/// With `mqtt.deliver_before_commit` a followed partition's staged end is watched (it wakes for
/// records being committed and for commits that move the high watermark past it), except where
/// delivery waits for a commit (`awaiting_commit`): there the commit is watched.
fn subscription_watches(
    ctx: &Ctx,
    s: &Session,
    awaiting_commit: &[(String, i32)],
) -> ((usize, u64), Vec<crate::storage::PartitionWatch>) {
    let mut watches = Vec::new();
    let early = ctx.cfg.deliver_before_commit;
    watches.extend(s.cursors.keys().filter_map(|(t, p)| {
        let staged = early && !awaiting_commit.iter().any(|(at, ap)| at == t && ap == p);
        if staged { ctx.store.watch_staged(t, *p) } else { ctx.store.watch(t, *p) }.ok()
    }));
    for g in s.shared.iter().filter_map(|x| x.group.as_ref()) {
        watches.extend(g.partitions().into_iter().filter_map(|(t, p)| ctx.store.watch(&t, p).ok()));
    }
    (watched_partitions(s), watches)
}

/// The shared group of a `$share/...` filter: the one in use, or the stored one (a persistent
/// member subscribed before a restart), or a new one starting at the current log ends.
async fn shared_group(ctx: &Arc<Ctx>, name: &str, inner: &str) -> Result<Arc<SharedGroup>, String> {
    if let Some(g) = lock(&ctx.shared).get(name) {
        return Ok(g.clone());
    }
    let (store, key) = (ctx.store.clone(), shared_key(name));
    let stored = off_worker(move || store.kv_get(spaces::MQTT_SESSIONS, &key)).await?.map_err(|e| e.to_string())?;
    let (deadline, cursors) = stored.as_deref().and_then(decode_shared).unwrap_or_else(|| {
        let mut c = HashMap::new();
        for (route_filter, log_topic) in ctx.router.filters() {
            if !filters_overlap(route_filter, inner) {
                continue;
            }
            let Some(info) = ctx.store.topic(log_topic) else { continue };
            for p in 0..info.partitions as i32 {
                if let Ok(wm) = ctx.store.watermarks(log_topic, p) {
                    c.insert((log_topic.to_string(), p), wm.high_watermark);
                }
            }
        }
        (None, c)
    });
    // Another session may have loaded it meanwhile: the first one in memory wins.
    let g = lock(&ctx.shared)
        .entry(name.to_string())
        .or_insert_with(|| Arc::new(SharedGroup::new(name, inner, cursors, deadline)))
        .clone();
    Ok(g)
}

/// A session leaves these groups: a group no session uses any more leaves memory (its position
/// stays stored for persistent members that come back).
fn release_groups(ctx: &Ctx, groups: Vec<Arc<SharedGroup>>) {
    let mut map = lock(&ctx.shared);
    for g in groups {
        let name = g.name.clone();
        drop(g);
        if map.get(&name).is_some_and(|g| Arc::strong_count(g) == 1) {
            map.remove(&name);
        }
    }
}

/// The header `name` of a stored record, as text.
fn header<'a>(r: &'a StoredRecord, name: &str) -> Option<&'a str> {
    r.headers.iter().find(|(k, _)| k == name).and_then(|(_, v)| v.as_ref()).and_then(|v| std::str::from_utf8(v).ok())
}

/// The MQTT topic a stored record read from `log_topic` is delivered under, and the QoS it was
/// published with. The `mqtt.topic` header counts only if that topic routes to `log_topic`: a
/// record written through Kafka cannot pose as a publish to a topic routed elsewhere (say
/// `commands/...`). Without such a header the record is delivered under the log topic's name,
/// as any record produced through Kafka.
fn mqtt_view<'a>(router: &Router, r: &'a StoredRecord, log_topic: &'a str) -> (&'a str, u8) {
    let topic = header(r, HEADER_TOPIC)
        .filter(|t| topic::valid_topic(t) && router.log_topic(t) == log_topic)
        .unwrap_or(log_topic);
    let qos = header(r, HEADER_QOS).and_then(|q| q.parse::<u8>().ok()).unwrap_or(1);
    (topic, qos)
}

fn expired(r: &StoredRecord) -> bool {
    header(r, HEADER_EXPIRES).and_then(|d| d.parse::<i64>().ok()).is_some_and(|d| d <= now_ms())
}

/// One record of a partition, if still stored (read on the blocking pool).
async fn read_one(ctx: &Ctx, (t, p, off): &Position) -> Result<Option<StoredRecord>, String> {
    let (store, t, p, off) = (ctx.store.clone(), t.clone(), *p, *off);
    let records = off_worker(move || store.read_records(&t, p, off, 1)).await?;
    Ok(records.ok().and_then(|rs| rs.into_iter().find(|r| r.offset == off)))
}

/// Sends subscribers what is due, within the in-flight window: first the messages a stored
/// session had in flight (same packet id, DUP set), then retained messages of new subscriptions,
/// then shared-subscription and log messages after their cursors. Returns whether it stopped at
/// a page limit with work left that the window allows (the caller comes back after a look at the
/// socket); a full window or caught-up cursors return `false`.
/// What a subscriber read from the log past what its window took: the decoded rest of one read,
/// kept for its next round instead of reading and decoding the same batches again. Charged to
/// `mqtt.buffer_memory_bytes_max` (kept only if the budget has room at once).
#[derive(Default)]
struct ReadAhead {
    /// Log topic, partition and the cursor the records start at.
    at: Option<(String, i32, i64)>,
    records: std::collections::VecDeque<StoredRecord>,
    _charge: Option<Charge>,
}

impl ReadAhead {
    /// The kept records if they continue `(topic, p)` at `from`; anything else is dropped.
    fn take(&mut self, topic: &str, p: i32, from: i64) -> Option<std::collections::VecDeque<StoredRecord>> {
        let hit = matches!(&self.at, Some((t, q, o)) if t == topic && *q == p && *o == from);
        let records = std::mem::take(&mut self.records);
        *self = Self::default();
        (hit && !records.is_empty()).then_some(records)
    }

    fn keep(
        &mut self,
        budget: &ReadBudget,
        topic: &str,
        p: i32,
        from: i64,
        records: std::collections::VecDeque<StoredRecord>,
    ) {
        let bytes: usize = records
            .iter()
            .map(|r| {
                let headers: usize = r.headers.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, Bytes::len)).sum();
                64 + r.key.as_ref().map_or(0, Bytes::len) + r.value.as_ref().map_or(0, Bytes::len) + headers
            })
            .sum();
        *self = match budget.try_charge(bytes) {
            Some(charge) if !records.is_empty() => {
                Self { at: Some((topic.to_string(), p, from)), records, _charge: Some(charge) }
            }
            _ => Self::default(),
        };
    }
}

async fn deliver(
    ctx: &Arc<Ctx>,
    s: &mut Session,
    ahead: &mut ReadAhead,
    awaiting_commit: &mut Vec<(String, i32)>,
) -> Result<bool, String> {
    awaiting_commit.clear();
    if !resend_stored(ctx, s).await? {
        return Ok(false);
    }
    let mut more = send_retained(ctx, s).await?;
    let shared: Vec<(u8, u32, Arc<SharedGroup>)> =
        s.shared.iter().filter_map(|x| x.group.clone().map(|g| (x.qos, x.id, g))).collect();
    for (granted, id, g) in shared {
        let budget = s.out.free().min(SHARED_BATCH);
        if budget == 0 {
            break;
        }
        let log_topics: Vec<String> = ctx
            .router
            .filters()
            .filter(|(route_filter, _)| filters_overlap(route_filter, &g.filter))
            .map(|(_, t)| t.to_string())
            .collect();
        let (c, group, user, client_id) = (ctx.clone(), g.clone(), s.user.clone(), s.client_id.clone());
        let (taken, left) = off_worker(move || {
            group.take(&c.store, &log_topics, budget, |log_topic, r| {
                let t = mqtt_view(&c.router, r, log_topic).0;
                // A message this member may not receive stays for the others.
                topic::matches(t, &group.filter)
                    && !expired(r)
                    && !user.as_ref().is_some_and(|u| u.delivery_denied(&client_id, t))
            })
        })
        .await?;
        more |= left;
        for (position, r) in taken {
            consume_budget().await;
            let (t, stored_qos) = mqtt_view(&ctx.router, &r, &position.0);
            let qos = granted.min(stored_qos);
            let mut props = if s.version == Version::V5 { props_of(&r.headers) } else { PublishProps::default() };
            if id != 0 {
                props.subscription_ids.push(id);
            }
            let payload = r.value.clone().unwrap_or_default();
            let source = Source::Shared(g.clone(), position.clone());
            let sent = send_message(ctx, s, t, qos, false, &payload, props, source);
            if sent && qos > 0 {
                s.mark_dirty(Instant::now());
            } else {
                g.settle(&position);
            }
        }
    }
    if s.subs.is_empty() {
        return Ok(more);
    }
    // Read again only once half the in-flight window is free, and only about what fits in it:
    // reading (and decoding) a large chunk to send one message per PUBACK costs a core.
    let free = s.out.free();
    if free == 0 || (!s.out.is_empty() && free < s.out.limit().div_ceil(2)) {
        return Ok(more);
    }
    let read_bytes = (free * 1024).clamp(16 * 1024, 256 * 1024);
    refresh_cursors(ctx, s);
    let keys: Vec<(String, i32)> = s.cursors.keys().cloned().collect();
    let mut reads = 0;
    for key in keys {
        let (log_topic, p) = (key.0.as_str(), key.1);
        loop {
            if s.out.is_full() {
                return Ok(more);
            }
            let Some(&offset) = s.cursors.get(&key) else { break };
            let (wm, end) = match readable(ctx, log_topic, p) {
                Ok(found) => found,
                Err(_) => {
                    s.cursors.remove(&key);
                    break;
                }
            };
            if offset >= end {
                break;
            }
            if reads >= DELIVERY_READS_MAX {
                return Ok(true);
            }
            reads += 1;
            let from = if offset < wm.log_start_offset {
                tracing::warn!(client = %s.client_id, topic = %log_topic, partition = p, lost = wm.log_start_offset - offset,
                    "subscriber fell behind retention: messages skipped");
                ctx.stats
                    .retention_skipped_messages
                    .fetch_add((wm.log_start_offset - offset) as u64, Ordering::Relaxed);
                wm.log_start_offset
            } else {
                offset
            };
            let mut records = match ahead.take(log_topic, p, from) {
                Some(kept) => kept,
                None => {
                    // At the tail the store's cache has the batches: read them in place; else
                    // read the database on the blocking pool.
                    let in_place = read_bytes.min(IN_PLACE_READ_BYTES);
                    let to =
                        if ctx.cfg.deliver_before_commit { crate::ReadTo::Staged } else { crate::ReadTo::Committed };
                    let cached = ctx.store.read_records_cached_to(log_topic, p, from, in_place, to);
                    let read = match cached {
                        Some(read) => read,
                        // Staged but no longer in memory: wait for the commit.
                        None if from >= wm.high_watermark => {
                            awaiting_commit.push(key.clone());
                            break;
                        }
                        None => {
                            let (store, t) = (ctx.store.clone(), log_topic.to_string());
                            off_worker(move || store.read_records(&t, p, from, read_bytes)).await?
                        }
                    };
                    read.map_err(|e| e.to_string())?.into()
                }
            };
            let mut next = from;
            while let Some(r) = records.pop_front() {
                consume_budget().await;
                if r.offset < from {
                    continue;
                }
                next = r.offset + 1;
                let (mqtt_topic, stored_qos) = mqtt_view(&ctx.router, &r, log_topic);
                let own = header(&r, HEADER_CLIENT) == Some(s.client_id.as_str());
                // One PUBLISH for every matching subscription: the highest QoS, every
                // Subscription Identifier (3.3.4, [MQTT-3.3.4-3/5]), RETAIN as published if a
                // subscription asked for it ([MQTT-3.3.1-12/13]).
                let (mut qos, mut ids, mut keep_retain) = (None, Vec::new(), false);
                for sub in s.subs.iter().filter(|sub| topic::matches(mqtt_topic, &sub.filter) && !(sub.no_local && own))
                {
                    qos = qos.max(Some(sub.qos.min(stored_qos)));
                    if sub.id != 0 {
                        ids.push(sub.id);
                    }
                    keep_retain |= sub.retain_as_published;
                }
                let Some(qos) = qos else { continue };
                if qos == 2 && r.offset >= wm.high_watermark {
                    // Exactly once waits for the commit: a crash before it would have the
                    // publisher send the message again, as a new one.
                    next = r.offset;
                    records.push_front(r);
                    if !awaiting_commit.contains(&key) {
                        awaiting_commit.push(key.clone());
                    }
                    break;
                }
                if expired(&r) {
                    ctx.stats.expired_messages.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let mut props = if s.version == Version::V5 { props_of(&r.headers) } else { PublishProps::default() };
                ids.sort_unstable();
                ids.dedup();
                props.subscription_ids = ids;
                let retain = keep_retain && header(&r, HEADER_RETAIN) == Some("1");
                let payload = r.value.clone().unwrap_or_default();
                let source = Source::Log((log_topic.to_string(), p, r.offset));
                if !send_message(ctx, s, mqtt_topic, qos, retain, &payload, props, source) {
                    continue;
                }
                if s.out.is_full() {
                    break;
                }
            }
            if !records.is_empty() {
                ahead.keep(&ctx.read_budget, log_topic, p, next, records);
            }
            if next == from {
                break;
            }
            if let Some(cursor) = s.cursors.get_mut(&key) {
                *cursor = next;
            }
            s.mark_dirty(Instant::now());
        }
    }
    Ok(more)
}

/// A persistent session's messages that were in flight when it was stored, as the window
/// allows: a PUBREL again for those the client has (QoS 2 after PUBREC), the message again (same
/// packet id, DUP set) for the others. Messages gone to retention meanwhile are counted and
/// skipped. Returns whether all are out (nothing new goes before them).
async fn resend_stored(ctx: &Ctx, s: &mut Session) -> Result<bool, String> {
    while !s.resend.is_empty() {
        consume_budget().await;
        if s.out.is_full() {
            return Ok(false);
        }
        let Some(m) = s.resend.pop_front() else { break };
        if m.released {
            s.resend_one(m, None);
            continue;
        }
        let Some(r) = read_one(ctx, &m.position).await? else {
            let (t, p, off) = &m.position;
            tracing::warn!(client = %s.client_id, topic = %t, partition = p, offset = off,
                "message in flight fell behind retention: skipped");
            ctx.stats.retention_skipped_messages.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let topic = mqtt_view(&ctx.router, &r, &m.position.0).0.to_string();
        if s.user.as_ref().is_some_and(|u| !u.may_subscribe(&s.client_id, &topic)) {
            // The session was stored under rules (or a user) that allowed more.
            continue;
        }
        let mut props = if s.version == Version::V5 { props_of(&r.headers) } else { PublishProps::default() };
        // The identifiers of the subscriptions that match it now (3.3.4).
        props.subscription_ids =
            s.subs.iter().filter(|x| x.id != 0 && topic::matches(&topic, &x.filter)).map(|x| x.id).collect();
        props.subscription_ids.sort_unstable();
        props.subscription_ids.dedup();
        let payload = r.value.clone().unwrap_or_default();
        s.resend_one(m, Some((&topic, &payload, &props)));
    }
    Ok(true)
}

/// The retained messages of new subscriptions, a page at a time within the window (QoS 1/2
/// messages take a packet id each, so they wait for room). Returns whether a page limit, not the
/// window, stopped it with messages left.
async fn send_retained(ctx: &Ctx, s: &mut Session) -> Result<bool, String> {
    let Some(scan) = s.retained.first_mut() else { return Ok(false) };
    let take = if scan.qos == 0 { RETAINED_PAGE_QOS0 } else { s.out.free().min(SHARED_BATCH) };
    if take == 0 {
        return Ok(false);
    }
    let topics = lock(&ctx.retained).page(scan, RETAINED_PAGE_EXAMINE, take, RETAINED_PAGE_BYTES);
    let (filter, granted, done) = (scan.filter.clone(), scan.qos, scan.done());
    if done {
        s.retained.remove(0);
    }
    let store = ctx.store.clone();
    // Every topic of the page is sent (or was cleared meanwhile): the cursor is past them all.
    let wanted: Vec<i64> = topics.iter().map(|(_, o)| *o).collect();
    let mut records = off_worker(move || read_retained_records(&store, wanted)).await?;
    let mut expired = Vec::new();
    for (t, offset) in topics {
        consume_budget().await;
        let Some(r) = records.remove(&offset) else {
            // Gone from the topic (the disk budget, DeleteRecords): no longer retained.
            lock(&ctx.retained).forget(&t, offset);
            continue;
        };
        if r.key.as_deref() != Some(t.as_bytes()) || !topic::matches(&t, &filter) {
            lock(&ctx.retained).forget(&t, offset);
            continue;
        }
        let Some(payload) = r.value.clone() else { continue };
        // [MQTT-3.3.2-5]: an expired retained message is not sent; a live one carries what
        // is left of its expiry.
        let now = now_ms();
        let expires_ms: Option<i64> = header(&r, HEADER_EXPIRES).and_then(|d| d.parse().ok());
        if expires_ms.is_some_and(|d| d <= now) {
            ctx.stats.expired_messages.fetch_add(1, Ordering::Relaxed);
            expired.push(t);
            continue;
        }
        let stored_qos = header(&r, HEADER_QOS).and_then(|q| q.parse::<u8>().ok()).filter(|q| *q <= 2).unwrap_or(0);
        let qos = stored_qos.min(granted);
        let mut props = if s.version == Version::V5 { props_of(&r.headers) } else { PublishProps::default() };
        props.message_expiry_s = expires_ms.map(|d| ((d - now) / 1000).clamp(0, i64::from(u32::MAX)) as u32);
        if let Some(id) = s.subs.iter().find(|x| x.filter == filter).map(|x| x.id).filter(|&id| id != 0) {
            props.subscription_ids.push(id);
        }
        // The page took no more QoS 1/2 messages than the window had room for.
        send_message(ctx, s, &t, qos, true, &payload, props, Source::Retained);
    }
    retained_gauges(&ctx.stats, &lock(&ctx.retained));
    // At most a page of them: the scan's bound is the deletion's.
    Box::pin(delete_expired_retained(ctx, expired)).await;
    // More pages: come back while the window has room (a QoS 0 scan never waits for it).
    Ok(!s.retained.is_empty() && !s.out.is_full())
}

/// The retained topic's records at `offsets` (those still there), in as few reads as they allow:
/// offsets in one stored batch are read once, and only the wanted records of a batch are kept.
fn read_retained_records(store: &Store, mut offsets: Vec<i64>) -> HashMap<i64, StoredRecord> {
    offsets.sort_unstable();
    let wanted: std::collections::HashSet<i64> = offsets.iter().copied().collect();
    let mut out = HashMap::with_capacity(offsets.len());
    let mut read_to = i64::MIN;
    for offset in offsets {
        if offset < read_to {
            continue;
        }
        // One batch (the first with records is returned whatever its size).
        match store.read_records_next(RETAINED_TOPIC, 0, offset, 1) {
            Ok((records, next)) => {
                read_to = next;
                let found = records.into_iter().filter(|r| wanted.contains(&r.offset) && r.value.is_some());
                out.extend(found.map(|r| (r.offset, r)));
            }
            Err(e) => tracing::debug!(error = %e, offset, "retained record not read"),
        }
    }
    out
}

/// Deletes retained messages a scan found expired ([MQTT-3.3.2-5]: they are never sent again)
/// with tombstones in the retained topic, each only if the topic's latest message is still the
/// expired one. Skipped while another deletion runs (a later scan finds them again).
async fn delete_expired_retained(ctx: &Ctx, topics: Vec<String>) {
    if topics.is_empty() {
        return;
    }
    let Ok(_order) = ctx.retained_order.try_lock() else { return };
    let now = now_ms();
    let updates: Vec<retained::Update> = {
        let mut ix = lock(&ctx.retained);
        let updates = topics.iter().filter_map(|t| ix.take_expired(t, now)).collect();
        retained_gauges(&ctx.stats, &ix);
        updates
    };
    if updates.is_empty() {
        return;
    }
    let tombstones = updates
        .iter()
        .map(|u| {
            let headers = vec![(HEADER_TOPIC.to_string(), Some(Bytes::from(u.topic.clone().into_bytes())))];
            retained_record(&u.topic, None, headers)
        })
        .collect();
    let written = match ctx.store.enqueue_records(RETAINED_TOPIC, 0, tombstones).await {
        Ok(pending) => pending.wait().await,
        Err(e) => Err(e),
    };
    match written {
        Ok(outcome) => {
            ctx.stats.retained_expired_deleted.fetch_add(updates.len() as u64, Ordering::Relaxed);
            // The tombstones' offsets, in order: the follower brings back nothing older.
            let mut ix = lock(&ctx.retained);
            for (i, u) in updates.iter().enumerate() {
                ix.settle(u, outcome.base_offset + i as i64);
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "expired retained messages not deleted");
            let mut ix = lock(&ctx.retained);
            for u in &updates {
                ix.undo(u);
            }
            retained_gauges(&ctx.stats, &ix);
        }
    }
}

/// Sends one message to the client (see [`Session::publish_out`]), counted. Returns whether it
/// went out.
#[allow(clippy::too_many_arguments)]
fn send_message(
    ctx: &Ctx,
    s: &mut Session,
    topic: &str,
    qos: u8,
    retain: bool,
    payload: &[u8],
    props: PublishProps,
    source: Source,
) -> bool {
    if s.user.as_ref().is_some_and(|u| u.delivery_denied(&s.client_id, topic)) {
        // Within a granted subscription but in `mqtt.subscribe_deny`.
        ctx.stats.deliveries_denied.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    match s.publish_out(topic, qos, retain, payload, props, source) {
        Sent::Out => {
            ctx.stats.publishes_out.fetch_add(1, Ordering::Relaxed);
            true
        }
        Sent::TooLarge => {
            ctx.stats.oversized_messages.fetch_add(1, Ordering::Relaxed);
            false
        }
        Sent::WindowFull => false,
    }
}

fn props_of(headers: &[(String, Option<Bytes>)]) -> PublishProps {
    let mut p = PublishProps::default();
    for (k, v) in headers {
        let text = || v.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
        match k.as_str() {
            HEADER_TOPIC | HEADER_QOS | HEADER_CLIENT | HEADER_RETAIN => {}
            HEADER_PAYLOAD_FORMAT => p.payload_format = text().and_then(|t| t.parse().ok()),
            HEADER_EXPIRES => {
                let left = text().and_then(|t| t.parse::<i64>().ok()).map(|d| (d - now_ms()).max(0) / 1000);
                p.message_expiry_s = left.map(|l| l.min(i64::from(u32::MAX)) as u32);
            }
            HEADER_CONTENT_TYPE => p.content_type = text(),
            HEADER_CORRELATION_DATA => p.correlation_data = v.clone(),
            HEADER_RESPONSE_TOPIC => p.response_topic = text(),
            _ => p.user_properties.push((k.clone(), text().unwrap_or_default())),
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Upper bounds of the two futures (bytes), as `cargo test` builds them (debug; optimised
    /// futures are smaller). Before issue 14's last round: 1,920 and 4,808 B; the connection
    /// task's was 600 B before the shared listener handed it a boxed `Conn` (now 360 B). The
    /// session future grew from 3,096 to 3,328 B when the per-message allocations were cut (the
    /// client id header made once, a round's only packet kept without a buffer, one watched
    /// partition awaited in place of a boxed future per round). The idle-memory round of
    /// 2026-12-06: 104 and 2,768 B (the over-limit refusal boxed; actions taken apart outside the
    /// awaiting future; the read budget's wait boxed; the will boxed).
    const ACCEPT_MAX: usize = 120;
    const SERVE_MAX: usize = 2_850;

    /// The size of the future an async fn of two arguments returns, without calling it.
    fn future_size2<A, B, F: Future>(_: impl FnOnce(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// What an idle logged-in connection holds is mostly its two futures: the connection task's
    /// (`handle`, which holds the session future boxed, inside the listener's wrapper of about
    /// 160 B more: `listener::tests::a_connection_task_stays_small`) and the session's (`serve`).
    /// Each is as large as its largest await point, so everything a connection does only now and
    /// then (CONNECT and login, publishing, delivering, storing) is boxed and costs heap only
    /// while it runs. Bounds a little above today's sizes, so a change that makes every
    /// connection carry more fails here (issue 14: 1,000 idle connections under 15 MiB, 10,000
    /// under 80 MiB).
    #[test]
    fn the_futures_an_idle_connection_holds_stay_small() {
        let accept = future_size2(handle);
        let serve = future_size2(serve);
        let session = std::mem::size_of::<Session>();
        eprintln!("accept task future {accept} B, session future {serve} B (of which the Session {session} B)");
        let (accept_max, serve_max) = (ACCEPT_MAX, SERVE_MAX);
        assert!(accept <= accept_max, "accept task future {accept} B > {accept_max} B");
        assert!(serve <= serve_max, "session future {serve} B > {serve_max} B");
    }

    /// `mqtt.write_ahead_bytes_max` is where a session stops to write: below it `make_room`
    /// returns at once; at it, it waits until the client has read enough.
    #[tokio::test]
    async fn make_room_waits_at_the_configured_write_ahead() {
        // The client's socket takes 1 KiB, then is full until the client reads.
        let (client, server) = tokio::io::duplex(1024);
        let (_, wr) = tokio::io::split(server);
        let mut out = Outgoing::new(Box::new(wr), Arc::default(), 8 * 1024);
        out.push(Bytes::from(vec![0u8; 7 * 1024]));
        out.make_room().await.expect("under the limit: no wait");
        assert_eq!(out.unsent(), 7 * 1024, "nothing written yet");
        out.push(Bytes::from(vec![0u8; 2 * 1024]));
        let mut room = Box::pin(out.make_room());
        assert!(
            futures_util::FutureExt::now_or_never(room.as_mut()).is_none(),
            "8 KiB unsent once the socket took 1 KiB: waits for the client"
        );
        let (mut rd, _keep) = tokio::io::split(client);
        let mut got = vec![0u8; 1024];
        tokio::io::AsyncReadExt::read_exact(&mut rd, &mut got).await.expect("read");
        room.await.expect("room once the client read");
        assert_eq!(out.unsent(), 7 * 1024);
    }

    #[test]
    fn filter_overlap() {
        assert!(filters_overlap("#", "a/b"));
        assert!(filters_overlap("meters/+/reading", "meters/#"));
        assert!(filters_overlap("meters/+/reading", "+/7/+"));
        assert!(!filters_overlap("meters/+/reading", "sensors/#"));
        assert!(!filters_overlap("a/b", "a/b/c"));
        assert!(!filters_overlap("$SYS/#", "#") && !filters_overlap("+/broker/#", "$SYS/#"));
        assert!(filters_overlap("$SYS/#", "$SYS/broker/+"));
    }

    #[test]
    fn a_read_ahead_serves_only_the_exact_continuation_and_only_within_the_budget() {
        let at = |offset: i64| StoredRecord {
            offset,
            timestamp: 0,
            key: None,
            value: Some(Bytes::from(vec![0u8; 100])),
            headers: Vec::new(),
        };
        let budget = ReadBudget::new(1024, Duration::from_millis(10));
        let mut ahead = ReadAhead::default();
        ahead.keep(&budget, "mqtt", 0, 5, (5..8).map(at).collect());
        assert_eq!(budget.in_use(), 3 * 164, "charged while kept");
        assert!(ahead.take("mqtt", 1, 5).is_none(), "another partition: dropped");
        assert_eq!(budget.in_use(), 0, "and its charge given back");
        ahead.keep(&budget, "mqtt", 0, 5, (5..8).map(at).collect());
        assert!(ahead.take("mqtt", 0, 6).is_none(), "the cursor moved elsewhere: dropped");
        ahead.keep(&budget, "mqtt", 0, 5, (5..8).map(at).collect());
        let kept = ahead.take("mqtt", 0, 5).expect("the continuation");
        assert_eq!(kept.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![5, 6, 7]);
        assert!(ahead.take("mqtt", 0, 5).is_none(), "taken once");
        // Over the budget: nothing kept (the next round reads again).
        ahead.keep(&budget, "mqtt", 0, 5, (5..15).map(at).collect());
        assert!(ahead.take("mqtt", 0, 5).is_none());
        assert_eq!(budget.in_use(), 0);
    }

    fn record(headers: &[(&str, &str)]) -> StoredRecord {
        StoredRecord {
            offset: 0,
            timestamp: 0,
            key: None,
            value: None,
            headers: headers.iter().map(|(k, v)| (k.to_string(), Some(Bytes::from(v.to_string())))).collect(),
        }
    }

    #[test]
    fn the_mqtt_topic_header_counts_only_where_it_routes() {
        let routes = vec![super::super::routes::Route {
            filter: "commands/#".into(),
            topic: "commands".into(),
            key: String::new(),
            compression: None,
        }];
        let router = Router::new(&routes, "mqtt", "{client_id}", "mqtt").expect("routes");
        let forged = record(&[(HEADER_TOPIC, "commands/meter-7/valve"), (HEADER_QOS, "2")]);
        assert_eq!(mqtt_view(&router, &forged, "mqtt"), ("mqtt", 2), "not routed to mqtt: ignored");
        assert_eq!(mqtt_view(&router, &forged, "commands").0, "commands/meter-7/valve");
        let plain = record(&[(HEADER_TOPIC, "meters/7")]);
        assert_eq!(mqtt_view(&router, &plain, "mqtt").0, "meters/7", "the default route");
        assert_eq!(mqtt_view(&router, &record(&[]), "mqtt"), ("mqtt", 1), "no header: the log topic");
        let wild = record(&[(HEADER_TOPIC, "meters/+")]);
        assert_eq!(mqtt_view(&router, &wild, "mqtt").0, "mqtt", "not a topic name");
    }
}
