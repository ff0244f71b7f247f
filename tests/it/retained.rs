//! MQTT retained messages as the compacted log topic `mqtt.retained`: through a restart with their
//! MQTT 5 properties, cleared by an empty payload (a tombstone a Kafka consumer sees), counted in
//! the disk budget, and moved there from the previous releases' `kv.mqtt_retained` on first start.

use std::sync::atomic::Ordering;

use rdkafka::message::{Headers, Message as _};
use rumqttc::v5::mqttbytes::v5::{Packet as P5, PublishProperties};
use rumqttc::v5::mqttbytes::QoS as Q5;
use tributary_broker::mqtt::routes::RETAINED_TOPIC;
use tributary_broker::mqtt::MqttConfig;
use tributary_broker::spaces;

use crate::mqtt::next;
use crate::mqtt5::{client5, next_publish, suback};
use crate::support::{consume, retained_view, KafkaBroker};

fn header<'a>(m: &'a rdkafka::message::OwnedMessage, name: &str) -> Vec<&'a [u8]> {
    let Some(h) = m.headers() else { return Vec::new() };
    h.iter().filter(|h| h.key == name).filter_map(|h| h.value).collect()
}

/// [MQTT-3.3.1-5]: a retained message (MQTT 5, with user properties and a content type) is kept
/// across a restart and sent to a new subscriber with its properties (3.3.1.3); [MQTT-3.3.1-6/7]:
/// an empty retained payload clears it, and a Kafka consumer of the retained topic reads the
/// message, then its tombstone (null value), keyed by the MQTT topic. The record is in the log
/// (the disk budget counts it), not in the side table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_message_survives_a_restart_with_its_properties_and_kafka_sees_it_then_its_tombstone() {
    let broker = KafkaBroker::start_with_mqtt(MqttConfig::default()).await;
    let (publ, mut prx) = client5(&broker, "meter-7");
    let props = PublishProperties {
        content_type: Some("application/json".into()),
        user_properties: vec![("unit".into(), "kWh".into()), ("unit".into(), "Wh".into())],
        ..PublishProperties::default()
    };
    publ.publish_with_properties("meters/7/state", Q5::AtLeastOnce, true, r#"{"kwh":12}"#, props.clone())
        .await
        .expect("publish");
    next(&mut prx, "PUBACK", |p| matches!(p, P5::PubAck(_))).await;
    let _ = publ.disconnect().await;
    // In the retained topic, counted by the store like any topic; nothing in the side table.
    let info = broker.store.partition_info(RETAINED_TOPIC, 0).expect("the retained topic");
    assert!(info.footprint_bytes > 0 && info.watermarks.high_watermark == 1, "{info:?}");
    let kv = broker.store.kv_scan(spaces::MQTT_RETAINED, b"", 10).expect("scan");
    assert!(kv.is_empty(), "the side table is not written");
    let topic = broker.store.topic(RETAINED_TOPIC).expect("topic");
    assert_eq!(topic.config.cleanup_policy, tributary_broker::config::CleanupPolicy::Compact);

    // Another writer's record whose key is no MQTT topic name is never taken for one.
    let bad = tributary_broker::storage::batch::NewRecord::new(Some("meters/#"), "not a topic");
    broker.store.append_records(RETAINED_TOPIC, 0, vec![bad]).await.expect("append");

    let broker = broker.restart().await;
    assert_eq!(broker.mqtt_stats.retained_messages.load(Ordering::Relaxed), 1, "the index rebuilt from the topic");
    let (sub, mut rx) = client5(&broker, "dashboard");
    sub.subscribe("meters/+/state", Q5::AtLeastOnce).await.expect("subscribe");
    suback(&mut rx, "SUBACK").await;
    let p = next_publish(&mut rx, "the retained message after the restart").await;
    assert_eq!((&p.topic[..], &p.payload[..], p.retain), (&b"meters/7/state"[..], &br#"{"kwh":12}"#[..], true));
    assert_eq!(p.qos, Q5::AtLeastOnce);
    assert_eq!(p.properties, Some(props), "every property kept");

    // A Kafka consumer of the retained topic reads the message with its headers (while it is the
    // topic's latest, so compaction keeps it)...
    let read = |from: i64, n: usize| {
        let bootstrap = broker.bootstrap();
        tokio::task::spawn_blocking(move || consume(&bootstrap, RETAINED_TOPIC, 0, rdkafka::Offset::Offset(from), n))
    };
    let got = read(0, 2).await.expect("consumer");
    assert_eq!(got[0].key(), Some(&b"meters/7/state"[..]));
    assert_eq!(got[0].payload(), Some(&br#"{"kwh":12}"#[..]));
    assert_eq!(header(&got[0], "content-type"), [&b"application/json"[..]]);
    assert_eq!(header(&got[0], "unit"), [&b"kWh"[..], &b"Wh"[..]], "repeated user properties kept in order");
    assert_eq!(header(&got[0], "mqtt.qos"), [&b"1"[..]]);
    assert_eq!(got[1].key(), Some(&b"meters/#"[..]), "the other writer's record");

    // ...an empty retained payload clears it: a new subscriber gets nothing before a marker...
    let (publ, mut prx) = client5(&broker, "meter-7");
    publ.publish("meters/7/state", Q5::AtLeastOnce, true, "").await.expect("publish");
    next(&mut prx, "PUBACK", |p| matches!(p, P5::PubAck(_))).await;
    let (late, mut lrx) = client5(&broker, "late");
    late.subscribe("meters/#", Q5::AtLeastOnce).await.expect("subscribe");
    suback(&mut lrx, "SUBACK").await;
    publ.publish("meters/7/marker", Q5::AtLeastOnce, false, "m").await.expect("publish");
    let p = next_publish(&mut lrx, "the marker").await;
    assert_eq!(&p.topic[..], b"meters/7/marker", "a cleared retained message was sent");
    assert_eq!(broker.mqtt_stats.retained_messages.load(Ordering::Relaxed), 0);
    // ...and the consumer then reads its tombstone (null value) under the same key.
    let got = read(2, 1).await.expect("consumer");
    assert_eq!(got[0].key(), Some(&b"meters/7/state"[..]));
    assert_eq!(got[0].payload(), None, "a tombstone");
    // A second empty payload on a topic without a retained message writes nothing more.
    publ.publish("meters/7/state", Q5::AtLeastOnce, true, "").await.expect("publish");
    next(&mut prx, "PUBACK", |p| matches!(p, P5::PubAck(_))).await;
    assert_eq!(broker.store.watermarks(RETAINED_TOPIC, 0).expect("wm").high_watermark, 3);
}

/// Waits until the retained index has followed the retained topic past `offset` (a deadline on
/// a counter the follower moves after each step, not a sleep to synchronise).
async fn wait_followed(broker: &KafkaBroker, offset: i64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while broker.mqtt_stats.retained_followed_offset.load(Ordering::Relaxed) <= offset as u64 {
        assert!(std::time::Instant::now() < deadline, "the retained index never followed offset {offset}");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// Produces a record into the retained topic with rdkafka (`None`: a tombstone); its offset.
async fn produce_retained(p: &rdkafka::producer::FutureProducer, key: &str, value: Option<&str>, qos: &str) -> i64 {
    use rdkafka::message::{Header, OwnedHeaders};
    let headers = OwnedHeaders::new().insert(Header { key: "mqtt.qos", value: Some(qos) });
    let mut r: rdkafka::producer::FutureRecord<'_, str, str> =
        rdkafka::producer::FutureRecord::to(RETAINED_TOPIC).partition(0).key(key).headers(headers);
    if let Some(v) = value {
        r = r.payload(v);
    }
    match p.send(r, std::time::Duration::from_secs(30)).await {
        Ok(d) => d.offset,
        Err((e, _)) => panic!("produce into {RETAINED_TOPIC}: {e}"),
    }
}

/// Issue 17: the retained index follows the log. A record an rdkafka producer writes into
/// `mqtt.retained`, keyed by an MQTT topic, reaches a new subscriber as that topic's retained
/// message without a restart ([MQTT-3.3.1-6]: a new subscription gets the last retained message
/// of each matching topic), with the QoS of its `mqtt.qos` header; a tombstone (null value, the
/// log's form of an empty retained payload, [MQTT-3.3.1-10]) the producer writes clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_produced_into_the_retained_topic_reaches_new_subscribers_and_a_tombstone_clears_it() {
    let broker = KafkaBroker::start_with_mqtt(MqttConfig::default()).await;
    // An MQTT retained message first (it creates the topic; the producer's records follow it).
    let (publ, mut prx) = client5(&broker, "meter-1");
    publ.publish("meters/1/state", Q5::AtLeastOnce, true, "m1").await.expect("publish");
    next(&mut prx, "PUBACK", |p| matches!(p, P5::PubAck(_))).await;
    let producer: rdkafka::producer::FutureProducer = crate::support::client_config(&broker.bootstrap())
        .set("acks", "all")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer");
    let at = produce_retained(&producer, "meters/2/state", Some(r#"{"kwh":3}"#), "1").await;
    assert_eq!(at, 1, "after the MQTT client's record");
    wait_followed(&broker, at).await;
    assert_eq!(broker.mqtt_stats.retained_messages.load(Ordering::Relaxed), 2);
    let (sub, mut rx) = client5(&broker, "dashboard");
    sub.subscribe("meters/+/state", Q5::AtLeastOnce).await.expect("subscribe");
    suback(&mut rx, "SUBACK").await;
    let first = next_publish(&mut rx, "the MQTT client's retained message").await;
    assert_eq!((&first.topic[..], &first.payload[..], first.retain), (&b"meters/1/state"[..], &b"m1"[..], true));
    let p = next_publish(&mut rx, "the retained message the Kafka producer wrote").await;
    assert_eq!((&p.topic[..], &p.payload[..], p.retain), (&b"meters/2/state"[..], &br#"{"kwh":3}"#[..], true));
    assert_eq!(p.qos, Q5::AtLeastOnce, "the QoS of its mqtt.qos header");
    let _ = sub.disconnect().await;

    // The producer's tombstone clears it: a new subscriber gets meters/1 only, then a marker.
    let at = produce_retained(&producer, "meters/2/state", None, "1").await;
    wait_followed(&broker, at).await;
    assert_eq!(broker.mqtt_stats.retained_messages.load(Ordering::Relaxed), 1);
    let (late, mut lrx) = client5(&broker, "late");
    late.subscribe("meters/+/state", Q5::AtLeastOnce).await.expect("subscribe");
    suback(&mut lrx, "SUBACK").await;
    let first = next_publish(&mut lrx, "meters/1's retained message").await;
    assert_eq!(&first.topic[..], b"meters/1/state");
    publ.publish("meters/9/state", Q5::AtLeastOnce, false, "marker").await.expect("publish");
    let p = next_publish(&mut lrx, "the marker").await;
    assert_eq!((&p.topic[..], p.retain), (&b"meters/9/state"[..], false), "a cleared retained message was sent");
    // An MQTT client's retained message after the producer's records still wins as the latest.
    publ.publish("meters/2/state", Q5::AtLeastOnce, true, "from mqtt").await.expect("publish");
    next(&mut prx, "PUBACK", |p| matches!(p, P5::PubAck(_))).await;
    let (third, mut trx) = client5(&broker, "third");
    third.subscribe("meters/2/state", Q5::AtLeastOnce).await.expect("subscribe");
    suback(&mut trx, "SUBACK").await;
    let p = next_publish(&mut trx, "the MQTT client's newer message").await;
    assert_eq!((&p.topic[..], &p.payload[..]), (&b"meters/2/state"[..], &b"from mqtt"[..]));

    // The topic deleted (a Kafka admin's DeleteTopics): every retained message goes with it, and
    // the topic created next is followed from its offset 0.
    broker.store.delete_topic(RETAINED_TOPIC).await.expect("delete the retained topic");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while broker.mqtt_stats.retained_messages.load(Ordering::Relaxed) > 0
        || broker.mqtt_stats.retained_followed_offset.load(Ordering::Relaxed) > 0
    {
        assert!(std::time::Instant::now() < deadline, "the index never forgot the deleted topic");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    publ.publish("meters/1/state", Q5::AtLeastOnce, true, "again").await.expect("publish");
    next(&mut prx, "PUBACK", |p| matches!(p, P5::PubAck(_))).await;
    let at = produce_retained(&producer, "meters/5/state", Some("five"), "0").await;
    assert_eq!(at, 1, "in the topic created again");
    wait_followed(&broker, at).await;
    let (fourth, mut frx) = client5(&broker, "fourth");
    fourth.subscribe("meters/+/state", Q5::AtLeastOnce).await.expect("subscribe");
    suback(&mut frx, "SUBACK").await;
    let first = next_publish(&mut frx, "meters/1 published again").await;
    assert_eq!((&first.topic[..], &first.payload[..]), (&b"meters/1/state"[..], &b"again"[..]));
    let p = next_publish(&mut frx, "the producer's record in the new topic").await;
    assert_eq!((&p.topic[..], &p.payload[..], p.qos), (&b"meters/5/state"[..], &b"five"[..], Q5::AtMostOnce));
}

/// A `kv.mqtt_retained` value as the previous releases wrote it, format 2 (tag 0x12, QoS, expiry
/// in ms since the epoch or 0, payload format or 0xFF, content type, correlation data, response
/// topic as optional u16-prefixed strings, u16 count of user properties, then the payload).
fn old_format_2(qos: u8, expires_ms: i64, content_type: &str, user: &[(&str, &str)], payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0x12, qos];
    v.extend_from_slice(&expires_ms.to_be_bytes());
    v.push(0xFF);
    v.push(1);
    v.extend_from_slice(&(content_type.len() as u16).to_be_bytes());
    v.extend_from_slice(content_type.as_bytes());
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(&(user.len() as u16).to_be_bytes());
    for (k, val) in user {
        for s in [k, val] {
            v.extend_from_slice(&(s.len() as u16).to_be_bytes());
            v.extend_from_slice(s.as_bytes());
        }
    }
    v.extend_from_slice(payload);
    v
}

/// Retained messages of the previous releases' side table (`kv.mqtt_retained`, both formats) move
/// into the retained topic on the first start, with their QoS, properties and expiry as headers;
/// an expired one is dropped ([MQTT-3.3.2-5]), and so is one whose topic already has a newer
/// record in the topic; the side table is emptied, and a subscriber gets them from the topic.
/// More entries than one migration step takes, so it runs in several.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_of_the_side_table_move_into_the_topic_on_first_start() {
    let broker = KafkaBroker::start_with_mqtt(MqttConfig::default()).await;
    let later = tributary_broker::storage::clock::now_ms() + 3_600_000;
    let mut entries = vec![
        (b"old/props".to_vec(), Some(old_format_2(1, later, "text/plain", &[("site", "north")], b"with props"))),
        (b"old/expired".to_vec(), Some(old_format_2(1, 1_000, "text/plain", &[], b"gone"))),
    ];
    for i in 0..20 {
        // Format 1: QoS, then the payload.
        entries
            .push((format!("old/plain/{i:02}").into_bytes(), Some([&[2u8][..], format!("p{i}").as_bytes()].concat())));
    }
    // Two more whose topics already have a newer record in the retained topic (as after a move
    // that stopped and a publish meanwhile): a message, and a tombstone (cleared).
    entries.push((b"old/stale".to_vec(), Some(b"\x01stale".to_vec())));
    entries.push((b"old/cleared".to_vec(), Some(b"\x01stale".to_vec())));
    broker.store.kv_write(spaces::MQTT_RETAINED, entries).await.expect("seed the side table");
    assert!(retained_view(&broker.store).is_empty());
    let compact = tributary_broker::TopicConfig {
        cleanup_policy: tributary_broker::config::CleanupPolicy::Compact,
        ..tributary_broker::TopicConfig::default()
    };
    broker.store.create_topic(RETAINED_TOPIC, 1, compact).await.expect("topic");
    let newer = vec![
        tributary_broker::storage::batch::NewRecord::new(Some("old/stale"), "newer"),
        tributary_broker::storage::batch::NewRecord {
            value: None,
            ..tributary_broker::storage::batch::NewRecord::new(Some("old/cleared"), "")
        },
    ];
    broker.store.append_records(RETAINED_TOPIC, 0, newer).await.expect("append");

    let broker = broker.restart().await;
    let kv = broker.store.kv_scan(spaces::MQTT_RETAINED, b"", 100).expect("scan");
    assert!(kv.is_empty(), "the side table is emptied: {kv:?}");
    let view = retained_view(&broker.store);
    assert_eq!(view.len(), 23, "{:?}", view.keys());
    assert_eq!(view.get("old/props"), Some(&Some(bytes::Bytes::from_static(b"with props"))));
    assert!(!view.contains_key("old/expired"), "an expired message is not moved");
    assert_eq!(view.get("old/stale"), Some(&Some(bytes::Bytes::from_static(b"newer"))), "the newer record stands");
    assert_eq!(view.get("old/cleared"), Some(&None), "a cleared topic is not brought back");
    assert_eq!(broker.mqtt_stats.retained_messages.load(Ordering::Relaxed), 22);
    let records = crate::support::read_all(&broker.store, RETAINED_TOPIC, 0);
    assert_eq!(records.len(), 23, "each message moved once, the stale ones not at all");

    let (sub, mut rx) = client5(&broker, "reader");
    sub.subscribe("old/#", Q5::ExactlyOnce).await.expect("subscribe");
    suback(&mut rx, "SUBACK").await;
    let mut got = std::collections::BTreeMap::new();
    while got.len() < 22 {
        let p = next_publish(&mut rx, "the migrated retained messages").await;
        got.insert(String::from_utf8_lossy(&p.topic).into_owned(), p);
    }
    let p = &got["old/props"];
    assert_eq!((p.qos, p.retain, &p.payload[..]), (Q5::AtLeastOnce, true, &b"with props"[..]));
    let props = p.properties.clone().expect("properties");
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(props.user_properties, [("site".to_string(), "north".to_string())]);
    let left = props.message_expiry_interval.expect("its expiry is kept");
    assert!((3_500..=3_600).contains(&left), "{left} s left");
    let p = &got["old/plain/07"];
    assert_eq!((p.qos, &p.payload[..]), (Q5::ExactlyOnce, &b"p7"[..]));

    // A second start moves nothing again.
    drop((sub, rx));
    let broker = broker.restart().await;
    assert_eq!(crate::support::read_all(&broker.store, RETAINED_TOPIC, 0).len(), 23);
}

/// The migration under power cuts: the store runs on the simulated disk while the MQTT listener
/// moves 40 retained messages (several steps) out of `kv.mqtt_retained`; for cuts at random
/// moments of it, the image a power cut leaves holds each message exactly once (in the side
/// table or in the topic, never both, never neither), and the next start finishes the move with
/// each message in the topic exactly once and the side table empty.
#[test]
fn a_power_cut_during_the_migration_neither_loses_nor_duplicates_a_retained_message() {
    use rand::Rng;
    use tributary_broker::storage::simdisk::{Replay, SimDisk};
    use tributary_broker::{Store, TopicConfig, TopicTemplate};
    const MESSAGES: usize = 40;
    const CUTS: usize = 150;
    let mut rng = crate::support::seeded_rng("a_power_cut_during_the_migration_neither_loses_nor_duplicates");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = |quick_repair| crate::powercut::config(dir.path(), quick_repair);
    let template = || TopicTemplate { partitions: 1, config: TopicConfig::default() };
    // Free ports for both listeners: the default WebSocket port (8083) is one for every test.
    let mqtt =
        || MqttConfig { listen: "127.0.0.1:0".into(), websocket_listen: "127.0.0.1:0".into(), ..MqttConfig::default() };
    let want: std::collections::BTreeMap<String, Vec<u8>> = (0..MESSAGES)
        .map(|i| (format!("site/{i:02}"), format!("state {i} {}", "x".repeat(i * 300)).into_bytes()))
        .collect();
    for quick_repair in [false, true] {
        let disk = SimDisk::recording();
        let trace = rt.block_on(async {
            let (store, _) = Store::open_with_backend(config(quick_repair), disk.opener()).expect("open");
            let entries = want.iter().map(|(t, p)| (t.clone().into_bytes(), Some([&[1u8][..], p].concat()))).collect();
            store.kv_write(spaces::MQTT_RETAINED, entries).await.expect("seed");
            disk.mark(0);
            let server =
                tributary_broker::mqtt::MqttServer::bind(mqtt(), store.clone(), template()).await.expect("bind");
            drop(server);
            store.close().await.expect("close");
            disk.trace()
        });
        let start =
            trace.iter().position(|e| matches!(e, tributary_broker::storage::simdisk::Event::Mark(0))).expect("mark");
        let mut positions: Vec<usize> = (0..CUTS).map(|_| rng.random_range(start..=trace.len())).collect();
        positions.sort_unstable();
        let mut replay = Replay::new(&trace);
        let mut mixed = 0;
        for at in positions {
            replay.advance(at);
            let what = format!("quick_repair {quick_repair}, cut at {at}/{}", trace.len());
            let image = replay.power_cut(&mut rng);
            let disk = SimDisk::from_image(image);
            let (store, _) = Store::open_with_backend(config(quick_repair), disk.opener())
                .unwrap_or_else(|e| panic!("{what}: the store does not open: {e}"));
            // Each message in exactly one place.
            let kv: Vec<String> = store
                .kv_scan(spaces::MQTT_RETAINED, b"", 1000)
                .expect("scan")
                .into_iter()
                .map(|(k, _)| String::from_utf8(k).expect("utf-8"))
                .collect();
            let moved: Vec<String> = match store.topic(RETAINED_TOPIC) {
                Some(_) => crate::support::read_all(&store, RETAINED_TOPIC, 0)
                    .into_iter()
                    .map(|r| String::from_utf8(r.key.expect("key").to_vec()).expect("utf-8"))
                    .collect(),
                None => Vec::new(),
            };
            mixed += usize::from(!kv.is_empty() && !moved.is_empty());
            let mut all: Vec<&String> = kv.iter().chain(&moved).collect();
            all.sort();
            assert_eq!(all, want.keys().collect::<Vec<_>>(), "{what}: each message exactly once");
            // The next start finishes the move.
            rt.block_on(async {
                let server =
                    tributary_broker::mqtt::MqttServer::bind(mqtt(), store.clone(), template()).await.expect("bind");
                assert_eq!(server.stats().retained_messages.load(Ordering::Relaxed), MESSAGES as u64, "{what}");
                drop(server);
            });
            assert!(store.kv_scan(spaces::MQTT_RETAINED, b"", 10).expect("scan").is_empty(), "{what}");
            let view = retained_view(&store);
            let records = crate::support::read_all(&store, RETAINED_TOPIC, 0);
            assert_eq!(records.len(), MESSAGES, "{what}: no message moved twice");
            for (t, p) in &want {
                assert_eq!(view.get(t).and_then(|v| v.as_deref()), Some(&p[..]), "{what}: {t}");
            }
            store.close_blocking().expect("close");
        }
        eprintln!("quick_repair {quick_repair}: {CUTS} cuts, {mixed} left the move half done");
        assert!(mixed > 0, "some cuts fell inside the move");
    }
}

/// A move that cannot write (a full disk, a failing card) does not keep the MQTT listener from
/// starting: it binds, the side table keeps what was not moved, and a later start, once writes
/// work again, moves every message exactly once.
#[test]
fn a_failed_migration_does_not_stop_the_start_and_a_later_start_finishes_it() {
    use tributary_broker::storage::simdisk::{SimDisk, WriteFault};
    use tributary_broker::{Store, TopicConfig, TopicTemplate};
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SimDisk::new();
    // The store's ticker runs (its default intervals): it retries the reopen after the fault.
    let (store, _) = Store::open_with_backend(crate::support::storage_config(dir.path()), disk.opener()).expect("open");
    let template = || TopicTemplate { partitions: 1, config: TopicConfig::default() };
    // Free ports for both listeners: the default WebSocket port (8083) is one for every test.
    let mqtt =
        || MqttConfig { listen: "127.0.0.1:0".into(), websocket_listen: "127.0.0.1:0".into(), ..MqttConfig::default() };
    rt.block_on(async {
        let entries = (0..12).map(|i| (format!("site/{i}").into_bytes(), Some(b"\x01state".to_vec()))).collect();
        store.kv_write(spaces::MQTT_RETAINED, entries).await.expect("seed");
        disk.set_fault(Some(WriteFault::All));
        let server = tributary_broker::mqtt::MqttServer::bind(mqtt(), store.clone(), template())
            .await
            .expect("the listener starts although nothing can be written");
        assert_eq!(server.stats().retained_messages.load(Ordering::Relaxed), 0);
        drop(server);
        disk.set_fault(None);
        // Writes resume after the store's pause (100 ms after the failure): a later start moves all.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let server =
                tributary_broker::mqtt::MqttServer::bind(mqtt(), store.clone(), template()).await.expect("bind");
            if server.stats().retained_messages.load(Ordering::Relaxed) == 12 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the move never finished");
            drop(server);
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(store.kv_scan(spaces::MQTT_RETAINED, b"", 100).expect("scan").is_empty());
        assert_eq!(crate::support::read_all(&store, RETAINED_TOPIC, 0).len(), 12, "each moved once");
        store.close().await.expect("close");
    });
}
