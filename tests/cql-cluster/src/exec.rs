//! Statement execution over the in-memory store: SELECT (user and system tables, paging),
//! INSERT, UPDATE, DELETE, conditional (LWT) forms and batches.

use std::cmp::Ordering;

use bytes::Bytes;
use sluice_cql::murmur3::{composite_key, token};
use sluice_cql::response::{error_code as ec, ColumnSpec, ErrorBody, ResultBody, Rows, RowsMetadata};
use sluice_cql::result::rows_flags;
use sluice_cql::statement::{
    Bind, Condition, Delete, Insert, Op, Relation, Select, Selector, Statement, TableRef, Term, Update,
};
use sluice_cql::types::ColumnType;
use sluice_cql::value::{serialize, Literal};
use sluice_cql::wire::Value;

use crate::schema::{Column, Db, Kind, Partition, Row, Table};
use crate::systables::{is_system_keyspace, system_table, RowSet};
use crate::values::{bigint, boolean, compare, random_uuid, sort_key, timeuuid};
use crate::Shared;

pub fn invalid(msg: impl Into<String>) -> ErrorBody {
    ErrorBody::new(ec::INVALID, msg)
}

/// Bound values of one statement.
#[derive(Clone, Copy)]
pub struct Binder<'a> {
    pub values: &'a [Value],
    pub names: Option<&'a [String]>,
}

impl Binder<'_> {
    fn get(&self, b: &Bind) -> Result<Value, ErrorBody> {
        let at = match (b, self.names) {
            (Bind::Named(n, _), Some(names)) => names.iter().position(|x| x.eq_ignore_ascii_case(n)),
            (Bind::Named(_, i), None) | (Bind::Positional(i), _) => Some(*i),
        };
        at.and_then(|i| self.values.get(i).cloned()).ok_or_else(|| {
            invalid(format!(
                "There were {} markers(?) in CQL but fewer values bound",
                self.values.len()
            ))
        })
    }
}

/// Evaluates a term as a value of `typ`.
pub fn eval(term: &Term, typ: &ColumnType, b: Binder<'_>, column: &str) -> Result<Value, ErrorBody> {
    match term {
        Term::Literal(Literal::Null) => Ok(Value::Null),
        Term::Literal(l) => serialize(l, typ)
            .map(|v| Value::Set(Bytes::from(v)))
            .ok_or_else(|| {
                invalid(format!(
                    "Invalid constant ({l:?}) for \"{column}\" of type {}",
                    typ.cql_name()
                ))
            }),
        Term::Bind(m) => b.get(m),
        Term::Function(f, args) if args.is_empty() && f == "now" => {
            Ok(Value::Set(Bytes::copy_from_slice(&timeuuid())))
        }
        Term::Function(f, args) if args.is_empty() && f == "uuid" => {
            Ok(Value::Set(Bytes::copy_from_slice(&random_uuid())))
        }
        _ => Err(invalid(format!(
            "the test cluster cannot evaluate the value for \"{column}\""
        ))),
    }
}

/// Resolves the keyspace and table a statement names.
pub fn resolve(t: &TableRef, keyspace: Option<&str>) -> Result<(String, String), ErrorBody> {
    let ks = t.keyspace.as_deref().or(keyspace).ok_or_else(|| {
        invalid("No keyspace has been specified. USE a keyspace, or explicitly specify keyspace.tablename")
    })?;
    Ok((ks.to_string(), t.table.clone()))
}

/// Looks a user table up.
pub fn table<'a>(db: &'a Db, ks: &str, name: &str) -> Result<&'a Table, ErrorBody> {
    let k = db
        .keyspaces
        .get(ks)
        .ok_or_else(|| invalid(format!("Keyspace {ks} does not exist")))?;
    k.tables
        .get(name)
        .ok_or_else(|| invalid(format!("table {name} does not exist")))
}

fn column_index(t: &Table, name: &str) -> Result<usize, ErrorBody> {
    t.column(name)
        .ok_or_else(|| invalid(format!("Undefined column name {name}")))
}

/// A partition a statement addresses: its key components, routing key and token.
#[derive(Debug, Clone)]
pub struct PartitionKey {
    pub values: Vec<Bytes>,
    pub token: i64,
    pub key: Vec<u8>,
}

impl PartitionKey {
    pub fn new(values: Vec<Bytes>) -> PartitionKey {
        let key = composite_key(&values);
        PartitionKey {
            token: token(&key),
            key,
            values,
        }
    }
}

fn set_value(v: Value, col: &Column) -> Result<Bytes, ErrorBody> {
    match v {
        Value::Set(b) => Ok(b),
        _ => Err(invalid(format!(
            "Invalid null value for partition key part {}",
            col.name
        ))),
    }
}

/// The partitions addressed by equality (or IN) on every partition key column.
fn partitions(
    t: &Table,
    rels: &[Relation],
    b: Binder<'_>,
    many: bool,
) -> Result<Option<Vec<PartitionKey>>, ErrorBody> {
    let mut per_column: Vec<Vec<Bytes>> = Vec::new();
    for &i in &t.pk {
        let col = &t.columns[i];
        let Some(r) = rels
            .iter()
            .find(|r| r.column == col.name && matches!(r.op, Op::Eq | Op::In))
        else {
            return Ok(None);
        };
        if r.terms.len() > 1 && !many {
            return Err(invalid(
                "IN on the partition key is not supported for modifications here",
            ));
        }
        let mut vals = Vec::new();
        for term in &r.terms {
            let v = set_value(eval(term, &col.typ, b, &col.name)?, col)?;
            if v.is_empty() && t.pk.len() == 1 {
                return Err(invalid("Key may not be empty"));
            }
            vals.push(v);
        }
        per_column.push(vals);
    }
    // Cartesian product of the IN lists.
    let mut keys: Vec<Vec<Bytes>> = vec![Vec::new()];
    for vals in per_column {
        keys = keys
            .into_iter()
            .flat_map(|prefix| {
                vals.iter().map(move |v| {
                    let mut k = prefix.clone();
                    k.push(v.clone());
                    k
                })
            })
            .collect();
    }
    Ok(Some(keys.into_iter().map(PartitionKey::new).collect()))
}

/// The partition a modification addresses (every key column by equality).
pub fn write_partition(t: &Table, rels: &[Relation], b: Binder<'_>) -> Result<PartitionKey, ErrorBody> {
    match partitions(t, rels, b, false)? {
        Some(mut keys) if keys.len() == 1 => Ok(keys.remove(0)),
        _ => {
            let missing: Vec<&str> =
                t.pk.iter()
                    .map(|&i| t.columns[i].name.as_str())
                    .filter(|n| !rels.iter().any(|r| r.column == *n))
                    .collect();
            Err(invalid(format!(
                "Some partition key parts are missing: {}",
                missing.join(", ")
            )))
        }
    }
}

/// The token a statement routes to, when it addresses a single partition.
pub fn statement_partition(
    db: &Db,
    stmt: &Statement,
    keyspace: Option<&str>,
    b: Binder<'_>,
) -> Option<(String, PartitionKey)> {
    let tref = stmt.table()?;
    let (ks, name) = resolve(tref, keyspace).ok()?;
    if is_system_keyspace(&ks) {
        return None;
    }
    let t = table(db, &ks, &name).ok()?;
    let key = match stmt {
        Statement::Insert(i) => insert_key(t, i, b).ok()?,
        Statement::Select(s) => {
            let mut keys = partitions(t, &s.relations, b, true).ok()??;
            if keys.len() != 1 {
                return None;
            }
            keys.remove(0)
        }
        Statement::Update(u) => write_partition(t, &u.relations, b).ok()?,
        Statement::Delete(d) => write_partition(t, &d.relations, b).ok()?,
        _ => return None,
    };
    Some((ks, key))
}

fn insert_values(t: &Table, i: &Insert, b: Binder<'_>) -> Result<Vec<(usize, Value)>, ErrorBody> {
    if i.json {
        return Err(invalid("INSERT JSON is not supported by the test cluster"));
    }
    i.columns
        .iter()
        .zip(&i.values)
        .map(|(c, term)| {
            let idx = column_index(t, c)?;
            let col = &t.columns[idx];
            Ok((idx, eval(term, &col.typ, b, &col.name)?))
        })
        .collect()
}

fn insert_key(t: &Table, i: &Insert, b: Binder<'_>) -> Result<PartitionKey, ErrorBody> {
    let vals = insert_values(t, i, b)?;
    let mut key = Vec::new();
    for &p in &t.pk {
        let col = &t.columns[p];
        let v = vals
            .iter()
            .find(|(i, _)| *i == p)
            .ok_or_else(|| invalid(format!("Some partition key parts are missing: {}", col.name)))?;
        let v = set_value(v.1.clone(), col)?;
        if v.is_empty() && t.pk.len() == 1 {
            return Err(invalid("Key may not be empty"));
        }
        key.push(v);
    }
    Ok(PartitionKey::new(key))
}

fn clustering_of(t: &Table, vals: &[Bytes]) -> Vec<Vec<u8>> {
    t.ck.iter()
        .zip(vals)
        .map(|(&i, v)| sort_key(&t.columns[i].typ, v))
        .collect()
}

/// Clustering values fixed by equality, in order; stops at the first one that is not.
fn clustering_prefix(t: &Table, rels: &[Relation], b: Binder<'_>) -> Result<Vec<Bytes>, ErrorBody> {
    let mut out = Vec::new();
    for &i in &t.ck {
        let col = &t.columns[i];
        match rels.iter().find(|r| r.column == col.name && r.op == Op::Eq) {
            Some(r) => {
                let term = r.terms.first().ok_or_else(|| invalid("missing value"))?;
                out.push(set_value(eval(term, &col.typ, b, &col.name)?, col)?);
            }
            None => break,
        }
    }
    Ok(out)
}

fn full_clustering(t: &Table, rels: &[Relation], b: Binder<'_>) -> Result<Vec<Bytes>, ErrorBody> {
    let ck = clustering_prefix(t, rels, b)?;
    if ck.len() < t.ck.len() {
        let missing = &t.columns[t.ck[ck.len()]].name;
        return Err(invalid(format!("Some clustering keys are missing: {missing}")));
    }
    Ok(ck)
}

fn row_values(t: &Table, p: &Partition, r: &Row) -> Vec<Option<Bytes>> {
    let mut out: Vec<Option<Bytes>> = vec![None; t.columns.len()];
    for (k, &i) in t.pk.iter().enumerate() {
        out[i] = p.key.get(k).cloned();
    }
    for (k, &i) in t.ck.iter().enumerate() {
        out[i] = r.clustering.get(k).cloned();
    }
    for (&i, v) in &r.cells {
        out[i] = Some(v.clone());
    }
    out
}

/// Whether `value` satisfies `op` against the evaluated terms.
fn matches(typ: &ColumnType, value: Option<&Bytes>, op: Op, terms: &[Value]) -> Result<bool, ErrorBody> {
    let cmp = |t: &Value| -> Option<Ordering> {
        match (value, t) {
            (Some(v), Value::Set(x)) => Some(compare(typ, v, x)),
            (None, Value::Null) => Some(Ordering::Equal),
            _ => None,
        }
    };
    Ok(match op {
        Op::Eq => terms.first().and_then(cmp) == Some(Ordering::Equal),
        Op::Ne => terms.first().and_then(cmp) != Some(Ordering::Equal),
        Op::Lt => terms.first().and_then(cmp) == Some(Ordering::Less),
        Op::Le => matches!(
            terms.first().and_then(cmp),
            Some(Ordering::Less | Ordering::Equal)
        ),
        Op::Gt => terms.first().and_then(cmp) == Some(Ordering::Greater),
        Op::Ge => matches!(
            terms.first().and_then(cmp),
            Some(Ordering::Greater | Ordering::Equal)
        ),
        Op::In => terms.iter().any(|t| cmp(t) == Some(Ordering::Equal)),
        _ => return Err(invalid("this operator is not supported by the test cluster")),
    })
}

fn filter(columns: &[Column], rels: &[Relation], b: Binder<'_>) -> Result<Checks, ErrorBody> {
    rels.iter()
        .map(|r| {
            if r.column.is_empty() || r.op == Op::InValue {
                return Err(invalid("this restriction is not supported by the test cluster"));
            }
            let i = columns
                .iter()
                .position(|c| c.name == r.column)
                .ok_or_else(|| invalid(format!("Undefined column name {}", r.column)))?;
            let col = &columns[i];
            let vals = r
                .terms
                .iter()
                .map(|t| eval(t, &col.typ, b, &col.name))
                .collect::<Result<_, _>>()?;
            Ok((i, r.op, vals))
        })
        .collect()
}

/// Parameters of a read that come from the request rather than the statement.
#[derive(Debug, Clone, Default)]
pub struct ReadOptions {
    pub page_size: Option<i32>,
    pub paging_state: Option<Bytes>,
    pub skip_metadata: bool,
}

enum Out {
    Col(usize),
    Token,
    Count,
}

/// Runs a SELECT; returns the rows and whether the partition key was restricted.
pub fn select(
    shared: &Shared,
    db: &Db,
    node: usize,
    s: &Select,
    keyspace: Option<&str>,
    b: Binder<'_>,
    opts: &ReadOptions,
) -> Result<(ResultBody, bool), ErrorBody> {
    let (ks, name) = resolve(&s.table, keyspace)?;
    if s.json {
        return Err(invalid("SELECT JSON is not supported by the test cluster"));
    }
    let mut pk_restricted = false;
    let set: RowSet = if is_system_keyspace(&ks) {
        system_table(shared, db, node, &ks, &name)
            .ok_or_else(|| invalid(format!("table {name} does not exist")))?
    } else {
        let t = table(db, &ks, &name)?;
        let keys = partitions(t, &s.relations, b, true)?;
        pk_restricted = keys.is_some();
        let parts: Vec<&Partition> = match &keys {
            Some(keys) => keys
                .iter()
                .filter_map(|k| t.data.get(&(k.token, k.key.clone())))
                .collect(),
            None => t.data.values().collect(),
        };
        let mut rows = Vec::new();
        for p in parts {
            let tok = PartitionKey::new(p.key.clone()).token;
            for r in p.rows.values() {
                rows.push((Some(tok), row_values(t, p, r)));
            }
        }
        RowSet {
            keyspace: ks.clone(),
            table: name.clone(),
            columns: t.columns.clone(),
            rows,
        }
    };
    let conds = filter(&set.columns, &s.relations, b)?;
    let mut outs: Vec<(String, ColumnType, Out)> = Vec::new();
    if s.items.is_empty() {
        for (i, c) in set.columns.iter().enumerate() {
            outs.push((c.name.clone(), c.typ.clone(), Out::Col(i)));
        }
    }
    for item in &s.items {
        let (name, typ, out) = match &item.selector {
            Selector::Column(c) => {
                let i = set
                    .columns
                    .iter()
                    .position(|x| x.name == *c)
                    .ok_or_else(|| invalid(format!("Undefined column name {c}")))?;
                (c.clone(), set.columns[i].typ.clone(), Out::Col(i))
            }
            Selector::Token(cols) => (
                format!("system.token({})", cols.join(", ")),
                ColumnType::Bigint,
                Out::Token,
            ),
            Selector::Count => ("count".to_string(), ColumnType::Bigint, Out::Count),
            _ => return Err(invalid("this selector is not supported by the test cluster")),
        };
        outs.push((item.alias.clone().unwrap_or(name), typ, out));
    }
    let mut matched: Vec<&(Option<i64>, Vec<Option<Bytes>>)> = Vec::new();
    for r in &set.rows {
        let mut ok = true;
        for (i, op, vals) in &conds {
            if !matches(&set.columns[*i].typ, r.1[*i].as_ref(), *op, vals)? {
                ok = false;
                break;
            }
        }
        if ok {
            matched.push(r);
        }
    }
    let mut rows: Vec<Vec<Option<Bytes>>> = if outs.iter().any(|o| matches!(o.2, Out::Count)) {
        let n = matched.len() as i64;
        let first = matched.first();
        vec![outs
            .iter()
            .map(|o| match o.2 {
                Out::Count => bigint(n),
                Out::Col(i) => first.and_then(|r| r.1[i].clone()),
                Out::Token => first.and_then(|r| r.0.and_then(bigint)),
            })
            .collect()]
    } else {
        matched
            .iter()
            .map(|r| {
                outs.iter()
                    .map(|o| match o.2 {
                        Out::Col(i) => r.1[i].clone(),
                        Out::Token => r.0.and_then(bigint),
                        Out::Count => None,
                    })
                    .collect()
            })
            .collect()
    };
    if s.distinct {
        rows.dedup();
    }
    if let Some(limit) = &s.limit {
        let v = eval(limit, &ColumnType::Int, b, "[limit]")?;
        let n = v
            .as_bytes()
            .filter(|x| x.len() == 4)
            .map(|x| i32::from_be_bytes([x[0], x[1], x[2], x[3]]))
            .filter(|n| *n > 0)
            .ok_or_else(|| invalid("LIMIT must be strictly positive"))?;
        rows.truncate(n as usize);
    }
    let specs: Vec<ColumnSpec> = outs
        .iter()
        .map(|(n, t, _)| ColumnSpec::new(&set.keyspace, &set.table, n, t.clone()))
        .collect();
    let mut meta = RowsMetadata::new(specs);
    let start = match &opts.paging_state {
        None => 0,
        Some(p) if p.len() == 8 => u64::from_be_bytes(p[..8].try_into().unwrap_or([0; 8])) as usize,
        Some(_) => return Err(ErrorBody::protocol("Invalid value for the paging state")),
    };
    let mut page: Vec<Vec<Option<Bytes>>> = rows.iter().skip(start).cloned().collect();
    if let Some(size) = opts.page_size.filter(|n| *n > 0) {
        let size = size as usize;
        if page.len() > size {
            page.truncate(size);
            meta.paging_state = Some(Bytes::copy_from_slice(&((start + size) as u64).to_be_bytes()));
        }
    }
    if opts.skip_metadata {
        meta.flags |= rows_flags::NO_METADATA;
        meta.columns.clear();
        meta.global_spec = None;
    }
    Ok((ResultBody::Rows(Rows::from_values(meta, &page)), pk_restricted))
}

fn applied_rows(ks: &str, t: &str, applied: bool, extra: Vec<(ColumnSpec, Option<Bytes>)>) -> ResultBody {
    let mut specs = vec![ColumnSpec::new(ks, t, "[applied]", ColumnType::Boolean)];
    let mut row = vec![boolean(applied)];
    for (s, v) in extra {
        specs.push(s);
        row.push(v);
    }
    ResultBody::Rows(Rows::from_values(RowsMetadata::new(specs), &[row]))
}

/// Evaluated comparisons: column index, operator, values.
type Checks = Vec<(usize, Op, Vec<Value>)>;

/// A change to apply once every condition of a statement (or batch) holds.
pub struct Mutation {
    pub keyspace: String,
    pub table: String,
    pub partition: PartitionKey,
    kind: MutationKind,
}

enum MutationKind {
    Upsert {
        clustering: Vec<Bytes>,
        cells: Vec<(usize, Value)>,
    },
    DeleteCells {
        clustering: Vec<Bytes>,
        columns: Vec<usize>,
    },
    DeleteRows {
        prefix: Vec<Bytes>,
    },
}

/// A modification statement, checked and ready to apply.
pub struct Prepared {
    pub mutation: Mutation,
    condition: Option<(Condition, Checks)>,
}

/// Checks a modification and works out what it would change.
pub fn plan_write(
    db: &Db,
    stmt: &Statement,
    keyspace: Option<&str>,
    b: Binder<'_>,
) -> Result<Prepared, ErrorBody> {
    let tref = stmt.table().ok_or_else(|| invalid("not a modification"))?;
    let (ks, name) = resolve(tref, keyspace)?;
    if is_system_keyspace(&ks) {
        return Err(ErrorBody::new(
            ec::UNAUTHORIZED,
            format!("{ks} keyspace is not user-modifiable."),
        ));
    }
    let t = table(db, &ks, &name)?;
    let (partition, kind, condition) = match stmt {
        Statement::Insert(i) => insert_plan(t, i, b)?,
        Statement::Update(u) => update_plan(t, u, b)?,
        Statement::Delete(d) => delete_plan(t, d, b)?,
        _ => return Err(invalid("not a modification")),
    };
    Ok(Prepared {
        mutation: Mutation {
            keyspace: ks,
            table: name,
            partition,
            kind,
        },
        condition,
    })
}

type Plan = (PartitionKey, MutationKind, Option<(Condition, Checks)>);

fn insert_plan(t: &Table, i: &Insert, b: Binder<'_>) -> Result<Plan, ErrorBody> {
    let vals = insert_values(t, i, b)?;
    let partition = insert_key(t, i, b)?;
    let mut clustering = Vec::new();
    for &c in &t.ck {
        let col = &t.columns[c];
        let v = vals
            .iter()
            .find(|(i, _)| *i == c)
            .ok_or_else(|| invalid(format!("Some clustering keys are missing: {}", col.name)))?;
        clustering.push(set_value(v.1.clone(), col)?);
    }
    let cells = vals
        .into_iter()
        .filter(|(i, _)| matches!(t.columns[*i].kind, Kind::Regular | Kind::Static))
        .collect();
    let cond = i.if_not_exists.then(|| (Condition::IfNotExists, Vec::new()));
    Ok((partition, MutationKind::Upsert { clustering, cells }, cond))
}

fn condition_of(t: &Table, c: &Condition, b: Binder<'_>) -> Result<Option<(Condition, Checks)>, ErrorBody> {
    Ok(match c {
        Condition::None => None,
        Condition::Columns(rels) => Some((c.clone(), filter(&t.columns, rels, b)?)),
        other => Some((other.clone(), Vec::new())),
    })
}

fn update_plan(t: &Table, u: &Update, b: Binder<'_>) -> Result<Plan, ErrorBody> {
    let partition = write_partition(t, &u.relations, b)?;
    let clustering = full_clustering(t, &u.relations, b)?;
    let mut cells = Vec::new();
    for (c, term) in &u.assignments {
        let i = column_index(t, c)?;
        let col = &t.columns[i];
        if matches!(col.kind, Kind::PartitionKey(_) | Kind::Clustering(_)) {
            return Err(invalid(format!("PRIMARY KEY part {c} found in SET part")));
        }
        cells.push((i, eval(term, &col.typ, b, &col.name)?));
    }
    Ok((
        partition,
        MutationKind::Upsert { clustering, cells },
        condition_of(t, &u.condition, b)?,
    ))
}

fn delete_plan(t: &Table, d: &Delete, b: Binder<'_>) -> Result<Plan, ErrorBody> {
    let partition = write_partition(t, &d.relations, b)?;
    let prefix = clustering_prefix(t, &d.relations, b)?;
    let kind = if d.columns.is_empty() {
        MutationKind::DeleteRows { prefix }
    } else {
        if prefix.len() < t.ck.len() {
            return Err(invalid("Range deletions are not supported for specific columns"));
        }
        let columns = d
            .columns
            .iter()
            .map(|c| column_index(t, c))
            .collect::<Result<_, _>>()?;
        MutationKind::DeleteCells {
            clustering: prefix,
            columns,
        }
    };
    Ok((partition, kind, condition_of(t, &d.condition, b)?))
}

fn target_row<'a>(db: &'a Db, m: &Mutation) -> Option<(&'a Table, &'a Partition, Option<&'a Row>)> {
    let t = db.keyspaces.get(&m.keyspace)?.tables.get(&m.table)?;
    let p = t.data.get(&(m.partition.token, m.partition.key.clone()))?;
    let ck = match &m.kind {
        MutationKind::Upsert { clustering, .. } | MutationKind::DeleteCells { clustering, .. } => {
            clustering.clone()
        }
        MutationKind::DeleteRows { prefix } => prefix.clone(),
    };
    let row = if ck.len() == t.ck.len() {
        p.rows.get(&clustering_of(t, &ck))
    } else {
        p.rows.values().next()
    };
    Some((t, p, row))
}

/// Evaluates a statement's IF clause: whether it holds, and the `[applied]` result.
pub fn check_condition(db: &Db, p: &Prepared) -> Result<(bool, ResultBody), ErrorBody> {
    let m = &p.mutation;
    let Some((cond, checks)) = &p.condition else {
        return Ok((true, ResultBody::Void));
    };
    let found = target_row(db, m);
    let row = found.and_then(|(t, part, r)| r.map(|r| (t, row_values(t, part, r))));
    let (ok, extra) = match cond {
        Condition::IfNotExists => match &row {
            None => (true, Vec::new()),
            Some((t, vals)) => (
                false,
                t.columns
                    .iter()
                    .zip(vals)
                    .map(|(c, v)| {
                        (
                            ColumnSpec::new(&m.keyspace, &m.table, &c.name, c.typ.clone()),
                            v.clone(),
                        )
                    })
                    .collect(),
            ),
        },
        Condition::IfExists => (row.is_some(), Vec::new()),
        _ => {
            let t = table(db, &m.keyspace, &m.table)?;
            let mut ok = true;
            let mut extra = Vec::new();
            for (i, op, vals) in checks {
                let v = row.as_ref().and_then(|(_, r)| r[*i].clone());
                if !matches(&t.columns[*i].typ, v.as_ref(), *op, vals)? {
                    ok = false;
                }
                let c = &t.columns[*i];
                extra.push((ColumnSpec::new(&m.keyspace, &m.table, &c.name, c.typ.clone()), v));
            }
            (ok, if ok { Vec::new() } else { extra })
        }
    };
    Ok((ok, applied_rows(&m.keyspace, &m.table, ok, extra)))
}

/// Applies a checked mutation.
pub fn apply(db: &mut Db, m: &Mutation) {
    let Some(t) = db
        .keyspaces
        .get_mut(&m.keyspace)
        .and_then(|k| k.tables.get_mut(&m.table))
    else {
        return;
    };
    let pkey = (m.partition.token, m.partition.key.clone());
    match &m.kind {
        MutationKind::Upsert { clustering, cells } => {
            let ck = clustering_of(t, clustering);
            let part = t.data.entry(pkey).or_insert_with(|| Partition {
                key: m.partition.values.clone(),
                rows: Default::default(),
            });
            let row = part.rows.entry(ck).or_insert_with(|| Row {
                clustering: clustering.clone(),
                cells: Default::default(),
            });
            for (i, v) in cells {
                match v {
                    Value::Set(b) => {
                        row.cells.insert(*i, b.clone());
                    }
                    Value::Null => {
                        row.cells.remove(i);
                    }
                    Value::Unset => {}
                }
            }
        }
        MutationKind::DeleteCells { clustering, columns } => {
            let ck = clustering_of(t, clustering);
            if let Some(row) = t.data.get_mut(&pkey).and_then(|p| p.rows.get_mut(&ck)) {
                for c in columns {
                    row.cells.remove(c);
                }
            }
        }
        MutationKind::DeleteRows { prefix } => {
            let pre = clustering_of(t, prefix);
            if let Some(p) = t.data.get_mut(&pkey) {
                p.rows.retain(|k, _| !k.starts_with(&pre));
                if p.rows.is_empty() {
                    t.data.remove(&pkey);
                }
            }
        }
    }
}
