//! Tributary's mirror of gateway topics to a central Kafka cluster over QUIC: the wire protocol,
//! flow control, consumer-group offset translation, the drain estimate, fresh-data-first
//! scheduling, topics' own settings and a restore's plan (sans-I/O), TLS and certificates, the gateway side (mirror and
//! restore), and (feature `cloud`) the `tributary-cloud` receiver that writes into Kafka and
//! serves restores.

pub mod backfill;
pub mod certs;
pub mod checkpoint;
pub mod config;
pub mod config_file;
pub mod congestion;
pub mod core;
pub mod drain;
pub mod extents;
pub mod fresh;
pub mod gateway;
pub mod gateway_restore;
pub mod latest;
pub mod overrides;
pub mod protocol;
pub mod restore;
mod stream;
pub mod tls;

#[cfg(feature = "cloud")]
pub mod cloud;

pub use config::{CloudConfig, MirrorConfig};
