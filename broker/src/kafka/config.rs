//! Settings of the Kafka listener (`[kafka]` in the gateway's TOML): address, what clients are
//! told to connect to, and the limits that bound each connection's and the listener's memory.

use serde::{Deserialize, Serialize};

use crate::config::{check_range, ConfigError};

const MIB: u64 = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Serve the Kafka protocol at all.
    pub enabled: bool,
    /// Address and port to listen on (`127.0.0.1:9092` by default: local clients only).
    pub listen: String,
    /// Host clients are told to connect to (in Metadata); empty = the listen address, or this
    /// machine's hostname when listening on all interfaces. Set it behind NAT or in containers.
    pub advertised_host: String,
    /// Port clients are told to connect to; 0 = the port actually listened on.
    pub advertised_port: u16,
    /// This broker's node id in Metadata.
    pub node_id: i32,
    /// Open connections; more are accepted and closed at once with a warning.
    pub connections_max: u32,
    /// Largest request accepted (the size prefix is checked before anything is buffered).
    pub frame_bytes_max: u32,
    /// Largest request before a connection has logged in (with `[auth]` on): ApiVersions,
    /// SaslHandshake, SaslAuthenticate and bare SASL tokens are a few hundred bytes, so a client
    /// that has not logged in cannot make the gateway buffer more than this.
    pub login_frame_bytes_max: u32,
    /// With `[auth]` on, a connection must have logged in this long after it was accepted (its
    /// TLS handshake, requests and half-sent frames included); otherwise it is closed.
    pub login_timeout_ms: u64,
    /// A request must arrive whole this long after its size prefix. Its buffer (and its share of
    /// `buffer_memory_bytes_max`) grows only as its bytes arrive, so a request stalled half-way
    /// holds at most about twice what it sent, and for at most this long.
    pub frame_read_timeout_ms: u64,
    /// Array elements (topics, partitions, groups, members, configs...) in one request, all
    /// arrays together. Counts are otherwise only checked against the frame's bytes, and the
    /// decoded form (and the response) of a tiny element is many times its wire size.
    pub request_elements_max: u32,
    /// Requests of one connection being processed at once (pipelining); further requests wait in
    /// the socket (TCP backpressure).
    pub inflight_requests_max: u32,
    /// Bytes of requests being processed plus fetch responses being built, over all connections.
    pub buffer_memory_bytes_max: u64,
    /// Upper bound of one fetch response whatever the client asks for.
    pub fetch_response_bytes_max: u32,
    /// Longest long-poll of a fetch whatever the client asks for.
    pub fetch_wait_max_ms: u32,
    /// Connections without a request for this long are closed.
    pub idle_timeout_ms: u64,
    /// Create a topic (with `[topic_defaults]`) when a client asks for metadata of a missing one.
    pub auto_create_topics: bool,
    /// Consumer groups held in memory (with members, or with committed offsets).
    pub groups_max: u32,
    /// Members of one group.
    pub group_members_max: u32,
    /// Protocol metadata (JoinGroup, all protocols together) plus assignment (SyncGroup) one
    /// member may have the coordinator hold for its whole membership; larger joins are refused.
    pub group_member_metadata_bytes_max: u32,
    /// The same, over all members of all groups together; joins beyond are refused.
    pub groups_metadata_bytes_max: u64,
    /// Session timeouts clients may ask for (Kafka's group.min/max.session.timeout.ms).
    pub group_session_timeout_min_ms: u32,
    pub group_session_timeout_max_ms: u32,
    /// Kafka's `group.initial.rebalance.delay.ms`: the first join of an empty group waits this
    /// long for more members (again for each new one, up to the rebalance timeout), so
    /// consumers starting together get one generation instead of a rebalance each. 0 = off.
    pub group_initial_rebalance_delay_ms: u32,
    /// Longest metadata string stored with a committed offset (Kafka's offset.metadata.max.bytes).
    pub offset_metadata_bytes_max: u32,
    /// New connections one source address may open per second (a burst of one second's worth);
    /// more are closed at once. 0 = no limit.
    pub connections_per_ip_per_s_max: u32,
    /// Source addresses the rate limit tracks at once (the least recently seen is forgotten).
    pub connection_rate_addresses_max: u32,
    /// `[kafka.tls]`: the listener speaks TLS (clients use SSL, or SASL_SSL with `[auth]`).
    pub tls: KafkaTlsConfig,
}

/// `[kafka.tls]`: TLS on the Kafka listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaTlsConfig {
    pub enabled: bool,
    /// The server's certificate chain and private key (PEM).
    pub cert_file: String,
    pub key_file: String,
}

impl Default for KafkaTlsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            cert_file: "/etc/tributary/tls/server.pem".into(),
            key_file: "/etc/tributary/tls/server.key".into(),
        }
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:9092".into(),
            advertised_host: String::new(),
            advertised_port: 0,
            node_id: 1,
            connections_max: 256,
            frame_bytes_max: 8 * MIB as u32,
            login_frame_bytes_max: 8 * 1024,
            login_timeout_ms: 10_000,
            frame_read_timeout_ms: 30_000,
            request_elements_max: 10_000,
            inflight_requests_max: 8,
            buffer_memory_bytes_max: 64 * MIB,
            fetch_response_bytes_max: 8 * MIB as u32,
            fetch_wait_max_ms: 30_000,
            idle_timeout_ms: 600_000,
            auto_create_topics: true,
            groups_max: 1000,
            group_members_max: 100,
            group_member_metadata_bytes_max: 256 * 1024,
            groups_metadata_bytes_max: 16 * MIB,
            group_session_timeout_min_ms: 6000,
            group_session_timeout_max_ms: 1_800_000,
            group_initial_rebalance_delay_ms: 3000,
            offset_metadata_bytes_max: 4096,
            connections_per_ip_per_s_max: 0,
            connection_rate_addresses_max: 4096,
            tls: KafkaTlsConfig::default(),
        }
    }
}

impl KafkaConfig {
    /// Checks every value; `prefix` is the TOML table (e.g. `kafka`).
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{prefix}.{k}");
        let range = |k: &str, v: u64, lo: u64, hi: u64| check_range(&key(k), v, lo, hi);
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::new(
                key("listen"),
                format!("must be an IP address and port such as 127.0.0.1:9092 (got {:?})", self.listen),
            ));
        }
        if self.advertised_host.chars().any(|c| c.is_whitespace() || c == '/') {
            return Err(ConfigError::new(key("advertised_host"), "must be a host name or IP address"));
        }
        if self.node_id < 0 {
            return Err(ConfigError::new(key("node_id"), format!("must not be negative (got {})", self.node_id)));
        }
        range("connections_max", self.connections_max.into(), 1, 100_000)?;
        range("frame_bytes_max", self.frame_bytes_max.into(), 64 * 1024, 1024 * MIB)?;
        range("login_frame_bytes_max", self.login_frame_bytes_max.into(), 512, self.frame_bytes_max.into())?;
        range("login_timeout_ms", self.login_timeout_ms, 100, 3_600_000)?;
        range("frame_read_timeout_ms", self.frame_read_timeout_ms, 100, 3_600_000)?;
        range("request_elements_max", self.request_elements_max.into(), 16, 10_000_000)?;
        range("inflight_requests_max", self.inflight_requests_max.into(), 1, 1024)?;
        range("buffer_memory_bytes_max", self.buffer_memory_bytes_max, self.frame_bytes_max.into(), 64 * 1024 * MIB)?;
        range("fetch_response_bytes_max", self.fetch_response_bytes_max.into(), 64 * 1024, 1024 * MIB)?;
        range("fetch_wait_max_ms", self.fetch_wait_max_ms.into(), 0, 600_000)?;
        range("idle_timeout_ms", self.idle_timeout_ms, 1000, 7 * 24 * 3_600_000)?;
        range("groups_max", self.groups_max.into(), 1, 1_000_000)?;
        range("group_members_max", self.group_members_max.into(), 1, 100_000)?;
        range("group_member_metadata_bytes_max", self.group_member_metadata_bytes_max.into(), 1024, 1024 * MIB)?;
        range(
            "groups_metadata_bytes_max",
            self.groups_metadata_bytes_max,
            self.group_member_metadata_bytes_max.into(),
            64 * 1024 * MIB,
        )?;
        range("group_session_timeout_min_ms", self.group_session_timeout_min_ms.into(), 100, 3_600_000)?;
        range(
            "group_session_timeout_max_ms",
            self.group_session_timeout_max_ms.into(),
            self.group_session_timeout_min_ms.into(),
            3_600_000,
        )?;
        range("group_initial_rebalance_delay_ms", self.group_initial_rebalance_delay_ms.into(), 0, 300_000)?;
        range("offset_metadata_bytes_max", self.offset_metadata_bytes_max.into(), 0, 1024 * 1024)?;
        range("connections_per_ip_per_s_max", self.connections_per_ip_per_s_max.into(), 0, 1_000_000)?;
        range("connection_rate_addresses_max", self.connection_rate_addresses_max.into(), 1, 1_000_000)?;
        if self.tls.enabled {
            for (k, v) in [("tls.cert_file", &self.tls.cert_file), ("tls.key_file", &self.tls.key_file)] {
                if v.is_empty() {
                    return Err(ConfigError::new(key(k), "must name a PEM file when TLS is enabled"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_errors_name_the_key() {
        KafkaConfig::default().validate("kafka").unwrap();
        let c = KafkaConfig { listen: "nowhere".into(), ..Default::default() };
        assert_eq!(c.validate("kafka").unwrap_err().key, "kafka.listen");
        let c = KafkaConfig { buffer_memory_bytes_max: 1, ..Default::default() };
        assert_eq!(c.validate("kafka").unwrap_err().key, "kafka.buffer_memory_bytes_max");
        let c = KafkaConfig { inflight_requests_max: 0, ..Default::default() };
        assert_eq!(c.validate("kafka").unwrap_err().key, "kafka.inflight_requests_max");
        let c = KafkaConfig { login_frame_bytes_max: 10, ..Default::default() };
        assert_eq!(c.validate("kafka").unwrap_err().key, "kafka.login_frame_bytes_max");
        let c = KafkaConfig { request_elements_max: 0, ..Default::default() };
        assert_eq!(c.validate("kafka").unwrap_err().key, "kafka.request_elements_max");
        let c = KafkaConfig { groups_metadata_bytes_max: 1024, ..Default::default() };
        assert_eq!(c.validate("kafka").unwrap_err().key, "kafka.groups_metadata_bytes_max");
        let c = KafkaConfig { group_initial_rebalance_delay_ms: 300_001, ..Default::default() };
        assert_eq!(c.validate("kafka").unwrap_err().key, "kafka.group_initial_rebalance_delay_ms");
        assert_eq!(KafkaConfig::default().group_initial_rebalance_delay_ms, 3000, "Kafka's default");
        let tls = KafkaTlsConfig { enabled: true, cert_file: String::new(), ..Default::default() };
        let c = KafkaConfig { tls, ..Default::default() };
        assert_eq!(c.validate("kafka").unwrap_err().key, "kafka.tls.cert_file");
    }
}
