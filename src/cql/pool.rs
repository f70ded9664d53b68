//! A few multiplexed connections per node, (protocol version, keyspace, user) and core,
//! shared by every client: a new one is opened only while all of the core's are busy, up to
//! `connections_per_node` per core. A request takes a connection of its own core, whose
//! reader runs on the thread of the client's session (see [`choose`]); it borrows another
//! core's only while its core has none.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;

/// The maps looked up on every request: keys are node addresses and pool keys, so a fast
/// (seeded) hash beats SipHash's flooding resistance here.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

use super::backend::{BackendConn, Credentials, OpenError, OpenOptions};
use super::metrics::CqlMetrics;
use crate::common::tls::BackendTls;

/// What a backend connection is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub version: u8,
    /// Set with USE when the connection opens.
    pub keyspace: Option<String>,
    pub credentials: Option<Credentials>,
}

/// Clients' requests in flight to one node, shared by the node's pool and its connections
/// (which count a request from the moment it is written until its answer, timeout or loss).
pub struct NodeLoad {
    /// Requests sent to this node and not answered yet (all keys).
    inflight: AtomicUsize,
    /// Requests in a row that got no answer within the request timeout.
    timeouts: AtomicUsize,
    /// `sluice_cql_node_inflight` of this node.
    inflight_gauge: Gauge,
}

impl NodeLoad {
    /// Load of a connection outside the pools (the control connection, probes): counted
    /// nowhere.
    pub fn detached() -> NodeLoad {
        NodeLoad {
            inflight: AtomicUsize::new(0),
            timeouts: AtomicUsize::new(0),
            inflight_gauge: Gauge::default(),
        }
    }

    /// A client's request was written to the node.
    pub fn started(&self) {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        self.inflight_gauge.inc();
    }

    /// A client's request got its answer, timed out, or was lost with its connection.
    pub fn ended(&self) {
        self.inflight.fetch_sub(1, Ordering::Relaxed);
        self.inflight_gauge.dec();
    }

    /// A request got its answer: the timeouts in a row start again from 0.
    pub fn answered(&self) {
        if self.timeouts.load(Ordering::Relaxed) != 0 {
            self.timeouts.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a request that timed out; returns how many in a row have.
    pub fn timed_out(&self) -> usize {
        self.timeouts.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// The connections to one node.
pub struct NodePool {
    keyed: Mutex<HashMap<PoolKey, Vec<Arc<BackendConn>>>>,
    opening: tokio::sync::Mutex<()>,
    /// Set while a connection is being added in the background ([`Pick::Grow`]).
    growing: AtomicBool,
    load: Arc<NodeLoad>,
    /// `sluice_cql_node_connections` of this node.
    connections_gauge: Gauge,
}

/// What [`Pools::try_get`] found.
pub enum Pick {
    /// The open connection to use (see [`choose`]).
    Ready(Arc<BackendConn>),
    /// An open connection to use now; the calling core has none or only busy ones and may
    /// have another, which the caller opens in the background ([`Pools::grow`]).
    Grow(Arc<BackendConn>),
    /// No open connection: one must be opened first ([`Pools::get`]).
    Open,
}

/// Which connection a request takes, from the open connections' cores and requests in flight
/// (see [`choose`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Choice {
    /// This one.
    Use(usize),
    /// This one for now, and the pool should open another on the requesting core.
    Grow(usize),
    /// None is open.
    Open,
}

/// The connection a request on `core` takes among open ones given as (core, requests in
/// flight): the least busy of those on `core`, whose answers are read on the thread that
/// writes them to the client (no wake-up of another thread per answer), else the least busy
/// anywhere. While `core` has fewer than `per_core` connections, [`Choice::Grow`] when it has
/// none or only busy ones: each core that carries requests gets connections of its own.
/// (With the bound shared by all cores, connections opened first by one core's clients —
/// a driver's control connection reading the schema, say — left none for another core's,
/// whose every answer then crossed threads: measured, 0.38 instead of 0.20 context switches
/// and ~15 % more CPU per request in half the process starts.)
fn choose(conns: impl Iterator<Item = (usize, usize)>, core: usize, per_core: usize) -> Choice {
    let mut here: Option<(usize, usize)> = None;
    let mut any: Option<(usize, usize)> = None;
    let mut mine = 0;
    for (i, (c, n)) in conns.enumerate() {
        if any.is_none_or(|(_, m)| n < m) {
            any = Some((i, n));
        }
        if c == core {
            mine += 1;
            if here.is_none_or(|(_, m)| n < m) {
                here = Some((i, n));
            }
        }
    }
    let room = mine < per_core;
    match (here, any) {
        (Some((i, n)), _) if n == 0 || !room => Choice::Use(i),
        (Some((i, _)), _) => Choice::Grow(i),
        (None, Some((i, _))) if room => Choice::Grow(i),
        (None, Some((i, _))) => Choice::Use(i),
        (None, None) => Choice::Open,
    }
}

/// [`choose`] for the calling core among `conns`.
fn choose_here(conns: &[Arc<BackendConn>], per_core: usize) -> Choice {
    let core = crate::common::runtime::current_core();
    choose(conns.iter().map(|c| (c.core(), c.inflight())), core, per_core)
}

impl NodePool {
    /// An open connection for `key` (see [`choose`]); with `grow`, `None` says "open one" when
    /// the calling core should have another.
    fn pick(&self, key: &PoolKey, per_core: usize, grow: bool) -> Option<Arc<BackendConn>> {
        let mut keyed = self.keyed.lock().unwrap_or_else(|e| e.into_inner());
        let conns = keyed.get_mut(key)?;
        conns.retain(|c| !c.is_closed());
        match choose_here(conns, per_core) {
            Choice::Use(i) => Some(conns[i].clone()),
            Choice::Grow(i) if !grow => Some(conns[i].clone()),
            Choice::Grow(_) | Choice::Open => None,
        }
    }

    /// [`Pick`] without waiting: the request path never waits for a connection that exists.
    fn try_pick(&self, key: &PoolKey, per_core: usize) -> Pick {
        let mut keyed = self.keyed.lock().unwrap_or_else(|e| e.into_inner());
        let Some(conns) = keyed.get_mut(key) else {
            return Pick::Open;
        };
        if conns.iter().any(|c| c.is_closed()) {
            conns.retain(|c| !c.is_closed());
        }
        match choose_here(conns, per_core) {
            Choice::Open => Pick::Open,
            Choice::Use(i) => Pick::Ready(conns[i].clone()),
            Choice::Grow(i) if !self.growing.swap(true, Ordering::AcqRel) => Pick::Grow(conns[i].clone()),
            Choice::Grow(i) => Pick::Ready(conns[i].clone()),
        }
    }

    fn count(&self) -> usize {
        let mut keyed = self.keyed.lock().unwrap_or_else(|e| e.into_inner());
        keyed
            .values_mut()
            .map(|v| {
                v.retain(|c| !c.is_closed());
                v.len()
            })
            .sum()
    }

    fn close_all(&self) {
        let mut keyed = self.keyed.lock().unwrap_or_else(|e| e.into_inner());
        for conns in keyed.values() {
            for c in conns {
                c.close();
            }
        }
        keyed.clear();
    }
}

/// Every node's connections.
pub struct Pools {
    nodes: RwLock<HashMap<SocketAddr, Arc<NodePool>>>,
    per_core: usize,
    connect_timeout: Duration,
    tls: BackendTls,
    metrics: Arc<CqlMetrics>,
}

impl Pools {
    pub fn new(
        per_core: usize,
        connect_timeout: Duration,
        tls: BackendTls,
        metrics: Arc<CqlMetrics>,
    ) -> Pools {
        Pools {
            nodes: RwLock::new(HashMap::default()),
            per_core,
            connect_timeout,
            tls,
            metrics,
        }
    }

    fn node(&self, addr: SocketAddr) -> Arc<NodePool> {
        if let Some(n) = self.nodes.read().unwrap_or_else(|e| e.into_inner()).get(&addr) {
            return n.clone();
        }
        self.nodes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(addr)
            .or_insert_with(|| {
                let (connections_gauge, inflight_gauge) = self.metrics.node_gauges(addr);
                Arc::new(NodePool {
                    keyed: Mutex::default(),
                    opening: tokio::sync::Mutex::default(),
                    growing: AtomicBool::new(false),
                    load: Arc::new(NodeLoad {
                        inflight: AtomicUsize::new(0),
                        timeouts: AtomicUsize::new(0),
                        inflight_gauge,
                    }),
                    connections_gauge,
                })
            })
            .clone()
    }

    /// Requests in flight to a node.
    pub fn inflight(&self, addr: SocketAddr) -> usize {
        self.nodes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&addr)
            .map_or(0, |n| n.load.inflight.load(Ordering::Relaxed))
    }

    /// Open connections to a node.
    pub fn open_connections(&self, addr: SocketAddr) -> usize {
        self.nodes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&addr)
            .map_or(0, |n| n.count())
    }

    /// Forgets the timeouts in a row of a node (it was marked down or up).
    pub fn reset_timeouts(&self, addr: SocketAddr) {
        if let Some(n) = self.nodes.read().unwrap_or_else(|e| e.into_inner()).get(&addr) {
            n.load.answered();
        }
    }

    /// Open connections with clients' requests in flight (for the timeout sweep).
    pub fn busy_connections(&self) -> Vec<Arc<BackendConn>> {
        let nodes = self.nodes.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for n in nodes.values() {
            if n.load.inflight.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let keyed = n.keyed.lock().unwrap_or_else(|e| e.into_inner());
            out.extend(keyed.values().flatten().filter(|c| c.inflight() > 0).cloned());
        }
        out
    }

    /// An open connection to `addr` for `key` without waiting, if there is one (see
    /// [`Pick`]).
    pub fn try_get(&self, addr: SocketAddr, key: &PoolKey) -> Pick {
        let nodes = self.nodes.read().unwrap_or_else(|e| e.into_inner());
        match nodes.get(&addr) {
            Some(n) => n.try_pick(key, self.per_core),
            None => Pick::Open,
        }
    }

    /// Opens one more connection to `addr` for `key` after [`Pick::Grow`] (errors are left
    /// to the requests that need the node: the pool keeps the connections it has).
    pub async fn grow(&self, addr: SocketAddr, key: &PoolKey, cql_version: &str) {
        let node = self.node(addr);
        let _ = self.get(addr, key, cql_version).await;
        node.growing.store(false, Ordering::Release);
    }

    /// Open connections that have received nothing for `idle` (with their protocol version),
    /// on the nodes `wanted` accepts.
    pub fn idle_connections(
        &self,
        idle: Duration,
        wanted: impl Fn(SocketAddr) -> bool,
    ) -> Vec<(SocketAddr, u8, Arc<BackendConn>)> {
        let nodes = self.nodes.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (addr, n) in nodes.iter().filter(|(a, _)| wanted(**a)) {
            let keyed = n.keyed.lock().unwrap_or_else(|e| e.into_inner());
            for (key, conns) in keyed.iter() {
                out.extend(
                    conns
                        .iter()
                        .filter(|c| !c.is_closed() && c.silent_for() >= idle)
                        .map(|c| (*addr, key.version, c.clone())),
                );
            }
        }
        out
    }

    /// Closes every connection to a node (it went down).
    pub fn close_node(&self, addr: SocketAddr) {
        if let Some(n) = self.nodes.read().unwrap_or_else(|e| e.into_inner()).get(&addr) {
            n.close_all();
        }
    }

    /// A connection to `addr` for `key`, opened if needed.
    pub async fn get(
        &self,
        addr: SocketAddr,
        key: &PoolKey,
        cql_version: &str,
    ) -> Result<Arc<BackendConn>, OpenError> {
        let node = self.node(addr);
        if let Some(c) = node.pick(key, self.per_core, true) {
            return Ok(c);
        }
        let _opening = node.opening.lock().await;
        if let Some(c) = node.pick(key, self.per_core, true) {
            return Ok(c);
        }
        let opened = BackendConn::open(
            addr,
            OpenOptions {
                version: key.version,
                keyspace: key.keyspace.as_deref(),
                credentials: key.credentials.as_ref(),
                cql_version,
                timeout: self.connect_timeout,
                options: false,
                events: None,
                tls: &self.tls,
                gauge: Some(node.connections_gauge.clone()),
                load: Some(node.load.clone()),
            },
        )
        .await;
        match opened {
            Ok(o) => {
                let mut keyed = node.keyed.lock().unwrap_or_else(|e| e.into_inner());
                keyed.entry(key.clone()).or_default().push(o.conn.clone());
                Ok(o.conn)
            }
            Err(e) => match node.pick(key, self.per_core, false) {
                Some(c) if matches!(e, OpenError::Unreachable { .. }) => Ok(c),
                _ => Err(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{choose, Choice};

    #[test]
    fn a_request_takes_the_least_busy_connection_of_its_own_core() {
        // (core, requests in flight)
        let conns = [(1, 0), (0, 3), (0, 1), (1, 5)];
        assert_eq!(choose(conns.into_iter(), 0, 2), Choice::Use(2));
        assert_eq!(choose(conns.into_iter(), 1, 2), Choice::Use(0));
        // Busy, and the core may have another: use it and open one more.
        assert_eq!(choose(conns.into_iter(), 0, 3), Choice::Grow(2));
        // Idle: no need for another.
        assert_eq!(choose(conns.into_iter(), 1, 3), Choice::Use(0));
    }

    #[test]
    fn a_core_without_connections_borrows_one_until_it_has_its_own() {
        let conns = [(1, 4), (1, 2)];
        // Core 1 is at its bound; core 0's bound is its own.
        assert_eq!(choose(conns.into_iter(), 0, 2), Choice::Grow(1));
        assert_eq!(choose(conns.into_iter(), 1, 2), Choice::Use(1));
        // An idle connection of another core too.
        assert_eq!(choose([(1, 0)].into_iter(), 0, 1), Choice::Grow(0));
        // Only if the core may have none (a bound of 0 is refused by the config) does it
        // keep borrowing.
        assert_eq!(choose([(1, 0)].into_iter(), 0, 0), Choice::Use(0));
    }

    #[test]
    fn no_connection_means_open_one() {
        assert_eq!(choose(std::iter::empty(), 0, 2), Choice::Open);
        assert_eq!(choose(std::iter::empty(), 3, 1), Choice::Open);
    }

    #[test]
    fn ties_go_to_the_first_connection() {
        let conns = [(0, 1), (0, 1), (1, 1)];
        assert_eq!(choose(conns.into_iter(), 0, 2), Choice::Use(0));
        assert_eq!(choose(conns.into_iter(), 2, 0), Choice::Use(0));
    }
}
