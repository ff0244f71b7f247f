//! Access rules of one user (or of anonymous MQTT clients): the MQTT client ids it owns (names
//! or `prefix*` with `%u`), MQTT publish/subscribe topic filters with `%u` (user name) and `%c`
//! (client id) substitution, deny filters that win over them, and Kafka topic and group patterns
//! (a name, `prefix*`, or `*`). Everything not allowed is denied.

use std::collections::{BTreeSet, HashSet};

use serde::{Deserialize, Serialize};

use crate::topic;

/// `mqtt` rules of a user (`[[auth.users]]` keys `mqtt.client_ids`, `mqtt.publish`,
/// `mqtt.subscribe`, `mqtt.publish_deny`, `mqtt.subscribe_deny`) or of anonymous clients
/// (`[auth.anonymous]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttAcl {
    /// Client ids the user may connect with: exact ids or `prefix*`, `%u` = the user name. A
    /// client id belongs to one user only (checked at start-up), so nobody can resume, take over
    /// or end another user's session. Unset: `["%u", "%u-*"]` for a user (its name itself, or
    /// it followed by `-` and anything), `["*"]` for anonymous clients, which never get an id a
    /// user's rules match. Ids the server assigns (empty client id) are always allowed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ids: Option<Vec<String>>,
    /// Topic filters the user may publish to (a publish's topic must match one).
    pub publish: Vec<String>,
    /// Topic filters the user may subscribe within (every topic a subscription can match must
    /// match one of these).
    pub subscribe: Vec<String>,
    /// Topic filters the user may not publish to, whatever `publish` allows.
    pub publish_deny: Vec<String>,
    /// Topic filters the user may not receive from, whatever `subscribe` allows: a subscription
    /// lying within one is refused; one that only overlaps it is granted, and the messages on
    /// denied topics are not delivered.
    pub subscribe_deny: Vec<String>,
}

/// `mqtt.client_ids` when a user entry does not set it.
pub fn default_client_ids() -> Vec<String> {
    vec!["%u".into(), "%u-*".into()]
}

/// `mqtt.client_ids` when `[auth.anonymous]` does not set it: any id no user owns.
pub fn default_anonymous_client_ids() -> Vec<String> {
    vec!["*".into()]
}

/// A client-id rule after `%u` substitution: an exact id, or a prefix (the rule ended in `*`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ClientIdRule {
    pub literal: String,
    pub prefix: bool,
}

impl ClientIdRule {
    /// Compiles a rule for `user`; `None` if it is not a valid rule (`*` anywhere but at the end,
    /// `%c`, NUL, or empty).
    pub fn new(rule: &str, user: &str) -> Option<Self> {
        let (body, prefix) = match rule.strip_suffix('*') {
            Some(b) => (b, true),
            None => (rule, false),
        };
        if body.contains(['*', '\0']) || body.contains("%c") || (body.is_empty() && !prefix) {
            return None;
        }
        Some(Self { literal: body.replace("%u", user), prefix })
    }

    pub fn matches(&self, client_id: &str) -> bool {
        if self.prefix {
            client_id.starts_with(&self.literal)
        } else {
            client_id == self.literal
        }
    }

    /// Whether some client id matches both rules.
    pub fn overlaps(&self, other: &ClientIdRule) -> bool {
        let (short, long) = if self.literal.len() <= other.literal.len() { (self, other) } else { (other, self) };
        if short.literal == long.literal {
            return true;
        }
        short.prefix && long.literal.starts_with(&short.literal)
    }
}

/// The client-id rules of all users, for telling whether some user owns an id: exact ids in a
/// set, prefixes in a set with their lengths, so a look-up costs one probe per distinct prefix
/// length (not per rule).
#[derive(Debug, Default)]
pub struct ClientIdIndex {
    exact: HashSet<String>,
    prefixes: HashSet<String>,
    prefix_lens: BTreeSet<usize>,
}

impl ClientIdIndex {
    pub fn insert(&mut self, rule: &ClientIdRule) {
        if rule.prefix {
            self.prefix_lens.insert(rule.literal.len());
            self.prefixes.insert(rule.literal.clone());
        } else {
            self.exact.insert(rule.literal.clone());
        }
    }

    /// Whether one of the rules matches `client_id`.
    pub fn claims(&self, client_id: &str) -> bool {
        self.exact.contains(client_id)
            || self
                .prefix_lens
                .range(..=client_id.len())
                .any(|&n| client_id.get(..n).is_some_and(|p| self.prefixes.contains(p)))
    }
}

/// Finds two rules of different owners that can match the same client id, in O(n log n) given
/// at most `per_owner_max` rules per owner: sorted by literal, the rules a rule overlaps with
/// follow it directly, and the scan from a rule stops at the first rule of another owner.
/// `rules` are (rule, owner); the answer is the indexes of a clashing pair.
pub fn client_id_clash(rules: &[(ClientIdRule, usize)]) -> Option<(usize, usize)> {
    let mut order: Vec<usize> = (0..rules.len()).collect();
    order.sort_by(|&a, &b| rules[a].0.cmp(&rules[b].0));
    for (k, &i) in order.iter().enumerate() {
        let (rule, owner) = &rules[i];
        for &j in &order[k + 1..] {
            let (next, next_owner) = &rules[j];
            let within =
                if rule.prefix { next.literal.starts_with(&rule.literal) } else { next.literal == rule.literal };
            if !within {
                break;
            }
            if next_owner != owner {
                return Some((i, j));
            }
        }
    }
    None
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

/// A deny rule with `%u` and `%c` filled in. Where a value cannot be used (missing, or holding a
/// wildcard or level separator) the whole level becomes `+`: a deny rule only ever widens, so
/// `users/%u/#` denies every user's tree to a client without a user name.
pub fn substitute_deny(rule: &str, user: &str, client_id: &str) -> String {
    let safe = |v: &str| !v.is_empty() && !v.contains(['/', '+', '#', '\0']);
    let levels: Vec<String> = rule
        .split('/')
        .map(|level| {
            if (level.contains("%u") && !safe(user)) || (level.contains("%c") && !safe(client_id)) {
                "+".to_string()
            } else {
                level.replace("%u", user).replace("%c", client_id)
            }
        })
        .collect();
    levels.join("/")
}

/// Whether one of the deny `rules` (after substitution) covers `requested`: everything it can
/// match is denied.
pub fn mqtt_denied(rules: &[String], user: &str, client_id: &str, requested: &str) -> bool {
    rules.iter().any(|r| filter_covers(&substitute_deny(r, user, client_id), requested))
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
    fn client_id_rules_and_clashes() {
        let r = |rule: &str, user: &str| ClientIdRule::new(rule, user).expect("valid rule");
        assert!(r("%u", "alice").matches("alice") && !r("%u", "alice").matches("alice-1"));
        assert!(r("%u-*", "alice").matches("alice-1") && !r("%u-*", "alice").matches("alice"));
        assert!(r("*", "x").matches("anything"));
        for bad in ["a*b", "**", "%c", "", "a\0"] {
            assert!(ClientIdRule::new(bad, "u").is_none(), "{bad:?}");
        }
        let rules = |list: &[(&str, &str, usize)]| -> Vec<(ClientIdRule, usize)> {
            list.iter().map(|(rule, user, owner)| (r(rule, user), *owner)).collect()
        };
        // The defaults of alice and bob do not clash...
        let ok = rules(&[("%u", "alice", 0), ("%u-*", "alice", 0), ("%u", "bob", 1), ("%u-*", "bob", 1)]);
        assert_eq!(client_id_clash(&ok), None);
        // ...but those of meter and meter-7 do: "meter-*" matches "meter-7".
        let clash = rules(&[("%u", "meter", 0), ("%u-*", "meter", 0), ("%u", "meter-7", 1), ("%u-*", "meter-7", 1)]);
        let (a, b) = client_id_clash(&clash).expect("clash");
        assert_ne!(clash[a].1, clash[b].1);
        assert!(clash[a].0.overlaps(&clash[b].0));
        // Exact ids, equal literals of an exact id and a prefix, and rules of one owner.
        assert!(client_id_clash(&rules(&[("x", "", 0), ("x", "", 1)])).is_some());
        assert!(client_id_clash(&rules(&[("x*", "", 0), ("x", "", 1)])).is_some());
        assert!(client_id_clash(&rules(&[("x*", "", 0), ("x1", "", 0), ("x2*", "", 0), ("y", "", 1)])).is_none());
        assert!(client_id_clash(&rules(&[("x*", "", 0), ("x1", "", 0), ("x2*", "", 0), ("x3", "", 1)])).is_some());
        assert!(client_id_clash(&rules(&[("ab", "", 0), ("a", "", 1), ("abc*", "", 2)])).is_none());
        // Against a brute-force check on small rule sets.
        let lits = ["", "a", "ab", "abc", "b", "ba"];
        for x in 0..lits.len() * 2 {
            for y in 0..lits.len() * 2 {
                let mk = |i: usize| ClientIdRule { literal: lits[i / 2].to_string(), prefix: i % 2 == 1 };
                if mk(x).literal.is_empty() && !mk(x).prefix || mk(y).literal.is_empty() && !mk(y).prefix {
                    continue;
                }
                let pair = vec![(mk(x), 0), (mk(y), 1)];
                let brute = ["", "a", "ab", "abc", "abcd", "b", "ba", "bab", "c"]
                    .iter()
                    .any(|id| mk(x).matches(id) && mk(y).matches(id));
                assert_eq!(client_id_clash(&pair).is_some(), brute, "{:?} {:?}", mk(x), mk(y));
                assert_eq!(mk(x).overlaps(&mk(y)), brute);
            }
        }
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

    #[test]
    fn deny_rules_cover_what_they_name_and_only_widen() {
        let deny = vec!["test/nosubscribe".to_string(), "devices/%c/secret".to_string(), "users/%u/#".to_string()];
        let denied = |user: &str, cid: &str, req: &str| mqtt_denied(&deny, user, cid, req);
        assert!(denied("u", "d1", "test/nosubscribe"));
        // A filter that only overlaps a denied topic is not covered (it is filtered per message).
        assert!(!denied("u", "d1", "test/+") && !denied("u", "d1", "#") && !denied("u", "d1", "test/nosubscribe/#"));
        assert!(denied("u", "d1", "devices/d1/secret") && !denied("u", "d1", "devices/d2/secret"));
        assert!(denied("u", "d1", "users/u/x") && !denied("u", "d1", "users/v/x"));
        // Where a value cannot be substituted, the level denies every value.
        assert_eq!(substitute_deny("users/%u/#", "", "c"), "users/+/#");
        assert_eq!(substitute_deny("devices/%c/secret", "u", "a/b"), "devices/+/secret");
        assert_eq!(substitute_deny("x%u/y", "", "c"), "+/y");
        assert!(denied("", "d1", "users/anyone/x"), "no user name: %u denies every user's tree");
        assert!(denied("u", "+", "devices/d9/secret"), "client id '+': %c denies every device");
        // `#` does not reach `$` topics in deny rules either.
        assert!(!mqtt_denied(&["#".to_string()], "u", "c", "$SYS/x"));
    }

    #[test]
    fn client_id_index_matches_like_its_rules() {
        let rules: Vec<ClientIdRule> = [("alice", false), ("alice-", true), ("m", true), ("meter-7", false)]
            .iter()
            .map(|(l, p)| ClientIdRule { literal: l.to_string(), prefix: *p })
            .collect();
        let mut ix = ClientIdIndex::default();
        rules.iter().for_each(|r| ix.insert(r));
        for id in ["alice", "alice-1", "alicex", "al", "m", "meter-7", "x", "", "äm", "bob-alice"] {
            assert_eq!(ix.claims(id), rules.iter().any(|r| r.matches(id)), "{id:?}");
        }
        assert!(!ClientIdIndex::default().claims("anything"));
    }
}
