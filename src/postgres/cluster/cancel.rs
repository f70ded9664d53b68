//! Cancel keys: the keys sluice hands to its clients and where a cancel request with one goes.

use super::*;

/// Where a cancel request for one client must go right now.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    /// The node's address (shared with its pool: no allocation per request).
    pub addr: Arc<str>,
    pub pid: i32,
    pub secret: i32,
}

/// Where a cancel request with one client's key goes: the backend running its query, or —
/// while the query still waits for a backend — the session itself, which then gives up the
/// wait and answers 57014 as PostgreSQL would.
#[derive(Default)]
pub struct CancelState {
    target: Mutex<Option<CancelTarget>>,
    /// The client's request waits for a backend.
    queued: std::sync::atomic::AtomicBool,
    /// Wakes that wait.
    pub wake: tokio::sync::Notify,
}

impl CancelState {
    /// Points cancel requests at this backend (or at none).
    pub fn set(&self, target: Option<CancelTarget>) {
        *self.target.lock().expect("cancel slot lock") = target;
    }

    /// The backend running the client's query, if any.
    pub fn target(&self) -> Option<CancelTarget> {
        self.target.lock().expect("cancel slot lock").clone()
    }

    /// Marks the client's request as waiting for a backend (or not any more).
    pub fn set_queued(&self, queued: bool) {
        self.queued.store(queued, Ordering::SeqCst);
    }

    /// Whether the client's request waits for a backend.
    pub fn queued(&self) -> bool {
        self.queued.load(Ordering::SeqCst)
    }
}

/// A client's cancel state, reached by its cancel key: the client's own record (one
/// allocation per client for both the console's list and the cancel keys).
pub type CancelSlot = Arc<crate::postgres::activity::ClientInfo>;

impl Cluster {
    /// Registers `key` for a new client, unless another client holds it (keys of backends
    /// on different servers may coincide).
    pub fn try_register_cancel(&self, key: (i32, i32), client: &CancelSlot) -> Option<(i32, i32)> {
        let mut cancels = self.cancels.lock().expect("cancel lock");
        match cancels.entry(key) {
            std::collections::hash_map::Entry::Occupied(_) => None,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(client.clone());
                Some(key)
            }
        }
    }

    /// Registers a new random cancel key for a new client.
    pub fn register_random_cancel(&self, client: &CancelSlot) -> (i32, i32) {
        use rand::Rng;
        loop {
            let key = {
                let mut rng = rand::rng();
                (rng.random::<i32>() & 0x7fff_ffff, rng.random::<i32>())
            };
            if let Some(registered) = self.try_register_cancel(key, client) {
                return registered;
            }
        }
    }

    /// Forgets a client's cancel key.
    pub fn unregister_cancel(&self, key: (i32, i32)) {
        self.cancels.lock().expect("cancel lock").remove(&key);
    }

    /// The cancel state of the client with this key, if it is connected.
    pub fn cancel_slot(&self, key: (i32, i32)) -> Option<CancelSlot> {
        self.cancels.lock().expect("cancel lock").get(&key).cloned()
    }
}
