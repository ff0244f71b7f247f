//! Request bodies of the served APIs, decoded by hand from the Kafka schemas with the bounded
//! [`Reader`]: the protocol crate's decoders size vectors from client-supplied counts, so only
//! its response types are used (see ARCHITECTURE.md).

use bytes::Bytes;

use super::codec::{min_array, min_str, DecodeError, Reader};
use super::groups::JoinRequest;
use super::versions::key;

/// A topic's partitions and their record batches in a produce request.
#[derive(Debug, Clone)]
pub(crate) struct ProduceTopic {
    pub name: String,
    pub partitions: Vec<ProducePartition>,
}

/// One partition's records in a produce request (`None`: a null record set).
#[derive(Debug, Clone)]
pub(crate) struct ProducePartition {
    pub index: i32,
    pub records: Option<Bytes>,
}

/// A topic and the partitions a request names in it.
#[derive(Debug, Clone)]
pub(crate) struct TopicPartitions {
    pub name: String,
    pub partitions: Vec<i32>,
}

#[derive(Debug, Clone)]
pub(crate) struct ProduceRequest {
    pub transactional_id: Option<String>,
    pub acks: i16,
    pub topics: Vec<ProduceTopic>,
}

#[derive(Debug, Clone)]
pub(crate) struct FetchPartition {
    pub partition: i32,
    pub fetch_offset: i64,
    pub partition_max_bytes: i32,
}

#[derive(Debug, Clone)]
pub(crate) struct FetchRequest {
    pub max_wait_ms: i32,
    pub min_bytes: i32,
    pub max_bytes: i32,
    pub topics: Vec<FetchTopic>,
}

#[derive(Debug, Clone)]
pub(crate) struct FetchTopic {
    pub name: String,
    pub partitions: Vec<FetchPartition>,
}

#[derive(Debug, Clone)]
pub(crate) struct ListOffsetsRequest {
    pub topics: Vec<ListOffsetsTopic>,
}

#[derive(Debug, Clone)]
pub(crate) struct ListOffsetsTopic {
    pub name: String,
    pub partitions: Vec<ListOffsetsPartition>,
}

/// A partition and the timestamp asked for (-2 earliest, -1 latest, -3 max timestamp).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ListOffsetsPartition {
    pub partition: i32,
    pub timestamp: i64,
}

#[derive(Debug, Clone)]
pub(crate) struct MetadataRequest {
    /// `None` = all topics.
    pub topics: Option<Vec<String>>,
    pub allow_auto_topic_creation: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct CreatableTopic {
    pub name: String,
    pub num_partitions: i32,
    pub replication_factor: i16,
    pub assignments: usize,
    pub configs: Vec<ConfigEntry>,
}

/// A setting by its Kafka name (`None`: null, the default).
#[derive(Debug, Clone)]
pub(crate) struct ConfigEntry {
    pub name: String,
    pub value: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct CreateTopicsRequest {
    pub topics: Vec<CreatableTopic>,
    pub validate_only: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct InitProducerIdRequest {
    pub transactional_id: Option<String>,
    pub producer_id: i64,
    pub producer_epoch: i16,
}

#[derive(Debug, Clone)]
pub(crate) struct ConfigResource {
    pub resource_type: i8,
    pub resource_name: String,
    /// Describe: keys asked for (`None` = all). Alter: (name, operation, value).
    pub keys: Option<Vec<String>>,
    pub changes: Vec<ConfigChange>,
}

/// One change of AlterConfigs (`op` 0) or IncrementalAlterConfigs (`op`: 0 set, 1 delete,
/// 2 append, 3 subtract).
#[derive(Debug, Clone)]
pub(crate) struct ConfigChange {
    pub name: String,
    pub op: i8,
    pub value: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct ConfigsRequest {
    pub resources: Vec<ConfigResource>,
    pub validate_only: bool,
    /// DescribeConfigs v1+: answer each config's synonyms too.
    pub include_synonyms: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct CreatePartitionsRequest {
    pub topics: Vec<PartitionsTopic>,
    pub validate_only: bool,
}

/// SyncGroup and Heartbeat: the member's identity in a generation (and the leader's assignments).
#[derive(Debug, Clone)]
pub(crate) struct MemberRequest {
    pub group_id: String,
    pub generation: i32,
    pub member_id: String,
    pub instance_id: Option<String>,
    pub assignments: Vec<(String, Bytes)>,
}

pub(crate) use super::groups::{MemberIdentity, OffsetToCommit};

/// A topic's new partition count in CreatePartitions.
#[derive(Debug, Clone)]
pub(crate) struct PartitionsTopic {
    pub name: String,
    pub count: i32,
    /// Whether the request assigns replicas (refused: this node places every partition).
    pub assignments: bool,
}

/// FindCoordinator: key type 0 = group, 1 = transaction.
#[derive(Debug, Clone)]
pub(crate) struct FindCoordinatorRequest {
    pub key_type: i8,
    pub keys: Vec<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct LeaveGroupRequest {
    pub group_id: String,
    pub members: Vec<MemberIdentity>,
}

#[derive(Debug, Clone)]
pub(crate) struct OffsetFetchRequest {
    pub group_id: String,
    /// `None`: all the group's partitions.
    pub topics: Option<Vec<TopicPartitions>>,
}

#[derive(Debug, Clone)]
pub(crate) struct OffsetDeleteRequest {
    pub group_id: String,
    pub topics: Vec<TopicPartitions>,
}

#[derive(Debug, Clone)]
pub(crate) struct OffsetCommitRequest {
    pub group_id: String,
    pub generation: i32,
    pub member_id: String,
    pub instance_id: Option<String>,
    pub offsets: Vec<OffsetToCommit>,
}

/// DeleteRecords: per topic, the partitions and the offsets their log start moves up to (-1: the
/// high watermark).
#[derive(Debug, Clone)]
pub(crate) struct DeleteRecordsTopic {
    pub name: String,
    pub partitions: Vec<(i32, i64)>,
}

#[derive(Debug, Clone)]
pub(crate) enum Request {
    ApiVersions,
    Produce(ProduceRequest),
    Fetch(FetchRequest),
    ListOffsets(ListOffsetsRequest),
    Metadata(MetadataRequest),
    CreateTopics(CreateTopicsRequest),
    DeleteTopics(Vec<String>),
    DeleteRecords(Vec<DeleteRecordsTopic>),
    InitProducerId(InitProducerIdRequest),
    DescribeConfigs(ConfigsRequest),
    AlterConfigs(ConfigsRequest),
    IncrementalAlterConfigs(ConfigsRequest),
    CreatePartitions(CreatePartitionsRequest),
    DescribeCluster,
    FindCoordinator(FindCoordinatorRequest),
    /// Decoded into the coordinator's own request (client id and host are the API's to add).
    JoinGroup(JoinRequest),
    SyncGroup(MemberRequest),
    Heartbeat(MemberRequest),
    LeaveGroup(LeaveGroupRequest),
    OffsetCommit(OffsetCommitRequest),
    OffsetFetch(OffsetFetchRequest),
    ListGroups,
    DescribeGroups(Vec<String>),
    DeleteGroups(Vec<String>),
    OffsetDelete(OffsetDeleteRequest),
    /// The mechanism asked for.
    SaslHandshake(String),
    /// A SASL token.
    SaslAuthenticate(Bytes),
}

/// Decodes the body of a served API at a served version (checked by the caller).
pub(crate) fn decode(api_key: i16, v: i16, r: &mut Reader) -> Result<Request, DecodeError> {
    let f = r.flex;
    let req = match api_key {
        key::API_VERSIONS => {
            if v >= 3 {
                r.string()?; // client_software_name
                r.string()?; // client_software_version
            }
            Request::ApiVersions
        }
        key::PRODUCE => {
            let transactional_id = if v >= 3 { r.nullable_string()? } else { None };
            let acks = r.i16()?;
            r.i32()?; // timeout_ms: appends take one commit; there is no replication to wait for
            let topics = r.array(min_str(f) + min_array(f), |r| {
                let name = r.string()?;
                let parts = r.array(4 + min_array(f), |r| {
                    let index = r.i32()?;
                    let records = r.nullable_bytes()?;
                    r.tagged_fields()?;
                    Ok(ProducePartition { index, records })
                })?;
                r.tagged_fields()?;
                Ok(ProduceTopic { name, partitions: parts })
            })?;
            Request::Produce(ProduceRequest { transactional_id, acks, topics })
        }
        key::FETCH => {
            r.i32()?; // replica_id
            let max_wait_ms = r.i32()?;
            let min_bytes = r.i32()?;
            let max_bytes = if v >= 3 { r.i32()? } else { i32::MAX };
            if v >= 4 {
                r.i8()?; // isolation_level: without transactions everything is committed
            }
            if v >= 7 {
                r.i32()?; // session_id: sessions are not kept, every fetch is a full fetch
                r.i32()?; // session_epoch
            }
            let topics = r.array(min_str(f) + min_array(f), |r| {
                let name = r.string()?;
                let parts = r.array(16, |r| {
                    let partition = r.i32()?;
                    if v >= 9 {
                        r.i32()?; // current_leader_epoch
                    }
                    let fetch_offset = r.i64()?;
                    if v >= 12 {
                        r.i32()?; // last_fetched_epoch
                    }
                    if v >= 5 {
                        r.i64()?; // log_start_offset (followers only)
                    }
                    let partition_max_bytes = r.i32()?;
                    r.tagged_fields()?;
                    Ok(FetchPartition { partition, fetch_offset, partition_max_bytes })
                })?;
                r.tagged_fields()?;
                Ok(FetchTopic { name, partitions: parts })
            })?;
            if v >= 7 {
                r.array(min_str(f) + min_array(f), |r| {
                    r.string()?;
                    r.array(4, |r| r.i32())?;
                    r.tagged_fields()
                })?;
            }
            if v >= 11 {
                r.string()?; // rack_id
            }
            Request::Fetch(FetchRequest { max_wait_ms, min_bytes, max_bytes, topics })
        }
        key::LIST_OFFSETS => {
            r.i32()?; // replica_id
            if v >= 2 {
                r.i8()?; // isolation_level
            }
            let topics = r.array(min_str(f) + min_array(f), |r| {
                let name = r.string()?;
                let parts = r.array(12, |r| {
                    let partition = r.i32()?;
                    if v >= 4 {
                        r.i32()?; // current_leader_epoch
                    }
                    let timestamp = r.i64()?;
                    r.tagged_fields()?;
                    Ok(ListOffsetsPartition { partition, timestamp })
                })?;
                r.tagged_fields()?;
                Ok(ListOffsetsTopic { name, partitions: parts })
            })?;
            Request::ListOffsets(ListOffsetsRequest { topics })
        }
        key::METADATA => {
            let topics = r.nullable_array(min_str(f), |r| {
                if v >= 10 {
                    r.uuid()?;
                }
                let name = r.string()?;
                r.tagged_fields()?;
                Ok(name)
            })?;
            // v0: an empty list means all topics; v1+: null means all, empty means none.
            let topics = match topics {
                Some(t) if v == 0 && t.is_empty() => None,
                other => other,
            };
            let allow_auto_topic_creation = if v >= 4 { r.bool()? } else { true };
            if (8..=10).contains(&v) {
                r.bool()?; // include_cluster_authorized_operations
            }
            if v >= 8 {
                r.bool()?; // include_topic_authorized_operations
            }
            Request::Metadata(MetadataRequest { topics, allow_auto_topic_creation })
        }
        key::CREATE_TOPICS => {
            let topics = r.array(min_str(f) + 6 + 2 * min_array(f), |r| {
                let name = r.string()?;
                let num_partitions = r.i32()?;
                let replication_factor = r.i16()?;
                let assignments = r.array(4 + min_array(f), |r| {
                    r.i32()?;
                    r.array(4, |r| r.i32())?;
                    r.tagged_fields()
                })?;
                let configs = r.array(2 * min_str(f), |r| {
                    let name = r.string()?;
                    let value = r.nullable_string()?;
                    r.tagged_fields()?;
                    Ok(ConfigEntry { name, value })
                })?;
                r.tagged_fields()?;
                Ok(CreatableTopic { name, num_partitions, replication_factor, assignments: assignments.len(), configs })
            })?;
            r.i32()?; // timeout_ms
            let validate_only = if v >= 1 { r.bool()? } else { false };
            Request::CreateTopics(CreateTopicsRequest { topics, validate_only })
        }
        key::DELETE_TOPICS => {
            let names = r.array(min_str(f), |r| r.string())?;
            r.i32()?; // timeout_ms
            Request::DeleteTopics(names)
        }
        key::DELETE_RECORDS => {
            let topics = r.array(min_str(f) + min_array(f), |r| {
                let name = r.string()?;
                let partitions = r.array(12, |r| {
                    let partition = r.i32()?;
                    let offset = r.i64()?;
                    r.tagged_fields()?;
                    Ok((partition, offset))
                })?;
                r.tagged_fields()?;
                Ok(DeleteRecordsTopic { name, partitions })
            })?;
            r.i32()?; // timeout_ms: the log start moves in one commit; no replicas to wait for
            Request::DeleteRecords(topics)
        }
        key::INIT_PRODUCER_ID => {
            let transactional_id = r.nullable_string()?;
            r.i32()?; // transaction_timeout_ms
            let (producer_id, producer_epoch) = if v >= 3 { (r.i64()?, r.i16()?) } else { (-1, -1) };
            Request::InitProducerId(InitProducerIdRequest { transactional_id, producer_id, producer_epoch })
        }
        key::DESCRIBE_CONFIGS => {
            let resources = r.array(1 + min_str(f) + min_array(f), |r| {
                let resource_type = r.i8()?;
                let resource_name = r.string()?;
                let keys = r.nullable_array(min_str(f), |r| r.string())?;
                r.tagged_fields()?;
                Ok(ConfigResource { resource_type, resource_name, keys, changes: Vec::new() })
            })?;
            let include_synonyms = v >= 1 && r.bool()?;
            if v >= 3 {
                r.bool()?; // include_documentation
            }
            Request::DescribeConfigs(ConfigsRequest { resources, validate_only: false, include_synonyms })
        }
        key::ALTER_CONFIGS | key::INCREMENTAL_ALTER_CONFIGS => {
            let incremental = api_key == key::INCREMENTAL_ALTER_CONFIGS;
            let resources = r.array(1 + min_str(f) + min_array(f), |r| {
                let resource_type = r.i8()?;
                let resource_name = r.string()?;
                let changes = r.array(2 * min_str(f), |r| {
                    let name = r.string()?;
                    let op = if incremental { r.i8()? } else { 0 };
                    let value = r.nullable_string()?;
                    r.tagged_fields()?;
                    Ok(ConfigChange { name, op, value })
                })?;
                r.tagged_fields()?;
                Ok(ConfigResource { resource_type, resource_name, keys: None, changes })
            })?;
            let validate_only = r.bool()?;
            let req = ConfigsRequest { resources, validate_only, include_synonyms: false };
            if incremental {
                Request::IncrementalAlterConfigs(req)
            } else {
                Request::AlterConfigs(req)
            }
        }
        key::CREATE_PARTITIONS => {
            let topics = r.array(min_str(f) + 4 + min_array(f), |r| {
                let name = r.string()?;
                let count = r.i32()?;
                let assignments = r.nullable_array(min_array(f), |r| {
                    r.array(4, |r| r.i32())?;
                    r.tagged_fields()
                })?;
                r.tagged_fields()?;
                Ok(PartitionsTopic { name, count, assignments: assignments.is_some_and(|a| !a.is_empty()) })
            })?;
            r.i32()?; // timeout_ms
            let validate_only = r.bool()?;
            Request::CreatePartitions(CreatePartitionsRequest { topics, validate_only })
        }
        key::FIND_COORDINATOR => {
            if v >= 4 {
                let key_type = r.i8()?;
                let keys = r.array(min_str(f), |r| r.string())?;
                Request::FindCoordinator(FindCoordinatorRequest { key_type, keys })
            } else {
                let k = r.string()?;
                let key_type = if v >= 1 { r.i8()? } else { 0 };
                Request::FindCoordinator(FindCoordinatorRequest { key_type, keys: vec![k] })
            }
        }
        key::JOIN_GROUP => {
            let group_id = r.string()?;
            let session_timeout_ms = r.i32()?;
            let rebalance_timeout_ms = if v >= 1 { r.i32()? } else { session_timeout_ms };
            let member_id = r.string()?;
            let instance_id = if v >= 5 { r.nullable_string()? } else { None };
            let protocol_type = r.string()?;
            let protocols = r.array(min_str(f) + 4, |r| {
                let name = r.string()?;
                let metadata = r.nullable_bytes()?.unwrap_or_default();
                r.tagged_fields()?;
                Ok((name, metadata))
            })?;
            Request::JoinGroup(JoinRequest {
                group_id,
                session_timeout_ms,
                rebalance_timeout_ms,
                member_id,
                instance_id,
                protocol_type,
                protocols,
                client_id: String::new(),
                client_host: String::new(),
                require_known_member_id: v >= 4,
            })
        }
        key::SYNC_GROUP | key::HEARTBEAT => {
            let group_id = r.string()?;
            let generation = r.i32()?;
            let member_id = r.string()?;
            let instance_id = if v >= 3 { r.nullable_string()? } else { None };
            let mut req = MemberRequest { group_id, generation, member_id, instance_id, assignments: Vec::new() };
            if api_key == key::SYNC_GROUP {
                req.assignments = r.array(min_str(f) + 4, |r| {
                    let m = r.string()?;
                    let a = r.nullable_bytes()?.unwrap_or_default();
                    r.tagged_fields()?;
                    Ok((m, a))
                })?;
                Request::SyncGroup(req)
            } else {
                Request::Heartbeat(req)
            }
        }
        key::LEAVE_GROUP => {
            let group_id = r.string()?;
            let members = if v >= 3 {
                r.array(2 * min_str(f), |r| {
                    let member_id = r.string()?;
                    let instance_id = r.nullable_string()?;
                    r.tagged_fields()?;
                    Ok(MemberIdentity { member_id, instance_id })
                })?
            } else {
                vec![MemberIdentity { member_id: r.string()?, instance_id: None }]
            };
            Request::LeaveGroup(LeaveGroupRequest { group_id, members })
        }
        key::OFFSET_COMMIT => {
            let group_id = r.string()?;
            let generation = if v >= 1 { r.i32()? } else { -1 };
            let member_id = if v >= 1 { r.string()? } else { String::new() };
            if (2..=4).contains(&v) {
                r.i64()?; // retention_time_ms: offsets are kept until the group is deleted
            }
            let instance_id = if v >= 7 { r.nullable_string()? } else { None };
            let mut offsets = Vec::new();
            let topics = r.array(min_str(f) + min_array(f), |r| {
                let name = r.string()?;
                let parts = r.array(4 + 8 + min_str(f), |r| {
                    let p = r.i32()?;
                    let offset = r.i64()?;
                    let epoch = if v >= 6 { r.i32()? } else { -1 };
                    if v == 1 {
                        r.i64()?; // commit_timestamp
                    }
                    let metadata = r.nullable_string()?;
                    r.tagged_fields()?;
                    Ok((p, offset, epoch, metadata))
                })?;
                r.tagged_fields()?;
                Ok((name, parts))
            })?;
            for (name, parts) in topics {
                let name: std::sync::Arc<str> = name.into();
                for (partition, offset, leader_epoch, metadata) in parts {
                    offsets.push(OffsetToCommit { topic: name.clone(), partition, offset, leader_epoch, metadata });
                }
            }
            Request::OffsetCommit(OffsetCommitRequest { group_id, generation, member_id, instance_id, offsets })
        }
        key::OFFSET_FETCH => {
            let group_id = r.string()?;
            let topics = r.nullable_array(min_str(f) + min_array(f), |r| {
                let name = r.string()?;
                let partitions = r.array(4, |r| r.i32())?;
                r.tagged_fields()?;
                Ok(TopicPartitions { name, partitions })
            })?;
            if v >= 7 {
                r.bool()?; // require_stable: there are no pending transactional offsets
            }
            Request::OffsetFetch(OffsetFetchRequest { group_id, topics })
        }
        key::LIST_GROUPS => {
            if v >= 4 {
                r.array(min_str(f), |r| r.string())?; // states filter
            }
            Request::ListGroups
        }
        key::DESCRIBE_GROUPS => {
            let groups = r.array(min_str(f), |r| r.string())?;
            if v >= 3 {
                r.bool()?; // include_authorized_operations
            }
            Request::DescribeGroups(groups)
        }
        key::DELETE_GROUPS => Request::DeleteGroups(r.array(min_str(f), |r| r.string())?),
        key::OFFSET_DELETE => {
            let group_id = r.string()?;
            let topics = r.array(min_str(f) + min_array(f), |r| {
                let name = r.string()?;
                let partitions = r.array(4, |r| r.i32())?;
                r.tagged_fields()?;
                Ok(TopicPartitions { name, partitions })
            })?;
            Request::OffsetDelete(OffsetDeleteRequest { group_id, topics })
        }
        key::DESCRIBE_CLUSTER => {
            r.bool()?; // include_cluster_authorized_operations
            if v >= 1 {
                r.i8()?; // endpoint_type
            }
            Request::DescribeCluster
        }
        key::SASL_HANDSHAKE => Request::SaslHandshake(r.string()?),
        key::SASL_AUTHENTICATE => Request::SaslAuthenticate(r.nullable_bytes()?.unwrap_or_default()),
        _ => return Err(DecodeError::Invalid("api key")),
    };
    r.tagged_fields()?;
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    fn produce_v3(records: &[u8]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_i16(-1); // transactional_id
        b.put_i16(-1); // acks
        b.put_i32(1000);
        b.put_i32(1);
        b.put_i16(1);
        b.put_slice(b"t");
        b.put_i32(1);
        b.put_i32(0);
        b.put_i32(records.len() as i32);
        b.put_slice(records);
        b.freeze()
    }

    #[test]
    fn produce_decodes_and_truncation_is_an_error() {
        let body = produce_v3(b"abc");
        let mut r = Reader::new(body.clone(), false);
        let Request::Produce(p) = decode(key::PRODUCE, 3, &mut r).unwrap() else { panic!() };
        assert_eq!(p.acks, -1);
        assert_eq!(p.topics[0].name, "t");
        assert_eq!(p.topics[0].partitions[0].records.as_deref(), Some(&b"abc"[..]));
        for cut in 0..body.len() {
            let mut r = Reader::new(body.slice(..cut), false);
            assert!(decode(key::PRODUCE, 3, &mut r).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn metadata_all_topics_forms() {
        let mut b = BytesMut::new();
        b.put_i32(0);
        let mut r = Reader::new(b.freeze(), false);
        let Request::Metadata(m) = decode(key::METADATA, 0, &mut r).unwrap() else { panic!() };
        assert!(m.topics.is_none(), "v0 empty list = all");

        let mut b = BytesMut::new();
        b.put_i32(0);
        b.put_u8(1);
        let mut r = Reader::new(b.freeze(), false);
        let Request::Metadata(m) = decode(key::METADATA, 4, &mut r).unwrap() else { panic!() };
        assert_eq!(m.topics, Some(vec![]), "v1+ empty list = none");

        let mut b = BytesMut::new();
        b.put_i32(-1);
        b.put_u8(0);
        let mut r = Reader::new(b.freeze(), false);
        let Request::Metadata(m) = decode(key::METADATA, 4, &mut r).unwrap() else { panic!() };
        assert!(m.topics.is_none());
        assert!(!m.allow_auto_topic_creation);
    }
}
