//! Mirror benchmark (issue 6), in one process over loopback: a gateway store with the QUIC
//! mirror (`tributary_sync::gateway::run`), the `tributary-cloud` receiver (`CloudServer`) and a
//! second Tributary standing in as the central Kafka cluster (its Kafka listener, written by the
//! receiver's librdkafka producer). Workload: smart-meter JSON readings keyed by meter id, on a
//! 4-partition lz4 topic, appended 100 records per append by concurrent appenders.
//!
//! Measures (1) the gateway's ingest rate with the mirror off and on, and the mirror's delivered
//! rate into the central cluster; (2) wire bytes per record against the raw payload; (3) the
//! catch-up time of the backlog of a 10-minute outage of the receiver. Prints a Markdown table
//! for BENCHMARKS.md.
//!
//! `cargo build --release -p tributary-tests --bins && $CARGO_TARGET_DIR/release/mirror-bench --dir /var/tmp`

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use tributary_broker::partitioner::partition_for_key;
use tributary_broker::{Codec, Durability, StorageConfig, Store, TopicConfig};
use tributary_sync::cloud::{CloudServer, CloudStats};
use tributary_sync::gateway::MirrorStats;
use tributary_sync::{certs, CloudConfig, MirrorConfig};
use tributary_tests::{cpu_seconds, fsync_rate, sequential_write, status_kib, KafkaListener, SmartMeters, MIB};

const TOPIC: &str = "meters";
const SITE: &str = "bench-site";

#[derive(Debug, Parser)]
struct Args {
    /// Directory on the disk to use (a temporary directory is made inside it).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Smart meters in the fleet.
    #[arg(long, default_value_t = 2_000)]
    meters: usize,
    /// Records appended in the ingest phases (mirror off, mirror on).
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Readings per meter per second at the site (sets the outage backlog and the timestamps).
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Length of the receiver outage whose backlog is mirrored afterwards, in minutes.
    #[arg(long, default_value_t = 10.0)]
    outage_minutes: f64,
    /// Concurrent appender tasks.
    #[arg(long, default_value_t = 8)]
    appenders: usize,
    /// Records per append (one partition each).
    #[arg(long, default_value_t = 100)]
    per_append: usize,
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// The gateway's mirror.reconnect_backoff_max_ms.
    #[arg(long, default_value_t = 1_000)]
    backoff_max_ms: u64,
    /// The receiver's partition_credit_bytes in KiB (default: the receiver's default).
    #[arg(long)]
    credit_kib: Option<u64>,
    /// The gateway's mirror.read_bytes_max in KiB (default: the gateway's default).
    #[arg(long)]
    read_kib: Option<u64>,
    /// The receiver's mirrored_report_interval_ms (default: the receiver's default).
    #[arg(long)]
    report_ms: Option<u64>,
    /// Durability of the central Tributary's topics: `fsync` (the default) or `relaxed` (no
    /// fsync per commit, closer to a Kafka cluster, whose acks=all means replicated, not synced).
    #[arg(long, default_value = "fsync")]
    central_durability: String,
    /// Extra librdkafka property for the receiver's producer, `key=value` (repeatable).
    #[arg(long)]
    kafka_prop: Vec<String>,
}

/// One ingest phase: what was appended and how long until the last append was acknowledged.
#[derive(Debug, Default)]
struct Ingest {
    records: u64,
    key_bytes: u64,
    value_bytes: u64,
    secs: f64,
    cpu: f64,
    /// The store's group commits during the phase, and their total time.
    commits: u64,
    commit_micros: u64,
}

impl Ingest {
    fn rate(&self) -> f64 {
        self.records as f64 / self.secs
    }

    /// `N commits, R records/commit, T ms/commit`.
    fn commits(&self) -> String {
        commits(self.commits, self.commit_micros, self.records)
    }
}

fn commits(n: u64, micros: u64, records: u64) -> String {
    let n1 = n.max(1) as f64;
    format!("{n} commits, {:.0} records/commit, {:.2} ms/commit", records as f64 / n1, micros as f64 / n1 / 1000.0)
}

/// Appends `total` readings from the fleets (one appender task per fleet), `per_append` records
/// of one partition per append, each appender waiting for its append to be durable.
async fn ingest(
    store: &Store,
    fleets: &mut Vec<SmartMeters>,
    total: u64,
    per_append: usize,
    partitions: u32,
) -> anyhow::Result<Ingest> {
    let n = fleets.len() as u64;
    let cpu = cpu_seconds("self");
    let stats = store.stats();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, mut fleet) in fleets.drain(..).enumerate() {
        let quota = total / n + u64::from((i as u64) < total % n);
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut buckets: Vec<Vec<_>> = (0..partitions).map(|_| Vec::with_capacity(per_append)).collect();
            let (mut keys, mut values) = (0u64, 0u64);
            for _ in 0..quota {
                let r = fleet.next_reading();
                let key = r.key.as_deref().unwrap_or_default();
                keys += key.len() as u64;
                values += r.value.as_ref().map_or(0, |v| v.len() as u64);
                let p = partition_for_key(key, partitions) as usize;
                buckets[p].push(r);
                if buckets[p].len() == per_append {
                    let batch = std::mem::replace(&mut buckets[p], Vec::with_capacity(per_append));
                    store.append_records(TOPIC, p as i32, batch).await?;
                }
            }
            for (p, batch) in buckets.into_iter().enumerate() {
                if !batch.is_empty() {
                    store.append_records(TOPIC, p as i32, batch).await?;
                }
            }
            anyhow::Ok((fleet, keys, values))
        }));
    }
    let mut out = Ingest { records: total, ..Ingest::default() };
    for t in tasks {
        let (fleet, keys, values) = t.await??;
        fleets.push(fleet);
        out.key_bytes += keys;
        out.value_bytes += values;
    }
    out.secs = start.elapsed().as_secs_f64();
    out.cpu = cpu_seconds("self") - cpu;
    let now = store.stats();
    out.commits = now.commits - stats.commits;
    out.commit_micros = now.commit_micros_total - stats.commit_micros_total;
    Ok(out)
}

/// The fleet split among `appenders` (meter ids 0..meters), readings from `start_ms`.
fn fleets(meters: usize, appenders: usize, start_ms: i64, interval_ms: i64) -> Vec<SmartMeters> {
    let per = meters.div_ceil(appenders);
    (0..appenders)
        .map(|a| {
            let first = (a * per).min(meters);
            SmartMeters::new(first, per.min(meters - first).max(1), 42 + a as u64, start_ms, interval_ms)
        })
        .collect()
}

async fn open_store(dir: &Path, partitions: u32, topic: bool) -> anyhow::Result<Store> {
    let cfg = StorageConfig { data_dir: dir.to_path_buf(), max_bytes: 16 << 30, ..StorageConfig::default() };
    let (store, _) = tokio::task::spawn_blocking(move || Store::open(cfg)).await?.context("open store")?;
    if topic {
        store
            .create_topic(TOPIC, partitions, TopicConfig { compression: Codec::Lz4, ..TopicConfig::default() })
            .await?;
    }
    Ok(store)
}

/// A running receiver.
struct Cloud {
    addr: SocketAddr,
    stats: Arc<CloudStats>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Cloud {
    fn start(cfg: CloudConfig) -> anyhow::Result<Self> {
        let server = CloudServer::bind(cfg).context("receiver starts")?;
        let addr = server.local_addr()?;
        let stats = server.stats();
        let (stop, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Ok(Self { addr, stats, stop, task })
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await?;
        Ok(())
    }
}

/// Every partition confirmed mirrored up to its high watermark.
fn caught_up(store: &Store, partitions: u32) -> bool {
    (0..partitions as i32).all(|p| {
        let hw = store.watermarks(TOPIC, p).map_or(0, |w| w.high_watermark);
        store.mirrored(TOPIC, p).ok().flatten().unwrap_or(0) >= hw
    })
}

/// Waits on the mirror's change watch (no polling) until `cond` holds; the time it held.
async fn until(
    stats: &MirrorStats,
    what: &str,
    secs: u64,
    cond: impl Fn(&MirrorStats) -> bool,
) -> anyhow::Result<Instant> {
    let mut rx = stats.subscribe();
    if tokio::time::timeout(Duration::from_secs(secs), rx.wait_for(|_| cond(stats))).await.is_err() {
        bail!("{what} not reached in {secs} s; last mirror error: {:?}", stats.last_error.lock().map(|e| e.clone()));
    }
    Ok(Instant::now())
}

/// When a partition's high watermark moved, and to where.
type History = Arc<Mutex<Vec<(Instant, i64)>>>;

/// Records when each partition of the remote topic in the central cluster moved, and to where.
struct CentralWatch {
    history: Vec<History>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl CentralWatch {
    fn start(central: &Store, remote: &str, partitions: u32) -> anyhow::Result<Self> {
        let mut history = Vec::new();
        let mut tasks = Vec::new();
        for p in 0..partitions as i32 {
            let mut watch = central.watch(remote, p)?;
            let h: History = Arc::default();
            let (store, remote, h2) = (central.clone(), remote.to_string(), h.clone());
            tasks.push(tokio::spawn(async move {
                while watch.changed().await {
                    let hw = store.watermarks(&remote, p).map_or(0, |w| w.high_watermark);
                    if let Ok(mut h) = h2.lock() {
                        h.push((Instant::now(), hw));
                    }
                }
            }));
            history.push(h);
        }
        Ok(Self { history, tasks })
    }

    /// When every partition had reached `targets` (the source's high watermarks).
    fn reached(&self, targets: &[i64]) -> Option<Instant> {
        let mut last = None;
        for (h, target) in self.history.iter().zip(targets) {
            let h = h.lock().ok()?;
            let at = h.iter().find(|(_, hw)| hw >= target)?.0;
            last = Some(last.map_or(at, |l: Instant| l.max(at)));
        }
        last
    }
}

impl Drop for CentralWatch {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn high_watermarks(store: &Store, topic: &str, partitions: u32) -> anyhow::Result<Vec<i64>> {
    (0..partitions as i32).map(|p| Ok(store.watermarks(topic, p)?.high_watermark)).collect()
}

/// Counters at one moment, to take differences over a phase.
#[derive(Debug, Clone, Copy)]
struct Snap {
    wire: u64,
    batch: u64,
    cpu: f64,
}

fn snap(stats: &MirrorStats) -> Snap {
    Snap {
        wire: stats.wire_bytes_sent(),
        batch: stats.batch_bytes_sent.load(Ordering::Relaxed),
        cpu: cpu_seconds("self"),
    }
}

/// The threads of this process (ids and names).
fn threads() -> Vec<(String, String)> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return Vec::new() };
    dir.flatten()
        .map(|e| {
            let tid = e.file_name().to_string_lossy().into_owned();
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default().trim().to_string();
            (tid, comm)
        })
        .collect()
}

/// CPU seconds per kind of thread (numbers stripped from names; the two stores' writers told
/// apart by `central_writers`, the ids of threads that existed before the gateway store opened).
fn thread_cpu(central_writers: &BTreeSet<String>) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (tid, comm) in threads() {
        let name = if comm.starts_with("tributary-writ") {
            if central_writers.contains(&tid) { "central store writer" } else { "gateway store writer" }.to_string()
        } else {
            comm.trim_end_matches(|c: char| c.is_ascii_digit() || c == '-' || c == ':').to_string()
        };
        *out.entry(name).or_insert(0.0) += cpu_seconds(&format!("self/task/{tid}"));
    }
    out
}

/// `name N%` per kind of thread, busiest first, as a share of one core over `secs`.
fn cpu_breakdown(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, secs: f64) -> String {
    let mut d: Vec<(String, f64)> = after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect();
    d.sort_by(|a, b| b.1.total_cmp(&a.1));
    d.iter().map(|(k, v)| format!("{k} {:.0}%", pct(*v, secs))).collect::<Vec<_>>().join(", ")
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map_or_else(|_| "?".into(), |l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

fn peak_mib() -> f64 {
    status_kib("self", "VmHWM:") as f64 / 1024.0
}

fn pct(a: f64, b: f64) -> f64 {
    a / b * 100.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let tmp = tempfile::tempdir_in(&args.dir).context("temporary directory")?;
    let load_start = loadavg();
    let parts = args.partitions;
    let interval_ms = (1000.0 / args.rate).round() as i64;
    let backlog = (args.meters as f64 * args.rate * args.outage_minutes * 60.0).round() as u64;
    let start_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;

    let fsyncs = fsync_rate(tmp.path(), Duration::from_secs(3))?;
    let seq_bw = sequential_write(tmp.path(), 512 << 20)?;
    eprintln!("machine: {fsyncs:.0} fsync/s, sequential write {:.0} MiB/s", seq_bw / MIB);

    // The generator alone, single-threaded: what producing the readings costs.
    let gen_start = Instant::now();
    let mut probe = SmartMeters::new(0, args.meters, 1, start_ms, interval_ms);
    let (mut sizes_min, mut sizes_max, mut sizes_sum) = (usize::MAX, 0, 0);
    let gen_n = 200_000;
    for _ in 0..gen_n {
        let len = probe.next_reading().value.map_or(0, |v| v.len());
        (sizes_min, sizes_max, sizes_sum) = (sizes_min.min(len), sizes_max.max(len), sizes_sum + len);
    }
    let gen_rate = f64::from(gen_n) / gen_start.elapsed().as_secs_f64();
    let sample = probe.next_reading();
    eprintln!(
        "sample reading: key {} value {}",
        String::from_utf8_lossy(sample.key.as_deref().unwrap_or_default()),
        String::from_utf8_lossy(sample.value.as_deref().unwrap_or_default())
    );
    eprintln!("generator: {gen_rate:.0} readings/s, {sizes_min}-{sizes_max} B");

    // (A) Ingest with the mirror off: the same load on a store of its own.
    let warmup = args.meters as u64;
    let off = {
        let store = open_store(&tmp.path().join("gateway-off"), parts, true).await?;
        let mut fl = fleets(args.meters, args.appenders, start_ms, interval_ms);
        ingest(&store, &mut fl, warmup, args.per_append, parts).await?;
        let r = ingest(&store, &mut fl, args.records, args.per_append, parts).await?;
        store.close().await?;
        std::fs::remove_dir_all(tmp.path().join("gateway-off"))?;
        r
    };
    let peak_off = peak_mib();
    eprintln!("ingest, mirror off: {:.0} records/s", off.rate());

    // Certificates, the central cluster, the receiver, the gateway and its mirror.
    let pki = tmp.path().join("pki");
    let ca = certs::new_ca("bench CA", 2)?;
    ca.write(&pki, "ca")?;
    certs::server_cert(&ca, &["localhost".to_string()], 2)?.write(&pki, "cloud")?;
    certs::site_cert(&ca, SITE, 2)?.write(&pki, "site")?;
    let central = open_store(&tmp.path().join("central"), parts, false).await?;
    // The central store's writer is among the threads that exist now (a new thread names
    // itself a moment after it starts, so tell the writers apart by id, later).
    let central_writers: BTreeSet<String> = threads().into_iter().map(|(t, _)| t).collect();
    let durability = match args.central_durability.as_str() {
        "fsync" => Durability::Fsync,
        "relaxed" => Durability::Relaxed,
        other => bail!("--central-durability: fsync or relaxed, not {other:?}"),
    };
    let listener = KafkaListener::start(central.clone(), TopicConfig { durability, ..TopicConfig::default() }).await?;
    let mut cloud_cfg = CloudConfig {
        listen: "127.0.0.1:0".parse()?,
        ca_file: pki.join("ca.pem"),
        cert_file: pki.join("cloud.pem"),
        key_file: pki.join("cloud.key"),
        ..CloudConfig::default()
    };
    if let Some(k) = args.credit_kib {
        cloud_cfg.partition_credit_bytes = k * 1024;
    }
    if let Some(ms) = args.report_ms {
        cloud_cfg.mirrored_report_interval_ms = ms;
    }
    cloud_cfg.kafka.bootstrap_servers = listener.addr.to_string();
    cloud_cfg.kafka.properties.insert("broker.address.family".into(), "v4".into());
    for kv in &args.kafka_prop {
        let (k, v) = kv.split_once('=').context("--kafka-prop wants key=value")?;
        cloud_cfg.kafka.properties.insert(k.into(), v.into());
    }
    let cloud = Cloud::start(cloud_cfg.clone())?;
    cloud_cfg.listen = cloud.addr;
    let mut mirror_cfg = MirrorConfig {
        enabled: true,
        cloud: cloud.addr.to_string(),
        server_name: "localhost".into(),
        site: SITE.into(),
        ca_file: pki.join("ca.pem"),
        cert_file: pki.join("site.pem"),
        key_file: pki.join("site.key"),
        topics: vec![TOPIC.into()],
        reconnect_backoff_max_ms: args.backoff_max_ms,
        ..MirrorConfig::default()
    };
    if let Some(k) = args.read_kib {
        mirror_cfg.read_bytes_max = k * 1024;
    }
    mirror_cfg.validate("mirror")?;
    let gateway = open_store(&tmp.path().join("gateway"), parts, true).await?;
    let stats = Arc::new(MirrorStats::default());
    let (mirror_stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mirror =
        tokio::spawn(tributary_sync::gateway::run(mirror_cfg.clone(), gateway.clone(), stats.clone(), async move {
            let _ = stop_rx.await;
        }));

    // Warm-up (one reading per meter): link up, remote topic created, streams open.
    let mut fl = fleets(args.meters, args.appenders, start_ms, interval_ms);
    ingest(&gateway, &mut fl, warmup, args.per_append, parts).await?;
    until(&stats, "warm-up mirrored", 120, |_| caught_up(&gateway, parts)).await?;
    let remote = cloud_cfg.remote_topic(SITE, TOPIC);

    // (B) Ingest with the mirror on, and the mirror's delivered rate.
    let watch = CentralWatch::start(&central, &remote, parts)?;
    let before = snap(&stats);
    let central_before = central.stats();
    let threads_before = thread_cpu(&central_writers);
    let t0 = Instant::now();
    let on = ingest(&gateway, &mut fl, args.records, args.per_append, parts).await?;
    let targets = high_watermarks(&gateway, TOPIC, parts)?;
    let confirmed = until(&stats, "mirror caught up", 600, |_| caught_up(&gateway, parts)).await?;
    let after = snap(&stats);
    let central_on = central.stats();
    let threads_on = thread_cpu(&central_writers);
    let peak_on = peak_mib();
    let in_central = watch.reached(&targets).context("central cluster has every record")?;
    drop(watch);
    let mirror_secs = confirmed.duration_since(t0).as_secs_f64();
    let central_secs = in_central.duration_since(t0).as_secs_f64();
    let mirror_rate = args.records as f64 / mirror_secs;
    let central_rate = args.records as f64 / central_secs;
    eprintln!("ingest, mirror on: {:.0} records/s; mirrored {mirror_rate:.0} records/s", on.rate());

    // (C) Outage: the receiver stops, a backlog builds, the receiver starts on the same port.
    cloud.stop().await?;
    until(&stats, "the link seen down", 120, |s| !s.link_up.load(Ordering::Relaxed)).await?;
    let outage = ingest(&gateway, &mut fl, backlog, args.per_append, parts).await?;
    let lag_bytes: u64 = stats.lag(&gateway).iter().map(|l| l.lag_bytes).sum();
    let lag_records: i64 = stats.lag(&gateway).iter().map(|l| l.lag_records).sum();
    let targets = high_watermarks(&gateway, TOPIC, parts)?;
    let watch = CentralWatch::start(&central, &remote, parts)?;
    let before_c = snap(&stats);
    let t1 = Instant::now();
    let cloud = Cloud::start(cloud_cfg.clone())?;
    let link_up = until(&stats, "the link back up", 600, |s| s.link_up.load(Ordering::Relaxed)).await?;
    let threads_link = thread_cpu(&central_writers);
    let caught = until(&stats, "the backlog mirrored", 1800, |_| caught_up(&gateway, parts)).await?;
    let after_c = snap(&stats);
    let central_c = central.stats();
    let threads_c = thread_cpu(&central_writers);
    let backlog_central = watch.reached(&targets).context("central cluster has the backlog")?;
    drop(watch);
    let link_secs = link_up.duration_since(t1).as_secs_f64();
    let catch_secs = caught.duration_since(t1).as_secs_f64();
    let catch_central_secs = backlog_central.duration_since(t1).as_secs_f64();
    eprintln!("catch-up: link up after {link_secs:.2} s, caught up after {catch_secs:.2} s");

    // Every source record once in the central cluster (counts per partition).
    let source = high_watermarks(&gateway, TOPIC, parts)?;
    let dest = high_watermarks(&central, &remote, parts)?;
    let total: i64 = source.iter().sum();
    let dups = cloud.stats.duplicates_skipped.load(Ordering::Relaxed);
    let reconnects = stats.reconnects.load(Ordering::Relaxed);

    let _ = mirror_stop.send(());
    mirror.await??;
    cloud.stop().await?;
    listener.stop().await?;
    gateway.close().await?;
    central.close().await?;
    let peak = peak_mib();
    let load_end = loadavg();

    let raw = on.value_bytes as f64;
    let raw_keys = (on.value_bytes + on.key_bytes) as f64;
    let wire = (after.wire - before.wire) as f64;
    let batch = (after.batch - before.batch) as f64;
    let recs = args.records as f64;
    let backlog_raw = outage.value_bytes + outage.key_bytes;
    let backlog_wire = after_c.wire - before_c.wire;
    let backlog_batch = after_c.batch - before_c.batch;
    let ratio = mirror_rate / on.rate();

    println!("| measurement | result |");
    println!("|---|---|");
    println!("| machine: fsync rate (4 KiB write + fdatasync) | {fsyncs:.0} /s |");
    println!("| machine: sequential write (512 MiB + fsync) | {:.0} MiB/s |", seq_bw / MIB);
    println!(
        "| workload | {} smart meters, JSON readings {sizes_min}-{sizes_max} B (mean {:.0} B), key = meter id ({:.0} B); topic `{TOPIC}`, {parts} partitions, lz4; {} appenders x {} records per append, each waiting for durability; generator alone {gen_rate:.0} readings/s on one core |",
        args.meters,
        sizes_sum as f64 / f64::from(gen_n),
        on.key_bytes as f64 / recs,
        args.appenders,
        args.per_append
    );
    println!(
        "| (1) ingest, mirror off: {} records | **{:.0} records/s**, {:.1} MB/s of values; process CPU {:.0}% of one core |",
        args.records,
        off.rate(),
        off.value_bytes as f64 / off.secs / 1e6,
        pct(off.cpu, off.secs)
    );
    println!(
        "| (1) ingest, mirror on: the same load | **{:.0} records/s** ({:.0}% of mirror off); last append acked after {:.2} s |",
        on.rate(),
        pct(on.rate(), off.rate()),
        on.secs
    );
    println!(
        "| (1) mirror delivered into the central cluster | **{mirror_rate:.0} records/s** = **{:.0}% of the ingest rate** (confirmed to the gateway after {mirror_secs:.2} s; all in the central cluster after {central_secs:.2} s = {central_rate:.0} records/s); process CPU {:.0}% of one core |",
        pct(mirror_rate, on.rate()),
        pct(after.cpu - before.cpu, mirror_secs)
    );
    println!(
        "| (2) raw payload of those records | values {:.1} MB ({:.0} B/record), keys {:.1} MB |",
        raw / 1e6,
        raw / recs,
        on.key_bytes as f64 / 1e6
    );
    println!(
        "| (2) stored batches sent (lz4, as stored) | {:.1} MB = {:.1} B/record = {:.0}% of values |",
        batch / 1e6,
        batch / recs,
        pct(batch, raw)
    );
    println!(
        "| (2) wire: UDP bytes sent by the gateway (QUIC + TLS) | {:.1} MB = **{:.1} B/record = {:.0}% of values** ({:.0}% of values + keys; QUIC/TLS overhead {:.1}% over the batches) |",
        wire / 1e6,
        wire / recs,
        pct(wire, raw),
        pct(wire, raw_keys),
        pct(wire - batch, batch)
    );
    println!(
        "| (3) outage backlog: {:.0} min x {} meters x {} reading/s | {backlog} records, {:.1} MB raw (values + keys), {:.1} MB stored (lag estimate {:.1} MB, {lag_records} records); appended at {:.0} records/s with the link down |",
        args.outage_minutes,
        args.meters,
        args.rate,
        backlog_raw as f64 / 1e6,
        backlog_batch as f64 / 1e6,
        lag_bytes as f64 / 1e6,
        outage.rate()
    );
    println!(
        "| (3) catch-up after the receiver restarts (same port) | **{catch_secs:.1} s** ({:.0} records/s; {:.0}x real time); link up after {link_secs:.2} s (reconnect_backoff_max_ms = {}), all in the central cluster after {catch_central_secs:.1} s; {:.1} MB on the wire |",
        backlog as f64 / catch_secs,
        args.outage_minutes * 60.0 / catch_secs,
        args.backoff_max_ms,
        backlog_wire as f64 / 1e6
    );
    println!(
        "| exactly once (counts) | central cluster {} records in `{remote}` for {total} in the source, per partition {}; {dups} duplicates skipped by the receiver; {reconnects} reconnects |",
        dest.iter().sum::<i64>(),
        if dest == source { "equal" } else { "DIFFERENT" }
    );
    println!(
        "| breakdown: group commits | gateway, mirror off: {}; mirror on: {}; outage: {}. Central Tributary, phase (1): {}; catch-up: {} |",
        off.commits(),
        on.commits(),
        outage.commits(),
        commits(central_on.commits - central_before.commits, central_on.commit_micros_total - central_before.commit_micros_total, central_on.appended_records - central_before.appended_records),
        commits(central_c.commits - central_on.commits, central_c.commit_micros_total - central_on.commit_micros_total, central_c.appended_records - central_on.appended_records)
    );
    println!(
        "| (3) catch-up drain after the link is up | {:.0} records/s ({:.1} s) |",
        backlog as f64 / (catch_secs - link_secs),
        catch_secs - link_secs,
    );
    println!(
        "| breakdown: CPU by thread, % of one core | phase (1) with the mirror: {}; catch-up drain: {} |",
        cpu_breakdown(&threads_before, &threads_on, mirror_secs),
        cpu_breakdown(&threads_link, &threads_c, catch_secs - link_secs)
    );
    println!(
        "| peak RSS of the process (VmHWM: gateway store + mirror + receiver + librdkafka + central Tributary, all in one process) | **{peak:.1} MiB** (after the mirror-off phase: {peak_off:.1} MiB; after phase (1)-(2) with the mirror: {peak_on:.1} MiB) |"
    );
    println!("| machine load average (1/5/15 min) at start / end | {load_start} / {load_end} |");
    println!(
        "| settings | central Tributary topics: durability {}; receiver: partition_credit_bytes {} KiB, mirrored_report_interval_ms {}, librdkafka linger.ms=5 acks=all idempotent{}; gateway: read_bytes_max {} KiB, reconnect backoff {}-{} ms |",
        args.central_durability,
        cloud_cfg.partition_credit_bytes / 1024,
        cloud_cfg.mirrored_report_interval_ms,
        args.kafka_prop.iter().map(|p| format!(" {p}")).collect::<String>(),
        mirror_cfg.read_bytes_max / 1024,
        mirror_cfg.reconnect_backoff_min_ms,
        mirror_cfg.reconnect_backoff_max_ms
    );
    println!();
    println!(
        "target mirror >= 80% of ingest: {} ({:.0}%: {mirror_rate:.0} vs {:.0} records/s)",
        if ratio >= 0.8 { "met" } else { "NOT met" },
        ratio * 100.0,
        on.rate()
    );
    println!(
        "target wire <= 50% of raw payload: {} ({:.0}% of values, {:.1} of {:.1} B/record)",
        if wire <= 0.5 * raw { "met" } else { "NOT met" },
        pct(wire, raw),
        wire / recs,
        raw / recs
    );
    let drain = backlog as f64 / (catch_secs - link_secs);
    println!(
        "mirror capacity (catch-up drain) vs ingest with the mirror off: {:.0}% ({drain:.0} vs {:.0} records/s)",
        pct(drain, off.rate()),
        off.rate()
    );
    println!(
        "outage catch-up: {backlog} records ({:.1} MB raw) in {catch_secs:.1} s, of which {link_secs:.1} s until the link was up",
        backlog_raw as f64 / 1e6
    );
    if dest != source {
        bail!("the central cluster's counts differ from the source: {dest:?} vs {source:?}");
    }
    Ok(())
}
