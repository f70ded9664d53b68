//! The backend a session holds for its requests, and the bookkeeping of what is in flight on
//! it, kept in boxes reused per thread.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use super::replies::Unit;
use super::statements::{self, BackendName, Pending};
use crate::postgres::cluster::Checkout;

/// The backend a client holds right now.
pub(super) struct Attached {
    pub(super) checkout: Checkout,
    /// What is in flight on it.
    pub(super) st: InFlightBox,
}

/// The bookkeeping of a client's requests on its attached backend. It lives in a box that is
/// reused per thread (see `InFlightBox`): an idle session carries none of it, and a transaction
/// allocates nothing for it (its queues keep their capacity from one use to the next).
pub(super) struct InFlight {
    /// One entry per ReadyForQuery still to come, in order, saying whose it is.
    pub(super) units: VecDeque<Unit>,
    /// Extended-protocol messages forwarded since the last Sync.
    pub(super) in_batch: bool,
    /// The server reported an error in the batch now open: it skips the client's messages up
    /// to the Sync.
    pub(super) batch_failed: bool,
    /// Responses (ParseComplete/CloseComplete) still to come, and whether each is sluice's own.
    pub(super) fixups: VecDeque<Pending>,
    /// The answer (ParameterDescription, then RowDescription or NoData) to sluice's own
    /// Describe that comes next, swallowed: whose shape it reports.
    pub(super) describing: Option<statements::Describe>,
    /// Statements sluice prepared afresh ahead of a held Bind (see `awaits_shape`): their
    /// shape is the text's now, and is not prepared again for this client.
    pub(super) reprepared: Vec<u64>,
    /// The client's unnamed statement is known to this backend (parsed since attaching).
    pub(super) unnamed_ready: bool,
    /// The transaction status of the last ReadyForQuery (b'I' idle, b'T' in a transaction,
    /// b'E' in a failed transaction).
    pub(super) status: u8,
    /// A request since the last settings capture ran SET, RESET or DISCARD.
    pub(super) settings_dirty: bool,
    /// A write ran since the last WAL position capture (read-your-writes).
    pub(super) wrote: bool,
    /// The server is in COPY FROM STDIN mode (until the client's CopyDone or CopyFail).
    pub(super) copy_in: bool,
    /// A CopyDone/CopyFail the client sent before the server's CopyInResponse arrived (drivers
    /// send the data right behind the COPY): the number of the unit whose reply the COPY is part
    /// of, and whether the batch's Sync came after it. That COPY is over when the response
    /// arrives; a COPY that failed before copying never answers, and its entry goes stale.
    pub(super) copy_ended_early: Option<(u64, bool)>,
    /// Bytes of a large message still to relay as they arrive (see `replies.rs`).
    pub(super) streaming: usize,
    /// Units ever queued and answered: a Parse or Close belongs to the batch that the next
    /// unit queued after it ends (see `Pending::batch`).
    pub(super) units_pushed: u64,
    pub(super) units_done: u64,
    /// Backend statement names to show as the client's names in errors of this batch, and
    /// whether each came from a Parse of an existing name (a 42P05 error is about that Parse,
    /// whatever Binds of the same statement were sent before it).
    pub(super) renames: Vec<(BackendName, Bytes, bool)>,
    /// The server sent a FATAL error: it ends the session, and the client has it.
    pub(super) server_fatal: bool,
    /// What a `DEALLOCATE` or `DISCARD ALL` in flight made sluice forget.
    pub(super) dropped: Option<Box<statements::Dropped>>,
    /// A Query (or a Parse) in flight that sluice rewrote to name the backend's copy of a
    /// statement.
    pub(super) shift: Option<statements::Shift>,
}

impl Default for InFlight {
    fn default() -> InFlight {
        InFlight {
            units: VecDeque::new(),
            in_batch: false,
            batch_failed: false,
            fixups: VecDeque::new(),
            describing: None,
            reprepared: Vec::new(),
            unnamed_ready: false,
            status: b'I',
            settings_dirty: false,
            wrote: false,
            copy_in: false,
            copy_ended_early: None,
            streaming: 0,
            units_pushed: 0,
            units_done: 0,
            renames: Vec::new(),
            server_fatal: false,
            dropped: None,
            shift: None,
        }
    }
}

impl InFlight {
    /// Answers to a Parse, Close or Describe are still to come.
    pub(super) fn own_answers_pending(&self) -> bool {
        !self.fixups.is_empty() || self.describing.is_some()
    }

    /// As new, keeping the queues' memory unless a long pipeline made them large.
    fn reset(&mut self) {
        const KEEP: usize = 64;
        let (units, fixups, renames) = (
            std::mem::take(&mut self.units),
            std::mem::take(&mut self.fixups),
            std::mem::take(&mut self.renames),
        );
        *self = InFlight::default();
        let keep = |c: usize| c <= KEEP;
        if keep(units.capacity()) {
            self.units = units;
            self.units.clear();
        }
        if keep(fixups.capacity()) {
            self.fixups = fixups;
            self.fixups.clear();
        }
        if keep(renames.capacity()) {
            self.renames = renames;
            self.renames.clear();
        }
    }
}

/// An [`InFlight`] box, from and back to its thread's spares. Hand-written (a few lines, as
/// `common::buffers`): a per-thread free list, which stays right when each core runs its own
/// runtime.
pub(super) struct InFlightBox(Option<Box<InFlight>>);

thread_local! {
    // Boxes on purpose: the box itself is what a session takes and gives back.
    #[allow(clippy::vec_box)]
    static SPARE_IN_FLIGHT: std::cell::RefCell<Vec<Box<InFlight>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl InFlightBox {
    pub(super) fn take() -> InFlightBox {
        let spare = SPARE_IN_FLIGHT.try_with(|s| s.borrow_mut().pop()).ok().flatten();
        InFlightBox(Some(spare.unwrap_or_default()))
    }
}

impl Drop for InFlightBox {
    fn drop(&mut self) {
        if let Some(mut b) = self.0.take() {
            b.reset();
            // Not during the thread's exit (its spares are gone): the box is freed.
            let _ = SPARE_IN_FLIGHT.try_with(|s| {
                let mut s = s.borrow_mut();
                if s.len() < 256 {
                    s.push(b);
                }
            });
        }
    }
}

impl std::ops::Deref for InFlightBox {
    type Target = InFlight;

    fn deref(&self) -> &InFlight {
        self.0.as_deref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for InFlightBox {
    fn deref_mut(&mut self) -> &mut InFlight {
        self.0.as_deref_mut().expect("present until dropped")
    }
}

impl Attached {
    /// Queues the owner of the next ReadyForQuery still to come.
    pub(super) fn push_unit(&mut self, unit: Unit) {
        self.st.units.push_back(unit);
        self.st.units_pushed += 1;
    }

    /// A ReadyForQuery arrived (or, for a Sync sent during COPY FROM STDIN, will not): whose it
    /// is. No batch is open on the server after it.
    pub(super) fn pop_unit(&mut self) -> Option<Unit> {
        self.st.batch_failed = false;
        let unit = self.st.units.pop_front();
        self.st.units_done += u64::from(unit.is_some());
        unit
    }

    /// An error arrived while a Query or FunctionCall sent in an open batch waits for its
    /// answer, before the answer to sluice's gate ahead of it (`statements::QUERY_GATE`): the
    /// error is the batch's, and the server skips the Query, and everything else up to the
    /// client's Sync. Their units are done, unanswered.
    pub(super) fn skip_gated_queries(&mut self) {
        let next = self.st.units_done;
        let gated = matches!(self.st.units.front(), Some(Unit::Client))
            && self.st.fixups.iter().any(|p| p.gate && p.batch == next);
        if !gated {
            return;
        }
        while matches!(self.st.units.front(), Some(Unit::Client)) {
            self.st.units.pop_front();
            self.st.units_done += 1;
        }
        if self.st.units.is_empty() {
            // No Sync yet: the batch stays open (and failed) until the client sends one.
            self.st.in_batch = true;
            self.st.batch_failed = true;
        }
    }

    /// Sends one of sluice's own simple queries (`sql`) ahead of what follows in `to_backend`;
    /// `unit` owns its ReadyForQuery. Like any simple Query it drops the backend's unnamed
    /// statement: the client's is parsed there again if it is bound again.
    pub(super) fn own_query(&mut self, to_backend: &mut BytesMut, sql: &str, unit: Unit) {
        to_backend.extend_from_slice(&super::simple_query(sql));
        self.st.unnamed_ready = false;
        self.push_unit(unit);
    }

    /// Expects a ParseComplete or CloseComplete for a Parse or Close sent now.
    pub(super) fn push_fixup(
        &mut self,
        swallow: bool,
        backend: statements::BackendChange,
        client: statements::ClientChange,
    ) {
        let batch = self.st.units_pushed;
        self.st.fixups.push_back(Pending {
            swallow,
            backend,
            client,
            batch,
            alone: false,
            marker: false,
            describe: None,
            gate: false,
        });
    }

    /// A ParseComplete or CloseComplete arrived: its entry is done. Returns whether sluice sent
    /// the message (the reply is not relayed).
    pub(super) fn complete_fixup(&mut self) -> bool {
        let Some(p) = self.st.fixups.pop_front() else {
            return false;
        };
        // sluice's own Describe after this Parse answers next.
        self.st.describing = p.describe;
        if p.marker {
            if let Some(next) = self.st.fixups.front_mut() {
                next.alone = true;
            }
        }
        p.swallow
    }

    /// Whether sluice's own Describe of the statement `hash` is still to be answered.
    pub(super) fn describe_pending(&self, hash: u64) -> bool {
        self.st.describing.as_ref().is_some_and(|d| d.hash == hash)
            || self
                .st
                .fixups
                .iter()
                .any(|p| p.describe.as_ref().is_some_and(|d| d.hash == hash))
    }

    /// Nothing in flight and no transaction open: the connection may serve someone else.
    pub(super) fn is_clean(&self) -> bool {
        !self.st.own_answers_pending()
            && self.st.units.is_empty()
            && !self.st.in_batch
            && !self.st.copy_in
            && self.st.streaming == 0
            && self.st.status == b'I'
    }
}
