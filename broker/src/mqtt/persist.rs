//! Stored MQTT state in the store's MQTT key space: the encoding of persistent sessions
//! (owner, subscriptions, delivery cursors, shared subscriptions, outbound messages in flight)
//! and of shared-subscription positions, and the keys they live under. Every key is injective in
//! the client strings it is built from: a fixed tag per kind, then either the whole string (one
//! string per key) or a length prefix (a string followed by more data).

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
    /// The user that owned the session when it was stored (`[auth]` on); another user never
    /// resumes it.
    pub owner: Option<String>,
    pub subs: Vec<wire::Subscription>,
    pub cursors: Cursors,
    /// Shared subscriptions: (full `$share/{group}/{filter}`, granted QoS, subscription
    /// identifier or 0).
    pub shared: Vec<(String, u8, u32)>,
    pub inflight: Vec<StoredInflight>,
}

/// Key tags: each kind of key starts with its own tag, and no tag is a prefix of another.
const SESSION_TAG: &[u8] = b"s\0";
const SHARED_TAG: &[u8] = b"g\0";
/// QoS 2 packet ids: tag, client id length (u16), client id, packet id.
const QOS2_TAG: &[u8] = b"q2\x01";
/// The previous release's QoS 2 keys: `q2\0{client id}\0{packet id}`, ambiguous when a client
/// id contains NUL. Still read (only keys of exactly the right length) and removed.
const LEGACY_QOS2_TAG: &[u8] = b"q2\0";

pub(super) fn session_key(client_id: &str) -> Vec<u8> {
    prefixed(SESSION_TAG, client_id)
}

/// The prefix every stored session key starts with (for the expiry sweep).
pub(super) fn session_prefix() -> &'static [u8] {
    SESSION_TAG
}

/// The client id of a session key.
pub(super) fn session_client(key: &[u8]) -> Option<&str> {
    std::str::from_utf8(key.strip_prefix(SESSION_TAG)?).ok()
}

/// Inbound QoS 2 packet id stored with its message and kept until PUBREL.
pub(super) fn qos2_key(client_id: &str, pkid: u16) -> Vec<u8> {
    let mut k = qos2_prefix(client_id);
    k.extend_from_slice(&pkid.to_be_bytes());
    k
}

/// Every QoS 2 key of `client_id` starts with this, and no other client's does (the length
/// prefix ends the client id).
pub(super) fn qos2_prefix(client_id: &str) -> Vec<u8> {
    let mut k = QOS2_TAG.to_vec();
    let n = client_id.len().min(usize::from(u16::MAX));
    k.extend_from_slice(&(n as u16).to_be_bytes());
    k.extend_from_slice(&client_id.as_bytes()[..n]);
    k
}

/// The key the previous release stored a QoS 2 packet id under (removed with the new one).
pub(super) fn legacy_qos2_key(client_id: &str, pkid: u16) -> Vec<u8> {
    let mut k = legacy_qos2_prefix(client_id);
    k.extend_from_slice(&pkid.to_be_bytes());
    k
}

pub(super) fn legacy_qos2_prefix(client_id: &str) -> Vec<u8> {
    let mut k = prefixed(LEGACY_QOS2_TAG, client_id);
    k.push(0);
    k
}

/// The packet id of a QoS 2 key found under `prefix` (new or legacy form): only a key of exactly
/// the prefix plus two bytes is this client's (a legacy key of client `victim\0x` also starts
/// with `victim`'s legacy prefix, but is longer).
pub(super) fn qos2_pkid(prefix: &[u8], key: &[u8]) -> Option<u16> {
    let rest = key.strip_prefix(prefix)?;
    let id: [u8; 2] = rest.try_into().ok()?;
    Some(u16::from_be_bytes(id))
}

/// Position of a shared subscription (by its full `$share/...` filter).
pub(super) fn shared_key(name: &str) -> Vec<u8> {
    prefixed(SHARED_TAG, name)
}

pub(super) fn shared_prefix() -> &'static [u8] {
    SHARED_TAG
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
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.bytes(4)?.try_into().ok()?))
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

/// Stored session, format 4: expiry deadline (ms since the epoch, 0 = none), owner (user name,
/// empty = none), subscriptions (filter, QoS, options: bit 0 no-local, bit 1 retain as
/// published, bits 2-3 retain handling; subscription identifier), cursors, shared subscriptions
/// (filter, QoS, subscription identifier), messages in flight (packet id, QoS, released,
/// position). Formats 1 (no owner, no shared subscriptions, no messages in flight), 2 (no
/// owner) and 3 (options = no-local only, no subscription identifiers) are still read.
pub(super) fn encode_session(deadline_ms: i64, s: &StoredSession) -> Vec<u8> {
    let mut v = vec![4u8];
    v.extend_from_slice(&deadline_ms.to_be_bytes());
    put_str16(&mut v, s.owner.as_deref().unwrap_or(""));
    v.extend_from_slice(&(s.subs.len() as u16).to_be_bytes());
    for sub in &s.subs {
        put_str16(&mut v, &sub.filter);
        v.push(sub.qos);
        v.push(u8::from(sub.no_local) | u8::from(sub.retain_as_published) << 1 | (sub.retain_handling & 3) << 2);
        v.extend_from_slice(&sub.id.to_be_bytes());
    }
    put_cursors(&mut v, &s.cursors);
    v.extend_from_slice(&(s.shared.len() as u16).to_be_bytes());
    for (filter, qos, id) in &s.shared {
        put_str16(&mut v, filter);
        v.push(*qos);
        v.extend_from_slice(&id.to_be_bytes());
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

/// The expiry deadline of a stored session (0 = none), if the value can be read.
pub(super) fn session_deadline(v: &[u8]) -> Option<i64> {
    let mut c = Cut { v, at: 0 };
    matches!(c.u8()?, 1..=4).then_some(())?;
    c.i64()
}

/// A stored session, unless it expired (deadline before `now_ms`) or cannot be read.
pub(super) fn decode_session(v: &[u8], now_ms: i64) -> Option<StoredSession> {
    let mut c = Cut { v, at: 0 };
    let format = c.u8()?;
    if !(1..=4).contains(&format) {
        return None;
    }
    let deadline = c.i64()?;
    if deadline != 0 && deadline < now_ms {
        return None;
    }
    let mut s = StoredSession::default();
    if format >= 3 {
        s.owner = Some(c.str16()?).filter(|o| !o.is_empty());
    }
    let n = c.u16()?;
    for _ in 0..n {
        let filter = c.str16()?;
        let qos = c.u8()?;
        let options = c.u8()?;
        let id = if format >= 4 { c.u32()? } else { 0 };
        s.subs.push(wire::Subscription {
            filter,
            qos,
            no_local: options & 1 != 0,
            retain_as_published: format >= 4 && options & 2 != 0,
            retain_handling: if format >= 4 { (options >> 2) & 3 } else { 0 },
            id,
        });
    }
    s.cursors = get_cursors(&mut c)?;
    if format == 1 {
        return Some(s);
    }
    for _ in 0..c.u16()? {
        let filter = c.str16()?;
        let qos = c.u8()?;
        let id = if format >= 4 { c.u32()? } else { 0 };
        s.shared.push((filter, qos, id));
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

/// A shared subscription's position, format 2: the deadline after which no member session that
/// stored it is left (ms since the epoch, 0 = none), then its cursors. Format 1 (cursors only, no
/// deadline) is still read.
pub(super) fn encode_shared(deadline_ms: i64, cursors: &Cursors) -> Vec<u8> {
    let mut v = vec![2u8];
    v.extend_from_slice(&deadline_ms.to_be_bytes());
    put_cursors(&mut v, cursors);
    v
}

/// A shared subscription's (deadline, cursors); the deadline is unknown (`None`) in format 1.
pub(super) fn decode_shared(v: &[u8]) -> Option<(Option<i64>, Cursors)> {
    let mut c = Cut { v, at: 0 };
    let deadline = match c.u8()? {
        1 => None,
        2 => Some(c.i64()?),
        _ => return None,
    };
    Some((deadline, get_cursors(&mut c)?))
}

/// The later of two deadlines where 0 means "none" (never expires).
pub(super) fn later_deadline(a: i64, b: i64) -> i64 {
    if a == 0 || b == 0 {
        0
    } else {
        a.max(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StoredSession {
        StoredSession {
            owner: Some("alice".into()),
            subs: vec![
                wire::Subscription { filter: "meters/+/reading".into(), qos: 2, no_local: true, ..Default::default() },
                wire::Subscription {
                    filter: "valves/#".into(),
                    qos: 1,
                    retain_as_published: true,
                    retain_handling: 2,
                    id: wire::SUBSCRIPTION_ID_MAX,
                    ..Default::default()
                },
            ],
            cursors: HashMap::from([(("mqtt".to_string(), 3), 42)]),
            shared: vec![("$share/g/meters/#".into(), 1, 7)],
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
    fn format_3_still_reads_without_subscription_options() {
        let mut v = vec![3u8];
        v.extend_from_slice(&0i64.to_be_bytes());
        put_str16(&mut v, "alice");
        v.extend_from_slice(&1u16.to_be_bytes());
        put_str16(&mut v, "meters/#");
        v.extend_from_slice(&[1, 1]);
        put_cursors(&mut v, &HashMap::new());
        v.extend_from_slice(&1u16.to_be_bytes());
        put_str16(&mut v, "$share/g/a");
        v.push(2);
        v.extend_from_slice(&0u16.to_be_bytes());
        let s = decode_session(&v, 0).expect("format 3");
        let sub = wire::Subscription { filter: "meters/#".into(), qos: 1, no_local: true, ..Default::default() };
        assert_eq!(s.subs, vec![sub]);
        assert_eq!(s.shared, vec![("$share/g/a".to_string(), 2, 0)]);
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

    /// Format 3, as the previous release wrote it (no subscription options or identifiers).
    fn encode_v3(deadline_ms: i64, s: &StoredSession) -> Vec<u8> {
        let mut v = vec![3u8];
        v.extend_from_slice(&deadline_ms.to_be_bytes());
        put_str16(&mut v, s.owner.as_deref().unwrap_or(""));
        v.extend_from_slice(&(s.subs.len() as u16).to_be_bytes());
        for sub in &s.subs {
            put_str16(&mut v, &sub.filter);
            v.extend_from_slice(&[sub.qos, u8::from(sub.no_local)]);
        }
        put_cursors(&mut v, &s.cursors);
        v.extend_from_slice(&(s.shared.len() as u16).to_be_bytes());
        for (filter, qos, _) in &s.shared {
            put_str16(&mut v, filter);
            v.push(*qos);
        }
        let full = encode_session(deadline_ms, &StoredSession { inflight: s.inflight.clone(), ..Default::default() });
        // The messages in flight are encoded as before: the tail after the empty lists.
        v.extend_from_slice(&full[9 + 2 + 2 + 2 + 2..]);
        v
    }

    /// The sample as format 3 could hold it.
    fn sample_v3() -> StoredSession {
        let mut s = sample();
        for sub in &mut s.subs {
            *sub = wire::Subscription {
                filter: sub.filter.clone(),
                qos: sub.qos,
                no_local: sub.no_local,
                ..Default::default()
            };
        }
        for g in &mut s.shared {
            g.2 = 0;
        }
        s
    }

    #[test]
    fn format_3_of_the_sample_still_reads() {
        let s = sample_v3();
        assert_eq!(decode_session(&encode_v3(0, &s), 0), Some(s));
    }

    #[test]
    fn format_2_still_reads_without_an_owner() {
        let mut s = sample_v3();
        let v3 = encode_v3(0, &s);
        // Format 2 is format 3 without the owner field.
        let mut v2 = vec![2u8];
        v2.extend_from_slice(&v3[1..9]);
        v2.extend_from_slice(&v3[9 + 2 + "alice".len()..]);
        s.owner = None;
        assert_eq!(decode_session(&v2, 0), Some(s.clone()));
        assert_eq!(session_deadline(&v2), Some(0));
        assert_eq!(decode_session(&encode_session(0, &s), 0), Some(s), "no owner round-trips as none");
    }

    #[test]
    fn shared_position_round_trip() {
        let c = HashMap::from([(("t".to_string(), 1), 9), (("u".to_string(), 0), 0)]);
        assert_eq!(decode_shared(&encode_shared(77, &c)), Some((Some(77), c.clone())));
        // Format 1, as the previous release stored it: no deadline.
        let mut v1 = vec![1u8];
        put_cursors(&mut v1, &c);
        assert_eq!(decode_shared(&v1), Some((None, c)));
        assert_eq!(decode_shared(&[3]), None);
        assert_eq!(later_deadline(5, 9), 9);
        assert_eq!(later_deadline(0, 9), 0, "none is later than any deadline");
    }

    /// Client ids that embarrassed the previous encoding: NUL inside, one a prefix of another,
    /// equal lengths, the empty id.
    fn tricky_ids() -> Vec<String> {
        let mut ids: Vec<String> =
            ["", "v", "victim", "victim\0", "victim\0x", "victim\0\0", "victim0", "victim\0x\0\x01", "\0", "ab", "ba"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        ids.push("x".repeat(300));
        ids.push("x".repeat(301));
        ids
    }

    #[test]
    fn keys_are_injective_and_a_clients_prefix_holds_only_its_own_keys() {
        let ids = tricky_ids();
        let pkids = [0u16, 1, 0x0078, 0x7800, 0xffff];
        let mut seen = HashMap::new();
        for id in &ids {
            for key in [session_key(id), shared_key(id)] {
                assert!(seen.insert(key, (id.clone(), None)).is_none(), "{id:?}: key reused");
            }
            for p in pkids {
                let key = qos2_key(id, p);
                assert!(seen.insert(key.clone(), (id.clone(), Some(p))).is_none(), "{id:?}/{p}: key reused");
                assert_eq!(qos2_pkid(&qos2_prefix(id), &key), Some(p));
            }
        }
        // A scan of one client's prefix finds only that client's keys, whatever the others are.
        for id in &ids {
            let prefix = qos2_prefix(id);
            for (key, (owner, pkid)) in &seen {
                if let (true, Some(p)) = (key.starts_with(&prefix), pkid) {
                    assert_eq!((owner, qos2_pkid(&prefix, key)), (id, Some(*p)), "{id:?} found {key:?}");
                }
            }
        }
        assert_eq!(session_client(&session_key("victim\0x")), Some("victim\0x"));
    }

    #[test]
    fn legacy_qos2_keys_of_another_client_are_not_taken_for_ones_own() {
        // Stored by the previous release: client "victim\0x" with packet id 7.
        let planted = legacy_qos2_key("victim\0x", 7);
        assert!(planted.starts_with(&legacy_qos2_prefix("victim")), "the old encoding was ambiguous");
        assert_eq!(qos2_pkid(&legacy_qos2_prefix("victim"), &planted), None, "but it is not victim's");
        assert_eq!(qos2_pkid(&legacy_qos2_prefix("victim\0x"), &planted), Some(7));
        assert!(!qos2_key("victim", 7).starts_with(LEGACY_QOS2_TAG), "new keys never look like old ones");
    }
}
