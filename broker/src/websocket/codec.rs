//! WebSocket frames of a server's side of a connection (RFC 6455 section 5), without I/O: client
//! bytes are decoded in place (headers dropped, payloads unmasked and moved to the front), so the
//! data of any number of frames, split or packed in any way, comes out as one byte stream; pings,
//! pongs and the closing handshake are answered through at most one waiting control frame each.
//! Nothing is buffered for a length a frame announces: a data frame's payload streams through as
//! its bytes arrive, and only a frame header (at most 14 bytes) and a control frame's payload (at
//! most 125) are kept between reads.

/// Longest payload of a control frame (RFC 6455 5.5).
pub const CONTROL_PAYLOAD_MAX: usize = 125;
/// Longest frame header: 2 bytes, an 8-byte extended length, a 4-byte mask (RFC 6455 5.2).
const HEADER_MAX: usize = 14;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Close status codes this side sends (RFC 6455 7.4.1).
pub mod status {
    /// The purpose of the connection was fulfilled (the session ended).
    pub const NORMAL: u16 = 1000;
    /// The server is going away (shutting down).
    pub const GOING_AWAY: u16 = 1001;
    /// A frame broke RFC 6455.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A kind of data this endpoint does not accept (a text frame, [MQTT-6.0.0-1]).
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// A close frame without a status code: answered without one.
    pub const NO_STATUS: u16 = 1005;
    /// A close frame's reason that is not UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
}

/// Why a client's frames end the connection; each maps to the close code sent before closing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("text frame: MQTT packets travel in binary frames only [MQTT-6.0.0-1]")]
    TextFrame,
    #[error("unmasked client frame (RFC 6455 5.1: a client masks every frame)")]
    Unmasked,
    #[error("reserved bits set without an extension negotiated (RFC 6455 5.2)")]
    ReservedBits,
    #[error("reserved opcode {0:#x} (RFC 6455 5.2)")]
    ReservedOpcode(u8),
    #[error("fragmented control frame (RFC 6455 5.5)")]
    FragmentedControl,
    #[error("control frame announcing {0} bytes, more than 125 (RFC 6455 5.5)")]
    ControlTooLong(u64),
    #[error("continuation frame with no fragmented message to continue (RFC 6455 5.4)")]
    UnexpectedContinuation,
    #[error("new data frame before the fragmented message ended (RFC 6455 5.4)")]
    UnfinishedMessage,
    #[error("64-bit frame length with its most significant bit set (RFC 6455 5.2)")]
    LengthTooLarge,
    #[error("frame length not in its shortest encoding (RFC 6455 5.2)")]
    LengthNotMinimal,
    #[error("close frame with a one-byte payload or a status code not allowed on the wire (RFC 6455 7.4)")]
    BadCloseCode,
    #[error("close frame whose reason is not UTF-8 (RFC 6455 5.5.1)")]
    BadCloseReason,
}

impl FrameError {
    /// The status code of the close frame sent for this error (RFC 6455 7.4.1).
    pub fn close_code(&self) -> u16 {
        match self {
            Self::TextFrame => status::UNSUPPORTED_DATA,
            Self::BadCloseReason => status::INVALID_PAYLOAD,
            _ => status::PROTOCOL_ERROR,
        }
    }
}

/// Where the decoder stands in the client's byte stream.
#[derive(Debug, Clone, Copy)]
enum Reading {
    /// Collecting a frame header (`len` bytes of it so far).
    Header { bytes: [u8; HEADER_MAX], len: usize },
    /// Inside a data frame's payload: `remaining` bytes still to come, `phase` = payload bytes
    /// already unmasked, modulo 4.
    Data { remaining: u64, mask: [u8; 4], phase: usize },
    /// Inside a control frame's payload (at most 125 bytes, collected in `control`).
    Control { opcode: u8, remaining: usize, mask: [u8; 4] },
    /// A close frame arrived: nothing more is read.
    Closed,
}

/// A pong waiting to be sent.
#[derive(Debug, Clone, Copy)]
struct Pong {
    payload: [u8; CONTROL_PAYLOAD_MAX],
    len: usize,
}

/// The server's side of one WebSocket connection: decodes what the client sends, and says
/// which control frames are due. The I/O adapter (`io.rs`) reads and writes around it.
#[derive(Debug, Clone)]
pub struct Codec {
    reading: Reading,
    /// A fragmented data message is open: the next data frame must be a continuation.
    in_message: bool,
    /// The control payload being collected.
    control: [u8; CONTROL_PAYLOAD_MAX],
    control_len: usize,
    /// The pong answering the latest ping not yet answered (RFC 6455 5.5.3 lets an endpoint
    /// answer only the most recent one): a client sending pings without reading holds one frame.
    pong: Option<Pong>,
    /// Our close frame, once due (an answer to the client's, or ours on an error or at the end),
    /// with its status code (none when answering a close that had none).
    close: Option<Option<u16>>,
    /// Our close frame was handed out: no frame may follow it (RFC 6455 5.5.1).
    close_sent: bool,
    /// The status code of the client's close frame, once it came.
    close_received: Option<u16>,
}

impl Default for Codec {
    fn default() -> Self {
        Self::new()
    }
}

impl Codec {
    pub fn new() -> Self {
        Self {
            reading: Reading::Header { bytes: [0; HEADER_MAX], len: 0 },
            in_message: false,
            control: [0; CONTROL_PAYLOAD_MAX],
            control_len: 0,
            pong: None,
            close: None,
            close_sent: false,
            close_received: None,
        }
    }

    /// Decodes the client's bytes in `buf` in place: the payload bytes of its data frames are
    /// unmasked and moved to the front, and their count returned (0 when `buf` held only headers
    /// or control frames). Control frames are handled on the way: a ping makes a pong due, a
    /// close makes our close due and ends reading (bytes after it are ignored). On an error the
    /// close frame that reports it is due; the connection should then end.
    pub fn decode(&mut self, buf: &mut [u8]) -> Result<usize, FrameError> {
        let mut at = 0;
        let mut out = 0;
        while at < buf.len() {
            match self.reading {
                Reading::Closed => break,
                Reading::Header { mut bytes, mut len } => {
                    let take = (header_len(&bytes[..len]) - len).min(buf.len() - at);
                    bytes[len..len + take].copy_from_slice(&buf[at..at + take]);
                    len += take;
                    at += take;
                    if len < header_len(&bytes[..len]) {
                        self.reading = Reading::Header { bytes, len };
                        continue;
                    }
                    if let Err(e) = self.start_frame(&bytes[..len]) {
                        self.fail(&e);
                        return Err(e);
                    }
                }
                Reading::Data { remaining, mask, phase } => {
                    let n = usize::try_from(remaining).unwrap_or(usize::MAX).min(buf.len() - at);
                    buf.copy_within(at..at + n, out);
                    unmask(&mut buf[out..out + n], mask, phase);
                    at += n;
                    out += n;
                    let remaining = remaining - n as u64;
                    self.reading = if remaining == 0 {
                        Reading::Header { bytes: [0; HEADER_MAX], len: 0 }
                    } else {
                        Reading::Data { remaining, mask, phase: (phase + n) % 4 }
                    };
                }
                Reading::Control { opcode, remaining, mask } => {
                    let n = remaining.min(buf.len() - at);
                    let start = self.control_len;
                    self.control[start..start + n].copy_from_slice(&buf[at..at + n]);
                    unmask(&mut self.control[start..start + n], mask, start % 4);
                    self.control_len += n;
                    at += n;
                    if n == remaining {
                        if let Err(e) = self.end_control(opcode) {
                            self.fail(&e);
                            return Err(e);
                        }
                    } else {
                        self.reading = Reading::Control { opcode, remaining: remaining - n, mask };
                    }
                }
            }
        }
        Ok(out)
    }

    /// A complete header: checks it and sets up the reading of its payload.
    fn start_frame(&mut self, h: &[u8]) -> Result<(), FrameError> {
        let fin = h[0] & 0x80 != 0;
        if h[0] & 0x70 != 0 {
            return Err(FrameError::ReservedBits);
        }
        let opcode = h[0] & 0x0f;
        if h[1] & 0x80 == 0 {
            return Err(FrameError::Unmasked);
        }
        let (len, mask_at) = match h[1] & 0x7f {
            126 => {
                let len = u64::from(u16::from_be_bytes([h[2], h[3]]));
                if len < 126 {
                    return Err(FrameError::LengthNotMinimal);
                }
                (len, 4)
            }
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&h[2..10]);
                let len = u64::from_be_bytes(b);
                if len >> 63 != 0 {
                    return Err(FrameError::LengthTooLarge);
                }
                if len <= u64::from(u16::MAX) {
                    return Err(FrameError::LengthNotMinimal);
                }
                (len, 10)
            }
            n => (u64::from(n), 2),
        };
        let mut mask = [0u8; 4];
        mask.copy_from_slice(&h[mask_at..mask_at + 4]);
        match opcode {
            OP_TEXT => Err(FrameError::TextFrame),
            OP_BINARY | OP_CONTINUATION => {
                if opcode == OP_CONTINUATION && !self.in_message {
                    return Err(FrameError::UnexpectedContinuation);
                }
                if opcode == OP_BINARY && self.in_message {
                    return Err(FrameError::UnfinishedMessage);
                }
                self.in_message = !fin;
                self.reading = if len == 0 {
                    Reading::Header { bytes: [0; HEADER_MAX], len: 0 }
                } else {
                    Reading::Data { remaining: len, mask, phase: 0 }
                };
                Ok(())
            }
            OP_CLOSE | OP_PING | OP_PONG => {
                if !fin {
                    return Err(FrameError::FragmentedControl);
                }
                if len > CONTROL_PAYLOAD_MAX as u64 {
                    return Err(FrameError::ControlTooLong(len));
                }
                self.control_len = 0;
                self.reading = Reading::Control { opcode, remaining: len as usize, mask };
                if len == 0 {
                    return self.end_control(opcode);
                }
                Ok(())
            }
            other => Err(FrameError::ReservedOpcode(other)),
        }
    }

    /// A control frame's payload is complete.
    fn end_control(&mut self, opcode: u8) -> Result<(), FrameError> {
        self.reading = Reading::Header { bytes: [0; HEADER_MAX], len: 0 };
        let payload = &self.control[..self.control_len];
        match opcode {
            OP_PING => {
                let mut pong = Pong { payload: [0; CONTROL_PAYLOAD_MAX], len: payload.len() };
                pong.payload[..payload.len()].copy_from_slice(payload);
                self.pong = Some(pong);
            }
            OP_PONG => {}
            OP_CLOSE => {
                let code = match payload {
                    [] => status::NO_STATUS,
                    [_] => return Err(FrameError::BadCloseCode),
                    [a, b, reason @ ..] => {
                        let code = u16::from_be_bytes([*a, *b]);
                        if !close_code_allowed(code) {
                            return Err(FrameError::BadCloseCode);
                        }
                        if std::str::from_utf8(reason).is_err() {
                            return Err(FrameError::BadCloseReason);
                        }
                        code
                    }
                };
                self.close_received = Some(code);
                self.reading = Reading::Closed;
                // RFC 6455 5.5.1: answer with a close frame, echoing the status code.
                self.queue_close(if code == status::NO_STATUS { None } else { Some(code) });
            }
            _ => unreachable!("only control opcodes reach end_control"),
        }
        Ok(())
    }

    /// Makes our close frame due for `e` and stops reading.
    fn fail(&mut self, e: &FrameError) {
        self.reading = Reading::Closed;
        self.queue_close(Some(e.close_code()));
    }

    /// Makes our close frame due with `code` (the end of the session, a shutdown); no effect once
    /// one is due or sent.
    pub fn close(&mut self, code: u16) {
        self.queue_close(Some(code));
    }

    fn queue_close(&mut self, code: Option<u16>) {
        if self.close.is_some() || self.close_sent {
            return;
        }
        self.close = Some(code);
    }

    /// The client's close frame came (its status code): the byte stream has ended.
    pub fn close_received(&self) -> Option<u16> {
        self.close_received
    }

    /// Reading has ended (a close frame came, or an error).
    pub fn read_closed(&self) -> bool {
        matches!(self.reading, Reading::Closed)
    }

    /// Our close frame was sent: nothing more may be written.
    pub fn close_sent(&self) -> bool {
        self.close_sent
    }

    /// A control frame is due.
    pub fn control_due(&self) -> bool {
        !self.close_sent && (self.close.is_some() || self.pong.is_some())
    }

    /// Appends the control frame due next, if any, to `out` (our close first: once it is out,
    /// no pong follows).
    pub fn poll_control(&mut self, out: &mut Vec<u8>) -> bool {
        if self.close_sent {
            return false;
        }
        if let Some(code) = self.close.take() {
            self.close_sent = true;
            self.pong = None;
            let code = code.map(u16::to_be_bytes);
            out.push(0x80 | OP_CLOSE);
            out.push(if code.is_some() { 2 } else { 0 });
            out.extend_from_slice(code.as_ref().map_or(&[][..], |c| &c[..]));
            return true;
        }
        let Some(p) = self.pong.take() else { return false };
        out.push(0x80 | OP_PONG);
        out.push(p.len as u8);
        out.extend_from_slice(&p.payload[..p.len]);
        true
    }
}

/// The header length that the bytes so far call for (2 until the length byte is known).
fn header_len(h: &[u8]) -> usize {
    let Some(&b) = h.get(1) else { return 2 };
    let ext = match b & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if b & 0x80 != 0 { 4 } else { 0 }
}

/// Close codes a peer may send (RFC 6455 7.4.1, 7.4.2): 1000-1003, 1007-1011, 3000-4999.
fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

/// Unmasks (or masks) `b`, whose first byte is payload byte `phase` (mod 4) of its frame.
fn unmask(b: &mut [u8], mask: [u8; 4], phase: usize) {
    for (i, x) in b.iter_mut().enumerate() {
        *x ^= mask[(phase + i) % 4];
    }
}

/// Appends the header of a binary frame carrying `len` bytes, final and unmasked (a server
/// never masks, RFC 6455 5.1).
pub fn binary_header(len: usize, out: &mut Vec<u8>) {
    out.push(0x80 | OP_BINARY);
    if len < 126 {
        out.push(len as u8);
    } else if let Ok(short) = u16::try_from(len) {
        out.push(126);
        out.extend_from_slice(&short.to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// A client frame: `first` byte (FIN, opcode), masked with `MASK`.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![first];
        let len = payload.len();
        if len < 126 {
            f.push(0x80 | len as u8);
        } else if len <= 0xffff {
            f.push(0x80 | 126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            f.push(0x80 | 127);
            f.extend_from_slice(&(len as u64).to_be_bytes());
        }
        f.extend_from_slice(&MASK);
        let mut p = payload.to_vec();
        unmask(&mut p, MASK, 0);
        f.extend_from_slice(&p);
        f
    }

    fn binary(payload: &[u8]) -> Vec<u8> {
        frame(0x80 | OP_BINARY, payload)
    }

    /// Feeds `bytes` in pieces of `step` bytes; returns the data stream.
    fn decode_in_steps(c: &mut Codec, bytes: &[u8], step: usize) -> Result<Vec<u8>, FrameError> {
        let mut data = Vec::new();
        for piece in bytes.chunks(step) {
            let mut b = piece.to_vec();
            let n = c.decode(&mut b)?;
            data.extend_from_slice(&b[..n]);
        }
        Ok(data)
    }

    fn controls(c: &mut Codec) -> Vec<u8> {
        let mut out = Vec::new();
        while c.poll_control(&mut out) {}
        out
    }

    /// RFC 6455 5.7's example: a single-frame masked text message "Hello" (as binary here), and
    /// the same in two fragments.
    #[test]
    fn rfc_6455_5_7_masked_and_fragmented_examples() {
        let mut single = vec![0x82, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        let mut c = Codec::new();
        let n = c.decode(&mut single).expect("decode");
        assert_eq!(&single[..n], b"Hello");
        let mut fragmented = frame(OP_BINARY, b"Hel");
        fragmented.extend(frame(0x80 | OP_CONTINUATION, b"lo"));
        let mut c = Codec::new();
        assert_eq!(decode_in_steps(&mut c, &fragmented, fragmented.len()).expect("decode"), b"Hello");
    }

    /// [MQTT-6.0.0-2]: MQTT packets split across frames and several packed into one frame, the
    /// frames themselves arriving split at every byte boundary, with control frames between
    /// fragments (RFC 6455 5.4): the data stream is the packets' bytes in order.
    #[test]
    fn mqtt_6_0_0_2_packets_split_and_packed_in_any_way() {
        let packets: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        let mut wire = Vec::new();
        wire.extend(binary(&packets[..10]));
        wire.extend(frame(OP_BINARY, &packets[10..300]));
        wire.extend(frame(0x80 | OP_PING, b"hi"));
        wire.extend(frame(OP_CONTINUATION, &[]));
        wire.extend(frame(0x80 | OP_CONTINUATION, &packets[300..1000]));
        wire.extend(binary(&packets[1000..]));
        for step in [1, 2, 3, 7, 13, 125, 4096, wire.len()] {
            let mut c = Codec::new();
            let data = decode_in_steps(&mut c, &wire, step).expect("decode");
            assert!(data == packets, "step {step}: the stream differs");
            let pong = controls(&mut c);
            assert_eq!(pong, [0x8a, 2, b'h', b'i'], "step {step}: the ping is answered unmasked (RFC 6455 5.5.3)");
        }
    }

    /// RFC 6455 5.1: a server closes the connection on an unmasked client frame (status 1002).
    #[test]
    fn rfc_6455_5_1_unmasked_client_frame_fails_the_connection() {
        let mut c = Codec::new();
        let mut b = vec![0x82, 0x02, 1, 2];
        assert_eq!(c.decode(&mut b), Err(FrameError::Unmasked));
        assert_eq!(controls(&mut c), [0x88, 2, 0x03, 0xea], "close 1002");
        assert!(c.read_closed() && c.close_sent());
    }

    /// [MQTT-6.0.0-1]: a text frame closes the connection (status 1003), also when it follows
    /// good data in the same read (the error wins: the connection ends).
    #[test]
    fn mqtt_6_0_0_1_text_frame_closes_the_connection() {
        let mut c = Codec::new();
        let mut b = binary(b"\x10\x00");
        b.extend(frame(0x80 | OP_TEXT, b"{}"));
        assert_eq!(c.decode(&mut b), Err(FrameError::TextFrame));
        assert_eq!(controls(&mut c), [0x88, 2, 0x03, 0xeb], "close 1003");
        let mut more = binary(b"x");
        assert_eq!(c.decode(&mut more), Ok(0), "nothing is read after the failure");
    }

    /// Oversize: a frame announcing 2^63 - 1 bytes costs nothing until they arrive (its payload
    /// streams through, the codec's size is fixed); 2^63 and more is refused (RFC 6455 5.2), as
    /// a control frame over 125 bytes (5.5) and a length not in its shortest form.
    #[test]
    fn oversize_frames_announced_lengths_cost_nothing_and_bad_ones_are_refused() {
        let mut c = Codec::new();
        let mut h = vec![0x82, 0x80 | 127];
        h.extend_from_slice(&(u64::MAX >> 1).to_be_bytes());
        h.extend_from_slice(&MASK);
        assert_eq!(c.decode(&mut h), Ok(0));
        let mut some = vec![0u8; 1000];
        assert_eq!(c.decode(&mut some), Ok(1000), "the payload streams through");
        let size = std::mem::size_of::<Codec>();
        eprintln!("codec: {size} B");
        assert!(size < 320, "the codec holds no buffer: {size} B");

        let mut h = vec![0x82, 0x80 | 127];
        h.extend_from_slice(&(1u64 << 63).to_be_bytes());
        h.extend_from_slice(&MASK);
        assert_eq!(Codec::new().decode(&mut h), Err(FrameError::LengthTooLarge));

        let mut ping = vec![0x89, 0x80 | 126, 0, 126];
        ping.extend_from_slice(&MASK);
        let mut c = Codec::new();
        assert_eq!(c.decode(&mut ping), Err(FrameError::ControlTooLong(126)));
        assert_eq!(controls(&mut c), [0x88, 2, 0x03, 0xea]);

        let mut short_in_long = vec![0x82, 0x80 | 126, 0, 5];
        short_in_long.extend_from_slice(&MASK);
        assert_eq!(Codec::new().decode(&mut short_in_long), Err(FrameError::LengthNotMinimal));
    }

    /// RFC 6455 5.5.1: a close is answered with a close echoing its status code, then nothing is
    /// read (bytes after it are ignored) and no pong is sent after it.
    #[test]
    fn rfc_6455_5_5_1_close_is_echoed_and_ends_the_stream() {
        let mut c = Codec::new();
        let mut b = frame(0x80 | OP_PING, b"p");
        b.extend(frame(0x80 | OP_CLOSE, &[0x03, 0xe8, b'b', b'y', b'e']));
        b.extend(binary(b"after"));
        assert_eq!(c.decode(&mut b), Ok(0));
        assert_eq!(c.close_received(), Some(1000));
        assert!(c.read_closed());
        assert_eq!(controls(&mut c), [0x88, 2, 0x03, 0xe8], "close echoed, the pong dropped");
        assert!(!c.poll_control(&mut Vec::new()), "nothing after our close");

        let mut c = Codec::new();
        let mut empty = frame(0x80 | OP_CLOSE, &[]);
        assert_eq!(c.decode(&mut empty), Ok(0));
        assert_eq!(controls(&mut c), [0x88, 0], "a close without a code is answered without one");

        for bad in [&[0x03][..], &[0x03, 0xed], &[0x00, 0x01], &[0x03, 0xe8, 0xff]] {
            let mut c = Codec::new();
            let r = c.decode(&mut frame(0x80 | OP_CLOSE, bad));
            assert!(matches!(r, Err(FrameError::BadCloseCode | FrameError::BadCloseReason)), "{bad:?}: {r:?}");
        }
    }

    /// RFC 6455 5.5.2/5.5.3: pings are answered with their payload; of several pings not yet
    /// answered only the latest is (one frame held whatever a client sends); pongs are ignored.
    #[test]
    fn rfc_6455_5_5_2_pings_answered_latest_only() {
        let mut c = Codec::new();
        let mut b = Vec::new();
        for i in 0..1000u16 {
            b.extend(frame(0x80 | OP_PING, &i.to_be_bytes()));
        }
        b.extend(frame(0x80 | OP_PONG, b"unsolicited"));
        assert_eq!(decode_in_steps(&mut c, &b, 5).expect("decode"), b"");
        assert_eq!(controls(&mut c), [0x8a, 2, 0x03, 0xe7]);
    }

    /// RFC 6455 5.2/5.4/5.5: reserved bits and opcodes, fragmented control frames, a
    /// continuation without a message, a new message inside one.
    #[test]
    fn rfc_6455_5_framing_violations_fail_the_connection() {
        let cases: Vec<(Vec<u8>, FrameError)> = vec![
            (frame(0xc0 | OP_BINARY, b"x"), FrameError::ReservedBits),
            (frame(0x80 | 0x3, b"x"), FrameError::ReservedOpcode(3)),
            (frame(0x80 | 0xB, b""), FrameError::ReservedOpcode(0xB)),
            (frame(OP_PING, b""), FrameError::FragmentedControl),
            (frame(0x80 | OP_CONTINUATION, b"x"), FrameError::UnexpectedContinuation),
            ([frame(OP_BINARY, b"a"), binary(b"b")].concat(), FrameError::UnfinishedMessage),
        ];
        for (mut b, e) in cases {
            let mut c = Codec::new();
            assert_eq!(c.decode(&mut b), Err(e.clone()));
            assert_eq!(controls(&mut c), [0x88, 2, 0x03, 0xea], "{e}: close 1002");
        }
    }

    #[test]
    fn binary_headers_use_the_shortest_length() {
        for (len, want) in [
            (0usize, vec![0x82, 0]),
            (125, vec![0x82, 125]),
            (126, vec![0x82, 126, 0, 126]),
            (65_535, vec![0x82, 126, 0xff, 0xff]),
            (65_536, vec![0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]),
        ] {
            let mut h = Vec::new();
            binary_header(len, &mut h);
            assert_eq!(h, want, "{len}");
        }
    }

    /// Our own close (the session ended) is sent once, and a ping after it is not answered.
    #[test]
    fn server_close_is_sent_once() {
        let mut c = Codec::new();
        c.close(status::GOING_AWAY);
        c.close(status::NORMAL);
        assert_eq!(controls(&mut c), [0x88, 2, 0x03, 0xe9]);
        assert!(c.close_sent() && !c.control_due());
    }
}
