//! Tributary's mirror of gateway topics to a central Kafka cluster over QUIC. Empty until the
//! mirroring issue lands; it exists now so the dependency direction
//! `firmware-gateway -> sync -> broker` is fixed from the start.

pub use tributary_broker as broker;
