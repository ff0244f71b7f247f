//! The mirror wire protocol, sans-I/O: frames on the control stream and on the per-partition
//! data streams, their encoding, and an incremental decoder fed with whatever bytes arrived.
//!
//! Every frame is `u32 length | u8 type | body`; the length covers type and body and is checked
//! against a limit before anything is buffered. Strings are `u16 length | UTF-8`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// ALPN of the first protocol version (no `Offsets` frame).
pub const ALPN: &[u8] = b"tributary-mirror/1";

/// ALPN of version 2: version 1 plus the `Offsets` control frame (committed consumer-group
/// offsets, gateway to cloud) and the `TopicConfigs` frame (compacted topics' settings).
pub const ALPN_V2: &[u8] = b"tributary-mirror/2";

/// ALPN of version 3: version 2 plus the restore frames (a replacement gateway rebuilt from the
/// central cluster: `RestoreHello`, `RestoreTopics`, `RestoreOffsets`, `RestoreListed`,
/// `RestoreStart`, and the `Restored`/`RestoreEnd` data frames). A mirror session of version 3
/// is a version 2 session.
pub const ALPN_V3: &[u8] = b"tributary-mirror/3";

/// ALPN of version 4: version 3 plus the `TopicOverrides` frame (every mirrored topic's own
/// settings, gateway to cloud in a mirror session, cloud to gateway in a restore's listing). A
/// version 3 peer settles on version 3 and never sees it.
pub const ALPN_V4: &[u8] = b"tributary-mirror/4";

/// The versions both ends offer, newest first. TLS picks one both speak, so a new gateway and an
/// old receiver settle on the old receiver's newest (the gateway then never sends what that
/// version lacks), and an old gateway and a new receiver too; ends with no version in common do
/// not complete the handshake. `tributary restore` offers only `ALPN_V4` and `ALPN_V3`.
pub const ALPNS: [&[u8]; 4] = [ALPN_V4, ALPN_V3, ALPN_V2, ALPN];

/// The protocol version a negotiated ALPN names (1 when none or unknown).
pub fn alpn_version(alpn: Option<&[u8]>) -> u8 {
    match alpn {
        Some(a) if a == ALPN_V4 => 4,
        Some(a) if a == ALPN_V3 => 3,
        Some(a) if a == ALPN_V2 => 2,
        _ => 1,
    }
}

/// Topics in one `RestoreTopics` frame at most.
pub const RESTORE_TOPICS_PER_FRAME_MAX: usize = 64;

/// Partitions of one topic a restore lists at most (its extents must fit a control frame: 24
/// bytes each with the reported high watermark, 768 KiB at most).
pub const RESTORE_PARTITIONS_MAX: usize = 32_768;

/// Groups one `RestoreGroups` frame names at most.
pub const RESTORE_GROUPS_PER_FRAME_MAX: usize = 256;

/// Partitions one `RestoreTopics` frame lists at most, over all its topics.
pub const RESTORE_PARTITIONS_PER_FRAME_MAX: usize = 32_768;

/// Committed offsets in one `Offsets` frame at most (the gateway sends more in several frames).
pub const OFFSETS_PER_FRAME_MAX: usize = 512;

/// The longest consumer-group id carried (bytes); a longer group's offsets are not mirrored.
/// With `OFFSETS_PER_FRAME_MAX` this keeps an `Offsets` frame under the control stream's 1 MiB.
pub const GROUP_ID_BYTES_MAX: usize = 1024;

/// Topics in one `TopicConfigs` frame at most (the gateway sends more in several frames).
pub const TOPIC_CONFIGS_PER_FRAME_MAX: usize = 256;

/// The topic settings a `TopicConfigs` frame may carry: the cleanup policy and compaction's
/// settings. Retention (`retention.ms`, `retention.bytes`) is not among them: how long the
/// centre keeps data is the central cluster's owners' choice (`kafka.topic_config`).
pub const MIRRORED_TOPIC_CONFIGS: [&str; 5] = [
    "cleanup.policy",
    "delete.retention.ms",
    "min.compaction.lag.ms",
    "max.compaction.lag.ms",
    "min.cleanable.dirty.ratio",
];

/// The longest value of a mirrored topic setting (bytes; an i64 in decimal is 20).
pub const TOPIC_CONFIG_VALUE_BYTES_MAX: usize = 32;

/// Topics in one `TopicOverrides` frame at most (the sender sends more in several frames). With
/// the per-topic bounds below a frame stays under 600 KiB, within the control stream's 1 MiB.
pub const TOPIC_OVERRIDES_PER_FRAME_MAX: usize = 128;

/// Own settings of one topic a `TopicOverrides` frame carries at most (a gateway has 14 today;
/// room for settings a later release adds).
pub const TOPIC_OVERRIDE_KEYS_MAX: usize = 32;

/// The longest setting name and value a `TopicOverrides` frame carries (bytes). A value longer
/// than this is not sent (a warning names it); no setting a gateway has today comes close.
pub const TOPIC_OVERRIDE_NAME_BYTES_MAX: usize = 64;
pub const TOPIC_OVERRIDE_VALUE_BYTES_MAX: usize = 64;

/// The longest topic name (Kafka's limit).
pub const TOPIC_BYTES_MAX: usize = 249;

/// The largest `Open` frame body: its type, a topic name (at most 249 bytes, as in Kafka) and a
/// partition. A data stream is held to this until its `Open` has been checked, so a stream that
/// never names a partition costs the receiver a few hundred bytes, not a batch's worth.
pub const OPEN_FRAME_BYTES_MAX: usize = 1 + 2 + 249 + 4;

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("frame of {size} bytes over the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("malformed {0} frame")]
    Malformed(&'static str),
    #[error("unexpected {0} frame")]
    Unexpected(&'static str),
}

/// A partition as the gateway has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionReport {
    pub topic: String,
    pub partition: i32,
    /// Partitions of the topic (the remote topic is created with as many).
    pub partitions: i32,
    pub log_start: i64,
    pub high_watermark: i64,
}

/// A consumer group's committed offset of a mirrored partition, as the gateway's coordinator
/// stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedOffset {
    pub group: String,
    pub topic: String,
    pub partition: i32,
    /// The next record the group reads.
    pub offset: i64,
    /// When it was committed (ms since the epoch, the gateway's clock): the receiver measures
    /// translation lag from it.
    pub commit_time_ms: i64,
}

/// A mirrored topic's settings as the gateway has them (names from `MIRRORED_TOPIC_CONFIGS`,
/// each at most once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSettings {
    pub topic: String,
    pub configs: Vec<(String, String)>,
}

/// Whether a topic's own settings fit a `TopicOverrides` frame: at most
/// `TOPIC_OVERRIDE_KEYS_MAX` settings, names non-empty, each at most once, names and values
/// within their byte limits.
pub fn overrides_fit(configs: &[(String, String)]) -> bool {
    configs.len() <= TOPIC_OVERRIDE_KEYS_MAX
        && configs.iter().enumerate().all(|(i, (k, v))| {
            !k.is_empty()
                && k.len() <= TOPIC_OVERRIDE_NAME_BYTES_MAX
                && v.len() <= TOPIC_OVERRIDE_VALUE_BYTES_MAX
                && !configs[..i].iter().any(|(other, _)| other == k)
        })
}

/// A remote topic of the site, as a restore lists it: the gateway's topic name, its partitions
/// with their remote extents (`[low, high)` remote offsets), and its settings
/// (`MIRRORED_TOPIC_CONFIGS` it has in the central cluster).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreTopic {
    pub topic: String,
    pub configs: Vec<(String, String)>,
    /// Per partition, in partition order: (low, high) remote offsets.
    pub extents: Vec<(i64, i64)>,
    /// Per partition, in partition order (as many as `extents`): the highest high watermark the
    /// lost gateway ever reported for it (an edge offset; 0 when none is known). Offsets below it
    /// were given out at the edge, mirrored or not.
    pub reported: Vec<i64>,
}

/// Where a restored partition starts, in the remote partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreFrom {
    /// At this remote offset (a resumed restore: the offset after the last record stored).
    Offset(i64),
    /// At the first record whose timestamp is at or after this (ms since the epoch): `--since`.
    Time(i64),
    /// The last this many bytes of records (keys, values, headers), estimated from the
    /// partition's newest records: `--bytes`.
    TailBytes(i64),
}

/// A frame of the control stream, either direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Gateway, first frame: who it is.
    Hello { site: String },
    /// Gateway: the mirrored partitions and their extents (at start and whenever they change).
    Partitions(Vec<PartitionReport>),
    /// Cloud: send this partition from `offset` on (the central cluster's resume point).
    Start { topic: String, partition: i32, offset: i64 },
    /// Cloud: the gateway may send `bytes` more of this partition.
    Credit { topic: String, partition: i32, bytes: u64 },
    /// Cloud: everything below `offset` is stored in the central cluster.
    Mirrored { topic: String, partition: i32, offset: i64 },
    /// Either side, before closing: why.
    Refused { reason: String },
    /// Gateway (version 2 only): consumer groups' latest committed offsets of mirrored
    /// partitions, each sent once the records below it have been sent on its data stream; at most
    /// `OFFSETS_PER_FRAME_MAX`, group ids at most `GROUP_ID_BYTES_MAX`.
    Offsets(Vec<CommittedOffset>),
    /// Gateway (version 2 only), before the `Partitions` frame that first names them: the
    /// settings of its compacted mirrored topics, so the remote topics are created compacted
    /// too. At most `TOPIC_CONFIGS_PER_FRAME_MAX` topics; names from `MIRRORED_TOPIC_CONFIGS`.
    TopicConfigs(Vec<TopicSettings>),
    /// Version 4. Gateway, in a mirror session: mirrored topics' own settings (those that are the
    /// topic's own, not the gateway's `[topic_defaults]`), each topic's complete set (an empty one:
    /// none of its own), sent when a topic is first named in the session and whenever its settings
    /// change. Cloud, in a restore's listing (before `RestoreListed`): the settings it keeps of the
    /// listed topics. At most `TOPIC_OVERRIDES_PER_FRAME_MAX` topics, `TOPIC_OVERRIDE_KEYS_MAX`
    /// settings each (any names: the receiver keeps them as they are, the restored gateway checks
    /// them).
    TopicOverrides(Vec<TopicSettings>),
    /// Gateway (version 3), first frame instead of `Hello`: a restore of this site. The cloud
    /// answers with `RestoreTopics`, `RestoreOffsets` and `RestoreListed`.
    RestoreHello { site: String },
    /// Cloud (version 3): remote topics of the site (at most `RESTORE_TOPICS_PER_FRAME_MAX`,
    /// `RESTORE_PARTITIONS_PER_FRAME_MAX` partitions over all, `RESTORE_PARTITIONS_MAX` each).
    RestoreTopics(Vec<RestoreTopic>),
    /// Cloud (version 3): the site's consumer groups' committed offsets from its MirrorMaker 2
    /// checkpoints (edge topic, partition, upstream = edge offset; `commit_time_ms`: the
    /// checkpoint record's timestamp). At most `OFFSETS_PER_FRAME_MAX`.
    RestoreOffsets(Vec<CommittedOffset>),
    /// Cloud (version 3): the listing is complete.
    RestoreListed,
    /// Gateway (version 3): stream this partition from `from` to the remote partition's high
    /// watermark now, on a stream the cloud opens, within the `Credit` the gateway grants.
    RestoreStart { topic: String, partition: i32, from: RestoreFrom },
    /// Gateway (version 3), after its partitions are restored: fail these consumer groups back
    /// (edge names; at most `RESTORE_GROUPS_PER_FRAME_MAX`). The cloud answers with
    /// `RestoreOffsets` (each central group's committed offsets translated back to edge offsets
    /// by the provenance of the record at them) and `RestoreListed`.
    RestoreGroups(Vec<String>),
}

/// A frame of a data stream (gateway to cloud, one stream per partition; in a restore, cloud to
/// gateway).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// First frame: which partition the stream carries.
    Open { topic: String, partition: i32 },
    /// One RecordBatch v2 exactly as stored (compressed as stored, offsets as in the gateway).
    Batch(Bytes),
    /// Offsets `[from, to)` were deleted by retention before they were mirrored.
    Gap { from: i64, to: i64 },
    /// Restore (cloud to gateway): an uncompressed RecordBatch v2 of the partition's records at
    /// their original (edge) offsets, provenance headers removed; `remote_next` is the remote
    /// offset after its last record (where a resumed restore continues).
    Restored { remote_next: i64, batch: Bytes },
    /// Restore: the partition is complete up to `remote_next` (the remote high watermark when it
    /// started); the stream ends.
    RestoreEnd { remote_next: i64 },
}

const HELLO: u8 = 1;
const PARTITIONS: u8 = 2;
const START: u8 = 3;
const CREDIT: u8 = 4;
const MIRRORED: u8 = 5;
const REFUSED: u8 = 6;
const OFFSETS: u8 = 7;
const TOPIC_CONFIGS: u8 = 8;
const RESTORE_HELLO: u8 = 9;
const RESTORE_TOPICS: u8 = 10;
const RESTORE_OFFSETS: u8 = 11;
const RESTORE_LISTED: u8 = 12;
const RESTORE_START: u8 = 13;
const RESTORE_GROUPS: u8 = 14;
const TOPIC_OVERRIDES: u8 = 15;
const OPEN: u8 = 16;
const BATCH: u8 = 17;
const GAP: u8 = 18;
const RESTORED: u8 = 19;
const RESTORE_END: u8 = 20;

fn put_str(b: &mut BytesMut, s: &str) {
    let n = s.len().min(u16::MAX as usize);
    b.put_u16(n as u16);
    b.put_slice(&s.as_bytes()[..n]);
}

fn frame(kind: u8, body: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut b = BytesMut::with_capacity(64);
    b.put_u32(0);
    b.put_u8(kind);
    body(&mut b);
    let len = (b.len() - 4) as u32;
    b[..4].copy_from_slice(&len.to_be_bytes());
    b.freeze()
}

impl Control {
    /// The protocol version that introduced this frame: a session of an older version neither
    /// sends it nor accepts it.
    pub fn version(&self) -> u8 {
        match self {
            Control::Offsets(_) | Control::TopicConfigs(_) => 2,
            Control::RestoreHello { .. }
            | Control::RestoreTopics(_)
            | Control::RestoreOffsets(_)
            | Control::RestoreListed
            | Control::RestoreStart { .. }
            | Control::RestoreGroups(_) => 3,
            Control::TopicOverrides(_) => 4,
            _ => 1,
        }
    }

    pub fn encode(&self) -> Bytes {
        match self {
            Control::Hello { site } => frame(HELLO, |b| put_str(b, site)),
            Control::Partitions(list) => frame(PARTITIONS, |b| {
                b.put_u32(list.len() as u32);
                for p in list {
                    put_str(b, &p.topic);
                    b.put_i32(p.partition);
                    b.put_i32(p.partitions);
                    b.put_i64(p.log_start);
                    b.put_i64(p.high_watermark);
                }
            }),
            Control::Start { topic, partition, offset } => frame(START, |b| {
                put_str(b, topic);
                b.put_i32(*partition);
                b.put_i64(*offset);
            }),
            Control::Credit { topic, partition, bytes } => frame(CREDIT, |b| {
                put_str(b, topic);
                b.put_i32(*partition);
                b.put_u64(*bytes);
            }),
            Control::Mirrored { topic, partition, offset } => frame(MIRRORED, |b| {
                put_str(b, topic);
                b.put_i32(*partition);
                b.put_i64(*offset);
            }),
            Control::Refused { reason } => frame(REFUSED, |b| put_str(b, reason)),
            Control::Offsets(list) => frame(OFFSETS, |b| put_offsets(b, list)),
            Control::RestoreOffsets(list) => frame(RESTORE_OFFSETS, |b| put_offsets(b, list)),
            Control::RestoreHello { site } => frame(RESTORE_HELLO, |b| put_str(b, site)),
            Control::RestoreListed => frame(RESTORE_LISTED, |_| {}),
            Control::RestoreTopics(list) => frame(RESTORE_TOPICS, |b| {
                b.put_u32(list.len() as u32);
                for t in list {
                    put_str(b, &t.topic);
                    put_settings(b, &t.configs);
                    debug_assert_eq!(t.extents.len(), t.reported.len(), "one reported offset per partition");
                    b.put_u32(t.extents.len() as u32);
                    for (i, (low, high)) in t.extents.iter().enumerate() {
                        b.put_i64(*low);
                        b.put_i64(*high);
                        b.put_i64(t.reported.get(i).copied().unwrap_or(0));
                    }
                }
            }),
            Control::RestoreGroups(groups) => frame(RESTORE_GROUPS, |b| {
                b.put_u32(groups.len() as u32);
                for g in groups {
                    put_str(b, g);
                }
            }),
            Control::RestoreStart { topic, partition, from } => frame(RESTORE_START, |b| {
                put_str(b, topic);
                b.put_i32(*partition);
                let (kind, value) = match from {
                    RestoreFrom::Offset(o) => (0, *o),
                    RestoreFrom::Time(t) => (1, *t),
                    RestoreFrom::TailBytes(n) => (2, *n),
                };
                b.put_u8(kind);
                b.put_i64(value);
            }),
            Control::TopicConfigs(list) => frame(TOPIC_CONFIGS, |b| put_topic_settings(b, list)),
            Control::TopicOverrides(list) => frame(TOPIC_OVERRIDES, |b| put_topic_settings(b, list)),
        }
    }

    fn decode(kind: u8, mut body: Bytes) -> Result<Self, ProtocolError> {
        let b = &mut body;
        let out = match kind {
            HELLO => Control::Hello { site: get_str(b, "hello")? },
            PARTITIONS => {
                let n = get_count(b, "partitions", usize::MAX, 26)?;
                let mut list = Vec::with_capacity(n);
                for _ in 0..n {
                    list.push(PartitionReport {
                        topic: get_str(b, "partitions")?,
                        partition: get_i32(b, "partitions")?,
                        partitions: get_i32(b, "partitions")?,
                        log_start: get_i64(b, "partitions")?,
                        high_watermark: get_i64(b, "partitions")?,
                    });
                }
                Control::Partitions(list)
            }
            START => Control::Start {
                topic: get_str(b, "start")?,
                partition: get_i32(b, "start")?,
                offset: get_i64(b, "start")?,
            },
            CREDIT => Control::Credit {
                topic: get_str(b, "credit")?,
                partition: get_i32(b, "credit")?,
                bytes: get_u64(b, "credit")?,
            },
            MIRRORED => Control::Mirrored {
                topic: get_str(b, "mirrored")?,
                partition: get_i32(b, "mirrored")?,
                offset: get_i64(b, "mirrored")?,
            },
            REFUSED => Control::Refused { reason: get_str(b, "refused")? },
            OFFSETS => Control::Offsets(get_offsets(b, "offsets")?),
            RESTORE_OFFSETS => Control::RestoreOffsets(get_offsets(b, "restore offsets")?),
            RESTORE_HELLO => Control::RestoreHello { site: get_str(b, "restore hello")? },
            RESTORE_LISTED => Control::RestoreListed,
            RESTORE_TOPICS => {
                let what = "restore topics";
                let n = get_count(b, what, RESTORE_TOPICS_PER_FRAME_MAX, 7)?;
                let mut list = Vec::with_capacity(n);
                let mut partitions = 0usize;
                for _ in 0..n {
                    let topic = get_str(b, what)?;
                    if topic.is_empty() || topic.len() > TOPIC_BYTES_MAX {
                        return Err(ProtocolError::Malformed(what));
                    }
                    let configs =
                        get_settings(b, what, MIRRORED_TOPIC_CONFIGS.len(), TOPIC_CONFIG_VALUE_BYTES_MAX, |name| {
                            MIRRORED_TOPIC_CONFIGS.contains(&name)
                        })?;
                    let p = get_u32(b, what)? as usize;
                    partitions += p;
                    if p == 0
                        || p > RESTORE_PARTITIONS_MAX
                        || partitions > RESTORE_PARTITIONS_PER_FRAME_MAX
                        || p > b.remaining() / 24
                    {
                        return Err(ProtocolError::Malformed(what));
                    }
                    let mut extents = Vec::with_capacity(p);
                    let mut reported = Vec::with_capacity(p);
                    for _ in 0..p {
                        let (low, high, hwm) = (get_i64(b, what)?, get_i64(b, what)?, get_i64(b, what)?);
                        if low < 0 || high < low || hwm < 0 {
                            return Err(ProtocolError::Malformed(what));
                        }
                        extents.push((low, high));
                        reported.push(hwm);
                    }
                    list.push(RestoreTopic { topic, configs, extents, reported });
                }
                Control::RestoreTopics(list)
            }
            RESTORE_GROUPS => {
                let what = "restore groups";
                let n = get_count(b, what, RESTORE_GROUPS_PER_FRAME_MAX, 2)?;
                let mut groups = Vec::with_capacity(n);
                for _ in 0..n {
                    let g = get_str(b, what)?;
                    if g.is_empty() || g.len() > GROUP_ID_BYTES_MAX {
                        return Err(ProtocolError::Malformed(what));
                    }
                    groups.push(g);
                }
                Control::RestoreGroups(groups)
            }
            RESTORE_START => {
                let what = "restore start";
                let topic = get_str(b, what)?;
                let partition = get_i32(b, what)?;
                let kind = get_u8(b, what)?;
                let value = get_i64(b, what)?;
                let from = match kind {
                    0 if value >= 0 => RestoreFrom::Offset(value),
                    1 => RestoreFrom::Time(value),
                    2 if value >= 0 => RestoreFrom::TailBytes(value),
                    _ => return Err(ProtocolError::Malformed(what)),
                };
                if topic.len() > TOPIC_BYTES_MAX || partition < 0 {
                    return Err(ProtocolError::Malformed(what));
                }
                Control::RestoreStart { topic, partition, from }
            }
            TOPIC_CONFIGS => {
                let what = "topic configs";
                let n = get_count(b, what, TOPIC_CONFIGS_PER_FRAME_MAX, 3)?;
                let mut list = Vec::with_capacity(n);
                for _ in 0..n {
                    let topic = get_str(b, what)?;
                    if topic.len() > TOPIC_BYTES_MAX {
                        return Err(ProtocolError::Malformed(what));
                    }
                    let configs =
                        get_settings(b, what, MIRRORED_TOPIC_CONFIGS.len(), TOPIC_CONFIG_VALUE_BYTES_MAX, |name| {
                            MIRRORED_TOPIC_CONFIGS.contains(&name)
                        })?;
                    list.push(TopicSettings { topic, configs });
                }
                Control::TopicConfigs(list)
            }
            TOPIC_OVERRIDES => {
                let what = "topic overrides";
                let n = get_count(b, what, TOPIC_OVERRIDES_PER_FRAME_MAX, 3)?;
                let mut list = Vec::with_capacity(n);
                for _ in 0..n {
                    let topic = get_str(b, what)?;
                    if topic.is_empty() || topic.len() > TOPIC_BYTES_MAX {
                        return Err(ProtocolError::Malformed(what));
                    }
                    let configs =
                        get_settings(b, what, TOPIC_OVERRIDE_KEYS_MAX, TOPIC_OVERRIDE_VALUE_BYTES_MAX, |name| {
                            !name.is_empty() && name.len() <= TOPIC_OVERRIDE_NAME_BYTES_MAX
                        })?;
                    list.push(TopicSettings { topic, configs });
                }
                Control::TopicOverrides(list)
            }
            OPEN | BATCH | GAP | RESTORED | RESTORE_END => return Err(ProtocolError::Unexpected("data")),
            other => return Err(ProtocolError::UnknownType(other)),
        };
        if b.has_remaining() {
            return Err(ProtocolError::Malformed("control"));
        }
        Ok(out)
    }
}

impl Data {
    /// Encodes the frame. A batch is written as a header only: send `batch_body` after it, so
    /// the stored bytes are never copied.
    pub fn encode_header(&self) -> Bytes {
        match self {
            Data::Open { topic, partition } => frame(OPEN, |b| {
                put_str(b, topic);
                b.put_i32(*partition);
            }),
            Data::Batch(batch) => {
                let mut b = BytesMut::with_capacity(5);
                b.put_u32(batch.len() as u32 + 1);
                b.put_u8(BATCH);
                b.freeze()
            }
            Data::Gap { from, to } => frame(GAP, |b| {
                b.put_i64(*from);
                b.put_i64(*to);
            }),
            Data::Restored { remote_next, batch } => {
                let mut b = BytesMut::with_capacity(13);
                b.put_u32(batch.len() as u32 + 9);
                b.put_u8(RESTORED);
                b.put_i64(*remote_next);
                b.freeze()
            }
            Data::RestoreEnd { remote_next } => frame(RESTORE_END, |b| b.put_i64(*remote_next)),
        }
    }

    fn decode(kind: u8, mut body: Bytes) -> Result<Self, ProtocolError> {
        let b = &mut body;
        let out = match kind {
            OPEN => Data::Open { topic: get_str(b, "open")?, partition: get_i32(b, "open")? },
            BATCH => return Ok(Data::Batch(body)),
            GAP => Data::Gap { from: get_i64(b, "gap")?, to: get_i64(b, "gap")? },
            // A remote offset is never negative: one would be stored as the restore's progress
            // and asked for again, which the receiver refuses.
            RESTORED => {
                let remote_next = get_i64(b, "restored")?;
                if remote_next < 0 {
                    return Err(ProtocolError::Malformed("restored"));
                }
                return Ok(Data::Restored { remote_next, batch: body });
            }
            RESTORE_END => match get_i64(b, "restore end")? {
                n if n < 0 => return Err(ProtocolError::Malformed("restore end")),
                remote_next => Data::RestoreEnd { remote_next },
            },
            HELLO..=TOPIC_OVERRIDES => return Err(ProtocolError::Unexpected("control")),
            other => return Err(ProtocolError::UnknownType(other)),
        };
        if b.has_remaining() {
            return Err(ProtocolError::Malformed("data"));
        }
        Ok(out)
    }
}

/// A topic's settings: `u8 count | (name, value)*` (at most 255; the decoders allow far fewer).
pub(crate) fn put_settings(b: &mut BytesMut, configs: &[(String, String)]) {
    b.put_u8(configs.len().min(u8::MAX as usize) as u8);
    for (k, v) in configs.iter().take(u8::MAX as usize) {
        put_str(b, k);
        put_str(b, v);
    }
}

fn put_topic_settings(b: &mut BytesMut, list: &[TopicSettings]) {
    b.put_u32(list.len() as u32);
    for t in list {
        put_str(b, &t.topic);
        put_settings(b, &t.configs);
    }
}

/// A topic's settings as `put_settings` wrote them: at most `keys_max`, each name `allowed`
/// and at most once, values at most `value_bytes_max`. The count is checked before anything is
/// allocated.
pub(crate) fn get_settings(
    b: &mut Bytes,
    what: &'static str,
    keys_max: usize,
    value_bytes_max: usize,
    allowed: impl Fn(&str) -> bool,
) -> Result<Vec<(String, String)>, ProtocolError> {
    let k = get_u8(b, what)? as usize;
    // Each setting takes at least two empty strings' lengths.
    if k > keys_max || k > b.remaining() / 4 {
        return Err(ProtocolError::Malformed(what));
    }
    let mut configs: Vec<(String, String)> = Vec::with_capacity(k);
    for _ in 0..k {
        let name = get_str(b, what)?;
        let value = get_str(b, what)?;
        if !allowed(&name) || value.len() > value_bytes_max || configs.iter().any(|(n, _)| *n == name) {
            return Err(ProtocolError::Malformed(what));
        }
        configs.push((name, value));
    }
    Ok(configs)
}

fn put_offsets(b: &mut BytesMut, list: &[CommittedOffset]) {
    b.put_u32(list.len() as u32);
    for o in list {
        put_str(b, &o.group);
        put_str(b, &o.topic);
        b.put_i32(o.partition);
        b.put_i64(o.offset);
        b.put_i64(o.commit_time_ms);
    }
}

/// A frame's entry count: malformed above `max` or above what the bytes that arrived can hold
/// (each entry takes at least `entry_bytes_min`), so nothing is ever allocated from a count alone.
fn get_count(b: &mut Bytes, what: &'static str, max: usize, entry_bytes_min: usize) -> Result<usize, ProtocolError> {
    let n = get_u32(b, what)? as usize;
    if n > max || n > b.remaining() / entry_bytes_min {
        return Err(ProtocolError::Malformed(what));
    }
    Ok(n)
}

fn get_offsets(b: &mut Bytes, what: &'static str) -> Result<Vec<CommittedOffset>, ProtocolError> {
    let n = get_count(b, what, OFFSETS_PER_FRAME_MAX, 24)?;
    let mut list = Vec::with_capacity(n);
    for _ in 0..n {
        let o = CommittedOffset {
            group: get_str(b, what)?,
            topic: get_str(b, what)?,
            partition: get_i32(b, what)?,
            offset: get_i64(b, what)?,
            commit_time_ms: get_i64(b, what)?,
        };
        if o.group.len() > GROUP_ID_BYTES_MAX || o.topic.len() > TOPIC_BYTES_MAX || o.offset < 0 {
            return Err(ProtocolError::Malformed(what));
        }
        list.push(o);
    }
    Ok(list)
}

fn get_str(b: &mut Bytes, what: &'static str) -> Result<String, ProtocolError> {
    let n = get_u16(b, what)? as usize;
    if b.remaining() < n {
        return Err(ProtocolError::Malformed(what));
    }
    let s = b.split_to(n);
    String::from_utf8(s.to_vec()).map_err(|_| ProtocolError::Malformed(what))
}

macro_rules! getter {
    ($name:ident, $t:ty, $get:ident) => {
        fn $name(b: &mut Bytes, what: &'static str) -> Result<$t, ProtocolError> {
            if b.remaining() < std::mem::size_of::<$t>() {
                return Err(ProtocolError::Malformed(what));
            }
            Ok(b.$get())
        }
    };
}
getter!(get_u8, u8, get_u8);
getter!(get_u16, u16, get_u16);
getter!(get_u32, u32, get_u32);
getter!(get_i32, i32, get_i32);
getter!(get_i64, i64, get_i64);
getter!(get_u64, u64, get_u64);

/// Splits a byte stream into frames. Feed it what arrived; take frames while there are any.
#[derive(Debug)]
pub struct Decoder {
    buf: BytesMut,
    max: usize,
}

impl Decoder {
    /// `max`: the largest frame accepted (a batch's size limit plus a little).
    pub fn new(max: usize) -> Self {
        Self { buf: BytesMut::new(), max }
    }

    /// Changes the largest frame accepted from now on (a data stream accepts only a small
    /// `Open` frame first, then batches).
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame as (type, body), `None` until one has arrived.
    fn next_raw(&mut self) -> Result<Option<(u8, Bytes)>, ProtocolError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > self.max {
            return Err(ProtocolError::TooLarge { size: len, max: self.max });
        }
        if len == 0 {
            return Err(ProtocolError::Malformed("empty"));
        }
        if self.buf.len() < 4 + len {
            // Nothing is reserved for bytes that have not arrived: the buffer grows as they do.
            return Ok(None);
        }
        self.buf.advance(4);
        let mut body = self.buf.split_to(len).freeze();
        let kind = body.get_u8();
        Ok(Some((kind, body)))
    }

    pub fn next_control(&mut self) -> Result<Option<Control>, ProtocolError> {
        self.next_raw()?.map(|(k, b)| Control::decode(k, b)).transpose()
    }

    pub fn next_data(&mut self) -> Result<Option<Data>, ProtocolError> {
        self.next_raw()?.map(|(k, b)| Data::decode(k, b)).transpose()
    }

    /// Bytes received but not yet part of a whole frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controls() -> Vec<Control> {
        vec![
            Control::Hello { site: "plant-7".into() },
            Control::Partitions(vec![PartitionReport {
                topic: "meters".into(),
                partition: 2,
                partitions: 3,
                log_start: 10,
                high_watermark: 99,
            }]),
            Control::Start { topic: "meters".into(), partition: 2, offset: 50 },
            Control::Credit { topic: "meters".into(), partition: 2, bytes: 1 << 22 },
            Control::Mirrored { topic: "meters".into(), partition: 2, offset: 60 },
            Control::Refused { reason: "site id does not match".into() },
            Control::Offsets(vec![
                CommittedOffset {
                    group: "billing".into(),
                    topic: "meters".into(),
                    partition: 2,
                    offset: 57,
                    commit_time_ms: 1_700_000_000_000,
                },
                // Group and topic names that would run together in a joined key stay apart.
                CommittedOffset { group: "a.b".into(), topic: "c".into(), partition: 0, offset: 0, commit_time_ms: 1 },
                CommittedOffset { group: "a".into(), topic: "b.c".into(), partition: 0, offset: 1, commit_time_ms: 1 },
            ]),
            Control::TopicConfigs(vec![
                TopicSettings {
                    topic: "mqtt.retained".into(),
                    configs: vec![
                        ("cleanup.policy".into(), "compact".into()),
                        ("delete.retention.ms".into(), "86400000".into()),
                        ("min.compaction.lag.ms".into(), "0".into()),
                        ("max.compaction.lag.ms".into(), i64::MAX.to_string()),
                        ("min.cleanable.dirty.ratio".into(), "0.5".into()),
                    ],
                },
                TopicSettings {
                    topic: "state".into(),
                    configs: vec![("cleanup.policy".into(), "compact,delete".into())],
                },
            ]),
            Control::RestoreHello { site: "plant-7".into() },
            Control::RestoreTopics(vec![
                RestoreTopic {
                    topic: "mqtt.retained".into(),
                    configs: vec![("cleanup.policy".into(), "compact".into())],
                    extents: vec![(0, 12)],
                    reported: vec![12],
                },
                RestoreTopic {
                    topic: "meters".into(),
                    configs: Vec::new(),
                    extents: vec![(0, 0), (5, 900), (0, 3)],
                    reported: vec![0, 1_000_000, 3],
                },
            ]),
            Control::RestoreOffsets(vec![CommittedOffset {
                group: "billing".into(),
                topic: "meters".into(),
                partition: 1,
                offset: 450,
                commit_time_ms: 1_700_000_000_000,
            }]),
            Control::RestoreListed,
            Control::RestoreStart { topic: "meters".into(), partition: 1, from: RestoreFrom::Offset(77) },
            Control::RestoreStart { topic: "meters".into(), partition: 2, from: RestoreFrom::Time(1_700_000_000_000) },
            Control::RestoreStart { topic: "meters".into(), partition: 0, from: RestoreFrom::TailBytes(1 << 30) },
            Control::RestoreGroups(vec!["billing".into(), "a.b".into()]),
            Control::TopicOverrides(vec![
                TopicSettings {
                    topic: "meters".into(),
                    configs: vec![
                        ("retention.ms".into(), "3600000".into()),
                        ("compression.type".into(), "zstd".into()),
                        ("message.timestamp.type".into(), "LogAppendTime".into()),
                    ],
                },
                // No settings of its own (any it had went back to the defaults).
                TopicSettings { topic: "alarms".into(), configs: Vec::new() },
            ]),
        ]
    }

    #[test]
    fn control_frames_round_trip_byte_by_byte() {
        let mut d = Decoder::new(1 << 20);
        let mut got = Vec::new();
        for c in controls() {
            for byte in c.encode().iter() {
                d.feed(&[*byte]);
                if let Some(f) = d.next_control().expect("valid") {
                    got.push(f);
                }
            }
        }
        assert_eq!(got, controls());
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn data_frames_round_trip_and_batches_are_not_copied_into_the_header() {
        let batch = Bytes::from_static(b"stored batch bytes");
        let mut d = Decoder::new(1 << 20);
        d.feed(&Data::Open { topic: "t".into(), partition: 1 }.encode_header());
        let header = Data::Batch(batch.clone()).encode_header();
        assert_eq!(header.len(), 5);
        d.feed(&header);
        d.feed(&batch);
        d.feed(&Data::Gap { from: 3, to: 9 }.encode_header());
        assert_eq!(d.next_data().expect("ok"), Some(Data::Open { topic: "t".into(), partition: 1 }));
        assert_eq!(d.next_data().expect("ok"), Some(Data::Batch(batch)));
        assert_eq!(d.next_data().expect("ok"), Some(Data::Gap { from: 3, to: 9 }));
        assert_eq!(d.next_data().expect("ok"), None);
    }

    #[test]
    fn an_open_frame_fits_the_pre_open_limit_and_a_batch_header_does_not() {
        let topic = "t".repeat(249);
        let open = Data::Open { topic: topic.clone(), partition: i32::MAX }.encode_header();
        let mut d = Decoder::new(OPEN_FRAME_BYTES_MAX);
        d.feed(&open);
        assert_eq!(d.next_data(), Ok(Some(Data::Open { topic, partition: i32::MAX })));
        // A stream that starts with a 1 MiB batch instead is refused on its 4-byte length.
        let mut d = Decoder::new(OPEN_FRAME_BYTES_MAX);
        d.feed(&Data::Batch(Bytes::from(vec![0u8; 1 << 20])).encode_header());
        assert_eq!(d.next_data(), Err(ProtocolError::TooLarge { size: (1 << 20) + 1, max: OPEN_FRAME_BYTES_MAX }));
    }

    #[test]
    fn nothing_is_reserved_for_a_frame_before_its_bytes_arrive() {
        let mut d = Decoder::new(16 << 20);
        d.feed(&Data::Batch(Bytes::from(vec![0u8; 8 << 20])).encode_header());
        assert_eq!(d.next_data(), Ok(None));
        assert!(d.buf.capacity() < 1 << 20, "capacity {} after a 5-byte header", d.buf.capacity());
    }

    #[test]
    fn offsets_frames_are_bounded_and_checked() {
        let entry = |group: String, offset: i64| CommittedOffset {
            group,
            topic: "meters".into(),
            partition: 0,
            offset,
            commit_time_ms: 0,
        };
        // The largest frame the sender makes fits the control stream's 1 MiB decoder.
        let big =
            Control::Offsets((0..OFFSETS_PER_FRAME_MAX).map(|_| entry("g".repeat(GROUP_ID_BYTES_MAX), 1)).collect());
        let mut d = Decoder::new(1 << 20);
        d.feed(&big.encode());
        assert_eq!(d.next_control(), Ok(Some(big)));
        // One entry too many, a group id too long, a negative offset: refused.
        for bad in [
            Control::Offsets((0..=OFFSETS_PER_FRAME_MAX).map(|_| entry("g".into(), 1)).collect()),
            Control::Offsets(vec![entry("g".repeat(GROUP_ID_BYTES_MAX + 1), 1)]),
            Control::Offsets(vec![entry("g".into(), -1)]),
        ] {
            let mut d = Decoder::new(1 << 20);
            d.feed(&bad.encode());
            assert_eq!(d.next_control(), Err(ProtocolError::Malformed("offsets")));
        }
        // A count claiming more entries than the bytes that came.
        let mut d = Decoder::new(100);
        d.feed(&[0, 0, 0, 5, OFFSETS, 0, 0, 0, 100]);
        assert_eq!(d.next_control(), Err(ProtocolError::Malformed("offsets")));
    }

    #[test]
    fn topic_configs_frames_are_bounded_and_carry_only_compaction_settings() {
        let settings = |topic: String, configs: Vec<(&str, String)>| TopicSettings {
            topic,
            configs: configs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        };
        let all = |topic: String| {
            settings(
                topic,
                MIRRORED_TOPIC_CONFIGS.iter().map(|k| (*k, "9".repeat(TOPIC_CONFIG_VALUE_BYTES_MAX))).collect(),
            )
        };
        // The largest frame the gateway makes fits the control stream's 1 MiB decoder.
        let big =
            Control::TopicConfigs((0..TOPIC_CONFIGS_PER_FRAME_MAX).map(|_| all("t".repeat(TOPIC_BYTES_MAX))).collect());
        let mut d = Decoder::new(1 << 20);
        d.feed(&big.encode());
        assert_eq!(d.next_control(), Ok(Some(big)));
        for bad in [
            // One topic too many.
            Control::TopicConfigs((0..=TOPIC_CONFIGS_PER_FRAME_MAX).map(|_| all("t".into())).collect()),
            // A topic name over Kafka's limit.
            Control::TopicConfigs(vec![all("t".repeat(TOPIC_BYTES_MAX + 1))]),
            // Retention is the centre's to choose, and other settings are not carried.
            Control::TopicConfigs(vec![settings("t".into(), vec![("retention.ms", "-1".into())])]),
            Control::TopicConfigs(vec![settings("t".into(), vec![("min.insync.replicas", "1".into())])]),
            // A value too long, a setting twice.
            Control::TopicConfigs(vec![settings(
                "t".into(),
                vec![("cleanup.policy", "c".repeat(TOPIC_CONFIG_VALUE_BYTES_MAX + 1))],
            )]),
            Control::TopicConfigs(vec![settings(
                "t".into(),
                vec![("cleanup.policy", "compact".into()), ("cleanup.policy", "delete".into())],
            )]),
        ] {
            let mut d = Decoder::new(1 << 20);
            d.feed(&bad.encode());
            assert_eq!(d.next_control(), Err(ProtocolError::Malformed("topic configs")), "{bad:?}");
        }
        // A count claiming more topics than the bytes that came, and more settings than exist.
        let mut d = Decoder::new(100);
        d.feed(&[0, 0, 0, 5, TOPIC_CONFIGS, 0, 0, 0, 100]);
        assert_eq!(d.next_control(), Err(ProtocolError::Malformed("topic configs")));
        let mut d = Decoder::new(100);
        d.feed(&[0, 0, 0, 9, TOPIC_CONFIGS, 0, 0, 0, 1, 0, 1, b't', 6]);
        assert_eq!(d.next_control(), Err(ProtocolError::Malformed("topic configs")));
    }

    #[test]
    fn topic_overrides_frames_are_bounded_and_checked_before_allocation() {
        let settings = |topic: String, configs: Vec<(String, String)>| TopicSettings { topic, configs };
        let widest = |topic: String| {
            let configs = (0..TOPIC_OVERRIDE_KEYS_MAX)
                .map(|i| {
                    let mut k = format!("k{i}.");
                    k.push_str(&"n".repeat(TOPIC_OVERRIDE_NAME_BYTES_MAX - k.len()));
                    (k, "v".repeat(TOPIC_OVERRIDE_VALUE_BYTES_MAX))
                })
                .collect::<Vec<_>>();
            assert!(overrides_fit(&configs));
            settings(topic, configs)
        };
        // The largest frame a sender makes fits the control stream's 1 MiB decoder.
        let big = Control::TopicOverrides(
            (0..TOPIC_OVERRIDES_PER_FRAME_MAX).map(|_| widest("t".repeat(TOPIC_BYTES_MAX))).collect(),
        );
        let bytes = big.encode();
        assert!(bytes.len() < 600 << 10, "{} bytes", bytes.len());
        let mut d = Decoder::new(1 << 20);
        d.feed(&bytes);
        assert_eq!(d.next_control(), Ok(Some(big)));
        let one = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        for bad in [
            // One topic too many, a topic name empty or over Kafka's limit.
            Control::TopicOverrides((0..=TOPIC_OVERRIDES_PER_FRAME_MAX).map(|_| widest("t".into())).collect()),
            Control::TopicOverrides(vec![settings(String::new(), Vec::new())]),
            Control::TopicOverrides(vec![settings("t".repeat(TOPIC_BYTES_MAX + 1), Vec::new())]),
            // One setting too many, a name empty or too long, a value too long, a name twice.
            Control::TopicOverrides(vec![{
                let mut w = widest("t".into());
                w.configs.push(("one.more".into(), "1".into()));
                w
            }]),
            Control::TopicOverrides(vec![settings("t".into(), one("", "1"))]),
            Control::TopicOverrides(vec![settings(
                "t".into(),
                one(&"k".repeat(TOPIC_OVERRIDE_NAME_BYTES_MAX + 1), "1"),
            )]),
            Control::TopicOverrides(vec![settings(
                "t".into(),
                one("retention.ms", &"9".repeat(TOPIC_OVERRIDE_VALUE_BYTES_MAX + 1)),
            )]),
            Control::TopicOverrides(vec![settings(
                "t".into(),
                vec![("retention.ms".into(), "1".into()), ("retention.ms".into(), "2".into())],
            )]),
        ] {
            if let Control::TopicOverrides(list) = &bad {
                if list.len() == 1 && !list[0].topic.is_empty() && list[0].topic.len() <= TOPIC_BYTES_MAX {
                    assert!(!overrides_fit(&list[0].configs), "the sender's check agrees: {bad:?}");
                }
            }
            let mut d = Decoder::new(1 << 20);
            d.feed(&bad.encode());
            assert_eq!(d.next_control(), Err(ProtocolError::Malformed("topic overrides")), "{bad:?}");
        }
        // Counts claiming more than the bytes that came: a million topics in 4 bytes, and 30
        // settings of a topic in 2 bytes; nothing is allocated for them.
        let mut d = Decoder::new(100);
        d.feed(&[0, 0, 0, 5, TOPIC_OVERRIDES, 0, 0x0f, 0x42, 0x40]);
        assert_eq!(d.next_control(), Err(ProtocolError::Malformed("topic overrides")));
        let mut d = Decoder::new(100);
        d.feed(&[0, 0, 0, 11, TOPIC_OVERRIDES, 0, 0, 0, 1, 0, 1, b't', 30, 0, 0]);
        assert_eq!(d.next_control(), Err(ProtocolError::Malformed("topic overrides")));
    }

    #[test]
    fn version_2_and_3_frames_are_marked_as_such() {
        for c in controls() {
            let want = match c {
                Control::Offsets(_) | Control::TopicConfigs(_) => 2,
                Control::RestoreHello { .. }
                | Control::RestoreTopics(_)
                | Control::RestoreOffsets(_)
                | Control::RestoreListed
                | Control::RestoreStart { .. }
                | Control::RestoreGroups(_) => 3,
                Control::TopicOverrides(_) => 4,
                _ => 1,
            };
            assert_eq!(c.version(), want, "{c:?}");
        }
        assert_eq!(alpn_version(Some(ALPN_V4)), 4);
        assert_eq!(ALPNS[0], ALPN_V4, "the newest version offered first");
        assert_eq!(alpn_version(Some(ALPN_V3)), 3);
        assert_eq!(alpn_version(Some(ALPN_V2)), 2);
        assert_eq!(alpn_version(Some(ALPN)), 1);
        assert_eq!(alpn_version(None), 1);
    }

    #[test]
    fn restore_data_frames_round_trip_and_the_batch_is_not_copied_into_the_header() {
        let batch = Bytes::from_static(b"an uncompressed record batch");
        let header = Data::Restored { remote_next: 4242, batch: batch.clone() }.encode_header();
        assert_eq!(header.len(), 13);
        let mut d = Decoder::new(1 << 20);
        d.feed(&header);
        d.feed(&batch);
        d.feed(&Data::RestoreEnd { remote_next: 5000 }.encode_header());
        assert_eq!(d.next_data(), Ok(Some(Data::Restored { remote_next: 4242, batch })));
        assert_eq!(d.next_data(), Ok(Some(Data::RestoreEnd { remote_next: 5000 })));
        // A negative remote offset is refused.
        for (frame, what) in [
            (Data::Restored { remote_next: -1, batch: Bytes::new() }, "restored"),
            (Data::RestoreEnd { remote_next: -1 }, "restore end"),
        ] {
            let mut d = Decoder::new(1 << 20);
            d.feed(&frame.encode_header());
            assert_eq!(d.next_data(), Err(ProtocolError::Malformed(what)));
        }
        // A restore data frame on the control stream is refused, and the other way round.
        let mut d = Decoder::new(1 << 20);
        d.feed(&Data::RestoreEnd { remote_next: 1 }.encode_header());
        assert_eq!(d.next_control(), Err(ProtocolError::Unexpected("data")));
        let mut d = Decoder::new(1 << 20);
        d.feed(&Control::RestoreListed.encode());
        assert_eq!(d.next_data(), Err(ProtocolError::Unexpected("control")));
    }

    #[test]
    fn restore_listings_are_bounded_and_checked() {
        let topic = |extents: Vec<(i64, i64)>| {
            let reported = vec![7; extents.len()];
            RestoreTopic { topic: "t".into(), configs: Vec::new(), extents, reported }
        };
        // The largest listing the cloud sends fits the control stream's 1 MiB decoder.
        let big = Control::RestoreTopics(vec![topic(vec![(0, 1); RESTORE_PARTITIONS_PER_FRAME_MAX])]);
        let mut d = Decoder::new(1 << 20);
        d.feed(&big.encode());
        assert_eq!(d.next_control(), Ok(Some(big)));
        for bad in [
            Control::RestoreTopics((0..=RESTORE_TOPICS_PER_FRAME_MAX).map(|_| topic(vec![(0, 1)])).collect()),
            Control::RestoreTopics(vec![topic(Vec::new())]),
            Control::RestoreTopics(vec![topic(vec![(5, 4)])]),
            Control::RestoreTopics(vec![topic(vec![(-1, 4)])]),
            Control::RestoreTopics(vec![RestoreTopic {
                topic: "t".into(),
                configs: vec![("retention.ms".into(), "1".into())],
                extents: vec![(0, 1)],
                reported: vec![0],
            }]),
            // A reported high watermark is an edge offset: never negative.
            Control::RestoreTopics(vec![RestoreTopic {
                topic: "t".into(),
                configs: Vec::new(),
                extents: vec![(0, 1)],
                reported: vec![-1],
            }]),
        ] {
            let mut d = Decoder::new(1 << 20);
            d.feed(&bad.encode());
            assert_eq!(d.next_control(), Err(ProtocolError::Malformed("restore topics")), "{bad:?}");
        }
        for bad in [
            Control::RestoreStart { topic: "t".into(), partition: -1, from: RestoreFrom::Offset(0) },
            Control::RestoreStart { topic: "t".into(), partition: 0, from: RestoreFrom::Offset(-5) },
            Control::RestoreStart { topic: "t".into(), partition: 0, from: RestoreFrom::TailBytes(-5) },
        ] {
            let mut d = Decoder::new(1 << 20);
            d.feed(&bad.encode());
            assert_eq!(d.next_control(), Err(ProtocolError::Malformed("restore start")), "{bad:?}");
        }
        // A partition count claiming more extents than the bytes that came.
        let mut d = Decoder::new(100);
        d.feed(&[0, 0, 0, 12, RESTORE_TOPICS, 0, 0, 0, 1, 0, 1, b't', 0, 0, 0, 100]);
        assert_eq!(d.next_control(), Err(ProtocolError::Malformed("restore topics")));
        // One partition whose extent came without its reported high watermark (16 of 24 bytes).
        let whole = Control::RestoreTopics(vec![topic(vec![(0, 1)])]).encode();
        let mut cut = whole[..whole.len() - 8].to_vec();
        let len = (cut.len() - 4) as u32;
        cut[..4].copy_from_slice(&len.to_be_bytes());
        let mut d = Decoder::new(100);
        d.feed(&cut);
        assert_eq!(d.next_control(), Err(ProtocolError::Malformed("restore topics")));
    }

    #[test]
    fn bad_frames_are_refused_before_buffering() {
        let mut d = Decoder::new(100);
        d.feed(&1000u32.to_be_bytes());
        assert_eq!(d.next_control(), Err(ProtocolError::TooLarge { size: 1000, max: 100 }));
        let mut d = Decoder::new(100);
        d.feed(&[0, 0, 0, 1, 99]);
        assert_eq!(d.next_control(), Err(ProtocolError::UnknownType(99)));
        let mut d = Decoder::new(100);
        // A partitions frame claiming a million entries in 4 bytes.
        d.feed(&[0, 0, 0, 5, PARTITIONS, 0, 0x0f, 0x42, 0x40]);
        assert_eq!(d.next_control(), Err(ProtocolError::Malformed("partitions")));
        let mut d = Decoder::new(100);
        d.feed(&Control::Hello { site: "x".into() }.encode());
        assert_eq!(d.next_data(), Err(ProtocolError::Unexpected("control")));
        // Every truncation of a valid frame is incomplete, not an error.
        for c in controls() {
            let bytes = c.encode();
            for cut in 0..bytes.len() {
                let mut d = Decoder::new(1 << 20);
                d.feed(&bytes[..cut]);
                assert_eq!(d.next_control(), Ok(None));
            }
        }
    }
}
