//! The framing state of one connection, in both directions: legacy frames (optionally
//! compressed) until the handshake ends, then, for v5, segments. Turns buffered bytes into
//! envelopes with uncompressed bodies and back; no I/O.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use crate::compression::Compression;
use crate::error::DecodeError;
use crate::frame::{flags, split_frame, Frame, FrameError, Header, DEFAULT_MAX_BODY};
use crate::segment::{encode_envelopes, split_segment, SegmentError};

/// How the bytes of a connection are framed right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// v4-style frames; bodies with the compression flag use this algorithm.
    Frames(Compression),
    /// v5 segments, LZ4-compressed or not.
    Segments { lz4: bool },
}

impl Framing {
    /// The framing that follows a successful STARTUP (READY or AUTHENTICATE) for `version`
    /// and the negotiated compression.
    pub fn after_startup(version: u8, compression: Compression) -> Framing {
        if version >= 5 {
            Framing::Segments {
                lz4: compression == Compression::Lz4,
            }
        } else {
            Framing::Frames(compression)
        }
    }
}

/// One message: a header and its uncompressed body (the compression flag is cleared).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub header: Header,
    pub body: Bytes,
}

impl Envelope {
    /// An envelope with `body`; the header's length is taken from the body.
    pub fn new(mut header: Header, body: Bytes) -> Envelope {
        header.flags &= !flags::COMPRESSION;
        header.length = u32::try_from(body.len()).unwrap_or(u32::MAX);
        Envelope { header, body }
    }

    /// The envelope as uncompressed wire bytes (header + body).
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(9 + self.body.len());
        Frame {
            header: self.header,
            body: self.body.clone(),
        }
        .encode(&mut out);
        out.freeze()
    }
}

/// What stopped decoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// A frame above the size cap; its body is skipped, so the connection can go on.
    #[error(transparent)]
    TooLarge(#[from] FrameError),
    /// A compressed body that does not decompress (or compression was never negotiated).
    /// The frame was delimited, so the connection can go on.
    #[error("frame on stream {}: {error}", header.stream)]
    Body { header: Header, error: DecodeError },
    /// A segment with a bad checksum or payload: the stream is lost.
    #[error(transparent)]
    Segment(#[from] SegmentError),
    /// Envelopes do not line up with segment boundaries: the stream is lost.
    #[error("malformed envelope inside segments: {0}")]
    Envelope(String),
}

impl CodecError {
    /// Whether the connection must be closed (after reporting the error).
    pub fn is_fatal(&self) -> bool {
        matches!(self, CodecError::Segment(_) | CodecError::Envelope(_))
    }

    /// The header of the frame at fault, when there is one.
    pub fn header(&self) -> Option<Header> {
        match self {
            CodecError::TooLarge(FrameError::TooLarge { header, .. }) => Some(*header),
            CodecError::Body { header, .. } => Some(*header),
            _ => None,
        }
    }
}

/// Turns the bytes one peer sends into envelopes.
#[derive(Debug)]
pub struct Decoder {
    framing: Framing,
    max_body: usize,
    skip: usize,
    partial: BytesMut,
    ready: VecDeque<Envelope>,
    lost: bool,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(DEFAULT_MAX_BODY)
    }
}

impl Decoder {
    /// A decoder for a new connection (uncompressed frames), capping bodies at `max_body`.
    pub fn new(max_body: usize) -> Decoder {
        Decoder {
            framing: Framing::Frames(Compression::None),
            max_body,
            skip: 0,
            partial: BytesMut::new(),
            ready: VecDeque::new(),
            lost: false,
        }
    }

    /// Switches framing, e.g. after READY.
    pub fn set_framing(&mut self, framing: Framing) {
        self.framing = framing;
    }

    /// The framing in force.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// The next whole envelope in `buf`, or `Ok(None)` until one is buffered. After a fatal
    /// error every call fails again.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Envelope>, CodecError> {
        if self.lost {
            return Err(CodecError::Envelope("the stream was already lost".into()));
        }
        if let Some(env) = self.ready.pop_front() {
            return Ok(Some(env));
        }
        let out = match self.framing {
            Framing::Frames(c) => self.decode_frame(buf, c),
            Framing::Segments { lz4 } => self.decode_segments(buf, lz4),
        };
        if matches!(&out, Err(e) if e.is_fatal()) {
            self.lost = true;
        }
        out
    }

    fn decode_frame(&mut self, buf: &mut BytesMut, c: Compression) -> Result<Option<Envelope>, CodecError> {
        if self.skip > 0 {
            let n = self.skip.min(buf.len());
            let _ = buf.split_to(n);
            self.skip -= n;
            if self.skip > 0 {
                return Ok(None);
            }
        }
        let frame = match split_frame(buf, self.max_body) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(None),
            Err(e) => {
                let FrameError::TooLarge { header, length, .. } = &e;
                let header_len = Header::len_for(header.version);
                let _ = buf.split_to(header_len);
                self.skip = *length;
                return Err(e.into());
            }
        };
        if frame.header.flags & flags::COMPRESSION == 0 {
            return Ok(Some(Envelope::new(frame.header, frame.body)));
        }
        if c == Compression::None {
            return Err(CodecError::Body {
                header: frame.header,
                error: DecodeError::invalid("frame", "compressed body but no compression was negotiated"),
            });
        }
        match c.decompress(&frame.body, self.max_body) {
            Ok(body) => Ok(Some(Envelope::new(frame.header, Bytes::from(body)))),
            Err(error) => Err(CodecError::Body {
                header: frame.header,
                error,
            }),
        }
    }

    fn decode_segments(&mut self, buf: &mut BytesMut, lz4: bool) -> Result<Option<Envelope>, CodecError> {
        loop {
            let Some(segment) = split_segment(buf, lz4)? else {
                return Ok(None);
            };
            let data = segment.data()?;
            if segment.self_contained && !self.partial.is_empty() {
                return Err(CodecError::Envelope(
                    "self-contained segment before the previous envelope was complete".into(),
                ));
            }
            self.partial.extend_from_slice(&data);
            loop {
                match split_frame(&mut self.partial, self.max_body) {
                    Ok(Some(f)) => {
                        if f.header.flags & flags::COMPRESSION != 0 {
                            return Err(CodecError::Envelope(
                                "compression flag set inside a segment".into(),
                            ));
                        }
                        self.ready.push_back(Envelope::new(f.header, f.body));
                    }
                    Ok(None) => break,
                    Err(e) => return Err(CodecError::Envelope(e.to_string())),
                }
            }
            if segment.self_contained && !self.partial.is_empty() {
                return Err(CodecError::Envelope(
                    "self-contained segment ends inside an envelope".into(),
                ));
            }
            if let Some(env) = self.ready.pop_front() {
                return Ok(Some(env));
            }
        }
    }
}

/// Turns envelopes into the bytes sent to one peer.
#[derive(Debug, Clone, Copy)]
pub struct Encoder {
    framing: Framing,
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder::new()
    }
}

impl Encoder {
    /// An encoder for a new connection (uncompressed frames).
    pub fn new() -> Encoder {
        Encoder {
            framing: Framing::Frames(Compression::None),
        }
    }

    /// Switches framing, e.g. for READY and everything after it.
    pub fn set_framing(&mut self, framing: Framing) {
        self.framing = framing;
    }

    /// The framing in force.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Writes one envelope.
    pub fn encode(&self, env: &Envelope, out: &mut BytesMut) {
        self.encode_all(std::slice::from_ref(env), out);
    }

    /// Writes several envelopes; with segments, small ones share a segment.
    pub fn encode_all(&self, envs: &[Envelope], out: &mut BytesMut) {
        match self.framing {
            Framing::Frames(Compression::None) => {
                for env in envs {
                    env.header.encode(env.body.len(), out);
                    out.extend_from_slice(&env.body);
                }
            }
            Framing::Frames(c) => {
                for env in envs {
                    let mut header = env.header;
                    header.flags |= flags::COMPRESSION;
                    let body = c.compress(&env.body);
                    header.encode(body.len(), out);
                    out.extend_from_slice(&body);
                }
            }
            Framing::Segments { lz4 } => {
                let raw: Vec<Bytes> = envs.iter().map(Envelope::to_bytes).collect();
                encode_envelopes(&raw, lz4, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Opcode;

    fn env(stream: i16, body: &[u8]) -> Envelope {
        Envelope::new(
            Header::request(5, stream, Opcode::Query),
            Bytes::copy_from_slice(body),
        )
    }

    #[test]
    fn every_framing_round_trips() {
        let envs = vec![env(1, b"abc"), env(2, &vec![9u8; 200_000]), env(3, b"")];
        for framing in [
            Framing::Frames(Compression::None),
            Framing::Frames(Compression::Lz4),
            Framing::Frames(Compression::Snappy),
            Framing::Segments { lz4: false },
            Framing::Segments { lz4: true },
        ] {
            let mut enc = Encoder::new();
            enc.set_framing(framing);
            let mut wire = BytesMut::new();
            enc.encode_all(&envs, &mut wire);
            let mut dec = Decoder::default();
            dec.set_framing(framing);
            // Feed byte ranges of odd sizes to exercise partial input.
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for chunk in wire.chunks(7919) {
                buf.extend_from_slice(chunk);
                while let Some(e) = dec.decode(&mut buf).unwrap() {
                    got.push(e);
                }
            }
            assert_eq!(got, envs, "{framing:?}");
        }
    }

    #[test]
    fn oversized_frames_are_skipped_and_the_next_one_decodes() {
        let mut dec = Decoder::new(16);
        let mut wire = BytesMut::new();
        Encoder::new().encode_all(&[env(1, &[1u8; 40]), env(2, b"ok")], &mut wire);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&wire[..20]);
        let err = dec.decode(&mut buf).unwrap_err();
        assert_eq!(err.header().map(|h| h.stream), Some(1));
        assert!(!err.is_fatal());
        buf.extend_from_slice(&wire[20..]);
        assert_eq!(dec.decode(&mut buf).unwrap().unwrap().header.stream, 2);
    }
}
