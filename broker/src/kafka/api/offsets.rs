//! The group-offset APIs on the wire: OffsetCommit, OffsetFetch (reads on the blocking pool) and
//! OffsetDelete (an admin operation), mapped onto the coordinator in `kafka/groups/`.

use std::sync::Arc;

use kafka_protocol::messages::{
    offset_commit_response, offset_delete_response, offset_fetch_response, OffsetCommitResponse, OffsetDeleteResponse,
    OffsetFetchResponse, TopicName,
};

use crate::kafka::context::{encode, reply, sb, Call, Ctx, PendingReply, Reply};
use crate::kafka::errors;
use crate::kafka::requests::{self, OffsetCommitRequest, TopicPartitions};
use crate::security::{Access, TopicOp};

pub(super) fn commit(ctx: Arc<Ctx>, call: Call, req: OffsetCommitRequest) -> PendingReply {
    if !call.access.group(&req.group_id) {
        super::refused(&call);
        let e = errors::GROUP_AUTHORIZATION_FAILED;
        let resp = commit_response(req.offsets.into_iter().map(|o| ((o.topic, o.partition), e)));
        return reply(call, &resp);
    }
    Box::pin(async move {
        let resp = offset_commit(&ctx, &call.access, req).await;
        Ok(Some(Reply::one(encode(&call, &resp)?, vec![call.permit])))
    })
}

pub(super) fn fetch(ctx: Arc<Ctx>, call: Call, req: requests::OffsetFetchRequest) -> PendingReply {
    let requests::OffsetFetchRequest { group_id: group, topics } = req;
    if !call.access.group(&group) {
        super::refused(&call);
        return reply(call, &refused_fetch(topics.unwrap_or_default()));
    }
    Box::pin(async move {
        let resp = offset_fetch(&ctx, &call, group, topics).await;
        Ok(Some(Reply::one(encode(&call, &resp)?, vec![call.permit])))
    })
}

/// OffsetFetch refused: v0-v1 have no top-level error, so each asked partition carries it.
fn refused_fetch(topics: Vec<TopicPartitions>) -> OffsetFetchResponse {
    let e = errors::GROUP_AUTHORIZATION_FAILED;
    let mut resp = OffsetFetchResponse::default().with_error_code(e);
    for TopicPartitions { name: t, partitions: ps } in topics {
        resp.topics.push(
            offset_fetch_response::OffsetFetchResponseTopic::default().with_name(TopicName(sb(t))).with_partitions(
                ps.into_iter()
                    .map(|p| {
                        offset_fetch_response::OffsetFetchResponsePartition::default()
                            .with_partition_index(p)
                            .with_committed_offset(-1)
                            .with_error_code(e)
                    })
                    .collect(),
            ),
        );
    }
    resp
}

pub(super) fn delete(ctx: &Ctx, call: Call, req: requests::OffsetDeleteRequest) -> PendingReply {
    let requests::OffsetDeleteRequest { group_id: group, topics } = req;
    // Deleting offsets is an admin operation.
    if !call.access.admin() {
        super::refused(&call);
        return reply(call, &OffsetDeleteResponse::default().with_error_code(errors::GROUP_AUTHORIZATION_FAILED));
    }
    let groups = ctx.groups.clone();
    Box::pin(async move {
        let partitions: Vec<(std::sync::Arc<str>, i32)> = topics
            .iter()
            .flat_map(|TopicPartitions { name: t, partitions: ps }| {
                let t: std::sync::Arc<str> = t.as_str().into();
                ps.iter().map(move |p| (t.clone(), *p))
            })
            .collect();
        let (top, codes) = groups.offset_delete(&group, &partitions).await;
        let mut resp = OffsetDeleteResponse::default().with_error_code(top);
        if top == errors::NONE {
            let mut codes = codes.into_iter();
            for TopicPartitions { name: t, partitions: ps } in topics {
                resp.topics.push(
                    offset_delete_response::OffsetDeleteResponseTopic::default()
                        .with_name(TopicName(sb(t)))
                        .with_partitions(
                            ps.into_iter()
                                .map(|p| {
                                    offset_delete_response::OffsetDeleteResponsePartition::default()
                                        .with_partition_index(p)
                                        .with_error_code(codes.next().unwrap_or(errors::NONE))
                                })
                                .collect(),
                        ),
                );
            }
        }
        Ok(Some(Reply::one(encode(&call, &resp)?, vec![call.permit])))
    })
}

async fn offset_commit(ctx: &Ctx, access: &Access, mut req: OffsetCommitRequest) -> OffsetCommitResponse {
    let keys: Vec<(Arc<str>, i32)> = req.offsets.iter().map(|o| (o.topic.clone(), o.partition)).collect();
    // Offsets of topics the user may not read are refused; the rest are committed together.
    let readable: Vec<bool> = keys.iter().map(|(t, _)| access.topic(TopicOp::Read, t)).collect();
    req.offsets.retain(|o| access.topic(TopicOp::Read, &o.topic));
    let mut committed = ctx
        .groups
        .commit(&req.group_id, req.generation, &req.member_id, req.instance_id.as_deref(), req.offsets)
        .await
        .into_iter();
    let codes: Vec<i16> = readable
        .into_iter()
        .map(|ok| {
            if ok {
                committed.next().unwrap_or(errors::UNKNOWN_SERVER_ERROR)
            } else {
                errors::TOPIC_AUTHORIZATION_FAILED
            }
        })
        .collect();
    commit_response(keys.into_iter().zip(codes))
}

/// An OffsetCommit answer: each partition's code, consecutive partitions of a topic together.
fn commit_response(codes: impl Iterator<Item = ((Arc<str>, i32), i16)>) -> OffsetCommitResponse {
    let mut resp = OffsetCommitResponse::default();
    for ((topic, partition), code) in codes {
        let p = offset_commit_response::OffsetCommitResponsePartition::default()
            .with_partition_index(partition)
            .with_error_code(code);
        match resp.topics.last_mut() {
            Some(t) if t.name.0.as_str() == &*topic => t.partitions.push(p),
            _ => resp.topics.push(
                offset_commit_response::OffsetCommitResponseTopic::default()
                    .with_name(TopicName(sb(&*topic)))
                    .with_partitions(vec![p]),
            ),
        }
    }
    resp
}

async fn offset_fetch(
    ctx: &Ctx,
    call: &Call,
    group: String,
    topics: Option<Vec<TopicPartitions>>,
) -> OffsetFetchResponse {
    let v = call.version;
    // As Kafka: offsets of topics the user may not see are left out.
    // A topic's name is shared by its partitions, not copied for each.
    let asked: Option<Vec<(Arc<str>, i32)>> = topics.map(|ts| {
        ts.into_iter()
            .flat_map(|TopicPartitions { name: t, partitions: ps }| {
                let t: Arc<str> = t.into();
                ps.into_iter().map(move |p| (t.clone(), p))
            })
            .collect()
    });
    let asked =
        asked.map(|a| a.into_iter().filter(|(t, _)| call.access.topic(TopicOp::Describe, t)).collect::<Vec<_>>());
    let mut resp = OffsetFetchResponse::default();
    let found = match ctx.groups.committed_async(group.clone(), asked).await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(group, error = %e, "offset fetch failed");
            if v >= 2 {
                resp.error_code = errors::code(&e);
            }
            return resp;
        }
    };
    tracing::debug!(group, offsets = ?found.iter().map(|(t, p, c)| (&**t, *p, c.as_ref().map(|c| c.offset))).collect::<Vec<_>>(), "offset fetch");
    for (topic, partition, committed) in found.into_iter().filter(|(t, _, _)| call.access.topic(TopicOp::Describe, t)) {
        let mut p = offset_fetch_response::OffsetFetchResponsePartition::default()
            .with_partition_index(partition)
            .with_committed_offset(committed.as_ref().map_or(-1, |c| c.offset))
            .with_metadata(Some(sb(committed.as_ref().map(|c| c.metadata.clone()).unwrap_or_default())));
        if v >= 5 {
            p = p.with_committed_leader_epoch(committed.as_ref().map_or(-1, |c| c.leader_epoch));
        }
        match resp.topics.last_mut() {
            Some(t) if t.name.0.as_str() == &*topic => t.partitions.push(p),
            _ => resp.topics.push(
                offset_fetch_response::OffsetFetchResponseTopic::default()
                    .with_name(TopicName(sb(&*topic)))
                    .with_partitions(vec![p]),
            ),
        }
    }
    resp
}
