//! The MQTT front end with rumqttc (v4 and v5) as the client: QoS 0/1/2 round trips, routes
//! (log topic, key from a `+` level, headers) read back by an rdkafka consumer, Kafka records
//! delivered to MQTT subscribers, retained messages and wills.

use std::time::Duration;

use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset};
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tributary_broker::mqtt::{MqttConfig, Route};

use crate::support::{client_config, consume, KafkaBroker};

/// Polls an event loop in the background and forwards incoming packets.
fn pump(mut eventloop: EventLoop) -> mpsc::UnboundedReceiver<Packet> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = eventloop.poll().await {
            if let Event::Incoming(p) = ev {
                if tx.send(p).is_err() {
                    break;
                }
            }
        }
    });
    rx
}

pub(crate) fn pump5(
    mut eventloop: rumqttc::v5::EventLoop,
) -> mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Packet> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = eventloop.poll().await {
            if let rumqttc::v5::Event::Incoming(p) = ev {
                if tx.send(p).is_err() {
                    break;
                }
            }
        }
    });
    rx
}

fn client(broker: &KafkaBroker, id: &str) -> (AsyncClient, EventLoop) {
    let mut o = MqttOptions::new(id, "127.0.0.1", broker.mqtt.port());
    o.set_keep_alive(Duration::from_secs(10));
    AsyncClient::new(o, 100)
}

/// Waits for the next packet matching `want` (others are skipped), with a deadline.
pub(crate) async fn next<P: std::fmt::Debug>(
    rx: &mut mpsc::UnboundedReceiver<P>,
    what: &str,
    want: impl Fn(&P) -> bool,
) -> P {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(p)) if want(&p) => return p,
            Ok(Some(_)) => {}
            Ok(None) => panic!("connection ended while waiting for {what}"),
            Err(_) => panic!("no {what} within 20 s"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_0_1_2_round_trip_with_3_1_1_clients() {
    let broker = KafkaBroker::start().await;
    let (sub, ev) = client(&broker, "sub");
    let mut sub_rx = pump(ev);
    sub.subscribe("plant/#", QoS::ExactlyOnce).await.expect("subscribe");
    let ack = next(&mut sub_rx, "SUBACK", |p| matches!(p, Packet::SubAck(_))).await;
    let Packet::SubAck(ack) = ack else { unreachable!() };
    assert_eq!(ack.return_codes, vec![rumqttc::SubscribeReasonCode::Success(QoS::ExactlyOnce)], "QoS 2 granted");

    let (publ, ev) = client(&broker, "pub");
    let mut pub_rx = pump(ev);
    publ.publish("plant/line1/temp", QoS::AtMostOnce, false, "q0").await.expect("publish");
    publ.publish("plant/line1/temp", QoS::AtLeastOnce, false, "q1").await.expect("publish");
    publ.publish("plant/line1/temp", QoS::ExactlyOnce, false, "q2").await.expect("publish");
    next(&mut pub_rx, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await;
    next(&mut pub_rx, "PUBCOMP", |p| matches!(p, Packet::PubComp(_))).await;

    let mut got = Vec::new();
    while got.len() < 3 {
        if let Packet::Publish(p) = next(&mut sub_rx, "PUBLISH", |p| matches!(p, Packet::Publish(_))).await {
            assert_eq!(p.topic, "plant/line1/temp");
            got.push((String::from_utf8_lossy(&p.payload).into_owned(), p.qos));
        }
    }
    assert_eq!(
        got,
        vec![("q0".into(), QoS::AtMostOnce), ("q1".into(), QoS::AtLeastOnce), ("q2".into(), QoS::ExactlyOnce)],
        "in order, each at its publish QoS"
    );
    // Acknowledged means stored: all three are in the default log topic.
    let wm = broker.store.watermarks("mqtt", 0).expect("default topic");
    assert_eq!(wm.high_watermark, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_v5_publishes_reach_kafka_with_key_and_headers_and_kafka_reaches_mqtt() {
    let cfg = MqttConfig {
        routes: vec![Route {
            filter: "meters/+/reading".into(),
            topic: "readings".into(),
            key: "meter-{1}".into(),
            compression: None,
        }],
        ..MqttConfig::default()
    };
    let broker = KafkaBroker::start_with_mqtt(cfg).await;
    let mut o = rumqttc::v5::MqttOptions::new("meter-gw", "127.0.0.1", broker.mqtt.port());
    o.set_keep_alive(Duration::from_secs(10));
    let (c, ev) = rumqttc::v5::AsyncClient::new(o, 100);
    let mut rx = pump5(ev);
    use rumqttc::v5::mqttbytes::v5::{Packet as P5, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS as Q5;
    c.subscribe("cmd/+", Q5::AtLeastOnce).await.expect("subscribe");
    next(&mut rx, "SUBACK", |p| matches!(p, P5::SubAck(_))).await;
    for (meter, value) in [("42", "1.5"), ("7", "2.5"), ("42", "3.5")] {
        let props = PublishProperties {
            content_type: Some("text/plain".into()),
            user_properties: vec![("unit".into(), "kWh".into())],
            ..Default::default()
        };
        c.publish_with_properties(format!("meters/{meter}/reading"), Q5::AtLeastOnce, false, value, props)
            .await
            .expect("publish");
        next(&mut rx, "PUBACK", |p| matches!(p, P5::PubAck(_))).await;
    }
    // Read back with librdkafka: key from the '+' level, headers with the MQTT topic and properties.
    let bs = broker.bootstrap();
    let msgs =
        tokio::task::spawn_blocking(move || consume(&bs, "readings", 0, Offset::Beginning, 3)).await.expect("consume");
    let keys: Vec<&[u8]> = msgs.iter().map(|m| m.key().expect("key")).collect();
    assert_eq!(keys, vec![&b"meter-42"[..], b"meter-7", b"meter-42"]);
    let h = msgs[1].headers().expect("headers");
    let header = |name: &str| {
        h.iter().find(|x| x.key == name).and_then(|x| x.value).map(|v| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(header("mqtt.topic").as_deref(), Some("meters/7/reading"));
    assert_eq!(header("content-type").as_deref(), Some("text/plain"));
    assert_eq!(header("unit").as_deref(), Some("kWh"));
    assert_eq!(msgs[2].payload(), Some(&b"3.5"[..]));

    // A Kafka record with an mqtt.topic header reaches the MQTT subscriber, properties included.
    let p: FutureProducer = client_config(&broker.bootstrap()).set("acks", "all").create().expect("producer");
    let headers = rdkafka::message::OwnedHeaders::new()
        .insert(rdkafka::message::Header { key: "mqtt.topic", value: Some("cmd/meter-42") })
        .insert(rdkafka::message::Header { key: "reason", value: Some("recalibrate") });
    p.send(FutureRecord::to("mqtt").key("k").payload("reset").headers(headers), Duration::from_secs(30))
        .await
        .expect("produced");
    let P5::Publish(got) = next(&mut rx, "PUBLISH", |p| matches!(p, P5::Publish(_))).await else { unreachable!() };
    assert_eq!((&got.topic[..], &got.payload[..]), (&b"cmd/meter-42"[..], &b"reset"[..]));
    let user = got.properties.map(|p| p.user_properties).unwrap_or_default();
    assert!(user.contains(&("reason".to_string(), "recalibrate".to_string())), "{user:?}");
}

/// `[[mqtt.routes]] compression = "gzip"`: the route's log topic, created by the first publish
/// routed to it, has that codec (store and DescribeConfigs), and the batches MQTT publishes put
/// in it are gzip batches, readable by a Kafka client; other topics keep `[topic_defaults]` (lz4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_chooses_its_log_topics_codec() {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use tributary_broker::storage::batch::BatchHeader;
    use tributary_broker::Codec;
    let cfg = MqttConfig {
        routes: vec![Route {
            filter: "js/#".into(),
            topic: "js-readings".into(),
            key: "{client_id}".into(),
            compression: Some(Codec::Gzip),
        }],
        ..MqttConfig::default()
    };
    let broker = KafkaBroker::start_with_mqtt(cfg).await;
    assert!(broker.store.topic("js-readings").is_none(), "created by the first publish");
    let (c, ev) = client(&broker, "meter-js");
    let mut rx = pump(ev);
    for (topic, value) in [("js/a", "1"), ("js/b", "2"), ("other/c", "3")] {
        c.publish(topic, QoS::AtLeastOnce, false, value).await.expect("publish");
        next(&mut rx, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await;
    }
    assert_eq!(broker.store.topic("js-readings").expect("created").config.compression, Codec::Gzip);
    assert_eq!(broker.store.topic("mqtt").expect("default topic").config.compression, Codec::Lz4);
    let codecs = |topic: &str| {
        let fetched = broker.store.fetch(topic, 0, 0, 1 << 20).expect("fetch");
        let mut codecs = Vec::new();
        let mut rest = &fetched.data[..];
        while !rest.is_empty() {
            let h = BatchHeader::parse(rest).expect("batch");
            codecs.push(h.codec().expect("codec"));
            rest = &rest[h.total_len()..];
        }
        codecs
    };
    let js = codecs("js-readings");
    assert!(!js.is_empty() && js.iter().all(|c| *c == Codec::Gzip), "{js:?}");
    assert_eq!(codecs("mqtt"), vec![Codec::Lz4]);

    let admin: AdminClient<_> = client_config(&broker.bootstrap()).create().expect("admin");
    let d = admin
        .describe_configs([&ResourceSpecifier::Topic("js-readings")], &AdminOptions::new())
        .await
        .expect("describe");
    let res = d[0].as_ref().expect("described");
    assert_eq!(res.get("compression.type").and_then(|e| e.value.as_deref()), Some("gzip"));
    let bs = broker.bootstrap();
    let msgs = tokio::task::spawn_blocking(move || consume(&bs, "js-readings", 0, Offset::Beginning, 2))
        .await
        .expect("consume");
    let values: Vec<&[u8]> = msgs.iter().map(|m| m.payload().expect("value")).collect();
    assert_eq!(values, vec![&b"1"[..], b"2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_and_wills() {
    let broker = KafkaBroker::start().await;
    let (p, ev) = client(&broker, "retainer");
    let mut prx = pump(ev);
    p.publish("status/boiler", QoS::AtLeastOnce, true, "on").await.expect("publish");
    next(&mut prx, "PUBACK", |x| matches!(x, Packet::PubAck(_))).await;
    p.publish("status/pump", QoS::AtLeastOnce, true, "off").await.expect("publish");
    next(&mut prx, "PUBACK", |x| matches!(x, Packet::PubAck(_))).await;
    // An empty retained payload clears the topic's retained message.
    p.publish("status/pump", QoS::AtLeastOnce, true, "").await.expect("publish");
    next(&mut prx, "PUBACK", |x| matches!(x, Packet::PubAck(_))).await;

    let (s, ev) = client(&broker, "late-subscriber");
    let mut srx = pump(ev);
    s.subscribe("status/+", QoS::AtLeastOnce).await.expect("subscribe");
    let Packet::Publish(r) = next(&mut srx, "retained PUBLISH", |x| matches!(x, Packet::Publish(_))).await else {
        unreachable!()
    };
    assert!(r.retain, "delivered with the retain flag");
    assert_eq!((r.topic.as_str(), &r.payload[..]), ("status/boiler", &b"on"[..]));

    // A will is published when its client vanishes without DISCONNECT.
    s.subscribe("wills/#", QoS::AtLeastOnce).await.expect("subscribe");
    next(&mut srx, "SUBACK", |x| matches!(x, Packet::SubAck(_))).await;
    let mut o = MqttOptions::new("doomed", "127.0.0.1", broker.mqtt.port());
    o.set_keep_alive(Duration::from_secs(10));
    o.set_last_will(LastWill::new("wills/doomed", "gone", QoS::AtLeastOnce, false));
    let (d, mut dev) = AsyncClient::new(o, 10);
    loop {
        if let Ok(Event::Incoming(Packet::ConnAck(_))) = dev.poll().await {
            break;
        }
    }
    drop(d);
    drop(dev); // the socket closes without DISCONNECT
    let Packet::Publish(w) =
        next(&mut srx, "will PUBLISH", |x| matches!(x, Packet::Publish(p) if p.topic.starts_with("wills/"))).await
    else {
        unreachable!()
    };
    assert_eq!(&w.payload[..], b"gone");

    // A clean DISCONNECT does not publish the will ([MQTT-3.14.4-3]). The gateway closes the
    // connection only after it has dealt with the will, so once the socket is closed a marker
    // published afterwards must be the next message on wills/#.
    let addr = broker.mqtt;
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        // CONNECT: clean session, will flag, will QoS 1 (flags 0x0E), will on wills/polite.
        let mut b = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x0E, 0, 60];
        for field in [&b"polite"[..], b"wills/polite", b"gone"] {
            b.extend_from_slice(&(field.len() as u16).to_be_bytes());
            b.extend_from_slice(field);
        }
        let mut s = crate::mqtt_faults::open(addr);
        s.write_all(&crate::mqtt_faults::packet(0x10, &b)).expect("CONNECT");
        let ack = crate::mqtt_faults::read_packet(&mut s).expect("CONNACK");
        assert_eq!((ack.0, ack.1[1]), (0x20, 0));
        s.write_all(&[0xE0, 0]).expect("DISCONNECT");
        assert!(crate::mqtt_faults::read_packet(&mut s).is_none(), "the gateway closed the connection");
    })
    .await
    .expect("raw client");
    p.publish("wills/marker", QoS::AtLeastOnce, false, "after").await.expect("publish");
    let Packet::Publish(m) =
        next(&mut srx, "marker", |x| matches!(x, Packet::Publish(p) if p.topic.starts_with("wills/"))).await
    else {
        unreachable!()
    };
    assert_eq!(m.topic, "wills/marker", "no will from the client that disconnected cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_sessions_get_their_backlog_once_across_disconnects_and_a_restart() {
    let broker = KafkaBroker::start().await;
    let connect = |broker: &KafkaBroker| {
        let mut o = MqttOptions::new("keeper", "127.0.0.1", broker.mqtt.port());
        o.set_keep_alive(Duration::from_secs(10));
        o.set_clean_session(false);
        let (c, ev) = AsyncClient::new(o, 100);
        (c, pump(ev))
    };
    let (sub, mut rx) = connect(&broker);
    let Packet::ConnAck(ack) = next(&mut rx, "CONNACK", |p| matches!(p, Packet::ConnAck(_))).await else {
        unreachable!()
    };
    assert!(!ack.session_present, "a new session");
    sub.subscribe("backlog/#", QoS::AtLeastOnce).await.expect("subscribe");
    next(&mut rx, "SUBACK", |p| matches!(p, Packet::SubAck(_))).await;
    sub.disconnect().await.expect("disconnect");
    while rx.recv().await.is_some() {}

    // Published while the subscriber is away, then the broker restarts.
    let (publ, ev) = client(&broker, "publisher");
    let mut prx = pump(ev);
    for i in 0..10 {
        publ.publish("backlog/x", QoS::AtLeastOnce, false, format!("m{i}")).await.expect("publish");
        next(&mut prx, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await;
    }
    drop(publ);
    let broker = broker.restart().await;

    let (sub, mut rx) = connect(&broker);
    let Packet::ConnAck(ack) = next(&mut rx, "CONNACK", |p| matches!(p, Packet::ConnAck(_))).await else {
        unreachable!()
    };
    assert!(ack.session_present, "the session survived the restart");
    let mut got = Vec::new();
    while got.len() < 10 {
        if let Packet::Publish(p) = next(&mut rx, "backlog", |p| matches!(p, Packet::Publish(_))).await {
            got.push(String::from_utf8_lossy(&p.payload).into_owned());
        }
    }
    assert_eq!(got, (0..10).map(|i| format!("m{i}")).collect::<Vec<_>>(), "every message once, in order");
    // Nothing more arrives before a fresh message: no duplicates of the backlog.
    let (publ, ev) = client(&broker, "publisher2");
    let mut prx = pump(ev);
    publ.publish("backlog/x", QoS::AtLeastOnce, false, "fresh").await.expect("publish");
    next(&mut prx, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await;
    let Packet::Publish(p) = next(&mut rx, "fresh", |p| matches!(p, Packet::Publish(_))).await else { unreachable!() };
    assert_eq!(&p.payload[..], b"fresh");
    drop(sub);
}

fn v5_client(broker: &KafkaBroker, id: &str, expiry: Option<u32>) -> rumqttc::v5::MqttOptions {
    let mut o = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", broker.mqtt.port());
    o.set_keep_alive(Duration::from_secs(10));
    o.set_session_expiry_interval(expiry);
    if expiry.is_some() {
        o.set_clean_start(false);
    }
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_no_local_message_expiry_and_will_delay() {
    use rumqttc::v5::mqttbytes::v5::{Filter, LastWill, LastWillProperties, Packet as P5, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS as Q5;
    let broker = KafkaBroker::start().await;

    // No Local: a client does not get its own messages back; others do.
    let (me, ev) = rumqttc::v5::AsyncClient::new(v5_client(&broker, "chatty", None), 100);
    let mut me_rx = pump5(ev);
    let mut f = Filter::new("chat/#", Q5::AtLeastOnce);
    f.nolocal = true;
    me.subscribe_many(vec![f]).await.expect("subscribe");
    next(&mut me_rx, "SUBACK", |p| matches!(p, P5::SubAck(_))).await;
    let (other, ev) = rumqttc::v5::AsyncClient::new(v5_client(&broker, "other", None), 100);
    let mut other_rx = pump5(ev);
    me.publish("chat/room", Q5::AtLeastOnce, false, "mine").await.expect("publish");
    next(&mut me_rx, "PUBACK", |p| matches!(p, P5::PubAck(_))).await;
    other.publish("chat/room", Q5::AtLeastOnce, false, "theirs").await.expect("publish");
    next(&mut other_rx, "PUBACK", |p| matches!(p, P5::PubAck(_))).await;
    let P5::Publish(p) = next(&mut me_rx, "PUBLISH", |p| matches!(p, P5::Publish(_))).await else { unreachable!() };
    assert_eq!(&p.payload[..], b"theirs", "its own message was not delivered back");

    // Message expiry: a message that expires while its subscriber is offline is not delivered.
    let (keeper, ev) = rumqttc::v5::AsyncClient::new(v5_client(&broker, "keeper5", Some(3600)), 100);
    let mut k_rx = pump5(ev);
    keeper.subscribe("exp/#", Q5::AtLeastOnce).await.expect("subscribe");
    next(&mut k_rx, "SUBACK", |p| matches!(p, P5::SubAck(_))).await;
    keeper.disconnect().await.expect("disconnect");
    while k_rx.recv().await.is_some() {}
    let short = PublishProperties { message_expiry_interval: Some(1), ..Default::default() };
    other.publish_with_properties("exp/a", Q5::AtLeastOnce, false, "short-lived", short).await.expect("publish");
    next(&mut other_rx, "PUBACK", |p| matches!(p, P5::PubAck(_))).await;
    // The expiry is the feature under test: let one second pass.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    other.publish("exp/a", Q5::AtLeastOnce, false, "lasting").await.expect("publish");
    next(&mut other_rx, "PUBACK", |p| matches!(p, P5::PubAck(_))).await;
    let (keeper, ev) = rumqttc::v5::AsyncClient::new(v5_client(&broker, "keeper5", Some(3600)), 100);
    let mut k_rx = pump5(ev);
    let P5::Publish(p) = next(&mut k_rx, "PUBLISH", |p| matches!(p, P5::Publish(_))).await else { unreachable!() };
    assert_eq!(&p.payload[..], b"lasting", "the expired message was skipped");
    drop(keeper);

    // Will delay: a client back within the delay cancels its will; one that stays away does not.
    me.subscribe("wills5/#", Q5::AtLeastOnce).await.expect("subscribe");
    next(&mut me_rx, "SUBACK", |p| matches!(p, P5::SubAck(_))).await;
    let with_will = |id: &str| {
        let mut o = v5_client(&broker, id, Some(60));
        let props = LastWillProperties {
            delay_interval: Some(1),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        };
        o.set_last_will(LastWill::new(format!("wills5/{id}"), "gone", Q5::AtLeastOnce, false, Some(props)));
        o
    };
    for id in ["returns", "vanishes"] {
        let (c, mut ev) = rumqttc::v5::AsyncClient::new(with_will(id), 10);
        loop {
            if let Ok(rumqttc::v5::Event::Incoming(P5::ConnAck(_))) = ev.poll().await {
                break;
            }
        }
        drop(c);
        drop(ev); // gone without DISCONNECT
    }
    let (back, ev) = rumqttc::v5::AsyncClient::new(with_will("returns"), 10);
    let mut back_rx = pump5(ev);
    next(&mut back_rx, "CONNACK", |p| matches!(p, P5::ConnAck(_))).await;
    let P5::Publish(w) =
        next(&mut me_rx, "will", |p| matches!(p, P5::Publish(x) if x.topic.starts_with(b"wills5/"))).await
    else {
        unreachable!()
    };
    assert_eq!(&w.topic[..], b"wills5/vanishes", "only the client that stayed away has its will published");
    back.disconnect().await.expect("disconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscriptions_split_the_load_and_plain_ones_see_everything() {
    let broker = KafkaBroker::start().await;
    let mut workers = Vec::new();
    for id in ["worker-a", "worker-b"] {
        let (c, ev) = client(&broker, id);
        let mut rx = pump(ev);
        c.subscribe("$share/workers/jobs/#", QoS::AtLeastOnce).await.expect("subscribe");
        next(&mut rx, "SUBACK", |p| matches!(p, Packet::SubAck(_))).await;
        workers.push((c, rx));
    }
    let (watcher, ev) = client(&broker, "watcher");
    let mut wrx = pump(ev);
    watcher.subscribe("jobs/#", QoS::AtLeastOnce).await.expect("subscribe");
    next(&mut wrx, "SUBACK", |p| matches!(p, Packet::SubAck(_))).await;

    const N: usize = 200;
    let (publ, ev) = client(&broker, "dispatcher");
    let mut prx = pump(ev);
    for i in 0..N {
        publ.publish(format!("jobs/{}", i % 5), QoS::AtLeastOnce, false, format!("job-{i}")).await.expect("publish");
    }
    for _ in 0..N {
        next(&mut prx, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await;
    }
    // Every job reaches exactly one worker; both workers get some.
    let mut seen = std::collections::HashMap::new();
    let mut per_worker = [0usize; 2];
    let (first, second) = workers.split_at_mut(1);
    let (rx_a, rx_b) = (&mut first[0].1, &mut second[0].1);
    while seen.len() < N {
        let (w, p) = tokio::select! {
            p = next(rx_a, "job", |p| matches!(p, Packet::Publish(_))) => (0, p),
            p = next(rx_b, "job", |p| matches!(p, Packet::Publish(_))) => (1, p),
        };
        let Packet::Publish(p) = p else { unreachable!() };
        let job = String::from_utf8_lossy(&p.payload).into_owned();
        assert!(seen.insert(job.clone(), w).is_none(), "{job} delivered to two workers");
        per_worker[w] += 1;
    }
    assert!(per_worker.iter().all(|n| *n > 0), "the load was split: {per_worker:?}");
    // The plain subscription sees every job, each once, on its topic and in publish order.
    let mut all = Vec::new();
    while all.len() < N {
        let Packet::Publish(p) = next(&mut wrx, "job", |p| matches!(p, Packet::Publish(_))).await else {
            unreachable!()
        };
        all.push((p.topic.clone(), String::from_utf8_lossy(&p.payload).into_owned()));
    }
    let want: Vec<(String, String)> = (0..N).map(|i| (format!("jobs/{}", i % 5), format!("job-{i}"))).collect();
    assert_eq!(all, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_bounded() {
    use rumqttc::v5::mqttbytes::v5::{Packet as P5, PubAckReason};
    use rumqttc::v5::mqttbytes::QoS as Q5;
    let broker = KafkaBroker::start_with_mqtt(MqttConfig { retained_messages_max: 2, ..MqttConfig::default() }).await;
    let (c, ev) = rumqttc::v5::AsyncClient::new(v5_client(&broker, "retainer5", None), 100);
    let mut rx = pump5(ev);
    let publish = |topic: &'static str, payload: &'static str| {
        let c = c.clone();
        async move { c.publish(topic, Q5::AtLeastOnce, true, payload).await.expect("publish") }
    };
    let mut reasons = Vec::new();
    for (topic, payload) in [("r/1", "a"), ("r/2", "b"), ("r/3", "c"), ("r/1", "a2"), ("r/2", ""), ("r/3", "c")] {
        publish(topic, payload).await;
        let P5::PubAck(a) = next(&mut rx, "PUBACK", |p| matches!(p, P5::PubAck(_))).await else { unreachable!() };
        reasons.push(a.reason);
    }
    assert_eq!(
        reasons,
        vec![
            PubAckReason::Success,
            PubAckReason::Success,
            PubAckReason::QuotaExceeded, // a third retained topic
            PubAckReason::Success,       // replacing one is fine
            PubAckReason::Success,       // clearing one frees a slot...
            PubAckReason::Success,       // ...for the third
        ]
    );
}

/// Delivery does not wait for the disk (`mqtt.deliver_before_commit`, on by default): while a
/// QoS 2 publish's commit waits at the disk, a QoS 1 subscriber already has the message, and the
/// publisher has no PUBREC yet: the server takes ownership (4.3.3) only once it is durable. A
/// QoS 2 subscriber gets it only after the commit, so exactly once holds across a crash (4.3.3).
/// With the setting off, nobody gets it before the commit.
#[test]
fn delivery_goes_on_while_the_commit_waits_for_the_disk_and_the_acknowledgement_after_it() {
    for early in [true, false] {
        delivery_while_the_commit_waits(early);
    }
}

/// An in-process MQTT listener on a store on a simulated disk (whose writes and syncs a test can
/// hold, or make fail), served by a runtime of its own so the test's raw sockets may block.
struct SimDiskGateway {
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    disk: tributary_broker::storage::simdisk::SimDisk,
    store: tributary_broker::Store,
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl SimDiskGateway {
    fn start(deliver_before_commit: bool) -> Self {
        use tributary_broker::storage::simdisk::SimDisk;
        use tributary_broker::{Store, TopicConfig, TopicTemplate};
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = SimDisk::new();
        let (store, _) =
            Store::open_with_backend(crate::support::storage_config(dir.path()), disk.opener()).expect("open");
        let cfg = MqttConfig {
            listen: "127.0.0.1:0".into(),
            websocket_listen: String::new(),
            deliver_before_commit,
            ..MqttConfig::default()
        };
        let template = TopicTemplate { partitions: 1, config: TopicConfig::default() };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let addr = rt.block_on(async {
            let server = tributary_broker::mqtt::MqttServer::bind(cfg, store.clone(), template).await.expect("bind");
            let addr = server.local_addr().expect("addr");
            tokio::spawn(server.run(async move {
                let _ = stopped.await;
            }));
            addr
        });
        Self { rt, _dir: dir, disk, store, addr, stop: Some(stop) }
    }

    /// A raw connection (`level` 4 or 5, `flags` 0x02 clean, 0x00 kept) subscribed to `m/#`.
    fn subscriber(&self, level: u8, id: &str, flags: u8, qos: u8) -> std::net::TcpStream {
        use std::io::Write;

        use crate::mqtt_faults::{connect_flags, open, packet, read_packet};
        let mut s = open(self.addr);
        s.write_all(&connect_flags(level, id, flags)).expect("CONNECT");
        let (kind, body) = read_packet(&mut s).expect("CONNACK");
        assert_eq!((kind, body[1]), (0x20, 0), "connection accepted");
        let mut body = vec![0, 1];
        if level == 5 {
            body.push(0);
        }
        body.extend_from_slice(&[0, 3]);
        body.extend_from_slice(b"m/#");
        body.push(qos);
        s.write_all(&packet(0x82, &body)).expect("SUBSCRIBE");
        let (kind, body) = read_packet(&mut s).expect("SUBACK");
        assert_eq!((kind, *body.last().expect("a code")), (0x90, qos));
        s
    }

    fn close(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.rt.block_on(self.store.close()).expect("close");
    }
}

fn delivery_while_the_commit_waits(early: bool) {
    use std::io::Write;
    use tributary_broker::storage::simdisk::Held;

    use crate::mqtt_faults::{connected, publish, read_packet};

    let g = SimDiskGateway::start(early);
    let (disk, addr) = (&g.disk, g.addr);
    let (mut at1, mut at2) = (g.subscriber(4, "at-1", 0x02, 1), g.subscriber(4, "at-2", 0x02, 2));
    let mut publisher = connected(addr, 4, "meter");
    // The first publish creates the log topic (that round stages nothing: its partition is new).
    publisher.write_all(&publish(1, b"m/a", 1, b"first", false)).expect("PUBLISH");
    assert_eq!(read_packet(&mut publisher), Some((0x40, vec![0, 1])), "PUBACK");
    for s in [&mut at1, &mut at2] {
        let (kind, body) = read_packet(s).expect("PUBLISH");
        assert_eq!(kind & 0xF6, 0x32, "QoS 1 as published");
        s.write_all(&[0x40, 2, body[5], body[6]]).expect("PUBACK");
    }

    disk.hold(Held::Syncs);
    publisher.write_all(&publish(2, b"m/a", 2, b"second", false)).expect("PUBLISH");
    assert!(disk.wait_for_held(Duration::from_secs(30)), "the commit waits at the disk");
    let quiet = |s: &mut std::net::TcpStream, what: &str| {
        // Bounded look for a packet that must not come while the commit is held.
        s.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
        let mut b = [0u8; 1];
        match std::io::Read::read(s, &mut b) {
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            other => panic!("{what} before the commit (early {early}): {other:?}"),
        }
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    };
    if early {
        let (kind, body) = read_packet(&mut at1).expect("PUBLISH while the commit waits");
        assert_eq!(kind & 0xF6, 0x32, "QoS 1 (the subscription's)");
        assert!(body.ends_with(b"second"));
        at1.write_all(&[0x40, 2, body[5], body[6]]).expect("PUBACK");
    } else {
        quiet(&mut at1, "a QoS 1 delivery");
    }
    quiet(&mut publisher, "PUBREC");
    quiet(&mut at2, "a QoS 2 delivery");
    disk.release();
    assert_eq!(read_packet(&mut publisher), Some((0x50, vec![0, 2])), "PUBREC after the commit");
    let (kind, body) = read_packet(&mut at2).expect("the QoS 2 delivery after the commit");
    assert_eq!(kind & 0xF6, 0x34, "QoS 2");
    assert!(body.ends_with(b"second"));
    if !early {
        let (kind, body) = read_packet(&mut at1).expect("the QoS 1 delivery after the commit");
        assert_eq!(kind & 0xF6, 0x32);
        assert!(body.ends_with(b"second"));
    }
    g.close();
}

/// With delivery before the commit, a commit that fails after its message went out costs the
/// subscriber nothing later: the offset it was given is skipped (a gap), never given to the next
/// message, which therefore reaches it (without the gap the next message would take that offset,
/// behind the subscriber's position, and never arrive).
#[test]
fn a_subscriber_given_a_message_whose_commit_failed_misses_nothing_after_it() {
    use std::io::Write;
    use tributary_broker::storage::simdisk::{Held, WriteFault};

    use crate::mqtt_faults::{connected, publish, read_packet};

    let g = SimDiskGateway::start(true);
    let mut sub = g.subscriber(4, "keeper", 0x00, 1);
    let mut publisher = connected(g.addr, 5, "meter");
    let delivered = |sub: &mut std::net::TcpStream| {
        let (kind, body) = read_packet(sub).expect("PUBLISH");
        assert_eq!(kind & 0xF0, 0x30, "a PUBLISH, got {kind:#x}");
        sub.write_all(&[0x40, 2, body[5], body[6]]).expect("PUBACK");
        String::from_utf8_lossy(&body[7..]).into_owned()
    };
    publisher.write_all(&publish(1, b"m/a", 1, b"first", true)).expect("PUBLISH");
    assert_eq!(read_packet(&mut publisher), Some((0x40, vec![0, 1])), "PUBACK");
    assert_eq!(delivered(&mut sub), "first");

    g.disk.hold(Held::Writes);
    publisher.write_all(&publish(1, b"m/a", 2, b"lost", true)).expect("PUBLISH");
    assert!(g.disk.wait_for_held(Duration::from_secs(30)), "the commit's first write waits at the disk");
    assert_eq!(delivered(&mut sub), "lost", "delivered while its commit waits");
    g.disk.set_fault(Some(WriteFault::All));
    g.disk.release();
    let (kind, body) = read_packet(&mut publisher).expect("the refusal");
    assert_eq!((kind, &body[..3]), (0x40, &[0, 2, 0x80][..]), "PUBACK 0x80: not stored");
    g.disk.set_fault(None);
    // Writes resume after the store's pause; the publisher tries until one is stored.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for pkid in 3u16.. {
        publisher.write_all(&publish(1, b"m/a", pkid, b"after", true)).expect("PUBLISH");
        let (kind, body) = read_packet(&mut publisher).expect("PUBACK");
        assert_eq!((kind, &body[..2]), (0x40, &pkid.to_be_bytes()[..]));
        if body.len() == 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "writes never resumed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(delivered(&mut sub), "after", "the next message reaches the subscriber");
    g.close();
}
