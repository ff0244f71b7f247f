//! The mirror's settings: `[mirror]` in the gateway's config, and the whole `cloud.toml` of
//! `tributary-cloud`. Every key has a documented default and is validated with an error naming it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tributary_log::config::check_range;
use tributary_log::ConfigError;

const MIB: u64 = 1 << 20;

/// `[mirror]` of gateway.toml: where the cloud is, who this site is, what to mirror.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MirrorConfig {
    /// Mirror at all.
    pub enabled: bool,
    /// The cloud receiver, `host:port` (UDP, QUIC).
    pub cloud: String,
    /// Name in the cloud's certificate; empty = the host part of `cloud`.
    pub server_name: String,
    /// This gateway's site id: a DNS label (lowercase letters, digits, `-`), also named in its
    /// certificate.
    pub site: String,
    /// CA that signed the cloud's certificate (and this site's).
    pub ca_file: PathBuf,
    /// This site's certificate and private key (PEM).
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Log topics to mirror; `*` = every topic.
    pub topics: Vec<String>,
    /// Topics whose streams get priority on the link.
    pub urgent_topics: Vec<String>,
    /// Cap on mirrored bytes per second, for metered links; 0 = no cap.
    pub bandwidth_bytes_per_s_max: u64,
    /// Bytes read from the log per send on one partition.
    pub read_bytes_max: u64,
    /// Partitions mirrored at most (more are left out, with a warning).
    pub partitions_max: u32,
    /// QUIC congestion controller of the gateway's sends (the direction that carries the data).
    pub congestion_controller: CongestionController,
    /// The codec stored batches cross the link in (`gateway.rs`): `zstd` recompresses each
    /// stored batch's records (lz4 at the site by default) into a zstd batch when that is
    /// smaller, for uplinks where bytes are the limit; `none` sends batches as stored.
    pub wire_compression: WireCompression,
    /// A stored batch whose records decompress to more than this is sent as stored (the
    /// recompression holds one batch's records in memory at a time, per partition sender).
    pub wire_recompress_bytes_max: u64,
    /// QUIC keep-alive (keeps NAT bindings open) and idle timeout. The keep-alive also bounds how
    /// long a restarted receiver goes unnoticed: its first packet from the gateway is answered
    /// with a stateless reset, so the session ends at once instead of at the idle timeout.
    pub keep_alive_ms: u64,
    pub idle_timeout_ms: u64,
    /// A handshake not finished within this is abandoned (the backoff then decides when to
    /// try again; QUIC alone would keep resending until the idle timeout).
    pub connect_timeout_ms: u64,
    /// Reconnect delay: doubles from the minimum to the maximum, with jitter.
    pub reconnect_backoff_min_ms: u64,
    pub reconnect_backoff_max_ms: u64,
    /// Consumer groups' committed offsets of mirrored partitions kept to send to the cloud (the
    /// latest per group and partition; more are not mirrored, with a warning).
    pub offsets_tracked_max: u32,
    /// How often changed committed offsets go to the cloud (commits in between are coalesced).
    pub offsets_interval_ms: u64,
    /// The window the drain rate and ETA are measured over (`drain.rs`): longer is steadier,
    /// shorter follows a changing link sooner.
    pub drain_window_ms: u64,
    /// Mirrored topics whose fresh tail also goes to `{site}.{topic}.live` while a backlog
    /// drains (`fresh.rs`); `*` = every mirrored topic. Empty: none.
    pub fresh_topics: Vec<String>,
    /// Records younger than this are fresh: during a backlog they go to the live topic at once.
    pub fresh_age_ms: u64,
    /// The live streams' share of `bandwidth_bytes_per_s_max` while a backlog drains (they go
    /// first within it; the backlog gets the rest and whatever they leave unused).
    pub fresh_share_percent: u8,
    /// Mirrored compacted topics that catch up latest-first (`latest.rs`): during a backlog,
    /// their live stream (`{site}.{topic}.live`) first sends the backlog's compacted view (the
    /// latest record of every key), then follows the fresh tail as for `fresh_topics`; `*` =
    /// every mirrored compacted topic. Empty: none.
    pub latest_first_topics: Vec<String>,
    /// Memory of one partition's latest-first key map (key bytes plus 64 per key); a backlog
    /// whose keys do not fit sends its view in windows, each the compacted view of its part.
    pub latest_first_map_bytes_max: u64,
    /// Latest-first views running at once (the others wait for a place): their key maps
    /// together hold at most this many times `latest_first_map_bytes_max`.
    pub latest_first_views_max: u32,
    /// Backfill requests waiting to be sent (`tributary mirror backfill`; refused beyond; a
    /// request's slot is free once its ranges are in the centre); as many done ones are kept
    /// for status, the oldest forgotten.
    pub backfill_requests_max: u32,
    /// Separate offset ranges planned per partition for backfill (overlapping ones merge;
    /// a request that would need more is refused).
    pub backfill_ranges_max: u32,
    /// `tributary restore`: partitions restored at once (each a stream from the receiver, at
    /// most its `restore_streams_max`).
    pub restore_streams_max: u32,
    /// `tributary restore`: bytes of one partition in transit (sent by the receiver, not yet
    /// durable in the store): the credit granted per partition; more than the receiver's
    /// `restore_batch_bytes_max`.
    pub restore_credit_bytes: u64,
    /// `tributary restore`: the largest restored batch frame accepted from the receiver (its
    /// batches are at most its `restore_batch_bytes_max`, a single larger record alone): one
    /// such frame per restored partition may be buffered here, beyond its credit.
    pub restore_frame_bytes_max: u64,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            cloud: String::new(),
            server_name: String::new(),
            site: String::new(),
            ca_file: PathBuf::from("/etc/tributary/mirror/ca.pem"),
            cert_file: PathBuf::from("/etc/tributary/mirror/site.pem"),
            key_file: PathBuf::from("/etc/tributary/mirror/site.key"),
            topics: vec!["*".to_string()],
            urgent_topics: Vec::new(),
            bandwidth_bytes_per_s_max: 0,
            read_bytes_max: MIB,
            partitions_max: 1024,
            congestion_controller: CongestionController::default(),
            wire_compression: WireCompression::default(),
            wire_recompress_bytes_max: MIB,
            keep_alive_ms: 5_000,
            idle_timeout_ms: 30_000,
            connect_timeout_ms: 5_000,
            reconnect_backoff_min_ms: 500,
            reconnect_backoff_max_ms: 60_000,
            offsets_tracked_max: 10_000,
            offsets_interval_ms: 100,
            drain_window_ms: 60_000,
            fresh_topics: Vec::new(),
            fresh_age_ms: 10_000,
            fresh_share_percent: 50,
            latest_first_topics: Vec::new(),
            latest_first_map_bytes_max: 8 * MIB,
            latest_first_views_max: 4,
            backfill_requests_max: 1_000,
            backfill_ranges_max: 64,
            restore_streams_max: 4,
            restore_credit_bytes: 4 * MIB,
            restore_frame_bytes_max: 64 * MIB,
        }
    }
}

/// How stored batches cross the link (`mirror.wire_compression`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireCompression {
    /// As stored.
    None,
    /// Each stored batch's records recompressed with zstd when that is smaller: the receiver
    /// decodes a zstd batch as any other (every receiver version does), so no protocol change.
    #[default]
    Zstd,
}

/// The congestion controllers quinn offers, by their config name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CongestionController {
    /// Model-based (BBR v1 as quinn implements it): paces at the measured bottleneck rate and
    /// does not take random loss for congestion, so a lossy WAN link stays full.
    #[default]
    Bbr,
    /// Loss-based (RFC 9438), quinn's default: halves its window on loss, so 1% random loss on a
    /// 100 ms link holds it to about a tenth of 10 Mbit/s.
    Cubic,
    /// Loss-based (RFC 9002's NewReno): as Cubic, with a slower recovery.
    NewReno,
}

/// A site id: a DNS label in its one canonical form (lowercase letters, digits, `-`; no trailing
/// dot), so it can be named in a certificate, prefix a Kafka topic and key the receiver's
/// sessions without two spellings of one site getting two of each.
pub fn valid_site(site: &str) -> bool {
    !site.is_empty()
        && site.len() <= 63
        && site.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !site.starts_with('-')
        && !site.ends_with('-')
}

impl MirrorConfig {
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{prefix}.{k}");
        if !self.enabled {
            return Ok(());
        }
        if self.cloud.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none() {
            return Err(ConfigError::new(key("cloud"), format!("must be host:port (got {:?})", self.cloud)));
        }
        if !valid_site(&self.site) {
            return Err(ConfigError::new(
                key("site"),
                format!("must be a DNS label: lowercase letters, digits and '-', at most 63 (got {:?})", self.site),
            ));
        }
        if self.topics.is_empty() {
            return Err(ConfigError::new(key("topics"), "must name at least one topic (or \"*\")"));
        }
        check_range(&key("read_bytes_max"), self.read_bytes_max, 16 * 1024, 64 * MIB)?;
        check_range(&key("wire_recompress_bytes_max"), self.wire_recompress_bytes_max, 64 * 1024, 64 * MIB)?;
        check_range(&key("partitions_max"), self.partitions_max.into(), 1, 65_536)?;
        check_range(&key("keep_alive_ms"), self.keep_alive_ms, 1_000, 600_000)?;
        // Keep-alives well inside the idle timeout: one or two lost ones must not end a live link.
        check_range(&key("idle_timeout_ms"), self.idle_timeout_ms, 3 * self.keep_alive_ms, 3_600_000)?;
        check_range(&key("connect_timeout_ms"), self.connect_timeout_ms, 100, 600_000)?;
        check_range(&key("reconnect_backoff_min_ms"), self.reconnect_backoff_min_ms, 10, 600_000)?;
        check_range(
            &key("reconnect_backoff_max_ms"),
            self.reconnect_backoff_max_ms,
            self.reconnect_backoff_min_ms,
            3_600_000,
        )?;
        check_range(&key("offsets_tracked_max"), self.offsets_tracked_max.into(), 1, 1_000_000)?;
        check_range(&key("offsets_interval_ms"), self.offsets_interval_ms, 10, 60_000)?;
        check_range(&key("drain_window_ms"), self.drain_window_ms, 1_000, 3_600_000)?;
        check_range(&key("restore_streams_max"), self.restore_streams_max.into(), 1, 1_024)?;
        check_range(&key("restore_credit_bytes"), self.restore_credit_bytes, 64 * 1024, 1024 * MIB)?;
        check_range(&key("restore_frame_bytes_max"), self.restore_frame_bytes_max, MIB, 1024 * MIB)?;
        if self.bandwidth_bytes_per_s_max != 0 {
            check_range(&key("bandwidth_bytes_per_s_max"), self.bandwidth_bytes_per_s_max, 1024, u64::MAX)?;
        }
        check_range(&key("fresh_age_ms"), self.fresh_age_ms, 100, 86_400_000)?;
        // Some share for the live streams, and at least a tenth of the cap for the backlog.
        check_range(&key("fresh_share_percent"), self.fresh_share_percent.into(), 1, 90)?;
        check_range(&key("latest_first_map_bytes_max"), self.latest_first_map_bytes_max, 4 * 1024, 16 * 1024 * MIB)?;
        check_range(&key("latest_first_views_max"), self.latest_first_views_max.into(), 1, 1_024)?;
        check_range(&key("backfill_requests_max"), self.backfill_requests_max.into(), 1, 100_000)?;
        check_range(&key("backfill_ranges_max"), self.backfill_ranges_max.into(), 1, 10_000)?;
        if let Some(t) = self.fresh_topics.iter().find(|t| t.as_str() != "*" && !self.mirrors(t)) {
            return Err(ConfigError::new(
                key("fresh_topics"),
                format!("{t:?} is not a mirrored topic (mirror.topics)"),
            ));
        }
        if let Some(t) = self.latest_first_topics.iter().find(|t| t.as_str() != "*" && !self.mirrors(t)) {
            return Err(ConfigError::new(
                key("latest_first_topics"),
                format!("{t:?} is not a mirrored topic (mirror.topics)"),
            ));
        }
        Ok(())
    }

    /// Checks `latest_first_topics` against the topics that exist (at start-up, once the store
    /// is open): each one named must be compacted (`cleanup.policy` with `compact`). A topic
    /// created later, or `*`, gets the view only if compacted.
    pub fn validate_topics(&self, prefix: &str, compacted: impl Fn(&str) -> Option<bool>) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        if let Some(t) = self.latest_first_topics.iter().find(|t| t.as_str() != "*" && compacted(t) == Some(false)) {
            return Err(ConfigError::new(
                format!("{prefix}.latest_first_topics"),
                format!(
                    "{t:?} is not a compacted topic (cleanup.policy without compact): it has no latest value per key"
                ),
            ));
        }
        Ok(())
    }

    /// Whether a mirrored topic is named for latest-first catch-up (it also needs to be
    /// compacted, which the store says).
    pub fn latest_first(&self, topic: &str) -> bool {
        self.mirrors(topic) && self.latest_first_topics.iter().any(|t| t == "*" || t == topic)
    }

    /// Whether a log topic is mirrored.
    pub fn mirrors(&self, topic: &str) -> bool {
        !topic.starts_with("__") && self.topics.iter().any(|t| t == "*" || t == topic)
    }

    /// Whether a mirrored topic's fresh tail goes to its live topic during a backlog.
    pub fn fresh(&self, topic: &str) -> bool {
        self.mirrors(topic) && self.fresh_topics.iter().any(|t| t == "*" || t == topic)
    }

    /// The TLS name expected in the cloud's certificate.
    pub fn server_name(&self) -> &str {
        if self.server_name.is_empty() {
            self.cloud
                .rsplit_once(':')
                .map_or(self.cloud.as_str(), |(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        } else {
            &self.server_name
        }
    }
}

/// `cloud.toml`: the receiver next to the central Kafka cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloudConfig {
    /// UDP address the QUIC endpoint listens on.
    pub listen: SocketAddr,
    /// CA that signs site certificates (clients must present one).
    pub ca_file: PathBuf,
    /// The receiver's own certificate and key.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Remote topic name; `{site}` and `{topic}` are replaced.
    pub remote_topic_format: String,
    /// Topic where gaps (data a gateway had to drop before mirroring it) are recorded.
    pub gaps_topic: String,
    /// Bytes of one partition in transit (sent by the gateway, not yet stored in Kafka).
    pub partition_credit_bytes: u64,
    /// Largest frame accepted from a gateway (a stored batch plus its header).
    pub frame_bytes_max: u64,
    /// Bytes one site's data streams may hold in this process: frames read and not yet handed to
    /// librdkafka (a stream starts a new frame only while the site holds less than half; more
    /// than all of it ends the session), and decompressed records (decompressing waits while they
    /// take half). Without it one site could make the receiver hold `partitions_per_site_max`
    /// half-sent frames of `frame_bytes_max` each.
    pub site_buffer_bytes_max: u64,
    /// Connected sites at most; partitions of one site at most.
    pub sites_max: u32,
    pub partitions_per_site_max: u32,
    /// How often progress is reported back to gateways.
    pub mirrored_report_interval_ms: u64,
    /// QUIC keep-alive and idle timeout.
    pub keep_alive_ms: u64,
    pub idle_timeout_ms: u64,
    /// Decompressed size of one batch at most.
    pub decompressed_batch_bytes_max: u64,
    /// Write gateways' committed consumer-group offsets, translated, as MirrorMaker 2
    /// checkpoints into `{site}.checkpoints.internal`.
    pub checkpoints_enabled: bool,
    /// Runs of the source-to-remote offset index kept per partition (a run is a stretch of
    /// consecutive offsets; commits below the oldest run are not translated).
    pub checkpoint_index_runs_max: u32,
    /// Consumer groups' commits of one partition waiting for their data to be stored.
    pub checkpoint_groups_per_partition_max: u32,
    /// Also commit the translated offsets into the central cluster's consumer groups (only
    /// groups with no active member there: Kafka refuses the others, retried later).
    pub central_commit_enabled: bool,
    /// The central group of an edge group: `{group}` and `{site}` are replaced.
    pub central_group_format: String,
    /// How often translated offsets are committed into central groups.
    pub central_commit_interval_ms: u64,
    /// Central groups with offsets waiting to be committed at most (more are dropped, counted).
    pub central_commit_groups_max: u32,
    /// Gateway restores (`tributary restore`) served at once; more are refused.
    pub restore_sessions_max: u32,
    /// Partitions one restore streams at once (each a librdkafka consumer and a QUIC stream);
    /// a gateway asking for more is refused.
    pub restore_streams_max: u32,
    /// Bytes of records in one restored batch frame at most (uncompressed; a record larger than
    /// this goes alone). The gateway's `mirror.restore_credit_bytes` must exceed it.
    pub restore_batch_bytes_max: u64,
    /// librdkafka's prefetch per restored partition (`queued.max.messages.kbytes`,
    /// `fetch.max.bytes`): what one restore stream may hold here beside its two ready batches.
    pub restore_fetch_bytes_max: u64,
    /// Consumer groups' offsets (group x partition) one restore lists at most.
    pub restore_offsets_max: u32,
    /// Consumer groups one restore may ask to fail back (`--failback-group`) at most, over all
    /// its requests: each is a consumer and a committed-offsets query of the central cluster.
    pub restore_groups_max: u32,
    pub kafka: KafkaTarget,
    pub log: LogLevel,
}

/// The central cluster, reached with librdkafka.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaTarget {
    pub bootstrap_servers: String,
    /// Replication factor of remote topics this receiver creates.
    pub replication_factor: i32,
    /// Timeout of metadata, admin and resume-point requests.
    pub request_timeout_ms: u64,
    /// Records waiting in librdkafka's queue at most (decompressed: this bounds the receiver's
    /// memory, where the credit counts compressed bytes).
    pub queue_messages_max: u32,
    /// Further librdkafka properties (security.protocol, sasl.*, compression.type, ...).
    pub properties: BTreeMap<String, String>,
    /// Topic configs of the remote topics (and the gaps topic) this receiver creates, e.g.
    /// `min.insync.replicas = "2"` beside `replication_factor = 3`.
    pub topic_config: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogLevel {
    pub level: String,
}

impl Default for LogLevel {
    fn default() -> Self {
        Self { level: "info".into() }
    }
}

impl Default for KafkaTarget {
    fn default() -> Self {
        Self {
            bootstrap_servers: "127.0.0.1:9092".into(),
            replication_factor: 1,
            request_timeout_ms: 30_000,
            queue_messages_max: 50_000,
            properties: BTreeMap::new(),
            topic_config: BTreeMap::new(),
        }
    }
}

impl Default for CloudConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
            ca_file: PathBuf::from("/etc/tributary/cloud/ca.pem"),
            cert_file: PathBuf::from("/etc/tributary/cloud/cloud.pem"),
            key_file: PathBuf::from("/etc/tributary/cloud/cloud.key"),
            remote_topic_format: "{site}.{topic}".into(),
            gaps_topic: "tributary.mirror.gaps".into(),
            partition_credit_bytes: 4 * MIB,
            frame_bytes_max: 16 * MIB,
            site_buffer_bytes_max: 64 * MIB,
            sites_max: 1_000,
            partitions_per_site_max: 4_096,
            mirrored_report_interval_ms: 200,
            keep_alive_ms: 10_000,
            idle_timeout_ms: 60_000,
            decompressed_batch_bytes_max: 64 * MIB,
            checkpoints_enabled: true,
            checkpoint_index_runs_max: 4_096,
            checkpoint_groups_per_partition_max: 1_000,
            central_commit_enabled: false,
            central_group_format: "{group}".into(),
            central_commit_interval_ms: 1_000,
            central_commit_groups_max: 10_000,
            restore_sessions_max: 4,
            restore_streams_max: 8,
            restore_batch_bytes_max: 256 * 1024,
            restore_fetch_bytes_max: 4 * MIB,
            restore_offsets_max: 100_000,
            restore_groups_max: 1_000,
            kafka: KafkaTarget::default(),
            log: LogLevel::default(),
        }
    }
}

impl CloudConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.remote_topic_format.contains("{topic}") {
            return Err(ConfigError::new("remote_topic_format", "must contain {topic}"));
        }
        if self.gaps_topic.is_empty() {
            return Err(ConfigError::new("gaps_topic", "must not be empty"));
        }
        check_range("partition_credit_bytes", self.partition_credit_bytes, 64 * 1024, 1024 * MIB)?;
        check_range("frame_bytes_max", self.frame_bytes_max, 64 * 1024, 256 * MIB)?;
        // A frame started below half the budget always fits: one stream alone never ends its
        // session.
        check_range("site_buffer_bytes_max", self.site_buffer_bytes_max, 2 * self.frame_bytes_max, 64 * 1024 * MIB)?;
        check_range("sites_max", self.sites_max.into(), 1, 1_000_000)?;
        check_range("partitions_per_site_max", self.partitions_per_site_max.into(), 1, 1_000_000)?;
        check_range("mirrored_report_interval_ms", self.mirrored_report_interval_ms, 1, 60_000)?;
        check_range("keep_alive_ms", self.keep_alive_ms, 1_000, 600_000)?;
        check_range("idle_timeout_ms", self.idle_timeout_ms, self.keep_alive_ms + 1, 3_600_000)?;
        check_range("decompressed_batch_bytes_max", self.decompressed_batch_bytes_max, MIB, 1024 * MIB)?;
        check_range("checkpoint_index_runs_max", self.checkpoint_index_runs_max.into(), 16, 10_000_000)?;
        check_range(
            "checkpoint_groups_per_partition_max",
            self.checkpoint_groups_per_partition_max.into(),
            1,
            1_000_000,
        )?;
        if !self.central_group_format.contains("{group}") {
            return Err(ConfigError::new("central_group_format", "must contain {group}"));
        }
        check_range("central_commit_interval_ms", self.central_commit_interval_ms, 10, 3_600_000)?;
        check_range("central_commit_groups_max", self.central_commit_groups_max.into(), 1, 1_000_000)?;
        check_range("restore_sessions_max", self.restore_sessions_max.into(), 1, 1_000)?;
        check_range("restore_streams_max", self.restore_streams_max.into(), 1, 1_024)?;
        check_range("restore_batch_bytes_max", self.restore_batch_bytes_max, 16 * 1024, 16 * MIB)?;
        check_range("restore_fetch_bytes_max", self.restore_fetch_bytes_max, 64 * 1024, 1024 * MIB)?;
        check_range("restore_offsets_max", self.restore_offsets_max.into(), 1, 10_000_000)?;
        check_range("restore_groups_max", self.restore_groups_max.into(), 1, 100_000)?;
        if self.kafka.bootstrap_servers.is_empty() {
            return Err(ConfigError::new("kafka.bootstrap_servers", "must not be empty"));
        }
        check_range("kafka.replication_factor", self.kafka.replication_factor.max(0) as u64, 1, 32)?;
        check_range("kafka.request_timeout_ms", self.kafka.request_timeout_ms, 100, 600_000)?;
        check_range("kafka.queue_messages_max", self.kafka.queue_messages_max.into(), 1_000, 10_000_000)?;
        if let Some((k, _)) = self.kafka.topic_config.iter().find(|(k, v)| k.is_empty() || v.is_empty()) {
            return Err(ConfigError::new("kafka.topic_config", format!("empty name or value ({k:?})")));
        }
        Ok(())
    }

    /// The central consumer group that receives an edge group's translated offsets.
    pub fn central_group(&self, site: &str, group: &str) -> String {
        self.central_group_format.replace("{site}", site).replace("{group}", group)
    }

    /// The remote topic of a site's log topic.
    pub fn remote_topic(&self, site: &str, topic: &str) -> String {
        self.remote_topic_format.replace("{site}", site).replace("{topic}", topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_errors_name_the_key() {
        assert!(CloudConfig::default().validate().is_ok());
        assert!(MirrorConfig::default().validate("mirror").is_ok(), "disabled by default");
        let on = MirrorConfig {
            enabled: true,
            cloud: "cloud.example:7443".into(),
            site: "plant-7".into(),
            ..Default::default()
        };
        assert!(on.validate("mirror").is_ok());
        assert_eq!(on.server_name(), "cloud.example");
        for site in ["plant_7", "Plant-7", "plant-7.", "-plant", ""] {
            let bad = MirrorConfig { site: site.into(), ..on.clone() };
            assert_eq!(bad.validate("mirror").map_err(|e| e.key), Err("mirror.site".to_string()), "{site:?}");
        }
        let bad = MirrorConfig { cloud: "nowhere".into(), ..on };
        assert_eq!(bad.validate("mirror").map_err(|e| e.key), Err("mirror.cloud".to_string()));
        let bad = CloudConfig { partition_credit_bytes: 1, ..CloudConfig::default() };
        assert_eq!(bad.validate().map_err(|e| e.key), Err("partition_credit_bytes".to_string()));
        let bad = CloudConfig { site_buffer_bytes_max: 16 << 20, ..CloudConfig::default() };
        assert_eq!(bad.validate().map_err(|e| e.key), Err("site_buffer_bytes_max".to_string()), "under 2 frames");
    }

    #[test]
    fn congestion_controller_and_liveness_keys_are_checked_by_name() {
        let on = MirrorConfig {
            enabled: true,
            cloud: "cloud.example:7443".into(),
            site: "plant-7".into(),
            ..Default::default()
        };
        for (text, want) in [
            ("congestion_controller = \"bbr\"", CongestionController::Bbr),
            ("congestion_controller = \"cubic\"", CongestionController::Cubic),
            ("congestion_controller = \"new_reno\"", CongestionController::NewReno),
        ] {
            let cfg: MirrorConfig = crate::config_file::parse(text).expect(text);
            assert_eq!(cfg.congestion_controller, want);
        }
        for bad in ["congestion_controller = \"vegas\"", "congestion_controller = \"BBR\"", "congestion_controller = 1"]
        {
            let e = crate::config_file::parse::<MirrorConfig>(bad).expect_err(bad);
            assert_eq!(e.key, "congestion_controller", "{bad}: {e}");
        }
        for (text, want) in [("wire_compression = \"none\"", WireCompression::None), ("", WireCompression::Zstd)] {
            let cfg: MirrorConfig = crate::config_file::parse(text).expect(text);
            assert_eq!(cfg.wire_compression, want);
        }
        let e = crate::config_file::parse::<MirrorConfig>("wire_compression = \"lz4\"").expect_err("lz4");
        assert_eq!(e.key, "wire_compression");
        let bad = MirrorConfig { wire_recompress_bytes_max: 1024, ..on.clone() };
        assert_eq!(bad.validate("mirror").map_err(|e| e.key), Err("mirror.wire_recompress_bytes_max".to_string()));
        // Keep-alives well inside the idle timeout: at least three per idle period.
        let bad = MirrorConfig { keep_alive_ms: 10_000, idle_timeout_ms: 29_999, ..on.clone() };
        assert_eq!(bad.validate("mirror").map_err(|e| e.key), Err("mirror.idle_timeout_ms".to_string()));
        let fine = MirrorConfig { keep_alive_ms: 10_000, idle_timeout_ms: 30_000, ..on };
        assert!(fine.validate("mirror").is_ok());
    }

    #[test]
    fn latest_first_keys_are_checked_by_name_and_its_topics_must_be_mirrored_and_compacted() {
        let on = MirrorConfig {
            enabled: true,
            cloud: "cloud.example:7443".into(),
            site: "plant-7".into(),
            topics: vec!["meters".into(), "state".into()],
            ..Default::default()
        };
        let key = |c: MirrorConfig| c.validate("mirror").err().map(|e| e.key);
        let unmirrored = MirrorConfig { latest_first_topics: vec!["local".into()], ..on.clone() };
        assert_eq!(key(unmirrored).as_deref(), Some("mirror.latest_first_topics"));
        let small = MirrorConfig { latest_first_map_bytes_max: 4_095, ..on.clone() };
        assert_eq!(key(small).as_deref(), Some("mirror.latest_first_map_bytes_max"));
        let none = MirrorConfig { latest_first_views_max: 0, ..on.clone() };
        assert_eq!(key(none).as_deref(), Some("mirror.latest_first_views_max"));
        let m = MirrorConfig { latest_first_topics: vec!["state".into()], ..on.clone() };
        assert_eq!(key(m.clone()), None);
        assert!(m.latest_first("state") && !m.latest_first("meters") && !m.fresh("state"));
        // At start-up, against the store: a named topic that exists must be compacted.
        let compacted = |t: &str| match t {
            "state" => Some(true),
            "meters" => Some(false),
            _ => None,
        };
        assert!(m.validate_topics("mirror", compacted).is_ok());
        let e = MirrorConfig { latest_first_topics: vec!["meters".into()], ..on.clone() }
            .validate_topics("mirror", compacted)
            .expect_err("not compacted");
        assert_eq!(e.key, "mirror.latest_first_topics");
        assert!(e.to_string().contains("meters"), "{e}");
        let all = MirrorConfig { latest_first_topics: vec!["*".into()], ..on.clone() };
        assert!(all.validate_topics("mirror", compacted).is_ok(), "\"*\": the compacted ones");
        assert!(!MirrorConfig::default().latest_first("state"), "off by default");
    }

    #[test]
    fn fresh_keys_are_checked_by_name_and_fresh_topics_must_be_mirrored() {
        let on = MirrorConfig {
            enabled: true,
            cloud: "cloud.example:7443".into(),
            site: "plant-7".into(),
            topics: vec!["meters".into(), "alarms".into()],
            ..Default::default()
        };
        let key = |m: MirrorConfig| m.validate("mirror").err().map(|e| e.key);
        assert_eq!(
            key(MirrorConfig { fresh_share_percent: 0, ..on.clone() }).as_deref(),
            Some("mirror.fresh_share_percent")
        );
        assert_eq!(
            key(MirrorConfig { fresh_share_percent: 91, ..on.clone() }).as_deref(),
            Some("mirror.fresh_share_percent")
        );
        assert_eq!(key(MirrorConfig { fresh_age_ms: 50, ..on.clone() }).as_deref(), Some("mirror.fresh_age_ms"));
        assert_eq!(
            key(MirrorConfig { restore_frame_bytes_max: 1024, ..on.clone() }).as_deref(),
            Some("mirror.restore_frame_bytes_max")
        );
        let unmirrored = MirrorConfig { fresh_topics: vec!["local".into()], ..on.clone() };
        assert_eq!(key(unmirrored).as_deref(), Some("mirror.fresh_topics"));
        let m = MirrorConfig { fresh_topics: vec!["meters".into()], ..on.clone() };
        assert!(m.validate("mirror").is_ok());
        assert!(m.fresh("meters") && !m.fresh("alarms") && !m.fresh("local"));
        let all = MirrorConfig { fresh_topics: vec!["*".into()], ..on };
        assert!(all.fresh("alarms") && !all.fresh("local"), "\"*\": every mirrored topic, no other");
        assert!(!MirrorConfig::default().fresh("meters"), "off by default");
    }

    #[test]
    fn topic_selection_and_naming() {
        let m = MirrorConfig { topics: vec!["meters".into()], ..Default::default() };
        assert!(m.mirrors("meters") && !m.mirrors("other"));
        assert!(MirrorConfig::default().mirrors("anything") && !MirrorConfig::default().mirrors("__internal"));
        assert_eq!(CloudConfig::default().remote_topic("plant-7", "meters"), "plant-7.meters");
    }
}

/// Issue 13 item 17 for cloud.toml: type errors name their key and line; sizes and durations
/// may be written as a person writes them.
#[cfg(test)]
mod file {
    use super::*;

    #[test]
    fn every_cloud_key_is_named_in_its_type_error_and_human_forms_parse() {
        let default = toml::Value::try_from(CloudConfig::default()).expect("serializes");
        let toml::Value::Table(top) = &default else { panic!("a table") };
        let mut all: Vec<(String, String, toml::Value)> = Vec::new();
        for (k, v) in top {
            match v {
                toml::Value::Table(t) => {
                    all.extend(t.iter().filter(|(_, v)| !v.is_table()).map(|(l, v)| (k.clone(), l.clone(), v.clone())));
                }
                _ => all.push((String::new(), k.clone(), v.clone())),
            }
        }
        assert!(all.len() > 15, "{} keys", all.len());
        for (section, leaf, value) in all {
            let key = if section.is_empty() { leaf.clone() } else { format!("{section}.{leaf}") };
            let header = if section.is_empty() { String::new() } else { format!("[{section}]\n") };
            let wrong: [&str; 2] = match value {
                toml::Value::Integer(_) => ["true", "\"lots\""],
                toml::Value::Boolean(_) => ["\"lots\"", "5"],
                _ => ["5", "true"],
            };
            for w in wrong {
                let text = format!("{header}{leaf} = {w}\n");
                let e = crate::config_file::parse::<CloudConfig>(&text).expect_err(&text);
                assert_eq!(e.key, key, "{text}: {e}");
                assert!(e.reason.starts_with("line "), "{text}: {e}");
            }
        }
        let cfg: CloudConfig = crate::config_file::parse(
            "site_buffer_bytes_max = \"128 MiB\"\nidle_timeout_ms = \"2m\"\n[kafka]\nrequest_timeout_ms = \"30s\"\n",
        )
        .expect("human forms parse");
        assert_eq!((cfg.site_buffer_bytes_max, cfg.idle_timeout_ms), (128 << 20, 120_000));
        assert_eq!(cfg.kafka.request_timeout_ms, 30_000);
        cfg.validate().expect("valid");
    }
}

#[cfg(test)]
mod shipped {
    use super::*;

    const SHIPPED: &str = include_str!("../../config/cloud.toml");

    #[test]
    fn shipped_cloud_config_states_and_documents_the_defaults() {
        let cfg: CloudConfig = crate::config_file::parse(SHIPPED).expect("config/cloud.toml parses");
        assert_eq!(cfg, CloudConfig::default(), "config/cloud.toml states the built-in defaults");
        cfg.validate().expect("valid");
        let toml::Value::Table(all) = toml::Value::try_from(CloudConfig::default()).expect("serializes") else {
            panic!("a table")
        };
        let mut keys: Vec<String> = Vec::new();
        for (k, v) in all {
            match v {
                toml::Value::Table(t) => keys.extend(t.keys().cloned()),
                _ => keys.push(k),
            }
        }
        for key in keys {
            assert!(
                SHIPPED.lines().any(|l| l.starts_with(&format!("{key} ")) || l.starts_with(&format!("[kafka.{key}]"))),
                "config/cloud.toml does not document {key}"
            );
        }
    }
}
