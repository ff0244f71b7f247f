//! The gateway side of the mirror: dials the cloud over QUIC (mutual TLS), reports its
//! partitions, streams stored batches from where the cloud says (one stream per partition,
//! within the credit the cloud grants and the bandwidth cap), marks gaps left by retention, and
//! stores what the cloud confirms as mirrored; sends consumer groups' committed offsets of mirrored
//! partitions (latest per group and partition, once the records below them are sent) and the
//! compacted topics' settings when the cloud speaks protocol version 2, and every mirrored topic's
//! own settings (first named, then whenever an alter changes them) when it speaks version 4
//! (`overrides.rs`); during a backlog, the
//! fresh tail of `mirror.fresh_topics` on live streams ahead of it (`fresh.rs`), and for the
//! compacted topics of `mirror.latest_first_topics` the backlog's compacted view first on the
//! same live streams (`latest.rs`). Reconnects with backoff and jitter.

pub(crate) use crate::stream::Credit;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::task::JoinSet;
use tributary_log::batch::{retain_records, BatchHeader, Retained};
use tributary_log::clock::now_ms;
use tributary_log::{Codec, Store, StoreError, TopicConfig};

use crate::backfill::driver::{BackfillSender, Backfills};
use crate::config::{MirrorConfig, WireCompression};
use crate::core::Backoff;
use crate::drain::{DrainEstimate, DrainWindow, Sample};
use crate::fresh::{self, Class, FreshTail, LinkShare, Step, Verdict};
use crate::latest::{self, LatestView, ViewStep};
use crate::overrides::{own_settings, Announced};
use crate::protocol::{
    CommittedOffset, Control, Data, Decoder, PartitionReport, ProtocolError, TopicSettings, GROUP_ID_BYTES_MAX,
    MIRRORED_TOPIC_CONFIGS, OFFSETS_PER_FRAME_MAX, TOPIC_BYTES_MAX, TOPIC_CONFIGS_PER_FRAME_MAX,
    TOPIC_CONFIG_VALUE_BYTES_MAX, TOPIC_OVERRIDES_PER_FRAME_MAX,
};
use crate::tls::{self, TlsError};

/// Why a mirror session ended (it is retried, except for configuration errors).
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("QUIC endpoint: {0}")]
    Endpoint(std::io::Error),
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream read: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("the cloud refused: {0}")]
    Refused(String),
    #[error("the cloud closed the control stream")]
    Closed,
    #[error("no QUIC handshake within mirror.connect_timeout_ms = {0}")]
    HandshakeTimeout(u64),
    #[error("config: {0}")]
    Config(#[from] tributary_log::ConfigError),
}

/// What the mirror reports for metrics and `tributary mirror status`.
#[derive(Debug, Default)]
pub struct MirrorStats {
    pub link_up: AtomicBool,
    pub connects: AtomicU64,
    pub reconnects: AtomicU64,
    /// Stored batch bytes sent (as stored: compressed).
    pub batch_bytes_sent: AtomicU64,
    /// UDP bytes sent over connections that ended (see `wire_bytes_sent()` for the total).
    wire_bytes_closed: AtomicU64,
    /// The connection up now, for its live counters.
    current: Mutex<Option<quinn::Connection>>,
    pub gaps: AtomicU64,
    pub gap_records: AtomicU64,
    pub last_error: Mutex<String>,
    partitions: Mutex<BTreeMap<(String, i32), Arc<PartitionProgress>>>,
    /// Bumped on every link change and confirmed progress: watch it instead of polling.
    changes: tokio::sync::watch::Sender<u64>,
    /// Committed consumer-group offsets to send to the cloud.
    pub commits: CommitFeed,
    /// The backlog's drain windows, per topic and in total (sampled by `run`).
    drain: Mutex<DrainState>,
    /// Fresh data first: stored batch bytes and batches sent on live streams, and the times a
    /// live stream skipped to the fresh cutoff (it started behind it, or fell behind).
    pub live_batch_bytes_sent: AtomicU64,
    pub live_batches_sent: AtomicU64,
    pub live_seeks: AtomicU64,
    /// Live streams running now.
    pub live_streams: AtomicU64,
    /// Latest-first catch-up (`latest.rs`): views started and finished, their windows and keys
    /// mapped, the records and stored batch bytes they sent (also counted as live batches), and
    /// the time the last finished one took from the backlog seen to its last record sent (the
    /// time until the preview held the current state).
    pub latest_views_started: AtomicU64,
    pub latest_views_done: AtomicU64,
    pub latest_view_windows: AtomicU64,
    pub latest_view_keys: AtomicU64,
    pub latest_view_records_sent: AtomicU64,
    pub latest_view_bytes_sent: AtomicU64,
    pub latest_view_last_ms: AtomicU64,
    /// Views running now (each holding one of `mirror.latest_first_views_max` places).
    pub latest_views_running: AtomicU64,
    /// Backfill requests (`tributary mirror backfill`), their plans and progress.
    pub backfills: Arc<Backfills>,
}

/// The drain windows: one per mirrored topic and one for all together, all over
/// `mirror.drain_window_ms`, timed from `started` (monotonic).
#[derive(Debug)]
struct DrainState {
    window_ms: u64,
    started: Instant,
    topics: BTreeMap<String, DrainWindow>,
    total: DrainWindow,
}

impl Default for DrainState {
    fn default() -> Self {
        let window_ms = MirrorConfig::default().drain_window_ms;
        Self { window_ms, started: Instant::now(), topics: BTreeMap::new(), total: DrainWindow::new(window_ms) }
    }
}

/// The drain estimate of every mirrored topic and of all together.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    pub topics: Vec<(String, DrainEstimate)>,
    pub total: DrainEstimate,
}

/// Consumer groups' committed offsets of mirrored partitions, to send to the cloud: the latest
/// per (group, topic, partition), kept (and sent again on every new session) so a receiver that
/// restarted learns them, at most `limit` entries (`mirror.offsets_tracked_max`). Fed by the
/// group coordinator's commit hook; drained by the mirror session.
#[derive(Debug)]
pub struct CommitFeed {
    state: Mutex<FeedState>,
    /// Offsets sent to the cloud.
    pub sent: AtomicU64,
    /// Commits not tracked: over the limit, or a group id over `GROUP_ID_BYTES_MAX`.
    pub dropped: AtomicU64,
}

#[derive(Debug)]
struct FeedState {
    /// (group, topic, partition) as a tuple of the client's strings: no joined key, so no two
    /// groups or topics can collide.
    entries: BTreeMap<(String, String, i32), FeedEntry>,
    limit: usize,
    /// Entries not yet sent in this session.
    unsent: usize,
}

#[derive(Debug, Clone, Copy)]
struct FeedEntry {
    offset: i64,
    commit_time_ms: i64,
    sent: bool,
}

impl Default for CommitFeed {
    fn default() -> Self {
        Self::new(MirrorConfig::default().offsets_tracked_max as usize)
    }
}

impl CommitFeed {
    pub fn new(limit: usize) -> Self {
        Self {
            state: Mutex::new(FeedState { entries: BTreeMap::new(), limit, unsent: 0 }),
            sent: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FeedState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the number of entries kept (`mirror.offsets_tracked_max`).
    pub fn set_limit(&self, limit: usize) {
        self.lock().limit = limit;
    }

    /// A group committed `offset` on a mirrored partition at `commit_time_ms`. Returns whether it
    /// is tracked.
    pub fn offer(&self, group: &str, topic: &str, partition: i32, offset: i64, commit_time_ms: i64) -> bool {
        if group.len() > GROUP_ID_BYTES_MAX || topic.len() > TOPIC_BYTES_MAX || offset < 0 {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let mut st = self.lock();
        let st = &mut *st;
        let key = (group.to_string(), topic.to_string(), partition);
        let entry = FeedEntry { offset, commit_time_ms, sent: false };
        let full = st.entries.len() >= st.limit;
        match st.entries.get_mut(&key) {
            Some(e) => {
                if e.offset == offset && !e.sent {
                    return true;
                }
                if e.sent {
                    st.unsent += 1;
                }
                *e = entry;
            }
            None if full => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    group,
                    topic,
                    partition,
                    limit = st.limit,
                    "mirror.offsets_tracked_max reached: this committed offset is not mirrored"
                );
                return false;
            }
            None => {
                st.entries.insert(key, entry);
                st.unsent += 1;
            }
        }
        true
    }

    /// A new session: everything goes again.
    fn resend_all(&self) {
        let mut st = self.lock();
        for e in st.entries.values_mut() {
            e.sent = false;
        }
        st.unsent = st.entries.len();
    }

    /// Offsets not yet sent whose partition has sent every record below them (`sent_to` gives
    /// a partition's next offset to send, `None` while it is not streaming), at most `max`; they
    /// count as sent.
    fn take(&self, max: usize, sent_to: impl Fn(&str, i32) -> Option<i64>) -> Vec<CommittedOffset> {
        let mut st = self.lock();
        let mut out = Vec::new();
        if st.unsent == 0 {
            return out;
        }
        // One look-up per partition, however many groups committed on it.
        let mut progress: HashMap<(&str, i32), Option<i64>> = HashMap::new();
        for ((group, topic, partition), e) in st.entries.iter_mut() {
            if out.len() >= max {
                break;
            }
            if e.sent {
                continue;
            }
            let next = *progress.entry((topic.as_str(), *partition)).or_insert_with(|| sent_to(topic, *partition));
            if next.is_none_or(|next| next < e.offset) {
                continue;
            }
            e.sent = true;
            out.push(CommittedOffset {
                group: group.clone(),
                topic: topic.clone(),
                partition: *partition,
                offset: e.offset,
                commit_time_ms: e.commit_time_ms,
            });
        }
        st.unsent -= out.len();
        out
    }

    /// Entries tracked, and how many of them are waiting to be sent.
    pub fn pending(&self) -> (usize, usize) {
        let st = self.lock();
        (st.entries.len(), st.unsent)
    }
}

/// One partition's mirror progress.
#[derive(Debug, Default)]
pub struct PartitionProgress {
    /// Where the cloud last told this partition to start (its central cluster's tail when the
    /// session began).
    pub started_at: AtomicI64,
    /// Next offset to send.
    pub sent: AtomicI64,
    /// Everything below is in the central cluster.
    pub mirrored: AtomicI64,
    /// The newest record timestamp of the batch the sender is on (`HEAD_NONE`: none, e.g. it is
    /// caught up and waiting): how far behind the ordered stream is, for the live stream.
    pub head_timestamp_ms: AtomicI64,
}

/// `PartitionProgress::head_timestamp_ms` when the sender is on no batch.
const HEAD_NONE: i64 = i64::MAX;

impl PartitionProgress {
    /// The newest record timestamp of the batch the ordered stream is on, if any.
    pub fn head_ms(&self) -> Option<i64> {
        let h = self.head_timestamp_ms.load(Ordering::Relaxed);
        (h != HEAD_NONE).then_some(h)
    }
}

/// A partition's mirror lag at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    pub high_watermark: i64,
    pub mirrored: i64,
    pub lag_records: i64,
    /// Stored bytes not yet mirrored (estimated from the partition's average record size).
    pub lag_bytes: u64,
    /// Age of the oldest unmirrored record, by its timestamp (0 when nothing is behind).
    pub oldest_unmirrored_age_ms: i64,
}

impl MirrorStats {
    /// Wakes on link changes, errors and confirmed progress.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// UDP bytes sent over all connections so far: QUIC and TLS overhead and retransmissions
    /// included, so this is what a metered link is billed for.
    pub fn wire_bytes_sent(&self) -> u64 {
        let live =
            self.current.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map_or(0, |c| c.stats().udp_tx.bytes);
        self.wire_bytes_closed.load(Ordering::Relaxed) + live
    }

    /// The live connection's QUIC statistics (congestion window, RTT, lost packets, congestion
    /// events), if a connection is up.
    pub fn connection_stats(&self) -> Option<quinn::ConnectionStats> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map(quinn::Connection::stats)
    }

    pub(crate) fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    fn set_link(&self, up: bool, error: Option<String>) {
        self.link_up.store(up, Ordering::Relaxed);
        if let Some(e) = error {
            *self.last_error.lock().unwrap_or_else(PoisonError::into_inner) = e;
        }
        self.changed();
    }

    /// A mirrored partition's progress (`None` until the cloud started it).
    pub fn partition(&self, topic: &str, partition: i32) -> Option<Arc<PartitionProgress>> {
        self.partitions.lock().unwrap_or_else(PoisonError::into_inner).get(&(topic.to_string(), partition)).cloned()
    }

    fn progress(&self, topic: &str, partition: i32) -> Arc<PartitionProgress> {
        let mut map = self.partitions.lock().unwrap_or_else(PoisonError::into_inner);
        map.entry((topic.to_string(), partition)).or_default().clone()
    }

    /// Lag per mirrored partition, read from the store now.
    pub fn lag(&self, store: &Store) -> Vec<PartitionLag> {
        self.lag_with(store, true)
    }

    /// [`Self::lag`], with the oldest unmirrored record's age read only when `age` (a record
    /// read per lagging partition).
    fn lag_with(&self, store: &Store, age: bool) -> Vec<PartitionLag> {
        let keys: Vec<(String, i32)> =
            self.partitions.lock().unwrap_or_else(PoisonError::into_inner).keys().cloned().collect();
        let now = now_ms();
        keys.into_iter()
            .filter_map(|(topic, partition)| {
                let info = store.partition_info(&topic, partition).ok()?;
                let wm = info.watermarks;
                let mirrored = store.archived(&topic, partition).ok().flatten().unwrap_or(0).max(wm.log_start_offset);
                let lag_records = (wm.high_watermark - mirrored).max(0);
                let stored = (wm.high_watermark - wm.log_start_offset).max(1) as u64;
                let lag_bytes = info.logical_bytes.saturating_mul(lag_records as u64) / stored;
                let oldest_unmirrored_age_ms = if lag_records == 0 || !age {
                    0
                } else {
                    store
                        .read_records(&topic, partition, mirrored, 1)
                        .ok()
                        .and_then(|r| r.into_iter().find(|r| r.offset >= mirrored))
                        .map_or(0, |r| (now - r.timestamp).max(0))
                };
                Some(PartitionLag {
                    topic,
                    partition,
                    high_watermark: wm.high_watermark,
                    mirrored,
                    lag_records,
                    lag_bytes,
                    oldest_unmirrored_age_ms,
                })
            })
            .collect()
    }

    /// Sets the drain window (`mirror.drain_window_ms`), starting every window afresh.
    pub fn set_drain_window(&self, window_ms: u64) {
        let mut d = self.drain.lock().unwrap_or_else(PoisonError::into_inner);
        *d = DrainState { window_ms, total: DrainWindow::new(window_ms), ..DrainState::default() };
    }

    /// Samples every mirrored topic's backlog (watermarks and mirrored marks: no record read)
    /// into the drain windows; a topic no longer mirrored leaves them.
    pub fn sample_drain(&self, store: &Store) {
        const ZERO: Sample = Sample { at_ms: 0, backlog_records: 0, backlog_bytes: 0, mirrored_records: 0 };
        let mut per_topic: BTreeMap<String, Sample> = BTreeMap::new();
        let mut total = ZERO;
        for l in self.lag_with(store, false) {
            let t = per_topic.entry(l.topic).or_insert(ZERO);
            for s in [t, &mut total] {
                s.backlog_records += l.lag_records.max(0) as u64;
                s.backlog_bytes += l.lag_bytes;
                s.mirrored_records += l.mirrored.max(0) as u64;
            }
        }
        let mut d = self.drain.lock().unwrap_or_else(PoisonError::into_inner);
        let at_ms = d.started.elapsed().as_millis() as u64;
        let window_ms = d.window_ms;
        // A topic joining or leaving makes the total jump by its backlog, which is not a rate:
        // the total's window starts again. Before any partition is known there is nothing to say.
        let same_topics = d.topics.len() == per_topic.len() && d.topics.keys().all(|t| per_topic.contains_key(t));
        if !same_topics {
            d.total = DrainWindow::new(window_ms);
        }
        if per_topic.is_empty() {
            return;
        }
        d.topics.retain(|topic, _| per_topic.contains_key(topic));
        for (topic, s) in per_topic {
            d.topics.entry(topic).or_insert_with(|| DrainWindow::new(window_ms)).observe(Sample { at_ms, ..s });
        }
        d.total.observe(Sample { at_ms, ..total });
        drop(d);
        self.changed();
    }

    /// The drain estimate per topic and in total, from the last samples.
    pub fn drain(&self) -> Drain {
        let d = self.drain.lock().unwrap_or_else(PoisonError::into_inner);
        Drain { topics: d.topics.iter().map(|(t, w)| (t.clone(), w.estimate())).collect(), total: d.total.estimate() }
    }
}

/// Aborts a task when dropped (the drain sampler ends with `run`).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the mirror until `shutdown` resolves: connects, streams, reconnects. `defaults`: the
/// gateway's `[topic_defaults]` settings (a topic's own settings are those that differ).
pub async fn run(
    cfg: MirrorConfig,
    store: Store,
    stats: Arc<MirrorStats>,
    defaults: TopicConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), MirrorError> {
    let transport = tls::transport(
        Duration::from_millis(cfg.keep_alive_ms),
        Duration::from_millis(cfg.idle_timeout_ms),
        cfg.partitions_max + 4,
        cfg.congestion_controller,
    )?;
    let client = tls::client_config(&cfg.ca_file, &cfg.cert_file, &cfg.key_file, transport)?;
    stats.commits.set_limit(cfg.offsets_tracked_max as usize);
    cfg.validate_topics("mirror", |t| store.topic(t).map(|i| i.config.compacted()))?;
    for t in store.topics() {
        let name = fresh::live_topic(&t.name);
        if has_live(&cfg, &store, &t.name) && store.topic(&name).is_some() {
            tracing::warn!(topic = %t.name, "a topic named {name} exists: it is mirrored as itself, and {} has no live stream", t.name);
        }
    }
    stats.set_drain_window(cfg.drain_window_ms);
    // The drain sampler runs while the mirror does, link up or down (a backlog grows while the
    // link is down, and that is part of the estimate); its store reads go to the blocking pool.
    let sampler = {
        let (stats, store) = (stats.clone(), store.clone());
        let every = crate::drain::sample_interval(cfg.drain_window_ms);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let (stats, store) = (stats.clone(), store.clone());
                if tokio::task::spawn_blocking(move || stats.sample_drain(&store)).await.is_err() {
                    return;
                }
            }
        })
    };
    let _sampler = AbortOnDrop(sampler);
    // Backfill requests: read as they are appended, whatever the link does.
    let requests = {
        let (stats, store, mirrors) = (stats.clone(), store.clone(), cfg.clone());
        let (requests_max, ranges_max) = (cfg.backfill_requests_max as usize, cfg.backfill_ranges_max as usize);
        tokio::spawn(async move {
            let mirrored: Arc<dyn Fn(&str) -> bool + Send + Sync> = Arc::new(move |t: &str| mirrors.mirrors(t));
            if let Err(e) =
                crate::backfill::driver::follow_requests(stats, store, mirrored, requests_max, ranges_max).await
            {
                tracing::error!(error = %e, "backfill requests are not read any more");
            }
        })
    };
    let _requests = AbortOnDrop(requests);
    let mut backoff = Backoff::new(
        Duration::from_millis(cfg.reconnect_backoff_min_ms),
        Duration::from_millis(cfg.reconnect_backoff_max_ms),
    );
    let bucket = Arc::new(Mutex::new(LinkShare::new(
        cfg.bandwidth_bytes_per_s_max,
        cfg.bandwidth_bytes_per_s_max.max(cfg.read_bytes_max),
        cfg.fresh_share_percent,
        Instant::now(),
    )));
    tokio::pin!(shutdown);
    loop {
        let started = Instant::now();
        let session = connect_and_stream(&cfg, &client, &store, &stats, &bucket, &defaults);
        let outcome = tokio::select! {
            () = &mut shutdown => {
                stats.set_link(false, None);
                return Ok(());
            }
            r = session => r,
        };
        if let Err(e) = &outcome {
            tracing::warn!(error = %e, cloud = %cfg.cloud, "mirror link down");
        }
        stats.set_link(false, outcome.err().map(|e| e.to_string()));
        if started.elapsed() > Duration::from_secs(30) {
            backoff.reset();
        }
        stats.reconnects.fetch_add(1, Ordering::Relaxed);
        let delay = backoff.next_delay(rand::random::<f64>());
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

async fn resolve(cloud: &str) -> Result<SocketAddr, MirrorError> {
    tokio::net::lookup_host(cloud)
        .await
        .map_err(|_| MirrorError::Resolve(cloud.to_string()))?
        .next()
        .ok_or_else(|| MirrorError::Resolve(cloud.to_string()))
}

async fn connect_and_stream(
    cfg: &MirrorConfig,
    client: &quinn::ClientConfig,
    store: &Store,
    stats: &Arc<MirrorStats>,
    bucket: &Arc<Mutex<LinkShare>>,
    defaults: &TopicConfig,
) -> Result<(), MirrorError> {
    let addr = resolve(&cfg.cloud).await?;
    let bind: SocketAddr = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
        .parse()
        .map_err(|_| MirrorError::Resolve("bind address".into()))?;
    let endpoint = quinn::Endpoint::client(bind).map_err(MirrorError::Endpoint)?;
    // A handshake to a receiver that is down resends at 1, 3, 7, 15, 31 s until the idle
    // timeout: bound it, so the reconnect backoff decides when to try again.
    let connecting = endpoint.connect_with(client.clone(), addr, cfg.server_name())?;
    let conn = tokio::time::timeout(Duration::from_millis(cfg.connect_timeout_ms), connecting)
        .await
        .map_err(|_| MirrorError::HandshakeTimeout(cfg.connect_timeout_ms))??;
    stats.connects.fetch_add(1, Ordering::Relaxed);
    *stats.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn.clone());
    stats.set_link(true, None);
    tracing::info!(cloud = %cfg.cloud, site = %cfg.site, "mirror link up");
    // A lost stream says little: the connection's close reason says why (a TLS alert when the
    // cloud refused the certificate, the cloud's own reason otherwise).
    let result = match stream_session(cfg, &conn, store, stats, bucket, defaults).await {
        Err(MirrorError::Read(_) | MirrorError::Write(_) | MirrorError::Closed) if conn.close_reason().is_some() => {
            Err(conn.close_reason().map_or(MirrorError::Closed, MirrorError::Connection))
        }
        other => other,
    };
    *stats.current.lock().unwrap_or_else(PoisonError::into_inner) = None;
    stats.wire_bytes_closed.fetch_add(conn.stats().udp_tx.bytes, Ordering::Relaxed);
    conn.close(0u32.into(), b"gateway session ended");
    endpoint.wait_idle().await;
    result
}

/// The partitions this gateway mirrors, with their extents; then the live streams of the fresh
/// topics among them (named `{topic}.live`, with the same extents), within the same
/// `mirror.partitions_max`.
fn report(cfg: &MirrorConfig, store: &Store, stats: &MirrorStats) -> Vec<PartitionReport> {
    let mut out = Vec::new();
    for t in store.topics() {
        if !cfg.mirrors(&t.name) {
            continue;
        }
        for p in 0..t.partitions as i32 {
            if out.len() >= cfg.partitions_max as usize {
                tracing::warn!(topic = %t.name, partition = p, "mirror.partitions_max reached: partition not mirrored");
                return out;
            }
            if let Ok(wm) = store.watermarks(&t.name, p) {
                out.push(PartitionReport {
                    topic: t.name.clone(),
                    partition: p,
                    partitions: t.partitions as i32,
                    log_start: wm.log_start_offset,
                    high_watermark: wm.high_watermark,
                });
            }
        }
    }
    let live: Vec<PartitionReport> = out
        .iter()
        .filter(|p| has_live(cfg, store, &p.topic))
        .filter_map(|p| {
            let name = fresh::live_topic(&p.topic);
            (live_source(cfg, store, &name).as_deref() == Some(p.topic.as_str()))
                .then(|| PartitionReport { topic: name, ..p.clone() })
        })
        .collect();
    for p in live {
        if out.len() >= cfg.partitions_max as usize {
            tracing::warn!(topic = %p.topic, partition = p.partition, "mirror.partitions_max reached: live stream not mirrored");
            break;
        }
        out.push(p);
    }
    // Backfills of topics not otherwise mirrored, under the topic's own name.
    for (topic, partition) in stats.backfills.partitions() {
        if cfg.mirrors(&topic) {
            continue;
        }
        if out.len() >= cfg.partitions_max as usize {
            tracing::warn!(%topic, partition, "mirror.partitions_max reached: backfill waits");
            break;
        }
        let (Some(info), Ok(wm)) = (store.topic(&topic), store.watermarks(&topic, partition)) else { continue };
        out.push(PartitionReport {
            topic,
            partition,
            partitions: info.partitions as i32,
            log_start: wm.log_start_offset,
            high_watermark: wm.high_watermark,
        });
    }
    out
}

/// The source topic of a live stream's name: `{topic}.live` of a fresh or latest-first topic, unless a topic of
/// that very name exists on the gateway (it is mirrored as itself; the fresh topic then has no
/// live stream), or the name is longer than a topic name may be.
fn live_source(cfg: &MirrorConfig, store: &Store, name: &str) -> Option<String> {
    let source = name.strip_suffix(fresh::LIVE_SUFFIX)?;
    if name.len() > TOPIC_BYTES_MAX || !has_live(cfg, store, source) {
        return None;
    }
    if store.topic(name).is_some() {
        // Warned once at start (`run`); this runs every report.
        return None;
    }
    Some(source.to_string())
}

/// Whether a mirrored topic has a live stream: it is a fresh topic, or a latest-first one that
/// is compacted (`*` in `mirror.latest_first_topics` covers the compacted topics only).
fn has_live(cfg: &MirrorConfig, store: &Store, topic: &str) -> bool {
    let Some(info) = store.topic(topic) else { return false };
    cfg.fresh(topic) || (cfg.latest_first(topic) && info.config.compacted())
}

/// The settings of the compacted topics among `reported` (version 2's `TopicConfigs`), in
/// frames of at most `TOPIC_CONFIGS_PER_FRAME_MAX` topics.
fn topic_settings(store: &Store, reported: &[PartitionReport]) -> Vec<TopicSettings> {
    let mut out: Vec<TopicSettings> = Vec::new();
    for p in reported {
        if out.last().is_some_and(|t| t.topic == p.topic) {
            continue;
        }
        let Some(info) = store.topic(&p.topic) else { continue };
        if !info.config.compacted() {
            continue;
        }
        let configs = MIRRORED_TOPIC_CONFIGS
            .iter()
            .filter_map(|k| info.config.get(k).map(|v| (k.to_string(), v)))
            .filter(|(_, v)| v.len() <= TOPIC_CONFIG_VALUE_BYTES_MAX)
            .collect();
        out.push(TopicSettings { topic: p.topic.clone(), configs });
    }
    out
}

/// The own settings (version 4's `TopicOverrides`) of the topics among `reported` that the
/// gateway mirrors as themselves (not live streams, not backfills), one entry per topic.
fn own_settings_now(
    cfg: &MirrorConfig,
    store: &Store,
    defaults: &TopicConfig,
    reported: &[PartitionReport],
) -> Vec<TopicSettings> {
    let mut out: Vec<TopicSettings> = Vec::new();
    for p in reported {
        if out.last().is_some_and(|t| t.topic == p.topic) || !cfg.mirrors(&p.topic) {
            continue;
        }
        let Some(info) = store.topic(&p.topic) else { continue };
        out.push(TopicSettings { topic: p.topic.clone(), configs: own_settings(&info.config, defaults) });
    }
    out
}

/// What a session announces of topics' own settings: nothing below protocol version 4 (an
/// older receiver would end the session on the frame).
fn announcer(version: u8) -> Option<Announced> {
    (version >= 4).then(Announced::default)
}

/// The `TopicOverrides` frames of what is due now (none when nothing is, or below version 4).
fn overrides_frames(announced: Option<&mut Announced>, now: impl FnOnce() -> Vec<TopicSettings>) -> Vec<u8> {
    let Some(announced) = announced else { return Vec::new() };
    let due = announced.due(now());
    let mut out = Vec::new();
    for chunk in due.chunks(TOPIC_OVERRIDES_PER_FRAME_MAX) {
        for t in chunk {
            tracing::info!(topic = %t.topic, settings = ?t.configs, "topic's own settings announced to the centre");
        }
        out.extend_from_slice(&Control::TopicOverrides(chunk.to_vec()).encode());
    }
    out
}

/// The frames that announce `settings` (none when empty).
fn topic_settings_frames(settings: &[TopicSettings]) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in settings.chunks(TOPIC_CONFIGS_PER_FRAME_MAX) {
        out.extend_from_slice(&Control::TopicConfigs(chunk.to_vec()).encode());
    }
    out
}

async fn stream_session(
    cfg: &MirrorConfig,
    conn: &quinn::Connection,
    store: &Store,
    stats: &Arc<MirrorStats>,
    bucket: &Arc<Mutex<LinkShare>>,
    defaults: &TopicConfig,
) -> Result<(), MirrorError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&Control::Hello { site: cfg.site.clone() }.encode()).await?;
    let mut reported = report(cfg, store, stats);
    // Compacted topics' settings (version 2 only), ahead of the partitions that need them.
    let version = crate::protocol::alpn_version(tls::negotiated_alpn(conn).as_deref());
    let v2 = version >= 2;
    let mut settings = if v2 { topic_settings(store, &reported) } else { Vec::new() };
    send.write_all(&topic_settings_frames(&settings)).await?;
    // Every mirrored topic's own settings (version 4 only), then again whenever they change.
    let mut announced = announcer(version);
    send.write_all(&overrides_frames(announced.as_mut(), || own_settings_now(cfg, store, defaults, &reported))).await?;
    send.write_all(&Control::Partitions(reported.clone()).encode()).await?;
    let mut credits: HashMap<(String, i32), Arc<Credit>> = HashMap::new();
    let view_slots = Arc::new(tokio::sync::Semaphore::new(cfg.latest_first_views_max as usize));
    let mut senders = JoinSet::new();
    let mut decoder = Decoder::new(1 << 20);
    let mut buf = vec![0u8; 16 * 1024];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Committed offsets go only to a receiver that speaks version 2.
    let offsets_on = v2;
    if offsets_on {
        stats.commits.resend_all();
    }
    let mut offsets_tick = tokio::time::interval(Duration::from_millis(cfg.offsets_interval_ms));
    loop {
        tokio::select! {
            n = recv.read(&mut buf) => {
                let Some(n) = n? else { return Err(MirrorError::Closed) };
                decoder.feed(&buf[..n]);
                while let Some(frame) = decoder.next_control()? {
                    match frame {
                        Control::Start { topic, partition, offset } => {
                            let credit = Arc::new(Credit::default());
                            credits.insert((topic.clone(), partition), credit.clone());
                            if let Some(source) = live_source(cfg, store, &topic) {
                                // Latest-first for a compacted topic named in the config.
                                let compacted = store.topic(&source).is_some_and(|t| t.config.compacted());
                                let latest_first = (cfg.latest_first(&source) && compacted).then(|| LatestFirst {
                                    map_bytes_max: cfg.latest_first_map_bytes_max,
                                    slots: view_slots.clone(),
                                });
                                let task = LiveSender {
                                    conn: conn.clone(),
                                    store: store.clone(),
                                    name: topic,
                                    topic: source,
                                    partition,
                                    credit,
                                    read_bytes_max: cfg.read_bytes_max,
                                    age_ms: cfg.fresh_age_ms,
                                    latest_first,
                                    stats: stats.clone(),
                                    bucket: bucket.clone(),
                                };
                                senders.spawn(task.run(offset));
                                continue;
                            }
                            if !cfg.mirrors(&topic) && stats.backfills.planned(&topic, partition) {
                                let task = BackfillSender {
                                    conn: conn.clone(),
                                    store: store.clone(),
                                    topic,
                                    partition,
                                    credit,
                                    read_bytes_max: cfg.read_bytes_max,
                                    backfills: stats.backfills.clone(),
                                    bucket: bucket.clone(),
                                };
                                senders.spawn(task.run(offset));
                                continue;
                            }
                            let progress = stats.progress(&topic, partition);
                            progress.started_at.store(offset, Ordering::Relaxed);
                            progress.sent.store(offset, Ordering::Relaxed);
                            progress.head_timestamp_ms.store(HEAD_NONE, Ordering::Relaxed);
                            stats.changed();
                            let task = PartitionSender {
                                conn: conn.clone(),
                                store: store.clone(),
                                urgent: cfg.urgent_topics.contains(&topic),
                                topic,
                                partition,
                                credit,
                                read_bytes_max: cfg.read_bytes_max,
                                wire: WireForm { compression: cfg.wire_compression, limit: cfg.wire_recompress_bytes_max },
                                stats: stats.clone(),
                                progress,
                                bucket: bucket.clone(),
                            };
                            senders.spawn(task.run(offset));
                        }
                        Control::Credit { topic, partition, bytes } => {
                            if let Some(c) = credits.get(&(topic, partition)) {
                                c.grant(bytes);
                            }
                        }
                        Control::Mirrored { topic, partition, .. } if live_source(cfg, store, &topic).is_some() => {
                            // A live stream's progress marks nothing on the gateway: the ordered
                            // stream's marks alone let retention delete.
                            tracing::trace!(%topic, partition, "live stream stored");
                        }
                        Control::Mirrored { topic, partition, offset } if !cfg.mirrors(&topic) => {
                            // A backfill: its position, not an archive mark (the records below
                            // its ranges never went).
                            stats.backfills.mirrored(store, &topic, partition, offset).await?;
                            stats.changed();
                        }
                        Control::Mirrored { topic, partition, offset } => {
                            store.set_archived(&topic, partition, offset).await?;
                            stats.progress(&topic, partition).mirrored.store(offset, Ordering::Relaxed);
                            stats.changed();
                        }
                        Control::Refused { reason } => return Err(MirrorError::Refused(reason)),
                        Control::Hello { .. }
                        | Control::Partitions(_)
                        | Control::Offsets(_)
                        | Control::TopicConfigs(_)
                        | Control::TopicOverrides(_) => {
                            return Err(ProtocolError::Unexpected("gateway-side").into());
                        }
                        Control::RestoreHello { .. }
                        | Control::RestoreTopics(_)
                        | Control::RestoreOffsets(_)
                        | Control::RestoreListed
                        | Control::RestoreStart { .. }
                        | Control::RestoreGroups(_) => {
                            return Err(ProtocolError::Unexpected("restore frame in a mirror session").into());
                        }
                    }
                }
            }
            Some(done) = senders.join_next() => {
                match done {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e),
                    Err(e) => return Err(MirrorError::Refused(format!("partition sender failed: {e}"))),
                }
            }
            _ = offsets_tick.tick(), if offsets_on => {
                // A partition started in this session has its progress; an offset goes once the
                // records below it are on their data stream (the receiver still waits until they
                // are stored before translating it).
                let sent_to = |topic: &str, partition: i32| {
                    if !credits.contains_key(&(topic.to_string(), partition)) {
                        return None;
                    }
                    stats.partition(topic, partition).map(|p| p.sent.load(Ordering::Relaxed))
                };
                loop {
                    let batch = stats.commits.take(OFFSETS_PER_FRAME_MAX, sent_to);
                    if batch.is_empty() {
                        break;
                    }
                    let n = batch.len() as u64;
                    send.write_all(&Control::Offsets(batch).encode()).await?;
                    stats.commits.sent.fetch_add(n, Ordering::Relaxed);
                }
            }
            _ = tick.tick() => {
                // New topics or partitions (and moved extents, for the cloud's lag view).
                let now = report(cfg, store, stats);
                // Own settings first named or altered since (version 4), ahead of the partitions.
                let frames = overrides_frames(announced.as_mut(), || own_settings_now(cfg, store, defaults, &now));
                send.write_all(&frames).await?;
                if now != reported {
                    if v2 {
                        let fresh = topic_settings(store, &now);
                        if fresh != settings {
                            send.write_all(&topic_settings_frames(&fresh)).await?;
                            settings = fresh;
                        }
                    }
                    send.write_all(&Control::Partitions(now.clone()).encode()).await?;
                    reported = now;
                }
            }
        }
    }
}

/// Streams one partition from the offset the cloud asked for.
struct PartitionSender {
    conn: quinn::Connection,
    store: Store,
    topic: String,
    partition: i32,
    urgent: bool,
    credit: Arc<Credit>,
    read_bytes_max: u64,
    wire: WireForm,
    stats: Arc<MirrorStats>,
    progress: Arc<PartitionProgress>,
    bucket: Arc<Mutex<LinkShare>>,
}

impl PartitionSender {
    async fn run(self, from: i64) -> Result<(), MirrorError> {
        let mut stream = self.conn.open_uni().await?;
        // Urgent topics go first when the link is the bottleneck.
        let _ = stream.set_priority(if self.urgent { 1 } else { 0 });
        stream.write_all(&Data::Open { topic: self.topic.clone(), partition: self.partition }.encode_header()).await?;
        let mut watch = self.store.watch(&self.topic, self.partition)?;
        let mut next = from;
        loop {
            // Within the credit the cloud granted.
            let credit = self.credit.wait().await;
            let wm = self.store.watermarks(&self.topic, self.partition)?;
            if next < wm.log_start_offset {
                // Retention deleted records the cloud does not have: say so, then go on.
                self.send_gap(&mut stream, next, wm.log_start_offset, GapCause::Retention).await?;
                next = wm.log_start_offset;
                continue;
            }
            if next >= wm.high_watermark {
                self.progress.head_timestamp_ms.store(HEAD_NONE, Ordering::Relaxed);
                if !watch.changed().await {
                    return Err(StoreError::UnknownTopic(self.topic.clone()).into());
                }
                continue;
            }
            // The read runs on the blocking pool: a redb read can wait on the disk, and the
            // runtime has two async workers for every connection.
            let max = credit.min(self.read_bytes_max) as usize;
            let (store, topic, partition, wire) = (self.store.clone(), self.topic.clone(), self.partition, self.wire);
            // Recompressed for the wire on the blocking pool too (CPU, not I/O, but not short).
            let read = tokio::task::spawn_blocking(move || {
                store.fetch(&topic, partition, next, max).map(|mut f| {
                    f.data = wire.apply(f.data);
                    f
                })
            })
            .await
            .map_err(|e| MirrorError::Refused(format!("store read task: {e}")))?;
            let fetched = match read {
                Ok(f) => f,
                Err(StoreError::OffsetOutOfRange { log_start_offset, .. }) if log_start_offset > next => {
                    self.send_gap(&mut stream, next, log_start_offset, GapCause::Retention).await?;
                    next = log_start_offset;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let mut rest: Bytes = fetched.data;
            while !rest.is_empty() {
                let h = BatchHeader::parse(&rest).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                let batch = rest.split_to(h.total_len().min(rest.len()));
                self.progress.head_timestamp_ms.store(h.max_timestamp.min(HEAD_NONE - 1), Ordering::Relaxed);
                match outgoing(batch)? {
                    Data::Batch(batch) => {
                        let len = send_batch(&self.bucket, Class::Ordered, &mut stream, batch).await?;
                        self.credit.spend(len);
                        self.stats.batch_bytes_sent.fetch_add(len, Ordering::Relaxed);
                    }
                    Data::Gap { from, to } => self.send_gap(&mut stream, from, to, GapCause::Lost).await?,
                    Data::Open { .. } | Data::Restored { .. } | Data::RestoreEnd { .. } => {
                        return Err(ProtocolError::Unexpected("open from the store").into())
                    }
                }
                next = h.next_offset();
                self.progress.sent.store(next, Ordering::Relaxed);
            }
        }
    }

    async fn send_gap(
        &self,
        stream: &mut quinn::SendStream,
        from: i64,
        to: i64,
        cause: GapCause,
    ) -> Result<(), MirrorError> {
        match cause {
            GapCause::Retention => tracing::warn!(topic = %self.topic, partition = self.partition, from, to,
                "retention deleted records before they were mirrored: sending a gap marker"),
            GapCause::Lost => tracing::warn!(topic = %self.topic, partition = self.partition, from, to,
                "records lost in a crash (relaxed durability): sending a gap marker"),
        }
        self.stats.gaps.fetch_add(1, Ordering::Relaxed);
        self.stats.gap_records.fetch_add((to - from).max(0) as u64, Ordering::Relaxed);
        stream.write_all(&Data::Gap { from, to }.encode_header()).await?;
        Ok(())
    }
}

/// Streams one partition's fresh tail on its live stream during a backlog (`fresh.rs` decides
/// what; this reads and sends): stored batches as they are, within the live stream's own credit
/// and the live share of the cap, at a QUIC priority above every ordered stream.
struct LiveSender {
    conn: quinn::Connection,
    store: Store,
    /// The stream's name (`{topic}.live`) and its source topic.
    name: String,
    topic: String,
    partition: i32,
    credit: Arc<Credit>,
    read_bytes_max: u64,
    age_ms: u64,
    /// Latest-first catch-up: its key map's memory and the session's places for views.
    latest_first: Option<LatestFirst>,
    stats: Arc<MirrorStats>,
    bucket: Arc<Mutex<LinkShare>>,
}

/// A latest-first live stream's limits: one view's key map (`mirror.latest_first_map_bytes_max`)
/// and the places for views running at once (`mirror.latest_first_views_max`, shared by the
/// session's live streams), so the maps together stay within their product.
struct LatestFirst {
    map_bytes_max: u64,
    slots: Arc<tokio::sync::Semaphore>,
}

/// A running view's place: counted in `MirrorStats::latest_views_running` while held.
struct ViewSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    stats: Arc<MirrorStats>,
}

impl ViewSlot {
    async fn take(slots: &Arc<tokio::sync::Semaphore>, stats: &Arc<MirrorStats>) -> Result<Self, MirrorError> {
        let permit = slots.clone().acquire_owned().await.map_err(|_| MirrorError::Closed)?;
        stats.latest_views_running.fetch_add(1, Ordering::Relaxed);
        Ok(Self { _permit: permit, stats: stats.clone() })
    }
}

impl Drop for ViewSlot {
    fn drop(&mut self) {
        self.stats.latest_views_running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How often a live stream with nothing to send checks again whether a backlog began (new
/// records wake it at once): a quarter of the fresh age, within 100 ms to 1 s.
fn live_check_interval(age_ms: u64) -> Duration {
    Duration::from_millis(age_ms / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

impl LiveSender {
    async fn run(self, from: i64) -> Result<(), MirrorError> {
        let mut stream = self.conn.open_uni().await?;
        // Above urgent topics' ordered streams (1) and the rest (0): fresh data goes first.
        let _ = stream.set_priority(2);
        stream.write_all(&Data::Open { topic: self.name.clone(), partition: self.partition }.encode_header()).await?;
        self.stats.live_streams.fetch_add(1, Ordering::Relaxed);
        let result = self.pump(&mut stream, from).await;
        self.stats.live_streams.fetch_sub(1, Ordering::Relaxed);
        result
    }

    async fn pump(&self, stream: &mut quinn::SendStream, from: i64) -> Result<(), MirrorError> {
        let ordered = self.stats.progress(&self.topic, self.partition);
        let mut tail = FreshTail::new(self.age_ms, from);
        let mut watch = self.store.watch(&self.topic, self.partition)?;
        let check = live_check_interval(self.age_ms);
        let mut view = self.latest_first.as_ref().map(|l| LatestView::new(l.map_bytes_max));
        // While a view runs: its place among `mirror.latest_first_views_max`.
        let mut slot: Option<ViewSlot> = None;
        loop {
            let credit = self.credit.wait().await;
            let wm = self.store.watermarks(&self.topic, self.partition)?;
            let sent = ordered.sent.load(Ordering::Relaxed);
            // One reading of the ordered stream's head and of the clock for the view and the
            // fresh tail alike: the tail must not see a backlog the view has not seen (it would
            // move the preview past the backlog before its view began).
            let (head_ms, now) = (ordered.head_ms(), now_ms());
            if let Some(mut v) = view.take() {
                // The backlog's compacted view first; the fresh tail once it is over.
                let backlog = tail.backlog(sent, wm.high_watermark, head_ms, now);
                if backlog && v.waiting() && slot.is_none() {
                    // A view's key map only within the views' total memory: wait for a place.
                    if let Some(l) = &self.latest_first {
                        slot = Some(ViewSlot::take(&l.slots, &self.stats).await?);
                    }
                    view = Some(v);
                    continue;
                }
                let was_waiting = v.waiting();
                match v.step(backlog, tail.next(), sent, wm.high_watermark, now) {
                    ViewStep::Wait => {
                        if v.waiting() {
                            slot = None;
                        }
                        view = Some(v);
                    }
                    ViewStep::Done { to } => {
                        slot = None;
                        self.view_done(&v);
                        view = Some(v);
                        tail.seek(Some(to), wm.high_watermark);
                        continue;
                    }
                    ViewStep::Map { from } => {
                        if was_waiting {
                            self.stats.latest_views_started.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(topic = %self.topic, partition = self.partition, from,
                                to = wm.high_watermark, "latest-first: sending the backlog's compacted view");
                        }
                        view = Some(self.view_map(v, from, credit).await?);
                        continue;
                    }
                    ViewStep::Emit { from } => {
                        view = Some(self.view_emit(v, from, credit, stream).await?);
                        continue;
                    }
                }
            }
            let from = match tail.step(sent, wm.high_watermark, head_ms, now) {
                Step::Idle => {
                    tokio::select! {
                        alive = watch.changed() => if !alive {
                            return Err(StoreError::UnknownTopic(self.topic.clone()).into());
                        },
                        () = tokio::time::sleep(check) => {}
                    }
                    continue;
                }
                Step::Read { from } => from,
            };
            let max = credit.min(self.read_bytes_max) as usize;
            let (store, topic, partition) = (self.store.clone(), self.topic.clone(), self.partition);
            let read = tokio::task::spawn_blocking(move || store.fetch(&topic, partition, from, max))
                .await
                .map_err(|e| MirrorError::Refused(format!("store read task: {e}")))?;
            let fetched = match read {
                Ok(f) => f,
                Err(StoreError::OffsetOutOfRange { log_start_offset, high_watermark, .. }) => {
                    tail.seek(Some(log_start_offset), high_watermark);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if fetched.data.is_empty() {
                // Nothing stored from there to the high watermark read before (compaction holes).
                tail.seek(Some(fetched.next_offset.max(wm.high_watermark)), wm.high_watermark);
                continue;
            }
            let mut rest: Bytes = fetched.data;
            while !rest.is_empty() {
                let h = BatchHeader::parse(&rest).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                let batch = rest.split_to(h.total_len().min(rest.len()));
                if h.is_control() {
                    // Offsets a crash lost: the ordered stream reports them; a preview skips them.
                    tail.seek(Some(h.next_offset()), wm.high_watermark);
                    continue;
                }
                let now = now_ms();
                match tail.offer(
                    h.base_offset,
                    h.next_offset(),
                    h.max_timestamp,
                    ordered.sent.load(Ordering::Relaxed),
                    now,
                ) {
                    Verdict::Send => {
                        let len = send_batch(&self.bucket, Class::Live, stream, batch).await?;
                        self.credit.spend(len);
                        self.stats.live_batch_bytes_sent.fetch_add(len, Ordering::Relaxed);
                        self.stats.live_batches_sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Verdict::Seek { cutoff_ms } => {
                        let (store, topic, partition) = (self.store.clone(), self.topic.clone(), self.partition);
                        let found = tokio::task::spawn_blocking(move || {
                            store.offset_for_timestamp(&topic, partition, cutoff_ms)
                        })
                        .await
                        .map_err(|e| MirrorError::Refused(format!("store read task: {e}")))??;
                        // Past this batch at least, whatever timestamps below it say.
                        tail.seek(found.map(|(offset, _)| offset.max(h.next_offset())), wm.high_watermark);
                        self.stats.live_seeks.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Verdict::Stop => break,
                }
            }
        }
    }
}

/// The latest-first view's reads and sends (`latest.rs` decides): each a read of at most the
/// credit and `mirror.read_bytes_max`, decoded on the blocking pool, so the view never holds the
/// store's writer (reads are their own transactions) nor a runtime worker.
impl LiveSender {
    fn view_done(&self, v: &LatestView) {
        let Some(ms) = v.time_to_current_ms() else { return };
        let s = &self.stats;
        s.latest_views_done.fetch_add(1, Ordering::Relaxed);
        s.latest_view_windows.fetch_add(v.windows(), Ordering::Relaxed);
        s.latest_view_keys.fetch_add(v.keys_mapped(), Ordering::Relaxed);
        s.latest_view_last_ms.store(ms.max(0) as u64, Ordering::Relaxed);
        tracing::info!(topic = %self.topic, partition = self.partition, ms, windows = v.windows(),
            keys = v.keys_mapped(), "latest-first: the compacted view is sent");
    }

    /// Reads stored batches from `from` (or the log start, if retention moved it past) into
    /// the blocking closure `each`, which returns whether to go on.
    fn read_view<T: Send + 'static>(
        &self,
        v: LatestView,
        from: i64,
        credit: u64,
        each: impl Fn(&mut LatestView, Bytes, u64, &mut T) -> Result<bool, MirrorError> + Send + 'static,
        mut out: T,
    ) -> impl std::future::Future<Output = Result<(LatestView, T), MirrorError>> {
        let max = credit.min(self.read_bytes_max) as usize;
        let (store, topic, partition) = (self.store.clone(), self.topic.clone(), self.partition);
        async move {
            tokio::task::spawn_blocking(move || {
                let mut v = v;
                let limit = store.config().decompressed_size_bytes_max;
                let fetched = match store.fetch(&topic, partition, from, max) {
                    Err(StoreError::OffsetOutOfRange { log_start_offset, .. }) if log_start_offset > from => {
                        store.fetch(&topic, partition, log_start_offset, max)?
                    }
                    other => other?,
                };
                if fetched.data.is_empty() {
                    v.nothing_stored();
                    return Ok((v, out));
                }
                let mut rest: Bytes = fetched.data;
                while !rest.is_empty() {
                    let h = BatchHeader::parse(&rest).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                    let batch = rest.split_to(h.total_len().min(rest.len()));
                    if !each(&mut v, batch, limit, &mut out)? {
                        break;
                    }
                }
                Ok((v, out))
            })
            .await
            .map_err(|e| MirrorError::Refused(format!("store read task: {e}")))?
        }
    }

    /// One read of the map phase.
    async fn view_map(&self, v: LatestView, from: i64, credit: u64) -> Result<LatestView, MirrorError> {
        let each = |v: &mut LatestView, batch: Bytes, limit: u64, _: &mut ()| {
            let verdict = v.map(&batch, limit).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            Ok(verdict != latest::Verdict::Stop)
        };
        Ok(self.read_view(v, from, credit, each, ()).await?.0)
    }

    /// One read of the sending phase: each batch rewritten with the records that are their key's
    /// latest in the window, then sent on the live stream within the live share of the cap.
    async fn view_emit(
        &self,
        v: LatestView,
        from: i64,
        credit: u64,
        stream: &mut quinn::SendStream,
    ) -> Result<LatestView, MirrorError> {
        let each = |v: &mut LatestView, batch: Bytes, limit: u64, out: &mut (Vec<Bytes>, u64)| {
            let h = BatchHeader::parse(&batch).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            match v.emit(h.base_offset, h.next_offset()) {
                latest::Verdict::Stop => return Ok(false),
                latest::Verdict::Skip => return Ok(true),
                latest::Verdict::Next => {}
            }
            if h.is_control() {
                // Offsets a crash lost: the ordered stream reports them; a preview skips them.
                return Ok(true);
            }
            let mut kept = 0u64;
            let retained = retain_records(&batch, limit, |r, offset| {
                let keep = v.keep(r.key, offset);
                kept += u64::from(keep);
                keep
            })
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            match retained {
                Retained::All => out.0.push(batch),
                Retained::Some { batch, .. } => out.0.push(Bytes::from(batch)),
                Retained::None => {}
            }
            out.1 += kept;
            Ok(true)
        };
        let (v, (batches, records)) = self.read_view(v, from, credit, each, (Vec::new(), 0)).await?;
        for batch in batches {
            let len = send_batch(&self.bucket, Class::Live, stream, batch).await?;
            self.credit.spend(len);
            self.stats.live_batch_bytes_sent.fetch_add(len, Ordering::Relaxed);
            self.stats.live_batches_sent.fetch_add(1, Ordering::Relaxed);
            self.stats.latest_view_bytes_sent.fetch_add(len, Ordering::Relaxed);
        }
        self.stats.latest_view_records_sent.fetch_add(records, Ordering::Relaxed);
        Ok(v)
    }
}

/// The form stored batches take on the link (`mirror.wire_compression`).
#[derive(Debug, Clone, Copy)]
struct WireForm {
    compression: WireCompression,
    /// `mirror.wire_recompress_bytes_max`: larger batches go as stored.
    limit: u64,
}

impl WireForm {
    /// `data` (whole stored batches) with each batch recompressed where that is smaller; a batch
    /// that cannot be (a control batch, one past the limit, a corrupt one: the sender's own
    /// checks then see it as stored) goes as stored. Offsets, timestamps and records unchanged.
    fn apply(self, data: Bytes) -> Bytes {
        if self.compression == WireCompression::None {
            return data;
        }
        let mut out = BytesMut::with_capacity(data.len());
        let mut rest = &data[..];
        while !rest.is_empty() {
            let len = BatchHeader::parse(rest).map_or(rest.len(), |h| h.total_len().min(rest.len()));
            let (batch, tail) = rest.split_at(len);
            match tributary_log::batch::recompress(batch, Codec::Zstd, self.limit) {
                Ok(Some(smaller)) => out.extend_from_slice(&smaller),
                Ok(None) | Err(_) => out.extend_from_slice(batch),
            }
            rest = tail;
        }
        out.freeze()
    }
}

/// Why offsets are sent as a gap instead of records.
#[derive(Debug, Clone, Copy)]
enum GapCause {
    /// Retention deleted them before they were mirrored.
    Retention,
    /// The store lost them (a crash on a `durability = "relaxed"` topic) and filled their offsets
    /// with a control batch.
    Lost,
}

/// What goes on the wire for one stored batch: the batch as stored, or for a control batch a
/// gap marker over its offsets. Clients can never store control batches; the store writes one
/// over offsets whose records a crash lost, so the central cluster records the loss in its gaps
/// topic instead of receiving control records as data.
fn outgoing(batch: Bytes) -> Result<Data, StoreError> {
    let h = BatchHeader::parse(&batch).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(if h.is_control() { Data::Gap { from: h.base_offset, to: h.next_offset() } } else { Data::Batch(batch) })
}

/// Waits for `class`'s share of the bandwidth cap, then writes one batch frame; the batch's length.
pub(crate) async fn send_batch(
    bucket: &Mutex<LinkShare>,
    class: Class,
    stream: &mut quinn::SendStream,
    batch: Bytes,
) -> Result<u64, MirrorError> {
    let len = batch.len() as u64;
    let wait = bucket.lock().unwrap_or_else(PoisonError::into_inner).take(class, len, Instant::now());
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    stream.write_all(&Data::Batch(batch.clone()).encode_header()).await?;
    stream.write_chunk(batch).await?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use tributary_log::batch::{encode_batch, NewRecord};
    use tributary_log::{Codec, TimestampKind};

    use super::*;

    fn batch(base: i64, n: usize) -> Vec<u8> {
        let records: Vec<NewRecord> = (0..n).map(|i| NewRecord::new(None::<Bytes>, format!("r{i}"))).collect();
        let with_ts: Vec<_> = records.iter().map(|r| (r, 1_700_000_000_000)).collect();
        let mut out = Vec::new();
        encode_batch(&with_ts, base, Codec::None, TimestampKind::CreateTime, 0, &mut out).expect("encode");
        out
    }

    #[test]
    fn committed_offsets_coalesce_wait_for_their_data_and_stay_within_the_limit() {
        let feed = CommitFeed::new(3);
        assert!(feed.offer("g1", "meters", 0, 5, 1));
        assert!(feed.offer("g1", "meters", 0, 9, 2), "the same partition again: coalesced");
        assert!(feed.offer("g2", "meters", 0, 20, 3));
        assert!(feed.offer("g1", "meters", 1, 4, 4));
        assert!(!feed.offer("g3", "meters", 0, 1, 5), "a fourth key is over the limit");
        assert!(!feed.offer(&"g".repeat(GROUP_ID_BYTES_MAX + 1), "meters", 0, 1, 5), "group id too long");
        assert_eq!(feed.dropped.load(Ordering::Relaxed), 2);
        assert_eq!(feed.pending(), (3, 3));
        // Partition 0 has sent up to 10, partition 1 is not streaming yet.
        let sent_to = |_: &str, p: i32| (p == 0).then_some(10);
        let got = feed.take(10, sent_to);
        assert_eq!(got.len(), 1, "only g1's 9 has its data sent: {got:?}");
        assert_eq!((got[0].group.as_str(), got[0].offset, got[0].commit_time_ms), ("g1", 9, 2));
        assert_eq!(feed.take(10, sent_to), vec![], "sent once");
        let got = feed.take(10, |_, _| Some(100));
        assert_eq!(
            got.iter().map(|c| (c.group.as_str(), c.partition, c.offset)).collect::<Vec<_>>(),
            vec![("g1", 1, 4), ("g2", 0, 20)]
        );
        // A new commit goes again; a new session sends everything again, a frame's worth at a time.
        feed.offer("g2", "meters", 0, 21, 6);
        assert_eq!(feed.take(1, |_, _| Some(100)).len(), 1);
        feed.resend_all();
        assert_eq!(feed.pending(), (3, 3));
        assert_eq!(feed.take(2, |_, _| Some(100)).len(), 2);
        assert_eq!(feed.take(2, |_, _| Some(100)).len(), 1);
        assert_eq!(feed.pending(), (3, 0));
    }

    #[test]
    fn own_settings_go_only_to_a_version_4_receiver_and_only_when_due() {
        let now =
            || vec![TopicSettings { topic: "meters".into(), configs: vec![("retention.ms".into(), "3600000".into())] }];
        // Sessions that settled on versions 1 to 3 never carry the frame.
        for version in 1..=3 {
            let mut a = announcer(version);
            assert!(overrides_frames(a.as_mut(), now).is_empty(), "version {version}");
        }
        let mut a = announcer(4);
        let frames = overrides_frames(a.as_mut(), now);
        let mut d = Decoder::new(1 << 20);
        d.feed(&frames);
        assert_eq!(d.next_control(), Ok(Some(Control::TopicOverrides(now()))));
        assert!(overrides_frames(a.as_mut(), now).is_empty(), "unchanged: not sent again");
    }

    #[test]
    fn a_control_batch_goes_out_as_a_gap_and_a_data_batch_as_stored() {
        let data = Bytes::from(batch(40, 5));
        assert_eq!(outgoing(data.clone()).expect("batch"), Data::Batch(data));
        // The same batch with the control attribute (0x20 of the attributes at byte 21..23), as
        // the store writes over offsets a crash lost.
        let mut control = batch(40, 5);
        control[22] |= 0x20;
        assert!(BatchHeader::parse(&control).expect("header").is_control());
        assert_eq!(outgoing(Bytes::from(control)).expect("gap"), Data::Gap { from: 40, to: 45 });
    }
}
