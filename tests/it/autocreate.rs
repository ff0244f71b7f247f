//! Auto-creation under a crowd (issue 13 item 13). On a fresh gateway, 200 MQTT clients publish
//! their first QoS 1 message at once (all into one routed log topic, which none of them finds
//! existing), and 64 Kafka clients ask for a topic that does not exist yet (Metadata with
//! auto-creation) at once and then produce to it. Every publish is acknowledged with PUBACK 0
//! and stored; every metadata answer names the topic with its partition; every produce is
//! acknowledged. (The store used to answer a second CreateTopic in the same writer round with
//! TopicExists before the topic was visible, so such callers found no topic.)

use std::io::Write;
use std::sync::{Arc, Barrier};

use bytes::Bytes;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use tributary_broker::mqtt::{MqttConfig, Route};
use tributary_broker::storage::batch::{encode_batch, NewRecord};
use tributary_broker::{Codec, TimestampKind};

use crate::mqtt_faults::{connected, publish, read_packet};
use crate::support::{read_all, KafkaBroker, RawKafka};

const MQTT_CLIENTS: usize = 200;
const KAFKA_CLIENTS: usize = 64;
/// Each round creates fresh topics: a crowd that happens to be served one creation per writer
/// round proves little, several crowds make a same-round creation race all but certain.
const ROUNDS: usize = 5;

fn tn(v: &str) -> TopicName {
    TopicName(StrBytes::from_string(v.to_string()))
}

/// Runs `n` copies of `each` on their own threads, released together by a barrier after their
/// setup; returns their results.
async fn crowd<T: Send + 'static>(n: usize, each: impl Fn(usize, &Barrier) -> T + Send + Sync + 'static) -> Vec<T> {
    let each = Arc::new(each);
    tokio::task::spawn_blocking(move || {
        let barrier = Arc::new(Barrier::new(n));
        let threads: Vec<_> = (0..n)
            .map(|i| {
                let (each, barrier) = (each.clone(), barrier.clone());
                std::thread::spawn(move || each(i, &barrier))
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("client thread")).collect()
    })
    .await
    .expect("crowd")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_of_first_publishes_and_metadata_requests_all_succeed() {
    // One log topic per round, each created by the crowd of that round.
    let routes = (0..ROUNDS)
        .map(|r| Route {
            filter: format!("crowd{r}/#"),
            topic: format!("crowd-mqtt-{r}"),
            key: "{client_id}".into(),
            compression: None,
        })
        .collect();
    let broker = KafkaBroker::start_with_mqtt(MqttConfig { routes, ..MqttConfig::default() }).await;
    let (mqtt, kafka) = (broker.mqtt, broker.addr);
    for round in 0..ROUNDS {
        let log_topic = format!("crowd-mqtt-{round}");
        assert!(broker.store.topic(&log_topic).is_none(), "a fresh topic");
        // MQTT 5 (PUBACK carries a reason code; OASIS MQTT 5.0 3.4.2.1: 0x00 Success).
        let reasons = crowd(MQTT_CLIENTS, move |i, barrier| {
            let mut s = connected(mqtt, 5, &format!("crowd-{round}-{i}"));
            barrier.wait();
            let topic = format!("crowd{round}/{i}");
            s.write_all(&publish(1, topic.as_bytes(), 1, format!("first-{i}").as_bytes(), true)).expect("publish");
            match read_packet(&mut s) {
                Some((0x40, body)) => Ok(body.get(2).copied().unwrap_or(0)),
                other => Err(format!("client {i}: {other:?} instead of a PUBACK")),
            }
        })
        .await;
        for (i, r) in reasons.into_iter().enumerate() {
            assert_eq!(r, Ok(0), "round {round}, client {i}: its first publish was not acknowledged with success");
        }
        let mut stored: Vec<String> = read_all(&broker.store, &log_topic, 0)
            .into_iter()
            .map(|r| String::from_utf8(r.value.expect("payload").to_vec()).expect("utf-8"))
            .collect();
        stored.sort();
        let mut expected: Vec<String> = (0..MQTT_CLIENTS).map(|i| format!("first-{i}")).collect();
        expected.sort();
        assert_eq!(stored, expected, "round {round}: every acknowledged publish is stored once");

        // Kafka: Metadata with auto-creation from many connections at once, then a produce each.
        let topic = format!("crowd-kafka-{round}");
        let asked = topic.clone();
        let answers = crowd(KAFKA_CLIENTS, move |i, barrier| {
            let mut k = RawKafka::connect(kafka);
            barrier.wait();
            let req = MetadataRequest::default()
                .with_topics(Some(vec![metadata_request::MetadataRequestTopic::default().with_name(Some(tn(&asked)))]))
                .with_allow_auto_topic_creation(true);
            let meta = k.call(&req, 9);
            let t = &meta.topics[0];
            let seen = (t.error_code, t.partitions.len());
            let record = NewRecord::new(None::<Bytes>, format!("k-{i}"));
            let mut batch = Vec::new();
            encode_batch(&[(&record, 1_700_000_000_000)], 0, Codec::None, TimestampKind::CreateTime, 0, &mut batch)
                .expect("encode");
            let req = ProduceRequest::default().with_acks(-1).with_timeout_ms(10_000).with_topic_data(vec![
                produce_request::TopicProduceData::default().with_name(tn(&asked)).with_partition_data(vec![
                    produce_request::PartitionProduceData::default()
                        .with_index(0)
                        .with_records(Some(Bytes::from(batch))),
                ]),
            ]);
            let produced = k.call(&req, 7).responses[0].partition_responses[0].error_code;
            (seen, produced)
        })
        .await;
        for (i, (seen, produced)) in answers.into_iter().enumerate() {
            assert_eq!(seen, (0, 1), "round {round}, client {i}: metadata (error, partitions) of the topic it created");
            assert_eq!(produced, 0, "round {round}, client {i}: produce to the auto-created topic");
        }
        assert_eq!(read_all(&broker.store, &topic, 0).len(), KAFKA_CLIENTS, "round {round}: every produce stored");
    }
}
