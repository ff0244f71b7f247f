//! The Kafka front end under faults: an idempotent librdkafka producer whose responses are lost
//! (it retries; nothing is stored twice), and bad input on raw sockets (garbage, a 2 GiB size
//! prefix, unknown API key, unsupported version, truncated request, bad CRC) that gets an error
//! or a clean close while other clients keep working and nothing stored changes.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tributary_broker::storage::batch::{encode_batch, NewRecord};
use tributary_broker::{Codec, TimestampKind};

use crate::support::{client_config, read_all, KafkaBroker};

/// Forwards Kafka traffic and, for every `every`-th Produce response, swallows the response and
/// cuts the connection: the broker stored the batch but the client never hears of it.
struct ResponseDropper {
    addr: SocketAddr,
    dropped: Arc<AtomicU64>,
}

async fn read_frame(r: &mut (impl AsyncReadExt + Unpin)) -> Option<Vec<u8>> {
    let mut size = [0u8; 4];
    r.read_exact(&mut size).await.ok()?;
    let mut frame = vec![0u8; i32::from_be_bytes(size) as usize];
    r.read_exact(&mut frame).await.ok()?;
    let mut out = size.to_vec();
    out.extend_from_slice(&frame);
    Some(out)
}

impl ResponseDropper {
    /// Binds the proxy first, so the broker can advertise the proxy's port.
    async fn bind() -> (tokio::net::TcpListener, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        (listener, addr)
    }

    fn run(listener: tokio::net::TcpListener, upstream: SocketAddr, every: u64) -> Self {
        let addr = listener.local_addr().expect("proxy addr");
        let dropped = Arc::new(AtomicU64::new(0));
        let produce_responses = Arc::new(AtomicU64::new(0));
        let d = dropped.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { continue };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let apis: Arc<Mutex<HashMap<i32, i16>>> = Arc::default();
                let apis2 = apis.clone();
                let up = tokio::spawn(async move {
                    while let Some(f) = read_frame(&mut cr).await {
                        let api = i16::from_be_bytes([f[4], f[5]]);
                        let corr = i32::from_be_bytes([f[8], f[9], f[10], f[11]]);
                        apis2.lock().expect("lock").insert(corr, api);
                        if sw.write_all(&f).await.is_err() {
                            break;
                        }
                    }
                });
                let (d, n) = (d.clone(), produce_responses.clone());
                tokio::spawn(async move {
                    while let Some(f) = read_frame(&mut sr).await {
                        let corr = i32::from_be_bytes([f[4], f[5], f[6], f[7]]);
                        let api = apis.lock().expect("lock").remove(&corr);
                        if api == Some(0) && (n.fetch_add(1, Ordering::Relaxed) + 1) % every == 0 {
                            d.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        if cw.write_all(&f).await.is_err() {
                            break;
                        }
                    }
                    // Cut both directions.
                    up.abort();
                    let _ = cw.shutdown().await;
                });
            }
        });
        Self { addr, dropped }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_producer_retries_leave_no_duplicates() {
    let (listener, proxy_addr) = ResponseDropper::bind().await;
    // The broker advertises the proxy, so every connection of the client goes through it.
    let cfg = tributary_broker::kafka::KafkaConfig { advertised_port: proxy_addr.port(), ..Default::default() };
    let broker = KafkaBroker::start_with(cfg).await;
    let proxy = ResponseDropper::run(listener, broker.addr, 10);
    let producer: FutureProducer = client_config(&proxy.addr.to_string())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("batch.num.messages", "40")
        .set("message.timeout.ms", "60000")
        .set("retry.backoff.ms", "10")
        // Reconnect at once after each cut (librdkafka's backoff otherwise grows to 10 s).
        .set("reconnect.backoff.ms", "10")
        .set("reconnect.backoff.max.ms", "100")
        .create()
        .expect("producer");
    const N: usize = 3000;
    let futures: Vec<_> = (0..N)
        .map(|i| {
            let payload = i.to_string();
            producer
                .send_result(FutureRecord::<(), _>::to("idem").partition(0).payload(&payload))
                .map_err(|(e, _)| e)
                .expect("queue")
        })
        .collect();
    let mut offsets = Vec::with_capacity(N);
    for f in futures {
        let d = f.await.expect("future").map_err(|(e, _)| e).expect("every record acknowledged");
        offsets.push(d.offset);
    }
    assert!(proxy.dropped.load(Ordering::Relaxed) > 0, "the proxy lost produce responses");
    assert_eq!(offsets, (0..N as i64).collect::<Vec<_>>(), "acked offsets are unique and in send order");
    let stored: Vec<String> = read_all(&broker.store, "idem", 0)
        .into_iter()
        .map(|r| String::from_utf8(r.value.expect("value").to_vec()).expect("utf-8"))
        .collect();
    let want: Vec<String> = (0..N).map(|i| i.to_string()).collect();
    assert_eq!(
        stored.len(),
        N,
        "{} responses were lost, yet nothing is stored twice",
        proxy.dropped.load(Ordering::Relaxed)
    );
    assert_eq!(stored, want);
}

// ---- bad input on raw sockets ----

fn request(api_key: i16, version: i16, corr: i32, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&api_key.to_be_bytes());
    f.extend_from_slice(&version.to_be_bytes());
    f.extend_from_slice(&corr.to_be_bytes());
    f.extend_from_slice(&3i16.to_be_bytes());
    f.extend_from_slice(b"raw");
    let mut out = (f.len() as i32 + body.len() as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&f);
    out.extend_from_slice(body);
    out
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    s
}

/// Reads one response frame (without the size); `None` if the broker closed the connection.
fn response(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut size = [0u8; 4];
    match s.read_exact(&mut size) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset) => {
            return None
        }
        Err(e) => panic!("no response and no close: {e}"),
    }
    let mut frame = vec![0u8; i32::from_be_bytes(size) as usize];
    s.read_exact(&mut frame).expect("response body");
    Some(frame)
}

/// ApiVersions v0 round trip: the connection serves.
fn healthy(s: &mut TcpStream, corr: i32) {
    s.write_all(&request(18, 0, corr, &[])).expect("send");
    let r = response(s).expect("response");
    assert_eq!(i32::from_be_bytes([r[0], r[1], r[2], r[3]]), corr);
    assert_eq!(i16::from_be_bytes([r[4], r[5]]), 0, "no error");
}

fn produce_v3_body(topic: &str, batch: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(-1i16).to_be_bytes());
    b.extend_from_slice(&(-1i16).to_be_bytes());
    b.extend_from_slice(&5000i32.to_be_bytes());
    b.extend_from_slice(&1i32.to_be_bytes());
    b.extend_from_slice(&(topic.len() as i16).to_be_bytes());
    b.extend_from_slice(topic.as_bytes());
    b.extend_from_slice(&1i32.to_be_bytes());
    b.extend_from_slice(&0i32.to_be_bytes());
    b.extend_from_slice(&(batch.len() as i32).to_be_bytes());
    b.extend_from_slice(batch);
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_an_error_or_a_clean_close_and_costs_nothing_else() {
    let broker = KafkaBroker::start().await;
    broker.store.create_topic("keep", 1, Default::default()).await.expect("topic");
    let records: Vec<NewRecord> = (0..50).map(|i| NewRecord::new(Some(format!("k{i}")), format!("v{i}"))).collect();
    broker.store.append_records("keep", 0, records).await.expect("append");
    let before = read_all(&broker.store, "keep", 0);
    let addr = broker.addr;

    let store = broker.store.clone();
    tokio::task::spawn_blocking(move || {
        // A client that stays connected through all of it.
        let mut good = connect(addr);
        healthy(&mut good, 1);

        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            ("garbage (an HTTP request)", b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n".to_vec(), false),
            ("a size prefix of 2 GiB", vec![0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0], false),
            ("a negative size prefix", vec![0xff, 0xff, 0xff, 0xf0], false),
            ("an unknown API key", request(999, 0, 5, &[]), false),
            ("an unsupported Metadata version", request(3, 99, 6, &[0, 0, 0, 0]), false),
            ("a truncated request", request(3, 1, 7, &[0, 0, 0, 1, 0, 9])[..16].to_vec(), true),
            ("a request whose array count exceeds its bytes", request(3, 1, 8, &[0x7f, 0xff, 0xff, 0xff]), false),
        ];
        for (i, (what, bytes, half_close)) in cases.into_iter().enumerate() {
            let mut bad = connect(addr);
            bad.write_all(&bytes).expect("send");
            if half_close {
                bad.shutdown(std::net::Shutdown::Write).expect("half close");
            }
            assert!(response(&mut bad).is_none(), "{what}: the broker closes the connection without an answer");
            healthy(&mut good, 100 + i as i32);
        }

        // ApiVersions at an unknown version: KIP-511 answer (v0 body, UNSUPPORTED_VERSION, ranges).
        let mut s = connect(addr);
        s.write_all(&request(18, 99, 42, &[])).expect("send");
        let r = response(&mut s).expect("KIP-511 response");
        assert_eq!(i32::from_be_bytes([r[0], r[1], r[2], r[3]]), 42);
        assert_eq!(i16::from_be_bytes([r[4], r[5]]), 35, "UNSUPPORTED_VERSION");
        assert!(i32::from_be_bytes([r[6], r[7], r[8], r[9]]) > 5, "with the supported ranges");
        healthy(&mut s, 43);

        // A batch whose CRC does not match: CORRUPT_MESSAGE, nothing stored, connection kept.
        let rec = NewRecord::new(Some("k"), "tampered");
        let mut batch = Vec::new();
        encode_batch(&[(&rec, 1)], 0, Codec::None, TimestampKind::CreateTime, 1, &mut batch).expect("encode");
        let last = batch.len() - 1;
        batch[last] ^= 0xff;
        s.write_all(&request(0, 3, 44, &produce_v3_body("keep", &batch))).expect("send");
        let r = response(&mut s).expect("produce response");
        // corr(4) topics(4) name(2+4) partitions(4) index(4) error(2)
        let error = i16::from_be_bytes([r[22], r[23]]);
        assert_eq!(error, 2, "CORRUPT_MESSAGE");
        healthy(&mut s, 45);
        healthy(&mut good, 200);

        assert_eq!(read_all(&store, "keep", 0), before, "nothing stored changed");
    })
    .await
    .expect("raw socket checks");

    // And a real client still produces and consumes.
    let p: FutureProducer = client_config(&broker.bootstrap()).set("acks", "all").create().expect("producer");
    let d = p.send(FutureRecord::to("keep").key("k").payload("after"), Duration::from_secs(30)).await.expect("acked");
    assert_eq!(d.offset, 50);
}
