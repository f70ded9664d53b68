//! Backend connection pools: one per (node, user, database), bounded by `pool_size`, with a
//! part per core (see `common::runtime`).
//!
//! A checked-out connection is a [`Pooled`] guard that goes back to its pool when dropped,
//! unless it was marked unusable (mid-transaction, broken) or its node was drained meanwhile
//! (for example demoted from primary): those are closed, never reused.
//!
//! A session whose transaction is over may keep its connection parked instead of returning it
//! (see `Session::park`): a checkout that finds no free slot asks one parked holder to give its
//! connection back ([`Pooled::poll_reclaimed`]), and the reaper wakes parked holders so that
//! `idle_timeout` and `max_lifetime` apply to parked connections too. Each connection has its
//! own [`ConnSignal`] for this: the session holding it registers its waker there (one atomic
//! operation, no lock, nothing to unregister), and the pool wakes exactly the holders it
//! means.
//!
//! **Per core.** `pool_size` is one bound over all cores, split into a share per core. Each
//! core hands out its own capacity to its own sessions (a fair semaphore per core) and keeps
//! the connections they return, so a backend connection stays on the core of the sessions
//! using it. A core whose capacity is all in use takes free capacity from another core
//! ([`Pool::borrow`]), with one of that core's idle connections when the capacity covered one;
//! a core that frees capacity nobody on it waits for passes it on to a core whose checkouts
//! wait, and a core above its share gives it back to a core below its own share that waits
//! ([`Pool::release`]). So a checkout never waits while capacity or a connection is unused on
//! any core, and the sum over cores never exceeds `pool_size`.
//!
//! A connection that changes cores is registered with its new core's runtime
//! ([`Backend::rehome`]: a duplicated descriptor, no new server connection); closing it and
//! opening another would cost a server process, an authentication and its prepared
//! statements.

use std::collections::HashMap;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::BytesMut;
use futures_util::task::AtomicWaker;
use tokio::sync::Semaphore;
use tracing::debug;

use crate::common::metrics::{ClusterLabels, Metrics, NodeStateLabels};
use crate::common::tls::BackendStream;
use crate::postgres::backend::{
    same_startup, Backend, BackendError, ConnectOptions, Credential, StartupParams,
};

/// Pool limits, from the cluster configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    pub size: usize,
    pub checkout_timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_lifetime: Duration,
}

/// Identifies one pool.
#[derive(Debug, Clone)]
pub struct PoolKey {
    pub node: String,
    pub user: String,
    pub database: String,
}

/// A pool's identity as three borrowed strings: the pool map is searched with one on every
/// checkout, so a transaction allocates no `PoolKey`. `PoolKey` hashes and compares through
/// this view, which keeps `Borrow` consistent.
#[derive(PartialEq, Eq, Hash)]
struct KeyRef<'a>(&'a str, &'a str, &'a str);

trait AsKeyRef {
    fn key_ref(&self) -> KeyRef<'_>;
}

impl AsKeyRef for PoolKey {
    fn key_ref(&self) -> KeyRef<'_> {
        KeyRef(&self.node, &self.user, &self.database)
    }
}

impl AsKeyRef for KeyRef<'_> {
    fn key_ref(&self) -> KeyRef<'_> {
        KeyRef(self.0, self.1, self.2)
    }
}

impl<'a> std::borrow::Borrow<dyn AsKeyRef + 'a> for PoolKey {
    fn borrow(&self) -> &(dyn AsKeyRef + 'a) {
        self
    }
}

impl PartialEq for dyn AsKeyRef + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.key_ref() == other.key_ref()
    }
}

impl Eq for dyn AsKeyRef + '_ {}

impl std::hash::Hash for dyn AsKeyRef + '_ {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key_ref().hash(state);
    }
}

impl PartialEq for PoolKey {
    fn eq(&self, other: &Self) -> bool {
        self.key_ref() == other.key_ref()
    }
}

impl Eq for PoolKey {}

impl std::hash::Hash for PoolKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key_ref().hash(state);
    }
}

/// Why no connection could be handed out.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no backend connection to {node} available within {waited:?} (pool_size {size} for user {user:?}, database {database:?})")]
    Exhausted {
        node: String,
        user: String,
        database: String,
        size: usize,
        waited: Duration,
    },
    #[error(transparent)]
    Connect(#[from] BackendError),
}

/// All pools of one cluster.
pub struct Pools {
    cluster: String,
    /// Ids for server connections (`SHOW SERVERS`).
    next_server: AtomicU64,
    settings: PoolSettings,
    tls: crate::common::tls::BackendTls,
    /// Read on every checkout by every core: a snapshot, replaced (under `adding`) when a
    /// pool is added, so lookups take no lock. Hashed with foldhash (randomly seeded per map,
    /// as the other maps keyed by client input): SipHash over the three names cost ~350
    /// instructions per lookup, several lookups per transaction once clients wait for a
    /// connection (callgrind, 128 clients on a pool of 20).
    pools: ArcSwap<HashMap<PoolKey, Arc<Pool>, foldhash::fast::RandomState>>,
    adding: Mutex<()>,
    /// Runtimes (cores) the pools are split over.
    cores: usize,
    metrics: Arc<Metrics>,
    /// `sluice_checkout_wait_seconds` for this cluster, resolved once (observed per checkout).
    checkout_wait: prometheus_client::metrics::histogram::Histogram,
}

struct Pool {
    key: PoolKey,
    /// Every open connection of this pool, by id (`SHOW SERVERS`).
    servers: Arc<Mutex<HashMap<u64, ServerInfo>>>,
    /// Connections being opened now.
    connecting: AtomicUsize,
    /// `key.node`, shared: a session watching its node, and a client's cancel target, clone
    /// this instead of the string (an `Arc<String>`: a thin pointer, as every client record
    /// holds one).
    node: Arc<String>,
    /// One part per core.
    cores: Box<[CorePart]>,
    /// Bumped by `drain`; connections from an older epoch are closed when they come back.
    epoch: AtomicU64,
    /// Checkouts waiting for capacity, over all cores: parked connections must come back.
    waiting: AtomicUsize,
    /// Connections parked with their sessions now (`ConnSignal::parked_on` set): a waiting
    /// checkout looks through the server list for one to claim only when there is one.
    parked: AtomicUsize,
    settings: PoolSettings,
    idle_gauge: prometheus_client::metrics::gauge::Gauge,
    active_gauge: prometheus_client::metrics::gauge::Gauge,
}

/// One core's part of a pool. Aligned to its own cache lines: each core updates its part on
/// every checkout and return without touching the other cores' lines.
#[repr(align(128))]
struct CorePart {
    /// This core's free capacity: a checkout takes a permit (and forgets it) for as long as
    /// it holds a connection. Fair: a returned permit goes to the core's waiting checkouts in
    /// order.
    permits: Semaphore,
    /// Capacity this core holds, free or in use: its share, plus what it took from other
    /// cores, minus what it gave them.
    tokens: AtomicUsize,
    /// Its share of `pool_size`.
    share: usize,
    /// Connections returned on this core, registered with its runtime (unless just passed on
    /// from another core). Never more than its free permits: the sum over cores of held and
    /// idle connections stays within `pool_size`.
    #[allow(clippy::vec_box)]
    idle: Mutex<Vec<Box<Backend>>>,
    /// Checkouts of this core waiting for capacity.
    waiting: AtomicUsize,
    /// Reads that brought bytes from the node on this core's connections: a probe that goes
    /// unanswered on a node whose connections still make progress found a slow node, not a
    /// dead one (`cluster::probes`).
    progress: AtomicU64,
}

/// What `SHOW SERVERS` says about one server connection.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub id: u64,
    pub pid: i32,
    /// When it was opened, in microseconds since the Unix epoch.
    pub connect_time: u64,
    pub local: Option<std::net::SocketAddr>,
    pub tls: bool,
    /// The pool's epoch when it was opened: once `drain` has moved past it, the connection
    /// is closed when its client releases it (idle ones are closed at once).
    pub epoch: u64,
    /// Wakes the session holding this connection (see [`ConnSignal`]).
    pub signal: Arc<ConnSignal>,
}

/// `ConnSignal::parked_on` of a connection that is not parked (or was asked back already).
const NOT_PARKED: usize = usize::MAX;

/// How long a connection may sit idle before a checkout asks the kernel whether the server
/// has closed it (`Backend::alive_now`) rather than trusting the reactor's readiness.
const EXACT_LIVENESS_AFTER: Duration = Duration::from_millis(100);

/// How a pool reaches the session holding one of its connections: to ask a parked one back
/// (a checkout waits, the reaper checks its age, the pool was drained) and to end the wait of
/// a request in flight on a drained pool ([`Drained`]). One per connection, shared by its
/// entry in the pool's server list and the connection itself.
///
/// Hand-written instead of a `tokio::sync::Notify` per core: a `Notify` waiter lives in the
/// waiting future (every idle client's task would carry one) and takes the waiter list's lock
/// to register and again to unregister on every request; this is one `AtomicWaker` register.
#[derive(Debug)]
pub struct ConnSignal {
    /// The task of the session holding the connection.
    waker: AtomicWaker,
    /// The core of the session that parked the connection, or [`NOT_PARKED`]: a checkout that
    /// waits on that core (else on any) claims one parked connection here and wakes its holder.
    parked_on: AtomicUsize,
    /// Set by the reaper: the parked holder checks `idle_timeout` and `max_lifetime`.
    recheck: AtomicBool,
}

impl ConnSignal {
    fn new() -> ConnSignal {
        ConnSignal {
            waker: AtomicWaker::new(),
            parked_on: AtomicUsize::new(NOT_PARKED),
            recheck: AtomicBool::new(false),
        }
    }
}

/// Keeps a connection in its pool's server list until the connection is dropped.
pub struct Registration {
    id: u64,
    servers: Arc<Mutex<HashMap<u64, ServerInfo>>>,
    /// The same as the server list's entry.
    signal: Arc<ConnSignal>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.servers.lock().expect("servers lock").remove(&self.id);
    }
}

/// One server connection in [`PoolStats`].
#[derive(Debug, Clone)]
pub struct ServerRow {
    pub id: u64,
    pub pid: i32,
    pub connect_time: u64,
    pub local: Option<std::net::SocketAddr>,
    pub tls: bool,
    /// In the pool (not with a client).
    pub idle: bool,
    /// Statements sluice prepared on it (known for idle connections only).
    pub prepared: usize,
    /// Marked to be closed when its client releases it (RECONNECT, PAUSE, a demoted node, a
    /// dropped database): PgBouncer's `close_needed`.
    pub close_needed: bool,
}

/// One pool as the admin console shows it (all cores together).
#[derive(Debug, Clone)]
pub struct PoolStats {
    pub node: String,
    pub user: String,
    pub database: String,
    /// Checked out (serving a client, or parked with one between its transactions).
    pub active: usize,
    pub idle: usize,
    /// Being opened.
    pub connecting: usize,
    pub servers: Vec<ServerRow>,
}

/// Counts one connection being opened while it lives.
struct Connecting<'a>(&'a AtomicUsize);

impl<'a> Connecting<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Connecting(n)
    }
}

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One unit of a core's capacity, held by a checkout; released (or passed to another core)
/// when dropped.
struct Slot {
    pool: Arc<Pool>,
    core: usize,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.pool.release(self.core);
    }
}

/// A checked-out backend connection; returns to its pool on drop.
pub struct Pooled {
    /// Boxed: a checkout moves between a session's attached and parked slots, and idle
    /// sessions should not carry a whole connection's state inline.
    conn: Option<Box<Backend>>,
    /// Dropped after the connection went back to the idle list (fields drop after `drop`).
    slot: Slot,
    epoch: u64,
    reusable: bool,
    /// Parked with its session (see [`ConnSignal::parked_on`]).
    parked: bool,
}

impl Pooled {
    /// The connection.
    pub fn conn(&mut self) -> &mut Backend {
        self.conn.as_mut().expect("present until drop")
    }

    /// The server's BackendKeyData (pid, secret) of the connection.
    pub fn key(&self) -> (i32, i32) {
        let be = self.conn.as_ref().expect("present until drop");
        (be.pid, be.secret)
    }

    /// Marks the connection as not reusable: it is closed instead of returned.
    pub fn discard(&mut self) {
        self.reusable = false;
    }

    /// The node this connection goes to.
    pub fn node(&self) -> &str {
        &self.slot.pool.key.node
    }

    /// The node this connection goes to, shared (no allocation).
    pub fn node_shared(&self) -> Arc<String> {
        self.slot.pool.node.clone()
    }

    fn part(&self) -> &CorePart {
        &self.slot.pool.cores[self.slot.core]
    }

    /// The connection's signal (every pooled connection has one: see `Pools::register`).
    fn signal(&self) -> Option<&ConnSignal> {
        let r = self.conn.as_ref()?.registration.as_ref()?;
        Some(&r.signal)
    }

    /// The client's transaction is over and the session keeps the connection for its next
    /// one: from now on it counts as idle for `idle_timeout`, and a checkout that waits may
    /// ask for it.
    pub fn park(&mut self) {
        if let Some(c) = self.conn.as_mut() {
            c.last_used = Instant::now();
        }
        if !self.parked {
            self.parked = true;
            if let Some(s) = self.signal() {
                // Counted before the session first looks for waiting checkouts (its next
                // `poll_reclaimed`): see `Pool::reclaim_one`.
                self.slot.pool.parked.fetch_add(1, Ordering::SeqCst);
                s.parked_on.store(self.slot.core, Ordering::SeqCst);
            }
        }
    }

    /// The parked connection serves its session again. A waiting checkout that had claimed
    /// it (and woken this session, which took it back for its own request instead) claims
    /// another parked connection.
    pub fn unpark(&mut self) {
        if self.leave_parked() == Some(NOT_PARKED) && self.contended() {
            self.slot.pool.reclaim_one(self.slot.core);
        }
    }

    /// Not parked any more; what `parked_on` was, if it was parked.
    fn leave_parked(&mut self) -> Option<usize> {
        if !std::mem::take(&mut self.parked) {
            return None;
        }
        Some(self.signal().map_or(NOT_PARKED, |s| self.slot.pool.unmark(s)))
    }

    /// Whether a parked connection may serve its session again: its node was not drained and
    /// the server has not closed it. (`idle_timeout` and `max_lifetime` are checked when the
    /// reaper wakes parked holders, not here: no clock read per request.)
    pub fn still_good(&self) -> bool {
        let Some(c) = self.conn.as_ref() else { return false };
        !self.drained() && c.looks_alive()
    }

    /// Whether the pool was drained since this checkout (`Pools::drain`): the connection
    /// is closed when it comes back.
    fn drained(&self) -> bool {
        self.epoch != self.slot.pool.epoch.load(Ordering::Acquire)
    }

    /// Whether a parked connection should go back to the pool now: a checkout (on any core)
    /// is waiting for capacity, or its pool was drained (two atomic loads).
    fn reclaim_due(&self) -> bool {
        self.contended() || self.drained()
    }

    /// Ready when a parked connection should go back to the pool: a waiting checkout claimed
    /// it, [`Self::reclaim_due`], or it outlived `idle_timeout`/`max_lifetime` (checked when the
    /// reaper asks). Registers the task to be woken when that changes; it stays registered (a
    /// later poll replaces it), so there is nothing to undo when the session wakes for another
    /// reason. The caller gives the connection back when this is ready.
    pub fn poll_reclaimed(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let signal = self.signal();
        // Registered before looking: a checkout that starts to wait, a drain or the reaper
        // after the look wakes this task (the checkout counts itself as waiting before it
        // looks for a parked connection to claim, and both sides use SeqCst).
        if let Some(s) = signal {
            s.waker.register(cx.waker());
        }
        let due = self.reclaim_due()
            || signal.is_some_and(|s| {
                (self.parked && s.parked_on.load(Ordering::SeqCst) == NOT_PARKED)
                    || (s.recheck.swap(false, Ordering::AcqRel)
                        && self
                            .conn
                            .as_ref()
                            .is_none_or(|c| self.slot.pool.expired(c, Instant::now())))
            });
        if !due {
            return std::task::Poll::Pending;
        }
        // It goes back now: no checkout claims it from here on (a claim made before this is
        // the one its return answers; one made after would be lost on a connection on its way
        // back while another stays parked).
        if let Some(s) = signal {
            self.slot.pool.unmark(s);
        }
        std::task::Poll::Ready(())
    }

    /// Counts a read that brought bytes from the node (see [`Pools::progress`]). Only the
    /// connection's core writes its part's counter: no contended cache line.
    pub fn note_progress(&self) {
        self.part().progress.fetch_add(1, Ordering::Relaxed);
    }

    /// The connection's socket and read buffer, with what tells when its pool is drained and
    /// its node's address: what the relay waits on while a request is in flight.
    pub fn relay_parts(&mut self) -> (&mut BackendStream, &mut BytesMut, Drained<'_>, &Arc<String>) {
        let pool = &self.slot.pool;
        let Backend {
            stream,
            rbuf,
            registration,
            ..
        } = &mut **self.conn.as_mut().expect("present until drop");
        let drained = Drained {
            waker: registration.as_ref().map(|r| &r.signal.waker),
            current: &pool.epoch,
            epoch: self.epoch,
        };
        (stream, rbuf, drained, &pool.node)
    }

    /// Whether checkouts (on any core) are waiting for this connection's pool.
    pub fn contended(&self) -> bool {
        self.slot.pool.waiting.load(Ordering::SeqCst) > 0
    }
}

/// Resolves once the pool of a checked-out connection has been drained since the checkout: a
/// node marked down is drained (`Cluster::observe`), and so are a demoted node, `RECONNECT`
/// and a dropped database. A session with a request in flight waits on this instead of on
/// every topology change: one `AtomicWaker::register` per wait, no lock.
pub struct Drained<'a> {
    waker: Option<&'a AtomicWaker>,
    current: &'a AtomicU64,
    epoch: u64,
}

impl Drained<'_> {
    pub fn poll(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        // Registered before looking: a drain after the look wakes this task.
        if let Some(w) = self.waker {
            w.register(cx.waker());
        }
        if self.current.load(Ordering::Acquire) != self.epoch {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }
}

/// Counts one checkout in its core's and the pool's `waiting` while it lives (also if the
/// checkout is dropped); when it ends, capacity its core got for it and nobody there needs
/// any more goes on to another core's waiting checkouts.
struct Waiting<'a>(&'a Pool, usize);

impl<'a> Waiting<'a> {
    fn new(pool: &'a Pool, core: usize) -> Self {
        pool.cores[core].waiting.fetch_add(1, Ordering::SeqCst);
        pool.waiting.fetch_add(1, Ordering::SeqCst);
        Waiting(pool, core)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
        self.0.cores[self.1].waiting.fetch_sub(1, Ordering::SeqCst);
        self.0.pass_on(self.1);
    }
}

impl Pool {
    fn expired(&self, c: &Backend, now: Instant) -> bool {
        now.duration_since(c.last_used) > self.settings.idle_timeout
            || now.duration_since(c.created) > self.settings.max_lifetime
    }

    /// The other cores, starting after `core`.
    fn others(&self, core: usize) -> impl Iterator<Item = usize> {
        let n = self.cores.len();
        (1..n).map(move |i| (core + i) % n)
    }

    /// Moves one unit of capacity, already taken out of `from`'s free permits, to `to`; one of
    /// `from`'s idle connections goes along if `from` now has more of them than free permits.
    fn move_capacity(&self, from: usize, to: usize) {
        let src = &self.cores[from];
        src.tokens.fetch_sub(1, Ordering::Relaxed);
        self.cores[to].tokens.fetch_add(1, Ordering::Relaxed);
        let moved = {
            let mut idle = src.idle.lock().expect("pool lock");
            (idle.len() > src.permits.available_permits())
                .then(|| idle.pop())
                .flatten()
        };
        if let Some(conn) = moved {
            self.cores[to].idle.lock().expect("pool lock").push(conn);
        }
        self.cores[to].permits.add_permits(1);
    }

    /// A checkout on `core` found no free capacity there: takes free capacity of another core
    /// (their own waiting checkouts would have taken it first). Whether there was some.
    fn borrow(&self, core: usize) -> bool {
        for other in self.others(core) {
            if let Ok(permit) = self.cores[other].permits.try_acquire() {
                permit.forget();
                self.move_capacity(other, core);
                return true;
            }
        }
        false
    }

    /// A checkout took free capacity of `core` without waiting. While other checkouts wait,
    /// that capacity may be what a parked connection's return freed for one of them (it was
    /// claimed for a checkout that had not yet got in line): a parked connection is claimed
    /// in its place, so the waiting checkout is not left waiting while another stays parked.
    fn took_free(&self, core: usize) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.reclaim_one(core);
        }
    }

    /// A checkout on `core`, counted as waiting, found no free capacity there: free capacity
    /// of another core comes here, and unless that served it alone, a parked connection is
    /// claimed. Borrowed capacity goes to the first in line on this core, and it may be what a
    /// claim made by another waiting checkout freed for that one: with others waiting (on any
    /// core), a parked connection is still needed.
    fn ask_for_capacity(&self, core: usize) {
        if !self.borrow(core) || self.waiting.load(Ordering::SeqCst) > 1 {
            self.reclaim_one(core);
        }
    }

    /// Claims one parked connection and wakes its holder, which gives it back: one parked on
    /// `core` if there is one (the connection stays on the core), else one on another core
    /// (which passes the capacity on). Each waiting checkout claims a different one.
    ///
    /// With none parked it returns at once: the server list is not looked through (20
    /// entries twice, ~550 instructions per waiting checkout at 128 clients). Nothing is
    /// missed: the checkout counted itself waiting before it reads the count, and a session
    /// counts its connection parked before it first looks for waiting checkouts, both SeqCst,
    /// so a session whose park this does not see sees the waiting checkout and gives the
    /// connection back by itself (as one parked while the list is looked through does).
    fn reclaim_one(&self, core: usize) {
        if self.parked.load(Ordering::SeqCst) == 0 {
            return;
        }
        let servers = self.servers.lock().expect("servers lock");
        let claimed = servers
            .values()
            .find(|s| self.claim(&s.signal, Some(core)))
            .or_else(|| servers.values().find(|s| self.claim(&s.signal, None)));
        if let Some(s) = claimed {
            s.signal.waker.wake();
        }
    }

    /// Claims a connection parked on `on` (any core if `None`): clears its parked mark if it
    /// is still set, uncounted. Whether it was this call that cleared it.
    fn claim(&self, signal: &ConnSignal, on: Option<usize>) -> bool {
        let parked_on = signal.parked_on.load(Ordering::SeqCst);
        let claimed = parked_on != NOT_PARKED
            && on.is_none_or(|c| c == parked_on)
            && signal
                .parked_on
                .compare_exchange(parked_on, NOT_PARKED, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok();
        if claimed {
            self.parked.fetch_sub(1, Ordering::SeqCst);
        }
        claimed
    }

    /// Clears a connection's parked mark; what it was (uncounted if it was parked).
    fn unmark(&self, signal: &ConnSignal) -> usize {
        let was = signal.parked_on.swap(NOT_PARKED, Ordering::SeqCst);
        if was != NOT_PARKED {
            self.parked.fetch_sub(1, Ordering::SeqCst);
        }
        was
    }

    /// A checkout on `core` let go of its capacity (its connection, if reusable, is in the
    /// core's idle list already). It stays on the core for the core's waiting checkouts
    /// unless the core holds more than its share and a core below its own share waits, or
    /// nobody on the core waits and another core's checkouts do.
    fn release(&self, core: usize) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            let part = &self.cores[core];
            if part.tokens.load(Ordering::Relaxed) > part.share {
                let needy = self.others(core).find(|&o| {
                    let other = &self.cores[o];
                    other.waiting.load(Ordering::SeqCst) > 0
                        && other.tokens.load(Ordering::Relaxed) < other.share
                });
                if let Some(to) = needy {
                    return self.move_capacity(core, to);
                }
            }
        }
        self.cores[core].permits.add_permits(1);
        self.pass_on(core);
    }

    /// Capacity free on `core` that none of its checkouts waits for goes to another core whose
    /// checkouts wait.
    fn pass_on(&self, core: usize) {
        // Pairs with the fence in `checkout`: either this sees the waiting checkout, or the
        // checkout's `borrow` sees this core's free capacity.
        fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) == 0 || self.cores[core].waiting.load(Ordering::SeqCst) > 0 {
            return;
        }
        let Some(to) = self
            .others(core)
            .find(|&o| self.cores[o].waiting.load(Ordering::SeqCst) > 0)
        else {
            return;
        };
        if let Ok(permit) = self.cores[core].permits.try_acquire() {
            permit.forget();
            self.move_capacity(core, to);
        }
    }

    fn idle_len(&self) -> usize {
        self.cores
            .iter()
            .map(|c| c.idle.lock().expect("pool lock").len())
            .sum()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.leave_parked();
        let pool = &self.slot.pool;
        pool.active_gauge.dec();
        let Some(mut conn) = self.conn.take() else { return };
        if self.reusable && !self.drained() {
            conn.last_used = Instant::now();
            pool.cores[self.slot.core]
                .idle
                .lock()
                .expect("pool lock")
                .push(conn);
            pool.idle_gauge.inc();
        }
    }
}

impl Pools {
    pub fn new(
        cluster: &str,
        settings: PoolSettings,
        tls: crate::common::tls::BackendTls,
        metrics: Arc<Metrics>,
        cores: usize,
    ) -> Self {
        let checkout_wait = metrics
            .checkout_wait
            .get_or_create(&ClusterLabels {
                cluster: cluster.to_string(),
            })
            .clone();
        Pools {
            cluster: cluster.to_string(),
            next_server: AtomicU64::new(1),
            settings,
            tls,
            pools: ArcSwap::from_pointee(HashMap::default()),
            adding: Mutex::new(()),
            cores: cores.max(1),
            metrics,
            checkout_wait,
        }
    }

    fn pool(&self, node: &str, user: &str, database: &str) -> Arc<Pool> {
        if let Some(p) = self
            .pools
            .load()
            .get(&KeyRef(node, user, database) as &dyn AsKeyRef)
        {
            return p.clone();
        }
        let _adding = self.adding.lock().expect("pools lock");
        if let Some(p) = self
            .pools
            .load()
            .get(&KeyRef(node, user, database) as &dyn AsKeyRef)
        {
            return p.clone();
        }
        let key = &PoolKey {
            node: node.to_string(),
            user: user.to_string(),
            database: database.to_string(),
        };
        let gauge = |state| {
            self.metrics
                .backend_connections
                .get_or_create(&NodeStateLabels {
                    cluster: self.cluster.clone(),
                    node: key.node.clone(),
                    state,
                })
                .clone()
        };
        let (size, n) = (self.settings.size, self.cores);
        let cores = (0..n)
            .map(|i| {
                let share = size / n + usize::from(i < size % n);
                CorePart {
                    permits: Semaphore::new(share),
                    tokens: AtomicUsize::new(share),
                    share,
                    idle: Mutex::new(Vec::new()),
                    waiting: AtomicUsize::new(0),
                    progress: AtomicU64::new(0),
                }
            })
            .collect();
        let p = Arc::new(Pool {
            key: key.clone(),
            servers: Default::default(),
            connecting: AtomicUsize::new(0),
            node: Arc::new(node.to_string()),
            cores,
            epoch: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            parked: AtomicUsize::new(0),
            settings: self.settings,
            idle_gauge: gauge("idle"),
            active_gauge: gauge("active"),
        });
        let mut next = HashMap::clone(&self.pools.load());
        next.insert(key.clone(), p.clone());
        self.pools.store(Arc::new(next));
        p
    }

    /// How many reads have brought bytes from `node` on pooled connections so far, over all
    /// its pools and cores: while this moves, the node is answering its clients.
    pub fn progress(&self, node: &str) -> u64 {
        self.pools
            .load()
            .values()
            .filter(|p| p.key.node == node)
            .flat_map(|p| p.cores.iter())
            .map(|c| c.progress.load(Ordering::Relaxed))
            .sum()
    }

    fn all(&self) -> Vec<Arc<Pool>> {
        self.pools.load().values().cloned().collect()
    }

    /// Hands out a connection to `node` as (`user`, `database`) opened with `startup`: an idle
    /// one if it is still good (this core's first, else another core's, moved here), else a
    /// new one; waits up to `checkout_timeout` for capacity. Idle connections opened with
    /// other startup parameters count against `pool_size`: when they fill it, the oldest is
    /// closed to make room (a checkout never waits while a connection sits unused).
    pub async fn checkout(
        &self,
        node: &str,
        user: &str,
        database: &str,
        credential: &Credential,
        startup: &StartupParams,
    ) -> Result<Pooled, PoolError> {
        let pool = self.pool(node, user, database);
        let key = &pool.key;
        let core = crate::common::runtime::current_core() % pool.cores.len();
        let part = &pool.cores[core];
        let start = Instant::now();
        match part.permits.try_acquire() {
            Ok(permit) => {
                permit.forget();
                pool.took_free(core);
            }
            Err(_) => {
                // No free capacity on this core: counted as waiting first (see `pass_on`),
                // then free capacity of another core comes here, a session holding a parked
                // connection is asked to give it back, and the checkout waits in line.
                let _waiting = Waiting::new(&pool, core);
                fence(Ordering::SeqCst);
                pool.ask_for_capacity(core);
                let acquired =
                    tokio::time::timeout(self.settings.checkout_timeout, part.permits.acquire()).await;
                match acquired {
                    Ok(Ok(permit)) => permit.forget(),
                    _ => {
                        return Err(PoolError::Exhausted {
                            node: key.node.clone(),
                            user: key.user.clone(),
                            database: key.database.clone(),
                            size: self.settings.size,
                            waited: start.elapsed(),
                        })
                    }
                }
            }
        }
        let slot = Slot {
            pool: pool.clone(),
            core,
        };
        self.checkout_wait.observe(start.elapsed().as_secs_f64());
        let epoch = pool.epoch.load(Ordering::Acquire);
        let reused = self.take_idle(&pool, core, startup);
        let conn = match reused {
            Some(c) => c,
            // Boxed: opening a connection is rare and its future (TCP, TLS, authentication)
            // is ~2 KiB; inline it would make every session's relay future that much larger.
            None => {
                let opening = Connecting::new(&pool.connecting);
                let mut conn = Box::new(
                    Box::pin(Backend::connect(ConnectOptions {
                        addr: &key.node,
                        user: &key.user,
                        credential,
                        database: &key.database,
                        params: startup,
                        timeout: self.settings.connect_timeout,
                        tls: &self.tls,
                    }))
                    .await?,
                );
                drop(opening);
                self.register(&pool, &mut conn, epoch);
                conn
            }
        };
        pool.active_gauge.inc();
        Ok(Pooled {
            conn: Some(conn),
            slot,
            epoch,
            reusable: true,
            parked: false,
        })
    }

    /// The most recently used idle connection opened with `startup` that is still good, this
    /// core's first, then another core's (registered with this core's runtime on the way).
    /// When there is none, this core's idle connections of other parameters are closed,
    /// oldest first, until a new one fits in its capacity (the caller holds a unit of it).
    fn take_idle(&self, pool: &Pool, core: usize, startup: &StartupParams) -> Option<Box<Backend>> {
        let now = Instant::now();
        let n = pool.cores.len();
        for c in (0..n).map(|i| (core + i) % n) {
            let found = {
                let mut idle = pool.cores[c].idle.lock().expect("pool lock");
                let mut found = None;
                let mut i = idle.len();
                while i > 0 {
                    i -= 1;
                    if !same_startup(&idle[i].startup, startup) {
                        continue;
                    }
                    let conn = idle.remove(i);
                    pool.idle_gauge.dec();
                    // Under load connections come back within milliseconds and the reactor's
                    // view is enough; one idle longer is asked of the kernel instead (a system
                    // call per checkout only when checkouts are that rare).
                    let alive = if now.duration_since(conn.last_used) >= EXACT_LIVENESS_AFTER {
                        conn.alive_now()
                    } else {
                        conn.looks_alive()
                    };
                    if !pool.expired(&conn, now) && alive {
                        found = Some(conn);
                        break;
                    }
                }
                found
            };
            if let Some(mut conn) = found {
                match conn.rehome(core) {
                    Ok(()) => return Some(conn),
                    Err(e) => {
                        debug!(node = %pool.key.node, error = %e, "cannot move an idle connection to this core; closing it")
                    }
                }
            }
        }
        let part = &pool.cores[core];
        let mut idle = part.idle.lock().expect("pool lock");
        let excess = idle.len().saturating_sub(part.permits.available_permits());
        if excess > 0 {
            idle.drain(..excess);
            pool.idle_gauge.dec_by(excess as i64);
        }
        None
    }

    /// Lists a new connection in its pool's server list.
    fn register(&self, pool: &Pool, conn: &mut Backend, epoch: u64) {
        let id = self.next_server.fetch_add(1, Ordering::Relaxed);
        let info = ServerInfo {
            id,
            pid: conn.pid,
            connect_time: crate::postgres::activity::now_micros(),
            local: conn.stream.tcp().local_addr().ok(),
            tls: matches!(conn.stream, crate::common::tls::MaybeTls::Tls(_)),
            epoch,
            signal: Arc::new(ConnSignal::new()),
        };
        let signal = info.signal.clone();
        pool.servers.lock().expect("servers lock").insert(id, info);
        conn.registration = Some(Registration {
            id,
            servers: pool.servers.clone(),
            signal,
        });
    }

    /// Every pool with its counts and connections (all cores), for the admin console.
    pub fn stats(&self) -> Vec<PoolStats> {
        let mut out: Vec<PoolStats> = self
            .all()
            .iter()
            .map(|p| {
                let mut idle: HashMap<u64, usize> = HashMap::new();
                for part in p.cores.iter() {
                    let list = part.idle.lock().expect("pool lock");
                    idle.extend(
                        list.iter()
                            .filter_map(|c| c.registration.as_ref().map(|r| (r.id, c.prepared.len()))),
                    );
                }
                let connecting = p.connecting.load(Ordering::Relaxed);
                let epoch = p.epoch.load(Ordering::Acquire);
                let mut servers: Vec<ServerRow> = p
                    .servers
                    .lock()
                    .expect("servers lock")
                    .values()
                    .map(|s| ServerRow {
                        id: s.id,
                        pid: s.pid,
                        connect_time: s.connect_time,
                        local: s.local,
                        tls: s.tls,
                        idle: idle.contains_key(&s.id),
                        prepared: idle.get(&s.id).copied().unwrap_or(0),
                        close_needed: s.epoch != epoch,
                    })
                    .collect();
                servers.sort_by_key(|s| s.id);
                // Every open connection is listed in `servers` (from its opening to its
                // close); the ones not idle are with a client. (Counted from the list rather
                // than from the cores' capacity, which a checkout or return on another thread
                // may be changing while the cores are read one by one.)
                let active = servers.iter().filter(|s| !s.idle).count();
                PoolStats {
                    node: p.key.node.clone(),
                    user: p.key.user.clone(),
                    database: p.key.database.clone(),
                    active,
                    idle: servers.len() - active,
                    connecting,
                    servers,
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.database, &a.user, &a.node).cmp(&(&b.database, &b.user, &b.node)));
        out
    }

    /// Closes every idle connection of every pool, and makes the checked-out and parked ones
    /// close when they come back (console `RECONNECT` and `PAUSE` without a database).
    pub fn drain_all(&self) {
        self.drain_where(|_| true);
    }

    /// Closes every idle connection to `node`, and makes connections to it that are checked out
    /// or parked now close when they come back.
    pub fn drain(&self, node: &str) {
        self.drain_where(|k| k.node == node);
    }

    /// The same for every connection to `database` on any node: `DROP DATABASE` and friends
    /// fail while any session is connected to the database.
    pub fn drain_database(&self, database: &str) {
        self.drain_where(|k| k.database == database);
    }

    fn drain_where(&self, matches: impl Fn(&PoolKey) -> bool) {
        for p in self.all().into_iter().filter(|p| matches(&p.key)) {
            p.epoch.fetch_add(1, Ordering::AcqRel);
            for part in p.cores.iter() {
                let drained = std::mem::take(&mut *part.idle.lock().expect("pool lock"));
                p.idle_gauge.dec_by(drained.len() as i64);
            }
            // Parked holders give their connections back now (`Pooled::poll_reclaimed`), and
            // sessions with a request in flight look at why (see `Drained`).
            for server in p.servers.lock().expect("servers lock").values() {
                server.signal.waker.wake();
            }
        }
    }

    /// Closes idle connections past `idle_timeout` or `max_lifetime`, and has parked ones
    /// checked for the same.
    pub fn reap(&self) {
        let now = Instant::now();
        for p in self.all() {
            for part in p.cores.iter() {
                let mut idle = part.idle.lock().expect("pool lock");
                let before = idle.len();
                idle.retain(|c| !p.expired(c, now));
                p.idle_gauge.dec_by((before - idle.len()) as i64);
            }
            // Parked holders check their connections' age (`Pooled::poll_reclaimed`).
            for server in p.servers.lock().expect("servers lock").values() {
                if server.signal.parked_on.load(Ordering::SeqCst) != NOT_PARKED {
                    server.signal.recheck.store(true, Ordering::Release);
                    server.signal.waker.wake();
                }
            }
        }
    }

    /// Idle connections per node, for /topology.
    pub fn idle_counts(&self) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for p in self.pools.load().values() {
            *out.entry(p.key.node.clone()).or_default() += p.idle_len();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools(size: usize, cores: usize) -> Pools {
        let settings = PoolSettings {
            size,
            checkout_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
            max_lifetime: Duration::from_secs(60),
        };
        let tls = crate::common::tls::BackendTls::disabled();
        Pools::new("test", settings, tls, Arc::new(Metrics::new()), cores)
    }

    /// A checkout's unit of `core`'s free capacity.
    fn take(pool: &Arc<Pool>, core: usize) -> Slot {
        pool.cores[core]
            .permits
            .try_acquire()
            .expect("free capacity")
            .forget();
        Slot {
            pool: pool.clone(),
            core,
        }
    }

    fn tokens(pool: &Pool) -> Vec<usize> {
        pool.cores
            .iter()
            .map(|c| c.tokens.load(Ordering::Relaxed))
            .collect()
    }

    fn free(pool: &Pool) -> Vec<usize> {
        pool.cores.iter().map(|c| c.permits.available_permits()).collect()
    }

    /// A connection in `pool`'s server list, parked by a session on `core` (what
    /// `Pooled::park` marks).
    fn parked(pool: &Pool, id: u64, core: usize) -> Arc<ConnSignal> {
        let signal = Arc::new(ConnSignal::new());
        let info = ServerInfo {
            id,
            pid: 0,
            connect_time: 0,
            local: None,
            tls: false,
            epoch: 0,
            signal: signal.clone(),
        };
        pool.servers.lock().expect("servers lock").insert(id, info);
        pool.parked.fetch_add(1, Ordering::SeqCst);
        signal.parked_on.store(core, Ordering::SeqCst);
        signal
    }

    fn claimed(signal: &ConnSignal) -> bool {
        signal.parked_on.load(Ordering::SeqCst) == NOT_PARKED
    }

    /// The race CI found (a checkout waited out `checkout_timeout` while a connection stayed
    /// parked): a checkout on core 0 claims a parked connection, whose return frees a unit on
    /// core 0 before that checkout gets in line; a checkout on core 1 borrows that unit. It
    /// must claim the other parked connection for the first one, which otherwise waits for
    /// capacity nobody frees.
    #[test]
    fn a_unit_a_claim_freed_and_another_checkout_borrowed_is_replaced_by_another_claim() {
        let pools = pools(2, 2);
        let pool = pools.pool("n:1", "u", "d");
        let (p_slot, q_slot) = (take(&pool, 0), take(&pool, 1));
        let (p, q) = (parked(&pool, 1, 0), parked(&pool, 2, 1));
        let x = Waiting::new(&pool, 0);
        pool.ask_for_capacity(0);
        assert!(
            claimed(&p) && !claimed(&q),
            "x claims the connection parked on its core"
        );
        drop(p_slot); // p's session gives it back: a free unit on core 0, x not yet in line
        assert_eq!(free(&pool), [1, 0]);
        let y = Waiting::new(&pool, 1);
        pool.ask_for_capacity(1);
        assert_eq!(free(&pool), [0, 1], "y borrowed the unit p's return freed");
        assert!(claimed(&q), "y claims q for x");
        drop(q_slot);
        assert_eq!(
            free(&pool).iter().sum::<usize>(),
            2,
            "both units free for x and y"
        );
        drop((x, y));
    }

    /// The same with a checkout that does not wait: taking the unit a claim freed for a
    /// waiting checkout, it claims another parked connection in its place.
    #[test]
    fn free_capacity_taken_while_others_wait_claims_a_parked_connection() {
        let pools = pools(2, 2);
        let pool = pools.pool("n:1", "u", "d");
        let (p_slot, _q_slot) = (take(&pool, 0), take(&pool, 1));
        let (p, q) = (parked(&pool, 1, 0), parked(&pool, 2, 1));
        let _x = Waiting::new(&pool, 0);
        pool.ask_for_capacity(0);
        assert!(claimed(&p));
        drop(p_slot);
        let _z = take(&pool, 0);
        pool.took_free(0);
        assert!(claimed(&q), "z claims q for x");
        assert_eq!(pool.parked.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn capacity_is_split_over_cores_borrowed_and_passed_to_waiting_cores() {
        let pools = pools(3, 2);
        let pool = pools.pool("n:1", "u", "d");
        assert_eq!(tokens(&pool), [2, 1]);
        // Core 1 uses its share, then takes free capacity of core 0.
        let a = take(&pool, 1);
        assert!(pool.cores[1].permits.try_acquire().is_err());
        assert!(pool.borrow(1));
        assert_eq!((tokens(&pool), free(&pool)), (vec![1, 2], vec![1, 1]));
        let b = take(&pool, 1);
        let c = take(&pool, 0);
        assert!(!pool.borrow(1), "nothing free anywhere");
        // A checkout waits on core 0; core 1 frees a unit nobody there waits for: it goes to
        // core 0.
        let waiting = Waiting::new(&pool, 0);
        drop(a);
        assert_eq!((tokens(&pool), free(&pool)), (vec![2, 1], vec![1, 0]));
        drop(waiting);
        drop((b, c));
        assert_eq!((tokens(&pool), free(&pool)), (vec![2, 1], vec![2, 1]));
    }

    #[test]
    fn a_core_above_its_share_gives_back_to_a_waiting_core_below_its_own() {
        let pools = pools(2, 2);
        let pool = pools.pool("n:1", "u", "d");
        let x = take(&pool, 0);
        assert!(pool.borrow(0));
        let y = take(&pool, 0);
        assert_eq!(tokens(&pool), [2, 0]);
        // Both cores wait; core 0 is above its share (1), core 1 below: core 0's next free
        // unit goes to core 1 although core 0 has a waiting checkout too.
        let w0 = Waiting::new(&pool, 0);
        let w1 = Waiting::new(&pool, 1);
        drop(x);
        assert_eq!((tokens(&pool), free(&pool)), (vec![1, 1], vec![0, 1]));
        // At its share, core 0 keeps what it frees for its own waiting checkout.
        drop(y);
        assert_eq!((tokens(&pool), free(&pool)), (vec![1, 1], vec![1, 1]));
        drop((w0, w1));
        assert_eq!(
            tokens(&pool).iter().sum::<usize>(),
            2,
            "pool_size is never exceeded"
        );
    }
}
