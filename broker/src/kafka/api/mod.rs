//! The served Kafka APIs, one file per family (as mini-redis gives each command its file), and
//! the one dispatch over the decoded request: every request the decoder can produce, SASL and
//! the group APIs included, has its arm here, so the compiler checks none is left unrouted.
//! Responses are built with the protocol crate's types and encoded at the request's version.

mod api_versions;
mod configs;
mod delete_records;
mod fetch;
mod groups;
mod list_offsets;
mod metadata;
mod offsets;
mod produce;
pub(crate) mod sasl;
mod topics;

use std::sync::Arc;
use std::time::Instant;

pub(crate) use api_versions::unsupported as api_versions_unsupported;

use super::context::{Call, Ctx, PendingReply};
use super::requests::Request;
use sasl::ConnAuth;

/// Starts a request's work. Produce queues its appends before returning (request order is
/// append order), and SASL steps run before the next request is read (`conn` is the
/// connection's login state; `arrived` is when the request's last byte came); the rest happens
/// in the returned future.
pub(crate) async fn dispatch(
    ctx: &Arc<Ctx>,
    conn: &mut ConnAuth,
    call: Call,
    body: Request,
    arrived: Instant,
) -> PendingReply {
    tracing::trace!(api = call.api.name, version = call.version, client = ?call.client_id, "kafka request");
    match body {
        Request::ApiVersions => api_versions::api_versions(call, ctx.auth.enabled()),
        Request::SaslHandshake(mechanism) => sasl::handshake(conn, call, mechanism),
        Request::SaslAuthenticate(token) => sasl::authenticate_request(ctx, conn, call, token, arrived).await,
        Request::Produce(req) => produce::produce(ctx.clone(), call, req).await,
        Request::InitProducerId(req) => produce::init_producer_id_request(ctx.clone(), call, req),
        Request::Fetch(req) => fetch::fetch_request(ctx.clone(), call, req),
        Request::ListOffsets(req) => list_offsets::list_offsets_request(ctx.clone(), call, req),
        Request::Metadata(req) => metadata::metadata_request(ctx.clone(), call, req),
        Request::DescribeCluster => metadata::describe_cluster(ctx, call),
        Request::CreateTopics(req) => topics::create_topics_request(ctx.clone(), call, req),
        Request::DeleteTopics(names) => topics::delete_topics(ctx.clone(), call, names),
        Request::DeleteRecords(topics) => delete_records::delete_records_request(ctx.clone(), call, topics),
        Request::CreatePartitions(req) => topics::create_partitions_request(ctx.clone(), call, req),
        Request::DescribeConfigs(req) => configs::describe_configs_request(ctx, call, req),
        Request::AlterConfigs(req) => configs::alter_configs_request(ctx.clone(), call, req),
        Request::IncrementalAlterConfigs(req) => configs::incremental_alter_configs_request(ctx.clone(), call, req),
        Request::FindCoordinator(req) => groups::find_coordinator_request(ctx, call, req.key_type, req.keys),
        Request::JoinGroup(req) => groups::join(ctx, call, req),
        Request::SyncGroup(req) => groups::sync(ctx, call, req),
        Request::Heartbeat(req) => groups::heartbeat(ctx, call, req),
        Request::LeaveGroup(req) => groups::leave(ctx, call, req),
        Request::ListGroups => groups::list(ctx, call),
        Request::DescribeGroups(ids) => groups::describe(ctx, call, ids),
        Request::DeleteGroups(ids) => groups::delete(ctx, call, ids),
        Request::OffsetCommit(req) => offsets::commit(ctx.clone(), call, req),
        Request::OffsetFetch(req) => offsets::fetch(ctx.clone(), call, req),
        Request::OffsetDelete(req) => offsets::delete(ctx, call, req),
    }
}

/// Logs a group request refused by the user's ACL; the caller answers in the API's own form
/// with GROUP_AUTHORIZATION_FAILED.
fn refused(call: &Call) {
    tracing::debug!(peer = %call.peer, user = ?call.access.user(), api = call.api.name, "group not authorized");
}
