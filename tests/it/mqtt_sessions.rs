//! What persistent MQTT sessions keep beyond their backlog: outbound QoS 2 stays exactly-once
//! across a reconnect and a broker restart (PUBREL repeated, never the message; an unreleased
//! message resent with its packet id and DUP), shared subscriptions survive a restart, and the
//! messages a departed shared-subscription member never acknowledged go to another member.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

use crate::mqtt_faults::{connect_flags, open, packet, read_packet};
use crate::support::KafkaBroker;

/// A raw 3.1.1 connection that keeps its session; returns the CONNACK's session-present flag.
fn keep_session(addr: SocketAddr, id: &str) -> (TcpStream, bool) {
    let mut s = open(addr);
    s.write_all(&connect_flags(4, id, 0x00)).expect("send CONNECT");
    let (kind, body) = read_packet(&mut s).expect("CONNACK");
    assert_eq!((kind, body[1]), (0x20, 0), "connection accepted");
    (s, body[0] & 1 == 1)
}

/// The next PUBLISH on a raw 3.1.1 connection: (first byte, packet id, payload).
fn read_publish(s: &mut TcpStream) -> (u8, u16, Vec<u8>) {
    let (kind, body) = read_packet(s).expect("PUBLISH");
    assert_eq!(kind & 0xF0, 0x30, "a PUBLISH, got {kind:#x}");
    let topic_len = u16::from_be_bytes([body[0], body[1]]) as usize;
    let at = 2 + topic_len;
    let pkid = u16::from_be_bytes([body[at], body[at + 1]]);
    (kind, pkid, body[at + 2..].to_vec())
}

fn expect(s: &mut TcpStream, kind: u8, pkid: u16, what: &str) {
    let (k, body) = read_packet(s).unwrap_or_else(|| panic!("{what}: connection closed"));
    assert_eq!((k, &body[..2]), (kind, &pkid.to_be_bytes()[..]), "{what}");
}

/// Publishes at QoS 2 with rumqttc and waits for the PUBCOMP: stored.
async fn publish_qos2(broker: &KafkaBroker, topic: &str, payload: &str) {
    let mut o = MqttOptions::new(format!("pub-{payload}"), "127.0.0.1", broker.mqtt.port());
    o.set_keep_alive(Duration::from_secs(10));
    let (c, mut ev) = AsyncClient::new(o, 10);
    c.publish(topic, QoS::ExactlyOnce, false, payload.to_string()).await.expect("publish");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline, ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubComp(_)))) => return,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("publisher: {e}"),
            Err(_) => panic!("no PUBCOMP within 20 s"),
        }
    }
}

/// Runs blocking raw-socket steps off the runtime the broker serves on.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("raw client step")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_qos2_is_exactly_once_across_a_reconnect_and_a_restart() {
    let broker = KafkaBroker::start().await;
    let addr = broker.mqtt;
    let mut sub = blocking(move || {
        let (mut s, present) = keep_session(addr, "q2-sub");
        assert!(!present);
        // SUBSCRIBE exact/# at QoS 2.
        let mut body = vec![0, 1, 0, 7];
        body.extend_from_slice(b"exact/#");
        body.push(2);
        s.write_all(&packet(0x82, &body)).expect("SUBSCRIBE");
        let (kind, body) = read_packet(&mut s).expect("SUBACK");
        assert_eq!((kind, body[2]), (0x90, 2), "granted QoS 2");
        s
    })
    .await;

    // The client gets "one", says PUBREC, gets PUBREL, and vanishes before its PUBCOMP.
    publish_qos2(&broker, "exact/a", "one").await;
    let pkid_one = blocking(move || {
        let (kind, pkid, payload) = read_publish(&mut sub);
        assert_eq!((kind & 0x06, &payload[..]), (0x04, &b"one"[..]), "QoS 2 delivery");
        sub.write_all(&packet(0x50, &pkid.to_be_bytes())).expect("PUBREC");
        expect(&mut sub, 0x62, pkid, "PUBREL after PUBREC");
        pkid
    })
    .await;
    let broker = broker.restart().await;
    let addr = broker.mqtt;

    // After the restart only the PUBREL comes again; "one" is not delivered a second time.
    let mut sub = blocking(move || {
        let (mut s, present) = keep_session(addr, "q2-sub");
        assert!(present, "the session survived the restart");
        expect(&mut s, 0x62, pkid_one, "PUBREL repeated after the restart");
        s.write_all(&packet(0x70, &pkid_one.to_be_bytes())).expect("PUBCOMP");
        s
    })
    .await;

    // "two" arrives next (not "one"); the client disconnects before PUBREC, so on reconnect
    // "two" comes again with the same packet id and DUP set, and completes.
    publish_qos2(&broker, "exact/b", "two").await;
    blocking(move || {
        let (_, pkid, payload) = read_publish(&mut sub);
        assert_eq!(payload, b"two", "the next message, no duplicate of the first");
        drop(sub);
        let (mut s, present) = keep_session(addr, "q2-sub");
        assert!(present);
        let (kind, again, payload) = read_publish(&mut s);
        assert_eq!((again, &payload[..]), (pkid, &b"two"[..]), "resent with its packet id");
        assert_eq!(kind & 0x08, 0x08, "DUP set on the resend");
        s.write_all(&packet(0x50, &pkid.to_be_bytes())).expect("PUBREC");
        expect(&mut s, 0x62, pkid, "PUBREL");
        s.write_all(&packet(0x70, &pkid.to_be_bytes())).expect("PUBCOMP");
        // Nothing else is pending: a ping is answered next.
        s.write_all(&[0xC0, 0]).expect("PINGREQ");
        assert_eq!(read_packet(&mut s).map(|p| p.0), Some(0xD0), "PINGRESP, no further delivery");
    })
    .await;
}

fn member(broker: &KafkaBroker, id: &str) -> (rumqttc::v5::AsyncClient, mpsc::UnboundedReceiver<Packet5>) {
    let mut o = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", broker.mqtt.port());
    o.set_keep_alive(Duration::from_secs(10));
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(3600));
    let (c, ev) = rumqttc::v5::AsyncClient::new(o, 100);
    (c, crate::mqtt::pump5(ev))
}

async fn publish_qos1(broker: &KafkaBroker, topic: &str, payloads: impl IntoIterator<Item = String>) {
    let mut o = MqttOptions::new("dispatcher", "127.0.0.1", broker.mqtt.port());
    o.set_keep_alive(Duration::from_secs(10));
    let (c, mut ev) = AsyncClient::new(o, 100);
    let mut n = 0;
    for p in payloads {
        c.publish(topic, QoS::AtLeastOnce, false, p).await.expect("publish");
        n += 1;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while n > 0 {
        match tokio::time::timeout_at(deadline, ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => n -= 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("publisher: {e}"),
            Err(_) => panic!("PUBACKs missing after 20 s"),
        }
    }
}

/// Collects `n` distinct payloads from a member, failing on a duplicate.
async fn collect(rx: &mut mpsc::UnboundedReceiver<Packet5>, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < n {
        if let Packet5::Publish(p) = crate::mqtt::next(rx, "shared message", |p| matches!(p, Packet5::Publish(_))).await
        {
            let s = String::from_utf8_lossy(&p.payload).into_owned();
            assert!(!got.contains(&s), "{s} delivered twice");
            got.push(s);
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscriptions_survive_a_restart_and_a_departed_members_messages_move_on() {
    let broker = KafkaBroker::start().await;
    // A persistent member subscribes, goes away; messages arrive; the broker restarts.
    let (c, mut rx) = member(&broker, "shared-keeper");
    crate::mqtt::next(&mut rx, "CONNACK", |p| matches!(p, Packet5::ConnAck(_))).await;
    c.subscribe("$share/keepers/work/#", QoS5::AtLeastOnce).await.expect("subscribe");
    crate::mqtt::next(&mut rx, "SUBACK", |p| matches!(p, Packet5::SubAck(_))).await;
    c.disconnect().await.expect("disconnect");
    while rx.recv().await.is_some() {}
    publish_qos1(&broker, "work/a", (0..20).map(|i| format!("w{i}"))).await;
    let broker = broker.restart().await;
    let (c, mut rx) = member(&broker, "shared-keeper");
    let Packet5::ConnAck(ack) = crate::mqtt::next(&mut rx, "CONNACK", |p| matches!(p, Packet5::ConnAck(_))).await
    else {
        unreachable!()
    };
    assert!(ack.session_present, "the session with its shared subscription survived");
    let got = collect(&mut rx, 20).await;
    assert_eq!(got, (0..20).map(|i| format!("w{i}")).collect::<Vec<_>>(), "the group's backlog, once, in order");
    drop(c);

    // A member takes messages and leaves without acknowledging them: the other member gets them.
    let addr = broker.mqtt;
    let mut taker = blocking(move || {
        let mut s = crate::mqtt_faults::connected(addr, 4, "taker");
        let mut body = vec![0, 1];
        let filter = b"$share/crew/task/#";
        body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
        body.extend_from_slice(filter);
        body.push(1);
        s.write_all(&packet(0x82, &body)).expect("SUBSCRIBE");
        assert_eq!(read_packet(&mut s).map(|p| p.0), Some(0x90), "SUBACK");
        s
    })
    .await;
    publish_qos1(&broker, "task/x", (0..10).map(|i| format!("t{i}"))).await;
    let (other, mut orx) = member(&broker, "other");
    crate::mqtt::next(&mut orx, "CONNACK", |p| matches!(p, Packet5::ConnAck(_))).await;
    other.subscribe("$share/crew/task/#", QoS5::AtLeastOnce).await.expect("subscribe");
    crate::mqtt::next(&mut orx, "SUBACK", |p| matches!(p, Packet5::SubAck(_))).await;
    blocking(move || {
        // The taker holds at least one message, unacknowledged, then its connection drops.
        read_publish(&mut taker);
        drop(taker);
    })
    .await;
    publish_qos1(&broker, "task/x", (10..20).map(|i| format!("t{i}"))).await;
    let mut got = collect(&mut orx, 20).await;
    got.sort_by_key(|s| s[1..].parse::<u32>().unwrap_or(u32::MAX));
    assert_eq!(got, (0..20).map(|i| format!("t{i}")).collect::<Vec<_>>(), "every task reached the remaining member");
    // No duplicate follows: the next message is a fresh one.
    publish_qos1(&broker, "task/x", ["fresh".to_string()]).await;
    let Packet5::Publish(p) = crate::mqtt::next(&mut orx, "fresh", |p| matches!(p, Packet5::Publish(_))).await else {
        unreachable!()
    };
    assert_eq!(&p.payload[..], b"fresh");
    drop(other);
}
