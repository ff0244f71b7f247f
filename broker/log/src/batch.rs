//! Kafka RecordBatch v2, the storage and wire format: header parsing, validation of untrusted
//! batches (lengths, magic, CRC-32C, record count, every record's framing), the encoder for batches
//! the store builds from single records, and record decoding for readers.
//!
//! Why not the `kafka-protocol` crate's `RecordBatchEncoder/Decoder` here: its `Record` keeps
//! headers in an `IndexMap` (record headers may repeat a key, which it would merge)
//! and its decoder reserves memory from the untrusted `recordCount`. This codec walks records
//! without allocating from client-supplied counts and decompresses within a byte limit.

use bytes::Bytes;

use crate::compression::{self, CompressionError};
use crate::config::{Codec, TimestampKind};

/// Length of the RecordBatch v2 header, up to and including `recordCount`.
pub const HEADER_LEN: usize = 61;
const OFF_BATCH_LENGTH: usize = 8;
const OFF_LEADER_EPOCH: usize = 12;
const OFF_MAGIC: usize = 16;
const OFF_CRC: usize = 17;
const OFF_ATTRIBUTES: usize = 21;
const OFF_LAST_OFFSET_DELTA: usize = 23;
const OFF_BASE_TIMESTAMP: usize = 27;
const OFF_MAX_TIMESTAMP: usize = 35;
const OFF_PRODUCER_ID: usize = 43;
const OFF_PRODUCER_EPOCH: usize = 51;
const OFF_BASE_SEQUENCE: usize = 53;
const OFF_RECORD_COUNT: usize = 57;

const ATTR_TIMESTAMP_TYPE: i16 = 0x08;
const ATTR_TRANSACTIONAL: i16 = 0x10;
const ATTR_CONTROL: i16 = 0x20;

/// The smallest possible encoded record (length, attributes, deltas, null key/value, 0 headers).
const MIN_RECORD_LEN: usize = 7;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("batch of {0} bytes is shorter than the {HEADER_LEN}-byte RecordBatch header")]
    TooShort(usize),
    #[error("batchLength says {declared} bytes follow it but {actual} do")]
    LengthMismatch { declared: i64, actual: usize },
    #[error("magic byte {0} is not supported (only RecordBatch v2, magic 2)")]
    Magic(i8),
    #[error("CRC-32C mismatch: header says {expected:#010x}, the batch gives {actual:#010x}")]
    Crc { expected: u32, actual: u32 },
    #[error("unknown compression codec id {0}")]
    UnknownCodec(i16),
    #[error("control batches may only be written by the broker")]
    Control,
    #[error("transactional batches are not supported")]
    Transactional,
    #[error("recordCount {0} is not positive")]
    Empty(i32),
    #[error("lastOffsetDelta {last_offset_delta} does not match recordCount {record_count}")]
    LastOffsetDelta { last_offset_delta: i32, record_count: i32 },
    #[error("recordCount says {header} records but the batch holds {found}")]
    RecordCount { header: i32, found: u64 },
    #[error("record {index}: {reason}")]
    Record { index: u64, reason: &'static str },
    #[error(transparent)]
    Compression(#[from] CompressionError),
}

/// The fixed header of a RecordBatch v2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: i64,
    pub batch_length: i32,
    pub partition_leader_epoch: i32,
    pub magic: i8,
    pub crc: u32,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub record_count: i32,
}

fn be_i64(b: &[u8], at: usize) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    i64::from_be_bytes(a)
}
fn be_i32(b: &[u8], at: usize) -> i32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    i32::from_be_bytes(a)
}
fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}

impl BatchHeader {
    /// Reads the header fields; checks only that the header is there.
    pub fn parse(b: &[u8]) -> Result<Self, BatchError> {
        if b.len() < HEADER_LEN {
            return Err(BatchError::TooShort(b.len()));
        }
        Ok(Self {
            base_offset: be_i64(b, 0),
            batch_length: be_i32(b, OFF_BATCH_LENGTH),
            partition_leader_epoch: be_i32(b, OFF_LEADER_EPOCH),
            magic: b[OFF_MAGIC] as i8,
            crc: be_i32(b, OFF_CRC) as u32,
            attributes: be_i16(b, OFF_ATTRIBUTES),
            last_offset_delta: be_i32(b, OFF_LAST_OFFSET_DELTA),
            base_timestamp: be_i64(b, OFF_BASE_TIMESTAMP),
            max_timestamp: be_i64(b, OFF_MAX_TIMESTAMP),
            producer_id: be_i64(b, OFF_PRODUCER_ID),
            producer_epoch: be_i16(b, OFF_PRODUCER_EPOCH),
            base_sequence: be_i32(b, OFF_BASE_SEQUENCE),
            record_count: be_i32(b, OFF_RECORD_COUNT),
        })
    }

    pub fn codec(&self) -> Result<Codec, BatchError> {
        Codec::from_attribute_bits(self.attributes).ok_or(BatchError::UnknownCodec(self.attributes & 0x07))
    }
    pub fn is_transactional(&self) -> bool {
        self.attributes & ATTR_TRANSACTIONAL != 0
    }
    pub fn is_control(&self) -> bool {
        self.attributes & ATTR_CONTROL != 0
    }
    pub fn timestamp_kind(&self) -> TimestampKind {
        if self.attributes & ATTR_TIMESTAMP_TYPE != 0 {
            TimestampKind::LogAppendTime
        } else {
            TimestampKind::CreateTime
        }
    }
    /// Offset of the batch's last record.
    pub fn last_offset(&self) -> i64 {
        self.base_offset + i64::from(self.last_offset_delta)
    }
    /// Offset after the batch.
    pub fn next_offset(&self) -> i64 {
        self.last_offset() + 1
    }
    /// Whole batch length including the offset and length fields.
    pub fn total_len(&self) -> usize {
        self.batch_length.max(0) as usize + 12
    }
}

/// Checks an untrusted batch completely and returns its header. The batch must be exactly one
/// RecordBatch (`bytes.len()` equals its declared length).
pub fn validate(bytes: &[u8], decompressed_limit: u64) -> Result<BatchHeader, BatchError> {
    let h = BatchHeader::parse(bytes)?;
    if h.magic != 2 {
        return Err(BatchError::Magic(h.magic));
    }
    if i64::from(h.batch_length) + 12 != bytes.len() as i64 {
        return Err(BatchError::LengthMismatch {
            declared: i64::from(h.batch_length),
            actual: bytes.len().saturating_sub(12),
        });
    }
    let actual = crc32c::crc32c(&bytes[OFF_ATTRIBUTES..]);
    if actual != h.crc {
        return Err(BatchError::Crc { expected: h.crc, actual });
    }
    let codec = h.codec()?;
    if h.is_control() {
        return Err(BatchError::Control);
    }
    if h.is_transactional() {
        return Err(BatchError::Transactional);
    }
    if h.record_count <= 0 {
        return Err(BatchError::Empty(h.record_count));
    }
    if i64::from(h.last_offset_delta) != i64::from(h.record_count) - 1 {
        return Err(BatchError::LastOffsetDelta {
            last_offset_delta: h.last_offset_delta,
            record_count: h.record_count,
        });
    }
    let payload = &bytes[HEADER_LEN..];
    let found = if codec == Codec::None {
        count_records(payload, h.record_count)?
    } else {
        // A count that cannot fit in the decompression limit is refused before inflating.
        if h.record_count as u64 > decompressed_limit / MIN_RECORD_LEN as u64 {
            return Err(BatchError::RecordCount { header: h.record_count, found: 0 });
        }
        let data = compression::decompress(codec, payload, decompressed_limit)?;
        count_records(&data, h.record_count)?
    };
    if found != h.record_count as u64 {
        return Err(BatchError::RecordCount { header: h.record_count, found });
    }
    Ok(h)
}

/// Walks every record, checking framing and that offset deltas run 0, 1, 2, ...
fn count_records(data: &[u8], header_count: i32) -> Result<u64, BatchError> {
    let mut n = 0u64;
    for r in RecordIter::new(data) {
        let r = r?;
        if i64::from(r.offset_delta) != n as i64 {
            return Err(BatchError::Record { index: n, reason: "offset delta out of sequence" });
        }
        n += 1;
        if n > header_count as u64 {
            // Stop walking: the count already disagrees.
            return Ok(n);
        }
    }
    Ok(n)
}

/// Rewrites the base offset (not covered by the CRC).
pub fn set_base_offset(bytes: &mut [u8], base_offset: i64) {
    bytes[0..8].copy_from_slice(&base_offset.to_be_bytes());
}

/// Rewrites the partition leader epoch (not covered by the CRC).
pub fn set_leader_epoch(bytes: &mut [u8], epoch: i32) {
    bytes[OFF_LEADER_EPOCH..OFF_LEADER_EPOCH + 4].copy_from_slice(&epoch.to_be_bytes());
}

/// Marks a batch as LogAppendTime with `now_ms` as its max timestamp and recomputes the CRC;
/// the (possibly compressed) records are untouched.
pub fn stamp_log_append_time(bytes: &mut [u8], now_ms: i64) {
    let attrs = be_i16(bytes, OFF_ATTRIBUTES) | ATTR_TIMESTAMP_TYPE;
    bytes[OFF_ATTRIBUTES..OFF_ATTRIBUTES + 2].copy_from_slice(&attrs.to_be_bytes());
    bytes[OFF_MAX_TIMESTAMP..OFF_MAX_TIMESTAMP + 8].copy_from_slice(&now_ms.to_be_bytes());
    let crc = crc32c::crc32c(&bytes[OFF_ATTRIBUTES..]);
    bytes[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_be_bytes());
}

// ---- varints (Kafka uses zigzag-encoded LEB128) ----

fn read_uvarint(data: &[u8], pos: &mut usize, max_bytes: usize) -> Option<u64> {
    let mut result = 0u64;
    for i in 0..max_bytes {
        let b = *data.get(*pos)?;
        *pos += 1;
        result |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(result);
        }
    }
    None
}

fn read_varint(data: &[u8], pos: &mut usize) -> Option<i32> {
    let u = read_uvarint(data, pos, 5)? as u32;
    Some(((u >> 1) as i32) ^ -((u & 1) as i32))
}

fn read_varlong(data: &[u8], pos: &mut usize) -> Option<i64> {
    let u = read_uvarint(data, pos, 10)?;
    Some(((u >> 1) as i64) ^ -((u & 1) as i64))
}

fn write_varint(out: &mut Vec<u8>, v: i32) {
    write_uvarint(out, ((v << 1) ^ (v >> 31)) as u32 as u64);
}

fn write_varlong(out: &mut Vec<u8>, v: i64) {
    write_uvarint(out, ((v << 1) ^ (v >> 63)) as u64);
}

fn write_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
fn varint_len(v: i64) -> usize {
    let mut u = ((v << 1) ^ (v >> 63)) as u64;
    let mut n = 1;
    while u >= 0x80 {
        u >>= 7;
        n += 1;
    }
    n
}

/// One record inside a (decompressed) batch, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    pub offset_delta: i32,
    pub timestamp_delta: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    headers: &'a [u8],
    header_count: u32,
}

impl<'a> RecordView<'a> {
    /// Headers in order, repeated keys kept.
    pub fn headers(&self) -> impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)> + 'a {
        let data = self.headers;
        let mut pos = 0usize;
        (0..self.header_count).map_while(move |_| {
            let k = read_bytes(data, &mut pos)??;
            let v = read_bytes(data, &mut pos)?;
            Some((k, v))
        })
    }
}

/// Reads a varint-length-prefixed byte string; `Some(None)` is a null (-1) value.
fn read_bytes<'a>(data: &'a [u8], pos: &mut usize) -> Option<Option<&'a [u8]>> {
    let len = read_varint(data, pos)?;
    if len < 0 {
        return if len == -1 { Some(None) } else { None };
    }
    let end = pos.checked_add(len as usize)?;
    let s = data.get(*pos..end)?;
    *pos = end;
    Some(Some(s))
}

/// Iterates the records of a decompressed batch payload, checking framing as it goes.
#[derive(Debug)]
pub struct RecordIter<'a> {
    data: &'a [u8],
    pos: usize,
    index: u64,
    failed: bool,
}

impl<'a> RecordIter<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0, index: 0, failed: false }
    }

    fn parse_one(&mut self) -> Result<RecordView<'a>, &'static str> {
        let len = read_varint(self.data, &mut self.pos).ok_or("bad record length")?;
        if len < 0 {
            return Err("negative record length");
        }
        let end = self.pos.checked_add(len as usize).ok_or("record length overflow")?;
        let rec = self.data.get(self.pos..end).ok_or("record runs past the batch")?;
        self.pos = end;
        let mut p = 1usize; // attributes byte (unused in v2)
        if rec.is_empty() {
            return Err("empty record");
        }
        let timestamp_delta = read_varlong(rec, &mut p).ok_or("bad timestamp delta")?;
        let offset_delta = read_varint(rec, &mut p).ok_or("bad offset delta")?;
        let key = read_bytes(rec, &mut p).ok_or("bad key")?;
        let value = read_bytes(rec, &mut p).ok_or("bad value")?;
        let header_count = read_varint(rec, &mut p).ok_or("bad header count")?;
        if header_count < 0 {
            return Err("negative header count");
        }
        let headers_start = p;
        for _ in 0..header_count {
            match read_bytes(rec, &mut p).ok_or("bad header key")? {
                Some(_) => {}
                None => return Err("null header key"),
            }
            read_bytes(rec, &mut p).ok_or("bad header value")?;
        }
        if p != rec.len() {
            return Err("record length does not match its fields");
        }
        Ok(RecordView {
            offset_delta,
            timestamp_delta,
            key,
            value,
            headers: &rec[headers_start..],
            header_count: header_count as u32,
        })
    }
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = Result<RecordView<'a>, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.data.len() {
            return None;
        }
        let index = self.index;
        self.index += 1;
        match self.parse_one() {
            Ok(r) => Some(Ok(r)),
            Err(reason) => {
                self.failed = true;
                Some(Err(BatchError::Record { index, reason }))
            }
        }
    }
}

/// A record to append: the store assigns its offset and packs it into a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewRecord {
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    /// Headers in order; repeated keys are allowed, as in Kafka.
    pub headers: Vec<(String, Option<Bytes>)>,
    /// Create time in ms since the epoch; `None` = the append time.
    pub timestamp_ms: Option<i64>,
}

impl NewRecord {
    pub fn new(key: Option<impl Into<Bytes>>, value: impl Into<Bytes>) -> Self {
        Self { key: key.map(Into::into), value: Some(value.into()), headers: Vec::new(), timestamp_ms: None }
    }

    /// Upper bound of the encoded size inside a batch.
    pub fn encoded_len_max(&self) -> usize {
        let opt = |b: &Option<Bytes>| 5 + b.as_ref().map_or(0, Bytes::len);
        5 + 1
            + 10
            + 5
            + opt(&self.key)
            + opt(&self.value)
            + 5
            + self.headers.iter().map(|(k, v)| 5 + k.len() + opt(v)).sum::<usize>()
    }
}

/// A record read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub offset: i64,
    pub timestamp: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Option<Bytes>)>,
}

/// Encodes `records` (timestamps already resolved) as one RecordBatch v2 into `out`.
pub fn encode_batch(
    records: &[(&NewRecord, i64)],
    base_offset: i64,
    codec: Codec,
    timestamp_kind: TimestampKind,
    append_time_ms: i64,
    out: &mut Vec<u8>,
) -> Result<BatchHeader, BatchError> {
    encode_records(records, base_offset, |i| i as i32, codec, timestamp_kind, append_time_ms, out)
}

/// Encodes records at offsets of their own (`(record, timestamp, offset)`, offsets strictly
/// increasing, within an i32 of the first) as one CreateTime RecordBatch v2 into `out`: its base
/// offset is the first record's, its `lastOffsetDelta` the last record's, and offsets between
/// them that no record holds stay holes, as in a batch Kafka's cleaner compacted. For records
/// restored at their original offsets.
pub fn encode_batch_at(
    records: &[(&NewRecord, i64, i64)],
    codec: Codec,
    out: &mut Vec<u8>,
) -> Result<BatchHeader, BatchError> {
    let Some(&(_, _, base)) = records.first() else { return Err(BatchError::Empty(0)) };
    let mut last = base - 1;
    for &(_, _, offset) in records {
        if offset <= last || offset - base > i64::from(i32::MAX) {
            return Err(BatchError::Record { index: 0, reason: "offsets not increasing within an i32 of the first" });
        }
        last = offset;
    }
    let stamped: Vec<(&NewRecord, i64)> = records.iter().map(|(r, ts, _)| (*r, *ts)).collect();
    encode_records(&stamped, base, |i| (records[i].2 - base) as i32, codec, TimestampKind::CreateTime, 0, out)
}

/// `encode_batch` with each record's offset delta from `delta(index)` (increasing).
fn encode_records(
    records: &[(&NewRecord, i64)],
    base_offset: i64,
    delta: impl Fn(usize) -> i32,
    codec: Codec,
    timestamp_kind: TimestampKind,
    append_time_ms: i64,
    out: &mut Vec<u8>,
) -> Result<BatchHeader, BatchError> {
    let count = records.len();
    if count == 0 {
        return Err(BatchError::Empty(0));
    }
    let base_ts = records[0].1;
    let mut max_ts = i64::MIN;
    let mut raw = Vec::with_capacity(records.iter().map(|(r, _)| r.encoded_len_max()).sum());
    let mut body = Vec::with_capacity(256);
    for (i, (r, ts)) in records.iter().enumerate() {
        max_ts = max_ts.max(*ts);
        body.clear();
        body.push(0); // record attributes
                      // Wrapping, as Kafka's own clients do: any two timestamps have a delta that decodes back.
        write_varlong(&mut body, ts.wrapping_sub(base_ts));
        write_varint(&mut body, delta(i));
        for b in [&r.key, &r.value] {
            match b {
                Some(b) => {
                    write_varint(&mut body, b.len() as i32);
                    body.extend_from_slice(b);
                }
                None => write_varint(&mut body, -1),
            }
        }
        write_varint(&mut body, r.headers.len() as i32);
        for (k, v) in &r.headers {
            write_varint(&mut body, k.len() as i32);
            body.extend_from_slice(k.as_bytes());
            match v {
                Some(v) => {
                    write_varint(&mut body, v.len() as i32);
                    body.extend_from_slice(v);
                }
                None => write_varint(&mut body, -1),
            }
        }
        write_varint(&mut raw, body.len() as i32);
        raw.extend_from_slice(&body);
    }
    let mut attributes = codec.attribute_bits();
    if timestamp_kind == TimestampKind::LogAppendTime {
        attributes |= ATTR_TIMESTAMP_TYPE;
        max_ts = append_time_ms;
    }
    let start = out.len();
    out.resize(start + HEADER_LEN, 0);
    compression::compress(codec, &raw, out)?;
    let b = &mut out[start..];
    write_header(b, base_offset, attributes, delta(count - 1), (base_ts, max_ts), count as i32);
    BatchHeader::parse(b)
}

/// Fills the header of the batch `b` (its records already after `HEADER_LEN` bytes of room) for
/// a batch without a producer (id, epoch and base sequence -1), CRC included.
fn write_header(
    b: &mut [u8],
    base_offset: i64,
    attributes: i16,
    last_offset_delta: i32,
    (base_ts, max_ts): (i64, i64),
    record_count: i32,
) {
    let total = b.len();
    b[0..8].copy_from_slice(&base_offset.to_be_bytes());
    b[OFF_BATCH_LENGTH..OFF_BATCH_LENGTH + 4].copy_from_slice(&((total - 12) as i32).to_be_bytes());
    b[OFF_LEADER_EPOCH..OFF_LEADER_EPOCH + 4].copy_from_slice(&0i32.to_be_bytes());
    b[OFF_MAGIC] = 2;
    b[OFF_ATTRIBUTES..OFF_ATTRIBUTES + 2].copy_from_slice(&attributes.to_be_bytes());
    b[OFF_LAST_OFFSET_DELTA..OFF_LAST_OFFSET_DELTA + 4].copy_from_slice(&last_offset_delta.to_be_bytes());
    b[OFF_BASE_TIMESTAMP..OFF_BASE_TIMESTAMP + 8].copy_from_slice(&base_ts.to_be_bytes());
    b[OFF_MAX_TIMESTAMP..OFF_MAX_TIMESTAMP + 8].copy_from_slice(&max_ts.to_be_bytes());
    b[OFF_PRODUCER_ID..OFF_PRODUCER_ID + 8].copy_from_slice(&(-1i64).to_be_bytes());
    b[OFF_PRODUCER_EPOCH..OFF_PRODUCER_EPOCH + 2].copy_from_slice(&(-1i16).to_be_bytes());
    b[OFF_BASE_SEQUENCE..OFF_BASE_SEQUENCE + 4].copy_from_slice(&(-1i32).to_be_bytes());
    b[OFF_RECORD_COUNT..OFF_RECORD_COUNT + 4].copy_from_slice(&record_count.to_be_bytes());
    let crc = crc32c::crc32c(&b[OFF_ATTRIBUTES..]);
    b[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_be_bytes());
}

/// Most offsets one gap batch can span (`lastOffsetDelta` is an i32).
pub const GAP_OFFSETS_MAX: i64 = i32::MAX as i64 + 1;

/// The control record type Kafka calls COMMIT: every consumer skips it without looking further
/// (librdkafka ignores it "always"; Java skips control records outside transactions).
const CONTROL_TYPE_COMMIT: i16 = 1;

/// A *gap batch*: a control batch the store writes over offsets `[base_offset, base_offset +
/// count)` that were handed out by commits a crash undid (`durability = "relaxed"`), so they are
/// never handed out again. Its `lastOffsetDelta` spans the whole range; it holds one control
/// record (COMMIT marker key and value, at delta 0) and no producer id. Consumers move past it:
/// librdkafka continues at `lastOffset + 1` after any batch (KAFKA-5443), Java's consumer at the
/// batch's `nextOffset()`, and neither returns control records to the application. Clients cannot
/// write such batches (`validate` refuses control batches). `count` is in `1..=GAP_OFFSETS_MAX`.
pub fn encode_gap_batch(base_offset: i64, count: i64, timestamp_ms: i64) -> Vec<u8> {
    assert!((1..=GAP_OFFSETS_MAX).contains(&count), "gap of {count} offsets");
    let mut body = vec![0u8]; // record attributes
    write_varlong(&mut body, 0); // timestamp delta
    write_varint(&mut body, 0); // offset delta
    let mut key = 0i16.to_be_bytes().to_vec(); // control record key: version 0, type
    key.extend_from_slice(&CONTROL_TYPE_COMMIT.to_be_bytes());
    write_varint(&mut body, key.len() as i32);
    body.extend_from_slice(&key);
    let value = [0u8; 6]; // end-transaction marker value: version 0, coordinator epoch 0
    write_varint(&mut body, value.len() as i32);
    body.extend_from_slice(&value);
    write_varint(&mut body, 0); // headers
    let mut out = vec![0u8; HEADER_LEN];
    write_varint(&mut out, body.len() as i32);
    out.extend_from_slice(&body);
    write_header(&mut out, base_offset, ATTR_CONTROL, (count - 1) as i32, (timestamp_ms, timestamp_ms), 1);
    out
}

/// The records' bytes of a batch whose header is `h`: the payload as stored, or decompressed
/// within `decompressed_limit`.
pub(crate) fn records_data<'b>(
    batch: &'b [u8],
    h: &BatchHeader,
    decompressed_limit: u64,
) -> Result<std::borrow::Cow<'b, [u8]>, BatchError> {
    let end = h.total_len().min(batch.len());
    let payload = &batch[HEADER_LEN.min(end)..end];
    Ok(match h.codec()? {
        Codec::None => std::borrow::Cow::Borrowed(payload),
        codec => std::borrow::Cow::Owned(compression::decompress(codec, payload, decompressed_limit)?),
    })
}

/// Index of the first record without a key in a validated batch, if any (compacted topics
/// refuse such records). Decompresses within `decompressed_limit`.
pub fn first_keyless(batch: &[u8], decompressed_limit: u64) -> Result<Option<u64>, BatchError> {
    let h = BatchHeader::parse(batch)?;
    let data = records_data(batch, &h, decompressed_limit)?;
    for (i, r) in RecordIter::new(&data).enumerate() {
        if r?.key.is_none() {
            return Ok(Some(i as u64));
        }
    }
    Ok(None)
}

/// What compaction does to one stored batch (see [`retain_records`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Retained {
    /// Every record stays: the batch is left as it is.
    All,
    /// No record stays: the batch goes.
    None,
    /// Some stay: the batch rewritten with them (`removed` records dropped).
    Some { batch: Vec<u8>, removed: u64 },
}

/// Compaction of one stored (trusted) batch: keeps the records for which `keep(record, its
/// offset)` holds. A rewritten batch keeps what Kafka's cleaner keeps for RecordBatch v2
/// (`MemoryRecords.filterTo`/`buildRetainedRecordsInto`): the base offset, the
/// `lastOffsetDelta` of the original (so consumers step past removed records and the producer's
/// last sequence stays), attributes, timestamps, producer id, epoch and base sequence; the
/// surviving records are copied byte for byte (their offset and timestamp deltas are relative
/// to the unchanged base), recompressed with the batch's codec, and the CRC recomputed. Control
/// batches (gaps the store wrote) are always kept whole.
pub fn retain_records(
    batch: &[u8],
    decompressed_limit: u64,
    mut keep: impl FnMut(&RecordView<'_>, i64) -> bool,
) -> Result<Retained, BatchError> {
    let h = BatchHeader::parse(batch)?;
    if h.is_control() {
        return Ok(Retained::All);
    }
    let data = records_data(batch, &h, decompressed_limit)?;
    let mut kept_raw = Vec::new();
    let (mut kept, mut removed) = (0i32, 0u64);
    let mut it = RecordIter::new(&data);
    loop {
        let start = it.pos;
        let Some(r) = it.next() else { break };
        let r = r?;
        if keep(&r, h.base_offset + i64::from(r.offset_delta)) {
            kept_raw.extend_from_slice(&data[start..it.pos]);
            kept += 1;
        } else {
            removed += 1;
        }
    }
    if removed == 0 {
        return Ok(Retained::All);
    }
    if kept == 0 {
        return Ok(Retained::None);
    }
    let mut out = batch[..HEADER_LEN].to_vec();
    compression::compress(h.codec()?, &kept_raw, &mut out)?;
    let len = (out.len() - 12) as i32;
    out[OFF_BATCH_LENGTH..OFF_BATCH_LENGTH + 4].copy_from_slice(&len.to_be_bytes());
    out[OFF_RECORD_COUNT..OFF_RECORD_COUNT + 4].copy_from_slice(&kept.to_be_bytes());
    let crc = crc32c::crc32c(&out[OFF_ATTRIBUTES..]);
    out[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_be_bytes());
    Ok(Retained::Some { batch: out, removed })
}

/// The same batch with its records compressed by `codec` instead (offsets, timestamps, producer
/// fields and records unchanged; attributes' codec bits, length and CRC rewritten), or `None`
/// when that would not make it smaller, it already uses `codec`, or it is a control batch. The
/// records are decompressed within `decompressed_limit`. The mirror uses it to send stored
/// batches in a denser codec than the site stores them in (`mirror.wire_compression`).
pub fn recompress(batch: &[u8], codec: Codec, decompressed_limit: u64) -> Result<Option<Vec<u8>>, BatchError> {
    let h = BatchHeader::parse(batch)?;
    let from = h.codec()?;
    if h.is_control() || from == codec || batch.len() < h.total_len() {
        return Ok(None);
    }
    let raw = compression::decompress(from, &batch[HEADER_LEN..h.total_len()], decompressed_limit)?;
    let mut out = Vec::with_capacity(batch.len());
    out.extend_from_slice(&batch[..HEADER_LEN]);
    compression::compress(codec, &raw, &mut out)?;
    if out.len() >= h.total_len() {
        return Ok(None);
    }
    let len = (out.len() - 12) as i32;
    out[OFF_BATCH_LENGTH..OFF_BATCH_LENGTH + 4].copy_from_slice(&len.to_be_bytes());
    let attributes = (h.attributes & !0x07) | codec.attribute_bits();
    out[OFF_ATTRIBUTES..OFF_ATTRIBUTES + 2].copy_from_slice(&attributes.to_be_bytes());
    let crc = crc32c::crc32c(&out[OFF_ATTRIBUTES..]);
    out[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_be_bytes());
    Ok(Some(out))
}

/// Decodes every record of a stored batch (trusted: validated when it was appended, but still
/// decoded defensively and within `decompressed_limit`). A control batch (a gap the store wrote)
/// holds no records for readers: it yields none; readers continue at its `next_offset()`.
pub fn decode_records(batch: &[u8], decompressed_limit: u64) -> Result<Vec<StoredRecord>, BatchError> {
    let h = BatchHeader::parse(batch)?;
    if h.is_control() {
        return Ok(Vec::new());
    }
    let data = Bytes::from(records_data(batch, &h, decompressed_limit)?.into_owned());
    let log_append = h.timestamp_kind() == TimestampKind::LogAppendTime;
    let mut out = Vec::new();
    for r in RecordIter::new(&data) {
        let r = r?;
        let slice = |s: &[u8]| data.slice_ref(s);
        out.push(StoredRecord {
            offset: h
                .base_offset
                .checked_add(i64::from(r.offset_delta))
                .ok_or(BatchError::Record { index: out.len() as u64, reason: "offset beyond i64" })?,
            timestamp: if log_append { h.max_timestamp } else { h.base_timestamp.wrapping_add(r.timestamp_delta) },
            key: r.key.map(slice),
            value: r.value.map(slice),
            headers: r.headers().map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), v.map(slice))).collect(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Vec<NewRecord> {
        (0..n)
            .map(|i| NewRecord {
                key: if i % 3 == 0 { None } else { Some(Bytes::from(format!("key-{i}"))) },
                value: Some(Bytes::from(vec![b'v'; i % 50])),
                headers: vec![("h".to_string(), Some(Bytes::from_static(b"1"))), ("h".to_string(), None)],
                timestamp_ms: Some(1_700_000_000_000 + i as i64),
            })
            .collect()
    }

    fn encode(records: &[NewRecord], codec: Codec) -> Vec<u8> {
        let with_ts: Vec<_> = records.iter().map(|r| (r, r.timestamp_ms.unwrap_or(0))).collect();
        let mut out = Vec::new();
        encode_batch(&with_ts, 100, codec, TimestampKind::CreateTime, 0, &mut out).expect("encode");
        out
    }

    #[test]
    fn a_recompressed_batch_holds_the_same_records_in_the_new_codec_and_validates() {
        let records: Vec<NewRecord> = (0..200)
            .map(|i| NewRecord {
                key: Some(Bytes::from(format!("SM-{:07}", i % 40))),
                value: Some(Bytes::from(format!("{{\"voltage\":230.{},\"status\":\"ok\",\"seq\":{i}}}", i % 7))),
                headers: vec![("h".to_string(), Some(Bytes::from_static(b"1")))],
                timestamp_ms: Some(1_700_000_000_000 + i as i64),
            })
            .collect();
        let lz4 = encode(&records, Codec::Lz4);
        let zstd = recompress(&lz4, Codec::Zstd, 1 << 20).expect("recompress").expect("smaller in zstd");
        assert!(zstd.len() < lz4.len(), "{} vs {}", zstd.len(), lz4.len());
        let h = validate(&zstd, 1 << 20).expect("a valid batch");
        assert_eq!(h.codec().expect("codec"), Codec::Zstd);
        let (a, b) = (BatchHeader::parse(&lz4).expect("header"), h);
        assert_eq!(
            (a.base_offset, a.last_offset_delta, a.base_timestamp, a.max_timestamp, a.record_count),
            (b.base_offset, b.last_offset_delta, b.base_timestamp, b.max_timestamp, b.record_count)
        );
        assert_eq!(decode_records(&zstd, 1 << 20).expect("decode"), decode_records(&lz4, 1 << 20).expect("decode"));
        // Already in the codec, or past the limit: left alone / refused.
        assert_eq!(recompress(&zstd, Codec::Zstd, 1 << 20).expect("same codec"), None);
        assert!(recompress(&lz4, Codec::Zstd, 100).is_err());
    }

    /// A peer's batch (a restore's) whose offsets run past i64 is refused, not a panic or
    /// offsets wrapped below zero.
    #[test]
    fn decoding_offsets_beyond_i64_is_an_error() {
        let mut bytes = encode(&sample(3), Codec::None);
        bytes[..8].copy_from_slice(&(i64::MAX - 1).to_be_bytes());
        assert!(matches!(decode_records(&bytes, 1 << 20), Err(BatchError::Record { index: 2, .. })));
    }

    #[test]
    fn encode_validate_decode_round_trip_every_codec() {
        let records = sample(40);
        for codec in [Codec::None, Codec::Gzip, Codec::Snappy, Codec::Lz4, Codec::Zstd] {
            let bytes = encode(&records, codec);
            let h = validate(&bytes, 1 << 20).expect("valid");
            assert_eq!((h.base_offset, h.record_count, h.codec().ok()), (100, 40, Some(codec)));
            let back = decode_records(&bytes, 1 << 20).expect("decode");
            assert_eq!(back.len(), 40);
            for (i, (r, orig)) in back.iter().zip(&records).enumerate() {
                assert_eq!(r.offset, 100 + i as i64);
                assert_eq!(r.key, orig.key);
                assert_eq!(r.value, orig.value);
                assert_eq!(r.headers, orig.headers, "repeated header keys are kept");
                assert_eq!(Some(r.timestamp), orig.timestamp_ms);
            }
        }
    }

    #[test]
    fn corrupt_batches_are_refused_with_a_reason() {
        let good = encode(&sample(5), Codec::None);
        let mut bad_crc = good.clone();
        let last = bad_crc.len() - 1;
        bad_crc[last] ^= 0xff;
        assert!(matches!(validate(&bad_crc, 1 << 20), Err(BatchError::Crc { .. })));
        assert!(matches!(validate(&good[..good.len() - 3], 1 << 20), Err(BatchError::LengthMismatch { .. })));
        assert!(matches!(validate(&good[..20], 1 << 20), Err(BatchError::TooShort(20))));

        let recrc = |b: &mut Vec<u8>| {
            let crc = crc32c::crc32c(&b[OFF_ATTRIBUTES..]);
            b[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_be_bytes());
        };
        let mut wrong_count = good.clone();
        wrong_count[OFF_RECORD_COUNT..OFF_RECORD_COUNT + 4].copy_from_slice(&6i32.to_be_bytes());
        wrong_count[OFF_LAST_OFFSET_DELTA..OFF_LAST_OFFSET_DELTA + 4].copy_from_slice(&5i32.to_be_bytes());
        recrc(&mut wrong_count);
        assert!(matches!(validate(&wrong_count, 1 << 20), Err(BatchError::RecordCount { header: 6, found: 5 })));

        let mut wrong_delta = good.clone();
        wrong_delta[OFF_LAST_OFFSET_DELTA..OFF_LAST_OFFSET_DELTA + 4].copy_from_slice(&9i32.to_be_bytes());
        recrc(&mut wrong_delta);
        assert!(matches!(validate(&wrong_delta, 1 << 20), Err(BatchError::LastOffsetDelta { .. })));

        let mut control = good.clone();
        control[OFF_ATTRIBUTES + 1] |= 0x20;
        recrc(&mut control);
        assert_eq!(validate(&control, 1 << 20), Err(BatchError::Control));

        let mut magic = good.clone();
        magic[OFF_MAGIC] = 1;
        assert_eq!(validate(&magic, 1 << 20), Err(BatchError::Magic(1)));

        let mut huge_count = good;
        huge_count[OFF_RECORD_COUNT..OFF_RECORD_COUNT + 4].copy_from_slice(&i32::MAX.to_be_bytes());
        huge_count[OFF_LAST_OFFSET_DELTA..OFF_LAST_OFFSET_DELTA + 4].copy_from_slice(&(i32::MAX - 1).to_be_bytes());
        recrc(&mut huge_count);
        assert!(matches!(validate(&huge_count, 1 << 20), Err(BatchError::RecordCount { .. })));
    }

    #[test]
    fn log_append_time_restamp_keeps_crc_valid() {
        let mut b = encode(&sample(3), Codec::Lz4);
        stamp_log_append_time(&mut b, 42);
        set_base_offset(&mut b, 7);
        set_leader_epoch(&mut b, 0);
        let h = validate(&b, 1 << 20).expect("still valid");
        assert_eq!((h.base_offset, h.max_timestamp, h.timestamp_kind()), (7, 42, TimestampKind::LogAppendTime));
        assert!(decode_records(&b, 1 << 20).expect("decode").iter().all(|r| r.timestamp == 42));
    }

    #[test]
    fn gap_batches_span_their_range_and_hold_no_records_for_readers() {
        let b = encode_gap_batch(100, 5000, 42);
        let h = BatchHeader::parse(&b).expect("header");
        assert_eq!((h.base_offset, h.next_offset(), h.record_count), (100, 5100, 1));
        assert!(h.is_control() && !h.is_transactional());
        assert_eq!((h.producer_id, h.max_timestamp, h.total_len()), (-1, 42, b.len()));
        assert_eq!(crc32c::crc32c(&b[OFF_ATTRIBUTES..]), h.crc);
        assert!(decode_records(&b, 1 << 20).expect("decodes").is_empty());
        // The one control record: key = version 0, type COMMIT, as librdkafka requires (size 4).
        let r = RecordIter::new(&b[HEADER_LEN..]).next().expect("a record").expect("framed");
        assert_eq!((r.offset_delta, r.key), (0, Some(&[0u8, 0, 0, 1][..])));
        // Clients cannot write one.
        assert_eq!(validate(&b, 1 << 20), Err(BatchError::Control));
        let widest = BatchHeader::parse(&encode_gap_batch(0, GAP_OFFSETS_MAX, 0)).expect("header");
        assert_eq!(widest.next_offset(), GAP_OFFSETS_MAX);
    }

    #[test]
    fn first_keyless_finds_the_record_index_in_every_codec() {
        // sample(): every third record (0, 3, ...) has no key.
        for codec in [Codec::None, Codec::Lz4, Codec::Zstd] {
            assert_eq!(first_keyless(&encode(&sample(5), codec), 1 << 20), Ok(Some(0)));
            assert_eq!(first_keyless(&encode(&sample(5)[1..3], codec), 1 << 20), Ok(None));
            assert_eq!(first_keyless(&encode(&sample(5)[1..], codec), 1 << 20), Ok(Some(2)));
        }
    }

    #[test]
    fn retained_records_keep_their_offsets_and_the_batch_its_offset_span() {
        for codec in [Codec::None, Codec::Lz4, Codec::Gzip] {
            let b = encode(&sample(10), codec);
            let r = retain_records(&b, 1 << 20, |_, o| o % 4 == 1).expect("filter");
            let Retained::Some { batch: out, removed } = r else { panic!("{codec:?}: {r:?}") };
            assert_eq!(removed, 7);
            let h = BatchHeader::parse(&out).expect("header");
            assert_eq!((h.base_offset, h.last_offset(), h.record_count, h.total_len()), (100, 109, 3, out.len()));
            assert_eq!(h.codec().ok(), Some(codec));
            assert_eq!(crc32c::crc32c(&out[OFF_ATTRIBUTES..]), h.crc, "CRC recomputed");
            let back = decode_records(&out, 1 << 20).expect("decode");
            let all = decode_records(&b, 1 << 20).expect("decode");
            assert_eq!(back.iter().map(|r| r.offset).collect::<Vec<_>>(), [101, 105, 109]);
            for r in &back {
                assert_eq!(Some(r), all.iter().find(|a| a.offset == r.offset), "a survivor is unchanged");
            }
            assert_eq!(retain_records(&b, 1 << 20, |_, _| true), Ok(Retained::All));
            assert_eq!(retain_records(&b, 1 << 20, |_, _| false), Ok(Retained::None));
        }
        let gap = encode_gap_batch(0, 10, 0);
        assert_eq!(retain_records(&gap, 1 << 20, |_, _| false), Ok(Retained::All), "gaps stay");
    }

    #[test]
    fn varints_match_kafka_zigzag() {
        let mut out = Vec::new();
        for v in [0i32, -1, 1, 63, -64, 64, 300, i32::MAX, i32::MIN] {
            out.clear();
            write_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(i64::from(v)));
            let mut pos = 0;
            assert_eq!(read_varint(&out, &mut pos), Some(v));
        }
        out.clear();
        write_varint(&mut out, -1);
        assert_eq!(out, [1]);
    }
}
