//! What each served Kafka API does on this one-node cluster: produce into and fetch from the
//! log store, offsets, metadata, topic administration and configs. Responses are built with the
//! protocol crate's types and encoded at the request's version.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    alter_configs_response, api_versions_response, create_partitions_response, create_topics_response,
    delete_topics_response, describe_cluster_response, describe_configs_response, find_coordinator_response,
    incremental_alter_configs_response, list_offsets_response, metadata_response, produce_response,
    AlterConfigsResponse, ApiVersionsResponse, BrokerId, CreatePartitionsResponse, CreateTopicsResponse,
    DeleteTopicsResponse, DescribeClusterResponse, DescribeConfigsResponse, FindCoordinatorResponse,
    IncrementalAlterConfigsResponse, InitProducerIdResponse, ListOffsetsResponse, MetadataResponse, ProduceResponse,
    ProducerId, TopicName,
};
use kafka_protocol::protocol::{Encodable, StrBytes};

use super::codec::frame_response;
use super::context::{encode, reply, Call, Ctx, PendingReply, Reply};
use super::errors::{self, code};
use super::requests::{self, ConfigResource, Request};
use super::versions::SUPPORTED;
use crate::config::TopicConfig;
use crate::error::StoreError;
use crate::security::{Access, TopicOp};
use crate::storage::{PendingAppend, Store};

const NOT_AUTHORIZED: &str = "not authorized by the user's ACL";

const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;
/// Kafka's ConfigSource values.
const SOURCE_DYNAMIC_TOPIC: i8 = 1;
const SOURCE_STATIC_BROKER: i8 = 4;
/// Kafka's ConfigType values.
const TYPE_BOOLEAN: i8 = 1;
const TYPE_STRING: i8 = 2;
const TYPE_INT: i8 = 3;
const TYPE_LONG: i8 = 5;

fn sb(s: impl Into<String>) -> StrBytes {
    StrBytes::from_string(s.into())
}

fn topic_name(s: &str) -> TopicName {
    TopicName(sb(s))
}

/// Starts a request's work. Produce queues its appends before returning (request order is
/// append order); the rest happens in the returned future.
pub(crate) async fn dispatch(ctx: Arc<Ctx>, call: Call, body: Request) -> PendingReply {
    tracing::trace!(api = call.api.name, version = call.version, client = ?call.client_id, "kafka request");
    let (call, body) = match super::group_api::handle(ctx.clone(), call, body) {
        Ok(pending) => return pending,
        Err(not_a_group_api) => *not_a_group_api,
    };
    match body {
        Request::ApiVersions => reply_api_versions(call, ctx.auth.enabled()),
        Request::Produce(req) => produce(ctx, call, req).await,
        Request::Fetch(req) => Box::pin(async move {
            let (partitions, permit) = super::fetch::fetch(&ctx, req, &call.access).await;
            let chunks = super::fetch::encode_response(call.correlation_id, call.version, &partitions);
            Ok(Some(Reply { chunks, permits: [Some(call.permit), permit].into_iter().flatten().collect() }))
        }),
        Request::ListOffsets(req) => Box::pin(async move {
            // Timestamp lookups read the log: on the blocking pool, not an async worker.
            let (store, access, v) = (ctx.store.clone(), call.access.clone(), call.version);
            let resp = tokio::task::spawn_blocking(move || list_offsets(&store, &access, v, req))
                .await
                .map_err(|e| format!("ListOffsets task failed: {e}"))?;
            Ok(Some(Reply::one(encode(&call, &resp)?, vec![call.permit])))
        }),
        Request::Metadata(req) => Box::pin(async move {
            let resp = metadata(&ctx, &call, req).await;
            Ok(Some(Reply::one(encode(&call, &resp)?, vec![call.permit])))
        }),
        Request::CreateTopics(req) => Box::pin(async move {
            let resp = create_topics(&ctx, &call, req).await;
            Ok(Some(Reply::one(encode(&call, &resp)?, vec![call.permit])))
        }),
        Request::DeleteTopics(names) => Box::pin(async move {
            let mut resp = DeleteTopicsResponse::default();
            for name in names {
                let error_code = if !call.access.topic(TopicOp::Delete, &name) {
                    errors::TOPIC_AUTHORIZATION_FAILED
                } else {
                    match ctx.store.delete_topic(&name).await {
                        Ok(()) => {
                            tracing::info!(topic = %name, user = ?call.access.user(), "topic deleted by a Kafka client");
                            errors::NONE
                        }
                        Err(e) => code(&e),
                    }
                };
                resp.responses.push(
                    delete_topics_response::DeletableTopicResult::default()
                        .with_name(Some(topic_name(&name)))
                        .with_error_code(error_code),
                );
            }
            Ok(Some(Reply::one(encode(&call, &resp)?, vec![call.permit])))
        }),
        Request::InitProducerId(req) => Box::pin(async move {
            let resp = if call.access.any_write() {
                init_producer_id(&ctx, req).await
            } else {
                InitProducerIdResponse::default()
                    .with_producer_id(ProducerId(-1))
                    .with_producer_epoch(-1)
                    .with_error_code(errors::CLUSTER_AUTHORIZATION_FAILED)
            };
            Ok(Some(Reply::one(encode(&call, &resp)?, vec![call.permit])))
        }),
        Request::DescribeConfigs(req) => {
            let resp = describe_configs(&ctx, &call, req);
            reply(call, &resp)
        }
        Request::AlterConfigs(req) => Box::pin(async move {
            let results = alter_configs(&ctx, &call.access, req, false).await;
            let mut resp = AlterConfigsResponse::default();
            for (t, name, err, msg) in results {
                resp.responses.push(
                    alter_configs_response::AlterConfigsResourceResponse::default()
                        .with_resource_type(t)
                        .with_resource_name(sb(name))
                        .with_error_code(err)
                        .with_error_message(msg.map(sb)),
                );
            }
            Ok(Some(Reply::one(encode(&call, &resp)?, vec![call.permit])))
        }),
        Request::IncrementalAlterConfigs(req) => Box::pin(async move {
            let results = alter_configs(&ctx, &call.access, req, true).await;
            let mut resp = IncrementalAlterConfigsResponse::default();
            for (t, name, err, msg) in results {
                resp.responses.push(
                    incremental_alter_configs_response::AlterConfigsResourceResponse::default()
                        .with_resource_type(t)
                        .with_resource_name(sb(name))
                        .with_error_code(err)
                        .with_error_message(msg.map(sb)),
                );
            }
            Ok(Some(Reply::one(encode(&call, &resp)?, vec![call.permit])))
        }),
        Request::CreatePartitions(req) => Box::pin(async move {
            let resp = create_partitions(&ctx, &call.access, req).await;
            Ok(Some(Reply::one(encode(&call, &resp)?, vec![call.permit])))
        }),
        Request::FindCoordinator(key_type, keys) => {
            let resp = find_coordinator(&ctx, &call, key_type, keys);
            reply(call, &resp)
        }
        Request::JoinGroup(_)
        | Request::SyncGroup(_)
        | Request::Heartbeat(_)
        | Request::LeaveGroup(..)
        | Request::OffsetCommit(_)
        | Request::OffsetFetch(..)
        | Request::ListGroups
        | Request::DescribeGroups(_)
        | Request::DeleteGroups(_)
        | Request::OffsetDelete(..) => {
            Box::pin(async { Err("group request not routed to the coordinator".to_string()) })
        }
        Request::SaslHandshake(_) | Request::SaslAuthenticate(_) => {
            Box::pin(async { Err("SASL request not routed to the connection's authentication".to_string()) })
        }
        Request::DescribeCluster => {
            let resp = DescribeClusterResponse::default()
                .with_cluster_id(sb(ctx.cluster_id.clone()))
                .with_controller_id(BrokerId(ctx.cfg.node_id))
                .with_brokers(vec![describe_cluster_response::DescribeClusterBroker::default()
                    .with_broker_id(BrokerId(ctx.cfg.node_id))
                    .with_host(sb(ctx.advertised_host.clone()))
                    .with_port(ctx.advertised_port)]);
            reply(call, &resp)
        }
    }
}

// ---- ApiVersions ----

/// The APIs served; the SASL ones only with authentication on (a client that sees them
/// advertised may try to use them).
fn api_versions_body(error_code: i16, auth: bool) -> ApiVersionsResponse {
    ApiVersionsResponse::default().with_error_code(error_code).with_api_keys(
        SUPPORTED
            .iter()
            .filter(|a| auth || !a.is_sasl())
            .map(|a| {
                api_versions_response::ApiVersion::default()
                    .with_api_key(a.key)
                    .with_min_version(a.min)
                    .with_max_version(a.max)
            })
            .collect(),
    )
}

fn reply_api_versions(call: Call, auth: bool) -> PendingReply {
    reply(call, &api_versions_body(errors::NONE, auth))
}

/// KIP-511: the answer to an ApiVersions request at a version we do not know.
pub(crate) fn api_versions_unsupported(correlation_id: i32, auth: bool) -> Result<Bytes, String> {
    let body = api_versions_body(errors::UNSUPPORTED_VERSION, auth);
    let size = body.compute_size(0).map_err(|e| e.to_string())?;
    frame_response(correlation_id, false, size, |buf| body.encode(buf, 0).map_err(|e| e.to_string()))
}

// ---- Produce ----

enum PartitionProduce {
    Queued(PendingAppend),
    Failed(i16, String),
    /// INVALID_RECORD for one record of the batch: its index and why.
    RecordRefused(i32, String),
}

async fn produce(ctx: Arc<Ctx>, call: Call, req: requests::ProduceRequest) -> PendingReply {
    let v = call.version;
    let refuse_all = if v < 3 {
        Some((errors::UNSUPPORTED_VERSION, "Produce v0-v2 (message formats v0/v1) are not supported".to_string()))
    } else if req.transactional_id.is_some() {
        Some((errors::TRANSACTIONAL_ID_AUTHORIZATION_FAILED, "transactions are not supported".to_string()))
    } else if !(-1..=1).contains(&req.acks) {
        Some((errors::INVALID_REQUIRED_ACKS, format!("acks must be -1, 0 or 1 (got {})", req.acks)))
    } else {
        None
    };
    let mut results: Vec<(String, Vec<(i32, PartitionProduce)>)> = Vec::with_capacity(req.topics.len());
    for (topic, parts) in req.topics {
        let mut out = Vec::with_capacity(parts.len());
        let allowed = call.access.topic(TopicOp::Write, &topic);
        // MQTT publish rules apply to the records' `mqtt.topic` headers (decoded only if needed).
        let mqtt_user = match &call.access {
            Access::User(u) if allowed && super::mqtt_rules::needs_check(u, &topic) => Some(u.clone()),
            _ => None,
        };
        let decompressed_limit = ctx.store.config().decompressed_size_bytes_max;
        for (partition, records) in parts {
            let r = match (&refuse_all, records) {
                (Some((c, m)), _) => PartitionProduce::Failed(*c, m.clone()),
                (None, _) if !allowed => {
                    PartitionProduce::Failed(errors::TOPIC_AUTHORIZATION_FAILED, NOT_AUTHORIZED.into())
                }
                (None, None) => PartitionProduce::Failed(errors::INVALID_RECORD, "records are null".into()),
                (None, Some(batch)) if v < 7 && batch.len() > 22 && batch[22] & 0x07 == 4 => PartitionProduce::Failed(
                    errors::UNSUPPORTED_COMPRESSION_TYPE,
                    "zstd needs Produce v7 or later".into(),
                ),
                (None, Some(batch)) => {
                    match mqtt_user.as_ref().map(|u| super::mqtt_rules::check_batch(u, &batch, decompressed_limit)) {
                        Some(Err((index, why))) => {
                            tracing::warn!(peer = %call.peer, %topic, partition, %why, "produce refused by the MQTT publish rules");
                            PartitionProduce::RecordRefused(index, why)
                        }
                        _ => match ctx.store.enqueue_batch(&topic, partition, batch).await {
                            Ok(p) => PartitionProduce::Queued(p),
                            Err(e) => {
                                tracing::debug!(%topic, partition, error = %e, "produce refused");
                                PartitionProduce::Failed(code(&e), e.to_string())
                            }
                        },
                    }
                }
            };
            out.push((partition, r));
        }
        results.push((topic, out));
    }
    if req.acks == 0 && refuse_all.is_none() {
        // No response; the appends complete on their own.
        return Box::pin(async { Ok(None) });
    }
    Box::pin(async move {
        let mut topics = Vec::with_capacity(results.len());
        for (topic, parts) in results {
            let mut out = Vec::with_capacity(parts.len());
            for (partition, r) in parts {
                let (error_code, msg, outcome, record) = match r {
                    PartitionProduce::Failed(c, m) => (c, Some(m), None, None),
                    PartitionProduce::RecordRefused(i, m) => (errors::INVALID_RECORD, Some(m), None, Some(i)),
                    PartitionProduce::Queued(p) => match p.wait().await {
                        Ok(o) => (errors::NONE, None, Some(o), None),
                        Err(e) => {
                            tracing::debug!(%topic, partition, error = %e, "produce failed");
                            (code(&e), Some(e.to_string()), None, None)
                        }
                    },
                };
                out.push((partition, error_code, msg, outcome, record));
            }
            topics.push((topic, out));
        }
        let bytes = if v < 3 {
            produce_response_v0_v2(call.correlation_id, v, &topics)
        } else {
            let mut resp = ProduceResponse::default();
            for (topic, parts) in topics {
                let mut t = produce_response::TopicProduceResponse::default().with_name(topic_name(&topic));
                for (partition, error_code, msg, outcome, record) in parts {
                    let mut p = produce_response::PartitionProduceResponse::default()
                        .with_index(partition)
                        .with_error_code(error_code)
                        .with_base_offset(-1)
                        .with_log_append_time_ms(-1)
                        .with_log_start_offset(-1);
                    if let Some(o) = outcome {
                        p = p
                            .with_base_offset(o.base_offset)
                            .with_log_append_time_ms(o.log_append_time_ms.unwrap_or(-1))
                            .with_log_start_offset(o.log_start_offset);
                    }
                    if v >= 8 {
                        if let Some(index) = record.filter(|i| *i >= 0) {
                            p = p.with_record_errors(vec![produce_response::BatchIndexAndErrorMessage::default()
                                .with_batch_index(index)
                                .with_batch_index_error_message(msg.clone().map(sb))]);
                        }
                        p = p.with_error_message(msg.map(sb));
                    }
                    t.partition_responses.push(p);
                }
                resp.responses.push(t);
            }
            encode(&call, &resp)?
        };
        Ok(Some(Reply::one(bytes, vec![call.permit])))
    })
}

/// Per partition: index, error code, error message, outcome, and the refused record's index.
type ProducedTopic = (String, Vec<(i32, i16, Option<String>, Option<crate::storage::AppendOutcome>, Option<i32>)>);

/// Produce v0-v2 responses, written by hand: the protocol crate no longer encodes them.
fn produce_response_v0_v2(correlation_id: i32, v: i16, topics: &[ProducedTopic]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i32(0);
    b.put_i32(correlation_id);
    b.put_i32(topics.len() as i32);
    for (name, parts) in topics {
        b.put_i16(name.len() as i16);
        b.put_slice(name.as_bytes());
        b.put_i32(parts.len() as i32);
        for (partition, error_code, ..) in parts {
            b.put_i32(*partition);
            b.put_i16(*error_code);
            b.put_i64(-1);
            if v >= 2 {
                b.put_i64(-1);
            }
        }
    }
    if v >= 1 {
        b.put_i32(0);
    }
    let size = (b.len() - 4) as i32;
    b[..4].copy_from_slice(&size.to_be_bytes());
    b.freeze()
}

// ---- ListOffsets ----

fn list_offsets(
    store: &Store,
    access: &Access,
    version: i16,
    req: requests::ListOffsetsRequest,
) -> ListOffsetsResponse {
    let mut resp = ListOffsetsResponse::default();
    for (topic, parts) in req.topics {
        let mut t = list_offsets_response::ListOffsetsTopicResponse::default().with_name(topic_name(&topic));
        let allowed = access.topic(TopicOp::Describe, &topic);
        for (partition, timestamp) in parts {
            let mut p = list_offsets_response::ListOffsetsPartitionResponse::default()
                .with_partition_index(partition)
                .with_timestamp(-1)
                .with_offset(-1);
            if version >= 4 {
                p = p.with_leader_epoch(0);
            }
            if !allowed {
                t.partitions.push(p.with_error_code(errors::TOPIC_AUTHORIZATION_FAILED));
                continue;
            }
            let result = match timestamp {
                -1 => store.watermarks(&topic, partition).map(|w| Some((w.high_watermark, -1))),
                -2 => store.watermarks(&topic, partition).map(|w| Some((w.log_start_offset, -1))),
                ts if ts >= 0 => store.offset_for_timestamp(&topic, partition, ts).and_then(|found| match found {
                    Some(f) => Ok(Some(f)),
                    // No record at or after the timestamp: Kafka answers -1/-1.
                    None => store.watermarks(&topic, partition).map(|_| None),
                }),
                _ => {
                    t.partitions.push(p.with_error_code(errors::INVALID_REQUEST));
                    continue;
                }
            };
            p = match result {
                Ok(Some((offset, ts))) => p.with_offset(offset).with_timestamp(ts),
                Ok(None) => p,
                Err(e) => p.with_error_code(code(&e)),
            };
            t.partitions.push(p);
        }
        resp.topics.push(t);
    }
    resp
}

// ---- Metadata ----

async fn metadata(ctx: &Arc<Ctx>, call: &Call, req: requests::MetadataRequest) -> MetadataResponse {
    let node = BrokerId(ctx.cfg.node_id);
    let mut resp = MetadataResponse::default().with_brokers(vec![metadata_response::MetadataResponseBroker::default()
        .with_node_id(node)
        .with_host(sb(ctx.advertised_host.clone()))
        .with_port(ctx.advertised_port)]);
    if call.version >= 2 {
        resp = resp.with_cluster_id(Some(sb(ctx.cluster_id.clone())));
    }
    if call.version >= 1 {
        resp = resp.with_controller_id(node);
    }
    // As Kafka: a listing shows only the topics the user may see; a topic asked for by name that
    // the user may neither see nor create is answered TOPIC_AUTHORIZATION_FAILED.
    let names: Vec<String> = match req.topics {
        None => {
            ctx.store.topics().into_iter().map(|t| t.name).filter(|t| call.access.topic(TopicOp::Describe, t)).collect()
        }
        Some(names) => names,
    };
    for name in names {
        let may_create = call.access.topic(TopicOp::Create, &name);
        if !call.access.topic(TopicOp::Describe, &name) && !may_create {
            resp.topics.push(
                metadata_response::MetadataResponseTopic::default()
                    .with_name(Some(topic_name(&name)))
                    .with_error_code(errors::TOPIC_AUTHORIZATION_FAILED),
            );
            continue;
        }
        let mut info = ctx.store.topic(&name);
        let mut error = errors::UNKNOWN_TOPIC_OR_PARTITION;
        if info.is_none() && ctx.cfg.auto_create_topics && req.allow_auto_topic_creation && may_create {
            match ctx.store.create_topic(&name, ctx.defaults.partitions, ctx.defaults.config.clone()).await {
                Ok(()) => tracing::info!(topic = %name, partitions = ctx.defaults.partitions, "topic auto-created"),
                Err(StoreError::TopicExists(_)) => {}
                Err(e) => {
                    tracing::debug!(topic = %name, error = %e, "topic auto-creation refused");
                    error = code(&e);
                }
            }
            info = ctx.store.topic(&name);
        }
        // Topics of the broker's own (`__sys`: the MQTT `$SYS` messages) are internal, as in Kafka.
        let mut t = metadata_response::MetadataResponseTopic::default()
            .with_name(Some(topic_name(&name)))
            .with_is_internal(name.starts_with("__"));
        match info {
            None => t = t.with_error_code(error),
            Some(info) => {
                t.partitions = (0..info.partitions as i32)
                    .map(|i| {
                        metadata_response::MetadataResponsePartition::default()
                            .with_partition_index(i)
                            .with_leader_id(node)
                            .with_leader_epoch(0)
                            .with_replica_nodes(vec![node])
                            .with_isr_nodes(vec![node])
                    })
                    .collect();
            }
        }
        resp.topics.push(t);
    }
    resp
}

// ---- Topic administration ----

fn topic_settings(ctx: &Ctx, configs: &[(String, Option<String>)]) -> Result<TopicConfig, String> {
    let mut cfg = ctx.defaults.config.clone();
    for (k, v) in configs {
        cfg.set(k, v.as_deref()).map_err(|e| e.to_string())?;
    }
    Ok(cfg)
}

async fn create_topics(ctx: &Arc<Ctx>, call: &Call, req: requests::CreateTopicsRequest) -> CreateTopicsResponse {
    let mut resp = CreateTopicsResponse::default();
    let mut seen = std::collections::HashSet::new();
    for t in req.topics {
        let partitions = if t.num_partitions == -1 {
            if t.assignments > 0 {
                t.assignments as i32
            } else {
                ctx.defaults.partitions as i32
            }
        } else {
            t.num_partitions
        };
        let settings = topic_settings(ctx, &t.configs);
        let result: Result<(), (i16, String)> = if !call.access.topic(TopicOp::Create, &t.name) {
            Err((errors::TOPIC_AUTHORIZATION_FAILED, NOT_AUTHORIZED.into()))
        } else if !seen.insert(t.name.clone()) {
            Err((errors::INVALID_REQUEST, "topic named twice in one request".into()))
        } else if !matches!(t.replication_factor, -1 | 1) {
            Err((
                errors::INVALID_REPLICATION_FACTOR,
                format!(
                    "this gateway is a one-node cluster: replication factor must be 1 (got {})",
                    t.replication_factor
                ),
            ))
        } else if t.assignments > 0 && t.num_partitions != -1 {
            Err((errors::INVALID_REQUEST, "give either a partition count or replica assignments".into()))
        } else if partitions <= 0 {
            Err((errors::INVALID_PARTITIONS, format!("partition count must be positive (got {partitions})")))
        } else {
            match &settings {
                Err(m) => Err((errors::INVALID_CONFIG, m.clone())),
                Ok(_) if req.validate_only => match crate::storage::validate_topic_name(&t.name) {
                    Ok(()) if ctx.store.topic(&t.name).is_some() => {
                        Err((errors::TOPIC_ALREADY_EXISTS, format!("topic {:?} already exists", t.name)))
                    }
                    Ok(()) => Ok(()),
                    Err(e) => Err((code(&e), e.to_string())),
                },
                Ok(cfg) => match ctx.store.create_topic(&t.name, partitions as u32, cfg.clone()).await {
                    Ok(()) => {
                        tracing::info!(topic = %t.name, partitions, "topic created by a Kafka client");
                        Ok(())
                    }
                    Err(e) => Err((code(&e), e.to_string())),
                },
            }
        };
        let mut r = create_topics_response::CreatableTopicResult::default().with_name(topic_name(&t.name));
        match result {
            Ok(()) => {
                if call.version >= 5 {
                    let cfg = settings.unwrap_or_default();
                    r = r.with_num_partitions(partitions).with_replication_factor(1).with_configs(Some(
                        TopicConfig::KEYS
                            .iter()
                            .map(|k| {
                                create_topics_response::CreatableTopicConfigs::default()
                                    .with_name(sb(*k))
                                    .with_value(cfg.get(k).map(sb))
                                    .with_config_source(config_source(ctx, &cfg, k))
                            })
                            .collect(),
                    ));
                }
            }
            Err((c, m)) => r = r.with_error_code(c).with_error_message(Some(sb(m))),
        }
        resp.topics.push(r);
    }
    resp
}

async fn create_partitions(
    ctx: &Arc<Ctx>,
    access: &Access,
    req: requests::CreatePartitionsRequest,
) -> CreatePartitionsResponse {
    let mut resp = CreatePartitionsResponse::default();
    for (name, count, assigned) in req.topics {
        let result = if !access.admin() {
            Err((
                errors::TOPIC_AUTHORIZATION_FAILED,
                format!("{NOT_AUTHORIZED} (adding partitions is an admin operation)"),
            ))
        } else if count <= 0 {
            Err((errors::INVALID_PARTITIONS, format!("partition count must be positive (got {count})")))
        } else if assigned {
            Err((errors::INVALID_REPLICA_ASSIGNMENT, "this gateway is a one-node cluster: omit assignments".into()))
        } else if req.validate_only {
            match ctx.store.topic(&name) {
                None => Err((errors::UNKNOWN_TOPIC_OR_PARTITION, format!("unknown topic {name:?}"))),
                Some(t) if t.partitions >= count as u32 => Err((
                    errors::INVALID_PARTITIONS,
                    format!("topic has {} partitions; the new count must be larger", t.partitions),
                )),
                Some(_) => Ok(()),
            }
        } else {
            ctx.store.create_partitions(&name, count as u32).await.map_err(|e| (code(&e), e.to_string()))
        };
        let mut r = create_partitions_response::CreatePartitionsTopicResult::default().with_name(topic_name(&name));
        if let Err((c, m)) = result {
            r = r.with_error_code(c).with_error_message(Some(sb(m)));
        } else if !req.validate_only {
            tracing::info!(topic = %name, partitions = count, "partitions added by a Kafka client");
        }
        resp.results.push(r);
    }
    resp
}

// ---- Configs ----

fn config_source(ctx: &Ctx, cfg: &TopicConfig, key: &str) -> i8 {
    if cfg.get(key) == ctx.defaults.config.get(key) {
        SOURCE_STATIC_BROKER
    } else {
        SOURCE_DYNAMIC_TOPIC
    }
}

fn topic_config_doc(key: &str) -> (&'static str, i8) {
    match key {
        "compression.type" => {
            ("Codec of batches the gateway builds itself; client batches are stored as sent.", TYPE_STRING)
        }
        "durability" => (
            "fsync: acknowledged once on disk. relaxed: flushed within storage.relaxed_flush_interval_ms.",
            TYPE_STRING,
        ),
        "retention.bytes" => ("Size limit per partition; -1 = only the gateway's disk budget applies.", TYPE_LONG),
        "retention.ms" => ("Age limit of batches; -1 = no age limit.", TYPE_LONG),
        _ => ("CreateTime (the producer's timestamp) or LogAppendTime (the gateway's clock).", TYPE_STRING),
    }
}

fn describe_configs(ctx: &Ctx, call: &Call, req: requests::ConfigsRequest) -> DescribeConfigsResponse {
    let mut resp = DescribeConfigsResponse::default();
    let v = call.version;
    for res in req.resources {
        let wanted = |k: &str| res.keys.as_ref().is_none_or(|keys| keys.iter().any(|w| w == k));
        let mut r = describe_configs_response::DescribeConfigsResult::default()
            .with_resource_type(res.resource_type)
            .with_resource_name(sb(res.resource_name.clone()));
        let entry = |name: &str, value: String, read_only: bool, source: i8, doc: &str, ty: i8| {
            let mut e = describe_configs_response::DescribeConfigsResourceResult::default()
                .with_name(sb(name))
                .with_value(Some(sb(value)))
                .with_read_only(read_only)
                .with_config_source(source);
            if v >= 3 {
                e = e.with_config_type(ty).with_documentation(Some(sb(doc)));
            }
            e
        };
        match res.resource_type {
            RESOURCE_TOPIC if !call.access.topic(TopicOp::Describe, &res.resource_name) => {
                r = r.with_error_code(errors::TOPIC_AUTHORIZATION_FAILED).with_error_message(Some(sb(NOT_AUTHORIZED)));
            }
            RESOURCE_BROKER if !call.access.admin() => {
                r = r
                    .with_error_code(errors::CLUSTER_AUTHORIZATION_FAILED)
                    .with_error_message(Some(sb(NOT_AUTHORIZED)));
            }
            RESOURCE_TOPIC => match ctx.store.topic(&res.resource_name) {
                None => {
                    r = r
                        .with_error_code(errors::UNKNOWN_TOPIC_OR_PARTITION)
                        .with_error_message(Some(sb(format!("unknown topic {:?}", res.resource_name))));
                }
                Some(info) => {
                    for k in TopicConfig::KEYS.iter().filter(|k| wanted(k)) {
                        let (doc, ty) = topic_config_doc(k);
                        let value = info.config.get(k).unwrap_or_default();
                        r.configs.push(entry(k, value, false, config_source(ctx, &info.config, k), doc, ty));
                    }
                }
            },
            RESOURCE_BROKER => {
                let storage = ctx.store.config();
                let broker_entries = [
                    (
                        "auto.create.topics.enable",
                        ctx.cfg.auto_create_topics.to_string(),
                        "kafka.auto_create_topics",
                        TYPE_BOOLEAN,
                    ),
                    ("num.partitions", ctx.defaults.partitions.to_string(), "topic_defaults.partitions", TYPE_INT),
                    (
                        "message.max.bytes",
                        storage.append_size_bytes_max.to_string(),
                        "storage.append_size_bytes_max",
                        TYPE_INT,
                    ),
                    (
                        "socket.request.max.bytes",
                        ctx.cfg.frame_bytes_max.to_string(),
                        "kafka.frame_bytes_max",
                        TYPE_INT,
                    ),
                    (
                        "log.retention.bytes",
                        storage.max_bytes.to_string(),
                        "storage.max_bytes (all topics together)",
                        TYPE_LONG,
                    ),
                ];
                for (name, value, doc, ty) in broker_entries.into_iter().filter(|e| wanted(e.0)) {
                    r.configs.push(entry(name, value, true, SOURCE_STATIC_BROKER, doc, ty));
                }
            }
            other => {
                r = r
                    .with_error_code(errors::INVALID_REQUEST)
                    .with_error_message(Some(sb(format!("resource type {other} is not supported"))));
            }
        }
        resp.results.push(r);
    }
    resp
}

/// (resource type, resource name, error code, error message) per resource.
type AlterResult = (i8, String, i16, Option<String>);

async fn alter_configs(
    ctx: &Arc<Ctx>,
    access: &Access,
    req: requests::ConfigsRequest,
    incremental: bool,
) -> Vec<AlterResult> {
    let mut out = Vec::with_capacity(req.resources.len());
    for ConfigResource { resource_type, resource_name, changes, .. } in req.resources {
        let result: Result<(), (i16, String)> = match resource_type {
            RESOURCE_TOPIC if !access.admin() => Err((
                errors::TOPIC_AUTHORIZATION_FAILED,
                format!("{NOT_AUTHORIZED} (altering topic settings is an admin operation)"),
            )),
            RESOURCE_BROKER if !access.admin() => Err((errors::CLUSTER_AUTHORIZATION_FAILED, NOT_AUTHORIZED.into())),
            RESOURCE_TOPIC => match ctx.store.topic(&resource_name) {
                None => Err((errors::UNKNOWN_TOPIC_OR_PARTITION, format!("unknown topic {resource_name:?}"))),
                Some(info) => {
                    let mut cfg = if incremental { info.config.clone() } else { ctx.defaults.config.clone() };
                    let mut bad = None;
                    for (k, op, value) in &changes {
                        let r = match (incremental, op) {
                            (false, _) | (true, 0) => cfg.set(k, value.as_deref()).map_err(|e| e.to_string()),
                            (true, 1) => cfg.set(k, ctx.defaults.config.get(k).as_deref()).map_err(|e| e.to_string()),
                            (true, _) => Err(format!("{k}: APPEND and SUBTRACT apply to list settings only")),
                        };
                        if let Err(m) = r {
                            bad = Some(m);
                            break;
                        }
                    }
                    match bad {
                        Some(m) => Err((errors::INVALID_CONFIG, m)),
                        None if req.validate_only => Ok(()),
                        None => match ctx.store.alter_topic_config(&resource_name, cfg).await {
                            Ok(()) => {
                                tracing::info!(topic = %resource_name, "topic settings changed by a Kafka client");
                                Ok(())
                            }
                            Err(e) => Err((code(&e), e.to_string())),
                        },
                    }
                }
            },
            RESOURCE_BROKER => {
                Err((errors::INVALID_REQUEST, "broker settings come from gateway.toml and cannot be altered".into()))
            }
            other => Err((errors::INVALID_REQUEST, format!("resource type {other} is not supported"))),
        };
        match result {
            Ok(()) => out.push((resource_type, resource_name, errors::NONE, None)),
            Err((c, m)) => out.push((resource_type, resource_name, c, Some(m))),
        }
    }
    out
}

// ---- Coordinator ----

const COORDINATOR_NOT_AVAILABLE_MSG: &str = "transactions are not supported";

fn find_coordinator(ctx: &Ctx, call: &Call, key_type: i8, keys: Vec<String>) -> FindCoordinatorResponse {
    // This node coordinates every group; transactions have no coordinator.
    let allowed = keys.iter().all(|k| call.access.group(k));
    let (error, msg) = if key_type == 0 && !allowed {
        (errors::GROUP_AUTHORIZATION_FAILED, Some(sb(NOT_AUTHORIZED)))
    } else if key_type == 0 {
        (errors::NONE, None)
    } else {
        (errors::COORDINATOR_NOT_AVAILABLE, Some(sb(COORDINATOR_NOT_AVAILABLE_MSG)))
    };
    let (node, host, port) = if error == errors::NONE {
        (ctx.cfg.node_id, sb(ctx.advertised_host.clone()), ctx.advertised_port)
    } else {
        (-1, sb(""), -1)
    };
    if call.version >= 4 {
        FindCoordinatorResponse::default().with_coordinators(
            keys.into_iter()
                .map(|k| {
                    find_coordinator_response::Coordinator::default()
                        .with_key(sb(k))
                        .with_node_id(BrokerId(node))
                        .with_host(host.clone())
                        .with_port(port)
                        .with_error_code(error)
                        .with_error_message(msg.clone())
                })
                .collect(),
        )
    } else {
        let mut r = FindCoordinatorResponse::default()
            .with_error_code(error)
            .with_node_id(BrokerId(node))
            .with_host(host)
            .with_port(port);
        if call.version >= 1 {
            r = r.with_error_message(msg);
        }
        r
    }
}

// ---- Idempotent producers ----

async fn init_producer_id(ctx: &Arc<Ctx>, req: requests::InitProducerIdRequest) -> InitProducerIdResponse {
    let resp = InitProducerIdResponse::default().with_producer_id(ProducerId(-1)).with_producer_epoch(-1);
    if req.transactional_id.is_some() {
        return resp.with_error_code(errors::TRANSACTIONAL_ID_AUTHORIZATION_FAILED);
    }
    // KIP-360: a known producer may ask for its epoch to be bumped (after a fatal sequence error).
    if req.producer_id >= 0 && req.producer_epoch >= 0 && req.producer_epoch < i16::MAX - 1 {
        return resp.with_producer_id(ProducerId(req.producer_id)).with_producer_epoch(req.producer_epoch + 1);
    }
    match ctx.next_producer_id().await {
        Ok(id) => resp.with_producer_id(ProducerId(id)).with_producer_epoch(0),
        Err(e) => resp.with_error_code(code(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_versions_fallback_is_a_v0_body() {
        let b = api_versions_unsupported(7, true).unwrap();
        let size = i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        assert_eq!(size as usize, b.len() - 4);
        assert_eq!(i32::from_be_bytes([b[4], b[5], b[6], b[7]]), 7);
        assert_eq!(i16::from_be_bytes([b[8], b[9]]), errors::UNSUPPORTED_VERSION);
        assert_eq!(i32::from_be_bytes([b[10], b[11], b[12], b[13]]) as usize, SUPPORTED.len());
    }
}
