//! One configured cluster at run time: its topology, pools, users, probes and route choice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use sluice_postgres::scram::ScramSecret;
use sluice_postgres::Classifier;
use tracing::{error, info, warn};

use crate::common::health::{self, Source};
use crate::common::metrics::{ClusterLabels, Metrics, NodeLabels, ResultLabels, RouteLabels};
use crate::common::topology::{InFlight, Member, Node, Observation, Role, Topology};
use crate::config::{ClusterConfig, Discovery, PostgresConfig, TopologyKind};
use crate::postgres::backend::{
    own_startup_params, same_startup, Backend, BackendError, ConnectOptions, Credential, PassThrough,
    StartupParams, NO_CREDENTIAL,
};
use crate::postgres::functions::CatalogSlot;
use crate::postgres::pool::{PoolError, PoolSettings, Pooled, Pools};
use crate::postgres::router::{self, Intent, NoRoute, Policy};

/// SCRAM iteration count for the secrets sluice derives from configured passwords.
const SCRAM_ITERATIONS: u32 = 4096;

/// ParameterStatus values a backend announced.
pub type ServerParams = Arc<Vec<(String, String)>>;

/// What a primary announced to a connection opened as (user, database) with these startup
/// parameters: what the next such client is told at login while that node is the primary.
struct KnownParams {
    node: Arc<str>,
    startup: StartupParams,
    params: ServerParams,
}

/// Parameter sets remembered per (user, database); clients with more distinct startup
/// parameters than this still log in, with a backend connection each time.
const KNOWN_PARAMS_PER_DATABASE: usize = 32;

/// See [`Cluster::credential`].
pub enum UserCredential<'a> {
    Configured(&'a Credential),
    Found(Option<Arc<User>>),
}

impl std::ops::Deref for UserCredential<'_> {
    type Target = Credential;
    fn deref(&self) -> &Credential {
        match self {
            UserCredential::Configured(c) => c,
            UserCredential::Found(u) => u.as_ref().map_or(&NO_CREDENTIAL, |u| &u.credential),
        }
    }
}

/// A configured user with its SCRAM secret derived once at start (or read from the stored
/// verifier it is configured with).
pub struct User {
    /// How sluice logs in to the servers as this user.
    pub credential: Credential,
    /// What clients prove with SCRAM; None for a user known by its md5 hash only, whose
    /// clients authenticate with md5.
    pub secret: Option<ScramSecret>,
}

impl User {
    /// A user known by what `pg_authid` stores: a SCRAM-SHA-256 verifier (SCRAM pass-through
    /// towards the servers) or an md5 hash (md5 both ways). None for anything else.
    pub fn from_stored(stored: &str) -> Option<User> {
        if let Some(secret) = ScramSecret::parse(stored) {
            return Some(User {
                credential: Credential::PassThrough(Arc::new(PassThrough::new(secret.server_key()))),
                secret: Some(secret),
            });
        }
        sluice_postgres::md5::is_stored_hash(stored).then(|| User {
            credential: Credential::Md5(stored.to_string()),
            secret: None,
        })
    }

    /// Whether the user was made from this stored verifier or hash.
    pub fn is_from(&self, stored: &str) -> bool {
        match (&self.credential, &self.secret) {
            (Credential::Md5(hash), _) => hash == stored,
            (Credential::PassThrough(_), Some(secret)) => secret.verifier() == stored,
            _ => false,
        }
    }
}

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

/// A cluster at run time.
pub struct Cluster {
    pub config: ClusterConfig,
    /// The PostgreSQL settings of `config`.
    pub pg: PostgresConfig,
    /// Answers clients' SSLRequest when a certificate is configured.
    pub client_tls: Option<tokio_rustls::TlsAcceptor>,
    /// How connections to backends are made.
    pub backend_tls: crate::common::tls::BackendTls,
    pub topology: Topology,
    pub pools: Pools,
    pub metrics: Arc<Metrics>,
    pub classifier: Classifier,
    pub users: HashMap<String, User>,
    /// Used for unknown users so that they go through the same exchange and fail the same way.
    pub dummy_secret: ScramSecret,
    /// By (user, database): what primaries announced, looked up at login.
    server_params: Mutex<HashMap<(String, String), Vec<KnownParams>>>,
    /// `sluice_queries_total` for `Intent::Primary` and `Intent::Replica`, resolved once.
    routed: [crate::common::metrics::QueryCounter; 2],
    cancels: Mutex<HashMap<(i32, i32), CancelSlot>>,
    /// Connected clients, for `max_client_connections`.
    pub clients: AtomicUsize,
    /// Sessions started, for session ids.
    sessions: std::sync::atomic::AtomicU64,
    /// Each database's functions, for classification.
    pub functions: crate::postgres::functions::Catalogs,
    /// The admin console (shared by every cluster): who may use it, and what is paused.
    pub console: Arc<crate::admin::console::Console>,
    /// Logged-in clients and per-database activity, for the console.
    pub activity: crate::postgres::activity::Activity,
    /// Roles found by `auth_query` (not in the configuration).
    pub dynamic: crate::postgres::auth_query::DynamicUsers,
    /// The write hold in progress (`write_hold`), for its log lines and gauge.
    hold: Mutex<HoldState>,
    /// Wakes the probes at once (a node refused a write).
    probe_now: tokio::sync::Notify,
    /// Writes refused by a primary so far: a probe that ran meanwhile may have been answered
    /// before the cause, and is repeated.
    refusals: std::sync::atomic::AtomicU64,
}

/// Where a `write_hold` cluster stands: holding writes since when, and how many were held.
#[derive(Default)]
struct HoldState {
    /// A confirmed writable primary has been seen.
    seen_writable: bool,
    since: Option<std::time::Instant>,
    held: u64,
}

impl Cluster {
    /// Builds the run-time state (derives SCRAM secrets: slow on purpose, done once), with
    /// pools split over `cores` runtimes.
    pub fn new(
        config: ClusterConfig,
        pg: PostgresConfig,
        metrics: Arc<Metrics>,
        console: Arc<crate::admin::console::Console>,
        cores: usize,
    ) -> Arc<Cluster> {
        let members = match &config.discovery {
            Discovery::Static(a) => a.iter().map(|a| Member::at(a)).collect(),
            // Dynamic discovery fills the member list once it has looked.
            _ => Vec::new(),
        };
        let mut rng = rand::rng();
        let users = config
            .users
            .iter()
            .map(|u| {
                // A stored verifier or md5 hash (validated with the configuration), else a
                // password.
                let user = User::from_stored(&u.password).unwrap_or_else(|| {
                    let salt: [u8; 16] = rng.random();
                    User {
                        secret: Some(ScramSecret::new(&u.password, &salt, SCRAM_ITERATIONS)),
                        credential: Credential::Password(u.password.clone()),
                    }
                });
                (u.name.clone(), user)
            })
            .collect();
        let dummy: [u8; 16] = rng.random();
        let salt: [u8; 16] = rng.random();
        // Both were loaded once already when the configuration was validated.
        let client_tls = crate::common::tls::client_acceptor(&config)
            .map_err(|e| error!(cluster = %config.name, "client TLS disabled: {e}"))
            .ok()
            .flatten();
        let backend_tls =
            crate::common::tls::BackendTls::new(config.backend_tls, config.backend_tls_ca.as_deref())
                .unwrap_or_else(|e| {
                    error!(cluster = %config.name, "backend TLS disabled: {e}");
                    crate::common::tls::BackendTls::disabled()
                });
        let pools = Pools::new(
            &config.name,
            PoolSettings {
                size: pg.pool_size,
                checkout_timeout: pg.checkout_timeout,
                connect_timeout: config.connect_timeout,
                idle_timeout: pg.idle_timeout,
                max_lifetime: pg.max_lifetime,
            },
            backend_tls.clone(),
            metrics.clone(),
            cores,
        );
        let cluster = Arc::new(Cluster {
            client_tls,
            backend_tls,
            topology: Topology::new(Vec::new()),
            pools,
            classifier: Classifier::new(&pg.write_functions),
            users,
            dummy_secret: ScramSecret::new(&String::from_utf8_lossy(&dummy), &salt, SCRAM_ITERATIONS),
            server_params: Mutex::new(HashMap::new()),
            routed: [Intent::Primary, Intent::Replica].map(|intent| {
                metrics
                    .queries
                    .get_or_create(&RouteLabels {
                        cluster: config.name.clone(),
                        route: intent.label(),
                    })
                    .clone()
            }),
            cancels: Mutex::new(HashMap::new()),
            clients: AtomicUsize::new(0),
            sessions: std::sync::atomic::AtomicU64::new(0),
            functions: Default::default(),
            console,
            activity: Default::default(),
            dynamic: Default::default(),
            hold: Mutex::new(HoldState::default()),
            probe_now: tokio::sync::Notify::new(),
            refusals: Default::default(),
            metrics,
            config,
            pg,
        });
        cluster.metrics.init_cluster(&cluster.config.name);
        if cluster.pg.write_hold.is_some() {
            cluster.metrics.init_write_hold(&cluster.config.name);
        }
        cluster.set_members(&members);
        cluster
    }

    /// Starts the probe supervisor (one probe task per node, following membership changes)
    /// and the pool reaper.
    /// Aborting the returned tasks stops the probes too (a cluster retired by a reload).
    pub fn spawn_background(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        let c = self.clone();
        let supervisor = tokio::spawn(async move { c.supervise_probes().await });
        let c = self.clone();
        let reaper = tokio::spawn(async move {
            let every = (c.pg.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(10));
            loop {
                tokio::time::sleep(every).await;
                c.pools.reap();
            }
        });
        vec![supervisor, reaper]
    }

    /// Keeps exactly one probe task per member node.
    async fn supervise_probes(self: Arc<Self>) {
        let mut probes = ProbeTasks::default();
        let probes = &mut probes.0;
        let mut changes = self.topology.subscribe();
        loop {
            let snap = self.topology.load();
            probes.retain(|id, task| {
                let keep = snap.index_of(id).is_some();
                if !keep {
                    task.abort();
                }
                keep
            });
            for n in &snap.nodes {
                if !probes.contains_key(&n.id) {
                    let c = self.clone();
                    let id = n.id.clone();
                    probes.insert(n.id.clone(), tokio::spawn(async move { c.probe_loop(id).await }));
                }
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// Replaces the node list (from discovery) and closes pooled connections to addresses that
    /// are gone.
    pub fn set_members(&self, members: &[Member]) {
        for address in self.topology.set_members(members) {
            self.pools.drain(&address);
        }
        // A role label may announce a new primary.
        self.track_hold();
    }

    /// Starts or ends the write hold of a `write_hold` cluster as the topology changes: one log
    /// line each way and the `sluice_write_hold_active` gauge.
    fn track_hold(&self) {
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

    fn labels(&self) -> ClusterLabels {
        ClusterLabels {
            cluster: self.config.name.clone(),
        }
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
        let mut held_since = None;
        let result = self
            .attach_inner(intent, user, database, startup, min_lsn, parked, &mut held_since)
            .await;
        if let Some(since) = held_since {
            self.metrics
                .write_hold_wait
                .get_or_create(&self.labels())
                .observe(since.elapsed().as_secs_f64());
        }
        result
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
        let node = self.choose(intent, &snap, &policy).ok()?;
        match parked.take()?.resume(&snap.nodes[node]) {
            Ok(p) => {
                self.routed[usize::from(intent == Intent::Replica)].inc();
                Some(p)
            }
            Err(p) => {
                drop(p); // back to the pool; `attach` checks one out
                None
            }
        }
    }

    /// The router's choice for one request on this snapshot.
    fn choose(
        &self,
        intent: Intent,
        snap: &crate::common::topology::Snapshot,
        policy: &Policy<'_>,
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
        let tiebreak = next_tiebreak();
        router::choose(intent, snap, loads, tiebreak, policy)
    }

    #[allow(clippy::too_many_arguments)]
    async fn attach_inner(
        &self,
        intent: Intent,
        user: &str,
        database: &str,
        startup: &StartupParams,
        min_lsn: Option<u64>,
        parked: &mut Option<Checkout>,
        held_since: &mut Option<tokio::time::Instant>,
    ) -> Result<Checkout, AttachError> {
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

    /// The ParameterStatus values to announce to a client logging in as (user, database) with
    /// these startup parameters: those of the node that serves its writes, as a direct
    /// connection to the primary would announce them. Remembered per primary; when they are not
    /// known (or `fresh`), a connection is checked out and returned with them, for the session
    /// to keep. With no primary at all, a replica's values are announced as a primary's
    /// (`in_hot_standby = off`): the listener takes writes, which wait for a primary.
    pub async fn login_params(
        &self,
        user: &str,
        database: &str,
        startup: &StartupParams,
        fresh: bool,
    ) -> Result<(ServerParams, Option<Checkout>), AttachError> {
        let multi_active = self.pg.topology == TopologyKind::MultiActive;
        let primary = {
            let snap = self.topology.load();
            snap.primary().map(|i| snap.nodes[i].address.clone())
        };
        let key = (user.to_string(), database.to_string());
        if let (Some(node), false) = (&primary, fresh) {
            let map = self.server_params.lock().expect("params lock");
            let known = map.get(&key).and_then(|v| {
                v.iter()
                    .find(|k| *k.node == **node && same_startup(&k.startup, startup))
            });
            if let Some(k) = known {
                return Ok((k.params.clone(), None));
            }
        }
        let intent = if primary.is_some() || multi_active || fresh {
            Intent::Primary
        } else {
            Intent::Replica
        };
        let mut checkout = self
            .attach(intent, user, database, startup, None, &mut None)
            .await?;
        let mut params = checkout.conn.conn().params.clone();
        if checkout.role != Role::Primary && !multi_active {
            for (k, v) in params.iter_mut() {
                if k == "in_hot_standby" || k == "default_transaction_read_only" {
                    *v = "off".to_string();
                }
            }
        }
        let params = Arc::new(params);
        if checkout.role == Role::Primary {
            let mut map = self.server_params.lock().expect("params lock");
            let known = map.entry(key).or_default();
            known.retain(|k| !same_startup(&k.startup, startup));
            if known.len() >= KNOWN_PARAMS_PER_DATABASE {
                known.remove(0);
            }
            known.push(KnownParams {
                node: Arc::from(checkout.conn.node()),
                startup: startup.clone(),
                params: params.clone(),
            });
        }
        Ok((params, Some(checkout)))
    }

    /// The function catalog of `database` (see `functions.rs`): loaded now if it never was
    /// (the caller waits), reloaded in the background if stale.
    pub async fn function_catalog(self: &Arc<Self>, user: &str, database: &str) -> Arc<CatalogSlot> {
        let slot = self.functions.slot(database);
        if crate::postgres::functions::due(&slot) {
            let first = slot.get().is_none();
            let load = {
                let (cluster, slot, user, database) =
                    (self.clone(), slot.clone(), user.to_string(), database.to_string());
                async move { cluster.load_functions(&slot, &user, &database).await }
            };
            if first {
                load.await;
            } else {
                tokio::spawn(load);
            }
        }
        slot
    }

    /// Reloads the function catalog of `database` in the background (a client changed its
    /// functions).
    pub fn refresh_functions(self: &Arc<Self>, user: &str, database: &str) {
        let slot = self.functions.slot(database);
        slot.invalidate();
        let (cluster, user, database) = (self.clone(), user.to_string(), database.to_string());
        tokio::spawn(async move { cluster.function_catalog(&user, &database).await });
    }

    async fn load_functions(&self, slot: &CatalogSlot, user: &str, database: &str) {
        let Some(addr) = self.lookup_node() else { return };
        let credential = self.credential(user);
        let params = own_startup_params();
        let source = ConnectOptions {
            addr: &addr,
            user,
            credential: &credential,
            database,
            params: &params,
            timeout: self.config.connect_timeout,
            tls: &self.backend_tls,
        };
        crate::postgres::functions::load(slot, &self.classifier, source).await;
    }

    /// Applies an observation to the topology and reacts to what changed.
    pub fn observe(&self, id: &str, obs: &Observation) {
        let change = self.topology.observe(id, obs);
        let snap = self.topology.load();
        let Some(node) = snap.index_of(id).map(|i| &snap.nodes[i]) else {
            return;
        };
        let labels = NodeLabels {
            cluster: self.config.name.clone(),
            node: node.address.clone(),
        };
        self.metrics
            .node_primary
            .get_or_create(&labels)
            .set(i64::from(node.health.up && node.role == Role::Primary));
        self.metrics
            .node_healthy
            .get_or_create(&labels)
            .set(i64::from(node.health.up));
        if change.health_changed {
            if let Some(verdict) = obs.verdict() {
                health::announce(
                    &self.metrics,
                    "PostgreSQL",
                    &self.config.name,
                    &node.address,
                    &verdict,
                );
            }
        }
        if change.role_changed {
            info!(node = %node.address, role = ?node.role, healthy = node.health.up, generation = snap.generation, "node role changed");
        }
        if change.role_changed || change.health_changed || change.writable_changed {
            self.track_hold();
        }
        // The node has the last word on its role; a label that says otherwise is counted
        // (once per disagreement) and logged, never followed.
        let disagrees =
            node.health.up && node.role != Role::Unknown && node.labeled_role.is_some_and(|l| l != node.role);
        let was = self
            .metrics
            .role_disagreement
            .get_or_create(&labels)
            .set(i64::from(disagrees));
        // Created at 0 with the node, so that the series exists before the first disagreement.
        let started = self.metrics.role_disagreements.get_or_create_owned(&labels);
        if disagrees && was == 0 {
            started.inc();
            warn!(node = %node.address, id = %node.id, labeled = ?node.labeled_role, probed = ?node.role, "the node's role label disagrees with the node; following the node");
        }
        if change.lost_primary
            || (change.health_changed && !node.health.up)
            || (change.role_changed && node.role != Role::Primary)
        {
            // Idle connections to a demoted or dead node must not serve anyone again.
            self.pools.drain(&node.address);
        }
    }

    async fn probe_loop(self: Arc<Self>, id: String) {
        let probe_user = self
            .pg
            .probe_user
            .clone()
            .or_else(|| self.config.users.first().map(|u| u.name.clone()))
            .unwrap_or_default();
        let credential = self
            .users
            .get(&probe_user)
            .map_or(&NO_CREDENTIAL, |u| &u.credential);
        let mut conn: Option<Backend> = None;
        let startup = own_startup_params();
        let mut ticker = tokio::time::interval(self.config.probe_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut again = false;
        let mut last_refusals = self.refusals.load(Ordering::SeqCst);
        loop {
            if !std::mem::take(&mut again) {
                tokio::select! {
                    _ = ticker.tick() => {}
                    () = self.probe_now.notified() => {}
                }
            }
            let refusals = self.refusals.load(Ordering::SeqCst);
            if refusals != last_refusals {
                // A refused write: ask on a new connection. A server process forked after the
                // refusal has the configuration the refusing one had (the postmaster reloads
                // before it signals its children), while this probe's own process may not have
                // been signalled yet.
                last_refusals = refusals;
                conn = None;
            }
            let snap = self.topology.load();
            let Some(index) = snap.index_of(&id) else { return };
            let address = snap.nodes[index].address.clone();
            if conn.as_ref().is_some_and(|c| c.addr != address) {
                conn = None;
            }
            let opts = ConnectOptions {
                addr: &address,
                user: &probe_user,
                credential,
                database: &self.pg.probe_database,
                params: &startup,
                timeout: self.config.connect_timeout,
                tls: &self.backend_tls,
            };
            let result = tokio::time::timeout(self.pg.probe_timeout, probe_once(&mut conn, opts)).await;
            let obs = match result {
                Ok(Ok(p)) => Observation::Up {
                    role: p.role,
                    lsn: p.lsn,
                    timeline: p.timeline,
                    replay_lag_ms: p.replay_lag_ms,
                    read_only: p.read_only,
                },
                Ok(Err(e)) => {
                    conn = None;
                    Observation::Down {
                        source: Source::Probe,
                        error: e.to_string(),
                    }
                }
                Err(_) => {
                    conn = None;
                    Observation::Down {
                        source: Source::Probe,
                        error: format!("probe timed out after {:?}", self.pg.probe_timeout),
                    }
                }
            };
            if matches!(obs, Observation::Up { .. }) && self.refusals.load(Ordering::SeqCst) != refusals {
                // A write was refused while this probe ran: its answer may predate the cause.
                again = true;
                continue;
            }
            self.metrics
                .probes
                .get_or_create(&ResultLabels {
                    cluster: self.config.name.clone(),
                    node: address.clone(),
                    result: if matches!(obs, Observation::Up { .. }) {
                        "ok"
                    } else {
                        "error"
                    },
                })
                .inc();
            self.observe(&id, &obs);
        }
    }

    /// The credential sluice logs in to servers with as `user`: a configured user's, or that
    /// of a role found by auth_query (its current verifier and key).
    pub fn credential(&self, user: &str) -> UserCredential<'_> {
        match self.users.get(user) {
            Some(u) => UserCredential::Configured(&u.credential),
            None => UserCredential::Found(self.dynamic.get(user)),
        }
    }

    /// The node sluice's own lookups go to (function catalog, auth_query): the primary, else
    /// any healthy node.
    pub fn lookup_node(&self) -> Option<String> {
        let snap = self.topology.load();
        let node = snap
            .primary()
            .or_else(|| snap.nodes.iter().position(|n| n.health.up))?;
        Some(snap.nodes[node].address.to_string())
    }

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

    /// A number for a new client session, unique in this cluster (never 0).
    pub fn next_session_id(&self) -> u64 {
        self.sessions.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Counts a client pinned to its backend.
    pub fn pinned(&self, reason: &'static str) {
        self.metrics
            .pins
            .get_or_create(&crate::common::metrics::ReasonLabels {
                cluster: self.config.name.clone(),
                reason,
            })
            .inc();
    }

    /// Counts a settings replay.
    pub fn settings_replayed(&self) {
        self.metrics.settings_replays.get_or_create(&self.labels()).inc();
    }

    /// Counts a refused login.
    pub fn auth_failed(&self) {
        self.metrics.auth_failures.get_or_create(&self.labels()).inc();
    }

    /// Counts a connected client; returns false when `max_client_connections` is reached.
    pub fn client_connected(&self) -> bool {
        let n = self.clients.fetch_add(1, Ordering::AcqRel);
        self.metrics.clients.get_or_create(&self.labels()).inc();
        n < self.config.max_client_connections
    }

    /// Counts a client gone.
    pub fn client_disconnected(&self) {
        self.clients.fetch_sub(1, Ordering::AcqRel);
        self.metrics.clients.get_or_create(&self.labels()).dec();
    }
}

thread_local! {
    /// Rotates the router's choice among equally loaded nodes. Per thread: every core counts
    /// its own turns instead of all cores writing one shared counter per transaction.
    static TIEBREAK: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn next_tiebreak() -> usize {
    TIEBREAK.with(|t| {
        let n = t.get();
        t.set(n.wrapping_add(1));
        n
    })
}

/// The probe tasks of a cluster, aborted when the supervisor that owns them stops.
#[derive(Default)]
struct ProbeTasks(HashMap<String, tokio::task::JoinHandle<()>>);

impl Drop for ProbeTasks {
    fn drop(&mut self) {
        for task in self.0.values() {
            task.abort();
        }
    }
}

/// What one probe found.
struct Probed {
    role: Role,
    lsn: Option<u64>,
    timeline: Option<u32>,
    replay_lag_ms: Option<u64>,
    /// `transaction_read_only` of the probe's own transaction: on for a replica, and on a
    /// primary while `default_transaction_read_only` is (a planned switchover).
    read_only: bool,
}

/// One probe: (re)connect if needed, then ask the node what it is.
async fn probe_once(conn: &mut Option<Backend>, opts: ConnectOptions<'_>) -> Result<Probed, BackendError> {
    if conn.is_none() {
        *conn = Some(Backend::connect(opts).await?);
    }
    let c = conn.as_mut().expect("just connected");
    let rows = c
        .simple_query(
            "SELECT pg_is_in_recovery(), \
             CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, \
             CASE WHEN pg_is_in_recovery() THEN NULL ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END, \
             CASE WHEN NOT pg_is_in_recovery() THEN NULL \
                  WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 \
                  ELSE (1000 * extract(epoch FROM now() - pg_last_xact_replay_timestamp()))::int8 END, \
             current_setting('transaction_read_only')",
        )
        .await?;
    let row = rows.first().ok_or_else(|| BackendError::Protocol {
        addr: opts.addr.to_string(),
        reason: "probe returned no row".into(),
    })?;
    let role = match row.first().and_then(|v| v.as_deref()) {
        Some("f") => Role::Primary,
        Some("t") => Role::Replica,
        _ => Role::Unknown,
    };
    let lsn = row.get(1).and_then(|v| v.as_deref()).and_then(parse_lsn);
    // The first 8 hex digits of a WAL file name are its timeline.
    let timeline = row
        .get(2)
        .and_then(|v| v.as_deref())
        .and_then(|t| u32::from_str_radix(t, 16).ok());
    // 0 when the replica has replayed everything it received (an idle primary writes
    // nothing, and the age of the last replayed transaction would grow for no reason).
    let replay_lag_ms = row
        .get(3)
        .and_then(|v| v.as_deref())
        .and_then(|ms| ms.parse::<i64>().ok())
        .map(|ms| ms.max(0) as u64);
    let read_only = row.get(4).and_then(|v| v.as_deref()) == Some("on");
    Ok(Probed {
        role,
        lsn,
        timeline,
        replay_lag_ms,
        read_only,
    })
}

/// Parses PostgreSQL's `XXXXXXXX/YYYYYYYY` LSN text.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// A random nonce of printable characters for SCRAM.
pub fn random_nonce() -> String {
    let mut rng = rand::rng();
    (0..24)
        .map(|_| rng.sample(rand::distr::Alphanumeric) as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text_parses() {
        assert_eq!(parse_lsn("0/3000060"), Some(0x3000060));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(parse_lsn("nope"), None);
    }
}
