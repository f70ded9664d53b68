//! Choosing a node and a backend for a request: the attach loop (router choice, parked
//! backend reuse, pool checkout, waiting for a primary or through a write hold) and the write
//! hold's bookkeeping.

use super::*;

/// Why a request could not get a backend.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("sluice: no primary is available in cluster {cluster:?} (waited {waited:?})")]
    NoPrimary { cluster: String, waited: Duration },
    #[error("sluice: no healthy node is available in cluster {cluster:?} (waited {waited:?})")]
    NoNode { cluster: String, waited: Duration },
    #[error("sluice: {0}")]
    Pool(#[from] PoolError),
    /// The client cancelled the request while it waited (CancelRequest).
    #[error("canceling statement due to user request")]
    Cancelled,
    /// The database stayed paused (console `PAUSE`) past `pause_timeout`.
    #[error(transparent)]
    Paused(#[from] crate::admin::console::PausedError),
}

/// A backend checked out for one client, with the node's load counted while it serves
/// requests (not while parked between transactions).
pub struct Checkout {
    pub conn: Pooled,
    /// The node's role when it was chosen.
    pub role: Role,
    load: Arc<InFlight>,
    parked: bool,
}

impl Checkout {
    /// The client's transaction is over and its session keeps this backend for the next one
    /// while nobody else needs it: the node's load no longer counts it.
    pub fn park(&mut self) {
        if !self.parked {
            self.parked = true;
            self.load.sub();
            self.conn.park();
        }
    }

    /// A parked backend back in service, if it is a connection to `node` (the router's choice)
    /// that is still good.
    fn resume(mut self, node: &Node) -> Result<Checkout, Checkout> {
        if !self.parked || !Arc::ptr_eq(&self.load, &node.load) || *self.conn.node() != *node.address {
            return Err(self);
        }
        if !self.conn.still_good() {
            self.conn.discard();
            return Err(self);
        }
        self.parked = false;
        self.conn.unpark();
        self.load.add();
        self.role = node.role;
        Ok(self)
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if !self.parked {
            self.load.sub();
        }
    }
}

/// Observes `sluice_write_hold_wait_seconds` for a request that was held, when its attach
/// ends (with a backend, an error, or the client gone).
struct HeldWait<'c> {
    cluster: &'c Cluster,
    since: Option<tokio::time::Instant>,
}

impl Drop for HeldWait<'_> {
    fn drop(&mut self) {
        if let Some(since) = self.since {
            self.cluster
                .metrics
                .write_hold_wait
                .get_or_create(&self.cluster.labels())
                .observe(since.elapsed().as_secs_f64());
        }
    }
}

/// Where a `write_hold` cluster stands: holding writes since when, and how many were held.
#[derive(Default)]
pub(super) struct HoldState {
    /// A confirmed writable primary has been seen.
    seen_writable: bool,
    since: Option<std::time::Instant>,
    held: u64,
}

impl Cluster {
    /// Starts or ends the write hold of a `write_hold` cluster as the topology changes: one log
    /// line each way and the `sluice_write_hold_active` gauge.
    pub(super) fn track_hold(&self) {
        if self.pg.write_hold.is_none() {
            return;
        }
        let snap = self.topology.load();
        let reason = snap.hold_reason();
        let mut hold = self.hold.lock().expect("hold lock");
        let labels = self.labels();
        match (reason, hold.since) {
            (None, Some(since)) => {
                let primary = snap.writable_primary().map(|i| snap.nodes[i].address.as_str());
                info!(cluster = %self.config.name, primary = primary.unwrap_or(""), held_ms = since.elapsed().as_millis() as u64, writes_held = hold.held, "write hold ended: the primary is confirmed writable");
                hold.since = None;
                self.metrics.write_hold_active.get_or_create(&labels).set(0);
            }
            // Not at start while the first probes are still out: only once a writable primary
            // was seen, or every node has answered its probe (or failed it) without one.
            (Some(reason), None)
                if hold.seen_writable
                    || (!snap.nodes.is_empty()
                        && snap.nodes.iter().all(|n| n.health.up || n.health.error.is_some())) =>
            {
                info!(cluster = %self.config.name, reason, "write hold started: new writes wait for a confirmed writable primary");
                hold.since = Some(std::time::Instant::now());
                hold.held = 0;
                self.metrics.write_hold_active.get_or_create(&labels).set(1);
                self.metrics.write_holds.get_or_create(&labels).inc();
            }
            (None, None) => hold.seen_writable = true,
            _ => {}
        }
    }

    /// A node answered a write with `code` (25006 read-only transaction, 57P01/57P03 shutting
    /// down): if it is the writable primary of a `write_hold` cluster, writes are held until
    /// its probe, run at once, says what it is. (A client's own `BEGIN READ ONLY` followed by
    /// a write costs the other writes one probe round trip.)
    pub fn write_refused(&self, address: &str, code: &str) {
        if self.pg.write_hold.is_none() || !matches!(code, "25006" | "57P01" | "57P03") {
            return;
        }
        let snap = self.topology.load();
        let Some(i) = snap
            .writable_primary()
            .filter(|&i| snap.nodes[i].address == address)
        else {
            return;
        };
        let id = snap.nodes[i].id.clone();
        info!(cluster = %self.config.name, node = %address, code, "the primary refused a write; probing it now");
        self.refusals.fetch_add(1, Ordering::SeqCst);
        self.observe(&id, &Observation::Suspect);
        self.probe_now.notify_waiters();
    }

    /// Finds a node for `intent` and checks out a connection to it as (user, database).
    /// Waits up to `failover_wait` while no suitable node is known; a node that refuses
    /// connections is marked down and another one is tried. The client's `parked` backend
    /// (see `Session::park`) serves the request if the router chose its node; otherwise it
    /// goes back to the pool first. `parked` is empty when this returns.
    ///
    /// With `write_hold`, a request for the primary also waits (up to `write_hold`, woken by
    /// topology changes) while no primary is confirmed writable (a planned role change); once
    /// the hold has run out it is routed as without it.
    pub async fn attach(
        &self,
        intent: Intent,
        user: &str,
        database: &str,
        startup: &StartupParams,
        min_lsn: Option<u64>,
        parked: &mut Option<Checkout>,
    ) -> Result<Checkout, AttachError> {
        // How long this request was held, observed however the wait ends.
        let mut held = HeldWait {
            cluster: self,
            since: None,
        };
        let held_since = &mut held.since;
        let mut policy = Policy::of(&self.config, &self.pg, min_lsn);
        let start = tokio::time::Instant::now();
        let hold = self
            .pg
            .write_hold
            .filter(|_| intent == Intent::Primary && !policy.multi_active);
        let hold_deadline = hold.map(|h| start + h);
        let deadline = start + self.pg.failover_wait.max(hold.unwrap_or_default());
        let credential = self.credential(user);
        loop {
            policy.writable_only = hold_deadline.is_some_and(|d| tokio::time::Instant::now() < d);
            let snap = self.topology.peek();
            match self.choose(intent, &snap, &policy) {
                Ok(node) => {
                    if let Some(p) = parked.take() {
                        match p.resume(&snap.nodes[node]) {
                            Ok(p) => {
                                self.routed[usize::from(intent == Intent::Replica)].inc();
                                return Ok(p);
                            }
                            Err(p) => drop(p), // back to the pool before checking out
                        }
                    }
                    // Held across the checkout: a counted reference.
                    let snap = arc_swap::Guard::into_inner(snap);
                    let address = &snap.nodes[node].address;
                    match self
                        .pools
                        .checkout(address, user, database, &credential, startup)
                        .await
                    {
                        Ok(conn) => {
                            let load = snap.nodes[node].load.clone();
                            load.add();
                            self.routed[usize::from(intent == Intent::Replica)].inc();
                            return Ok(Checkout {
                                conn,
                                role: snap.nodes[node].role,
                                load,
                                parked: false,
                            });
                        }
                        Err(PoolError::Connect(e))
                            if e.is_node_failure() && tokio::time::Instant::now() < deadline =>
                        {
                            if matches!(e, crate::postgres::backend::BackendError::Timeout { .. }) {
                                // Slow is not dead: a loaded server can take seconds to fork and
                                // authenticate, and marking it down would end every request in
                                // flight on it. Its probe (probe_timeout) decides; retry meanwhile.
                                warn!(node = %address, error = %e, "backend connection timed out; retrying");
                            } else {
                                self.observe(
                                    &snap.nodes[node].id,
                                    &Observation::Down {
                                        source: Source::Connect,
                                        error: e.to_string(),
                                    },
                                );
                            }
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(why) => {
                    drop(snap);
                    drop(parked.take());
                    let waited = start.elapsed();
                    let until = match hold_deadline {
                        Some(d) if policy.writable_only => {
                            if held_since.is_none() {
                                *held_since = Some(tokio::time::Instant::now());
                                self.metrics
                                    .write_hold_requests
                                    .get_or_create(&self.labels())
                                    .inc();
                                self.hold.lock().expect("hold lock").held += 1;
                            }
                            d
                        }
                        _ => deadline,
                    };
                    let ready = |s: &crate::common::topology::Snapshot| {
                        router::choose(intent, s, &[], 0, &policy).is_ok()
                    };
                    let remaining = until.saturating_duration_since(tokio::time::Instant::now());
                    if remaining.is_zero() || self.topology.wait_for(remaining, ready).await.is_none() {
                        if policy.writable_only {
                            // The hold ran out: routed as without it (to a read-only primary,
                            // or failing for want of one once failover_wait has passed too).
                            continue;
                        }
                        let cluster = self.config.name.clone();
                        let waited = waited.max(start.elapsed());
                        return Err(match why {
                            NoRoute::NoPrimary => AttachError::NoPrimary { cluster, waited },
                            NoRoute::NoNode => AttachError::NoNode { cluster, waited },
                        });
                    }
                }
            }
        }
    }

    /// `attach` when a backend is parked for the client and the router sends the request to its
    /// node: that backend, with no await (no pool, no wait, no clock read). This is the usual
    /// case of a client whose transactions follow each other, and it keeps the slow path's
    /// large future out of every session's (the session boxes it). `None`: `attach` decides;
    /// a parked backend the router did not choose has gone back to its pool.
    pub fn resume_parked(
        &self,
        intent: Intent,
        min_lsn: Option<u64>,
        parked: &mut Option<Checkout>,
    ) -> Option<Checkout> {
        parked.as_ref()?;
        let mut policy = Policy::of(&self.config, &self.pg, min_lsn);
        // As on `attach_inner`'s first pass, which starts the hold's clock now.
        policy.writable_only = self
            .pg
            .write_hold
            .is_some_and(|h| !h.is_zero() && intent == Intent::Primary && !policy.multi_active);
        let snap = self.topology.peek();
        // The choice `attach` would make, without using up the tie-break: when the parked
        // backend is not on the chosen node, `attach` makes the same choice (one rotation step
        // per request, as without parking, so equal replicas still take turns).
        let node = self.choose_at(intent, &snap, &policy, current_tiebreak()).ok()?;
        match parked.take()?.resume(&snap.nodes[node]) {
            Ok(p) => {
                next_tiebreak();
                self.routed[usize::from(intent == Intent::Replica)].inc();
                Some(p)
            }
            Err(p) => {
                drop(p); // back to the pool; `attach` checks one out
                None
            }
        }
    }

    /// The router's choice for one request on this snapshot (one step of the tie-break's
    /// rotation).
    pub(super) fn choose(
        &self,
        intent: Intent,
        snap: &crate::common::topology::Snapshot,
        policy: &Policy<'_>,
    ) -> Result<usize, NoRoute> {
        self.choose_at(intent, snap, policy, next_tiebreak())
    }

    fn choose_at(
        &self,
        intent: Intent,
        snap: &crate::common::topology::Snapshot,
        policy: &Policy<'_>,
        tiebreak: usize,
    ) -> Result<usize, NoRoute> {
        // Each node's requests in flight, on the stack for up to 16 nodes (this runs for every
        // transaction); only where the router compares them (a request for the primary has one
        // candidate), since reading them reads every thread's counters.
        let mut stack = [0u32; 16];
        let heap: Vec<u32>;
        let loads: &[u32] = if intent == Intent::Primary && !policy.multi_active {
            &[]
        } else if snap.nodes.len() <= stack.len() {
            for (l, n) in stack.iter_mut().zip(&snap.nodes) {
                *l = n.load.get();
            }
            &stack[..snap.nodes.len()]
        } else {
            heap = snap.nodes.iter().map(|n| n.load.get()).collect();
            &heap
        };
        router::choose(intent, snap, loads, tiebreak, policy)
    }
}

/// Where the tie-break between equally good nodes starts, without advancing it.
fn current_tiebreak() -> usize {
    TIEBREAK.with(|t| t.get())
}

/// Where the tie-break starts, advancing it by one for the next choice (per thread: every
/// session of a thread takes its turn).
pub(super) fn next_tiebreak() -> usize {
    TIEBREAK.with(|t| {
        let n = t.get();
        t.set(n.wrapping_add(1));
        n
    })
}
