//! Body compression as negotiated in STARTUP: LZ4 and Snappy for v4 frames (v5 compresses
//! whole segments with LZ4 instead, see [`crate::segment`]).

use crate::error::DecodeError;

/// A compression algorithm a connection may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    #[default]
    None,
    Lz4,
    Snappy,
}

impl Compression {
    /// The algorithm a STARTUP `COMPRESSION` option names (case-insensitive), if supported.
    pub fn from_name(name: &str) -> Option<Compression> {
        match name.to_ascii_lowercase().as_str() {
            "lz4" => Some(Compression::Lz4),
            "snappy" => Some(Compression::Snappy),
            _ => None,
        }
    }

    /// The STARTUP option value, `None` for no compression.
    pub fn name(self) -> Option<&'static str> {
        match self {
            Compression::None => None,
            Compression::Lz4 => Some("lz4"),
            Compression::Snappy => Some("snappy"),
        }
    }

    /// Compresses a v4 frame body.
    pub fn compress(self, body: &[u8]) -> Vec<u8> {
        match self {
            Compression::None => body.to_vec(),
            Compression::Lz4 => {
                let mut out = Vec::with_capacity(4 + lz4_flex::block::get_maximum_output_size(body.len()));
                out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
                out.extend_from_slice(&lz4_flex::block::compress(body));
                out
            }
            // Raw snappy of an in-memory slice only fails beyond ~4 GB, which no frame reaches.
            Compression::Snappy => snap::raw::Encoder::new().compress_vec(body).unwrap_or_default(),
        }
    }

    /// Decompresses a v4 frame body, refusing a declared size above `max`.
    pub fn decompress(self, body: &[u8], max: usize) -> Result<Vec<u8>, DecodeError> {
        match self {
            Compression::None => Ok(body.to_vec()),
            Compression::Lz4 => {
                if body.len() < 4 {
                    return Err(DecodeError::Truncated("lz4 body"));
                }
                let len = u32::from_be_bytes([body[0], body[1], body[2], body[3]]) as usize;
                lz4_block(&body[4..], len, max)
            }
            Compression::Snappy => {
                let len = snap::raw::decompress_len(body)
                    .map_err(|e| DecodeError::invalid("snappy body", e.to_string()))?;
                if len > max {
                    return Err(DecodeError::TooLong {
                        what: "snappy body",
                        len,
                        max,
                    });
                }
                snap::raw::Decoder::new()
                    .decompress_vec(body)
                    .map_err(|e| DecodeError::invalid("snappy body", e.to_string()))
            }
        }
    }
}

/// Decompresses a raw LZ4 block that must expand to exactly `len` bytes (at most `max`).
pub fn lz4_block(block: &[u8], len: usize, max: usize) -> Result<Vec<u8>, DecodeError> {
    if len > max {
        return Err(DecodeError::TooLong {
            what: "lz4 body",
            len,
            max,
        });
    }
    // Each input byte expands to at most 255 output bytes: a cheap bound that stops a tiny
    // block from claiming a huge size.
    if len > block.len().saturating_mul(255).saturating_add(16) {
        return Err(DecodeError::invalid(
            "lz4 body",
            "declared size is impossible for the block",
        ));
    }
    let mut out = vec![0u8; len];
    match lz4_flex::block::decompress_into(block, &mut out) {
        Ok(n) if n == len => Ok(out),
        Ok(n) => Err(DecodeError::invalid(
            "lz4 body",
            format!("expanded to {n} bytes, expected {len}"),
        )),
        Err(e) => Err(DecodeError::invalid("lz4 body", e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_algorithms_round_trip() {
        let body: Vec<u8> = (0..5000u32).map(|i| (i % 7) as u8).collect();
        for c in [Compression::Lz4, Compression::Snappy, Compression::None] {
            let z = c.compress(&body);
            assert_eq!(c.decompress(&z, 1 << 20).unwrap(), body, "{c:?}");
        }
    }

    #[test]
    fn declared_sizes_are_capped() {
        let z = Compression::Lz4.compress(&[0u8; 4000]);
        assert!(matches!(
            Compression::Lz4.decompress(&z, 100),
            Err(DecodeError::TooLong { .. })
        ));
        let z = Compression::Snappy.compress(&[0u8; 4000]);
        assert!(matches!(
            Compression::Snappy.decompress(&z, 100),
            Err(DecodeError::TooLong { .. })
        ));
        assert!(Compression::Lz4
            .decompress(&[0x7f, 0xff, 0xff, 0xff, 0], usize::MAX)
            .is_err());
        // The recorded READY of a v4 lz4 session: size 0, then an empty block.
        assert_eq!(
            Compression::Lz4.decompress(&[0, 0, 0, 0, 0], 100).unwrap(),
            Vec::<u8>::new()
        );
    }
}
