//! Forwarding client messages to the attached backend, with named prepared statements that
//! survive transaction pooling.
//!
//! Session mode needs none of this: the client keeps one backend, so every message goes through
//! unchanged and the server keeps the client's statements under the client's own names.
//!
//! In transaction mode a client's named statement `s1` becomes `sluice_<hash of query and
//! parameter types>` on the backends, so every backend connection can hold it once, whoever
//! prepared it. When a Bind or Describe names a statement the attached backend lacks, sluice
//! sends the Parse first and swallows its ParseComplete. sluice keeps the client's namespace as
//! PostgreSQL would: a Parse of a name the client already has fails with 42P05 naming the
//! client's name (the backend is made to refuse it the same way, so it also skips to Sync and
//! rolls back the implicit transaction). Each Parse/Close sent (by the client or by sluice)
//! leaves a [`Pending`] entry so the matching ParseComplete/CloseComplete can be told apart; its
//! changes to the client's namespace and to the backend's statements are undone when the
//! server never answers it (an earlier error in the batch made it skip to Sync).

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use sluice_postgres::commands::{parse_deallocate, parse_execute, parse_prepare, skip_blanks, Deallocate};
use sluice_postgres::{peek, Class, Classification, Message};

use super::replies::Unit;
use super::{Attached, End, Link, Session};
use crate::config::PoolMode;

/// A statement a client prepared.
#[derive(Debug)]
pub struct Statement {
    pub query: Bytes,
    /// Parameter type count and OIDs, verbatim.
    pub rest: Bytes,
    pub hash: u64,
    pub class: Classification,
    /// What its rows looked like when the client prepared it (`row_shape`; 0 until sluice's
    /// own Describe after the client's Parse answers). PostgreSQL refuses to run a statement
    /// whose rows no longer look so ("cached plan must not change result type"); sluice
    /// refuses the same way when it runs on a server connection that prepared it later.
    pub shape: AtomicU64,
}

/// The hash whose backend name (`sluice_0000000000000000`) sluice uses as a scratch statement
/// to have the server refuse a duplicate Parse in a failed transaction (see `forward_parse`).
const DUPLICATE_SCRATCH: u64 = 0;

/// A Flush message.
const FLUSH: [u8; 5] = [b'H', 0, 0, 0, 4];

/// The Bind sluice sends instead of the client's when the backend's copy of the statement
/// returns rows of another shape than the client's: the server refuses it (and skips to the
/// Sync, aborting a transaction, as for the error PostgreSQL would give), and sluice relays
/// that error as PostgreSQL's 0A000.
pub const PLAN_CHANGED: &[u8] = b"sluice_cached_plan_changed";

/// sluice's own Describe sent after one of its Parses: whose shape it reports.
#[derive(Debug)]
pub struct Describe {
    pub hash: u64,
    /// The client's statement, when the Parse was the client's: its shape is set.
    pub client: Option<Arc<Statement>>,
}

impl Statement {
    /// The name this statement has on every backend.
    pub(super) fn backend_name(&self) -> BackendName {
        backend_name(self.hash)
    }
}

/// `sluice_` and 16 hex digits: built on the stack, as it is for every Bind of a named statement.
pub type BackendName = [u8; 23];

fn backend_name(hash: u64) -> BackendName {
    let mut name = *b"sluice_0000000000000000";
    for (i, d) in name[7..].iter_mut().enumerate() {
        *d = b"0123456789abcdef"[(hash >> (60 - 4 * i)) as usize & 0xf];
    }
    name
}

/// Sends sluice's own Describe of `stmt` right after its Parse: the answer says what the
/// backend's copy returns (`Attached`'s `shapes`), and for the client's own Parse (`client`)
/// what the client's statement returns.
fn describe_after_parse(
    a: &mut Attached,
    to_backend: &mut BytesMut,
    stmt: &Arc<Statement>,
    client: bool,
) -> Describe {
    peek::encode_target(to_backend, b'D', b'S', &stmt.backend_name());
    a.checkout.conn.conn().shapes.remove(&stmt.hash);
    Describe {
        hash: stmt.hash,
        client: client.then(|| stmt.clone()),
    }
}

/// The first backend statement name (`sluice_` and 16 hex digits) in `text`, e.g. an error
/// message that quotes the statement a Bind named.
pub fn backend_name_in(text: &[u8]) -> Option<BackendName> {
    let mut at = 0;
    while let Some(i) = text[at..].windows(7).position(|w| w == b"sluice_") {
        let start = at + i;
        if let Some(candidate) = text.get(start..start + 23) {
            if candidate[7..]
                .iter()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            {
                return candidate.try_into().ok();
            }
        }
        at = start + 7;
    }
    None
}

/// What a Parse or Close did to the backend's statements, undone if it is never answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChange {
    None,
    /// The backend holds this statement since this Parse.
    Prepared(u64),
    /// This Close dropped the statement from the backend.
    Closed(u64),
    /// This message changed what the backend's unnamed statement is (the client's, or none):
    /// skipped, it is as it was — `true` when it was the client's.
    Unnamed(bool),
}

/// What a client's Parse or Close did to its namespace: the statement that name had before
/// (`None`: it had none), put back if it is never answered.
pub type ClientChange = Option<(Bytes, Option<Arc<Statement>>)>;

/// A ParseComplete or CloseComplete still to come from the backend.
#[derive(Debug)]
pub struct Pending {
    /// Sent by sluice, not the client: the response is not relayed.
    pub swallow: bool,
    pub backend: BackendChange,
    pub client: ClientChange,
    /// The number of the unit whose ReadyForQuery ends this message's batch: if that arrives
    /// first, the server skipped the message after an error.
    pub batch: u64,
    /// Nothing before this message in its batch can have failed: unanswered, it failed itself
    /// rather than being skipped (a failed Parse of the unnamed statement has still dropped
    /// the old one, as PostgreSQL drops it before parsing).
    pub alone: bool,
    /// Answered, it makes the next message `alone` (a Close of the unnamed statement sent just
    /// before a Parse of it).
    pub marker: bool,
    /// A Parse that sluice's own Describe follows (its answers are swallowed).
    pub describe: Option<Describe>,
    /// sluice's Close of [`QUERY_GATE`] ahead of a Query or FunctionCall sent in an open
    /// batch: an error before its answer is the batch's, and the server skips the Query.
    pub gate: bool,
}

/// The statement sluice closes ahead of a Query sent in an open extended-protocol batch: a
/// name no client uses (in session mode a client's own names reach the server as they are),
/// so the Close changes nothing and is answered unless the batch failed.
pub const QUERY_GATE: &[u8] = b"sluice: query gate";

/// The client's prepared statements by the client's name ("" is the unnamed one). The map is
/// boxed when the client first prepares one: a client of the simple protocol never does, and an
/// idle session carries a pointer instead of an empty map.
///
/// Hashed with foldhash rather than SipHash: a Bind or Describe looks a name up on every
/// extended-protocol request. Its per-map random seed still keeps a client from choosing names
/// that collide, and a client could only slow down its own session's map anyway.
#[derive(Default)]
#[allow(clippy::box_collection)] // 8 bytes in every session instead of an empty map's 48
pub struct Statements(Option<Box<HashMap<Bytes, Arc<Statement>, foldhash::fast::RandomState>>>);

impl Statements {
    pub fn get(&self, name: &[u8]) -> Option<&Arc<Statement>> {
        self.0.as_ref()?.get(name)
    }

    pub fn get_key_value(&self, name: &[u8]) -> Option<(&Bytes, &Arc<Statement>)> {
        self.0.as_ref()?.get_key_value(name)
    }

    pub fn contains_key(&self, name: &[u8]) -> bool {
        self.get(name).is_some()
    }

    pub fn insert(&mut self, name: Bytes, statement: Arc<Statement>) -> Option<Arc<Statement>> {
        self.0
            .get_or_insert_with(Default::default)
            .insert(name, statement)
    }

    pub fn remove(&mut self, name: &[u8]) -> Option<Arc<Statement>> {
        self.0.as_mut()?.remove(name)
    }

    /// Every statement, taken out.
    pub fn drain(&mut self) -> Vec<(Bytes, Arc<Statement>)> {
        self.0.as_mut().map_or_else(Vec::new, |m| m.drain().collect())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Bytes, &Arc<Statement>)> {
        self.0.iter().flat_map(|m| m.iter())
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
                class: self.classify_sql(p.query),
                shape: AtomicU64::new(0),
            })
        })
    }

    /// The client's statement of this Parse's name, if it has the same text and types.
    pub(super) fn known_statement(&self, p: &peek::Parse<'_>) -> Option<&Arc<Statement>> {
        self.statements
            .get(p.name)
            .filter(|s| s.query == p.query && s.rest == p.rest)
    }

    /// The attached backend with what forwarding a message changes besides it.
    fn forwarding(&mut self) -> Forward<'_> {
        let Session {
            link: Link::Attached(a),
            statements,
            to_backend,
            ..
        } = self
        else {
            unreachable!("handle_client_message attaches a backend before it forwards")
        };
        Forward {
            a,
            statements,
            to_backend: to_backend.get(),
        }
    }

    /// Whether the client's Bind `msg` must wait for the shape of its statement's rows on the
    /// attached backend (see `Statement::shape`): when the backend does not hold the statement,
    /// or holds a copy whose rows look otherwise than the client's (another client's, from
    /// before or after a change), sluice prepares it there afresh now, with its own Describe
    /// and a Flush so that the server answers at once, and the Bind waits for the answer; then
    /// `plan_changed` decides as PostgreSQL would on the client's own connection. Only
    /// statements whose shape the
    /// client's Parse reported are compared; nothing waits after an error in the batch (the
    /// server skips the Bind, and leaves the Describe unanswered).
    pub(super) fn awaits_shape(&mut self, msg: &Message) -> bool {
        if msg.tag() != b'B' || self.cluster.pg.pool_mode != PoolMode::Transaction {
            return false;
        }
        let Ok(b) = peek::bind(msg.body()) else {
            return false;
        };
        let Some(stmt) = self.statements.get(b.statement) else {
            return false;
        };
        let (hash, client) = (stmt.hash, stmt.shape.load(Ordering::Relaxed));
        if b.statement.is_empty() || client == 0 {
            return false;
        }
        let Some(a) = self.link.attached_mut() else {
            return false;
        };
        if a.st.batch_failed {
            return false;
        }
        let conn = a.checkout.conn.conn();
        match conn.shape(hash) {
            // The same rows: the server itself checks that they still look so.
            Some(backend) if backend == client => return false,
            // Prepared afresh for this request already: `plan_changed` refuses the Bind.
            Some(_) if a.st.reprepared.contains(&hash) => return false,
            // The backend's copy is older or newer than the client's statement (another
            // client's, prepared before or after a change of the rows): the client's statement
            // is what the text gives now, and it fails only if that differs from the client's.
            Some(_) => {
                conn.prepared.remove(&hash);
                peek::encode_target(self.to_backend.get(), b'C', b'S', &backend_name(hash));
                a.push_fixup(true, BackendChange::Closed(hash), None);
                a.st.reprepared.push(hash);
                self.forwarding().ensure_prepared(b.statement);
            }
            None if conn.prepared.contains(&hash) => {
                if !a.describe_pending(hash) {
                    return false;
                }
            }
            None => {
                a.st.reprepared.push(hash);
                self.forwarding().ensure_prepared(b.statement);
            }
        }
        // The server holds its answers back until a Flush or Sync, and the client's next one
        // waits behind this Bind.
        self.to_backend.get().extend_from_slice(&FLUSH);
        true
    }

    /// Whether the message held back by `awaits_shape` still waits.
    pub(super) fn shape_pending(&self, msg: &Message) -> bool {
        let Some(a) = self.link.attached() else {
            return false;
        };
        if msg.tag() != b'B' || a.st.batch_failed {
            return false;
        }
        peek::bind(msg.body())
            .ok()
            .and_then(|b| self.statements.get(b.statement))
            .is_some_and(|stmt| a.describe_pending(stmt.hash))
    }

    /// Sends one client message to the attached backend, rewriting statement names in
    /// transaction mode. `query_class` is the classification of a simple query.
    pub(super) fn forward(&mut self, msg: Message, query_class: Option<Classification>) -> Result<(), End> {
        let session_mode = self.cluster.pg.pool_mode == PoolMode::Session;
        let Forward { a, to_backend, .. } = self.forwarding();
        let batch_start = !a.st.in_batch;
        let mut gated = false;
        match msg.tag() {
            // A Query or FunctionCall ends an open batch: the server commits its implicit
            // transaction when the Query is done. If the batch fails first, the server skips
            // it up to the client's Sync and it is never answered: a Close of a statement that
            // does not exist goes ahead of it, answered only if the batch did not fail (see
            // `Attached::skip_gated_queries`).
            b'Q' | b'F' => {
                gated = a.st.in_batch;
                if gated {
                    peek::encode_target(to_backend, b'C', b'S', QUERY_GATE);
                    a.push_fixup(true, BackendChange::None, None);
                    a.st.fixups.back_mut().expect("just pushed").gate = true;
                }
                a.st.in_batch = false;
                a.push_unit(Unit::Client);
            }
            b'S' => {
                a.st.in_batch = false;
                if !a.st.copy_in {
                    a.push_unit(Unit::ClientSync);
                }
            }
            // CopyDone and CopyFail end COPY FROM STDIN.
            b'c' | b'f' if a.st.copy_in => a.st.copy_in = false,
            b'c' | b'f' => {
                a.st.copy_ended_early = Some((a.st.units_pushed + u64::from(a.st.in_batch), a.st.in_batch))
            }
            b'P' | b'B' | b'D' | b'E' | b'H' | b'C' => a.st.in_batch = true,
            _ => {}
        }
        if session_mode {
            // Statement names pass as they are; every ParseComplete and CloseComplete is still
            // accounted for (relayed), so that the answer to a gate is told from the client's.
            if matches!(msg.tag(), b'P' | b'C') {
                a.push_fixup(false, BackendChange::None, None);
            }
            to_backend.extend_from_slice(msg.raw());
            return Ok(());
        }
        match msg.tag() {
            b'Q' => {
                self.forwarding().query_drops_unnamed(gated);
                let sql = peek::query(msg.body()).ok();
                if let (Some(c), Some(sql)) = (query_class, sql) {
                    self.note_effects(c, sql);
                    if c.class == Class::Write && crate::postgres::functions::changes_functions(sql) {
                        self.cluster
                            .refresh_functions(self.client.user(), self.client.database());
                    }
                }
                let f = self.forwarding();
                let rewritten = sql.and_then(|sql| f.rewrite_session_commands(sql));
                match rewritten {
                    Some(q) => self.to_backend.get().extend_from_slice(&q),
                    None => self.to_backend.get().extend_from_slice(msg.raw()),
                }
            }
            b'F' => {
                self.taint();
                self.to_backend.get().extend_from_slice(msg.raw());
            }
            b'P' => {
                let p = peek::parse(msg.body()).map_err(|e| self.violation(&e.to_string()))?;
                self.forward_parse(&msg, &p, batch_start);
            }
            b'B' => {
                let b = peek::bind(msg.body()).map_err(|e| self.violation(&e.to_string()))?;
                if let Some(stmt) = self.statements.get(b.statement).cloned() {
                    // The statement runs now: its session effects happen now.
                    self.note_effects(stmt.class, &stmt.query);
                }
                let mut f = self.forwarding();
                match f.ensure_prepared(b.statement) {
                    Some(name) => {
                        let target = if f.plan_changed(b.statement) {
                            PLAN_CHANGED
                        } else {
                            &name[..]
                        };
                        peek::encode_bind(f.to_backend, b.portal, target, b.rest);
                        // A Bind the server refuses (wrong parameter count) names the statement.
                        if let Some((client_name, _)) = f.statements.get_key_value(b.statement) {
                            f.a.st.renames.push((name, client_name.clone(), false));
                        }
                    }
                    None => f.to_backend.extend_from_slice(msg.raw()),
                }
            }
            b'D' => {
                let t = peek::target(msg.body()).map_err(|e| self.violation(&e.to_string()))?;
                let mut f = self.forwarding();
                let renamed = if t.kind == b'S' {
                    f.ensure_prepared(t.name)
                } else {
                    None
                };
                match renamed {
                    Some(name) => peek::encode_target(f.to_backend, b'D', b'S', &name),
                    None => f.to_backend.extend_from_slice(msg.raw()),
                }
            }
            b'C' => {
                let t = peek::target(msg.body()).map_err(|e| self.violation(&e.to_string()))?;
                self.forwarding().close(&msg, &t);
            }
            // Execute, Flush, CopyData, Sync, CopyDone, CopyFail.
            _ => self.to_backend.get().extend_from_slice(msg.raw()),
        }
        Ok(())
    }

    /// A client's Parse. A name the client already has is refused as PostgreSQL refuses it.
    fn forward_parse(&mut self, msg: &Message, p: &peek::Parse<'_>, batch_start: bool) {
        // SQL `EXECUTE name` prepared through the extended protocol (asyncpg's `fetchval('EXECUTE
        // foobar')`): the text names the backend's copy of the client's statement.
        let executed = self.forwarding().execute_target(p.query);
        let rewritten;
        let p = match &executed {
            Some(sql) => {
                rewritten = peek::Parse { query: sql, ..*p };
                &rewritten
            }
            None => p,
        };
        let name = Bytes::copy_from_slice(p.name);
        if !name.is_empty() && self.statements.contains_key(&name) {
            // The backend refuses a Parse of a name it holds with 42P05 — after parsing the
            // text, so a syntax error is reported first, as for the client's own name — and
            // skips to Sync. The error names sluice's statement: renamed when relayed.
            let mut f = self.forwarding();
            let hash = f.statements.get(&name).expect("checked").hash;
            if f.a.st.status == b'E' && !f.a.checkout.conn.conn().prepared.contains(&hash) {
                // In a failed transaction sluice cannot prepare the client's statement on this
                // backend (25P02 for anything but COMMIT or ROLLBACK). Two Parses of the
                // client's text under a scratch name (closed first) make the server refuse the
                // second as it would refuse the client's: 25P02 for most texts, 42P05 for a
                // COMMIT or ROLLBACK. The scratch statement may stay on the backend until the
                // next time.
                let scratch = backend_name(DUPLICATE_SCRATCH);
                peek::encode_target(f.to_backend, b'C', b'S', &scratch);
                f.a.push_fixup(true, BackendChange::None, None);
                peek::encode_parse(f.to_backend, &scratch, p.query, p.rest);
                f.a.push_fixup(true, BackendChange::None, None);
                peek::encode_parse(f.to_backend, &scratch, p.query, p.rest);
                f.a.push_fixup(false, BackendChange::None, None);
                f.a.st.renames.push((scratch, name, true));
                return;
            }
            let backend_name = f.ensure_prepared(&name).expect("a named statement");
            peek::encode_parse(f.to_backend, &backend_name, p.query, p.rest);
            f.a.push_fixup(false, BackendChange::None, None);
            f.a.st.renames.push((backend_name, name, true));
            return;
        }
        if !name.is_empty() && self.rare.as_ref().is_some_and(|r| r.sql_prepared) {
            // Statements prepared with SQL PREPARE share the client's namespace and live on its
            // backend (PREPARE pinned the client there) under their own names: a Parse under
            // the client's name, closed again at once (answers swallowed), makes the server
            // refuse a name taken with 42P05 and skip the rest up to the Sync, as directly.
            let f = self.forwarding();
            peek::encode_parse(f.to_backend, &name, p.query, p.rest);
            f.a.push_fixup(true, BackendChange::None, None);
            peek::encode_target(f.to_backend, b'C', b'S', &name);
            f.a.push_fixup(true, BackendChange::None, None);
        }
        let stmt = self.statement_for(p);
        let Forward {
            a,
            statements,
            to_backend,
        } = self.forwarding();
        if name.is_empty() {
            // Whether this Parse failed or was skipped after an earlier error decides whether
            // the client still has its old unnamed statement. First in its batch, it can only
            // have failed; later, a Close of the unnamed statement just before it tells.
            let replaces = statements.contains_key(&name);
            let alone = batch_start && executed.is_none();
            let was_ready = a.st.unnamed_ready;
            if replaces && !alone {
                peek::encode_target(to_backend, b'C', b'S', b"");
                a.push_fixup(true, BackendChange::None, None);
                a.st.fixups.back_mut().expect("just pushed").marker = true;
            }
            a.st.unnamed_ready = true;
            if executed.is_some() {
                peek::encode_parse(to_backend, b"", p.query, p.rest);
            } else {
                to_backend.extend_from_slice(msg.raw());
            }
            let before = statements.insert(name.clone(), stmt);
            a.push_fixup(false, BackendChange::Unnamed(was_ready), Some((name, before)));
            a.st.fixups.back_mut().expect("just pushed").alone = alone;
            return;
        }
        let prepared = &mut a.checkout.conn.conn().prepared;
        if !prepared.insert(stmt.hash) {
            // The backend holds a statement of that text already (the client's other name for
            // it, or another client's): close it so the client's Parse behaves exactly as on a
            // fresh server.
            peek::encode_target(to_backend, b'C', b'S', &stmt.backend_name());
            a.push_fixup(true, BackendChange::Closed(stmt.hash), None);
        }
        peek::encode_parse(to_backend, &stmt.backend_name(), &stmt.query, &stmt.rest);
        let hash = stmt.hash;
        let describe = describe_after_parse(a, to_backend, &stmt, true);
        let before = statements.insert(name.clone(), stmt);
        a.push_fixup(false, BackendChange::Prepared(hash), Some((name, before)));
        a.st.fixups.back_mut().expect("just pushed").describe = Some(describe);
    }

    /// After each ReadyForQuery: every Parse or Close of a batch that has now ended without an
    /// answer was skipped after an error, so what it did did not happen (undone newest first).
    pub(super) fn settle(&mut self) {
        let Some(a) = self.link.attached_mut() else { return };
        a.st.describing = None;
        let ended = a.st.units_done;
        if a.st.dropped.as_ref().is_some_and(|d| d.unit <= ended) {
            a.st.dropped = None; // answered without an error: dropped for good
        }
        if a.st.shift.is_some_and(|s| s.unit <= ended) {
            a.st.shift = None;
        }
        let skipped = a.st.fixups.iter().take_while(|p| p.batch < ended).count();
        if skipped == 0 {
            return;
        }
        let skipped: Vec<Pending> = a.st.fixups.drain(..skipped).collect();
        let prepared = &mut a.checkout.conn.conn().prepared;
        for p in skipped.into_iter().rev() {
            match p.backend {
                BackendChange::None => {}
                BackendChange::Prepared(h) => {
                    prepared.remove(&h);
                }
                BackendChange::Closed(h) => {
                    prepared.insert(h);
                }
                BackendChange::Unnamed(was_ready) => a.st.unnamed_ready = was_ready,
            }
            if let Some((name, before)) = p.client {
                if p.alone && name.is_empty() {
                    // A Parse of the unnamed statement that failed: the old one is gone.
                    self.statements.remove(&name);
                    a.st.unnamed_ready = false;
                    continue;
                }
                match before {
                    Some(stmt) => self.statements.insert(name, stmt),
                    None => self.statements.remove(&name),
                };
            }
        }
    }

    /// Records what a statement about to run does to the session.
    fn note_effects(&mut self, c: Classification, sql: &[u8]) {
        if let Some(reason) = c.effects.pin {
            if reason == sluice_postgres::PinReason::Prepare {
                self.rare().sql_prepared = true;
            }
            self.pin(reason);
        }
        if c.effects.settings {
            match sluice_postgres::custom_setting_names(sql) {
                Some(names) => {
                    for n in names {
                        if !self.custom_settings().contains(&n) {
                            self.rare().custom_settings.push(n);
                        }
                    }
                }
                None => self.pin(sluice_postgres::PinReason::UntrackedSetting),
            }
        }
        let a = self.forwarding().a;
        a.st.settings_dirty |= c.effects.settings;
        a.st.wrote |= c.class == Class::Write;
        if c.class == Class::Write || c.effects.settings {
            self.taint();
        }
    }

    /// The backend may now carry session state of this client that sluice does not track.
    fn taint(&mut self) {
        if let Some(a) = self.link.attached_mut() {
            a.checkout.conn.conn().tainted = true;
        }
    }
}

/// What forwarding a message to the attached backend changes: the backend, the client's
/// statements and the bytes for the backend, borrowed apart from the rest of the session (see
/// `Session::forwarding`), so the backend is there by type.
struct Forward<'s> {
    a: &'s mut Attached,
    statements: &'s mut Statements,
    to_backend: &'s mut BytesMut,
}

impl Forward<'_> {
    /// A simple Query drops the unnamed statement before it runs (PostgreSQL's
    /// `exec_simple_query`), the client's and so the backend's. A `gated` Query (sent in an
    /// open batch) may be skipped instead: the gate's entry puts both back if it is never
    /// answered (`Session::settle`).
    fn query_drops_unnamed(mut self, gated: bool) {
        let (backend, client) = self.drop_unnamed();
        if gated {
            let gate = self.a.st.fixups.back_mut().expect("the gate was pushed");
            (gate.backend, gate.client) = (backend, client);
        }
    }

    /// The unnamed statement is gone, the client's and the backend's copy: what puts them back
    /// if the message that dropped them turns out skipped (see `Session::settle`).
    fn drop_unnamed(&mut self) -> (BackendChange, ClientChange) {
        let before = self.statements.remove(b"".as_slice());
        let backend = if std::mem::take(&mut self.a.st.unnamed_ready) {
            BackendChange::Unnamed(true)
        } else {
            BackendChange::None
        };
        (backend, before.map(|b| (Bytes::new(), Some(b))))
    }

    /// A client's Close. Closing a statement the client does not have is not an error.
    fn close(mut self, msg: &Message, t: &peek::Target<'_>) {
        if t.kind == b'S' && t.name.is_empty() {
            self.to_backend.extend_from_slice(msg.raw());
            let (backend, client) = self.drop_unnamed();
            self.a.push_fixup(false, backend, client);
            return;
        }
        let Forward {
            a,
            statements,
            to_backend,
        } = self;
        if t.kind != b'S' {
            a.push_fixup(false, BackendChange::None, None);
            to_backend.extend_from_slice(msg.raw());
            return;
        }
        let name = Bytes::copy_from_slice(t.name);
        let before = statements.remove(&name);
        let backend = match &before {
            Some(stmt) => {
                peek::encode_target(to_backend, b'C', b'S', &stmt.backend_name());
                if a.checkout.conn.conn().prepared.remove(&stmt.hash) {
                    BackendChange::Closed(stmt.hash)
                } else {
                    BackendChange::None
                }
            }
            None => {
                to_backend.extend_from_slice(msg.raw());
                BackendChange::None
            }
        };
        let client = before.map(|b| (name, Some(b)));
        a.push_fixup(false, backend, client);
    }

    /// Whether the backend's copy of the client's statement `name` returns rows of another
    /// shape than the client's statement did when the client prepared it (a column's type
    /// changed since, and this backend prepared it afterwards): PostgreSQL would refuse to run
    /// it. Unknown shapes are not compared.
    fn plan_changed(&mut self, name: &[u8]) -> bool {
        let Some(stmt) = self.statements.get(name) else {
            return false;
        };
        let client = stmt.shape.load(Ordering::Relaxed);
        client != 0
            && self
                .a
                .checkout
                .conn
                .conn()
                .shape(stmt.hash)
                .is_some_and(|backend| backend != client)
    }

    /// Makes sure the attached backend holds the client's statement `name` (sending a Parse
    /// whose response is swallowed if not), and returns the backend's name for it. `None` means
    /// "forward as is": the unnamed statement, or a name the client never prepared (the server
    /// then reports it missing, in order).
    fn ensure_prepared(&mut self, name: &[u8]) -> Option<BackendName> {
        let Some(stmt) = self.statements.get(name).cloned() else {
            if name.is_empty() && !self.a.st.unnamed_ready {
                // The client has no unnamed statement, but the backend may hold another
                // client's: drop it, so the server says it does not exist, as it would to
                // this client directly.
                peek::encode_target(self.to_backend, b'C', b'S', b"");
                self.a.push_fixup(true, BackendChange::Unnamed(false), None);
                self.a.st.unnamed_ready = true;
            }
            return None;
        };
        if name.is_empty() {
            if !self.a.st.unnamed_ready {
                self.prepare_executed(&stmt.query);
                peek::encode_parse(self.to_backend, b"", &stmt.query, &stmt.rest);
                self.a.push_fixup(true, BackendChange::Unnamed(false), None);
                self.a.st.unnamed_ready = true;
            }
            return None;
        }
        let backend_name = stmt.backend_name();
        if !self.a.checkout.conn.conn().prepared.contains(&stmt.hash) {
            self.prepare_executed(&stmt.query);
            self.a.checkout.conn.conn().prepared.insert(stmt.hash);
            peek::encode_parse(self.to_backend, &backend_name, &stmt.query, &stmt.rest);
            let describe = describe_after_parse(self.a, self.to_backend, &stmt, false);
            self.a.push_fixup(true, BackendChange::Prepared(stmt.hash), None);
            self.a.st.fixups.back_mut().expect("just pushed").describe = Some(describe);
        }
        Some(backend_name)
    }

    /// For `EXECUTE name ...` of a statement the client has: the same text naming the
    /// backend's copy, prepared on the attached backend (ahead, answers swallowed) if needed.
    fn execute_target(mut self, sql: &[u8]) -> Option<Vec<u8>> {
        let (name, rest) = parse_execute(sql)?;
        if name.is_empty() || !self.statements.contains_key(name.as_slice()) {
            return None;
        }
        let backend_name = self.ensure_prepared(&name)?;
        // An error in it comes before the batch's next ReadyForQuery.
        let unit = self.a.st.units_pushed + 1;
        self.a.st.shift = Some(Shift::new(unit, sql, rest, b"EXECUTE ", &backend_name));
        Some([&b"EXECUTE "[..], &backend_name, rest].concat())
    }

    /// A statement whose text is `EXECUTE sluice_…` (rewritten by `execute_target`) needs
    /// that statement on the backend before it can be prepared on another one.
    fn prepare_executed(&mut self, sql: &[u8]) {
        let Some((target, _)) = parse_execute(sql) else {
            return;
        };
        let client_name = self
            .statements
            .iter()
            .find(|(n, s)| !n.is_empty() && s.backend_name()[..] == target[..])
            .map(|(n, _)| n.clone());
        if let Some(n) = client_name {
            self.ensure_prepared(&n);
        }
    }

    /// Prepares `stmt` on the attached backend ahead of the client's Query just queued (Parse
    /// and Sync, answers swallowed).
    fn prepare_before_query(&mut self, stmt: &Statement) {
        peek::encode_parse(self.to_backend, &stmt.backend_name(), &stmt.query, &stmt.rest);
        self.to_backend.extend_from_slice(&super::SYNC);
        let a = &mut *self.a;
        let last = a.st.units.len() - 1;
        a.st.units.insert(last, Unit::Replay);
        a.st.units_pushed += 1;
    }

    /// `EXECUTE name` of a statement the client prepared with Parse runs the backend's copy of
    /// it (prepared first if needed), as SQL `EXECUTE` of a protocol-level statement does on a
    /// plain server; `PREPARE name` of such a statement names the backend's copy too, so the
    /// server refuses it with 42P05 as it would directly (the error names the client's
    /// statement when relayed). `DEALLOCATE name` names the client's statement, which the
    /// backend knows by another name: returns the Query to send instead. `DEALLOCATE ALL` and
    /// `DISCARD ALL` drop every statement on the backend: forget them so they are prepared
    /// again when needed.
    fn rewrite_session_commands(mut self, sql: &[u8]) -> Option<BytesMut> {
        // Only EXECUTE, PREPARE, DEALLOCATE and DISCARD are rewritten: a query starting with
        // any other letter is not parsed further (the cost of this per simple query is one
        // byte).
        let start = match sql.trim_ascii_start() {
            s @ [b'/' | b'-', ..] => skip_blanks(s),
            s => s,
        };
        let first = start.first()?.to_ascii_uppercase();
        if !matches!(first, b'E' | b'P' | b'D') {
            return None;
        }
        // Comments before the statement stay where they are.
        let lead = &sql[..sql.len() - start.len()];
        if first != b'D' {
            let (keyword, (name, rest)) = match first {
                b'E' => (&b"EXECUTE "[..], parse_execute(start)?),
                _ => (&b"PREPARE "[..], parse_prepare(start)?),
            };
            let keyword: &[u8] = &[lead, keyword].concat();
            let stmt = self.statements.get(name.as_slice())?.clone();
            if name.is_empty() || self.a.st.status == b'E' {
                // In a failed transaction the server refuses the statement before it looks
                // for the name (25P02), and would refuse sluice's Parse too.
                return None;
            }
            let backend_name = stmt.backend_name();
            if self.a.checkout.conn.conn().prepared.insert(stmt.hash) {
                self.prepare_before_query(&stmt);
            }
            // An error names the client's statement (PREPARE: 42P05 about this name).
            self.a
                .st
                .renames
                .push((backend_name, Bytes::from(name), first == b'P'));
            let unit = self.a.st.units_pushed;
            self.a.st.shift = Some(Shift::new(unit, sql, rest, keyword, &backend_name));
            let sql = [keyword, &backend_name, rest].concat();
            let mut q = BytesMut::with_capacity(sql.len() + 6);
            q.extend_from_slice(b"Q");
            q.extend_from_slice(&(sql.len() as u32 + 5).to_be_bytes());
            q.extend_from_slice(&sql);
            q.extend_from_slice(b"\0");
            return Some(q);
        }
        let drop = parse_deallocate(sql)?;
        if self.a.st.status == b'E' {
            // In a failed transaction the server drops nothing (25P02).
            return None;
        }
        // The server may still refuse (DISCARD ALL inside a transaction block, 25001; a
        // pipelined statement that finds its transaction failed): what is forgotten here is
        // remembered until the Query is answered (`undrop` puts it back).
        match drop {
            Deallocate::All => {
                let hashes = self.a.checkout.conn.conn().prepared.drain().collect();
                self.a.st.unnamed_ready = false;
                let statements = self.statements.drain();
                self.a.st.dropped = Some(Box::new(Dropped {
                    unit: self.a.st.units_pushed,
                    statements,
                    hashes,
                }));
                None
            }
            Deallocate::Name(name) => {
                let stmt = self.statements.remove(name.as_slice())?;
                let backend_name = stmt.backend_name();
                if !self.a.checkout.conn.conn().prepared.remove(&stmt.hash) {
                    // The backend never saw it: prepare it (answers swallowed) so the
                    // DEALLOCATE below succeeds exactly as the client expects.
                    self.prepare_before_query(&stmt);
                }
                self.a.st.dropped = Some(Box::new(Dropped {
                    unit: self.a.st.units_pushed,
                    hashes: vec![stmt.hash],
                    statements: vec![(Bytes::from(name), stmt)],
                }));
                let sql = format!("DEALLOCATE {}", String::from_utf8_lossy(&backend_name));
                Some(super::simple_query(&sql))
            }
        }
    }
}

/// A Query (or a Parse) sluice sent with the client's `EXECUTE name` or `PREPARE name` naming
/// the backend's copy instead: the server's error positions count the characters of the
/// rewritten text.
#[derive(Debug, Clone, Copy)]
pub struct Shift {
    /// The number of the Query's unit (as `units_pushed` counts).
    pub unit: u64,
    /// Characters up to the end of the name: in the text sent, and in the client's.
    pub server: u32,
    pub client: u32,
}

impl Shift {
    /// For `sql` (the client's text, `rest` its part after the name) sent as `keyword` (with
    /// any comments before it), `backend_name` and `rest`.
    fn new(unit: u64, sql: &[u8], rest: &[u8], keyword: &[u8], backend_name: &[u8]) -> Shift {
        let chars = |b: &[u8]| std::str::from_utf8(b).map_or(b.len(), |s| s.chars().count()) as u32;
        Shift {
            unit,
            server: chars(keyword) + backend_name.len() as u32,
            client: chars(&sql[..sql.len() - rest.len()]),
        }
    }
}

/// What a client's `DEALLOCATE` or `DISCARD ALL` made sluice forget, kept until the server
/// answers it: if the server refuses, nothing was dropped.
#[derive(Debug)]
pub struct Dropped {
    /// The number of the Query's unit (as `units_pushed` counts).
    pub unit: u64,
    /// The client's statements by name.
    pub statements: Vec<(Bytes, Arc<Statement>)>,
    /// The statements the backend held.
    pub hashes: Vec<u64>,
}

/// An error answered the Query of the `Dropped` in flight (or its batch failed and the server
/// skipped it): the server dropped nothing, so neither does sluice. Statements the client
/// prepared again since keep their new definitions.
pub(super) fn undrop(a: &mut Attached, statements: &mut Statements) {
    let Some(d) = a.st.dropped.take() else { return };
    a.checkout.conn.conn().prepared.extend(d.hashes);
    for (name, stmt) in d.statements {
        if !statements.contains_key(&name) {
            statements.insert(name, stmt);
        }
    }
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
    fn backend_names_are_found_in_messages() {
        let name = backend_name(0xabc);
        let text = [
            &b"bind message supplies 0 parameters, but prepared statement \"sluice_x\" or \""[..],
            &name,
            b"\" requires 1",
        ]
        .concat();
        assert_eq!(backend_name_in(&text), Some(name));
        assert_eq!(backend_name_in(b"no sluice_ here"), None);
    }
}
