//! The mirror into a real Apache Kafka cluster: three combined broker+controller nodes from the
//! harness (`tributary_tests::kafka_cluster`), the `tributary-cloud` receiver as a child process,
//! a gateway store with the real mirror over a UDP path the test can cut. Remote topics must be
//! created with replication factor 3 and `min.insync.replicas=2`, and every source record must
//! reach them once, in order, with key, value, headers, timestamp and provenance, through a
//! receiver SIGKILL, a Kafka broker SIGKILL and restart (leader changes) and a gateway restart,
//! read back with a Kafka consumer (librdkafka). The second-Tributary variants in `mirror.rs`
//! keep what this cluster cannot do (loss and delay on the path, refusals, retention gaps, the
//! bandwidth cap, the receiver's buffer limit).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::Message;
use tributary_broker::storage::batch::StoredRecord;
use tributary_broker::{Store, TopicConfig};
use tributary_sync::CloudConfig;
use tributary_tests::kafka_cluster::{KafkaCluster, KafkaOptions};
use tributary_tests::CloudChild;

use crate::mirror::{
    assert_resumed_mid_stream, assert_same_records, caught_up, high_watermarks, marks, mirror_config, produce, topics,
    Mirror, Pki, SITE,
};
use crate::support::{client_config, KafkaBroker};
use tributary_tests::link::{udp_proxy, Impairment};

/// A three-node cluster; the harness's error (naming the command that fetches the jars) fails
/// the test when they are missing.
fn three_brokers() -> KafkaCluster {
    let cluster = tokio::task::block_in_place(|| KafkaCluster::start(KafkaOptions::cluster(3)))
        .unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("three-broker Apache Kafka cluster serving in {:.1} s", cluster.started_in.as_secs_f64());
    cluster
}

/// `tributary-cloud` as a child process, on a UDP port chosen once so it comes back on it.
pub(crate) struct Receiver {
    pub(crate) addr: SocketAddr,
    child: CloudChild,
}

impl Receiver {
    fn start(pki: &Pki, bootstrap: &str, dir: &Path) -> Self {
        Self::start_with(pki, bootstrap, dir, 3)
    }

    /// Remote topics with `replicas` replicas (and `min.insync.replicas=2` when there are 3).
    fn start_with(pki: &Pki, bootstrap: &str, dir: &Path, replicas: i32) -> Self {
        Self::start_configured(pki, bootstrap, dir, replicas, |_| {})
    }

    /// [`Receiver::start_with`], with `tweak` applied to the configuration last.
    pub(crate) fn start_configured(
        pki: &Pki,
        bootstrap: &str,
        dir: &Path,
        replicas: i32,
        tweak: impl FnOnce(&mut CloudConfig),
    ) -> Self {
        Self::start_binary(Path::new(env!("CARGO_BIN_EXE_cloud-under-test")), pki, bootstrap, dir, replicas, tweak)
    }

    /// [`Receiver::start_configured`] with another build of the receiver (a release binary, for
    /// measurements).
    pub(crate) fn start_binary(
        binary: &Path,
        pki: &Pki,
        bootstrap: &str,
        dir: &Path,
        replicas: i32,
        tweak: impl FnOnce(&mut CloudConfig),
    ) -> Self {
        let port = tributary_tests::free_udp_port().expect("free port");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut cfg = CloudConfig {
            listen: addr,
            ca_file: pki.path("ca.pem"),
            cert_file: pki.path("cloud.pem"),
            key_file: pki.path("cloud.key"),
            mirrored_report_interval_ms: 20,
            partition_credit_bytes: 256 * 1024,
            ..CloudConfig::default()
        };
        cfg.kafka.bootstrap_servers = bootstrap.to_string();
        cfg.kafka.replication_factor = replicas;
        if replicas >= 3 {
            cfg.kafka.topic_config.insert("min.insync.replicas".into(), "2".into());
        }
        cfg.kafka.request_timeout_ms = 20_000;
        cfg.kafka.properties.insert("broker.address.family".into(), "v4".into());
        cfg.log.level = "info".into();
        tweak(&mut cfg);
        let child = CloudChild::start(binary, &cfg, dir).unwrap_or_else(|e| panic!("{e:#}"));
        Self { addr, child }
    }

    /// For a one-broker cluster: replication factor 1, Kafka's default `min.insync.replicas`.
    pub(crate) fn start_single(pki: &Pki, bootstrap: &str, dir: &Path) -> Self {
        Self::start_with(pki, bootstrap, dir, 1)
    }

    pub(crate) fn spawn(&mut self) {
        self.child.spawn().unwrap_or_else(|e| panic!("{e:#}"));
    }

    pub(crate) fn kill(&mut self) {
        self.child.kill().expect("SIGKILL the receiver");
    }
}

/// Every record of a Kafka partition, from its log start to its high watermark, read with a
/// librdkafka consumer (read_committed, group-less), as the store's record type.
pub(crate) fn read_kafka(bootstrap: &str, topic: &str, partition: i32) -> Vec<StoredRecord> {
    let consumer: BaseConsumer = client_config(bootstrap)
        .set("group.id", "tests-assign-only")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    let (low, high) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(20)).expect("watermarks");
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, rdkafka::Offset::Offset(low)).expect("offset");
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let mut next = low;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while next < high {
        assert!(std::time::Instant::now() < deadline, "{topic}-{partition}: stuck at {next} of {high}");
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                next = m.offset() + 1;
                let headers = m.headers().map_or_else(Vec::new, |h| {
                    h.iter().map(|h| (h.key.to_string(), h.value.map(Bytes::copy_from_slice))).collect()
                });
                out.push(StoredRecord {
                    offset: m.offset(),
                    timestamp: m.timestamp().to_millis().expect("timestamp"),
                    key: m.key().map(Bytes::copy_from_slice),
                    value: m.payload().map(Bytes::copy_from_slice),
                    headers,
                });
            }
            Some(Err(e)) => panic!("consume {topic}-{partition}: {e}"),
            None => {}
        }
    }
    out
}

/// The central cluster holds every record of `topic` once, in order, with everything it had.
fn assert_in_kafka(cluster: &KafkaCluster, gateway: &Store, topic: &str) {
    let remote = format!("{SITE}.{topic}");
    let bootstrap = cluster.bootstrap();
    tokio::task::block_in_place(|| {
        let md = cluster.metadata(Duration::from_secs(20)).expect("metadata");
        let partitions = md.topics().iter().find(|t| t.name() == remote).map(|t| t.partitions().len() as i32);
        assert_same_records(gateway, topic, partitions, |p| read_kafka(&bootstrap, &remote, p));
    });
}

/// Replication factor 3 on every partition and `min.insync.replicas=2`, as the brokers report
/// them (metadata and DescribeConfigs).
async fn assert_durable_settings(cluster: &KafkaCluster, topic: &str) {
    let md = tokio::task::block_in_place(|| cluster.metadata(Duration::from_secs(20))).expect("metadata");
    let t = md.topics().iter().find(|t| t.name() == topic).unwrap_or_else(|| panic!("{topic} exists"));
    assert!(!t.partitions().is_empty());
    for p in t.partitions() {
        assert_eq!(p.replicas().len(), 3, "{topic}-{}: replication factor 3", p.id());
    }
    let admin: AdminClient<DefaultClientContext> = client_config(&cluster.bootstrap()).create().expect("admin");
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &AdminOptions::new())
        .await
        .expect("describe configs");
    let resource = described.into_iter().next().expect("one resource").expect("described");
    let min_isr = resource.get("min.insync.replicas").and_then(|e| e.value.clone());
    assert_eq!(min_isr.as_deref(), Some("2"), "{topic}: min.insync.replicas");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_reaches_a_three_broker_kafka_once_through_receiver_broker_and_gateway_kills() {
    let mut cluster = three_brokers();
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = KafkaBroker::start().await;
    topics(&gateway.store).await;
    produce(&gateway.store, "meters", 0, 300).await;
    produce(&gateway.store, "alarms", 0, 50).await;

    let mut receiver = Receiver::start(&pki, &cluster.bootstrap(), dir.path());
    let imp = Impairment::default();
    let via = udp_proxy(receiver.addr, imp.clone()).await.expect("proxy");
    let cert = pki.site("site", SITE, None);
    let mirror = Mirror::start(mirror_config(&pki, via, cert.clone()), &gateway.store);
    mirror.until("the initial backlog mirrored", 90, |_| caught_up(&gateway.store, &["meters", "alarms"])).await;
    // The receiver created the remote topics in this session and read or wrote them only once
    // their partitions had leaders: the first session was not dropped (UnknownPartition,
    // NotLeaderForPartition) and retried.
    assert_eq!(
        (mirror.stats.connects.load(Ordering::Relaxed), mirror.stats.reconnects.load(Ordering::Relaxed)),
        (1, 0),
        "one session for fresh remote topics; last error: {:?}",
        mirror.stats.last_error.lock().map(|e| e.clone())
    );
    for topic in ["plant-7.meters", "plant-7.alarms", "tributary.mirror.gaps"] {
        assert_durable_settings(&cluster, topic).await;
    }
    assert_in_kafka(&cluster, &gateway.store, "meters");

    // (a) The receiver is SIGKILLed while records flow: whatever librdkafka had in flight is
    // lost with it or stored without the gateway hearing of it. The restarted receiver resumes
    // each partition from the central cluster's tail, so nothing is missing or twice there.
    let before: i64 = marks(&gateway.store, "meters").iter().sum();
    produce(&gateway.store, "meters", 300, 1500).await;
    mirror
        .until("the receiver mid-stream", 60, |_| {
            marks(&gateway.store, "meters").iter().sum::<i64>() > before && !caught_up(&gateway.store, &["meters"])
        })
        .await;
    receiver.kill();
    let confirmed = marks(&gateway.store, "meters");
    produce(&gateway.store, "meters", 1800, 200).await;
    mirror.until("the link seen down", 30, |s| !s.link_up.load(Ordering::Relaxed)).await;
    receiver.spawn();
    mirror.until("mirrored after the receiver's SIGKILL", 90, |_| caught_up(&gateway.store, &["meters"])).await;
    for (p, confirmed) in confirmed.iter().enumerate() {
        let started = mirror.stats.partition("meters", p as i32).expect("started").started_at.load(Ordering::Relaxed);
        assert!(started >= *confirmed, "meters-{p}: resumed at {started}, below the confirmed {confirmed}");
    }
    assert_in_kafka(&cluster, &gateway.store, "meters");

    // (b) The leader of plant-7.meters-0 (a broker and a controller) is SIGKILLed mid-stream:
    // the partition gets a new leader, writes go on with two in-sync replicas (min.insync=2,
    // acks=all), and the idempotent producer's retries write nothing twice. It comes back and
    // catches up; the cluster is whole again before the next step.
    let leader = tokio::task::block_in_place(|| cluster.leader("plant-7.meters", 0)).expect("leader");
    assert!(leader > 0, "a leader");
    let before: i64 = marks(&gateway.store, "meters").iter().sum();
    produce(&gateway.store, "meters", 2000, 1500).await;
    mirror
        .until("the broker kill mid-stream", 60, |_| {
            marks(&gateway.store, "meters").iter().sum::<i64>() > before && !caught_up(&gateway.store, &["meters"])
        })
        .await;
    tokio::task::block_in_place(|| cluster.kill(leader)).expect("kill the leader");
    produce(&gateway.store, "meters", 3500, 300).await;
    produce(&gateway.store, "alarms", 50, 50).await;
    mirror.until("mirrored with a broker down", 120, |_| caught_up(&gateway.store, &["meters", "alarms"])).await;
    let new_leader = tokio::task::block_in_place(|| cluster.leader("plant-7.meters", 0)).expect("leader");
    assert!(new_leader > 0 && new_leader != leader, "the leadership moved from {leader} (now {new_leader})");
    tokio::task::block_in_place(|| {
        cluster.restart(leader)?;
        for topic in ["plant-7.meters", "plant-7.alarms"] {
            cluster.wait_in_sync(topic, 3, Duration::from_secs(90))?;
        }
        anyhow::Ok(())
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert_in_kafka(&cluster, &gateway.store, "meters");
    assert_in_kafka(&cluster, &gateway.store, "alarms");

    // (c) The gateway restarts mid-stream: the link goes dark first (so what the receiver
    // stores meanwhile never reaches the gateway), the gateway stops and starts again with more
    // records, and its mirror resumes from the central cluster's tail without duplicates.
    produce(&gateway.store, "meters", 3800, 100).await;
    imp.blackout.store(true, Ordering::Relaxed);
    let confirmed = marks(&gateway.store, "meters");
    produce(&gateway.store, "meters", 3900, 50).await;
    let dark = high_watermarks(&gateway.store, "meters");
    mirror.stop().await;
    let gateway = gateway.restart().await;
    produce(&gateway.store, "meters", 3950, 50).await;
    let mirror = Mirror::start(mirror_config(&pki, via, cert), &gateway.store);
    imp.blackout.store(false, Ordering::Relaxed);
    mirror
        .until("mirrored after the gateway restarted", 90, |_| caught_up(&gateway.store, &["meters", "alarms"]))
        .await;
    assert_resumed_mid_stream(&mirror.stats, "meters", &confirmed, &dark);

    assert_in_kafka(&cluster, &gateway.store, "meters");
    assert_in_kafka(&cluster, &gateway.store, "alarms");
    assert!(mirror.stats.lag(&gateway.store).iter().all(|l| l.lag_records == 0), "no lag left");
    mirror.stop().await;
    drop(receiver);
    tokio::task::block_in_place(|| cluster.stop()).expect("the cluster stops cleanly");
}

/// A remote topic the receiver has just created is used only once Kafka shows a leader for each
/// of its partitions, and its (empty) tail is not read for a resume point: the session is not
/// dropped with UnknownPartition or NotLeaderForPartition right after CreateTopics and retried
/// after the gateway's backoff, as it was against a single KRaft broker (`mirror-vs-mm2`, where
/// the gaps topic already existed and the remote topic was read as soon as it was created). Here
/// the first topic's session is up (the gaps topic made), then a new topic appears at the site:
/// one session throughout, as the gateway counts them (connections made, reconnects).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_remote_topic_on_a_single_broker_does_not_drop_the_session() {
    let cluster = tokio::task::block_in_place(|| KafkaCluster::start(KafkaOptions::default()))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = KafkaBroker::start().await;
    let cfg = TopicConfig { compression: tributary_broker::Codec::Lz4, ..TopicConfig::default() };
    gateway.store.create_topic("alarms", 1, cfg.clone()).await.expect("topic");
    produce(&gateway.store, "alarms", 0, 20).await;
    let receiver = Receiver::start_single(&pki, &cluster.bootstrap(), dir.path());
    let mirror = Mirror::start(mirror_config(&pki, receiver.addr, pki.site("site", SITE, None)), &gateway.store);
    mirror.until("the first topic mirrored", 90, |_| caught_up(&gateway.store, &["alarms"])).await;
    let one_session = |what: &str| {
        assert_eq!(
            (mirror.stats.connects.load(Ordering::Relaxed), mirror.stats.reconnects.load(Ordering::Relaxed)),
            (1, 0),
            "{what}: one session; last error: {:?}",
            mirror.stats.last_error.lock().map(|e| e.clone())
        );
    };
    one_session("fresh remote topics at the start");
    // A new topic at the site, reported within a second: its remote topic is created and used
    // while the session runs.
    gateway.store.create_topic("meters", 8, cfg).await.expect("topic");
    produce(&gateway.store, "meters", 0, 100).await;
    mirror.until("the new topic mirrored", 90, |_| caught_up(&gateway.store, &["meters", "alarms"])).await;
    one_session("a remote topic created mid-session");
    assert_in_kafka(&cluster, &gateway.store, "meters");
    assert_in_kafka(&cluster, &gateway.store, "alarms");
    mirror.stop().await;
    drop(receiver);
    tokio::task::block_in_place(|| cluster.stop()).expect("the cluster stops cleanly");
}

/// The remote topic's settings as the broker describes them (DescribeConfigs).
async fn remote_config(cluster: &KafkaCluster, topic: &str, key: &str) -> Option<String> {
    let admin: AdminClient<DefaultClientContext> = client_config(&cluster.bootstrap()).create().expect("admin");
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &AdminOptions::new())
        .await
        .expect("describe configs");
    let resource = described.into_iter().next().expect("one resource").expect("described");
    resource.get(key).and_then(|e| e.value.clone())
}

/// Issue 17: a compacted gateway topic (a user's, and `mqtt.retained` with a retained MQTT
/// publish) is mirrored into a remote topic created compacted, with the gateway topic's
/// compaction settings winning over `kafka.topic_config` for those keys (which here says
/// `cleanup.policy=delete`), the rest of `kafka.topic_config` (`retention.ms`) kept; a plain
/// topic's remote copy is as `kafka.topic_config` says. The user's topic was compacted on the
/// gateway before the mirror started (offset holes at its start and in the middle): every
/// surviving record arrives once, in order, with its provenance (source offsets with the holes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_topics_are_mirrored_into_compacted_remote_topics_with_their_holes() {
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use tributary_broker::mqtt::routes::RETAINED_TOPIC;
    use tributary_broker::storage::batch::NewRecord;
    use tributary_sync::protocol::MIRRORED_TOPIC_CONFIGS;

    let cluster = tokio::task::block_in_place(|| KafkaCluster::start(KafkaOptions::default()))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = KafkaBroker::start_with_mqtt(tributary_broker::mqtt::MqttConfig::default()).await;

    // A retained MQTT publish lands in mqtt.retained.
    let (publ, mut prx) = crate::mqtt5::client5(&gateway, "meter-7");
    publ.publish("meters/7/state", Q5::AtLeastOnce, true, r#"{"kwh":12}"#).await.expect("publish");
    crate::mqtt::next(&mut prx, "PUBACK", |p| matches!(p, P5::PubAck(_))).await;
    let _ = publ.disconnect().await;

    // A user's compacted topic, compacted eagerly, with its own compaction settings.
    let mut compacted = TopicConfig::default();
    for (k, v) in [
        ("cleanup.policy", "compact"),
        ("min.cleanable.dirty.ratio", "0.01"),
        ("delete.retention.ms", "4000"),
        ("max.compaction.lag.ms", "3600000"),
    ] {
        compacted.set(k, Some(v)).expect("topic setting");
    }
    gateway.store.create_topic("state", 1, compacted).await.expect("state");
    gateway.store.create_topic("plain", 1, TopicConfig::default()).await.expect("plain");
    produce(&gateway.store, "plain", 0, 20).await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let rec = |key: &str, i: i64| {
        let mut r = NewRecord::new(Some(Bytes::from(key.to_string())), Bytes::from(format!("{key}@{i}")));
        r.headers = vec![("unit".into(), Some(Bytes::from_static(b"kWh")))];
        r.timestamp_ms = Some(now - 1000 + i);
        r
    };
    // Offsets 0..10: k0..k9; 10..14: k0, k1, k3, k9 again; 14: k5 again; 15: the active tail.
    // Compaction removes 0, 1, 3, 5 and 9: holes at the start, inside the first batch and
    // between batches.
    let rounds: [Vec<&str>; 4] = [
        vec!["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8", "k9"],
        vec!["k0", "k1", "k3", "k9"],
        vec!["k5"],
        vec!["end"],
    ];
    let mut i = 0;
    for round in rounds {
        let batch = round
            .iter()
            .map(|k| {
                i += 1;
                rec(k, i)
            })
            .collect();
        gateway.store.append_records("state", 0, batch).await.expect("append");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while gateway.store.stats().compaction_removed_records < 5 {
        assert!(std::time::Instant::now() < deadline, "compaction: {:?}", gateway.store.stats());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(gateway.store.stats().compaction_removed_records, 5);
    let survivors: Vec<i64> = crate::support::read_all(&gateway.store, "state", 0).iter().map(|r| r.offset).collect();
    assert_eq!(survivors, [2, 4, 6, 7, 8, 10, 11, 12, 13, 14, 15], "holes at 0, 1, 3, 5 and 9");

    // cloud.toml asks for delete and a retention: the compacted topics' own policy wins.
    let receiver = Receiver::start_configured(&pki, &cluster.bootstrap(), dir.path(), 1, |cfg| {
        cfg.kafka.topic_config.insert("cleanup.policy".into(), "delete".into());
        cfg.kafka.topic_config.insert("retention.ms".into(), "86400000".into());
    });
    let mut mcfg = mirror_config(&pki, receiver.addr, pki.site("site", SITE, None));
    mcfg.topics = vec!["state".into(), "plain".into(), RETAINED_TOPIC.into()];
    let mirror = Mirror::start(mcfg, &gateway.store);
    mirror.until("mirrored", 90, |_| caught_up(&gateway.store, &["state", "plain", RETAINED_TOPIC])).await;

    for topic in ["state", RETAINED_TOPIC] {
        let remote = format!("{SITE}.{topic}");
        let info = gateway.store.topic(topic).expect("topic");
        for key in MIRRORED_TOPIC_CONFIGS {
            let want = info.config.get(key);
            assert_eq!(remote_config(&cluster, &remote, key).await, want, "{remote}: {key} as on the gateway");
        }
        assert_eq!(remote_config(&cluster, &remote, "retention.ms").await.as_deref(), Some("86400000"));
        assert_in_kafka(&cluster, &gateway.store, topic);
    }
    assert_eq!(remote_config(&cluster, "plant-7.state", "cleanup.policy").await.as_deref(), Some("compact"));
    assert_eq!(remote_config(&cluster, "plant-7.state", "min.cleanable.dirty.ratio").await.as_deref(), Some("0.01"));
    assert_eq!(remote_config(&cluster, "plant-7.plain", "cleanup.policy").await.as_deref(), Some("delete"));
    assert_eq!(remote_config(&cluster, "plant-7.plain", "retention.ms").await.as_deref(), Some("86400000"));
    assert_in_kafka(&cluster, &gateway.store, "plain");
    // The centre holds the site's retained message, keyed by its MQTT topic.
    let retained = read_kafka(&cluster.bootstrap(), &format!("{SITE}.{RETAINED_TOPIC}"), 0);
    assert_eq!(retained.len(), 1);
    assert_eq!(retained[0].key.as_deref(), Some(&b"meters/7/state"[..]));
    assert_eq!(retained[0].value.as_deref(), Some(&br#"{"kwh":12}"#[..]));

    mirror.stop().await;
    drop(receiver);
    tokio::task::block_in_place(|| cluster.stop()).expect("the cluster stops cleanly");
}
