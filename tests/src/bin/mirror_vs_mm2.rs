//! `mirror-vs-mm2` (issue 16): Tributary's QUIC mirror beside Apache Kafka's MirrorMaker 2, in
//! one run, moving the same smart-meter backlog (the readings of an outage of the fleet's link)
//! from a gateway store into one real Apache Kafka broker (the central cluster, one node: a
//! benchmark, not a replication test). Per link and per mirror. The links: `loopback`; `wan` and
//! `wan-no-loss`, made by the link emulator (`tributary_tests::linkem`, a child process: the site's
//! sockets live in a network namespace that reaches the centre, the root namespace, only through
//! it, so both mirrors' packets see the same rate, delay and loss); `constrained` and
//! `constrained-no-loss`, made by the older shaping proxies (`tributary_tests::link`: a TCP proxy
//! cannot drop segments, so MM2 saw no loss there).
//! - Tributary: the gateway's mirror (in this process; over the emulated WAN on a runtime whose
//!   threads are in the site's namespace) -> the link -> `tributary-cloud` (a child process) ->
//!   Kafka, remote topic `trib-{link}.meters`.
//! - MirrorMaker 2, dedicated mode (a child JVM), placed at the centre as usually deployed: it
//!   pulls from the site's Kafka listener (in this process, at the site's end of the link) across
//!   the link, and writes to Kafka, remote topic `mm2-{link}.meters` (default replication policy,
//!   source alias `mm2-{link}`).
//!
//! Measures the catch-up time from the mirror's start to the whole backlog in Kafka, the payload
//! bytes through the proxy (the WAN between site and centre) both ways, the records read back
//! with a consumer (duplicates, losses), CPU and peak RSS of the site process and of the central
//! mirror process. Prints a Markdown table.
//!
//! `cargo build --release -p tributary-tests --bins && $CARGO_TARGET_DIR/release/mirror-vs-mm2 --dir /var/tmp`

use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tributary_broker::{Store, TopicConfig};
use tributary_sync::gateway::MirrorStats;
use tributary_sync::{certs, CloudConfig, MirrorConfig};
use tributary_tests::kafka_cluster::{KafkaCluster, KafkaJars, KafkaOptions};
use tributary_tests::link::{tcp_proxy, udp_proxy, Impairment};
use tributary_tests::linkem::{in_netns, Direction, Layout, LinkChild, LinkStats};
use tributary_tests::mm2::{self, Mm2};
use tributary_tests::workload::{fleets, ingest, open_store, TOPIC};
use tributary_tests::{cpu_seconds, fsync_rate, sequential_write, status_kib, CloudChild, KafkaListener, MIB};

#[derive(Debug, Parser)]
#[command(about = "Tributary's QUIC mirror vs MirrorMaker 2 into one Apache Kafka broker")]
struct Args {
    /// Directory on the disk to use (a temporary directory is made inside it).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Smart meters in the fleet.
    #[arg(long, default_value_t = 2_000)]
    meters: usize,
    /// Readings per meter per second.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Length of the outage whose backlog each mirror moves, in minutes.
    #[arg(long, default_value_t = 10.0)]
    outage_minutes: f64,
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Links to run, comma-separated: `loopback`; `wan` (the link emulator: rate, delay and loss
    /// for every packet, both mirrors), `wan-no-loss`; `constrained` (the shaping proxies: rate,
    /// delay, and loss for UDP only), `constrained-no-loss`.
    #[arg(long, default_value = "loopback,wan")]
    links: String,
    /// The emulated WAN's bottleneck queue per direction, ms at its rate (tail drop).
    #[arg(long, default_value_t = 100)]
    queue_ms: u32,
    /// Constrained link: rate per direction, bits/s.
    #[arg(long, default_value_t = 10_000_000)]
    link_bits_per_s: u64,
    /// Constrained link: round trip, ms.
    #[arg(long, default_value_t = 100)]
    rtt_ms: u32,
    /// Constrained link: random loss of UDP datagrams, percent (a TCP proxy cannot drop segments).
    #[arg(long, default_value_t = 1)]
    loss_percent: u32,
    /// Also a run per mirror with a SIGKILL of the central process (our receiver, MM2's JVM)
    /// when half the backlog is in Kafka, and a restart.
    #[arg(long)]
    kill: bool,
    /// Mirrors to run, comma-separated: `tributary`, `mm2` (MirrorMaker 2).
    #[arg(long, default_value = "tributary,mm2")]
    mirrors: String,
    /// Our gateway's `mirror.congestion_controller` (`bbr`, `cubic`, `new_reno`); default: the
    /// config's default.
    #[arg(long)]
    congestion_controller: Option<String>,
    /// Our gateway's `mirror.wire_compression` values, comma-separated: ours runs once per value
    /// (`zstd`: stored batches recompressed for the link; `none`: as stored).
    #[arg(long, default_value = "zstd,none")]
    wire_compression: String,
    /// Also run MirrorMaker 2 with `exactly.once.source.support=enabled`.
    #[arg(long)]
    mm2_exactly_once: bool,
    /// The `tributary-cloud` binary (default: `cloud-under-test` beside this binary).
    #[arg(long)]
    cloud: Option<PathBuf>,
    #[arg(long, default_value_t = 512)]
    kafka_heap_mb: u32,
    #[arg(long, default_value_t = 1024)]
    mm2_heap_mb: u32,
    /// Longest wait for one mirror's catch-up.
    #[arg(long, default_value_t = 1200)]
    timeout_secs: u64,
}

/// One mirror over one link.
#[derive(Debug, Default)]
struct Run {
    link: String,
    mirror: String,
    /// The remote topic in Kafka.
    topic: String,
    /// From the mirror's start to the whole backlog in Kafka.
    secs: f64,
    /// From the first record in Kafka to the whole backlog there.
    drain_secs: f64,
    /// From the link carrying the backlog (64 KiB towards the centre) to the whole backlog in Kafka.
    busy_secs: f64,
    /// Bytes on the wire with IPv4 and UDP or TCP headers: counted by the emulator, estimated
    /// for the proxies (see [`tcp_on_wire`]).
    on_wire: f64,
    /// Bytes each way: the emulator's IP packets (headers included), the proxies' payload.
    to_centre: u64,
    to_site: u64,
    /// Payload bytes both ways, where a proxy counted them.
    payload: Option<u64>,
    /// The emulator's counters of this run: packets lost and dropped each way.
    link_note: Option<String>,
    read: u64,
    distinct: u64,
    site_cpu: f64,
    centre_cpu: f64,
    kafka_cpu: f64,
    centre_rss_mib: f64,
    /// Ours: the QUIC connection's statistics at the end (the last connection's).
    quic: Option<String>,
}

/// The Kafka side: one broker, a consumer for watermarks and read-back.
struct Central {
    kafka: KafkaCluster,
    jars: KafkaJars,
    pid: String,
}

impl Central {
    fn consumer(&self) -> anyhow::Result<BaseConsumer> {
        Ok(ClientConfig::new()
            .set("bootstrap.servers", self.kafka.bootstrap())
            .set("group.id", "mirror-vs-mm2-reader")
            .set("enable.auto.commit", "false")
            // MM2's exactly-once mode writes in transactions: read what was committed.
            .set("isolation.level", "read_committed")
            .set("broker.address.family", "v4")
            .create()?)
    }

    /// Records in `topic` (sum of the high watermarks; 0 while it does not exist).
    fn count(consumer: &BaseConsumer, topic: &str, parts: u32) -> i64 {
        (0..parts as i32)
            .map(|p| consumer.fetch_watermarks(topic, p, Duration::from_secs(5)).map_or(0, |(_, h)| h))
            .sum()
    }

    /// Polls (a benchmark, not a test) until `topic` holds all `n` distinct records; `alive` is told the
    /// count between polls and may end the wait with an error. When the first record arrived, and the last.
    fn wait(
        &self,
        topic: &str,
        parts: u32,
        n: u64,
        timeout: Duration,
        mut alive: impl FnMut(i64) -> anyhow::Result<()>,
    ) -> anyhow::Result<(Instant, Instant)> {
        let consumer = self.consumer()?;
        let deadline = Instant::now() + timeout;
        let mut first = None;
        loop {
            let count = Self::count(&consumer, topic, parts);
            if count > 0 && first.is_none() {
                first = Some(Instant::now());
            }
            // The watermarks count duplicates (and transaction markers) too: done when every
            // reading is there once at least.
            if count >= n as i64 {
                let now = Instant::now();
                if self.read_back(topic, parts)?.1 >= n {
                    return Ok((first.unwrap_or(now), now));
                }
            }
            alive(count)?;
            if Instant::now() > deadline {
                bail!("{topic}: {} of {n} records after {timeout:?}", Self::count(&consumer, topic, parts));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Reads `topic` from the start to its high watermarks: (records, distinct key+value pairs).
    fn read_back(&self, topic: &str, parts: u32) -> anyhow::Result<(u64, u64)> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.kafka.bootstrap())
            .set("group.id", "mirror-vs-mm2-reader")
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            // Transaction markers take offsets but are not delivered: the end of each partition
            // is its EOF event, not a count.
            .set("enable.partition.eof", "true")
            .set("broker.address.family", "v4")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..parts as i32 {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let (mut read, mut seen, mut ended) = (0u64, HashSet::new(), HashSet::new());
        let deadline = Instant::now() + Duration::from_secs(300);
        while ended.len() < parts as usize {
            if Instant::now() > deadline {
                bail!("{topic}: read-back stuck, {} of {parts} partitions read to the end", ended.len());
            }
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    let mut h = DefaultHasher::new();
                    m.key().hash(&mut h);
                    m.payload().hash(&mut h);
                    seen.insert(h.finish());
                    read += 1;
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    ended.insert(p);
                }
                Some(Err(e)) => bail!("read {topic}: {e}"),
                None => {}
            }
        }
        Ok((read, seen.len() as u64))
    }
}

/// Bytes towards the centre after which the link counts as carrying the backlog (handshakes
/// and metadata stay below it).
const BUSY_BYTES: u64 = 64 * 1024;

/// IPv4 (20) + UDP (8) header bytes per datagram.
const UDP_IP_HEADERS: f64 = 28.0;

/// Estimated bytes on the wire for `payload` bytes one way over TCP: IPv4 (20) + TCP with
/// timestamps (32) per 1448-byte segment, plus a pure ACK (52) every second segment the other
/// way (delayed ACKs). An estimate: the proxy sees the byte stream, not the segments.
fn tcp_on_wire(payload: u64) -> f64 {
    let segments = (payload as f64 / 1448.0).ceil();
    payload as f64 + 52.0 * segments + 52.0 * (segments / 2.0).ceil()
}

fn peak_mib(pid: &str) -> f64 {
    status_kib(pid, "VmHWM:") as f64 / MIB * 1024.0
}

/// An emulated WAN: the `linkem` child, and a runtime whose threads are in the site's network
/// namespace (sockets made by its tasks are the site's).
struct Wan {
    link: LinkChild,
    rt: SiteRuntime,
}

/// The site's runtime, shut down in the background when dropped: also on an error path inside
/// the main runtime, where dropping a runtime would panic.
struct SiteRuntime(Option<tokio::runtime::Runtime>);

impl SiteRuntime {
    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("present until dropped").handle()
    }
}

impl Drop for SiteRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl Wan {
    fn start(args: &Args, name: &str) -> anyhow::Result<Self> {
        let (ns, net, loss) = match name {
            "wan" => ("mvm-wan", [10, 77, 0], f64::from(args.loss_percent) / 100.0),
            "wan-no-loss" => ("mvm-wan-nl", [10, 77, 1], 0.0),
            other => bail!("not an emulated link: {other}"),
        };
        let layout = Layout::new(ns, net)?;
        let rtt = Duration::from_millis(u64::from(args.rtt_ms));
        let spec = Direction::wan(args.link_bits_per_s, rtt, loss, Duration::from_millis(u64::from(args.queue_ms)), 16);
        let link = LinkChild::start(&std::env::current_exe()?.with_file_name("linkem"), &layout, spec)?;
        let rt = in_netns(ns, || {
            Ok(tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("site")
                .enable_all()
                .build()?)
        })?;
        Ok(Self { link, rt: SiteRuntime(Some(rt)) })
    }

    fn stop(self) -> anyhow::Result<()> {
        drop(self.rt);
        self.link.stop()
    }
}

/// Where a run's wire bytes are counted.
enum Wire<'a> {
    /// A shaping proxy (payload bytes); `target_is_centre`: the proxy dials the centre (ours),
    /// not the site (MM2's).
    Proxy { imp: Impairment, target_is_centre: bool },
    /// The emulator's IP packets since `base`.
    Emulated { link: &'a mut LinkChild, base: LinkStats },
}

impl Wire<'_> {
    fn emulated(link: &mut LinkChild) -> anyhow::Result<Wire<'_>> {
        let base = link.stats()?;
        Ok(Wire::Emulated { link, base })
    }

    /// Bytes towards the centre so far.
    fn bytes_to_centre(&mut self) -> anyhow::Result<u64> {
        Ok(match self {
            Wire::Proxy { imp, target_is_centre: true } => imp.bytes().0,
            Wire::Proxy { imp, target_is_centre: false } => imp.bytes().1,
            Wire::Emulated { link, base } => link.stats()?.since(base).to_centre.bytes,
        })
    }

    /// Fills the run's wire figures.
    fn fill(&mut self, run: &mut Run, udp: bool) -> anyhow::Result<()> {
        match self {
            Wire::Proxy { imp, target_is_centre } => {
                let (up, down) = imp.bytes();
                (run.to_centre, run.to_site) = if *target_is_centre { (up, down) } else { (down, up) };
                run.payload = Some(up + down);
                run.on_wire = if udp {
                    (up + down) as f64
                        + UDP_IP_HEADERS
                            * (imp.datagrams_up.load(Ordering::Relaxed) + imp.datagrams_down.load(Ordering::Relaxed))
                                as f64
                } else {
                    tcp_on_wire(up) + tcp_on_wire(down)
                };
            }
            Wire::Emulated { link, base } => {
                let d = link.stats()?.since(base);
                (run.to_centre, run.to_site) = (d.to_centre.bytes, d.to_site.bytes);
                run.on_wire = (d.to_centre.bytes + d.to_site.bytes) as f64;
                run.link_note = Some(format!(
                    "to the centre {} packets, {} lost, {} dropped at the full queue; to the site {} packets, {} lost, {} dropped",
                    d.to_centre.packets,
                    d.to_centre.lost,
                    d.to_centre.queue_full,
                    d.to_site.packets,
                    d.to_site.lost,
                    d.to_site.queue_full
                ));
            }
        }
        Ok(())
    }
}

/// The impairment of `link`.
fn impairment(args: &Args, link: &str, udp: bool) -> anyhow::Result<Impairment> {
    Ok(match link {
        "loopback" => Impairment::default(),
        "constrained" => Impairment::shaped(args.link_bits_per_s, args.rtt_ms, if udp { args.loss_percent } else { 0 }),
        "constrained-no-loss" => Impairment::shaped(args.link_bits_per_s, args.rtt_ms, 0),
        other => bail!("--links: loopback, wan, wan-no-loss, constrained or constrained-no-loss, not {other:?}"),
    })
}

/// Tributary's mirror: the gateway mirror here, the receiver in a child, through the UDP proxy
/// or the emulated `wan`.
#[allow(clippy::too_many_arguments)]
async fn run_tributary(
    args: &Args,
    central: &Central,
    store: &Store,
    n: u64,
    link: &str,
    wan: Option<&mut Wan>,
    kill: bool,
    wire_compression: &str,
    work: &Path,
) -> anyhow::Result<Run> {
    let site = format!("trib-{wire_compression}-{link}{}", if kill { "-kill" } else { "" });
    let dir = work.join(&site);
    std::fs::create_dir_all(&dir)?;
    let ca = certs::new_ca("bench CA", 2)?;
    ca.write(&dir, "ca")?;
    certs::server_cert(&ca, &["localhost".to_string()], 2)?.write(&dir, "cloud")?;
    certs::site_cert(&ca, &site, 2)?.write(&dir, "site")?;
    let port = tributary_tests::free_udp_port()?;
    let centre = wan.as_ref().map_or(std::net::Ipv4Addr::LOCALHOST, |w| w.link.layout.centre());
    let mut cfg = CloudConfig {
        listen: (centre, port).into(),
        ca_file: dir.join("ca.pem"),
        cert_file: dir.join("cloud.pem"),
        key_file: dir.join("cloud.key"),
        ..CloudConfig::default()
    };
    cfg.kafka.bootstrap_servers = central.kafka.bootstrap();
    cfg.kafka.properties.insert("broker.address.family".into(), "v4".into());
    let binary = match &args.cloud {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("cloud-under-test"),
    };
    let mut receiver = CloudChild::start(&binary, &cfg, &dir)?;
    let rpid = receiver.pid().context("receiver pid")?.to_string();
    let (mut wire, via, rt) = match wan {
        None => {
            let imp = impairment(args, link, true)?;
            let via = udp_proxy(cfg.listen, imp.clone()).await?;
            (Wire::Proxy { imp, target_is_centre: true }, via, None)
        }
        Some(Wan { link, rt }) => (Wire::emulated(link)?, cfg.listen, Some(rt.handle().clone())),
    };
    let mirror_cfg = MirrorConfig {
        enabled: true,
        cloud: via.to_string(),
        server_name: "localhost".into(),
        site: site.clone(),
        ca_file: dir.join("ca.pem"),
        cert_file: dir.join("site.pem"),
        key_file: dir.join("site.key"),
        topics: vec![TOPIC.into()],
        ..MirrorConfig::default()
    };
    let mut mirror_cfg = mirror_cfg;
    if let Some(cc) = &args.congestion_controller {
        mirror_cfg.congestion_controller =
            toml::Value::String(cc.clone()).try_into().with_context(|| format!("--congestion-controller {cc:?}"))?;
    }
    mirror_cfg.wire_compression = toml::Value::String(wire_compression.into())
        .try_into()
        .with_context(|| format!("--wire-compression {wire_compression:?}"))?;
    let congestion = mirror_cfg.congestion_controller;
    mirror_cfg.validate("mirror")?;
    let stats = Arc::new(MirrorStats::default());
    let (site_cpu0, kafka_cpu0) = (cpu_seconds("self"), cpu_seconds(&central.pid));
    // CPU of the receiver processes so far (a SIGKILLed one's up to its kill), and the base of
    // the running one.
    let (mut centre_cpu, mut rpid, mut base) = (0.0, rpid.clone(), cpu_seconds(&rpid));
    let mut killed = false;
    let mut busy = None;
    let mut quic = None;
    let start = Instant::now();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mirror =
        tributary_sync::gateway::run(mirror_cfg, store.clone(), stats.clone(), Default::default(), async move {
            let _ = stop_rx.await;
        });
    let mirror = match &rt {
        Some(rt) => rt.spawn(mirror),
        None => tokio::spawn(mirror),
    };
    let remote = cfg.remote_topic(&site, TOPIC);
    let timeout = Duration::from_secs(args.timeout_secs);
    let (first, done) = tokio::task::block_in_place(|| {
        central.wait(&remote, args.partitions, n, timeout, |count| {
            if busy.is_none() && wire.bytes_to_centre()? > BUSY_BYTES {
                busy = Some(Instant::now());
            }
            if let Some(s) = stats.connection_stats() {
                quic = Some(s);
            }
            if kill && !killed && count >= n as i64 / 2 {
                centre_cpu += cpu_seconds(&rpid) - base;
                receiver.kill()?;
                receiver.spawn()?;
                rpid = receiver.pid().context("receiver pid")?.to_string();
                base = cpu_seconds(&rpid);
                killed = true;
            }
            if mirror.is_finished() {
                bail!("the mirror stopped; last error: {:?}", stats.last_error.lock().map(|e| e.clone()));
            }
            Ok(())
        })
    })?;
    let mut run = Run {
        link: link.into(),
        mirror: format!(
            "Tributary QUIC mirror, {}{}",
            if wire_compression == "none" { "batches as stored (lz4)" } else { "zstd on the wire" },
            if kill { ", receiver SIGKILLed at half, restarted" } else { "" }
        ),
        topic: remote.clone(),
        secs: done.duration_since(start).as_secs_f64(),
        drain_secs: done.duration_since(first).as_secs_f64(),
        busy_secs: done.duration_since(busy.unwrap_or(start)).as_secs_f64(),
        site_cpu: cpu_seconds("self") - site_cpu0,
        centre_cpu: centre_cpu + cpu_seconds(&rpid) - base,
        kafka_cpu: cpu_seconds(&central.pid) - kafka_cpu0,
        centre_rss_mib: peak_mib(&rpid),
        quic: quic.map(|s| {
            format!(
                "{congestion:?}: cwnd {} B, rtt {} ms, {} congestion events, {} of {} packets lost ({:.2}%), \
                 {} lost bytes, {} black holes, {} connects",
                s.path.cwnd,
                s.path.rtt.as_millis(),
                s.path.congestion_events,
                s.path.lost_packets,
                s.path.sent_packets,
                100.0 * s.path.lost_packets as f64 / s.path.sent_packets.max(1) as f64,
                s.path.lost_bytes,
                s.path.black_holes_detected,
                stats.connects.load(Ordering::Relaxed),
            )
        }),
        ..Run::default()
    };
    wire.fill(&mut run, true)?;
    let _ = stop.send(());
    mirror.await??;
    receiver.kill()?;
    Ok(run)
}

/// Which MirrorMaker 2 run.
#[derive(Debug, Clone, Copy)]
struct Mm2Mode {
    exactly_once: bool,
    /// SIGKILL at half the backlog, then restart.
    kill: bool,
}

/// MirrorMaker 2 in dedicated mode, at the centre, reading the site's Kafka listener through
/// the TCP proxy or the emulated `wan`.
#[allow(clippy::too_many_arguments)]
async fn run_mm2(
    args: &Args,
    central: &Central,
    store: &Store,
    n: u64,
    link: &str,
    wan: Option<&mut Wan>,
    Mm2Mode { exactly_once, kill }: Mm2Mode,
    work: &Path,
) -> anyhow::Result<Run> {
    let alias = format!("mm2{}-{link}{}", if exactly_once { "eos" } else { "" }, if kill { "-kill" } else { "" });
    let dir = work.join(&alias);
    std::fs::create_dir_all(&dir)?;
    let (mut wire, proxy, listener) = match wan {
        None => {
            let imp = impairment(args, link, false)?;
            let front = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let proxy = front.local_addr()?;
            let listener =
                KafkaListener::start_advertising(store.clone(), TopicConfig::default(), proxy.port()).await?;
            tcp_proxy(front, listener.addr, imp.clone());
            (Wire::Proxy { imp, target_is_centre: false }, proxy, listener)
        }
        Some(Wan { link, rt }) => {
            // The site's listener, in the site's namespace, at its end of the link.
            let (site, store) = (link.layout.site(), store.clone());
            let listener = rt
                .handle()
                .spawn(async move {
                    KafkaListener::start_at(store, TopicConfig::default(), &format!("{site}:0"), &site.to_string(), 0)
                        .await
                })
                .await??;
            let addr = listener.addr;
            (Wire::emulated(link)?, addr, listener)
        }
    };
    let mut props =
        mm2::base_properties(&alias, &proxy.to_string(), &central.kafka.bootstrap(), TOPIC, args.partitions, 1);
    props.extend(
        [
            "emit.heartbeats.enabled = false",
            "emit.checkpoints.enabled = false",
            "sync.group.offsets.enabled = false",
            "refresh.groups.enabled = false",
            "sync.topic.acls.enabled = false",
            "sync.topic.configs.enabled = false",
        ]
        .map(String::from),
    );
    if exactly_once {
        let port = tributary_tests::free_ports(1)?[0];
        props.push("exactly.once.source.support = enabled".into());
        props.push("dedicated.mode.enable.internal.rest = true".into());
        props.push(format!("listeners = http://127.0.0.1:{port}"));
    }
    let mut child = Mm2::start(&central.jars, args.mm2_heap_mb, &dir, &props)?;
    let mut pid = child.pid().context("mm2 pid")?.to_string();
    let (mut centre_cpu, mut killed) = (0.0, false);
    let mut busy = None;
    let (site_cpu0, kafka_cpu0) = (cpu_seconds("self"), cpu_seconds(&central.pid));
    let start = Instant::now();
    let remote = format!("{alias}.{TOPIC}");
    let timeout = Duration::from_secs(args.timeout_secs);
    let waited = tokio::task::block_in_place(|| {
        central.wait(&remote, args.partitions, n, timeout, |count| {
            if busy.is_none() && wire.bytes_to_centre()? > BUSY_BYTES {
                busy = Some(Instant::now());
            }
            if kill && !killed && count >= n as i64 / 2 {
                centre_cpu += cpu_seconds(&pid);
                child.kill()?;
                child.spawn()?;
                pid = child.pid().context("mm2 pid")?.to_string();
                killed = true;
            }
            child.check()
        })
    });
    let centre_cpu = centre_cpu + cpu_seconds(&pid);
    let centre_rss_mib = peak_mib(&pid);
    let _ = child.kill();
    listener.stop().await?;
    let (first, done) = match waited {
        Ok(times) => times,
        Err(e) => bail!("{e:#}\n{}", child.log_tail(40)),
    };
    let mut run = Run {
        link: link.into(),
        mirror: format!(
            "MirrorMaker 2, {}{}",
            if exactly_once { "exactly-once" } else { "at-least-once" },
            if kill { ", SIGKILLed at half, restarted" } else { "" }
        ),
        topic: remote.clone(),
        secs: done.duration_since(start).as_secs_f64(),
        drain_secs: done.duration_since(first).as_secs_f64(),
        busy_secs: done.duration_since(busy.unwrap_or(start)).as_secs_f64(),
        site_cpu: cpu_seconds("self") - site_cpu0,
        centre_cpu,
        kafka_cpu: cpu_seconds(&central.pid) - kafka_cpu0,
        centre_rss_mib,
        ..Run::default()
    };
    wire.fill(&mut run, false)?;
    Ok(run)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tributary_tests::log_to_stderr();
    let tmp = tempfile::tempdir_in(&args.dir).context("temporary directory")?;
    let fsyncs = fsync_rate(tmp.path(), Duration::from_secs(3))?;
    let seq = sequential_write(tmp.path(), 512 << 20)? / MIB;
    eprintln!("machine: {fsyncs:.0} fsync/s, sequential write {seq:.0} MiB/s");
    let parts = args.partitions;
    let backlog = (args.meters as f64 * args.rate * args.outage_minutes * 60.0).round() as u64;
    let interval_ms = (1000.0 / args.rate).round() as i64;

    let opts = KafkaOptions {
        heap_mb: args.kafka_heap_mb,
        light_jvm: false,
        parent_dir: Some(tmp.path().to_path_buf()),
        ..KafkaOptions::default()
    };
    let kafka = tokio::task::block_in_place(|| KafkaCluster::start(opts))?;
    let jars = kafka.jars().clone();
    let pid = kafka.pid(1).context("kafka pid")?.to_string();
    let central = Central { kafka, jars, pid };

    let mut runs = Vec::new();
    let mut notes = Vec::new();
    let mut raw = 0u64;
    for link in args.links.split(',') {
        // A fresh site store per link, holding the backlog of the outage.
        let store = open_store(&tmp.path().join(format!("site-{link}")), parts, true).await?;
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
        let start_ms = now_ms - (args.outage_minutes * 60_000.0) as i64;
        let mut fl = fleets(args.meters, 8, start_ms, interval_ms);
        let filled = ingest(&store, &mut fl, backlog, 100, parts).await?;
        raw = filled.key_bytes + filled.value_bytes;
        eprintln!("{link}: backlog of {backlog} records ({:.1} MB raw) in the site store", raw as f64 / 1e6);
        let work = tmp.path().join(link);
        let mut wan = match link {
            "wan" | "wan-no-loss" => Some(Wan::start(&args, link)?),
            _ => None,
        };
        let mirrors: Vec<&str> = args.mirrors.split(',').collect();
        for kill in if args.kill { vec![false, true] } else { vec![false] } {
            for wire in args.wire_compression.split(',').filter(|_| mirrors.contains(&"tributary")) {
                let r = run_tributary(&args, &central, &store, backlog, link, wan.as_mut(), kill, wire, &work).await?;
                eprintln!("{link}: {} {:.1} s; QUIC: {}", r.mirror, r.secs, r.quic.as_deref().unwrap_or("-"));
                runs.push(r);
            }
            if !mirrors.contains(&"mm2") {
                continue;
            }
            let mode = Mm2Mode { exactly_once: false, kill };
            let r = run_mm2(&args, &central, &store, backlog, link, wan.as_mut(), mode, &work).await?;
            eprintln!("{link}: {} {:.1} s", r.mirror, r.secs);
            runs.push(r);
            if args.mm2_exactly_once {
                let mode = Mm2Mode { exactly_once: true, kill };
                match run_mm2(&args, &central, &store, backlog, link, wan.as_mut(), mode, &work).await {
                    Ok(r) => runs.push(r),
                    Err(e) => {
                        eprintln!("{link}: MirrorMaker 2 exactly-once failed: {e:#}");
                        notes.push(format!(
                            "{link}: MirrorMaker 2 exactly-once failed: {}",
                            format!("{e:#}").lines().next().unwrap_or("")
                        ));
                    }
                }
            }
        }
        if let Some(wan) = wan {
            wan.stop()?;
        }
        store.close().await?;
    }
    for r in &mut runs {
        (r.read, r.distinct) = tokio::task::block_in_place(|| central.read_back(&r.topic, parts))?;
    }
    tokio::task::block_in_place(|| central.kafka.stop())?;

    println!("machine: {fsyncs:.0} fsync/s (4 KiB write + fdatasync), sequential write {seq:.0} MiB/s, {} cores; central cluster: one Apache Kafka 4.1.1 broker (KRaft, combined), heap {} MiB", std::thread::available_parallelism().map_or(1, usize::from), args.kafka_heap_mb);
    println!(
        "workload: backlog of a {:.0}-minute outage of {} meters x {} reading/s = {backlog} records, {:.1} MB raw (keys + JSON values), topic `{TOPIC}`, {parts} partitions, lz4 at the site",
        args.outage_minutes,
        args.meters,
        args.rate,
        raw as f64 / 1e6
    );
    println!();
    println!("wire MB: IP packets counted by the emulator on `wan` links (headers included), payload counted by the proxies on `loopback` and `constrained` links; on wire B/record: counted on `wan`, estimated from the payload elsewhere");
    println!();
    println!("| link | mirror | catch-up s (from start) | records/s (from start) | sustained records/s (link busy to last record in Kafka) | wire MB site->centre | wire MB centre->site | wire payload B/record | on wire incl. IP/UDP/TCP headers B/record | records/s first to last record in Kafka | read back | duplicates | lost | site CPU s | centre mirror CPU s | Kafka broker CPU s | centre mirror peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &runs {
        println!(
            "| {} | {} | {:.1} | {:.0} | **{:.0}** | {:.1} | {:.2} | {} | {:.1} | {:.0} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.0} |",
            r.link,
            r.mirror,
            r.secs,
            backlog as f64 / r.secs,
            backlog as f64 / r.busy_secs,
            r.to_centre as f64 / 1e6,
            r.to_site as f64 / 1e6,
            r.payload.map_or("-".to_string(), |p| format!("{:.1}", p as f64 / backlog as f64)),
            r.on_wire / backlog as f64,
            backlog as f64 / r.drain_secs,
            r.read,
            r.read - r.distinct,
            backlog.saturating_sub(r.distinct),
            r.site_cpu,
            r.centre_cpu,
            r.kafka_cpu,
            r.centre_rss_mib
        );
    }
    println!();
    for r in runs.iter().filter(|r| r.quic.is_some()) {
        println!("QUIC at the end, {} / {}: {}", r.link, r.mirror, r.quic.as_deref().unwrap_or(""));
    }
    for r in runs.iter().filter(|r| r.link_note.is_some()) {
        println!("emulated link, {} / {}: {}", r.link, r.mirror, r.link_note.as_deref().unwrap_or(""));
    }
    for n in &notes {
        println!("{n}");
    }
    Ok(())
}
