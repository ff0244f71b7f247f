//! The thin async side of MQTT over WebSocket: the upgrade (read the request, answer it) and the
//! `AsyncRead`/`AsyncWrite` pair a connection's handler takes, so MQTT's own framing and read
//! budget see a plain byte stream. Reads decode in place in the caller's buffer (no buffer of
//! its own); writes frame the caller's bytes as binary frames (one frame of at most
//! `WRITE_FRAME_BYTES_MAX` waits at a time); control frames the codec makes due (pong, close)
//! go out between frames, from whichever half runs.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::codec::{self, Codec};
use super::handshake::{Handshake, Refusal};

/// Largest binary frame written: a longer write is split (the rest goes in the next frames).
/// Bounds the one frame a connection keeps while the socket is full.
pub const WRITE_FRAME_BYTES_MAX: usize = 16 * 1024;
/// Reads one `poll_read` makes while they bring only headers and control frames (a client
/// sending empty frames or pings); then it yields and is woken again at once.
const READS_PER_POLL_MAX: usize = 16;
/// The chunk an upgrade request is read in (its bytes are kept up to the request limit).
const REQUEST_CHUNK_BYTES: usize = 1024;

/// Why an upgrade failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The request was refused; the HTTP answer was sent (if the socket took it).
    #[error("WebSocket upgrade refused: {0}")]
    Refused(Refusal),
    #[error("connection closed during the WebSocket upgrade")]
    Closed,
    #[error("I/O error during the WebSocket upgrade: {0}")]
    Io(#[from] io::Error),
}

/// Reads the client's upgrade request (at most `request_bytes_max` bytes) and answers it: on
/// success the two halves of the WebSocket byte stream; on a refusal its HTTP answer is sent and
/// the error returned (the caller closes the connection). The caller bounds it with a deadline.
pub async fn upgrade<R, W>(
    mut rd: R,
    mut wr: W,
    request_bytes_max: usize,
) -> Result<(WsReader<R, W>, WsWriter<W>), UpgradeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut request = Handshake::new(request_bytes_max);
    let mut chunk = [0u8; REQUEST_CHUNK_BYTES];
    let answer = loop {
        let n = rd.read(&mut chunk).await?;
        if n == 0 {
            return Err(UpgradeError::Closed);
        }
        match request.receive(&chunk[..n]) {
            Ok(None) => continue,
            Ok(Some(answer)) => break answer,
            Err(refusal) => {
                let _ = wr.write_all(&refusal.response()).await;
                let _ = wr.flush().await;
                let _ = wr.shutdown().await;
                return Err(UpgradeError::Refused(refusal));
            }
        }
    };
    drop(request);
    wr.write_all(&answer).await?;
    wr.flush().await?;
    let shared = Arc::new(Mutex::new(Shared { codec: Codec::new(), wr, out: Vec::new(), sent: 0 }));
    Ok((WsReader { rd, shared: shared.clone() }, WsWriter { shared }))
}

/// What both halves use: the codec, the socket's write half, and the frame being written.
#[derive(Debug)]
struct Shared<W> {
    codec: Codec,
    wr: W,
    /// One frame (data or control) on its way; freed once written.
    out: Vec<u8>,
    sent: usize,
}

impl<W: AsyncWrite + Unpin> Shared<W> {
    /// Writes the frame on its way and then any control frame due, until done or the socket is
    /// full.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            while self.sent < self.out.len() {
                let n = std::task::ready!(Pin::new(&mut self.wr).poll_write(cx, &self.out[self.sent..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.sent += n;
            }
            self.out = Vec::new();
            self.sent = 0;
            if !self.codec.poll_control(&mut self.out) {
                return Poll::Ready(Ok(()));
            }
        }
    }

    /// Sends what is due as far as the socket takes it now, flushed (from the read half, for a
    /// pong or close; a full socket leaves it for the next write or read).
    fn try_send_controls(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.codec.control_due() && self.out.is_empty() {
            return Ok(());
        }
        if let Poll::Ready(r) = self.poll_drain(cx) {
            r?;
            if let Poll::Ready(r) = Pin::new(&mut self.wr).poll_flush(cx) {
                r?;
            }
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The read half: the data of the client's binary frames as a byte stream; end of stream once
/// the client's close frame came (answered) or the socket closed.
#[derive(Debug)]
pub struct WsReader<R, W> {
    rd: R,
    shared: Arc<Mutex<Shared<W>>>,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> AsyncRead for WsReader<R, W> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        for _ in 0..READS_PER_POLL_MAX {
            {
                let mut shared = lock(&this.shared);
                shared.try_send_controls(cx)?;
                if shared.codec.read_closed() {
                    return Poll::Ready(match shared.codec.close_received() {
                        Some(_) => Ok(()),
                        None => Err(io::Error::new(io::ErrorKind::InvalidData, "WebSocket connection failed")),
                    });
                }
            }
            let start = buf.filled().len();
            std::task::ready!(Pin::new(&mut this.rd).poll_read(cx, buf))?;
            let end = buf.filled().len();
            if end == start {
                // The socket closed without a close frame: the end of the stream all the same.
                return Poll::Ready(Ok(()));
            }
            let mut shared = lock(&this.shared);
            let decoded = shared.codec.decode(&mut buf.filled_mut()[start..end]);
            match decoded {
                Ok(n) => {
                    buf.set_filled(start + n);
                    if n > 0 {
                        shared.try_send_controls(cx)?;
                        return Poll::Ready(Ok(()));
                    }
                }
                Err(e) => {
                    buf.set_filled(start);
                    shared.try_send_controls(cx)?;
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
                }
            }
        }
        // Only headers and control frames so far: let others run, then go on.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// The write half: each write goes out as one binary frame (split at `WRITE_FRAME_BYTES_MAX`);
/// shutting down sends a close frame (1000) first.
#[derive(Debug)]
pub struct WsWriter<W> {
    shared: Arc<Mutex<Shared<W>>>,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for WsWriter<W> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut shared = lock(&self.shared);
        std::task::ready!(shared.poll_drain(cx))?;
        if shared.codec.close_sent() {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "WebSocket closed")));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = buf.len().min(WRITE_FRAME_BYTES_MAX);
        let mut frame = Vec::with_capacity(n + 4);
        codec::binary_header(n, &mut frame);
        frame.extend_from_slice(&buf[..n]);
        shared.out = frame;
        shared.sent = 0;
        // As far as the socket takes it now; the rest goes with the next write or the flush.
        if let Poll::Ready(Err(e)) = shared.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut shared = lock(&self.shared);
        std::task::ready!(shared.poll_drain(cx))?;
        Pin::new(&mut shared.wr).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut shared = lock(&self.shared);
        shared.codec.close(codec::status::NORMAL);
        std::task::ready!(shared.poll_drain(cx))?;
        std::task::ready!(Pin::new(&mut shared.wr).poll_flush(cx))?;
        Pin::new(&mut shared.wr).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQUEST: &str = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                           Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                           Sec-WebSocket-Protocol: mqtt\r\n\r\n";

    /// The session ending (the handler shuts its writer down) sends a close frame with 1000
    /// (RFC 6455 7.1.2) before the socket closes, and nothing can be written after it.
    #[tokio::test]
    async fn shutdown_sends_close_1000() {
        let (client, server) = tokio::io::duplex(4096);
        let (srd, swr) = tokio::io::split(server);
        let (mut crd, mut cwr) = tokio::io::split(client);
        cwr.write_all(REQUEST.as_bytes()).await.expect("write");
        let (_rd, mut wr) = upgrade(srd, swr, 4096).await.expect("upgrade");
        wr.write_all(&[0xe0, 0]).await.expect("write");
        wr.shutdown().await.expect("shutdown");
        let mut all = Vec::new();
        crd.read_to_end(&mut all).await.expect("read");
        let answer_end = all.windows(4).position(|w| w == b"\r\n\r\n").expect("101") + 4;
        assert_eq!(all[answer_end..], [0x82, 2, 0xe0, 0, 0x88, 2, 0x03, 0xe8]);
        assert!(wr.write_all(b"x").await.is_err(), "nothing after our close");
    }

    /// Over an in-memory pipe: the upgrade, a masked binary frame read as bytes, a ping answered
    /// while the session only reads, a write framed, a close answered and the stream ended.
    #[tokio::test]
    async fn upgrade_then_bytes_both_ways_and_the_closing_handshake() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (srd, swr) = tokio::io::split(server);
        let (mut crd, mut cwr) = tokio::io::split(client);
        cwr.write_all(REQUEST.as_bytes()).await.expect("write");
        let (mut rd, mut wr) = upgrade(srd, swr, 4096).await.expect("upgrade");
        let mut answer = vec![0u8; 4096];
        let n = crd.read(&mut answer).await.expect("read");
        assert!(answer[..n].starts_with(b"HTTP/1.1 101 "));
        // Masked with a zero mask, for brevity: ping "p", then binary "\xc0\x00" (PINGREQ).
        cwr.write_all(&[0x89, 0x81, 0, 0, 0, 0, b'p', 0x82, 0x82, 0, 0, 0, 0, 0xc0, 0x00]).await.expect("write");
        let mut got = [0u8; 8];
        rd.read_exact(&mut got[..2]).await.expect("read");
        assert_eq!(&got[..2], [0xc0, 0x00]);
        let mut pong = [0u8; 3];
        crd.read_exact(&mut pong).await.expect("pong");
        assert_eq!(pong, [0x8a, 1, b'p']);
        wr.write_all(&[0xd0, 0x00]).await.expect("write");
        wr.flush().await.expect("flush");
        let mut frame = [0u8; 4];
        crd.read_exact(&mut frame).await.expect("frame");
        assert_eq!(frame, [0x82, 2, 0xd0, 0x00]);
        cwr.write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8]).await.expect("close");
        assert_eq!(rd.read(&mut got).await.expect("eof"), 0, "the close ends the stream");
        let mut close = [0u8; 4];
        crd.read_exact(&mut close).await.expect("close echoed");
        assert_eq!(close, [0x88, 2, 0x03, 0xe8]);
        assert!(wr.write_all(b"x").await.is_err(), "nothing after our close");
    }
}
