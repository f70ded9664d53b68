//! Column types as the protocol describes them (`[option]`), and their CQL names.

use bytes::{BufMut, BytesMut};

use crate::error::DecodeError;
use crate::wire::{put_count, put_string, Reader};

/// Nesting deeper than this is refused (no real schema comes close), so that a hostile body
/// cannot recurse the decoder off the stack.
const MAX_DEPTH: usize = 32;

/// A CQL type.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ColumnType {
    Custom(String),
    Ascii,
    Bigint,
    Blob,
    Boolean,
    Counter,
    Decimal,
    Double,
    Float,
    Int,
    Timestamp,
    Uuid,
    Varchar,
    Varint,
    Timeuuid,
    Inet,
    Date,
    Time,
    Smallint,
    Tinyint,
    Duration,
    List(Box<ColumnType>),
    Map(Box<ColumnType>, Box<ColumnType>),
    Set(Box<ColumnType>),
    Udt {
        keyspace: String,
        name: String,
        fields: Vec<(String, ColumnType)>,
    },
    Tuple(Vec<ColumnType>),
}

impl ColumnType {
    /// Reads an `[option]` type.
    pub fn decode(r: &mut Reader) -> Result<ColumnType, DecodeError> {
        Self::decode_at(r, 0)
    }

    fn decode_at(r: &mut Reader, depth: usize) -> Result<ColumnType, DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError::invalid("type", "nested too deeply"));
        }
        let id = r.u16("type id")?;
        let sub = |r: &mut Reader| Self::decode_at(r, depth + 1).map(Box::new);
        use ColumnType::*;
        Ok(match id {
            0x0000 => Custom(r.string("custom type")?),
            0x0001 => Ascii,
            0x0002 => Bigint,
            0x0003 => Blob,
            0x0004 => Boolean,
            0x0005 => Counter,
            0x0006 => Decimal,
            0x0007 => Double,
            0x0008 => Float,
            0x0009 => Int,
            0x000B => Timestamp,
            0x000C => Uuid,
            0x000D => Varchar,
            0x000E => Varint,
            0x000F => Timeuuid,
            0x0010 => Inet,
            0x0011 => Date,
            0x0012 => Time,
            0x0013 => Smallint,
            0x0014 => Tinyint,
            0x0015 => Duration,
            0x0020 => List(sub(r)?),
            0x0021 => Map(sub(r)?, sub(r)?),
            0x0022 => Set(sub(r)?),
            0x0030 => {
                let keyspace = r.string("udt keyspace")?;
                let name = r.string("udt name")?;
                let n = r.count("udt fields", 4)?;
                let mut fields = Vec::with_capacity(n);
                for _ in 0..n {
                    let f = r.string("udt field")?;
                    fields.push((f, Self::decode_at(r, depth + 1)?));
                }
                Udt {
                    keyspace,
                    name,
                    fields,
                }
            }
            0x0031 => {
                let n = r.count("tuple", 2)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(Self::decode_at(r, depth + 1)?);
                }
                Tuple(items)
            }
            other => return Err(DecodeError::invalid("type id", format!("{other:#06x}"))),
        })
    }

    /// Writes the `[option]`.
    pub fn encode(&self, out: &mut BytesMut) {
        use ColumnType::*;
        let id: u16 = match self {
            Custom(_) => 0x0000,
            Ascii => 0x0001,
            Bigint => 0x0002,
            Blob => 0x0003,
            Boolean => 0x0004,
            Counter => 0x0005,
            Decimal => 0x0006,
            Double => 0x0007,
            Float => 0x0008,
            Int => 0x0009,
            Timestamp => 0x000B,
            Uuid => 0x000C,
            Varchar => 0x000D,
            Varint => 0x000E,
            Timeuuid => 0x000F,
            Inet => 0x0010,
            Date => 0x0011,
            Time => 0x0012,
            Smallint => 0x0013,
            Tinyint => 0x0014,
            Duration => 0x0015,
            List(_) => 0x0020,
            Map(..) => 0x0021,
            Set(_) => 0x0022,
            Udt { .. } => 0x0030,
            Tuple(_) => 0x0031,
        };
        out.put_u16(id);
        match self {
            Custom(c) => put_string(out, c),
            List(t) | Set(t) => t.encode(out),
            Map(k, v) => {
                k.encode(out);
                v.encode(out);
            }
            Udt {
                keyspace,
                name,
                fields,
            } => {
                put_string(out, keyspace);
                put_string(out, name);
                put_count(out, fields.len());
                for (f, t) in fields {
                    put_string(out, f);
                    t.encode(out);
                }
            }
            Tuple(items) => {
                put_count(out, items.len());
                for t in items {
                    t.encode(out);
                }
            }
            _ => {}
        }
    }

    /// Parses a CQL type name as `system_schema.columns.type` writes it (`text`,
    /// `frozen<list<int>>`, `map<text, int>`, ...). User types and custom classes are not
    /// resolved and give `None`.
    pub fn parse(name: &str) -> Option<ColumnType> {
        let mut p = TypeParser {
            s: name.trim(),
            depth: 0,
        };
        let t = p.parse()?;
        p.s.trim().is_empty().then_some(t)
    }

    /// The CQL name, as `system_schema.columns.type` writes it.
    pub fn cql_name(&self) -> String {
        use ColumnType::*;
        match self {
            Custom(c) => format!("'{c}'"),
            Ascii => "ascii".into(),
            Bigint => "bigint".into(),
            Blob => "blob".into(),
            Boolean => "boolean".into(),
            Counter => "counter".into(),
            Decimal => "decimal".into(),
            Double => "double".into(),
            Float => "float".into(),
            Int => "int".into(),
            Timestamp => "timestamp".into(),
            Uuid => "uuid".into(),
            Varchar => "text".into(),
            Varint => "varint".into(),
            Timeuuid => "timeuuid".into(),
            Inet => "inet".into(),
            Date => "date".into(),
            Time => "time".into(),
            Smallint => "smallint".into(),
            Tinyint => "tinyint".into(),
            Duration => "duration".into(),
            List(t) => format!("list<{}>", t.cql_name()),
            Set(t) => format!("set<{}>", t.cql_name()),
            Map(k, v) => format!("map<{}, {}>", k.cql_name(), v.cql_name()),
            Udt { name, .. } => name.clone(),
            Tuple(items) => format!(
                "tuple<{}>",
                items
                    .iter()
                    .map(ColumnType::cql_name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

struct TypeParser<'a> {
    s: &'a str,
    depth: usize,
}

impl TypeParser<'_> {
    fn word(&mut self) -> &str {
        self.s = self.s.trim_start();
        let end = self
            .s
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(self.s.len());
        let (w, rest) = self.s.split_at(end);
        self.s = rest;
        w
    }

    fn eat(&mut self, c: char) -> bool {
        self.s = self.s.trim_start();
        if let Some(rest) = self.s.strip_prefix(c) {
            self.s = rest;
            true
        } else {
            false
        }
    }

    fn args(&mut self) -> Option<Vec<ColumnType>> {
        if !self.eat('<') {
            return None;
        }
        let mut out = vec![self.parse()?];
        while self.eat(',') {
            out.push(self.parse()?);
        }
        self.eat('>').then_some(out)
    }

    fn parse(&mut self) -> Option<ColumnType> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return None;
        }
        use ColumnType::*;
        let w = self.word().to_ascii_lowercase();
        let t = match w.as_str() {
            "ascii" => Ascii,
            "bigint" => Bigint,
            "blob" => Blob,
            "boolean" => Boolean,
            "counter" => Counter,
            "decimal" => Decimal,
            "double" => Double,
            "float" => Float,
            "int" => Int,
            "timestamp" => Timestamp,
            "uuid" => Uuid,
            "text" | "varchar" => Varchar,
            "varint" => Varint,
            "timeuuid" => Timeuuid,
            "inet" => Inet,
            "date" => Date,
            "time" => Time,
            "smallint" => Smallint,
            "tinyint" => Tinyint,
            "duration" => Duration,
            "frozen" => {
                let mut a = self.args()?;
                if a.len() != 1 {
                    return None;
                }
                a.pop()?
            }
            "list" | "set" => {
                let mut a = self.args()?;
                if a.len() != 1 {
                    return None;
                }
                let inner = Box::new(a.pop()?);
                if w == "list" {
                    List(inner)
                } else {
                    Set(inner)
                }
            }
            "map" => {
                let mut a = self.args()?;
                if a.len() != 2 {
                    return None;
                }
                let v = a.pop()?;
                let k = a.pop()?;
                Map(Box::new(k), Box::new(v))
            }
            "tuple" => Tuple(self.args()?),
            _ => return None,
        };
        self.depth -= 1;
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_options_round_trip() {
        for name in [
            "text",
            "map<text, frozen<list<int>>>",
            "set<uuid>",
            "tuple<int, blob>",
            "timeuuid",
        ] {
            let t = ColumnType::parse(name).unwrap();
            let mut out = BytesMut::new();
            t.encode(&mut out);
            let back = ColumnType::decode(&mut Reader::new(out.freeze())).unwrap();
            assert_eq!(back, t);
            assert_eq!(ColumnType::parse(&back.cql_name()).unwrap(), t);
        }
        assert_eq!(ColumnType::parse("varchar"), Some(ColumnType::Varchar));
        assert_eq!(ColumnType::parse("list<int"), None);
        assert_eq!(ColumnType::parse("my_udt"), None);
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut out = BytesMut::new();
        for _ in 0..10_000 {
            out.put_u16(0x0020);
        }
        assert!(ColumnType::decode(&mut Reader::new(out.freeze())).is_err());
        let name = format!("{}int{}", "list<".repeat(1000), ">".repeat(1000));
        assert_eq!(ColumnType::parse(&name), None);
    }
}
