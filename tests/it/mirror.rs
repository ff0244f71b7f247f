//! Mirroring over QUIC, end to end: a gateway store, the real mirror over a UDP path this test
//! can cut, slow and make lossy, the `tributary-cloud` receiver, and a second Tributary instance
//! standing in as the central Kafka cluster (written only through its Kafka listener by
//! librdkafka). Every source record must appear there exactly once, in order, with its key,
//! value, headers and timestamp and provenance headers. The same against a three-broker Apache
//! Kafka cluster, through SIGKILLs of the receiver and a broker and a gateway restart, is in
//! `mirror_kafka.rs`; what stays here is what that cluster does not add to: a path with cuts,
//! loss and delay, refusals, retention gaps, the bandwidth cap and the receiver's buffer limit.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tributary_broker::storage::batch::NewRecord;
use tributary_broker::{Store, TopicConfig};
use tributary_sync::certs;
use tributary_sync::cloud::{CloudServer, CloudStats};
use tributary_sync::gateway::MirrorStats;
use tributary_sync::{CloudConfig, MirrorConfig};

use crate::support::{read_all, KafkaBroker};
use tributary_tests::link::{udp_proxy, Impairment};

pub(crate) const SITE: &str = "plant-7";

/// A CA with a receiver certificate for `localhost` and site certificates, in a temp dir.
pub(crate) struct Pki {
    dir: tempfile::TempDir,
    ca: certs::Pem,
}

impl Pki {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = certs::new_ca("test mirror CA", 2).expect("ca");
        ca.write(dir.path(), "ca").expect("write ca");
        certs::server_cert(&ca, &["localhost".to_string()], 2)
            .expect("server")
            .write(dir.path(), "cloud")
            .expect("write");
        Self { dir, ca }
    }

    pub(crate) fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// A site certificate for `site`, signed by this CA (or by `other` when given).
    pub(crate) fn site(&self, name: &str, site: &str, other: Option<&certs::Pem>) -> (PathBuf, PathBuf) {
        certs::site_cert(other.unwrap_or(&self.ca), site, 2)
            .expect("site cert")
            .write(self.dir.path(), name)
            .expect("write");
        (self.path(&format!("{name}.pem")), self.path(&format!("{name}.key")))
    }
}

/// A running receiver writing into `central`.
pub(crate) struct Cloud {
    pub(crate) addr: SocketAddr,
    stats: Arc<CloudStats>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

pub(crate) fn cloud_config(pki: &Pki, central: &KafkaBroker, listen: SocketAddr) -> CloudConfig {
    let mut cfg = CloudConfig {
        listen,
        ca_file: pki.path("ca.pem"),
        cert_file: pki.path("cloud.pem"),
        key_file: pki.path("cloud.key"),
        mirrored_report_interval_ms: 20,
        partition_credit_bytes: 256 * 1024,
        // Small, so the real gateway's streams go through the receiver's buffer gates too.
        frame_bytes_max: 256 * 1024,
        site_buffer_bytes_max: 512 * 1024,
        ..CloudConfig::default()
    };
    cfg.kafka.bootstrap_servers = central.addr.to_string();
    cfg.kafka.request_timeout_ms = 20_000;
    cfg.kafka.properties.insert("broker.address.family".into(), "v4".into());
    cfg
}

impl Cloud {
    pub(crate) fn start(cfg: CloudConfig) -> Self {
        Self::serve(CloudServer::bind(cfg).expect("receiver starts"))
    }

    /// Starts again on the address a stopped receiver had: its endpoint's driver lets go of the
    /// UDP socket a moment after the receiver stopped, so binding waits for that (deadline 10 s).
    pub(crate) async fn restart(cfg: CloudConfig) -> Self {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match CloudServer::bind(cfg.clone()) {
                Ok(server) => return Self::serve(server),
                Err(tributary_sync::cloud::CloudError::Endpoint(e))
                    if e.kind() == std::io::ErrorKind::AddrInUse && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("receiver restarts: {e}"),
            }
        }
    }

    fn serve(server: CloudServer) -> Self {
        let addr = server.local_addr().expect("addr");
        let stats = server.stats();
        let (stop, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Self { addr, stats, stop, task }
    }

    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("receiver task");
    }
}

/// A running gateway-side mirror.
pub(crate) struct Mirror {
    pub(crate) stats: Arc<MirrorStats>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tributary_sync::gateway::MirrorError>>,
}

pub(crate) fn mirror_config(pki: &Pki, cloud: SocketAddr, cert: (PathBuf, PathBuf)) -> MirrorConfig {
    MirrorConfig {
        enabled: true,
        cloud: cloud.to_string(),
        server_name: "localhost".into(),
        site: SITE.into(),
        ca_file: pki.path("ca.pem"),
        cert_file: cert.0,
        key_file: cert.1,
        topics: vec!["meters".into(), "alarms".into()],
        urgent_topics: vec!["alarms".into()],
        keep_alive_ms: 1_000,
        idle_timeout_ms: 3_000,
        reconnect_backoff_min_ms: 50,
        reconnect_backoff_max_ms: 500,
        read_bytes_max: 64 * 1024,
        ..MirrorConfig::default()
    }
}

impl Mirror {
    pub(crate) fn start(cfg: MirrorConfig, store: &Store) -> Self {
        cfg.validate("mirror").expect("valid mirror config");
        let stats = Arc::new(MirrorStats::default());
        let (stop, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(tributary_sync::gateway::run(
            cfg,
            store.clone(),
            stats.clone(),
            Default::default(),
            async move {
                let _ = rx.await;
            },
        ));
        Self { stats, stop, task }
    }

    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("mirror task").expect("mirror ends cleanly");
    }

    /// Waits (on the mirror's change watch, no polling) until `cond` holds.
    pub(crate) async fn until(&self, what: &str, secs: u64, cond: impl Fn(&MirrorStats) -> bool) {
        let mut rx = self.stats.subscribe();
        let wait = rx.wait_for(|_| cond(&self.stats));
        if tokio::time::timeout(Duration::from_secs(secs), wait).await.is_err() {
            panic!("{what} not reached in {secs} s; last error: {:?}", self.stats.last_error.lock().map(|e| e.clone()));
        }
    }
}

/// Every partition of `topics` confirmed mirrored up to its high watermark.
pub(crate) fn caught_up(store: &Store, topics: &[&str]) -> bool {
    topics.iter().all(|t| {
        let n = store.topic(t).map_or(0, |i| i.partitions as i32);
        (0..n).all(|p| {
            let hw = store.watermarks(t, p).map_or(0, |w| w.high_watermark);
            store.archived(t, p).ok().flatten().unwrap_or(0) >= hw
        })
    })
}

/// Each partition's confirmed mirror mark.
pub(crate) fn marks(store: &Store, topic: &str) -> Vec<i64> {
    let n = store.topic(topic).map_or(0, |i| i.partitions as i32);
    (0..n).map(|p| store.archived(topic, p).ok().flatten().unwrap_or(0)).collect()
}

pub(crate) fn high_watermarks(store: &Store, topic: &str) -> Vec<i64> {
    let n = store.topic(topic).map_or(0, |i| i.partitions as i32);
    (0..n).map(|p| store.watermarks(topic, p).map_or(0, |w| w.high_watermark)).collect()
}

/// The last session started every partition of `topic` from the central cluster's tail: at or
/// above what the gateway had confirmed when the link went dark, and below the high watermark
/// it had while dark (records the central cluster could not have), so it resumed mid-stream.
pub(crate) fn assert_resumed_mid_stream(stats: &MirrorStats, topic: &str, confirmed: &[i64], dark: &[i64]) {
    for (p, (confirmed, dark)) in confirmed.iter().zip(dark).enumerate() {
        let started = stats.partition(topic, p as i32).expect("partition started").started_at.load(Ordering::Relaxed);
        assert!(
            *confirmed <= started && started < *dark,
            "{topic}-{p}: resumed at {started}, not within [{confirmed}, {dark}) (confirmed before the cut, high watermark while dark)"
        );
    }
}

fn record(topic: &str, p: i32, i: usize) -> NewRecord {
    let mut r = NewRecord::new(
        Some(Bytes::from(format!("meter-{}", i % 17))),
        Bytes::from(format!("{{\"topic\":\"{topic}\",\"p\":{p},\"i\":{i},\"kwh\":{}.{}}}", i % 1000, i % 7)),
    );
    r.headers = vec![("unit".into(), Some(Bytes::from_static(b"kWh"))), ("none".into(), None)];
    // Recent timestamps: the default retention.ms (7 days) must not delete test data.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    r.timestamp_ms = Some(now - 3_600_000 + i as i64);
    r
}

/// Appends `n` records (batches of 10) to every partition of `topic`, numbered from `from`.
pub(crate) async fn produce(store: &Store, topic: &str, from: usize, n: usize) {
    let parts = store.topic(topic).expect("topic").partitions as i32;
    for p in 0..parts {
        for chunk in (from..from + n).collect::<Vec<_>>().chunks(10) {
            let batch = chunk.iter().map(|i| record(topic, p, *i)).collect();
            store.append_records(topic, p, batch).await.expect("append");
        }
    }
}

/// The central cluster holds every source record of `topic` exactly once, in order, with key,
/// value, headers, timestamp and provenance.
fn assert_mirrored(gateway: &Store, central: &Store, topic: &str) {
    let remote = format!("{SITE}.{topic}");
    let partitions = central.topic(&remote).map(|t| t.partitions as i32);
    assert_same_records(gateway, topic, partitions, |p| read_all(central, &remote, p));
}

/// [`assert_mirrored`] for any central cluster: `partitions` of the remote topic (`None`: it is
/// missing) and a reader of a remote partition's records.
pub(crate) fn assert_same_records(
    gateway: &Store,
    topic: &str,
    partitions: Option<i32>,
    read_remote: impl Fn(i32) -> Vec<tributary_broker::storage::batch::StoredRecord>,
) {
    let parts = gateway.topic(topic).expect("topic").partitions as i32;
    let remote = format!("{SITE}.{topic}");
    assert_eq!(partitions, Some(parts), "remote topic with as many partitions");
    for p in 0..parts {
        let src = read_all(gateway, topic, p);
        let dst = read_remote(p);
        assert_eq!(dst.len(), src.len(), "{remote}-{p}: every record once (source log start {})", src[0].offset);
        for (s, d) in src.iter().zip(&dst) {
            assert_eq!(
                (&d.key, &d.value, d.timestamp),
                (&s.key, &s.value, s.timestamp),
                "{remote}-{p} at {}",
                s.offset
            );
            let h = |k: &str| d.headers.iter().find(|(n, _)| n == k).and_then(|(_, v)| v.clone());
            let source_headers: Vec<_> = d.headers.iter().filter(|(n, _)| !n.starts_with("tributary.")).collect();
            assert_eq!(source_headers.len(), s.headers.len(), "headers kept, null values included");
            for ((n, v), (sn, sv)) in source_headers.iter().zip(&s.headers) {
                assert_eq!((n, v), (sn, sv));
            }
            assert_eq!(h("tributary.site").as_deref(), Some(SITE.as_bytes()));
            assert_eq!(h("tributary.topic").as_deref(), Some(topic.as_bytes()));
            assert_eq!(h("tributary.partition").as_deref(), Some(p.to_string().as_bytes()));
            assert_eq!(h("tributary.offset").as_deref(), Some(s.offset.to_string().as_bytes()), "in order");
        }
    }
}

pub(crate) async fn topics(store: &Store) {
    let cfg = TopicConfig { compression: tributary_broker::Codec::Lz4, ..TopicConfig::default() };
    store.create_topic("meters", 3, cfg.clone()).await.expect("meters");
    store.create_topic("alarms", 1, cfg.clone()).await.expect("alarms");
    store.create_topic("local-only", 1, cfg).await.expect("local");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_reaches_the_central_cluster_once_through_cuts_loss_and_a_receiver_restart() {
    let pki = Pki::new();
    let central = KafkaBroker::start().await;
    let gateway = KafkaBroker::start().await;
    topics(&gateway.store).await;
    produce(&gateway.store, "meters", 0, 300).await;
    produce(&gateway.store, "alarms", 0, 50).await;
    produce(&gateway.store, "local-only", 0, 10).await;

    let cloud = Cloud::start(cloud_config(&pki, &central, "127.0.0.1:0".parse().expect("addr")));
    let cloud_addr = cloud.addr;
    let imp = Impairment::default();
    let via = udp_proxy(cloud_addr, imp.clone()).await.expect("proxy");
    let cert = pki.site("site", SITE, None);
    let mirror = Mirror::start(mirror_config(&pki, via, cert), &gateway.store);
    mirror.until("the initial backlog mirrored", 60, |_| caught_up(&gateway.store, &["meters", "alarms"])).await;
    assert_mirrored(&gateway.store, &central.store, "meters");
    assert_mirrored(&gateway.store, &central.store, "alarms");
    assert!(central.store.topic(&format!("{SITE}.local-only")).is_none(), "unlisted topics stay local");
    // A Kafka consumer of the central cluster reads the mirrored records.
    let msgs = crate::support::consume(&central.addr.to_string(), "plant-7.alarms", 0, rdkafka::Offset::Beginning, 50);
    assert_eq!(rdkafka::Message::offset(&msgs[49]), 49);

    // The link goes dark while data keeps arriving; the mirror notices, then catches up.
    imp.blackout.store(true, Ordering::Relaxed);
    produce(&gateway.store, "meters", 300, 200).await;
    mirror.until("the link seen down", 30, |s| !s.link_up.load(Ordering::Relaxed)).await;
    produce(&gateway.store, "meters", 500, 100).await;
    imp.blackout.store(false, Ordering::Relaxed);
    mirror.until("the outage backlog mirrored", 60, |_| caught_up(&gateway.store, &["meters"])).await;

    // 10% loss and 100 ms of delay each way, under load.
    imp.loss_percent.store(10, Ordering::Relaxed);
    imp.delay_ms.store(100, Ordering::Relaxed);
    produce(&gateway.store, "meters", 600, 300).await;
    produce(&gateway.store, "alarms", 50, 50).await;
    mirror.until("mirrored over a lossy, slow path", 120, |_| caught_up(&gateway.store, &["meters", "alarms"])).await;
    imp.loss_percent.store(0, Ordering::Relaxed);
    imp.delay_ms.store(0, Ordering::Relaxed);

    // The receiver restarts mid-stream, on the same port. The link goes dark first, so what the
    // receiver stores while stopping never reaches the gateway, and records keep arriving that
    // the central cluster cannot have: the new session must resume from the central cluster's
    // tail, below the gateway's high watermark, not hand over cleanly at it.
    produce(&gateway.store, "meters", 900, 200).await;
    imp.blackout.store(true, Ordering::Relaxed);
    let confirmed = marks(&gateway.store, "meters");
    produce(&gateway.store, "meters", 1100, 100).await;
    let dark = high_watermarks(&gateway.store, "meters");
    mirror.until("the link seen down", 30, |s| !s.link_up.load(Ordering::Relaxed)).await;
    let cfg = cloud_config(&pki, &central, cloud_addr);
    cloud.stop().await;
    let cloud = Cloud::restart(cfg).await;
    imp.blackout.store(false, Ordering::Relaxed);
    mirror.until("mirrored after the receiver restarted", 60, |_| caught_up(&gateway.store, &["meters"])).await;
    assert_resumed_mid_stream(&mirror.stats, "meters", &confirmed, &dark);

    // The gateway's restart mid-stream is in mirror_kafka.rs, against Apache Kafka.
    assert_mirrored(&gateway.store, &central.store, "meters");
    assert_mirrored(&gateway.store, &central.store, "alarms");
    assert!(cloud.stats.records_written.load(Ordering::Relaxed) > 0);
    assert!(mirror.stats.lag(&gateway.store).iter().all(|l| l.lag_records == 0), "no lag left");
    mirror.stop().await;
    cloud.stop().await;
}

/// A receiver SIGKILLed and started again on its port is noticed at the gateway's next packet,
/// not at the QUIC idle timeout: the restarted receiver derives its stateless-reset key from its
/// TLS key and does not sign its connection ids (`tls::endpoint_config`), so it answers the old
/// connection's packets with a reset the gateway accepts. With `keep_alive_ms` = 1 s the gateway sends within a second, reconnects
/// after its backoff (at most 0.5 s here) and a handshake: back well within the stated bound of
/// 10 s, where the idle timeout (60 s here) alone would take six times that. Every record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_and_restarted_receiver_is_noticed_at_the_next_packet_not_the_idle_timeout() {
    const BOUND_SECS: u64 = 10;
    let pki = Pki::new();
    let central = KafkaBroker::start().await;
    let gateway = KafkaBroker::start().await;
    topics(&gateway.store).await;
    produce(&gateway.store, "meters", 0, 300).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = tributary_tests::free_udp_port().expect("free port");
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_cloud-under-test"));
    let mut receiver = tokio::task::block_in_place(|| {
        tributary_tests::CloudChild::start(binary, &cloud_config(&pki, &central, addr), dir.path())
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    let cert = pki.site("site", SITE, None);
    let cfg = MirrorConfig { keep_alive_ms: 1_000, idle_timeout_ms: 60_000, ..mirror_config(&pki, addr, cert) };
    assert!(BOUND_SECS * 1000 * 3 <= cfg.idle_timeout_ms, "the bound is well under the idle timeout");
    let mirror = Mirror::start(cfg, &gateway.store);
    mirror.until("the backlog mirrored", 60, |_| caught_up(&gateway.store, &["meters", "alarms"])).await;
    assert_eq!(mirror.stats.connects.load(Ordering::Relaxed), 1);

    // SIGKILL while records flow: no CONNECTION_CLOSE reaches the gateway, and the restarted
    // receiver knows nothing of the old connection.
    produce(&gateway.store, "meters", 300, 2000).await;
    receiver.kill().expect("SIGKILL the receiver");
    tokio::task::block_in_place(|| receiver.spawn()).unwrap_or_else(|e| panic!("{e:#}"));
    let restarted = std::time::Instant::now();
    mirror
        .until("the gateway connected to the restarted receiver", BOUND_SECS, |s| {
            s.connects.load(Ordering::Relaxed) >= 2 && s.link_up.load(Ordering::Relaxed)
        })
        .await;
    eprintln!("the gateway was back {:.2} s after the receiver restarted", restarted.elapsed().as_secs_f64());
    assert!(mirror.stats.last_error.lock().expect("error").contains("reset"), "ended by a stateless reset");
    mirror.until("mirrored after the restart", 60, |_| caught_up(&gateway.store, &["meters"])).await;
    assert_mirrored(&gateway.store, &central.store, "meters");
    mirror.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ca_and_a_site_that_is_not_in_the_certificate_are_refused() {
    let pki = Pki::new();
    let central = KafkaBroker::start().await;
    let gateway = KafkaBroker::start().await;
    topics(&gateway.store).await;
    produce(&gateway.store, "meters", 0, 10).await;
    let cloud = Cloud::start(cloud_config(&pki, &central, "127.0.0.1:0".parse().expect("addr")));

    // A certificate from another CA: the handshake fails.
    let rogue = certs::new_ca("rogue CA", 1).expect("rogue ca");
    let cert = pki.site("rogue", SITE, Some(&rogue));
    let mirror = Mirror::start(mirror_config(&pki, cloud.addr, cert), &gateway.store);
    // TLS 1.3: the client's certificate is checked after the client finished its side of the
    // handshake, so the refusal arrives as the connection's close reason.
    mirror.until("a refused handshake", 30, |s| s.reconnects.load(Ordering::Relaxed) >= 1).await;
    let error = mirror.stats.last_error.lock().map(|e| e.clone()).unwrap_or_default();
    assert!(error.contains("handshake") || error.contains("certificate"), "{error}");
    assert_eq!(cloud.stats.sessions.load(Ordering::Relaxed), 0, "no session for an unknown CA");
    mirror.stop().await;

    // A valid certificate for another site, claiming to be plant-7: refused by the receiver.
    let cert = pki.site("other", "plant-8", None);
    let mirror = Mirror::start(mirror_config(&pki, cloud.addr, cert), &gateway.store);
    mirror.until("a refused site", 30, |s| s.last_error.lock().is_ok_and(|e| e.contains("plant-7"))).await;
    assert!(cloud.stats.sessions_refused.load(Ordering::Relaxed) >= 1);
    mirror.stop().await;
    assert!(central.store.topic(&format!("{SITE}.meters")).is_none(), "nothing was written");
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dropped_by_retention_before_it_was_mirrored_is_recorded_as_a_gap() {
    let pki = Pki::new();
    let central = KafkaBroker::start().await;
    let gateway = KafkaBroker::start().await;
    // A small partition budget: most of what arrives while the link is down is deleted.
    let cfg = TopicConfig {
        retention_bytes: Some(8_000),
        compression: tributary_broker::Codec::None,
        ..TopicConfig::default()
    };
    gateway.store.create_topic("meters", 1, cfg).await.expect("topic");
    produce(&gateway.store, "meters", 0, 400).await;
    let start = gateway.store.watermarks("meters", 0).expect("wm").log_start_offset;
    assert!(start > 0, "retention deleted the oldest records");

    let cloud = Cloud::start(cloud_config(&pki, &central, "127.0.0.1:0".parse().expect("addr")));
    let mut mcfg = mirror_config(&pki, cloud.addr, pki.site("site", SITE, None));
    mcfg.topics = vec!["meters".into()];
    let mirror = Mirror::start(mcfg, &gateway.store);
    mirror.until("mirrored after the gap", 60, |_| caught_up(&gateway.store, &["meters"])).await;
    assert_eq!(mirror.stats.gaps.load(Ordering::Relaxed), 1);
    assert_eq!(mirror.stats.gap_records.load(Ordering::Relaxed), start as u64);
    // The gap is where the data team can see it, and the rest is there once.
    let gaps = read_all(&central.store, "tributary.mirror.gaps", 0);
    assert_eq!(gaps.len(), 1);
    let text = String::from_utf8_lossy(gaps[0].value.as_deref().unwrap_or_default()).into_owned();
    assert!(text.contains("\"site\":\"plant-7\"") && text.contains(&format!("\"to_offset\":{start}")), "{text}");
    assert!(text.contains("\"from_offset\":0"), "{text}");
    assert_mirrored(&gateway.store, &central.store, "meters");
    mirror.stop().await;
    cloud.stop().await;
}

/// Runs `tributary` (the gateway binary) with `args`; returns its exit status and stderr.
fn tributary(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tributary-under-test")).args(args).output().expect("run");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_daemon_mirrors_with_certificates_from_tributary_cert() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = |s: &str| dir.path().join(s).display().to_string();
    let (ca, site, cloud_dir) = (p("ca"), p("site"), p("cloud"));
    for args in [
        vec!["cert", "ca", "--dir", &ca],
        vec!["cert", "cloud", "--ca-dir", &ca, "--name", "localhost", "--out", &cloud_dir],
        vec!["cert", "site", "--ca-dir", &ca, "--site", SITE, "--out", &site],
    ] {
        let (ok, err) = tributary(&args);
        assert!(ok, "tributary {args:?}: {err}");
    }
    let (ok, err) = tributary(&["cert", "ca", "--dir", &ca]);
    assert!(!ok && err.contains("refusing to replace a CA"), "{err}");
    let (ok, err) = tributary(&["cert", "site", "--ca-dir", &ca, "--site", "bad_site", "--out", &site]);
    assert!(!ok && err.contains("invalid site id"), "{err}");

    let central = KafkaBroker::start().await;
    let mut ccfg = CloudConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        ca_file: dir.path().join("cloud/ca.pem"),
        cert_file: dir.path().join("cloud/cloud.pem"),
        key_file: dir.path().join("cloud/cloud.key"),
        ..CloudConfig::default()
    };
    ccfg.kafka.bootstrap_servers = central.addr.to_string();
    ccfg.kafka.properties.insert("broker.address.family".into(), "v4".into());
    ccfg.mirrored_report_interval_ms = 1;
    let cloud = Cloud::start(ccfg);

    let config = format!(
        "[storage]\ndata_dir = \"{data}\"\ndisk_free_bytes_min = 0\n\n[kafka]\nlisten = \"127.0.0.1:0\"\n\n\
         [mqtt]\nlisten = \"127.0.0.1:0\"\nwebsocket_listen = \"127.0.0.1:0\"\n\n[mirror]\nenabled = true\ncloud = \"{cloud}\"\nserver_name = \"localhost\"\n\
         site = \"{SITE}\"\nca_file = \"{site}/ca.pem\"\ncert_file = \"{site}/site.pem\"\nkey_file = \"{site}/site.key\"\n\
         topics = [\"meters\"]\n\n[metrics]\nlisten = \"127.0.0.1:0\"\nsys_interval_ms = 0\n",
        data = p("data"),
        cloud = cloud.addr,
    );
    std::fs::write(dir.path().join("gateway.toml"), config).expect("write config");
    let (ok, err) = tributary(&["config", "check", &p("gateway.toml")]);
    assert!(ok, "{err}");
    let daemon = crate::support::Daemon::start(&dir.path().join("gateway.toml"));
    let (kafka, metrics) = (daemon.addr("kafka"), daemon.addr("metrics"));

    // An application produces to the gateway with librdkafka; the data team reads the central copy.
    let producer: rdkafka::producer::FutureProducer =
        crate::support::client_config(&kafka).set("acks", "all").create().expect("producer");
    for i in 0..100 {
        let value = format!("reading-{i}");
        let rec = rdkafka::producer::FutureRecord::to("meters").key("meter-1").payload(&value);
        producer.send(rec, Duration::from_secs(10)).await.expect("produced");
    }
    let central_addr = central.addr.to_string();
    let got = tokio::task::spawn_blocking(move || {
        crate::support::consume(&central_addr, "plant-7.meters", 0, rdkafka::Offset::Beginning, 100)
    })
    .await
    .expect("consume");
    let values: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8_lossy(rdkafka::Message::payload(m).unwrap_or_default()).into_owned())
        .collect();
    assert_eq!(values, (0..100).map(|i| format!("reading-{i}")).collect::<Vec<_>>());

    // The operator's view: the mirror is up and nothing is behind (the mark arrives with the
    // next progress report, so wait for it on the scrape).
    // The child has no push interface: scrape again (each scrape is a real round trip) until the
    // report is in, within a deadline.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut text = crate::support::http_get(&metrics, "/metrics");
    while !text.contains("tributary_mirror_lag_records{topic=\"meters\",partition=\"0\"} 0")
        && std::time::Instant::now() < deadline
    {
        text = crate::support::http_get(&metrics, "/metrics");
    }
    for expected in [
        "tributary_mirror_link_up 1",
        "tributary_mirror_lag_records{topic=\"meters\",partition=\"0\"} 0",
        "tributary_mirror_mirrored_offset{topic=\"meters\",partition=\"0\"} 100",
        "tributary_partition_high_watermark{topic=\"meters\",partition=\"0\"} 100",
        "tributary_store_appended_records_total 100",
        "tributary_connections_open{protocol=\"kafka\"} 1",
    ] {
        assert!(text.contains(expected), "metrics lack {expected:?}:\n{text}");
    }
    assert!(text.contains("tributary_mirror_wire_bytes_sent_total "), "{text}");
    // The same through the CLI.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tributary-under-test"))
        .args(["mirror", "status", "--json", "--metrics", &metrics])
        .output()
        .expect("run mirror status");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(status["link_up"], true, "{status}");
    assert_eq!(status["partitions"][0]["topic"], "meters", "{status}");
    assert_eq!(status["partitions"][0]["lag_records"], 0, "{status}");
    let table = std::process::Command::new(env!("CARGO_BIN_EXE_tributary-under-test"))
        .args(["mirror", "status", "--metrics", &metrics])
        .output()
        .expect("run mirror status");
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(table.starts_with("link up") && table.contains("meters"), "{table}");

    daemon.stop();
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_of_a_site_replaces_the_first_without_duplicates() {
    let pki = Pki::new();
    let central = KafkaBroker::start().await;
    let gateway = KafkaBroker::start().await;
    topics(&gateway.store).await;
    let cloud = Cloud::start(cloud_config(&pki, &central, "127.0.0.1:0".parse().expect("addr")));
    let cert = pki.site("site", SITE, None);
    let first = Mirror::start(mirror_config(&pki, cloud.addr, cert.clone()), &gateway.store);
    produce(&gateway.store, "meters", 0, 200).await;
    first.until("the first connection streaming", 30, |s| s.link_up.load(Ordering::Relaxed)).await;
    // A second gateway process for the same site (a restarted gateway whose old connection the
    // receiver still holds, or a misconfigured twin): the two keep replacing each other while
    // data flows, and the central cluster still gets every record once.
    let second = Mirror::start(mirror_config(&pki, cloud.addr, cert), &gateway.store);
    for round in 0..5 {
        produce(&gateway.store, "meters", 200 + round * 100, 100).await;
    }
    second.until("the second connection up", 30, |s| s.connects.load(Ordering::Relaxed) >= 1).await;
    first.stop().await;
    second.until("all mirrored", 60, |_| caught_up(&gateway.store, &["meters", "alarms"])).await;
    assert!(cloud.stats.sessions.load(Ordering::Relaxed) >= 2, "the site connected more than once");
    assert_mirrored(&gateway.store, &central.store, "meters");
    second.stop().await;
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bandwidth_cap_holds_on_a_backlog() {
    let pki = Pki::new();
    let central = KafkaBroker::start().await;
    let gateway = KafkaBroker::start().await;
    // Incompressible data, so stored bytes are what crosses the link.
    let cfg = TopicConfig { compression: tributary_broker::Codec::None, ..TopicConfig::default() };
    gateway.store.create_topic("meters", 1, cfg).await.expect("topic");
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    for _ in 0..48 {
        gateway.store.append_records("meters", 0, incompressible(&mut seed, 8)).await.expect("append");
    }
    let backlog = gateway.store.partition_info("meters", 0).expect("info").logical_bytes;
    let cloud = Cloud::start(cloud_config(&pki, &central, "127.0.0.1:0".parse().expect("addr")));
    let rate = 64 * 1024;
    let mut mcfg = mirror_config(&pki, cloud.addr, pki.site("site", SITE, None));
    mcfg.topics = vec!["meters".into()];
    mcfg.bandwidth_bytes_per_s_max = rate;
    mcfg.read_bytes_max = 16 * 1024;
    let started = std::time::Instant::now();
    let mirror = Mirror::start(mcfg, &gateway.store);
    mirror.until("the backlog mirrored under the cap", 60, |_| caught_up(&gateway.store, &["meters"])).await;
    let took = started.elapsed().as_secs_f64();
    // The bucket starts full (one burst of max(rate, read size)); the rest at most at the rate.
    let floor = (backlog - rate) as f64 / rate as f64;
    assert!(took >= floor * 0.95, "{backlog} bytes in {took:.2} s: faster than {rate} B/s allows ({floor:.2} s)");
    let sent = mirror.stats.batch_bytes_sent.load(Ordering::Relaxed);
    assert!(sent >= backlog, "sent {sent} of {backlog}");
    assert_mirrored(&gateway.store, &central.store, "meters");
    mirror.stop().await;
    cloud.stop().await;
}

/// `mirror.wire_compression`: smart-meter readings stored in lz4 batches cross the link in zstd
/// batches (`"zstd"`, the default): fewer bytes through the path than stored and than the same
/// backlog sent as stored (`"none"`), and every record arrives once, in order, with its key,
/// value, headers, timestamp and provenance (the receiver decodes the zstd batches).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_on_the_wire_moves_fewer_bytes_than_the_stored_lz4_batches_and_every_record_arrives_once() {
    let pki = Pki::new();
    let mut through = Vec::new();
    for compression in [tributary_sync::config::WireCompression::None, tributary_sync::config::WireCompression::Zstd] {
        let central = KafkaBroker::start().await;
        let gateway = KafkaBroker::start().await;
        let cfg = TopicConfig { compression: tributary_broker::Codec::Lz4, ..TopicConfig::default() };
        gateway.store.create_topic("meters", 2, cfg).await.expect("topic");
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let mut meters = tributary_tests::SmartMeters::new(0, 50, 7, now - 600_000, 1000);
        for i in 0..40 {
            let batch = (0..100).map(|_| meters.next_reading()).collect();
            gateway.store.append_records("meters", i % 2, batch).await.expect("append");
        }
        let stored: u64 = (0..2).map(|p| gateway.store.partition_info("meters", p).expect("info").logical_bytes).sum();
        let cloud = Cloud::start(cloud_config(&pki, &central, "127.0.0.1:0".parse().expect("addr")));
        let imp = Impairment::default();
        let via = udp_proxy(cloud.addr, imp.clone()).await.expect("proxy");
        let mut mcfg = mirror_config(&pki, via, pki.site("site", SITE, None));
        mcfg.topics = vec!["meters".into()];
        mcfg.wire_compression = compression;
        let mirror = Mirror::start(mcfg, &gateway.store);
        mirror.until("the backlog mirrored", 60, |_| caught_up(&gateway.store, &["meters"])).await;
        assert_mirrored(&gateway.store, &central.store, "meters");
        let sent = mirror.stats.batch_bytes_sent.load(Ordering::Relaxed);
        eprintln!(
            "{compression:?}: {stored} bytes stored, {sent} batch bytes sent, {} through the path",
            imp.bytes().0
        );
        match compression {
            tributary_sync::config::WireCompression::None => assert_eq!(sent, stored, "batches as stored"),
            tributary_sync::config::WireCompression::Zstd => {
                // C libzstd at level 3: 41% fewer here (ruzstd's fastest level, before: 21%).
                assert!(sent * 10 < stored * 7, "{sent} batch bytes sent for {stored} stored: not 30% fewer")
            }
        }
        through.push(imp.bytes().0);
        mirror.stop().await;
        cloud.stop().await;
    }
    assert!(through[1] * 10 < through[0] * 9, "through the path: zstd {} against as stored {}", through[1], through[0]);
}

/// `n` keyless records of 1 KiB of xorshift noise from `seed` (which moves on): incompressible, so
/// stored bytes are what crosses the link.
fn incompressible(seed: &mut u64, n: usize) -> Vec<NewRecord> {
    (0..n)
        .map(|_| {
            let v: Vec<u8> = (0..1024)
                .map(|_| {
                    *seed ^= *seed << 13;
                    *seed ^= *seed >> 7;
                    *seed ^= *seed << 17;
                    *seed as u8
                })
                .collect();
            NewRecord::new(None::<Bytes>, Bytes::from(v))
        })
        .collect()
}

/// The drain ETA is honest: on a backlog draining under a bandwidth cap, the ETA the mirror
/// reports once its window has settled is within a tenth (plus half a second of sampling) of the
/// time the backlog then really took; a drained backlog says 0; with the link down and records
/// arriving it gives no ETA at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_eta_matches_the_time_a_capped_backlog_really_takes() {
    let pki = Pki::new();
    let central = KafkaBroker::start().await;
    let gateway = KafkaBroker::start().await;
    let cfg = TopicConfig { compression: tributary_broker::Codec::None, ..TopicConfig::default() };
    gateway.store.create_topic("meters", 1, cfg).await.expect("topic");
    // 640 KiB of incompressible 1 KiB records: about 10 s at 64 KiB/s.
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    for _ in 0..80 {
        gateway.store.append_records("meters", 0, incompressible(&mut seed, 8)).await.expect("append");
    }
    let cloud = Cloud::start(cloud_config(&pki, &central, "127.0.0.1:0".parse().expect("addr")));
    let mut mcfg = mirror_config(&pki, cloud.addr, pki.site("site", SITE, None));
    mcfg.topics = vec!["meters".into()];
    mcfg.bandwidth_bytes_per_s_max = 64 * 1024;
    mcfg.read_bytes_max = 16 * 1024;
    mcfg.drain_window_ms = 2_000;
    let started = std::time::Instant::now();
    let mirror = Mirror::start(mcfg, &gateway.store);
    // Past the bucket's first burst and one whole window of steady draining.
    mirror
        .until("an ETA from a settled window", 30, |s| {
            started.elapsed() >= Duration::from_secs(3) && s.drain().total.eta_s.is_some()
        })
        .await;
    let predicted_at = std::time::Instant::now();
    let drain = mirror.stats.drain();
    let predicted = drain.total.eta_s.expect("eta");
    let (_, topic) = drain.topics.iter().find(|(t, _)| t == "meters").expect("the topic's estimate");
    assert_eq!(topic.eta_s, drain.total.eta_s, "one topic: its ETA is the total's");
    assert!(drain.total.sent_records_per_s > 0.0 && drain.total.backlog_bytes > 0, "{drain:?}");
    mirror.until("the backlog mirrored", 60, |_| caught_up(&gateway.store, &["meters"])).await;
    let took = predicted_at.elapsed().as_secs_f64();
    eprintln!("drain ETA: predicted {predicted:.2} s, took {took:.2} s");
    assert!((took - predicted).abs() <= 0.1 * took + 0.5, "predicted {predicted:.1} s, took {took:.1} s ({drain:?})");
    mirror.until("a drained backlog says 0", 30, |s| s.drain().total.eta_s == Some(0.0)).await;
    // Link down, records arriving: no ETA once the window holds only the stalled samples.
    cloud.stop().await;
    mirror.until("the link seen down", 30, |s| !s.link_up.load(Ordering::Relaxed)).await;
    gateway.store.append_records("meters", 0, incompressible(&mut seed, 8)).await.expect("append");
    mirror
        .until("a growing backlog has no ETA", 30, |s| {
            let d = s.drain().total;
            d.backlog_records > 0 && d.eta_s.is_none()
        })
        .await;
    mirror.stop().await;
}

/// A site connection driven by hand (not by the gateway's mirror), for input the real gateway
/// never sends.
async fn raw_site(pki: &Pki, cloud: SocketAddr, cert: &(PathBuf, PathBuf)) -> (quinn::Endpoint, quinn::Connection) {
    raw_site_with(pki, cloud, cert, &tributary_sync::protocol::ALPNS).await
}

/// [`raw_site`] offering only the protocol `versions` (ALPNs).
async fn raw_site_with(
    pki: &Pki,
    cloud: SocketAddr,
    cert: &(PathBuf, PathBuf),
    versions: &[&[u8]],
) -> (quinn::Endpoint, quinn::Connection) {
    let transport =
        tributary_sync::tls::transport(Duration::from_secs(1), Duration::from_secs(20), 64, Default::default())
            .expect("transport");
    let client =
        tributary_sync::tls::client_config_with_versions(&pki.path("ca.pem"), &cert.0, &cert.1, transport, versions)
            .expect("client");
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let conn = endpoint.connect_with(client, cloud, "localhost").expect("connect").await.expect("handshake");
    (endpoint, conn)
}

/// The first control frame the receiver sends on the control stream.
async fn first_control(recv: &mut quinn::RecvStream) -> tributary_sync::protocol::Control {
    let mut decoder = tributary_sync::protocol::Decoder::new(1 << 20);
    let mut buf = vec![0u8; 4096];
    loop {
        if let Some(c) = decoder.next_control().expect("valid frame") {
            return c;
        }
        let n = recv.read(&mut buf).await.expect("read").expect("open");
        decoder.feed(&buf[..n]);
    }
}

/// Reads control frames until the receiver refuses: its `Refused` reason, or the reason it closed
/// the connection with (the close may overtake the frame); `None` if the stream just ended.
async fn refusal(conn: &quinn::Connection, recv: &mut quinn::RecvStream) -> Option<String> {
    let mut decoder = tributary_sync::protocol::Decoder::new(1 << 20);
    let mut buf = vec![0u8; 4096];
    loop {
        match decoder.next_control().expect("valid control frame") {
            Some(tributary_sync::protocol::Control::Refused { reason }) => return Some(reason),
            Some(_) => continue,
            None => {}
        }
        match tokio::time::timeout(Duration::from_secs(20), recv.read(&mut buf)).await.expect("an answer") {
            Ok(Some(n)) => decoder.feed(&buf[..n]),
            Ok(None) => return None,
            Err(_) => return Some(closed(conn).await),
        }
    }
}

/// Waits (up to 20 s) for the receiver to close the connection; its reason.
async fn closed(conn: &quinn::Connection) -> String {
    match tokio::time::timeout(Duration::from_secs(20), conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => String::from_utf8_lossy(&c.reason).into_owned(),
        Ok(other) => other.to_string(),
        Err(_) => panic!("the receiver kept the connection open"),
    }
}

/// Polls a receiver counter (it has no change feed) until `cond` holds, within 20 s.
async fn counter(what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "{what} not reached in 20 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Issue 18: protocol version 2 adds the `Offsets` frame (committed consumer-group offsets).
/// Both ends offer both versions, newest first: a version-1 gateway is still served, on version 1,
/// and the receiver takes `Offsets` only on a version-2 session; a version-2 gateway gets version
/// 2, and its commit (here at the high watermark of an empty partition) becomes a MirrorMaker 2
/// checkpoint in the central cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_version_2_is_negotiated_and_a_version_1_site_is_still_served() {
    use tributary_sync::checkpoint::{checkpoint_key, checkpoint_value, checkpoints_topic};
    use tributary_sync::protocol::{CommittedOffset, Control, PartitionReport, ALPN, ALPN_V2};
    let pki = Pki::new();
    let central = KafkaBroker::start().await;
    let cloud = Cloud::start(cloud_config(&pki, &central, "127.0.0.1:0".parse().expect("addr")));
    let cert = pki.site("site", SITE, None);
    for (versions, want) in [(&[ALPN][..], ALPN), (&[ALPN_V2, ALPN][..], ALPN_V2)] {
        let (_endpoint, conn) = raw_site_with(&pki, cloud.addr, &cert, versions).await;
        assert_eq!(tributary_sync::tls::negotiated_alpn(&conn).as_deref(), Some(want));
        let (mut send, mut recv) = conn.open_bi().await.expect("control stream");
        let report =
            PartitionReport { topic: "meters".into(), partition: 0, partitions: 1, log_start: 0, high_watermark: 0 };
        send.write_all(&Control::Hello { site: SITE.into() }.encode()).await.expect("hello");
        send.write_all(&Control::Partitions(vec![report]).encode()).await.expect("partitions");
        // The partition starts: the site is served.
        let start = first_control(&mut recv).await;
        assert_eq!(start, Control::Start { topic: "meters".into(), partition: 0, offset: 0 });
        let commit = CommittedOffset {
            group: "billing".into(),
            topic: "meters".into(),
            partition: 0,
            offset: 0,
            commit_time_ms: 1,
        };
        send.write_all(&Control::Offsets(vec![commit]).encode()).await.expect("offsets");
        if want == ALPN {
            let reason = refusal(&conn, &mut recv).await.unwrap_or_else(|| closed_now(&conn));
            assert!(reason.contains("unexpected"), "{reason}");
        } else {
            counter("the checkpoint", || cloud.stats.checkpoints_written.load(Ordering::Relaxed) == 1).await;
            let records = read_all(&central.store, &checkpoints_topic(SITE), 0);
            assert_eq!(records.len(), 1);
            assert_eq!(records[0].key.as_deref(), Some(&checkpoint_key("billing", "plant-7.meters", 0)[..]));
            assert_eq!(records[0].value.as_deref(), Some(&checkpoint_value(0, 0, "")[..]));
            let info = central.store.topic(&checkpoints_topic(SITE)).expect("checkpoints topic");
            assert_eq!(info.partitions, 1, "one partition, as MirrorMaker 2 creates it");
            assert_eq!(info.config.cleanup_policy, tributary_broker::storage::CleanupPolicy::Compact);
        }
        conn.close(0u32.into(), b"done");
    }
    cloud.stop().await;
}

/// Issue 18: a checkpoint is never ahead of the mirrored data. Two groups commit on a partition
/// whose records 0..5 are stored centrally and 5..10 not yet sent: the commit at 3 is written, the
/// commit at 8 waits, and is written (at remote offset 8) only once 5..10 are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_beyond_the_mirrored_data_waits_for_it() {
    use tributary_broker::storage::batch::encode_batch;
    use tributary_sync::checkpoint::{checkpoint_key, checkpoint_value, checkpoints_topic};
    use tributary_sync::protocol::{CommittedOffset, Control, Data, PartitionReport};
    let pki = Pki::new();
    let central = KafkaBroker::start().await;
    let cloud = Cloud::start(cloud_config(&pki, &central, "127.0.0.1:0".parse().expect("addr")));
    let (_endpoint, conn) = raw_site(&pki, cloud.addr, &pki.site("site", SITE, None)).await;
    let (mut send, mut recv) = conn.open_bi().await.expect("control stream");
    let report =
        PartitionReport { topic: "meters".into(), partition: 0, partitions: 1, log_start: 0, high_watermark: 10 };
    send.write_all(&Control::Hello { site: SITE.into() }.encode()).await.expect("hello");
    send.write_all(&Control::Partitions(vec![report]).encode()).await.expect("partitions");
    let mut decoder = tributary_sync::protocol::Decoder::new(1 << 20);
    let mut buf = vec![0u8; 4096];
    loop {
        if let Some(Control::Start { offset, .. }) = decoder.next_control().expect("valid frame") {
            assert_eq!(offset, 0);
            break;
        }
        let n = recv.read(&mut buf).await.expect("read").expect("open");
        decoder.feed(&buf[..n]);
    }
    let batch = |base: usize| {
        let records: Vec<_> = (base..base + 5).map(|i| record("meters", 0, i)).collect();
        let with_ts: Vec<_> = records.iter().map(|r| (r, r.timestamp_ms.unwrap_or_default())).collect();
        let mut out = Vec::new();
        encode_batch(&with_ts, base as i64, tributary_broker::Codec::None, Default::default(), 0, &mut out)
            .expect("encode");
        Bytes::from(out)
    };
    let mut stream = conn.open_uni().await.expect("data stream");
    stream.write_all(&Data::Open { topic: "meters".into(), partition: 0 }.encode_header()).await.expect("open");
    let first = batch(0);
    stream.write_all(&Data::Batch(first.clone()).encode_header()).await.expect("header");
    stream.write_all(&first).await.expect("batch");
    let commit = |group: &str, offset| CommittedOffset {
        group: group.into(),
        topic: "meters".into(),
        partition: 0,
        offset,
        commit_time_ms: 1,
    };
    send.write_all(&Control::Offsets(vec![commit("ahead", 8), commit("behind", 3)]).encode()).await.expect("offsets");
    counter("the first checkpoint", || cloud.stats.checkpoints_written.load(Ordering::Relaxed) == 1).await;
    let topic = checkpoints_topic(SITE);
    let written = read_all(&central.store, &topic, 0);
    assert_eq!(written.len(), 1, "only the commit whose data is stored");
    assert_eq!(written[0].key.as_deref(), Some(&checkpoint_key("behind", "plant-7.meters", 0)[..]));
    assert_eq!(written[0].value.as_deref(), Some(&checkpoint_value(3, 3, "")[..]));
    assert_eq!(cloud.stats.checkpoints_pending.load(Ordering::Relaxed), 1, "the commit at 8 waits");
    // The rest of the data: then the waiting commit.
    let second = batch(5);
    stream.write_all(&Data::Batch(second.clone()).encode_header()).await.expect("header");
    stream.write_all(&second).await.expect("batch");
    counter("the second checkpoint", || cloud.stats.checkpoints_written.load(Ordering::Relaxed) == 2).await;
    let written = read_all(&central.store, &topic, 0);
    assert_eq!(written[1].key.as_deref(), Some(&checkpoint_key("ahead", "plant-7.meters", 0)[..]));
    assert_eq!(written[1].value.as_deref(), Some(&checkpoint_value(8, 8, "")[..]));
    assert_eq!(cloud.stats.checkpoints_pending.load(Ordering::Relaxed), 0);
    conn.close(0u32.into(), b"done");
    cloud.stop().await;
}

/// The reason a connection was closed with, when it already is.
fn closed_now(conn: &quinn::Connection) -> String {
    conn.close_reason().map(|r| r.to_string()).unwrap_or_default()
}

/// Issue 13 item 16: the site id keys the session and names the remote topics, so only its
/// canonical form, exactly as the certificate names it, gets a session: `PLANT-7` and `plant-7.`
/// (which DNS matching would accept for a `plant-7` certificate) are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_id_must_be_canonical_and_exactly_the_certificate_s_name() {
    let pki = Pki::new();
    let central = KafkaBroker::start().await;
    let cloud = Cloud::start(cloud_config(&pki, &central, "127.0.0.1:0".parse().expect("addr")));
    let cert = pki.site("site", SITE, None);
    let spellings = ["PLANT-7", "plant-7.", "Plant-7"];
    for claim in spellings {
        let (_endpoint, conn) = raw_site(&pki, cloud.addr, &cert).await;
        let (mut send, mut recv) = conn.open_bi().await.expect("control stream");
        send.write_all(&tributary_sync::protocol::Control::Hello { site: claim.into() }.encode()).await.expect("hello");
        let reason = refusal(&conn, &mut recv).await.unwrap_or_else(|| panic!("{claim:?} was not refused"));
        assert!(reason.contains(claim), "{claim:?}: {reason}");
    }
    assert_eq!(cloud.stats.sessions.load(Ordering::Relaxed), 0, "no session for another spelling");
    assert_eq!(cloud.stats.sessions_refused.load(Ordering::Relaxed), spellings.len() as u64);
    // The canonical spelling gets its session.
    let (_endpoint, conn) = raw_site(&pki, cloud.addr, &cert).await;
    let (mut send, _recv) = conn.open_bi().await.expect("control stream");
    send.write_all(&tributary_sync::protocol::Control::Hello { site: SITE.into() }.encode()).await.expect("hello");
    counter("the session", || cloud.stats.sessions.load(Ordering::Relaxed) == 1).await;
    conn.close(0u32.into(), b"done");
    cloud.stop().await;
}

/// Issue 13 item 16: a data stream may hold only an `Open` frame's worth before its `Open` is
/// checked, and one site's half-sent frames together may not hold more than
/// `site_buffer_bytes_max` in the receiver (before: a 16 MiB frame per stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_s_streams_cannot_make_the_receiver_buffer_more_than_its_limit() {
    use tributary_sync::protocol::{Control, Data, PartitionReport, OPEN_FRAME_BYTES_MAX};
    let pki = Pki::new();
    let central = KafkaBroker::start().await;
    let mut cfg = cloud_config(&pki, &central, "127.0.0.1:0".parse().expect("addr"));
    cfg.frame_bytes_max = 64 * 1024;
    cfg.site_buffer_bytes_max = 128 * 1024;
    let cloud = Cloud::start(cfg);
    let cert = pki.site("site", SITE, None);

    // A stream whose first frame announces a batch of a megabyte instead of its Open.
    let (_endpoint, conn) = raw_site(&pki, cloud.addr, &cert).await;
    let (mut send, _recv) = conn.open_bi().await.expect("control stream");
    send.write_all(&Control::Hello { site: SITE.into() }.encode()).await.expect("hello");
    let mut stream = conn.open_uni().await.expect("stream");
    stream.write_all(&Data::Batch(Bytes::from(vec![0u8; 1 << 20])).encode_header()).await.expect("header");
    stream.write_all(&[0u8; 1000]).await.expect("some of the body");
    let reason = closed(&conn).await;
    assert!(reason.contains(&format!("over the limit of {OPEN_FRAME_BYTES_MAX}")), "{reason}");
    counter("buffers given back", || cloud.stats.buffered_bytes.load(Ordering::Relaxed) == 0).await;

    // Eight partitions, each stream opened and a 60 KiB batch begun: headers first, so every
    // stream is inside a frame; then the bodies (never finished). Together 480 KiB, over the
    // site's 128 KiB.
    let (_endpoint, conn) = raw_site(&pki, cloud.addr, &cert).await;
    let (mut send, mut recv) = conn.open_bi().await.expect("control stream");
    send.write_all(&Control::Hello { site: SITE.into() }.encode()).await.expect("hello");
    let reports = (0..8)
        .map(|p| PartitionReport {
            topic: "meters".into(),
            partition: p,
            partitions: 8,
            log_start: 0,
            high_watermark: 1000,
        })
        .collect();
    send.write_all(&Control::Partitions(reports).encode()).await.expect("partitions");
    let mut decoder = tributary_sync::protocol::Decoder::new(1 << 20);
    let mut buf = vec![0u8; 4096];
    let mut started = 0;
    while started < 8 {
        match decoder.next_control().expect("control") {
            Some(Control::Start { .. }) => started += 1,
            Some(_) => {}
            None => {
                let n = recv.read(&mut buf).await.expect("read").expect("open");
                decoder.feed(&buf[..n]);
            }
        }
    }
    let body = 60 * 1024;
    let header = Data::Batch(Bytes::from(vec![0u8; body])).encode_header();
    let mut streams = Vec::new();
    for p in 0..8 {
        let mut s = conn.open_uni().await.expect("stream");
        let mut first = Data::Open { topic: "meters".into(), partition: p }.encode_header().to_vec();
        first.extend_from_slice(&header);
        s.write_all(&first).await.expect("open and header");
        streams.push(s);
    }
    counter("every stream inside its frame", || {
        cloud.stats.buffered_bytes.load(Ordering::Relaxed) == 8 * header.len() as u64
    })
    .await;
    for s in &mut streams {
        s.write_all(&vec![7u8; body - 1]).await.expect("body");
    }
    let reason = closed(&conn).await;
    assert!(reason.contains("site_buffer_bytes_max = 131072"), "{reason}");
    counter("buffers given back", || cloud.stats.buffered_bytes.load(Ordering::Relaxed) == 0).await;
    cloud.stop().await;
}

/// Issue 17: the `TopicConfigs` frame belongs to protocol version 2. A version-1 site that sends
/// it is refused (a version-1 gateway never does: it does not know the frame).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_configs_on_a_version_1_session_are_refused() {
    use tributary_sync::protocol::{Control, TopicSettings, ALPN};
    let pki = Pki::new();
    let central = KafkaBroker::start().await;
    let cloud = Cloud::start(cloud_config(&pki, &central, "127.0.0.1:0".parse().expect("addr")));
    let cert = pki.site("site", SITE, None);
    let (_endpoint, conn) = raw_site_with(&pki, cloud.addr, &cert, &[ALPN]).await;
    let (mut send, mut recv) = conn.open_bi().await.expect("control stream");
    send.write_all(&Control::Hello { site: SITE.into() }.encode()).await.expect("hello");
    let settings = TopicSettings { topic: "state".into(), configs: vec![("cleanup.policy".into(), "compact".into())] };
    send.write_all(&Control::TopicConfigs(vec![settings]).encode()).await.expect("topic configs");
    let reason = refusal(&conn, &mut recv).await.unwrap_or_else(|| closed_now(&conn));
    assert!(reason.contains("unexpected"), "{reason}");
    cloud.stop().await;
}

/// Issue 18: the `TopicOverrides` frame (a topic's own settings) belongs to protocol version 4. A
/// site that settled on version 3 and sends it ends its session; a version 4 site's settings are
/// kept in `{site}.topics.internal` (one partition, compacted, keyed by the length-prefixed topic
/// name), a topic's record written again only when its settings change, and the remote topic is
/// created without them (its retention is the central cluster's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_own_settings_are_kept_by_a_version_4_session_and_refused_on_version_3() {
    use tributary_broker::storage::CleanupPolicy;
    use tributary_sync::overrides::{settings_key, settings_value, topics_topic};
    use tributary_sync::protocol::{Control, PartitionReport, TopicSettings, ALPN, ALPN_V2, ALPN_V3, ALPN_V4};
    let pki = Pki::new();
    let central = KafkaBroker::start().await;
    let cloud = Cloud::start(cloud_config(&pki, &central, "127.0.0.1:0".parse().expect("addr")));
    let cert = pki.site("site", SITE, None);
    let own = |ms: &str| TopicSettings {
        topic: "meters".into(),
        configs: vec![("retention.ms".into(), ms.into()), ("compression.type".into(), "zstd".into())],
    };
    // Version 3 (a receiver of this release and a gateway of the last): the frame ends the session.
    let (_endpoint, conn) = raw_site_with(&pki, cloud.addr, &cert, &[ALPN_V3, ALPN_V2, ALPN]).await;
    assert_eq!(tributary_sync::tls::negotiated_alpn(&conn).as_deref(), Some(ALPN_V3));
    let (mut send, mut recv) = conn.open_bi().await.expect("control stream");
    send.write_all(&Control::Hello { site: SITE.into() }.encode()).await.expect("hello");
    send.write_all(&Control::TopicOverrides(vec![own("3600000")]).encode()).await.expect("overrides");
    let reason = refusal(&conn, &mut recv).await.unwrap_or_else(|| closed_now(&conn));
    assert!(reason.contains("unexpected"), "{reason}");
    assert!(central.store.topic(&topics_topic(SITE)).is_none(), "nothing kept from a version 3 session");
    // Version 4: kept, before the partitions that name the topic start.
    let (_endpoint, conn) = raw_site(&pki, cloud.addr, &cert).await;
    assert_eq!(tributary_sync::tls::negotiated_alpn(&conn).as_deref(), Some(ALPN_V4));
    let (mut send, mut recv) = conn.open_bi().await.expect("control stream");
    let report =
        PartitionReport { topic: "meters".into(), partition: 0, partitions: 1, log_start: 0, high_watermark: 0 };
    send.write_all(&Control::Hello { site: SITE.into() }.encode()).await.expect("hello");
    send.write_all(&Control::TopicOverrides(vec![own("3600000")]).encode()).await.expect("overrides");
    send.write_all(&Control::Partitions(vec![report]).encode()).await.expect("partitions");
    let start = first_control(&mut recv).await;
    assert_eq!(start, Control::Start { topic: "meters".into(), partition: 0, offset: 0 });
    // The same again (not written again), then altered (written).
    send.write_all(&Control::TopicOverrides(vec![own("3600000")]).encode()).await.expect("overrides");
    send.write_all(&Control::TopicOverrides(vec![own("7200000")]).encode()).await.expect("overrides");
    counter("two settings records", || cloud.stats.topic_settings_written.load(Ordering::Relaxed) == 2).await;
    let records = read_all(&central.store, &topics_topic(SITE), 0);
    let got: Vec<(Option<Bytes>, Option<Bytes>)> = records.into_iter().map(|r| (r.key, r.value)).collect();
    let (key, first, second) = (
        Bytes::from(settings_key("meters")),
        Bytes::from(settings_value(&own("3600000").configs)),
        Bytes::from(settings_value(&own("7200000").configs)),
    );
    assert_eq!(got, vec![(Some(key.clone()), Some(first)), (Some(key), Some(second))]);
    let info = central.store.topic(&topics_topic(SITE)).expect("settings topic");
    assert_eq!((info.partitions, info.config.cleanup_policy), (1, CleanupPolicy::Compact));
    let remote = central.store.topic("plant-7.meters").expect("remote topic");
    assert_eq!(remote.config.retention_ms, TopicConfig::default().retention_ms, "not the gateway's retention");
    assert_eq!(remote.config.compression, TopicConfig::default().compression, "nor its compression");
    conn.close(0u32.into(), b"done");
    cloud.stop().await;
}

/// Issue 17: a compacted gateway topic whose remote topic already exists with another policy
/// (the data team's topic) is mirrored into it as it is, not altered, and the receiver counts
/// the mismatch; a compacted topic whose remote topic is new gets it compacted (over
/// `kafka.topic_config`'s `cleanup.policy=delete`), also on a Tributary central cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_remote_topic_with_another_policy_is_left_as_it_is_and_counted() {
    use tributary_broker::storage::CleanupPolicy;
    let pki = Pki::new();
    let central = KafkaBroker::start().await;
    let gateway = KafkaBroker::start().await;
    let mut compacted = TopicConfig::default();
    compacted.set("cleanup.policy", Some("compact")).expect("policy");
    compacted.set("min.compaction.lag.ms", Some("1000")).expect("lag");
    for topic in ["state", "fresh"] {
        gateway.store.create_topic(topic, 1, compacted.clone()).await.expect("topic");
        produce(&gateway.store, topic, 0, 20).await;
    }
    central.store.create_topic("plant-7.state", 1, TopicConfig::default()).await.expect("the data team's topic");
    // cloud.toml asks for delete: the compacted topic's own policy wins.
    let mut ccfg = cloud_config(&pki, &central, "127.0.0.1:0".parse().expect("addr"));
    ccfg.kafka.topic_config.insert("cleanup.policy".into(), "delete".into());
    let cloud = Cloud::start(ccfg);
    let mut cfg = mirror_config(&pki, cloud.addr, pki.site("site", SITE, None));
    cfg.topics = vec!["state".into(), "fresh".into()];
    let mirror = Mirror::start(cfg, &gateway.store);
    mirror.until("mirrored", 60, |_| caught_up(&gateway.store, &["state", "fresh"])).await;
    assert_mirrored(&gateway.store, &central.store, "state");
    assert_mirrored(&gateway.store, &central.store, "fresh");
    assert_eq!(cloud.stats.remote_policy_mismatches.load(Ordering::Relaxed), 1);
    let existing = central.store.topic("plant-7.state").expect("remote");
    assert_eq!(existing.config.cleanup_policy, CleanupPolicy::Delete, "not altered");
    let fresh = central.store.topic("plant-7.fresh").expect("remote");
    assert_eq!(fresh.config.cleanup_policy, CleanupPolicy::Compact);
    assert_eq!(fresh.config.min_compaction_lag_ms, 1000);
    mirror.stop().await;
    cloud.stop().await;
}
