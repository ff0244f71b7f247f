//! Produce (v3+, record batches validated and appended in request order, MQTT publish rules on
//! `mqtt.topic` headers) and InitProducerId (idempotent producers; ids from durable blocks).

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{produce_response, InitProducerIdResponse, ProduceResponse, ProducerId};

use crate::kafka::context::{encode, sb, topic_name, Call, Ctx, PendingReply, Reply, NOT_AUTHORIZED};
use crate::kafka::errors::{self, code};
use crate::kafka::requests::{self};
use crate::security::{Access, TopicOp};
use crate::storage::PendingAppend;

enum PartitionProduce {
    Queued(PendingAppend),
    Failed(i16, String),
    /// INVALID_RECORD for one record of the batch: its index and why.
    RecordRefused(i32, String),
}

pub(super) async fn produce(ctx: Arc<Ctx>, call: Call, req: requests::ProduceRequest) -> PendingReply {
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
    for requests::ProduceTopic { name: topic, partitions: parts } in req.topics {
        let mut out = Vec::with_capacity(parts.len());
        let allowed = call.access.topic(TopicOp::Write, &topic);
        // MQTT publish rules apply to the records' `mqtt.topic` headers (decoded only if needed).
        let mqtt_user = match &call.access {
            Access::User(u) if allowed && crate::kafka::mqtt_rules::needs_check(u, &topic) => Some(u.clone()),
            _ => None,
        };
        let decompressed_limit = ctx.store.config().decompressed_size_bytes_max;
        for requests::ProducePartition { index: partition, records } in parts {
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
                    match mqtt_user
                        .as_ref()
                        .map(|u| crate::kafka::mqtt_rules::check_batch(u, &topic, &batch, decompressed_limit))
                    {
                        Some(Err((index, why))) => {
                            tracing::warn!(peer = %call.peer, %topic, partition, %why, "produce refused by the MQTT publish rules");
                            PartitionProduce::RecordRefused(index, why)
                        }
                        _ => match ctx.store.enqueue_batch(&topic, partition, batch).await {
                            Ok(p) => PartitionProduce::Queued(p),
                            // As the Java broker (LogValidator.validateKey): INVALID_RECORD with
                            // a record error naming the batch index of the keyless record.
                            Err(e @ crate::storage::StoreError::KeylessRecord { index, .. }) => {
                                PartitionProduce::RecordRefused(i32::try_from(index).unwrap_or(i32::MAX), e.to_string())
                            }
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
                out.push(ProducedPartition {
                    index: partition,
                    error_code,
                    message: msg,
                    outcome,
                    refused_record: record,
                });
            }
            topics.push(ProducedTopic { name: topic, partitions: out });
        }
        let bytes = if v < 3 {
            produce_response_v0_v2(call.correlation_id, v, &topics)
        } else {
            let mut resp = ProduceResponse::default();
            for ProducedTopic { name: topic, partitions: parts } in topics {
                let mut t = produce_response::TopicProduceResponse::default().with_name(topic_name(&topic));
                for ProducedPartition { index: partition, error_code, message: msg, outcome, refused_record: record } in
                    parts
                {
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

/// A topic's answers in a produce response.
struct ProducedTopic {
    name: String,
    partitions: Vec<ProducedPartition>,
}

/// One partition's answer: its error code and message, the append's outcome if it was stored,
/// and the index of the record refused (INVALID_RECORD) if one was.
struct ProducedPartition {
    index: i32,
    error_code: i16,
    message: Option<String>,
    outcome: Option<crate::storage::AppendOutcome>,
    refused_record: Option<i32>,
}

/// Produce v0-v2 responses, written by hand: the protocol crate no longer encodes them.
fn produce_response_v0_v2(correlation_id: i32, v: i16, topics: &[ProducedTopic]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i32(0);
    b.put_i32(correlation_id);
    b.put_i32(topics.len() as i32);
    for ProducedTopic { name, partitions } in topics {
        b.put_i16(name.len() as i16);
        b.put_slice(name.as_bytes());
        b.put_i32(partitions.len() as i32);
        for p in partitions {
            b.put_i32(p.index);
            b.put_i16(p.error_code);
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

/// InitProducerId: an id for an idempotent producer (a write right on some topic needed).
pub(super) fn init_producer_id_request(
    ctx: Arc<Ctx>,
    call: Call,
    req: requests::InitProducerIdRequest,
) -> PendingReply {
    Box::pin(async move {
        let resp = if call.access.any_write() {
            init_producer_id(&ctx, req).await
        } else {
            InitProducerIdResponse::default()
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1)
                .with_error_code(errors::CLUSTER_AUTHORIZATION_FAILED)
        };
        Ok(Some(Reply::one(encode(&call, &resp)?, vec![call.permit])))
    })
}

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
