//! The gateway's restore from the central cluster (`tributary restore`), the I/O around
//! `restore.rs`: dials the receiver with the `[mirror]` settings offering protocol versions 4 and 3,
//! gets the site's remote topics and its groups' offsets, creates the topics (the gateway's topic
//! defaults with the lost gateway's own settings of each on top, a setting this gateway refuses
//! skipped and reported; from a version 3 receiver, or for a topic it kept no settings of, the
//! remote copy's compaction settings instead; its partitions), and restores each partition
//! on a stream of its own: every batch written at its original offsets through the store's writer
//! with the partition's progress in the same commit (`Store::restore_records`), credit given back
//! once durable. A run stopped at any point (SIGKILL included) continues where it stopped.

use crate::stream::read_control;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tributary_log::batch::{decode_records, NewRecord};
use tributary_log::{Store, StoreError, TopicConfig};

use crate::config::MirrorConfig;
use crate::overrides::{apply_own, Skipped};
use crate::protocol::{
    CommittedOffset, Control, Data, Decoder, ProtocolError, RestoreTopic, TopicSettings, ALPN_V3, ALPN_V4,
    OPEN_FRAME_BYTES_MAX, RESTORE_GROUPS_PER_FRAME_MAX,
};
use crate::restore::{
    decode_progress, encode_progress, parse_progress_key, plan, progress_key, Action, PlanError, Restore, Selection,
    Snapshot, Stored, RESTORE_PROGRESS,
};
use crate::tls::{self, TlsError};

/// Why a restore stopped. Run it again to continue: what is stored stays.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("QUIC endpoint: {0}")]
    Endpoint(std::io::Error),
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("no QUIC handshake with {0} within mirror.connect_timeout_ms")]
    HandshakeTimeout(String),
    #[error("the receiver at {0} does not speak protocol version 3 (tributary-mirror/3), which restore needs: upgrade tributary-cloud")]
    OldReceiver(String),
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
    #[error("the receiver refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Plan(#[from] PlanError),
    #[error("bad batch from the receiver: {0}")]
    Batch(String),
    #[error("a restore stream task failed here: {0}")]
    Task(String),
    #[error("the receiver closed the restore before it was complete")]
    Closed,
    #[error("topic {topic:?} exists here with {have} partitions; the central cluster has {want}")]
    Partitions { topic: String, have: u32, want: usize },
    #[error("the receiver listed more than {key} = {limit} {what}")]
    OverLimit { key: &'static str, limit: u32, what: &'static str },
}

/// What a restore restores, and the settings of the topics it creates.
#[derive(Debug)]
pub struct RestoreRequest {
    pub selection: Selection,
    /// The settings a new topic gets before the lost gateway's own settings of it (the gateway's
    /// `[topic_defaults]`, as a topic a client created would).
    pub topic_config: TopicConfig,
    /// Consumer groups that consumed in the central cluster meanwhile (failover): their central
    /// commits, translated back to edge offsets, replace their edge checkpoints (failback).
    pub failback_groups: Vec<String>,
}

/// A finished restore.
#[derive(Debug, Clone)]
pub struct RestoreOutcome {
    /// Topics restored (created or already there).
    pub topics: Vec<String>,
    /// The site's groups' committed offsets of those topics (edge offsets), for the caller to
    /// store as the gateway's group offsets: the edge commits the checkpoints carry, replaced by
    /// the central commits of the failback groups.
    pub offsets: Vec<CommittedOffset>,
    /// Of those, the offsets that came from the central cluster's groups (failback).
    pub failed_back: usize,
    /// What became of each restored topic's settings.
    pub settings: Vec<TopicOutcome>,
    /// The progress line's last figures (this run's records and bytes).
    pub last: Snapshot,
    pub elapsed: Duration,
}

/// A restored topic's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicOutcome {
    pub topic: String,
    /// Created by this run with these settings on top of the defaults (the lost gateway's own, or
    /// from a receiver that kept none, the remote copy's compaction settings); `None`: the topic
    /// was there already (an earlier run of this restore created it with the same settings, or a
    /// client did) and keeps what it has.
    pub applied: Option<Vec<(String, String)>>,
    /// Settings this gateway refused (each named in a warning): not applied.
    pub skipped: Vec<Skipped>,
}

/// Runs a restore into `store`; `progress` is called about every `every` and once at the end.
pub async fn restore(
    cfg: &MirrorConfig,
    store: &Store,
    req: RestoreRequest,
    every: Duration,
    mut progress: impl FnMut(&Snapshot, bool),
) -> Result<RestoreOutcome, RestoreError> {
    let started = Instant::now();
    let transport = tls::transport(
        Duration::from_millis(cfg.keep_alive_ms),
        Duration::from_millis(cfg.idle_timeout_ms),
        cfg.restore_streams_max + 4,
        cfg.congestion_controller,
    )?;
    let client =
        tls::client_config_with_versions(&cfg.ca_file, &cfg.cert_file, &cfg.key_file, transport, &[ALPN_V4, ALPN_V3])?;
    let addr: SocketAddr = tokio::net::lookup_host(&cfg.cloud)
        .await
        .map_err(|_| RestoreError::Resolve(cfg.cloud.clone()))?
        .next()
        .ok_or_else(|| RestoreError::Resolve(cfg.cloud.clone()))?;
    let bind: SocketAddr = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
        .parse()
        .map_err(|_| RestoreError::Resolve("bind address".into()))?;
    let endpoint = quinn::Endpoint::client(bind).map_err(RestoreError::Endpoint)?;
    let connecting = endpoint.connect_with(client, addr, cfg.server_name())?;
    let conn = match tokio::time::timeout(Duration::from_millis(cfg.connect_timeout_ms), connecting).await {
        Err(_) => return Err(RestoreError::HandshakeTimeout(cfg.cloud.clone())),
        // TLS alert 120 (no_application_protocol): no version in common.
        Ok(Err(quinn::ConnectionError::ConnectionClosed(c)))
            if c.error_code == quinn::TransportErrorCode::crypto(120) =>
        {
            return Err(RestoreError::OldReceiver(cfg.cloud.clone()))
        }
        Ok(r) => r?,
    };
    let result = session(cfg, &conn, store, req, every, &mut progress).await;
    let result = match result {
        // A lost stream says little: the connection's close reason says why.
        Err(RestoreError::Read(_) | RestoreError::Write(_) | RestoreError::Closed) if conn.close_reason().is_some() => {
            Err(conn.close_reason().map_or(RestoreError::Closed, RestoreError::Connection))
        }
        other => other,
    };
    conn.close(0u32.into(), b"restore ended");
    endpoint.wait_idle().await;
    let (topics, offsets, failed_back, last, settings) = result?;
    Ok(RestoreOutcome { topics, offsets, failed_back, settings, last, elapsed: started.elapsed() })
}

type Outcome = (Vec<String>, Vec<CommittedOffset>, usize, Snapshot, Vec<TopicOutcome>);

/// What the receiver listed so far, within the gateway's own limits: the receiver is a peer,
/// and a restored gateway mirrors at most `mirror.partitions_max` partitions and keeps at most
/// `mirror.offsets_tracked_max` group offsets, so a listing beyond them is refused before it
/// is kept. A topic listed twice is refused too (its partitions would be restored twice).
#[derive(Debug, Default)]
struct Listed {
    topics: std::collections::BTreeSet<String>,
    partitions: usize,
    /// The listed topics' own settings on the lost gateway (version 4), one entry per topic.
    own: BTreeMap<String, Vec<(String, String)>>,
}

impl Listed {
    fn topic(&mut self, t: &RestoreTopic, partitions_max: u32) -> Result<(), RestoreError> {
        self.partitions = self.partitions.saturating_add(t.extents.len());
        if self.partitions > partitions_max as usize {
            return Err(RestoreError::OverLimit {
                key: "mirror.partitions_max",
                limit: partitions_max,
                what: "partitions",
            });
        }
        if !self.topics.insert(t.topic.clone()) {
            return Err(ProtocolError::Malformed("restore topics: a topic listed twice").into());
        }
        Ok(())
    }

    /// A listed topic's own settings: only of a topic listed before, once each (so held at most
    /// one entry per listed topic).
    fn own(&mut self, t: TopicSettings) -> Result<(), RestoreError> {
        if !self.topics.contains(&t.topic) || self.own.contains_key(&t.topic) {
            return Err(ProtocolError::Malformed("topic overrides: a topic not listed, or twice").into());
        }
        self.own.insert(t.topic, t.configs);
        Ok(())
    }

    fn offsets(&self, have: usize, more: usize, offsets_max: u32) -> Result<(), RestoreError> {
        if have.saturating_add(more) > offsets_max as usize {
            return Err(RestoreError::OverLimit {
                key: "mirror.offsets_tracked_max",
                limit: offsets_max,
                what: "group offsets",
            });
        }
        Ok(())
    }
}

async fn session(
    cfg: &MirrorConfig,
    conn: &quinn::Connection,
    store: &Store,
    req: RestoreRequest,
    every: Duration,
    progress: &mut impl FnMut(&Snapshot, bool),
) -> Result<Outcome, RestoreError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&Control::RestoreHello { site: cfg.site.clone() }.encode()).await?;
    let mut decoder = Decoder::new(1 << 20);
    let mut buf = vec![0u8; 16 * 1024];
    let mut listing: Vec<RestoreTopic> = Vec::new();
    let mut offsets: Vec<CommittedOffset> = Vec::new();
    let mut listed = Listed::default();
    let version = crate::protocol::alpn_version(tls::negotiated_alpn(conn).as_deref());
    loop {
        match read_control::<RestoreError>(&mut recv, &mut decoder, &mut buf).await? {
            Some(Control::RestoreTopics(list)) => {
                for t in list {
                    listed.topic(&t, cfg.partitions_max)?;
                    listing.push(t);
                }
            }
            Some(f @ Control::TopicOverrides(_)) if f.version() > version => {
                return Err(ProtocolError::Unexpected("a version 4 frame in a version 3 restore").into());
            }
            Some(Control::TopicOverrides(list)) => {
                for t in list {
                    listed.own(t)?;
                }
            }
            Some(Control::RestoreOffsets(list)) => {
                listed.offsets(offsets.len(), list.len(), cfg.offsets_tracked_max)?;
                offsets.extend(list);
            }
            Some(Control::RestoreListed) => break,
            Some(Control::Refused { reason }) => return Err(RestoreError::Refused(reason)),
            Some(_) => return Err(ProtocolError::Unexpected("before the listing's end").into()),
            None => return Err(RestoreError::Closed),
        }
    }
    tracing::info!(topics = listing.len(), offsets = offsets.len(), "the central cluster's listing");
    let chosen: Vec<&RestoreTopic> =
        listing.iter().filter(|t| req.selection.topics.is_empty() || req.selection.topics.contains(&t.topic)).collect();
    let mut settings = Vec::with_capacity(chosen.len());
    for t in &chosen {
        settings.push(ensure_topic(store, t, listed.own.get(&t.topic), &req.topic_config).await?);
    }
    // What an earlier run stored (bounded: one entry per listed partition at most).
    let partitions: usize = listing.iter().map(|t| t.extents.len()).sum();
    let mut stored = BTreeMap::new();
    for (k, v) in store.kv_scan(RESTORE_PROGRESS, &[], partitions.saturating_add(1))? {
        if let (Some(key), Some(s)) = (parse_progress_key(&k), decode_progress(&v)) {
            stored.insert(key, s);
        }
    }
    let planned = plan(&listing, &req.selection, &stored, tributary_log::clock::now_ms())?;
    let state = Arc::new(Mutex::new(Restore::new(
        planned,
        cfg.restore_streams_max as usize,
        cfg.restore_credit_bytes,
        cfg.restore_frame_bytes_max,
        Instant::now(),
    )));
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Action>();
    for a in lock(&state).starts() {
        let _ = out_tx.send(a);
    }
    // The highest high watermark the lost gateway reported per partition (one per listed one).
    let reported: Arc<BTreeMap<(String, i32), i64>> = Arc::new(
        listing
            .iter()
            .flat_map(|t| t.reported.iter().enumerate().map(|(p, h)| ((t.topic.clone(), p as i32), *h)))
            .collect(),
    );
    let mut streams: JoinSet<Result<(), RestoreError>> = JoinSet::new();
    let mut tick = tokio::time::interval(every);
    loop {
        if lock(&state).finished() {
            break;
        }
        tokio::select! {
            Some(action) = out_rx.recv() => {
                let frames = match action {
                    Action::Start { topic, partition, from, credit } => {
                        let mut f = Control::RestoreStart { topic: topic.clone(), partition, from }.encode().to_vec();
                        f.extend_from_slice(&Control::Credit { topic, partition, bytes: credit }.encode());
                        f
                    }
                    Action::Credit { topic, partition, bytes } => Control::Credit { topic, partition, bytes }.encode().to_vec(),
                };
                send.write_all(&frames).await?;
            }
            frame = read_control::<RestoreError>(&mut recv, &mut decoder, &mut buf) => match frame? {
                Some(Control::Refused { reason }) => return Err(RestoreError::Refused(reason)),
                Some(_) => return Err(ProtocolError::Unexpected("in a restore").into()),
                None => return Err(RestoreError::Closed),
            },
            uni = conn.accept_uni() => {
                let task = PartitionStream {
                    store: store.clone(),
                    state: state.clone(),
                    out: out_tx.clone(),
                    reported: reported.clone(),
                    frame_bytes_max: usize::try_from(cfg.restore_frame_bytes_max).unwrap_or(usize::MAX),
                };
                streams.spawn(task.run(uni?));
            }
            Some(done) = streams.join_next(), if !streams.is_empty() => match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(RestoreError::Task(e.to_string())),
            },
            _ = tick.tick() => progress(&lock(&state).snapshot(Instant::now()), false),
        }
    }
    while let Some(done) = streams.join_next().await {
        done.map_err(|e| RestoreError::Task(e.to_string()))??;
    }
    // Failback: the central commits of these groups, as edge offsets, win over their checkpoints.
    let mut failed_back = 0;
    for chunk in req.failback_groups.chunks(RESTORE_GROUPS_PER_FRAME_MAX) {
        send.write_all(&Control::RestoreGroups(chunk.to_vec()).encode()).await?;
        loop {
            match read_control::<RestoreError>(&mut recv, &mut decoder, &mut buf).await? {
                Some(Control::RestoreOffsets(list)) => {
                    for o in list {
                        offsets.retain(|e| (&e.group, &e.topic, e.partition) != (&o.group, &o.topic, o.partition));
                        offsets.push(o);
                        failed_back += 1;
                    }
                    // A frame holds at most `OFFSETS_PER_FRAME_MAX`: checked once it replaced what it does.
                    listed.offsets(offsets.len(), 0, cfg.offsets_tracked_max)?;
                }
                Some(Control::RestoreListed) => break,
                Some(Control::Refused { reason }) => return Err(RestoreError::Refused(reason)),
                Some(_) => return Err(ProtocolError::Unexpected("in a failback").into()),
                None => return Err(RestoreError::Closed),
            }
        }
    }
    // The receiver closes the connection once it read the end of the control stream.
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_millis(cfg.connect_timeout_ms), conn.closed()).await;
    let last = lock(&state).snapshot(Instant::now());
    progress(&last, true);
    let topics: Vec<String> = chosen.iter().map(|t| t.topic.clone()).collect();
    offsets.retain(|o| topics.contains(&o.topic));
    Ok((topics, offsets, failed_back, last, settings))
}

fn lock(state: &Mutex<Restore>) -> std::sync::MutexGuard<'_, Restore> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Creates a listed topic, or checks the one there: as many partitions as the central cluster's,
/// grown if it has fewer. A new topic gets the gateway's `defaults` with the lost gateway's `own`
/// settings on top (a setting refused here is skipped with a warning, never fatal), or, when the
/// receiver kept none (version 3, or a site mirrored before version 4), the remote copy's
/// compaction settings. A topic already there keeps its settings: created by an earlier run of
/// this restore, it has these very settings (a topic is created with them in one commit, so a
/// run killed at any point leaves it either absent or complete); created by a client, they are
/// its own.
async fn ensure_topic(
    store: &Store,
    t: &RestoreTopic,
    own: Option<&Vec<(String, String)>>,
    defaults: &TopicConfig,
) -> Result<TopicOutcome, RestoreError> {
    let want = t.extents.len();
    let kept = |topic: &str| TopicOutcome { topic: topic.to_string(), applied: None, skipped: Vec::new() };
    if let Some(have) = store.topic(&t.topic) {
        if (have.partitions as usize) < want {
            store.create_partitions(&t.topic, want as u32).await?;
        } else if have.partitions as usize > want {
            return Err(RestoreError::Partitions { topic: t.topic.clone(), have: have.partitions, want });
        }
        return Ok(kept(&t.topic));
    }
    let wanted = own.unwrap_or(&t.configs);
    let (config, skipped) = apply_own(defaults, wanted);
    for s in &skipped {
        tracing::warn!(topic = %t.topic, key = %s.key, value = %s.value, reason = %s.reason,
            "a setting of the lost gateway's topic is refused here: skipped");
    }
    let applied: Vec<(String, String)> =
        wanted.iter().filter(|(k, _)| !skipped.iter().any(|s| s.key == *k)).cloned().collect();
    match store.create_topic(&t.topic, want as u32, config).await {
        Ok(()) => {
            tracing::info!(topic = %t.topic, settings = ?applied, "restored topic created");
            Ok(TopicOutcome { topic: t.topic.clone(), applied: Some(applied), skipped })
        }
        // A topic created meanwhile (a client): checked as above next time.
        Err(StoreError::TopicExists(_)) => Ok(kept(&t.topic)),
        Err(e) => Err(e.into()),
    }
}

/// One partition's stream from the receiver.
struct PartitionStream {
    store: Store,
    state: Arc<Mutex<Restore>>,
    out: mpsc::UnboundedSender<Action>,
    /// The listing's reported high watermarks, by (topic, partition).
    reported: Arc<BTreeMap<(String, i32), i64>>,
    /// `mirror.restore_frame_bytes_max`.
    frame_bytes_max: usize,
}

impl PartitionStream {
    async fn next(stream: &mut quinn::RecvStream, decoder: &mut Decoder) -> Result<Option<Data>, RestoreError> {
        loop {
            if let Some(d) = decoder.next_data()? {
                return Ok(Some(d));
            }
            match stream.read_chunk(64 * 1024, true).await? {
                Some(chunk) => decoder.feed(&chunk.bytes),
                None => return Ok(None),
            }
        }
    }

    async fn run(self, mut stream: quinn::RecvStream) -> Result<(), RestoreError> {
        let mut decoder = Decoder::new(OPEN_FRAME_BYTES_MAX);
        let Some(Data::Open { topic, partition }) = Self::next(&mut stream, &mut decoder).await? else {
            return Err(ProtocolError::Unexpected("restore stream without open").into());
        };
        lock(&self.state).on_stream(&topic, partition)?;
        decoder.set_max(self.frame_bytes_max);
        let limit = self.store.config().decompressed_size_bytes_max;
        let key = progress_key(&topic, partition);
        loop {
            match Self::next(&mut stream, &mut decoder).await? {
                Some(Data::Restored { remote_next, batch }) => {
                    let len = batch.len() as u64;
                    lock(&self.state).on_received(&topic, partition, remote_next, len)?;
                    let records = decode_records(&batch, limit).map_err(|e| RestoreError::Batch(e.to_string()))?;
                    drop(batch);
                    let n = records.len() as u64;
                    let records: Vec<(i64, NewRecord)> = records
                        .into_iter()
                        .map(|r| {
                            let record = NewRecord {
                                key: r.key,
                                value: r.value,
                                headers: r.headers,
                                timestamp_ms: Some(r.timestamp),
                            };
                            (r.offset, record)
                        })
                        .collect();
                    let progress = encode_progress(Stored { remote_next, done: false });
                    if records.is_empty() {
                        self.store.kv_put(RESTORE_PROGRESS, key.clone(), Some(progress)).await?;
                    } else {
                        // Durable with its progress, or neither.
                        let kv = vec![(RESTORE_PROGRESS, key.clone(), Some(progress))];
                        match self.store.restore_records(&topic, partition, records, kv).await {
                            Ok(_) => {}
                            // Nothing written: the same batch comes again on every run, so say
                            // which settings disagree.
                            Err(StoreError::AppendTooLarge { size, max }) => {
                                return Err(RestoreError::Batch(format!(
                                    "{topic}-{partition}: a restored batch of {size} bytes is over this gateway's \
                                     storage.append_size_bytes_max = {max}: set the receiver's \
                                     restore_batch_bytes_max below it"
                                )))
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    let credit = lock(&self.state).on_stored(&topic, partition, remote_next, len, n, Instant::now())?;
                    if let Some(a) = credit {
                        let _ = self.out.send(a);
                    }
                }
                Some(Data::RestoreEnd { remote_next }) => {
                    // Checked before the partition is stored as done: a run after an end that
                    // went back would otherwise skip the partition.
                    lock(&self.state).check_end(&topic, partition, remote_next)?;
                    // Offsets below the high watermark the lost gateway last reported were given
                    // out, in records the central cluster may not have (acknowledged, not yet
                    // mirrored): the next offset moves up to it, a hole, in the same commit as
                    // the partition's end, so no new record gets one of them.
                    let done = vec![(
                        RESTORE_PROGRESS,
                        key.clone(),
                        Some(encode_progress(Stored { remote_next, done: true })),
                    )];
                    let reported = self.reported.get(&(topic.clone(), partition)).copied().unwrap_or(0);
                    let next = self.store.watermarks(&topic, partition)?.high_watermark;
                    if reported > next {
                        tracing::info!(%topic, partition, from = next, to = reported,
                            "next offset moved up to the high watermark the lost gateway reported");
                    }
                    self.store.restore_end(&topic, partition, reported, done).await?;
                    // What was restored is in the central cluster: retention may delete it first,
                    // and the mirror's lag starts after it.
                    let high = self.store.watermarks(&topic, partition)?.high_watermark;
                    self.store.set_archived(&topic, partition, high).await?;
                    let mut state = lock(&self.state);
                    state.on_end(&topic, partition, remote_next)?;
                    for a in state.starts() {
                        let _ = self.out.send(a);
                    }
                    return Ok(());
                }
                Some(_) => return Err(ProtocolError::Unexpected("in a restore stream").into()),
                None => return Err(RestoreError::Closed),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(name: &str, partitions: usize) -> RestoreTopic {
        RestoreTopic {
            topic: name.into(),
            configs: Vec::new(),
            extents: vec![(0, 1); partitions],
            reported: vec![0; partitions],
        }
    }

    /// A receiver's listing is a peer's: frames within their own limits, but as many as it likes.
    /// What is kept of it stops at the gateway's limits, and a topic listed twice is refused.
    #[test]
    fn a_listing_beyond_the_gateway_s_limits_is_refused_before_it_is_kept() {
        let mut l = Listed::default();
        l.topic(&topic("a", 600), 1024).expect("within");
        l.topic(&topic("b", 424), 1024).expect("at the limit");
        assert!(matches!(
            l.topic(&topic("c", 1), 1024),
            Err(RestoreError::OverLimit { key: "mirror.partitions_max", limit: 1024, .. })
        ));
        let mut l = Listed::default();
        l.topic(&topic("a", 1), 1024).expect("first");
        assert!(matches!(l.topic(&topic("a", 1), 1024), Err(RestoreError::Protocol(ProtocolError::Malformed(_)))));
        assert!(l.offsets(9_488, 512, 10_000).is_ok());
        assert!(matches!(
            l.offsets(9_489, 512, 10_000),
            Err(RestoreError::OverLimit { key: "mirror.offsets_tracked_max", .. })
        ));
    }
}
