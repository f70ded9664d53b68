//! Forwarding client messages to the attached backend, with named prepared statements that
//! survive transaction pooling.
//!
//! A client's named statement `s1` becomes `sluice_<hash of query and parameter types>` on the
//! backends, so every backend connection can hold it once, whoever prepared it. When a Bind or
//! Describe names a statement the attached backend lacks, sluice sends the Parse first and
//! swallows its ParseComplete. Each Parse/Close sent (by the client or by sluice) leaves a
//! [`Pending`] entry so the matching ParseComplete/CloseComplete can be told apart.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use bytes::Bytes;
use sluice_postgres::{peek, Class, Classification, Message};

use super::replies::Unit;
use super::{End, Session};

/// A statement a client prepared.
#[derive(Debug)]
pub struct Statement {
    pub query: Bytes,
    /// Parameter type count and OIDs, verbatim.
    pub rest: Bytes,
    pub hash: u64,
    pub class: Classification,
}

impl Statement {
    /// The name this statement has on every backend.
    fn backend_name(&self) -> BackendName {
        backend_name(self.hash)
    }
}

/// `sluice_` and 16 hex digits: built on the stack, as it is for every Bind of a named statement.
type BackendName = [u8; 23];

fn backend_name(hash: u64) -> BackendName {
    let mut name = *b"sluice_0000000000000000";
    for (i, d) in name[7..].iter_mut().enumerate() {
        *d = b"0123456789abcdef"[(hash >> (60 - 4 * i)) as usize & 0xf];
    }
    name
}

/// A ParseComplete or CloseComplete still to come from the backend.
#[derive(Debug, Clone, Copy)]
pub struct Pending {
    /// Sent by sluice, not the client: the response is not relayed.
    pub swallow: bool,
    /// A Parse that made the backend hold this statement.
    pub prepared: Option<u64>,
}

/// At ReadyForQuery: entries never answered were skipped after an error, so those Parses did
/// not happen.
pub fn settle(fixups: &mut VecDeque<Pending>, prepared: &mut HashSet<u64>) {
    for p in fixups.drain(..) {
        if let Some(h) = p.prepared {
            prepared.remove(&h);
        }
    }
}

fn statement_hash(query: &[u8], rest: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    query.hash(&mut h);
    rest.hash(&mut h);
    h.finish()
}

impl Session {
    /// The statement a Parse defines: the one the client already has under that name when the
    /// text and parameter types are the same (a client re-parsing its unnamed statement for
    /// every execution, as drivers do in the extended protocol, costs no allocation and no
    /// classification), else a new one.
    fn statement_for(&self, p: &peek::Parse<'_>) -> Arc<Statement> {
        self.known_statement(p).cloned().unwrap_or_else(|| {
            Arc::new(Statement {
                query: Bytes::copy_from_slice(p.query),
                rest: Bytes::copy_from_slice(p.rest),
                hash: statement_hash(p.query, p.rest),
                class: self.cluster.classifier.classify(p.query),
            })
        })
    }

    /// The client's statement of this Parse's name, if it has the same text and types.
    pub(super) fn known_statement(&self, p: &peek::Parse<'_>) -> Option<&Arc<Statement>> {
        self.statements
            .get(p.name)
            .filter(|s| s.query == p.query && s.rest == p.rest)
    }

    /// Sends one client message to the attached backend, rewriting statement names.
    /// `query_class` is the classification of a simple query.
    pub(super) fn forward(&mut self, msg: Message, query_class: Option<Classification>) -> Result<(), End> {
        match msg.tag() {
            b'Q' => {
                let a = self.attached.as_mut().expect("forward needs a backend");
                a.units.push_back(Unit::Client);
                if let Some(c) = query_class {
                    self.note_effects(c);
                }
                let rewritten = peek::query(msg.body())
                    .ok()
                    .and_then(|sql| self.rewrite_session_commands(sql));
                match rewritten {
                    Some(q) => self.to_backend.extend_from_slice(&q),
                    None => self.to_backend.extend_from_slice(msg.raw()),
                }
            }
            b'S' => {
                let a = self.attached.as_mut().expect("attached");
                a.in_batch = false;
                if !a.copy_in {
                    a.units.push_back(Unit::ClientSync);
                }
                self.to_backend.extend_from_slice(msg.raw());
            }
            b'F' => {
                let a = self.attached.as_mut().expect("attached");
                a.units.push_back(Unit::Client);
                a.wrote = true;
                self.to_backend.extend_from_slice(msg.raw());
            }
            // CopyDone and CopyFail end COPY FROM STDIN.
            b'c' | b'f' => {
                self.attached.as_mut().expect("attached").copy_in = false;
                self.to_backend.extend_from_slice(msg.raw());
            }
            b'P' => {
                let p = peek::parse(msg.body()).map_err(|e| self.violation(&e.to_string()))?;
                let stmt = self.statement_for(&p);
                let name = Bytes::copy_from_slice(p.name);
                let a = self.attached.as_mut().expect("attached");
                a.in_batch = true;
                if name.is_empty() {
                    a.unnamed_ready = true;
                    a.fixups.push_back(Pending {
                        swallow: false,
                        prepared: None,
                    });
                    self.to_backend.extend_from_slice(msg.raw());
                } else {
                    let prepared = &mut a.checkout.conn.conn().prepared;
                    if !prepared.insert(stmt.hash) {
                        // The backend holds a statement of that name already (same text): close
                        // it so the client's Parse behaves exactly as on a fresh server.
                        peek::encode_target(&mut self.to_backend, b'C', b'S', &stmt.backend_name());
                        a.fixups.push_back(Pending {
                            swallow: true,
                            prepared: None,
                        });
                    }
                    peek::encode_parse(
                        &mut self.to_backend,
                        &stmt.backend_name(),
                        &stmt.query,
                        &stmt.rest,
                    );
                    a.fixups.push_back(Pending {
                        swallow: false,
                        prepared: Some(stmt.hash),
                    });
                }
                self.statements.insert(name, stmt);
            }
            b'B' => {
                let b = peek::bind(msg.body()).map_err(|e| self.violation(&e.to_string()))?;
                self.attached.as_mut().expect("attached").in_batch = true;
                if let Some(stmt) = self.statements.get(b.statement) {
                    // The statement runs now: its session effects happen now.
                    let c = stmt.class;
                    self.note_effects(c);
                }
                match self.ensure_prepared(b.statement) {
                    Some(name) => peek::encode_bind(&mut self.to_backend, b.portal, &name, b.rest),
                    None => self.to_backend.extend_from_slice(msg.raw()),
                }
            }
            b'D' => {
                let t = peek::target(msg.body()).map_err(|e| self.violation(&e.to_string()))?;
                self.attached.as_mut().expect("attached").in_batch = true;
                match (t.kind, self.ensure_prepared_if_statement(t.kind, t.name)) {
                    (b'S', Some(name)) => peek::encode_target(&mut self.to_backend, b'D', b'S', &name),
                    _ => self.to_backend.extend_from_slice(msg.raw()),
                }
            }
            b'C' => {
                let t = peek::target(msg.body()).map_err(|e| self.violation(&e.to_string()))?;
                let closed = if t.kind == b'S' && !t.name.is_empty() {
                    self.statements.remove(t.name)
                } else {
                    None
                };
                let a = self.attached.as_mut().expect("attached");
                a.in_batch = true;
                a.fixups.push_back(Pending {
                    swallow: false,
                    prepared: None,
                });
                match closed {
                    Some(stmt) => {
                        a.checkout.conn.conn().prepared.remove(&stmt.hash);
                        peek::encode_target(&mut self.to_backend, b'C', b'S', &stmt.backend_name());
                    }
                    None => self.to_backend.extend_from_slice(msg.raw()),
                }
            }
            b'E' | b'H' => {
                self.attached.as_mut().expect("attached").in_batch = true;
                self.to_backend.extend_from_slice(msg.raw());
            }
            // CopyData.
            _ => self.to_backend.extend_from_slice(msg.raw()),
        }
        Ok(())
    }

    fn ensure_prepared_if_statement(&mut self, kind: u8, name: &[u8]) -> Option<BackendName> {
        if kind == b'S' {
            self.ensure_prepared(name)
        } else {
            None
        }
    }

    /// Makes sure the attached backend holds the client's statement `name` (sending a Parse
    /// whose response is swallowed if not), and returns the backend's name for it. `None` means
    /// "forward as is": the unnamed statement, or a name the client never prepared (the server
    /// then reports it missing, in order).
    fn ensure_prepared(&mut self, name: &[u8]) -> Option<BackendName> {
        let stmt = self.statements.get(name)?.clone();
        let a = self.attached.as_mut().expect("attached");
        if name.is_empty() {
            if !a.unnamed_ready {
                peek::encode_parse(&mut self.to_backend, b"", &stmt.query, &stmt.rest);
                a.fixups.push_back(Pending {
                    swallow: true,
                    prepared: None,
                });
                a.unnamed_ready = true;
            }
            return None;
        }
        let backend_name = stmt.backend_name();
        if a.checkout.conn.conn().prepared.insert(stmt.hash) {
            peek::encode_parse(&mut self.to_backend, &backend_name, &stmt.query, &stmt.rest);
            a.fixups.push_back(Pending {
                swallow: true,
                prepared: Some(stmt.hash),
            });
        }
        Some(backend_name)
    }

    /// Records what a statement about to run does to the session.
    fn note_effects(&mut self, c: Classification) {
        if let Some(reason) = c.effects.pin {
            self.pin(reason);
        }
        let a = self.attached.as_mut().expect("attached");
        a.settings_dirty |= c.effects.settings;
        a.wrote |= c.class == Class::Write;
    }

    /// `DEALLOCATE name` names the client's statement, which the backend knows by another name:
    /// returns the Query to send instead. `DEALLOCATE ALL` and `DISCARD ALL` drop every
    /// statement on the backend: forget them so they are prepared again when needed.
    fn rewrite_session_commands(&mut self, sql: &[u8]) -> Option<bytes::BytesMut> {
        match parse_deallocate(sql)? {
            Deallocate::All => {
                let a = self.attached.as_mut().expect("attached");
                a.checkout.conn.conn().prepared.clear();
                a.unnamed_ready = false;
                self.statements.clear();
                None
            }
            Deallocate::Name(name) => {
                let stmt = self.statements.remove(name.as_slice())?;
                let backend_name = stmt.backend_name();
                let a = self.attached.as_mut().expect("attached");
                let prepared = &mut a.checkout.conn.conn().prepared;
                if !prepared.remove(&stmt.hash) {
                    // The backend never saw it: prepare it (answers swallowed) so the
                    // DEALLOCATE below succeeds exactly as the client expects.
                    peek::encode_parse(&mut self.to_backend, &backend_name, &stmt.query, &stmt.rest);
                    self.to_backend.extend_from_slice(&[b'S', 0, 0, 0, 4]);
                    a.units.insert(a.units.len() - 1, Unit::Replay);
                }
                let sql = format!("DEALLOCATE {}", String::from_utf8_lossy(&backend_name));
                Some(super::simple_query(&sql))
            }
        }
    }
}

/// What a `DEALLOCATE` or `DISCARD` statement drops.
#[derive(Debug, PartialEq, Eq)]
enum Deallocate {
    All,
    Name(Vec<u8>),
}

/// Recognises `DEALLOCATE [PREPARE] name|ALL` and `DISCARD ALL` (a single statement, any case,
/// optional trailing `;`). Unquoted names fold to lower case, as PostgreSQL folds them.
fn parse_deallocate(sql: &[u8]) -> Option<Deallocate> {
    let sql = sql.trim_ascii();
    let sql = sql.strip_suffix(b";").unwrap_or(sql).trim_ascii_end();
    let mut words = sql.split(|b| b.is_ascii_whitespace()).filter(|w| !w.is_empty());
    let first = words.next()?;
    if first.eq_ignore_ascii_case(b"DISCARD") {
        let w = words.next()?;
        return (w.eq_ignore_ascii_case(b"ALL") && words.next().is_none()).then_some(Deallocate::All);
    }
    if !first.eq_ignore_ascii_case(b"DEALLOCATE") {
        return None;
    }
    let mut name = words.next()?;
    if name.eq_ignore_ascii_case(b"PREPARE") {
        name = words.next()?;
    }
    if words.next().is_some() {
        return None;
    }
    if name.eq_ignore_ascii_case(b"ALL") {
        return Some(Deallocate::All);
    }
    let name = match name.strip_prefix(b"\"").and_then(|n| n.strip_suffix(b"\"")) {
        Some(quoted) => {
            let s = String::from_utf8_lossy(quoted).replace("\"\"", "\"");
            s.into_bytes()
        }
        None => name.to_ascii_lowercase(),
    };
    Some(Deallocate::Name(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_text_same_backend_name() {
        assert_eq!(
            statement_hash(b"select 1", b"\0\0"),
            statement_hash(b"select 1", b"\0\0")
        );
        assert_ne!(
            statement_hash(b"select 1", b"\0\0"),
            statement_hash(b"select 2", b"\0\0")
        );
        assert_ne!(
            statement_hash(b"select $1", b"\0\x01\0\0\0\x17"),
            statement_hash(b"select $1", b"\0\x01\0\0\0\x19")
        );
        assert_eq!(&backend_name(1), b"sluice_0000000000000001");
        assert_eq!(
            backend_name(0xfedc_ba98_7654_3210).as_slice(),
            format!("sluice_{:016x}", 0xfedc_ba98_7654_3210_u64).as_bytes()
        );
    }

    #[test]
    fn deallocate_statements() {
        let d = |s: &str| parse_deallocate(s.as_bytes());
        assert_eq!(d("DEALLOCATE ALL"), Some(Deallocate::All));
        assert_eq!(d("  discard all ;"), Some(Deallocate::All));
        assert_eq!(d("DEALLOCATE PREPARE all"), Some(Deallocate::All));
        assert_eq!(d("DEALLOCATE S1"), Some(Deallocate::Name(b"s1".to_vec())));
        assert_eq!(
            d("deallocate prepare \"S1\";"),
            Some(Deallocate::Name(b"S1".to_vec()))
        );
        assert_eq!(d("DISCARD PLANS"), None);
        assert_eq!(d("DEALLOCATE a; SELECT 1"), None);
        assert_eq!(d("SELECT 1"), None);
    }

    #[test]
    fn unanswered_parses_are_forgotten() {
        let mut prepared: HashSet<u64> = [1, 2].into_iter().collect();
        let mut fixups: VecDeque<Pending> = [
            Pending {
                swallow: true,
                prepared: Some(2),
            },
            Pending {
                swallow: false,
                prepared: None,
            },
        ]
        .into_iter()
        .collect();
        settle(&mut fixups, &mut prepared);
        assert!(fixups.is_empty());
        assert_eq!(prepared, [1].into_iter().collect());
    }
}
