//! Tributary's protocol front ends over the log store (`tributary-log`, re-exported here as
//! `storage` with its `config`, `error` and `histogram`): the Kafka front end (`kafka/`, with the
//! consumer-group coordinator), the MQTT 3.1.1/5 front end (`mqtt/`), the one listener both use
//! (`listener`: accept, limits, TLS handshake, graceful shutdown) with MQTT over WebSocket
//! (`websocket`: handshake and frames without I/O, and the byte-stream adapter), users, ACLs, SASL and TLS
//! (`security/`), aggregation at the edge (`aggregate/`: derived topics of per-key tumbling
//! windows), and the leaves both front ends share (`partitioner`, `spaces`, `topic`). The
//! modules' order is declared in ARCHITECTURE.md and checked by `tests/module_dag.rs`.
//!
//! The library knows nothing of QUIC, systemd or command-line parsing: those belong to
//! `tributary-sync` and `tributary-gateway`, which depend on this crate and never the reverse.

pub mod aggregate;
pub mod kafka;
pub mod listener;
pub mod mqtt;
pub mod partitioner;
pub mod security;
pub mod spaces;
pub mod topic;
pub mod websocket;

/// The log store, its configuration and errors live in `tributary-log`; re-exported under their
/// old paths so `crate::storage::...`, `crate::config::...` and `crate::error::...` keep naming them.
pub use tributary_log as storage;
pub use tributary_log::{config, error, histogram};

pub use config::{Codec, ConfigError, Durability, StorageConfig, TimestampKind, TopicConfig, TopicTemplate};
pub use error::StoreError;
pub use storage::{
    batch::{BatchError, BatchHeader, NewRecord, RecordView},
    AppendOutcome, FetchedBatches, KvSpace, PartitionInfo, PartitionWatch, PendingAppend, ReadTo, Store, StoreStats,
    TopicInfo, Watermarks,
};
