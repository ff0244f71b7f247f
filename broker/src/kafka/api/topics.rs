//! Topic administration: CreateTopics (with per-topic settings, validate-only), DeleteTopics and
//! CreatePartitions.

use std::sync::Arc;

use kafka_protocol::messages::{
    create_partitions_response, create_topics_response, delete_topics_response, CreatePartitionsResponse,
    CreateTopicsResponse, DeleteTopicsResponse,
};

use super::configs::config_source;
use crate::config::TopicConfig;
use crate::kafka::context::{encode, sb, topic_name, Call, Ctx, PendingReply, Reply, NOT_AUTHORIZED};
use crate::kafka::errors::{self, code};
use crate::kafka::requests::{self};
use crate::security::{Access, TopicOp};

pub(super) fn create_topics_request(ctx: Arc<Ctx>, call: Call, req: requests::CreateTopicsRequest) -> PendingReply {
    Box::pin(async move {
        let resp = create_topics(&ctx, &call, req).await;
        Ok(Some(Reply::one(encode(&call, &resp)?, vec![call.permit])))
    })
}

pub(super) fn delete_topics(ctx: Arc<Ctx>, call: Call, names: Vec<String>) -> PendingReply {
    Box::pin(async move {
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
    })
}

pub(super) fn create_partitions_request(
    ctx: Arc<Ctx>,
    call: Call,
    req: requests::CreatePartitionsRequest,
) -> PendingReply {
    Box::pin(async move {
        let resp = create_partitions(&ctx, &call.access, req).await;
        Ok(Some(Reply::one(encode(&call, &resp)?, vec![call.permit])))
    })
}

pub(super) fn topic_settings(ctx: &Ctx, configs: &[requests::ConfigEntry]) -> Result<TopicConfig, String> {
    let mut cfg = ctx.defaults.config.clone();
    for requests::ConfigEntry { name: k, value: v } in configs {
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
    for requests::PartitionsTopic { name, count, assignments: assigned } in req.topics {
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
