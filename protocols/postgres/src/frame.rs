//! Five-byte message framing (tag + length) and untagged startup-packet framing.
//!
//! Done by hand rather than through pgwire's codec: sluice forwards the raw bytes and only looks
//! inside the few messages it routes on, so all it needs is "where does this message end".

use bytes::{Bytes, BytesMut};

/// Upper bound on any startup-phase packet (PostgreSQL's `MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_LEN: usize = 10_000;

/// Smallest startup-phase packet: length + request code.
const MIN_STARTUP_LEN: usize = 8;

/// Size of a tagged message header: tag byte + i32 length.
const HEADER_LEN: usize = 5;

/// The most `split_message` reserves ahead for an incomplete message.
const MAX_RESERVE: usize = 64 * 1024;

/// A length prefix that cannot be framed. Always the peer's fault, and the stream cannot be
/// resynchronised: close the connection after reporting it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// Declared length is below the minimum (4 for tagged messages, 8 for startup packets).
    #[error("invalid message length {len} (minimum is {min})")]
    TooShort {
        /// Declared length.
        len: i32,
        /// The minimum for this kind of message.
        min: i32,
    },
    /// Declared length is above the cap in force.
    #[error("message length {len} exceeds the limit of {max} bytes")]
    TooLong {
        /// Declared length.
        len: usize,
        /// The cap in force.
        max: usize,
    },
}

/// One complete tagged message, kept as the raw bytes that arrived so it can be forwarded
/// untouched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    tag: u8,
    raw: Bytes,
}

impl Message {
    /// The message type byte.
    pub fn tag(&self) -> u8 {
        self.tag
    }

    /// The whole message: tag, length and body.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    /// The body, after the 5-byte header.
    pub fn body(&self) -> &[u8] {
        &self.raw[HEADER_LEN..]
    }

    /// The whole message, for forwarding untouched.
    pub fn into_raw(self) -> Bytes {
        self.raw
    }
}

/// Reads the big-endian i32 at `buf[at..at + 4]`; the caller has checked the bounds.
fn read_i32(buf: &[u8], at: usize) -> i32 {
    i32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

/// One complete tagged message off the front of `buf`; `Ok(None)` if incomplete. `max_len` caps
/// the declared length (the value of the length field, which counts itself but not the tag); it
/// is checked before waiting for or allocating the body.
///
/// When the message is incomplete, `buf` grows by at most 64 KiB towards it: a peer that
/// announces a large message must send it before sluice holds that much memory.
pub fn split_message(buf: &mut BytesMut, max_len: usize) -> Result<Option<Message>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let declared = read_i32(buf, 1);
    if declared < 4 {
        return Err(FrameError::TooShort {
            len: declared,
            min: 4,
        });
    }
    let len = declared as usize;
    if len > max_len {
        return Err(FrameError::TooLong { len, max: max_len });
    }
    let total = 1 + len;
    if buf.len() < total {
        buf.reserve((total - buf.len()).min(MAX_RESERVE));
        return Ok(None);
    }
    let tag = buf[0];
    let raw = buf.split_to(total).freeze();
    Ok(Some(Message { tag, raw }))
}

/// The tag and total length (tag included) of the complete, well-formed message at the front
/// of `buf`, leaving it there; `None` if it is incomplete or its length is out of bounds
/// ([`split_message`] reports those). For relaying runs of messages without splitting each.
pub fn peek_message(buf: &[u8], max_len: usize) -> Option<(u8, usize)> {
    if buf.len() < HEADER_LEN {
        return None;
    }
    let declared = read_i32(buf, 1);
    let len = usize::try_from(declared)
        .ok()
        .filter(|l| (4..=max_len).contains(l))?;
    (buf.len() > len).then_some((buf[0], 1 + len))
}

/// One complete untagged startup-phase packet (length includes itself, capped at
/// [`MAX_STARTUP_LEN`], minimum 8 — reported as [`FrameError::TooShort`]); `Ok(None)` if
/// incomplete. The returned bytes include the length prefix, ready for
/// [`StartupPacket::parse`](crate::startup::StartupPacket::parse).
pub fn split_startup(buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let declared = read_i32(buf, 0);
    if declared < MIN_STARTUP_LEN as i32 {
        return Err(FrameError::TooShort {
            len: declared,
            min: MIN_STARTUP_LEN as i32,
        });
    }
    let len = declared as usize;
    if len > MAX_STARTUP_LEN {
        return Err(FrameError::TooLong {
            len,
            max: MAX_STARTUP_LEN,
        });
    }
    if buf.len() < len {
        buf.reserve(len - buf.len());
        return Ok(None);
    }
    Ok(Some(buf.split_to(len).freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn incomplete_header_and_body() {
        let full = msg(b'Q', b"SELECT 1\0");
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert_eq!(split_message(&mut buf, 1 << 20), Ok(None), "cut at {cut}");
            assert_eq!(&buf[..], &full[..cut], "incomplete input must stay buffered");
        }
    }

    #[test]
    fn complete_message_leaves_the_rest() {
        let mut bytes = msg(b'Q', b"SELECT 1\0");
        bytes.extend_from_slice(&msg(b'S', b"")[..3]);
        let mut buf = BytesMut::from(&bytes[..]);
        let m = split_message(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(m.tag(), b'Q');
        assert_eq!(m.body(), b"SELECT 1\0");
        assert_eq!(&m.raw()[..], &msg(b'Q', b"SELECT 1\0")[..]);
        assert_eq!(buf.len(), 3);
        assert_eq!(split_message(&mut buf, 1 << 20), Ok(None));
    }

    #[test]
    fn empty_body() {
        let mut buf = BytesMut::from(&[b'S', 0, 0, 0, 4][..]);
        let m = split_message(&mut buf, 4).unwrap().unwrap();
        assert_eq!(m.tag(), b'S');
        assert!(m.body().is_empty());
        assert_eq!(m.into_raw().len(), 5);
    }

    #[test]
    fn too_short() {
        let mut buf = BytesMut::from(&[b'Q', 0, 0, 0, 3][..]);
        assert_eq!(
            split_message(&mut buf, 100),
            Err(FrameError::TooShort { len: 3, min: 4 })
        );
        let mut buf = BytesMut::from(&[b'Q', 0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(
            split_message(&mut buf, 100),
            Err(FrameError::TooShort { len: -1, min: 4 })
        );
    }

    #[test]
    fn too_long_is_rejected_before_allocating() {
        // Claims 0x7fff_ffff bytes with only the header buffered.
        let mut buf = BytesMut::from(&[b'Q', 0x7f, 0xff, 0xff, 0xff][..]);
        let err = split_message(&mut buf, 1 << 20).unwrap_err();
        assert_eq!(
            err,
            FrameError::TooLong {
                len: 0x7fff_ffff,
                max: 1 << 20
            }
        );
        assert!(buf.capacity() < 1 << 20, "must not reserve what the peer claims");
        // Exactly at the cap is fine.
        let mut buf = BytesMut::from(&msg(b'd', &[7; 96])[..]);
        assert!(split_message(&mut buf, 100).unwrap().is_some());
        let mut buf = BytesMut::from(&msg(b'd', &[7; 97])[..]);
        assert_eq!(
            split_message(&mut buf, 100),
            Err(FrameError::TooLong { len: 101, max: 100 })
        );
    }

    #[test]
    fn startup_framing() {
        let ssl = [0u8, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        for cut in 0..ssl.len() {
            let mut buf = BytesMut::from(&ssl[..cut]);
            assert_eq!(split_startup(&mut buf), Ok(None));
        }
        let mut buf = BytesMut::from(&ssl[..]);
        buf.extend_from_slice(b"tail");
        assert_eq!(&split_startup(&mut buf).unwrap().unwrap()[..], &ssl[..]);
        assert_eq!(&buf[..], b"tail");

        let mut buf = BytesMut::from(&[0u8, 0, 0, 7, 0, 0, 0][..]);
        assert_eq!(
            split_startup(&mut buf),
            Err(FrameError::TooShort { len: 7, min: 8 })
        );
        let mut buf = BytesMut::from(&[0u8, 0, 0x27, 0x11][..]);
        assert_eq!(
            split_startup(&mut buf),
            Err(FrameError::TooLong {
                len: 10_001,
                max: MAX_STARTUP_LEN
            })
        );
        let mut buf = BytesMut::from(&[0x80u8, 0, 0, 0][..]);
        assert!(matches!(
            split_startup(&mut buf),
            Err(FrameError::TooShort { .. })
        ));
    }

    proptest! {
        #[test]
        fn split_message_never_panics(data in proptest::collection::vec(any::<u8>(), 0..256), max in 0usize..512) {
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = split_message(&mut buf, max) {}
        }

        /// `peek_message` sees exactly the messages `split_message` takes.
        #[test]
        fn peek_agrees_with_split(data in proptest::collection::vec(any::<u8>(), 0..256), max in 0usize..512) {
            let mut buf = BytesMut::from(&data[..]);
            loop {
                let peeked = peek_message(&buf, max);
                match split_message(&mut buf, max) {
                    Ok(Some(m)) => prop_assert_eq!(peeked, Some((m.tag(), m.raw().len()))),
                    _ => {
                        prop_assert_eq!(peeked, None);
                        break;
                    }
                }
            }
        }

        #[test]
        fn split_startup_never_panics(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = split_startup(&mut buf) {}
        }

        #[test]
        fn split_message_returns_concatenated_messages_in_order(
            msgs in proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..64)), 0..16),
            chunk in 1usize..40,
        ) {
            let wire: Vec<u8> = msgs.iter().flat_map(|(t, b)| msg(*t, b)).collect();
            // Feed in chunks to exercise the incomplete path too.
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            for piece in wire.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(m) = split_message(&mut buf, 1 << 16).unwrap() {
                    out.push((m.tag(), m.body().to_vec()));
                }
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(out, msgs);
        }
    }
}
