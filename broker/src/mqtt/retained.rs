//! Retained messages, without I/O: an in-memory index of the retained topics (topic -> the
//! offset of its record in the `mqtt.retained` log topic, its size and expiry), so that the limits
//! (`mqtt.retained_messages_max`, `mqtt.retained_bytes_max`) are checked without reading the store,
//! and a subscription's retained messages are found page by page by a cursor that reads only the
//! topics its filter can match. The messages themselves are records of that compacted topic
//! (`routes::RETAINED_TOPIC`); the index is rebuilt from it at start-up and then follows it in
//! offset order (`RetainedIndex::follow`), whoever appends to it. The index costs about
//! (topic length + 80) bytes per retained message, bounded by `mqtt.retained_messages_max`.
//! Also the decoder of the previous releases' `kv.mqtt_retained` values, read once to migrate them.

use std::collections::BTreeMap;
use std::ops::Bound;

use bytes::Bytes;

use super::topic;
use super::wire::PublishProps;

/// Bytes a retained message is counted for: its record's key (the topic), value (the payload)
/// and headers (its QoS and properties), the same when published and when read back at start-up.
pub(super) fn stored_size(topic: &[u8], payload_len: usize, headers: &[(String, Option<Bytes>)]) -> u64 {
    let h: usize = headers.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, Bytes::len)).sum();
    (topic.len() + payload_len + h) as u64
}

/// First byte of a `kv.mqtt_retained` value in format 2. Format 1 starts with the QoS, 0 to 2.
/// Both are only read now, to migrate them into the log topic.
const VALUE_FORMAT_2: u8 = 0x12;

/// A retained message as the previous releases stored it in `kv.mqtt_retained`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RetainedValue {
    pub qos: u8,
    /// When its Message Expiry passes (ms since the epoch), if it has one.
    pub expires_ms: Option<i64>,
    /// Its MQTT 5 properties (without the expiry, kept as `expires_ms`).
    pub props: PublishProps,
    pub payload: Bytes,
}

#[cfg(test)]
fn put_bytes16(v: &mut Vec<u8>, b: &[u8]) {
    let n = b.len().min(usize::from(u16::MAX));
    v.extend_from_slice(&(n as u16).to_be_bytes());
    v.extend_from_slice(&b[..n]);
}

#[cfg(test)]
fn put_opt16(v: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        Some(b) => {
            v.push(1);
            put_bytes16(v, b);
        }
        None => v.push(0),
    }
}

/// Format 2: tag, QoS, expiry (ms since the epoch, i64, 0 = none), payload format (0xFF = none),
/// content type, correlation data, response topic (each: 0, or 1 and a u16-prefixed string),
/// user properties (u16 count, u16-prefixed pairs), then the payload.
/// A message without properties or expiry keeps format 1 (QoS, payload): one byte of overhead.
/// (Written by the previous releases; here for the tests.)
#[cfg(test)]
pub(super) fn encode_value(v: &RetainedValue) -> Vec<u8> {
    let p = &v.props;
    if v.expires_ms.is_none() && *p == PublishProps::default() {
        let mut out = Vec::with_capacity(1 + v.payload.len());
        out.push(v.qos);
        out.extend_from_slice(&v.payload);
        return out;
    }
    let mut out = Vec::with_capacity(32 + v.payload.len());
    out.extend_from_slice(&[VALUE_FORMAT_2, v.qos]);
    out.extend_from_slice(&v.expires_ms.unwrap_or(0).to_be_bytes());
    out.push(p.payload_format.unwrap_or(0xFF));
    put_opt16(&mut out, p.content_type.as_deref().map(str::as_bytes));
    put_opt16(&mut out, p.correlation_data.as_deref());
    put_opt16(&mut out, p.response_topic.as_deref().map(str::as_bytes));
    let n = p.user_properties.len().min(usize::from(u16::MAX));
    out.extend_from_slice(&(n as u16).to_be_bytes());
    for (k, val) in p.user_properties.iter().take(n) {
        put_bytes16(&mut out, k.as_bytes());
        put_bytes16(&mut out, val.as_bytes());
    }
    out.extend_from_slice(&v.payload);
    out
}

/// A bounds-checked reader over a stored value.
struct Cut<'a> {
    v: &'a [u8],
    at: usize,
}

impl<'a> Cut<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let b = self.v.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(b)
    }
    fn bytes16(&mut self) -> Option<&'a [u8]> {
        let n = u16::from_be_bytes(self.take(2)?.try_into().ok()?);
        self.take(usize::from(n))
    }
    fn opt(&mut self) -> Option<Option<&'a [u8]>> {
        match self.take(1)?[0] {
            0 => Some(None),
            _ => Some(Some(self.bytes16()?)),
        }
    }
}

/// A `kv.mqtt_retained` value of either format, if it can be read.
pub(super) fn decode_value(v: &[u8]) -> Option<RetainedValue> {
    let (&first, rest) = v.split_first()?;
    if first <= 2 {
        let payload = Bytes::copy_from_slice(rest);
        return Some(RetainedValue { qos: first, expires_ms: None, props: PublishProps::default(), payload });
    }
    if first != VALUE_FORMAT_2 {
        return None;
    }
    let mut c = Cut { v: rest, at: 0 };
    let qos = c.take(1)?[0];
    let expires = i64::from_be_bytes(c.take(8)?.try_into().ok()?);
    let format = c.take(1)?[0];
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).ok();
    let content_type = match c.opt()? {
        Some(b) => Some(text(b)?),
        None => None,
    };
    let correlation_data = c.opt()?.map(Bytes::copy_from_slice);
    let response_topic = match c.opt()? {
        Some(b) => Some(text(b)?),
        None => None,
    };
    let n = u16::from_be_bytes(c.take(2)?.try_into().ok()?);
    let mut user_properties = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let k = text(c.bytes16()?)?;
        user_properties.push((k, text(c.bytes16()?)?));
    }
    let at = c.at;
    let payload = Bytes::copy_from_slice(rest.get(at..)?);
    let props = PublishProps {
        content_type,
        correlation_data,
        response_topic,
        user_properties,
        payload_format: (format != 0xFF).then_some(format),
        ..PublishProps::default()
    };
    Some(RetainedValue { qos, expires_ms: (expires != 0).then_some(expires), props, payload })
}

/// The retained topics, their records' offsets, sizes and expiry deadlines (ms since the epoch),
/// as of the latest publish (committed or not). It follows the retained topic in offset order
/// (`follow`): records any writer appends there (this server's publishes, a Kafka producer, a
/// restore) reach it without a restart.
#[derive(Debug)]
pub(super) struct RetainedIndex {
    topics: BTreeMap<String, Entry>,
    bytes: u64,
    count_max: usize,
    bytes_max: u64,
    /// Tells updates apart (two publishes of the same size and expiry are two entries).
    next_seq: u64,
    /// Clears (an empty retained payload, an expiry) of this server by topic: their topics are
    /// gone from `topics`, and the follower must not bring back a record older than them.
    clears: BTreeMap<String, Clear>,
    /// Every record of the retained topic below this offset has been followed.
    followed: i64,
    /// Clears this server is writing or wrote are kept until the follower has read past their
    /// tombstones (see `RetainedIndex::follow`): at most this many written ones
    /// (`mqtt.retained_clears_max`); beyond it the oldest go (the follower's reading in order
    /// still ends at the right state, a new subscriber may get an older message meanwhile).
    clears_max: usize,
}

/// A retained message in the index: its size, when it expires, and the offset of the record to
/// read for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    size: u64,
    expires_ms: Option<i64>,
    /// The committed record holding the topic's message: while a publish is being committed it
    /// is still the latest committed one's (what a scan sends meanwhile, as before the publish);
    /// `None` for a topic with nothing committed to send yet.
    offset: Option<i64>,
    seq: u64,
    /// A publish of this server is being committed (`settle` or `undo` ends it).
    pending: bool,
    /// The latest record the follower read while the publish was pending: what the topic holds
    /// if the publish fails, or if that record came after it.
    newer: Option<Committed>,
}

/// A record of the retained topic as the index takes it: a message of `size` bytes (`None`: a
/// tombstone) at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Committed {
    pub offset: i64,
    pub size: Option<u64>,
    pub expires_ms: Option<i64>,
}

/// A clear of this server: its update's `seq`, the offset of its tombstone once committed, and
/// the latest record the follower read while it was being committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Clear {
    seq: u64,
    at: Option<i64>,
    newer: Option<Committed>,
}

/// A change made to the index, kept to undo it if its commit fails, or to settle it (learn its
/// record's offset) once committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Update {
    pub topic: String,
    previous: Option<Entry>,
    now: Option<Entry>,
    seq: u64,
}

impl RetainedIndex {
    pub fn new(count_max: usize, bytes_max: u64, clears_max: usize) -> Self {
        Self {
            topics: BTreeMap::new(),
            bytes: 0,
            count_max,
            bytes_max,
            next_seq: 0,
            clears: BTreeMap::new(),
            followed: 0,
            clears_max,
        }
    }

    /// A record of the retained topic read at start-up, in offset order: a message (`Some(size)`)
    /// or a tombstone (`None`). Counted whatever the limits say now, except that a topic beyond
    /// `mqtt.retained_messages_max` is not taken (returns false): the index stays bounded even
    /// if other writers filled the topic.
    pub fn load(&mut self, topic: &str, offset: i64, size: Option<u64>, expires_ms: Option<i64>) -> bool {
        self.follow(topic, Committed { offset, size, expires_ms })
    }

    /// The retained topic was deleted: every retained message went with it, and following
    /// starts again at offset 0 of the topic created next.
    pub fn reset(&mut self) {
        self.topics.clear();
        self.clears.clear();
        self.bytes = 0;
        self.followed = 0;
    }

    /// Where following the retained topic goes on: every record below is in the index.
    pub fn followed(&self) -> i64 {
        self.followed
    }

    /// The follower read every record below `offset`: clears whose tombstones lie below it
    /// protect nothing any more.
    pub fn set_followed(&mut self, offset: i64) {
        self.followed = self.followed.max(offset);
        let followed = self.followed;
        self.clears.retain(|_, c| c.at.is_none_or(|at| at >= followed));
    }

    /// A record of the retained topic, read in offset order by the follower (and at start-up):
    /// the topic's latest committed record, unless the index already knows a later one (this
    /// server's own publishes are in the index from their commit on, before the follower reads
    /// them) or a clear of this server is being committed or came after it. A record read while
    /// a publish of the topic is being committed is kept aside for `settle`/`undo`. Counted
    /// whatever the limits say now, but a topic beyond `mqtt.retained_messages_max` is not
    /// taken (returns false).
    pub fn follow(&mut self, topic: &str, c: Committed) -> bool {
        if let Some(clear) = self.clears.get_mut(topic) {
            match clear.at {
                None => {
                    clear.newer = Some(c);
                    if let Some(e) = self.topics.get_mut(topic).filter(|e| e.pending) {
                        e.newer = Some(c);
                    }
                    return true;
                }
                Some(at) if c.offset <= at => return true,
                Some(_) => {}
            }
        }
        match self.topics.get_mut(topic) {
            Some(e) if e.offset.is_some_and(|known| known >= c.offset) => true,
            Some(e) if e.pending => {
                e.newer = Some(c);
                e.offset = c.size.map(|_| c.offset);
                true
            }
            _ => self.take(topic, c),
        }
    }

    /// The topic's latest committed record is `c`.
    fn take(&mut self, topic: &str, c: Committed) -> bool {
        let Some(size) = c.size else {
            self.set(topic, None);
            return true;
        };
        if !self.topics.contains_key(topic) && self.topics.len() >= self.count_max {
            return false;
        }
        let seq = self.seq();
        let entry = Entry { size, expires_ms: c.expires_ms, offset: Some(c.offset), seq, pending: false, newer: None };
        self.set(topic, Some(entry));
        true
    }

    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    pub fn count(&self) -> usize {
        self.topics.len()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether the topic has a retained message (committed or being committed).
    pub fn contains(&self, topic: &str) -> bool {
        self.topics.contains_key(topic)
    }

    /// Sets (`Some(size)`) or clears (`None`) a topic's retained message if the limits allow; the
    /// error names the limit. Replacing a message with a smaller one is always allowed.
    #[cfg(test)]
    pub fn update(&mut self, topic: &str, size: Option<u64>) -> Result<Update, &'static str> {
        self.update_expiring(topic, size, None)
    }

    /// [`RetainedIndex::update`] for a message that expires at `expires_ms`.
    pub fn update_expiring(
        &mut self,
        topic: &str,
        size: Option<u64>,
        expires_ms: Option<i64>,
    ) -> Result<Update, &'static str> {
        let previous = self.topics.get(topic).copied();
        let before = previous.map_or(0, |e| e.size);
        if let Some(size) = size {
            if previous.is_none() && self.topics.len() >= self.count_max {
                return Err("mqtt.retained_messages_max");
            }
            let after = self.bytes - before + size;
            if size > before && after > self.bytes_max {
                return Err("mqtt.retained_bytes_max");
            }
        }
        let seq = self.seq();
        let offset = previous.and_then(|e| e.offset);
        let now = size.map(|size| Entry { size, expires_ms, offset, seq, pending: true, newer: None });
        self.set(topic, now);
        if now.is_none() {
            self.clear_pending(topic, seq);
        }
        Ok(Update { topic: topic.to_string(), previous, now, seq })
    }

    /// A clear of `topic` is being committed.
    fn clear_pending(&mut self, topic: &str, seq: u64) {
        if self.clears.len() >= self.clears_max {
            let done = self.clears.iter().filter_map(|(t, c)| c.at.map(|at| (at, t.clone()))).min();
            if let Some((_, t)) = done {
                self.clears.remove(&t);
            }
        }
        self.clears.insert(topic.to_string(), Clear { seq, at: None, newer: None });
    }

    /// Clears `topic` if its latest message (committed or still being committed) expired by
    /// `now_ms`; the update to undo if the deletion's commit fails.
    pub fn take_expired(&mut self, topic: &str, now_ms: i64) -> Option<Update> {
        let previous = self.topics.get(topic).copied()?;
        if previous.expires_ms.is_none_or(|d| d > now_ms) {
            return None;
        }
        self.set(topic, None);
        let seq = self.seq();
        self.clear_pending(topic, seq);
        Some(Update { topic: topic.to_string(), previous: Some(previous), now: None, seq })
    }

    /// Undoes an update whose commit failed, unless the topic was changed again since (then that
    /// later change stands). A record the follower read meanwhile is what the topic holds then.
    pub fn undo(&mut self, u: &Update) {
        match u.now {
            Some(_) => {
                let Some(e) = self.topics.get(&u.topic).copied().filter(|e| e.seq == u.seq) else { return };
                match e.newer {
                    Some(c) => {
                        self.take(&u.topic, c);
                    }
                    None => self.set(&u.topic, u.previous),
                }
            }
            None => {
                let Some(clear) = self.clears.get(&u.topic).copied().filter(|c| c.seq == u.seq) else { return };
                self.clears.remove(&u.topic);
                if self.topics.contains_key(&u.topic) {
                    return;
                }
                match clear.newer {
                    Some(c) => {
                        self.take(&u.topic, c);
                    }
                    None => self.set(&u.topic, u.previous),
                }
            }
        }
    }

    /// An update committed with its record at `offset`: a scan reads that record from now on,
    /// unless the topic was changed again since (then the later change settles it) or the
    /// follower read a later record of the topic meanwhile (then that one stands).
    pub fn settle(&mut self, u: &Update, offset: i64) {
        match u.now {
            Some(_) => {
                let Some(e) = self.topics.get_mut(&u.topic).filter(|e| e.seq == u.seq) else { return };
                match e.newer.take() {
                    Some(c) if c.offset > offset => {
                        self.take(&u.topic, c);
                    }
                    _ => {
                        e.offset = Some(offset);
                        e.pending = false;
                    }
                }
            }
            None => {
                let Some(clear) = self.clears.get_mut(&u.topic).filter(|c| c.seq == u.seq) else { return };
                clear.at = Some(offset);
                if let Some(c) = clear.newer.take().filter(|c| c.offset > offset) {
                    if !self.topics.contains_key(&u.topic) {
                        self.take(&u.topic, c);
                    }
                }
                if offset < self.followed {
                    self.clears.remove(&u.topic);
                }
            }
        }
    }

    /// The record at `offset` is gone (retention or DeleteRecords removed it, or it is not the
    /// topic's message): the topic is forgotten unless it has a newer message since.
    pub fn forget(&mut self, topic: &str, offset: i64) {
        if self.topics.get(topic).is_some_and(|e| e.offset == Some(offset)) {
            self.set(topic, None);
        }
    }

    fn set(&mut self, topic: &str, entry: Option<Entry>) {
        let old = match entry {
            Some(e) => self.topics.insert(topic.to_string(), e),
            None => self.topics.remove(topic),
        };
        self.bytes = self.bytes - old.map_or(0, |e| e.size) + entry.map_or(0, |e| e.size);
    }

    /// The next page of `scan`: at most `examine` topics after its cursor are looked at, and of
    /// those matching its filter at most `take`, and no more than `bytes_max` stored bytes (but at
    /// least one), are returned. The cursor moves past the last topic looked at; `scan.done()`
    /// once none is left. A topic whose first message is still being committed is not returned
    /// (it has no record yet; a subscriber gets it from the log like any new message).
    pub fn page(&self, scan: &mut RetainedScan, examine: usize, take: usize, bytes_max: u64) -> Vec<(String, i64)> {
        let mut out = Vec::new();
        if scan.done {
            return out;
        }
        let start = match &scan.after {
            Some(after) => Bound::Excluded(after.as_str()),
            None => Bound::Included(scan.prefix.as_str()),
        };
        let (mut examined, mut bytes) = (0, 0);
        for (t, Entry { size, offset, .. }) in self.topics.range::<str, _>((start, Bound::Unbounded)) {
            if !t.starts_with(&scan.prefix) {
                break;
            }
            examined += 1;
            if let Some(offset) = offset.filter(|_| topic::matches(t, &scan.filter)) {
                out.push((t.clone(), offset));
                bytes += size;
            }
            if out.len() >= take || examined >= examine || bytes >= bytes_max {
                scan.after = Some(t.clone());
                return out;
            }
        }
        scan.done = true;
        out
    }
}

/// Where a subscription's retained messages are being sent from: its filter, granted QoS, and
/// the last topic looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RetainedScan {
    pub filter: String,
    pub qos: u8,
    /// Every topic the filter matches starts with this (the filter up to its first wildcard).
    prefix: String,
    after: Option<String>,
    done: bool,
}

impl RetainedScan {
    pub fn new(filter: &str, qos: u8) -> Self {
        let literal = filter.find(['+', '#']).map_or(filter, |i| &filter[..i]);
        // `a/#` also matches `a`: the prefix stops before the separator.
        let prefix = if literal.len() < filter.len() { literal.trim_end_matches('/') } else { literal };
        Self { filter: filter.to_string(), qos, prefix: prefix.to_string(), after: None, done: false }
    }

    pub fn done(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retained_values_keep_every_property_and_format_1_still_reads_mqtt_3_3_1_3() {
        let v = RetainedValue {
            qos: 1,
            expires_ms: Some(1_700_000_000_000),
            props: PublishProps {
                content_type: Some("text/plain".into()),
                correlation_data: Some(Bytes::from_static(b"\x00\x01")),
                response_topic: Some("replies/7".into()),
                user_properties: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
                payload_format: Some(1),
                ..PublishProps::default()
            },
            payload: Bytes::from_static(b"hello"),
        };
        let bytes = encode_value(&v);
        assert_eq!(decode_value(&bytes), Some(v));
        for cut in 0..bytes.len() - 5 {
            assert_eq!(decode_value(&bytes[..cut]), None, "cut at {cut}");
        }
        let plain = RetainedValue {
            qos: 2,
            expires_ms: None,
            props: PublishProps::default(),
            payload: Bytes::from_static(b"old"),
        };
        assert_eq!(encode_value(&plain), b"\x02old", "no properties: format 1");
        assert_eq!(decode_value(b"\x02old"), Some(plain), "format 1: QoS, payload");
        assert_eq!(decode_value(b"\x07"), None);
    }

    fn index(topics: &[&str]) -> RetainedIndex {
        let mut ix = RetainedIndex::new(1000, 1 << 20, 4096);
        for (i, t) in topics.iter().enumerate() {
            assert!(ix.load(t, i as i64, Some(10), None));
        }
        ix
    }

    #[test]
    fn limits_on_count_and_bytes_name_their_key() {
        let mut ix = RetainedIndex::new(2, 100, 4096);
        ix.update("a", Some(40)).expect("room");
        ix.update("b", Some(40)).expect("room");
        assert_eq!(ix.update("c", Some(1)), Err("mqtt.retained_messages_max"));
        assert_eq!(ix.update("a", Some(61)), Err("mqtt.retained_bytes_max"));
        ix.update("a", Some(60)).expect("exactly the budget");
        assert_eq!((ix.count(), ix.bytes()), (2, 100));
        ix.update("b", None).expect("clearing is always allowed");
        ix.update("c", Some(40)).expect("a freed slot");
        assert_eq!((ix.count(), ix.bytes()), (2, 100));
        // Over the limit after a config change: shrinking is still allowed.
        let mut small = RetainedIndex::new(10, 10, 4096);
        assert!(small.load("x", 0, Some(50), None));
        small.update("x", Some(20)).expect("smaller");
        assert_eq!(small.update("x", Some(21)), Err("mqtt.retained_bytes_max"));
    }

    #[test]
    fn a_failed_commit_is_undone_unless_a_later_change_stands() {
        let mut ix = RetainedIndex::new(10, 1000, 4096);
        let first = ix.update("t", Some(10)).expect("room");
        let second = ix.update("t", Some(30)).expect("room");
        ix.undo(&first);
        assert_eq!(ix.bytes(), 30, "the later change stands");
        ix.undo(&second);
        assert_eq!((ix.count(), ix.bytes()), (1, 10));
        let clear = ix.update("t", None).expect("clear");
        ix.undo(&clear);
        assert_eq!((ix.count(), ix.bytes()), (1, 10), "the clear is undone");
    }

    /// [MQTT-3.3.2-5]: an expired retained message is deleted when a scan finds it; only if the
    /// topic's latest message (even one still being committed) is the expired one.
    #[test]
    fn only_a_topic_whose_latest_message_expired_is_cleared() {
        let mut ix = RetainedIndex::new(10, 1000, 4096);
        ix.update_expiring("old", Some(10), Some(1_000)).expect("room");
        ix.update_expiring("later", Some(10), Some(5_000)).expect("room");
        ix.update_expiring("never", Some(10), None).expect("room");
        ix.update_expiring("replaced", Some(10), Some(1_000)).expect("room");
        ix.update_expiring("replaced", Some(20), None).expect("a newer message without expiry");
        let cleared: Vec<String> = ["old", "later", "never", "replaced", "absent"]
            .iter()
            .filter_map(|t| ix.take_expired(t, 2_000))
            .map(|u| u.topic)
            .collect();
        assert_eq!(cleared, ["old"]);
        assert_eq!((ix.count(), ix.bytes()), (3, 40));
        // A failed deletion is undone, unless the topic was published again meanwhile.
        let mut ix = RetainedIndex::new(10, 1000, 4096);
        ix.update_expiring("t", Some(10), Some(1_000)).expect("room");
        let deletion = ix.take_expired("t", 2_000).expect("expired");
        ix.undo(&deletion);
        assert_eq!((ix.count(), ix.bytes()), (1, 10));
        let deletion = ix.take_expired("t", 2_000).expect("expired");
        ix.update_expiring("t", Some(30), None).expect("room");
        ix.undo(&deletion);
        assert_eq!((ix.count(), ix.bytes()), (1, 30), "the newer message stands");
    }

    #[test]
    fn pages_cover_every_match_once_and_read_only_the_filters_prefix() {
        let ix = index(&["a", "a/1", "a/2", "a/2/x", "ab/1", "b/1", "$SYS/x", "c/a/1"]);
        let all = |filter: &str, examine: usize, take: usize| {
            let mut scan = RetainedScan::new(filter, 1);
            let mut got = Vec::new();
            let mut pages = 0;
            while !scan.done() {
                got.extend(ix.page(&mut scan, examine, take, u64::MAX).into_iter().map(|(t, _)| t));
                pages += 1;
                assert!(pages < 100, "no progress");
            }
            (got, pages)
        };
        assert_eq!(all("a/#", 1, 1).0, vec!["a", "a/1", "a/2", "a/2/x"]);
        assert_eq!(all("a/+", 2, 10).0, vec!["a/1", "a/2"]);
        assert_eq!(all("#", 3, 2).0, vec!["a", "a/1", "a/2", "a/2/x", "ab/1", "b/1", "c/a/1"], "no $ topics");
        assert_eq!(all("+/1", 100, 100).0, vec!["a/1", "ab/1", "b/1"]);
        assert_eq!(all("b/1", 100, 100), (vec!["b/1".to_string()], 1));
        // A filter matching nothing looks only at the topics under its prefix.
        let mut scan = RetainedScan::new("zz/+/y", 1);
        assert!(ix.page(&mut scan, 1, 1, u64::MAX).is_empty() && scan.done());
        // A page stops at its byte limit (each message here is 10 bytes), but takes one at least.
        let mut scan = RetainedScan::new("a/#", 1);
        let names = |page: Vec<(String, i64)>| page.into_iter().map(|(t, _)| t).collect::<Vec<_>>();
        assert_eq!(names(ix.page(&mut scan, 100, 100, 25)), vec!["a", "a/1", "a/2"]);
        assert_eq!(ix.page(&mut scan, 100, 100, 1), vec![("a/2/x".to_string(), 3)], "with its record's offset");
        assert_eq!(all("$SYS/#", 100, 100).0, vec!["$SYS/x"]);
    }

    /// The index rebuilt from the retained topic at start-up: records in offset order, the latest
    /// per topic wins, a tombstone (null value, [MQTT-3.3.1-6/7]) clears the topic, and no more
    /// topics than `mqtt.retained_messages_max` are taken.
    #[test]
    fn rebuilt_from_the_topic_the_latest_record_per_topic_wins_and_tombstones_clear() {
        let mut ix = RetainedIndex::new(3, 1000, 4096);
        assert!(ix.load("a", 0, Some(10), None));
        assert!(ix.load("b", 1, Some(20), Some(5_000)));
        assert!(ix.load("a", 2, Some(30), None));
        assert!(ix.load("b", 3, None, None), "a tombstone");
        assert!(ix.load("c", 4, Some(5), None));
        assert!(ix.load("d", 5, Some(5), None));
        assert!(!ix.load("e", 6, Some(5), None), "over the count limit");
        assert!(ix.load("a", 7, Some(1), None), "a known topic is always taken");
        assert_eq!((ix.count(), ix.bytes()), (3, 11));
        let mut scan = RetainedScan::new("#", 1);
        let page = ix.page(&mut scan, 100, 100, u64::MAX);
        assert_eq!(page, vec![("a".to_string(), 7), ("c".to_string(), 4), ("d".to_string(), 5)]);
    }

    /// While a publish is being committed a scan still reads the previous record (a topic's first
    /// message not at all); once committed, its own; a failed commit leaves the previous one.
    #[test]
    fn a_scan_reads_the_committed_record_and_settling_moves_it() {
        let offsets = |ix: &RetainedIndex| {
            let mut scan = RetainedScan::new("#", 1);
            ix.page(&mut scan, 100, 100, u64::MAX).into_iter().map(|(_, o)| o).collect::<Vec<_>>()
        };
        let mut ix = RetainedIndex::new(10, 1000, 4096);
        let first = ix.update("t", Some(10)).expect("room");
        assert!(offsets(&ix).is_empty(), "not committed yet");
        ix.settle(&first, 4);
        assert_eq!(offsets(&ix), [4]);
        let second = ix.update("t", Some(10)).expect("room");
        let third = ix.update("t", Some(10)).expect("room");
        assert_eq!(offsets(&ix), [4], "the committed record meanwhile");
        ix.settle(&second, 8);
        assert_eq!(offsets(&ix), [4], "a later update of the same size is not settled by an earlier commit");
        ix.settle(&third, 9);
        assert_eq!(offsets(&ix), [9]);
        // A record that is gone is forgotten, unless the topic changed since.
        ix.forget("t", 4);
        assert_eq!(offsets(&ix), [9]);
        ix.forget("t", 9);
        assert_eq!((ix.count(), ix.bytes()), (0, 0));
    }
    fn msg(offset: i64, size: u64) -> Committed {
        Committed { offset, size: Some(size), expires_ms: None }
    }

    fn tomb(offset: i64) -> Committed {
        Committed { offset, size: None, expires_ms: None }
    }

    fn offset_of(ix: &RetainedIndex, topic: &str) -> Option<i64> {
        let mut scan = RetainedScan::new(topic, 1);
        ix.page(&mut scan, 10, 10, u64::MAX).first().map(|(_, o)| *o)
    }

    /// Issue 17: records any writer appends to the retained topic reach the index in offset
    /// order ([MQTT-3.3.1-6]: a new subscriber gets the latest; a tombstone clears, [MQTT-3.3.1-10]),
    /// and this server's own writes, which are in the index from their commit on, are never
    /// undone by the follower reading older records after them.
    #[test]
    fn the_index_follows_the_log_in_offset_order_around_this_servers_own_writes() {
        // Another writer's records: the latest per topic wins, a tombstone clears.
        let mut ix = RetainedIndex::new(2, 1000, 4096);
        assert!(ix.follow("a", msg(0, 10)));
        assert!(ix.follow("a", msg(1, 20)));
        assert!(ix.follow("b", msg(2, 5)));
        assert!(!ix.follow("c", msg(3, 5)), "beyond mqtt.retained_messages_max: not taken");
        assert!(ix.follow("b", tomb(4)));
        assert_eq!((ix.count(), ix.bytes(), offset_of(&ix, "a")), (1, 20, Some(1)));
        assert!(ix.follow("a", msg(1, 20)), "a record read twice changes nothing");
        assert_eq!((ix.count(), ix.bytes()), (1, 20));

        // This server's publish committed at 7 and settled before the follower reads 5..7: the
        // older record 5 of another writer does not replace it, its own record 7 changes nothing.
        let u = ix.update("a", Some(30)).expect("room");
        ix.settle(&u, 7);
        assert!(ix.follow("a", msg(5, 99)));
        assert!(ix.follow("a", msg(7, 30)));
        assert_eq!((offset_of(&ix, "a"), ix.bytes()), (Some(7), 30));
        // A later record of another writer (8) replaces it.
        assert!(ix.follow("a", msg(8, 40)));
        assert_eq!((offset_of(&ix, "a"), ix.bytes()), (Some(8), 40));

        // While a publish is pending, a scan reads the latest committed record the follower saw;
        // a record after the publish's (read before `settle` runs) stands after it.
        let u = ix.update("a", Some(50)).expect("room");
        assert!(ix.follow("a", msg(9, 60)), "committed before the publish");
        assert_eq!(offset_of(&ix, "a"), Some(9));
        assert!(ix.follow("a", msg(10, 50)), "the publish's own record");
        assert!(ix.follow("a", msg(11, 70)), "another writer's, after it");
        ix.settle(&u, 10);
        assert_eq!((offset_of(&ix, "a"), ix.bytes()), (Some(11), 70), "the later record stands");
        // A failed publish leaves what the follower read meanwhile.
        let u = ix.update("a", Some(80)).expect("room");
        assert!(ix.follow("a", tomb(12)));
        assert_eq!(offset_of(&ix, "a"), None, "a tombstone is the latest committed record");
        ix.undo(&u);
        assert_eq!((ix.count(), ix.bytes()), (0, 0), "the tombstone stands");

        // This server's clear: the follower, still behind, never brings back an older message.
        let mut ix = RetainedIndex::new(10, 1000, 4096);
        assert!(ix.follow("t", msg(0, 10)));
        let clear = ix.update("t", None).expect("clear");
        assert!(ix.follow("t", msg(1, 20)), "committed before the clear");
        assert_eq!(ix.count(), 0, "not brought back while the clear is being committed");
        ix.settle(&clear, 2);
        assert_eq!(ix.count(), 0);
        assert!(ix.follow("t", msg(1, 20)), "read again after the clear's commit");
        assert!(ix.follow("t", tomb(2)), "the clear's own tombstone");
        assert_eq!(ix.count(), 0, "older records do not bring it back");
        assert!(ix.follow("t", msg(3, 30)), "a later message does");
        assert_eq!((ix.count(), offset_of(&ix, "t")), (1, Some(3)));
        ix.set_followed(4);
        assert!(ix.clears.is_empty(), "a clear the follower passed is forgotten");
        // A failed clear leaves the latest record the follower read meanwhile.
        let clear = ix.update("t", None).expect("clear");
        assert!(ix.follow("t", msg(4, 40)));
        ix.undo(&clear);
        assert_eq!((ix.count(), offset_of(&ix, "t"), ix.bytes()), (1, Some(4), 40));
        assert!(ix.clears.is_empty());
    }

    /// `mqtt.retained_clears_max` bounds the clears kept for the follower: a written clear goes
    /// first, the oldest of them.
    #[test]
    fn written_clears_kept_stay_within_retained_clears_max() {
        let mut ix = RetainedIndex::new(10, 1000, 2);
        for (i, topic) in ["a", "b", "c"].into_iter().enumerate() {
            let i = i as i64;
            assert!(ix.follow(topic, msg(i, 10)));
        }
        for (i, topic) in ["a", "b", "c"].into_iter().enumerate() {
            let clear = ix.update(topic, None).expect("clear");
            ix.settle(&clear, 10 + i as i64);
        }
        assert_eq!(ix.clears.len(), 2, "{:?}", ix.clears);
        assert!(!ix.clears.contains_key("a"), "the oldest written clear was forgotten");
        assert!(ix.follow("b", msg(1, 10)) && ix.count() == 0, "a kept clear still holds back an older record");
    }
}
