//! The Kafka front end at the message level: every served API at every advertised version
//! (requests encoded and responses decoded by the `kafka-protocol` crate, so our hand-written
//! decoders are checked against an independent encoder), and the behaviours clients rely on:
//! OFFSET_OUT_OF_RANGE, soft fetch limits, long polls that wake on append, acks=0, sequence
//! errors, Produce v0-v2 refusal, connection and idle limits.

use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use tributary_broker::kafka::KafkaConfig;
use tributary_broker::storage::batch::{encode_batch, NewRecord};
use tributary_broker::{Codec, TimestampKind};

use crate::support::{KafkaBroker, RawKafka};

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

fn tn(v: &str) -> TopicName {
    TopicName(s(v))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// A RecordBatch of `n` records; with `producer` = (id, epoch, base sequence) an idempotent one.
pub(crate) fn batch(n: usize, producer: Option<(i64, i16, i32)>) -> Bytes {
    let records: Vec<NewRecord> = (0..n).map(|i| NewRecord::new(Some(format!("k{i}")), format!("value-{i}"))).collect();
    let stamped: Vec<_> = records.iter().map(|r| (r, 1_700_000_000_000)).collect();
    let mut out = Vec::new();
    encode_batch(&stamped, 0, Codec::None, TimestampKind::CreateTime, 0, &mut out).expect("encode");
    if let Some((id, epoch, seq)) = producer {
        out[43..51].copy_from_slice(&id.to_be_bytes());
        out[51..53].copy_from_slice(&epoch.to_be_bytes());
        out[53..57].copy_from_slice(&seq.to_be_bytes());
        let crc = crc32c::crc32c(&out[21..]);
        out[17..21].copy_from_slice(&crc.to_be_bytes());
    }
    Bytes::from(out)
}

pub(crate) fn produce_req(topic: &str, partition: i32, records: Bytes, acks: i16) -> ProduceRequest {
    ProduceRequest::default().with_acks(acks).with_timeout_ms(5000).with_topic_data(vec![
        produce_request::TopicProduceData::default().with_name(tn(topic)).with_partition_data(vec![
            produce_request::PartitionProduceData::default().with_index(partition).with_records(Some(records)),
        ]),
    ])
}

pub(crate) fn produce_result(r: &ProduceResponse) -> (i16, i64) {
    let p = &r.responses[0].partition_responses[0];
    (p.error_code, p.base_offset)
}

pub(crate) fn fetch_req(
    parts: &[(&str, i32, i64)],
    max_wait_ms: i32,
    min_bytes: i32,
    max_bytes: i32,
    part_max: i32,
) -> FetchRequest {
    let mut topics: Vec<fetch_request::FetchTopic> = Vec::new();
    for (t, p, off) in parts {
        let part = fetch_request::FetchPartition::default()
            .with_partition(*p)
            .with_fetch_offset(*off)
            .with_partition_max_bytes(part_max);
        match topics.last_mut() {
            Some(last) if last.topic.0.as_str() == *t => last.partitions.push(part),
            _ => topics.push(fetch_request::FetchTopic::default().with_topic(tn(t)).with_partitions(vec![part])),
        }
    }
    FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(max_wait_ms)
        .with_min_bytes(min_bytes)
        .with_max_bytes(max_bytes)
        .with_session_epoch(-1)
        .with_topics(topics)
}

#[test]
fn every_api_answers_at_every_advertised_version() {
    let rt = runtime();
    let broker = rt.block_on(KafkaBroker::start());
    let mut c = RawKafka::connect(broker.addr);

    // ApiVersions: the table itself.
    let mut advertised = std::collections::HashMap::new();
    for v in 0..=3 {
        let req = ApiVersionsRequest::default();
        let req =
            if v >= 3 { req.with_client_software_name(s("raw")).with_client_software_version(s("1")) } else { req };
        let r = c.call(&req, v);
        assert_eq!(r.error_code, 0);
        for k in &r.api_keys {
            advertised.insert(k.api_key, (k.min_version, k.max_version));
        }
    }
    let range = |k: i16| advertised.get(&k).copied().unwrap_or_else(|| panic!("api {k} advertised"));
    assert!(!advertised.contains_key(&68), "ConsumerGroupHeartbeat must not be advertised");

    // Metadata at every version auto-creates and describes a topic.
    let (lo, hi) = range(3);
    for v in lo..=hi {
        let name = format!("md-v{v}");
        let req = MetadataRequest::default()
            .with_topics(Some(vec![metadata_request::MetadataRequestTopic::default().with_name(Some(tn(&name)))]))
            .with_allow_auto_topic_creation(true);
        let r = c.call(&req, v);
        assert_eq!(r.brokers.len(), 1, "v{v}");
        assert_eq!(r.brokers[0].port, broker.addr.port() as i32, "v{v}");
        assert_eq!(r.topics[0].error_code, 0, "v{v}");
        assert_eq!(r.topics[0].partitions.len(), 1, "v{v}");
    }
    // Without auto-creation (v4+), an unknown topic is reported and not created.
    let req = MetadataRequest::default()
        .with_topics(Some(vec![metadata_request::MetadataRequestTopic::default().with_name(Some(tn("md-nope")))]))
        .with_allow_auto_topic_creation(false);
    assert_eq!(c.call(&req, 4).topics[0].error_code, 3, "UNKNOWN_TOPIC_OR_PARTITION");
    assert!(broker.store.topic("md-nope").is_none());
    // v0: an empty list means every topic; v1+: null means every topic.
    assert!(c.call(&MetadataRequest::default().with_topics(Some(vec![])), 0).topics.len() >= hi as usize);
    assert!(c.call(&MetadataRequest::default().with_topics(None), 1).topics.len() >= hi as usize);
    assert_eq!(c.call(&MetadataRequest::default().with_topics(Some(vec![])), 1).topics.len(), 0);

    // Produce v3.. and Fetch at every version.
    let (lo, hi) = range(0);
    assert_eq!(lo, 0, "Produce v0 advertised (librdkafka compresses only then)");
    let mut next = 0;
    for v in 3..=hi {
        let (err, base) = produce_result(&c.call(&produce_req("md-v1", 0, batch(3, None), -1), v));
        assert_eq!((err, base), (0, next), "Produce v{v}");
        next += 3;
    }
    let (lo, hi) = range(1);
    for v in lo..=hi {
        let r = c.call(&fetch_req(&[("md-v1", 0, 4)], 0, 0, 1 << 20, 1 << 20), v);
        let p = &r.responses[0].partitions[0];
        assert_eq!((p.error_code, p.high_watermark), (0, next), "Fetch v{v}");
        let records = p.records.as_ref().expect("records");
        assert_eq!(
            i64::from_be_bytes(records[..8].try_into().expect("8 bytes")),
            3,
            "Fetch v{v}: the batch holding offset 4"
        );
    }

    // ListOffsets: latest and earliest.
    let (lo, hi) = range(2);
    for v in lo..=hi {
        for (ts, want) in [(-1, next), (-2, 0)] {
            let req = ListOffsetsRequest::default().with_replica_id(BrokerId(-1)).with_topics(vec![
                list_offsets_request::ListOffsetsTopic::default().with_name(tn("md-v1")).with_partitions(vec![
                    list_offsets_request::ListOffsetsPartition::default().with_partition_index(0).with_timestamp(ts),
                ]),
            ]);
            let r = c.call(&req, v);
            let p = &r.topics[0].partitions[0];
            assert_eq!((p.error_code, p.offset), (0, want), "ListOffsets v{v} ts {ts}");
        }
    }

    // FindCoordinator: this node for groups, none for transactions.
    let (lo, hi) = range(10);
    for v in lo..=hi {
        let req = if v >= 4 {
            FindCoordinatorRequest::default().with_coordinator_keys(vec![s("g")])
        } else {
            FindCoordinatorRequest::default().with_key(s("g"))
        };
        let r = c.call(&req, v);
        let (err, node, port) = if v >= 4 {
            (r.coordinators[0].error_code, r.coordinators[0].node_id.0, r.coordinators[0].port)
        } else {
            (r.error_code, r.node_id.0, r.port)
        };
        assert_eq!((err, node, port), (0, 1, broker.addr.port() as i32), "FindCoordinator v{v}");
    }

    // InitProducerId: distinct ids at every version.
    let (lo, hi) = range(22);
    let mut ids = std::collections::HashSet::new();
    for v in lo..=hi {
        let r = c.call(
            &InitProducerIdRequest::default()
                .with_transactional_id(None)
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1),
            v,
        );
        assert_eq!((r.error_code, r.producer_epoch), (0, 0), "InitProducerId v{v}");
        assert!(ids.insert(r.producer_id.0), "InitProducerId v{v}: ids are never reused");
    }
    let r = c.call(&InitProducerIdRequest::default().with_transactional_id(Some(TransactionalId(s("tx")))), 1);
    assert_eq!(r.error_code, 53, "transactions are refused");

    // CreateTopics, CreatePartitions, DescribeConfigs, AlterConfigs, IncrementalAlterConfigs,
    // DeleteTopics at every version.
    let (lo, hi) = range(19);
    for v in lo..=hi {
        let name = format!("ct-v{v}");
        let req = CreateTopicsRequest::default().with_timeout_ms(5000).with_topics(vec![
            create_topics_request::CreatableTopic::default()
                .with_name(tn(&name))
                .with_num_partitions(2)
                .with_replication_factor(1)
                .with_configs(vec![create_topics_request::CreatableTopicConfig::default()
                    .with_name(s("retention.ms"))
                    .with_value(Some(s("60000")))]),
        ]);
        let r = c.call(&req, v);
        assert_eq!(r.topics[0].error_code, 0, "CreateTopics v{v}: {:?}", r.topics[0].error_message);
        let info = broker.store.topic(&name).expect("created");
        assert_eq!((info.partitions, info.config.retention_ms), (2, Some(60_000)), "CreateTopics v{v}");
        if v >= 5 {
            assert_eq!(r.topics[0].num_partitions, 2);
        }
    }
    let (lo, hi) = range(37);
    for v in lo..=hi {
        let req = CreatePartitionsRequest::default().with_timeout_ms(5000).with_topics(vec![
            create_partitions_request::CreatePartitionsTopic::default().with_name(tn("ct-v2")).with_count(3 + v as i32),
        ]);
        assert_eq!(c.call(&req, v).results[0].error_code, 0, "CreatePartitions v{v}");
        assert_eq!(broker.store.topic("ct-v2").expect("topic").partitions, 3 + v as u32);
    }
    let (lo, hi) = range(32);
    for v in lo..=hi {
        let req = DescribeConfigsRequest::default().with_resources(vec![
            describe_configs_request::DescribeConfigsResource::default()
                .with_resource_type(2)
                .with_resource_name(s("ct-v2"))
                .with_configuration_keys(None),
            describe_configs_request::DescribeConfigsResource::default()
                .with_resource_type(4)
                .with_resource_name(s("1"))
                .with_configuration_keys(Some(vec![s("num.partitions")])),
        ]);
        let r = c.call(&req, v);
        let topic = &r.results[0];
        assert_eq!(topic.error_code, 0, "DescribeConfigs v{v}");
        let get = |k: &str| {
            topic.configs.iter().find(|e| e.name.as_str() == k).and_then(|e| e.value.as_ref()).map(|v| v.to_string())
        };
        assert_eq!(get("retention.ms").as_deref(), Some("60000"), "DescribeConfigs v{v}");
        assert_eq!(r.results[1].configs.len(), 1, "only the asked broker key");
        assert_eq!(r.results[1].configs[0].value.as_ref().map(|v| v.to_string()).as_deref(), Some("1"));
    }
    let (lo, hi) = range(33);
    for v in lo..=hi {
        let req =
            AlterConfigsRequest::default().with_resources(vec![alter_configs_request::AlterConfigsResource::default()
                .with_resource_type(2)
                .with_resource_name(s("ct-v3"))
                .with_configs(vec![alter_configs_request::AlterableConfig::default()
                    .with_name(s("retention.bytes"))
                    .with_value(Some(s(&format!("{}", 1_000_000 + v as i64))))])]);
        assert_eq!(c.call(&req, v).responses[0].error_code, 0, "AlterConfigs v{v}");
        let cfg = broker.store.topic("ct-v3").expect("topic").config;
        assert_eq!(cfg.retention_bytes, Some(1_000_000 + v as u64));
        assert_eq!(cfg.retention_ms, Some(7 * 24 * 3600 * 1000), "AlterConfigs v{v} resets what it does not name");
    }
    let (lo, hi) = range(44);
    for v in lo..=hi {
        let change = |name: &str, op: i8, value: Option<&str>| {
            incremental_alter_configs_request::AlterableConfig::default()
                .with_name(s(name))
                .with_config_operation(op)
                .with_value(value.map(s))
        };
        let req = IncrementalAlterConfigsRequest::default().with_resources(vec![
            incremental_alter_configs_request::AlterConfigsResource::default()
                .with_resource_type(2)
                .with_resource_name(s("ct-v4"))
                .with_configs(vec![change("durability", 0, Some("relaxed")), change("retention.ms", 1, None)]),
        ]);
        assert_eq!(c.call(&req, v).responses[0].error_code, 0, "IncrementalAlterConfigs v{v}");
        let cfg = broker.store.topic("ct-v4").expect("topic").config;
        assert_eq!(cfg.durability, tributary_broker::Durability::Relaxed);
        assert_eq!(cfg.retention_ms, Some(7 * 24 * 3600 * 1000), "DELETE restores the default");
        let bad = IncrementalAlterConfigsRequest::default().with_resources(vec![
            incremental_alter_configs_request::AlterConfigsResource::default()
                .with_resource_type(2)
                .with_resource_name(s("ct-v4"))
                .with_configs(vec![change("cleanup.policy", 0, Some("archive"))]),
        ]);
        let r = c.call(&bad, v);
        assert_eq!(r.responses[0].error_code, 40, "INVALID_CONFIG for an invalid value");
        assert!(
            r.responses[0].error_message.as_deref().is_some_and(|m| m.contains("cleanup.policy")),
            "the message names the config: {:?}",
            r.responses[0].error_message
        );
    }
    // DeleteRecords at every version (v2 flexible): the log start moves, the low watermark is
    // answered; past the high watermark OFFSET_OUT_OF_RANGE, unknown partitions
    // UNKNOWN_TOPIC_OR_PARTITION, a compact-only topic POLICY_VIOLATION.
    rt.block_on(async {
        broker.store.create_topic("dr", 1, Default::default()).await.expect("topic");
        for _ in 0..5 {
            broker.store.append_batch("dr", 0, batch(10, None)).await.expect("append");
        }
    });
    let (lo, hi) = range(21);
    assert_eq!((lo, hi), (0, 2));
    for v in lo..=hi {
        let to = 10 * i64::from(v) + 5;
        let req = DeleteRecordsRequest::default().with_timeout_ms(5000).with_topics(vec![
            delete_records_request::DeleteRecordsTopic::default().with_name(tn("dr")).with_partitions(vec![
                delete_records_request::DeleteRecordsPartition::default().with_partition_index(0).with_offset(to),
                delete_records_request::DeleteRecordsPartition::default().with_partition_index(1).with_offset(0),
            ]),
            delete_records_request::DeleteRecordsTopic::default().with_name(tn("dr-nope")).with_partitions(vec![
                delete_records_request::DeleteRecordsPartition::default().with_partition_index(0).with_offset(0),
            ]),
        ]);
        let r = c.call(&req, v);
        let p = &r.topics[0].partitions;
        assert_eq!((p[0].error_code, p[0].low_watermark), (0, to), "DeleteRecords v{v}");
        assert_eq!((p[1].error_code, p[1].low_watermark), (3, -1), "DeleteRecords v{v}: unknown partition");
        assert_eq!(r.topics[1].partitions[0].error_code, 3, "DeleteRecords v{v}: unknown topic");
        assert_eq!(broker.store.watermarks("dr", 0).expect("wm").log_start_offset, to);
        let past = DeleteRecordsRequest::default().with_timeout_ms(5000).with_topics(vec![
            delete_records_request::DeleteRecordsTopic::default().with_name(tn("dr")).with_partitions(vec![
                delete_records_request::DeleteRecordsPartition::default().with_partition_index(0).with_offset(51),
            ]),
        ]);
        assert_eq!(c.call(&past, v).topics[0].partitions[0].error_code, 1, "OFFSET_OUT_OF_RANGE v{v}");
    }
    // A compact-only topic: POLICY_VIOLATION, as Kafka answers.
    rt.block_on(async {
        let mut cfg = tributary_broker::TopicConfig::default();
        cfg.set("cleanup.policy", Some("compact")).expect("policy");
        broker.store.create_topic("dr-compact", 1, cfg).await.expect("topic");
    });
    let req = DeleteRecordsRequest::default().with_timeout_ms(5000).with_topics(vec![
        delete_records_request::DeleteRecordsTopic::default().with_name(tn("dr-compact")).with_partitions(vec![
            delete_records_request::DeleteRecordsPartition::default().with_partition_index(0).with_offset(-1),
        ]),
    ]);
    assert_eq!(c.call(&req, 2).topics[0].partitions[0].error_code, 44, "POLICY_VIOLATION");
    let r = c.call(&fetch_req(&[("dr", 0, 0)], 0, 1, 1 << 20, 1 << 20), 11);
    assert_eq!(r.responses[0].partitions[0].error_code, 1, "a fetch below the new log start is out of range");
    assert_eq!(r.responses[0].partitions[0].log_start_offset, 25);

    let (lo, hi) = range(20);
    for v in lo..=hi {
        let name = format!("ct-v{}", v + 1);
        let req = DeleteTopicsRequest::default().with_timeout_ms(5000).with_topic_names(vec![tn(&name)]);
        assert_eq!(c.call(&req, v).responses[0].error_code, 0, "DeleteTopics v{v}");
        assert!(broker.store.topic(&name).is_none());
    }

    // DescribeCluster: the one node and a cluster id that survives a restart.
    let (lo, hi) = range(60);
    let mut cluster_id = String::new();
    for v in lo..=hi {
        let r = c.call(&DescribeClusterRequest::default(), v);
        assert_eq!((r.error_code, r.brokers.len(), r.controller_id.0), (0, 1, 1), "DescribeCluster v{v}");
        cluster_id = r.cluster_id.to_string();
    }
    drop(c);
    let broker = rt.block_on(broker.restart());
    let mut c = RawKafka::connect(broker.addr);
    assert_eq!(c.call(&DescribeClusterRequest::default(), 0).cluster_id.to_string(), cluster_id);
    let r = c.call(
        &InitProducerIdRequest::default()
            .with_transactional_id(None)
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1),
        0,
    );
    assert!(ids.iter().all(|id| r.producer_id.0 > *id), "producer ids are not reused after a restart");
}

#[test]
fn fetch_semantics_out_of_range_soft_limits_and_long_poll() {
    let rt = runtime();
    let broker = rt.block_on(KafkaBroker::start());
    rt.block_on(broker.store.create_topic("f", 3, Default::default())).expect("topic");
    let mut c = RawKafka::connect(broker.addr);
    for p in 0..2 {
        for _ in 0..4 {
            assert_eq!(produce_result(&c.call(&produce_req("f", p, batch(100, None), -1), 7)).0, 0);
        }
    }
    let one_batch = batch(100, None).len();

    // Offsets beyond the high watermark (and below the log start) are OFFSET_OUT_OF_RANGE.
    for off in [401, -5] {
        let r = c.call(&fetch_req(&[("f", 0, off)], 0, 0, 1 << 20, 1 << 20), 11);
        let p = &r.responses[0].partitions[0];
        assert_eq!((p.error_code, p.high_watermark, p.log_start_offset), (1, 400, 0), "offset {off}");
        assert_eq!(p.records.as_ref().map(Bytes::len), Some(0), "records are empty, never null");
    }
    // Unknown partition, next to a good one.
    let r = c.call(&fetch_req(&[("f", 0, 0), ("f", 9, 0)], 0, 0, 1 << 20, 1 << 20), 11);
    assert_eq!(r.responses[0].partitions[1].error_code, 3);

    // Soft limits (KIP-74): a limit smaller than one batch still returns that whole batch from
    // the first partition, and nothing from the next.
    let r = c.call(&fetch_req(&[("f", 0, 0), ("f", 1, 0)], 0, 1, 10, 10), 11);
    let parts = &r.responses[0].partitions;
    assert_eq!(parts[0].records.as_ref().map(Bytes::len), Some(one_batch), "one whole batch");
    assert_eq!(parts[1].records.as_ref().map(Bytes::len), Some(0));
    // A partition limit of two batches, a response limit of three.
    let r = c.call(&fetch_req(&[("f", 0, 0), ("f", 1, 0)], 0, 1, (3 * one_batch) as i32, (2 * one_batch) as i32), 11);
    let parts = &r.responses[0].partitions;
    assert_eq!(parts[0].records.as_ref().map(Bytes::len), Some(2 * one_batch));
    assert_eq!(parts[1].records.as_ref().map(Bytes::len), Some(one_batch));

    // Long poll: a fetch at the high watermark of two partitions returns when either gets data.
    // The append comes only once the fetch is parked, so it is the wake-up that answers it.
    let corr = c.send(&fetch_req(&[("f", 2, 0), ("f", 1, 400)], 20_000, 1, 1 << 20, 1 << 20), 11);
    let waiting = || broker.kafka_stats.fetches_waiting.load(std::sync::atomic::Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    while waiting() == 0 {
        assert!(Instant::now() < deadline, "the fetch never parked");
        std::thread::sleep(Duration::from_millis(2));
    }
    let started = Instant::now();
    let mut other = RawKafka::connect(broker.addr);
    assert_eq!(produce_result(&other.call(&produce_req("f", 2, batch(5, None), -1), 7)), (0, 0));
    let r = c.recv::<FetchRequest>(11, corr);
    assert!(started.elapsed() < Duration::from_secs(10), "woken by the append, not the 20 s timeout");
    assert_eq!(waiting(), 0);
    assert_eq!(r.responses[0].partitions[0].records.as_ref().map(Bytes::len), Some(batch(5, None).len()));
    // With nothing arriving, it returns empty after max_wait.
    let started = Instant::now();
    let r = c.call(&fetch_req(&[("f", 2, 5)], 300, 1, 1 << 20, 1 << 20), 11);
    assert!(started.elapsed() >= Duration::from_millis(290));
    assert_eq!(r.responses[0].partitions[0].records.as_ref().map(Bytes::len), Some(0));
}

#[test]
fn produce_acks_versions_and_sequence_errors() {
    let rt = runtime();
    let broker = rt.block_on(KafkaBroker::start());
    rt.block_on(broker.store.create_topic("p", 1, Default::default())).expect("topic");
    let mut c = RawKafka::connect(broker.addr);

    // acks=0: no response at all; the next response on the connection is the next request's
    // (`recv` checks each response's correlation id: an answer to the acks=0 request, before or
    // after the others, fails it).
    c.send(&produce_req("p", 0, batch(2, None), 0), 7);
    let r = c.call(&produce_req("p", 0, batch(2, None), 1), 7);
    assert_eq!(produce_result(&r), (0, 2), "the acks=0 batch was stored first");
    assert_eq!(c.call(&ApiVersionsRequest::default(), 0).error_code, 0, "the next frame answers ApiVersions");
    // acks=2 is not a thing on one node.
    assert_eq!(produce_result(&c.call(&produce_req("p", 0, batch(1, None), 2), 7)).0, 21, "INVALID_REQUIRED_ACKS");
    // zstd needs Produce v7.
    let mut zstd = batch(1, None).to_vec();
    zstd[22] |= 4;
    let crc = crc32c::crc32c(&zstd[21..]);
    zstd[17..21].copy_from_slice(&crc.to_be_bytes());
    assert_eq!(produce_result(&c.call(&produce_req("p", 0, Bytes::from(zstd), -1), 6)).0, 76);

    // Produce v2 (message format v0/v1): refused with UNSUPPORTED_VERSION, in a v2 response.
    let mut body = Vec::new();
    body.extend_from_slice(&(-1i16).to_be_bytes()); // acks
    body.extend_from_slice(&1000i32.to_be_bytes());
    body.extend_from_slice(&1i32.to_be_bytes());
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(b"p");
    body.extend_from_slice(&1i32.to_be_bytes());
    body.extend_from_slice(&0i32.to_be_bytes());
    body.extend_from_slice(&0i32.to_be_bytes()); // empty message set
    let mut frame = Vec::new();
    for part in [&0i16.to_be_bytes()[..], &2i16.to_be_bytes(), &77i32.to_be_bytes(), &(-1i16).to_be_bytes(), &body] {
        frame.extend_from_slice(part);
    }
    let mut raw = std::net::TcpStream::connect(broker.addr).expect("connect");
    std::io::Write::write_all(&mut raw, &[&(frame.len() as i32).to_be_bytes()[..], &frame].concat()).expect("send");
    let mut resp = vec![0u8; 4 + 4 + 4 + 2 + 1 + 4 + 4 + 2 + 8 + 8 + 4];
    std::io::Read::read_exact(&mut raw, &mut resp).expect("v2 response");
    assert_eq!(i32::from_be_bytes(resp[4..8].try_into().expect("4")), 77);
    assert_eq!(i16::from_be_bytes(resp[23..25].try_into().expect("2")), 35, "UNSUPPORTED_VERSION");

    // Idempotence: in order, a duplicate (original offset), a gap, an old epoch.
    let pid = c.call(
        &InitProducerIdRequest::default()
            .with_transactional_id(None)
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1),
        4,
    );
    let id = pid.producer_id.0;
    let hw = broker.store.watermarks("p", 0).expect("wm").high_watermark;
    assert_eq!(produce_result(&c.call(&produce_req("p", 0, batch(5, Some((id, 0, 0))), -1), 7)), (0, hw));
    assert_eq!(produce_result(&c.call(&produce_req("p", 0, batch(5, Some((id, 0, 5))), -1), 7)), (0, hw + 5));
    assert_eq!(produce_result(&c.call(&produce_req("p", 0, batch(5, Some((id, 0, 0))), -1), 7)), (0, hw), "duplicate");
    assert_eq!(produce_result(&c.call(&produce_req("p", 0, batch(5, Some((id, 0, 20))), -1), 7)).0, 45, "gap");
    let bumped = c.call(
        &InitProducerIdRequest::default()
            .with_transactional_id(None)
            .with_producer_id(ProducerId(id))
            .with_producer_epoch(0),
        4,
    );
    assert_eq!((bumped.producer_id.0, bumped.producer_epoch), (id, 1), "KIP-360 epoch bump");
    assert_eq!(produce_result(&c.call(&produce_req("p", 0, batch(1, Some((id, 1, 0))), -1), 7)), (0, hw + 10));
    assert_eq!(produce_result(&c.call(&produce_req("p", 0, batch(1, Some((id, 0, 10))), -1), 7)).0, 47, "old epoch");
    assert_eq!(broker.store.watermarks("p", 0).expect("wm").high_watermark, hw + 11, "refused batches are not stored");

    // Pipelining: many requests in flight on one connection, answered in order.
    let corrs: Vec<i32> = (0..50).map(|_| c.send(&produce_req("p", 0, batch(1, None), -1), 7)).collect();
    let mut last = hw + 10;
    for corr in corrs {
        let (err, base) = produce_result(&c.recv::<ProduceRequest>(7, corr));
        assert_eq!((err, base), (0, last + 1), "request order is offset order");
        last = base;
    }
}

#[test]
fn connection_limit_and_idle_timeout() {
    let rt = runtime();
    let broker = rt.block_on(KafkaBroker::start_with(KafkaConfig { connections_max: 2, ..KafkaConfig::default() }));
    let mut a = RawKafka::connect(broker.addr);
    let mut b = RawKafka::connect(broker.addr);
    assert_eq!(a.call(&ApiVersionsRequest::default(), 0).error_code, 0);
    assert_eq!(b.call(&ApiVersionsRequest::default(), 0).error_code, 0);
    let mut third = RawKafka::connect(broker.addr);
    third.send(&ApiVersionsRequest::default(), 0);
    assert!(third.recv_frame().is_none(), "over kafka.connections_max: closed");
    assert_eq!(a.call(&ApiVersionsRequest::default(), 0).error_code, 0, "the others keep working");
    drop(b);
    // A slot is free again once a connection closes (the close is noticed asynchronously).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut d = RawKafka::connect(broker.addr);
        d.send(&ApiVersionsRequest::default(), 0);
        if d.recv_frame().is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot was never reused");
    }

    // Silent for longer than kafka.idle_timeout_ms: closed by the broker.
    let idle = rt.block_on(KafkaBroker::start_with(KafkaConfig { idle_timeout_ms: 1000, ..KafkaConfig::default() }));
    let mut c = RawKafka::connect(idle.addr);
    assert_eq!(c.call(&ApiVersionsRequest::default(), 0).error_code, 0);
    let started = Instant::now();
    assert!(c.recv_frame().is_none(), "idle connection closed");
    assert!(started.elapsed() >= Duration::from_millis(900), "closed for being idle, not earlier");
}

#[test]
fn auto_creation_follows_the_config_switch() {
    let rt = runtime();
    let cfg = KafkaConfig { auto_create_topics: false, ..KafkaConfig::default() };
    let broker = rt.block_on(KafkaBroker::start_with(cfg));
    let mut c = RawKafka::connect(broker.addr);
    let req = MetadataRequest::default()
        .with_topics(Some(vec![metadata_request::MetadataRequestTopic::default().with_name(Some(tn("wanted")))]))
        .with_allow_auto_topic_creation(true);
    assert_eq!(c.call(&req, 4).topics[0].error_code, 3, "kafka.auto_create_topics = false: UNKNOWN_TOPIC_OR_PARTITION");
    assert!(broker.store.topic("wanted").is_none());
    // Producing to it is refused the same way, and creating it explicitly still works.
    assert_eq!(produce_result(&c.call(&produce_req("wanted", 0, batch(1, None), -1), 7)).0, 3);
    let create = CreateTopicsRequest::default().with_timeout_ms(5000).with_topics(vec![
        create_topics_request::CreatableTopic::default()
            .with_name(tn("wanted"))
            .with_num_partitions(-1)
            .with_replication_factor(-1),
    ]);
    assert_eq!(c.call(&create, 4).topics[0].error_code, 0);
    assert_eq!(broker.store.topic("wanted").expect("created").partitions, 1, "default partition count");
}

#[test]
fn group_apis_answer_at_every_advertised_version() {
    let rt = runtime();
    let broker = rt.block_on(KafkaBroker::start());
    rt.block_on(broker.store.create_topic("gt", 2, Default::default())).expect("topic");
    let mut c = RawKafka::connect(broker.addr);
    let protocols = || {
        vec![join_group_request::JoinGroupRequestProtocol::default()
            .with_name(s("range"))
            .with_metadata(Bytes::from_static(&[0, 0, 0, 0, 0, 1, 0, 2, b'g', b't', 0xff, 0xff, 0xff, 0xff]))]
    };
    for v in 0..=5i16 {
        let group = format!("g-v{v}");
        let join = |member: &str| {
            let mut j = JoinGroupRequest::default()
                .with_group_id(GroupId(s(&group)))
                .with_session_timeout_ms(10_000)
                .with_member_id(s(member))
                .with_protocol_type(s("consumer"))
                .with_protocols(protocols());
            if v >= 1 {
                j = j.with_rebalance_timeout_ms(10_000);
            }
            j
        };
        let mut r = c.call(&join(""), v);
        if v >= 4 {
            assert_eq!(r.error_code, 79, "JoinGroup v{v}: MEMBER_ID_REQUIRED first");
            let id = r.member_id.to_string();
            r = c.call(&join(&id), v);
        }
        assert_eq!((r.error_code, r.generation_id), (0, 1), "JoinGroup v{v}");
        assert_eq!(r.leader, r.member_id, "JoinGroup v{v}: the only member leads");
        assert_eq!(r.members.len(), 1);
        let member = r.member_id.clone();
        let sv = v.min(3);
        let sync = SyncGroupRequest::default()
            .with_group_id(GroupId(s(&group)))
            .with_generation_id(1)
            .with_member_id(member.clone())
            .with_assignments(vec![sync_group_request::SyncGroupRequestAssignment::default()
                .with_member_id(member.clone())
                .with_assignment(Bytes::from_static(b"assigned"))]);
        let sr = c.call(&sync, sv);
        assert_eq!((sr.error_code, &sr.assignment[..]), (0, &b"assigned"[..]), "SyncGroup v{sv}");
        let hb = HeartbeatRequest::default()
            .with_group_id(GroupId(s(&group)))
            .with_generation_id(1)
            .with_member_id(member.clone());
        assert_eq!(c.call(&hb, sv).error_code, 0, "Heartbeat v{sv}");
        assert_eq!(c.call(&hb.clone().with_generation_id(9), sv).error_code, 22, "Heartbeat v{sv}: ILLEGAL_GENERATION");

        // Offsets at every OffsetCommit and OffsetFetch version.
        for cv in 2..=7i16 {
            let commit = OffsetCommitRequest::default()
                .with_group_id(GroupId(s(&group)))
                .with_generation_id_or_member_epoch(1)
                .with_member_id(member.clone())
                .with_topics(vec![offset_commit_request::OffsetCommitRequestTopic::default()
                    .with_name(tn("gt"))
                    .with_partitions(vec![offset_commit_request::OffsetCommitRequestPartition::default()
                        .with_partition_index(1)
                        .with_committed_offset(100 + cv as i64)
                        .with_committed_metadata(Some(s("meta")))])]);
            let r = c.call(&commit, cv);
            assert_eq!(r.topics[0].partitions[0].error_code, 0, "OffsetCommit v{cv}");
        }
        for fv in 1..=5i16 {
            let fetch = OffsetFetchRequest::default().with_group_id(GroupId(s(&group))).with_topics(Some(vec![
                offset_fetch_request::OffsetFetchRequestTopic::default()
                    .with_name(tn("gt"))
                    .with_partition_indexes(vec![0, 1]),
            ]));
            let r = c.call(&fetch, fv);
            let parts = &r.topics[0].partitions;
            assert_eq!((parts[0].committed_offset, parts[1].committed_offset), (-1, 107), "OffsetFetch v{fv}");
            assert_eq!(parts[1].metadata.as_ref().map(|m| m.to_string()).as_deref(), Some("meta"));
            if fv >= 2 {
                let all =
                    c.call(&OffsetFetchRequest::default().with_group_id(GroupId(s(&group))).with_topics(None), fv);
                assert_eq!(all.topics[0].partitions.len(), 1, "OffsetFetch v{fv}: null topics = all committed");
            }
        }
        // Admin views.
        for lv in 0..=2i16 {
            let groups = c.call(&ListGroupsRequest::default(), lv).groups;
            assert!(groups.iter().any(|g| g.group_id.0.as_str() == group), "ListGroups v{lv}");
        }
        for dv in 0..=4i16 {
            let d = c.call(&DescribeGroupsRequest::default().with_groups(vec![GroupId(s(&group))]), dv);
            let g = &d.groups[0];
            assert_eq!(
                (g.group_state.as_str(), g.protocol_data.as_str(), g.members.len()),
                ("Stable", "range", 1),
                "DescribeGroups v{dv}"
            );
            assert_eq!(&g.members[0].member_assignment[..], b"assigned");
        }
        // OffsetDelete refuses a topic the members consume, DeleteGroups a group with members.
        let od = OffsetDeleteRequest::default().with_group_id(GroupId(s(&group))).with_topics(vec![
            offset_delete_request::OffsetDeleteRequestTopic::default().with_name(tn("gt")).with_partitions(vec![
                offset_delete_request::OffsetDeleteRequestPartition::default().with_partition_index(1),
            ]),
        ]);
        assert_eq!(c.call(&od, 0).topics[0].partitions[0].error_code, 86, "GROUP_SUBSCRIBED_TO_TOPIC");
        let del = DeleteGroupsRequest::default().with_groups_names(vec![GroupId(s(&group))]);
        assert_eq!(c.call(&del, v.min(1)).results[0].error_code, 68, "NON_EMPTY_GROUP");

        // Leave, then the group is empty and can lose its offsets and itself.
        let lv = v.min(3);
        let leave = if lv >= 3 {
            LeaveGroupRequest::default()
                .with_group_id(GroupId(s(&group)))
                .with_members(vec![leave_group_request::MemberIdentity::default().with_member_id(member.clone())])
        } else {
            LeaveGroupRequest::default().with_group_id(GroupId(s(&group))).with_member_id(member.clone())
        };
        let lr = c.call(&leave, lv);
        let err = if lv >= 3 { lr.members[0].error_code } else { lr.error_code };
        assert_eq!(err, 0, "LeaveGroup v{lv}");
        assert_eq!(c.call(&hb, sv).error_code, 25, "UNKNOWN_MEMBER_ID after leaving");
        assert_eq!(c.call(&od, 0).topics[0].partitions[0].error_code, 0, "OffsetDelete on an empty group");
        assert_eq!(c.call(&del, v.min(1)).results[0].error_code, 0, "DeleteGroups v{}", v.min(1));
        assert_eq!(c.call(&del, v.min(1)).results[0].error_code, 69, "GROUP_ID_NOT_FOUND");
    }
}

/// IncrementalAlterConfigs APPEND and SUBTRACT on a list config (`cleanup.policy`) as Kafka does
/// them, INVALID_CONFIG on a non-list config (and for an empty policy); DescribeConfigs with
/// `include_synonyms`: a topic config's own setting (DYNAMIC_TOPIC_CONFIG) then the broker-level
/// default it falls back to (`log.*`, DEFAULT_CONFIG), and the broker's
/// `group.initial.rebalance.delay.ms` with its configured value.
#[test]
fn list_configs_append_and_subtract_and_configs_show_their_synonyms() {
    let rt = runtime();
    let cfg = KafkaConfig { group_initial_rebalance_delay_ms: 1234, ..KafkaConfig::default() };
    let broker = rt.block_on(KafkaBroker::start_with(cfg));
    rt.block_on(broker.store.create_topic("lists", 1, Default::default())).expect("topic");
    let mut c = RawKafka::connect(broker.addr);
    let alter_on = |c: &mut RawKafka, name: &str, op: i8, value: Option<&str>| {
        let req = IncrementalAlterConfigsRequest::default().with_resources(vec![
            incremental_alter_configs_request::AlterConfigsResource::default()
                .with_resource_type(2)
                .with_resource_name(s("lists"))
                .with_configs(vec![incremental_alter_configs_request::AlterableConfig::default()
                    .with_name(s(name))
                    .with_config_operation(op)
                    .with_value(value.map(s))]),
        ]);
        let r = c.call(&req, 1);
        (r.responses[0].error_code, r.responses[0].error_message.as_ref().map(|m| m.to_string()).unwrap_or_default())
    };
    let mut alter = |name: &str, op: i8, value: Option<&str>| alter_on(&mut c, name, op, value);
    use tributary_broker::config::CleanupPolicy;
    let policy = |b: &KafkaBroker| b.store.topic("lists").expect("topic").config.cleanup_policy;
    assert_eq!(alter("cleanup.policy", 2, Some("compact")).0, 0, "APPEND compact");
    assert_eq!(policy(&broker), CleanupPolicy::CompactDelete, "delete (the default) + compact");
    assert_eq!(alter("cleanup.policy", 2, Some("compact")).0, 0, "APPEND what is there: no change");
    assert_eq!(policy(&broker), CleanupPolicy::CompactDelete);
    assert_eq!(alter("cleanup.policy", 3, Some("delete")).0, 0, "SUBTRACT delete");
    assert_eq!(policy(&broker), CleanupPolicy::Compact);
    let (code, msg) = alter("retention.ms", 2, Some("1000"));
    assert_eq!(code, 40, "INVALID_CONFIG: APPEND to a non-list config");
    assert!(msg.contains("retention.ms") && msg.contains("not LIST"), "{msg}");
    let (code, msg) = alter("cleanup.policy", 3, Some("compact"));
    assert_eq!(code, 40, "INVALID_CONFIG: an empty policy");
    assert!(msg.contains("cleanup.policy"), "{msg}");
    assert_eq!(policy(&broker), CleanupPolicy::Compact, "refusals change nothing");

    let describe = |c: &mut RawKafka, synonyms: bool| {
        let req = DescribeConfigsRequest::default().with_include_synonyms(synonyms).with_resources(vec![
            describe_configs_request::DescribeConfigsResource::default()
                .with_resource_type(2)
                .with_resource_name(s("lists"))
                .with_configuration_keys(Some(vec![s("cleanup.policy"), s("retention.ms")])),
            describe_configs_request::DescribeConfigsResource::default()
                .with_resource_type(4)
                .with_resource_name(s("1"))
                .with_configuration_keys(Some(vec![s("group.initial.rebalance.delay.ms")])),
        ]);
        c.call(&req, 4)
    };
    let r = describe(&mut c, true);
    let shown = |e: &describe_configs_response::DescribeConfigsResourceResult| {
        let syn: Vec<(String, Option<String>, i8)> = e
            .synonyms
            .iter()
            .map(|y| (y.name.to_string(), y.value.as_ref().map(|v| v.to_string()), y.source))
            .collect();
        (e.name.to_string(), e.value.as_ref().map(|v| v.to_string()), e.config_source, syn)
    };
    let mut topic: Vec<_> = r.results[0].configs.iter().map(shown).collect();
    topic.sort();
    let some = |v: &str| Some(v.to_string());
    assert_eq!(
        topic,
        [
            (
                "cleanup.policy".to_string(),
                some("compact"),
                1,
                vec![
                    ("cleanup.policy".to_string(), some("compact"), 1),
                    ("log.cleanup.policy".to_string(), some("delete"), 5)
                ]
            ),
            (
                "retention.ms".to_string(),
                some("604800000"),
                5,
                vec![("log.retention.ms".to_string(), some("604800000"), 5)]
            ),
        ]
    );
    let brokers: Vec<_> = r.results[1].configs.iter().map(shown).collect();
    assert_eq!(
        brokers,
        [(
            "group.initial.rebalance.delay.ms".to_string(),
            some("1234"),
            4,
            vec![("group.initial.rebalance.delay.ms".to_string(), some("1234"), 4)]
        )]
    );
    let r = describe(&mut c, false);
    assert!(r.results.iter().flat_map(|x| &x.configs).all(|e| e.synonyms.is_empty()), "synonyms only when asked");

    // Set to the default's own value, a setting is still the topic's (Kafka lists it as
    // DYNAMIC_TOPIC_CONFIG, and `kafka-configs --describe` shows it) until it is deleted.
    let source = |c: &mut RawKafka| {
        let r = describe(c, true);
        let e = r.results[0].configs.iter().find(|e| e.name.as_str() == "retention.ms").expect("retention.ms");
        (e.config_source, e.synonyms.iter().map(|y| y.source).collect::<Vec<_>>())
    };
    assert_eq!(alter_on(&mut c, "retention.ms", 0, Some("604800000")).0, 0, "SET to the default value");
    assert_eq!(source(&mut c), (1, vec![1, 5]), "the topic's own setting, then the default it hides");
    assert_eq!(alter_on(&mut c, "retention.ms", 1, None).0, 0, "DELETE");
    assert_eq!(source(&mut c), (5, vec![5]), "the default again");
}
