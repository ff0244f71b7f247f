//! MQTT over WebSocket (RFC 6455; MQTT 5.0 and 3.1.1 section 6): the opening handshake
//! (`handshake`) and the frame codec (`codec`) as state machines without I/O, and the thin
//! adapter (`io`) that upgrades a connection and turns its frames into the byte stream a front
//! end's handler reads and writes. The listener (`listener.rs`) runs it on its WebSocket sockets,
//! after TLS and under the same deadline.

pub mod codec;
pub mod handshake;
pub mod io;

pub use handshake::{Refusal, SUBPROTOCOL};
pub use io::{upgrade, UpgradeError, WsReader, WsWriter};
