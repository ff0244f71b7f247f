//! Helpers shared by the end-to-end tests.

use tributary_broker::storage::batch::StoredRecord;
use tributary_broker::Store;

/// Every record of a partition, from its log start to its high watermark.
pub fn read_all(store: &Store, topic: &str, partition: i32) -> Vec<StoredRecord> {
    let wm = store.watermarks(topic, partition).expect("partition exists");
    let mut out = Vec::new();
    let mut offset = wm.log_start_offset;
    while offset < wm.high_watermark {
        let records = store.read_records(topic, partition, offset, 1 << 20).expect("read");
        let last = records.last().map(|r| r.offset).unwrap_or_else(|| panic!("no progress at offset {offset}"));
        out.extend(records);
        offset = last + 1;
    }
    out
}

/// A broker with its Kafka listener running in this process, on a free port and a temp dir.
pub struct KafkaBroker {
    pub dir: tempfile::TempDir,
    pub store: Store,
    pub addr: std::net::SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
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

    async fn start_in(dir: tempfile::TempDir, mut cfg: tributary_broker::kafka::KafkaConfig, port: u16) -> Self {
        // RUST_LOG=tributary_broker=debug shows the broker's log in a failing test's output.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        use tributary_broker::kafka::{KafkaServer, TopicTemplate};
        let storage = storage_config(dir.path());
        let (store, _) =
            tokio::task::spawn_blocking(move || Store::open(storage)).await.expect("open task").expect("open store");
        cfg.listen = format!("127.0.0.1:{port}");
        let template = TopicTemplate { partitions: 1, config: tributary_broker::TopicConfig::default() };
        let server = KafkaServer::bind(cfg, store.clone(), template).await.expect("bind kafka listener");
        let addr = server.local_addr().expect("local addr");
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        Self { dir, store, addr, stop, task }
    }

    pub fn bootstrap(&self) -> String {
        self.addr.to_string()
    }

    /// Stops the listener, closes the store cleanly and starts again on the same data and port.
    pub async fn restart(self) -> Self {
        let KafkaBroker { dir, store, addr, stop, task } = self;
        let _ = stop.send(true);
        task.await.expect("listener task");
        store.close().await.expect("close store");
        Self::start_in(dir, tributary_broker::kafka::KafkaConfig::default(), addr.port()).await
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
