//! Heap an idle MQTT connection holds, counted: a counting global allocator keeps the bytes
//! allocated and not yet freed (live), and the real listener (TCP, CONNECT, session) serves
//! raw MQTT 3.1.1 clients that connect and then say nothing. The tests fail when start-up or an
//! idle connection holds more than its bound: a regression guard for buffers and futures sized
//! for a connection's worst case instead of what it does (issue 14's idle-memory target).
//!
//! A test binary of its own because the allocator is global to the binary. Live bytes are
//! deterministic where RSS is not (RSS adds the allocator's slack, the kernel's page faults and
//! the program text), so these bounds are the guard and RSS is measured by `mqtt-bench`.

// A global allocator is an `unsafe impl`: it forwards to the system allocator unchanged and only
// counts.
#![allow(unsafe_code)]

#[path = "support/hooked_alloc.rs"]
mod hooked_alloc;
#[path = "support/server.rs"]
mod server;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tributary_broker::mqtt::MqttConfig;

/// Bytes and blocks allocated and not freed, by every thread.
static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);
static LIVE_BLOCKS: AtomicI64 = AtomicI64::new(0);
/// Live blocks by size (16-byte classes up to 16 KiB; larger ones in the last).
const CLASSES: usize = 1025;
static BY_SIZE: [AtomicI64; CLASSES] = [const { AtomicI64::new(0) }; CLASSES];

fn class(size: usize) -> usize {
    (size.div_ceil(16)).min(CLASSES - 1)
}

fn add(size: usize) {
    LIVE_BYTES.fetch_add(size as i64, Ordering::Relaxed);
    LIVE_BLOCKS.fetch_add(1, Ordering::Relaxed);
    BY_SIZE[class(size)].fetch_add(1, Ordering::Relaxed);
}

fn sub(size: usize) {
    LIVE_BYTES.fetch_sub(size as i64, Ordering::Relaxed);
    LIVE_BLOCKS.fetch_sub(1, Ordering::Relaxed);
    BY_SIZE[class(size)].fetch_sub(1, Ordering::Relaxed);
}

#[global_allocator]
static GLOBAL: hooked_alloc::Hooked = hooked_alloc::Hooked { alloc: add, free: sub };

/// What is live now: bytes, blocks and blocks by size class.
struct Snapshot {
    bytes: i64,
    blocks: i64,
    by_size: Vec<i64>,
}

fn snapshot() -> Snapshot {
    Snapshot {
        bytes: LIVE_BYTES.load(Ordering::SeqCst),
        blocks: LIVE_BLOCKS.load(Ordering::SeqCst),
        by_size: BY_SIZE.iter().map(|c| c.load(Ordering::SeqCst)).collect(),
    }
}

/// The blocks that came between `a` and `b`, per `n`, by size class (the classes at least half
/// the `n` connections hold), for the failure message and `--nocapture`.
fn grown(a: &Snapshot, b: &Snapshot, n: i64) -> String {
    let mut s = String::new();
    for (i, (x, y)) in a.by_size.iter().zip(&b.by_size).enumerate() {
        let d = y - x;
        if d * 2 >= n {
            let size = if i == CLASSES - 1 { String::from(">16K") } else { format!("{}", i * 16) };
            s.push_str(&format!(" {:.2} x <={size} B;", d as f64 / n as f64));
        }
    }
    s
}

/// A raw MQTT 3.1.1 CONNECT (clean session, keep-alive 600 s) and its CONNACK, then a PINGREQ
/// and its PINGRESP: the session has gone round its loop and waits for the next packet.
fn connect_idle(addr: std::net::SocketAddr, id: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let id = id.as_bytes();
    let mut p = vec![0x10, (12 + id.len()) as u8, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0x02, 0x58];
    p.extend_from_slice(&(id.len() as u16).to_be_bytes());
    p.extend_from_slice(id);
    s.write_all(&p).expect("CONNECT");
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).expect("CONNACK");
    assert_eq!(ack, [0x20, 2, 0, 0], "CONNACK accepted");
    s.write_all(&[0xc0, 0]).expect("PINGREQ");
    let mut pong = [0u8; 2];
    s.read_exact(&mut pong).expect("PINGRESP");
    assert_eq!(pong, [0xd0, 0]);
    s
}

/// Live heap bytes per connection at most: right after its last packet (`BUSY`: the session's
/// answer and action queues still allocated) and once it has been quiet for the session's trim
/// delay (`IDLE`). Measured 2026-12-06 (debug build, as `cargo test` runs it; see BENCHMARKS.md
/// "Where the gateway's memory goes"): before this round 6,043 B (no trim existed); after it
/// 4,791 B busy and about 3,700 B idle (in 11 blocks: the session future 2,768 B, the task 384,
/// tokio's I/O registration 256, the socket halves, the takeover channel, the client id). The
/// bounds leave about 5% for allocator-size differences between Rust versions: a buffer of a
/// few hundred bytes kept per connection fails.
const PER_BUSY_CONNECTION_BYTES_MAX: i64 = 5_000;
const PER_IDLE_CONNECTION_BYTES_MAX: i64 = 3_900;
/// Live heap bytes the store and the MQTT listener hold once started, before any client.
/// Measured 2026-12-06: 173 KB; with the commit journal 171 KB plus its record buffer, kept for
/// the next commit (at most 64 KiB; 16 KB after start-up's commits): 187 KB, 191 KB on aarch64.
const START_BYTES_MAX: i64 = 200_000;
/// Connections counted.
const N: i64 = 500;

#[test]
fn an_idle_connection_and_the_start_up_hold_little_heap() {
    let before_start = snapshot();
    let server = server::start(MqttConfig { connections_max: 2_000, ..MqttConfig::default() });
    let addr = server.addr;
    // A first few connections: the first of each kind of thing (the runtime's I/O slabs, the
    // clients map) is start-up, not the per-connection cost.
    let warm: Vec<TcpStream> = (0..8).map(|i| connect_idle(addr, &format!("warm-{i}"))).collect();
    let start_bytes = snapshot().bytes - before_start.bytes;
    let mut idle: Vec<TcpStream> = Vec::with_capacity(N as usize);
    let started = snapshot();
    for i in 0..N {
        idle.push(connect_idle(addr, &format!("meter-{i:05}")));
    }
    let busy = snapshot();
    let per_busy = (busy.bytes - started.bytes) / N;
    // Quiet now: wait (polling, up to 10 s) until the sessions have given back what they no
    // longer use, or the time is up and the assertion below says what they still hold.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut quiet = snapshot();
    while (quiet.bytes - started.bytes) / N > PER_IDLE_CONNECTION_BYTES_MAX && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        quiet = snapshot();
    }
    let per_idle = (quiet.bytes - started.bytes) / N;
    let blocks = |s: &Snapshot| (s.blocks - started.blocks) as f64 / N as f64;
    eprintln!(
        "start-up: {start_bytes} live heap bytes; per connection right after its last packet: {per_busy} B in \
         {:.1} blocks:{}\nonce quiet: {per_idle} B in {:.1} blocks:{}",
        blocks(&busy),
        grown(&started, &busy, N),
        blocks(&quiet),
        grown(&started, &quiet, N)
    );
    drop(idle);
    drop(warm);
    let _ = server.stop.send(true);
    drop(server);
    assert!(
        per_busy <= PER_BUSY_CONNECTION_BYTES_MAX,
        "a connection holds {per_busy} B after its last packet, more than {PER_BUSY_CONNECTION_BYTES_MAX}:{}",
        grown(&started, &busy, N)
    );
    assert!(
        per_idle <= PER_IDLE_CONNECTION_BYTES_MAX,
        "an idle connection holds {per_idle} B, more than {PER_IDLE_CONNECTION_BYTES_MAX}:{}",
        grown(&started, &quiet, N)
    );
    assert!(start_bytes <= START_BYTES_MAX, "start-up holds {start_bytes} B, more than {START_BYTES_MAX}");
}
