//! Response messages (server to client): ERROR, READY, AUTHENTICATE, SUPPORTED, RESULT, EVENT,
//! AUTH_CHALLENGE and AUTH_SUCCESS.

use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::DecodeError;
use crate::frame::Opcode;
pub use crate::result::{
    ColumnSpec, Prepared, PreparedMetadata, ResultBody, Rows, RowsMetadata, SchemaChange,
};
use crate::wire::{put_bytes, put_inet, put_short_bytes, put_string, put_string_multimap, Reader};

/// Error codes.
pub mod error_code {
    pub const SERVER_ERROR: i32 = 0x0000;
    pub const PROTOCOL_ERROR: i32 = 0x000A;
    pub const AUTH_ERROR: i32 = 0x0100;
    pub const UNAVAILABLE: i32 = 0x1000;
    pub const OVERLOADED: i32 = 0x1001;
    pub const IS_BOOTSTRAPPING: i32 = 0x1002;
    pub const TRUNCATE_ERROR: i32 = 0x1003;
    pub const WRITE_TIMEOUT: i32 = 0x1100;
    pub const READ_TIMEOUT: i32 = 0x1200;
    pub const READ_FAILURE: i32 = 0x1300;
    pub const FUNCTION_FAILURE: i32 = 0x1400;
    pub const WRITE_FAILURE: i32 = 0x1500;
    pub const SYNTAX_ERROR: i32 = 0x2000;
    pub const UNAUTHORIZED: i32 = 0x2100;
    pub const INVALID: i32 = 0x2200;
    pub const CONFIG_ERROR: i32 = 0x2300;
    pub const ALREADY_EXISTS: i32 = 0x2400;
    pub const UNPREPARED: i32 = 0x2500;
}
use error_code as ec;

/// An ERROR body: code, message, and the code-specific rest kept raw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorBody {
    pub code: i32,
    pub message: String,
    /// Whatever follows the message (e.g. the unknown id of UNPREPARED).
    pub extra: Bytes,
}

impl ErrorBody {
    /// An error without extra fields.
    pub fn new(code: i32, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            code,
            message: message.into(),
            extra: Bytes::new(),
        }
    }

    /// A protocol error.
    pub fn protocol(message: impl Into<String>) -> ErrorBody {
        ErrorBody::new(ec::PROTOCOL_ERROR, message)
    }

    /// UNPREPARED for `id`.
    pub fn unprepared(id: &[u8]) -> ErrorBody {
        let mut extra = BytesMut::new();
        put_short_bytes(&mut extra, id);
        ErrorBody {
            code: ec::UNPREPARED,
            message: format!("Prepared query with ID {} not found", hex(id)),
            extra: extra.freeze(),
        }
    }

    /// UNAVAILABLE: `<cl><required><alive>`.
    pub fn unavailable(consistency: u16, required: i32, alive: i32) -> ErrorBody {
        let mut extra = BytesMut::new();
        extra.put_u16(consistency);
        extra.put_i32(required);
        extra.put_i32(alive);
        ErrorBody {
            code: ec::UNAVAILABLE,
            message: "Cannot achieve consistency level".into(),
            extra: extra.freeze(),
        }
    }

    /// ALREADY_EXISTS for a keyspace (empty `table`) or a table.
    pub fn already_exists(keyspace: &str, table: &str) -> ErrorBody {
        let mut extra = BytesMut::new();
        put_string(&mut extra, keyspace);
        put_string(&mut extra, table);
        let message = if table.is_empty() {
            format!("Cannot add existing keyspace \"{keyspace}\"")
        } else {
            format!("Cannot add already existing table \"{table}\" to keyspace \"{keyspace}\"")
        };
        ErrorBody {
            code: ec::ALREADY_EXISTS,
            message,
            extra: extra.freeze(),
        }
    }

    /// The statement id of an UNPREPARED error.
    pub fn unprepared_id(&self) -> Option<Bytes> {
        if self.code != ec::UNPREPARED {
            return None;
        }
        Reader::new(self.extra.clone()).short_bytes("unprepared id").ok()
    }
}

/// Lowercase hex of bytes, as Cassandra prints statement ids.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An EVENT body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// NEW_NODE, REMOVED_NODE (MOVED_NODE) and the node's native address.
    TopologyChange {
        change: String,
        address: SocketAddr,
    },
    /// UP or DOWN and the node's native address.
    StatusChange {
        change: String,
        address: SocketAddr,
    },
    SchemaChange(SchemaChange),
}

impl Event {
    fn decode(r: &mut Reader) -> Result<Event, DecodeError> {
        let kind = r.string("event type")?;
        Ok(match kind.as_str() {
            "TOPOLOGY_CHANGE" => Event::TopologyChange {
                change: r.string("change")?,
                address: r.inet("address")?,
            },
            "STATUS_CHANGE" => Event::StatusChange {
                change: r.string("change")?,
                address: r.inet("address")?,
            },
            "SCHEMA_CHANGE" => Event::SchemaChange(SchemaChange::decode(r)?),
            other => return Err(DecodeError::invalid("event type", other.to_string())),
        })
    }

    fn encode(&self, out: &mut BytesMut) {
        match self {
            Event::TopologyChange { change, address } | Event::StatusChange { change, address } => {
                let kind = if matches!(self, Event::TopologyChange { .. }) {
                    "TOPOLOGY_CHANGE"
                } else {
                    "STATUS_CHANGE"
                };
                put_string(out, kind);
                put_string(out, change);
                put_inet(out, *address);
            }
            Event::SchemaChange(s) => {
                put_string(out, "SCHEMA_CHANGE");
                s.encode(out);
            }
        }
    }
}

/// A response message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Error(ErrorBody),
    Ready,
    Authenticate(String),
    Supported(Vec<(String, Vec<String>)>),
    Result(ResultBody),
    Event(Event),
    AuthChallenge(Option<Bytes>),
    AuthSuccess(Option<Bytes>),
}

impl Response {
    /// Decodes a response message (the body after its extensions).
    pub fn decode(version: u8, opcode: u8, body: Bytes) -> Result<Response, DecodeError> {
        let op = Opcode::from_u8(opcode).ok_or(DecodeError::UnknownOpcode(opcode))?;
        let mut r = Reader::new(body);
        Ok(match op {
            Opcode::Error => {
                let code = r.i32("error code")?;
                let message = r.string("error message")?;
                Response::Error(ErrorBody {
                    code,
                    message,
                    extra: r.rest(),
                })
            }
            Opcode::Ready => Response::Ready,
            Opcode::Authenticate => Response::Authenticate(r.string("authenticator")?),
            Opcode::Supported => Response::Supported(r.string_multimap("supported options")?),
            Opcode::Result => Response::Result(ResultBody::decode(&mut r, version)?),
            Opcode::Event => Response::Event(Event::decode(&mut r)?),
            Opcode::AuthChallenge => Response::AuthChallenge(r.bytes("auth token")?),
            Opcode::AuthSuccess => Response::AuthSuccess(r.bytes("auth token")?),
            other => {
                return Err(DecodeError::invalid(
                    "response",
                    format!("{} is not a response", other.name()),
                ));
            }
        })
    }

    /// The opcode of this message.
    pub fn opcode(&self) -> Opcode {
        match self {
            Response::Error(_) => Opcode::Error,
            Response::Ready => Opcode::Ready,
            Response::Authenticate(_) => Opcode::Authenticate,
            Response::Supported(_) => Opcode::Supported,
            Response::Result(_) => Opcode::Result,
            Response::Event(_) => Opcode::Event,
            Response::AuthChallenge(_) => Opcode::AuthChallenge,
            Response::AuthSuccess(_) => Opcode::AuthSuccess,
        }
    }

    /// Writes the message body.
    pub fn encode(&self, version: u8, out: &mut BytesMut) {
        match self {
            Response::Error(e) => {
                out.put_i32(e.code);
                put_string(out, &e.message);
                out.put_slice(&e.extra);
            }
            Response::Ready => {}
            Response::Authenticate(a) => put_string(out, a),
            Response::Supported(opts) => put_string_multimap(out, opts),
            Response::Result(r) => r.encode(version, out),
            Response::Event(e) => e.encode(out),
            Response::AuthChallenge(t) | Response::AuthSuccess(t) => put_bytes(out, t.as_deref()),
        }
    }

    /// The body as bytes.
    pub fn to_body(&self, version: u8) -> Bytes {
        let mut out = BytesMut::new();
        self.encode(version, &mut out);
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ColumnType;

    #[test]
    fn results_round_trip() {
        let specs = vec![
            ColumnSpec::new("ks", "kv", "k", ColumnType::Varchar),
            ColumnSpec::new("ks", "kv", "v", ColumnType::Int),
        ];
        let mut meta = RowsMetadata::new(specs.clone());
        meta.paging_state = Some(Bytes::from_static(b"\0\x05"));
        let rows = Rows::from_values(meta, &[vec![Some(Bytes::from_static(b"a")), None]]);
        assert_eq!(
            rows.rows().unwrap(),
            vec![vec![Some(Bytes::from_static(b"a")), None]]
        );
        let prepared = Prepared {
            id: Bytes::from_static(&[1; 16]),
            result_metadata_id: Some(Bytes::from_static(&[2; 16])),
            metadata: PreparedMetadata {
                flags: 0,
                pk_indexes: vec![0],
                global_spec: Some(("ks".into(), "kv".into())),
                columns: specs,
            },
            result_metadata: RowsMetadata {
                flags: 4,
                ..RowsMetadata::default()
            },
        };
        for r in [
            Response::Result(ResultBody::Rows(rows)),
            Response::Result(ResultBody::Prepared(prepared)),
            Response::Error(ErrorBody::unprepared(&[0xab; 16])),
            Response::Event(Event::StatusChange {
                change: "DOWN".into(),
                address: "127.0.0.3:9042".parse().unwrap(),
            }),
            Response::Supported(vec![("COMPRESSION".into(), vec!["lz4".into()])]),
        ] {
            let body = r.to_body(5);
            assert_eq!(Response::decode(5, r.opcode() as u8, body).unwrap(), r);
        }
        assert_eq!(
            ErrorBody::unprepared(&[0xab; 16]).unprepared_id().unwrap(),
            Bytes::from_static(&[0xab; 16])
        );
    }
}
