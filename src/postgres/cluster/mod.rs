//! One configured cluster at run time: its topology, pools, users, probes and route choice.

mod attach;
mod auth;
mod cancel;
mod login;
mod probes;

pub use attach::{AttachError, Checkout};
pub use auth::{random_nonce, User, UserCredential};
pub use cancel::{Cancel, CancelState, CancelTarget};
pub use login::ServerParams;
pub use probes::parse_lsn;

use attach::HoldState;
use login::KnownParams;

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
use crate::postgres::pool::{PoolError, PoolSettings, Pooled, Pools};
use crate::postgres::router::{self, Intent, NoRoute, Policy};

/// SCRAM iteration count for the secrets sluice derives from configured passwords.
const SCRAM_ITERATIONS: u32 = 4096;

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
    /// Connected clients, for `max_client_connections`.
    pub clients: AtomicUsize,
    /// Sessions started, for session ids.
    sessions: std::sync::atomic::AtomicU64,
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
            clients: AtomicUsize::new(0),
            sessions: std::sync::atomic::AtomicU64::new(0),
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

    /// Replaces the node list (from discovery) and closes pooled connections to addresses that
    /// are gone.
    pub fn set_members(&self, members: &[Member]) {
        for address in self.topology.set_members(members) {
            self.pools.drain(&address);
        }
        // A role label may announce a new primary.
        self.track_hold();
    }

    fn labels(&self) -> ClusterLabels {
        ClusterLabels {
            cluster: self.config.name.clone(),
        }
    }

    /// The activity record of `database` with its function catalog (see `functions.rs`):
    /// loaded now if it never was (the caller waits), reloaded in the background if stale.
    pub async fn function_catalog(
        self: &Arc<Self>,
        user: &str,
        database: &str,
    ) -> Arc<crate::postgres::activity::DbActivity> {
        let db = self.activity.database(database);
        if crate::postgres::functions::due(&db.functions) {
            let first = db.functions.get().is_none();
            let load = {
                let (cluster, db, user) = (self.clone(), db.clone(), user.to_string());
                async move { cluster.load_functions(&db.functions, &user, &db.name).await }
            };
            if first {
                // Boxed: once per database, and every login's future would carry it inline.
                Box::pin(load).await;
            } else {
                tokio::spawn(load);
            }
        }
        db
    }

    /// Reloads the function catalog of `database` in the background (a client changed its
    /// functions).
    pub fn refresh_functions(self: &Arc<Self>, user: &str, database: &str) {
        self.activity.database(database).functions.invalidate();
        let (cluster, user, database) = (self.clone(), user.to_string(), database.to_string());
        tokio::spawn(async move { cluster.function_catalog(&user, &database).await });
    }

    async fn load_functions(
        &self,
        slot: &crate::postgres::functions::CatalogSlot,
        user: &str,
        database: &str,
    ) {
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
