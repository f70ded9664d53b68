//! v5 segment framing: a small header protected by CRC24, a payload of at most 128 KiB - 1
//! protected by CRC32, optionally LZ4-compressed. Envelopes (v4-style frames) travel inside the
//! payloads: several small ones in one self-contained segment, or one large one split across
//! several segments that are not self-contained.

use bytes::{BufMut, Bytes, BytesMut};

use crate::compression::lz4_block;
use crate::crc::{crc24, segment_crc32};
use crate::error::DecodeError;

/// The largest payload one segment carries (17 bits).
pub const MAX_PAYLOAD: usize = 131_071;
const CRC24_LEN: usize = 3;
const CRC32_LEN: usize = 4;

/// One segment as on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// The payload as sent: LZ4-compressed when `lz4` and `uncompressed_len > 0`.
    pub payload: Bytes,
    /// LZ4 framing only: the payload's size before compression, 0 when stored uncompressed.
    pub uncompressed_len: usize,
    /// Whether the payload holds only whole envelopes.
    pub self_contained: bool,
    /// LZ4 framing (8-byte header) rather than uncompressed framing (6-byte header).
    pub lz4: bool,
}

/// Why a segment is unusable. The stream cannot be resynchronised after any of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    #[error("segment header CRC24 mismatch (computed {computed:06x}, received {received:06x})")]
    HeaderCrc { computed: u32, received: u32 },
    #[error("segment payload CRC32 mismatch (computed {computed:08x}, received {received:08x})")]
    PayloadCrc { computed: u32, received: u32 },
    #[error("segment payload: {0}")]
    Payload(DecodeError),
}

fn header_len(lz4: bool) -> usize {
    if lz4 {
        5
    } else {
        3
    }
}

fn read_le(b: &[u8]) -> u64 {
    b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
}

fn write_le(out: &mut BytesMut, v: u64, n: usize) {
    for i in 0..n {
        out.put_u8((v >> (8 * i)) as u8);
    }
}

/// Splits one whole segment off the front of `buf`, or `Ok(None)` until one is buffered.
/// Header and payload checksums are verified here.
pub fn split_segment(buf: &mut BytesMut, lz4: bool) -> Result<Option<Segment>, SegmentError> {
    let hlen = header_len(lz4);
    if buf.len() < hlen + CRC24_LEN {
        return Ok(None);
    }
    let header = read_le(&buf[..hlen]);
    let received = read_le(&buf[hlen..hlen + CRC24_LEN]) as u32;
    let computed = crc24(header, hlen);
    if computed != received {
        return Err(SegmentError::HeaderCrc { computed, received });
    }
    let payload_len = (header & 0x1_ffff) as usize;
    let (uncompressed_len, self_contained) = if lz4 {
        (((header >> 17) & 0x1_ffff) as usize, header & (1 << 34) != 0)
    } else {
        (0, header & (1 << 17) != 0)
    };
    let total = hlen + CRC24_LEN + payload_len + CRC32_LEN;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut whole = buf.split_to(total);
    let _ = whole.split_to(hlen + CRC24_LEN);
    let payload = whole.split_to(payload_len).freeze();
    let received = read_le(&whole[..CRC32_LEN]) as u32;
    let computed = segment_crc32(&payload);
    if computed != received {
        return Err(SegmentError::PayloadCrc { computed, received });
    }
    Ok(Some(Segment {
        payload,
        uncompressed_len,
        self_contained,
        lz4,
    }))
}

impl Segment {
    /// A segment carrying `data` (at most [`MAX_PAYLOAD`] bytes; the rest is not sent). With
    /// LZ4 the payload is compressed only when that makes it smaller, as Cassandra does.
    pub fn new(data: Bytes, self_contained: bool, lz4: bool) -> Segment {
        let data = data.slice(..data.len().min(MAX_PAYLOAD));
        if lz4 && !data.is_empty() {
            let z = lz4_flex::block::compress(&data);
            if z.len() < data.len() {
                return Segment {
                    uncompressed_len: data.len(),
                    payload: Bytes::from(z),
                    self_contained,
                    lz4,
                };
            }
        }
        Segment {
            payload: data,
            uncompressed_len: 0,
            self_contained,
            lz4,
        }
    }

    /// Writes the segment with freshly computed checksums.
    pub fn encode(&self, out: &mut BytesMut) {
        let hlen = header_len(self.lz4);
        let len = self.payload.len().min(MAX_PAYLOAD) as u64;
        let header = if self.lz4 {
            len | ((self.uncompressed_len.min(MAX_PAYLOAD) as u64) << 17)
                | (u64::from(self.self_contained) << 34)
        } else {
            len | (u64::from(self.self_contained) << 17)
        };
        write_le(out, header, hlen);
        write_le(out, u64::from(crc24(header, hlen)), CRC24_LEN);
        let payload = &self.payload[..len as usize];
        out.put_slice(payload);
        write_le(out, u64::from(segment_crc32(payload)), CRC32_LEN);
    }

    /// The payload after decompression.
    pub fn data(&self) -> Result<Bytes, SegmentError> {
        if !self.lz4 || self.uncompressed_len == 0 {
            return Ok(self.payload.clone());
        }
        lz4_block(&self.payload, self.uncompressed_len, MAX_PAYLOAD)
            .map(Bytes::from)
            .map_err(SegmentError::Payload)
    }
}

/// Packs whole envelopes into segments: consecutive small envelopes share self-contained
/// segments; an envelope larger than one payload is split over segments that are not.
pub fn encode_envelopes(envelopes: &[Bytes], lz4: bool, out: &mut BytesMut) {
    let mut pending = BytesMut::new();
    for env in envelopes {
        if env.len() > MAX_PAYLOAD {
            flush(&mut pending, lz4, out);
            let mut rest = env.clone();
            while !rest.is_empty() {
                let part = rest.split_to(rest.len().min(MAX_PAYLOAD));
                Segment::new(part, false, lz4).encode(out);
            }
            continue;
        }
        if pending.len() + env.len() > MAX_PAYLOAD {
            flush(&mut pending, lz4, out);
        }
        pending.put_slice(env);
    }
    flush(&mut pending, lz4, out);
}

fn flush(pending: &mut BytesMut, lz4: bool, out: &mut BytesMut) {
    if !pending.is_empty() {
        Segment::new(pending.split().freeze(), true, lz4).encode(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_lz4_segment_round_trips() {
        // capture_v5_lz4, conn 1 c2s seq 2: REGISTER, compressed.
        let hex = "35007400044e496cf615050000020b000000310003000f544f504f4c4f47595f4348414e4745000d5354415455530f00c04348454d415f4348414e47454b9787a9";
        let wire: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let mut buf = BytesMut::from(&wire[..]);
        let seg = split_segment(&mut buf, true).unwrap().unwrap();
        assert!(buf.is_empty() && seg.self_contained);
        assert_eq!(seg.uncompressed_len, 58);
        assert_eq!(seg.data().unwrap().len(), 58);
        let mut out = BytesMut::new();
        seg.encode(&mut out);
        assert_eq!(&out[..], &wire[..]);
    }

    #[test]
    fn corrupted_crcs_are_detected() {
        let mut out = BytesMut::new();
        Segment::new(Bytes::from_static(b"hello"), true, false).encode(&mut out);
        let mut bad = out.clone();
        bad[0] ^= 1;
        assert!(matches!(
            split_segment(&mut bad, false),
            Err(SegmentError::HeaderCrc { .. })
        ));
        let mut bad = out.clone();
        bad[7] ^= 1;
        assert!(matches!(
            split_segment(&mut bad, false),
            Err(SegmentError::PayloadCrc { .. })
        ));
        let seg = split_segment(&mut out, false).unwrap().unwrap();
        assert_eq!(&seg.data().unwrap()[..], b"hello");
    }

    #[test]
    fn large_envelopes_split_and_small_ones_share() {
        let big = Bytes::from(vec![7u8; MAX_PAYLOAD + 10]);
        let small = Bytes::from_static(b"0123456789");
        for lz4 in [false, true] {
            let mut out = BytesMut::new();
            encode_envelopes(
                &[small.clone(), small.clone(), big.clone(), small.clone()],
                lz4,
                &mut out,
            );
            let mut segs = Vec::new();
            while let Some(s) = split_segment(&mut out, lz4).unwrap() {
                segs.push(s);
            }
            let kinds: Vec<_> = segs
                .iter()
                .map(|s| (s.self_contained, s.data().unwrap().len()))
                .collect();
            assert_eq!(kinds, [(true, 20), (false, MAX_PAYLOAD), (false, 10), (true, 10)]);
        }
    }
}
