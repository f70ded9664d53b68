//! Request messages (client to server): decoded from and encoded to envelope bodies, with the
//! v4/v5 differences (v5 flags are `[int]`, PREPARE has flags and a keyspace, EXECUTE carries
//! the result metadata id).

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::DecodeError;
use crate::frame::{flags, Header, Opcode};
use crate::wire::{
    put_bytes, put_bytes_map, put_count, put_long_string, put_short_bytes, put_string, put_string_list,
    put_string_map, put_value, Reader, Value,
};

/// Query flag bits (QUERY and EXECUTE parameters).
pub mod query_flags {
    pub const VALUES: u32 = 0x01;
    pub const SKIP_METADATA: u32 = 0x02;
    pub const PAGE_SIZE: u32 = 0x04;
    pub const PAGING_STATE: u32 = 0x08;
    pub const SERIAL_CONSISTENCY: u32 = 0x10;
    pub const TIMESTAMP: u32 = 0x20;
    pub const NAMES: u32 = 0x40;
    pub const KEYSPACE: u32 = 0x80;
    pub const NOW_IN_SECONDS: u32 = 0x100;
}
use query_flags as qf;

/// Flags that say which optional fields follow; the others (skip metadata, unknown bits) are
/// kept as they came.
const FIELD_FLAGS: u32 = qf::VALUES
    | qf::PAGE_SIZE
    | qf::PAGING_STATE
    | qf::SERIAL_CONSISTENCY
    | qf::TIMESTAMP
    | qf::NAMES
    | qf::KEYSPACE
    | qf::NOW_IN_SECONDS;

/// The optional parts in front of a message: tracing id, warnings, custom payload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    /// Responses with the tracing flag.
    pub tracing_id: Option<[u8; 16]>,
    /// Responses with the warning flag.
    pub warnings: Option<Vec<String>>,
    /// Either direction with the custom payload flag.
    pub custom_payload: Option<Vec<(String, Option<Bytes>)>>,
}

impl Extensions {
    /// Splits the extensions off an (uncompressed) envelope body, returning the message.
    pub fn split(header: &Header, body: Bytes) -> Result<(Extensions, Bytes), DecodeError> {
        let mut r = Reader::new(body);
        let mut ext = Extensions::default();
        if header.response && header.flags & flags::TRACING != 0 {
            ext.tracing_id = Some(r.uuid("tracing id")?);
        }
        if header.response && header.flags & flags::WARNING != 0 {
            ext.warnings = Some(r.string_list("warnings")?);
        }
        if header.flags & flags::CUSTOM_PAYLOAD != 0 {
            ext.custom_payload = Some(r.bytes_map("custom payload")?);
        }
        Ok((ext, r.rest()))
    }

    /// Writes the extensions; the header flags must say the same.
    pub fn encode(&self, out: &mut BytesMut) {
        if let Some(id) = &self.tracing_id {
            out.put_slice(id);
        }
        if let Some(w) = &self.warnings {
            put_string_list(out, w);
        }
        if let Some(p) = &self.custom_payload {
            put_bytes_map(out, p);
        }
    }

    /// The header flag bits these extensions need.
    pub fn flags(&self) -> u8 {
        (if self.tracing_id.is_some() {
            flags::TRACING
        } else {
            0
        }) | (if self.warnings.is_some() {
            flags::WARNING
        } else {
            0
        }) | (if self.custom_payload.is_some() {
            flags::CUSTOM_PAYLOAD
        } else {
            0
        })
    }
}

/// Parameters of QUERY and EXECUTE.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QueryParams {
    pub consistency: u16,
    /// Flags as received; on encoding the field bits are recomputed from the fields.
    pub flags: u32,
    /// Bound values (flag 0x01).
    pub values: Option<Vec<Value>>,
    /// Names of the bound values (flag 0x40), parallel to `values`.
    pub names: Option<Vec<String>>,
    pub page_size: Option<i32>,
    pub paging_state: Option<Bytes>,
    pub serial_consistency: Option<u16>,
    pub timestamp: Option<i64>,
    /// v5: the keyspace to run in (flag 0x80).
    pub keyspace: Option<String>,
    /// v5: flag 0x100.
    pub now_in_seconds: Option<i32>,
}

fn read_flags(r: &mut Reader, version: u8, what: &'static str) -> Result<u32, DecodeError> {
    if version >= 5 {
        Ok(r.i32(what)? as u32)
    } else {
        Ok(u32::from(r.u8(what)?))
    }
}

fn put_flags(out: &mut BytesMut, version: u8, f: u32) {
    if version >= 5 {
        out.put_u32(f);
    } else {
        out.put_u8(f as u8);
    }
}

fn read_values(r: &mut Reader, named: bool) -> Result<(Vec<Value>, Option<Vec<String>>), DecodeError> {
    let n = r.count("values", 4)?;
    let mut values = Vec::with_capacity(n);
    let mut names = named.then(|| Vec::with_capacity(n));
    for _ in 0..n {
        if let Some(names) = names.as_mut() {
            names.push(r.string("value name")?);
        }
        values.push(r.value("value")?);
    }
    Ok((values, names))
}

fn put_values(out: &mut BytesMut, values: &[Value], names: Option<&Vec<String>>) {
    put_count(out, values.len());
    for (i, v) in values.iter().enumerate().take(u16::MAX as usize) {
        if let Some(names) = names {
            put_string(out, names.get(i).map(String::as_str).unwrap_or(""));
        }
        put_value(out, v);
    }
}

impl QueryParams {
    /// Parameters with a consistency level and nothing else.
    pub fn new(consistency: u16) -> QueryParams {
        QueryParams {
            consistency,
            ..QueryParams::default()
        }
    }

    /// Reads the parameters of a QUERY or EXECUTE.
    pub fn decode(r: &mut Reader, version: u8) -> Result<QueryParams, DecodeError> {
        let consistency = r.u16("consistency")?;
        let flags = read_flags(r, version, "query flags")?;
        let mut p = QueryParams {
            consistency,
            flags,
            ..QueryParams::default()
        };
        if flags & qf::VALUES != 0 {
            let (values, names) = read_values(r, flags & qf::NAMES != 0)?;
            p.values = Some(values);
            p.names = names;
        }
        if flags & qf::PAGE_SIZE != 0 {
            p.page_size = Some(r.i32("page size")?);
        }
        if flags & qf::PAGING_STATE != 0 {
            p.paging_state = r.bytes("paging state")?;
        }
        if flags & qf::SERIAL_CONSISTENCY != 0 {
            p.serial_consistency = Some(r.u16("serial consistency")?);
        }
        if flags & qf::TIMESTAMP != 0 {
            p.timestamp = Some(r.i64("timestamp")?);
        }
        if version >= 5 && flags & qf::KEYSPACE != 0 {
            p.keyspace = Some(r.string("keyspace")?);
        }
        if version >= 5 && flags & qf::NOW_IN_SECONDS != 0 {
            p.now_in_seconds = Some(r.i32("now in seconds")?);
        }
        Ok(p)
    }

    /// The flags as they will be encoded.
    pub fn encoded_flags(&self) -> u32 {
        let mut f = self.flags & !FIELD_FLAGS;
        let set = |f: &mut u32, bit: u32, on: bool| {
            if on {
                *f |= bit
            }
        };
        set(&mut f, qf::VALUES, self.values.is_some());
        set(&mut f, qf::NAMES, self.values.is_some() && self.names.is_some());
        set(&mut f, qf::PAGE_SIZE, self.page_size.is_some());
        set(&mut f, qf::PAGING_STATE, self.paging_state.is_some());
        set(&mut f, qf::SERIAL_CONSISTENCY, self.serial_consistency.is_some());
        set(&mut f, qf::TIMESTAMP, self.timestamp.is_some());
        set(&mut f, qf::KEYSPACE, self.keyspace.is_some());
        set(&mut f, qf::NOW_IN_SECONDS, self.now_in_seconds.is_some());
        f
    }

    /// Writes the parameters (v4 cannot carry a keyspace or now-in-seconds: they are dropped).
    pub fn encode(&self, version: u8, out: &mut BytesMut) {
        out.put_u16(self.consistency);
        let mut f = self.encoded_flags();
        if version < 5 {
            f &= 0xff & !(qf::KEYSPACE);
        }
        put_flags(out, version, f);
        if let Some(values) = &self.values {
            put_values(out, values, self.names.as_ref());
        }
        if let Some(n) = self.page_size {
            out.put_i32(n);
        }
        if let Some(s) = &self.paging_state {
            put_bytes(out, Some(s));
        }
        if let Some(c) = self.serial_consistency {
            out.put_u16(c);
        }
        if let Some(t) = self.timestamp {
            out.put_i64(t);
        }
        if version >= 5 {
            if let Some(k) = &self.keyspace {
                put_string(out, k);
            }
            if let Some(n) = self.now_in_seconds {
                out.put_i32(n);
            }
        }
    }
}

/// QUERY.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub query: String,
    pub params: QueryParams,
}

/// PREPARE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepare {
    pub query: String,
    /// v5 flags as received (bit 0x01: a keyspace follows).
    pub flags: u32,
    /// v5: the keyspace to prepare in.
    pub keyspace: Option<String>,
}

/// EXECUTE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Execute {
    pub id: Bytes,
    /// v5: the id of the result metadata the client holds.
    pub result_metadata_id: Option<Bytes>,
    pub params: QueryParams,
}

/// What routing reads of an EXECUTE, taken from its body in place: no [`Request`] is built
/// for it, so nothing is allocated and nothing large is moved per request. Written by hand
/// (a walk of the body with the same checks as [`Request::decode`]) because that decoder
/// builds owned parameters, which is what the hot path avoids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecutePeek<'a> {
    pub id: &'a [u8],
    /// The query flags (`query_flags`).
    pub flags: u32,
    /// The bound values' `[value]`s, one after another.
    values: &'a [u8],
    count: u16,
}

impl<'a> ExecutePeek<'a> {
    /// Reads an EXECUTE body of protocol `version`. `None` for a body it does not take — named
    /// values, a v5 keyspace, or anything [`Request::decode`] would refuse (let the decoder
    /// handle and report it); when it returns a peek, the decoder accepts the body and reads
    /// the same id, flags and values.
    pub fn read(version: u8, body: &'a [u8]) -> Option<ExecutePeek<'a>> {
        fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            if rest.len() < n {
                return None;
            }
            let (b, after) = rest.split_at(n);
            *rest = after;
            Some(b)
        }
        let short = |b: &[u8]| usize::from(u16::from_be_bytes([b[0], b[1]]));
        let int = |b: &[u8]| i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let mut rest = body;
        let r = &mut rest;
        let n = short(take(r, 2)?);
        let id = take(r, n)?;
        if version >= 5 {
            let n = short(take(r, 2)?);
            take(r, n)?; // result metadata id
        }
        take(r, 2)?; // consistency
        let flags = if version >= 5 {
            int(take(r, 4)?) as u32
        } else {
            u32::from(take(r, 1)?[0])
        };
        if flags & qf::NAMES != 0 || (version >= 5 && flags & qf::KEYSPACE != 0) {
            return None;
        }
        let (mut values, mut count) = (&body[..0], 0u16);
        if flags & qf::VALUES != 0 {
            count = short(take(r, 2)?) as u16;
            let start = *r;
            // As `Reader::count`: a count the body cannot hold is refused before reading.
            if usize::from(count) * 4 > r.len() {
                return None;
            }
            for _ in 0..count {
                match int(take(r, 4)?) {
                    -1 | -2 => {}
                    n if n < 0 => return None,
                    n => {
                        take(r, n as usize)?;
                    }
                }
            }
            values = &start[..start.len() - r.len()];
        }
        if flags & qf::PAGE_SIZE != 0 {
            take(r, 4)?;
        }
        if flags & qf::PAGING_STATE != 0 {
            let n = int(take(r, 4)?);
            if n >= 0 {
                take(r, n as usize)?;
            }
        }
        if flags & qf::SERIAL_CONSISTENCY != 0 {
            take(r, 2)?;
        }
        if flags & qf::TIMESTAMP != 0 {
            take(r, 8)?;
        }
        if version >= 5 && flags & qf::NOW_IN_SECONDS != 0 {
            take(r, 4)?;
        }
        Some(ExecutePeek {
            id,
            flags,
            values,
            count,
        })
    }

    /// How many values are bound.
    pub fn len(&self) -> usize {
        usize::from(self.count)
    }

    /// Whether no value is bound.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The bytes of value `i`: `None` when there is no such value or it is null or unset.
    pub fn value(&self, i: usize) -> Option<&'a [u8]> {
        let mut rest = self.values;
        for k in 0..self.len() {
            let n = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
            let len = usize::try_from(n).unwrap_or(0);
            let v = rest.get(4..4 + len)?;
            if k == i {
                return (n >= 0).then_some(v);
            }
            rest = &rest[4 + len..];
        }
        None
    }
}

/// What a batch statement runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchTarget {
    Query(String),
    Prepared(Bytes),
}

/// One statement of a BATCH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchStatement {
    pub target: BatchTarget,
    pub values: Vec<Value>,
    pub names: Option<Vec<String>>,
}

/// BATCH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// 0 logged, 1 unlogged, 2 counter.
    pub kind: u8,
    pub statements: Vec<BatchStatement>,
    pub consistency: u16,
    pub flags: u32,
    pub serial_consistency: Option<u16>,
    pub timestamp: Option<i64>,
    pub keyspace: Option<String>,
    pub now_in_seconds: Option<i32>,
}

/// A request message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Startup(Vec<(String, String)>),
    AuthResponse(Option<Bytes>),
    Options,
    Query(Query),
    Prepare(Prepare),
    Execute(Execute),
    Register(Vec<String>),
    Batch(Batch),
}

impl Request {
    /// Decodes a request message (the body after its [`Extensions`]).
    pub fn decode(version: u8, opcode: u8, body: Bytes) -> Result<Request, DecodeError> {
        let op = Opcode::from_u8(opcode).ok_or(DecodeError::UnknownOpcode(opcode))?;
        let mut r = Reader::new(body);
        Ok(match op {
            Opcode::Startup => Request::Startup(r.string_map("startup options")?),
            Opcode::AuthResponse => Request::AuthResponse(r.bytes("auth token")?),
            Opcode::Options => Request::Options,
            Opcode::Register => Request::Register(r.string_list("event types")?),
            Opcode::Query => {
                let query = r.long_string("query")?;
                let params = QueryParams::decode(&mut r, version)?;
                Request::Query(Query { query, params })
            }
            Opcode::Prepare => {
                let query = r.long_string("query")?;
                let (flags, keyspace) = if version >= 5 {
                    let f = r.i32("prepare flags")? as u32;
                    let ks = if f & 0x01 != 0 {
                        Some(r.string("keyspace")?)
                    } else {
                        None
                    };
                    (f, ks)
                } else {
                    (0, None)
                };
                Request::Prepare(Prepare {
                    query,
                    flags,
                    keyspace,
                })
            }
            Opcode::Execute => {
                let id = r.short_bytes("prepared id")?;
                let result_metadata_id = if version >= 5 {
                    Some(r.short_bytes("result metadata id")?)
                } else {
                    None
                };
                let params = QueryParams::decode(&mut r, version)?;
                Request::Execute(Execute {
                    id,
                    result_metadata_id,
                    params,
                })
            }
            Opcode::Batch => Request::Batch(decode_batch(&mut r, version)?),
            other => {
                return Err(DecodeError::invalid(
                    "request",
                    format!("{} is not a request", other.name()),
                ));
            }
        })
    }

    /// The opcode of this message.
    pub fn opcode(&self) -> Opcode {
        match self {
            Request::Startup(_) => Opcode::Startup,
            Request::AuthResponse(_) => Opcode::AuthResponse,
            Request::Options => Opcode::Options,
            Request::Query(_) => Opcode::Query,
            Request::Prepare(_) => Opcode::Prepare,
            Request::Execute(_) => Opcode::Execute,
            Request::Register(_) => Opcode::Register,
            Request::Batch(_) => Opcode::Batch,
        }
    }

    /// Writes the message body.
    pub fn encode(&self, version: u8, out: &mut BytesMut) {
        match self {
            Request::Startup(opts) => put_string_map(out, opts),
            Request::AuthResponse(token) => put_bytes(out, token.as_deref()),
            Request::Options => {}
            Request::Register(events) => put_string_list(out, events),
            Request::Query(q) => {
                put_long_string(out, &q.query);
                q.params.encode(version, out);
            }
            Request::Prepare(p) => {
                put_long_string(out, &p.query);
                if version >= 5 {
                    let f = (p.flags & !0x01) | u32::from(p.keyspace.is_some());
                    out.put_u32(f);
                    if let Some(k) = &p.keyspace {
                        put_string(out, k);
                    }
                }
            }
            Request::Execute(e) => {
                put_short_bytes(out, &e.id);
                if version >= 5 {
                    put_short_bytes(out, e.result_metadata_id.as_deref().unwrap_or(&[]));
                }
                e.params.encode(version, out);
            }
            Request::Batch(b) => encode_batch(b, version, out),
        }
    }

    /// The body as bytes.
    pub fn to_body(&self, version: u8) -> Bytes {
        let mut out = BytesMut::new();
        self.encode(version, &mut out);
        out.freeze()
    }
}

fn decode_batch(r: &mut Reader, version: u8) -> Result<Batch, DecodeError> {
    let kind = r.u8("batch type")?;
    let n = r.count("batch statements", 3)?;
    let mut raw = Vec::with_capacity(n);
    for _ in 0..n {
        let target = match r.u8("batch statement kind")? {
            0 => BatchTarget::Query(r.long_string("batch query")?),
            1 => BatchTarget::Prepared(r.short_bytes("batch prepared id")?),
            k => return Err(DecodeError::invalid("batch statement kind", k.to_string())),
        };
        // Names (flag 0x40) are only known after the statements, so keep each statement's
        // values raw for now: Cassandra itself rejects named batch values.
        let count = r.count("batch values", 4)?;
        let mut values = Vec::with_capacity(count);
        for _ in 0..count {
            values.push(r.value("batch value")?);
        }
        raw.push(BatchStatement {
            target,
            values,
            names: None,
        });
    }
    let consistency = r.u16("consistency")?;
    let flags = read_flags(r, version, "batch flags")?;
    let serial_consistency = if flags & qf::SERIAL_CONSISTENCY != 0 {
        Some(r.u16("serial consistency")?)
    } else {
        None
    };
    let timestamp = if flags & qf::TIMESTAMP != 0 {
        Some(r.i64("timestamp")?)
    } else {
        None
    };
    let keyspace = if version >= 5 && flags & qf::KEYSPACE != 0 {
        Some(r.string("keyspace")?)
    } else {
        None
    };
    let now_in_seconds = if version >= 5 && flags & qf::NOW_IN_SECONDS != 0 {
        Some(r.i32("now in seconds")?)
    } else {
        None
    };
    if flags & qf::NAMES != 0 {
        return Err(DecodeError::invalid(
            "batch flags",
            "named values are not supported in batches",
        ));
    }
    Ok(Batch {
        kind,
        statements: raw,
        consistency,
        flags,
        serial_consistency,
        timestamp,
        keyspace,
        now_in_seconds,
    })
}

fn encode_batch(b: &Batch, version: u8, out: &mut BytesMut) {
    out.put_u8(b.kind);
    put_count(out, b.statements.len());
    for s in b.statements.iter().take(u16::MAX as usize) {
        match &s.target {
            BatchTarget::Query(q) => {
                out.put_u8(0);
                put_long_string(out, q);
            }
            BatchTarget::Prepared(id) => {
                out.put_u8(1);
                put_short_bytes(out, id);
            }
        }
        put_values(out, &s.values, None);
    }
    out.put_u16(b.consistency);
    let mut f =
        b.flags & !(qf::SERIAL_CONSISTENCY | qf::TIMESTAMP | qf::KEYSPACE | qf::NOW_IN_SECONDS | qf::NAMES);
    if b.serial_consistency.is_some() {
        f |= qf::SERIAL_CONSISTENCY;
    }
    if b.timestamp.is_some() {
        f |= qf::TIMESTAMP;
    }
    if version >= 5 {
        if b.keyspace.is_some() {
            f |= qf::KEYSPACE;
        }
        if b.now_in_seconds.is_some() {
            f |= qf::NOW_IN_SECONDS;
        }
    }
    put_flags(out, version, f);
    if let Some(c) = b.serial_consistency {
        out.put_u16(c);
    }
    if let Some(t) = b.timestamp {
        out.put_i64(t);
    }
    if version >= 5 {
        if let Some(k) = &b.keyspace {
            put_string(out, k);
        }
        if let Some(n) = b.now_in_seconds {
            out.put_i32(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_round_trips_in_v4_and_v5() {
        let mut params = QueryParams::new(0x000a);
        params.values = Some(vec![
            Value::Set(Bytes::from_static(b"k")),
            Value::Null,
            Value::Unset,
        ]);
        params.page_size = Some(5000);
        params.paging_state = Some(Bytes::from_static(b"\x01\x02"));
        params.timestamp = Some(1_700_000_000_000_000);
        for version in [4u8, 5] {
            let mut p = params.clone();
            if version == 5 {
                p.keyspace = Some("ks".into());
            }
            let q = Request::Query(Query {
                query: "SELECT * FROM kv WHERE k = ?".into(),
                params: p,
            });
            let body = q.to_body(version);
            let back = Request::decode(version, Opcode::Query as u8, body.clone()).unwrap();
            let Request::Query(back_q) = &back else { panic!() };
            assert_eq!(back_q.params.encoded_flags(), back_q.params.flags);
            assert_eq!(back.to_body(version), body);
        }
    }

    #[test]
    fn batch_and_prepare_round_trip() {
        let b = Request::Batch(Batch {
            kind: 1,
            statements: vec![
                BatchStatement {
                    target: BatchTarget::Query("INSERT INTO kv (k, v) VALUES ('a', 1)".into()),
                    values: vec![],
                    names: None,
                },
                BatchStatement {
                    target: BatchTarget::Prepared(Bytes::from_static(&[1, 2, 3])),
                    values: vec![Value::Set(Bytes::from_static(b"x"))],
                    names: None,
                },
            ],
            consistency: 1,
            flags: qf::TIMESTAMP,
            serial_consistency: None,
            timestamp: Some(7),
            keyspace: None,
            now_in_seconds: None,
        });
        for version in [4u8, 5] {
            let body = b.to_body(version);
            assert_eq!(Request::decode(version, Opcode::Batch as u8, body).unwrap(), b);
        }
        let p = Request::Prepare(Prepare {
            query: "SELECT 1".into(),
            flags: 1,
            keyspace: Some("ks".into()),
        });
        assert_eq!(
            Request::decode(5, Opcode::Prepare as u8, p.to_body(5)).unwrap(),
            p
        );
    }

    #[test]
    fn responses_are_not_requests() {
        assert!(Request::decode(4, Opcode::Result as u8, Bytes::new()).is_err());
        assert_eq!(
            Request::decode(4, 0x42, Bytes::new()),
            Err(DecodeError::UnknownOpcode(0x42))
        );
    }
}
