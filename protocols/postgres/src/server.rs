//! Builders for the messages sluice itself sends to clients, appended to a `BytesMut`.
//!
//! They go through pgwire's message encoders, so sluice's own messages are encoded by the same
//! code that its tests compare against; the only hand-written parts are noted below.

use bytes::{BufMut, Bytes, BytesMut};
use pgwire::messages::data::{DataRow, FieldDescription, RowDescription};
use pgwire::messages::extendedquery::{CloseComplete, ParseComplete};
use pgwire::messages::response::{
    CommandComplete, EmptyQueryResponse, ErrorResponse, NoticeResponse, ReadyForQuery, TransactionStatus,
};
use pgwire::messages::startup::{Authentication, BackendKeyData, ParameterStatus, SecretKey};

use crate::peek::PeekError;

/// Encodes `msg` onto `buf`.
///
/// # Panics
///
/// If the message exceeds pgwire's size limit for its type (30000 bytes for Authentication and
/// ParameterStatus). sluice's own messages are far smaller; exceeding it is a bug in the caller,
/// and half a message must never reach the client, so `buf` is restored before panicking.
fn put<M: pgwire::messages::Message>(buf: &mut BytesMut, msg: &M, what: &str) {
    let start = buf.len();
    if let Err(e) = msg.encode(buf) {
        buf.truncate(start);
        panic!("sluice bug: cannot encode {what}: {e}");
    }
}

/// AuthenticationOk.
pub fn authentication_ok(buf: &mut BytesMut) {
    put(buf, &Authentication::Ok, "AuthenticationOk");
}

/// AuthenticationMD5Password with `salt`.
pub fn authentication_md5_password(buf: &mut BytesMut, salt: [u8; 4]) {
    put(
        buf,
        &Authentication::MD5Password(salt.to_vec()),
        "AuthenticationMD5Password",
    );
}

/// AuthenticationSASL listing `mechanisms`.
pub fn authentication_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    let mechanisms = mechanisms.iter().map(|m| (*m).to_owned()).collect();
    put(buf, &Authentication::SASL(mechanisms), "AuthenticationSASL");
}

/// AuthenticationSASLContinue carrying `data` (the SCRAM server-first-message).
pub fn authentication_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    let msg = Authentication::SASLContinue(Bytes::copy_from_slice(data));
    put(buf, &msg, "AuthenticationSASLContinue");
}

/// AuthenticationSASLFinal carrying `data` (the SCRAM server-final-message).
pub fn authentication_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    let msg = Authentication::SASLFinal(Bytes::copy_from_slice(data));
    put(buf, &msg, "AuthenticationSASLFinal");
}

/// ParameterStatus.
pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    put(
        buf,
        &ParameterStatus::new(name.to_owned(), value.to_owned()),
        "ParameterStatus",
    );
}

/// BackendKeyData with a 4-byte secret (protocol 3.0).
pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    put(
        buf,
        &BackendKeyData::new(pid, SecretKey::I32(secret)),
        "BackendKeyData",
    );
}

/// ReadyForQuery; `status` is `b'I'`, `b'T'` or `b'E'`.
///
/// Any other byte is written as given (by hand, since pgwire only models the three statuses)
/// rather than panicking: it can only come from a backend, and the client is better placed to
/// report it.
pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    match TransactionStatus::try_from(status) {
        Ok(status) => put(buf, &ReadyForQuery::new(status), "ReadyForQuery"),
        Err(_) => {
            buf.put_u8(b'Z');
            buf.put_i32(5);
            buf.put_u8(status);
        }
    }
}

/// ParseComplete.
pub fn parse_complete(buf: &mut BytesMut) {
    put(buf, &ParseComplete::new(), "ParseComplete");
}

/// CloseComplete.
pub fn close_complete(buf: &mut BytesMut) {
    put(buf, &CloseComplete::new(), "CloseComplete");
}

/// The type of a result column sluice produces itself (the admin console).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// `text` (OID 25).
    Text,
    /// `int8` (OID 20).
    Int8,
}

/// RowDescription of text-format columns of these names and types.
pub fn row_description(buf: &mut BytesMut, columns: &[(&str, ColumnType)]) {
    let fields = columns
        .iter()
        .map(|(name, ty)| {
            let (type_id, type_size) = match ty {
                ColumnType::Text => (25, -1),
                ColumnType::Int8 => (20, 8),
            };
            FieldDescription::new((*name).to_owned(), 0, 0, type_id, type_size, -1, 0)
        })
        .collect();
    put(buf, &RowDescription::new(fields), "RowDescription");
}

/// DataRow of text values (`None` is NULL).
pub fn data_row<S: AsRef<str>>(buf: &mut BytesMut, values: &[Option<S>]) {
    let mut data = BytesMut::new();
    for v in values {
        match v {
            Some(v) => {
                let v = v.as_ref().as_bytes();
                data.put_i32(i32::try_from(v.len()).expect("a console value fits in an i32 length"));
                data.put_slice(v);
            }
            None => data.put_i32(-1),
        }
    }
    let count = i16::try_from(values.len()).expect("a console row has few columns");
    put(buf, &DataRow::new(data, count), "DataRow");
}

/// CommandComplete with this tag (`"SHOW"`, `"PAUSE"`, ...).
pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    put(buf, &CommandComplete::new(tag.to_owned()), "CommandComplete");
}

/// EmptyQueryResponse (the answer to a query of only whitespace).
pub fn empty_query_response(buf: &mut BytesMut) {
    put(buf, &EmptyQueryResponse::new(), "EmptyQueryResponse");
}

/// Fields of an ErrorResponse / NoticeResponse.
#[derive(Debug, Clone, Copy)]
pub struct ErrorFields<'a> {
    /// "ERROR", "FATAL", "WARNING", ... (sent as both S and V).
    pub severity: &'a str,
    /// SQLSTATE code.
    pub code: &'a str,
    /// Primary message.
    pub message: &'a str,
    /// Optional detail.
    pub detail: Option<&'a str>,
    /// Optional hint.
    pub hint: Option<&'a str>,
}

impl ErrorFields<'_> {
    fn to_fields(self) -> Vec<(u8, String)> {
        let mut fields = vec![
            (b'S', self.severity.to_owned()),
            (b'V', self.severity.to_owned()),
            (b'C', self.code.to_owned()),
            (b'M', self.message.to_owned()),
        ];
        fields.extend(self.detail.map(|d| (b'D', d.to_owned())));
        fields.extend(self.hint.map(|h| (b'H', h.to_owned())));
        fields
    }
}

/// ErrorResponse with fields S, V, C, M, D?, H?.
pub fn error_response(buf: &mut BytesMut, e: &ErrorFields<'_>) {
    put(buf, &ErrorResponse::new(e.to_fields()), "ErrorResponse");
}

/// PostgreSQL's ErrorResponse for a prepared statement whose rows changed type since it was
/// prepared (0A000 "cached plan must not change result type"), with the source file and
/// function PostgreSQL names, which drivers look at: asyncpg tells this error from other 0A000
/// errors by the function (`RevalidateCachedQuery`) and then prepares the statement again.
/// The source line, which differs between PostgreSQL versions, is left out.
pub fn cached_plan_changed(buf: &mut BytesMut) {
    let mut fields = ErrorFields {
        severity: "ERROR",
        code: "0A000",
        message: "cached plan must not change result type",
        detail: None,
        hint: None,
    }
    .to_fields();
    fields.push((b'F', "plancache.c".to_owned()));
    fields.push((b'R', "RevalidateCachedQuery".to_owned()));
    put(buf, &ErrorResponse::new(fields), "ErrorResponse");
}

/// NoticeResponse with fields S, V, C, M, D?, H?.
pub fn notice_response(buf: &mut BytesMut, e: &ErrorFields<'_>) {
    put(buf, &NoticeResponse::new(e.to_fields()), "NoticeResponse");
}

/// Client-side auth messages: SASLInitialResponse / SASLResponse / PasswordMessage are all tag
/// 'p'; which one it is depends on the auth phase, so the caller says.
///
/// SASLInitialResponse body -> (mechanism, initial data). A length of -1 (no initial response)
/// gives empty data. Decoded by hand: pgwire's decoder panics on a truncated body.
pub fn decode_sasl_initial_response(body: &[u8]) -> Result<(String, Bytes), PeekError> {
    const BAD: PeekError = PeekError::Malformed("SASLInitialResponse");
    let (mechanism, rest) = crate::peek::split_cstr(body).ok_or(BAD)?;
    let mechanism = std::str::from_utf8(mechanism).map_err(|_| BAD)?.to_owned();
    let (len, data) = match rest {
        [a, b, c, d, data @ ..] => (i32::from_be_bytes([*a, *b, *c, *d]), data),
        _ => return Err(BAD),
    };
    match (len, data.len()) {
        (-1, 0) => Ok((mechanism, Bytes::new())),
        (len, n) if usize::try_from(len).ok() == Some(n) => Ok((mechanism, Bytes::copy_from_slice(data))),
        _ => Err(BAD),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn built(f: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
        let mut buf = BytesMut::new();
        f(&mut buf);
        buf.to_vec()
    }

    #[test]
    fn fixed_messages() {
        assert_eq!(built(authentication_ok), [0x52, 0, 0, 0, 8, 0, 0, 0, 0]);
        assert_eq!(built(|b| ready_for_query(b, b'I')), [0x5a, 0, 0, 0, 5, 0x49]);
        assert_eq!(built(|b| ready_for_query(b, b'T')), [0x5a, 0, 0, 0, 5, 0x54]);
        assert_eq!(built(|b| ready_for_query(b, b'E')), [0x5a, 0, 0, 0, 5, 0x45]);
        assert_eq!(built(|b| ready_for_query(b, b'?')), [0x5a, 0, 0, 0, 5, b'?']);
        assert_eq!(built(parse_complete), [b'1', 0, 0, 0, 4]);
        assert_eq!(built(close_complete), [b'3', 0, 0, 0, 4]);
        assert_eq!(
            built(|b| backend_key_data(b, 0x1234, -2)),
            [b'K', 0, 0, 0, 12, 0, 0, 0x12, 0x34, 0xff, 0xff, 0xff, 0xfe]
        );
    }

    #[test]
    fn result_messages() {
        assert_eq!(
            built(|b| row_description(b, &[("a", ColumnType::Text), ("n", ColumnType::Int8)])),
            b"T\x00\x00\x00\x2e\x00\x02\
              a\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x19\xff\xff\xff\xff\xff\xff\x00\x00\
              n\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x14\x00\x08\xff\xff\xff\xff\x00\x00"
        );
        assert_eq!(
            built(|b| data_row(b, &[Some("hi"), None])),
            b"D\x00\x00\x00\x10\x00\x02\x00\x00\x00\x02hi\xff\xff\xff\xff"
        );
        assert_eq!(
            built(|b| command_complete(b, "SHOW")),
            b"C\x00\x00\x00\x09SHOW\x00"
        );
        assert_eq!(built(empty_query_response), [b'I', 0, 0, 0, 4]);
    }

    #[test]
    fn sasl_messages() {
        assert_eq!(
            built(|b| authentication_sasl(b, &["SCRAM-SHA-256"])),
            b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00"
        );
        assert_eq!(
            built(|b| authentication_sasl_continue(b, b"r=abc,s=c2FsdA==,i=4096")),
            b"R\x00\x00\x00\x1f\x00\x00\x00\x0br=abc,s=c2FsdA==,i=4096"
        );
        assert_eq!(
            built(|b| authentication_sasl_final(b, b"v=xyz")),
            b"R\x00\x00\x00\x0d\x00\x00\x00\x0cv=xyz"
        );
    }

    #[test]
    fn parameter_status_bytes() {
        assert_eq!(
            built(|b| parameter_status(b, "client_encoding", "UTF8")),
            b"S\x00\x00\x00\x19client_encoding\x00UTF8\x00"
        );
    }

    #[test]
    fn error_and_notice() {
        let e = ErrorFields {
            severity: "FATAL",
            code: "28P01",
            message: "bad",
            detail: None,
            hint: None,
        };
        assert_eq!(
            built(|b| error_response(b, &e)),
            b"E\x00\x00\x00\x1fSFATAL\x00VFATAL\x00C28P01\x00Mbad\x00\x00"
        );
        let n = ErrorFields {
            severity: "WARNING",
            code: "01000",
            message: "m",
            detail: Some("d"),
            hint: Some("h"),
        };
        let bytes = built(|b| notice_response(b, &n));
        assert_eq!(&bytes[..5], b"N\x00\x00\x00\x27");
        assert_eq!(
            &bytes[5..],
            b"SWARNING\x00VWARNING\x00C01000\x00Mm\x00Dd\x00Hh\x00\x00"
        );
        assert_eq!(
            crate::peek::error_code_and_message(&bytes[5..]),
            ("01000".to_owned(), "m".to_owned())
        );
    }

    #[test]
    #[should_panic(expected = "sluice bug")]
    fn oversize_parameter_status_panics_cleanly() {
        let mut buf = BytesMut::new();
        parameter_status(&mut buf, "x", &"y".repeat(40_000));
    }

    #[test]
    fn sasl_initial_response() {
        let body = b"SCRAM-SHA-256\x00\x00\x00\x00\x05n,,xy";
        assert_eq!(
            decode_sasl_initial_response(body),
            Ok(("SCRAM-SHA-256".to_owned(), Bytes::from_static(b"n,,xy")))
        );
        let none = b"SCRAM-SHA-256\x00\xff\xff\xff\xff";
        assert_eq!(
            decode_sasl_initial_response(none),
            Ok(("SCRAM-SHA-256".to_owned(), Bytes::new()))
        );
        let bad = PeekError::Malformed("SASLInitialResponse");
        assert_eq!(decode_sasl_initial_response(b"SCRAM-SHA-256"), Err(bad.clone()));
        assert_eq!(
            decode_sasl_initial_response(b"M\x00\x00\x00\x00\x06n,,xy"),
            Err(bad.clone())
        );
        assert_eq!(
            decode_sasl_initial_response(b"M\x00\x00\x00\x00\x04n,,xy"),
            Err(bad.clone())
        );
        assert_eq!(decode_sasl_initial_response(b"M\x00\x00\x00"), Err(bad));
    }

    proptest! {
        #[test]
        fn decode_sasl_initial_response_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_sasl_initial_response(&data);
        }
    }
}
