//! MQTT topic names and filters: validity and matching, including the rule that `#` and `+` at
//! the first level do not match topics starting with `$` (MQTT 3.1.1 4.7.2, 5.0 4.7.2), and the
//! record header carrying a record's MQTT topic, and the retained messages' log topic. Shared by the MQTT front end, the ACLs and the
//! Kafka front end's publish rules, so none of them imports another for it.

/// The record header holding the MQTT topic a record was published to (or is delivered under).
pub const HEADER_TOPIC: &str = "mqtt.topic";

/// The log topic of the retained messages, keyed by MQTT topic (see `mqtt/retained.rs`): its
/// record keys are MQTT topics too, so the Kafka front end checks them against the publish rules.
pub const RETAINED_LOG_TOPIC: &str = "mqtt.retained";

/// A topic name clients may publish to: non-empty, no wildcards, no NUL.
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// A subscription filter: `+` fills a whole level, `#` is the whole last level.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i != levels.len() - 1) {
            return false;
        }
        if l.contains('+') && *l != "+" {
            return false;
        }
    }
    true
}

/// Whether `topic` (a valid topic name) matches `filter` (a valid filter).
pub fn matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut t = topic.split('/');
    let mut f = filter.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_and_matching() {
        for f in ["#", "+", "a/+/c", "a/#", "+/+", "/", "a//b"] {
            assert!(valid_filter(f), "{f}");
        }
        for f in ["", "a/#/c", "a#", "a/b+", "#/"] {
            assert!(!valid_filter(f), "{f}");
        }
        assert!(valid_topic("a/b") && !valid_topic("a/+") && !valid_topic("a/#") && !valid_topic(""));
        assert!(matches("a/b/c", "a/+/c"));
        assert!(matches("a/b/c", "a/#"));
        assert!(matches("a", "a/#"), "# also matches the parent level");
        assert!(!matches("a/b", "a/+/c"));
        assert!(!matches("a/b/c", "a/+"));
        assert!(matches("/x", "+/x"));
        assert!(!matches("$SYS/load", "#"), "$ topics are not matched by a leading wildcard");
        assert!(!matches("$SYS/load", "+/load"));
        assert!(matches("$SYS/load", "$SYS/#"));
    }
}
