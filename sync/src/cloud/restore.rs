//! The receiver's side of a restore (protocol version 3): a replacement gateway, checked against
//! its certificate like a mirroring one, is given its site's remote topics (`{site}.*` without the
//! checkpoints, extents and topic settings topics) with their partitions, extents, the highest high
//! watermark the lost gateway reported of each (`{site}.extents.internal`) and compaction settings,
//! in a version 4 session also each topic's own settings on the lost gateway
//! (`{site}.topics.internal`, the latest record per topic, `TopicOverrides` frames), its consumer
//! groups' offsets from the MirrorMaker 2 checkpoints (upstream = edge offsets), then each
//! partition it asks for: the remote records read with a librdkafka consumer (manual assignment,
//! no group), put back at their edge offsets from the provenance headers (which are removed), as
//! uncompressed RecordBatch v2 frames on a stream of their own, within the credit the gateway
//! grants. Bounded: `restore_sessions_max` restores at once, `restore_streams_max` partitions per
//! restore, `restore_batch_bytes_max` per frame, `restore_fetch_bytes_max` of librdkafka's
//! prefetch per partition, `restore_offsets_max` group offsets listed, `restore_groups_max`
//! groups failed back.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::admin::{AdminOptions, ResourceSpecifier};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tributary_log::batch::{encode_batch_at, NewRecord};
use tributary_log::Codec;

use super::{kafka_config, watermarks, CloudError, Shared, HEADER_OFFSET, HEADER_PARTITION, HEADER_SITE, HEADER_TOPIC};
use crate::checkpoint::{checkpoints_topic, decode_checkpoint_key, decode_checkpoint_value};
use crate::extents::{decode_extent_key, decode_extent_value, extents_topic};
use crate::overrides::{decode_settings_key, decode_settings_value, topics_topic};
use crate::protocol::{
    CommittedOffset, Control, Data, Decoder, ProtocolError, RestoreFrom, RestoreTopic, TopicSettings,
    GROUP_ID_BYTES_MAX, MIRRORED_TOPIC_CONFIGS, OFFSETS_PER_FRAME_MAX, RESTORE_PARTITIONS_MAX,
    RESTORE_PARTITIONS_PER_FRAME_MAX, RESTORE_TOPICS_PER_FRAME_MAX, TOPIC_BYTES_MAX, TOPIC_CONFIG_VALUE_BYTES_MAX,
    TOPIC_OVERRIDES_PER_FRAME_MAX,
};
use crate::stream::{read_control, Credit};

/// Releases a restore session's place when it ends, however it ends.
struct Place<'a>(&'a Shared);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.stats.restores_active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A restore session, after the site was checked.
pub(super) async fn serve(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    site: String,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut decoder: Decoder,
) -> Result<(), CloudError> {
    let cfg = &shared.cfg;
    let active = shared.stats.restores_active.fetch_add(1, Ordering::Relaxed) + 1;
    let _place = Place(shared);
    if active > u64::from(cfg.restore_sessions_max) {
        let reason = format!("restore_sessions_max = {} restores are running", cfg.restore_sessions_max);
        let _ = send.write_all(&Control::Refused { reason: reason.clone() }.encode()).await;
        return Err(CloudError::Refused(reason));
    }
    tracing::info!(%site, remote = %conn.remote_address(), "restore of a gateway begins");
    // Version 4: the topics' own settings come with the listing (a version 3 gateway never gets
    // them: it would end the restore on the frame).
    let v4 = crate::protocol::alpn_version(crate::tls::negotiated_alpn(conn).as_deref()) >= 4;
    let (listing, offsets, own) = {
        let (shared, site) = (shared.clone(), site.clone());
        tokio::task::spawn_blocking(move || list(&shared, &site, v4))
            .await
            .map_err(|e| CloudError::Refused(format!("listing task: {e}")))??
    };
    let mut out = Vec::new();
    // Frames within their limits: topics, and partitions over all of a frame's topics.
    let mut chunk: Vec<RestoreTopic> = Vec::new();
    let mut partitions = 0;
    for t in &listing {
        if !chunk.is_empty()
            && (chunk.len() >= RESTORE_TOPICS_PER_FRAME_MAX
                || partitions + t.extents.len() > RESTORE_PARTITIONS_PER_FRAME_MAX)
        {
            out.extend_from_slice(&Control::RestoreTopics(std::mem::take(&mut chunk)).encode());
            partitions = 0;
        }
        partitions += t.extents.len();
        chunk.push(t.clone());
    }
    if !chunk.is_empty() {
        out.extend_from_slice(&Control::RestoreTopics(chunk).encode());
    }
    for c in own.chunks(TOPIC_OVERRIDES_PER_FRAME_MAX) {
        out.extend_from_slice(&Control::TopicOverrides(c.to_vec()).encode());
    }
    for c in offsets.chunks(OFFSETS_PER_FRAME_MAX) {
        out.extend_from_slice(&Control::RestoreOffsets(c.to_vec()).encode());
    }
    out.extend_from_slice(&Control::RestoreListed.encode());
    send.write_all(&out).await?;
    tracing::info!(%site, topics = listing.len(), offsets = offsets.len(), settings = own.len(), "restore listing sent");
    let extents: BTreeMap<(String, i32), (i64, i64)> = listing
        .iter()
        .flat_map(|t| t.extents.iter().enumerate().map(|(p, e)| ((t.topic.clone(), p as i32), *e)))
        .collect();
    let mut streams: JoinSet<Result<(), CloudError>> = JoinSet::new();
    let mut credits: BTreeMap<(String, i32), Arc<Credit>> = BTreeMap::new();
    let mut buf = vec![0u8; 16 * 1024];
    // Groups the gateway asked to fail back so far (each a consumer and a query of the centre).
    let mut groups_named = 0usize;
    loop {
        tokio::select! {
            frame = read_control::<CloudError>(&mut recv, &mut decoder, &mut buf) => match frame? {
                Some(Control::RestoreStart { topic, partition, from }) => {
                    let Some(&(low, high)) = extents.get(&(topic.clone(), partition)) else {
                        return Err(ProtocolError::Unexpected("restore of a partition not listed").into());
                    };
                    let credit = admit(&mut credits, &topic, partition, cfg.restore_streams_max)?;
                    let reader = Reader { shared: shared.clone(), site: site.clone(), topic, partition, from, low, high };
                    let stream = Stream { reader, credit };
                    streams.spawn(stream.run(conn.clone()));
                }
                Some(Control::RestoreGroups(groups)) => {
                    if let Err(e) = take_groups(&mut groups_named, groups.len(), cfg.restore_groups_max) {
                        let _ = send.write_all(&Control::Refused { reason: e.to_string() }.encode()).await;
                        return Err(e);
                    }
                    let (shared, who, extents) = (shared.clone(), site.clone(), extents.clone());
                    let offsets = tokio::task::spawn_blocking(move || failback(&shared, &who, &groups, &extents))
                        .await
                        .map_err(|e| CloudError::Refused(format!("failback task: {e}")))??;
                    let mut out = Vec::new();
                    for c in offsets.chunks(OFFSETS_PER_FRAME_MAX) {
                        out.extend_from_slice(&Control::RestoreOffsets(c.to_vec()).encode());
                    }
                    out.extend_from_slice(&Control::RestoreListed.encode());
                    send.write_all(&out).await?;
                    tracing::info!(%site, offsets = offsets.len(), "failback offsets sent");
                }
                Some(Control::Credit { topic, partition, bytes }) => {
                    if let Some(c) = credits.get(&(topic, partition)) {
                        c.grant(bytes);
                    }
                }
                Some(other) => {
                    tracing::debug!(?other, "unexpected frame in a restore");
                    return Err(ProtocolError::Unexpected("restore-side").into());
                }
                // The gateway has what it asked for.
                None => break,
            },
            Some(done) = streams.join_next(), if !streams.is_empty() => match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(CloudError::Refused(format!("restore stream task failed: {e}"))),
            },
        }
    }
    streams.abort_all();
    tracing::info!(%site, "restore of a gateway ended");
    conn.close(0u32.into(), b"restore complete");
    Ok(())
}

/// A `RestoreStart` admitted: the partition's credit, or refused when `streams_max` partitions
/// are streaming (streams whose task ended are let go first) or this one is already streaming
/// (a second stream of it would not count against the limit: each is a librdkafka consumer).
fn admit(
    credits: &mut BTreeMap<(String, i32), Arc<Credit>>,
    topic: &str,
    partition: i32,
    streams_max: u32,
) -> Result<Arc<Credit>, CloudError> {
    credits.retain(|_, c| Arc::strong_count(c) > 1);
    let key = (topic.to_string(), partition);
    if credits.contains_key(&key) {
        return Err(CloudError::Refused(format!("{topic}-{partition} asked for while it is being restored")));
    }
    if credits.len() >= streams_max as usize {
        return Err(CloudError::Refused(format!(
            "more than restore_streams_max = {streams_max} partitions asked for at once"
        )));
    }
    let credit = Arc::new(Credit::default());
    credits.insert(key, credit.clone());
    Ok(credit)
}

/// `more` groups named in a `RestoreGroups` frame, on top of the `named` so far in the session:
/// refused past `groups_max` (`restore_groups_max`; a frame holds at most
/// `RESTORE_GROUPS_PER_FRAME_MAX`, but a gateway may send any number of frames).
fn take_groups(named: &mut usize, more: usize, groups_max: u32) -> Result<(), CloudError> {
    *named = named.saturating_add(more);
    if *named > groups_max as usize {
        return Err(CloudError::Refused(format!(
            "more than restore_groups_max = {groups_max} groups asked to fail back in one restore"
        )));
    }
    Ok(())
}

/// Whether a group's offset can go into a `RestoreOffsets` frame (the gateway refuses a frame
/// with a group name over `GROUP_ID_BYTES_MAX`, a negative partition or offset).
fn listable(group: &str, partition: i32, offset: i64) -> bool {
    !group.is_empty() && group.len() <= GROUP_ID_BYTES_MAX && partition >= 0 && offset >= 0
}

/// The edge topic of a remote topic of `site` (`None`: not one of its remote topics).
fn source_topic(format: &str, site: &str, remote: &str) -> Option<String> {
    let (before, after) = format.split_once("{topic}")?;
    let (before, after) = (before.replace("{site}", site), after.replace("{site}", site));
    let middle = remote.strip_prefix(before.as_str())?.strip_suffix(after.as_str())?;
    (!middle.is_empty()).then(|| middle.to_string())
}

type Listing = (Vec<RestoreTopic>, Vec<CommittedOffset>, Vec<TopicSettings>);

/// The site's remote topics with their extents and settings, its groups' offsets from the
/// checkpoints topic (the latest checkpoint per group and partition), and (`own`: a version 4
/// session) the listed topics' own settings on the lost gateway.
fn list(shared: &Shared, site: &str, own: bool) -> Result<Listing, CloudError> {
    let cfg = &shared.cfg;
    let timeout = Duration::from_millis(cfg.kafka.request_timeout_ms);
    let md = shared.admin.inner().fetch_metadata(None, timeout)?;
    let checkpoints = checkpoints_topic(site);
    let extents = extents_topic(site);
    let settings = topics_topic(site);
    let consumer: BaseConsumer = kafka_config(cfg)
        .set("group.id", "tributary-cloud-restore")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()?;
    let mut topics: Vec<(String, String, usize)> = Vec::new();
    for t in md.topics() {
        let remote = t.name();
        if remote == checkpoints
            || remote == extents
            || remote == settings
            || remote == cfg.gaps_topic
            || remote.starts_with("__")
        {
            continue;
        }
        let Some(source) = source_topic(&cfg.remote_topic_format, site, remote) else { continue };
        let partitions = t.partitions().len();
        if source.len() > TOPIC_BYTES_MAX || partitions == 0 || partitions > RESTORE_PARTITIONS_MAX {
            tracing::warn!(%site, topic = %remote, partitions, "remote topic left out of the restore (name or partitions over the limits)");
            continue;
        }
        topics.push((remote.to_string(), source, partitions));
    }
    topics.sort();
    // `{site}.{topic}.live` is the fresh-data-first preview of `{site}.{topic}` (its records are
    // also in the ordered topic, which is what comes back), not a gateway topic of its own.
    let sources: std::collections::BTreeSet<String> = topics.iter().map(|(_, s, _)| s.clone()).collect();
    topics
        .retain(|(_, source, _)| !source.strip_suffix(crate::fresh::LIVE_SUFFIX).is_some_and(|t| sources.contains(t)));
    let highest = read_extents(&consumer, &extents, timeout)?;
    let mut listing = Vec::new();
    let rt = tokio::runtime::Handle::current();
    for (remote, source, partitions) in &topics {
        let mut extents = Vec::with_capacity(*partitions);
        for p in 0..*partitions as i32 {
            extents.push(watermarks(&consumer, remote, p, timeout)?);
        }
        let configs = rt.block_on(compaction_settings(shared, remote))?;
        let reported =
            (0..*partitions as i32).map(|p| highest.get(&(source.clone(), p)).copied().unwrap_or(0)).collect();
        listing.push(RestoreTopic { topic: source.clone(), configs, extents, reported });
    }
    let remotes: BTreeMap<&str, &str> = topics.iter().map(|(r, s, _)| (r.as_str(), s.as_str())).collect();
    let offsets = read_checkpoints(cfg, &consumer, &checkpoints, &remotes, timeout)?;
    let own = if own {
        let listed: std::collections::BTreeSet<&str> = listing.iter().map(|t| t.topic.as_str()).collect();
        read_settings(&consumer, &settings, &listed, timeout)?
    } else {
        Vec::new()
    };
    Ok((listing, offsets, own))
}

/// The latest own settings of each `listed` topic from `{site}.topics.internal` (records of
/// other topics, or not decodable, are passed over: at most one entry per listed topic is held).
fn read_settings(
    consumer: &BaseConsumer,
    topic: &str,
    listed: &std::collections::BTreeSet<&str>,
    timeout: Duration,
) -> Result<Vec<TopicSettings>, CloudError> {
    let mut latest: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    // No such topic: the site was mirrored by older gateways or receivers (compaction settings
    // from the remote topics only, as before).
    read_whole(
        consumer,
        topic,
        timeout,
        "reading the topic settings topic (no record for kafka.request_timeout_ms)",
        |m| {
            let key = m.key().and_then(decode_settings_key).filter(|t| listed.contains(t.as_str()));
            let value = m.payload().and_then(decode_settings_value);
            match (key, value) {
                (Some(t), Some(v)) => {
                    latest.insert(t, v);
                }
                (Some(t), None) => {
                    tracing::warn!(topic = %t, "a topic's settings record that cannot be read: left out of the restore")
                }
                _ => {}
            }
        },
    )?;
    Ok(latest.into_iter().map(|(topic, configs)| TopicSettings { topic, configs }).collect())
}

/// A compacted remote topic's compaction settings (none for other topics).
async fn compaction_settings(shared: &Shared, remote: &str) -> Result<Vec<(String, String)>, CloudError> {
    let timeout = Duration::from_millis(shared.cfg.kafka.request_timeout_ms);
    let opts = AdminOptions::new().request_timeout(Some(timeout));
    let described = shared.admin.describe_configs([&ResourceSpecifier::Topic(remote)], &opts).await?;
    let resource = match described.into_iter().next() {
        Some(Ok(r)) => r,
        Some(Err(code)) => return Err(CloudError::KafkaCode(code)),
        None => return Ok(Vec::new()),
    };
    let compacted =
        resource.get("cleanup.policy").and_then(|e| e.value.as_deref()).is_some_and(|p| p.contains("compact"));
    if !compacted {
        return Ok(Vec::new());
    }
    Ok(MIRRORED_TOPIC_CONFIGS
        .iter()
        .filter_map(|k| resource.get(k).and_then(|e| e.value.clone()).map(|v| (k.to_string(), v)))
        .filter(|(_, v)| v.len() <= TOPIC_CONFIG_VALUE_BYTES_MAX)
        .collect())
}

/// The latest checkpoint of each (group, remote topic, partition) of the site's remote topics, as
/// edge offsets, at most `restore_offsets_max`.
fn read_checkpoints(
    cfg: &crate::config::CloudConfig,
    consumer: &BaseConsumer,
    topic: &str,
    remotes: &BTreeMap<&str, &str>,
    timeout: Duration,
) -> Result<Vec<CommittedOffset>, CloudError> {
    let mut latest: BTreeMap<(String, String, i32), (i64, i64)> = BTreeMap::new();
    // No checkpoints topic: no group committed at the edge (or checkpoints are off).
    read_whole(
        consumer,
        topic,
        timeout,
        "reading the checkpoints topic (no record for kafka.request_timeout_ms)",
        |m| {
            let key = m.key().and_then(decode_checkpoint_key);
            let value = m.payload().and_then(decode_checkpoint_value);
            if let (Some((group, remote, partition)), Some((upstream, _))) = (key, value) {
                if !listable(&group, partition, upstream) {
                    // One such entry would make the whole listing frame malformed to the
                    // gateway, and with it every restore of the site.
                    tracing::warn!(%group, %remote, partition, upstream, "checkpoint left out of a restore (outside the protocol's limits)");
                } else if let Some(source) = remotes.get(remote.as_str()) {
                    let k = (group, source.to_string(), partition);
                    if latest.contains_key(&k) || latest.len() < cfg.restore_offsets_max as usize {
                        latest.insert(k, (upstream, m.timestamp().to_millis().unwrap_or(0)));
                    } else {
                        tracing::warn!(
                            limit = cfg.restore_offsets_max,
                            "restore_offsets_max reached: a group's offset is not restored"
                        );
                    }
                }
            }
        },
    )?;
    Ok(latest
        .into_iter()
        .map(|((group, topic, partition), (offset, at))| CommittedOffset {
            group,
            topic,
            partition,
            offset,
            commit_time_ms: at,
        })
        .collect())
}

/// The highest high watermark each partition of the site was reported at, from every record left
/// in `{site}.extents.internal` (not only the latest: a gateway rebuilt without a restore may
/// have reported lower since). Bounded by what the topic holds: the receiver writes at most one
/// record per partition and report interval, for at most `partitions_per_site_max` partitions a
/// session; the map holds one entry per partition.
fn read_extents(
    consumer: &BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> Result<BTreeMap<(String, i32), i64>, CloudError> {
    let mut highest: BTreeMap<(String, i32), i64> = BTreeMap::new();
    // No extents topic: nothing was reported (a site mirrored by an older receiver).
    read_whole(consumer, topic, timeout, "reading the extents topic (no record for kafka.request_timeout_ms)", |m| {
        let key = m.key().and_then(decode_extent_key);
        let value = m.payload().and_then(decode_extent_value);
        if let (Some(k), Some(v)) = (key, value) {
            let e = highest.entry(k).or_insert(v);
            *e = (*e).max(v);
        }
    })?;
    Ok(highest)
}

/// Hands every record of partition 0 of `topic` (an internal topic of one partition), from its
/// low to its high watermark at the start, to `each`; nothing when the topic does not exist.
/// The read fails when nothing arrived for `timeout` (`what` names it in the error), however long
/// the whole of a large topic takes.
fn read_whole(
    consumer: &BaseConsumer,
    topic: &str,
    timeout: Duration,
    what: &'static str,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) -> Result<(), CloudError> {
    let (low, high) = match consumer.fetch_watermarks(topic, 0, timeout) {
        Ok(w) => w,
        Err(KafkaError::MetadataFetch(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if high <= low {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(low))?;
    consumer.assign(&tpl)?;
    let mut progress = Progress::new(timeout, Instant::now());
    loop {
        if progress.stalled(Instant::now()) {
            return Err(CloudError::Timeout(what));
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                progress.moved(Instant::now());
                each(&m);
                if m.offset() >= high - 1 {
                    break;
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
    }
    consumer.unassign()?;
    Ok(())
}

/// A read that must keep moving, fed with `now`: stalled once nothing arrived for `timeout`
/// (a large topic may take far longer than that as a whole).
#[derive(Debug, Clone, Copy)]
struct Progress {
    timeout: Duration,
    last: Instant,
}

impl Progress {
    fn new(timeout: Duration, now: Instant) -> Self {
        Self { timeout, last: now }
    }

    /// Something arrived at `now`.
    fn moved(&mut self, now: Instant) {
        self.last = self.last.max(now);
    }

    fn stalled(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last) > self.timeout
    }
}

/// Failback: each group's committed offsets in the central cluster (its central name,
/// `central_group_format`) on the site's remote topics, translated back to edge offsets: a
/// commit at remote offset C becomes the edge offset (provenance) of the first record of this
/// site's partition at or after C, or, at the end of the partition, the edge offset after its
/// last record. A partition the group never committed in the centre is left out.
fn failback(
    shared: &Shared,
    site: &str,
    groups: &[String],
    extents: &BTreeMap<(String, i32), (i64, i64)>,
) -> Result<Vec<CommittedOffset>, CloudError> {
    let cfg = &shared.cfg;
    let timeout = Duration::from_millis(cfg.kafka.request_timeout_ms);
    let reader: BaseConsumer = kafka_config(cfg)
        .set("group.id", "tributary-cloud-restore")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()?;
    let mut out = Vec::new();
    for group in groups {
        let central = cfg.central_group(site, group);
        let consumer: BaseConsumer =
            kafka_config(cfg).set("group.id", &central).set("enable.auto.commit", "false").create()?;
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in extents.keys() {
            tpl.add_partition(&cfg.remote_topic(site, topic), *partition);
        }
        let committed = consumer.committed_offsets(tpl, timeout)?;
        for ((topic, partition), &(low, high)) in extents {
            let remote = cfg.remote_topic(site, topic);
            let Some(Offset::Offset(at)) = committed.find_partition(&remote, *partition).map(|e| e.offset()) else {
                continue;
            };
            let partition_text = partition.to_string();
            let edge_of = |m: &rdkafka::message::BorrowedMessage<'_>| {
                let p = |name| super::header(m, name);
                let ours = p(HEADER_SITE) == Some(site)
                    && p(HEADER_TOPIC) == Some(topic.as_str())
                    && p(HEADER_PARTITION) == Some(partition_text.as_str());
                p(HEADER_OFFSET).and_then(|o| o.parse::<i64>().ok()).filter(|o| ours && *o >= 0)
            };
            // The first of this site's records at or after the commit; at the end, after the
            // last one (read from the partition's last record backwards, a tail at a time).
            let edge = if at < high {
                read_range(&reader, &remote, *partition, at.max(low), high, timeout, edge_of)?
            } else {
                let mut from = high;
                let mut found = None;
                while found.is_none() && from > low {
                    let to = from;
                    from = (from - 256).max(low);
                    found = last_in(&reader, &remote, *partition, from, to, timeout, &edge_of)?.map(|e| e + 1);
                }
                found
            };
            match edge {
                Some(offset) => out.push(CommittedOffset {
                    group: group.clone(),
                    topic: topic.clone(),
                    partition: *partition,
                    offset,
                    commit_time_ms: tributary_log::clock::now_ms(),
                }),
                None => tracing::warn!(%site, %group, %remote, partition, at,
                    "no record of this site at or around the central commit: the group's edge offset is left as it is"),
            }
        }
    }
    Ok(out)
}

/// Reads `[from, to)` of a remote partition, handing each record to `each` until it returns
/// `Some`.
#[allow(clippy::too_many_arguments)]
fn read_range<T>(
    reader: &BaseConsumer,
    remote: &str,
    partition: i32,
    from: i64,
    to: i64,
    timeout: Duration,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> Option<T>,
) -> Result<Option<T>, CloudError> {
    if from >= to {
        return Ok(None);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(remote, partition, Offset::Offset(from))?;
    reader.assign(&tpl)?;
    let deadline = Instant::now() + timeout;
    loop {
        if Instant::now() > deadline {
            return Err(CloudError::Timeout("reading a remote partition for a failback"));
        }
        match reader.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                if m.offset() >= to {
                    return Ok(None);
                }
                if let Some(t) = each(&m) {
                    return Ok(Some(t));
                }
                if m.offset() >= to - 1 {
                    return Ok(None);
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(None),
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn last_in(
    reader: &BaseConsumer,
    remote: &str,
    partition: i32,
    from: i64,
    to: i64,
    timeout: Duration,
    edge_of: &dyn Fn(&rdkafka::message::BorrowedMessage<'_>) -> Option<i64>,
) -> Result<Option<i64>, CloudError> {
    let mut last = None;
    read_range(reader, remote, partition, from, to, timeout, |m| {
        if let Some(e) = edge_of(m) {
            last = Some(e);
        }
        None::<()>
    })?;
    Ok(last)
}

/// What the reader thread hands the stream.
enum Out {
    Batch { remote_next: i64, batch: Bytes },
    End { remote_next: i64 },
}

/// One partition streamed back to the gateway: what its reader reads, within the gateway's credit.
struct Stream {
    reader: Reader,
    credit: Arc<Credit>,
}

impl Stream {
    async fn run(self, conn: quinn::Connection) -> Result<(), CloudError> {
        let Stream { reader, credit } = self;
        let mut stream = conn.open_uni().await?;
        stream
            .write_all(&Data::Open { topic: reader.topic.clone(), partition: reader.partition }.encode_header())
            .await?;
        // Two batches ready at most: the reader waits for the stream (and the stream for credit).
        let (tx, mut rx) = mpsc::channel::<Result<Out, CloudError>>(2);
        let thread = tokio::task::spawn_blocking(move || reader.run(&tx));
        while let Some(out) = rx.recv().await {
            match out? {
                Out::Batch { remote_next, batch } => {
                    let len = batch.len() as u64;
                    credit.wait().await;
                    stream.write_all(&Data::Restored { remote_next, batch: batch.clone() }.encode_header()).await?;
                    stream.write_chunk(batch).await?;
                    credit.spend(len);
                }
                Out::End { remote_next } => {
                    stream.write_all(&Data::RestoreEnd { remote_next }.encode_header()).await?;
                    let _ = stream.finish();
                    // The gateway reads it all before it closes the connection.
                    let _ = stream.stopped().await;
                    break;
                }
            }
        }
        drop(rx);
        let _ = thread.await;
        Ok(())
    }
}

/// Reads a remote partition on a blocking thread.
struct Reader {
    shared: Arc<Shared>,
    site: String,
    topic: String,
    partition: i32,
    from: RestoreFrom,
    low: i64,
    high: i64,
}

impl Reader {
    fn run(self, tx: &mpsc::Sender<Result<Out, CloudError>>) {
        if let Err(e) = self.read(tx) {
            let _ = tx.blocking_send(Err(e));
        }
    }

    fn consumer(&self) -> Result<BaseConsumer, CloudError> {
        let cfg = &self.shared.cfg;
        let kbytes = (cfg.restore_fetch_bytes_max / 1024).max(1);
        Ok(kafka_config(cfg)
            .set("group.id", "tributary-cloud-restore")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("queued.max.messages.kbytes", kbytes.to_string())
            .set("fetch.max.bytes", cfg.restore_fetch_bytes_max.max(1024 * 1024).to_string())
            .create()?)
    }

    /// The remote offset to start at.
    fn start(&self, consumer: &BaseConsumer, remote: &str) -> Result<i64, CloudError> {
        let timeout = Duration::from_millis(self.shared.cfg.kafka.request_timeout_ms);
        Ok(match self.from {
            RestoreFrom::Offset(o) => o.clamp(self.low, self.high),
            RestoreFrom::Time(t) => {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(remote, self.partition, Offset::Offset(t))?;
                let found = consumer.offsets_for_times(tpl, timeout)?;
                match found.find_partition(remote, self.partition).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o.clamp(self.low, self.high),
                    // No record at or after the time.
                    _ => self.high,
                }
            }
            RestoreFrom::TailBytes(bytes) => {
                // The newest records' mean size says how many records the bytes hold.
                let tail = (self.high - 256).max(self.low);
                let mut seen = (0u64, 0u64);
                self.scan(consumer, remote, tail, |m| {
                    seen.0 += 1;
                    seen.1 += record_bytes(m);
                })?;
                let mean = seen.1.checked_div(seen.0).unwrap_or(1).max(1);
                (self.high - (bytes.max(0) as u64 / mean) as i64).clamp(self.low, self.high)
            }
        })
    }

    /// Reads `[from, high)` (records removed by compaction are passed over), handing each to
    /// `each`; returns the remote offset after the last.
    fn scan(
        &self,
        consumer: &BaseConsumer,
        remote: &str,
        from: i64,
        mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
    ) -> Result<(), CloudError> {
        if from >= self.high {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(remote, self.partition, Offset::Offset(from))?;
        consumer.assign(&tpl)?;
        let idle = Duration::from_millis(self.shared.cfg.kafka.request_timeout_ms);
        let mut last_progress = Instant::now();
        loop {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    last_progress = Instant::now();
                    let offset = m.offset();
                    if offset < self.high {
                        each(&m);
                    }
                    if offset >= self.high - 1 {
                        return Ok(());
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => return Ok(()),
                Some(Err(e)) => return Err(e.into()),
                None if last_progress.elapsed() > idle => {
                    return Err(CloudError::Timeout("reading a remote partition for a restore"))
                }
                None => {}
            }
        }
    }

    fn read(&self, tx: &mpsc::Sender<Result<Out, CloudError>>) -> Result<(), CloudError> {
        let remote = self.shared.cfg.remote_topic(&self.site, &self.topic);
        let consumer = self.consumer()?;
        let start = self.start(&consumer, &remote)?;
        tracing::info!(site = %self.site, topic = %self.topic, partition = self.partition, %remote, start,
            high = self.high, "restoring a partition");
        let limit = self.shared.cfg.restore_batch_bytes_max as usize;
        let partition_text = self.partition.to_string();
        let mut pending: Vec<(i64, NewRecord)> = Vec::new();
        let mut pending_bytes = 0usize;
        let mut last_source = -1i64;
        let mut remote_next = start;
        let mut skipped = 0u64;
        let mut closed = false;
        let send = |records: &mut Vec<(i64, NewRecord)>, remote_next: i64| -> Result<bool, CloudError> {
            let stamped: Vec<(&NewRecord, i64, i64)> =
                records.iter().map(|(o, r)| (r, r.timestamp_ms.unwrap_or(0), *o)).collect();
            let mut out = Vec::new();
            encode_batch_at(&stamped, Codec::None, &mut out).map_err(|e| CloudError::Batch(e.to_string()))?;
            records.clear();
            Ok(tx.blocking_send(Ok(Out::Batch { remote_next, batch: Bytes::from(out) })).is_ok())
        };
        let mut failed = None;
        self.scan(&consumer, &remote, start, |m| {
            if closed || failed.is_some() {
                return;
            }
            remote_next = m.offset() + 1;
            let provenance = |name| super::header(m, name);
            let ours = provenance(HEADER_SITE) == Some(self.site.as_str())
                && provenance(HEADER_TOPIC) == Some(self.topic.as_str())
                && provenance(HEADER_PARTITION) == Some(partition_text.as_str());
            let source = provenance(HEADER_OFFSET).and_then(|o| o.parse::<i64>().ok());
            let Some(source) = source.filter(|s| ours && *s > last_source) else {
                // Not this site's partition, or at an edge offset already restored: it cannot
                // go back to the offset it had.
                skipped += 1;
                return;
            };
            last_source = source;
            let record = restored_record(m);
            let size = record.encoded_len_max();
            if !pending.is_empty() && pending_bytes + size > limit {
                match send(&mut pending, m.offset()) {
                    Ok(true) => {}
                    Ok(false) => closed = true,
                    Err(e) => failed = Some(e),
                }
                pending_bytes = 0;
            }
            pending_bytes += size;
            pending.push((source, record));
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        if closed {
            return Ok(());
        }
        // Whatever the scan passed over at the end (compaction) is done as well.
        remote_next = remote_next.max(self.high).max(start);
        if !pending.is_empty() && !send(&mut pending, remote_next)? {
            return Ok(());
        }
        if skipped > 0 {
            tracing::warn!(site = %self.site, topic = %self.topic, partition = self.partition, skipped,
                "remote records without this partition's provenance, or out of edge order: not restored");
        }
        let _ = tx.blocking_send(Ok(Out::End { remote_next }));
        Ok(())
    }
}

/// A remote record as the edge had it: key, value, timestamp, and its headers without the
/// provenance headers the receiver added after them.
fn restored_record(m: &rdkafka::message::BorrowedMessage<'_>) -> NewRecord {
    let mut headers: Vec<(String, Option<Bytes>)> = m.headers().map_or_else(Vec::new, |h| {
        h.iter().map(|h| (h.key.to_string(), h.value.map(Bytes::copy_from_slice))).collect()
    });
    // The receiver appends exactly these four, in this order, after the record's own.
    let provenance = [HEADER_SITE, HEADER_TOPIC, HEADER_PARTITION, HEADER_OFFSET];
    let n = headers.len();
    if n >= 4 && headers[n - 4..].iter().zip(provenance).all(|((k, _), p)| k == p) {
        headers.truncate(n - 4);
    }
    NewRecord {
        key: m.key().map(Bytes::copy_from_slice),
        value: m.payload().map(Bytes::copy_from_slice),
        headers,
        timestamp_ms: Some(m.timestamp().to_millis().unwrap_or(0)),
    }
}

/// Bytes of a record's key, value and headers.
fn record_bytes(m: &rdkafka::message::BorrowedMessage<'_>) -> u64 {
    let headers: usize =
        m.headers().map_or(0, |h| h.iter().map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len)).sum());
    (m.key().map_or(0, <[u8]>::len) + m.payload().map_or(0, <[u8]>::len) + headers) as u64
}

#[cfg(test)]
mod tests {
    use super::{admit, listable, source_topic, take_groups, Progress};
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    /// Reading the checkpoints or extents topic fails when it stops moving for the timeout, not
    /// when a large topic takes longer than the timeout as a whole.
    #[test]
    fn an_internal_topic_read_fails_on_no_progress_not_on_its_length() {
        let start = Instant::now();
        let timeout = Duration::from_secs(10);
        let mut p = Progress::new(timeout, start);
        // A record every 4 s for 100 s: ten times the timeout, never 10 s without one.
        for s in (4..=100).step_by(4) {
            let now = start + Duration::from_secs(s);
            assert!(!p.stalled(now), "moving at {s} s");
            p.moved(now);
        }
        let last = start + Duration::from_secs(100);
        assert!(!p.stalled(last + timeout), "exactly the timeout since the last record");
        assert!(p.stalled(last + timeout + Duration::from_millis(1)), "stuck for longer than the timeout");
    }

    /// A gateway sending frame after frame of `RestoreGroups` (each within its per-frame limit)
    /// gets no more groups failed back in one restore than `restore_groups_max`, and the refusal
    /// names the key.
    #[test]
    fn groups_failed_back_in_one_restore_stay_within_restore_groups_max() {
        let mut named = 0;
        for _ in 0..3 {
            take_groups(&mut named, 256, 1_000).expect("within the limit");
        }
        let refused = take_groups(&mut named, 256, 1_000).expect_err("the fourth frame passes 1000");
        assert!(refused.to_string().contains("restore_groups_max = 1000"), "{refused}");
        let mut named = 0;
        take_groups(&mut named, 1_000, 1_000).expect("exactly the limit");
    }

    /// A hostile gateway asking for one partition again and again gets no more streams (each a
    /// librdkafka consumer) than `restore_streams_max`.
    #[test]
    fn a_partition_asked_for_twice_does_not_get_past_restore_streams_max() {
        let mut credits = BTreeMap::new();
        let first = admit(&mut credits, "meters", 0, 2).expect("first");
        assert!(admit(&mut credits, "meters", 0, 2).is_err(), "the same partition while it streams");
        let second = admit(&mut credits, "meters", 1, 2).expect("second");
        assert!(admit(&mut credits, "meters", 2, 2).is_err(), "over the limit");
        drop(first);
        let again = admit(&mut credits, "meters", 0, 2).expect("its stream ended: asked for again");
        drop((second, again));
    }

    /// A checkpoint the gateway's decoder would refuse is left out, not listed.
    #[test]
    fn only_checkpoints_within_the_protocol_s_limits_are_listed() {
        assert!(listable("billing", 0, 0));
        assert!(!listable("", 0, 0));
        assert!(!listable(&"g".repeat(crate::protocol::GROUP_ID_BYTES_MAX + 1), 0, 0));
        assert!(!listable("billing", -1, 0));
        assert!(!listable("billing", 0, -1));
    }

    #[test]
    fn remote_topics_map_back_to_the_site_s_topics_only() {
        let f = "{site}.{topic}";
        assert_eq!(source_topic(f, "plant-7", "plant-7.meters").as_deref(), Some("meters"));
        assert_eq!(source_topic(f, "plant-7", "plant-7.mqtt.retained").as_deref(), Some("mqtt.retained"));
        assert_eq!(source_topic(f, "plant", "plant-7.meters"), None, "another site");
        assert_eq!(source_topic(f, "plant-7", "plant-7."), None, "no topic");
        assert_eq!(source_topic("edge-{topic}-{site}", "p", "edge-meters-p").as_deref(), Some("meters"));
        assert_eq!(source_topic("edge-{topic}-{site}", "p", "edge-meters-q"), None);
    }
}
