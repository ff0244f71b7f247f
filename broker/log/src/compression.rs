//! Record-batch payload codecs: gzip (flate2), snappy (raw and xerial-framed), lz4 (frame format),
//! zstd (compressed with C libzstd at Kafka's default level, decoded with the pure-Rust ruzstd).
//! Decompression is bounded: a batch that inflates past the configured limit is refused.

use std::io::{Read, Write};

use crate::config::Codec;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompressionError {
    #[error("{codec} data is corrupt: {message}")]
    Corrupt { codec: Codec, message: String },
    #[error("records decompress to more than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("{codec} compression failed: {message}")]
    Encode { codec: Codec, message: String },
}

/// Xerial snappy framing, as the Java client writes it: magic, version, compatible version.
const XERIAL_MAGIC: &[u8; 8] = b"\x82SNAPPY\x00";
const XERIAL_HEADER_LEN: usize = 16;
/// zstd's level for compression: Kafka's default (`compression.zstd.level` = 3).
const ZSTD_LEVEL: i32 = 3;

/// Compresses `input` with `codec`, appending to `out`.
pub fn compress(codec: Codec, input: &[u8], out: &mut Vec<u8>) -> Result<(), CompressionError> {
    let enc = |e: &dyn std::fmt::Display| CompressionError::Encode { codec, message: e.to_string() };
    match codec {
        Codec::None => out.extend_from_slice(input),
        Codec::Gzip => {
            let mut w = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
            w.write_all(input).map_err(|e| enc(&e))?;
            w.finish().map_err(|e| enc(&e))?;
        }
        Codec::Snappy => {
            let start = out.len();
            out.resize(start + snap::raw::max_compress_len(input.len()), 0);
            let n = snap::raw::Encoder::new().compress(input, &mut out[start..]).map_err(|e| enc(&e))?;
            out.truncate(start + n);
        }
        // Independent 64 KiB blocks, no content size, no checksums: what Kafka's Java
        // KafkaLZ4BlockInputStream and librdkafka both read.
        Codec::Lz4 => lz4_plain_compress(input, out).map_err(|e| enc(&e))?,
        Codec::Zstd => {
            // Kafka's default `compression.zstd.level`. ruzstd's encoder has only its fastest
            // level: a third more bytes on the smart-meter readings (BENCHMARKS.md, mirror).
            let compressed = zstd::bulk::compress(input, ZSTD_LEVEL).map_err(|e| enc(&e))?;
            out.extend_from_slice(&compressed);
        }
    }
    Ok(())
}

/// Decompresses `input`, refusing output larger than `limit` bytes.
pub fn decompress(codec: Codec, input: &[u8], limit: u64) -> Result<Vec<u8>, CompressionError> {
    let corrupt = |e: &dyn std::fmt::Display| CompressionError::Corrupt { codec, message: e.to_string() };
    match codec {
        Codec::None => {
            if input.len() as u64 > limit {
                return Err(CompressionError::TooLarge { limit });
            }
            Ok(input.to_vec())
        }
        Codec::Gzip => read_bounded(flate2::read::MultiGzDecoder::new(input), limit, codec),
        Codec::Lz4 => match lz4_plain_frame(input, limit) {
            Some(decoded) => decoded,
            None => read_bounded(lz4_flex::frame::FrameDecoder::new(input), limit, codec),
        },
        Codec::Zstd => {
            let dec = ruzstd::decoding::StreamingDecoder::new(input).map_err(|e| corrupt(&e))?;
            read_bounded(dec, limit, codec)
        }
        Codec::Snappy => {
            if input.len() >= XERIAL_HEADER_LEN && &input[..8] == XERIAL_MAGIC {
                let mut out = Vec::new();
                let mut rest = &input[XERIAL_HEADER_LEN..];
                while !rest.is_empty() {
                    if rest.len() < 4 {
                        return Err(corrupt(&"truncated xerial block length"));
                    }
                    let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                    rest = &rest[4..];
                    if len > rest.len() {
                        return Err(corrupt(&"xerial block longer than the batch"));
                    }
                    snappy_raw(&rest[..len], limit, &mut out)?;
                    rest = &rest[len..];
                }
                Ok(out)
            } else {
                let mut out = Vec::new();
                snappy_raw(input, limit, &mut out)?;
                Ok(out)
            }
        }
    }
}

fn snappy_raw(input: &[u8], limit: u64, out: &mut Vec<u8>) -> Result<(), CompressionError> {
    let corrupt =
        |e: &dyn std::fmt::Display| CompressionError::Corrupt { codec: Codec::Snappy, message: e.to_string() };
    let n = snap::raw::decompress_len(input).map_err(|e| corrupt(&e))?;
    if (out.len() + n) as u64 > limit {
        return Err(CompressionError::TooLarge { limit });
    }
    let start = out.len();
    out.resize(start + n, 0);
    let written = snap::raw::Decoder::new().decompress(input, &mut out[start..]).map_err(|e| corrupt(&e))?;
    out.truncate(start + written);
    Ok(())
}

/// The header of the LZ4 frames written here: magic, FLG (version 01, independent blocks),
/// BD (64 KiB blocks) and the header checksum (second byte of xxh32 of FLG and BD).
const LZ4_PLAIN_HEADER: [u8; 7] = [0x04, 0x22, 0x4D, 0x18, 0x60, 0x40, 0x82];
const LZ4_BLOCK_BYTES: usize = 64 * 1024;

/// An LZ4 frame of independent 64 KiB blocks, each compressed straight into `out` (a block that
/// does not shrink is stored as is): what the frame encoder writes with these settings, without
/// its 64 KiB working buffers per call.
fn lz4_plain_compress(input: &[u8], out: &mut Vec<u8>) -> Result<(), lz4_flex::block::CompressError> {
    let blocks = input.len().div_ceil(LZ4_BLOCK_BYTES);
    out.reserve(LZ4_PLAIN_HEADER.len() + 4 + blocks * 4 + lz4_flex::block::get_maximum_output_size(input.len()));
    out.extend_from_slice(&LZ4_PLAIN_HEADER);
    for block in input.chunks(LZ4_BLOCK_BYTES) {
        let at = out.len();
        out.resize(at + 4 + lz4_flex::block::get_maximum_output_size(block.len()), 0);
        let n = lz4_flex::block::compress_into(block, &mut out[at + 4..])?;
        if n < block.len() {
            out[at..at + 4].copy_from_slice(&(n as u32).to_le_bytes());
            out.truncate(at + 4 + n);
        } else {
            out.truncate(at);
            out.extend_from_slice(&(block.len() as u32 | 0x8000_0000).to_le_bytes());
            out.extend_from_slice(block);
        }
    }
    out.extend_from_slice(&0u32.to_le_bytes());
    Ok(())
}

/// The LZ4 frames written here and by Kafka's clients (independent blocks, no checksums, no
/// content size, no dictionary), decoded block by block into one vector of the exact size: the
/// frame decoder's 64 KiB working buffers and `read_to_end`'s doublings cost several allocations
/// and a `malloc_consolidate` per batch, and the MQTT delivery path decodes a small batch per
/// message. `None`: another kind of frame, for the frame decoder.
fn lz4_plain_frame(input: &[u8], limit: u64) -> Option<Result<Vec<u8>, CompressionError>> {
    const MAGIC: [u8; 4] = [0x04, 0x22, 0x4D, 0x18];
    // FLG: version 01, independent blocks, nothing else; BD: a block size code, nothing else.
    let (&[m0, m1, m2, m3, 0x60, bd, hc], blocks) = input.split_first_chunk::<7>()? else { return None };
    // The header checksum (second byte of xxh32 over FLG and BD) of FLG 0x60 with each block
    // size code: a frame whose checksum is wrong goes to the frame decoder, which refuses it.
    let want_hc = match bd {
        0x40 => 0x82,
        0x50 => 0xFB,
        0x60 => 0x51,
        0x70 => 0x73,
        _ => return None,
    };
    if [m0, m1, m2, m3] != MAGIC || hc != want_hc {
        return None;
    }
    let corrupt = |what: &str| CompressionError::Corrupt { codec: Codec::Lz4, message: format!("LZ4 frame: {what}") };
    // Each block's place and decoded size first, so the output is allocated once.
    let mut total = 0u64;
    let mut rest = blocks;
    loop {
        let Some((len, after)) = rest.split_first_chunk::<4>() else { return Some(Err(corrupt("truncated"))) };
        let len = u32::from_le_bytes(*len);
        if len == 0 {
            break;
        }
        let n = (len & 0x7FFF_FFFF) as usize;
        let Some(block) = after.get(..n) else { return Some(Err(corrupt("block longer than the frame"))) };
        let decoded = if len & 0x8000_0000 != 0 { n } else { lz4_block_len(block)? };
        total += decoded as u64;
        if total > limit {
            return Some(Err(CompressionError::TooLarge { limit }));
        }
        rest = &after[n..];
    }
    let mut out = vec![0u8; total as usize];
    let (mut at, mut rest) = (0usize, blocks);
    while let Some((len, after)) = rest.split_first_chunk::<4>() {
        let len = u32::from_le_bytes(*len);
        if len == 0 {
            break;
        }
        let n = (len & 0x7FFF_FFFF) as usize;
        let block = &after[..n];
        if len & 0x8000_0000 != 0 {
            out[at..at + n].copy_from_slice(block);
            at += n;
        } else {
            match lz4_flex::block::decompress_into(block, &mut out[at..]) {
                Ok(written) => at += written,
                Err(e) => return Some(Err(corrupt(&e.to_string()))),
            }
        }
        rest = &after[n..];
    }
    if at != out.len() {
        return Some(Err(corrupt("blocks decoded to another size than they announce")));
    }
    Some(Ok(out))
}

/// The decoded size of one LZ4 block, read from its sequences' lengths without decoding it;
/// `None` if the block is cut short (the frame decoder then says what is wrong).
fn lz4_block_len(b: &[u8]) -> Option<usize> {
    let (mut i, mut n) = (0usize, 0usize);
    let extra = |i: &mut usize, mut len: usize| -> Option<usize> {
        loop {
            let x = *b.get(*i)?;
            *i += 1;
            len = len.checked_add(usize::from(x))?;
            if x != 255 {
                return Some(len);
            }
        }
    };
    loop {
        let token = *b.get(i)?;
        i += 1;
        let mut literals = usize::from(token >> 4);
        if literals == 15 {
            literals = extra(&mut i, literals)?;
        }
        i = i.checked_add(literals).filter(|&e| e <= b.len())?;
        n = n.checked_add(literals)?;
        // The last sequence has literals only.
        if i == b.len() {
            return Some(n);
        }
        i = i.checked_add(2).filter(|&e| e <= b.len())?;
        let mut matched = usize::from(token & 15);
        if matched == 15 {
            matched = extra(&mut i, matched)?;
        }
        n = n.checked_add(matched + 4)?;
    }
}

fn read_bounded<R: Read>(reader: R, limit: u64, codec: Codec) -> Result<Vec<u8>, CompressionError> {
    let mut out = Vec::new();
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| CompressionError::Corrupt { codec, message: e.to_string() })?;
    if out.len() as u64 > limit {
        return Err(CompressionError::TooLarge { limit });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_codec_round_trips() {
        let input: Vec<u8> = (0..20_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        for codec in [Codec::None, Codec::Gzip, Codec::Snappy, Codec::Lz4, Codec::Zstd] {
            let mut c = Vec::new();
            compress(codec, &input, &mut c).expect("compress");
            assert_eq!(decompress(codec, &c, 1 << 20).expect("decompress"), input, "{codec}");
        }
    }

    #[test]
    fn plain_lz4_frames_decode_as_the_frame_decoder_reads_them() {
        let text: Vec<u8> =
            (0..300_000u32).flat_map(|i| format!("meter {} {}\n", i % 977, i % 13).into_bytes()).collect();
        let noise: Vec<u8> = (0..150_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for input in [&b""[..], b"x", &text[..200], &text[..], &noise[..]] {
            let mut c = Vec::new();
            compress(Codec::Lz4, input, &mut c).expect("compress");
            let fast = lz4_plain_frame(&c, 1 << 30).expect("a frame of the plain kind").expect("decoded");
            let mut reference = Vec::new();
            lz4_flex::frame::FrameDecoder::new(&c[..]).read_to_end(&mut reference).expect("reference");
            assert_eq!(fast, reference, "{} bytes", input.len());
            assert_eq!(fast, input);
            if !input.is_empty() {
                assert!(matches!(
                    lz4_plain_frame(&c, input.len() as u64 - 1),
                    Some(Err(CompressionError::TooLarge { .. }))
                ));
            }
        }
        // A wrong header checksum is not decoded here: the frame decoder refuses it.
        let mut bad = Vec::new();
        compress(Codec::Lz4, &text[..200], &mut bad).expect("compress");
        bad[6] ^= 1;
        assert!(lz4_plain_frame(&bad, 1 << 30).is_none());
        assert!(decompress(Codec::Lz4, &bad, 1 << 30).is_err(), "a wrong header checksum is refused");
        // Every block size code's checksum as the frame encoder writes it.
        for (size, bd) in [
            (lz4_flex::frame::BlockSize::Max64KB, 0x40u8),
            (lz4_flex::frame::BlockSize::Max256KB, 0x50),
            (lz4_flex::frame::BlockSize::Max1MB, 0x60),
            (lz4_flex::frame::BlockSize::Max4MB, 0x70),
        ] {
            let info =
                lz4_flex::frame::FrameInfo::new().block_size(size).block_mode(lz4_flex::frame::BlockMode::Independent);
            let mut w = lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::new());
            w.write_all(&text[..5000]).expect("write");
            let frame = w.finish().expect("finish");
            assert_eq!(frame[5], bd);
            let fast = lz4_plain_frame(&frame, 1 << 30).expect("the plain kind").expect("decoded");
            assert_eq!(fast, &text[..5000]);
        }
        // The frames written here (decoded by the frame decoder above) have the frame
        // encoder's header for these settings.
        let info = lz4_flex::frame::FrameInfo::new()
            .block_size(lz4_flex::frame::BlockSize::Max64KB)
            .block_mode(lz4_flex::frame::BlockMode::Independent);
        let mut w = lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::new());
        w.write_all(b"x").expect("write");
        assert_eq!(w.finish().expect("finish")[..7], LZ4_PLAIN_HEADER);
        // With checksums (another writer's choice): left to the frame decoder, which checks them.
        let info = lz4_flex::frame::FrameInfo::new().block_checksums(true).content_checksum(true);
        let mut w = lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::new());
        w.write_all(&text[..5000]).expect("write");
        let c = w.finish().expect("finish");
        assert!(lz4_plain_frame(&c, 1 << 30).is_none());
        assert_eq!(decompress(Codec::Lz4, &c, 1 << 30).expect("decoded"), &text[..5000]);
        // A truncated frame is an error, not a panic.
        let mut c = Vec::new();
        compress(Codec::Lz4, &text[..5000], &mut c).expect("compress");
        for cut in [8, c.len() / 2, c.len() - 4] {
            assert!(decompress(Codec::Lz4, &c[..cut], 1 << 30).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn bombs_are_refused() {
        let input = vec![0u8; 1 << 20];
        for codec in [Codec::Gzip, Codec::Snappy, Codec::Lz4, Codec::Zstd] {
            let mut c = Vec::new();
            compress(codec, &input, &mut c).expect("compress");
            assert_eq!(decompress(codec, &c, 4096), Err(CompressionError::TooLarge { limit: 4096 }), "{codec}");
        }
    }

    #[test]
    fn xerial_snappy_is_read() {
        let input = b"hello hello hello hello snappy".repeat(10);
        let block = snap::raw::Encoder::new().compress_vec(&input).expect("compress");
        let mut framed = XERIAL_MAGIC.to_vec();
        framed.extend_from_slice(&1i32.to_be_bytes());
        framed.extend_from_slice(&1i32.to_be_bytes());
        framed.extend_from_slice(&(block.len() as u32).to_be_bytes());
        framed.extend_from_slice(&block);
        assert_eq!(decompress(Codec::Snappy, &framed, 1 << 20).expect("xerial"), input);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for codec in [Codec::Gzip, Codec::Snappy, Codec::Lz4, Codec::Zstd] {
            assert!(decompress(codec, b"\x00\x01garbage\xff\xfe", 1 << 20).is_err(), "{codec}");
        }
    }
}
