//! The console's pause gate in a session: each transaction is counted in flight from its
//! first message to the ReadyForQuery that ends it, and held while its database is paused.

use super::{Attached, Link, Session};
use crate::postgres::cluster::AttachError;
use tracing::debug;

impl Session {
    /// Marks the client's next transaction in flight, holding it while the console has its
    /// database paused (up to `pause_timeout`; a CancelRequest gives up the wait).
    pub(super) async fn start_transaction(&mut self) -> Result<(), AttachError> {
        match self.try_start_transaction() {
            Some(now) => Box::pin(self.wait_for_resume(now)).await,
            None => Ok(()),
        }
    }

    /// Marks the client's next transaction in flight unless its database is paused; then
    /// returns the time (for `wait_for_resume`).
    fn try_start_transaction(&mut self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let info = &self.client;
        let now = crate::postgres::activity::now_micros();
        info.request_time
            .store(crate::postgres::activity::secs(now), Relaxed);
        if let Some(busy) = self.cluster.console.try_enter(&self.db) {
            info.active.store(true, Relaxed);
            self.busy = Some(busy);
            return None;
        }
        Some(now)
    }

    /// The paused case of `start_transaction`: boxed by it, as it is rare and its future
    /// large, which would otherwise be part of every session's.
    async fn wait_for_resume(&mut self, now: u64) -> Result<(), AttachError> {
        use std::sync::atomic::Ordering::Relaxed;
        debug!(parent: &self.span(), database = %self.db.name, "transaction held: the database is paused");
        self.client.wait_since.store(now, Relaxed);
        // A parked backend goes back while the client waits: PAUSE closes the database's
        // connections, and other clients may need the slot.
        self.release_parked();
        let info = &self.client;
        let woken = info.cancel.queue().await;
        let started = std::time::Instant::now();
        let result = tokio::select! {
            biased;
            r = self.cluster.console.enter(&self.db) => r.map_err(AttachError::from),
            () = woken => Err(AttachError::Cancelled),
        };
        info.wait_since.store(0, Relaxed);
        let waited = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.db.totals.wait_us.fetch_add(waited, Relaxed);
        let busy = result?;
        info.active.store(true, Relaxed);
        self.busy = Some(busy);
        Ok(())
    }

    /// Ends the client's transaction in flight once it is over: no backend held, or the held
    /// one idle with nothing in flight.
    pub(super) fn end_transaction_if_done(&mut self) {
        if self.busy.is_some() && self.link.attached().is_none_or(Attached::is_clean) {
            self.busy = None;
            self.client
                .active
                .store(false, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// A backend for the client's next request, counted in the database's totals (`SHOW
    /// STATS`): the parked one when the router chooses its node (no wait), else
    /// `attach_waiting`, boxed: its future is large and only a pool checkout needs it.
    pub(super) async fn attach_counted(
        &mut self,
        intent: crate::postgres::router::Intent,
    ) -> Result<crate::postgres::cluster::Checkout, AttachError> {
        if let Link::Parked(_) = self.link {
            let mut parked = self.link.take_parked();
            let resumed = self.cluster.resume_parked(intent, self.min_lsn(), &mut parked);
            if let Some(p) = parked {
                self.link = Link::Parked(p);
            }
            if let Some(checkout) = resumed {
                let totals = &self.db.totals;
                totals
                    .assignments
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(checkout);
            }
        }
        Box::pin(self.attach_waiting(intent)).await
    }

    /// `attach_cancellable`, shown as waiting (`SHOW POOLS` cl_waiting) meanwhile and counted
    /// in the database's totals (`SHOW STATS`).
    async fn attach_waiting(
        &mut self,
        intent: crate::postgres::router::Intent,
    ) -> Result<crate::postgres::cluster::Checkout, AttachError> {
        use std::sync::atomic::Ordering::Relaxed;
        let started = std::time::Instant::now();
        self.client
            .wait_since
            .store(crate::postgres::activity::now_micros(), Relaxed);
        let attached = self.attach_cancellable(intent).await;
        self.client.wait_since.store(0, Relaxed);
        let totals = &self.db.totals;
        let waited = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        totals.wait_us.fetch_add(waited, Relaxed);
        if attached.is_ok() {
            totals.assignments.fetch_add(1, Relaxed);
        }
        attached
    }
}
