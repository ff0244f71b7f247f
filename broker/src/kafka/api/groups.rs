//! The consumer-group membership APIs on the wire: FindCoordinator, JoinGroup, SyncGroup,
//! Heartbeat, LeaveGroup, ListGroups, DescribeGroups and DeleteGroups, mapped onto the
//! coordinator in `kafka/groups/`, with every version-dependent field set only in the versions
//! that have it. A request naming a group the user may not use is answered
//! GROUP_AUTHORIZATION_FAILED in the API's own form.

use kafka_protocol::messages::{
    delete_groups_response, describe_groups_response, find_coordinator_response, join_group_response,
    leave_group_response, list_groups_response, BrokerId, DeleteGroupsResponse, DescribeGroupsResponse,
    FindCoordinatorResponse, GroupId, HeartbeatResponse, JoinGroupResponse, LeaveGroupResponse, ListGroupsResponse,
    SyncGroupResponse,
};

use crate::kafka::context::{encode, reply, sb, Call, Ctx, PendingReply, Reply, NOT_AUTHORIZED};
use crate::kafka::errors;
use crate::kafka::groups::JoinRequest;
use crate::kafka::requests::{self, MemberRequest};

pub(super) fn join(ctx: &Ctx, call: Call, mut req: JoinRequest) -> PendingReply {
    if !call.access.group(&req.group_id) {
        super::refused(&call);
        let e = errors::GROUP_AUTHORIZATION_FAILED;
        return reply(
            call,
            &JoinGroupResponse::default().with_error_code(e).with_generation_id(-1).with_protocol_name(Some(sb(""))),
        );
    }
    let (v, groups) = (call.version, ctx.groups.clone());
    Box::pin(async move {
        req.client_id = call.client_id.clone().unwrap_or_default();
        req.client_host = format!("/{}", call.peer.ip());
        let r = groups.join(req).await;
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
    })
}

pub(super) fn sync(ctx: &Ctx, call: Call, req: MemberRequest) -> PendingReply {
    if !call.access.group(&req.group_id) {
        super::refused(&call);
        return reply(call, &SyncGroupResponse::default().with_error_code(errors::GROUP_AUTHORIZATION_FAILED));
    }
    let groups = ctx.groups.clone();
    Box::pin(async move {
        let r = groups
            .sync(&req.group_id, req.generation, &req.member_id, req.instance_id.as_deref(), req.assignments)
            .await;
        let resp = SyncGroupResponse::default().with_error_code(r.error).with_assignment(r.assignment);
        Ok(Some(Reply::one(encode(&call, &resp)?, vec![call.permit])))
    })
}

pub(super) fn heartbeat(ctx: &Ctx, call: Call, req: MemberRequest) -> PendingReply {
    if !call.access.group(&req.group_id) {
        super::refused(&call);
        return reply(call, &HeartbeatResponse::default().with_error_code(errors::GROUP_AUTHORIZATION_FAILED));
    }
    let groups = &ctx.groups;
    let e = groups.heartbeat(&req.group_id, req.generation, &req.member_id, req.instance_id.as_deref());
    reply(call, &HeartbeatResponse::default().with_error_code(e))
}

pub(super) fn leave(ctx: &Ctx, call: Call, req: requests::LeaveGroupRequest) -> PendingReply {
    let requests::LeaveGroupRequest { group_id: group, members } = req;
    if !call.access.group(&group) {
        super::refused(&call);
        return reply(call, &LeaveGroupResponse::default().with_error_code(errors::GROUP_AUTHORIZATION_FAILED));
    }
    let (v, groups) = (call.version, &ctx.groups);
    let (top, each) = groups.leave(&group, &members);
    let mut resp = LeaveGroupResponse::default().with_error_code(if v >= 3 { errors::NONE } else { top });
    if v >= 3 {
        resp.members = members
            .into_iter()
            .zip(each)
            .map(|(requests::MemberIdentity { member_id: m, instance_id: i }, e)| {
                leave_group_response::MemberResponse::default()
                    .with_member_id(sb(m))
                    .with_group_instance_id(i.map(sb))
                    .with_error_code(e)
            })
            .collect();
    }
    reply(call, &resp)
}

pub(super) fn list(ctx: &Ctx, call: Call) -> PendingReply {
    let groups = &ctx.groups;
    let resp = ListGroupsResponse::default().with_groups(
        groups
            .list()
            .into_iter()
            .filter(|(id, _, _)| call.access.group(id))
            .map(|(id, pt, _)| {
                list_groups_response::ListedGroup::default().with_group_id(GroupId(sb(id))).with_protocol_type(sb(pt))
            })
            .collect(),
    );
    reply(call, &resp)
}

pub(super) fn describe(ctx: &Ctx, call: Call, mut ids: Vec<String>) -> PendingReply {
    let (v, groups) = (call.version, &ctx.groups);
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

pub(super) fn delete(ctx: &Ctx, call: Call, ids: Vec<String>) -> PendingReply {
    let groups = ctx.groups.clone();
    Box::pin(async move {
        let mut resp = DeleteGroupsResponse::default();
        for id in ids {
            // Deleting a group (and its committed offsets) is an admin operation.
            let e =
                if call.access.admin() { groups.delete_group(&id).await } else { errors::GROUP_AUTHORIZATION_FAILED };
            resp.results.push(
                delete_groups_response::DeletableGroupResult::default()
                    .with_group_id(GroupId(sb(id)))
                    .with_error_code(e),
            );
        }
        Ok(Some(Reply::one(encode(&call, &resp)?, vec![call.permit])))
    })
}

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

pub(super) fn find_coordinator_request(ctx: &Ctx, call: Call, key_type: i8, keys: Vec<String>) -> PendingReply {
    let resp = find_coordinator(ctx, &call, key_type, keys);
    reply(call, &resp)
}
