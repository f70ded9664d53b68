//! The `[[clusters]]` keys only PostgreSQL clusters take. They sit in the cluster's own table
//! (as in the contract files and PgBouncer's habits); on a CQL cluster each one is an error
//! naming it, never a setting that silently does nothing.

use std::time::Duration;

use super::{Consistency, Fields, PoolMode, TopologyKind, DEFAULT_AUTH_QUERY};

/// The settings of a PostgreSQL cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct PostgresConfig {
    pub pool_mode: PoolMode,
    pub consistency: Consistency,
    pub topology: TopologyKind,
    /// Replicas further behind the primary than this many WAL bytes get no reads.
    pub max_replica_lag: Option<u64>,
    pub pool_size: usize,
    pub checkout_timeout: Duration,
    /// Clients idle (no transaction open) longer than this are disconnected.
    pub client_idle_timeout: Option<Duration>,
    pub idle_timeout: Duration,
    pub max_lifetime: Duration,
    pub probe_timeout: Duration,
    pub failover_wait: Duration,
    /// `write_hold`: while the cluster has no confirmed writable primary (a planned role
    /// change), a request that needs the primary waits up to this long for one instead of
    /// failing. `None`: off.
    pub write_hold: Option<Duration>,
    pub probe_user: Option<String>,
    pub probe_database: String,
    pub write_functions: Vec<String>,
    /// `auth_user`: a configured user that sluice logs in as to look up the verifiers of roles
    /// that are not configured (PgBouncer's auth_user).
    pub auth_user: Option<String>,
    /// `auth_query`: returns (name, verifier) of the role named by `$1`.
    pub auth_query: String,
    /// `auth_dbname`: the database the lookups run in (default: the client's database).
    pub auth_dbname: Option<String>,
}

/// The keys [`parse_postgres`] reads.
const KEYS: &[&str] = &[
    "pool_mode",
    "consistency",
    "topology",
    "max_replica_lag",
    "pool_size",
    "checkout_timeout",
    "client_idle_timeout",
    "idle_timeout",
    "max_lifetime",
    "probe_timeout",
    "failover_wait",
    "write_hold",
    "probe_user",
    "probe_database",
    "write_functions",
    "auth_user",
    "auth_query",
    "auth_dbname",
];

/// On a cluster of another protocol: each PostgreSQL key given is an error naming it.
pub(super) fn refuse(f: &mut Fields<'_>) {
    for key in KEYS {
        if f.take(key).is_some() {
            f.error(key, "applies to postgres clusters only");
        }
    }
}

/// Reads the PostgreSQL keys of a `[[clusters]]` entry. `None` means an error was recorded.
pub(super) fn parse_postgres(f: &mut Fields<'_>) -> Option<PostgresConfig> {
    let pool_mode = f.choice(
        "pool_mode",
        Some(PoolMode::Transaction),
        &[
            ("transaction", PoolMode::Transaction),
            ("session", PoolMode::Session),
        ],
    );
    let consistency = f.choice(
        "consistency",
        Some(Consistency::Eventual),
        &[
            ("eventual", Consistency::Eventual),
            ("read-your-writes", Consistency::ReadYourWrites),
            ("primary", Consistency::Primary),
        ],
    );
    let topology = f.choice(
        "topology",
        Some(TopologyKind::PrimaryReplica),
        &[
            ("primary-replica", TopologyKind::PrimaryReplica),
            ("multi-active", TopologyKind::MultiActive),
        ],
    );
    let max_replica_lag = f.optional_bytes("max_replica_lag");
    let pool_size = f.integer("pool_size", 20, 1, 10_000);
    let checkout_timeout = f.duration("checkout_timeout", "5s");
    let client_idle_timeout = f.optional_duration("client_idle_timeout");
    let idle_timeout = f.duration("idle_timeout", "10m");
    let max_lifetime = f.duration("max_lifetime", "1h");
    let probe_timeout = f.duration("probe_timeout", "2s");
    let failover_wait = f.duration("failover_wait", "5s");
    let write_hold = f.optional_duration("write_hold");
    let probe_user = f.optional_string("probe_user");
    let probe_database = f.string("probe_database", Some("postgres"));
    let write_functions = f.string_array("write_functions");
    let auth_user = f.optional_string("auth_user");
    let custom_query = f.has("auth_query");
    let auth_query = f.string("auth_query", Some(DEFAULT_AUTH_QUERY));
    let auth_dbname = f.optional_string("auth_dbname");
    if auth_user.is_none() && (custom_query || auth_dbname.is_some()) {
        f.error("auth_user", "is required when auth_query or auth_dbname is set");
    }
    if auth_query.as_deref().is_some_and(|q| !q.contains("$1")) {
        f.error(
            "auth_query",
            "must name the role as $1 (e.g. ... WHERE usename = $1)",
        );
    }
    Some(PostgresConfig {
        pool_mode: pool_mode?,
        consistency: consistency?,
        topology: topology?,
        max_replica_lag: max_replica_lag?,
        pool_size: pool_size?,
        checkout_timeout: checkout_timeout?,
        client_idle_timeout: client_idle_timeout?,
        idle_timeout: idle_timeout?,
        max_lifetime: max_lifetime?,
        probe_timeout: probe_timeout?,
        failover_wait: failover_wait?,
        write_hold: write_hold?,
        probe_user,
        probe_database: probe_database?,
        write_functions: write_functions?,
        auth_user,
        auth_query: auth_query?,
        auth_dbname,
    })
}
