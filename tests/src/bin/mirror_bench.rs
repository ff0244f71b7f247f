//! Mirror benchmark (issue 6; verdict and process split: issue 21): a gateway store with the
//! QUIC mirror (`tributary_sync::gateway::run`) in this process, and in a child process (this
//! binary with `--cloud-side`) the `tributary-cloud` receiver (`CloudServer`) with a second
//! Tributary standing in as the central Kafka cluster (its Kafka listener, written by the
//! receiver's librdkafka producer). Both run over loopback on the same machine, so each
//! process's CPU time is reported apart: the gateway side's share of the work against the
//! receiver's and the central cluster's. Workload: smart-meter JSON readings keyed by meter id,
//! on a 4-partition lz4 topic, appended 100 records per append by concurrent appenders.
//!
//! Measures (1) the gateway's ingest rate with the mirror off and on; (2) wire bytes per record
//! against the raw payload; (3) the catch-up of the backlog of a 10-minute receiver outage. The
//! mirror's capacity is its drain rate in (3), from the link coming up to everything confirmed
//! mirrored, and the target compares it with the mirror-off ingest rate of (1) in the same run.
//! (In phase (1) the mirror only has to keep pace with an ingest it slows down itself, so the
//! ratio of the two rates over the same records says little.) Prints a Markdown table for
//! BENCHMARKS.md.
//!
//! `cargo build --release -p tributary-tests --bins && $CARGO_TARGET_DIR/release/mirror-bench --dir /var/tmp`

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::{json, Value};
use tributary_broker::{Durability, Store, TopicConfig};
use tributary_sync::cloud::{CloudError, CloudServer, CloudStats};
use tributary_sync::gateway::MirrorStats;
use tributary_sync::{certs, CloudConfig, MirrorConfig};
use tributary_tests::workload::{caught_up, commits, fleets, ingest, open_store, TOPIC};
use tributary_tests::{cpu_seconds, fsync_rate, sequential_write, status_kib, KafkaListener, SmartMeters, MIB};

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
    /// The receiver's kafka.queue_messages_max (default: the receiver's default).
    #[arg(long)]
    queue_messages: Option<u32>,
    /// Extra librdkafka property for the receiver's producer, `key=value` (repeatable).
    #[arg(long)]
    kafka_prop: Vec<String>,
    /// Internal: run the cloud side (receiver and central Tributary) in this directory, driven
    /// by commands on stdin.
    #[arg(long, hide = true)]
    cloud_side: bool,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
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

/// A running receiver (in the cloud-side process).
struct Cloud {
    addr: SocketAddr,
    stats: Arc<CloudStats>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Cloud {
    /// Binds `cfg.listen`; a stopped receiver's endpoint lets go of its UDP port a moment after
    /// it stopped, so an address in use is tried again for up to 10 s.
    async fn start(cfg: CloudConfig) -> anyhow::Result<Self> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let server = loop {
            match CloudServer::bind(cfg.clone()) {
                Ok(s) => break s,
                Err(CloudError::Endpoint(e))
                    if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => return Err(e).context("receiver starts"),
            }
        };
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

/// When a partition's high watermark moved (ms since the epoch: compared across processes),
/// and to where.
type History = Arc<Mutex<Vec<(u64, i64)>>>;

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
                        h.push((now_ms(), hw));
                    }
                }
            }));
            history.push(h);
        }
        Ok(Self { history, tasks })
    }

    /// When every partition had reached `targets` (the source's high watermarks).
    fn reached(&self, targets: &[i64]) -> Option<u64> {
        let mut last = None;
        for (h, target) in self.history.iter().zip(targets) {
            let h = h.lock().ok()?;
            let at = h.iter().find(|(_, hw)| hw >= target)?.0;
            last = Some(last.map_or(at, |l: u64| l.max(at)));
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

/// The cloud-side process: the central Tributary and the receiver, in `args.dir` (made by the
/// parent, with the certificates in `pki/`). Announces the receiver's address, then answers one
/// JSON line per command read from stdin: `stop`, `start` (the receiver, same port), `watch`
/// (start recording the central partitions' progress), `reached T0,T1,..` (when every
/// partition had reached its target), `snap` (counters), `quit`.
async fn cloud_side(args: Args) -> anyhow::Result<()> {
    let parts = args.partitions;
    let central = open_store(&args.dir.join("central"), parts, false).await?;
    let durability = match args.central_durability.as_str() {
        "fsync" => Durability::Fsync,
        "relaxed" => Durability::Relaxed,
        other => bail!("--central-durability: fsync or relaxed, not {other:?}"),
    };
    let listener = KafkaListener::start(central.clone(), TopicConfig { durability, ..TopicConfig::default() }).await?;
    let pki = args.dir.join("pki");
    let mut cfg = CloudConfig {
        listen: "127.0.0.1:0".parse()?,
        ca_file: pki.join("ca.pem"),
        cert_file: pki.join("cloud.pem"),
        key_file: pki.join("cloud.key"),
        ..CloudConfig::default()
    };
    if let Some(k) = args.credit_kib {
        cfg.partition_credit_bytes = k * 1024;
    }
    if let Some(ms) = args.report_ms {
        cfg.mirrored_report_interval_ms = ms;
    }
    if let Some(n) = args.queue_messages {
        cfg.kafka.queue_messages_max = n;
    }
    cfg.kafka.bootstrap_servers = listener.addr.to_string();
    cfg.kafka.properties.insert("broker.address.family".into(), "v4".into());
    for kv in &args.kafka_prop {
        let (k, v) = kv.split_once('=').context("--kafka-prop wants key=value")?;
        cfg.kafka.properties.insert(k.into(), v.into());
    }
    let mut cloud = Some(Cloud::start(cfg.clone()).await?);
    let stats = cloud.as_ref().map(|c| c.stats.clone()).context("receiver")?;
    let mut restarted: Vec<Arc<CloudStats>> = Vec::new();
    cfg.listen = cloud.as_ref().map(|c| c.addr).context("receiver")?;
    let remote = cfg.remote_topic(SITE, TOPIC);
    let settings = json!({
        "partition_credit_kib": cfg.partition_credit_bytes / 1024,
        "report_ms": cfg.mirrored_report_interval_ms,
        "site_buffer_mib": cfg.site_buffer_bytes_max >> 20,
        "queue_messages": cfg.kafka.queue_messages_max,
    });
    println!("{}", json!({ "cloud": cfg.listen.to_string(), "settings": settings }));
    std::io::stdout().flush()?;

    // Commands come from a thread reading stdin (the runtime has no async stdin here).
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(4);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    let mut watch: Option<CentralWatch> = None;
    while let Some(line) = rx.recv().await {
        let (cmd, arg) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        let reply = match cmd {
            "stop" => {
                if let Some(c) = cloud.take() {
                    c.stop().await?;
                }
                json!({})
            }
            "start" => {
                let c = Cloud::start(cfg.clone()).await?;
                restarted.push(c.stats.clone());
                cloud = Some(c);
                json!({})
            }
            "watch" => {
                watch = Some(CentralWatch::start(&central, &remote, parts)?);
                json!({})
            }
            "reached" => {
                let targets: Vec<i64> = arg.split(',').filter_map(|t| t.parse().ok()).collect();
                json!({ "at_ms": watch.as_ref().and_then(|w| w.reached(&targets)) })
            }
            "snap" => {
                let s = central.stats();
                let all = std::iter::once(&stats).chain(&restarted);
                let dups: u64 = all.clone().map(|s| s.duplicates_skipped.load(Ordering::Relaxed)).sum();
                let written: u64 = all.map(|s| s.records_written.load(Ordering::Relaxed)).sum();
                json!({
                    "hw": high_watermarks(&central, &remote, parts).unwrap_or_default(),
                    "dups": dups,
                    "written": written,
                    "commits": s.commits,
                    "commit_micros": s.commit_micros_total,
                    "appended": s.appended_records,
                })
            }
            "quit" => break,
            other => json!({ "error": format!("unknown command {other:?}") }),
        };
        println!("{reply}");
        std::io::stdout().flush()?;
    }
    drop(watch);
    if let Some(c) = cloud.take() {
        c.stop().await?;
    }
    listener.stop().await?;
    central.close().await?;
    println!("{}", json!({ "bye": true }));
    std::io::stdout().flush()?;
    Ok(())
}

/// The cloud-side child process, seen from the gateway side.
struct CloudSide {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    addr: SocketAddr,
    settings: Value,
}

impl CloudSide {
    fn spawn(args: &Args, dir: &Path) -> anyhow::Result<Self> {
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        cmd.arg("--cloud-side")
            .arg("--dir")
            .arg(dir)
            .arg("--partitions")
            .arg(args.partitions.to_string())
            .arg("--central-durability")
            .arg(&args.central_durability);
        if let Some(k) = args.credit_kib {
            cmd.arg("--credit-kib").arg(k.to_string());
        }
        if let Some(ms) = args.report_ms {
            cmd.arg("--report-ms").arg(ms.to_string());
        }
        if let Some(n) = args.queue_messages {
            cmd.arg("--queue-messages").arg(n.to_string());
        }
        for p in &args.kafka_prop {
            cmd.arg("--kafka-prop").arg(p);
        }
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("start the cloud side")?;
        let stdin = child.stdin.take().context("child stdin")?;
        let stdout = std::io::BufReader::new(child.stdout.take().context("child stdout")?);
        let mut side = Self { child, stdin, stdout, addr: "127.0.0.1:0".parse()?, settings: Value::Null };
        let hello = side.read()?;
        side.addr = hello["cloud"].as_str().context("the receiver's address")?.parse()?;
        side.settings = hello["settings"].clone();
        Ok(side)
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn read(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the cloud side exited");
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Sends a command and waits for its answer (a moment: the runtime lends this worker).
    fn ask(&mut self, command: &str) -> anyhow::Result<Value> {
        tokio::task::block_in_place(|| {
            writeln!(self.stdin, "{command}")?;
            self.stdin.flush()?;
            self.read()
        })
    }

    fn quit(mut self) -> anyhow::Result<()> {
        let _ = self.ask("quit")?;
        let status = self.child.wait()?;
        if !status.success() {
            bail!("the cloud side exited with {status}");
        }
        Ok(())
    }
}

/// Counters of the gateway-side mirror at one moment.
#[derive(Debug, Clone, Copy)]
struct Snap {
    wire: u64,
    batch: u64,
}

fn snap(stats: &MirrorStats) -> Snap {
    Snap { wire: stats.wire_bytes_sent(), batch: stats.batch_bytes_sent.load(Ordering::Relaxed) }
}

/// CPU seconds per kind of thread of a process (numbers stripped from thread names).
fn thread_cpu(pid: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for e in dir.flatten() {
        let tid = e.file_name().to_string_lossy().into_owned();
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        let name = comm.trim().trim_end_matches(|c: char| c.is_ascii_digit() || c == '-' || c == ':').to_string();
        *out.entry(name).or_insert(0.0) += cpu_seconds(&format!("{pid}/task/{tid}"));
    }
    out
}

/// CPU of both processes at one moment: (gateway side, cloud side), each in total and per thread.
#[derive(Debug, Clone)]
struct Cpu {
    at: Instant,
    gateway: f64,
    cloud: f64,
    gateway_threads: BTreeMap<String, f64>,
    cloud_threads: BTreeMap<String, f64>,
}

fn cpu(cloud_pid: &str) -> Cpu {
    Cpu {
        at: Instant::now(),
        gateway: cpu_seconds("self"),
        cloud: cpu_seconds(cloud_pid),
        gateway_threads: thread_cpu("self"),
        cloud_threads: thread_cpu(cloud_pid),
    }
}

/// `name N%` per kind of thread, busiest first, as a share of one core over `secs`.
fn breakdown(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, secs: f64) -> String {
    let mut d: Vec<(String, f64)> = after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v >= 0.005 * secs)
        .collect();
    d.sort_by(|a, b| b.1.total_cmp(&a.1));
    d.iter().map(|(k, v)| format!("{k} {:.0}%", pct(*v, secs))).collect::<Vec<_>>().join(", ")
}

/// The CPU of an interval, per process: `% of one core` and `CPU s per million records`.
fn cpu_line(a: &Cpu, b: &Cpu, records: u64) -> String {
    let secs = b.at.duration_since(a.at).as_secs_f64();
    let (g, c) = (b.gateway - a.gateway, b.cloud - a.cloud);
    let per_m = |x: f64| x / records as f64 * 1e6;
    format!(
        "gateway process {:.0}% of one core ({:.2} CPU s per million records: {}); cloud process (receiver, librdkafka, central Tributary) {:.0}% ({:.2} CPU s per million: {})",
        pct(g, secs),
        per_m(g),
        breakdown(&a.gateway_threads, &b.gateway_threads, secs),
        pct(c, secs),
        per_m(c),
        breakdown(&a.cloud_threads, &b.cloud_threads, secs),
    )
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map_or_else(|_| "?".into(), |l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

fn peak_mib(pid: &str) -> f64 {
    status_kib(pid, "VmHWM:") as f64 / 1024.0
}

fn pct(a: f64, b: f64) -> f64 {
    a / b * 100.0
}

fn i64s(v: &Value) -> Vec<i64> {
    v.as_array().map(|a| a.iter().filter_map(Value::as_i64).collect()).unwrap_or_default()
}

fn u64_of(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

fn join(v: &[i64]) -> String {
    v.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tributary_tests::log_to_stderr();
    if args.cloud_side {
        return cloud_side(args).await;
    }
    let tmp = tempfile::tempdir_in(&args.dir).context("temporary directory")?;
    let load_start = loadavg();
    let parts = args.partitions;
    let interval_ms = (1000.0 / args.rate).round() as i64;
    let backlog = (args.meters as f64 * args.rate * args.outage_minutes * 60.0).round() as u64;
    let start_ms = now_ms() as i64;

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
    let peak_off = peak_mib("self");
    eprintln!("ingest, mirror off: {:.0} records/s", off.rate());

    // Certificates; the cloud side (central cluster and receiver) in its own process; the
    // gateway and its mirror here.
    let pki = tmp.path().join("pki");
    let ca = certs::new_ca("bench CA", 2)?;
    ca.write(&pki, "ca")?;
    certs::server_cert(&ca, &["localhost".to_string()], 2)?.write(&pki, "cloud")?;
    certs::site_cert(&ca, SITE, 2)?.write(&pki, "site")?;
    let mut cloud = CloudSide::spawn(&args, tmp.path())?;
    let cloud_pid = cloud.pid();
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
    let mirror = tokio::spawn(tributary_sync::gateway::run(
        mirror_cfg.clone(),
        gateway.clone(),
        stats.clone(),
        Default::default(),
        async move {
            let _ = stop_rx.await;
        },
    ));

    // Warm-up (one reading per meter): link up, remote topic created, streams open.
    let mut fl = fleets(args.meters, args.appenders, start_ms, interval_ms);
    ingest(&gateway, &mut fl, warmup, args.per_append, parts).await?;
    until(&stats, "warm-up mirrored", 120, |_| caught_up(&gateway, parts)).await?;

    // (B) Ingest with the mirror on; how soon after it the mirror had everything.
    cloud.ask("watch")?;
    let before = snap(&stats);
    let central_before = cloud.ask("snap")?;
    let cpu_b0 = cpu(&cloud_pid);
    let t0_ms = now_ms();
    let on = ingest(&gateway, &mut fl, args.records, args.per_append, parts).await?;
    let targets = high_watermarks(&gateway, TOPIC, parts)?;
    let confirmed = until(&stats, "mirror caught up", 600, |_| caught_up(&gateway, parts)).await?;
    let cpu_b1 = cpu(&cloud_pid);
    let after = snap(&stats);
    let central_on = cloud.ask("snap")?;
    let peak_on = peak_mib("self");
    let in_central = cloud.ask(&format!("reached {}", join(&targets)))?["at_ms"].as_u64();
    let in_central = in_central.context("the central cluster has every record")?;
    let mirror_secs = confirmed.duration_since(cpu_b0.at).as_secs_f64();
    let central_after_ack = (in_central as f64 - t0_ms as f64) / 1000.0 - on.secs;
    eprintln!("ingest, mirror on: {:.0} records/s; mirror confirmed after {mirror_secs:.2} s", on.rate());

    // (C) Outage: the receiver stops, a backlog builds, the receiver starts on the same port.
    cloud.ask("stop")?;
    until(&stats, "the link seen down", 120, |s| !s.link_up.load(Ordering::Relaxed)).await?;
    let outage = ingest(&gateway, &mut fl, backlog, args.per_append, parts).await?;
    let lag_bytes: u64 = stats.lag(&gateway).iter().map(|l| l.lag_bytes).sum();
    let lag_records: i64 = stats.lag(&gateway).iter().map(|l| l.lag_records).sum();
    let targets = high_watermarks(&gateway, TOPIC, parts)?;
    cloud.ask("watch")?;
    let before_c = snap(&stats);
    let t1 = Instant::now();
    let t1_ms = now_ms();
    cloud.ask("start")?;
    until(&stats, "the link back up", 600, |s| s.link_up.load(Ordering::Relaxed)).await?;
    let cpu_c0 = cpu(&cloud_pid);
    until(&stats, "the backlog mirrored", 1800, |_| caught_up(&gateway, parts)).await?;
    let cpu_c1 = cpu(&cloud_pid);
    let after_c = snap(&stats);
    let central_c = cloud.ask("snap")?;
    let backlog_central = cloud.ask(&format!("reached {}", join(&targets)))?["at_ms"].as_u64();
    let backlog_central = backlog_central.context("the central cluster has the backlog")?;
    let link_secs = cpu_c0.at.duration_since(t1).as_secs_f64();
    let catch_secs = cpu_c1.at.duration_since(t1).as_secs_f64();
    let drain_secs = catch_secs - link_secs;
    let catch_central_secs = (backlog_central as f64 - t1_ms as f64) / 1000.0;
    eprintln!("catch-up: link up after {link_secs:.2} s, caught up after {catch_secs:.2} s");

    // Counts per partition: the central cluster against the source.
    let source = high_watermarks(&gateway, TOPIC, parts)?;
    let dest = i64s(&central_c["hw"]);
    let total: i64 = source.iter().sum();
    let dups = u64_of(&central_c, "dups");
    let reconnects = stats.reconnects.load(Ordering::Relaxed);
    let peak_gateway = peak_mib("self");
    let peak_cloud = peak_mib(&cloud_pid);

    let _ = mirror_stop.send(());
    mirror.await??;
    let settings = cloud.settings.clone();
    cloud.quit()?;
    gateway.close().await?;
    let load_end = loadavg();

    let raw = on.value_bytes as f64;
    let raw_keys = (on.value_bytes + on.key_bytes) as f64;
    let wire = (after.wire - before.wire) as f64;
    let batch = (after.batch - before.batch) as f64;
    let recs = args.records as f64;
    let backlog_raw = outage.value_bytes + outage.key_bytes;
    let backlog_wire = after_c.wire - before_c.wire;
    let backlog_batch = after_c.batch - before_c.batch;
    let drain = backlog as f64 / drain_secs;
    let capacity = drain / off.rate();
    let central_commits = |a: &Value, b: &Value| {
        commits(
            u64_of(b, "commits") - u64_of(a, "commits"),
            u64_of(b, "commit_micros") - u64_of(a, "commit_micros"),
            u64_of(b, "appended") - u64_of(a, "appended"),
        )
    };

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
        "| (1) the mirror keeping pace (not its capacity: it only follows this ingest) | all in the central cluster {central_after_ack:.2} s after the last append was acknowledged; confirmed to the gateway after {mirror_secs:.2} s |"
    );
    println!("| (1) CPU, ingest with the mirror on | {} |", cpu_line(&cpu_b0, &cpu_b1, args.records));
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
        "| (3) catch-up after the receiver restarts (same port) | **{catch_secs:.1} s** ({:.0}x real time); link up after {link_secs:.2} s (reconnect_backoff_max_ms = {}), all in the central cluster after {catch_central_secs:.1} s; {:.1} MB on the wire |",
        args.outage_minutes * 60.0 / catch_secs,
        args.backoff_max_ms,
        backlog_wire as f64 / 1e6
    );
    println!(
        "| (3) **mirror capacity**: catch-up drain from link up to all confirmed | **{drain:.0} records/s** ({drain_secs:.2} s) = **{:.0}% of the mirror-off ingest rate** |",
        capacity * 100.0
    );
    println!("| (3) CPU in the drain | {} |", cpu_line(&cpu_c0, &cpu_c1, backlog));
    println!(
        "| counts equal (per partition; the per-record comparison is the e2e tests') | central cluster {} records in `{SITE}.{TOPIC}` for {total} in the source, per partition {}; {dups} duplicates skipped by the receiver; {reconnects} reconnects |",
        dest.iter().sum::<i64>(),
        if dest == source { "equal" } else { "DIFFERENT" }
    );
    println!(
        "| breakdown: group commits | gateway, mirror off: {}; mirror on: {}; outage: {}. Central Tributary, phase (1): {}; catch-up: {} |",
        off.commits(),
        on.commits(),
        outage.commits(),
        central_commits(&central_before, &central_on),
        central_commits(&central_on, &central_c),
    );
    println!(
        "| peak RSS (VmHWM) | gateway process (gateway store, mirror, appenders) **{peak_gateway:.1} MiB** (after the mirror-off phase: {peak_off:.1} MiB; after phase (1)-(2): {peak_on:.1} MiB); cloud process (receiver, librdkafka, central Tributary) {peak_cloud:.1} MiB |"
    );
    println!("| machine load average (1/5/15 min) at start / end | {load_start} / {load_end} |");
    println!(
        "| settings | central Tributary topics: durability {}; receiver: partition_credit_bytes {} KiB, mirrored_report_interval_ms {}, site_buffer_bytes_max {} MiB, kafka.queue_messages_max {}, librdkafka linger.ms=5 acks=all idempotent{}; gateway: read_bytes_max {} KiB, reconnect backoff {}-{} ms |",
        args.central_durability,
        settings["partition_credit_kib"],
        settings["report_ms"],
        settings["site_buffer_mib"],
        settings["queue_messages"],
        args.kafka_prop.iter().map(|p| format!(" {p}")).collect::<String>(),
        mirror_cfg.read_bytes_max / 1024,
        mirror_cfg.reconnect_backoff_min_ms,
        mirror_cfg.reconnect_backoff_max_ms
    );
    println!();
    println!(
        "target mirror capacity >= 80% of mirror-off ingest: {} ({:.0}%: drain {drain:.0} vs ingest {:.0} records/s)",
        if capacity >= 0.8 { "met" } else { "NOT met" },
        capacity * 100.0,
        off.rate()
    );
    println!(
        "target wire <= 50% of raw payload: {} ({:.0}% of values, {:.1} of {:.1} B/record)",
        if wire <= 0.5 * raw { "met" } else { "NOT met" },
        pct(wire, raw),
        wire / recs,
        raw / recs
    );
    println!(
        "outage catch-up: {backlog} records ({:.1} MB raw) in {catch_secs:.1} s, of which {link_secs:.1} s until the link was up",
        backlog_raw as f64 / 1e6
    );
    println!(
        "counts equal: {} ({} in the central cluster, {total} in the source)",
        if dest == source { "yes" } else { "NO" },
        dest.iter().sum::<i64>()
    );
    if dest != source {
        bail!("the central cluster's counts differ from the source: {dest:?} vs {source:?}");
    }
    Ok(())
}
