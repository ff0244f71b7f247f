//! Compacted topics with librdkafka (the `rdkafka` crate): a topic created through the admin API
//! with `cleanup.policy=compact` and the `segment.*` settings Kafka's tools send, shown by
//! DescribeConfigs; keyless records refused as the Java broker refuses them; many versions of
//! every key compacted in the background to Kafka's view (the latest per key at its original
//! offset, offsets with gaps), a tombstone kept for `delete.retention.ms`, then gone.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message, Offset};
use tributary_broker::storage::StoreStats;

use crate::support::{client_config, consume, KafkaBroker};

const TOPIC: &str = "meters";
const KEYS: usize = 20;
const VERSIONS: usize = 10;
const DELETE_RETENTION_MS: u64 = 4000;

/// Polls the store's counters until `done` holds, within a deadline.
async fn wait_stats(broker: &KafkaBroker, what: &str, done: impl Fn(&StoreStats) -> bool) -> StoreStats {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = broker.store.stats();
        if done(&s) {
            return s;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn send(p: &FutureProducer, key: Option<&str>, value: Option<&str>) -> Result<i64, RDKafkaErrorCode> {
    let mut r: FutureRecord<'_, str, str> = FutureRecord::to(TOPIC).partition(0);
    if let Some(k) = key {
        r = r.key(k);
    }
    if let Some(v) = value {
        r = r.payload(v);
    }
    match p.send(r, Duration::from_secs(30)).await {
        Ok(d) => Ok(d.offset),
        Err((e, _)) => Err(e.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Unknown)),
    }
}

/// (offset, key, value) of every message from the beginning.
fn view(bootstrap: &str, count: usize) -> Vec<(i64, String, Option<String>)> {
    consume(bootstrap, TOPIC, 0, Offset::Beginning, count)
        .iter()
        .map(|m| {
            let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            (m.offset(), m.key().map(s).unwrap_or_default(), m.payload().map(s))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn librdkafka_sees_kafkas_compacted_view_and_tombstones_expire() {
    let broker = KafkaBroker::start().await;
    let bootstrap = broker.bootstrap();
    let admin: AdminClient<DefaultClientContext> = client_config(&bootstrap).create().expect("admin client");
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let topic = NewTopic::new(TOPIC, 1, TopicReplication::Fixed(1))
        .set("cleanup.policy", "compact")
        .set("min.cleanable.dirty.ratio", "0.01")
        .set("delete.retention.ms", "4000")
        .set("segment.bytes", "1048576")
        .set("segment.ms", "600000");
    let r = admin.create_topics([&topic], &opts).await.expect("create");
    assert!(r[0].is_ok(), "{r:?}");
    let bad = NewTopic::new("bad-policy", 1, TopicReplication::Fixed(1)).set("cleanup.policy", "archive");
    let r = admin.create_topics([&bad], &opts).await.expect("create");
    assert_eq!(r[0].as_ref().unwrap_err().1, RDKafkaErrorCode::InvalidConfig);

    let d = admin.describe_configs([&ResourceSpecifier::Topic(TOPIC)], &opts).await.expect("describe");
    let res = d[0].as_ref().expect("described");
    let value = |k: &str| res.get(k).and_then(|e| e.value.clone());
    assert_eq!(value("cleanup.policy").as_deref(), Some("compact"));
    assert_eq!(value("delete.retention.ms").as_deref(), Some("4000"));
    assert_eq!(value("min.cleanable.dirty.ratio").as_deref(), Some("0.01"));
    assert_eq!(value("min.compaction.lag.ms").as_deref(), Some("0"));
    assert_eq!(value("segment.bytes").as_deref(), Some("1048576"));

    let producer: FutureProducer = client_config(&bootstrap)
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .set("retries", "0")
        .create()
        .expect("producer");
    // Kafka's answer to a keyless record on a compacted topic (LogValidator): INVALID_RECORD.
    assert_eq!(send(&producer, None, Some("no key")).await, Err(RDKafkaErrorCode::InvalidRecord));

    // VERSIONS rounds over KEYS keys, each round's records in flight together (batched).
    let mut latest: BTreeMap<String, (i64, Option<String>)> = BTreeMap::new();
    for v in 0..VERSIONS {
        let sends: Vec<_> = (0..KEYS)
            .map(|k| {
                let (key, value) = (format!("meter-{k:02}"), format!("reading-{v}"));
                let p = producer.clone();
                async move { (key.clone(), value.clone(), send(&p, Some(&key), Some(&value)).await) }
            })
            .collect();
        for (key, value, offset) in futures_util::future::join_all(sends).await {
            latest.insert(key, (offset.expect("produced"), Some(value)));
        }
    }
    let tombstone = send(&producer, Some("meter-00"), None).await.expect("tombstone");
    latest.insert("meter-00".into(), (tombstone, None));
    // A last record on its own, the active tail compaction leaves alone.
    let end = send(&producer, Some("end"), Some("tail")).await.expect("tail");
    latest.insert("end".into(), (end, Some("tail".into())));
    let produced = (KEYS * VERSIONS + 2) as u64;

    // Every superseded version goes: (VERSIONS - 1) per key, plus meter-00's last reading.
    let superseded = (KEYS * (VERSIONS - 1) + 1) as u64;
    let s = wait_stats(&broker, "compaction", |s| s.compaction_removed_records >= superseded).await;
    let mut expected: Vec<(i64, String, Option<String>)> =
        latest.iter().map(|(k, (o, v))| (*o, k.clone(), v.clone())).collect();
    expected.sort();
    // Within delete.retention.ms (4 s; this runs within ms of the pass) the tombstone is kept.
    assert_eq!(s.compaction_removed_records, superseded, "the tombstone stays for delete.retention.ms");
    // Kafka's view while the tombstone lives: the latest record of every key at its original
    // offset, meter-00's deletion included.
    let got = view(&bootstrap, expected.len());
    assert_eq!(got, expected);
    assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "offsets increase");
    assert!(got.len() < got.last().map_or(0, |l| l.0 as usize + 1), "with gaps");
    assert_eq!(broker.store.watermarks(TOPIC, 0).expect("wm").high_watermark as u64, produced);

    // After delete.retention.ms the tombstone goes too, and meter-00 with it.
    let started = std::time::Instant::now();
    wait_stats(&broker, "the tombstone's removal", |s| s.compaction_removed_records > superseded).await;
    assert!(started.elapsed() < Duration::from_millis(DELETE_RETENTION_MS) * 20);
    expected.retain(|(_, k, _)| k != "meter-00");
    assert_eq!(view(&bootstrap, expected.len()), expected);
    // Offsets are never reused: the next record goes after the last one produced.
    assert_eq!(send(&producer, Some("meter-01"), Some("again")).await, Ok(produced as i64));
}

/// An MQTT 5 publish routed to a compacted log topic without a record key is refused like a
/// keyless Kafka record: PUBACK with reason code 0x80 (Unspecified error, what the MQTT front
/// end answers for a refused store write; [MQTT-3.4.2-1]: the PUBACK carries the reason), and
/// nothing is stored; a route that gives a key is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_publishes_without_a_key_to_a_compacted_topic_are_refused() {
    use rumqttc::v5::mqttbytes::v5::{Packet as P5, PubAckReason};
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use tributary_broker::mqtt::{MqttConfig, Route};
    let route = |filter: &str, key: &str| Route {
        filter: filter.into(),
        topic: "device-state".into(),
        key: key.into(),
        compression: None,
    };
    let cfg = MqttConfig { routes: vec![route("keyed/+", "{1}"), route("unkeyed/+", "")], ..MqttConfig::default() };
    let broker = KafkaBroker::start_with_mqtt(cfg).await;
    let compact = tributary_broker::TopicConfig {
        cleanup_policy: tributary_broker::storage::CleanupPolicy::Compact,
        ..tributary_broker::TopicConfig::default()
    };
    broker.store.create_topic("device-state", 1, compact).await.expect("create");
    let mut o = rumqttc::v5::MqttOptions::new("state-gw", "127.0.0.1", broker.mqtt.port());
    o.set_keep_alive(Duration::from_secs(10));
    let (c, ev) = rumqttc::v5::AsyncClient::new(o, 100);
    let mut rx = crate::mqtt::pump5(ev);
    c.publish("keyed/dev-1", Q5::AtLeastOnce, false, "on").await.expect("publish");
    let P5::PubAck(ack) = crate::mqtt::next(&mut rx, "PUBACK", |p| matches!(p, P5::PubAck(_))).await else {
        unreachable!()
    };
    assert_eq!(ack.reason, PubAckReason::Success);
    c.publish("unkeyed/dev-1", Q5::AtLeastOnce, false, "on").await.expect("publish");
    let P5::PubAck(ack) = crate::mqtt::next(&mut rx, "PUBACK", |p| matches!(p, P5::PubAck(_))).await else {
        unreachable!()
    };
    assert_eq!(ack.reason, PubAckReason::UnspecifiedError);
    assert_eq!(broker.store.watermarks("device-state", 0).expect("wm").high_watermark, 1, "only the keyed one");
}
