//! The backend side of a session: relays replies to the client, keeps sluice's own replies
//! to itself, and decides when the backend can go back to the pool.

use std::sync::Arc;

use sluice_postgres::{peek, split_message};
use tracing::{debug, warn};

use super::settings::{self, Settings};
use super::{simple_query, statements, End, Session};
use crate::backend::MAX_BACKEND_MESSAGE;
use crate::config::{Consistency, PoolMode};

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

impl Session {
    /// Handles every complete backend message: relays the client's, consumes sluice's own,
    /// and returns the backend when the client's transaction is over.
    pub(super) fn process_backend_messages(&mut self) -> Result<(), End> {
        loop {
            let Some(a) = self.attached.as_mut() else {
                return Ok(());
            };
            let own_unit = !matches!(a.units.front(), None | Some(Unit::Client | Unit::ClientSync));
            let rbuf = &mut a.checkout.conn.conn().rbuf;
            // The rest of a large row or COPY chunk already being streamed to the client.
            if a.streaming > 0 {
                let n = a.streaming.min(rbuf.len());
                if n == 0 {
                    return Ok(());
                }
                self.out.extend_from_slice(&rbuf.split_to(n));
                a.streaming -= n;
                continue;
            }
            // A large DataRow or CopyData for the client is relayed as its bytes arrive rather
            // than buffered whole: a session holds at most about STREAM_ABOVE bytes of it.
            if !own_unit {
                if let Some(total) = large_relayed_message(rbuf) {
                    let n = rbuf.len();
                    self.out.extend_from_slice(&rbuf.split_to(n));
                    a.streaming = total - n;
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
            match a.units.front_mut() {
                None | Some(Unit::Client | Unit::ClientSync) => {
                    match tag {
                        // COPY FROM STDIN started by Execute: the Sync sent with it is ignored
                        // by the server, as is any Sync until CopyDone/CopyFail.
                        b'G' => {
                            a.copy_in = true;
                            if matches!(a.units.front(), Some(Unit::ClientSync)) {
                                a.units.pop_front();
                            }
                        }
                        // Every ParseComplete/CloseComplete pops its entry; sluice's own are
                        // not relayed.
                        b'1' | b'3' if a.fixups.pop_front().is_some_and(|p| p.swallow) => continue,
                        b'Z' => {
                            a.status = peek::ready_status(msg.body()).unwrap_or(b'I');
                            a.units.pop_front();
                        }
                        _ => {}
                    }
                    self.out.extend_from_slice(msg.raw());
                }
                Some(unit) => {
                    match (tag, unit) {
                        (b'D', Unit::ReadSettings(rows)) => {
                            if let Some(row) = crate::backend::data_row(msg.body()) {
                                if let [Some(name), Some(value)] = row.as_slice() {
                                    rows.push((name.clone(), value.clone()));
                                }
                            }
                        }
                        (b'D', Unit::WalPosition(lsn)) => {
                            *lsn = crate::backend::data_row(msg.body())
                                .and_then(|r| r.into_iter().next().flatten())
                                .and_then(|v| crate::cluster::parse_lsn(&v));
                        }
                        (b'E', own) => {
                            let (code, message) = peek::error_code_and_message(msg.body());
                            warn!(%code, %message, "sluice's own query on the backend failed");
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
                                super::error_with(&mut self.out, "WARNING", "01000", &note);
                            }
                        }
                        (b'Z', _) => {
                            a.status = peek::ready_status(msg.body()).unwrap_or(b'I');
                            let done = a.units.pop_front().expect("front exists");
                            self.finish_own_query(done);
                        }
                        _ => {}
                    }
                    continue;
                }
            }
            if tag == b'Z' && self.attached.as_ref().is_some_and(|a| a.units.is_empty()) {
                self.request_done();
            }
        }
    }

    /// Applies what one of sluice's own queries returned.
    fn finish_own_query(&mut self, unit: Unit) {
        match unit {
            Unit::ReadSettings(rows) => {
                let s: Settings = Arc::new(rows);
                debug!(settings = s.len(), "session settings captured");
                if let Some(a) = self.attached.as_mut() {
                    a.checkout.conn.conn().settings = s.clone();
                }
                self.settings = s;
            }
            Unit::WalPosition(Some(lsn)) => self.min_lsn = Some(self.min_lsn.map_or(lsn, |m| m.max(lsn))),
            Unit::WalPosition(None) | Unit::Replay | Unit::Client | Unit::ClientSync | Unit::Failed => {}
        }
        if self.attached.as_ref().is_some_and(|a| a.units.is_empty()) {
            self.request_done();
        }
    }

    /// Everything sent has been answered. Reads settings or the WAL position if the request
    /// needs it, else returns the backend to the pool (transaction mode, nothing pinned).
    fn request_done(&mut self) {
        let ryw = self.cluster.config.consistency == Consistency::ReadYourWrites;
        let on_primary = self.attached_to_primary();
        let Some(a) = self.attached.as_mut() else { return };
        statements::settle(&mut a.fixups, &mut a.checkout.conn.conn().prepared);
        if a.status != b'I' || a.in_batch {
            return; // a transaction or an extended-protocol batch is still open
        }
        if a.settings_dirty {
            a.settings_dirty = false;
            self.to_backend
                .extend_from_slice(&simple_query(settings::READ_SETTINGS));
            a.units.push_back(Unit::ReadSettings(Vec::new()));
            return;
        }
        if a.wrote && ryw && on_primary {
            a.wrote = false;
            self.to_backend
                .extend_from_slice(&simple_query("SELECT pg_catalog.pg_current_wal_lsn()"));
            a.units.push_back(Unit::WalPosition(None));
            return;
        }
        if self.cluster.config.pool_mode == PoolMode::Transaction && self.pinned.is_none() {
            self.detach();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
