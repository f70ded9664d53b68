//! Zero-copy readers of the few client-message fields sluice routes on, plus re-encoders for
//! rewriting statement names.
//!
//! Hand-written on purpose: pgwire's decoders copy every field into owned `String`s through
//! `from_utf8_lossy`, so a re-encoded message may differ from what the client sent, while a proxy
//! must forward bytes untouched and only borrow the fields it needs.

use bytes::{BufMut, BytesMut};

/// A client message too short or missing a terminator. Always the client's fault.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PeekError {
    /// The named message kind could not be read.
    #[error("malformed {0} message")]
    Malformed(&'static str),
}

/// Splits a C string off the front: (string without NUL, rest after NUL); `None` without a
/// NUL. The one place the crate looks for a terminator (startup packets, SASL and every
/// peeked message use it).
pub(crate) fn split_cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = memchr::memchr(0, buf)?;
    Some((&buf[..nul], &buf[nul + 1..]))
}

/// [`split_cstr`], with `what` named in the error when there is no NUL.
fn cstr<'a>(buf: &'a [u8], what: &'static str) -> Result<(&'a [u8], &'a [u8]), PeekError> {
    split_cstr(buf).ok_or(PeekError::Malformed(what))
}

/// Query ('Q') body -> SQL without the trailing NUL.
pub fn query(body: &[u8]) -> Result<&[u8], PeekError> {
    match cstr(body, "Query")? {
        (sql, []) => Ok(sql),
        _ => Err(PeekError::Malformed("Query")),
    }
}

/// The fields of a Parse ('P') message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parse<'a> {
    /// Prepared statement name (empty = unnamed).
    pub name: &'a [u8],
    /// SQL text.
    pub query: &'a [u8],
    /// i16 parameter count and type oids, verbatim.
    pub rest: &'a [u8],
}

/// Parse ('P') body -> its fields. The parameter-type list must be consistent with its count.
pub fn parse(body: &[u8]) -> Result<Parse<'_>, PeekError> {
    const WHAT: &str = "Parse";
    let (name, after) = cstr(body, WHAT)?;
    let (query, rest) = cstr(after, WHAT)?;
    let count = match rest {
        [hi, lo, ..] => i16::from_be_bytes([*hi, *lo]),
        _ => return Err(PeekError::Malformed(WHAT)),
    };
    if count < 0 || rest.len() != 2 + 4 * count as usize {
        return Err(PeekError::Malformed(WHAT));
    }
    Ok(Parse { name, query, rest })
}

/// The names in a Bind ('B') message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind<'a> {
    /// Destination portal name.
    pub portal: &'a [u8],
    /// Source prepared statement name.
    pub statement: &'a [u8],
    /// Everything after the names (formats, parameters, result formats), verbatim.
    pub rest: &'a [u8],
}

/// Bind ('B') body -> its names. What follows them is not checked; the backend does that.
pub fn bind(body: &[u8]) -> Result<Bind<'_>, PeekError> {
    let (portal, after) = cstr(body, "Bind")?;
    let (statement, rest) = cstr(after, "Bind")?;
    Ok(Bind {
        portal,
        statement,
        rest,
    })
}

/// The target of a Describe ('D') or Close ('C') message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'a> {
    /// `b'S'` statement or `b'P'` portal.
    pub kind: u8,
    /// Name (empty = unnamed).
    pub name: &'a [u8],
}

/// Describe ('D') or Close ('C') body -> its target.
pub fn target(body: &[u8]) -> Result<Target<'_>, PeekError> {
    const WHAT: &str = "Describe/Close";
    let (&kind, rest) = body.split_first().ok_or(PeekError::Malformed(WHAT))?;
    if kind != b'S' && kind != b'P' {
        return Err(PeekError::Malformed(WHAT));
    }
    match cstr(rest, WHAT)? {
        (name, []) => Ok(Target { kind, name }),
        _ => Err(PeekError::Malformed(WHAT)),
    }
}

/// Tag and length of a message whose body is `body_len` bytes. Lengths come from messages that
/// were framed under an i32 length, so the cast cannot overflow in practice.
fn header(buf: &mut BytesMut, tag: u8, body_len: usize) {
    buf.reserve(5 + body_len);
    buf.put_u8(tag);
    buf.put_i32((4 + body_len) as i32);
}

/// Append a whole Parse message.
pub fn encode_parse(buf: &mut BytesMut, name: &[u8], query: &[u8], rest: &[u8]) {
    header(buf, b'P', name.len() + 1 + query.len() + 1 + rest.len());
    buf.put_slice(name);
    buf.put_u8(0);
    buf.put_slice(query);
    buf.put_u8(0);
    buf.put_slice(rest);
}

/// Append a whole Bind message.
pub fn encode_bind(buf: &mut BytesMut, portal: &[u8], statement: &[u8], rest: &[u8]) {
    header(buf, b'B', portal.len() + 1 + statement.len() + 1 + rest.len());
    buf.put_slice(portal);
    buf.put_u8(0);
    buf.put_slice(statement);
    buf.put_u8(0);
    buf.put_slice(rest);
}

/// Append a whole Describe (`tag = b'D'`) or Close (`tag = b'C'`) message.
pub fn encode_target(buf: &mut BytesMut, tag: u8, kind: u8, name: &[u8]) {
    header(buf, tag, 1 + name.len() + 1);
    buf.put_u8(kind);
    buf.put_slice(name);
    buf.put_u8(0);
}

/// Body of a ReadyForQuery ('Z') message -> status byte.
pub fn ready_status(body: &[u8]) -> Option<u8> {
    match body {
        [status] => Some(*status),
        _ => None,
    }
}

/// The (field type, value) pairs of an ErrorResponse/NoticeResponse body, up to its terminator
/// or the first malformed field.
fn error_fields(body: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut rest = body;
    std::iter::from_fn(move || {
        let (&field, after) = rest.split_first()?;
        if field == 0 {
            return None;
        }
        let (value, after) = cstr(after, "ErrorResponse").ok()?;
        rest = after;
        Some((field, value))
    })
}

/// Body of ErrorResponse/NoticeResponse -> (SQLSTATE code, message); missing fields -> empty
/// strings. Text is converted lossily (for logs and metrics only, never forwarded).
pub fn error_code_and_message(body: &[u8]) -> (String, String) {
    let (mut code, mut message) = (String::new(), String::new());
    for (field, value) in error_fields(body) {
        match field {
            b'C' => code = String::from_utf8_lossy(value).into_owned(),
            b'M' => message = String::from_utf8_lossy(value).into_owned(),
            _ => {}
        }
    }
    (code, message)
}

/// Whether the body of an ErrorResponse says the session is over (severity FATAL or PANIC).
pub fn error_is_fatal(body: &[u8]) -> bool {
    body.starts_with(b"SFATAL\0") || body.starts_with(b"SPANIC\0")
}

/// Appends the ErrorResponse/NoticeResponse (`tag`, `body`) with every occurrence of `from` in
/// its message and detail fields replaced by `to`; other fields are copied untouched. Used to
/// show a client its own statement name where the server named sluice's.
pub fn encode_error_renamed(buf: &mut BytesMut, tag: u8, body: &[u8], from: &[u8], to: &[u8]) {
    let mut out = Vec::with_capacity(body.len() + to.len());
    for (field, value) in error_fields(body) {
        out.push(field);
        if matches!(field, b'M' | b'D') && !from.is_empty() {
            let mut v = value;
            while let Some(at) = v.windows(from.len()).position(|w| w == from) {
                out.extend_from_slice(&v[..at]);
                out.extend_from_slice(to);
                v = &v[at + from.len()..];
            }
            out.extend_from_slice(v);
        } else {
            out.extend_from_slice(value);
        }
        out.push(0);
    }
    out.push(0);
    header(buf, tag, out.len());
    buf.put_slice(&out);
}

/// Appends the ErrorResponse/NoticeResponse (`tag`, `body`) with its error position (field
/// `P`, in characters from 1) moved from a query text whose first `server` characters stand for
/// the first `client` characters of the client's text (sluice rewrote a statement name): a
/// position after them moves by the difference, one inside them points at the last of the
/// client's. Returns false, appending nothing, when there is no position to move.
pub fn encode_error_shifted(buf: &mut BytesMut, tag: u8, body: &[u8], server: u32, client: u32) -> bool {
    let moved = |p: &[u8]| {
        let p: u32 = std::str::from_utf8(p).ok()?.parse().ok()?;
        let q = if p > server {
            p - server + client
        } else {
            p.min(client)
        };
        Some(q.to_string())
    };
    if !error_fields(body).any(|(f, v)| f == b'P' && moved(v).is_some()) {
        return false;
    }
    let mut out = Vec::with_capacity(body.len() + 4);
    for (field, value) in error_fields(body) {
        out.push(field);
        match moved(value).filter(|_| field == b'P') {
            Some(p) => out.extend_from_slice(p.as_bytes()),
            None => out.extend_from_slice(value),
        }
        out.push(0);
    }
    out.push(0);
    header(buf, tag, out.len());
    buf.put_slice(&out);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::split_message;

    #[test]
    fn error_positions_move_back_to_the_clients_text() {
        // `EXECUTE s1(1,)` sent as `EXECUTE sluice_0123456789abcdef(1,)`: 10 characters up to
        // the end of the name for the client, 31 for the server.
        let body = b"SERROR\0C42601\0Msyntax error at or near \")\"\0P35\0Fscan.l\0\0";
        let mut out = BytesMut::new();
        assert!(encode_error_shifted(&mut out, b'E', body, 31, 10));
        let m = one(out);
        assert_eq!(
            m.body(),
            b"SERROR\0C42601\0Msyntax error at or near \")\"\0P14\0Fscan.l\0\0"
        );
        let inside = b"SERROR\0P20\0\0";
        let mut out = BytesMut::new();
        assert!(encode_error_shifted(&mut out, b'E', inside, 31, 10));
        assert_eq!(one(out).body(), b"SERROR\0P10\0\0");
        let none = b"SERROR\0C22012\0Mdivision by zero\0\0";
        let mut out = BytesMut::new();
        assert!(!encode_error_shifted(&mut out, b'E', none, 31, 10));
        assert!(out.is_empty());
    }

    #[test]
    fn errors_are_renamed_field_by_field() {
        let body = b"SERROR\0VERROR\0C42P05\0Mprepared statement \"sluice_1\" already exists\0Fprepare.c\0\0";
        let mut out = BytesMut::new();
        encode_error_renamed(&mut out, b'E', body, b"\"sluice_1\"", b"\"s1\"");
        let m = one(out);
        assert_eq!(
            error_code_and_message(m.body()),
            (
                "42P05".to_string(),
                "prepared statement \"s1\" already exists".to_string()
            )
        );
        assert!(m.body().ends_with(b"Fprepare.c\0\0"));
        assert!(!error_is_fatal(m.body()));
        assert!(error_is_fatal(b"SFATAL\0C57P01\0\0"));
    }
    use proptest::prelude::*;

    fn one(buf: BytesMut) -> crate::Message {
        let mut buf = buf;
        let m = split_message(&mut buf, 1 << 20).unwrap().unwrap();
        assert!(buf.is_empty());
        m
    }

    #[test]
    fn query_body() {
        assert_eq!(query(b"SELECT 1\0"), Ok(&b"SELECT 1"[..]));
        assert_eq!(query(b"\0"), Ok(&b""[..]));
        assert_eq!(query(b"SELECT 1"), Err(PeekError::Malformed("Query")));
        assert_eq!(query(b"SELECT\0 1\0"), Err(PeekError::Malformed("Query")));
    }

    #[test]
    fn parse_round_trip() {
        // Parse "s1", "SELECT $1::int4", one parameter of type int4 (oid 23); Latin-1 byte kept.
        let wire: &[u8] = b"P\x00\x00\x00\x1cs1\x00SELECT $1 -- \xe9\x00\x00\x01\x00\x00\x00\x17";
        let m = one(BytesMut::from(wire));
        let p = parse(m.body()).unwrap();
        assert_eq!(p.name, b"s1");
        assert_eq!(p.query, b"SELECT $1 -- \xe9");
        assert_eq!(p.rest, b"\x00\x01\x00\x00\x00\x17");
        let mut out = BytesMut::new();
        encode_parse(&mut out, p.name, p.query, p.rest);
        assert_eq!(&out[..], wire);
        // Renaming keeps the rest verbatim.
        let mut out = BytesMut::new();
        encode_parse(&mut out, b"sluice_7", p.query, p.rest);
        let renamed = one(out);
        let renamed = parse(renamed.body()).unwrap();
        assert_eq!(
            (renamed.name, renamed.query, renamed.rest),
            (&b"sluice_7"[..], p.query, p.rest)
        );
    }

    #[test]
    fn parse_malformed() {
        assert!(parse(b"s1\0SELECT 1\0").is_err());
        assert!(parse(b"s1\0SELECT 1\0\x00\x01").is_err());
        assert!(parse(b"s1\0SELECT 1\0\xff\xff").is_err());
        assert!(parse(b"s1\0SELECT 1").is_err());
        assert!(parse(b"s1\0SELECT 1\0\x00\x00").is_ok());
    }

    #[test]
    fn bind_round_trip() {
        // Bind portal "", statement "s1", no formats, one text parameter "42", no result formats.
        let body: &[u8] = b"\x00s1\x00\x00\x00\x00\x01\x00\x00\x00\x0242\x00\x00";
        let mut wire = BytesMut::new();
        wire.put_u8(b'B');
        wire.put_i32(4 + body.len() as i32);
        wire.put_slice(body);
        let wire = wire.freeze();
        let b = bind(body).unwrap();
        assert_eq!((b.portal, b.statement), (&b""[..], &b"s1"[..]));
        let mut out = BytesMut::new();
        encode_bind(&mut out, b.portal, b.statement, b.rest);
        assert_eq!(&out[..], &wire[..]);
        assert!(bind(b"p").is_err());
        assert!(bind(b"p\0s").is_err());
    }

    #[test]
    fn target_round_trip() {
        for (tag, wire) in [
            (b'D', &b"D\x00\x00\x00\x08Ss1\x00"[..]),
            (b'C', &b"C\x00\x00\x00\x06P\x00"[..]),
        ] {
            let m = one(BytesMut::from(wire));
            let t = target(m.body()).unwrap();
            let mut out = BytesMut::new();
            encode_target(&mut out, tag, t.kind, t.name);
            assert_eq!(&out[..], wire);
        }
        assert_eq!(
            target(b"Ss1\0").unwrap(),
            Target {
                kind: b'S',
                name: b"s1"
            }
        );
        assert!(target(b"Xs1\0").is_err());
        assert!(target(b"S").is_err());
        assert!(target(b"").is_err());
        assert!(target(b"Ss1\0x").is_err());
    }

    #[test]
    fn ready_and_errors() {
        assert_eq!(ready_status(b"I"), Some(b'I'));
        assert_eq!(ready_status(b""), None);
        assert_eq!(ready_status(b"IT"), None);
        let body = b"SERROR\0VERROR\0C42P01\0Mrelation \"t\" does not exist\0P15\0\0";
        assert_eq!(
            error_code_and_message(body),
            ("42P01".to_owned(), "relation \"t\" does not exist".to_owned())
        );
        assert_eq!(error_code_and_message(b""), (String::new(), String::new()));
        assert_eq!(error_code_and_message(b"C12345"), (String::new(), String::new()));
        assert_eq!(
            error_code_and_message(b"Mhi\xe9\0"),
            (String::new(), "hi\u{fffd}".to_owned())
        );
    }

    proptest! {
        #[test]
        fn peeks_never_panic(data in proptest::collection::vec(any::<u8>(), 0..96)) {
            let _ = query(&data);
            let _ = target(&data);
            let _ = ready_status(&data);
            let _ = error_code_and_message(&data);
            if let Ok(p) = parse(&data) {
                let mut out = BytesMut::new();
                encode_parse(&mut out, p.name, p.query, p.rest);
                prop_assert_eq!(&out[5..], &data[..]);
            }
            if let Ok(b) = bind(&data) {
                let mut out = BytesMut::new();
                encode_bind(&mut out, b.portal, b.statement, b.rest);
                prop_assert_eq!(&out[5..], &data[..]);
            }
        }

        #[test]
        fn parse_encode_round_trip(name in proptest::collection::vec(1u8.., 0..16),
                                   sql in proptest::collection::vec(1u8.., 0..64),
                                   oids in proptest::collection::vec(any::<u32>(), 0..4)) {
            let mut rest = (oids.len() as i16).to_be_bytes().to_vec();
            for o in &oids { rest.extend_from_slice(&o.to_be_bytes()); }
            let mut out = BytesMut::new();
            encode_parse(&mut out, &name, &sql, &rest);
            let m = one(out);
            let p = parse(m.body()).unwrap();
            prop_assert_eq!((p.name, p.query, p.rest), (&name[..], &sql[..], &rest[..]));
        }
    }
}
