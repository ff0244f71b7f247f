//! Helpers shared by the end-to-end tests.

use tributary_broker::storage::batch::StoredRecord;
use tributary_broker::Store;

/// Every record of a partition, from its log start to its high watermark (gap batches, which
/// hold none, are passed over, and so is a hole at the end).
pub fn read_all(store: &Store, topic: &str, partition: i32) -> Vec<StoredRecord> {
    use tributary_broker::storage::batch::{decode_records, BatchHeader};
    let wm = store.watermarks(topic, partition).expect("partition exists");
    let mut out = Vec::new();
    let mut offset = wm.log_start_offset;
    while offset < wm.high_watermark {
        let f = store.fetch(topic, partition, offset, 1 << 20).expect("fetch");
        if f.data.is_empty() && f.next_offset == offset {
            // A hole at the end: a restore moved the next offset up over offsets the lost
            // gateway gave (`Store::restore_end`); no batch lies after `offset`.
            break;
        }
        assert!(f.next_offset > offset, "no progress at offset {offset}");
        let mut rest = &f.data[..];
        while !rest.is_empty() {
            let len = BatchHeader::parse(rest).expect("batch header").total_len();
            let records = decode_records(&rest[..len], 1 << 30).expect("decode");
            out.extend(records.into_iter().filter(|r| r.offset >= offset));
            rest = &rest[len..];
        }
        offset = f.next_offset;
    }
    out
}

/// The retained messages as a consumer of the retained topic (`mqtt.retained`) sees them once
/// compacted: MQTT topic -> the latest record's value (`None`: a tombstone). Empty if the topic
/// does not exist.
pub fn retained_view(store: &Store) -> std::collections::BTreeMap<String, Option<bytes::Bytes>> {
    let mut view = std::collections::BTreeMap::new();
    if store.topic(tributary_broker::mqtt::routes::RETAINED_TOPIC).is_none() {
        return view;
    }
    for r in read_all(store, tributary_broker::mqtt::routes::RETAINED_TOPIC, 0) {
        let key = r.key.expect("a retained record has a key");
        view.insert(String::from_utf8(key.to_vec()).expect("a UTF-8 topic"), r.value);
    }
    view
}

/// The random generator of a randomized test: seeded from `TRIBUTARY_TEST_SEED` when set (to
/// replay a failure), else from a fresh seed. The seed is printed, and the test harness shows it
/// when the test fails.
pub fn seeded_rng(test: &str) -> rand::rngs::StdRng {
    use rand::SeedableRng;
    let seed =
        std::env::var("TRIBUTARY_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
    eprintln!("{test}: seed {seed} (replay with TRIBUTARY_TEST_SEED={seed})");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// A broker with its Kafka listener running in this process, on a free port and a temp dir.
pub struct KafkaBroker {
    pub dir: tempfile::TempDir,
    pub store: Store,
    pub addr: std::net::SocketAddr,
    /// The MQTT listener on the same store.
    pub mqtt: std::net::SocketAddr,
    /// The MQTT listener's WebSocket socket.
    pub mqtt_ws: std::net::SocketAddr,
    /// The Kafka listener's counters.
    pub kafka_stats: std::sync::Arc<tributary_broker::kafka::KafkaStats>,
    /// The MQTT listener's counters.
    pub mqtt_stats: std::sync::Arc<tributary_broker::mqtt::MqttStats>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    mqtt_task: tokio::task::JoinHandle<()>,
}

pub fn storage_config(dir: &std::path::Path) -> tributary_broker::StorageConfig {
    tributary_broker::StorageConfig {
        data_dir: dir.join("data"),
        disk_free_bytes_min: 0,
        max_bytes: 256 << 20,
        ..tributary_broker::StorageConfig::default()
    }
}

impl KafkaBroker {
    pub async fn start() -> Self {
        Self::start_with(tributary_broker::kafka::KafkaConfig::default()).await
    }

    pub async fn start_with(cfg: tributary_broker::kafka::KafkaConfig) -> Self {
        Self::start_in(tempfile::tempdir().expect("tempdir"), cfg, 0).await
    }

    async fn start_in(dir: tempfile::TempDir, cfg: tributary_broker::kafka::KafkaConfig, port: u16) -> Self {
        Self::start_full(dir, cfg, tributary_broker::mqtt::MqttConfig::default(), port, 0).await
    }

    /// Both listeners with the given settings (MQTT routes, limits).
    pub async fn start_with_mqtt(mqtt: tributary_broker::mqtt::MqttConfig) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_full(dir, tributary_broker::kafka::KafkaConfig::default(), mqtt, 0, 0).await
    }

    async fn start_full(
        dir: tempfile::TempDir,
        mut cfg: tributary_broker::kafka::KafkaConfig,
        mut mqtt_cfg: tributary_broker::mqtt::MqttConfig,
        port: u16,
        mqtt_port: u16,
    ) -> Self {
        // RUST_LOG=tributary_broker=debug shows the broker's log in a failing test's output.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        use tributary_broker::kafka::KafkaServer;
        use tributary_broker::TopicTemplate;
        let storage = storage_config(dir.path());
        let (store, _) =
            tokio::task::spawn_blocking(move || Store::open(storage)).await.expect("open task").expect("open store");
        cfg.listen = format!("127.0.0.1:{port}");
        // Kafka's 3 s initial rebalance delay would make every test's first group join 3 s
        // slower: the in-process broker turns it off unless a test sets another value (the tests
        // of the delay do; the gateway binary keeps Kafka's default).
        if cfg.group_initial_rebalance_delay_ms
            == tributary_broker::kafka::KafkaConfig::default().group_initial_rebalance_delay_ms
        {
            cfg.group_initial_rebalance_delay_ms = 0;
        }
        let template = TopicTemplate { partitions: 1, config: tributary_broker::TopicConfig::default() };
        let server = KafkaServer::bind(cfg, store.clone(), template).await.expect("bind kafka listener");
        let addr = server.local_addr().expect("local addr");
        let kafka_stats = server.stats();
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        mqtt_cfg.listen = format!("127.0.0.1:{mqtt_port}");
        mqtt_cfg.websocket_listen = "127.0.0.1:0".into();
        let template = TopicTemplate { partitions: 1, config: tributary_broker::TopicConfig::default() };
        let mqtt_server = tributary_broker::mqtt::MqttServer::bind(mqtt_cfg, store.clone(), template)
            .await
            .expect("bind mqtt listener");
        let mqtt = mqtt_server.local_addr().expect("mqtt addr");
        let mqtt_ws = mqtt_server.websocket_local_addr().expect("websocket listener").expect("ws addr");
        let mqtt_stats = mqtt_server.stats();
        let mut stopped = stop.subscribe();
        let mqtt_task = tokio::spawn(mqtt_server.run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        Self { dir, store, addr, mqtt, mqtt_ws, kafka_stats, mqtt_stats, stop, task, mqtt_task }
    }

    pub fn bootstrap(&self) -> String {
        self.addr.to_string()
    }

    /// Stops the listener, closes the store cleanly and starts again on the same data and port.
    pub async fn restart(self) -> Self {
        let KafkaBroker { dir, store, addr, mqtt, stop, task, mqtt_task, .. } = self;
        let _ = stop.send(true);
        task.await.expect("listener task");
        mqtt_task.await.expect("mqtt listener task");
        store.close().await.expect("close store");
        Self::start_full(
            dir,
            tributary_broker::kafka::KafkaConfig::default(),
            tributary_broker::mqtt::MqttConfig::default(),
            addr.port(),
            mqtt.port(),
        )
        .await
    }
}

/// librdkafka settings shared by the tests' clients.
pub fn client_config(bootstrap: &str) -> rdkafka::ClientConfig {
    let mut c = rdkafka::ClientConfig::new();
    c.set("bootstrap.servers", bootstrap).set("broker.address.family", "v4").set("log_level", "4");
    c
}

/// Reads `count` messages of one partition from `from` with an assigned (group-less) consumer.
pub fn consume(
    bootstrap: &str,
    topic: &str,
    partition: i32,
    from: rdkafka::Offset,
    count: usize,
) -> Vec<rdkafka::message::OwnedMessage> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = client_config(bootstrap)
        .set("group.id", "tests-assign-only")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()
        .expect("consumer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, from).expect("offset");
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::with_capacity(count);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while out.len() < count {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {count} messages of {topic}-{partition} arrived",
            out.len()
        );
        match consumer.poll(std::time::Duration::from_millis(200)) {
            Some(Ok(m)) => out.push(m.detach()),
            Some(Err(e)) => panic!("consume {topic}-{partition}: {e}"),
            None => {}
        }
    }
    out
}

/// A blocking Kafka client speaking raw protocol messages (encoded and decoded by the
/// `kafka-protocol` crate), for checks librdkafka cannot express: every version of every API,
/// exact error codes, pipelining.
pub struct RawKafka {
    stream: std::net::TcpStream,
    corr: i32,
}

impl RawKafka {
    pub fn connect(addr: std::net::SocketAddr) -> Self {
        let stream = std::net::TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(std::time::Duration::from_secs(30))).expect("timeout");
        Self { stream, corr: 0 }
    }

    /// The socket, for writing what no client would (half requests, bare SASL tokens).
    pub fn into_stream(self) -> std::net::TcpStream {
        self.stream
    }

    /// Sends a request without waiting; returns its correlation id.
    pub fn send<R: kafka_protocol::protocol::Request>(&mut self, req: &R, version: i16) -> i32 {
        use std::io::Write;
        let (corr, frame) = self.frame(req, version);
        self.stream.write_all(&frame).expect("send request");
        corr
    }

    /// A request's frame (size prefix included) with the next correlation id, not sent: for
    /// writing it in pieces.
    pub fn frame<R: kafka_protocol::protocol::Request>(&mut self, req: &R, version: i16) -> (i32, Vec<u8>) {
        use kafka_protocol::protocol::{Encodable, StrBytes};
        self.corr += 1;
        let header = kafka_protocol::messages::RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(self.corr)
            .with_client_id(Some(StrBytes::from_static_str("raw-test")));
        let mut body = bytes::BytesMut::new();
        header.encode(&mut body, R::header_version(version)).expect("encode header");
        req.encode(&mut body, version).unwrap_or_else(|e| panic!("encode api {} v{version}: {e}", R::KEY));
        let mut frame = (body.len() as i32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        (self.corr, frame)
    }

    /// Writes raw bytes (part of a frame from `frame`).
    pub fn write(&mut self, bytes: &[u8]) {
        std::io::Write::write_all(&mut self.stream, bytes).expect("write");
    }

    /// Reads the next response frame; `None` if the broker closed the connection.
    pub fn recv_frame(&mut self) -> Option<bytes::Bytes> {
        use std::io::Read;
        let mut size = [0u8; 4];
        if let Err(e) = self.stream.read_exact(&mut size) {
            assert!(
                matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset),
                "neither a response nor a close: {e}"
            );
            return None;
        }
        let mut frame = vec![0u8; i32::from_be_bytes(size) as usize];
        self.stream.read_exact(&mut frame).expect("response body");
        Some(bytes::Bytes::from(frame))
    }

    /// Reads the response to a request of type `R` sent at `version`, checking its correlation id.
    pub fn recv<R: kafka_protocol::protocol::Request>(&mut self, version: i16, corr: i32) -> R::Response {
        use kafka_protocol::protocol::{Decodable, HeaderVersion};
        let mut frame = self.recv_frame().unwrap_or_else(|| panic!("api {} v{version}: connection closed", R::KEY));
        let header = kafka_protocol::messages::ResponseHeader::decode(&mut frame, R::Response::header_version(version))
            .expect("response header");
        assert_eq!(header.correlation_id, corr, "responses come back in request order");
        let resp = R::Response::decode(&mut frame, version)
            .unwrap_or_else(|e| panic!("decode api {} v{version} response: {e}", R::KEY));
        assert!(frame.is_empty(), "api {} v{version}: {} bytes left after the response", R::KEY, frame.len());
        resp
    }

    pub fn call<R: kafka_protocol::protocol::Request>(&mut self, req: &R, version: i16) -> R::Response {
        let corr = self.send(req, version);
        self.recv::<R>(version, corr)
    }
}

/// GET `path` from an HTTP endpoint (the metrics endpoint); returns the body of a 200 answer.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the HTTP endpoint");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("send request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read answer");
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// The gateway daemon (the real binary) serving a config file, started and ready. Dropping it
/// (a test that ends without `stop` or `kill`, or panics first) SIGKILLs and reaps the process, so
/// no gateway outlives its test.
pub struct Daemon {
    child: std::process::Child,
    ready: String,
}

impl Daemon {
    /// Starts `tributary serve --config FILE` and waits for its ready line; its log is drained
    /// from then on so it never blocks on a full pipe.
    pub fn start(config: &std::path::Path) -> Self {
        Self::try_start(config).unwrap_or_else(|log| panic!("gateway exited before it was ready:\n{log}"))
    }

    /// As `start`; if the gateway exits before it is ready, its log.
    pub fn try_start(config: &std::path::Path) -> Result<Self, String> {
        Self::try_start_limited(config, None)
    }

    /// As `try_start`, the gateway started under a file-size limit (`RLIMIT_FSIZE`, through
    /// util-linux's `prlimit`) of `fsize_bytes` when given.
    pub fn try_start_limited(config: &std::path::Path, fsize_bytes: Option<u64>) -> Result<Self, String> {
        use std::io::BufRead;
        let exe = env!("CARGO_BIN_EXE_tributary-under-test");
        let mut command = match fsize_bytes {
            Some(n) => {
                let mut c = std::process::Command::new("prlimit");
                c.arg(format!("--fsize={n}")).arg("--").arg(exe);
                c
            }
            None => std::process::Command::new(exe),
        };
        let mut child = command
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn gateway");
        let mut reader = std::io::BufReader::new(child.stderr.take().expect("stderr"));
        let mut seen = String::new();
        let ready = loop {
            let mut line = String::new();
            let n = reader.read_line(&mut line).expect("read stderr");
            if n == 0 {
                child.wait().expect("wait for the gateway");
                return Err(seen);
            }
            seen.push_str(&line);
            if line.contains("tributary gateway ready") {
                break line;
            }
        };
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        Ok(Self { child, ready })
    }

    /// The gateway's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the gateway is still running (the same process, never restarted).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// An address from the ready line: `kafka`, `mqtt` or `metrics`.
    pub fn addr(&self, name: &str) -> String {
        let addr = self.ready.split(&format!("{name}=")).nth(1).and_then(|r| r.split_whitespace().next());
        addr.unwrap_or_else(|| panic!("{name} address in {}", self.ready)).to_string()
    }

    /// SIGKILL, as a crash or a power cut would end it (no shutdown at all).
    pub fn kill(mut self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("SIGKILL");
        self.child.wait().expect("wait");
    }

    /// SIGTERM; the gateway must exit cleanly.
    pub fn stop(mut self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
        assert!(self.child.wait().expect("wait").success(), "clean shutdown");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // After `stop` or `kill` the child is reaped already: `try_wait` answers from the saved
        // status and nothing is signalled (its pid may belong to another process by now).
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
