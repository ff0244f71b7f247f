//! Apache Kafka beside Tributary: finds the jars `tests/kafka/fetch-jars.sh` put in a cache
//! outside the clone, formats KRaft storage and runs one broker or a cluster of combined
//! broker+controller nodes (one JVM each) on free loopback ports in a temp dir, waits until the
//! cluster serves (metadata lists every broker), kills and restarts a node on demand, and stops
//! every JVM it started when dropped. Used by the end-to-end tests, the interop script's Java
//! tools (through [`KafkaJars::java`]) and the benchmarks.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::metadata::Metadata;

/// The Apache Kafka release `tests/kafka/fetch-jars.sh` fetches by default (keep the two equal).
pub const KAFKA_VERSION: &str = "4.1.1";

/// The command that fetches the jars, named in every error about them.
pub const FETCH_COMMAND: &str = "bash tests/kafka/fetch-jars.sh";

/// Runs the fetch script once per test process (tests that need Kafka run in parallel; the
/// script's temporary directory is not for two at once), so `cargo test --workspace` works on a
/// fresh machine that has Java 17 and Maven. Its output goes to stderr; a failure names it.
fn fetch_jars(cache: &Path) -> anyhow::Result<()> {
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _once = FETCH.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if cache.join(KAFKA_VERSION).join("lib").join(".complete").exists() {
        return Ok(());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("kafka/fetch-jars.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("TRIBUTARY_KAFKA_CACHE", cache)
        .stdout(Stdio::null())
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    ensure!(
        out.status.success(),
        "`{FETCH_COMMAND}` failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A directory holding Apache Kafka's jars and the quiet log4j2 configuration beside them.
#[derive(Debug, Clone)]
pub struct KafkaJars {
    pub dir: PathBuf,
}

impl KafkaJars {
    /// `TRIBUTARY_KAFKA_JARS` when set, else `~/.cache/tributary-kafka-jars/<KAFKA_VERSION>/lib`
    /// (`TRIBUTARY_KAFKA_CACHE` instead of `~/.cache/tributary-kafka-jars`), running the fetch
    /// script first if it has not completed there. An error (never a silent skip) names the
    /// command that fetches them.
    pub fn locate() -> anyhow::Result<Self> {
        let dir = match std::env::var_os("TRIBUTARY_KAFKA_JARS") {
            Some(d) => PathBuf::from(d),
            None => {
                let home = std::env::var_os("HOME").context("HOME is not set")?;
                let cache = std::env::var_os("TRIBUTARY_KAFKA_CACHE")
                    .map_or_else(|| PathBuf::from(home).join(".cache/tributary-kafka-jars"), PathBuf::from);
                let dir = cache.join(KAFKA_VERSION).join("lib");
                if !dir.join(".complete").exists() {
                    fetch_jars(&cache)?;
                }
                ensure!(
                    dir.join(".complete").exists(),
                    "Apache Kafka {KAFKA_VERSION}'s jars are not in {}: run `{FETCH_COMMAND}` once (Maven and Java 17 \
                     needed), or set TRIBUTARY_KAFKA_JARS to a directory of Kafka jars",
                    dir.display()
                );
                dir
            }
        };
        let has_broker = std::fs::read_dir(&dir)
            .with_context(|| format!("read {} (TRIBUTARY_KAFKA_JARS; `{FETCH_COMMAND}` fetches them)", dir.display()))?
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().starts_with("kafka_2.13-"));
        ensure!(has_broker, "no kafka_2.13-*.jar in {}: run `{FETCH_COMMAND}`", dir.display());
        Ok(Self { dir })
    }

    /// `java` with these jars on the class path, a heap of `heap_mb` and the log configuration
    /// (warnings and errors on stderr); the caller adds the main class and its arguments.
    pub fn java(&self, heap_mb: u32) -> Command {
        let java = std::env::var_os("TRIBUTARY_JAVA").unwrap_or_else(|| "java".into());
        let mut cmd = Command::new(java);
        cmd.arg(format!("-Xmx{heap_mb}m"))
            .arg("-XX:+ExitOnOutOfMemoryError")
            .arg("-Djava.awt.headless=true")
            .arg(format!("-Dlog4j2.configurationFile={}", self.dir.join("log4j2.properties").display()))
            .arg("-cp")
            .arg(format!("{}/*", self.dir.display()));
        cmd
    }

    /// Runs a short-lived tool class (`StorageTool`, `TopicCommand`, ...) to completion with a
    /// small heap and the fast-starting JIT; its stdout, or an error with its output.
    pub fn tool(&self, class: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .java(128)
            .args(["-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", class])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("run java {class}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            out.status.success(),
            "java {class} {args:?}: {}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(stdout)
    }
}

/// How to run the cluster.
#[derive(Debug, Clone)]
pub struct KafkaOptions {
    /// Combined broker+controller nodes (1 or 3 in practice; every node is a voter).
    pub nodes: usize,
    /// Heap of each node's JVM (min = max).
    pub heap_mb: u32,
    /// Test mode: serial GC and the C1 JIT only (starts faster, costs the shared cores less);
    /// off for benchmarks, which want the JVM's defaults.
    pub light_jvm: bool,
    /// Further `server.properties` lines (override the defaults below), e.g.
    /// `log.flush.interval.messages=1`.
    pub properties: Vec<(String, String)>,
    /// How long start and restart wait for the cluster to serve.
    pub ready_timeout: Duration,
    /// Where the cluster's temp dir goes (default: the system's temp dir); benchmarks put it on
    /// the disk under test.
    pub parent_dir: Option<PathBuf>,
}

impl Default for KafkaOptions {
    fn default() -> Self {
        Self {
            nodes: 1,
            heap_mb: 256,
            light_jvm: true,
            properties: Vec::new(),
            ready_timeout: Duration::from_secs(90),
            parent_dir: None,
        }
    }
}

impl KafkaOptions {
    pub fn cluster(nodes: usize) -> Self {
        Self { nodes, ..Self::default() }
    }
}

#[derive(Debug)]
struct Node {
    id: i32,
    port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running Apache Kafka cluster in a temp dir. Dropping it kills every node it started.
#[derive(Debug)]
pub struct KafkaCluster {
    jars: KafkaJars,
    opts: KafkaOptions,
    nodes: Vec<Node>,
    /// How long [`KafkaCluster::start`] took: storage formats plus JVM starts plus the first
    /// metadata answer with every broker.
    pub started_in: Duration,
    dir: tempfile::TempDir,
}

impl KafkaCluster {
    /// Formats and starts `opts.nodes` nodes; returns once metadata lists every broker.
    pub fn start(opts: KafkaOptions) -> anyhow::Result<Self> {
        let jars = KafkaJars::locate()?;
        Self::start_with(jars, opts)
    }

    /// Starts on fresh ports and a fresh directory, again (up to three times in all) when a node
    /// could not bind its port: another process on this machine may take a chosen port before
    /// the JVM binds it, and that is the harness's race, not a test result.
    pub fn start_with(jars: KafkaJars, opts: KafkaOptions) -> anyhow::Result<Self> {
        let mut attempt = 1;
        loop {
            match Self::start_once(jars.clone(), opts.clone()) {
                Err(e) if attempt < 3 && format!("{e:#}").contains("Address already in use") => {
                    eprintln!("Kafka: a port was taken before a node bound it; starting again on others");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn start_once(jars: KafkaJars, opts: KafkaOptions) -> anyhow::Result<Self> {
        ensure!(opts.nodes >= 1, "a cluster needs a node");
        let begin = Instant::now();
        let mut builder = tempfile::Builder::new();
        builder.prefix("tributary-kafka-");
        let dir = match &opts.parent_dir {
            Some(parent) => builder.tempdir_in(parent)?,
            None => builder.tempdir()?,
        };
        let ports = crate::free_ports(2 * opts.nodes)?;
        let voters =
            (0..opts.nodes).map(|i| format!("{}@127.0.0.1:{}", i + 1, ports[2 * i + 1])).collect::<Vec<_>>().join(",");
        let n = opts.nodes;
        let (rf, min_isr) = (n.min(3), n.min(2));
        let cluster_id = jars.tool("kafka.tools.StorageTool", &["random-uuid"])?.trim().to_string();
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let (port, controller) = (ports[2 * i], ports[2 * i + 1]);
            let node_dir = dir.path().join(format!("node-{}", i + 1));
            std::fs::create_dir_all(&node_dir)?;
            let mut props: Vec<(String, String)> = vec![
                ("process.roles".into(), "broker,controller".into()),
                ("node.id".into(), (i + 1).to_string()),
                ("controller.quorum.voters".into(), voters.clone()),
                ("listeners".into(), format!("PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}")),
                ("advertised.listeners".into(), format!("PLAINTEXT://127.0.0.1:{port}")),
                ("controller.listener.names".into(), "CONTROLLER".into()),
                ("listener.security.protocol.map".into(), "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT".into()),
                ("inter.broker.listener.name".into(), "PLAINTEXT".into()),
                ("log.dirs".into(), node_dir.join("data").display().to_string()),
                ("num.partitions".into(), "1".into()),
                ("default.replication.factor".into(), rf.to_string()),
                ("offsets.topic.replication.factor".into(), rf.to_string()),
                ("transaction.state.log.replication.factor".into(), rf.to_string()),
                ("transaction.state.log.min.isr".into(), min_isr.to_string()),
                ("share.coordinator.state.topic.replication.factor".into(), rf.to_string()),
                ("share.coordinator.state.topic.min.isr".into(), min_isr.to_string()),
                ("group.initial.rebalance.delay.ms".into(), "0".into()),
                // Topics exist because someone created them (the receiver must, with its settings).
                ("auto.create.topics.enable".into(), "false".into()),
                // A killed node is fenced, and its partitions get new leaders, within seconds.
                ("broker.heartbeat.interval.ms".into(), "500".into()),
                ("broker.session.timeout.ms".into(), "4000".into()),
                ("num.network.threads".into(), "2".into()),
                ("num.io.threads".into(), "4".into()),
                ("num.recovery.threads.per.data.dir".into(), "1".into()),
            ];
            for (k, v) in &opts.properties {
                props.retain(|(key, _)| key != k);
                props.push((k.clone(), v.clone()));
            }
            let config = node_dir.join("server.properties");
            let text: String = props.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
            std::fs::write(&config, text)?;
            let config_arg = config.to_str().context("utf-8 temp path")?;
            jars.tool("kafka.tools.StorageTool", &["format", "-t", &cluster_id, "-c", config_arg])?;
            nodes.push(Node { id: i as i32 + 1, port, config, log: node_dir.join("kafka.log"), child: None });
        }
        let mut cluster = Self { jars, opts, nodes, started_in: Duration::ZERO, dir };
        for i in 0..n {
            cluster.spawn(i)?;
        }
        cluster.wait_brokers(n)?;
        cluster.started_in = begin.elapsed();
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        ensure!(node.child.is_none(), "node {} is running", node.id);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log)?;
        let mut cmd = self.jars.java(self.opts.heap_mb);
        cmd.arg(format!("-Xms{}m", self.opts.heap_mb));
        if self.opts.light_jvm {
            cmd.args(["-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"]);
        }
        let child = cmd
            .arg("kafka.Kafka")
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start java kafka.Kafka")?;
        node.child = Some(child);
        Ok(())
    }

    /// `host:port` of every node's client listener, comma-separated.
    pub fn bootstrap(&self) -> String {
        self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect::<Vec<_>>().join(",")
    }

    /// The node ids (1-based, as in `node.id` and in metadata).
    pub fn node_ids(&self) -> Vec<i32> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// The JVM's pid of a running node, for `/proc` readings.
    pub fn pid(&self, id: i32) -> Option<u32> {
        self.node(id).ok().and_then(|n| n.child.as_ref()).map(Child::id)
    }

    pub fn jars(&self) -> &KafkaJars {
        &self.jars
    }

    /// The temp dir holding every node's data and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn index(&self, id: i32) -> anyhow::Result<usize> {
        self.nodes.iter().position(|n| n.id == id).with_context(|| format!("no node {id}"))
    }

    fn node(&self, id: i32) -> anyhow::Result<&Node> {
        Ok(&self.nodes[self.index(id)?])
    }

    /// SIGKILL node `id` and reap it (its data stays for [`KafkaCluster::restart`]).
    pub fn kill(&mut self, id: i32) -> anyhow::Result<()> {
        let i = self.index(id)?;
        let mut child = self.nodes[i].child.take().with_context(|| format!("node {id} is not running"))?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Starts a killed node again on its ports and data; returns once metadata lists every broker.
    pub fn restart(&mut self, id: i32) -> anyhow::Result<()> {
        let i = self.index(id)?;
        self.spawn(i)?;
        self.wait_brokers(self.nodes.len())
    }

    /// A metadata request (all topics) through a fresh client.
    pub fn metadata(&self, timeout: Duration) -> anyhow::Result<Metadata> {
        let client: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("broker.address.family", "v4")
            .set("log_level", "0")
            .create()?;
        Ok(client.fetch_metadata(None, timeout)?)
    }

    /// Polls metadata until `cond` holds for it, within `timeout`; fails early if a node that
    /// should run exited (with its log's tail).
    pub fn wait_for(&mut self, what: &str, timeout: Duration, cond: impl Fn(&Metadata) -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("Kafka: {what} not within {timeout:?}\n{}", self.log_tails());
            }
            // Each round is a real metadata round trip (bounded by its own timeout), not a sleep.
            if let Ok(md) = self.metadata(left.min(Duration::from_secs(2))) {
                if cond(&md) {
                    return Ok(());
                }
            }
        }
    }

    fn wait_brokers(&mut self, n: usize) -> anyhow::Result<()> {
        let timeout = self.opts.ready_timeout;
        self.wait_for(&format!("{n} brokers in metadata"), timeout, |md| md.brokers().len() == n)
    }

    /// Every partition of `topic` has `replicas` in sync and a leader.
    pub fn wait_in_sync(&mut self, topic: &str, replicas: usize, timeout: Duration) -> anyhow::Result<()> {
        self.wait_for(&format!("{topic} fully in sync"), timeout, |md| {
            md.topics().iter().find(|t| t.name() == topic).is_some_and(|t| {
                !t.partitions().is_empty()
                    && t.partitions().iter().all(|p| p.leader() >= 0 && p.isr().len() >= replicas)
            })
        })
    }

    /// The leader of `topic`'s `partition` per metadata (-1 without one).
    pub fn leader(&self, topic: &str, partition: i32) -> anyhow::Result<i32> {
        let md = self.metadata(Duration::from_secs(10))?;
        let t = md.topics().iter().find(|t| t.name() == topic).with_context(|| format!("no topic {topic}"))?;
        let p = t.partitions().iter().find(|p| p.id() == partition).context("no such partition")?;
        Ok(p.leader())
    }

    fn check_running(&mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            let exited = match self.nodes[i].child.as_mut() {
                Some(c) => c.try_wait()?,
                None => None,
            };
            if let Some(status) = exited {
                self.nodes[i].child = None;
                bail!("Kafka node {} exited ({status})\n{}", self.nodes[i].id, self.log_tails());
            }
        }
        Ok(())
    }

    /// The last lines of every node's log, for failure messages.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let text = std::fs::read_to_string(&n.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- node {} ({}):\n", n.id, n.log.display()));
            for l in &lines[lines.len().saturating_sub(20)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Stops every node: SIGTERM to all at once (one by one, the last nodes would wait for a
    /// controller quorum that is gone), then waits up to 60 s for them to exit. A node of a
    /// cluster still running 15 s after every other node exited waits for a quorum that cannot
    /// come back (its controlled shutdown needs an active controller): it is killed, said on
    /// stderr, and the stop still counts as clean. Any other node still running at the deadline
    /// is killed and the stop is an error naming it.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let mut running: Vec<(i32, Child)> =
            self.nodes.iter_mut().filter_map(|n| n.child.take().map(|c| (n.id, c))).collect();
        for (_, child) in &running {
            if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
        let nodes = running.len();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last_exit: Option<Instant> = None;
        let mut stuck = Vec::new();
        let mut orphaned = Vec::new();
        while !running.is_empty() {
            let mut i = 0;
            while i < running.len() {
                if running[i].1.try_wait()?.is_some() {
                    running.swap_remove(i);
                    last_exit = Some(Instant::now());
                } else {
                    i += 1;
                }
            }
            let without_quorum = nodes > 1
                && running.len() * 2 < nodes
                && last_exit.is_some_and(|t| t.elapsed() > Duration::from_secs(15));
            if running.is_empty() || without_quorum || Instant::now() >= deadline {
                for (id, child) in &mut running {
                    let _ = child.kill();
                    let _ = child.wait();
                    if without_quorum {
                        orphaned.push(*id)
                    } else {
                        stuck.push(*id)
                    }
                }
                break;
            }
            // Exit has no event to wait on here but the children's own ends: check again.
            std::thread::sleep(Duration::from_millis(50));
        }
        if !orphaned.is_empty() {
            eprintln!("Kafka nodes {orphaned:?} were left without a controller quorum at stop and were killed");
        }
        ensure!(stuck.is_empty(), "Kafka nodes {stuck:?} did not stop on SIGTERM in 60 s\n{}", self.log_tails());
        Ok(())
    }
}

impl Drop for KafkaCluster {
    fn drop(&mut self) {
        // On a test failure (unwinding) the nodes must not outlive the test: kill, don't linger.
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
