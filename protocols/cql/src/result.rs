//! RESULT bodies: Void, Rows (metadata + raw row bytes), Set_keyspace, Prepared (with the
//! partition-key indexes sluice routes EXECUTE on) and Schema_change.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::DecodeError;
use crate::types::ColumnType;
use crate::wire::{put_bytes, put_short_bytes, put_string, put_string_list, Reader};

/// Rows metadata flag bits.
pub mod rows_flags {
    pub const GLOBAL_TABLES_SPEC: i32 = 0x0001;
    pub const HAS_MORE_PAGES: i32 = 0x0002;
    pub const NO_METADATA: i32 = 0x0004;
    pub const METADATA_CHANGED: i32 = 0x0008;
}
use rows_flags as rf;

/// One column of a result or of a prepared statement's bind variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnSpec {
    pub keyspace: String,
    pub table: String,
    pub name: String,
    pub typ: ColumnType,
}

impl ColumnSpec {
    /// A column of `keyspace.table`.
    pub fn new(keyspace: &str, table: &str, name: &str, typ: ColumnType) -> ColumnSpec {
        ColumnSpec {
            keyspace: keyspace.into(),
            table: table.into(),
            name: name.into(),
            typ,
        }
    }
}

fn read_specs(
    r: &mut Reader,
    count: usize,
    global: &Option<(String, String)>,
) -> Result<Vec<ColumnSpec>, DecodeError> {
    // A spec is at least 4 bytes (empty name + type id).
    if count.saturating_mul(4) > r.remaining() {
        return Err(DecodeError::Truncated("column specs"));
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let (keyspace, table) = match global {
            Some((k, t)) => (k.clone(), t.clone()),
            None => (r.string("column keyspace")?, r.string("column table")?),
        };
        let name = r.string("column name")?;
        let typ = ColumnType::decode(r)?;
        out.push(ColumnSpec {
            keyspace,
            table,
            name,
            typ,
        });
    }
    Ok(out)
}

fn put_specs(out: &mut BytesMut, specs: &[ColumnSpec], global: bool) {
    for c in specs {
        if !global {
            put_string(out, &c.keyspace);
            put_string(out, &c.table);
        }
        put_string(out, &c.name);
        c.typ.encode(out);
    }
}

fn count_of(n: i32, what: &'static str) -> Result<usize, DecodeError> {
    usize::try_from(n).map_err(|_| DecodeError::invalid(what, format!("negative count {n}")))
}

/// The metadata in front of rows (and the result metadata of a prepared statement).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RowsMetadata {
    /// Flags other than GLOBAL_TABLES_SPEC, HAS_MORE_PAGES and METADATA_CHANGED, which follow
    /// from the fields (e.g. NO_METADATA).
    pub flags: i32,
    /// Column count as declared (also present with NO_METADATA).
    pub columns_count: i32,
    pub paging_state: Option<Bytes>,
    /// v5, METADATA_CHANGED.
    pub new_metadata_id: Option<Bytes>,
    /// Keyspace and table shared by every column, when written once.
    pub global_spec: Option<(String, String)>,
    /// Empty with NO_METADATA.
    pub columns: Vec<ColumnSpec>,
}

impl RowsMetadata {
    /// Metadata listing `columns`, written with a global table spec when they share a table.
    pub fn new(columns: Vec<ColumnSpec>) -> RowsMetadata {
        let global_spec = match columns.first() {
            Some(first)
                if columns
                    .iter()
                    .all(|c| c.keyspace == first.keyspace && c.table == first.table) =>
            {
                Some((first.keyspace.clone(), first.table.clone()))
            }
            _ => None,
        };
        RowsMetadata {
            flags: 0,
            columns_count: i32::try_from(columns.len()).unwrap_or(i32::MAX),
            paging_state: None,
            new_metadata_id: None,
            global_spec,
            columns,
        }
    }

    /// Reads rows metadata.
    pub fn decode(r: &mut Reader) -> Result<RowsMetadata, DecodeError> {
        let flags = r.i32("rows flags")?;
        let columns_count = r.i32("columns count")?;
        let count = count_of(columns_count, "columns count")?;
        let mut m = RowsMetadata {
            flags: flags & !(rf::GLOBAL_TABLES_SPEC | rf::HAS_MORE_PAGES | rf::METADATA_CHANGED),
            columns_count,
            ..RowsMetadata::default()
        };
        if flags & rf::HAS_MORE_PAGES != 0 {
            m.paging_state = r.bytes("paging state")?;
        }
        if flags & rf::METADATA_CHANGED != 0 {
            m.new_metadata_id = Some(r.short_bytes("new metadata id")?);
        }
        if flags & rf::NO_METADATA != 0 {
            return Ok(m);
        }
        if flags & rf::GLOBAL_TABLES_SPEC != 0 {
            m.global_spec = Some((r.string("global keyspace")?, r.string("global table")?));
        }
        m.columns = read_specs(r, count, &m.global_spec)?;
        Ok(m)
    }

    /// Writes the metadata.
    pub fn encode(&self, out: &mut BytesMut) {
        let no_metadata = self.flags & rf::NO_METADATA != 0;
        let mut flags = self.flags & !(rf::GLOBAL_TABLES_SPEC | rf::HAS_MORE_PAGES | rf::METADATA_CHANGED);
        if self.paging_state.is_some() {
            flags |= rf::HAS_MORE_PAGES;
        }
        if self.new_metadata_id.is_some() {
            flags |= rf::METADATA_CHANGED;
        }
        if !no_metadata && self.global_spec.is_some() {
            flags |= rf::GLOBAL_TABLES_SPEC;
        }
        out.put_i32(flags);
        out.put_i32(self.columns_count);
        if let Some(p) = &self.paging_state {
            put_bytes(out, Some(p));
        }
        if let Some(id) = &self.new_metadata_id {
            put_short_bytes(out, id);
        }
        if no_metadata {
            return;
        }
        if let Some((k, t)) = &self.global_spec {
            put_string(out, k);
            put_string(out, t);
        }
        put_specs(out, &self.columns, self.global_spec.is_some());
    }
}

/// A Rows result: metadata, then the row values kept as the raw bytes they came in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rows {
    pub metadata: RowsMetadata,
    pub rows_count: i32,
    /// `rows_count` rows of `columns_count` `[bytes]` each.
    pub content: Bytes,
}

impl Rows {
    /// Builds a Rows result from values (`None` is null).
    pub fn from_values(metadata: RowsMetadata, rows: &[Vec<Option<Bytes>>]) -> Rows {
        let mut content = BytesMut::new();
        for row in rows {
            for v in row {
                put_bytes(&mut content, v.as_deref());
            }
        }
        Rows {
            metadata,
            rows_count: i32::try_from(rows.len()).unwrap_or(i32::MAX),
            content: content.freeze(),
        }
    }

    /// The row values; fails if the content does not hold `rows_count` whole rows.
    pub fn rows(&self) -> Result<Vec<Vec<Option<Bytes>>>, DecodeError> {
        let rows = count_of(self.rows_count, "rows count")?;
        let cols = count_of(self.metadata.columns_count, "columns count")?;
        let mut r = Reader::new(self.content.clone());
        // Every value is at least its 4-byte length.
        if rows.saturating_mul(cols).saturating_mul(4) > r.remaining() {
            return Err(DecodeError::Truncated("rows"));
        }
        let mut out = Vec::with_capacity(rows);
        for _ in 0..rows {
            let mut row = Vec::with_capacity(cols);
            for _ in 0..cols {
                row.push(r.bytes("row value")?);
            }
            out.push(row);
        }
        Ok(out)
    }
}

/// The bind-variable metadata of a prepared statement.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PreparedMetadata {
    /// Flags other than GLOBAL_TABLES_SPEC (which follows from `global_spec`).
    pub flags: i32,
    /// Indexes into `columns` of the partition key components, in partition-key order.
    pub pk_indexes: Vec<u16>,
    pub global_spec: Option<(String, String)>,
    pub columns: Vec<ColumnSpec>,
}

impl PreparedMetadata {
    fn decode(r: &mut Reader) -> Result<PreparedMetadata, DecodeError> {
        let flags = r.i32("prepared flags")?;
        let count = count_of(r.i32("columns count")?, "columns count")?;
        let pk_count = r.int_count("pk count", 2)?;
        let mut pk_indexes = Vec::with_capacity(pk_count);
        for _ in 0..pk_count {
            pk_indexes.push(r.u16("pk index")?);
        }
        let global_spec = if flags & rf::GLOBAL_TABLES_SPEC != 0 {
            Some((r.string("global keyspace")?, r.string("global table")?))
        } else {
            None
        };
        let columns = read_specs(r, count, &global_spec)?;
        Ok(PreparedMetadata {
            flags: flags & !rf::GLOBAL_TABLES_SPEC,
            pk_indexes,
            global_spec,
            columns,
        })
    }

    fn encode(&self, out: &mut BytesMut) {
        let mut flags = self.flags & !rf::GLOBAL_TABLES_SPEC;
        if self.global_spec.is_some() {
            flags |= rf::GLOBAL_TABLES_SPEC;
        }
        out.put_i32(flags);
        out.put_i32(i32::try_from(self.columns.len()).unwrap_or(i32::MAX));
        out.put_i32(i32::try_from(self.pk_indexes.len()).unwrap_or(i32::MAX));
        for i in &self.pk_indexes {
            out.put_u16(*i);
        }
        if let Some((k, t)) = &self.global_spec {
            put_string(out, k);
            put_string(out, t);
        }
        put_specs(out, &self.columns, self.global_spec.is_some());
    }
}

/// A Prepared result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub id: Bytes,
    /// v5 only.
    pub result_metadata_id: Option<Bytes>,
    pub metadata: PreparedMetadata,
    pub result_metadata: RowsMetadata,
}

/// The target of a schema change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaChange {
    /// CREATED, UPDATED or DROPPED.
    pub change: String,
    /// KEYSPACE, TABLE, TYPE, FUNCTION or AGGREGATE.
    pub target: String,
    pub keyspace: String,
    /// The table, type, function or aggregate name (not for KEYSPACE).
    pub name: Option<String>,
    /// FUNCTION and AGGREGATE argument types.
    pub arguments: Option<Vec<String>>,
}

impl SchemaChange {
    /// Reads the body shared by RESULT Schema_change and EVENT SCHEMA_CHANGE.
    pub fn decode(r: &mut Reader) -> Result<SchemaChange, DecodeError> {
        let change = r.string("change type")?;
        let target = r.string("change target")?;
        let keyspace = r.string("keyspace")?;
        let (name, arguments) = match target.as_str() {
            "KEYSPACE" => (None, None),
            "TABLE" | "TYPE" => (Some(r.string("name")?), None),
            "FUNCTION" | "AGGREGATE" => (Some(r.string("name")?), Some(r.string_list("arguments")?)),
            other => return Err(DecodeError::invalid("change target", other.to_string())),
        };
        Ok(SchemaChange {
            change,
            target,
            keyspace,
            name,
            arguments,
        })
    }

    /// Writes the body.
    pub fn encode(&self, out: &mut BytesMut) {
        put_string(out, &self.change);
        put_string(out, &self.target);
        put_string(out, &self.keyspace);
        if let Some(n) = &self.name {
            put_string(out, n);
        }
        if let Some(a) = &self.arguments {
            put_string_list(out, a);
        }
    }
}

/// A RESULT body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultBody {
    Void,
    Rows(Rows),
    SetKeyspace(String),
    Prepared(Prepared),
    SchemaChange(SchemaChange),
}

impl ResultBody {
    /// Reads a RESULT body.
    pub fn decode(r: &mut Reader, version: u8) -> Result<ResultBody, DecodeError> {
        Ok(match r.i32("result kind")? {
            1 => ResultBody::Void,
            2 => {
                let metadata = RowsMetadata::decode(r)?;
                let rows_count = r.i32("rows count")?;
                let content = r.take(r.remaining(), "rows")?;
                ResultBody::Rows(Rows {
                    metadata,
                    rows_count,
                    content,
                })
            }
            3 => ResultBody::SetKeyspace(r.string("keyspace")?),
            4 => {
                let id = r.short_bytes("prepared id")?;
                let result_metadata_id = if version >= 5 {
                    Some(r.short_bytes("result metadata id")?)
                } else {
                    None
                };
                let metadata = PreparedMetadata::decode(r)?;
                let result_metadata = RowsMetadata::decode(r)?;
                ResultBody::Prepared(Prepared {
                    id,
                    result_metadata_id,
                    metadata,
                    result_metadata,
                })
            }
            5 => ResultBody::SchemaChange(SchemaChange::decode(r)?),
            k => return Err(DecodeError::invalid("result kind", k.to_string())),
        })
    }

    /// Writes a RESULT body.
    pub fn encode(&self, version: u8, out: &mut BytesMut) {
        match self {
            ResultBody::Void => out.put_i32(1),
            ResultBody::Rows(rows) => {
                out.put_i32(2);
                rows.metadata.encode(out);
                out.put_i32(rows.rows_count);
                out.put_slice(&rows.content);
            }
            ResultBody::SetKeyspace(k) => {
                out.put_i32(3);
                put_string(out, k);
            }
            ResultBody::Prepared(p) => {
                out.put_i32(4);
                put_short_bytes(out, &p.id);
                if version >= 5 {
                    put_short_bytes(out, p.result_metadata_id.as_deref().unwrap_or(&[]));
                }
                p.metadata.encode(out);
                p.result_metadata.encode(out);
            }
            ResultBody::SchemaChange(s) => {
                out.put_i32(5);
                s.encode(out);
            }
        }
    }
}
