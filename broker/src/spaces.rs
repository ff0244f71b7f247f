//! The key-value spaces the broker keeps in the log store, by name. A name is part of the file
//! format: renaming one loses what it held.

use crate::storage::KvSpace;

/// Committed consumer-group offsets (`kafka/` groups).
pub const GROUP_OFFSETS: KvSpace = KvSpace::named("kv.group_offsets");
/// Stored MQTT sessions, their QoS 2 packet ids and pending messages (`mqtt/persist.rs`).
pub const MQTT_SESSIONS: KvSpace = KvSpace::named("kv.mqtt_sessions");
/// MQTT retained messages by topic, as the previous releases kept them: only read (and emptied)
/// at start-up, which moves them into the `mqtt.retained` log topic (`mqtt/server.rs`
/// `migrate_retained`). Nothing writes it any more.
pub const MQTT_RETAINED: KvSpace = KvSpace::named("kv.mqtt_retained");
/// Broker identity and counters (cluster id, producer id blocks).
pub const BROKER: KvSpace = KvSpace::named("kv.broker");
/// Aggregators' open windows and input positions, by derived topic (`aggregate/`).
pub const AGGREGATES: KvSpace = KvSpace::named("kv.aggregates");
