//! The backend side of a session: relays replies to the client, keeps sluice's own replies
//! to itself, and decides when the backend can go back to the pool.

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use sluice_postgres::{peek, peek_message, split_message};
use tracing::{debug, warn};

use super::settings::{self, Settings};
use super::{statements, End, Link, Session};
use crate::config::{Consistency, PoolMode};
use crate::postgres::backend::MAX_BACKEND_MESSAGE;

/// Whose reply the next ReadyForQuery ends.
#[derive(Debug)]
pub enum Unit {
    /// The client's Query or FunctionCall: relayed.
    Client,
    /// The client's Sync: relayed. The server ignores a Sync that arrives during COPY FROM
    /// STDIN, so this one may never be answered (see `copy_in`).
    ClientSync,
    /// Sluice's settings replay: swallowed.
    Replay,
    /// Sluice reading the backend's session settings: rows collected.
    ReadSettings(Vec<(String, String)>),
    /// Sluice reading `pg_current_wal_lsn()` after a write (read-your-writes).
    WalPosition(Option<u64>),
    /// One of sluice's own queries that failed: its result is ignored.
    Failed,
    /// Sluice's Sync ending the client's extended-protocol batch on a replica before the
    /// client's next message, a write, goes to the primary (see `Session::must_wait_for_replica`):
    /// the replies before it are the client's and relayed, its ReadyForQuery is swallowed.
    EndBatch,
}

/// Messages at least this large are streamed to the client instead of buffered whole.
pub const STREAM_ABOVE: usize = 64 * 1024;

/// The total length of a DataRow or CopyData at the front of `buf` that is larger than
/// [`STREAM_ABOVE`] and not complete yet; such messages need no inspection, only relaying.
fn large_relayed_message(buf: &[u8]) -> Option<usize> {
    let header = buf.get(..5)?;
    if !matches!(header[0], b'D' | b'd') {
        return None;
    }
    let len = u32::from_be_bytes(header[1..5].try_into().ok()?) as usize;
    let total = 1 + len;
    ((4..=MAX_BACKEND_MESSAGE).contains(&len) && total > STREAM_ABOVE && buf.len() < total).then_some(total)
}

/// The length of the run of complete messages at the front of `buf` that go to the client
/// untouched, and the transaction status if the run ends with a ReadyForQuery. It stops before
/// a message that needs a closer look: CopyInResponse, an ErrorResponse (it may end the
/// session or name sluice's statement), a ParseComplete/CloseComplete or the answer to a
/// Describe while some may be sluice's own (`fixups_pending`), a ReadyForQuery that is sluice's
/// own (`own_ready`), anything malformed.
fn relayable_run(buf: &[u8], fixups_pending: bool, own_ready: bool) -> (usize, Option<u8>) {
    let mut at = 0;
    while let Some((tag, total)) = peek_message(&buf[at..], MAX_BACKEND_MESSAGE) {
        match tag {
            b'Z' if own_ready => break,
            b'G' | b'E' => break,
            b'1' | b'3' | b't' | b'T' | b'n' if fixups_pending => break,
            b'Z' if total == 6 => return (at + total, Some(buf[at + 5])),
            b'Z' => break,
            _ => at += total,
        }
    }
    (at, None)
}

impl Session {
    /// Handles every complete backend message: relays the client's, consumes sluice's own,
    /// and lets go of the backend when the client's transaction is over.
    pub(super) fn process_backend_messages(&mut self) -> Result<(), End> {
        loop {
            let who = (self.client.addr, &self.cluster.config.name);
            let Some(a) = self.link.attached_mut() else {
                return Ok(());
            };
            let own_unit = !matches!(
                a.st.units.front(),
                None | Some(Unit::Client | Unit::ClientSync | Unit::EndBatch)
            );
            // Sluice's own ReadyForQuery is left to the message-by-message path.
            let ends_batch = matches!(a.st.units.front(), Some(Unit::EndBatch));
            let rbuf = &mut a.checkout.conn.conn().rbuf;
            // The rest of a large row or COPY chunk already being streamed to the client.
            if a.st.streaming > 0 {
                let n = a.st.streaming.min(rbuf.len());
                if n == 0 {
                    return Ok(());
                }
                self.out.get().extend_from_slice(&rbuf.split_to(n));
                a.st.streaming -= n;
                continue;
            }
            if !own_unit {
                // The usual case: complete replies for the client, relayed in one copy up to
                // and including the ReadyForQuery that ends them.
                let (n, ready) = relayable_run(rbuf, a.st.own_answers_pending(), ends_batch);
                if n > 0 {
                    self.out.get().extend_from_slice(&rbuf[..n]);
                    rbuf.advance(n);
                    if let Some(status) = ready {
                        a.st.status = status;
                        a.pop_unit();
                        self.settle();
                        if self.link.attached().is_some_and(|a| a.st.units.is_empty()) {
                            self.request_done();
                        }
                    }
                    continue;
                }
                // A large DataRow or CopyData for the client is relayed as its bytes arrive
                // rather than buffered whole: a session holds at most about STREAM_ABOVE bytes
                // of it.
                if let Some(total) = large_relayed_message(rbuf) {
                    let n = rbuf.len();
                    self.out.get().extend_from_slice(&rbuf.split_to(n));
                    a.st.streaming = total - n;
                    continue;
                }
            }
            let msg = match split_message(rbuf, MAX_BACKEND_MESSAGE) {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(()),
                Err(e) => {
                    let why = format!("invalid message from the server: {e}");
                    return Err(self.backend_lost(&why));
                }
            };
            let tag = msg.tag();
            match a.st.units.front_mut() {
                None | Some(Unit::Client | Unit::ClientSync | Unit::EndBatch) => {
                    match tag {
                        // COPY FROM STDIN started by Execute: the Sync sent with it is ignored
                        // by the server, as is any Sync until CopyDone/CopyFail.
                        b'G' => {
                            let ended = a.st.copy_ended_early.take();
                            let (ended_early, sync_after) = match ended {
                                Some((unit, sync_after)) if unit == a.st.units_done + 1 => (true, sync_after),
                                _ => (false, false),
                            };
                            a.st.copy_in = !ended_early;
                            // A Sync sent before the CopyDone arrived in COPY mode: ignored.
                            if !sync_after && matches!(a.st.units.front(), Some(Unit::ClientSync)) {
                                a.pop_unit();
                            }
                        }
                        // Every ParseComplete/CloseComplete pops its entry; sluice's own are
                        // not relayed.
                        b'1' | b'3' if a.complete_fixup() => continue,
                        // The answer to sluice's own Describe after its Parse: the shape of
                        // the statement's rows, on this backend and, for the client's Parse, as
                        // the client's statement has them.
                        b't' if a.st.describing.is_some() => continue,
                        b'T' | b'n' if a.st.describing.is_some() => {
                            let d = a.st.describing.take().expect("checked");
                            if let Some(shape) = sluice_postgres::backend::row_shape(tag, msg.body()) {
                                a.checkout.conn.conn().shapes.insert(d.hash, shape);
                                if let Some(stmt) = d.client {
                                    let _ = stmt.shape.compare_exchange(
                                        0,
                                        shape,
                                        std::sync::atomic::Ordering::Relaxed,
                                        std::sync::atomic::Ordering::Relaxed,
                                    );
                                }
                            }
                            continue;
                        }
                        b'Z' => {
                            a.st.status = peek::ready_status(msg.body()).unwrap_or(b'I');
                            let failed = a.st.batch_failed;
                            if let Some(Unit::EndBatch) = a.pop_unit() {
                                self.settle();
                                self.batch_ended(failed);
                                continue;
                            }
                            self.out.get().extend_from_slice(msg.raw());
                            self.settle();
                            if self.link.attached().is_some_and(|a| a.st.units.is_empty()) {
                                self.request_done();
                            }
                            continue;
                        }
                        b'E' => {
                            a.st.server_fatal |= peek::error_is_fatal(msg.body());
                            // No ReadyForQuery before it: the error is the open batch's.
                            if matches!(a.st.units.front(), None | Some(Unit::EndBatch)) {
                                a.st.batch_failed = true;
                            } else {
                                a.skip_gated_queries();
                            }
                            // The error is a DEALLOCATE's or DISCARD ALL's (or its batch's,
                            // which made the server skip it).
                            if a.st
                                .dropped
                                .as_ref()
                                .is_some_and(|d| d.unit <= a.st.units_done + 1)
                            {
                                statements::undrop(a, &mut self.statements);
                            }
                            if self.cluster.pg.write_hold.is_some()
                                && a.checkout.role == crate::common::topology::Role::Primary
                            {
                                // A primary turning read-only or shutting down: hold writes.
                                let code = peek::error_code_and_message(msg.body()).0;
                                self.cluster.write_refused(a.checkout.conn.node(), &code);
                            }
                            // sluice's stand-in for a Bind whose statement now returns other
                            // rows (`statements::PLAN_CHANGED`): PostgreSQL's error for it.
                            if msg
                                .body()
                                .windows(statements::PLAN_CHANGED.len())
                                .any(|w| w == statements::PLAN_CHANGED)
                            {
                                sluice_postgres::server::cached_plan_changed(self.out.get());
                                continue;
                            }
                            // An error in a Query sluice rewrote points into the client's text.
                            let mut shifted = BytesMut::new();
                            if let Some(s) = a.st.shift.filter(|s| s.unit == a.st.units_done + 1) {
                                peek::encode_error_shifted(
                                    &mut shifted,
                                    b'E',
                                    msg.body(),
                                    s.server,
                                    s.client,
                                );
                            }
                            let body = shifted.get(5..).unwrap_or(msg.body());
                            // An error that names sluice's statement (a duplicate Parse, a
                            // Bind with the wrong parameter count, ...) names the client's.
                            if let Some(from) = statements::backend_name_in(body) {
                                let duplicate = peek::error_code_and_message(body).0 == "42P05";
                                let to =
                                    a.st.renames
                                        .iter()
                                        .find(|(f, _, dup)| *f == from && *dup == duplicate)
                                        .or_else(|| a.st.renames.iter().find(|(f, _, _)| *f == from))
                                        .map(|(_, to, _)| to.clone())
                                        .or_else(|| {
                                            self.statements
                                                .iter()
                                                .find(|(_, st)| st.backend_name() == from)
                                                .map(|(name, _)| name.clone())
                                        });
                                if let Some(to) = to {
                                    let quoted = |n: &[u8]| [&b"\""[..], n, b"\""].concat();
                                    peek::encode_error_renamed(
                                        self.out.get(),
                                        b'E',
                                        body,
                                        &quoted(&from),
                                        &quoted(&to),
                                    );
                                    continue;
                                }
                            }
                            if !shifted.is_empty() {
                                self.out.get().extend_from_slice(&shifted);
                                continue;
                            }
                        }
                        _ => {}
                    }
                    self.out.get().extend_from_slice(msg.raw());
                }
                Some(unit) => {
                    match (tag, unit) {
                        (b'D', Unit::ReadSettings(rows)) => {
                            if let Some(row) = sluice_postgres::backend::data_row(msg.body()) {
                                if let [Some(name), Some(value)] = row.as_slice() {
                                    rows.push((name.clone(), value.clone()));
                                }
                            }
                        }
                        (b'D', Unit::WalPosition(lsn)) => {
                            *lsn = sluice_postgres::backend::data_row(msg.body())
                                .and_then(|r| r.into_iter().next().flatten())
                                .and_then(|v| crate::postgres::cluster::parse_lsn(&v));
                        }
                        (b'E', own) => {
                            let (code, message) = peek::error_code_and_message(msg.body());
                            let span = super::client_span(&who.0.get(), who.1);
                            warn!(parent: &span, %code, %message, "sluice's own query on the backend failed");
                            if matches!(own, Unit::ReadSettings(_)) {
                                *own = Unit::Failed;
                            } else if matches!(own, Unit::Replay) {
                                // The backend's settings are now unknown: it must not serve
                                // anyone again, and the client should know its settings did
                                // not apply.
                                a.checkout.conn.discard();
                                let note = format!(
                                    "sluice: could not apply the session's settings on this connection: {message}"
                                );
                                super::error_with(self.out.get(), "WARNING", "01000", &note);
                            }
                        }
                        (b'Z', _) => {
                            a.st.status = peek::ready_status(msg.body()).unwrap_or(b'I');
                            let done = a.pop_unit().expect("front exists");
                            self.settle();
                            self.finish_own_query(done);
                        }
                        _ => {}
                    }
                    continue;
                }
            }
        }
    }

    /// Applies what one of sluice's own queries returned.
    fn finish_own_query(&mut self, unit: Unit) {
        match unit {
            Unit::ReadSettings(rows) => {
                let s: Settings = Arc::new(rows);
                debug!(parent: &self.span(), settings = s.len(), "session settings captured");
                if let Some(a) = self.link.attached_mut() {
                    a.checkout.conn.conn().settings = s.clone();
                }
                self.settings = s;
            }
            Unit::WalPosition(Some(lsn)) => {
                let min = &mut self.rare().min_lsn;
                *min = Some(min.map_or(lsn, |m| m.max(lsn)));
            }
            Unit::WalPosition(None)
            | Unit::Replay
            | Unit::Client
            | Unit::ClientSync
            | Unit::Failed
            | Unit::EndBatch => {}
        }
        if self.link.attached().is_some_and(|a| a.st.units.is_empty()) {
            self.request_done();
        }
    }

    /// Sluice's Sync ended the client's batch on a replica (`Unit::EndBatch`): the backend goes,
    /// and the held message is routed anew. After an error in the batch the server would have
    /// skipped the client's messages up to its Sync: sluice does, and answers that Sync.
    fn batch_ended(&mut self, failed: bool) {
        if !failed {
            return self.request_done();
        }
        self.detach();
        self.link = Link::FailedUntilSync;
    }

    /// Everything sent has been answered. Reads settings or the WAL position if the request
    /// needs it, else returns the backend to the pool (transaction mode, nothing pinned).
    fn request_done(&mut self) {
        if self.cluster.pg.pool_mode == PoolMode::Session {
            return; // the backend is the client's for the whole session: nothing to carry over
        }
        let ryw = self.cluster.pg.consistency == Consistency::ReadYourWrites;
        let on_primary = self.attached_to_primary();
        let Some(a) = self.link.attached_mut() else { return };
        if a.st.status != b'I' || a.st.in_batch || a.st.own_answers_pending() {
            // A transaction or an extended-protocol batch is still open, or answers to sluice's
            // own Parse/Describe (sent ahead of a held Bind, see `awaits_shape`) are still to
            // come: the backend stays.
            return;
        }
        a.st.renames.clear();
        if a.st.settings_dirty {
            a.st.settings_dirty = false;
            let sql = settings::read_settings_sql(self.rare.as_ref().map_or(&[], |r| &r.custom_settings));
            a.own_query(self.to_backend.get(), &sql, Unit::ReadSettings(Vec::new()));
            return;
        }
        if a.st.wrote && ryw && on_primary {
            a.st.wrote = false;
            // The insert position: with synchronous_commit = off the commit record may not be
            // written yet, so pg_current_wal_lsn() can be behind it.
            let sql = "SELECT pg_catalog.pg_current_wal_insert_lsn()";
            a.own_query(self.to_backend.get(), sql, Unit::WalPosition(None));
            return;
        }
        if self.pinned.is_none() {
            self.park();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn relayed_runs_end_at_ready_for_query_and_stop_before_special_messages() {
        let (t, d, c, z) = (
            msg(b'T', b"desc"),
            msg(b'D', b"row"),
            msg(b'C', b"SELECT 1\0"),
            msg(b'Z', b"T"),
        );
        let reply = [t.clone(), d.clone(), c.clone(), z.clone()].concat();
        let next = [reply.clone(), d.clone()].concat();
        assert_eq!(relayable_run(&next, false, false), (reply.len(), Some(b'T')));
        let partial = [t.clone(), d[..4].to_vec()].concat();
        assert_eq!(
            relayable_run(&partial, false, false),
            (t.len(), None),
            "incomplete: stops before"
        );
        let parsed = [msg(b'1', b""), z.clone()].concat();
        assert_eq!(
            relayable_run(&parsed, true, false),
            (0, None),
            "may be sluice's own"
        );
        assert_eq!(relayable_run(&parsed, false, false), (parsed.len(), Some(b'T')));
        assert_eq!(
            relayable_run(&next, false, true),
            (reply.len() - z.len(), None),
            "sluice's own ReadyForQuery: stops before"
        );
        let copy_in = [d.clone(), msg(b'G', b"\0\0\0")].concat();
        assert_eq!(relayable_run(&copy_in, false, false), (d.len(), None));
        assert_eq!(
            relayable_run(&msg(b'Z', b"II"), false, false),
            (0, None),
            "malformed: slow path"
        );
        assert_eq!(
            relayable_run(&[b'D', 0, 0, 0, 1, 0], false, false),
            (0, None),
            "bad length"
        );
    }

    #[test]
    fn only_large_incomplete_rows_and_copy_data_stream() {
        let header = |tag: u8, len: u32| {
            let mut v = vec![tag];
            v.extend_from_slice(&len.to_be_bytes());
            v
        };
        assert_eq!(large_relayed_message(&header(b'D', 100_000)), Some(100_001));
        assert_eq!(large_relayed_message(&header(b'd', 100_000)), Some(100_001));
        assert_eq!(
            large_relayed_message(&header(b'D', 1000)),
            None,
            "small: framed as usual"
        );
        assert_eq!(
            large_relayed_message(&header(b'T', 100_000)),
            None,
            "inspected tags are framed"
        );
        assert_eq!(
            large_relayed_message(&header(b'D', u32::MAX)),
            None,
            "over the cap: framing errors"
        );
        assert_eq!(large_relayed_message(&[b'D', 0]), None);
    }
}
