//! The MQTT front end (3.1.1 and 5): topics and filters, and routes from MQTT topics to log
//! topics, and the session layer (connections, QoS flows, retained and will messages,
//! subscriptions served from the log).

mod config;
mod persist;
pub mod routes;
mod server;
mod shared;
pub mod topic;
mod wire;

pub use config::{MqttConfig, MqttTlsConfig};
pub use server::{MqttError, MqttServer, MqttStats, SysPublisher, HEADER_QOS};

pub use routes::{Destination, Route, Router};
