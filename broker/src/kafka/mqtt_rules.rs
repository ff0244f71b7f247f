//! MQTT publish rules on records produced through Kafka. A record's `mqtt.topic` header is the
//! topic MQTT subscribers receive it under, so with `[auth]` on a produced record carrying one is
//! accepted only if its producer may publish that MQTT topic: a Kafka write right on a log topic
//! does not stand in for an MQTT publish right. The same holds for the keys of records produced
//! to the retained messages' topic (`mqtt.retained`): each is the MQTT topic a retained message
//! is sent under. Records are decoded only when a user's rules do not already allow every topic,
//! so other producers pay nothing.

use std::borrow::Cow;

use crate::config::Codec;
use crate::security::User;
use crate::storage::batch::{BatchHeader, RecordIter, HEADER_LEN};
use crate::storage::compression;
use crate::topic::{self, HEADER_TOPIC, RETAINED_LOG_TOPIC};

/// Whether what `user` produces to `log_topic` must have its `mqtt.topic` headers checked. Not
/// when the user may publish every topic (`#`, checked with an empty client id, so `%c` rules
/// count for nothing) and denies none (`mqtt.publish_deny` empty); always for the broker's own
/// `__` log topics, where `$` topics are routed and which `#` does not cover, and for the
/// retained messages' topic (whose keys may name `$` topics too).
pub(crate) fn needs_check(user: &User, log_topic: &str) -> bool {
    log_topic.starts_with("__")
        || log_topic == RETAINED_LOG_TOPIC
        || !user.mqtt.publish_deny.is_empty()
        || !user.may_publish("", "#")
}

/// Checks every record of one batch produced to `log_topic`: `Err((index in the batch, why))`
/// for the first record with an `mqtt.topic` header the user may not publish (or that is not a
/// topic at all), or, in the retained messages' topic, whose key is not a topic name the user
/// may publish. A batch that cannot be read is refused too (the store would refuse it anyway).
pub(crate) fn check_batch(
    user: &User,
    log_topic: &str,
    batch: &[u8],
    decompressed_limit: u64,
) -> Result<(), (i32, String)> {
    let unreadable = |e: String| (-1, format!("records could not be read to check their {HEADER_TOPIC} headers: {e}"));
    let h = BatchHeader::parse(batch).map_err(|e| unreadable(e.to_string()))?;
    let end = h.total_len().min(batch.len());
    let payload = &batch[HEADER_LEN.min(end)..end];
    let codec = h.codec().map_err(|e| unreadable(e.to_string()))?;
    let data: Cow<'_, [u8]> = if codec == Codec::None {
        Cow::Borrowed(payload)
    } else {
        Cow::Owned(compression::decompress(codec, payload, decompressed_limit).map_err(|e| unreadable(e.to_string()))?)
    };
    for (index, record) in RecordIter::new(&data).enumerate() {
        let index = i32::try_from(index).unwrap_or(i32::MAX);
        let record = record.map_err(|e| unreadable(e.to_string()))?;
        if log_topic == RETAINED_LOG_TOPIC {
            let key = record.key.map(std::str::from_utf8);
            let ok = matches!(key, Some(Ok(t)) if topic::valid_topic(t) && user.may_publish("", t));
            if !ok {
                let shown = match key {
                    Some(Ok(t)) => format!("{t:?}"),
                    Some(Err(_)) => "bytes that are not UTF-8".into(),
                    None => "null".into(),
                };
                return Err((
                    index,
                    format!(
                        "record {index}: key {shown} in {RETAINED_LOG_TOPIC}: user {:?} may not publish it",
                        user.name
                    ),
                ));
            }
        }
        for (key, value) in record.headers() {
            if key != HEADER_TOPIC.as_bytes() {
                continue;
            }
            let refused = |what: String| {
                (
                    index,
                    format!("record {index}: header {HEADER_TOPIC} = {what}: user {:?} may not publish it", user.name),
                )
            };
            match value.map(std::str::from_utf8) {
                None => return Err(refused("null".into())),
                Some(Err(_)) => return Err(refused("bytes that are not UTF-8".into())),
                Some(Ok(topic)) if !user.may_publish("", topic) => return Err(refused(format!("{topic:?}"))),
                Some(Ok(_)) => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TimestampKind;
    use crate::security::{AuthConfig, UserConfig};
    use crate::storage::batch::{encode_batch, NewRecord};
    use bytes::Bytes;

    fn user(publish: &[&str]) -> std::sync::Arc<User> {
        user_denied(publish, &[])
    }

    fn user_denied(publish: &[&str], deny: &[&str]) -> std::sync::Arc<User> {
        let mut u = UserConfig { name: "app".into(), ..Default::default() };
        u.mqtt.publish = publish.iter().map(|s| s.to_string()).collect();
        u.mqtt.publish_deny = deny.iter().map(|s| s.to_string()).collect();
        let auth = crate::security::Auth::new(
            &AuthConfig { enabled: true, failure_delay_ms: 0, users: vec![u], anonymous: None },
            "auth",
        )
        .expect("auth");
        auth.user("app").expect("user")
    }

    fn batch(topics: &[Option<&[u8]>], codec: Codec) -> Vec<u8> {
        let records: Vec<NewRecord> = topics
            .iter()
            .map(|t| {
                let mut r = NewRecord::new(None::<Bytes>, "v");
                r.headers.push(("other".into(), Some(Bytes::from_static(b"x"))));
                if let Some(t) = t {
                    r.headers.push((HEADER_TOPIC.into(), Some(Bytes::copy_from_slice(t))));
                }
                r
            })
            .collect();
        let stamped: Vec<_> = records.iter().map(|r| (r, 0)).collect();
        let mut out = Vec::new();
        encode_batch(&stamped, 0, codec, TimestampKind::CreateTime, 0, &mut out).expect("encode");
        out
    }

    #[test]
    fn a_header_outside_the_publish_rules_is_refused_with_its_record() {
        let u = user(&["devices/%c/#", "status/%u/#"]);
        assert!(needs_check(&u, "readings"));
        let ok = batch(&[None, Some(b"status/app/x")], Codec::Gzip);
        assert_eq!(check_batch(&u, "readings", &ok, 1 << 20), Ok(()));
        for codec in [Codec::None, Codec::Zstd] {
            let bad = batch(&[Some(b"status/app/x"), None, Some(b"commands/meter-7/valve")], codec);
            let (index, why) = check_batch(&u, "readings", &bad, 1 << 20).unwrap_err();
            assert_eq!(index, 2, "{why}");
            assert!(
                why.contains("mqtt.topic") && why.contains("\"commands/meter-7/valve\"") && why.contains("app"),
                "{why}"
            );
        }
        // `%c` rules match nothing: Kafka has no MQTT client id.
        let (index, _) =
            check_batch(&u, "readings", &batch(&[Some(b"devices/x/t")], Codec::None), 1 << 20).unwrap_err();
        assert_eq!(index, 0);
        // Not a topic at all.
        assert!(check_batch(&u, "readings", &batch(&[Some(&[0xff, 0xfe])], Codec::None), 1 << 20).is_err());
        // Garbage is refused, not waved through.
        assert_eq!(check_batch(&u, "readings", b"short", 1 << 20).unwrap_err().0, -1);
    }

    #[test]
    fn only_users_without_hash_or_internal_topics_are_checked() {
        let all = user(&["#"]);
        assert!(!needs_check(&all, "readings"), "'#' allows every header: nothing to decode");
        assert!(needs_check(&all, "__sys"), "'#' does not cover $ topics, which route to __ topics");
        assert!(check_batch(&all, "readings", &batch(&[Some(b"$SYS/broker/x")], Codec::None), 1 << 20).is_err());
        assert!(needs_check(&user(&[]), "readings"));
    }

    #[test]
    fn publish_deny_wins_over_hash_for_produced_headers() {
        let u = user_denied(&["#"], &["commands/#"]);
        assert!(needs_check(&u, "readings"), "'#' with a deny rule does not allow every header");
        assert_eq!(check_batch(&u, "readings", &batch(&[Some(b"meters/1")], Codec::None), 1 << 20), Ok(()));
        let (index, _) =
            check_batch(&u, "readings", &batch(&[Some(b"meters/1"), Some(b"commands/valve")], Codec::None), 1 << 20)
                .unwrap_err();
        assert_eq!(index, 1);
    }

    /// A retained message produced through Kafka is sent to MQTT subscribers under its key: the
    /// key must be a topic name its producer may publish, whatever its rights on the log topic.
    #[test]
    fn keys_produced_to_the_retained_topic_follow_the_publish_rules() {
        let keyed = |keys: &[Option<&str>]| {
            let records: Vec<NewRecord> = keys.iter().map(|k| NewRecord::new(k.map(|k| k.to_string()), "v")).collect();
            let stamped: Vec<_> = records.iter().map(|r| (r, 0)).collect();
            let mut out = Vec::new();
            encode_batch(&stamped, 0, Codec::Lz4, TimestampKind::CreateTime, 0, &mut out).expect("encode");
            out
        };
        let u = user(&["meters/#"]);
        assert!(needs_check(&u, RETAINED_LOG_TOPIC));
        assert!(needs_check(&user(&["#"]), RETAINED_LOG_TOPIC), "'#' does not cover $ keys");
        let check = |u: &User, keys: &[Option<&str>]| check_batch(u, RETAINED_LOG_TOPIC, &keyed(keys), 1 << 20);
        assert_eq!(check(&u, &[Some("meters/1/state"), Some("meters/2/state")]), Ok(()));
        let (index, why) = check(&u, &[Some("meters/1/state"), Some("commands/valve")]).unwrap_err();
        assert_eq!(index, 1, "{why}");
        assert!(why.contains("\"commands/valve\"") && why.contains("mqtt.retained"), "{why}");
        assert_eq!(check(&u, &[Some("meters/#")]).unwrap_err().0, 0, "not a topic name");
        assert_eq!(check(&u, &[None]).unwrap_err().0, 0, "no key");
        assert_eq!(check(&user(&["#"]), &[Some("$SYS/broker/uptime")]).unwrap_err().0, 0, "a $ topic");
        // Keys of other log topics are not topics.
        assert_eq!(check_batch(&u, "readings", &keyed(&[Some("commands/valve")]), 1 << 20), Ok(()));
    }
}
