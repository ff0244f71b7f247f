//! The gateway's configuration file (TOML): one section per subsystem, every key optional with a
//! documented default, unknown keys refused, and every value validated before anything starts.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tributary_broker::aggregate::AggregateConfig;
use tributary_broker::kafka::KafkaConfig;
use tributary_broker::mqtt::MqttConfig;
use tributary_broker::security::AuthConfig;
use tributary_broker::TopicTemplate;
use tributary_broker::{Codec, ConfigError, Durability, StorageConfig, TimestampKind, TopicConfig};
use tributary_sync::MirrorConfig;

use crate::metrics::MetricsConfig;
use crate::status::StatusConfig;

/// The whole `gateway.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub storage: StorageConfig,
    /// Settings of topics created without explicit settings.
    pub topic_defaults: TopicDefaults,
    /// The Kafka protocol listener.
    pub kafka: KafkaConfig,
    /// The MQTT listener and its routes.
    pub mqtt: MqttConfig,
    /// Users, passwords and ACLs of both listeners.
    pub auth: AuthConfig,
    /// Mirroring to the central Kafka cluster over QUIC.
    pub mirror: MirrorConfig,
    /// The Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// The status page (on the metrics listener).
    pub status: StatusConfig,
    pub log: LogConfig,
    /// `[[aggregate]]`: derived topics of per-key tumbling windows (none by default).
    pub aggregate: Vec<AggregateConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicDefaults {
    /// Partition count of automatically created topics.
    pub partitions: u32,
    pub compression: Codec,
    pub durability: Durability,
    pub retention_bytes: Option<u64>,
    pub retention_ms: Option<u64>,
    pub timestamp_type: TimestampKind,
}

impl Default for TopicDefaults {
    fn default() -> Self {
        let t = TopicConfig::default();
        Self {
            partitions: 1,
            compression: t.compression,
            durability: t.durability,
            retention_bytes: t.retention_bytes,
            retention_ms: t.retention_ms,
            timestamp_type: t.timestamp_type,
        }
    }
}

impl TopicDefaults {
    /// What a topic created by a front end gets.
    pub fn template(&self) -> TopicTemplate {
        TopicTemplate { partitions: self.partitions, config: self.topic_config() }
    }

    /// The settings a new topic gets.
    pub fn topic_config(&self) -> TopicConfig {
        TopicConfig {
            compression: self.compression,
            durability: self.durability,
            retention_bytes: self.retention_bytes,
            retention_ms: self.retention_ms,
            timestamp_type: self.timestamp_type,
            // Compaction settings are per topic (CreateTopics / AlterConfigs), Kafka's defaults here.
            ..TopicConfig::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter (e.g. `info`, `tributary_broker=debug`); `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: "info".into() }
    }
}

impl GatewayConfig {
    /// Parses and validates a config text; errors name the key (sizes and durations may be
    /// written as `"8 GiB"`, `"7d"`: see `tributary_sync::config_file`).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: GatewayConfig = tributary_sync::config_file::parse(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path.display().to_string(), format!("cannot read: {e}")))?;
        Self::parse(&text).map_err(|e| ConfigError::new(format!("{}: {}", path.display(), e.key), e.reason))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.storage.validate("storage")?;
        self.kafka.validate("kafka")?;
        self.mqtt.validate("mqtt")?;
        self.mqtt.validate_with_storage("mqtt", &self.storage)?;
        self.auth.validate("auth")?;
        self.mirror.validate("mirror")?;
        self.metrics.validate("metrics")?;
        self.status.validate("status")?;
        tributary_broker::aggregate::validate_all(&self.aggregate, "aggregate")?;
        tributary_broker::aggregate::validate_with_storage(&self.aggregate, "aggregate", &self.storage)?;
        if self.topic_defaults.partitions == 0 || self.topic_defaults.partitions > self.storage.partitions_per_topic_max
        {
            return Err(ConfigError::new(
                "topic_defaults.partitions",
                format!(
                    "must be between 1 and storage.partitions_per_topic_max = {} (got {})",
                    self.storage.partitions_per_topic_max, self.topic_defaults.partitions
                ),
            ));
        }
        if let Some(0) = self.topic_defaults.retention_bytes {
            return Err(ConfigError::new("topic_defaults.retention_bytes", "must be positive or absent"));
        }
        if let Some(0) = self.topic_defaults.retention_ms {
            return Err(ConfigError::new("topic_defaults.retention_ms", "must be positive or absent"));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(ConfigError::new("log.level", format!("not a valid filter: {:?}", self.log.level)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = include_str!("../../config/gateway.toml");

    fn keys(v: &toml::Value, prefix: &str, out: &mut Vec<String>) {
        if let toml::Value::Table(t) = v {
            for (k, v) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                match v {
                    toml::Value::Table(_) => keys(v, &key, out),
                    _ => out.push(key),
                }
            }
        }
    }

    #[test]
    fn shipped_config_parses_and_documents_every_default() {
        let cfg = GatewayConfig::parse(SHIPPED).expect("config/gateway.toml is valid");
        // The one deliberate difference: the shipped file (installed by the package) turns
        // authentication on, while `tributary serve` without a file keeps it off so it runs with
        // no setup (its listeners are on 127.0.0.1 only). Everything else is the defaults.
        let mut expected = GatewayConfig::default();
        expected.auth.enabled = true;
        assert_eq!(cfg, expected, "config/gateway.toml states the built-in defaults (with [auth] enabled = true)");
        // Every key the program knows appears in the file (commented or not).
        let default = toml::Value::try_from(GatewayConfig::default()).expect("serializes");
        let mut all = Vec::new();
        keys(&default, "", &mut all);
        for key in all {
            let leaf = key.rsplit('.').next().unwrap_or(&key);
            assert!(
                SHIPPED.lines().any(|l| l.trim_start_matches('#').trim_start().starts_with(&format!("{leaf} "))),
                "config/gateway.toml does not document {key}"
            );
        }
    }

    /// The commented example in the shipped file that starts with the line `header`, uncommented.
    fn commented_example(header: &str) -> Vec<&'static str> {
        SHIPPED
            .lines()
            .skip_while(|l| l.trim() != header)
            .take_while(|l| l.starts_with('#') && !l.trim_start_matches('#').trim().is_empty())
            .map(|l| l.trim_start_matches('#').trim_start())
            .collect()
    }

    /// The commented `[[auth.users]]` example in the shipped file is valid and shows every key
    /// a user entry has.
    #[test]
    fn shipped_user_example_is_valid_and_shows_every_user_key() {
        let example = commented_example("# [[auth.users]]");
        assert!(!example.is_empty(), "config/gateway.toml has a commented [[auth.users]] example");
        let text = format!("[auth]\nenabled = true\n{}\n", example.join("\n"));
        let cfg = GatewayConfig::parse(&text).expect("the example parses and validates");
        assert_eq!(cfg.auth.users.len(), 1);
        let mut full = tributary_broker::security::UserConfig::default();
        full.mqtt.publish = vec!["x".into()];
        full.mqtt.client_ids = Some(vec!["x".into()]);
        full.kafka.admin = true;
        let mut all = Vec::new();
        keys(&toml::Value::try_from(full).expect("serializes"), "", &mut all);
        for key in all {
            assert!(example.iter().any(|l| l.starts_with(&format!("{key} "))), "the user example does not show {key}");
        }
    }

    /// The commented `[[aggregate]]` example in the shipped file is valid and shows every key
    /// an entry has.
    #[test]
    fn shipped_aggregate_example_is_valid_and_shows_every_key() {
        let example = commented_example("# [[aggregate]]");
        assert!(!example.is_empty(), "config/gateway.toml has a commented [[aggregate]] example");
        let cfg = GatewayConfig::parse(&example.join("\n")).expect("the example parses and validates");
        assert_eq!(cfg.aggregate.len(), 1);
        assert_eq!(cfg.aggregate[0].window_ms, 15 * 60_000);
        let mut all = Vec::new();
        keys(&toml::Value::try_from(AggregateConfig::default()).expect("serializes"), "", &mut all);
        for key in all {
            assert!(example.iter().any(|l| l.starts_with(&format!("{key} "))), "the example does not show {key}");
        }
        let e = GatewayConfig::parse(
            "[[aggregate]]\nsource = \"a\"\nderived = \"b\"\nfields = [\"x\"]\nwindows_open_max = 0\n",
        )
        .expect_err("zero windows");
        assert_eq!(e.key, "aggregate[0].windows_open_max");
    }

    /// The commented `[auth.anonymous]` example in the shipped file is valid, with logins on
    /// and off.
    #[test]
    fn shipped_anonymous_example_is_valid() {
        let example = commented_example("# [auth.anonymous]");
        assert!(!example.is_empty(), "config/gateway.toml has a commented [auth.anonymous] example");
        for enabled in [true, false] {
            let text = format!("[auth]\nenabled = {enabled}\n{}\n", example.join("\n"));
            let cfg = GatewayConfig::parse(&text).expect("the example parses and validates");
            let anonymous = cfg.auth.anonymous.expect("anonymous rules");
            assert_eq!(anonymous.mqtt.publish, vec!["public/#".to_string()]);
            assert_eq!(anonymous.mqtt.client_ids, None, "the default (any id no user owns)");
        }
        let e = GatewayConfig::parse("[auth.anonymous]\nmqtt.subscribe_deny = [\"a/#/b\"]\n").expect_err("bad filter");
        assert_eq!(e.key, "auth.anonymous.mqtt.subscribe_deny");
        let e = GatewayConfig::parse("[auth.anonymous]\nkafka.read = [\"x\"]\n").expect_err("no kafka rules");
        assert!(e.key.starts_with("auth.anonymous") && e.reason.contains("kafka"), "{e}");
    }

    #[test]
    fn empty_config_is_the_defaults() {
        assert_eq!(GatewayConfig::parse("").expect("empty is fine"), GatewayConfig::default());
    }

    #[test]
    fn errors_name_the_key() {
        let e = GatewayConfig::parse("[storage]\ncache_size_bytes = 3\n").expect_err("too small");
        assert_eq!(e.key, "storage.cache_size_bytes");
        let e = GatewayConfig::parse("[storage]\ncache_sise_bytes = 3\n").expect_err("typo");
        assert!(e.reason.contains("cache_sise_bytes"), "{e}");
        let e = GatewayConfig::parse("[topic_defaults]\npartitions = 0\n").expect_err("zero");
        assert_eq!(e.key, "topic_defaults.partitions");
        let e = GatewayConfig::parse("[kafka]\nlisten = \"localhost\"\n").expect_err("no port");
        assert_eq!(e.key, "kafka.listen");
        let e = GatewayConfig::parse("[storage]\nmax_bytes = \"lots\"\n").expect_err("type");
        assert_eq!(e.key, "storage.max_bytes");
        assert!(e.to_string().contains("line 2") && e.reason.contains("\"8 GiB\""), "{e}");
    }

    /// Issue 13 item 17: every key of the file, given a value of the wrong type, is named in the
    /// error (with its line); keys measured in bytes or milliseconds also name the human forms.
    #[test]
    fn every_key_is_named_in_its_type_error() {
        let default = toml::Value::try_from(GatewayConfig::default()).expect("serializes");
        let mut all = Vec::new();
        keys(&default, "", &mut all);
        assert!(all.len() > 60, "{} keys", all.len());
        for key in all {
            let (section, leaf) = key.rsplit_once('.').unwrap_or(("", &key));
            let header = if section.is_empty() { String::new() } else { format!("[{section}]\n") };
            let mut value = &default;
            for part in key.split('.') {
                value = &value[part];
            }
            // Two values of a type the key does not take.
            let wrong: [&str; 2] = match value {
                toml::Value::Integer(_) => ["true", "\"lots\""],
                toml::Value::Boolean(_) => ["\"lots\"", "5"],
                toml::Value::String(_) => ["5", "true"],
                _ => ["5", "\"lots\""],
            };
            for value in wrong {
                let text = format!("{header}{leaf} = {value}\n");
                let e = GatewayConfig::parse(&text).expect_err(&text);
                assert_eq!(e.key, key, "{text}: {e}");
                let line = if section.is_empty() { "line 1: " } else { "line 2: " };
                assert!(e.reason.starts_with(line), "{text}: {e}");
            }
        }
    }

    #[test]
    fn sizes_and_durations_may_be_written_as_a_person_writes_them() {
        let cfg = GatewayConfig::parse(
            "[storage]\nmax_bytes = \"8 GiB\"\ncache_size_bytes = \"32 MiB\"\nretention_check_interval_ms = \"30s\"\n\
             [topic_defaults]\nretention_ms = \"7d\"\nretention_bytes = \"512 MiB\"\n\
             [kafka]\nidle_timeout_ms = \"12h\"\nfetch_wait_max_ms = \"250ms\"\n\
             [mirror]\nbandwidth_bytes_per_s_max = \"1 MiB/s\"\n",
        )
        .expect("human forms parse");
        assert_eq!(cfg.storage.max_bytes, 8 << 30);
        assert_eq!(cfg.storage.cache_size_bytes, 32 << 20);
        assert_eq!(cfg.storage.retention_check_interval_ms, 30_000);
        assert_eq!(cfg.topic_defaults.retention_ms, Some(7 * 24 * 3_600_000));
        assert_eq!(cfg.topic_defaults.retention_bytes, Some(512 << 20));
        assert_eq!(cfg.kafka.idle_timeout_ms, 12 * 3_600_000);
        assert_eq!(cfg.kafka.fetch_wait_max_ms, 250);
        assert_eq!(cfg.mirror.bandwidth_bytes_per_s_max, 1 << 20);
        let e = GatewayConfig::parse("[kafka]\nidle_timeout_ms = \"forever\"\n").expect_err("not a duration");
        assert_eq!(e.key, "kafka.idle_timeout_ms");
        assert!(e.reason.contains("\"12h\"") && e.reason.contains("units ms, s, m or min, h, d"), "{e}");
    }
}
