//! Typed errors of the log store, shared by every front end so each can map them to its own
//! protocol's error codes (error codes, reason codes).

use std::sync::Arc;

use crate::batch::BatchError;

/// Everything that can go wrong in a store operation.
///
/// Clone is needed because one failed group commit answers many waiters with the same error;
/// sources that are not `Clone` are kept behind an `Arc`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    #[error("topic {topic:?} has no partition {partition}")]
    UnknownPartition { topic: String, partition: i32 },
    #[error("topic {0:?} already exists")]
    TopicExists(String),
    #[error("invalid topic name {name:?}: {reason}")]
    InvalidTopicName { name: String, reason: &'static str },
    #[error("invalid partition count for topic {topic:?}: {reason}")]
    InvalidPartitions { topic: String, reason: String },
    #[error("invalid storage configuration: {0}")]
    InvalidConfig(#[from] crate::config::ConfigError),
    #[error("invalid topic configuration: {0}")]
    InvalidTopicConfig(String),
    #[error("limit reached: {key} = {limit}")]
    LimitReached { key: &'static str, limit: u64 },
    #[error("invalid record batch: {0}")]
    InvalidBatch(#[from] BatchError),
    /// A record without a key for a compacted topic (`cleanup.policy` with `compact`). The
    /// message is the Java broker's (LogValidator.validateKey): Kafka answers INVALID_RECORD
    /// with this as the record error of the batch index.
    #[error("Compacted topic cannot accept message without key in topic partition {topic}-{partition}.")]
    KeylessRecord { topic: String, partition: i32, index: u64 },
    /// DeleteRecords on a topic whose `cleanup.policy` does not delete (compact only): the Java
    /// broker's refusal (Partition.deleteRecordsOnLeader), POLICY_VIOLATION.
    #[error("Records of partition {topic}-{partition} can not be deleted due to the configured policy")]
    DeleteRecordsPolicy { topic: String, partition: i32 },
    #[error("append of {size} bytes exceeds storage.append_size_bytes_max = {max}")]
    AppendTooLarge { size: u64, max: u64 },
    #[error("offset {offset} is out of range [{log_start_offset}, {high_watermark}]")]
    OffsetOutOfRange { offset: i64, log_start_offset: i64, high_watermark: i64 },
    #[error("disk full: {free_bytes} bytes free on the data volume, storage.disk_free_bytes_min = {min_bytes}")]
    DiskFull { free_bytes: u64, min_bytes: u64 },
    #[error("out of order sequence number: expected {expected}, got {got}")]
    OutOfOrderSequence { expected: i32, got: i32 },
    #[error("producer epoch {got} is older than the current epoch {current}")]
    InvalidProducerEpoch { current: i16, got: i16 },
    /// A restored record (`Store::restore_records`) at an offset the partition already gave
    /// out: an offset once given is never given to another record.
    #[error("restore of {topic}-{partition} at offset {offset} refused: the partition's next offset is already {next_offset}")]
    RestoreBelowNext { topic: String, partition: i32, offset: i64, next_offset: i64 },
    #[error("the store is closed")]
    Closed,
    /// The database failed a write (a disk error, a full file system, a file-size limit): writes
    /// are refused until the store has reopened it and a retry succeeds; reads work again as soon
    /// as it is reopened. The store retries on its own; nothing needs a restart.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("storage engine error: {0}")]
    Storage(Arc<redb::Error>),
    #[error("I/O error: {context}: {source}")]
    Io { context: &'static str, source: Arc<std::io::Error> },
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl StoreError {
    pub fn io(context: &'static str, source: std::io::Error) -> Self {
        StoreError::Io { context, source: Arc::new(source) }
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Storage(Arc::new(redb::Error::from(e)))
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        StoreError::Storage(Arc::new(e))
    }
}
