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
        Codec::Lz4 => {
            // Independent 64 KiB blocks, no content size, no checksums: what Kafka's Java
            // KafkaLZ4BlockInputStream and librdkafka both read.
            let info = lz4_flex::frame::FrameInfo::new()
                .block_size(lz4_flex::frame::BlockSize::Max64KB)
                .block_mode(lz4_flex::frame::BlockMode::Independent);
            let mut w = lz4_flex::frame::FrameEncoder::with_frame_info(info, out);
            w.write_all(input).map_err(|e| enc(&e))?;
            w.finish().map_err(|e| enc(&e))?;
        }
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
        Codec::Lz4 => read_bounded(lz4_flex::frame::FrameDecoder::new(input), limit, codec),
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
