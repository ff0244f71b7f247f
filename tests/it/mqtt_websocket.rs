//! MQTT over WebSocket with real clients: MQTT.js (in Node) over ws and wss with MQTT 5 and
//! 3.1.1, every QoS 1 message received once, logins and ACL refusals answered as over TCP; MQTT.js
//! in Debian's chromium receiving a `mosquitto_pub` reading and publishing one a Kafka consumer
//! reads; and raw sockets: upgrade requests refused (oversized, not an upgrade, no `mqtt`
//! subprotocol) or closed at the deadline, a frame announcing a huge length, a text frame, an
//! unmasked frame, MQTT packets split over frames and packed into one, ping and close, while a
//! client connected throughout keeps being served.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tributary_broker::kafka::KafkaConfig;
use tributary_broker::mqtt::MqttConfig;

use crate::mqtt_faults::{connect_flags, publish};
use crate::security::{auth, start, user, Pki};
use crate::support::KafkaBroker;

/// An upgrade request for MQTT over WebSocket with the headers `extra` added.
fn upgrade_request(extra: &str) -> String {
    format!(
        "GET /mqtt HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// Reads an HTTP response head (up to the blank line).
fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(_) => head.push(b[0]),
            Err(e) => panic!("reading the answer: {e} (so far {:?})", String::from_utf8_lossy(&head)),
        }
    }
    String::from_utf8(head).expect("utf-8 head")
}

/// `true` once the server closed the connection (EOF or reset), reading and dropping anything
/// before.
fn closed(s: &mut TcpStream) -> bool {
    let mut sink = [0u8; 1024];
    loop {
        match s.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// A raw WebSocket client: the upgrade done, frames masked by hand.
struct Ws {
    s: TcpStream,
    /// Data of binary frames received and not yet taken as MQTT packets.
    data: Vec<u8>,
}

impl Ws {
    fn open(addr: SocketAddr) -> Self {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        s.write_all(upgrade_request("Sec-WebSocket-Protocol: mqtt\r\n").as_bytes()).expect("upgrade");
        let head = read_head(&mut s);
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        assert!(head.contains("\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"), "{head}");
        assert!(head.contains("\r\nSec-WebSocket-Protocol: mqtt\r\n"), "[MQTT-6.0.0-4]: {head}");
        Self { s, data: Vec::new() }
    }

    /// Opens and logs in with a clean session (3.1.1 or 5).
    fn connected(addr: SocketAddr, level: u8, id: &str) -> Self {
        let mut ws = Self::open(addr);
        ws.binary(&connect_flags(level, id, 0x02));
        let (kind, body) = ws.packet().expect("CONNACK");
        assert_eq!((kind, body[1]), (0x20, 0), "connection accepted");
        ws
    }

    /// A frame with the first byte `first` (FIN, opcode), masked (or not, `masked == false`).
    fn frame_with(&mut self, first: u8, payload: &[u8], masked: bool) {
        let mut f = vec![first];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(mask_bit | n as u8),
            n if n <= 0xffff => {
                f.push(mask_bit | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(mask_bit | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            let mask: [u8; 4] = rand::random();
            f.extend_from_slice(&mask);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        } else {
            f.extend_from_slice(payload);
        }
        self.s.write_all(&f).expect("send frame");
    }

    fn frame(&mut self, first: u8, payload: &[u8]) {
        self.frame_with(first, payload, true);
    }

    fn binary(&mut self, payload: &[u8]) {
        self.frame(0x82, payload);
    }

    /// The next frame from the server (`None`: the connection closed); server frames are never
    /// masked (RFC 6455 5.1).
    fn recv(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut h = [0u8; 2];
        match self.s.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset) => {
                return None
            }
            Err(e) => panic!("neither a frame nor a close: {e}"),
        }
        assert_eq!(h[1] & 0x80, 0, "a server frame is not masked");
        let len = match h[1] & 0x7f {
            126 => {
                let mut b = [0u8; 2];
                self.s.read_exact(&mut b).expect("length");
                u16::from_be_bytes(b) as usize
            }
            127 => {
                let mut b = [0u8; 8];
                self.s.read_exact(&mut b).expect("length");
                u64::from_be_bytes(b) as usize
            }
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        self.s.read_exact(&mut payload).expect("payload");
        Some((h[0], payload))
    }

    /// The next MQTT packet from the data of binary frames, however the server framed it.
    fn packet(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.data.len() >= 2 {
                let (mut len, mut i) = (0usize, 1);
                while i < self.data.len() && i <= 4 {
                    len |= ((self.data[i] & 0x7f) as usize) << (7 * (i - 1));
                    if self.data[i] & 0x80 == 0 {
                        break;
                    }
                    i += 1;
                }
                if i < self.data.len() && self.data.len() > i + len {
                    let p: Vec<u8> = self.data.drain(..=i + len).collect();
                    return Some((p[0], p[i + 1..].to_vec()));
                }
            }
            match self.recv()? {
                (0x82, payload) => self.data.extend_from_slice(&payload),
                (first, payload) => panic!("expected a binary frame, got {first:#x} {payload:?}"),
            }
        }
    }

    fn ping(&mut self) {
        self.binary(&[0xC0, 0]);
        assert_eq!(self.packet().map(|p| p.0), Some(0xD0), "PINGRESP");
    }
}

/// Upgrade requests that are not served get their HTTP answer and are closed: oversized (431,
/// `mqtt.websocket_request_bytes_max`), not an upgrade (426), without the `mqtt` subprotocol
/// (400, [MQTT-6.0.0-3]); one that never ends is closed at the deadline (`connect_timeout_ms`
/// from the accept). None of them costs the client connected throughout anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_refused_or_late_are_closed_and_cost_nothing_else() {
    let broker = KafkaBroker::start_with_mqtt(MqttConfig {
        connect_timeout_ms: 1000,
        websocket_request_bytes_max: 1024,
        ..Default::default()
    })
    .await;
    let (addr, stats) = (broker.mqtt_ws, broker.mqtt_stats.clone());
    let open = stats.clone();
    tokio::task::spawn_blocking(move || {
        let mut good = Ws::connected(addr, 5, "good");
        let refused: [(&str, String, &str); 4] = [
            ("oversized", upgrade_request(&format!("Cookie: {}\r\n", "c".repeat(1100))), "431 "),
            ("oversized, never ending", format!("GET / HTTP/1.1\r\nX: {}", "x".repeat(2000)), "431 "),
            ("plain HTTP", "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".into(), "426 "),
            ("no mqtt subprotocol", upgrade_request("Sec-WebSocket-Protocol: mqttv3.1\r\n"), "400 "),
        ];
        for (what, request, status) in refused {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
            s.write_all(request.as_bytes()).expect("send");
            let head = read_head(&mut s);
            assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{what}: {head}");
            assert!(closed(&mut s), "{what}: closed after the answer");
            good.ping();
        }
        // A request that never ends: closed at the deadline, with nothing sent.
        let started = Instant::now();
        let mut slow = TcpStream::connect(addr).expect("connect");
        slow.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        slow.write_all(b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\n").expect("send");
        let mut b = [0u8; 64];
        let n = slow.read(&mut b).expect("closed, not timed out");
        let waited = started.elapsed();
        assert_eq!(n, 0, "nothing answered: {:?}", String::from_utf8_lossy(&b[..n]));
        assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(10), "closed after {waited:?}");
        good.ping();
        assert_eq!(open.listener.websocket_connections_open.load(Ordering::Relaxed), 1, "the good client");
    })
    .await
    .expect("raw clients");
    assert_eq!(stats.listener.websocket_handshake_failures.load(Ordering::Relaxed), 5);
    assert_eq!(stats.listener.websocket_connections_accepted.load(Ordering::Relaxed), 1);
}

/// Frames: [MQTT-6.0.0-2] packets split over frames (a byte each, across fragments with a ping
/// between) and packed into one frame; a ping answered with its payload and a close echoed
/// (RFC 6455 5.5); a frame announcing 2^62 bytes holds no memory while none arrive; a text frame
/// ([MQTT-6.0.0-1], close 1003) and an unmasked frame (RFC 6455 5.1, close 1002) close only their
/// connection, nothing stored; a client connected throughout is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_frames_split_packed_huge_text_unmasked_affect_only_their_connection() {
    let broker = KafkaBroker::start_with_mqtt(MqttConfig::default()).await;
    let (addr, stats, store) = (broker.mqtt_ws, broker.mqtt_stats.clone(), broker.store.clone());
    tokio::task::spawn_blocking(move || {
        let mut good = Ws::connected(addr, 4, "good");

        // CONNECT a byte per frame, as one fragmented message with a ping inside it.
        let mut split = Ws::open(addr);
        let connect = connect_flags(5, "split", 0x02);
        for (i, b) in connect.iter().enumerate() {
            let first = match i {
                0 => 0x02,
                _ if i == connect.len() - 1 => 0x80,
                _ => 0x00,
            };
            split.frame(first, &[*b]);
            if i == 3 {
                split.frame(0x89, b"are you there");
            }
        }
        assert_eq!(split.recv(), Some((0x8a, b"are you there".to_vec())), "pong with the ping's payload");
        assert_eq!(split.packet().map(|(k, b)| (k, b[1])), Some((0x20, 0)), "CONNACK");
        // Two QoS 1 publishes packed into one frame, a third split across two frames.
        let mut packed = publish(1, b"ws/a", 1, b"one", true);
        packed.extend(publish(1, b"ws/a", 2, b"two", true));
        let third = publish(1, b"ws/a", 3, b"three", true);
        packed.extend_from_slice(&third[..4]);
        split.binary(&packed);
        split.binary(&third[4..]);
        for pkid in 1..=3u16 {
            let (kind, body) = split.packet().expect("PUBACK");
            assert_eq!((kind, &body[..2]), (0x40, &pkid.to_be_bytes()[..]), "PUBACK {pkid} (stored)");
        }
        // Close: echoed with its status code, then the connection ends.
        split.frame(0x88, &[0x03, 0xe8]);
        assert_eq!(split.recv(), Some((0x88, vec![0x03, 0xe8])), "close echoed (RFC 6455 5.5.1)");
        assert!(split.recv().is_none(), "then closed");

        // A frame announcing 2^62 bytes: its payload streams through as it comes (a PINGREQ in
        // its first bytes is answered), no memory is held for the rest, others are served.
        let mut huge = Ws::connected(addr, 5, "huge");
        let mut h = vec![0x82, 0x80 | 127];
        h.extend_from_slice(&(1u64 << 62).to_be_bytes());
        let mask = [1, 2, 3, 4];
        h.extend_from_slice(&mask);
        h.extend_from_slice(&[0xC0 ^ mask[0], mask[1]]);
        huge.s.write_all(&h).expect("send");
        assert_eq!(huge.packet().map(|p| p.0), Some(0xD0), "PINGRESP from inside the huge frame");
        good.ping();
        assert!(stats.buffer_memory_bytes() < 64 * 1024, "{} B charged", stats.buffer_memory_bytes());

        // A text frame after login: close 1003, then closed; an unmasked frame: close 1002.
        let mut text = Ws::connected(addr, 5, "text");
        text.frame(0x81, &publish(0, b"ws/t", 0, b"text", true));
        assert_eq!(text.recv(), Some((0x88, vec![0x03, 0xeb])), "[MQTT-6.0.0-1]: close 1003");
        assert!(text.recv().is_none(), "then closed");
        let mut unmasked = Ws::connected(addr, 4, "unmasked");
        unmasked.frame_with(0x82, &publish(0, b"ws/u", 0, b"unmasked", false), false);
        assert_eq!(unmasked.recv(), Some((0x88, vec![0x03, 0xea])), "RFC 6455 5.1: close 1002");
        assert!(unmasked.recv().is_none(), "then closed");

        good.ping();
        good.binary(&publish(1, b"ws/a", 7, b"after", false));
        assert_eq!(good.packet().map(|p| p.0), Some(0x40), "PUBACK");
        drop(huge);
    })
    .await
    .expect("raw clients");
    let stored: Vec<String> = crate::support::read_all(&store, "mqtt", 0)
        .iter()
        .map(|r| String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned())
        .collect();
    assert_eq!(stored, ["one", "two", "three", "after"], "the text and unmasked frames stored nothing");
}

/// `mqtt.connections_max` counts TCP and WebSocket connections together, and a WebSocket client
/// over it is answered in MQTT as a TCP one is (after its upgrade: CONNACK 0x89 "server busy"
/// in MQTT 5, 3 "server unavailable" in 3.1.1), then closed; once one leaves, one gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_and_tcp_share_connections_max() {
    let broker = KafkaBroker::start_with_mqtt(MqttConfig { connections_max: 2, ..Default::default() }).await;
    let (ws_addr, tcp_addr, stats) = (broker.mqtt_ws, broker.mqtt, broker.mqtt_stats.clone());
    tokio::task::spawn_blocking(move || {
        let tcp = crate::mqtt_faults::connected(tcp_addr, 4, "tcp");
        let mut ws = Ws::connected(ws_addr, 5, "ws");
        for (level, code) in [(5u8, 0x89u8), (4, 3)] {
            let mut over = Ws::open(ws_addr);
            over.binary(&connect_flags(level, &format!("over-{level}"), 0x02));
            let (kind, body) = over.packet().expect("CONNACK");
            assert_eq!((kind, body[1]), (0x20, code), "MQTT {level} over the limit");
            assert!(closed(&mut over.s), "then closed");
        }
        let mut over_tcp = crate::mqtt_faults::open(tcp_addr);
        over_tcp.write_all(&connect_flags(5, "over-tcp", 0x02)).expect("send");
        let (kind, body) = crate::mqtt_faults::read_packet(&mut over_tcp).expect("CONNACK");
        assert_eq!((kind, body[1]), (0x20, 0x89), "a TCP client over the limit the WebSocket one holds");
        ws.ping();
        drop(tcp);
        // The TCP client's slot frees once its task ended; a WebSocket client then gets in.
        let deadline = Instant::now() + Duration::from_secs(10);
        while stats.listener.connections_open.load(Ordering::Relaxed) > 1 {
            assert!(Instant::now() < deadline, "the TCP client's connection did not end");
            std::thread::yield_now();
        }
        Ws::connected(ws_addr, 4, "ws-2").ping();
    })
    .await
    .expect("raw clients");
}

/// Graceful shutdown reaches WebSocket sessions as TCP ones: an MQTT 5 client gets DISCONNECT
/// 0x8B "server shutting down", then the close frame 1000 (RFC 6455 7.1.2), then the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_session_at_shutdown_gets_disconnect_then_close() {
    let broker = KafkaBroker::start_with_mqtt(MqttConfig::default()).await;
    let addr = broker.mqtt_ws;
    let (connected, ready) = tokio::sync::oneshot::channel();
    let client = tokio::task::spawn_blocking(move || {
        let mut ws = Ws::connected(addr, 5, "draining");
        connected.send(()).expect("signal");
        let (kind, body) = ws.packet().expect("DISCONNECT");
        assert_eq!((kind, body.first().copied()), (0xE0, Some(0x8B)), "DISCONNECT server shutting down");
        assert_eq!(ws.recv(), Some((0x88, vec![0x03, 0xe8])), "close 1000 after the session ended");
        assert!(ws.recv().is_none(), "then closed");
    });
    ready.await.expect("connected");
    let restarted = broker.restart().await;
    client.await.expect("client");
    drop(restarted);
}

/// Runs `tests/browser/mqtt_client.js` (MQTT.js in Node) against `url`; its JSON report.
async fn mqtt_js(url: String, version: u8, env: Vec<(&'static str, String)>) -> serde_json::Value {
    let out = tokio::task::spawn_blocking(move || {
        let mut all = vec![("TRIB_URL", url), ("TRIB_VERSION", version.to_string())];
        all.extend(env);
        tributary_tests::browser::run_script("mqtt_client.js", &all)
    })
    .await
    .expect("node task")
    .unwrap_or_else(|e| panic!("{e:#}"));
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Each of three QoS 1 messages (and the last) received once, at QoS 1.
fn each_once_at_qos_1(report: &serde_json::Value, what: &str) {
    let want = serde_json::json!({ "m0": [1], "m1": [1], "m2": [1], "last": [1] });
    assert_eq!(report["granted"], serde_json::json!([1]), "{what}: {report}");
    assert_eq!(report["received"], want, "{what}: {report}");
}

/// MQTT.js, the client browser dashboards use, over ws with MQTT 5 and 3.1.1: subscribes at
/// QoS 1 and receives every QoS 1 message exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_js_over_websocket_v5_and_v311_receives_each_qos1_message_once() {
    let broker = KafkaBroker::start_with_mqtt(MqttConfig::default()).await;
    for version in [5, 4] {
        let report = mqtt_js(format!("ws://127.0.0.1:{}/mqtt", broker.mqtt_ws.port()), version, vec![]).await;
        each_once_at_qos_1(&report, &format!("MQTT {version} over ws"));
    }
    let l = &broker.mqtt_stats.listener;
    assert_eq!(l.websocket_connections_accepted.load(Ordering::Relaxed), 4, "two clients per version");
    assert_eq!(crate::support::read_all(&broker.store, "mqtt", 0).len(), 8, "4 messages per version stored");
}

/// With `[auth]` on, over wss (the certificate of `[mqtt.tls]`) and ws: the same answers as over
/// TCP, from the same MQTT.js script: a QoS 1 publish outside the user's ACL refused with PUBACK
/// 0x87 (MQTT 5) or acknowledged and dropped (3.1.1), a wrong password refused with CONNACK 0x86
/// (5) or 4 (3.1.1); the allowed messages arrive once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_js_over_wss_and_ws_with_auth_is_refused_as_over_tcp() {
    let pki = Pki::new();
    let users = vec![user("dash", "dash-pw", |u| {
        u.mqtt.publish = vec!["ws/#".into()];
        u.mqtt.subscribe = vec!["ws/#".into()];
    })];
    let mqtt = MqttConfig {
        tls: tributary_broker::mqtt::MqttTlsConfig { enabled: false, ..pki.tls(false) },
        websocket_tls_listen: "127.0.0.1:0".into(),
        ..Default::default()
    };
    let b = start(auth(users, 0), mqtt, KafkaConfig::default()).await;
    let wss = b.mqtt_wss.expect("wss listener");
    let env = || {
        vec![
            ("TRIB_USER", "dash".to_string()),
            ("TRIB_PASSWORD", "dash-pw".to_string()),
            ("TRIB_BAD_PASSWORD", "wrong".to_string()),
            ("TRIB_DENIED_TOPIC", "elsewhere/x".to_string()),
            ("TRIB_CA", pki.path("ca.pem")),
        ]
    };
    for version in [5u8, 4] {
        let tcp = mqtt_js(format!("mqtt://127.0.0.1:{}", b.mqtt.port()), version, env()).await;
        let (denied, bad_login) =
            if version == 5 { ("refused 135", "refused 134") } else { ("acknowledged", "refused 4") };
        assert_eq!((tcp["denied"].as_str(), tcp["bad_login"].as_str()), (Some(denied), Some(bad_login)), "{tcp}");
        each_once_at_qos_1(&tcp, "TCP");
        for url in [format!("wss://localhost:{}/mqtt", wss.port()), format!("ws://127.0.0.1:{}/", b.mqtt_ws.port())] {
            let ws = mqtt_js(url.clone(), version, env()).await;
            assert_eq!(ws, tcp, "MQTT {version} over {url} answers as over TCP");
        }
    }
    let stored = crate::support::read_all(&b.store, "mqtt", 0);
    assert_eq!(stored.len(), 2 * 3 * 4, "the allowed messages only");
    assert_eq!(b.mqtt_stats.publishes_denied.load(Ordering::Relaxed), 6);
    assert_eq!(b.mqtt_stats.auth_failures.load(Ordering::Relaxed), 6);
    assert_eq!(b.mqtt_stats.listener.websocket_connections_accepted.load(Ordering::Relaxed), 2 * 2 * 3);
}

/// The test, in a real browser: a page in Debian's chromium loads MQTT.js from the
/// installed package (no CDN), connects to the gateway's WebSocket listener (the real binary),
/// subscribes, receives a reading published with `mosquitto_pub`, and publishes one that a Kafka
/// consumer (librdkafka) reads; /metrics counts the WebSocket connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_page_over_websocket_gets_a_mosquitto_reading_and_publishes_to_kafka() {
    use rdkafka::message::{Headers, Message};
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\ndata_dir = {:?}\ndisk_free_bytes_min = 0\n[kafka]\nlisten = \"127.0.0.1:0\"\n\
             [mqtt]\nlisten = \"127.0.0.1:0\"\nwebsocket_listen = \"127.0.0.1:0\"\n\
             [[mqtt.routes]]\nfilter = \"dashboard/#\"\ntopic = \"dashboard\"\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\nsys_interval_ms = 0\n",
            dir.path().join("data")
        ),
    )
    .expect("write config");
    let daemon = crate::support::Daemon::start(&config);
    let (mqtt, ws, kafka, metrics) =
        (daemon.addr("mqtt"), daemon.addr("mqtt_ws"), daemon.addr("kafka"), daemon.addr("metrics"));
    let port = |a: &str| a.rsplit(':').next().expect("port").to_string();
    let env = vec![("TRIB_WS_URL", format!("ws://127.0.0.1:{}/mqtt", port(&ws))), ("TRIB_MQTT_PORT", port(&mqtt))];
    let out = tokio::task::spawn_blocking(move || tributary_tests::browser::run_script("mqtt_ws_page.js", &env))
        .await
        .expect("node task")
        .unwrap_or_else(|e| panic!("{e:#}"));
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(report["received"], serde_json::json!([["meters/7/reading", "230.5"]]), "{report}");
    let got = tokio::task::spawn_blocking(move || {
        crate::support::consume(&kafka, "dashboard", 0, rdkafka::Offset::Beginning, 1)
    })
    .await
    .expect("consumer");
    assert_eq!(got[0].payload(), Some(&b"21.0"[..]));
    let topic = got[0].headers().and_then(|h| h.iter().find(|h| h.key == "mqtt.topic").and_then(|h| h.value));
    assert_eq!(topic, Some(&b"dashboard/setpoint"[..]));
    let body = crate::support::http_get(&metrics, "/metrics");
    assert!(body.contains("tributary_websocket_connections_accepted_total{protocol=\"mqtt\"} 1\n"), "{body}");
    daemon.stop();
}
