//! The one listener both front ends use: bound sockets (plain or TLS), accepting with backoff
//! when accepting fails (out of file descriptors and the like), the per-address rate limit and
//! the connection limit, the TLS handshake and (on a WebSocket socket) the WebSocket upgrade
//! under one deadline, the connection counters, and
//! graceful shutdown: stop accepting, tell every open connection to finish (`Draining`), wait
//! for them up to `SHUTDOWN_WAIT`, return. What a connection does is the front end's handler.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::security::ratelimit::ConnectionRateLimit;
use crate::security::tls;
use crate::storage::accounting::debit;
use crate::websocket;

/// How long a stopping listener waits for its open connections to finish before it returns
/// (the rest end with the runtime). Below systemd's default `TimeoutStopSec` (90 s) with room
/// for the store's last commit.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);
/// The first pause after a failed accept; each failure in a row doubles it up to the maximum.
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The read half of a connection, plain or TLS, unbuffered (the front end buffers).
pub type Reader = Box<dyn AsyncRead + Unpin + Send>;
/// The write half of a connection, plain or TLS, unbuffered.
pub type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// Counters of one listener (a front end's, plain and TLS sockets together).
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Connections admitted under the rate and connection limits.
    pub connections_accepted: AtomicU64,
    /// Connections refused at the connection limit (`connections_max`).
    pub connections_refused: AtomicU64,
    /// Admitted connections not yet ended (a gauge).
    pub connections_open: AtomicU64,
    /// Connections closed at once by the per-address rate limit (`connections_per_ip_per_s_max`).
    pub connections_rate_limited: AtomicU64,
    /// TLS handshakes that failed or did not finish within their deadline.
    pub tls_handshake_failures: AtomicU64,
    /// Connections whose handler ended with an error (malformed input, I/O failures).
    pub protocol_errors: AtomicU64,
    /// Accepts that failed (file descriptors exhausted and the like), each followed by a pause.
    pub accept_errors: AtomicU64,
    /// WebSocket upgrades completed (admitted connections on WebSocket sockets, ws and wss).
    pub websocket_connections_accepted: AtomicU64,
    /// Admitted WebSocket connections not yet ended (a gauge; also in `connections_open`).
    pub websocket_connections_open: AtomicU64,
    /// Upgrade requests refused (bad, too large), closed, or not complete within the deadline.
    pub websocket_handshake_failures: AtomicU64,
}

/// What happens to a connection over `connections_max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverLimit {
    /// Closed at once, before any read or handshake (Kafka).
    Close,
    /// Handed to the handler with `Conn::admitted == false` (after the TLS handshake), so the
    /// front end can answer in its protocol before closing (MQTT's CONNACK "server busy"). Such
    /// connections hold no permit and are not waited for at shutdown; the handler must bound them.
    Answer,
}

/// The limits of one listener, from its front end's config.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The front end's name in logs and config keys (`kafka`, `mqtt`).
    pub name: &'static str,
    pub connections_max: u32,
    pub connections_per_ip_per_s_max: u32,
    pub connection_rate_addresses_max: u32,
    /// How long the TLS handshake and the WebSocket upgrade may take, together, from the accept.
    pub handshake_timeout: Duration,
    pub over_limit: OverLimit,
    /// Largest WebSocket upgrade request, in bytes (read on WebSocket sockets only).
    pub websocket_request_bytes_max: usize,
}

/// One bound socket: plain, or TLS with its server settings; its connections speak the front
/// end's protocol directly, or inside WebSocket frames after an upgrade.
#[derive(Debug)]
pub struct Socket {
    tcp: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    websocket: bool,
}

impl Socket {
    pub async fn bind(addr: &str, tls: Option<Arc<rustls::ServerConfig>>) -> std::io::Result<Self> {
        Ok(Self { tcp: TcpListener::bind(addr).await?, tls, websocket: false })
    }

    /// A socket whose connections upgrade to WebSocket (after TLS, if any) before the handler
    /// sees them; the handler reads and writes the frames' data as a byte stream.
    pub async fn bind_websocket(addr: &str, tls: Option<Arc<rustls::ServerConfig>>) -> std::io::Result<Self> {
        Ok(Self { websocket: true, ..Self::bind(addr, tls).await? })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// Tells an open connection that its listener is stopping: the connection should finish what
/// it has begun and close.
#[derive(Debug, Clone)]
pub struct Draining(watch::Receiver<bool>);

impl Draining {
    /// Completes once the listener stops (at once if it has).
    pub async fn wait(&mut self) {
        // An error means the listener is gone: stopping too.
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }
}

/// An accepted connection, handed to the front end's handler boxed (an async fn keeps its
/// arguments for as long as it runs, and a handler runs as long as its connection).
pub struct Conn {
    pub rd: Reader,
    pub wr: Writer,
    pub peer: SocketAddr,
    /// When the socket was accepted (deadlines such as a login's count from here).
    pub accepted: Instant,
    /// The client certificate's name, on a TLS socket that verifies client certificates.
    pub cert_name: Option<String>,
    /// `false`: over `connections_max` (only with `OverLimit::Answer`): refuse and close.
    pub admitted: bool,
    pub draining: Draining,
}

impl Conn {
    /// The connection's parts, out of its box. A plain function on purpose: a box taken apart
    /// inside an async fn stays allocated until the end of the function, which for a handler is
    /// the end of the connection.
    #[allow(clippy::boxed_local)] // Taking the box is the point: it is freed here.
    pub fn into_parts(self: Box<Self>) -> Self {
        *self
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("peer", &self.peer).field("admitted", &self.admitted).finish_non_exhaustive()
    }
}

/// A front end's bound sockets (one or more, sharing one connection limit and rate limit).
#[derive(Debug)]
pub struct Listener {
    sockets: Vec<Socket>,
    limits: Limits,
    draining: watch::Sender<bool>,
}

impl Listener {
    pub fn new(sockets: Vec<Socket>, limits: Limits) -> Self {
        assert!(!sockets.is_empty(), "a listener has a socket");
        Self { sockets, limits, draining: watch::channel(false).0 }
    }

    /// The `i`th socket's address, in the order given to `new`.
    pub fn local_addr(&self, i: usize) -> Option<std::io::Result<SocketAddr>> {
        self.sockets.get(i).map(Socket::local_addr)
    }

    /// The signal open connections get when the listener stops.
    pub fn draining(&self) -> Draining {
        Draining(self.draining.subscribe())
    }

    /// Accepts connections and runs `handler` on each in a task of its own until `shutdown`
    /// completes; then closes the sockets (new connections are refused), tells every open
    /// connection to finish, and waits for them up to `SHUTDOWN_WAIT`.
    pub async fn run<H, F>(self, stats: Arc<ListenerStats>, shutdown: impl Future<Output = ()>, handler: H)
    where
        H: Fn(Box<Conn>) -> F + Send + Sync + 'static,
        F: Future<Output = Result<(), String>> + Send + 'static,
    {
        let Self { sockets, limits, draining } = self;
        let name = limits.name;
        let connections = Arc::new(Semaphore::new(limits.connections_max as usize));
        let mut rate =
            ConnectionRateLimit::new(limits.connections_per_ip_per_s_max, limits.connection_rate_addresses_max);
        let handler = Arc::new(handler);
        let mut backoff = Backoff::default();
        let mut next = 0;
        tokio::pin!(shutdown);
        loop {
            let (accepted, i) = tokio::select! {
                () = &mut shutdown => break,
                a = accept_any(&sockets, &mut next) => a,
            };
            let (stream, peer) = match accepted {
                Ok(a) => {
                    backoff.reset();
                    a
                }
                Err(e) => {
                    stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                    let pause = backoff.next();
                    tracing::warn!(error = %e, pause_ms = pause.as_millis() as u64, "{name} accept failed");
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(pause) => continue,
                    }
                }
            };
            if !rate.allow(peer.ip(), Instant::now()) {
                // Cheap on purpose: no read, no answer, no log line per connection.
                stats.connections_rate_limited.fetch_add(1, Ordering::Relaxed);
                drop(stream);
                continue;
            }
            let permit = connections.clone().try_acquire_owned().ok();
            if permit.is_none() {
                stats.connections_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, limit = limits.connections_max, "{name}.connections_max reached: refusing");
                if limits.over_limit == OverLimit::Close {
                    drop(stream);
                    continue;
                }
            } else {
                stats.connections_accepted.fetch_add(1, Ordering::Relaxed);
            }
            let _ = stream.set_nodelay(true);
            let task = Box::new(Accepted {
                stream: Some(stream),
                peer,
                tls: sockets[i].tls.clone(),
                websocket: sockets[i].websocket.then_some(limits.websocket_request_bytes_max),
                handshake_timeout: limits.handshake_timeout,
                permit,
                draining: Draining(draining.subscribe()),
                name,
            });
            tokio::spawn(connection(task, stats.clone(), handler.clone()));
        }
        drop(sockets);
        let _ = draining.send(true);
        let all = limits.connections_max;
        let open = || debit(all.into(), connections.available_permits() as u64, "open connections");
        tracing::info!(open = open(), "{name} listener closed: waiting for open connections to finish");
        let finished = tokio::time::timeout(SHUTDOWN_WAIT, connections.acquire_many(all)).await;
        match finished {
            Ok(_) => tracing::info!("{name} connections finished"),
            Err(_) => tracing::warn!(
                open = open(),
                "{name} connections still open {} s after shutdown began",
                SHUTDOWN_WAIT.as_secs()
            ),
        }
    }
}

/// The next connection from any socket, and which socket it came from. Sockets are polled
/// starting from a rotating index, so a busy one cannot starve the others.
async fn accept_any(sockets: &[Socket], next: &mut usize) -> (std::io::Result<(TcpStream, SocketAddr)>, usize) {
    std::future::poll_fn(|cx| {
        let n = sockets.len();
        for k in 0..n {
            let i = (*next + k) % n;
            if let Poll::Ready(r) = sockets[i].tcp.poll_accept(cx) {
                *next = (i + 1) % n;
                return Poll::Ready((r, i));
            }
        }
        Poll::Pending
    })
    .await
}

/// Pauses after failed accepts: doubling from `ACCEPT_BACKOFF_FIRST` to `ACCEPT_BACKOFF_MAX`,
/// back to the first after a success.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let pause = ACCEPT_BACKOFF_FIRST.saturating_mul(1 << self.failures.min(16)).min(ACCEPT_BACKOFF_MAX);
        self.failures = self.failures.saturating_add(1);
        pause
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// What a connection's task starts from.
struct Accepted {
    /// Taken by the handshakes.
    stream: Option<TcpStream>,
    peer: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    /// On a WebSocket socket: the upgrade request's byte limit.
    websocket: Option<usize>,
    handshake_timeout: Duration,
    permit: Option<OwnedSemaphorePermit>,
    draining: Draining,
    name: &'static str,
}

impl Accepted {
    /// What the connection keeps (its permit and the drain signal); the rest is freed here. A
    /// plain function on purpose: a value taken apart inside an async fn stays allocated, box
    /// and all, until the end of the function, and this task's ends with the connection.
    #[allow(clippy::boxed_local)] // Taking the box is the point: it is freed here.
    fn into_kept(self: Box<Self>) -> (Option<OwnedSemaphorePermit>, Draining) {
        let Self { permit, draining, .. } = *self;
        (permit, draining)
    }
}

/// Counts an admitted connection open while it lives (also if its task panics), and as a
/// WebSocket connection once upgraded.
struct OpenGuard {
    stats: Arc<ListenerStats>,
    websocket: bool,
}

impl OpenGuard {
    fn new(stats: Arc<ListenerStats>) -> Self {
        stats.connections_open.fetch_add(1, Ordering::Relaxed);
        Self { stats, websocket: false }
    }

    fn upgraded(&mut self) {
        self.stats.websocket_connections_accepted.fetch_add(1, Ordering::Relaxed);
        self.stats.websocket_connections_open.fetch_add(1, Ordering::Relaxed);
        self.websocket = true;
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
        if self.websocket {
            self.stats.websocket_connections_open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// One connection's task: the handshakes (boxed: large and over once done), then the handler's
/// future, held in place (the task is that future and a few words more).
async fn connection<H, F>(a: Box<Accepted>, stats: Arc<ListenerStats>, handler: Arc<H>)
where
    H: Fn(Box<Conn>) -> F + Send + Sync + 'static,
    F: Future<Output = Result<(), String>> + Send + 'static,
{
    // Boxed: an async fn keeps its arguments for its whole life, and this one lives as long as
    // the connection.
    let admitted = a.permit.is_some();
    let mut open = admitted.then(|| OpenGuard::new(stats.clone()));
    let accepted = Instant::now();
    let (peer, name, websocket) = (a.peer, a.name, a.websocket.is_some());
    let Some((a, rd, wr, cert_name)) = Box::pin(handshakes(a, accepted, &stats)).await else { return };
    if let (true, Some(open)) = (websocket, open.as_mut()) {
        open.upgraded();
    }
    let (permit, draining) = a.into_kept();
    let conn = Conn { rd, wr, peer, accepted, cert_name, admitted, draining };
    let result = handler(Box::new(conn)).await;
    match result {
        Ok(()) => tracing::debug!(%peer, "{name} connection closed"),
        Err(reason) => {
            stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, %reason, "{name} connection closed");
        }
    }
    drop(permit);
}

/// The TLS handshake (if any) and the WebSocket upgrade (on a WebSocket socket), both within
/// `handshake_timeout` of the accept; `None` (counted, logged) if either fails or is late.
async fn handshakes(
    mut a: Box<Accepted>,
    accepted: Instant,
    stats: &ListenerStats,
) -> Option<(Box<Accepted>, Reader, Writer, Option<String>)> {
    let (peer, name) = (a.peer, a.name);
    let deadline = tokio::time::Instant::from_std(accepted + a.handshake_timeout);
    let stream = a.stream.take()?;
    let (rd, wr, cert_name): (Reader, Writer, _) = match a.tls.take() {
        None => {
            let (rd, wr) = stream.into_split();
            (Box::new(rd), Box::new(wr), None)
        }
        Some(server) => {
            let handshake = tokio_rustls::TlsAcceptor::from(server).accept(stream);
            match tokio::time::timeout_at(deadline, handshake).await {
                Ok(Ok(s)) => {
                    let name = tls::peer_name(s.get_ref().1);
                    let (rd, wr) = tokio::io::split(s);
                    (Box::new(rd), Box::new(wr), name)
                }
                Ok(Err(e)) => {
                    stats.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, error = %e, "{name} TLS handshake failed");
                    return None;
                }
                Err(_) => {
                    stats.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, "{name} TLS handshake did not complete in time");
                    return None;
                }
            }
        }
    };
    let Some(request_bytes_max) = a.websocket else { return Some((a, rd, wr, cert_name)) };
    match tokio::time::timeout_at(deadline, websocket::upgrade(rd, wr, request_bytes_max)).await {
        Ok(Ok((rd, wr))) => Some((a, Box::new(rd), Box::new(wr), cert_name)),
        Ok(Err(e)) => {
            stats.websocket_handshake_failures.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, error = %e, "{name} WebSocket upgrade failed");
            None
        }
        Err(_) => {
            stats.websocket_handshake_failures.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "{name} WebSocket upgrade did not complete in time");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_backoff_doubles_to_its_maximum_and_resets_after_a_success() {
        let mut b = Backoff::default();
        let pauses: Vec<u64> = (0..10).map(|_| b.next().as_millis() as u64).collect();
        assert_eq!(pauses, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        for _ in 0..100 {
            assert_eq!(b.next(), ACCEPT_BACKOFF_MAX, "no overflow after many failures");
        }
        b.reset();
        assert_eq!(b.next(), ACCEPT_BACKOFF_FIRST);
    }

    /// A connection task is its handler's future and little more (the handshake and the accepted
    /// socket's details are boxed), so an idle connection costs its handler's state, not the
    /// handshake's. Debug build (as `cargo test` builds it): 160 B around the handler at the time
    /// of writing (288 B before `Accepted` was boxed).
    #[test]
    fn a_connection_task_stays_small() {
        /// A handler future of a known size.
        struct Handling([u8; 600]);
        impl Future for Handling {
            type Output = Result<(), String>;
            fn poll(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> Poll<Self::Output> {
                Poll::Ready(if self.0.iter().all(|&b| b == 0) { Ok(()) } else { Err("not zero".into()) })
            }
        }
        type H = fn(Box<Conn>) -> Handling;
        fn size<F: Future>(_: &F) -> usize {
            std::mem::size_of::<F>()
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let bytes = rt.block_on(async {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let c = TcpStream::connect(l.local_addr().expect("addr")).await.expect("connect");
            let a = Box::new(Accepted {
                stream: Some(c),
                peer: l.local_addr().expect("addr"),
                tls: None,
                websocket: None,
                handshake_timeout: Duration::from_secs(1),
                permit: None,
                draining: Draining(watch::channel(false).1),
                name: "test",
            });
            let f = connection::<H, _>(a, Arc::default(), Arc::new(|_| Handling([0; 600])));
            size(&f)
        });
        eprintln!("connection task future around a 600-byte handler future: {bytes} B");
        assert!(bytes <= 600 + 192, "connection task future {bytes} B > 600 + 192 B");
    }
}
