//! Decoding of the untagged first packet a client sends (startup, SSL/GSS request, cancel).
//!
//! Written by hand rather than with pgwire's `Startup` decoder: that one keeps parameters in a
//! `BTreeMap` (losing order and duplicates), converts them lossily, accepts a missing final
//! terminator and reports an unsupported version without saying which, while sluice must answer
//! with a precise error and pass the parameters on as sent.

use bytes::Bytes;

use crate::peek::split_cstr;

const SSL_REQUEST_CODE: i32 = 80_877_103;
const GSSENC_REQUEST_CODE: i32 = 80_877_104;
const CANCEL_REQUEST_CODE: i32 = 80_877_102;
/// Protocol 3.2 allows cancel keys of up to 256 bytes.
const MAX_CANCEL_KEY_LEN: usize = 256;

/// The decoded first packet of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    /// SSLRequest (code 80877103).
    SslRequest,
    /// GSSENCRequest (code 80877104).
    GssEncRequest,
    /// CancelRequest (code 80877102).
    CancelRequest {
        /// Backend process id from BackendKeyData.
        pid: i32,
        /// Secret key: 4 bytes in protocol 3.0, up to 256 in 3.2.
        secret: Bytes,
    },
    /// StartupMessage.
    Startup {
        /// Protocol major version (always 3).
        major: u16,
        /// Protocol minor version as requested by the client.
        minor: u16,
        /// Parameters in the order sent.
        params: Vec<(String, String)>,
    },
}

/// A first packet sluice cannot accept. Always the client's fault; retrying the same packet
/// cannot help.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StartupError {
    /// Protocol major version other than 3.
    #[error("unsupported frontend protocol {major}.{minor}")]
    UnsupportedVersion {
        /// Requested major version.
        major: u16,
        /// Requested minor version.
        minor: u16,
    },
    /// Structurally invalid packet.
    #[error("malformed startup packet: {0}")]
    Malformed(&'static str),
}

impl StartupPacket {
    /// Decode a whole packet, length prefix included (as returned by
    /// [`split_startup`](crate::frame::split_startup)).
    ///
    /// Protocol major 3 with any minor is accepted (the minor is reported so the caller can
    /// negotiate); parameters must be NUL-terminated name/value pairs closed by an empty name,
    /// must be UTF-8, and must include `user`.
    pub fn parse(packet: &[u8]) -> Result<StartupPacket, StartupError> {
        if packet.len() < 8 {
            return Err(StartupError::Malformed("packet shorter than 8 bytes"));
        }
        let declared = i32::from_be_bytes([packet[0], packet[1], packet[2], packet[3]]);
        if usize::try_from(declared).ok() != Some(packet.len()) {
            return Err(StartupError::Malformed("length does not match packet size"));
        }
        let code = i32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
        let rest = &packet[8..];
        match code {
            SSL_REQUEST_CODE | GSSENC_REQUEST_CODE if !rest.is_empty() => {
                Err(StartupError::Malformed("trailing bytes after encryption request"))
            }
            SSL_REQUEST_CODE => Ok(StartupPacket::SslRequest),
            GSSENC_REQUEST_CODE => Ok(StartupPacket::GssEncRequest),
            CANCEL_REQUEST_CODE => {
                if rest.len() < 8 || rest.len() > 4 + MAX_CANCEL_KEY_LEN {
                    return Err(StartupError::Malformed("bad cancel request length"));
                }
                let pid = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
                Ok(StartupPacket::CancelRequest {
                    pid,
                    secret: Bytes::copy_from_slice(&rest[4..]),
                })
            }
            _ => {
                let major = (code as u32 >> 16) as u16;
                let minor = (code as u32 & 0xffff) as u16;
                if major != 3 {
                    return Err(StartupError::UnsupportedVersion { major, minor });
                }
                let params = parse_params(rest)?;
                if !params.iter().any(|(k, _)| k == "user") {
                    return Err(StartupError::Malformed("no user"));
                }
                Ok(StartupPacket::Startup { major, minor, params })
            }
        }
    }

    /// A startup parameter by name (the last one if sent twice, as PostgreSQL does); `None` for
    /// other packet kinds.
    pub fn param(&self, name: &str) -> Option<&str> {
        match self {
            StartupPacket::Startup { params, .. } => params
                .iter()
                .rev()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

/// Name/value C-string pairs ending with an empty name that must be the last byte.
fn parse_params(mut rest: &[u8]) -> Result<Vec<(String, String)>, StartupError> {
    let mut params = Vec::new();
    loop {
        let (name, after) = split_cstr(rest).ok_or(StartupError::Malformed("missing terminator"))?;
        if name.is_empty() {
            if !after.is_empty() {
                return Err(StartupError::Malformed("bytes after the final terminator"));
            }
            return Ok(params);
        }
        let (value, after) = split_cstr(after).ok_or(StartupError::Malformed("parameter without a value"))?;
        params.push((utf8(name)?, utf8(value)?));
        rest = after;
    }
}

fn utf8(b: &[u8]) -> Result<String, StartupError> {
    String::from_utf8(b.to_vec()).map_err(|_| StartupError::Malformed("parameter is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn packet(code: i32, body: &[u8]) -> Vec<u8> {
        let mut v = ((body.len() + 8) as i32).to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn ssl_and_gss_requests() {
        let ssl = [0x00, 0x00, 0x00, 0x08, 0x04, 0xd2, 0x16, 0x2f];
        assert_eq!(StartupPacket::parse(&ssl), Ok(StartupPacket::SslRequest));
        let gss = [0x00, 0x00, 0x00, 0x08, 0x04, 0xd2, 0x16, 0x30];
        assert_eq!(StartupPacket::parse(&gss), Ok(StartupPacket::GssEncRequest));
        assert!(StartupPacket::parse(&ssl).unwrap().param("user").is_none());
    }

    #[test]
    fn psql_startup_packet() {
        // As sent by psql 16: protocol 3.0, user, database, application_name, client_encoding.
        let bytes: &[u8] = b"\x00\x00\x00\x4c\x00\x03\x00\x00\
user\x00alice\x00database\x00app\x00application_name\x00psql\x00client_encoding\x00UTF8\x00\x00";
        assert_eq!(bytes.len(), 0x4c);
        let p = StartupPacket::parse(bytes).unwrap();
        assert_eq!(
            p,
            StartupPacket::Startup {
                major: 3,
                minor: 0,
                params: vec![
                    ("user".into(), "alice".into()),
                    ("database".into(), "app".into()),
                    ("application_name".into(), "psql".into()),
                    ("client_encoding".into(), "UTF8".into()),
                ],
            }
        );
        assert_eq!(p.param("user"), Some("alice"));
        assert_eq!(p.param("database"), Some("app"));
        assert_eq!(p.param("options"), None);
    }

    #[test]
    fn protocol_versions() {
        let body = b"user\0u\0\0";
        let p = StartupPacket::parse(&packet(0x0003_0002, body)).unwrap();
        assert!(matches!(
            p,
            StartupPacket::Startup {
                major: 3,
                minor: 2,
                ..
            }
        ));
        assert_eq!(
            StartupPacket::parse(&packet(0x0002_0000, body)),
            Err(StartupError::UnsupportedVersion { major: 2, minor: 0 })
        );
        assert_eq!(
            StartupPacket::parse(&packet(0x0004_0001, body)),
            Err(StartupError::UnsupportedVersion { major: 4, minor: 1 })
        );
    }

    #[test]
    fn cancel_request() {
        let bytes = [
            0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e, 0, 0, 0x30, 0x39, 0xde, 0xad, 0xbe, 0xef,
        ];
        assert_eq!(
            StartupPacket::parse(&bytes),
            Ok(StartupPacket::CancelRequest {
                pid: 12345,
                secret: Bytes::from_static(&[0xde, 0xad, 0xbe, 0xef])
            })
        );
        // Protocol 3.2: 32-byte key.
        let mut body = 7i32.to_be_bytes().to_vec();
        body.extend_from_slice(&[9; 32]);
        let p = StartupPacket::parse(&packet(CANCEL_REQUEST_CODE, &body)).unwrap();
        assert_eq!(
            p,
            StartupPacket::CancelRequest {
                pid: 7,
                secret: Bytes::from(vec![9; 32])
            }
        );
        assert!(StartupPacket::parse(&packet(CANCEL_REQUEST_CODE, &[0; 7])).is_err());
        assert!(StartupPacket::parse(&packet(CANCEL_REQUEST_CODE, &[0; 261])).is_err());
    }

    #[test]
    fn malformed_packets() {
        let m = |body: &[u8]| StartupPacket::parse(&packet(0x0003_0000, body));
        assert_eq!(m(b"database\0x\0\0"), Err(StartupError::Malformed("no user")));
        assert_eq!(m(b""), Err(StartupError::Malformed("missing terminator")));
        assert_eq!(
            m(b"user\0u\0"),
            Err(StartupError::Malformed("missing terminator"))
        );
        assert_eq!(
            m(b"user\0u"),
            Err(StartupError::Malformed("parameter without a value"))
        );
        assert_eq!(
            m(b"user\0u\0\0x"),
            Err(StartupError::Malformed("bytes after the final terminator"))
        );
        assert_eq!(
            m(b"user\0\xe9\0\0"),
            Err(StartupError::Malformed("parameter is not UTF-8"))
        );
        let mut bad_len = packet(0x0003_0000, b"user\0u\0\0");
        bad_len[3] += 1;
        assert!(StartupPacket::parse(&bad_len).is_err());
        assert!(StartupPacket::parse(&[0, 0, 0, 8, 0x04, 0xd2, 0x16]).is_err());
        assert!(StartupPacket::parse(&packet(SSL_REQUEST_CODE, b"x")).is_err());
    }

    #[test]
    fn duplicate_parameter_last_wins() {
        let p = StartupPacket::parse(&packet(0x0003_0000, b"user\0a\0user\0b\0\0")).unwrap();
        assert_eq!(p.param("user"), Some("b"));
    }

    proptest! {
        #[test]
        fn parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = StartupPacket::parse(&data);
        }

        #[test]
        fn parse_never_panics_with_valid_header(code in any::<i32>(), body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = StartupPacket::parse(&packet(code, &body));
        }
    }
}
