//! What every request handler shares: the listener's state (`Ctx`: store, config, coordinator,
//! users, producer ids, the memory budget), a decoded request's envelope (`Call`), and the
//! response on its way (`Reply`, `PendingReply`) with the helpers that frame one.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use bytes::Bytes;
use kafka_protocol::messages::TopicName;
use kafka_protocol::protocol::{Encodable, StrBytes};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};

use super::codec::frame_response;
use super::config::KafkaConfig;
use super::groups::Coordinator;
use super::versions::ApiSupport;
use crate::config::TopicTemplate;
use crate::error::StoreError;
use crate::listener::{Draining, ListenerStats};
use crate::security::{Access, Auth};
use crate::spaces;
use crate::storage::Store;

/// Counters of the Kafka front end.
#[derive(Debug, Default)]
pub struct KafkaStats {
    /// The listener's: connections accepted, refused, open, rate-limited, TLS handshake
    /// failures, connections ended by malformed input.
    pub listener: Arc<ListenerStats>,
    pub requests: AtomicU64,
    /// Request and response bytes on the wire (frames with their size prefix).
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// SASL authentications that failed (wrong password, unknown user, bad messages).
    pub auth_failures: AtomicU64,
    /// Requests whose size was read and whose bytes have not all arrived yet (a gauge).
    pub frames_reading: AtomicU64,
    /// Fetches parked in a long poll, waiting for data (a gauge).
    pub fetches_waiting: AtomicU64,
    /// Partitions fetches read from the store (partitions past a response's byte limit, named
    /// twice, or not readable by the user are answered without a read).
    pub fetch_partition_reads: AtomicU64,
}

/// Producer ids are handed out from blocks reserved durably, so an id is never given twice, even
/// across restarts.
#[derive(Debug)]
pub(crate) struct ProducerIds {
    pub(super) next: i64,
    pub(super) limit: i64,
}

const PRODUCER_ID_BLOCK: i64 = 1000;
pub(super) const KV_PRODUCER_ID_LIMIT: &[u8] = b"producer_id_limit";
pub(super) const KV_CLUSTER_ID: &[u8] = b"cluster_id";

/// State shared by all connections.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub store: Store,
    pub cfg: KafkaConfig,
    pub defaults: TopicTemplate,
    pub advertised_host: String,
    pub advertised_port: i32,
    pub cluster_id: String,
    pub memory: Arc<Semaphore>,
    pub producer_ids: Mutex<ProducerIds>,
    pub stats: Arc<KafkaStats>,
    pub groups: Arc<Coordinator>,
    pub auth: Arc<Auth>,
    /// Set when the listener stops: parked fetches answer at once.
    pub draining: Draining,
}

impl Ctx {
    pub(crate) async fn next_producer_id(&self) -> Result<i64, StoreError> {
        let mut ids = self.producer_ids.lock().await;
        if ids.next >= ids.limit {
            let limit = ids.limit + PRODUCER_ID_BLOCK;
            self.store
                .kv_put(spaces::BROKER, KV_PRODUCER_ID_LIMIT.to_vec(), Some(limit.to_be_bytes().to_vec()))
                .await?;
            ids.limit = limit;
        }
        let id = ids.next;
        ids.next += 1;
        Ok(id)
    }

    /// Takes `bytes` of the shared buffer budget (capped at the whole budget), waiting if needed.
    pub(crate) async fn reserve(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        let n = bytes.clamp(1, self.cfg.buffer_memory_bytes_max).min(u64::from(u32::MAX)) as u32;
        self.memory.clone().acquire_many_owned(n).await.ok()
    }
}

/// A response on its way: the frame in one or more chunks (record data is not copied into the
/// frame) and the share of the memory budget it holds until written.
#[derive(Debug)]
pub(crate) struct Reply {
    pub chunks: Vec<Bytes>,
    pub permits: Vec<OwnedSemaphorePermit>,
}

impl Reply {
    pub(crate) fn one(bytes: Bytes, permits: Vec<OwnedSemaphorePermit>) -> Self {
        Self { chunks: vec![bytes], permits }
    }
}

/// The rest of a request's work after it was read (and, for produce, queued in order).
/// `None` = no response (produce with acks=0).
pub(crate) type PendingReply = Pin<Box<dyn Future<Output = Result<Option<Reply>, String>> + Send>>;

pub(crate) fn ready(reply: Reply) -> PendingReply {
    Box::pin(async move { Ok(Some(reply)) })
}

/// One decoded request's envelope.
#[derive(Debug)]
pub(crate) struct Call {
    pub api: &'static ApiSupport,
    pub peer: std::net::SocketAddr,
    pub version: i16,
    pub correlation_id: i32,
    pub client_id: Option<String>,
    pub permit: OwnedSemaphorePermit,
    /// What the connection's user may do.
    pub access: Access,
}

pub(crate) fn encode<T: Encodable>(call: &Call, body: &T) -> Result<Bytes, String> {
    let v = call.version;
    let size = body.compute_size(v).map_err(|e| format!("{} v{v}: cannot size response: {e}", call.api.name))?;
    frame_response(call.correlation_id, call.api.response_header_flexible(v), size, |buf| {
        body.encode(buf, v).map_err(|e| format!("{} v{v}: cannot encode response: {e}", call.api.name))
    })
}

/// A request's one-frame response, holding the request's share of the memory budget until written.
pub(crate) fn reply<T: Encodable>(call: Call, body: &T) -> PendingReply {
    match encode(&call, body) {
        Ok(bytes) => ready(Reply::one(bytes, vec![call.permit])),
        Err(e) => Box::pin(async move { Err(e) }),
    }
}

/// The refusal text of an ACL check.
pub(crate) const NOT_AUTHORIZED: &str = "not authorized by the user's ACL";

/// A response string.
pub(crate) fn sb(s: impl Into<String>) -> StrBytes {
    StrBytes::from_string(s.into())
}

pub(crate) fn topic_name(s: &str) -> TopicName {
    TopicName(sb(s))
}
