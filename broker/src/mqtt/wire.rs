//! MQTT packets on the wire, for both protocol versions: framing with the size checked on the
//! fixed header, decoding of CONNECT, PUBLISH, SUBSCRIBE and UNSUBSCRIBE with rumqttc's
//! `mqttbytes` codecs (v4 and v5) into one version-independent form, the small packets (acks,
//! PINGREQ, DISCONNECT) by hand (rumqttc's v5 codec refuses their short forms), and every
//! outgoing packet encoded by hand.

use bytes::{BufMut, Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use tokio::io::{AsyncRead, AsyncReadExt};

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
}

/// Reads one packet's bytes (fixed header included), refusing it before buffering when its
/// remaining length exceeds `max`.
pub(crate) async fn read_frame(r: &mut (impl AsyncRead + Unpin), max: usize) -> Result<BytesMut, WireError> {
    read_frame_where(r, max, |_| true).await
}

/// The first packet of a connection: anything but CONNECT is refused on its first byte, before
/// waiting for a length that garbage may claim.
pub(crate) async fn read_connect_frame(r: &mut (impl AsyncRead + Unpin), max: usize) -> Result<BytesMut, WireError> {
    read_frame_where(r, max, |first| first == 0x10).await
}

async fn read_frame_where(
    r: &mut (impl AsyncRead + Unpin),
    max: usize,
    accept: impl Fn(u8) -> bool,
) -> Result<BytesMut, WireError> {
    let first = match r.read_u8().await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
        Err(e) => return Err(WireError::Io(e.to_string())),
    };
    if !accept(first) {
        return Err(WireError::Malformed(format!("unexpected first byte {first:#04x}: not an MQTT CONNECT")));
    }
    let mut len = 0usize;
    let mut header = vec![first];
    for i in 0..4 {
        let b = r.read_u8().await.map_err(|_| WireError::Malformed("truncated fixed header".into()))?;
        header.push(b);
        len |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            break;
        }
        if i == 3 {
            return Err(WireError::Malformed("remaining length longer than 4 bytes".into()));
        }
    }
    if len > max {
        return Err(WireError::TooLarge { size: len, max });
    }
    let mut frame = BytesMut::with_capacity(header.len() + len);
    frame.extend_from_slice(&header);
    frame.resize(header.len() + len, 0);
    r.read_exact(&mut frame[header.len()..]).await.map_err(|_| WireError::Malformed("truncated packet".into()))?;
    Ok(frame)
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Subscription {
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
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
    /// With the v5 reason code (0 = normal; 4 = disconnect with will message).
    Disconnect(u8),
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
        14 => return Ok(In::Disconnect(if version == Version::V5 { b.first().copied().unwrap_or(0) } else { 0 })),
        _ => {}
    }
    let mut frame = frame;
    match version {
        Version::V4 => match v4::Packet::read(&mut frame, max).map_err(malformed)? {
            v4::Packet::Connect(c) => Ok(In::Connect {
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
                }),
                session_expiry_s: if c.clean_session { 0 } else { u32::MAX },
                receive_max: u16::MAX,
                max_packet: None,
            }),
            v4::Packet::Publish(p) => Ok(In::Publish {
                topic: Bytes::from(p.topic.into_bytes()),
                qos: qos4(p.qos),
                retain: p.retain,
                dup: p.dup,
                pkid: p.pkid,
                payload: p.payload,
                props: PublishProps::default(),
            }),
            v4::Packet::Subscribe(s) => Ok(In::Subscribe {
                pkid: s.pkid,
                subs: s
                    .filters
                    .into_iter()
                    .map(|f| Subscription { filter: f.path, qos: qos4(f.qos), no_local: false })
                    .collect(),
            }),
            v4::Packet::Unsubscribe(u) => Ok(In::Unsubscribe { pkid: u.pkid, filters: u.topics }),
            other => Err(WireError::Malformed(format!("unexpected packet from a client: {other:?}"))),
        },
        Version::V5 => match v5::Packet::read(&mut frame, Some(max as u32)).map_err(malformed)? {
            v5::Packet::Connect(c, will, login) => {
                let p = c.properties.unwrap_or_default();
                Ok(In::Connect {
                    client_id: c.client_id,
                    clean: c.clean_start,
                    keep_alive: c.keep_alive,
                    username: login.as_ref().map(|l| l.username.clone()),
                    password: login.map(|l| l.password).filter(|p| !p.is_empty()),
                    will: will.map(|w| Will {
                        topic: String::from_utf8_lossy(&w.topic).into_owned(),
                        payload: w.message,
                        qos: qos5(w.qos),
                        retain: w.retain,
                        delay_s: w.properties.and_then(|p| p.delay_interval).unwrap_or(0),
                    }),
                    session_expiry_s: p.session_expiry_interval.unwrap_or(0),
                    receive_max: p.receive_maximum.unwrap_or(u16::MAX),
                    max_packet: p.max_packet_size,
                })
            }
            v5::Packet::Publish(p) => {
                let props = p.properties.map(|pp| PublishProps {
                    content_type: pp.content_type,
                    correlation_data: pp.correlation_data,
                    response_topic: pp.response_topic,
                    user_properties: pp.user_properties,
                    message_expiry_s: pp.message_expiry_interval,
                    topic_alias: pp.topic_alias,
                });
                Ok(In::Publish {
                    topic: p.topic,
                    qos: qos5(p.qos),
                    retain: p.retain,
                    dup: p.dup,
                    pkid: p.pkid,
                    payload: p.payload,
                    props: props.unwrap_or_default(),
                })
            }
            v5::Packet::Subscribe(s) => Ok(In::Subscribe {
                pkid: s.pkid,
                subs: s
                    .filters
                    .into_iter()
                    .map(|f| Subscription { filter: f.path, qos: qos5(f.qos), no_local: f.nolocal })
                    .collect(),
            }),
            v5::Packet::Unsubscribe(u) => Ok(In::Unsubscribe { pkid: u.pkid, filters: u.filters }),
            other => Err(WireError::Malformed(format!("unexpected packet from a client: {other:?}"))),
        },
    }
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
                p.put_u8(0);
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
    pub assigned_client_id: Option<String>,
    pub reason: Option<String>,
}

/// PUBACK (4), PUBREC (5), PUBREL (6, flags 2) and PUBCOMP (7) with an optional v5 reason.
pub(crate) fn ack(version: Version, kind: u8, pkid: u16, reason: u8) -> Bytes {
    let first = (kind << 4) | if kind == 6 { 0x02 } else { 0 };
    let mut b = BytesMut::with_capacity(4);
    b.put_u16(pkid);
    if version == Version::V5 && reason != 0 {
        b.put_u8(reason);
        b.put_u8(0);
    }
    frame(first, &b)
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
    let mut b = BytesMut::with_capacity(topic.len() + payload.len() + 16);
    put_str(&mut b, topic.as_bytes());
    if qos > 0 {
        b.put_u16(pkid);
    }
    if version == Version::V5 {
        let mut p = BytesMut::new();
        if let Some(expiry) = props.message_expiry_s {
            p.put_u8(0x02);
            p.put_u32(expiry);
        }
        if let Some(ct) = &props.content_type {
            p.put_u8(0x03);
            put_str(&mut p, ct.as_bytes());
        }
        if let Some(rt) = &props.response_topic {
            p.put_u8(0x08);
            put_str(&mut p, rt.as_bytes());
        }
        if let Some(cd) = &props.correlation_data {
            p.put_u8(0x09);
            put_str(&mut p, cd);
        }
        for (k, v) in &props.user_properties {
            p.put_u8(0x26);
            put_str(&mut p, k.as_bytes());
            put_str(&mut p, v.as_bytes());
        }
        put_len(&mut b, p.len());
        b.put_slice(&p);
    }
    b.put_slice(payload);
    let first = 0x30 | (u8::from(dup) << 3) | (qos << 1) | u8::from(retain);
    frame(first, &b)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn connect_level_is_read_before_decoding() {
        let c = v4::Connect::new("id");
        let mut b = BytesMut::new();
        c.write(&mut b).expect("write");
        assert_eq!(connect_level(&b), Ok(4));
        assert!(connect_level(&[0x30, 0]).is_err(), "the first packet must be CONNECT");
    }
}
