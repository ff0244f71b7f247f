//! DeleteRecords: moves partitions' log start up to the asked offsets (Kafka requires DELETE on
//! the topic); the store makes it durable and deletes the batches below in bounded steps.

use std::sync::Arc;

use futures_util::future::join_all;
use kafka_protocol::messages::{delete_records_response, DeleteRecordsResponse};

use crate::kafka::context::{encode, topic_name, Call, Ctx, PendingReply, Reply};
use crate::kafka::errors::{self, code};
use crate::kafka::requests::DeleteRecordsTopic;
use crate::security::TopicOp;

pub(super) fn delete_records_request(ctx: Arc<Ctx>, call: Call, topics: Vec<DeleteRecordsTopic>) -> PendingReply {
    Box::pin(async move {
        let mut resp = DeleteRecordsResponse::default();
        for DeleteRecordsTopic { name, partitions } in topics {
            let allowed = call.access.topic(TopicOp::Delete, &name);
            // The partitions' moves are queued together and share the writer's commits; their
            // number is bounded by the request's (`kafka.request_elements_max`).
            let results = join_all(partitions.iter().map(|&(partition, offset)| {
                let (store, name) = (&ctx.store, &name);
                async move {
                    if !allowed {
                        return Err(errors::TOPIC_AUTHORIZATION_FAILED);
                    }
                    store.delete_records(name, partition, offset).await.map_err(|e| code(&e))
                }
            }))
            .await;
            let mut t = delete_records_response::DeleteRecordsTopicResult::default().with_name(topic_name(&name));
            for (&(partition, offset), result) in partitions.iter().zip(results) {
                let p =
                    delete_records_response::DeleteRecordsPartitionResult::default().with_partition_index(partition);
                t.partitions.push(match result {
                    Ok(low) => {
                        tracing::info!(
                            topic = %name, partition, offset, low_watermark = low, user = ?call.access.user(),
                            "records deleted by a Kafka client"
                        );
                        p.with_low_watermark(low).with_error_code(errors::NONE)
                    }
                    Err(e) => p.with_low_watermark(-1).with_error_code(e),
                });
            }
            resp.topics.push(t);
        }
        Ok(Some(Reply::one(encode(&call, &resp)?, vec![call.permit])))
    })
}
