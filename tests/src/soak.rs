//! The chaos soak: the real gateway binary as a child process, serving well-behaved MQTT QoS 1/2
//! publishers, an MQTT subscriber, idempotent Kafka producers and a Kafka consumer group, while
//! misbehaving clients (a subscriber that never acknowledges, one that never reads, half-sent
//! frames, garbage, connection floods, oversized SASL tokens) run beside them and the gateway is
//! SIGKILLed and given disk faults (`RLIMIT_FSIZE` = 0: every write fails) on a seeded schedule.
//! Afterwards every acknowledged record must be in the log exactly once and in order, every
//! subscriber and consumer must have received every acknowledged record, and the gateway's RSS
//! must have stayed under a ceiling. Used by the `soak` e2e test (short form) and the `soak`
//! binary (long form, figures in BENCHMARKS.md).

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::status_kib;

/// What a soak run does.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// The gateway binary (`tributary` or `tributary-under-test`).
    pub binary: PathBuf,
    /// A fresh directory for the config, the data and the report.
    pub dir: PathBuf,
    /// Length of the chaos phase.
    pub duration: Duration,
    /// Seeds the schedule of kills and disk faults and the misbehaving clients' bytes.
    pub seed: u64,
    /// SIGKILLs of the gateway during the chaos phase.
    pub kills: u32,
    /// Disk-fault episodes (every write fails for 1-3 s) during the chaos phase.
    pub disk_faults: u32,
    /// The gateway's resident memory must stay under this (KiB), sampled every 100 ms.
    pub rss_ceiling_kib: u64,
    /// Well-behaved clients and their rates.
    pub kafka_producers: usize,
    pub kafka_records_per_s: u32,
    pub mqtt_publishers: usize,
    pub mqtt_messages_per_s: u32,
}

impl SoakConfig {
    /// The short form `.ci/run` runs.
    pub fn short(binary: PathBuf, dir: PathBuf, seed: u64) -> Self {
        Self {
            binary,
            dir,
            duration: Duration::from_secs(45),
            seed,
            kills: 2,
            disk_faults: 2,
            rss_ceiling_kib: RSS_CEILING_KIB,
            kafka_producers: 2,
            kafka_records_per_s: 300,
            mqtt_publishers: 4,
            mqtt_messages_per_s: 40,
        }
    }
}

/// The RSS ceiling stated for the default configuration (plus the soak's ports, users and one
/// route): 96 MiB, well under the unit's `MemoryMax=256M`.
pub const RSS_CEILING_KIB: u64 = 96 * 1024;

const USER: &str = "app";
const PASSWORD: &str = "soak-password";
const KAFKA_TOPIC: &str = "soak-kafka";
const MQTT_LOG_TOPIC: &str = "soak-mqtt";
const GROUP: &str = "soak-group";
/// How long a client waits for one answer before it takes the connection for dead.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Operations that started within a fault window or this long after it are not "healthy".
const FAULT_GRACE: Duration = Duration::from_secs(2);

/// What a soak run saw.
#[derive(Debug, Default, Clone)]
pub struct SoakReport {
    pub seed: u64,
    pub chaos_s: f64,
    pub kills: u32,
    pub disk_faults: u32,
    pub kafka_acked: u64,
    pub mqtt_qos1_acked: u64,
    pub mqtt_qos2_acked: u64,
    pub subscriber_received: u64,
    pub consumer_received: u64,
    pub peak_rss_kib: u64,
    /// (name, healthy samples, p50 ms, p99 ms, max ms) of each latency series outside faults.
    pub latencies: Vec<(String, usize, f64, f64, f64)>,
    /// What the misbehaving clients managed: connections opened, refused or closed on them.
    pub misbehaviour: Vec<(String, u64)>,
}

impl std::fmt::Display for SoakReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "soak seed {} ({:.0} s of chaos: {} SIGKILLs, {} disk faults); peak RSS {:.1} MiB",
            self.seed,
            self.chaos_s,
            self.kills,
            self.disk_faults,
            self.peak_rss_kib as f64 / 1024.0
        )?;
        writeln!(
            f,
            "acknowledged and found exactly once, in order: {} Kafka records, {} MQTT QoS 2 messages; {} MQTT QoS 1 messages at least once",
            self.kafka_acked, self.mqtt_qos2_acked, self.mqtt_qos1_acked
        )?;
        writeln!(
            f,
            "delivered: {} messages to the MQTT subscriber, {} records to the consumer group",
            self.subscriber_received, self.consumer_received
        )?;
        writeln!(f, "latency outside faults (ms):        samples     p50     p99     max")?;
        for (name, n, p50, p99, max) in &self.latencies {
            writeln!(f, "  {name:<32} {n:>8} {p50:>7.1} {p99:>7.1} {max:>7.1}")?;
        }
        write!(f, "misbehaving clients:")?;
        for (name, n) in &self.misbehaviour {
            write!(f, " {name}={n}")?;
        }
        Ok(())
    }
}

/// The gateway child process.
struct Gateway {
    binary: PathBuf,
    config: PathBuf,
    child: Option<Child>,
    /// The running child's pid (0 while none runs), read by the RSS sampler.
    pid: Arc<AtomicI32>,
}

impl Gateway {
    /// Starts the child and waits for its ready line.
    fn start(&mut self) -> anyhow::Result<()> {
        let mut child = Command::new(&self.binary)
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "warn,tributary_gateway=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {}", self.binary.display()))?;
        let mut lines = std::io::BufReader::new(child.stderr.take().context("stderr")?).lines();
        let mut seen = Vec::new();
        loop {
            let Some(line) = lines.next() else {
                let _ = child.wait();
                bail!("gateway exited before it was ready:\n{}", seen.join("\n"))
            };
            let line = line?;
            if line.contains("tributary gateway ready") {
                break;
            }
            seen.push(line);
        }
        // Keep draining its log so it never blocks on a full pipe; show warnings and errors.
        std::thread::spawn(move || lines.map_while(Result::ok).for_each(|l| eprintln!("gateway: {l}")));
        self.pid.store(child.id() as i32, Ordering::Relaxed);
        self.child = Some(child);
        Ok(())
    }

    fn rustix_pid(&self) -> anyhow::Result<rustix::process::Pid> {
        let pid = self.child.as_ref().context("no gateway running")?.id() as i32;
        rustix::process::Pid::from_raw(pid).context("pid")
    }

    /// SIGKILL and reap.
    fn kill(&mut self) -> anyhow::Result<()> {
        let pid = self.rustix_pid()?;
        rustix::process::kill_process(pid, rustix::process::Signal::KILL)?;
        if let Some(mut c) = self.child.take() {
            c.wait()?;
        }
        self.pid.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// SIGTERM; the gateway must exit cleanly.
    fn stop(&mut self) -> anyhow::Result<()> {
        let pid = self.rustix_pid()?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
        let status = self.child.take().context("no gateway running")?.wait()?;
        self.pid.store(0, Ordering::Relaxed);
        ensure!(status.success(), "gateway did not exit cleanly on SIGTERM: {status}");
        Ok(())
    }

    /// Every write of the gateway fails (`EFBIG`) while `on`: its file-size limit is 0.
    fn disk_fault(&self, on: bool) -> anyhow::Result<()> {
        use rustix::process::{prlimit, Resource, Rlimit};
        let limit =
            if on { Rlimit { current: Some(0), maximum: None } } else { Rlimit { current: None, maximum: None } };
        prlimit(Some(self.rustix_pid()?), Resource::Fsize, limit).context("prlimit RLIMIT_FSIZE")?;
        Ok(())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A Kafka record's sequence number and where it was acknowledged (partition, offset).
type Acked = (u64, i32, i64);

/// State the client tasks share with the driver.
#[derive(Default)]
struct Shared {
    /// Misbehaving clients and the chaos stop.
    stop: AtomicBool,
    /// Well-behaved producers stop generating new records (and finish what they sent).
    finish: AtomicBool,
    /// Everything stops (the run is over or failed).
    halt: AtomicBool,
    /// Fault windows: [start, end) of each kill-to-ready and disk fault.
    faults: Mutex<Vec<(Instant, Instant)>>,
    /// Latency samples by series: (start, duration).
    latency: Mutex<BTreeMap<&'static str, Vec<(Instant, Duration)>>>,
    /// Counters of the misbehaving clients.
    misbehaviour: Mutex<BTreeMap<&'static str, u64>>,
    /// Kafka records acknowledged: key -> (seq, partition, offset).
    kafka_acked: Mutex<HashMap<String, Vec<Acked>>>,
    /// MQTT messages acknowledged: publisher index -> (qos, seqs).
    mqtt_acked: Mutex<BTreeMap<usize, (u8, Vec<u64>)>>,
    /// Received by the MQTT subscriber and the consumer group: (topic or key) -> seqs.
    subscriber: Mutex<HashMap<String, Vec<u64>>>,
    consumer: Mutex<HashMap<String, Vec<u64>>>,
    peak_rss_kib: AtomicU64,
    /// The subscriber's SUBACK arrived (publishers start only then, so it misses nothing).
    subscribed: AtomicBool,
}

impl Shared {
    fn sample(&self, series: &'static str, start: Instant) {
        let d = start.elapsed();
        self.latency
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(series)
            .or_default()
            .push((start, d));
    }

    fn count(&self, what: &'static str) {
        *self.misbehaviour.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(what).or_default() += 1;
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.halt.load(Ordering::Relaxed)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs the soak; `Err` names the first broken promise.
pub async fn run(cfg: SoakConfig) -> anyhow::Result<SoakReport> {
    std::fs::create_dir_all(&cfg.dir)?;
    let ports = crate::free_ports(3)?;
    let (kafka, mqtt, metrics) =
        (format!("127.0.0.1:{}", ports[0]), format!("127.0.0.1:{}", ports[1]), format!("127.0.0.1:{}", ports[2]));
    let data = cfg.dir.join("data");
    let hash = tributary_broker::security::PasswordHash::new(PASSWORD.as_bytes(), 4096).map_err(anyhow::Error::msg)?;
    let config = cfg.dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            r#"[storage]
data_dir = {data:?}
[kafka]
listen = "{kafka}"
[mqtt]
listen = "{mqtt}"
websocket_listen = "127.0.0.1:0"
[[mqtt.routes]]
filter = "soak/#"
topic = "{MQTT_LOG_TOPIC}"
[metrics]
listen = "{metrics}"
[auth]
enabled = true
failure_delay_ms = 100
[[auth.users]]
name = "{USER}"
password_hash = "{}"
mqtt.publish = ["soak/#"]
mqtt.subscribe = ["soak/#"]
kafka.read = ["*"]
kafka.write = ["*"]
kafka.create = ["*"]
kafka.groups = ["*"]
"#,
            hash.encode()
        ),
    )?;
    let pid = Arc::new(AtomicI32::new(0));
    let mut gw = Gateway { binary: cfg.binary.clone(), config, child: None, pid: pid.clone() };
    let mut gw = tokio::task::spawn_blocking(move || gw.start().map(|()| gw)).await??;
    let shared = Arc::new(Shared::default());

    // RSS sampler.
    let sampler = {
        let (shared, pid) = (shared.clone(), pid.clone());
        tokio::spawn(async move {
            while !shared.halt.load(Ordering::Relaxed) {
                let p = pid.load(Ordering::Relaxed);
                if p > 0 {
                    let rss = status_kib(&p.to_string(), "VmRSS:");
                    shared.peak_rss_kib.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    create_kafka_topic(&kafka).await?;
    let mut tasks = vec![tokio::spawn(mqtt_subscriber(mqtt.clone(), shared.clone()))];
    let subscribed = async {
        while !shared.subscribed.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), subscribed).await.context("no SUBACK for the subscriber")?;
    let mut well_behaved = Vec::new();
    for i in 0..cfg.kafka_producers {
        well_behaved.push(tokio::spawn(kafka_producer(i, kafka.clone(), cfg.kafka_records_per_s, shared.clone())));
    }
    for i in 0..cfg.mqtt_publishers {
        let qos = if i % 2 == 0 { 2 } else { 1 };
        well_behaved.push(tokio::spawn(mqtt_publisher(i, qos, mqtt.clone(), cfg.mqtt_messages_per_s, shared.clone())));
    }
    tasks.push(tokio::spawn(kafka_consumer(kafka.clone(), shared.clone())));
    tasks.push(tokio::spawn(prober(mqtt.clone(), kafka.clone(), shared.clone())));
    // The misbehaving clients.
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    tasks.push(tokio::spawn(never_acks(mqtt.clone(), true, shared.clone())));
    tasks.push(tokio::spawn(never_acks(mqtt.clone(), false, shared.clone())));
    tasks.push(tokio::spawn(half_frames(mqtt.clone(), kafka.clone(), shared.clone())));
    tasks.push(tokio::spawn(garbage(mqtt.clone(), kafka.clone(), rng.random(), shared.clone())));
    tasks.push(tokio::spawn(floods(mqtt.clone(), kafka.clone(), shared.clone())));
    tasks.push(tokio::spawn(oversized_sasl(kafka.clone(), shared.clone())));

    // The chaos schedule: kills and disk faults at seeded moments, at least 4 s apart.
    let chaos_start = Instant::now();
    let events = schedule(&mut rng, cfg.duration, cfg.kills, cfg.disk_faults);
    eprintln!("soak: seed {} schedule {:?}", cfg.seed, events);
    let mut report = SoakReport { seed: cfg.seed, ..SoakReport::default() };
    let chaos = async {
        for (at, event) in &events {
            tokio::time::sleep_until(tokio::time::Instant::from_std(chaos_start + *at)).await;
            let began = Instant::now();
            match event {
                Chaos::Kill => {
                    gw.kill()?;
                    let mut moved = std::mem::replace(
                        &mut gw,
                        Gateway { binary: cfg.binary.clone(), config: PathBuf::new(), child: None, pid: pid.clone() },
                    );
                    gw = tokio::task::spawn_blocking(move || moved.start().map(|()| moved)).await??;
                    report.kills += 1;
                }
                Chaos::DiskFault(len) => {
                    gw.disk_fault(true)?;
                    tokio::time::sleep(*len).await;
                    gw.disk_fault(false)?;
                    report.disk_faults += 1;
                }
            }
            lock(&shared.faults).push((began, Instant::now()));
            eprintln!("soak: {event:?} at {:.1} s done", chaos_start.elapsed().as_secs_f64());
        }
        tokio::time::sleep_until(tokio::time::Instant::from_std(chaos_start + cfg.duration)).await;
        Ok::<(), anyhow::Error>(())
    };
    let outcome = chaos.await;
    report.chaos_s = chaos_start.elapsed().as_secs_f64();
    shared.stop.store(true, Ordering::Relaxed);
    if let Err(e) = outcome {
        shared.halt.store(true, Ordering::Relaxed);
        return Err(e.context("chaos driver"));
    }
    // Drain: producers finish what they sent; then every consumer must catch up.
    shared.finish.store(true, Ordering::Relaxed);
    for t in well_behaved {
        tokio::time::timeout(Duration::from_secs(180), t)
            .await
            .context("well-behaved producers did not get every record acknowledged within 180 s after the chaos")???;
    }
    let caught_up = async {
        loop {
            let behind = missing_deliveries(&shared);
            if behind.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(120), caught_up).await.is_err() {
        shared.halt.store(true, Ordering::Relaxed);
        bail!("subscriber and consumer did not receive every acknowledged record: {:?}", missing_deliveries(&shared));
    }
    shared.halt.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(20), t).await;
    }
    let _ = sampler.await;
    let peak_before_stop = status_kib(&pid.load(Ordering::Relaxed).to_string(), "VmHWM:");
    report.peak_rss_kib = shared.peak_rss_kib.load(Ordering::Relaxed).max(peak_before_stop);
    tokio::task::spawn_blocking(move || gw.stop()).await??;

    // The log itself, read with the store after a clean stop.
    let log = tokio::task::spawn_blocking(move || read_log(&data)).await??;
    verify(&shared, &log, &mut report)?;
    report.latencies = latencies(&shared);
    report.misbehaviour = lock(&shared.misbehaviour).iter().map(|(k, v)| (k.to_string(), *v)).collect();
    ensure!(
        report.peak_rss_kib <= cfg.rss_ceiling_kib,
        "peak RSS {} KiB over the ceiling of {} KiB\n{report}",
        report.peak_rss_kib,
        cfg.rss_ceiling_kib
    );
    Ok(report)
}

#[derive(Debug, Clone, Copy)]
enum Chaos {
    Kill,
    DiskFault(Duration),
}

fn schedule(rng: &mut impl Rng, duration: Duration, kills: u32, faults: u32) -> Vec<(Duration, Chaos)> {
    let mut events: Vec<Chaos> = (0..kills).map(|_| Chaos::Kill).collect();
    events.extend((0..faults).map(|_| Chaos::DiskFault(Duration::from_millis(rng.random_range(1000..3000)))));
    // Shuffle, then spread over the middle of the run with seeded jitter.
    for i in (1..events.len()).rev() {
        events.swap(i, rng.random_range(0..=i));
    }
    let n = events.len().max(1) as u32;
    let slot = duration.mul_f64(0.8) / n;
    events
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let jitter = slot.mul_f64(rng.random_range(0.0..0.5));
            (duration.mul_f64(0.1) + slot * i as u32 + jitter, e)
        })
        .collect()
}

fn rdkafka_config(bootstrap: &str) -> rdkafka::ClientConfig {
    let mut c = rdkafka::ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("security.protocol", "SASL_PLAINTEXT")
        .set("sasl.mechanism", "SCRAM-SHA-256")
        .set("sasl.username", USER)
        .set("sasl.password", PASSWORD)
        .set("log_level", "3")
        // librdkafka's reconnect backoff grows to 10 s by default, so after a restart its clients
        // could wait seconds before even trying: the soak measures the gateway, not that wait.
        .set("reconnect.backoff.max.ms", "500");
    c
}

async fn create_kafka_topic(bootstrap: &str) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<_> = rdkafka_config(bootstrap).create()?;
    let results =
        admin.create_topics(&[NewTopic::new(KAFKA_TOPIC, 3, TopicReplication::Fixed(1))], &AdminOptions::new()).await?;
    for r in results {
        r.map_err(|(t, e)| anyhow::anyhow!("create {t}: {e}"))?;
    }
    Ok(())
}

/// An idempotent producer (acks=all, no delivery timeout: it retries through kills and faults)
/// writing `p{i}` keyed records with increasing sequence numbers.
async fn kafka_producer(i: usize, bootstrap: String, per_s: u32, shared: Arc<Shared>) -> anyhow::Result<()> {
    let producer: FutureProducer = rdkafka_config(&bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "0")
        .create()?;
    let key = format!("p{i}");
    let inflight = Arc::new(tokio::sync::Semaphore::new(2000));
    let mut tick = tokio::time::interval(Duration::from_secs(1) / per_s.max(1));
    let mut seq = 0u64;
    // Records sent before the first acknowledgement wait for the client's start-up (connection,
    // SCRAM login, metadata, producer id): not the gateway's latency under load.
    let warm = Arc::new(std::sync::OnceLock::<Instant>::new());
    while !shared.finish.load(Ordering::Relaxed) && !shared.halt.load(Ordering::Relaxed) {
        tick.tick().await;
        let permit = inflight.clone().acquire_owned().await?;
        seq += 1;
        let payload = seq.to_string();
        let started = Instant::now();
        let delivery = producer
            .send_result(FutureRecord::to(KAFKA_TOPIC).key(&key).payload(&payload))
            .map_err(|(e, _)| anyhow::anyhow!("enqueue: {e}"))?;
        let (shared, key, warm) = (shared.clone(), key.clone(), warm.clone());
        tokio::spawn(async move {
            match delivery.await {
                Ok(Ok(d)) => {
                    if started >= *warm.get_or_init(Instant::now) {
                        shared.sample("kafka produce (acks=all)", started);
                    }
                    lock(&shared.kafka_acked).entry(key).or_default().push((seq, d.partition, d.offset));
                }
                Ok(Err((e, _))) => eprintln!("soak: kafka delivery of {key}/{seq} failed: {e}"),
                Err(_) => {}
            }
            drop(permit);
        });
    }
    // Every record sent gets its answer (permits all back).
    let _all = inflight.acquire_many(2000).await?;
    Ok(())
}

/// Reads one MQTT packet: (first byte, body).
async fn read_packet(s: &mut TcpStream) -> anyhow::Result<(u8, Vec<u8>)> {
    let first = s.read_u8().await?;
    let mut len = 0usize;
    for i in 0..4 {
        let b = s.read_u8().await?;
        len |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await?;
    Ok((first, body))
}

fn put_str(v: &mut Vec<u8>, s: &[u8]) {
    v.extend_from_slice(&(s.len() as u16).to_be_bytes());
    v.extend_from_slice(s);
}

/// A 3.1.1 CONNECT with username and password; `clean` = clean session.
fn mqtt_connect(client_id: &str, clean: bool) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, b"MQTT");
    body.push(4);
    body.push(0xC0 | if clean { 0x02 } else { 0 });
    body.extend_from_slice(&30u16.to_be_bytes());
    put_str(&mut body, client_id.as_bytes());
    put_str(&mut body, USER.as_bytes());
    put_str(&mut body, PASSWORD.as_bytes());
    crate::mqtt_packet(0x10, &body)
}

/// Connects and logs in; returns the stream and the session-present flag.
async fn mqtt_login(addr: &str, client_id: &str, clean: bool) -> anyhow::Result<(TcpStream, bool)> {
    let mut s = tokio::time::timeout(ANSWER_TIMEOUT, TcpStream::connect(addr)).await??;
    s.set_nodelay(true)?;
    s.write_all(&mqtt_connect(client_id, clean)).await?;
    let (kind, body) = tokio::time::timeout(ANSWER_TIMEOUT, read_packet(&mut s)).await??;
    ensure!(kind == 0x20 && body.len() == 2, "expected CONNACK, got {kind:#x}");
    ensure!(body[1] == 0, "CONNACK return code {}", body[1]);
    Ok((s, body[0] & 1 == 1))
}

/// A persistent-session publisher with one message in flight: QoS 1 (PUBLISH, PUBACK) or QoS 2
/// (PUBLISH, PUBREC, PUBREL, PUBCOMP), resending after a reconnect as the spec says (4.4): the
/// PUBLISH with DUP until PUBREC, then only the PUBREL.
async fn mqtt_publisher(i: usize, qos: u8, addr: String, per_s: u32, shared: Arc<Shared>) -> anyhow::Result<()> {
    let client_id = format!("{USER}-pub-{i}");
    let topic = format!("soak/p{i}");
    lock(&shared.mqtt_acked).insert(i, (qos, Vec::new()));
    let mut conn: Option<TcpStream> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / per_s.max(1));
    let mut seq = 0u64;
    while !shared.finish.load(Ordering::Relaxed) && !shared.halt.load(Ordering::Relaxed) {
        tick.tick().await;
        seq += 1;
        let pkid = (seq % 65_535) as u16 + 1;
        let mut body = Vec::new();
        put_str(&mut body, topic.as_bytes());
        body.extend_from_slice(&pkid.to_be_bytes());
        body.extend_from_slice(seq.to_string().as_bytes());
        let started = Instant::now();
        // 0 = PUBLISH not yet acknowledged, 1 = PUBREC seen (QoS 2: only PUBREL left).
        let mut stage = 0;
        let mut sent = false;
        loop {
            if shared.halt.load(Ordering::Relaxed) {
                return Ok(());
            }
            let s = match conn.as_mut() {
                Some(s) => s,
                None => match mqtt_login(&addr, &client_id, false).await {
                    Ok((s, _present)) => conn.insert(s),
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let step = async {
                if stage == 0 {
                    let dup = if sent { 0x08 } else { 0 };
                    s.write_all(&crate::mqtt_packet(0x30 | (qos << 1) | dup, &body)).await?;
                    sent = true;
                } else {
                    s.write_all(&crate::mqtt_packet(0x62, &pkid.to_be_bytes())).await?;
                }
                loop {
                    let (kind, ack) = tokio::time::timeout(ANSWER_TIMEOUT, read_packet(s)).await??;
                    if ack.get(..2) != Some(&pkid.to_be_bytes()[..]) {
                        continue;
                    }
                    match (kind, qos, stage) {
                        (0x40, 1, 0) => return Ok::<bool, anyhow::Error>(true),
                        (0x50, 2, 0) => {
                            stage = 1;
                            s.write_all(&crate::mqtt_packet(0x62, &pkid.to_be_bytes())).await?;
                        }
                        (0x70, 2, 1) => return Ok(true),
                        _ => {}
                    }
                }
            };
            match step.await {
                Ok(_) => break,
                Err(_) => {
                    // Refused (3.1.1 closes on a failed publish), killed, or stuck: reconnect.
                    conn = None;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        shared.sample(if qos == 2 { "mqtt publish qos 2 (PUBCOMP)" } else { "mqtt publish qos 1 (PUBACK)" }, started);
        if let Some((_, seqs)) = lock(&shared.mqtt_acked).get_mut(&i) {
            seqs.push(seq);
        }
    }
    if let Some(mut s) = conn {
        let _ = s.write_all(&[0xE0, 0]).await;
    }
    Ok(())
}

/// A well-behaved persistent subscriber on `soak/#` at QoS 1: acknowledges everything.
async fn mqtt_subscriber(addr: String, shared: Arc<Shared>) {
    let mut first = true;
    while !shared.halt.load(Ordering::Relaxed) {
        let Ok((mut s, present)) = mqtt_login(&addr, &format!("{USER}-sub"), false).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if first || !present {
            let mut body = 1u16.to_be_bytes().to_vec();
            put_str(&mut body, b"soak/#");
            body.push(1);
            if s.write_all(&crate::mqtt_packet(0x82, &body)).await.is_err() {
                continue;
            }
            match tokio::time::timeout(ANSWER_TIMEOUT, read_packet(&mut s)).await {
                Ok(Ok((0x90, ack))) if ack.get(2) == Some(&1) => {}
                _ => continue,
            }
            first = false;
            shared.subscribed.store(true, Ordering::Relaxed);
        }
        while !shared.halt.load(Ordering::Relaxed) {
            let Ok(Ok((kind, body))) = tokio::time::timeout(Duration::from_secs(1), read_packet(&mut s)).await else {
                if shared.halt.load(Ordering::Relaxed) {
                    return;
                }
                // Nothing for a second is fine; a read error is a lost connection.
                if s.peek(&mut [0u8; 1]).await.map_or(true, |n| n == 0) {
                    break;
                }
                continue;
            };
            if kind & 0xF0 != 0x30 || body.len() < 2 {
                continue;
            }
            let qos = (kind >> 1) & 3;
            let tlen = u16::from_be_bytes([body[0], body[1]]) as usize;
            let Some(topic) = body.get(2..2 + tlen) else { continue };
            let mut at = 2 + tlen;
            if qos > 0 {
                let Some(pkid) = body.get(at..at + 2) else { continue };
                let ack = crate::mqtt_packet(0x40, pkid);
                at += 2;
                if s.write_all(&ack).await.is_err() {
                    break;
                }
            }
            let (Ok(topic), Some(Ok(seq))) = (
                std::str::from_utf8(topic),
                body.get(at..).map(|p| std::str::from_utf8(p).unwrap_or("").parse::<u64>()),
            ) else {
                continue;
            };
            lock(&shared.subscriber).entry(topic.to_string()).or_default().push(seq);
        }
    }
}

/// A consumer-group member reading the Kafka topic from the beginning, committing automatically.
async fn kafka_consumer(bootstrap: String, shared: Arc<Shared>) {
    let consumer: StreamConsumer = match rdkafka_config(&bootstrap)
        .set("group.id", GROUP)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "500")
        .set("session.timeout.ms", "10000")
        .create()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("soak: consumer: {e}");
            return;
        }
    };
    if let Err(e) = consumer.subscribe(&[KAFKA_TOPIC]) {
        eprintln!("soak: subscribe: {e}");
        return;
    }
    while !shared.halt.load(Ordering::Relaxed) {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await {
            let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
            let seq = m.payload().and_then(|p| std::str::from_utf8(p).ok()).and_then(|p| p.parse::<u64>().ok());
            if let Some(seq) = seq {
                lock(&shared.consumer).entry(key).or_default().push(seq);
            }
        }
    }
}

/// Acknowledged records the subscriber or the consumer has not received yet (at most a few named).
fn missing_deliveries(shared: &Shared) -> Vec<String> {
    let mut missing = Vec::new();
    let sub = lock(&shared.subscriber);
    for (i, (_, seqs)) in lock(&shared.mqtt_acked).iter() {
        let got: std::collections::HashSet<u64> =
            sub.get(&format!("soak/p{i}")).map(|v| v.iter().copied().collect()).unwrap_or_default();
        if let Some(s) = seqs.iter().find(|s| !got.contains(s)) {
            missing.push(format!("subscriber lacks soak/p{i} #{s}"));
        }
    }
    let con = lock(&shared.consumer);
    for (key, acked) in lock(&shared.kafka_acked).iter() {
        let got: std::collections::HashSet<u64> = con.get(key).map(|v| v.iter().copied().collect()).unwrap_or_default();
        if let Some((s, _, _)) = acked.iter().find(|(s, _, _)| !got.contains(s)) {
            missing.push(format!("consumer lacks {key} #{s}"));
        }
    }
    missing
}

/// Every 200 ms: a new MQTT login (CONNECT -> CONNACK) and a Kafka ApiVersions round trip.
async fn prober(mqtt: String, kafka: String, shared: Arc<Shared>) {
    let mut k: Option<TcpStream> = None;
    let mut correlation = 0i32;
    while !shared.halt.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        if let Ok((mut s, _)) = mqtt_login(&mqtt, &format!("{USER}-probe"), true).await {
            shared.sample("mqtt CONNECT -> CONNACK (new)", started);
            let _ = s.write_all(&[0xE0, 0]).await;
        }
        if k.is_none() {
            k = TcpStream::connect(&kafka).await.ok();
        }
        if let Some(s) = k.as_mut() {
            correlation += 1;
            let started = Instant::now();
            // ApiVersions v0: size, api key 18, version 0, correlation id, client id "probe".
            let mut req = Vec::new();
            req.extend_from_slice(&18i16.to_be_bytes());
            req.extend_from_slice(&0i16.to_be_bytes());
            req.extend_from_slice(&correlation.to_be_bytes());
            put_str(&mut req, b"probe");
            let mut frame = (req.len() as i32).to_be_bytes().to_vec();
            frame.extend_from_slice(&req);
            let round_trip = async {
                s.write_all(&frame).await?;
                let n = s.read_i32().await?;
                ensure!((4..1 << 20).contains(&n), "bad response size {n}");
                let mut body = vec![0u8; n as usize];
                s.read_exact(&mut body).await?;
                ensure!(body[..4] == correlation.to_be_bytes(), "correlation id");
                Ok::<(), anyhow::Error>(())
            };
            match tokio::time::timeout(ANSWER_TIMEOUT, round_trip).await {
                Ok(Ok(())) => shared.sample("kafka ApiVersions (open conn)", started),
                _ => k = None,
            }
        }
    }
}

/// A subscriber that never acknowledges (`reads`) or never even reads its socket.
async fn never_acks(addr: String, reads: bool, shared: Arc<Shared>) {
    let what = if reads { "never-ack subscriber" } else { "never-read subscriber" };
    while !shared.stopping() {
        let id = format!("{USER}-lazy-{}", if reads { "ack" } else { "read" });
        let Ok((mut s, _)) = mqtt_login(&addr, &id, true).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        shared.count(what);
        let mut body = 1u16.to_be_bytes().to_vec();
        put_str(&mut body, b"soak/#");
        body.push(1);
        if s.write_all(&crate::mqtt_packet(0x82, &body)).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 64 * 1024];
        while !shared.stopping() {
            if reads {
                match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    _ => {}
                }
            } else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                // Closed by the gateway (killed)? Then come back.
                if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(1), s.peek(&mut buf[..1])).await {
                    break;
                }
            }
        }
    }
}

/// Connections that announce a large packet and send only its beginning, held open: MQTT
/// CONNECTs announcing ~1 MiB, Kafka size prefixes of 8 MiB.
async fn half_frames(mqtt: String, kafka: String, shared: Arc<Shared>) {
    let mut held: Vec<TcpStream> = Vec::new();
    while !shared.stopping() {
        while held.len() < 200 && !shared.stopping() {
            let mqtt_side = held.len() % 4 != 3;
            let addr = if mqtt_side { &mqtt } else { &kafka };
            let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await else {
                break;
            };
            let bytes: &[u8] = if mqtt_side {
                &[0x10, 0xff, 0xff, 0x3f, 0x00, 0x04, b'M', b'Q']
            } else {
                &[0x00, 0x80, 0x00, 0x00, 0x00, 0x12]
            };
            if s.write_all(bytes).await.is_ok() {
                shared.count(if mqtt_side { "half-sent mqtt frames" } else { "half-sent kafka frames" });
                held.push(s);
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Let a quarter go, so the rest are replaced by fresh ones.
        let keep = held.len() * 3 / 4;
        held.truncate(keep);
    }
}

/// Random bytes at both listeners.
async fn garbage(mqtt: String, kafka: String, seed: u64, shared: Arc<Shared>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    while !shared.stopping() {
        for addr in [&mqtt, &kafka] {
            let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await else {
                continue;
            };
            let mut bytes = vec![0u8; rng.random_range(1..4096)];
            rng.fill(&mut bytes[..]);
            if s.write_all(&bytes).await.is_ok() {
                shared.count("garbage connections");
            }
            let mut sink = [0u8; 1024];
            // The gateway closes it; a bounded wait either way.
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while let Ok(n) = s.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Bursts of connections opened and closed at once.
async fn floods(mqtt: String, kafka: String, shared: Arc<Shared>) {
    while !shared.stopping() {
        for _ in 0..100 {
            for addr in [&mqtt, &kafka] {
                if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await {
                    shared.count("flood connections");
                    drop(s);
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// SaslHandshake for SCRAM, then a 1 MiB SaslAuthenticate token: the gateway must refuse it at
/// once, without reading (or buffering) the token.
async fn oversized_sasl(kafka: String, shared: Arc<Shared>) {
    while !shared.stopping() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&kafka)).await else {
            continue;
        };
        let attempt = async {
            // SaslHandshake v1: api key 17, mechanism "SCRAM-SHA-256".
            let mut req = Vec::new();
            req.extend_from_slice(&17i16.to_be_bytes());
            req.extend_from_slice(&1i16.to_be_bytes());
            req.extend_from_slice(&1i32.to_be_bytes());
            put_str(&mut req, b"soak");
            put_str(&mut req, b"SCRAM-SHA-256");
            let mut frame = (req.len() as i32).to_be_bytes().to_vec();
            frame.extend_from_slice(&req);
            s.write_all(&frame).await?;
            let n = s.read_i32().await?;
            let mut body = vec![0u8; n.clamp(0, 4096) as usize];
            s.read_exact(&mut body).await?;
            // SaslAuthenticate v1 announcing a 1 MiB token; send a little of it.
            let token_len = 1usize << 20;
            let mut req = Vec::new();
            req.extend_from_slice(&36i16.to_be_bytes());
            req.extend_from_slice(&1i16.to_be_bytes());
            req.extend_from_slice(&2i32.to_be_bytes());
            put_str(&mut req, b"soak");
            req.extend_from_slice(&(token_len as i32).to_be_bytes());
            let mut frame = ((req.len() + token_len) as i32).to_be_bytes().to_vec();
            frame.extend_from_slice(&req);
            frame.extend_from_slice(&[b'n'; 1024]);
            s.write_all(&frame).await?;
            // Keep writing until the gateway closes the connection.
            let chunk = vec![b'x'; 16 * 1024];
            loop {
                s.write_all(&chunk).await?;
            }
            #[allow(unreachable_code)]
            Ok::<(), anyhow::Error>(())
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Err(_)) => shared.count("oversized sasl refused"),
            _ => shared.count("oversized sasl not refused within 5 s"),
        }
    }
}

/// The records of a topic after the gateway stopped: partition -> (offset, key, value, mqtt.topic).
type Log = HashMap<&'static str, Vec<(i32, i64, Option<String>, String, Option<String>)>>;

fn read_log(data: &Path) -> anyhow::Result<Log> {
    let cfg = tributary_broker::StorageConfig { data_dir: data.to_path_buf(), ..Default::default() };
    let (store, _) = tributary_broker::Store::open(cfg)?;
    let mut log = Log::new();
    for topic in [KAFKA_TOPIC, MQTT_LOG_TOPIC] {
        let Some(info) = store.topic(topic) else { continue };
        let entries = log.entry(topic).or_default();
        for p in 0..info.partitions as i32 {
            let mut offset = store.watermarks(topic, p)?.log_start_offset;
            loop {
                let records = store.read_records(topic, p, offset, 1 << 20)?;
                let Some(last) = records.last() else { break };
                offset = last.offset + 1;
                for r in records {
                    let text = |b: Option<&bytes::Bytes>| b.map(|v| String::from_utf8_lossy(v).into_owned());
                    let mqtt_topic =
                        r.headers.iter().find(|(k, _)| k == "mqtt.topic").and_then(|(_, v)| text(v.as_ref()));
                    entries.push((
                        p,
                        r.offset,
                        text(r.key.as_ref()),
                        text(r.value.as_ref()).unwrap_or_default(),
                        mqtt_topic,
                    ));
                }
            }
        }
    }
    store.close_blocking()?;
    Ok(log)
}

/// Checks the log against what was acknowledged.
fn verify(shared: &Shared, log: &Log, report: &mut SoakReport) -> anyhow::Result<()> {
    // Kafka: per key, every acknowledged record where it was acknowledged; no sequence number
    // stored twice (idempotence); sequence numbers increase with the offset.
    let mut by_key: HashMap<String, Vec<(i32, i64, u64)>> = HashMap::new();
    for (p, offset, key, value, _) in log.get(KAFKA_TOPIC).map(Vec::as_slice).unwrap_or_default() {
        let seq: u64 = value.parse().with_context(|| format!("value {value:?} at {p}/{offset}"))?;
        by_key.entry(key.clone().unwrap_or_default()).or_default().push((*p, *offset, seq));
    }
    for (key, records) in &mut by_key {
        records.sort_by_key(|(p, o, _)| (*p, *o));
        ensure!(records.windows(2).all(|w| w[0].0 == w[1].0), "{key}: records in more than one partition");
        for w in records.windows(2) {
            ensure!(
                w[0].2 < w[1].2,
                "{key}: seq {} at offset {} then seq {} at offset {}",
                w[0].2,
                w[0].1,
                w[1].2,
                w[1].1
            );
        }
    }
    for (key, acked) in lock(&shared.kafka_acked).iter() {
        let stored: HashMap<u64, (i32, i64)> =
            by_key.get(key).map(|v| v.iter().map(|(p, o, s)| (*s, (*p, *o))).collect()).unwrap_or_default();
        for (seq, p, o) in acked {
            ensure!(
                stored.get(seq) == Some(&(*p, *o)),
                "{key} #{seq} acknowledged at {p}/{o}, stored at {:?}",
                stored.get(seq)
            );
        }
        report.kafka_acked += acked.len() as u64;
    }
    // MQTT: per publisher topic, in log order.
    let mut by_topic: HashMap<String, Vec<u64>> = HashMap::new();
    let mut mqtt = log.get(MQTT_LOG_TOPIC).cloned().unwrap_or_default();
    mqtt.sort_by_key(|(p, o, ..)| (*p, *o));
    for (p, offset, _, value, topic) in &mqtt {
        let topic = topic.clone().with_context(|| format!("record {p}/{offset} without mqtt.topic"))?;
        by_topic.entry(topic).or_default().push(value.parse().with_context(|| format!("payload {value:?}"))?);
    }
    for (i, (qos, acked)) in lock(&shared.mqtt_acked).iter() {
        let topic = format!("soak/p{i}");
        let stored = by_topic.get(&topic).cloned().unwrap_or_default();
        let mut first_seen: Vec<u64> = Vec::new();
        let mut counts: HashMap<u64, u32> = HashMap::new();
        for s in &stored {
            let c = counts.entry(*s).or_default();
            *c += 1;
            if *c == 1 {
                first_seen.push(*s);
            }
        }
        ensure!(first_seen.windows(2).all(|w| w[0] < w[1]), "{topic}: messages stored out of order");
        if *qos == 2 {
            if let Some((s, n)) = counts.iter().find(|(_, n)| **n > 1) {
                bail!("{topic}: QoS 2 message #{s} stored {n} times");
            }
            report.mqtt_qos2_acked += acked.len() as u64;
        } else {
            report.mqtt_qos1_acked += acked.len() as u64;
        }
        if let Some(s) = acked.iter().find(|s| !counts.contains_key(s)) {
            bail!("{topic}: acknowledged QoS {qos} message #{s} is not in the log");
        }
    }
    report.subscriber_received = lock(&shared.subscriber).values().map(|v| v.len() as u64).sum();
    report.consumer_received = lock(&shared.consumer).values().map(|v| v.len() as u64).sum();
    Ok(())
}

/// p50/p99/max of each series, over the samples that started outside every fault window (and its
/// grace period).
fn latencies(shared: &Shared) -> Vec<(String, usize, f64, f64, f64)> {
    let faults = lock(&shared.faults).clone();
    let healthy = |start: Instant, d: Duration| !faults.iter().any(|(a, b)| start < *b + FAULT_GRACE && start + d > *a);
    lock(&shared.latency)
        .iter()
        .map(|(name, samples)| {
            let mut ms: Vec<f64> =
                samples.iter().filter(|(s, d)| healthy(*s, *d)).map(|(_, d)| d.as_secs_f64() * 1000.0).collect();
            ms.sort_by(f64::total_cmp);
            let q = |f: f64| if ms.is_empty() { 0.0 } else { ms[((ms.len() - 1) as f64 * f).round() as usize] };
            (name.to_string(), ms.len(), q(0.5), q(0.99), q(1.0))
        })
        .collect()
}
