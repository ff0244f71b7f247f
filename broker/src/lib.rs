//! Tributary's broker library: the durable partitioned log store (redb), topic configuration,
//! the Kafka-compatible partitioner and the Kafka front end (the MQTT front end follows).
//!
//! The library knows nothing of QUIC, systemd or command-line parsing: those belong to
//! `tributary-sync` and `tributary-gateway`, which depend on this crate and never the reverse.

pub mod config;
pub mod error;
pub mod groups;
pub mod histogram;
pub mod kafka;
pub mod mqtt;
pub mod partitioner;
pub mod security;
pub mod storage;

pub use config::{Codec, ConfigError, Durability, StorageConfig, TimestampKind, TopicConfig};
pub use error::StoreError;
pub use storage::{
    batch::{BatchError, BatchHeader, NewRecord, RecordView},
    AppendOutcome, FetchedBatches, KvSpace, PartitionInfo, PartitionWatch, PendingAppend, Store, StoreStats, TopicInfo,
    Watermarks,
};
