//! Typed decoders for the server messages a proxy reads itself: its own logins (Authentication,
//! ParameterStatus, BackendKeyData) and the rows of its own queries (DataRow). Replies relayed
//! to clients stay bytes; see [`crate::peek`] for the few a relay looks into.

use bytes::Buf;

/// An Authentication ('R') request from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authentication<'a> {
    /// AuthenticationOk.
    Ok,
    /// AuthenticationCleartextPassword.
    CleartextPassword,
    /// AuthenticationMD5Password with its salt.
    Md5Password {
        /// The salt to hash with.
        salt: [u8; 4],
    },
    /// AuthenticationSASL: the mechanisms offered (NUL-terminated names).
    Sasl {
        /// The raw list of mechanism names.
        mechanisms: &'a [u8],
    },
    /// AuthenticationSASLContinue with the server's SASL data.
    SaslContinue(&'a [u8]),
    /// AuthenticationSASLFinal with the server's SASL data.
    SaslFinal(&'a [u8]),
    /// A method a proxy does not implement (Kerberos, GSSAPI, SSPI, ...), by code.
    Other(i32),
}

impl<'a> Authentication<'a> {
    /// Decodes the body of an 'R' message; `None` when it is too short.
    pub fn decode(body: &'a [u8]) -> Option<Authentication<'a>> {
        let code = i32::from_be_bytes(body.get(..4)?.try_into().ok()?);
        let rest = &body[4..];
        Some(match code {
            0 => Authentication::Ok,
            3 => Authentication::CleartextPassword,
            5 => Authentication::Md5Password {
                salt: rest.get(..4)?.try_into().ok()?,
            },
            10 => Authentication::Sasl { mechanisms: rest },
            11 => Authentication::SaslContinue(rest),
            12 => Authentication::SaslFinal(rest),
            other => Authentication::Other(other),
        })
    }

    /// Whether an AuthenticationSASL offers `mechanism`.
    pub fn offers(&self, mechanism: &[u8]) -> bool {
        matches!(self, Authentication::Sasl { mechanisms } if mechanisms.split(|b| *b == 0).any(|m| m == mechanism))
    }
}

/// A ParameterStatus ('S') body: the parameter's name and value (lossy UTF-8).
pub fn parameter_status(body: &[u8]) -> Option<(String, String)> {
    let mut parts = body.split(|b| *b == 0);
    let k = parts.next()?;
    let v = parts.next()?;
    Some((
        String::from_utf8_lossy(k).into_owned(),
        String::from_utf8_lossy(v).into_owned(),
    ))
}

/// A BackendKeyData ('K') body: the server's process id and secret key.
pub fn backend_key_data(mut body: &[u8]) -> Option<(i32, i32)> {
    if body.len() < 8 {
        return None;
    }
    Some((body.get_i32(), body.get_i32()))
}

/// The columns of a DataRow ('D') body in text format (`None` for SQL NULL).
pub fn data_row(mut body: &[u8]) -> Option<Vec<Option<String>>> {
    if body.len() < 2 {
        return None;
    }
    let n = body.get_i16();
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        if body.len() < 4 {
            return None;
        }
        let len = body.get_i32();
        if len < 0 {
            out.push(None);
            continue;
        }
        let v = body.get(..len as usize)?;
        out.push(Some(String::from_utf8_lossy(v).into_owned()));
        body.advance(len as usize);
    }
    Some(out)
}

/// What a statement's rows look like, as a number: each column's name, type OID and type
/// modifier from a RowDescription ('T') body, hashed; `Some(1)` for NoData ('n': no rows).
/// Two descriptions of one statement with different numbers are rows PostgreSQL would refuse to
/// return under the first one ("cached plan must not change result type"). `None` when
/// malformed.
pub fn row_shape(tag: u8, mut body: &[u8]) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    if tag == b'n' {
        return Some(1);
    }
    if tag != b'T' || body.len() < 2 {
        return None;
    }
    // Deterministic (fixed keys): shapes are compared across connections.
    let mut h = std::hash::DefaultHasher::new();
    let n = body.get_i16();
    n.hash(&mut h);
    for _ in 0..n {
        let end = body.iter().position(|&b| b == 0)?;
        body[..end].hash(&mut h);
        body = body.get(end + 1..)?;
        // Table OID (4), column number (2), type OID (4), type size (2), modifier (4), format (2).
        let field = body.get(..18)?;
        field[6..10].hash(&mut h);
        field[12..16].hash(&mut h);
        body = &body[18..];
    }
    // Never the numbers meaning "unknown" (0) or NoData (1).
    Some(h.finish().max(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row_description(columns: &[(&str, u32, i32)]) -> Vec<u8> {
        let mut b = (columns.len() as i16).to_be_bytes().to_vec();
        for (name, oid, typmod) in columns {
            b.extend_from_slice(name.as_bytes());
            b.push(0);
            b.extend_from_slice(&16384u32.to_be_bytes());
            b.extend_from_slice(&1i16.to_be_bytes());
            b.extend_from_slice(&oid.to_be_bytes());
            b.extend_from_slice(&4i16.to_be_bytes());
            b.extend_from_slice(&typmod.to_be_bytes());
            b.extend_from_slice(&0i16.to_be_bytes());
        }
        b
    }

    #[test]
    fn row_shapes_differ_by_name_type_and_modifier_only() {
        let shape = |cols: &[(&str, u32, i32)]| row_shape(b'T', &row_description(cols)).unwrap();
        let ints = shape(&[("a", 23, -1), ("b", 23, -1)]);
        assert_eq!(ints, shape(&[("a", 23, -1), ("b", 23, -1)]));
        assert_ne!(ints, shape(&[("a", 23, -1), ("b", 25, -1)]), "type");
        assert_ne!(ints, shape(&[("a", 23, -1), ("c", 23, -1)]), "name");
        assert_ne!(ints, shape(&[("a", 23, -1), ("b", 23, 8)]), "modifier");
        assert_ne!(ints, shape(&[("a", 23, -1)]), "count");
        let mut other_table = row_description(&[("a", 23, -1), ("b", 23, -1)]);
        other_table[4..8].copy_from_slice(&99u32.to_be_bytes());
        assert_eq!(row_shape(b'T', &other_table), Some(ints), "table OID ignored");
        assert_eq!(row_shape(b'n', b""), Some(1));
        assert_eq!(row_shape(b'T', &row_description(&[("a", 23, -1)])[..9]), None);
    }

    #[test]
    fn data_row_reads_text_and_nulls() {
        let body = [0, 2, 0, 0, 0, 1, b't', 0xff, 0xff, 0xff, 0xff];
        assert_eq!(data_row(&body), Some(vec![Some("t".to_string()), None]));
        assert_eq!(data_row(&[0, 1, 0, 0, 0, 9, b'x']), None);
        assert_eq!(data_row(&[0]), None);
    }

    #[test]
    fn parameter_status_pairs() {
        assert_eq!(
            parameter_status(b"server_version\x0015.8\x00"),
            Some(("server_version".into(), "15.8".into()))
        );
    }

    #[test]
    fn authentication_requests() {
        assert_eq!(Authentication::decode(&[0, 0, 0, 0]), Some(Authentication::Ok));
        assert_eq!(
            Authentication::decode(&[0, 0, 0, 5, 1, 2, 3, 4]),
            Some(Authentication::Md5Password { salt: [1, 2, 3, 4] })
        );
        assert_eq!(Authentication::decode(&[0, 0, 0, 5, 1]), None);
        assert_eq!(Authentication::decode(&[0, 0]), None);
        let sasl = Authentication::decode(b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0").unwrap();
        assert!(sasl.offers(b"SCRAM-SHA-256"));
        assert!(!Authentication::decode(b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0\0")
            .unwrap()
            .offers(b"SCRAM-SHA-256"));
        assert_eq!(
            Authentication::decode(&[0, 0, 0, 7]),
            Some(Authentication::Other(7))
        );
        assert_eq!(backend_key_data(&[0, 0, 0, 1, 0, 0, 0, 2]), Some((1, 2)));
        assert_eq!(backend_key_data(&[0, 0, 0, 1]), None);
    }
}
