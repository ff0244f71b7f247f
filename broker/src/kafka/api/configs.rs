//! DescribeConfigs, AlterConfigs and IncrementalAlterConfigs: topic settings by their Kafka
//! names (broker settings are read-only: they come from gateway.toml).

use std::sync::Arc;

use kafka_protocol::messages::{
    alter_configs_response, describe_configs_response, incremental_alter_configs_response, AlterConfigsResponse,
    DescribeConfigsResponse, IncrementalAlterConfigsResponse,
};

use crate::config::TopicConfig;
use crate::kafka::context::{encode, reply, sb, Call, Ctx, PendingReply, Reply, NOT_AUTHORIZED};
use crate::kafka::errors::{self, code};
use crate::kafka::requests::{self, ConfigResource};
use crate::security::{Access, TopicOp};

const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;
/// Kafka's ConfigSource values.
const SOURCE_DYNAMIC_TOPIC: i8 = 1;
const SOURCE_STATIC_BROKER: i8 = 4;
const SOURCE_DEFAULT: i8 = 5;
/// Kafka's ConfigType values.
const TYPE_BOOLEAN: i8 = 1;
const TYPE_STRING: i8 = 2;
const TYPE_INT: i8 = 3;
const TYPE_LONG: i8 = 5;
const TYPE_DOUBLE: i8 = 6;
const TYPE_LIST: i8 = 7;
/// IncrementalAlterConfigs operations.
const OP_SET: i8 = 0;
const OP_DELETE: i8 = 1;
const OP_APPEND: i8 = 2;
const OP_SUBTRACT: i8 = 3;

/// The served topic configs whose type is LIST in Kafka: the ones APPEND and SUBTRACT apply to
/// (Kafka's other list topic configs, the replication throttles, are not served).
const LIST_CONFIGS: &[&str] = &["cleanup.policy"];

/// IncrementalAlterConfigs' APPEND (adds the items not there yet, at the end) and SUBTRACT
/// (removes every item named) on a list config's current value (`current`: the topic's, or the
/// default), as Kafka's ConfigurationControlManager does; on any other config the error Kafka
/// answers INVALID_CONFIG with. A value of `None` changes nothing.
fn list_op(key: &str, op: i8, current: &str, value: Option<&str>) -> Result<String, String> {
    let verb = if op == OP_APPEND { "APPEND" } else { "SUBTRACT" };
    if !LIST_CONFIGS.contains(&key) {
        return Err(format!("Can't {verb} to key {key} because its type is not LIST."));
    }
    let mut items: Vec<&str> = current.split(',').map(str::trim).filter(|i| !i.is_empty()).collect();
    let given = value.into_iter().flat_map(|v| v.split(',')).map(str::trim).filter(|i| !i.is_empty());
    for item in given {
        if op == OP_APPEND {
            if !items.contains(&item) {
                items.push(item);
            }
        } else {
            items.retain(|i| *i != item);
        }
    }
    Ok(items.join(","))
}

pub(super) fn describe_configs_request(ctx: &Ctx, call: Call, req: requests::ConfigsRequest) -> PendingReply {
    let resp = describe_configs(ctx, &call, req);
    reply(call, &resp)
}

pub(super) fn alter_configs_request(ctx: Arc<Ctx>, call: Call, req: requests::ConfigsRequest) -> PendingReply {
    Box::pin(async move {
        let results = alter_configs(&ctx, &call.access, req, false).await;
        let mut resp = AlterConfigsResponse::default();
        for AlterResult { resource_type: t, resource_name: name, error_code: err, message: msg } in results {
            resp.responses.push(
                alter_configs_response::AlterConfigsResourceResponse::default()
                    .with_resource_type(t)
                    .with_resource_name(sb(name))
                    .with_error_code(err)
                    .with_error_message(msg.map(sb)),
            );
        }
        Ok(Some(Reply::one(encode(&call, &resp)?, vec![call.permit])))
    })
}

pub(super) fn incremental_alter_configs_request(
    ctx: Arc<Ctx>,
    call: Call,
    req: requests::ConfigsRequest,
) -> PendingReply {
    Box::pin(async move {
        let results = alter_configs(&ctx, &call.access, req, true).await;
        let mut resp = IncrementalAlterConfigsResponse::default();
        for AlterResult { resource_type: t, resource_name: name, error_code: err, message: msg } in results {
            resp.responses.push(
                incremental_alter_configs_response::AlterConfigsResourceResponse::default()
                    .with_resource_type(t)
                    .with_resource_name(sb(name))
                    .with_error_code(err)
                    .with_error_message(msg.map(sb)),
            );
        }
        Ok(Some(Reply::one(encode(&call, &resp)?, vec![call.permit])))
    })
}

/// Where a topic config's value comes from, as Kafka answers it: the topic's own setting
/// (DYNAMIC_TOPIC_CONFIG) when a client set it (even to the default's value) or it differs
/// from the gateway's `[topic_defaults]`, else the broker-level default: STATIC_BROKER_CONFIG
/// when gateway.toml changes Kafka's default, DEFAULT_CONFIG when it does not.
pub(super) fn config_source(ctx: &Ctx, cfg: &TopicConfig, key: &str) -> i8 {
    if cfg.is_own(key, &ctx.defaults.config) {
        SOURCE_DYNAMIC_TOPIC
    } else {
        broker_default_source(ctx, key)
    }
}

fn broker_default_source(ctx: &Ctx, key: &str) -> i8 {
    if ctx.defaults.config.get(key) == TopicConfig::default().get(key) {
        SOURCE_DEFAULT
    } else {
        SOURCE_STATIC_BROKER
    }
}

/// The broker config Kafka names as a topic config's synonym (the default a topic without its
/// own setting gets), in the topic config's unit (Kafka also lists `log.retention.hours` and
/// `log.roll.hours`, their coarser forms). `durability` is ours: no synonym.
fn broker_synonym(key: &str) -> Option<&'static str> {
    Some(match key {
        "compression.type" => "compression.type",
        "retention.bytes" => "log.retention.bytes",
        "retention.ms" => "log.retention.ms",
        "message.timestamp.type" => "log.message.timestamp.type",
        "cleanup.policy" => "log.cleanup.policy",
        "delete.retention.ms" => "log.cleaner.delete.retention.ms",
        "min.compaction.lag.ms" => "log.cleaner.min.compaction.lag.ms",
        "max.compaction.lag.ms" => "log.cleaner.max.compaction.lag.ms",
        "min.cleanable.dirty.ratio" => "log.cleaner.min.cleanable.ratio",
        "segment.bytes" => "log.segment.bytes",
        "segment.ms" => "log.roll.ms",
        "segment.jitter.ms" => "log.roll.jitter.ms",
        "segment.index.bytes" => "log.index.size.max.bytes",
        _ => return None,
    })
}

/// A topic config's synonyms as Kafka orders them: the topic's own setting (if it has one), then
/// the broker-level default it would fall back to.
fn topic_synonyms(ctx: &Ctx, cfg: &TopicConfig, key: &str) -> Vec<describe_configs_response::DescribeConfigsSynonym> {
    let synonym = |name: &str, value: Option<String>, source: i8| {
        describe_configs_response::DescribeConfigsSynonym::default()
            .with_name(sb(name))
            .with_value(value.map(sb))
            .with_source(source)
    };
    let mut out = Vec::with_capacity(2);
    if config_source(ctx, cfg, key) == SOURCE_DYNAMIC_TOPIC {
        out.push(synonym(key, cfg.get(key), SOURCE_DYNAMIC_TOPIC));
    }
    if let Some(name) = broker_synonym(key) {
        out.push(synonym(name, ctx.defaults.config.get(key), broker_default_source(ctx, key)));
    }
    out
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
        "cleanup.policy" => (
            "delete (retention.ms/bytes delete old batches), compact (the latest record per key is kept; \
             keyless records are refused) or compact,delete.",
            TYPE_LIST,
        ),
        "delete.retention.ms" => ("How long a tombstone stays after compaction first passed over it.", TYPE_LONG),
        "min.compaction.lag.ms" => ("Batches appended less than this ago are not compacted.", TYPE_LONG),
        "max.compaction.lag.ms" => {
            ("A partition with an uncompacted batch older than this is compacted whatever its dirty ratio.", TYPE_LONG)
        }
        "min.cleanable.dirty.ratio" => {
            ("Share of a partition's bytes appended since its last compaction that starts one.", TYPE_DOUBLE)
        }
        "segment.bytes" | "segment.index.bytes" => (
            "Accepted for Kafka's tools; the log is a redb table without segment files, so nothing is rolled.",
            TYPE_INT,
        ),
        "segment.ms" | "segment.jitter.ms" => (
            "Accepted for Kafka's tools; the log is a redb table without segment files, so nothing is rolled.",
            TYPE_LONG,
        ),
        _ => ("CreateTime (the producer's timestamp) or LogAppendTime (the gateway's clock).", TYPE_STRING),
    }
}

fn describe_configs(ctx: &Ctx, call: &Call, req: requests::ConfigsRequest) -> DescribeConfigsResponse {
    let mut resp = DescribeConfigsResponse::default();
    let v = call.version;
    let synonyms = v >= 1 && req.include_synonyms;
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
                        let mut e = entry(k, value, false, config_source(ctx, &info.config, k), doc, ty);
                        if synonyms {
                            e = e.with_synonyms(topic_synonyms(ctx, &info.config, k));
                        }
                        r.configs.push(e);
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
                    (
                        "group.initial.rebalance.delay.ms",
                        ctx.cfg.group_initial_rebalance_delay_ms.to_string(),
                        "kafka.group_initial_rebalance_delay_ms",
                        TYPE_INT,
                    ),
                ];
                for (name, value, doc, ty) in broker_entries.into_iter().filter(|e| wanted(e.0)) {
                    let mut e = entry(name, value.clone(), true, SOURCE_STATIC_BROKER, doc, ty);
                    if synonyms {
                        // Kafka lists a broker config's own static setting as its synonym.
                        e = e.with_synonyms(vec![describe_configs_response::DescribeConfigsSynonym::default()
                            .with_name(sb(name))
                            .with_value(Some(sb(value)))
                            .with_source(SOURCE_STATIC_BROKER)]);
                    }
                    r.configs.push(e);
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
/// One resource's answer to AlterConfigs or IncrementalAlterConfigs.
struct AlterResult {
    resource_type: i8,
    resource_name: String,
    error_code: i16,
    message: Option<String>,
}

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
                    for requests::ConfigChange { name: k, op, value } in &changes {
                        let r = match (incremental, *op) {
                            (false, _) | (true, OP_SET) => cfg.set(k, value.as_deref()).map_err(|e| e.to_string()),
                            (true, OP_DELETE) => cfg.reset_to(k, &ctx.defaults.config).map_err(|e| e.to_string()),
                            (true, op @ (OP_APPEND | OP_SUBTRACT)) => {
                                let current = cfg.get(k).or_else(|| ctx.defaults.config.get(k)).unwrap_or_default();
                                list_op(k, op, &current, value.as_deref()).and_then(|list| {
                                    // An empty list is not a policy (refused naming the key).
                                    cfg.set(k, Some(&list)).map_err(|e| e.to_string())
                                })
                            }
                            (true, op) => Err(format!("{k}: unknown config operation {op}")),
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
            Ok(()) => out.push(AlterResult { resource_type, resource_name, error_code: errors::NONE, message: None }),
            Err((c, m)) => out.push(AlterResult { resource_type, resource_name, error_code: c, message: Some(m) }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kafka's APPEND and SUBTRACT on a list config: items added once, at the end; every named
    /// item removed; other configs refused with Kafka's message.
    #[test]
    fn append_and_subtract_work_on_list_configs_only() {
        assert_eq!(list_op("cleanup.policy", OP_APPEND, "delete", Some("compact")), Ok("delete,compact".into()));
        assert_eq!(
            list_op("cleanup.policy", OP_APPEND, "compact", Some("compact,delete")),
            Ok("compact,delete".into())
        );
        assert_eq!(list_op("cleanup.policy", OP_APPEND, "delete", None), Ok("delete".into()));
        assert_eq!(list_op("cleanup.policy", OP_SUBTRACT, "compact,delete", Some("delete")), Ok("compact".into()));
        assert_eq!(list_op("cleanup.policy", OP_SUBTRACT, "compact", Some("delete")), Ok("compact".into()));
        assert_eq!(list_op("cleanup.policy", OP_SUBTRACT, "compact", Some("compact")), Ok(String::new()));
        assert_eq!(
            list_op("retention.ms", OP_APPEND, "1000", Some("2000")),
            Err("Can't APPEND to key retention.ms because its type is not LIST.".into())
        );
        assert_eq!(
            list_op("compression.type", OP_SUBTRACT, "lz4", Some("lz4")),
            Err("Can't SUBTRACT to key compression.type because its type is not LIST.".into())
        );
    }
}
