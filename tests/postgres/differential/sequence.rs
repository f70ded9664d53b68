//! Legal sequences of extended-protocol frontend messages: the model, the seeded generator and
//! the wire encoding.

use std::collections::HashMap;
use std::fmt;

use bytes::{BufMut, BytesMut};
use postgres_protocol::message::frontend;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The table `INSERT` texts write to; created before any sequence runs.
pub const TABLE_SQL: &str = "CREATE TABLE diff_t (x int)";

/// A statement text with its Parse parameter types and the number of parameters it takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Text {
    pub sql: &'static str,
    pub types: &'static [u32],
    pub params: usize,
}

const fn text(sql: &'static str, types: &'static [u32], params: usize) -> Text {
    Text { sql, types, params }
}

pub const SELECT_1: Text = text("SELECT 1", &[], 0);
pub const SELECT_PARAM: Text = text("SELECT $1::int", &[], 1);
/// The same text as [`SELECT_PARAM`], with its parameter type given in the Parse.
pub const SELECT_PARAM_TYPED: Text = text("SELECT $1::int", &[23], 1);
/// Prepares fine, fails at Execute.
pub const DIVIDE_BY_ZERO: Text = text("SELECT 1/0", &[], 0);
/// Fails at Parse.
pub const SYNTAX_ERROR: Text = text("SELEC 1", &[], 0);
/// Five rows: an Execute with a row limit of 2 is suspended.
pub const SERIES: Text = text("SELECT * FROM generate_series(1,5)", &[], 0);
pub const INSERT: Text = text("INSERT INTO diff_t VALUES ($1)", &[], 1);
/// Execute answers EmptyQueryResponse.
pub const EMPTY: Text = text("", &[], 0);
pub const BEGIN: Text = text("BEGIN", &[], 0);
pub const COMMIT: Text = text("COMMIT", &[], 0);

/// Texts the generator picks from, with weights.
const TEXTS: &[(Text, u32)] = &[
    (SELECT_1, 6),
    (SELECT_PARAM, 5),
    (SELECT_PARAM_TYPED, 2),
    (DIVIDE_BY_ZERO, 2),
    (SYNTAX_ERROR, 2),
    (SERIES, 4),
    (INSERT, 2),
    (EMPTY, 1),
    (BEGIN, 1),
    (COMMIT, 1),
];

/// Simple queries the generator sends inside or between batches (a driver's `execute` of SQL
/// text between prepared statements, and the SQL that names the same statements or drops
/// them). None reads what other sequences write. (Not `DISCARD ALL`: inside an open batch it
/// fails, "cannot be executed within a pipeline", and with read routing a batch that began
/// with reads on a replica moves to the primary when the Query comes, out of the pipeline: a
/// documented difference, README "Known differences".)
const QUERIES: &[&str] = &[
    "SELECT 1",
    "SELECT 1/0",
    "SELEC 1",
    "INSERT INTO diff_t VALUES (8)",
    "EXECUTE s1",
    "/* tag */ EXECUTE s2 (7)",
    "DEALLOCATE s1",
    "DEALLOCATE ALL",
    "PREPARE s2 AS SELECT 2",
    "BEGIN",
    "COMMIT",
];

/// Statement names: the unnamed one, two named ones and one that differs only in case.
const NAMES: &[&str] = &["", "s1", "s2", "S1"];

/// Whether a batch of `msgs` binds a portal before a Flush and names it again after that Flush
/// (no Sync between). A batch that began with reads on a replica moves to the primary at a
/// later write, and such a portal stays behind: a documented difference (README, "Known
/// differences"), not counted when it is the difference a sequence shows (42P03, 34000).
pub fn portal_used_across_flush(msgs: &[Msg]) -> bool {
    let mut bound: Vec<&str> = Vec::new();
    let mut before_flush: Vec<&str> = Vec::new();
    for m in msgs {
        let used = match m {
            Msg::Bind { portal, .. } => {
                bound.push(portal);
                Some(*portal)
            }
            Msg::Execute { portal, .. } => Some(*portal),
            Msg::Describe { kind: b'P', name } | Msg::Close { kind: b'P', name } => Some(*name),
            Msg::Flush => {
                before_flush.append(&mut bound);
                None
            }
            Msg::Sync => {
                bound.clear();
                before_flush.clear();
                None
            }
            _ => None,
        };
        if used.is_some_and(|p| before_flush.contains(&p)) {
            return true;
        }
    }
    false
}

/// Whether every Query comes first or right after a Flush or Sync, as the generator places
/// them (the driver reads nothing before a Query).
pub fn queries_follow_a_read(msgs: &[Msg]) -> bool {
    msgs.iter().enumerate().all(|(i, m)| {
        !matches!(m, Msg::Query { .. }) || i == 0 || matches!(msgs[i - 1], Msg::Flush | Msg::Sync)
    })
}

/// One frontend message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    Parse {
        name: &'static str,
        text: Text,
    },
    /// Binds `params` text parameters (all "7") and asks for text results.
    Bind {
        portal: &'static str,
        statement: &'static str,
        params: usize,
    },
    /// `kind` is b'S' (statement) or b'P' (portal).
    Describe {
        kind: u8,
        name: &'static str,
    },
    Execute {
        portal: &'static str,
        max_rows: i32,
    },
    Close {
        kind: u8,
        name: &'static str,
    },
    Flush,
    Sync,
    /// A simple Query. Inside a batch it commits the batch with its own work; in a batch that
    /// failed the server skips it (no answer) up to the Sync.
    Query {
        sql: &'static str,
    },
}

impl Msg {
    /// Appends the message to `buf` as it goes on the wire.
    pub fn encode(&self, buf: &mut BytesMut) {
        match *self {
            Msg::Parse { name, text } => {
                frontend::parse(name, text.sql, text.types.iter().copied(), buf).unwrap()
            }
            Msg::Bind {
                portal,
                statement,
                params,
            } => {
                let mut body = BytesMut::new();
                put_cstr(&mut body, portal);
                put_cstr(&mut body, statement);
                body.put_i16(0); // every parameter in text format
                body.put_i16(params as i16);
                for _ in 0..params {
                    body.put_i32(1);
                    body.put_u8(b'7');
                }
                body.put_i16(0); // every result column in text format
                buf.put_u8(b'B');
                buf.put_i32(body.len() as i32 + 4);
                buf.extend_from_slice(&body);
            }
            Msg::Describe { kind, name } => frontend::describe(kind, name, buf).unwrap(),
            Msg::Execute { portal, max_rows } => frontend::execute(portal, max_rows, buf).unwrap(),
            Msg::Close { kind, name } => frontend::close(kind, name, buf).unwrap(),
            Msg::Flush => frontend::flush(buf),
            Msg::Sync => frontend::sync(buf),
            Msg::Query { sql } => frontend::query(sql, buf).unwrap(),
        }
    }
}

fn put_cstr(buf: &mut BytesMut, s: &str) {
    buf.extend_from_slice(s.as_bytes());
    buf.put_u8(0);
}

impl fmt::Display for Msg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Msg::Parse { name, text } if text.types.is_empty() => {
                write!(f, "Parse {name:?} {:?}", text.sql)
            }
            Msg::Parse { name, text } => {
                write!(f, "Parse {name:?} {:?} types {:?}", text.sql, text.types)
            }
            Msg::Bind {
                portal,
                statement,
                params,
            } => write!(
                f,
                "Bind portal {portal:?} statement {statement:?} ({params} params)"
            ),
            Msg::Describe { kind, name } => write!(f, "Describe {} {name:?}", char::from(*kind)),
            Msg::Execute { portal, max_rows } => write!(f, "Execute {portal:?} max_rows {max_rows}"),
            Msg::Close { kind, name } => write!(f, "Close {} {name:?}", char::from(*kind)),
            Msg::Flush => write!(f, "Flush"),
            Msg::Sync => write!(f, "Sync"),
            Msg::Query { sql } => write!(f, "Query {sql:?}"),
        }
    }
}

/// Renders a sequence one numbered message a line.
pub fn listing(msgs: &[Msg]) -> String {
    msgs.iter()
        .enumerate()
        .map(|(i, m)| format!("  #{i:<2} {m}\n"))
        .collect()
}

/// A legal sequence for `seed`: one to four batches, each ending with Sync, Flush anywhere.
/// Messages come mostly in the groups drivers send (prepare, describe, bind and execute), so
/// that batches get past their first message, with odd single messages mixed in.
pub fn generate(seed: u64) -> Vec<Msg> {
    let mut g = Generator {
        rng: StdRng::seed_from_u64(seed),
        params: HashMap::new(),
        out: Vec::new(),
    };
    for _ in 0..g.rng.random_range(1..=4) {
        for _ in 0..g.rng.random_range(1..=4) {
            if g.rng.random_ratio(1, 8) {
                g.query();
            } else {
                g.group();
            }
        }
        g.push(Msg::Sync);
    }
    g.out
}

struct Generator {
    rng: StdRng,
    /// The parameter count of the text last parsed under each name.
    params: HashMap<&'static str, usize>,
    out: Vec<Msg>,
}

impl Generator {
    /// Appends `m`, and a Flush after it one time in six.
    fn push(&mut self, m: Msg) {
        let sync = m == Msg::Sync;
        self.out.push(m);
        if !sync && self.rng.random_ratio(1, 6) {
            self.out.push(Msg::Flush);
        }
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.rng.random_range(0..items.len())]
    }

    fn text(&mut self) -> Text {
        let total: u32 = TEXTS.iter().map(|(_, w)| w).sum();
        let mut n = self.rng.random_range(0..total);
        for (t, w) in TEXTS {
            if n < *w {
                return *t;
            }
            n -= w;
        }
        unreachable!()
    }

    /// A statement name, usually one parsed before.
    fn statement(&mut self) -> &'static str {
        let known: Vec<&'static str> = NAMES
            .iter()
            .copied()
            .filter(|n| self.params.contains_key(n))
            .collect();
        if known.is_empty() || self.rng.random_ratio(1, 8) {
            self.pick(NAMES)
        } else {
            self.pick(&known)
        }
    }

    fn portal(&mut self) -> &'static str {
        if self.rng.random_ratio(1, 4) {
            "p1"
        } else {
            ""
        }
    }

    fn max_rows(&mut self) -> i32 {
        if self.rng.random_ratio(1, 3) {
            2
        } else {
            0
        }
    }

    fn bind_execute(&mut self, statement: &'static str) {
        let portal = self.portal();
        let mut params = self.params.get(statement).copied().unwrap_or(0);
        if self.rng.random_ratio(1, 12) {
            params = 1 - params.min(1);
        }
        self.push(Msg::Bind {
            portal,
            statement,
            params,
        });
        if self.rng.random_ratio(1, 4) {
            self.push(Msg::Describe {
                kind: b'P',
                name: portal,
            });
        }
        let max_rows = self.max_rows();
        self.push(Msg::Execute { portal, max_rows });
        if max_rows > 0 && self.rng.random_ratio(1, 2) {
            self.push(Msg::Execute { portal, max_rows: 0 });
        }
    }

    /// A simple Query, behind a Flush when messages were sent since the last Flush or Sync:
    /// a driver reads what they are due before it sends SQL text (and cannot wait for a
    /// Query's answer behind a batch that may have failed, whose error the server only sends
    /// at a Flush or Sync).
    fn query(&mut self) {
        if !matches!(self.out.last(), None | Some(Msg::Flush | Msg::Sync)) {
            self.out.push(Msg::Flush);
        }
        let sql = self.pick(QUERIES);
        self.out.push(Msg::Query { sql });
    }

    /// One group of messages.
    fn group(&mut self) {
        match self.rng.random_range(0..20) {
            // Prepare (asyncpg: Parse, Describe, Flush), then maybe run it.
            0..=7 => {
                let name = self.pick(NAMES);
                let text = self.text();
                self.push(Msg::Parse { name, text });
                self.params.insert(name, text.params);
                if self.rng.random_ratio(1, 2) {
                    self.push(Msg::Describe { kind: b'S', name });
                }
                if self.rng.random_ratio(1, 2) {
                    self.bind_execute(name);
                }
            }
            8..=12 => {
                let statement = self.statement();
                self.bind_execute(statement);
            }
            13 => {
                let portal = self.portal();
                let max_rows = self.max_rows();
                self.push(Msg::Execute { portal, max_rows });
            }
            14 | 15 => {
                let name = self.statement();
                self.push(Msg::Close { kind: b'S', name });
            }
            16 => {
                let name = self.portal();
                self.push(Msg::Close { kind: b'P', name });
            }
            17 => {
                let name = self.statement();
                self.push(Msg::Describe { kind: b'S', name });
            }
            18 => {
                let name = self.portal();
                self.push(Msg::Describe { kind: b'P', name });
            }
            _ => self.push(Msg::Flush),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_sequences_end_every_batch_with_sync_and_are_reproducible() {
        for seed in 0..200 {
            let seq = generate(seed);
            assert_eq!(seq.last(), Some(&Msg::Sync));
            assert!(queries_follow_a_read(&seq), "seed {seed}");
            assert_eq!(seq, generate(seed));
        }
    }

    #[test]
    fn a_portal_is_used_across_a_flush_only_within_its_batch() {
        let bind = |portal| Msg::Bind {
            portal,
            statement: "s1",
            params: 0,
        };
        let execute = |portal| Msg::Execute { portal, max_rows: 0 };
        let crosses = |msgs: &[Msg]| portal_used_across_flush(msgs);
        assert!(crosses(&[bind("p1"), Msg::Flush, execute("p1"), Msg::Sync]));
        assert!(crosses(&[bind("p1"), Msg::Flush, bind("p1"), Msg::Sync]));
        assert!(!crosses(&[bind("p1"), execute("p1"), Msg::Flush, Msg::Sync]));
        assert!(!crosses(&[
            bind("p1"),
            Msg::Sync,
            Msg::Flush,
            execute("p1"),
            Msg::Sync
        ]));
        assert!(!crosses(&[bind("p1"), Msg::Flush, execute(""), Msg::Sync]));
    }
}
