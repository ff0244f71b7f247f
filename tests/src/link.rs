//! The project's own link shaping proxies, in userspace on loopback: UDP (for the QUIC mirror)
//! and TCP (for Kafka clients such as MirrorMaker 2), with a switchable blackout, random loss
//! (UDP only: a TCP proxy sees a byte stream, it cannot drop segments), added one-way delay and a
//! rate limit per direction, and counters of the payload bytes each way (IP/UDP/TCP headers not
//! counted). Used by the mirror e2e tests and the mirror benchmarks.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What the path does to the traffic, changeable while it runs (all zero: a plain forwarder).
#[derive(Clone, Debug, Default)]
pub struct Impairment {
    /// Drops everything (UDP) or stalls both directions (TCP) while set.
    pub blackout: Arc<AtomicBool>,
    /// Random loss per datagram, in percent (UDP only).
    pub loss_percent: Arc<AtomicU32>,
    /// Added one-way delay, each direction (the round trip gains twice this).
    pub delay_ms: Arc<AtomicU32>,
    /// Rate limit per direction in bits per second (0: none).
    pub rate_bits_per_s: Arc<AtomicU64>,
    /// UDP: a datagram that would wait longer than this behind the rate limit is dropped (the
    /// bottleneck's queue, tail drop); 0 means 100 ms.
    pub queue_ms: Arc<AtomicU32>,
    /// Payload bytes received from the dialling side (towards the target).
    pub bytes_up: Arc<AtomicU64>,
    /// Payload bytes received from the target (towards the dialling side).
    pub bytes_down: Arc<AtomicU64>,
    /// UDP: datagrams received from the dialling side, and from the target.
    pub datagrams_up: Arc<AtomicU64>,
    pub datagrams_down: Arc<AtomicU64>,
    /// When the bottleneck is next free, per direction: one link shared by every connection
    /// and path through this proxy (as a WAN link is).
    free_up: Arc<Mutex<Option<Instant>>>,
    free_down: Arc<Mutex<Option<Instant>>>,
}

impl Impairment {
    /// A link of `rate_bits_per_s`, `rtt_ms` round trip and `loss_percent` random loss.
    pub fn shaped(rate_bits_per_s: u64, rtt_ms: u32, loss_percent: u32) -> Self {
        let imp = Self::default();
        imp.rate_bits_per_s.store(rate_bits_per_s, Ordering::Relaxed);
        imp.delay_ms.store(rtt_ms / 2, Ordering::Relaxed);
        imp.loss_percent.store(loss_percent, Ordering::Relaxed);
        imp
    }

    /// Both directions' byte counts.
    pub fn bytes(&self) -> (u64, u64) {
        (self.bytes_up.load(Ordering::Relaxed), self.bytes_down.load(Ordering::Relaxed))
    }

    fn lost(&self) -> bool {
        self.blackout.load(Ordering::Relaxed) || rand::random::<u32>() % 100 < self.loss_percent.load(Ordering::Relaxed)
    }

    fn delay(&self) -> Duration {
        Duration::from_millis(u64::from(self.delay_ms.load(Ordering::Relaxed)))
    }

    /// Time to put `n` bytes on the link (zero without a rate limit).
    fn serialisation(&self, n: usize) -> Duration {
        match self.rate_bits_per_s.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            rate => Duration::from_nanos((n as u64 * 8).saturating_mul(1_000_000_000) / rate),
        }
    }

    /// Reserves the bottleneck of direction `up` for `n` bytes: when they are all on the link.
    /// With `queue_max`, a reservation that would wait longer is refused (`None`: tail drop).
    fn reserve(&self, up: bool, n: usize, queue_max: Option<Duration>) -> Option<Instant> {
        let now = Instant::now();
        let clock = if up { &self.free_up } else { &self.free_down };
        let mut free = clock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let depart = free.unwrap_or(now).max(now) + self.serialisation(n);
        if queue_max.is_some_and(|q| depart.duration_since(now) > q) {
            return None;
        }
        *free = Some(depart);
        Some(depart)
    }
}

/// One direction of a UDP path: the bottleneck's departure clock and a FIFO of datagrams
/// waiting for their delivery time (order kept).
struct Lane {
    imp: Impairment,
    up: bool,
    tx: mpsc::UnboundedSender<(Instant, Vec<u8>)>,
}

impl Lane {
    /// `to`: the destination for an unconnected socket, `None` for a connected one.
    fn new(imp: Impairment, socket: Arc<UdpSocket>, to: Option<SocketAddr>, up: bool) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
        tokio::spawn(async move {
            while let Some((at, data)) = rx.recv().await {
                tokio::time::sleep_until(at).await;
                let _ = match to {
                    Some(to) => socket.send_to(&data, to).await,
                    None => socket.send(&data).await,
                };
            }
        });
        Self { imp, up, tx }
    }

    fn forward(&mut self, data: &[u8]) {
        if self.imp.lost() {
            return;
        }
        let queue = match self.imp.queue_ms.load(Ordering::Relaxed) {
            0 => Duration::from_millis(100),
            ms => Duration::from_millis(u64::from(ms)),
        };
        // None: tail drop at the bottleneck.
        if let Some(depart) = self.imp.reserve(self.up, data.len(), Some(queue)) {
            let _ = self.tx.send((depart + self.imp.delay(), data.to_vec()));
        }
    }
}

/// A UDP forwarder to `target` through `imp`; returns its address (what the client dials). Each
/// client source address gets its own upstream socket, so a reconnecting client (new port) is a
/// new path.
pub async fn udp_proxy(target: SocketAddr, imp: Impairment) -> std::io::Result<SocketAddr> {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    let addr = front.local_addr()?;
    tokio::spawn(async move {
        let mut paths: HashMap<SocketAddr, Lane> = HashMap::new();
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = front.recv_from(&mut buf).await {
            imp.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
            imp.datagrams_up.fetch_add(1, Ordering::Relaxed);
            let lane = match paths.entry(from) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(v) => {
                    let Ok(up) = UdpSocket::bind("127.0.0.1:0").await else { continue };
                    if up.connect(target).await.is_err() {
                        continue;
                    }
                    let up = Arc::new(up);
                    let (back, imp2) = (up.clone(), imp.clone());
                    let mut down = Lane::new(imp.clone(), front.clone(), Some(from), false);
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65_536];
                        loop {
                            let n = match back.recv(&mut buf).await {
                                Ok(n) => n,
                                // The target's port was closed for a while (ICMP port
                                // unreachable, reported on this connected socket): a restarted
                                // target may answer on it again, as a real path would carry.
                                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                                Err(_) => break,
                            };
                            imp2.bytes_down.fetch_add(n as u64, Ordering::Relaxed);
                            imp2.datagrams_down.fetch_add(1, Ordering::Relaxed);
                            down.forward(&buf[..n]);
                        }
                    });
                    v.insert(Lane::new(imp.clone(), up, None, true))
                }
            };
            lane.forward(&buf[..n]);
        }
    });
    Ok(addr)
}

/// A TCP forwarder: every connection accepted on `listener` is joined to a new connection to
/// `target` through `imp` (rate and delay; no loss: TCP would retransmit what a real link drops,
/// and a proxy cannot see segments). Bind the listener first when the target must advertise it
/// (a Kafka broker's advertised port).
pub fn tcp_proxy(listener: TcpListener, target: SocketAddr, imp: Impairment) {
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(target).await else { continue };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, imp.clone(), true));
            tokio::spawn(pump(sr, cw, imp.clone(), false));
        }
    });
}

/// One direction of a TCP connection: reads at most 16 KiB, holds it until the shared link has
/// carried it (so the senders' socket buffers are the queue), then delivers it after the delay,
/// in order.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    imp: Impairment,
    up: bool,
) {
    let counter = if up { imp.bytes_up.clone() } else { imp.bytes_down.clone() };
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(1024);
    let writer = tokio::spawn(async move {
        while let Some((at, data)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&data).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
        while imp.blackout.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let Some(depart) = imp.reserve(up, n, None) else { break };
        tokio::time::sleep_until(depart).await;
        if tx.send((depart + imp.delay(), buf[..n].to_vec())).await.is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}
