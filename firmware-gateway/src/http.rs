//! The HTTP/1.1 request head parser of the metrics listener (GET /metrics and the status page):
//! a pure parser over the bytes read so far (incomplete, too large, malformed, or a request) and
//! the bounded read and the answer around it. No bodies, no keep-alive: one request per
//! connection, the head at most `metrics.request_head_bytes_max`, all of it within
//! `metrics.request_timeout_ms` (the caller's deadline).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Header lines at most in one head (each costs a string; the head's byte limit bounds them too).
pub const HEADERS_MAX: usize = 64;

/// A request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without its query string.
    pub path: String,
    /// What follows `?` in the target (empty without one).
    pub query: String,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Why a head was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("request head larger than {0} bytes")]
    TooLarge(usize),
    #[error("malformed request: {0}")]
    Malformed(&'static str),
}

/// Parses the head in `buf` (the bytes read so far). `Ok(None)`: not complete yet and still
/// within `max` bytes; a head that has not ended within `max` bytes is `TooLarge` at once.
pub fn parse_head(buf: &[u8], max: usize) -> Result<Option<Request>, HeadError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() >= max { Err(HeadError::TooLarge(max)) } else { Ok(None) };
    };
    if end + 4 > max {
        return Err(HeadError::TooLarge(max));
    }
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| HeadError::Malformed("not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::Malformed("request line"));
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !target.starts_with('/') {
        return Err(HeadError::Malformed("request line"));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (path, query) = (path.to_string(), query.to_string());
    let mut headers = Vec::new();
    for l in lines {
        if headers.len() == HEADERS_MAX {
            return Err(HeadError::Malformed("too many header lines"));
        }
        let (k, v) = l.split_once(':').ok_or(HeadError::Malformed("header line without ':'"))?;
        if k.is_empty() || k.contains(char::is_whitespace) {
            return Err(HeadError::Malformed("header name"));
        }
        headers.push((k.to_ascii_lowercase(), v.trim().to_string()));
    }
    Ok(Some(Request { method: method.to_string(), path, query, headers }))
}

/// Why no request was read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Head(#[from] HeadError),
    #[error("connection closed before the request head ended")]
    Closed,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads one request head of at most `max` bytes (the caller bounds the time). Bytes after the
/// head (a body) are ignored: no route takes one.
pub async fn read_request<S: AsyncRead + Unpin>(stream: &mut S, max: usize) -> Result<Request, ReadError> {
    let mut head = Vec::with_capacity(max.min(1024));
    let mut buf = [0u8; 1024];
    loop {
        // Never read past the limit: what is buffered is at most `max` bytes.
        let room = (max - head.len()).min(buf.len());
        let n = stream.read(&mut buf[..room]).await?;
        if n == 0 {
            return Err(ReadError::Closed);
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(req) = parse_head(&head, max)? {
            return Ok(req);
        }
    }
}

/// An answer: status line, headers, body; the connection closes after it.
#[derive(Debug)]
pub struct Response {
    pub status: &'static str,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: &'static str, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Self { status, content_type, headers: Vec::new(), body: body.into() }
    }

    pub fn text(status: &'static str, body: &str) -> Self {
        Self::new(status, "text/plain; charset=utf-8", body)
    }

    pub fn with(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// Writes it and shuts the write side down.
    pub async fn send<S: AsyncWrite + Unpin>(&self, stream: &mut S) -> std::io::Result<()> {
        let mut head = format!(
            "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        for (k, v) in &self.headers {
            head.push_str(k);
            head.push_str(": ");
            head.push_str(v);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&self.body).await?;
        stream.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_parsed_once_complete() {
        let raw = b"GET /api/status?x=1 HTTP/1.1\r\nHost: a\r\nAuthorization: Basic eA==\r\n\r\n";
        for cut in 0..raw.len() - 1 {
            assert_eq!(parse_head(&raw[..cut], 8192), Ok(None), "incomplete at {cut}");
        }
        let r = parse_head(raw, 8192).expect("valid").expect("complete");
        assert_eq!((r.method.as_str(), r.path.as_str(), r.query.as_str()), ("GET", "/api/status", "x=1"));
        assert_eq!(r.header("authorization"), Some("Basic eA=="));
        assert_eq!(r.header("host"), Some("a"));
    }

    #[test]
    fn oversized_and_malformed_heads_are_refused() {
        // A head that has not ended at the limit is refused without waiting for more.
        let long = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(200));
        assert_eq!(parse_head(long.as_bytes(), 100), Err(HeadError::TooLarge(100)));
        let ended = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(90));
        assert_eq!(parse_head(ended.as_bytes(), 100), Err(HeadError::TooLarge(100)));
        for bad in [
            &b"GET /\r\n\r\n"[..],
            b"GET / HTTP/1.1 extra\r\n\r\n",
            b"GET x HTTP/1.1\r\n\r\n",
            b"GET / SPDY/3\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET / HTTP/1.1\r\nbad name: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: \xff\r\n\r\n",
        ] {
            assert!(
                matches!(parse_head(bad, 8192), Err(HeadError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "a: b\r\n".repeat(HEADERS_MAX + 1));
        assert_eq!(parse_head(many.as_bytes(), 8192), Err(HeadError::Malformed("too many header lines")));
    }

    #[tokio::test]
    async fn reading_stops_at_the_limit() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(&vec![b'a'; 10_000]).await.expect("write");
        // The client stays connected: the limit, not the end of the stream, ends the read.
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), read_request(&mut server, 4096));
        let e = read.await.expect("refused at the limit, without waiting for more").expect_err("too large");
        assert!(matches!(e, ReadError::Head(HeadError::TooLarge(4096))), "{e}");
        drop(client);
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"GET / HT").await.expect("write");
        drop(client);
        assert!(matches!(read_request(&mut server, 4096).await, Err(ReadError::Closed)));
    }
}
