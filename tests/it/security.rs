//! Security with real clients: MQTT logins (rumqttc v4 and v5) refused with the right CONNACK
//! codes and delayed without holding up other clients, MQTT ACL denials (PUBACK 0x87, SUBACK
//! failure), rules for anonymous MQTT clients and deny entries that win over allow rules, Kafka
//! SASL PLAIN and SCRAM-SHA-256/512 with librdkafka, Kafka ACL denials for
//! produce, fetch, group join and topic creation, TLS (MQTT with rustls, client certificates;
//! Kafka SASL_SSL) and the per-address connection rate limit.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, QoS};
use tributary_broker::kafka::{KafkaConfig, KafkaServer, KafkaStats};
use tributary_broker::mqtt::{MqttConfig, MqttServer, MqttStats, MqttTlsConfig};
use tributary_broker::security::{AnonymousConfig, Auth, AuthConfig, MqttAcl, PasswordHash, UserConfig};
use tributary_broker::Store;
use tributary_broker::TopicTemplate;

use crate::mqtt::next;
use tributary_broker::storage::refusals::{Refusal, RefusalKind};

/// The store's recent refusals of `kind` from `protocol`.
pub(crate) fn refusals(store: &Store, kind: RefusalKind, protocol: &str) -> Vec<Refusal> {
    store.refusals().recent().into_iter().filter(|r| r.kind == kind && r.protocol == protocol).collect()
}
use crate::support::{client_config, storage_config};

/// A broker with both listeners and `[auth]` on.
pub(crate) struct Secure {
    dir: tempfile::TempDir,
    pub(crate) store: Store,
    pub(crate) kafka: SocketAddr,
    pub(crate) mqtt: SocketAddr,
    mqtt_tls: Option<SocketAddr>,
    /// MQTT over WebSocket, and over secure WebSocket when `websocket_tls_listen` was set.
    pub(crate) mqtt_ws: SocketAddr,
    pub(crate) mqtt_wss: Option<SocketAddr>,
    pub(crate) kafka_stats: Arc<KafkaStats>,
    pub(crate) mqtt_stats: Arc<MqttStats>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Secure {
    /// Stops both listeners, closes the store and starts again on the same data with `auth_cfg`.
    async fn restart(self, auth_cfg: AuthConfig) -> Secure {
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.await.expect("listener");
        }
        self.store.close().await.expect("close");
        start_in(self.dir, auth_cfg, MqttConfig::default(), KafkaConfig::default()).await
    }
}

pub(crate) fn user(name: &str, password: &str, rules: impl FnOnce(&mut UserConfig)) -> UserConfig {
    let mut u = UserConfig {
        name: name.into(),
        password_hash: PasswordHash::new(password.as_bytes(), 4096).expect("hash").encode(),
        ..Default::default()
    };
    rules(&mut u);
    u
}

pub(crate) fn auth(users: Vec<UserConfig>, failure_delay_ms: u64) -> AuthConfig {
    AuthConfig { enabled: true, failure_delay_ms, users, anonymous: None }
}

/// Both listeners on free ports with `auth_cfg` (`enabled = false` for a broker without logins).
pub(crate) async fn start(auth_cfg: AuthConfig, mqtt: MqttConfig, kafka: KafkaConfig) -> Secure {
    start_in(tempfile::tempdir().expect("tempdir"), auth_cfg, mqtt, kafka).await
}

async fn start_in(
    dir: tempfile::TempDir,
    auth_cfg: AuthConfig,
    mut mqtt: MqttConfig,
    mut kafka: KafkaConfig,
) -> Secure {
    let storage = storage_config(dir.path());
    let (store, _) = tokio::task::spawn_blocking(move || Store::open(storage)).await.expect("task").expect("store");
    let auth = Auth::new(&auth_cfg, "auth").expect("auth config");
    kafka.listen = "127.0.0.1:0".into();
    mqtt.listen = "127.0.0.1:0".into();
    mqtt.websocket_listen = "127.0.0.1:0".into();
    if !mqtt.websocket_tls_listen.is_empty() {
        mqtt.websocket_tls_listen = "127.0.0.1:0".into();
    }
    if mqtt.tls.enabled {
        mqtt.tls.listen = "127.0.0.1:0".into();
    }
    let template = TopicTemplate { partitions: 1, config: tributary_broker::TopicConfig::default() };
    let k = KafkaServer::bind_with(kafka, store.clone(), template.clone(), auth.clone()).await.expect("kafka");
    let m = MqttServer::bind_with(mqtt, store.clone(), template, auth).await.expect("mqtt");
    let (stop, _) = tokio::sync::watch::channel(false);
    let mut stopped = stop.subscribe();
    let (kafka, kafka_stats) = (k.local_addr().expect("addr"), k.stats());
    let (mqtt_addr, mqtt_tls, mqtt_stats) =
        (m.local_addr().expect("addr"), m.tls_local_addr().map(|a| a.expect("tls addr")), m.stats());
    let mqtt_ws = m.websocket_local_addr().expect("websocket listener").expect("ws addr");
    let mqtt_wss = m.websocket_tls_local_addr().map(|a| a.expect("wss addr"));
    let kafka_task = tokio::spawn(k.run(async move {
        let _ = stopped.wait_for(|s| *s).await;
    }));
    let mut stopped = stop.subscribe();
    let mqtt_task = tokio::spawn(m.run(async move {
        let _ = stopped.wait_for(|s| *s).await;
    }));
    Secure {
        kafka,
        mqtt: mqtt_addr,
        mqtt_tls,
        mqtt_ws,
        mqtt_wss,
        kafka_stats,
        mqtt_stats,
        dir,
        store,
        stop,
        tasks: vec![kafka_task, mqtt_task],
    }
}

// ---- MQTT ----

/// Connects a 3.1.1 client; `Ok` with its event loop running, or the CONNACK refusal.
pub(crate) async fn mqtt4(
    addr: SocketAddr,
    id: &str,
    login: Option<(&str, &str)>,
) -> Result<(AsyncClient, tokio::sync::mpsc::UnboundedReceiver<Packet>), ConnectionError> {
    let mut o = MqttOptions::new(id, "127.0.0.1", addr.port());
    o.set_keep_alive(Duration::from_secs(10));
    if let Some((u, p)) = login {
        o.set_credentials(u, p);
    }
    let (client, mut ev) = AsyncClient::new(o, 100);
    loop {
        match ev.poll().await? {
            Event::Incoming(Packet::ConnAck(_)) => break,
            _ => continue,
        }
    }
    Ok((client, pump_events(ev)))
}

type Packet5 = rumqttc::v5::mqttbytes::v5::Packet;

async fn mqtt5(
    addr: SocketAddr,
    id: &str,
    login: Option<(&str, &str)>,
) -> Result<(rumqttc::v5::AsyncClient, tokio::sync::mpsc::UnboundedReceiver<Packet5>), rumqttc::v5::ConnectionError> {
    let mut o = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", addr.port());
    o.set_keep_alive(Duration::from_secs(10));
    if let Some((u, p)) = login {
        o.set_credentials(u, p);
    }
    let (client, mut ev) = rumqttc::v5::AsyncClient::new(o, 100);
    loop {
        if let rumqttc::v5::Event::Incoming(Packet5::ConnAck(_)) = ev.poll().await? {
            break;
        }
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(e) = ev.poll().await {
            if let rumqttc::v5::Event::Incoming(p) = e {
                if tx.send(p).is_err() {
                    break;
                }
            }
        }
    });
    Ok((client, rx))
}

fn device(name: &str) -> UserConfig {
    user(name, "device-pw", |u| {
        u.mqtt.publish = vec!["devices/%c/#".into()];
        u.mqtt.subscribe = vec!["commands/%u/#".into()];
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_wrong_password_unknown_user_and_no_credentials_are_refused_with_their_codes() {
    let b = start(auth(vec![device("meter-1")], 300), MqttConfig::default(), KafkaConfig::default()).await;
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as Code5;
    let refused4 = |r: Result<_, ConnectionError>| match r {
        Err(ConnectionError::ConnectionRefused(code)) => code,
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, got a connection"),
    };
    let started = Instant::now();
    assert_eq!(refused4(mqtt4(b.mqtt, "c1", Some(("meter-1", "wrong"))).await), ConnectReturnCode::BadUserNamePassword);
    assert!(started.elapsed() >= Duration::from_millis(300), "failed logins are answered after auth.failure_delay_ms");
    assert_eq!(
        refused4(mqtt4(b.mqtt, "c1", Some(("nobody", "device-pw"))).await),
        ConnectReturnCode::BadUserNamePassword
    );
    assert_eq!(refused4(mqtt4(b.mqtt, "c1", None).await), ConnectReturnCode::NotAuthorized);
    let refused5 = |r: Result<_, rumqttc::v5::ConnectionError>| match r {
        Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => code,
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, got a connection"),
    };
    assert_eq!(refused5(mqtt5(b.mqtt, "c1", Some(("meter-1", "wrong"))).await), Code5::BadUserNamePassword);
    assert_eq!(refused5(mqtt5(b.mqtt, "c1", Some(("nobody", "x"))).await), Code5::BadUserNamePassword);
    assert_eq!(refused5(mqtt5(b.mqtt, "c1", None).await), Code5::NotAuthorized);
    assert_eq!(b.mqtt_stats.auth_failures.load(Ordering::Relaxed), 6);
    // Each is also among the store's recent refusals (the status page's list), with who and why.
    let logins = refusals(&b.store, RefusalKind::Login, "mqtt");
    assert_eq!(logins.iter().map(|r| r.count).sum::<u64>(), 6, "{logins:?}");
    assert!(logins.iter().any(|r| r.who.contains("\"meter-1\"") && r.detail == "wrong password"), "{logins:?}");
    assert!(logins.iter().any(|r| r.who.contains("\"nobody\"") && r.detail == "unknown user"), "{logins:?}");
    mqtt4(b.mqtt, "meter-1", Some(("meter-1", "device-pw"))).await.expect("right password (3.1.1)");
    mqtt5(b.mqtt, "meter-1-b", Some(("meter-1", "device-pw"))).await.expect("right password (5)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_failed_login_does_not_hold_up_other_clients() {
    let b = start(auth(vec![device("meter-1")], 5000), MqttConfig::default(), KafkaConfig::default()).await;
    let addr = b.mqtt;
    let bad = tokio::spawn(async move {
        let t = Instant::now();
        let r = mqtt4(addr, "bad", Some(("meter-1", "wrong"))).await;
        (r.is_err(), t.elapsed())
    });
    // The failing login is under way (its CONNECT was read, so its delay has started) before
    // the good one starts.
    while b.mqtt_stats.connects_read.load(Ordering::Relaxed) == 0 {
        tokio::task::yield_now().await;
    }
    let t = Instant::now();
    mqtt4(b.mqtt, "meter-1-good", Some(("meter-1", "device-pw"))).await.expect("good login");
    let good = t.elapsed();
    let (refused, slow) = bad.await.expect("task");
    assert!(refused);
    assert!(slow >= Duration::from_secs(5), "refusal after the delay ({slow:?})");
    assert!(good < Duration::from_secs(3), "a good login meanwhile took {good:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_acl_denies_publish_and_subscribe_outside_the_users_filters() {
    let b = start(auth(vec![device("meter-1")], 0), MqttConfig::default(), KafkaConfig::default()).await;
    use rumqttc::v5::mqttbytes::v5::{PubAckReason, SubscribeReasonCode as Sub5};
    let (c5, mut rx5) = mqtt5(b.mqtt, "meter-1-a", Some(("meter-1", "device-pw"))).await.expect("v5 login");
    c5.publish("devices/meter-1-a/temp", rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, "21.5").await.expect("pub");
    let ack = next(&mut rx5, "PUBACK", |p| matches!(p, Packet5::PubAck(_))).await;
    assert!(matches!(&ack, Packet5::PubAck(a) if a.reason == PubAckReason::Success), "own topic (%c) allowed: {ack:?}");
    c5.publish("devices/meter-1-b/temp", rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, "x").await.expect("pub");
    let ack = next(&mut rx5, "PUBACK", |p| matches!(p, Packet5::PubAck(_))).await;
    assert!(matches!(&ack, Packet5::PubAck(a) if a.reason == PubAckReason::NotAuthorized), "{ack:?}");
    c5.subscribe("commands/meter-1/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await.expect("sub");
    let ack = next(&mut rx5, "SUBACK", |p| matches!(p, Packet5::SubAck(_))).await;
    assert!(
        matches!(&ack, Packet5::SubAck(a) if a.return_codes == vec![Sub5::Success(rumqttc::v5::mqttbytes::QoS::AtLeastOnce)])
    );
    c5.subscribe("commands/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await.expect("sub");
    let ack = next(&mut rx5, "SUBACK", |p| matches!(p, Packet5::SubAck(_))).await;
    assert!(matches!(&ack, Packet5::SubAck(a) if a.return_codes == vec![Sub5::NotAuthorized]), "{ack:?}");
    c5.subscribe("$share/g/commands/other/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await.expect("sub");
    let ack = next(&mut rx5, "SUBACK", |p| matches!(p, Packet5::SubAck(_))).await;
    assert!(matches!(&ack, Packet5::SubAck(a) if a.return_codes == vec![Sub5::NotAuthorized]), "{ack:?}");

    // 3.1.1 has no negative PUBACK: the denied message is acknowledged and dropped.
    let (c4, mut rx4) = mqtt4(b.mqtt, "meter-1-c", Some(("meter-1", "device-pw"))).await.expect("v4 login");
    c4.publish("devices/meter-1-x/temp", QoS::AtLeastOnce, false, "x").await.expect("pub");
    next(&mut rx4, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await;
    c4.subscribe("#", QoS::AtMostOnce).await.expect("sub");
    let ack = next(&mut rx4, "SUBACK", |p| matches!(p, Packet::SubAck(_))).await;
    assert!(
        matches!(&ack, Packet::SubAck(a) if a.return_codes == vec![rumqttc::SubscribeReasonCode::Failure]),
        "{ack:?}"
    );
    c4.publish("devices/meter-1-c/temp", QoS::AtLeastOnce, false, "22").await.expect("pub");
    next(&mut rx4, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await;

    let stored: Vec<String> = crate::support::read_all(&b.store, "mqtt", 0)
        .iter()
        .map(|r| String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned())
        .collect();
    assert_eq!(stored, vec!["21.5", "22"], "only the allowed publishes were stored");
    assert_eq!(b.mqtt_stats.publishes_denied.load(Ordering::Relaxed), 2);
    let denied = refusals(&b.store, RefusalKind::Publish, "mqtt");
    assert_eq!(denied.iter().map(|r| r.count).sum::<u64>(), 2, "{denied:?}");
    assert!(denied.iter().all(|r| r.who.starts_with("meter-1") && r.detail.contains(" denied")), "{denied:?}");
    assert_eq!(b.mqtt_stats.subscriptions_denied.load(Ordering::Relaxed), 3);
}

fn anonymous(rules: impl FnOnce(&mut MqttAcl)) -> Option<AnonymousConfig> {
    let mut a = AnonymousConfig::default();
    rules(&mut a.mqtt);
    Some(a)
}

/// `[auth.anonymous]` with logins on: a CONNECT without credentials is accepted under its
/// rules (here: `public/#` only), refused elsewhere like a user's ACL denial (MQTT 5 PUBACK and
/// SUBACK 0x87; 3.1.1 publish acknowledged and dropped, SUBACK failure 0x80), and never gets an
/// id a user owns (CONNACK 0x85 / 3.1.1 return code 2, identifier rejected).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_clients_may_publish_public_and_are_refused_elsewhere() {
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode as Code5, PubAckReason, SubscribeReasonCode as Sub5};
    use rumqttc::v5::mqttbytes::QoS as QoS5;
    let mut cfg = auth(vec![device("meter-1")], 0);
    cfg.anonymous = anonymous(|m| {
        m.publish = vec!["public/#".into()];
        m.subscribe = vec!["public/#".into()];
    });
    let b = start(cfg, MqttConfig::default(), KafkaConfig::default()).await;
    let (c5, mut rx5) = mqtt5(b.mqtt, "sensor-1", None).await.expect("anonymous v5 client accepted");
    c5.publish("public/temp", QoS5::AtLeastOnce, false, "20").await.expect("pub");
    let ack = next(&mut rx5, "PUBACK", |p| matches!(p, Packet5::PubAck(_))).await;
    assert!(matches!(&ack, Packet5::PubAck(a) if a.reason == PubAckReason::Success), "{ack:?}");
    c5.publish("devices/sensor-1/temp", QoS5::AtLeastOnce, false, "x").await.expect("pub");
    let ack = next(&mut rx5, "PUBACK", |p| matches!(p, Packet5::PubAck(_))).await;
    assert!(matches!(&ack, Packet5::PubAck(a) if a.reason == PubAckReason::NotAuthorized), "{ack:?}");
    c5.subscribe("public/#", QoS5::AtLeastOnce).await.expect("sub");
    let ack = next(&mut rx5, "SUBACK", |p| matches!(p, Packet5::SubAck(_))).await;
    assert!(matches!(&ack, Packet5::SubAck(a) if a.return_codes == vec![Sub5::Success(QoS5::AtLeastOnce)]), "{ack:?}");
    c5.subscribe("#", QoS5::AtLeastOnce).await.expect("sub");
    let ack = next(&mut rx5, "SUBACK", |p| matches!(p, Packet5::SubAck(_))).await;
    assert!(matches!(&ack, Packet5::SubAck(a) if a.return_codes == vec![Sub5::NotAuthorized]), "{ack:?}");

    let (c4, mut rx4) = mqtt4(b.mqtt, "sensor-2", None).await.expect("anonymous 3.1.1 client accepted");
    c4.publish("private/x", QoS::AtLeastOnce, false, "x").await.expect("pub");
    next(&mut rx4, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await;
    c4.subscribe("commands/#", QoS::AtMostOnce).await.expect("sub");
    let ack = next(&mut rx4, "SUBACK", |p| matches!(p, Packet::SubAck(_))).await;
    assert!(matches!(&ack, Packet::SubAck(a) if a.return_codes == vec![rumqttc::SubscribeReasonCode::Failure]));
    c4.publish("public/hum", QoS::AtLeastOnce, false, "55").await.expect("pub");
    next(&mut rx4, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await;
    // The allowed publishes reach the anonymous subscriber.
    for want in ["public/hum"] {
        let p = next(&mut rx5, "PUBLISH", |p| matches!(p, Packet5::Publish(_))).await;
        assert!(matches!(&p, Packet5::Publish(m) if m.topic == want.as_bytes()), "{p:?}");
    }

    // An id a user owns ("meter-1", "meter-1-*") is not an anonymous client's.
    let refused = match mqtt5(b.mqtt, "meter-1-x", None).await {
        Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => code,
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    };
    assert_eq!(refused, Code5::ClientIdentifierNotValid);
    match mqtt4(b.mqtt, "meter-1", None).await {
        Err(ConnectionError::ConnectionRefused(code)) => assert_eq!(code, ConnectReturnCode::BadClientId),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    // A will outside the rules refuses the CONNECT, as for a user (3.1.2.5 Will Flag: the server
    // would have to publish it).
    let mut o = MqttOptions::new("sensor-4", "127.0.0.1", b.mqtt.port());
    o.set_last_will(rumqttc::LastWill::new("private/gone", "x", QoS::AtLeastOnce, false));
    let (_c, mut ev) = AsyncClient::new(o, 10);
    match ev.poll().await {
        Err(ConnectionError::ConnectionRefused(code)) => assert_eq!(code, ConnectReturnCode::NotAuthorized),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Credentials are still checked: a wrong password is not taken as anonymous.
    assert!(mqtt4(b.mqtt, "sensor-3", Some(("meter-1", "wrong"))).await.is_err());
    mqtt4(b.mqtt, "meter-1", Some(("meter-1", "device-pw"))).await.expect("the user logs in as before");

    let stored: Vec<String> = crate::support::read_all(&b.store, "mqtt", 0)
        .iter()
        .map(|r| String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned())
        .collect();
    assert_eq!(stored, vec!["20", "55"], "only the allowed publishes were stored");
    assert_eq!(b.mqtt_stats.publishes_denied.load(Ordering::Relaxed), 2);
    assert_eq!(b.mqtt_stats.subscriptions_denied.load(Ordering::Relaxed), 2);
    assert_eq!(b.mqtt_stats.client_ids_refused.load(Ordering::Relaxed), 2);
}

/// "Everything except `test/nosubscribe`" (the paho interoperability suite's refused topic),
/// which an allow-list cannot say: with logins off and `[auth.anonymous]` set, a deny entry wins
/// over `#`. A subscription within it is refused (MQTT 5 SUBACK 0x87, 3.1.1 0x80); one that only
/// overlaps it (`test/+`) is granted and never delivers a message (live or retained) on the
/// denied topic; `publish_deny` refuses a publish with PUBACK 0x87.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_entry_wins_over_allow_for_anonymous_clients() {
    use rumqttc::v5::mqttbytes::v5::{PubAckReason, SubscribeReasonCode as Sub5};
    use rumqttc::v5::mqttbytes::QoS as QoS5;
    let cfg = AuthConfig {
        enabled: false,
        anonymous: anonymous(|m| {
            m.publish = vec!["#".into()];
            m.subscribe = vec!["#".into()];
            m.subscribe_deny = vec!["test/nosubscribe".into()];
            m.publish_deny = vec!["test/nopublish".into()];
        }),
        ..AuthConfig::default()
    };
    let b = start(cfg, MqttConfig::default(), KafkaConfig::default()).await;
    // Credentials are not checked with logins off: this client is anonymous too.
    let (p, mut prx) = mqtt5(b.mqtt, "pub", Some(("whoever", "x"))).await.expect("publisher");
    p.publish("test/nosubscribe", QoS5::AtLeastOnce, true, "retained-denied").await.expect("pub");
    next(&mut prx, "PUBACK", |p| matches!(p, Packet5::PubAck(_))).await;
    p.publish("test/retained", QoS5::AtLeastOnce, true, "retained-ok").await.expect("pub");
    next(&mut prx, "PUBACK", |p| matches!(p, Packet5::PubAck(_))).await;
    p.publish("test/nopublish", QoS5::AtLeastOnce, false, "x").await.expect("pub");
    let ack = next(&mut prx, "PUBACK", |p| matches!(p, Packet5::PubAck(_))).await;
    assert!(matches!(&ack, Packet5::PubAck(a) if a.reason == PubAckReason::NotAuthorized), "{ack:?}");

    let (s, mut srx) = mqtt5(b.mqtt, "sub", None).await.expect("subscriber");
    s.subscribe("test/nosubscribe", QoS5::AtLeastOnce).await.expect("sub");
    let ack = next(&mut srx, "SUBACK", |p| matches!(p, Packet5::SubAck(_))).await;
    assert!(matches!(&ack, Packet5::SubAck(a) if a.return_codes == vec![Sub5::NotAuthorized]), "{ack:?}");
    s.subscribe("test/+", QoS5::AtLeastOnce).await.expect("sub");
    let ack = next(&mut srx, "SUBACK", |p| matches!(p, Packet5::SubAck(_))).await;
    assert!(matches!(&ack, Packet5::SubAck(a) if a.return_codes == vec![Sub5::Success(QoS5::AtLeastOnce)]), "{ack:?}");
    // A denied live message first, then an allowed one: the allowed one is the next delivered.
    p.publish("test/nosubscribe", QoS5::AtLeastOnce, false, "live-denied").await.expect("pub");
    next(&mut prx, "PUBACK", |p| matches!(p, Packet5::PubAck(_))).await;
    p.publish("test/ok", QoS5::AtLeastOnce, false, "live-ok").await.expect("pub");
    next(&mut prx, "PUBACK", |p| matches!(p, Packet5::PubAck(_))).await;
    let mut got = Vec::new();
    while got.last().map(String::as_str) != Some("live-ok") {
        if let Packet5::Publish(m) = next(&mut srx, "PUBLISH", |p| matches!(p, Packet5::Publish(_))).await {
            got.push(String::from_utf8_lossy(&m.payload).into_owned());
        }
    }
    assert_eq!(got, vec!["retained-ok", "live-ok"], "nothing on test/nosubscribe is delivered");

    // With logins off the anonymous rules hold for wills too.
    let mut o = MqttOptions::new("will4", "127.0.0.1", b.mqtt.port());
    o.set_last_will(rumqttc::LastWill::new("test/nopublish", "x", QoS::AtLeastOnce, false));
    let (_c, mut ev) = AsyncClient::new(o, 10);
    match ev.poll().await {
        Err(ConnectionError::ConnectionRefused(code)) => assert_eq!(code, ConnectReturnCode::NotAuthorized),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let (c4, mut rx4) = mqtt4(b.mqtt, "sub4", None).await.expect("3.1.1 client");
    c4.subscribe("test/nosubscribe", QoS::AtMostOnce).await.expect("sub");
    let ack = next(&mut rx4, "SUBACK", |p| matches!(p, Packet::SubAck(_))).await;
    assert!(matches!(&ack, Packet::SubAck(a) if a.return_codes == vec![rumqttc::SubscribeReasonCode::Failure]));
    assert_eq!(b.mqtt_stats.subscriptions_denied.load(Ordering::Relaxed), 2);
    assert_eq!(b.mqtt_stats.publishes_denied.load(Ordering::Relaxed), 1);
    assert_eq!(b.mqtt_stats.deliveries_denied.load(Ordering::Relaxed), 2, "one retained, one live");
}

// ---- Kafka ----

pub(crate) fn sasl(addr: SocketAddr, mechanism: &str, user: &str, password: &str) -> rdkafka::ClientConfig {
    let mut c = client_config(&addr.to_string());
    c.set("security.protocol", "SASL_PLAINTEXT")
        .set("sasl.mechanism", mechanism)
        .set("sasl.username", user)
        .set("sasl.password", password);
    c
}

fn app_user() -> UserConfig {
    user("app", "app-pw", |u| {
        u.kafka.read = vec!["readings".into()];
        u.kafka.write = vec!["readings".into(), "write-only".into()];
        u.kafka.create = vec!["readings".into()];
        u.kafka.groups = vec!["dashboard-*".into()];
    })
}

#[test]
fn kafka_sasl_plain_and_scram_accept_the_right_password_and_refuse_others() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let b = rt.block_on(start(auth(vec![app_user()], 100), MqttConfig::default(), KafkaConfig::default()));
    for mechanism in ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] {
        let p: BaseProducer = sasl(b.kafka, mechanism, "app", "app-pw").create().expect("producer");
        p.send(BaseRecord::to("readings").key("k").payload(mechanism)).expect("queue");
        p.flush(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{mechanism}: produce: {e}"));
        for (u, pw) in [("app", "wrong"), ("nobody", "app-pw")] {
            let failures = b.kafka_stats.auth_failures.load(Ordering::Relaxed);
            let p: BaseProducer = sasl(b.kafka, mechanism, u, pw).create().expect("producer");
            let r = p.client().fetch_metadata(None, Duration::from_secs(5));
            assert!(r.is_err(), "{mechanism} {u}/{pw}: metadata without authentication");
            assert!(b.kafka_stats.auth_failures.load(Ordering::Relaxed) > failures, "{mechanism} {u}: counted");
        }
    }
    let logins = refusals(&b.store, RefusalKind::Login, "kafka");
    assert_eq!(
        logins.iter().map(|r| r.count).sum::<u64>(),
        b.kafka_stats.auth_failures.load(Ordering::Relaxed),
        "every failed SASL login is among the refusals: {logins:?}"
    );
    let stored: Vec<String> = crate::support::read_all(&b.store, "readings", 0)
        .iter()
        .map(|r| String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned())
        .collect();
    assert_eq!(stored, vec!["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]);
}

#[test]
fn kafka_acl_denies_produce_fetch_group_join_and_topic_creation() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let b = rt.block_on(start(auth(vec![app_user()], 0), MqttConfig::default(), KafkaConfig::default()));
    rt.block_on(async {
        for t in ["readings", "write-only", "secret"] {
            b.store.create_topic(t, 1, tributary_broker::TopicConfig::default()).await.expect("topic");
        }
    });
    let cfg = || sasl(b.kafka, "SCRAM-SHA-256", "app", "app-pw");

    // Metadata shows only what the user may see.
    let p: BaseProducer = cfg().create().expect("producer");
    let md = p.client().fetch_metadata(None, Duration::from_secs(10)).expect("metadata");
    let mut names: Vec<&str> = md.topics().iter().map(|t| t.name()).collect();
    names.sort_unstable();
    assert_eq!(names, vec!["readings", "write-only"], "secret is hidden");

    // Produce: allowed topic stored, the other refused.
    p.send(BaseRecord::to("readings").key("k").payload("ok")).expect("queue");
    p.flush(Duration::from_secs(30)).expect("allowed produce");
    let (tx, rx) = std::sync::mpsc::channel();
    let denied: rdkafka::producer::ThreadedProducer<Report> = cfg()
        .set("message.timeout.ms", "10000")
        .create_with_context(Report(std::sync::Mutex::new(tx)))
        .expect("producer");
    denied.send(BaseRecord::<(), str>::to("secret").payload("no")).map_err(|(e, _)| e).expect("queue");
    let err = rx.recv_timeout(Duration::from_secs(30)).expect("delivery report");
    assert_eq!(err, Some(RDKafkaErrorCode::TopicAuthorizationFailed), "produce to a topic without write");

    // Fetch: a topic the user may write but not read.
    let c: BaseConsumer = cfg().set("group.id", "dashboard-1").create().expect("consumer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset("write-only", 0, rdkafka::Offset::Beginning).expect("tpl");
    c.assign(&tpl).expect("assign");
    assert_eq!(poll_error(&c), RDKafkaErrorCode::TopicAuthorizationFailed, "fetch without read");

    // Group join: a group outside the user's patterns.
    let c: BaseConsumer = cfg().set("group.id", "other-group").create().expect("consumer");
    c.subscribe(&["readings"]).expect("subscribe");
    assert_eq!(poll_error(&c), RDKafkaErrorCode::GroupAuthorizationFailed, "join without group rights");
    // ...and one inside them reads the allowed topic.
    let c: BaseConsumer =
        cfg().set("group.id", "dashboard-2").set("auto.offset.reset", "earliest").create().expect("consumer");
    c.subscribe(&["readings"]).expect("subscribe");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "no message in the allowed group");
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                assert_eq!(rdkafka::Message::payload(&m), Some(&b"ok"[..]));
                break;
            }
            Some(Err(e)) => panic!("allowed group: {e}"),
            None => {}
        }
    }

    // Topic creation.
    let admin: AdminClient<DefaultClientContext> = cfg().create().expect("admin");
    let created = rt
        .block_on(admin.create_topics(
            &[NewTopic::new("not-mine", 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        ))
        .expect("create topics");
    assert_eq!(created, vec![Err(("not-mine".to_string(), RDKafkaErrorCode::TopicAuthorizationFailed))]);
    assert!(b.store.topic("not-mine").is_none());

    // DeleteRecords needs DELETE on the topic (as Kafka): read, write and create are not enough.
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset("readings", 0, rdkafka::Offset::End).expect("tpl");
    let r = rt
        .block_on(admin.delete_records(&tpl, &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)))))
        .expect("delete records");
    let e = r.find_partition("readings", 0).expect("partition");
    assert_eq!(
        e.error().err().and_then(|e| e.rdkafka_error_code()),
        Some(RDKafkaErrorCode::TopicAuthorizationFailed),
        "delete records without delete"
    );
    assert_eq!(b.store.watermarks("readings", 0).expect("wm").log_start_offset, 0);
    assert!(b.store.topic("secret").is_some_and(|_| b.store.watermarks("secret", 0).expect("wm").high_watermark == 0));
}

/// Reports each delivery's error code (`None` = delivered).
pub(crate) struct Report(std::sync::Mutex<std::sync::mpsc::Sender<Option<RDKafkaErrorCode>>>);

impl rdkafka::ClientContext for Report {}

impl rdkafka::producer::ProducerContext for Report {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &rdkafka::producer::DeliveryResult<'_>, _: ()) {
        let code = match r {
            Ok(_) => None,
            Err((KafkaError::MessageProduction(c), _)) => Some(*c),
            Err((e, _)) => panic!("unexpected delivery error {e}"),
        };
        if let Ok(tx) = self.0.lock() {
            let _ = tx.send(code);
        }
    }
}

fn poll_error(c: &BaseConsumer) -> RDKafkaErrorCode {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "no error within 30 s");
        match c.poll(Duration::from_millis(200)) {
            Some(Err(e)) => return e.rdkafka_error_code().unwrap_or_else(|| panic!("error without a code: {e}")),
            Some(Ok(_)) => panic!("a message where an error was expected"),
            None => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_requests_before_authentication_close_the_connection() {
    use kafka_protocol::messages::{ApiVersionsRequest, MetadataRequest};
    let b = start(auth(vec![app_user()], 0), MqttConfig::default(), KafkaConfig::default()).await;
    let addr = b.kafka;
    tokio::task::spawn_blocking(move || {
        let mut raw = crate::support::RawKafka::connect(addr);
        let versions = raw.call(&ApiVersionsRequest::default(), 3);
        assert!(versions.api_keys.iter().any(|k| k.api_key == 36), "SaslAuthenticate advertised with auth on");
        raw.send(&MetadataRequest::default(), 4);
        assert!(raw.recv_frame().is_none(), "metadata before SASL closes the connection");
    })
    .await
    .expect("raw client");
}

// ---- connection rate limit ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_from_one_address_does_not_stop_another_client() {
    // The flood comes from 127.0.0.2, the patient client from 127.0.0.1 (both loopback).
    let mqtt = MqttConfig { connections_per_ip_per_s_max: 5, ..Default::default() };
    let b = start(auth(vec![device("meter-1")], 0), mqtt, KafkaConfig::default()).await;
    let started = Instant::now();
    let flood = futures_util::future::join_all((0..200).map(|_| async {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.bind("127.0.0.2:0".parse().expect("addr")).expect("bind 127.0.0.2");
        sock.connect(b.mqtt).await.ok()
    }));
    let (_flood, good) = tokio::join!(flood, mqtt4(b.mqtt, "meter-1-patient", Some(("meter-1", "device-pw"))));
    good.expect("another address still connects during the flood");
    // Every flood connection is handled: accepted within the rate, or refused.
    let handled = || {
        b.mqtt_stats.listener.connections_rate_limited.load(Ordering::Relaxed)
            + b.mqtt_stats.listener.connections_accepted.load(Ordering::Relaxed)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while handled() < 201 {
        assert!(Instant::now() < deadline, "the flood was not handled within 60 s");
        tokio::task::yield_now().await;
    }
    // The bucket holds one second's worth (5) and refills at 5 per second for as long as the
    // flood took to handle, however slow the machine: that, and the patient client, is all that
    // may have been accepted.
    let allowed = 5 + (5.0 * started.elapsed().as_secs_f64()).ceil() as u64 + 1;
    let accepted = b.mqtt_stats.listener.connections_accepted.load(Ordering::Relaxed);
    assert!(accepted <= allowed, "{accepted} accepted; the rate allows {allowed} in {:?}", started.elapsed());
    assert!(
        b.mqtt_stats.listener.connections_rate_limited.load(Ordering::Relaxed) >= 200 - (allowed - 1),
        "the rest refused"
    );
}

// ---- TLS ----

pub(crate) struct Pki {
    dir: tempfile::TempDir,
    ca: tributary_sync::certs::Pem,
}

impl Pki {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = tributary_sync::certs::new_ca("test devices CA", 1).expect("ca");
        ca.write(dir.path(), "ca").expect("write ca");
        let server =
            tributary_sync::certs::server_cert(&ca, &["localhost".into(), "127.0.0.1".into()], 1).expect("server");
        server.write(dir.path(), "server").expect("write server");
        Self { dir, ca }
    }

    pub(crate) fn path(&self, f: &str) -> String {
        self.dir.path().join(f).to_str().expect("utf-8").to_string()
    }

    pub(crate) fn tls(&self, client_ca: bool) -> MqttTlsConfig {
        MqttTlsConfig {
            enabled: true,
            listen: "127.0.0.1:0".into(),
            cert_file: self.path("server.pem"),
            key_file: self.path("server.key"),
            client_ca_file: if client_ca { self.path("ca.pem") } else { String::new() },
        }
    }
}

fn rustls_client(ca_pem: &str, client: Option<&tributary_sync::certs::Pem>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("ca pem")).expect("root");
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    Arc::new(match client {
        None => b.with_no_client_auth(),
        Some(p) => b
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(p.cert.as_bytes()).expect("cert")],
                PrivateKeyDer::from_pem_slice(p.key.as_bytes()).expect("key"),
            )
            .expect("client auth"),
    })
}

async fn mqtt_tls(
    addr: SocketAddr,
    id: &str,
    login: Option<(&str, &str)>,
    tls: Arc<rustls::ClientConfig>,
) -> Result<(), ConnectionError> {
    let mut o = MqttOptions::new(id, "localhost", addr.port());
    o.set_keep_alive(Duration::from_secs(10));
    o.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls)));
    if let Some((u, p)) = login {
        o.set_credentials(u, p);
    }
    let (_client, mut ev) = AsyncClient::new(o, 10);
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = ev.poll().await? {
            return Ok(());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_tls_with_passwords_and_client_certificates() {
    let pki = Pki::new();
    let mut cert_user = device("sensor-9");
    cert_user.password_hash = String::new(); // certificate only
    let mqtt = MqttConfig { tls: pki.tls(true), ..Default::default() };
    let b = start(auth(vec![device("meter-1"), cert_user], 0), mqtt, KafkaConfig::default()).await;
    let tls_addr = b.mqtt_tls.expect("tls listener");
    let plain_tls = rustls_client(&pki.ca.cert, None);

    // Password over TLS: right and wrong.
    mqtt_tls(tls_addr, "meter-1", Some(("meter-1", "device-pw")), plain_tls.clone())
        .await
        .expect("good password over TLS");
    let e = mqtt_tls(tls_addr, "m1", Some(("meter-1", "nope")), plain_tls.clone()).await.expect_err("bad password");
    assert!(matches!(e, ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword)), "{e}");

    // A device certificate from the CA: its name is the user, no password needed.
    let good = tributary_sync::certs::site_cert(&pki.ca, "sensor-9", 1).expect("client cert");
    mqtt_tls(tls_addr, "sensor-9", None, rustls_client(&pki.ca.cert, Some(&good))).await.expect("certificate login");
    // A valid certificate naming no configured user is not authorized.
    let stranger = tributary_sync::certs::site_cert(&pki.ca, "stranger", 1).expect("client cert");
    let e =
        mqtt_tls(tls_addr, "x", None, rustls_client(&pki.ca.cert, Some(&stranger))).await.expect_err("unknown user");
    assert!(matches!(e, ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)), "{e}");
    // A certificate from another CA, and an expired one, fail the handshake.
    let other_ca = tributary_sync::certs::new_ca("other CA", 1).expect("ca");
    let foreign = tributary_sync::certs::site_cert(&other_ca, "sensor-9", 1).expect("cert");
    assert!(mqtt_tls(tls_addr, "f", None, rustls_client(&pki.ca.cert, Some(&foreign))).await.is_err());
    let expired = expired_cert(&pki.ca, "sensor-9");
    assert!(mqtt_tls(tls_addr, "e", None, rustls_client(&pki.ca.cert, Some(&expired))).await.is_err());
    assert!(b.mqtt_stats.listener.tls_handshake_failures.load(Ordering::Relaxed) >= 2);
    // A client that does not trust the server's CA gives up itself.
    let wrong_trust = rustls_client(&other_ca.cert, None);
    assert!(mqtt_tls(tls_addr, "w", Some(("meter-1", "device-pw")), wrong_trust).await.is_err());
}

/// A client certificate for `name` whose validity ended yesterday.
fn expired_cert(ca: &tributary_sync::certs::Pem, name: &str) -> tributary_sync::certs::Pem {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};
    let ca_key = KeyPair::from_pem(&ca.key).expect("ca key");
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key).expect("issuer");
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec![name.to_string()]).expect("params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(3);
    params.not_after = now - time::Duration::days(1);
    let cert = params.signed_by(&key, &issuer).expect("sign");
    tributary_sync::certs::Pem { cert: cert.pem(), key: key.serialize_pem() }
}

#[test]
fn kafka_sasl_ssl_with_librdkafka() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pki = Pki::new();
    let kafka = KafkaConfig {
        tls: tributary_broker::kafka::KafkaTlsConfig {
            enabled: true,
            cert_file: pki.path("server.pem"),
            key_file: pki.path("server.key"),
        },
        ..Default::default()
    };
    let b = rt.block_on(start(auth(vec![app_user()], 0), MqttConfig::default(), kafka));
    let ssl = |password: &str| {
        let mut c = sasl(b.kafka, "SCRAM-SHA-512", "app", password);
        c.set("security.protocol", "SASL_SSL")
            .set("ssl.ca.location", pki.path("ca.pem"))
            .set("ssl.endpoint.identification.algorithm", "none");
        c
    };
    let p: BaseProducer = ssl("app-pw").create().expect("producer");
    p.send(BaseRecord::<(), str>::to("readings").payload("over tls")).expect("queue");
    p.flush(Duration::from_secs(30)).expect("produce over SASL_SSL");
    // A wrong password over TLS: the TLS session is up, and the SASL exchange inside it fails
    // with the broker's answer (not a TLS or connection error).
    let errors = ClientErrors::default();
    let bad: BaseProducer<ClientErrors> = ssl("wrong").create_with_context(errors.clone()).expect("producer");
    let tls_failures = b.kafka_stats.listener.tls_handshake_failures.load(Ordering::Relaxed);
    assert!(bad.client().fetch_metadata(None, Duration::from_secs(5)).is_err());
    let seen = errors.wait_for(&bad, |(code, _)| *code == Some(RDKafkaErrorCode::Authentication));
    drop(bad);
    assert!(seen.1.contains("invalid credentials with SASL mechanism SCRAM-SHA-512"), "{}", seen.1);
    assert!(b.kafka_stats.auth_failures.load(Ordering::Relaxed) >= 1, "the broker counted the failed login");
    assert_eq!(
        b.kafka_stats.listener.tls_handshake_failures.load(Ordering::Relaxed),
        tls_failures,
        "TLS itself succeeded"
    );
    // Plaintext to the TLS listener: the TLS handshake fails (counted by the broker).
    let plain: BaseProducer = sasl(b.kafka, "PLAIN", "app", "app-pw").create().expect("producer");
    assert!(plain.client().fetch_metadata(None, Duration::from_secs(3)).is_err(), "plaintext to a TLS listener fails");
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.kafka_stats.listener.tls_handshake_failures.load(Ordering::Relaxed) == tls_failures {
        assert!(Instant::now() < deadline, "the broker never saw a failed TLS handshake");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(crate::support::read_all(&b.store, "readings", 0).len(), 1);
}

/// A librdkafka client context that keeps the errors the client reports (code and reason).
#[derive(Clone, Default)]
struct ClientErrors(Arc<std::sync::Mutex<Vec<ReportedError>>>);

/// An error a librdkafka client reported: its code and reason.
type ReportedError = (Option<RDKafkaErrorCode>, String);

impl rdkafka::ClientContext for ClientErrors {
    fn error(&self, error: KafkaError, reason: &str) {
        if let Ok(mut v) = self.0.lock() {
            v.push((error.rdkafka_error_code(), reason.to_string()));
        }
    }
}

impl rdkafka::producer::ProducerContext for ClientErrors {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: ()) {}
}

impl ClientErrors {
    /// The first error `client` reports that `want` accepts, serving its events for up to 20 s.
    fn wait_for(&self, client: &BaseProducer<ClientErrors>, want: impl Fn(&ReportedError) -> bool) -> ReportedError {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(e) = self.0.lock().ok().and_then(|v| v.iter().find(|e| want(e)).cloned()) {
                return e;
            }
            let seen = self.0.lock().map(|v| v.clone()).unwrap_or_default();
            assert!(Instant::now() < deadline, "not reported within 20 s; the client reported {seen:?}");
            client.poll(Duration::from_millis(50));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_session_keeps_only_what_its_users_new_rules_allow() {
    let rules = |subscribe: &[&str]| {
        let subscribe: Vec<String> = subscribe.iter().map(|s| s.to_string()).collect();
        vec![
            user("dev", "pw", |u| u.mqtt.subscribe = subscribe),
            user("pub", "pw", |u| u.mqtt.publish = vec!["#".into()]),
        ]
    };
    let b = start(auth(rules(&["x/#", "y/#"]), 0), MqttConfig::default(), KafkaConfig::default()).await;
    let connect = |port: u16| {
        let mut o = MqttOptions::new("dev", "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(10)).set_clean_session(false).set_credentials("dev", "pw");
        AsyncClient::new(o, 100)
    };
    // "dev" subscribes to x/# and y/# in a persistent session, then leaves.
    let (c, mut ev) = connect(b.mqtt.port());
    c.subscribe("x/#", QoS::AtLeastOnce).await.expect("sub");
    c.subscribe("y/#", QoS::AtLeastOnce).await.expect("sub");
    let mut subacks = 0;
    while subacks < 2 {
        if let Event::Incoming(Packet::SubAck(_)) = ev.poll().await.expect("poll") {
            subacks += 1;
        }
    }
    c.disconnect().await.expect("disconnect");
    while ev.poll().await.is_ok() {}
    // The gateway restarts with dev's rules narrowed to y/#: the stored x/# is dropped.
    let b = b.restart(auth(rules(&["y/#"]), 0)).await;
    let (_c, ev) = connect(b.mqtt.port());
    let mut rx = pump_events(ev);
    let Packet::ConnAck(ack) = next(&mut rx, "CONNACK", |p| matches!(p, Packet::ConnAck(_))).await else {
        unreachable!()
    };
    assert!(ack.session_present);
    let (p, _rx2) = mqtt4(b.mqtt, "pub", Some(("pub", "pw"))).await.expect("publisher");
    p.publish("x/1", QoS::AtLeastOnce, false, "secret").await.expect("pub");
    p.publish("y/1", QoS::AtLeastOnce, false, "visible").await.expect("pub");
    let got = next(&mut rx, "PUBLISH", |p| matches!(p, Packet::Publish(_))).await;
    assert!(matches!(&got, Packet::Publish(m) if m.topic == "y/1"), "only y/1 arrives: {got:?}");
}

/// A client id belongs to one user (`mqtt.client_ids`): another user connecting with it is
/// refused (MQTT 5 CONNACK 0x85, 3.1.1 return code 2) before anything of the owner's session is
/// touched: the owner stays connected, no will fires, and its queued message waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_client_id_belongs_to_its_user() {
    let alice = user("alice", "pw", |u| {
        u.mqtt.client_ids = Some(vec!["meter-7".into()]);
        u.mqtt.subscribe = vec!["commands/meter-7/#".into()];
        u.mqtt.publish = vec!["wills/#".into()];
    });
    let bob = user("bob", "pw", |u| {
        u.mqtt.client_ids = Some(vec!["meter-8".into()]);
        u.mqtt.subscribe = vec!["#".into()];
        u.mqtt.publish = vec!["#".into()];
    });
    let ops = user("ops", "pw", |u| {
        u.mqtt.publish = vec!["commands/#".into()];
        u.mqtt.subscribe = vec!["wills/#".into()];
    });
    let b = start(auth(vec![alice, bob, ops], 0), MqttConfig::default(), KafkaConfig::default()).await;
    let alice_opts = |clean: bool| {
        let mut o = MqttOptions::new("meter-7", "127.0.0.1", b.mqtt.port());
        o.set_keep_alive(Duration::from_secs(10)).set_clean_session(clean).set_credentials("alice", "pw");
        o.set_last_will(rumqttc::LastWill::new("wills/meter-7", "gone", QoS::AtLeastOnce, false));
        o
    };
    // Alice's persistent session subscribes to her commands and leaves; a command is queued.
    let (a, mut ev) = AsyncClient::new(alice_opts(false), 100);
    a.subscribe("commands/meter-7/#", QoS::AtLeastOnce).await.expect("sub");
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = ev.poll().await.expect("poll") {
            break;
        }
    }
    a.disconnect().await.expect("disconnect");
    while ev.poll().await.is_ok() {}
    let (ops_c, mut ops_rx) = mqtt4(b.mqtt, "ops", Some(("ops", "pw"))).await.expect("ops");
    ops_c.subscribe("wills/#", QoS::AtLeastOnce).await.expect("sub");
    next(&mut ops_rx, "SUBACK", |p| matches!(p, Packet::SubAck(_))).await;
    ops_c.publish("commands/meter-7/valve", QoS::AtLeastOnce, false, "close").await.expect("pub");
    next(&mut ops_rx, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await;

    // Bob with alice's id: refused in both versions, whether he asks to resume or start clean.
    let refused4 = |r: Result<_, ConnectionError>| match r {
        Err(ConnectionError::ConnectionRefused(code)) => code,
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("bob connected with alice's client id"),
    };
    assert_eq!(refused4(mqtt4(b.mqtt, "meter-7", Some(("bob", "pw"))).await), ConnectReturnCode::BadClientId);
    match mqtt5(b.mqtt, "meter-7", Some(("bob", "pw"))).await {
        Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, rumqttc::v5::mqttbytes::v5::ConnectReturnCode::ClientIdentifierNotValid)
        }
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("bob connected with alice's client id"),
    }
    // Alice comes back: her session and its queued command are there.
    let (a, ev) = AsyncClient::new(alice_opts(false), 100);
    let mut a_rx = pump_events(ev);
    let Packet::ConnAck(ack) = next(&mut a_rx, "CONNACK", |p| matches!(p, Packet::ConnAck(_))).await else {
        unreachable!()
    };
    assert!(ack.session_present, "alice's session was not touched");
    let Packet::Publish(m) = next(&mut a_rx, "command", |p| matches!(p, Packet::Publish(_))).await else {
        unreachable!()
    };
    assert_eq!((m.topic.as_str(), &m.payload[..]), ("commands/meter-7/valve", &b"close"[..]));
    // A clean-start takeover attempt by bob while she is connected changes nothing either.
    let mut clean = MqttOptions::new("meter-7", "127.0.0.1", b.mqtt.port());
    clean.set_clean_session(true).set_credentials("bob", "pw");
    let (_bc, mut bev) = AsyncClient::new(clean, 10);
    match bev.poll().await {
        Err(ConnectionError::ConnectionRefused(code)) => assert_eq!(code, ConnectReturnCode::BadClientId),
        other => panic!("expected a refusal, got {other:?}"),
    }
    a.publish("wills/ping", QoS::AtLeastOnce, false, "still here").await.expect("pub");
    next(&mut a_rx, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await;
    let Packet::Publish(w) = next(&mut ops_rx, "a message on wills/#", |p| matches!(p, Packet::Publish(_))).await
    else {
        unreachable!()
    };
    assert_eq!(w.topic, "wills/ping", "alice's connection was not closed and her will did not fire");
    // A server-assigned id is always allowed.
    let mut o = rumqttc::v5::MqttOptions::new("", "127.0.0.1", b.mqtt.port());
    o.set_credentials("bob", "pw");
    let (_c, mut ev) = rumqttc::v5::AsyncClient::new(o, 10);
    match ev.poll().await.expect("connected") {
        rumqttc::v5::Event::Incoming(Packet5::ConnAck(ack)) => {
            assert!(ack.properties.and_then(|p| p.assigned_client_identifier).is_some())
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(b.mqtt_stats.client_ids_refused.load(Ordering::Relaxed), 3);
}

fn pump_events(mut ev: rumqttc::EventLoop) -> tokio::sync::mpsc::UnboundedReceiver<Packet> {
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
    rx
}

/// Every advertised SaslAuthenticate version with PLAIN, and the protocol errors: a token without
/// a handshake (ILLEGAL_SASL_STATE), an unknown mechanism (UNSUPPORTED_SASL_MECHANISM), a wrong
/// password (SASL_AUTHENTICATION_FAILED with a message); each refusal closes the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_apis_at_every_version_and_their_errors() {
    use kafka_protocol::messages::{MetadataRequest, SaslAuthenticateRequest, SaslHandshakeRequest};
    use kafka_protocol::protocol::StrBytes;
    let b = start(auth(vec![app_user()], 0), MqttConfig::default(), KafkaConfig::default()).await;
    let addr = b.kafka;
    tokio::task::spawn_blocking(move || {
        let handshake = |m: &'static str| SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str(m));
        let token = |t: &'static [u8]| SaslAuthenticateRequest::default().with_auth_bytes(bytes::Bytes::from_static(t));
        for v in 0..=2 {
            let mut raw = crate::support::RawKafka::connect(addr);
            assert_eq!(raw.call(&handshake("PLAIN"), 1).error_code, 0);
            let r = raw.call(&token(b"\0app\0app-pw"), v);
            assert_eq!(r.error_code, 0, "SaslAuthenticate v{v}");
            let md = raw.call(&MetadataRequest::default(), 4);
            assert!(md.brokers.len() == 1, "served after login (v{v})");
        }
        let mut raw = crate::support::RawKafka::connect(addr);
        assert_eq!(raw.call(&token(b"\0app\0app-pw"), 1).error_code, 34, "token before handshake");
        assert!(raw.recv_frame().is_none(), "closed");
        let mut raw = crate::support::RawKafka::connect(addr);
        let r = raw.call(&handshake("GSSAPI"), 1);
        assert_eq!(r.error_code, 33, "unknown mechanism");
        assert_eq!(r.mechanisms.len(), 3, "the served mechanisms are listed");
        assert!(raw.recv_frame().is_none(), "closed");
        let mut raw = crate::support::RawKafka::connect(addr);
        raw.call(&handshake("PLAIN"), 1);
        let r = raw.call(&token(b"\0app\0wrong"), 2);
        assert_eq!(r.error_code, 58);
        assert!(r.error_message.is_some_and(|m| m.contains("invalid credentials")));
        assert!(raw.recv_frame().is_none(), "closed");
    })
    .await
    .expect("raw client");
}
