//! MQTT benchmark (issue 5): the same load against Tributary's MQTT listener, mosquitto and
//! rumqttd, in one invocation, each broker a child process started afresh for every scenario.
//!
//! - `qos1`: `--publishers` rumqttc clients each publish `--messages` messages of
//!   `--payload-bytes` bytes at QoS 1 to `bench/p<i>`, at most `--inflight` unacknowledged each;
//!   one rumqttc subscriber on `bench/#` at QoS 1. Acked rate (first publish to last PUBACK),
//!   delivered rate (first publish to last delivery), every message counted (losses, duplicates),
//!   publish-to-delivery latency (a send timestamp in the payload, taken when the message gets a
//!   slot in the publisher's in-flight window), broker peak RSS and CPU.
//! - `qos0`: the same at QoS 0 (publishers send as fast as their connection takes it; the
//!   timestamp is taken when the message is handed to the client); the subscriber at QoS 0.
//! - `idle`: RSS right after start, then with `--idle-connections` connected MQTT 3.1.1 clients
//!   that send nothing.
//! - `fleet` (issue 14): `--fleet-publishers` rumqttc clients (1,000) each publishing QoS 1
//!   messages of `--fleet-payload-bytes` (200) to their own topic at a steady rate, open loop: at
//!   each offered total rate of `--fleet-rates` (20,000 and 60,000 msg/s) for `--fleet-secs`,
//!   publishers' phases spread evenly. The timestamp is the message's scheduled send time, so a
//!   broker that falls behind shows it in the latency (no coordinated omission); one wildcard
//!   subscriber on `bench/#` at QoS 1. The fleet runs after the other scenarios, the brokers
//!   taking turns; `--fleet-repeat N` runs N such rounds and reports each round's p99 ratio to
//!   mosquitto's and their median (on a shared machine one run's p99 moves by more than the
//!   differences looked for). QoS 1 scenarios also report publish-to-PUBACK latency. The fleet
//!   also reports how late the benchmark's own publishers woke for their scheduled sends (its
//!   timers and the CPU it gets): that delay is in every latency above, for each broker alike,
//!   and a broker that takes more of the machine's CPU makes it larger.
//!
//! Before the clock starts, one short QoS 1 message on `bench/warmup` is acknowledged and
//! delivered (`--no-warmup` skips it), so the route's log topic exists and the subscriber reads
//! it. All clients set TCP_NODELAY (`--nagle` leaves it off). A scenario ends when every message
//! is acknowledged and delivered, after `--stall-secs` without progress, or after `--max-secs`;
//! CPU shares are taken up to the last progress, with what other processes used meanwhile (a
//! disturbed run shows there).
//!
//! Peers: Tributary is `tributary-under-test` with a fresh data directory under `--dir` and its
//! defaults (every QoS 1 PUBACK after fsync); mosquitto runs with persistence off and no limit
//! on queued messages (see `mosquitto_conf`); rumqttd is tests/bench/rumqttd (crates.io).
//!
//! Prints a Markdown table (absolute figures and ratios to mosquitto) for BENCHMARKS.md.
//!
//! ```sh
//! tests/bench/rumqttd/build.sh            # rumqttd from crates.io, outside the workspace
//! apt-get install -y mosquitto            # the system service need not run
//! cargo build --release -p tributary-tests --bin mqtt-bench --bin tributary-under-test
//! target/release/mqtt-bench --dir /var/tmp --peers tributary,mosquitto,rumqttd
//! ```

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use futures_util::StreamExt;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet, QoS, SubscribeReasonCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch, Semaphore};
use tributary_tests::{cpu_seconds, fsync_rate, status_kib, BenchGateway};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Peer {
    Tributary,
    Mosquitto,
    Rumqttd,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Tributary => "tributary",
            Peer::Mosquitto => "mosquitto",
            Peer::Rumqttd => "rumqttd",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Idle,
    Qos1,
    Qos0,
    Fleet,
}

#[derive(Debug, Parser)]
struct Args {
    /// Brokers to measure, in this order.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "tributary,mosquitto,rumqttd")]
    peers: Vec<Peer>,
    /// Scenarios to run against each broker.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "qos1,qos0,idle,fleet")]
    scenarios: Vec<Scenario>,
    /// Directory for the brokers' temporary files (Tributary's data directory is on this disk).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// The gateway binary (default: `tributary-under-test` next to this program).
    #[arg(long)]
    gateway: Option<PathBuf>,
    /// The mosquitto binary.
    #[arg(long, default_value = "mosquitto")]
    mosquitto: PathBuf,
    /// The rumqttd binary built by tests/bench/rumqttd/build.sh
    /// (default: $HOME/.cache/tributary-rumqttd-target/release/bench-rumqttd).
    #[arg(long)]
    rumqttd: Option<PathBuf>,
    #[arg(long, default_value_t = 4)]
    publishers: u32,
    /// Messages per publisher.
    #[arg(long, default_value_t = 50_000)]
    messages: u32,
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
    /// Unacknowledged QoS 1 publishes per publisher.
    #[arg(long, default_value_t = 64)]
    inflight: u16,
    #[arg(long, default_value_t = 1000)]
    idle_connections: u32,
    /// Publishers of the fleet scenario, each on its own connection.
    #[arg(long, default_value_t = 1000)]
    fleet_publishers: u32,
    /// Offered total rates of the fleet scenario (msg/s), one run each.
    #[arg(long, value_delimiter = ',', default_value = "20000,60000")]
    fleet_rates: Vec<u32>,
    /// Length of each fleet run.
    #[arg(long, default_value_t = 20)]
    fleet_secs: u32,
    /// Fleet runs per rate and broker, the brokers taking turns within each round, so a machine
    /// whose speed drifts meets them alike; with more than one, the median of each round's p99
    /// ratio to mosquitto's is reported below the table (which shows the first round).
    #[arg(long, default_value_t = 1)]
    fleet_repeat: u32,
    #[arg(long, default_value_t = 200)]
    fleet_payload_bytes: usize,
    /// A scenario ends when nothing was acknowledged or delivered for this long.
    #[arg(long, default_value_t = 10)]
    stall_secs: u64,
    /// And in any case after this long.
    #[arg(long, default_value_t = 60)]
    max_secs: u64,
    /// Skip the warm-up (one QoS 1 message on `bench/warmup`, acknowledged and delivered before
    /// the publishers start), so the publishers' first messages meet a broker that has not seen
    /// the topic yet.
    #[arg(long)]
    no_warmup: bool,
    /// The subscriber's QoS (default: the scenario's).
    #[arg(long)]
    subscriber_qos: Option<u8>,
    /// Leave Nagle's algorithm on in the benchmark's clients (default: TCP_NODELAY, as the brokers
    /// set it on their side).
    #[arg(long)]
    nagle: bool,
    /// Extra TOML tables for Tributary's configuration, for experiments (e.g.
    /// `[topic_defaults]` with `durability = "relaxed"` to see what the fsync costs); reported
    /// with the results.
    #[arg(long, default_value = "")]
    gateway_tables: String,
    /// The brokers' outbound window (unacknowledged QoS 1/2 messages to one client): Tributary's
    /// `mqtt.inflight_messages_max`, mosquitto's `max_inflight_messages` (default: `--inflight`).
    #[arg(long)]
    broker_inflight: Option<u16>,
}

/// Send timestamp (ns since the benchmark's clock base), publisher, sequence number.
const HEADER: usize = 16;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.payload_bytes < HEADER || args.fleet_payload_bytes < HEADER {
        bail!("--payload-bytes and --fleet-payload-bytes must be at least {HEADER}");
    }
    raise_fd_limit(u64::from(args.idle_connections.max(args.fleet_publishers)) + 1024);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let tmp = tempfile::tempdir_in(&args.dir).context("temporary directory")?;
    let fsyncs = fsync_rate(tmp.path(), Duration::from_secs(2))?;
    eprintln!("machine: {fsyncs:.0} fsync/s on {}", args.dir.display());

    let mut results: Vec<(Peer, PeerResult)> = Vec::new();
    for &peer in &args.peers {
        let mut r = PeerResult::default();
        for &scenario in &args.scenarios {
            // The fleet runs after every broker's other scenarios, the brokers taking turns.
            if scenario == Scenario::Fleet {
                continue;
            }
            eprintln!("{}: {scenario:?}", peer.name());
            // A failed scenario is reported and the others still run; the broker is killed on drop.
            let outcome = Broker::start(peer, &args, tmp.path()).and_then(|broker| match scenario {
                Scenario::Idle => rt.block_on(idle(&args, &broker)).map(|i| r.idle = Some(i)),
                Scenario::Qos1 => {
                    rt.block_on(flow(&args, &broker, &Spec::closed(&args, QoS::AtLeastOnce))).map(|f| r.qos1 = Some(f))
                }
                Scenario::Qos0 => {
                    rt.block_on(flow(&args, &broker, &Spec::closed(&args, QoS::AtMostOnce))).map(|f| r.qos0 = Some(f))
                }
                Scenario::Fleet => unreachable!("handled above"),
            });
            if let Err(e) = outcome {
                eprintln!("{} {scenario:?} failed: {e:#}", peer.name());
                r.errors.push(format!("{scenario:?} failed: {e:#}"));
            }
        }
        results.push((peer, r));
    }
    if args.scenarios.contains(&Scenario::Fleet) {
        for round in 1..=args.fleet_repeat.max(1) {
            for &offered in &args.fleet_rates {
                for (peer, r) in &mut results {
                    eprintln!("{}: fleet at {offered} msg/s, round {round}", peer.name());
                    let spec = Spec::fleet(&args, offered);
                    let outcome = Broker::start(*peer, &args, tmp.path())
                        .and_then(|broker| rt.block_on(flow(&args, &broker, &spec)))
                        .map(|f| r.fleet.push((offered, f)));
                    if let Err(e) = outcome {
                        eprintln!("{} fleet at {offered} msg/s failed: {e:#}", peer.name());
                        r.errors.push(format!("fleet at {offered} msg/s, round {round} failed: {e:#}"));
                    }
                }
            }
        }
    }
    print_table(&args, fsyncs, &results);
    if args.fleet_repeat > 1 {
        print_fleet_rounds(&args, &results);
    }
    Ok(())
}

fn raise_fd_limit(want: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current.is_some_and(|c| c < want) {
        l.current = Some(l.maximum.map_or(want, |m| m.min(want.max(65_536))));
        if let Err(e) = setrlimit(Resource::Nofile, l) {
            eprintln!("warning: cannot raise the open files limit: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Brokers

/// A broker child process, killed on drop (before its directory is removed).
struct Broker {
    _gateway: Option<BenchGateway>,
    child: Option<Child>,
    pid: String,
    port: u16,
    _dir: tempfile::TempDir,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(tributary_tests::free_ports(1)?[0])
}

/// Copies a child's log lines to our stderr (the first 20, then only a count).
fn forward_log(name: &'static str, lines: impl Iterator<Item = std::io::Result<String>> + Send + 'static) {
    std::thread::spawn(move || {
        let mut n = 0u64;
        for line in lines.map_while(Result::ok) {
            n += 1;
            if n <= 20 {
                eprintln!("  [{name}] {line}");
            }
        }
        if n > 20 {
            eprintln!("  [{name}] ... {} more log lines", n - 20);
        }
    });
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Broker {
    fn start(peer: Peer, args: &Args, base: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir_in(base)?;
        let (mut child, port) = match peer {
            Peer::Tributary => {
                // The gateway's defaults, except a disk budget no scenario comes near and room
                // for every idle connection (`mqtt.connections_max` is 1,024 by default).
                let connections = args.idle_connections.max(args.fleet_publishers) + 16;
                let mut mqtt = format!("connections_max = {}\n", connections.max(1024));
                if let Some(n) = args.broker_inflight {
                    mqtt.push_str(&format!("inflight_messages_max = {n}\n"));
                }
                let tables = args.gateway_tables.replace("\\n", "\n");
                let tables = if tables.is_empty() { tables } else { format!("{tables}\n") };
                let gateway = BenchGateway::start_with(args.gateway.as_deref(), dir.path(), "", "", &mqtt, &tables)?;
                let port = gateway.mqtt.rsplit(':').next().and_then(|p| p.parse().ok()).context("mqtt port")?;
                let pid = gateway.pid.clone();
                return Ok(Self { _gateway: Some(gateway), child: None, pid, port, _dir: dir });
            }
            Peer::Mosquitto => {
                let port = free_port()?;
                let config = dir.path().join("mosquitto.conf");
                std::fs::write(&config, mosquitto_conf(port, args.broker_inflight.unwrap_or(args.inflight)))?;
                let child = Command::new(&args.mosquitto)
                    .args(["-c", config.to_str().context("utf-8 path")?])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .with_context(|| format!("start {}", args.mosquitto.display()))?;
                (child, port)
            }
            Peer::Rumqttd => {
                let path = match &args.rumqttd {
                    Some(p) => p.clone(),
                    None => PathBuf::from(std::env::var("HOME").unwrap_or_default())
                        .join(".cache/tributary-rumqttd-target/release/bench-rumqttd"),
                };
                let port = free_port()?;
                let child = Command::new(&path)
                    .arg(port.to_string())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .with_context(|| {
                        format!("start {} (build it with tests/bench/rumqttd/build.sh)", path.display())
                    })?;
                (child, port)
            }
        };
        // Ready once the port accepts connections.
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                bail!("{} exited ({status}): {err}", peer.name());
            }
            if started.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} does not listen on port {port}", peer.name());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let stderr = child.stderr.take().context("stderr")?;
        forward_log(peer.name(), BufReader::new(stderr).lines());
        let pid = child.id().to_string();
        Ok(Self { _gateway: None, child: Some(child), pid, port, _dir: dir })
    }

    fn rss_kib(&self) -> u64 {
        status_kib(&self.pid, "VmRSS:")
    }
}

/// mosquitto 2.0 with persistence off, anonymous clients, no connection limit, the same outbound
/// in-flight window as the publishers use, and no limit on the per-client queue, so a subscriber
/// that falls behind gets every QoS 1 (and QoS 0) message instead of mosquitto dropping beyond
/// its default 1,000 queued messages.
fn mosquitto_conf(port: u16, inflight: u16) -> String {
    format!(
        "listener {port} 127.0.0.1\n\
         allow_anonymous true\n\
         persistence false\n\
         max_connections -1\n\
         max_inflight_messages {inflight}\n\
         max_queued_messages 0\n\
         max_queued_bytes 0\n\
         set_tcp_nodelay true\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n"
    )
}

// ---------------------------------------------------------------------------------------------
// Idle connections

#[derive(Debug, Clone)]
struct IdleResult {
    idle_kib: u64,
    connected: u32,
    refused: u32,
    with_connections_kib: u64,
    connect_secs: f64,
}

/// An MQTT 3.1.1 CONNECT (clean session, keep-alive 600 s) and its CONNACK.
async fn raw_connect(port: u16, client_id: &str) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    let id = client_id.as_bytes();
    let mut p = vec![0x10, (12 + id.len()) as u8, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0x02, 0x58];
    p.extend_from_slice(&(id.len() as u16).to_be_bytes());
    p.extend_from_slice(id);
    s.write_all(&p).await?;
    let mut ack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut ack)).await.context("CONNACK timeout")??;
    if ack != [0x20, 2, 0, 0] {
        bail!("CONNACK {ack:02x?}");
    }
    Ok(s)
}

async fn idle(args: &Args, broker: &Broker) -> anyhow::Result<IdleResult> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_kib = broker.rss_kib();
    let start = Instant::now();
    let port = broker.port;
    let results: Vec<anyhow::Result<TcpStream>> = futures_util::stream::iter(0..args.idle_connections)
        .map(|i| async move { raw_connect(port, &format!("idle-{i}")).await })
        .buffer_unordered(64)
        .collect()
        .await;
    let connect_secs = start.elapsed().as_secs_f64();
    let mut streams = Vec::new();
    let mut refused = 0;
    for r in results {
        match r {
            Ok(s) => streams.push(s),
            Err(e) => {
                if refused == 0 {
                    eprintln!("  idle connection failed: {e:#}");
                }
                refused += 1;
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let with_connections_kib = broker.rss_kib();
    for s in &mut streams {
        let _ = s.write_all(&[0xe0, 0]).await;
    }
    drop(streams);
    Ok(IdleResult { idle_kib, connected: args.idle_connections - refused, refused, with_connections_kib, connect_secs })
}

// ---------------------------------------------------------------------------------------------
// Publish / deliver

#[derive(Debug, Clone, Default)]
struct FlowResult {
    total: u64,
    /// QoS 1: PUBACKs received; QoS 0: publishes written.
    acked: u64,
    /// First publish to the last PUBACK (QoS 1) or the last publish written (QoS 0).
    acked_secs: f64,
    delivered: u64,
    duplicates: u64,
    /// First publish to the last delivery.
    delivered_secs: f64,
    lat_p50_ms: f64,
    lat_p99_ms: f64,
    lat_max_ms: f64,
    /// QoS 1: publish to its PUBACK (the same send timestamp as the delivery latency).
    ack_p50_ms: f64,
    ack_p99_ms: f64,
    /// Open loop: how late the publishers woke for their scheduled sends, p50 and p99 (NaN
    /// for closed-loop runs).
    late_p50_ms: f64,
    late_p99_ms: f64,
    broker_hwm_kib: u64,
    broker_cpu: f64,
    bench_cpu: f64,
    /// CPU the rest of the machine used meanwhile (other processes: a disturbed measurement).
    other_cpu: f64,
    notes: Vec<String>,
}

struct SubOutcome {
    latencies_ns: Vec<u64>,
    delivered: u64,
    duplicates: u64,
    last_ns: u64,
    /// Messages never delivered, per publisher, and the first few of them.
    missing: Vec<u64>,
    missing_first: Vec<(u32, u32)>,
    error: Option<String>,
}

struct PubOutcome {
    last_ns: u64,
    /// QoS 1: each message's send timestamp to its PUBACK.
    ack_latencies_ns: Vec<u64>,
    error: Option<String>,
}

/// A publisher's send timestamps, from its producer task to its event loop: pushed before each
/// QoS 1 publish is handed to the client, taken in the order the client writes them
/// (`Outgoing::Publish`, which names the packet id), so a PUBACK finds its own timestamp in any
/// order it comes.
#[derive(Default)]
struct SendStamps {
    queued: std::sync::Mutex<std::collections::VecDeque<u64>>,
}

impl SendStamps {
    fn push(&self, ns: u64) {
        if let Ok(mut q) = self.queued.lock() {
            q.push_back(ns);
        }
    }

    fn next(&self) -> Option<u64> {
        self.queued.lock().ok().and_then(|mut q| q.pop_front())
    }
}

/// A rumqttc client (clean session, keep-alive 60 s) and its event loop, `cap` requests queued.
fn mqtt_client(args: &Args, port: u16, id: &str, inflight: u16, cap: usize) -> (AsyncClient, EventLoop) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(60));
    o.set_clean_session(true);
    o.set_max_packet_size(1 << 20, 1 << 20);
    o.set_inflight(inflight);
    let (client, mut ev) = AsyncClient::new(o, cap);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(!args.nagle);
    ev.set_network_options(net);
    (client, ev)
}

#[allow(clippy::too_many_arguments)]
async fn subscriber(
    mut ev: EventLoop,
    client: AsyncClient,
    qos: QoS,
    publishers: u32,
    messages: u32,
    base: Instant,
    delivered: Arc<AtomicU64>,
    warmups: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
    ready: oneshot::Sender<anyhow::Result<()>>,
) -> SubOutcome {
    let total = u64::from(publishers) * u64::from(messages);
    let mut seen = vec![vec![false; messages as usize]; publishers as usize];
    let mut out = SubOutcome {
        latencies_ns: Vec::with_capacity(total as usize),
        delivered: 0,
        duplicates: 0,
        last_ns: 0,
        missing: vec![0; publishers as usize],
        missing_first: Vec::new(),
        error: None,
    };
    let mut ready = Some(ready);
    while out.delivered < total {
        let event = tokio::select! {
            e = ev.poll() => e,
            _ = stop.changed() => break,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if let Err(e) = client.subscribe("bench/#", qos).await {
                    out.error = Some(format!("subscribe: {e}"));
                    break;
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let granted = ack.return_codes.first().cloned();
                let result = match granted {
                    Some(SubscribeReasonCode::Success(g)) if g == qos => Ok(()),
                    other => Err(anyhow::anyhow!("subscription answered {other:?}")),
                };
                if let Some(r) = ready.take() {
                    let _ = r.send(result);
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let now = base.elapsed().as_nanos() as u64;
                if p.payload.len() < HEADER {
                    warmups.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let ts = u64::from_be_bytes(p.payload[0..8].try_into().unwrap_or_default());
                let publisher = u32::from_be_bytes(p.payload[8..12].try_into().unwrap_or_default());
                let seq = u32::from_be_bytes(p.payload[12..16].try_into().unwrap_or_default());
                let Some(slot) = seen.get_mut(publisher as usize).and_then(|s| s.get_mut(seq as usize)) else {
                    continue;
                };
                if *slot {
                    out.duplicates += 1;
                    continue;
                }
                *slot = true;
                out.delivered += 1;
                out.last_ns = now;
                out.latencies_ns.push(now.saturating_sub(ts));
                delivered.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => {
                out.error = Some(format!("subscriber connection: {e}"));
                break;
            }
        }
    }
    if let Some(r) = ready.take() {
        let _ = r.send(Err(anyhow::anyhow!("subscriber ended before SUBACK: {:?}", out.error)));
    }
    for (p, s) in seen.iter().enumerate() {
        for (q, &got) in s.iter().enumerate() {
            if !got {
                out.missing[p] += 1;
                if out.missing_first.len() < 5 {
                    out.missing_first.push((p as u32, q as u32));
                }
            }
        }
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(e) = ev.poll().await {
            if e == Event::Outgoing(Outgoing::Disconnect) {
                break;
            }
        }
    })
    .await;
    out
}

#[allow(clippy::too_many_arguments)]
async fn publisher_events(
    mut ev: EventLoop,
    client: AsyncClient,
    qos: QoS,
    messages: u32,
    base: Instant,
    window: Arc<Semaphore>,
    stamps: Arc<SendStamps>,
    done: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
    connected: oneshot::Sender<()>,
) -> PubOutcome {
    let mut out = PubOutcome { last_ns: 0, ack_latencies_ns: Vec::new(), error: None };
    // Packet id -> send timestamp of the publish in flight under it.
    let mut in_flight: HashMap<u16, u64> = HashMap::new();
    let mut connected = Some(connected);
    let mut n = 0u32;
    loop {
        let event = tokio::select! {
            e = ev.poll() => e,
            _ = stop.changed() => break,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if let Some(c) = connected.take() {
                    let _ = c.send(());
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) if qos == QoS::AtLeastOnce => {
                if let Some(ns) = stamps.next() {
                    in_flight.insert(pkid, ns);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) if qos == QoS::AtLeastOnce => {
                window.add_permits(1);
                n += 1;
                out.last_ns = base.elapsed().as_nanos() as u64;
                if let Some(sent) = in_flight.remove(&ack.pkid) {
                    out.ack_latencies_ns.push(out.last_ns.saturating_sub(sent));
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Event::Outgoing(Outgoing::Publish(_))) if qos == QoS::AtMostOnce => {
                n += 1;
                out.last_ns = base.elapsed().as_nanos() as u64;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => {
                out.error = Some(format!("publisher connection after {n} of {messages}: {e}"));
                break;
            }
        }
        // Keep reading (PINGRESP, late acks) until told to stop, so the broker never sees a
        // publisher leave before the subscriber is done.
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(e) = ev.poll().await {
            if e == Event::Outgoing(Outgoing::Disconnect) {
                break;
            }
        }
    })
    .await;
    out
}

/// One short QoS 1 message on `bench/warmup`, acknowledged and then delivered to the subscriber
/// (which counts it apart): the route's log topic exists and the subscriber reads it before the
/// clock starts.
async fn warm_up(args: &Args, port: u16, warmups: &AtomicU64) -> anyhow::Result<()> {
    let (client, mut ev) = mqtt_client(args, port, "bench-warmup", 1, 4);
    client.publish("bench/warmup", QoS::AtLeastOnce, false, vec![0u8]).await?;
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::PubAck(_)) = ev.poll().await? {
                return anyhow::Ok(());
            }
        }
    })
    .await
    .context("no PUBACK")??;
    client.disconnect().await?;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(e) = ev.poll().await {
            if e == Event::Outgoing(Outgoing::Disconnect) {
                break;
            }
        }
    })
    .await;
    let start = Instant::now();
    while warmups.load(Ordering::Relaxed) == 0 {
        if start.elapsed() > Duration::from_secs(10) {
            bail!("the subscriber did not receive the warm-up message within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// CPU time all cores spent busy (not idle or waiting for I/O), from `/proc/stat`, in seconds.
fn machine_busy_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else { return 0.0 };
    let Some(line) = stat.lines().next() else { return 0.0 };
    // cpu user nice system idle iowait irq softirq (steal: other machines)
    let v: Vec<f64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let busy: f64 = v.iter().take(7).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, x)| x).sum();
    busy / 100.0
}

/// How late open-loop publishers woke for their scheduled sends: counts in `LATENESS_STEP_NS`
/// steps up to `LATENESS_STEPS` (later ones in the last), shared by every publisher of a run
/// without a lock.
struct Lateness(Vec<AtomicU64>);

const LATENESS_STEP_NS: u64 = 10_000;
const LATENESS_STEPS: usize = 10_000;

impl Lateness {
    fn new() -> Self {
        Self((0..LATENESS_STEPS).map(|_| AtomicU64::new(0)).collect())
    }

    fn record(&self, late: Duration) {
        let step = (late.as_nanos() / u128::from(LATENESS_STEP_NS)).min(LATENESS_STEPS as u128 - 1) as usize;
        self.0[step].fetch_add(1, Ordering::Relaxed);
    }

    /// The `p` quantile in ms (the upper edge of its step); NaN if nothing was recorded.
    fn quantile_ms(&self, p: f64) -> f64 {
        let counts: Vec<u64> = self.0.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return f64::NAN;
        }
        let want = ((total as f64) * p).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (step, n) in counts.iter().enumerate() {
            seen += n;
            if seen >= want {
                return ((step as u64 + 1) * LATENESS_STEP_NS) as f64 / 1e6;
            }
        }
        f64::NAN
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1e6
}

/// What a publish/deliver run sends.
struct Spec {
    qos: QoS,
    publishers: u32,
    /// Messages per publisher.
    messages: u32,
    payload_bytes: usize,
    /// Messages per second per publisher, open loop; `None`: as fast as the window allows.
    rate_per_publisher: Option<f64>,
}

impl Spec {
    fn closed(args: &Args, qos: QoS) -> Self {
        Self {
            qos,
            publishers: args.publishers,
            messages: args.messages,
            payload_bytes: args.payload_bytes,
            rate_per_publisher: None,
        }
    }

    fn fleet(args: &Args, offered: u32) -> Self {
        let per = f64::from(offered) / f64::from(args.fleet_publishers.max(1));
        Self {
            qos: QoS::AtLeastOnce,
            publishers: args.fleet_publishers,
            messages: (per * f64::from(args.fleet_secs)).ceil().max(1.0) as u32,
            payload_bytes: args.fleet_payload_bytes,
            rate_per_publisher: Some(per),
        }
    }
}

async fn flow(args: &Args, broker: &Broker, spec: &Spec) -> anyhow::Result<FlowResult> {
    let qos = spec.qos;
    let base = Instant::now();
    let total = u64::from(spec.publishers) * u64::from(spec.messages);
    let (stop_tx, stop_rx) = watch::channel(false);

    // The subscriber first, subscribed before anything is published.
    let delivered = Arc::new(AtomicU64::new(0));
    let warmups = Arc::new(AtomicU64::new(0));
    let sub_qos = match args.subscriber_qos {
        None => qos,
        Some(0) => QoS::AtMostOnce,
        Some(1) => QoS::AtLeastOnce,
        Some(q) => bail!("--subscriber-qos {q}: 0 or 1"),
    };
    let (client, ev) = mqtt_client(args, broker.port, "bench-sub", args.inflight, 64);
    let (ready_tx, ready_rx) = oneshot::channel();
    let sub = tokio::spawn(subscriber(
        ev,
        client,
        sub_qos,
        spec.publishers,
        spec.messages,
        base,
        delivered.clone(),
        warmups.clone(),
        stop_rx.clone(),
        ready_tx,
    ));
    tokio::time::timeout(Duration::from_secs(10), ready_rx).await.context("SUBACK timeout")??.context("subscribe")?;
    if !args.no_warmup {
        warm_up(args, broker.port, &warmups).await.context("warm-up")?;
    }

    // Publishers: connected before the clock starts.
    let done = Arc::new(AtomicU64::new(0));
    let lateness = Arc::new(Lateness::new());
    let (go_tx, go_rx) = watch::channel(false);
    let mut events = Vec::new();
    let mut producers = Vec::new();
    for i in 0..spec.publishers {
        // QoS 1: the window is ours, so the timestamp is taken when a slot is free and the message
        // goes straight out; rumqttc's own limit is the same and never the one that waits.
        let window = Arc::new(Semaphore::new(usize::from(args.inflight)));
        let stamps = Arc::new(SendStamps::default());
        let (client, ev) = mqtt_client(args, broker.port, &format!("bench-pub-{i}"), args.inflight, 16);
        let (conn_tx, conn_rx) = oneshot::channel();
        events.push(tokio::spawn(publisher_events(
            ev,
            client.clone(),
            qos,
            spec.messages,
            base,
            window.clone(),
            stamps.clone(),
            done.clone(),
            stop_rx.clone(),
            conn_tx,
        )));
        tokio::time::timeout(Duration::from_secs(10), conn_rx)
            .await
            .context("CONNACK timeout")?
            .context("publisher connection")?;
        let mut go = go_rx.clone();
        let (messages, payload_bytes, per_s) = (spec.messages, spec.payload_bytes, spec.rate_per_publisher);
        // Open loop: publisher i starts i/n of a period late, so the fleet's sends are spread.
        let phase = f64::from(i) / f64::from(spec.publishers.max(1));
        let lateness = lateness.clone();
        producers.push(tokio::spawn(async move {
            let _ = go.wait_for(|g| *g).await;
            let go_at = Instant::now();
            let topic = format!("bench/p{i}");
            for seq in 0..messages {
                let stamp = match per_s {
                    Some(r) => {
                        let at = go_at + Duration::from_secs_f64((f64::from(seq) + phase) / r);
                        tokio::time::sleep_until(at.into()).await;
                        // Before the window: only the benchmark's own delay (timer, CPU).
                        lateness.record(at.elapsed());
                        at
                    }
                    None => Instant::now(),
                };
                if qos == QoS::AtLeastOnce {
                    window.acquire().await?.forget();
                }
                let stamp = if per_s.is_some() { stamp } else { Instant::now() };
                let stamp_ns = stamp.duration_since(base).as_nanos() as u64;
                let mut payload = vec![0u8; payload_bytes];
                payload[0..8].copy_from_slice(&stamp_ns.to_be_bytes());
                payload[8..12].copy_from_slice(&i.to_be_bytes());
                payload[12..16].copy_from_slice(&seq.to_be_bytes());
                if qos == QoS::AtLeastOnce {
                    stamps.push(stamp_ns);
                }
                client.publish_bytes(topic.clone(), qos, false, Bytes::from(payload)).await?;
            }
            anyhow::Ok(())
        }));
    }

    let cpu_pid = broker.pid.clone();
    let broker_cpu0 = cpu_seconds(&cpu_pid);
    let machine_cpu0 = machine_busy_seconds();
    let bench_cpu0 = cpu_seconds("self");
    let start = Instant::now();
    let start_ns = base.elapsed().as_nanos() as u64;
    let _ = go_tx.send(true);
    let mut last = (0, 0);
    let mut progress_at = Instant::now();
    // CPU use up to the last progress, so a stall's wait does not dilute it.
    let mut cpu_at_progress = (broker_cpu0, bench_cpu0, machine_cpu0, 0.0);
    let mut notes = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = (done.load(Ordering::Relaxed), delivered.load(Ordering::Relaxed));
        if now != last {
            last = now;
            progress_at = Instant::now();
            cpu_at_progress =
                (cpu_seconds(&cpu_pid), cpu_seconds("self"), machine_busy_seconds(), start.elapsed().as_secs_f64());
        }
        if now.0 >= total && now.1 >= total {
            break;
        }
        if progress_at.elapsed() > Duration::from_secs(args.stall_secs) {
            notes.push(format!(
                "stalled: no progress for {} s at {} acked, {} delivered of {total}",
                args.stall_secs, now.0, now.1
            ));
            break;
        }
        if start.elapsed() > Duration::from_secs(args.max_secs) {
            notes.push(format!("stopped after {} s at {} acked, {} delivered of {total}", args.max_secs, now.0, now.1));
            break;
        }
    }
    let wall = cpu_at_progress.3;
    let broker_cpu = (cpu_at_progress.0 - broker_cpu0) / wall;
    let bench_cpu = (cpu_at_progress.1 - bench_cpu0) / wall;
    let other_cpu = ((cpu_at_progress.2 - machine_cpu0) / wall - broker_cpu - bench_cpu).max(0.0);
    let broker_hwm_kib = status_kib(&broker.pid, "VmHWM:");
    let _ = stop_tx.send(true);
    for p in producers {
        p.abort();
    }
    let mut acked_ns = 0;
    let mut ack_latencies_ns = Vec::new();
    for e in events {
        let mut o = e.await?;
        acked_ns = acked_ns.max(o.last_ns);
        ack_latencies_ns.append(&mut o.ack_latencies_ns);
        if let Some(err) = o.error {
            notes.push(err);
        }
    }
    let mut s = sub.await?;
    if let Some(err) = s.error.take() {
        notes.push(err);
    }
    if s.delivered < total {
        let first: Vec<String> = s.missing_first.iter().map(|(p, q)| format!("p{p}#{q}")).collect();
        notes.push(format!(
            "{} not delivered by the end (per publisher {:?}; the first: {})",
            total - s.delivered,
            s.missing,
            first.join(", ")
        ));
    }
    s.latencies_ns.sort_unstable();
    ack_latencies_ns.sort_unstable();
    let acked = done.load(Ordering::Relaxed);
    Ok(FlowResult {
        total,
        acked,
        acked_secs: acked_ns.saturating_sub(start_ns) as f64 / 1e9,
        delivered: s.delivered,
        duplicates: s.duplicates,
        delivered_secs: s.last_ns.saturating_sub(start_ns) as f64 / 1e9,
        lat_p50_ms: percentile(&s.latencies_ns, 0.50),
        lat_p99_ms: percentile(&s.latencies_ns, 0.99),
        lat_max_ms: percentile(&s.latencies_ns, 1.0),
        ack_p50_ms: percentile(&ack_latencies_ns, 0.50),
        ack_p99_ms: percentile(&ack_latencies_ns, 0.99),
        late_p50_ms: lateness.quantile_ms(0.50),
        late_p99_ms: lateness.quantile_ms(0.99),
        broker_hwm_kib,
        broker_cpu,
        bench_cpu,
        other_cpu,
        notes,
    })
}

// ---------------------------------------------------------------------------------------------
// Report

#[derive(Debug, Default)]
struct PeerResult {
    errors: Vec<String>,
    idle: Option<IdleResult>,
    qos1: Option<FlowResult>,
    qos0: Option<FlowResult>,
    /// Fleet runs: (offered msg/s, result).
    fleet: Vec<(u32, FlowResult)>,
}

/// A table row: per peer a display text and, when comparable, a number.
struct Row {
    label: String,
    cells: Vec<(String, Option<f64>)>,
}

fn rate(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        f64::NAN
    }
}

fn flow_rows(
    label: &str,
    qos1: bool,
    open_loop: bool,
    results: &[(Peer, PeerResult)],
    get: impl Fn(&PeerResult) -> Option<&FlowResult>,
) -> Vec<Row> {
    type Cell = fn(&FlowResult) -> (String, Option<f64>);
    let acked: (&str, Cell) = if qos1 {
        ("acked rate, first publish to last PUBACK (msg/s)", |f| {
            let r = rate(f.acked, f.acked_secs);
            (format!("**{r:.0}**"), Some(r))
        })
    } else {
        ("sent rate, first to last publish written (msg/s)", |f| {
            let r = rate(f.acked, f.acked_secs);
            (format!("{r:.0}"), Some(r))
        })
    };
    let mut cells: Vec<(&str, Cell)> = vec![
        acked,
        ("delivered rate, first publish to last delivery (msg/s)", |f| {
            let r = rate(f.delivered, f.delivered_secs);
            (format!("**{r:.0}**"), Some(r))
        }),
        ("delivered / published (duplicates)", |f| {
            (format!("{} / {} ({})", f.delivered, f.total, f.duplicates), Some(f.delivered as f64))
        }),
        ("latency p50 (ms)", |f| (format!("{:.1}", f.lat_p50_ms), Some(f.lat_p50_ms))),
        ("latency p99 (ms)", |f| (format!("{:.1}", f.lat_p99_ms), Some(f.lat_p99_ms))),
        ("latency max (ms)", |f| (format!("{:.0}", f.lat_max_ms), None)),
        ("broker peak RSS, VmHWM (MiB)", |f| {
            let m = f.broker_hwm_kib as f64 / 1024.0;
            (format!("{m:.1}"), Some(m))
        }),
        ("CPU of broker / bench / other processes (% of one core)", |f| {
            (format!("{:.0}% / {:.0}% / {:.0}%", f.broker_cpu * 100.0, f.bench_cpu * 100.0, f.other_cpu * 100.0), None)
        }),
    ];
    if qos1 {
        // After the delivery latencies: where the PUBACK comes relative to the delivery shows
        // whether a tail is before the commit (both late) or after it (only the delivery).
        let at = cells.iter().position(|(l, _)| l.starts_with("latency max")).map_or(cells.len(), |i| i + 1);
        let ack: [(&str, Cell); 2] = [
            ("publish to PUBACK latency p50 (ms)", |f| (format!("{:.1}", f.ack_p50_ms), Some(f.ack_p50_ms))),
            ("publish to PUBACK latency p99 (ms)", |f| (format!("{:.1}", f.ack_p99_ms), Some(f.ack_p99_ms))),
        ];
        cells.splice(at..at, ack);
    }
    if open_loop {
        // After the latencies: the part of them that is the benchmark's own.
        let at = cells.iter().position(|(l, _)| l.starts_with("broker peak RSS")).unwrap_or(cells.len());
        let late: (&str, Cell) = ("benchmark's publishers late for their scheduled sends, p50 / p99 (ms)", |f| {
            (format!("{:.2} / {:.2}", f.late_p50_ms, f.late_p99_ms), None)
        });
        cells.insert(at, late);
    }
    cells
        .into_iter()
        .map(|(name, cell)| Row {
            label: format!("{label}: {name}"),
            cells: results.iter().map(|(_, r)| get(r).map_or((String::from("-"), None), &cell)).collect(),
        })
        .collect()
}

/// With `--fleet-repeat`: each round's p50/p99 delivery latency and p99 PUBACK latency per broker and its p99 ratio to
/// mosquitto's in the same round, then the median of those ratios (rounds where a broker failed
/// are left out of its median).
fn print_fleet_rounds(args: &Args, results: &[(Peer, PeerResult)]) {
    let mosq = results.iter().position(|(p, _)| *p == Peer::Mosquitto);
    for &offered in &args.fleet_rates {
        // Each broker's runs at this rate, in round order.
        let runs: Vec<Vec<&FlowResult>> = results
            .iter()
            .map(|(_, r)| r.fleet.iter().filter(|(o, _)| *o == offered).map(|(_, f)| f).collect())
            .collect();
        println!(
            "\nfleet at {offered} msg/s, {} rounds (delivery latency p50 / p99, PUBACK latency p99; in brackets the p99 of how late the benchmark's publishers woke for their sends; ms):\n",
            args.fleet_repeat
        );
        let mut header = String::from("| round |");
        let mut line = String::from("|---|");
        for (p, _) in results {
            header.push_str(&format!(" {} |", p.name()));
            line.push_str("---|");
            if mosq.is_some() && *p != Peer::Mosquitto {
                header.push_str(&format!(" {} p99 / mosquitto |", p.name()));
                line.push_str("---|");
            }
        }
        println!("{header}\n{line}");
        let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); results.len()];
        for round in 0..args.fleet_repeat as usize {
            let mut out = format!("| {} |", round + 1);
            for (i, (p, _)) in results.iter().enumerate() {
                let run = runs[i].get(round);
                match run {
                    Some(f) => out.push_str(&format!(
                        " {:.1} / {:.1}, {:.1} ({:.1}) |",
                        f.lat_p50_ms, f.lat_p99_ms, f.ack_p99_ms, f.late_p99_ms
                    )),
                    None => out.push_str(" - |"),
                }
                if mosq.is_some() && *p != Peer::Mosquitto {
                    match (run, mosq.and_then(|m| runs[m].get(round))) {
                        (Some(a), Some(b)) if b.lat_p99_ms > 0.0 => {
                            let x = a.lat_p99_ms / b.lat_p99_ms;
                            ratios[i].push(x);
                            out.push_str(&format!(" {x:.2}x |"));
                        }
                        _ => out.push_str(" - |"),
                    }
                }
            }
            println!("{out}");
        }
        for ((p, _), x) in results.iter().zip(&mut ratios) {
            if x.is_empty() {
                continue;
            }
            x.sort_by(f64::total_cmp);
            let n = x.len();
            let median = if n % 2 == 1 { x[n / 2] } else { (x[n / 2 - 1] + x[n / 2]) / 2.0 };
            println!(
                "\n{} p99 / mosquitto's over {n} rounds: median {median:.2}x (from {:.2}x to {:.2}x)",
                p.name(),
                x[0],
                x[n - 1]
            );
        }
    }
}

fn print_table(args: &Args, fsyncs: f64, results: &[(Peer, PeerResult)]) {
    let mut rows = Vec::new();
    let n = args.publishers as u64 * args.messages as u64;
    rows.extend(flow_rows(&format!("QoS 1, {n} msgs"), true, false, results, |r| r.qos1.as_ref()));
    rows.extend(flow_rows(&format!("QoS 0, {n} msgs"), false, false, results, |r| r.qos0.as_ref()));
    for &offered in &args.fleet_rates {
        let label = format!(
            "fleet of {} QoS 1 publishers, {} B, {offered} msg/s offered for {} s",
            args.fleet_publishers, args.fleet_payload_bytes, args.fleet_secs
        );
        rows.extend(flow_rows(&label, true, true, results, move |r| {
            r.fleet.iter().find(|(o, _)| *o == offered).map(|(_, f)| f)
        }));
    }
    let idle_cell = |r: &PeerResult, f: fn(&IdleResult) -> (String, Option<f64>)| {
        r.idle.as_ref().map_or((String::from("-"), None), f)
    };
    rows.push(Row {
        label: "idle RSS right after start (MiB)".into(),
        cells: results
            .iter()
            .map(|(_, r)| {
                idle_cell(r, |i| {
                    let m = i.idle_kib as f64 / 1024.0;
                    (format!("**{m:.1}**"), Some(m))
                })
            })
            .collect(),
    });
    rows.push(Row {
        label: format!("RSS with {} idle MQTT connections (MiB)", args.idle_connections),
        cells: results
            .iter()
            .map(|(_, r)| {
                idle_cell(r, |i| {
                    let m = i.with_connections_kib as f64 / 1024.0;
                    let refused = if i.refused > 0 { format!(", {} refused", i.refused) } else { String::new() };
                    (format!("**{m:.1}** ({} connected in {:.2} s{refused})", i.connected, i.connect_secs), Some(m))
                })
            })
            .collect(),
    });
    rows.push(Row {
        label: "memory per idle connection (KiB)".into(),
        cells: results
            .iter()
            .map(|(_, r)| {
                idle_cell(r, |i| {
                    let k = (i.with_connections_kib as f64 - i.idle_kib as f64) / f64::from(i.connected.max(1));
                    (format!("{k:.1}"), Some(k))
                })
            })
            .collect(),
    });

    let mosq = results.iter().position(|(p, _)| *p == Peer::Mosquitto);
    println!(
        "{} publishers x {} msgs x {} B, QoS 1 window {} per publisher, 1 subscriber on `bench/#`; machine fsync rate {fsyncs:.0}/s",
        args.publishers, args.messages, args.payload_bytes, args.inflight
    );
    if let Some(q) = args.subscriber_qos {
        println!("(the subscriber at QoS {q} in every scenario)");
    }
    if let Some(n) = args.broker_inflight {
        println!("(the brokers' outbound window: {n} messages)");
    }
    if !args.gateway_tables.is_empty() {
        println!("(Tributary's configuration with: {})", args.gateway_tables);
    }
    println!();
    let mut header = String::from("| measurement |");
    let mut line = String::from("|---|");
    for (p, _) in results {
        header.push_str(&format!(" {} |", p.name()));
        line.push_str("---|");
    }
    if let Some(m) = mosq {
        for (i, (p, _)) in results.iter().enumerate() {
            if i != m {
                header.push_str(&format!(" {} / mosquitto |", p.name()));
                line.push_str("---|");
            }
        }
    }
    println!("{header}");
    println!("{line}");
    for row in rows.into_iter().filter(|r| r.cells.iter().any(|(t, _)| t != "-")) {
        let mut out = format!("| {} |", row.label);
        for (text, _) in &row.cells {
            out.push_str(&format!(" {text} |"));
        }
        if let Some(m) = mosq {
            for i in 0..row.cells.len() {
                if i == m {
                    continue;
                }
                let ratio = match (row.cells[i].1, row.cells[m].1) {
                    (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => format!("{:.2}x", a / b),
                    _ => String::from("-"),
                };
                out.push_str(&format!(" {ratio} |"));
            }
        }
        println!("{out}");
    }
    for (p, r) in results {
        for e in &r.errors {
            println!("\n- {}: {e}", p.name());
        }
        for (name, f) in [("QoS 1", &r.qos1), ("QoS 0", &r.qos0)] {
            if let Some(f) = f {
                for note in &f.notes {
                    println!("\n- {} {name}: {note}", p.name());
                }
            }
        }
        for (offered, f) in &r.fleet {
            for note in &f.notes {
                println!("\n- {} fleet at {offered} msg/s: {note}", p.name());
            }
        }
    }
}
