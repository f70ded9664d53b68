//! A few multiplexed connections per node and (protocol version, keyspace, user), shared by
//! every client: a new one is opened only while all of them are busy, up to
//! `connections_per_node`.

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
    /// The least busy open connection.
    Ready(Arc<BackendConn>),
    /// The least busy open connection; every connection is busy and there is room for
    /// another, which the caller opens in the background ([`Pools::grow`]).
    Grow(Arc<BackendConn>),
    /// No open connection: one must be opened first ([`Pools::get`]).
    Open,
}

impl NodePool {
    /// An open connection for `key`: the least busy, unless all are busy and there is room for
    /// another (`grow`), in which case `None` says "open one".
    fn pick(&self, key: &PoolKey, per_node: usize, grow: bool) -> Option<Arc<BackendConn>> {
        let mut keyed = self.keyed.lock().unwrap_or_else(|e| e.into_inner());
        let conns = keyed.get_mut(key)?;
        conns.retain(|c| !c.is_closed());
        let best = conns.iter().min_by_key(|c| c.inflight()).cloned();
        match best {
            Some(c) if !grow || conns.len() >= per_node || c.inflight() == 0 => Some(c),
            _ => None,
        }
    }

    /// [`Pick`] without waiting: the request path never waits for a connection that exists.
    fn try_pick(&self, key: &PoolKey, per_node: usize) -> Pick {
        let mut keyed = self.keyed.lock().unwrap_or_else(|e| e.into_inner());
        let Some(conns) = keyed.get_mut(key) else {
            return Pick::Open;
        };
        if conns.iter().any(|c| c.is_closed()) {
            conns.retain(|c| !c.is_closed());
        }
        let Some(best) = conns.iter().min_by_key(|c| c.inflight()) else {
            return Pick::Open;
        };
        let busy = best.inflight() > 0 && conns.len() < per_node;
        if busy && !self.growing.swap(true, Ordering::AcqRel) {
            Pick::Grow(best.clone())
        } else {
            Pick::Ready(best.clone())
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
    per_node: usize,
    connect_timeout: Duration,
    tls: BackendTls,
    metrics: Arc<CqlMetrics>,
}

impl Pools {
    pub fn new(
        per_node: usize,
        connect_timeout: Duration,
        tls: BackendTls,
        metrics: Arc<CqlMetrics>,
    ) -> Pools {
        Pools {
            nodes: RwLock::new(HashMap::default()),
            per_node,
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
            Some(n) => n.try_pick(key, self.per_node),
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
        if let Some(c) = node.pick(key, self.per_node, true) {
            return Ok(c);
        }
        let _opening = node.opening.lock().await;
        if let Some(c) = node.pick(key, self.per_node, true) {
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
            Err(e) => match node.pick(key, self.per_node, false) {
                Some(c) if matches!(e, OpenError::Unreachable { .. }) => Ok(c),
                _ => Err(e),
            },
        }
    }
}
