//! MQTT 5 behaviour end to end (issue 14): raw packets where the detail is a reason code or a
//! property a client library hides, rumqttc v5 where a real client shows it. Each test names
//! the clause of the OASIS MQTT 5.0 text it checks.

use std::io::Write;
use std::sync::atomic::Ordering;

use tributary_broker::mqtt::MqttConfig;

use crate::mqtt_faults::{connected, packet, publish, read_packet};
use crate::support::{read_all, KafkaBroker};

/// 3.3.2.3.2: a receiver may check that a payload whose Payload Format Indicator is 1 is UTF-8,
/// and refuse it with 0x99 "payload format invalid". Tributary does (PUBACK/PUBREC 0x99; QoS 0:
/// dropped), counts it, stores nothing, and the connection stays; UTF-8 with the indicator is
/// stored.
#[tokio::test]
async fn a_payload_that_is_not_the_utf_8_it_claims_is_refused_0x99_mqtt_3_3_2_3_2() {
    let broker = KafkaBroker::start_with_mqtt(MqttConfig::default()).await;
    let addr = broker.mqtt;
    // PUBLISH with the property Payload Format Indicator (0x01) = 1.
    let utf8_marked = |qos: u8, pkid: u16, payload: &[u8]| {
        let mut b = vec![0, 8];
        b.extend_from_slice(b"meters/7");
        if qos > 0 {
            b.extend_from_slice(&pkid.to_be_bytes());
        }
        b.extend_from_slice(&[2, 0x01, 1]);
        b.extend_from_slice(payload);
        packet(0x30 | (qos << 1), &b)
    };
    tokio::task::spawn_blocking(move || {
        let mut c = connected(addr, 5, "format-5");
        c.write_all(&utf8_marked(1, 1, b"\xff\xfe")).expect("send");
        assert_eq!(read_packet(&mut c), Some((0x40, vec![0, 1, 0x99, 0])), "PUBACK 0x99");
        c.write_all(&utf8_marked(2, 2, b"caf\xc3")).expect("send");
        assert_eq!(read_packet(&mut c), Some((0x50, vec![0, 2, 0x99, 0])), "PUBREC 0x99");
        c.write_all(&utf8_marked(0, 0, b"\x80")).expect("send");
        c.write_all(&utf8_marked(1, 3, "café".as_bytes())).expect("send");
        assert_eq!(read_packet(&mut c), Some((0x40, vec![0, 3])), "still connected: UTF-8 is taken");
    })
    .await
    .expect("client");
    assert_eq!(broker.mqtt_stats.publishes_payload_invalid.load(Ordering::Relaxed), 3);
    let payloads: Vec<Vec<u8>> = read_all(&broker.store, "mqtt", 0)
        .iter()
        .filter(|r| r.headers.iter().any(|(k, v)| k == "mqtt.topic" && v.as_deref() == Some(&b"meters/7"[..])))
        .map(|r| r.value.as_deref().unwrap_or_default().to_vec())
        .collect();
    assert_eq!(payloads, ["café".as_bytes().to_vec()], "only the UTF-8 payload was stored");
}

/// 4.7.2, [MQTT-4.7.2-1]: `$TopicA/B` is a valid topic name, but `$` topics are the broker's. A
/// client publish to one is refused as an ACL denial is (MQTT 5: PUBACK/PUBREC 0x90 "topic
/// name invalid"; 3.1.1: acknowledged and dropped), counted, nothing is stored, and the
/// connection stays.
#[tokio::test]
async fn a_publish_to_a_dollar_topic_is_refused_and_the_connection_stays_mqtt_4_7_2_1() {
    let broker = KafkaBroker::start_with_mqtt(MqttConfig::default()).await;
    let addr = broker.mqtt;
    tokio::task::spawn_blocking(move || {
        let mut v5 = connected(addr, 5, "dollar-5");
        v5.write_all(&publish(1, b"$TopicA/B", 1, b"x", true)).expect("send");
        assert_eq!(read_packet(&mut v5), Some((0x40, vec![0, 1, 0x90, 0])), "PUBACK 0x90");
        v5.write_all(&publish(2, b"$TopicA/B", 2, b"x", true)).expect("send");
        assert_eq!(read_packet(&mut v5), Some((0x50, vec![0, 2, 0x90, 0])), "PUBREC 0x90");
        v5.write_all(&publish(1, b"TopicA/B", 3, b"kept", true)).expect("send");
        assert_eq!(read_packet(&mut v5), Some((0x40, vec![0, 3])), "still connected: PUBACK");
        let mut v4 = connected(addr, 4, "dollar-4");
        v4.write_all(&publish(1, b"$SYS/broker/version", 1, b"fake", false)).expect("send");
        assert_eq!(read_packet(&mut v4), Some((0x40, vec![0, 1])), "3.1.1: acknowledged");
        v4.write_all(&[0xC0, 0]).expect("PINGREQ");
        assert_eq!(read_packet(&mut v4), Some((0xD0, vec![])), "still connected: PINGRESP");
    })
    .await
    .expect("client");
    assert_eq!(broker.mqtt_stats.publishes_reserved.load(Ordering::Relaxed), 3);
    let topics: Vec<String> = read_all(&broker.store, "mqtt", 0)
        .iter()
        .filter_map(|r| r.headers.iter().find(|(k, _)| k == "mqtt.topic"))
        .filter_map(|(_, v)| v.as_ref().map(|v| String::from_utf8_lossy(v).into_owned()))
        .collect();
    assert_eq!(topics, ["TopicA/B"], "only the plain publish was stored");
}

use rumqttc::v5::mqttbytes::v5::{Filter, Packet as P5, Publish, RetainForwardRule, SubscribeProperties};
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::AsyncClient as Client5;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::mqtt::{next, pump5};

/// A connected rumqttc v5 client (clean start) and its incoming packets, CONNACK first.
pub(crate) fn client5(broker: &KafkaBroker, id: &str) -> (Client5, UnboundedReceiver<P5>) {
    client5_at(broker.mqtt.port(), id)
}

/// An MQTT 5 client of the listener on `port` of 127.0.0.1 (a gateway run as a child process).
pub(crate) fn client5_at(port: u16, id: &str) -> (Client5, UnboundedReceiver<P5>) {
    let mut o = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(std::time::Duration::from_secs(10));
    let (c, ev) = Client5::new(o, 100);
    (c, pump5(ev))
}

pub(crate) async fn next_publish(rx: &mut UnboundedReceiver<P5>, what: &str) -> Publish {
    match next(rx, what, |p| matches!(p, P5::Publish(_))).await {
        P5::Publish(p) => p,
        _ => unreachable!(),
    }
}

pub(crate) async fn suback(rx: &mut UnboundedReceiver<P5>, what: &str) {
    next(rx, what, |p| matches!(p, P5::SubAck(_))).await;
}

/// Publishes at QoS 1 and waits for the PUBACK.
async fn publish_acked(c: &Client5, rx: &mut UnboundedReceiver<P5>, topic: &str, retain: bool, payload: &str) {
    c.publish(topic, Q5::AtLeastOnce, retain, payload.to_string()).await.expect("publish");
    next(rx, "PUBACK", |p| matches!(p, P5::PubAck(_))).await;
}

fn ids(p: &Publish) -> Vec<usize> {
    p.properties.as_ref().map(|p| p.subscription_identifiers.clone()).unwrap_or_default()
}

fn with_id(id: usize) -> SubscribeProperties {
    SubscribeProperties { id: Some(id), user_properties: Vec::new() }
}

/// 3.2.2.3.11/12: CONNACK says shared subscriptions and subscription identifiers are available,
/// and both are served: 3.3.4 / [MQTT-3.3.4-3/5]: a message delivered for subscriptions with
/// identifiers carries every matching one (a retained message sent on subscribe, one matching
/// two subscriptions, one from a shared subscription: 3.8.2.1.2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connack_claims_shared_subscriptions_and_identifiers_and_both_are_served_mqtt_3_3_4_3() {
    let broker = KafkaBroker::start_with_mqtt(MqttConfig::default()).await;
    let (publ, mut prx) = client5(&broker, "ids-pub");
    publish_acked(&publ, &mut prx, "ids/r", true, "retained").await;
    let (sub, mut rx) = client5(&broker, "ids-sub");
    let connack = match next(&mut rx, "CONNACK", |p| matches!(p, P5::ConnAck(_))).await {
        P5::ConnAck(c) => c,
        _ => unreachable!(),
    };
    let props = connack.properties.expect("CONNACK properties");
    assert_eq!(props.shared_subscription_available, Some(1), "3.2.2.3.15");
    assert_ne!(props.subscription_identifiers_available, Some(0), "3.2.2.3.12: absent or 1 claims support");

    sub.subscribe_with_properties("ids/#", Q5::AtLeastOnce, with_id(7)).await.expect("subscribe");
    suback(&mut rx, "SUBACK ids/#").await;
    let p = next_publish(&mut rx, "the retained message").await;
    assert_eq!((&p.topic[..], p.retain, ids(&p)), (&b"ids/r"[..], true, vec![7]));

    sub.subscribe_with_properties("+/live", Q5::AtLeastOnce, with_id(300)).await.expect("subscribe");
    suback(&mut rx, "SUBACK +/live").await;
    sub.subscribe_with_properties("$share/g/shared/#", Q5::AtLeastOnce, with_id(9)).await.expect("subscribe");
    suback(&mut rx, "SUBACK shared").await;
    publish_acked(&publ, &mut prx, "ids/live", false, "both").await;
    let p = next_publish(&mut rx, "a message two subscriptions match").await;
    assert_eq!((&p.topic[..], ids(&p)), (&b"ids/live"[..], vec![7, 300]), "one PUBLISH, both identifiers");
    publish_acked(&publ, &mut prx, "shared/x", false, "shared").await;
    let p = next_publish(&mut rx, "a shared subscription's message").await;
    assert_eq!((&p.topic[..], ids(&p)), (&b"shared/x"[..], vec![9]));
}

fn filter(path: &str, rule: RetainForwardRule, retain_as_published: bool) -> Filter {
    Filter {
        path: path.into(),
        qos: Q5::AtLeastOnce,
        nolocal: false,
        preserve_retain: retain_as_published,
        retain_forward_rule: rule,
    }
}

/// [MQTT-3.3.1-9/10/11]: Retain Handling 0 sends the retained messages on every SUBSCRIBE, 1 only
/// when the subscription is new, 2 never. [MQTT-3.3.1-12/13]: Retain As Published 0 forwards
/// with RETAIN 0, 1 with the flag the message was published with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_handling_and_retain_as_published_mqtt_3_3_1_9_to_13() {
    let broker = KafkaBroker::start_with_mqtt(MqttConfig::default()).await;
    let (publ, mut prx) = client5(&broker, "rh-pub");
    publish_acked(&publ, &mut prx, "rh/a", true, "old").await;
    let (sub, mut rx) = client5(&broker, "rh-sub");
    // After each SUBACK a marker is published: it must be the next message, with no retained one
    // in between.
    sub.subscribe_many([filter("rh/#", RetainForwardRule::OnNewSubscribe, false)]).await.expect("subscribe");
    suback(&mut rx, "SUBACK 1").await;
    let p = next_publish(&mut rx, "retained, a new subscription (Retain Handling 1)").await;
    assert_eq!((&p.topic[..], p.retain), (&b"rh/a"[..], true));

    sub.subscribe_many([filter("rh/#", RetainForwardRule::OnNewSubscribe, false)]).await.expect("subscribe");
    suback(&mut rx, "SUBACK 2").await;
    publish_acked(&publ, &mut prx, "rh/m1", false, "marker").await;
    let p = next_publish(&mut rx, "the marker").await;
    assert_eq!(&p.topic[..], b"rh/m1", "Retain Handling 1 on an existing subscription resent a retained message");
    assert!(!p.retain, "Retain As Published 0: RETAIN 0");

    sub.subscribe_many([filter("rh/+", RetainForwardRule::Never, false)]).await.expect("subscribe");
    suback(&mut rx, "SUBACK 3").await;
    publish_acked(&publ, &mut prx, "rh/m2", false, "marker").await;
    let p = next_publish(&mut rx, "the marker").await;
    assert_eq!(&p.topic[..], b"rh/m2", "Retain Handling 2 sent a retained message");

    sub.subscribe_many([filter("rh/#", RetainForwardRule::OnEverySubscribe, false)]).await.expect("subscribe");
    suback(&mut rx, "SUBACK 4").await;
    let p = next_publish(&mut rx, "retained again (Retain Handling 0)").await;
    assert_eq!((&p.topic[..], p.retain), (&b"rh/a"[..], true));

    // Retain As Published: the same retained publish, seen by two subscribers.
    let (keep, mut krx) = client5(&broker, "rap-1");
    keep.subscribe_many([filter("rap/#", RetainForwardRule::Never, true)]).await.expect("subscribe");
    suback(&mut krx, "SUBACK rap 1").await;
    let (plain, mut plrx) = client5(&broker, "rap-0");
    plain.subscribe_many([filter("rap/#", RetainForwardRule::Never, false)]).await.expect("subscribe");
    suback(&mut plrx, "SUBACK rap 0").await;
    publish_acked(&publ, &mut prx, "rap/x", true, "r").await;
    publish_acked(&publ, &mut prx, "rap/y", false, "n").await;
    for (rx, rap) in [(&mut krx, true), (&mut plrx, false)] {
        let p = next_publish(rx, "rap/x").await;
        assert_eq!((&p.topic[..], p.retain), (&b"rap/x"[..], rap), "Retain As Published {rap}");
        let p = next_publish(rx, "rap/y").await;
        assert_eq!((&p.topic[..], p.retain), (&b"rap/y"[..], false));
    }
}

/// 3.14.2.2.2: a Session Expiry Interval in DISCONNECT replaces the CONNECT's: set to 0, the
/// session ends with the connection (no session present on return); [MQTT-3.14.2-2]: setting
/// one when CONNECT had 0 is a protocol error (DISCONNECT 0x82).
#[tokio::test]
async fn session_expiry_in_disconnect_replaces_the_connects_mqtt_3_14_2_2_2() {
    use crate::mqtt_faults::packet;
    use crate::mqtt_limits::connected as connected_with;
    let broker = KafkaBroker::start_with_mqtt(MqttConfig::default()).await;
    let addr = broker.mqtt;
    tokio::task::spawn_blocking(move || {
        let expiry_60 = [0x11, 0, 0, 0, 60];
        // Kept for 60 s, but the DISCONNECT says 0.
        let (mut s, code, present) = connected_with(addr, 5, "expiry", 0x00, &expiry_60);
        assert_eq!((code, present), (0, false));
        s.write_all(&packet(0xE0, &[0, 5, 0x11, 0, 0, 0, 0])).expect("DISCONNECT");
        assert_eq!(read_packet(&mut s), None, "closed");
        let (mut s, code, present) = connected_with(addr, 5, "expiry", 0x00, &expiry_60);
        assert_eq!((code, present), (0, false), "the session ended with the DISCONNECT");
        // Kept for 60 s, and the DISCONNECT keeps it (an expiry other than 0 replaces 60).
        s.write_all(&packet(0xE0, &[0, 5, 0x11, 0, 0, 0, 30])).expect("DISCONNECT");
        assert_eq!(read_packet(&mut s), None, "closed");
        let (_s, code, present) = connected_with(addr, 5, "expiry", 0x00, &expiry_60);
        assert_eq!((code, present), (0, true), "kept");
        // No expiry at CONNECT, one at DISCONNECT: protocol error.
        let (mut s, code, _) = connected_with(addr, 5, "no-expiry", 0x02, &[]);
        assert_eq!(code, 0);
        s.write_all(&packet(0xE0, &[0, 5, 0x11, 0, 0, 0, 30])).expect("DISCONNECT");
        assert_eq!(read_packet(&mut s), Some((0xE0, vec![0x82, 0])), "DISCONNECT 0x82");
    })
    .await
    .expect("client");
}

/// [MQTT-3.3.4-9], 4.9: a client that sends more QoS 2 publishes than the server's Receive
/// Maximum without completing them (PUBREC'd, no PUBREL yet) is disconnected with 0x93; the
/// PUBCOMP of one frees its slot.
#[tokio::test]
async fn uncompleted_qos2_publishes_beyond_the_receive_maximum_are_disconnect_0x93_mqtt_3_3_4_9() {
    use crate::mqtt_faults::packet;
    use crate::mqtt_limits::connected as connected_with;
    let broker = KafkaBroker::start_with_mqtt(MqttConfig { inflight_messages_max: 4, ..MqttConfig::default() }).await;
    let addr = broker.mqtt;
    tokio::task::spawn_blocking(move || {
        let (mut s, code, _) = connected_with(addr, 5, "greedy", 0x02, &[]);
        assert_eq!(code, 0);
        for pkid in 1..=4u16 {
            s.write_all(&publish(2, b"q2/x", pkid, b"x", true)).expect("send");
            let (kind, body) = read_packet(&mut s).expect("PUBREC");
            assert_eq!((kind, &body[..2]), (0x50, &pkid.to_be_bytes()[..]));
        }
        // PUBREL 1 -> PUBCOMP 1 frees one slot.
        s.write_all(&packet(0x62, &[0, 1])).expect("PUBREL");
        assert_eq!(read_packet(&mut s), Some((0x70, vec![0, 1])));
        s.write_all(&publish(2, b"q2/x", 5, b"x", true)).expect("send");
        assert_eq!(read_packet(&mut s).map(|p| p.0), Some(0x50), "within the Receive Maximum");
        s.write_all(&publish(2, b"q2/x", 6, b"x", true)).expect("send");
        assert_eq!(read_packet(&mut s), Some((0xE0, vec![0x93, 0])), "DISCONNECT receive maximum exceeded");
        assert_eq!(read_packet(&mut s), None, "closed");
    })
    .await
    .expect("client");
    let stored = read_all(&broker.store, "mqtt", 0).len();
    assert_eq!(stored, 5, "the sixth was not stored");
}

/// A v5 CONNECT (clean start) with a QoS 0 will on `will/{id}` whose properties are `props`.
fn connect_with_will(id: &str, props: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x06, 0, 60, 0];
    b.extend_from_slice(&(id.len() as u16).to_be_bytes());
    b.extend_from_slice(id.as_bytes());
    b.push(props.len() as u8);
    b.extend_from_slice(props);
    let topic = format!("will/{id}");
    b.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    b.extend_from_slice(topic.as_bytes());
    b.extend_from_slice(&4u16.to_be_bytes());
    b.extend_from_slice(b"gone");
    crate::mqtt_faults::packet(0x10, &b)
}

/// [MQTT-3.3.2-4]: the Payload Format Indicator reaches the subscriber unaltered. 3.3.1.3:
/// a retained message keeps every property (user properties, content type, correlation data,
/// response topic, payload format) and [MQTT-3.3.2-5] its expiry: once passed, it is no longer
/// sent, and the scan that finds it so deletes it. [MQTT-3.1.3-10]: a will message keeps its
/// properties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_and_will_messages_keep_their_properties_and_expiry_mqtt_3_3_2_5() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    let broker = KafkaBroker::start_with_mqtt(MqttConfig::default()).await;
    let (publ, mut prx) = client5(&broker, "props-pub");
    let props = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("text/plain".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"corr-7")),
        response_topic: Some("replies/7".into()),
        user_properties: vec![("site".into(), "north".into()), ("site".into(), "south".into())],
        ..PublishProperties::default()
    };
    for (topic, expiry) in [("props/kept", None), ("props/short", Some(1))] {
        let p = PublishProperties { message_expiry_interval: expiry, ..props.clone() };
        publ.publish_with_properties(topic, Q5::AtLeastOnce, true, "retained", p).await.expect("publish");
        next(&mut prx, "PUBACK", |p| matches!(p, P5::PubAck(_))).await;
    }
    let started = std::time::Instant::now();
    let (sub, mut rx) = client5(&broker, "props-sub");
    sub.subscribe("props/#", Q5::AtLeastOnce).await.expect("subscribe");
    suback(&mut rx, "SUBACK").await;
    let mut got = std::collections::BTreeMap::new();
    while got.len() < 2 {
        let p = next_publish(&mut rx, "the retained messages").await;
        got.insert(String::from_utf8_lossy(&p.topic).into_owned(), p);
    }
    for (topic, p) in &got {
        assert!(p.retain, "{topic}");
        let mut seen = p.properties.clone().expect("properties");
        let expiry = seen.message_expiry_interval.take();
        assert_eq!(seen, props, "{topic}: every property kept");
        assert_eq!(expiry.is_some(), topic == "props/short", "{topic}: expiry {expiry:?}");
        assert!(expiry.unwrap_or(0) <= 1);
    }
    // Live messages carry the Payload Format Indicator too.
    let p = PublishProperties { payload_format_indicator: Some(0), ..PublishProperties::default() };
    publ.publish_with_properties("props/live", Q5::AtLeastOnce, false, "x", p).await.expect("publish");
    let live = next_publish(&mut rx, "the live message").await;
    assert_eq!(live.properties.and_then(|p| p.payload_format_indicator), Some(0));

    // Past its expiry, the short-lived retained message is no longer sent.
    tokio::time::sleep(std::time::Duration::from_millis(1100).saturating_sub(started.elapsed())).await;
    let (late, mut lrx) = client5(&broker, "props-late");
    late.subscribe("props/+", Q5::AtLeastOnce).await.expect("subscribe");
    suback(&mut lrx, "SUBACK").await;
    let p = next_publish(&mut lrx, "the retained message without expiry").await;
    assert_eq!(&p.topic[..], b"props/kept");
    publ.publish("props/end", Q5::AtLeastOnce, false, "end").await.expect("publish");
    let p = next_publish(&mut lrx, "the marker").await;
    assert_eq!(&p.topic[..], b"props/end", "an expired retained message was sent");
    // The scan that found it expired deleted it (before it sent on): only `props/kept` is left.
    assert_eq!(broker.mqtt_stats.retained_expired_deleted.load(Ordering::Relaxed), 1);
    assert_eq!(broker.mqtt_stats.retained_messages.load(Ordering::Relaxed), 1);
    // In the retained topic: a tombstone ([MQTT-3.3.1-6/7] null value) for the expired one.
    let view = crate::support::retained_view(&broker.store);
    let left: Vec<(&str, bool)> = view.iter().map(|(k, v)| (k.as_str(), v.is_some())).collect();
    assert_eq!(left, [("props/kept", true), ("props/short", false)], "the expired retained message is deleted");
    // The first subscriber gets the marker too (`props/#`): taken here, so the will below is
    // the next message it sees.
    let p = next_publish(&mut rx, "the marker on the first subscriber").await;
    assert_eq!(&p.topic[..], b"props/end");

    // A will with properties, published when its client goes away without DISCONNECT.
    sub.subscribe("will/#", Q5::AtMostOnce).await.expect("subscribe");
    suback(&mut rx, "SUBACK will").await;
    let mut will_props = vec![0x01, 1, 0x03, 0, 4];
    will_props.extend_from_slice(b"text");
    will_props.extend_from_slice(&[0x26, 0, 1, b'k', 0, 1, b'v', 0x08, 0, 3]);
    will_props.extend_from_slice(b"r/t");
    will_props.extend_from_slice(&[0x09, 0, 1, b'c']);
    let addr = broker.mqtt;
    tokio::task::spawn_blocking(move || {
        let mut s = crate::mqtt_faults::open(addr);
        s.write_all(&connect_with_will("dying", &will_props)).expect("CONNECT");
        assert_eq!(read_packet(&mut s).map(|p| p.0), Some(0x20), "CONNACK");
        drop(s);
    })
    .await
    .expect("will client");
    let p = next_publish(&mut rx, "the will").await;
    assert_eq!(&p.topic[..], b"will/dying");
    let wp = p.properties.expect("will properties");
    assert_eq!(wp.payload_format_indicator, Some(1));
    assert_eq!(wp.content_type.as_deref(), Some("text"));
    assert_eq!(wp.user_properties, vec![("k".to_string(), "v".to_string())]);
    assert_eq!(wp.response_topic.as_deref(), Some("r/t"));
    assert_eq!(wp.correlation_data.as_deref(), Some(&b"c"[..]));
}

/// 3.3.2.3.4: the server assigns topic aliases to its own PUBLISHes, within the Topic Alias
/// Maximum the client sent (here 10) and `mqtt.topic_aliases_out_max` (here 2): a real client
/// (rumqttc v5) resolves them, and the topics past the limit go out in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_assigns_topic_aliases_a_real_client_resolves_mqtt_3_3_2_3_4() {
    let broker = KafkaBroker::start_with_mqtt(MqttConfig { topic_aliases_out_max: 2, ..MqttConfig::default() }).await;
    let (publ, mut prx) = client5(&broker, "alias-pub");
    let mut o = rumqttc::v5::MqttOptions::new("alias-sub", "127.0.0.1", broker.mqtt.port());
    o.set_keep_alive(std::time::Duration::from_secs(10));
    o.set_topic_alias_max(Some(10));
    let (sub, ev) = Client5::new(o, 100);
    let mut rx = pump5(ev);
    sub.subscribe("al/#", Q5::AtMostOnce).await.expect("subscribe");
    suback(&mut rx, "SUBACK").await;
    let topics = ["al/a", "al/a", "al/b", "al/c", "al/b", "al/c"];
    for t in topics {
        publish_acked(&publ, &mut prx, t, false, t).await;
    }
    // rumqttc checks every alias it gets (an unknown one is a protocol error that ends the
    // connection) but hands the packet over as sent: resolved here the same way.
    let mut aliases = std::collections::HashMap::new();
    let mut got = Vec::new();
    for _ in topics {
        let p = next_publish(&mut rx, "an aliased message").await;
        let alias = p.properties.as_ref().and_then(|p| p.topic_alias);
        let sent = String::from_utf8_lossy(&p.topic).into_owned();
        let topic = match (sent.as_str(), alias) {
            ("", Some(a)) => aliases.get(&a).cloned().expect("a known alias"),
            (t, Some(a)) => {
                aliases.insert(a, t.to_string());
                t.to_string()
            }
            (t, None) => t.to_string(),
        };
        assert_eq!(p.payload, topic.as_bytes(), "the alias stands for the topic published to");
        got.push((sent, alias));
    }
    let want = [("al/a", Some(1)), ("", Some(1)), ("al/b", Some(2)), ("al/c", None), ("", Some(2)), ("al/c", None)];
    let want: Vec<(String, Option<u16>)> = want.iter().map(|(t, a)| (t.to_string(), *a)).collect();
    assert_eq!(got, want, "two aliases (mqtt.topic_aliases_out_max), the topic left out once set");
}

/// 3.2.2.3.14, [MQTT-3.2.2-21]: with `mqtt.server_keep_alive_s` set, CONNACK carries Server
/// Keep Alive, and the server holds an MQTT 5 client to it (not to the 60 s the client asked
/// for): silent for 1.5 times it, the client gets DISCONNECT 0x8D "keep alive timeout".
#[tokio::test]
async fn server_keep_alive_is_announced_and_enforced_mqtt_3_2_2_21() {
    use crate::mqtt_limits::connect;
    let broker = KafkaBroker::start_with_mqtt(MqttConfig { server_keep_alive_s: 1, ..MqttConfig::default() }).await;
    let addr = broker.mqtt;
    tokio::task::spawn_blocking(move || {
        let mut s = crate::mqtt_faults::open(addr);
        s.write_all(&connect(5, b"sleepy", 0x02, &[])).expect("CONNECT (keep-alive 60 s)");
        let started = std::time::Instant::now();
        let (kind, body) = read_packet(&mut s).expect("CONNACK");
        assert_eq!((kind, body[1]), (0x20, 0));
        assert!(body.windows(3).any(|w| w == [0x13, 0, 1]), "Server Keep Alive 1 in {body:?}");
        assert_eq!(read_packet(&mut s), Some((0xE0, vec![0x8D, 0])), "DISCONNECT keep alive timeout");
        let waited = started.elapsed();
        assert!(waited >= std::time::Duration::from_millis(1400) && waited < std::time::Duration::from_secs(10), "{waited:?}");
        // A 3.1.1 client cannot be told: its own keep-alive stands.
        let mut v4 = connected(addr, 4, "sleepy-4");
        v4.set_read_timeout(Some(std::time::Duration::from_secs(3))).expect("timeout");
        let mut one = [0u8; 1];
        let r = std::io::Read::read(&mut v4, &mut one);
        assert!(matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut), "3.1.1 client closed: {r:?}");
    })
    .await
    .expect("client");
}

/// The properties of a QoS 1/2 PUBLISH received on a raw v5 connection (a short property
/// length: one byte).
fn publish_props(body: &[u8]) -> Vec<u8> {
    let at = 2 + usize::from(u16::from_be_bytes([body[0], body[1]])) + 2;
    let len = usize::from(body[at]);
    body[at + 1..at + 1 + len].to_vec()
}

/// 3.3.4: a message a persistent session had in flight is sent again after a reconnect (DUP
/// set) with the Subscription Identifier of the subscription it is delivered for.
#[tokio::test]
async fn a_message_resent_after_a_reconnect_keeps_its_subscription_identifier_mqtt_3_3_4() {
    use crate::mqtt_faults::packet;
    use crate::mqtt_limits::connected as connected_with;
    let broker = KafkaBroker::start_with_mqtt(MqttConfig::default()).await;
    let addr = broker.mqtt;
    tokio::task::spawn_blocking(move || {
        let expiry = [0x11, 0, 0, 0, 60];
        let (mut s, code, _) = connected_with(addr, 5, "resend-ids", 0x00, &expiry);
        assert_eq!(code, 0);
        // SUBSCRIBE rs/# at QoS 1 with Subscription Identifier 42.
        let mut b = vec![0, 1, 2, 0x0B, 42, 0, 4];
        b.extend_from_slice(b"rs/#");
        b.push(1);
        s.write_all(&packet(0x82, &b)).expect("SUBSCRIBE");
        assert_eq!(read_packet(&mut s).map(|p| p.0), Some(0x90), "SUBACK");
        let mut p = connected(addr, 5, "resend-pub");
        p.write_all(&publish(1, b"rs/x", 1, b"hello", true)).expect("PUBLISH");
        assert_eq!(read_packet(&mut p).map(|p| p.0), Some(0x40), "PUBACK");
        let (kind, body) = read_packet(&mut s).expect("PUBLISH");
        assert_eq!(kind, 0x32, "QoS 1, not DUP");
        assert!(publish_props(&body).windows(2).any(|w| w == [0x0B, 42]), "identifier 42 in {body:?}");
        drop(s); // never acknowledged
        let (mut s, code, present) = connected_with(addr, 5, "resend-ids", 0x00, &expiry);
        assert_eq!((code, present), (0, true));
        let (kind, body) = read_packet(&mut s).expect("PUBLISH again");
        assert_eq!(kind, 0x3A, "QoS 1 with DUP");
        assert!(publish_props(&body).windows(2).any(|w| w == [0x0B, 42]), "identifier 42 in {body:?}");
    })
    .await
    .expect("client");
}
