//! The Kafka wire-protocol front end: unmodified Kafka clients (librdkafka, kafka-python, Java,
//! franz-go) produce, fetch and administer topics on this one-node cluster, whose log is the
//! store's. See `versions` for the APIs served and ARCHITECTURE.md for the design.

mod api;
mod codec;
mod config;
mod context;
pub(crate) mod errors;
pub mod groups;
mod mqtt_rules;
mod requests;
mod server;
mod versions;

pub use codec::DecodeError;
pub use config::{KafkaConfig, KafkaTlsConfig};
pub use context::KafkaStats;
pub use server::{KafkaError, KafkaServer};
