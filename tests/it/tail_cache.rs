//! The store's tail cache with real clients: an MQTT subscriber and a Kafka consumer that keep
//! up with the log are served from memory (`storage.tail_cache_bytes_max`), not from the
//! database on the blocking pool, and get every message once, in order.

use std::time::Duration;

use rdkafka::{Message, Offset};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::support::{consume, KafkaBroker};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_and_consumers_at_the_tail_are_served_from_memory() {
    let broker = KafkaBroker::start_with_mqtt(tributary_broker::mqtt::MqttConfig::default()).await;
    let options = |id: &str| {
        let mut o = MqttOptions::new(id, "127.0.0.1", broker.mqtt.port());
        o.set_keep_alive(Duration::from_secs(10));
        o
    };
    let (sub, mut sub_events) = AsyncClient::new(options("tail-sub"), 100);
    sub.subscribe("meters/#", QoS::AtLeastOnce).await.expect("subscribe");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, sub_events.poll()).await.expect("SUBACK in time") {
            Ok(Event::Incoming(Packet::SubAck(_))) => break,
            Ok(_) => {}
            Err(e) => panic!("subscriber: {e}"),
        }
    }
    let (publisher, mut pub_events) = AsyncClient::new(options("tail-pub"), 100);
    let sent = 300usize;
    tokio::spawn(async move {
        for i in 0..sent {
            publisher
                .publish(format!("meters/{}", i % 7), QoS::AtLeastOnce, false, format!("reading-{i}"))
                .await
                .expect("queue");
        }
    });
    tokio::spawn(async move { while pub_events.poll().await.is_ok() {} });
    let mut got = Vec::with_capacity(sent);
    while got.len() < sent {
        match tokio::time::timeout_at(deadline, sub_events.poll()).await.expect("deliveries in time") {
            Ok(Event::Incoming(Packet::Publish(p))) => got.push(String::from_utf8_lossy(&p.payload).into_owned()),
            Ok(_) => {}
            Err(e) => panic!("subscriber: {e}"),
        }
    }
    let want: Vec<String> = (0..sent).map(|i| format!("reading-{i}")).collect();
    assert_eq!(got, want, "every message once, in order");
    let bs = broker.bootstrap();
    let records =
        tokio::task::spawn_blocking(move || consume(&bs, "mqtt", 0, Offset::Beginning, sent)).await.expect("consume");
    assert_eq!(records.last().and_then(|m| m.payload()), Some(format!("reading-{}", sent - 1).as_bytes()));
    let s = broker.store.stats();
    // Every read of this test was at the tail: all from memory, none from the database.
    assert!(s.tail_cache_hits > 0, "{s:?}");
    assert_eq!(s.tail_cache_misses, 0, "{s:?}");
    assert!(s.tail_cache_bytes > 0 && s.tail_cache_bytes <= 1 << 20, "{s:?}");
}
