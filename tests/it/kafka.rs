//! The Kafka front end with librdkafka (the `rdkafka` crate) as the client: produce in every
//! codec and read back byte-identical records, the Java partitioner's placement, positions
//! (middle, earliest, by timestamp), LogAppendTime topics, topic administration, DeleteRecords,
//! and a restart.

use std::time::Duration;

use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewPartitions, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message, Offset, Timestamp};
use tributary_broker::storage::clock::now_ms;

use crate::support::{client_config, consume, KafkaBroker};

const T0: i64 = 1_700_000_000_000;

fn producer(bootstrap: &str, extra: &[(&str, &str)]) -> FutureProducer {
    let mut c = client_config(bootstrap);
    c.set("acks", "all").set("linger.ms", "5").set("message.timeout.ms", "30000");
    for (k, v) in extra {
        c.set(*k, *v);
    }
    c.create().expect("producer")
}

fn admin(bootstrap: &str) -> AdminClient<DefaultClientContext> {
    client_config(bootstrap).create().expect("admin client")
}

/// A record's key, value and headers derived from its index, with binary bytes and repeated
/// header keys.
type HeaderList = Vec<(String, Vec<u8>)>;

fn record_parts(i: usize) -> (Vec<u8>, Vec<u8>, HeaderList) {
    let key = format!("key-{i}").into_bytes();
    // Binary bytes (every byte value occurs) followed by compressible text.
    let mut value: Vec<u8> = (0..(i % 64 + 1)).map(|j| ((i * 31 + j * 7) % 256) as u8).collect();
    value.extend(format!("reading={i};unit=Wh;").repeat(i % 20 + 2).into_bytes());
    let headers = vec![
        ("origin".to_string(), format!("meter-{}", i % 7).into_bytes()),
        ("dup".to_string(), vec![1, 2, i as u8]),
        ("dup".to_string(), Vec::new()),
    ];
    (key, value, headers)
}

async fn produce_records(p: &FutureProducer, topic: &str, n: usize) -> Vec<(i32, i64)> {
    let futures: Vec<_> = (0..n)
        .map(|i| {
            let (key, value, headers) = record_parts(i);
            let mut h = OwnedHeaders::new();
            for (k, v) in &headers {
                h = h.insert(Header { key: k, value: Some(v) });
            }
            let record = FutureRecord::to(topic)
                .partition(0)
                .key(&key)
                .payload(&value)
                .headers(h)
                .timestamp(T0 + i as i64 * 1000);
            p.send_result(record).map_err(|(e, _)| e).expect("queue record")
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for f in futures {
        let d = f.await.expect("delivery future").map_err(|(e, _)| e).expect("acked");
        out.push((d.partition, d.offset));
    }
    out
}

fn check_record(m: &rdkafka::message::OwnedMessage, i: usize) {
    let (key, value, headers) = record_parts(i);
    assert_eq!(m.key(), Some(&key[..]), "key of record {i}");
    assert_eq!(m.payload(), Some(&value[..]), "value of record {i}");
    assert_eq!(m.timestamp(), Timestamp::CreateTime(T0 + i as i64 * 1000), "timestamp of record {i}");
    let got: HeaderList = m
        .headers()
        .map(|h| h.iter().map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec())).collect())
        .unwrap_or_default();
    assert_eq!(got, headers, "headers of record {i}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_codec_round_trips_byte_identical_records() {
    let broker = KafkaBroker::start().await;
    let bootstrap = broker.bootstrap();
    const N: usize = 500;
    for codec in ["none", "gzip", "snappy", "lz4", "zstd"] {
        let topic = format!("codec-{codec}");
        let p = producer(&bootstrap, &[("compression.type", codec)]);
        let acks = produce_records(&p, &topic, N).await;
        let offsets: Vec<i64> = acks.iter().map(|a| a.1).collect();
        assert_eq!(offsets, (0..N as i64).collect::<Vec<_>>(), "{codec}: acked offsets are 0..N in order");
        // Batches are stored as the client compressed them (librdkafka sends a batch that does
        // not shrink uncompressed, so count records per codec).
        let stored = broker.store.fetch(&topic, 0, 0, 64 << 20).expect("fetch");
        let want = ["none", "gzip", "snappy", "lz4", "zstd"].iter().position(|c| *c == codec).expect("known") as u8;
        let (mut in_codec, mut at) = (0usize, 0usize);
        while at < stored.data.len() {
            let b = &stored.data[at..];
            let len = i32::from_be_bytes([b[8], b[9], b[10], b[11]]) as usize + 12;
            if b[22] & 0x07 == want {
                in_codec += i32::from_be_bytes([b[57], b[58], b[59], b[60]]) as usize;
            }
            at += len;
        }
        assert!(in_codec * 10 >= N * 9, "{codec}: only {in_codec} of {N} records stored in that codec");
        let bs = bootstrap.clone();
        let msgs =
            tokio::task::spawn_blocking(move || consume(&bs, &topic, 0, Offset::Beginning, N)).await.expect("consume");
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(m.offset(), i as i64, "{codec}: consumed in order");
            check_record(m, i);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_records_land_where_the_java_partitioner_puts_them() {
    let broker = KafkaBroker::start().await;
    let bootstrap = broker.bootstrap();
    let a = admin(&bootstrap);
    let topic = NewTopic::new("keyed", 6, TopicReplication::Fixed(1));
    let r = a.create_topics([&topic], &AdminOptions::new()).await.expect("create");
    assert!(r[0].is_ok(), "{r:?}");
    // librdkafka's murmur2_random is the Java client's default partitioner for keyed records.
    let p = producer(&bootstrap, &[("partitioner", "murmur2_random")]);
    let mut expected = [0usize; 6];
    for i in 0..300 {
        let key = format!("meter-{i}");
        let d = p.send(FutureRecord::to("keyed").key(&key).payload("v"), Duration::from_secs(30)).await.expect("acked");
        let want = tributary_broker::partitioner::partition_for_key(key.as_bytes(), 6);
        assert_eq!(d.partition, want as i32, "key {key}");
        expected[want as usize] += 1;
    }
    for (partition, n) in expected.iter().enumerate() {
        let wm = broker.store.watermarks("keyed", partition as i32).expect("watermarks");
        assert_eq!(wm.high_watermark as usize, *n, "partition {partition} holds exactly its keys");
        let bs = bootstrap.clone();
        let n = *n;
        let msgs = tokio::task::spawn_blocking(move || consume(&bs, "keyed", partition as i32, Offset::Beginning, n))
            .await
            .expect("consume");
        for m in msgs {
            let key = m.key().expect("key");
            assert_eq!(tributary_broker::partitioner::partition_for_key(key, 6) as usize, partition);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_from_the_middle_the_start_and_by_timestamp() {
    let broker = KafkaBroker::start().await;
    let bootstrap = broker.bootstrap();
    let p = producer(&bootstrap, &[("compression.type", "lz4"), ("batch.num.messages", "10")]);
    produce_records(&p, "positions", 100).await;
    let bs = bootstrap.clone();
    tokio::task::spawn_blocking(move || {
        let middle = consume(&bs, "positions", 0, Offset::Offset(57), 43);
        assert_eq!(middle[0].offset(), 57, "starts at the asked offset even inside a batch");
        for m in &middle {
            check_record(m, m.offset() as usize);
        }
        let all = consume(&bs, "positions", 0, Offset::Beginning, 100);
        assert_eq!(all[0].offset(), 0);

        let consumer: BaseConsumer = client_config(&bs).create().expect("consumer");
        let (lo, hi) = consumer.fetch_watermarks("positions", 0, Duration::from_secs(10)).expect("watermarks");
        assert_eq!((lo, hi), (0, 100));
        let mut tpl = rdkafka::TopicPartitionList::new();
        // Record i has timestamp T0 + i s: the first at or after T0 + 30.5 s is record 31.
        tpl.add_partition_offset("positions", 0, Offset::Offset(T0 + 30_500)).expect("tpl");
        let found = consumer.offsets_for_times(tpl, Duration::from_secs(10)).expect("offsets_for_times");
        let e = found.find_partition("positions", 0).expect("partition");
        assert_eq!(e.offset(), Offset::Offset(31));
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset("positions", 0, Offset::Offset(T0 + 1_000_000)).expect("tpl");
        let found = consumer.offsets_for_times(tpl, Duration::from_secs(10)).expect("offsets_for_times");
        assert_eq!(
            found.find_partition("positions", 0).expect("partition").offset(),
            Offset::End,
            "after the last record"
        );

        let from_ts = consume(&bs, "positions", 0, Offset::Offset(31), 69);
        check_record(&from_ts[0], 31);
    })
    .await
    .expect("consumer checks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_append_time_topics_carry_the_broker_clock() {
    let broker = KafkaBroker::start().await;
    let bootstrap = broker.bootstrap();
    let a = admin(&bootstrap);
    let topic = NewTopic::new("appended", 1, TopicReplication::Fixed(1)).set("message.timestamp.type", "LogAppendTime");
    let r = a.create_topics([&topic], &AdminOptions::new()).await.expect("create");
    assert!(r[0].is_ok(), "{r:?}");
    let before = now_ms();
    let p = producer(&bootstrap, &[]);
    let d = p
        .send(FutureRecord::to("appended").key("k").payload("v").timestamp(T0), Duration::from_secs(30))
        .await
        .expect("acked");
    let after = now_ms();
    assert_eq!(d.offset, 0);
    let bs = bootstrap.clone();
    let m =
        tokio::task::spawn_blocking(move || consume(&bs, "appended", 0, Offset::Beginning, 1)).await.expect("consume");
    match m[0].timestamp() {
        Timestamp::LogAppendTime(ts) => assert!((before..=after).contains(&ts), "{ts} not in [{before}, {after}]"),
        other => panic!("expected LogAppendTime, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_are_created_grown_configured_and_deleted_by_the_admin_client() {
    let broker = KafkaBroker::start().await;
    let bootstrap = broker.bootstrap();
    let a = admin(&bootstrap);
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let t = NewTopic::new("admin-t", 3, TopicReplication::Fixed(1)).set("retention.ms", "3600000");
    let r = a.create_topics([&t], &opts).await.expect("create");
    assert!(r[0].is_ok(), "{r:?}");
    assert_eq!(broker.store.topic("admin-t").expect("created").partitions, 3);

    let r = a.create_topics([&t], &opts).await.expect("create again");
    assert_eq!(r[0].as_ref().unwrap_err().1, RDKafkaErrorCode::TopicAlreadyExists);
    let bad = NewTopic::new("admin-r3", 1, TopicReplication::Fixed(3));
    let r = a.create_topics([&bad], &opts).await.expect("create rf 3");
    assert_eq!(r[0].as_ref().unwrap_err().1, RDKafkaErrorCode::InvalidReplicationFactor);
    let bad = NewTopic::new("bad name!", 1, TopicReplication::Fixed(1));
    let r = a.create_topics([&bad], &opts).await.expect("create bad name");
    assert_eq!(r[0].as_ref().unwrap_err().1, RDKafkaErrorCode::InvalidTopic);
    let bad = NewTopic::new("admin-cfg", 1, TopicReplication::Fixed(1)).set("retention.ms", "soon");
    let r = a.create_topics([&bad], &opts).await.expect("create bad config");
    assert_eq!(r[0].as_ref().unwrap_err().1, RDKafkaErrorCode::InvalidConfig);
    assert!(broker.store.topic("admin-cfg").is_none(), "refused topics are not created");

    let d = a.describe_configs([&ResourceSpecifier::Topic("admin-t")], &opts).await.expect("describe");
    let res = d[0].as_ref().expect("described");
    assert_eq!(res.get("retention.ms").and_then(|e| e.value.as_deref()), Some("3600000"));
    assert_eq!(res.get("compression.type").and_then(|e| e.value.as_deref()), Some("lz4"));

    let alter = AlterConfig::new(ResourceSpecifier::Topic("admin-t")).set("retention.bytes", "10485760");
    let r = a.alter_configs([&alter], &opts).await.expect("alter");
    assert!(r[0].is_ok(), "{r:?}");
    let info = broker.store.topic("admin-t").expect("topic");
    assert_eq!(info.config.retention_bytes, Some(10 << 20));
    assert_eq!(info.config.retention_ms, Some(7 * 24 * 3600 * 1000), "AlterConfigs replaces the whole set");
    let alter = AlterConfig::new(ResourceSpecifier::Topic("admin-t")).set("durability", "sometimes");
    // The rdkafka crate reports every AlterConfigs resource as Ok (it drops the error code), so
    // the refusal is checked on the stored settings.
    a.alter_configs([&alter], &opts).await.expect("alter bad");
    let after = broker.store.topic("admin-t").expect("topic");
    assert_eq!(after.config, info.config, "a refused change leaves the settings as they were");

    let grow = NewPartitions::new("admin-t", 5);
    let r = a.create_partitions([&grow], &opts).await.expect("grow");
    assert!(r[0].is_ok(), "{r:?}");
    let consumer: BaseConsumer = client_config(&bootstrap).create().expect("consumer");
    let md = consumer.fetch_metadata(Some("admin-t"), Duration::from_secs(10)).expect("metadata");
    assert_eq!(md.topics()[0].partitions().len(), 5);
    let shrink = NewPartitions::new("admin-t", 2);
    let r = a.create_partitions([&shrink], &opts).await.expect("shrink");
    assert_eq!(r[0].as_ref().unwrap_err().1, RDKafkaErrorCode::InvalidPartitions);

    let r = a.delete_topics(&["admin-t"], &opts).await.expect("delete");
    assert!(r[0].is_ok(), "{r:?}");
    assert!(broker.store.topic("admin-t").is_none());
    let r = a.delete_topics(&["admin-t"], &opts).await.expect("delete again");
    assert_eq!(r[0].as_ref().unwrap_err().1, RDKafkaErrorCode::UnknownTopicOrPartition);
}

/// DeleteRecords with librdkafka's admin client: the log start moves to the asked offset (the
/// answer is the new low watermark), a consumer from the beginning starts there, it survives a
/// restart, END deletes everything; an offset past the high watermark is refused with Kafka's
/// error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_deleted_up_to_an_offset_by_the_admin_client() {
    let broker = KafkaBroker::start().await;
    let bootstrap = broker.bootstrap();
    let p = producer(&bootstrap, &[("batch.num.messages", "10")]);
    produce_records(&p, "trimmed", 100).await;
    let a = admin(&bootstrap);
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let delete = |offsets: &[(&str, i32, Offset)]| {
        let mut tpl = rdkafka::TopicPartitionList::new();
        for (t, p, o) in offsets {
            tpl.add_partition_offset(t, *p, *o).expect("tpl");
        }
        tpl
    };
    let r = a.delete_records(&delete(&[("trimmed", 0, Offset::Offset(43))]), &opts).await.expect("delete records");
    let e = r.find_partition("trimmed", 0).expect("partition");
    assert_eq!((e.error(), e.offset()), (Ok(()), Offset::Offset(43)), "the new low watermark");
    let bs = bootstrap.clone();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client_config(&bs).create().expect("consumer");
        let wm = consumer.fetch_watermarks("trimmed", 0, Duration::from_secs(10)).expect("watermarks");
        assert_eq!(wm, (43, 100));
        let from_start = consume(&bs, "trimmed", 0, Offset::Beginning, 57);
        assert_eq!(from_start[0].offset(), 43, "the beginning is the new log start, inside a batch");
        check_record(&from_start[0], 43);
    })
    .await
    .expect("consumer checks");

    // (librdkafka refuses unknown partitions itself, from its metadata: the broker's
    // UNKNOWN_TOPIC_OR_PARTITION is checked with the raw client in kafka_protocol.rs.)
    let r = a.delete_records(&delete(&[("trimmed", 0, Offset::Offset(101))]), &opts).await.expect("delete records");
    let e = r.find_partition("trimmed", 0).expect("partition");
    assert_eq!(
        e.error().err().and_then(|e| e.rdkafka_error_code()),
        Some(RDKafkaErrorCode::OffsetOutOfRange),
        "past the high watermark"
    );
    assert_eq!(broker.store.watermarks("trimmed", 0).expect("wm").log_start_offset, 43, "nothing moved");
    drop((a, p));

    let broker = broker.restart().await;
    let bootstrap = broker.bootstrap();
    assert_eq!(broker.store.watermarks("trimmed", 0).expect("wm").log_start_offset, 43, "durable");
    let a = admin(&bootstrap);
    let r = a.delete_records(&delete(&[("trimmed", 0, Offset::End)]), &opts).await.expect("delete all");
    assert_eq!(r.find_partition("trimmed", 0).expect("partition").offset(), Offset::Offset(100));
    let info = broker.store.partition_info("trimmed", 0).expect("info");
    assert_eq!((info.watermarks.log_start_offset, info.logical_bytes), (100, 0), "every batch deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_broker_serves_everything_acked() {
    let broker = KafkaBroker::start().await;
    let p = producer(&broker.bootstrap(), &[("compression.type", "snappy")]);
    let acks = produce_records(&p, "restart", 1000).await;
    assert_eq!(acks.last(), Some(&(0, 999)));
    drop(p);
    let broker = broker.restart().await;
    let bs = broker.bootstrap();
    let msgs = tokio::task::spawn_blocking(move || consume(&bs, "restart", 0, Offset::Beginning, 1000))
        .await
        .expect("consume");
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m.offset(), i as i64);
        check_record(m, i);
    }
    // Appends continue after the last acknowledged offset.
    let p = producer(&broker.bootstrap(), &[]);
    let d =
        p.send(FutureRecord::to("restart").key("k").payload("after"), Duration::from_secs(30)).await.expect("acked");
    assert_eq!(d.offset, 1000);
}
