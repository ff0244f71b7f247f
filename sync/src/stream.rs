//! What the QUIC drivers on both sides share: reading control frames off a receive stream (the
//! one place where the sans-I/O [`Decoder`] meets quinn) and a partition stream's credit.

use std::sync::atomic::{AtomicI64, Ordering};

use tokio::sync::Notify;

use crate::protocol::{Control, Decoder, ProtocolError};

/// Credit the peer granted one partition's stream (bytes it may still send), and the wake-up of
/// its sender: the mirror's gateway side and the receiver's restore streams.
#[derive(Debug, Default)]
pub(crate) struct Credit {
    bytes: AtomicI64,
    more: Notify,
}

impl Credit {
    /// The peer granted `bytes` more.
    pub(crate) fn grant(&self, bytes: u64) {
        self.bytes.fetch_add(bytes.min(i64::MAX as u64) as i64, Ordering::Relaxed);
        self.more.notify_one();
    }

    /// Waits until some credit is left; how much.
    pub(crate) async fn wait(&self) -> u64 {
        loop {
            let notified = self.more.notified();
            let c = self.bytes.load(Ordering::Relaxed);
            if c > 0 {
                return c as u64;
            }
            notified.await;
        }
    }

    /// `len` bytes were sent.
    pub(crate) fn spend(&self, len: u64) {
        self.bytes.fetch_sub(len.min(i64::MAX as u64) as i64, Ordering::Relaxed);
    }
}

/// The next control frame, reading more of `recv` into `buf` as the decoder needs; `None` once
/// the peer finished the stream. The decoder's own limit bounds what it buffers.
pub(crate) async fn read_control<E>(
    recv: &mut quinn::RecvStream,
    decoder: &mut Decoder,
    buf: &mut [u8],
) -> Result<Option<Control>, E>
where
    E: From<ProtocolError> + From<quinn::ReadError>,
{
    loop {
        if let Some(c) = decoder.next_control()? {
            return Ok(Some(c));
        }
        match recv.read(buf).await? {
            Some(n) => decoder.feed(&buf[..n]),
            None => return Ok(None),
        }
    }
}
