//! The MQTT listener and its sessions: CONNECT (3.1.1 or 5, chosen by the protocol level),
//! keep-alive, session takeover, inbound QoS 0/1/2 with every acknowledgement sent only once the
//! message is durable (QoS 2 packet ids are stored in the same commit as the message), retained
//! messages, will messages, and subscriptions served from the log through per-partition cursors.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::select_all;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::config::MqttConfig;
use super::persist::{
    decode_session, decode_shared, encode_session, encode_shared, qos2_key, qos2_prefix, session_key, shared_key,
    Position, StoredInflight, StoredSession,
};
use super::routes::{Router, HEADER_CONTENT_TYPE, HEADER_CORRELATION_DATA, HEADER_RESPONSE_TOPIC, HEADER_TOPIC};
use super::shared::SharedGroup;
use super::topic;
use super::wire::{self, In, PublishProps, Version, WireError};
use crate::error::StoreError;
use crate::kafka::TopicTemplate;
use crate::partitioner::Partitioner;
use crate::security::ratelimit::ConnectionRateLimit;
use crate::security::{tls, Auth, LoginError, User};
use crate::storage::batch::{NewRecord, StoredRecord};
use crate::storage::{KvSpace, PendingAppend, Store};

/// Header carrying the QoS a message was published with.
pub const HEADER_QOS: &str = "mqtt.qos";
/// Header carrying the publishing client's id (for MQTT 5 No Local subscriptions).
pub const HEADER_CLIENT: &str = "mqtt.client";
/// Header carrying an MQTT 5 message's expiry (ms since the epoch).
pub const HEADER_EXPIRES: &str = "mqtt.expires-ms";

/// Why the MQTT listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("invalid MQTT configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// Counters of the MQTT front end.
#[derive(Debug, Default)]
pub struct MqttStats {
    pub connections_accepted: AtomicU64,
    pub connections_refused: AtomicU64,
    pub connections_open: AtomicU64,
    pub publishes_in: AtomicU64,
    pub publishes_out: AtomicU64,
    pub protocol_errors: AtomicU64,
    /// Messages a subscriber never got because retention deleted them first.
    pub retention_skipped_messages: AtomicU64,
    /// Messages not delivered because their MQTT 5 expiry passed.
    pub expired_messages: AtomicU64,
    /// Messages not delivered because they exceed the client's Maximum Packet Size.
    pub oversized_messages: AtomicU64,
    /// Retained messages refused because `mqtt.retained_messages_max` was reached.
    pub retained_refused: AtomicU64,
    /// Packet bytes received and sent.
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// CONNECTs refused for bad or missing credentials or an unknown certificate user.
    pub auth_failures: AtomicU64,
    /// Publishes and subscriptions the user's ACL does not allow.
    pub publishes_denied: AtomicU64,
    pub subscriptions_denied: AtomicU64,
    /// Connections closed at once by `mqtt.connections_per_ip_per_s_max`.
    pub connections_rate_limited: AtomicU64,
    /// TLS handshakes that failed (bad or unknown client certificate, not TLS, timeout).
    pub tls_handshake_failures: AtomicU64,
}

#[derive(Debug)]
struct Ctx {
    store: Store,
    cfg: MqttConfig,
    router: Router,
    defaults: TopicTemplate,
    partitioner: Partitioner,
    stats: Arc<MqttStats>,
    /// Connected client ids, with the way to close that connection (session takeover).
    clients: Mutex<HashMap<String, (u64, Takeover)>>,
    next_conn: AtomicU64,
    /// Set when the server stops: sessions store their state and end.
    shutdown: tokio::sync::watch::Sender<bool>,
    /// Shared subscriptions (`$share/{group}/{filter}`) by their full filter.
    shared: Mutex<HashMap<String, Arc<SharedGroup>>>,
    /// Retained messages stored (bounded by `mqtt.retained_messages_max`).
    retained: AtomicU64,
    auth: Arc<Auth>,
}

/// Messages one session takes from a shared group in one go, so active members share the load.
const SHARED_BATCH: usize = 16;

/// A bound MQTT listener (plain, and TLS when `[mqtt.tls]` is enabled).
#[derive(Debug)]
pub struct MqttServer {
    listener: TcpListener,
    tls: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
    ctx: Arc<Ctx>,
}

/// The two halves of a client connection, plain or TLS.
type Reader = BufReader<Box<dyn AsyncRead + Unpin + Send>>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

fn split_io<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(stream: S) -> (Reader, Writer) {
    let (rd, wr) = tokio::io::split(stream);
    (BufReader::with_capacity(16 * 1024, Box::new(rd)), Box::new(wr))
}

/// Accepts on an optional listener (never completes without one).
async fn accept_on(l: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

impl MqttServer {
    /// Binds with authentication off.
    pub async fn bind(cfg: MqttConfig, store: Store, defaults: TopicTemplate) -> Result<Self, MqttError> {
        Self::bind_with(cfg, store, defaults, Auth::disabled()).await
    }

    /// Binds the listeners; with `auth` enabled every client logs in and every publish and
    /// subscription is checked against its user's rules.
    pub async fn bind_with(
        cfg: MqttConfig,
        store: Store,
        defaults: TopicTemplate,
        auth: Arc<Auth>,
    ) -> Result<Self, MqttError> {
        cfg.validate("mqtt")?;
        let router = cfg.router("mqtt")?;
        let listener = TcpListener::bind(&cfg.listen)
            .await
            .map_err(|source| MqttError::Bind { addr: cfg.listen.clone(), source })?;
        let tls = if cfg.tls.enabled {
            let server = tls::server_config(tls::TlsFiles {
                prefix: "mqtt.tls",
                cert_file: &cfg.tls.cert_file,
                key_file: &cfg.tls.key_file,
                client_ca_file: &cfg.tls.client_ca_file,
            })?;
            let l = TcpListener::bind(&cfg.tls.listen)
                .await
                .map_err(|source| MqttError::Bind { addr: cfg.tls.listen.clone(), source })?;
            Some((l, server))
        } else {
            None
        };
        let retained = store
            .kv_scan(KvSpace::MqttRetained, b"", cfg.retained_messages_max as usize + 1)
            .map(|v| v.len() as u64)
            .unwrap_or(0);
        let ctx = Arc::new(Ctx {
            retained: AtomicU64::new(retained),
            store,
            router,
            defaults,
            partitioner: Partitioner::default(),
            stats: Arc::new(MqttStats::default()),
            clients: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            shutdown: tokio::sync::watch::channel(false).0,
            shared: Mutex::new(HashMap::new()),
            cfg,
            auth,
        });
        Ok(Self { listener, tls, ctx })
    }

    /// A handle for the broker's own `$SYS/...` messages (metrics for MQTT clients).
    pub fn sys_publisher(&self) -> SysPublisher {
        SysPublisher { ctx: self.ctx.clone() }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The TLS listener's address, if `[mqtt.tls]` is enabled.
    pub fn tls_local_addr(&self) -> Option<std::io::Result<SocketAddr>> {
        self.tls.as_ref().map(|(l, _)| l.local_addr())
    }

    pub fn stats(&self) -> Arc<MqttStats> {
        self.ctx.stats.clone()
    }

    /// Accepts connections until `shutdown` completes; then asks every session to store its
    /// state and end, and waits (up to 5 s) until they have.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let connections = Arc::new(Semaphore::new(self.ctx.cfg.connections_max as usize));
        let mut rate = ConnectionRateLimit::new(
            self.ctx.cfg.connections_per_ip_per_s_max,
            self.ctx.cfg.connection_rate_addresses_max,
        );
        if self.ctx.auth.enabled() && self.ctx.auth.user_count() == 0 {
            tracing::warn!("auth.enabled with no [[auth.users]]: every MQTT client will be refused");
        }
        tokio::pin!(shutdown);
        loop {
            let (accepted, tls) = tokio::select! {
                () = &mut shutdown => break,
                a = self.listener.accept() => (a, None),
                a = accept_on(self.tls.as_ref().map(|(l, _)| l)) => (a, self.tls.as_ref().map(|(_, t)| t.clone())),
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "mqtt accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if !rate.allow(peer.ip(), Instant::now()) {
                // Cheap on purpose: no read, no answer, no log line per connection.
                self.ctx.stats.connections_rate_limited.fetch_add(1, Ordering::Relaxed);
                drop(stream);
                continue;
            }
            let _ = stream.set_nodelay(true);
            let ctx = self.ctx.clone();
            let permit = connections.clone().try_acquire_owned().ok();
            tokio::spawn(async move {
                let ((mut rd, wr), cert_name) = match tls {
                    None => {
                        let (rd, wr) = stream.into_split();
                        let io: (Reader, Writer) = (BufReader::with_capacity(16 * 1024, Box::new(rd)), Box::new(wr));
                        (io, None)
                    }
                    Some(acceptor) => {
                        let limit = Duration::from_millis(ctx.cfg.connect_timeout_ms);
                        match tokio::time::timeout(limit, tokio_rustls::TlsAcceptor::from(acceptor).accept(stream))
                            .await
                        {
                            Ok(Ok(s)) => {
                                let name = tls::peer_name(s.get_ref().1);
                                (split_io(s), name)
                            }
                            Ok(Err(e)) => {
                                ctx.stats.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(%peer, error = %e, "mqtt TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                ctx.stats.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(%peer, "mqtt TLS handshake not done within mqtt.connect_timeout_ms");
                                return;
                            }
                        }
                    }
                };
                let Some(permit) = permit else {
                    ctx.stats.connections_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, limit = ctx.cfg.connections_max, "mqtt.connections_max reached: refusing");
                    refuse_busy(&ctx, &mut rd, wr).await;
                    return;
                };
                ctx.stats.connections_accepted.fetch_add(1, Ordering::Relaxed);
                ctx.stats.connections_open.fetch_add(1, Ordering::Relaxed);
                let result = connection(&ctx, rd, wr, peer, cert_name).await;
                ctx.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
                match result {
                    Ok(()) => tracing::debug!(%peer, "mqtt connection closed"),
                    Err(reason) => {
                        ctx.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%peer, %reason, "mqtt connection closed");
                    }
                }
                drop(permit);
            });
        }
        let _ = self.ctx.shutdown.send(true);
        let all = self.ctx.cfg.connections_max;
        if tokio::time::timeout(Duration::from_secs(5), connections.acquire_many(all)).await.is_err() {
            tracing::warn!("mqtt sessions still open 5 s after shutdown began");
        }
    }
}

/// Over the connection limit: read the CONNECT (briefly) to answer in its version, then close.
async fn refuse_busy(ctx: &Ctx, rd: &mut Reader, mut wr: Writer) {
    let read = tokio::time::timeout(Duration::from_secs(2), wire::read_frame(rd, ctx.cfg.packet_bytes_max as usize));
    if let Ok(Ok(frame)) = read.await {
        let version = if wire::connect_level(&frame) == Ok(5) { Version::V5 } else { Version::V4 };
        let _ = wr.write_all(&wire::connack(version, false, 0x89, &wire::ConnAckProps::default())).await;
    }
}

/// Publishes the broker's own `$SYS/...` messages: retained (a new subscriber gets the latest
/// values at once), into the log topic `__sys`, which keeps at most 1 MiB and one hour.
#[derive(Debug, Clone)]
pub struct SysPublisher {
    ctx: Arc<Ctx>,
}

impl SysPublisher {
    pub async fn publish(&self, topic: &str, payload: impl Into<Bytes>) -> Result<(), StoreError> {
        let ctx = &self.ctx;
        if ctx.store.topic(super::routes::SYS_TOPIC).is_none() {
            let cfg = crate::TopicConfig {
                retention_bytes: Some(1 << 20),
                retention_ms: Some(3_600_000),
                durability: crate::Durability::Relaxed,
                ..ctx.defaults.config.clone()
            };
            match ctx.store.create_topic(super::routes::SYS_TOPIC, 1, cfg).await {
                Ok(()) | Err(StoreError::TopicExists(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let origin = Origin { client_id: "$SYS".into(), username: None };
        let msg = Message {
            topic: topic.to_string(),
            qos: 0,
            retain: true,
            payload: payload.into(),
            props: PublishProps::default(),
        };
        publish_message(ctx, &origin, &msg, Vec::new()).await?.wait().await.map(|_| ())
    }
}

/// A message to publish into the log (a PUBLISH or a will).
struct Message {
    topic: String,
    qos: u8,
    retain: bool,
    payload: Bytes,
    props: PublishProps,
}

/// Work whose answer goes out once it completes, in order with the others. An empty answer
/// (`CLOSE`) closes the connection instead.
type Pending = Pin<Box<dyn Future<Output = Option<Bytes>> + Send>>;

static CLOSE: Bytes = Bytes::from_static(&[]);

/// Closes a connection whose session a new connection takes over; the new one is told once the
/// old one has stored the session.
type Takeover = oneshot::Sender<oneshot::Sender<()>>;

/// How long a taking-over connection waits for the old one to store the session.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

struct Session {
    version: Version,
    client_id: String,
    username: Option<String>,
    /// The logged-in user (authentication on): its rules decide what may be published and
    /// subscribed.
    user: Option<Arc<User>>,
    will: Option<wire::Will>,
    subs: Vec<wire::Subscription>,
    /// Inbound QoS 2 packet ids stored and waiting for PUBREL.
    qos2: HashSet<u16>,
    /// v5 topic aliases set by the client.
    aliases: HashMap<u16, String>,
    /// Outbound delivery: next offset per (log topic, partition).
    cursors: HashMap<(String, i32), i64>,
    /// Outbound QoS 1/2 messages waiting for the client, by packet id.
    inflight: HashMap<u16, Inflight>,
    next_pkid: u16,
    window: usize,
    /// Kept after the connection (clean session 0, or an MQTT 5 session expiry): subscriptions
    /// and cursors are stored, so the offline backlog is read from the log on reconnect.
    persistent: bool,
    session_expiry_s: u32,
    /// Subscriptions or cursors changed since the session was last stored.
    dirty: bool,
    /// Shared subscriptions: granted QoS and the group.
    shared: Vec<(u8, Arc<SharedGroup>)>,
    /// The client's Maximum Packet Size (MQTT 5): larger messages are not sent to it.
    max_packet_out: usize,
    /// Set when a new connection takes the session over: told once this one has stored it.
    taken_over: Option<oneshot::Sender<()>>,
}

/// An outbound QoS 1/2 message waiting for PUBACK, or for PUBREC then PUBCOMP.
struct Inflight {
    qos: u8,
    /// QoS 2 after PUBREC: the client has the message; PUBREL sent, PUBCOMP awaited.
    released: bool,
    source: Source,
}

/// Where an outbound message came from.
enum Source {
    /// A retained message sent on subscribe (not tracked in the log).
    Retained,
    /// The session's own subscriptions.
    Log(Position),
    /// A shared subscription: given back to the group if the session ends before the client
    /// has the message.
    Shared(Arc<SharedGroup>, Position),
}

impl Inflight {
    fn new(qos: u8, source: Source) -> Self {
        Self { qos, released: false, source }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The store writes that save a persistent session: the session (with its own messages in
/// flight) and the restart positions of its shared subscriptions, in one commit.
fn session_entries(s: &Session) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let deadline = if s.session_expiry_s == u32::MAX { 0 } else { now_ms() + i64::from(s.session_expiry_s) * 1000 };
    let mut inflight: Vec<StoredInflight> = s
        .inflight
        .iter()
        .filter_map(|(&pkid, m)| match &m.source {
            Source::Log(position) => Some((pkid, m, position)),
            // The client has it: only the PUBREL is left to repeat after a reconnect.
            Source::Shared(_, position) if m.released => Some((pkid, m, position)),
            _ => None,
        })
        .map(|(pkid, m, position)| StoredInflight {
            pkid,
            qos: m.qos,
            released: m.released,
            position: position.clone(),
        })
        .collect();
    inflight.sort_by(|a, b| a.position.cmp(&b.position));
    let stored = StoredSession {
        subs: s.subs.clone(),
        cursors: s.cursors.clone(),
        shared: s.shared.iter().map(|(q, g)| (g.name.clone(), *q)).collect(),
        inflight,
    };
    let mut entries = vec![(session_key(&s.client_id), Some(encode_session(deadline, &stored)))];
    for (_, g) in &s.shared {
        entries.push((shared_key(&g.name), Some(encode_shared(&g.restart_cursors()))));
    }
    entries
}

async fn save_session(ctx: &Ctx, s: &mut Session) -> Result<(), StoreError> {
    if !s.persistent {
        return Ok(());
    }
    ctx.store.kv_write(KvSpace::MqttSessions, session_entries(s)).await?;
    s.dirty = false;
    Ok(())
}

/// Retained message value: qos (1 byte), then the payload.
fn retained_value(qos: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + payload.len());
    v.push(qos);
    v.extend_from_slice(payload);
    v
}

async fn connection(
    ctx: &Arc<Ctx>,
    mut rd: Reader,
    wr: Writer,
    peer: SocketAddr,
    cert_name: Option<String>,
) -> Result<(), String> {
    let mut wr = BufWriter::with_capacity(16 * 1024, wr);
    let max = ctx.cfg.packet_bytes_max as usize;
    // CONNECT first, within the connect timeout.
    let first =
        tokio::time::timeout(Duration::from_millis(ctx.cfg.connect_timeout_ms), wire::read_connect_frame(&mut rd, max))
            .await
            .map_err(|_| "no CONNECT within mqtt.connect_timeout_ms".to_string())?;
    let frame = match first {
        Ok(f) => f,
        Err(WireError::Closed) => return Ok(()),
        Err(e) => return Err(e.to_string()),
    };
    let version = match wire::connect_level(&frame) {
        Ok(4) => Version::V4,
        Ok(5) => Version::V5,
        Ok(level) | Err(WireError::UnsupportedProtocol(level)) => {
            let _ = wr.write_all(&wire::connack(Version::V4, false, 0x84, &wire::ConnAckProps::default())).await;
            let _ = wr.flush().await;
            return Err(format!("unsupported MQTT protocol level {level}"));
        }
        Err(e) => return Err(e.to_string()),
    };
    let connect = wire::decode(version, frame, max).map_err(|e| format!("bad CONNECT: {e}"))?;
    let In::Connect {
        client_id,
        clean,
        keep_alive,
        username,
        password,
        will,
        receive_max,
        session_expiry_s,
        max_packet,
        ..
    } = connect
    else {
        return Err("the first packet must be CONNECT".into());
    };
    let refuse = |code: u8| wire::connack(version, false, code, &wire::ConnAckProps::default());
    let (client_id, assigned) = if client_id.is_empty() {
        if !clean && version == Version::V4 {
            let _ = wr.write_all(&refuse(0x85)).await;
            let _ = wr.flush().await;
            return Err("empty client id with clean session 0".into());
        }
        (format!("auto-{:016x}", rand::random::<u64>()), true)
    } else {
        (client_id, false)
    };
    if client_id.len() > ctx.cfg.client_id_bytes_max as usize {
        let _ = wr.write_all(&refuse(0x85)).await;
        let _ = wr.flush().await;
        return Err(format!("client id longer than mqtt.client_id_bytes_max = {}", ctx.cfg.client_id_bytes_max));
    }
    if let Some(w) = &will {
        if let Err(reason) = check_topic(ctx, &w.topic) {
            let _ = wr.write_all(&refuse(0x90)).await;
            let _ = wr.flush().await;
            return Err(format!("will topic: {reason}"));
        }
    }
    // Who the client is: its certificate's user, or its username and password.
    let user = if ctx.auth.enabled() {
        let started = Instant::now();
        let login = login(ctx, cert_name.as_deref(), username.as_deref(), password.as_deref()).await;
        let login = match (login, &will) {
            (Ok(u), Some(w)) if !u.may_publish(&client_id, &w.topic) => {
                Err((0x87, LoginError::Protocol(format!("may not publish its will to {:?}", w.topic))))
            }
            (other, _) => other,
        };
        match login {
            Ok(u) => Some(u),
            Err((code, e)) => {
                ctx.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, client = %client_id, user = ?cert_name.as_ref().or(username.as_ref()),
                    reason = %e, "mqtt login refused");
                ctx.auth.delay_failure(started).await;
                let _ = wr.write_all(&refuse(code)).await;
                let _ = wr.flush().await;
                return Ok(());
            }
        }
    } else {
        None
    };
    let username = user.as_ref().map(|u| u.name.clone()).or(username);
    // Session takeover: the previous connection with this client id is closed.
    let conn_id = ctx.next_conn.fetch_add(1, Ordering::Relaxed);
    let (kill_tx, mut kill_rx) = oneshot::channel();
    let previous = ctx.clients.lock().map_err(|_| "poisoned")?.insert(client_id.clone(), (conn_id, kill_tx));
    if let Some((_, kill)) = previous {
        tracing::info!(client = %client_id, "session taken over by a new connection");
        // Resume from what the old connection stores as it ends, not from an older save.
        let (done_tx, done_rx) = oneshot::channel();
        if kill.send(done_tx).is_ok() {
            let _ = tokio::time::timeout(TAKEOVER_WAIT, done_rx).await;
        }
    }
    // Clean start: forget an earlier session (its subscriptions, cursors and QoS 2 packet ids).
    let mut qos2 = HashSet::new();
    let stored =
        ctx.store.kv_scan(KvSpace::MqttSessions, &qos2_prefix(&client_id), 65_536).map_err(|e| e.to_string())?;
    let previous_session =
        ctx.store.kv_get(KvSpace::MqttSessions, &session_key(&client_id)).map_err(|e| e.to_string())?;
    let mut resumed = None;
    if clean {
        let mut removals = stored.into_iter().map(|(k, _)| (k, None)).collect::<Vec<_>>();
        if previous_session.is_some() {
            removals.push((session_key(&client_id), None));
        }
        if !removals.is_empty() {
            ctx.store.kv_write(KvSpace::MqttSessions, removals).await.map_err(|e| e.to_string())?;
        }
    } else {
        for (k, _) in stored {
            if let [.., a, b] = k[..] {
                qos2.insert(u16::from_be_bytes([a, b]));
            }
        }
        resumed = previous_session.as_deref().and_then(|v| decode_session(v, now_ms()));
    }
    let session_present = resumed.is_some() || (!clean && !qos2.is_empty());
    let props = wire::ConnAckProps {
        receive_max: ctx.cfg.inflight_messages_max,
        max_packet: ctx.cfg.packet_bytes_max,
        topic_alias_max: 64,
        assigned_client_id: assigned.then(|| client_id.clone()),
        reason: None,
    };
    wr.write_all(&wire::connack(version, session_present, 0, &props)).await.map_err(|e| e.to_string())?;
    wr.flush().await.map_err(|e| e.to_string())?;
    tracing::debug!(client = %client_id, ?version, clean, keep_alive, "mqtt client connected");

    let resumed = resumed.unwrap_or_default();
    let persistent = match version {
        Version::V4 => !clean,
        Version::V5 => session_expiry_s > 0,
    };
    let mut s = Session {
        version,
        client_id: client_id.clone(),
        username,
        user,
        will,
        subs: resumed.subs,
        qos2,
        aliases: HashMap::new(),
        cursors: resumed.cursors,
        inflight: HashMap::new(),
        next_pkid: 1,
        window: usize::from(receive_max.min(ctx.cfg.inflight_messages_max)).max(1),
        persistent,
        session_expiry_s,
        dirty: false,
        shared: Vec::new(),
        max_packet_out: max_packet.map_or(usize::MAX, |m| m as usize),
        taken_over: None,
    };
    // A stored session keeps only what the user's rules (perhaps changed since) still allow.
    if let Some(u) = s.user.clone() {
        s.subs.retain(|sub| u.may_subscribe(&client_id, &sub.filter));
    }
    for (name, qos) in resumed.shared {
        if let Some((_, inner)) = name.strip_prefix("$share/").and_then(|r| r.split_once('/')) {
            if s.user.as_ref().is_some_and(|u| !u.may_subscribe(&client_id, inner)) {
                continue;
            }
            let g = shared_group(ctx, &name, inner);
            s.shared.push((qos, g));
        }
    }
    // Answers leave through one writer task, in the order their work was started.
    let (tx, mut rx) = mpsc::channel::<Pending>(usize::from(ctx.cfg.inflight_messages_max) + 16);
    let stats = ctx.stats.clone();
    let writer = tokio::spawn(async move {
        while let Some(p) = rx.recv().await {
            if let Some(bytes) = p.await {
                if bytes.is_empty() {
                    let _ = wr.flush().await;
                    let _ = wr.shutdown().await;
                    return;
                }
                stats.bytes_out.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                if wr.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            if rx.is_empty() && wr.flush().await.is_err() {
                return;
            }
        }
        let _ = wr.flush().await;
        let _ = wr.shutdown().await;
    });
    let keep_alive = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
    let result = match resume_inflight(ctx, &mut s, &tx, resumed.inflight).await {
        Ok(()) => session_loop(ctx, &mut s, &mut rd, &tx, keep_alive, &mut kill_rx).await,
        Err(e) => Err(e),
    };
    // Shared-subscription messages the client does not have yet go to the other members.
    s.inflight.retain(|_, m| match &m.source {
        Source::Shared(g, position) if !m.released => {
            g.give_back(position.clone());
            false
        }
        _ => true,
    });
    if let Err(e) = save_session(ctx, &mut s).await {
        tracing::warn!(client = %client_id, error = %e, "session not stored");
    }
    if let Some(done) = s.taken_over.take() {
        let _ = done.send(());
    }
    release_groups(ctx, std::mem::take(&mut s.shared));
    // A will is published unless the client said goodbye normally; an MQTT 5 will delay holds
    // it back, and a reconnect of the same client within the delay cancels it.
    let graceful = matches!(result, Ok(true));
    if let (false, Some(w)) = (graceful, s.will.take()) {
        let msg = Message {
            topic: w.topic,
            qos: w.qos,
            retain: w.retain,
            payload: w.payload,
            props: PublishProps::default(),
        };
        let delay = Duration::from_secs(u64::from(w.delay_s.min(s.session_expiry_s)));
        let (ctx2, client, user) = (ctx.clone(), client_id.clone(), s.username.clone());
        let publish_will = async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
                if ctx2.clients.lock().map(|c| c.contains_key(&client)).unwrap_or(true) {
                    tracing::debug!(client = %client, "client back before its will delay: will dropped");
                    return;
                }
            }
            let origin = Origin { client_id: client.clone(), username: user };
            match publish_message(&ctx2, &origin, &msg, Vec::new()).await {
                Ok(p) => match p.wait().await {
                    Ok(_) => tracing::debug!(client = %client, "will message published"),
                    Err(e) => tracing::warn!(client = %client, error = %e, "will message not stored"),
                },
                Err(e) => tracing::warn!(client = %client, error = %e, "will message not stored"),
            }
        };
        if delay.is_zero() {
            publish_will.await;
        } else {
            tokio::spawn(publish_will);
        }
    }
    if let Ok(mut clients) = ctx.clients.lock() {
        if clients.get(&client_id).is_some_and(|(id, _)| *id == conn_id) {
            clients.remove(&client_id);
        }
    }
    drop(tx);
    let _ = writer.await;
    result.map(|_| ())
}

/// Authenticates a CONNECT; the error carries the v5 reason code (mapped to 3.1.1 return codes
/// 4 and 5 by `wire::connack`).
async fn login(
    ctx: &Ctx,
    cert_name: Option<&str>,
    username: Option<&str>,
    password: Option<&str>,
) -> Result<Arc<User>, (u8, LoginError)> {
    if let Some(name) = cert_name {
        if username.is_some_and(|u| u != name) {
            return Err((0x87, LoginError::Protocol(format!("username differs from the certificate's name {name:?}"))));
        }
        return ctx.auth.user(name).ok_or((0x87, LoginError::UnknownUser));
    }
    match (username, password) {
        (None, _) => Err((0x87, LoginError::NoCredentials)),
        (Some(_), None) => Err((0x86, LoginError::Protocol("username without a password".into()))),
        (Some(u), Some(p)) => ctx.auth.check_password(u, p.as_bytes()).await.map_err(|e| (0x86, e)),
    }
}

fn check_topic(ctx: &Ctx, t: &str) -> Result<(), String> {
    if !topic::valid_topic(t) {
        return Err(format!("{t:?} is not a valid topic name"));
    }
    if t.starts_with('$') {
        return Err(format!("{t:?}: topics starting with '$' are the broker's"));
    }
    if t.len() > ctx.cfg.topic_bytes_max as usize {
        return Err(format!("topic longer than mqtt.topic_bytes_max = {}", ctx.cfg.topic_bytes_max));
    }
    if t.split('/').count() > ctx.cfg.topic_levels_max as usize {
        return Err(format!("topic has more than mqtt.topic_levels_max = {} levels", ctx.cfg.topic_levels_max));
    }
    Ok(())
}

/// Who published a message (a session, or the client a will message belongs to).
struct Origin {
    client_id: String,
    username: Option<String>,
}

async fn publish_into_log(
    ctx: &Ctx,
    s: &Session,
    m: &Message,
    kv: Vec<(KvSpace, Vec<u8>, Option<Vec<u8>>)>,
) -> Result<PendingAppend, StoreError> {
    let origin = Origin { client_id: s.client_id.clone(), username: s.username.clone() };
    publish_message(ctx, &origin, m, kv).await
}

/// Appends one message to its routed log topic (creating the topic on first use); `kv` is
/// committed with it.
async fn publish_message(
    ctx: &Ctx,
    s: &Origin,
    m: &Message,
    mut kv: Vec<(KvSpace, Vec<u8>, Option<Vec<u8>>)>,
) -> Result<PendingAppend, StoreError> {
    let dest = ctx.router.route(&m.topic, &s.client_id, s.username.as_deref());
    let partitions = match ctx.store.topic(&dest.topic) {
        Some(t) => t.partitions,
        None => {
            match ctx.store.create_topic(&dest.topic, ctx.defaults.partitions, ctx.defaults.config.clone()).await {
                Ok(()) | Err(StoreError::TopicExists(_)) => {}
                Err(e) => return Err(e),
            }
            ctx.store.topic(&dest.topic).map_or(1, |t| t.partitions)
        }
    };
    let partition = ctx.partitioner.partition(dest.key.as_deref().map(str::as_bytes), partitions) as i32;
    let mut headers = vec![
        (HEADER_TOPIC.to_string(), Some(Bytes::from(m.topic.clone().into_bytes()))),
        (HEADER_QOS.to_string(), Some(Bytes::from(m.qos.to_string().into_bytes()))),
        (HEADER_CLIENT.to_string(), Some(Bytes::from(s.client_id.clone().into_bytes()))),
    ];
    if let Some(secs) = m.props.message_expiry_s {
        let deadline = now_ms() + i64::from(secs) * 1000;
        headers.push((HEADER_EXPIRES.to_string(), Some(Bytes::from(deadline.to_string().into_bytes()))));
    }
    if let Some(ct) = &m.props.content_type {
        headers.push((HEADER_CONTENT_TYPE.to_string(), Some(Bytes::from(ct.clone().into_bytes()))));
    }
    if let Some(cd) = &m.props.correlation_data {
        headers.push((HEADER_CORRELATION_DATA.to_string(), Some(cd.clone())));
    }
    if let Some(rt) = &m.props.response_topic {
        headers.push((HEADER_RESPONSE_TOPIC.to_string(), Some(Bytes::from(rt.clone().into_bytes()))));
    }
    for (k, v) in &m.props.user_properties {
        headers.push((k.clone(), Some(Bytes::from(v.clone().into_bytes()))));
    }
    if m.retain {
        let key = m.topic.clone().into_bytes();
        let existed = ctx.store.kv_get(KvSpace::MqttRetained, &key)?.is_some();
        if m.payload.is_empty() {
            if existed {
                ctx.retained.fetch_sub(1, Ordering::Relaxed);
            }
            kv.push((KvSpace::MqttRetained, key, None));
        } else if existed || ctx.retained.load(Ordering::Relaxed) < u64::from(ctx.cfg.retained_messages_max) {
            if !existed {
                ctx.retained.fetch_add(1, Ordering::Relaxed);
            }
            kv.push((KvSpace::MqttRetained, key, Some(retained_value(m.qos, &m.payload))));
        } else {
            ctx.stats.retained_refused.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::LimitReached {
                key: "mqtt.retained_messages_max",
                limit: ctx.cfg.retained_messages_max.into(),
            });
        }
    }
    let record = NewRecord {
        key: dest.key.map(|k| Bytes::from(k.into_bytes())),
        value: Some(m.payload.clone()),
        headers,
        timestamp_ms: None,
    };
    ctx.stats.publishes_in.fetch_add(1, Ordering::Relaxed);
    ctx.store.enqueue_records_with(&dest.topic, partition, vec![record], kv).await
}

/// v5 reason code for a refused publish.
fn publish_reason(e: &StoreError) -> u8 {
    match e {
        StoreError::DiskFull { .. } | StoreError::LimitReached { .. } => 0x97,
        StoreError::AppendTooLarge { .. } => 0x95,
        StoreError::InvalidTopicName { .. } => 0x90,
        _ => 0x80,
    }
}

/// Reads packets until the client leaves; `Ok(true)` = a normal DISCONNECT (no will).
async fn session_loop(
    ctx: &Arc<Ctx>,
    s: &mut Session,
    rd: &mut Reader,
    tx: &mpsc::Sender<Pending>,
    keep_alive: Option<Duration>,
    kill: &mut oneshot::Receiver<oneshot::Sender<()>>,
) -> Result<bool, String> {
    let mut shutdown = ctx.shutdown.subscribe();
    // Inbound QoS 1/2 publishes whose acknowledgement is still waiting for the commit.
    let unacked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let max = ctx.cfg.packet_bytes_max as usize;
    let v = s.version;
    let send = |bytes: Bytes| -> Pending { Box::pin(async move { Some(bytes) }) };
    loop {
        deliver(ctx, s, tx).await?;
        let watches = subscription_watches(ctx, s);
        let wait_for_data = async {
            if watches.is_empty() {
                std::future::pending::<()>().await;
            } else {
                let mut watches = watches;
                let _ = select_all(watches.iter_mut().map(|w| Box::pin(w.changed()))).await;
            }
        };
        let read = async {
            match keep_alive {
                Some(k) => tokio::time::timeout(k, wire::read_frame(rd, max))
                    .await
                    .map_err(|_| "keep-alive expired".to_string()),
                None => Ok(wire::read_frame(rd, max).await),
            }
        };
        let frame = tokio::select! {
            done = &mut *kill => {
                s.taken_over = done.ok();
                if v == Version::V5 {
                    let _ = tx.send(send(wire::disconnect(0x8E))).await;
                }
                return Err("session taken over".into());
            }
            () = wait_for_data => continue,
            // New topics or partitions appear: look again at least every second, and store the
            // delivery progress of persistent sessions.
            () = tokio::time::sleep(Duration::from_secs(1)), if !s.subs.is_empty() || !s.shared.is_empty() => {
                if s.dirty {
                    save_session(ctx, s).await.map_err(|e| format!("session not stored: {e}"))?;
                }
                continue;
            }
            () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => {
                if v == Version::V5 {
                    let _ = tx.send(send(wire::disconnect(0x8B))).await;
                }
                return Err("server shutting down".into());
            }
            f = read => f?,
        };
        let frame = match frame {
            Ok(f) => {
                ctx.stats.bytes_in.fetch_add(f.len() as u64, Ordering::Relaxed);
                f
            }
            Err(WireError::Closed) => return Ok(false),
            Err(WireError::TooLarge { size, max }) => {
                if v == Version::V5 {
                    let _ = tx.send(send(wire::disconnect(0x95))).await;
                }
                return Err(format!("packet of {size} bytes over mqtt.packet_bytes_max = {max}"));
            }
            Err(e) => {
                if v == Version::V5 {
                    let _ = tx.send(send(wire::disconnect(0x81))).await;
                }
                return Err(e.to_string());
            }
        };
        let packet = match wire::decode(v, frame, max) {
            Ok(p) => p,
            Err(e) => {
                if v == Version::V5 {
                    let _ = tx.send(send(wire::disconnect(0x81))).await;
                }
                return Err(e.to_string());
            }
        };
        match packet {
            In::Connect { .. } => {
                if v == Version::V5 {
                    let _ = tx.send(send(wire::disconnect(0x82))).await;
                }
                return Err("a second CONNECT".into());
            }
            In::PingReq => {
                let _ = tx.send(send(wire::pingresp())).await;
            }
            In::Disconnect(reason) => return Ok(reason != 0x04),
            In::Publish { topic: t, qos, retain, dup: _, pkid, payload, props } => {
                let topic_name = match (std::str::from_utf8(&t), props.topic_alias) {
                    (Ok(""), Some(alias)) => match s.aliases.get(&alias) {
                        Some(known) => known.clone(),
                        None => {
                            let _ = tx.send(send(wire::disconnect(0x82))).await;
                            return Err(format!("unknown topic alias {alias}"));
                        }
                    },
                    (Ok(name), alias) => {
                        if let Some(a) = alias {
                            if a == 0 || a > 64 {
                                let _ = tx.send(send(wire::disconnect(0x94))).await;
                                return Err(format!("topic alias {a} outside 1..=64"));
                            }
                            s.aliases.insert(a, name.to_string());
                        }
                        name.to_string()
                    }
                    (Err(_), _) => {
                        if v == Version::V5 {
                            let _ = tx.send(send(wire::disconnect(0x81))).await;
                        }
                        return Err("topic is not valid UTF-8".into());
                    }
                };
                if qos > 2 {
                    return Err("QoS 3".into());
                }
                if let Err(reason) = check_topic(ctx, &topic_name) {
                    if v == Version::V5 {
                        let _ = tx.send(send(wire::disconnect(0x90))).await;
                    }
                    return Err(reason);
                }
                if s.user.as_ref().is_some_and(|u| !u.may_publish(&s.client_id, &topic_name)) {
                    // Refused by the ACL. MQTT 5: PUBACK/PUBREC "not authorized". 3.1.1 has no
                    // negative acknowledgement: the message is acknowledged and dropped (as
                    // mosquitto does), counted and logged, so a device retrying it does not loop
                    // through reconnects.
                    ctx.stats.publishes_denied.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(client = %s.client_id, user = ?s.username, topic = %topic_name,
                        "publish not allowed by the user's ACL: dropped");
                    if qos > 0 {
                        let reason = if v == Version::V5 { 0x87 } else { 0 };
                        let _ = tx.send(send(wire::ack(v, if qos == 1 { 4 } else { 5 }, pkid, reason))).await;
                    }
                    continue;
                }
                let msg = Message { topic: topic_name, qos, retain, payload, props };
                if qos == 2 && s.qos2.contains(&pkid) {
                    // A retransmission of a message already stored: acknowledge again, store nothing.
                    let _ = tx.send(send(wire::ack(v, 5, pkid, 0))).await;
                    continue;
                }
                let kv = if qos == 2 {
                    vec![(KvSpace::MqttSessions, qos2_key(&s.client_id, pkid), Some(Vec::new()))]
                } else {
                    Vec::new()
                };
                let appended = publish_into_log(ctx, s, &msg, kv).await;
                match (qos, appended) {
                    (0, Ok(_)) => {}
                    (0, Err(e)) => tracing::debug!(client = %s.client_id, error = %e, "QoS 0 publish dropped"),
                    (q, Ok(pending)) => {
                        if q == 2 {
                            s.qos2.insert(pkid);
                        }
                        let kind = if q == 1 { 4 } else { 5 };
                        let disconnect_v4 = v == Version::V4;
                        let waiting = unacked.fetch_add(1, Ordering::Relaxed) + 1;
                        if v == Version::V5 && waiting > usize::from(ctx.cfg.inflight_messages_max) {
                            let _ = tx.send(send(wire::disconnect(0x93))).await;
                            return Err("more unacknowledged QoS 1/2 publishes than the Receive Maximum".into());
                        }
                        let unacked = unacked.clone();
                        let _ = tx
                            .send(Box::pin(async move {
                                let result = pending.wait().await;
                                unacked.fetch_sub(1, Ordering::Relaxed);
                                match result {
                                    Ok(_) => Some(wire::ack(v, kind, pkid, 0)),
                                    Err(e) if disconnect_v4 => {
                                        tracing::warn!(error = %e, "publish refused; 3.1.1 has no negative ack: closing");
                                        Some(CLOSE.clone())
                                    }
                                    Err(e) => Some(wire::ack(v, kind, pkid, publish_reason(&e))),
                                }
                            }))
                            .await;
                    }
                    (q, Err(e)) => {
                        tracing::debug!(client = %s.client_id, error = %e, "publish refused");
                        if v == Version::V4 {
                            return Err(format!("publish refused ({e}); 3.1.1 has no negative acknowledgement"));
                        }
                        let kind = if q == 1 { 4 } else { 5 };
                        let _ = tx.send(send(wire::ack(v, kind, pkid, publish_reason(&e)))).await;
                    }
                }
            }
            In::PubRel(pkid) => {
                let known = s.qos2.remove(&pkid);
                let store = ctx.store.clone();
                let key = qos2_key(&s.client_id, pkid);
                let _ = tx
                    .send(Box::pin(async move {
                        if known && store.kv_write(KvSpace::MqttSessions, vec![(key, None)]).await.is_err() {
                            return Some(wire::ack(v, 7, pkid, 0x80));
                        }
                        Some(wire::ack(v, 7, pkid, if known || v == Version::V4 { 0 } else { 0x92 }))
                    }))
                    .await;
            }
            In::PubAck(pkid) | In::PubComp(pkid) => {
                if let Some(m) = s.inflight.remove(&pkid) {
                    if let Source::Shared(g, position) = &m.source {
                        g.settle(position);
                    }
                    s.dirty = s.persistent;
                }
            }
            In::PubRec(pkid) => {
                // Outbound QoS 2, step 2: the client has the message. A persistent session
                // stores that before the PUBREL, so neither a reconnect nor a crash sends the
                // message again: only the PUBREL is repeated.
                let pubrel = wire::ack(v, 6, pkid, 0);
                match s.inflight.get_mut(&pkid) {
                    Some(m) if m.qos == 2 => {
                        if !m.released {
                            m.released = true;
                            if let Source::Shared(g, position) = &m.source {
                                g.settle(position);
                            }
                        }
                        if s.persistent {
                            let (store, entries) = (ctx.store.clone(), session_entries(s));
                            s.dirty = false;
                            let _ = tx
                                .send(Box::pin(async move {
                                    match store.kv_write(KvSpace::MqttSessions, entries).await {
                                        Ok(()) => Some(pubrel),
                                        Err(_) => Some(CLOSE.clone()),
                                    }
                                }))
                                .await;
                        } else {
                            let _ = tx.send(send(pubrel)).await;
                        }
                    }
                    _ if v == Version::V5 => {
                        let _ = tx.send(send(wire::ack(v, 6, pkid, 0x92))).await;
                    }
                    _ => {}
                }
            }
            In::Subscribe { pkid, subs } => {
                let mut codes = Vec::with_capacity(subs.len());
                let mut retained = Vec::new();
                for sub in subs {
                    if let Some(rest) = sub.filter.strip_prefix("$share/") {
                        // Shared subscription: `$share/{group}/{filter}`.
                        let valid = rest
                            .split_once('/')
                            .filter(|(g, f)| !g.is_empty() && !g.contains(['+', '#']) && topic::valid_filter(f));
                        let Some((_, inner)) = valid else {
                            codes.push(0x8F);
                            continue;
                        };
                        if s.user.as_ref().is_some_and(|u| !u.may_subscribe(&s.client_id, inner)) {
                            ctx.stats.subscriptions_denied.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(client = %s.client_id, user = ?s.username, filter = %sub.filter,
                                "subscription not allowed by the user's ACL");
                            codes.push(0x87); // not authorized (3.1.1: 0x80 failure)
                            continue;
                        }
                        if s.subs.len() + s.shared.len() >= ctx.cfg.subscriptions_per_client_max as usize
                            && !s.shared.iter().any(|(_, g)| g.name == sub.filter)
                        {
                            codes.push(0x97);
                            continue;
                        }
                        let group = shared_group(ctx, &sub.filter, inner);
                        let granted = sub.qos.min(2);
                        s.shared.retain(|(_, g)| g.name != sub.filter);
                        s.shared.push((granted, group));
                        codes.push(granted);
                        continue;
                    }
                    if !topic::valid_filter(&sub.filter) || sub.filter.len() > ctx.cfg.topic_bytes_max as usize {
                        codes.push(0x8F); // topic filter invalid
                        continue;
                    }
                    if s.user.as_ref().is_some_and(|u| !u.may_subscribe(&s.client_id, &sub.filter)) {
                        ctx.stats.subscriptions_denied.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(client = %s.client_id, user = ?s.username, filter = %sub.filter,
                            "subscription not allowed by the user's ACL");
                        codes.push(0x87); // not authorized (3.1.1: 0x80 failure)
                        continue;
                    }
                    let exists = s.subs.iter().position(|x| x.filter == sub.filter);
                    if exists.is_none() && s.subs.len() >= ctx.cfg.subscriptions_per_client_max as usize {
                        codes.push(0x97); // quota exceeded
                        continue;
                    }
                    let granted = sub.qos.min(2);
                    // New messages from now on: cursors of the log topics this filter can reach
                    // start at their current ends.
                    for (route_filter, log_topic) in ctx.router.filters() {
                        if filters_overlap(route_filter, &sub.filter) {
                            start_cursors(ctx, s, log_topic);
                        }
                    }
                    retained.push((sub.filter.clone(), granted));
                    let new = wire::Subscription { qos: granted, ..sub };
                    match exists {
                        Some(i) => s.subs[i] = new,
                        None => s.subs.push(new),
                    }
                    codes.push(granted);
                }
                if let Err(e) = save_session(ctx, s).await {
                    tracing::warn!(client = %s.client_id, error = %e, "subscriptions not stored");
                    codes.iter_mut().for_each(|c| *c = 0x80);
                }
                let _ = tx.send(send(wire::suback(v, pkid, &codes))).await;
                for (filter, qos) in retained {
                    send_retained(ctx, s, tx, &filter, qos).await?;
                }
            }
            In::Unsubscribe { pkid, filters } => {
                let codes: Vec<u8> = filters
                    .iter()
                    .map(|f| match s.subs.iter().position(|x| &x.filter == f) {
                        Some(i) => {
                            s.subs.remove(i);
                            0
                        }
                        None => match s.shared.iter().position(|(_, g)| &g.name == f) {
                            Some(i) => {
                                let (_, g) = s.shared.remove(i);
                                release_groups(ctx, vec![(0, g)]);
                                0
                            }
                            None => 0x11,
                        },
                    })
                    .collect();
                if let Err(e) = save_session(ctx, s).await {
                    tracing::warn!(client = %s.client_id, error = %e, "subscriptions not stored");
                }
                let _ = tx.send(send(wire::unsuback(v, pkid, &codes))).await;
            }
        }
    }
}

/// Whether some topic name could match both filters.
pub(super) fn filters_overlap(a: &str, b: &str) -> bool {
    // A leading wildcard never matches a `$` topic: `#` and `+/...` reach nothing of `$SYS/...`.
    let wild_first = |f: &str| f.starts_with('#') || f.starts_with('+');
    if (a.starts_with('$') && wild_first(b)) || (b.starts_with('$') && wild_first(a)) {
        return false;
    }
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (Some(p), Some(q)) if p == "+" || q == "+" || p == q => {}
            _ => return false,
        }
    }
}

fn start_cursors(ctx: &Ctx, s: &mut Session, log_topic: &str) {
    let Some(info) = ctx.store.topic(log_topic) else {
        // Not created yet: everything it will hold is new (picked up by `refresh_cursors`).
        return;
    };
    for p in 0..info.partitions as i32 {
        if let Ok(wm) = ctx.store.watermarks(log_topic, p) {
            s.cursors.entry((log_topic.to_string(), p)).or_insert(wm.high_watermark);
        }
    }
}

/// Cursors for partitions (and topics) that appeared after the subscription: from their start.
fn refresh_cursors(ctx: &Ctx, s: &mut Session) {
    for (route_filter, log_topic) in ctx.router.filters() {
        if !s.subs.iter().any(|sub| filters_overlap(route_filter, &sub.filter)) {
            continue;
        }
        if let Some(info) = ctx.store.topic(log_topic) {
            for p in 0..info.partitions as i32 {
                if let Ok(wm) = ctx.store.watermarks(log_topic, p) {
                    s.cursors.entry((log_topic.to_string(), p)).or_insert(wm.log_start_offset);
                }
            }
        }
    }
}

fn subscription_watches(ctx: &Ctx, s: &Session) -> Vec<crate::storage::PartitionWatch> {
    let mut keys: Vec<(String, i32)> = s.cursors.keys().cloned().collect();
    for (_, g) in &s.shared {
        keys.extend(g.partitions());
    }
    keys.iter().filter_map(|(t, p)| ctx.store.watch(t, *p).ok()).collect()
}

/// The shared group of a `$share/...` filter: the one in use, or the stored one (a persistent
/// member subscribed before a restart), or a new one starting at the current log ends.
fn shared_group(ctx: &Ctx, name: &str, inner: &str) -> Arc<SharedGroup> {
    let mut groups = ctx.shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(g) = groups.get(name) {
        return g.clone();
    }
    let stored = ctx.store.kv_get(KvSpace::MqttSessions, &shared_key(name)).ok().flatten();
    let cursors = stored.as_deref().and_then(decode_shared).unwrap_or_else(|| {
        let mut c = HashMap::new();
        for (route_filter, log_topic) in ctx.router.filters() {
            if !filters_overlap(route_filter, inner) {
                continue;
            }
            let Some(info) = ctx.store.topic(log_topic) else { continue };
            for p in 0..info.partitions as i32 {
                if let Ok(wm) = ctx.store.watermarks(log_topic, p) {
                    c.insert((log_topic.to_string(), p), wm.high_watermark);
                }
            }
        }
        c
    });
    let g = Arc::new(SharedGroup::new(name, inner, cursors));
    groups.insert(name.to_string(), g.clone());
    g
}

/// A session leaves these groups: a group no session uses any more leaves memory (its position
/// stays stored for persistent members that come back).
fn release_groups(ctx: &Ctx, groups: Vec<(u8, Arc<SharedGroup>)>) {
    let mut map = ctx.shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for (_, g) in groups {
        let name = g.name.clone();
        drop(g);
        if map.get(&name).is_some_and(|g| Arc::strong_count(g) == 1) {
            map.remove(&name);
        }
    }
}

/// The header `name` of a stored record, as text.
fn header<'a>(r: &'a StoredRecord, name: &str) -> Option<&'a str> {
    r.headers.iter().find(|(k, _)| k == name).and_then(|(_, v)| v.as_ref()).and_then(|v| std::str::from_utf8(v).ok())
}

/// The MQTT topic a stored record is delivered under (its `mqtt.topic` header, or the log topic
/// for records produced through Kafka) and the QoS it was published with.
fn mqtt_view(r: &StoredRecord, log_topic: &str) -> (String, u8) {
    let topic = header(r, HEADER_TOPIC).map_or_else(|| log_topic.to_string(), str::to_string);
    let qos = header(r, HEADER_QOS).and_then(|q| q.parse::<u8>().ok()).unwrap_or(1);
    (topic, qos)
}

fn expired(r: &StoredRecord) -> bool {
    header(r, HEADER_EXPIRES).and_then(|d| d.parse::<i64>().ok()).is_some_and(|d| d <= now_ms())
}

/// A persistent session's messages that were in flight when it was stored: a PUBREL again for
/// those the client has (QoS 2 after PUBREC), the message again (same packet id, DUP set) for the
/// others. Messages gone to retention meanwhile are counted and skipped.
async fn resume_inflight(
    ctx: &Ctx,
    s: &mut Session,
    tx: &mpsc::Sender<Pending>,
    stored: Vec<StoredInflight>,
) -> Result<(), String> {
    for m in stored {
        s.next_pkid = s.next_pkid.max(m.pkid.checked_add(1).unwrap_or(1));
        let bytes = if m.released {
            wire::ack(s.version, 6, m.pkid, 0)
        } else {
            let (t, p, off) = &m.position;
            let record =
                ctx.store.read_records(t, *p, *off, 1).ok().and_then(|rs| rs.into_iter().find(|r| r.offset == *off));
            let Some(r) = record else {
                tracing::warn!(client = %s.client_id, topic = %t, partition = p, offset = off,
                    "message in flight fell behind retention: skipped");
                ctx.stats.retention_skipped_messages.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let (topic, _) = mqtt_view(&r, t);
            if s.user.as_ref().is_some_and(|u| !u.may_subscribe(&s.client_id, &topic)) {
                // The session was stored under rules (or a user) that allowed more.
                continue;
            }
            let props = if s.version == Version::V5 { props_of(&r.headers) } else { PublishProps::default() };
            let payload = r.value.clone().unwrap_or_default();
            wire::publish(s.version, &topic, m.qos, false, true, m.pkid, &payload, &props)
        };
        s.inflight.insert(m.pkid, Inflight { qos: m.qos, released: m.released, source: Source::Log(m.position) });
        if tx.send(Box::pin(async move { Some(bytes) })).await.is_err() {
            return Err("writer closed".into());
        }
    }
    Ok(())
}

/// Sends subscribers what arrived since their cursors, within the in-flight window.
async fn deliver(ctx: &Ctx, s: &mut Session, tx: &mpsc::Sender<Pending>) -> Result<(), String> {
    let shared = s.shared.clone();
    for (granted, g) in shared {
        let budget = s.window.saturating_sub(s.inflight.len()).min(SHARED_BATCH);
        if budget == 0 {
            break;
        }
        let log_topics: Vec<&str> = ctx
            .router
            .filters()
            .into_iter()
            .filter(|(route_filter, _)| filters_overlap(route_filter, &g.filter))
            .map(|(_, t)| t)
            .collect();
        let taken = g.take(&ctx.store, &log_topics, budget, |log_topic, r| {
            topic::matches(&mqtt_view(r, log_topic).0, &g.filter) && !expired(r)
        });
        for (position, r) in taken {
            let (t, stored_qos) = mqtt_view(&r, &position.0);
            let qos = granted.min(stored_qos);
            let props = if s.version == Version::V5 { props_of(&r.headers) } else { PublishProps::default() };
            let payload = r.value.clone().unwrap_or_default();
            let source = Source::Shared(g.clone(), position.clone());
            let sent = send_message(ctx, s, tx, &t, qos, &payload, &props, source).await?;
            if sent && qos > 0 {
                s.dirty = s.persistent;
            } else {
                g.settle(&position);
            }
        }
    }
    if s.subs.is_empty() {
        return Ok(());
    }
    // Read again only once half the in-flight window is free, and only about what fits in it:
    // reading (and decoding) a large chunk to send one message per PUBACK costs a core.
    let free = s.window.saturating_sub(s.inflight.len());
    if free == 0 || (!s.inflight.is_empty() && free < s.window.div_ceil(2)) {
        return Ok(());
    }
    let read_bytes = (free * 1024).clamp(16 * 1024, 256 * 1024);
    refresh_cursors(ctx, s);
    let keys: Vec<(String, i32)> = s.cursors.keys().cloned().collect();
    for (log_topic, p) in keys {
        loop {
            if s.inflight.len() >= s.window {
                return Ok(());
            }
            let Some(&offset) = s.cursors.get(&(log_topic.clone(), p)) else { break };
            let wm = match ctx.store.watermarks(&log_topic, p) {
                Ok(wm) => wm,
                Err(_) => {
                    s.cursors.remove(&(log_topic.clone(), p));
                    break;
                }
            };
            if offset >= wm.high_watermark {
                break;
            }
            let from = if offset < wm.log_start_offset {
                tracing::warn!(client = %s.client_id, topic = %log_topic, partition = p, lost = wm.log_start_offset - offset,
                    "subscriber fell behind retention: messages skipped");
                ctx.stats
                    .retention_skipped_messages
                    .fetch_add((wm.log_start_offset - offset) as u64, Ordering::Relaxed);
                wm.log_start_offset
            } else {
                offset
            };
            let records = ctx.store.read_records(&log_topic, p, from, read_bytes).map_err(|e| e.to_string())?;
            let mut next = from;
            for r in records {
                if r.offset < from {
                    continue;
                }
                next = r.offset + 1;
                let (mqtt_topic, stored_qos) = mqtt_view(&r, &log_topic);
                let own = header(&r, HEADER_CLIENT) == Some(s.client_id.as_str());
                let Some(qos) = s
                    .subs
                    .iter()
                    .filter(|sub| topic::matches(&mqtt_topic, &sub.filter) && !(sub.no_local && own))
                    .map(|sub| sub.qos.min(stored_qos))
                    .max()
                else {
                    continue;
                };
                if expired(&r) {
                    ctx.stats.expired_messages.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let props = if s.version == Version::V5 { props_of(&r.headers) } else { PublishProps::default() };
                let payload = r.value.clone().unwrap_or_default();
                let source = Source::Log((log_topic.clone(), p, r.offset));
                if !send_message(ctx, s, tx, &mqtt_topic, qos, &payload, &props, source).await? {
                    continue;
                }
                if s.inflight.len() >= s.window {
                    break;
                }
            }
            if next == from {
                break;
            }
            s.cursors.insert((log_topic.clone(), p), next);
            s.dirty = s.persistent;
        }
    }
    Ok(())
}

/// Sends one message from the log to the client: a packet id and an in-flight entry (from
/// `source`) at QoS 1/2. MQTT 5: a message larger than the client's Maximum Packet Size is
/// dropped and counted. Returns whether it went out.
#[allow(clippy::too_many_arguments)]
async fn send_message(
    ctx: &Ctx,
    s: &mut Session,
    tx: &mpsc::Sender<Pending>,
    topic: &str,
    qos: u8,
    payload: &[u8],
    props: &PublishProps,
    source: Source,
) -> Result<bool, String> {
    let pkid = if qos > 0 { next_pkid(s) } else { 0 };
    let bytes = wire::publish(s.version, topic, qos, false, false, pkid, payload, props);
    if bytes.len() > s.max_packet_out {
        ctx.stats.oversized_messages.fetch_add(1, Ordering::Relaxed);
        return Ok(false);
    }
    if qos > 0 {
        s.inflight.insert(pkid, Inflight::new(qos, source));
    }
    ctx.stats.publishes_out.fetch_add(1, Ordering::Relaxed);
    if tx.send(Box::pin(async move { Some(bytes) })).await.is_err() {
        return Err("writer closed".into());
    }
    Ok(true)
}

fn next_pkid(s: &mut Session) -> u16 {
    loop {
        let id = s.next_pkid;
        s.next_pkid = s.next_pkid.checked_add(1).unwrap_or(1);
        if !s.inflight.contains_key(&id) {
            return id;
        }
    }
}

fn props_of(headers: &[(String, Option<Bytes>)]) -> PublishProps {
    let mut p = PublishProps::default();
    for (k, v) in headers {
        let text = || v.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
        match k.as_str() {
            HEADER_TOPIC | HEADER_QOS | HEADER_CLIENT => {}
            HEADER_EXPIRES => {
                let left = text().and_then(|t| t.parse::<i64>().ok()).map(|d| (d - now_ms()).max(0) / 1000);
                p.message_expiry_s = left.map(|l| l.min(i64::from(u32::MAX)) as u32);
            }
            HEADER_CONTENT_TYPE => p.content_type = text(),
            HEADER_CORRELATION_DATA => p.correlation_data = v.clone(),
            HEADER_RESPONSE_TOPIC => p.response_topic = text(),
            _ => p.user_properties.push((k.clone(), text().unwrap_or_default())),
        }
    }
    p
}

/// Retained messages matching a new subscription, sent with the retain flag.
async fn send_retained(
    ctx: &Ctx,
    s: &mut Session,
    tx: &mpsc::Sender<Pending>,
    filter: &str,
    granted: u8,
) -> Result<(), String> {
    let all = ctx.store.kv_scan(KvSpace::MqttRetained, b"", 100_000).map_err(|e| e.to_string())?;
    for (k, v) in all {
        let Ok(t) = std::str::from_utf8(&k) else { continue };
        if !topic::matches(t, filter) || v.is_empty() {
            continue;
        }
        let qos = v[0].min(granted);
        let pkid = if qos > 0 {
            let id = next_pkid(s);
            s.inflight.insert(id, Inflight::new(qos, Source::Retained));
            id
        } else {
            0
        };
        let bytes = wire::publish(s.version, t, qos, true, false, pkid, &v[1..], &PublishProps::default());
        if tx.send(Box::pin(async move { Some(bytes) })).await.is_err() {
            return Err("writer closed".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_overlap() {
        assert!(filters_overlap("#", "a/b"));
        assert!(filters_overlap("meters/+/reading", "meters/#"));
        assert!(filters_overlap("meters/+/reading", "+/7/+"));
        assert!(!filters_overlap("meters/+/reading", "sensors/#"));
        assert!(!filters_overlap("a/b", "a/b/c"));
        assert!(!filters_overlap("$SYS/#", "#") && !filters_overlap("+/broker/#", "$SYS/#"));
        assert!(filters_overlap("$SYS/#", "$SYS/broker/+"));
    }
}
