//! Routes from MQTT topics to log topics: the first route whose filter matches a publish's topic
//! names the log topic, the record key (from a template, so each device keeps its order in one
//! partition) and the headers that carry what MQTT knows about the message. A route may also
//! choose the codec of its log topic, used when a publish creates the topic.

use serde::{Deserialize, Serialize};

use crate::config::{Codec, ConfigError, TopicConfig};

/// One `[[mqtt.routes]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// MQTT topic filter (`+` and `#` allowed), e.g. `meters/+/reading`.
    pub filter: String,
    /// Log topic the matching publishes are stored in (created on first use).
    pub topic: String,
    /// Record key template: `{client_id}`, `{username}`, `{topic}` (the MQTT topic), `{1}`..`{9}`
    /// (the level matched by the first.. ninth `+`), and literal text. Empty = no key.
    #[serde(default = "default_key")]
    pub key: String,
    /// Codec of the log topic's batches (`compression.type`) when a publish creates the topic;
    /// unset = `[topic_defaults]`. A topic that exists keeps its settings. E.g. `gzip` for
    /// topics read by kafkajs, which reads only uncompressed and gzip batches without a plugin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Codec>,
}

pub(crate) fn default_key() -> String {
    "{client_id}".to_string()
}

/// Header names written on records that came from MQTT (the topic's is shared, in `crate::topic`).
pub use crate::topic::HEADER_TOPIC;
/// Log topic of the broker's own `$SYS/...` messages (a built-in first route).
pub const SYS_TOPIC: &str = "__sys";

/// The log topic holding the retained messages (`cleanup.policy=compact`, keyed by the MQTT
/// topic; see `retained.rs`): an ordinary topic, so Kafka consumers and the mirror can read it.
/// No route may write publishes into it.
pub const RETAINED_TOPIC: &str = crate::topic::RETAINED_LOG_TOPIC;
pub const HEADER_CONTENT_TYPE: &str = "content-type";
pub const HEADER_CORRELATION_DATA: &str = "mqtt.correlation-data";
pub const HEADER_RESPONSE_TOPIC: &str = "mqtt.response-topic";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    ClientId,
    Username,
    Topic,
    Level(usize),
}

#[derive(Debug, Clone)]
struct Compiled {
    filter: String,
    topic: String,
    key: Vec<Piece>,
    /// Level indexes of the filter's `+` wildcards, in order.
    plus_levels: Vec<usize>,
}

/// The routing table, checked at start-up.
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<Compiled>,
    /// Log topics whose route names a codec, and that codec (one per topic, checked).
    codecs: Vec<(String, Codec)>,
}

/// Where one publish goes (the log topic borrowed from its route: nothing is copied per publish
/// but the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination<'a> {
    pub topic: &'a str,
    pub key: Option<String>,
}

/// One piece of a route's key for a publish on `topic`.
fn key_piece<'a>(
    p: &'a Piece,
    plus_levels: &[usize],
    topic: &'a str,
    client_id: &'a str,
    username: Option<&'a str>,
) -> &'a str {
    match p {
        Piece::Text(t) => t,
        Piece::ClientId => client_id,
        Piece::Username => username.unwrap_or(""),
        Piece::Topic => topic,
        Piece::Level(i) => plus_levels.get(*i).and_then(|l| topic.split('/').nth(*l)).unwrap_or(""),
    }
}

fn parse_template(key_name: &str, template: &str, plus_count: usize) -> Result<Vec<Piece>, ConfigError> {
    let mut pieces = Vec::new();
    let mut rest = template;
    while !rest.is_empty() {
        match rest.find('{') {
            None => {
                pieces.push(Piece::Text(rest.to_string()));
                break;
            }
            Some(start) => {
                if start > 0 {
                    pieces.push(Piece::Text(rest[..start].to_string()));
                }
                let end = rest[start..]
                    .find('}')
                    .map(|e| start + e)
                    .ok_or_else(|| ConfigError::new(key_name, format!("unclosed '{{' in {template:?}")))?;
                let name = &rest[start + 1..end];
                pieces.push(match name {
                    "client_id" => Piece::ClientId,
                    "username" => Piece::Username,
                    "topic" => Piece::Topic,
                    n => match n.parse::<usize>() {
                        Ok(i) if i >= 1 && i <= plus_count => Piece::Level(i - 1),
                        Ok(i) => {
                            return Err(ConfigError::new(
                                key_name,
                                format!("{{{i}}} in {template:?}: the filter has {plus_count} '+' level(s)"),
                            ))
                        }
                        Err(_) => {
                            return Err(ConfigError::new(
                                key_name,
                                format!("unknown {{{n}}} in {template:?} (use client_id, username, topic or 1-9)"),
                            ))
                        }
                    },
                });
                rest = &rest[end + 1..];
            }
        }
    }
    Ok(pieces)
}

impl Router {
    /// Checks and compiles the routes; the last one catches everything (`#`) unless a route
    /// already does. `prefix` names the config table in errors.
    pub fn new(routes: &[Route], default_topic: &str, default_key: &str, prefix: &str) -> Result<Self, ConfigError> {
        let mut compiled = Vec::with_capacity(routes.len() + 2);
        // `$SYS/...` (published by the broker only) has a log topic of its own.
        compiled.push(Compiled {
            filter: "$SYS/#".into(),
            topic: SYS_TOPIC.into(),
            key: vec![Piece::Topic],
            plus_levels: Vec::new(),
        });
        let default =
            Route { filter: "#".into(), topic: default_topic.into(), key: default_key.into(), compression: None };
        let mut codecs: Vec<(String, Codec)> = Vec::new();
        for (i, r) in routes.iter().chain(std::iter::once(&default)).enumerate() {
            let at = if i < routes.len() { format!("{prefix}.routes[{i}]") } else { prefix.to_string() };
            if !super::topic::valid_filter(&r.filter) {
                return Err(ConfigError::new(
                    format!("{at}.filter"),
                    format!("not a valid MQTT topic filter: {:?}", r.filter),
                ));
            }
            let topic_key = if i < routes.len() { format!("{at}.topic") } else { format!("{at}.default_topic") };
            crate::storage::validate_topic_name(&r.topic)
                .map_err(|e| ConfigError::new(topic_key.clone(), e.to_string()))?;
            if r.topic == RETAINED_TOPIC {
                return Err(ConfigError::new(
                    topic_key,
                    format!("{RETAINED_TOPIC:?} holds the retained messages (one record per MQTT topic): route publishes elsewhere"),
                ));
            }
            let levels: Vec<&str> = r.filter.split('/').collect();
            let plus_levels: Vec<usize> =
                levels.iter().enumerate().filter(|(_, l)| **l == "+").map(|(i, _)| i).collect();
            let key_name = if i < routes.len() { format!("{at}.key") } else { format!("{at}.default_key") };
            let key = parse_template(&key_name, &r.key, plus_levels.len())?;
            if let Some(codec) = r.compression {
                match codecs.iter().find(|(t, _)| *t == r.topic) {
                    Some((_, other)) if *other != codec => {
                        return Err(ConfigError::new(
                            format!("{at}.compression"),
                            format!(
                                "log topic {:?} is given {} by an earlier route and {} here: one topic has one codec",
                                r.topic,
                                other.kafka_name(),
                                codec.kafka_name()
                            ),
                        ))
                    }
                    Some(_) => {}
                    None => codecs.push((r.topic.clone(), codec)),
                }
            }
            compiled.push(Compiled { filter: r.filter.clone(), topic: r.topic.clone(), key, plus_levels });
        }
        Ok(Self { routes: compiled, codecs })
    }

    /// The settings a log topic is created with when a publish routed to it finds it missing:
    /// `defaults` with the codec a route names for it.
    pub fn topic_config(&self, log_topic: &str, defaults: &TopicConfig) -> TopicConfig {
        let mut config = defaults.clone();
        if let Some((_, codec)) = self.codecs.iter().find(|(t, _)| t == log_topic) {
            config.compression = *codec;
        }
        config
    }

    /// The destination of a publish on `topic` (a valid topic name, no wildcards).
    pub fn route(&self, topic: &str, client_id: &str, username: Option<&str>) -> Destination<'_> {
        let r = self
            .routes
            .iter()
            .find(|r| super::topic::matches(topic, &r.filter))
            .unwrap_or_else(|| &self.routes[self.routes.len() - 1]);
        let piece = |p| -> &str { key_piece(p, &r.plus_levels, topic, client_id, username) };
        // One allocation of the key's exact size (it becomes the record's key).
        let key = (!r.key.is_empty()).then(|| {
            let mut key = String::with_capacity(r.key.iter().map(|p| piece(p).len()).sum());
            r.key.iter().for_each(|p| key.push_str(piece(p)));
            key
        });
        Destination { topic: &r.topic, key }
    }

    /// The log topic a publish on `topic` is stored in (its route's, without building the key).
    pub fn log_topic(&self, topic: &str) -> &str {
        self.routes
            .iter()
            .find(|r| super::topic::matches(topic, &r.filter))
            .map_or_else(|| self.routes[self.routes.len() - 1].topic.as_str(), |r| r.topic.as_str())
    }

    /// Log topics MQTT publishes may land in (every route's).
    pub fn topics(&self) -> Vec<String> {
        let mut t: Vec<String> = self.routes.iter().map(|r| r.topic.clone()).collect();
        t.sort();
        t.dedup();
        t
    }

    /// The route filters, in order (the last is the default route's `#`).
    pub fn filters(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.routes.iter().map(|r| (r.filter.as_str(), r.topic.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_matching_route_with_key_from_a_level() {
        let routes = vec![
            Route {
                filter: "meters/+/reading".into(),
                topic: "readings".into(),
                key: "meter-{1}".into(),
                compression: None,
            },
            Route { filter: "sensors/#".into(), topic: "sensors".into(), key: "{client_id}".into(), compression: None },
            Route { filter: "raw/+/+".into(), topic: "raw".into(), key: String::new(), compression: None },
        ];
        let r = Router::new(&routes, "mqtt", "{topic}", "mqtt").expect("valid");
        assert_eq!(
            r.route("meters/42/reading", "c1", None),
            Destination { topic: "readings", key: Some("meter-42".into()) }
        );
        assert_eq!(r.route("sensors/a/b", "c1", None), Destination { topic: "sensors", key: Some("c1".into()) });
        assert_eq!(r.route("raw/x/y", "c1", None), Destination { topic: "raw", key: None });
        assert_eq!(r.route("other", "c1", None), Destination { topic: "mqtt", key: Some("other".into()) });
        assert_eq!(r.route("$SYS/broker/uptime", "c1", None).topic, SYS_TOPIC, "the broker's own topic");
        assert_eq!(r.topics(), vec!["__sys", "mqtt", "raw", "readings", "sensors"]);
    }

    #[test]
    fn bad_routes_name_the_key() {
        let bad = |route: Route| Router::new(&[route], "mqtt", "{client_id}", "mqtt").expect_err("refused").key;
        assert_eq!(
            bad(Route { filter: "a/#/b".into(), topic: "t".into(), key: String::new(), compression: None }),
            "mqtt.routes[0].filter"
        );
        assert_eq!(
            bad(Route { filter: "a/+".into(), topic: "bad topic".into(), key: String::new(), compression: None }),
            "mqtt.routes[0].topic"
        );
        assert_eq!(
            bad(Route { filter: "a/+".into(), topic: "t".into(), key: "{2}".into(), compression: None }),
            "mqtt.routes[0].key"
        );
        assert_eq!(
            bad(Route { filter: "a/+".into(), topic: "t".into(), key: "{who}".into(), compression: None }),
            "mqtt.routes[0].key"
        );
        assert_eq!(Router::new(&[], "no good", "", "mqtt").expect_err("refused").key, "mqtt.default_topic");
        // The retained messages' topic is keyed by MQTT topic: no route writes publishes into it.
        assert_eq!(
            bad(Route { filter: "a/+".into(), topic: RETAINED_TOPIC.into(), key: String::new(), compression: None }),
            "mqtt.routes[0].topic"
        );
        assert_eq!(Router::new(&[], RETAINED_TOPIC, "", "mqtt").expect_err("refused").key, "mqtt.default_topic");
    }

    #[test]
    fn a_route_names_its_topics_codec_and_one_topic_has_one() {
        let route = |filter: &str, topic: &str, compression| Route {
            filter: filter.into(),
            topic: topic.into(),
            key: String::new(),
            compression,
        };
        let defaults = TopicConfig::default();
        let r = Router::new(
            &[
                route("a/#", "js", Some(Codec::Gzip)),
                route("b/#", "js", None),
                route("c/#", "plain", Some(Codec::None)),
            ],
            "mqtt",
            "",
            "mqtt",
        )
        .expect("valid");
        assert_eq!(r.topic_config("js", &defaults).compression, Codec::Gzip);
        assert_eq!(r.topic_config("plain", &defaults).compression, Codec::None);
        assert_eq!(r.topic_config("mqtt", &defaults), defaults, "no route names a codec: the defaults");
        let mut g = defaults.clone();
        g.compression = Codec::Gzip;
        assert_eq!(r.topic_config("js", &defaults), g, "only the codec differs");
        let clash = [route("a/#", "js", Some(Codec::Gzip)), route("b/#", "js", Some(Codec::Zstd))];
        let e = Router::new(&clash, "mqtt", "", "mqtt").expect_err("two codecs for one topic");
        assert_eq!(e.key, "mqtt.routes[1].compression");
        assert!(e.reason.contains("gzip") && e.reason.contains("zstd"), "{}", e.reason);
        let same = [route("a/#", "js", Some(Codec::Gzip)), route("b/#", "js", Some(Codec::Gzip))];
        Router::new(&same, "mqtt", "", "mqtt").expect("the same codec twice is fine");
    }
}
