//! Crash test through the MQTT front end: the gateway runs as a child process, four raw-socket
//! MQTT 3.1.1 clients publish numbered QoS 2 messages with a window of 8 in flight, each with the
//! same client id and a persistent session in every round, and the gateway is SIGKILLed at a
//! random moment, 20 times. After each restart a client resends what it had not seen PUBRECed
//! (same packet id, DUP set) and repeats the PUBREL of what it had, as 3.1.1 4.4 asks. In the log,
//! each client's messages must be exactly its numbers 0, 1, 2, ... in order: every PUBRECed one
//! present, none twice (QoS 2 is exactly once across crashes), none missing in between.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use rand::Rng;
use rustix::process::{kill_process, Pid, Signal};
use tributary_broker::Store;

use crate::mqtt_faults::packet;
use crate::support::{read_all, storage_config};

const ROUNDS: u32 = 20;
const CLIENTS: usize = 4;
const WINDOW: usize = 8;

/// Starts the gateway on free ports; returns the child and its MQTT port.
#[allow(clippy::zombie_processes)]
fn start_gateway(dir: &std::path::Path) -> (Child, u16) {
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\ndata_dir = {:?}\ndisk_free_bytes_min = 0\n[kafka]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\nwebsocket_listen = \"127.0.0.1:0\"\n[metrics]\nenabled = false\n",
            dir.join("data").to_str().expect("utf-8")
        ),
    )
    .expect("write config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tributary-under-test"))
        .args(["serve", "--config", config.to_str().expect("utf-8")])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gateway");
    let mut reader = BufReader::new(child.stderr.take().expect("stderr"));
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).expect("read stderr");
        assert!(n > 0, "gateway exited before it was ready:\n{seen}");
        seen.push_str(&line);
        if line.contains("tributary gateway ready") {
            let addr = line.split_whitespace().find_map(|w| w.strip_prefix("mqtt=")).expect("mqtt address");
            let port = addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
            std::thread::spawn(move || for _ in reader.lines() {});
            return (child, port);
        }
    }
}

/// Where one of a client's messages stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Sent; no PUBREC yet (resent with DUP after a reconnect).
    Sent,
    /// PUBRECed: stored by the gateway; PUBREL sent, PUBCOMP awaited (PUBREL repeated).
    Received,
}

/// What a client keeps across the gateway's deaths (its session state).
#[derive(Debug, Default)]
struct ClientState {
    next_seq: u64,
    next_pkid: u16,
    /// By packet id: the message number and its stage.
    inflight: BTreeMap<u16, (u64, Stage)>,
    /// Numbers the gateway PUBRECed (so stored, never to be lost).
    received: Vec<u64>,
}

/// Reads one packet; `None` once the gateway is gone (whatever the way the socket ends).
fn read_packet(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut first = [0u8; 1];
    s.read_exact(&mut first).ok()?;
    let mut len = 0usize;
    for i in 0..4 {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).ok()?;
        len |= ((b[0] & 0x7f) as usize) << (7 * i);
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some((first[0], body))
}

fn publish_qos2(c: usize, seq: u64, pkid: u16, dup: bool) -> Vec<u8> {
    let topic = format!("crash/c{c}");
    let mut b = (topic.len() as u16).to_be_bytes().to_vec();
    b.extend_from_slice(topic.as_bytes());
    b.extend_from_slice(&pkid.to_be_bytes());
    b.extend_from_slice(format!("c{c}-{seq}").as_bytes());
    packet(0x34 | if dup { 0x08 } else { 0 }, &b)
}

/// One connection of client `c`: resume (resend and re-release), then publish new messages
/// within the window until the gateway dies. Reports each PUBREC on `acks`.
fn run_client(port: u16, c: usize, round: u32, st: &mut ClientState, acks: &mpsc::Sender<()>) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let id = format!("crash-c{c}");
    let mut b = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x00, 0, 60];
    b.extend_from_slice(&(id.len() as u16).to_be_bytes());
    b.extend_from_slice(id.as_bytes());
    if s.write_all(&packet(0x10, &b)).is_err() {
        return;
    }
    let Some((kind, body)) = read_packet(&mut s) else { return };
    assert_eq!((kind, body[1]), (0x20, 0), "client {c}: connection accepted");
    if round > 0 {
        assert_eq!(body[0] & 1, 1, "client {c}, round {round}: the persistent session survived the kill");
    }
    // 3.1.1 4.4: resend unacknowledged PUBLISH (DUP) and PUBREL packets, in the original order.
    let mut pending: Vec<(u16, u64, Stage)> = st.inflight.iter().map(|(&p, &(seq, stage))| (p, seq, stage)).collect();
    pending.sort_by_key(|(_, seq, _)| *seq);
    for (pkid, seq, stage) in pending {
        let bytes = match stage {
            Stage::Sent => publish_qos2(c, seq, pkid, true),
            Stage::Received => packet(0x62, &pkid.to_be_bytes()),
        };
        if s.write_all(&bytes).is_err() {
            return;
        }
    }
    loop {
        while st.inflight.len() < WINDOW {
            let mut pkid = st.next_pkid.max(1);
            while st.inflight.contains_key(&pkid) {
                pkid = pkid.checked_add(1).unwrap_or(1);
            }
            st.next_pkid = pkid.checked_add(1).unwrap_or(1);
            let seq = st.next_seq;
            st.next_seq += 1;
            st.inflight.insert(pkid, (seq, Stage::Sent));
            if s.write_all(&publish_qos2(c, seq, pkid, false)).is_err() {
                return;
            }
        }
        let Some((kind, body)) = read_packet(&mut s) else { return };
        let pkid = u16::from_be_bytes([body[0], body[1]]);
        match kind {
            0x50 => {
                let Some(entry) = st.inflight.get_mut(&pkid) else { panic!("client {c}: PUBREC for unknown {pkid}") };
                if entry.1 == Stage::Sent {
                    entry.1 = Stage::Received;
                    st.received.push(entry.0);
                    let _ = acks.send(());
                }
                if s.write_all(&packet(0x62, &pkid.to_be_bytes())).is_err() {
                    return;
                }
            }
            0x70 => {
                st.inflight.remove(&pkid);
            }
            other => panic!("client {c}: unexpected packet {other:#x}"),
        }
    }
}

#[test]
fn qos2_is_exactly_once_and_in_order_across_sigkills_with_persistent_sessions() {
    let mut rng =
        crate::support::seeded_rng("qos2_is_exactly_once_and_in_order_across_sigkills_with_persistent_sessions");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut states: Vec<ClientState> = (0..CLIENTS).map(|_| ClientState::default()).collect();
    for round in 0..ROUNDS {
        let (mut child, port) = start_gateway(dir.path());
        let kill_after = rng.random_range(20..1500);
        let (ack_tx, ack_rx) = mpsc::channel();
        std::thread::scope(|scope| {
            for (c, st) in states.iter_mut().enumerate() {
                let acks = ack_tx.clone();
                scope.spawn(move || run_client(port, c, round, st, &acks));
            }
            drop(ack_tx);
            for _ in 0..kill_after {
                if ack_rx.recv_timeout(Duration::from_secs(60)).is_err() {
                    break;
                }
            }
            kill_process(Pid::from_raw(child.id() as i32).expect("pid"), Signal::KILL).expect("kill");
            child.wait().expect("wait");
        });
    }
    let path = dir.path().to_path_buf();
    let (store, report) = Store::open(storage_config(&path)).expect("reopen");
    assert!(report.repaired, "the last kill left the database to repair");
    let mut stored: Vec<Vec<u64>> = vec![Vec::new(); CLIENTS];
    for r in read_all(&store, "mqtt", 0) {
        let payload = String::from_utf8(r.value.expect("value").to_vec()).expect("utf-8");
        let (c, seq) = payload[1..].split_once('-').expect("c{client}-{seq}");
        stored[c.parse::<usize>().expect("client")].push(seq.parse().expect("seq"));
    }
    let mut total_received = 0;
    for (c, (got, st)) in stored.iter().zip(&states).enumerate() {
        let want: Vec<u64> = (0..got.len() as u64).collect();
        assert_eq!(got, &want, "client {c}: its messages, each once, in order, none missing in between");
        let lost: Vec<&u64> = st.received.iter().filter(|seq| **seq >= got.len() as u64).collect();
        assert!(lost.is_empty(), "client {c}: PUBRECed messages missing: {lost:?}");
        total_received += st.received.len();
    }
    eprintln!(
        "{ROUNDS} kills: {total_received} messages PUBRECed, {} stored, each client's exactly once and in order",
        stored.iter().map(Vec::len).sum::<usize>()
    );
    store.close_blocking().expect("close");
}
