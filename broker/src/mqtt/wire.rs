//! MQTT packets on the wire, for both protocol versions: framing with the size checked on the
//! fixed header, decoding of CONNECT, PUBLISH, SUBSCRIBE and UNSUBSCRIBE with rumqttc's
//! `mqttbytes` codecs (v4 and v5) into one version-independent form, the small packets (acks,
//! PINGREQ, DISCONNECT) by hand (rumqttc's v5 codec refuses their short forms), and every
//! outgoing packet encoded by hand.

use bytes::{BufMut, Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::Semaphore;

use crate::storage::accounting::debit;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    V4,
    V5,
}

/// Why a packet could not be read; each maps to a CONNACK/DISCONNECT reason or a plain close.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("packet of {size} bytes exceeds mqtt.packet_bytes_max = {max}")]
    TooLarge { size: usize, max: usize },
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocol(u8),
    #[error("I/O error: {0}")]
    Io(String),
    #[error("mqtt.buffer_memory_bytes_max exhausted: no memory to read the packet")]
    BudgetExhausted,
}

/// Memory for packet bytes being read, shared by every connection (`mqtt.buffer_memory_bytes_max`):
/// a reader charges its buffer here before allocating it and gives it back when the packet has
/// been handled, so half-sent packets cannot hold more than this in total.
#[derive(Debug, Clone)]
pub(crate) struct ReadBudget {
    bytes: std::sync::Arc<Semaphore>,
    max: usize,
    /// How long a reader waits for budget before its connection is closed (no reader may hold
    /// part of the budget forever while waiting for more).
    wait: Duration,
}

impl ReadBudget {
    pub(crate) fn new(max: usize, wait: Duration) -> Self {
        Self { bytes: std::sync::Arc::new(Semaphore::new(max)), max, wait }
    }

    /// Bytes charged at the moment.
    pub(crate) fn in_use(&self) -> usize {
        // More available than the maximum: charges were given back twice (a bookkeeping bug).
        let free = self.bytes.available_permits() as u64;
        debit(self.max as u64, free, "mqtt.buffer_memory_bytes_max in use") as usize
    }

    /// A charge of `n` bytes if the budget has room now; never waits.
    pub(crate) fn try_charge(&self, n: usize) -> Option<Charge> {
        let n32 = u32::try_from(n).ok()?;
        let permit = self.bytes.clone().try_acquire_many_owned(n32).ok()?;
        permit.forget();
        Some(Charge { budget: self.bytes.clone(), n })
    }

    /// A charge of `n` bytes, waiting up to the budget's wait for room (then `BudgetExhausted`).
    /// Without a timer when the budget has room (the common case); the wait for room is boxed, so
    /// its timer and semaphore wait take no room in every connection's read future (a reader's
    /// future is part of each idle connection's).
    async fn charge(&self, n: usize) -> Result<Charge, WireError> {
        match self.try_charge(n) {
            Some(c) => Ok(c),
            None => Box::pin(self.charge_waiting(n)).await,
        }
    }

    /// [`ReadBudget::charge`] when the budget has no room now.
    async fn charge_waiting(&self, n: usize) -> Result<Charge, WireError> {
        let Ok(n32) = u32::try_from(n) else { return Err(WireError::BudgetExhausted) };
        match tokio::time::timeout(self.wait, self.bytes.clone().acquire_many_owned(n32)).await {
            Ok(Ok(permit)) => {
                permit.forget();
                Ok(Charge { budget: self.bytes.clone(), n })
            }
            _ => Err(WireError::BudgetExhausted),
        }
    }
}

/// Bytes charged to the [`ReadBudget`]; given back when dropped.
#[derive(Debug)]
pub(crate) struct Charge {
    budget: std::sync::Arc<Semaphore>,
    n: usize,
}

impl Charge {
    fn split_off(&mut self, n: usize) -> Charge {
        let n = n.min(self.n);
        self.n -= n;
        Charge { budget: self.budget.clone(), n }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if self.n > 0 {
            self.budget.add_permits(self.n);
        }
    }
}

/// One packet's bytes (fixed header included) and the budget they hold until dropped.
#[derive(Debug)]
pub(crate) struct Frame {
    pub bytes: BytesMut,
    pub charge: Charge,
}

/// What the bytes at the front of a buffer say about the next packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Header {
    /// More bytes are needed to read the fixed header.
    Incomplete,
    /// A fixed header of `header_len` bytes announcing `remaining` bytes.
    Complete { header_len: usize, remaining: usize },
}

/// Parses a fixed header, refusing a remaining length over `max` before anything is buffered.
pub(crate) fn parse_header(buf: &[u8], max: usize) -> Result<Header, WireError> {
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else { return Ok(Header::Incomplete) };
        len |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            if len > max {
                return Err(WireError::TooLarge { size: len, max });
            }
            return Ok(Header::Complete { header_len: 2 + i, remaining: len });
        }
    }
    Err(WireError::Malformed("remaining length longer than 4 bytes".into()))
}

/// Smallest buffer a reader allocates; it grows only with the bytes that actually arrived.
const READ_CHUNK_MIN: usize = 256;

/// Reads packets from a connection, buffering only what arrived: the announced remaining length
/// is never allocated up front (the buffer at most doubles the bytes received so far), every
/// buffer is charged to the shared [`ReadBudget`] before it is allocated, and `next` is
/// cancel-safe (all progress lives in the reader, so a `select!` may drop a read half-way).
#[derive(Debug)]
pub(crate) struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    /// The charge for `buf`'s capacity.
    charge: Option<Charge>,
    budget: ReadBudget,
    /// Bytes read beyond the current packet when the buffer must grow anyway (several small
    /// packets per read once logged in; none before login).
    read_ahead: usize,
    /// With a read-ahead, an idle connection holds no buffer: its next bytes are read here
    /// first, and the buffer is allocated once they came (`first_len` of them).
    first: [u8; READ_CHUNK_MIN],
    first_len: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(io: R, budget: ReadBudget) -> Self {
        Self { io, buf: BytesMut::new(), charge: None, budget, read_ahead: 0, first: [0; READ_CHUNK_MIN], first_len: 0 }
    }

    /// Lets reads fetch up to `n` bytes beyond the current packet (after login).
    pub(crate) fn set_read_ahead(&mut self, n: usize) {
        self.read_ahead = n;
    }

    /// The next packet; `accept_first` may refuse it on its first byte, before a length that
    /// garbage may claim is looked at.
    pub(crate) async fn next(&mut self, max: usize, accept_first: impl Fn(u8) -> bool) -> Result<Frame, WireError> {
        loop {
            if let Some(&first) = self.buf.first() {
                if !accept_first(first) {
                    return Err(WireError::Malformed(format!(
                        "unexpected first byte {first:#04x}: not an MQTT CONNECT"
                    )));
                }
            }
            let need = match parse_header(&self.buf, max)? {
                Header::Incomplete => 1,
                Header::Complete { header_len, remaining } => {
                    let total = header_len + remaining;
                    if self.buf.len() >= total {
                        // A packet that is all the buffer holds (a device's one packet per
                        // read) takes the buffer as it is: splitting would allocate a shared
                        // header for the two halves.
                        let bytes = if self.buf.len() == total {
                            std::mem::take(&mut self.buf)
                        } else {
                            self.buf.split_to(total)
                        };
                        // The packet takes the charge of the capacity it took from the buffer.
                        let charge = match self.charge.as_mut() {
                            Some(held) => held.split_off(bytes.capacity()),
                            None => Charge { budget: self.budget.bytes.clone(), n: 0 },
                        };
                        return Ok(Frame { bytes, charge });
                    }
                    total - self.buf.len()
                }
            };
            self.fill(need).await?;
        }
    }

    /// Reads at least one byte, growing the buffer first if it is full: by what the packet still
    /// needs (and the read-ahead), but at most by the bytes already buffered (and at least
    /// `READ_CHUNK_MIN`), so the buffer never exceeds twice what arrived plus a small chunk.
    async fn fill(&mut self, need: usize) -> Result<(), WireError> {
        if self.buf.is_empty() && self.read_ahead > 0 {
            // Between packets, logged in: wait without a buffer (an idle connection then costs
            // `first`, not a read-ahead chunk), then take a chunk for what came and what follows.
            if self.first_len == 0 {
                self.buf = BytesMut::new();
                self.charge = None;
                // Cancel-safe: a read that completes leaves its bytes in `first`.
                self.first_len = match self.io.read(&mut self.first).await {
                    Ok(0) => return Err(WireError::Closed),
                    Ok(n) => n,
                    Err(e) => return Err(WireError::Io(e.to_string())),
                };
            }
            // A read that did not fill `first` took all there was: the packet (or packets) and
            // no more, as a device sending now and then does. Then the buffer is just that
            // (a small allocation, freed with the packet); a read-ahead chunk only when more
            // is coming.
            let cap =
                if self.first_len < self.first.len() { self.first_len } else { self.read_ahead.max(self.first_len) };
            let charge = self.budget.charge(cap).await?;
            let mut chunk = BytesMut::with_capacity(cap);
            chunk.extend_from_slice(&self.first[..self.first_len]);
            self.first_len = 0;
            self.buf = chunk;
            self.charge = Some(charge);
            return Ok(());
        }
        if self.buf.capacity() == self.buf.len() {
            let len = self.buf.len();
            let grow = need.max(self.read_ahead).max(READ_CHUNK_MIN).min(len.max(READ_CHUNK_MIN).max(self.read_ahead));
            let charge = self.budget.charge(len + grow).await?;
            let mut bigger = BytesMut::with_capacity(len + grow);
            bigger.extend_from_slice(&self.buf);
            self.buf = bigger;
            // The old allocation is freed unless a packet still shares it (that packet holds its
            // own charge): its charge goes back as the new one takes its place.
            self.charge = Some(charge);
        }
        match self.io.read_buf(&mut self.buf).await {
            Ok(0) if self.buf.is_empty() => Err(WireError::Closed),
            Ok(0) => Err(WireError::Malformed("truncated packet".into())),
            Ok(_) => Ok(()),
            Err(e) => Err(WireError::Io(e.to_string())),
        }
    }
}

/// Reads just enough of a first packet to know its protocol level (at most 12 bytes, nothing
/// buffered beyond them): for refusing a connection over `mqtt.connections_max` in its version.
pub(crate) async fn read_connect_level(r: &mut (impl AsyncRead + Unpin)) -> Result<u8, WireError> {
    let mut head = [0u8; 12];
    let mut n = 0;
    loop {
        if let Some(level) = connect_level_prefix(&head[..n])? {
            return Ok(level);
        }
        if n == head.len() {
            return Err(WireError::Malformed("not an MQTT CONNECT".into()));
        }
        match r.read(&mut head[n..n + 1]).await {
            Ok(0) => return Err(WireError::Closed),
            Ok(k) => n += k,
            Err(e) => return Err(WireError::Io(e.to_string())),
        }
    }
}

/// The protocol level from the first bytes of a CONNECT (`None`: more bytes needed).
pub(crate) fn connect_level_prefix(b: &[u8]) -> Result<Option<u8>, WireError> {
    if let Some(&first) = b.first() {
        if first != 0x10 {
            return Err(WireError::Malformed("the first packet must be CONNECT".into()));
        }
    }
    let Header::Complete { header_len, .. } = parse_header(b, usize::MAX)? else { return Ok(None) };
    let body = &b[header_len..];
    const NAME: &[u8] = &[0, 4, b'M', b'Q', b'T', b'T'];
    const NAME_31: &[u8] = &[0, 6, b'M', b'Q', b'I', b's'];
    let known = body.len().min(6);
    if NAME[..known] != body[..known] && NAME_31[..known] != body[..known] {
        return Err(WireError::Malformed("not an MQTT CONNECT".into()));
    }
    if body.len() >= 6 && body[..6] == *NAME_31 {
        return Ok(Some(3));
    }
    Ok(body.get(6).copied())
}

fn body(frame: &[u8]) -> &[u8] {
    let mut i = 1;
    while i < frame.len() && frame[i] & 0x80 != 0 {
        i += 1;
    }
    &frame[(i + 1).min(frame.len())..]
}

/// The protocol level a CONNECT asks for (4 = 3.1.1, 5 = 5.0), read before choosing a codec.
pub(crate) fn connect_level(frame: &[u8]) -> Result<u8, WireError> {
    if frame.first().map(|b| b >> 4) != Some(1) {
        return Err(WireError::Malformed("the first packet must be CONNECT".into()));
    }
    let b = body(frame);
    match b.get(..6) {
        Some([0, 4, b'M', b'Q', b'T', b'T']) => {
            b.get(6).copied().ok_or_else(|| WireError::Malformed("short CONNECT".into()))
        }
        Some([0, 6, b'M', b'Q', b'I', b's']) => Err(WireError::UnsupportedProtocol(3)),
        _ => Err(WireError::Malformed("not an MQTT CONNECT".into())),
    }
}

/// A will message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub delay_s: u32,
    /// MQTT 5 will properties, published with it ([MQTT-3.1.3-10]).
    pub props: PublishProps,
}

/// MQTT 5 publish properties kept with a message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PublishProps {
    pub content_type: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub response_topic: Option<String>,
    pub user_properties: Vec<(String, String)>,
    pub message_expiry_s: Option<u32>,
    pub topic_alias: Option<u16>,
    /// Payload Format Indicator (1 = UTF-8), forwarded unaltered ([MQTT-3.3.2-4]).
    pub payload_format: Option<u8>,
    /// Outbound only: the identifiers of the subscriptions a message is delivered for.
    pub subscription_ids: Vec<u32>,
}

impl PublishProps {
    /// Bytes its strings and data take (for memory limits).
    pub fn bytes(&self) -> usize {
        let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        opt(&self.content_type)
            + opt(&self.response_topic)
            + self.correlation_data.as_ref().map_or(0, Bytes::len)
            + self.user_properties.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
    }
}

/// The largest Subscription Identifier (a Variable Byte Integer, 3.8.2.1.2).
pub(crate) const SUBSCRIPTION_ID_MAX: u32 = 268_435_455;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Subscription {
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    /// MQTT 5 Retain As Published: forwarded messages keep their RETAIN flag
    /// ([MQTT-3.3.1-12/13]).
    pub retain_as_published: bool,
    /// MQTT 5 Retain Handling: 0 send retained messages on subscribe, 1 only for a new
    /// subscription, 2 never ([MQTT-3.3.1-9/10/11]).
    pub retain_handling: u8,
    /// MQTT 5 Subscription Identifier (1 to 268,435,455; 0 = none), put on the messages the
    /// subscription delivers (3.3.4).
    pub id: u32,
}

/// An incoming packet, whatever the version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum In {
    Connect {
        client_id: String,
        clean: bool,
        keep_alive: u16,
        username: Option<String>,
        password: Option<String>,
        will: Option<Will>,
        session_expiry_s: u32,
        receive_max: u16,
        max_packet: Option<u32>,
        /// The client's Topic Alias Maximum (MQTT 5): aliases the server may use towards it.
        topic_alias_max: u16,
    },
    Publish {
        topic: Bytes,
        qos: u8,
        retain: bool,
        dup: bool,
        pkid: u16,
        payload: Bytes,
        props: PublishProps,
    },
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        pkid: u16,
        subs: Vec<Subscription>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    /// With the v5 reason code (0 = normal; 4 = disconnect with will message) and the v5
    /// Session Expiry Interval, if the client set one (3.14.2.2.2).
    Disconnect {
        reason: u8,
        session_expiry_s: Option<u32>,
    },
}

fn malformed(e: impl std::fmt::Debug) -> WireError {
    WireError::Malformed(format!("{e:?}"))
}

fn qos4(q: rumqttc::mqttbytes::QoS) -> u8 {
    q as u8
}

fn qos5(q: rumqttc::v5::mqttbytes::QoS) -> u8 {
    q as u8
}

/// Decodes one frame.
pub(crate) fn decode(version: Version, frame: BytesMut, max: usize) -> Result<In, WireError> {
    let kind = frame.first().map(|b| b >> 4).unwrap_or(0);
    let b = body(&frame);
    let pkid = || -> Result<u16, WireError> {
        b.get(..2)
            .map(|p| u16::from_be_bytes([p[0], p[1]]))
            .ok_or_else(|| WireError::Malformed("missing packet id".into()))
    };
    match kind {
        4 => return Ok(In::PubAck(pkid()?)),
        5 => return Ok(In::PubRec(pkid()?)),
        6 => return Ok(In::PubRel(pkid()?)),
        7 => return Ok(In::PubComp(pkid()?)),
        12 => return Ok(In::PingReq),
        14 if version == Version::V5 => return disconnect_v5(b),
        14 => return Ok(In::Disconnect { reason: 0, session_expiry_s: None }),
        _ => {}
    }
    let mut frame = frame;
    let packet = match version {
        Version::V4 => match v4::Packet::read(&mut frame, max).map_err(malformed)? {
            v4::Packet::Connect(c) => {
                text(&c.client_id)?;
                if let Some(l) = &c.login {
                    text(&l.username)?;
                }
                if let Some(w) = &c.last_will {
                    text(&w.topic)?;
                }
                In::Connect {
                    client_id: c.client_id,
                    clean: c.clean_session,
                    keep_alive: c.keep_alive,
                    username: c.login.as_ref().map(|l| l.username.clone()),
                    password: c.login.map(|l| l.password).filter(|p| !p.is_empty()),
                    will: c.last_will.map(|w| Will {
                        topic: w.topic,
                        payload: w.message,
                        qos: qos4(w.qos),
                        retain: w.retain,
                        delay_s: 0,
                        props: PublishProps::default(),
                    }),
                    session_expiry_s: if c.clean_session { 0 } else { u32::MAX },
                    receive_max: u16::MAX,
                    max_packet: None,
                    topic_alias_max: 0,
                }
            }
            v4::Packet::Publish(p) => {
                text(&p.topic)?;
                In::Publish {
                    topic: Bytes::from(p.topic.into_bytes()),
                    qos: qos4(p.qos),
                    retain: p.retain,
                    dup: p.dup,
                    pkid: p.pkid,
                    payload: p.payload,
                    props: PublishProps::default(),
                }
            }
            v4::Packet::Subscribe(s) => {
                s.filters.iter().try_for_each(|f| text(&f.path))?;
                In::Subscribe {
                    pkid: s.pkid,
                    subs: s
                        .filters
                        .into_iter()
                        .map(|f| Subscription { filter: f.path, qos: qos4(f.qos), ..Subscription::default() })
                        .collect(),
                }
            }
            v4::Packet::Unsubscribe(u) => {
                u.topics.iter().try_for_each(|t| text(t))?;
                In::Unsubscribe { pkid: u.pkid, filters: u.topics }
            }
            other => return Err(WireError::Malformed(format!("unexpected packet from a client: {other:?}"))),
        },
        Version::V5 => match v5::Packet::read(&mut frame, Some(max as u32)).map_err(malformed)? {
            v5::Packet::Connect(c, will, login) => {
                text(&c.client_id)?;
                if let Some(l) = &login {
                    text(&l.username)?;
                }
                let p = c.properties.unwrap_or_default();
                pairs(&p.user_properties)?;
                p.authentication_method.as_deref().map_or(Ok(()), text)?;
                let will = match will {
                    Some(w) => {
                        let topic = std::str::from_utf8(&w.topic)
                            .map_err(|_| WireError::Malformed("will topic is not UTF-8".into()))?;
                        text(topic)?;
                        if let Some(wp) = &w.properties {
                            wp.content_type.as_deref().map_or(Ok(()), text)?;
                            wp.response_topic.as_deref().map_or(Ok(()), text)?;
                            pairs(&wp.user_properties)?;
                        }
                        let (delay_s, props) = match w.properties {
                            Some(wp) => (
                                wp.delay_interval.unwrap_or(0),
                                PublishProps {
                                    content_type: wp.content_type,
                                    correlation_data: wp.correlation_data,
                                    response_topic: wp.response_topic,
                                    user_properties: wp.user_properties,
                                    message_expiry_s: wp.message_expiry_interval,
                                    payload_format: wp.payload_format_indicator,
                                    ..PublishProps::default()
                                },
                            ),
                            None => (0, PublishProps::default()),
                        };
                        Some(Will {
                            topic: topic.to_string(),
                            payload: w.message,
                            qos: qos5(w.qos),
                            retain: w.retain,
                            delay_s,
                            props,
                        })
                    }
                    None => None,
                };
                In::Connect {
                    client_id: c.client_id,
                    clean: c.clean_start,
                    keep_alive: c.keep_alive,
                    username: login.as_ref().map(|l| l.username.clone()),
                    password: login.map(|l| l.password).filter(|p| !p.is_empty()),
                    will,
                    session_expiry_s: p.session_expiry_interval.unwrap_or(0),
                    receive_max: p.receive_maximum.unwrap_or(u16::MAX),
                    max_packet: p.max_packet_size,
                    topic_alias_max: p.topic_alias_max.unwrap_or(0),
                }
            }
            v5::Packet::Publish(p) => {
                // The topic is checked as UTF-8 by the session (an alias may leave it empty).
                if p.topic.contains(&0) {
                    return Err(nul());
                }
                let props = match p.properties {
                    Some(pp) => {
                        pp.content_type.as_deref().map_or(Ok(()), text)?;
                        pp.response_topic.as_deref().map_or(Ok(()), text)?;
                        pairs(&pp.user_properties)?;
                        // [MQTT-3.3.4-6]: a client's PUBLISH carries no Subscription Identifier.
                        if !pp.subscription_identifiers.is_empty() {
                            return Err(WireError::Malformed("a subscription identifier from a client".into()));
                        }
                        PublishProps {
                            content_type: pp.content_type,
                            correlation_data: pp.correlation_data,
                            response_topic: pp.response_topic,
                            user_properties: pp.user_properties,
                            message_expiry_s: pp.message_expiry_interval,
                            topic_alias: pp.topic_alias,
                            payload_format: pp.payload_format_indicator,
                            subscription_ids: Vec::new(),
                        }
                    }
                    None => PublishProps::default(),
                };
                In::Publish {
                    topic: p.topic,
                    qos: qos5(p.qos),
                    retain: p.retain,
                    dup: p.dup,
                    pkid: p.pkid,
                    payload: p.payload,
                    props,
                }
            }
            v5::Packet::Subscribe(s) => {
                s.filters.iter().try_for_each(|f| text(&f.path))?;
                if let Some(p) = &s.properties {
                    pairs(&p.user_properties)?;
                }
                // 3.8.2.1.2: 1 to 268,435,455; 0 is a protocol error.
                let id = match s.properties.as_ref().and_then(|p| p.id) {
                    Some(0) => return Err(WireError::Malformed("subscription identifier 0".into())),
                    Some(id) => u32::try_from(id)
                        .ok()
                        .filter(|&id| id <= SUBSCRIPTION_ID_MAX)
                        .ok_or_else(|| WireError::Malformed(format!("subscription identifier {id}")))?,
                    None => 0,
                };
                In::Subscribe {
                    pkid: s.pkid,
                    subs: s
                        .filters
                        .into_iter()
                        .map(|f| Subscription {
                            filter: f.path,
                            qos: qos5(f.qos),
                            no_local: f.nolocal,
                            retain_as_published: f.preserve_retain,
                            retain_handling: match f.retain_forward_rule {
                                v5::RetainForwardRule::OnEverySubscribe => 0,
                                v5::RetainForwardRule::OnNewSubscribe => 1,
                                v5::RetainForwardRule::Never => 2,
                            },
                            id,
                        })
                        .collect(),
                }
            }
            v5::Packet::Unsubscribe(u) => {
                u.filters.iter().try_for_each(|t| text(t))?;
                if let Some(p) = &u.properties {
                    pairs(&p.user_properties)?;
                }
                In::Unsubscribe { pkid: u.pkid, filters: u.filters }
            }
            other => return Err(WireError::Malformed(format!("unexpected packet from a client: {other:?}"))),
        },
    };
    Ok(packet)
}

/// A v5 DISCONNECT's body: the reason code (absent = 0) and the properties (3.14.2.2), of which
/// the Session Expiry Interval is kept; the others (reason string, user properties, server
/// reference) are checked for their shape only.
fn disconnect_v5(b: &[u8]) -> Result<In, WireError> {
    let bad = |what: &str| WireError::Malformed(format!("DISCONNECT: {what}"));
    let Some((&reason, rest)) = b.split_first() else {
        return Ok(In::Disconnect { reason: 0, session_expiry_s: None });
    };
    let (len, used) = match rest.first() {
        None => (0, 0),
        Some(_) => {
            let mut len = 0usize;
            let mut used = 0;
            loop {
                let byte = *rest.get(used).ok_or_else(|| bad("property length"))?;
                len |= usize::from(byte & 0x7f) << (7 * used);
                used += 1;
                if byte & 0x80 == 0 {
                    break;
                }
                if used == 4 {
                    return Err(bad("property length"));
                }
            }
            (len, used)
        }
    };
    let mut props = rest.get(used..used + len).ok_or_else(|| bad("properties"))?;
    let mut session_expiry_s = None;
    let string = |p: &[u8]| -> Result<usize, WireError> {
        let n = p.get(..2).map(|l| usize::from(u16::from_be_bytes([l[0], l[1]]))).ok_or_else(|| bad("string"))?;
        let s = p.get(2..2 + n).ok_or_else(|| bad("string"))?;
        text(std::str::from_utf8(s).map_err(|_| bad("string not UTF-8"))?)?;
        Ok(2 + n)
    };
    while let Some((&id, rest)) = props.split_first() {
        let used = match id {
            0x11 if session_expiry_s.is_none() => {
                let v = rest.get(..4).ok_or_else(|| bad("session expiry"))?;
                session_expiry_s = Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
                4
            }
            0x1F | 0x1C => string(rest)?,
            0x26 => {
                let k = string(rest)?;
                k + string(&rest[k..])?
            }
            other => return Err(bad(&format!("property {other:#04x}"))),
        };
        props = &rest[used..];
    }
    Ok(In::Disconnect { reason, session_expiry_s })
}

fn nul() -> WireError {
    WireError::Malformed("a UTF-8 string contains U+0000 (MQTT 3.1.1 1.5.3, 5.0 1.5.4)".into())
}

/// A UTF-8 Encoded String must not contain U+0000 ([MQTT-1.5.3-2] in 3.1.1, [MQTT-1.5.4-2] in
/// 5.0): such a packet is malformed. This also keeps every key built from a client string free
/// of the byte the stored keys' old encoding used as a separator.
fn text(s: &str) -> Result<(), WireError> {
    if s.contains('\0') {
        Err(nul())
    } else {
        Ok(())
    }
}

/// MQTT 5 user properties (UTF-8 string pairs).
fn pairs(p: &[(String, String)]) -> Result<(), WireError> {
    p.iter().try_for_each(|(k, v)| text(k).and_then(|()| text(v)))
}

// ---- outgoing ----

fn put_len(out: &mut BytesMut, mut len: usize) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if len == 0 {
            break;
        }
    }
}

fn put_str(out: &mut BytesMut, s: &[u8]) {
    out.put_u16(s.len() as u16);
    out.put_slice(s);
}

fn frame(first: u8, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + body.len());
    out.put_u8(first);
    put_len(&mut out, body.len());
    out.put_slice(body);
    out.freeze()
}

/// CONNACK. `code` is the v5 reason code; v4 gets the 3.1.1 return code it maps to.
pub(crate) fn connack(version: Version, session_present: bool, code: u8, props: &ConnAckProps) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(u8::from(session_present && code == 0));
    match version {
        Version::V4 => {
            b.put_u8(match code {
                0 => 0,
                0x84 => 1,
                0x85 => 2,
                0x88 | 0x89 | 0x9F | 0x97 => 3,
                0x86 => 4,
                0x87 => 5,
                _ => 3,
            });
        }
        Version::V5 => {
            b.put_u8(code);
            let mut p = BytesMut::new();
            // A refusal carries no session limits: a Receive Maximum or Maximum Packet Size of 0
            // is a protocol error for the client (mosquitto reports that instead of the reason).
            if code == 0 {
                p.put_u8(0x21); // receive maximum
                p.put_u16(props.receive_max);
                p.put_u8(0x27); // maximum packet size
                p.put_u32(props.max_packet);
                p.put_u8(0x22); // topic alias maximum
                p.put_u16(props.topic_alias_max);
                p.put_u8(0x2A); // shared subscriptions available
                p.put_u8(1);
                p.put_u8(0x29); // subscription identifiers available
                p.put_u8(1);
            }
            if code == 0 && props.server_keep_alive > 0 {
                p.put_u8(0x13); // server keep alive
                p.put_u16(props.server_keep_alive);
            }
            if let Some(id) = &props.assigned_client_id {
                p.put_u8(0x12);
                put_str(&mut p, id.as_bytes());
            }
            if let Some(r) = &props.reason {
                p.put_u8(0x1F);
                put_str(&mut p, r.as_bytes());
            }
            put_len(&mut b, p.len());
            b.put_slice(&p);
        }
    }
    frame(0x20, &b)
}

#[derive(Debug, Clone, Default)]
pub(crate) struct ConnAckProps {
    pub receive_max: u16,
    pub max_packet: u32,
    pub topic_alias_max: u16,
    /// Server Keep Alive (0 = not sent: the client's keep-alive stands).
    pub server_keep_alive: u16,
    pub assigned_client_id: Option<String>,
    pub reason: Option<String>,
}

/// Packet types of the acknowledgements, for [`ack`].
pub(crate) const PUBACK: u8 = 4;
pub(crate) const PUBREC: u8 = 5;
pub(crate) const PUBREL: u8 = 6;
pub(crate) const PUBCOMP: u8 = 7;

/// PUBACK (4), PUBREC (5), PUBREL (6, flags 2) and PUBCOMP (7) with an optional v5 reason
/// (one allocation of its size: one is sent per QoS 1 publish).
pub(crate) fn ack(version: Version, kind: u8, pkid: u16, reason: u8) -> Bytes {
    let first = (kind << 4) | if kind == 6 { 0x02 } else { 0 };
    let [hi, lo] = pkid.to_be_bytes();
    if version == Version::V5 && reason != 0 {
        Bytes::copy_from_slice(&[first, 4, hi, lo, reason, 0])
    } else {
        Bytes::copy_from_slice(&[first, 2, hi, lo])
    }
}

pub(crate) fn suback(version: Version, pkid: u16, codes: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u16(pkid);
    if version == Version::V5 {
        b.put_u8(0);
    }
    for c in codes {
        b.put_u8(match (version, *c) {
            (Version::V4, c) if c >= 0x80 => 0x80,
            (_, c) => c,
        });
    }
    frame(0x90, &b)
}

pub(crate) fn unsuback(version: Version, pkid: u16, codes: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u16(pkid);
    if version == Version::V5 {
        b.put_u8(0);
        b.put_slice(codes);
    }
    frame(0xB0, &b)
}

pub(crate) fn pingresp() -> Bytes {
    frame(0xD0, &[])
}

/// DISCONNECT from the server: only MQTT 5 has one (3.1.1 closes the connection).
pub(crate) fn disconnect(reason: u8) -> Bytes {
    frame(0xE0, &[reason, 0])
}

/// An outgoing PUBLISH.
#[allow(clippy::too_many_arguments)]
pub(crate) fn publish(
    version: Version,
    topic: &str,
    qos: u8,
    retain: bool,
    dup: bool,
    pkid: u16,
    payload: &[u8],
    props: &PublishProps,
) -> Bytes {
    // One allocation of the packet's size: its properties' length is known before they are
    // written (one PUBLISH per delivered message).
    let props_len = (version == Version::V5).then(|| publish_props_len(props));
    let body_len =
        2 + topic.len() + if qos > 0 { 2 } else { 0 } + props_len.map_or(0, |n| var_int_len(n) + n) + payload.len();
    let total = 1 + var_int_len(body_len) + body_len;
    let mut b = BytesMut::with_capacity(total);
    b.put_u8(0x30 | (u8::from(dup) << 3) | (qos << 1) | u8::from(retain));
    put_len(&mut b, body_len);
    put_str(&mut b, topic.as_bytes());
    if qos > 0 {
        b.put_u16(pkid);
    }
    if let Some(n) = props_len {
        put_len(&mut b, n);
        let p = &mut b;
        if let Some(format) = props.payload_format {
            p.put_u8(0x01);
            p.put_u8(format);
        }
        if let Some(expiry) = props.message_expiry_s {
            p.put_u8(0x02);
            p.put_u32(expiry);
        }
        if let Some(ct) = &props.content_type {
            p.put_u8(0x03);
            put_str(p, ct.as_bytes());
        }
        if let Some(rt) = &props.response_topic {
            p.put_u8(0x08);
            put_str(p, rt.as_bytes());
        }
        if let Some(cd) = &props.correlation_data {
            p.put_u8(0x09);
            put_str(p, cd);
        }
        for (k, v) in &props.user_properties {
            p.put_u8(0x26);
            put_str(p, k.as_bytes());
            put_str(p, v.as_bytes());
        }
        if let Some(alias) = props.topic_alias {
            p.put_u8(0x23);
            p.put_u16(alias);
        }
        for &id in &props.subscription_ids {
            p.put_u8(0x0B);
            put_len(p, id as usize);
        }
    }
    b.put_slice(payload);
    debug_assert_eq!(b.len(), total, "a PUBLISH is written into its exact size");
    b.freeze()
}

/// Bytes of a Variable Byte Integer.
fn var_int_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Bytes of a v5 PUBLISH's properties as [`publish`] writes them (without their length).
fn publish_props_len(props: &PublishProps) -> usize {
    let string = |s: usize| 1 + 2 + s;
    props.payload_format.map_or(0, |_| 2)
        + props.message_expiry_s.map_or(0, |_| 5)
        + props.content_type.as_ref().map_or(0, |s| string(s.len()))
        + props.response_topic.as_ref().map_or(0, |s| string(s.len()))
        + props.correlation_data.as_ref().map_or(0, |d| string(d.len()))
        + props.user_properties.iter().map(|(k, v)| 1 + 2 + k.len() + 2 + v.len()).sum::<usize>()
        + props.topic_alias.map_or(0, |_| 3)
        + props.subscription_ids.iter().map(|&id| 1 + var_int_len(id as usize)).sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscription_identifiers_and_the_payload_format_go_out_mqtt_3_3_2_4_and_3_3_4_3() {
        let p = PublishProps { payload_format: Some(1), subscription_ids: vec![7, 300_000], ..Default::default() };
        let mut b = BytesMut::from(&publish(Version::V5, "a/b", 1, true, false, 7, b"hi", &p)[..]);
        match v5::Packet::read(&mut b, None).expect("v5 publish") {
            v5::Packet::Publish(p) => {
                let props = p.properties.expect("properties");
                assert_eq!(props.payload_format_indicator, Some(1));
                assert_eq!(props.subscription_identifiers, vec![7, 300_000]);
                assert!(p.retain);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn outgoing_packets_decode_with_the_reference_codec() {
        let p = PublishProps { content_type: Some("text/plain".into()), ..Default::default() };
        let mut b = BytesMut::from(&publish(Version::V5, "a/b", 1, false, false, 7, b"hi", &p)[..]);
        match v5::Packet::read(&mut b, None).expect("v5 publish") {
            v5::Packet::Publish(p) => {
                assert_eq!((&p.topic[..], p.pkid, &p.payload[..]), (&b"a/b"[..], 7, &b"hi"[..]));
                assert_eq!(p.properties.and_then(|p| p.content_type).as_deref(), Some("text/plain"));
            }
            other => panic!("{other:?}"),
        }
        let mut b = BytesMut::from(&publish(Version::V4, "a/b", 0, true, false, 0, b"hi", &p)[..]);
        assert!(
            matches!(v4::Packet::read(&mut b, 1024).expect("v4"), v4::Packet::Publish(p) if p.retain && p.topic == "a/b")
        );
        let props = ConnAckProps { receive_max: 10, max_packet: 1000, topic_alias_max: 5, ..Default::default() };
        let mut b = BytesMut::from(&connack(Version::V5, false, 0, &props)[..]);
        assert!(matches!(v5::Packet::read(&mut b, None).expect("connack"), v5::Packet::ConnAck(_)));
        let mut b = BytesMut::from(&connack(Version::V5, false, 0x86, &ConnAckProps::default())[..]);
        match v5::Packet::read(&mut b, None).expect("refusal") {
            v5::Packet::ConnAck(c) => {
                assert_eq!(c.code, v5::ConnectReturnCode::BadUserNamePassword);
                assert!(c.properties.is_none_or(|p| p.receive_max.is_none() && p.max_packet_size.is_none()));
            }
            other => panic!("{other:?}"),
        }
        let mut b = BytesMut::from(&suback(Version::V4, 3, &[1, 0x80])[..]);
        assert!(matches!(v4::Packet::read(&mut b, 1024).expect("suback"), v4::Packet::SubAck(s) if s.pkid == 3));
    }

    fn connect_v4(id: &str) -> BytesMut {
        let mut b = BytesMut::new();
        v4::Connect::new(id).write(&mut b).expect("write");
        b
    }

    /// The budget's use is checked accounting: more bytes given back than were charged (a
    /// `Charge` dropped twice, or one made up) is a bookkeeping bug, and a debug build stops at
    /// it instead of reporting 0 in use (saturating) and letting the budget grow.
    #[test]
    #[should_panic(expected = "goes below zero")]
    fn a_read_budget_given_back_more_than_it_lent_stops_a_debug_build() {
        let budget = ReadBudget::new(1024, Duration::from_millis(50));
        let charge = budget.try_charge(100).expect("room");
        assert_eq!(budget.in_use(), 100);
        drop(charge);
        drop(Charge { budget: budget.bytes.clone(), n: 10 }); // the bug: given back, never charged
        budget.in_use();
    }

    #[tokio::test]
    async fn a_packet_is_buffered_as_it_arrives_not_as_announced() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::AsyncWriteExt;
        let budget = ReadBudget::new(4 << 20, Duration::from_millis(50));
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut rd = FrameReader::new(server, budget.clone());
        // A CONNECT announcing 1 MiB, of which 10 bytes arrive.
        client.write_all(&[0x10, 0x80, 0x80, 0x40]).await.expect("send");
        client.write_all(&[0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60]).await.expect("send");
        let pending = tokio::time::timeout(Duration::from_millis(50), rd.next(2 << 20, |b| b == 0x10)).await;
        assert!(pending.is_err(), "incomplete");
        assert!(budget.in_use() <= READ_CHUNK_MIN, "charged {} for 14 bytes", budget.in_use());
        // The rest arrives in pieces: the buffer grows with it, never beyond twice what arrived
        // (three times while a buffer is copied into its larger successor).
        let sent = std::sync::Arc::new(AtomicUsize::new(14));
        let counter = sent.clone();
        let writer = tokio::spawn(async move {
            let chunk = vec![0u8; 4096];
            let total = (1 << 20) + 4;
            while counter.load(Ordering::SeqCst) < total {
                let n = chunk.len().min(total - counter.load(Ordering::SeqCst));
                counter.fetch_add(n, Ordering::SeqCst);
                client.write_all(&chunk[..n]).await.expect("send");
                tokio::task::yield_now().await;
            }
            client
        });
        let mut next = Box::pin(rd.next(2 << 20, |b| b == 0x10));
        let frame = loop {
            tokio::select! {
                f = &mut next => break f.expect("whole packet"),
                () = tokio::time::sleep(Duration::from_millis(1)) => {
                    let arrived = sent.load(Ordering::SeqCst);
                    assert!(budget.in_use() <= 3 * arrived + 2 * READ_CHUNK_MIN, "{} charged for {arrived} bytes", budget.in_use());
                }
            }
        };
        drop(next);
        let _client = writer.await.expect("writer");
        assert_eq!(frame.bytes.len(), (1 << 20) + 4);
        assert!(budget.in_use() >= frame.bytes.len(), "the packet holds its charge");
        drop(frame);
        assert!(budget.in_use() < 2 * READ_CHUNK_MIN, "given back with the packet: {}", budget.in_use());
    }

    #[tokio::test]
    async fn an_idle_logged_in_reader_holds_no_buffer() {
        use tokio::io::AsyncWriteExt;
        let budget = ReadBudget::new(1 << 20, Duration::from_millis(50));
        let (mut client, server) = tokio::io::duplex(1024);
        let mut rd = FrameReader::new(server, budget.clone());
        rd.set_read_ahead(4096);
        for round in 0..3 {
            client.write_all(&[0xC0, 0]).await.expect("send");
            let f = rd.next(1024, |_| true).await.expect("PINGREQ");
            assert_eq!(&f.bytes[..], &[0xC0, 0]);
            // It came alone: its buffer is its 2 bytes, not a read-ahead chunk.
            assert_eq!(budget.in_use(), 2, "round {round}: a lone packet is charged {}", budget.in_use());
            drop(f);
            // Waiting with nothing buffered: the read-ahead chunk is not held (nor charged).
            assert!(tokio::time::timeout(Duration::from_millis(20), rd.next(1024, |_| true)).await.is_err());
            assert_eq!(budget.in_use(), 0, "round {round}: an idle reader holds {} bytes", budget.in_use());
        }
    }

    #[tokio::test]
    async fn reads_resume_after_a_cancelled_read_and_split_pipelined_packets() {
        let budget = ReadBudget::new(1 << 20, Duration::from_millis(50));
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut rd = FrameReader::new(server, budget.clone());
        rd.set_read_ahead(4096);
        use tokio::io::AsyncWriteExt;
        let c = connect_v4("abc");
        client.write_all(&c[..5]).await.expect("send");
        assert!(tokio::time::timeout(Duration::from_millis(20), rd.next(1024, |_| true)).await.is_err());
        let mut rest = c[5..].to_vec();
        rest.extend_from_slice(&[0xC0, 0, 0xE0, 0]);
        client.write_all(&rest).await.expect("send");
        let f = rd.next(1024, |_| true).await.expect("CONNECT");
        assert_eq!(&f.bytes[..], &c[..], "nothing lost by the cancelled read");
        assert_eq!(&rd.next(1024, |_| true).await.expect("PINGREQ").bytes[..], &[0xC0, 0]);
        assert_eq!(&rd.next(1024, |_| true).await.expect("DISCONNECT").bytes[..], &[0xE0, 0]);
        drop(client);
        assert_eq!(rd.next(1024, |_| true).await.map(|f| f.bytes), Err(WireError::Closed));
        // Refused before the length is looked at, and over the limit before anything is read.
        let (mut client, server) = tokio::io::duplex(1024);
        let mut rd = FrameReader::new(server, budget.clone());
        client.write_all(b"GET / HTTP/1.1\r\n").await.expect("send");
        assert!(matches!(rd.next(1024, |b| b == 0x10).await, Err(WireError::Malformed(_))));
        let (mut client, server) = tokio::io::duplex(1024);
        let mut rd = FrameReader::new(server, budget);
        client.write_all(&[0x30, 0xff, 0x7f]).await.expect("send");
        assert_eq!(rd.next(1024, |_| true).await.map(|f| f.bytes), Err(WireError::TooLarge { size: 16383, max: 1024 }));
    }

    #[tokio::test]
    async fn an_exhausted_budget_closes_the_reader_that_waits_too_long() {
        let budget = ReadBudget::new(1024, Duration::from_millis(50));
        let (mut a, sa) = tokio::io::duplex(8192);
        let (mut b, sb) = tokio::io::duplex(8192);
        let mut ra = FrameReader::new(sa, budget.clone());
        let mut rb = FrameReader::new(sb, budget.clone());
        use tokio::io::AsyncWriteExt;
        // `a` holds half the budget with a half-sent packet...
        a.write_all(&[0x30, 0x80, 0x08]).await.expect("send");
        a.write_all(&[0u8; 500]).await.expect("send");
        assert!(tokio::time::timeout(Duration::from_millis(100), ra.next(4096, |_| true)).await.is_err());
        assert_eq!(budget.in_use(), 512);
        // ...so `b` cannot grow its own buffer and gives up after the wait instead of holding on.
        b.write_all(&[0x30, 0x80, 0x08]).await.expect("send");
        b.write_all(&[0u8; 300]).await.expect("send");
        let r = tokio::time::timeout(Duration::from_secs(5), rb.next(4096, |_| true)).await.expect("answered");
        assert_eq!(r.map(|f| f.bytes), Err(WireError::BudgetExhausted));
        assert!(budget.in_use() <= 1024);
    }

    #[test]
    fn the_protocol_level_is_read_from_a_dozen_bytes() {
        let c = connect_v4("client");
        assert_eq!(connect_level_prefix(&c[..8]), Ok(None));
        assert_eq!(connect_level_prefix(&c[..9]), Ok(Some(4)));
        let big = [0x10, 0x80, 0x80, 0x40, 0, 4, b'M', b'Q', b'T', b'T', 5];
        assert_eq!(connect_level_prefix(&big), Ok(Some(5)), "a 1 MiB CONNECT, level read from 11 bytes");
        assert!(connect_level_prefix(&[0x30, 2]).is_err());
        assert!(connect_level_prefix(&[0x10, 10, 0, 4, b'H', b'T']).is_err());
        assert_eq!(connect_level_prefix(&[0x10, 10, 0, 6, b'M', b'Q', b'I', b's']), Ok(Some(3)));
    }

    #[test]
    fn nul_in_any_string_is_a_malformed_packet() {
        // [MQTT-1.5.3-2] (3.1.1) and [MQTT-1.5.4-2] (5.0).
        let bad = |version, frame: BytesMut| matches!(decode(version, frame, 1 << 20), Err(WireError::Malformed(m)) if m.contains("U+0000"));
        assert!(bad(Version::V4, connect_v4("victim\0x")));
        let mut b = BytesMut::new();
        let mut c = v5::Connect { keep_alive: 10, client_id: "victim\0x".into(), clean_start: true, properties: None };
        v5::Connect::write(&c, &None, &None, &mut b).expect("write");
        assert!(bad(Version::V5, b));
        c.client_id = "ok".into();
        let mut b = BytesMut::new();
        let login = v5::Login { username: "u\0".into(), password: "p".into() };
        v5::Connect::write(&c, &None, &Some(login), &mut b).expect("write");
        assert!(bad(Version::V5, b));
        let mut b = BytesMut::new();
        let mut p = v4::Publish::new("a\0b", rumqttc::mqttbytes::QoS::AtLeastOnce, "x");
        p.pkid = 1;
        p.write(&mut b).expect("write");
        assert!(bad(Version::V4, b));
        let mut b = BytesMut::new();
        let props = v5::PublishProperties { user_properties: vec![("k".into(), "v\0".into())], ..Default::default() };
        let mut p = v5::Publish::new("a/b", rumqttc::v5::mqttbytes::QoS::AtLeastOnce, "x", Some(props));
        p.pkid = 1;
        p.write(&mut b).expect("write");
        assert!(bad(Version::V5, b));
        let mut b = BytesMut::new();
        let mut sub = v4::Subscribe::new("a/\0", rumqttc::mqttbytes::QoS::AtMostOnce);
        sub.pkid = 1;
        sub.write(&mut b).expect("write");
        assert!(bad(Version::V4, b));
        let mut b = BytesMut::new();
        let mut unsub = v4::Unsubscribe::new("a\0");
        unsub.pkid = 1;
        unsub.write(&mut b).expect("write");
        assert!(bad(Version::V4, b));
        // The same packets without NUL decode.
        assert!(decode(Version::V4, connect_v4("victim"), 1 << 20).is_ok());
    }

    #[test]
    fn connect_level_is_read_before_decoding() {
        let c = v4::Connect::new("id");
        let mut b = BytesMut::new();
        c.write(&mut b).expect("write");
        assert_eq!(connect_level(&b), Ok(4));
        assert!(connect_level(&[0x30, 0]).is_err(), "the first packet must be CONNECT");
    }
}
