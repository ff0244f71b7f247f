//! Topics' own settings on their way from a gateway to the central cluster and back, sans-I/O:
//! what the gateway announces (a mirrored topic's settings that are its own, not the gateway's
//! `[topic_defaults]`, sent when first named in a session and when they change), the compacted
//! topic the receiver keeps them in (`{site}.topics.internal`: its name, its record encoding, and
//! the cache that writes a topic's record only when its settings changed, within
//! `partitions_per_site_max` topics a site), and what a restore makes of them on the new gateway
//! (the overrides on top of its own defaults, each checked, a refused one skipped and reported).

use std::collections::{BTreeMap, HashMap};

use bytes::{Buf, Bytes, BytesMut};
use tributary_log::TopicConfig;

use crate::protocol::{
    get_settings, overrides_fit, put_settings, TopicSettings, TOPIC_BYTES_MAX, TOPIC_OVERRIDE_KEYS_MAX,
    TOPIC_OVERRIDE_NAME_BYTES_MAX, TOPIC_OVERRIDE_VALUE_BYTES_MAX,
};

/// The compacted topic (one partition) where the receiver keeps a site's topics' own settings.
/// Its name ends in `.internal`: MirrorMaker 2's replication policies take it for an internal
/// topic (not a replicated `{site}.{topic}`), and a restore does not list it as a data topic.
pub fn topics_topic(site: &str) -> String {
    format!("{site}.topics.internal")
}

/// A topic's own settings on a gateway (`TopicConfig::overrides` against the gateway's
/// `defaults`: set by a client, even to a default's value, or different from the defaults), in
/// `TopicConfig::KEYS` order.
pub fn own_settings(config: &TopicConfig, defaults: &TopicConfig) -> Vec<(String, String)> {
    config.overrides(defaults).into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// A record's key: `u16 length | topic name` (no two topics share one, whatever they contain).
pub fn settings_key(topic: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + topic.len());
    k.extend_from_slice(&(topic.len().min(u16::MAX as usize) as u16).to_be_bytes());
    k.extend_from_slice(&topic.as_bytes()[..topic.len().min(u16::MAX as usize)]);
    k
}

/// The topic of a key; `None` when it is not one (empty, too long, not UTF-8, bytes left over).
pub fn decode_settings_key(k: &[u8]) -> Option<String> {
    let (len, name) = k.split_first_chunk::<2>()?;
    let topic = std::str::from_utf8(name).ok()?;
    (usize::from(u16::from_be_bytes(*len)) == name.len() && !topic.is_empty() && topic.len() <= TOPIC_BYTES_MAX)
        .then(|| topic.to_string())
}

/// The format byte of a record's value.
const VALUE_FORMAT: u8 = 1;

/// A record's value: `u8 format (1) | u8 count | (u16 length | name, u16 length | value)*`.
pub fn settings_value(configs: &[(String, String)]) -> Vec<u8> {
    let mut b = BytesMut::with_capacity(2 + configs.iter().map(|(k, v)| 4 + k.len() + v.len()).sum::<usize>());
    b.extend_from_slice(&[VALUE_FORMAT]);
    put_settings(&mut b, configs);
    b.to_vec()
}

/// A value decoded; `None` when it is not one (another format, over the protocol's bounds).
pub fn decode_settings_value(v: &[u8]) -> Option<Vec<(String, String)>> {
    let (&format, rest) = v.split_first()?;
    if format != VALUE_FORMAT {
        return None;
    }
    let mut b = Bytes::copy_from_slice(rest);
    let configs =
        get_settings(&mut b, "topic settings record", TOPIC_OVERRIDE_KEYS_MAX, TOPIC_OVERRIDE_VALUE_BYTES_MAX, |k| {
            !k.is_empty() && k.len() <= TOPIC_OVERRIDE_NAME_BYTES_MAX
        })
        .ok()?;
    (!b.has_remaining()).then_some(configs)
}

/// What the gateway announced in this session: each mirrored topic's settings as last sent.
#[derive(Debug, Default)]
pub struct Announced {
    sent: BTreeMap<String, Vec<(String, String)>>,
}

impl Announced {
    /// The mirrored topics' own settings `now` (one entry per topic): those first named or
    /// changed since last sent, which count as sent. Topics no longer named are forgotten (held:
    /// the topics named now, at most `mirror.partitions_max`). Settings over the frame's bounds
    /// are left out with a warning (no setting a gateway has comes close).
    pub fn due(&mut self, now: Vec<TopicSettings>) -> Vec<TopicSettings> {
        let named: std::collections::BTreeSet<&str> = now.iter().map(|t| t.topic.as_str()).collect();
        self.sent.retain(|t, _| named.contains(t.as_str()));
        let mut out = Vec::new();
        for t in now {
            if t.topic.is_empty() || t.topic.len() > TOPIC_BYTES_MAX || !overrides_fit(&t.configs) {
                tracing::warn!(topic = %t.topic, "a topic's own settings are over the protocol's bounds: not mirrored");
                continue;
            }
            if self.sent.get(&t.topic) != Some(&t.configs) {
                self.sent.insert(t.topic.clone(), t.configs.clone());
                out.push(t);
            }
        }
        out
    }
}

/// What the receiver made of a topic's settings from a gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// New or changed: write the record.
    Write,
    /// As already written.
    Unchanged,
    /// The site has `partitions_per_site_max` topics kept already: not kept.
    Full,
}

/// The settings the receiver wrote into `{site}.topics.internal` (in this process), per site, so
/// that a topic's record is written only when its settings change. At most `sites_max` sites and
/// `partitions_per_site_max` topics each (every mirrored topic has a partition).
#[derive(Debug, Default)]
pub struct Kept {
    sites: HashMap<String, HashMap<String, Vec<(String, String)>>>,
}

impl Kept {
    /// Whether `configs` of `site`'s `topic` need writing; if so they count as written.
    pub fn offer(&mut self, site: &str, topic: &str, configs: &[(String, String)], topics_max: usize) -> Keep {
        let kept = self.sites.entry(site.to_string()).or_default();
        match kept.get(topic) {
            Some(c) if c == configs => Keep::Unchanged,
            None if kept.len() >= topics_max => Keep::Full,
            _ => {
                kept.insert(topic.to_string(), configs.to_vec());
                Keep::Write
            }
        }
    }

    /// A write that failed: the next announcement of the topic writes it again.
    pub fn forget(&mut self, site: &str, topic: &str) {
        if let Some(kept) = self.sites.get_mut(site) {
            kept.remove(topic);
        }
    }
}

/// A restored topic's settings: the new gateway's `defaults` with the lost gateway's `own`
/// settings on top, each checked by the gateway; the ones it refuses are skipped and returned
/// (name, value, why), never fatal.
pub fn apply_own(defaults: &TopicConfig, own: &[(String, String)]) -> (TopicConfig, Vec<Skipped>) {
    let mut config = defaults.clone();
    let mut skipped = Vec::new();
    for (k, v) in own {
        let mut tried = config.clone();
        match tried.set(k, Some(v)) {
            Ok(()) => config = tried,
            Err(e) => skipped.push(Skipped { key: k.clone(), value: v.clone(), reason: e.reason }),
        }
    }
    (config, skipped)
}

/// A setting a restore did not apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub key: String,
    pub value: String,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(k: &str, v: &str) -> (String, String) {
        (k.to_string(), v.to_string())
    }

    #[test]
    fn keys_are_unambiguous_and_values_round_trip() {
        assert_eq!(topics_topic("plant-7"), "plant-7.topics.internal");
        assert_eq!(decode_settings_key(&settings_key("meters")), Some("meters".into()));
        // Names that run together in a joined key stay apart: the length comes first.
        assert_ne!(settings_key("a"), settings_key("a\0"));
        let mut trailing = settings_key("meters");
        trailing.push(b'x');
        assert_eq!(decode_settings_key(&trailing), None, "bytes after the name");
        assert_eq!(decode_settings_key(&settings_key("")), None, "empty");
        assert_eq!(decode_settings_key(&settings_key(&"t".repeat(TOPIC_BYTES_MAX + 1))), None, "too long");
        assert_eq!(decode_settings_key(&[0]), None, "cut");
        let configs = vec![s("retention.ms", "3600000"), s("compression.type", "zstd")];
        assert_eq!(decode_settings_value(&settings_value(&configs)), Some(configs));
        assert_eq!(decode_settings_value(&settings_value(&[])), Some(Vec::new()), "no own settings");
        let mut v = settings_value(&[s("retention.ms", "1")]);
        v[0] = 2;
        assert_eq!(decode_settings_value(&v), None, "another format");
        let mut v = settings_value(&[s("retention.ms", "1")]);
        v.push(0);
        assert_eq!(decode_settings_value(&v), None, "bytes left over");
        assert_eq!(decode_settings_value(&settings_value(&[s("a", "1"), s("a", "2")])), None, "a name twice");
        assert_eq!(decode_settings_value(&[]), None);
    }

    #[test]
    fn own_settings_are_those_that_differ_from_the_gateway_s_defaults() {
        let defaults = TopicConfig { retention_ms: Some(86_400_000), ..TopicConfig::default() };
        let mut config = defaults.clone();
        assert!(own_settings(&config, &defaults).is_empty(), "a topic created with the defaults");
        config.set("retention.ms", Some("3600000")).expect("valid");
        config.set("compression.type", Some("zstd")).expect("valid");
        config.set("message.timestamp.type", Some("LogAppendTime")).expect("valid");
        // In `TopicConfig::KEYS` order.
        assert_eq!(
            own_settings(&config, &defaults),
            vec![
                s("compression.type", "zstd"),
                s("retention.ms", "3600000"),
                s("message.timestamp.type", "LogAppendTime")
            ]
        );
    }

    #[test]
    fn announcements_go_when_a_topic_is_first_named_and_when_its_settings_change() {
        let t = |topic: &str, configs: Vec<(String, String)>| TopicSettings { topic: topic.into(), configs };
        let mut a = Announced::default();
        let first = vec![t("meters", vec![s("retention.ms", "3600000")]), t("alarms", Vec::new())];
        assert_eq!(a.due(first.clone()), first, "all, at the session's start");
        assert!(a.due(first.clone()).is_empty(), "nothing changed");
        let altered = vec![t("meters", vec![s("retention.ms", "7200000")]), t("alarms", Vec::new())];
        assert_eq!(a.due(altered.clone()), vec![altered[0].clone()], "the altered topic only");
        // A topic no longer mirrored is forgotten; named again, it is announced again.
        assert!(a.due(vec![altered[0].clone()]).is_empty());
        assert_eq!(a.due(altered.clone()), vec![altered[1].clone()]);
        // Settings over the bounds are not sent (the receiver would end the session).
        let wide = t("wide", vec![s("k", &"v".repeat(TOPIC_OVERRIDE_VALUE_BYTES_MAX + 1))]);
        assert!(a.due(vec![wide]).is_empty());
    }

    #[test]
    fn the_receiver_writes_a_topic_s_settings_only_when_they_change_within_its_limit() {
        let mut k = Kept::default();
        let one = vec![s("retention.ms", "1")];
        assert_eq!(k.offer("a", "meters", &one, 2), Keep::Write);
        assert_eq!(k.offer("a", "meters", &one, 2), Keep::Unchanged);
        assert_eq!(k.offer("a", "meters", &[], 2), Keep::Write, "back to the defaults");
        assert_eq!(k.offer("a", "alarms", &one, 2), Keep::Write);
        assert_eq!(k.offer("a", "third", &one, 2), Keep::Full, "partitions_per_site_max topics");
        assert_eq!(k.offer("a", "alarms", &[], 2), Keep::Write, "a kept topic still changes");
        assert_eq!(k.offer("b", "third", &one, 2), Keep::Write, "another site has its own limit");
        k.forget("a", "alarms");
        assert_eq!(k.offer("a", "alarms", &[], 2), Keep::Write, "a failed write is written again");
    }

    #[test]
    fn a_restore_applies_what_the_gateway_accepts_and_skips_the_rest() {
        let defaults = TopicConfig { compression: tributary_log::Codec::Gzip, ..TopicConfig::default() };
        let own = vec![
            s("retention.ms", "3600000"),
            s("retention.bytes", "not a number"),
            s("frobnication.level", "11"),
            s("message.timestamp.type", "LogAppendTime"),
        ];
        let (config, skipped) = apply_own(&defaults, &own);
        assert_eq!(config.get("retention.ms").as_deref(), Some("3600000"));
        assert_eq!(
            own_settings(&config, &defaults),
            vec![s("retention.ms", "3600000"), s("message.timestamp.type", "LogAppendTime")],
            "the applied ones are the restored topic's own, the default's value is not"
        );
        assert_eq!(config.get("message.timestamp.type").as_deref(), Some("LogAppendTime"));
        assert_eq!(config.get("compression.type").as_deref(), Some("gzip"), "the new gateway's default");
        assert_eq!(config.get("retention.bytes"), defaults.get("retention.bytes"), "the refused one left as it was");
        let names: Vec<&str> = skipped.iter().map(|k| k.key.as_str()).collect();
        assert_eq!(names, ["retention.bytes", "frobnication.level"]);
    }
}
