//! A few multiplexed connections per node and (protocol version, keyspace, user), shared by
//! every client: a new one is opened only while all of them are busy, up to
//! `connections_per_node`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;

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

/// The connections to one node.
pub struct NodePool {
    keyed: Mutex<HashMap<PoolKey, Vec<Arc<BackendConn>>>>,
    opening: tokio::sync::Mutex<()>,
    /// Requests sent to this node and not answered yet (all keys).
    inflight: AtomicUsize,
    /// Requests in a row that got no answer within the request timeout.
    timeouts: AtomicUsize,
    /// `sluice_cql_node_connections` and `sluice_cql_node_inflight` of this node.
    connections_gauge: Gauge,
    inflight_gauge: Gauge,
}

impl NodePool {
    /// An open connection for `key`: the least busy, unless all are busy and there is room for
    /// another (`grow`), in which case `None` says "open one".
    fn pick(&self, key: &PoolKey, per_node: usize, grow: bool) -> Option<Arc<BackendConn>> {
        let mut keyed = self.keyed.lock().unwrap_or_else(|e| e.into_inner());
        let conns = keyed.entry(key.clone()).or_default();
        conns.retain(|c| !c.is_closed());
        let best = conns.iter().min_by_key(|c| c.inflight()).cloned();
        match best {
            Some(c) if !grow || conns.len() >= per_node || c.inflight() == 0 => Some(c),
            _ => None,
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

/// Counts a request in flight on a node for as long as it lives.
pub struct InflightGuard(Arc<NodePool>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
        self.0.inflight_gauge.dec();
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
            nodes: RwLock::new(HashMap::new()),
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
                    inflight: AtomicUsize::new(0),
                    timeouts: AtomicUsize::new(0),
                    connections_gauge,
                    inflight_gauge,
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
            .map_or(0, |n| n.inflight.load(Ordering::Relaxed))
    }

    /// Open connections to a node.
    pub fn open_connections(&self, addr: SocketAddr) -> usize {
        self.nodes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&addr)
            .map_or(0, |n| n.count())
    }

    /// Marks a request in flight to `addr` until the guard drops.
    pub fn track(&self, addr: SocketAddr) -> InflightGuard {
        let n = self.node(addr);
        n.inflight.fetch_add(1, Ordering::Relaxed);
        n.inflight_gauge.inc();
        InflightGuard(n)
    }

    /// Counts a request to `addr` that timed out; returns how many in a row have.
    pub fn timed_out(&self, addr: SocketAddr) -> usize {
        self.node(addr).timeouts.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A request to `addr` got its answer: the timeouts in a row start again from 0.
    pub fn answered(&self, addr: SocketAddr) {
        self.reset_timeouts(addr);
    }

    /// Forgets the timeouts in a row of a node (it was marked down or up).
    pub fn reset_timeouts(&self, addr: SocketAddr) {
        if let Some(n) = self.nodes.read().unwrap_or_else(|e| e.into_inner()).get(&addr) {
            if n.timeouts.load(Ordering::Relaxed) != 0 {
                n.timeouts.store(0, Ordering::Relaxed);
            }
        }
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
