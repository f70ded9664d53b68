//! A recursive-descent parser for the DML subset of CQL, over [`Tok`]s.

use super::lexer::{tokenize, Tok};
use super::{
    BatchBlock, Bind, Condition, Delete, Insert, Op, Relation, Select, SelectItem, Selector, Statement,
    TableRef, Term, Update, Using,
};

const MAX_DEPTH: usize = 64;

/// Parses one statement (a trailing `;` is allowed).
pub fn parse(text: &str) -> Result<Statement, String> {
    let toks = tokenize(text).map_err(|e| e.0)?;
    let mut p = Parser {
        toks,
        pos: 0,
        depth: 0,
    };
    let stmt = p.statement()?;
    while p.eat_sym(";") {}
    if p.pos < p.toks.len() {
        return Err(format!("unexpected {} after the statement", p.describe()));
    }
    Ok(stmt)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn peek_at(&self, k: usize) -> Option<&Tok> {
        self.toks.get(self.pos + k)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        if t.is_some() {
            self.pos += 1;
        }
        t
    }

    fn describe(&self) -> String {
        match self.peek() {
            None => "end of input".into(),
            Some(Tok::Ident(s)) | Some(Tok::Quoted(s)) => format!("'{s}'"),
            Some(Tok::Sym(s)) => format!("'{s}'"),
            Some(t) => format!("{t:?}"),
        }
    }

    fn is_kw(&self, kw: &str) -> bool {
        matches!(self.peek(), Some(Tok::Ident(s)) if s == kw)
    }

    fn is_kw_at(&self, k: usize, kw: &str) -> bool {
        matches!(self.peek_at(k), Some(Tok::Ident(s)) if s == kw)
    }

    fn eat_kw(&mut self, kw: &str) -> bool {
        if self.is_kw(kw) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_kw(&mut self, kw: &str) -> Result<(), String> {
        if self.eat_kw(kw) {
            Ok(())
        } else {
            Err(format!(
                "expected {} but found {}",
                kw.to_uppercase(),
                self.describe()
            ))
        }
    }

    fn is_sym(&self, s: &str) -> bool {
        matches!(self.peek(), Some(Tok::Sym(x)) if *x == s)
    }

    fn eat_sym(&mut self, s: &str) -> bool {
        if self.is_sym(s) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_sym(&mut self, s: &str) -> Result<(), String> {
        if self.eat_sym(s) {
            Ok(())
        } else {
            Err(format!("expected '{s}' but found {}", self.describe()))
        }
    }

    fn name(&mut self) -> Result<String, String> {
        match self.peek() {
            Some(Tok::Ident(s)) | Some(Tok::Quoted(s)) => {
                let s = s.clone();
                self.pos += 1;
                Ok(s)
            }
            _ => Err(format!("expected a name but found {}", self.describe())),
        }
    }

    fn table(&mut self) -> Result<TableRef, String> {
        let first = self.name()?;
        if self.eat_sym(".") {
            Ok(TableRef {
                keyspace: Some(first),
                table: self.name()?,
            })
        } else {
            Ok(TableRef {
                keyspace: None,
                table: first,
            })
        }
    }

    fn statement(&mut self) -> Result<Statement, String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err("statement nested too deeply".into());
        }
        let out = match self.peek() {
            Some(Tok::Ident(k)) => match k.as_str() {
                "select" => self.select().map(Statement::Select),
                "insert" => self.insert().map(Statement::Insert),
                "update" => self.update().map(Statement::Update),
                "delete" => self.delete().map(Statement::Delete),
                "begin" => self.batch().map(Statement::Batch),
                "use" => {
                    self.pos += 1;
                    self.name().map(Statement::Use)
                }
                _ => {
                    let mut words = vec![k.clone()];
                    if let Some(Tok::Ident(w)) = self.peek_at(1) {
                        words.push(w.clone());
                    }
                    self.pos = self.toks.len();
                    Ok(Statement::Other(words.join(" ")))
                }
            },
            _ => Err(format!("expected a statement but found {}", self.describe())),
        };
        self.depth -= 1;
        out
    }

    fn select(&mut self) -> Result<Select, String> {
        self.expect_kw("select")?;
        let json = self.eat_kw("json");
        let distinct = self.eat_kw("distinct");
        let mut items = Vec::new();
        if !self.eat_sym("*") {
            loop {
                let selector = self.selector()?;
                let alias = if self.eat_kw("as") {
                    Some(self.name()?)
                } else {
                    None
                };
                items.push(SelectItem { selector, alias });
                if !self.eat_sym(",") {
                    break;
                }
            }
        }
        self.expect_kw("from")?;
        let table = self.table()?;
        let relations = if self.eat_kw("where") {
            self.relations()?
        } else {
            Vec::new()
        };
        if self.is_kw("group") {
            self.pos += 1;
            self.expect_kw("by")?;
            self.name_list_loose()?;
        }
        if self.is_kw("order") {
            self.pos += 1;
            self.expect_kw("by")?;
            loop {
                self.name()?;
                let _ = self.eat_kw("asc") || self.eat_kw("desc");
                if !self.eat_sym(",") {
                    break;
                }
            }
        }
        let mut per_partition_limit = None;
        if self.is_kw("per") {
            self.pos += 1;
            self.expect_kw("partition")?;
            self.expect_kw("limit")?;
            per_partition_limit = Some(self.term()?);
        }
        let limit = if self.eat_kw("limit") {
            Some(self.term()?)
        } else {
            None
        };
        let allow_filtering = if self.eat_kw("allow") {
            self.expect_kw("filtering")?;
            true
        } else {
            false
        };
        Ok(Select {
            table,
            json,
            distinct,
            items,
            relations,
            limit,
            per_partition_limit,
            allow_filtering,
        })
    }

    fn name_list_loose(&mut self) -> Result<(), String> {
        loop {
            self.selector()?;
            if !self.eat_sym(",") {
                return Ok(());
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err("selector nested too deeply".into());
        }
        let out = self.selector_inner();
        self.depth -= 1;
        out
    }

    fn selector_inner(&mut self) -> Result<Selector, String> {
        match self.peek() {
            Some(Tok::Ident(_)) | Some(Tok::Quoted(_)) if matches!(self.peek_at(1), Some(Tok::Sym("("))) => {
                let f = self.name()?;
                self.expect_sym("(")?;
                if f == "count" && (self.eat_sym("*") || matches!(self.peek(), Some(Tok::Lit(_)))) {
                    if !self.is_sym(")") {
                        self.next();
                    }
                    self.expect_sym(")")?;
                    return Ok(Selector::Count);
                }
                if f == "cast" {
                    self.skip_balanced_until(")")?;
                    return Ok(Selector::Other);
                }
                let mut args = Vec::new();
                if !self.eat_sym(")") {
                    loop {
                        args.push(self.selector()?);
                        if !self.eat_sym(",") {
                            break;
                        }
                    }
                    self.expect_sym(")")?;
                }
                if f == "token" {
                    let cols: Option<Vec<String>> = args
                        .iter()
                        .map(|a| match a {
                            Selector::Column(c) => Some(c.clone()),
                            _ => None,
                        })
                        .collect();
                    return Ok(cols.map(Selector::Token).unwrap_or(Selector::Other));
                }
                Ok(Selector::Function(f, args))
            }
            Some(Tok::Ident(_)) | Some(Tok::Quoted(_)) => {
                let n = self.name()?;
                if self.eat_sym(".") || self.is_sym("[") {
                    // Field or element selection.
                    if self.is_sym("[") {
                        self.pos += 1;
                        self.skip_balanced_until("]")?;
                    } else {
                        self.name()?;
                    }
                    return Ok(Selector::Other);
                }
                Ok(Selector::Column(n))
            }
            Some(_) => {
                self.term()?;
                Ok(Selector::Other)
            }
            None => Err("expected a selector but found end of input".into()),
        }
    }

    /// Skips tokens up to and including the `close` that balances an already consumed opener.
    fn skip_balanced_until(&mut self, close: &str) -> Result<(), String> {
        let mut depth = 0usize;
        while let Some(t) = self.next() {
            match t {
                Tok::Sym("(") | Tok::Sym("[") | Tok::Sym("{") => depth += 1,
                Tok::Sym(s) if depth == 0 && s == close => return Ok(()),
                Tok::Sym(")") | Tok::Sym("]") | Tok::Sym("}") => {
                    depth = depth.checked_sub(1).ok_or("unbalanced brackets")?;
                }
                _ => {}
            }
        }
        Err(format!("expected '{close}' but found end of input"))
    }

    fn term(&mut self) -> Result<Term, String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err("term nested too deeply".into());
        }
        let out = self.term_inner();
        self.depth -= 1;
        let mut t = out?;
        while self.is_sym("+") || (self.is_sym("-") && !matches!(self.peek_at(1), Some(Tok::Sym("=")))) {
            self.pos += 1;
            self.term()?;
            t = Term::Other;
        }
        Ok(t)
    }

    fn term_inner(&mut self) -> Result<Term, String> {
        match self.next() {
            Some(Tok::Lit(l)) => Ok(Term::Literal(l)),
            Some(Tok::Bind(None, i)) => Ok(Term::Bind(Bind::Positional(i))),
            Some(Tok::Bind(Some(n), i)) => Ok(Term::Bind(Bind::Named(n, i))),
            Some(Tok::Ident(f)) | Some(Tok::Quoted(f)) => {
                if !self.eat_sym("(") {
                    // A column reference (e.g. `c = c + 1`).
                    return Ok(Term::Other);
                }
                let mut args = Vec::new();
                if !self.eat_sym(")") {
                    loop {
                        args.push(self.term()?);
                        if !self.eat_sym(",") {
                            break;
                        }
                    }
                    self.expect_sym(")")?;
                }
                Ok(Term::Function(f, args))
            }
            Some(Tok::Sym("[")) => {
                self.skip_balanced_until("]")?;
                Ok(Term::Other)
            }
            Some(Tok::Sym("{")) => {
                self.skip_balanced_until("}")?;
                Ok(Term::Other)
            }
            Some(Tok::Sym("(")) => {
                // A tuple, or a type cast followed by its term.
                let cast = matches!(self.peek(), Some(Tok::Ident(_)))
                    && matches!(self.peek_at(1), Some(Tok::Sym(")")) | Some(Tok::Sym("<")));
                self.skip_balanced_until(")")?;
                if cast {
                    self.term()?;
                }
                Ok(Term::Other)
            }
            Some(Tok::Sym("-")) => {
                self.term()?;
                Ok(Term::Other)
            }
            Some(t) => Err(format!("expected a value but found {t:?}")),
            None => Err("expected a value but found end of input".into()),
        }
    }

    fn terms_in_parens(&mut self) -> Result<Vec<Term>, String> {
        self.expect_sym("(")?;
        let mut out = Vec::new();
        if self.eat_sym(")") {
            return Ok(out);
        }
        loop {
            out.push(self.term()?);
            if !self.eat_sym(",") {
                break;
            }
        }
        self.expect_sym(")")?;
        Ok(out)
    }

    fn op(&mut self) -> Result<Op, String> {
        let op = match self.next() {
            Some(Tok::Sym("=")) => Op::Eq,
            Some(Tok::Sym("!=")) => Op::Ne,
            Some(Tok::Sym("<")) => Op::Lt,
            Some(Tok::Sym("<=")) => Op::Le,
            Some(Tok::Sym(">")) => Op::Gt,
            Some(Tok::Sym(">=")) => Op::Ge,
            Some(Tok::Ident(k)) if k == "in" => Op::In,
            Some(Tok::Ident(k)) if k == "like" => Op::Like,
            Some(Tok::Ident(k)) if k == "contains" => {
                if self.eat_kw("key") {
                    Op::ContainsKey
                } else {
                    Op::Contains
                }
            }
            other => return Err(format!("expected an operator but found {other:?}")),
        };
        Ok(op)
    }

    fn relation_rhs(&mut self, column: String) -> Result<Relation, String> {
        let mut op = self.op()?;
        let terms = if op == Op::In && self.is_sym("(") {
            self.terms_in_parens()?
        } else {
            if op == Op::In {
                op = Op::InValue;
            }
            vec![self.term()?]
        };
        Ok(Relation { column, op, terms })
    }

    fn relation(&mut self) -> Result<Relation, String> {
        if self.is_kw("token") && matches!(self.peek_at(1), Some(Tok::Sym("("))) {
            self.pos += 2;
            self.skip_balanced_until(")")?;
            let mut r = self.relation_rhs(String::new())?;
            r.terms = vec![Term::Other];
            return Ok(r);
        }
        if self.eat_sym("(") {
            self.skip_balanced_until(")")?;
            let mut r = self.relation_rhs(String::new())?;
            r.terms = vec![Term::Other];
            return Ok(r);
        }
        let column = self.name()?;
        if self.eat_sym("[") {
            self.skip_balanced_until("]")?;
            let mut r = self.relation_rhs(String::new())?;
            r.terms = vec![Term::Other];
            return Ok(r);
        }
        if self.is_kw("is") {
            self.pos += 1;
            self.expect_kw("not")?;
            self.expect_kw("null")?;
            return Ok(Relation {
                column: String::new(),
                op: Op::Ne,
                terms: vec![Term::Other],
            });
        }
        self.relation_rhs(column)
    }

    fn relations(&mut self) -> Result<Vec<Relation>, String> {
        let mut out = vec![self.relation()?];
        while self.eat_kw("and") {
            out.push(self.relation()?);
        }
        Ok(out)
    }

    fn using(&mut self) -> Result<Using, String> {
        let mut u = Using::default();
        if !self.eat_kw("using") {
            return Ok(u);
        }
        loop {
            if self.eat_kw("ttl") {
                u.ttl = Some(self.term()?);
            } else if self.eat_kw("timestamp") {
                u.timestamp = Some(self.term()?);
            } else {
                return Err(format!("expected TTL or TIMESTAMP but found {}", self.describe()));
            }
            if !self.eat_kw("and") {
                return Ok(u);
            }
        }
    }

    fn condition(&mut self) -> Result<Condition, String> {
        if !self.eat_kw("if") {
            return Ok(Condition::None);
        }
        if self.eat_kw("exists") {
            return Ok(Condition::IfExists);
        }
        if self.is_kw("not") && self.is_kw_at(1, "exists") {
            self.pos += 2;
            return Ok(Condition::IfNotExists);
        }
        Ok(Condition::Columns(self.relations()?))
    }

    fn insert(&mut self) -> Result<Insert, String> {
        self.expect_kw("insert")?;
        self.expect_kw("into")?;
        let table = self.table()?;
        let (columns, values, json) = if self.eat_kw("json") {
            let v = self.term()?;
            if self.eat_kw("default") {
                let _ = self.eat_kw("null") || self.eat_kw("unset");
            }
            (Vec::new(), vec![v], true)
        } else {
            self.expect_sym("(")?;
            let mut cols = vec![self.name()?];
            while self.eat_sym(",") {
                cols.push(self.name()?);
            }
            self.expect_sym(")")?;
            self.expect_kw("values")?;
            let values = self.terms_in_parens()?;
            if values.len() != cols.len() {
                return Err(format!("{} columns but {} values", cols.len(), values.len()));
            }
            (cols, values, false)
        };
        let if_not_exists = if self.is_kw("if") {
            self.pos += 1;
            self.expect_kw("not")?;
            self.expect_kw("exists")?;
            true
        } else {
            false
        };
        let using = self.using()?;
        Ok(Insert {
            table,
            columns,
            values,
            json,
            if_not_exists,
            using,
        })
    }

    fn assignment(&mut self) -> Result<(String, Term), String> {
        let column = self.name()?;
        if self.eat_sym("[") {
            self.skip_balanced_until("]")?;
            self.expect_sym("=")?;
            self.term()?;
            return Ok((column, Term::Other));
        }
        if self.eat_sym(".") {
            self.name()?;
            self.expect_sym("=")?;
            self.term()?;
            return Ok((column, Term::Other));
        }
        if self.is_sym("+") || self.is_sym("-") {
            self.pos += 1;
            self.expect_sym("=")?;
            self.term()?;
            return Ok((column, Term::Other));
        }
        self.expect_sym("=")?;
        Ok((column, self.term()?))
    }

    fn update(&mut self) -> Result<Update, String> {
        self.expect_kw("update")?;
        let table = self.table()?;
        let using = self.using()?;
        self.expect_kw("set")?;
        let mut assignments = vec![self.assignment()?];
        while self.eat_sym(",") {
            assignments.push(self.assignment()?);
        }
        self.expect_kw("where")?;
        let relations = self.relations()?;
        let condition = self.condition()?;
        Ok(Update {
            table,
            using,
            assignments,
            relations,
            condition,
        })
    }

    fn delete(&mut self) -> Result<Delete, String> {
        self.expect_kw("delete")?;
        let mut columns = Vec::new();
        if !self.is_kw("from") {
            loop {
                columns.push(self.name()?);
                if self.eat_sym("[") {
                    self.skip_balanced_until("]")?;
                } else if self.eat_sym(".") {
                    self.name()?;
                }
                if !self.eat_sym(",") {
                    break;
                }
            }
        }
        self.expect_kw("from")?;
        let table = self.table()?;
        let using = self.using()?;
        self.expect_kw("where")?;
        let relations = self.relations()?;
        let condition = self.condition()?;
        Ok(Delete {
            table,
            columns,
            using,
            relations,
            condition,
        })
    }

    fn batch(&mut self) -> Result<BatchBlock, String> {
        self.expect_kw("begin")?;
        let kind = if self.eat_kw("unlogged") {
            1
        } else if self.eat_kw("counter") {
            2
        } else {
            let _ = self.eat_kw("logged");
            0
        };
        self.expect_kw("batch")?;
        let using = self.using()?;
        let mut statements = Vec::new();
        loop {
            while self.eat_sym(";") {}
            if self.is_kw("apply") {
                self.pos += 1;
                self.expect_kw("batch")?;
                break;
            }
            let s = match self.peek() {
                Some(Tok::Ident(k)) if matches!(k.as_str(), "insert" | "update" | "delete") => {
                    self.statement()?
                }
                _ => {
                    return Err(format!(
                        "expected INSERT, UPDATE, DELETE or APPLY BATCH but found {}",
                        self.describe()
                    ))
                }
            };
            statements.push(s);
        }
        Ok(BatchBlock {
            kind,
            using,
            statements,
        })
    }
}
