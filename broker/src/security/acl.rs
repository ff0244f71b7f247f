//! Access rules of one user: MQTT publish/subscribe topic filters with `%u` (user name) and `%c`
//! (client id) substitution, and Kafka topic and group patterns (a name, `prefix*`, or `*`).
//! Everything not allowed is denied.

use serde::{Deserialize, Serialize};

use crate::mqtt::topic;

/// `mqtt` rules of a user (`[[auth.users]]` keys `mqtt.publish`, `mqtt.subscribe`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttAcl {
    /// Topic filters the user may publish to (a publish's topic must match one).
    pub publish: Vec<String>,
    /// Topic filters the user may subscribe within (every topic a subscription can match must
    /// match one of these).
    pub subscribe: Vec<String>,
}

/// `kafka` rules of a user: patterns of topic and group names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaAcl {
    /// Fetch, list offsets, commit offsets for these topics.
    pub read: Vec<String>,
    /// Produce to these topics.
    pub write: Vec<String>,
    /// Create these topics (CreateTopics, or auto-creation through Metadata).
    pub create: Vec<String>,
    /// Delete these topics.
    pub delete: Vec<String>,
    /// Consumer groups the user may join, commit in and describe.
    pub groups: Vec<String>,
    /// Cluster operations: altering topic settings, adding partitions, broker settings,
    /// deleting groups and their offsets.
    pub admin: bool,
}

/// Whether a Kafka name pattern is valid: a name, `prefix*` or `*`.
pub fn valid_pattern(p: &str) -> bool {
    !p.is_empty() && !p.trim_end_matches('*').contains('*') && p.matches('*').count() <= 1
}

/// Whether `name` matches one of `patterns`.
pub fn pattern_matches(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => p == name,
    })
}

/// The rule with `%u` and `%c` filled in; `None` when a value it needs is missing or contains a
/// wildcard or level separator (client id `+` must not widen `devices/%c/#` to every device).
pub fn substitute(rule: &str, user: &str, client_id: &str) -> Option<String> {
    let safe = |v: &str| !v.is_empty() && !v.contains(['/', '+', '#', '\0']);
    if rule.contains("%u") && !safe(user) {
        return None;
    }
    if rule.contains("%c") && !safe(client_id) {
        return None;
    }
    Some(rule.replace("%u", user).replace("%c", client_id))
}

/// Whether every topic `requested` (a topic name or a filter) can match is matched by `allowed`.
pub fn filter_covers(allowed: &str, requested: &str) -> bool {
    // `#`/`+` at the first level do not match `$` topics, so they cannot grant them either.
    if requested.starts_with('$') && allowed.starts_with(['+', '#']) {
        return false;
    }
    let mut a = allowed.split('/');
    let mut r = requested.split('/');
    loop {
        match (a.next(), r.next()) {
            (Some("#"), _) => return true,
            (None, None) => return true,
            // A requested `#` also matches deeper levels and the parent: only `#` covers it.
            (_, Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(x), Some(y)) if x == y && y != "+" => {}
            _ => return false,
        }
    }
}

/// Whether one of `rules` (after substitution) covers `requested`.
pub fn mqtt_allowed(rules: &[String], user: &str, client_id: &str, requested: &str) -> bool {
    rules.iter().filter_map(|r| substitute(r, user, client_id)).any(|r| filter_covers(&r, requested))
}

/// Checks a rule's syntax (with placeholders filled by a plain value).
pub fn valid_mqtt_rule(rule: &str) -> bool {
    topic::valid_filter(&rule.replace("%u", "u").replace("%c", "c"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_patterns() {
        let p = vec!["meters".to_string(), "app-*".to_string()];
        assert!(pattern_matches(&p, "meters") && pattern_matches(&p, "app-1") && pattern_matches(&p, "app-"));
        assert!(!pattern_matches(&p, "meters2") && !pattern_matches(&p, "ap"));
        assert!(pattern_matches(&["*".to_string()], "anything"));
        assert!(valid_pattern("a*") && valid_pattern("*") && valid_pattern("a"));
        assert!(!valid_pattern("") && !valid_pattern("a*b") && !valid_pattern("**"));
    }

    #[test]
    fn filter_coverage() {
        assert!(filter_covers("a/#", "a/b/c") && filter_covers("a/#", "a") && filter_covers("a/#", "a/+/c"));
        assert!(filter_covers("a/+/c", "a/b/c") && filter_covers("a/+/c", "a/+/c"));
        assert!(!filter_covers("a/+/c", "a/#") && !filter_covers("a/+", "a/b/c") && !filter_covers("a/b", "a/+"));
        assert!(!filter_covers("a/+/#", "a/#"), "a/# matches a, which a/+/# does not");
        assert!(filter_covers("a/+/#", "a/b/#"));
        assert!(!filter_covers("#", "$SYS/x") && filter_covers("$SYS/#", "$SYS/x"));
        assert!(filter_covers("#", "#") && !filter_covers("+", "#"));
    }

    #[test]
    fn substitution_never_widens() {
        let rules = vec!["devices/%c/#".to_string(), "users/%u/in".to_string()];
        assert!(mqtt_allowed(&rules, "u1", "dev7", "devices/dev7/temp"));
        assert!(!mqtt_allowed(&rules, "u1", "dev7", "devices/dev8/temp"));
        assert!(mqtt_allowed(&rules, "u1", "dev7", "users/u1/in"));
        assert!(!mqtt_allowed(&rules, "u1", "+", "devices/dev8/temp"), "a client id '+' must not match all");
        assert!(!mqtt_allowed(&rules, "u1", "#", "devices/x"));
        assert!(!mqtt_allowed(&rules, "a/b", "c", "users/a/b/in"));
        assert!(valid_mqtt_rule("devices/%c/#") && !valid_mqtt_rule("a/#/b"));
    }
}
