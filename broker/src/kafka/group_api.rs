//! The consumer-group APIs on the wire: JoinGroup, SyncGroup, Heartbeat, LeaveGroup,
//! OffsetCommit, OffsetFetch, ListGroups, DescribeGroups, DeleteGroups and OffsetDelete, mapped
//! onto the coordinator in `super::groups`, with every version-dependent field set only in the
//! versions that have it.

use std::sync::Arc;

use kafka_protocol::messages::{
    delete_groups_response, describe_groups_response, join_group_response, leave_group_response, list_groups_response,
    offset_commit_response, offset_delete_response, offset_fetch_response, DeleteGroupsResponse,
    DescribeGroupsResponse, GroupId, HeartbeatResponse, JoinGroupResponse, LeaveGroupResponse, ListGroupsResponse,
    OffsetCommitResponse, OffsetDeleteResponse, OffsetFetchResponse, SyncGroupResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use super::context::{encode, reply, Call, Ctx, PendingReply, Reply};
use super::errors;
use super::groups::JoinRequest;
use super::requests::{OffsetCommitRequest, Request};
use crate::security::{Access, TopicOp};

fn sb(s: impl Into<String>) -> StrBytes {
    StrBytes::from_string(s.into())
}

/// Serves one group request; `Err(body)` hands back requests that are not group APIs.
pub(crate) fn handle(ctx: Arc<Ctx>, call: Call, body: Request) -> Result<PendingReply, Box<(Call, Request)>> {
    let v = call.version;
    let groups = ctx.groups.clone();
    if !authorized(&call, &body) {
        tracing::debug!(peer = %call.peer, user = ?call.access.user(), api = call.api.name, "group not authorized");
        return Ok(refuse(call, body));
    }
    let pending: PendingReply = match body {
        Request::JoinGroup(req) => Box::pin(async move {
            let r = groups
                .join(JoinRequest {
                    group_id: req.group_id,
                    session_timeout_ms: req.session_timeout_ms,
                    rebalance_timeout_ms: req.rebalance_timeout_ms,
                    member_id: req.member_id,
                    instance_id: req.instance_id,
                    protocol_type: req.protocol_type,
                    protocols: req.protocols,
                    client_id: call.client_id.clone().unwrap_or_default(),
                    client_host: format!("/{}", call.peer.ip()),
                    require_known_member_id: v >= 4,
                })
                .await;
            let members = r
                .members
                .into_iter()
                .map(|m| {
                    let mut jm = join_group_response::JoinGroupResponseMember::default()
                        .with_member_id(sb(m.member_id))
                        .with_metadata(m.metadata);
                    if v >= 5 {
                        jm = jm.with_group_instance_id(m.instance_id.map(sb));
                    }
                    jm
                })
                .collect();
            let resp = JoinGroupResponse::default()
                .with_error_code(r.error)
                .with_generation_id(r.generation)
                .with_protocol_name(Some(sb(r.protocol.unwrap_or_default())))
                .with_leader(sb(r.leader))
                .with_member_id(sb(r.member_id))
                .with_members(members);
            Ok(Some(Reply::one(encode(&call, &resp)?, vec![call.permit])))
        }),
        Request::SyncGroup(req) => Box::pin(async move {
            let r = groups
                .sync(&req.group_id, req.generation, &req.member_id, req.instance_id.as_deref(), req.assignments)
                .await;
            let resp = SyncGroupResponse::default().with_error_code(r.error).with_assignment(r.assignment);
            Ok(Some(Reply::one(encode(&call, &resp)?, vec![call.permit])))
        }),
        Request::Heartbeat(req) => {
            let e = groups.heartbeat(&req.group_id, req.generation, &req.member_id, req.instance_id.as_deref());
            reply(call, &HeartbeatResponse::default().with_error_code(e))
        }
        Request::LeaveGroup(group, members) => {
            let (top, each) = groups.leave(&group, &members);
            let mut resp = LeaveGroupResponse::default().with_error_code(if v >= 3 { errors::NONE } else { top });
            if v >= 3 {
                resp.members = members
                    .into_iter()
                    .zip(each)
                    .map(|((m, i), e)| {
                        leave_group_response::MemberResponse::default()
                            .with_member_id(sb(m))
                            .with_group_instance_id(i.map(sb))
                            .with_error_code(e)
                    })
                    .collect();
            }
            reply(call, &resp)
        }
        Request::OffsetCommit(req) => Box::pin(async move {
            let resp = offset_commit(&ctx, &call.access, req).await;
            Ok(Some(Reply::one(encode(&call, &resp)?, vec![call.permit])))
        }),
        Request::OffsetFetch(group, topics) => Box::pin(async move {
            let resp = offset_fetch(&ctx, &call, group, topics).await;
            Ok(Some(Reply::one(encode(&call, &resp)?, vec![call.permit])))
        }),
        Request::ListGroups => {
            let resp = ListGroupsResponse::default().with_groups(
                groups
                    .list()
                    .into_iter()
                    .filter(|(id, _, _)| call.access.group(id))
                    .map(|(id, pt, _)| {
                        list_groups_response::ListedGroup::default()
                            .with_group_id(GroupId(sb(id)))
                            .with_protocol_type(sb(pt))
                    })
                    .collect(),
            );
            reply(call, &resp)
        }
        Request::DescribeGroups(mut ids) => {
            // Each group once: a group's metadata named 10,000 times would be answered 10,000 times.
            let mut seen = std::collections::HashSet::new();
            ids.retain(|id| seen.insert(id.clone()));
            let resp = DescribeGroupsResponse::default().with_groups(
                ids.iter()
                    .map(|id| {
                        if !call.access.group(id) {
                            return describe_groups_response::DescribedGroup::default()
                                .with_error_code(errors::GROUP_AUTHORIZATION_FAILED)
                                .with_group_id(GroupId(sb(id.clone())));
                        }
                        let d = groups.describe(id);
                        describe_groups_response::DescribedGroup::default()
                            .with_error_code(d.error)
                            .with_group_id(GroupId(sb(d.group_id)))
                            .with_group_state(sb(d.state))
                            .with_protocol_type(sb(d.protocol_type))
                            .with_protocol_data(sb(d.protocol))
                            .with_members(
                                d.members
                                    .into_iter()
                                    .map(|m| {
                                        let mut dm = describe_groups_response::DescribedGroupMember::default()
                                            .with_member_id(sb(m.member_id))
                                            .with_client_id(sb(m.client_id))
                                            .with_client_host(sb(m.client_host))
                                            .with_member_metadata(m.metadata)
                                            .with_member_assignment(m.assignment);
                                        if v >= 4 {
                                            dm = dm.with_group_instance_id(m.instance_id.map(sb));
                                        }
                                        dm
                                    })
                                    .collect(),
                            )
                    })
                    .collect(),
            );
            reply(call, &resp)
        }
        Request::DeleteGroups(ids) => Box::pin(async move {
            let mut resp = DeleteGroupsResponse::default();
            for id in ids {
                // Deleting a group (and its committed offsets) is an admin operation.
                let e = if call.access.admin() {
                    groups.delete_group(&id).await
                } else {
                    errors::GROUP_AUTHORIZATION_FAILED
                };
                resp.results.push(
                    delete_groups_response::DeletableGroupResult::default()
                        .with_group_id(GroupId(sb(id)))
                        .with_error_code(e),
                );
            }
            Ok(Some(Reply::one(encode(&call, &resp)?, vec![call.permit])))
        }),
        Request::OffsetDelete(group, topics) => Box::pin(async move {
            let partitions: Vec<(std::sync::Arc<str>, i32)> = topics
                .iter()
                .flat_map(|(t, ps)| {
                    let t: std::sync::Arc<str> = t.as_str().into();
                    ps.iter().map(move |p| (t.clone(), *p))
                })
                .collect();
            let (top, codes) = groups.offset_delete(&group, &partitions).await;
            let mut resp = OffsetDeleteResponse::default().with_error_code(top);
            if top == errors::NONE {
                let mut codes = codes.into_iter();
                for (t, ps) in topics {
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
        }),
        other => return Err(Box::new((call, other))),
    };
    Ok(pending)
}

/// Whether the user may use the group a group request names (OffsetDelete is an admin
/// operation, as deleting offsets is).
fn authorized(call: &Call, body: &Request) -> bool {
    match body {
        Request::JoinGroup(r) => call.access.group(&r.group_id),
        Request::SyncGroup(r) | Request::Heartbeat(r) => call.access.group(&r.group_id),
        Request::LeaveGroup(g, _) | Request::OffsetFetch(g, _) => call.access.group(g),
        Request::OffsetCommit(r) => call.access.group(&r.group_id),
        Request::OffsetDelete(..) => call.access.admin(),
        _ => true,
    }
}

/// The API's answer with GROUP_AUTHORIZATION_FAILED.
fn refuse(call: Call, body: Request) -> PendingReply {
    let e = errors::GROUP_AUTHORIZATION_FAILED;
    match body {
        Request::JoinGroup(_) => reply(
            call,
            &JoinGroupResponse::default().with_error_code(e).with_generation_id(-1).with_protocol_name(Some(sb(""))),
        ),
        Request::SyncGroup(_) => reply(call, &SyncGroupResponse::default().with_error_code(e)),
        Request::Heartbeat(_) => reply(call, &HeartbeatResponse::default().with_error_code(e)),
        Request::LeaveGroup(..) => reply(call, &LeaveGroupResponse::default().with_error_code(e)),
        Request::OffsetDelete(..) => reply(call, &OffsetDeleteResponse::default().with_error_code(e)),
        Request::OffsetFetch(_, topics) => {
            // v0-v1 have no top-level error: each asked partition carries it.
            let mut resp = OffsetFetchResponse::default().with_error_code(e);
            for (t, ps) in topics.unwrap_or_default() {
                resp.topics.push(
                    offset_fetch_response::OffsetFetchResponseTopic::default()
                        .with_name(TopicName(sb(t)))
                        .with_partitions(
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
            reply(call, &resp)
        }
        Request::OffsetCommit(req) => {
            let resp = commit_response(req.offsets.into_iter().map(|(topic, partition, ..)| ((topic, partition), e)));
            reply(call, &resp)
        }
        _ => Box::pin(async { Err("group authorization refused a request that names no group".to_string()) }),
    }
}

async fn offset_commit(ctx: &Ctx, access: &Access, mut req: OffsetCommitRequest) -> OffsetCommitResponse {
    let keys: Vec<(Arc<str>, i32)> = req.offsets.iter().map(|o| (o.0.clone(), o.1)).collect();
    // Offsets of topics the user may not read are refused; the rest are committed together.
    let readable: Vec<bool> = keys.iter().map(|(t, _)| access.topic(TopicOp::Read, t)).collect();
    req.offsets.retain(|o| access.topic(TopicOp::Read, &o.0));
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
    topics: Option<Vec<(String, Vec<i32>)>>,
) -> OffsetFetchResponse {
    let v = call.version;
    // As Kafka: offsets of topics the user may not see are left out.
    // A topic's name is shared by its partitions, not copied for each.
    let asked: Option<Vec<(Arc<str>, i32)>> = topics.map(|ts| {
        ts.into_iter()
            .flat_map(|(t, ps)| {
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
