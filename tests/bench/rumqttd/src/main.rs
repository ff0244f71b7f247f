//! rumqttd (crates.io) as a standalone MQTT 3.1.1 broker for `mqtt-bench`:
//! `bench-rumqttd PORT` listens on 127.0.0.1:PORT, no TLS, no console, no metrics, and prints
//! `rumqttd ready 127.0.0.1:PORT` on stderr once the listener is bound.
//!
//! Settings (everything else is rumqttd's own): up to 2,048 connections (the router pre-sizes its
//! tables by this number), 100 unacknowledged QoS 1 messages per connection (rumqttd's default),
//! 1 MiB packets, and an in-memory commit log of 10 segments of 100 MiB (rumqttd's sample config),
//! so a slow subscriber is not cut off by the log's size during the benchmark.

use std::collections::HashMap;
use std::net::SocketAddr;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

fn main() {
    let port: u16 = match std::env::args().nth(1).and_then(|p| p.parse().ok()) {
        Some(p) => p,
        None => {
            eprintln!("usage: bench-rumqttd PORT");
            std::process::exit(2);
        }
    };
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let router = RouterConfig {
        max_connections: 2048,
        max_outgoing_packet_count: 200,
        max_segment_size: 100 << 20,
        max_segment_count: 10,
        ..Default::default()
    };
    let server = ServerSettings {
        name: "v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 1 << 20,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config { id: 0, router, v4: Some(HashMap::from([("1".to_string(), server)])), ..Default::default() };
    let mut broker = Broker::new(config);
    // `start` binds the listener on its own thread and blocks; wait until the port answers.
    std::thread::spawn(move || {
        if let Err(e) = broker.start() {
            eprintln!("rumqttd: {e}");
            std::process::exit(1);
        }
    });
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(listen).is_err() {
        if started.elapsed().as_secs() > 10 {
            eprintln!("rumqttd did not listen on {listen}");
            std::process::exit(1);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    eprintln!("rumqttd ready {listen}");
    loop {
        std::thread::park();
    }
}
