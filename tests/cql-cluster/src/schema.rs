//! Keyspaces, tables and their rows (one shared copy: every write reaches every replica at
//! once), and the DDL statements that change them.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use sluice_cql::response::{ErrorBody, SchemaChange};
use sluice_cql::ring::Strategy;
use sluice_cql::statement::{tokenize, Tok};
use sluice_cql::types::ColumnType;
use sluice_cql::value::Literal;

use crate::values::{name_uuid, random_uuid};

/// What a column is in its table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    PartitionKey(usize),
    Clustering(usize),
    Regular,
    Static,
}

impl Kind {
    /// `system_schema.columns.kind`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::PartitionKey(_) => "partition_key",
            Kind::Clustering(_) => "clustering",
            Kind::Regular => "regular",
            Kind::Static => "static",
        }
    }
}

/// A column definition.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub typ: ColumnType,
    pub kind: Kind,
}

/// One row: clustering values and the cells that are set.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub clustering: Vec<Bytes>,
    pub cells: HashMap<usize, Bytes>,
}

/// The rows of one partition, ordered by clustering key.
#[derive(Debug, Clone, Default)]
pub struct Partition {
    pub key: Vec<Bytes>,
    pub rows: BTreeMap<Vec<Vec<u8>>, Row>,
}

/// A table with its data, partitions ordered by token.
#[derive(Debug, Clone)]
pub struct Table {
    pub name: String,
    /// In `SELECT *` order: partition key, clustering, then the rest alphabetically.
    pub columns: Vec<Column>,
    pub pk: Vec<usize>,
    pub ck: Vec<usize>,
    pub id: [u8; 16],
    pub data: BTreeMap<(i64, Vec<u8>), Partition>,
}

impl Table {
    /// The index of a column.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

/// A keyspace.
#[derive(Debug, Clone)]
pub struct Keyspace {
    pub name: String,
    pub replication: Vec<(String, String)>,
    pub strategy: Strategy,
    pub durable_writes: bool,
    pub tables: BTreeMap<String, Table>,
}

/// Everything the cluster stores.
#[derive(Debug, Clone)]
pub struct Db {
    pub keyspaces: BTreeMap<String, Keyspace>,
    pub schema_version: [u8; 16],
}

impl Default for Db {
    fn default() -> Self {
        Db {
            keyspaces: BTreeMap::new(),
            schema_version: name_uuid("empty schema"),
        }
    }
}

fn invalid(msg: impl Into<String>) -> ErrorBody {
    ErrorBody::new(sluice_cql::response::error_code::INVALID, msg)
}

fn syntax(msg: impl Into<String>) -> ErrorBody {
    ErrorBody::new(sluice_cql::response::error_code::SYNTAX_ERROR, msg)
}

fn change(change: &str, target: &str, keyspace: &str, name: Option<&str>) -> SchemaChange {
    SchemaChange {
        change: change.into(),
        target: target.into(),
        keyspace: keyspace.into(),
        name: name.map(str::to_string),
        arguments: None,
    }
}

/// The result of a DDL statement: the change to report (none for a no-op `IF [NOT] EXISTS`),
/// followed by every change to announce as events.
pub struct DdlOutcome {
    pub result: Option<SchemaChange>,
    pub events: Vec<SchemaChange>,
}

struct Cursor {
    toks: Vec<Tok>,
    pos: usize,
}

impl Cursor {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn kw(&mut self, k: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Ident(s)) if s == k) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn expect_kw(&mut self, k: &str) -> Result<(), ErrorBody> {
        if self.kw(k) {
            Ok(())
        } else {
            Err(syntax(format!(
                "line 1: expected {} near {:?}",
                k.to_uppercase(),
                self.peek()
            )))
        }
    }
    fn sym(&mut self, s: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Sym(x)) if *x == s) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn expect_sym(&mut self, s: &str) -> Result<(), ErrorBody> {
        if self.sym(s) {
            Ok(())
        } else {
            Err(syntax(format!("line 1: expected '{s}' near {:?}", self.peek())))
        }
    }
    fn name(&mut self) -> Result<String, ErrorBody> {
        match self.toks.get(self.pos).cloned() {
            Some(Tok::Ident(s)) | Some(Tok::Quoted(s)) => {
                self.pos += 1;
                Ok(s)
            }
            other => Err(syntax(format!("line 1: expected a name near {other:?}"))),
        }
    }
    fn if_exists(&mut self) -> bool {
        if matches!(self.peek(), Some(Tok::Ident(s)) if s == "if") {
            self.pos += 1;
            let _ = self.kw("exists");
            true
        } else {
            false
        }
    }
    fn if_not_exists(&mut self) -> bool {
        if matches!(self.peek(), Some(Tok::Ident(s)) if s == "if") {
            self.pos += 1;
            let _ = self.kw("not");
            let _ = self.kw("exists");
            true
        } else {
            false
        }
    }
    fn qualified(&mut self, session: Option<&str>) -> Result<(String, String), ErrorBody> {
        let first = self.name()?;
        if self.sym(".") {
            Ok((first, self.name()?))
        } else {
            let ks = session.ok_or_else(|| invalid("No keyspace has been specified. USE a keyspace, or explicitly specify keyspace.tablename"))?;
            Ok((ks.to_string(), first))
        }
    }
    /// A type name such as `frozen<map<text, int>>`, rebuilt from tokens.
    fn type_name(&mut self) -> Result<ColumnType, ErrorBody> {
        let mut text = self.name()?;
        let mut depth = 0;
        while depth > 0 || matches!(self.peek(), Some(Tok::Sym("<"))) {
            match self.toks.get(self.pos).cloned() {
                Some(Tok::Sym("<")) => {
                    depth += 1;
                    text.push('<');
                }
                Some(Tok::Sym(">")) => {
                    depth -= 1;
                    text.push('>');
                }
                Some(Tok::Sym(",")) => text.push(','),
                Some(Tok::Ident(s)) => text.push_str(&s),
                other => return Err(syntax(format!("bad type near {other:?}"))),
            }
            self.pos += 1;
        }
        ColumnType::parse(&text).ok_or_else(|| invalid(format!("Unknown type {text}")))
    }
    /// A `{'k': 'v', ...}` map literal, values as text.
    fn map_literal(&mut self) -> Result<Vec<(String, String)>, ErrorBody> {
        self.expect_sym("{")?;
        let mut out = Vec::new();
        if self.sym("}") {
            return Ok(out);
        }
        loop {
            let k = match self.toks.get(self.pos).cloned() {
                Some(Tok::Lit(Literal::Str(s))) => s,
                other => return Err(syntax(format!("expected a string key near {other:?}"))),
            };
            self.pos += 1;
            self.expect_sym(":")?;
            let v = match self.toks.get(self.pos).cloned() {
                Some(Tok::Lit(Literal::Str(s)))
                | Some(Tok::Lit(Literal::Int(s)))
                | Some(Tok::Lit(Literal::Float(s))) => s,
                Some(Tok::Lit(Literal::Bool(b))) => b.to_string(),
                other => return Err(syntax(format!("expected a value near {other:?}"))),
            };
            self.pos += 1;
            out.push((k, v));
            if !self.sym(",") {
                break;
            }
        }
        self.expect_sym("}")?;
        Ok(out)
    }
}

/// Runs a DDL statement (`CREATE/DROP KEYSPACE|TABLE`, `TRUNCATE`).
pub fn execute_ddl(db: &mut Db, session: Option<&str>, query: &str) -> Result<DdlOutcome, ErrorBody> {
    let toks = tokenize(query).map_err(|e| syntax(e.0))?;
    let mut c = Cursor { toks, pos: 0 };
    let out = if c.kw("create") {
        if c.kw("keyspace") {
            create_keyspace(db, &mut c)
        } else if c.kw("table") || c.kw("columnfamily") {
            create_table(db, &mut c, session)
        } else {
            Err(invalid(
                "only CREATE KEYSPACE and CREATE TABLE are supported by the test cluster",
            ))
        }
    } else if c.kw("drop") {
        if c.kw("keyspace") {
            let if_exists = c.if_exists();
            let name = c.name()?;
            match db.keyspaces.remove(&name) {
                None if if_exists => Ok(DdlOutcome {
                    result: None,
                    events: vec![],
                }),
                None => Err(ErrorBody::new(
                    sluice_cql::response::error_code::CONFIG_ERROR,
                    format!("Cannot drop non existing keyspace '{name}'."),
                )),
                Some(ks) => {
                    let mut events: Vec<SchemaChange> = ks
                        .tables
                        .keys()
                        .map(|t| change("DROPPED", "TABLE", &name, Some(t)))
                        .collect();
                    let result = change("DROPPED", "KEYSPACE", &name, None);
                    events.push(result.clone());
                    Ok(DdlOutcome {
                        result: Some(result),
                        events,
                    })
                }
            }
        } else if c.kw("table") || c.kw("columnfamily") {
            let if_exists = c.if_exists();
            let (ks, table) = c.qualified(session)?;
            let removed = db.keyspaces.get_mut(&ks).and_then(|k| k.tables.remove(&table));
            match removed {
                None if if_exists => Ok(DdlOutcome {
                    result: None,
                    events: vec![],
                }),
                None => Err(invalid(format!("Table '{ks}.{table}' doesn't exist"))),
                Some(_) => {
                    let ch = change("DROPPED", "TABLE", &ks, Some(&table));
                    Ok(DdlOutcome {
                        result: Some(ch.clone()),
                        events: vec![ch],
                    })
                }
            }
        } else {
            Err(invalid(
                "only DROP KEYSPACE and DROP TABLE are supported by the test cluster",
            ))
        }
    } else if c.kw("truncate") {
        let _ = c.kw("table");
        let (ks, table) = c.qualified(session)?;
        let t = db
            .keyspaces
            .get_mut(&ks)
            .and_then(|k| k.tables.get_mut(&table))
            .ok_or_else(|| invalid(format!("unconfigured table {table}")))?;
        t.data.clear();
        return Ok(DdlOutcome {
            result: None,
            events: vec![],
        });
    } else if ["alter", "grant", "revoke", "list"].iter().any(|k| c.kw(k)) {
        Err(invalid(format!(
            "statement not supported by the test cluster: {query}"
        )))
    } else {
        let word = match c.peek() {
            Some(Tok::Ident(w)) => w.to_uppercase(),
            other => format!("{other:?}"),
        };
        Err(syntax(format!(
            "line 1:0 no viable alternative at input '{word}'"
        )))
    }?;
    if out.result.is_some() {
        db.schema_version = random_uuid();
    }
    Ok(out)
}

fn create_keyspace(db: &mut Db, c: &mut Cursor) -> Result<DdlOutcome, ErrorBody> {
    let if_not_exists = c.if_not_exists();
    let name = c.name()?;
    c.expect_kw("with")?;
    let mut replication = None;
    let mut durable_writes = true;
    loop {
        let opt = c.name()?;
        c.expect_sym("=")?;
        match opt.as_str() {
            "replication" => replication = Some(c.map_literal()?),
            "durable_writes" => {
                durable_writes = !matches!(c.peek(), Some(Tok::Lit(Literal::Bool(false))));
                c.pos += 1;
            }
            other => return Err(syntax(format!("Unknown property '{other}'"))),
        }
        if !c.kw("and") {
            break;
        }
    }
    let replication =
        replication.ok_or_else(|| ErrorBody::new(0x2300, "Missing mandatory option 'replication'"))?;
    let class = replication
        .iter()
        .find(|(k, _)| k == "class")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let short = class.rsplit('.').next().unwrap_or("").to_string();
    if short != "SimpleStrategy" && short != "NetworkTopologyStrategy" {
        return Err(ErrorBody::new(
            0x2300,
            format!("Unable to find replication strategy class '{class}'"),
        ));
    }
    // Stored the way Cassandra shows it: the full class name, numbers as text.
    let replication: Vec<(String, String)> = replication
        .into_iter()
        .map(|(k, v)| {
            if k == "class" {
                (k, format!("org.apache.cassandra.locator.{short}"))
            } else {
                (k, v)
            }
        })
        .collect();
    if db.keyspaces.contains_key(&name) {
        if if_not_exists {
            return Ok(DdlOutcome {
                result: None,
                events: vec![],
            });
        }
        return Err(ErrorBody::already_exists(&name, ""));
    }
    let strategy = Strategy::from_replication(replication.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    db.keyspaces.insert(
        name.clone(),
        Keyspace {
            name: name.clone(),
            replication,
            strategy,
            durable_writes,
            tables: BTreeMap::new(),
        },
    );
    let ch = change("CREATED", "KEYSPACE", &name, None);
    Ok(DdlOutcome {
        result: Some(ch.clone()),
        events: vec![ch],
    })
}

fn create_table(db: &mut Db, c: &mut Cursor, session: Option<&str>) -> Result<DdlOutcome, ErrorBody> {
    let if_not_exists = c.if_not_exists();
    let (ks, name) = c.qualified(session)?;
    c.expect_sym("(")?;
    let mut defs: Vec<(String, ColumnType, bool)> = Vec::new();
    let mut pk: Vec<String> = Vec::new();
    let mut ck: Vec<String> = Vec::new();
    let mut single_pk = None;
    loop {
        if c.kw("primary") {
            c.expect_kw("key")?;
            c.expect_sym("(")?;
            if c.sym("(") {
                loop {
                    pk.push(c.name()?);
                    if !c.sym(",") {
                        break;
                    }
                }
                c.expect_sym(")")?;
            } else {
                pk.push(c.name()?);
            }
            while c.sym(",") {
                ck.push(c.name()?);
            }
            c.expect_sym(")")?;
        } else {
            let col = c.name()?;
            let typ = c.type_name()?;
            let is_static = c.kw("static");
            if c.kw("primary") {
                c.expect_kw("key")?;
                single_pk = Some(col.clone());
            }
            defs.push((col, typ, is_static));
        }
        if !c.sym(",") {
            break;
        }
        if matches!(c.peek(), Some(Tok::Sym(")"))) {
            break;
        }
    }
    c.expect_sym(")")?;
    // Table options (WITH ...) are accepted and ignored.
    if let Some(p) = single_pk {
        if !pk.is_empty() {
            return Err(invalid("Multiple PRIMARY KEYs specified (exactly one required)"));
        }
        pk.push(p);
    }
    if pk.is_empty() {
        return Err(invalid(
            "No PRIMARY KEY specifed for table (exactly one required)",
        ));
    }
    let find = |n: &str| defs.iter().find(|d| d.0 == n).cloned();
    let mut columns = Vec::new();
    for (i, n) in pk.iter().enumerate() {
        let d =
            find(n).ok_or_else(|| invalid(format!("Unknown definition {n} referenced in PRIMARY KEY")))?;
        columns.push(Column {
            name: d.0,
            typ: d.1,
            kind: Kind::PartitionKey(i),
        });
    }
    for (i, n) in ck.iter().enumerate() {
        let d =
            find(n).ok_or_else(|| invalid(format!("Unknown definition {n} referenced in PRIMARY KEY")))?;
        columns.push(Column {
            name: d.0,
            typ: d.1,
            kind: Kind::Clustering(i),
        });
    }
    let mut rest: Vec<_> = defs
        .iter()
        .filter(|d| !pk.contains(&d.0) && !ck.contains(&d.0))
        .cloned()
        .collect();
    rest.sort_by(|a, b| a.0.cmp(&b.0));
    for d in rest {
        columns.push(Column {
            name: d.0,
            typ: d.1,
            kind: if d.2 { Kind::Static } else { Kind::Regular },
        });
    }
    let keyspace = db
        .keyspaces
        .get_mut(&ks)
        .ok_or_else(|| invalid(format!("Keyspace '{ks}' does not exist")))?;
    if keyspace.tables.contains_key(&name) {
        if if_not_exists {
            return Ok(DdlOutcome {
                result: None,
                events: vec![],
            });
        }
        return Err(ErrorBody::already_exists(&ks, &name));
    }
    let table = Table {
        name: name.clone(),
        pk: (0..pk.len()).collect(),
        ck: (pk.len()..pk.len() + ck.len()).collect(),
        columns,
        id: random_uuid(),
        data: BTreeMap::new(),
    };
    keyspace.tables.insert(name.clone(), table);
    let ch = change("CREATED", "TABLE", &ks, Some(&name));
    Ok(DdlOutcome {
        result: Some(ch.clone()),
        events: vec![ch],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyspaces_and_tables() {
        let mut db = Db::default();
        execute_ddl(
            &mut db,
            None,
            "CREATE KEYSPACE ks WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 2}",
        )
        .unwrap();
        assert_eq!(db.keyspaces["ks"].strategy, Strategy::Simple { rf: 2 });
        let e = execute_ddl(
            &mut db,
            None,
            "CREATE KEYSPACE ks WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 2}",
        )
        .err()
        .unwrap();
        assert_eq!(e.code, 0x2400);
        execute_ddl(
            &mut db,
            Some("ks"),
            "CREATE TABLE events (tenant text, bucket int, ts timeuuid, payload blob, note text, PRIMARY KEY ((tenant, bucket), ts))",
        )
        .unwrap();
        let t = &db.keyspaces["ks"].tables["events"];
        let names: Vec<_> = t.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["tenant", "bucket", "ts", "note", "payload"]);
        assert_eq!((t.pk.clone(), t.ck.clone()), (vec![0, 1], vec![2]));
        execute_ddl(&mut db, Some("ks"), "CREATE TABLE kv (k text PRIMARY KEY, v int)").unwrap();
        let out = execute_ddl(&mut db, None, "DROP KEYSPACE ks").unwrap();
        assert_eq!(out.events.len(), 3);
    }
}
