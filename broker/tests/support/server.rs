//! The MQTT listener over a store in a temporary directory, started in its own runtime for the
//! counting test binaries (`mqtt_allocations.rs`, `mqtt_idle_memory.rs`).

use std::net::SocketAddr;

use tributary_broker::mqtt::{MqttConfig, MqttServer};
use tributary_broker::{StorageConfig, Store, TopicConfig, TopicTemplate};

/// A running listener: its runtime (dropped to stop everything), address and stop switch.
pub struct Running {
    pub addr: SocketAddr,
    pub stop: tokio::sync::watch::Sender<bool>,
    /// Dropped (with the listener's tasks) when this is.
    _rt: tokio::runtime::Runtime,
    /// The store's directory, removed when this is dropped (after the runtime: fields drop in
    /// order).
    _dir: tempfile::TempDir,
}

/// Starts the listener on `127.0.0.1:0` with `mqtt`'s other settings, routing to one-partition
/// topics, on a 2-worker runtime as the gateway's.
pub fn start(mqtt: MqttConfig) -> Running {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let storage =
        StorageConfig { data_dir: dir.path().to_path_buf(), disk_free_bytes_min: 0, ..StorageConfig::default() };
    let mqtt = MqttConfig { listen: "127.0.0.1:0".into(), websocket_listen: String::new(), ..mqtt };
    let (addr, stop) = rt.block_on(async {
        let (store, _) = tokio::task::spawn_blocking(move || Store::open(storage)).await.expect("task").expect("store");
        let template = TopicTemplate { partitions: 1, config: TopicConfig::default() };
        let server = MqttServer::bind(mqtt, store, template).await.expect("bind");
        let addr = server.local_addr().expect("addr");
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(server.run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        (addr, stop)
    });
    Running { addr, stop, _rt: rt, _dir: dir }
}
