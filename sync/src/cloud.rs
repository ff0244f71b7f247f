//! The cloud receiver (`tributary-cloud`): accepts gateways over QUIC (mutual TLS, the claimed
//! site checked against the certificate), decides where each partition resumes from the central
//! cluster's own last record (its provenance headers), pulls batches with per-partition credit,
//! writes every record with librdkafka's idempotent producer into `{site}.{topic}`, records gaps,
//! and tells the gateway what is safely stored. A second connection of a site replaces the first
//! only after the first's writes are all acknowledged, so resuming never duplicates. Gateways'
//! committed consumer-group offsets are translated exactly (an index per partition from source to
//! remote offsets, built from the delivery reports) and written as MirrorMaker 2 checkpoints into
//! `{site}.checkpoints.internal` once the data below them is stored, never before. A compacted
//! gateway topic's remote topic is created with its compaction settings. Every mirrored topic's
//! own settings (protocol version 4) are kept in `{site}.topics.internal` for a restore, never
//! applied to the remote topic. A replacement gateway's restore (protocol version 3) is served by
//! `cloud/restore.rs`.

use crate::stream::read_control;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::client::DefaultClientContext;
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tributary_log::batch::{decode_records, BatchHeader};
use tributary_log::clock::now_ms;

use crate::checkpoint::{checkpoint_key, checkpoint_value, checkpoints_topic, OffsetIndex, Translation};
use crate::config::{valid_site, CloudConfig, CongestionController};
use crate::core::{Flow, Progress};
use crate::extents::{extent_key, extent_value, extents_topic, Reported};
use crate::overrides::{settings_key, settings_value, topics_topic, Keep, Kept};
use crate::protocol::{
    CommittedOffset, Control, Data, Decoder, PartitionReport, ProtocolError, TopicSettings, OPEN_FRAME_BYTES_MAX,
};
use crate::tls::{self, TlsError};

mod restore;

/// Provenance headers added to every mirrored record.
pub const HEADER_SITE: &str = "tributary.site";
pub const HEADER_TOPIC: &str = "tributary.topic";
pub const HEADER_PARTITION: &str = "tributary.partition";
pub const HEADER_OFFSET: &str = "tributary.offset";

/// Why the receiver, or one site's session, stopped.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    #[error("invalid configuration: {0}")]
    Config(#[from] tributary_log::ConfigError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("QUIC endpoint: {0}")]
    Endpoint(std::io::Error),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream read: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("{0}")]
    Credit(#[from] crate::core::CreditExceeded),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("kafka: {0}")]
    KafkaCode(RDKafkaErrorCode),
    #[error("bad batch from the gateway: {0}")]
    Batch(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("the site's streams would hold {held} bytes here, over site_buffer_bytes_max = {limit}")]
    SiteBuffer { held: u64, limit: u64 },
}

/// Counters of the receiver.
#[derive(Debug, Default)]
pub struct CloudStats {
    pub sites_connected: AtomicU64,
    pub sessions: AtomicU64,
    pub sessions_refused: AtomicU64,
    pub records_written: AtomicU64,
    pub batch_bytes_received: AtomicU64,
    pub duplicates_skipped: AtomicU64,
    pub gaps_recorded: AtomicU64,
    /// Bytes the sites' data streams hold now (received frames and their decompressed records;
    /// each site within `site_buffer_bytes_max`).
    pub buffered_bytes: AtomicU64,
    /// MirrorMaker 2 checkpoints acknowledged by the central cluster.
    pub checkpoints_written: AtomicU64,
    /// Edge commits waiting for the data below them to be stored (or for the writer's queue).
    pub checkpoints_pending: AtomicU64,
    /// Edge commits that could not be translated (below what the offset index holds) or were
    /// dropped (a partition not mirrored, `checkpoint_groups_per_partition_max` reached).
    pub checkpoints_untranslatable: AtomicU64,
    pub checkpoints_dropped: AtomicU64,
    /// Checkpoint writes that failed for good (a fatal producer error; not retried).
    pub checkpoint_write_errors: AtomicU64,
    /// Translation lag, edge commit (the gateway's clock) to checkpoint acknowledged (this
    /// receiver's clock): the last, the largest, and the sum for a mean over `checkpoints_written`.
    pub translation_lag_ms_last: AtomicU64,
    pub translation_lag_ms_max: AtomicU64,
    pub translation_lag_ms_sum: AtomicU64,
    /// Translated offsets committed into central consumer groups (`central_commit_enabled`),
    /// commits Kafka refused (an active group there: retried), and offsets dropped over
    /// `central_commit_groups_max`.
    pub central_commits: AtomicU64,
    pub central_commits_refused: AtomicU64,
    pub central_commits_dropped: AtomicU64,
    /// Remote topics that already existed with another `cleanup.policy` than the gateway's
    /// compacted topic (left as they are: a warning names each).
    pub remote_policy_mismatches: AtomicU64,
    /// Compacted topics' settings dropped over `partitions_per_site_max` topics per session.
    pub topic_configs_dropped: AtomicU64,
    /// Restores of gateways being served now (at most `restore_sessions_max`).
    pub restores_active: AtomicU64,
    /// Reported high watermarks acknowledged in `{site}.extents.internal`, and writes of them
    /// that failed for good (the next growth writes again).
    pub extents_written: AtomicU64,
    pub extent_write_errors: AtomicU64,
    /// Topics' own settings (protocol version 4) written into `{site}.topics.internal` (acknowledged),
    /// writes of them that failed for good (the topic's next announcement writes again), and
    /// announcements not kept over `partitions_per_site_max` topics of a site.
    pub topic_settings_written: AtomicU64,
    pub topic_settings_write_errors: AtomicU64,
    pub topic_settings_dropped: AtomicU64,
}

struct SiteEntry {
    id: u64,
    stop: watch::Sender<bool>,
    done: watch::Receiver<bool>,
}

struct Shared {
    cfg: CloudConfig,
    producer: ThreadedProducer<Acknowledger>,
    /// Writes checkpoints (its own delivery reports; `None` when checkpoints are off).
    checkpoints: Option<ThreadedProducer<CheckpointAcks>>,
    /// Writes the internal topics: the gateways' reported high watermarks (`extents.rs`) and
    /// their topics' own settings (`overrides.rs`).
    internal: ThreadedProducer<InternalAcks>,
    /// The topics' own settings written into `{site}.topics.internal` by this process.
    kept: Arc<Mutex<Kept>>,
    /// Translated offsets waiting to go into central consumer groups (`None`: option off).
    central: Option<Arc<CentralCommits>>,
    admin: AdminClient<DefaultClientContext>,
    sites: Mutex<HashMap<String, SiteEntry>>,
    next_id: AtomicU64,
    stats: Arc<CloudStats>,
}

/// A bound receiver.
pub struct CloudServer {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CloudServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudServer").field("listen", &self.endpoint.local_addr().ok()).finish_non_exhaustive()
    }
}

/// The settings of both writers (records and checkpoints): idempotent, `acks=all`, and never
/// giving up on a record, since a record that failed after later ones were written would break
/// order (a session that cannot write ends instead).
fn ordered_producer_config(cfg: &CloudConfig) -> ClientConfig {
    let mut c = kafka_config(cfg);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", cfg.kafka.queue_messages_max.to_string())
        .set("message.timeout.ms", "0");
    c
}

fn kafka_config(cfg: &CloudConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka.bootstrap_servers);
    for (k, v) in &cfg.kafka.properties {
        c.set(k, v);
    }
    c
}

impl CloudServer {
    /// Checks the configuration, loads the certificates, binds the UDP port and creates the
    /// Kafka clients.
    pub fn bind(cfg: CloudConfig) -> Result<Self, CloudError> {
        cfg.validate()?;
        let transport = tls::transport(
            Duration::from_millis(cfg.keep_alive_ms),
            Duration::from_millis(cfg.idle_timeout_ms),
            cfg.partitions_per_site_max + 4,
            // The receiver sends little (credit, progress, acknowledgements): quinn's default.
            CongestionController::Cubic,
        )?;
        let server = tls::server_config(&cfg.ca_file, &cfg.cert_file, &cfg.key_file, transport)?;
        // A reset key kept across restarts (see `tls::endpoint_config`), so a restarted receiver
        // ends the gateways' old connections at their next packet.
        let socket = std::net::UdpSocket::bind(cfg.listen).map_err(CloudError::Endpoint)?;
        let endpoint = quinn::Endpoint::new(
            tls::endpoint_config(&cfg.key_file)?,
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(CloudError::Endpoint)?;
        let producer = ThreadedProducer::from_config_and_context(&ordered_producer_config(&cfg), Acknowledger)?;
        let admin: AdminClient<DefaultClientContext> = kafka_config(&cfg).create()?;
        let stats = Arc::new(CloudStats::default());
        let central = (cfg.checkpoints_enabled && cfg.central_commit_enabled).then(|| {
            Arc::new(CentralCommits {
                pending: Mutex::new(BTreeMap::new()),
                groups_max: cfg.central_commit_groups_max as usize,
                stats: stats.clone(),
            })
        });
        let checkpoints = if cfg.checkpoints_enabled {
            // As for records, a checkpoint is never abandoned, so a newer one can never be
            // overtaken by the retry of an older one (the topic is compacted: the last written
            // wins).
            Some(ThreadedProducer::from_config_and_context(
                &ordered_producer_config(&cfg),
                CheckpointAcks { stats: stats.clone(), central: central.clone() },
            )?)
        } else {
            None
        };
        let kept = Arc::new(Mutex::new(Kept::default()));
        let internal = ThreadedProducer::from_config_and_context(
            &ordered_producer_config(&cfg),
            InternalAcks { stats: stats.clone(), kept: kept.clone() },
        )?;
        let shared = Arc::new(Shared {
            cfg,
            producer,
            checkpoints,
            internal,
            kept,
            central,
            admin,
            sites: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            stats,
        });
        Ok(Self { endpoint, shared })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    pub fn stats(&self) -> Arc<CloudStats> {
        self.shared.stats.clone()
    }

    /// Serves gateways until `shutdown` resolves.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut sessions = JoinSet::new();
        let committer = self.shared.central.clone().map(|central| {
            let cfg = self.shared.cfg.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(cfg.central_commit_interval_ms));
                loop {
                    tick.tick().await;
                    let (central, cfg) = (central.clone(), cfg.clone());
                    if tokio::task::spawn_blocking(move || central.commit_round(&cfg)).await.is_err() {
                        tracing::error!("central group commit task failed");
                    }
                }
            })
        });
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let shared = self.shared.clone();
                    sessions.spawn(async move {
                        let remote = incoming.remote_address();
                        match incoming.await {
                            Ok(conn) => {
                                if let Err(e) = serve_site(&shared, &conn).await {
                                    tracing::warn!(%remote, error = %e, "gateway session ended");
                                    conn.close(1u32.into(), e.to_string().as_bytes());
                                }
                            }
                            Err(e) => tracing::info!(%remote, error = %e, "gateway handshake failed"),
                        }
                    });
                }
                Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            }
        }
        // Stop every site and let their writes finish.
        let stops: Vec<watch::Sender<bool>> =
            self.shared.sites.lock().unwrap_or_else(PoisonError::into_inner).values().map(|s| s.stop.clone()).collect();
        for s in stops {
            let _ = s.send(true);
        }
        while sessions.join_next().await.is_some() {}
        if let Some(c) = committer {
            c.abort();
        }
        self.endpoint.close(0u32.into(), b"receiver stopping");
        self.endpoint.wait_idle().await;
    }
}

/// One gateway connection: identify, take over the site, stream.
async fn serve_site(shared: &Arc<Shared>, conn: &quinn::Connection) -> Result<(), CloudError> {
    let (mut send, mut recv) = conn.accept_bi().await?;
    let mut decoder = Decoder::new(1 << 20);
    let mut buf = vec![0u8; 16 * 1024];
    let hello =
        tokio::time::timeout(Duration::from_secs(10), read_control::<CloudError>(&mut recv, &mut decoder, &mut buf))
            .await
            .map_err(|_| CloudError::Timeout("hello"))??;
    // A restore (version 3) says so in its first frame, and is checked like a mirror session.
    let v3 = crate::protocol::alpn_version(tls::negotiated_alpn(conn).as_deref()) >= 3;
    let (site, restoring) = match hello {
        Some(Control::Hello { site }) => (site, false),
        Some(Control::RestoreHello { site }) if v3 => (site, true),
        _ => return Err(ProtocolError::Unexpected("first").into()),
    };
    // The site id keys the session and names the remote topics: only its one canonical form
    // (the site-id rule), and only exactly as the certificate names it.
    let checked = if valid_site(&site) {
        tls::check_site(conn, &site).map_err(CloudError::from)
    } else {
        Err(CloudError::Refused(format!(
            "site id {site:?} is not a lowercase DNS label (letters a-z, digits and '-', at most 63)"
        )))
    };
    if let Err(e) = checked {
        shared.stats.sessions_refused.fetch_add(1, Ordering::Relaxed);
        let _ = send.write_all(&Control::Refused { reason: e.to_string() }.encode()).await;
        let _ = send.finish();
        return Err(e);
    }
    if restoring {
        // A restore reads the central cluster only: it does not replace the site's session.
        return restore::serve(shared, conn, site, send, recv, decoder).await;
    }
    // One session per site: a new connection replaces the old one once the old one's writes
    // are acknowledged (it resumes from what the central cluster then holds).
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, done_rx) = watch::channel(false);
    let previous = {
        let mut sites = shared.sites.lock().unwrap_or_else(PoisonError::into_inner);
        if !sites.contains_key(&site) && sites.len() >= shared.cfg.sites_max as usize {
            Err(format!("sites_max = {} reached", shared.cfg.sites_max))
        } else {
            Ok(sites.insert(site.clone(), SiteEntry { id, stop: stop_tx, done: done_rx }))
        }
    };
    let previous = match previous {
        Ok(p) => p,
        Err(reason) => {
            let _ = send.write_all(&Control::Refused { reason: reason.clone() }.encode()).await;
            return Err(CloudError::Refused(reason));
        }
    };
    if let Some(old) = previous {
        tracing::info!(%site, "a new connection replaces the site's session");
        let _ = old.stop.send(true);
        let mut done = old.done;
        let wait = Duration::from_millis(shared.cfg.kafka.request_timeout_ms);
        if tokio::time::timeout(wait, done.wait_for(|d| *d)).await.is_err() {
            tracing::error!(%site, "the replaced session's writes are not acknowledged yet: resuming anyway");
        }
    }
    shared.stats.sessions.fetch_add(1, Ordering::Relaxed);
    shared.stats.sites_connected.fetch_add(1, Ordering::Relaxed);
    tracing::info!(%site, remote = %conn.remote_address(), "gateway connected");
    let result = Session::new(shared.clone(), site.clone(), conn.clone()).run(send, recv, decoder, stop_rx).await;
    shared.stats.sites_connected.fetch_sub(1, Ordering::Relaxed);
    let _ = done_tx.send(true);
    let mut sites = shared.sites.lock().unwrap_or_else(PoisonError::into_inner);
    if sites.get(&site).is_some_and(|e| e.id == id) {
        sites.remove(&site);
    }
    result
}

/// One partition of a session: where it stands, its credit, its remote topic, and the central
/// cluster's acknowledgements of what was written for it.
struct Link {
    remote: String,
    start: i64,
    flow: Mutex<Flow>,
    progress: Mutex<Progress>,
    acks: Mutex<Acks>,
    /// Wakes the stream task when units are settled or a write failed.
    settled: Notify,
    /// The session's "credit to give back" wake-up.
    credit_due: Arc<Notify>,
    /// Source to remote offsets of what is stored (updated with `progress`, in unit order).
    index: Mutex<OffsetIndex>,
    /// Edge commits waiting to be translated: group -> (offset, commit time), the latest per
    /// group, at most `checkpoint_groups_per_partition_max`.
    commits: Mutex<BTreeMap<String, (i64, i64)>>,
}

/// Where a unit's records landed: their source offsets (runs of consecutive offsets, in the
/// order handed over) and the remote offsets the delivery reports gave them.
#[derive(Debug, Clone, Default)]
struct Landed {
    sources: Vec<(i64, i64)>,
    records: i64,
    remote_min: i64,
    remote_max: i64,
}

impl Landed {
    /// Adds the unit's records to the index: in order, one remote offset each when the reports
    /// say they landed next to each other (one writer per remote partition, librdkafka's
    /// idempotent producer keeping order), else the index forgets what lies below.
    fn apply(&self, index: &mut OffsetIndex, next_source: i64) {
        if self.records == 0 {
            return;
        }
        if self.remote_max - self.remote_min + 1 != self.records {
            tracing::warn!(
                remote_min = self.remote_min,
                remote_max = self.remote_max,
                records = self.records,
                "records of one batch did not land next to each other: offsets below are no longer translated"
            );
            index.forget_below(next_source, self.remote_max + 1);
            return;
        }
        let mut remote = self.remote_min;
        for &(source, len) in &self.sources {
            index.push_run(source, remote, len);
            remote += len;
        }
    }
}

/// Units (a received batch, or a gap marker) of one partition, numbered in the order they were
/// handed to librdkafka and applied to progress and credit in that order, each once all its
/// records are acknowledged. Deliveries come back in order within a remote partition, but a gap
/// record goes to the gaps topic: the numbering keeps progress from passing it early.
#[derive(Debug, Default)]
struct Acks {
    next_unit: u64,
    applied: u64,
    /// Acknowledged units above `applied`: (next offset, credit bytes, where the records landed).
    done: BTreeMap<u64, (i64, u64, Landed)>,
    failed: Option<String>,
}

impl Link {
    /// A new unit whose records are about to be handed to librdkafka.
    fn unit(self: &Arc<Self>, next: i64, credit: u64, sources: Vec<(i64, i64)>) -> Arc<Unit> {
        let seq = {
            let mut acks = self.acks.lock().unwrap_or_else(PoisonError::into_inner);
            acks.next_unit += 1;
            acks.next_unit - 1
        };
        // One count for the sender (see `Handing`): a unit cannot settle while its records are
        // still being handed over.
        Arc::new(Unit {
            link: self.clone(),
            seq,
            next,
            credit,
            waiting: AtomicU64::new(1),
            sources,
            remote_min: AtomicI64::new(i64::MAX),
            remote_max: AtomicI64::new(-1),
        })
    }

    /// A unit's records are all acknowledged: apply every settled unit in order.
    fn settle(&self, seq: u64, next: i64, credit: u64, landed: Landed) {
        let mut due = false;
        {
            let mut acks = self.acks.lock().unwrap_or_else(PoisonError::into_inner);
            acks.done.insert(seq, (next, credit, landed));
            loop {
                let applied = acks.applied;
                let Some((next, credit, landed)) = acks.done.remove(&applied) else { break };
                acks.applied += 1;
                // The index before progress: a translation that sees the progress sees the
                // records it covers.
                landed.apply(&mut self.index.lock().unwrap_or_else(PoisonError::into_inner), next);
                self.progress.lock().unwrap_or_else(PoisonError::into_inner).on_stored(next);
                let mut flow = self.flow.lock().unwrap_or_else(PoisonError::into_inner);
                flow.on_stored(credit);
                due |= flow.credit_due();
            }
        }
        if due {
            self.credit_due.notify_one();
        }
        self.settled.notify_waiters();
    }

    fn fail(&self, error: String) {
        self.acks.lock().unwrap_or_else(PoisonError::into_inner).failed.get_or_insert(error);
        self.settled.notify_waiters();
    }

    /// A write of this partition failed: the session ends (later records must not pass it).
    fn check(&self) -> Result<(), CloudError> {
        match &self.acks.lock().unwrap_or_else(PoisonError::into_inner).failed {
            Some(e) => Err(CloudError::Refused(format!("write to the central cluster failed: {e}"))),
            None => Ok(()),
        }
    }

    /// Waits until every unit handed over is acknowledged (or a write failed).
    async fn all_settled(&self) -> Result<(), CloudError> {
        loop {
            let settled = self.settled.notified();
            {
                let acks = self.acks.lock().unwrap_or_else(PoisonError::into_inner);
                if acks.failed.is_some() || acks.applied == acks.next_unit {
                    break;
                }
            }
            settled.await;
        }
        self.check()
    }
}

/// What each record handed to librdkafka carries to its delivery report: its unit.
struct Unit {
    link: Arc<Link>,
    seq: u64,
    next: i64,
    credit: u64,
    /// Records not yet acknowledged, plus one while the sender is still handing them over.
    waiting: AtomicU64,
    /// Source offsets of its records, runs of (first, count) in the order handed over.
    sources: Vec<(i64, i64)>,
    /// Remote offsets the delivery reports gave its records.
    remote_min: AtomicI64,
    remote_max: AtomicI64,
}

impl Unit {
    /// One of its records is stored at remote offset `offset`.
    fn delivered(&self, offset: i64) {
        self.remote_min.fetch_min(offset, Ordering::AcqRel);
        self.remote_max.fetch_max(offset, Ordering::AcqRel);
        self.acked();
    }

    fn acked(&self) {
        if self.waiting.fetch_sub(1, Ordering::AcqRel) == 1 {
            let records = self.sources.iter().map(|(_, n)| n).sum();
            let landed = Landed {
                sources: self.sources.clone(),
                records,
                remote_min: self.remote_min.load(Ordering::Acquire),
                remote_max: self.remote_max.load(Ordering::Acquire),
            };
            self.link.settle(self.seq, self.next, self.credit, landed);
        }
    }
}

/// The sender's count on a unit, given back when every record is handed over (or the sender
/// stopped halfway, on an error), so the unit can settle.
struct Handing(Arc<Unit>);

impl Drop for Handing {
    fn drop(&mut self) {
        self.0.acked();
    }
}

/// librdkafka's delivery reports (on its polling thread), counted against their units: no
/// future, channel or task per record.
struct Acknowledger;

impl ClientContext for Acknowledger {}

impl ProducerContext for Acknowledger {
    type DeliveryOpaque = Arc<Unit>;

    fn delivery(&self, result: &DeliveryResult<'_>, unit: Arc<Unit>) {
        match result {
            Ok(m) => unit.delivered(m.offset()),
            Err((e, _)) => unit.link.fail(e.to_string()),
        }
    }
}

/// A record of an internal topic handed to librdkafka.
enum InternalWrite {
    /// A reported high watermark (`{site}.extents.internal`).
    Extent,
    /// A topic's own settings (`{site}.topics.internal`).
    Settings { site: String, topic: String },
}

/// The internal topics writer's delivery reports: counted; a failure (fatal only: no message
/// timeout) logged, and a topic's settings that failed are written again at its next announcement.
struct InternalAcks {
    stats: Arc<CloudStats>,
    kept: Arc<Mutex<Kept>>,
}

impl ClientContext for InternalAcks {}

impl ProducerContext for InternalAcks {
    type DeliveryOpaque = Box<InternalWrite>;

    fn delivery(&self, result: &DeliveryResult<'_>, what: Box<InternalWrite>) {
        match (result, *what) {
            (Ok(_), InternalWrite::Extent) => {
                self.stats.extents_written.fetch_add(1, Ordering::Relaxed);
            }
            (Ok(_), InternalWrite::Settings { .. }) => {
                self.stats.topic_settings_written.fetch_add(1, Ordering::Relaxed);
            }
            (Err((e, _)), InternalWrite::Extent) => {
                self.stats.extent_write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "reported high watermark write failed");
            }
            (Err((e, _)), InternalWrite::Settings { site, topic }) => {
                self.stats.topic_settings_write_errors.fetch_add(1, Ordering::Relaxed);
                self.kept.lock().unwrap_or_else(PoisonError::into_inner).forget(&site, &topic);
                tracing::error!(%site, %topic, error = %e, "topic settings write failed");
            }
        }
    }
}

/// A checkpoint handed to librdkafka: what its delivery report needs.
struct CheckpointSent {
    group: String,
    offset: i64,
    commit_time_ms: i64,
    /// Where it goes in the central cluster's groups (`central_commit_enabled`): the central
    /// group, the remote topic and partition, the translated offset.
    central: Option<(String, String, i32, i64)>,
}

/// The checkpoint writer's delivery reports: counted, the lag measured. With no message timeout
/// only a fatal error (authorisation, a deleted topic) fails one: counted and logged, not retried
/// (the gateway sends the group's offset again with its next commit and at its next session).
struct CheckpointAcks {
    stats: Arc<CloudStats>,
    central: Option<Arc<CentralCommits>>,
}

impl ClientContext for CheckpointAcks {}

impl ProducerContext for CheckpointAcks {
    type DeliveryOpaque = Box<CheckpointSent>;

    fn delivery(&self, result: &DeliveryResult<'_>, sent: Box<CheckpointSent>) {
        match result {
            Ok(_) => {
                let lag = (now_ms() - sent.commit_time_ms).max(0) as u64;
                self.stats.checkpoints_written.fetch_add(1, Ordering::Relaxed);
                self.stats.translation_lag_ms_last.store(lag, Ordering::Relaxed);
                self.stats.translation_lag_ms_max.fetch_max(lag, Ordering::Relaxed);
                self.stats.translation_lag_ms_sum.fetch_add(lag, Ordering::Relaxed);
                if let (Some(central), Some((group, topic, partition, offset))) = (&self.central, sent.central) {
                    central.offer(group, topic, partition, offset);
                }
            }
            Err((e, _)) => {
                self.stats.checkpoint_write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(group = %sent.group, offset = sent.offset, error = %e, "checkpoint write failed");
            }
        }
    }
}

type Links = Arc<Mutex<HashMap<(String, i32), Arc<Link>>>>;

struct Session {
    shared: Arc<Shared>,
    site: String,
    conn: quinn::Connection,
    links: Links,
    /// Remote topics known to exist with enough partitions.
    ready_topics: HashMap<String, i32>,
    /// Remote topics this session created: empty, so no tail to read for a resume point.
    created_topics: HashSet<String>,
    /// A partition has a quarter window of credit to give back.
    credit_due: Arc<Notify>,
    /// What the site's data streams hold here, within `site_buffer_bytes_max`.
    buffer: Arc<SiteBuffer>,
    /// The protocol version of the session (2: committed offsets, compacted topics' settings;
    /// 4: topics' own settings).
    version: u8,
    /// Compacted topics' settings from the gateway (`TopicConfigs`, version 2), by source topic;
    /// at most `partitions_per_site_max` topics.
    topic_configs: HashMap<String, Vec<(String, String)>>,
    /// The high watermarks the gateway reported, to keep in `{site}.extents.internal`.
    reported: Reported,
}

impl Session {
    fn new(shared: Arc<Shared>, site: String, conn: quinn::Connection) -> Self {
        let buffer = Arc::new(SiteBuffer::new(shared.cfg.site_buffer_bytes_max, shared.stats.clone()));
        // Version 3 adds only restore frames: a mirror session of version 3 is one of version 2
        // (and one of version 4 takes no restore frame either: they end it as unexpected).
        let version = match crate::protocol::alpn_version(tls::negotiated_alpn(&conn).as_deref()) {
            4 => 4,
            v => v.min(2),
        };
        let reported = Reported::new(
            shared.cfg.partitions_per_site_max as usize,
            Duration::from_millis(shared.cfg.mirrored_report_interval_ms),
        );
        Self {
            version,
            reported,
            topic_configs: HashMap::new(),
            shared,
            site,
            conn,
            links: Arc::new(Mutex::new(HashMap::new())),
            ready_topics: HashMap::new(),
            created_topics: HashSet::new(),
            credit_due: Arc::new(Notify::new()),
            buffer,
        }
    }

    async fn run(
        mut self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        mut decoder: Decoder,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), CloudError> {
        let mut streams: JoinSet<Result<(), CloudError>> = JoinSet::new();
        let interval = Duration::from_millis(self.shared.cfg.mirrored_report_interval_ms);
        let mut tick = tokio::time::interval(interval);
        let mut buf = vec![0u8; 16 * 1024];
        let result = loop {
            tokio::select! {
                _ = stop.changed() => break Ok(()),
                frame = read_control::<CloudError>(&mut recv, &mut decoder, &mut buf) => {
                    match frame {
                        Ok(Some(Control::Partitions(list))) => {
                            let reports = list.clone();
                            if let Err(e) = self.start_partitions(&mut send, list).await {
                                break Err(e);
                            }
                            // Kept for the partitions mirrored (their links exist now).
                            let links = self.links.clone();
                            self.reported.on_report(&reports, |t, p| {
                                links.lock().unwrap_or_else(PoisonError::into_inner).contains_key(&(t.to_string(), p))
                            });
                            if let Err(e) = self.write_extents().await {
                                break Err(e);
                            }
                        }
                        Ok(Some(f)) if f.version() > self.version => {
                            tracing::debug!(?f, version = self.version, "frame of a later protocol version");
                            break Err(ProtocolError::Unexpected("later-version").into());
                        }
                        Ok(Some(Control::TopicConfigs(list))) => self.on_topic_configs(list),
                        Ok(Some(Control::TopicOverrides(list))) => {
                            if let Err(e) = self.on_topic_overrides(list).await {
                                break Err(e);
                            }
                        }
                        Ok(Some(Control::Offsets(list))) => {
                            self.on_commits(list);
                            if let Err(e) = self.flush_checkpoints().await {
                                break Err(e);
                            }
                        }
                        Ok(Some(other)) => {
                            tracing::debug!(?other, "unexpected control frame");
                            break Err(ProtocolError::Unexpected("cloud-side").into());
                        }
                        Ok(None) => break Ok(()),
                        Err(e) => break Err(e),
                    }
                }
                uni = self.conn.accept_uni() => {
                    match uni {
                        Ok(stream) => {
                            let task = StreamTask {
                                shared: self.shared.clone(),
                                site: self.site.clone(),
                                links: self.links.clone(),
                                buffer: self.buffer.clone(),
                            };
                            streams.spawn(task.run(stream));
                        }
                        Err(e) => break Err(e.into()),
                    }
                }
                Some(done) = streams.join_next(), if !streams.is_empty() => {
                    match done {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => break Err(e),
                        Err(e) => break Err(CloudError::Refused(format!("stream task failed: {e}"))),
                    }
                }
                () = self.credit_due.notified() => {
                    if let Err(e) = self.send_updates(&mut send, false).await {
                        break Err(e);
                    }
                }
                _ = tick.tick() => {
                    if let Err(e) = self.send_updates(&mut send, true).await {
                        break Err(e);
                    }
                    if let Err(e) = self.flush_checkpoints().await {
                        break Err(e);
                    }
                    if let Err(e) = self.write_extents().await {
                        break Err(e);
                    }
                }
            }
        };
        // Writes already handed to librdkafka finish (each stream task waits for its records)
        // before this session counts as done; then the last progress goes to the gateway.
        match &result {
            Ok(()) => self.conn.close(0u32.into(), b"session ended"),
            Err(e) => self.conn.close(1u32.into(), e.to_string().as_bytes()),
        }
        while streams.join_next().await.is_some() {}
        let _ = self.send_updates(&mut send, true).await;
        // Commits whose data is now stored are written; the rest wait for the gateway's next
        // session (it sends every commit again).
        let _ = self.flush_checkpoints().await;
        let links: Vec<Arc<Link>> =
            self.links.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect();
        for link in links {
            let left = std::mem::take(&mut *link.commits.lock().unwrap_or_else(PoisonError::into_inner)).len();
            self.shared.stats.checkpoints_pending.fetch_sub(left as u64, Ordering::Relaxed);
        }
        result
    }

    /// A gateway's compacted topics' settings: kept for the remote topics this session creates.
    fn on_topic_configs(&mut self, list: Vec<TopicSettings>) {
        let max = self.shared.cfg.partitions_per_site_max as usize;
        for t in list {
            if !self.topic_configs.contains_key(&t.topic) && self.topic_configs.len() >= max {
                self.shared.stats.topic_configs_dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(site = %self.site, topic = %t.topic,
                    "partitions_per_site_max topics reached: topic settings not kept");
                continue;
            }
            self.topic_configs.insert(t.topic, t.configs);
        }
    }

    /// A gateway's topics' own settings (version 4): kept in `{site}.topics.internal` for a
    /// restore, each topic's record written only when its settings changed. Never applied to the
    /// remote topic (how long the centre keeps data, and how, is the central cluster owners'
    /// choice).
    async fn on_topic_overrides(&mut self, list: Vec<TopicSettings>) -> Result<(), CloudError> {
        let topic = topics_topic(&self.site);
        let mut due = Vec::new();
        {
            let max = self.shared.cfg.partitions_per_site_max as usize;
            let mut kept = self.shared.kept.lock().unwrap_or_else(PoisonError::into_inner);
            for t in list {
                match kept.offer(&self.site, &t.topic, &t.configs, max) {
                    Keep::Write => due.push(t),
                    Keep::Unchanged => {}
                    Keep::Full => {
                        self.shared.stats.topic_settings_dropped.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(site = %self.site, topic = %t.topic,
                            "partitions_per_site_max topics reached: topic's own settings not kept");
                    }
                }
            }
        }
        if due.is_empty() {
            return Ok(());
        }
        // As MirrorMaker 2's internal topics: one partition, compacted (the latest per topic).
        self.ensure_topic(&topic, 1, &[("cleanup.policy", "compact")]).await?;
        for t in due {
            let key = settings_key(&t.topic);
            let value = settings_value(&t.configs);
            let what = InternalWrite::Settings { site: self.site.clone(), topic: t.topic.clone() };
            self.send_internal(&topic, &key, &value, what).await?;
            tracing::info!(site = %self.site, topic = %t.topic, settings = ?t.configs, "topic's own settings kept");
        }
        Ok(())
    }

    /// A gateway's committed offsets: each waits in its partition's link (the latest per group).
    fn on_commits(&self, list: Vec<CommittedOffset>) {
        let stats = &self.shared.stats;
        if self.shared.checkpoints.is_none() {
            return;
        }
        let max = self.shared.cfg.checkpoint_groups_per_partition_max as usize;
        for c in list {
            let link =
                self.links.lock().unwrap_or_else(PoisonError::into_inner).get(&(c.topic.clone(), c.partition)).cloned();
            let Some(link) = link else {
                stats.checkpoints_dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(site = %self.site, topic = %c.topic, partition = c.partition,
                    "committed offset of a partition not mirrored in this session: ignored");
                continue;
            };
            let mut commits = link.commits.lock().unwrap_or_else(PoisonError::into_inner);
            let full = commits.len() >= max;
            match commits.get_mut(&c.group) {
                Some(v) => *v = (c.offset, c.commit_time_ms),
                None if full => {
                    stats.checkpoints_dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(site = %self.site, group = %c.group, topic = %c.topic, partition = c.partition,
                        "checkpoint_groups_per_partition_max reached: commit not translated");
                }
                None => {
                    commits.insert(c.group, (c.offset, c.commit_time_ms));
                    stats.checkpoints_pending.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// The session's partition links as they are now (the lock is not held across an await).
    fn links_now(&self) -> Vec<((String, i32), Arc<Link>)> {
        self.links.lock().unwrap_or_else(PoisonError::into_inner).iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Writes a checkpoint for every waiting commit whose data is stored in the central cluster
    /// (never one ahead of it: see `checkpoint.rs`).
    async fn flush_checkpoints(&self) -> Result<(), CloudError> {
        let Some(producer) = &self.shared.checkpoints else { return Ok(()) };
        let stats = &self.shared.stats;
        let topic = checkpoints_topic(&self.site);
        let links = self.links_now();
        for ((source_topic, partition), link) in links {
            let ready: Vec<(String, i64, i64, i64)> = {
                let mut commits = link.commits.lock().unwrap_or_else(PoisonError::into_inner);
                if commits.is_empty() {
                    continue;
                }
                // Progress is read under the index lock: `settle` updates the index first.
                let index = link.index.lock().unwrap_or_else(PoisonError::into_inner);
                let stored = link.progress.lock().unwrap_or_else(PoisonError::into_inner).stored();
                let mut ready = Vec::new();
                let before = commits.len();
                commits.retain(|group, &mut (offset, at)| match index.translate(offset, stored) {
                    Translation::Ready(remote) => {
                        ready.push((group.clone(), offset, remote, at));
                        false
                    }
                    Translation::Wait => true,
                    Translation::Unknown => {
                        stats.checkpoints_untranslatable.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(site = %self.site, %group, topic = %source_topic, partition, offset,
                            "committed offset below what the offset index holds: no checkpoint");
                        false
                    }
                });
                stats.checkpoints_pending.fetch_sub((before - commits.len()) as u64, Ordering::Relaxed);
                ready
            };
            for (group, offset, remote, at) in ready {
                let key = checkpoint_key(&group, &link.remote, partition);
                let value = checkpoint_value(offset, remote, "");
                let central = self.shared.central.as_ref().map(|_| {
                    (self.shared.cfg.central_group(&self.site, &group), link.remote.clone(), partition, remote)
                });
                let sent = Box::new(CheckpointSent { group: group.clone(), offset, commit_time_ms: at, central });
                let mut record: BaseRecord<'_, [u8], [u8], Box<CheckpointSent>> =
                    BaseRecord::with_opaque_to(&topic, sent).partition(0).key(&key[..]).payload(&value[..]);
                loop {
                    match producer.send(record) {
                        Ok(()) => break,
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                            record = r;
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        Err((e, _)) => return Err(e.into()),
                    }
                }
                tracing::debug!(site = %self.site, %group, topic = %source_topic, partition, offset, remote,
                    "checkpoint written");
            }
        }
        Ok(())
    }

    /// Writes the reported high watermarks that grew (at most once per report interval each) into
    /// `{site}.extents.internal`; a restore lists the highest of each partition.
    async fn write_extents(&mut self) -> Result<(), CloudError> {
        let topic = extents_topic(&self.site);
        for (source, partition, high) in self.reported.due(Instant::now()) {
            let key = extent_key(&source, partition);
            let value = extent_value(high);
            self.send_internal(&topic, &key, &value, InternalWrite::Extent).await?;
            tracing::debug!(site = %self.site, topic = %source, partition, high, "reported high watermark written");
        }
        Ok(())
    }

    /// Queues one record for partition 0 of an internal topic (`{site}.extents.internal`,
    /// `{site}.topics.internal`) on the internal producer, waiting while its queue is full;
    /// `what` comes back with the delivery report.
    async fn send_internal(
        &self,
        topic: &str,
        key: &[u8],
        value: &[u8],
        what: InternalWrite,
    ) -> Result<(), CloudError> {
        let mut record: BaseRecord<'_, [u8], [u8], Box<InternalWrite>> =
            BaseRecord::with_opaque_to(topic, Box::new(what)).partition(0).key(key).payload(value);
        loop {
            match self.shared.internal.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }

    /// Credit due and progress to report.
    async fn send_updates(&self, send: &mut quinn::SendStream, tick: bool) -> Result<(), CloudError> {
        let links = self.links_now();
        let now = Instant::now();
        let mut out = Vec::new();
        for ((topic, partition), link) in links {
            if let Some(bytes) = link.flow.lock().unwrap_or_else(PoisonError::into_inner).take_credit(tick) {
                out.extend_from_slice(&Control::Credit { topic: topic.clone(), partition, bytes }.encode());
            }
            if tick {
                if let Some(offset) = link.progress.lock().unwrap_or_else(PoisonError::into_inner).take_report(now) {
                    out.extend_from_slice(&Control::Mirrored { topic, partition, offset }.encode());
                }
            }
        }
        if !out.is_empty() {
            send.write_all(&out).await?;
        }
        Ok(())
    }

    /// New partitions: remote topics ready, resume points from the central cluster (read for
    /// all of them at once, with one consumer), then Start and the first credit of each.
    async fn start_partitions(
        &mut self,
        send: &mut quinn::SendStream,
        list: Vec<PartitionReport>,
    ) -> Result<(), CloudError> {
        let mut new = Vec::new();
        {
            let links = self.links.lock().unwrap_or_else(PoisonError::into_inner);
            for p in list {
                if links.contains_key(&(p.topic.clone(), p.partition))
                    || new
                        .iter()
                        .any(|(q, _): &(PartitionReport, String)| q.topic == p.topic && q.partition == p.partition)
                {
                    continue;
                }
                if links.len() + new.len() >= self.shared.cfg.partitions_per_site_max as usize {
                    tracing::warn!(site = %self.site, topic = %p.topic, partition = p.partition,
                        "partitions_per_site_max reached: partition not mirrored");
                    continue;
                }
                let remote = self.shared.cfg.remote_topic(&self.site, &p.topic);
                new.push((p, remote));
            }
        }
        if new.is_empty() {
            return Ok(());
        }
        // The gaps topic too, with the same settings: a cluster's auto-creation (if it is on at
        // all) would give it the cluster's defaults, often one replica.
        let gaps = self.shared.cfg.gaps_topic.clone();
        self.ensure_topic(&gaps, 1, &[]).await?;
        if self.version >= 2 && self.shared.checkpoints.is_some() {
            // As MirrorMaker 2 creates it: one partition (MirrorClient reads partition 0),
            // compacted (the latest checkpoint per group and partition).
            self.ensure_topic(&checkpoints_topic(&self.site), 1, &[("cleanup.policy", "compact")]).await?;
        }
        // The reported high watermarks: one partition, compacted (the latest per partition; a
        // restore reads the highest of what is left).
        self.ensure_topic(&extents_topic(&self.site), 1, &[("cleanup.policy", "compact")]).await?;
        for (p, remote) in &new {
            // A compacted gateway topic's remote copy is created compacted, with its settings.
            let configs = self.topic_configs.get(&p.topic).cloned().unwrap_or_default();
            let extra: Vec<(&str, &str)> = configs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            self.ensure_topic(remote, p.partitions, &extra).await?;
        }
        let wanted: Vec<(String, i32, String)> =
            new.iter().map(|(p, remote)| (remote.clone(), p.partition, p.topic.clone())).collect();
        let (cfg, site, created) = (self.shared.cfg.clone(), self.site.clone(), self.created_topics.clone());
        let resumes = tokio::task::spawn_blocking(move || last_mirrored(&cfg, &site, &wanted, &created))
            .await
            .map_err(|e| CloudError::Refused(format!("resume task: {e}")))??;
        let mut frames = Vec::new();
        for ((p, remote), resume) in new.into_iter().zip(resumes) {
            // Nothing of this partition in the central cluster: from the beginning (a gateway
            // whose log no longer starts at 0 reports the missing part as a gap).
            let start = resume.next.unwrap_or(0);
            let mut index = OffsetIndex::new(self.shared.cfg.checkpoint_index_runs_max as usize);
            if !resume.tail.is_empty() {
                // This site's records in the tail read: commits from the first of them on
                // translate exactly.
                for &(source, remote) in &resume.tail {
                    index.push(source, remote);
                }
            } else if resume.empty {
                index.seed(start, resume.high);
            }
            tracing::info!(site = %self.site, topic = %p.topic, partition = p.partition, %remote, start,
                "partition mirror starts");
            let flow = Flow::new(self.shared.cfg.partition_credit_bytes, self.shared.cfg.frame_bytes_max);
            let credit = flow.initial_credit();
            let interval = Duration::from_millis(self.shared.cfg.mirrored_report_interval_ms);
            let link = Link {
                remote,
                start,
                flow: Mutex::new(flow),
                progress: Mutex::new(Progress::new(start, interval)),
                acks: Mutex::new(Acks::default()),
                settled: Notify::new(),
                credit_due: self.credit_due.clone(),
                index: Mutex::new(index),
                commits: Mutex::new(BTreeMap::new()),
            };
            self.links
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert((p.topic.clone(), p.partition), Arc::new(link));
            frames.extend_from_slice(
                &Control::Start { topic: p.topic.clone(), partition: p.partition, offset: start }.encode(),
            );
            frames
                .extend_from_slice(&Control::Credit { topic: p.topic, partition: p.partition, bytes: credit }.encode());
        }
        send.write_all(&frames).await?;
        Ok(())
    }

    /// Creates the remote topic with at least `partitions` partitions (`extra`: topic configs
    /// beside `kafka.topic_config`, winning over it for the keys both name). A topic that existed
    /// is not altered: if `extra` names a `cleanup.policy` it does not have, a warning says so
    /// and `remote_policy_mismatches` counts it.
    async fn ensure_topic(&mut self, remote: &str, partitions: i32, extra: &[(&str, &str)]) -> Result<(), CloudError> {
        if self.ready_topics.get(remote).is_some_and(|n| *n >= partitions) {
            return Ok(());
        }
        let timeout = Duration::from_millis(self.shared.cfg.kafka.request_timeout_ms);
        let opts = AdminOptions::new().request_timeout(Some(timeout)).operation_timeout(Some(timeout));
        let rf = TopicReplication::Fixed(self.shared.cfg.kafka.replication_factor);
        let mut topic = NewTopic::new(remote, partitions, rf);
        for (k, v) in &self.shared.cfg.kafka.topic_config {
            if !extra.iter().any(|(e, _)| e == k) {
                topic = topic.set(k, v);
            }
        }
        for (k, v) in extra {
            topic = topic.set(k, v);
        }
        let created = self.shared.admin.create_topics([&topic], &opts).await?;
        let mut existed = false;
        for r in created {
            match r {
                Ok(_) => tracing::info!(topic = %remote, partitions, "remote topic created"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => existed = true,
                Err((_, code)) => return Err(CloudError::KafkaCode(code)),
            }
        }
        // Only a topic that existed may have too few partitions. A new one has `partitions`,
        // even while metadata (which a multi-broker cluster propagates after creation) does not
        // show it yet: asking to grow it then fails with InvalidPartitions.
        let have = if existed { self.remote_partitions(remote).await? } else { partitions };
        if let (true, Some((_, policy))) = (existed, extra.iter().find(|(k, _)| *k == "cleanup.policy")) {
            self.check_policy(remote, policy, &opts).await?;
        }
        if !existed {
            // Reading or writing it before its leaders are known fails (UnknownPartition,
            // NotLeaderForPartition), which would end this session.
            self.wait_for_leaders(remote, partitions).await?;
            self.created_topics.insert(remote.to_string());
        }
        if have < partitions {
            let grown =
                self.shared.admin.create_partitions([&NewPartitions::new(remote, partitions as usize)], &opts).await?;
            for r in grown {
                if let Err((_, code)) = r {
                    return Err(CloudError::KafkaCode(code));
                }
            }
            tracing::info!(topic = %remote, from = have, to = partitions, "remote topic grown");
        }
        self.ready_topics.insert(remote.to_string(), partitions);
        Ok(())
    }

    /// Compares an existing remote topic's `cleanup.policy` with the gateway's (`want`): a
    /// difference is the central cluster owners' to resolve, so it is only reported.
    async fn check_policy(&self, remote: &str, want: &str, opts: &AdminOptions) -> Result<(), CloudError> {
        let described = self.shared.admin.describe_configs([&ResourceSpecifier::Topic(remote)], opts).await?;
        let have = match described.into_iter().next() {
            Some(Ok(resource)) => resource.get("cleanup.policy").and_then(|e| e.value.clone()),
            Some(Err(code)) => return Err(CloudError::KafkaCode(code)),
            None => None,
        };
        if !have.as_deref().is_some_and(|h| same_policy(h, want)) {
            self.shared.stats.remote_policy_mismatches.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(site = %self.site, topic = %remote, remote_policy = ?have, gateway_policy = %want,
                "remote topic exists with another cleanup.policy than the gateway's: left as it is");
        }
        Ok(())
    }

    /// Waits until the metadata shows a topic just created with `partitions` partitions, each
    /// with a leader: CreateTopics returns before a cluster has elected them and spread the
    /// news (deadline `kafka.request_timeout_ms`).
    async fn wait_for_leaders(&self, remote: &str, partitions: i32) -> Result<(), CloudError> {
        let shared = self.shared.clone();
        let remote = remote.to_string();
        tokio::task::spawn_blocking(move || {
            let timeout = Duration::from_millis(shared.cfg.kafka.request_timeout_ms);
            let deadline = Instant::now() + timeout;
            loop {
                let md = shared.admin.inner().fetch_metadata(Some(&remote), timeout)?;
                let ready = md.topics().iter().find(|t| t.name() == remote).is_some_and(|t| {
                    t.error().is_none()
                        && t.partitions().len() as i32 >= partitions
                        && t.partitions().iter().all(|p| p.error().is_none() && p.leader() >= 0)
                });
                if ready {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    return Err(CloudError::Timeout("leaders of a new remote topic's partitions"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .await
        .map_err(|e| CloudError::Refused(format!("metadata task: {e}")))?
    }

    /// The remote topic's partition count, from the admin client's metadata.
    async fn remote_partitions(&self, remote: &str) -> Result<i32, CloudError> {
        let shared = self.shared.clone();
        let remote = remote.to_string();
        tokio::task::spawn_blocking(move || {
            let timeout = Duration::from_millis(shared.cfg.kafka.request_timeout_ms);
            let md = shared.admin.inner().fetch_metadata(Some(&remote), timeout)?;
            Ok(md.topics().iter().find(|t| t.name() == remote).map_or(0, |t| t.partitions().len() as i32))
        })
        .await
        .map_err(|e| CloudError::Refused(format!("metadata task: {e}")))?
    }
}

/// Whether two `cleanup.policy` values name the same policies (`compact,delete` is
/// `delete,compact`).
fn same_policy(a: &str, b: &str) -> bool {
    let set = |s: &str| {
        let mut v: Vec<String> =
            s.split(',').map(|p| p.trim().to_ascii_lowercase()).filter(|p| !p.is_empty()).collect();
        v.sort();
        v.dedup();
        v
    };
    set(a) == set(b)
}

/// A partition's watermarks, asked again while its leader is not known or moving (a leader
/// election, metadata not yet everywhere), within `timeout`.
fn watermarks(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    timeout: Duration,
) -> Result<(i64, i64), CloudError> {
    let deadline = Instant::now() + timeout;
    loop {
        match consumer.fetch_watermarks(topic, partition, deadline.saturating_duration_since(Instant::now())) {
            Err(KafkaError::MetadataFetch(
                RDKafkaErrorCode::UnknownPartition
                | RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::LeaderNotAvailable,
            )) if Instant::now() + Duration::from_millis(50) < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return Ok(other?),
        }
    }
}

fn header<'a>(m: &'a rdkafka::message::BorrowedMessage<'_>, name: &str) -> Option<&'a str> {
    m.headers()?.iter().find(|h| h.key == name).and_then(|h| h.value).and_then(|v| std::str::from_utf8(v).ok())
}

/// What the tail of a remote partition says about one source partition.
#[derive(Debug, Clone, Default)]
struct Resume {
    /// After the last record of this site's source partition (`None`: none in the tail).
    next: Option<i64>,
    /// This source partition's records in the tail: (source offset, remote offset), in order.
    tail: Vec<(i64, i64)>,
    /// The remote partition holds no record at all (created by this session, or empty).
    empty: bool,
    /// Its high watermark when read.
    high: i64,
}

/// Where each of `wanted` (remote topic, partition, source topic) resumes: after the last record
/// of this site's (source topic, partition) in the remote partition's tail (`None`: none there),
/// with those records' offsets for the offset index. One consumer reads every tail, a remote
/// topic at a time; topics in `created` (made by this session, so empty) are not read.
fn last_mirrored(
    cfg: &CloudConfig,
    site: &str,
    wanted: &[(String, i32, String)],
    created: &HashSet<String>,
) -> Result<Vec<Resume>, CloudError> {
    const TAIL: i64 = 256;
    let timeout = Duration::from_millis(cfg.kafka.request_timeout_ms);
    let consumer: BaseConsumer = kafka_config(cfg)
        .set("group.id", "tributary-cloud")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()?;
    let mut out = vec![Resume { empty: true, ..Resume::default() }; wanted.len()];
    let mut has_records = vec![false; wanted.len()];
    let mut remotes: Vec<&str> = wanted.iter().map(|(r, _, _)| r.as_str()).collect();
    remotes.sort_unstable();
    remotes.dedup();
    remotes.retain(|r| !created.contains(*r));
    for remote in remotes {
        // Partition -> (index in `wanted`, high watermark) of the tails still being read.
        let mut reading: HashMap<i32, (usize, i64)> = HashMap::new();
        let mut tpl = TopicPartitionList::new();
        for (i, (r, partition, _)) in wanted.iter().enumerate() {
            if r != remote {
                continue;
            }
            let (low, high) = watermarks(&consumer, remote, *partition, timeout)?;
            out[i].high = high;
            out[i].empty = high <= low;
            if high > low {
                tpl.add_partition_offset(remote, *partition, Offset::Offset((high - TAIL).max(low)))?;
                reading.insert(*partition, (i, high));
                has_records[i] = true;
            }
        }
        if reading.is_empty() {
            continue;
        }
        consumer.assign(&tpl)?;
        let deadline = Instant::now() + timeout;
        while !reading.is_empty() {
            if Instant::now() > deadline {
                return Err(CloudError::Timeout("reading the remote partitions' tails"));
            }
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    let Some(&(i, high)) = reading.get(&m.partition()) else { continue };
                    let (_, partition, topic) = &wanted[i];
                    let ours = header(&m, HEADER_SITE) == Some(site)
                        && header(&m, HEADER_TOPIC) == Some(topic.as_str())
                        && header(&m, HEADER_PARTITION) == Some(partition.to_string().as_str());
                    if ours {
                        if let Some(off) = header(&m, HEADER_OFFSET).and_then(|o| o.parse::<i64>().ok()) {
                            out[i].next = Some(off + 1);
                            out[i].tail.push((off, m.offset()));
                        }
                    }
                    if m.offset() >= high - 1 {
                        reading.remove(&m.partition());
                    }
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    reading.remove(&p);
                }
                Some(Err(e)) => return Err(e.into()),
                None => {}
            }
        }
    }
    for (((remote, partition, _), last), had) in wanted.iter().zip(&out).zip(has_records) {
        if last.next.is_none() && had {
            tracing::warn!(%remote, partition, "remote partition has records but none from this site in its tail: starting from 0");
        }
    }
    Ok(out)
}

/// (remote topic, partition) -> offset of one central group.
type GroupOffsets = BTreeMap<(String, i32), i64>;

/// Translated offsets waiting to be committed into the central cluster's consumer groups: central
/// group -> (remote topic, partition) -> offset, the latest of each, at most `groups_max` groups.
/// A commit only ever follows its checkpoint's acknowledgement, so it is never ahead of the
/// mirrored data either.
struct CentralCommits {
    pending: Mutex<BTreeMap<String, GroupOffsets>>,
    groups_max: usize,
    stats: Arc<CloudStats>,
}

impl CentralCommits {
    fn offer(&self, group: String, topic: String, partition: i32, offset: i64) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if !pending.contains_key(&group) && pending.len() >= self.groups_max {
            self.stats.central_commits_dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%group, "central_commit_groups_max reached: translated offset not committed");
            return;
        }
        pending.entry(group).or_default().insert((topic, partition), offset);
    }

    /// Commits every waiting group's offsets (on the blocking pool: one short-lived client per
    /// group, as a consumer that never joins). A refused group (members active there, or the
    /// cluster unreachable) is put back unless a newer offset came meanwhile.
    fn commit_round(&self, cfg: &CloudConfig) {
        let round = std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        for (group, offsets) in round {
            match commit_group(cfg, &group, &offsets) {
                Ok(()) => {
                    self.stats.central_commits.fetch_add(offsets.len() as u64, Ordering::Relaxed);
                    tracing::debug!(%group, partitions = offsets.len(), "translated offsets committed");
                }
                Err(e) => {
                    self.stats.central_commits_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%group, error = %e,
                        "central group refused the translated offsets (active there?): retrying later");
                    let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
                    let newer = pending.entry(group).or_default();
                    for (tp, offset) in offsets {
                        newer.entry(tp).or_insert(offset);
                    }
                }
            }
        }
    }
}

/// Commits `offsets` into the central consumer group `group` from outside it (generation -1, as
/// Kafka's admin tools do): Kafka takes it only while the group has no active member.
fn commit_group(cfg: &CloudConfig, group: &str, offsets: &GroupOffsets) -> Result<(), CloudError> {
    let consumer: BaseConsumer =
        kafka_config(cfg).set("group.id", group).set("enable.auto.commit", "false").create()?;
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in offsets {
        tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
    }
    consumer.commit(&tpl, rdkafka::consumer::CommitMode::Sync)?;
    Ok(())
}

/// What one site's data streams hold in the receiver: frames read from QUIC and not yet handed
/// to librdkafka (`received`), and the decompressed records of batches being handed over
/// (`decoded`). Bytes are charged before they are buffered, never for bytes that have not
/// arrived. A stream starts a new frame only while the site holds less than half the limit (so
/// backpressure reaches the gateway through QUIC flow control); bytes that would take `received`
/// over the limit end the session (only frames already started can get there: a site sending
/// many half frames at once). Decompressing waits while `decoded` is at half the limit; it can
/// exceed that by one batch (`decompressed_batch_bytes_max`) per worker thread decompressing.
#[derive(Debug)]
struct SiteBuffer {
    limit: u64,
    received: AtomicU64,
    decoded: AtomicU64,
    freed: Notify,
    stats: Arc<CloudStats>,
}

impl SiteBuffer {
    fn new(limit: u64, stats: Arc<CloudStats>) -> Self {
        Self { limit, received: AtomicU64::new(0), decoded: AtomicU64::new(0), freed: Notify::new(), stats }
    }

    /// Waits until a stream may start reading a new frame.
    async fn room_for_frame(&self) {
        loop {
            let freed = self.freed.notified();
            if self.received.load(Ordering::Acquire) + self.decoded.load(Ordering::Acquire) < self.limit / 2 {
                return;
            }
            freed.await;
        }
    }

    /// Waits until a batch may be decompressed.
    async fn room_for_decoding(&self) {
        loop {
            let freed = self.freed.notified();
            if self.decoded.load(Ordering::Acquire) < self.limit / 2 {
                return;
            }
            freed.await;
        }
    }

    fn release(&self, received: u64, decoded: u64) {
        if received + decoded == 0 {
            return;
        }
        self.received.fetch_sub(received, Ordering::AcqRel);
        self.decoded.fetch_sub(decoded, Ordering::AcqRel);
        self.stats.buffered_bytes.fetch_sub(received + decoded, Ordering::Relaxed);
        self.freed.notify_waiters();
    }
}

/// One stream's share of its site's buffer; given back when the stream ends, however it ends.
struct Held {
    buffer: Arc<SiteBuffer>,
    received: u64,
    decoded: u64,
}

impl Held {
    /// Charges `n` bytes read from the stream, before they are buffered.
    fn charge(&mut self, n: u64) -> Result<(), CloudError> {
        let held = self.buffer.received.fetch_add(n, Ordering::AcqRel) + n;
        if held > self.buffer.limit {
            self.buffer.received.fetch_sub(n, Ordering::AcqRel);
            return Err(CloudError::SiteBuffer { held, limit: self.buffer.limit });
        }
        self.received += n;
        self.buffer.stats.buffered_bytes.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    fn charge_decoded(&mut self, n: u64) {
        self.buffer.decoded.fetch_add(n, Ordering::AcqRel);
        self.buffer.stats.buffered_bytes.fetch_add(n, Ordering::Relaxed);
        self.decoded += n;
    }

    /// A frame of `received` bytes (and its `decoded` records) is handed over.
    fn release(&mut self, received: u64, decoded: u64) {
        let (r, d) = (received.min(self.received), decoded.min(self.decoded));
        self.received -= r;
        self.decoded -= d;
        self.buffer.release(r, d);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.buffer.release(self.received, self.decoded);
    }
}

/// Bytes asked of QUIC per read once a stream is open (quinn hands over its own buffers).
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Reads one partition's data stream and writes its records into Kafka.
struct StreamTask {
    shared: Arc<Shared>,
    site: String,
    links: Links,
    buffer: Arc<SiteBuffer>,
}

/// A data stream being read: its decoder and its share of the site's buffer.
struct Incoming {
    stream: quinn::RecvStream,
    decoder: Decoder,
    held: Held,
    /// Bytes asked of QUIC per read.
    chunk: usize,
}

impl Incoming {
    /// The next frame and the bytes it took on the wire; `None` when the stream ended.
    async fn next(&mut self) -> Result<Option<(Data, u64)>, CloudError> {
        loop {
            let before = self.decoder.buffered();
            if let Some(frame) = self.decoder.next_data()? {
                return Ok(Some((frame, (before - self.decoder.buffered()) as u64)));
            }
            if self.decoder.buffered() == 0 {
                self.held.buffer.room_for_frame().await;
            }
            match self.stream.read_chunk(self.chunk, true).await? {
                Some(chunk) => {
                    self.held.charge(chunk.bytes.len() as u64)?;
                    self.decoder.feed(&chunk.bytes);
                }
                None => return Ok(None),
            }
        }
    }
}

impl StreamTask {
    async fn run(self, stream: quinn::RecvStream) -> Result<(), CloudError> {
        // Until its Open is checked a stream may hold one Open frame's worth, no more.
        let held = Held { buffer: self.buffer.clone(), received: 0, decoded: 0 };
        let mut incoming =
            Incoming { stream, decoder: Decoder::new(OPEN_FRAME_BYTES_MAX), held, chunk: OPEN_FRAME_BYTES_MAX };
        let Some((open, len)) = incoming.next().await? else { return Ok(()) };
        let Data::Open { topic, partition } = open else {
            return Err(ProtocolError::Unexpected("data before open").into());
        };
        incoming.held.release(len, 0);
        let link = self
            .links
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(topic.clone(), partition))
            .cloned()
            .ok_or(ProtocolError::Unexpected("stream of a partition not started"))?;
        incoming.decoder.set_max(self.shared.cfg.frame_bytes_max as usize);
        incoming.chunk = READ_CHUNK_BYTES;
        let result = self.pump(&mut incoming, &topic, partition, &link).await;
        // Whatever was handed to librdkafka is acknowledged before the stream counts as done.
        let settled = link.all_settled().await;
        result.and(settled)
    }

    async fn pump(
        &self,
        incoming: &mut Incoming,
        topic: &str,
        partition: i32,
        link: &Arc<Link>,
    ) -> Result<(), CloudError> {
        let mut expected = link.start;
        let partition_text = partition.to_string();
        let mut offset_text = [0u8; 20];
        let limit = self.shared.cfg.decompressed_batch_bytes_max;
        let stats = &self.shared.stats;
        loop {
            let Some((frame, wire_len)) = incoming.next().await? else { return Ok(()) };
            match frame {
                Data::Batch(batch) => {
                    let len = batch.len() as u64;
                    link.flow.lock().unwrap_or_else(PoisonError::into_inner).on_received(topic, partition, len)?;
                    stats.batch_bytes_received.fetch_add(len, Ordering::Relaxed);
                    let h = BatchHeader::parse(&batch).map_err(|e| CloudError::Batch(e.to_string()))?;
                    self.buffer.room_for_decoding().await;
                    let records = decode_records(&batch, limit).map_err(|e| CloudError::Batch(e.to_string()))?;
                    drop(batch);
                    let decoded: u64 = records.iter().map(record_bytes).sum();
                    incoming.held.charge_decoded(decoded);
                    link.check()?;
                    // Records already stored (a resend after a reconnect) are skipped; the rest,
                    // their offsets as runs, make the unit.
                    let mut sources: Vec<(i64, i64)> = Vec::new();
                    let mut records = records;
                    records.retain(|r| {
                        if r.offset < expected {
                            stats.duplicates_skipped.fetch_add(1, Ordering::Relaxed);
                            return false;
                        }
                        expected = r.offset + 1;
                        match sources.last_mut() {
                            Some((first, n)) if *first + *n == r.offset => *n += 1,
                            _ => sources.push((r.offset, 1)),
                        }
                        true
                    });
                    let unit = link.unit(h.next_offset(), len, sources);
                    let handing = Handing(unit.clone());
                    let mut written = 0;
                    for r in records {
                        let mut headers = OwnedHeaders::new_with_capacity(r.headers.len() + 4);
                        for (k, v) in &r.headers {
                            headers = headers.insert(Header { key: k, value: v.as_deref() });
                        }
                        headers = headers
                            .insert(Header { key: HEADER_SITE, value: Some(self.site.as_bytes()) })
                            .insert(Header { key: HEADER_TOPIC, value: Some(topic.as_bytes()) })
                            .insert(Header { key: HEADER_PARTITION, value: Some(partition_text.as_bytes()) })
                            .insert(Header { key: HEADER_OFFSET, value: Some(decimal(&mut offset_text, r.offset)) });
                        let mut record: BaseRecord<'_, [u8], [u8], Arc<Unit>> =
                            BaseRecord::with_opaque_to(&link.remote, unit.clone())
                                .partition(partition)
                                .timestamp(r.timestamp)
                                .headers(headers);
                        if let Some(k) = &r.key {
                            record = record.key(&k[..]);
                        }
                        if let Some(v) = &r.value {
                            record = record.payload(&v[..]);
                        }
                        unit.waiting.fetch_add(1, Ordering::AcqRel);
                        self.enqueue(record).await?;
                        written += 1;
                    }
                    drop(handing);
                    stats.records_written.fetch_add(written, Ordering::Relaxed);
                    incoming.held.release(wire_len, decoded);
                    expected = expected.max(h.next_offset());
                }
                Data::Gap { from, to } => {
                    incoming.held.release(wire_len, 0);
                    if to <= expected {
                        continue;
                    }
                    let from = from.max(expected);
                    tracing::warn!(site = %self.site, %topic, partition, from, to,
                        "gateway dropped records before they were mirrored: recording the gap");
                    let value = format!(
                        "{{\"site\":\"{}\",\"topic\":\"{}\",\"partition\":{},\"from_offset\":{},\"to_offset\":{},\"remote_topic\":\"{}\",\"recorded_ms\":{}}}",
                        json_escape(&self.site), json_escape(topic), partition, from, to, json_escape(&link.remote), now_ms()
                    );
                    let key = format!("{}/{}/{}", self.site, topic, partition);
                    link.check()?;
                    let unit = link.unit(to, 0, Vec::new());
                    let handing = Handing(unit.clone());
                    let record: BaseRecord<'_, str, str, Arc<Unit>> =
                        BaseRecord::with_opaque_to(&self.shared.cfg.gaps_topic, unit.clone())
                            .key(key.as_str())
                            .payload(value.as_str());
                    unit.waiting.fetch_add(1, Ordering::AcqRel);
                    self.enqueue(record).await?;
                    drop(handing);
                    stats.gaps_recorded.fetch_add(1, Ordering::Relaxed);
                    expected = to;
                }
                Data::Open { .. } => return Err(ProtocolError::Unexpected("second open").into()),
                Data::Restored { .. } | Data::RestoreEnd { .. } => {
                    return Err(ProtocolError::Unexpected("restore frame on a mirror stream").into())
                }
            }
        }
    }

    /// Hands a record to librdkafka, waiting while its queue is full.
    async fn enqueue<K: rdkafka::message::ToBytes + ?Sized, P: rdkafka::message::ToBytes + ?Sized>(
        &self,
        mut record: BaseRecord<'_, K, P, Arc<Unit>>,
    ) -> Result<(), CloudError> {
        loop {
            match self.shared.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    // librdkafka's queue drains as the cluster acknowledges: poll it shortly.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((e, r)) => {
                    // Give back the count taken for this record, so its unit can still settle
                    // (the session ends on this error anyway).
                    r.delivery_opaque.acked();
                    return Err(e.into());
                }
            }
        }
    }
}

/// Writes `n` (an offset, >= 0) in decimal into `buf` without allocating; the digits.
fn decimal(buf: &mut [u8; 20], n: i64) -> &[u8] {
    let mut n = n.max(0).unsigned_abs();
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[at..]
}

/// The bytes a decoded record holds (key, value, header names and values).
fn record_bytes(r: &tributary_log::batch::StoredRecord) -> u64 {
    let field = |b: &Option<bytes::Bytes>| b.as_ref().map_or(0, |b| b.len() as u64);
    field(&r.key) + field(&r.value) + r.headers.iter().map(|(k, v)| k.len() as u64 + field(v)).sum::<u64>()
}

fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    fn link(start: i64) -> Arc<Link> {
        Arc::new(Link {
            remote: "plant-7.meters".into(),
            start,
            flow: Mutex::new(Flow::new(1000, 100)),
            progress: Mutex::new(Progress::new(start, Duration::from_millis(1))),
            acks: Mutex::new(Acks::default()),
            settled: Notify::new(),
            credit_due: Arc::new(Notify::new()),
            index: Mutex::new(OffsetIndex::new(16)),
            commits: Mutex::new(BTreeMap::new()),
        })
    }

    fn stored(link: &Link) -> i64 {
        link.progress.lock().map(|p| p.stored()).unwrap_or_default()
    }

    /// Progress and credit move over acknowledged units in the order they were handed over,
    /// whatever order librdkafka reports them in (a gap record goes to another topic).
    #[test]
    fn units_settle_in_order_once_all_their_records_are_acknowledged() {
        let link = link(0);
        let records = |unit: &Arc<Unit>, n: u64| {
            unit.waiting.fetch_add(n, Ordering::AcqRel);
        };
        let (a, b, c) = (link.unit(10, 300, Vec::new()), link.unit(20, 0, Vec::new()), link.unit(30, 500, Vec::new()));
        for (u, n) in [(&a, 3), (&b, 1), (&c, 2)] {
            records(u, n);
            drop(Handing(u.clone()));
        }
        for _ in 0..2 {
            c.acked();
        }
        assert_eq!(stored(&link), 0, "the last unit is in, the first is not");
        for _ in 0..2 {
            a.acked();
        }
        assert_eq!(stored(&link), 0, "one record of the first unit still out");
        a.acked();
        assert_eq!(stored(&link), 10);
        assert!(link.all_settled().now_or_never().is_none(), "the gap is still out");
        b.acked();
        assert_eq!(stored(&link), 30, "the gap, then the unit already in");
        assert_eq!(link.flow.lock().map(|mut f| f.take_credit(true)).ok().flatten(), Some(800));
        assert!(matches!(link.all_settled().now_or_never(), Some(Ok(()))));
        // A failed write ends the stream: later units are refused and waiting stops.
        let d = link.unit(40, 10, Vec::new());
        link.fail("broker down".into());
        assert!(link.check().is_err());
        assert!(matches!(link.all_settled().now_or_never(), Some(Err(_))));
        drop(d);
    }

    #[test]
    fn offsets_are_written_in_decimal_without_allocating() {
        let mut buf = [0u8; 20];
        for n in [0i64, 7, 10, 1234567, i64::MAX] {
            assert_eq!(decimal(&mut buf, n), n.to_string().as_bytes());
        }
    }

    #[test]
    fn a_site_buffer_charges_arrivals_refuses_its_limit_and_stops_new_frames_at_half() {
        let stats = Arc::new(CloudStats::default());
        let buffer = Arc::new(SiteBuffer::new(1000, stats.clone()));
        let held = || Held { buffer: buffer.clone(), received: 0, decoded: 0 };
        let (mut a, mut b) = (held(), held());
        a.charge(400).expect("within the limit");
        assert!(buffer.room_for_frame().now_or_never().is_some(), "below half: a new frame starts");
        a.charge(100).expect("within the limit");
        assert!(buffer.room_for_frame().now_or_never().is_none(), "at half: new frames wait");
        // Frames already started may go on up to the limit, not past it.
        b.charge(500).expect("up to the limit");
        assert!(matches!(b.charge(1), Err(CloudError::SiteBuffer { held: 1001, limit: 1000 })));
        assert_eq!(stats.buffered_bytes.load(Ordering::Relaxed), 1000);
        drop(b);
        a.release(100, 0);
        assert!(buffer.room_for_frame().now_or_never().is_some(), "room again once frames are handed over");
        // Decompressed records count too, and hold back further decompression at half.
        a.charge_decoded(500);
        assert!(buffer.room_for_decoding().now_or_never().is_none());
        assert!(buffer.room_for_frame().now_or_never().is_none());
        drop(a);
        assert!(buffer.room_for_decoding().now_or_never().is_some());
        assert_eq!(stats.buffered_bytes.load(Ordering::Relaxed), 0, "a stream's share goes back when it ends");
    }
}
