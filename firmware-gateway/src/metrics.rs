//! The metrics listener: Prometheus text format on `[metrics] listen` (GET /metrics), built on
//! request from the store's, the listeners', the group coordinator's and the mirror's counters,
//! and the status page's routes (`status/`) on the same listener. A bounded number of
//! connections at a time (`metrics.connections_max`), one request each, its head read by the
//! bounded parser of `http.rs` within `metrics.request_timeout_ms`. With a TLS certificate
//! configured the same port also speaks https: a connection whose first byte is a TLS handshake
//! record is served over TLS, any other as plain HTTP.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tributary_broker::aggregate::AggregateStats;
use tributary_broker::histogram::HistogramSnapshot;
use tributary_broker::kafka::groups::Coordinator;
use tributary_broker::kafka::KafkaStats;
use tributary_broker::mqtt::MqttStats;
use tributary_broker::{ConfigError, Store};
use tributary_sync::gateway::MirrorStats;

/// `[metrics]` of gateway.toml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub enabled: bool,
    /// Address of the Prometheus endpoint (GET /metrics).
    pub listen: String,
    /// Connections served at once (scrapes and status page requests); more wait.
    pub connections_max: u32,
    /// A connection's request must arrive and be answered within this time, or it is closed.
    pub request_timeout_ms: u64,
    /// Largest request head (request line and headers) read; larger is answered 431.
    pub request_head_bytes_max: u32,
    /// How often a subset goes out as retained MQTT `$SYS/broker/...` messages; 0 = never.
    pub sys_interval_ms: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:9464".into(),
            connections_max: 4,
            request_timeout_ms: 10_000,
            request_head_bytes_max: 8192,
            sys_interval_ms: 10_000,
        }
    }
}

impl MetricsConfig {
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        if self.enabled && self.listen.parse::<SocketAddr>().is_err() {
            return Err(ConfigError::new(
                format!("{prefix}.listen"),
                format!("must be ip:port (got {:?})", self.listen),
            ));
        }
        if self.sys_interval_ms != 0 {
            tributary_broker::config::check_range(
                &format!("{prefix}.sys_interval_ms"),
                self.sys_interval_ms,
                100,
                86_400_000,
            )?;
        }
        tributary_broker::config::check_range(
            &format!("{prefix}.request_timeout_ms"),
            self.request_timeout_ms,
            100,
            600_000,
        )?;
        tributary_broker::config::check_range(
            &format!("{prefix}.request_head_bytes_max"),
            self.request_head_bytes_max.into(),
            256,
            1 << 20,
        )?;
        tributary_broker::config::check_range(
            &format!("{prefix}.connections_max"),
            self.connections_max.into(),
            1,
            1024,
        )
    }
}

/// What the endpoint reads from.
#[derive(Debug, Clone)]
pub struct Sources {
    pub store: Store,
    pub kafka: Option<(Arc<KafkaStats>, Arc<Coordinator>)>,
    pub mqtt: Option<Arc<MqttStats>>,
    pub mirror: Option<Arc<MirrorStats>>,
    /// The status page's counters, when it is served.
    pub status: Option<Arc<crate::status::StatusStats>>,
    /// One per `[[aggregate]]` entry.
    pub aggregates: Vec<Arc<AggregateStats>>,
}

impl Sources {
    /// The store alone: no listener, mirror, page or aggregator to read (tests).
    #[cfg(test)]
    pub fn store_only(store: Store) -> Self {
        Self { store, kafka: None, mqtt: None, mirror: None, status: None, aggregates: Vec::new() }
    }
}

/// A metric family being written: `# HELP`/`# TYPE` once, then samples.
struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// A histogram whose bounds are divided by `scale` (microseconds to seconds: 1e6).
    fn histogram(&mut self, name: &str, help: &str, h: &HistogramSnapshot, scale: f64) {
        self.family(name, "histogram", help);
        for (i, b) in h.bounds.iter().enumerate() {
            let le = format!("{}", *b as f64 / scale);
            self.sample(&format!("{name}_bucket"), &[("le", &le)], h.cumulative[i]);
        }
        let count = h.cumulative.last().copied().unwrap_or(0);
        self.sample(&format!("{name}_bucket"), &[("le", "+Inf")], count);
        self.sample(&format!("{name}_sum"), &[], h.sum as f64 / scale);
        self.sample(&format!("{name}_count"), &[], count);
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The whole exposition, now.
pub fn render(src: &Sources) -> String {
    let mut o = Out(String::with_capacity(8 * 1024));
    o.family("tributary_build_info", "gauge", "Version of the running gateway.");
    o.sample("tributary_build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1);
    let store = &src.store;
    let s = store.stats();
    o.one("tributary_store_commits_total", "counter", "Store commits.", s.commits);
    o.one("tributary_store_durable_commits_total", "counter", "Store commits with fsync.", s.durable_commits);
    o.one("tributary_store_failed_commits_total", "counter", "Store commits that failed.", s.failed_commits);
    o.one(
        "tributary_store_reopens_total",
        "counter",
        "In-process reopens of the database after a failed write.",
        s.reopens,
    );
    o.one(
        "tributary_store_write_fault",
        "gauge",
        "1 while writes fail (after a disk error, until one succeeds).",
        u64::from(store.write_fault().is_some()),
    );
    o.one("tributary_store_appended_records_total", "counter", "Records appended.", s.appended_records);
    o.one("tributary_store_appended_bytes_total", "counter", "Batch bytes appended (as stored).", s.appended_bytes);
    o.one(
        "tributary_store_tail_cache_bytes",
        "gauge",
        "Bytes of the newest committed batches held in memory (storage.tail_cache_bytes_max).",
        s.tail_cache_bytes,
    );
    o.one("tributary_store_tail_cache_hits_total", "counter", "Reads served from the tail cache.", s.tail_cache_hits);
    o.one(
        "tributary_store_tail_cache_misses_total",
        "counter",
        "Reads of committed batches no longer in the tail cache (read from the database).",
        s.tail_cache_misses,
    );
    o.one(
        "tributary_store_journal_records_total",
        "counter",
        "Durable commits whose pages went to the commit journal (storage.journal_bytes) in one write and sync.",
        s.journal_records,
    );
    o.one(
        "tributary_store_journal_unbuffered_records_total",
        "counter",
        "Journal records written with O_DIRECT | O_DSYNC: one write to the disk, no page cache (the others: a buffered write and fdatasync).",
        s.journal_unbuffered_records,
    );
    o.one(
        "tributary_store_journal_direct_syncs_total",
        "counter",
        "Durable commits too large for the journal (over a quarter of it), which synced the database file instead.",
        s.journal_direct_syncs,
    );
    o.one(
        "tributary_store_journal_checkpoints_total",
        "counter",
        "Journal checkpoints: the database file synced in the background and the journal freed up to there.",
        s.journal_checkpoints,
    );
    o.one(
        "tributary_store_journal_room_waits_total",
        "counter",
        "Journal records that waited for a checkpoint to free room in it (storage.journal_bytes small for the write rate, or the database file's sync slow).",
        s.journal_room_waits,
    );
    o.one(
        "tributary_store_journal_room_wait_seconds_total",
        "counter",
        "Time journal records waited for room in it, in all.",
        s.journal_room_wait_micros as f64 / 1e6,
    );
    o.one(
        "tributary_store_journal_replayed_records_total",
        "counter",
        "Journal records written back into the database file when it was opened (after an unclean stop).",
        s.journal_replayed_records,
    );
    o.one(
        "tributary_compaction_reclaimed_bytes_total",
        "counter",
        "Bytes of batches compaction removed (superseded records, expired tombstones).",
        s.compaction_reclaimed_bytes,
    );
    o.one(
        "tributary_compaction_removed_records_total",
        "counter",
        "Records compaction removed.",
        s.compaction_removed_records,
    );
    o.one("tributary_compaction_passes_total", "counter", "Compaction passes finished.", s.compaction_passes);
    o.one(
        "tributary_compaction_dirty_bytes",
        "gauge",
        "Bytes of compacted topics appended since their partitions' last compaction.",
        s.compaction_dirty_bytes,
    );
    o.one(
        "tributary_compaction_dirty_ratio_max",
        "gauge",
        "Highest dirty share of one compacted partition (compare with min.cleanable.dirty.ratio).",
        s.compaction_dirty_ratio_max_ppm as f64 / 1e6,
    );
    o.one(
        "tributary_compaction_lag_seconds",
        "gauge",
        "Age of the oldest batch of a compacted topic not compacted yet.",
        s.compaction_lag_ms as f64 / 1e3,
    );
    let (latency, per_commit) = store.commit_histograms();
    o.histogram("tributary_store_commit_latency_seconds", "Time from a commit's start to its return.", &latency, 1e6);
    o.histogram("tributary_store_records_per_commit", "Records appended by one commit.", &per_commit, 1.0);
    o.one("tributary_store_logical_bytes", "gauge", "Bytes of stored batches.", s.logical_bytes);
    o.one(
        "tributary_store_footprint_bytes",
        "gauge",
        "Estimated database bytes the stored data takes.",
        s.footprint_bytes,
    );
    if let Ok(disk) = store.disk_usage_bytes() {
        o.one("tributary_store_disk_bytes", "gauge", "Real disk use of the database file.", disk);
    }
    o.one(
        "tributary_store_kv_bytes",
        "gauge",
        "Estimated database bytes of sessions, offsets and other key-value state (in the budget; retained messages are the topic mqtt.retained).",
        s.kv_bytes,
    );
    o.one("tributary_store_budget_bytes", "gauge", "storage.max_bytes.", store.config().max_bytes);
    o.family(
        "tributary_retention_deleted_batches_total",
        "counter",
        "Batches deleted by retention, by whether the mirror had them.",
    );
    let unmirrored = s.retention_deleted_unarchived_batches;
    o.sample(
        "tributary_retention_deleted_batches_total",
        &[("mirrored", "true")],
        s.retention_deleted_batches - unmirrored.min(s.retention_deleted_batches),
    );
    o.sample("tributary_retention_deleted_batches_total", &[("mirrored", "false")], unmirrored);
    o.one(
        "tributary_retention_deleted_bytes_total",
        "counter",
        "Batch bytes deleted by retention.",
        s.retention_deleted_bytes,
    );

    o.family("tributary_partition_high_watermark", "gauge", "Offset after the last stored record.");
    let mut starts = Vec::new();
    for t in store.topics() {
        for p in 0..t.partitions as i32 {
            if let Ok(wm) = store.watermarks(&t.name, p) {
                let ps = p.to_string();
                o.sample(
                    "tributary_partition_high_watermark",
                    &[("topic", &t.name), ("partition", &ps)],
                    wm.high_watermark,
                );
                starts.push((t.name.clone(), ps, wm.log_start_offset));
            }
        }
    }
    o.family("tributary_partition_log_start_offset", "gauge", "First offset still stored.");
    for (t, p, start) in &starts {
        o.sample("tributary_partition_log_start_offset", &[("topic", t), ("partition", p)], start);
    }

    o.family("tributary_connections_open", "gauge", "Open client connections.");
    if let Some((k, _)) = &src.kafka {
        o.sample(
            "tributary_connections_open",
            &[("protocol", "kafka")],
            k.listener.connections_open.load(Ordering::Relaxed),
        );
    }
    if let Some(m) = &src.mqtt {
        o.sample(
            "tributary_connections_open",
            &[("protocol", "mqtt")],
            m.listener.connections_open.load(Ordering::Relaxed),
        );
    }
    let counters: [(&str, &str); 5] = [
        ("tributary_connections_accepted_total", "Connections accepted."),
        ("tributary_connections_refused_total", "Connections refused at a limit."),
        ("tributary_protocol_errors_total", "Connections ended by malformed input."),
        ("tributary_bytes_received_total", "Bytes of requests or packets received."),
        ("tributary_bytes_sent_total", "Bytes of responses or packets sent."),
    ];
    for (i, (name, help)) in counters.iter().enumerate() {
        o.family(name, "counter", help);
        if let Some((k, _)) = &src.kafka {
            let v = [
                &k.listener.connections_accepted,
                &k.listener.connections_refused,
                &k.listener.protocol_errors,
                &k.bytes_in,
                &k.bytes_out,
            ][i];
            o.sample(name, &[("protocol", "kafka")], v.load(Ordering::Relaxed));
        }
        if let Some(m) = &src.mqtt {
            let v = [
                &m.listener.connections_accepted,
                &m.listener.connections_refused,
                &m.listener.protocol_errors,
                &m.bytes_in,
                &m.bytes_out,
            ][i];
            o.sample(name, &[("protocol", "mqtt")], v.load(Ordering::Relaxed));
        }
    }
    if let Some(m) = &src.mqtt {
        let l = &m.listener;
        let websocket: [(&str, &str, &str, &AtomicU64); 3] = [
            (
                "tributary_websocket_connections_open",
                "gauge",
                "Open connections over WebSocket (ws and wss; also in tributary_connections_open).",
                &l.websocket_connections_open,
            ),
            (
                "tributary_websocket_connections_accepted_total",
                "counter",
                "WebSocket upgrades completed (also in tributary_connections_accepted_total).",
                &l.websocket_connections_accepted,
            ),
            (
                "tributary_websocket_handshake_failures_total",
                "counter",
                "WebSocket upgrade requests refused (400, 405, 426, 431), closed or late.",
                &l.websocket_handshake_failures,
            ),
        ];
        for (name, kind, help, v) in websocket {
            o.family(name, kind, help);
            o.sample(name, &[("protocol", "mqtt")], v.load(Ordering::Relaxed));
        }
    }
    let refusals: [(&str, &str); 4] = [
        ("tributary_auth_failures_total", "Failed logins (wrong or missing credentials)."),
        ("tributary_connections_rate_limited_total", "Connections refused by the per-address rate limit."),
        (
            "tributary_tls_handshake_failures_total",
            "TLS handshakes that failed (unknown or expired certificates included).",
        ),
        (
            "tributary_accept_errors_total",
            "Accepts that failed (file descriptors exhausted and the like), each followed by a pause.",
        ),
    ];
    for (i, (name, help)) in refusals.iter().enumerate() {
        o.family(name, "counter", help);
        if let Some((k, _)) = &src.kafka {
            let l = &k.listener;
            let v = [&k.auth_failures, &l.connections_rate_limited, &l.tls_handshake_failures, &l.accept_errors][i];
            o.sample(name, &[("protocol", "kafka")], v.load(Ordering::Relaxed));
        }
        if let Some(m) = &src.mqtt {
            let l = &m.listener;
            let v = [&m.auth_failures, &l.connections_rate_limited, &l.tls_handshake_failures, &l.accept_errors][i];
            o.sample(name, &[("protocol", "mqtt")], v.load(Ordering::Relaxed));
        }
    }
    if let Some((k, groups)) = &src.kafka {
        o.one(
            "tributary_kafka_requests_total",
            "counter",
            "Kafka requests handled.",
            k.requests.load(Ordering::Relaxed),
        );
        o.one(
            "tributary_kafka_frames_reading",
            "gauge",
            "Kafka requests whose size was read and whose bytes have not all arrived yet.",
            k.frames_reading.load(Ordering::Relaxed),
        );
        o.one(
            "tributary_kafka_fetches_waiting",
            "gauge",
            "Kafka fetches parked in a long poll, waiting for data.",
            k.fetches_waiting.load(Ordering::Relaxed),
        );
        o.one(
            "tributary_kafka_fetch_partition_reads_total",
            "counter",
            "Partitions Kafka fetches read from the store (none past a response's byte limit).",
            k.fetch_partition_reads.load(Ordering::Relaxed),
        );
        o.family("tributary_group_lag", "gauge", "Records between a group's committed offset and the high watermark.");
        for (group, _, _) in groups.list() {
            for l in groups.lag(&group).unwrap_or_default() {
                let p = l.partition.to_string();
                o.sample("tributary_group_lag", &[("group", &group), ("topic", &l.topic), ("partition", &p)], l.lag);
            }
        }
    }
    if let Some(m) = &src.mqtt {
        o.family("tributary_mqtt_messages_total", "counter", "MQTT PUBLISH packets, by direction.");
        o.sample("tributary_mqtt_messages_total", &[("direction", "in")], m.publishes_in.load(Ordering::Relaxed));
        o.sample("tributary_mqtt_messages_total", &[("direction", "out")], m.publishes_out.load(Ordering::Relaxed));
        o.family(
            "tributary_mqtt_acl_denials_total",
            "counter",
            "MQTT publishes and subscriptions refused by the user's (or anonymous) rules, and messages a subscription matched that mqtt.subscribe_deny kept from the subscriber.",
        );
        o.sample(
            "tributary_mqtt_acl_denials_total",
            &[("operation", "publish")],
            m.publishes_denied.load(Ordering::Relaxed),
        );
        o.sample(
            "tributary_mqtt_acl_denials_total",
            &[("operation", "subscribe")],
            m.subscriptions_denied.load(Ordering::Relaxed),
        );
        o.sample(
            "tributary_mqtt_acl_denials_total",
            &[("operation", "deliver")],
            m.deliveries_denied.load(Ordering::Relaxed),
        );
        o.one(
            "tributary_mqtt_reserved_topic_publishes_total",
            "counter",
            "MQTT publishes to '$' topics (the broker's), refused and dropped.",
            m.publishes_reserved.load(Ordering::Relaxed),
        );
        o.one(
            "tributary_mqtt_payload_format_invalid_total",
            "counter",
            "MQTT 5 publishes marked UTF-8 (Payload Format Indicator 1) whose payload is not, refused and dropped.",
            m.publishes_payload_invalid.load(Ordering::Relaxed),
        );
        o.one(
            "tributary_mqtt_retention_skipped_messages_total",
            "counter",
            "Messages a subscriber never got because retention deleted them first.",
            m.retention_skipped_messages.load(Ordering::Relaxed),
        );
        let limits: [(&str, &str, &str, u64); 4] = [
            (
                "tributary_mqtt_buffer_memory_bytes",
                "gauge",
                "Bytes of MQTT packets being read (bounded by mqtt.buffer_memory_bytes_max).",
                m.buffer_memory_bytes(),
            ),
            (
                "tributary_mqtt_retained_bytes",
                "gauge",
                "Bytes of retained MQTT messages (bounded by mqtt.retained_bytes_max).",
                m.retained_bytes.load(Ordering::Relaxed),
            ),
            (
                "tributary_mqtt_delayed_wills",
                "gauge",
                "MQTT wills waiting for their delay (bounded by mqtt.delayed_wills_max).",
                m.delayed_wills.load(Ordering::Relaxed),
            ),
            (
                "tributary_mqtt_client_ids_refused_total",
                "counter",
                "CONNECTs refused because the client id belongs to another user (mqtt.client_ids).",
                m.client_ids_refused.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, value) in limits {
            o.one(name, kind, help, value);
        }
    }
    if let Some(st) = &src.status {
        o.one(
            "tributary_status_auth_failures_total",
            "counter",
            "Status page logins refused (wrong credentials, or a user without the status right).",
            st.auth_failures.load(Ordering::Relaxed),
        );
        o.one(
            "tributary_status_plain_http_refused_total",
            "counter",
            "Status page requests over plain HTTP from other hosts, refused because TLS is configured.",
            st.plain_http_refused.load(Ordering::Relaxed),
        );
    }
    if let Some(m) = &src.mirror {
        o.one(
            "tributary_mirror_link_up",
            "gauge",
            "1 while the link to the cloud receiver is up.",
            u8::from(m.link_up.load(Ordering::Relaxed)),
        );
        o.one(
            "tributary_mirror_reconnects_total",
            "counter",
            "Mirror link losses.",
            m.reconnects.load(Ordering::Relaxed),
        );
        o.one(
            "tributary_mirror_batch_bytes_sent_total",
            "counter",
            "Stored batch bytes sent (compressed as stored).",
            m.batch_bytes_sent.load(Ordering::Relaxed),
        );
        o.one(
            "tributary_mirror_wire_bytes_sent_total",
            "counter",
            "UDP bytes sent by the mirror (QUIC, TLS, retransmissions).",
            m.wire_bytes_sent(),
        );
        o.one(
            "tributary_mirror_gaps_total",
            "counter",
            "Gaps: unmirrored ranges deleted by retention.",
            m.gaps.load(Ordering::Relaxed),
        );
        // Fresh data first (mirror.fresh_topics): the live streams' sends during a backlog.
        o.one(
            "tributary_mirror_live_batch_bytes_sent_total",
            "counter",
            "Stored batch bytes sent on live streams ({site}.{topic}.live: fresh records during a backlog).",
            m.live_batch_bytes_sent.load(Ordering::Relaxed),
        );
        o.one(
            "tributary_mirror_live_batches_sent_total",
            "counter",
            "Batches sent on live streams.",
            m.live_batches_sent.load(Ordering::Relaxed),
        );
        o.one(
            "tributary_mirror_live_seeks_total",
            "counter",
            "Times a live stream skipped to the records younger than mirror.fresh_age_ms.",
            m.live_seeks.load(Ordering::Relaxed),
        );
        o.one(
            "tributary_mirror_live_streams",
            "gauge",
            "Live streams running now.",
            m.live_streams.load(Ordering::Relaxed),
        );
        // Latest-first catch-up (mirror.latest_first_topics): the backlog's compacted view.
        o.one(
            "tributary_mirror_latest_views_started_total",
            "counter",
            "Latest-first views started (a compacted topic's backlog seen on a live stream).",
            m.latest_views_started.load(Ordering::Relaxed),
        );
        o.one(
            "tributary_mirror_latest_views_done_total",
            "counter",
            "Latest-first views finished (their last record sent).",
            m.latest_views_done.load(Ordering::Relaxed),
        );
        o.one(
            "tributary_mirror_latest_views_running",
            "gauge",
            "Latest-first views running now (at most mirror.latest_first_views_max; the others wait).",
            m.latest_views_running.load(Ordering::Relaxed),
        );
        o.one(
            "tributary_mirror_latest_view_windows_total",
            "counter",
            "Windows of finished views (more than one each when the keys overflow mirror.latest_first_map_bytes_max).",
            m.latest_view_windows.load(Ordering::Relaxed),
        );
        o.one(
            "tributary_mirror_latest_view_keys_total",
            "counter",
            "Keys mapped by finished views, summed over their windows.",
            m.latest_view_keys.load(Ordering::Relaxed),
        );
        o.one(
            "tributary_mirror_latest_view_records_sent_total",
            "counter",
            "Records sent by latest-first views (the latest per key of a backlog) to {site}.{topic}.live.",
            m.latest_view_records_sent.load(Ordering::Relaxed),
        );
        o.one(
            "tributary_mirror_latest_view_bytes_sent_total",
            "counter",
            "Batch bytes sent by latest-first views (also in the live batch bytes).",
            m.latest_view_bytes_sent.load(Ordering::Relaxed),
        );
        o.one(
            "tributary_mirror_latest_view_time_to_current_ms",
            "gauge",
            "The last finished view: ms from the backlog seen to its last record sent (the preview then holds the current state).",
            m.latest_view_last_ms.load(Ordering::Relaxed),
        );
        // Backfill requests (`tributary mirror backfill`): one sample per request kept.
        o.one(
            "tributary_mirror_backfill_batch_bytes_sent_total",
            "counter",
            "Stored batch bytes sent by backfills.",
            m.backfills.batch_bytes_sent.load(Ordering::Relaxed),
        );
        let backfills = m.backfills.status();
        let fams = [
            (
                "tributary_mirror_backfill_records",
                "Records a backfill request sends (its range, less what the centre held already).",
            ),
            ("tributary_mirror_backfill_sent_records", "Records of a backfill request the central cluster holds."),
            (
                "tributary_mirror_backfill_below_records",
                "Records of a backfill request below what the centre held already: not sent.",
            ),
            (
                "tributary_mirror_backfill_deleted_records",
                "Records of a backfill request that retention deleted before they were sent: never sent.",
            ),
        ];
        for (i, (name, help)) in fams.iter().enumerate() {
            o.family(name, "gauge", help);
            for b in &backfills {
                let (id, from, to) = (b.id.to_string(), b.from_ms.to_string(), b.to_ms.to_string());
                let state = b.refused.as_deref().map_or_else(|| "accepted".to_string(), |r| format!("refused: {r}"));
                let labels = [
                    ("request", id.as_str()),
                    ("topic", &b.topic),
                    ("from_ms", &from),
                    ("to_ms", &to),
                    ("state", &state),
                ];
                o.sample(name, &labels, [b.total, b.sent, b.below, b.deleted][i]);
            }
        }
        let (tracked, unsent) = m.commits.pending();
        o.one(
            "tributary_mirror_offsets_sent_total",
            "counter",
            "Committed consumer-group offsets sent to the cloud receiver (it writes them as checkpoints).",
            m.commits.sent.load(Ordering::Relaxed),
        );
        o.one(
            "tributary_mirror_offsets_pending",
            "gauge",
            "Committed offsets not yet sent (waiting for their records to be sent, or for the link).",
            unsent,
        );
        o.one(
            "tributary_mirror_offsets_tracked",
            "gauge",
            "Group-partitions whose committed offset is mirrored (mirror.offsets_tracked_max).",
            tracked,
        );
        o.one(
            "tributary_mirror_offsets_dropped_total",
            "counter",
            "Commits not mirrored: over mirror.offsets_tracked_max, or a group id too long.",
            m.commits.dropped.load(Ordering::Relaxed),
        );
        let lag = m.lag(store);
        let fams = [
            ("tributary_mirror_lag_records", "Records not yet in the central cluster."),
            ("tributary_mirror_lag_bytes", "Stored bytes not yet in the central cluster (estimated)."),
            ("tributary_mirror_oldest_unmirrored_age_seconds", "Age of the oldest record not yet mirrored."),
            ("tributary_mirror_mirrored_offset", "Offset below which a partition is in the central cluster."),
        ];
        for (i, (name, help)) in fams.iter().enumerate() {
            o.family(name, "gauge", help);
            for l in &lag {
                let p = l.partition.to_string();
                let v = [
                    l.lag_records as f64,
                    l.lag_bytes as f64,
                    l.oldest_unmirrored_age_ms as f64 / 1000.0,
                    l.mirrored as f64,
                ][i];
                o.sample(name, &[("topic", &l.topic), ("partition", &p)], v);
            }
        }
        // The drain estimate over mirror.drain_window_ms: a sample per topic, and one without
        // labels for all topics together (a total ETA is not derivable from the topics' ETAs:
        // they share one link). No ETA sample while a backlog does not shrink.
        let drain = m.drain();
        let fams = [
            ("tributary_mirror_drain_records_per_second", "Records mirrored per second over mirror.drain_window_ms (per topic; unlabelled: all topics)."),
            (
                "tributary_mirror_drain_shrink_records_per_second",
                "Records per second the backlog shrank by over mirror.drain_window_ms: sent minus arrived, negative when it grew (per topic; unlabelled: all topics).",
            ),
            (
                "tributary_mirror_drain_eta_seconds",
                "Seconds until the backlog is mirrored at its shrink rate, absent while it does not shrink (per topic; unlabelled: all topics).",
            ),
        ];
        for (i, (name, help)) in fams.iter().enumerate() {
            o.family(name, "gauge", help);
            let pick = |e: &tributary_sync::drain::DrainEstimate| {
                [Some(e.sent_records_per_s), Some(e.shrink_records_per_s), e.eta_s][i]
            };
            for (topic, e) in &drain.topics {
                if let Some(v) = pick(e) {
                    o.sample(name, &[("topic", topic)], v);
                }
            }
            if let Some(v) = pick(&drain.total) {
                o.sample(name, &[], v);
            }
        }
    }
    aggregates(&mut o, &src.aggregates);
    o.0
}

/// The first byte of a TLS record carrying a handshake message (RFC 8446 5.1): what a client
/// speaking https sends first. No HTTP request starts with it.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Serves GET /metrics (and the status page's routes with `status`) until `shutdown` resolves;
/// with `tls`, connections that open with a TLS handshake are served over TLS.
/// Per derived topic: records in, skipped by cause, windows open, results out.
fn aggregates(o: &mut Out, aggs: &[Arc<AggregateStats>]) {
    if aggs.is_empty() {
        return;
    }
    type Read = fn(&AggregateStats) -> u64;
    let fams: [(&str, &str, &str, Read); 4] = [
        ("tributary_aggregate_records_in_total", "counter", "Source records an aggregator read.", |a| {
            a.records_in.load(Ordering::Relaxed)
        }),
        ("tributary_aggregate_windows_open", "gauge", "Windows open (keys x windows).", |a| {
            a.windows_open.load(Ordering::Relaxed)
        }),
        ("tributary_aggregate_results_out_total", "counter", "Window results appended to the derived topic.", |a| {
            a.results_out.load(Ordering::Relaxed)
        }),
        ("tributary_aggregate_skipped_retention_total", "counter", "Source offsets retention removed unread.", |a| {
            a.skipped_retention.load(Ordering::Relaxed)
        }),
    ];
    for (name, kind, help, read) in fams {
        o.family(name, kind, help);
        for a in aggs {
            o.sample(name, &[("derived", &a.derived), ("source", &a.source)], read(a));
        }
    }
    let name = "tributary_aggregate_skipped_total";
    o.family(
        name,
        "counter",
        "Source records skipped: invalid (not a JSON object, fields missing), late, windows full.",
    );
    for a in aggs {
        for (reason, v) in
            [("invalid", &a.skipped_invalid), ("late", &a.skipped_late), ("windows_full", &a.skipped_windows_full)]
        {
            o.sample(
                name,
                &[("derived", &a.derived), ("source", &a.source), ("reason", reason)],
                v.load(Ordering::Relaxed),
            );
        }
    }
}

/// Serves GET /metrics until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    cfg: MetricsConfig,
    src: Sources,
    status: Option<crate::status::Status>,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(cfg.connections_max as usize));
    let status = Arc::new(status);
    tokio::pin!(shutdown);
    loop {
        // A slot first: over `connections_max`, connections wait in the kernel's backlog.
        let permit = tokio::select! {
            () = &mut shutdown => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (mut stream, peer) = tokio::select! {
            () = &mut shutdown => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
        };
        let (src, status, cfg, tls) = (src.clone(), status.clone(), cfg.clone(), tls.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let deadline = Duration::from_millis(cfg.request_timeout_ms);
            let status = status.as_ref().as_ref();
            // The handshake counts against the same deadline as the request.
            let _ = tokio::time::timeout(deadline, async {
                let mut first = [0u8; 1];
                match tls {
                    Some(tls) if stream.peek(&mut first).await? == 1 && first[0] == TLS_HANDSHAKE_RECORD => {
                        let mut stream = tokio_rustls::TlsAcceptor::from(tls).accept(stream).await?;
                        answer(&mut stream, peer, true, &cfg, &src, status).await?;
                        tokio::io::AsyncWriteExt::shutdown(&mut stream).await
                    }
                    _ => answer(&mut stream, peer, false, &cfg, &src, status).await,
                }
            })
            .await;
        });
    }
}

/// One request on `stream` (over TLS when `secure`) and its answer.
async fn answer<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    peer: std::net::SocketAddr,
    secure: bool,
    cfg: &MetricsConfig,
    src: &Sources,
    status: Option<&crate::status::Status>,
) -> std::io::Result<()> {
    use crate::http::{read_request, HeadError, ReadError, Response};
    let req = match read_request(stream, cfg.request_head_bytes_max as usize).await {
        Ok(req) => req,
        Err(ReadError::Head(HeadError::TooLarge(_))) => {
            return Response::text("431 Request Header Fields Too Large", "request head too large\n").send(stream).await
        }
        Err(ReadError::Head(HeadError::Malformed(_))) => {
            return Response::text("400 Bad Request", "malformed request\n").send(stream).await
        }
        Err(ReadError::Closed) => return Ok(()),
        Err(ReadError::Io(e)) => return Err(e),
    };
    let resp = match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/metrics") => {
            let src = src.clone();
            let body = tokio::task::spawn_blocking(move || render(&src)).await.unwrap_or_default();
            Response::new("200 OK", "text/plain; version=0.0.4; charset=utf-8", body)
        }
        ("GET", path) => match status {
            Some(status) if crate::status::Status::route(path) => status.answer(&req, peer, secure, src).await,
            _ => Response::text("404 Not Found", "try /metrics\n"),
        },
        _ => Response::text("405 Method Not Allowed", "GET only\n").with("Allow", "GET"),
    };
    resp.send(stream).await
}

/// The `$SYS/broker/...` subset: (topic, value) pairs, the way mosquitto names them where it has
/// the same figure.
pub fn sys_values(src: &Sources, uptime: Duration) -> Vec<(&'static str, String)> {
    let s = src.store.stats();
    let mut v = vec![
        ("$SYS/broker/version", format!("tributary {}", env!("CARGO_PKG_VERSION"))),
        ("$SYS/broker/uptime", format!("{} seconds", uptime.as_secs())),
        ("$SYS/broker/store/records", s.appended_records.to_string()),
        ("$SYS/broker/store/bytes", s.footprint_bytes.to_string()),
        ("$SYS/broker/store/budget", src.store.config().max_bytes.to_string()),
    ];
    if let Some(m) = &src.mqtt {
        v.push(("$SYS/broker/clients/connected", m.listener.connections_open.load(Ordering::Relaxed).to_string()));
        v.push(("$SYS/broker/messages/received", m.publishes_in.load(Ordering::Relaxed).to_string()));
        v.push(("$SYS/broker/messages/sent", m.publishes_out.load(Ordering::Relaxed).to_string()));
        v.push(("$SYS/broker/bytes/received", m.bytes_in.load(Ordering::Relaxed).to_string()));
        v.push(("$SYS/broker/bytes/sent", m.bytes_out.load(Ordering::Relaxed).to_string()));
    }
    if let Some(m) = &src.mirror {
        let lag: i64 = m.lag(&src.store).iter().map(|l| l.lag_records).sum();
        v.push(("$SYS/broker/mirror/link", if m.link_up.load(Ordering::Relaxed) { "up" } else { "down" }.into()));
        v.push(("$SYS/broker/mirror/lag/records", lag.to_string()));
        let drain = m.drain().total;
        v.push(("$SYS/broker/mirror/backlog/bytes", drain.backlog_bytes.to_string()));
        v.push(("$SYS/broker/mirror/drain/rate", format!("{:.1} records/s", drain.sent_records_per_s)));
        v.push((
            "$SYS/broker/mirror/drain/eta",
            drain.eta_s.map_or_else(|| "not draining".to_string(), |s| format!("{} seconds", s.ceil() as u64)),
        ));
    }
    v
}

/// Publishes the `$SYS` subset every `interval` until `shutdown` resolves.
pub async fn publish_sys(
    sys: tributary_broker::mqtt::SysPublisher,
    src: Sources,
    interval: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let started = std::time::Instant::now();
    let mut tick = tokio::time::interval(interval);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = tick.tick() => {}
        }
        let src2 = src.clone();
        let values = match tokio::task::spawn_blocking(move || sys_values(&src2, started.elapsed())).await {
            Ok(v) => v,
            Err(_) => continue,
        };
        for (topic, value) in values {
            if let Err(e) = sys.publish(topic, value.into_bytes()).await {
                tracing::warn!(error = %e, topic, "$SYS message not stored");
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A metrics listener on a free port serving an empty store, with `cfg`'s limits.
    async fn listener(cfg: MetricsConfig) -> (std::net::SocketAddr, tempfile::TempDir) {
        listener_with(cfg, None, None).await
    }

    async fn listener_with(
        cfg: MetricsConfig,
        status: Option<crate::status::Status>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> (std::net::SocketAddr, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = tributary_broker::StorageConfig {
            data_dir: dir.path().into(),
            disk_free_bytes_min: 0,
            ..Default::default()
        };
        let (store, _) = Store::open(storage).expect("open");
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let src = Sources::store_only(store);
        tokio::spawn(serve(l, cfg, src, status, tls, std::future::pending()));
        (addr, dir)
    }

    /// With a certificate, one port speaks both: a connection opening with a TLS handshake gets
    /// the page and the metrics over TLS (verified against the CA), any other plain HTTP.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn https_and_plain_http_are_served_on_one_port() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let pki = tempfile::tempdir().expect("tempdir");
        let ca = tributary_sync::certs::new_ca("test CA", 1).expect("ca");
        let server = tributary_sync::certs::server_cert(&ca, &["localhost".to_string()], 1).expect("server cert");
        server.write(pki.path(), "server").expect("write");
        let (cert_file, key_file) = (pki.path().join("server.pem"), pki.path().join("server.key"));
        let tls = tributary_broker::security::tls::server_config(tributary_broker::security::tls::TlsFiles {
            prefix: "mqtt.tls",
            cert_file: &cert_file.display().to_string(),
            key_file: &key_file.display().to_string(),
            client_ca_file: "",
        })
        .expect("tls");
        let status = crate::status::Status::new(
            crate::status::StatusConfig::default(),
            tributary_broker::security::Auth::disabled(),
            true,
        );
        let (addr, _dir) = listener_with(MetricsConfig::default(), Some(status), Some(tls)).await;

        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject as _;
        roots
            .add(rustls::pki_types::CertificateDer::from_pem_slice(ca.cert.as_bytes()).expect("ca pem"))
            .expect("root");
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        for path in ["/api/status", "/metrics"] {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            let mut tls = connector.connect(name, tcp).await.expect("TLS handshake on the metrics port");
            tls.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes()).await.expect("write");
            let mut out = Vec::new();
            let _ = tls.read_to_end(&mut out).await;
            let answer = String::from_utf8_lossy(&out);
            assert!(answer.starts_with("HTTP/1.1 200 "), "over TLS {path}: {answer}");
        }
        let (answer, _) =
            tokio::task::spawn_blocking(move || raw(addr, b"GET /metrics HTTP/1.1\r\n\r\n")).await.expect("task");
        assert!(answer.starts_with("HTTP/1.1 200 ") && answer.contains("tributary_build_info"), "{answer}");
    }

    /// Sends `bytes` on a raw socket, then reads until the server closes; the answer and how
    /// long the server took to close.
    fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> (String, Duration) {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let started = std::time::Instant::now();
        // The server may close before it read everything (an oversized head): ignore a reset.
        let _ = s.write_all(bytes);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        (String::from_utf8_lossy(&out).into_owned(), started.elapsed())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_oversized_request_head_is_answered_431_without_reading_it_all() {
        let cfg = MetricsConfig { request_head_bytes_max: 1024, ..MetricsConfig::default() };
        let (addr, _dir) = listener(cfg).await;
        // Ended past the limit, and not ended at all (the client keeps its socket open): both
        // answered at once, long before the 10 s request deadline.
        for end in ["\r\n\r\n", ""] {
            let big = format!("GET /metrics HTTP/1.1\r\nX-Filler: {}{end}", "a".repeat(4096));
            let (answer, took) = tokio::task::spawn_blocking(move || raw(addr, big.as_bytes())).await.expect("task");
            assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
            assert!(took < Duration::from_secs(5), "answered after {took:?}");
        }
        // Within the limit, the same route answers.
        let (answer, _) =
            tokio::task::spawn_blocking(move || raw(addr, b"GET /metrics HTTP/1.1\r\n\r\n")).await.expect("task");
        assert!(answer.starts_with("HTTP/1.1 200 ") && answer.contains("tributary_build_info"), "{answer}");
        let (answer, _) =
            tokio::task::spawn_blocking(move || raw(addr, b"POST /metrics HTTP/1.1\r\n\r\n")).await.expect("task");
        assert!(answer.starts_with("HTTP/1.1 405 "), "{answer}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_request_is_closed_at_the_deadline_and_frees_its_slot() {
        let cfg = MetricsConfig { request_timeout_ms: 300, connections_max: 1, ..MetricsConfig::default() };
        let (addr, _dir) = listener(cfg).await;
        // Half a request line, then nothing: the only slot is taken until the deadline.
        let slow = tokio::task::spawn_blocking(move || raw(addr, b"GET /metr"));
        let (answer, took) = slow.await.expect("task");
        assert_eq!(answer, "", "closed without an answer");
        assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(10), "closed after {took:?}");
        // The slot is free again: a whole request is answered.
        let (answer, _) =
            tokio::task::spawn_blocking(move || raw(addr, b"GET /metrics HTTP/1.1\r\n\r\n")).await.expect("task");
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    }
}
