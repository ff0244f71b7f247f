//! The MQTT front end (3.1.1 and 5): topics and filters, and routes from MQTT topics to log
//! topics. The session layer (connections, QoS flows, persistent sessions) builds on these.

pub mod routes;
pub mod topic;

pub use routes::{Destination, Route, Router};
