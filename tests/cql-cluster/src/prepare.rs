//! Prepared statements: the bind variables' column specs, the partition-key bind indexes and
//! the result columns, as Cassandra reports them in a Prepared result.

use bytes::Bytes;
use sluice_cql::response::{
    ColumnSpec, ErrorBody, Prepared as PreparedResult, PreparedMetadata, RowsMetadata,
};
use sluice_cql::result::rows_flags;
use sluice_cql::statement::{Bind, Condition, Op, Relation, Selector, Statement, Term, Using};
use sluice_cql::types::ColumnType;

use crate::exec::{invalid, resolve, table};
use crate::schema::{Db, Kind};
use crate::systables::{is_system_keyspace, system_table};
use crate::values::{prepared_id, result_metadata_id};
use crate::Shared;

/// A statement prepared on one node.
#[derive(Debug, Clone)]
pub struct PreparedStatement {
    pub id: Bytes,
    pub query: String,
    /// The keyspace the statement was prepared in (USE or per-query keyspace).
    pub keyspace: Option<String>,
    pub statement: Statement,
    pub result: PreparedResult,
}

fn bind_index(t: &Term) -> Option<(usize, Option<String>)> {
    match t {
        Term::Bind(Bind::Positional(i)) => Some((*i, None)),
        Term::Bind(Bind::Named(n, i)) => Some((*i, Some(n.clone()))),
        _ => None,
    }
}

struct Collector<'a> {
    ks: &'a str,
    table: &'a str,
    columns: &'a [(String, ColumnType, Kind)],
    out: Vec<(usize, ColumnSpec)>,
}

impl Collector<'_> {
    fn add(&mut self, term: &Term, name: &str, typ: ColumnType) {
        if let Some((i, named)) = bind_index(term) {
            let n = named.unwrap_or_else(|| name.to_string());
            self.out.push((i, ColumnSpec::new(self.ks, self.table, &n, typ)));
        }
    }

    fn column(&mut self, term: &Term, col: &str) -> Result<(), ErrorBody> {
        let typ = self
            .columns
            .iter()
            .find(|c| c.0 == col)
            .map(|c| c.1.clone())
            .ok_or_else(|| invalid(format!("Undefined column name {col}")))?;
        self.add(term, col, typ);
        Ok(())
    }

    fn relations(&mut self, rels: &[Relation]) -> Result<(), ErrorBody> {
        for r in rels {
            if r.column.is_empty() {
                continue;
            }
            if r.op == Op::InValue {
                let typ = self.columns.iter().find(|c| c.0 == r.column).map(|c| c.1.clone());
                let typ = typ.ok_or_else(|| invalid(format!("Undefined column name {}", r.column)))?;
                self.add(
                    &r.terms[0],
                    &format!("in({})", r.column),
                    ColumnType::List(Box::new(typ)),
                );
                continue;
            }
            for t in &r.terms {
                self.column(t, &r.column)?;
            }
        }
        Ok(())
    }

    fn using(&mut self, u: &Using) {
        if let Some(t) = &u.ttl {
            self.add(t, "[ttl]", ColumnType::Int);
        }
        if let Some(t) = &u.timestamp {
            self.add(t, "[timestamp]", ColumnType::Bigint);
        }
    }

    fn condition(&mut self, c: &Condition) -> Result<(), ErrorBody> {
        if let Condition::Columns(rels) = c {
            self.relations(rels)?;
        }
        Ok(())
    }
}

/// Prepares `query` as a node does, in `keyspace`.
pub fn prepare(
    shared: &Shared,
    db: &Db,
    node: usize,
    query: &str,
    keyspace: Option<&str>,
    version: u8,
) -> Result<PreparedStatement, ErrorBody> {
    let statement = sluice_cql::statement::parse(query).map_err(|e| {
        ErrorBody::new(
            sluice_cql::response::error_code::SYNTAX_ERROR,
            format!("line 1: {e}"),
        )
    })?;
    let mut binds: Vec<(usize, ColumnSpec)> = Vec::new();
    let mut pk_indexes = Vec::new();
    let mut result_columns: Vec<ColumnSpec> = Vec::new();
    if let Some(tref) = statement.table() {
        let (ks, name) = resolve(tref, keyspace)?;
        let columns: Vec<(String, ColumnType, Kind)> = if is_system_keyspace(&ks) {
            let set = system_table(shared, db, node, &ks, &name)
                .ok_or_else(|| invalid(format!("table {name} does not exist")))?;
            set.columns
                .iter()
                .map(|c| (c.name.clone(), c.typ.clone(), c.kind))
                .collect()
        } else {
            let t = table(db, &ks, &name)?;
            t.columns
                .iter()
                .map(|c| (c.name.clone(), c.typ.clone(), c.kind))
                .collect()
        };
        let mut c = Collector {
            ks: &ks,
            table: &name,
            columns: &columns,
            out: Vec::new(),
        };
        match &statement {
            Statement::Select(s) => {
                c.relations(&s.relations)?;
                if let Some(t) = &s.per_partition_limit {
                    c.add(t, "[per_partition_limit]", ColumnType::Int);
                }
                if let Some(t) = &s.limit {
                    c.add(t, "[limit]", ColumnType::Int);
                }
                if s.items.is_empty() {
                    for (n, t, _) in &columns {
                        result_columns.push(ColumnSpec::new(&ks, &name, n, t.clone()));
                    }
                }
                for item in &s.items {
                    let (n, t) = match &item.selector {
                        Selector::Column(col) => {
                            let t = columns.iter().find(|x| x.0 == *col).map(|x| x.1.clone());
                            (
                                col.clone(),
                                t.ok_or_else(|| invalid(format!("Undefined column name {col}")))?,
                            )
                        }
                        Selector::Token(cols) => {
                            (format!("system.token({})", cols.join(", ")), ColumnType::Bigint)
                        }
                        Selector::Count => ("count".to_string(), ColumnType::Bigint),
                        _ => return Err(invalid("this selector is not supported by the test cluster")),
                    };
                    result_columns.push(ColumnSpec::new(&ks, &name, &item.alias.clone().unwrap_or(n), t));
                }
            }
            Statement::Insert(i) => {
                for (col, term) in i.columns.iter().zip(&i.values) {
                    c.column(term, col)?;
                }
                c.using(&i.using);
            }
            Statement::Update(u) => {
                c.using(&u.using);
                for (col, term) in &u.assignments {
                    c.column(term, col)?;
                }
                c.relations(&u.relations)?;
                c.condition(&u.condition)?;
            }
            Statement::Delete(d) => {
                c.using(&d.using);
                c.relations(&d.relations)?;
                c.condition(&d.condition)?;
            }
            _ => {}
        }
        binds = c.out;
        // Partition key bind indexes, only when every component is a bind marker.
        let pk_names: Vec<&String> = columns
            .iter()
            .filter(|c| matches!(c.2, Kind::PartitionKey(_)))
            .map(|c| &c.0)
            .collect();
        let pk: Vec<String> = pk_names.iter().map(|s| s.to_string()).collect();
        if let Some(terms) = statement.partition_key_terms(&pk) {
            let idx: Option<Vec<u16>> = terms
                .iter()
                .map(|t| bind_index(t).map(|(i, _)| i as u16))
                .collect();
            pk_indexes = idx.unwrap_or_default();
        }
    }
    binds.sort_by_key(|(i, _)| *i);
    binds.dedup_by_key(|(i, _)| *i);
    let specs: Vec<ColumnSpec> = binds.into_iter().map(|(_, s)| s).collect();
    let global = specs.first().map(|f| (f.keyspace.clone(), f.table.clone()));
    let global = global.filter(|(k, t)| specs.iter().all(|s| s.keyspace == *k && s.table == *t));
    let lwt = statement.is_lwt();
    let result_metadata = if result_columns.is_empty() || lwt {
        RowsMetadata {
            flags: rows_flags::NO_METADATA,
            ..RowsMetadata::default()
        }
    } else {
        RowsMetadata::new(result_columns.clone())
    };
    let id = prepared_id(keyspace, query);
    let rm: Vec<(String, ColumnType)> = if lwt {
        Vec::new()
    } else {
        result_columns
            .iter()
            .map(|c| (c.name.clone(), c.typ.clone()))
            .collect()
    };
    let result = PreparedResult {
        id: id.clone(),
        result_metadata_id: (version >= 5).then(|| result_metadata_id(&rm)),
        metadata: PreparedMetadata {
            flags: 0,
            pk_indexes,
            global_spec: global,
            columns: specs,
        },
        result_metadata,
    };
    Ok(PreparedStatement {
        id,
        query: query.to_string(),
        keyspace: keyspace.map(str::to_string),
        statement,
        result,
    })
}
