//! Stored MQTT state in the store's MQTT key space: the encoding of persistent sessions
//! (subscriptions, delivery cursors, shared subscriptions, outbound messages in flight) and of
//! shared-subscription positions, and the keys they live under.

use std::collections::HashMap;

use crate::mqtt::wire;

/// Next offset to deliver per (log topic, partition).
pub(super) type Cursors = HashMap<(String, i32), i64>;

/// A record's place in the log: (log topic, partition, offset).
pub(super) type Position = (String, i32, i64);

/// An outbound QoS 1/2 message the client had not completed when the session was stored: sent
/// again (same packet id, DUP set) on reconnect, or only its PUBREL once the client has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct StoredInflight {
    pub pkid: u16,
    pub qos: u8,
    /// QoS 2 after PUBREC: the client has the message; only PUBREL/PUBCOMP remain.
    pub released: bool,
    pub position: Position,
}

/// What a persistent session keeps across disconnects and restarts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct StoredSession {
    pub subs: Vec<wire::Subscription>,
    pub cursors: Cursors,
    /// Shared subscriptions: (full `$share/{group}/{filter}`, granted QoS).
    pub shared: Vec<(String, u8)>,
    pub inflight: Vec<StoredInflight>,
}

pub(super) fn session_key(client_id: &str) -> Vec<u8> {
    prefixed(b"s\0", client_id)
}

/// Inbound QoS 2 packet id stored with its message and kept until PUBREL.
pub(super) fn qos2_key(client_id: &str, pkid: u16) -> Vec<u8> {
    let mut k = qos2_prefix(client_id);
    k.extend_from_slice(&pkid.to_be_bytes());
    k
}

pub(super) fn qos2_prefix(client_id: &str) -> Vec<u8> {
    let mut k = prefixed(b"q2\0", client_id);
    k.push(0);
    k
}

/// Position of a shared subscription (by its full `$share/...` filter).
pub(super) fn shared_key(name: &str) -> Vec<u8> {
    prefixed(b"g\0", name)
}

fn prefixed(prefix: &[u8], s: &str) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(s.as_bytes());
    k
}

fn put_str16(v: &mut Vec<u8>, s: &str) {
    let n = s.len().min(u16::MAX as usize);
    v.extend_from_slice(&(n as u16).to_be_bytes());
    v.extend_from_slice(&s.as_bytes()[..n]);
}

/// A bounds-checked reader over a stored value: every getter returns `None` past the end.
struct Cut<'a> {
    v: &'a [u8],
    at: usize,
}

impl<'a> Cut<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let b = self.v.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(b)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.bytes(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.bytes(2)?.try_into().ok()?))
    }
    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_be_bytes(self.bytes(4)?.try_into().ok()?))
    }
    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_be_bytes(self.bytes(8)?.try_into().ok()?))
    }
    fn str16(&mut self) -> Option<String> {
        let n = self.u16()? as usize;
        Some(std::str::from_utf8(self.bytes(n)?).ok()?.to_string())
    }
}

fn put_cursors(v: &mut Vec<u8>, cursors: &Cursors) {
    v.extend_from_slice(&(cursors.len().min(u16::MAX as usize) as u16).to_be_bytes());
    for ((t, p), off) in cursors.iter().take(u16::MAX as usize) {
        put_str16(v, t);
        v.extend_from_slice(&p.to_be_bytes());
        v.extend_from_slice(&off.to_be_bytes());
    }
}

fn get_cursors(c: &mut Cut<'_>) -> Option<Cursors> {
    let n = c.u16()?;
    let mut cursors = HashMap::with_capacity(n as usize);
    for _ in 0..n {
        let t = c.str16()?;
        let p = c.i32()?;
        cursors.insert((t, p), c.i64()?);
    }
    Some(cursors)
}

/// Stored session, format 2: expiry deadline (ms since the epoch, 0 = none), subscriptions
/// (filter, QoS, no-local), cursors, shared subscriptions (filter, QoS), messages in flight
/// (packet id, QoS, released, position). Format 1 (no shared subscriptions, no messages in
/// flight) is still read.
pub(super) fn encode_session(deadline_ms: i64, s: &StoredSession) -> Vec<u8> {
    let mut v = vec![2u8];
    v.extend_from_slice(&deadline_ms.to_be_bytes());
    v.extend_from_slice(&(s.subs.len() as u16).to_be_bytes());
    for sub in &s.subs {
        put_str16(&mut v, &sub.filter);
        v.push(sub.qos);
        v.push(u8::from(sub.no_local));
    }
    put_cursors(&mut v, &s.cursors);
    v.extend_from_slice(&(s.shared.len() as u16).to_be_bytes());
    for (filter, qos) in &s.shared {
        put_str16(&mut v, filter);
        v.push(*qos);
    }
    v.extend_from_slice(&(s.inflight.len() as u16).to_be_bytes());
    for m in &s.inflight {
        v.extend_from_slice(&m.pkid.to_be_bytes());
        v.push(m.qos);
        v.push(u8::from(m.released));
        put_str16(&mut v, &m.position.0);
        v.extend_from_slice(&m.position.1.to_be_bytes());
        v.extend_from_slice(&m.position.2.to_be_bytes());
    }
    v
}

/// A stored session, unless it expired (deadline before `now_ms`) or cannot be read.
pub(super) fn decode_session(v: &[u8], now_ms: i64) -> Option<StoredSession> {
    let mut c = Cut { v, at: 0 };
    let format = c.u8()?;
    if format != 1 && format != 2 {
        return None;
    }
    let deadline = c.i64()?;
    if deadline != 0 && deadline < now_ms {
        return None;
    }
    let n = c.u16()?;
    let mut s = StoredSession::default();
    for _ in 0..n {
        let filter = c.str16()?;
        let qos = c.u8()?;
        let no_local = c.u8()? != 0;
        s.subs.push(wire::Subscription { filter, qos, no_local });
    }
    s.cursors = get_cursors(&mut c)?;
    if format == 1 {
        return Some(s);
    }
    for _ in 0..c.u16()? {
        let filter = c.str16()?;
        s.shared.push((filter, c.u8()?));
    }
    for _ in 0..c.u16()? {
        let pkid = c.u16()?;
        let qos = c.u8()?;
        let released = c.u8()? != 0;
        let position = (c.str16()?, c.i32()?, c.i64()?);
        s.inflight.push(StoredInflight { pkid, qos, released, position });
    }
    Some(s)
}

/// A shared subscription's position: format 1, then its cursors.
pub(super) fn encode_shared(cursors: &Cursors) -> Vec<u8> {
    let mut v = vec![1u8];
    put_cursors(&mut v, cursors);
    v
}

pub(super) fn decode_shared(v: &[u8]) -> Option<Cursors> {
    let mut c = Cut { v, at: 0 };
    (c.u8()? == 1).then_some(())?;
    get_cursors(&mut c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StoredSession {
        StoredSession {
            subs: vec![wire::Subscription { filter: "meters/+/reading".into(), qos: 2, no_local: true }],
            cursors: HashMap::from([(("mqtt".to_string(), 3), 42)]),
            shared: vec![("$share/g/meters/#".into(), 1)],
            inflight: vec![
                StoredInflight { pkid: 7, qos: 1, released: false, position: ("mqtt".into(), 3, 40) },
                StoredInflight { pkid: 9, qos: 2, released: true, position: ("mqtt".into(), 3, 41) },
            ],
        }
    }

    #[test]
    fn session_round_trip_and_expiry() {
        let s = sample();
        let v = encode_session(0, &s);
        assert_eq!(decode_session(&v, 1_000), Some(s.clone()));
        let v = encode_session(500, &s);
        assert_eq!(decode_session(&v, 1_000), None, "expired");
        assert_eq!(decode_session(&v, 400), Some(s));
    }

    #[test]
    fn truncated_or_unknown_values_are_refused() {
        let v = encode_session(0, &sample());
        for cut in 0..v.len() {
            assert_eq!(decode_session(&v[..cut], 0), None, "cut at {cut}");
        }
        let mut bad = v.clone();
        bad[0] = 9;
        assert_eq!(decode_session(&bad, 0), None);
    }

    #[test]
    fn format_1_still_reads() {
        // Format 1 as written before shared subscriptions and messages in flight were stored.
        let mut v = vec![1u8];
        v.extend_from_slice(&0i64.to_be_bytes());
        v.extend_from_slice(&1u16.to_be_bytes());
        put_str16(&mut v, "a/#");
        v.extend_from_slice(&[1, 0]);
        put_cursors(&mut v, &HashMap::from([(("t".to_string(), 0), 5)]));
        let s = decode_session(&v, 0).expect("format 1");
        assert_eq!(s.subs[0].filter, "a/#");
        assert_eq!(s.cursors[&("t".to_string(), 0)], 5);
        assert!(s.shared.is_empty() && s.inflight.is_empty());
    }

    #[test]
    fn shared_position_round_trip() {
        let c = HashMap::from([(("t".to_string(), 1), 9), (("u".to_string(), 0), 0)]);
        assert_eq!(decode_shared(&encode_shared(&c)), Some(c));
        assert_eq!(decode_shared(&[2]), None);
    }
}
