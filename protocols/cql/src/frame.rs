//! The 9-byte frame header (8 bytes in v1/v2), opcodes, and splitting whole legacy frames off a
//! buffer.

use bytes::{BufMut, Bytes, BytesMut};

/// Header length from v3 on.
pub const HEADER_LEN: usize = 9;
/// Header length of v1 and v2 (one-byte stream id).
pub const LEGACY_HEADER_LEN: usize = 8;
/// The spec's frame size limit, and the default cap on any body or envelope.
pub const DEFAULT_MAX_BODY: usize = 256 * 1024 * 1024;
/// The most a decoder reserves ahead for a body it has not received yet.
const MAX_RESERVE: usize = 64 * 1024;

/// Header flag bits.
pub mod flags {
    /// The body is compressed (v4 framing only).
    pub const COMPRESSION: u8 = 0x01;
    /// Tracing requested; on a response, the body starts with the tracing id.
    pub const TRACING: u8 = 0x02;
    /// A `[bytes map]` custom payload precedes the message.
    pub const CUSTOM_PAYLOAD: u8 = 0x04;
    /// A response carries a `[string list]` of warnings.
    pub const WARNING: u8 = 0x08;
    /// The client accepts a beta protocol version.
    pub const USE_BETA: u8 = 0x10;
}

/// The message type of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    Error = 0x00,
    Startup = 0x01,
    Ready = 0x02,
    Authenticate = 0x03,
    Options = 0x05,
    Supported = 0x06,
    Query = 0x07,
    Result = 0x08,
    Prepare = 0x09,
    Execute = 0x0A,
    Register = 0x0B,
    Event = 0x0C,
    Batch = 0x0D,
    AuthChallenge = 0x0E,
    AuthResponse = 0x0F,
    AuthSuccess = 0x10,
}

impl Opcode {
    /// The opcode of a byte, if it is one.
    pub fn from_u8(b: u8) -> Option<Opcode> {
        use Opcode::*;
        Some(match b {
            0x00 => Error,
            0x01 => Startup,
            0x02 => Ready,
            0x03 => Authenticate,
            0x05 => Options,
            0x06 => Supported,
            0x07 => Query,
            0x08 => Result,
            0x09 => Prepare,
            0x0A => Execute,
            0x0B => Register,
            0x0C => Event,
            0x0D => Batch,
            0x0E => AuthChallenge,
            0x0F => AuthResponse,
            0x10 => AuthSuccess,
            _ => return None,
        })
    }

    /// Whether clients send this opcode.
    pub fn is_request(self) -> bool {
        use Opcode::*;
        matches!(
            self,
            Startup | Options | Query | Prepare | Execute | Register | Batch | AuthResponse
        )
    }

    /// The spec's name, e.g. `"QUERY"`.
    pub fn name(self) -> &'static str {
        use Opcode::*;
        match self {
            Error => "ERROR",
            Startup => "STARTUP",
            Ready => "READY",
            Authenticate => "AUTHENTICATE",
            Options => "OPTIONS",
            Supported => "SUPPORTED",
            Query => "QUERY",
            Result => "RESULT",
            Prepare => "PREPARE",
            Execute => "EXECUTE",
            Register => "REGISTER",
            Event => "EVENT",
            Batch => "BATCH",
            AuthChallenge => "AUTH_CHALLENGE",
            AuthResponse => "AUTH_RESPONSE",
            AuthSuccess => "AUTH_SUCCESS",
        }
    }
}

/// A frame (or v5 envelope) header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Protocol version without the direction bit.
    pub version: u8,
    /// The direction bit: set on server-to-client frames.
    pub response: bool,
    pub flags: u8,
    pub stream: i16,
    /// The raw opcode byte (see [`Opcode::from_u8`]).
    pub opcode: u8,
    /// Body length as declared.
    pub length: u32,
}

impl Header {
    /// A request header.
    pub fn request(version: u8, stream: i16, opcode: Opcode) -> Header {
        Header {
            version,
            response: false,
            flags: 0,
            stream,
            opcode: opcode as u8,
            length: 0,
        }
    }

    /// A response header.
    pub fn response(version: u8, stream: i16, opcode: Opcode) -> Header {
        Header {
            response: true,
            ..Header::request(version, stream, opcode)
        }
    }

    /// The header length for a version byte: 8 for v1/v2, 9 otherwise.
    pub fn len_for(version: u8) -> usize {
        if (version & 0x7f) <= 2 {
            LEGACY_HEADER_LEN
        } else {
            HEADER_LEN
        }
    }

    /// Parses a header from the start of `b`, if enough bytes are there.
    pub fn parse(b: &[u8]) -> Option<Header> {
        let first = *b.first()?;
        let version = first & 0x7f;
        let response = first & 0x80 != 0;
        if Header::len_for(first) == LEGACY_HEADER_LEN {
            if b.len() < LEGACY_HEADER_LEN {
                return None;
            }
            return Some(Header {
                version,
                response,
                flags: b[1],
                stream: i16::from(b[2] as i8),
                opcode: b[3],
                length: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            });
        }
        if b.len() < HEADER_LEN {
            return None;
        }
        Some(Header {
            version,
            response,
            flags: b[1],
            stream: i16::from_be_bytes([b[2], b[3]]),
            opcode: b[4],
            length: u32::from_be_bytes([b[5], b[6], b[7], b[8]]),
        })
    }

    /// The opcode, if the byte is a known one.
    pub fn opcode(&self) -> Option<Opcode> {
        Opcode::from_u8(self.opcode)
    }

    /// Writes the header (8 bytes for v1/v2) with `length` as the body length.
    pub fn encode(&self, length: usize, out: &mut BytesMut) {
        let first = self.version | if self.response { 0x80 } else { 0 };
        out.put_u8(first);
        out.put_u8(self.flags);
        if Header::len_for(self.version) == LEGACY_HEADER_LEN {
            out.put_u8(self.stream as u8);
        } else {
            out.put_i16(self.stream);
        }
        out.put_u8(self.opcode);
        out.put_u32(u32::try_from(length).unwrap_or(u32::MAX));
    }
}

/// A frame exactly as on the wire: the body may still be compressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: Header,
    pub body: Bytes,
}

impl Frame {
    /// Writes header and body.
    pub fn encode(&self, out: &mut BytesMut) {
        self.header.encode(self.body.len(), out);
        out.put_slice(&self.body);
    }
}

/// Why a byte stream cannot be framed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header's body length is above the cap. The body can be skipped to go on.
    #[error("frame body length {length} exceeds the limit of {max} bytes")]
    TooLarge {
        /// The header of the oversized frame.
        header: Header,
        /// Declared length.
        length: usize,
        /// The cap.
        max: usize,
    },
}

/// Splits one whole frame off the front of `buf`, or returns `Ok(None)` until one is buffered.
/// A declared length above `max_body` is an error as soon as the header is in, before any of
/// the body is awaited.
pub fn split_frame(buf: &mut BytesMut, max_body: usize) -> Result<Option<Frame>, FrameError> {
    let Some(header) = Header::parse(buf) else {
        return Ok(None);
    };
    let header_len = Header::len_for(header.version);
    let length = header.length as usize;
    if length > max_body {
        return Err(FrameError::TooLarge {
            header,
            length,
            max: max_body,
        });
    }
    let total = header_len + length;
    if buf.len() < total {
        buf.reserve((total - buf.len()).min(MAX_RESERVE));
        return Ok(None);
    }
    // The header is parsed already: skipped, not split off (one split per frame, not two).
    bytes::Buf::advance(buf, header_len);
    let body = buf.split_to(length).freeze();
    Ok(Some(Frame { header, body }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_and_v1_headers() {
        let h = Header::parse(&[0x84, 0, 0xff, 0xff, 0x0c, 0, 0, 0, 3]).unwrap();
        assert_eq!(
            (h.version, h.response, h.stream, h.opcode(), h.length),
            (4, true, -1, Some(Opcode::Event), 3)
        );
        let h = Header::parse(&[0x01, 0, 0x05, 0x05, 0, 0, 0, 0]).unwrap();
        assert_eq!((h.version, h.stream, h.opcode()), (1, 5, Some(Opcode::Options)));
        let mut out = BytesMut::new();
        h.encode(0, &mut out);
        assert_eq!(&out[..], &[0x01, 0, 0x05, 0x05, 0, 0, 0, 0]);
    }

    #[test]
    fn oversized_frame_is_refused_from_its_header() {
        let mut buf = BytesMut::from(&[0x04u8, 0, 0, 1, 7, 0x7f, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            split_frame(&mut buf, 1024),
            Err(FrameError::TooLarge { .. })
        ));
        let mut buf = BytesMut::from(&[0x04u8, 0, 0, 1, 5, 0, 0, 0, 2, 0xaa][..]);
        assert_eq!(split_frame(&mut buf, 1024), Ok(None));
        buf.put_u8(0xbb);
        let f = split_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(&f.body[..], &[0xaa, 0xbb]);
        assert!(buf.is_empty());
    }
}
