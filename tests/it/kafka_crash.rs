//! Crash tests through the Kafka front end: the gateway runs as a child process and is SIGKILLed
//! at a random moment, then started again on the same data and the same port. One idempotent
//! librdkafka producer (acks=all) writes keyed records to three partitions through every round,
//! so what it had in flight at a kill is sent again to the restarted gateway with its original
//! producer id and sequence numbers. Afterwards each acknowledged record must be in the log
//! exactly once, at its acknowledged offset, and each key's records in the order they were sent.
//! A raw client also resends a batch after a kill and must get its original offsets back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tributary_broker::Store;

use crate::support::{client_config, read_all, storage_config, Daemon};

const ROUNDS: u32 = 5;
const TOPIC: &str = "meters";

/// Starts the gateway on `port` (0: a free one). A port still held by the killed gateway's sockets
/// (or taken meanwhile by another test) makes the start fail; it is tried again for up to 20 s.
fn start_gateway(dir: &std::path::Path, port: u16) -> (Daemon, String) {
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\ndata_dir = {:?}\ndisk_free_bytes_min = 0\n[kafka]\nlisten = \"127.0.0.1:{port}\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\nwebsocket_listen = \"127.0.0.1:0\"\n[metrics]\nenabled = false\n[topic_defaults]\npartitions = 3\n",
            dir.join("data").to_str().expect("utf-8")
        ),
    )
    .expect("write config");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match Daemon::try_start(&config) {
            Ok(d) => {
                let addr = d.addr("kafka");
                return (d, addr);
            }
            Err(log) if log.contains("cannot listen") && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(log) => panic!("gateway exited before it was ready:\n{log}"),
        }
    }
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("no port in {addr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_produce_survives_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (first, addr) = start_gateway(dir.path(), 0);
    let mut first = Some(first);
    let port = port_of(&addr);
    // One producer for every round: after a kill it reconnects to the restarted gateway and sends
    // what was in flight again, with the same producer id and sequence numbers.
    let producer: Arc<FutureProducer> = Arc::new(
        client_config(&addr)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "1")
            .set("message.timeout.ms", "60000")
            .set("reconnect.backoff.max.ms", "200")
            .create()
            .expect("producer"),
    );
    // Each message's delivery: its index and (partition, offset), or why it failed.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Result<(i32, i64), String>)>();
    let p = producer.clone();
    let sender = tokio::spawn(async move {
        let inflight = Arc::new(tokio::sync::Semaphore::new(2000));
        for i in 0u64.. {
            let Ok(permit) = inflight.clone().acquire_owned().await else { break };
            let payload = format!("m{i}");
            let key = format!("meter-{}", i % 50);
            let Ok(delivery) = p.send_result(FutureRecord::to(TOPIC).key(&key).payload(&payload)) else { break };
            let tx = tx.clone();
            tokio::spawn(async move {
                match delivery.await {
                    Ok(Ok(d)) => {
                        let _ = tx.send((i, Ok((d.partition, d.offset))));
                    }
                    Ok(Err((e, _))) => {
                        let _ = tx.send((i, Err(e.to_string())));
                    }
                    Err(_) => {}
                }
                drop(permit);
            });
        }
    });
    let mut acked: HashMap<u64, (i32, i64)> = HashMap::new();
    let mut record = |(i, delivery): (u64, Result<(i32, i64), String>)| {
        let at = delivery.unwrap_or_else(|e| panic!("m{i} was not delivered: {e}"));
        assert!(acked.insert(i, at).is_none(), "m{i} acknowledged twice");
    };
    let mut rng = crate::support::seeded_rng("every_acknowledged_produce_survives_sigkill");
    for round in 0..ROUNDS {
        let child = first.take().unwrap_or_else(|| {
            let (c, a) = start_gateway(dir.path(), port);
            assert_eq!(a, addr, "restarted on the same address");
            c
        });
        let kill_after = rng.random_range(200..4000);
        let mut this_round = 0;
        while this_round < kill_after {
            let next = tokio::time::timeout(Duration::from_secs(60), rx.recv()).await;
            record(next.expect("acks keep coming").expect("the producer is running"));
            this_round += 1;
        }
        child.kill();
        eprintln!("round {round}: killed after {this_round} acks");
    }
    // A last start: everything still in flight is delivered, then the producer is done.
    let (child, _) = start_gateway(dir.path(), port);
    sender.abort();
    let p = producer.clone();
    tokio::task::spawn_blocking(move || p.flush(Duration::from_secs(60))).await.expect("flush task").expect("flush");
    drop(producer);
    while let Some(delivery) = tokio::time::timeout(Duration::from_secs(60), rx.recv()).await.expect("deliveries end") {
        record(delivery);
    }
    eprintln!("{} acknowledged in all", acked.len());
    child.kill();
    // Recovery and the check, on the store itself.
    let path = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        let (store, report) = Store::open(storage_config(&path)).expect("reopen");
        assert!(report.repaired, "the last kill left the database to repair");
        let mut stored: HashMap<u64, (i32, i64)> = HashMap::new();
        for partition in 0..3 {
            for r in read_all(&store, TOPIC, partition) {
                let payload = String::from_utf8(r.value.expect("value").to_vec()).expect("utf-8");
                let i: u64 = payload.strip_prefix('m').and_then(|n| n.parse().ok()).expect("m<index>");
                if let Some(first) = stored.insert(i, (partition, r.offset)) {
                    panic!("{payload} stored twice: at {first:?} and {:?}", (partition, r.offset));
                }
            }
        }
        for (i, at) in &acked {
            assert_eq!(stored.get(i), Some(at), "acknowledged m{i} is not where it was acknowledged");
        }
        // Per key, offsets grow in the order the records were sent (across every restart).
        let mut last: HashMap<u64, (u64, i64)> = HashMap::new();
        let mut order: Vec<(&u64, &(i32, i64))> = acked.iter().collect();
        order.sort();
        for (i, (_, offset)) in order {
            if let Some((prev, prev_offset)) = last.insert(i % 50, (*i, *offset)) {
                assert!(*offset > prev_offset, "key meter-{}: m{i} at {offset} after m{prev} at {prev_offset}", i % 50);
            }
        }
        store.close_blocking().expect("close");
    })
    .await
    .expect("check");
}

/// An idempotent batch sent again after a SIGKILL, with its original producer id, epoch and
/// sequence (as a client does whose connection broke before the answer came), gets its original
/// offsets back and is not stored twice: the producer state is rebuilt from the log at open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_batch_resent_after_sigkill_gets_its_original_offsets() {
    use crate::kafka_protocol::{batch, produce_req, produce_result};
    use crate::support::RawKafka;
    use kafka_protocol::messages::{metadata_request, InitProducerIdRequest, MetadataRequest, ProducerId, TopicName};
    let dir = tempfile::tempdir().expect("tempdir");
    let (child, addr) = start_gateway(dir.path(), 0);
    let a: std::net::SocketAddr = addr.parse().expect("address");
    let first = tokio::task::spawn_blocking(move || {
        let mut c = RawKafka::connect(a);
        let pid = c.call(
            &InitProducerIdRequest::default()
                .with_transactional_id(None)
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1),
            4,
        );
        assert_eq!(pid.error_code, 0);
        let id = pid.producer_id.0;
        // The topic is made by Metadata's auto-creation, as clients do.
        let md = MetadataRequest::default()
            .with_topics(Some(vec![metadata_request::MetadataRequestTopic::default()
                .with_name(Some(TopicName("resend".to_string().into())))]))
            .with_allow_auto_topic_creation(true);
        assert_eq!(c.call(&md, 4).topics[0].error_code, 0);
        let sent: Vec<(i32, i64)> = [0, 5, 10]
            .iter()
            .map(|seq| {
                let r = produce_result(&c.call(&produce_req("resend", 0, batch(5, Some((id, 0, *seq))), -1), 7));
                assert_eq!(r.0, 0, "batch {seq}");
                (*seq, r.1)
            })
            .collect();
        (id, sent)
    })
    .await
    .expect("first life");
    let (id, sent) = first;
    assert_eq!(sent, vec![(0, 0), (5, 5), (10, 10)]);
    child.kill();

    let (child, again) = start_gateway(dir.path(), port_of(&addr));
    assert_eq!(again, addr, "the same address");
    tokio::task::spawn_blocking(move || {
        let mut c = RawKafka::connect(a);
        for (seq, offset) in [(10, 10), (5, 5), (0, 0)] {
            let r = c.call(&produce_req("resend", 0, batch(5, Some((id, 0, seq))), -1), 7);
            assert_eq!(produce_result(&r), (0, offset), "batch {seq} resent after the restart");
        }
        // The next new batch follows on, and a sequence gap is still refused.
        assert_eq!(produce_result(&c.call(&produce_req("resend", 0, batch(5, Some((id, 0, 15))), -1), 7)), (0, 15));
        let gap = c.call(&produce_req("resend", 0, batch(5, Some((id, 0, 30))), -1), 7);
        assert_eq!(produce_result(&gap).0, 45, "OUT_OF_ORDER_SEQUENCE_NUMBER");
    })
    .await
    .expect("second life");
    child.kill();
    let path = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        let (store, _) = Store::open(storage_config(&path)).expect("reopen");
        let values: Vec<Vec<u8>> =
            read_all(&store, "resend", 0).into_iter().map(|r| r.value.expect("value").to_vec()).collect();
        assert_eq!(values.len(), 20, "four batches of five, none stored twice");
        store.close_blocking().expect("close");
    })
    .await
    .expect("check");
}
