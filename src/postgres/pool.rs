//! Backend connection pools: one per (node, user, database), bounded by `pool_size`.
//!
//! A checked-out connection is a [`Pooled`] guard that goes back to its pool when dropped,
//! unless it was marked unusable (mid-transaction, broken) or its node was drained meanwhile
//! (for example demoted from primary): those are closed, never reused.
//!
//! A session whose transaction is over may keep its connection parked instead of returning it
//! (see `Session::park`): a checkout that finds no free slot asks one parked holder to give its
//! connection back ([`Pooled::reclaimed`]), and the reaper wakes parked holders so that
//! `idle_timeout` and `max_lifetime` apply to parked connections too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::common::metrics::{ClusterLabels, Metrics, NodeStateLabels};
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
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
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
    /// `key.node`, shared: a session watching its node clones this instead of the string.
    node: Arc<str>,
    /// Boxes, as handed out: returning and taking a connection moves a pointer, not a box.
    #[allow(clippy::vec_box)]
    idle: Mutex<Vec<Box<Backend>>>,
    permits: Arc<Semaphore>,
    /// Bumped by `drain`; connections from an older epoch are closed when they come back.
    epoch: AtomicU64,
    /// Checkouts waiting for a slot: parked connections must come back.
    waiting: AtomicUsize,
    /// Wakes parked holders: one per waiting checkout, all of them on each reaper pass.
    reclaim: Notify,
    settings: PoolSettings,
    idle_gauge: prometheus_client::metrics::gauge::Gauge,
    active_gauge: prometheus_client::metrics::gauge::Gauge,
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
}

/// Keeps a connection in its pool's server list until the connection is dropped.
pub struct Registration {
    id: u64,
    servers: Arc<Mutex<HashMap<u64, ServerInfo>>>,
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

/// One pool as the admin console shows it.
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

/// A checked-out backend connection; returns to its pool on drop.
pub struct Pooled {
    /// Boxed: a checkout moves between a session's attached and parked slots, and idle
    /// sessions should not carry a whole connection's state inline.
    conn: Option<Box<Backend>>,
    pool: Arc<Pool>,
    epoch: u64,
    reusable: bool,
    _permit: OwnedSemaphorePermit,
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
        &self.pool.key.node
    }

    /// The node this connection goes to, shared (no allocation).
    pub fn node_shared(&self) -> Arc<str> {
        self.pool.node.clone()
    }

    /// The client's transaction is over and the session keeps the connection for its next
    /// one: from now on it counts as idle for `idle_timeout`.
    pub fn park(&mut self) {
        if let Some(c) = self.conn.as_mut() {
            c.last_used = Instant::now();
        }
    }

    /// Whether a parked connection may serve its session again: its node was not drained and
    /// the server has not closed it. (`idle_timeout` and `max_lifetime` are checked when the
    /// reaper wakes parked holders, not here: no clock read per request.)
    pub fn still_good(&self) -> bool {
        let Some(c) = self.conn.as_ref() else { return false };
        self.epoch == self.pool.epoch.load(Ordering::Acquire) && c.looks_alive()
    }

    /// Resolves when a parked connection should go back to the pool: a checkout is waiting
    /// for a slot, or the connection outlived `idle_timeout`/`max_lifetime` (checked when the
    /// reaper passes).
    pub async fn reclaimed(&self) {
        let mut woken = false;
        loop {
            let notified = self.pool.reclaim.notified();
            tokio::pin!(notified);
            // Registered before looking, so that a checkout starting to wait after the look
            // still wakes this holder.
            notified.as_mut().enable();
            if self.pool.waiting.load(Ordering::SeqCst) > 0
                || self.epoch != self.pool.epoch.load(Ordering::Acquire)
            {
                return;
            }
            if woken
                && self
                    .conn
                    .as_ref()
                    .is_none_or(|c| self.pool.expired(c, Instant::now()))
            {
                return;
            }
            notified.await;
            woken = true;
        }
    }

    /// Whether checkouts are waiting for this connection's pool.
    pub fn contended(&self) -> bool {
        self.pool.waiting.load(Ordering::SeqCst) > 0
    }
}

/// Counts one checkout in `Pool::waiting` while it lives (also if the checkout is dropped).
struct Waiting<'a>(&'a Pool);

impl<'a> Waiting<'a> {
    fn new(pool: &'a Pool) -> Self {
        pool.waiting.fetch_add(1, Ordering::SeqCst);
        Waiting(pool)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Pool {
    fn expired(&self, c: &Backend, now: Instant) -> bool {
        now.duration_since(c.last_used) > self.settings.idle_timeout
            || now.duration_since(c.created) > self.settings.max_lifetime
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.active_gauge.dec();
        let Some(mut conn) = self.conn.take() else { return };
        if self.reusable && self.epoch == self.pool.epoch.load(Ordering::Acquire) {
            conn.last_used = Instant::now();
            self.pool.idle.lock().expect("pool lock").push(conn);
            self.pool.idle_gauge.inc();
        }
    }
}

impl Pools {
    pub fn new(
        cluster: &str,
        settings: PoolSettings,
        tls: crate::common::tls::BackendTls,
        metrics: Arc<Metrics>,
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
            pools: Mutex::new(HashMap::new()),
            metrics,
            checkout_wait,
        }
    }

    fn pool(&self, node: &str, user: &str, database: &str) -> Arc<Pool> {
        let mut pools = self.pools.lock().expect("pools lock");
        if let Some(p) = pools.get(&KeyRef(node, user, database) as &dyn AsKeyRef) {
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
        let p = Arc::new(Pool {
            key: key.clone(),
            servers: Default::default(),
            connecting: AtomicUsize::new(0),
            node: Arc::from(node),
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(self.settings.size)),
            epoch: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            reclaim: Notify::new(),
            settings: self.settings,
            idle_gauge: gauge("idle"),
            active_gauge: gauge("active"),
        });
        pools.insert(key.clone(), p.clone());
        p
    }

    /// Hands out a connection to `node` as (`user`, `database`) opened with `startup`: an idle
    /// one if it is still good, else a new one; waits up to `checkout_timeout` for a free slot.
    /// Idle connections opened with other startup parameters count against `pool_size`: when
    /// they fill it, the oldest is closed to make room (a checkout never waits while a
    /// connection sits unused).
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
        let start = Instant::now();
        let permit = match pool.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // No free slot: ask a session holding a parked connection of this pool to give
                // it back, then wait in line.
                let _waiting = Waiting::new(&pool);
                pool.reclaim.notify_one();
                let acquired = tokio::time::timeout(
                    self.settings.checkout_timeout,
                    pool.permits.clone().acquire_owned(),
                )
                .await;
                match acquired {
                    Ok(Ok(p)) => p,
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
        };
        self.checkout_wait.observe(start.elapsed().as_secs_f64());
        let epoch = pool.epoch.load(Ordering::Acquire);
        let reused = self.take_idle(&pool, startup);
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
            pool,
            epoch,
            reusable: true,
            _permit: permit,
        })
    }

    /// The most recently used idle connection opened with `startup` that is still good. When
    /// there is none, idle connections of other parameters are closed, oldest first, until a
    /// new one fits in `pool_size` (the caller holds a permit).
    fn take_idle(&self, pool: &Pool, startup: &StartupParams) -> Option<Box<Backend>> {
        let mut idle = pool.idle.lock().expect("pool lock");
        let now = Instant::now();
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            if !same_startup(&idle[i].startup, startup) {
                continue;
            }
            let c = idle.remove(i);
            pool.idle_gauge.dec();
            if !pool.expired(&c, now) && c.looks_alive() {
                return Some(c);
            }
        }
        let in_use = self.settings.size - pool.permits.available_permits();
        let excess = (in_use + idle.len()).saturating_sub(self.settings.size);
        let closed = excess.min(idle.len());
        if closed > 0 {
            idle.drain(..closed);
            pool.idle_gauge.dec_by(closed as i64);
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
        };
        pool.servers.lock().expect("servers lock").insert(id, info);
        conn.registration = Some(Registration {
            id,
            servers: pool.servers.clone(),
        });
    }

    /// Every pool with its counts and connections, for the admin console.
    pub fn stats(&self) -> Vec<PoolStats> {
        let pools: Vec<_> = self.pools.lock().expect("pools lock").values().cloned().collect();
        let mut out: Vec<PoolStats> = pools
            .iter()
            .map(|p| {
                let idle: HashMap<u64, usize> = p
                    .idle
                    .lock()
                    .expect("pool lock")
                    .iter()
                    .filter_map(|c| c.registration.as_ref().map(|r| (r.id, c.prepared.len())))
                    .collect();
                let connecting = p.connecting.load(Ordering::Relaxed);
                let in_use = self.settings.size - p.permits.available_permits();
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
                PoolStats {
                    node: p.key.node.clone(),
                    user: p.key.user.clone(),
                    database: p.key.database.clone(),
                    active: in_use.saturating_sub(connecting),
                    idle: idle.len(),
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
        let pools: Vec<_> = self
            .pools
            .lock()
            .expect("pools lock")
            .values()
            .filter(|p| matches(&p.key))
            .cloned()
            .collect();
        for p in pools {
            p.epoch.fetch_add(1, Ordering::AcqRel);
            let drained = std::mem::take(&mut *p.idle.lock().expect("pool lock"));
            p.idle_gauge.dec_by(drained.len() as i64);
            // Parked holders give their connections back now (see `Pooled::reclaimed`).
            p.reclaim.notify_waiters();
        }
    }

    /// Closes idle connections past `idle_timeout` or `max_lifetime`, and has parked ones
    /// checked for the same.
    pub fn reap(&self) {
        let now = Instant::now();
        let pools: Vec<_> = self.pools.lock().expect("pools lock").values().cloned().collect();
        for p in pools {
            let mut idle = p.idle.lock().expect("pool lock");
            let before = idle.len();
            idle.retain(|c| !p.expired(c, now));
            p.idle_gauge.dec_by((before - idle.len()) as i64);
            drop(idle);
            p.reclaim.notify_waiters();
        }
    }

    /// Idle connections per node, for /topology.
    pub fn idle_counts(&self) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for p in self.pools.lock().expect("pools lock").values() {
            *out.entry(p.key.node.clone()).or_default() += p.idle.lock().expect("pool lock").len();
        }
        out
    }
}
