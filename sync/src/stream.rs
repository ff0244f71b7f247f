//! Reading control frames off a QUIC receive stream: the one place where the sans-I/O
//! [`Decoder`] meets quinn, shared by the gateway's and the receiver's drivers.

use crate::protocol::{Control, Decoder, ProtocolError};

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
