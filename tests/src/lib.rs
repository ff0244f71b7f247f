//! Helpers shared by the benchmark binaries: the machine's own limits (fsync rate, sequential
//! write bandwidth) and memory readings of a process, so every benchmark reports its figures
//! against the same yardsticks.

pub mod browser;
pub mod kafka_cluster;
pub mod link;
pub mod linkem;
pub mod mm2;
pub mod rdkafka_bench;
pub mod soak;
pub mod workload;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

pub const MIB: f64 = 1024.0 * 1024.0;

/// Free loopback ports for a child process that binds them itself (Kafka, mosquitto), chosen
/// once (so a child restarted later comes back on the same ones).
///
/// They come from below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`): a port
/// taken from that range with `bind(0)` and released can be handed to any other test's outgoing
/// connection as its local port before the child binds it ("Address already in use" in CI). Below
/// the range only an explicit bind takes a port, so the remaining race is another test picking the
/// same random port in the same instant, and each is checked bindable here.
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    below_ephemeral(n, |port| std::net::TcpListener::bind(("127.0.0.1", port)).map(|l| Box::new(l) as Box<dyn Send>))
}

/// A free loopback UDP port from below the ephemeral range, for a child (a QUIC receiver) that
/// binds it itself: QUIC clients bind `0.0.0.0:0` and take theirs from the range.
pub fn free_udp_port() -> anyhow::Result<u16> {
    let ports = below_ephemeral(1, |port| {
        std::net::UdpSocket::bind(("127.0.0.1", port)).map(|s| Box::new(s) as Box<dyn Send>)
    })?;
    Ok(ports[0])
}

fn below_ephemeral(n: usize, bind: impl Fn(u16) -> std::io::Result<Box<dyn Send>>) -> anyhow::Result<Vec<u16>> {
    use rand::Rng;
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let ephemeral_low = range.split_whitespace().next().and_then(|l| l.parse::<u16>().ok()).unwrap_or(32768);
    // 20000.. keeps clear of the well-known and registered ports services here listen on.
    let (low, high) = (20000u16, ephemeral_low.saturating_sub(1));
    anyhow::ensure!(high > low + 1000, "ephemeral range starts at {ephemeral_low}: no room below it");
    let mut rng = rand::rng();
    let mut ports: Vec<u16> = Vec::with_capacity(n);
    let mut held = Vec::with_capacity(n);
    let mut tries = 0;
    while ports.len() < n {
        tries += 1;
        anyhow::ensure!(tries < 10_000, "no {n} free ports in {low}..{high}");
        let port = rng.random_range(low..=high);
        if ports.contains(&port) {
            continue;
        }
        // Held until all are chosen, so the same call cannot pick one twice.
        if let Ok(socket) = bind(port) {
            held.push(socket);
            ports.push(port);
        }
    }
    Ok(ports)
}

/// 4 KiB write + fdatasync per round, for `for_time`: the rate a durable commit cannot beat.
pub fn fsync_rate(dir: &Path, for_time: Duration) -> std::io::Result<f64> {
    let path = dir.join("fsync-probe");
    let mut f = OpenOptions::new().create(true).write(true).truncate(true).open(&path)?;
    let block = [0x5au8; 4096];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < for_time {
        f.write_all(&block)?;
        f.sync_data()?;
        n += 1;
    }
    std::fs::remove_file(&path)?;
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Bytes per second of writing `bytes` in 1 MiB chunks followed by fsync.
pub fn sequential_write(dir: &Path, bytes: usize) -> std::io::Result<f64> {
    let path = dir.join("seq-probe");
    let mut f = OpenOptions::new().create(true).write(true).truncate(true).open(&path)?;
    let chunk = vec![0xa5u8; 1 << 20];
    let start = Instant::now();
    for _ in 0..bytes / chunk.len() {
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    let rate = bytes as f64 / start.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    Ok(rate)
}

/// A `/proc/<pid>/status` field in KiB (`VmHWM` = peak RSS, `VmRSS` = current); 0 if unknown.
pub fn status_kib(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// CPU time (user + system) a process has used, in seconds, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which is in parentheses and may contain spaces).
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// The gateway started as a child process for a benchmark: its own data directory, free ports,
/// warnings-only logging. Killed when dropped.
#[derive(Debug)]
pub struct BenchGateway {
    child: std::process::Child,
    /// The child's pid, for `/proc` readings.
    pub pid: String,
    /// `host:port` of the Kafka and MQTT listeners.
    pub kafka: String,
    pub mqtt: String,
}

impl BenchGateway {
    /// Starts `binary` (default: `tributary-under-test` next to the running program) on a config
    /// with data in `dir`, `storage_extra` lines added to `[storage]` and `tables` (further TOML
    /// tables such as `[topic_defaults]`) appended.
    pub fn start(binary: Option<&Path>, dir: &Path, storage_extra: &str, tables: &str) -> anyhow::Result<Self> {
        Self::start_with(binary, dir, storage_extra, "", "", tables)
    }

    /// [`BenchGateway::start`] with `kafka_extra` lines added to `[kafka]` and `mqtt_extra` lines
    /// to `[mqtt]`.
    pub fn start_with(
        binary: Option<&Path>,
        dir: &Path,
        storage_extra: &str,
        kafka_extra: &str,
        mqtt_extra: &str,
        tables: &str,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        use std::io::BufRead;
        let binary = match binary {
            Some(b) => b.to_path_buf(),
            None => std::env::current_exe()?.with_file_name("tributary-under-test"),
        };
        let config = dir.join("gateway.toml");
        std::fs::write(
            &config,
            format!(
                "[storage]\ndata_dir = {:?}\nmax_bytes = {}\n{storage_extra}[kafka]\nlisten = \"127.0.0.1:0\"\n{kafka_extra}[mqtt]\nlisten = \"127.0.0.1:0\"\nwebsocket_listen = \"127.0.0.1:0\"\n{mqtt_extra}[metrics]\nlisten = \"127.0.0.1:0\"\n{tables}[log]\nlevel = \"warn,tributary_gateway=info\"\n",
                dir.join("data").to_str().context("utf-8 path")?,
                16u64 << 30,
            ),
        )?;
        let mut child = std::process::Command::new(&binary)
            .args(["serve", "--config", config.to_str().context("utf-8 path")?])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let pid = child.id().to_string();
        let mut lines = std::io::BufReader::new(child.stderr.take().context("stderr")?).lines();
        let ready = loop {
            let Some(line) = lines.next() else { anyhow::bail!("gateway exited before it was ready") };
            let line = line?;
            if line.contains("tributary gateway ready") {
                break line;
            }
        };
        let field = |name: &str| -> anyhow::Result<String> {
            ready
                .split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_string)
                .with_context(|| format!("no {name} in the ready line"))
        };
        let (kafka, mqtt) = (field("kafka=")?, field("mqtt=")?);
        // Keep draining its log so it never blocks on a full pipe; show what it says.
        std::thread::spawn(move || lines.for_each(|l| eprintln!("gateway: {}", l.unwrap_or_default())));
        Ok(Self { child, pid, kafka, mqtt })
    }

    /// Peak resident memory so far (KiB).
    pub fn peak_rss_kib(&self) -> u64 {
        status_kib(&self.pid, "VmHWM:")
    }
}

impl Drop for BenchGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `tributary-cloud` receiver as a child process (`binary serve --config DIR/cloud.toml`),
/// restartable on the same configuration (so on the same UDP port); its log goes on to this
/// process's stderr. Killed when dropped.
#[derive(Debug)]
pub struct CloudChild {
    binary: std::path::PathBuf,
    config: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl CloudChild {
    /// Writes `cfg` to `dir/cloud.toml` and starts the receiver (see [`CloudChild::spawn`]).
    pub fn start(binary: &Path, cfg: &tributary_sync::CloudConfig, dir: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let config = dir.join("cloud.toml");
        std::fs::write(&config, toml::to_string(cfg).context("serialize the receiver's config")?)
            .context("write cloud.toml")?;
        let mut c = Self { binary: binary.to_path_buf(), config, child: None };
        c.spawn()?;
        Ok(c)
    }

    /// Starts the child and waits for its ready line.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        use anyhow::Context;
        use std::io::BufRead;
        let mut child = std::process::Command::new(&self.binary)
            .args(["serve", "--config"])
            .arg(&self.config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("start the receiver {}", self.binary.display()))?;
        let mut lines = std::io::BufReader::new(child.stderr.take().context("stderr")?).lines();
        let mut seen = Vec::new();
        loop {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("receiver exited before it was ready:\n{}", seen.join("\n"));
            };
            if line.contains("tributary-cloud ready") {
                break;
            }
            seen.push(line);
        }
        std::thread::spawn(move || lines.map_while(Result::ok).for_each(|l| eprintln!("receiver: {l}")));
        self.child = Some(child);
        Ok(())
    }

    /// The running child's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) -> std::io::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for CloudChild {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// A Kafka listener on `store`, on a free loopback port, running in this process (the central
/// cluster of the mirror benchmark). Serves until [`KafkaListener::stop`].
#[derive(Debug)]
pub struct KafkaListener {
    pub addr: std::net::SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl KafkaListener {
    /// Binds `127.0.0.1:0`; topics created by clients get `topic_defaults` (one partition when
    /// auto-created).
    pub async fn start(
        store: tributary_broker::Store,
        topic_defaults: tributary_broker::TopicConfig,
    ) -> anyhow::Result<Self> {
        Self::start_advertising(store, topic_defaults, 0).await
    }

    /// As [`KafkaListener::start`], advertising `advertised_port` (a proxy's, bound first) in
    /// metadata, so every connection of a client goes through that proxy (0: its own port).
    pub async fn start_advertising(
        store: tributary_broker::Store,
        topic_defaults: tributary_broker::TopicConfig,
        advertised_port: u16,
    ) -> anyhow::Result<Self> {
        Self::start_at(store, topic_defaults, "127.0.0.1:0", "", advertised_port).await
    }

    /// Binds `listen`, advertising `advertised_host` (empty: the bound address) and
    /// `advertised_port` (0: the bound port). The task runs on the current runtime (one whose
    /// threads are in another network namespace serves there: `linkem::in_netns`).
    pub async fn start_at(
        store: tributary_broker::Store,
        topic_defaults: tributary_broker::TopicConfig,
        listen: &str,
        advertised_host: &str,
        advertised_port: u16,
    ) -> anyhow::Result<Self> {
        use tributary_broker::kafka::{KafkaConfig, KafkaServer};
        use tributary_broker::TopicTemplate;
        let cfg = KafkaConfig {
            listen: listen.into(),
            advertised_host: advertised_host.into(),
            advertised_port,
            ..KafkaConfig::default()
        };
        let template = TopicTemplate { partitions: 1, config: topic_defaults };
        let server = KafkaServer::bind(cfg, store, template).await?;
        let addr = server.local_addr()?;
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        Ok(Self { addr, stop, task })
    }

    /// Stops accepting and waits for the listener's task.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.task.await?;
        Ok(())
    }
}

/// A fleet of smart meters reporting JSON readings, the workload of the mirror benchmark: each
/// reading is 150-250 bytes (meter id, ISO timestamp, increasing import/export kWh counters,
/// voltage and current per phase with noise, power factor, frequency, a status), keyed by the
/// meter id. Deterministic for a seed, so two runs (or two phases) get the same data.
#[derive(Debug, Clone)]
pub struct SmartMeters {
    meters: Vec<Meter>,
    /// The next meter to read, and the time of the current round.
    next: usize,
    round_ms: i64,
    interval_ms: i64,
    rng: u64,
}

#[derive(Debug, Clone)]
struct Meter {
    id: String,
    phases: usize,
    import_wh: f64,
    export_wh: f64,
    /// Typical current per phase (A) and rooftop solar (exports around midday).
    load_a: f64,
    solar: bool,
    seq: u64,
}

impl SmartMeters {
    /// Meters with ids `first..first + count`; one reading each per `interval_ms` from `start_ms`.
    pub fn new(first: usize, count: usize, seed: u64, start_ms: i64, interval_ms: i64) -> Self {
        let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let meters = (first..first + count)
            .map(|i| {
                let r = xorshift(&mut rng);
                Meter {
                    id: format!("SM-{i:07}"),
                    // A fifth are three-phase (commercial); the rest single-phase homes.
                    phases: if r % 5 == 0 { 3 } else { 1 },
                    import_wh: ((r >> 8) % 40_000_000) as f64,
                    export_wh: 0.0,
                    load_a: 0.5 + (r >> 40) as f64 % 120.0 / 10.0,
                    solar: r % 3 == 0,
                    seq: 0,
                }
            })
            .collect();
        Self { meters, next: 0, round_ms: start_ms, interval_ms, rng }
    }

    pub fn len(&self) -> usize {
        self.meters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.meters.is_empty()
    }

    /// The next reading: meters in turn, the clock advancing one interval per round.
    pub fn next_reading(&mut self) -> tributary_broker::storage::batch::NewRecord {
        use std::fmt::Write as _;
        let ts = self.round_ms;
        let noise =
            |rng: &mut u64, spread: f64| (xorshift(rng) >> 11) as f64 / (1u64 << 53) as f64 * 2.0 * spread - spread;
        let rng = &mut self.rng;
        let m = &mut self.meters[self.next];
        let mut voltage = [0.0; 3];
        let mut current = [0.0; 3];
        let pf = (0.96 + noise(rng, 0.03)).min(1.0);
        let mut power_w = 0.0;
        for ph in 0..m.phases {
            voltage[ph] = 230.0 + noise(rng, 4.0);
            current[ph] = (m.load_a * (1.0 + noise(rng, 0.3))).max(0.0);
            power_w += voltage[ph] * current[ph] * pf;
        }
        let hours = self.interval_ms as f64 / 3_600_000.0;
        if m.solar && (xorshift(rng) % 4 == 0) {
            m.export_wh += 1500.0 * hours;
        } else {
            m.import_wh += power_w * hours;
        }
        m.seq += 1;
        let status = match xorshift(rng) % 1000 {
            0 => "tamper_check",
            1..=4 => "clock_drift",
            _ if voltage[0] < 226.5 => "low_voltage",
            _ => "ok",
        };
        let mut v = String::with_capacity(256);
        let list = |out: &mut String, xs: &[f64], decimals: usize| {
            out.push('[');
            for (i, x) in xs.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{x:.decimals$}");
            }
            out.push(']');
        };
        let _ = write!(
            v,
            "{{\"meter\":\"{}\",\"ts\":\"{}\",\"seq\":{},\"import_kwh\":{:.3},\"export_kwh\":{:.3},\"voltage_v\":",
            m.id,
            iso_time(ts),
            m.seq,
            m.import_wh / 1000.0,
            m.export_wh / 1000.0
        );
        list(&mut v, &voltage[..m.phases], 1);
        v.push_str(",\"current_a\":");
        list(&mut v, &current[..m.phases], 2);
        let _ =
            write!(v, ",\"power_factor\":{pf:.3},\"freq_hz\":{:.2},\"status\":\"{status}\"}}", 50.0 + noise(rng, 0.05));
        let mut record = tributary_broker::storage::batch::NewRecord::new(Some(m.id.clone()), v);
        record.timestamp_ms = Some(ts);
        self.next += 1;
        if self.next == self.meters.len() {
            self.next = 0;
            self.round_ms += self.interval_ms;
        }
        record
    }
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// `2026-11-22T10:15:03.250Z` for milliseconds since the epoch (proleptic Gregorian, UTC).
pub fn iso_time(ms: i64) -> String {
    let (days, ms_of_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let s = ms_of_day / 1000;
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z", s / 3600, s / 60 % 60, s % 60, ms_of_day % 1000)
}

/// One MQTT packet on the wire: `first` (type and flags), the remaining length as a variable
/// byte integer, then `body`.
pub fn mqtt_packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// Logs of a benchmark binary to stderr: `RUST_LOG` when set, else warnings and errors (a second
/// call is a no-op).
pub fn log_to_stderr() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_time_of_known_instants() {
        assert_eq!(iso_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso_time(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(iso_time(1_795_343_703_250), "2026-11-22T10:35:03.250Z");
    }

    #[test]
    fn meter_readings_are_json_of_the_promised_size_with_rising_counters() {
        let mut fleet = SmartMeters::new(0, 50, 7, 1_795_343_703_000, 1000);
        let mut sizes = Vec::new();
        let mut first = None;
        for _ in 0..500 {
            let r = fleet.next_reading();
            let v = r.value.clone().expect("value");
            let text = std::str::from_utf8(&v).expect("utf-8");
            assert!(text.starts_with("{\"meter\":\"SM-") && text.ends_with("\"}"), "{text}");
            sizes.push(v.len());
            if r.key.as_deref() == Some(&b"SM-0000003"[..]) {
                let kwh =
                    |t: &str| t.split("\"import_kwh\":").nth(1).and_then(|s| s.split(',').next()).map(str::to_string);
                let now = kwh(text).expect("import_kwh").parse::<f64>().expect("number");
                if let Some(before) = first {
                    assert!(now >= before, "counters never go back");
                }
                first = Some(now);
            }
        }
        let (min, max) = (sizes.iter().min().copied().unwrap_or(0), sizes.iter().max().copied().unwrap_or(0));
        assert!(min >= 150 && max <= 250, "readings of {min}-{max} bytes");
    }
}
