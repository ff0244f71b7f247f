//! Crash test through the Kafka front end: the gateway runs as a child process, an idempotent
//! librdkafka producer (acks=all) writes keyed records to three partitions, and the gateway is
//! SIGKILLed at a random moment. After every round each acknowledged record must be in the log
//! exactly once, at its acknowledged offset, and nothing may be stored twice.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer, PurgeConfig};
use rustix::process::{kill_process, Pid, Signal};
use tributary_broker::Store;

use crate::support::{client_config, read_all, storage_config};

const ROUNDS: u32 = 5;
const TOPIC: &str = "meters";

/// Starts the gateway on a free port; returns the child and its Kafka address. The caller kills
/// and waits for it; a start that fails panics after the child has exited.
#[allow(clippy::zombie_processes)]
fn start_gateway(dir: &std::path::Path) -> (Child, String) {
    let data = dir.join("data");
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\ndata_dir = {:?}\ndisk_free_bytes_min = 0\n[kafka]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n[topic_defaults]\npartitions = 3\n",
            data.to_str().expect("utf-8")
        ),
    )
    .expect("write config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tributary-under-test"))
        .args(["serve", "--config", config.to_str().expect("utf-8")])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gateway");
    let mut reader = BufReader::new(child.stderr.take().expect("stderr"));
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).expect("read stderr");
        assert!(n > 0, "gateway exited before it was ready:\n{seen}");
        seen.push_str(&line);
        if line.contains("tributary gateway ready") {
            let addr = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("kafka="))
                .unwrap_or_else(|| panic!("no kafka address in {line}"))
                .to_string();
            // Keep draining stderr so the child never blocks on a full pipe.
            std::thread::spawn(move || for _ in reader.lines() {});
            return (child, addr);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_produce_survives_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    // payload -> (partition, offset) of every acknowledged record.
    let mut acked: HashMap<String, (i32, i64)> = HashMap::new();
    let mut rng = crate::support::seeded_rng("every_acknowledged_produce_survives_sigkill");
    for round in 0..ROUNDS {
        let (mut child, addr) = start_gateway(dir.path());
        let kill_after = rng.random_range(200..4000);
        let producer: Arc<FutureProducer> = Arc::new(
            client_config(&addr)
                .set("acks", "all")
                .set("enable.idempotence", "true")
                .set("linger.ms", "1")
                .set("message.timeout.ms", "20000")
                .create()
                .expect("producer"),
        );
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, i32, i64)>();
        let p = producer.clone();
        let sender = tokio::spawn(async move {
            let inflight = Arc::new(tokio::sync::Semaphore::new(2000));
            for i in 0.. {
                let Ok(permit) = inflight.clone().acquire_owned().await else { break };
                let payload = format!("r{round}-{i}");
                let key = format!("meter-{}", i % 50);
                let Ok(delivery) = p.send_result(FutureRecord::to(TOPIC).key(&key).payload(&payload)) else { break };
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Ok(Ok(d)) = delivery.await {
                        let _ = tx.send((payload, d.partition, d.offset));
                    }
                    drop(permit);
                });
            }
        });
        let mut this_round = 0;
        while this_round < kill_after {
            let (payload, partition, offset) = rx.recv().await.expect("acks keep coming");
            acked.insert(payload, (partition, offset));
            this_round += 1;
        }
        kill_process(Pid::from_raw(child.id() as i32).expect("pid"), Signal::KILL).expect("kill");
        child.wait().expect("wait");
        sender.abort();
        // Whatever is not acknowledged now never will be; late acks already sent still count.
        producer.purge(PurgeConfig::default().queue().inflight());
        drop(producer);
        while let Ok(Some((payload, partition, offset))) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await
        {
            acked.insert(payload, (partition, offset));
        }
        eprintln!("round {round}: killed after {this_round} acks ({} acked in all)", acked.len());
    }
    // Recovery and the check, on the store itself.
    let path = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        let (store, report) = Store::open(storage_config(&path)).expect("reopen");
        assert!(report.repaired, "the last kill left the database to repair");
        let mut stored: HashMap<String, (i32, i64)> = HashMap::new();
        for partition in 0..3 {
            for r in read_all(&store, TOPIC, partition) {
                let payload = String::from_utf8(r.value.expect("value").to_vec()).expect("utf-8");
                if let Some(first) = stored.insert(payload.clone(), (partition, r.offset)) {
                    panic!("{payload} stored twice: at {first:?} and {:?}", (partition, r.offset));
                }
            }
        }
        for (payload, at) in &acked {
            assert_eq!(stored.get(payload), Some(at), "acknowledged {payload} is not where it was acknowledged");
        }
        store.close_blocking().expect("close");
    })
    .await
    .expect("check");
}
