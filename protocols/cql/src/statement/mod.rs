//! Just enough CQL to route: the table a statement touches, the terms its partition key is
//! bound to, whether it is a lightweight transaction, and `USE`. DML is parsed into a small
//! syntax tree (SELECT, INSERT, UPDATE, DELETE, BATCH); anything else is [`Statement::Other`].

pub mod lexer;
mod parse;

pub use lexer::{tokenize, LexError, Tok};
pub use parse::parse;

use crate::value::Literal;

/// `[keyspace.]table`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRef {
    pub keyspace: Option<String>,
    pub table: String,
}

/// A bind marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bind {
    /// `?`, numbered from 0 in text order.
    Positional(usize),
    /// `:name` (lowercased), with its position.
    Named(String, usize),
}

/// A value expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Term {
    Literal(Literal),
    Bind(Bind),
    /// A function call such as `now()`.
    Function(String, Vec<Term>),
    /// Collections, tuples, casts, arithmetic: not evaluated here.
    Other,
}

/// A comparison operator in WHERE or IF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    In,
    /// `IN ?` / `IN :name`: the whole list is one bound value.
    InValue,
    Contains,
    ContainsKey,
    Like,
}

/// `column op term(s)`; `IN` has several terms. `token(...)` and multi-column relations have
/// an empty column name.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub column: String,
    pub op: Op,
    pub terms: Vec<Term>,
}

/// An expression in a SELECT clause.
#[derive(Debug, Clone, PartialEq)]
pub enum Selector {
    Column(String),
    /// `count(*)` or `count(1)`.
    Count,
    /// `token(a, b)`.
    Token(Vec<String>),
    /// `writetime(c)`, `ttl(c)` and other calls.
    Function(String, Vec<Selector>),
    Other,
}

/// A selector and its `AS` alias.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectItem {
    pub selector: Selector,
    pub alias: Option<String>,
}

/// `USING TTL ... AND TIMESTAMP ...`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Using {
    pub ttl: Option<Term>,
    pub timestamp: Option<Term>,
}

/// The IF clause of a conditional (lightweight transaction) statement.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    None,
    IfExists,
    IfNotExists,
    Columns(Vec<Relation>),
}

/// SELECT.
#[derive(Debug, Clone, PartialEq)]
pub struct Select {
    pub table: TableRef,
    pub json: bool,
    pub distinct: bool,
    /// Empty means `*`.
    pub items: Vec<SelectItem>,
    pub relations: Vec<Relation>,
    pub limit: Option<Term>,
    pub per_partition_limit: Option<Term>,
    pub allow_filtering: bool,
}

/// INSERT.
#[derive(Debug, Clone, PartialEq)]
pub struct Insert {
    pub table: TableRef,
    /// Empty for `INSERT ... JSON`.
    pub columns: Vec<String>,
    pub values: Vec<Term>,
    pub json: bool,
    pub if_not_exists: bool,
    pub using: Using,
}

/// UPDATE. Assignments other than `column = term` have [`Term::Other`] values.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub table: TableRef,
    pub using: Using,
    pub assignments: Vec<(String, Term)>,
    pub relations: Vec<Relation>,
    pub condition: Condition,
}

/// DELETE.
#[derive(Debug, Clone, PartialEq)]
pub struct Delete {
    pub table: TableRef,
    /// Deleted columns; empty deletes rows.
    pub columns: Vec<String>,
    pub using: Using,
    pub relations: Vec<Relation>,
    pub condition: Condition,
}

/// `BEGIN [UNLOGGED | COUNTER] BATCH ... APPLY BATCH`.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchBlock {
    /// 0 logged, 1 unlogged, 2 counter (as in the BATCH message).
    pub kind: u8,
    pub using: Using,
    pub statements: Vec<Statement>,
}

/// A parsed statement.
#[derive(Debug, Clone, PartialEq)]
pub enum Statement {
    Select(Select),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Batch(BatchBlock),
    Use(String),
    /// Anything else, by its leading keywords (e.g. `"create table"`, `"drop keyspace"`).
    Other(String),
}

impl Statement {
    /// The table of a single-table statement.
    pub fn table(&self) -> Option<&TableRef> {
        match self {
            Statement::Select(s) => Some(&s.table),
            Statement::Insert(s) => Some(&s.table),
            Statement::Update(s) => Some(&s.table),
            Statement::Delete(s) => Some(&s.table),
            _ => None,
        }
    }

    /// Whether this is a lightweight transaction (has an IF clause).
    pub fn is_lwt(&self) -> bool {
        match self {
            Statement::Insert(s) => s.if_not_exists,
            Statement::Update(s) => s.condition != Condition::None,
            Statement::Delete(s) => s.condition != Condition::None,
            Statement::Batch(b) => b.statements.iter().any(Statement::is_lwt),
            _ => false,
        }
    }

    /// Whether the statement only reads.
    pub fn is_read(&self) -> bool {
        matches!(self, Statement::Select(_))
    }

    /// The terms the partition key columns (`pk`, in partition-key order, lowercase unless
    /// case-sensitive) are bound to by equality, if every one of them is.
    pub fn partition_key_terms(&self, pk: &[String]) -> Option<Vec<&Term>> {
        if pk.is_empty() {
            return None;
        }
        match self {
            Statement::Insert(i) => {
                if i.json {
                    return None;
                }
                pk.iter()
                    .map(|c| {
                        let at = i.columns.iter().position(|x| x == c)?;
                        i.values.get(at)
                    })
                    .collect()
            }
            Statement::Select(s) => eq_terms(&s.relations, pk),
            Statement::Update(u) => eq_terms(&u.relations, pk),
            Statement::Delete(d) => eq_terms(&d.relations, pk),
            _ => None,
        }
    }
}

fn eq_terms<'a>(relations: &'a [Relation], pk: &[String]) -> Option<Vec<&'a Term>> {
    pk.iter()
        .map(|c| {
            relations
                .iter()
                .find_map(|r| match (r.column == *c, r.op, r.terms.as_slice()) {
                    (true, Op::Eq, [t]) | (true, Op::In, [t]) => Some(t),
                    _ => None,
                })
        })
        .collect()
}

#[cfg(test)]
mod tests;
