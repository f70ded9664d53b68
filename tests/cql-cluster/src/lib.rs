//! A CQL test cluster: N in-memory "Cassandra" nodes on 127.0.0.1, 127.0.0.2, ... (same port),
//! with a configurable token ring, protocol v4/v5 with lz4/snappy, system tables, schema
//! statements, key/value DML with lightweight transactions, paging, prepared statements (per
//! node, lost on restart) and events. Every write reaches every replica at once (one shared
//! store), but availability follows the ring: a request fails with UNAVAILABLE when too few
//! replicas of its token are up for its consistency level.
//!
//! For every request the cluster records which node coordinated it and, when the request
//! addresses one partition, its token and replicas: [`TestCluster::records`].
//!
//! The cluster runs on its own Tokio runtime, so its API is synchronous and usable from any
//! test (async or not).

mod engine;
mod exec;
mod prepare;
mod schema;
mod server;
mod systables;
mod values;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_cql::frame::Opcode;
use sluice_cql::response::Event;
use sluice_cql::ring::{Location, ReplicaMaps, Ring};
use tokio::task::JoinHandle;

pub use sluice_cql::ring::Strategy;

/// `release_version` the nodes report.
pub const RELEASE_VERSION: &str = "4.0-rc1";
/// `cql_version` the nodes report.
pub const CQL_VERSION: &str = "3.4.5";

/// One node of a cluster to start.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub address: IpAddr,
    pub datacenter: String,
    pub rack: String,
    pub tokens: Vec<i64>,
    pub host_id: [u8; 16],
}

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub cluster_name: String,
    pub nodes: Vec<NodeSpec>,
    /// The native port every node listens on; 0 picks a free one.
    pub port: u16,
    /// PasswordAuthenticator credentials; `None` allows everyone.
    pub credentials: Option<(String, String)>,
    /// Every node speaks TLS from the first byte with this identity (Cassandra's
    /// `client_encryption_options` with `optional: false`).
    pub tls: Option<TlsIdentity>,
}

/// A PEM certificate chain and its private key.
#[derive(Debug, Clone)]
pub struct TlsIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TlsIdentity {
    fn acceptor(&self) -> std::io::Result<tokio_rustls::TlsAcceptor> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        use tokio_rustls::rustls;
        let bad = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
        let certs = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("certificate: {e}")))?;
        let key =
            PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| bad(format!("key: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| bad(e.to_string()))?;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

impl ClusterSpec {
    /// `n` nodes on 127.0.0.1..=127.0.0.n in `datacenter1`/`rack1`, `num_tokens` random-looking
    /// but reproducible tokens each.
    pub fn new(n: usize, num_tokens: usize) -> ClusterSpec {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as i64
        };
        let nodes = (0..n)
            .map(|i| {
                let address = IpAddr::V4(Ipv4Addr::new(127, 0, 0, (i + 1) as u8));
                NodeSpec {
                    address,
                    datacenter: "datacenter1".into(),
                    rack: "rack1".into(),
                    tokens: (0..num_tokens).map(|_| next()).collect(),
                    host_id: values::name_uuid(&format!("node-{address}")),
                }
            })
            .collect();
        ClusterSpec {
            cluster_name: "sluice-test".into(),
            nodes,
            port: 0,
            credentials: None,
            tls: None,
        }
    }

    /// Every node speaks TLS (only) with this certificate chain and key.
    pub fn with_tls(mut self, cert_pem: &str, key_pem: &str) -> ClusterSpec {
        self.tls = Some(TlsIdentity {
            cert_pem: cert_pem.into(),
            key_pem: key_pem.into(),
        });
        self
    }

    /// Requires PasswordAuthenticator logins with these credentials.
    pub fn with_credentials(mut self, user: &str, password: &str) -> ClusterSpec {
        self.credentials = Some((user.into(), password.into()));
        self
    }

    /// Places node `i` in a data center and rack.
    pub fn with_location(mut self, i: usize, datacenter: &str, rack: &str) -> ClusterSpec {
        if let Some(n) = self.nodes.get_mut(i) {
            n.datacenter = datacenter.into();
            n.rack = rack.into();
        }
        self
    }
}

/// One request as the coordinator saw it.
#[derive(Debug, Clone)]
pub struct Record {
    /// Index of the coordinating node.
    pub node: usize,
    pub address: IpAddr,
    /// Connection id (unique across the cluster).
    pub conn: u64,
    pub opcode: Opcode,
    /// The statement text (for EXECUTE, the prepared statement's; "BATCH" for BATCH).
    pub query: String,
    pub keyspace: Option<String>,
    pub table: Option<String>,
    /// Token of the one partition the request addresses, if it addresses one.
    pub token: Option<i64>,
    /// Replicas of that token, in ring order (node indexes).
    pub replicas: Vec<usize>,
    /// A lightweight transaction.
    pub lwt: bool,
    /// The error code, if the request failed.
    pub error: Option<i32>,
}

impl Record {
    /// Whether the coordinator is a replica of the request's token (`None` without a token).
    pub fn coordinator_is_replica(&self) -> Option<bool> {
        self.token?;
        Some(self.replicas.contains(&self.node))
    }
}

pub(crate) struct NodeInfo {
    pub address: IpAddr,
    pub datacenter: String,
    pub rack: String,
    pub tokens: Vec<i64>,
    pub host_id: [u8; 16],
}

/// An event subscription of one connection.
pub(crate) struct Subscriber {
    pub node: usize,
    pub conn: u64,
    pub types: Vec<String>,
    pub tx: tokio::sync::mpsc::UnboundedSender<server::Out>,
}

#[derive(Default)]
pub(crate) struct NodeTasks {
    pub accept: Option<JoinHandle<()>>,
    pub conns: HashMap<u64, JoinHandle<()>>,
}

/// State shared by every node.
pub(crate) struct Shared {
    pub cluster_name: String,
    pub port: u16,
    pub nodes: Vec<NodeInfo>,
    pub ring: Ring,
    /// A replica map per replication seen, made on first use (the ring never changes).
    pub placements: Mutex<ReplicaMaps>,
    pub credentials: Option<(String, String)>,
    /// TLS on every connection, when the spec asks for it.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub up: Vec<AtomicBool>,
    pub db: Mutex<schema::Db>,
    pub prepared: Vec<Mutex<HashMap<Bytes, Arc<prepare::PreparedStatement>>>>,
    pub subscribers: Mutex<Vec<Subscriber>>,
    pub records: Mutex<Vec<Record>>,
    pub tasks: Vec<Mutex<NodeTasks>>,
    pub next_conn: AtomicU64,
    /// Per node: true while the node is frozen (a SIGSTOPped process).
    pub frozen: Vec<tokio::sync::watch::Sender<bool>>,
    /// Per node: true while the node reads requests but answers none ([`TestCluster::hang`]).
    pub hung: Vec<AtomicBool>,
}

impl Shared {
    /// The replicas of `token` under `strategy`, in ring order, from a replica map made once
    /// per replication: walking the ring per request (NetworkTopologyStrategy sorts every ring
    /// entry into data centers and racks first) halved the cluster's throughput in cql-e2e.
    /// The maps agree with the walk (sluice-cql's property test) and with a real Cassandra
    /// ring's recorded replicas (its fixtures test).
    pub(crate) fn replicas(&self, strategy: &Strategy, token: i64) -> Vec<usize> {
        let map = self
            .placements
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&self.ring, strategy);
        let mut out = Vec::new();
        map.replicas_into(&self.ring, token, &mut out);
        out
    }

    pub fn is_hung(&self, node: usize) -> bool {
        self.hung[node].load(Ordering::Acquire)
    }

    pub fn is_up(&self, node: usize) -> bool {
        self.up.get(node).is_some_and(|u| u.load(Ordering::Acquire))
    }

    pub fn record(&self, r: Record) {
        self.records.lock().unwrap_or_else(|e| e.into_inner()).push(r);
    }

    /// Sends an event to every subscribed connection on up nodes (except `except`).
    pub fn broadcast(&self, event: &Event, kind: &str, except: Option<usize>) {
        let subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        for s in subs.iter() {
            if Some(s.node) == except || !self.is_up(s.node) || !s.types.iter().any(|t| t == kind) {
                continue;
            }
            let _ = s.tx.send(server::Out::Event(event.clone()));
        }
    }

    /// Waits while node `node` is frozen.
    pub async fn while_frozen(&self, node: usize) {
        let mut rx = self.frozen[node].subscribe();
        let _ = rx.wait_for(|f| !*f).await;
    }

    fn native_address(&self, node: usize) -> SocketAddr {
        SocketAddr::new(self.nodes[node].address, self.port)
    }
}

/// A running test cluster. Dropping it stops every node.
pub struct TestCluster {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

fn bind_all(spec: &ClusterSpec) -> std::io::Result<(u16, Vec<std::net::TcpListener>)> {
    for _ in 0..50 {
        let port = if spec.port != 0 {
            spec.port
        } else {
            std::net::TcpListener::bind((spec.nodes[0].address, 0))?
                .local_addr()?
                .port()
        };
        let bound: std::io::Result<Vec<_>> = spec
            .nodes
            .iter()
            .map(|n| std::net::TcpListener::bind((n.address, port)))
            .collect();
        match bound {
            Ok(l) => return Ok((port, l)),
            Err(e) if spec.port != 0 => return Err(e),
            Err(_) => continue,
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no port free on every node address",
    ))
}

impl TestCluster {
    /// Starts every node of `spec`.
    pub fn start(spec: ClusterSpec) -> std::io::Result<TestCluster> {
        assert!(!spec.nodes.is_empty(), "a cluster needs at least one node");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cql-testcluster")
            .enable_all()
            .build()?;
        let (port, listeners) = bind_all(&spec)?;
        let ring = Ring::new(
            &spec
                .nodes
                .iter()
                .map(|n| {
                    (
                        Location {
                            datacenter: n.datacenter.clone(),
                            rack: n.rack.clone(),
                        },
                        n.tokens.clone(),
                    )
                })
                .collect::<Vec<_>>(),
        );
        let n = spec.nodes.len();
        let shared = Arc::new(Shared {
            cluster_name: spec.cluster_name.clone(),
            port,
            nodes: spec
                .nodes
                .iter()
                .map(|s| NodeInfo {
                    address: s.address,
                    datacenter: s.datacenter.clone(),
                    rack: s.rack.clone(),
                    tokens: s.tokens.clone(),
                    host_id: s.host_id,
                })
                .collect(),
            ring,
            placements: Mutex::new(ReplicaMaps::default()),
            credentials: spec.credentials.clone(),
            tls: spec.tls.as_ref().map(TlsIdentity::acceptor).transpose()?,
            up: (0..n).map(|_| AtomicBool::new(true)).collect(),
            db: Mutex::new(schema::Db::default()),
            prepared: (0..n).map(|_| Mutex::new(HashMap::new())).collect(),
            subscribers: Mutex::new(Vec::new()),
            records: Mutex::new(Vec::new()),
            tasks: (0..n).map(|_| Mutex::new(NodeTasks::default())).collect(),
            frozen: (0..n).map(|_| tokio::sync::watch::channel(false).0).collect(),
            hung: (0..n).map(|_| AtomicBool::new(false)).collect(),
            next_conn: AtomicU64::new(1),
        });
        let cluster = TestCluster {
            shared,
            runtime: Some(runtime),
        };
        for (i, l) in listeners.into_iter().enumerate() {
            cluster.spawn_node(i, l)?;
        }
        Ok(cluster)
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("runtime present until drop")
    }

    fn spawn_node(&self, i: usize, listener: std::net::TcpListener) -> std::io::Result<()> {
        listener.set_nonblocking(true)?;
        let _guard = self.rt().enter();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let handle = self
            .rt()
            .spawn(server::accept_loop(self.shared.clone(), i, listener));
        self.shared.tasks[i]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .accept = Some(handle);
        Ok(())
    }

    /// The native port every node listens on.
    pub fn port(&self) -> u16 {
        self.shared.port
    }

    /// The native address of node `i`.
    pub fn address(&self, i: usize) -> SocketAddr {
        self.shared.native_address(i)
    }

    /// Every node's native address, as `host:port` strings (e.g. for a sluice config).
    pub fn contact_points(&self) -> Vec<String> {
        (0..self.shared.nodes.len())
            .map(|i| self.address(i).to_string())
            .collect()
    }

    /// The contact points as a TOML array, for a sluice `discovery.static` key.
    pub fn contact_points_toml(&self) -> String {
        let quoted: Vec<String> = self.contact_points().iter().map(|a| format!("\"{a}\"")).collect();
        format!("[{}]", quoted.join(", "))
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.shared.nodes.len()
    }

    /// Whether the cluster has no nodes (never: `start` needs one).
    pub fn is_empty(&self) -> bool {
        self.shared.nodes.is_empty()
    }

    /// The node index of an address.
    pub fn node_of(&self, ip: IpAddr) -> Option<usize> {
        self.shared.nodes.iter().position(|n| n.address == ip)
    }

    /// The replicas (node indexes, ring order) of `token` in `keyspace`.
    pub fn replicas(&self, keyspace: &str, token: i64) -> Vec<usize> {
        let db = self.shared.db.lock().unwrap_or_else(|e| e.into_inner());
        match db.keyspaces.get(keyspace) {
            Some(k) => self.shared.replicas(&k.strategy, token),
            None => Vec::new(),
        }
    }

    /// Every request recorded so far.
    pub fn records(&self) -> Vec<Record> {
        self.shared
            .records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Connections the nodes have accepted so far (every node, since the start).
    pub fn connections_accepted(&self) -> u64 {
        self.shared.next_conn.load(Ordering::Acquire) - 1
    }

    /// Forgets the records so far.
    pub fn clear_records(&self) {
        self.shared
            .records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Whether node `i` is up.
    pub fn is_up(&self, i: usize) -> bool {
        self.shared.is_up(i)
    }

    /// Stops node `i` like a crash: its port closes, its connections drop, its prepared
    /// statements are forgotten, and the other nodes announce STATUS_CHANGE DOWN.
    pub fn kill(&self, i: usize) {
        if !self.shared.up[i].swap(false, Ordering::AcqRel) {
            return;
        }
        let handles: Vec<JoinHandle<()>> = {
            let mut t = self.shared.tasks[i].lock().unwrap_or_else(|e| e.into_inner());
            let mut hs: Vec<_> = t.conns.drain().map(|(_, h)| h).collect();
            hs.extend(t.accept.take());
            hs
        };
        for h in &handles {
            h.abort();
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && !handles.iter().all(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.shared
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|s| s.node != i);
        self.shared.prepared[i]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let ev = Event::StatusChange {
            change: "DOWN".into(),
            address: self.address(i),
        };
        self.shared.broadcast(&ev, "STATUS_CHANGE", Some(i));
    }

    /// Freezes node `i` like SIGSTOP: its port still accepts TCP connections (the kernel
    /// does that) and every connection stays open, but the node reads, answers and sends
    /// nothing, and announces nothing, until [`TestCluster::thaw`]. The other nodes see
    /// nothing either (no STATUS_CHANGE), as with a real stopped process before gossip
    /// convicts it.
    pub fn freeze(&self, i: usize) {
        self.shared.frozen[i].send_replace(true);
    }

    /// Makes node `i` read every request and answer none (a wedged request executor): new
    /// connections are accepted and read too, but not even OPTIONS or STARTUP gets an
    /// answer. What arrives meanwhile is dropped, never answered. Undone by
    /// [`TestCluster::thaw`].
    pub fn hang(&self, i: usize) {
        self.shared.hung[i].store(true, Ordering::Release);
    }

    /// Freezes node `i` ([`TestCluster::freeze`]) and closes its port: new connections are
    /// refused while the established ones stay open and silent. [`TestCluster::thaw`] opens
    /// the port again.
    pub fn stop_accepting(&self, i: usize) {
        self.freeze(i);
        let accept = self.shared.tasks[i]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .accept
            .take();
        if let Some(h) = accept {
            h.abort();
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline && !h.is_finished() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// Resumes a frozen, hung or non-accepting node: what waited is read and answered (what
    /// a hung node dropped stays unanswered), and a closed port opens again.
    pub fn thaw(&self, i: usize) {
        self.shared.hung[i].store(false, Ordering::Release);
        let closed = self.is_up(i)
            && self.shared.tasks[i]
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .accept
                .is_none();
        if closed {
            for _ in 0..100 {
                match std::net::TcpListener::bind(self.address(i)) {
                    Ok(l) => {
                        let _ = self.spawn_node(i, l);
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        self.shared.frozen[i].send_replace(false);
    }

    /// Starts node `i` again (with an empty prepared statement cache) and announces
    /// STATUS_CHANGE UP once it accepts connections.
    pub fn restart(&self, i: usize) -> std::io::Result<()> {
        if self.is_up(i) {
            return Ok(());
        }
        let mut listener = None;
        for _ in 0..100 {
            match std::net::TcpListener::bind(self.address(i)) {
                Ok(l) => {
                    listener = Some(l);
                    break;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let listener =
            listener.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::AddrInUse, "cannot rebind"))?;
        self.shared.up[i].store(true, Ordering::Release);
        self.spawn_node(i, listener)?;
        let ev = Event::StatusChange {
            change: "UP".into(),
            address: self.address(i),
        };
        self.shared.broadcast(&ev, "STATUS_CHANGE", Some(i));
        Ok(())
    }

    /// Runs CQL directly on the cluster (as node 0 would), e.g. to set a schema up.
    pub fn execute(&self, cql: &str) -> Result<(), String> {
        let q = sluice_cql::request::Query {
            query: cql.to_string(),
            params: sluice_cql::request::QueryParams::new(1),
        };
        let mut session = engine::Session {
            keyspace: None,
            version: 4,
            conn: 0,
        };
        let reply = engine::handle(
            &self.shared,
            0,
            &mut session,
            Opcode::Query,
            engine::Request::Query(&q),
        );
        self.shared
            .records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        for ev in &reply.events {
            self.shared
                .broadcast(&Event::SchemaChange(ev.clone()), "SCHEMA_CHANGE", None);
        }
        match reply.response {
            sluice_cql::Response::Error(e) => Err(format!("{:#06x}: {}", e.code, e.message)),
            _ => Ok(()),
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
