//! Metadata (topics the user may see, auto-creation with a create right) and DescribeCluster: this
//! one-node cluster as advertised.

use std::sync::Arc;

use kafka_protocol::messages::{
    describe_cluster_response, metadata_response, BrokerId, DescribeClusterResponse, MetadataResponse,
};

use crate::error::StoreError;
use crate::kafka::context::{encode, reply, sb, topic_name, Call, Ctx, PendingReply, Reply};
use crate::kafka::errors::{self, code};
use crate::kafka::requests::{self};
use crate::security::TopicOp;

pub(super) fn metadata_request(ctx: Arc<Ctx>, call: Call, req: requests::MetadataRequest) -> PendingReply {
    Box::pin(async move {
        let resp = metadata(&ctx, &call, req).await;
        Ok(Some(Reply::one(encode(&call, &resp)?, vec![call.permit])))
    })
}

pub(super) fn describe_cluster(ctx: &Ctx, call: Call) -> PendingReply {
    let resp = DescribeClusterResponse::default()
        .with_cluster_id(sb(ctx.cluster_id.clone()))
        .with_controller_id(BrokerId(ctx.cfg.node_id))
        .with_brokers(vec![describe_cluster_response::DescribeClusterBroker::default()
            .with_broker_id(BrokerId(ctx.cfg.node_id))
            .with_host(sb(ctx.advertised_host.clone()))
            .with_port(ctx.advertised_port)]);
    reply(call, &resp)
}

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
