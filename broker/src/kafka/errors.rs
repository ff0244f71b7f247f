//! Kafka error codes used by this broker, and the mapping of store errors onto them.

use crate::error::StoreError;
use crate::storage::batch::BatchError;

pub(crate) const NONE: i16 = 0;
pub(crate) const UNKNOWN_SERVER_ERROR: i16 = -1;
pub(crate) const OFFSET_OUT_OF_RANGE: i16 = 1;
pub(crate) const CORRUPT_MESSAGE: i16 = 2;
pub(crate) const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
pub(crate) const MESSAGE_TOO_LARGE: i16 = 10;
pub(crate) const INVALID_TOPIC_EXCEPTION: i16 = 17;
pub(crate) const OFFSET_METADATA_TOO_LARGE: i16 = 12;
pub(crate) const COORDINATOR_NOT_AVAILABLE: i16 = 15;
pub(crate) const INVALID_REQUIRED_ACKS: i16 = 21;
pub(crate) const TOPIC_AUTHORIZATION_FAILED: i16 = 29;
pub(crate) const GROUP_AUTHORIZATION_FAILED: i16 = 30;
pub(crate) const CLUSTER_AUTHORIZATION_FAILED: i16 = 31;
pub(crate) const UNSUPPORTED_SASL_MECHANISM: i16 = 33;
pub(crate) const ILLEGAL_SASL_STATE: i16 = 34;
pub(crate) const ILLEGAL_GENERATION: i16 = 22;
pub(crate) const INCONSISTENT_GROUP_PROTOCOL: i16 = 23;
pub(crate) const INVALID_GROUP_ID: i16 = 24;
pub(crate) const UNKNOWN_MEMBER_ID: i16 = 25;
pub(crate) const INVALID_SESSION_TIMEOUT: i16 = 26;
pub(crate) const REBALANCE_IN_PROGRESS: i16 = 27;
pub(crate) const UNSUPPORTED_VERSION: i16 = 35;
pub(crate) const TOPIC_ALREADY_EXISTS: i16 = 36;
pub(crate) const INVALID_PARTITIONS: i16 = 37;
pub(crate) const INVALID_REPLICATION_FACTOR: i16 = 38;
pub(crate) const INVALID_REPLICA_ASSIGNMENT: i16 = 39;
pub(crate) const INVALID_CONFIG: i16 = 40;
pub(crate) const INVALID_REQUEST: i16 = 42;
pub(crate) const POLICY_VIOLATION: i16 = 44;
pub(crate) const OUT_OF_ORDER_SEQUENCE_NUMBER: i16 = 45;
pub(crate) const INVALID_PRODUCER_EPOCH: i16 = 47;
pub(crate) const TRANSACTIONAL_ID_AUTHORIZATION_FAILED: i16 = 53;
pub(crate) const KAFKA_STORAGE_ERROR: i16 = 56;
pub(crate) const SASL_AUTHENTICATION_FAILED: i16 = 58;
pub(crate) const NON_EMPTY_GROUP: i16 = 68;
pub(crate) const GROUP_ID_NOT_FOUND: i16 = 69;
pub(crate) const UNSUPPORTED_COMPRESSION_TYPE: i16 = 76;
pub(crate) const MEMBER_ID_REQUIRED: i16 = 79;
pub(crate) const GROUP_MAX_SIZE_REACHED: i16 = 81;
pub(crate) const FENCED_INSTANCE_ID: i16 = 82;
pub(crate) const GROUP_SUBSCRIBED_TO_TOPIC: i16 = 86;
pub(crate) const INVALID_RECORD: i16 = 87;

/// The Kafka error code for a store error.
pub(crate) fn code(e: &StoreError) -> i16 {
    match e {
        StoreError::UnknownTopic(_) | StoreError::UnknownPartition { .. } => UNKNOWN_TOPIC_OR_PARTITION,
        StoreError::TopicExists(_) => TOPIC_ALREADY_EXISTS,
        StoreError::InvalidTopicName { .. } => INVALID_TOPIC_EXCEPTION,
        StoreError::InvalidPartitions { .. } => INVALID_PARTITIONS,
        StoreError::InvalidTopicConfig(_) | StoreError::InvalidConfig(_) => INVALID_CONFIG,
        StoreError::LimitReached { .. } | StoreError::DeleteRecordsPolicy { .. } => POLICY_VIOLATION,
        StoreError::InvalidBatch(BatchError::Crc { .. }) => CORRUPT_MESSAGE,
        StoreError::InvalidBatch(_) | StoreError::KeylessRecord { .. } => INVALID_RECORD,
        StoreError::AppendTooLarge { .. } => MESSAGE_TOO_LARGE,
        StoreError::OffsetOutOfRange { .. } => OFFSET_OUT_OF_RANGE,
        StoreError::RestoreBelowNext { .. } => INVALID_RECORD,
        StoreError::OutOfOrderSequence { .. } => OUT_OF_ORDER_SEQUENCE_NUMBER,
        StoreError::InvalidProducerEpoch { .. } => INVALID_PRODUCER_EPOCH,
        StoreError::DiskFull { .. }
        | StoreError::Closed
        | StoreError::Unavailable(_)
        | StoreError::Storage(_)
        | StoreError::Io { .. }
        | StoreError::Corrupt(_) => KAFKA_STORAGE_ERROR,
    }
}
