//! The broker's own `$SYS/broker/...` MQTT messages from the gateway daemon: retained, so a new
//! subscriber gets the current values; never matched by `#`; not publishable by clients.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

fn client(port: u16, id: &str) -> (AsyncClient, tokio::sync::mpsc::UnboundedReceiver<Packet>) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(10));
    let (c, mut ev) = AsyncClient::new(o, 100);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(e) = ev.poll().await {
            if let Event::Incoming(p) = e {
                if tx.send(p).is_err() {
                    break;
                }
            }
        }
    });
    (c, rx)
}

async fn next_publish(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Packet>, what: &str) -> rumqttc::Publish {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Packet::Publish(p))) => return p,
            Ok(Some(_)) => {}
            Ok(None) => panic!("connection ended while waiting for {what}"),
            Err(_) => panic!("no {what} within 20 s"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sys_topics_carry_broker_figures_to_mqtt_clients_and_only_from_the_broker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "[storage]\ndata_dir = \"{}\"\ndisk_free_bytes_min = 0\n\n[kafka]\nlisten = \"127.0.0.1:0\"\n\n\
         [mqtt]\nlisten = \"127.0.0.1:0\"\nwebsocket_listen = \"127.0.0.1:0\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\nsys_interval_ms = 100\n",
        dir.path().join("data").display()
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config).expect("write config");
    let daemon = crate::support::Daemon::start(&path);
    let mqtt_port = daemon.addr("mqtt").rsplit(':').next().and_then(|p| p.parse::<u16>().ok()).expect("port");

    // A wildcard subscriber: `#` must not see `$SYS`.
    let (all, mut all_rx) = client(mqtt_port, "everything");
    all.subscribe("#", QoS::AtMostOnce).await.expect("subscribe #");
    // A monitoring client gets the retained figures, then fresh ones.
    let (mon, mut mon_rx) = client(mqtt_port, "monitor");
    mon.subscribe("$SYS/broker/#", QoS::AtMostOnce).await.expect("subscribe $SYS");
    let mut seen = std::collections::BTreeMap::new();
    while seen.len() < 8 || !seen.contains_key("$SYS/broker/clients/connected") {
        let p = next_publish(&mut mon_rx, "$SYS messages").await;
        seen.insert(p.topic.clone(), String::from_utf8_lossy(&p.payload).into_owned());
    }
    assert_eq!(seen["$SYS/broker/version"], format!("tributary {}", env!("CARGO_PKG_VERSION")));
    assert!(seen["$SYS/broker/uptime"].ends_with(" seconds"), "{seen:?}");
    assert!(seen.contains_key("$SYS/broker/store/budget"), "{seen:?}");
    // Further rounds keep coming while the wildcard subscriber is connected.
    let mut versions = 0;
    while versions < 2 {
        if next_publish(&mut mon_rx, "more $SYS rounds").await.topic == "$SYS/broker/version" {
            versions += 1;
        }
    }
    let (publ, _prx) = client(mqtt_port, "publisher");
    publ.publish("plain/topic", QoS::AtLeastOnce, false, "hello").await.expect("publish");
    let p = next_publish(&mut all_rx, "the plain message").await;
    assert_eq!(p.topic, "plain/topic", "`#` got a $SYS message first");

    // A client may not publish into $SYS ([MQTT-4.7.2-1]): 3.1.1 acknowledges and drops it,
    // counts it, and the connection stays.
    let (rogue, mut rogue_rx) = client(mqtt_port, "rogue");
    rogue.publish("$SYS/broker/version", QoS::AtLeastOnce, false, "fake").await.expect("queue");
    rogue.publish("plain/after", QoS::AtLeastOnce, false, "still here").await.expect("queue");
    let mut acks = 0;
    while acks < 2 {
        match tokio::time::timeout(Duration::from_secs(20), rogue_rx.recv()).await {
            Ok(Some(Packet::PubAck(_))) => acks += 1,
            Ok(Some(_)) => {}
            Ok(None) => panic!("the rogue publisher was disconnected"),
            Err(_) => panic!("the rogue publisher was not answered"),
        }
    }
    let p = next_publish(&mut all_rx, "the publish after the refused one").await;
    assert_eq!(p.topic, "plain/after");
    let mut versions = 0;
    while versions < 2 {
        let p = next_publish(&mut mon_rx, "$SYS rounds after the rogue publish").await;
        if p.topic == "$SYS/broker/version" {
            assert_ne!(&p.payload[..], b"fake", "a client publish reached $SYS");
            versions += 1;
        }
    }
    let metrics = crate::support::http_get(&daemon.addr("metrics"), "/metrics");
    assert!(metrics.contains("tributary_mqtt_reserved_topic_publishes_total 1"), "{metrics}");

    daemon.stop();
}
