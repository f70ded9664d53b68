//! Read/write classification of SQL statements by a byte lexer (no SQL parser).
//!
//! A statement is a read only if it can run on a hot standby without changing anything;
//! anything the rules below cannot decide is a write. Runs in one linear pass over the bytes and
//! allocates nothing.

mod functions;
mod lexer;
#[cfg(test)]
mod tests;

pub use functions::{FunctionCatalog, READ_SAFE_VOLATILE};
use lexer::{Lexer, Tok};

/// Whether a statement may run on a hot standby.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Safe on a replica.
    Read,
    /// Must go to the primary (includes anything unknown).
    Write,
}

/// A routing hint given in a `sluice: primary|replica` comment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    /// Send to the primary.
    Primary,
    /// Send to a replica.
    Replica,
}

/// Why a statement ties a client to its server connection for the rest of its session: it
/// creates state that lives in that one connection and cannot be moved or replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinReason {
    /// LISTEN: notifications arrive on this connection.
    Listen,
    /// CREATE TEMP TABLE/VIEW/SEQUENCE.
    TempObject,
    /// pg_advisory_lock and friends at session level (the xact variants are fine).
    AdvisoryLock,
    /// DECLARE ... WITH HOLD: the cursor outlives the transaction.
    HoldCursor,
    /// SQL-level PREPARE.
    Prepare,
    /// SET ROLE / SET SESSION AUTHORIZATION.
    Role,
    /// LOAD of a shared library.
    Load,
    /// `set_config` with a setting name that is not a literal: sluice cannot know which custom
    /// setting to carry to the client's next connection.
    UntrackedSetting,
}

impl PinReason {
    /// A short label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            PinReason::Listen => "listen",
            PinReason::TempObject => "temp_object",
            PinReason::AdvisoryLock => "advisory_lock",
            PinReason::HoldCursor => "hold_cursor",
            PinReason::Prepare => "prepare",
            PinReason::Role => "role",
            PinReason::Load => "load",
            PinReason::UntrackedSetting => "untracked_setting",
        }
    }
}

/// What a query string does to the session beyond its own transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Effects {
    /// SET, RESET, DISCARD or a `set_config` call: session settings may have changed.
    pub settings: bool,
    /// Session state that pins the client to this server connection.
    pub pin: Option<PinReason>,
}

/// Result of classifying one query string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classification {
    /// Read or write.
    pub class: Class,
    /// Hint comment, if any (the first one); does not change `class`.
    pub hint: Option<Hint>,
    /// Session-level side effects.
    pub effects: Effects,
}

impl Classification {
    /// A write with no hint and no session effects: what anything undecidable is.
    pub const WRITE: Classification = Classification {
        class: Class::Write,
        hint: None,
        effects: Effects {
            settings: false,
            pin: None,
        },
    };
}

/// Session-level advisory lock functions (their `_xact_` variants end with the transaction).
const SESSION_LOCK_FUNCTIONS: &[&[u8]] = &[
    b"pg_advisory_lock",
    b"pg_advisory_lock_shared",
    b"pg_try_advisory_lock",
    b"pg_try_advisory_lock_shared",
];

/// Functions with side effects that make an otherwise read-only query a write.
/// `set_config` is deliberately absent: it works on standbys.
const DEFAULT_WRITE_FUNCTIONS: &[&[u8]] = &[
    b"nextval",
    b"setval",
    b"pg_advisory_lock",
    b"pg_advisory_lock_shared",
    b"pg_advisory_xact_lock",
    b"pg_advisory_xact_lock_shared",
    b"pg_try_advisory_lock",
    b"pg_try_advisory_lock_shared",
    b"pg_try_advisory_xact_lock",
    b"pg_try_advisory_xact_lock_shared",
    b"pg_advisory_unlock",
    b"pg_advisory_unlock_shared",
    b"pg_advisory_unlock_all",
    b"txid_current",
    b"pg_current_xact_id",
    b"pg_notify",
    b"lo_create",
    b"lo_creat",
    b"lo_import",
    b"lo_unlink",
    b"lo_open",
    b"pg_switch_wal",
    b"pg_create_restore_point",
];

/// Relations whose content exists only on the primary (a standby's copy is empty or
/// different): reading them is primary work.
const PRIMARY_ONLY_RELATIONS: &[&[u8]] = &[
    b"pg_prepared_xacts",
    b"pg_stat_replication",
    b"pg_stat_replication_slots",
];

/// Statement classifier; holds extra write-function names on top of the built-in list.
#[derive(Debug, Clone, Default)]
pub struct Classifier {
    /// Lowercase names.
    extra_write_functions: Vec<Box<[u8]>>,
}

/// Per-statement verdict before combining a multi-statement string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Empty or transaction control: does not decide.
    Neutral,
    Read,
    Write,
}

/// Whether `word` is `keyword`, ignoring ASCII case. Inlined, so that the length check, which
/// rejects most words, costs a comparison, and the keyword's bytes are folded at compile time
/// (`<[u8]>::eq_ignore_ascii_case` is an out-of-line call of ~100 instructions per match).
#[inline(always)]
fn kw(word: &[u8], keyword: &[u8]) -> bool {
    word.len() == keyword.len() && word.iter().zip(keyword).all(|(a, b)| a.eq_ignore_ascii_case(b))
}

fn is_word(t: Option<Tok<'_>>, keyword: &[u8]) -> bool {
    matches!(t, Some(Tok::Word(w)) if kw(w, keyword))
}

/// The tokens of one statement: stops at a top-level `;`, at end of input, or — inside a
/// parenthesised sub-statement (`base > 0`) — at the `)` that closes it.
struct Stmt<'a, 'l> {
    lx: &'l mut Lexer<'a>,
    depth: u32,
    base: u32,
    done: bool,
    eof: bool,
    nested_end: bool,
    /// The previous token, to spot calls of session-level advisory lock functions.
    prev: Option<Tok<'a>>,
    /// A session-level advisory lock function is called somewhere in the statement.
    session_lock: bool,
    /// `set_config` is called somewhere in the statement.
    set_config: bool,
}

impl<'a, 'l> Stmt<'a, 'l> {
    fn new(lx: &'l mut Lexer<'a>) -> Self {
        Stmt {
            lx,
            depth: 0,
            base: 0,
            done: false,
            eof: false,
            nested_end: false,
            prev: None,
            session_lock: false,
            set_config: false,
        }
    }

    #[inline(always)]
    fn next(&mut self) -> Option<Tok<'a>> {
        if self.done || self.nested_end {
            return None;
        }
        let Some(t) = self.lx.next_tok() else {
            self.done = true;
            self.eof = true;
            return None;
        };
        let prev = self.prev.replace(t);
        match t {
            Tok::Punct(b'(') => {
                self.depth = self.depth.saturating_add(1);
                if let Some(Tok::Word(w)) = prev {
                    self.session_lock |= SESSION_LOCK_FUNCTIONS.iter().any(|f| kw(w, f));
                    self.set_config |= kw(w, b"set_config");
                }
            }
            Tok::Punct(b')') if self.base > 0 && self.depth == self.base => {
                self.depth -= 1;
                self.nested_end = true;
                return None;
            }
            Tok::Punct(b')') => self.depth = self.depth.saturating_sub(1),
            Tok::Punct(b';') if self.depth == 0 => {
                self.done = true;
                return None;
            }
            _ => {}
        }
        Some(t)
    }

    fn drain(&mut self) {
        while self.next().is_some() {}
    }
}

impl Classifier {
    /// A classifier that also treats calls of `extra_write_functions` (case-insensitive) as
    /// writes.
    pub fn new<I, S>(extra_write_functions: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let extra_write_functions = extra_write_functions
            .into_iter()
            .map(|s| s.as_ref().to_ascii_lowercase().into_bytes().into_boxed_slice())
            .collect();
        Classifier {
            extra_write_functions,
        }
    }

    /// Classify a (possibly multi-statement) SQL string, assuming `standard_conforming_strings`
    /// is on (PostgreSQL's default since 9.1).
    pub fn classify(&self, sql: &[u8]) -> Classification {
        self.classify_with(sql, true)
    }

    /// Classify knowing the database's functions: a call of anything but a function the
    /// catalog knows to be safe is a write (see [`FunctionCatalog`]). Without a catalog, only
    /// the built-in write functions and `write_functions` make a read a write.
    pub fn classify_in(&self, sql: &[u8], catalog: Option<&FunctionCatalog>) -> Classification {
        self.run(sql, true, catalog)
    }

    /// A catalog of the database's functions from `(proname, any overload volatile)` rows,
    /// with this classifier's `write_functions` never safe.
    pub fn catalog<'a>(&self, rows: impl IntoIterator<Item = (&'a str, bool)>) -> FunctionCatalog {
        FunctionCatalog::new(rows, &self.extra_write_functions)
    }

    /// Classify with an explicit `standard_conforming_strings` setting (as reported by the
    /// backend's ParameterStatus): when off, backslash escapes quotes in plain '...' strings,
    /// which changes where statements start.
    pub fn classify_with(&self, sql: &[u8], standard_conforming_strings: bool) -> Classification {
        self.run(sql, standard_conforming_strings, None)
    }

    fn run(
        &self,
        sql: &[u8],
        standard_conforming_strings: bool,
        cat: Option<&FunctionCatalog>,
    ) -> Classification {
        let mut lx = Lexer::new(sql, !standard_conforming_strings);
        let mut write = false;
        let mut effects = Effects::default();
        let mut set_config = false;
        loop {
            let mut st = Stmt::new(&mut lx);
            let (verdict, e) = self.statement(&mut st, false, cat);
            if verdict == Verdict::Write {
                write = true;
            }
            st.drain();
            effects.settings |= e.settings;
            effects.pin = effects.pin.or(e.pin);
            if st.session_lock {
                effects.pin = effects.pin.or(Some(PinReason::AdvisoryLock));
            }
            effects.settings |= st.set_config;
            set_config |= st.set_config;
            if st.eof {
                break;
            }
        }
        // `set_config` of a setting whose name is not a literal: sluice cannot carry it to the
        // client's next connection, so the client stays on this one.
        if set_config && effects.pin.is_none() && custom_setting_names(sql).is_none() {
            effects.pin = Some(PinReason::UntrackedSetting);
        }
        // A quote or comment left open: PostgreSQL rejects the string, and it may have split it
        // differently from us, so do not trust a Read.
        let class = if write || lx.unterminated {
            Class::Write
        } else {
            Class::Read
        };
        Classification {
            class,
            hint: lx.hint,
            effects,
        }
    }

    fn is_write_function(&self, t: Tok<'_>) -> bool {
        match t {
            Tok::Word(w) => {
                DEFAULT_WRITE_FUNCTIONS.iter().any(|f| kw(w, f))
                    || self.extra_write_functions.iter().any(|f| kw(w, f))
            }
            // Quoted identifiers are case-sensitive: "NEXTVAL" is not nextval.
            Tok::QuotedIdent(q) => {
                DEFAULT_WRITE_FUNCTIONS.contains(&q) || self.extra_write_functions.iter().any(|f| **f == *q)
            }
            _ => false,
        }
    }

    /// Classifies one statement (read/write and session effects). `nested` is true inside
    /// `COPY (...)`.
    fn statement(
        &self,
        st: &mut Stmt<'_, '_>,
        nested: bool,
        cat: Option<&FunctionCatalog>,
    ) -> (Verdict, Effects) {
        let mut effects = Effects::default();
        let verdict = self.verdict(st, nested, &mut effects, cat);
        (verdict, effects)
    }

    fn verdict(
        &self,
        st: &mut Stmt<'_, '_>,
        nested: bool,
        effects: &mut Effects,
        cat: Option<&FunctionCatalog>,
    ) -> Verdict {
        let mut tok = st.next();
        while matches!(tok, Some(Tok::Punct(b'('))) {
            tok = st.next();
        }
        let mut word = match tok {
            None => return Verdict::Neutral,
            Some(Tok::Word(w)) => w,
            Some(_) => return Verdict::Write,
        };
        // EXPLAIN [ (options) | ANALYZE | VERBOSE ...] statement — iterative, never recursive.
        while kw(word, b"EXPLAIN") {
            tok = st.next();
            if tok == Some(Tok::Punct(b'(')) {
                let outer = st.depth - 1;
                loop {
                    match st.next() {
                        None => return Verdict::Write,
                        Some(Tok::Punct(b')')) if st.depth == outer => break,
                        Some(_) => {}
                    }
                }
                tok = st.next();
            }
            while is_word(tok, b"ANALYZE") || is_word(tok, b"ANALYSE") || is_word(tok, b"VERBOSE") {
                tok = st.next();
            }
            while tok == Some(Tok::Punct(b'(')) {
                tok = st.next();
            }
            word = match tok {
                Some(Tok::Word(w)) => w,
                _ => return Verdict::Write,
            };
        }

        if kw(word, b"SELECT") || kw(word, b"VALUES") || kw(word, b"TABLE") || kw(word, b"SHOW") {
            self.scan(st, Tok::Word(word), false, cat)
        } else if kw(word, b"WITH") {
            self.scan(st, Tok::Word(word), true, cat)
        } else if kw(word, b"BEGIN") {
            transaction_modes(st)
        } else if kw(word, b"START") {
            if is_word(st.next(), b"TRANSACTION") {
                transaction_modes(st)
            } else {
                Verdict::Write
            }
        } else if kw(word, b"COMMIT") || kw(word, b"ROLLBACK") {
            // COMMIT PREPARED / ROLLBACK PREPARED finish a two-phase transaction: primary only.
            let mut prepared = false;
            while let Some(t) = st.next() {
                prepared |= is_word(Some(t), b"PREPARED");
            }
            if prepared {
                Verdict::Write
            } else {
                Verdict::Neutral
            }
        } else if kw(word, b"END") || kw(word, b"ABORT") || kw(word, b"SAVEPOINT") || kw(word, b"RELEASE") {
            Verdict::Neutral
        } else if kw(word, b"COPY") && !nested {
            self.copy(st, cat)
        } else {
            session_effects(word, st, effects);
            Verdict::Write
        }
    }

    /// Read unless FOR UPDATE/SHARE, INTO, a write-function call, or (for WITH, `dml`) a
    /// data-modifying keyword appears.
    /// `first` is the statement's keyword, already consumed.
    fn scan<'a>(
        &self,
        st: &mut Stmt<'a, '_>,
        first: Tok<'a>,
        dml: bool,
        cat: Option<&FunctionCatalog>,
    ) -> Verdict {
        let mut prev: Option<Tok<'_>> = Some(first);
        let mut before_prev: Option<Tok<'_>> = None;
        while let Some(t) = st.next() {
            let write = match t {
                Tok::Punct(b'(') => {
                    prev.is_some_and(|p| self.is_write_function(p))
                        || match (cat, prev) {
                            (Some(c), Some(Tok::Word(w))) => {
                                !functions::not_a_call(w, before_prev) && !c.is_safe(w, false)
                            }
                            (Some(c), Some(Tok::QuotedIdent(q))) => {
                                !matches!(before_prev, Some(Tok::Punct(b')' | b':')))
                                    && !is_word(before_prev, b"AS")
                                    && !c.is_safe(q, true)
                            }
                            _ => false,
                        }
                }
                Tok::Word(w) => {
                    kw(w, b"INTO")
                        || PRIMARY_ONLY_RELATIONS.iter().any(|r| kw(w, r))
                        || (is_word(prev, b"FOR")
                            && (kw(w, b"UPDATE") || kw(w, b"SHARE") || kw(w, b"NO") || kw(w, b"KEY")))
                        || (dml
                            && (kw(w, b"INSERT") || kw(w, b"UPDATE") || kw(w, b"DELETE") || kw(w, b"MERGE")))
                }
                _ => false,
            };
            if write {
                return Verdict::Write;
            }
            before_prev = prev;
            prev = Some(t);
        }
        Verdict::Read
    }

    /// `COPY (query) TO ...` / `COPY table TO ...` read; `COPY ... FROM` writes.
    fn copy(&self, st: &mut Stmt<'_, '_>, cat: Option<&FunctionCatalog>) -> Verdict {
        let mut inner = Verdict::Read;
        let mut first = true;
        loop {
            let Some(t) = st.next() else {
                return Verdict::Write;
            };
            if first && t == Tok::Punct(b'(') {
                st.base = st.depth;
                inner = self.statement(st, true, cat).0;
                st.drain();
                if !st.nested_end {
                    return Verdict::Write;
                }
                st.nested_end = false;
                st.base = 0;
            } else if st.depth == 0 && is_word(Some(t), b"TO") {
                return if inner == Verdict::Write {
                    Verdict::Write
                } else {
                    Verdict::Read
                };
            } else if st.depth == 0 && is_word(Some(t), b"FROM") {
                return Verdict::Write;
            }
            first = false;
        }
    }
}

/// What SET, RESET, DISCARD, LISTEN, CREATE TEMP, DECLARE ... WITH HOLD, PREPARE and LOAD do
/// to the session. Consumes tokens only where it must look further.
fn session_effects(word: &[u8], st: &mut Stmt<'_, '_>, effects: &mut Effects) {
    if kw(word, b"SET") {
        let next = st.next();
        if is_word(next, b"LOCAL") || is_word(next, b"TRANSACTION") || is_word(next, b"CONSTRAINTS") {
            return; // ends with the transaction
        }
        let next = if is_word(next, b"SESSION") {
            st.next()
        } else {
            next
        };
        if is_word(next, b"ROLE") || is_word(next, b"AUTHORIZATION") {
            effects.pin = Some(PinReason::Role);
        } else {
            effects.settings = true;
        }
    } else if kw(word, b"RESET") || kw(word, b"DISCARD") {
        effects.settings = true;
    } else if kw(word, b"LISTEN") {
        effects.pin = Some(PinReason::Listen);
    } else if kw(word, b"CREATE") {
        let mut next = st.next();
        if is_word(next, b"OR") {
            st.next(); // REPLACE
            next = st.next();
        }
        if is_word(next, b"GLOBAL") || is_word(next, b"LOCAL") {
            next = st.next();
        }
        if is_word(next, b"TEMP") || is_word(next, b"TEMPORARY") {
            effects.pin = Some(PinReason::TempObject);
        }
    } else if kw(word, b"DECLARE") {
        let mut prev = None;
        while let Some(t) = st.next() {
            if is_word(prev, b"WITH") && is_word(Some(t), b"HOLD") {
                effects.pin = Some(PinReason::HoldCursor);
                return;
            }
            if is_word(Some(t), b"FOR") {
                return; // the query starts; WITH HOLD comes before it
            }
            prev = Some(t);
        }
    } else if kw(word, b"PREPARE") {
        if !is_word(st.next(), b"TRANSACTION") {
            effects.pin = Some(PinReason::Prepare);
        }
    } else if kw(word, b"LOAD") {
        effects.pin = Some(PinReason::Load);
    }
}

/// The custom (dotted, `app.tenant_id`-style) setting names a query string may set: after
/// `SET [SESSION]` and as the first argument of `set_config`. PostgreSQL lists such settings
/// nowhere (`pg_settings` hides placeholders), so sluice must know their names to carry them
/// to a client's next connection. `None` when `set_config` is called with a name that is not a
/// string literal. Names are lower-cased, as PostgreSQL compares them. Allocates: call it only
/// for statements whose [`Effects::settings`] is set.
pub fn custom_setting_names(sql: &[u8]) -> Option<Vec<String>> {
    let mut lx = Lexer::new(sql, false);
    let mut names: Vec<String> = Vec::new();
    let mut add = |name: String| {
        if name.contains('.') && !names.contains(&name) {
            names.push(name);
        }
    };
    let mut prev: Option<Tok<'_>> = None;
    while let Some(t) = lx.next_tok() {
        match (prev, t) {
            // A statement starts: SET [SESSION] name[.name...]
            (None | Some(Tok::Punct(b';')), Tok::Word(w)) if kw(w, b"SET") => {
                let mut next = lx.next_tok();
                if is_word(next, b"SESSION") {
                    next = lx.next_tok();
                }
                let mut name = String::new();
                while let Some(Tok::Word(part) | Tok::QuotedIdent(part)) = next {
                    name.push_str(&String::from_utf8_lossy(part).to_ascii_lowercase());
                    next = lx.next_tok();
                    if next != Some(Tok::Punct(b'.')) {
                        break;
                    }
                    name.push('.');
                    next = lx.next_tok();
                }
                add(name);
                prev = next;
                continue;
            }
            (Some(Tok::Word(w)), Tok::Punct(b'(')) if kw(w, b"set_config") => match lx.next_tok() {
                Some(Tok::Str) => add(String::from_utf8_lossy(lx.last_str()).to_ascii_lowercase()),
                _ => return None,
            },
            _ => {}
        }
        prev = Some(t);
    }
    Some(names)
}

/// BEGIN / START TRANSACTION modes: Read iff READ ONLY is given and READ WRITE is not, and the
/// isolation level is not SERIALIZABLE (a hot standby refuses serializable transactions).
fn transaction_modes(st: &mut Stmt<'_, '_>) -> Verdict {
    let (mut read_only, mut read_write, mut serializable) = (false, false, false);
    let mut prev = None;
    while let Some(t) = st.next() {
        if is_word(prev, b"READ") {
            read_only |= is_word(Some(t), b"ONLY");
            read_write |= is_word(Some(t), b"WRITE");
        }
        serializable |= is_word(Some(t), b"SERIALIZABLE");
        prev = Some(t);
    }
    if read_only && !read_write && !serializable {
        Verdict::Read
    } else {
        Verdict::Write
    }
}
