//! Crash test through the MQTT front end: the gateway runs as a child process, four rumqttc
//! clients publish QoS 1 messages as fast as the in-flight window allows, and the gateway is
//! SIGKILLed at a random moment, 20 times. Every PUBACKed message must be in the log after the
//! restarts, and no message may be there twice.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use rustix::process::{kill_process, Pid, Signal};
use tributary_broker::Store;

use crate::support::{read_all, storage_config};

const ROUNDS: u32 = 20;
const CLIENTS: usize = 4;

/// Starts the gateway on free ports; returns the child and its MQTT port.
#[allow(clippy::zombie_processes)]
fn start_gateway(dir: &std::path::Path) -> (Child, u16) {
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\ndata_dir = {:?}\ndisk_free_bytes_min = 0\n[kafka]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
            dir.join("data").to_str().expect("utf-8")
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
            let addr = line.split_whitespace().find_map(|w| w.strip_prefix("mqtt=")).expect("mqtt address");
            let port = addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
            std::thread::spawn(move || for _ in reader.lines() {});
            return (child, port);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_puback_survives_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut rng = crate::support::seeded_rng("every_puback_survives_sigkill");
    for round in 0..ROUNDS {
        let (mut child, port) = start_gateway(dir.path());
        let kill_after = rng.random_range(20..1500);
        let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut tasks = Vec::new();
        for c in 0..CLIENTS {
            let mut o = MqttOptions::new(format!("crash-{round}-{c}"), "127.0.0.1", port);
            o.set_keep_alive(Duration::from_secs(30));
            let (client, mut eventloop) = AsyncClient::new(o, 64);
            // Payloads in publish order; each outgoing PUBLISH takes the next one.
            let queued: Arc<Mutex<VecDeque<String>>> = Arc::default();
            let q = queued.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let payload = format!("r{round}-c{c}-{i}");
                    q.lock().expect("lock").push_back(payload.clone());
                    if client.publish("crash/load", QoS::AtLeastOnce, false, payload).await.is_err() {
                        break;
                    }
                }
            }));
            let (acked, ack_tx) = (acked.clone(), ack_tx.clone());
            tasks.push(tokio::spawn(async move {
                let mut by_pkid: HashMap<u16, String> = HashMap::new();
                while let Ok(ev) = eventloop.poll().await {
                    match ev {
                        Event::Outgoing(Outgoing::Publish(pkid)) => {
                            if let Some(p) = queued.lock().expect("lock").pop_front() {
                                by_pkid.insert(pkid, p);
                            }
                        }
                        Event::Incoming(Packet::PubAck(a)) => {
                            if let Some(p) = by_pkid.remove(&a.pkid) {
                                acked.lock().expect("lock").insert(p);
                                let _ = ack_tx.send(());
                            }
                        }
                        _ => {}
                    }
                }
            }));
        }
        for _ in 0..kill_after {
            ack_rx.recv().await.expect("acks keep coming");
        }
        kill_process(Pid::from_raw(child.id() as i32).expect("pid"), Signal::KILL).expect("kill");
        child.wait().expect("wait");
        // The event loops end with the connection; acks already received are counted.
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
    let acked = acked.lock().expect("lock").clone();
    let path = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        let (store, report) = Store::open(storage_config(&path)).expect("reopen");
        assert!(report.repaired, "the last kill left the database to repair");
        let mut stored = HashSet::new();
        for r in read_all(&store, "mqtt", 0) {
            let payload = String::from_utf8(r.value.expect("value").to_vec()).expect("utf-8");
            assert!(stored.insert(payload.clone()), "{payload} stored twice");
        }
        let missing: Vec<&String> = acked.iter().filter(|p| !stored.contains(*p)).collect();
        assert!(
            missing.is_empty(),
            "{} of {} PUBACKed messages missing, e.g. {:?}",
            missing.len(),
            acked.len(),
            missing.first()
        );
        eprintln!(
            "{ROUNDS} kills: {} PUBACKed messages, {} stored, all acknowledged ones present once",
            acked.len(),
            stored.len()
        );
        store.close_blocking().expect("close");
    })
    .await
    .expect("check");
}
