//! Bounded decoding of Kafka request bytes: primitives, classic and compact (flexible-version)
//! strings, bytes and arrays, and tagged fields. Every length and count read from the client is
//! checked against the bytes actually left in the frame before anything is allocated, so a
//! request claiming two billion array elements costs nothing; and the array elements of one
//! request together are capped (`kafka.request_elements_max`), because a two-byte element on the
//! wire is a 24-byte `String` or a larger struct once decoded, and an answer of its own.

use bytes::{BufMut, Bytes, BytesMut};

/// Why a request could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("request truncated: needed {needed} more bytes at offset {at}")]
    Truncated { at: usize, needed: usize },
    #[error("{what} has length {len} but only {remaining} bytes remain")]
    TooLong { what: &'static str, len: u64, remaining: usize },
    #[error("invalid {0}")]
    Invalid(&'static str),
    #[error("string is not valid UTF-8")]
    Utf8,
    #[error("more than kafka.request_elements_max = {limit} array elements in one request")]
    TooManyElements { limit: u64 },
}

/// Reads one request body. `flex` selects the compact encodings of flexible versions.
#[derive(Debug)]
pub(crate) struct Reader {
    buf: Bytes,
    pos: usize,
    pub flex: bool,
    /// Array elements this request may still decode.
    elements_left: u64,
    elements_max: u64,
}

impl Reader {
    /// A reader without an element cap (unit tests); requests use [`Reader::with_elements_max`].
    #[cfg(test)]
    pub(crate) fn new(buf: Bytes, flex: bool) -> Self {
        Self::with_elements_max(buf, flex, u64::MAX)
    }

    /// A reader that decodes at most `max` array elements in all (`kafka.request_elements_max`).
    pub(crate) fn with_elements_max(buf: Bytes, flex: bool, max: u64) -> Self {
        Self { buf, pos: 0, flex, elements_left: max, elements_max: max }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated { at: self.pos, needed: n - self.remaining() });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn fixed<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub(crate) fn i8(&mut self) -> Result<i8, DecodeError> {
        Ok(i8::from_be_bytes(self.fixed()?))
    }
    pub(crate) fn bool(&mut self) -> Result<bool, DecodeError> {
        Ok(self.i8()? != 0)
    }
    pub(crate) fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.fixed()?))
    }
    pub(crate) fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.fixed()?))
    }
    pub(crate) fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.fixed()?))
    }
    pub(crate) fn uuid(&mut self) -> Result<[u8; 16], DecodeError> {
        self.fixed()
    }

    pub(crate) fn uvarint(&mut self) -> Result<u32, DecodeError> {
        let mut value = 0u32;
        for i in 0..5 {
            let b = self.take(1)?[0];
            if i == 4 && b > 0x0f {
                return Err(DecodeError::Invalid("unsigned varint"));
            }
            value |= u32::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::Invalid("unsigned varint"))
    }

    /// Length of a string or bytes field; `None` = null.
    fn length(&mut self, what: &'static str, wide: bool) -> Result<Option<usize>, DecodeError> {
        let len: i64 = if self.flex {
            i64::from(self.uvarint()?) - 1
        } else if wide {
            i64::from(self.i32()?)
        } else {
            i64::from(self.i16()?)
        };
        if len < -1 {
            return Err(DecodeError::Invalid(what));
        }
        if len == -1 {
            return Ok(None);
        }
        if len as u64 > self.remaining() as u64 {
            return Err(DecodeError::TooLong { what, len: len as u64, remaining: self.remaining() });
        }
        Ok(Some(len as usize))
    }

    fn utf8(&mut self, len: usize) -> Result<String, DecodeError> {
        let s = self.take(len)?;
        std::str::from_utf8(s).map(str::to_string).map_err(|_| DecodeError::Utf8)
    }

    pub(crate) fn nullable_string(&mut self) -> Result<Option<String>, DecodeError> {
        match self.length("string", false)? {
            None => Ok(None),
            Some(len) => self.utf8(len).map(Some),
        }
    }

    pub(crate) fn string(&mut self) -> Result<String, DecodeError> {
        self.nullable_string()?.ok_or(DecodeError::Invalid("null string"))
    }

    /// The request header's client id: a classic nullable string even in flexible versions.
    pub(crate) fn legacy_nullable_string(&mut self) -> Result<Option<String>, DecodeError> {
        let len = self.i16()?;
        if len < 0 {
            return Ok(None);
        }
        self.utf8(len as usize).map(Some)
    }

    pub(crate) fn nullable_bytes(&mut self) -> Result<Option<Bytes>, DecodeError> {
        match self.length("bytes", true)? {
            None => Ok(None),
            Some(len) => {
                let b = self.buf.slice(self.pos..self.pos + len);
                self.pos += len;
                Ok(Some(b))
            }
        }
    }

    /// Reads an array whose elements take at least `min_element_bytes` each on the wire; the
    /// count is checked against the remaining bytes before any allocation. `None` = null.
    pub(crate) fn nullable_array<T>(
        &mut self,
        min_element_bytes: usize,
        mut element: impl FnMut(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Option<Vec<T>>, DecodeError> {
        let count: i64 = if self.flex { i64::from(self.uvarint()?) - 1 } else { i64::from(self.i32()?) };
        if count < -1 {
            return Err(DecodeError::Invalid("array length"));
        }
        if count == -1 {
            return Ok(None);
        }
        let count = count as u64;
        if count.saturating_mul(min_element_bytes.max(1) as u64) > self.remaining() as u64 {
            return Err(DecodeError::TooLong { what: "array", len: count, remaining: self.remaining() });
        }
        if count > self.elements_left {
            return Err(DecodeError::TooManyElements { limit: self.elements_max });
        }
        self.elements_left -= count;
        let mut v = Vec::with_capacity(count as usize);
        for _ in 0..count {
            v.push(element(self)?);
        }
        Ok(Some(v))
    }

    pub(crate) fn array<T>(
        &mut self,
        min_element_bytes: usize,
        element: impl FnMut(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, DecodeError> {
        Ok(self.nullable_array(min_element_bytes, element)?.unwrap_or_default())
    }

    /// Skips the tagged fields that end every structure in flexible versions.
    pub(crate) fn tagged_fields(&mut self) -> Result<(), DecodeError> {
        if !self.flex {
            return Ok(());
        }
        let n = self.uvarint()?;
        if n as usize > self.remaining() {
            return Err(DecodeError::TooLong { what: "tagged fields", len: n.into(), remaining: self.remaining() });
        }
        for _ in 0..n {
            let _tag = self.uvarint()?;
            let size = self.uvarint()? as usize;
            self.take(size)?;
        }
        Ok(())
    }
}

/// Minimum wire size of a string (its length prefix): for array element bounds.
pub(crate) fn min_str(flex: bool) -> usize {
    if flex {
        1
    } else {
        2
    }
}

/// Minimum wire size of an array length prefix.
pub(crate) fn min_array(flex: bool) -> usize {
    if flex {
        1
    } else {
        4
    }
}

/// The request header (v1 or v2; v0 is only used by ControlledShutdown, which we do not serve).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestHeader {
    pub api_key: i16,
    pub api_version: i16,
    pub correlation_id: i32,
    pub client_id: Option<String>,
}

/// Reads `api_key`, `api_version` and `correlation_id` (the part every header version shares).
pub(crate) fn peek_header(frame: &[u8]) -> Option<(i16, i16, i32)> {
    if frame.len() < 8 {
        return None;
    }
    let key = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    let corr = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
    Some((key, version, corr))
}

/// Decodes the header; afterwards the reader is positioned at the body.
pub(crate) fn read_header(r: &mut Reader, header_flex: bool) -> Result<RequestHeader, DecodeError> {
    let api_key = r.i16()?;
    let api_version = r.i16()?;
    let correlation_id = r.i32()?;
    let client_id = r.legacy_nullable_string()?;
    if header_flex {
        let flex = r.flex;
        r.flex = true;
        r.tagged_fields()?;
        r.flex = flex;
    }
    Ok(RequestHeader { api_key, api_version, correlation_id, client_id })
}

/// Writes a response frame: size prefix, correlation id, an empty tagged-field section for
/// flexible response headers (v1), then the body produced by `body`.
pub(crate) fn frame_response(
    correlation_id: i32,
    header_flex: bool,
    body_size_hint: usize,
    body: impl FnOnce(&mut BytesMut) -> Result<(), String>,
) -> Result<Bytes, String> {
    let mut out = BytesMut::with_capacity(4 + 4 + 1 + body_size_hint);
    out.put_i32(0);
    out.put_i32(correlation_id);
    if header_flex {
        out.put_u8(0);
    }
    body(&mut out)?;
    let size = i32::try_from(out.len() - 4).map_err(|_| "response larger than 2 GiB".to_string())?;
    out[..4].copy_from_slice(&size.to_be_bytes());
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_counts_are_refused_without_allocating() {
        let mut b = BytesMut::new();
        b.put_i32(i32::MAX);
        b.put_i32(1);
        let mut r = Reader::new(b.freeze(), false);
        let e = r.array(4, |r| r.i32()).unwrap_err();
        assert!(matches!(e, DecodeError::TooLong { .. }), "{e}");

        let mut b = BytesMut::new();
        b.put_u8(0xff);
        b.put_u8(0xff);
        b.put_u8(0xff);
        b.put_u8(0x07);
        let mut r = Reader::new(b.freeze(), true);
        assert!(matches!(r.array(1, |r| r.i8()), Err(DecodeError::TooLong { .. })));

        let mut b = BytesMut::new();
        b.put_i32(1 << 30);
        let mut r = Reader::new(b.freeze(), false);
        assert!(matches!(r.nullable_bytes(), Err(DecodeError::TooLong { .. })));
    }

    #[test]
    fn elements_are_capped_over_all_arrays_of_a_request() {
        // Two arrays of 3 and 2 elements: 5 pass a cap of 5, not a cap of 4.
        let mut b = BytesMut::new();
        b.put_i32(3);
        b.put_slice(&[1, 2, 3]);
        b.put_i32(2);
        b.put_slice(&[4, 5]);
        let two = |max| {
            let mut r = Reader::with_elements_max(b.clone().freeze(), false, max);
            r.array(1, |r| r.i8())?;
            r.array(1, |r| r.i8())
        };
        assert_eq!(two(5).unwrap(), vec![4, 5]);
        assert_eq!(two(4).unwrap_err(), DecodeError::TooManyElements { limit: 4 });
    }

    #[test]
    fn compact_and_classic_strings() {
        let mut b = BytesMut::new();
        b.put_i16(3);
        b.put_slice(b"abc");
        b.put_i16(-1);
        let mut r = Reader::new(b.freeze(), false);
        assert_eq!(r.string().unwrap(), "abc");
        assert_eq!(r.nullable_string().unwrap(), None);

        let mut b = BytesMut::new();
        b.put_u8(4);
        b.put_slice(b"xyz");
        b.put_u8(0);
        b.put_u8(1); // one tagged field
        b.put_u8(9); // tag
        b.put_u8(2); // size
        b.put_slice(b"zz");
        let mut r = Reader::new(b.freeze(), true);
        assert_eq!(r.string().unwrap(), "xyz");
        assert_eq!(r.nullable_string().unwrap(), None);
        r.tagged_fields().unwrap();
        assert_eq!(r.remaining(), 0);
    }

    #[test]
    fn truncation_and_bad_utf8() {
        let mut r = Reader::new(Bytes::from_static(&[0, 5, b'a']), false);
        assert!(matches!(r.string(), Err(DecodeError::TooLong { .. })));
        let mut r = Reader::new(Bytes::from_static(&[0, 2, 0xff, 0xfe]), false);
        assert_eq!(r.string(), Err(DecodeError::Utf8));
        let mut r = Reader::new(Bytes::from_static(&[0, 1]), false);
        assert!(matches!(r.i32(), Err(DecodeError::Truncated { .. })));
    }
}
