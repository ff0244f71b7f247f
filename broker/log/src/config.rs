//! Configuration of the log store and of topics: every limit has a name, a default and a
//! validation rule, and a bad value is reported with the key that holds it.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// A configuration value that cannot be used, with the dotted key that holds it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

/// Checks that `value` lies in `[lo, hi]`, naming `key` if not.
pub fn check_range(key: &str, value: u64, lo: u64, hi: u64) -> Result<(), ConfigError> {
    if value < lo || value > hi {
        Err(ConfigError::new(key, format!("must be between {lo} and {hi} (got {value})")))
    } else {
        Ok(())
    }
}

impl ConfigError {
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { key: key.into(), reason: reason.into() }
    }
}

/// Compression codec of batches the store builds itself (records appended one by one).
/// Batches that clients send ready-made are stored as sent, in their own codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    None,
    Gzip,
    Snappy,
    #[default]
    Lz4,
    Zstd,
}

impl Codec {
    /// The codec id in the low three bits of a RecordBatch's attributes.
    pub fn attribute_bits(self) -> i16 {
        match self {
            Codec::None => 0,
            Codec::Gzip => 1,
            Codec::Snappy => 2,
            Codec::Lz4 => 3,
            Codec::Zstd => 4,
        }
    }

    pub fn from_attribute_bits(bits: i16) -> Option<Self> {
        Some(match bits & 0x07 {
            0 => Codec::None,
            1 => Codec::Gzip,
            2 => Codec::Snappy,
            3 => Codec::Lz4,
            4 => Codec::Zstd,
            _ => return None,
        })
    }

    /// Kafka's `compression.type` spelling.
    pub fn kafka_name(self) -> &'static str {
        match self {
            Codec::None => "uncompressed",
            Codec::Gzip => "gzip",
            Codec::Snappy => "snappy",
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "none" | "uncompressed" => Codec::None,
            "gzip" => Codec::Gzip,
            "snappy" => Codec::Snappy,
            "lz4" => Codec::Lz4,
            "zstd" => Codec::Zstd,
            _ => return None,
        })
    }
}

/// When an append to a topic is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Acknowledged after the commit that holds it was fsynced: survives a power cut.
    #[default]
    Fsync,
    /// Acknowledged after a commit without fsync. A process crash or a power cut loses the
    /// acknowledged appends since the last durable commit (at most about twice
    /// `storage.relaxed_flush_interval_ms` of them; in each partition the newest), and the
    /// key-value writes committed with them. Their offsets are never handed out again: the next
    /// open covers them with a gap batch that consumers skip.
    Relaxed,
}

impl Durability {
    pub fn name(self) -> &'static str {
        match self {
            Durability::Fsync => "fsync",
            Durability::Relaxed => "relaxed",
        }
    }
}

/// Which timestamp a topic's records carry (Kafka's `message.timestamp.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum TimestampKind {
    #[default]
    CreateTime,
    LogAppendTime,
}

/// Kafka's `cleanup.policy`: what removes a topic's old records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CleanupPolicy {
    /// `delete`: `retention.ms` and `retention.bytes` delete the oldest batches.
    #[default]
    Delete,
    /// `compact`: the latest record per key is kept (compaction, see `writer/compaction.rs`);
    /// `retention.ms`/`retention.bytes` do not apply (the global disk budget still does).
    Compact,
    /// `compact,delete` (either order): both.
    CompactDelete,
}

impl CleanupPolicy {
    pub fn compacts(self) -> bool {
        matches!(self, CleanupPolicy::Compact | CleanupPolicy::CompactDelete)
    }
    pub fn deletes(self) -> bool {
        matches!(self, CleanupPolicy::Delete | CleanupPolicy::CompactDelete)
    }
    /// Kafka's spelling (a list).
    pub fn kafka_name(self) -> &'static str {
        match self {
            CleanupPolicy::Delete => "delete",
            CleanupPolicy::Compact => "compact",
            CleanupPolicy::CompactDelete => "compact,delete",
        }
    }
    /// Kafka's list syntax: `delete`, `compact`, or both separated by a comma in either order
    /// (spaces around items allowed, an item repeated is the same item).
    pub fn parse(s: &str) -> Option<Self> {
        let (mut compact, mut delete) = (false, false);
        for item in s.split(',').map(str::trim) {
            match item {
                "compact" => compact = true,
                "delete" => delete = true,
                _ => return None,
            }
        }
        Some(match (compact, delete) {
            (true, true) => CleanupPolicy::CompactDelete,
            (true, false) => CleanupPolicy::Compact,
            _ => CleanupPolicy::Delete,
        })
    }
}

/// Kafka's defaults of the compaction and segment settings.
pub const DEFAULT_DELETE_RETENTION_MS: u64 = 86_400_000;
pub const DEFAULT_SEGMENT_BYTES: u64 = 1 << 30;
pub const DEFAULT_SEGMENT_MS: u64 = 604_800_000;
pub const DEFAULT_SEGMENT_INDEX_BYTES: u64 = 10 * 1024 * 1024;
/// `min.cleanable.dirty.ratio` is held in millionths (so the config stays `Eq`).
const RATIO_SCALE: f64 = 1_000_000.0;

/// Per-topic settings, named as Kafka names them where Kafka has the setting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicConfig {
    /// Codec of batches the store builds (`compression.type`).
    pub compression: Codec,
    /// `fsync` (default) or `relaxed`.
    pub durability: Durability,
    /// Per-partition size limit (`retention.bytes`); `None` = only the global budget applies.
    pub retention_bytes: Option<u64>,
    /// Age limit (`retention.ms`) against each batch's max timestamp; `None` = no age limit.
    pub retention_ms: Option<u64>,
    /// `message.timestamp.type`.
    pub timestamp_type: TimestampKind,
    /// `cleanup.policy`.
    pub cleanup_policy: CleanupPolicy,
    /// `delete.retention.ms`: how long a tombstone (a record with a null value) is kept after
    /// compaction first passed over it, so consumers reading from the start see the deletion.
    pub delete_retention_ms: u64,
    /// `min.compaction.lag.ms`: a batch appended less than this ago is not compacted.
    pub min_compaction_lag_ms: u64,
    /// `max.compaction.lag.ms`: a partition whose oldest uncompacted batch is older than this
    /// is compacted whatever its dirty ratio.
    pub max_compaction_lag_ms: u64,
    /// `min.cleanable.dirty.ratio` in millionths: a partition is compacted once this share of its
    /// bytes was appended since the last compaction.
    pub min_cleanable_dirty_ratio_ppm: u32,
    /// `segment.bytes`, `segment.ms`, `segment.jitter.ms`, `segment.index.bytes`: accepted and
    /// shown because Kafka's tools send them at creation, but a redb log has no segment files:
    /// nothing is rolled, and the *active segment* that compaction leaves alone is defined
    /// without them (a partition's newest batch plus what `min.compaction.lag.ms` protects).
    pub segment_bytes: u64,
    pub segment_ms: u64,
    pub segment_jitter_ms: u64,
    pub segment_index_bytes: u64,
    /// The settings a client gave this topic itself (at creation or by an alter), one bit per
    /// entry of [`TopicConfig::KEYS`], even where the value equals the default: Kafka lists
    /// such a setting as the topic's own (DYNAMIC_TOPIC_CONFIG) until it is deleted. Not a
    /// gateway.toml key.
    #[serde(skip)]
    pub explicit_keys: u16,
}

/// What a topic gets that a front end creates on its own (auto-creation on a produce, metadata
/// request or MQTT publish; the gateway fills it from `[topic_defaults]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    pub partitions: u32,
    pub config: TopicConfig,
}

impl Default for TopicConfig {
    fn default() -> Self {
        Self {
            compression: Codec::Lz4,
            durability: Durability::Fsync,
            retention_bytes: None,
            retention_ms: Some(7 * 24 * 3600 * 1000),
            timestamp_type: TimestampKind::CreateTime,
            cleanup_policy: CleanupPolicy::Delete,
            delete_retention_ms: DEFAULT_DELETE_RETENTION_MS,
            min_compaction_lag_ms: 0,
            max_compaction_lag_ms: i64::MAX as u64,
            min_cleanable_dirty_ratio_ppm: 500_000,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            segment_ms: DEFAULT_SEGMENT_MS,
            segment_jitter_ms: 0,
            segment_index_bytes: DEFAULT_SEGMENT_INDEX_BYTES,
            explicit_keys: 0,
        }
    }
}

const _: () = assert!(TopicConfig::KEYS.len() <= 16, "explicit_keys has a bit per key");

/// The stored line that names a topic's explicitly set keys (`KEY=VALUE` lines name no key
/// starting with `#`).
const EXPLICIT_LINE: &str = "#explicit=";

impl TopicConfig {
    /// The Kafka config names this store supports, in the order they are described.
    pub const KEYS: [&'static str; 14] = [
        "compression.type",
        "durability",
        "retention.bytes",
        "retention.ms",
        "message.timestamp.type",
        "cleanup.policy",
        "delete.retention.ms",
        "min.compaction.lag.ms",
        "max.compaction.lag.ms",
        "min.cleanable.dirty.ratio",
        "segment.bytes",
        "segment.ms",
        "segment.jitter.ms",
        "segment.index.bytes",
    ];

    /// `retention.bytes` as it applies: only under `cleanup.policy` delete.
    pub fn retention_bytes_limit(&self) -> Option<u64> {
        self.retention_bytes.filter(|_| self.cleanup_policy.deletes())
    }

    /// Whether compaction keeps only the latest record per key (and keyless records are refused).
    pub fn compacted(&self) -> bool {
        self.cleanup_policy.compacts()
    }

    /// Sets one setting by its Kafka name as a client's own setting of the topic; `None`
    /// restores the built-in default and forgets that it was set.
    pub fn set(&mut self, key: &str, value: Option<&str>) -> Result<(), ConfigError> {
        self.set_value(key, value)?;
        self.mark_explicit(key, value.is_some());
        Ok(())
    }

    /// Drops the topic's own setting of `key`: the value becomes `defaults`' (the gateway's
    /// `[topic_defaults]`), as Kafka's DELETE of a topic config falls back to the broker's.
    pub fn reset_to(&mut self, key: &str, defaults: &TopicConfig) -> Result<(), ConfigError> {
        self.set_value(key, defaults.get(key).as_deref())?;
        self.mark_explicit(key, false);
        Ok(())
    }

    /// Whether `key` is this topic's own setting rather than the gateway's default: set by a
    /// client (even to the default's value), or different from `defaults` (topics created
    /// before explicit settings were recorded, and topics the gateway itself created with
    /// other values, such as `mqtt.retained`).
    pub fn is_own(&self, key: &str, defaults: &TopicConfig) -> bool {
        Self::key_bit(key).is_some_and(|bit| self.explicit_keys & bit != 0) || self.get(key) != defaults.get(key)
    }

    /// The topic's own settings ([`TopicConfig::is_own`]) as Kafka names and spells them, in
    /// [`TopicConfig::KEYS`] order: what a topic needs on top of `defaults` to be itself.
    pub fn overrides(&self, defaults: &TopicConfig) -> Vec<(&'static str, String)> {
        Self::KEYS.into_iter().filter(|k| self.is_own(k, defaults)).filter_map(|k| Some((k, self.get(k)?))).collect()
    }

    fn key_bit(key: &str) -> Option<u16> {
        Self::KEYS.iter().position(|k| *k == key).map(|i| 1u16 << i)
    }

    fn mark_explicit(&mut self, key: &str, on: bool) {
        if let Some(bit) = Self::key_bit(key) {
            if on {
                self.explicit_keys |= bit;
            } else {
                self.explicit_keys &= !bit;
            }
        }
    }

    fn set_value(&mut self, key: &str, value: Option<&str>) -> Result<(), ConfigError> {
        let default = TopicConfig::default();
        let bad = |reason: &str| ConfigError::new(key, format!("{reason} (got {value:?})"));
        match (key, value) {
            ("compression.type", None) => self.compression = default.compression,
            ("compression.type", Some(v)) => {
                self.compression = match v {
                    // Client batches are always stored as sent; "producer" means the store's
                    // own batches use the default codec.
                    "producer" => default.compression,
                    other => Codec::parse(other)
                        .ok_or_else(|| bad("expected uncompressed, gzip, snappy, lz4, zstd or producer"))?,
                }
            }
            ("durability", None) => self.durability = default.durability,
            ("durability", Some("fsync")) => self.durability = Durability::Fsync,
            ("durability", Some("relaxed")) => self.durability = Durability::Relaxed,
            ("durability", Some(_)) => return Err(bad("expected fsync or relaxed")),
            ("retention.bytes", None) => self.retention_bytes = default.retention_bytes,
            ("retention.bytes", Some(v)) => {
                let n: i64 = v.trim().parse().map_err(|_| bad("expected an integer"))?;
                self.retention_bytes = match n {
                    -1 => None,
                    n if n > 0 => Some(n as u64),
                    _ => return Err(bad("expected -1 (unlimited) or a positive byte count")),
                };
            }
            ("retention.ms", None) => self.retention_ms = default.retention_ms,
            ("retention.ms", Some(v)) => {
                let n: i64 = v.trim().parse().map_err(|_| bad("expected an integer"))?;
                self.retention_ms = match n {
                    -1 => None,
                    n if n > 0 => Some(n as u64),
                    _ => return Err(bad("expected -1 (unlimited) or a positive millisecond count")),
                };
            }
            ("message.timestamp.type", None) => self.timestamp_type = default.timestamp_type,
            ("message.timestamp.type", Some("CreateTime")) => self.timestamp_type = TimestampKind::CreateTime,
            ("message.timestamp.type", Some("LogAppendTime")) => self.timestamp_type = TimestampKind::LogAppendTime,
            ("message.timestamp.type", Some(_)) => return Err(bad("expected CreateTime or LogAppendTime")),
            ("cleanup.policy", None) => self.cleanup_policy = default.cleanup_policy,
            ("cleanup.policy", Some(v)) => {
                self.cleanup_policy =
                    CleanupPolicy::parse(v).ok_or_else(|| bad("expected delete, compact or compact,delete"))?
            }
            ("min.cleanable.dirty.ratio", None) => {
                self.min_cleanable_dirty_ratio_ppm = default.min_cleanable_dirty_ratio_ppm
            }
            ("min.cleanable.dirty.ratio", Some(v)) => {
                // Kafka: a double in [0, 1].
                let x: f64 = v.trim().parse().map_err(|_| bad("expected a number between 0 and 1"))?;
                if !(0.0..=1.0).contains(&x) {
                    return Err(bad("expected a number between 0 and 1"));
                }
                self.min_cleanable_dirty_ratio_ppm = (x * RATIO_SCALE).round() as u32;
            }
            (k, v) if Self::long_field(k).is_some() => {
                // Kafka's ranges: segment.bytes at least 14 (a record's overhead), segment.ms
                // and segment.index.bytes at least 1 and 4, the others at least 0.
                let min = match k {
                    "segment.bytes" => 14,
                    "segment.ms" => 1,
                    "segment.index.bytes" => 4,
                    _ => 0,
                };
                let n = match v {
                    None => Self::long_field_value(&default, k),
                    Some(v) => {
                        let n: i64 = v.trim().parse().map_err(|_| bad("expected an integer"))?;
                        if n < min {
                            return Err(bad(&format!("expected an integer of at least {min}")));
                        }
                        if k == "segment.bytes" || k == "segment.index.bytes" {
                            // Kafka declares these as int.
                            i32::try_from(n).map_err(|_| bad("expected an integer up to 2147483647"))?;
                        }
                        n as u64
                    }
                };
                if let Some(field) = self.long_field_mut(k) {
                    *field = n;
                }
            }
            _ => return Err(ConfigError::new(key, "unknown or unsupported topic configuration")),
        }
        Ok(())
    }

    /// Current value of a setting by its Kafka name.
    pub fn get(&self, key: &str) -> Option<String> {
        Some(match key {
            "compression.type" => self.compression.kafka_name().to_string(),
            "durability" => self.durability.name().to_string(),
            "retention.bytes" => self.retention_bytes.map_or(-1, |v| v as i64).to_string(),
            "retention.ms" => self.retention_ms.map_or(-1, |v| v as i64).to_string(),
            "message.timestamp.type" => match self.timestamp_type {
                TimestampKind::CreateTime => "CreateTime".to_string(),
                TimestampKind::LogAppendTime => "LogAppendTime".to_string(),
            },
            "cleanup.policy" => self.cleanup_policy.kafka_name().to_string(),
            "min.cleanable.dirty.ratio" => (f64::from(self.min_cleanable_dirty_ratio_ppm) / RATIO_SCALE).to_string(),
            k => Self::long_field_value(self, Self::long_field(k)?).to_string(),
        })
    }

    /// The plain integer settings (`delete.retention.ms`, the compaction lags, `segment.*`).
    fn long_field(key: &str) -> Option<&'static str> {
        const LONGS: [&str; 7] = [
            "delete.retention.ms",
            "min.compaction.lag.ms",
            "max.compaction.lag.ms",
            "segment.bytes",
            "segment.ms",
            "segment.jitter.ms",
            "segment.index.bytes",
        ];
        LONGS.into_iter().find(|k| *k == key)
    }

    fn long_field_value(cfg: &TopicConfig, key: &str) -> u64 {
        match key {
            "delete.retention.ms" => cfg.delete_retention_ms,
            "min.compaction.lag.ms" => cfg.min_compaction_lag_ms,
            "max.compaction.lag.ms" => cfg.max_compaction_lag_ms,
            "segment.bytes" => cfg.segment_bytes,
            "segment.ms" => cfg.segment_ms,
            "segment.jitter.ms" => cfg.segment_jitter_ms,
            _ => cfg.segment_index_bytes,
        }
    }

    fn long_field_mut(&mut self, key: &str) -> Option<&mut u64> {
        Some(match key {
            "delete.retention.ms" => &mut self.delete_retention_ms,
            "min.compaction.lag.ms" => &mut self.min_compaction_lag_ms,
            "max.compaction.lag.ms" => &mut self.max_compaction_lag_ms,
            "segment.bytes" => &mut self.segment_bytes,
            "segment.ms" => &mut self.segment_ms,
            "segment.jitter.ms" => &mut self.segment_jitter_ms,
            "segment.index.bytes" => &mut self.segment_index_bytes,
            _ => return None,
        })
    }

    /// `key=value` lines, the format topic settings are stored in, then `#explicit=` with the
    /// keys a client set (absent in what older versions stored: then only values that differ
    /// from the defaults count as the topic's own).
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for key in Self::KEYS {
            if let Some(v) = self.get(key) {
                out.push_str(key);
                out.push('=');
                out.push_str(&v);
                out.push('\n');
            }
        }
        let explicit: Vec<&str> =
            Self::KEYS.into_iter().filter(|k| Self::key_bit(k).is_some_and(|b| self.explicit_keys & b != 0)).collect();
        if !explicit.is_empty() {
            out.push_str(EXPLICIT_LINE);
            out.push_str(&explicit.join(","));
            out.push('\n');
        }
        out
    }

    pub fn from_text(text: &str) -> Result<Self, ConfigError> {
        let mut cfg = TopicConfig::default();
        let mut explicit = 0u16;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Some(keys) = line.strip_prefix(EXPLICIT_LINE) {
                for k in keys.split(',').filter(|k| !k.is_empty()) {
                    explicit |= Self::key_bit(k)
                        .ok_or_else(|| ConfigError::new("topic config", format!("unknown explicit key {k:?}")))?;
                }
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| ConfigError::new("topic config", format!("malformed line {line:?}")))?;
            cfg.set_value(k, Some(v))?;
        }
        cfg.explicit_keys = explicit;
        Ok(cfg)
    }
}

/// The log store's settings (`[storage]` in the gateway's TOML).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Directory holding `tributary.redb`; created if missing.
    pub data_dir: PathBuf,
    /// redb page cache. redb's own default is 1 GiB, far too much for a gateway.
    pub cache_size_bytes: u64,
    /// The disk budget: retention keeps the database file's real disk use within this plus a
    /// slack of `max(4 MiB, 5%)` (copy-on-write pages, b-tree branches, file growth). Key-value
    /// state (sessions, committed offsets, retained messages) counts against it with the log.
    pub max_bytes: u64,
    /// Retention starts deleting when the stored footprint passes this share of `max_bytes`...
    pub retention_high_watermark_percent: u8,
    /// ...and deletes the oldest batches until the footprint is at this share (hysteresis).
    pub retention_low_watermark_percent: u8,
    /// At most this much is deleted by retention in one commit, so a large clean-up cannot stall
    /// appends; the rest follows in the next commits.
    pub retention_delete_bytes_per_commit_max: u64,
    /// How often age-based retention (`retention.ms`) is checked.
    pub retention_check_interval_ms: u64,
    /// Upper size of a batch the store builds from single records; chosen so that a stored batch
    /// fills a 16 KiB redb page instead of spilling into the next power-of-two page size.
    pub batch_size_bytes_max: u32,
    /// Largest single append (a client's batch, or one record), checked before it is queued.
    pub append_size_bytes_max: u32,
    /// A compressed batch is refused if its records decompress to more than this.
    pub decompressed_size_bytes_max: u64,
    /// Appends waiting for the writer; a full queue makes appenders wait (backpressure).
    pub write_queue_ops_max: u32,
    /// One group commit takes at most this many bytes of appends.
    pub commit_size_bytes_max: u64,
    /// Appends and key-value inserts (sessions, offsets, retained messages) are refused with a
    /// disk-full error while the data volume has less free space; removals still go through.
    pub disk_free_bytes_min: u64,
    /// How long acknowledged appends to `relaxed` topics may stay unsynced: the next write round
    /// after this long commits durably (a tick comes at least this often, so at most about
    /// twice this is at risk).
    pub relaxed_flush_interval_ms: u64,
    /// redb quick-repair: instant recovery after a crash, but every commit also writes the
    /// allocator state (about 64 KiB per GiB of file). Off by default: SD cards wear.
    pub quick_repair: bool,
    /// Limits on topics and partitions, so metadata held in memory is bounded.
    pub topics_max: u32,
    pub partitions_per_topic_max: u32,
    pub partitions_total_max: u32,
    /// Idempotent producers whose last sequence numbers are remembered per partition (for
    /// deduplicating retries); the least recently used is forgotten first.
    pub producer_states_max: u32,
    /// Threads that run blocking work: store reads for the front ends' fetches and deliveries, password
    /// hashing, metrics scans (the async runtime's blocking pool; an idle one exits after 10 s).
    /// Each thread that allocated keeps a malloc arena, so this also bounds that memory; work
    /// beyond it waits in the pool's queue.
    pub blocking_threads_max: u32,
    /// The newest committed batches of every partition kept in memory (as stored, compressed),
    /// so readers at the tail (MQTT deliveries, Kafka consumers, the mirror) get them without a
    /// database read or a blocking-pool thread. Shared by all partitions, the oldest batch
    /// leaves first; 0 turns the cache off.
    pub tail_cache_bytes_max: u64,
    /// Compaction of `cleanup.policy=compact` topics reads (and rewrites) at most this many
    /// bytes of batches per commit, so it never holds appends up for long; a pass continues in
    /// the next commits (Kafka's cleaner I/O throttle, per commit).
    pub compaction_bytes_per_commit_max: u64,
    /// Memory for compaction's map of keys to their latest offsets (Kafka's
    /// `log.cleaner.dedupe.buffer.size`); a partition with more keys is compacted in several
    /// passes.
    pub compaction_memory_bytes_max: u64,
    /// When a small write (under a quarter of this) reaches past the part of the database file
    /// already written, zeros are written this far past it, so the next commits overwrite
    /// allocated blocks and their fsync need not also write the file's metadata (see
    /// `zero_ahead.rs`; commits of 16 KiB Kafka batches 12-21% shorter on this project's
    /// ext4 machine). 0 turns it off. At most
    /// 4 MiB, within the disk budget's slack.
    pub zero_ahead_bytes: u64,
    /// Size of the commit journal (`tributary.journal` beside the database, written full of
    /// zeros at the first start, so it takes this much disk besides `max_bytes`): each durable
    /// commit's pages are appended there and synced with one contiguous write, the database
    /// file gets them without a sync and is synced in the background once half the journal
    /// is used (see `journal.rs`; measured in the MQTT fleet: the commit's `fdatasync` p50
    /// 195-254 -> 164-177 us, the device's bytes per commit unchanged).
    /// Commits larger than a quarter of it sync the database file instead. 0 turns it off
    /// (each commit syncs the database file); 1 MiB to 4 GiB.
    pub journal_bytes: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./tributary-data"),
            cache_size_bytes: 8 * MIB,
            max_bytes: GIB,
            retention_high_watermark_percent: 90,
            retention_low_watermark_percent: 80,
            retention_delete_bytes_per_commit_max: 16 * MIB,
            retention_check_interval_ms: 10_000,
            batch_size_bytes_max: crate::tables::DEFAULT_BATCH_SIZE_BYTES_MAX,
            append_size_bytes_max: MIB as u32,
            decompressed_size_bytes_max: 16 * MIB,
            write_queue_ops_max: 4096,
            commit_size_bytes_max: 8 * MIB,
            disk_free_bytes_min: 64 * MIB,
            relaxed_flush_interval_ms: 1000,
            quick_repair: false,
            topics_max: 1000,
            partitions_per_topic_max: 256,
            partitions_total_max: 4096,
            producer_states_max: 4096,
            blocking_threads_max: 8,
            tail_cache_bytes_max: MIB,
            compaction_bytes_per_commit_max: 4 * MIB,
            compaction_memory_bytes_max: 8 * MIB,
            zero_ahead_bytes: 256 * KIB,
            journal_bytes: 32 * MIB,
        }
    }
}

impl StorageConfig {
    /// Checks every value; `prefix` is the TOML table the keys live in (e.g. `storage`).
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{prefix}.{k}");
        let range = |k: &str, v: u64, lo: u64, hi: u64| check_range(&key(k), v, lo, hi);
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::new(key("data_dir"), "must not be empty"));
        }
        range("cache_size_bytes", self.cache_size_bytes, MIB, 64 * GIB)?;
        range("max_bytes", self.max_bytes, 16 * MIB, 1 << 50)?;
        range("retention_high_watermark_percent", self.retention_high_watermark_percent.into(), 10, 99)?;
        range(
            "retention_low_watermark_percent",
            self.retention_low_watermark_percent.into(),
            5,
            u64::from(self.retention_high_watermark_percent).saturating_sub(1),
        )?;
        range("retention_delete_bytes_per_commit_max", self.retention_delete_bytes_per_commit_max, MIB, 4 * GIB)?;
        range("retention_check_interval_ms", self.retention_check_interval_ms, 10, 3_600_000)?;
        range("batch_size_bytes_max", self.batch_size_bytes_max.into(), 1024, MIB)?;
        range("append_size_bytes_max", self.append_size_bytes_max.into(), 1024, 64 * MIB)?;
        range("decompressed_size_bytes_max", self.decompressed_size_bytes_max, self.append_size_bytes_max.into(), GIB)?;
        range("write_queue_ops_max", self.write_queue_ops_max.into(), 1, 1 << 20)?;
        range("commit_size_bytes_max", self.commit_size_bytes_max, self.append_size_bytes_max.into(), GIB)?;
        range("disk_free_bytes_min", self.disk_free_bytes_min, 0, 1 << 50)?;
        range("relaxed_flush_interval_ms", self.relaxed_flush_interval_ms, 1, 3_600_000)?;
        range("topics_max", self.topics_max.into(), 1, 1_000_000)?;
        range("partitions_per_topic_max", self.partitions_per_topic_max.into(), 1, 100_000)?;
        range("partitions_total_max", self.partitions_total_max.into(), 1, 1_000_000)?;
        range("producer_states_max", self.producer_states_max.into(), 1, 10_000_000)?;
        range("blocking_threads_max", self.blocking_threads_max.into(), 1, 512)?;
        range("tail_cache_bytes_max", self.tail_cache_bytes_max, 0, GIB)?;
        range("compaction_bytes_per_commit_max", self.compaction_bytes_per_commit_max, 4 * KIB, 4 * GIB)?;
        range("compaction_memory_bytes_max", self.compaction_memory_bytes_max, 4 * KIB, 16 * GIB)?;
        if self.zero_ahead_bytes != 0 {
            range("zero_ahead_bytes", self.zero_ahead_bytes, 64 * KIB, 4 * MIB)?;
        }
        if self.journal_bytes != 0 {
            range("journal_bytes", self.journal_bytes, crate::journal::RING_BYTES_MIN, 4 * GIB)?;
        }
        Ok(())
    }

    /// Footprint at which retention starts deleting.
    pub fn retention_high_bytes(&self) -> u64 {
        self.max_bytes / 100 * u64::from(self.retention_high_watermark_percent)
    }

    /// Footprint retention deletes down to.
    pub fn retention_low_bytes(&self) -> u64 {
        self.max_bytes / 100 * u64::from(self.retention_low_watermark_percent)
    }

    /// The documented tolerance of real disk use over `max_bytes`.
    pub fn disk_slack_bytes(&self) -> u64 {
        (self.max_bytes / 20).max(4 * MIB)
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kafka_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        StorageConfig::default().validate("storage").expect("defaults are valid");
    }

    #[test]
    fn bad_value_names_its_key() {
        let cfg = StorageConfig { cache_size_bytes: 5, ..StorageConfig::default() };
        let err = cfg.validate("storage").expect_err("too small");
        assert_eq!(err.key, "storage.cache_size_bytes");
        let cfg = StorageConfig { retention_low_watermark_percent: 95, ..StorageConfig::default() };
        assert_eq!(cfg.validate("storage").expect_err("low > high").key, "storage.retention_low_watermark_percent");
    }

    #[test]
    fn topic_config_round_trips_through_text() {
        let mut cfg = TopicConfig::default();
        cfg.set("compression.type", Some("zstd")).expect("valid");
        cfg.set("retention.bytes", Some("1048576")).expect("valid");
        cfg.set("retention.ms", Some("-1")).expect("valid");
        cfg.set("durability", Some("relaxed")).expect("valid");
        cfg.set("message.timestamp.type", Some("LogAppendTime")).expect("valid");
        assert_eq!(TopicConfig::from_text(&cfg.to_text()).expect("parses"), cfg);
        assert_eq!(cfg.set("retention.ms", Some("soon")).expect_err("bad").key, "retention.ms");
        assert_eq!(cfg.set("cleanup.policy", Some("archive")).expect_err("bad").key, "cleanup.policy");
    }

    /// Kafka lists a setting a client gave the topic as the topic's own even when its value is
    /// the default, until it is deleted; topics stored before this was recorded keep the
    /// old rule (own = differs from the defaults).
    #[test]
    fn a_setting_given_at_the_default_value_stays_the_topics_own_until_deleted() {
        let defaults = TopicConfig { retention_ms: Some(3_600_000), ..TopicConfig::default() };
        let mut cfg = defaults.clone();
        assert!(cfg.overrides(&defaults).is_empty(), "a topic made from the defaults has no settings of its own");
        cfg.set("retention.ms", Some("3600000")).expect("valid");
        cfg.set("cleanup.policy", Some("compact")).expect("valid");
        assert!(cfg.is_own("retention.ms", &defaults), "set to the default's value, still its own");
        assert_eq!(
            cfg.overrides(&defaults),
            [("retention.ms", "3600000".to_string()), ("cleanup.policy", "compact".to_string())]
        );
        let stored = TopicConfig::from_text(&cfg.to_text()).expect("parses");
        assert_eq!(stored, cfg, "the explicit keys are stored");
        assert!(stored.is_own("retention.ms", &defaults));
        cfg.reset_to("retention.ms", &defaults).expect("reset");
        assert!(!cfg.is_own("retention.ms", &defaults), "deleted: the default again");
        assert_eq!(cfg.retention_ms, Some(3_600_000), "deleting falls back to the gateway's default");
        cfg.set("cleanup.policy", None).expect("reset");
        assert!(cfg.overrides(&defaults).is_empty());
        // What an older version stored: no explicit line; values unlike the defaults are own.
        let legacy = "retention.ms=3600000\ncompression.type=zstd\n";
        let old = TopicConfig::from_text(legacy).expect("parses");
        assert_eq!(old.explicit_keys, 0);
        assert_eq!(old.overrides(&defaults), [("compression.type", "zstd".to_string())]);
        assert!(TopicConfig::from_text("#explicit=retention.hours\n").is_err(), "an unknown key is corrupt");
    }

    #[test]
    fn compaction_settings_parse_as_kafka_spells_them() {
        let mut cfg = TopicConfig::default();
        assert_eq!(cfg.get("cleanup.policy").as_deref(), Some("delete"));
        assert!(!cfg.compacted() && cfg.cleanup_policy.deletes());
        for (text, policy) in [
            ("compact", CleanupPolicy::Compact),
            ("compact,delete", CleanupPolicy::CompactDelete),
            ("delete, compact", CleanupPolicy::CompactDelete),
            ("delete", CleanupPolicy::Delete),
        ] {
            cfg.set("cleanup.policy", Some(text)).expect("valid");
            assert_eq!(cfg.cleanup_policy, policy, "{text}");
        }
        assert!(cfg.set("cleanup.policy", Some("compact,")).is_err(), "an empty item");
        cfg.set("cleanup.policy", Some("compact")).expect("valid");
        cfg.set("delete.retention.ms", Some("1000")).expect("valid");
        cfg.set("min.compaction.lag.ms", Some("5")).expect("valid");
        cfg.set("max.compaction.lag.ms", Some("60000")).expect("valid");
        cfg.set("min.cleanable.dirty.ratio", Some("0.01")).expect("valid");
        cfg.set("segment.bytes", Some("1048576")).expect("valid");
        cfg.set("segment.ms", Some("3600000")).expect("valid");
        assert_eq!(cfg.get("min.cleanable.dirty.ratio").as_deref(), Some("0.01"));
        assert_eq!(cfg.get("max.compaction.lag.ms").as_deref(), Some("60000"));
        assert_eq!(TopicConfig::default().get("max.compaction.lag.ms").as_deref(), Some("9223372036854775807"));
        assert_eq!(TopicConfig::from_text(&cfg.to_text()).expect("parses"), cfg);
        for (k, v) in [
            ("min.cleanable.dirty.ratio", "1.5"),
            ("min.cleanable.dirty.ratio", "half"),
            ("delete.retention.ms", "-1"),
            ("segment.bytes", "13"),
            ("segment.bytes", "4294967296"),
            ("segment.ms", "0"),
        ] {
            assert_eq!(cfg.set(k, Some(v)).expect_err(v).key, k);
        }
        cfg.set("segment.ms", None).expect("reset");
        assert_eq!(cfg.segment_ms, DEFAULT_SEGMENT_MS);
    }
}
