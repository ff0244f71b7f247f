//! ListOffsets: a partition's earliest, latest or by-timestamp offset (lookups on the blocking
//! pool: they read the log).

use std::sync::Arc;

use kafka_protocol::messages::{list_offsets_response, ListOffsetsResponse};

use crate::kafka::context::{encode, topic_name, Call, Ctx, PendingReply, Reply};
use crate::kafka::errors::{self, code};
use crate::kafka::requests::{self};
use crate::security::{Access, TopicOp};
use crate::storage::Store;

pub(super) fn list_offsets_request(ctx: Arc<Ctx>, call: Call, req: requests::ListOffsetsRequest) -> PendingReply {
    Box::pin(async move {
        // Timestamp lookups read the log: on the blocking pool, not an async worker.
        let (store, access, v) = (ctx.store.clone(), call.access.clone(), call.version);
        let resp = tokio::task::spawn_blocking(move || list_offsets(&store, &access, v, req))
            .await
            .map_err(|e| format!("ListOffsets task failed: {e}"))?;
        Ok(Some(Reply::one(encode(&call, &resp)?, vec![call.permit])))
    })
}

fn list_offsets(
    store: &Store,
    access: &Access,
    version: i16,
    req: requests::ListOffsetsRequest,
) -> ListOffsetsResponse {
    let mut resp = ListOffsetsResponse::default();
    for requests::ListOffsetsTopic { name: topic, partitions: parts } in req.topics {
        let mut t = list_offsets_response::ListOffsetsTopicResponse::default().with_name(topic_name(&topic));
        let allowed = access.topic(TopicOp::Describe, &topic);
        for requests::ListOffsetsPartition { partition, timestamp } in parts {
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
