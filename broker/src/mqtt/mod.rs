//! The MQTT front end (3.1.1 and 5): topics and filters, and routes from MQTT topics to log
//! topics, and the session layer (connections, QoS flows, retained and will messages,
//! subscriptions served from the log). The pieces without I/O: the session's rules and state
//! (`session`, driven by `server`), reason codes (`reason`), framing (`wire`), the in-flight
//! window (`outbound`), the retained index and scans (`retained`), the delayed-will queue
//! (`wills`), stored encodings (`persist`); the listener's sockets, TCP, TLS and WebSocket
//! (`sockets`).

mod config;
mod outbound;
mod persist;
mod reason;
mod retained;
pub mod routes;
mod server;
mod session;
mod shared;
mod sockets;
pub use crate::topic;
mod wills;
mod wire;

pub use config::{MqttConfig, MqttTlsConfig};
pub use server::{MqttError, MqttServer, MqttStats, SysPublisher, HEADER_QOS};

pub use routes::{Destination, Route, Router};
