//! `dr-bench` (issue 18): the disaster-recovery figures in one run, against a three-broker
//! Apache Kafka (three replicas, `min.insync.replicas=2`, `acks=all`):
//! 1. **Translation lag and granularity, beside MirrorMaker 2.** The gateway (the release
//!    `tributary` binary, a child) takes the smart-meter workload at a steady rate from a
//!    librdkafka producer while a librdkafka consumer group on it commits every 200 ms. Three
//!    mirrors copy it into the central cluster at once: ours (the gateway's QUIC mirror into
//!    `tributary-cloud`, checkpoints in `{site}.checkpoints.internal`) and two MirrorMaker 2
//!    processes in dedicated mode reading the gateway's Kafka listener, with checkpoints and
//!    offset syncs on: one with MM2's defaults (`emit.checkpoints.interval.seconds` = 60,
//!    `offset.lag.max` = 100), one tuned low (flags). For every edge commit after the warm-up: the
//!    time from the commit returning to the first checkpoint at or past it being readable in the
//!    central cluster (p50/p99/max), and for every checkpoint the translation's granularity: how
//!    many records its downstream offset is behind the exact one (each remote copy starts at the
//!    gateway's offset 0 and is checked to be one-to-one, so the exact downstream offset is the
//!    upstream one).
//! 2. **Restore.** More of the workload goes into the gateway until the topic holds
//!    `--restore-bytes` of keys and values, our mirror copies it, the gateway is killed, and
//!    `tributary restore` rebuilds it into an empty data directory: records/s, MB/s, time, and the
//!    restored partitions' watermarks checked against the lost gateway's.
//!
//! `cargo build --release -p tributary-tests --bins && $CARGO_TARGET_DIR/release/dr-bench --dir /var/tmp`

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tributary_sync::checkpoint::{checkpoints_topic, decode_checkpoint_key, decode_checkpoint_value};
use tributary_sync::{certs, CloudConfig};
use tributary_tests::kafka_cluster::{KafkaCluster, KafkaOptions};
use tributary_tests::mm2::{self, Mm2};
use tributary_tests::workload::{fleets, TOPIC};
use tributary_tests::{BenchGateway, CloudChild, SmartMeters};

const SITE: &str = "plant-7";
const GROUP: &str = "billing";

#[derive(Debug, Parser)]
#[command(about = "Translation lag and granularity beside MirrorMaker 2, and the restore rate, on three Kafka brokers")]
struct Args {
    /// Directory on the disk to use (a temporary directory is made inside it).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Smart meters in the fleet.
    #[arg(long, default_value_t = 10_000)]
    meters: usize,
    /// Readings per second into the gateway while the lag is measured.
    #[arg(long, default_value_t = 2_000)]
    rate: u64,
    /// Seconds of load before the measured window (every mirror started and settled).
    #[arg(long, default_value_t = 40)]
    warmup_secs: u64,
    /// Seconds of the measured window.
    #[arg(long, default_value_t = 180)]
    seconds: u64,
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// How often the consumer group on the gateway commits.
    #[arg(long, default_value_t = 200)]
    commit_interval_ms: u64,
    /// MirrorMaker 2 tuned: `emit.checkpoints.interval.seconds`.
    #[arg(long, default_value_t = 1)]
    mm2_interval_secs: u32,
    /// MirrorMaker 2 tuned: `offset.lag.max`.
    #[arg(long, default_value_t = 1)]
    mm2_offset_lag_max: u32,
    /// Keys and values in the gateway's topic before the restore.
    #[arg(long, default_value_t = 1 << 30)]
    restore_bytes: u64,
    /// The gateway binary (default: `tributary-under-test` beside this binary).
    #[arg(long)]
    gateway: Option<PathBuf>,
    /// The `tributary-cloud` binary (default: `cloud-under-test` beside this binary).
    #[arg(long)]
    cloud: Option<PathBuf>,
    #[arg(long, default_value_t = 768)]
    kafka_heap_mb: u32,
    #[arg(long, default_value_t = 768)]
    mm2_heap_mb: u32,
    /// Longest wait for the mirror to copy the restore's data, and for the restore.
    #[arg(long, default_value_t = 1200)]
    timeout_secs: u64,
}

/// A checkpoint as read from the central cluster: (partition, upstream, downstream, when read).
type Seen = Vec<(i32, i64, i64, Instant)>;

/// Reads `topic` (partition 0) from its start once it exists until `stop`, recording each
/// checkpoint of `GROUP`.
fn watch(bootstrap: String, topic: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<anyhow::Result<Seen>> {
    std::thread::spawn(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "dr-bench-checkpoint-reader")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            // A topic just created may not answer the query for its start yet: from the start
            // anyway, never from its end.
            .set("auto.offset.reset", "earliest")
            .set("broker.address.family", "v4")
            .create()?;
        // The topic appears with the mirror's first checkpoint: assign once it is there.
        loop {
            if stop.load(Ordering::SeqCst) {
                return Ok(Vec::new());
            }
            let md = c.fetch_metadata(Some(&topic), Duration::from_secs(5))?;
            if md.topics().iter().any(|t| t.error().is_none() && !t.partitions().is_empty()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning)?;
        c.assign(&tpl)?;
        let mut seen = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            match c.poll(Duration::from_millis(20)) {
                Some(Ok(m)) => {
                    let at = Instant::now();
                    let key = m.key().and_then(decode_checkpoint_key);
                    let value = m.payload().and_then(decode_checkpoint_value);
                    if let (Some((group, _, partition)), Some((up, down))) = (key, value) {
                        if group == GROUP {
                            seen.push((partition, up, down, at));
                        }
                    }
                }
                Some(Err(e)) => eprintln!("{topic}: {e}"),
                None => {}
            }
        }
        Ok(seen)
    })
}

/// One mirror's translation figures.
#[derive(Debug, Default)]
struct Translation {
    /// Edge commit -> first checkpoint at or past it readable, ms, sorted; and commits never covered.
    lags_ms: Vec<u64>,
    uncovered: usize,
    /// Records each checkpoint's downstream offset is behind the exact one, sorted.
    behind: Vec<i64>,
    checkpoints: usize,
}

fn pct<T: Copy + Default>(sorted: &[T], q: f64) -> T {
    let Some(last) = sorted.len().checked_sub(1) else { return T::default() };
    sorted[((last as f64) * q).round() as usize]
}

/// Commits in the window `[from, to]` against the checkpoints seen.
fn translation(commits: &[(i32, i64, Instant)], seen: &Seen, from: Instant, to: Instant) -> Translation {
    let mut t = Translation::default();
    for (partition, offset, at) in commits.iter().filter(|(_, _, at)| *at >= from && *at <= to) {
        let covered = seen
            .iter()
            .filter(|(p, up, _, seen_at)| p == partition && up >= offset && seen_at >= at)
            .map(|s| s.3)
            .min();
        match covered {
            Some(c) => t.lags_ms.push(c.duration_since(*at).as_millis() as u64),
            None => t.uncovered += 1,
        }
    }
    t.lags_ms.sort_unstable();
    for (_, up, down, _) in seen.iter().filter(|s| s.3 >= from) {
        t.behind.push(up - down);
        t.checkpoints += 1;
    }
    t.behind.sort_unstable();
    t
}

fn client(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap).set("broker.address.family", "v4");
    c
}

fn create_topic(bootstrap: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = client(bootstrap).create()?;
    let t = NewTopic::new(topic, partitions, TopicReplication::Fixed(1)).set("compression.type", "lz4");
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    for r in rt.block_on(admin.create_topics([&t], &opts))? {
        r.map_err(|(t, e)| anyhow::anyhow!("create {t}: {e}"))?;
    }
    Ok(())
}

/// High watermarks of `topic`'s partitions (low, high).
fn watermarks(c: &BaseConsumer, topic: &str, parts: u32) -> anyhow::Result<Vec<(i64, i64)>> {
    (0..parts as i32).map(|p| Ok(c.fetch_watermarks(topic, p, Duration::from_secs(10))?)).collect()
}

/// Produces readings from `fleet` into the gateway: `rate` per second until `until` returns true
/// (or as fast as it goes with `rate` None); returns (records, key + value bytes).
fn produce(
    producer: &BaseProducer,
    fleet: &mut [SmartMeters],
    rate: Option<u64>,
    mut until: impl FnMut(u64, u64) -> bool,
) -> anyhow::Result<(u64, u64)> {
    let start = Instant::now();
    let (mut sent, mut bytes) = (0u64, 0u64);
    let mut next = 0usize;
    loop {
        if until(sent, bytes) {
            break;
        }
        let due = rate.map_or(sent + 1000, |r| start.elapsed().as_millis() as u64 * r / 1000);
        while sent < due {
            let r = fleet[next % fleet.len()].next_reading();
            next += 1;
            let key = r.key.unwrap_or_default();
            let value = r.value.unwrap_or_default();
            bytes += (key.len() + value.len()) as u64;
            let mut record = BaseRecord::<[u8], [u8]>::to(TOPIC).key(&key[..]).payload(&value[..]);
            if let Some(ts) = r.timestamp_ms {
                record = record.timestamp(ts);
            }
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        record = back;
                        producer.poll(Duration::from_millis(5));
                    }
                }
            }
            sent += 1;
        }
        producer.poll(Duration::from_millis(if rate.is_some() { 10 } else { 0 }));
    }
    producer.flush(Duration::from_secs(120))?;
    Ok((sent, bytes))
}

/// The consumer group on the gateway: reads `TOPIC`, commits its positions every `interval`
/// until `stop`; each commit (partition, offset, when it returned) that moved a partition.
fn committer(
    edge: String,
    interval: Duration,
    stop: Arc<AtomicBool>,
    commits: Arc<Mutex<Vec<(i32, i64, Instant)>>>,
) -> std::thread::JoinHandle<anyhow::Result<()>> {
    std::thread::spawn(move || {
        let c: BaseConsumer = client(&edge)
            .set("group.id", GROUP)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()?;
        c.subscribe(&[TOPIC])?;
        let mut last = BTreeMap::new();
        let mut at = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            if let Some(m) = c.poll(Duration::from_millis(10)) {
                m?;
            }
            if at.elapsed() < interval {
                continue;
            }
            at = Instant::now();
            let mut tpl = TopicPartitionList::new();
            let mut moved = Vec::new();
            for e in c.position()?.elements() {
                if let Offset::Offset(o) = e.offset() {
                    if last.get(&e.partition()).is_none_or(|l| *l < o) {
                        tpl.add_partition_offset(TOPIC, e.partition(), Offset::Offset(o))?;
                        moved.push((e.partition(), o));
                    }
                }
            }
            if moved.is_empty() {
                continue;
            }
            c.commit(&tpl, CommitMode::Sync)?;
            let done = Instant::now();
            let mut list = commits.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            for (p, o) in moved {
                last.insert(p, o);
                list.push((p, o, done));
            }
        }
        Ok(())
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tributary_tests::log_to_stderr();
    let tmp = tempfile::tempdir_in(&args.dir).context("temporary directory")?;
    let work = tmp.path();
    let parts = args.partitions;
    let exe = std::env::current_exe()?;
    let gateway_bin = args.gateway.clone().unwrap_or_else(|| exe.with_file_name("tributary-under-test"));
    let cloud_bin = args.cloud.clone().unwrap_or_else(|| exe.with_file_name("cloud-under-test"));

    let opts = KafkaOptions {
        nodes: 3,
        heap_mb: args.kafka_heap_mb,
        light_jvm: false,
        parent_dir: Some(work.to_path_buf()),
        ..KafkaOptions::default()
    };
    let kafka = KafkaCluster::start(opts)?;
    let central = kafka.bootstrap();
    eprintln!("three-broker Apache Kafka serving in {:.1} s", kafka.started_in.as_secs_f64());

    // The receiver: three replicas, min.insync.replicas 2, its default intervals.
    let pki = work.join("pki");
    std::fs::create_dir_all(&pki)?;
    let ca = certs::new_ca("bench CA", 2)?;
    ca.write(&pki, "ca")?;
    certs::server_cert(&ca, &["localhost".to_string()], 2)?.write(&pki, "cloud")?;
    certs::site_cert(&ca, SITE, 2)?.write(&pki, "site")?;
    let mut cfg = CloudConfig {
        listen: ([127, 0, 0, 1], tributary_tests::free_udp_port()?).into(),
        ca_file: pki.join("ca.pem"),
        cert_file: pki.join("cloud.pem"),
        key_file: pki.join("cloud.key"),
        ..CloudConfig::default()
    };
    cfg.kafka.bootstrap_servers = central.clone();
    cfg.kafka.replication_factor = 3;
    cfg.kafka.topic_config.insert("min.insync.replicas".into(), "2".into());
    cfg.kafka.properties.insert("broker.address.family".into(), "v4".into());
    let receiver_dir = work.join("receiver");
    std::fs::create_dir_all(&receiver_dir)?;
    let _receiver = CloudChild::start(&cloud_bin, &cfg, &receiver_dir)?;
    let mirror = format!(
        "[mirror]\nenabled = true\ncloud = \"{}\"\nserver_name = \"localhost\"\nsite = \"{SITE}\"\n\
         ca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\ntopics = [\"{TOPIC}\"]\n",
        cfg.listen,
        pki.join("ca.pem"),
        pki.join("site.pem"),
        pki.join("site.key"),
    );
    let site_dir = work.join("site");
    std::fs::create_dir_all(&site_dir)?;
    let gateway = BenchGateway::start(Some(gateway_bin.as_path()), &site_dir, "", &mirror)?;
    let edge = gateway.kafka.clone();
    create_topic(&edge, TOPIC, parts as i32)?;

    // The load, and the group committing on the gateway.
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
    let interval_ms = (args.meters as f64 * 1000.0 / args.rate as f64).round().max(1.0) as i64;
    let mut fleet = fleets(args.meters, 1, now_ms - 3_600_000, interval_ms);
    let producer: BaseProducer = client(&edge)
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let stop_commits = Arc::new(AtomicBool::new(false));
    let commits: Arc<Mutex<Vec<(i32, i64, Instant)>>> = Default::default();
    let group =
        committer(edge.clone(), Duration::from_millis(args.commit_interval_ms), stop_commits.clone(), commits.clone());
    // A first second of load, so the group exists with commits when MM2 lists the gateway's groups.
    let (mut records, mut bytes) = produce(&producer, &mut fleet, Some(args.rate), |s, _| s >= args.rate)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while commits.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.len() < parts as usize {
        if Instant::now() > deadline || group.is_finished() {
            bail!("the consumer group on the gateway did not commit");
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // MirrorMaker 2 twice: its defaults, and tuned low.
    let jars = kafka.jars().clone();
    let mut mm2s = Vec::new();
    for (alias, tuned) in [("mm2-default", false), ("mm2-tuned", true)] {
        let mut props = mm2::base_properties(alias, &edge, &central, TOPIC, parts, 3);
        props.extend(
            [
                "emit.heartbeats.enabled = false",
                "emit.checkpoints.enabled = true",
                "emit.offset-syncs.enabled = true",
                "sync.group.offsets.enabled = false",
                "sync.topic.acls.enabled = false",
                "sync.topic.configs.enabled = false",
                &format!("groups = {GROUP}"),
                "refresh.groups.interval.seconds = 5",
            ]
            .map(String::from),
        );
        if tuned {
            props.push(format!("emit.checkpoints.interval.seconds = {}", args.mm2_interval_secs));
            props.push(format!("offset.lag.max = {}", args.mm2_offset_lag_max));
        }
        mm2s.push((alias, Mm2::start(&jars, args.mm2_heap_mb, &work.join(alias), &props)?));
    }
    let stop_watch = Arc::new(AtomicBool::new(false));
    let ours = watch(central.clone(), checkpoints_topic(SITE), stop_watch.clone());
    let theirs: Vec<_> = mm2s
        .iter()
        .map(|(alias, _)| watch(central.clone(), format!("{alias}.checkpoints.internal"), stop_watch.clone()))
        .collect();

    // Warm-up, then the measured window.
    let load_start = Instant::now();
    let window_start = load_start + Duration::from_secs(args.warmup_secs);
    let window_end = window_start + Duration::from_secs(args.seconds);
    eprintln!("load: {} records/s; warm-up {} s, measured {} s", args.rate, args.warmup_secs, args.seconds);
    let mut checked = Instant::now();
    let mut failed = None;
    let (n, b) = produce(&producer, &mut fleet, Some(args.rate), |_, _| {
        if checked.elapsed() > Duration::from_secs(1) {
            checked = Instant::now();
            for (alias, m) in &mut mm2s {
                if let Err(e) = m.check() {
                    failed = Some(format!("{alias}: {e:#}\n{}", m.log_tail(40)));
                }
            }
        }
        failed.is_some() || Instant::now() >= window_end
    })?;
    if let Some(f) = failed {
        bail!("{f}");
    }
    records += n;
    bytes += b;
    // Checkpoints of the window's last commits: up to one default MM2 interval and a bit.
    let settle = Instant::now() + Duration::from_secs(75);
    while Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(500));
    }
    stop_commits.store(true, Ordering::SeqCst);
    group.join().map_err(|_| anyhow::anyhow!("committer panicked"))??;
    stop_watch.store(true, Ordering::SeqCst);
    let ours = ours.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
    let theirs: Vec<Seen> = theirs
        .into_iter()
        .map(|t| t.join().map_err(|_| anyhow::anyhow!("reader panicked"))?)
        .collect::<anyhow::Result<_>>()?;
    let commits = commits.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    let to = window_end;

    // Each remote copy must be the gateway's partition one-to-one for "exact = upstream".
    let reader: BaseConsumer = client(&central).create()?;
    let edge_reader: BaseConsumer = client(&edge).create()?;
    let source = watermarks(&edge_reader, TOPIC, parts)?;
    let mut rows = Vec::new();
    let mut one_to_one = Vec::new();
    for (name, remote, seen) in
        std::iter::once(("Tributary (QUIC mirror, exact translation)".to_string(), format!("{SITE}.{TOPIC}"), &ours))
            .chain(mm2s.iter().zip(&theirs).map(|((alias, _), seen)| {
                let what = if *alias == "mm2-default" {
                    "MirrorMaker 2, defaults (emit.checkpoints.interval.seconds 60, offset.lag.max 100)".to_string()
                } else {
                    format!(
                        "MirrorMaker 2, tuned (emit.checkpoints.interval.seconds {}, offset.lag.max {})",
                        args.mm2_interval_secs, args.mm2_offset_lag_max
                    )
                };
                (what, format!("{alias}.{TOPIC}"), seen)
            }))
    {
        let wm = watermarks(&reader, &remote, parts)?;
        // The remote copy holds the source from offset 0, each record once, up to what it has.
        let exact = wm.iter().zip(&source).all(|((l, h), (sl, sh))| *l == 0 && *sl == 0 && h <= sh);
        one_to_one.push(format!("{remote}: {wm:?} (gateway {source:?})"));
        if !exact {
            eprintln!("{remote}: not a one-to-one copy ({wm:?}, gateway {source:?}): granularity not exact");
        }
        rows.push((name, translation(&commits, seen, window_start, to), exact));
    }
    for (_, mut m) in mm2s {
        m.kill()?;
    }
    let in_window = commits.iter().filter(|c| c.2 >= window_start && c.2 <= to).count();

    // The restore: the topic grows to --restore-bytes, our mirror copies it, the gateway is lost.
    let fill_start = Instant::now();
    let (n, b) = produce(&producer, &mut fleet, None, |_, b| bytes + b >= args.restore_bytes)?;
    records += n;
    bytes += b;
    let fill = fill_start.elapsed().as_secs_f64();
    let source = watermarks(&edge_reader, TOPIC, parts)?;
    let remote = format!("{SITE}.{TOPIC}");
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    loop {
        let wm = watermarks(&reader, &remote, parts)?;
        if wm.iter().zip(&source).all(|((_, h), (_, sh))| h == sh) {
            break;
        }
        if Instant::now() > deadline {
            bail!("{remote}: {wm:?} of {source:?} after {} s", args.timeout_secs);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let mirrored = fill_start.elapsed().as_secs_f64();
    drop(gateway);
    let restored_dir = work.join("restored");
    std::fs::create_dir_all(&restored_dir)?;
    let config = restored_dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\ndata_dir = {:?}\nmax_bytes = {}\n[kafka]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
             websocket_listen = \"127.0.0.1:0\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n{mirror}",
            restored_dir.join("data"),
            16u64 << 30
        ),
    )?;
    let started = Instant::now();
    let out = std::process::Command::new(&gateway_bin)
        .args(["restore", "--config"])
        .arg(&config)
        .args(["--progress-interval-ms", "10000"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("run tributary restore")?;
    let took = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("restore failed: {}\n{stdout}", out.status);
    }
    let db = restored_dir.join("data").join("tributary.redb");
    let db_bytes = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);
    let storage = tributary_broker::StorageConfig { data_dir: restored_dir.join("data"), ..Default::default() };
    let store = tributary_broker::Store::open(storage).context("open the restored store")?.0;
    let mut restored = 0i64;
    for (p, (sl, sh)) in source.iter().enumerate() {
        let wm = store.watermarks(TOPIC, p as i32)?;
        if (wm.log_start_offset, wm.high_watermark) != (*sl, *sh) {
            bail!(
                "partition {p} restored as {}..{}, the gateway had {sl}..{sh}",
                wm.log_start_offset,
                wm.high_watermark
            );
        }
        restored += sh - sl;
    }
    store.close_blocking()?;
    drop(kafka);

    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    println!("machine: {cores} cores; central cluster: three Apache Kafka 4.1.1 brokers (KRaft, combined), heap {} MiB each; remote topics and checkpoints with three replicas, min.insync.replicas 2, acks=all", args.kafka_heap_mb);
    println!(
        "load: smart-meter readings ({} meters, JSON values of 150-250 bytes keyed by meter id), {} records/s into `{TOPIC}` ({parts} partitions, lz4) on the gateway, consumer group `{GROUP}` (librdkafka) committing every {} ms; warm-up {} s, measured {} s ({in_window} commits that moved a partition)",
        args.meters, args.rate, args.commit_interval_ms, args.warmup_secs, args.seconds
    );
    println!();
    println!("| mirror | translation lag p50 ms | p99 ms | max ms | commits never checkpointed | checkpoints | records behind exact, p50 | p99 | max |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, t, exact) in &rows {
        println!(
            "| {name} | {} | {} | {} | {} | {} | {}{} | {} | {} |",
            pct(&t.lags_ms, 0.5),
            pct(&t.lags_ms, 0.99),
            pct(&t.lags_ms, 1.0),
            t.uncovered,
            t.checkpoints,
            pct(&t.behind, 0.5),
            if *exact { "" } else { " (copy not one-to-one)" },
            pct(&t.behind, 0.99),
            pct(&t.behind, 1.0),
        );
    }
    println!();
    for l in &one_to_one {
        println!("remote watermarks at the end of the window: {l}");
    }
    println!();
    println!(
        "restore: {records} records, {:.1} MB of keys and values in the gateway (filled in {fill:.1} s, in the central cluster {mirrored:.1} s after the fill began)",
        bytes as f64 / 1e6
    );
    println!("| records restored | restored in s | records/s | MB/s (keys and values) | store file MB |");
    println!("|---|---|---|---|---|");
    println!(
        "| {restored} | {took:.1} | {:.0} | {:.1} | {:.1} |",
        restored as f64 / took,
        bytes as f64 / 1e6 / took,
        db_bytes as f64 / 1e6
    );
    println!();
    println!("tributary restore said: {}", stdout.trim());
    Ok(())
}
