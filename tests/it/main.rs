//! Tributary's end-to-end suite: one test binary, one module per area. Every test uses its own
//! temporary directory and (later) free ports, and synchronises on output, never on sleeps.

mod aggregate;
mod autocreate;
mod cli;
mod compaction;
mod crash;
mod disk_fault;
mod gateway;
mod kafka;
mod kafka_apache;
mod kafka_crash;
mod kafka_faults;
mod kafka_groups;
mod kafka_hardening;
mod kafka_protocol;
mod mirror;
mod mirror_checkpoints;
mod mirror_kafka;
mod mqtt;
mod mqtt5;
mod mqtt_crash;
mod mqtt_faults;
mod mqtt_limits;
mod mqtt_sessions;
mod mqtt_websocket;
mod powercut;
mod restore;
mod retained;
mod retention;
mod security;
mod soak;
mod status;
mod support;
mod sys;
mod systemd;
mod tail_cache;
