//! A disk fault is not forever (issue 13 item 4), end to end: the real gateway as a child
//! process, whose file-size limit (`RLIMIT_FSIZE`) the test lowers with `prlimit` to the
//! database's size, so every write that grows the file fails (EFBIG; the gateway handles
//! SIGXFSZ, which would otherwise kill it). Kafka producers get KAFKA_STORAGE_ERROR and MQTT 5
//! publishers a failure reason code, while fetches, metadata and new connections are served.
//! Then the limit is lifted: writes succeed again with nobody restarting anything, and nothing
//! acknowledged before the fault is lost.

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use rustix::process::{prlimit, Pid, Resource, Rlimit};
use tributary_broker::storage::batch::{decode_records, encode_batch, BatchHeader, NewRecord};
use tributary_broker::{Codec, TimestampKind};

use crate::mqtt_faults::{connected, publish, read_packet};
use crate::support::{http_get, Daemon, RawKafka};

const TOPIC: &str = "disk";
const KAFKA_STORAGE_ERROR: i16 = 56;

fn tn(v: &str) -> TopicName {
    TopicName(StrBytes::from_string(v.to_string()))
}

/// A batch of `n` records of `size` bytes whose values start with `tag`.
fn batch(tag: &str, n: usize, size: usize) -> Bytes {
    let records: Vec<NewRecord> =
        (0..n).map(|i| NewRecord::new(None::<Bytes>, format!("{tag}-{i}-{}", "v".repeat(size)))).collect();
    let stamped: Vec<_> = records.iter().map(|r| (r, 1_700_000_000_000)).collect();
    let mut out = Vec::new();
    encode_batch(&stamped, 0, Codec::None, TimestampKind::CreateTime, 0, &mut out).expect("encode");
    Bytes::from(out)
}

/// Produces one batch (acks=all); returns (error code, base offset).
fn produce(k: &mut RawKafka, records: Bytes) -> (i16, i64) {
    let req = ProduceRequest::default().with_acks(-1).with_timeout_ms(10_000).with_topic_data(vec![
        produce_request::TopicProduceData::default().with_name(tn(TOPIC)).with_partition_data(vec![
            produce_request::PartitionProduceData::default().with_index(0).with_records(Some(records)),
        ]),
    ]);
    let resp = k.call(&req, 7);
    let p = &resp.responses[0].partition_responses[0];
    (p.error_code, p.base_offset)
}

/// Every record value of the partition, by offset, read with Fetch requests.
fn fetch_all(k: &mut RawKafka) -> Vec<(i64, Bytes)> {
    let mut out = Vec::new();
    let mut offset = 0i64;
    loop {
        let part = fetch_request::FetchPartition::default()
            .with_partition(0)
            .with_fetch_offset(offset)
            .with_partition_max_bytes(4 << 20);
        let req = FetchRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_max_wait_ms(0)
            .with_max_bytes(16 << 20)
            .with_session_epoch(-1)
            .with_topics(vec![fetch_request::FetchTopic::default().with_topic(tn(TOPIC)).with_partitions(vec![part])]);
        let resp = k.call(&req, 11);
        let p = &resp.responses[0].partitions[0];
        assert_eq!(p.error_code, 0, "fetch at {offset}");
        let mut data = p.records.clone().unwrap_or_default();
        if data.is_empty() {
            return out;
        }
        while !data.is_empty() {
            let h = BatchHeader::parse(&data).expect("batch header");
            let b = data.split_to(h.total_len());
            for r in decode_records(&b, 1 << 30).expect("decode") {
                if r.offset >= offset {
                    out.push((r.offset, r.value.unwrap_or_default()));
                }
            }
            offset = h.next_offset();
        }
    }
}

fn set_file_size_limit(pid: u32, bytes: Option<u64>) {
    let pid = Pid::from_raw(pid as i32).expect("pid");
    // The soft limit only; the hard one stays unlimited, so the test can lift it again.
    prlimit(Some(pid), Resource::Fsize, Rlimit { current: bytes, maximum: None }).expect("prlimit RLIMIT_FSIZE");
}

/// A fresh Kafka connection answers Metadata (the listener is not stuck behind the fault).
fn metadata_answers(kafka: SocketAddr) {
    let mut k = RawKafka::connect(kafka);
    let req = MetadataRequest::default()
        .with_topics(Some(vec![metadata_request::MetadataRequestTopic::default().with_name(Some(tn(TOPIC)))]));
    let resp = k.call(&req, 4);
    assert_eq!(resp.topics[0].error_code, 0, "metadata during the fault");
}

/// A gateway config on free ports with its data in `dir/data`; returns the file and the data
/// directory.
fn write_config(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let data = dir.join("data");
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\ndata_dir = {:?}\ndisk_free_bytes_min = 0\n[kafka]\nlisten = \"127.0.0.1:0\"\n\
             [mqtt]\nlisten = \"127.0.0.1:0\"\nwebsocket_listen = \"127.0.0.1:0\"\n[metrics]\nlisten = \"127.0.0.1:0\"\nsys_interval_ms = 0\n",
            data.to_str().expect("utf-8")
        ),
    )
    .expect("write config");
    (config, data)
}

fn metric(metrics: &str, name: &str) -> u64 {
    let text = http_get(metrics, "/metrics");
    let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name} in\n{text}"));
    line.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("a number")
}

#[test]
fn a_disk_fault_refuses_writes_clearly_keeps_reads_and_clears_without_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, data) = write_config(dir.path());
    let mut daemon = Daemon::start(&config);
    let kafka: SocketAddr = daemon.addr("kafka").parse().expect("kafka address");
    let mqtt: SocketAddr = daemon.addr("mqtt").parse().expect("mqtt address");
    let metrics = daemon.addr("metrics");
    let mut k = RawKafka::connect(kafka);
    let create = CreateTopicsRequest::default().with_timeout_ms(10_000).with_topics(vec![
        create_topics_request::CreatableTopic::default()
            .with_name(tn(TOPIC))
            .with_num_partitions(1)
            .with_replication_factor(1),
    ]);
    assert_eq!(k.call(&create, 4).topics[0].error_code, 0, "topic created");

    // Before the fault: acknowledged records, over Kafka and MQTT.
    let mut acked: Vec<(i64, String)> = Vec::new();
    for i in 0..5 {
        let (e, base) = produce(&mut k, batch(&format!("before{i}"), 10, 1000));
        assert_eq!(e, 0);
        acked.extend((0..10).map(|j| (base + j, format!("before{i}-{j}-"))));
    }
    let mut device = connected(mqtt, 5, "device-1");
    device.write_all(&publish(1, b"m/before", 1, b"stored before the fault", true)).expect("publish");
    let (kind, body) = read_packet(&mut device).expect("PUBACK");
    assert_eq!((kind, body.get(2).copied().unwrap_or(0)), (0x40, 0), "PUBACK success");

    // The fault: the database file may not grow.
    let db = data.join("tributary.redb");
    let size = std::fs::metadata(&db).expect("database file").len();
    set_file_size_limit(daemon.pid(), Some(size));
    let mut refused = false;
    for i in 0..400 {
        match produce(&mut k, batch(&format!("during{i}"), 4, 64 << 10)) {
            (0, base) => acked.extend((0..4).map(|j| (base + j, format!("during{i}-{j}-")))),
            (KAFKA_STORAGE_ERROR, _) => {
                refused = true;
                break;
            }
            (e, _) => panic!("produce during the fault: error {e}"),
        }
    }
    assert!(refused, "the file could not grow past {size} bytes, yet every produce was acknowledged");
    assert!(daemon.running(), "the gateway survived the failed write (SIGXFSZ is handled)");
    // MQTT 5: the publish that needs room is refused with a reason code; the device stays on.
    device.write_all(&publish(1, b"m/during", 2, &vec![b'x'; 256 << 10], true)).expect("publish");
    let (kind, body) = read_packet(&mut device).expect("PUBACK");
    assert_eq!(kind, 0x40, "a PUBACK");
    assert!(body.get(2).copied().unwrap_or(0) >= 0x80, "a failure reason code, got {body:?}");
    // Reads and other clients keep going.
    let before: Vec<(i64, String)> = acked.clone();
    let read = fetch_all(&mut k);
    assert_eq!(read.len(), before.len(), "every acknowledged record is readable during the fault");
    for ((off, v), (want_off, prefix)) in read.iter().zip(&before) {
        assert_eq!(off, want_off);
        assert!(v.starts_with(prefix.as_bytes()), "offset {off}");
    }
    metadata_answers(kafka);
    let mut other = connected(mqtt, 5, "device-2");
    other.write_all(&[0xC0, 0]).expect("PINGREQ");
    assert_eq!(read_packet(&mut other).map(|p| p.0), Some(0xD0), "PINGRESP during the fault");
    assert!(metric(&metrics, "tributary_store_failed_commits_total") >= 1);
    assert!(metric(&metrics, "tributary_store_reopens_total") >= 1);
    assert_eq!(metric(&metrics, "tributary_store_write_fault"), 1);
    // The status page's document shows the fault and lists it among the refusals.
    let status: serde_json::Value =
        serde_json::from_str(&crate::support::http_get(&metrics, "/api/status")).expect("status JSON");
    assert!(status["disk"]["write_fault"].is_string(), "{status}");
    let listed = status["refusals"]
        .as_array()
        .expect("refusals")
        .iter()
        .any(|r| r["kind"] == "storage" && r["detail"].as_str().is_some_and(|d| d.starts_with("write failed")));
    assert!(listed, "{status}");

    // The fault clears: writes succeed again, nobody restarted anything.
    set_file_size_limit(daemon.pid(), None);
    let deadline = Instant::now() + Duration::from_secs(60);
    let base = loop {
        match produce(&mut k, batch("after", 4, 64 << 10)) {
            (0, base) => break base,
            (KAFKA_STORAGE_ERROR, _) => assert!(Instant::now() < deadline, "writes never resumed"),
            (e, _) => panic!("produce after the fault: error {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    acked.extend((0..4).map(|j| (base + j, format!("after-{j}-"))));
    device.write_all(&publish(1, b"m/after", 3, b"stored after the fault", true)).expect("publish");
    let (kind, body) = read_packet(&mut device).expect("PUBACK");
    assert_eq!((kind, body.get(2).copied().unwrap_or(0)), (0x40, 0), "PUBACK success after the fault");
    let read = fetch_all(&mut k);
    assert_eq!(read.len(), acked.len(), "nothing acknowledged was lost");
    for ((off, v), (want_off, prefix)) in read.iter().zip(&acked) {
        assert_eq!(off, want_off);
        assert!(v.starts_with(prefix.as_bytes()), "offset {off}");
    }
    assert_eq!(metric(&metrics, "tributary_store_write_fault"), 0);
    assert!(daemon.running(), "the same process throughout");
    daemon.stop();
}

/// No room for the commit journal (`storage.journal_bytes`, 32 MiB) does not keep the gateway
/// from starting: started under a file-size limit of 8 MiB, it runs without the journal (every
/// commit syncs the database file) and keeps what it acknowledged; started again without the
/// limit, it has its journal, and the records are all there.
#[test]
fn no_room_for_the_commit_journal_still_starts_and_keeps_every_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, data) = write_config(dir.path());
    let journal = data.join(tributary_broker::storage::JOURNAL_FILE_NAME);
    let create = CreateTopicsRequest::default().with_timeout_ms(10_000).with_topics(vec![
        create_topics_request::CreatableTopic::default()
            .with_name(tn(TOPIC))
            .with_num_partitions(1)
            .with_replication_factor(1),
    ]);

    let daemon = Daemon::try_start_limited(&config, Some(8 << 20))
        .unwrap_or_else(|log| panic!("the gateway did not start without room for its journal:\n{log}"));
    let mut k = RawKafka::connect(daemon.addr("kafka").parse().expect("kafka address"));
    assert_eq!(k.call(&create, 4).topics[0].error_code, 0, "topic created");
    assert_eq!(produce(&mut k, batch("tight", 20, 100)), (0, 0), "acknowledged without the journal");
    let metrics = daemon.addr("metrics");
    assert_eq!(metric(&metrics, "tributary_store_journal_records_total"), 0, "no commit went to a journal");
    assert_eq!(std::fs::metadata(&journal).map(|m| m.len()).unwrap_or(0), 0, "the journal is cut to nothing");
    daemon.stop();

    let daemon = Daemon::start(&config);
    let mut k = RawKafka::connect(daemon.addr("kafka").parse().expect("kafka address"));
    assert_eq!(produce(&mut k, batch("roomy", 20, 100)), (0, 20));
    let metrics = daemon.addr("metrics");
    assert!(metric(&metrics, "tributary_store_journal_records_total") >= 1, "with room, commits are journaled");
    assert_eq!(std::fs::metadata(&journal).expect("journal").len(), 32 << 20, "the journal has its size");
    let values: Vec<String> =
        fetch_all(&mut k).into_iter().map(|(_, v)| String::from_utf8_lossy(&v).into_owned()).collect();
    assert_eq!(values.len(), 40, "both batches are there");
    assert!(values[0].starts_with("tight-0-") && values[20].starts_with("roomy-0-"), "{:?}", &values[..2]);
    daemon.stop();
}
