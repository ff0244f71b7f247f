//! The opening handshake of MQTT over WebSocket, without I/O: the client's HTTP upgrade request
//! (RFC 6455 4.1/4.2.1), read up to a byte limit, checked, and answered with `101 Switching
//! Protocols` selecting the subprotocol `mqtt` ([MQTT-6.0.0-3], [MQTT-6.0.0-4]), or with a
//! refusal (400, 405, 426, 431) after which the connection closes.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

/// The GUID RFC 6455 (1.3, 4.2.2) appends to the client's key before hashing.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// The one subprotocol served: MQTT 3.1.1 and 5 both name it `mqtt` (section 6 of each). The
/// `mqttv3.1` of MQTT 3.1 clients is not accepted: protocol level 3 is not served, so such a
/// client would be refused at CONNECT anyway (MQTT.js offers `mqttv3.1` only for 3.1).
pub const SUBPROTOCOL: &str = "mqtt";

/// Why an upgrade request is refused; each has its HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("upgrade request over {0} bytes (mqtt.websocket_request_bytes_max)")]
    TooLarge(usize),
    #[error("method {0:?}: the upgrade is a GET (RFC 6455 4.1)")]
    Method(String),
    #[error("malformed upgrade request: {0}")]
    Malformed(&'static str),
    #[error("not a WebSocket upgrade (no `Upgrade: websocket` and `Connection: Upgrade`)")]
    NotUpgrade,
    #[error("Sec-WebSocket-Version is not 13 (RFC 6455 4.2.2)")]
    Version,
    #[error("subprotocol `mqtt` not offered in Sec-WebSocket-Protocol [MQTT-6.0.0-3]")]
    NoMqttSubprotocol,
    #[error("bytes after the upgrade request before its answer (RFC 6455 4.1)")]
    EarlyData,
}

impl Refusal {
    /// The HTTP response sent before the connection closes.
    pub fn response(&self) -> Vec<u8> {
        let (status, extra) = match self {
            Self::TooLarge(_) => ("431 Request Header Fields Too Large", ""),
            Self::Method(_) => ("405 Method Not Allowed", "Allow: GET\r\n"),
            Self::NotUpgrade => ("426 Upgrade Required", "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"),
            Self::Version => ("426 Upgrade Required", "Sec-WebSocket-Version: 13\r\n"),
            Self::Malformed(_) | Self::NoMqttSubprotocol | Self::EarlyData => ("400 Bad Request", ""),
        };
        let body = format!("{self}\n");
        format!(
            "HTTP/1.1 {status}\r\n{extra}Connection: close\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }
}

/// Sec-WebSocket-Accept for a client's Sec-WebSocket-Key (RFC 6455 4.2.2 step 5.4): the base64
/// of the SHA-1 of the key (as sent) and the GUID.
pub fn accept_key(key: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.as_bytes());
    ctx.update(ACCEPT_GUID);
    B64.encode(ctx.finish())
}

/// An upgrade request being read: its bytes up to `max`, and how far the end has been looked
/// for (so a request arriving byte by byte is scanned once).
#[derive(Debug)]
pub struct Handshake {
    buf: Vec<u8>,
    max: usize,
    scanned: usize,
}

impl Handshake {
    /// A request of at most `max` bytes (`mqtt.websocket_request_bytes_max`).
    pub fn new(max: usize) -> Self {
        Self { buf: Vec::new(), max, scanned: 0 }
    }

    /// Takes the next bytes that arrived: `Ok(None)` while the request is incomplete, then the
    /// `101` answer to send, or the refusal. Bytes past `max` are never kept.
    pub fn receive(&mut self, bytes: &[u8]) -> Result<Option<Vec<u8>>, Refusal> {
        let room = self.max.saturating_sub(self.buf.len());
        if bytes.len() > room {
            // Whatever the rest holds, the request (with its end) does not fit.
            let mut probe = self.buf[self.scanned..].to_vec();
            probe.extend_from_slice(&bytes[..room.min(bytes.len())]);
            match find_end(&probe) {
                Some(end) if self.scanned + end <= self.max => return Err(Refusal::EarlyData),
                _ => return Err(Refusal::TooLarge(self.max)),
            }
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(self.max.min(1024));
        }
        self.buf.extend_from_slice(bytes);
        let Some(end) = find_end(&self.buf[self.scanned..]) else {
            self.scanned = self.buf.len().saturating_sub(3);
            return Ok(None);
        };
        let end = self.scanned + end;
        if end != self.buf.len() {
            return Err(Refusal::EarlyData);
        }
        parse(&self.buf[..end]).map(Some)
    }
}

/// The index just past the blank line ending the head, if it is there.
fn find_end(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// The tokens of a comma-separated header value.
fn tokens(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|t| !t.is_empty())
}

/// Checks a complete request head (ending with the blank line) and builds the `101` answer.
fn parse(head: &[u8]) -> Result<Vec<u8>, Refusal> {
    let head = std::str::from_utf8(head).map_err(|_| Refusal::Malformed("not UTF-8"))?;
    let mut lines = head.strip_suffix("\r\n\r\n").unwrap_or(head).split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal::Malformed("request line"));
    };
    if method != "GET" {
        return Err(Refusal::Method(method.chars().take(16).collect()));
    }
    if target.is_empty() || version != "HTTP/1.1" {
        return Err(Refusal::Malformed("request line (GET <path> HTTP/1.1)"));
    }
    let (mut host, mut upgrade, mut connection) = (false, false, false);
    // At most as many as header lines, which the request's byte limit bounds.
    let (mut versions, mut keys): (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
    let mut mqtt = false;
    for line in lines {
        if line.starts_with([' ', '\t']) {
            return Err(Refusal::Malformed("folded header line"));
        }
        let Some((name, value)) = line.split_once(':') else { return Err(Refusal::Malformed("header line")) };
        if name.is_empty() || name.ends_with([' ', '\t']) {
            return Err(Refusal::Malformed("header name"));
        }
        let value = value.trim_matches([' ', '\t']);
        match name.to_ascii_lowercase().as_str() {
            "host" => host = true,
            "upgrade" => upgrade |= tokens(value).any(|t| t.eq_ignore_ascii_case("websocket")),
            "connection" => connection |= tokens(value).any(|t| t.eq_ignore_ascii_case("upgrade")),
            "sec-websocket-version" => versions.push(value),
            "sec-websocket-key" => keys.push(value),
            // Subprotocol names are compared exactly (RFC 6455 4.1: case-sensitive tokens).
            "sec-websocket-protocol" => mqtt |= tokens(value).any(|t| t == SUBPROTOCOL),
            _ => {}
        }
    }
    if !host {
        return Err(Refusal::Malformed("no Host header (RFC 6455 4.1)"));
    }
    if !upgrade || !connection {
        return Err(Refusal::NotUpgrade);
    }
    if versions != ["13"] {
        return Err(Refusal::Version);
    }
    let [key] = keys[..] else { return Err(Refusal::Malformed("not one Sec-WebSocket-Key")) };
    match B64.decode(key) {
        Ok(nonce) if nonce.len() == 16 => {}
        _ => return Err(Refusal::Malformed("Sec-WebSocket-Key is not 16 bytes in base64 (RFC 6455 4.1)")),
    }
    if !mqtt {
        return Err(Refusal::NoMqttSubprotocol);
    }
    Ok(format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n",
        accept_key(key)
    )
    .into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn request(extra: &str) -> String {
        format!(
            "GET /mqtt HTTP/1.1\r\nHost: gw.local:8083\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    fn one(req: &str) -> Result<Option<Vec<u8>>, Refusal> {
        Handshake::new(8192).receive(req.as_bytes())
    }

    /// RFC 6455 1.3's example: the key "dGhlIHNhbXBsZSBub25jZQ==" is answered with
    /// "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".
    #[test]
    fn rfc_6455_1_3_accept_value() {
        assert_eq!(accept_key(KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    /// [MQTT-6.0.0-4]: the answer selects `mqtt`, among other offered subprotocols, in one or
    /// several header lines; the request may arrive a byte at a time.
    #[test]
    fn mqtt_6_0_0_4_upgrade_selects_mqtt() {
        for offer in [
            "Sec-WebSocket-Protocol: mqtt\r\n",
            "Sec-WebSocket-Protocol: wamp, mqtt\r\n",
            "Sec-WebSocket-Protocol: mqttv3.1\r\nsec-websocket-protocol: mqtt\r\n",
        ] {
            let req = request(offer);
            let mut h = Handshake::new(8192);
            let mut answer = None;
            for (i, b) in req.as_bytes().iter().enumerate() {
                let r = h.receive(&[*b]).expect("accepted");
                assert_eq!(r.is_some(), i == req.len() - 1, "complete only at the blank line");
                answer = answer.or(r);
            }
            let answer = String::from_utf8(answer.expect("answer")).expect("utf-8");
            assert!(answer.starts_with("HTTP/1.1 101 Switching Protocols\r\n"), "{answer}");
            assert!(answer.contains("\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"), "{answer}");
            assert!(answer.contains("\r\nSec-WebSocket-Protocol: mqtt\r\n"), "{answer}");
            assert!(answer.ends_with("\r\n\r\n"));
        }
    }

    /// [MQTT-6.0.0-3]/[MQTT-6.0.0-4]: without `mqtt` offered (none, `MQTT`, only MQTT 3.1's
    /// `mqttv3.1`) the server cannot answer with `mqtt`: 400.
    #[test]
    fn mqtt_6_0_0_3_no_mqtt_subprotocol_is_refused() {
        for offer in ["", "Sec-WebSocket-Protocol: MQTT\r\n", "Sec-WebSocket-Protocol: mqttv3.1\r\n"] {
            assert_eq!(one(&request(offer)), Err(Refusal::NoMqttSubprotocol), "{offer:?}");
        }
        assert!(String::from_utf8(Refusal::NoMqttSubprotocol.response()).expect("utf-8").starts_with("HTTP/1.1 400 "));
    }

    /// The named limit: a request that does not end within `max` bytes gets 431, whether it
    /// comes at once or in pieces, and no more than `max` bytes are ever kept.
    #[test]
    fn request_over_the_byte_limit_is_refused_with_431() {
        let req = request(&format!("Cookie: {}\r\nSec-WebSocket-Protocol: mqtt\r\n", "c".repeat(300)));
        let limit = req.len() - 1;
        assert_eq!(Handshake::new(limit).receive(req.as_bytes()), Err(Refusal::TooLarge(limit)));
        let mut h = Handshake::new(limit);
        let mut refused = None;
        for piece in req.as_bytes().chunks(10) {
            match h.receive(piece) {
                Ok(None) => assert!(h.buf.len() <= limit),
                r => {
                    refused = Some(r);
                    break;
                }
            }
        }
        assert_eq!(refused, Some(Err(Refusal::TooLarge(limit))));
        assert!(Handshake::new(req.len()).receive(req.as_bytes()).expect("fits").is_some());
        let answer = String::from_utf8(Refusal::TooLarge(limit).response()).expect("utf-8");
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    }

    /// RFC 6455 4.2.1/4.2.2: what a server must check, and how each failure is answered.
    #[test]
    fn rfc_6455_4_2_1_bad_requests_are_refused() {
        let p = "Sec-WebSocket-Protocol: mqtt\r\n";
        let good = request(p);
        let cases = [
            (good.replacen("GET", "POST", 1), "405 "),
            (good.replacen("HTTP/1.1", "HTTP/1.0", 1), "400 "),
            (good.replacen("Host: gw.local:8083\r\n", "", 1), "400 "),
            (good.replacen("Upgrade: websocket\r\n", "", 1), "426 "),
            (good.replacen("keep-alive, Upgrade", "keep-alive", 1), "426 "),
            (good.replacen("Version: 13", "Version: 8", 1), "426 "),
            (good.replacen(KEY, "c2hvcnQ=", 1), "400 "),
            (
                good.replacen(
                    "Sec-WebSocket-Version",
                    &format!("Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version"),
                    1,
                ),
                "400 ",
            ),
            (
                good.replacen("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Version: 13", 1),
                "426 ",
            ),
            (good.replacen("Host:", " Host:", 1), "400 "),
            (good.replacen("Host:", "Host :", 1), "400 "),
            (format!("{good}\x02"), "400 "),
            ("GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_string(), "426 "),
        ];
        for (req, status) in cases {
            let refusal = one(&req).expect_err(&req);
            let answer = String::from_utf8(refusal.response()).expect("utf-8");
            assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{req:?}: {answer}");
            assert!(answer.contains("\r\nConnection: close\r\n"));
        }
        let version = String::from_utf8(Refusal::Version.response()).expect("utf-8");
        assert!(version.contains("\r\nSec-WebSocket-Version: 13\r\n"), "RFC 6455 4.4: {version}");
    }
}
