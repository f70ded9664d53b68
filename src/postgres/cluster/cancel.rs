//! Where a cancel request with a client's key goes. The keys themselves are chosen when a
//! client is listed (`Activity::register`), and found there by a cancel request.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

/// Where a cancel request for one client must go right now.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    /// The node's address (shared with its pool: no allocation per request; a thin pointer,
    /// as every client record holds one of these).
    pub addr: Arc<String>,
    pub pid: i32,
    pub secret: i32,
}

/// Where a cancel request with one client's key goes: the backend running its query, or —
/// while the query still waits for a backend — the session itself, which then gives up the
/// wait and answers 57014 as PostgreSQL would.
///
/// One lock around both (40 bytes; it was 72 with a `Notify` and a flag beside the lock):
/// the waiting session's waker is the flag that it waits, and a cancel request takes it.
#[derive(Default)]
pub struct CancelState(Mutex<Slot>);

#[derive(Default)]
struct Slot {
    target: Option<CancelTarget>,
    /// Set while the client's request waits for a backend (see [`CancelState::queue`]).
    waiter: Option<Waker>,
}

/// What a cancel request found.
pub enum Cancel {
    /// A backend runs the client's query: the request goes there.
    Forward(CancelTarget),
    /// The query waited for a backend, and its wait has been given up.
    Dequeued,
    /// The client has nothing running.
    Idle,
}

impl CancelState {
    fn slot(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.0.lock().expect("cancel slot lock")
    }

    /// Points cancel requests at this backend (or at none).
    pub fn set(&self, target: Option<CancelTarget>) {
        // The guard is a temporary of this statement: the old target's `Arc` is let go of
        // after the lock.
        let old = std::mem::replace(&mut self.slot().target, target);
        drop(old);
    }

    /// Marks the client's request as waiting for a backend until the returned future is
    /// dropped; it completes when a cancel request gives the wait up. The calling task's
    /// waker is registered at once, so that a cancel request that comes before the future is
    /// first polled is not missed.
    pub async fn queue(&self) -> Queued<'_> {
        let waker = std::future::poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
        self.slot().waiter = Some(waker);
        Queued(self)
    }

    /// Acts on a cancel request for this client.
    pub fn cancel(&self) -> Cancel {
        let mut slot = self.slot();
        if let Some(t) = &slot.target {
            return Cancel::Forward(t.clone());
        }
        match slot.waiter.take() {
            Some(w) => {
                drop(slot);
                w.wake();
                Cancel::Dequeued
            }
            None => Cancel::Idle,
        }
    }
}

/// A request waiting for a backend (see [`CancelState::queue`]).
pub struct Queued<'a>(&'a CancelState);

impl Future for Queued<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut slot = self.0.slot();
        match &mut slot.waiter {
            // Taken by a cancel request.
            None => Poll::Ready(()),
            Some(w) => {
                w.clone_from(cx.waker());
                Poll::Pending
            }
        }
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.slot().waiter = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> CancelTarget {
        CancelTarget {
            addr: Arc::new("127.0.0.1:5432".to_string()),
            pid: 7,
            secret: 9,
        }
    }

    #[tokio::test]
    async fn a_cancel_gives_up_a_wait_and_only_that() {
        let state = CancelState::default();
        assert!(matches!(state.cancel(), Cancel::Idle));
        // Queued before the first poll: a cancel between `queue` and the poll is not lost.
        let mut queued = Box::pin(state.queue().await);
        assert!(matches!(state.cancel(), Cancel::Dequeued));
        assert!(futures_util::poll!(queued.as_mut()).is_ready());
        drop(queued);
        // Polled first, then cancelled.
        let mut queued = Box::pin(state.queue().await);
        assert!(futures_util::poll!(queued.as_mut()).is_pending());
        assert!(matches!(state.cancel(), Cancel::Dequeued));
        assert!(futures_util::poll!(queued.as_mut()).is_ready());
        drop(queued);
        // The wait is over: a later cancel finds nothing to give up.
        assert!(matches!(state.cancel(), Cancel::Idle));
        // A wait that ends without a cancel unmarks itself.
        let queued = Box::pin(state.queue().await);
        drop(queued);
        assert!(matches!(state.cancel(), Cancel::Idle));
        state.set(Some(target()));
        assert!(matches!(state.cancel(), Cancel::Forward(t) if t.pid == 7 && t.secret == 9));
        state.set(None);
        assert!(matches!(state.cancel(), Cancel::Idle));
    }

    #[test]
    fn the_state_is_small() {
        // Every client record holds one (see `ClientInfo`).
        assert!(std::mem::size_of::<CancelState>() <= 40);
    }
}
