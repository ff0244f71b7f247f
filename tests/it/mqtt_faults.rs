//! Bad MQTT input on raw sockets: garbage, a remaining length over the limit, a truncated
//! packet, an invalid UTF-8 topic, wildcards in a PUBLISH topic, PUBLISH before CONNECT, a second
//! CONNECT, and a QoS 2 packet id reused before PUBREL. Each is answered per the spec (a close,
//! or an MQTT 5 DISCONNECT with its reason code), a client connected throughout keeps being
//! served, and nothing is stored by any of them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::support::KafkaBroker;

/// One MQTT packet: the first byte, the remaining length and the body.
pub(crate) use tributary_tests::mqtt_packet as packet;

fn connect(level: u8, id: &str) -> Vec<u8> {
    connect_flags(level, id, 0x02)
}

/// CONNECT with the given flags (0x02 = clean session; 0x00 keeps the session).
pub(crate) fn connect_flags(level: u8, id: &str, flags: u8) -> Vec<u8> {
    let mut b = vec![0, 4, b'M', b'Q', b'T', b'T', level, flags, 0, 60];
    if level == 5 {
        b.push(0); // no properties
    }
    b.extend_from_slice(&(id.len() as u16).to_be_bytes());
    b.extend_from_slice(id.as_bytes());
    packet(0x10, &b)
}

pub(crate) fn publish(qos: u8, topic: &[u8], pkid: u16, payload: &[u8], v5: bool) -> Vec<u8> {
    let mut b = (topic.len() as u16).to_be_bytes().to_vec();
    b.extend_from_slice(topic);
    if qos > 0 {
        b.extend_from_slice(&pkid.to_be_bytes());
    }
    if v5 {
        b.push(0);
    }
    b.extend_from_slice(payload);
    packet(0x30 | (qos << 1), &b)
}

pub(crate) fn open(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    s
}

/// Reads one packet; `None` when the server closed the connection.
pub(crate) fn read_packet(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut first = [0u8; 1];
    match s.read(&mut first) {
        Ok(0) => return None,
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
        Err(e) => panic!("neither a packet nor a close: {e}"),
    }
    let mut len = 0usize;
    for i in 0..4 {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).expect("length");
        len |= ((b[0] & 0x7f) as usize) << (7 * i);
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("body");
    Some((first[0], body))
}

pub(crate) fn connected(addr: SocketAddr, level: u8, id: &str) -> TcpStream {
    let mut s = open(addr);
    s.write_all(&connect(level, id)).expect("send");
    let (kind, body) = read_packet(&mut s).expect("CONNACK");
    assert_eq!((kind, body[1]), (0x20, 0), "connection accepted");
    s
}

fn ping(s: &mut TcpStream) {
    s.write_all(&[0xC0, 0]).expect("ping");
    assert_eq!(read_packet(s).map(|p| p.0), Some(0xD0), "PINGRESP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_per_the_spec_and_costs_nothing_else() {
    let broker = KafkaBroker::start_with_mqtt(tributary_broker::mqtt::MqttConfig {
        packet_bytes_max: 4096,
        ..Default::default()
    })
    .await;
    let addr = broker.mqtt;
    let store = broker.store.clone();
    tokio::task::spawn_blocking(move || {
        let mut good = connected(addr, 4, "good");
        // One message stored before, to compare the log with afterwards.
        good.write_all(&publish(1, b"ok/topic", 1, b"before", false)).expect("send");
        assert_eq!(read_packet(&mut good).map(|p| p.0), Some(0x40), "PUBACK");
        let before = store.watermarks("mqtt", 0).expect("default topic").high_watermark;

        type Case = (&'static str, u8, Vec<u8>, Option<u8>);
        let cases: Vec<Case> = vec![
            ("garbage", 0, b"GET / HTTP/1.1\r\n\r\n".to_vec(), None),
            ("PUBLISH before CONNECT", 0, publish(0, b"a", 0, b"x", false), None),
            ("remaining length over the limit (3.1.1)", 4, packet(0x30, &vec![0u8; 5000]), None),
            ("remaining length over the limit (5)", 5, packet(0x30, &vec![0u8; 5000]), Some(0x95)),
            ("truncated packet", 4, publish(1, b"a/b", 2, b"payload", false)[..6].to_vec(), None),
            ("invalid UTF-8 topic (3.1.1)", 4, publish(1, &[b'a', 0xff, 0xfe], 3, b"x", false), None),
            ("invalid UTF-8 topic (5)", 5, publish(1, &[b'a', 0xff, 0xfe], 3, b"x", true), Some(0x81)),
            ("wildcard in a PUBLISH topic (3.1.1)", 4, publish(1, b"a/+/b", 4, b"x", false), None),
            ("wildcard in a PUBLISH topic (5)", 5, publish(1, b"a/#", 4, b"x", true), Some(0x90)),
            ("a second CONNECT (3.1.1)", 4, connect(4, "again"), None),
            ("a second CONNECT (5)", 5, connect(5, "again"), Some(0x82)),
        ];
        for (i, (what, level, bytes, reason)) in cases.into_iter().enumerate() {
            let mut s = if level == 0 { open(addr) } else { connected(addr, level, &format!("bad-{i}")) };
            s.write_all(&bytes).expect("send");
            if what.starts_with("truncated") {
                s.shutdown(std::net::Shutdown::Write).expect("half close");
            }
            match reason {
                Some(code) => {
                    let (kind, body) = read_packet(&mut s).unwrap_or_else(|| panic!("{what}: DISCONNECT expected"));
                    assert_eq!((kind, body.first().copied()), (0xE0, Some(code)), "{what}");
                    assert!(read_packet(&mut s).is_none(), "{what}: then closed");
                }
                None => assert!(read_packet(&mut s).is_none(), "{what}: closed"),
            }
            ping(&mut good);
        }
        assert_eq!(store.watermarks("mqtt", 0).expect("wm").high_watermark, before, "nothing stored by bad input");

        // A QoS 2 packet id sent again before PUBREL: PUBREC again, stored once.
        let mut q2 = connected(addr, 4, "q2");
        for _ in 0..2 {
            q2.write_all(&publish(2, b"ok/topic", 9, b"once", false)).expect("send");
            assert_eq!(read_packet(&mut q2).map(|p| p.0), Some(0x50), "PUBREC");
        }
        q2.write_all(&packet(0x62, &[0, 9])).expect("PUBREL");
        assert_eq!(read_packet(&mut q2).map(|p| p.0), Some(0x70), "PUBCOMP");
        assert_eq!(store.watermarks("mqtt", 0).expect("wm").high_watermark, before + 1, "stored exactly once");
        ping(&mut good);
    })
    .await
    .expect("raw socket checks");
}
