//! Settings of the MQTT listener (`[mqtt]` in the gateway's TOML): address, limits that bound
//! each connection, and the routes from MQTT topics to log topics.

use serde::{Deserialize, Serialize};

use super::routes::{default_key, Route, Router};
use crate::config::{check_range, ConfigError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Serve MQTT 3.1.1 and 5 at all.
    pub enabled: bool,
    /// Address and port (`127.0.0.1:1883` by default: local clients only).
    pub listen: String,
    /// Open connections; more are refused (CONNACK "server unavailable") and closed.
    pub connections_max: u32,
    /// Largest packet accepted (checked on the fixed header, before the packet is read).
    pub packet_bytes_max: u32,
    /// Memory for packets being read, all connections together: a packet's bytes are charged
    /// as they arrive (never the length a header announces), so half-sent packets cannot exhaust
    /// memory. A reader that finds it exhausted waits up to `connect_timeout_ms`, then its
    /// connection is closed. At least twice `packet_bytes_max` (a growing buffer is copied into
    /// its larger successor, and both are charged meanwhile).
    pub buffer_memory_bytes_max: u64,
    /// Bytes waiting for one client's socket before its session stops to write them (and to
    /// read, deliver or answer) until the client has read some: what a client that does not read
    /// can hold of the broker's memory, per connection.
    pub write_ahead_bytes_max: u64,
    /// QoS 1/2 messages a client may have unacknowledged towards us (MQTT 5 Receive Maximum) and
    /// we towards it.
    pub inflight_messages_max: u16,
    /// Subscriptions one client may hold.
    pub subscriptions_per_client_max: u32,
    /// Longest topic name or filter, in bytes, and most levels in one.
    pub topic_bytes_max: u32,
    pub topic_levels_max: u32,
    /// Longest client identifier.
    pub client_id_bytes_max: u32,
    /// A connection must send CONNECT within this time.
    pub connect_timeout_ms: u64,
    /// Retained messages kept (one per topic); a new retained topic beyond it is refused. Their
    /// topics are indexed in memory (about topic length + 80 bytes each); at start-up no more
    /// are read back from the `mqtt.retained` topic.
    pub retained_messages_max: u32,
    /// Bytes of retained messages kept (each record's topic, payload and headers); a retained
    /// publish that would pass it is refused. At most a quarter of `storage.max_bytes`, so retained
    /// messages (which the disk budget counts but never deletes) cannot crowd out the logs.
    pub retained_bytes_max: u64,
    /// Retained messages this server cleared (an empty retained payload, an expiry) whose
    /// tombstones are written, remembered until the retained topic's follower read past them so
    /// that it does not bring back an older message; beyond it the oldest are forgotten (a new
    /// subscriber may then get the older message until the follower passes the tombstone).
    pub retained_clears_max: u32,
    /// MQTT 5 wills waiting for their Will Delay Interval, and their bytes (topic and payload),
    /// all clients together. A will beyond either is published at once instead of late.
    pub delayed_wills_max: u32,
    pub delayed_will_bytes_max: u64,
    /// MQTT 5 Server Keep Alive (seconds) announced in CONNACK: the keep-alive every MQTT 5
    /// client then uses (and the server enforces, at 1.5 times). 0 = the client's own.
    pub server_keep_alive_s: u16,
    /// Topic aliases the server assigns per MQTT 5 connection to its own PUBLISHes (within the
    /// client's Topic Alias Maximum), so a repeated topic is sent as two bytes. 0 = none.
    pub topic_aliases_out_max: u16,
    /// How often expired persistent sessions are deleted from the store (with their QoS 2
    /// packet ids), and shared-subscription positions no unexpired session stored.
    pub session_sweep_interval_ms: u64,
    /// Deliver a message to subscribers while its commit is being written (it is applied and
    /// has its offset; its publisher's PUBACK/PUBREC still waits for the commit, fsync
    /// included): delivery then does not wait for the disk. If the commit fails, subscribers
    /// got a message its publisher was refused (and the offset is skipped, never reused); a
    /// power cut may likewise lose a delivered message its publisher will resend. Deliveries at
    /// QoS 2 always wait for the commit (exactly once holds across a crash); shared
    /// subscriptions and Kafka consumers always read committed records. `false`: every
    /// delivery waits for the commit.
    pub deliver_before_commit: bool,
    /// Log topic of publishes no route matches.
    pub default_topic: String,
    /// Key template of those publishes (see `routes`).
    pub default_key: String,
    /// `[[mqtt.routes]]`: the first route whose filter matches a publish's topic decides where it
    /// is stored.
    pub routes: Vec<Route>,
    /// New connections one source address may open per second (a burst of one second's worth);
    /// more are closed at once. 0 = no limit.
    pub connections_per_ip_per_s_max: u32,
    /// Source addresses the rate limit tracks at once (the least recently seen is forgotten).
    pub connection_rate_addresses_max: u32,
    /// MQTT over WebSocket (subprotocol `mqtt`, RFC 6455), for browser dashboards and field
    /// tools: its address (`127.0.0.1:8083` by default: local only, like `listen`); empty = none.
    pub websocket_listen: String,
    /// MQTT over secure WebSocket (wss) with the certificate, key and client CA of `[mqtt.tls]`
    /// (whether or not its own listener is enabled); empty (the default) = none.
    pub websocket_tls_listen: String,
    /// Largest WebSocket upgrade request (request line and headers, cookies included), read
    /// within `connect_timeout_ms` of the accept; a longer one is refused with 431.
    pub websocket_request_bytes_max: u32,
    /// `[mqtt.tls]`: a second listener speaking MQTT over TLS.
    pub tls: MqttTlsConfig,
}

/// `[mqtt.tls]`: MQTT over TLS (port 8883), beside the plain listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttTlsConfig {
    pub enabled: bool,
    pub listen: String,
    /// The server's certificate chain and private key (PEM).
    pub cert_file: String,
    pub key_file: String,
    /// CA of device certificates (PEM); empty = no client certificates. A device with a valid
    /// certificate is the user its certificate names (common name, else first DNS name).
    pub client_ca_file: String,
}

impl Default for MqttTlsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: "127.0.0.1:8883".into(),
            cert_file: "/etc/tributary/tls/server.pem".into(),
            key_file: "/etc/tributary/tls/server.key".into(),
            client_ca_file: String::new(),
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:1883".into(),
            connections_max: 1024,
            packet_bytes_max: 1024 * 1024,
            buffer_memory_bytes_max: 16 * 1024 * 1024,
            write_ahead_bytes_max: 64 * 1024,
            inflight_messages_max: 64,
            subscriptions_per_client_max: 64,
            topic_bytes_max: 256,
            topic_levels_max: 16,
            client_id_bytes_max: 128,
            connect_timeout_ms: 10_000,
            retained_messages_max: 10_000,
            retained_bytes_max: 64 * 1024 * 1024,
            retained_clears_max: 4096,
            delayed_wills_max: 10_000,
            delayed_will_bytes_max: 16 * 1024 * 1024,
            session_sweep_interval_ms: 60_000,
            server_keep_alive_s: 0,
            topic_aliases_out_max: 32,
            deliver_before_commit: true,
            default_topic: "mqtt".into(),
            default_key: default_key(),
            routes: Vec::new(),
            connections_per_ip_per_s_max: 0,
            connection_rate_addresses_max: 4096,
            websocket_listen: "127.0.0.1:8083".into(),
            websocket_tls_listen: String::new(),
            websocket_request_bytes_max: 8192,
            tls: MqttTlsConfig::default(),
        }
    }
}

impl MqttConfig {
    /// Checks every value; `prefix` is the TOML table (e.g. `mqtt`).
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{prefix}.{k}");
        let range = |k: &str, v: u64, lo: u64, hi: u64| check_range(&key(k), v, lo, hi);
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::new(
                key("listen"),
                format!("must be an IP address and port such as 127.0.0.1:1883 (got {:?})", self.listen),
            ));
        }
        range("connections_max", self.connections_max.into(), 1, 1_000_000)?;
        range("packet_bytes_max", self.packet_bytes_max.into(), 1024, 256 * 1024 * 1024 - 1)?;
        range("buffer_memory_bytes_max", self.buffer_memory_bytes_max, 2 * u64::from(self.packet_bytes_max), 1 << 36)?;
        range("write_ahead_bytes_max", self.write_ahead_bytes_max, 1024, 64 * 1024 * 1024)?;
        range("inflight_messages_max", self.inflight_messages_max.into(), 1, 65_535)?;
        range("subscriptions_per_client_max", self.subscriptions_per_client_max.into(), 1, 100_000)?;
        range("topic_bytes_max", self.topic_bytes_max.into(), 16, 65_535)?;
        range("topic_levels_max", self.topic_levels_max.into(), 1, 1024)?;
        range("client_id_bytes_max", self.client_id_bytes_max.into(), 23, 65_535)?;
        range("connect_timeout_ms", self.connect_timeout_ms, 100, 600_000)?;
        range("retained_messages_max", self.retained_messages_max.into(), 0, 1_000_000)?;
        range("retained_bytes_max", self.retained_bytes_max, 0, 1 << 50)?;
        range("retained_clears_max", self.retained_clears_max.into(), 1, 1_000_000)?;
        range("delayed_wills_max", self.delayed_wills_max.into(), 0, 1_000_000)?;
        range("delayed_will_bytes_max", self.delayed_will_bytes_max, 0, 1 << 32)?;
        range("session_sweep_interval_ms", self.session_sweep_interval_ms, 100, 86_400_000)?;
        range("server_keep_alive_s", self.server_keep_alive_s.into(), 0, 65_535)?;
        range("topic_aliases_out_max", self.topic_aliases_out_max.into(), 0, 1024)?;
        range("connections_per_ip_per_s_max", self.connections_per_ip_per_s_max.into(), 0, 1_000_000)?;
        range("connection_rate_addresses_max", self.connection_rate_addresses_max.into(), 1, 1_000_000)?;
        range("websocket_request_bytes_max", self.websocket_request_bytes_max.into(), 1024, 1024 * 1024)?;
        for (k, v) in
            [("websocket_listen", &self.websocket_listen), ("websocket_tls_listen", &self.websocket_tls_listen)]
        {
            if !v.is_empty() && v.parse::<std::net::SocketAddr>().is_err() {
                return Err(ConfigError::new(
                    key(k),
                    format!("must be empty (none) or an IP address and port such as 127.0.0.1:8083 (got {v:?})"),
                ));
            }
        }
        if !self.websocket_tls_listen.is_empty() {
            for k in ["tls.cert_file", "tls.key_file"] {
                let v = if k == "tls.cert_file" { &self.tls.cert_file } else { &self.tls.key_file };
                if v.is_empty() {
                    return Err(ConfigError::new(key(k), "must name a PEM file when websocket_tls_listen is set"));
                }
            }
        }
        if self.tls.enabled {
            if self.tls.listen.parse::<std::net::SocketAddr>().is_err() {
                return Err(ConfigError::new(
                    key("tls.listen"),
                    format!("must be an IP address and port such as 0.0.0.0:8883 (got {:?})", self.tls.listen),
                ));
            }
            for (k, v) in [("tls.cert_file", &self.tls.cert_file), ("tls.key_file", &self.tls.key_file)] {
                if v.is_empty() {
                    return Err(ConfigError::new(key(k), "must name a PEM file when TLS is enabled"));
                }
            }
        }
        self.router(prefix)?;
        Ok(())
    }

    /// Checks the limits that depend on the store's settings (at gateway start-up, and when
    /// the listener binds): retained messages get at most a quarter of `storage.max_bytes`.
    pub fn validate_with_storage(
        &self,
        prefix: &str,
        storage: &crate::config::StorageConfig,
    ) -> Result<(), ConfigError> {
        let quarter = storage.max_bytes / 4;
        if self.retained_bytes_max > quarter {
            return Err(ConfigError::new(
                format!("{prefix}.retained_bytes_max"),
                format!(
                    "must be at most a quarter of storage.max_bytes = {} ({quarter}) (got {})",
                    storage.max_bytes, self.retained_bytes_max
                ),
            ));
        }
        Ok(())
    }

    /// The compiled routing table.
    pub fn router(&self, prefix: &str) -> Result<Router, ConfigError> {
        Router::new(&self.routes, &self.default_topic, &self.default_key, prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_errors_name_the_key() {
        MqttConfig::default().validate("mqtt").expect("defaults");
        let c = MqttConfig { listen: "anywhere".into(), ..Default::default() };
        assert_eq!(c.validate("mqtt").expect_err("bad").key, "mqtt.listen");
        let c = MqttConfig { inflight_messages_max: 0, ..Default::default() };
        assert_eq!(c.validate("mqtt").expect_err("bad").key, "mqtt.inflight_messages_max");
        let c = MqttConfig { default_topic: "a b".into(), ..Default::default() };
        assert_eq!(c.validate("mqtt").expect_err("bad").key, "mqtt.default_topic");
        let tls = MqttTlsConfig { enabled: true, listen: "8883".into(), ..Default::default() };
        let c = MqttConfig { tls, ..Default::default() };
        assert_eq!(c.validate("mqtt").expect_err("bad").key, "mqtt.tls.listen");
        let c = MqttConfig { connection_rate_addresses_max: 0, ..Default::default() };
        assert_eq!(c.validate("mqtt").expect_err("bad").key, "mqtt.connection_rate_addresses_max");
        let c = MqttConfig { write_ahead_bytes_max: 1000, ..Default::default() };
        assert_eq!(c.validate("mqtt").expect_err("bad").key, "mqtt.write_ahead_bytes_max");
        let c = MqttConfig { buffer_memory_bytes_max: 1000, ..Default::default() };
        assert_eq!(c.validate("mqtt").expect_err("bad").key, "mqtt.buffer_memory_bytes_max");
        let c = MqttConfig { session_sweep_interval_ms: 1, ..Default::default() };
        assert_eq!(c.validate("mqtt").expect_err("bad").key, "mqtt.session_sweep_interval_ms");
        let c = MqttConfig { websocket_listen: "8083".into(), ..Default::default() };
        assert_eq!(c.validate("mqtt").expect_err("bad").key, "mqtt.websocket_listen");
        MqttConfig { websocket_listen: String::new(), ..Default::default() }.validate("mqtt").expect("empty: none");
        let c = MqttConfig { websocket_tls_listen: "localhost".into(), ..Default::default() };
        assert_eq!(c.validate("mqtt").expect_err("bad").key, "mqtt.websocket_tls_listen");
        let tls = MqttTlsConfig { key_file: String::new(), ..Default::default() };
        let c = MqttConfig { websocket_tls_listen: "127.0.0.1:8084".into(), tls, ..Default::default() };
        assert_eq!(c.validate("mqtt").expect_err("bad").key, "mqtt.tls.key_file");
        let c = MqttConfig { websocket_request_bytes_max: 100, ..Default::default() };
        assert_eq!(c.validate("mqtt").expect_err("bad").key, "mqtt.websocket_request_bytes_max");
    }

    #[test]
    fn retained_bytes_get_at_most_a_quarter_of_the_disk_budget() {
        let storage = crate::config::StorageConfig::default();
        MqttConfig::default().validate_with_storage("mqtt", &storage).expect("defaults fit the default budget");
        let c = MqttConfig { retained_bytes_max: storage.max_bytes / 4 + 1, ..Default::default() };
        let e = c.validate_with_storage("mqtt", &storage).expect_err("too much");
        assert_eq!(e.key, "mqtt.retained_bytes_max");
        assert!(e.reason.contains("storage.max_bytes"), "{}", e.reason);
    }
}
