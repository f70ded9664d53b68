//! CQL clusters (Cassandra, ScyllaDB): sluice looks like a one-node cluster to clients and
//! sends each request to a replica of its partition over a few multiplexed connections per
//! node. One control connection per cluster reads the ring and schema and follows events.

mod backend;
mod control;
mod forward;
mod health;
mod metrics;
mod outbox;
mod pool;
mod prepared;
mod route;
mod session;
mod snapshot;
mod systables;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use arc_swap::ArcSwap;
use serde_json::json;
use sluice_cql::response::SchemaChange;
use tokio::net::TcpStream;
use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::common::listener::{listen, Bound, Listener, Service, Task};
use crate::common::metrics::Metrics;
use crate::common::runtime::Cores;
use crate::config::{ClusterConfig, Config, CqlConfig, Discovery, Protocol};
use crate::discovery::Feed;
use backend::Credentials;
use snapshot::Snapshot;

pub use session::serve_client;

/// The CQL version sluice asks for in STARTUP (every 3.x server accepts it).
const CQL_VERSION: &str = "3.0.0";

/// Everything one CQL cluster's clients share.
pub struct CqlCluster {
    pub config: ClusterConfig,
    pub cql: CqlConfig,
    /// The configured seeds that resolved to socket addresses (static discovery).
    seeds: Vec<SocketAddr>,
    /// Kubernetes or DNS discovery: the members (pods) are the seeds, and each ring node is
    /// mapped to the pod at its IP.
    feed: Option<Feed>,
    snapshot: ArcSwap<Snapshot>,
    pub(crate) pools: pool::Pools,
    prepared: prepared::Cache,
    /// SCHEMA_CHANGE events for clients that registered for them.
    schema_events: broadcast::Sender<SchemaChange>,
    /// Credentials towards the cluster: configured, or the first client's that worked.
    credentials: Mutex<Option<Credentials>>,
    /// Wakes the control connection when credentials arrive.
    credentials_ready: tokio::sync::Notify,
    pub clients: AtomicUsize,
    pub(crate) metrics: Arc<Metrics>,
    /// `sluice_queries_total{route}`: requests sent to a replica of their partition
    /// (`replica`), and requests without a partition to route by (`any`).
    routed: [crate::common::metrics::QueryCounter; 2],
    /// `sluice_clients`.
    client_gauge: prometheus_client::metrics::gauge::Gauge,
    /// The `sluice_cql_*` series of this cluster.
    pub(crate) cql_metrics: Arc<metrics::CqlMetrics>,
    /// TLS towards clients (`tls_cert`/`tls_key`, `tls_client_ca`).
    client_tls: Option<tokio_rustls::TlsAcceptor>,
    /// TLS towards the nodes (`backend_tls`).
    backend_tls: crate::common::tls::BackendTls,
}

impl CqlCluster {
    /// Counts a request routed by its partition (`true`) or to any node.
    pub(crate) fn routed(&self, by_partition: bool) {
        self.routed[usize::from(by_partition)].inc();
    }

    /// Counts an error sluice answered a client with (`sluice_errors_total{reason}`).
    pub(crate) fn error(&self, reason: &'static str) {
        self.metrics.error(&self.config.name, reason);
    }

    /// A cluster that knows its seeds only (the static ones, or those `feed` discovers);
    /// `spawn_background` starts learning the rest.
    pub fn new(
        config: ClusterConfig,
        feed: Option<Feed>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<CqlCluster>> {
        let client_tls = crate::common::tls::client_acceptor(&config)
            .map_err(|e| anyhow::anyhow!("cluster {:?}: client TLS: {e}", config.name))?;
        let backend_tls =
            crate::common::tls::BackendTls::new(config.backend_tls, config.backend_tls_ca.as_deref())
                .map_err(|e| anyhow::anyhow!("cluster {:?}: backend_tls: {e}", config.name))?;
        let cql_metrics = Arc::new(metrics::CqlMetrics::new(metrics.clone(), &config.name));
        let addrs: Vec<String> = match &config.discovery {
            Discovery::Static(a) => a.clone(),
            _ => Vec::new(),
        };
        let seeds: Vec<SocketAddr> = addrs
            .iter()
            .filter_map(|a| {
                use std::net::ToSocketAddrs;
                match a.to_socket_addrs() {
                    Ok(mut it) => it.next(),
                    Err(e) => {
                        warn!(cluster = %config.name, seed = %a, error = %e, "cannot resolve a CQL seed");
                        None
                    }
                }
            })
            .collect();
        let Some(cql) = config.cql().cloned() else {
            anyhow::bail!("cluster {:?} is not a CQL cluster", config.name);
        };
        let credentials = match (&cql.username, &cql.password) {
            (Some(u), Some(p)) => Some(Credentials {
                user: u.clone(),
                password: p.clone(),
            }),
            _ => None,
        };
        let routed = ["any", "replica"].map(|route| {
            metrics
                .queries
                .get_or_create(&crate::common::metrics::RouteLabels {
                    cluster: config.name.clone(),
                    route,
                })
                .clone()
        });
        let client_gauge = metrics
            .clients
            .get_or_create(&crate::common::metrics::ClusterLabels {
                cluster: config.name.clone(),
            })
            .clone();
        Ok(Arc::new(CqlCluster {
            pools: pool::Pools::new(
                cql.connections_per_node,
                config.connect_timeout,
                backend_tls.clone(),
                cql_metrics.clone(),
            ),
            cql_metrics,
            client_tls,
            backend_tls,
            snapshot: ArcSwap::from_pointee(Snapshot::seeds(&seeds)),
            seeds,
            feed,
            prepared: prepared::Cache::default(),
            schema_events: broadcast::channel(1024).0,
            credentials: Mutex::new(credentials),
            credentials_ready: tokio::sync::Notify::new(),
            clients: AtomicUsize::new(0),
            routed,
            client_gauge,
            metrics,
            cql,
            config,
        }))
    }

    /// Starts the control connection, the prober of down nodes, the heartbeat of node
    /// connections and the sweep of timed-out requests (and, with discovery, the follower of
    /// the member list).
    fn spawn_background(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = vec![
            tokio::spawn(control::run(self.clone())),
            tokio::spawn(control::probe_down_nodes(self.clone())),
            tokio::spawn(health::heartbeat(self.clone())),
        ];
        // Not among the tasks stopped with the cluster: requests in flight may outlive it
        // (see `sweep_timeouts`).
        tokio::spawn(forward::sweep_timeouts(Arc::downgrade(self)));
        if let Some(feed) = &self.feed {
            tasks.push(tokio::spawn(follow_members(
                Arc::downgrade(self),
                feed.members.clone(),
            )));
        }
        tasks
    }

    /// Where the control connection may start: the static seeds, or the addresses of the
    /// currently discovered members.
    async fn current_seeds(&self) -> Vec<SocketAddr> {
        let Some(feed) = &self.feed else {
            return self.seeds.clone();
        };
        let addrs: Vec<String> = feed
            .members
            .borrow()
            .iter()
            .flatten()
            .map(|m| m.address.clone())
            .collect();
        let mut out = Vec::new();
        for a in addrs {
            match tokio::net::lookup_host(a.as_str()).await {
                Ok(mut it) => out.extend(it.next()),
                Err(e) => {
                    warn!(cluster = %self.config.name, member = %a, error = %e, "cannot resolve a discovered CQL node")
                }
            }
        }
        out
    }

    /// Seeds that stay in the ring even when the nodes do not list them: the static ones only
    /// (discovered members are only where to start).
    fn pinned_seeds(&self) -> &[SocketAddr] {
        &self.seeds
    }

    /// Maps each ring node to the discovered pod at its IP (pod name and zone).
    fn map_pods(&self) {
        let Some(feed) = &self.feed else { return };
        self.update(|s| s.with_pods(|ip| feed.member_for_ip(ip).map(|m| (m.id, m.zone))));
    }

    /// The current snapshot.
    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Publishes a new snapshot built from the current one; returns the one it replaced.
    fn update(&self, f: impl Fn(&Snapshot) -> Option<Snapshot>) -> Arc<Snapshot> {
        let before = self.snapshot.rcu(|cur| match f(cur) {
            Some(next) => Arc::new(next),
            None => cur.clone(),
        });
        // `sluice_node_healthy{cluster,node}`, as for PostgreSQL nodes.
        for n in &self.snapshot().nodes {
            self.metrics
                .node_healthy
                .get_or_create(&crate::common::metrics::NodeLabels {
                    cluster: self.config.name.clone(),
                    node: n.addr.to_string(),
                })
                .set(i64::from(n.health.up));
        }
        before
    }

    /// Credentials towards the cluster, if any are known.
    fn credentials(&self) -> Option<Credentials> {
        self.credentials.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Remembers credentials a client proved valid, if none are known yet.
    fn offer_credentials(&self, c: &Credentials) {
        let mut cur = self.credentials.lock().unwrap_or_else(|e| e.into_inner());
        if cur.is_none() {
            *cur = Some(c.clone());
            self.credentials_ready.notify_waiters();
        }
    }

    /// The data center whose replicas are preferred. With Kubernetes or DNS discovery `zone`
    /// is the pods' zone, not a data center, so it is not the default there.
    fn local_datacenter(&self, snap: &Snapshot) -> Option<String> {
        self.local_datacenter_in(snap).map(str::to_string)
    }

    /// [`CqlCluster::local_datacenter`], borrowed (the request path allocates nothing for it).
    fn local_datacenter_in<'a>(&'a self, snap: &'a Snapshot) -> Option<&'a str> {
        let zone = match self.feed {
            None => self.config.zone.as_deref(),
            Some(_) => None,
        };
        self.cql
            .local_datacenter
            .as_deref()
            .or(zone)
            .or_else(|| snap.first_datacenter())
    }

    /// Why the cluster cannot take traffic yet, if it cannot.
    pub fn not_ready(&self) -> Option<String> {
        let s = self.snapshot();
        if !s.ring_known && !s.auth_required {
            return Some(format!(
                "cluster {:?} has not read the CQL ring yet",
                self.config.name
            ));
        }
        if !s.any_up() {
            return Some(format!(
                "cluster {:?} has no reachable CQL node",
                self.config.name
            ));
        }
        None
    }

    /// The JSON view for /topology.
    pub fn topology_json(&self) -> serde_json::Value {
        let s = self.snapshot();
        // The same shares as the status page's ring and SHOW RING.
        let owned = crate::admin::status::ownership(s.nodes.iter().map(|n| n.tokens.as_slice()));
        let nodes: Vec<_> = s
            .nodes
            .iter()
            .zip(owned)
            .map(|(n, share)| {
                json!({
                    "address": n.addr.to_string(),
                    "id": n.pod,
                    "zone": n.zone,
                    "role": "replica",
                    "healthy": n.health.up,
                    "datacenter": n.datacenter,
                    "rack": n.rack,
                    "tokens": n.tokens.len(),
                    "ownership": share,
                    "error": n.health.error,
                    "open_connections": self.pools.open_connections(n.addr),
                    "inflight": self.pools.inflight(n.addr),
                })
            })
            .collect();
        let mut keyspaces: Vec<_> = s.keyspaces.keys().cloned().collect();
        keyspaces.sort();
        json!({
            "name": self.config.name,
            "protocol": "cql",
            "listen": self.config.listen.to_string(),
            "generation": s.generation,
            "ring_known": s.ring_known,
            "cluster_name": s.info.cluster_name,
            "local_datacenter": self.local_datacenter(&s),
            "zone": self.config.zone,
            "discovery": self.feed.as_ref().map_or("static", |f| f.status.source),
            "keyspaces": keyspaces,
            "prepared_statements": self.prepared.len(),
            "clients": self.clients.load(Ordering::Relaxed),
            "nodes": nodes,
        })
    }
}

/// A started CQL cluster; dropping it stops its control connection and its listener
/// (connected clients keep their sessions).
pub struct Running {
    pub cluster: Arc<CqlCluster>,
    _tasks: Vec<Task>,
}

/// Separates the CQL clusters (run by this module) from the rest of a configuration.
pub fn split(mut config: Config) -> (Config, Vec<ClusterConfig>) {
    let (cql, rest): (Vec<_>, Vec<_>) = config
        .clusters
        .into_iter()
        .partition(|c| c.protocol() == Protocol::Cql);
    config.clusters = rest;
    (config, cql)
}

/// How long start-up waits for discovery's first member list before going on without it (the
/// control connection starts as soon as members arrive).
const FIRST_MEMBERS_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Starts a cluster: discovery (whose start-up errors, credentials or RBAC, are returned),
/// the control connection and its background tasks. Clients reach it through a [`Listener`].
async fn start(c: &ClusterConfig, metrics: &Arc<Metrics>) -> anyhow::Result<Running> {
    let feed = match &c.discovery {
        Discovery::Static(_) => None,
        d => {
            let mut feed = crate::discovery::start(&c.name, d, metrics).await?;
            if feed.synced(FIRST_MEMBERS_WAIT).await.is_none() {
                warn!(cluster = %c.name, source = feed.status.source, "no CQL nodes discovered yet; waiting for them");
            }
            Some(feed)
        }
    };
    let cluster = CqlCluster::new(c.clone(), feed, metrics.clone())?;
    let tasks = cluster.spawn_background().into_iter().map(Task::from).collect();
    Ok(Running {
        cluster,
        _tasks: tasks,
    })
}

/// Every CQL cluster of the configuration, their listeners, and replaced clusters whose
/// clients have not all left (they keep their background tasks until then).
pub struct CqlClusters {
    configs: Vec<ClusterConfig>,
    running: Vec<Running>,
    listeners: std::collections::HashMap<SocketAddr, Listener<CqlCluster>>,
    retiring: Vec<Running>,
    /// The runtimes the listeners accept on (one socket per core). Each core opens node
    /// connections of its own for its clients' requests: see `pool.rs`.
    cores: Cores,
}

/// What a reload will change, prepared before anything changes: the clusters started anew
/// and the addresses bound for them.
pub struct Prepared {
    configs: Vec<ClusterConfig>,
    started: Vec<Option<Running>>,
    bound: std::collections::HashMap<SocketAddr, Bound>,
}

impl CqlClusters {
    /// Binds the listeners of `configs` and starts each cluster.
    pub async fn start(
        configs: Vec<ClusterConfig>,
        metrics: &Arc<Metrics>,
        cores: Cores,
    ) -> anyhow::Result<CqlClusters> {
        let mut set = CqlClusters {
            configs: Vec::new(),
            running: Vec::new(),
            listeners: Default::default(),
            retiring: Vec::new(),
            cores,
        };
        let prepared = set.prepare(configs, metrics).await?;
        set.commit(prepared);
        Ok(set)
    }

    /// The running clusters (for the admin endpoints).
    pub fn clusters(&self) -> Vec<Arc<CqlCluster>> {
        self.running.iter().map(|r| r.cluster.clone()).collect()
    }

    /// Starts the clusters of `configs` that are new or changed and binds their new listen
    /// addresses. Nothing running changes; an error leaves everything as it was.
    pub async fn prepare(
        &self,
        configs: Vec<ClusterConfig>,
        metrics: &Arc<Metrics>,
    ) -> anyhow::Result<Prepared> {
        let mut started = Vec::new();
        let mut bound = std::collections::HashMap::new();
        for c in &configs {
            if !self.listeners.contains_key(&c.listen) && !bound.contains_key(&c.listen) {
                let l = listen(c.listen, &self.cores)
                    .with_context(|| format!("cluster {:?}: cannot listen on {}", c.name, c.listen))?;
                bound.insert(c.listen, l);
            }
            let unchanged = self.configs.iter().any(|old| old == c);
            started.push(if unchanged {
                None
            } else {
                Some(start(c, metrics).await?)
            });
        }
        Ok(Prepared {
            configs,
            started,
            bound,
        })
    }

    /// Switches to what `prepare` made: unchanged clusters stay as they are, listeners point
    /// at the new clusters, replaced ones retire once their clients have left, and listen
    /// addresses no longer configured close.
    pub fn commit(&mut self, p: Prepared) {
        let Prepared {
            configs,
            started,
            mut bound,
        } = p;
        let mut old: Vec<Running> = std::mem::take(&mut self.running);
        let mut next = Vec::new();
        for (c, new) in configs.iter().zip(started) {
            let running = match new {
                Some(r) => r,
                None => {
                    let i = old
                        .iter()
                        .position(|r| r.cluster.config == *c)
                        .expect("unchanged cluster is running");
                    old.swap_remove(i)
                }
            };
            next.push(running);
        }
        self.retiring
            .retain(|r| r.cluster.clients.load(Ordering::Acquire) > 0);
        self.retiring.extend(old);
        let mut listeners = std::collections::HashMap::new();
        for r in &next {
            let c = &r.cluster.config;
            let listener = match self.listeners.remove(&c.listen) {
                Some(l) => {
                    l.point_at(r.cluster.clone());
                    l
                }
                None => {
                    let socket = bound.remove(&c.listen).expect("bound in prepare");
                    Listener::start(socket, r.cluster.clone())
                }
            };
            info!(cluster = %c.name, listen = %c.listen, "listening (CQL)");
            listeners.insert(c.listen, listener);
        }
        // Listeners no longer configured close here.
        self.listeners = listeners;
        self.running = next;
        self.configs = configs;
    }
}

/// Maps ring nodes to pods again whenever the discovered members change.
async fn follow_members(
    cluster: std::sync::Weak<CqlCluster>,
    mut members: tokio::sync::watch::Receiver<Option<Vec<crate::common::topology::Member>>>,
) {
    while members.changed().await.is_ok() {
        let Some(cluster) = cluster.upgrade() else { return };
        cluster.map_pods();
    }
}

impl Service for CqlCluster {
    fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> impl Future<Output = ()> + Send + 'static {
        serve_client(self, stream, peer)
    }
}
